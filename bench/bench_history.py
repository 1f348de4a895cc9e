"""Reading one conversation's history after a cursor: batched direct get vs a consumer.

    python bench/bench_history.py [--reads 200]

Starts a nats-server (temporary storage, free port) and stores conversations whose
histories hold 0, 10 and 100 outbound messages, interleaved with other conversations'
messages. Then, for each size, reads a whole history ``--reads`` times one after
another, two ways:

* **direct get** (what ``ctx.outbound`` does): ``HistoryReader.read``, batched direct
  gets on one shared inbox, no consumer;
* **ordered consumer** (the baseline, what a reader cost before): create an ordered
  consumer from the cursor, read until the subject's last sequence, delete it.

Bounded: at most 3 x reads x 100 messages read, loopback only; everything stops at the
end.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchrun import run
from nats.js.api import ConsumerConfig, DeliverPolicy

from commhub.core.bus import Bus
from commhub.core.envelope import Message, Sender, new_id
from commhub.core.history import HistoryReader
from commhub.core.natsserver import EmbeddedNats
from commhub.core.subjects import Subjects

SIZES = (0, 10, 100)


async def fill(bus: Bus) -> dict[int, str]:
    """One conversation per size, interleaved with as many messages of others."""
    subjects = {size: bus.subjects.outbound("websocket", f"h{size}") for size in SIZES}
    items = []
    for i in range(max(SIZES)):
        for size, subject in subjects.items():
            conversation = f"h{size}" if i < size else f"other{size}"
            target = subject if i < size else bus.subjects.outbound("websocket", conversation)
            items.append((target, Message(
                id=new_id(), conversation=conversation, channel="websocket", direction="out",
                sender=Sender(id="bot", kind="bot"), text=f"reply {i}")))
    await bus.publish_all(items)
    return subjects


async def by_direct_get(reader: HistoryReader, subject: str) -> int:
    return len([stored async for stored in reader.read(subject, 0)])


async def by_consumer(bus: Bus, subject: str, last: int) -> int:
    sub = await bus.js.subscribe(
        subject, stream=bus.subjects.messages_stream, ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=1),
    )
    try:
        count, seq = 0, 0
        while seq < last:
            msg = await sub.next_msg(timeout=5)
            seq = msg.metadata.sequence.stream
            count += 1
        return count
    finally:
        info = await sub.consumer_info()
        await sub.unsubscribe()
        await bus.js.delete_consumer(bus.subjects.messages_stream, info.name)


async def main(reads: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp), port=0)
        url = await server.start()
        bus = await Bus.connect(url, Subjects("bench"))
        await bus.ensure_streams()
        reader = HistoryReader(bus.nc, bus.subjects.messages_stream)
        rows = []
        try:
            subjects = await fill(bus)
            for size, subject in subjects.items():
                last = 0
                if size:
                    raw = await bus.js.get_last_msg(bus.subjects.messages_stream, subject)
                    last = int(raw.seq or 0)
                started = time.perf_counter()
                for _ in range(reads):
                    assert await by_direct_get(reader, subject) == size
                direct = reads / (time.perf_counter() - started)
                consumer = float("nan")
                if size:  # an ordered consumer cannot tell "nothing" without a timeout
                    started = time.perf_counter()
                    for _ in range(reads):
                        assert await by_consumer(bus, subject, last) == size
                    consumer = reads / (time.perf_counter() - started)
                rows.append((size, direct, consumer))
        finally:
            await reader.close()
            await bus.close()
            server.stop()
    print(f"history reads, one after another ({reads} each)")
    for size, direct, consumer in rows:
        ratio = f"(direct/consumer {direct / consumer:.1f})" if size else "(a consumer waits)"
        print(f"  {size:3d} messages: direct get {direct:7,.0f} reads/s   "
              f"ordered consumer {consumer:7,.0f} reads/s {ratio}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args()
    run(main(args.reads))
