"""The recorder against a real nats-server and a real DuckDB file."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from commhub.core.bus import Bus
from commhub.core.envelope import (
    Alternative,
    ChannelEvent,
    Classification,
    Entity,
    Message,
    Sender,
    WorkflowEvent,
    WorkflowInput,
)
from commhub.core.records import schema
from commhub.core.records.recorder import Recorder

TS = 1_700_000_000.25  # 2023-11-14 22:13:20.25 UTC
TS_UTC = datetime(2023, 11, 14, 22, 13, 20, 250000)


def message(id_: str, conversation: str = "c1", direction: str = "in", **kw: Any) -> Message:
    sender = Sender(id="u1", name="Ann") if direction == "in" else Sender(id="bot", kind="bot")
    return Message(
        id=id_,
        conversation=conversation,
        channel="ws",
        direction=direction,  # type: ignore[arg-type]
        sender=sender,
        text=f"text of {id_}",
        **{"ts": TS, **kw},
    )


def subject_of(bus: Bus, m: Message) -> str:
    s = bus.subjects
    return (s.inbound if m.direction == "in" else s.outbound)(m.channel, m.conversation)


async def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``check`` until true; the deadline is only a safety net."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def fetch(recorder: Recorder, sql: str) -> list[tuple[Any, ...]]:
    cursor = recorder.connection.cursor()
    try:
        return cursor.execute(sql).fetchall()
    finally:
        cursor.close()


def fetch_dicts(recorder: Recorder, sql: str) -> list[dict[str, Any]]:
    cursor = recorder.connection.cursor()
    try:
        cursor.execute(sql)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        cursor.close()


def count(recorder: Recorder, table: str) -> int:
    return fetch(recorder, f"SELECT count(*) FROM {table}")[0][0]


@pytest.fixture
async def recorder(bus: Bus, db_path: Path) -> AsyncIterator[Recorder]:
    recorder = Recorder(bus, db_path, flush_seconds=0.05)
    await recorder.start()
    yield recorder
    await recorder.stop()


async def test_each_record_type_lands_in_its_table(bus: Bus, recorder: Recorder) -> None:
    """Messages, classifications, workflow and channel events and inputs land with their values."""
    s = bus.subjects
    inbound = message("m-in", payload={"buttons": [{"title": "Yes", "payload": "y"}]})
    outbound = message("m-out-0000000001", direction="out", reply_to="m-in", meta={"cursor": 7})
    await bus.publish_all(
        [
            (subject_of(bus, inbound), inbound),
            (subject_of(bus, outbound), outbound),
            (
                s.classified("c1"),
                Classification(
                    id="k1",
                    message_id="m-in",
                    conversation="c1",
                    text="text of m-in",
                    workflow="booking",
                    confidence=0.82,
                    threshold=0.35,
                    alternatives=[Alternative("booking", 0.82), Alternative("faq", 0.1)],
                    model="tfidf-svm",
                    model_version="3",
                    ts=TS,
                    entities=[Entity(kind="number", value=4, text="four", start=10, end=14)],
                ),
            ),
            (
                s.workflow_event("booking", "transition"),
                WorkflowEvent(
                    id="w1",
                    run_id="r1",
                    conversation="c1",
                    workflow="booking",
                    kind="transition",
                    from_state="ask_date",
                    to_state="confirm",
                    trigger="message",
                    slots_changed={"date": "2024-05-01"},
                    message_id="m-in",
                    ts=TS,
                ),
            ),
            (
                s.workflow_event("booking", "table.booked"),
                WorkflowEvent(
                    id="w2",
                    run_id="r1",
                    conversation="c1",
                    workflow="booking",
                    kind="emitted",
                    event="table.booked",
                    data={"party": 4},
                    ts=TS,
                ),
            ),
            (
                s.channel_event("ws", "rejected"),
                ChannelEvent(
                    id="e1",
                    channel="ws",
                    kind="rejected",
                    connection="conn-1",
                    conversation="c1",
                    user="u1",
                    reason="bad token",
                    code=4401,
                    ts=TS,
                ),
            ),
            (
                s.workflow_input("c1"),
                WorkflowInput(
                    id="i1",
                    conversation="c1",
                    event="payment.done",
                    data={"amount": 12.5},
                    sender=Sender(id="billing", kind="service"),
                    ts=TS,
                ),
            ),
        ]
    )
    await bus.publish_invalid(s.inbound("ws", "c1"), b"{oops", "not JSON", source="ws-channel")
    await wait_until(lambda: recorder.stats.records >= 8, "eight records")

    inbound_row, outbound_row = fetch_dicts(recorder, "SELECT * FROM messages ORDER BY id")
    assert {k: v for k, v in inbound_row.items() if k not in ("payload", "stream_seq")} == {
        "id": "m-in",
        "conversation": "c1",
        "channel": "ws",
        "direction": "in",
        "sender_id": "u1",
        "sender_kind": "user",
        "sender_name": "Ann",
        "text": "text of m-in",
        "reply_to": None,
        "ts": TS_UTC,
        "meta": "{}",
    }
    assert json.loads(inbound_row["payload"]) == {"buttons": [{"title": "Yes", "payload": "y"}]}
    assert inbound_row["stream_seq"] >= 1
    assert outbound_row["direction"] == "out"
    assert (outbound_row["sender_id"], outbound_row["sender_kind"]) == ("bot", "bot")
    assert outbound_row["payload"] is None
    assert outbound_row["reply_to"] == "m-in"
    assert json.loads(outbound_row["meta"]) == {"cursor": 7}

    (classification,) = fetch(recorder, "SELECT * FROM classifications")
    assert classification[:7] == ("k1", "m-in", "c1", "text of m-in", "booking", 0.82, 0.35)
    assert json.loads(classification[7]) == [
        {"workflow": "booking", "confidence": 0.82},
        {"workflow": "faq", "confidence": 0.1},
    ]
    assert classification[8:12] == ("tfidf-svm", "3", TS_UTC, "workflow")  # inferred
    assert json.loads(classification[12]) == [
        {"kind": "number", "value": 4, "text": "four", "start": 10, "end": 14,
         "alternative": None},
    ]

    event, emitted = fetch(recorder, "SELECT * FROM workflow_events ORDER BY id")
    assert event[:8] == (
        "w1",
        "r1",
        "c1",
        "booking",
        "transition",
        "ask_date",
        "confirm",
        "message",
    )
    assert json.loads(event[8]) == {"date": "2024-05-01"}
    assert event[9:] == ("m-in", TS_UTC, None, None)
    assert (emitted[0], emitted[4], emitted[11]) == ("w2", "emitted", "table.booked")
    assert json.loads(emitted[12]) == {"party": 4}

    assert fetch(recorder, "SELECT * FROM channel_events") == [
        ("e1", "ws", "rejected", "conn-1", "c1", "u1", "bad token", 4401, TS_UTC)
    ]
    (winput,) = fetch(recorder, "SELECT * FROM workflow_inputs")
    assert winput[:3] == ("i1", "c1", "payment.done")
    assert json.loads(winput[3]) == {"amount": 12.5}
    assert winput[4:] == ("billing", "service", TS_UTC, None)

    assert fetch(recorder, "SELECT subject, reason, data, source FROM invalid_records") == [
        (s.inbound("ws", "c1"), "not JSON", "{oops", "ws-channel")
    ]
    assert fetch(
        recorder,
        "SELECT conversation, channel, messages, messages_in, messages_out FROM conversations",
    ) == [("c1", "ws", 2, 1, 1)]


async def test_records_without_a_type_tag_are_recorded_by_their_subject(
    bus: Bus, recorder: Recorder
) -> None:
    """Hand-written JSON from another language may leave out "type"; the subject decides."""
    await bus.js.publish(
        bus.subjects.workflow_input("c9"),
        b'{"id": "wi-untagged", "conversation": "c9", "event": "paid"}',
    )
    await bus.js.publish(
        bus.subjects.inbound("sms", "c9"),
        b'{"id": "m-untagged", "conversation": "c9", "channel": "sms", "direction": "in",'
        b' "sender": {"id": "u9"}, "text": "hi"}',
    )
    await wait_until(lambda: count(recorder, "messages") == 1, "the untagged message")
    await wait_until(lambda: count(recorder, "workflow_inputs") == 1, "the untagged input")
    assert fetch(recorder, "SELECT event FROM workflow_inputs") == [("paid",)]
    assert fetch(recorder, "SELECT text, sender_id FROM messages") == [("hi", "u9")]
    assert count(recorder, "invalid_records") == 0


async def test_undecodable_data_is_recorded_and_later_records_still_land(
    bus: Bus, recorder: Recorder
) -> None:
    """Bytes that are not an envelope become invalid_records rows and do not block the stream."""
    subject = bus.subjects.inbound("ws", "c2")
    await bus.js.publish(subject, b"not json at all")
    await bus.js.publish(subject, b'{"type": "message", "id": 42}')
    await bus.publish(subject, message("m-after", conversation="c2"))
    await wait_until(lambda: recorder.stats.records >= 3, "three records")

    assert fetch(recorder, "SELECT id FROM messages") == [("m-after",)]
    invalid = fetch(recorder, "SELECT subject, reason, data, source FROM invalid_records")
    assert sorted((r[0], r[2], r[3]) for r in invalid) == [
        (subject, "not json at all", "recorder"),
        (subject, '{"type": "message", "id": 42}', "recorder"),
    ]
    assert all(r[1] for r in invalid), "every invalid row says why"
    assert recorder.stats.invalid == 2


def deeply_nested_message(n: int, depth: int = 3000) -> bytes:
    """A Message whose payload is JSON nested ``depth`` deep: msgspec's decoder raises
    RecursionError on it, not a DecodeError."""
    head = (f'{{"id": "deep-message-{n:06d}", "conversation": "c1", "channel": "ws", '
            f'"direction": "in", "sender": {{"id": "u1"}}, "payload": ').encode()
    return head + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


async def test_json_nested_past_the_decoder_limit_is_one_invalid_row_each(
    bus: Bus, db_path: Path
) -> None:
    """20 records nested 3,000 deep among 400 valid ones: every valid one lands, each deep
    one is one invalid_records row, and nothing is left pending or unacked (before,
    RecursionError failed the whole batch again and again, also after a restart)."""
    subject = bus.subjects.inbound("ws", "c1")
    valid = [message(f"valid-message-{i:06d}") for i in range(400)]
    for i, m in enumerate(valid):
        if i % 20 == 0:
            await bus.js.publish(subject, deeply_nested_message(i // 20))
        await bus.publish(subject, m)
    recorder = Recorder(bus, db_path, flush_seconds=0.05)
    await recorder.start()  # after publishing: the deep ones share batches with the rest
    try:
        await wait_until(lambda: recorder.stats.records >= 420, "420 records")
        assert count(recorder, "messages") == 400
        reasons = fetch(recorder, "SELECT reason, source FROM invalid_records")
        assert len(reasons) == 20
        assert set(reasons) == {("nested too deeply to decode", "recorder")}
        assert recorder.stats.failures == 0
        await wait_until(lambda: recorder.stats.pending == 0, "nothing pending")
    finally:
        await recorder.stop()
    # Everything was acked: a restarted recorder has nothing to redo.
    stream = bus.subjects.messages_stream
    durable = bus.subjects.recorder_consumer(stream)
    for _ in range(200):  # the server applies acks asynchronously: poll, bounded
        info = await bus.js.consumer_info(stream, durable)
        if info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.02)
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_a_record_that_cannot_be_stored_does_not_poison_its_batch(
    bus: Bus, db_path: Path
) -> None:
    """A valid envelope with an unstorable value becomes an invalid record; its batch commits."""
    far_future = message("m-far", ts=1e20)
    huge_code = ChannelEvent(id="e-huge", channel="ws", kind="error", code=2**40)
    good = message("m-good")
    await bus.publish_all(
        [
            (subject_of(bus, far_future), far_future),
            (bus.subjects.channel_event("ws", "error"), huge_code),
            (subject_of(bus, good), good),
        ]
    )
    recorder = Recorder(bus, db_path, flush_seconds=0.05)
    await recorder.start()  # after publishing: the three share a batch or two
    try:
        await wait_until(lambda: recorder.stats.records >= 3, "three records")
        assert fetch(recorder, "SELECT id FROM messages") == [("m-good",)]
        assert count(recorder, "channel_events") == 0
        reasons = [r[0] for r in fetch(recorder, "SELECT reason FROM invalid_records")]
        assert len(reasons) == 2
        assert all(reason.startswith("cannot be recorded") for reason in reasons)
        assert recorder.stats.failures == 0
    finally:
        await recorder.stop()


async def test_restart_resumes_the_durable_and_writes_nothing_twice(
    bus: Bus, db_path: Path
) -> None:
    """A new recorder on the same file and durable gets only what it missed, once."""
    first = Recorder(bus, db_path, flush_seconds=0.05)
    await first.start()
    batch1 = [message(f"a{i}") for i in range(5)]
    await bus.publish_all([(subject_of(bus, m), m) for m in batch1])
    await wait_until(lambda: first.stats.records >= 5, "the first five")
    await first.stop()
    stream = bus.subjects.messages_stream
    durable = bus.subjects.recorder_consumer(stream)
    for _ in range(200):  # the server applies acks asynchronously: poll, bounded
        info = await bus.js.consumer_info(stream, durable)
        if info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.02)
    assert (info.num_ack_pending, info.num_pending) == (0, 0), "stop left records unacked"

    batch2 = [message(f"b{i}") for i in range(5)]
    await bus.publish_all([(subject_of(bus, m), m) for m in batch2])  # while it is down

    second = Recorder(bus, db_path, flush_seconds=0.05)
    await second.start()
    try:
        # The stats follow the commit (the rows may be visible a moment earlier).
        await wait_until(lambda: second.stats.records >= 5, "the five it missed")
        assert fetch(second, "SELECT count(*), count(DISTINCT id) FROM messages") == [(10, 10)]
        assert second.stats.records == 5, "records acked by the first recorder came back"
    finally:
        await second.stop()


async def _forget_durables(bus: Bus) -> None:
    """Delete the recorder's durables, as a replay of the streams does."""
    for stream in (bus.subjects.messages_stream, bus.subjects.events_stream):
        await bus.js.delete_consumer(stream, bus.subjects.recorder_consumer(stream))


async def test_full_replay_into_the_same_file_is_idempotent(bus: Bus, db_path: Path) -> None:
    """Deleting the durables replays both streams; every row is already there, nothing doubles."""
    first = Recorder(bus, db_path, flush_seconds=0.05)
    await first.start()
    records = [message(f"replayed-message-{i:02d}", direction="in" if i % 2 else "out")
               for i in range(20)]
    await bus.publish_all([(subject_of(bus, m), m) for m in records])
    await bus.publish_invalid(bus.subjects.inbound("ws", "c1"), b"bad", "bad", source="test")
    await bus.js.publish(bus.subjects.inbound("ws", "c1"), b"garbage")
    await wait_until(lambda: first.stats.records >= 22, "22 records")
    await first.stop()

    await _forget_durables(bus)  # the next recorder replays every stream

    second = Recorder(bus, db_path, flush_seconds=0.05)
    await second.start()
    try:
        await wait_until(lambda: second.stats.records >= 22, "the full replay")
        assert second.stats.inserted == 0
        assert count(second, "messages") == 20
        assert count(second, "invalid_records") == 2
    finally:
        await second.stop()


async def test_first_deliveries_already_stored_are_written_once_with_the_new_ones(
    bus: Bus, db_path: Path
) -> None:
    """A recreated durable delivers stored records as first deliveries (delivered once),
    which the recorder inserts without the conflict check: the primary key refuses the
    batch, it is written again with the check, and only the new records become rows."""
    first = Recorder(bus, db_path, flush_seconds=0.05)
    await first.start()
    stored = [message(f"stored-{i:02d}", conversation=f"c{i % 3}") for i in range(10)]
    await bus.publish_all([(subject_of(bus, m), m) for m in stored])
    await wait_until(lambda: first.stats.records >= 10, "10 records")
    await first.stop()
    await _forget_durables(bus)  # the next recorder replays every stream
    fresh = [message(f"fresh-{i:02d}", conversation=f"c{i % 3}") for i in range(5)]
    await bus.publish_all([(subject_of(bus, m), m) for m in fresh])

    second = Recorder(bus, db_path, flush_seconds=0.5)
    await second.start()
    try:
        await wait_until(lambda: second.stats.records >= 15, "the replay and the new records")
        assert second.stats.inserted == 5
        assert count(second, "messages") == 15
        assert fetch(second, "SELECT conversation, messages FROM conversations "
                             "ORDER BY conversation") == [("c0", 6), ("c1", 5), ("c2", 4)]
    finally:
        await second.stop()


async def test_a_failed_write_is_redelivered_and_retried(
    bus: Bus, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When DuckDB refuses a batch nothing is acked; the records come back and land later."""
    recorder = Recorder(bus, db_path, flush_seconds=0.05)
    recorder.retry_delay = (0.05, 0.2)
    real_write = recorder._write
    calls = 0

    def failing_once(pending: Any) -> tuple[int, int, list[Any]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise duckdb.IOException("simulated: disk full")
        return real_write(pending)

    monkeypatch.setattr(recorder, "_write", failing_once)
    records = [message(f"f{i}") for i in range(10)]
    await bus.publish_all([(subject_of(bus, m), m) for m in records])
    await recorder.start()
    try:
        await wait_until(lambda: count(recorder, "messages") == 10, "ten messages after a failure")
        assert recorder.stats.failures == 1
    finally:
        await recorder.stop()


async def test_a_backlog_is_written_in_batches(bus: Bus, recorder: Recorder) -> None:
    """Thousands of records are written in a few large transactions, not one by one."""
    records = [message(f"n{i}", conversation=f"c{i % 50}") for i in range(3000)]
    await bus.publish_all([(subject_of(bus, m), m) for m in records])
    await wait_until(lambda: recorder.stats.records >= 3000, "3000 records", timeout=60)
    assert count(recorder, "messages") == 3000
    assert recorder.stats.batches <= 300
    assert count(recorder, "conversations") == 50


async def test_records_arriving_one_by_one_share_a_transaction(
    bus: Bus, db_path: Path
) -> None:
    """At a low rate records come a few at a time; the recorder gathers them (its fetch
    fills for half of flush_seconds, its writer waits up to flush_seconds) into one
    transaction instead of one per record (each costs DuckDB's CPU that the hub's turns
    wait for), and acks them after that one commit."""
    recorder = Recorder(bus, db_path, flush_seconds=3.0)
    await recorder.start()
    try:
        for i in range(5):  # one by one, each stored before the next is sent
            m = message(f"slow{i}")
            await bus.publish(subject_of(bus, m), m)
        await wait_until(lambda: recorder.stats.records >= 5, "5 records")
        assert count(recorder, "messages") == 5
        assert recorder.stats.batches == 1
    finally:
        await recorder.stop()
    info = await bus.js.consumer_info(bus.subjects.messages_stream,
                                      bus.subjects.recorder_consumer(bus.subjects.messages_stream))
    assert info.num_ack_pending == 0  # acked after the commit


async def test_a_backlog_refreshes_the_derived_rows_once_not_per_batch(
    bus: Bus, db_path: Path
) -> None:
    """Catching up, the recompute of conversations waits for the backlog to drain (or
    refresh_seconds): far fewer recomputes than batches, and the rows are exact after."""
    records = [message(f"b{i}", conversation=f"c{i % 40}") for i in range(1200)]
    await bus.publish_all([(subject_of(bus, m), m) for m in records])
    recorder = Recorder(bus, db_path, batch=100, flush_seconds=0.05, refresh_seconds=3600)
    await recorder.start()
    try:
        await wait_until(lambda: recorder.stats.records >= 1200, "1200 records", timeout=60)
        assert recorder.stats.batches >= 6
        assert recorder.stats.refreshes < recorder.stats.batches / 2
        assert fetch(recorder, "SELECT count(*), min(messages), max(messages) "
                               "FROM conversations") == [(40, 30, 30)]
        assert count(recorder, "recorder_stale") == 0
    finally:
        await recorder.stop()


async def test_stale_derived_rows_left_by_a_crash_are_refreshed_at_start(
    bus: Bus, db_path: Path
) -> None:
    """Keys a recorder listed in recorder_stale and never refreshed (it died) are
    recomputed when the next recorder opens the file."""
    con = duckdb.connect(str(db_path))
    try:
        schema.migrate(con)
        con.execute("INSERT INTO messages (id, conversation, channel, direction, sender_id, "
                    "sender_kind, text, ts) VALUES ('s1', 'c9', 'ws', 'in', 'u1', 'user', "
                    "'hi', TIMESTAMP '2023-11-14 22:13:20')")
        con.execute("INSERT INTO recorder_stale VALUES ('conversation', 'c9')")
    finally:
        con.close()
    recorder = Recorder(bus, db_path)
    await recorder.start()
    try:
        assert fetch(recorder, "SELECT conversation, messages FROM conversations") == [("c9", 1)]
        assert count(recorder, "recorder_stale") == 0
    finally:
        await recorder.stop()


async def test_the_recorder_instance_is_sandboxed(recorder: Recorder) -> None:
    """Cursors of the recorder's instance cannot read files nor unlock the configuration."""
    cursor = recorder.connection.cursor()
    try:
        with pytest.raises(duckdb.PermissionException):
            cursor.execute("SELECT * FROM read_csv('/etc/passwd')")
        with pytest.raises(duckdb.Error, match="locked"):
            cursor.execute("SET enable_external_access = true")
    finally:
        cursor.close()


async def test_the_file_is_written_in_a_format_duckdb_1_reads(bus: Bus, db_path: Path) -> None:
    """The file the recorder creates carries DuckDB 1.0's storage format, which every
    DuckDB since 1.0 opens (the CLI and the libraries people have), not DuckDB 2.0's
    own, which no 1.x release can read. Reopening it keeps that format."""
    for _ in range(2):  # created, then opened again
        recorder = Recorder(bus, db_path, flush_seconds=0.05)
        await recorder.start()
        await recorder.stop()
        con = duckdb.connect(str(db_path), read_only=True)
        try:
            ((tags,),) = con.execute(
                "SELECT tags FROM duckdb_databases() WHERE NOT internal AND path IS NOT NULL"
            ).fetchall()
        finally:
            con.close()
        assert tags["storage_version"].startswith("v1.0.0"), tags


def test_migrate_is_versioned_and_refuses_a_newer_database(tmp_path: Path) -> None:
    """migrate() applies every version once, is a no-op after, and refuses a newer schema."""
    con = duckdb.connect(str(tmp_path / "m.duckdb"))
    try:
        latest = schema.latest_version()
        assert schema.migrate(con) == latest == len(schema.MIGRATIONS)
        assert schema.migrate(con) == latest
        assert con.execute("SELECT version FROM schema_version ORDER BY 1").fetchall() == [
            (v,) for v in range(1, latest + 1)
        ]
        tables = {
            r[0] for r in con.sql("SELECT table_name FROM information_schema.tables").fetchall()
        }
        everything = set(schema.TABLES) | set(schema.DERIVED_TABLES) | set(schema.VIEWS)
        assert everything | {"schema_version"} <= tables
        for view in schema.VIEWS:  # every view runs on an empty database
            con.sql(f"SELECT * FROM {view}").fetchall()
        con.execute("INSERT INTO schema_version VALUES (99, 'from the future', now()::TIMESTAMP)")
        with pytest.raises(schema.SchemaError, match="version 99"):
            schema.migrate(con)
    finally:
        con.close()


def test_a_version_1_database_migrates_and_fills_the_derived_tables(tmp_path: Path) -> None:
    """A file an older commhub left at version 1 gets version 2, with its rows summarized."""
    path = tmp_path / "v1.duckdb"
    con = duckdb.connect(str(path))
    try:
        assert schema.migrate(con, target=1) == 1
        con.execute(
            "INSERT INTO messages (id, conversation, channel, direction, sender_id, sender_kind,"
            " ts) VALUES ('m1', 'c1', 'ws', 'in', 'ann', 'user', '2024-05-01 10:00:00'),"
            " ('m2', 'c1', 'ws', 'out', 'bot', 'bot', '2024-05-01 10:00:02'),"
            " ('m3', 'c2', 'sms', 'in', 'bob', 'user', '2024-05-02 09:00:00')"
        )
        con.execute(
            "INSERT INTO workflow_events (id, run_id, conversation, workflow, kind, from_state,"
            " to_state, ts) VALUES"
            " ('e1', 'r1', 'c1', 'booking', 'started', NULL, 'ask', '2024-05-01 10:00:01'),"
            " ('e2', 'r1', 'c1', 'booking', 'transition', 'ask', 'done', '2024-05-01 10:00:05'),"
            " ('e3', 'r1', 'c1', 'booking', 'completed', 'done', NULL, '2024-05-01 10:00:05')"
        )
    finally:
        con.close()
    con = duckdb.connect(str(path))
    try:
        assert schema.migrate(con, target=2) == 2
        rows = con.execute(
            "SELECT conversation, channel, user_id, messages, messages_in, messages_out, runs,"
            " workflows, last_workflow, outcome FROM conversations ORDER BY 1"
        ).fetchall()
        assert rows == [
            ("c1", "ws", "ann", 2, 1, 1, 1, ["booking"], "booking", "completed"),
            ("c2", "sms", "bob", 1, 1, 0, 0, [], None, "open"),
        ]
        assert con.execute(
            "SELECT run_id, workflow, conversation, started_ts, ended_ts, last_state,"
            " transitions, outcome FROM workflow_runs"
        ).fetchall() == [
            (
                "r1",
                "booking",
                "c1",
                datetime(2024, 5, 1, 10, 0, 1),
                datetime(2024, 5, 1, 10, 0, 5),
                "done",
                1,
                "completed",
            )
        ]
    finally:
        con.close()


def test_a_version_2_database_gets_decisions_and_cancelled_runs(tmp_path: Path) -> None:
    """A file at version 2 gets version 3: its classifications get a decision by the
    documented rule, a run that completed in its own ``cancelled`` final state becomes
    cancelled, and the views count a clarifying question apart from fallbacks."""
    path = tmp_path / "v2.duckdb"
    con = duckdb.connect(str(path))
    try:
        assert schema.migrate(con, target=2) == 2
        con.execute(
            "INSERT INTO classifications (id, message_id, conversation, text, workflow,"
            " confidence, threshold, model, model_version, ts) VALUES"
            " ('k1', 'm1', 'c1', 'book', 'book_table', 0.9, 0.35, 'tfidf', '1', '2024-05-01'),"
            " ('k2', 'm2', 'c2', 'zzz', NULL, 0.2, 0.35, 'tfidf', '1', '2024-05-01'),"
            " ('k3', 'm3', 'c3', 'hmm', NULL, 0.5, 0.35, 'tfidf', '1', '2024-05-01'),"
            " ('k4', 'm4', 'c3', NULL, 'book_table', 1.0, 0.35, 'button', '', '2024-05-01')"
        )
        con.execute(
            "INSERT INTO workflow_events (id, run_id, conversation, workflow, kind, from_state,"
            " to_state, ts) VALUES"
            " ('e1', 'r1', 'c1', 'book_table', 'started', NULL, 'confirm', '2024-05-01 10:00'),"
            " ('e2', 'r1', 'c1', 'book_table', 'completed', NULL, 'cancelled', '2024-05-01 10:01'),"
            " ('e3', 'r2', 'c3', 'book_table', 'started', NULL, 'confirm', '2024-05-01 10:00'),"
            " ('e4', 'r2', 'c3', 'book_table', 'completed', NULL, 'booked', '2024-05-01 10:01')"
        )
        # What the version 2 recorder kept: both runs 'completed'.
        con.execute(schema._V2_REFRESH_RUNS.format(runs="SELECT run_id FROM workflow_events"))
        assert con.execute("SELECT DISTINCT outcome FROM workflow_runs").fetchall() == [
            ("completed",)
        ]
    finally:
        con.close()
    con = duckdb.connect(str(path))
    try:
        assert schema.migrate(con) == schema.latest_version()
        assert con.execute("SELECT id, decision FROM classifications ORDER BY id").fetchall() == [
            ("k1", "workflow"), ("k2", "fallback"), ("k3", "clarify"), ("k4", "button")
        ]
        assert con.execute("SELECT * FROM fallback_rate").fetchall() == [(4, 1, 0.25, 1)]
        assert dict(con.execute("SELECT workflow, classifications FROM intent_mix").fetchall()) == {
            "book_table": 2, "(none)": 1, "(clarify)": 1
        }
        assert con.execute(
            "SELECT run_id, outcome FROM workflow_runs ORDER BY 1"
        ).fetchall() == [("r1", "cancelled"), ("r2", "completed")]
        assert con.execute(
            "SELECT runs, completed, cancelled, completion_rate FROM workflow_completion"
        ).fetchall() == [(2, 1, 1, 0.5)]
        assert con.execute(
            "SELECT conversation, outcome FROM conversations ORDER BY 1"
        ).fetchall() == [("c1", "cancelled"), ("c3", "completed")]
    finally:
        con.close()


def run_event(id_: str, run: str, kind: str, ts: float, **kw: Any) -> WorkflowEvent:
    return WorkflowEvent(
        id=id_, run_id=run, conversation=kw.pop("conversation", "c1"), workflow="booking",
        kind=kind, ts=ts, **kw,  # type: ignore[arg-type]
    )


async def test_conversations_and_runs_stay_exact_under_redelivery(
    bus: Bus, db_path: Path
) -> None:
    """One row per conversation and per run, kept current batch by batch; a full replay of
    the streams into the same file changes none of them."""
    s = bus.subjects
    first = Recorder(bus, db_path, flush_seconds=0.05)
    await first.start()
    await bus.publish_all(
        [
            (subject_of(bus, message("a1", ts=TS)), message("a1", ts=TS)),
            (s.workflow_event("booking", "started"),
             run_event("w1", "r1", "started", TS + 1, to_state="ask")),
        ]
    )
    await wait_until(lambda: first.stats.records >= 2, "the first two records")
    assert fetch(first, "SELECT runs, outcome, messages FROM conversations") == [(1, "open", 1)]
    assert fetch(first, "SELECT outcome, last_state, ended_ts FROM workflow_runs") == [
        ("open", "ask", None)
    ]

    later = [
        (subject_of(bus, message("a2-reply-00000001", direction="out", ts=TS + 2)),
         message("a2-reply-00000001", direction="out", ts=TS + 2)),
        (s.workflow_event("booking", "transition"),
         run_event("w2", "r1", "transition", TS + 3, from_state="ask", to_state="confirm")),
        (s.workflow_event("booking", "cancelled"),
         run_event("w3", "r1", "cancelled", TS + 4, from_state="confirm")),
        (s.workflow_event("booking", "started"),
         run_event("w4", "r2", "started", TS + 4, to_state="ask")),
        (s.workflow_event("booking", "failed"),
         run_event("w5", "r2", "failed", TS + 5, from_state="ask")),
        (s.workflow_event("booking", "started"),
         run_event("w6", "r3", "started", TS + 6, to_state="ask", conversation="c2")),
    ]
    await bus.publish_all(later)
    await wait_until(lambda: first.stats.records >= 8, "all eight records")
    await first.stop()
    for stream in (s.messages_stream, s.events_stream):
        await bus.js.delete_consumer(stream, s.recorder_consumer(stream))

    second = Recorder(bus, db_path, flush_seconds=0.05)
    await second.start()
    try:
        await wait_until(lambda: second.stats.records >= 8, "the replay")
        assert second.stats.inserted == 0
        assert fetch(
            second,
            "SELECT conversation, messages, messages_in, messages_out, runs, workflows,"
            " outcome FROM conversations ORDER BY 1",
        ) == [
            ("c1", 2, 1, 1, 2, ["booking"], "failed"),
            ("c2", 0, 0, 0, 1, ["booking"], "open"),
        ]
        assert fetch(
            second,
            "SELECT run_id, outcome, last_state, transitions FROM workflow_runs ORDER BY 1",
        ) == [
            ("r1", "cancelled", "confirm", 1),
            ("r2", "failed", "ask", 0),
            ("r3", "open", "ask", 0),
        ]
    finally:
        await second.stop()


async def test_conversations_kept_batch_by_batch_match_a_full_recompute(
    bus: Bus, db_path: Path
) -> None:
    """The conversations rows brought up to date batch by batch end exactly as a full
    recompute, across messages older than those stored (a new first message, an
    earlier first inbound one) and conversations with runs but no messages."""
    s = bus.subjects

    def msg(id_: str, conversation: str, direction: str, ts: float, user: str = "u1",
            channel: str = "ws") -> Message:
        sender = Sender(id=user) if direction == "in" else Sender(id="bot", kind="bot")
        return Message(id=f"{id_}-000000000000001", conversation=conversation, channel=channel,
                       direction=direction, sender=sender, text=id_, ts=ts)  # type: ignore[arg-type]

    waves: list[list[tuple[str, Any]]] = [
        [(s.outbound("ws", "c1"), msg("m1", "c1", "out", TS + 10)),
         (s.inbound("ws", "c2"), msg("m2", "c2", "in", TS + 10)),
         (s.workflow_event("booking", "started"),
          run_event("e1", "r1", "started", TS + 11, to_state="ask", conversation="c3"))],
        [(s.inbound("ws", "c1"), msg("m3", "c1", "in", TS + 20, user="late")),
         (s.outbound("ws", "c2"), msg("m4", "c2", "out", TS + 30)),
         (s.workflow_event("booking", "started"),
          run_event("e2", "r2", "started", TS + 21, to_state="ask", conversation="c1"))],
        # Older than what is stored: c1 gets an earlier inbound (its user changes), c2
        # an earlier first message on another channel, c3 its first message.
        [(s.inbound("ws", "c1"), msg("m5", "c1", "in", TS + 15, user="early")),
         (s.inbound("http", "c2"), msg("m6", "c2", "in", TS + 5, user="u2", channel="http")),
         (s.inbound("ws", "c3"), msg("m7", "c3", "in", TS + 12))],
        [(s.outbound("ws", "c1"), msg("m8", "c1", "out", TS + 40)),
         (s.workflow_event("booking", "failed"),
          run_event("e3", "r2", "failed", TS + 41, from_state="ask", conversation="c1"))],
    ]
    recorder = Recorder(bus, db_path, flush_seconds=0.05)
    await recorder.start()
    try:
        done = 0
        for wave in waves:
            await bus.publish_all(wave)
            done += len(wave)
            await wait_until(lambda n=done: recorder.stats.records >= n, f"{done} records")
            await wait_until(lambda: recorder.stats.pending == 0, "nothing pending")
    finally:
        await recorder.stop()

    con = duckdb.connect(str(db_path))
    try:
        kept = con.execute("SELECT * FROM conversations ORDER BY conversation").fetchall()
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM conversations")
        con.execute(schema.REFRESH_CONVERSATIONS.format(
            conversations="SELECT conversation FROM messages "
                          "UNION ALL SELECT conversation FROM workflow_runs"))
        recomputed = con.execute("SELECT * FROM conversations ORDER BY conversation").fetchall()
        con.execute("ROLLBACK")
    finally:
        con.close()
    assert kept == recomputed
    assert [(row[0], row[1], row[2], row[5]) for row in kept] == [
        ("c1", "ws", "early", 4), ("c2", "http", "u2", 3), ("c3", "ws", "u1", 1)]


async def test_catching_up_logs_progress_until_it_caught_up(
    bus: Bus, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While more than a batch is pending, the recorder logs the backlog; then that it caught up."""
    records = [message(f"p{i}") for i in range(600)]
    await bus.publish_all([(subject_of(bus, m), m) for m in records])
    recorder = Recorder(bus, db_path, batch=50, flush_seconds=0.05, progress_seconds=0.05)
    real_write = recorder._write
    gate = threading.Event()

    def held(pending: Any) -> tuple[int, int, list[Any]]:
        gate.wait(30)  # the writer waits until the test saw the recorder behind
        return real_write(pending)

    recorder._write = held  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="commhub.core.records.recorder")
    await recorder.start()
    try:
        await wait_until(
            lambda: any("recorder catching up" in r.getMessage() for r in caplog.records),
            "a catching-up line",
        )
        line = next(r.getMessage() for r in caplog.records if "catching up" in r.getMessage())
        assert "of" in line and "records" in line and "%" in line
        assert recorder.stats.pending > 50
        gate.set()
        await wait_until(
            lambda: any("recorder caught up" in r.getMessage() for r in caplog.records),
            "the caught-up line",
        )
        await wait_until(lambda: recorder.stats.records >= 600, "every record")
        assert count(recorder, "messages") == 600
        assert recorder.stats.pending == 0
    finally:
        gate.set()
        await recorder.stop()


async def test_a_snapshot_is_a_consistent_copy(
    bus: Bus, recorder: Recorder, tmp_path: Path
) -> None:
    """snapshot() writes a file another DuckDB instance opens, holding every committed row."""
    records = [message(f"s{i}") for i in range(30)]
    await bus.publish_all([(subject_of(bus, m), m) for m in records])
    await wait_until(lambda: recorder.stats.records >= 30, "thirty records")
    dest = tmp_path / "snap" / "copy.duckdb"
    await recorder.snapshot(dest)
    con = duckdb.connect(str(dest), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM messages").fetchall() == [(30,)]
        assert con.execute("SELECT messages FROM conversations").fetchall() == [(30,)]
    finally:
        con.close()


def test_every_table_view_and_column_is_documented(tmp_path: Path) -> None:
    """docs/records.md has a section per table and view of the schema, listing every column."""
    docs = (Path(__file__).resolve().parent.parent / "docs" / "records.md").read_text()
    sections = dict(
        (m.group(1), m.group(2))
        for m in re.finditer(r"^### `(\w+)`\n(.*?)(?=^#{2,3} |\Z)", docs, flags=re.M | re.S)
    )
    con = duckdb.connect(str(tmp_path / "doc.duckdb"))
    try:
        schema.migrate(con)
        columns = con.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"
        ).fetchall()
    finally:
        con.close()
    assert {table for table, _ in columns} == {
        *schema.TABLES, *schema.DERIVED_TABLES, *schema.VIEWS, "schema_version",
        "recorder_positions", "recorder_stale",
    }
    missing = [
        f"{table}.{column}"
        for table, column in columns
        if f"| `{column}` |" not in sections.get(table, "")
    ]
    assert not missing, f"undocumented in docs/records.md: {missing}"
