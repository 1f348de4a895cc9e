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


def decode(data: bytes) -> Record:
    """Decode any record by its ``type`` tag; raises :class:`EnvelopeError` with the reason."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EnvelopeError(str(exc)) from None


def decode_as(data: bytes, record_type: type[Any]) -> Any:
    """Decode bytes that must be one record type.

    The ``type`` tag may be omitted by publishers that only ever send one kind, which
    keeps hand-written JSON from other languages short; when present it must match.
    """
    try:
        return _typed_decoders[record_type].decode(data)
    except msgspec.DecodeError as exc:
        raise EnvelopeError(str(exc)) from None


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


def json_schema() -> dict[str, Any]:
    """The JSON Schema of every record type, as ``commhub schema`` prints it."""
    return msgspec.json.schema(Record)  # type: ignore[arg-type]
