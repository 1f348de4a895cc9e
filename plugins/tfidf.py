"""The default classifier: TF-IDF n-grams and a linear SVM, plus static embeddings.

Two experts score every class and their scores add up:

- **Words.** Word 1-2-grams (one-letter words included) and character 1-4-grams within
  word boundaries (robust to typos and inflection), each TF-IDF weighted with sublinear
  term frequency, scored by a one-vs-rest linear SVM (liblinear): on CLINC150 as accurate
  as a multinomial logistic regression and ten times faster to train.
- **Meaning.** A multinomial logistic regression on static sentence embeddings
  (:mod:`commhub.plugins.static_embeddings`: word-piece vectors distilled from
  all-MiniLM-L6-v2, shipped with commhub). It knows that "reserve" is near "book", which
  no n-gram does. Its log-probabilities, times ``embedding_weight``, are added to the SVM's
  decision scores. On CLINC150 the pair is right 94.3% of the time where the SVM alone is
  right 92.9% (``commhub bench classifier``). Opt-in, ``wordllama = true`` puts WordLlama's
  token vectors (:mod:`commhub.plugins.wordllama_table`, the optional ``wordllama`` package:
  ``pip install 'commhub[wordllama]'``) beside that table, each unit-length part scaled by
  1/sqrt(2); with ``embedding_weight = 0.5`` and ``action_penalty = 10`` it is better with
  few examples, worse on the full data (figures in docs/classifier.md).

Confidences are ``softmax(score / T)``.

**Honest confidence with few workflows.** A softmax over two workflows gives one of them
at least 0.5 even for nonsense. So the model also learns a hidden *background* class from
generic, unrelated phrases (``background.txt`` beside this file). Its probability is never
returned as a workflow, but it takes its share of the mass, so text unlike every
workflow's examples gets low confidences and the router falls back.

**Actions.** "Cancel my reservation" shares every telling word with a booking workflow's
examples but asks for the opposite. A workflow none of whose examples names an action on
something that exists (``ACTION_STEMS``: cancel, change, delete, ...) loses
``action_penalty`` from its score on messages that name one; the background class then
takes the mass, and the router falls back instead of starting a new booking at 0.93.

**Temperature.** With ``temperature: null`` (the default) ``T`` is fitted on held-out
data: out-of-fold decision scores from stratified k-fold cross-validation (only the first
fold from 3,000 examples on), then the ``T`` of a fixed grid with the lowest negative
log-likelihood. A workflow with fewer examples than folds lowers the folds to its count;
one with a single example leaves nothing to hold out, and ``T = 1``. A number fixes ``T``.

**Calibrated threshold.** The same held-out scores (background phrases held out too) give
the threshold (``calibrate``, on by default): the one that best separates the examples'
top confidences from the background phrases', but no higher than what sends
``fallback_target`` of the held-out examples to the fallback (:func:`calibrate_threshold`).
After :meth:`fit` it is ``self.threshold``; the hub uses it when ``threshold = "auto"``.

**Numpy only once trained.** scikit-learn fits the model; what ranking needs (the
vectorizers' vocabularies and idf, the n-gram settings, the linear models' coefficients
and intercepts, the classes, the temperature) is then exported to plain numpy arrays,
and ranking is numpy with the vectorizers' analysers written out (the same tokens as
scikit-learn's; the scores equal scikit-learn's to 1e-9). scikit-learn and SciPy are
imported only to train: a hub whose model is cached never imports them (about 1.4 s of
CPU less at start).

**Cache.** With ``cache_dir`` set, the trained model is saved to
``tfidf-{examples_key}-v{version}.npz`` (numpy arrays and a JSON header, loaded with
``allow_pickle=False``); a later :meth:`fit` on the same examples loads it instead of
training. The file records a fingerprint of the settings, the background phrases and the
embeddings; on any mismatch, or an unreadable file, the model is retrained and the file
replaced. (Pickles of earlier versions, ``-v5.pkl`` and before, are ignored: the first
start after an upgrade trains once.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import unicodedata
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from commhub.core.classify import Classifier, examples_key
from commhub.core.envelope import Alternative
from commhub.core.hookspecs import hookimpl
from commhub.plugins.static_embeddings import shipped
from commhub.plugins.wordllama_table import shipped_wordllama

if TYPE_CHECKING:  # scikit-learn is imported only to train (see "Cache" above)
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion
    from sklearn.svm import LinearSVC

__all__ = [
    "BACKGROUND",
    "TfidfClassifier",
    "TfidfSettings",
    "actions",
    "calibrate_threshold",
    "fit_temperature",
    "load_background",
]

Embedder = Callable[[Sequence[str]], np.ndarray]

# A label no workflow can have: workflow names are subject tokens, which have no spaces.
BACKGROUND = " background"
_TEMPERATURES = np.geomspace(0.01, 5.0, 91)
_ONE_FOLD_FROM = 3000


class TfidfSettings(BaseModel):
    """Settings of the ``tfidf`` classifier (the hub's plugin settings for ``tfidf``)."""

    model_config = ConfigDict(extra="forbid")

    C: float = Field(default=1.0, gt=0, description="Inverse regularisation of the linear SVM.")
    temperature: float | None = Field(
        default=None, gt=0, description="Softmax temperature; null fits it by cross-validation."
    )
    folds: int = Field(default=3, ge=2, description="Cross-validation folds for the temperature.")
    background: bool = Field(default=True, description="Train the hidden out-of-scope class.")
    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (1, 4)
    min_df: int = Field(default=1, ge=1, description="Drop n-grams seen in fewer phrases.")
    embeddings: bool = Field(
        default=True, description="Add the expert on static sentence embeddings."
    )
    wordllama: bool = Field(
        default=False,
        description="Add WordLlama's token table to the embeddings (opt-in; needs the "
                    "optional wordllama package: pip install 'commhub[wordllama]').",
    )
    embedding_weight: float = Field(
        default=0.2, ge=0, description="Weight of the embedding expert's log-probabilities."
    )
    embedding_C: float = Field(
        default=20.0, gt=0, description="Inverse regularisation of the embedding expert."
    )
    calibrate: bool = Field(
        default=True,
        description="Calibrate a threshold by cross-validation over the examples and the "
                    "background (the hub uses it with threshold = \"auto\").",
    )
    action_penalty: float = Field(
        default=5.0, ge=0,
        description="Score taken from a workflow none of whose examples names an action "
                    "(cancel, change, ...) when the message names one; 0: off.",
    )
    fallback_target: float = Field(
        default=0.03, ge=0, le=0.5,
        description="Calibration: the share of held-out examples the threshold may send "
                    "to the fallback at most.",
    )


# Actions on something that already exists, by the stem of their word forms ("cancel"
# matches cancel, cancelled, cancellation). A message naming one of them is not for a
# workflow whose examples name none: "cancel my reservation" is no new booking. (English
# only; a workflow about changing things names some of them and is not penalised.)
# ("update" is left out: "a weather update", "a points update" are things, not actions.)
ACTION_STEMS = ("cancel", "chang", "modif", "reschedul", "postpon", "delet", "remov", "edit",
                "amend", "undo", "rebook", "unsubscrib")
_WORD = re.compile(r"\w+")


def actions(text: str) -> frozenset[str]:
    """The action stems (``ACTION_STEMS``) that words of ``text`` start with."""
    words = _WORD.findall(text.casefold())
    return frozenset(stem for stem in ACTION_STEMS for word in words if word.startswith(stem))


def load_background() -> list[str]:
    """The shipped out-of-scope phrases (``background.txt``), without comments or blanks."""
    text = resources.files("commhub.plugins").joinpath("background.txt").read_text("utf-8")
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


# The n-gram analysers of scikit-learn's TfidfVectorizer, written out so that ranking
# needs no scikit-learn: the same lowercasing (``str.lower``), accent stripping
# (``strip_accents="unicode"``), token pattern and n-gram rules, hence the same tokens
# (``tests/test_classifier.py`` checks them against scikit-learn's).
_TOKEN_PATTERN = r"(?u)\b\w+\b"  # words of one letter count too ("i", "a", "2")
_TOKEN = re.compile(_TOKEN_PATTERN)
_WHITE_SPACES = re.compile(r"\s\s+")


def _strip_accents(text: str) -> str:
    """scikit-learn's ``strip_accents_unicode``: NFKD, then combining marks dropped."""
    if text.isascii():
        return text
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def _word_ngrams(text: str, ngram_range: tuple[int, int]) -> list[str]:
    """The ``analyzer="word"`` terms of ``text``: its tokens, then their n-grams."""
    tokens = _TOKEN.findall(_strip_accents(text.lower()))
    low, high = ngram_range
    if high == 1:
        return list(tokens)
    terms = list(tokens) if low == 1 else []
    for n in range(max(low, 2), min(high + 1, len(tokens) + 1)):
        terms.extend(" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return terms


def _char_wb_ngrams(text: str, ngram_range: tuple[int, int]) -> list[str]:
    """The ``analyzer="char_wb"`` terms of ``text``: character n-grams of each
    whitespace-separated word padded with one space on each side."""
    text = _WHITE_SPACES.sub(" ", _strip_accents(text.lower()))
    low, high = ngram_range
    terms: list[str] = []
    for word in text.split():
        padded = f" {word} "
        length = len(padded)
        for n in range(low, high + 1):
            offset = 0
            terms.append(padded[:n])
            while offset + n < length:
                offset += 1
                terms.append(padded[offset:offset + n])
            if offset == 0:  # a short word (shorter than n) is counted once
                break
    return terms


_ANALYZERS: dict[str, Callable[[str, tuple[int, int]], list[str]]] = {
    "word": _word_ngrams, "char_wb": _char_wb_ngrams,
}


@dataclass
class _Ngrams:
    """What one fitted TfidfVectorizer needs to transform: its analyser, n-gram range,
    vocabulary (term -> column) and idf; always sublinear tf and rows of unit length."""

    analyzer: str
    ngram_range: tuple[int, int]
    vocabulary: dict[str, int]
    idf: np.ndarray

    def counts(self, text: str, base: int, columns: list[int], counts: list[int]) -> None:
        """Append the columns (plus ``base``) of the vocabulary's terms in ``text`` to
        ``columns`` and how often each occurs to ``counts``."""
        vocabulary = self.vocabulary
        for term, count in Counter(_ANALYZERS[self.analyzer](text, self.ngram_range)).items():
            column = vocabulary.get(term)
            if column is not None:
                columns.append(column + base)
                counts.append(count)


_CHUNK = 256  # texts whose TF-IDF values are computed at once


def _segment_sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The sums of ``values`` (along the first axis) between consecutive ``starts`` (the
    last segment runs to the end); an empty segment sums to 0."""
    ends = np.append(starts[1:], len(values))
    sums = np.zeros((len(starts), *values.shape[1:]))
    filled = ends > starts
    if filled.any():
        sums[filled] = np.add.reduceat(values, starts[filled], axis=0)
    return sums


@dataclass
class _Model:
    """What is trained and cached, in plain numpy (ranking imports no scikit-learn): the
    n-gram features (word, then character columns) and their linear SVM, the embedding
    expert's multinomial logistic regression (None when off) and its weight, the
    temperature, the threshold, the action penalty. Where the embeddings come from is not
    part of it (nor of the cache): the classifier passes its ``embed`` to every call and
    names the source in the cache fingerprint."""

    classes: list[str]
    ngrams: list[_Ngrams]
    svm_coef: np.ndarray  # (features, classes): transposed, to gather a text's rows
    svm_intercept: np.ndarray  # (classes,)
    temperature: float
    meaning_coef: np.ndarray | None = None  # (classes or 1, embedding size)
    meaning_intercept: np.ndarray | None = None
    meaning_weight: float = 0.0
    threshold: float | None = None
    # Per class: True for a workflow whose examples name no action; it loses
    # ``action_penalty`` on messages that name one.
    actionless: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    action_penalty: float = 0.0

    def _svm_scores(self, texts: Sequence[str]) -> np.ndarray:
        """The SVM's decision scores, one column per class (a binary SVM's single column
        is the second class's score; the first one's is 0, as before). As scikit-learn:
        TF-IDF rows (sublinear tf, each vectorizer's part of unit length) times the
        coefficients, plus the intercepts; a chunk of texts at a time."""
        scores = np.empty((len(texts), self.svm_coef.shape[1]))
        bases = np.cumsum([0] + [len(part.idf) for part in self.ngrams])[:-1].tolist()
        idf = np.concatenate([part.idf for part in self.ngrams])
        for first in range(0, len(texts), _CHUNK):
            chunk = texts[first:first + _CHUNK]
            columns: list[int] = []
            counts: list[int] = []
            parts: list[int] = []  # where each (text, vectorizer) part starts in columns
            for text in chunk:
                for part, base in zip(self.ngrams, bases, strict=True):
                    parts.append(len(columns))
                    part.counts(text, base, columns, counts)
            column_array = np.asarray(columns, dtype=np.intp)
            values = (np.log(np.asarray(counts, dtype=np.float64)) + 1.0) * idf[column_array]
            part_starts = np.asarray(parts, dtype=np.intp)
            norms = np.sqrt(_segment_sums(values * values, part_starts))
            norms[norms == 0] = 1.0
            lengths = np.diff(np.append(part_starts, len(values)))
            values = values / np.repeat(norms, lengths)
            # Text by text: the gathered coefficient rows of one text stay in the cache.
            row_starts = [*part_starts[::len(self.ngrams)].tolist(), len(values)]
            for row in range(len(chunk)):
                start, end = row_starts[row], row_starts[row + 1]
                scores[first + row] = (values[start:end] @ self.svm_coef[column_array[start:end]]
                                       + self.svm_intercept)
        if scores.shape[1] == 1:
            scores = np.column_stack([np.zeros(len(texts)), scores])
        return scores

    def _meaning_log_proba(self, embedded: np.ndarray) -> np.ndarray:
        """scikit-learn's ``LogisticRegression.predict_log_proba``, step by step."""
        assert self.meaning_coef is not None and self.meaning_intercept is not None
        decision = embedded @ self.meaning_coef.T + self.meaning_intercept
        if decision.shape[1] == 1:  # binary: a logistic on the second class's score
            # SciPy's expit, 1 / (1 + exp(-x)) in the input's precision: numpy's float32
            # exp differs from the C library's by an ulp; the float64 exp rounded to
            # float32 agrees with it but for a rare last-bit rounding (~1e-7).
            score = decision[:, 0]
            one = np.ones(1, dtype=score.dtype)
            positive = one / (one + np.exp(-score.astype(np.float64)).astype(score.dtype))
            probabilities = np.column_stack([1 - positive, positive])
        else:
            shifted = np.exp(decision - decision.max(axis=1, keepdims=True))
            probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            return np.asarray(np.log(probabilities))

    def decision(self, texts: Sequence[str], embed: Embedder) -> np.ndarray:
        """One column of scores per class in ``classes`` order; ``embed`` gives the
        embedding expert its inputs."""
        texts = list(texts)
        scores = self._svm_scores(texts)
        if self.meaning_coef is not None:
            # Both experts were fitted on the same labels, so their columns line up.
            scores = scores + self.meaning_weight * self._meaning_log_proba(embed(texts))
        if self.action_penalty > 0 and self.actionless.any():
            naming = np.asarray([bool(actions(text)) for text in texts], dtype=bool)
            scores = scores - self.action_penalty * np.outer(naming, self.actionless)
        return np.asarray(scores)

    def probabilities(self, texts: Sequence[str], embed: Embedder) -> np.ndarray:
        return _softmax(self.decision(texts, embed) / self.temperature)


def _export(features: FeatureUnion, regression: LinearSVC, temperature: float,
            meaning: LogisticRegression | None, meaning_weight: float,
            actionless: Sequence[bool], action_penalty: float) -> _Model:
    """The plain-numpy :class:`_Model` of fitted scikit-learn estimators."""
    ngrams = []
    for _, vectorizer in features.transformer_list:
        ngrams.append(_Ngrams(
            analyzer=str(vectorizer.analyzer),
            ngram_range=(int(vectorizer.ngram_range[0]), int(vectorizer.ngram_range[1])),
            vocabulary={str(term): int(column)
                        for term, column in vectorizer.vocabulary_.items()},
            idf=np.asarray(vectorizer.idf_, dtype=np.float64),
        ))
    return _Model(
        classes=[str(c) for c in regression.classes_],
        ngrams=ngrams,
        svm_coef=np.ascontiguousarray(np.asarray(regression.coef_).T),
        svm_intercept=np.asarray(regression.intercept_, dtype=np.float64),
        temperature=temperature,
        meaning_coef=None if meaning is None else np.asarray(meaning.coef_),
        meaning_intercept=None if meaning is None else np.asarray(meaning.intercept_),
        meaning_weight=meaning_weight,
        actionless=np.asarray(actionless, dtype=bool),
        action_penalty=action_penalty,
    )


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True))


class TfidfClassifier(Classifier):
    """TF-IDF + linear SVM plus an embedding expert, with a background class; see the
    module docstring.

    After :meth:`fit`, ``trained`` tells whether this instance trained the model (False
    when it came from the cache). :meth:`rank` is safe to call from one thread at a time.
    """

    name: ClassVar[str] = "tfidf"
    version: ClassVar[str] = "6"
    Settings: ClassVar[type[BaseModel] | None] = TfidfSettings

    def __init__(self, settings: BaseModel | None = None, cache_dir: Path | None = None) -> None:
        super().__init__(settings if settings is not None else TfidfSettings(), cache_dir)
        self.options = TfidfSettings.model_validate(self.settings, from_attributes=True)
        self.background = load_background() if self.options.background else []
        self.trained = False
        self._model: _Model | None = None
        self._classes: list[str] = []

    def add_background(self, phrases: Sequence[str]) -> bool:
        """Add out-of-scope phrases to the background class of the next :meth:`fit` (they
        become part of the cache fingerprint). Returns True; with ``background: false``
        they are ignored and it returns False."""
        if not self.options.background:
            return False
        self.background = [*self.background, *phrases]
        return True

    # ------------------------------------------------------------------ fit
    def fit(self, examples: Mapping[str, Sequence[str]]) -> None:
        """Train on ``{workflow: phrases}`` (workflows without phrases are left out), or
        load the cached model for these examples. No workflows: :meth:`rank` returns
        empty lists. One workflow without a background: it always gets confidence 1.

        Sets ``threshold`` to the calibrated threshold (see :func:`calibrate_threshold`),
        or None when calibration is off or there are too few examples to hold any out
        (some workflow with fewer than two phrases, or only one class to tell apart)."""
        examples = {name: list(phrases) for name, phrases in examples.items() if phrases}
        key = examples_key(examples)
        self.model_id = f"{self.name}-{key}"
        self._classes = sorted(examples)
        self.trained = False
        self._model = None
        self.threshold = None
        if not examples:
            return
        path = self.cache_path(key)
        fingerprint = self._fingerprint()
        cached = _read_cache(path, fingerprint) if path is not None else None
        if cached is not None:
            self._model = cached
        else:
            self._model = self._train(examples)
            self.trained = True
            if path is not None and self._model is not None:
                _write_cache(path, fingerprint, self._model)
        self.threshold = self._model.threshold if self._model is not None else None

    def cache_path(self, key: str) -> Path | None:
        """Where the model for examples with ``key`` is cached, or None without a cache."""
        if self.cache_dir is None:
            return None
        return Path(self.cache_dir) / f"{self.name}-{key}-v{self.version}.npz"

    # ------------------------------------------------------------------ embeddings
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """The embedding expert's inputs: one row per text. Here the shipped static
        embeddings, beside WordLlama's if ``wordllama`` is on (each unit-length part
        scaled by 1/sqrt(2), so rows stay of unit length); a subclass may use another
        sentence encoder. Raises ValueError when a table is missing or corrupt."""
        rows = shipped().transform(texts)
        if not self.options.wordllama:
            return rows
        both = np.hstack([rows, shipped_wordllama().transform(texts)])
        return np.asarray(both / np.float32(np.sqrt(2.0)))

    def embedding_id(self) -> str:
        """Names the embeddings in the cache fingerprint: other embeddings, other model."""
        if not self.options.wordllama:
            return f"static-{shipped().digest}"
        return f"static-{shipped().digest}+wordllama-{shipped_wordllama().digest}"

    def _fingerprint(self) -> str:
        parts = [self.version, self.options.model_dump_json(), "\n".join(self.background),
                 self.embedding_id() if self.options.embeddings else ""]
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    def _train(self, examples: Mapping[str, Sequence[str]]) -> _Model | None:
        o = self.options
        texts, labels = _dataset(examples, self.background)
        if len(set(labels)) < 2:
            return None  # one class, nothing to tell apart: rank() answers 1.0
        held_out = None
        if o.temperature is None or o.calibrate:
            held_out = _out_of_fold(texts, labels, self._build, o.folds, self.embed)
        temperature = o.temperature
        if temperature is None:
            temperature = 1.0 if held_out is None else fit_temperature(*held_out[:2])
        threshold = None
        if o.calibrate and held_out is not None:
            scores, truth, classes = held_out
            probabilities = _softmax(scores / temperature)
            workflows = [i for i, name in enumerate(classes) if name != BACKGROUND]
            top = probabilities[:, workflows].max(axis=1)
            background = np.asarray([classes[i] == BACKGROUND for i in truth])
            threshold = calibrate_threshold(top[~background], top[background],
                                            o.fallback_target)
        model = self._build(texts, labels, temperature)
        model.threshold = threshold
        return model

    def _build(self, texts: Sequence[str], labels: Sequence[str], temperature: float) -> _Model:
        """Train on ``texts`` with scikit-learn and export the plain-numpy model."""
        features, regression, meaning = self._fit_estimators(texts, labels)
        acting = {label for text, label in zip(texts, labels, strict=True) if actions(text)}
        actionless = [c != BACKGROUND and c not in acting for c in regression.classes_]
        return _export(features, regression, temperature, meaning,
                       self.options.embedding_weight, actionless, self.options.action_penalty)

    def _fit_estimators(
        self, texts: Sequence[str], labels: Sequence[str]
    ) -> tuple[FeatureUnion, LinearSVC, LogisticRegression | None]:
        """The fitted scikit-learn estimators (imported here: only training needs them)."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import FeatureUnion
        from sklearn.svm import LinearSVC

        o = self.options
        features = FeatureUnion([
            # Words of one letter count too ("i", "a", "2").
            ("word", TfidfVectorizer(ngram_range=o.word_ngrams, sublinear_tf=True,
                                     strip_accents="unicode", token_pattern=_TOKEN_PATTERN,
                                     min_df=o.min_df)),
            ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=o.char_ngrams,
                                     sublinear_tf=True, strip_accents="unicode",
                                     min_df=o.min_df)),
        ])
        matrix = features.fit_transform(list(texts))
        # Balanced weights: the background list is larger than a workflow's examples and
        # must not outvote them merely by count.
        regression = LinearSVC(C=o.C, class_weight="balanced")
        regression.fit(matrix, list(labels))
        meaning = None
        if o.embeddings and o.embedding_weight > 0:
            meaning = LogisticRegression(C=o.embedding_C, max_iter=500, class_weight="balanced")
            with warnings.catch_warnings():
                # Not converging to the last digit within max_iter changes no ranking.
                warnings.simplefilter("ignore", ConvergenceWarning)
                meaning.fit(self.embed(list(texts)), list(labels))
        return features, regression, meaning

    # ------------------------------------------------------------------ rank
    def rank(self, texts: Sequence[str], top: int = 3) -> list[list[Alternative]]:
        """For each text, up to ``top`` workflows, best first (ties by name); the
        background class is never listed. Raises RuntimeError before :meth:`fit`."""
        if not self.model_id:
            raise RuntimeError("TfidfClassifier.rank() called before fit()")
        if not self._classes or top <= 0:
            return [[] for _ in texts]
        if self._model is None:
            return [[Alternative(self._classes[0], 1.0)][:top] for _ in texts]
        if not texts:
            return []
        probabilities = self._model.probabilities(texts, self.embed)
        classes = self._model.classes
        ranked = []
        for row in probabilities:
            pairs = [(c, float(p)) for c, p in zip(classes, row, strict=True) if c != BACKGROUND]
            pairs.sort(key=lambda pair: (-pair[1], pair[0]))
            ranked.append([Alternative(c, round(p, 6)) for c, p in pairs[:top]])
        return ranked


def _dataset(
    examples: Mapping[str, Sequence[str]], background: Sequence[str]
) -> tuple[list[str], list[str]]:
    texts: list[str] = []
    labels: list[str] = []
    seen = set()
    for name in sorted(examples):
        for phrase in examples[name]:
            texts.append(phrase)
            labels.append(name)
            seen.add(phrase.strip().casefold())
    for phrase in background:
        # A workflow's own phrase must not also be taught as out of scope.
        if phrase.strip().casefold() not in seen:
            texts.append(phrase)
            labels.append(BACKGROUND)
    return texts, labels


def _out_of_fold(
    texts: Sequence[str],
    labels: Sequence[str],
    build: Callable[[Sequence[str], Sequence[str], float], _Model],
    folds: int,
    embed: Embedder,
) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """Held-out decision scores by stratified k-fold cross-validation: ``(scores, truth,
    classes)``, one row of scores (columns in ``classes`` order) and the index of the true
    class for each held-out text. The folds are ``folds``, or fewer when the smallest class
    has fewer texts; None when it has fewer than two (nothing can be held out). From
    ``_ONE_FOLD_FROM`` texts on only the first fold is held out: a few thousand scores fix
    a temperature and a threshold well, and training stays at two fits instead of
    ``folds + 1``."""
    label_array = np.asarray(labels)
    _, counts = np.unique(label_array, return_counts=True)
    folds = min(folds, int(counts.min()))
    if folds < 2:
        return None
    text_array = np.asarray(texts, dtype=object)
    classes = sorted(set(labels))
    scores = np.zeros((len(texts), len(classes)))
    held_out = np.zeros(len(texts), dtype=bool)
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    for number, (train, test) in enumerate(splitter.split(text_array, label_array)):
        if number and len(texts) >= _ONE_FOLD_FROM:
            break
        held_out[test] = True
        model = build(list(text_array[train]), list(label_array[train]), 1.0)
        fold_classes = model.classes
        decision = model.decision(list(text_array[test]), embed)
        # A class absent from a training fold keeps a very low score for that fold.
        fold_scores = np.full((len(test), len(classes)), -1e3)
        for column, name in enumerate(fold_classes):
            fold_scores[:, classes.index(name)] = decision[:, column]
        scores[test] = fold_scores
    truth = np.asarray([classes.index(label) for label in label_array[held_out]])
    return scores[held_out], truth, classes


def fit_temperature(scores: np.ndarray, truth: np.ndarray) -> float:
    """The temperature of a fixed grid that gives held-out ``scores`` (one row per text)
    the lowest negative log-likelihood of the true classes ``truth`` (column indices)."""
    best, best_loss = 1.0, float("inf")
    for temperature in _TEMPERATURES:
        probabilities = _softmax(scores / temperature)
        loss = -float(np.mean(np.log(probabilities[np.arange(len(truth)), truth] + 1e-12)))
        if loss < best_loss:
            best, best_loss = float(temperature), loss
    return best


def calibrate_threshold(
    in_scope: np.ndarray, background: np.ndarray, fallback_target: float = 0.03
) -> float | None:
    """The threshold between held-out top confidences of workflow examples (``in_scope``)
    and of background phrases (``background``).

    It is the one that best separates the two (the most examples kept plus background
    phrases rejected, each as a share of its own kind; the middle of the best range when
    several thresholds do equally well), but never above the level that sends more than
    ``fallback_target`` of ``in_scope`` to the fallback: few shots give real messages a
    low, spread-out confidence, and a needless fallback is what a flow author notices
    first. Without background scores, only that cap applies. Returns None when
    ``in_scope`` is empty (nothing to calibrate on).
    """
    in_scope = np.sort(np.asarray(in_scope, dtype=float))
    background = np.sort(np.asarray(background, dtype=float))
    if not len(in_scope):
        return None
    # The largest threshold that keeps all but fallback_target of in_scope.
    cap = float(in_scope[int(np.floor(fallback_target * len(in_scope)))])
    if not len(background):
        return cap
    candidates = np.unique(np.concatenate([in_scope, background, [cap]]))
    candidates = candidates[candidates <= cap]
    kept = 1.0 - np.searchsorted(in_scope, candidates, side="left") / len(in_scope)
    rejected = np.searchsorted(background, candidates, side="left") / len(background)
    score = kept + rejected
    first = int(np.argmax(score))
    last = first
    while last + 1 < len(score) and score[last + 1] == score[first]:
        last += 1
    # Every threshold above the candidate before ``first`` and up to ``last`` counts the
    # same: take the middle of that range.
    below = float(candidates[first - 1]) if first else 0.0
    return float((below + candidates[last]) / 2)


# The cache: one uncompressed ``.npz`` (read with ``allow_pickle=False``: no code runs on
# load) holding the arrays, and a ``meta`` array with the JSON of everything else.
_CACHE_FORMAT = 1


def _read_cache(path: Path, fingerprint: str) -> _Model | None:
    """The cached model, or None when missing, unreadable, of another format or of another
    fingerprint."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            meta = json.loads(bytes(arrays["meta"]).decode("utf-8"))
            if (not isinstance(meta, dict) or meta.get("format") != _CACHE_FORMAT
                    or meta.get("fingerprint") != fingerprint):
                return None
            ngrams = [
                _Ngrams(analyzer=str(part["analyzer"]),
                        ngram_range=(int(part["ngram_range"][0]), int(part["ngram_range"][1])),
                        vocabulary={str(term): column
                                    for column, term in enumerate(part["terms"])},
                        idf=np.asarray(arrays[f"idf{number}"], dtype=np.float64))
                for number, part in enumerate(meta["ngrams"])
            ]
            meaning = bool(meta["meaning"])
            model = _Model(
                classes=[str(c) for c in meta["classes"]],
                ngrams=ngrams,
                svm_coef=np.asarray(arrays["svm_coef"]),
                svm_intercept=np.asarray(arrays["svm_intercept"]),
                temperature=float(meta["temperature"]),
                meaning_coef=np.asarray(arrays["meaning_coef"]) if meaning else None,
                meaning_intercept=np.asarray(arrays["meaning_intercept"]) if meaning else None,
                meaning_weight=float(meta["meaning_weight"]),
                threshold=None if meta["threshold"] is None else float(meta["threshold"]),
                actionless=np.asarray(arrays["actionless"], dtype=bool),
                action_penalty=float(meta["action_penalty"]),
            )
    except (OSError, EOFError, KeyError, IndexError, ValueError, TypeError,
            zipfile.BadZipFile, UnicodeDecodeError):
        return None
    if any(part.analyzer not in _ANALYZERS for part in model.ngrams):
        return None
    return model


def _write_cache(path: Path, fingerprint: str, model: _Model) -> None:
    """Write atomically: a concurrent reader sees the old file or the new one, never half."""
    meta = {
        "format": _CACHE_FORMAT, "fingerprint": fingerprint, "classes": model.classes,
        "temperature": model.temperature, "threshold": model.threshold,
        "meaning": model.meaning_coef is not None, "meaning_weight": model.meaning_weight,
        "action_penalty": model.action_penalty,
        "ngrams": [{"analyzer": part.analyzer, "ngram_range": list(part.ngram_range),
                    "terms": [term for term, _ in sorted(part.vocabulary.items(),
                                                         key=lambda item: item[1])]}
                   for part in model.ngrams],
    }
    arrays: dict[str, np.ndarray] = {
        "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
        "svm_coef": model.svm_coef, "svm_intercept": model.svm_intercept,
        "actionless": model.actionless,
    }
    for number, part in enumerate(model.ngrams):
        arrays[f"idf{number}"] = part.idf
    if model.meaning_coef is not None and model.meaning_intercept is not None:
        arrays["meaning_coef"] = model.meaning_coef
        arrays["meaning_intercept"] = model.meaning_intercept
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez(file, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@hookimpl
def register_classifiers(register: Callable[[type], None]) -> None:
    """Register :class:`TfidfClassifier` as ``tfidf``."""
    register(TfidfClassifier)
