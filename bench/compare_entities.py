"""Entity extractors compared on a small labelled set: commhub's and the candidates.

Usage: ``python bench/compare_entities.py [--data bench/data/entities_en.yaml] [-v]``

Each extractor reads every phrase of the set (numbers, dates, times, emails, and
phrases with none of them) at the set's reference time, and is scored on the
``(kind, value)`` pairs it finds: recall over the labelled ones, precision over all it
returned for the scored kinds, phrases entirely right, and milliseconds a phrase. The
candidates are the libraries considered for :mod:`commhub.core.engine.entities`; one
that is not installed is reported as such (``pip install dateparser text2num
number-parser word2number ctparse parsedatetime`` brings them; commhub's own needs
only its dependencies). ``-v`` prints each phrase an extractor got wrong.

The numbers are recorded in ``docs/workflows.md`` (Entities).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from commhub.core.engine.entities import extract

DATA = Path(__file__).parent / "data" / "entities_en.yaml"
KINDS = ("number", "date", "time", "email")
_EMAIL = re.compile(r"[^@\s<>(),;:\"']+@[^@\s<>(),;:\"']+\.[A-Za-z]{2,}")
_DIGITS = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w:])")

Found = list[tuple[str, Any]]


class Setting:
    """The labelled set's reference time."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.tz = data["tz"]
        self.now = dt.datetime.fromisoformat(data["now"]).replace(tzinfo=ZoneInfo(self.tz))


# -- the candidates ------------------------------------------------------------------
def commhub(s: Setting) -> Callable[[str], Found]:
    return lambda text: [(e.kind, e.value) for e in extract(text, s.now.timestamp(), s.tz)]


def duckling_alone(s: Setting) -> Callable[[str], Found]:
    """Duckling for everything, numbers included, without commhub's fixes."""
    import duckling as d

    zones = d.load_time_zones("/usr/share/zoneinfo")
    lang = d.default_locale_lang(d.parse_lang("EN"))
    dims = d.parse_dimensions(["time", "number", "email"])

    def run(text: str) -> Found:
        context = d.Context(d.parse_ref_time(zones, s.tz, int(s.now.timestamp())), lang)
        out: Found = []
        for item in d.parse(text, context, dims, False):
            value = item["value"]
            if item["dim"] in ("number", "email"):
                out.append((item["dim"], value["value"]))
                continue
            if value.get("type") == "interval":
                begin = value.get("from") or value.get("to")
                out.append(("date", dt.datetime.fromisoformat(begin["value"]).date().isoformat()))
                continue
            when = dt.datetime.fromisoformat(value["value"])
            if value["grain"] in ("hour", "minute", "second"):
                out.append(("time", when.strftime("%H:%M")))
                if when.date() != s.now.date():
                    out.append(("date", when.date().isoformat()))
            elif value["grain"] in ("day", "week"):
                out.append(("date", when.date().isoformat()))
        return out

    return run


class _Token:
    def __init__(self, word: str) -> None:
        self.word = word

    def text(self) -> str:
        return self.word

    def nt_separated(self, previous: Any) -> bool:
        return False

    def not_a_number_part(self) -> bool:
        return False


def _text2num(text: str) -> Found:
    from text_to_num import find_numbers

    tokens = [_Token(m.group()) for m in re.finditer(r"[^\W_]+|[^\w\s]", text)]
    found: Found = [("number", o.value) for o in find_numbers(tokens, "en", threshold=2)
                    if not o.is_ordinal]
    return found + [("number", float(m.group())) for m in _DIGITS.finditer(text)]


def _emails(text: str) -> Found:
    return [("email", m.group()) for m in _EMAIL.finditer(text)]


def dateparser_text2num(s: Setting) -> Callable[[str], Found]:
    from dateparser.date import DateDataParser
    from dateparser.search import search_dates

    settings = {"RELATIVE_BASE": s.now.replace(tzinfo=None), "PREFER_DATES_FROM": "future",
                "RETURN_TIME_AS_PERIOD": True}
    periods = DateDataParser(languages=["en"], settings=settings)

    def run(text: str) -> Found:
        out: Found = []
        for sub, when in search_dates(text, languages=["en"], settings=settings) or []:
            period = periods.get_date_data(sub).period
            if period == "time":
                out.append(("time", when.strftime("%H:%M")))
                if when.date() != s.now.date():
                    out.append(("date", when.date().isoformat()))
            elif period in ("day", "week", "part_of_day"):
                out.append(("date", when.date().isoformat()))
        return out + _text2num(text) + _emails(text)

    return run


def ctparse_number_parser(s: Setting) -> Callable[[str], Found]:
    import number_parser
    from ctparse import ctparse
    from ctparse.types import Interval, Time

    def run(text: str) -> Found:
        out: Found = []
        parsed = ctparse(text, ts=s.now.replace(tzinfo=None), timeout=1)
        res = parsed.resolution if parsed is not None else None
        if isinstance(res, Interval):
            res = res.t_from
        if isinstance(res, Time):
            if res.year is not None and res.month is not None and res.day is not None:
                out.append(("date", dt.date(res.year, res.month, res.day).isoformat()))
            if res.hour is not None:
                out.append(("time", f"{res.hour:02d}:{res.minute or 0:02d}"))
        numbers = re.finditer(r"\d+(?:\.\d+)?", number_parser.parse(text))
        return out + [("number", float(m.group())) for m in numbers] + _emails(text)

    return run


def parsedatetime_word2number(s: Setting) -> Callable[[str], Found]:
    import parsedatetime as pdt
    from word2number import w2n

    calendar = pdt.Calendar(version=pdt.VERSION_CONTEXT_STYLE)

    def run(text: str) -> Found:
        out: Found = []
        for when, context, *_ in calendar.nlp(text, sourceTime=s.now.replace(tzinfo=None)) or []:
            if context.hasDate:
                out.append(("date", when.date().isoformat()))
            if context.hasTime:
                out.append(("time", when.strftime("%H:%M")))
        out += [("number", float(m.group())) for m in _DIGITS.finditer(text)]
        with contextlib.suppress(ValueError):
            out.append(("number", float(w2n.word_to_num(text))))
        return out + _emails(text)

    return run


CANDIDATES: dict[str, Callable[[Setting], Callable[[str], Found]]] = {
    "commhub (Duckling + text2num)": commhub,
    "Duckling alone": duckling_alone,
    "dateparser + text2num": dateparser_text2num,
    "ctparse + number-parser": ctparse_number_parser,
    "parsedatetime + word2number": parsedatetime_word2number,
}


# -- scoring -------------------------------------------------------------------------
def _norm(kind: str, value: Any) -> Any:
    return float(value) if kind == "number" else str(value)


def score(rows: list[dict[str, Any]], run: Callable[[str], Found]) -> dict[str, Any]:
    """Recall, precision, whole rows right, per-kind hits and the rows missed."""
    hits = extra = missed = right = 0
    per_kind = {k: [0, 0] for k in KINDS}
    wrong: list[tuple[str, list[Any]]] = []
    started = time.perf_counter()
    for row in rows:
        expect: dict[str, Any] = row.get("expect") or {}
        ignore = set(row.get("ignore") or ())
        got = {(k, _norm(k, v)) for k, v in run(row["text"]) if k in KINDS and k not in ignore}
        ok = True
        for kind, want in expect.items():
            wants = {_norm(kind, w) for w in (want if isinstance(want, list) else [want])}
            found = {v for k, v in got if k == kind}
            per_kind[kind][1] += 1
            if found & wants:
                hits += 1
                per_kind[kind][0] += 1
            else:
                missed += 1
                ok = False
            extra += len(found - wants)
            ok = ok and not found - wants
        strays = [pair for pair in got if pair[0] not in expect]
        extra += len(strays)
        right += ok and not strays
        if not (ok and not strays):
            wrong.append((row["text"], sorted(got, key=str)))
    elapsed = (time.perf_counter() - started) / len(rows) * 1000
    return {"recall": hits / max(1, hits + missed), "precision": hits / max(1, hits + extra),
            "right": right, "per_kind": per_kind, "ms": elapsed, "wrong": wrong}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    data = yaml.safe_load(args.data.read_text())
    setting, rows = Setting(data), data["rows"]
    print(f"{len(rows)} phrases, reference time {setting.now.isoformat()}")
    print(f"{'extractor':32} {'right':>7} {'recall':>7} {'prec.':>6}  "
          + " ".join(f"{k:>7}" for k in KINDS) + "  ms/phrase")
    for name, make in CANDIDATES.items():
        try:
            run = make(setting)
            run("warm up: tomorrow at 8pm")
        except ImportError as exc:
            print(f"{name:32} not installed ({exc.name})")
            continue
        result = score(rows, run)
        kinds = " ".join(f"{a:>3}/{b:<3}" for a, b in result["per_kind"].values())
        print(f"{name:32} {result['right']:>3}/{len(rows):<3} {result['recall']:7.2f} "
              f"{result['precision']:6.2f}  {kinds}  {result['ms']:.1f}")
        if args.verbose:
            for text, got in result["wrong"]:
                print(f"    {text!r}: {got}")


if __name__ == "__main__":
    main()
