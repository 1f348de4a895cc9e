"""``commhub bench classifier``: evaluate a classifier plugin on a data set in CLINC150 format.

The data is one JSON object with the splits ``train``, ``val`` and ``test`` and optionally
``oos_train``, ``oos_val`` and ``oos_test``, each a list of ``[text, intent]`` pairs (the
format of Larson et al., "An Evaluation Dataset for Intent Classification and Out-of-Scope
Prediction", EMNLP 2019). The in-scope intents of ``train`` play the workflows: the
classifier is fitted on ``{intent: [texts]}`` exactly as the hub fits it on the workflows'
example phrases. ``oos_train`` (if present) is given to the classifier as out-of-scope
background phrases when it accepts them (:meth:`Classifier.add_background`).

Scoring follows the router: the prediction for a message is the top-ranked workflow if its
confidence reaches the threshold, else out of scope. The threshold is given (a number), the
classifier's own calibration (``"auto"``, as the hub's ``threshold = "auto"``), or tuned on
``val`` + ``oos_val`` (criterion ``accuracy``: the accuracy over all of them with
out-of-scope counted as one more class, the paper's method; or ``balanced``: in-scope
accuracy plus out-of-scope recall), then applied to ``test`` + ``oos_test``. Without
``oos_val`` the classifier's calibration is used; without any out-of-scope split only the
in-scope accuracy of the top-ranked workflow is reported.

:func:`sample` plays a flow author's situation on a big data set: a few examples per
intent (``shots``) and a random subset of the intents (``intents``), the other intents'
messages becoming out of scope.

Everything runs in the calling thread; nothing here is safe to share between threads. A
malformed data file raises :class:`BenchDataError` naming the split and the problem; an
option out of range raises :class:`BenchOptionError` (a subclass) saying which and why.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError

from commhub.core.classify import DEFAULT_THRESHOLD, Classifier, routing_threshold

if TYPE_CHECKING:  # numpy is imported where used: building the CLI parser stays fast
    import numpy as np

__all__ = [
    "BenchDataError",
    "BenchOptionError",
    "BenchReport",
    "Dataset",
    "evaluate",
    "format_report",
    "load_dataset",
    "parse_dataset",
    "parse_settings",
    "parse_threshold",
    "add_arguments",
    "run_cli",
    "sample",
    "tune_threshold",
]

Criterion = Literal["accuracy", "balanced"]
Threshold = float | Literal["auto"]
_SPLITS = ("train", "val", "test")
_OOS_SPLITS = ("oos_train", "oos_val", "oos_test")


class BenchDataError(ValueError):
    """The data file is not in CLINC150 format; the message says where and why."""


class BenchOptionError(BenchDataError):
    """A bench option is out of range or unknown; the one-line message says which and why.
    A subclass of :class:`BenchDataError`, so that callers report both alike."""


@dataclass(frozen=True)
class Dataset:
    """The splits of a CLINC-format data set, each a list of ``(text, intent)``."""

    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]
    oos_train: list[tuple[str, str]] = field(default_factory=list)
    oos_val: list[tuple[str, str]] = field(default_factory=list)
    oos_test: list[tuple[str, str]] = field(default_factory=list)

    @property
    def has_oos(self) -> bool:
        """True when the test split has out-of-scope messages (they are then scored)."""
        return bool(self.oos_test)

    def examples(self) -> dict[str, list[str]]:
        """``{intent: [text, ...]}`` from ``train``: what the hub's workflows would declare."""
        grouped: dict[str, list[str]] = {}
        for text, intent in self.train:
            grouped.setdefault(intent, []).append(text)
        return grouped


def sample(data: Dataset, shots: int | None = None, intents: int | None = None,
           seed: int = 0) -> Dataset:
    """``data`` as a flow author would have it: ``intents`` intents of ``train`` drawn at
    random (None: all), each with ``shots`` of its training messages drawn at random (None:
    all; an intent with fewer keeps all it has). The ``val`` and ``test`` messages of the
    intents left out move to ``oos_val`` and ``oos_test``: no workflow should take them.
    The same ``seed`` draws the same sample. Raises :class:`BenchOptionError` for
    ``shots`` below 1, ``intents`` outside 1 to the number of intents in ``train``, or
    intents drawn that have no test messages.
    """
    rng = random.Random(seed)
    grouped = data.examples()
    names = sorted(grouped)
    if intents is not None and not 1 <= intents <= len(names):
        raise BenchOptionError(
            f"--intents must be between 1 and {len(names)} (the intents in train), not {intents}")
    if shots is not None and shots < 1:
        raise BenchOptionError(f"--shots must be at least 1, not {shots}")
    kept = set(names if intents is None else rng.sample(names, intents))
    train: list[tuple[str, str]] = []
    for name in names:
        if name not in kept:
            continue
        texts = grouped[name]
        if shots is not None and shots < len(texts):
            texts = rng.sample(texts, shots)
        train.extend((text, name) for text in texts)
    test = [pair for pair in data.test if pair[1] in kept]
    if not test:
        raise BenchOptionError(f"--intents {intents} (seed {seed}): the intents drawn have no "
                               "test messages")
    return Dataset(
        train=train,
        val=[pair for pair in data.val if pair[1] in kept],
        test=test,
        oos_train=data.oos_train,
        oos_val=[*data.oos_val, *(pair for pair in data.val if pair[1] not in kept)],
        oos_test=[*data.oos_test, *(pair for pair in data.test if pair[1] not in kept)],
    )


def parse_threshold(text: str | float, what: str = "--threshold") -> Threshold:
    """``"auto"`` or a number in [0, 1], from a command-line value or a number; otherwise
    :class:`BenchOptionError` saying so."""
    if isinstance(text, str) and text.strip().casefold() == "auto":
        return "auto"
    return _unit_number(text, what, allow_auto=True)


def _unit_number(value: str | float, what: str, allow_auto: bool = False) -> float:
    expected = '"auto" or a number' if allow_auto else "a number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BenchOptionError(f"{what} must be {expected} in [0, 1], not {value!r}") from None
    if not 0.0 <= number <= 1.0:  # also False for NaN
        raise BenchOptionError(f"{what} must be {expected} in [0, 1], not {value!r}")
    return number


def parse_settings(
    model: type[BaseModel] | None, base: Mapping[str, Any], assignments: Sequence[str],
    what: str = "classifier",
) -> BaseModel | None:
    """Validate plugin settings: ``base`` (e.g. the config file's ``[plugins.NAME]``)
    overridden by ``key=value`` ``assignments`` (the value read as JSON when it is JSON,
    so ``false``, ``0.3`` and ``[1, 3]`` work, else as a string), checked by ``model``.
    Returns None when ``model`` is None and nothing is set. Raises
    :class:`BenchOptionError` in one line for an assignment without ``=``, settings for a
    plugin that takes none, or settings ``model`` refuses (unknown key, bad value)."""
    raw = dict(base)
    for assignment in assignments:
        key, equals, value = assignment.partition("=")
        if not equals or not key.strip():
            raise BenchOptionError(f"--set expects key=value, not {assignment!r}")
        try:
            raw[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            raw[key.strip()] = value
    if model is None:
        if raw:
            raise BenchOptionError(f"{what} takes no settings, but got {sorted(raw)}")
        return None
    try:
        return model(**raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors())
        raise BenchOptionError(f"{what} settings: {problems}") from None


def load_dataset(path: Path | str) -> Dataset:
    """Read and check a CLINC-format JSON file. Raises :class:`BenchDataError` or OSError."""
    try:
        raw = json.loads(Path(path).read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise BenchDataError(f"{path}: not JSON: {exc}") from None
    return parse_dataset(raw, str(path))


def parse_dataset(raw: Any, source: str = "data") -> Dataset:
    """Check the JSON value of a CLINC-format data set and build a :class:`Dataset`."""
    if not isinstance(raw, Mapping):
        raise BenchDataError(f"{source}: expected a JSON object with train, val and test")
    missing = [name for name in _SPLITS if name not in raw]
    if missing:
        raise BenchDataError(f"{source}: missing split(s): {', '.join(missing)}")
    splits = {name: _pairs(raw[name], source, name)
              for name in (*_SPLITS, *_OOS_SPLITS) if name in raw}
    if not splits["train"]:
        raise BenchDataError(f"{source}: split 'train' is empty")
    if not splits["test"]:
        raise BenchDataError(f"{source}: split 'test' is empty")
    return Dataset(**splits)


def _pairs(value: Any, source: str, split: str) -> list[tuple[str, str]]:
    if not isinstance(value, list):
        raise BenchDataError(f"{source}: split {split!r} is not a list")
    pairs = []
    for index, item in enumerate(value):
        if (not isinstance(item, list | tuple) or len(item) != 2
                or not all(isinstance(part, str) for part in item)):
            raise BenchDataError(
                f"{source}: {split}[{index}] is not a [text, intent] pair of strings")
        pairs.append((item[0], item[1]))
    return pairs


@dataclass
class BenchReport:
    """What one evaluation measured. Percentages are 0-100; None where not measured."""

    classifier: str
    model_id: str
    intents: int
    train_messages: int
    background_messages: int
    train_seconds: float
    in_scope_accuracy: float
    top1_accuracy: float = 0.0
    oos_recall: float | None = None
    oos_precision: float | None = None
    threshold: float | None = None
    criterion: str | None = None
    fallback_rate: float | None = None
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    latency_samples: int = 0
    batch_per_second: float = 0.0
    batch_messages: int = 0
    margin: float | None = None
    clarify_rate: float | None = None
    clarify_top2_accuracy: float | None = None


def tune_threshold(
    in_scope_correct: np.ndarray,
    in_scope_confidence: np.ndarray,
    oos_confidence: np.ndarray,
    criterion: Criterion = "accuracy",
) -> float:
    """The threshold that maximises ``criterion`` on validation data.

    ``in_scope_correct[i]`` tells whether in-scope message ``i`` ranked its intent first,
    with top confidence ``in_scope_confidence[i]``; ``oos_confidence`` are the top
    confidences of out-of-scope messages. Candidates are 0 and every observed confidence
    (a message is rejected when its confidence is below the threshold); ties go to the
    lowest threshold.
    """
    import numpy as np

    candidates = np.unique(np.concatenate([[0.0], in_scope_confidence, oos_confidence]))
    # For each candidate: correct in-scope messages kept, out-of-scope messages rejected.
    correct_sorted = np.sort(in_scope_confidence[in_scope_correct])
    kept = len(correct_sorted) - np.searchsorted(correct_sorted, candidates, side="left")
    rejected = np.searchsorted(np.sort(oos_confidence), candidates, side="left")
    if criterion == "accuracy":
        score = (kept + rejected) / (len(in_scope_confidence) + len(oos_confidence))
    else:
        score = kept / max(1, len(in_scope_confidence)) + rejected / max(1, len(oos_confidence))
    return float(candidates[int(np.argmax(score))])


def _top(classifier: Classifier, texts: Sequence[str], top: int) -> list[list[Any]]:
    return classifier.rank(list(texts), top) if texts else []


def _first(ranked: list[list[Any]]) -> tuple[list[str | None], np.ndarray]:
    import numpy as np

    names = [r[0].workflow if r else None for r in ranked]
    confidences = np.asarray([r[0].confidence if r else 0.0 for r in ranked], dtype=float)
    return names, confidences


def evaluate(
    data: Dataset,
    classifier: Classifier,
    *,
    criterion: Criterion = "accuracy",
    threshold: Threshold | None = None,
    margin: float | None = None,
    use_oos_train: bool = True,
    latency_samples: int = 1000,
) -> BenchReport:
    """Train ``classifier`` on ``data.train`` and score the test splits at a threshold:
    ``threshold`` if a number, the classifier's calibration if ``"auto"`` (as the hub's
    ``threshold = "auto"``: ``DEFAULT_THRESHOLD`` if it has none), else tuned on ``val`` +
    ``oos_val`` by ``criterion``, or the calibration when there is no ``oos_val``.
    ``margin`` also reports how often the top two candidates of a test message both reach
    the threshold and are closer than ``margin`` (the router would ask which one).

    The classifier must be new (not yet fitted); give it no ``cache_dir`` to time training.
    Raises :class:`BenchOptionError` for a threshold or margin outside [0, 1], before
    training; exceptions from the classifier propagate.
    """
    import numpy as np

    if threshold is not None:
        threshold = parse_threshold(threshold)
    if margin is not None:
        margin = _unit_number(margin, "--margin")

    examples = data.examples()
    background = [text for text, _ in data.oos_train] if use_oos_train else []
    used_background = bool(background) and classifier.add_background(background)
    started = time.perf_counter()
    classifier.fit(examples)
    train_seconds = time.perf_counter() - started

    test_texts = [text for text, _ in data.test]
    test_truth = [intent for _, intent in data.test]
    test_ranked = _top(classifier, test_texts, 2)
    test_names, test_conf = _first(test_ranked)
    test_correct = np.asarray([n == t for n, t in zip(test_names, test_truth, strict=True)])

    report = BenchReport(
        classifier=type(classifier).name,
        model_id=classifier.model_id,
        intents=len(examples),
        train_messages=len(data.train),
        background_messages=len(background) if used_background else 0,
        train_seconds=train_seconds,
        in_scope_accuracy=100.0 * float(test_correct.mean()),
        top1_accuracy=100.0 * float(test_correct.mean()),
    )
    cut = 0.0
    if data.has_oos or threshold is not None:
        if isinstance(threshold, float):
            cut, report.criterion = threshold, "fixed"
        elif threshold is None and data.oos_val and data.val:
            val_names, val_conf = _first(_top(classifier, [t for t, _ in data.val], 1))
            val_correct = np.asarray(
                [n == t for n, (_, t) in zip(val_names, data.val, strict=True)], dtype=bool)
            _, val_oos_conf = _first(_top(classifier, [t for t, _ in data.oos_val], 1))
            cut = tune_threshold(val_correct, val_conf, val_oos_conf, criterion)
            report.criterion = criterion
        else:  # "auto", or nothing to tune on: what the hub would use by default
            cut, report.criterion = routing_threshold(
                "auto", getattr(classifier, "threshold", None))
        accepted = test_conf >= cut
        report.threshold = cut
        report.in_scope_accuracy = 100.0 * float((test_correct & accepted).mean())
        report.fallback_rate = 100.0 * float((~accepted).mean())
        if data.has_oos:
            _, oos_conf = _first(_top(classifier, [t for t, _ in data.oos_test], 1))
            rejected_oos = int((oos_conf < cut).sum())
            rejected_in = int((~accepted).sum())
            report.oos_recall = 100.0 * rejected_oos / len(oos_conf)
            report.oos_precision = 100.0 * rejected_oos / max(1, rejected_oos + rejected_in)

    if margin is not None:
        report.margin = margin
        accepted_rows = [(r, t) for r, t in zip(test_ranked, test_truth, strict=True)
                         if r and r[0].confidence >= cut]
        # As the router: both candidates reach the threshold and are closer than the margin.
        close = [(r, t) for r, t in accepted_rows if len(r) > 1 and r[1].confidence >= cut
                 and r[0].confidence - r[1].confidence < margin]
        report.clarify_rate = 100.0 * len(close) / max(1, len(accepted_rows))
        hits = sum(1 for r, t in close if t in (r[0].workflow, r[1].workflow))
        report.clarify_top2_accuracy = 100.0 * hits / len(close) if close else None

    _measure_speed(classifier, [*test_texts, *(t for t, _ in data.oos_test)], report,
                   latency_samples)
    return report


def _measure_speed(
    classifier: Classifier, texts: list[str], report: BenchReport, samples: int
) -> None:
    """Single-message ``rank`` latency over the first ``samples`` texts, then one batch."""
    import numpy as np

    if not texts:
        return
    classifier.rank(texts[:1], 3)  # warm up lazily built state
    timings = []
    for text in texts[: max(1, samples)]:
        started = time.perf_counter()
        classifier.rank([text], 3)
        timings.append(time.perf_counter() - started)
    report.latency_p50_ms = 1000.0 * float(np.percentile(timings, 50))
    report.latency_p99_ms = 1000.0 * float(np.percentile(timings, 99))
    report.latency_samples = len(timings)
    started = time.perf_counter()
    classifier.rank(texts, 3)
    elapsed = time.perf_counter() - started
    report.batch_messages = len(texts)
    report.batch_per_second = len(texts) / elapsed if elapsed > 0 else float("inf")


_THRESHOLD_SOURCES = {
    "fixed": "given",
    "calibrated": "calibrated by the classifier",
    "default": f"the hub's default {DEFAULT_THRESHOLD}: the classifier has no calibration",
}


def format_report(report: BenchReport) -> list[str]:
    """The report as ``label: value`` lines, the labels fixed for scripts to read."""

    def line(label: str, value: str) -> str:
        return f"{label + ':':<26}{value}"

    lines = [
        line("classifier", f"{report.classifier} ({report.model_id})"),
        line("training data", f"{report.train_messages} messages, {report.intents} intents, "
                              f"{report.background_messages} background"),
        line("in-scope accuracy", f"{report.in_scope_accuracy:.2f}%"),
    ]
    if report.threshold is not None:
        lines.append(line("top-1 accuracy", f"{report.top1_accuracy:.2f}% (no threshold)"))
    if report.fallback_rate is not None:
        lines.append(line("fallback rate", f"{report.fallback_rate:.2f}% "
                                           "(in-scope messages under the threshold)"))
    if report.oos_recall is not None and report.oos_precision is not None:
        lines += [
            line("out-of-scope recall", f"{report.oos_recall:.2f}%"),
            line("out-of-scope precision", f"{report.oos_precision:.2f}%"),
        ]
    if report.threshold is not None:
        how = _THRESHOLD_SOURCES.get(report.criterion or "", f"tuned on val, {report.criterion}")
        lines.append(line("threshold", f"{report.threshold:.4f} ({how})"))
    if report.margin is not None:
        lines.append(line("clarify margin", f"{report.margin:.4f}"))
        lines.append(line("clarification rate", f"{report.clarify_rate or 0.0:.2f}%"))
        top2 = report.clarify_top2_accuracy
        lines.append(line("clarification top-2", "n/a" if top2 is None else f"{top2:.2f}%"))
    lines += [
        line("training time", f"{report.train_seconds:.2f} s"),
        line("latency p50", f"{report.latency_p50_ms:.3f} ms "
                            f"(single-message rank, {report.latency_samples} messages)"),
        line("latency p99", f"{report.latency_p99_ms:.3f} ms"),
        line("batch throughput", f"{report.batch_per_second:,.0f} messages/s "
                                 f"(one rank call of {report.batch_messages})"),
    ]
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``commhub bench classifier``."""
    parser.add_argument("--data", type=Path, required=True,
                        help="JSON with train, val, test (optional oos_*) [text, intent] lists")
    parser.add_argument("--classifier", default=None,
                        help="classifier plugin name (default: the classifier setting)")
    parser.add_argument("--criterion", choices=["accuracy", "balanced"], default="accuracy",
                        help="threshold tuning on val: accuracy with out-of-scope as one more "
                             "class (default), or in-scope accuracy + out-of-scope recall")
    parser.add_argument("--threshold", default=None,
                        help="score at this threshold (0 to 1) instead of tuning one on val; "
                             "auto: the classifier's calibration, as the hub's default")
    parser.add_argument("--margin", default=None,
                        help="also report how often the top two (0 to 1) are closer than this")
    parser.add_argument("--shots", type=int, default=None,
                        help="train on N random examples per intent (default: all)")
    parser.add_argument("--intents", type=int, default=None,
                        help="keep K random intents; the others' val and test messages "
                             "count as out of scope")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of --shots and --intents (default 0)")
    parser.add_argument("--set", action="append", default=[], dest="plugin_set",
                        metavar="KEY=VALUE",
                        help="a classifier setting over [plugins.NAME] (repeatable; JSON "
                             "values: --set embeddings=false)")
    parser.add_argument("--no-oos-train", action="store_true",
                        help="do not offer oos_train to the classifier as background")
    parser.add_argument("--latency-samples", type=int, default=1000,
                        help="single-message rank calls timed (default 1000)")


def run_cli(args: argparse.Namespace, settings: Any) -> int:
    """Run ``commhub bench classifier`` with parsed ``args`` and the hub ``settings`` (the
    ``classifier`` setting, ``[plugins.NAME]`` settings, disabled plugins); print the report.
    Raises BenchOptionError for bad options or plugin settings (before reading the data),
    BenchDataError, OSError, or HubError for a classifier that is not installed."""
    from commhub.core.hub import HubError
    from commhub.core.plugins import Plugins

    threshold = None if args.threshold is None else parse_threshold(args.threshold)
    margin = None if args.margin is None else _unit_number(args.margin, "--margin")
    name = args.classifier or settings.classifier
    classes = Plugins.load(settings.disable_plugins).classifiers()
    if name not in classes:
        raise HubError(f"classifier {name!r} is not installed; available: {sorted(classes)}")
    cls = classes[name]
    options = parse_settings(getattr(cls, "Settings", None), settings.plugin_settings(name),
                             args.plugin_set, f"classifier {name}")
    data = load_dataset(args.data)
    print(f"{'data:':<26}{args.data.name}: {len(data.train)} train, {len(data.val)} val, "
          f"{len(data.test)} test; out of scope {len(data.oos_train)} train, "
          f"{len(data.oos_val)} val, {len(data.oos_test)} test", flush=True)
    if args.shots is not None or args.intents is not None:
        data = sample(data, args.shots, args.intents, args.seed)
        print(f"{'sample:':<26}{args.shots or 'all'} per intent, "
              f"{len(data.examples())} intents (seed {args.seed}); "
              f"{len(data.test)} test in scope, {len(data.oos_test)} out of scope", flush=True)
    report = evaluate(data, cls(options), criterion=args.criterion, threshold=threshold,
                      margin=margin, use_oos_train=not args.no_oos_train,
                      latency_samples=args.latency_samples)
    print("\n".join(format_report(report)), flush=True)
    return 0
