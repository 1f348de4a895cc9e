"""Workflow definitions: the pydantic model, the YAML/TOML loader and the load-time checks.

A workflow is a finite state machine with a name, a description, example phrases (they
train the classifier), typed slots, an initial state and named states; each state says
something when entered and lists its transitions, tried in order. The file format is
documented for flow authors in ``docs/workflows.md``.

Everything here is checked when loaded, never at run time: :func:`load_workflow_file`
and :func:`load_workflows` raise :class:`WorkflowError`, whose text names the file and
the line (``book_table.yaml:12: state 'confirm': transition target 'dne' is not a state``).
A :class:`WorkflowDef` built in Python passes the same :func:`check_workflow`; its errors
name ``<workflow NAME>`` instead of a file.

YAML is read with YAML 1.2 booleans: only ``true``/``false`` are booleans, so ``on:``,
``yes`` and ``no`` stay strings (YAML 1.1 would turn the ``on:`` key into ``True``).
"""

from __future__ import annotations

import datetime as dt
import re
import string
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "SLOT_TYPES",
    "WORKFLOW_FILE_SUFFIXES",
    "ButtonDef",
    "EmitDef",
    "Guard",
    "MessageTrigger",
    "SayDef",
    "SlotDef",
    "StateDef",
    "TransitionDef",
    "WorkflowDef",
    "WorkflowError",
    "check_workflow",
    "load_workflow_file",
    "load_workflows",
    "render_template",
    "template_fields",
]

SLOT_TYPES = ("text", "number", "email", "choice", "regex", "date")
WORKFLOW_FILE_SUFFIXES = (".yaml", ".yml", ".toml")
# Workflow-event kinds share the subject space ``evt.workflow.{wf}.{kind}`` with emits.
_RESERVED_EMITS = {
    "started", "transition", "completed", "failed", "expired", "cancelled", "emitted",
}
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_DOTTED_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_EMAIL_RE = re.compile(r"[^@\s<>(),;:\"']+@[^@\s<>(),;:\"']+\.[A-Za-z]{2,}")
_NUMBER_RE = re.compile(r"-?\d+(?:[.,]\d+)?")
_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20,
}  # fmt: skip
_DATE_FORMATS = ("%Y-%m-%d", "%d/%m/%Y", "%d.%m.%Y")

Path_ = tuple[str | int, ...]


class WorkflowError(ValueError):
    """A workflow definition is broken. ``str(e)`` reads ``file:line: problem``.

    ``file`` is the definition's path (None for one built in code, which is then named
    ``<workflow NAME>``), ``line`` the 1-based line (None when unknown).
    """

    def __init__(
        self, problem: str, file: str | None = None, line: int | None = None, name: str = ""
    ) -> None:
        self.problem = problem
        self.file = file
        self.line = line
        self.name = name
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.file is not None else f"<workflow {self.name or '?'}>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.problem}"


# --------------------------------------------------------------------------- templates
def template_fields(template: str) -> list[str]:
    """The ``{slot}`` placeholders of a template, in order; ``{{``/``}}`` are literal braces.

    Raises ValueError for malformed braces, an empty ``{}``, or anything but a plain name
    inside the braces (no attributes, indexes, conversions or format specs).
    """
    fields = []
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if spec or conversion:
            raise ValueError(f"placeholder {{{field}...}} may not have a format or conversion")
        if not field.isidentifier():
            raise ValueError(f"placeholder {{{field}}} is not a plain slot name")
        fields.append(field)
    return fields


def render_template(template: str, slots: Mapping[str, Any]) -> str:
    """Fill ``{slot}`` placeholders from ``slots``; a missing or None slot renders empty.

    Slot values are inserted with ``str()`` and never re-parsed, so a user's text with
    braces in it is safe. The template must have passed :func:`template_fields`.
    """
    out = []
    for literal, field, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if field is not None:
            value = slots.get(field)
            out.append("" if value is None else str(value))
    return "".join(out)


def _as_text(value: Any) -> Any:
    """Scalars written without quotes (``value: 1``, ``choices: [true]``) as strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


# --------------------------------------------------------------------------- the model
class _Model(BaseModel):
    # Unknown keys are errors: a misspelled ``tos:`` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SlotDef(_Model):
    """A typed value the workflow collects; :meth:`parse` validates user text into it.

    ``min``/``max``/``integer`` apply to ``number``, ``choices`` to ``choice``,
    ``pattern`` to ``regex`` (searched in the text; the matched part is the value).
    """

    type: str = "text"
    min: float | None = None
    max: float | None = None
    integer: bool = False
    choices: list[str] | None = None
    pattern: str | None = None

    @field_validator("choices", mode="before")
    @classmethod
    def _choices_as_text(cls, value: Any) -> Any:
        return [_as_text(v) for v in value] if isinstance(value, list) else value

    def parse(self, text: str, today: dt.date | None = None) -> tuple[bool, Any]:
        """``(True, value)`` when ``text`` is a valid value of this slot, else ``(False, None)``.

        text: stripped, non-empty. number: the first number in the text ("4", "for 4
        people", "four"), an int when whole, within min/max. email: the first address in
        the text. choice: one of ``choices``, case-insensitively, as written in the
        definition. regex: the first match of ``pattern`` searched in the text (anchor it
    with ``^...$`` to require the whole text). date: ``YYYY-MM-DD``, ``DD/MM/YYYY`` or
        ``DD.MM.YYYY``, or "today"/"tomorrow" when ``today`` is given, returned as
        ``YYYY-MM-DD``. Never raises.
        """
        text = (text or "").strip()
        if not text:
            return False, None
        if self.type == "text":
            return True, text
        if self.type == "number":
            return self._parse_number(text)
        if self.type == "email":
            found = _EMAIL_RE.search(text)
            return (True, found.group(0)) if found else (False, None)
        if self.type == "choice":
            for choice in self.choices or ():
                if text.casefold() == choice.casefold():
                    return True, choice
            return False, None
        if self.type == "regex":
            try:
                matched = re.search(self.pattern or "", text)
            except re.error:
                return False, None
            return (True, matched.group(0)) if matched else (False, None)
        if self.type == "date":
            relative = {"today": 0, "tomorrow": 1}.get(text.casefold().rstrip(".!"))
            if relative is not None and today is not None:
                return True, (today + dt.timedelta(days=relative)).isoformat()
            for fmt in _DATE_FORMATS:
                try:
                    return True, dt.datetime.strptime(text, fmt).date().isoformat()
                except ValueError:
                    continue
            return False, None
        return False, None

    def _parse_number(self, text: str) -> tuple[bool, Any]:
        found = _NUMBER_RE.search(text)
        if found:
            number = float(found.group(0).replace(",", "."))
        else:
            words = [_NUMBER_WORDS.get(w) for w in re.findall(r"[a-z]+", text.casefold())]
            numbers = [w for w in words if w is not None]
            if not numbers:
                return False, None
            number = float(numbers[0])
        if self.integer and not number.is_integer():
            return False, None
        if (self.min is not None and number < self.min) or (
            self.max is not None and number > self.max
        ):
            return False, None
        return True, int(number) if number.is_integer() else number

    def default_invalid(self) -> str:
        """What the engine says when a value is invalid and the transition gives no text."""
        if self.type == "number":
            lo, hi = _fmt_num(self.min), _fmt_num(self.max)
            kind = "a whole number" if self.integer else "a number"
            if lo is not None and hi is not None:
                return f"Please give {kind} between {lo} and {hi}."
            if lo is not None:
                return f"Please give {kind} of at least {lo}."
            if hi is not None:
                return f"Please give {kind} of at most {hi}."
            return f"Please give {kind}."
        if self.type == "email":
            return "Please give an email address, like name@example.com."
        if self.type == "choice":
            return "Please answer with one of: " + ", ".join(self.choices or ()) + "."
        if self.type == "date":
            return "Please give a date as YYYY-MM-DD or DD/MM/YYYY."
        return "Sorry, that doesn't look right. Please try again."


def _fmt_num(value: float | None) -> str | None:
    if value is None:
        return None
    return str(int(value)) if float(value).is_integer() else str(value)


class ButtonDef(_Model):
    """A button under a reply; pressing it sends ``{"value": value}``."""

    title: str
    value: str

    @field_validator("value", mode="before")
    @classmethod
    def _value_as_text(cls, value: Any) -> Any:
        return _as_text(value)


class SayDef(_Model):
    """One reply: templated ``text``, optional ``buttons``.

    ``buttons_from: workflows`` adds one button per other loaded workflow (title: its
    description, payload ``{"start": NAME}``); the router starts the pressed one.
    """

    text: str
    buttons: list[ButtonDef] = Field(default_factory=list)
    buttons_from: Literal["workflows"] | None = None


class EmitDef(_Model):
    """An event published for services on entering a state; string values in ``data``
    are templates, and a value that is exactly ``"{slot}"`` keeps the slot's own type."""

    name: str
    data: dict[str, Any] = Field(default_factory=dict)


class MessageTrigger(_Model):
    """A user's message: optionally it must match ``match`` (a regex, searched,
    case-insensitive) and/or it fills ``slot`` (validated by the slot's type)."""

    match: str | None = None
    slot: str | None = None


class Guard(_Model):
    """A side-effect-free condition on a slot: ``equals`` a value, or ``filled`` or not.

    It sees the value the transition itself would fill, so ``message: {slot: x}`` with
    ``if: {slot: x, equals: y}`` branches on the answer.
    """

    slot: str
    equals: Any = None
    filled: bool | None = None

    @model_validator(mode="after")
    def _one_condition(self) -> Guard:
        if (self.equals is None) == (self.filled is None):
            raise ValueError("a guard needs exactly one of 'equals' or 'filled'")
        return self

    def holds(self, slots: Mapping[str, Any]) -> bool:
        value = slots.get(self.slot)
        if self.filled is not None:
            return (value is not None) == self.filled
        if isinstance(value, str) and isinstance(self.equals, str):
            return value.casefold() == self.equals.casefold()
        return bool(value == self.equals)


class TransitionDef(_Model):
    """One way out of a state: exactly one trigger, a target, an optional guard.

    Triggers: ``message`` (``{}``/``any``, or ``{match, slot}``), ``button`` (a value),
    ``event`` (a service event name; its ``data`` keys that are slots fill them),
    ``timeout`` (seconds in this state; the router schedules it).
    """

    message: MessageTrigger | None = None
    button: str | None = None
    event: str | None = None
    timeout: float | None = Field(default=None, gt=0)
    to: str
    if_: Guard | None = Field(default=None, alias="if")
    invalid: str | None = None

    @field_validator("message", mode="before")
    @classmethod
    def _any_message(cls, value: Any) -> Any:
        return {} if value == "any" else value

    @field_validator("button", mode="before")
    @classmethod
    def _button_as_text(cls, value: Any) -> Any:
        return _as_text(value)

    @model_validator(mode="after")
    def _one_trigger(self) -> TransitionDef:
        kinds = ("message", "button", "event", "timeout")
        given = [k for k in kinds if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "a transition needs exactly one trigger of message, button, event, timeout"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def kind(self) -> str:
        """``message``, ``button``, ``event`` or ``timeout``."""
        for kind in ("message", "button", "event", "timeout"):
            if getattr(self, kind) is not None:
                return kind
        raise AssertionError("unreachable: validated to have one trigger")

    @property
    def slot(self) -> str | None:
        return self.message.slot if self.message is not None else None


def _as_list(value: Any) -> Any:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


class StateDef(_Model):
    """A state. On entry: ``set`` slots, then ``say`` replies, then ``emit`` events.

    ``final: true`` ends the run on entry. ``reprompt`` replaces the default "Sorry, I
    didn't get that." answer to a message no transition takes. ``handoff: true`` marks
    the conversation for a human agent.
    """

    say: list[SayDef] = Field(default_factory=list)
    set: dict[str, Any] = Field(default_factory=dict)
    emit: list[EmitDef] = Field(default_factory=list)
    on: list[TransitionDef] = Field(default_factory=list)
    final: bool = False
    reprompt: str | None = None
    handoff: bool = False

    @field_validator("say", mode="before")
    @classmethod
    def _say_list(cls, value: Any) -> Any:
        return [{"text": v} if isinstance(v, str) else v for v in _as_list(value)]

    @field_validator("emit", mode="before")
    @classmethod
    def _emit_list(cls, value: Any) -> Any:
        return [{"name": v} if isinstance(v, str) else v for v in _as_list(value)]

    @field_validator("on", mode="before")
    @classmethod
    def _on_list(cls, value: Any) -> Any:
        return _as_list(value)

    @property
    def timeout(self) -> float | None:
        """The shortest ``timeout`` trigger of this state in seconds, or None: what the
        router schedules on entering it."""
        timeouts = [t.timeout for t in self.on if t.timeout is not None]
        return min(timeouts) if timeouts else None


class WorkflowDef(_Model):
    """A whole workflow. ``source`` is the file it came from (None when built in code)."""

    name: str
    description: str = ""
    examples: list[str] = Field(default_factory=list)
    slots: dict[str, SlotDef] = Field(default_factory=dict)
    initial: str
    states: dict[str, StateDef]
    source: str | None = None
    # Path of keys -> line in the source file, for error messages; empty for code.
    _lines: dict[Path_, int] = PrivateAttr(default_factory=dict)

    @field_validator("slots", mode="before")
    @classmethod
    def _slot_shorthand(cls, value: Any) -> Any:
        # ``email: email`` is short for ``email: {type: email}``.
        if isinstance(value, dict):
            return {k: {"type": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    def line_of(self, path: Path_) -> int | None:
        """The source line of ``path`` (or of its nearest enclosing key), if known."""
        for end in range(len(path), -1, -1):
            line = self._lines.get(path[:end])
            if line is not None:
                return line
        return None

    def error(self, path: Path_, problem: str) -> WorkflowError:
        """A :class:`WorkflowError` for ``problem`` at ``path`` in this definition."""
        return WorkflowError(problem, self.source, self.line_of(path) if self.source else None,
                             self.name)


# --------------------------------------------------------------------------- checks
def check_workflow(defn: WorkflowDef) -> None:
    """Check a definition; raise :class:`WorkflowError` for the first problem found.

    Checks, in order: the name is a subject token; slot types and their options; the
    initial state exists; each state's transitions (targets exist, slots known, regexes
    compile, event names valid, no transitions out of a final state); every template
    and ``set``/``emit`` names a declared slot; no state is unreachable from ``initial``;
    every non-final state has a way out, and a final state can be reached from it.
    """
    if not _TOKEN_RE.match(defn.name):
        raise defn.error(("name",), f"workflow name {defn.name!r} must be 1-128 letters, "
                         "digits, '-' or '_' (it is a subject token)")
    for slot_name, slot in defn.slots.items():
        _check_slot(defn, slot_name, slot)
    if not defn.states:
        raise defn.error(("states",), "a workflow needs at least one state")
    if defn.initial not in defn.states:
        raise defn.error(("initial",), f"initial state {defn.initial!r} is not a state")
    for state_name, state in defn.states.items():
        _check_state(defn, state_name, state)
    _check_graph(defn)


def _check_slot(defn: WorkflowDef, name: str, slot: SlotDef) -> None:
    path: Path_ = ("slots", name)
    if not name.isidentifier():
        raise defn.error(path, f"slot name {name!r} must be a Python-style identifier")
    if slot.type not in SLOT_TYPES:
        raise defn.error((*path, "type"), f"slot {name!r}: unknown type {slot.type!r} "
                         f"(expected one of: {', '.join(SLOT_TYPES)})")
    if slot.type != "number" and (slot.min is not None or slot.max is not None or slot.integer):
        raise defn.error(path, f"slot {name!r}: min, max and integer apply to type number only")
    if slot.min is not None and slot.max is not None and slot.min > slot.max:
        raise defn.error(path, f"slot {name!r}: min {slot.min} is greater than max {slot.max}")
    if slot.type == "choice" and not slot.choices:
        raise defn.error(path, f"slot {name!r}: type choice needs a non-empty 'choices' list")
    if slot.type != "choice" and slot.choices is not None:
        raise defn.error((*path, "choices"), f"slot {name!r}: choices apply to type choice only")
    if slot.type == "regex":
        if not slot.pattern:
            raise defn.error(path, f"slot {name!r}: type regex needs a 'pattern'")
        _check_regex(defn, (*path, "pattern"), f"slot {name!r}", slot.pattern)
    elif slot.pattern is not None:
        raise defn.error((*path, "pattern"), f"slot {name!r}: pattern applies to type regex only")


def _check_regex(defn: WorkflowDef, path: Path_, what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise defn.error(path, f"{what}: bad regex {pattern!r}: {exc}") from None


def _check_template(defn: WorkflowDef, path: Path_, what: str, template: str) -> None:
    try:
        fields = template_fields(template)
    except ValueError as exc:
        raise defn.error(path, f"{what}: bad template {template!r}: {exc}") from None
    for field in fields:
        if field not in defn.slots:
            raise defn.error(path, f"{what}: template {template!r} uses unknown slot {{{field}}}")


def _check_slot_ref(defn: WorkflowDef, path: Path_, what: str, slot: str) -> None:
    if slot not in defn.slots:
        raise defn.error(path, f"{what}: unknown slot {slot!r}")


def _templates_in(value: Any, path: Path_) -> Iterator[tuple[Path_, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _templates_in(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _templates_in(item, (*path, index))


def _check_state(defn: WorkflowDef, name: str, state: StateDef) -> None:
    base: Path_ = ("states", name)
    what = f"state {name!r}"
    if not _TOKEN_RE.match(name):
        raise defn.error(base, f"state name {name!r} must be letters, digits, '-' or '_'")
    for i, say in enumerate(state.say):
        _check_template(defn, (*base, "say", i, "text"), what, say.text)
        for j, button in enumerate(say.buttons):
            _check_template(defn, (*base, "say", i, "buttons", j, "title"), what, button.title)
    if state.reprompt is not None:
        _check_template(defn, (*base, "reprompt"), what, state.reprompt)
    for slot, value in state.set.items():
        _check_slot_ref(defn, (*base, "set", slot), f"{what}: set", slot)
        for path, template in _templates_in(value, (*base, "set", slot)):
            _check_template(defn, path, what, template)
    for i, emit in enumerate(state.emit):
        path = (*base, "emit", i)
        if not _DOTTED_RE.match(emit.name) or emit.name in _RESERVED_EMITS:
            raise defn.error((*path, "name"), f"{what}: emit name {emit.name!r} must be "
                             "dot-separated subject tokens and not a workflow event kind "
                             f"({', '.join(sorted(_RESERVED_EMITS))})")
        for tpath, template in _templates_in(emit.data, (*path, "data")):
            _check_template(defn, tpath, what, template)
    if state.final and state.on:
        raise defn.error((*base, "on"), f"{what}: a final state ends the run, so it can have "
                         "no transitions")
    for i, transition in enumerate(state.on):
        _check_transition(defn, (*base, "on", i), what, transition)


def _check_transition(defn: WorkflowDef, path: Path_, what: str, t: TransitionDef) -> None:
    if t.to not in defn.states:
        raise defn.error((*path, "to"), f"{what}: transition target {t.to!r} is not a state")
    if t.message is not None:
        if t.message.match is not None:
            _check_regex(defn, (*path, "message", "match"), what, t.message.match)
        if t.message.slot is not None:
            _check_slot_ref(defn, (*path, "message", "slot"), what, t.message.slot)
    if t.event is not None and not _DOTTED_RE.match(t.event):
        raise defn.error((*path, "event"), f"{what}: event name {t.event!r} must be "
                         "dot-separated letters, digits, '-' or '_'")
    if t.if_ is not None:
        _check_slot_ref(defn, (*path, "if", "slot"), f"{what}: guard", t.if_.slot)
    if t.invalid is not None:
        if t.slot is None:
            raise defn.error((*path, "invalid"), f"{what}: 'invalid' needs a message slot to "
                             "validate")
        _check_template(defn, (*path, "invalid"), what, t.invalid)


def _check_graph(defn: WorkflowDef) -> None:
    reached = _closure([defn.initial], lambda s: [t.to for t in defn.states[s].on])
    for name in defn.states:
        if name not in reached:
            raise defn.error(("states", name), f"state {name!r} is unreachable from initial "
                             f"state {defn.initial!r}")
    finals = [name for name, state in defn.states.items() if state.final]
    incoming: dict[str, list[str]] = {name: [] for name in defn.states}
    for name, state in defn.states.items():
        for t in state.on:
            incoming[t.to].append(name)
    can_finish = _closure(finals, lambda s: incoming[s])
    for name, state in defn.states.items():
        if not state.final and not state.on:
            raise defn.error(("states", name), f"state {name!r}: no way out (not final and no "
                             "transitions)")
    for name, state in defn.states.items():
        if not state.final and name not in can_finish:
            raise defn.error(("states", name), f"state {name!r}: no way out (no path from it "
                             "to a final state)")


def _closure(start: Iterable[str], next_of: Any) -> set[str]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(next_of(name))
    return seen


# --------------------------------------------------------------------------- loading
def _yaml12_loader() -> type[yaml.SafeLoader]:
    """A SafeLoader where only true/false are booleans (``on``, ``yes``, ``no`` are text)."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
        list("tTfF"),
    )
    return Loader


_Loader = _yaml12_loader()


def _read_yaml(text: str, file: str) -> tuple[Any, dict[Path_, int]]:
    loader = _Loader(text)
    lines: dict[Path_, int] = {}
    try:
        node = loader.get_single_node()
        data = None if node is None else _build(loader, node, (), lines, file)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise WorkflowError(f"invalid YAML: {exc.problem or exc}", file,
                            mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise WorkflowError(f"invalid YAML: {exc}", file) from None
    finally:
        loader.dispose()
    return data, lines


def _build(loader: Any, node: yaml.Node, path: Path_, lines: dict[Path_, int], file: str) -> Any:
    """Construct a YAML node's value, recording the line of every key and list item."""
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolve ``<<: *anchor`` merges
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int):
                raise WorkflowError(f"unsupported mapping key {key!r}", file,
                                    key_node.start_mark.line + 1)
            if key in out:
                raise WorkflowError(f"duplicate key {key!r}", file, key_node.start_mark.line + 1)
            lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _build(loader, value_node, (*path, key), lines, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, (*path, i), lines, file) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


_TOML_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_TOML_KEY = re.compile(r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
                       r"(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=")


def _toml_key_parts(dotted: str) -> list[str]:
    parts = re.findall(r"\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+", dotted)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def _toml_lines(text: str) -> dict[Path_, int]:
    """Best-effort line numbers for TOML (tomllib has none): table headers, array-of-
    tables entries and ``key =`` lines; keys inside inline tables map to their line."""
    lines: dict[Path_, int] = {(): 1}
    current: Path_ = ()
    counts: dict[Path_, int] = {}
    in_multiline = False
    for number, raw in enumerate(text.splitlines(), start=1):
        if in_multiline:
            if raw.count('"""') % 2 == 1 or raw.count("'''") % 2 == 1:
                in_multiline = False
            continue
        header = _TOML_HEADER.match(raw)
        if header:
            parts = tuple(_toml_key_parts(header.group(2)))
            if header.group(1) == "[[":
                index = counts.get(parts, 0)
                counts[parts] = index + 1
                current = (*parts, index)
                lines.setdefault(parts, number)
            else:
                current = parts
            for end in range(1, len(current) + 1):
                lines.setdefault(current[:end], number)
            continue
        key = _TOML_KEY.match(raw)
        if key:
            path = (*current, *_toml_key_parts(key.group(1)))
            for end in range(len(current) + 1, len(path) + 1):
                lines.setdefault(path[:end], number)
            if raw.count('"""') % 2 == 1 or raw.count("'''") % 2 == 1:
                in_multiline = True
    return lines


def _read_toml(text: str, file: str) -> tuple[Any, dict[Path_, int]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        raise WorkflowError(f"invalid TOML: {exc}", file,
                            int(found.group(1)) if found else None) from None
    return data, _toml_lines(text)


def _describe_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "workflow"


def _from_data(data: Any, lines: dict[Path_, int], file: str) -> WorkflowDef:
    if not isinstance(data, dict):
        raise WorkflowError("a workflow file must hold a mapping (name, states, ...)", file, 1)
    name = data.get("name") if isinstance(data.get("name"), str) else ""
    try:
        defn = WorkflowDef.model_validate({**data, "source": file})
    except ValidationError as exc:
        first = exc.errors()[0]
        # pydantic adds model-validator and alias steps to loc that are not file keys.
        loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and "[" in p))
        probe = WorkflowDef.model_construct(name=name, source=file)
        probe._lines = lines
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        message = first["msg"].removeprefix("Value error, ")
        raise probe.error(loc, f"{_describe_loc(loc)}: {message}{more}") from None
    defn._lines = lines
    return defn


def load_workflow_file(path: Path) -> WorkflowDef:
    """Load and check one YAML (``.yaml``/``.yml``) or TOML (``.toml``) workflow file.

    Raises :class:`WorkflowError` naming the file and line for unreadable files, syntax
    errors, wrong keys or types, and every :func:`check_workflow` problem.
    """
    path = Path(path)
    file = str(path)
    suffix = path.suffix.lower()
    if suffix not in WORKFLOW_FILE_SUFFIXES:
        raise WorkflowError(f"not a workflow file (expected {', '.join(WORKFLOW_FILE_SUFFIXES)})",
                            file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowError(f"cannot read: {exc}", file) from None
    data, lines = _read_toml(text, file) if suffix == ".toml" else _read_yaml(text, file)
    defn = _from_data(data, lines, file)
    check_workflow(defn)
    return defn


def _files_in(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir()
                      if p.is_file() and p.suffix.lower() in WORKFLOW_FILE_SUFFIXES)
    if path.is_file():
        return [path]
    raise WorkflowError("no such file or folder", str(path))


def load_workflows(sources: Iterable[Path | str | WorkflowDef]) -> dict[str, WorkflowDef]:
    """Load and check every source: a file, a folder (its ``*.yaml``/``*.yml``/``*.toml``,
    sorted by name, not recursive) or a :class:`WorkflowDef`; returns them by name in load
    order. Two definitions with one name raise :class:`WorkflowError` naming both."""
    found: dict[str, WorkflowDef] = {}
    for source in sources:
        if isinstance(source, WorkflowDef):
            check_workflow(source)
            defs = [source]
        else:
            defs = [load_workflow_file(p) for p in _files_in(Path(source))]
        for defn in defs:
            if defn.name in found:
                first = found[defn.name].source or f"<workflow {defn.name}>"
                raise defn.error(("name",), f"workflow {defn.name!r} is already defined in "
                                 f"{first}")
            found[defn.name] = defn
    return found
