"""Entities in a user's message: numbers, dates, times, emails and choice values.

:func:`extract` is a pure function of the text, the time it was said and a time zone
(plus, optionally, the choice slots' lexicon): the same arguments give the same
entities, with their spans. Workflows use them to fill slots from any message
("Table for four tomorrow at 8pm" fills size, day and time at once), and the router
records them on the message's Classification.

Who does what (the comparison behind the choice is in ``docs/workflows.md``, measured
with ``bench/compare_entities.py`` on ``bench/data/entities_en.yaml``):

* **dates, times, emails:** Duckling (Facebook's rule-based parser, in Haskell), through
  the ``pyduckling-native-phihos`` binding, which ships the compiled parser in its wheel
  and needs nothing at run time but a time zone database (the system's, or the
  ``tzdata`` package's). It reads "next friday", "the 14th", "tomorrow evening", "around
  8", "half past seven", "7.15pm". Latent readings (a bare "8" as a time) are not asked
  for: a bare number is a number here, and a time slot accepts it as a whole answer.
* **numbers:** ``text2num`` (the ``text_to_num`` module) for numbers in words ("four",
  "twenty one", "one hundred and five"); digits are read as they are. Isolated "zero"
  and "one" are not numbers (``the one by the window``); "a table for 1" is.
* **choices:** a choice slot's values and synonyms, found as whole words, case and
  punctuation ignored (a lookup table, as Rasa's ``lookup_tables``).

Duckling reads "for four tomorrow" as 04:00 tomorrow; when a time begins with a number
and the rest of it is a day, the number stays a number and the rest is the date.
Numbers inside a date, time or email ("14/06/2025", "8pm") are not numbers of their own.

The Duckling runtime and its time zone table (about a second to load) are started once
per process, on first use (or :func:`warm_up`), under a lock; parsing is then safe from
any thread.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import logging
import re
import threading
import zoneinfo
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from commhub.core.envelope import Entity

__all__ = [
    "BUILTIN_KINDS",
    "Entity",
    "extract",
    "first",
    "normalize",
    "valid_timezone",
    "warm_up",
]

log = logging.getLogger(__name__)

#: The entity kinds :func:`extract` finds in any text; choice lexicons add their own.
BUILTIN_KINDS = ("number", "date", "time", "email")

_DIGITS_RE = re.compile(r"(?<![\w.,:/-])\d+(?:[.,]\d+)?(?![\w:/])")
_WORD_RE = re.compile(r"[^\W_]+|[^\w\s]")
# text2num leaves isolated numbers below this alone ("one" is a pronoun as often as not).
_WORD_NUMBER_THRESHOLD = 2
_TIME_GRAINS = ("hour", "minute", "second")
_DATE_GRAINS = ("day", "week")


def normalize(text: str) -> str:
    """Text as choice phrases are compared: case-folded, punctuation as spaces."""
    return " ".join(re.sub(r"[^\w\s@.+-]|(?<!\w)[.+-]|[.+-](?!\w)", " ", text.casefold()).split())


def valid_timezone(name: str) -> str:
    """``name`` when it is an IANA time zone name this machine knows; ValueError if not."""
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc
    return name


def extract(
    text: str,
    now: float,
    tz: str = "UTC",
    lexicon: Mapping[str, Mapping[str, str]] | None = None,
) -> list[Entity]:
    """The entities in ``text``, in text order (see the module docstring).

    ``now`` (epoch seconds, taken to the minute) and ``tz`` (an IANA zone name) anchor
    relative dates and times: "tomorrow" is the day after ``now``'s day in ``tz``.
    ``lexicon`` maps an entity kind to its phrases and the value each stands for
    (``{"size": {"medium": "medium", "regular": "medium"}}``). Never raises for any text.
    """
    if not text or not text.strip():
        return []
    found = list(_builtin(text, int(now // 60) * 60, tz))
    if lexicon:
        found.extend(_lookup(text, lexicon))
    return _dedupe(sorted(found, key=lambda e: (e.start, -e.end, e.kind)))


@functools.lru_cache(maxsize=4096)
def _builtin(text: str, minute: int, tz: str) -> tuple[Entity, ...]:
    """Numbers, dates, times and emails in ``text`` at the start of ``minute`` (epoch
    seconds): what :func:`extract` finds without a lexicon. Cached: people say
    "tomorrow" and "7pm" over and over, and Duckling costs about a millisecond."""
    found: list[Entity] = []
    numbers = _numbers(text)
    if _may_hold_dates(text, numbers):
        for group in _duckling(text, minute, tz):
            found.extend(_split_number_prefix(group, numbers, text, minute, tz))
    spans = [(e.start, e.end) for e in found]
    found.extend(n for n in numbers if not any(_overlaps((n.start, n.end), s) for s in spans))
    return tuple(found)


def first(entities: Iterable[Entity], kind: str) -> Entity | None:
    """The first entity of ``kind``, if any."""
    return next((e for e in entities if e.kind == kind), None)


def warm_up(tz: str = "UTC") -> None:
    """Start the Duckling runtime and load the time zone table now (about a second)
    rather than on the first message."""
    extract("tomorrow at 8pm", 0.0, tz)


# Words without which a text holds no date or time Duckling reads (with a number, a
# digit or an "@" for an email). Duckling costs about a millisecond a call, most
# messages ("Ann", "yes", "I'd like to book a table") have none of these, and the
# labelled set reads the same with and without this gate (tests/test_entities.py).
_DATE_WORDS = frozenset({
    "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "mon", "tue",
    "tues", "wed", "weds", "thu", "thur", "thurs", "fri", "sat", "sun", "weekday", "weekdays",
    "january", "february", "march", "april", "may", "june", "july", "august", "september",
    "october", "november", "december", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
    "sept", "oct", "nov", "dec", "today", "tomorrow", "tonight", "yesterday", "tmrw", "tmr",
    "tomorow", "noon", "midnight", "midday", "morning", "afternoon", "evening", "night",
    "week", "weekend", "weekends", "month", "year", "day", "days", "hour", "hours", "minute",
    "minutes", "am", "pm", "clock", "half", "quarter", "christmas", "easter", "eve",
})


def _may_hold_dates(text: str, numbers: list[Entity]) -> bool:
    """Whether ``text`` is worth Duckling's time: it has an "@", a date or time word,
    a number in words, or digits that are more than one bare number ("4" alone is a
    count, "19:30" or "14/06" are not)."""
    if "@" in text:
        return True
    if any(word in _DATE_WORDS for word in re.findall(r"[a-z]+", text.casefold())):
        return True
    if any(not n.text[:1].isdigit() for n in numbers):
        return True  # "four tomorrow", "half past seven"
    if not any(c.isdigit() for c in text):
        return False
    return not (len(numbers) == 1 and numbers[0].text == text.strip(" .!?"))


# -- numbers (text2num, digits) ----------------------------------------------------
class _Token:
    """A word of the text as text2num's ``find_numbers`` reads it, with its span."""

    __slots__ = ("end", "start", "word")

    def __init__(self, word: str, start: int, end: int) -> None:
        self.word, self.start, self.end = word, start, end

    def text(self) -> str:
        return self.word

    def nt_separated(self, previous: _Token) -> bool:
        return False

    def not_a_number_part(self) -> bool:
        return False


def _numbers(text: str) -> list[Entity]:
    from text_to_num import find_numbers

    tokens = [_Token(m.group(), m.start(), m.end()) for m in _WORD_RE.finditer(text)]
    found = []
    for occurrence in find_numbers(tokens, "en", threshold=_WORD_NUMBER_THRESHOLD):
        if occurrence.is_ordinal:
            continue  # "the 15th" is a date's day, not a count
        start, end = tokens[occurrence.start].start, tokens[occurrence.end - 1].end
        found.append(Entity(kind="number", value=_plain(float(occurrence.value)),
                            text=text[start:end], start=start, end=end))
    for m in _DIGITS_RE.finditer(text):
        found.append(Entity(kind="number", value=_plain(float(m.group().replace(",", "."))),
                            text=m.group(), start=m.start(), end=m.end()))
    return found


def _plain(number: float) -> int | float:
    return int(number) if number.is_integer() else number


# -- dates, times, emails (Duckling) -----------------------------------------------
class _Runtime:
    """The Duckling binding, its time zone table and dimensions, loaded once."""

    _lock = threading.Lock()
    _loaded: tuple[Any, Any, Any, Any] | None = None

    @classmethod
    def get(cls) -> tuple[Any, Any, Any, Any]:
        if cls._loaded is None:
            with cls._lock:
                if cls._loaded is None:
                    import duckling

                    zones = duckling.load_time_zones(str(_zoneinfo_dir()))
                    # en_GB: day first, as the date slots always read "14/06/2025".
                    lang = duckling.parse_locale(
                        "EN_GB", duckling.default_locale_lang(duckling.parse_lang("EN")))
                    dims = duckling.parse_dimensions(["time", "email"])
                    cls._loaded = (duckling, zones, lang, dims)
        return cls._loaded


def _zoneinfo_dir() -> Path:
    """The system's time zone database, else the ``tzdata`` package's copy."""
    for folder in zoneinfo.TZPATH:
        if (Path(folder) / "UTC").is_file():
            return Path(folder)
    try:
        import tzdata  # type: ignore[import-not-found]
    except ImportError:
        raise RuntimeError(
            "no time zone database found: install the system's tzdata or `pip install tzdata`"
        ) from None
    return Path(tzdata.__file__).parent / "zoneinfo"


def _duckling(text: str, now: float, tz: str) -> list[list[Entity]]:
    """Duckling's findings, one group of entities per finding (a time may be a date
    too)."""
    duckling, zones, lang, dims = _Runtime.get()
    context = duckling.Context(duckling.parse_ref_time(zones, tz, int(now)), lang)
    found: list[list[Entity]] = []
    try:
        # The binding cannot pass a NUL to Haskell; a space keeps every span in place.
        items = duckling.parse(text.replace("\x00", " "), context, dims, False)
    except BaseException as exc:  # a Rust panic is a BaseException
        if not _is_panic(exc):
            raise
        log.warning("duckling could not parse %r: %s", text[:200], exc)
        return []
    for item in items:
        start, end = int(item["start"]), int(item["end"])
        body = text[start:end]
        value = item.get("value") or {}
        if item.get("dim") == "email":
            found.append([Entity(kind="email", value=str(value.get("value")), text=body,
                                 start=start, end=end)])
        elif item.get("dim") == "time":
            found.append(_time_entities(value, body, start, end))
    return [group for group in found if group]


def _time_entities(value: Mapping[str, Any], body: str, start: int, end: int) -> list[Entity]:
    """A Duckling time value as a date and/or a time entity.

    A day ("the 14th", "next friday") is a date. An hour ("at 8pm") is a time, and a
    date too when the text named the day ("tomorrow at 8pm", "saturday at 7pm"):
    Duckling's readings of a clock time alone fall on consecutive days, those of a
    named day on one day or days a week or more apart. An interval ("tomorrow
    evening") gives its first day.
    """
    if value.get("type") == "interval":
        begin = value.get("from") or value.get("to") or {}
        when = _when(begin.get("value"))
        if when is None:
            return []
        return [Entity(kind="date", value=when.date().isoformat(), text=body, start=start,
                       end=end)]
    when, grain = _when(value.get("value")), value.get("grain")
    if when is None:
        return []
    if grain in _DATE_GRAINS:
        return [Entity(kind="date", value=when.date().isoformat(), text=body, start=start,
                       end=end)]
    if grain not in _TIME_GRAINS:
        return []  # a month or a year alone ("may I ...") is no day to book
    readings = [w for w in (_when(v.get("value")) for v in value.get("values") or ()) if w]
    clock = when.strftime("%H:%M")
    other = next((w.strftime("%H:%M") for w in readings if w.strftime("%H:%M") != clock), None)
    out = [Entity(kind="time", value=clock, text=body, start=start, end=end,
                  alternative=other)]
    days = sorted({w.date() for w in readings})
    if days and all((b - a).days > 1 for a, b in itertools.pairwise(days)):
        out.append(Entity(kind="date", value=when.date().isoformat(), text=body,
                          start=start, end=end))
    return out


def _is_panic(exc: BaseException) -> bool:
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _when(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        return None


def _split_number_prefix(
    group: list[Entity], numbers: list[Entity], text: str, now: float, tz: str
) -> list[Entity]:
    """Duckling reads "four tomorrow" (in "a table for four tomorrow") as 04:00
    tomorrow. A time that begins with a number and whose rest is a day is that number
    (kept among the numbers) and the day."""
    entity = group[0]
    if entity.kind != "time" or not any(n.start == entity.start for n in numbers):
        return group
    number = next(n for n in numbers if n.start == entity.start)
    gap = text[number.end:entity.end]
    rest_start = number.end + len(gap) - len(gap.lstrip())
    rest = [e for g in _duckling(text[rest_start:entity.end], now, tz) for e in g]
    days = [e for e in rest if e.kind == "date"]
    if any(e.kind == "time" for e in rest) or len(days) != 1:
        return group
    day = days[0]
    return [Entity(kind="date", value=day.value, text=text[rest_start + day.start:
                                                          rest_start + day.end],
                   start=rest_start + day.start, end=rest_start + day.end)]


# -- choices (lookup) ------------------------------------------------------------------
def _lookup(text: str, lexicon: Mapping[str, Mapping[str, str]]) -> list[Entity]:
    """Whole-word occurrences of each kind's phrases, longest phrase first, no overlaps
    within a kind."""
    lowered = text.casefold()
    found: list[Entity] = []
    for kind, phrases in lexicon.items():
        taken: list[tuple[int, int]] = []
        for phrase in sorted(phrases, key=len, reverse=True):
            words = normalize(phrase).split()
            if not words:
                continue
            pattern = r"(?<!\w)" + r"[\W_]+".join(map(re.escape, words)) + r"(?!\w)"
            for m in re.finditer(pattern, lowered):
                span = (m.start(), m.end())
                if any(_overlaps(span, t) for t in taken):
                    continue
                taken.append(span)
                found.append(Entity(kind=kind, value=phrases[phrase], text=text[m.start():m.end()],
                                    start=m.start(), end=m.end()))
    return found


# -- helpers -------------------------------------------------------------------------
def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _dedupe(entities: list[Entity]) -> list[Entity]:
    """One entity per kind and value among overlapping ones (the first, longest)."""
    kept: list[Entity] = []
    for entity in entities:
        if any(k.kind == entity.kind and k.value == entity.value
               and _overlaps((k.start, k.end), (entity.start, entity.end)) for k in kept):
            continue
        kept.append(entity)
    return kept
