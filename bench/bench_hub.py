"""Turns per second through the whole hub, beside a raw NATS echo measured in the same run.

    python bench/bench_hub.py [--conversations 50] [--turns 20]

Starts ``commhub up`` in a subprocess (embedded nats-server, temporary data directory,
free ports), then drives N concurrent WebSocket conversations through a workflow. A
turn is one user message and the bot's first reply to it; its latency is measured at
the client. The baseline is a nats-py request/reply echo with the same concurrency
against the same nats-server, so the ratio says what the hub costs on top of the bus.
Bounded: N x turns messages, a 300 s cap, loopback only; it stops the hub at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats
from websockets.asyncio.client import connect

# One booking, start to finish: intent, party size, day, time, name, email, confirmation.
SCRIPT = ["I'd like to book a table", "4", "tomorrow", "19:30", "Ann", "ann@example.com", "yes"]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def wait_for_hub(data_dir: Path, process: subprocess.Popen[bytes]) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"commhub up exited with {process.returncode}")
        try:
            return dict(json.loads((data_dir / "hub.json").read_text()))
        except (OSError, ValueError):
            await asyncio.sleep(0.1)
    raise SystemExit("hub did not start within 60 s")


def ws_port(info: dict[str, object]) -> int:
    for line in info["endpoints"]:  # type: ignore[union-attr]
        if str(line).startswith("websocket: ws://"):
            return int(str(line).split("ws://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    raise SystemExit("no websocket endpoint in hub.json")


async def conversation(port: int, turns: int, latencies: list[float]) -> None:
    conv = f"bench-{uuid.uuid4().hex[:12]}"
    async with connect(f"ws://127.0.0.1:{port}/ws?conversation={conv}&user=bench") as ws:
        for turn in range(turns):
            message_id = uuid.uuid4().hex
            started = time.perf_counter()
            await ws.send(json.dumps(
                {"type": "message", "id": message_id, "text": SCRIPT[turn % len(SCRIPT)]}
            ))
            while True:
                frame = json.loads(await ws.recv())
                if frame.get("type") == "error":  # e.g. rate_limited: the run is invalid
                    raise SystemExit(f"the hub refused a bench message: {frame}")
                if frame.get("type") == "message" and frame.get("reply_to") == message_id:
                    break
            latencies.append(time.perf_counter() - started)


async def hub_load(port: int, n: int, turns: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    started = time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(*(conversation(port, turns, latencies) for _ in range(n))), 300
    )
    return len(latencies) / (time.perf_counter() - started), latencies


async def echo_load(url: str, n: int, requests: int) -> tuple[float, list[float]]:
    nc = await nats.connect(url)

    async def echo(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe("bench.echo", cb=echo)
    payload = b"x" * 200
    latencies: list[float] = []

    async def client() -> None:
        for _ in range(requests):
            started = time.perf_counter()
            await nc.request("bench.echo", payload, timeout=5)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(n)))
    rate = len(latencies) / (time.perf_counter() - started)
    await nc.close()
    return rate, latencies


def report(name: str, rate: float, latencies: list[float]) -> None:
    ms = [x * 1000 for x in latencies]
    print(f"{name:<28} {rate:>9.0f}/s   p50 {percentile(ms, 50):7.2f} ms   "
          f"p95 {percentile(ms, 95):7.2f} ms   p99 {percentile(ms, 99):7.2f} ms   "
          f"mean {statistics.fmean(ms):7.2f} ms")


def start_hub(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "commhub.core.cli", "up"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--turns", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="commhub-bench-") as tmp:
        data_dir = Path(tmp)
        # The per-connection rate limit protects a hub from one client; a bench client
        # sends as fast as the hub answers, so it gets a limit it cannot reach.
        config = data_dir / "bench.toml"
        config.write_text(
            "[plugins.websocket]\nmax_messages_per_second = 100000\nrate_burst = 100000\n"
        )
        env = {**os.environ, "COMMHUB_DATA_DIR": str(data_dir), "COMMHUB_NATS_PORT": "0",
               "COMMHUB_WS_PORT": "0", "COMMHUB_HTTP_PORT": "0",
               "COMMHUB_CONFIG": str(config)}
        process = start_hub(env)
        try:
            info = await wait_for_hub(data_dir, process)
            port = ws_port(info)
            await hub_load(port, 5, 4)  # warm up: classifier, consumers, connections
            rate, latencies = await hub_load(port, args.conversations, args.turns)
            echo_rate, echo_latencies = await echo_load(
                str(info["nats_url"]), args.conversations, args.turns
            )
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    print(f"{args.conversations} concurrent conversations x {args.turns} turns "
          f"({os.cpu_count()} cores)")
    report("hub turns (WebSocket)", rate, latencies)
    report("baseline: NATS req/reply", echo_rate, echo_latencies)
    print(f"ratio hub/baseline: {rate / echo_rate:.3f} of the echo rate")


if __name__ == "__main__":
    asyncio.run(main())
