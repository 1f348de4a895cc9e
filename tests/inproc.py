"""Helpers for tests that run a Hub in the test's own process."""

from __future__ import annotations

from typing import Any

import msgspec

from commhub.core.hub import Hub


def ws_port(hub: Hub) -> int:
    """The port the hub's WebSocket channel actually listens on (it was started on 0)."""
    return int(hub.channels["websocket"].port)  # type: ignore[attr-defined]


async def hub_state(hub: Hub, conversation: str) -> dict[str, Any]:
    """The conversation state as any service reads it: ``{prefix}.api.state``."""
    assert hub.bus is not None
    reply = await hub.bus.nc.request(
        hub.bus.subjects.api("state"), msgspec.json.encode({"conversation": conversation}), 5
    )
    return dict(msgspec.json.decode(reply.data))
