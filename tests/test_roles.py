"""Scale-out: the same code in roles (channels, routers, recorder) sharing one NATS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from inproc import ws_port
from wschat import Chat

from commhub.core.config import Settings
from commhub.core.hub import Hub
from commhub.core.records.sqlclient import query_over_bus


@pytest.fixture
async def cluster(settings: Settings, tmp_path: Path) -> AsyncIterator[dict[str, Hub]]:
    """One channels hub, two routers sharing the durable consumer, one recorder."""
    hubs: dict[str, Hub] = {}
    for name, role in (("recorder", "recorder"), ("router1", "router"),
                       ("router2", "router"), ("channels", "channels")):
        hub = Hub(settings.model_copy(update={"role": role, "data_dir": tmp_path / name}))
        await hub.start()
        hubs[name] = hub
    yield hubs
    for hub in reversed(hubs.values()):
        await hub.stop()


async def test_roles_split_the_hub_and_two_routers_share_the_work(
    cluster: dict[str, Hub],
) -> None:
    """Conversations through a channels-only hub are answered by two router processes
    sharing one durable, each reply exactly once, and recorded by the recorder role."""
    channels = cluster["channels"]
    assert set(channels.channels) == {"http", "telegram", "websocket"}
    assert channels.router is None
    assert cluster["router1"].channels == {} and cluster["router1"].recorder is None

    async def book(n: int) -> list[dict]:
        chat = await Chat.open(ws_port(channels), f"role{n}", user=f"u{n}")
        for text in ("I'd like to book a table", "2", "tomorrow", "20:00", f"Guest{n}",
                     f"g{n}@example.com"):
            await chat.say(text)
        await chat.say(payload={"value": "yes"})
        await chat.close()
        return chat.messages

    conversations = await asyncio.gather(*(book(n) for n in range(12)))
    for n, messages in enumerate(conversations):
        reply_ids = [m["reply_to"] for m in messages]
        assert len(reply_ids) == len(set(reply_ids)) == 7, f"role{n} got {reply_ids}"
        assert f"g{n}@example.com" in messages[-1]["text"]

    routers = [cluster["router1"].router, cluster["router2"].router]
    assert all(r is not None and r.stats.handled > 0 for r in routers)  # both worked
    assert sum(r.stats.handled for r in routers if r) == 12 * 7

    recorder = cluster["recorder"]
    assert recorder.bus is not None
    sql = "SELECT count(*) FROM messages WHERE conversation LIKE 'role%'"
    async with asyncio.timeout(20):
        while True:
            result = await query_over_bus(recorder.bus.nc, recorder.bus.subjects, sql)
            if result.rows[0][0] == 12 * 14:  # 7 user messages and 7 replies each
                break
            await asyncio.sleep(0.1)
