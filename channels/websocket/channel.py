"""The built-in WebSocket channel: browsers and scripts chat with the hub over JSON frames.

A client connects to ``ws://HOST:PORT/ws?conversation=ID&user=ID&token=T&after=CURSOR``
(the protocol is in ``docs/websocket.md``). Each connection runs two things:

* the **reader** (the connection handler itself): decodes each frame, rate-limits it,
  publishes a message durably with :meth:`ChannelContext.publish_inbound`, then acks it.
  Frames are handled one at a time, so acks come back in the order messages were sent.
* the **outbound task**: iterates :meth:`ChannelContext.outbound` for the conversation
  from the client's cursor and writes each message with its cursor, through an
  :class:`~commhub.channels.sendqueue.SendQueue` (a bounded queue).

Concurrency and failure:

* **Cancel / disconnect.** When the client goes away the reader ends; the outbound task
  is cancelled and awaited, which unregisters it from the channel's live feed (no bus
  consumer is per connection). A "closed" ChannelEvent records the close code. Nothing
  that was acked is lost: acks follow the JetStream ack.
* **Full queue.** A client that reads slower than its conversation produces fills its
  queue (``max_queue``); that connection alone is closed with 1013 and a reason naming
  the cursor to resume from. No message is dropped: the bus still has it.
* **Reconnect.** A client that reconnects with ``after=<last cursor it saw>`` gets every
  later message once, in order; without ``after`` it gets the conversation's whole history.
  A message re-sent with the same ``id`` is acked again and dropped by JetStream's
  duplicate window, so retrying after a lost ack (or after reconnecting) is safe.
* **Errors.** A bad frame gets an ``error`` frame and the connection stays usable; an
  unexpected exception in one connection is logged and closes that connection (1011),
  never the server. ``stop()`` closes every connection with 1001 and waits for the
  handlers; a client that does not answer the close within ``close_timeout`` is aborted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import aclosing
from http import HTTPStatus
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from commhub.channels.sendqueue import SendQueue, SlowConsumer
from commhub.channels.websocket import frames
from commhub.channels.websocket.admission import (
    CLOSE_FORBIDDEN,
    CLOSE_TOO_MANY,
    HEALTH_PATH,
    WS_PATH,
    Admitted,
    Refused,
    admit,
)
from commhub.core.aio import cancel_and_wait
from commhub.core.channel import Channel, ChannelContext
from commhub.core.envelope import EnvelopeError, Message, Sender, new_id
from commhub.core.hookspecs import hookimpl
from commhub.core.origins import OriginPolicy, OriginVerdict
from commhub.core.owners import ConversationForbidden
from commhub.core.ratelimit import TokenBucket
from commhub.core.web import listen_error

__all__ = ["WebSocketChannel", "WebSocketSettings", "register_channels"]

log = logging.getLogger(__name__)

CLOSE_TRY_AGAIN = int(CloseCode.TRY_AGAIN_LATER)  # 1013: slow consumer
CLOSE_INTERNAL = int(CloseCode.INTERNAL_ERROR)  # 1011: a bug or the bus failed
CLOSE_TOO_BIG = int(CloseCode.MESSAGE_TOO_BIG)  # 1009: frame over max_frame_bytes


class WebSocketSettings(BaseModel):
    """``[plugins.websocket]``: per-connection limits (host, port and tokens are hub-wide)."""

    model_config = ConfigDict(extra="forbid")

    ping_interval: float | None = Field(
        default=20.0, gt=0, description="Seconds between keepalive pings; None disables them."
    )
    ping_timeout: float | None = Field(
        default=20.0, gt=0, description="Seconds to wait for a pong before dropping the client."
    )
    close_timeout: float = Field(
        default=5.0, gt=0, description="Seconds a client gets to answer a close, then aborted."
    )
    max_queue: int = Field(
        default=256, ge=1, description="Outbound messages queued for one client before closing it."
    )
    max_messages_per_second: float = Field(
        default=20.0, gt=0, description="Average inbound frames a second per connection."
    )
    rate_burst: int = Field(default=40, ge=1, description="Inbound frames allowed at once.")
    max_connections: int = Field(default=10_000, ge=1, description="Open connections per process.")
    compression: bool = Field(
        default=False,
        description="Offer permessage-deflate. Off by default: chat frames are small, and "
        "compressing each costs more CPU than the bytes it saves on the hub's hot path.",
    )


class _Conn:
    """One accepted connection's state; used only by its own handler and outbound task."""

    __slots__ = ("bucket", "conversation", "id", "limited", "user", "ws")

    def __init__(self, ws: ServerConnection, conn_id: str, who: Admitted, bucket: TokenBucket):
        self.ws = ws
        self.id = conn_id
        self.conversation = who.conversation
        self.user = who.user
        self.bucket = bucket
        self.limited = False  # inside a run of rate-limited frames (one event per run)


class WebSocketChannel(Channel):
    """Serves ``/ws`` (the chat protocol) and ``/healthz`` (plain HTTP 200) on one port.

    After :meth:`start`, ``port`` is the port actually bound (useful with ``ws_port=0``).
    """

    name = "websocket"
    Settings = WebSocketSettings

    def __init__(self, ctx: ChannelContext, settings: BaseModel | None = None) -> None:
        if settings is None:
            settings = WebSocketSettings()
        elif not isinstance(settings, WebSocketSettings):
            raise TypeError(f"expected WebSocketSettings, got {type(settings).__name__}")
        super().__init__(ctx, settings)
        self.config: WebSocketSettings = settings
        self.port: int | None = None
        self._server: Server | None = None
        self._conns: dict[str, _Conn] = {}
        self._authority = ctx.tokens
        try:  # the HTTP server's policy knows its port: the hub's own pages connect
            self._origins: OriginPolicy = ctx.web.origins
        except RuntimeError:  # a process without an HTTP server
            self._origins = ctx.hub_settings.origin_policy()

    @property
    def connection_count(self) -> int:
        """Connections accepted and not yet finished."""
        return len(self._conns)

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> list[str]:
        """Listen on ``host:ws_port``; return the connect URL and the anonymity rule."""
        if self._server is not None:
            raise RuntimeError("websocket channel already started")
        hub = self.ctx.hub_settings
        cfg = self.config
        try:
            self._server = await serve(
                self._handle,
                hub.host,
                hub.ws_port,
                process_request=self._process_request,
                max_size=hub.max_frame_bytes,
                ping_interval=cfg.ping_interval,
                ping_timeout=cfg.ping_timeout,
                close_timeout=cfg.close_timeout,
                compression="deflate" if cfg.compression else None,
            )
        except OSError as exc:
            raise listen_error("WebSocket channel", hub.host, hub.ws_port, exc,
                               "COMMHUB_WS_PORT") from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        if not hub.anonymous_allowed:
            rule = "token required"
        elif hub.allow_anonymous is None:
            rule = "anonymous clients allowed: bound to loopback"
        else:
            rule = "anonymous clients allowed by configuration"
        host = f"[{hub.host}]" if ":" in hub.host else hub.host
        return [f"websocket: ws://{host}:{self.port}{WS_PATH}?conversation=ID&user=ID ({rule})"]

    async def stop(self) -> None:
        """Close every connection with 1001 (going away) and wait for handlers; idempotent.

        A client that does not complete the closing handshake within ``close_timeout``
        (for example one that stopped reading) is aborted, so this always returns.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.close(code=CloseCode.GOING_AWAY, reason="server stopping")
        try:
            await asyncio.wait_for(server.wait_closed(), self.config.close_timeout + 1)
        except TimeoutError:
            for conn in list(self._conns.values()):
                conn.ws.transport.abort()
            await server.wait_closed()

    # -- HTTP -------------------------------------------------------------------------
    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == HEALTH_PATH:
            return ws.respond(HTTPStatus.OK, "ok\n")
        if path != WS_PATH:
            return _json_response(
                ws, HTTPStatus.NOT_FOUND, '{"error":"not_found","message":"connect to /ws"}\n'
            )
        origin = request.headers.get("Origin")
        if self._origins.judge(origin, request.headers.get("Host")) is OriginVerdict.REFUSED:
            # Refused before the upgrade: a page of another site must not chat with the
            # hub in its visitor's name (the page cannot read why; the hub log can).
            reason = f"origin not allowed: {(origin or '')[:80]}"
            await self.ctx.publish_event("rejected", connection=new_id()[:16],
                                         reason=reason, code=403)
            return _json_response(
                ws, HTTPStatus.FORBIDDEN,
                '{"error":"origin_not_allowed","message":"this page\'s origin is not in '
                'cors_origins"}\n',
            )
        return None  # go on with the WebSocket handshake; admission happens after it

    # -- one connection ---------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        conn_id = new_id()[:16]
        assert ws.request is not None
        verdict = admit(ws.request.path, authority=self._authority)
        if isinstance(verdict, Admitted):
            verdict = await self._claim(verdict)
        if isinstance(verdict, Admitted) and len(self._conns) >= self.config.max_connections:
            verdict = Refused(
                CLOSE_TOO_MANY, "too many connections", verdict.conversation, verdict.user
            )
        if isinstance(verdict, Refused):
            await self.ctx.publish_event(
                "rejected", connection=conn_id, conversation=verdict.conversation,
                user=verdict.user, reason=verdict.reason, code=verdict.code,
            )
            await self._close(ws, verdict.code, verdict.reason)
            return
        bucket = TokenBucket(self.config.max_messages_per_second, self.config.rate_burst)
        conn = _Conn(ws, conn_id, verdict, bucket)
        self._conns[conn_id] = conn  # no await since the count check: the limit holds
        try:
            await self._serve(conn, verdict.after, verdict.both)
        except Exception:
            log.exception("websocket connection %s failed", conn_id)
            await self._close(ws, CLOSE_INTERNAL, "internal error")
        finally:
            del self._conns[conn_id]
            code, reason = _close_info(ws)
            await self.ctx.publish_event(
                "closed", connection=conn_id, conversation=conn.conversation,
                user=conn.user, reason=reason or None, code=code,
            )

    async def _claim(self, who: Admitted) -> Admitted | Refused:
        """Enter the conversation as its owner or a user it admits; 4403 for another
        user's, 1013 (try again later) when the owners record cannot be reached."""
        try:
            await self.ctx.claim_conversation(who.conversation, who.user, who.identity)
        except ConversationForbidden as exc:
            return Refused(CLOSE_FORBIDDEN, str(exc), who.conversation, who.user)
        except Exception as exc:
            log.warning("websocket: owner check failed: %r", exc)
            return Refused(CLOSE_TRY_AGAIN, "unavailable: the hub could not check the "
                           "conversation; reconnect", who.conversation, who.user)
        return who

    async def _serve(self, conn: _Conn, after: int | None, both: bool = False) -> None:
        ctx, ws = self.ctx, conn.ws
        await ctx.publish_event(
            "accepted", connection=conn.id, conversation=conn.conversation, user=conn.user
        )
        try:
            await _send(ws, frames.event_frame(
                "connected", connection=conn.id, conversation=conn.conversation,
                user=conn.user, after=after, both=both,
            ))
        except ConnectionClosed:
            return
        outbound = asyncio.create_task(self._outbound(conn, after, both),
                                       name=f"ws-out-{conn.id}")
        try:
            async for data in ws:
                await self._on_frame(conn, data)
        except ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == CLOSE_TOO_BIG:
                await ctx.publish_event(
                    "error", connection=conn.id, conversation=conn.conversation,
                    user=conn.user, code=CLOSE_TOO_BIG,
                    reason=f"frame over max_frame_bytes ({ctx.hub_settings.max_frame_bytes})",
                )
        finally:
            await cancel_and_wait(outbound)

    async def _on_frame(self, conn: _Conn, data: str | bytes) -> None:
        """Handle one inbound frame; answers with ack, pong or error. Raises ConnectionClosed."""
        ws = conn.ws
        if not conn.bucket.take():
            if not conn.limited:
                conn.limited = True
                await self._event_error(conn, "rate_limited: over max_messages_per_second")
            await _send(ws, frames.error_frame(
                "rate_limited", "too many frames; slow down", _peek_id(data)
            ))
            return
        conn.limited = False
        frame = frames.decode_frame(data)
        if isinstance(frame, frames.FrameError):
            await self._event_error(conn, f"{frame.code}: {frame.message}")
            await _send(ws, frames.error_frame(frame.code, frame.message, frame.id))
        elif isinstance(frame, frames.PingFrame):
            await _send(ws, frames.pong_frame())
        else:
            await self._on_message(conn, frame)

    async def _on_message(self, conn: _Conn, frame: frames.MessageFrame) -> None:
        # The client's id is the bus id, so replies' reply_to match what it sent and a
        # re-send is dropped by JetStream; frames.py makes sure it is unique-looking.
        message_id = frame.id or new_id()
        message = Message(
            id=message_id,
            conversation=conn.conversation,
            channel=self.name,
            direction="in",
            sender=Sender(id=conn.user, kind="user"),
            text=frame.text,
            payload=frame.payload,
            meta={"connection": conn.id},
        )
        try:
            await self.ctx.publish_inbound(message)
        except EnvelopeError as exc:  # the bus contract: bad input, nothing stored
            await self._event_error(conn, f"bad_frame: {exc}")
            await _send(conn.ws, frames.error_frame("bad_frame", str(exc), message_id))
            return
        except Exception as exc:
            log.warning("websocket %s: publish failed: %r", conn.id, exc)
            await self._event_error(conn, f"unavailable: {exc!r}")
            await _send(conn.ws, frames.error_frame(
                "unavailable", "the hub could not store the message; retry with the same id",
                message_id,
            ))
            return
        await _send(conn.ws, frames.ack_frame(message_id))

    async def _outbound(self, conn: _Conn, after: int | None, both: bool = False) -> None:
        """Send the conversation's outbound messages after ``after``, then live ones
        (with ``both``, its inbound messages on this channel too).

        Ends by cancellation (client gone), by a closed socket, or by closing the
        connection itself: 1013 when the client is too slow, 1011 when the bus failed.
        """
        queue = SendQueue(self.config.max_queue, after)

        async def send(cursor: int, message: Message) -> None:
            await _send(conn.ws, frames.message_frame(cursor, message))

        items = self.ctx.outbound(conn.conversation, after=after, inbound=both)
        try:
            async with aclosing(items):  # type: ignore[type-var]  # an async generator
                await queue.run(items, send)
        except ConnectionClosed:
            return
        except SlowConsumer as exc:
            await self._event_error(conn, f"slow consumer: {exc}", code=CLOSE_TRY_AGAIN)
            await self._close(
                conn.ws, CLOSE_TRY_AGAIN, f"slow consumer: resume with after={exc.last_cursor or 0}"
            )
        except Exception:
            log.exception("websocket %s: outbound failed", conn.id)
            await self._event_error(conn, "outbound stream failed", code=CLOSE_INTERNAL)
            await self._close(
                conn.ws, CLOSE_INTERNAL,
                f"outbound failed: reconnect with after={queue.last_cursor or 0}",
            )

    # -- helpers ------------------------------------------------------------------------
    async def _event_error(self, conn: _Conn, reason: str, code: int | None = None) -> None:
        await self.ctx.publish_event(
            "error", connection=conn.id, conversation=conn.conversation, user=conn.user,
            reason=reason, code=code,
        )

    async def _close(self, ws: ServerConnection, code: int, reason: str) -> None:
        """Close with ``code``; abort the TCP connection if the client does not answer.

        ``ws.close`` waits for queued frames to drain first, which never happens with a
        client that stopped reading, hence the bound.
        """
        try:
            await asyncio.wait_for(ws.close(code, reason), self.config.close_timeout)
        except TimeoutError:
            ws.transport.abort()


async def _send(ws: ServerConnection, data: bytes) -> None:
    """Send JSON bytes as one text frame (concurrent sends of whole frames are safe)."""
    await ws.send(data, text=True)


def _peek_id(data: str | bytes) -> str | None:
    """The ``id`` of a frame refused before decoding (rate limit), if cheaply found."""
    frame = frames.decode_frame(data) if len(data) <= 4096 else None
    return frame.id if isinstance(frame, frames.MessageFrame) else None


def _close_info(ws: ServerConnection) -> tuple[int, str]:
    """The close code and reason of whichever side closed first (1006: no close frame)."""
    p = ws.protocol
    frame = p.close_rcvd if p.close_rcvd_then_sent else (p.close_sent or p.close_rcvd)
    if frame is None:
        return int(CloseCode.ABNORMAL_CLOSURE), "connection lost"
    return int(frame.code), frame.reason


def _json_response(ws: ServerConnection, status: HTTPStatus, body: str) -> Response:
    response = ws.respond(status, body)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


@hookimpl
def register_channels(register: Callable[[type], None]) -> None:
    """Contribute the WebSocket channel, exactly as an outside plugin would."""
    register(WebSocketChannel)
