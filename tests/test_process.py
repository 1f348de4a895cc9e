"""``commhub up`` as a real process: start, stop, crash, restart, second instance."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from hubproc import HubProcess, pid_alive, wait_dead
from wschat import Chat

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def hub(tmp_path: Path):
    process = HubProcess(tmp_path / "data")
    yield process
    if process.process is not None and process.process.poll() is None:
        process.kill()


def sql_json(hub: HubProcess, query: str) -> list[dict]:
    result = hub.run("sql", query, "--format", "json")
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def test_sigterm_stops_everything_it_started(hub: HubProcess) -> None:
    """SIGTERM exits 0, stops the embedded nats-server and releases the data directory."""
    hub.start()
    server_pid = hub.nats_server_pid()
    assert pid_alive(server_pid)
    assert hub.terminate() == 0
    assert wait_dead(server_pid)
    assert not (hub.data_dir / "hub.json").exists()
    assert "commhub is up" in hub.output() and "commhub stopped" in hub.output()


def test_second_hub_on_the_same_data_dir_is_refused(hub: HubProcess) -> None:
    """A second `commhub up` on a data directory in use says so and exits 1."""
    hub.start()
    second = hub.run("up", timeout=60)
    assert second.returncode == 1
    assert "already running" in second.stderr
    assert str(hub.process.pid) in second.stderr  # type: ignore[union-attr]
    hub.terminate()


async def test_sigkill_mid_conversation_resumes_where_it_was(hub: HubProcess) -> None:
    """After SIGKILL and restart the conversation continues from its state, the client
    misses no reply, and the records hold every message exactly once."""
    hub.start()
    chat = await Chat.open(hub.ws_port, "crash1", user="ann")
    first = await chat.say("I'd like to book a table")
    second = await chat.say("4")
    cursor = chat.cursor
    seen = list(chat.messages)
    server_pid = hub.nats_server_pid()

    hub.kill()
    # The embedded server must not outlive the hub (it holds the port and the store).
    assert wait_dead(server_pid), "nats-server outlived its hub"
    await chat.close()

    hub.start()
    chat = await Chat.open(hub.ws_port, "crash1", user="ann", after=cursor)
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
        live = sql_json(hub, "SELECT count(*) AS n FROM messages "
                        "WHERE conversation = 'crash1' AND direction = 'in'")
        if live[0]["n"] == 7 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert live[0]["n"] == 7
    assert hub.terminate() == 0

    # Stopped: the same question answered from the file, with the same answer.
    after = hub.run(
        "sql",
        "SELECT direction, count(*) AS n FROM messages WHERE conversation = 'crash1' "
        "GROUP BY direction ORDER BY direction",
        "--format", "json",
    )
    assert after.returncode == 0, after.stderr
    counts = {row["direction"]: row["n"] for row in json.loads(after.stdout)}
    assert counts["in"] == 7  # seven user messages, each once
    recorded = hub.run("sql", "SELECT id FROM messages WHERE conversation = 'crash1' "
                       "AND direction = 'out'", "--format", "json")
    # Every reply the router produced was delivered to the client exactly once, and
    # recorded exactly once: the same set on both sides.
    assert sorted(row["id"] for row in json.loads(recorded.stdout)) == sorted(seen_ids)
    events = hub.run(
        "sql",
        "SELECT kind FROM workflow_events WHERE conversation = 'crash1' "
        "AND kind IN ('started', 'completed') ORDER BY ts",
        "--format", "json",
    )
    assert [row["kind"] for row in json.loads(events.stdout)] == ["started", "completed"]
