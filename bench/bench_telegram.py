"""Messages per second through the Telegram channel alone, beside a baseline from the same run.

    python bench/bench_telegram.py [--messages 2000] [--chats 50]

Runs an embedded nats-server (temporary directory), the fake Bot API of the test suite
(``tests/fake_botapi.py``) and the Telegram channel in this process, with no router:
the channel is measured, not the workflows. Pacing is set out of the way (the real one
is about a message a second per chat, which would measure the pacing). Three figures:

* **inbound**: N user messages over C chats queued at the fake; time until all N are on
  the bus as inbound Messages (long polling, update parsing, dedupe, durable publish,
  stored offset);
* **outbound**: N replies over C chats published on the bus; time until the fake has
  received all N ``sendMessage`` calls (durable consumer, per-chat queues, pacing,
  python-telegram-bot's client, ack);
* **baseline**: the same N ``sendMessage`` calls made directly with the same client
  and C at a time against the same fake, and N ``getUpdates``-free JetStream publishes;
  the ratio says what the channel costs on top of the HTTP client and the bus.

Bounded: N messages each way, loopback only, a 300 s cap; everything is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from benchrun import run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fake_botapi import FakeBotAPI

from commhub.channels.telegram.channel import TelegramChannel, TelegramSettings
from commhub.channels.telegram.send import make_bot
from commhub.core.bus import Bus
from commhub.core.channel import ChannelContext
from commhub.core.config import Settings
from commhub.core.envelope import Message, Sender, encode, new_id
from commhub.core.natsserver import EmbeddedNats
from commhub.core.subjects import Subjects

CHAT0 = 10_000


async def inbound(fake: FakeBotAPI, bus: Bus, n: int, chats: int) -> float:
    got = 0
    done = asyncio.Event()

    async def count(msg: object) -> None:
        nonlocal got
        got += 1
        if got >= n:
            done.set()

    sub = await bus.nc.subscribe(bus.subjects.inbound("telegram", "*"), cb=count)
    started = time.perf_counter()
    for i in range(n):
        fake.user_says(CHAT0 + i % chats, f"message {i}")
    await asyncio.wait_for(done.wait(), 300)
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    return n / elapsed


async def outbound(fake: FakeBotAPI, bus: Bus, n: int, chats: int) -> float:
    before = sum(len(v) for v in fake.sent.values())
    messages = [
        Message(
            id=new_id(), conversation=f"tg-{CHAT0 + i % chats}", channel="telegram",
            direction="out", sender=Sender(id="bench", kind="bot"), text=f"reply {i}",
        )
        for i in range(n)
    ]
    started = time.perf_counter()
    await bus.publish_all((bus.subjects.outbound("telegram", m.conversation), m) for m in messages)
    await fake.wait_until(lambda: sum(len(v) for v in fake.sent.values()) - before >= n, 300)
    return n / (time.perf_counter() - started)


async def baseline_send(fake: FakeBotAPI, n: int, chats: int) -> float:
    """The same sendMessage calls, straight from python-telegram-bot, C chats at a time."""
    async with make_bot(fake.token, fake.api_url) as bot:
        async def chat(c: int) -> None:
            for i in range(c, n, chats):
                await bot.send_message(CHAT0 + c, f"direct {i}")

        started = time.perf_counter()
        await asyncio.gather(*(chat(c) for c in range(chats)))
        return n / (time.perf_counter() - started)


async def baseline_publish(bus: Bus, n: int) -> float:
    """N sequential JetStream publishes: what the inbound path must do at the least."""
    started = time.perf_counter()
    for i in range(n):
        await bus.js.publish(bus.subjects.inbound("telegram", "baseline"), encode(Message(
            id=new_id(), conversation="baseline", channel="telegram", direction="in",
            sender=Sender(id="b"), text=f"m {i}",
        )))
    return n / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--chats", type=int, default=50)
    args = parser.parse_args()
    n, chats = args.messages, args.chats
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp), port=0)
        url = await server.start()
        fake = FakeBotAPI()
        await fake.start()
        bus = await Bus.connect(url, Subjects("bench"))
        await bus.ensure_streams()
        hub_settings = Settings(data_dir=Path(tmp), nats_url=url, prefix="bench")
        settings = TelegramSettings(
            token=fake.token, api_url=fake.api_url, poll_timeout=5,
            chat_rate=1e6, chat_burst=1000, global_rate=1e6, global_burst=1000,
        )
        channel = TelegramChannel(ChannelContext("telegram", bus, hub_settings), settings)
        try:
            print(await channel.start())
            for c in range(chats):  # the fake knows a chat once its user wrote
                fake.user_says(CHAT0 + c, "hello")
            await fake.wait_until(lambda: fake.pending_count == 0, 60)
            rate_in = await inbound(fake, bus, n, chats)
            rate_out = await outbound(fake, bus, n, chats)
            base_send = await baseline_send(fake, n, chats)
            base_pub = await baseline_publish(bus, n)
        finally:
            await channel.stop()
            await bus.close()
            await fake.stop()
            server.stop()
    print(f"telegram channel, {n} messages over {chats} chats (fake Bot API, loopback):")
    print(f"  inbound  (getUpdates -> bus):      {rate_in:8.0f} msg/s"
          f"   baseline sequential JetStream publish {base_pub:8.0f} msg/s"
          f"  ({rate_in / base_pub:.2f}x)")
    print(f"  outbound (bus -> sendMessage):     {rate_out:8.0f} msg/s"
          f"   baseline direct sendMessage           {base_send:8.0f} msg/s"
          f"  ({rate_out / base_send:.2f}x)")


if __name__ == "__main__":
    run(main())
