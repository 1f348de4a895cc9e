"""Browsers from other sites: CORS on the HTTP API (preflights answered only for the
origins in ``cors_origins``) and the WebSocket handshake's origin check, on real
servers (aiohttp and websockets on 127.0.0.1, a real nats-server)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from httpkit import ID1
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from commhub.channels.http.channel import HttpChannel, HttpSettings
from commhub.channels.websocket.channel import WebSocketChannel, WebSocketSettings
from commhub.core.bus import Bus
from commhub.core.channel import ChannelContext
from commhub.core.config import Settings, SettingsError, load_settings
from commhub.core.origins import OriginPolicy, OriginVerdict, normalise_origin
from commhub.core.web import WebServer

ALLOWED = "http://shop.example:3000"
OTHER = "http://evil.example"
WAIT = 10


# -- the rule ---------------------------------------------------------------------------
@pytest.mark.parametrize(("origin", "normal"), [
    ("https://Shop.Example", "https://shop.example"),
    ("https://shop.example:443", "https://shop.example"),
    ("http://shop.example:80/", "http://shop.example"),
    ("http://127.0.0.1:3000", "http://127.0.0.1:3000"),
    ("http://[::1]:3000", "http://[::1]:3000"),
    ("null", "null"),
    ("ftp://shop.example", None),
    ("https://shop.example/path", None),
    ("shop.example", None),
    ("https://user@shop.example", None),
    ("http://shop.example:99999", None),
])
def test_normalise_origin(origin: str, normal: str | None) -> None:
    assert normalise_origin(origin) == normal


def test_judge() -> None:
    policy = OriginPolicy(["https://shop.example", "null"], own_ports=[8080])
    judge = policy.judge
    assert judge(None, "hub:8080") is OriginVerdict.NONE
    assert judge("https://shop.example", "hub.example") is OriginVerdict.ALLOWED
    assert judge("https://SHOP.example:443", "hub.example") is OriginVerdict.ALLOWED
    assert judge("http://shop.example", "hub.example") is OriginVerdict.REFUSED  # scheme
    assert judge("https://evil.example", "hub.example") is OriginVerdict.REFUSED
    assert judge("null", "hub.example") is OriginVerdict.ALLOWED
    assert judge("garbage", "hub.example") is OriginVerdict.REFUSED
    # The hub's own pages: the same host and port, or the same host on its HTTP port
    # (a page of the hub opening the WebSocket port).
    assert judge("http://127.0.0.1:8765", "127.0.0.1:8765") is OriginVerdict.SAME_SITE
    assert judge("http://127.0.0.1:8080", "127.0.0.1:8765") is OriginVerdict.SAME_SITE
    assert judge("http://127.0.0.1:9999", "127.0.0.1:8765") is OriginVerdict.REFUSED
    assert judge("https://hub.example", "hub.example") is OriginVerdict.SAME_SITE
    assert judge("http://localhost:8080", "127.0.0.1:8765") is OriginVerdict.REFUSED
    anyone = OriginPolicy(["*"])
    assert anyone.judge("https://whoever.example", "hub") is OriginVerdict.ALLOWED


def test_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMHUB_CORS_ORIGINS", "https://Shop.example, http://127.0.0.1:3000")
    assert load_settings().cors_origins == ["https://shop.example", "http://127.0.0.1:3000"]
    monkeypatch.setenv("COMMHUB_CORS_ORIGINS", "https://shop.example/path")
    with pytest.raises(SettingsError, match=r"cors_origins.*not an origin"):
        load_settings()


# -- on real servers ---------------------------------------------------------------------
@dataclass
class Servers:
    http: str
    ws: str
    http_port: int


@pytest.fixture
async def servers(bus: Bus, settings: Settings) -> AsyncIterator[Servers]:
    """The HTTP and WebSocket channels on one HTTP server with ``cors_origins``."""
    settings = settings.model_copy(update={"cors_origins": [ALLOWED]})
    web = WebServer("127.0.0.1", 0, origins=settings.origin_policy())
    port = web.bind()
    http = HttpChannel(ChannelContext("http", bus, settings, web), HttpSettings())
    ws = WebSocketChannel(ChannelContext("websocket", bus, settings, web), WebSocketSettings())
    await http.start()
    await ws.start()
    await web.start()
    try:
        yield Servers(web.url, f"ws://127.0.0.1:{ws.port}/ws", port)
    finally:
        await ws.stop()
        await http.stop()
        for channel in (ws, http):
            await channel.ctx.close()
        await web.stop()


async def request(method: str, url: str, headers: dict[str, str],
                  body: object = None) -> tuple[int, dict[str, str], object]:
    timeout = aiohttp.ClientTimeout(total=WAIT)
    data = json.dumps(body).encode() if body is not None else None
    async with aiohttp.ClientSession(timeout=timeout) as client, client.request(
        method, url, headers=headers, data=data
    ) as response:
        raw = await response.read()
        return response.status, dict(response.headers), json.loads(raw) if raw else None


async def test_preflight_allowed_and_refused(servers: Servers) -> None:
    url = f"{servers.http}/v1/conversations/o1/messages"
    asking = {"Access-Control-Request-Method": "POST",
              "Access-Control-Request-Headers": "content-type, authorization"}
    status, headers, _ = await request("OPTIONS", url, {"Origin": ALLOWED, **asking})
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    assert "Origin" in headers["Vary"]
    status, headers, body = await request("OPTIONS", url, {"Origin": OTHER, **asking})
    assert status == 403
    assert "Access-Control-Allow-Origin" not in headers
    assert isinstance(body, dict) and body["error"]["code"] == "origin_not_allowed"
    # OPTIONS that is not a preflight is what it was: not a method of the API.
    status, _, _ = await request("OPTIONS", url, {})
    assert status == 405


async def test_requests_carry_cors_headers_only_for_allowed_origins(servers: Servers) -> None:
    url = f"{servers.http}/v1/conversations/o2/messages"
    post = {"Origin": ALLOWED, "Content-Type": "application/json"}
    status, headers, _ = await request("POST", url, post, {"id": ID1, "text": "hi"})
    assert status == 202
    assert headers["Access-Control-Allow-Origin"] == ALLOWED
    status, headers, _ = await request("GET", url, {"Origin": ALLOWED})
    assert (status, headers["Access-Control-Allow-Origin"]) == (200, ALLOWED)
    # Errors carry them too, so the page can read why.
    status, headers, _ = await request("GET", f"{url}?after=x", {"Origin": ALLOWED})
    assert (status, headers["Access-Control-Allow-Origin"]) == (400, ALLOWED)
    # Event streams: the headers are on the stream's answer.
    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with aiohttp.ClientSession(timeout=timeout) as client, client.get(
        f"{servers.http}/v1/conversations/o2/events", headers={"Origin": ALLOWED}
    ) as response:
        assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    # Another site's page is refused outright; a script without Origin is not a page.
    status, headers, body = await request("POST", url, {**post, "Origin": OTHER},
                                          {"text": "hi"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    assert isinstance(body, dict) and body["error"]["code"] == "origin_not_allowed"
    status, headers, _ = await request("GET", url, {})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    # The hub's own pages: same host and port, no CORS headers needed.
    own = f"http://127.0.0.1:{servers.http_port}"
    status, headers, _ = await request("GET", url, {"Origin": own})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    # Public paths answer any page.
    status, _, _ = await request("GET", f"{servers.http}/healthz", {"Origin": OTHER})
    assert status != 403


async def test_websocket_handshake_checks_the_origin(servers: Servers) -> None:
    url = f"{servers.ws}?conversation=o3&user=ann"
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, origin=OTHER)  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    assert b"origin_not_allowed" in refused.value.response.body
    for origin in (ALLOWED, f"http://127.0.0.1:{servers.http_port}", None):
        async with connect(url, origin=origin) as ws:  # type: ignore[arg-type]
            hello = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            assert hello["event"] == "connected", origin
