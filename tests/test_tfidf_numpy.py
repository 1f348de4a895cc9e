"""The default classifier ranks in plain numpy: the same tokens and scores as the
scikit-learn estimators it was trained with, and a cached model loads without importing
scikit-learn or SciPy (issue 14: the start with a cached model)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from commhub.core.engine.fsm import Engine
from commhub.core.workflow import load_workflows
from commhub.plugins import tfidf
from commhub.plugins.tfidf import TfidfClassifier, load_background
from commhub.workflows.builtin import DEFINITIONS

ODD = [
    "", " ", "   \t\n ", "?!", "...", "x", "I", "a b c", "42", "3.14 km/h", "no_underscore_split",
    "Café crème brûlée", "naïve résumé façade", "ÉCOLE", "Straße", "ﬁne ligature", "Ⅻ roman",
    "東京で予約したい", "我想订一张桌子", "забронировать столик на двоих", "مرحبا كيف حالك",
    "हिन्दी में", "emoji 🎉🍕 party", "tab\tand\nnewline  double  spaces", "İstanbul ıi",
    "ǅemal", "e\u0301 combining", "zero\u200bwidth", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "CANCEL my booking",
    "xyzzy plugh", "qwertyuiopasdfghjkl", "book book book book book", "table" * 30,
    "a" * 500, "the the the", "don't won't can't", "e-mail re-book co-op", "#hashtag @user",
]


def _phrases(examples: dict[str, list[str]]) -> list[str]:
    """A few hundred varied phrases: examples, background, their recombinations with
    unknown words and unicode, and odd strings."""
    rng = random.Random(14)
    known = [p for phrases in examples.values() for p in phrases] + load_background()
    words = [*" ".join(known).split(), "zzgrok", "blarf", "Ünïcödé", "日本", "ß", "ﬀ", "🎉"]
    phrases = list(ODD) + rng.sample(known, min(150, len(known)))
    for _ in range(200):
        phrase = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        phrases.append(phrase.upper() if rng.random() < 0.2 else phrase)
    return phrases


@pytest.fixture(scope="module")
def examples() -> dict[str, list[str]]:
    return Engine(load_workflows([DEFINITIONS])).examples()


def test_analysers_give_sklearns_tokens(examples: dict[str, list[str]]) -> None:
    """The written-out analysers give exactly TfidfVectorizer's terms, in order."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    for low, high in [(1, 1), (1, 2), (2, 3), (1, 4)]:
        word = TfidfVectorizer(ngram_range=(low, high), strip_accents="unicode",
                               token_pattern=tfidf._TOKEN_PATTERN).build_analyzer()
        char = TfidfVectorizer(analyzer="char_wb", ngram_range=(low, high),
                               strip_accents="unicode").build_analyzer()
        for phrase in _phrases(examples):
            assert tfidf._word_ngrams(phrase, (low, high)) == word(phrase), phrase
            assert tfidf._char_wb_ngrams(phrase, (low, high)) == char(phrase), phrase


@pytest.mark.parametrize("which", ["all", "one workflow", "no embeddings"])
def test_numpy_scores_equal_sklearns(examples: dict[str, list[str]], which: str) -> None:
    """The exported model's scores equal the scikit-learn estimators' to 1e-9: the SVM's
    decision scores, the embedding expert's log-probabilities and the sum (with the action
    penalty) on a few hundred phrases; binary models (one workflow and the background)
    too."""
    settings = tfidf.TfidfSettings(embeddings=which != "no embeddings")
    classifier = TfidfClassifier(settings)
    chosen = dict(list(examples.items())[:1]) if which == "one workflow" else examples
    texts, labels = tfidf._dataset(chosen, classifier.background)
    features, regression, meaning = classifier._fit_estimators(texts, labels)
    acting = {label for text, label in zip(texts, labels, strict=True) if tfidf.actions(text)}
    actionless = [c != tfidf.BACKGROUND and c not in acting for c in regression.classes_]
    model = tfidf._export(features, regression, 1.0, meaning, settings.embedding_weight,
                          actionless, settings.action_penalty)
    phrases = _phrases(examples)

    svm = regression.decision_function(features.transform(phrases))
    if svm.ndim == 1:
        svm = np.column_stack([np.zeros_like(svm), svm])
    np.testing.assert_allclose(model._svm_scores(phrases), svm, rtol=0, atol=1e-9)
    assert model.classes == [str(c) for c in regression.classes_]
    expected = svm
    tolerance = 1e-9
    if meaning is not None:
        embedded = classifier.embed(phrases)
        log_proba = meaning.predict_log_proba(embedded)
        # float32 embeddings give float32 log-probabilities. With more than two classes
        # they are numpy's softmax either way and equal; with two, scikit-learn calls
        # SciPy's float32 expit (the C library's expf), which numpy reproduces only to
        # float32 precision.
        binary = len(model.classes) == 2 and log_proba.dtype == np.float32
        tolerance = 1e-6 if binary else 1e-9
        np.testing.assert_allclose(model._meaning_log_proba(embedded), log_proba,
                                   rtol=0, atol=tolerance)
        expected = expected + settings.embedding_weight * log_proba
    else:
        assert model.meaning_coef is None
    naming = np.asarray([bool(tfidf.actions(p)) for p in phrases])
    expected = expected - settings.action_penalty * np.outer(naming, model.actionless)
    np.testing.assert_allclose(model.decision(phrases, classifier.embed), expected,
                               rtol=0, atol=tolerance if meaning is not None else 1e-9)


def test_cached_model_loads_without_sklearn(
    tmp_path: Path, examples: dict[str, list[str]]
) -> None:
    """In a fresh interpreter, the hub's imports, loading the cached model and ranking
    leave 'sklearn' and 'scipy' out of sys.modules, and rank as the trained model does."""
    trained = TfidfClassifier(cache_dir=tmp_path)
    trained.fit(examples)
    assert trained.trained
    [cached] = tmp_path.iterdir()
    assert cached.suffix == ".npz"
    phrases = ["book a table for 4", "my printer is broken", "Café ☕", ""]
    script = f"""
import json, sys
import commhub.core.hub, commhub.core.cli, commhub.plugins.minilm
from commhub.core.engine.fsm import Engine
from commhub.core.workflow import load_workflows
from commhub.plugins.tfidf import TfidfClassifier
from commhub.workflows.builtin import DEFINITIONS
classifier = TfidfClassifier(cache_dir={str(tmp_path)!r})
classifier.fit(Engine(load_workflows([DEFINITIONS])).examples())
ranked = classifier.rank({phrases!r})
print(json.dumps({{
    "trained": classifier.trained, "threshold": classifier.threshold,
    "ranked": [[[a.workflow, a.confidence] for a in row] for row in ranked],
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("sklearn", "scipy")),
}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["modules"] == []
    assert result["trained"] is False
    assert result["threshold"] == trained.threshold
    expected = [[[a.workflow, a.confidence] for a in row] for row in trained.rank(phrases)]
    assert result["ranked"] == expected


def test_old_pickles_are_ignored(tmp_path: Path, examples: dict[str, list[str]]) -> None:
    """A pickle of an earlier version beside it does not stop the model from training and
    being cached as .npz."""
    classifier = TfidfClassifier(cache_dir=tmp_path)
    (tmp_path / "tfidf-old-v5.pkl").write_bytes(b"\x80\x04old")
    classifier.fit(examples)
    assert classifier.trained
    path = classifier.cache_path(classifier.model_id.removeprefix("tfidf-"))
    assert path is not None and path.suffix == ".npz" and path.is_file()
