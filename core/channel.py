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
  misses nothing and sees nothing twice.
* ``await ctx.publish_event(kind, ...)``: a ChannelEvent on the bus (accepted, rejected,
  closed, error, delivery_failed). Never raises.
* ``await ctx.turn_replies(conversation, message_id, timeout)``: the replies on this
  channel that an inbound message produced, once the router committed its step (for
  request/response networks that answer a message with its replies).
* ``ctx.web``: the hub's HTTP server (:class:`commhub.core.web.WebServer`), for channels
  that serve HTTP (an API, a webhook). Add routes in ``start()``; the hub starts serving
  after every channel has started. ``ctx.web.url`` is known by then.
* ``ctx.tokens``: the hub's client token checker (static and signed tokens).

Writing a new channel is one class; see ``examples/commhub-channel-lines`` and
``docs/plugins.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import BaseModel

from commhub.core.envelope import (
    ChannelEvent,
    ChannelEventKind,
    EnvelopeError,
    Message,
    decode_as,
    new_id,
)
from commhub.core.routing.store import StateStore

if TYPE_CHECKING:
    from commhub.core.bus import Bus
    from commhub.core.config import Settings
    from commhub.core.web import WebServer

__all__ = ["Channel", "ChannelContext", "OutboundItem", "TurnReplies"]

log = logging.getLogger(__name__)

OutboundItem = tuple[int, Message]


@dataclass(frozen=True)
class TurnReplies:
    """What :meth:`ChannelContext.turn_replies` found: the replies, in the order the
    router publishes them, and whether they are known to be all of them.

    ``complete`` is True when the committed step was seen, so ``replies`` are exactly
    the turn's replies on this channel (maybe none). It is False when the wait ran out
    before the step committed (``replies`` is empty), or when later inputs of the
    conversation were handled before the commit was seen (``replies`` are those found
    on the stream).

    ``follow_up`` names the input the conversation now waits for (a service's answer
    to the workflow's request): :meth:`ChannelContext.turn_replies` with it gives the
    replies that answer brings. None when the bot waits for nothing but the user.
    """

    replies: list[Message]
    complete: bool
    follow_up: str | None = None


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
        self._states = StateStore(bus, cache_size=0)

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

    async def turn_replies(
        self, conversation: str, message_id: str, timeout: float, *, after: int | None = None
    ) -> TurnReplies:
        """The replies on this channel that inbound message ``message_id`` produced,
        once its step committed; waits at most ``timeout`` seconds for the commit.

        Call it after :meth:`publish_inbound` returned (``after`` is the sequence it
        returned; it bounds the stream search below). The router commits a step's new
        state together with all of its outputs before publishing any, so the commit
        that names the message ends the turn and lists its replies, whether or not
        they were published yet (they will be, with these ids). A message that the
        router ignored, or answered on another channel, gets no replies (complete).

        When later inputs of the conversation were handled before the commit was seen,
        the replies are read from the stream instead (``complete`` False): those the
        router published on this channel with ``reply_to`` set to the message.

        Cancelling is safe. Raises on a bus failure; see :class:`TurnReplies`.
        """
        found = await self._states.wait_for_input(conversation, message_id, timeout)
        if found is None:
            return TurnReplies([], complete=False)
        subject = self.subjects.outbound(self.channel, conversation)
        if found.outbox is not None:
            replies = [entry.record for entry in found.outbox
                       if entry.subject == subject and isinstance(entry.record, Message)]
            return TurnReplies(replies, complete=True, follow_up=found.follow_up)
        return TurnReplies(await self._stored_replies(conversation, message_id, after),
                           complete=False)

    async def _stored_replies(
        self, conversation: str, message_id: str, after: int | None
    ) -> list[Message]:
        """The outbound messages on this channel after ``after`` that reply to
        ``message_id``, up to the last one stored now."""
        subject = self.subjects.outbound(self.channel, conversation)
        try:
            last = await self.bus.js.get_last_msg(self.subjects.messages_stream, subject)
        except NotFoundError:
            return []
        replies: list[Message] = []
        if last.seq is None or last.seq <= (after or 0):
            return replies
        items = self.outbound(conversation, after=after)
        try:
            async for seq, message in items:
                if message.reply_to == message_id:
                    replies.append(message)
                if seq >= last.seq:
                    break
        finally:
            await items.aclose()  # type: ignore[attr-defined]  # an async generator
        return replies

    async def outbound(
        self, conversation: str, after: int | None = None
    ) -> AsyncIterator[OutboundItem]:
        """Yield ``(cursor, message)`` for each outbound message of ``conversation``.

        Starts after stream sequence ``after`` (all history when None), in stream order,
        then follows live messages until the consumer of the iterator stops. Backed by a
        JetStream ordered consumer: a gap or a server restart resets it from the last
        sequence seen, so nothing is skipped or repeated. Cancelling the iteration is
        safe; the ephemeral consumer is deleted (or expires on its own).

        An undecodable outbound record is reported on ``evt.invalid`` and skipped.
        """
        subject = self.subjects.outbound(self.channel, conversation)
        start = (after or 0) + 1
        sub = await self.bus.js.subscribe(
            subject,
            stream=self.subjects.messages_stream,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            ),
            inactive_threshold=300,
        )
        try:
            while True:
                msg = await sub.next_msg(timeout=None)
                seq = int(msg.metadata.sequence.stream)
                try:
                    message = decode_as(msg.data, Message)
                except EnvelopeError as exc:
                    await self.bus.publish_invalid(
                        msg.subject, msg.data, str(exc), f"channel:{self.channel}"
                    )
                    continue
                yield seq, message
        finally:
            with contextlib.suppress(Exception):  # the connection may be closing
                await asyncio.shield(sub.unsubscribe())
