"""Conversation test files: YAML that reads like the chat, read with line numbers.

A file holds ``tests:``, a list of tests; each has a name (``test:``) and ``steps:``,
in the order the chat goes. A step is an **input** (the user writes, presses a
button, a service sends an event or answers a request, time passes, a human agent
comes or goes) or an
**expectation** about what the last input produced (a reply, the classification, the
workflow and state, slots, events)::

    tests:
      - test: books a table for two
        steps:
          - user: I'd like to book a table
          - classified: book_table
          - bot: How many people is the table for?
          - user: "2"
          - state: ask_day

The format is documented in docs/workflows.md ("Conversation tests"). Everything
here is pure: :func:`parse_test_file` turns a file's text into
:class:`ConversationFile`, and every problem is a :class:`TestFileError` whose text is
one line, ``FILE:LINE: problem``.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from commhub.core.engine.load import yaml12_loader

__all__ = [
    "DEFAULT_CLOCK",
    "EXPECTATIONS",
    "INPUTS",
    "BotExpect",
    "ButtonExpect",
    "ClassifiedExpect",
    "ConversationFile",
    "ConversationTest",
    "EventExpect",
    "EventInput",
    "Step",
    "TestFileError",
    "Turn",
    "ValueExpect",
    "find_test_files",
    "load_test_files",
    "parse_duration",
    "parse_test_file",
]

INPUTS = ("user", "press", "event", "answer", "wait", "agent")
EXPECTATIONS = ("bot", "silent", "classified", "workflow", "state", "slots", "events")
DECISIONS = ("workflow", "clarify", "fallback", "button")
SERVICE_WORDS = ("silent", "no_responders")  # the driver's SILENT and NO_RESPONDERS
# A test's ``agents:`` (is a human agent there when it begins?) and the ``agent:`` step.
AGENTS_WORDS = {"present": True, "absent": False}
AGENT_WORDS = {"joins": True, "leaves": False}
# 2030-01-01 12:00 UTC: where every test's clock starts unless it says ``clock:``.
DEFAULT_CLOCK = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC).timestamp()
TEST_FILE_SUFFIXES = (".yaml", ".yml")

Path_ = tuple[str | int, ...]


class TestFileError(ValueError):
    """A conversation test file is broken. ``str(e)`` reads ``FILE:LINE: problem``."""

    __test__ = False  # not a pytest test class

    def __init__(self, problem: str, file: str, line: int | None = None) -> None:
        self.problem = problem
        self.file = file
        self.line = line
        super().__init__(f"{file}:{line}: {problem}" if line else f"{file}: {problem}")


# -- what a step holds --------------------------------------------------------------
@dataclass(frozen=True)
class ValueExpect:
    """A value as the test wrote it: it matches an equal value, or one whose text is
    what was written (``time: 19:30``, ``order_id: 01234``)."""

    value: Any
    raw: str

    def matches(self, actual: Any) -> bool:
        if isinstance(actual, bool) != isinstance(self.value, bool):
            return self.raw == _text(actual)
        return bool(self.value == actual) or self.raw == _text(actual)


@dataclass(frozen=True)
class ButtonExpect:
    """A button a reply must offer: its title, and its payload when given."""

    title: str | None = None
    payload: dict[str, Any] | None = None

    def matches(self, button: dict[str, Any]) -> bool:
        if self.title is not None and button.get("title") != self.title:
            return False
        return self.payload is None or button.get("payload") == self.payload

    def describe(self) -> str:
        if self.payload is None:
            return f"{self.title}"
        return f"{self.title or '*'} {_json(self.payload)}"


@dataclass(frozen=True)
class BotExpect:
    """One reply: its exact ``text``, or a ``regex`` found in it (``re.search``), or a
    ``glob`` that matches all of it (``fnmatch``, case-sensitive); and, when
    ``buttons`` is given, exactly those buttons in that order."""

    text: str | None = None
    regex: str | None = None
    glob: str | None = None
    buttons: tuple[ButtonExpect, ...] | None = None

    def text_matches(self, text: str) -> bool:
        if self.text is not None:
            return text == self.text
        if self.regex is not None:
            return re.search(self.regex, text) is not None
        if self.glob is not None:
            return fnmatch.fnmatchcase(text, self.glob)
        return True

    def describe_text(self) -> str:
        if self.regex is not None:
            return f"regex {self.regex}"
        if self.glob is not None:
            return f"glob {self.glob}"
        return self.text if self.text is not None else "(any text)"


@dataclass(frozen=True)
class ClassifiedExpect:
    """The classification of the last message: which ``decision`` (``workflow``,
    ``clarify``, ``fallback``, ``button``), which ``workflow``, at least what
    confidence. ``none``: the message was not classified (a run took it)."""

    decision: str | None = None
    workflow: str | None = None
    min_confidence: float | None = None
    none: bool = False


@dataclass(frozen=True)
class EventExpect:
    """A workflow event kind (``started``, ``completed``, ``handoff``...) or the name of
    an emitted event, with the emitted data it must contain (None: any)."""

    name: str
    data: dict[str, ValueExpect] | None = None


@dataclass(frozen=True)
class EventInput:
    """A service's workflow input: the event's name and its data."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """One step as written: its kind (a key of :data:`INPUTS` or :data:`EXPECTATIONS`),
    its parsed value, its line, and how it reads (for reports)."""

    kind: str
    value: Any
    line: int
    text: str

    @property
    def is_input(self) -> bool:
        return self.kind in INPUTS


@dataclass(frozen=True)
class Turn:
    """An input and the expectations about what it produced."""

    input: Step
    expect: tuple[Step, ...]


@dataclass(frozen=True)
class ConversationTest:
    """One test: a conversation from its first input, on its own clock, with a human
    agent there (``agents``) or not (the default, as on a hub nobody staffs)."""

    name: str
    file: str
    line: int
    turns: tuple[Turn, ...]
    services: dict[str, Any] = field(default_factory=dict)
    clock: float = DEFAULT_CLOCK
    clock_given: bool = False  # the test says ``clock:``: it depends on the date
    agents: bool = False
    agents_given: bool = False  # the test says ``agents:``: it depends on who is there

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def uses(self, kind: str) -> bool:
        """Whether any turn's input is of ``kind``."""
        return any(turn.input.kind == kind for turn in self.turns)

    def texts(self) -> list[str]:
        """Everything the user writes, in order (to rank them all at once)."""
        return [t.input.value for t in self.turns if t.input.kind == "user"]


@dataclass(frozen=True)
class ConversationFile:
    """A test file and its tests, in file order."""

    path: str
    tests: tuple[ConversationTest, ...]


# -- finding and reading files ---------------------------------------------------------
def find_test_files(paths: Iterable[Path]) -> list[Path]:
    """The test files named, and the ``*.yaml``/``*.yml`` files under the folders named
    (recursively, sorted). Raises TestFileError for a path that does not exist or a
    folder without test files."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in TEST_FILE_SUFFIXES)
            if not inside:
                raise TestFileError("no test files (*.yaml, *.yml) in this folder", str(path))
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise TestFileError("no such file or folder", str(path))
    return list(dict.fromkeys(found))


def load_test_files(paths: Iterable[Path]) -> list[ConversationFile]:
    """Read every test file under ``paths``; the first broken one raises TestFileError."""
    files = []
    for path in find_test_files(paths):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TestFileError(f"cannot read: {exc}", str(path)) from None
        files.append(parse_test_file(text, str(path)))
    return files


def parse_test_file(text: str, file: str) -> ConversationFile:
    """Parse a test file's text; raises TestFileError (``FILE:LINE: problem``)."""
    data, lines, raws = _read_yaml(text, file)
    doc = _Doc(file, lines, raws)
    if not isinstance(data, dict):
        raise doc.error((), "a test file holds a mapping with a 'tests:' list")
    doc.only(data, (), ("tests",))
    tests = data.get("tests")
    if not isinstance(tests, list) or not tests:
        raise doc.error(("tests",), "'tests:' must be a non-empty list of tests")
    parsed: list[ConversationTest] = []
    names: dict[str, int] = {}
    for i, raw_test in enumerate(tests):
        test = _parse_test(doc, raw_test, ("tests", i))
        if test.name in names:
            raise doc.error(("tests", i, "test"), f"test {test.name!r} is already defined on "
                            f"line {names[test.name]}")
        names[test.name] = test.line
        parsed.append(test)
    return ConversationFile(file, tuple(parsed))


# -- parsing ---------------------------------------------------------------------------
class _Doc:
    """A file's values with the line and the written text of every node."""

    def __init__(self, file: str, lines: dict[Path_, int], raws: dict[Path_, str]) -> None:
        self.file = file
        self.lines = lines
        self.raws = raws

    def line(self, path: Path_) -> int:
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return 1

    def error(self, path: Path_, problem: str) -> TestFileError:
        return TestFileError(problem, self.file, self.line(path))

    def raw(self, path: Path_, value: Any) -> str:
        return self.raws.get(path, _text(value))

    def only(self, mapping: dict[str, Any], path: Path_, allowed: Sequence[str]) -> None:
        for key in mapping:
            if key not in allowed:
                raise self.error((*path, key), f"unknown key {key!r} (expected one of: "
                                 f"{', '.join(allowed)})")

    def text(self, value: Any, path: Path_, what: str) -> str:
        if value is None or isinstance(value, dict | list):
            raise self.error(path, f"{what} needs text")
        text = self.raw(path, value)
        if not text.strip():
            raise self.error(path, f"{what} needs text")
        return text


def _parse_test(doc: _Doc, data: Any, path: Path_) -> ConversationTest:
    if not isinstance(data, dict) or "test" not in data:
        raise doc.error(path, "a test is a mapping with 'test: NAME' and 'steps:'")
    doc.only(data, path, ("test", "steps", "services", "clock", "agents"))
    name = doc.text(data["test"], (*path, "test"), "'test:'")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise doc.error((*path, "steps") if "steps" in data else path,
                        f"test {name!r}: 'steps:' must be a non-empty list")
    services = data.get("services", {})
    if not isinstance(services, dict):
        raise doc.error((*path, "services"), "'services:' maps an ask subject to its answer")
    for subject, answer in services.items():
        if not isinstance(answer, dict) and answer not in SERVICE_WORDS:
            words = " or ".join(SERVICE_WORDS)
            raise doc.error((*path, "services", subject), f"service {subject!r}: an answer "
                            f"is a mapping (the service's JSON reply), {words}")
    clock = _clock(doc, data.get("clock"), (*path, "clock"))
    agents = data.get("agents", "absent")
    if not isinstance(agents, str) or agents not in AGENTS_WORDS:
        raise doc.error((*path, "agents"), f"agents {doc.raw((*path, 'agents'), agents)!r} "
                        f"is not one of: {', '.join(AGENTS_WORDS)}")
    turns: list[Turn] = []
    current: Step | None = None
    expect: list[Step] = []
    for i, raw_step in enumerate(steps):
        step = _parse_step(doc, raw_step, (*path, "steps", i))
        if step.is_input:
            if current is not None:
                turns.append(Turn(current, tuple(expect)))
            current, expect = step, []
        elif current is None:
            raise doc.error((*path, "steps", i), f"'{step.kind}:' expects something of an "
                            f"input, but no input ({', '.join(INPUTS)}) comes before it")
        else:
            expect.append(step)
    assert current is not None  # the first step is an input, or an error above
    turns.append(Turn(current, tuple(expect)))
    return ConversationTest(name, doc.file, doc.line(path), tuple(turns),
                            {str(k): v for k, v in services.items()}, clock,
                            data.get("clock") is not None, AGENTS_WORDS[agents],
                            "agents" in data)


def _clock(doc: _Doc, value: Any, path: Path_) -> float:
    if value is None:
        return DEFAULT_CLOCK
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        moment = dt.datetime.fromisoformat(str(value))
    except ValueError:
        raise doc.error(path, f"clock {value!r} is not a date and time like "
                        "2030-01-01T12:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _parse_step(doc: _Doc, data: Any, path: Path_) -> Step:
    if not isinstance(data, dict) or not data:
        raise doc.error(path, f"a step is a mapping such as 'user: hello' or 'bot: Hi!' "
                        f"(one of: {', '.join(INPUTS + EXPECTATIONS)})")
    kinds = [k for k in data if k in INPUTS + EXPECTATIONS]
    if len(kinds) != 1:
        known = ", ".join(INPUTS + EXPECTATIONS)
        if not kinds and len(data) == 1:
            raise doc.error(path, f"unknown step {next(iter(data))!r} (expected one of: "
                            f"{known})")
        raise doc.error(path, f"a step has exactly one of {known} (got "
                        f"{', '.join(map(str, data))})")
    kind = kinds[0]
    doc.only(data, path, (kind, "data") if kind == "event" else (kind,))
    value = data[kind]
    at = (*path, kind)
    line = doc.line(at)
    raw = doc.raw(at, value)
    if kind in ("user", "press"):
        return Step(kind, doc.text(value, at, f"'{kind}:'"), line, f"{kind}: {raw}")
    if kind == "event":
        name = doc.text(value, at, "'event:'")
        payload = data.get("data", {})
        if not isinstance(payload, dict):
            raise doc.error((*path, "data"), "'data:' of an event must be a mapping")
        return Step(kind, EventInput(name, payload), line, f"event: {name}"
                    + (f" {_json(payload)}" if payload else ""))
    if kind == "answer":
        return Step(kind, value, line, f"answer: {_json(value)}")
    if kind == "wait":
        seconds = parse_duration(raw)
        if seconds is None:
            raise doc.error(at, f"wait {raw!r} is not a duration like 90s, 15m, 1h or 1h30m")
        return Step(kind, seconds, line, f"wait: {raw}")
    if kind == "agent":
        if raw not in AGENT_WORDS:
            raise doc.error(at, f"agent {raw!r} is not one of: {', '.join(AGENT_WORDS)}")
        return Step(kind, AGENT_WORDS[raw], line, f"agent: {raw}")
    return Step(kind, _expectation(doc, kind, value, at), line, f"{kind}: {raw}")


def _expectation(doc: _Doc, kind: str, value: Any, at: Path_) -> Any:
    if kind == "bot":
        return _bot(doc, value, at)
    if kind == "silent":
        if value is not True:
            raise doc.error(at, "'silent:' takes true (the input gets no reply)")
        return True
    if kind == "classified":
        return _classified(doc, value, at)
    if kind == "workflow":
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return doc.text(value, at, "'workflow:'")
    if kind == "state":
        return doc.text(value, at, "'state:'")
    if kind == "slots":
        if not isinstance(value, dict) or not value:
            raise doc.error(at, "'slots:' maps slot names to values (null: not set)")
        return {str(k): ValueExpect(v, doc.raw((*at, k), v)) for k, v in value.items()}
    assert kind == "events"
    items = value if isinstance(value, list) else [value]
    events = []
    for i, item in enumerate(items):
        where = (*at, i) if isinstance(value, list) else at
        if isinstance(item, dict) and len(item) == 1:
            (name, data), = item.items()
            if not isinstance(data, dict):
                raise doc.error(where, f"event {name!r}: its data must be a mapping")
            events.append(EventExpect(str(name), {
                str(k): ValueExpect(v, doc.raw((*where, name, k), v)) for k, v in data.items()
            }))
        else:
            events.append(EventExpect(doc.text(item, where, "an event")))
    if not events:
        raise doc.error(at, "'events:' lists event kinds or emitted names")
    return tuple(events)


def _bot(doc: _Doc, value: Any, at: Path_) -> BotExpect:
    if not isinstance(value, dict):
        return BotExpect(text=doc.text(value, at, "'bot:'"))
    doc.only(value, at, ("text", "regex", "glob", "buttons"))
    forms = [k for k in ("text", "regex", "glob") if k in value]
    if len(forms) > 1:
        raise doc.error(at, f"a reply is matched by one of text, regex or glob (got "
                        f"{', '.join(forms)})")
    if not forms and "buttons" not in value:
        raise doc.error(at, "a reply needs text, regex, glob or buttons")
    texts = {k: doc.text(value[k], (*at, k), f"'{k}:'") for k in forms}
    if "regex" in texts:
        try:
            re.compile(texts["regex"])
        except re.error as exc:
            raise doc.error((*at, "regex"), f"bad regex {texts['regex']!r}: {exc}") from None
    buttons = None
    if "buttons" in value:
        buttons = _buttons(doc, value["buttons"], (*at, "buttons"))
    return BotExpect(texts.get("text"), texts.get("regex"), texts.get("glob"), buttons)


def _buttons(doc: _Doc, value: Any, at: Path_) -> tuple[ButtonExpect, ...]:
    if not isinstance(value, list):
        raise doc.error(at, "'buttons:' is a list of titles (quote titles with commas: "
                        "\"Yes, book it\")")
    out = []
    for i, item in enumerate(value):
        where = (*at, i)
        if isinstance(item, dict):
            doc.only(item, where, ("title", "payload"))
            payload = item.get("payload")
            if payload is not None and not isinstance(payload, dict):
                raise doc.error((*where, "payload"), "a button's payload is a mapping")
            title = doc.text(item["title"], (*where, "title"), "'title:'") \
                if "title" in item else None
            if title is None and payload is None:
                raise doc.error(where, "a button needs a title or a payload")
            out.append(ButtonExpect(title, payload))
        else:
            out.append(ButtonExpect(doc.text(item, where, "a button")))
    return tuple(out)


def _classified(doc: _Doc, value: Any, at: Path_) -> ClassifiedExpect:
    if isinstance(value, dict):
        doc.only(value, at, ("decision", "workflow", "min_confidence"))
        decision = value.get("decision")
        if decision is not None and decision not in DECISIONS:
            raise doc.error((*at, "decision"), f"decision {decision!r} is not one of "
                            f"{', '.join(DECISIONS)}")
        confidence = value.get("min_confidence")
        if confidence is not None and (not isinstance(confidence, int | float)
                                       or not 0 <= confidence <= 1):
            raise doc.error((*at, "min_confidence"), "min_confidence is a number from 0 to 1")
        workflow = value.get("workflow")
        return ClassifiedExpect(decision, None if workflow is None else str(workflow),
                                None if confidence is None else float(confidence))
    word = doc.text(value, at, "'classified:'")
    if word == "none":
        return ClassifiedExpect(none=True)
    if word in ("clarify", "fallback"):
        return ClassifiedExpect(decision=word)
    return ClassifiedExpect(workflow=word)


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str) -> float | None:
    """Seconds in ``90``, ``90s``, ``1.5s``, ``15m``, ``1h`` or ``1h30m``; None if the text
    is not a duration."""
    text = text.strip().replace(" ", "")
    try:
        return float(text)
    except ValueError:
        pass
    found = _DURATION.match(text)
    if not text or found is None:
        return None
    hours, minutes, seconds = (float(g) if g else 0.0 for g in found.groups())
    return hours * 3600 + minutes * 60 + seconds


# -- YAML with lines and written text --------------------------------------------------
# Workflow files' YAML (only true/false are booleans), with dates and times kept as text.
_Loader = yaml12_loader(dates_as_text=True)


def _read_yaml(text: str, file: str) -> tuple[Any, dict[Path_, int], dict[Path_, str]]:
    loader = _Loader(text)
    lines: dict[Path_, int] = {}
    raws: dict[Path_, str] = {}
    try:
        node = loader.get_single_node()
        data = None if node is None else _build(loader, node, (), lines, raws, file)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise TestFileError(f"invalid YAML: {exc.problem or exc}", file,
                            mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise TestFileError(f"invalid YAML: {exc}", file) from None
    finally:
        loader.dispose()
    return data, lines, raws


def _build(loader: Any, node: yaml.Node, path: Path_, lines: dict[Path_, int],
           raws: dict[Path_, str], file: str) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int):
                raise TestFileError(f"unsupported mapping key {key!r}", file,
                                    key_node.start_mark.line + 1)
            if key in out:
                raise TestFileError(f"duplicate key {key!r}", file, key_node.start_mark.line + 1)
            lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _build(loader, value_node, (*path, key), lines, raws, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, (*path, i), lines, raws, file)
                for i, item in enumerate(node.value)]
    if isinstance(node, yaml.ScalarNode):
        raws[path] = str(node.value)
    return loader.construct_object(node, deep=True)


def _text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
