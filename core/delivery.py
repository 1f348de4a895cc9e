"""One durable delivery loop: a JetStream pull consumer whose records are handled per key
in order, retried with backoff, and settled (ack, nak, term) only when their outcome is
known.

The router, the HTTP channel's callbacks, the Telegram channel's replies and any outside
channel (through :meth:`commhub.core.channel.ChannelContext.deliver_outbound`) use it.
A :class:`DeliveryLoop`

1. binds a durable pull consumer (:meth:`Bus.bind_durable`, created on first use) with
   explicit acks and ``max_deliver`` set from the :class:`RetryPolicy`;
2. fetches records in batches, never holding more than ``max_in_flight`` unsettled;
3. decodes the record with ``decode`` (which may check the subject too) and takes the
   key from the subject (its last token: the conversation), refusing a key that is not
   a valid subject token; either failing, for any reason (bad JSON, a wrong field, a
   ``RecursionError`` on a deeply nested document), terminates the message and
   reports it once on ``{prefix}.evt.invalid``: redelivering it could not make it
   valid;
4. runs ``handler(Delivery)`` under :class:`KeyedSerialRunner`: one key's records one
   after another in stream order, different keys concurrently;
5. settles by the handler's outcome (:mod:`commhub.core.retry`): returned, ack;
   :class:`Permanent`, term and report; any other exception, retry in place with
   backoff (the key's later records wait), then hand back with a nak whose delay is the
   next wait (the retry then lives in JetStream and survives restarts), and after the
   policy's last attempt, or its ``max_deliver`` deliveries, give up: terminate and
   report a dead letter on ``{prefix}.evt.invalid``.

Concurrency: one fetch task, one heartbeat task and one worker task per busy key, all on
the caller's event loop. At most ``max_in_flight`` records are held (fetched, not
settled); the consumer's ``max_ack_pending`` is at least that. Every held record, also
one waiting behind its key's earlier records, is kept alive with ``in_progress()``
every ``ack_wait / 3`` seconds, so a slow handler is not redelivered meanwhile; a
redelivery that arrives anyway for a record still held is ignored (the held copy
settles it). Handlers must be safe to run again on a redelivered record (after a crash,
a lost ack, or a hand-back): nothing here makes delivery more than at least once.

Strict order (``strict_order=True``, the router): a record's later records of the same
key never run before it, even when a delivery is lost on its way (a node died under the
connection) or taken by a process that lost its lease: JetStream numbers a durable's
deliveries, and a number skipped makes the loop finish what it holds and re-read the
durable from its ack floor, in stream order.

Failure: a fetch that fails (the connection is reconnecting) is retried a second later;
an ack, nak or term that cannot be sent is logged, and the ack wait redelivers the
record. ``stop`` stops fetching, lets the records in hand finish (a retry waiting in
place is handed back at once instead), and after ``grace`` seconds cancels what is
still running and hands it back with a nak, so another process (or the next start)
gets it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from commhub.core.aio import cancel_and_wait
from commhub.core.envelope import invalid_id
from commhub.core.retry import (
    Decision,
    Permanent,
    Retry,
    RetryPolicy,
    decide,
    exhausted,
)
from commhub.core.serial import KeyedSerialRunner
from commhub.core.subjects import valid_token

if TYPE_CHECKING:
    from commhub.core.bus import Bus

__all__ = [
    "Delivery",
    "DeliveryLoop",
    "DeliveryStats",
    "GiveUpHook",
    "Permanent",
    "Retry",
    "RetryHook",
    "RetryPolicy",
    "last_token",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_ACK_WAIT = 30.0  # seconds; held records are kept alive every third of it
FETCH_RETRY_SECONDS = 1.0


def last_token(subject: str) -> str:
    """The subject's last token: the conversation of ``in``, ``out`` and ``wf`` subjects."""
    return subject.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Delivery(Generic[T]):
    """One attempt at one record, as the handler sees it.

    ``seq`` is the stream sequence (a channel's cursor). ``delivered`` is JetStream's
    delivery count (1 the first time). ``attempt`` counts attempts across deliveries
    (see :mod:`commhub.core.retry`): it only grows, so it can be shown to a receiver.
    ``msg`` is the JetStream message, for ``in_progress()`` only: the loop settles it.
    """

    record: T
    subject: str
    key: str
    seq: int
    delivered: int
    attempt: int
    msg: Msg = dataclasses.field(repr=False, compare=False)


@dataclass
class DeliveryStats:
    """Counters since the loop started."""

    fetched: int = 0
    acked: int = 0
    retried: int = 0  # failed attempts retried in place
    handed_back: int = 0  # failed attempts handed back with a nak and a delay
    terminated: int = 0  # invalid records (undecodable, Permanent), reported
    given_up: int = 0  # dead letters, reported
    ignored_redeliveries: int = 0  # redelivered while the first copy was still held
    redelivered: int = 0  # taken up with num_delivered > 1 (a crash, a lost ack, a nak)
    rewinds: int = 0  # re-reads from the ack floor after deliveries that went elsewhere


Handler = Callable[[Delivery[T]], Awaitable[None]]
Decoder = Callable[[str, bytes], T]
RetryHook = Callable[[Delivery[T], BaseException, Decision], Awaitable[None]]
GiveUpHook = Callable[[Delivery[T], BaseException | None, str], Awaitable[None]]


class DeliveryLoop(Generic[T]):
    """A durable pull consumer with per-key order, retries and dead letters; see the
    module docstring for the guarantees.

    ``consumer`` names the durable (``durable_name``) and says what it reads
    (``filter_subject``/``filter_subjects``, ``deliver_policy``, ``description``,
    ``ack_wait``); the loop sets explicit acks, ``max_deliver`` and ``max_ack_pending``.
    An existing durable keeps the settings it was created with; the loop bounds
    deliveries by the policy's counts all the same. ``source`` names the reporter on
    ``evt.invalid`` (``router``, ``channel:NAME``).

    ``on_retry(delivery, error, decision)`` is awaited after each failed attempt that
    will be tried again (``decision.action`` is ``retry`` or ``nak``, ``decision.delay``
    the wait), ``on_give_up(delivery, error, reason)`` before a record is given up
    (``error`` is None when it ran out of deliveries without an outcome). Their own
    exceptions are logged and ignored.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        stream: str,
        consumer: ConsumerConfig,
        decode: Decoder[T],
        handler: Handler[T],
        source: str,
        policy: RetryPolicy | None = None,
        max_in_flight: int = 256,
        batch: int = 64,
        fetch_timeout: float = 1.0,
        key: Callable[[str], str] = last_token,
        rewind_unacked: bool = False,
        on_retry: RetryHook[T] | None = None,
        on_give_up: GiveUpHook[T] | None = None,
        unwrap: Callable[[str], str] | None = None,
        strict_order: bool = False,
    ) -> None:
        if consumer.durable_name is None:
            raise ValueError("a delivery loop needs a durable consumer (durable_name)")
        if max_in_flight < 1 or batch < 1:
            raise ValueError("max_in_flight and batch must be at least 1")
        self.bus = bus
        self.stream = stream
        self.policy = policy or RetryPolicy()
        self.ack_wait = float(consumer.ack_wait or DEFAULT_ACK_WAIT)
        self.consumer = dataclasses.replace(
            consumer,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            # One delivery more than the policy allows: the last one only reports.
            max_deliver=self.policy.max_deliver + 1,
            max_ack_pending=max(consumer.max_ack_pending or 0, max_in_flight),
        )
        self.durable: str = consumer.durable_name
        self.source = source
        self.max_in_flight = max_in_flight
        self.batch = batch
        self.fetch_timeout = fetch_timeout
        self.stats = DeliveryStats()
        self._decode = decode
        self._handler = handler
        self._key = key
        self._rewind_unacked = rewind_unacked
        self._fenced = False  # stopped with no grace: take nothing more
        self._strict_order = strict_order
        # The durable's delivery number the next message here must carry (strict order).
        self._next_delivery: int | None = None
        self._on_retry = on_retry
        self._on_give_up = on_give_up
        # The subject a record was published on, from the one it is stored under (the
        # router's partitioned inputs); decoding, keys and reports use it.
        self._unwrap = unwrap or (lambda subject: subject)
        self._runner = KeyedSerialRunner()
        self._held: dict[int, Msg] = {}  # stream sequence -> message, fetched and unsettled
        self._room = asyncio.Event()
        self._stopping = asyncio.Event()
        self._sub: Any = None
        self._fetcher: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the durable (creating it if needed) and start fetching. Raises if the
        bus cannot bind it."""
        self._sub = await self.bus.bind_durable(
            self.stream, self.consumer, rewind_unacked=self._rewind_unacked
        )
        if self._strict_order:
            self._next_delivery = await self._delivered_so_far() + 1
        self._fetcher = asyncio.create_task(self._fetch_loop(), name=f"{self.durable}-fetch")
        self._heartbeat = asyncio.create_task(self._keep_alive(), name=f"{self.durable}-beat")

    @property
    def held(self) -> int:
        """Records fetched and not yet settled."""
        return len(self._held)

    async def stop(self, grace: float | None = None) -> None:
        """Stop fetching, let the records in hand finish, then unbind.

        The pull request in flight is let finish (at most ``fetch_timeout`` and a few
        seconds): a cancelled one would leave the server sending records to an inbox
        nobody reads, which come back only after the ack wait. Records in hand are
        handled (a failed one is handed back instead of retried in place). After
        ``grace`` seconds (None: no limit) the handlers still running are cancelled,
        and every record not settled by then is handed back with a nak, at once.
        ``grace=0`` is the fenced stop of a process that lost its lease: the handlers
        are cancelled first, and the pull in flight is handed back unrun.
        """
        self._stopping.set()
        self._room.set()
        if grace == 0:
            # Fenced: another process may own these records from now on, so nothing here
            # may commit another step. What runs is cancelled before anything is waited
            # for; the records of the pull in flight are not run, and everything is
            # handed back below, once that pull is over.
            self._fenced = True
            await self._runner.cancel()
        fetcher, self._fetcher = self._fetcher, None
        if fetcher is not None:
            try:
                await asyncio.wait_for(asyncio.shield(fetcher), self.fetch_timeout + 5)
            except TimeoutError:
                await cancel_and_wait(fetcher)
        try:
            await asyncio.wait_for(self._runner.join(), grace)
        except TimeoutError:
            log.info("%s: %d records still in hand after %.1f s; handing them back",
                     self.durable, len(self._held), grace)
            await self._runner.cancel()
        for msg in list(self._held.values()):  # queued behind a cancelled one: never ran
            await _settle(msg.nak)
        self._held.clear()
        if self._heartbeat is not None:
            await cancel_and_wait(self._heartbeat)
            self._heartbeat = None
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):  # the connection may be closing
                await sub.unsubscribe()

    # -- fetching -----------------------------------------------------------------------
    async def _fetch_loop(self) -> None:
        failing = False  # an outage is logged once, not on every retry
        while not self._stopping.is_set():
            free = self.max_in_flight - len(self._held)
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                msgs = await self._sub.fetch(min(free, self.batch), timeout=self.fetch_timeout)
            except (TimeoutError, nats.errors.TimeoutError):
                failing = False
                continue  # nothing pending: not an error
            except Exception as exc:  # the bus is reconnecting, or closing
                if self._stopping.is_set():
                    break
                if not failing:
                    log.warning("%s: fetch failed (%r); retrying every %.0f s until it works",
                                self.durable, exc, FETCH_RETRY_SECONDS)
                failing = True
                await asyncio.sleep(FETCH_RETRY_SECONDS)
                continue
            failing = False
            for msg in msgs:
                if self._fenced:  # unrun: handed back by the stop
                    self._held.setdefault(int(msg.metadata.sequence.stream), msg)
                elif self._went_elsewhere(msg):
                    await self._rewind()
                    break  # the rest of the batch comes again, in order
                else:
                    self._take(msg)

    def _went_elsewhere(self, msg: Msg) -> bool:
        """Strict order: whether deliveries before this one reached no reader here.

        JetStream numbers a durable's deliveries one by one (redeliveries included).
        A number skipped means a delivery went elsewhere: to this process's inbox while
        its connection was down (a node died), or to a process that has lost its lease
        but still had a pull request open. That record comes back only after the ack
        wait, and the records after it would overtake it."""
        if self._next_delivery is None:
            return False
        number = int(msg.metadata.sequence.consumer)
        if number > self._next_delivery:
            log.warning("%s: deliveries %d to %d reached no reader here (a lost connection "
                        "or another reader); re-reading from the first record not acked, "
                        "to keep the order", self.durable, self._next_delivery, number - 1)
            return True
        self._next_delivery = max(self._next_delivery, number + 1)
        return False

    async def _rewind(self) -> None:
        """Strict order, after deliveries went elsewhere: let the records in hand
        (all before the gap) finish and ack, then re-read the durable from its ack
        floor (:meth:`Bus.bind_durable` recreates it there), so that everything not
        acked comes again in stream order. Retried every second while the bus is away;
        returns at once when the loop is stopping."""
        self.stats.rewinds += 1
        await self._runner.join()
        old, self._sub = self._sub, None
        with contextlib.suppress(Exception):
            await old.unsubscribe()
        while not self._stopping.is_set():
            try:
                self._sub = await self.bus.bind_durable(
                    self.stream, self.consumer, rewind_unacked=True)
                self._next_delivery = await self._delivered_so_far() + 1
                return
            except Exception as exc:
                log.warning("%s: could not re-read from the ack floor (%r); trying again "
                            "in %.0f s", self.durable, exc, FETCH_RETRY_SECONDS)
                await asyncio.sleep(FETCH_RETRY_SECONDS)

    async def _delivered_so_far(self) -> int:
        info = await self.bus.js.consumer_info(self.stream, self.durable)
        return int(info.delivered.consumer_seq) if info.delivered else 0

    def _take(self, msg: Msg) -> None:
        seq = int(msg.metadata.sequence.stream)
        if seq in self._held:
            # Redelivered while its first copy waits or runs here: that copy settles it.
            self.stats.ignored_redeliveries += 1
            return
        self.stats.fetched += 1
        self._held[seq] = msg
        self._runner.submit(self._key(self._unwrap(msg.subject)), self._job(msg, seq))

    def _job(self, msg: Msg, seq: int) -> Callable[[], Awaitable[None]]:
        async def job() -> None:
            keep = False
            try:
                await self._process(msg)
            except asyncio.CancelledError:
                if self._fenced:
                    # The fenced stop hands it back after the pull in flight is over,
                    # which would otherwise get it again at once.
                    keep = True
                else:
                    await asyncio.shield(_settle(msg.nak))  # stopping: hand it back now
                raise
            finally:
                if not keep:
                    self._held.pop(seq, None)
                self._room.set()

        return job

    async def _keep_alive(self) -> None:
        """Tell JetStream every held record is still being worked on."""
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            for msg in list(self._held.values()):
                with contextlib.suppress(Exception):  # settled meanwhile, or reconnecting
                    await msg.in_progress()

    # -- one record ---------------------------------------------------------------------
    async def _process(self, msg: Msg) -> None:
        subject = self._unwrap(msg.subject)
        seq = int(msg.metadata.sequence.stream)
        delivered = int(msg.metadata.num_delivered)
        if delivered > 1:
            self.stats.redelivered += 1
        key = self._key(subject)
        try:
            record = self._decode(subject, msg.data)  # may refuse the subject in its words
            if not valid_token(key):
                raise Permanent(
                    f"subject token {key[:200]!r} is not a valid id: use 1-128 letters, "
                    "digits, '-' or '_'"
                )
        except Permanent as exc:
            await self._terminate(msg, exc.reason)
            return
        except Exception as exc:  # any reason at all: a redelivery would fail the same way
            await self._terminate(msg, f"undecodable: {type(exc).__name__}: {exc}")
            return
        policy = self.policy
        delivery = Delivery(record, subject, key, seq, delivered,
                            policy.attempt_number(delivered), msg)
        if exhausted(policy, delivered):
            await self._give_up(delivery, None, f"delivered {delivered} times without an "
                                "outcome (the process stopped or died each time)")
            return
        tries = 1
        while True:
            failure: Exception | None = None
            try:
                await self._handler(delivery)
            except Exception as exc:
                failure = exc
            decision = decide(policy, attempt=delivery.attempt, delivered=delivered,
                              failure=failure, stopping=self._stopping.is_set())
            if decision.action == "ack":
                self.stats.acked += 1
                await _settle(msg.ack)
                return
            assert failure is not None
            if decision.action == "term":
                await self._terminate(msg, _describe(failure))
                return
            if decision.action == "give_up":
                await self._give_up(delivery, failure, f"gave up after attempt "
                                    f"{delivery.attempt} (delivery {delivered}): "
                                    f"{_describe(failure)}")
                return
            self._log_failure(delivery, failure, decision)
            await self._hook_retry(delivery, failure, decision)
            if decision.action == "retry":
                self.stats.retried += 1
                if not await self._stopped_within(decision.delay):
                    tries += 1
                    delivery = dataclasses.replace(
                        delivery, attempt=policy.attempt_number(delivered, tries)
                    )
                    continue
            self.stats.handed_back += 1
            await _settle(msg.nak, decision.delay)
            return

    async def _stopped_within(self, seconds: float) -> bool:
        """Wait ``seconds``; True at once if the loop starts stopping meanwhile."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _terminate(self, msg: Msg, reason: str) -> None:
        self.stats.terminated += 1
        log.warning("%s: refused %s (seq %s): %s", self.durable, self._unwrap(msg.subject),
                    msg.metadata.sequence.stream, reason)
        # Under the id of its stream position: every process and the recorder that
        # refuse the same record make one report of it.
        record_id = invalid_id(self.stream, int(msg.metadata.sequence.stream))
        await self.bus.publish_invalid(self._unwrap(msg.subject), msg.data, reason, self.source,
                                       record_id=record_id)
        await _settle(msg.term)

    async def _give_up(
        self, delivery: Delivery[T], failure: BaseException | None, reason: str
    ) -> None:
        self.stats.given_up += 1
        log.error("%s: %s (seq %d, key %s): %s", self.durable, delivery.subject,
                  delivery.seq, delivery.key, reason)
        if self._on_give_up is not None:
            try:
                await self._on_give_up(delivery, failure, reason)
            except Exception:
                log.exception("%s: on_give_up failed", self.durable)
        msg = delivery.msg
        await self.bus.publish_invalid(self._unwrap(msg.subject), msg.data,
                                       f"dead letter: {reason}", self.source)
        await _settle(msg.term)

    async def _hook_retry(
        self, delivery: Delivery[T], failure: BaseException, decision: Decision
    ) -> None:
        if self._on_retry is None:
            return
        try:
            await self._on_retry(delivery, failure, decision)
        except Exception:
            log.exception("%s: on_retry failed", self.durable)

    def _log_failure(
        self, delivery: Delivery[T], failure: BaseException, decision: Decision
    ) -> None:
        then = ("retrying in %.2f s" if decision.action == "retry"
                else "handed back; next try in %.2f s") % decision.delay
        log.warning("%s: %s (seq %d, key %s) attempt %d failed: %s; %s",
                    self.durable, delivery.subject, delivery.seq, delivery.key,
                    delivery.attempt, _describe(failure), then,
                    # A handler that raises Retry said what went wrong; anything else
                    # is unexpected and gets its traceback.
                    exc_info=None if isinstance(failure, Retry) else failure)


def _describe(failure: BaseException) -> str:
    if isinstance(failure, Permanent | Retry):
        return failure.reason
    return f"{type(failure).__name__}: {failure}"


async def _settle(action: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Send an ack, nak or term; best effort (the ack wait is the backstop)."""
    try:
        await action(*args)
    except Exception as exc:  # already settled, or the connection is down
        log.debug("could not settle a message: %r", exc)
