"""WordLlama's static token embeddings, read from the ``wordllama`` package's own files.

Opt-in (``[plugins.tfidf] wordllama = true``) and an optional dependency (``pip install
'commhub[wordllama]'``): its weights derive from Llama 2's token embeddings while the
package says MIT, so whether Llama 2's licence reaches them is unclear, and commhub does
not install them by default. The ``wordllama`` wheel (on PyPI) ships a table of
256-dimensional token vectors (``weights/l2_supercat_256.safetensors``: Llama 2's
32,000-token vocabulary, trained by WordLlama on sentence pairs from the concatenated
token embeddings of several large language models) and its tokenizer
(``tokenizers/l2_supercat_tokenizer_config.json``). A sentence's embedding is the mean of
its tokens' vectors, scaled to unit length, as WordLlama's own ``embed(norm=True)``
computes it.

Why not ``WordLlama.load()``: in wordllama 0.4 it looks for the tokenizer in a folder
named ``tokenizer`` while the wheel has ``tokenizers``, then downloads the file from
Hugging Face; commhub never downloads at run time, so it opens both files itself.

Paired with commhub's MiniLM table (:mod:`commhub.plugins.static_embeddings`), whose
errors it does not share (another vocabulary, another teacher), it makes the ``tfidf``
classifier's embedding expert about 2 points more accurate at ten examples per workflow
(docs/classifier.md; on the full data it costs out-of-scope recall). The table (16 MB as
float16; about 50 MB resident with the tokenizer) is read once per process, on first use,
and then shared. A :class:`WordLlamaTable` is not changed after construction; the
classifier calls it from one worker thread at a time (the ``Classifier.rank`` contract).
A missing or corrupt file raises :class:`ValueError` naming it.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

__all__ = ["WordLlamaTable", "shipped_wordllama"]

WEIGHTS = "weights/l2_supercat_256.safetensors"
TOKENIZER = "tokenizers/l2_supercat_tokenizer_config.json"


class WordLlamaTable:
    """Token vectors and the tokenizer of their vocabulary."""

    def __init__(self, vectors: np.ndarray, tokenizer_json: str, digest: str = "") -> None:
        from tokenizers import Tokenizer

        if vectors.ndim != 2:
            raise ValueError("embedding table: the vectors are not a matrix")
        # Kept as float16, as shipped (16 MB, not 33 MB, resident); sums in float32.
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float16)
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        if self.tokenizer.get_vocab_size() > len(self.vectors):
            raise ValueError("embedding table: vectors and vocabulary do not match")
        self.digest = digest
        self.dims = int(self.vectors.shape[1])

    @classmethod
    def load(cls, weights: Path, tokenizer: Path) -> WordLlamaTable:
        """Read the table (tensor ``embedding.weight``) and its tokenizer."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        try:
            raw = Path(weights).read_bytes()
            # As stored (float16): no float32 copy of the whole table, even for a moment.
            vectors = load(raw)["embedding.weight"]
            tokenizer_json = Path(tokenizer).read_text("utf-8")
        except (OSError, KeyError, ValueError, SafetensorError) as error:
            raise ValueError(f"{weights}: not a usable WordLlama table ({error})") from error
        try:
            return cls(vectors, tokenizer_json, hashlib.sha256(raw).hexdigest()[:16])
        except Exception as error:  # tokenizers raises a bare Exception for a bad file
            raise ValueError(f"{tokenizer}: not a usable WordLlama table ({error})") from error

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dims)`` float32 rows of unit length; a text without tokens
        (empty) is a row of zeros."""
        result = np.zeros((len(texts), self.dims), dtype=np.float32)
        if not texts:
            return result
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        for row, encoding in enumerate(encodings):
            ids = encoding.ids
            if not ids:
                continue
            vector = self.vectors[ids].mean(axis=0, dtype=np.float32)
            norm = float(np.linalg.norm(vector))
            if norm > 0:
                result[row] = vector / norm
        return result


@cache
def shipped_wordllama() -> WordLlamaTable:
    """The table in the installed ``wordllama`` package (read once per process). Raises
    ValueError when the package or its files are missing.

    The package is located, not imported: its ``__init__`` loads modules (an HTTP client,
    compiled algorithms) that commhub does not use."""
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the wordllama package is not installed (pip install "
                         "'commhub[wordllama]'; or set wordllama = false)")
    root = Path(next(iter(spec.submodule_search_locations)))
    return WordLlamaTable.load(root / WEIGHTS, root / TOKENIZER)
