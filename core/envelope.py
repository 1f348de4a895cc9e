"""The wire envelope: what travels on the bus, as msgspec Structs encoded to JSON.

Every record type is a tagged Struct (the ``type`` field on the wire), so any consumer
can tell a Message from a WorkflowEvent without knowing the subject. JSON keeps the bus
open to every language; ``commhub schema`` prints the JSON Schema of all of them.

Schema evolution follows msgspec's rules: new fields go at the end with defaults, and an
unknown field is ignored rather than an error (``forbid_unknown_fields`` stays off).

Ids double as ``Nats-Msg-Id`` headers, so a re-published record is dropped by
JetStream's duplicate window. Records derived from another record (a reply to a
message, the classification of a message) take ids derived from their source with
:func:`derived_id`, so re-running a handler on a redelivered message re-publishes the
same ids and JetStream drops the copies.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any, Literal

import msgspec

from commhub.core.subjects import MIN_ID_CHARS, TOKEN_RE, valid_id

__all__ = [
    "Sender",
    "Message",
    "Alternative",
    "Entity",
    "Classification",
    "WorkflowInput",
    "WorkflowEvent",
    "ChannelEvent",
    "InvalidRecord",
    "Record",
    "RECORD_TYPES",
    "new_id",
    "derived_id",
    "now",
    "encode",
    "decode",
    "decode_as",
    "decode_tagged",
    "decode_message",
    "record_problem",
    "invalid_id",
    "json_schema",
    "EnvelopeError",
]

SenderKind = Literal["user", "bot", "agent", "service"]
Direction = Literal["in", "out"]


class EnvelopeError(ValueError):
    """Raised when bytes on the bus are not a valid envelope; the message says why."""


def new_id() -> str:
    """A fresh, globally unique id (32 hex characters)."""
    return uuid.uuid4().hex


def derived_id(source_id: str, *parts: object) -> str:
    """A deterministic id for a record derived from ``source_id``.

    The same inputs always give the same id, which is what makes a re-run handler
    idempotent: its outputs carry the same ``Nats-Msg-Id`` as the first run's.
    """
    key = "\x1f".join([source_id, *map(str, parts)])
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def now() -> float:
    """Wall-clock time in seconds since the epoch, the unit of every ``ts`` field."""
    return time.time()


class Sender(msgspec.Struct, frozen=True, kw_only=True):
    """Who wrote a message: a person, the bot, a human agent or another service."""

    id: str
    kind: SenderKind = "user"
    name: str | None = None


class Message(msgspec.Struct, tag="message", kw_only=True):
    """A chat message, inbound (user to hub) or outbound (hub to user).

    ``payload`` carries structured content: ``buttons`` and ``quick_replies`` (lists of
    ``{"title", "payload"}``), ``attachments``, or any custom data; a pressed button
    comes back as an inbound message whose payload is the button's payload.
    """

    id: str
    conversation: str
    channel: str
    direction: Direction
    sender: Sender
    text: str | None = None
    payload: dict[str, Any] | None = None
    reply_to: str | None = None
    ts: float = msgspec.field(default_factory=now)
    meta: dict[str, Any] = msgspec.field(default_factory=dict)


class Alternative(msgspec.Struct, frozen=True):
    """One ranked candidate of a classification."""

    workflow: str
    confidence: float


class Entity(msgspec.Struct, frozen=True, kw_only=True):
    """A value found in a message's text: its ``kind`` (``number``, ``date``, ``time``,
    ``email``, or the name of a choice slot's lexicon), the normalised ``value`` (a
    number; ``YYYY-MM-DD``; ``HH:MM``; the address; the choice as the workflow writes
    it), and where it was found: ``text[start:end]`` of the message is ``text``.

    ``alternative`` is the other reading of an ambiguous time ("around 8": ``20:00``,
    alternative ``08:00``), else None.
    """

    kind: str
    value: Any
    text: str
    start: int
    end: int
    alternative: Any = None


ClassificationDecision = Literal["workflow", "fallback", "clarify", "button"]


class Classification(msgspec.Struct, tag="classification", kw_only=True):
    """What the router decided for one inbound message, and how sure it was.

    ``workflow`` is None when no workflow reached ``threshold`` (the fallback ran) or
    when the top two were too close to call. ``decision`` says which: ``workflow``
    (started), ``fallback``, ``clarify`` (the user was asked "Did you mean A or B?"),
    ``button`` (a start button chose it). ``entities`` are the values found in the
    text (see :mod:`commhub.core.engine.entities`), with their spans.
    """

    id: str
    message_id: str
    conversation: str
    text: str | None
    workflow: str | None
    confidence: float
    threshold: float
    alternatives: list[Alternative] = msgspec.field(default_factory=list)
    model: str = ""
    model_version: str = ""
    ts: float = msgspec.field(default_factory=now)
    decision: ClassificationDecision | None = None
    entities: list[Entity] = msgspec.field(default_factory=list)


class WorkflowInput(msgspec.Struct, tag="workflow_input", kw_only=True):
    """An event from a service that advances a conversation's workflow.

    Published on ``{prefix}.wf.{conversation}``; ``event`` names the trigger that the
    workflow's transitions listen for (``on: {event: NAME}``), ``data`` may fill slots.
    """

    id: str
    conversation: str
    event: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    sender: Sender = msgspec.field(default_factory=lambda: Sender(id="service", kind="service"))
    ts: float = msgspec.field(default_factory=now)


WorkflowEventKind = Literal[
    "started", "transition", "completed", "failed", "expired", "cancelled", "emitted",
    "handoff",
]


class WorkflowEvent(msgspec.Struct, tag="workflow_event", kw_only=True):
    """One step of a workflow run: its start, a transition, its end.

    ``kind="emitted"`` is an event a workflow publishes for services (the ``emit``
    action): ``event`` names it and ``data`` carries it, on
    ``{prefix}.evt.workflow.{workflow}.{event}``.
    """

    id: str
    run_id: str
    conversation: str
    workflow: str
    kind: WorkflowEventKind
    from_state: str | None = None
    to_state: str | None = None
    trigger: str | None = None
    slots_changed: dict[str, Any] = msgspec.field(default_factory=dict)
    message_id: str | None = None
    ts: float = msgspec.field(default_factory=now)
    event: str | None = None
    data: dict[str, Any] = msgspec.field(default_factory=dict)


ChannelEventKind = Literal["accepted", "rejected", "closed", "error", "delivery_failed"]


class ChannelEvent(msgspec.Struct, tag="channel_event", kw_only=True):
    """Something that happened to a channel connection: accepted, rejected, closed, error."""

    id: str
    channel: str
    kind: ChannelEventKind
    connection: str | None = None
    conversation: str | None = None
    user: str | None = None
    reason: str | None = None
    code: int | None = None
    ts: float = msgspec.field(default_factory=now)


class InvalidRecord(msgspec.Struct, tag="invalid", kw_only=True):
    """Something a component received and could not accept: the raw data and why.

    Published on ``{prefix}.evt.invalid`` so that a bad publisher is visible on the bus
    and in DuckDB instead of being silently dropped.
    """

    id: str
    subject: str
    reason: str
    data: str
    source: str = ""
    ts: float = msgspec.field(default_factory=now)


Record = Message | Classification | WorkflowInput | WorkflowEvent | ChannelEvent | InvalidRecord
RECORD_TYPES: tuple[type, ...] = (
    Message,
    Classification,
    WorkflowInput,
    WorkflowEvent,
    ChannelEvent,
    InvalidRecord,
)

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Record] = msgspec.json.Decoder(Record)  # type: ignore[arg-type]
_typed_decoders: dict[type, msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t) for t in RECORD_TYPES
}


def encode(record: Record) -> bytes:
    """Encode a record to JSON bytes (with its ``type`` tag)."""
    return _encoder.encode(record)


def _why(exc: BaseException) -> str:
    """A one-line reason for a failed decode, whatever the decoder raised."""
    if isinstance(exc, RecursionError):
        return "nested too deeply to decode"
    if isinstance(exc, msgspec.DecodeError):
        return str(exc)
    return f"cannot be decoded: {type(exc).__name__}: {exc}"


def decode(data: bytes) -> Record:
    """Decode any record by its ``type`` tag; raises :class:`EnvelopeError` with the reason.

    Any failure of the decoder is an EnvelopeError, not only msgspec's DecodeError:
    JSON nested deeper than the decoder's recursion limit raises RecursionError, and
    bytes on the bus are whatever someone published. Callers then treat every bad input
    the same way (report it, skip it) instead of crashing or retrying it forever.
    """
    try:
        return _decoder.decode(data)
    except Exception as exc:
        raise EnvelopeError(_why(exc)) from None


def decode_as(data: bytes, record_type: type[Any]) -> Any:
    """Decode bytes that must be one record type.

    The ``type`` tag may be omitted by publishers that only ever send one kind, which
    keeps hand-written JSON from other languages short; when present it must match.
    """
    try:
        return _typed_decoders[record_type].decode(data)
    except Exception as exc:  # RecursionError, ValueError, ...: see decode()
        raise EnvelopeError(_why(exc)) from None


_TYPES_BY_TAG: dict[str, type] = {
    t.__struct_config__.tag: t for t in RECORD_TYPES  # type: ignore[attr-defined]
}


def decode_tagged(data: bytes, tag: str | None) -> Record:
    """Decode a record that must be of the type ``tag`` names (see
    :meth:`Subjects.record_tag`); the ``type`` field may then be left out. With no
    tag, the record's own ``type`` field decides."""
    if tag is None:
        return decode(data)
    return decode_as(data, _TYPES_BY_TAG[tag])  # type: ignore[no-any-return]


# -- the bus contract ---------------------------------------------------------------------
_BUTTON_LISTS = ("buttons", "quick_replies")


def _shown(value: str) -> str:
    """A value from outside, quoted for a one-line reason and cut short."""
    return repr(value if len(value) <= 40 else value[:40] + "...")


def _buttons_problem(payload: dict[str, Any] | None) -> str | None:
    """Why a message's ``buttons`` or ``quick_replies`` are not the documented shape
    (a list of objects, each with a string ``title`` and, optionally, an object
    ``payload``), or None."""
    if payload is None:
        return None
    for key in _BUTTON_LISTS:
        buttons = payload.get(key)
        if buttons is None:
            continue
        if not isinstance(buttons, list):
            return f"payload.{key} must be a list of buttons"
        for i, button in enumerate(buttons):
            if not (isinstance(button, dict) and isinstance(button.get("title"), str)):
                return f"payload.{key}[{i}] must be an object with a string 'title'"
            if not isinstance(button.get("payload", {}), dict | None):
                return f"payload.{key}[{i}].payload must be an object"
    return None


def record_problem(subject: str, record: Record) -> str | None:
    """Why ``record`` may not travel on ``subject``, or None when it may: the bus contract
    for the subjects that people and services publish on, as one pure function.

    * ``{p}.in.{channel}.{conversation}`` and ``{p}.out.{channel}.{conversation}``: a
      Message whose ``direction`` is the subject's (``in`` or ``out``) and whose
      ``channel`` and ``conversation`` are the subject's tokens;
    * ``{p}.wf.{conversation}``: a WorkflowInput whose ``conversation`` is the subject's;
    * on all three, an ``id`` of :data:`~commhub.core.subjects.MIN_ID_CHARS` to 128
      letters, digits, ``-`` or ``_`` (it is the ``Nats-Msg-Id``: a short one collides
      in the stream's duplicate window), and ``payload.buttons`` /
      ``payload.quick_replies`` of the documented shape.

    Other subjects (``evt``, ``api``, foreign ones) are not checked here: None. The
    router applies this to what it consumes on ``in`` and ``wf``; channels and the
    recorder to what they consume on ``out``. The reason is one line, with values from
    the record quoted and cut short.
    """
    parts = subject.split(".")
    kind = parts[1] if len(parts) > 1 else ""
    if kind in ("in", "out"):
        if len(parts) != 4:
            return f"{kind!r} subjects are {{prefix}}.{kind}.{{channel}}.{{conversation}}"
        if not isinstance(record, Message):
            return f"a {type(record).__name__} on a message subject"
        if record.direction != kind:
            return f"direction {record.direction!r} on an {kind!r} subject"
        if record.channel != parts[2]:
            return f"channel {_shown(record.channel)} does not match the subject's {parts[2]!r}"
    elif kind == "wf":
        if len(parts) != 3:
            return "'wf' subjects are {prefix}.wf.{conversation}"
        if not isinstance(record, WorkflowInput):
            return f"a {type(record).__name__} on a workflow input subject"
    else:
        return None
    if record.conversation != parts[-1]:
        return (f"conversation {_shown(record.conversation)} does not match the subject's "
                f"{parts[-1]!r}")
    if not valid_id(record.id):
        return (f"id {_shown(record.id)} is not {MIN_ID_CHARS}-128 letters, digits, '-' or "
                "'_' (it is the Nats-Msg-Id: use a UUID)")
    if isinstance(record, Message):
        return _buttons_problem(record.payload)
    return None


def decode_message(subject: str, data: bytes) -> Message:
    """Decode a Message consumed on ``subject`` and check it with :func:`record_problem`.

    Raises :class:`EnvelopeError` with the reason for bytes that are not a Message and
    for a Message that may not travel on ``subject``. Pure; for channels that deliver
    ``out`` messages, so that every channel refuses the same records for the same
    reasons.
    """
    message: Message = decode_as(data, Message)
    problem = record_problem(subject, message)
    if problem is not None:
        raise EnvelopeError(problem)
    return message


def invalid_id(stream: str, sequence: int) -> str:
    """The id of the InvalidRecord for the record at ``sequence`` of ``stream``.

    Everyone who refuses that record (the recorder, each channel process, each
    WebSocket connection replaying it) reports it under this one id, so JetStream's
    duplicate window keeps one report on ``evt.invalid`` and DuckDB one row.
    """
    return derived_id("invalid", stream, sequence)


_TOKEN_SCHEMA: dict[str, Any] = {"type": "string", "pattern": TOKEN_RE.pattern}
_ID_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": MIN_ID_CHARS,
    "maxLength": 128,
    "pattern": f"^[A-Za-z0-9_-]{{{MIN_ID_CHARS},128}}$",
    "description": "Unique (a UUID): it is the Nats-Msg-Id.",
}
_BUTTON_SCHEMA: dict[str, Any] = {
    "title": "Button",
    "description": "A button of a message's payload; pressing it sends its payload back.",
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "payload": {"anyOf": [{"type": "object"}, {"type": "null"}]},
    },
    "required": ["title"],
}


def json_schema() -> dict[str, Any]:
    """The JSON Schema of every record type, as ``commhub schema`` prints it.

    msgspec's schema of :data:`Record`, made to say what the hub enforces (the rules of
    :func:`record_problem`: ids of messages and workflow inputs, conversations and a
    message's channel as one subject token, the shape of buttons) and to compile in
    Ajv's default strict mode: no ``discriminator`` (an OpenAPI keyword Ajv knows only
    when asked), no ``$schema`` (the keywords are draft-07's and draft 2020-12's alike),
    and ``type`` optional, as it is on the wire (the subject names the record type).
    """
    schema: dict[str, Any] = msgspec.json.schema(Record)  # type: ignore[arg-type]
    schema.pop("discriminator", None)
    defs = schema["$defs"]
    for record_type in RECORD_TYPES:
        definition = defs[record_type.__name__]
        definition["required"] = [name for name in definition["required"] if name != "type"]
    for name in ("Message", "WorkflowInput"):
        defs[name]["properties"]["id"] = dict(_ID_SCHEMA)
    for name in ("Message", "WorkflowInput", "Classification", "WorkflowEvent"):
        defs[name]["properties"]["conversation"] = dict(_TOKEN_SCHEMA)
    defs["Message"]["properties"]["channel"] = dict(_TOKEN_SCHEMA)
    defs["ChannelEvent"]["properties"]["conversation"] = {
        "anyOf": [dict(_TOKEN_SCHEMA), {"type": "null"}], "default": None,
    }
    buttons = {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/Button"}},
                         {"type": "null"}]}
    defs["Message"]["properties"]["payload"] = {
        "anyOf": [
            {"type": "object", "properties": {name: dict(buttons) for name in _BUTTON_LISTS}},
            {"type": "null"},
        ],
        "default": None,
    }
    defs["Button"] = _BUTTON_SCHEMA
    return schema
