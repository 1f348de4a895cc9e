"""Leases (core/leases.py) on the real bus: idle members renew on their period only, and a
member that cannot take up a slot at start fails the start and leaves the slot free."""

from __future__ import annotations

import asyncio

import pytest

from commhub.core.bus import Bus
from commhub.core.leases import Leases

SLOTS = [str(k) for k in range(4)]


async def _ignore_gain(slot: str) -> None:
    return None


async def _ignore_lose(slot: str, graceful: bool) -> None:
    return None


async def test_idle_members_do_not_wake_each_other_into_renewing(bus: Bus) -> None:
    """Every renewal is a write every member's watch sees; if seeing one woke a member
    into renewing (and so writing) at once, two idle members would renew in a loop. An
    idle member writes its heartbeat and its slots once per period (a third of the TTL)."""
    first = Leases(bus, "idle", SLOTS, _ignore_gain, _ignore_lose, member="first")
    second = Leases(bus, "idle", SLOTS, _ignore_gain, _ignore_lose, member="second")
    await first.start()
    await second.start(settle=first.ttl)
    try:
        assert sorted([*first.held, *second.held]) == SLOTS
        assert len(first.held) == len(second.held) == 2
        kv = await bus.bucket(bus.subjects.leases_bucket)
        stream = f"KV_{bus.subjects.leases_bucket}"
        before = (await bus.js.stream_info(stream)).state.last_seq
        periods = 2
        await asyncio.sleep(periods * first.ttl / 3)
        writes = (await bus.js.stream_info(stream)).state.last_seq - before
        # Per member and period: one heartbeat and one update per slot held (3), plus a
        # period of slack each; a renewal loop writes hundreds of times as much.
        assert writes <= 2 * 3 * (periods + 1), writes
        assert (await kv.get("idle.member.first")).value == b"first"
    finally:
        await second.stop()
        await first.stop()


async def test_a_member_that_cannot_take_up_its_slot_fails_its_start(bus: Bus) -> None:
    """An error taking up a slot at start (a recorder's file of a newer schema) is the
    start's error, not a silent standby; the slot is free for the next member."""

    class Broken(Exception):
        pass

    async def broken_gain(slot: str) -> None:
        raise Broken(f"cannot take up {slot}")

    broken = Leases(bus, "startfail", ["only"], broken_gain, _ignore_lose, member="broken")
    with pytest.raises(Broken):
        await broken.start()
    assert broken.held == {}
    taken: list[str] = []

    async def gain(slot: str) -> None:
        taken.append(slot)

    healthy = Leases(bus, "startfail", ["only"], gain, _ignore_lose, member="healthy")
    await healthy.start()
    try:
        assert taken == ["only"] and list(healthy.held) == ["only"]
    finally:
        await healthy.stop()


async def test_a_member_whose_renewals_hang_stops_before_another_can_take_its_slot(
    bus: Bus,
) -> None:
    """A node dies under a member's connection and its renewals hang instead of failing.
    Its slot's key ends on the server a TTL after the last renewal, and another member
    takes it then; the stuck member must have stopped working the slot before that, or
    both would handle the same inputs at once."""
    events: list[str] = []

    async def first_lost(slot: str, graceful: bool) -> None:
        events.append(f"first lost {slot}" + ("" if graceful else " at once"))

    async def second_gained(slot: str) -> None:
        events.append(f"second gained {slot}")

    first = Leases(bus, "fence", ["only"], _ignore_gain, first_lost, member="first")
    await first.start()
    second = Leases(bus, "fence", ["only"], second_gained, _ignore_lose, member="second")
    await second.start()
    try:
        assert list(first.held) == ["only"] and not second.held

        async def hang(*args: object, **kwargs: object) -> int:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        assert first._kv is not None  # the member's own handle on the bucket
        first._kv.put = hang  # type: ignore[method-assign]
        first._kv.update = hang  # type: ignore[method-assign]
        for _ in range(200):  # the key ends a TTL after the last renewal: 6 s
            if "second gained only" in events:
                break
            await asyncio.sleep(0.1)
        assert events == ["first lost only at once", "second gained only"]
    finally:
        await second.stop()
        await first.stop()


async def test_a_slow_take_up_does_not_hold_up_the_other_slots_renewals(bus: Bus) -> None:
    """Taking up a slot can wait seconds (a stream electing its leader). Meanwhile the
    member's other slots must go on being renewed, or their leases would run out and
    the watchdog stop their work too."""
    events: list[str] = []
    slow = asyncio.Event()
    done = asyncio.Event()

    async def gain(slot: str) -> None:
        events.append(f"gained {slot}")
        if slot == "b" and slow.is_set():
            await done.wait()

    async def lose(slot: str, graceful: bool) -> None:
        events.append(f"lost {slot}")

    member = Leases(bus, "slow", ["a", "b"], gain, lose, member="only")
    await member.start()
    try:
        assert sorted(member.held) == ["a", "b"]
        slow.set()
        kv = await bus.bucket(bus.subjects.leases_bucket)
        await kv.delete("slow.slot.b")  # b's lease is lost; the member takes it again
        for _ in range(60):  # until b's second take-up is under way
            if events.count("gained b") == 2:
                break
            await asyncio.sleep(0.1)
        assert sorted(events[:2]) == ["gained a", "gained b"]
        assert events[2:] == ["lost b", "gained b"]
        await asyncio.sleep(member.ttl)  # longer than a lease lasts unrenewed
        assert "lost a" not in events and "a" in member.held
    finally:
        done.set()
        await member.stop()
