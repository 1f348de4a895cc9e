"""Helpers for the HTTP channel's tests: the channel alone on a real aiohttp server.

The tests stand in for the rest of the hub: they publish outbound Messages on the bus
themselves and read inbound Messages and ChannelEvents straight from the streams.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from commhub.channels.http.channel import HttpChannel, HttpSettings
from commhub.core.bus import Bus
from commhub.core.channel import ChannelContext
from commhub.core.config import Settings
from commhub.core.envelope import ChannelEvent, Message, Sender, decode_as, new_id
from commhub.core.web import WebServer

WAIT = 10  # seconds: a safety net against hangs, never an assertion about speed
ID1 = "5f0c7e1e-2b1d-4c55-9a43-0d8f6b1f9b21"  # client ids must look unique (a UUID)


@asynccontextmanager
async def http_channel(
    bus: Bus, settings: Settings, **plugin_settings: Any
) -> AsyncIterator[HttpChannel]:
    """The HTTP channel on its own aiohttp server at 127.0.0.1:0, started like the hub
    starts it (bind, channel adds routes, serve); stopped like the hub stops it."""
    web = WebServer("127.0.0.1", 0, max_body_bytes=settings.max_body_bytes)
    web.bind()
    channel = HttpChannel(ChannelContext("http", bus, settings, web),
                          HttpSettings(**plugin_settings))
    try:
        await channel.start()
        await web.start()
        yield channel
    finally:
        await channel.stop()
        await channel.ctx.close()
        await web.stop()


def base(channel: HttpChannel) -> str:
    return channel.ctx.web.url


async def call(
    method: str, url: str, *, json_body: Any = None, data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    """One request with a fresh client; returns status, decoded JSON body (or None), headers."""
    if json_body is not None:
        data = json.dumps(json_body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    timeout = aiohttp.ClientTimeout(total=WAIT * 3)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.request(
        method, url, data=data, headers=headers
    ) as response:
        raw = await response.read()
        body = json.loads(raw) if raw else None
        return response.status, body, response.headers


async def reply(bus: Bus, conversation: str, text: str, **fields: Any) -> tuple[Message, int]:
    """Publish an outbound message on the HTTP channel as a workflow would; return it and
    its cursor."""
    message = Message(
        id=new_id(), conversation=conversation, channel="http", direction="out",
        sender=Sender(id="bot", kind="bot", name="Bot"), text=text, **fields,
    )
    ack = await bus.publish(bus.subjects.outbound("http", conversation), message)
    return message, int(ack.seq)


async def inbound_of(bus: Bus, conversation: str) -> list[Message]:
    """Every inbound message of ``conversation`` on the HTTP channel, in stream order."""
    subject = bus.subjects.inbound("http", conversation)
    info = await bus.js.stream_info(bus.subjects.messages_stream, subjects_filter=subject)
    count = (info.state.subjects or {}).get(subject, 0)
    if not count:
        return []
    sub = await bus.js.subscribe(subject, ordered_consumer=True)
    try:
        return [decode_as((await sub.next_msg(timeout=WAIT)).data, Message)
                for _ in range(count)]
    finally:
        await sub.unsubscribe()


async def wait_event(bus: Bus, kind: str, **match: Any) -> ChannelEvent:
    """The first stored or future ChannelEvent of the HTTP channel of ``kind`` whose
    fields match."""
    sub = await bus.js.subscribe(bus.subjects.channel_event("http", kind), ordered_consumer=True)
    try:
        while True:
            event = decode_as((await sub.next_msg(timeout=WAIT)).data, ChannelEvent)
            if all(getattr(event, key) == value for key, value in match.items()):
                return event
    finally:
        await sub.unsubscribe()


class SseReader:
    """Reads server-sent events from an open aiohttp response, one event at a time."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []

    async def next_event(self) -> dict[str, str]:
        """The next event's fields (``id``, ``event``, ``data``...); comments are kept."""
        fields: dict[str, str] = {}
        while True:
            raw = await self.response.content.readline()
            if not raw:
                raise EOFError("the stream ended")
            line = raw.decode().rstrip("\n")
            if line == "":
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value

    async def next_message(self) -> tuple[int, dict[str, Any]]:
        """The next message event: its id (the cursor) and decoded data."""
        while True:
            event = await self.next_event()
            if "data" in event and event.get("event", "message") == "message":
                return int(event["id"]), json.loads(event["data"])
