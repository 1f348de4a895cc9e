"""Client tokens: a static list, and HMAC-signed tokens that carry a user id and an expiry.

A web page usually cannot keep a secret, so its own back end hands it a **signed token**
made with the hub's ``token_secret`` (``commhub token --user alice``, or :func:`mint` in
Python, or a few lines in any language, shown in ``docs/channels.md``)::

    ch1.<payload>.<signature>

``payload`` is base64url of the JSON ``{"sub": user, "exp": unix seconds, "conv":
conversation (optional)}``; ``signature`` is base64url of HMAC-SHA256 over
``ch1.<payload>``. The hub checks the signature in constant time,
then the expiry, and then binds the client to the token's user (and conversation, when
the token names one): a signed token for alice cannot speak as bob.

A **static token** (setting ``tokens``) admits any user; it suits services and tests.

Both kinds are checked by :meth:`TokenAuthority.check`, which every built-in channel
uses, so WebSocket and HTTP clients see the same rules and the same reasons. Thread-safe
and side-effect free.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "PREFIX", "AccessRefusal", "BearerAccess", "Identity", "TokenAuthority", "TokenRefused",
    "mint",
]

PREFIX: Final = "ch1"


class TokenRefused(Exception):
    """A token that does not admit the client; ``str()`` is the reason shown to it."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a token admits. ``user``/``conversation`` are None when the token allows any."""

    # "static", "signed" or "anonymous"; "channel" when a channel's own network proves
    # the user (Telegram's chat id), not a token.
    kind: str
    user: str | None = None
    conversation: str | None = None
    expires: int | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, signed_part: str) -> str:
    return _b64(hmac.new(secret.encode(), signed_part.encode(), hashlib.sha256).digest())


def mint(
    secret: str,
    user: str,
    ttl_seconds: float = 3600,
    conversation: str | None = None,
    now: float | None = None,
) -> str:
    """A signed token for ``user`` valid for ``ttl_seconds`` (bound to ``conversation``)."""
    if not secret:
        raise ValueError("a signed token needs a non-empty secret (setting token_secret)")
    claims: dict[str, object] = {"sub": user, "exp": int((now or time.time()) + ttl_seconds)}
    if conversation is not None:
        claims["conv"] = conversation
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signed_part = f"{PREFIX}.{payload}"
    return f"{signed_part}.{_sign(secret, signed_part)}"


class TokenAuthority:
    """Checks client tokens against the static list and the signing secret."""

    def __init__(
        self,
        static: Sequence[str] = (),
        secret: str | None = None,
        anonymous_allowed: bool = False,
    ) -> None:
        self.static = [token.encode() for token in static]
        self.secret = secret or None
        self.anonymous_allowed = anonymous_allowed

    def check(
        self,
        token: str | None,
        *,
        user: str | None = None,
        conversation: str | None = None,
        now: float | None = None,
    ) -> Identity:
        """The identity ``token`` admits for this ``user`` and ``conversation``.

        Raises :class:`TokenRefused` with the reason: ``token required``, ``invalid
        token``, ``token expired``, ``token is for another user`` or ``token is for
        another conversation``. A token that is given but wrong is refused even where
        anonymous clients are allowed, so a misconfigured client learns of it.
        """
        if not token:
            if self.anonymous_allowed:
                return Identity("anonymous")
            raise TokenRefused("token required")
        if token.startswith(PREFIX + ".") and self.secret is not None:
            return self._check_signed(token, user, conversation, now)
        given = token.encode()
        found = False
        for candidate in self.static:  # constant time over every candidate
            found |= hmac.compare_digest(given, candidate)
        if not found:
            raise TokenRefused("invalid token")
        return Identity("static")

    def _check_signed(
        self, token: str, user: str | None, conversation: str | None, now: float | None
    ) -> Identity:
        assert self.secret is not None
        signed_part, _, signature = token.rpartition(".")
        if not hmac.compare_digest(signature.encode(), _sign(self.secret, signed_part).encode()):
            raise TokenRefused("invalid token")
        try:
            claims = json.loads(_unb64(signed_part.split(".", 1)[1]))
            sub, exp = str(claims["sub"]), int(claims["exp"])
            conv = claims.get("conv")
        except (ValueError, KeyError, TypeError, IndexError):
            raise TokenRefused("invalid token") from None
        if exp <= (now if now is not None else time.time()):
            raise TokenRefused("token expired")
        if user is not None and user != sub:
            raise TokenRefused("token is for another user")
        if conv is not None and conversation is not None and conversation != conv:
            raise TokenRefused("token is for another conversation")
        return Identity("signed", user=sub, conversation=conv, expires=exp)


@dataclass(frozen=True, slots=True)
class AccessRefusal:
    """Why a request may not use a token-guarded hub API: HTTP status, code, message."""

    status: int
    code: str
    message: str


class BearerAccess:
    """Decides whether an ``Authorization`` header admits a request to a hub API that
    has its own token list (SQL over HTTP: ``sql_tokens``; the agents' inbox:
    ``agent_tokens``), apart from the chat channels' tokens.

    With tokens configured, a request needs ``Authorization: Bearer <one of them>``.
    With none, the API is open on a loopback hub that allows anonymous clients
    (``open_without_tokens``) and disabled everywhere else, with a 403 that names the
    setting to set. Side-effect free and thread-safe; tokens are compared in constant
    time against every configured token.
    """

    def __init__(
        self, tokens: Sequence[str], open_without_tokens: bool, api: str, setting: str
    ) -> None:
        tokens = [token for token in tokens if token]
        # The chat channels' checker, with only these tokens: no secret, no anonymity.
        self._authority = TokenAuthority(tokens)
        #: True when no token is needed (no tokens, loopback host, anonymous allowed).
        self.open = not tokens and open_without_tokens
        self.enabled = bool(tokens) or self.open
        self._disabled = (f"{api} is disabled: this hub listens beyond loopback and has no "
                          f"{setting}; set {setting} (COMMHUB_{setting.upper()}) to enable it")

    def check(self, authorization: str | None) -> AccessRefusal | None:
        """None when the request may go on, else the refusal to answer with."""
        if not self.enabled:
            return AccessRefusal(403, "forbidden", self._disabled)
        if not authorization:
            if self.open:
                return None
            return AccessRefusal(
                401, "unauthorized", "token required: send 'Authorization: Bearer <token>'"
            )
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return AccessRefusal(
                401, "unauthorized", "malformed Authorization header: use 'Bearer <token>'"
            )
        try:
            self._authority.check(token)
        except TokenRefused as exc:
            return AccessRefusal(401, "unauthorized", str(exc))
        return None
