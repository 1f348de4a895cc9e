"""Telegram updates in, commhub messages out: ids, conversations, buttons, dedupe.

Pure helpers of the Telegram channel (no network, no bus):

* :func:`conversation_id` / :func:`chat_id_of`: chat id <-> conversation id. A chat id
  may be negative (groups, channels), and ``-`` may not start the number inside a
  token we also parse back, so ``-100123`` becomes ``tg-m100123``.
* :func:`message_id_for`: the inbound message id, derived from the bot and the
  ``update_id``, so a re-delivered update (a webhook retry, a polling overlap, a
  restart before the offset was confirmed) publishes the same ``Nats-Msg-Id`` and
  JetStream's duplicate window drops it.
* :func:`callback_data_for` / :func:`parse_callback_data`: a button's payload as
  ``callback_data`` (at most 64 bytes): compact JSON when it fits, else ``h:`` and a
  hash whose payload the channel stores in its KV bucket.
* :func:`parse_update`: the parts of an Update the channel uses, or None for kinds it
  does not handle.
* :class:`RecentUpdates`: runs each ``update_id`` once in this process, also when the
  same update arrives twice at the same time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from telegram import Update

from commhub.core.envelope import derived_id

__all__ = [
    "CALLBACK_DATA_LIMIT",
    "ParsedUpdate",
    "RecentUpdates",
    "callback_data_for",
    "chat_id_of",
    "conversation_id",
    "message_id_for",
    "parse_callback_data",
    "parse_update",
]

CALLBACK_DATA_LIMIT = 64  # bytes, Telegram's limit for InlineKeyboardButton.callback_data
HASH_PREFIX = "h:"


def conversation_id(chat_id: int) -> str:
    """``tg-123`` for chat 123, ``tg-m100123`` for chat -100123 (a valid subject token)."""
    return f"tg-m{-chat_id}" if chat_id < 0 else f"tg-{chat_id}"


def chat_id_of(conversation: str) -> int | None:
    """The chat id of a ``tg-...`` conversation, or None if it is not one."""
    if not conversation.startswith("tg-"):
        return None
    number = conversation[3:]
    sign = 1
    if number.startswith("m"):
        sign, number = -1, number[1:]
    if not number.isdigit() or not number.isascii():
        return None
    return sign * int(number)


def message_id_for(bot_id: int, update_id: int) -> str:
    """The inbound Message id of one update of one bot (stable across retries)."""
    return derived_id("tg", bot_id, update_id)


def _compact(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def callback_data_for(payload: dict[str, Any]) -> tuple[str, str | None]:
    """``(callback_data, stored)`` for a button payload.

    ``stored`` is None when the compact JSON itself fits in 64 bytes; otherwise
    ``callback_data`` is ``h:<hash>`` and ``stored`` the JSON the channel must keep
    under that hash before the button is sent.
    """
    text = _compact(payload)
    if len(text.encode()) <= CALLBACK_DATA_LIMIT:
        return text, None
    digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    return HASH_PREFIX + digest, text


def parse_callback_data(data: str) -> tuple[Literal["payload"], dict[str, Any]] | tuple[
    Literal["stored"], str
]:
    """What a pressed button's ``callback_data`` stands for.

    ``("payload", dict)`` for inline JSON, ``("stored", hash)`` for a stored payload.
    Data that is neither (a button made by something else) is ``{"value": data}``,
    which is how a typed button value reaches a workflow too.
    """
    if data.startswith(HASH_PREFIX):
        return "stored", data[len(HASH_PREFIX):]
    if data.startswith("{"):
        try:
            value = json.loads(data)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return "payload", value
    return "payload", {"value": data}


@dataclass(frozen=True)
class ParsedUpdate:
    """What the channel needs of one update."""

    update_id: int
    kind: Literal["message", "edited", "callback"]
    chat_id: int
    chat_type: str
    user_id: int | None
    user_name: str | None
    text: str | None = None
    message_id: int | None = None
    callback_id: str | None = None
    callback_data: str | None = None


def _name(first: str | None, last: str | None, username: str | None) -> str | None:
    full = " ".join(part for part in (first, last) if part)
    return full or username


def parse_update(update: Update) -> ParsedUpdate | None:
    """The message, edited message or callback query an update carries; None otherwise.

    Messages without text (photos, stickers) use their caption; with neither they are
    None: the channel has nothing to pass on. A callback query without data (a game
    button) or without its message (an inline-mode button) is None too.
    """
    query = update.callback_query
    if query is not None:
        if query.data is None or query.message is None:
            return None
        user = query.from_user
        return ParsedUpdate(
            update_id=update.update_id,
            kind="callback",
            chat_id=query.message.chat.id,
            chat_type=query.message.chat.type,
            user_id=user.id,
            user_name=_name(user.first_name, user.last_name, user.username),
            message_id=query.message.message_id,
            callback_id=query.id,
            callback_data=query.data,
        )
    kind: Literal["message", "edited"]
    if update.message is not None:
        message, kind = update.message, "message"
    elif update.edited_message is not None:
        message, kind = update.edited_message, "edited"
    else:
        return None
    text = message.text if message.text is not None else message.caption
    if not text:
        return None
    sender = message.from_user
    return ParsedUpdate(
        update_id=update.update_id,
        kind=kind,
        chat_id=message.chat.id,
        chat_type=message.chat.type,
        user_id=sender.id if sender else None,
        user_name=_name(sender.first_name, sender.last_name, sender.username) if sender else None,
        text=text,
        message_id=message.message_id,
    )


class RecentUpdates:
    """Run the handling of each ``update_id`` at most once (per process, recent ones).

    :meth:`run_once` runs ``handle`` for an update id not seen before. If the same id
    is being handled right now (Telegram retried a webhook request that is still in
    progress), the second call waits for the first and shares its outcome. If the
    first failed, the id is forgotten, so a later retry runs it again. The last
    ``size`` handled ids are remembered; older duplicates are caught by JetStream's
    duplicate window instead (the message id is derived from the update id).

    Returns True when this call ran ``handle``, False for a duplicate.
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._done: OrderedDict[int, None] = OrderedDict()
        self._running: dict[int, asyncio.Future[None]] = {}

    def seen(self, update_id: int) -> bool:
        return update_id in self._done or update_id in self._running

    async def run_once(self, update_id: int, handle: Callable[[], Awaitable[None]]) -> bool:
        if update_id in self._done:
            return False
        running = self._running.get(update_id)
        if running is not None:
            await asyncio.shield(running)  # raises the first call's error, if any
            return False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._running[update_id] = future
        try:
            await handle()
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        else:
            future.set_result(None)
            self._done[update_id] = None
            if len(self._done) > self.size:
                self._done.popitem(last=False)
        finally:
            del self._running[update_id]
        return True
