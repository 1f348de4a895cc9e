"""Outbound fan-out: one live consumer per channel process, history by direct get.

The pure parts (the history/live hand-over, the live feed's sequence rules, the
direct-get reply parsing) are tested as plain functions; the rest against the session's
real nats-server, or a nats-server of the test's own where it is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from commhub.core.bus import Bus
from commhub.core.channel import ChannelContext
from commhub.core.config import Settings
from commhub.core.envelope import InvalidRecord, Message, Sender, decode_as, encode, new_id
from commhub.core.fanout import OutboundFanout, OutboundLagged
from commhub.core.handover import Handover
from commhub.core.history import End, Failed, HistoryReader, NotFound, Stored, parse_reply
from commhub.core.livefeed import FeedPosition, LiveFeed, Verdict
from commhub.core.natsserver import EmbeddedNats
from commhub.core.subjects import Subjects

WAIT = 10  # seconds: a safety net against hangs, never an assertion about speed


def out(conversation: str, text: str, channel: str = "websocket") -> Message:
    return Message(id=new_id(), conversation=conversation, channel=channel, direction="out",
                   sender=Sender(id="bot", kind="bot"), text=text)


async def publish(bus: Bus, conversation: str, text: str) -> int:
    ack = await bus.publish(bus.subjects.outbound("websocket", conversation),
                            out(conversation, text))
    return int(ack.seq)


async def take(items: AsyncIterator[tuple[int, Message]], n: int) -> list[tuple[int, str]]:
    got = []
    async with asyncio.timeout(WAIT):
        while len(got) < n:
            seq, message = await anext(items)
            got.append((seq, message.text or ""))
    return got


async def consumer_count(bus: Bus, stream: str | None = None) -> int:
    info = await bus.js.stream_info(stream or bus.subjects.messages_stream)
    return int(info.state.consumer_count)


@pytest.fixture
async def ctx(bus: Bus, settings: Settings) -> AsyncIterator[ChannelContext]:
    ctx = ChannelContext("websocket", bus, settings)
    yield ctx
    await ctx.close()


# -- pure: the hand-over ------------------------------------------------------------------
def test_handover_gives_history_then_live_each_sequence_once() -> None:
    """Live messages that arrive during the history read are held; those the history
    also had are dropped; the rest follow in order."""
    handover: Handover[str] = Handover(after=10)
    assert not handover.history(9) and not handover.history(10)  # at or before the cursor
    assert handover.history(12)
    for seq in (12, 15, 17):  # live while the history is read: 12 and 15 overlap it
        assert handover.live(seq, f"m{seq}")
    assert handover.history(15)
    assert handover.next_live() == (17, "m17")  # 12 and 15 were handed out already
    assert handover.next_live() is None
    handover.live(17, "again")  # a re-created consumer repeating itself
    handover.live(20, "m20")
    assert handover.next_live() == (20, "m20") and handover.last == 20


def test_handover_without_cursor_starts_at_the_beginning() -> None:
    handover: Handover[str] = Handover(after=None)
    assert handover.history(1) and handover.last == 1


def test_handover_bounds_what_an_idle_reader_holds() -> None:
    """Past max_held the reader is marked overflowed and holds nothing more: it must
    resume from its last cursor (the stream still has every message)."""
    handover: Handover[str] = Handover(after=0, max_held=2)
    assert handover.live(1, "a") and handover.live(2, "b")
    assert not handover.live(3, "c")
    assert handover.overflowed and handover.held == 0 and handover.next_live() is None
    assert not handover.live(4, "d")


# -- pure: the live feed's sequence rules --------------------------------------------------
def test_feed_position_delivers_skips_and_resets() -> None:
    """Consumer sequences must run 1, 2, 3; stream sequences already handed on are
    skipped; a re-created consumer starts after the last one handed on."""
    position = FeedPosition(last_seq=100)
    assert position.restart() == 101
    assert position.message(101, 1) is Verdict.DELIVER
    assert position.message(105, 2) is Verdict.DELIVER  # other subjects sit in between
    assert position.heartbeat(2) is Verdict.SKIP  # in step
    assert position.heartbeat(None) is Verdict.SKIP
    assert position.heartbeat(3) is Verdict.RESET  # the server sent one we never got
    assert position.message(110, 4) is Verdict.RESET  # consumer sequence 3 was lost
    assert position.last_seq == 105
    assert position.restart() == 106
    assert position.message(105, 1) is Verdict.SKIP  # overlap after a re-creation
    assert position.message(110, 2) is Verdict.DELIVER and position.last_seq == 110


# -- pure: direct-get replies -------------------------------------------------------------
def test_parse_direct_get_replies() -> None:
    stored = {"Nats-Sequence": "7", "Nats-Subject": "p.out.w.c", "Nats-Num-Pending": "3"}
    assert parse_reply(stored, b"{}") == Stored(7, "p.out.w.c", b"{}", 3)
    old_server = {"Nats-Sequence": "7", "Nats-Subject": "p.out.w.c"}
    assert parse_reply(old_server, b"x") == Stored(7, "p.out.w.c", b"x", None)
    assert parse_reply({"Status": "204", "Description": "EOB", "Nats-Num-Pending": "5"},
                       b"") == End(5)
    assert parse_reply({"Status": "404", "Description": "Message Not Found"}, b"") == NotFound()
    assert parse_reply({"Status": "408", "Description": "Bad Request"}, b"") == Failed(
        "408 Bad Request")
    assert "allow_direct" in parse_reply({"Status": "503"}, b"").reason  # type: ignore[union-attr]
    assert isinstance(parse_reply(None, b""), Failed)


# -- history reads --------------------------------------------------------------------------
async def test_history_reads_one_subject_after_a_cursor_in_batches(bus: Bus) -> None:
    """Batched direct gets return exactly the subject's messages after the cursor, in
    order, across several batches, with other subjects' messages in between."""
    seqs = []
    for i in range(10):
        seqs.append(await publish(bus, "c1", f"m{i}"))
        await publish(bus, "other", f"o{i}")
    reader = HistoryReader(bus.nc, bus.subjects.messages_stream, batch=3)
    subject = bus.subjects.outbound("websocket", "c1")
    try:
        everything = [s.seq async for s in reader.read(subject, 0)]
        after_third = [s.seq async for s in reader.read(subject, seqs[2])]
        nothing = [s.seq async for s in reader.read(subject, seqs[-1])]
        unknown = [s.seq async for s in reader.read(bus.subjects.outbound("websocket", "x"), 0)]
    finally:
        await reader.close()
    assert everything == seqs
    assert after_third == seqs[3:]
    assert nothing == [] and unknown == []


# -- fan-out ----------------------------------------------------------------------------
async def test_readers_resuming_anywhere_get_every_message_once_in_order(
    bus: Bus, ctx: ChannelContext
) -> None:
    """While a conversation is being written, readers join at random cursors (some
    reading history while live messages arrive); each gets exactly the messages after
    its cursor, in order, none twice, and another conversation's never."""
    readers = 30
    published: list[int] = []
    joined = asyncio.Semaphore(0)

    async def writer() -> None:
        for i in range(150):
            published.append(await publish(bus, "c1", f"m{i}"))
            await publish(bus, "c2", f"other{i}")
        for _ in range(readers):
            await joined.acquire()
        published.append(await publish(bus, "c1", "end"))

    async def reader(delay: float) -> tuple[int, list[int]]:
        await asyncio.sleep(delay)
        after = random.choice([0, *published])
        items = ctx.outbound("c1", after=after)
        got = []
        try:
            first = asyncio.ensure_future(anext(items))  # joins: registers, reads history
            await asyncio.sleep(0)
            joined.release()
            async with asyncio.timeout(WAIT * 3):
                seq, message = await first
                while True:
                    assert message.conversation == "c1"
                    got.append(seq)
                    if message.text == "end":
                        return after, got
                    seq, message = await anext(items)
        finally:
            await items.aclose()  # type: ignore[attr-defined]

    writing = asyncio.create_task(writer())
    results = await asyncio.gather(*(reader(i * 0.01) for i in range(readers)))
    await writing
    for after, got in results:
        assert got == [seq for seq in published if seq > after]


async def test_several_readers_share_one_consumer_and_each_get_every_message(
    bus: Bus, ctx: ChannelContext
) -> None:
    """Tabs on one conversation each get each message; the stream gains one consumer
    however many readers come and go."""
    before = await consumer_count(bus)
    old = await publish(bus, "c1", "old")
    tabs = [ctx.outbound("c1", after=old), ctx.outbound("c1", after=old), ctx.outbound("c1")]
    assert await take(tabs[2], 1) == [(old, "old")]  # without a cursor: history first
    waiting = [asyncio.ensure_future(anext(tab)) for tab in tabs]
    seq = await publish(bus, "c1", "to all")
    done = await asyncio.wait_for(asyncio.gather(*waiting), WAIT)
    assert [(s, m.text) for s, m in done] == [(seq, "to all")] * 3
    for _ in range(200):  # open and close, as connect-and-close clients do
        items = ctx.outbound("c1", after=old)
        assert await take(items, 1) == [(seq, "to all")]
        await items.aclose()  # type: ignore[attr-defined]
    for tab in tabs:
        await tab.aclose()  # type: ignore[attr-defined]
    assert await consumer_count(bus) == before + 1


async def test_invalid_records_are_skipped_and_reported_once(
    bus: Bus, ctx: ChannelContext
) -> None:
    """Undecodable, too deeply nested, inbound-on-an-out-subject and wrong-conversation
    records are skipped by every reader, history or live, and each is reported on
    evt.invalid once by the process."""
    subject = bus.subjects.outbound("websocket", "c1")
    deep = b'{"id":"x","conversation":"c1","channel":"websocket","direction":"out",' \
        b'"sender":{"id":"b"},"payload":{"a":' + b"[" * 5000 + b"]" * 5000 + b"}}"
    inbound = Message(id=new_id(), conversation="c1", channel="websocket", direction="in",
                      sender=Sender(id="u"), text="in")
    bad = [b"{not json", deep, encode(inbound), encode(out("c9", "elsewhere"))]

    async def publish_bad() -> None:
        for data in bad:
            await bus.js.publish(subject, data)

    await publish_bad()
    good = await publish(bus, "c1", "good")
    history = ctx.outbound("c1")
    assert await take(history, 1) == [(good, "good")]
    await publish_bad()  # now live, to the history reader and to a second reader
    live = ctx.outbound("c1", after=good)
    second_reader_ready = await take(ctx.outbound("c1", after=0), 1)  # history once more
    assert second_reader_ready == [(good, "good")]
    last = await publish(bus, "c1", "after the bad ones")
    assert await take(history, 1) == [(last, "after the bad ones")]
    assert await take(live, 1) == [(last, "after the bad ones")]
    for items in (history, live):
        await items.aclose()  # type: ignore[attr-defined]

    sub = await bus.js.subscribe(bus.subjects.invalid, ordered_consumer=True)
    reports = []
    with contextlib.suppress(TimeoutError):
        while True:
            reports.append(decode_as((await sub.next_msg(timeout=1)).data, InvalidRecord))
    await sub.unsubscribe()
    assert len(reports) == 2 * len(bad)  # each bad record (published twice) once
    assert {r.source for r in reports} == {"channel:websocket"}
    assert len({r.id for r in reports}) == len(reports)  # one id per stream sequence
    assert any("deeply" in r.reason for r in reports)


async def test_a_reader_that_never_reads_is_dropped_not_the_messages(
    bus: Bus, settings: Settings
) -> None:
    """A reader past max_held unread live messages gets OutboundLagged naming its last
    cursor; resuming from it gets the rest."""
    fanout = OutboundFanout(bus, "websocket", max_held=3)
    try:
        idle = fanout.follow("c1", after=0)
        seqs = [await publish(bus, "c1", "first")]
        assert await take(idle, 1) == [(seqs[0], "first")]
        seqs += [await publish(bus, "c1", f"m{i}") for i in range(6)]
        with pytest.raises(OutboundLagged) as info:
            await take(idle, 6)
        resumed = fanout.follow("c1", after=info.value.last_cursor)
        got = await take(resumed, 6)
        assert info.value.last_cursor < seqs[-1]
        assert [seq for seq, _ in got][-1] == seqs[-1]
        await resumed.aclose()  # type: ignore[attr-defined]
    finally:
        await fanout.close()


async def test_close_ends_readers_and_removes_the_consumer(bus: Bus, settings: Settings
                                                          ) -> None:
    ctx = ChannelContext("websocket", bus, settings)
    before = await consumer_count(bus)
    items = ctx.outbound("c1")
    waiting = asyncio.ensure_future(anext(items))
    while await consumer_count(bus) == before:
        await asyncio.sleep(0.01)
    await ctx.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, WAIT)
    assert await consumer_count(bus) == before
    await ctx.close()  # idempotent


async def test_live_feed_recreates_a_consumer_deleted_under_it(bus: Bus) -> None:
    """A consumer that disappears without a reconnect (deleted, expired) is noticed by
    its missing heartbeats and re-created from the last sequence handed on."""
    got: list[int] = []
    arrived = asyncio.Event()

    def on_message(seq: int, subject: str, data: bytes) -> None:
        got.append(seq)
        arrived.set()

    stream = bus.subjects.messages_stream
    feed = LiveFeed(bus, stream, bus.subjects.outbound("websocket", ">"), on_message,
                    heartbeat=0.2)
    await feed.start()
    try:
        first = await publish(bus, "c1", "one")
        await asyncio.wait_for(arrived.wait(), WAIT)
        assert feed.consumer is not None
        await bus.js.delete_consumer(stream, feed.consumer)
        second = await publish(bus, "c1", "two")  # stored while no consumer exists
        async with asyncio.timeout(WAIT):
            while second not in got:
                await asyncio.sleep(0.05)
        assert got == [first, second] and feed.resets >= 1
    finally:
        await feed.close()


# -- a restarted nats-server ----------------------------------------------------------------
async def test_open_readers_resume_after_a_nats_restart(tmp_path: Path) -> None:
    """The server restarts under a live reader: the feed re-creates its consumer on the
    reconnect, and the reader gets the next message, nothing twice."""
    server = EmbeddedNats(tmp_path / "nats", port=0)
    url = await server.start()
    port = int(url.rsplit(":", 1)[1])
    bus = await Bus.connect(url, Subjects("restart"))
    await bus.ensure_streams()
    ctx = ChannelContext("websocket", bus, Settings(data_dir=tmp_path / "data", nats_url=url,
                                                   prefix="restart"))
    try:
        items = ctx.outbound("c1")
        before = await publish(bus, "c1", "before")
        assert await take(items, 1) == [(before, "before")]
        server.stop()
        server = EmbeddedNats(tmp_path / "nats", port=port)
        await server.start()
        async with asyncio.timeout(WAIT * 3):
            while True:  # the bus reconnects by itself; until then publishing fails
                try:
                    after = await publish(bus, "c1", "after")
                    break
                except Exception:
                    await asyncio.sleep(0.1)
        assert await take(items, 1) == [(after, "after")]
        await items.aclose()  # type: ignore[attr-defined]
    finally:
        await ctx.close()
        await bus.close()
        server.stop()
