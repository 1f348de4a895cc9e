"""One request, one turn: publish a user's message and collect the bot's replies to it.

Used by the Rasa-compatible endpoint, whose clients expect the replies of their message
in the HTTP answer. The message is published durably, then
:meth:`~commhub.core.channel.ChannelContext.turn_replies` waits until the router
committed the message's step and returns the replies it produced on this channel. How
the hub knows is the hub's business: the channel learns nothing about the router or its
storage.

The turn ends when the step committed, or after ``wait`` seconds with no replies (a hub
without a router, or a router that is behind), or when the channel stops.

With ``follow`` seconds (Rasa's ``?wait=``), a step that left the workflow waiting for
a service (an ``ask``) is followed: the replies that the service's answer brings, up to
``follow`` seconds after the request came, belong to the turn too, so "Let me look up
order 12345..." and "Order 12345: shipped." arrive in one answer.

Concurrency and failure: cancelling :func:`run_turn` stops the wait. A bus failure
while publishing raises (nothing was stored, the client may retry); after the message
is stored, a failure while waiting ends the turn early with no replies.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from commhub.core.aio import cancel_and_wait
from commhub.core.channel import ChannelContext, TurnReplies
from commhub.core.envelope import Message

__all__ = ["Turn", "run_turn"]

log = logging.getLogger(__name__)


class Turn(msgspec.Struct):
    """What one turn produced: the inbound message's cursor and the replies, in order.

    ``complete`` is False when the wait ran out (or the channel stopped) before the
    router's commit was seen.
    """

    cursor: int
    replies: list[Message]
    complete: bool


async def run_turn(
    ctx: ChannelContext,
    message: Message,
    wait: float,
    stopping: asyncio.Event | None = None,
    follow: float = 0.0,
) -> Turn:
    """Publish ``message`` durably, then collect its replies (see the module docstring)."""
    started = time.monotonic()
    cursor = await ctx.publish_inbound(message)
    turn = await _replies_of(ctx, message.conversation, message.id, wait, cursor, stopping)
    replies, follow_up = list(turn.replies), turn.follow_up
    while follow_up is not None and turn.complete:
        left = follow - (time.monotonic() - started)
        if left <= 0:
            break
        turn = await _replies_of(ctx, message.conversation, follow_up, left, cursor, stopping)
        replies.extend(turn.replies)
        follow_up = turn.follow_up
    return Turn(cursor, replies, complete=turn.complete)


async def _replies_of(
    ctx: ChannelContext,
    conversation: str,
    input_id: str,
    wait: float,
    cursor: int,
    stopping: asyncio.Event | None,
) -> TurnReplies:
    """The replies of one input's step (see :meth:`ChannelContext.turn_replies`); none
    (incomplete) when the wait runs out, the channel stops or the bus fails."""
    waiting = asyncio.ensure_future(
        ctx.turn_replies(conversation, input_id, wait, after=cursor)
    )
    stop_task = asyncio.ensure_future((stopping or asyncio.Event()).wait())
    try:
        await asyncio.wait({waiting, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(waiting, stop_task)
    if waiting.cancelled():
        return TurnReplies([], complete=False)  # the channel is stopping
    if waiting.exception() is not None:
        log.warning("turn %s: waiting for the replies failed: %r", input_id,
                    waiting.exception())
        return TurnReplies([], complete=False)
    found: TurnReplies = waiting.result()
    return found
