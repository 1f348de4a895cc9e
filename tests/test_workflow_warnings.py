"""`commhub workflows check` warnings: workflows that load but will classify badly.

Too few examples, examples shorter than two words, and examples of two workflows that
overlap (the classifier, trained on all of them, scores an example of one high for the
other). Warnings name FILE:LINE and never fail the check.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from commhub.core.cli import main
from commhub.core.engine.check import example_warnings, overlap_warnings
from commhub.core.envelope import Alternative
from commhub.core.workflow import load_workflow_file

STATES = """initial: ask
states:
  ask:
    say: Hello.
    on:
      - message: any
        to: done
  done:
    final: true
"""


def workflow(tmp_path: Path, name: str, examples: list[str]) -> Path:
    path = tmp_path / f"{name}.yaml"
    lines = "".join(f"  - {example}\n" for example in examples)
    path.write_text(f"name: {name}\nexamples:\n{lines}{STATES}" if examples
                    else f"name: {name}\n{STATES}")
    return path


PIZZA = ["I want to order a pizza", "pizza delivery please", "can I get a large pizza",
         "order a pizza for dinner", "I'd like a pizza with olives", "bring me a pizza"]
SALAD = ["I want to order a salad", "a green salad please", "can I get a caesar salad",
         "order a salad for lunch", "I'd like a salad without onions", "bring me a salad"]


def test_a_workflow_with_fewer_than_five_examples_is_warned_about(tmp_path: Path) -> None:
    """Three examples: a warning on the `examples:` line."""
    defn = load_workflow_file(workflow(tmp_path, "few", ["order a pizza", "pizza please",
                                                         "a pizza for two"]))
    assert example_warnings(defn) == [
        f"{tmp_path / 'few.yaml'}:2: workflow 'few' has 3 examples; give it at least 5 "
        "(a dozen varied ones is better)"]


def test_an_example_shorter_than_two_words_is_warned_about(tmp_path: Path) -> None:
    """A one-word example: a warning on its own line; enough examples otherwise."""
    defn = load_workflow_file(workflow(tmp_path, "short", [*PIZZA[:5], "pizza"]))
    assert example_warnings(defn) == [
        f"{tmp_path / 'short.yaml'}:8: workflow 'short': example 'pizza' is shorter than 2 "
        "words; write it as a user would ask"]


def test_a_workflow_without_examples_is_warned_about_but_not_the_fallback(
    tmp_path: Path
) -> None:
    """No examples: only a button can start it (said on the name's line); the fallback
    has none on purpose."""
    defn = load_workflow_file(workflow(tmp_path, "quiet", []))
    assert example_warnings(defn) == [
        f"{tmp_path / 'quiet.yaml'}:1: workflow 'quiet' has no examples: the classifier "
        "never picks it (only a start button can start it)"]
    assert example_warnings(load_workflow_file(workflow(tmp_path, "fallback", []))) == []


def test_an_example_another_workflow_scores_high_for_overlaps(tmp_path: Path) -> None:
    """With a ranking that gives salad 0.6 for a pizza example (and pizza only 0.4), that
    example is reported on its line; examples ranked for their own workflow are not."""
    pizza = load_workflow_file(workflow(tmp_path, "pizza", PIZZA))
    salad = load_workflow_file(workflow(tmp_path, "salad", SALAD))

    def rank(texts: list[str]) -> list[list[Alternative]]:
        out = []
        for text in texts:
            own = "pizza" if "pizza" in text else "salad"
            other = "salad" if own == "pizza" else "pizza"
            if text == "bring me a pizza":
                out.append([Alternative(other, 0.6), Alternative(own, 0.4)])
            else:
                out.append([Alternative(own, 0.9), Alternative(other, 0.05)])
        return out

    warnings = overlap_warnings({"pizza": pizza, "salad": salad}, rank, 0.35)
    assert warnings == [
        f"{tmp_path / 'pizza.yaml'}:8: workflow 'pizza': example 'bring me a pizza' scores "
        "0.60 for 'salad' (0.40 for its own workflow; threshold 0.35): the two workflows' "
        "examples overlap"]


def test_workflows_check_trains_the_classifier_and_warns_about_shared_examples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two workflows that share an example: the trained classifier cannot keep it
    apart, so both copies are reported; the check still passes (exit 0) and prints its
    ok lines. --no-overlap skips the training and that warning."""
    folder = tmp_path / "wf"
    folder.mkdir()
    workflow(folder, "pizza", PIZZA)
    workflow(folder, "salad", [*SALAD, "I want to order a pizza"])
    assert main(["workflows", "check", str(folder)]) == 0
    out, err = capsys.readouterr()
    assert "ok  pizza" in out and "ok  salad" in out
    warnings = err.splitlines()
    assert len(warnings) == 2, err
    assert warnings[0].startswith(f"commhub: warning: {folder / 'pizza.yaml'}:3: workflow "
                                  "'pizza': example 'I want to order a pizza' scores 0.")
    assert warnings[1].startswith(f"commhub: warning: {folder / 'salad.yaml'}:9: workflow "
                                  "'salad': example 'I want to order a pizza' scores 0.")
    assert all(w.endswith("the two workflows' examples overlap") for w in warnings)

    assert main(["workflows", "check", "--no-overlap", str(folder)]) == 0
    assert capsys.readouterr().err == ""
