"""Turns per second through the whole hub, beside a raw NATS echo measured in the same run.

    python bench/bench_hub.py [--conversations 50] [--turns 20] [--split [--routers N]]

Starts ``commhub up`` in a subprocess (embedded nats-server, temporary data directory,
free ports), or with ``--split`` a nats-server and one ``commhub up --role`` process per
role (channels, router, recorder), then drives N concurrent WebSocket conversations
through a workflow. A
turn is one user message and the bot's first reply to it; its latency is measured at
the client. The baseline is a nats-py request/reply echo with the same concurrency
against the same nats-server, so the ratio says what the hub costs on top of the bus.
A second baseline, the floor (``bench/turnfloor.py``), runs only the NATS round trips a
turn must wait for, one after another, on streams made with the hub's settings: what
the design allows before any of the hub's own work; once alone, once behind a bare
WebSocket server, measured at its client as the hub's turns are.
On Linux it also prints the commhub processes' CPU time per turn, which moves less than
the rates when the machine runs other work. From the processes' ``/metrics`` it prints
the router's mean time per stage during the load, each role's event-loop lag
during it (from the lag histogram: what 99% and all of the probes stayed within) and
the NATS messages each role's connection received and published per turn;
from the server, the recorder's lag (records of its durables not yet acked): the
largest seen during the load (read every 0.25 s) and what is left when the last turn
is answered.
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

import aiohttp
import nats
from benchrun import run
from prometheus_client.parser import text_string_to_metric_families
from turnfloor import floor_load
from websockets.asyncio.client import ClientConnection, connect

from commhub.core.natsauth import read_credentials
from commhub.core.natsserver import EmbeddedNats
from commhub.core.subjects import Subjects

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


async def turn(ws: ClientConnection, text: str) -> None:
    """Send one message and wait for the bot's first reply to it."""
    message_id = uuid.uuid4().hex
    await ws.send(json.dumps({"type": "message", "id": message_id, "text": text}))
    while True:
        frame = json.loads(await ws.recv())
        if frame.get("type") == "error":  # e.g. rate_limited: the run is invalid
            raise SystemExit(f"the hub refused a bench message: {frame}")
        if frame.get("type") == "message" and frame.get("reply_to") == message_id:
            return


async def conversation(port: int, turns: int, latencies: list[float]) -> None:
    conv = f"bench-{uuid.uuid4().hex[:12]}"
    async with connect(f"ws://127.0.0.1:{port}/ws?conversation={conv}&user=bench") as ws:
        for step in range(turns):
            started = time.perf_counter()
            await turn(ws, SCRIPT[step % len(SCRIPT)])
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


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
ROUTER_STAGES = ("load", "classify", "decide", "commit", "publish", "total")


def metrics_url(info: dict[str, object]) -> str:
    """The /metrics URL of the hub that wrote ``info`` (its hub.json)."""
    for line in info["endpoints"]:  # type: ignore[union-attr]
        if str(line).startswith("http: ") and "/healthz" in str(line):
            return str(line).split()[1] + "/metrics"
    raise SystemExit("no http endpoint in hub.json")


async def scrape(urls: dict[str, str]) -> dict[str, Samples]:
    found: dict[str, Samples] = {}
    async with aiohttp.ClientSession() as session:
        for role, url in urls.items():
            async with session.get(url) as response:
                text = await response.text()
            samples: Samples = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
            found[role] = samples
    return found


def stage_means(before: Samples, after: Samples) -> dict[str, float]:
    """The router's mean milliseconds per stage between two scrapes of one process."""
    means = {}
    for stage in ROUTER_STAGES:
        key = (("stage", stage),)
        count = (after.get(("commhub_router_stage_seconds_count", key), 0.0)
                 - before.get(("commhub_router_stage_seconds_count", key), 0.0))
        total = (after.get(("commhub_router_stage_seconds_sum", key), 0.0)
                 - before.get(("commhub_router_stage_seconds_sum", key), 0.0))
        if count > 0:
            means[stage] = total / count * 1000
    return means


def loop_lag_during(before: Samples, after: Samples) -> str:
    """The event loop's lag between two scrapes of one process, from the histogram:
    the probes taken, and the bucket bounds that 99% and all of them stayed within."""
    buckets = sorted(
        (float(dict(labels)["le"]), value - before.get((name, labels), 0.0))
        for (name, labels), value in after.items()
        if name == "commhub_event_loop_lag_seconds_bucket"
    )
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return "no probes"

    def within(share: float) -> str:
        bound = next(le for le, count in buckets if count >= share * total)
        return "over 2.5 s" if bound == float("inf") else f"<= {bound * 1000:g} ms"

    return f"{total:.0f} probes, 99% {within(0.99)}, all {within(1.0)}"


def nats_messages_per_turn(before: Samples, after: Samples, turns: int) -> str:
    """Messages one process's NATS connection received and published per turn between
    two scrapes (``commhub_nats_messages_total``)."""
    counts = {}
    for direction in ("in", "out"):
        key = ("commhub_nats_messages_total", (("direction", direction),))
        counts[direction] = (after.get(key, 0.0) - before.get(key, 0.0)) / max(turns, 1)
    return f"in {counts['in']:.1f}, out {counts['out']:.1f}"


class RecorderLag:
    """Reads the recorder's durables' lag (pending + ack pending) every 0.25 s."""

    def __init__(self, url: str, subjects: Subjects) -> None:
        self.url = url
        self.durables = [(stream, subjects.recorder_consumer(stream))
                         for stream in (subjects.messages_stream, subjects.events_stream)]
        self.largest = 0
        self._task: asyncio.Task[None] | None = None
        self._nc: nats.NATS | None = None

    async def read(self) -> int:
        assert self._nc is not None
        js = self._nc.jetstream()
        lag = 0
        for stream, durable in self.durables:
            with contextlib.suppress(Exception):  # not created yet: nothing to read
                info = await js.consumer_info(stream, durable)
                lag += int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        return lag

    async def __aenter__(self) -> RecorderLag:
        self._nc = await nats.connect(self.url)
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None and self._nc is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._nc.close()

    async def _watch(self) -> None:
        while True:
            self.largest = max(self.largest, await self.read())
            await asyncio.sleep(0.25)


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


def stop_hub(process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM, then SIGKILL if it has not ended within ``timeout`` seconds."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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
                      metrics: dict[str, str] | None = None, routers: int = 1
                      ) -> AsyncIterator[tuple[int, str]]:
    """Yield (WebSocket port, NATS URL) of a hub: one `commhub up` process, or with
    ``split`` an embedded nats-server and one process per role (channels, router,
    recorder), the scale-out layout on one machine. ``pids`` gets the commhub
    processes' ids, ``metrics`` each role's /metrics URL."""
    if metrics is None:
        metrics = {}
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
            metrics["all"] = metrics_url(info)
            credentials = read_credentials(data_dir)  # the hub's embedded server wants them
            assert credentials is not None
            yield ws_port(info), credentials.url(str(info["nats_url"]))
            return
        server = EmbeddedNats(data_dir / "nats", port=0)
        url = await server.start()
        port = free_port()
        # The first router is "router" (its stage means are read); more are router2, ...
        names = ["recorder", "router", *(f"router{i}" for i in range(2, routers + 1)),
                 "channels"]
        for name in names:
            role = name.rstrip("0123456789")
            http_port = free_port()  # only the recorder writes a hub.json to read it from
            metrics[name] = f"http://127.0.0.1:{http_port}/metrics"
            processes.append(start_hub({**env, "COMMHUB_NATS_URL": url,
                                        "COMMHUB_WS_PORT": str(port),
                                        "COMMHUB_HTTP_PORT": str(http_port),
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
    urls: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="commhub-bench-") as tmp:
        async with running_hub(Path(tmp), args.split, pids, urls,
                               args.routers) as (port, url):
            await hub_load(port, 5, 4)  # warm up: classifier, consumers, connections
            scraped_before = await scrape(urls)
            async with RecorderLag(url, Subjects()) as recorder_lag:
                cpu_before = cpu_seconds(pids)
                rate, latencies = await hub_load(port, args.conversations, args.turns)
                cpu_after = cpu_seconds(pids)
                lag_at_end = await recorder_lag.read()
            scraped_after = await scrape(urls)
            echo_rate, echo_latencies = await echo_load(url, args.conversations, args.turns)
            floor = await floor_load(url, args.conversations, args.turns)
            floor_ws = await floor_load(url, args.conversations, args.turns, websocket=True)
    layout = (f"one process per role, {args.routers} router(s)" if args.split
              else "one hub process")
    print(f"{args.conversations} concurrent conversations x {args.turns} turns "
          f"({os.cpu_count()} cores, {layout})")
    report("hub turns (WebSocket)", rate, latencies)
    report("baseline: NATS req/reply", echo_rate, echo_latencies)
    print(f"ratio hub/baseline: {rate / echo_rate:.3f} of the echo rate")
    print("floor (bench/turnfloor.py): the round trips a turn must wait for, nothing else; "
          f"NATS messages per turn in {floor.messages_in:.1f}, out {floor.messages_out:.1f}")
    for name, measured in (("floor: NATS only", floor), ("floor: with a WebSocket", floor_ws)):
        report(name, measured.rate, measured.latencies)
        print(f"  hub against it: {rate / measured.rate:.3f} of its rate, p50 "
              f"{percentile(latencies, 50) / percentile(measured.latencies, 50):.2f} x its p50")
    if cpu_before is not None and cpu_after is not None:
        # Steadier than the rates on a machine that runs other work meanwhile.
        print(f"commhub CPU per turn: {(cpu_after - cpu_before) * 1000 / len(latencies):.2f} ms "
              "(user + system, nats-server not included)")
    router_role = "router" if args.split else "all"
    if router_role in scraped_after:
        means = stage_means(scraped_before.get(router_role, {}), scraped_after[router_role])
        print("router stage means: " + "   ".join(f"{k} {v:.2f} ms" for k, v in means.items()))
    for role, samples in scraped_after.items():
        print(f"event-loop lag during the load, {role}: "
              f"{loop_lag_during(scraped_before.get(role, {}), samples)}")
    print(f"recorder lag (records not acked): largest during the load "
          f"{recorder_lag.largest}, at the last reply {lag_at_end}")
    for role, samples in scraped_after.items():
        print(f"NATS messages per turn, {role}: "
              f"{nats_messages_per_turn(scraped_before.get(role, {}), samples, len(latencies))}")


if __name__ == "__main__":
    run(main())
