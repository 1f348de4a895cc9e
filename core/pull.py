"""Fetching batches from a durable pull consumer: one pull request per batch, the records
gathered by a subscription callback.

nats-py's ``PullSubscription.fetch`` waits for each record of a batch with
``asyncio.wait_for`` (a task and a timer per record) and probes with a second request when
the first finds nothing: fetching and acking a record that way costs 60-70 us of CPU here,
against 12-15 us for the same pull requests read by a callback (``bench/bench_recorder.py``
prints both). The recorder fetches four or five records a turn and the router one
(docs/architecture.md, "Fetching a batch with one pull request", has the hub's before and
after).

:class:`Puller` sends the request nats-py sends (``batch``, ``expires``, ``no_wait``: the
server answers at once with what is there and a "404 No Messages" status after it, or, when
nothing is there, with the first record that arrives before ``expires``, else a "408
Request Timeout") to a reply subject of its own for each request, so a status left over
from an earlier request that the client stopped waiting for is told apart and ignored.
Records carry no such mark (their subject is the one they were published on), so a record
that arrives between fetches is kept and returned by the next one. A fetch with ``fill``
leaves out ``no_wait``: the server then holds the request until ``batch`` records came or
``expires`` passed, for a reader that may wait (the recorder), which then costs one
request and one status per interval instead of per record or two at a low rate.

Concurrency: one :meth:`Puller.fetch` at a time, on the event loop of the connection.
Failure: a fetch whose request got no answer (a reconnect lost it) ends after
``timeout`` plus :data:`ANSWER_GRACE_SECONDS` like one that found nothing, with
``nats.errors.TimeoutError``, and so does one ended by a passing "409" (the consumer's
leader changed, or its server is shutting down: the next request finds the new one); any
other status (409 "Consumer Deleted", ...) raises ``nats.js.errors.APIError`` when the
fetch got no record; a closed connection raises what ``publish`` raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import Header, StatusCode
from nats.js.errors import APIError

log = logging.getLogger(__name__)

#: How long past a request's ``expires`` a fetch waits for the server's "408" before it
#: takes the request for lost (a reconnect drops the requests in flight).
ANSWER_GRACE_SECONDS = 1.0

#: The server ends a request this long before the client stops waiting for it, so that its
#: "408" arrives first (nats-py keeps the same margin).
EXPIRES_MARGIN_NS = 100_000

API_PREFIX = "$JS.API"

#: Statuses that end a request without an error.
_ENDS = {StatusCode.NO_MESSAGES, StatusCode.REQUEST_TIMEOUT}

#: Descriptions of the 409s that end a request because of a passing event rather than a
#: problem with the consumer.
_PASSING = {"Leadership Change", "Server Shutdown"}


class Puller:
    """A durable pull consumer's fetches over one wildcard inbox; see the module doc.

    ``fetch`` and ``unsubscribe`` have the signatures of nats-py's ``PullSubscription``
    methods the hub uses.
    """

    def __init__(self, nc: NATS, stream: str, durable: str, *, prefix: str = API_PREFIX):
        self.nc = nc
        self.stream = stream
        self.durable = durable
        self._next_subject = f"{prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._records: list[Msg] = []  # delivered, not yet returned by a fetch
        self._sequence = 0  # the id of the last request sent
        self._request = 0  # the id of the request a fetch waits on; 0: none
        self._wanted = 0
        self._status: Msg | None = None  # what ended the current request
        self._answered = asyncio.Event()

    async def start(self) -> Puller:
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)
        return self

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(Header.STATUS) if msg.headers and not msg.data else None
        if status is None:
            self._records.append(msg)
            if self._request and len(self._records) >= self._wanted:
                self._answered.set()
            return
        if status == StatusCode.CONTROL_MESSAGE:  # an idle heartbeat
            return
        if msg.subject == f"{self._inbox}.{self._request}":
            self._status = msg
            self._answered.set()
        # else: the end of a request no fetch waits on any more

    async def fetch(
        self, batch: int = 1, timeout: float | None = 5.0, *, fill: bool = False
    ) -> list[Msg]:
        """Up to ``batch`` records: those already delivered, or what one pull request
        brings within ``timeout`` seconds, returned as soon as the server has sent what it
        holds, or with ``fill`` only once ``batch`` records came or ``timeout`` passed
        (one request and one status per ``timeout`` however many records trickle in,
        for a reader that may wait). Raises ``nats.errors.TimeoutError`` when nothing
        came."""
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if self._records:
            return self._take(batch)
        seconds = 5.0 if timeout is None else timeout
        self._sequence += 1
        self._request = self._sequence
        self._wanted = batch
        self._status = None
        self._answered.clear()
        expires = max(int(seconds * 1_000_000_000) - EXPIRES_MARGIN_NS, 1_000_000)
        request: dict[str, int | bool] = {"batch": batch, "expires": expires}
        if not fill:
            request["no_wait"] = True
        try:
            await self.nc.publish(self._next_subject, json.dumps(request).encode(),
                                  reply=f"{self._inbox}.{self._request}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answered.wait(), seconds + ANSWER_GRACE_SECONDS)
        finally:
            self._request = 0  # a late end of this request is ignored from now on
        if self._records:
            return self._take(batch)
        status = self._status
        if status is None or status.headers is None or _ends_quietly(status.headers):
            raise nats.errors.TimeoutError
        APIError.from_msg(status)  # raises
        raise AssertionError("unreachable")

    def _take(self, batch: int) -> list[Msg]:
        taken, self._records = self._records[:batch], self._records[batch:]
        return taken

    async def unsubscribe(self) -> None:
        """Stop reading the inbox; records delivered and not fetched yet are handed back
        (nak) so that they come again at once rather than after the ack wait."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        left, self._records = self._records, []
        for msg in left:
            with contextlib.suppress(Exception):
                await msg.nak()
        if left:
            log.debug("%s: handed back %d records delivered after the last fetch",
                      self.durable, len(left))


def _ends_quietly(headers: dict[str, str]) -> bool:
    """Does this status end a request as "nothing for now" rather than as an error?"""
    code = headers.get(Header.STATUS)
    if code in _ENDS:
        return True
    return code == "409" and headers.get(Header.DESCRIPTION, "") in _PASSING
