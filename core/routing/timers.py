"""Timers: state timeouts and idle expiry, published as workflow inputs when due.

Deadlines live in the conversation state in the KV bucket, not in a process:
``timeout_at`` (the current state's next ``timeout`` transition) and ``updated`` (the
last input; a run idle for ``idle_expiry`` seconds expires). Every router runs one
:class:`TimerScheduler`, which watches the whole bucket (the current value of every key
at start, then every write, by any router) and keeps the due times in a heap.

When a timer is due the scheduler publishes a :class:`WorkflowInput` (event
``timeout`` or ``expire``) on ``{prefix}.wf.{conversation}``, so it is handled like any
other input: in order with the conversation's other inputs, committed with the
outbox, recorded. Its id is derived from what it was scheduled for (conversation, run,
state, entry time, due time), so when several routers publish the same timer
JetStream's duplicate window keeps one copy; and the engine ignores a timer whose
state, run or deadline is no longer the conversation's (stale), so a copy that slips
past the window, or a timer that raced a user's answer, changes nothing.

Concurrency: one task reads the watcher, one sleeps until the earliest deadline;
both run on the router's event loop and share the heap without locks. Failure: a
publish that fails is retried a second later; the watcher's ordered consumer
recovers from reconnects by itself. A router that was down publishes the timers that
fell due meanwhile as soon as it has read the bucket again.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Callable

import msgspec

from commhub.core.aio import cancel_and_wait
from commhub.core.bus import Bus
from commhub.core.envelope import Sender, WorkflowInput, derived_id
from commhub.core.routing.state import EXPIRE_EVENT, TIMEOUT_EVENT
from commhub.core.routing.store import StateStore, StateWatch, decode_view

__all__ = ["TIMER_SENDER", "TimerScheduler", "Timing", "due_timers"]

log = logging.getLogger(__name__)

TIMER_SENDER = Sender(id="commhub-timer", kind="service", name="timer")
RETRY_SECONDS = 1.0


class Timing(msgspec.Struct):
    """The part of a conversation's state the scheduler needs (the rest is skipped
    unparsed: see :func:`~commhub.core.routing.store.decode_view`)."""

    workflow: str | None = None
    state: str | None = None
    run_id: str | None = None
    updated: float = 0.0
    entered: float = 0.0
    timeout_at: float | None = None
    expires: bool = True


def due_timers(
    conversation: str, timing: Timing, idle_expiry: float
) -> list[tuple[float, WorkflowInput]]:
    """The timers a stored state asks for, each with its due time and the input that
    will be published for it (with its deterministic id)."""
    if timing.workflow is None or timing.run_id is None:
        return []
    timers: list[tuple[float, WorkflowInput]] = []
    if timing.timeout_at is not None:
        data = {"run_id": timing.run_id, "state": timing.state, "entered": timing.entered,
                "at": timing.timeout_at}
        timers.append((timing.timeout_at, WorkflowInput(
            id=derived_id(conversation, TIMEOUT_EVENT, timing.run_id, timing.state,
                          timing.entered, timing.timeout_at),
            conversation=conversation, event=TIMEOUT_EVENT, data=data, sender=TIMER_SENDER,
        )))
    if idle_expiry > 0 and timing.expires:
        at = timing.updated + idle_expiry
        data = {"run_id": timing.run_id, "updated": timing.updated}
        timers.append((at, WorkflowInput(
            id=derived_id(conversation, EXPIRE_EVENT, timing.run_id, timing.updated),
            conversation=conversation, event=EXPIRE_EVENT, data=data, sender=TIMER_SENDER,
        )))
    return timers


class TimerScheduler:
    """Publishes due state timeouts and idle expiries; see the module docstring.

    ``idle_expiry`` is in seconds (0: runs never expire). ``clock`` gives epoch seconds
    (the deadlines in the bucket are epoch seconds, comparable across machines).
    ``store`` is the state store to watch (the router shares its own).
    """

    def __init__(
        self,
        bus: Bus,
        idle_expiry: float,
        clock: Callable[[], float] = time.time,
        store: StateStore | None = None,
    ) -> None:
        self.bus = bus
        self.store = store or StateStore(bus, cache_size=0)
        self.idle_expiry = idle_expiry
        self.clock = clock
        self.published = 0
        # conversation -> the input ids it currently waits for; heap entries whose id is
        # no longer listed were superseded by a later write and are skipped.
        self._wanted: dict[str, set[str]] = {}
        self._heap: list[tuple[float, int, WorkflowInput]] = []
        self._seq = 0
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._watcher: StateWatch[Timing] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Watch the bucket and start firing; returns once the current states are read."""
        self._watcher = await self.store.watch_all(Timing)
        self._tasks = [
            asyncio.create_task(self._watch(), name="timers-watch"),
            asyncio.create_task(self._fire(), name="timers-fire"),
        ]
        await self._ready.wait()

    async def stop(self) -> None:
        """Stop watching and firing; timers not yet published stay in the bucket's
        states, for this or another router to publish."""
        # Re-cancelled until they end: the KV watcher can swallow one cancel (core/aio.py).
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None

    def check_now(self) -> None:
        """Look at the deadlines again at once, not at the next one the clock said: for
        a clock that jumps (a test's fake clock, a machine resumed from suspend)."""
        self._wake.set()

    def pending(self, conversation: str) -> int:
        """How many timers of ``conversation`` are waiting to be published."""
        return len(self._wanted.get(conversation, ()))

    def note(self, conversation: str, value: bytes | None) -> None:
        """Replace the conversation's timers with those its stored ``value`` asks for."""
        timing = None
        if value:
            try:
                timing = decode_view(value, Timing)
            except msgspec.DecodeError:
                log.warning("state of %s is not readable; no timers for it", conversation)
        self._schedule(conversation, timing)

    def _schedule(self, conversation: str, timing: Timing | None) -> None:
        """Replace the conversation's timers with those ``timing`` asks for (None: the
        state is gone or unreadable, so none)."""
        self._wanted.pop(conversation, None)
        if timing is None:
            return
        timers = due_timers(conversation, timing, self.idle_expiry)
        if not timers:
            return
        self._wanted[conversation] = {record.id for _, record in timers}
        earliest = self._heap[0][0] if self._heap else None
        for at, record in timers:
            self._push(at, record)
        if earliest is None or min(at for at, _ in timers) < earliest:
            self._wake.set()
        if len(self._heap) > 4 * len(self._wanted) + 1024:
            self._compact()

    def _compact(self) -> None:
        # Every write supersedes the conversation's earlier entries, which would
        # otherwise stay in the heap until their (maybe hour-long) due time.
        self._heap = [e for e in self._heap
                      if e[2].id in self._wanted.get(e[2].conversation, ())]
        heapq.heapify(self._heap)

    def _push(self, at: float, record: WorkflowInput) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, record))

    async def _watch(self) -> None:
        assert self._watcher is not None
        async for change in self._watcher:
            if change is None:  # the watch's marker: every current value was delivered
                self._ready.set()
                continue
            self._schedule(*change)

    async def _fire(self) -> None:
        await self._ready.wait()
        while True:
            self._wake.clear()
            now = self.clock()
            due: list[WorkflowInput] = []
            while self._heap and self._heap[0][0] <= now:
                _, _, record = heapq.heappop(self._heap)
                wanted = self._wanted.get(record.conversation)
                if wanted is not None and record.id in wanted:
                    wanted.discard(record.id)
                    if not wanted:
                        del self._wanted[record.conversation]
                    due.append(record)
            if due:
                await self._publish(due)
                continue
            delay = self._heap[0][0] - now if self._heap else 3600.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(delay, 3600.0))

    async def _publish(self, records: list[WorkflowInput]) -> None:
        s = self.bus.subjects
        stamped = [msgspec.structs.replace(r, ts=self.clock()) for r in records]
        try:
            await self.bus.publish_all([(s.workflow_input(r.conversation), r) for r in stamped])
            self.published += len(records)
        except Exception:
            # Some may have gone out: publishing them again is harmless (same ids).
            log.exception("publishing %d timers failed; retrying", len(records))
            retry = self.clock() + RETRY_SECONDS
            for record in records:
                self._wanted.setdefault(record.conversation, set()).add(record.id)
                self._push(retry, record)
