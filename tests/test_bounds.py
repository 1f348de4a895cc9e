"""Per-conversation memory a process keeps is bounded: the caches keyed by conversation
keep the most recent ones and forget the rest (so RSS does not grow with the number of
conversations a hub has seen; bench/bench_memory.py measures it)."""

from __future__ import annotations

from commhub.core.bus import Bus
from commhub.core.envelope import Message, Sender
from commhub.core.owners import Owner, OwnerBook
from commhub.core.routing.state import ConversationState
from commhub.core.routing.store import OutboxEntry, StateStore, StoredState


def stored(conversation: str) -> StoredState:
    reply = Message(id=f"{conversation}-r", conversation=conversation, channel="ws",
                    direction="out", sender=Sender(id="bot", kind="bot"), text="hi",
                    reply_to="m1", ts=1.0)
    return StoredState(state=ConversationState(conversation=conversation, last_input="m1"),
                       outbox=[OutboxEntry(f"out.{conversation}", reply)])


async def test_the_state_cache_keeps_only_the_most_recent_conversations(bus: Bus) -> None:
    """A router's cache of written states holds ``cache_size`` conversations at most,
    the most recently written; older ones are read from the bucket again."""
    store = StateStore(bus, cache_size=3)
    revisions = {}
    for n in range(8):
        revisions[f"b{n}"] = await store.commit(f"b{n}", stored(f"b{n}"), None)
    assert list(store._cache) == ["b5", "b6", "b7"]
    assert await store.load("b0") == (stored("b0"), revisions["b0"])  # from the bucket


async def test_the_owner_cache_keeps_only_the_most_recent_conversations(bus: Bus) -> None:
    """A process remembers the owners of ``max_cached`` conversations at most, the most
    recently entered; the others are read from the owners bucket again when needed."""
    book = OwnerBook(bus, max_cached=3)
    for n in range(8):
        await book.claim(f"o{n}", Owner(f"user{n}", False))
    await book.claim("o2", Owner("user2", False))  # entered again: read back, remembered
    assert list(book._known) == ["o6", "o7", "o2"]
