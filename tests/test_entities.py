"""Entities in a message: numbers in words and digits, dates, times, emails and choice
values, with their spans. Pure: a fixed reference time, no nats-server."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from commhub.core.engine.entities import Entity, extract, first

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from compare_entities import DATA, Setting, commhub, score  # noqa: E402

TZ = "Europe/Paris"
# Wednesday 11 June 2025, 10:00 in Paris: the labelled set's reference time.
NOW = dt.datetime(2025, 6, 11, 10, 0, tzinfo=ZoneInfo(TZ)).timestamp()


def found(text: str, **kw: Any) -> list[tuple[str, Any]]:
    return [(e.kind, e.value) for e in extract(text, NOW, TZ, **kw)]


@pytest.mark.parametrize(("text", "expected"), [
    ("Can I reserve a table for four?", [("number", 4)]),
    ("a party of 4", [("number", 4)]),
    ("twenty one people", [("number", 21)]),
    ("next friday", [("date", "2025-06-20")]),
    ("the 14th", [("date", "2025-06-14")]),
    ("no, the 15th", [("date", "2025-06-15")]),
    ("tomorrow evening", [("date", "2025-06-12")]),
    ("14/06/2025", [("date", "2025-06-14")]),
    ("8pm", [("time", "20:00")]),
    ("half past seven", [("time", "19:30")]),
    ("Table for four tomorrow at 8pm",
     [("number", 4), ("date", "2025-06-12"), ("time", "20:00")]),
    ("my email is ann@example.com", [("email", "ann@example.com")]),
    ("may I book a table", []),
    ("hello", []),
    ("I'd like the one by the window", []),
])
def test_a_person_s_phrases_give_these_entities(text: str, expected: list[Any]) -> None:
    """What a person types to a booking bot, and what the extractor reads in it."""
    assert sorted(found(text), key=str) == sorted(expected, key=str)


def test_entities_carry_their_spans_in_text_order() -> None:
    """Each entity's text is the slice of the message at its start and end."""
    text = "Table for four tomorrow at 8pm"
    entities = extract(text, NOW, TZ)
    assert [e.kind for e in entities] == ["number", "date", "time"]
    for entity in entities:
        assert text[entity.start:entity.end] == entity.text
    assert first(entities, "number") == Entity(kind="number", value=4, text="four",
                                               start=10, end=14)


def test_an_hour_without_am_or_pm_offers_the_other_reading() -> None:
    """"around 8" is 20:00 said in the morning, with 08:00 as the other reading, so a
    time slot can pick the one within its hours."""
    [time] = extract("around 8", NOW, TZ)
    assert (time.kind, time.value, time.alternative) == ("time", "20:00", "08:00")


def test_a_choice_lexicon_finds_values_and_synonyms_as_whole_words() -> None:
    """A choice slot's values and synonyms are found as whole words, case ignored."""
    lexicon = {"size": {"small": "small", "medium": "medium", "regular": "medium",
                        "large": "large"}}
    assert found("I want a Medium pizza", lexicon=lexicon) == [("size", "medium")]
    assert found("a regular one please", lexicon=lexicon) == [("size", "medium")]
    assert found("mediumish, smallest", lexicon=lexicon) == []


def test_relative_dates_follow_the_time_zone() -> None:
    """"tomorrow" is the day after the local day: 23:30 UTC is already the next day in
    Paris."""
    late = dt.datetime(2025, 6, 11, 23, 30, tzinfo=dt.UTC).timestamp()
    assert found_at("tomorrow", late, "UTC") == [("date", "2025-06-12")]
    assert found_at("tomorrow", late, TZ) == [("date", "2025-06-13")]


def found_at(text: str, now: float, tz: str) -> list[tuple[str, Any]]:
    return [(e.kind, e.value) for e in extract(text, now, tz)]


def test_empty_and_odd_text_gives_nothing_and_never_raises() -> None:
    for text in ("", "   ", "{}", "/inform{\"x\": 1}", "\x00\u202e", "9" * 400):
        extract(text, NOW, TZ)
    assert extract("", NOW, TZ) == []


def test_the_labelled_set_is_read_almost_entirely_right() -> None:
    """The set that chose the libraries (docs/workflows.md, Entities): at most one
    phrase of it wrong ("in 3 days" also yields a time), recall 1.0."""
    data = yaml.safe_load(DATA.read_text())
    result = score(data["rows"], commhub(Setting(data)))
    assert result["right"] >= len(data["rows"]) - 1, result["wrong"]
    assert result["recall"] == 1.0
