"""How fast the recorder catches up on a backlog, next to raw JetStream fetch + ack.

Usage: ``python bench/bench_recorder.py [--n 20000] [--batch 1000]``

It starts its own nats-server (port 0, temporary storage), publishes N Messages with
``publish_async``, then times, on the same stored records:

1. baseline: a pull consumer that only fetches and acks (no decoding, no DuckDB);
2. the recorder: fetch, decode, Arrow batches into DuckDB, recompute the touched rows of
   ``conversations`` (500 conversations here), commit, ack.

Everything lives in a temporary directory that is removed at the end. Each phase is
bounded by a deadline, so a broken build fails instead of hanging.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from commhub.core.bus import Bus
from commhub.core.envelope import Message, Sender
from commhub.core.natsserver import EmbeddedNats
from commhub.core.records.recorder import Recorder
from commhub.core.subjects import Subjects

DEADLINE_SECONDS = 300.0


def _messages(n: int) -> list[Message]:
    return [
        Message(
            id=f"bench-{i:08d}",
            conversation=f"conv-{i % 500}",
            channel="ws",
            direction="in" if i % 2 == 0 else "out",
            sender=Sender(id=f"user-{i % 500}", name="Bench User"),
            text=f"hello, this is benchmark message number {i} with some text",
            meta={"cursor": i},
        )
        for i in range(n)
    ]


async def _publish(bus: Bus, n: int) -> float:
    records = _messages(n)
    started = time.perf_counter()
    for start in range(0, n, 1000):  # a window of 1000 in flight
        chunk = records[start : start + 1000]
        await bus.publish_all([(bus.subjects.inbound(m.channel, m.conversation), m) for m in chunk])
    return time.perf_counter() - started


async def _baseline(bus: Bus, n: int, batch: int) -> float:
    stream = bus.subjects.messages_stream
    await bus.js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name="bench_raw",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            max_ack_pending=max(50_000, 10 * batch),
        ),
    )
    sub = await bus.js.pull_subscribe_bind(durable="bench_raw", stream=stream)
    seen = 0
    started = time.perf_counter()
    deadline = started + DEADLINE_SECONDS
    while seen < n:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"baseline saw {seen} of {n} records")
        try:
            msgs = await sub.fetch(batch, timeout=1.0)
        except TimeoutError:
            continue
        for msg in msgs:
            await msg.ack()
        seen += len(msgs)
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    return elapsed


async def _recorder(bus: Bus, db_path: Path, n: int, batch: int) -> tuple[float, Recorder]:
    recorder = Recorder(bus, db_path, batch=batch)
    await recorder.start()
    started = time.perf_counter()
    deadline = started + DEADLINE_SECONDS
    try:
        while recorder.stats.records < n:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the recorder wrote {recorder.stats.records} of {n} records")
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
    finally:
        await recorder.stop()
    return elapsed, recorder


async def main(n: int, batch: int) -> None:
    with tempfile.TemporaryDirectory(prefix="commhub-bench-") as tmp:
        tmpdir = Path(tmp)
        server = EmbeddedNats(tmpdir / "nats", port=0)
        url = await server.start()
        try:
            bus = await Bus.connect(url, Subjects("bench"))
            await bus.ensure_streams()
            published = await _publish(bus, n)
            raw = await _baseline(bus, n, batch)
            recorded, recorder = await _recorder(bus, tmpdir / "bench.duckdb", n, batch)
            await bus.close()
        finally:
            server.stop()
        stats = recorder.stats
        print(f"records: {n}, batch: {batch}")
        print(f"publish_async (window 1000):   {n / published:>9,.0f} records/s")
        print(f"baseline fetch + ack:          {n / raw:>9,.0f} records/s")
        print(
            f"recorder fetch + DuckDB + ack: {n / recorded:>9,.0f} records/s "
            f"({stats.batches} batches, {stats.inserted} rows inserted, "
            f"{recorded / raw:.1f}x the baseline's time)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="records to publish and record")
    parser.add_argument("--batch", type=int, default=1000, help="fetch and write batch size")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.batch))
