"""One connection's outbound path: bus iterator -> bounded queue -> socket sender.

:class:`SendQueue` decouples reading the bus from writing to a client. The bus side never
waits for the client: when the queue is full the client is too slow, and
:meth:`SendQueue.run` raises :class:`SlowConsumer` carrying the cursor of the last frame
handed to the socket. The caller drops the *connection*, never a message: the client
reconnects with ``after=<its last cursor>`` and the bus replays everything it missed.

It knows nothing about WebSockets; ``send`` is any coroutine function, so the overflow
rule is tested without sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from commhub.core.aio import cancel_and_join
from commhub.core.channel import OutboundItem
from commhub.core.envelope import Message

__all__ = ["SendQueue", "SlowConsumer"]

Send = Callable[[int, Message], Awaitable[None]]


class SlowConsumer(Exception):
    """The client did not keep up: ``max_queue`` messages were waiting for its socket."""

    def __init__(self, last_cursor: int | None, max_queue: int) -> None:
        super().__init__(f"outbound queue full ({max_queue} messages)")
        self.last_cursor = last_cursor
        self.max_queue = max_queue


class SendQueue:
    """Bounded queue between the bus and one client's socket.

    ``last_cursor`` is the cursor of the last message handed to ``send`` (or the
    connection's start cursor): everything up to it was written to the socket in order.
    """

    def __init__(self, max_queue: int, start: int | None = None) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.max_queue = max_queue
        self.last_cursor = start
        self._queue: asyncio.Queue[OutboundItem] = asyncio.Queue(max_queue)

    async def run(self, items: AsyncIterator[OutboundItem], send: Send) -> None:
        """Move ``items`` to ``send`` until one side stops; re-raise why it stopped.

        Two tasks: a filler that reads ``items`` into the queue without ever waiting for
        room, and a sender that writes one message at a time. When either ends, the
        other is cancelled and awaited before this returns.

        * Queue full: raises :class:`SlowConsumer`; queued messages are not sent.
        * ``send`` or ``items`` raises: that exception propagates.
        * Cancelled: both tasks are cancelled; ``items`` sees ``CancelledError`` at its
          await (an async generator's ``finally`` runs). Closing ``items`` itself stays
          with the caller, which created it: when this returns or raises, even after
          repeated cancels, the filler has ended, so closing ``items`` is safe.
        """
        filler = asyncio.create_task(self._fill(items), name="sendqueue-fill")
        sender = asyncio.create_task(self._send(send), name="sendqueue-send")
        try:
            done, _ = await asyncio.wait({filler, sender}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Not cut short by a second cancel (the WebSocket handler re-cancels): the
            # caller closes ``items`` next, which must not run while the filler is in it.
            await cancel_and_join(filler, sender)
        for task in (filler, sender):  # the filler's SlowConsumer wins over a send error
            if task in done and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                if isinstance(exc, SlowConsumer):
                    # The sender may have written more frames after the filler gave up,
                    # before it was cancelled: the client resumes after the last of them.
                    exc.last_cursor = self.last_cursor
                raise exc  # type: ignore[misc]

    async def _fill(self, items: AsyncIterator[OutboundItem]) -> None:
        async for item in items:
            try:
                self._queue.put_nowait(item)
            except asyncio.QueueFull:
                raise SlowConsumer(self.last_cursor, self.max_queue) from None

    async def _send(self, send: Send) -> None:
        while True:
            cursor, message = await self._queue.get()
            # Recorded before the await: a WebSocket send writes the frame to the
            # transport before its first suspension, so even if this task is cancelled
            # while waiting for the socket to drain, the frame goes out ahead of any close.
            self.last_cursor = cursor
            await send(cursor, message)
