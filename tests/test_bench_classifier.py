"""``commhub bench classifier``: CLINC-format loading, threshold tuning and the report."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from commhub.core.classify import DEFAULT_THRESHOLD
from commhub.core.cli import main
from commhub.plugins.evaluate import (
    BenchDataError,
    BenchOptionError,
    Dataset,
    evaluate,
    format_report,
    load_dataset,
    parse_settings,
    sample,
    tune_threshold,
)
from commhub.plugins.tfidf import TfidfClassifier, TfidfSettings

# Three intents, each with its own words: a perfectly separable data set.
TOPICS = {
    "weather": ("rain", "forecast", "sunny", "temperature", "umbrella"),
    "music": ("song", "playlist", "album", "guitar", "concert"),
    "banking": ("account", "balance", "transfer", "deposit", "loan"),
}
FRAMES = ("tell me about the {}", "what is my {}", "show the {} please", "I need {} now",
          "any news on {}", "{} today", "can you check {}", "{} question")
UNRELATED = ("volcano", "penguin", "origami", "glacier", "saxophone quartet in orbit",
             "knitting", "pyramid", "telescope", "marathon", "chess opening")


def clinc(with_oos: bool) -> dict[str, list[list[str]]]:
    rng = random.Random(7)
    rows = [[frame.format(word), intent]
            for intent, words in TOPICS.items() for word in words for frame in FRAMES]
    rng.shuffle(rows)
    third = len(rows) // 3
    data = {"train": rows[third:], "val": rows[: third // 2], "test": rows[third // 2: third]}
    if with_oos:
        oos = [[frame.format(word), "oos"] for word in UNRELATED for frame in FRAMES]
        rng.shuffle(oos)
        data |= {"oos_train": oos[:20], "oos_val": oos[20:40], "oos_test": oos[40:]}
    return data


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    return path


def lines_by_label(output: str) -> dict[str, str]:
    return {label.strip(): value.strip()
            for label, _, value in (line.partition(":") for line in output.splitlines())}


def percent(value: str) -> float:
    return float(value.removesuffix("%"))


def test_bench_with_oos_scores_a_separable_set_perfectly(tmp_path: Path) -> None:
    """Separable intents and unrelated out-of-scope text: full accuracy, recall and precision."""
    data = load_dataset(write(tmp_path, clinc(with_oos=True)))
    report = evaluate(data, TfidfClassifier(), margin=0.05, latency_samples=20)
    assert report.in_scope_accuracy == 100.0
    assert report.oos_recall == 100.0 and report.oos_precision == 100.0
    assert report.threshold is not None and 0.0 < report.threshold < 1.0
    assert report.background_messages == 20 and report.intents == 3
    assert report.latency_samples == 20 and report.latency_p99_ms >= report.latency_p50_ms > 0
    assert report.batch_messages == len(data.test) + len(data.oos_test)
    assert report.batch_per_second > 0 and report.train_seconds > 0
    assert report.clarify_rate is not None
    labels = lines_by_label("\n".join(format_report(report)))
    for label in ("in-scope accuracy", "out-of-scope recall", "out-of-scope precision",
                  "threshold", "training time", "latency p50", "latency p99",
                  "batch throughput", "clarification rate"):
        assert label in labels, label


def test_cli_without_oos_reports_in_scope_accuracy_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without oos_* splits the command prints in-scope accuracy and speed, no oos lines."""
    path = write(tmp_path, clinc(with_oos=False))
    assert main(["bench", "classifier", "--data", str(path), "--latency-samples", "10"]) == 0
    labels = lines_by_label(capsys.readouterr().out)
    assert percent(labels["in-scope accuracy"]) == 100.0
    assert "out-of-scope recall" not in labels and "threshold" not in labels
    assert labels["latency p99"].endswith("ms") and "messages/s" in labels["batch throughput"]


def test_cli_with_oos_prints_every_labelled_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`commhub bench classifier` prints the labelled quality, threshold and speed lines."""
    path = write(tmp_path, clinc(with_oos=True))
    assert main(["bench", "classifier", "--data", str(path), "--classifier", "tfidf",
                 "--latency-samples", "10", "--criterion", "balanced"]) == 0
    labels = lines_by_label(capsys.readouterr().out)
    assert percent(labels["in-scope accuracy"]) == 100.0
    assert percent(labels["out-of-scope recall"]) == 100.0
    assert percent(labels["out-of-scope precision"]) == 100.0
    assert "balanced" in labels["threshold"]
    assert labels["training time"].endswith(" s")


def test_fixed_threshold_of_one_rejects_everything(tmp_path: Path) -> None:
    """--threshold is used as given: at 1.0 nothing is accepted, all oos is rejected."""
    data = load_dataset(write(tmp_path, clinc(with_oos=True)))
    report = evaluate(data, TfidfClassifier(), threshold=1.0, latency_samples=1)
    assert report.threshold == 1.0 and report.criterion == "fixed"
    assert report.in_scope_accuracy == 0.0 and report.oos_recall == 100.0
    assert report.oos_precision == pytest.approx(
        100.0 * len(data.oos_test) / (len(data.oos_test) + len(data.test)))


def test_tune_threshold_criteria() -> None:
    """accuracy counts messages; balanced weighs in-scope accuracy and oos recall equally."""
    correct = np.array([True] * 8 + [False] * 2)
    confidence = np.array([0.9] * 6 + [0.34, 0.34] + [0.3, 0.3])
    oos = np.array([0.35, 0.2])
    # accuracy: 0.3 keeps 8 correct and rejects 1 oos (9 of 12), as does 0.34 (the lowest
    # wins a tie); 0.9 keeps 6 and rejects 2 (8 of 12).
    assert tune_threshold(correct, confidence, oos, "accuracy") == pytest.approx(0.3)
    # balanced: 0.9 gives 0.6 + 1.0, better than 0.3's 0.8 + 0.5.
    assert tune_threshold(correct, confidence, oos, "balanced") == pytest.approx(0.9)


@pytest.mark.parametrize("data, problem", [
    ([], "JSON object"),
    ({"train": [], "val": []}, "missing split(s): test"),
    ({"train": [["a", "b"]], "val": [], "test": [["a"]]}, "test[0] is not a [text, intent]"),
    ({"train": [], "val": [], "test": [["a", "b"]]}, "'train' is empty"),
])
def test_bad_data_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: object, problem: str
) -> None:
    """A malformed file fails with `commhub: error:` naming the problem, exit status 1."""
    path = write(tmp_path, data)
    with pytest.raises(BenchDataError, match=re.escape(problem)):
        load_dataset(path)
    assert main(["bench", "classifier", "--data", str(path)]) == 1
    assert problem in capsys.readouterr().err


def test_sample_draws_shots_per_intent_and_moves_other_intents_out_of_scope(
    tmp_path: Path,
) -> None:
    """--shots keeps N training messages per intent; --intents keeps K intents, and the
    others' val and test messages become out of scope; one seed, one sample."""
    data = load_dataset(write(tmp_path, clinc(with_oos=True)))
    few = sample(data, shots=3, seed=1)
    assert {intent: len(texts) for intent, texts in few.examples().items()} == {
        intent: 3 for intent in TOPICS}
    assert set(few.train) <= set(data.train)
    assert few.test == data.test and few.oos_test == data.oos_test
    assert sample(data, shots=3, seed=1) == few
    assert sample(data, shots=3, seed=2) != few

    one = sample(data, shots=2, intents=1, seed=0)
    [kept] = one.examples()
    assert len(one.examples()[kept]) == 2
    assert all(intent == kept for _, intent in [*one.val, *one.test])
    moved = [pair for pair in data.test if pair[1] != kept]
    assert one.oos_test == [*data.oos_test, *moved]
    assert len(one.oos_val) == len(data.oos_val) + sum(1 for _, i in data.val if i != kept)
    assert one.oos_train == data.oos_train


@pytest.mark.parametrize("shots, intents, problem", [
    (0, None, "--shots must be at least 1, not 0"),
    (None, 0, "--intents must be between 1 and 3"),
    (None, 4, "--intents must be between 1 and 3 (the intents in train), not 4"),
])
def test_sample_refuses_impossible_sizes(
    tmp_path: Path, shots: int | None, intents: int | None, problem: str
) -> None:
    data = load_dataset(write(tmp_path, clinc(with_oos=False)))
    with pytest.raises(BenchOptionError, match=re.escape(problem)):
        sample(data, shots=shots, intents=intents)


def test_sample_refuses_intents_without_test_messages() -> None:
    """Intents drawn with nothing to test on stop the bench instead of scoring nothing."""
    data = Dataset(train=[("book a table", "book")], val=[], test=[("hi", "other")])
    with pytest.raises(BenchOptionError, match="the intents drawn have no test messages"):
        sample(data, intents=1)


def test_cli_shots_and_intents_print_the_sample_and_score_the_rest_as_oos(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two of three intents with two shots each: the third intent's test messages are
    scored as out of scope, with a fallback rate and the calibrated threshold."""
    path = write(tmp_path, clinc(with_oos=False))
    assert main(["bench", "classifier", "--data", str(path), "--shots", "2", "--intents", "2",
                 "--seed", "3", "--threshold", "auto", "--latency-samples", "5"]) == 0
    labels = lines_by_label(capsys.readouterr().out)
    assert labels["sample"].startswith("2 per intent, 2 intents (seed 3)")
    assert labels["training data"].startswith("4 messages, 2 intents")
    assert "out-of-scope recall" in labels and "fallback rate" in labels
    assert "calibrated by the classifier" in labels["threshold"]


def test_oos_test_is_scored_without_oos_val(tmp_path: Path) -> None:
    """Without oos_val there is nothing to tune on: oos_test is still scored, at the
    classifier's calibrated threshold."""
    raw = clinc(with_oos=True)
    del raw["oos_val"]
    data = load_dataset(write(tmp_path, raw))
    classifier = TfidfClassifier()
    report = evaluate(data, classifier, latency_samples=1)
    assert report.criterion == "calibrated" and report.threshold == classifier.threshold
    assert report.oos_recall == 100.0 and report.in_scope_accuracy == 100.0
    assert report.fallback_rate == 0.0
    labels = lines_by_label("\n".join(format_report(report)))
    assert "out-of-scope recall" in labels and "fallback rate" in labels


def test_threshold_auto_uses_the_calibration_or_the_hub_default(tmp_path: Path) -> None:
    """--threshold auto scores at the classifier's calibrated threshold; a classifier
    without calibration (here a fixed temperature) gets the hub's default, as the hub."""
    data = load_dataset(write(tmp_path, clinc(with_oos=True)))
    calibrated = TfidfClassifier()
    report = evaluate(data, calibrated, threshold="auto", latency_samples=1)
    assert calibrated.threshold is not None
    assert report.threshold == calibrated.threshold and report.criterion == "calibrated"
    uncalibrated = TfidfClassifier(TfidfSettings(calibrate=False))
    report = evaluate(data, uncalibrated, threshold="auto", latency_samples=1)
    assert uncalibrated.threshold is None
    assert report.threshold == DEFAULT_THRESHOLD and report.criterion == "default"
    assert "default" in lines_by_label("\n".join(format_report(report)))["threshold"]


def test_fallback_rate_counts_in_scope_messages_under_the_threshold(tmp_path: Path) -> None:
    """At threshold 0 nothing falls back; at 1 every in-scope message does."""
    data = load_dataset(write(tmp_path, clinc(with_oos=True)))
    assert evaluate(data, TfidfClassifier(), threshold=0.0,
                    latency_samples=1).fallback_rate == 0.0
    assert evaluate(data, TfidfClassifier(), threshold=1.0,
                    latency_samples=1).fallback_rate == 100.0


@pytest.mark.parametrize("option, value, problem", [
    ("--threshold", "1.5", "--threshold must be \"auto\" or a number in [0, 1], not '1.5'"),
    ("--threshold", "-0.1", "--threshold must be \"auto\" or a number in [0, 1]"),
    ("--threshold", "nan", "--threshold must be \"auto\" or a number in [0, 1]"),
    ("--threshold", "high", "--threshold must be \"auto\" or a number in [0, 1], not 'high'"),
    ("--margin", "2", "--margin must be a number in [0, 1], not '2'"),
    ("--margin", "auto", "--margin must be a number in [0, 1], not 'auto'"),
    ("--shots", "0", "--shots must be at least 1, not 0"),
    ("--intents", "9", "--intents must be between 1 and 3"),
    ("--set", "embeddings", "--set expects key=value, not 'embeddings'"),
    ("--set", "colour=blue", "classifier tfidf settings: colour: Extra inputs are not permitted"),
    ("--set", "C=-1", "classifier tfidf settings: C: Input should be greater than 0"),
])
def test_bad_options_are_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, problem: str
) -> None:
    """Out-of-range thresholds, margins and sample sizes and bad plugin settings stop the
    bench before training with one `commhub: error:` line, exit status 1."""
    path = write(tmp_path, clinc(with_oos=True))
    assert main(["bench", "classifier", "--data", str(path), option, value]) == 1
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert line.startswith(f"commhub: error: {problem}"), line
    assert "training time" not in captured.out


def test_evaluate_refuses_an_out_of_range_threshold_or_margin(tmp_path: Path) -> None:
    data = load_dataset(write(tmp_path, clinc(with_oos=True)))
    with pytest.raises(BenchOptionError, match="--threshold"):
        evaluate(data, TfidfClassifier(), threshold=1.01)
    with pytest.raises(BenchOptionError, match="--margin"):
        evaluate(data, TfidfClassifier(), margin=-0.5)


def test_set_overrides_config_settings_and_is_validated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--set values are JSON when they parse (false, numbers, lists), strings otherwise,
    and beat the config file's [plugins.NAME]; the result is the plugin's Settings."""
    options = parse_settings(TfidfSettings, {"C": 2.0, "min_df": 2},
                             ["embeddings=false", "C=0.5", "char_ngrams=[2, 3]"])
    assert options == TfidfSettings(C=0.5, min_df=2, embeddings=False, char_ngrams=(2, 3))
    with pytest.raises(BenchOptionError, match="takes no settings"):
        parse_settings(None, {}, ["x=1"])
    assert parse_settings(None, {}, []) is None

    config = tmp_path / "commhub.toml"
    config.write_text("[plugins.tfidf]\nembeddings = true\n")
    path = write(tmp_path, clinc(with_oos=False))
    assert main(["bench", "classifier", "--data", str(path), "--config", str(config),
                 "--set", "embeddings=false", "--latency-samples", "2"]) == 0
    assert percent(lines_by_label(capsys.readouterr().out)["in-scope accuracy"]) == 100.0


def test_set_reaches_the_classifier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The classifier the bench builds gets the --set value."""
    seen: list[TfidfSettings] = []
    original = TfidfClassifier.__init__

    def spy(self: TfidfClassifier, settings: object = None, cache_dir: object = None) -> None:
        original(self, settings, None)  # type: ignore[arg-type]
        seen.append(self.options)

    monkeypatch.setattr(TfidfClassifier, "__init__", spy)
    path = write(tmp_path, clinc(with_oos=False))
    assert main(["bench", "classifier", "--data", str(path), "--set", "embeddings=false",
                 "--set", "C=0.25", "--latency-samples", "2"]) == 0
    assert [(o.embeddings, o.C) for o in seen] == [(False, 0.25)]

