"""``commhub up`` as a real process: start, stop, crash, restart, second instance."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from hubproc import HubProcess, pid_alive, wait_dead
from wschat import Chat

pytestmark = pytest.mark.timeout(240)


def sql_json(hub: HubProcess, query: str) -> list[dict]:
    result = hub.run("sql", query, "--format", "json")
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def test_sigterm_stops_everything_it_started(hub_process: HubProcess) -> None:
    """SIGTERM exits 0, stops the embedded nats-server and releases the data directory."""
    hub_process.start()
    server_pid = hub_process.nats_server_pid()
    assert pid_alive(server_pid)
    assert hub_process.terminate() == 0
    assert wait_dead(server_pid)
    assert not (hub_process.data_dir / "hub_process.json").exists()
    assert "commhub is up" in hub_process.output() and "commhub stopped" in hub_process.output()


def test_second_hub_on_the_same_data_dir_is_refused(hub_process: HubProcess) -> None:
    """A second `commhub up` on a data directory in use says so and exits 1."""
    hub_process.start()
    second = hub_process.run("up", timeout=60)
    assert second.returncode == 1
    assert "already running" in second.stderr
    assert str(hub_process.process.pid) in second.stderr  # type: ignore[union-attr]
    hub_process.terminate()


async def test_sigkill_mid_conversation_resumes_where_it_was(hub_process: HubProcess) -> None:
    """After SIGKILL and restart the conversation continues from its state, the client
    misses no reply, and the records hold every message exactly once."""
    hub_process.start()
    chat = await Chat.open(hub_process.ws_port, "crash1", user="ann")
    first = await chat.say("I'd like to book a table")
    second = await chat.say("4")
    cursor = chat.cursor
    seen = list(chat.messages)
    server_pid = hub_process.nats_server_pid()

    hub_process.kill()
    # The embedded server must not outlive the hub (it holds the port and the store).
    assert wait_dead(server_pid), "nats-server outlived its hub"
    await chat.close()

    hub_process.start()
    chat = await Chat.open(hub_process.ws_port, "crash1", user="ann", after=cursor)
    third = await chat.say("tomorrow")
    assert third["cursor"] > second["cursor"] > first["cursor"]
    for answer in ("19:30", "Ann", "ann@example.com"):
        await chat.say(answer)
    final = await chat.say(payload={"value": "yes"})
    assert final["text"]
    seen += chat.messages
    await chat.close()
    seen_ids = [m["id"] for m in seen]
    assert len(seen_ids) == len(set(seen_ids)), "the client saw a reply twice"

    # Live, over the bus: wait (bounded) until the recorder has caught up on all seven
    # user messages, including those the killed hub had not yet committed.
    deadline = time.monotonic() + 60
    while True:
        live = sql_json(hub_process, "SELECT count(*) AS n FROM messages "
                        "WHERE conversation = 'crash1' AND direction = 'in'")
        if live[0]["n"] == 7 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert live[0]["n"] == 7
    assert hub_process.terminate() == 0

    # Stopped: the same question answered from the file, with the same answer.
    after = hub_process.run(
        "sql",
        "SELECT direction, count(*) AS n FROM messages WHERE conversation = 'crash1' "
        "GROUP BY direction ORDER BY direction",
        "--format", "json",
    )
    assert after.returncode == 0, after.stderr
    counts = {row["direction"]: row["n"] for row in json.loads(after.stdout)}
    assert counts["in"] == 7  # seven user messages, each once
    recorded = hub_process.run("sql", "SELECT id FROM messages WHERE conversation = 'crash1' "
                       "AND direction = 'out'", "--format", "json")
    # Every reply the router produced was delivered to the client exactly once, and
    # recorded exactly once: the same set on both sides.
    assert sorted(row["id"] for row in json.loads(recorded.stdout)) == sorted(seen_ids)
    events = hub_process.run(
        "sql",
        "SELECT kind FROM workflow_events WHERE conversation = 'crash1' "
        "AND kind IN ('started', 'completed') ORDER BY ts",
        "--format", "json",
    )
    assert [row["kind"] for row in json.loads(events.stdout)] == ["started", "completed"]
    # No step ran twice: each of the six transitions of the booking is recorded once.
    steps = hub_process.run(
        "sql",
        "SELECT count(*) AS n, count(DISTINCT from_state || '>' || to_state) AS moves "
        "FROM workflow_events WHERE conversation = 'crash1' AND kind = 'transition'",
        "--format", "json",
    )
    assert json.loads(steps.stdout) == [{"n": 6, "moves": 6}]


async def _stream_message_ids(url: str, prefix: str) -> list[str]:
    """The id of every Message the messages stream holds, read with a throwaway consumer."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from commhub.core.bus import Bus
    from commhub.core.envelope import EnvelopeError, Message, decode_tagged
    from commhub.core.subjects import Subjects

    subjects = Subjects(prefix)
    bus = await Bus.connect(url, subjects)
    try:
        sub = await bus.js.pull_subscribe(
            f"{prefix}.>", stream=subjects.messages_stream,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
        )
        # The restarted router is still answering the burst's inbound messages: read
        # the stream once it stopped growing (1 s without a new record).
        info = await bus.js.stream_info(subjects.messages_stream)
        while True:
            await asyncio.sleep(1)
            later = await bus.js.stream_info(subjects.messages_stream)
            if later.state.last_seq == info.state.last_seq:
                break
            info = later
        ids, seen = [], 0
        while seen < info.state.messages:
            for msg in await sub.fetch(1000, timeout=10):
                seen += 1
                try:
                    record = decode_tagged(msg.data, subjects.record_tag(msg.subject))
                except EnvelopeError:
                    continue
                if isinstance(record, Message):
                    ids.append(record.id)
        await sub.unsubscribe()
        return ids
    finally:
        await bus.close()


async def test_sigkill_during_a_burst_loses_and_doubles_no_record(
    hub_process: HubProcess,
) -> None:
    """SIGKILL while a burst is being published and recorded, then restart: DuckDB holds
    every message the stream holds, exactly once."""
    from commhub.core.bus import Bus
    from commhub.core.envelope import Message, Sender
    from commhub.core.subjects import Subjects

    hub_process.start()
    prefix = hub_process.info["prefix"]
    bus = await Bus.connect(hub_process.nats_url, Subjects(prefix))
    acked = 0
    halfway = asyncio.Event()

    async def burst() -> None:
        # Mostly agent messages (recorded, not routed) and some user messages (routed
        # too, so the router's replies are part of the burst), 100 per pipelined chunk.
        nonlocal acked
        for chunk in range(60):
            records = []
            for i in range(100):
                n = chunk * 100 + i
                direction = "in" if n % 10 == 0 else "out"
                conversation = f"burst-{n % 40}"
                message = Message(
                    id=f"burst-message-{n:05d}", conversation=conversation, channel="sms",
                    direction=direction,  # type: ignore[arg-type]
                    sender=Sender(id=f"u{n % 40}") if direction == "in"
                    else Sender(id="agent-7", kind="agent"),
                    text=f"burst message {n}",
                )
                subject = (bus.subjects.inbound if direction == "in" else bus.subjects.outbound)(
                    "sms", conversation
                )
                records.append((subject, message))
            await bus.publish_all(records)
            acked += len(records)
            if acked >= 2000:
                halfway.set()

    publisher = asyncio.create_task(burst())
    await asyncio.wait_for(halfway.wait(), 120)  # a safety net, not a timing claim
    hub_process.kill()
    publisher.cancel()
    await asyncio.gather(publisher, return_exceptions=True)
    await bus.nc.close()
    assert acked >= 2000

    hub_process.start()
    ids = await _stream_message_ids(hub_process.nats_url, prefix)
    assert len(ids) == len(set(ids)) >= acked
    deadline = time.monotonic() + 120
    while True:
        (count,) = sql_json(hub_process, "SELECT count(*) AS n FROM messages")
        if count["n"] >= len(ids) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    result = hub_process.run("sql", "SELECT id FROM messages ORDER BY id", "--format", "json",
                             "--max-rows", "100000")
    assert result.returncode == 0, result.stderr
    recorded = [row["id"] for row in json.loads(result.stdout)]
    assert len(recorded) == len(set(recorded))  # nothing doubled
    assert set(ids) <= set(recorded)  # nothing lost
    # The router goes on answering the burst after the ids were read: whatever else was
    # recorded is in the stream too.
    assert set(recorded) <= set(await _stream_message_ids(hub_process.nats_url, prefix))
    assert hub_process.terminate() == 0
