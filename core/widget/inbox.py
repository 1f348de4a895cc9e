"""The agents' inbox: the conversations waiting for a person, and what an agent does
with one, over HTTP for the ``/inbox`` page.

Routes (mounted by :meth:`Inbox.mount`; every ``/v1/inbox`` call needs an agent token,
:func:`agent_access`):

* ``GET /inbox`` (and its files): the page. It holds no data.
* ``POST /v1/inbox/presence`` ``{"agent", "name"}``: a heartbeat. It puts the agent into
  the ``{prefix}_agents`` bucket (``docs/bus.md``), so the router hands conversations
  over only while someone is there; the page sends one every 10 s while it is open.
  ``POST /v1/inbox/presence/leave`` removes it.
* ``GET /v1/inbox/conversations?version=V&wait=S``: the conversations in a handoff
  state, newest handoff first, each with who took it and the classification that sent
  it there; answers at once, or, given the ``version`` the page has, when it changes
  (a long poll of at most ``S`` seconds).
* ``GET /v1/inbox/conversations/{c}?after=N``: one conversation's messages, both sides
  and every channel, after a cursor, and its classifications; only while it is handed
  over (404 ``not_waiting`` otherwise).
* ``POST /v1/inbox/conversations/{c}/take|messages|release|close``: take it, answer
  (an ``out`` Message with sender kind ``agent`` on ``{prefix}.out.{channel}.{c}``,
  as any agent answers), hand it back to the bot, or close it (both end the handoff
  with a ``handoff.end`` WorkflowInput; its ``data.outcome`` says which).

**Who has a conversation.** Taking is a KV *create* of the key ``{conversation}.{run}``
in the bucket ``{prefix}_inbox_claims``: JetStream applies a create only if the key
does not exist, so of two agents (in any processes) taking the same handoff exactly one
wins and the other gets 409 ``taken``. Answering, handing back and closing need the
claim. The claim names the workflow run, so a later handoff of the same conversation is
a new key. The winner publishes ``handoff.accepted`` (data ``{"agent": name}``) with the
id ``handoff-accepted-<hash of the claim>``: the same on a retry, so JetStream stores
it once, and the widget shows the bot's reply to it as an "agent joined" notice
(``handoff-end-...`` likewise for "left").

**Where the list comes from.** A watch of the conversation states (the KV bucket
``{prefix}_state``, through :class:`~commhub.core.routing.store.StateStore`): every
conversation whose state has ``handoff`` set is listed, and leaves the list when its
handoff ends, whoever ended it (an agent, the user's "cancel", the 60 s timeout). So
every hub process with an HTTP server shows the same list, live, without a database.
The watch (and the buckets) start with the first inbox request of a process, so a hub
whose inbox nobody opens pays nothing for it.

Concurrency: one event loop; the watch task updates a dictionary and wakes long polls
through an :class:`asyncio.Condition`. Failure: a bus error in a request is 503 (the
page retries); the watch recovers from reconnects by itself (an ordered consumer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import nats.errors
from aiohttp import web
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BadRequestError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from commhub.core.aio import cancel_and_wait
from commhub.core.bus import Bus
from commhub.core.config import Settings, is_loopback
from commhub.core.envelope import (
    Classification,
    EnvelopeError,
    Message,
    Sender,
    WorkflowInput,
    decode_as,
    decode_message,
    derived_id,
    new_id,
)
from commhub.core.history import HistoryError, HistoryReader
from commhub.core.routing.store import StateStore
from commhub.core.subjects import valid_id, valid_token
from commhub.core.tokens import BearerAccess
from commhub.core.web import WebServer, json_error
from commhub.core.widget.assets import Assets

__all__ = ["Inbox", "InboxEntry", "agent_access"]

log = logging.getLogger(__name__)

ACCEPTED_PREFIX: Final = "handoff-accepted-"
END_PREFIX: Final = "handoff-end-"
MAX_WAIT: Final = 30.0  # seconds: the longest long poll of the list
MAX_TEXT: Final = 4000  # characters of one agent message
_CLASSIFICATIONS: Final = 20  # most classifications read for one conversation
_PAGE_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class _HandoffView(msgspec.Struct):
    """The part of a conversation's state the inbox reads (see ``decode_view``)."""

    conversation: str
    channel: str | None = None
    user: str | None = None
    workflow: str | None = None
    state: str | None = None
    run_id: str | None = None
    handoff: bool = False
    entered: float = 0.0
    updated: float = 0.0


class Claim(msgspec.Struct):
    """Who took a handoff (the value of a claims bucket key)."""

    agent: str
    name: str
    ts: float


@dataclass
class InboxEntry:
    """One conversation in a handoff state."""

    conversation: str
    channel: str | None
    user: str | None
    workflow: str | None
    state: str | None
    run_id: str | None
    since: float
    claim: Claim | None = None
    reason: dict[str, Any] | None = None
    reasons_read: bool = False
    claim_read: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {
            "conversation": self.conversation, "channel": self.channel, "user": self.user,
            "workflow": self.workflow, "state": self.state, "since": self.since,
            "taken_by": None if self.claim is None else {
                "agent": self.claim.agent, "name": self.claim.name, "at": self.claim.ts},
            "reason": self.reason,
        }


def agent_access(settings: Settings) -> BearerAccess:
    """Who may use the inbox: a bearer token of ``agent_tokens``; with none configured,
    anyone on a loopback hub (unless ``allow_anonymous`` is false), nobody elsewhere.
    The chat channels' tokens and the SQL tokens never grant it."""
    local = is_loopback(settings.host) and settings.allow_anonymous is not False
    return BearerAccess(settings.agent_tokens, local, "the inbox", "agent_tokens")


def _unauthorized(message: str) -> web.Response:
    return json_error(401, message, "unauthorized",
                      headers={"WWW-Authenticate": 'Bearer realm="commhub-inbox"'})


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.response = json_error(status, message, code)


class Inbox:
    """The inbox of one hub process: the list, the claims, the agents' presence."""

    def __init__(self, bus: Bus, settings: Settings) -> None:
        self.bus = bus
        self.settings = settings
        self.subjects = bus.subjects
        self.access = agent_access(settings)
        self.entries: dict[str, InboxEntry] = {}
        self.version = 0
        self._changed = asyncio.Condition()
        self._states = StateStore(bus, cache_size=0)
        self._history = HistoryReader(bus.nc, self.subjects.messages_stream)
        self._claims: KeyValue | None = None
        self._agents: KeyValue | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._watch: Any = None
        self._ready = asyncio.Event()
        self._starting = asyncio.Lock()
        self._started = False
        self._stopped = False

    # -- life cycle -----------------------------------------------------------------------
    async def ensure_started(self) -> None:
        """Start on first use (see :meth:`start`); concurrent first requests wait for
        one start."""
        if self._started:
            return
        async with self._starting:
            if self._stopped:
                raise _Refused(503, "unavailable", "the hub is stopping")
            if not self._started:
                await self.start()
                self._started = True

    async def start(self) -> None:
        """Open the buckets and start watching the states; returns once the current
        states are read."""
        self._claims = await self._bucket(KeyValueConfig(
            bucket=f"{self.subjects.prefix}_inbox_claims",
            description="commhub inbox: which agent took which handoff",
            history=1, storage=StorageType.FILE, replicas=self.bus.replicas))
        self._agents = await self._bucket(KeyValueConfig(
            bucket=self.subjects.agents_bucket, description="commhub human agents' heartbeats",
            history=1, ttl=self.settings.agent_ttl_seconds, storage=StorageType.MEMORY))
        self._watch = await self._states.watch_all(_HandoffView)
        self._tasks.append(asyncio.create_task(self._follow(), name="inbox-watch"))
        async with asyncio.timeout(30):
            await self._ready.wait()

    async def stop(self) -> None:
        self._stopped = True
        if self._watch is not None:
            with contextlib.suppress(Exception):
                await self._watch.stop()
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        await self._history.close()
        async with self._changed:
            self._changed.notify_all()

    async def _bucket(self, config: KeyValueConfig) -> KeyValue:
        assert config.bucket is not None
        try:
            return await self.bus.js.key_value(config.bucket)
        except NotFoundError:
            pass
        try:
            return await self.bus.js.create_key_value(config)
        except BadRequestError:  # made meanwhile by another process
            return await self.bus.js.key_value(config.bucket)

    async def _follow(self) -> None:
        async for item in self._watch:
            if item is None:
                self._ready.set()
                continue
            conversation, view = item
            changed = False
            if view is None or not view.handoff:
                changed = self.entries.pop(conversation, None) is not None
            else:
                entry = self.entries.get(conversation)
                if entry is None or entry.run_id != view.run_id or entry.state != view.state:
                    since = entry.since if entry and entry.run_id == view.run_id else (
                        view.entered or view.updated or time.time())
                    fresh = InboxEntry(conversation, view.channel, view.user, view.workflow,
                                       view.state, view.run_id, since)
                    if entry is not None and entry.run_id == view.run_id:
                        fresh.claim, fresh.reason = entry.claim, entry.reason
                        fresh.reasons_read = entry.reasons_read
                    self.entries[conversation] = fresh
                    changed = True
            if changed:
                await self._bump()

    async def _bump(self) -> None:
        async with self._changed:
            self.version += 1
            self._changed.notify_all()

    # -- routes ---------------------------------------------------------------------------
    def mount(self, web_server: WebServer) -> None:
        assets = Assets()

        async def page(request: web.Request) -> web.Response:
            return assets.response("inbox.html", _PAGE_HEADERS)

        async def page_file(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            if not name.startswith("inbox") or name not in assets.files:
                return json_error(404, f"no such file: {name}", "not_found")
            return assets.response(name, _PAGE_HEADERS)

        web_server.add_get("/inbox", page)
        web_server.add_get("/inbox/{name}", page_file)
        for method, path, handler in (
            ("POST", "/v1/inbox/presence", self._presence),
            ("POST", "/v1/inbox/presence/leave", self._leave),
            ("GET", "/v1/inbox/conversations", self._list),
            ("GET", "/v1/inbox/conversations/{conversation}", self._conversation),
            ("POST", "/v1/inbox/conversations/{conversation}/take", self._take),
            ("POST", "/v1/inbox/conversations/{conversation}/messages", self._answer),
            ("POST", "/v1/inbox/conversations/{conversation}/release", self._release),
            ("POST", "/v1/inbox/conversations/{conversation}/close", self._close),
        ):
            web_server.app.router.add_route(method, path, self._guarded(handler))

    def _guarded(self, handler: Any) -> Any:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            refusal = self.access.check(request.headers.get("Authorization"))
            if refusal is not None:
                if refusal.status == 401:
                    return _unauthorized(refusal.message)
                return json_error(refusal.status, refusal.message, refusal.code)
            try:
                await self.ensure_started()
                return await handler(request)  # type: ignore[no-any-return]
            except _Refused as exc:
                return exc.response
            except (nats.errors.Error, HistoryError, TimeoutError) as exc:
                log.warning("inbox: %s %s failed: %r", request.method, request.path, exc)
                return json_error(503, "the bus is not available; retry", "unavailable")

        return wrapped

    # -- presence -------------------------------------------------------------------------
    async def _presence(self, request: web.Request) -> web.Response:
        body = await _body(request)
        agent, name = _agent(body), _name(body)
        assert self._agents is not None
        capacity = body.get("capacity", 1)
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise _Refused(422, "invalid", "'capacity' must be a whole number >= 0")
        await self._agents.put(agent, msgspec.json.encode(
            {"name": name, "ts": time.time(), "capacity": capacity}))
        return web.json_response({"agent": agent, "ttl": self.settings.agent_ttl_seconds})

    async def _leave(self, request: web.Request) -> web.Response:
        agent = _agent(await _body(request))
        assert self._agents is not None
        with contextlib.suppress(NotFoundError):
            await self._agents.delete(agent)
        return web.json_response({"agent": agent, "present": False})

    # -- reading --------------------------------------------------------------------------
    async def _list(self, request: web.Request) -> web.Response:
        wait = min(_number(request.query.get("wait"), 0.0), MAX_WAIT)
        known = request.query.get("version")
        if wait > 0 and known is not None and known == str(self.version):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait), self._changed:
                    await self._changed.wait_for(lambda: str(self.version) != known)
        entries = sorted(self.entries.values(), key=lambda e: e.since, reverse=True)
        for entry in entries:
            await self._fill(entry)
        return web.json_response({
            "version": self.version,
            "conversations": [entry.public() for entry in entries],
        }, headers={"Cache-Control": "no-store"})

    async def _fill(self, entry: InboxEntry) -> None:
        """Who took it, and the classification that sent it here: read once per entry
        (an entry is made again when the conversation's state changes, as it does when
        the agent who took it is announced)."""
        if entry.run_id is not None and entry.claim is None and not entry.claim_read:
            entry.claim = await self._claim_of(entry.conversation, entry.run_id)
            entry.claim_read = True
        if not entry.reasons_read:
            found = await self._classifications(entry.conversation)
            entry.reason = found[-1] if found else None
            entry.reasons_read = True

    async def _conversation(self, request: web.Request) -> web.Response:
        conversation = _conversation(request)
        if conversation not in self.entries:
            # The inbox shows conversations while they are handed over, no others.
            raise _Refused(404, "not_waiting", "the conversation is not handed over to "
                           "agents (any more)")
        after = int(_number(request.query.get("after"), 0.0))
        subject = f"{self.subjects.prefix}.*.*.{conversation}"
        messages = []
        cursor = after
        async for stored in self._history.read(subject, after):
            cursor = stored.seq
            try:
                message = decode_message(stored.subject, stored.data)
            except EnvelopeError:
                continue
            messages.append(_message_object(stored.seq, message))
        stored_state = await self._states.read(conversation)
        state = None if stored_state is None else stored_state.state
        entry = self.entries.get(conversation)
        if entry is not None:
            await self._fill(entry)
        return web.json_response({
            "conversation": conversation,
            "state": None if state is None else {
                "workflow": state.workflow, "state": state.state, "handoff": state.handoff,
                "channel": state.channel, "user": state.user},
            "waiting": entry.public() if entry is not None else None,
            "messages": messages,
            "cursor": cursor,
            "classifications": await self._classifications(conversation),
        }, headers={"Cache-Control": "no-store"})

    async def _classifications(self, conversation: str) -> list[dict[str, Any]]:
        """The conversation's classifications, oldest first (at most the last 20), read
        from the events stream one stored message at a time (no consumer)."""
        subject = self.subjects.classified(conversation)
        stream = self.subjects.events_stream
        found: list[dict[str, Any]] = []
        seq = 0
        while True:
            try:
                raw = await self.bus.js.get_msg(stream, seq + 1, subject=subject, next=True)
            except NotFoundError:
                break
            seq = int(raw.seq or 0)
            try:
                record = decode_as(raw.data or b"", Classification)
            except Exception:
                continue
            found.append({
                "message_id": record.message_id, "text": record.text,
                "workflow": record.workflow, "decision": record.decision,
                "confidence": record.confidence, "threshold": record.threshold,
                "alternatives": [[a.workflow, a.confidence] for a in record.alternatives],
                "ts": record.ts,
            })
            if not seq:
                break
        return found[-_CLASSIFICATIONS:]

    # -- acting ---------------------------------------------------------------------------
    async def _handoff(self, conversation: str) -> tuple[str, str]:
        """The conversation's channel and handoff run; 409 when it is in no handoff."""
        stored = await self._states.read(conversation)
        state = None if stored is None else stored.state
        if state is None or not state.handoff or state.run_id is None or state.channel is None:
            raise _Refused(409, "not_waiting", "the conversation is not handed over to agents "
                           "(any more)")
        return state.channel, state.run_id

    async def _claim_of(self, conversation: str, run_id: str) -> Claim | None:
        assert self._claims is not None
        try:
            entry = await self._claims.get(f"{conversation}.{run_id}")
        except NotFoundError:
            return None
        if not entry.value:
            return None
        try:
            return msgspec.json.decode(entry.value, type=Claim)
        except msgspec.DecodeError:
            return None

    async def _holder(self, conversation: str, agent: str) -> tuple[str, str, Claim]:
        channel, run_id = await self._handoff(conversation)
        claim = await self._claim_of(conversation, run_id)
        if claim is None or claim.agent != agent:
            holder = "nobody" if claim is None else claim.name
            raise _Refused(409, "not_yours", f"take the conversation first (it is with {holder})")
        return channel, run_id, claim

    async def _take(self, request: web.Request) -> web.Response:
        conversation = _conversation(request)
        body = await _body(request)
        agent, name = _agent(body), _name(body)
        _, run_id = await self._handoff(conversation)
        assert self._claims is not None
        claim = Claim(agent, name, time.time())
        key = f"{conversation}.{run_id}"
        try:
            await self._claims.create(key, msgspec.json.encode(claim))
        except KeyWrongLastSequenceError:
            held = await self._claim_of(conversation, run_id)
            if held is None or held.agent != agent:
                who = held.name if held is not None else "another agent"
                raise _Refused(409, "taken", f"{who} took this conversation first") from None
            claim = held  # taken by this agent already: say so again (a retry)
        accepted = WorkflowInput(
            id=ACCEPTED_PREFIX + derived_id(key, claim.agent),
            conversation=conversation, event="handoff.accepted", data={"agent": claim.name},
            sender=Sender(id=claim.agent, kind="agent", name=claim.name))
        await self.bus.publish(self.subjects.workflow_input(conversation), accepted)
        entry = self.entries.get(conversation)
        if entry is not None and entry.run_id == run_id:
            entry.claim = claim
            await self._bump()
        return web.json_response({"conversation": conversation, "taken_by": {
            "agent": claim.agent, "name": claim.name, "at": claim.ts}})

    async def _answer(self, request: web.Request) -> web.Response:
        conversation = _conversation(request)
        body = await _body(request)
        agent = _agent(body)
        text = body.get("text")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
            raise _Refused(422, "invalid", f"'text' must be 1 to {MAX_TEXT} characters")
        message_id = body.get("id")
        if message_id is None:
            message_id = new_id()
        elif not isinstance(message_id, str) or not valid_id(message_id):
            raise _Refused(422, "invalid", "'id' must be 16-128 letters, digits, - or _")
        channel, _, claim = await self._holder(conversation, agent)
        message = Message(id=message_id, conversation=conversation, channel=channel,
                          direction="out", text=text,
                          sender=Sender(id=claim.agent, kind="agent", name=claim.name))
        ack = await self.bus.publish(self.subjects.outbound(channel, conversation), message)
        return web.json_response({"id": message.id, "cursor": int(ack.seq)}, status=202)

    async def _release(self, request: web.Request) -> web.Response:
        return await self._end(request, "returned")

    async def _close(self, request: web.Request) -> web.Response:
        return await self._end(request, "closed")

    async def _end(self, request: web.Request, outcome: str) -> web.Response:
        conversation = _conversation(request)
        agent = _agent(await _body(request))
        _, run_id, claim = await self._holder(conversation, agent)
        key = f"{conversation}.{run_id}"
        end = WorkflowInput(
            id=END_PREFIX + derived_id(key, "end"),
            conversation=conversation, event="handoff.end",
            data={"outcome": outcome, "agent_id": claim.agent},
            sender=Sender(id=claim.agent, kind="agent", name=claim.name))
        await self.bus.publish(self.subjects.workflow_input(conversation), end)
        return web.json_response({"conversation": conversation, "outcome": outcome})


# -- request parts -----------------------------------------------------------------------
async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = msgspec.json.decode(await request.read())
    except msgspec.DecodeError:
        raise _Refused(400, "bad_json", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _Refused(400, "bad_json", "the body must be a JSON object")
    return body


def _agent(body: dict[str, Any]) -> str:
    agent = body.get("agent")
    if not isinstance(agent, str) or not valid_token(agent) or len(agent) > 64:
        raise _Refused(422, "invalid", "'agent' must be 1-64 letters, digits, - or _")
    return agent


def _name(body: dict[str, Any]) -> str:
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 80:
        raise _Refused(422, "invalid", "'name' must be 1 to 80 characters")
    return name.strip()


def _conversation(request: web.Request) -> str:
    conversation = request.match_info["conversation"]
    if not valid_token(conversation):
        raise _Refused(400, "bad_request", "invalid conversation id")
    return conversation


def _number(raw: str | None, default: float) -> float:
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _Refused(400, "bad_request", f"not a number: {raw[:20]!r}") from None
    if value < 0 or value != value:
        raise _Refused(400, "bad_request", "use a number >= 0")
    return value


def _message_object(cursor: int, message: Message) -> dict[str, Any]:
    sender = message.sender
    return {
        "cursor": cursor, "id": message.id, "direction": message.direction,
        "channel": message.channel, "text": message.text, "payload": message.payload,
        "sender": {"id": sender.id, "kind": sender.kind, "name": sender.name},
        "reply_to": message.reply_to, "ts": message.ts,
    }
