"""Run work for one key in order, and different keys in parallel.

The router uses this with the conversation id as the key: one conversation's messages
are handled one after another in arrival order, while many conversations progress at
once. It is the in-process half of the ordering guarantee; the KV revision check is the
cross-process half. :class:`~commhub.core.delivery.DeliveryLoop` uses it for every
durable consumer that must keep a key's records in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from commhub.core.aio import cancel_and_wait

__all__ = ["KeyedSerialRunner"]

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]


class KeyedSerialRunner:
    """Queues jobs per key; one worker task per busy key drains its queue in order.

    Concurrency: ``submit`` never blocks; the caller bounds the number of jobs in flight
    (:class:`~commhub.core.delivery.DeliveryLoop` fetches only as many records as it has
    room for). A job that raises
    is logged and does not stop the jobs queued after it. ``join`` waits until every
    queue is empty; cancelling ``join`` leaves the workers running. ``cancel`` cancels
    the running jobs (each sees ``CancelledError``) and drops the queued ones unrun.
    """

    def __init__(self) -> None:
        self._queues: dict[str, deque[Job]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def submit(self, key: str, job: Job) -> None:
        queue = self._queues.get(key)
        if queue is not None:
            queue.append(job)
            return
        self._queues[key] = deque([job])
        self._idle.clear()
        task = asyncio.create_task(self._drain(key), name=f"serial:{key}")
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)

    def queued(self, key: str) -> int:
        """Jobs of ``key`` not yet finished (the running one included)."""
        queue = self._queues.get(key)
        return len(queue) if queue is not None else 0

    async def _drain(self, key: str) -> None:
        queue = self._queues[key]
        try:
            while queue:
                job = queue[0]
                try:
                    await job()
                except Exception:
                    log.exception("job for %s failed", key)
                queue.popleft()
        finally:
            if self._queues.get(key) is queue:
                del self._queues[key]
            if not self._queues:
                self._idle.set()

    async def join(self) -> None:
        await self._idle.wait()

    async def cancel(self) -> None:
        """Cancel every running job, drop the queued ones, and return once the workers
        have ended. The runner can be used again afterwards."""
        workers = list(self._workers)
        for queue in self._queues.values():
            while len(queue) > 1:  # the running job stays first; the rest never run
                queue.pop()
        await cancel_and_wait(*workers)
        self._queues.clear()
        self._idle.set()
