"""Messages per second through the WebSocket channel alone, beside raw JetStream publishes.

    python bench/bench_websocket.py [--clients 50] [--messages 200]

Starts a nats-server (temporary storage, free port) and the WebSocket channel alone (no
router, no recorder), then measures both directions:

* **inbound**: N clients each send M message frames one after another, each waiting for
  its ``ack`` (the channel acks after JetStream stored the message). Baseline: N tasks
  each doing M sequential ``js.publish`` of the same records on the same server: the
  least the channel could cost.
* **outbound**: N clients each connected to its own conversation while M messages per
  conversation are published on ``out.websocket.{conversation}``; the rate is messages
  delivered to the clients per second, from the first publish to the last frame.

Bounded: N x M messages each way, loopback only; everything stops at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

from benchrun import run
from websockets.asyncio.client import connect

from commhub.channels.websocket.channel import WebSocketChannel, WebSocketSettings
from commhub.core.bus import Bus
from commhub.core.channel import ChannelContext
from commhub.core.config import Settings
from commhub.core.envelope import Message, Sender, new_id
from commhub.core.natsserver import EmbeddedNats
from commhub.core.subjects import Subjects

PREFIX = "bench"


async def inbound_client(port: int, messages: int) -> None:
    conv = f"in-{uuid.uuid4().hex[:10]}"
    async with connect(f"ws://127.0.0.1:{port}/ws?conversation={conv}&user=b") as ws:
        await ws.recv()  # the "connected" event
        for i in range(messages):
            await ws.send(json.dumps({"type": "message", "id": new_id(), "text": f"hello {i}"}))
            while json.loads(await ws.recv())["type"] != "ack":
                pass


async def baseline_publisher(bus: Bus, messages: int) -> None:
    conv = f"base-{uuid.uuid4().hex[:10]}"
    for i in range(messages):
        message = Message(id=new_id(), conversation=conv, channel="websocket", direction="in",
                          sender=Sender(id="b"), text=f"hello {i}")
        await bus.publish(bus.subjects.inbound("websocket", conv), message)


async def outbound_client(port: int, conv: str, messages: int, connected: asyncio.Semaphore
                          ) -> None:
    async with connect(f"ws://127.0.0.1:{port}/ws?conversation={conv}&user=b") as ws:
        await ws.recv()  # connected: its consumer follows the conversation from now on
        connected.release()
        received = 0
        while received < messages:
            if json.loads(await ws.recv())["type"] == "message":
                received += 1


async def main(clients: int, messages: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp), port=0)
        url = await server.start()
        bus = await Bus.connect(url, Subjects(PREFIX))
        await bus.ensure_streams()
        settings = Settings(data_dir=Path(tmp) / "data", nats_url=url, prefix=PREFIX, ws_port=0)
        # Per-connection limits out of the way: the bench measures throughput.
        config = WebSocketSettings(max_messages_per_second=1e6, rate_burst=1_000_000,
                                   max_queue=messages + 10)
        channel = WebSocketChannel(ChannelContext("websocket", bus, settings), config)
        await channel.start()
        port = channel.port
        assert port is not None
        total = clients * messages
        try:
            started = time.perf_counter()
            await asyncio.gather(*(baseline_publisher(bus, messages) for _ in range(clients)))
            baseline = total / (time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(inbound_client(port, messages) for _ in range(clients)))
            inbound = total / (time.perf_counter() - started)

            convs = [f"out-{uuid.uuid4().hex[:10]}" for _ in range(clients)]
            connected = asyncio.Semaphore(0)
            readers = [asyncio.create_task(outbound_client(port, c, messages, connected))
                       for c in convs]
            for _ in convs:
                await asyncio.wait_for(connected.acquire(), 60)
            started = time.perf_counter()
            await bus.publish_all(
                (bus.subjects.outbound("websocket", conv),
                 Message(id=new_id(), conversation=conv, channel="websocket", direction="out",
                         sender=Sender(id="bot", kind="bot"), text=f"reply {i}"))
                for i in range(messages) for conv in convs
            )
            await asyncio.wait_for(asyncio.gather(*readers), 300)
            outbound = total / (time.perf_counter() - started)
        finally:
            await channel.stop()
            await bus.close()
            server.stop()
    print(f"websocket channel alone, {clients} clients x {messages} messages each way")
    print(f"  inbound  (frame -> JetStream -> ack): {inbound:9,.0f} msg/s")
    print(f"  baseline (sequential js.publish)    : {baseline:9,.0f} msg/s "
          f"(channel/baseline {inbound / baseline:.2f})")
    print(f"  outbound (stream -> client frames)  : {outbound:9,.0f} msg/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    run(main(args.clients, args.messages))
