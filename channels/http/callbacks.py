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
feeds :class:`Deliverer` through :meth:`ChannelContext.deliver_outbound` (the hub's
:class:`~commhub.core.delivery.DeliveryLoop`), which acks a message only after the
receiver answered 2xx or the delivery failed for good. A hub that stops or dies
mid-delivery leaves it unacked; it is delivered again after the restart (or by another
hub process sharing the durable).

Retries: a network error, a timeout, 5xx, 408 and 429 are retried with exponential
backoff (``callback_backoff_seconds`` doubling up to ``callback_backoff_max_seconds``,
10 minutes by default; a 429's numeric ``Retry-After`` is honoured within that cap)
for ``callback_retry_seconds`` (24 hours by default), or at most ``callback_attempts``
attempts when set. The first three attempts are made holding the message; after that
each wait is a nak with that delay, so the retries live in JetStream and go on across
restarts, and ``X-Commhub-Attempt`` keeps counting. Each wait handed to JetStream is an
``error`` ChannelEvent naming the attempt and the next try. Another answer (3xx, other
4xx) is final at once. A final failure is a ``delivery_failed`` ChannelEvent whose
reason starts with a code (``http_503``, ``timeout``, ``connection_refused``, ...; see
:func:`failure_code`) and whose ``code`` is the HTTP status, if there was one; the
message stays readable through the GET API.

Order and concurrency: one conversation's messages are delivered one after another in
stream order while a message is retried in place; once its retries are handed to
JetStream, the conversation's later messages may overtake it (each body carries its
``cursor``, to restore the order). Different conversations go in parallel. At most
``callback_concurrency`` messages are held (fetched and not yet acked) at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import time
from typing import TYPE_CHECKING, Final

import aiohttp
import msgspec
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from commhub.channels.http.request import encode_message
from commhub.core.channel import ChannelContext
from commhub.core.delivery import Delivery, DeliveryLoop
from commhub.core.envelope import Message, now
from commhub.core.retry import Decision, Retry, RetryPolicy

if TYPE_CHECKING:
    from commhub.channels.http.channel import HttpSettings

__all__ = [
    "CallbackFailed",
    "CallbackStore",
    "Deliverer",
    "Registration",
    "answer_failure",
    "callback_policy",
    "failure_code",
    "signature",
    "verify",
]

log = logging.getLogger(__name__)

DURABLE_NAME: Final = "callbacks"  # the durable is {prefix}_{channel}_callbacks
# Attempts made holding the message (the conversation's next message waits) before the
# waits are handed to JetStream; with the default 0.5 s doubling, about 1.5 s.
IN_PLACE_ATTEMPTS: Final = 3


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


class CallbackFailed(Retry):
    """One callback attempt failed. ``code`` names how (:func:`failure_code`), ``status``
    is the HTTP status when the receiver answered; ``retry`` is False for an answer that
    another attempt would not change (3xx, 4xx other than 408 and 429)."""

    def __init__(
        self, code: str, detail: str, *, status: int | None = None, retry: bool = True,
        after: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {detail}", after=after)
        self.code = code
        self.status = status
        self.retry = retry


def failure_code(exc: BaseException) -> str:
    """A short, stable name for how a POST failed without an HTTP answer."""
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is one too
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "dns_failure"
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerFingerprintMismatch):
        return "tls_failure"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection_refused"
        return "connection_failed"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientConnectionResetError):
        return "disconnected"
    return "connection_error"


def answer_failure(status: int, retry_after: float | None) -> CallbackFailed:
    """The failure an HTTP answer other than 2xx stands for. 5xx, 429 and 408 may pass;
    any other answer is final. A 429's ``Retry-After`` (seconds) is passed on."""
    retry = status >= 500 or status in (408, 429)
    return CallbackFailed(f"http_{status}", f"HTTP {status}", status=status, retry=retry,
                          after=retry_after if status == 429 else None)


def callback_policy(settings: HttpSettings) -> RetryPolicy:
    """The retry schedule of ``[plugins.http]``: ``callback_backoff_seconds`` doubling up
    to ``callback_backoff_max_seconds``, for ``callback_retry_seconds`` in all, and at
    most ``callback_attempts`` attempts when that is set."""
    return RetryPolicy.lasting(
        settings.callback_retry_seconds,
        first=settings.callback_backoff_seconds,
        cap=max(settings.callback_backoff_max_seconds, settings.callback_backoff_seconds),
        in_place_attempts=IN_PLACE_ATTEMPTS,
        max_attempts=settings.callback_attempts,
    )


class Deliverer:
    """Consumes ``{prefix}.out.{channel}.>`` durably (through
    :meth:`ChannelContext.deliver_outbound`) and POSTs each message to its callback.

    ``start`` binds the durable and starts delivering; ``stop`` stops fetching, lets the
    POSTs in flight finish (at most the POST time limit), and hands back whatever is
    still held, so the next process delivers it at once.
    """

    def __init__(
        self, ctx: ChannelContext, store: CallbackStore, settings: HttpSettings, secret: str
    ) -> None:
        self.ctx = ctx
        self.store = store
        self.settings = settings
        self.secret = secret
        self.policy = callback_policy(settings)
        self.durable = f"{ctx.subjects.prefix}_{ctx.channel}_{DURABLE_NAME}"
        self.delivered = 0
        self.failed = 0
        self._session: aiohttp.ClientSession | None = None
        self._loop: DeliveryLoop[Message] | None = None

    async def start(self) -> None:
        s = self.settings
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=s.callback_timeout_seconds),
            headers={"User-Agent": "commhub-callbacks"},
        )
        try:
            self._loop = await self.ctx.deliver_outbound(
                self._deliver,
                name=DURABLE_NAME,
                policy=self.policy,
                max_in_flight=s.callback_concurrency,
                # Replies from before callbacks were switched on are not POSTed.
                start="new",
                on_retry=self._retrying,
                on_give_up=self._given_up,
            )
        except BaseException:
            await self._session.close()
            self._session = None
            raise

    async def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            await loop.stop(grace=self.settings.callback_timeout_seconds + 1)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _deliver(self, delivery: Delivery[Message]) -> None:
        """One attempt: POST the message to its conversation's callback. Returns when it
        is done with (2xx, no callback, or refused for good and reported); raises
        :class:`CallbackFailed` for a failure that may pass."""
        message = delivery.record
        registration = await self.store.get(message.conversation)
        url = registration.url if registration else self.settings.callback_url
        if url is None:
            return
        body = encode_message(delivery.seq, message)
        try:
            await self._post(url, body, message.id, delivery.attempt)
        except CallbackFailed as failure:
            if failure.retry:
                raise
            await self._report_failure(delivery, failure, url)
            return
        self.delivered += 1

    async def _retrying(
        self, delivery: Delivery[Message], error: BaseException, decision: Decision
    ) -> None:
        """A failed attempt will be tried again. When the wait is handed to JetStream
        (a long one), say so on the bus, with the attempt and when the next one is due."""
        if decision.action != "nak":
            return
        message = delivery.record
        code = error.code if isinstance(error, CallbackFailed) else "error"
        await self.ctx.publish_event(
            "error", conversation=message.conversation, user=message.sender.id,
            connection=message.id,
            code=error.status if isinstance(error, CallbackFailed) else None,
            reason=f"{code}: callback attempt {delivery.attempt} for message {message.id} "
            f"(cursor {delivery.seq}) failed; next try in {decision.delay:g} s",
        )

    async def _given_up(
        self, delivery: Delivery[Message], error: BaseException | None, reason: str
    ) -> None:
        registration = await self.store.get(delivery.record.conversation)
        url = registration.url if registration else self.settings.callback_url
        if isinstance(error, CallbackFailed):
            await self._report_failure(delivery, error, url)
            return
        await self._report_failure(
            delivery, CallbackFailed("gave_up", reason, retry=False), url
        )

    async def _report_failure(
        self, delivery: Delivery[Message], failure: CallbackFailed, url: str | None
    ) -> None:
        """A delivery failed for good: a ``delivery_failed`` ChannelEvent whose reason
        starts with the failure code, and whose code is the HTTP status, if any."""
        self.failed += 1
        message = delivery.record
        attempts = f"{delivery.attempt} attempt{'s' if delivery.attempt > 1 else ''}"
        log.warning("callback for %s to %s failed for good after %s: %s", message.id, url,
                    attempts, failure.reason)
        await self.ctx.publish_event(
            "delivery_failed", conversation=message.conversation,
            user=message.sender.id, connection=message.id, code=failure.status,
            reason=f"{failure.reason} (message {message.id}, cursor {delivery.seq}, "
            f"{attempts})",
        )

    async def _post(self, url: str, body: bytes, delivery: str, attempt: int) -> None:
        """POST once; returns on 2xx, raises :class:`CallbackFailed` otherwise."""
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
            raise CallbackFailed(failure_code(exc), f"{type(exc).__name__}: {exc}") from None
        if not 200 <= status < 300:
            raise answer_failure(status, retry_after)


def _seconds(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())
