"""Send one reply to one chat: split it, pace it, retry what can be retried.

:func:`send_reply` sends the parts of a reply in order (the inline keyboard goes on the
last part) and returns a :class:`Delivery` saying whether it was delivered or failed
for good. What each Bot API answer leads to:

=====================================  ==============================================
answer                                 what happens
=====================================  ==============================================
200                                    next part
429 with ``retry_after``               the chat waits that long (the pacer holds its
                                       next slot), then the same part is sent again;
                                       not counted as a failure
5xx, a dropped connection, a timeout   retried with exponential backoff (``base``,
                                       doubling, capped at ``cap``, with jitter),
                                       without limit: nothing is lost
401/404 (token revoked)                logged and retried with backoff like a network
                                       error, so the reply goes out once fixed
403 (user blocked the bot, kicked)     failed for good: ``Delivery(ok=False, 403)``
400 (chat not found, bad text...)      failed for good: ``Delivery(ok=False, 400)``
=====================================  ==============================================

A timeout may hide a message that did arrive; the retry then sends it twice. That is
the one way a reply can be doubled, and it needs the Bot API to accept a request and
then not answer it.

Concurrency: one call per chat at a time keeps a chat's parts and replies in order;
calls for different chats run concurrently and share the :class:`Pacer`. Cancelling
a call stops it between or during requests; the parts already sent stay sent.
"""

from __future__ import annotations

import asyncio
import datetime as dtm
import json
import logging
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Forbidden,
    InvalidToken,
    RetryAfter,
    TelegramError,
)
from telegram.request import HTTPXRequest
from telegram.warnings import PTBDeprecationWarning

# Backoff lives with the pacing (no python-telegram-bot import); re-exported here.
from commhub.channels.telegram.pacing import Backoff, Pacer

__all__ = [
    "Backoff",
    "Delivery",
    "FloodWait",
    "FloodAwareRequest",
    "keyboard",
    "make_bot",
    "retry_after_seconds",
    "send_reply",
]

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class Delivery:
    """How sending one reply ended. ``parts`` is how many parts went out."""

    ok: bool
    parts: int
    code: int | None = None
    reason: str | None = None


class FloodWait(TelegramError):
    """Telegram's flood control: wait ``seconds`` before the next request to that chat."""

    def __init__(self, seconds: float, description: str) -> None:
        super().__init__(description)
        self.seconds = seconds


class FloodAwareRequest(HTTPXRequest):
    """python-telegram-bot's HTTP transport, with ``retry_after`` answers read here.

    python-telegram-bot 22 builds its ``RetryAfter`` by reading its own deprecated
    ``retry_after`` attribute, which warns (PTBDeprecationWarning) on every 429. This
    transport recognises an error answer that carries ``parameters.retry_after`` and
    raises :class:`FloodWait` with the seconds as a float instead, before the library
    parses it; every other answer goes through unchanged. (A ``TelegramError`` raised
    here passes through the library's error handling as it is.)
    """

    async def do_request(self, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        code, payload = await super().do_request(*args, **kwargs)
        if code >= 400 and b"retry_after" in payload:
            try:
                body = json.loads(payload)
                seconds = float(body["parameters"]["retry_after"])
            except (ValueError, KeyError, TypeError):
                return code, payload  # not the shape we know: the library decides
            raise FloodWait(seconds, str(body.get("description") or "Too Many Requests"))
        return code, payload


def make_bot(token: str, api_url: str, timeout: float = 10.0, pool: int = 64) -> Bot:
    """A :class:`telegram.Bot` for ``api_url`` (``https://api.telegram.org`` or a fake).

    Sends to many chats run at once over up to ``pool`` connections; waiting for a free
    connection is pacing, not an error, hence no pool timeout. ``getUpdates`` has its
    own connection, so a long poll never holds up a reply.
    """
    api = api_url.rstrip("/")
    return Bot(
        token,
        base_url=f"{api}/bot",
        base_file_url=f"{api}/file/bot",
        request=FloodAwareRequest(
            connection_pool_size=pool, read_timeout=timeout, write_timeout=timeout,
            connect_timeout=timeout, pool_timeout=None,
        ),
        get_updates_request=FloodAwareRequest(
            connection_pool_size=1, read_timeout=timeout, connect_timeout=timeout
        ),
    )


def retry_after_seconds(exc: RetryAfter) -> float:
    """``retry_after`` in seconds, whichever type this python-telegram-bot gives.

    Only a fallback: :class:`FloodAwareRequest` turns 429s into :class:`FloodWait`
    first. python-telegram-bot 22 warns (PTBDeprecationWarning) when the attribute is
    read as an int while it migrates to ``timedelta``; the value is the same either
    way, so the warning is silenced here, for this one read.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = exc.retry_after
    if isinstance(value, dtm.timedelta):
        return value.total_seconds()
    return float(value)


def keyboard(buttons: Sequence[tuple[str, str]]) -> InlineKeyboardMarkup | None:
    """An inline keyboard with one button a row, from ``(title, callback_data)`` pairs."""
    if not buttons:
        return None
    return InlineKeyboardMarkup(
        [[InlineKeyboardButton(title, callback_data=data)] for title, data in buttons]
    )


async def send_reply(
    bot: Bot,
    chat_id: int,
    parts: Sequence[str],
    markup: InlineKeyboardMarkup | None,
    pacer: Pacer,
    backoff: Backoff,
    *,
    sleep: Sleep = asyncio.sleep,
) -> Delivery:
    """Send ``parts`` to ``chat_id`` in order; ``markup`` rides on the last part.

    Returns once every part was accepted, or at the first definitive refusal (403,
    400); retries everything else (see the module docstring).
    """
    for index, text in enumerate(parts):
        last = index == len(parts) - 1
        attempt = 0
        while True:
            wait = pacer.reserve(chat_id)
            if wait > 0:
                await sleep(wait)
            try:
                await bot.send_message(chat_id, text, reply_markup=markup if last else None)
                break
            except (FloodWait, RetryAfter) as exc:
                seconds = exc.seconds if isinstance(exc, FloodWait) else retry_after_seconds(exc)
                log.info("telegram: 429 for chat %s; retrying after %.1f s", chat_id, seconds)
                pacer.penalize(chat_id, seconds)
            except Forbidden as exc:
                return Delivery(False, index, 403, f"forbidden: {exc.message}")
            except ChatMigrated as exc:
                return Delivery(
                    False, index, 400, f"chat migrated to {exc.new_chat_id}: resend there"
                )
            except BadRequest as exc:
                return Delivery(False, index, 400, f"bad request: {exc.message}")
            except InvalidToken as exc:
                log.error("telegram: the Bot API refuses the token (%s); retrying", exc.message)
                await sleep(backoff.delay(attempt))
                attempt += 1
            except TelegramError as exc:  # NetworkError, TimedOut, 5xx, anything unknown
                delay = backoff.delay(attempt)
                log.warning("telegram: sending to chat %s failed (%s); retry in %.1f s",
                            chat_id, exc.message, delay)
                await sleep(delay)
                attempt += 1
    return Delivery(True, len(parts))
