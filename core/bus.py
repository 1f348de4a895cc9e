"""The bus: the one adapter between commhub and nats-py.

It connects, creates the streams and the state bucket idempotently, and publishes
envelope records with their id as ``Nats-Msg-Id`` so that JetStream drops a re-published
copy within the duplicate window.

Concurrency: a Bus is shared by every component of one process; nats-py multiplexes one
connection, and every method here is safe to call from many tasks at once.
Failure: a JetStream publish that gets no acknowledgement raises (``nats.errors.Timeout``
or ``nats.js.errors.APIError``); callers that must not lose a record do not ack their
own input until the publish returned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
)
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from commhub.core import natsconnect, streams
from commhub.core.busfaults import BUS_UNAVAILABLE
from commhub.core.envelope import InvalidRecord, Record, encode, new_id
from commhub.core.pull import Puller
from commhub.core.subjects import Subjects

__all__ = ["Bus", "DUPLICATE_WINDOW_SECONDS"]

log = logging.getLogger(__name__)

# How long JetStream remembers a Nats-Msg-Id. A handler re-run on a message redelivered
# within this window re-publishes ids that JetStream drops. Longer than any ack wait.
DUPLICATE_WINDOW_SECONDS = streams.DUPLICATE_WINDOW_SECONDS
# How long the stream setup waits for a JetStream that does not answer yet.
SETUP_PATIENCE_SECONDS = 60.0


class Bus:
    """A connected NATS client with commhub's streams, bucket and publish helpers."""

    def __init__(
        self, nc: NATS, subjects: Subjects, replicas: int = 1,
        layout: streams.Layout | None = None,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=10)
        self.subjects = subjects
        self.layout = layout or streams.Layout(replicas=replicas)
        self.replicas = self.layout.replicas
        self._kv: KeyValue | None = None
        self._reconnect_listeners: list[Callable[[], None]] = []

    @classmethod
    async def connect(
        cls, url: str, subjects: Subjects, name: str = "commhub", replicas: int = 1,
        layout: streams.Layout | None = None, **options: Any,
    ) -> Bus:
        """Connect to ``url`` (comma-separated servers allowed), then reconnect forever.

        The first connect is bounded: no server within the deadline, or a refused login,
        raises :class:`~commhub.core.natsconnect.NatsConnectError` (one line, no
        secrets). ``options`` go to nats-py (credentials, TLS).
        """
        listeners: list[Callable[[], None]] = []

        async def reconnected_cb() -> None:
            for listener in list(listeners):
                try:
                    listener()
                except Exception:
                    log.exception("reconnect listener failed")

        nc = await natsconnect.connect(url, name=name, reconnected_cb=reconnected_cb, **options)
        bus = cls(nc, subjects, replicas, layout)
        bus._reconnect_listeners = listeners
        return bus

    def on_reconnect(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` (on the event loop, must not block) after each reconnect.

        For parts that hold server-side state a restarted server may have lost (an
        ephemeral consumer). Returns a function that removes the listener. A Bus built
        directly on a client (not with :meth:`connect`) never calls it.
        """
        self._reconnect_listeners.append(listener)

        def remove() -> None:
            if listener in self._reconnect_listeners:
                self._reconnect_listeners.remove(listener)

        return remove

    # -- setup ----------------------------------------------------------------------
    async def ensure_streams(self) -> list[str]:
        """Create what is missing (streams and buckets, with :attr:`layout`'s replicas
        and placement) and bring commhub's own fields of existing streams up to date,
        keeping what an operator changed (see :mod:`commhub.core.streams`); safe to run
        every start. Returns a line per object that changed.

        A JetStream that does not answer (a new cluster electing its first leader) is
        waited for, with one warning, up to :data:`SETUP_PATIENCE_SECONDS`; then
        :class:`~commhub.core.streams.StreamSetupError` (one line). Other errors
        (refused permissions, replicas the cluster cannot hold) fail at once."""
        deadline = time.monotonic() + SETUP_PATIENCE_SECONDS
        waiting = False
        while True:
            try:
                lines = await streams.reconcile(self.js, self.subjects, self.layout)
                break
            except BUS_UNAVAILABLE as exc:
                # A cluster that is still electing leaders, or busy making the streams
                # another process asked for: try again, for a while.
                if time.monotonic() > deadline:
                    raise streams.StreamSetupError(
                        f"JetStream did not answer the stream setup within "
                        f"{SETUP_PATIENCE_SECONDS:.0f} s ({exc!r}): is JetStream enabled, "
                        "and does the cluster have a leader?") from None
                if not waiting:  # one line per wait, not one a second
                    log.warning("JetStream does not answer the stream setup yet (%r); "
                                "waiting up to %.0f s", exc, SETUP_PATIENCE_SECONDS)
                    waiting = True
                await asyncio.sleep(1.0)
        for line in lines:
            log.info("%s", line)
        return lines

    async def check_streams(self) -> None:
        """Raise :class:`~commhub.core.streams.StreamSetupError` unless every stream and
        bucket exists (a process that does not manage them: ``manage_streams = false``)."""
        await streams.check(self.js, self.subjects)

    async def bind_durable(
        self, stream: str, config: ConsumerConfig, *, rewind_unacked: bool = False
    ) -> Puller:
        """Bind a durable pull consumer, creating it with ``config`` if it does not exist,
        and return a :class:`~commhub.core.pull.Puller` that fetches from it.

        ``rewind_unacked`` is for a process that knows it is the durable's only consumer
        (the recorder; the router of a hub that runs its own embedded server): if the
        durable has deliveries pending ack, an earlier process died holding them, and
        they would come back only after the ack wait. The durable is then recreated from
        its ack floor so they come back at once; whatever past the floor was already
        handled is skipped by the consumer's own idempotence.
        """
        name = config.durable_name
        assert name is not None
        try:
            info = await self.js.consumer_info(stream, name)
        except NotFoundError:
            info = None
        if info is not None and rewind_unacked and info.num_ack_pending:
            start = (info.ack_floor.stream_seq if info.ack_floor else 0) + 1
            log.info("%s: %d deliveries of a dead process pending; redelivering from %d",
                     name, info.num_ack_pending, start)
            await self.js.delete_consumer(stream, name)
            if not await self._is_work_queue(stream):
                config = dataclasses.replace(
                    config, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
                )
            # (On a work-queue stream, deliver-all already starts at the first record not
            # acked: acked ones are gone. It is the only policy such a stream allows.)
            info = None
        if info is None:
            await self.js.add_consumer(stream, config=config)
        return await Puller(self.nc, stream, name).start()

    async def _is_work_queue(self, stream: str) -> bool:
        info = await self.js.stream_info(stream)
        return info.config.retention == RetentionPolicy.WORK_QUEUE

    async def state_bucket(self) -> KeyValue:
        """The conversation state bucket (bound on first use)."""
        if self._kv is None:
            self._kv = await self.bucket(self.subjects.state_bucket)
        return self._kv

    async def bucket(self, name: str, layout: streams.Layout | None = None) -> KeyValue:
        """One of commhub's KV buckets, created (with the layout's replicas and
        placement; ``layout`` instead of :attr:`layout`) if it does not exist; an
        existing one is used as it is."""
        try:
            return await self.js.key_value(name)
        except NotFoundError:
            pass
        layout = layout or self.layout
        for config in streams.bucket_configs(self.subjects, layout):
            if config.bucket == name:
                await streams.reconcile_bucket(self.js, config, layout)
                return await self.js.key_value(name)
        raise ValueError(f"{name} is not one of commhub's buckets")

    # -- publishing -----------------------------------------------------------------
    async def publish(self, subject: str, record: Record) -> Any:
        """Publish one record durably and wait for JetStream's ack (one round trip)."""
        return await self.js.publish(
            subject, encode(record), headers={"Nats-Msg-Id": record.id}
        )

    async def publish_all(self, items: Iterable[tuple[str, Record]]) -> list[Any]:
        """Publish many records pipelined, then wait for every ack.

        Order across the records is not guaranteed to be the order of acks, but
        JetStream stores messages of one subject in publish order since nats-py writes
        them to one connection in order. Raises if any publish failed; the ones that
        succeeded stay stored, and a retry re-publishes them harmlessly (same ids).
        """
        futures = [
            await self.js.publish_async(
                subject, encode(record), headers={"Nats-Msg-Id": record.id}
            )
            for subject, record in items
        ]
        if not futures:
            return []
        return list(await asyncio.wait_for(asyncio.gather(*futures), timeout=10))

    async def publish_invalid(
        self, subject: str, data: bytes, reason: str, source: str, *, record_id: str | None = None
    ) -> None:
        """Report input that could not be accepted on ``{prefix}.evt.invalid``.

        ``record_id`` names the report (default: a fresh id); reporters of one stored
        record pass :func:`~commhub.core.envelope.invalid_id` so that their reports are
        one. Never raises: reporting bad input must not take down the component that saw it.
        """
        record = InvalidRecord(
            id=record_id or new_id(),
            subject=subject,
            reason=reason,
            data=data[:65536].decode("utf-8", "replace"),
            source=source,
        )
        try:
            await self.publish(self.subjects.invalid, record)
        except Exception:
            log.exception("could not publish an invalid-input record")

    async def close(self) -> None:
        """Flush pending publishes and close; safe to call twice."""
        if self.nc.is_closed:
            return
        try:
            await self.nc.drain()
        except Exception:
            await self.nc.close()
