"""Leases in the ``{prefix}_leases`` KV bucket: which process holds each of a group's
slots (a router's partitions, the active recorder), shared fairly among the live
members and taken over when a member dies.

Keys: ``{group}.member.{member}`` (a member's heartbeat) and ``{group}.slot.{slot}``
(the slot's holder). The bucket's TTL (:data:`~commhub.core.streams.LEASE_TTL_SECONDS`,
6 s) ends every entry that is not written again: a member renews its heartbeat and its
slots every third of it. A slot is claimed with a KV *create* (only one process wins)
and renewed with an *update* naming the revision it holds (so a holder that lost it
learns so on its next renewal).

Sharing: each member holds its fair share, ``ceil(slots / live members)``. A member
holding more releases the extra (its ``on_lose(slot, graceful=True)`` runs first, so
the work in hand is finished and acked, then the key is deleted); a member holding fewer
claims free slots. Every member watches the group's keys, so a join, a release or a
clean stop is acted on at once; a dead member's slots are free when its keys expire
(at most the TTL), and are claimed by the next renewal after that.

A member that cannot renew a slot (a revision conflict: someone else holds it; or no
successful renewal for a whole TTL, the bus being away) gives it up at once
(``on_lose(slot, graceful=False)``).

Fencing: two members must never work one slot at once, or a conversation's inputs could
be handled out of order. The server ends a slot's key no earlier than a TTL after the
renewal that last reached it, and that renewal was *sent* no later than it arrived; so
a member counts its lease from the moment it sent its last successful renewal (or
claim) and gives the slot up :data:`FENCE_MARGIN_SECONDS` before that TTL ends. A
watchdog checks this every half second, apart from the renewals, so that a renewal
stuck in a bus outage cannot keep a slot past its end. Another member can only create
the key once it has ended, by then the work here is stopped.

Concurrency: one task per :class:`Leases` (plus its watcher and its watchdog) on the
event loop. A slot's callbacks run one at a time (a lock per slot); after the start,
take-ups and losses run as tasks of their own, so that a slow one never holds up the
renewals of the other slots (their leases would run out, and the watchdog stop them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

from commhub.core.aio import cancel_and_wait
from commhub.core.streams import LEASE_TTL_SECONDS

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from commhub.core.bus import Bus

__all__ = ["Leases", "member_id"]

log = logging.getLogger(__name__)

# A lease is given up this long before the server could end it (see "Fencing" above):
# room for the event loop's lag and for stopping the work in hand.
FENCE_MARGIN_SECONDS = 1.0
FENCE_CHECK_SECONDS = 0.5
# A stop waits this long for take-ups and losses under way before cancelling them.
STOP_WAIT_SECONDS = 10.0

Gain = Callable[[str], Awaitable[None]]
Lose = Callable[[str, bool], Awaitable[None]]


def member_id() -> str:
    """A name for this process: host, pid and a random part (unique across restarts)."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{host[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


class Leases:
    """Holds a fair share of ``slots`` of ``group``; see the module docstring."""

    def __init__(
        self,
        bus: Bus,
        group: str,
        slots: Sequence[str],
        on_gain: Gain,
        on_lose: Lose,
        *,
        member: str | None = None,
        ttl: float = LEASE_TTL_SECONDS,
        greedy: bool = False,
    ) -> None:
        self.bus = bus
        self.group = group
        self.slots = list(slots)
        self.member = member or member_id()
        self.ttl = ttl
        self.greedy = greedy  # claim every free slot (a standby waiting for the one)
        self.held: dict[str, int] = {}  # slot -> revision of our lease
        self._renewed: dict[str, float] = {}
        self._on_gain = on_gain
        self._on_lose = on_lose
        self._members: dict[str, float] = {}  # member -> when its heartbeat was seen
        self._holders: dict[str, tuple[str, float]] = {}  # slot -> (member, seen at)
        self._kv: KeyValue | None = None
        self._watcher: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._failing = False
        self._starting = False
        # Callbacks of one slot run one at a time (a gain, then a loss); different
        # slots' callbacks may overlap, and none of them holds up the renewals.
        self._slot_locks: dict[str, asyncio.Lock] = {}
        self._callbacks: set[asyncio.Task[None]] = set()  # take-ups and losses under way
        self.changes = 0  # slots gained or lost (tests and metrics)

    # -- keys ---------------------------------------------------------------------------
    def _member_key(self, member: str) -> str:
        return f"{self.group}.member.{member}"

    def _slot_key(self, slot: str) -> str:
        return f"{self.group}.slot.{slot}"

    @property
    def members(self) -> int:
        """Live members as last seen (this one included)."""
        now = time.monotonic()
        live = {m for m, at in self._members.items() if now - at <= self.ttl}
        live.add(self.member)
        return len(live)

    @property
    def fair_share(self) -> int:
        return len(self.slots) if self.greedy else math.ceil(len(self.slots) / self.members)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self, settle: float = 0.0) -> None:
        """Join the group and claim slots; with ``settle``, wait up to that long for the
        fair share (others release theirs when they see this member)."""
        self._kv = await self.bus.bucket(self.bus.subjects.leases_bucket)
        self._watcher = await self._kv.watch(f"{self.group}.>", include_history=False)
        self._tasks.append(asyncio.create_task(self._watch(), name=f"leases-{self.group}-watch"))
        self._starting = True
        try:
            await self._renew_and_balance()  # errors here fail the start
        except BaseException:
            await self.stop()
            raise
        finally:
            self._starting = False
        deadline = time.monotonic() + settle
        while len(self.held) < self.fair_share and time.monotonic() < deadline:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(0.5, settle))
            await self._tick()
        self._tasks.append(asyncio.create_task(self._loop(), name=f"leases-{self.group}"))
        self._tasks.append(asyncio.create_task(self._fence(), name=f"leases-{self.group}-fence"))

    async def stop(self) -> None:
        """Release every slot (gracefully: ``on_lose(slot, True)`` first) and leave."""
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks.clear()
        if self._callbacks:  # let take-ups and losses under way end (a loss stops work)
            await asyncio.wait(list(self._callbacks), timeout=STOP_WAIT_SECONDS)
            await cancel_and_wait(*self._callbacks)
        await asyncio.gather(*(self._release(slot) for slot in list(self.held)))
        if self._kv is not None:
            with contextlib.suppress(Exception):
                await self._kv.delete(self._member_key(self.member))
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
            self._watcher = None

    # -- loops --------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.ttl / 3)
            await self._tick()

    async def _watch(self) -> None:
        while True:
            try:
                entry = await self._watcher.updates(timeout=self.ttl)
            except (TimeoutError, nats_timeout()):
                continue
            except Exception as exc:
                log.debug("leases %s: watch: %r", self.group, exc)
                await asyncio.sleep(1)
                continue
            if entry is None:  # the end of the initial values
                continue
            if self._seen(entry.key, entry.value or b"", entry.operation):
                self._wake.set()

    def _seen(self, key: str, value: bytes, operation: Any) -> bool:
        """Note a change; True when it calls for a rebalance now (a member came or
        went, a slot was freed or changed hands), False for a renewal (every member
        renews every few seconds: waking on those would renew in a loop)."""
        now = time.monotonic()
        parts = key.split(".", 2)
        if len(parts) != 3:
            return False
        deleted = operation is not None and str(operation).upper().endswith(("DEL", "PURGE"))
        kind, name = parts[1], parts[2]
        if kind == "member":
            if deleted:
                return self._members.pop(name, None) is not None
            seen = self._members.get(name)
            self._members[name] = now
            return seen is None or now - seen > self.ttl
        if kind == "slot":
            if deleted:
                self._holders.pop(name, None)
                return True
            holder = value.decode(errors="replace")
            before = self._holders.get(name)
            self._holders[name] = (holder, now)
            return before is None or before[0] != holder or now - before[1] > self.ttl
        return False

    async def _tick(self) -> None:
        try:
            await self._renew_and_balance()
        except Exception as exc:  # the bus is away: renewals resume when it is back
            if not self._failing:
                log.warning("leases %s: %r; retrying", self.group, exc)
            self._failing = True  # the watchdog gives up what goes stale meanwhile
        else:
            self._failing = False

    async def _renew_and_balance(self) -> None:
        assert self._kv is not None
        await self._kv.put(self._member_key(self.member), self.member.encode())
        self._members[self.member] = time.monotonic()
        for slot, revision in list(self.held.items()):
            sent = time.monotonic()  # the lease runs from here (see "Fencing")
            try:
                renewed = await self._kv.update(
                    self._slot_key(slot), self.member.encode(), last=revision)
            except (KeyWrongLastSequenceError, NotFoundError):
                if self.held.pop(slot, None) is None:
                    continue  # the watchdog gave it up meanwhile
                log.warning("leases %s: lost %s (another member holds it now)",
                            self.group, slot)
                self.changes += 1
                self._in_background(self._lose(slot, False), slot)
                continue
            if slot in self.held:  # not given up by the watchdog while renewing
                self.held[slot] = renewed
                self._renewed[slot] = sent
        fair = self.fair_share
        if len(self.held) > fair:
            extra = sorted(self.held, key=self.slots.index)[fair:]
            await asyncio.gather(*(self._release(slot) for slot in extra))
        if len(self.held) >= fair:
            return
        now = time.monotonic()
        for slot in self._claim_order():
            if len(self.held) >= fair:
                break
            holder = self._holders.get(slot)
            if holder is not None and holder[0] != self.member and now - holder[1] <= self.ttl:
                continue  # held by a live member, as far as the watch says
            sent = time.monotonic()
            try:
                revision = await self._kv.create(self._slot_key(slot), self.member.encode())
            except KeyWrongLastSequenceError:
                continue  # someone holds it
            self.held[slot] = revision
            self._renewed[slot] = sent
            self.changes += 1
            log.info("leases %s: %s holds %s", self.group, self.member, slot)
            if self._starting:
                await self._take_up(slot)  # its error fails the start (a broken file)
            else:
                # Apart from the renewals: a take-up can wait seconds on a stream that
                # elects its leader, and the other slots' leases must not run out
                # meanwhile (the watchdog would stop their work).
                self._in_background(self._take_up(slot), slot)

    async def _take_up(self, slot: str) -> None:
        try:
            await self._gain(slot)
        except Exception:
            if slot in self.held:
                await self._release(slot, graceful=False)
            if self._starting:
                raise
            log.exception("leases %s: could not take up %s; released it", self.group, slot)

    def _in_background(self, callback: Coroutine[Any, Any, None], slot: str) -> None:
        """Run a take-up or a loss of ``slot`` as a task of its own; its failure is
        logged (the slot was given up either way)."""
        task = asyncio.create_task(callback, name=f"leases-{self.group}-{slot}")
        self._callbacks.add(task)

        def ended(task: asyncio.Task[None]) -> None:
            self._callbacks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("leases %s: stopping or starting the work of %s failed: %r",
                          self.group, slot, task.exception())

        task.add_done_callback(ended)

    def _claim_order(self) -> list[str]:
        """Free slots, starting at a place that differs by member (less contention)."""
        free = [s for s in self.slots if s not in self.held]
        if not free:
            return []
        start = int.from_bytes(self.member.encode()[-4:], "big") % len(free)
        return free[start:] + free[:start]

    async def _release(self, slot: str, graceful: bool = True) -> None:
        revision = self.held.pop(slot, None)
        self.changes += 1
        await self._lose(slot, graceful)
        if revision is not None and self._kv is not None:
            with contextlib.suppress(Exception):
                await self._kv.delete(self._slot_key(slot), last=revision)
        log.info("leases %s: %s released %s", self.group, self.member, slot)

    def _slot_lock(self, slot: str) -> asyncio.Lock:
        return self._slot_locks.setdefault(slot, asyncio.Lock())

    async def _gain(self, slot: str) -> None:
        async with self._slot_lock(slot):
            await self._on_gain(slot)

    async def _lose(self, slot: str, graceful: bool) -> None:
        async with self._slot_lock(slot):
            await self._on_lose(slot, graceful)

    def lease_left(self, slot: str) -> float:
        """Seconds until this member must have given ``slot`` up (0 if not held)."""
        if slot not in self.held:
            return 0.0
        ends = self._renewed.get(slot, time.monotonic()) + self.ttl - FENCE_MARGIN_SECONDS
        return max(0.0, ends - time.monotonic())

    async def _fence(self) -> None:
        """The watchdog: give up every slot whose lease is about to end (see
        "Fencing"), however long a renewal is stuck."""
        while True:
            await asyncio.sleep(FENCE_CHECK_SECONDS)
            self._drop_stale()

    def _drop_stale(self) -> None:
        """Slots whose lease is about to end unrenewed may be someone else's soon:
        stop their work at once."""
        stale = [slot for slot in self.held if self.lease_left(slot) <= 0]
        if not stale:
            return
        for slot in stale:
            del self.held[slot]
            self.changes += 1
        log.warning("leases %s: could not renew %s for %.0f s; giving them up before "
                    "another member can take them", self.group, ", ".join(stale),
                    self.ttl - FENCE_MARGIN_SECONDS)
        # Each in a task of its own: every stop cancels its steps at once, and none waits
        # for another, nor holds up the watchdog.
        for slot in stale:
            self._in_background(self._lose(slot, False), slot)


def nats_timeout() -> type[Exception]:
    import nats.errors

    return nats.errors.TimeoutError
