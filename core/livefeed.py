"""One push consumer that follows a subject filter forever, re-created after any disruption.

A channel process needs every new outbound message of its channel once, in stream
order, however many clients it serves: :class:`LiveFeed` is that one consumer. It is an
ephemeral push consumer (no acks, flow control, idle heartbeats, in memory) that this
module re-creates, from the sequence after the last message it handed on, whenever

* the NATS client reconnected (the server may have restarted and lost the consumer:
  this is the fast path, taken at once rather than after missed heartbeats),
* the consumer sequence skipped (a message was lost on the way, e.g. the client dropped
  it as a slow consumer) or a heartbeat says more was delivered than arrived,
* nothing arrived, not even a heartbeat, for three heartbeat intervals while connected.

The sequence bookkeeping is the pure :class:`FeedPosition`, so the reset rules are unit
tested without a server.

Concurrency: the message callback runs in the subscription's own task, one message at
a time, and calls ``on_message`` synchronously: it must not block (it may schedule
tasks). Cancel and failure: a failed re-creation is retried with a backoff of 0.1 s
doubling to 2 s, forever, until :meth:`LiveFeed.close`; messages stored meanwhile come
once the consumer is back. :meth:`LiveFeed.start` raises if the first consumer cannot be
created. ``on_message`` raising is logged and the message counts as handed on.

The filter can be changed while the feed runs (:meth:`LiveFeed.refilter`): the consumer
is re-created with the new filter from the sequence after the last message handed on,
so a wider filter delivers every newly matching message stored after that point.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from commhub.core.aio import cancel_and_wait
from commhub.core.envelope import new_id

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

    from commhub.core.bus import Bus

__all__ = ["FeedPosition", "LiveFeed", "Verdict"]

log = logging.getLogger(__name__)

OnMessage = Callable[[int, str, bytes], None]

MIN_BACKOFF = 0.1
MAX_BACKOFF = 2.0
# A process that dies leaves its consumer behind this long (no interest on its inbox).
INACTIVE_THRESHOLD = 60.0
# Bound of one consumer create or delete request: a server that just restarted may not
# answer JetStream requests for a moment, and the retry should come soon after.
REQUEST_TIMEOUT = 2.0


class Verdict(enum.Enum):
    DELIVER = "deliver"  # a new message: hand it on
    SKIP = "skip"  # already handed on (a re-created consumer overlapping): drop it
    RESET = "reset"  # the consumer skipped a message: re-create it from the last sequence


class FeedPosition:
    """Pure bookkeeping of where a re-creatable consumer is.

    ``last_seq`` is the stream sequence of the last message handed on; a new consumer
    starts right after it (:meth:`restart`). Within one consumer, deliveries must come
    with consumer sequences 1, 2, 3, ...: a jump means a message was lost on the way.
    """

    __slots__ = ("_next_cseq", "last_seq")

    def __init__(self, last_seq: int) -> None:
        self.last_seq = last_seq
        self._next_cseq = 1

    def restart(self) -> int:
        """Forget the old consumer; return the stream sequence the new one starts at."""
        self._next_cseq = 1
        return self.last_seq + 1

    def message(self, stream_seq: int, consumer_seq: int) -> Verdict:
        """Judge one delivery of the current consumer."""
        if consumer_seq != self._next_cseq:
            return Verdict.RESET
        self._next_cseq += 1
        if stream_seq <= self.last_seq:
            return Verdict.SKIP
        self.last_seq = stream_seq
        return Verdict.DELIVER

    def heartbeat(self, last_consumer_seq: int | None) -> Verdict:
        """Judge an idle heartbeat naming the consumer's last delivery (its
        ``Nats-Last-Consumer`` header): RESET if that delivery never arrived."""
        if last_consumer_seq is not None and last_consumer_seq >= self._next_cseq:
            return Verdict.RESET
        return Verdict.SKIP


class LiveFeed:
    """Hands every new message on ``filter_subject`` of ``stream`` to ``on_message``
    once, in stream order, from :meth:`start` until :meth:`close` (see the module
    docstring for how it survives server restarts)."""

    def __init__(
        self,
        bus: Bus,
        stream: str,
        filter_subject: str,
        on_message: OnMessage,
        *,
        heartbeat: float = 2.0,
        name: str = "livefeed",
        description: str = "",
    ) -> None:
        self.bus = bus
        self.stream = stream
        self.filter_subject = filter_subject
        self.on_message = on_message
        self.heartbeat = heartbeat
        # Consumers are named by this process, so one whose create request was cut off
        # (its answer lost, or the caller cancelled) can still be deleted by name.
        self.name = f"{name}_{new_id()[:12]}"
        self.description = description
        self.position: FeedPosition | None = None
        self.resets = 0  # consumers re-created after the first (for tests and logs)
        self._generation = 0
        self._sub: Subscription | None = None
        self._consumer: str | None = None
        self._trouble = asyncio.Event()
        self._why = ""
        self._last_activity = 0.0
        self._task: asyncio.Task[None] | None = None
        self._deletes: set[asyncio.Task[None]] = set()
        self._remove_listener: Callable[[], None] | None = None
        self._created = asyncio.Event()  # set while the current consumer exists
        self._filter_in_use: str | None = None  # the filter of the current consumer

    @property
    def consumer(self) -> str | None:
        """The current consumer's name (None while it is being re-created)."""
        return self._consumer

    async def start(self) -> None:
        """Create the first consumer, starting after the stream's last message, and
        begin supervising it. Raises if the consumer cannot be created."""
        if self._task is not None:
            raise RuntimeError("live feed already started")
        info = await self.bus.js.stream_info(self.stream)
        self.position = FeedPosition(int(info.state.last_seq))
        await self._create()
        self._remove_listener = self.bus.on_reconnect(partial(self._reset, "reconnected"))
        self._task = asyncio.create_task(self._supervise(), name=f"livefeed-{self.stream}")

    async def close(self) -> None:
        """Stop supervising, unsubscribe and delete the consumer (best effort, bounded).
        Safe to call twice."""
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        self._generation += 1  # late deliveries are ignored
        await self._discard()
        if self._deletes:
            await asyncio.wait(self._deletes, timeout=REQUEST_TIMEOUT)
            await cancel_and_wait(*self._deletes)

    async def refilter(self, filter_subject: str, timeout: float = 10.0) -> None:
        """Follow ``filter_subject`` from now on; returns once the consumer with the new
        filter exists. It starts right after the last message handed on, so a message
        stored since then that matches the new filter is handed on (once), even one
        stored before this call. Raises TimeoutError if the consumer cannot be created
        within ``timeout`` seconds (the supervisor keeps trying)."""
        if filter_subject == self.filter_subject:
            return
        if self._task is None:
            raise RuntimeError("live feed not started")
        self.filter_subject = filter_subject
        self._created.clear()
        self._reset("filter changed")
        async with asyncio.timeout(timeout):
            while not (self._created.is_set() and self._consumer is not None
                       and self._filter_in_use == filter_subject):
                await self._created.wait()
                if self._filter_in_use != filter_subject:
                    self._created.clear()
                    self._reset("filter changed")

    # -- supervision ----------------------------------------------------------------
    def _reset(self, why: str) -> None:
        """Ask the supervisor to re-create the consumer (sync: callbacks call it)."""
        if not self._trouble.is_set():
            self._why = why
            self._trouble.set()

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(self.heartbeat):
                    await self._trouble.wait()
            except TimeoutError:
                if self.bus.nc.is_closed:
                    return
                idle = loop.time() - self._last_activity
                if not self.bus.nc.is_connected or idle < 3 * self.heartbeat:
                    continue  # a reconnect calls _reset itself
                self._reset(f"no heartbeat for {idle:.1f} s")
            log.info("%s: re-creating the live consumer (%s)", self.stream, self._why)
            backoff = MIN_BACKOFF
            while True:
                self._trouble.clear()
                try:
                    await self._create()
                    self.resets += 1
                    break
                except Exception as exc:
                    if self.bus.nc.is_closed:
                        return
                    log.warning("%s: live consumer not re-created yet: %r", self.stream, exc)
                    try:  # a reconnect meanwhile retries at once
                        async with asyncio.timeout(backoff):
                            await self._trouble.wait()
                    except TimeoutError:
                        pass
                    backoff = min(backoff * 2, MAX_BACKOFF)

    async def _create(self) -> None:
        """Replace the consumer with a new one from the sequence after the last one seen."""
        assert self.position is not None
        self._created.clear()
        await self._discard()
        self._generation += 1
        nc = self.bus.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=partial(self._on_msg, self._generation))
        start = self.position.restart()
        name = f"{self.name}_{self._generation}"
        config = ConsumerConfig(
            name=name,
            description=self.description or None,
            deliver_subject=inbox,
            filter_subject=self.filter_subject,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=AckPolicy.NONE,
            max_deliver=1,
            flow_control=True,
            idle_heartbeat=self.heartbeat,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=INACTIVE_THRESHOLD,
        )
        self._sub, self._consumer = sub, name  # a failed create is deleted by name too
        await self.bus.js.add_consumer(self.stream, config=config, timeout=REQUEST_TIMEOUT)
        self._last_activity = asyncio.get_running_loop().time()
        self._filter_in_use = config.filter_subject
        self._created.set()

    async def _discard(self) -> None:
        """Drop the current subscription; delete its consumer in the background (it may
        be gone with a restarted server; if the delete fails it expires by itself)."""
        sub, self._sub = self._sub, None
        consumer, self._consumer = self._consumer, None
        if sub is not None:
            await _quietly_unsubscribe(sub)
        if consumer is not None and self.bus.nc.is_connected:
            task = asyncio.create_task(self._delete(consumer), name=f"livefeed-delete-{consumer}")
            self._deletes.add(task)
            task.add_done_callback(self._deletes.discard)

    async def _delete(self, consumer: str) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await self.bus.js.delete_consumer(self.stream, consumer)
        except Exception as exc:
            log.debug("%s: old live consumer %s not deleted: %r", self.stream, consumer, exc)

    # -- deliveries -------------------------------------------------------------------
    async def _on_msg(self, generation: int, msg: Msg) -> None:
        if generation != self._generation:
            return  # from a consumer already replaced
        position = self.position
        assert position is not None
        self._last_activity = asyncio.get_running_loop().time()
        headers = msg.headers
        if not msg.data and headers and headers.get("Status") == "100":
            if msg.reply:  # flow control: every earlier message is handled by now
                await self.bus.nc.publish(msg.reply)
                return
            stalled = headers.get("Nats-Consumer-Stalled")
            if stalled:
                await self.bus.nc.publish(stalled)
            last = headers.get("Nats-Last-Consumer")
            if position.heartbeat(int(last) if last else None) is Verdict.RESET:
                self._reset("a heartbeat reports deliveries that never arrived")
            return
        try:
            meta = msg.metadata
        except Exception:
            log.warning("%s: a delivery without JetStream metadata on %s", self.stream,
                        msg.subject)
            return
        verdict = position.message(int(meta.sequence.stream), int(meta.sequence.consumer))
        if verdict is Verdict.RESET:
            self._generation += 1  # ignore the rest of this consumer's deliveries
            self._reset("the consumer sequence skipped")
        elif verdict is Verdict.DELIVER:
            try:
                self.on_message(int(meta.sequence.stream), msg.subject, msg.data)
            except Exception:
                log.exception("%s: live message handler failed", self.stream)


async def _quietly_unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception as exc:  # the connection is closing or closed
        log.debug("live feed unsubscribe: %r", exc)
