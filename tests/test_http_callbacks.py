"""Callback mode against a real receiver: an aiohttp server on 127.0.0.1 that checks each
signature the way docs/http.md tells integrators to, fails the first attempts, and counts
deliveries per message id.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from httpkit import WAIT, base, call, http_channel, reply, wait_event

from commhub.channels.http.callbacks import answer_failure, callback_policy
from commhub.channels.http.channel import HttpSettings
from commhub.core.bus import Bus
from commhub.core.config import Settings
from commhub.core.envelope import ChannelEvent, decode_as
from commhub.core.web import WebServer

SECRET = "callback-secret"
FAST = {"callback_secret": SECRET, "callback_backoff_seconds": 0.01,
        "callback_backoff_max_seconds": 0.05}


@dataclass
class Receiver:
    """A callback receiver. ``fail`` answers the first N attempts of each delivery with
    500; ``status`` overrides every answer."""

    url: str = ""
    fail: int = 0
    status: int | None = None
    delay: float = 0.0
    attempts: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    delivered: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        timestamp = request.headers["X-Commhub-Timestamp"]
        # What docs/http.md shows integrators: HMAC-SHA256 over "timestamp.body".
        expected = "sha256=" + hmac.new(
            SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256
        ).hexdigest()
        if not hmac.compare_digest(expected, request.headers["X-Commhub-Signature"]):
            self.bad_signatures += 1
            return web.Response(status=401)
        if self.delay:
            await asyncio.sleep(self.delay)
        delivery = request.headers["X-Commhub-Delivery"]
        seen = self.attempts[delivery]
        seen.append({"attempt": int(request.headers["X-Commhub-Attempt"]),
                     "body": json.loads(body)})
        self.changed.set()
        if self.status is not None:
            return web.Response(status=self.status)
        if len(seen) <= self.fail:
            return web.Response(status=500)
        if any(d["id"] == delivery for d in self.delivered):
            return web.Response(status=200, text="duplicate, ignored")
        self.delivered.append(json.loads(body))
        return web.Response(status=200)

    async def until(self, count: int) -> None:
        """Wait until ``count`` deliveries succeeded (or any attempts, when status is set)."""
        async with asyncio.timeout(WAIT * 2):
            while len(self.delivered) < count:
                self.changed.clear()
                await self.changed.wait()


@asynccontextmanager
async def receiver(port: int = 0, **kwargs: Any) -> AsyncIterator[Receiver]:
    recv = Receiver(**kwargs)
    server = WebServer("127.0.0.1", port)
    server.add_post("/hook", recv.handle)
    await server.start()
    recv.url = f"{server.url}/hook"
    try:
        yield recv
    finally:
        await server.stop()


def free_port() -> int:
    """A port nothing listens on (yet): connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def channel_events(bus: Bus, kind: str, conversation: str, count: int) -> list[ChannelEvent]:
    """The first ``count`` stored or future ChannelEvents of the HTTP channel of ``kind``
    for ``conversation``."""
    sub = await bus.js.subscribe(bus.subjects.channel_event("http", kind), ordered_consumer=True)
    found: list[ChannelEvent] = []
    try:
        async with asyncio.timeout(WAIT * 3):
            while len(found) < count:
                event = decode_as((await sub.next_msg(timeout=WAIT)).data, ChannelEvent)
                if event.conversation == conversation:
                    found.append(event)
    finally:
        await sub.unsubscribe()
    return found


async def register(channel: Any, conversation: str, url: str) -> None:
    url_of = f"{base(channel)}/v1/conversations/{conversation}/callback"
    status, body, _ = await call("POST", url_of, json_body={"url": url})
    assert (status, body) == (200, {"conversation": conversation, "url": url})


async def test_callbacks_are_signed_retried_and_delivered_once(
    bus: Bus, settings: Settings
) -> None:
    """Each reply is POSTed signed; failed attempts are retried with the same delivery id
    until one succeeds; each message is delivered once, in order; a conversation without
    a callback gets none."""
    async with receiver(fail=2) as recv, http_channel(
        bus, settings, callback_attempts=4, **FAST
    ) as channel:
        await register(channel, "cb1", recv.url)
        status, body, _ = await call("GET", f"{base(channel)}/v1/conversations/cb1/callback")
        assert (status, body["url"]) == (200, recv.url)
        sent = [await reply(bus, "cb1", f"m{i}") for i in range(3)]
        await reply(bus, "cb-none", "nobody listens")
        await recv.until(3)
        marker = await reply(bus, "cb1", "last")
        await recv.until(4)
    assert recv.bad_signatures == 0
    assert [d["id"] for d in recv.delivered] == [m.id for m, _ in [*sent, marker]]
    assert [d["cursor"] for d in recv.delivered] == [c for _, c in [*sent, marker]]
    first = recv.delivered[0]
    assert (first["conversation"], first["text"], first["sender"]["kind"]) == ("cb1", "m0", "bot")
    for message, _ in [*sent, marker]:
        assert [a["attempt"] for a in recv.attempts[message.id]] == [1, 2, 3]
    assert all(a["body"]["conversation"] == "cb1"
               for attempts in recv.attempts.values() for a in attempts)


async def test_a_failed_delivery_is_an_event_and_stays_readable(
    bus: Bus, settings: Settings
) -> None:
    """After the last attempt fails, a delivery_failed ChannelEvent names the message, and
    the GET API still returns it. A 4xx answer is final at once (no retry)."""
    async with receiver(status=500) as down, receiver(status=410) as gone, http_channel(
        bus, settings, callback_attempts=3, **FAST
    ) as channel:
        await register(channel, "cb2", down.url)
        await register(channel, "cb3", gone.url)
        lost, cursor = await reply(bus, "cb2", "are you there?")
        refused, _ = await reply(bus, "cb3", "hello?")
        event = await wait_event(bus, "delivery_failed", conversation="cb2")
        assert lost.id in (event.reason or "") and "HTTP 500" in (event.reason or "")
        assert [a["attempt"] for a in down.attempts[lost.id]] == [1, 2, 3]
        event = await wait_event(bus, "delivery_failed", conversation="cb3")
        assert "HTTP 410" in (event.reason or "") and "1 attempt" in (event.reason or "")
        assert [a["attempt"] for a in gone.attempts[refused.id]] == [1]
        status, page, _ = await call("GET", f"{base(channel)}/v1/conversations/cb2/messages")
        assert status == 200 and [(m["id"], m["cursor"]) for m in page["messages"]] == [
            (lost.id, cursor)]


async def test_deliveries_survive_a_restart(bus: Bus, settings: Settings) -> None:
    """A registration and the replies published while the channel is down outlive it: the
    next channel instance delivers them, once each (also to the configured default URL)."""
    async with receiver() as recv:
        async with http_channel(bus, settings, callback_url=recv.url + "?default=1",
                                **FAST) as channel:
            await register(channel, "cb4", recv.url)
        while_down = [await reply(bus, "cb4", "while you were out"),
                      await reply(bus, "cb5", "to the default URL")]
        async with http_channel(bus, settings, callback_url=recv.url + "?default=1", **FAST):
            await recv.until(2)
            marker = await reply(bus, "cb4", "and then")
            await recv.until(3)
    delivered = sorted(d["id"] for d in recv.delivered)
    assert delivered == sorted(m.id for m, _ in [*while_down, marker])


async def test_registration_needs_callbacks_on_and_a_url(bus: Bus, settings: Settings) -> None:
    """Without callback_secret, registering is 409 callbacks_disabled; a bad URL is 422;
    deleting works once."""
    async with http_channel(bus, settings) as channel:
        status, body, _ = await call("POST", f"{base(channel)}/v1/conversations/x/callback",
                                     json_body={"url": "http://127.0.0.1:9/hook"})
        assert (status, body["error"]["code"]) == (409, "callbacks_disabled")
    async with http_channel(bus, settings, **FAST) as channel:
        url = f"{base(channel)}/v1/conversations/x/callback"
        for bad in ("ftp://example.com/x", "not a url", 5):
            status, body, _ = await call("POST", url, json_body={"url": bad})
            assert (status, body["error"]["code"]) == (422, "invalid")
        await register(channel, "x", "http://127.0.0.1:9/hook")
        assert (await call("DELETE", url))[0] == 204
        status, body, _ = await call("DELETE", url)
        assert (status, body["error"]["code"]) == (404, "not_found")


def test_the_documented_verify_recipe_accepts_commhub_signatures() -> None:
    """The Python recipe in docs/http.md accepts what commhub signs and refuses a changed
    body, another secret and an old timestamp."""
    from commhub.channels.http.callbacks import signature

    text = (Path(__file__).resolve().parent.parent / "docs" / "http.md").read_text()
    recipe = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S)
                  if "def verify" in block)
    namespace: dict[str, Any] = {}
    exec(recipe, namespace)
    verify = namespace["verify"]
    body, timestamp = b'{"id":"m1"}', str(int(time.time()))
    headers = {"X-Commhub-Timestamp": timestamp,
               "X-Commhub-Signature": signature(SECRET, timestamp, body)}
    assert verify(SECRET.encode(), headers, body)
    assert not verify(SECRET.encode(), headers, body + b" ")
    assert not verify(b"another secret", headers, body)
    old = str(int(time.time()) - 3600)
    stale = {"X-Commhub-Timestamp": old, "X-Commhub-Signature": signature(SECRET, old, body)}
    assert not verify(SECRET.encode(), stale, body)


OUTAGE = {"callback_secret": SECRET, "callback_backoff_seconds": 0.01,
          "callback_backoff_max_seconds": 0.1, "callback_retry_seconds": 3600}


async def test_a_receiver_down_for_long_gets_the_callback_once_when_back(
    bus: Bus, settings: Settings
) -> None:
    """A receiver that refuses connections through many more attempts than the old
    six, and through a restart of the channel, gets the callback once when it is back.
    The waits are handed to JetStream (an ``error`` event per wait names the attempt
    and the next try), so the attempt count goes on after the restart."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    async with http_channel(bus, settings, **OUTAGE) as channel:
        await register(channel, "down1", url)
        message, cursor = await reply(bus, "down1", "are you back?")
        before = await channel_events(bus, "error", "down1", 4)
    async with http_channel(bus, settings, **OUTAGE):
        during = await channel_events(bus, "error", "down1", 10)
        async with receiver(port=port) as recv:
            await recv.until(1)
            marker, _ = await reply(bus, "down1", "and this one")
            await recv.until(2)
    assert [d["id"] for d in recv.delivered] == [message.id, marker.id]
    assert len(recv.attempts[message.id]) == 1  # exactly once: no second POST of it
    # The events of both channel instances, in order: the count went on after the restart.
    numbers = [int(re.findall(r"attempt (\d+)", e.reason or "")[0]) for e in during]
    assert numbers == list(range(3, 13))
    assert recv.attempts[message.id][0]["attempt"] > 12 > 6
    first = before[0].reason or ""
    assert first.startswith(f"connection_refused: callback attempt 3 for message {message.id} "
                            f"(cursor {cursor}) failed; next try in")
    assert all(e.connection == message.id for e in during)


async def test_a_delivery_that_fails_for_good_names_how(bus: Bus, settings: Settings) -> None:
    """delivery_failed carries a failure code at the start of its reason, and the HTTP
    status as its code when there was an answer: connection_refused, timeout, http_503
    after the last attempt, http_404 at once."""
    closed = f"http://127.0.0.1:{free_port()}/hook"
    async with receiver(delay=1.0) as slow, receiver(status=503) as busy, \
            receiver(status=404) as missing, http_channel(
                bus, settings, callback_attempts=2, callback_timeout_seconds=0.1, **FAST
            ) as channel:
        for conversation, url in (("f1", closed), ("f2", slow.url), ("f3", busy.url),
                                  ("f4", missing.url)):
            await register(channel, conversation, url)
            await reply(bus, conversation, "hello?")
        refused, = await channel_events(bus, "delivery_failed", "f1", 1)
        timed_out, = await channel_events(bus, "delivery_failed", "f2", 1)
        unavailable, = await channel_events(bus, "delivery_failed", "f3", 1)
        not_found, = await channel_events(bus, "delivery_failed", "f4", 1)
    assert (refused.reason or "").startswith("connection_refused: ") and refused.code is None
    assert (timed_out.reason or "").startswith("timeout: ") and timed_out.code is None
    assert (unavailable.reason or "").startswith("http_503: ") and unavailable.code == 503
    assert "2 attempts" in (unavailable.reason or "")
    assert (not_found.reason or "").startswith("http_404: ") and not_found.code == 404
    assert "1 attempt)" in (not_found.reason or "")


def test_the_default_schedule_retries_for_a_day_with_waits_up_to_ten_minutes() -> None:
    policy = callback_policy(HttpSettings())
    assert (policy.first, policy.cap) == (0.5, 600)
    assert 86400 - 600 < policy.total_wait() <= 86400
    assert callback_policy(HttpSettings(callback_attempts=6)).max_attempts == 6


def test_which_answers_are_retried() -> None:
    assert [answer_failure(s, None).retry for s in (500, 503, 429, 408, 404, 410, 301)] == [
        True, True, True, True, False, False, False]
    assert answer_failure(429, 30.0).after == 30.0
    assert answer_failure(503, 30.0).after is None
    assert answer_failure(503, None).reason == "http_503: HTTP 503"
