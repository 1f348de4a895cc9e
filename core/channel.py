"""The channel interface: what a channel plugin implements and what the hub gives it.

A channel carries people's messages between a chat network and the bus. It implements
:class:`Channel` (``start`` and ``stop``) and talks to the hub only through the
:class:`ChannelContext` it is constructed with:

* ``await ctx.publish_inbound(message)``: durable once it returns (JetStream acked);
  the message id is the ``Nats-Msg-Id``, so a client that retries with the same id
  never produces a second inbound message.
* ``ctx.outbound(conversation, after=cursor)``: every outbound message of one
  conversation on this channel after a cursor, in order, then live ones (with
  ``inbound=True``, the conversation's inbound messages on the channel too). The cursor is
  the message's stream sequence: a client that reconnects with the last cursor it saw
  misses nothing and sees nothing twice. One live consumer per channel and process
  serves every reader (:mod:`commhub.core.fanout`), so readers cost no server state.
* ``await ctx.deliver_outbound(handler, ...)``: every outbound message on this channel,
  consumed durably (a :class:`~commhub.core.delivery.DeliveryLoop`): ``handler`` is
  called per message, one conversation's messages in order, and the message is acked
  when it returns; it is retried with backoff when it raises, across restarts. For
  channels that must call out to deliver (a webhook, an SMS or e-mail gateway).
* ``await ctx.publish_event(kind, ...)``: a ChannelEvent on the bus (accepted, rejected,
  closed, error, delivery_failed). Never raises.
* ``await ctx.turn_replies(conversation, message_id, timeout)``: the replies on this
  channel that an inbound message produced, once the router committed its step (for
  request/response networks that answer a message with its replies).
* ``ctx.web``: the hub's HTTP server (:class:`commhub.core.web.WebServer`), for channels
  that serve HTTP (an API, a webhook). Add routes in ``start()``; the hub starts serving
  after every channel has started. ``ctx.web.url`` is known by then.
* ``ctx.tokens``: the hub's client token checker (static and signed tokens).
* ``await ctx.claim_conversation(conversation, user, identity)``: enter a conversation
  as a user; the first client a channel accepts into a conversation owns it, and any
  other user is refused (:mod:`commhub.core.owners`). Call it before serving anything
  of the conversation: a message, a read, a stream, a connection.

Writing a new channel is one class; see ``examples/commhub-channel-lines`` and
``docs/plugins.md``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import BaseModel

from commhub.core.delivery import (
    Delivery,
    DeliveryLoop,
    GiveUpHook,
    RetryHook,
    RetryPolicy,
)
from commhub.core.envelope import (
    ChannelEvent,
    ChannelEventKind,
    EnvelopeError,
    Message,
    decode_message,
    invalid_id,
    new_id,
    record_problem,
)
from commhub.core.fanout import OutboundFanout
from commhub.core.owners import OwnerBook, client_of
from commhub.core.retry import Permanent
from commhub.core.routing.store import StateStore

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from commhub.core.bus import Bus
    from commhub.core.config import Settings
    from commhub.core.tokens import Identity
    from commhub.core.web import WebServer

__all__ = ["Channel", "ChannelContext", "OutboundItem", "TurnReplies", "decode_outbound"]

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
        self._fanout: OutboundFanout | None = None

    @property
    def web(self) -> WebServer:
        """The hub's HTTP server; raises if this hub process runs none."""
        if self._web is None:
            raise RuntimeError("this hub process runs no HTTP server (role without channels)")
        return self._web

    async def publish_inbound(self, message: Message) -> int:
        """Publish a user's message durably; return its stream sequence.

        Raises :class:`~commhub.core.envelope.EnvelopeError` for a message that breaks
        the bus contract (:func:`~commhub.core.envelope.record_problem`: a short id,
        malformed buttons, another channel, ...), before anything is stored: answer the
        client that its input is bad. Raises anything else on a bus failure (the caller
        tells its client it was not accepted). A re-sent message with the same id is
        dropped by JetStream and returns the original's sequence.
        """
        subject = self.subjects.inbound(self.channel, message.conversation)
        problem = record_problem(subject, message)  # the router would refuse it anyway
        if problem is not None:
            raise EnvelopeError(problem)
        ack = await self.bus.publish(subject, message)
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

    async def report_refused(self, msg: Msg, reason: str) -> None:
        """Report an outbound record this channel refuses on ``evt.invalid``, under the id
        of its stream sequence (:func:`~commhub.core.envelope.invalid_id`): every process,
        connection and replay that refuses it, and the recorder, make one report of it.
        Never raises."""
        try:
            seq = int(msg.metadata.sequence.stream)
        except Exception:  # not a stream message: a report of its own
            record_id = None
        else:
            record_id = invalid_id(self.subjects.messages_stream, seq)
        await self.bus.publish_invalid(
            msg.subject, msg.data, reason, f"channel:{self.channel}", record_id=record_id
        )

    def outbound(
        self, conversation: str, after: int | None = None, *, inbound: bool = False
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

        With ``inbound=True`` the conversation's inbound messages on this channel come
        too (``message.direction == "in"``), in stream order with the replies, each
        with its cursor: a client can redraw both sides of the conversation and see
        what its other tabs send. The first such reader widens the process's live
        consumer to the channel's inbound subjects as well.
        """
        if self._fanout is None:
            self._fanout = OutboundFanout(self.bus, self.channel)
        return self._fanout.follow(conversation, after, inbound=inbound)

    async def close(self) -> None:
        """End every outbound iteration and remove the channel's live consumer.

        The hub calls it after the channel's ``stop()``. Safe to call twice.
        """
        fanout, self._fanout = self._fanout, None
        if fanout is not None:
            await fanout.close()

    _owners: OwnerBook | None = None  # bound on first claim

    async def claim_conversation(self, conversation: str, user: str, identity: Identity) -> None:
        """Let a client into ``conversation`` as ``user``, or refuse it.

        ``identity`` is what ``ctx.tokens.check`` admitted the client with; ``user`` is
        the user id the channel settled on (a signed token's user, else the one the
        client named, else the channel's default). The first client any channel lets
        into a conversation becomes its owner; the rule for the others is in
        :mod:`commhub.core.owners` (a signed token's user enters only its own
        conversations; clients without one only conversations no signed user owns).

        Raises :class:`~commhub.core.owners.ConversationForbidden`, whose ``str()`` is the
        reason to show (``forbidden: the conversation belongs to another user``): refuse
        the client (WebSocket close 4403, HTTP 403) and publish a ``rejected`` event.
        Raises the bus's error when the owner cannot be read or written: tell the client
        to retry. Safe from many tasks: of two clients racing into a new conversation,
        exactly one becomes its owner (a KV create).
        """
        if self._owners is None:
            self._owners = OwnerBook(self.bus)
        client, granted = client_of(identity, user, conversation)
        await self._owners.claim(conversation, client, granted=granted)

    async def deliver_outbound(
        self,
        handler: Callable[[Delivery[Message]], Awaitable[None]],
        *,
        name: str = "out",
        policy: RetryPolicy | None = None,
        max_in_flight: int = 256,
        ack_wait: float = 30.0,
        start: Literal["all", "new"] = "all",
        on_retry: RetryHook[Message] | None = None,
        on_give_up: GiveUpHook[Message] | None = None,
    ) -> DeliveryLoop[Message]:
        """Consume every outbound message of this channel durably; return the started loop.

        The durable consumer is ``{prefix}_{channel}_{name}`` on
        ``{prefix}.out.{channel}.>``, shared by every process running this channel (each
        message goes to one of them) and kept across restarts: messages published while
        no process runs are delivered at the next start. ``start="all"`` makes a new
        durable begin with the messages already stored, ``"new"`` with those published
        after it was created.

        ``handler(delivery)`` gets the decoded :class:`Message` as ``delivery.record``
        and its cursor as ``delivery.seq``. Returning acks the message; raising
        :class:`~commhub.core.retry.Retry` (or any exception) retries it with the
        ``policy``'s backoff, in place first (the conversation's later messages wait),
        then by handing it back to JetStream with a delay; raising
        :class:`~commhub.core.retry.Permanent` terminates it and reports it on
        ``evt.invalid``, as happens to a record that is not a valid Message for the
        subject's conversation. A handler may run again for a message it already
        handled (a crash before the ack): make its effect idempotent, e.g. by sending the
        message id along. Stop the loop in the channel's ``stop()`` with
        ``await loop.stop(grace)``.
        """
        subjects = self.subjects
        config = ConsumerConfig(
            durable_name=f"{subjects.prefix}_{self.channel}_{name}",
            description=f"commhub {self.channel} channel: outbound messages to deliver",
            filter_subject=subjects.outbound(self.channel, ">"),
            deliver_policy=DeliverPolicy.ALL if start == "all" else DeliverPolicy.NEW,
            ack_wait=ack_wait,
        )
        loop: DeliveryLoop[Message] = DeliveryLoop(
            self.bus,
            stream=subjects.messages_stream,
            consumer=config,
            decode=decode_outbound,
            handler=handler,
            source=f"channel:{self.channel}",
            policy=policy,
            max_in_flight=max_in_flight,
            on_retry=on_retry,
            on_give_up=on_give_up,
        )
        await loop.start()
        return loop


def decode_outbound(subject: str, data: bytes) -> Message:
    """The Message on ``{prefix}.out.{channel}.{conversation}``; raises
    :class:`Permanent` when it is not one or breaks the bus contract
    (:func:`~commhub.core.envelope.record_problem`: another conversation or channel, the
    wrong direction, a short id)."""
    try:
        return decode_message(subject, data)
    except EnvelopeError as exc:
        raise Permanent(f"not a valid outbound message: {exc}") from None
