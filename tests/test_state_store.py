"""The conversation state store on a real nats-server: optimistic concurrency, the
cache, waiting for an input's commit, and watching every conversation."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from nats.js.errors import KeyWrongLastSequenceError

from commhub.core.bus import Bus
from commhub.core.envelope import Message, Sender
from commhub.core.routing.state import ConversationState
from commhub.core.routing.store import (
    Handled,
    OutboxEntry,
    StateConflict,
    StateStore,
    StoredState,
)

WAIT = 30  # seconds: a safety net against hangs, never an assertion about speed


def stored(conversation: str, last_input: str, *replies: str) -> StoredState:
    outbox = [OutboxEntry(f"out.{conversation}", Message(
        id=f"{last_input}-r{n}", conversation=conversation, channel="ws", direction="out",
        sender=Sender(id="bot", kind="bot"), text=text, reply_to=last_input, ts=1.0))
        for n, text in enumerate(replies)]
    return StoredState(state=ConversationState(conversation=conversation,
                                               last_input=last_input), outbox=outbox)


async def test_a_commit_naming_an_old_revision_conflicts_and_writes_nothing(bus: Bus) -> None:
    """Two stores (two routers): the one whose revision is stale gets StateConflict (a
    KeyWrongLastSequenceError, as callers catch), writes nothing, and its next load
    reads the other's write instead of its cache."""
    mine, theirs = StateStore(bus), StateStore(bus)
    assert await mine.load("s1") == (None, None)
    first = await mine.commit("s1", stored("s1", "a"), None)
    assert await mine.load("s1") == (stored("s1", "a"), first)  # from the cache
    with pytest.raises(StateConflict):
        await theirs.commit("s1", stored("s1", "x"), None)  # it exists already
    loaded, revision = await theirs.load("s1")
    assert loaded == stored("s1", "a") and revision == first
    await theirs.commit("s1", stored("s1", "b"), revision)
    with pytest.raises(KeyWrongLastSequenceError):
        await mine.commit("s1", stored("s1", "c"), first)  # behind: stale cache
    loaded, _ = await mine.load("s1")
    assert loaded == stored("s1", "b")
    assert await StateStore(bus, cache_size=0).read("s1") == stored("s1", "b")
    assert await mine.read("nobody") is None


async def test_waiting_for_an_input_sees_its_commit_before_or_after_it_starts(
    bus: Bus,
) -> None:
    """The wait returns the committed step's outbox whether the commit came before the
    wait began or during it; an input that later inputs followed is handled with no
    outbox; an input nobody commits times out with None."""
    store = StateStore(bus, cache_size=0)
    await store.commit("s2", stored("s2", "a", "hello"), None)
    assert await store.wait_for_input("s2", "a", WAIT) == Handled(
        stored("s2", "a", "hello").outbox)

    async def later_commit() -> None:
        _, revision = await store.load("s2")
        await asyncio.sleep(0.05)  # let the wait start first
        value = stored("s2", "b", "again")
        value.state.recent_inputs = ["a"]
        await store.commit("s2", value, revision)

    committing = asyncio.create_task(later_commit())
    found = await store.wait_for_input("s2", "b", WAIT)
    await committing
    assert found is not None and [e.record.text for e in found.outbox or []] == ["again"]
    assert await store.wait_for_input("s2", "a", WAIT) == Handled(None)
    assert await store.wait_for_input("s2", "never", 0.2) is None


class Deadlines(msgspec.Struct):
    """A partial view of the state, as the timers decode it."""

    workflow: str | None = None
    timeout_at: float | None = None


async def test_watching_every_conversation_gives_current_states_then_writes(
    bus: Bus,
) -> None:
    """watch_all yields each current state decoded as the view, a marker, then every
    write; a deleted entry or an unreadable one comes as None."""
    store = StateStore(bus, cache_size=0)
    state = ConversationState(conversation="w1", workflow="book_table", timeout_at=5.0)
    await store.commit("w1", StoredState(state=state), None)
    kv = await bus.state_bucket()
    await kv.put("w2", b"not json")
    watch = await store.watch_all(Deadlines)
    try:
        async with asyncio.timeout(WAIT):
            current = [await anext(watch), await anext(watch), await anext(watch)]
            assert current == [("w1", Deadlines("book_table", 5.0)), ("w2", None), None]
            await kv.delete("w1")
            assert await anext(watch) == ("w1", None)
    finally:
        await watch.stop()
