"""A subject's stored messages after a sequence, read with batched direct gets.

Resuming readers (a WebSocket client with a cursor, an HTTP long poll, a Rasa turn) need
the messages of one conversation stored after a cursor. A JetStream consumer per reader
would do it, but nats-server allows only so many consumers per stream, and creating one
costs more than the read itself. A *direct get* needs no consumer:
``$JS.API.DIRECT.GET.<stream>`` with ``{"seq": N, "next_by_subj": S, "batch": B}``
answers up to B stored messages on subject S from sequence N on, in order, then an
end-of-batch status (``204 EOB``) carrying how many more match (``Nats-Num-Pending``);
``404`` when nothing matches. The stream needs ``allow_direct`` (set by
:meth:`commhub.core.bus.Bus.ensure_streams`).

:class:`HistoryReader` owns one wildcard inbox subscription and routes each reply to the
read that asked, so a read costs one request per batch and no subscribe/unsubscribe.
The reply parsing is the pure :func:`parse_reply`.

Coherence: a stream with one replica (what commhub creates) answers from its only copy,
so a read sees every message stored before the request. With replicas, nats-server lets
a replica answer once it is nearly caught up, which may miss the newest messages.

A server older than 2.11 ignores ``batch`` and answers one message without
``Nats-Num-Pending``; the reader then walks forward one message per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from commhub.core.envelope import new_id

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

__all__ = [
    "DIRECT_GET",
    "End",
    "Failed",
    "HistoryError",
    "HistoryReader",
    "NotFound",
    "Stored",
    "parse_reply",
]

log = logging.getLogger(__name__)

DIRECT_GET = "$JS.API.DIRECT.GET."


class HistoryError(Exception):
    """A history read failed (the server refused, or did not answer in time)."""


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored message. ``pending`` is how many more match after it in this batch's
    view (None from a server that does not batch)."""

    seq: int
    subject: str
    data: bytes
    pending: int | None


@dataclass(frozen=True, slots=True)
class End:
    """End of a batch: ``pending`` more matching messages are stored past it."""

    pending: int


@dataclass(frozen=True, slots=True)
class NotFound:
    """No stored message matches from the requested sequence on."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The server refused the request; ``reason`` is its status and description."""

    reason: str


Reply = Stored | End | NotFound | Failed


def parse_reply(headers: dict[str, str] | None, data: bytes) -> Reply:
    """What one direct-get reply means, from its headers (as nats-py parses them)."""
    headers = headers or {}
    status = headers.get("Status")
    if status is None:
        try:
            seq = int(headers["Nats-Sequence"])
            subject = headers["Nats-Subject"]
        except (KeyError, ValueError):
            return Failed("a direct get reply without Nats-Sequence or Nats-Subject")
        pending = headers.get("Nats-Num-Pending")
        return Stored(seq, subject, data, int(pending) if pending is not None else None)
    if status == "204":
        return End(int(headers.get("Nats-Num-Pending") or 0))
    if status == "404":
        return NotFound()
    if status == "503":
        return Failed("503 no responders: is allow_direct set on the stream?")
    return Failed(f"{status} {headers.get('Description', '')}".strip())


_encode = msgspec.json.Encoder().encode


class HistoryReader:
    """Reads stored messages of one subject after a sequence, for many readers at once.

    Concurrency: :meth:`read` may run in many tasks at once; each has its own reply
    token on the shared inbox. Cancel: a cancelled read drops its token at once (no
    await in its cleanup); a late reply to it is ignored. Failure: a refused request or
    a reply that does not come within ``timeout`` seconds raises :class:`HistoryError`.
    """

    def __init__(
        self,
        nc: NATS,
        stream: str,
        *,
        batch: int = 256,
        max_bytes: int = 1 << 20,
        timeout: float = 5.0,
    ) -> None:
        self.nc = nc
        self.stream = stream
        self.batch = batch
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._inbox = f"_INBOX.{new_id()}"
        self._readers: dict[str, asyncio.Queue[Msg]] = {}
        self._sub: Subscription | None = None
        self._opening: asyncio.Lock = asyncio.Lock()

    async def _ensure_open(self) -> None:
        async with self._opening:
            if self._sub is None:
                self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._route)

    async def close(self) -> None:
        """Stop routing replies; reads in flight time out. Safe to call twice."""
        sub, self._sub = self._sub, None
        if sub is not None and not self.nc.is_closed:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection may be closing
                log.debug("history inbox unsubscribe: %r", exc)

    async def _route(self, msg: Msg) -> None:
        queue = self._readers.get(msg.subject.rsplit(".", 1)[-1])
        if queue is not None:
            queue.put_nowait(msg)

    async def read(self, subject: str, after: int) -> AsyncIterator[Stored]:
        """Yield the messages stored on ``subject`` with sequence > ``after``, in order,
        up to the last one stored when the read reaches the end."""
        await self._ensure_open()
        token = new_id()
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._readers[token] = queue
        start = after + 1
        try:
            while True:
                request: dict[str, Any] = {"seq": start, "next_by_subj": subject,
                                           "batch": self.batch, "max_bytes": self.max_bytes}
                try:
                    await self.nc.publish(DIRECT_GET + self.stream, _encode(request),
                                          reply=f"{self._inbox}.{token}")
                except Exception as exc:  # closed, or too much buffered while reconnecting
                    raise HistoryError(f"direct get not sent: {exc!r}") from exc
                batch: list[Stored] = []
                more: int | None = None
                while more is None:
                    try:
                        async with asyncio.timeout(self.timeout):
                            msg = await queue.get()
                    except TimeoutError:
                        raise HistoryError(
                            f"no direct get reply from stream {self.stream} in "
                            f"{self.timeout:g} s") from None
                    reply = parse_reply(msg.headers, msg.data)
                    if isinstance(reply, Stored):
                        batch.append(reply)
                        if reply.pending is None:  # a server that does not batch
                            more = 1
                    elif isinstance(reply, End):
                        more = reply.pending
                    elif isinstance(reply, NotFound):
                        more = 0
                    else:
                        raise HistoryError(f"direct get on {self.stream}: {reply.reason}")
                for stored in batch:
                    yield stored
                if more == 0 or not batch:
                    return
                start = batch[-1].seq + 1
        finally:
            del self._readers[token]
