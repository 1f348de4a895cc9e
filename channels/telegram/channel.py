"""The built-in Telegram channel: a Telegram bot carries conversations onto the bus.

Off unless a bot token is configured (``COMMHUB_TELEGRAM_TOKEN`` or ``token`` in
``[plugins.telegram]``): ``start()`` then only says so. With a token it uses
python-telegram-bot's :class:`telegram.Bot` as a typed Bot API client (not its
``Application`` framework) against ``api_url`` (Telegram's, or a local fake in tests).
The user's guide is ``docs/telegram.md``.

Inbound, in one of two modes:

* **polling**: one task long-polls ``getUpdates``. Each batch is published (one chat's
  updates in order, chats concurrently), then the next offset is stored in the
  channel's KV bucket before the next poll confirms the batch to Telegram, so a
  restart continues after the last published update instead of fetching it again.
  A bus failure retries the same batch with backoff; nothing is confirmed unpublished.
* **webhook**: ``setWebhook`` with a ``secret_token`` at start, and
  ``POST {webhook_path}`` on the hub's HTTP server. A request without the header gets
  401, with a wrong one 403 (compared in constant time), both as JSON errors. A good
  one is published durably *before* the 200 answer (one JetStream round trip, about a
  millisecond); if the bus cannot take it the answer is 503 and Telegram retries later.
  Everything slower (``answerCallbackQuery``) runs after the answer.

Every update becomes at most one inbound Message whose id is derived from the bot id
and ``update_id`` (:func:`~commhub.channels.telegram.updates.message_id_for`): a
webhook retry or a polling overlap is skipped by :class:`RecentUpdates` in this
process and, failing that, dropped by JetStream's duplicate window, so it never
yields a second reply. Conversation ids are ``tg-<chat id>`` (``tg-m<n>`` for
negative ids). Text messages, captions, edited messages (``edited_messages``) and
button presses (callback queries, answered with ``answerCallbackQuery`` every time)
are passed on; other updates are confirmed and skipped.

Outbound: :meth:`ChannelContext.deliver_outbound` (the hub's
:class:`~commhub.core.delivery.DeliveryLoop`, durable ``{prefix}_telegram_out``) reads
every reply for Telegram durably, one chat's replies in order, and
:func:`~commhub.channels.telegram.send.send_reply` sends it: split at 4,096 UTF-16
units, paced per chat and per bot, 429s honoured, network errors and 5xx retried,
403/400 reported as ``delivery_failed`` events.

Concurrency and failure: ``start`` and ``stop`` run from the hub's task; the poller,
the webhook handlers, the outbound workers and the callback answers run as tasks of
their own. ``stop`` ends polling, waits ``stop_grace`` seconds for replies being sent,
cancels the rest (handed back unacked: sent by the next start or another instance)
and closes the HTTP client. An error in one update or one reply is logged and
reported, never fatal to the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from commhub.channels.telegram.pacing import Backoff, Pacer
from commhub.channels.telegram.text import TELEGRAM_TEXT_LIMIT, split_text
from commhub.channels.telegram.updates import (
    ParsedUpdate,
    RecentUpdates,
    callback_data_for,
    chat_id_of,
    conversation_id,
    message_id_for,
    parse_callback_data,
    parse_update,
)
from commhub.core.aio import cancel_and_wait
from commhub.core.channel import Channel, ChannelContext
from commhub.core.delivery import Delivery, DeliveryLoop
from commhub.core.envelope import Message, Sender
from commhub.core.hookspecs import hookimpl
from commhub.core.retry import RetryPolicy
from commhub.core.tokens import Identity
from commhub.core.web import json_error

if TYPE_CHECKING:
    # python-telegram-bot (with httpx, about 0.1 s of CPU) is imported when the channel
    # starts with a token, not with the plugin: it loads with every hub, mostly off.
    from telegram import Bot, Update

__all__ = ["TelegramChannel", "TelegramSettings", "register_channels", "SECRET_HEADER"]

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")  # what setWebhook accepts
# Shown for a reply that has buttons but no text (Telegram refuses an empty message).
BUTTONS_ONLY_TEXT = "Please choose:"
# Attempts at a reply whose handling keeps failing for a reason other than the Bot API
# (which send_reply retries without limit); with the default backoff, about an hour.
OUTBOUND_ATTEMPTS = 60


class TelegramSettings(BaseSettings):
    """``[plugins.telegram]``, and ``COMMHUB_TELEGRAM_*`` in the environment.

    The environment beats the file's table, as for the hub's own settings.
    """

    model_config = SettingsConfigDict(env_prefix="COMMHUB_TELEGRAM_", extra="forbid")

    token: SecretStr | None = Field(
        default=None, description="The bot token from @BotFather; unset: the channel is off."
    )
    api_url: str = Field(
        default="https://api.telegram.org",
        description="Bot API base URL (methods are at {api_url}/bot{token}/{method}).",
    )
    mode: Literal["polling", "webhook"] = Field(
        default="polling", description="How updates arrive.",
    )
    webhook_url: str | None = Field(
        default=None,
        description="Public URL Telegram calls in webhook mode; default: the hub's own "
        "HTTP URL plus webhook_path (reachable only from a local Bot API server or a tunnel).",
    )
    webhook_path: str = Field(default="/telegram/webhook", pattern=r"^/[A-Za-z0-9_/.-]*$")
    webhook_secret: SecretStr | None = Field(
        default=None, description="secret_token for setWebhook; required in webhook mode."
    )
    edited_messages: bool = Field(
        default=True, description="Pass edited messages on as new messages.",
    )
    poll_timeout: int = Field(
        default=30, ge=0, le=600, description="Seconds a getUpdates long poll waits.",
    )
    poll_limit: int = Field(
        default=100, ge=1, le=100, description="Updates fetched per getUpdates.",
    )
    chat_rate: float = Field(
        default=1.0, gt=0, description="Messages a second to one chat, on average.",
    )
    chat_burst: int = Field(default=3, ge=1, description="Messages to one chat sent at once.")
    global_rate: float = Field(
        default=30.0, gt=0, description="Messages a second for the whole bot.",
    )
    global_burst: int = Field(default=30, ge=1)
    retry_base: float = Field(
        default=1.0, gt=0, description="First backoff after a network error or 5xx.",
    )
    retry_max: float = Field(default=60.0, gt=0, description="Longest backoff between retries.")
    request_timeout: float = Field(
        default=10.0, gt=0, description="Seconds one Bot API request may take.",
    )
    max_in_flight: int = Field(default=256, ge=1, description="Replies held for sending at once.")
    ack_wait: float = Field(
        default=60.0, ge=1, description="JetStream ack wait of the outbound consumer.",
    )
    stop_grace: float = Field(default=5.0, ge=0, description="Seconds stop() lets replies finish.")

    @model_validator(mode="after")
    def _webhook_needs_secret(self) -> TelegramSettings:
        if self.token is not None and self.mode == "webhook":
            secret = self.webhook_secret.get_secret_value() if self.webhook_secret else ""
            if not _SECRET_RE.match(secret):
                raise ValueError(
                    "webhook mode needs webhook_secret (COMMHUB_TELEGRAM_WEBHOOK_SECRET): "
                    "1-256 letters, digits, '_' or '-'"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The hub passes the config file's table as keyword arguments; the environment
        # comes first so that it beats the file, like every other commhub setting.
        return (env_settings, init_settings)


class TelegramChannel(Channel):
    """A Telegram bot as a channel. After :meth:`start`, ``bot_id`` and ``username`` are set."""

    name = "telegram"
    Settings = TelegramSettings

    def __init__(self, ctx: ChannelContext, settings: BaseModel | None = None) -> None:
        if settings is None:
            settings = TelegramSettings()
        elif not isinstance(settings, TelegramSettings):
            raise TypeError(f"expected TelegramSettings, got {type(settings).__name__}")
        super().__init__(ctx, settings)
        self.config: TelegramSettings = settings
        self.bot: Bot | None = None
        self.bot_id = 0
        self.username = ""
        self.recent = RecentUpdates()
        self.pacer = Pacer(
            settings.chat_rate, settings.chat_burst, settings.global_rate, settings.global_burst
        )
        self.backoff = Backoff(settings.retry_base, settings.retry_max)
        self._kv: KeyValue | None = None
        self._outbound: DeliveryLoop[Message] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> list[str]:
        """Connect the bot (``getMe``), start the outbound consumer, then polling or webhook.

        Raises if the Bot API refuses the token or cannot be reached: a configured
        channel that cannot work stops the hub's start with the reason.
        """
        cfg = self.config
        if cfg.token is None:
            return ["telegram: off (set COMMHUB_TELEGRAM_TOKEN to enable)"]
        from commhub.channels.telegram.send import make_bot

        api = cfg.api_url.rstrip("/")
        self.bot = make_bot(cfg.token.get_secret_value(), api, cfg.request_timeout)
        try:
            return await self._connect(api)
        except BaseException:
            await self.stop()  # the hub only stops channels whose start returned
            raise

    async def _connect(self, api: str) -> list[str]:
        from telegram.error import InvalidToken, TelegramError

        assert self.bot is not None
        cfg = self.config
        try:
            await self.bot.initialize()  # getMe
        except InvalidToken as exc:
            raise RuntimeError(f"telegram: the Bot API at {api} refuses the token: {exc}") from None
        except TelegramError as exc:
            raise RuntimeError(f"telegram: cannot reach the Bot API at {api}: {exc}") from None
        self.bot_id = self.bot.id
        self.username = self.bot.username
        self._kv = await self.ctx.bus.js.create_key_value(
            KeyValueConfig(
                bucket=f"{self.ctx.subjects.prefix}_{self.name}",
                description="commhub Telegram channel: polling offset, long button payloads",
                history=1,
                storage=StorageType.FILE,
                replicas=self.ctx.bus.replicas,
                direct=True,
            )
        )
        # send_reply retries the Bot API's passing failures itself, for as long as it
        # takes; what reaches the loop is anything else (the KV bucket of long button
        # payloads failing), retried with the same backoff, and given up after a while.
        self._outbound = await self.ctx.deliver_outbound(
            self._deliver,
            policy=RetryPolicy(first=cfg.retry_base, cap=max(cfg.retry_max, cfg.retry_base),
                               in_place_attempts=3, max_attempts=OUTBOUND_ATTEMPTS),
            max_in_flight=cfg.max_in_flight,
            ack_wait=cfg.ack_wait,
        )
        if cfg.mode == "polling":
            # getUpdates answers 409 while a webhook is set (an earlier webhook run).
            await self.bot.delete_webhook(drop_pending_updates=False)
            offset = await self._load_offset()
            self._poller = asyncio.create_task(self._poll(offset), name="telegram-poll")
            return [f"telegram: @{self.username} by long polling {api}"]
        self.ctx.web.add_post(cfg.webhook_path, self._webhook)
        url = cfg.webhook_url or f"{self.ctx.web.url}{cfg.webhook_path}"
        await self.bot.set_webhook(
            url, secret_token=self._secret, allowed_updates=self._allowed_updates(),
            drop_pending_updates=False,
        )
        return [f"telegram: @{self.username} by webhook {url} (secret token checked)"]

    async def stop(self) -> None:
        """Stop polling, let replies in progress finish (``stop_grace``), close the client."""
        if self._poller is not None:
            await cancel_and_wait(self._poller)  # re-cancels a swallowed cancel
            self._poller = None
        if self._outbound is not None:
            await self._outbound.stop(grace=self.config.stop_grace)
            self._outbound = None
        if self._background:
            _, pending = await asyncio.wait(self._background, timeout=self.config.stop_grace)
            await cancel_and_wait(*pending)
        if self.bot is not None:
            with contextlib.suppress(Exception):
                await self.bot.shutdown()
            self.bot = None

    def _allowed_updates(self) -> list[str]:
        kinds = ["message", "callback_query"]
        if self.config.edited_messages:
            kinds.append("edited_message")
        return kinds

    # -- polling ------------------------------------------------------------------------
    def _offset_key(self) -> str:
        return f"offset_{self.bot_id}"

    async def _load_offset(self) -> int | None:
        assert self._kv is not None
        try:
            entry = await self._kv.get(self._offset_key())
        except KeyNotFoundError:
            return None
        return int(entry.value or b"0") or None

    async def _poll(self, offset: int | None) -> None:
        """Long-poll until cancelled. Failures back off and retry; none ends the loop."""
        from telegram.error import Conflict

        assert self.bot is not None
        failures = 0
        conflict_reported = False
        while True:
            try:
                updates = await self.bot.get_updates(
                    offset=offset, limit=self.config.poll_limit,
                    timeout=self.config.poll_timeout, allowed_updates=self._allowed_updates(),
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = self.backoff.delay(failures - 1)
                if isinstance(exc, Conflict) and not conflict_reported:
                    # Another poller on this token, or a webhook set by someone else.
                    conflict_reported = True
                    await self.ctx.publish_event("error", reason=f"getUpdates: {exc}", code=409)
                log.warning("telegram: getUpdates failed (%r); retry in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            if not updates:
                continue
            while True:
                try:
                    await self._handle_batch(updates)
                    offset = max(u.update_id for u in updates) + 1
                    assert self._kv is not None
                    await self._kv.put(self._offset_key(), str(offset).encode())
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failures += 1
                    delay = self.backoff.delay(failures - 1)
                    log.warning("telegram: storing updates failed (%r); retry in %.1f s",
                                exc, delay)
                    await asyncio.sleep(delay)
            failures = 0

    async def _handle_batch(self, updates: Sequence[Update]) -> None:
        """One chat's updates in order; different chats concurrently. Raises if any failed."""
        by_chat: dict[int | None, list[Update]] = defaultdict(list)
        for update in updates:
            chat = update.effective_chat
            by_chat[chat.id if chat else None].append(update)

        async def one_chat(chat_updates: list[Update]) -> None:
            for update in chat_updates:
                await self._handle_update(update)

        results = await asyncio.gather(
            *(one_chat(u) for u in by_chat.values()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # -- webhook ------------------------------------------------------------------------
    async def _webhook(self, request: web.Request) -> web.StreamResponse:
        """Check the secret, store the update durably, answer 200 (or 503 to be retried)."""
        given = request.headers.get(SECRET_HEADER)
        if given is None:
            await self.ctx.publish_event("rejected", reason="webhook: no secret token", code=401)
            return json_error(401, f"missing {SECRET_HEADER}")
        if not hmac.compare_digest(given.encode(), self._secret.encode()):
            await self.ctx.publish_event("rejected", reason="webhook: wrong secret token", code=403)
            return json_error(403, f"wrong {SECRET_HEADER}")
        from telegram import Update

        body = await request.read()
        try:
            update = Update.de_json(_json_object(body), self.bot)
        except Exception as exc:
            await self.ctx.bus.publish_invalid(
                f"http:{self.config.webhook_path}", body, f"not a Telegram update: {exc!r}",
                f"channel:{self.name}",
            )
            return json_error(400, "not a Telegram update")
        try:
            await self._handle_update(update)
        except Exception as exc:
            log.warning("telegram webhook: could not store update %s: %r", update.update_id, exc)
            return json_error(503, "could not store the update; retry later")
        return web.json_response({"ok": True})

    # -- one update ---------------------------------------------------------------------
    async def _handle_update(self, update: Update) -> None:
        """Publish the update's message once; raise if the bus did not take it."""
        parsed = parse_update(update)
        if parsed is None:
            return
        if parsed.kind == "edited" and not self.config.edited_messages:
            return
        await self.recent.run_once(parsed.update_id, lambda: self._publish(parsed))

    async def _publish(self, parsed: ParsedUpdate) -> None:
        payload: dict[str, Any] | None = None
        if parsed.kind == "callback":
            assert parsed.callback_data is not None and parsed.callback_id is not None
            payload = await self._button_payload(parsed.callback_data)
            if payload is None:
                self._spawn(self._answer(parsed.callback_id, "This button has expired."))
                return
        meta: dict[str, Any] = {
            "telegram": {
                "update_id": parsed.update_id,
                "message_id": parsed.message_id,
                "chat_type": parsed.chat_type,
                "kind": parsed.kind,
            }
        }
        message = Message(
            id=message_id_for(self.bot_id, parsed.update_id),
            conversation=conversation_id(parsed.chat_id),
            channel=self.name,
            direction="in",
            sender=Sender(
                id=str(parsed.user_id if parsed.user_id is not None else parsed.chat_id),
                kind="user",
                name=parsed.user_name,
            ),
            text=parsed.text,
            payload=payload,
            meta=meta,
        )
        # The conversation is derived from the chat id, so on Telegram it is owned by
        # construction. Recording the chat as its owner keeps clients of other
        # channels, which could name the same id, out of it; the chat itself is
        # always let in (the id comes from Telegram, not from a client).
        chat = message.conversation
        await self.ctx.claim_conversation(chat, chat, Identity("channel", chat, chat))
        await self.ctx.publish_inbound(message)
        if parsed.callback_id is not None:
            # Stops the client's spinner; after the message is stored, so a failure
            # to store leaves the query for the retry to answer.
            self._spawn(self._answer(parsed.callback_id, None))

    async def _button_payload(self, data: str) -> dict[str, Any] | None:
        kind, value = parse_callback_data(data)
        if kind == "payload":
            assert isinstance(value, dict)
            return value
        assert self._kv is not None
        try:
            entry = await self._kv.get(f"button_{value}")
        except KeyNotFoundError:
            return None
        stored = _json_object(entry.value or b"")
        return stored

    async def _answer(self, callback_id: str, text: str | None) -> None:
        from telegram.error import TelegramError

        assert self.bot is not None
        try:
            await self.bot.answer_callback_query(callback_id, text=text)
        except TelegramError as exc:  # too old, or Telegram unreachable: nothing to redo
            log.info("telegram: answerCallbackQuery %s failed: %s", callback_id, exc.message)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- outbound -----------------------------------------------------------------------
    async def _deliver(self, delivery: Delivery[Message]) -> None:
        """Send one reply; report a definitive failure as a ``delivery_failed`` event.

        Returns once the reply was sent or failed for good (the loop then acks it);
        waits out 429s and retries network errors and 5xx meanwhile.
        """
        assert self.bot is not None
        message = delivery.record
        chat_id = chat_id_of(message.conversation)
        if chat_id is None:
            await self.ctx.publish_event(
                "delivery_failed", conversation=message.conversation, code=400,
                reason=f"not a Telegram conversation: {message.conversation!r} "
                "(expected tg-<chat id>)",
            )
            return
        buttons = await self._buttons(message.payload)
        text = message.text or ""
        parts = split_text(text, TELEGRAM_TEXT_LIMIT)
        if not parts:
            if not buttons:
                return  # nothing Telegram could show (an empty reply)
            parts = [BUTTONS_ONLY_TEXT]
        from commhub.channels.telegram.send import keyboard, send_reply

        result = await send_reply(
            self.bot, chat_id, parts, keyboard(buttons), self.pacer, self.backoff
        )
        if not result.ok:
            log.info("telegram: reply %s to chat %s failed: %s", message.id, chat_id, result.reason)
            await self.ctx.publish_event(
                "delivery_failed", conversation=message.conversation, code=result.code,
                reason=f"{result.reason} (message {message.id}, {result.parts} of "
                f"{len(parts)} parts sent)",
            )

    async def _buttons(self, payload: dict[str, Any] | None) -> list[tuple[str, str]]:
        """``(title, callback_data)`` for the payload's buttons and quick replies.

        Payloads too long for ``callback_data`` are stored in the KV bucket first.
        """
        found: list[tuple[str, str]] = []
        for key in ("buttons", "quick_replies"):
            items = (payload or {}).get(key)
            if not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    continue
                title = str(item.get("title") or "")
                value = item.get("payload")
                if not title:
                    continue
                if not isinstance(value, dict):
                    value = {"value": value if value is not None else title}
                data, stored = callback_data_for(value)
                if stored is not None:
                    assert self._kv is not None
                    await self._kv.put(data.replace("h:", "button_", 1), stored.encode())
                found.append((title, data))
        return found


def _json_object(body: bytes) -> dict[str, Any]:
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


@hookimpl
def register_channels(register: Callable[[type], None]) -> None:
    """Contribute the Telegram channel, exactly as an outside plugin would."""
    register(TelegramChannel)
