"""One request, one turn: publish a user's message and collect the bot's replies to it.

Used by the Rasa-compatible endpoint, whose clients expect the replies of their message
in the HTTP answer. The message is published durably, then
:meth:`~commhub.core.channel.ChannelContext.turn_replies` waits until the router
committed the message's step and returns the replies it produced on this channel. How
the hub knows is the hub's business: the channel learns nothing about the router or its
storage.

The turn ends when the step committed, or after ``wait`` seconds with no replies (a hub
without a router, or a router that is behind), or when the channel stops.

Concurrency and failure: cancelling :func:`run_turn` stops the wait. A bus failure
while publishing raises (nothing was stored, the client may retry); after the message
is stored, a failure while waiting ends the turn early with no replies.
"""

from __future__ import annotations

import asyncio
import logging

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
    ctx: ChannelContext, message: Message, wait: float, stopping: asyncio.Event | None = None
) -> Turn:
    """Publish ``message`` durably, then collect its replies (see the module docstring)."""
    cursor = await ctx.publish_inbound(message)
    waiting = asyncio.ensure_future(
        ctx.turn_replies(message.conversation, message.id, wait, after=cursor)
    )
    stop_task = asyncio.ensure_future((stopping or asyncio.Event()).wait())
    try:
        await asyncio.wait({waiting, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(waiting, stop_task)
    if waiting.cancelled():
        return Turn(cursor, [], complete=False)  # the channel is stopping
    if waiting.exception() is not None:
        log.warning("turn %s: waiting for the replies failed: %r", message.id,
                    waiting.exception())
        return Turn(cursor, [], complete=False)
    found: TurnReplies = waiting.result()
    return Turn(cursor, found.replies, complete=found.complete)
