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
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from httpkit import WAIT, base, call, http_channel, reply, wait_event

from commhub.core.bus import Bus
from commhub.core.config import Settings
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
async def receiver(**kwargs: Any) -> AsyncIterator[Receiver]:
    recv = Receiver(**kwargs)
    server = WebServer("127.0.0.1", 0)
    server.add_post("/hook", recv.handle)
    await server.start()
    recv.url = f"{server.url}/hook"
    try:
        yield recv
    finally:
        await server.stop()


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
