"""The Telegram channel's outbound path: one durable consumer, one queue per chat.

Every reply for Telegram is published on ``{prefix}.out.telegram.{conversation}``. A
durable pull consumer (``{prefix}_telegram_out``, explicit ack) reads them all, so a
reply survives a restart of the channel and each is handed to one channel instance.
Each message goes to its chat's queue; a chat's queue is worked by one task, so one
chat's replies go out in stream order while different chats are sent concurrently.

Ack rules:

* acked after Telegram accepted every part, or after a definitive refusal (403 blocked,
  400), which becomes a ``delivery_failed`` ChannelEvent (code 403 or 400, with the
  reason);
* acked after a record that is not a valid Message for its subject (``record_problem``;
  reported on ``evt.invalid``) or
  whose conversation is not a Telegram chat (a ``delivery_failed`` event);
* never acked while it is being retried (429, 5xx, network): the task tells JetStream
  it is still in progress every ``ack_wait / 3`` seconds, so the record is not handed
  to anyone else meanwhile. A redelivery that does arrive for a record still in hand
  is ignored;
* not acked if the channel stops first: JetStream redelivers it after ``ack_wait``
  (to this process after a restart, or to another instance), so nothing is lost. The
  price is that a reply interrupted mid-way (some parts sent) is sent whole again.

Concurrency: ``max_in_flight`` records are held at once (the consumer's
``max_ack_pending`` is the same), so a flood of replies to a slow chat bounds memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from commhub.core.aio import cancel_and_wait
from commhub.core.channel import ChannelContext
from commhub.core.envelope import EnvelopeError, Message, decode_message

__all__ = ["OutboundConsumer"]

log = logging.getLogger(__name__)

Deliver = Callable[[Message], Awaitable[None]]


class OutboundConsumer:
    """Reads ``out.{channel}.>`` durably and calls ``deliver`` per message, per chat in order.

    ``deliver(message)`` must return when the message is done with (sent, or failed for
    good and reported); it may take as long as retries need. If it raises, the record
    is nak'ed (redelivered after ``retry_delay``).
    """

    def __init__(
        self,
        ctx: ChannelContext,
        deliver: Deliver,
        *,
        max_in_flight: int = 256,
        ack_wait: float = 60.0,
        retry_delay: float = 5.0,
        fetch_timeout: float = 1.0,
    ) -> None:
        self.ctx = ctx
        self.deliver = deliver
        self.max_in_flight = max_in_flight
        self.ack_wait = ack_wait
        self.retry_delay = retry_delay
        self.fetch_timeout = fetch_timeout
        self.durable = f"{ctx.subjects.prefix}_{ctx.channel}_out"
        self._sub: Any = None
        self._fetcher: asyncio.Task[None] | None = None
        self._queues: dict[str, deque[Msg]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._in_hand: set[int] = set()
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.delivered = 0

    async def start(self) -> None:
        """Bind (or create) the durable consumer and start fetching."""
        subjects = self.ctx.subjects
        config = ConsumerConfig(
            durable_name=self.durable,
            description=f"commhub {self.ctx.channel} channel: replies to send",
            filter_subject=subjects.outbound(self.ctx.channel, ">"),
            # On the first start, every reply already waiting (none on a new
            # deployment) is sent; afterwards the durable remembers its place.
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=-1,
            max_ack_pending=self.max_in_flight,
        )
        self._sub = await self.ctx.bus.bind_durable(subjects.messages_stream, config)
        self._fetcher = asyncio.create_task(self._fetch_loop(), name="telegram-out-fetch")

    async def stop(self, grace: float) -> None:
        """Stop fetching; give the records in hand ``grace`` seconds, then cancel them.

        Cancelled records stay unacked and come back after ``ack_wait``.
        """
        if self._fetcher is not None:
            # Re-cancelled until it ends: a fetch can swallow one cancel (core/aio.py).
            await cancel_and_wait(self._fetcher)
            self._fetcher = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        if self._workers:
            await cancel_and_wait(*self._workers)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _fetch_loop(self) -> None:
        while True:
            room = self.max_in_flight - len(self._in_hand)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                msgs = await self._sub.fetch(min(room, 100), timeout=self.fetch_timeout)
            except (TimeoutError, nats.errors.TimeoutError):
                continue  # nothing pending: not an error
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection is reconnecting, or closing
                log.warning("telegram outbound: fetch failed: %r", exc)
                await asyncio.sleep(self.fetch_timeout)
                continue
            for msg in msgs:
                self._take(msg)

    def _take(self, msg: Msg) -> None:
        seq = int(msg.metadata.sequence.stream)
        if seq in self._in_hand:
            return  # redelivered while still being sent: the first delivery acks it
        self._in_hand.add(seq)
        chat = msg.subject.rsplit(".", 1)[-1]
        queue = self._queues.get(chat)
        if queue is not None:
            queue.append(msg)
            return
        self._queues[chat] = deque([msg])
        self._idle.clear()
        task = asyncio.create_task(self._drain(chat), name=f"telegram-out:{chat}")
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)

    async def _drain(self, chat: str) -> None:
        queue = self._queues[chat]
        try:
            while queue:
                msg = queue[0]
                try:
                    await self._handle(msg)
                finally:
                    queue.popleft()
                    self._in_hand.discard(int(msg.metadata.sequence.stream))
                    self._room.set()
        finally:
            del self._queues[chat]
            if not self._queues:
                self._idle.set()

    async def _handle(self, msg: Msg) -> None:
        try:
            message = decode_message(msg.subject, msg.data)  # the bus contract
        except EnvelopeError as exc:
            await self.ctx.report_refused(msg, str(exc))
            with contextlib.suppress(Exception):
                await msg.ack()
            return
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        try:
            await self.deliver(message)
        except asyncio.CancelledError:
            raise  # stopping: left unacked, redelivered later
        except Exception:
            log.exception("telegram outbound: delivering %s failed", message.id)
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.retry_delay)
            return
        finally:
            heartbeat.cancel()
        self.delivered += 1
        with contextlib.suppress(Exception):  # a lost ack means one redelivery, sent again
            await msg.ack()

    async def _heartbeat(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            with contextlib.suppress(Exception):
                await msg.in_progress()
