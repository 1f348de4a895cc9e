"""The HTTP channel's native API: post a message, read messages after a cursor, stream them.

Routes (mounted on the hub's HTTP server by :class:`commhub.channels.http.HttpChannel`;
the reference with examples is ``docs/http.md``):

* ``POST /v1/conversations/{conversation}/messages``: store a user's message durably,
  answer 202 ``{"id", "conversation", "cursor"}`` once JetStream acknowledged it. The
  same ``id`` posted again is answered the same way and stored once (``Nats-Msg-Id``).
* ``GET /v1/conversations/{conversation}/messages?after=&wait=&limit=&both=``: the
  outbound messages after a cursor, in order (with ``both=1``, the conversation's
  inbound messages on this channel too). With nothing to return yet it waits up to
  ``wait`` seconds for the first (a long poll).
* ``GET /v1/conversations/{conversation}/events``: a server-sent events stream of the
  outbound messages (``?both=1``: inbound ones too), each event's ``id`` its cursor;
  resumes after ``Last-Event-ID`` (or ``?after=``); keepalive comments while nothing
  happens.
* ``POST|GET|DELETE /v1/conversations/{conversation}/callback``: a conversation's
  callback URL (see :mod:`commhub.channels.http.callbacks`).

Every endpoint lets a request into its conversation through
:meth:`HttpChannel.enter` (``ctx.claim_conversation``) before it stores, reads or
registers anything: another user's conversation is 403 ``forbidden``.

Concurrency and failure: every request is its own task; reads go through
:meth:`ChannelContext.outbound` (history by direct get, live messages from the channel's
one live consumer), so readers never wait for each other and hold no bus consumer. A
bus failure while storing a message is 503 ``unavailable`` (nothing was stored, or it
was and a retry with the same id is harmless). When the channel stops, long polls
answer with what they have and event streams end (an ``EventSource`` reconnects with
``Last-Event-ID`` by itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web
from nats.js.errors import NotFoundError

from commhub.channels.http.request import (
    ApiError,
    authorize,
    check_conversation,
    check_user,
    cursor_param,
    encode_message,
    flag_param,
    message_id,
    number_param,
    read_json_object,
    text_and_payload,
)
from commhub.channels.sendqueue import SendQueue, SlowConsumer
from commhub.core.aio import cancel_and_join, cancel_and_wait
from commhub.core.channel import OutboundItem
from commhub.core.envelope import Message, Sender, derived_id, new_id
from commhub.core.tokens import Identity

if TYPE_CHECKING:
    from commhub.channels.http.channel import HttpChannel

__all__ = ["NativeApi"]

log = logging.getLogger(__name__)

MESSAGES = "/v1/conversations/{conversation}/messages"
EVENTS = "/v1/conversations/{conversation}/events"
CALLBACK = "/v1/conversations/{conversation}/callback"


class NativeApi:
    """Handlers of the native API for one channel instance."""

    def __init__(self, channel: HttpChannel) -> None:
        self.channel = channel
        self.ctx = channel.ctx
        self.config = channel.config

    def routes(self) -> list[web.RouteDef]:
        wrap = self.channel.handler
        return [
            web.post(MESSAGES, wrap(self.post_message)),
            web.get(MESSAGES, wrap(self.get_messages), allow_head=False),
            web.get(EVENTS, wrap(self.events), allow_head=False),
            web.post(CALLBACK, wrap(self.put_callback)),
            web.get(CALLBACK, wrap(self.get_callback), allow_head=False),
            web.delete(CALLBACK, wrap(self.delete_callback)),
        ]

    # -- POST messages ------------------------------------------------------------------
    async def post_message(self, request: web.Request) -> web.Response:
        conversation = check_conversation(request.match_info["conversation"])
        # The token first, so a client without one learns that before anything about
        # its body; then again with the body's user, which a signed token must match.
        identity = authorize(self.ctx.tokens, request, user=None, conversation=conversation)
        body = await read_json_object(request)
        user = check_user(body.get("user"))
        if user is not None:
            identity = authorize(self.ctx.tokens, request, user=user, conversation=conversation)
        client_id = message_id(body.get("id"))
        text, payload = text_and_payload(body)
        user = user or default_user(identity, conversation)
        await self.channel.enter(conversation, user, identity)
        message = Message(
            id=client_id or new_id(),
            conversation=conversation,
            channel=self.ctx.channel,
            direction="in",
            sender=Sender(id=user, kind="user"),
            text=text,
            payload=payload,
        )
        self.channel.check_rate(conversation)
        cursor = await self.channel.publish(message, request)
        return web.json_response(
            {"id": message.id, "conversation": conversation, "cursor": cursor}, status=202
        )

    # -- GET messages (long poll) -------------------------------------------------------
    async def get_messages(self, request: web.Request) -> web.Response:
        conversation = check_conversation(request.match_info["conversation"])
        identity = authorize(self.ctx.tokens, request, user=None, conversation=conversation)
        await self.channel.enter(conversation, default_user(identity, conversation), identity)
        after = cursor_param(request.query.get("after"), "after") or 0
        wait = number_param(request, "wait", 0.0, 0.0, self.config.max_wait_seconds)
        limit = int(number_param(request, "limit", self.config.default_limit, 1,
                                 self.config.max_limit))
        both = flag_param(request, "both")
        items = await self._read(conversation, after, wait, limit, both)
        cursor = items[-1][0] if items else after
        body = b'{"messages":[' + b",".join(encode_message(c, m) for c, m in items)
        body += b'],"cursor":' + str(cursor).encode() + b"}"
        return web.Response(body=body, content_type="application/json")

    async def _read(
        self, conversation: str, after: int, wait: float, limit: int, both: bool = False
    ) -> list[OutboundItem]:
        """Up to ``limit`` messages after ``after``: those stored when the request came,
        or, when there were none, the first to arrive within ``wait`` seconds (plus any
        stored with it). ``both``: inbound messages too."""
        last = await self._last_cursor(conversation, both)
        found: list[OutboundItem] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        items = self.ctx.outbound(conversation, after=after, inbound=both)
        async with aclosing(items):  # type: ignore[type-var]  # an async generator
            while len(found) < limit:
                cursor = found[-1][0] if found else after
                if cursor >= last:  # caught up with what was stored
                    if found:
                        break
                    timeout = deadline - loop.time()  # nothing yet: wait for a live one
                    if timeout <= 0:
                        break
                    item = await next_item(items, timeout, self.channel.stopping)
                    if item is None:
                        break
                else:
                    # Stored messages come at once; the bound only guards against a
                    # record the iterator skips (undecodable) being the last one. No
                    # task per message here: this is the hot path of a paged read.
                    try:
                        async with asyncio.timeout(self.config.backlog_timeout_seconds):
                            item = await anext(items)
                    except TimeoutError:
                        break
                found.append(item)
                if item[0] > last:  # a live one arrived: take the rest stored with it
                    last = await self._last_cursor(conversation, both)
        return found

    async def _last_cursor(self, conversation: str, both: bool = False) -> int:
        """The stream sequence of the conversation's last outbound message (0: none);
        ``both``: its last inbound or outbound message on this channel."""
        subject = self.ctx.subjects.outbound(self.ctx.channel, conversation)
        if both:
            subject = f"{self.ctx.subjects.prefix}.*.{self.ctx.channel}.{conversation}"
        try:
            msg = await self.ctx.bus.js.get_last_msg(self.ctx.subjects.messages_stream, subject)
        except NotFoundError:
            return 0
        return int(msg.seq or 0)

    # -- GET events (server-sent events) ------------------------------------------------
    async def events(self, request: web.Request) -> web.StreamResponse:
        conversation = check_conversation(request.match_info["conversation"])
        user = check_user(request.query.get("user"))
        identity = authorize(self.ctx.tokens, request, user=user, conversation=conversation)
        await self.channel.enter(conversation, user or default_user(identity, conversation),
                                 identity)
        resumed = cursor_param(request.headers.get("Last-Event-ID"), "Last-Event-ID")
        after = resumed if resumed is not None else cursor_param(request.query.get("after"),
                                                                  "after")
        both = flag_param(request, "both")
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # a proxy must not hold events back
        })
        await response.prepare(request)
        connection = new_id()[:16]
        await self.ctx.publish_event("accepted", connection=connection,
                                     conversation=conversation, user=user)
        items = self.ctx.outbound(conversation, after=after, inbound=both)
        async with aclosing(items):  # type: ignore[type-var]  # an async generator
            reason = await stream_events(
                response, items, after, max_queue=self.config.sse_max_queue,
                keepalive=self.config.sse_keepalive_seconds, stopping=self.channel.stopping,
            )
        await self.ctx.publish_event("closed", connection=connection,
                                     conversation=conversation, user=user, reason=reason)
        return response

    # -- callback registration ----------------------------------------------------------
    async def put_callback(self, request: web.Request) -> web.Response:
        conversation = check_conversation(request.match_info["conversation"])
        identity = authorize(self.ctx.tokens, request, user=None, conversation=conversation)
        await self.channel.enter(conversation, default_user(identity, conversation), identity)
        body = await read_json_object(request)
        store = self.channel.callback_store()
        url = body.get("url")
        if not isinstance(url, str) or not _is_http_url(url):
            raise ApiError(422, "invalid", "'url' must be an http:// or https:// URL")
        registration = await store.put(conversation, url)
        return web.json_response({"conversation": conversation, "url": registration.url})

    async def get_callback(self, request: web.Request) -> web.Response:
        conversation = check_conversation(request.match_info["conversation"])
        identity = authorize(self.ctx.tokens, request, user=None, conversation=conversation)
        await self.channel.enter(conversation, default_user(identity, conversation), identity)
        registration = await self.channel.callback_store().get(conversation)
        if registration is None:
            raise ApiError(404, "not_found", "no callback registered for this conversation")
        return web.json_response({"conversation": conversation, "url": registration.url})

    async def delete_callback(self, request: web.Request) -> web.Response:
        conversation = check_conversation(request.match_info["conversation"])
        identity = authorize(self.ctx.tokens, request, user=None, conversation=conversation)
        await self.channel.enter(conversation, default_user(identity, conversation), identity)
        if not await self.channel.callback_store().delete(conversation):
            raise ApiError(404, "not_found", "no callback registered for this conversation")
        return web.Response(status=204)


def default_user(identity: Identity, conversation: str) -> str:
    """The user of a request that names none: the signed token's, else one per
    conversation, so a client that never names itself is one user across its requests."""
    return identity.user or f"anon-{derived_id(conversation, 'user')[:8]}"


async def next_item(
    items: AsyncIterator[OutboundItem], timeout: float, stopping: asyncio.Event
) -> OutboundItem | None:
    """The next item, or None after ``timeout`` seconds or once ``stopping`` is set.

    A None leaves ``items`` finished (its pending read was cancelled): stop reading it.
    """
    read = asyncio.ensure_future(anext(items))
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({read, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not read.done():  # ended before the caller closes ``items``, even if cancelled
            await cancel_and_join(read)
        await cancel_and_wait(stop)
    if read.cancelled():
        return None
    return read.result()


def _is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and len(url) <= 2048


async def stream_events(
    response: web.StreamResponse,
    items: AsyncIterator[OutboundItem],
    after: int | None,
    *,
    max_queue: int,
    keepalive: float,
    stopping: asyncio.Event,
) -> str:
    """Write ``items`` as server-sent events until the client goes, the queue overflows
    or ``stopping`` is set; return why the stream ended.

    Each event is ``id: <cursor>`` and ``data: <message JSON>``; a comment line every
    ``keepalive`` seconds keeps proxies from closing an idle stream and finds a client
    that went away. Writes are serialised by a lock, so an event and a keepalive never
    interleave.
    """
    lock = asyncio.Lock()

    async def write(data: bytes) -> None:
        async with lock:
            await response.write(data)

    async def send(cursor: int, message: Message) -> None:
        await write(b"id: %d\ndata: %s\n\n" % (cursor, encode_message(cursor, message)))

    async def keep_alive() -> None:
        while True:
            await asyncio.sleep(keepalive)
            await write(b": keepalive\n\n")

    queue = SendQueue(max_queue, after)
    await write(b"retry: 1000\n: connected\n\n")
    pump = asyncio.ensure_future(queue.run(items, send))
    pinger = asyncio.ensure_future(keep_alive())
    stop = asyncio.ensure_future(stopping.wait())
    tasks = {pump, pinger, stop}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # One cancel each, no re-cancel: SendQueue.run cleans up its own reader (re-cancelling
        # it as needed) in its finally, which a second cancel here would cut short.
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    if stop in done:
        return "channel stopping"
    for task in (pump, pinger):
        if task in done and not task.cancelled():
            exc = task.exception()
            if isinstance(exc, SlowConsumer):
                with contextlib.suppress(Exception):  # the client may be gone already
                    await write(b'event: error\ndata: {"code":"slow_consumer","cursor":%d}\n\n'
                                % (exc.last_cursor or 0))
                return f"slow consumer: resume after {exc.last_cursor or 0}"
            if isinstance(exc, ConnectionError | RuntimeError):
                return "client went away"
            if exc is not None:
                log.error("event stream failed", exc_info=exc)
                return "internal error"
    return "ended"
