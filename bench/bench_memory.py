"""The hub's memory (RSS): at start, after many conversations, and its growth per turn.

Usage: ``python bench/bench_memory.py [--conversations 10000] [--turn-seconds 30]
[--turns 1000000]``

Starts ``commhub up`` in a subprocess (embedded nats-server, temporary data directory,
free ports) and reads the resident set size of the hub process (``VmRSS`` in /proc, so
Linux only; the nats-server child is reported apart) at three points:

1. at start, once it is ready;
2. after ``--conversations`` conversations, each a WebSocket connection of its own that
   sends one message (it starts the booking workflow, which then waits for an answer,
   so every conversation leaves state, a timer and a recorded row behind), 50 at a time,
   sampled every 2 s: the slope over the second half extrapolates a run cut short;
3. after ``--turns`` turns (or ``--turn-seconds``, whichever comes first) in 50 long
   conversations (a booking script, over and over), sampled every 2 s, with a line at
   each milestone (10,000, 100,000, 250,000, 500,000 and 1,000,000 turns): the slope of
   RSS per turn over the second half of the samples (the first half warms caches up)
   extrapolates a run cut short to 1,000,000 turns. Beside
   each sample it reads ``commhub_recorder_pending`` from the hub's ``/metrics`` (records
   on the streams not yet committed to DuckDB), to show that the recorder keeps up with
   50 busy conversations and its lag does not grow.

Bounded in time: phase 2 stops at ``--conversation-seconds`` (default 60) even if
fewer conversations were done (the line says how many), phase 3 after
``--turn-seconds``; the whole run is loopback only, and the hub is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
from bench_hub import (  # the benches run from bench/
    SCRIPT,
    stop_hub,
    turn,
    wait_for_hub,
    ws_port,
)
from benchrun import run
from websockets.asyncio.client import connect

CONCURRENCY = 50
MILLION = 1_000_000


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def http_url(info: dict[str, object]) -> str:
    for line in info["endpoints"]:  # type: ignore[attr-defined]
        if str(line).startswith("http: http://"):
            return str(line).split(" ", 2)[1]
    raise SystemExit("no http endpoint in hub.json")


async def recorder_pending(session: aiohttp.ClientSession, url: str) -> int | None:
    """``commhub_recorder_pending`` from the hub's /metrics (None if it is not there)."""
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("commhub_recorder_pending "):
            return int(float(line.split()[1]))
    return None


async def many_conversations(
    port: int, n: int, seconds: float, sample: list[tuple[int, int]], pid: int
) -> int:
    """``n`` one-message conversations, CONCURRENCY at a time; appends (conversations,
    RSS) every 2 s to ``sample``; returns how many were done before ``seconds`` ran out."""
    done = 0
    deadline = time.monotonic() + seconds
    finished = asyncio.Event()

    async def worker() -> None:
        nonlocal done
        while done < n and time.monotonic() < deadline:
            done += 1
            conv = f"mem-{uuid.uuid4().hex[:12]}"
            async with connect(f"ws://127.0.0.1:{port}/ws?conversation={conv}&user={conv}") as ws:
                await turn(ws, SCRIPT[0])

    async def workers() -> None:
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        finished.set()

    async def sampler() -> None:
        while not finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), 2.0)
            sample.append((done, rss_bytes(pid)))

    await asyncio.gather(sampler(), workers())
    return done


MILESTONES = (10_000, 100_000, 250_000, 500_000, MILLION)


async def long_conversations(
    port: int, seconds: float, most: int, sample: list[tuple[int, int]], pid: int,
    url: str, lags: list[int],
) -> int:
    """CONCURRENCY conversations running the booking script over and over until
    ``most`` turns are done or ``seconds`` have passed; appends (turns, RSS) every 2 s to
    ``sample`` and the recorder's pending records to ``lags``, prints the RSS at each of
    :data:`MILESTONES` reached; returns the turns."""
    turns = 0
    stop = time.monotonic() + seconds
    started = time.monotonic()
    milestones = [m for m in MILESTONES if m <= most]

    def going() -> bool:
        return turns < most and time.monotonic() < stop

    async def worker() -> None:
        nonlocal turns
        conv = f"long-{uuid.uuid4().hex[:12]}"
        async with connect(f"ws://127.0.0.1:{port}/ws?conversation={conv}&user={conv}") as ws:
            step = 0
            while going():
                await turn(ws, SCRIPT[step % len(SCRIPT)])
                step += 1
                turns += 1
                if milestones and turns >= milestones[0]:
                    milestones.pop(0)
                    print(f"  after {turns:,} turns: hub RSS {mib(rss_bytes(pid))} "
                          f"({turns / (time.monotonic() - started):,.0f} turns/s)", flush=True)

    async def sampler() -> None:
        async with aiohttp.ClientSession() as session:
            while going():
                await asyncio.sleep(min(2.0, max(0.0, stop - time.monotonic())))
                sample.append((turns, rss_bytes(pid)))
                pending = await recorder_pending(session, url)
                if pending is not None:
                    lags.append(pending)

    await asyncio.gather(sampler(), *(worker() for _ in range(CONCURRENCY)))
    return turns


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares bytes per turn."""
    if len(points) < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0


def start_hub(tmp: Path) -> subprocess.Popen[bytes]:
    """``commhub up`` on a data directory in ``tmp``, its output to ``tmp/hub.log``."""
    env = {**os.environ, "COMMHUB_DATA_DIR": str(tmp / "data"), "COMMHUB_NATS_PORT": "0",
           "COMMHUB_WS_PORT": "0", "COMMHUB_HTTP_PORT": "0"}
    with open(tmp / "hub.log", "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "commhub.core.cli", "up"],
                                env=env, stdout=log, stderr=log)


async def main(conversations: int, conversation_seconds: float, turn_seconds: float,
               most_turns: int) -> None:
    with tempfile.TemporaryDirectory(prefix="commhub-bench-memory-") as tmp:
        data_dir = Path(tmp) / "data"
        process = start_hub(Path(tmp))
        try:
            info = await wait_for_hub(data_dir, process)
            port, url = ws_port(info), http_url(info)
            await asyncio.sleep(1.0)  # let the start's last allocations settle
            start = rss_bytes(process.pid)
            nats = children(process.pid)
            print(f"hub RSS at start:                 {mib(start)}")

            started = time.monotonic()
            points: list[tuple[int, int]] = []
            done = await many_conversations(
                port, conversations, conversation_seconds, points, process.pid)
            elapsed = time.monotonic() - started
            after = rss_bytes(process.pid)
            per = slope(points[len(points) // 2:])
            print(f"hub RSS after {done:,} conversations: {mib(after)} "
                  f"({(after - start) / max(done, 1) / 1024:.2f} KiB per conversation on "
                  f"average; {per / 1024:.2f} KiB over the second half; {done / elapsed:,.0f}/s)")
            if done < conversations:
                print(f"  (stopped at {conversation_seconds:.0f} s; at the second half's "
                      f"slope, {conversations:,} conversations: "
                      f"{mib(after + max(0.0, per) * (conversations - done))})")

            sample: list[tuple[int, int]] = []
            lags: list[int] = []
            turns = await long_conversations(port, turn_seconds, most_turns, sample,
                                             process.pid, url, lags)
            end = rss_bytes(process.pid)
            tail = sample[len(sample) // 2:]
            per_turn = slope(tail)
            print(f"hub RSS after {turns:,} more turns:   {mib(end)} "
                  f"(slope over the last {len(tail)} samples: {per_turn:,.1f} bytes per turn)")
            if turns < MILLION:
                print(f"  extrapolated to {MILLION:,} turns: "
                      f"{mib(end + max(0.0, per_turn) * (MILLION - turns))}")
            if lags:
                shown = lags if len(lags) <= 40 else lags[:: len(lags) // 40 + 1]
                print(f"recorder pending during the turns (every 2 s): max {max(lags):,}, "
                      f"last {lags[-1]:,} ({', '.join(str(n) for n in shown)})")
            recorded = sum(f.stat().st_size for f in data_dir.glob("*.duckdb*"))
            print(f"DuckDB files in the data directory: {mib(recorded)}")
            for pid in nats:
                print(f"nats-server RSS (embedded child): {mib(rss_bytes(pid))}")
        finally:
            await asyncio.to_thread(stop_hub, process)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--conversation-seconds", type=float, default=60.0)
    parser.add_argument("--turn-seconds", type=float, default=30.0)
    parser.add_argument("--turns", type=int, default=MILLION,
                        help="stop the turns phase after this many (default 1,000,000)")
    args = parser.parse_args()
    run(main(args.conversations, args.conversation_seconds, args.turn_seconds, args.turns))
