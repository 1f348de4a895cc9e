"""Every field of every envelope record is a DuckDB column, or a documented exclusion.

The envelope (core/envelope.py) and the tables (core/records/schema.py, rows.py) are
written by hand; a field added to a record and forgotten by the recorder would be on
the bus and silently missing from the records (as ``Classification.decision`` once
was). ``rows.RECORDED_AS`` maps each field to its column and ``rows.NOT_RECORDED``
lists the exceptions with the reason; these tests hold the code to both.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pytest
from nats.aio.msg import Msg

from commhub.core.envelope import (
    RECORD_TYPES,
    Alternative,
    ChannelEvent,
    Classification,
    InvalidRecord,
    Message,
    Record,
    Sender,
    WorkflowEvent,
    WorkflowInput,
    encode,
)
from commhub.core.records import schema
from commhub.core.records.rows import NOT_RECORDED, RECORDED_AS, Batch
from commhub.core.subjects import Subjects

DOCS = Path(__file__).resolve().parents[1] / "docs"
SUBJECTS = Subjects("p")
TS = 1_700_000_000.5


def tag_of(record_type: type) -> str:
    return str(msgspec.inspect.type_info(record_type).tag)  # type: ignore[attr-defined]


def field_paths(struct_type: type, prefix: str = "") -> list[str]:
    """Dotted paths of a record's fields; a nested record's fields are its own paths,
    and the path of the nested record itself comes first (it may be stored whole)."""
    paths = []
    for field in msgspec.structs.fields(struct_type):
        path = prefix + field.encode_name
        paths.append(path)
        info = msgspec.inspect.type_info(field.type)
        if isinstance(info, msgspec.inspect.StructType):
            paths += field_paths(info.cls, path + ".")
    return paths


def covered(record_type: type, path: str) -> bool:
    """A path is covered when it, or a record it is nested in, has a column, or when
    every field nested in it is covered."""
    mapped = RECORDED_AS[tag_of(record_type)][1]
    parts = path.split(".")
    if any(".".join(parts[:i]) in mapped for i in range(1, len(parts) + 1)):
        return True
    if path in NOT_RECORDED:
        return True
    nested = [p for p in field_paths(record_type) if p.startswith(path + ".")]
    return bool(nested) and all(covered(record_type, p) for p in nested)


@pytest.mark.parametrize("record_type", RECORD_TYPES, ids=lambda t: t.__name__)
def test_every_field_is_a_column_or_a_documented_exclusion(record_type: type) -> None:
    table, mapped = RECORDED_AS[tag_of(record_type)]
    paths = field_paths(record_type)
    missing = [p for p in paths if not covered(record_type, p)]
    assert not missing, f"{record_type.__name__} fields with no column: {missing}"
    stale = [p for p in mapped if p not in paths]
    assert not stale, f"RECORDED_AS names fields {record_type.__name__} does not have: {stale}"
    con = duckdb.connect()
    try:
        schema.migrate(con)
        columns = {row[0] for row in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]
        ).fetchall()}
    finally:
        con.close()
    assert set(mapped.values()) <= columns, f"{table} lacks {set(mapped.values()) - columns}"


def test_every_exclusion_is_shown_in_records_doc() -> None:
    text = (DOCS / "records.md").read_text()
    section = text[text.index("### Fields that are not recorded"):]
    for path, why in NOT_RECORDED.items():
        assert f"| `{path}` | {why} |" in section, f"docs/records.md does not list {path}"


# One record of each type with a distinct, non-default value in every field.
SENDER = Sender(id="ann", kind="agent", name="Ann")
SAMPLES: list[tuple[str, Record]] = [
    (SUBJECTS.outbound("sms", "c1"), Message(
        id="message-0000000001", conversation="c1", channel="sms", direction="out",
        sender=SENDER, text="hello", payload={"buttons": [{"title": "Yes"}]}, reply_to="m0",
        ts=TS, meta={"cursor": 3})),
    (SUBJECTS.classified("c1"), Classification(
        id="k1", message_id="m1", conversation="c1", text="book", workflow="book_table",
        confidence=0.9, threshold=0.35, alternatives=[Alternative("book_table", 0.9)],
        model="tfidf-x", model_version="7", ts=TS, decision="workflow")),
    (SUBJECTS.workflow_event("book_table", "emitted"), WorkflowEvent(
        id="w1", run_id="r1", conversation="c1", workflow="book_table", kind="emitted",
        from_state="a", to_state="b", trigger="message", slots_changed={"day": "today"},
        message_id="m1", ts=TS, event="table.booked", data={"party": 4})),
    (SUBJECTS.channel_event("sms", "error"), ChannelEvent(
        id="e1", channel="sms", kind="error", connection="conn", conversation="c1",
        user="ann", reason="why", code=4400, ts=TS)),
    (SUBJECTS.workflow_input("c1"), WorkflowInput(
        id="input-0000000001", conversation="c1", event="paid", data={"amount": 3},
        sender=SENDER, ts=TS)),
    (SUBJECTS.invalid, InvalidRecord(
        id="i1", subject="p.in.sms.c1", reason="bad", data="{", source="router", ts=TS)),
]


def stored(value: Any, path: str) -> Any:
    """``value`` as the row holds it: a UTC timestamp for ``ts``, JSON for structured data."""
    if path == "ts":
        return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)
    if isinstance(value, dict | list):
        return msgspec.to_builtins(value)
    return value


def value_at(record: Record, path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize(("subject", "record"), SAMPLES, ids=lambda v: type(v).__name__)
def test_each_recorded_field_lands_in_its_column(subject: str, record: Record) -> None:
    """Written through the recorder's rows, every mapped field's value is in its column."""
    assert all(v is not None for v in msgspec.structs.astuple(record))
    batch = Batch(SUBJECTS)
    reply = "$JS.ACK.p_messages.rec.1.42.42.1700000000000000000.0"
    batch.add(Msg(None, subject=subject, reply=reply, data=encode(record)), "p_messages")  # type: ignore[arg-type]
    assert batch.invalid == 0
    table_name, mapped = RECORDED_AS[tag_of(type(record))]
    (row,) = batch.arrow_tables()[table_name].to_pylist()
    for path, column in mapped.items():
        expected = stored(value_at(record, path), path)
        got = row[column]
        if isinstance(expected, dict | list):
            got = json.loads(got)
        assert got == expected, f"{path} -> {column}"
