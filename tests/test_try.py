"""`commhub try`: the classifier's ranking and the routing rule that applies, in
process (trained like `commhub up`, cached in the data directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from commhub.core.cli import main


def test_try_ranks_each_text_and_says_what_the_router_would_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A clear request starts its workflow, nonsense falls back, a text two workflows
    share gets "Did you mean A or B?", each with the numbers that decided it."""
    status = main(["try", "I'd like to book a table", "blorp", "help with my order",
                   "--data-dir", str(tmp_path / "data")])
    out = capsys.readouterr().out
    assert status == 0
    booking, nonsense, shared = out.strip().split("\n\n")

    lines = booking.splitlines()
    assert lines[0] == "\"I'd like to book a table\""
    assert len(lines) == 5  # the text, three ranked workflows, the decision
    confidence = re.fullmatch(r"  book_table +(0\.9\d\d|1\.000)", lines[1])
    assert confidence is not None
    assert lines[-1] == (f"  -> start book_table ({confidence[1]} reaches the threshold "
                         "0.35)")

    assert re.fullmatch(
        r"  -> fallback: no workflow reaches the threshold 0\.35 \(best: \w+ 0\.0\d\d\); "
        r"the fallback workflow 'fallback' starts", nonsense.splitlines()[-1])

    assert shared.splitlines()[-1].startswith(
        '  -> clarify: Did you mean "Report a problem to customer support" or "Check the '
        'status of an order"? (both reach the threshold 0.35 and are 0.00')
    assert (tmp_path / "data" / "models").is_dir()  # trained once, cached like the hub's
