"""asyncio helpers the hub's components share."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["cancel_and_join", "cancel_and_wait"]


async def cancel_and_wait(*tasks: asyncio.Task[Any], recancel_every: float = 0.5) -> None:
    """Cancel ``tasks`` and return once all of them have ended.

    A task that is still running ``recancel_every`` seconds later is cancelled again:
    on Python 3.11, ``asyncio.wait_for`` (which nats-py uses for its requests) swallows
    a cancellation that races with its inner future completing, so one ``cancel()`` can
    be lost and the task would wait on its subscription forever. Their exceptions are
    retrieved (not raised); callers that care look at the tasks themselves.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=recancel_every)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # mark as retrieved


async def cancel_and_join(*tasks: asyncio.Task[Any], recancel_every: float = 0.5) -> None:
    """:func:`cancel_and_wait`, but the wait is not cut short if the caller is cancelled.

    For cleanup that must finish before the next step: a task reading an async
    generator must have ended before the generator is closed, or ``aclose()`` fails
    with "asynchronous generator is already running". A cancellation of the caller
    that arrives meanwhile is held, then raised (``CancelledError``) once the tasks
    have ended.
    """
    waiter = asyncio.ensure_future(cancel_and_wait(*tasks, recancel_every=recancel_every))
    cancelled = False
    while not waiter.done():
        try:
            await asyncio.shield(waiter)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
