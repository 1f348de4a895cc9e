"""The hub's HTTP server: health, readiness, JSON errors, body limit, signed WebSocket tokens."""

from __future__ import annotations

import json
import socket
from typing import Any

import aiohttp
import pytest
from inproc import ws_port
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from commhub.core.config import Settings
from commhub.core.hub import Hub
from commhub.core.tokens import mint
from commhub.core.web import WebServer


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.json()


async def test_health_and_readiness(hub: Hub) -> None:
    assert hub.web is not None
    assert await get(f"{hub.web.url}/healthz") == (200, {"status": "ok", "role": "all"})
    status, body = await get(f"{hub.web.url}/readyz")
    assert status == 200 and body["status"] == "ready" and "websocket" in body["channels"]


async def test_unknown_path_and_wrong_method_are_json_errors(hub: Hub) -> None:
    assert hub.web is not None
    status, body = await get(f"{hub.web.url}/no/such/thing")
    assert status == 404 and body["error"]["code"] == "not_found"
    assert "/no/such/thing" in body["error"]["message"]
    async with aiohttp.ClientSession() as http, http.post(f"{hub.web.url}/healthz") as r:
        assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"
        assert "GET" in r.headers["Allow"]


async def test_oversize_body_gets_413_json() -> None:
    """A body over max_body_bytes is refused by the server itself, as JSON."""
    server = WebServer("127.0.0.1", 0, max_body_bytes=1024)

    async def echo(request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"size": len(await request.read())})

    server.add_post("/echo", echo)
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server.url}/echo", data=b"x" * 1000) as small:
                assert small.status == 200 and (await small.json()) == {"size": 1000}
            async with http.post(f"{server.url}/echo", data=b"x" * 5000) as big:
                body = await big.json()
                assert big.status == 413 and body["error"]["code"] == "too_large"
                assert "1024" in body["error"]["message"]
    finally:
        await server.stop()


async def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: .*"
                           "to use another port set COMMHUB_HTTP_PORT"):
            WebServer("127.0.0.1", port).bind()


@pytest.fixture
def signed_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"token_secret": SecretStr("web-secret"), "allow_anonymous": False}
    )


async def test_websocket_accepts_a_signed_token_as_its_user(signed_settings: Settings) -> None:
    hub = Hub(signed_settings)
    await hub.start()
    try:
        base = f"ws://127.0.0.1:{ws_port(hub)}/ws?conversation=c1"
        token = mint("web-secret", "alice", 60)
        async with connect(f"{base}&token={token}") as ws:
            first = json.loads(await ws.recv())
            assert first["type"] == "event" and first["user"] == "alice"
        async with connect(f"{base}&user=bob&token={token}") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                4401, "token is for another user"
            )
    finally:
        await hub.stop()
