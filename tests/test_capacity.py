"""A hub that served thousands of short sessions still serves the next one.

Each WebSocket connection and each Rasa turn used to leave a JetStream consumer behind
for five minutes; past about a thousand per stream nats-server refused new ones and
every client got 1011, 500 or 503. Now the channel's readers share one live consumer
and read history with direct gets, so the consumer count stays flat however many
sessions come and go.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from inproc import ws_port
from websockets.asyncio.client import connect
from wschat import Chat

from commhub.core.bus import Bus
from commhub.core.hub import Hub

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SESSIONS = 3000
CONCURRENCY = 8  # clients at a time: thousands within minutes, gentle on 2 cores


async def consumer_counts(bus: Bus) -> tuple[int, int]:
    """Consumers on the messages stream and on the state bucket's stream."""
    messages = await bus.js.stream_info(bus.subjects.messages_stream)
    state = await bus.js.stream_info(f"KV_{bus.subjects.state_bucket}")
    return int(messages.state.consumer_count), int(state.state.consumer_count)


async def rasa(http: aiohttp.ClientSession, url: str, sender: str, text: str) -> Any:
    async with http.post(url, json={"sender": sender, "message": text}) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_thousands_of_rasa_turns_and_websocket_sessions_leave_no_consumers(
    hub: Hub,
) -> None:
    """3,000 Rasa turns and 3,000 WebSocket connect/close cycles in a row: every one is
    served, the consumer counts end where they started, and a new client still gets its
    reply."""
    assert hub.bus is not None and hub.web is not None
    port = ws_port(hub)
    webhook = f"{hub.web.url}/webhooks/rest/webhook"
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        # Both channels have served once: their live consumers exist.
        assert await rasa(http, webhook, "warmup", "I'd like to book a table")
        chat = await Chat.open(port, "warmup")
        assert (await chat.say("I'd like to book a table"))["text"]
        await chat.close()
        before = await consumer_counts(hub.bus)

        async def turns(worker: int) -> None:
            for i in range(worker, SESSIONS, CONCURRENCY):
                replies = await rasa(http, webhook, f"s{i}", "I'd like to book a table")
                assert [r["text"] for r in replies] == ["How many people is the table for?"]

        async def sessions(worker: int) -> None:
            for i in range(worker, SESSIONS, CONCURRENCY):
                async with connect(f"ws://127.0.0.1:{port}/ws?conversation=w{i % 500}") as ws:
                    await ws.recv()  # "connected": its outbound stream is starting

        await asyncio.gather(*(turns(w) for w in range(CONCURRENCY)))
        await asyncio.gather(*(sessions(w) for w in range(CONCURRENCY)))

        channel = hub.channels["websocket"]
        async with asyncio.timeout(60):
            while channel.connection_count:  # type: ignore[attr-defined]
                await asyncio.sleep(0.05)
        assert await consumer_counts(hub.bus) == before

        replies = await rasa(http, webhook, "newcomer", "I'd like to book a table")
        assert replies[0]["text"] == "How many people is the table for?"
    chat = await Chat.open(port, "newcomer-ws")
    assert (await chat.say("I'd like to book a table"))["text"] == (
        "How many people is the table for?")
    await chat.close()
