"""Callback mode: POST each outbound message of a conversation to a registered URL.

Where to: a URL registered for the conversation (``POST /v1/conversations/{c}/callback``,
stored in the JetStream KV bucket ``{prefix}_{channel}_callbacks``, so it survives
restarts and is shared by every hub process), else the channel's ``callback_url``
setting, else nowhere.

What: one JSON object per POST (the message as the GET API shows it, with its cursor),
with these headers:

* ``X-Commhub-Delivery``: the message id, the same on every attempt, so the receiver
  drops a repeat;
* ``X-Commhub-Timestamp``: unix seconds when this attempt was signed;
* ``X-Commhub-Signature``: ``sha256=`` + hex HMAC-SHA256 over ``timestamp + "." + body``
  with ``callback_secret`` (:func:`signature`).

Delivery is at least once and survives restarts: a durable JetStream pull consumer
(``{prefix}_{channel}_callbacks``, filter ``{prefix}.out.{channel}.>``, explicit ack)
feeds :class:`Deliverer`, which acks a message only after the receiver answered 2xx or
the delivery finally failed. A hub that stops or dies mid-delivery leaves it unacked;
it is delivered again after the restart (or by another hub process sharing the durable).

Retries: a network error, a timeout, 5xx and 429 are retried with exponential backoff
(``callback_backoff_seconds`` doubling up to ``callback_backoff_max_seconds``; a 429's
numeric ``Retry-After`` is honoured within that cap), at most ``callback_attempts``
attempts. Another answer (3xx, 4xx) is final at once. A final failure is a
``delivery_failed`` ChannelEvent; the message stays readable through the GET API.

Order and concurrency: one conversation's messages are delivered one after another in
stream order (a message waits while an earlier one is retried); different
conversations in parallel. At most ``callback_concurrency`` messages are held (fetched
and not yet acked) at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

import aiohttp
import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from commhub.channels.http.request import encode_message
from commhub.core.aio import cancel_and_wait
from commhub.core.channel import ChannelContext
from commhub.core.envelope import EnvelopeError, decode_message, now
from commhub.core.serial import KeyedSerialRunner

if TYPE_CHECKING:
    from commhub.channels.http.channel import HttpSettings

__all__ = ["CallbackStore", "Deliverer", "Registration", "signature", "verify"]

log = logging.getLogger(__name__)

FETCH_BATCH: Final = 64
FETCH_TIMEOUT: Final = 1.0  # seconds a fetch waits when nothing is pending (not an error)


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 with ``secret`` over ``timestamp + "." + body``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, header: str) -> bool:
    """True when ``header`` is the signature of ``body`` at ``timestamp`` (constant time)."""
    return hmac.compare_digest(signature(secret, timestamp, body), header)


class Registration(msgspec.Struct, kw_only=True):
    """A conversation's callback, as stored in the bucket."""

    url: str
    ts: float = msgspec.field(default_factory=now)


class CallbackStore:
    """The callback bucket: one key per conversation. Safe from many tasks at once."""

    def __init__(self, ctx: ChannelContext) -> None:
        self.ctx = ctx
        self.bucket_name = f"{ctx.subjects.prefix}_{ctx.channel}_callbacks"
        self._kv: KeyValue | None = None

    async def open(self) -> None:
        """Create the bucket if needed (idempotent) and bind it."""
        self._kv = await self.ctx.bus.js.create_key_value(KeyValueConfig(
            bucket=self.bucket_name,
            description=f"commhub {self.ctx.channel} channel: callback URL per conversation",
            history=1,
            storage=StorageType.FILE,
            replicas=self.ctx.bus.replicas,
            direct=True,
        ))

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("callback store not opened")
        return self._kv

    async def get(self, conversation: str) -> Registration | None:
        try:
            entry = await self.kv.get(conversation)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return msgspec.json.decode(entry.value, type=Registration)

    async def put(self, conversation: str, url: str) -> Registration:
        registration = Registration(url=url)
        await self.kv.put(conversation, msgspec.json.encode(registration))
        return registration

    async def delete(self, conversation: str) -> bool:
        """Remove a registration; False when there was none."""
        if await self.get(conversation) is None:
            return False
        await self.kv.delete(conversation)
        return True


class _Outcome(msgspec.Struct, frozen=True):
    ok: bool
    retry: bool
    reason: str
    retry_after: float | None = None


class Deliverer:
    """Consumes ``{prefix}.out.{channel}.>`` durably and POSTs each message to its
    callback. ``start`` binds the durable and starts the fetch loop; ``stop`` ends it and
    cancels deliveries in flight (they are not acked, so they come back)."""

    def __init__(
        self, ctx: ChannelContext, store: CallbackStore, settings: HttpSettings, secret: str
    ) -> None:
        self.ctx = ctx
        self.store = store
        self.settings = settings
        self.secret = secret
        self.durable = f"{ctx.subjects.prefix}_{ctx.channel}_callbacks"
        self.delivered = 0
        self.failed = 0
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._runner = KeyedSerialRunner()
        self._held: set[int] = set()  # stream sequences fetched and not yet acked
        self._room = asyncio.Event()
        self._stopping = False
        self._sub: JetStreamContext.PullSubscription | None = None
        self._jobs: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        s = self.settings
        # Long enough for every attempt; in_progress() before each one resets it anyway.
        ack_wait = s.callback_timeout_seconds + s.callback_backoff_max_seconds + 30
        config = ConsumerConfig(
            durable_name=self.durable,
            description=f"commhub {self.ctx.channel} channel: callback deliveries",
            filter_subject=f"{self.ctx.subjects.prefix}.out.{self.ctx.channel}.>",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW,
            ack_wait=ack_wait,
            max_ack_pending=max(1000, s.callback_concurrency * 4),
        )
        sub = await self.ctx.bus.bind_durable(
            self.ctx.subjects.messages_stream, config,
            # With the server it started itself, this process is the durable's only
            # consumer: deliveries a dead process held come back at once.
            rewind_unacked=self.ctx.hub_settings.embedded_nats,
        )
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=s.callback_timeout_seconds),
            headers={"User-Agent": "commhub-callbacks"},
        )
        self._sub = sub
        self._task = asyncio.create_task(self._run(sub), name=f"{self.ctx.channel}-callbacks")

    async def stop(self) -> None:
        """Stop fetching and hand back what is held, so that it is delivered at once by
        the next process (or another one sharing the durable) instead of after the ack
        wait. The pull request in flight is let finish (at most ``FETCH_TIMEOUT``): a
        cancelled one would leave the server sending messages to an inbox nobody reads."""
        task, self._task = self._task, None
        self._stopping = True
        self._room.set()
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), FETCH_TIMEOUT + 5)
            except TimeoutError:
                await cancel_and_wait(task)
        await cancel_and_wait(*self._jobs)  # each hands its message back (nak)
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):  # the connection may be closing
                await sub.unsubscribe()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self, sub: JetStreamContext.PullSubscription) -> None:
        """Fetch as many messages as there is room for; hand each to its conversation's
        queue. A redelivery of a message still held here (it waited in its
        conversation's queue past the ack wait) is ignored: the held copy acks it."""
        room = self.settings.callback_concurrency
        while not self._stopping:
            free = room - len(self._held)
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                msgs = await sub.fetch(min(free, FETCH_BATCH), timeout=FETCH_TIMEOUT)
            except (TimeoutError, nats.errors.TimeoutError):
                continue  # nothing pending
            except Exception as exc:  # the bus is reconnecting; try again shortly
                log.warning("callbacks: fetch failed: %r", exc)
                await asyncio.sleep(1.0)
                continue
            for msg in msgs:
                seq = int(msg.metadata.sequence.stream)
                if self._stopping:
                    await _nak(msg)
                elif seq not in self._held:
                    self._held.add(seq)
                    conversation = msg.subject.rsplit(".", 1)[-1]
                    self._runner.submit(conversation, self._job(msg, seq))

    def _job(self, msg: Msg, seq: int) -> Callable[[], Awaitable[None]]:
        async def job() -> None:
            task = asyncio.current_task()
            assert task is not None
            self._jobs.add(task)
            try:
                if self._stopping:
                    await _nak(msg)
                else:
                    await self._deliver(msg)
            except asyncio.CancelledError:
                await asyncio.shield(_nak(msg))
                raise
            finally:
                self._jobs.discard(task)
                self._held.discard(seq)
                self._room.set()

        return job

    async def _deliver(self, msg: Msg) -> None:
        seq = int(msg.metadata.sequence.stream)
        try:
            message = decode_message(msg.subject, msg.data)  # the bus contract
        except EnvelopeError as exc:
            await self.ctx.report_refused(msg, str(exc))
            await msg.ack()
            return
        registration = await self.store.get(message.conversation)
        url = registration.url if registration else self.settings.callback_url
        if url is None:
            await msg.ack()
            return
        body = encode_message(seq, message)
        outcome = _Outcome(ok=False, retry=False, reason="no attempt")
        attempts = self.settings.callback_attempts
        for attempt in range(1, attempts + 1):
            await msg.in_progress()
            outcome = await self._post(url, body, message.id, attempt)
            if outcome.ok or not outcome.retry or attempt == attempts:
                break
            delay = min(
                self.settings.callback_backoff_seconds * 2 ** (attempt - 1),
                self.settings.callback_backoff_max_seconds,
            )
            if outcome.retry_after is not None:
                delay = min(max(delay, outcome.retry_after),
                            self.settings.callback_backoff_max_seconds)
            await asyncio.sleep(delay)
        if outcome.ok:
            self.delivered += 1
        else:
            self.failed += 1
            log.warning("callback for %s to %s failed: %s", message.id, url, outcome.reason)
            await self.ctx.publish_event(
                "delivery_failed", conversation=message.conversation,
                user=message.sender.id, connection=message.id,
                reason=f"{outcome.reason} (message {message.id}, cursor {seq}, "
                f"{attempt} attempt{'s' if attempt > 1 else ''})",
            )
        await msg.ack()

    async def _post(self, url: str, body: bytes, delivery: str, attempt: int) -> _Outcome:
        assert self._session is not None
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Commhub-Delivery": delivery,
            "X-Commhub-Timestamp": timestamp,
            "X-Commhub-Signature": signature(self.secret, timestamp, body),
            "X-Commhub-Attempt": str(attempt),
        }
        try:
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                retry_after = _seconds(response.headers.get("Retry-After"))
                with contextlib.suppress(Exception):
                    await response.read()  # let the connection be reused
        except (aiohttp.ClientError, TimeoutError) as exc:
            return _Outcome(ok=False, retry=True, reason=f"{type(exc).__name__}: {exc}")
        if 200 <= status < 300:
            return _Outcome(ok=True, retry=False, reason=f"HTTP {status}")
        retry = status >= 500 or status == 429
        return _Outcome(ok=False, retry=retry, reason=f"HTTP {status}",
                        retry_after=retry_after if status == 429 else None)


async def _nak(msg: Msg) -> None:
    """Hand a message back for redelivery now; best effort (the ack wait is the backstop)."""
    with contextlib.suppress(Exception):
        await msg.nak()


def _seconds(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())
