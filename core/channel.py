"""The channel interface: what a channel plugin implements and what the hub gives it.

A channel carries people's messages between a chat network and the bus. It implements
:class:`Channel` (``start`` and ``stop``) and talks to the hub only through the
:class:`ChannelContext` it is constructed with:

* ``await ctx.publish_inbound(message)``: durable once it returns (JetStream acked);
  the message id is the ``Nats-Msg-Id``, so a client that retries with the same id
  never produces a second inbound message.
* ``ctx.outbound(conversation, after=cursor)``: every outbound message of one
  conversation on this channel after a cursor, in order, then live ones. The cursor is
  the message's stream sequence: a client that reconnects with the last cursor it saw
  misses nothing and sees nothing twice. One live consumer per channel and process
  serves every reader (:mod:`commhub.core.fanout`), so readers cost no server state.
* ``await ctx.publish_event(kind, ...)``: a ChannelEvent on the bus (accepted, rejected,
  closed, error, delivery_failed). Never raises.
* ``ctx.web``: the hub's HTTP server (:class:`commhub.core.web.WebServer`), for channels
  that serve HTTP (an API, a webhook). Add routes in ``start()``; the hub starts serving
  after every channel has started. ``ctx.web.url`` is known by then.
* ``ctx.tokens``: the hub's client token checker (static and signed tokens).

Writing a new channel is one class; see ``examples/commhub-channel-lines`` and
``docs/plugins.md``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel

from commhub.core.envelope import (
    ChannelEvent,
    ChannelEventKind,
    Message,
    new_id,
)
from commhub.core.fanout import OutboundFanout

if TYPE_CHECKING:
    from commhub.core.bus import Bus
    from commhub.core.config import Settings
    from commhub.core.web import WebServer

__all__ = ["Channel", "ChannelContext", "OutboundItem"]

log = logging.getLogger(__name__)

OutboundItem = tuple[int, Message]


class Channel:
    """Base class of every channel plugin.

    Subclasses set ``name`` (a subject token, e.g. ``"websocket"``) and may set
    ``Settings`` to a pydantic model; the hub validates ``[plugins.<name>]`` from the
    config file against it at start and passes the result as ``self.settings``.
    """

    name: ClassVar[str]
    Settings: ClassVar[type[BaseModel] | None] = None

    def __init__(self, ctx: ChannelContext, settings: BaseModel | None = None) -> None:
        self.ctx = ctx
        self.settings = settings

    async def start(self) -> list[str]:
        """Start serving; return one human-readable line per endpoint (``ws://...``).

        Must return once the channel accepts clients; long-running work goes in tasks.
        """
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop accepting clients, finish what is in flight, close connections."""
        raise NotImplementedError


class ChannelContext:
    """The hub, as one channel sees it. Safe to use from many tasks at once."""

    def __init__(
        self, channel: str, bus: Bus, settings: Settings, web: WebServer | None = None
    ) -> None:
        self.channel = channel
        self.bus = bus
        self.hub_settings = settings
        self.subjects = bus.subjects
        self.tokens = settings.token_authority()
        self._web = web
        self._fanout: OutboundFanout | None = None

    @property
    def web(self) -> WebServer:
        """The hub's HTTP server; raises if this hub process runs none."""
        if self._web is None:
            raise RuntimeError("this hub process runs no HTTP server (role without channels)")
        return self._web

    async def publish_inbound(self, message: Message) -> int:
        """Publish a user's message durably; return its stream sequence.

        Raises on a bus failure (the caller tells its client it was not accepted).
        A re-sent message with the same id is dropped by JetStream and returns the
        original's sequence.
        """
        ack = await self.bus.publish(
            self.subjects.inbound(self.channel, message.conversation), message
        )
        return int(ack.seq)

    async def publish_event(
        self,
        kind: ChannelEventKind,
        *,
        connection: str | None = None,
        conversation: str | None = None,
        user: str | None = None,
        reason: str | None = None,
        code: int | None = None,
    ) -> None:
        """Publish a ChannelEvent; logs instead of raising if the bus is unavailable."""
        event = ChannelEvent(
            id=new_id(),
            channel=self.channel,
            kind=kind,
            connection=connection,
            conversation=conversation,
            user=user,
            reason=reason,
            code=code,
        )
        try:
            await self.bus.publish(self.subjects.channel_event(self.channel, kind), event)
        except Exception:
            log.exception("could not publish channel event %s", kind)

    def outbound(
        self, conversation: str, after: int | None = None
    ) -> AsyncIterator[OutboundItem]:
        """Yield ``(cursor, message)`` for each outbound message of ``conversation``.

        Starts after stream sequence ``after`` (all history when None), in stream order,
        each message once, then follows live messages until the consumer of the iterator
        stops (or :meth:`close`). History is read from the stream with direct gets; live
        messages come from the channel's one live consumer in this process, which
        re-creates itself from the last sequence it saw after a reconnect or a gap, so
        nothing is skipped or repeated. Several readers of one conversation each get
        every message (they may share the Message object: do not modify it).

        Cancelling or closing the iteration is safe at any point and costs no server
        request. An undecodable or invalid outbound record is reported on
        ``evt.invalid`` and skipped. Raises if the bus is unavailable when it starts or
        while it reads the history; the caller resumes from its last cursor.
        """
        if self._fanout is None:
            self._fanout = OutboundFanout(self.bus, self.channel)
        return self._fanout.follow(conversation, after)

    async def close(self) -> None:
        """End every outbound iteration and remove the channel's live consumer.

        The hub calls it after the channel's ``stop()``. Safe to call twice.
        """
        fanout, self._fanout = self._fanout, None
        if fanout is not None:
            await fanout.close()
