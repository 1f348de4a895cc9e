"""The widget's routes on a whole hub in this process: the script, the demo page and the
configuration the script fetches."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from inproc import ws_port

from commhub.core.config import Settings
from commhub.core.hub import Hub

PAGE = "http://shop.example:3000"


@pytest.fixture
async def hub(settings: Settings) -> AsyncIterator[Hub]:
    hub = Hub(settings.model_copy(update={"cors_origins": [PAGE]}))
    await hub.start()
    yield hub
    await hub.stop()


async def get(url: str, headers: dict[str, str] | None = None
              ) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as client, client.get(url, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def test_script_page_and_config(hub: Hub) -> None:
    assert hub.web is not None
    base = hub.web.url
    status, headers, body = await get(f"{base}/widget.js", {"Origin": "http://any.example"})
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"commhub chat widget" in body
    status, headers, body = await get(f"{base}/chat")
    assert status == 200 and b'src="/widget.js"' in body
    assert "connect-src 'self' ws: wss:" in headers["Content-Security-Policy"]
    status, headers, _ = await get(f"{base}/chat/chat.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css")
    assert (await get(f"{base}/chat/widget.js"))[0] == 404
    status, headers, body = await get(f"{base}/v1/widget", {"Origin": PAGE})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == PAGE
    assert body == (b'{"ws_url": "ws://127.0.0.1:%d/ws", "anonymous": true}' % ws_port(hub))
    status, _, _ = await get(f"{base}/v1/widget", {"Origin": "http://evil.example"})
    assert status == 403
    assert any(line.startswith("widget: ") for line in hub.endpoints)


async def test_configured_websocket_url(settings: Settings) -> None:
    hub = Hub(settings.model_copy(update={"widget_ws_url": "wss://chat.example/ws"}))
    await hub.start()
    try:
        assert hub.web is not None
        status, _, body = await get(f"{hub.web.url}/v1/widget")
        assert status == 200 and b'"ws_url": "wss://chat.example/ws"' in body
    finally:
        await hub.stop()
