"""The WebSocket channel's frame codec: JSON text frames in and out, as pure functions.

Sans-I/O: nothing here touches a socket or the bus, so every rule of the protocol
(``docs/websocket.md``) is testable with plain function calls.

Inbound, :func:`decode_frame` turns one received WebSocket message into a
:class:`MessageFrame`, a :class:`PingFrame` or a :class:`FrameError` (never raises).
Outbound, the ``*_frame`` functions build the JSON bytes of ``message``, ``ack``,
``error``, ``pong`` and ``event`` frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from commhub.core.envelope import Message
from commhub.core.jsonlimit import JsonInputError, decode_json
from commhub.core.subjects import MIN_ID_CHARS, valid_token

__all__ = [
    "MIN_CLIENT_ID_CHARS",
    "ErrorCode",
    "FrameError",
    "InboundFrame",
    "MessageFrame",
    "PingFrame",
    "ack_frame",
    "decode_frame",
    "error_frame",
    "event_frame",
    "message_frame",
    "pong_frame",
]

ErrorCode = Literal["bad_json", "unknown_type", "bad_frame", "rate_limited", "unavailable"]

#: A client's message id becomes the bus message id, and so the ``Nats-Msg-Id`` that
#: JetStream deduplicates on across the whole stream: it must be unique, not a counter.
#: The bus's own rule (:data:`commhub.core.subjects.MIN_ID_CHARS`).
MIN_CLIENT_ID_CHARS: Final = MIN_ID_CHARS


@dataclass(frozen=True, slots=True)
class MessageFrame:
    """``{"type":"message","id"?,"text"?,"payload"?}``: a user's message (or button press)."""

    id: str | None
    text: str | None
    payload: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class PingFrame:
    """``{"type":"ping"}``: an application-level liveness check, answered with ``pong``."""


@dataclass(frozen=True, slots=True)
class FrameError:
    """Why a received frame was refused; becomes an ``error`` frame for the client."""

    code: ErrorCode
    message: str
    id: str | None = None


InboundFrame = MessageFrame | PingFrame

_encode = msgspec.json.Encoder().encode


def decode_frame(data: str | bytes) -> InboundFrame | FrameError:
    """Decode one received WebSocket message; a bad one gives a :class:`FrameError`.

    ``data`` is ``str`` for a text frame and ``bytes`` for a binary frame (refused: the
    protocol is JSON text). Unknown fields in a known frame are ignored, like the
    envelope's unknown fields, so clients may add their own.
    """
    if isinstance(data, bytes):
        return FrameError("bad_frame", "binary frames are not supported; send JSON text")
    try:
        obj = decode_json(data)
    except JsonInputError as exc:  # not JSON, or nested past MAX_JSON_DEPTH
        return FrameError("bad_json" if exc.kind == "syntax" else "bad_frame", str(exc))
    if not isinstance(obj, dict):
        return FrameError("bad_frame", "a frame must be a JSON object with a 'type'")
    kind = obj.get("type")
    if kind == "message":
        return _message(obj)
    if kind == "ping":
        return PingFrame()
    if not isinstance(kind, str):
        return FrameError("bad_frame", "a frame needs a string 'type'")
    return FrameError("unknown_type", f"unknown frame type {kind[:40]!r}; use message or ping")


def _message(obj: dict[str, Any]) -> MessageFrame | FrameError:
    client_id = obj.get("id")
    if client_id is not None and not (
        isinstance(client_id, str)
        and len(client_id) >= MIN_CLIENT_ID_CHARS
        and valid_token(client_id)
    ):
        return FrameError(
            "bad_frame",
            f"'id' must be unique: {MIN_CLIENT_ID_CHARS}-128 letters, digits, - or _ "
            "(a UUID), or left out",
        )
    text = obj.get("text")
    payload = obj.get("payload")
    if text is not None and not isinstance(text, str):
        return FrameError("bad_frame", "'text' must be a string", client_id)
    if payload is not None and not isinstance(payload, dict):
        return FrameError("bad_frame", "'payload' must be a JSON object", client_id)
    if not text and payload is None:
        return FrameError("bad_frame", "a message needs a non-empty 'text' or a 'payload'",
                          client_id)
    return MessageFrame(client_id, text or None, payload)


def message_frame(cursor: int, message: Message) -> bytes:
    """A ``message`` frame: the bus message plus its resume ``cursor``; ``direction``
    is ``out`` (to the user) or ``in`` (the user's own, on a ``both=1`` connection)."""
    sender = message.sender
    return _encode(
        {
            "type": "message",
            "id": message.id,
            "direction": message.direction,
            "text": message.text,
            "payload": message.payload,
            "sender": {"id": sender.id, "kind": sender.kind, "name": sender.name},
            "reply_to": message.reply_to,
            "ts": message.ts,
            "cursor": cursor,
        }
    )


def ack_frame(message_id: str) -> bytes:
    """``ack``: the message with this ``id`` is durable on the bus."""
    return _encode({"type": "ack", "id": message_id})


def error_frame(code: ErrorCode, message: str, client_id: str | None = None) -> bytes:
    """``error``: a frame was refused; the connection stays open."""
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if client_id is not None:
        frame["id"] = client_id
    return _encode(frame)


def pong_frame() -> bytes:
    """``pong``: the answer to ``ping``."""
    return _encode({"type": "pong"})


def event_frame(event: str, **fields: Any) -> bytes:
    """``event``: something about the connection itself (``connected``)."""
    return _encode({"type": "event", "event": event, **fields})
