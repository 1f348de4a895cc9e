"""Rasa's REST channel shape, as pure functions: a Rasa client talks to commhub unchanged.

Rasa's ``POST /webhooks/rest/webhook`` takes ``{"sender": ID, "message": TEXT,
"metadata": {...}}`` and answers the bot's replies to that message as a JSON list::

    [{"recipient_id": "u1", "text": "How many people is the table for?"},
     {"recipient_id": "u1", "text": "Shall I book it?",
      "buttons": [{"title": "Yes, book it", "payload": "/button{\\"value\\":\\"yes\\"}"}]}]

Mapping:

* **Conversation.** Rasa's ``sender`` is any string; a commhub conversation id is one
  subject token. ``rest-<sender>`` when the sender is already a valid token (and short
  enough), else ``rest-x-<hash of sender>``; the same sender always lands in the same
  conversation. The user id is the same token without ``rest-``.
* **Buttons.** Rasa buttons carry a *string* payload that a Rasa client sends back as the
  ``message`` when the button is pressed. A commhub button payload is a JSON object, so
  it travels as ``/button<compact JSON>`` (Rasa's own ``/intent{entities}`` form), and a
  ``message`` of that form comes back in as that payload: a press, exactly as on the
  WebSocket. ``quick_replies`` are shown as buttons too.
* **Other payload data** goes out as Rasa's ``custom``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import msgspec

from commhub.channels.http.request import ApiError
from commhub.core.envelope import Message
from commhub.core.jsonlimit import JsonInputError, decode_json
from commhub.core.subjects import valid_token

__all__ = [
    "BUTTON_PREFIX",
    "RasaRequest",
    "button_payload",
    "conversation_for",
    "parse_request",
    "rasa_replies",
]

BUTTON_PREFIX: Final = "/button"
CONVERSATION_PREFIX: Final = "rest-"
_MAX_PLAIN_SENDER: Final = 128 - len(CONVERSATION_PREFIX)

_encode = msgspec.json.Encoder().encode


class RasaRequest(msgspec.Struct, frozen=True):
    """A decoded webhook body: who wrote, and what (text, or a pressed button's payload)."""

    sender: str
    conversation: str
    user: str
    text: str | None
    payload: dict[str, Any] | None
    metadata: dict[str, Any] | None
    wait: float | None = None


def conversation_for(sender: str) -> tuple[str, str]:
    """``(conversation, user)`` for a Rasa sender id, deterministic and token-safe."""
    if valid_token(sender) and len(sender) <= _MAX_PLAIN_SENDER:
        user = sender
    else:
        user = "x-" + hashlib.blake2b(sender.encode(), digest_size=12).hexdigest()
    return CONVERSATION_PREFIX + user, user


def button_payload(payload: dict[str, Any]) -> str:
    """A commhub button payload as the string a Rasa button carries."""
    return BUTTON_PREFIX + _encode(payload).decode()


def _pressed(text: str) -> dict[str, Any] | None:
    """The payload a ``/button{...}`` message stands for, if it is one.

    Text that only looks like one (not JSON) is plain text; a button payload nested
    deeper than :data:`~commhub.core.jsonlimit.MAX_JSON_DEPTH` is refused with 400, like
    a body nested that deep.
    """
    if not text.startswith(BUTTON_PREFIX + "{"):
        return None
    try:
        value = decode_json(text[len(BUTTON_PREFIX):])
    except JsonInputError as exc:
        if exc.kind == "syntax":
            return None
        raise ApiError(400, "bad_json", f"the button payload is {exc}") from None
    return value if isinstance(value, dict) else None


def parse_request(body: dict[str, Any], wait: str | None = None) -> RasaRequest:
    """Check a webhook body and the ``?wait=`` parameter; 422 for a missing or mistyped
    field, 400 for a bad ``wait``. ``wait`` (seconds, the query's or the body's) asks
    to include the replies that come later in the turn: a service's answer."""
    sender, text, metadata = body.get("sender"), body.get("message"), body.get("metadata")
    if not isinstance(sender, str) or not sender:
        raise ApiError(422, "invalid", "'sender' must be a non-empty string")
    if not isinstance(text, str) or not text:
        raise ApiError(422, "invalid", "'message' must be a non-empty string")
    if metadata is not None and not isinstance(metadata, dict):
        raise ApiError(422, "invalid", "'metadata' must be a JSON object")
    follow = _wait(wait if wait is not None else body.get("wait"))
    conversation, user = conversation_for(sender)
    payload = _pressed(text)
    return RasaRequest(
        sender=sender,
        conversation=conversation,
        user=user,
        text=None if payload is not None else text,
        payload=payload,
        metadata=metadata,
        wait=follow,
    )


def _wait(value: object) -> float | None:
    """``wait`` as seconds (from the query string or the body), or None."""
    if value is None:
        return None
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ApiError(400, "bad_request", "'wait' must be a number of seconds") from None
    if isinstance(value, bool) or not 0 <= seconds < float("inf"):
        raise ApiError(400, "bad_request", "'wait' must be a number of seconds") from None
    return seconds


def rasa_replies(recipient: str, replies: list[Message]) -> list[dict[str, Any]]:
    """The bot's replies in Rasa's response shape, one object per message."""
    return [_rasa_reply(recipient, message) for message in replies]


def _rasa_reply(recipient: str, message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"recipient_id": recipient}
    if message.text is not None:
        out["text"] = message.text
    payload = dict(message.payload or {})
    buttons = [
        {"title": str(button.get("title", "")), "payload": _button_string(button.get("payload"))}
        for key in ("buttons", "quick_replies")
        for button in _button_list(payload.pop(key, None))
    ]
    if buttons:
        out["buttons"] = buttons
    if payload:
        out["custom"] = payload
    return out


def _button_list(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [button for button in value if isinstance(button, dict)]


def _button_string(payload: object) -> str:
    if isinstance(payload, dict):
        return button_payload(payload)
    return "" if payload is None else str(payload)
