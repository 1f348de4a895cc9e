"""Leases act at once on joins, departures and hand-overs, and renew on their regular
tick only: a renewal (their own included) does not wake them."""

from __future__ import annotations

import asyncio

from commhub.core.bus import Bus
from commhub.core.leases import Leases
from commhub.core.streams import LEASE_TTL_SECONDS


async def nothing(*_: object) -> None:
    return None


async def lease_writes(bus: Bus) -> int:
    info = await bus.js.stream_info(f"KV_{bus.subjects.leases_bucket}")
    return int(info.state.last_seq)


async def test_renewals_do_not_wake_the_members_into_writing_again(bus: Bus) -> None:
    members = [Leases(bus, "router", [str(k) for k in range(16)], nothing, nothing,
                      member=name) for name in ("a", "b")]
    for leases in members:
        await leases.start(settle=1.0)
    try:
        before = await lease_writes(bus)
        # Two renewal ticks: each member writes its heartbeat and its 8 slots per tick,
        # about 36 writes in all. Woken by every renewal, they wrote thousands.
        await asyncio.sleep(2 * LEASE_TTL_SECONDS / 3 + 0.5)
        written = await lease_writes(bus) - before
        assert written <= 80, written
        assert sorted(len(m.held) for m in members) == [8, 8]
    finally:
        for leases in members:
            await leases.stop()


def test_a_renewal_is_no_change_but_a_join_a_departure_and_a_hand_over_are() -> None:
    leases = Leases(None, "router", ["0"], nothing, nothing, member="a")  # type: ignore[arg-type]
    assert leases._seen("router.member.b", b"b", None)  # joined
    assert not leases._seen("router.member.b", b"b", None)  # renewed
    assert leases._seen("router.slot.0", b"b", None)  # taken
    assert not leases._seen("router.slot.0", b"b", None)  # renewed
    assert leases._seen("router.slot.0", b"c", None)  # handed over
    assert leases._seen("router.slot.0", b"", "DEL")  # released
    assert leases._seen("router.member.b", b"", "PURGE")  # left
