"""The smallest channel of docs/channel-plugins.md runs as printed and holds a conversation.

The page's first Python block is executed as a module, registered as a plugin, and driven
through the hub's HTTP server, so the page cannot drift from what works.
"""

from __future__ import annotations

import asyncio
import re
import types
from pathlib import Path
from typing import Any

import aiohttp

from commhub.core.config import Settings
from commhub.core.hub import Hub
from commhub.core.plugins import Plugins

PAGE = Path(__file__).resolve().parents[1] / "docs" / "channel-plugins.md"


def smallest_channel_module() -> types.ModuleType:
    text = PAGE.read_text()
    section = text[text.index("## The smallest channel"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the page lost its example"
    module = types.ModuleType("commhub_channel_hook")
    exec(compile(code.group(1), str(PAGE), "exec"), module.__dict__)
    return module


async def test_the_documented_smallest_channel_chats(settings: Settings) -> None:
    module = smallest_channel_module()
    delivered: list[tuple[Any, ...]] = []
    module.print = lambda *args: delivered.append(args)  # type: ignore[attr-defined]
    hub = Hub(settings, plugins=Plugins.load(extra=[module]))
    await hub.start()
    try:
        assert hub.web is not None and "hook" in hub.channels
        url = f"{hub.web.url}/hook/doc-c1"
        event = {"event_id": "e1", "user": "u1", "text": "I want to book a table"}
        async with aiohttp.ClientSession() as http:
            for _ in range(2):  # the chat service retries: still one message
                async with http.post(url, json=event) as response:
                    assert response.status == 200
        async with asyncio.timeout(20):
            while not delivered:
                await asyncio.sleep(0.05)
        assert delivered[0][0] == "deliver" and "How many people" in delivered[0][2]
        assert hub.bus is not None
        subject = hub.bus.subjects.inbound("hook", "doc-c1")
        info = await hub.bus.js.stream_info(hub.bus.subjects.messages_stream, subject)
        assert info.state.subjects == {subject: 1}  # the retry was deduplicated
    finally:
        await hub.stop()
