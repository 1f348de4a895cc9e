"""The HTTP channel's request rules, as small functions: auth, ids, bodies, queries, JSON out.

Nothing here serves anything. Each check either returns the value it read or raises
:class:`ApiError`, which :func:`api_handler` turns into the hub's JSON error shape
``{"error": {"code": ..., "message": ...}}`` (and, for refused tokens, a ChannelEvent).
The rules match the WebSocket channel's: conversation and user ids are one subject token,
a client's message id must look unique, tokens are checked by the hub's
:class:`~commhub.core.tokens.TokenAuthority`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
from aiohttp import web

from commhub.channels.websocket.frames import MIN_CLIENT_ID_CHARS
from commhub.core.envelope import Message
from commhub.core.jsonlimit import JsonInputError, decode_json
from commhub.core.subjects import valid_token
from commhub.core.tokens import Identity, TokenAuthority, TokenRefused
from commhub.core.web import json_error

__all__ = [
    "ApiError",
    "api_handler",
    "authorize",
    "bearer_token",
    "check_conversation",
    "check_user",
    "cursor_param",
    "encode_message",
    "flag_param",
    "message_id",
    "message_object",
    "number_param",
    "read_json_object",
    "text_and_payload",
]

#: The ``WWW-Authenticate`` challenge of every 401 (RFC 6750).
CHALLENGE: Final = 'Bearer realm="commhub"'
_MAX_CURSOR_DIGITS: Final = 19  # a stream sequence is a uint64

_encode = msgspec.json.Encoder().encode


class ApiError(Exception):
    """A request the channel refuses: HTTP status, error code, message for the client."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def response(self) -> web.Response:
        return json_error(self.status, self.message, self.code, self.headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OnRefused = Callable[[web.Request, ApiError], Awaitable[None]]


def api_handler(on_refused: OnRefused) -> Callable[[Handler], Handler]:
    """Wrap a handler: an :class:`ApiError` (or a body over the size limit) becomes the
    JSON error answer, after ``on_refused`` has recorded it (a ChannelEvent)."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except ApiError as exc:
                await on_refused(request, exc)
                return exc.response()
            except web.HTTPRequestEntityTooLarge as exc:
                # Raised by aiohttp while reading the body; the hub's middleware writes
                # the 413 answer. Recorded here because only the channel knows about it.
                await on_refused(request, ApiError(413, "too_large", str(exc.reason)))
                raise

        return wrapped

    return wrap


# -- auth ----------------------------------------------------------------------------------
def bearer_token(request: web.Request) -> str | None:
    """The request's token: ``Authorization: Bearer T``, else the ``token`` query parameter
    (for clients that cannot set headers: a browser's ``EventSource``, some Rasa clients)."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "use 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": f'{CHALLENGE}, error="invalid_request"'})
        return token.strip()
    return request.query.get("token") or None


def authorize(
    authority: TokenAuthority, request: web.Request, *, user: str | None, conversation: str | None
) -> Identity:
    """Check the request's token for ``user`` in ``conversation``; same rules and
    reasons as the WebSocket channel (``docs/channels.md``). Every refusal is 401 with
    ``WWW-Authenticate`` and the reason as the message."""
    token = bearer_token(request)
    try:
        return authority.check(token, user=user, conversation=conversation)
    except TokenRefused as exc:
        error = "invalid_token" if token else "invalid_request"
        raise ApiError(401, "unauthorized", str(exc),
                       {"WWW-Authenticate": f'{CHALLENGE}, error="{error}"'}) from None


# -- ids and parameters ------------------------------------------------------------------
def check_conversation(value: str) -> str:
    if not valid_token(value):
        raise ApiError(400, "bad_request",
                       "invalid conversation: use 1-128 letters, digits, - or _")
    return value


def check_user(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not valid_token(value):
        raise ApiError(422, "invalid", "'user' must be 1-128 letters, digits, - or _")
    return value


def message_id(value: object) -> str | None:
    """A client's message id: it becomes the ``Nats-Msg-Id``, so it must look unique."""
    if value is None:
        return None
    if not (isinstance(value, str) and len(value) >= MIN_CLIENT_ID_CHARS and valid_token(value)):
        raise ApiError(
            422, "invalid",
            f"'id' must be unique: {MIN_CLIENT_ID_CHARS}-128 letters, digits, - or _ "
            "(a UUID), or left out",
        )
    return value


def cursor_param(raw: str | None, name: str) -> int | None:
    """A cursor from a query parameter or header; None when absent or empty."""
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > _MAX_CURSOR_DIGITS:
        raise ApiError(400, "bad_request", f"invalid {name}: use a cursor the hub returned")
    return int(raw)


def flag_param(request: web.Request, name: str) -> bool:
    """A yes/no query parameter: ``1``/``true`` or ``0``/``false`` (absent: no)."""
    raw = request.query.get(name, "").lower()
    if raw not in ("", "0", "1", "true", "false"):
        raise ApiError(400, "bad_request", f"invalid {name}: use 1 or 0")
    return raw in ("1", "true")


def number_param(
    request: web.Request, name: str, default: float, low: float, high: float
) -> float:
    """A numeric query parameter within ``[low, high]``."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, "bad_request", f"invalid {name}: not a number") from None
    if not low <= value <= high:
        raise ApiError(400, "bad_request", f"invalid {name}: use {low:g} to {high:g}")
    return value


# -- bodies ------------------------------------------------------------------------------
async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object. Bad JSON, or JSON nested deeper than
    :data:`~commhub.core.jsonlimit.MAX_JSON_DEPTH` levels, is 400 ``bad_json``; any other
    JSON value 422.

    A body over the hub's ``max_body_bytes`` raises aiohttp's 413 while it is read.
    """
    raw = await request.read()
    try:
        body = decode_json(raw)
    except JsonInputError as exc:
        raise ApiError(400, "bad_json", f"the body is {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid", "the body must be a JSON object")
    return body


def text_and_payload(body: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """``text`` and ``payload`` of a message body; at least one must be given."""
    text, payload = body.get("text"), body.get("payload")
    if text is not None and not isinstance(text, str):
        raise ApiError(422, "invalid", "'text' must be a string")
    if payload is not None and not isinstance(payload, dict):
        raise ApiError(422, "invalid", "'payload' must be a JSON object")
    if not text and payload is None:
        raise ApiError(422, "invalid", "a message needs a non-empty 'text' or a 'payload'")
    return text or None, payload


# -- JSON out ----------------------------------------------------------------------------
def message_object(cursor: int, message: Message) -> dict[str, Any]:
    """One outbound message as every HTTP surface shows it (GET, SSE ``data``, callbacks)."""
    sender = message.sender
    return {
        "cursor": cursor,
        "id": message.id,
        "conversation": message.conversation,
        "direction": message.direction,
        "text": message.text,
        "payload": message.payload,
        "sender": {"id": sender.id, "kind": sender.kind, "name": sender.name},
        "reply_to": message.reply_to,
        "ts": message.ts,
    }


def encode_message(cursor: int, message: Message) -> bytes:
    return _encode(message_object(cursor, message))
