"""The classifier interface, and the micro-batcher the router calls it through.

A classifier plugin subclasses :class:`Classifier`: it is trained from the example
phrases that workflows declare and ranks workflows for a text with confidences in
[0, 1]. :class:`BatchingClassifier` lets many conversations ask at once while the model
sees one batch per event-loop turn, run in a worker thread so the loop never blocks on
scikit-learn.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel

from commhub.core.envelope import Alternative

__all__ = [
    "DEFAULT_THRESHOLD",
    "BatchingClassifier",
    "Classifier",
    "check_threshold",
    "examples_key",
    "routing_threshold",
]

# The threshold used when ``threshold = "auto"`` but the classifier calibrated none.
DEFAULT_THRESHOLD = 0.35


def examples_key(examples: Mapping[str, Sequence[str]]) -> str:
    """A stable hash of the training examples: the cache key of a trained model."""
    canonical = json.dumps({k: list(v) for k, v in sorted(examples.items())}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class Classifier:
    """Base class of classifier plugins.

    ``fit`` is called once at start (it may load a cached model from ``cache_dir``
    instead of training); ``rank`` is then called from one worker thread at a time.

    ``threshold`` is the classifier's own calibrated threshold, in [0, 1]: a plugin that
    can tell from its training data which confidence separates its workflows' messages
    from unrelated text sets it in ``fit``. None (the default) means "no calibration":
    the hub then uses ``DEFAULT_THRESHOLD`` when its ``threshold`` setting is ``"auto"``.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Settings: ClassVar[type[BaseModel] | None] = None

    def __init__(self, settings: BaseModel | None = None, cache_dir: Path | None = None) -> None:
        self.settings = settings
        self.cache_dir = cache_dir
        self.model_id = ""
        self.threshold: float | None = None

    def fit(self, examples: Mapping[str, Sequence[str]]) -> None:
        """Train on ``{workflow: [example phrase, ...]}``; set ``self.model_id``."""
        raise NotImplementedError

    def rank(self, texts: Sequence[str], top: int = 3) -> list[list[Alternative]]:
        """For each text, the ``top`` best workflows, best first, confidences in [0, 1]."""
        raise NotImplementedError

    def add_background(self, phrases: Sequence[str]) -> bool:
        """Offer out-of-scope phrases (text no workflow should take) to learn from in the
        next :meth:`fit`. Return True if the classifier uses them; the default ignores
        them and returns False. ``commhub bench classifier`` offers a data set's
        ``oos_train`` split this way."""
        return False


def check_threshold(value: float, what: str = "threshold") -> float:
    """``value`` as a float if it is a number in [0, 1]; ValueError naming ``what`` otherwise
    (NaN included)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 <= number <= 1.0:  # also False for NaN
        raise ValueError(f"{what} must be a number in [0, 1], not {value!r}")
    return number


def routing_threshold(setting: float | str, calibrated: float | None) -> tuple[float, str]:
    """The threshold the router uses and where it comes from.

    ``setting`` is the hub's ``threshold`` setting: a number in [0, 1] is used as given
    (``"fixed"``); ``"auto"`` takes ``calibrated`` (the classifier's ``threshold`` after
    ``fit``; ``"calibrated"``), or ``DEFAULT_THRESHOLD`` when that is None (``"default"``).
    Raises ValueError for any other setting or a calibrated value outside [0, 1].
    """
    if setting == "auto":
        if calibrated is None:
            return DEFAULT_THRESHOLD, "default"
        return check_threshold(calibrated, "the classifier's calibrated threshold"), "calibrated"
    if isinstance(setting, str):
        raise ValueError(f'threshold must be "auto" or a number in [0, 1], not {setting!r}')
    return check_threshold(setting), "fixed"


class BatchingClassifier:
    """Collects concurrent ``classify`` calls into one ``rank`` call per loop turn.

    Concurrency: any number of tasks may await ``classify`` at once; ``rank`` runs in
    one worker thread at a time. Failure: if ``rank`` raises, every caller in that batch
    gets the exception.
    """

    def __init__(self, classifier: Classifier, top: int = 3, max_batch: int = 256) -> None:
        self.classifier = classifier
        self.top = top
        self.max_batch = max_batch
        self._pending: list[tuple[str, asyncio.Future[list[Alternative]]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def classify(self, text: str) -> list[Alternative]:
        future: asyncio.Future[list[Alternative]] = asyncio.get_running_loop().create_future()
        self._pending.append((text, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        await asyncio.sleep(0)  # let the other ready tasks add their texts first
        while self._pending:
            batch, self._pending = (
                self._pending[: self.max_batch],
                self._pending[self.max_batch :],
            )
            texts = [text for text, _ in batch]
            try:
                ranked = await asyncio.to_thread(self.classifier.rank, texts, self.top)
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), alternatives in zip(batch, ranked, strict=True):
                if not future.done():
                    future.set_result(alternatives)
