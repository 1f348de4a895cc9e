"""Workflow definitions: the pydantic model of a workflow and its template functions.

A workflow is a finite state machine with a name, a description, example phrases (they
train the classifier), typed slots, an initial state and named states; each state says
something when entered and lists its transitions, tried in order. The file format is
documented for flow authors in ``docs/workflows.md``.

This module holds the model (:class:`WorkflowDef` and its parts, :class:`WorkflowError`,
the ``{slot}`` template functions). The load-time checks live in
:mod:`commhub.core.engine.check` and the YAML/TOML loader in
:mod:`commhub.core.engine.load`; :mod:`commhub.core.workflow` gathers the public names.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from commhub.core.envelope import Entity

__all__ = [
    "REPLY_OUTCOMES",
    "SLOT_TYPES",
    "WORKFLOW_FILE_SUFFIXES",
    "FILL_SOURCES",
    "AskDef",
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
    "render_template",
    "template_fields",
]

SLOT_TYPES = ("text", "number", "email", "choice", "regex", "date", "time")
# Where a slot's value may come from: the reply to the state that asks for it (typed),
# a pressed button's value there, or an entity found in any message of the run.
FILL_SOURCES = ("answer", "button", "entity")
FillSource = Literal["answer", "button", "entity"]
_DEFAULT_FILL: tuple[FillSource, ...] = ("answer", "button")
# The entity kind that fills a slot of each type unless the slot names another.
_ENTITY_OF_TYPE = {"number": "number", "date": "date", "time": "time", "email": "email"}
# What a ``reply:`` trigger can wait for: ``error`` is any failure, ``timeout`` only a
# service that did not answer in time.
REPLY_OUTCOMES = ("ok", "error", "timeout")
WORKFLOW_FILE_SUFFIXES = (".yaml", ".yml", ".toml")

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
    """A typed value the workflow collects; :meth:`parse` validates an answer into it.

    ``min``/``max``/``integer`` apply to ``number`` (and ``min``/``max`` to ``time``, as
    the hours of the day it accepts), ``choices`` and ``synonyms`` to ``choice``,
    ``pattern`` to ``regex`` (searched in the text; the matched part is the value).

    ``fill`` says where the value may come from: ``answer`` (typed, in reply to a state
    that asks for the slot), ``button`` (pressed there), ``entity`` (an entity of kind
    ``entity`` found in any message of the run, the one that starts it included; by
    default the type's own kind, or the slot's name for a choice). ``confirm`` is a
    template said with Yes/No buttons, instead of passing over the question, when the
    slot was filled from an entity before its question came.
    """

    type: str = "text"
    min: float | None = None
    max: float | None = None
    integer: bool = False
    choices: list[str] | None = None
    synonyms: dict[str, list[str]] = Field(default_factory=dict)
    pattern: str | None = None
    fill: list[FillSource] = Field(default_factory=lambda: list(_DEFAULT_FILL))
    entity: str | None = None
    confirm: str | None = None

    @field_validator("choices", mode="before")
    @classmethod
    def _choices_as_text(cls, value: Any) -> Any:
        return [_as_text(v) for v in value] if isinstance(value, list) else value

    @field_validator("synonyms", mode="before")
    @classmethod
    def _synonyms_as_text(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {_as_text(k): [_as_text(v) for v in vs] if isinstance(vs, list) else vs
                for k, vs in value.items()}

    @field_validator("fill", mode="before")
    @classmethod
    def _fill_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def entity_kind(self, name: str) -> str | None:
        """The entity kind that fills this slot (named ``name``): its ``entity``, else
        its type's (``number``, ``date``, ``time``, ``email``; a choice's own name)."""
        if self.entity is not None:
            return self.entity
        if self.type == "choice":
            return name
        return _ENTITY_OF_TYPE.get(self.type)

    def lexicon(self) -> dict[str, str]:
        """A choice slot's phrases and the choice each stands for: every choice, and
        its synonyms."""
        phrases = {choice: choice for choice in self.choices or ()}
        for choice, words in self.synonyms.items():
            phrases.update({word: choice for word in words})
        return phrases

    def parse(
        self, text: str, entities: Sequence[Entity] | None = None, now: float = 0.0,
        tz: str = "UTC",
    ) -> tuple[bool, Any]:
        """``(True, value)`` when ``text``, a whole answer, is a valid value of this
        slot, else ``(False, None)``; ``entities`` are the text's
        (:func:`commhub.core.engine.entities.extract`), found here when None (relative
        dates then count from ``now`` in ``tz``).

        text: stripped, non-empty. number: the first number entity ("4", "a party of
        four", "twenty one"), within min/max, whole if ``integer``; an int when whole.
        email, date (``YYYY-MM-DD``): the first entity of that kind. time (``HH:MM``):
        the first time entity, read within the min/max hours when it was said without
        am/pm, or a bare hour ("8"). choice: a choice or synonym found in the text, as
        the definition writes the choice. regex: the first match of ``pattern``
        searched in the text (anchor it with ``^...$`` to require the whole text).
        Never raises.
        """
        text = (text or "").strip()
        if not text:
            return False, None
        if self.type == "text":
            return True, text
        if entities is None and self.type != "regex":
            from commhub.core.engine.entities import extract

            lexicon = {"choice": self.lexicon()} if self.type == "choice" else None
            entities = extract(text, now, tz, lexicon)
        entities = entities or []
        if self.type == "regex":
            try:
                matched = re.search(self.pattern or "", text)
            except re.error:
                return False, None
            return (True, matched.group(0)) if matched else (False, None)
        if self.type == "choice":
            typed = text.casefold()
            for phrase, choice in self.lexicon().items():
                if typed == phrase.casefold():
                    return True, choice
        if self.type == "time":
            return self._parse_time(text, entities)
        # A choice takes its values found by any lexicon kind (its own, or a same-named
        # slot's); the other types take the entities of their own kind.
        kind = self.entity_kind("") if self.type != "choice" else None
        for entity in entities:
            if kind is not None and entity.kind != kind:
                continue
            if self.type == "choice" and entity.value not in (self.choices or ()):
                continue
            ok, value = self.accept(entity)
            if ok:
                return True, value
        return False, None

    def accept(self, entity: Entity) -> tuple[bool, Any]:
        """``(True, value)`` when ``entity`` is a valid value of this slot (a number
        within min/max, a time within the hours, a choice of this slot), else
        ``(False, None)``."""
        if self.type == "number":
            return self._number(entity.value)
        if self.type == "time":
            return self._time(entity)
        if self.type == "choice":
            ok = entity.value in (self.choices or ())
            return (True, entity.value) if ok else (False, None)
        return True, entity.value

    def _number(self, value: Any) -> tuple[bool, Any]:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False, None
        number = float(value)
        if self.integer and not number.is_integer():
            return False, None
        if (self.min is not None and number < self.min) or (
            self.max is not None and number > self.max
        ):
            return False, None
        return True, int(number) if number.is_integer() else number

    def _time(self, entity: Entity) -> tuple[bool, Any]:
        """The entity's time, or its other reading (``alternative``) when only that
        one falls within the min/max hours."""
        for reading in (entity.value, entity.alternative):
            if isinstance(reading, str) and self._in_hours(reading):
                return True, reading
        return False, None

    def _in_hours(self, clock: str) -> bool:
        hours, _, minutes = clock.partition(":")
        try:
            at = int(hours) + int(minutes or 0) / 60
        except ValueError:
            return False
        return (self.min is None or at >= self.min) and (self.max is None or at <= self.max)

    def _parse_time(self, text: str, entities: Sequence[Entity]) -> tuple[bool, Any]:
        for entity in entities:
            if entity.kind == "time":
                ok, value = self._time(entity)
                if ok:
                    return True, value
        # A bare hour answering the question ("8"): either half of the day.
        numbers = [e for e in entities if e.kind == "number"]
        if len(numbers) == 1 and numbers[0].text.strip() == text.strip(" .!?"):
            hour = numbers[0].value
            if isinstance(hour, int) and 0 <= hour <= 23:
                bare = Entity(kind="time", value=f"{hour:02d}:00", text=text, start=0,
                              end=len(text),
                              alternative=f"{(hour + 12) % 24:02d}:00" if 1 <= hour <= 12
                              else None)
                return self._time(bare)
        return False, None

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
            return "Please give a date, like tomorrow, next friday or 14/06/2025."
        if self.type == "time":
            lo, hi = _fmt_hour(self.min), _fmt_hour(self.max)
            if lo is not None and hi is not None:
                return f"Please give a time between {lo} and {hi}, like 19:30 or 8pm."
            return "Please give a time, like 19:30 or 8pm."
        return "Sorry, that doesn't look right. Please try again."


def _fmt_hour(value: float | None) -> str | None:
    if value is None:
        return None
    return f"{int(value):02d}:{round((value % 1) * 60):02d}"


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


class AskDef(_Model):
    """Ask a service over NATS request/reply on entering the state.

    ``subject`` is any NATS subject the service listens on; ``data`` (templates, as in
    ``emit``) is the JSON request body; the run waits in the state until the answer or
    ``timeout`` seconds, then a ``reply: ok`` / ``reply: error`` / ``reply: timeout``
    transition fires. Keys of the reply object that are slot names fill those slots.
    """

    subject: str
    data: dict[str, Any] = Field(default_factory=dict)
    timeout: float = Field(default=5.0, gt=0, le=300)


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


TRIGGER_KINDS = ("message", "button", "event", "timeout", "reply")


class TransitionDef(_Model):
    """One way out of a state: exactly one trigger, a target, an optional guard.

    Triggers: ``message`` (``{}``/``any``, or ``{match, slot}``), ``button`` (a value),
    ``event`` (a service event name; its ``data`` keys that are slots fill them),
    ``timeout`` (seconds in this state; the router schedules it), ``reply`` (the
    outcome of the state's ``ask``: ``ok``, ``error`` or ``timeout``).
    """

    message: MessageTrigger | None = None
    button: str | None = None
    event: str | None = None
    timeout: float | None = Field(default=None, gt=0)
    reply: Literal["ok", "error", "timeout"] | None = None
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
        given = [k for k in TRIGGER_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "a transition needs exactly one trigger of message, button, event, timeout, "
                "reply"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def kind(self) -> str:
        """``message``, ``button``, ``event``, ``timeout`` or ``reply``."""
        for kind in TRIGGER_KINDS:
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
    """A state. On entry: ``set`` slots, then ``say`` replies, then ``emit`` events,
    then ``ask`` a service.

    ``final: true`` ends the run on entry. ``reprompt`` replaces the default "Sorry, I
    didn't get that." answer to a message no transition takes. ``handoff: true`` hands
    the conversation to human agents while the run is in this state: the bot does not
    answer the user, and an agent ends it with the service event ``handoff.end``.
    ``expires: false`` keeps a run waiting in this state from idle expiry (for a state
    that waits for a back office for days).
    """

    say: list[SayDef] = Field(default_factory=list)
    set: dict[str, Any] = Field(default_factory=dict)
    emit: list[EmitDef] = Field(default_factory=list)
    on: list[TransitionDef] = Field(default_factory=list)
    final: bool = False
    reprompt: str | None = None
    handoff: bool = False
    ask: AskDef | None = None
    expires: bool = True

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

    def next_timeout(self, elapsed: float) -> float | None:
        """The shortest ``timeout`` longer than ``elapsed`` seconds, or None: what is
        still to come after the timers up to ``elapsed`` fired."""
        later = [t.timeout for t in self.on if t.timeout is not None and t.timeout > elapsed]
        return min(later) if later else None


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
