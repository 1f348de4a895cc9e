"""The bus adapter against a real nats-server."""

from __future__ import annotations

import asyncio

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


async def test_bind_durable_rewinds_what_a_dead_consumer_held(bus: Bus) -> None:
    """Deliveries a dead process never acked come back at once after a rewinding bind,
    and not before the ack wait without one."""
    import nats.errors
    from nats.js.api import AckPolicy, ConsumerConfig

    stream = bus.subjects.messages_stream
    config = ConsumerConfig(durable_name="rewind", ack_policy=AckPolicy.EXPLICIT, ack_wait=60,
                            filter_subject=bus.subjects.all_inbound)
    for i in range(3):
        await bus.publish(bus.subjects.inbound("test", "c1"), _message(f"r{i}"))
    dead = await bus.bind_durable(stream, config)
    held = await dead.fetch(3, timeout=2)  # a process fetches, then dies without acking
    assert len(held) == 3

    plain = await bus.bind_durable(stream, config)
    try:
        await plain.fetch(3, timeout=0.5)
        raise AssertionError("held deliveries came back before the ack wait")
    except (nats.errors.TimeoutError, TimeoutError):
        pass

    rewound = await bus.bind_durable(stream, config, rewind_unacked=True)
    again = await rewound.fetch(3, timeout=5)
    assert [m.metadata.sequence.stream for m in again] == [1, 2, 3]
    for sub in (dead, plain, rewound):
        await sub.unsubscribe()


async def test_bind_durable_rewinds_on_a_work_queue_stream(bus: Bus) -> None:
    """The routers' inputs stream is a work queue, which allows only deliver-all
    consumers: a rewind there recreates the durable with deliver-all, and what a dead
    process held comes back at once."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    s = bus.subjects
    config = ConsumerConfig(durable_name="wq-rewind", ack_policy=AckPolicy.EXPLICIT,
                            ack_wait=60, deliver_policy=DeliverPolicy.ALL,
                            filter_subject=f"{s.prefix}.part.>")
    for i in range(3):
        await bus.publish(s.inbound("test", f"wq{i}"), _message(f"wq-message-{i:04d}"))
    # The server copies inputs into the inputs stream on its own time: wait (bounded)
    # until all three are there, or a fetch may see only some of them.
    async with asyncio.timeout(30):
        while (await bus.js.stream_info(s.inputs_stream)).state.messages < 3:
            await asyncio.sleep(0.05)
    dead = await bus.bind_durable(s.inputs_stream, config)
    held = await dead.fetch(3, timeout=5)
    assert len(held) == 3
    await held[0].ack()  # handled one, died holding two

    rewound = await bus.bind_durable(s.inputs_stream, config, rewind_unacked=True)
    again = await rewound.fetch(3, timeout=5)
    assert [m.data for m in again] == [m.data for m in held[1:]]
    for sub in (dead, rewound):
        await sub.unsubscribe()
