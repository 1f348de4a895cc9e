"""A channel's outbound messages, read once per process and fanned out to every reader.

Every WebSocket connection, event stream, long poll and Rasa turn follows one
conversation's outbound messages from a cursor. Giving each its own JetStream consumer
ran into nats-server's limit on consumers per stream after about a thousand of them, and
cost a consumer create per request. :class:`OutboundFanout` instead keeps, per channel
and process:

* **one live feed** (:class:`~commhub.core.livefeed.LiveFeed`) on
  ``{prefix}.out.{channel}.>``, started on first use, which re-creates itself after a
  reconnect from the last sequence it saw;
* **a history reader** (:class:`~commhub.core.history.HistoryReader`) that reads one
  conversation's stored messages after a cursor with batched direct gets, no consumer;
* **readers by conversation**: each :meth:`OutboundFanout.follow` registers with the
  feed *first*, then reads its history, then goes live. The
  :class:`~commhub.core.handover.Handover` holds the live messages that arrive while the
  history is read and drops any sequence already handed out, so the hand-over neither
  skips nor repeats.

A live message is decoded once, for all readers of its conversation, and only if the
conversation has readers here. A record that does not decode as an outbound
:class:`~commhub.core.envelope.Message` of its subject's conversation is skipped and
reported on ``{prefix}.evt.invalid`` (once per process), never raised to the reader.

**Both directions.** A reader may ask for the conversation's inbound messages too
(``inbound=True``: a chat widget redrawing both sides, other tabs' messages live). Its
history then reads ``{prefix}.*.{channel}.{conversation}`` (the ``in`` and ``out``
subjects, in stream order), and the process's live feed is widened once, on the first
such reader, to ``{prefix}.*.{channel}.>``: processes without such readers never
receive inbound messages. An inbound record that does not decode is skipped without a
report (the router reports it).

Concurrency: one event loop; the feed's callback runs synchronously and only appends to
readers' hand-overs and wakes them, so a slow reader never holds up the feed or another
reader. Cancel: cancelling a reader's iteration at any await is safe; its cleanup is
synchronous. Failure: the first use raises if the feed cannot be created; a history read
that fails raises :class:`~commhub.core.history.HistoryError` out of the iteration (the
reader resumes from its cursor); a reader that leaves ``max_held`` live messages unread
gets :class:`OutboundLagged`. :meth:`close` ends every iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from commhub.core.envelope import EnvelopeError, Message, decode_message, invalid_id
from commhub.core.handover import Handover
from commhub.core.history import HistoryError, HistoryReader
from commhub.core.livefeed import LiveFeed

if TYPE_CHECKING:
    from commhub.core.bus import Bus

__all__ = ["OutboundFanout", "OutboundLagged"]

log = logging.getLogger(__name__)

OutboundItem = tuple[int, Message]

# A history read that fails (a server restarting under it) is tried this often in all.
HISTORY_ATTEMPTS = 3

# Sequences of invalid records already reported by this process: a bad record read by
# every reconnecting client is reported once, not once per read.
_REPORTED_MAX = 4096


class OutboundLagged(Exception):
    """A reader left too many live messages unread; resume after ``last_cursor``."""

    def __init__(self, last_cursor: int, max_held: int) -> None:
        super().__init__(f"{max_held} live messages waiting unread; resume after {last_cursor}")
        self.last_cursor = last_cursor


class _Reader:
    """One follower of one conversation: its hand-over and the event that wakes it;
    ``inbound``: it wants the conversation's inbound messages too."""

    __slots__ = ("handover", "inbound", "wake")

    def __init__(self, after: int | None, max_held: int, inbound: bool = False) -> None:
        self.handover: Handover[Message] = Handover(after, max_held)
        self.wake = asyncio.Event()
        self.inbound = inbound


class OutboundFanout:
    """One channel's outbound messages in this process (see the module docstring)."""

    def __init__(self, bus: Bus, channel: str, *, max_held: int = 10_000) -> None:
        self.bus = bus
        self.channel = channel
        self.max_held = max_held
        subjects = bus.subjects
        self._stream = subjects.messages_stream
        self._prefix = subjects.outbound(channel, "")  # "{p}.out.{channel}."
        self._in_prefix = subjects.inbound(channel, "")  # "{p}.in.{channel}."
        self._both = f"{subjects.prefix}.*.{channel}."  # in and out of the channel
        self._widened = False
        self._widening = asyncio.Lock()
        self._source = f"channel:{channel}"
        self._readers: dict[str, set[_Reader]] = {}
        self._feed: LiveFeed | None = None
        self._starting: asyncio.Task[LiveFeed] | None = None
        self._history = HistoryReader(bus.nc, self._stream)
        self._reported: OrderedDict[int, None] = OrderedDict()
        self._reports: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def feed(self) -> LiveFeed | None:
        """The live feed, once started."""
        return self._feed

    @property
    def reader_count(self) -> int:
        """Readers registered now (reading history or following live messages)."""
        return sum(len(readers) for readers in self._readers.values())

    async def follow(self, conversation: str, after: int | None = None, *,
                     inbound: bool = False) -> AsyncIterator[OutboundItem]:
        """Yield ``(cursor, message)`` for every outbound message of ``conversation``
        after stream sequence ``after`` (all when None), in order, each once, then live
        ones until the caller stops iterating or :meth:`close` is called. With
        ``inbound``, the conversation's inbound messages on this channel come too, in
        stream order with the outbound ones (``message.direction`` tells them apart)."""
        if self._closed:
            return
        await self._ensure_feed()
        if inbound:
            await self._widen()
        reader = _Reader(after, self.max_held, inbound)
        self._readers.setdefault(conversation, set()).add(reader)
        try:
            subject = (self._both if inbound else self._prefix) + conversation
            for attempt in range(HISTORY_ATTEMPTS):
                try:  # resumes after the last message handed out: nothing twice
                    async for stored in self._history.read(subject, reader.handover.last):
                        message = self._decode(stored.seq, stored.subject, stored.data,
                                               conversation)
                        if message is not None and reader.handover.history(stored.seq):
                            yield stored.seq, message
                    break
                except HistoryError as exc:  # e.g. the server restarting under the read
                    if attempt + 1 == HISTORY_ATTEMPTS or self._closed:
                        raise
                    log.info("%s: history read failed, retrying: %s", self._source, exc)
                    await asyncio.sleep(0.25 * 2**attempt)
            handover = reader.handover
            while True:
                item = handover.next_live()
                if item is not None:
                    yield item
                    continue
                if handover.overflowed:
                    raise OutboundLagged(handover.last, self.max_held)
                if self._closed:
                    return
                reader.wake.clear()
                await reader.wake.wait()
        finally:
            readers = self._readers.get(conversation)
            if readers is not None:
                readers.discard(reader)
                if not readers:
                    del self._readers[conversation]

    async def close(self) -> None:
        """End every iteration, stop the feed (deleting its consumer) and the history
        reader. Safe to call twice; :meth:`follow` afterwards yields nothing."""
        self._closed = True
        for readers in self._readers.values():
            for reader in readers:
                reader.wake.set()
        if self._starting is not None:
            await asyncio.wait({self._starting})
            with contextlib.suppress(BaseException):
                self._feed = self._feed or self._starting.result()
            self._starting = None
        feed, self._feed = self._feed, None
        if feed is not None:
            await feed.close()
        await self._history.close()
        if self._reports:
            await asyncio.wait(self._reports, timeout=2)

    # -- internals --------------------------------------------------------------------
    async def _widen(self) -> None:
        """Make the live feed follow the channel's inbound messages too (once per
        process; it stays wide). Returns once the wider consumer exists, so a reader
        registered after it misses no inbound message stored after its history."""
        async with self._widening:
            if self._widened:
                return
            feed = self._feed
            assert feed is not None
            await feed.refilter(self._both + ">")
            self._widened = True

    async def _ensure_feed(self) -> None:
        """Start the feed once. The start runs in a task of its own, so a reader that
        goes away meanwhile (a client that connects and closes at once) does not cut
        it off halfway; if it fails, every waiting reader raises and the next retries."""
        if self._feed is not None:
            return
        if self._starting is None:
            self._starting = asyncio.create_task(self._start_feed(), name="fanout-start")
        starting = self._starting
        try:
            self._feed = await asyncio.shield(starting)
        finally:
            if starting.done() and self._starting is starting:
                self._starting = None
                if not starting.cancelled():
                    starting.exception()  # retrieved: a waiting reader raised it

    async def _start_feed(self) -> LiveFeed:
        name = f"{self.bus.subjects.prefix}_{self.channel}_outbound"
        feed = LiveFeed(self.bus, self._stream, self._prefix + ">", self._dispatch, name=name,
                        description=f"commhub {self.channel} outbound fan-out")
        try:
            await feed.start()
        except BaseException:
            await feed.close()  # deletes a consumer created before the failure
            raise
        return feed

    def _dispatch(self, seq: int, subject: str, data: bytes) -> None:
        """The feed's callback: hand a live message to its conversation's readers
        (an inbound one only to those that asked for inbound messages)."""
        inbound = not subject.startswith(self._prefix)
        if inbound:
            if not subject.startswith(self._in_prefix):
                return
            readers = self._readers.get(subject[len(self._in_prefix):])
            if not readers or not any(reader.inbound for reader in readers):
                return
        else:
            readers = self._readers.get(subject[len(self._prefix):])
            if not readers:
                return
        message = self._decode(seq, subject, data, "")
        if message is None:
            return
        for reader in readers:
            if inbound and not reader.inbound:
                continue
            reader.handover.live(seq, message)
            reader.wake.set()

    def _decode(self, seq: int, subject: str, data: bytes, conversation: str
                ) -> Message | None:
        """The outbound Message in ``data``, or None after reporting why it is not one.

        Readers may share the returned object: they must not modify it.
        """
        try:
            return decode_message(subject, data)  # the bus contract (record_problem)
        except EnvelopeError as exc:  # any decoder failure, deep nesting included
            problem = str(exc)
        if not subject.startswith(self._prefix):  # inbound: the router reports it
            log.debug("%s: skipped invalid inbound record %d: %s", self._source, seq, problem)
            return None
        self._report(seq, subject, data, problem)
        return None

    def _report(self, seq: int, subject: str, data: bytes, problem: str) -> None:
        if seq in self._reported:
            return
        self._reported[seq] = None
        if len(self._reported) > _REPORTED_MAX:
            self._reported.popitem(last=False)
        log.warning("%s: skipped invalid outbound record %d on %s: %s", self._source, seq,
                    subject, problem)
        task = asyncio.create_task(
            # Under the id of its stream position: the recorder and every process that
            # refuse it make one report.
            self.bus.publish_invalid(subject, data, problem, self._source,
                                     record_id=invalid_id(self._stream, seq))
        )
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)
