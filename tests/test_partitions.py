"""Many routers: the inputs' partitions are shared by lease, each conversation's inputs
are handled in order by one router at a time, a router that joins gets its share, and
one that dies is taken over; inputs published before any router ran are answered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from inproc import ws_port
from wschat import Chat

from commhub.core.config import Settings
from commhub.core.envelope import Message, Sender
from commhub.core.hub import Hub
from commhub.core.streams import LEASE_TTL_SECONDS

TEXTS = ("I'd like to book a table", "4", "tomorrow", "19:30", "Ann")


async def start(settings: Settings, tmp_path: Path, name: str, role: str) -> Hub:
    hub = Hub(settings.model_copy(update={"role": role, "data_dir": tmp_path / name}))
    await hub.start()
    return hub


@pytest.fixture
async def front(settings: Settings, tmp_path: Path) -> AsyncIterator[Hub]:
    """A channels process; no router yet."""
    hub = await start(settings, tmp_path, "channels", "channels")
    yield hub
    await hub.stop()


async def back_to_back(port: int, conversation: str) -> list[int]:
    """Send the texts without waiting; the cursors of the replies, in send order."""
    chat = await Chat.open(port, conversation, user=conversation)
    try:
        ids = [await chat.send(text) for text in TEXTS]
        replies = [(await chat.replies_to(i, timeout=60))[0] for i in ids]
    finally:
        await chat.close()
    assert "email" in replies[-1]["text"].lower(), replies
    return [int(r["cursor"]) for r in replies]


async def test_two_routers_keep_every_conversations_order(
    front: Hub, settings: Settings, tmp_path: Path
) -> None:
    routers = [await start(settings, tmp_path, f"router{n}", "router") for n in (1, 2)]
    try:
        held = [r.router.held_partitions for r in routers if r.router]
        assert sorted(held[0] + held[1]) == list(range(16)) and len(held[0]) == 8
        port = ws_port(front)
        cursors = await asyncio.gather(*(back_to_back(port, f"order{n}") for n in range(60)))
        out_of_order = [n for n, c in enumerate(cursors) if c != sorted(c)]
        assert out_of_order == []
        assert all(r.router and r.router.stats.handled > 0 for r in routers)
    finally:
        for hub in routers:
            await hub.stop()


async def test_messages_sent_before_any_router_are_answered(
    front: Hub, settings: Settings, tmp_path: Path
) -> None:
    assert front.bus is not None
    s = front.bus.subjects
    for n in range(5):
        await front.bus.publish(s.inbound("websocket", f"early{n}"), Message(
            id=f"early-message-{n:04d}", conversation=f"early{n}", channel="websocket",
            direction="in", sender=Sender(id=f"early{n}"), text="I'd like to book a table"))
    router = await start(settings, tmp_path, "router", "router")
    try:
        for n in range(5):
            chat = await Chat.open(ws_port(front), f"early{n}", user=f"early{n}",
                                   after=0)
            replies = await chat.replies_to(f"early-message-{n:04d}", timeout=30)
            await chat.close()
            assert "how many" in replies[0]["text"].lower()
    finally:
        await router.stop()


async def test_a_router_joining_gets_its_share_and_a_dead_one_is_taken_over(
    front: Hub, settings: Settings, tmp_path: Path
) -> None:
    first = await start(settings, tmp_path, "router1", "router")
    second: Hub | None = None
    try:
        assert first.router is not None
        assert first.router.held_partitions == list(range(16))
        second = await start(settings, tmp_path, "router2", "router")
        assert second.router is not None
        assert len(second.router.held_partitions) == 8
        assert len(first.router.held_partitions) == 8

        # The second dies: no stop, no release (its connection just goes).
        assert second.bus is not None and second.router.leases is not None
        for task in second.router.leases._tasks:
            task.cancel()
        for loop in second.router._loops.values():
            loop._stopping.set()
        await second.bus.nc.close()
        died = time.monotonic()
        port = ws_port(front)
        cursors = await asyncio.gather(*(back_to_back(port, f"takeover{n}") for n in range(20)))
        assert all(c == sorted(c) for c in cursors)
        async with asyncio.timeout(LEASE_TTL_SECONDS + 10):
            while first.router.held_partitions != list(range(16)):
                await asyncio.sleep(0.1)
        assert time.monotonic() - died < LEASE_TTL_SECONDS + 10
    finally:
        if second is not None:
            second.router = None  # its connection is gone: nothing to stop there
            await second.stop()
        await first.stop()
