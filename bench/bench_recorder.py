"""How fast the recorder catches up on a backlog, next to raw JetStream fetch + ack.

Usage: ``python bench/bench_recorder.py [--n 20000] [--batch 1000] [--runs 1]``

It starts its own nats-server (port 0, temporary storage), publishes N Messages with
``publish_async``, then times, on the same stored records, in each run:

1. baseline: a durable pull consumer that only fetches (nats-py's
   ``PullSubscription.fetch``, what a service on the bus would use) and acks each record
   (explicit acks, like the recorder's; no decoding, no DuckDB);
2. the recorder: fetch, decode, Arrow batches into DuckDB, recompute the touched rows of
   ``conversations`` (500 conversations here), commit, ack;
3. the same bare fetch and ack as 1 with the recorder's own fetch
   (:class:`commhub.core.pull.Puller`), which costs a fraction of nats-py's: what the
   recorder adds to the cheapest way to drain the stream.

and prints the recorder's rate as a ratio of the baseline's (the target is >= 0.9) and of
the third's, and
the CPU time this process spent per record in each (all its threads; the nats-server is
another process): on a machine that runs other work too, the rates swing from run to
run, the CPU per record much less.
With ``--runs 3`` it repeats both (a fresh durable and database each time) and prints
min/median/max of the ratio.

Everything lives in a temporary directory that is removed at the end. Each phase is
bounded by a deadline, so a broken build fails instead of hanging.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from benchrun import run
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from commhub.core.bus import Bus
from commhub.core.envelope import Message, Sender
from commhub.core.natsserver import EmbeddedNats
from commhub.core.pull import Puller
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


async def _baseline(bus: Bus, n: int, batch: int, run: int, *, lean: bool = False) -> float:
    stream = bus.subjects.messages_stream
    durable = f"bench_{'lean' if lean else 'raw'}_{run}"
    await bus.js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            max_ack_pending=max(50_000, 10 * batch),
        ),
    )
    sub: Puller | JetStreamContext.PullSubscription
    if lean:
        sub = await Puller(bus.nc, stream, durable).start()
    else:
        sub = await bus.js.pull_subscribe_bind(durable=durable, stream=stream)
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


async def _recorder(
    bus: Bus, db_path: Path, n: int, batch: int, run: int
) -> tuple[float, Recorder]:
    recorder = Recorder(bus, db_path, batch=batch, consumer=lambda s: f"{s}_bench_{run}")
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


async def main(n: int, batch: int, runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="commhub-bench-") as tmp:
        tmpdir = Path(tmp)
        server = EmbeddedNats(tmpdir / "nats", port=0)
        url = await server.start()
        ratios = []
        lean_ratios = []
        try:
            bus = await Bus.connect(url, Subjects("bench"))
            await bus.ensure_streams()
            published = await _publish(bus, n)
            print(f"records: {n}, batch: {batch}")
            print(f"publish_async (window 1000):   {n / published:>9,.0f} records/s")
            for run in range(runs):
                # Alternate the order, so neither side always runs on a warmer machine.
                cpu: dict[str, float] = {}

                async def baseline(run: int = run, cpu: dict[str, float] = cpu) -> float:
                    before = time.process_time()
                    elapsed = await _baseline(bus, n, batch, run)
                    cpu["baseline"] = time.process_time() - before
                    return elapsed

                async def lean(run: int = run, cpu: dict[str, float] = cpu) -> float:
                    before = time.process_time()
                    elapsed = await _baseline(bus, n, batch, run, lean=True)
                    cpu["lean"] = time.process_time() - before
                    return elapsed

                async def recording(
                    run: int = run, cpu: dict[str, float] = cpu
                ) -> tuple[float, Recorder]:
                    before = time.process_time()
                    result = await _recorder(bus, tmpdir / f"bench{run}.duckdb", n, batch, run)
                    cpu["recorder"] = time.process_time() - before
                    return result

                if run % 2 == 0:
                    raw = await baseline()
                    recorded, recorder = await recording()
                    bare = await lean()
                else:
                    bare = await lean()
                    recorded, recorder = await recording()
                    raw = await baseline()
                stats = recorder.stats
                ratios.append(raw / recorded)
                lean_ratios.append(bare / recorded)
                print(f"run {run + 1}:")
                print(f"  baseline fetch + ack:          {n / raw:>9,.0f} records/s "
                      f"({cpu['baseline'] / n * 1e6:.0f} us of CPU per record)")
                print(
                    f"  recorder fetch + DuckDB + ack: {n / recorded:>9,.0f} records/s "
                    f"({stats.batches} batches, {stats.refreshes} refreshes of the derived "
                    f"rows, {stats.inserted} rows inserted, "
                    f"{cpu['recorder'] / n * 1e6:.0f} us of CPU per record, start and stop "
                    f"included)"
                )
                print(f"  the same with the recorder's fetch: {n / bare:>9,.0f} records/s "
                      f"({cpu['lean'] / n * 1e6:.0f} us of CPU per record)")
                print(f"  ratio recorder / baseline:     {raw / recorded:>9.2f} (target >= 0.9)")
                print(f"  ratio recorder / the same with the recorder's fetch: "
                      f"{bare / recorded:.2f}")
            await bus.close()
        finally:
            server.stop()
        if runs > 1:
            ratios.sort()
            lean_ratios.sort()
            print(f"ratio over {runs} runs: min {ratios[0]:.2f}, "
                  f"median {statistics.median(ratios):.2f}, max {ratios[-1]:.2f}")
            print(f"ratio to the recorder's fetch over {runs} runs: min {lean_ratios[0]:.2f}, "
                  f"median {statistics.median(lean_ratios):.2f}, max {lean_ratios[-1]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="records to publish and record")
    parser.add_argument("--batch", type=int, default=1000, help="fetch and write batch size")
    parser.add_argument("--runs", type=int, default=1, help="baseline + recorder pairs")
    args = parser.parse_args()
    run(main(args.n, args.batch, args.runs))
