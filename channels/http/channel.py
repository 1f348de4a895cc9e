"""The built-in HTTP channel: a native JSON API, a Rasa-compatible REST endpoint, callbacks.

It serves on the hub's HTTP server (``ctx.web``, aiohttp; see ``core/web.py`` for why),
so it adds routes in :meth:`HttpChannel.start` and owns no socket. The protocol is in
``docs/http.md``; the parts:

* :mod:`~commhub.channels.http.api`: ``/v1/conversations/{c}/messages`` (post; read after
  a cursor with a long poll), ``/v1/conversations/{c}/events`` (server-sent events),
  ``/v1/conversations/{c}/callback`` (register a callback URL);
* :mod:`~commhub.channels.http.rasa` and :mod:`~commhub.channels.http.turn`:
  ``POST /webhooks/rest/webhook``, Rasa's REST channel, answering the replies of the
  turn;
* :mod:`~commhub.channels.http.callbacks`: replies POSTed to a registered URL, signed,
  retried, durable across restarts;
* :mod:`~commhub.channels.http.request`: auth, validation and the JSON error shape.

Concurrency and failure: each request runs in its own task; reads share the channel's
one live consumer (:meth:`ChannelContext.outbound`); nothing a request does blocks
another. A refused request (bad token, another user's conversation, bad input, a body
over ``max_body_bytes``) is a JSON error and a ChannelEvent (``rejected`` for tokens and
owners, ``error`` otherwise); an exception in a handler is a 500 from the hub's server,
never a crash. ``stop()`` answers long polls and Rasa turns in flight with what they
have, ends event streams, and stops the callback deliverer (a delivery still unfinished
is handed back unacked, so it is retried after the restart).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from commhub.channels.http.api import NativeApi
from commhub.channels.http.callbacks import CallbackStore, Deliverer
from commhub.channels.http.rasa import parse_request, rasa_replies
from commhub.channels.http.request import (
    ApiError,
    Handler,
    api_handler,
    authorize,
    read_json_object,
)
from commhub.channels.http.turn import run_turn
from commhub.core.channel import Channel, ChannelContext
from commhub.core.envelope import ChannelEventKind, EnvelopeError, Message, Sender, new_id
from commhub.core.hookspecs import hookimpl
from commhub.core.owners import FORBIDDEN_CODE, FORBIDDEN_MESSAGE, ConversationForbidden
from commhub.core.ratelimit import TokenBucket
from commhub.core.tokens import Identity

__all__ = ["HttpChannel", "HttpSettings", "RASA_WEBHOOK", "register_channels"]

log = logging.getLogger(__name__)

RASA_WEBHOOK = "/webhooks/rest/webhook"
_MAX_BUCKETS = 100_000  # rate-limit state for this many recent conversations, at most
# The conversation a request's body named (Rasa), for the event of its refusal.
_BODY_CONVERSATION = web.RequestKey("commhub_conversation", str)


class HttpSettings(BaseModel):
    """``[plugins.http]``: waits, limits and callbacks (host, port, tokens and the body
    size limit are the hub's: ``host``, ``http_port``, ``tokens``, ``max_body_bytes``)."""

    model_config = ConfigDict(extra="forbid")

    max_wait_seconds: float = Field(
        default=60.0, ge=0, description="Longest long poll a client may ask for (?wait=)."
    )
    default_limit: int = Field(default=100, ge=1, description="Messages per GET by default.")
    max_limit: int = Field(default=1000, ge=1, description="Most messages one GET returns.")
    backlog_timeout_seconds: float = Field(
        default=5.0, gt=0,
        description="How long a GET waits for a message already stored (a safety net).",
    )
    rest_wait_seconds: float = Field(
        default=10.0, gt=0,
        description="Longest the Rasa endpoint waits for the replies of a turn.",
    )
    sse_keepalive_seconds: float = Field(
        default=15.0, gt=0, description="Seconds between keepalive comments on event streams."
    )
    sse_max_queue: int = Field(
        default=256, ge=1,
        description="Messages waiting for one event stream before it is ended (resume with "
        "Last-Event-ID).",
    )
    max_messages_per_second: float = Field(
        default=20.0, gt=0,
        description="Average messages a second one conversation may post (native and Rasa).",
    )
    rate_burst: int = Field(
        default=40, ge=1, description="Messages a conversation may post at once."
    )
    callback_url: str | None = Field(
        default=None,
        description="Callback URL for every conversation without one of its own.",
    )
    callback_secret: SecretStr | None = Field(
        default=None,
        description="Signs callbacks (HMAC-SHA256). Unset: callbacks are off.",
    )
    callback_retry_seconds: float = Field(
        default=86400.0, ge=0,
        description="How long a failing callback is retried before it fails for good.",
    )
    callback_attempts: int | None = Field(
        default=None, ge=1,
        description="At most this many attempts per callback (unset: as many as fit in "
        "callback_retry_seconds).",
    )
    callback_backoff_seconds: float = Field(
        default=0.5, gt=0, description="Wait before the second attempt; doubles each time."
    )
    callback_backoff_max_seconds: float = Field(
        default=600.0, gt=0, description="Longest wait between attempts."
    )
    callback_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Time limit of one callback POST."
    )
    callback_concurrency: int = Field(
        default=64, ge=1, description="Callback messages held (fetched, not yet acked) at once."
    )

    @model_validator(mode="after")
    def _callbacks_need_a_secret(self) -> HttpSettings:
        if self.callback_url is not None and self.callback_secret is None:
            raise ValueError("callback_url needs callback_secret (callbacks are signed)")
        if self.default_limit > self.max_limit:
            raise ValueError("default_limit must not exceed max_limit")
        return self


class HttpChannel(Channel):
    """Serves the native API and the Rasa endpoint on the hub's HTTP server, and
    delivers callbacks. See the module docstring for the contract."""

    name = "http"
    Settings = HttpSettings

    def __init__(self, ctx: ChannelContext, settings: BaseModel | None = None) -> None:
        if settings is None:
            settings = HttpSettings()
        elif not isinstance(settings, HttpSettings):
            raise TypeError(f"expected HttpSettings, got {type(settings).__name__}")
        super().__init__(ctx, settings)
        self.config: HttpSettings = settings
        self.stopping = asyncio.Event()
        self.handler: Callable[[Handler], Handler] = api_handler(self._refused)
        self.deliverer: Deliverer | None = None
        self._store: CallbackStore | None = None
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> list[str]:
        """Mount the routes and, when ``callback_secret`` is set, start delivering
        callbacks; return the endpoint lines."""
        web_server = self.ctx.web
        web_server.add_routes([
            *NativeApi(self).routes(),
            web.post(RASA_WEBHOOK, self.handler(self._rasa)),
        ])
        secret = self.config.callback_secret
        lines = []
        if secret is not None:
            self._store = CallbackStore(self.ctx)
            await self._store.open()
            self.deliverer = Deliverer(self.ctx, self._store, self.config,
                                       secret.get_secret_value())
            await self.deliverer.start()
            lines.append(f"{self.name}: callbacks on (signed; durable {self.deliverer.durable})")
        hub = self.ctx.hub_settings
        rule = "token required" if not hub.anonymous_allowed else "anonymous clients allowed"
        url = web_server.url
        return [
            f"{self.name}: {url}/v1/conversations/ID/messages ({rule}); "
            f"Rasa REST: {url}{RASA_WEBHOOK}",
            *lines,
        ]

    async def stop(self) -> None:
        """End long polls, turns and event streams in flight; stop the deliverer."""
        self.stopping.set()
        if self.deliverer is not None:
            await self.deliverer.stop()
            self.deliverer = None

    def callback_store(self) -> CallbackStore:
        if self._store is None:
            raise ApiError(409, "callbacks_disabled",
                           "callbacks are off: set [plugins.http] callback_secret")
        return self._store

    # -- shared by the handlers -------------------------------------------------------------
    def check_rate(self, conversation: str) -> None:
        """Refuse a post over the conversation's rate with 429 and ``Retry-After``.

        One token bucket per conversation (like one per WebSocket connection), kept for
        the most recently active ``_MAX_BUCKETS`` conversations; handlers run on one
        event loop, so the dictionary needs no lock.
        """
        bucket = self._buckets.pop(conversation, None) or TokenBucket(
            self.config.max_messages_per_second, self.config.rate_burst
        )
        self._buckets[conversation] = bucket  # most recent last
        if len(self._buckets) > _MAX_BUCKETS:
            self._buckets.popitem(last=False)
        if not bucket.take():
            wait = max(1, math.ceil(1 / self.config.max_messages_per_second))
            raise ApiError(429, "rate_limited",
                           f"over {self.config.max_messages_per_second:g} messages a second "
                           "for this conversation; retry later with the same id",
                           {"Retry-After": str(wait)})

    async def enter(self, conversation: str, user: str, identity: Identity) -> None:
        """Let the request into ``conversation`` (see ``ctx.claim_conversation``): 403
        ``forbidden`` when it belongs to another user, 503 when the owners record cannot
        be reached (retry)."""
        try:
            await self.ctx.claim_conversation(conversation, user, identity)
        except ConversationForbidden:
            raise ApiError(403, FORBIDDEN_CODE, FORBIDDEN_MESSAGE) from None
        except Exception as exc:
            log.warning("http: owner check failed: %r", exc)
            raise ApiError(503, "unavailable",
                           "the hub could not check the conversation; retry") from exc

    async def publish(self, message: Message, request: web.Request) -> int:
        """Store a user's message; a bus failure is 503 (retry with the same id)."""
        try:
            return await self.ctx.publish_inbound(message)
        except EnvelopeError as exc:  # the bus contract: bad input, nothing stored
            raise ApiError(422, "invalid", str(exc)) from None
        except Exception as exc:
            log.warning("http: publish failed: %r", exc)
            raise ApiError(503, "unavailable",
                           "the hub could not store the message; retry with the same id") from exc

    async def _refused(self, request: web.Request, error: ApiError) -> None:
        """Record a refused request: ``rejected`` for auth and another user's
        conversation, ``error`` for the rest."""
        kind: ChannelEventKind = "rejected" if error.status in (401, 403) else "error"
        # The path names it, or the Rasa body did (kept on the request by _rasa).
        conversation = request.match_info.get("conversation") or request.get(_BODY_CONVERSATION)
        await self.ctx.publish_event(
            kind, connection=new_id()[:16],
            conversation=conversation if conversation and len(conversation) <= 128 else None,
            reason=f"{error.code}: {error.message} ({request.method} {request.path[:200]})",
            code=error.status,
        )

    # -- Rasa REST --------------------------------------------------------------------------
    async def _rasa(self, request: web.Request) -> web.Response:
        """Rasa's ``POST /webhooks/rest/webhook``: the replies of this turn as a list."""
        authorize(self.ctx.tokens, request, user=None, conversation=None)  # before the body
        rasa = parse_request(await read_json_object(request), request.query.get("wait"))
        request[_BODY_CONVERSATION] = rasa.conversation
        identity = authorize(self.ctx.tokens, request, user=rasa.user,
                             conversation=rasa.conversation)
        await self.enter(rasa.conversation, rasa.user, identity)
        self.check_rate(rasa.conversation)
        meta: dict[str, Any] = {"rasa_sender": rasa.sender}
        if rasa.metadata is not None:
            meta["metadata"] = rasa.metadata
        message = Message(
            id=new_id(),
            conversation=rasa.conversation,
            channel=self.name,
            direction="in",
            sender=Sender(id=rasa.user, kind="user"),
            text=rasa.text,
            payload=rasa.payload,
            meta=meta,
        )
        try:
            follow = min(rasa.wait or 0.0, self.config.max_wait_seconds)
            turn = await run_turn(self.ctx, message, max(self.config.rest_wait_seconds, follow),
                                  self.stopping, follow=follow)
        except EnvelopeError as exc:  # the bus contract: bad input, nothing stored
            raise ApiError(422, "invalid", str(exc)) from None
        except Exception as exc:
            log.warning("http: rasa turn failed: %r", exc)
            raise ApiError(503, "unavailable", "the hub could not store the message") from exc
        return web.json_response(rasa_replies(rasa.sender, turn.replies))


@hookimpl
def register_channels(register: Callable[[type], None]) -> None:
    """Contribute the HTTP channel, exactly as an outside plugin would."""
    register(HttpChannel)
