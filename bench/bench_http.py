"""Messages per second through the HTTP channel alone, beside a raw aiohttp handler.

    python bench/bench_http.py [--messages 5000] [--concurrency 50]

Starts a nats-server (temporary storage, free port), the HTTP channel on its own aiohttp
server (no router, no recorder), and a baseline server whose handler only parses the JSON
body and answers 202. The same aiohttp client then POSTs ``--messages`` messages with
``--concurrency`` requests in flight to each:

* **post**: ``POST /v1/conversations/{c}/messages``, each answered once JetStream stored
  it (one durable publish per request), over 100 conversations;
* **read**: the same number of outbound messages read back with ``GET ...?after=`` in
  pages of 1,000 (one batched direct-get read per page).

The baseline measures what aiohttp itself costs on this machine, so the ratio says what
the channel (validation, auth, the JetStream round trip) adds. Bounded: the given count,
a 300 s cap, loopback only; everything it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import benchrun
from aiohttp import web

from commhub.channels.http.channel import HttpChannel, HttpSettings
from commhub.core.bus import Bus
from commhub.core.channel import ChannelContext
from commhub.core.config import Settings
from commhub.core.envelope import Message, Sender, new_id
from commhub.core.natsserver import EmbeddedNats
from commhub.core.web import WebServer

CONVERSATIONS = 100


async def post_all(base: str, messages: int, concurrency: int) -> float:
    """POST ``messages`` messages with ``concurrency`` in flight; return messages/s."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(messages):
        queue.put_nowait(i)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                body = {"id": uuid.uuid4().hex, "user": "bench", "text": f"message {i}"}
                url = f"{base}/v1/conversations/bench-{i % CONVERSATIONS}/messages"
                async with http.post(url, json=body) as response:
                    if response.status != 202:
                        raise SystemExit(f"POST answered {response.status}: "
                                         f"{await response.text()}")
                    await response.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return messages / (time.perf_counter() - started)


async def read_all(base: str, conversation: str, expected: int) -> float:
    """Read ``expected`` messages back in pages of 1,000; return messages/s."""
    async with aiohttp.ClientSession() as http:
        started = time.perf_counter()
        cursor, seen = 0, 0
        while seen < expected:
            url = f"{base}/v1/conversations/{conversation}/messages?after={cursor}&limit=1000"
            async with http.get(url) as response:
                page = await response.json()
            if not page["messages"]:
                raise SystemExit(f"read stopped at {seen} of {expected}")
            seen += len(page["messages"])
            cursor = page["cursor"]
        return seen / (time.perf_counter() - started)


async def baseline_server() -> WebServer:
    """The same server class with a handler that only parses the body and answers 202."""
    server = WebServer("127.0.0.1", 0)

    async def accept(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        return web.json_response({"id": body.get("id"), "cursor": 0}, status=202)

    server.add_post("/v1/conversations/{conversation}/messages", accept)
    await server.start()
    return server


async def run(messages: int, concurrency: int, data_dir: Path) -> None:
    nats_server = EmbeddedNats(data_dir, port=0)
    url = await nats_server.start()
    settings = Settings(data_dir=data_dir, nats_url=url, prefix="bench", http_port=0)
    bus = await Bus.connect(url, settings.subjects)
    await bus.ensure_streams()
    web_server = WebServer("127.0.0.1", 0)
    web_server.bind()
    channel = HttpChannel(
        ChannelContext("http", bus, settings, web_server),
        # Per-conversation limits out of the way: the bench measures throughput.
        HttpSettings(max_messages_per_second=1e6, rate_burst=1_000_000),
    )
    baseline = await baseline_server()
    try:
        await channel.start()
        await web_server.start()
        await post_all(web_server.url, min(500, messages), concurrency)  # warm up
        raw = await post_all(baseline.url, messages, concurrency)
        posted = await post_all(web_server.url, messages, concurrency)
        outbound = [
            (settings.subjects.outbound("http", "bench-read"), Message(
                id=new_id(), conversation="bench-read", channel="http", direction="out",
                sender=Sender(id="bot", kind="bot"), text=f"reply {i}"))
            for i in range(messages)
        ]
        for start in range(0, messages, 1000):
            await bus.publish_all(outbound[start:start + 1000])
        read = await read_all(web_server.url, "bench-read", messages)
    finally:
        await channel.stop()
        await web_server.stop()
        await baseline.stop()
        await bus.close()
        await asyncio.to_thread(nats_server.stop)
    print(f"messages: {messages}, concurrency: {concurrency}")
    print(f"baseline (aiohttp handler, JSON parse, no bus): {raw:8.0f} req/s")
    print(f"http channel POST (stored in JetStream):        {posted:8.0f} msg/s"
          f"  ({posted / raw:.0%} of baseline)")
    print(f"http channel GET pages of 1000:                  {read:8.0f} msg/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="commhub-bench-http-") as tmp:
        benchrun.run(asyncio.wait_for(run(args.messages, args.concurrency, Path(tmp)), 300))


if __name__ == "__main__":
    main()
