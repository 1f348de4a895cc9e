"""Streams and buckets: replicas and placement from the settings, reconciled without
undoing an operator's changes, made by an admin step when roles may not make them, and
the inputs stream's partitions (on one server; tests/test_cluster.py has R3)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from commhub.core.bus import Bus
from commhub.core.config import Settings
from commhub.core.envelope import Message, Sender, WorkflowInput
from commhub.core.hub import Hub
from commhub.core.streams import Layout, StreamSetupError, partitions_of
from commhub.core.subjects import Subjects


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "commhub.core.cli", *args]


async def test_three_replicas_on_one_server_is_one_clear_line(
    nats_url: str, subjects: Subjects
) -> None:
    bus = await Bus.connect(nats_url, subjects, layout=Layout(replicas=3))
    try:
        with pytest.raises(StreamSetupError) as caught:
            await bus.ensure_streams()
    finally:
        await bus.close()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot set up stream {subjects.messages_stream} with 3 replicas")
    assert "set replicas (COMMHUB_REPLICAS)" in message


def test_up_with_more_replicas_than_servers_stops_with_that_line(
    nats_url: str, prefix: str, tmp_path: Path
) -> None:
    env = {**os.environ, "COMMHUB_DATA_DIR": str(tmp_path), "COMMHUB_REPLICAS": "3",
           "COMMHUB_PREFIX": prefix}
    result = subprocess.run(command("up", "--role", "router", "--nats-url", nats_url),
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("commhub: error")]
    assert len(errors) == 1 and "with 3 replicas" in errors[0], result.stderr


async def test_a_restart_keeps_what_an_operator_changed(bus: Bus) -> None:
    """Limits and bucket history set by hand survive ensure_streams; a field commhub owns
    (allow_direct, which channels need) is put back."""
    s = bus.subjects
    info = await bus.js.stream_info(s.messages_stream)
    await bus.js.update_stream(dataclasses.replace(
        info.config, max_age=7 * 86400, max_msgs_per_subject=500, allow_direct=False))
    kv = await bus.js.stream_info(f"KV_{s.state_bucket}")
    await bus.js.update_stream(dataclasses.replace(kv.config, max_msgs_per_subject=5))

    changed = await bus.ensure_streams()  # what the next start does

    after = (await bus.js.stream_info(s.messages_stream)).config
    assert after.max_age == 7 * 86400 and after.max_msgs_per_subject == 500
    assert after.allow_direct is True
    assert (await bus.js.stream_info(f"KV_{s.state_bucket}")).config.max_msgs_per_subject == 5
    assert changed == [f"{s.messages_stream}: updated (allow_direct False -> True)"]
    assert await bus.ensure_streams() == []  # nothing left to change


async def test_with_manage_streams_off_an_admin_step_makes_them(
    settings: Settings, nats_url: str, tmp_path: Path
) -> None:
    off = settings.model_copy(update={"role": "router", "manage_streams": False})
    hub = Hub(off)
    with pytest.raises(StreamSetupError, match="run `commhub streams apply`"):
        await hub.start()

    process = await asyncio.create_subprocess_exec(
        *command("streams", "apply", "--nats-url", nats_url, "--prefix", settings.prefix,
                 "--data-dir", str(tmp_path / "admin")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    p = settings.prefix
    assert f"{p}_messages: created with 1 replica" in lines
    assert f"{p}_inputs: created with 1 replica" in lines
    assert f"{p}_state: created with 1 replica" in lines

    hub = Hub(off)
    await hub.start()
    await hub.stop()


async def test_inputs_are_partitioned_by_conversation(bus: Bus) -> None:
    """A conversation's messages and workflow inputs land in one partition of the
    inputs stream, whatever the channel; the count is written in the stream."""
    s = bus.subjects
    info = await bus.js.stream_info(s.inputs_stream)
    assert partitions_of(info.config) == 16
    for conversation in ("c1", "c2", "conv-xyz"):
        for channel in ("websocket", "http"):
            await bus.publish(s.inbound(channel, conversation), Message(
                id=f"{conversation}-{channel}-message", conversation=conversation,
                channel=channel, direction="in", sender=Sender(id="u"), text="hi"))
        await bus.publish(s.workflow_input(conversation), WorkflowInput(
            id=f"{conversation}-workflow-input", conversation=conversation, event="poke"))
    sub = await bus.js.pull_subscribe(f"{s.prefix}.part.>", stream=s.inputs_stream)
    msgs = []
    while len(msgs) < 9:
        msgs.extend(await sub.fetch(9 - len(msgs), timeout=5))
    partition: dict[str, set[str]] = {}
    for msg in msgs:
        assert s.unpartitioned(msg.subject).startswith((f"{s.prefix}.in.", f"{s.prefix}.wf."))
        partition.setdefault(msg.subject.rsplit(".", 1)[1], set()).add(msg.subject.split(".")[2])
    await sub.unsubscribe()
    assert all(len(parts) == 1 for parts in partition.values()), partition


async def test_an_upgrade_starts_the_inputs_after_the_old_routers_ack_floor(
    nats_url: str, subjects: Subjects
) -> None:
    """A prefix where a release before partitions ran (streams and the shared durable
    commhub_router): the inputs stream copies what that durable had not acked, not the
    history it handled, and the old durable goes."""
    from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

    bus = await Bus.connect(nats_url, subjects)
    try:
        s = subjects
        await bus.js.add_stream(StreamConfig(
            name=s.messages_stream, subjects=[s.all_inbound, s.all_outbound,
                                              s.all_workflow_input]))
        await bus.js.add_consumer(s.messages_stream, ConsumerConfig(
            durable_name=s.router_consumer, ack_policy=AckPolicy.EXPLICIT,
            filter_subjects=[s.all_inbound, s.all_workflow_input]))
        for n in range(3):
            await bus.publish(s.inbound("websocket", f"old{n}"), Message(
                id=f"old-release-message-{n}", conversation=f"old{n}", channel="websocket",
                direction="in", sender=Sender(id="u"), text="hi"))
        old = await bus.js.pull_subscribe_bind(durable=s.router_consumer,
                                               stream=s.messages_stream)
        for msg in await old.fetch(2, timeout=5):  # the old router handled two
            await msg.ack()
        await old.unsubscribe()

        lines = await bus.ensure_streams()

        assert f"{s.router_consumer}: deleted (replaced by the partitioned inputs)" in lines
        sub = await bus.js.pull_subscribe(f"{s.prefix}.part.>", stream=s.inputs_stream)
        msgs = await sub.fetch(3, timeout=3)
        assert [m.subject.rsplit(".", 1)[1] for m in msgs] == ["old2"]
    finally:
        await bus.close()
