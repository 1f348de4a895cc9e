"""The recorder's rows: delivered messages turned into Arrow tables, one per DuckDB table.

:class:`Batch` collects the messages of one write: each is decoded with
:func:`commhub.core.envelope.decode_tagged` (the subject names its type), routed by type to
its table (:mod:`commhub.core.records.schema`) and kept as a row, deduplicated on the envelope
id (first copy wins). Bytes that do not decode, and records that decode but cannot be
stored (a ``ts`` outside years 1-9999, a close code too big for its column), become
``invalid_records`` rows (the reason, the subject and the raw data, on a deterministic
id from the stream and sequence), so one bad record never fails its batch. An ``out``
record that breaks the bus contract (:func:`commhub.core.envelope.record_problem`) is
such a row too, with a report for ``evt.invalid`` in :attr:`Batch.reports`.
:meth:`Batch.arrow_tables` returns the rows as Arrow tables in the schemas below, which
:class:`commhub.core.records.recorder.Recorder` inserts ``BY NAME`` in one transaction.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import msgspec
import pyarrow as pa
from nats.aio.msg import Msg

from commhub.core.envelope import (
    ChannelEvent,
    Classification,
    EnvelopeError,
    InvalidRecord,
    Message,
    Record,
    WorkflowEvent,
    WorkflowInput,
    decode_tagged,
    invalid_id,
    record_problem,
)
from commhub.core.subjects import Subjects

__all__ = ["MAX_INVALID_DATA", "NOT_RECORDED", "RECORDED_AS", "Batch", "decision_of",
           "num_delivered", "num_pending", "stream_seq"]

# The recorder's logger: building rows is part of its work.
log = logging.getLogger("commhub.core.records.recorder")

# Raw data kept for an undecodable record.
MAX_INVALID_DATA = 65536

_S = pa.string()
_TS = pa.timestamp("us")

# Arrow schema of each table's batch; inserts are BY NAME, so later columns may be added
# by a migration without touching these (they get their defaults).
_ARROW_SCHEMAS: dict[str, pa.Schema] = {
    "messages": pa.schema(
        [
            ("id", _S),
            ("conversation", _S),
            ("channel", _S),
            ("direction", _S),
            ("sender_id", _S),
            ("sender_kind", _S),
            ("sender_name", _S),
            ("text", _S),
            ("payload", _S),
            ("reply_to", _S),
            ("ts", _TS),
            ("meta", _S),
            ("stream_seq", pa.int64()),
        ]
    ),
    "classifications": pa.schema(
        [
            ("id", _S),
            ("message_id", _S),
            ("conversation", _S),
            ("text", _S),
            ("workflow", _S),
            ("confidence", pa.float64()),
            ("threshold", pa.float64()),
            ("alternatives", _S),
            ("model", _S),
            ("model_version", _S),
            ("ts", _TS),
            ("decision", _S),
            ("entities", _S),
        ]
    ),
    "workflow_events": pa.schema(
        [
            ("id", _S),
            ("run_id", _S),
            ("conversation", _S),
            ("workflow", _S),
            ("kind", _S),
            ("from_state", _S),
            ("to_state", _S),
            ("trigger", _S),
            ("slots_changed", _S),
            ("message_id", _S),
            ("ts", _TS),
            ("event", _S),
            ("data", _S),
        ]
    ),
    "channel_events": pa.schema(
        [
            ("id", _S),
            ("channel", _S),
            ("kind", _S),
            ("connection", _S),
            ("conversation", _S),
            ("user_id", _S),
            ("reason", _S),
            ("code", pa.int32()),
            ("ts", _TS),
        ]
    ),
    "workflow_inputs": pa.schema(
        [
            ("id", _S),
            ("conversation", _S),
            ("event", _S),
            ("data", _S),
            ("sender_id", _S),
            ("sender_kind", _S),
            ("ts", _TS),
            ("sender_name", _S),
        ]
    ),
    "invalid_records": pa.schema(
        [
            ("id", _S),
            ("subject", _S),
            ("reason", _S),
            ("data", _S),
            ("source", _S),
            ("ts", _TS),
        ]
    ),
}

#: Where each envelope field is stored: a record's ``type`` tag -> (its table, {field:
#: column}). A nested record's fields are dotted (``sender.id``); a field holding
#: structured data (a payload, the list of Alternatives) is stored whole, as JSON text in
#: a JSON column. ``tests/test_record_columns.py`` checks that every field of every
#: record is here or in :data:`NOT_RECORDED`, that the column exists, and that a value
#: written lands in it.
RECORDED_AS: dict[str, tuple[str, dict[str, str]]] = {
    "message": ("messages", {
        "id": "id", "conversation": "conversation", "channel": "channel",
        "direction": "direction", "sender.id": "sender_id", "sender.kind": "sender_kind",
        "sender.name": "sender_name", "text": "text", "payload": "payload",
        "reply_to": "reply_to", "ts": "ts", "meta": "meta",
    }),
    "classification": ("classifications", {
        "id": "id", "message_id": "message_id", "conversation": "conversation",
        "text": "text", "workflow": "workflow", "confidence": "confidence",
        "threshold": "threshold", "alternatives": "alternatives", "model": "model",
        "model_version": "model_version", "ts": "ts", "decision": "decision",
        "entities": "entities",
    }),
    "workflow_event": ("workflow_events", {
        "id": "id", "run_id": "run_id", "conversation": "conversation",
        "workflow": "workflow", "kind": "kind", "from_state": "from_state",
        "to_state": "to_state", "trigger": "trigger", "slots_changed": "slots_changed",
        "message_id": "message_id", "ts": "ts", "event": "event", "data": "data",
    }),
    "channel_event": ("channel_events", {
        "id": "id", "channel": "channel", "kind": "kind", "connection": "connection",
        "conversation": "conversation", "user": "user_id", "reason": "reason",
        "code": "code", "ts": "ts",
    }),
    "workflow_input": ("workflow_inputs", {
        "id": "id", "conversation": "conversation", "event": "event", "data": "data",
        "sender.id": "sender_id", "sender.kind": "sender_kind",
        "sender.name": "sender_name", "ts": "ts",
    }),
    "invalid": ("invalid_records", {
        "id": "id", "subject": "subject", "reason": "reason", "data": "data",
        "source": "source", "ts": "ts",
    }),
}

#: Envelope fields that no column holds, and why (``docs/records.md`` lists them).
NOT_RECORDED: dict[str, str] = {
    "type": "the tag of every record: the table a row is in says its type",
}

_json_encode = msgspec.json.Encoder().encode


def _json(value: Any) -> str | None:
    return None if value is None else _json_encode(value).decode()


# TIMESTAMP values from year 1 to 9999, in microseconds since the epoch.
_MIN_MICROS = -62_135_596_800_000_000
_MAX_MICROS = 253_402_300_799_999_999


def _micros(ts: float) -> int:
    if not math.isfinite(ts):
        raise ValueError(f"ts {ts!r} is not a finite number")
    micros = round(ts * 1_000_000)
    if not _MIN_MICROS <= micros <= _MAX_MICROS:
        raise ValueError(f"ts {ts!r} is outside years 1 to 9999")
    return micros


def decision_of(classification: Classification) -> str:
    """The classification's ``decision``; for a record without one (published before the
    router set it), inferred by the rule of
    :data:`commhub.core.records.schema.DECISION_OF_OLD_ROWS`."""
    if classification.decision is not None:
        return classification.decision
    if classification.model == "button":
        return "button"
    if classification.workflow is not None:
        return "workflow"
    return "clarify" if classification.confidence >= classification.threshold else "fallback"


def _ack_field(msg: Msg, plain: int, with_domain: int) -> int | None:
    """One number of ``msg``'s ack subject: token ``plain`` of the 9-token form
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``, or token
    ``with_domain`` of the form with a domain and account hash (11 tokens or more);
    None for anything else (a message not from a JetStream consumer). Cheaper than
    nats-py's full ``msg.metadata`` parse, which cost a third of a batch's write time."""
    tokens = (msg.reply or "").split(".")
    try:
        if len(tokens) == 9:
            return int(tokens[plain])
        if len(tokens) >= 11:
            return int(tokens[with_domain])
    except ValueError:
        pass
    return None


def stream_seq(msg: Msg) -> int | None:
    """The stream sequence of ``msg``, from its ack subject."""
    return _ack_field(msg, 5, 7)


def num_delivered(msg: Msg) -> int | None:
    """How often the consumer delivered ``msg`` (1: the first time), from its ack subject."""
    return _ack_field(msg, 4, 6)


def num_pending(msg: Msg) -> int | None:
    """Records still pending on the consumer after ``msg``, from its ack subject."""
    return _ack_field(msg, 8, 10)


class Batch:
    """Rows of one batch by table, deduplicated on id (first copy wins).

    A record that decodes but cannot be stored (a ``ts`` out of range, a number too big
    for its column) becomes an ``invalid_records`` row too: one poison record must not
    fail its whole batch over and over.
    """

    def __init__(self, subjects: Subjects) -> None:
        self.subjects = subjects
        self.rows: dict[str, dict[str, tuple[Any, ...]]] = {name: {} for name in _ARROW_SCHEMAS}
        self.sources: dict[str, tuple[Msg, str]] = {}
        self.invalid = 0
        #: Reports for ``evt.invalid`` of the ``out`` records refused (the recorder
        #: publishes them after the commit, before the acks).
        self.reports: list[InvalidRecord] = []
        self._outbound_prefix = subjects.all_outbound[:-1]  # "{prefix}.out."

    def add(self, msg: Msg, stream: str) -> None:
        outbound = msg.subject.startswith(self._outbound_prefix)
        try:
            # The subject names the type, so records published without a "type" tag
            # (hand-written JSON from other languages) are recorded like the others.
            record = decode_tagged(msg.data, self.subjects.record_tag(msg.subject))
        except EnvelopeError as exc:
            self._add_invalid(msg, stream, str(exc), report=outbound)
            return
        if outbound:
            # No router stands between an out publisher and the channels: the channels
            # refuse what breaks the bus contract, and so does the record.
            problem = record_problem(msg.subject, record)
            if problem is not None:
                self._add_invalid(msg, stream, problem, report=True)
                return
        try:
            self._add_record(record, msg, stream)
        except Exception as exc:  # whatever it is, it is this record's, not the batch's
            self._add_invalid(msg, stream, f"cannot be recorded: {exc}")

    def _add_invalid(self, msg: Msg, stream: str, reason: str, report: bool = False) -> None:
        """An invalid_records row for ``msg``; with ``report``, also an InvalidRecord in
        :attr:`reports` for ``evt.invalid`` (same id as the row)."""
        meta = msg.metadata
        seq = meta.sequence.stream if meta.sequence else 0
        ts = meta.timestamp.timestamp() if meta.timestamp else time.time()
        id_ = invalid_id(stream, seq)
        data = msg.data[:MAX_INVALID_DATA].decode("utf-8", "replace")
        if id_ not in self.rows["invalid_records"]:
            self.rows["invalid_records"][id_] = (
                id_,
                msg.subject,
                reason,
                data,
                "recorder",
                _micros(ts),
            )
            self.invalid += 1
            if report:
                self.reports.append(InvalidRecord(
                    id=id_, subject=msg.subject, reason=reason, data=data, source="recorder",
                    ts=ts,
                ))

    def _add_record(self, record: Record, msg: Msg, stream: str) -> None:
        match record:
            case Message():
                seq = stream_seq(msg)
                row: tuple[Any, ...] = (
                    record.id,
                    record.conversation,
                    record.channel,
                    record.direction,
                    record.sender.id,
                    record.sender.kind,
                    record.sender.name,
                    record.text,
                    _json(record.payload),
                    record.reply_to,
                    _micros(record.ts),
                    _json(record.meta),
                    seq,
                )
                table = "messages"
            case Classification():
                row = (
                    record.id,
                    record.message_id,
                    record.conversation,
                    record.text,
                    record.workflow,
                    record.confidence,
                    record.threshold,
                    _json(record.alternatives),
                    record.model,
                    record.model_version,
                    _micros(record.ts),
                    decision_of(record),
                    _json(record.entities),
                )
                table = "classifications"
            case WorkflowEvent():
                row = (
                    record.id,
                    record.run_id,
                    record.conversation,
                    record.workflow,
                    record.kind,
                    record.from_state,
                    record.to_state,
                    record.trigger,
                    _json(record.slots_changed),
                    record.message_id,
                    _micros(record.ts),
                    record.event,
                    _json(record.data) if record.data else None,
                )
                table = "workflow_events"
            case ChannelEvent():
                row = (
                    record.id,
                    record.channel,
                    record.kind,
                    record.connection,
                    record.conversation,
                    record.user,
                    record.reason,
                    record.code,
                    _micros(record.ts),
                )
                table = "channel_events"
            case WorkflowInput():
                row = (
                    record.id,
                    record.conversation,
                    record.event,
                    _json(record.data),
                    record.sender.id,
                    record.sender.kind,
                    _micros(record.ts),
                    record.sender.name,
                )
                table = "workflow_inputs"
            case InvalidRecord():
                row = (
                    record.id,
                    record.subject,
                    record.reason,
                    record.data,
                    record.source,
                    _micros(record.ts),
                )
                table = "invalid_records"
            case _:  # pragma: no cover - decode only returns the types above
                return
        if record.id not in self.rows[table]:
            self.rows[table][record.id] = row
            self.sources[record.id] = (msg, stream)

    def touched_keys(self) -> tuple[pa.Table, pa.Table]:
        """The conversations and the workflow run ids this batch's rows belong to.

        Their rows of the derived tables (``conversations``, ``workflow_runs``) are the
        ones to recompute after the batch is inserted.
        """
        conversations = {row[1] for row in self.rows["messages"].values()}
        runs = set()
        for row in self.rows["workflow_events"].values():
            runs.add(row[1])
            conversations.add(row[2])
        return (
            pa.table({"conversation": pa.array(sorted(conversations), type=_S)}),
            pa.table({"run_id": pa.array(sorted(runs), type=_S)}),
        )

    def arrow_tables(self) -> dict[str, pa.Table]:
        """One Arrow table per table with rows; rows Arrow refuses move to invalid_records."""
        tables = {}
        # invalid_records last: the other tables may add rows to it.
        for name in sorted(self.rows, key=lambda n: n == "invalid_records"):
            by_id = self.rows[name]
            if not by_id:
                continue
            try:
                tables[name] = _arrow(name, list(by_id.values()))
            except (pa.ArrowException, ValueError, OverflowError, TypeError):
                tables[name] = self._isolate(name)
        return tables

    def _isolate(self, name: str) -> pa.Table:
        """Convert row by row; the rows that fail become invalid records."""
        good = []
        for id_, row in list(self.rows[name].items()):
            try:
                _arrow(name, [row])
            except (pa.ArrowException, ValueError, OverflowError, TypeError) as exc:
                del self.rows[name][id_]
                msg, stream = self.sources[id_]
                if name == "invalid_records":
                    log.error("recorder: dropping an unstorable invalid record %s: %s", id_, exc)
                    continue
                self._add_invalid(msg, stream, f"cannot be recorded: {exc}")
            else:
                good.append(row)
        return _arrow(name, good)


def _arrow(name: str, rows: list[tuple[Any, ...]]) -> pa.Table:
    schema = _ARROW_SCHEMAS[name]
    columns = list(zip(*rows, strict=True)) or [() for _ in schema]
    return pa.Table.from_arrays(
        [pa.array(column, type=field.type) for column, field in zip(columns, schema, strict=True)],
        schema=schema,
    )
