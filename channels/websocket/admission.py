"""Who may connect to the WebSocket channel: the connect URL's rules, as pure functions.

:func:`admit` reads ``/ws?conversation=ID&user=ID&token=T&after=CURSOR&both=1`` and returns
either a :class:`Admitted` (the connection's conversation, user and start cursor) or a
:class:`Refused` carrying the close code and reason the client will see. The rules:

* ``conversation`` is required and must be one subject token;
* ``user`` is optional (default ``anon-<8 hex>``) and must be one subject token;
* ``after`` is optional, a non-negative integer cursor;
* ``both`` is optional: ``1`` (or ``true``) replays and follows the conversation's
  inbound messages too, ``0``/``false``/absent only the outbound ones;
* ``token`` is checked by :class:`commhub.core.tokens.TokenAuthority`: a static token, or
  a signed token whose user (and conversation, if it names one) the client is bound to;
  without ``user`` a signed token's user is taken. A token that is given but wrong is
  refused even when anonymous clients are allowed.

Whether the conversation belongs to another user needs the owners record on the bus, so
it is checked after :func:`admit`, by :meth:`ChannelContext.claim_conversation`; a
refusal closes with :data:`CLOSE_FORBIDDEN`.

Close codes are in the 4000-4999 private range so that a browser, which cannot read the
HTTP body of a refused handshake, still learns why (``CloseEvent.code``/``reason``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs, urlsplit

from commhub.core.envelope import new_id
from commhub.core.subjects import valid_token
from commhub.core.tokens import Identity, TokenAuthority, TokenRefused

__all__ = [
    "CLOSE_BAD_REQUEST",
    "CLOSE_FORBIDDEN",
    "CLOSE_TOO_MANY",
    "CLOSE_UNAUTHORIZED",
    "HEALTH_PATH",
    "WS_PATH",
    "Admitted",
    "Refused",
    "admit",
]

WS_PATH: Final = "/ws"
HEALTH_PATH: Final = "/healthz"

CLOSE_BAD_REQUEST: Final = 4400  # bad query parameters
CLOSE_UNAUTHORIZED: Final = 4401  # missing or wrong token
CLOSE_FORBIDDEN: Final = 4403  # the conversation belongs to another user
CLOSE_TOO_MANY: Final = 4429  # max_connections reached


@dataclass(frozen=True, slots=True)
class Admitted:
    """A client that may connect, and what it connected to."""

    conversation: str
    user: str
    after: int | None
    anonymous: bool
    identity: Identity  # what the token admitted: the owner check needs it
    both: bool = False  # inbound messages too (``both=1``)


@dataclass(frozen=True, slots=True)
class Refused:
    """A client that must be closed with ``code`` and ``reason`` (at most 123 bytes)."""

    code: int
    reason: str
    conversation: str | None = None
    user: str | None = None


def admit(path: str, *, authority: TokenAuthority) -> Admitted | Refused:
    """Check a request path with its query string against the connect rules."""
    query = parse_qs(urlsplit(path).query, keep_blank_values=True)

    def one(name: str) -> str | None:
        values = query.get(name)
        return values[-1] if values else None

    conversation = one("conversation")
    user = one("user")
    conv_shown = conversation if conversation and valid_token(conversation) else None
    user_shown = user if user and valid_token(user) else None
    if conversation is None:
        return Refused(CLOSE_BAD_REQUEST, "missing conversation parameter")
    if not valid_token(conversation):
        return Refused(
            CLOSE_BAD_REQUEST, "invalid conversation: use 1-128 letters, digits, - or _",
            user=user_shown,
        )
    if user is not None and not valid_token(user):
        return Refused(
            CLOSE_BAD_REQUEST, "invalid user: use 1-128 letters, digits, - or _",
            conversation=conv_shown,
        )
    after: int | None = None
    raw_after = one("after")
    if raw_after is not None and raw_after != "":
        if not raw_after.isdigit() or len(raw_after) > 19:
            return Refused(CLOSE_BAD_REQUEST, "invalid after: use a cursor from a message frame",
                           conv_shown, user_shown)
        after = int(raw_after)
    raw_both = (one("both") or "").lower()
    if raw_both not in ("", "0", "1", "true", "false"):
        return Refused(CLOSE_BAD_REQUEST, "invalid both: use 1 or 0", conv_shown, user_shown)
    token = one("token")
    try:
        identity = authority.check(token, user=user, conversation=conversation)
    except TokenRefused as exc:
        return Refused(CLOSE_UNAUTHORIZED, str(exc), conv_shown, user_shown)
    return Admitted(
        conversation=conversation,
        user=user or identity.user or f"anon-{new_id()[:8]}",
        after=after,
        anonymous=identity.kind == "anonymous",
        identity=identity,
        both=raw_both in ("1", "true"),
    )
