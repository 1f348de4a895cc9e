"""One request, one turn: publish a user's message and collect the bot's replies to it.

Used by the Rasa-compatible endpoint, whose clients expect the replies of their message
in the HTTP answer. Two things are watched at once:

* the conversation's outbound messages on this channel, from the inbound message's own
  stream sequence on (replies are always stored after the message they answer, so
  starting there cannot miss one); a message whose ``reply_to`` is the inbound id is
  a reply of this turn;
* the conversation's entry in the state bucket. The router writes the new state and
  the step's outputs (its outbox) in one update, with ``state.last_input`` set to the
  input it handled, and only then publishes the outputs. So the update that names our
  message says the turn is over and lists exactly which replies to expect.

The turn ends when that update was seen and every reply it lists has arrived, or after
``wait`` seconds with whatever arrived by then (a hub without a router, a router that
is behind, or a watch that missed the update because a later turn overwrote it first).

Concurrency and failure: the watcher is started before the message is published, so
the update cannot slip past. Cancelling :func:`run_turn` stops both watches. A bus
failure while publishing raises (nothing was stored, the client may retry); after the
message is stored, a failure of the watches ends the turn early with what arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import msgspec

from commhub.core.aio import cancel_and_join
from commhub.core.channel import ChannelContext, OutboundItem
from commhub.core.envelope import Message
from commhub.core.routing.router import StoredState

__all__ = ["Turn", "run_turn"]

log = logging.getLogger(__name__)

_stored = msgspec.json.Decoder(StoredState)


class Turn(msgspec.Struct):
    """What one turn produced: the inbound message's cursor and the replies, in order.

    ``complete`` is False when the wait ran out before the router's commit was seen.
    """

    cursor: int
    replies: list[OutboundItem]
    complete: bool


async def run_turn(
    ctx: ChannelContext, message: Message, wait: float, stopping: asyncio.Event | None = None
) -> Turn:
    """Publish ``message`` durably, then collect its replies (see the module docstring)."""
    kv = await ctx.bus.state_bucket()
    watcher = await kv.watch(message.conversation)
    try:
        cursor = await ctx.publish_inbound(message)
        items = ctx.outbound(message.conversation, after=cursor)
        async with aclosing(items):  # type: ignore[type-var]  # an async generator
            return await _collect(ctx, message, cursor, items, watcher, wait, stopping)
    finally:
        await _stop_watch(ctx, watcher)


async def _stop_watch(ctx: ChannelContext, watcher: Any) -> None:
    """Stop the state watch and delete its consumer.

    Stopping only unsubscribes: the watch's ordered consumer would stay on the server
    for its inactive threshold (5 minutes), and nats-server refuses new consumers on a
    stream past its limit (about 1,000), which busy Rasa clients reached in minutes.
    nats-py keeps the consumer's name only on the watcher's subscription.
    """
    with contextlib.suppress(Exception):  # the connection may be closing
        await watcher.stop()
    consumer = getattr(getattr(watcher, "_sub", None), "_consumer", None)
    if isinstance(consumer, str):
        with contextlib.suppress(Exception):  # gone already, or expires by itself
            await ctx.bus.js.delete_consumer(f"KV_{ctx.subjects.state_bucket}", consumer)


async def _collect(
    ctx: ChannelContext,
    message: Message,
    cursor: int,
    items: AsyncIterator[OutboundItem],
    watcher: Any,
    wait: float,
    stopping: asyncio.Event | None,
) -> Turn:
    subject = ctx.subjects.outbound(ctx.channel, message.conversation)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    replies: list[OutboundItem] = []
    expected: set[str] | None = None
    out_task = asyncio.ensure_future(anext(items))
    kv_task: asyncio.Future[Any] = asyncio.ensure_future(anext(watcher))
    stop_task = asyncio.ensure_future((stopping or asyncio.Event()).wait())
    try:
        while expected is None or not expected <= {m.id for _, m in replies}:
            remaining = deadline - loop.time()
            if remaining <= 0 or stop_task.done():
                break
            done, _ = await asyncio.wait(
                {out_task, kv_task, stop_task}, timeout=remaining,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if out_task in done:
                if out_task.exception() is not None:
                    log.warning("turn %s: outbound ended: %r", message.id, out_task.exception())
                    break
                seq, reply = out_task.result()
                if reply.reply_to == message.id:
                    replies.append((seq, reply))
                out_task = asyncio.ensure_future(anext(items))
            if kv_task in done:
                if kv_task.exception() is not None:  # the watch ended; rely on the wait
                    kv_task = asyncio.get_running_loop().create_future()
                else:
                    found = _expected_replies(kv_task.result(), message.id, subject)
                    expected = found if found is not None else expected
                    kv_task = asyncio.ensure_future(anext(watcher))
    finally:  # the read has ended before the caller closes ``items``, even if cancelled
        await cancel_and_join(out_task, stop_task)
        if not kv_task.done():
            kv_task.cancel()
    return Turn(cursor, replies, complete=expected is not None and
                expected <= {m.id for _, m in replies})


def _expected_replies(entry: Any, message_id: str, subject: str) -> set[str] | None:
    """The ids of the replies on ``subject`` that the committed step of ``message_id``
    produced, or None when this state update is about another input."""
    if entry is None or not entry.value:
        return None
    try:
        stored = _stored.decode(entry.value)
    except msgspec.DecodeError:
        return None
    if stored.state.last_input != message_id:
        return None
    return {
        out.record.id
        for out in stored.outbox
        if out.subject == subject and isinstance(out.record, Message)
    }
