"""The bus adapter against a real nats-server."""

from __future__ import annotations

from commhub.core.bus import Bus
from commhub.core.envelope import Message, Sender


def _message(id_: str) -> Message:
    return Message(
        id=id_, conversation="c1", channel="test", direction="in", sender=Sender(id="u1"), text="hi"
    )


async def test_republished_id_is_dropped_by_the_duplicate_window(bus: Bus) -> None:
    """Publishing the same record twice stores it once (Nats-Msg-Id dedupe)."""
    subject = bus.subjects.inbound("test", "c1")
    first = await bus.publish(subject, _message("m1"))
    second = await bus.publish(subject, _message("m1"))
    assert second.duplicate is True
    assert second.seq == first.seq
    info = await bus.js.stream_info(bus.subjects.messages_stream)
    assert info.state.messages == 1


async def test_ensure_streams_is_idempotent(bus: Bus) -> None:
    """Running setup again on existing streams keeps their messages."""
    await bus.publish(bus.subjects.inbound("test", "c1"), _message("m2"))
    await bus.ensure_streams()
    info = await bus.js.stream_info(bus.subjects.messages_stream)
    assert info.state.messages == 1
