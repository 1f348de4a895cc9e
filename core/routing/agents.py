"""Human agents' presence: who announced themselves with a heartbeat, and whether any
can take a conversation now.

Agents (a web inbox, a Chatwoot bridge, a script: any service) put a heartbeat into
the KV bucket ``{prefix}_agents`` every few seconds: key = the agent's id, value = JSON
``{"name": "Eve", "ts": 1718000000.0, "capacity": 3}`` (``capacity`` 0: present but
taking no new conversation). The bucket's entries expire after ``agent_ttl_seconds``;
an agent that goes away deletes its key or simply stops beating.

:func:`available` is the pure decision; :class:`AgentPresence` is the I/O part the
router runs: it watches the bucket (its current entries, then every change), so the
answer costs no request per message. Expiry by age is not announced to watchers, so
every entry counts only while the server's time of its last write is within the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from commhub.core.bus import Bus

__all__ = ["AgentPresence", "Heartbeat", "available"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Heartbeat:
    """An agent's last heartbeat: when the server stored it, and the capacity it gave."""

    at: float
    capacity: int = 1
    name: str | None = None


def available(agents: Mapping[str, Heartbeat], now: float, ttl: float) -> bool:
    """True when some agent's heartbeat is younger than ``ttl`` seconds and offers
    capacity for a conversation."""
    return any(beat.capacity > 0 and now - beat.at <= ttl for beat in agents.values())


def _heartbeat(value: bytes, at: float) -> Heartbeat | None:
    try:
        body: Any = msgspec.json.decode(value)
    except msgspec.DecodeError:
        return None
    if not isinstance(body, dict):
        return None
    capacity = body.get("capacity", 1)
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        capacity = 1
    name = body.get("name")
    return Heartbeat(at=at, capacity=capacity, name=name if isinstance(name, str) else None)


class AgentPresence:
    """Watches ``{prefix}_agents`` (creating it with its TTL) and answers
    :meth:`available` from memory. Until the watch delivered the bucket's current
    entries, no agent counts as available."""

    def __init__(self, bus: Bus, ttl: float = 30.0) -> None:
        self.bus = bus
        self.ttl = ttl
        self.agents: dict[str, Heartbeat] = {}
        self._task: asyncio.Task[None] | None = None
        self._watcher: Any = None

    async def start(self) -> None:
        bucket = self.bus.subjects.agents_bucket
        # Made (with this TTL, the layout's replicas) if missing; else used as it is.
        kv = await self.bus.bucket(bucket, dataclasses.replace(self.bus.layout,
                                                               agent_ttl=self.ttl))
        self._watcher = await kv.watchall()
        self._task = asyncio.create_task(self._follow(), name="agent-presence")

    async def stop(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    def available(self, now: float | None = None) -> bool:
        """Whether an agent can take a conversation now (see :func:`available`)."""
        return available(self.agents, time.time() if now is None else now, self.ttl)

    async def _follow(self) -> None:
        async for entry in self._watcher:  # ends when the watcher is stopped
            if entry is None:
                continue  # the current entries were all delivered
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                self.agents.pop(entry.key, None)
                continue
            created = entry.created
            at = created.timestamp() if created is not None else time.time()
            beat = _heartbeat(entry.value, at)
            if beat is None:
                log.warning("agent %s: heartbeat is not a JSON object; ignored", entry.key)
                self.agents.pop(entry.key, None)
            else:
                self.agents[entry.key] = beat
