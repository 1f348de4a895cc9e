"""Static sentence embeddings: a weighted mean of word-piece vectors from a shipped table.

``data/minilm-static.npz`` holds one 256-dimensional vector per word piece of BERT's
uncased vocabulary, distilled from the sentence encoder all-MiniLM-L6-v2 (Apache-2.0) by
``tools/distill_static.py`` (Model2Vec's method). A sentence's embedding is the weighted
mean of its pieces' vectors, scaled to unit length: it knows that "reserve" is close to
"book" and "cash" to "money", which TF-IDF n-grams cannot, at the cost of a table lookup
(about 20 µs a sentence), with no model download and no PyTorch.

The table (15 MB) is read once per process, on first use, and then shared; a
:class:`StaticEmbeddings` is read-only after construction, so threads may share it. A
missing or corrupt table raises :class:`ValueError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from commhub.plugins.wordpiece import WordPiece

__all__ = ["StaticEmbeddings", "shipped"]

SHIPPED = "minilm-static.npz"


class StaticEmbeddings:
    """A table of piece vectors, their weights and the tokenizer of their vocabulary."""

    def __init__(self, vectors: np.ndarray, weights: np.ndarray, vocab: Sequence[str] | WordPiece,
                 meta: dict[str, Any] | None = None, digest: str = "") -> None:
        tokenizer = vocab if isinstance(vocab, WordPiece) else WordPiece(vocab)
        if (vectors.ndim != 2 or len(vectors) != len(weights)
                or len(vectors) <= max(tokenizer.vocab.values())):
            raise ValueError("embedding table: vectors, weights and vocabulary do not match")
        self.vectors = np.asarray(vectors, dtype=np.float32)
        self.weights = np.asarray(weights, dtype=np.float32)
        self.tokenizer = tokenizer
        self.meta = meta or {}
        self.digest = digest
        self.dims = int(self.vectors.shape[1])

    @classmethod
    def load(cls, path: Path) -> StaticEmbeddings:
        """Read a table written by ``tools/distill_static.py``."""
        try:
            raw = Path(path).read_bytes()
            with np.load(path, allow_pickle=False) as data:
                vocab = data["vocab"].tobytes().decode("utf-8")
                meta = json.loads(data["meta"].tobytes().decode("utf-8"))
                return cls(data["vectors"], data["weights"], WordPiece.from_text(vocab), meta,
                           hashlib.sha256(raw).hexdigest()[:16])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not a usable embedding table ({error})") from error

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dims)`` float32 rows of unit length; a text with no piece in the
        vocabulary (empty, or only unknown symbols) is a row of zeros."""
        result = np.zeros((len(texts), self.dims), dtype=np.float32)
        unknown = self.tokenizer.unk
        for row, text in enumerate(texts):
            ids = [piece for piece in self.tokenizer.ids(text) if piece != unknown]
            if not ids:
                continue
            weights = self.weights[ids]
            vector = weights @ self.vectors[ids]
            norm = float(np.linalg.norm(vector))
            if norm > 0:
                result[row] = vector / norm
        return result


@cache
def shipped() -> StaticEmbeddings:
    """The table shipped in ``commhub.plugins`` (read once per process)."""
    resource = resources.files("commhub.plugins").joinpath("data", SHIPPED)
    with resources.as_file(resource) as path:
        return StaticEmbeddings.load(path)
