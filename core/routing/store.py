"""The conversation state store: one KV entry per conversation, written with optimistic
concurrency, and the only code that knows how that entry is laid out.

Each entry (key: the conversation id) is a :class:`StoredState`: the conversation's
:class:`ConversationState` and the outbox of its last step (every output of that step,
with its subject), written in one KV update so that a step's outputs exist only if the
step committed. Who uses it, and how:

* the router: :meth:`StateStore.load` (from a cache of the states this process wrote
  last, else the bucket) and :meth:`StateStore.commit` naming the revision it read;
* the timers: :meth:`StateStore.watch_all` with a partial view of the state (just the
  deadlines), for every conversation at start and then every write;
* ``{prefix}.api.state``: :meth:`StateStore.read`;
* channels, through :meth:`commhub.core.channel.ChannelContext.turn_replies`:
  :meth:`StateStore.wait_for_input`, which says when an input's step committed and what
  it produced.

Concurrency: a store is used from one event loop; its methods may run concurrently for
different conversations. Commits of one conversation from several processes are
ordered by KV revisions: a commit naming a revision that is no longer the latest fails
with :class:`StateConflict` and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from commhub.core.bus import Bus
from commhub.core.envelope import Record
from commhub.core.routing.rules import already_handled, ask_reply_id
from commhub.core.routing.state import ConversationState

__all__ = [
    "STATE_CACHE_SIZE",
    "Handled",
    "OutboxEntry",
    "StateConflict",
    "StateStore",
    "StateWatch",
    "StoredState",
    "decode_view",
    "handled",
]

log = logging.getLogger(__name__)

STATE_CACHE_SIZE = 50_000  # conversations whose last written state a router keeps

T = TypeVar("T")


class OutboxEntry(msgspec.Struct, array_like=True):
    """One output of a committed step: where it goes and what it is."""

    subject: str
    record: Record


class StoredState(msgspec.Struct, kw_only=True):
    """What the state bucket holds per conversation: the state and the last step's
    outbox, written in one KV update so that a step's outputs exist only if it committed."""

    state: ConversationState
    outbox: list[OutboxEntry] = msgspec.field(default_factory=list)


class StateConflict(KeyWrongLastSequenceError):
    """The conversation was written since the revision a commit named (by another
    router, or behind this process's cache); nothing was written. Recompute the step on
    the state :meth:`StateStore.load` now returns."""


@dataclass(frozen=True)
class Handled:
    """An input's step has committed. ``outbox`` holds that step's outputs, or is None
    when steps of later inputs replaced them before they were seen (those outputs were
    published before the later steps ran, by the same router). ``follow_up`` is the id
    of the input that will carry a service's answer the run now waits for (an ``ask``),
    whose step says more, or None."""

    outbox: list[OutboxEntry] | None
    follow_up: str | None = None


def handled(stored: StoredState | None, input_id: str) -> Handled | None:
    """Whether ``stored`` shows input ``input_id``'s step committed, and with what."""
    seen = already_handled(stored.state if stored is not None else None, input_id)
    if seen is None or stored is None:
        return None
    if seen != "last":
        return Handled(None)
    asking = stored.state.asking
    return Handled(stored.outbox, ask_reply_id(asking) if asking is not None else None)


_stored_decoder = msgspec.json.Decoder(StoredState)
_encoder = msgspec.json.Encoder()


class _View(msgspec.Struct, Generic[T]):
    state: T


_view_decoders: dict[Any, Callable[[bytes], Any]] = {}


def decode_view(value: bytes, view: type[T]) -> T:
    """Decode just the part of a stored value's state that ``view`` (a msgspec Struct
    with some of :class:`ConversationState`'s fields) declares; the rest is skipped
    unparsed. Raises ``msgspec.DecodeError`` for a value that does not fit."""
    decode = _view_decoders.get(view)
    if decode is None:
        decode = _view_decoders[view] = msgspec.json.Decoder(_View[view]).decode  # type: ignore[valid-type]
    return decode(value).state  # type: ignore[no-any-return]


def _decode_stored(value: bytes) -> StoredState:
    return _stored_decoder.decode(value)


class StateWatch(Generic[T]):
    """Changes of stored states, as ``(conversation, value)``; ``value`` is None when
    the entry was deleted or cannot be read (logged). Yields None once every current
    value was delivered, then goes on with each write by any process.

    Backed by a KV watcher (an ordered consumer, which recovers from reconnects by
    itself); :meth:`stop` ends it. Iterate it from one task.
    """

    def __init__(
        self, watcher: Any, decode: Callable[[bytes], T], bus: Bus | None = None
    ) -> None:
        self._watcher = watcher
        self._decode = decode
        self._bus = bus

    def __aiter__(self) -> StateWatch[T]:
        return self

    async def __anext__(self) -> tuple[str, T | None] | None:
        entry = await anext(self._watcher)
        if entry is None:
            return None
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            return entry.key, None
        try:
            return entry.key, self._decode(entry.value)
        except msgspec.DecodeError:
            log.warning("state of %s is not readable; skipped", entry.key)
            return entry.key, None

    async def stop(self) -> None:
        """Stop watching and delete the watch's consumer; safe to call twice and while
        the connection closes.

        Stopping only unsubscribes: the ordered consumer would stay on the server for its
        inactive threshold (5 minutes), and nats-server refuses new consumers on a stream
        past its limit (about 1,000), which a busy Rasa endpoint (a watch per turn)
        reached in minutes. nats-py keeps the consumer's name only on the watcher's
        subscription, hence the private attribute.
        """
        with contextlib.suppress(Exception):
            await self._watcher.stop()
        consumer = getattr(getattr(self._watcher, "_sub", None), "_consumer", None)
        if self._bus is not None and isinstance(consumer, str):
            stream = f"KV_{self._bus.subjects.state_bucket}"
            with contextlib.suppress(Exception):  # gone already, or expires by itself
                await self._bus.js.delete_consumer(stream, consumer)


class StateStore:
    """The conversation states in the bus's KV bucket; see the module docstring.

    ``cache_size`` is how many conversations' last written states :meth:`load` keeps
    (0: none; only a router, which writes them, has a use for it).
    """

    def __init__(self, bus: Bus, cache_size: int = STATE_CACHE_SIZE) -> None:
        self.bus = bus
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[StoredState, int]] = OrderedDict()

    async def load(self, conversation: str) -> tuple[StoredState | None, int | None]:
        """The stored state and its revision (None, None for a new conversation): from
        the cache when this store committed the conversation last, else from the bucket.

        The cache is never trusted blindly: :meth:`commit` names the revision read, so
        if another process wrote the conversation since, the commit fails with
        :class:`StateConflict`, the entry is dropped, and the next load reads the bucket.
        Raises on a bus failure, or ``msgspec.DecodeError`` for an unreadable entry.
        """
        cached = self._cache.get(conversation)
        if cached is not None:
            self._cache.move_to_end(conversation)
            return cached
        kv = await self.bus.state_bucket()
        try:
            entry = await kv.get(conversation)
        except KeyNotFoundError:
            return None, None
        stored = _decode_stored(entry.value) if entry.value else None
        return stored, entry.revision

    async def read(self, conversation: str) -> StoredState | None:
        """The conversation's stored state from the bucket (never the cache), or None
        when it has none. Raises on a bus failure or an unreadable entry."""
        kv = await self.bus.state_bucket()
        try:
            entry = await kv.get(conversation)
        except KeyNotFoundError:
            return None
        return _decode_stored(entry.value) if entry.value else None

    async def commit(self, conversation: str, stored: StoredState, revision: int | None) -> int:
        """Write ``stored`` if the conversation is still at ``revision`` (None: it must
        not exist yet); return the new revision.

        Raises :class:`StateConflict` when it is not (nothing written, cache entry
        dropped). On any other failure the write may or may not have happened; the
        cache keeps the revision read, so a retry either conflicts (and reads what was
        written) or writes.
        """
        kv = await self.bus.state_bucket()
        value = _encoder.encode(stored)
        try:
            if revision is None:
                new_revision = await kv.create(conversation, value)
            else:
                new_revision = await kv.update(conversation, value, last=revision)
        except KeyWrongLastSequenceError as exc:
            self.forget(conversation)
            raise StateConflict(
                f"conversation {conversation!r} was written since revision {revision}"
            ) from exc
        self._remember(conversation, stored, new_revision)
        return int(new_revision)

    def forget(self, conversation: str) -> None:
        """Drop the cached state of ``conversation``: the next load reads the bucket."""
        self._cache.pop(conversation, None)

    async def watch(self, conversation: str) -> StateWatch[StoredState]:
        """Watch one conversation's stored state: its current value (if any), then
        every write. See :class:`StateWatch`; stop it when done."""
        kv = await self.bus.state_bucket()
        return StateWatch(await kv.watch(conversation), _decode_stored, self.bus)

    async def watch_all(self, view: type[T]) -> StateWatch[T]:
        """Watch every conversation's state, decoded as ``view`` (see
        :func:`decode_view`): each current value, a None marker, then every write."""
        kv = await self.bus.state_bucket()
        return StateWatch(await kv.watchall(), lambda value: decode_view(value, view))

    async def wait_for_input(
        self, conversation: str, input_id: str, timeout: float
    ) -> Handled | None:
        """Wait until the conversation's state shows that input ``input_id``'s step
        committed, and return what it produced; None after ``timeout`` seconds.

        Safe to call after the input was published: the watch starts with the state as
        it is, so a commit that happened first is seen too (or, if later inputs'
        steps followed it, :class:`Handled` says so with ``outbox`` None). Cancelling
        stops the watch. Raises on a bus failure while starting the watch.
        """
        watch = await self.watch(conversation)
        try:
            async with asyncio.timeout(timeout):
                async for change in watch:
                    found = handled(change[1], input_id) if change is not None else None
                    if found is not None:
                        return found
        except TimeoutError:
            return None
        finally:
            await watch.stop()
        return None

    def _remember(self, conversation: str, stored: StoredState, revision: int) -> None:
        if self.cache_size <= 0:
            return
        self._cache[conversation] = (stored, revision)
        self._cache.move_to_end(conversation)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

