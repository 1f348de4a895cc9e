"""Who owns a conversation: the rule as a pure function, and the record that holds it.

A conversation belongs to the user who started it. The first client a channel accepts
into a conversation (its first message, connection, read or stream) records itself as
the owner; later clients are checked against that record on every channel.

**The rule** (:func:`decide`). Only a signed token proves who a client is, so an owner
is *verified* when it entered with a signed token, and the rule keeps two worlds apart:

* a client with a signed token enters only a conversation whose verified owner is its
  own user;
* a client without one (an anonymous client, or a static token, which admits any user
  the client names) enters only a conversation that no verified user owns. Among such
  clients the hub cannot tell one user from another: their user ids are claims, so they
  are not separated from each other;
* a signed token that names the conversation (``conv`` claim) enters it whoever owns it:
  the back end that signed it granted exactly that;
* a channel whose network proves who writes (Telegram: the conversation is derived
  from the chat id) claims with a ``channel`` identity naming the conversation: it
  counts as signed and always enters, so it owns the chat's conversation and keeps the
  clients of other channels, which could name the same id, out of it.

**The record.** The owner has to be known the moment a channel accepts a client, before
the router has stepped anything, so it is not the conversation state
(``ConversationState.user`` is written only after the router's step). It is a small
record of its own in the ``{prefix}_owners`` KV bucket, key = the conversation id,
written with a KV *create*, which JetStream applies only if the key does not exist yet:
of two clients racing into a new conversation on any channel, in any process, exactly
one becomes its owner and the other is judged against it. Records never change once
written, so each process keeps the ones it has seen in memory (bounded) and checks a
known conversation without a round trip. A record an operator deletes by hand is still
remembered by processes that saw it, until they restart.

Concurrency: :class:`OwnerBook` is used by many tasks of one event loop; its cache is a
plain dictionary touched only between awaits. Failure: a bus failure raises from
:meth:`OwnerBook.claim` (the channel tells its client to retry); nothing is recorded
in the cache unless the bucket answered.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from enum import Enum
from typing import TYPE_CHECKING, Final

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from commhub.core.bus import Bus
    from commhub.core.tokens import Identity

__all__ = [
    "FORBIDDEN_CODE",
    "FORBIDDEN_MESSAGE",
    "ConversationForbidden",
    "Owner",
    "OwnerBook",
    "Verdict",
    "client_of",
    "decide",
]

log = logging.getLogger(__name__)

#: What every channel tells a client refused on another user's conversation (an HTTP
#: error ``code`` and ``message``; joined as ``code: message`` on WebSocket closes and in
#: ``rejected`` ChannelEvents).
FORBIDDEN_CODE: Final = "forbidden"
FORBIDDEN_MESSAGE: Final = "the conversation belongs to another user"

_MAX_CACHED: Final = 100_000  # owner records remembered per process, most recent kept


class ConversationForbidden(Exception):
    """The conversation belongs to another user; ``str()`` is the reason to show."""

    def __init__(self) -> None:
        super().__init__(f"{FORBIDDEN_CODE}: {FORBIDDEN_MESSAGE}")


class Owner(msgspec.Struct, frozen=True):
    """A conversation's owner as recorded, or a client as it asks to enter.

    ``verified``: the user id came from a signed token (proven), not from the client's
    word (an anonymous client or a static token).
    """

    user: str
    verified: bool


class Verdict(Enum):
    CLAIM = "claim"  # nobody owns it yet: record the client as its owner
    ENTER = "enter"
    REFUSE = "refuse"


def client_of(identity: Identity, user: str, conversation: str) -> tuple[Owner, bool]:
    """The client as the rule sees it: ``(who, granted)``.

    ``user`` is the user id the channel settled on (the token's for a signed token,
    else the one the client named or the channel's default). A ``channel`` identity (a
    network that proves its users, like Telegram's chat ids) counts as signed.
    """
    if identity.kind in ("signed", "channel") and identity.user is not None:
        return Owner(identity.user, True), identity.conversation == conversation
    return Owner(user, False), False


def decide(owner: Owner | None, client: Owner, *, granted: bool = False) -> Verdict:
    """May ``client`` enter a conversation owned by ``owner`` (None: nobody yet)?

    Pure. See the module docstring for the rule.
    """
    if owner is None:
        return Verdict.CLAIM
    if granted:
        return Verdict.ENTER
    if owner.verified or client.verified:
        return Verdict.ENTER if owner == client else Verdict.REFUSE
    return Verdict.ENTER  # neither is proven: claims cannot be told apart


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Owner).decode


class OwnerBook:
    """The owners bucket of one bus prefix, with the records already seen in memory."""

    def __init__(self, bus: Bus, max_cached: int = _MAX_CACHED) -> None:
        self.bus = bus
        self.max_cached = max_cached
        self._kv: KeyValue | None = None
        self._known: OrderedDict[str, Owner] = OrderedDict()

    async def claim(
        self, conversation: str, client: Owner, *, granted: bool = False
    ) -> Owner:
        """Enter ``conversation`` as ``client``; return its owner (``client`` if it is
        the first). Raises :class:`ConversationForbidden` when the rule refuses it, and
        the bus's error when the bucket cannot be read or written."""
        owner = self._known.get(conversation)
        if owner is None:
            owner = await self._owner_or_claim(conversation, client)
        self._remember(conversation, owner)
        if decide(owner, client, granted=granted) is Verdict.REFUSE:
            raise ConversationForbidden()
        return owner

    async def _owner_or_claim(self, conversation: str, client: Owner) -> Owner:
        kv = await self._bucket()
        try:
            await kv.create(conversation, _encode(client))
            return client
        except KeyWrongLastSequenceError:
            pass  # someone entered first: judge the client against them
        try:
            entry = await kv.get(conversation)
        except KeyNotFoundError:
            # Deleted between our create and get (only by hand): try once more.
            await kv.create(conversation, _encode(client))
            return client
        try:
            return _decode(entry.value or b"")
        except msgspec.DecodeError:
            # Not written by commhub: whoever owns it cannot be shown, so only a token
            # granted this very conversation enters (a verified owner no user matches).
            log.warning("owners: unreadable record for %s", conversation)
            return Owner("", True)

    def _remember(self, conversation: str, owner: Owner) -> None:
        self._known[conversation] = owner
        self._known.move_to_end(conversation)
        if len(self._known) > self.max_cached:
            self._known.popitem(last=False)

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            name = self.bus.subjects.owners_bucket
            # Created (once, by whichever process is first) with the layout's replicas.
            self._kv = await self.bus.bucket(name)
        return self._kv
