"""Running a bench: SIGTERM stops it the way Ctrl-C does.

A bench starts hubs and nats-servers as child processes and stops them in ``finally``
blocks. Python's default SIGTERM ends the interpreter without running those, which left
the children running; :func:`run` turns SIGTERM into a cancellation of the bench's main
coroutine, so they run, and either signal ends the bench with one line and the shell's
exit code for it (143 or 130).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


def run(main: Awaitable[T]) -> T:
    """``asyncio.run(main)`` with SIGTERM cancelling it (see the module doc)."""
    terminated = False

    async def guarded() -> T:
        nonlocal terminated
        task = asyncio.current_task()
        assert task is not None

        def on_sigterm() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
        return await main

    try:
        return asyncio.run(guarded())
    except asyncio.CancelledError:
        if not terminated:
            raise
        print("bench: stopped by SIGTERM", file=sys.stderr)
        raise SystemExit(143) from None
    except KeyboardInterrupt:
        print("bench: stopped by Ctrl-C", file=sys.stderr)
        raise SystemExit(130) from None
