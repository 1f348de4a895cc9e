"""Turns per second through the whole hub, beside a raw NATS echo measured in the same run.

    python bench/bench_hub.py [--conversations 50] [--turns 20] [--split [--routers N]]

Starts ``commhub up`` in a subprocess (embedded nats-server, temporary data directory,
free ports), or with ``--split`` a nats-server and one ``commhub up --role`` process per
role (channels, router, recorder), then drives N concurrent WebSocket conversations
through a workflow. A
turn is one user message and the bot's first reply to it; its latency is measured at
the client. The baseline is a nats-py request/reply echo with the same concurrency
against the same nats-server, so the ratio says what the hub costs on top of the bus.
On Linux it also prints the commhub processes' CPU time per turn, which moves less than
the rates when the machine runs other work.
Bounded: N x turns messages, a 300 s cap, loopback only; it stops the hub at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
from websockets.asyncio.client import connect

from commhub.core.natsauth import read_credentials
from commhub.core.natsserver import EmbeddedNats

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


def start_hub(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "commhub.core.cli", "up", *args], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pids: list[int]) -> float | None:
    """User plus system CPU seconds the processes used so far (None off Linux)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@contextlib.asynccontextmanager
async def running_hub(data_dir: Path, split: bool, pids: list[int] | None = None,
                      routers: int = 1) -> AsyncIterator[tuple[int, str]]:
    """Yield (WebSocket port, NATS URL) of a hub: one `commhub up` process, or with
    ``split`` an embedded nats-server and one process per role (channels, router,
    recorder), the scale-out layout on one machine. ``pids`` gets the commhub
    processes' ids."""
    # The per-connection rate limit protects a hub from one client; a bench client
    # sends as fast as the hub answers, so it gets a limit it cannot reach.
    config = data_dir / "bench.toml"
    config.write_text(
        "[plugins.websocket]\nmax_messages_per_second = 100000\nrate_burst = 100000\n"
    )
    env = {**os.environ, "COMMHUB_NATS_PORT": "0", "COMMHUB_WS_PORT": "0",
           "COMMHUB_HTTP_PORT": "0", "COMMHUB_CONFIG": str(config)}
    processes: list[subprocess.Popen[bytes]] = []
    server: EmbeddedNats | None = None
    try:
        if not split:
            processes.append(start_hub({**env, "COMMHUB_DATA_DIR": str(data_dir)}))
            if pids is not None:
                pids.append(processes[0].pid)
            info = await wait_for_hub(data_dir, processes[0])
            credentials = read_credentials(data_dir)  # the hub's embedded server wants them
            assert credentials is not None
            yield ws_port(info), credentials.url(str(info["nats_url"]))
            return
        server = EmbeddedNats(data_dir / "nats", port=0)
        url = await server.start()
        port = free_port()
        names = ["recorder", *(f"router{i}" for i in range(routers)), "channels"]
        for name in names:
            role = name.rstrip("0123456789")
            processes.append(start_hub({**env, "COMMHUB_NATS_URL": url,
                                        "COMMHUB_WS_PORT": str(port),
                                        "COMMHUB_DATA_DIR": str(data_dir / name)},
                                       "--role", role))
        if pids is not None:
            pids.extend(process.pid for process in processes)
        await wait_for_port(port, processes)
        yield port, url
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(30)
        if server is not None:
            server.stop()


async def wait_for_port(port: int, processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise SystemExit("a role process exited during start")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await asyncio.sleep(2)  # the router and recorder start beside the channel
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise SystemExit("the channels process did not start within 60 s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--split", action="store_true",
                        help="run channels, router and recorder as separate processes")
    parser.add_argument("--routers", type=int, default=1,
                        help="router processes with --split (they share the partitions)")
    args = parser.parse_args()
    pids: list[int] = []
    with tempfile.TemporaryDirectory(prefix="commhub-bench-") as tmp:
        async with running_hub(Path(tmp), args.split, pids, args.routers) as (port, url):
            await hub_load(port, 5, 4)  # warm up: classifier, consumers, connections
            cpu_before = cpu_seconds(pids)
            rate, latencies = await hub_load(port, args.conversations, args.turns)
            cpu_after = cpu_seconds(pids)
            echo_rate, echo_latencies = await echo_load(url, args.conversations, args.turns)
    layout = (f"one process per role, {args.routers} router(s)" if args.split
              else "one hub process")
    print(f"{args.conversations} concurrent conversations x {args.turns} turns "
          f"({os.cpu_count()} cores, {layout})")
    report("hub turns (WebSocket)", rate, latencies)
    report("baseline: NATS req/reply", echo_rate, echo_latencies)
    print(f"ratio hub/baseline: {rate / echo_rate:.3f} of the echo rate")
    if cpu_before is not None and cpu_after is not None:
        # Steadier than the rates on a machine that runs other work meanwhile.
        print(f"commhub CPU per turn: {(cpu_after - cpu_before) * 1000 / len(latencies):.2f} ms "
              "(user + system, nats-server not included)")


if __name__ == "__main__":
    asyncio.run(main())
