"""The NATS round trips a hub turn cannot do without, alone: the floor under a turn.

A turn (docs/architecture.md, "One turn's timeline") waits, one after another, for four
things the guarantees need: the channel's message stored in the messages stream and
copied into the router's inputs partition (acks follow commits), the router's pull
request delivering it, the conversation's state committed with the step's outputs (one
KV update, the outbox), and the reply stored and pushed to the channel's live feed
(exactly-once replies read from the stream). :func:`floor_load` does just those, with
nats-py and the hub's own fetch (:class:`commhub.core.pull.Puller`), on streams and a
bucket made with the hub's own settings (:func:`commhub.core.streams.stream_configs`)
under a prefix of its own, in one process, with no routing, no recorder and one output
a turn instead of two or three; with ``websocket=True`` the messages come from and the
replies go to WebSocket clients of a bare ``websockets`` server (the library the hub's
channel uses), else the client publishes on the bus itself. Its rate and latency are
what the hub's design allows on this machine before any of the hub's own work; the
hub's figures beside it say what that work costs.

Bounded: ``n`` conversations x ``turns`` turns, each turn's wait capped at 10 s;
it deletes its streams and bucket at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass

import nats
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from commhub.core.pull import Puller
from commhub.core.streams import Layout, bucket_configs, stream_configs
from commhub.core.subjects import Subjects

__all__ = ["Floor", "floor_load"]


@dataclass
class Floor:
    """What :func:`floor_load` measured."""

    rate: float  # turns per second
    latencies: list[float]  # each turn's, in seconds: sent to reply received
    messages_in: float  # NATS messages the connection received, per turn
    messages_out: float  # and published (acks and pull requests included)


async def floor_load(url: str, n: int, turns: int, *, websocket: bool = False) -> Floor:
    """Run ``n`` conversations of ``turns`` turns through the bare round trips. With
    ``websocket`` each conversation is a WebSocket client of a bare ``websockets`` server
    in this process, which publishes its frames and sends the replies back, and a
    turn's latency is measured at that client, as the hub's is."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    s = Subjects(f"floor{uuid.uuid4().hex[:8]}")
    layout = Layout(partitions=1)
    streams = stream_configs(s, layout)
    for config in streams:
        await js.add_stream(config)
    kv = await js.create_key_value(next(c for c in bucket_configs(s, layout)
                                        if c.bucket == s.state_bucket))
    await js.add_consumer(s.inputs_stream, ConsumerConfig(
        durable_name="floor", ack_policy=AckPolicy.EXPLICIT, ack_wait=30,
        filter_subject=f"{s.prefix}.part.0.>", max_ack_pending=1024))
    puller = await Puller(nc, s.inputs_stream, "floor").start()
    waiting: dict[str, asyncio.Future[None]] = {}
    revisions: dict[str, int] = {}

    clients: dict[str, ServerConnection] = {}

    async def on_reply(msg: Msg) -> None:  # the channel's live feed
        name = msg.subject.rsplit(".", 1)[-1]
        if websocket:
            await clients[name].send(msg.data)
            return
        future = waiting.pop(name, None)
        if future is not None and not future.done():
            future.set_result(None)

    async def channel(ws: ServerConnection) -> None:  # a frame in, stored, then the next
        async for frame in ws:
            data = frame.encode() if isinstance(frame, str) else frame
            name = data[:12].decode()
            clients[name] = ws
            await js.publish(s.inbound("ws", name), data[12:])

    feed = await js.subscribe(f"{s.prefix}.out.ws.>", cb=on_reply, ordered_consumer=True,
                              deliver_policy=DeliverPolicy.NEW)

    async def step(msg: Msg) -> None:  # the router: commit, then publish, then ack
        conversation = msg.subject.rsplit(".", 1)[-1]
        state = b'{"state":"asking","outbox":[' + msg.data + b"]}"
        last = revisions.get(conversation)
        revisions[conversation] = (await kv.put(conversation, state) if last is None
                                   else await kv.update(conversation, state, last))
        await js.publish(s.outbound("ws", conversation), msg.data,
                         headers={"Nats-Msg-Id": f"{conversation}.{msg.metadata.sequence.stream}"})
        await msg.ack()

    async def router() -> None:
        tasks: set[asyncio.Task[None]] = set()
        while True:
            try:
                msgs = await puller.fetch(64, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                task = asyncio.create_task(step(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    latencies: list[float] = []
    payload = b"x" * 200

    async def over_websocket(port: int) -> None:
        name = uuid.uuid4().hex[:12]
        async with connect(f"ws://127.0.0.1:{port}") as ws:
            for _ in range(turns):
                started = time.perf_counter()
                await ws.send(name.encode() + payload)
                await asyncio.wait_for(ws.recv(), 10)
                latencies.append(time.perf_counter() - started)

    async def conversation() -> None:
        if server is not None:
            await over_websocket(server.sockets[0].getsockname()[1])
            return
        name = uuid.uuid4().hex[:12]
        for _ in range(turns):
            future = asyncio.get_running_loop().create_future()
            waiting[name] = future
            started = time.perf_counter()
            await js.publish(s.inbound("ws", name), payload)  # the channel waits for the store
            await asyncio.wait_for(future, 10)
            latencies.append(time.perf_counter() - started)

    server = await serve(channel, "127.0.0.1", 0) if websocket else None
    routing = asyncio.create_task(router())
    try:
        await asyncio.gather(*(conversation() for _ in range(min(n, 5))))  # warm up
        latencies.clear()
        in_before, out_before = nc.stats["in_msgs"], nc.stats["out_msgs"]
        started = time.perf_counter()
        await asyncio.gather(*(conversation() for _ in range(n)))
        rate = len(latencies) / (time.perf_counter() - started)
        messages_in = (nc.stats["in_msgs"] - in_before) / len(latencies)
        messages_out = (nc.stats["out_msgs"] - out_before) / len(latencies)
    finally:
        if server is not None:
            server.close()
            await server.wait_closed()
        routing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await routing
        await feed.unsubscribe()
        await puller.unsubscribe()
        for config in streams:
            with contextlib.suppress(Exception):
                await js.delete_stream(config.name)
        with contextlib.suppress(Exception):
            await js.delete_key_value(s.state_bucket)
        await nc.close()
    return Floor(rate, latencies, messages_in, messages_out)
