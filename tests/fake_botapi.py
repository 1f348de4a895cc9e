"""A local fake of Telegram's Bot API, faithful enough that a real client cannot tell.

:class:`FakeBotAPI` serves ``/bot<token>/<method>`` on 127.0.0.1 (a free port) with
aiohttp and answers like ``api.telegram.org``:

* every answer is ``{"ok": true, "result": ...}`` or ``{"ok": false, "error_code": N,
  "description": "...", "parameters": {...}}`` with HTTP status ``N``; an unknown token
  gets 401 ``Unauthorized``, an unknown method 404 ``Not Found``;
* parameters come as a query string, a form (what python-telegram-bot sends, with JSON
  encoded values) or a JSON body;
* updates are complete objects (``message`` with ``message_id``, ``from`` with
  ``is_bot`` and ``first_name``, ``chat`` with ``type``, ``date``; ``callback_query``
  with ``id``, ``from``, ``chat_instance``, ``message``, ``data``), because clients
  reject the partial samples of the docs;
* ``getUpdates`` honours ``offset`` (confirms everything before it), ``limit``,
  ``timeout`` (a long poll that returns as soon as an update arrives) and
  ``allowed_updates``; a newer ``getUpdates`` ends a pending older one with 409
  ``Conflict: terminated by other getUpdates request``, and while a webhook is set it
  answers 409 too;
* ``setWebhook`` (``url``, ``secret_token``, ``allowed_updates``) makes it POST each
  update to the URL with ``X-Telegram-Bot-Api-Secret-Token``, one at a time and in
  order, retrying after ``webhook_retry_delay`` until the answer is 2xx, like Telegram.
  Unlike Telegram, plain ``http://`` URLs are accepted (as a local Bot API server does);
* ``sendMessage`` checks what Telegram checks (known chat, blocked user 403, empty text,
  more than 4,096 UTF-16 units, ``callback_data`` over 64 bytes) and records the sent
  message; ``answerCallbackQuery`` refuses unknown or already answered queries.

Test controls: :meth:`FakeBotAPI.fail_next` (the next K calls of a method get an error,
e.g. 429 with ``retry_after``, 502, 403), :meth:`FakeBotAPI.drop_next` (the connection
closes without an answer: a network error), :meth:`FakeBotAPI.block`, and helpers that
make a user write (:meth:`user_says`), press a button (:meth:`press`), edit a message
(:meth:`edit`), or deliver one update twice (:meth:`push` with ``times=2``).

It runs in the test's event loop; every method is called from that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["FakeBotAPI", "Call"]

TOKEN = "7000001:AAFakeTokenForCommhubTests_0123456789"
SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
INT_PARAMS = {"offset", "limit", "timeout", "max_connections", "message_id", "cache_time"}
BOOL_PARAMS = {"drop_pending_updates", "show_alert", "disable_notification"}
JSON_PARAMS = {"reply_markup", "allowed_updates", "link_preview_options", "entities"}
UPDATE_KINDS = ("message", "edited_message", "callback_query")


@dataclass
class Call:
    """One request the fake answered: method, decoded parameters, HTTP status."""

    method: str
    params: dict[str, Any]
    status: int = 200


@dataclass
class _Failure:
    status: int
    description: str
    retry_after: int | None = None
    drop: bool = False


class ApiError(Exception):
    def __init__(self, status: int, description: str, parameters: dict[str, Any] | None = None):
        super().__init__(description)
        self.status = status
        self.description = description
        self.parameters = parameters


@dataclass
class _Poll:
    """A pending getUpdates long poll."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    superseded: bool = False


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


class FakeBotAPI:
    """The fake server. ``await start()``; then ``api_url`` is the Bot API base URL."""

    def __init__(
        self,
        token: str = TOKEN,
        *,
        bot_name: str = "commhub test bot",
        username: str = "commhub_test_bot",
        webhook_retry_delay: float = 0.05,
    ) -> None:
        self.token = token
        self.bot_id = int(token.split(":", 1)[0])
        self.bot_user = {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": bot_name,
            "username": username,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }
        self.webhook_retry_delay = webhook_retry_delay
        self.calls: list[Call] = []
        self.sent: dict[int, list[dict[str, Any]]] = {}
        self.answered: list[dict[str, Any]] = []
        self.webhook_deliveries: list[tuple[int, int]] = []  # (update_id, HTTP status)
        self.blocked: set[int] = set()
        self.webhook: dict[str, Any] | None = None
        self._pending: list[dict[str, Any]] = []  # updates not confirmed yet, in order
        self._update_ids = itertools.count(500_000_001)
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._query_ids = itertools.count(4_000_000_000_001)
        self._open_queries: dict[str, dict[str, Any]] = {}
        self._chats: dict[int, dict[str, Any]] = {}
        self._users: dict[int, dict[str, Any]] = {}
        self._failures: dict[str, deque[_Failure]] = {}
        self._allowed: list[str] | None = None
        self._poll: _Poll | None = None
        self._changed = asyncio.Condition()
        self._new_update = asyncio.Event()
        self._deliverer: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    # -- server ---------------------------------------------------------------------------
    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self._session = aiohttp.ClientSession()
        return self.api_url

    async def stop(self) -> None:
        await self._stop_deliverer()
        if self._poll is not None:
            self._poll.superseded = True
            self._poll.wake.set()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeBotAPI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- test controls ----------------------------------------------------------------------
    def fail_next(
        self,
        method: str,
        status: int,
        count: int = 1,
        *,
        retry_after: int | None = None,
        description: str | None = None,
    ) -> None:
        """The next ``count`` calls of ``method`` get error ``status`` (429: retry_after)."""
        if description is None:
            description = {
                429: f"Too Many Requests: retry after {retry_after}",
                403: "Forbidden: bot was blocked by the user",
                500: "Internal Server Error",
                502: "Bad Gateway",
                503: "Service Unavailable",
            }.get(status, f"Error {status}")
        queue = self._failures.setdefault(method, deque())
        for _ in range(count):
            queue.append(_Failure(status, description, retry_after))

    def drop_next(self, method: str, count: int = 1) -> None:
        """The next ``count`` calls of ``method`` lose their connection, unanswered."""
        queue = self._failures.setdefault(method, deque())
        for _ in range(count):
            queue.append(_Failure(0, "", drop=True))

    def block(self, chat_id: int) -> None:
        """The user of private chat ``chat_id`` blocked the bot: sendMessage gets 403."""
        self.blocked.add(chat_id)

    def user_says(
        self,
        chat_id: int,
        text: str,
        *,
        user_id: int | None = None,
        first_name: str = "Ann",
        times: int = 1,
    ) -> dict[str, Any]:
        """A user writes ``text`` in chat ``chat_id`` (private when positive); queued."""
        user = self._user(user_id if user_id is not None else abs(chat_id), first_name)
        chat = self._chat(chat_id, user)
        message: dict[str, Any] = {
            "message_id": self._next_message_id(chat_id),
            "from": user,
            "chat": chat,
            "date": int(time.time()),
            "text": text,
        }
        if text.startswith("/"):
            command = text.split()[0]
            message["entities"] = [
                {"offset": 0, "length": _utf16_len(command), "type": "bot_command"}
            ]
        return self.push({"update_id": next(self._update_ids), "message": message}, times=times)

    def edit(self, chat_id: int, message_id: int, text: str) -> dict[str, Any]:
        """The user edits their message ``message_id`` to ``text``; queued."""
        chat = self._chats[chat_id]
        user = self._users[abs(chat_id)] if chat["type"] == "private" else self._any_user()
        now = int(time.time())
        edited = {
            "message_id": message_id,
            "from": user,
            "chat": chat,
            "date": now - 1,
            "edit_date": now,
            "text": text,
        }
        return self.push({"update_id": next(self._update_ids), "edited_message": edited})

    def press(
        self, chat_id: int, title: str, *, times: int = 1, user_id: int | None = None
    ) -> dict[str, Any]:
        """The user presses the button titled ``title`` on the bot's latest message that
        has it; queued as a callback query carrying that button's ``callback_data``."""
        for sent in reversed(self.sent.get(chat_id, [])):
            rows = (sent.get("reply_markup") or {}).get("inline_keyboard", [])
            for button in (b for row in rows for b in row):
                if button.get("text") == title:
                    user = self._users[user_id if user_id is not None else abs(chat_id)]
                    query_id = str(next(self._query_ids))
                    query = {
                        "id": query_id,
                        "from": user,
                        "message": sent,
                        "chat_instance": str(-(abs(chat_id) * 7919 % 10**18)),
                        "data": button["callback_data"],
                    }
                    self._open_queries[query_id] = query
                    update = {"update_id": next(self._update_ids), "callback_query": query}
                    return self.push(update, times=times)
        raise AssertionError(f"no button {title!r} in chat {chat_id}: {self.texts(chat_id)}")

    def push(self, update: dict[str, Any], times: int = 1) -> dict[str, Any]:
        """Queue ``update`` ``times`` times (2: the same update_id delivered twice)."""
        for _ in range(times):
            self._pending.append(update)
        self._new_update.set()
        if self._poll is not None:
            self._poll.wake.set()
        return update

    def texts(self, chat_id: int) -> list[str]:
        """The texts the bot sent to ``chat_id``, in order."""
        return [m["text"] for m in self.sent.get(chat_id, [])]

    def calls_of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    @property
    def polling(self) -> bool:
        """True while a getUpdates long poll is waiting."""
        return self._poll is not None

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        """Wait until ``predicate()`` holds (checked after every request the fake answers)."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(predicate)

    async def wait_sent(self, chat_id: int, count: int, timeout: float = 15.0) -> list[str]:
        """Wait until the bot sent ``count`` messages to ``chat_id``; return their texts."""
        try:
            await self.wait_until(lambda: len(self.sent.get(chat_id, [])) >= count, timeout)
        except TimeoutError:
            raise AssertionError(
                f"chat {chat_id}: expected {count} messages, got {self.texts(chat_id)}"
            ) from None
        return self.texts(chat_id)

    # -- objects ----------------------------------------------------------------------------
    def _user(self, user_id: int, first_name: str) -> dict[str, Any]:
        user = self._users.get(user_id)
        if user is None:
            user = self._users[user_id] = {
                "id": user_id,
                "is_bot": False,
                "first_name": first_name,
                "username": f"{first_name.lower()}{user_id}",
                "language_code": "en",
            }
        return user

    def _any_user(self) -> dict[str, Any]:
        return next(iter(self._users.values()))

    def _chat(self, chat_id: int, user: dict[str, Any]) -> dict[str, Any]:
        chat = self._chats.get(chat_id)
        if chat is None:
            if chat_id > 0:
                chat = {
                    "id": chat_id,
                    "type": "private",
                    "first_name": user["first_name"],
                    "username": user["username"],
                }
            else:
                chat = {"id": chat_id, "type": "supergroup", "title": f"group {chat_id}"}
            self._chats[chat_id] = chat
        return chat

    def _next_message_id(self, chat_id: int) -> int:
        counter = self._message_ids.setdefault(chat_id, itertools.count(1))
        return next(counter)

    # -- HTTP -----------------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        params = await _params(request)
        call = Call(method, params)
        self.calls.append(call)
        try:
            if request.match_info["token"] != self.token:
                raise ApiError(401, "Unauthorized")
            failure = self._take_failure(method)
            if failure is not None and failure.drop:
                assert request.transport is not None
                request.transport.close()  # the client sees the connection drop
                call.status = 0
                return web.Response()
            if failure is not None:
                parameters = (
                    {"retry_after": failure.retry_after} if failure.retry_after else None
                )
                raise ApiError(failure.status, failure.description, parameters)
            handler = getattr(self, f"_api_{method.lower()}", None)
            if handler is None:
                raise ApiError(404, "Not Found")
            result = await handler(params)
        except ApiError as exc:
            call.status = exc.status
            body: dict[str, Any] = {
                "ok": False, "error_code": exc.status, "description": exc.description
            }
            if exc.parameters:
                body["parameters"] = exc.parameters
            response = web.json_response(body, status=exc.status)
        else:
            response = web.json_response({"ok": True, "result": result})
        await self._notify()
        return response

    def _take_failure(self, method: str) -> _Failure | None:
        queue = self._failures.get(method)
        return queue.popleft() if queue else None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- methods --------------------------------------------------------------------------------
    async def _api_getme(self, params: dict[str, Any]) -> Any:
        return self.bot_user

    async def _api_close(self, params: dict[str, Any]) -> Any:
        return True

    async def _api_getupdates(self, params: dict[str, Any]) -> Any:
        if self.webhook is not None:
            raise ApiError(
                409,
                "Conflict: can't use getUpdates method while webhook is active; "
                "use deleteWebhook to delete the webhook first",
            )
        if self._poll is not None:  # a newer poll ends the older one
            self._poll.superseded = True
            self._poll.wake.set()
        poll = self._poll = _Poll()
        offset = params.get("offset")
        limit = max(1, min(100, int(params.get("limit", 100))))
        timeout = max(0, int(params.get("timeout", 0)))
        if "allowed_updates" in params:
            self._allowed = list(params["allowed_updates"]) or None
        if offset is not None:
            self._confirm(int(offset))
        deadline = asyncio.get_running_loop().time() + timeout
        await self._notify()  # tests may wait for a poll to be pending
        try:
            while True:
                batch = self._deliverable(limit)
                remaining = deadline - asyncio.get_running_loop().time()
                if batch or remaining <= 0:
                    return batch
                poll.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(poll.wake.wait(), remaining)
                if poll.superseded:
                    raise ApiError(
                        409,
                        "Conflict: terminated by other getUpdates request; make sure that "
                        "only one bot instance is running",
                    )
        finally:
            if self._poll is poll:
                self._poll = None

    def _confirm(self, offset: int) -> None:
        self._pending = [u for u in self._pending if u["update_id"] >= offset]

    def _deliverable(self, limit: int) -> list[dict[str, Any]]:
        allowed = self._allowed or ["message", "edited_message", "callback_query"]
        # Updates of kinds not asked for are never delivered: Telegram drops them.
        self._pending = [u for u in self._pending if any(k in u for k in allowed)]
        return list(self._pending[:limit])

    async def _api_setwebhook(self, params: dict[str, Any]) -> Any:
        url = params.get("url")
        if url is None:
            raise ApiError(400, "Bad Request: parameter \"url\" is required")
        secret = params.get("secret_token")
        if secret is not None and not SECRET_RE.match(secret):
            raise ApiError(400, "Bad Request: secret token contains unallowed characters")
        if params.get("drop_pending_updates"):
            self._pending.clear()
        if "allowed_updates" in params:
            self._allowed = list(params["allowed_updates"]) or None
        await self._stop_deliverer()
        if not url:
            self.webhook = None
            return True
        self.webhook = {"url": url, "secret_token": secret}
        if self._poll is not None:
            self._poll.superseded = True
            self._poll.wake.set()
        self._deliverer = asyncio.create_task(self._deliver_webhooks(url, secret))
        return True

    async def _api_deletewebhook(self, params: dict[str, Any]) -> Any:
        await self._stop_deliverer()
        self.webhook = None
        if params.get("drop_pending_updates"):
            self._pending.clear()
        return True

    async def _api_getwebhookinfo(self, params: dict[str, Any]) -> Any:
        info: dict[str, Any] = {
            "url": self.webhook["url"] if self.webhook else "",
            "has_custom_certificate": False,
            "pending_update_count": len(self._pending),
            "max_connections": 40,
        }
        if self._allowed:
            info["allowed_updates"] = self._allowed
        return info

    async def _stop_deliverer(self) -> None:
        task, self._deliverer = self._deliverer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _deliver_webhooks(self, url: str, secret: str | None) -> None:
        """POST pending updates in order, one at a time; retry each until 2xx."""
        assert self._session is not None
        headers = {"Content-Type": "application/json"}
        if secret:
            headers["X-Telegram-Bot-Api-Secret-Token"] = secret
        while True:
            batch = self._deliverable(1)
            if not batch:
                self._new_update.clear()
                await self._new_update.wait()
                continue
            update = batch[0]
            try:
                async with self._session.post(
                    url, data=json.dumps(update), headers=headers,
                    timeout=aiohttp.ClientTimeout(total=10),
                ) as response:
                    status = response.status
                    await response.read()
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            self.webhook_deliveries.append((update["update_id"], status))
            if 200 <= status < 300:
                if self._pending and self._pending[0] is update:
                    self._pending.pop(0)
            else:
                await asyncio.sleep(self.webhook_retry_delay)
            await self._notify()

    async def _api_sendmessage(self, params: dict[str, Any]) -> Any:
        chat_id = params.get("chat_id")
        chat = self._chats.get(chat_id) if isinstance(chat_id, int) else None
        if chat is None or not isinstance(chat_id, int):
            raise ApiError(400, "Bad Request: chat not found")
        if chat_id in self.blocked:
            raise ApiError(403, "Forbidden: bot was blocked by the user")
        text = params.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        if _utf16_len(text) > 4096:
            raise ApiError(400, "Bad Request: message is too long")
        markup = params.get("reply_markup")
        if markup is not None:
            for row in markup.get("inline_keyboard", []):
                for button in row:
                    data = button.get("callback_data")
                    if data is not None and not 1 <= len(data.encode()) <= 64:
                        raise ApiError(400, "Bad Request: BUTTON_DATA_INVALID")
        message: dict[str, Any] = {
            "message_id": self._next_message_id(chat_id),
            "from": self.bot_user,
            "chat": chat,
            "date": int(time.time()),
            "text": text,
        }
        if markup is not None:
            message["reply_markup"] = markup
        self.sent.setdefault(chat_id, []).append(message)
        return message

    async def _api_answercallbackquery(self, params: dict[str, Any]) -> Any:
        query_id = str(params.get("callback_query_id"))
        if self._open_queries.pop(query_id, None) is None:
            raise ApiError(
                400,
                "Bad Request: query is too old and response timeout expired or query ID is "
                "invalid",
            )
        self.answered.append(params)
        return True


async def _params(request: web.Request) -> dict[str, Any]:
    raw: dict[str, Any] = dict(request.query)
    if request.content_type == "application/json":
        body = await request.json()
        if isinstance(body, dict):
            raw.update(body)
    elif request.can_read_body:
        form = await request.post()
        raw.update({k: v for k, v in form.items() if isinstance(v, str)})
    params: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, str):
            if key in INT_PARAMS:
                value = int(value)
            elif key in BOOL_PARAMS:
                value = value.lower() == "true"
            elif key in JSON_PARAMS:
                value = json.loads(value)
            elif key == "chat_id" and value.lstrip("-").isdigit():
                value = int(value)
        params[key] = value
    return params
