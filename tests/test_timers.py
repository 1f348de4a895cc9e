"""Timers: which timers a stored state asks for (a pure function), and the scheduler
publishing them on a fake clock, against the real nats-server's state bucket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fakeclock import FakeClock

from commhub.core.bus import Bus
from commhub.core.envelope import WorkflowInput, decode_as
from commhub.core.routing.state import EXPIRE_EVENT, TIMEOUT_EVENT
from commhub.core.routing.timers import TIMER_SENDER, TimerScheduler, Timing, due_timers

WAIT = 15  # seconds: a guard against hangs, never an assertion about speed
T0 = 1_800_000_000.0


def timing(**fields: Any) -> Timing:
    base: dict[str, Any] = {"workflow": "reminder", "state": "waiting", "run_id": "r1",
                            "updated": T0, "entered": T0}
    return Timing(**{**base, **fields})


# -- due_timers: pure ---------------------------------------------------------------------
def test_an_idle_conversation_asks_for_no_timers() -> None:
    assert due_timers("c1", Timing(updated=T0), 3600) == []
    assert due_timers("c1", timing(run_id=None), 3600) == []


def test_a_state_timeout_is_due_at_its_deadline() -> None:
    ((at, record),) = due_timers("c1", timing(timeout_at=T0 + 30), idle_expiry=0)
    assert at == T0 + 30
    assert (record.conversation, record.event, record.sender) == ("c1", TIMEOUT_EVENT,
                                                                  TIMER_SENDER)
    assert record.data == {"run_id": "r1", "state": "waiting", "entered": T0, "at": T0 + 30}


def test_idle_expiry_is_due_idle_expiry_after_the_last_input() -> None:
    ((at, record),) = due_timers("c1", timing(updated=T0 + 5), idle_expiry=3600)
    assert at == T0 + 3605
    assert record.event == EXPIRE_EVENT and record.data == {"run_id": "r1", "updated": T0 + 5}
    assert due_timers("c1", timing(expires=False), idle_expiry=3600) == []


def test_a_state_with_both_asks_for_both() -> None:
    timers = due_timers("c1", timing(timeout_at=T0 + 30), idle_expiry=3600)
    assert [(at, r.event) for at, r in timers] == [(T0 + 30, TIMEOUT_EVENT),
                                                  (T0 + 3600, EXPIRE_EVENT)]


def test_timer_ids_name_what_the_timer_was_scheduled_for() -> None:
    """The same state gives the same ids (two routers publish one copy); another
    deadline, entry, run or conversation gives another id."""
    def ids(conversation: str = "c1", **fields: Any) -> list[str]:
        state = timing(**{"timeout_at": T0 + 30, **fields})
        return [r.id for _, r in due_timers(conversation, state, 3600)]

    first = ids()
    assert first == ids() and len(set(first)) == 2
    for changed in (ids(timeout_at=T0 + 31), ids(entered=T0 + 1), ids(run_id="r2"),
                    ids(conversation="c2")):
        assert changed[0] != first[0]
    assert ids(updated=T0 + 1)[1] != first[1] and ids(updated=T0 + 1)[0] == first[0]


# -- the scheduler on a fake clock ---------------------------------------------------------
def stored(**fields: Any) -> bytes:
    """A state bucket value, as the router writes it (only the fields timers read)."""
    return json.dumps({"state": {"conversation": "c", **{
        "workflow": "reminder", "state": "waiting", "run_id": "r1", "updated": T0,
        "entered": T0, **fields}}, "outbox": []}).encode()


@asynccontextmanager
async def scheduler(bus: Bus, clock: FakeClock,
                    idle_expiry: float = 0) -> AsyncIterator[TimerScheduler]:
    timers = TimerScheduler(bus, idle_expiry, clock=clock)
    clock.attach(timers)
    await timers.start()
    try:
        yield timers
    finally:
        await timers.stop()


class Inputs:
    """The WorkflowInputs stored on this prefix's ``wf.>`` subjects, as they arrive."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.sub: Any = None

    async def __aenter__(self) -> Inputs:
        self.sub = await self.bus.js.subscribe(self.bus.subjects.all_workflow_input,
                                               ordered_consumer=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.unsubscribe()

    async def next(self) -> WorkflowInput:
        return decode_as((await self.sub.next_msg(timeout=WAIT)).data, WorkflowInput)


async def published(timers: TimerScheduler, count: int) -> None:
    async with asyncio.timeout(WAIT):
        while timers.published < count:
            await asyncio.sleep(0.01)


async def settle() -> None:
    """Let the scheduler's tasks run what is ready (no waiting on time)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_timeout_is_published_once_its_deadline_passes(bus: Bus) -> None:
    kv = await bus.state_bucket()
    clock = FakeClock(T0)
    async with scheduler(bus, clock) as timers, Inputs(bus) as inputs:
        await kv.put("c1", stored(timeout_at=T0 + 30))
        async with asyncio.timeout(WAIT):
            while not timers.pending("c1"):
                await asyncio.sleep(0.01)
        clock.advance(29.9)
        await settle()
        assert (timers.published, timers.pending("c1")) == (0, 1)
        clock.advance(0.2)
        await published(timers, 1)
        record = await inputs.next()
    assert record.event == TIMEOUT_EVENT and record.conversation == "c1"
    assert record.data["at"] == T0 + 30 and record.ts == clock.now  # stamped by the clock
    assert timers.pending("c1") == 0


async def test_a_later_write_replaces_the_earlier_timers(bus: Bus) -> None:
    """A write (by any router) supersedes the conversation's earlier timers; a deleted
    conversation has none."""
    kv = await bus.state_bucket()
    clock = FakeClock(T0)
    async with scheduler(bus, clock) as timers, Inputs(bus) as inputs:
        await kv.put("c1", stored(timeout_at=T0 + 30))
        await kv.put("c1", stored(entered=T0 + 10, timeout_at=T0 + 100))
        await kv.put("c2", stored(timeout_at=T0 + 30))
        await kv.delete("c2")
        await kv.put("marker", stored(timeout_at=T0 + 200))
        async with asyncio.timeout(WAIT):
            while not timers.pending("marker"):
                await asyncio.sleep(0.01)
        clock.advance(50)
        await settle()
        assert timers.published == 0
        clock.advance(1000)
        await published(timers, 2)
        first, second = await inputs.next(), await inputs.next()
    assert (first.conversation, first.data["at"]) == ("c1", T0 + 100)
    assert second.conversation == "marker"


async def test_an_idle_run_expires_after_idle_expiry(bus: Bus) -> None:
    kv = await bus.state_bucket()
    clock = FakeClock(T0)
    async with scheduler(bus, clock, idle_expiry=3600) as timers, Inputs(bus) as inputs:
        await kv.put("c1", stored(updated=T0 + 5))
        async with asyncio.timeout(WAIT):
            while not timers.pending("c1"):
                await asyncio.sleep(0.01)
        clock.advance(3605)
        await published(timers, 1)
        record = await inputs.next()
    assert record.event == EXPIRE_EVENT and record.data == {"run_id": "r1", "updated": T0 + 5}


async def test_timers_due_while_no_scheduler_ran_fire_at_start(bus: Bus) -> None:
    """States written before the scheduler started are read at start; what fell due
    meanwhile is published at once."""
    kv = await bus.state_bucket()
    await kv.put("c1", stored(timeout_at=T0 + 30))
    await kv.put("c2", stored(timeout_at=T0 + 90))
    clock = FakeClock(T0 + 60)
    async with scheduler(bus, clock) as timers, Inputs(bus) as inputs:
        await published(timers, 1)
        record = await inputs.next()
        assert record.conversation == "c1" and timers.pending("c2") == 1
