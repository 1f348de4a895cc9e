"""``commhub bench classifier``: CLINC-format loading, threshold tuning and the report."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from commhub.core.cli import main
from commhub.plugins.evaluate import (
    BenchDataError,
    evaluate,
    format_report,
    load_dataset,
    tune_threshold,
)
from commhub.plugins.tfidf import TfidfClassifier

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
