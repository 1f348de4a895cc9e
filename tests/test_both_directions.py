"""Replays with both sides of a conversation: ``both=1`` on the WebSocket channel and on
the HTTP channel's long poll and event stream, on a real nats-server.

The tests stand in for the rest of the hub: they publish the bot's replies on the bus
themselves; the channels store the users' messages.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from httpkit import ID1, SseReader, base, call, http_channel
from httpkit import reply as http_reply
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from commhub.channels.websocket.channel import WebSocketChannel, WebSocketSettings
from commhub.core.bus import Bus
from commhub.core.channel import ChannelContext
from commhub.core.config import Settings
from commhub.core.envelope import Message, Sender, new_id

WAIT = 10  # seconds: a safety net against hangs, never an assertion about speed


@pytest.fixture
async def channel(bus: Bus, settings: Settings) -> AsyncIterator[WebSocketChannel]:
    channel = WebSocketChannel(ChannelContext("websocket", bus, settings), WebSocketSettings())
    await channel.start()
    yield channel
    await channel.stop()
    await channel.ctx.close()


def ws_url(channel: WebSocketChannel, conversation: str, **params: Any) -> str:
    query = "".join(f"&{k}={v}" for k, v in params.items() if v is not None)
    return f"ws://127.0.0.1:{channel.port}/ws?conversation={conversation}&user=ann{query}"


async def recv(ws: ClientConnection) -> dict[str, Any]:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), WAIT)))


async def next_message(ws: ClientConnection) -> dict[str, Any]:
    while True:
        frame = await recv(ws)
        if frame["type"] == "message":
            return frame


async def say(ws: ClientConnection, text: str) -> str:
    message_id = uuid.uuid4().hex
    await ws.send(json.dumps({"type": "message", "id": message_id, "text": text}))
    return message_id


async def bot(bus: Bus, conversation: str, text: str, reply_to: str | None = None) -> Message:
    message = Message(id=new_id(), conversation=conversation, channel="websocket",
                      direction="out", sender=Sender(id="bot", kind="bot", name="Bot"),
                      text=text, reply_to=reply_to)
    await bus.publish(bus.subjects.outbound("websocket", conversation), message)
    return message


async def test_both_replays_each_side_once_in_order_and_resumes(
    channel: WebSocketChannel, bus: Bus
) -> None:
    """A both=1 connection gets the user's messages and the replies in stream order,
    each with its cursor; a reconnect redraws it all, and after=N gives exactly the
    rest."""
    async with connect(ws_url(channel, "b1", both=1)) as ws:
        hello = await recv(ws)
        assert hello["event"] == "connected" and hello["both"] is True
        sent = []
        for text in ("hello", "four"):
            message_id = await say(ws, text)
            sent.append(message_id)
            echo = await next_message(ws)  # the user's own message, stored, with a cursor
            assert (echo["id"], echo["direction"], echo["text"]) == (message_id, "in", text)
            assert echo["sender"]["kind"] == "user"
            await bot(bus, "b1", f"re: {text}", reply_to=message_id)
            answer = await next_message(ws)
            assert (answer["direction"], answer["reply_to"]) == ("out", message_id)
    async with connect(ws_url(channel, "b1", both=1)) as ws:
        await recv(ws)
        redrawn = [await next_message(ws) for _ in range(4)]
    assert [(m["direction"], m["text"]) for m in redrawn] == [
        ("in", "hello"), ("out", "re: hello"), ("in", "four"), ("out", "re: four")]
    cursors = [m["cursor"] for m in redrawn]
    assert cursors == sorted(cursors) and len(set(cursors)) == 4
    async with connect(ws_url(channel, "b1", both=1, after=cursors[1])) as ws:
        await recv(ws)
        rest = [await next_message(ws) for _ in range(2)]
        assert [m["cursor"] for m in rest] == cursors[2:]
        with pytest.raises(TimeoutError):  # nothing more, nothing twice
            await asyncio.wait_for(ws.recv(), 0.3)


async def test_other_tabs_messages_come_live_only_to_both_connections(
    channel: WebSocketChannel, bus: Bus
) -> None:
    """A message typed in another tab reaches a both=1 connection live; a plain
    connection on the same conversation still gets only the replies."""
    async with connect(ws_url(channel, "b2", both=1)) as tab1, \
            connect(ws_url(channel, "b2")) as plain, \
            connect(ws_url(channel, "b2", both=1)) as tab2:
        for ws in (tab1, plain, tab2):
            await recv(ws)
        message_id = await say(tab2, "from tab 2")
        seen = await next_message(tab1)
        assert (seen["id"], seen["direction"]) == (message_id, "in")
        answer = await bot(bus, "b2", "answer", reply_to=message_id)
        assert (await next_message(tab1))["id"] == answer.id
        first_plain = await next_message(plain)
        assert (first_plain["id"], first_plain["direction"]) == (answer.id, "out")


async def test_both_on_a_process_whose_feed_already_runs(
    channel: WebSocketChannel, bus: Bus
) -> None:
    """The live consumer starts narrow (replies only) for plain readers and is widened
    by the first both=1 reader: an inbound message stored around that moment is still
    seen once."""
    async with connect(ws_url(channel, "b3")) as plain:
        await recv(plain)
        await bot(bus, "b3", "first")
        assert (await next_message(plain))["text"] == "first"
        async with connect(ws_url(channel, "b3", both=1)) as ws:
            await recv(ws)
            assert (await next_message(ws))["text"] == "first"
            message_id = await say(plain, "typed before")
            got = await next_message(ws)
            assert (got["id"], got["direction"]) == (message_id, "in")
            with pytest.raises(TimeoutError):
                while True:
                    frame = await asyncio.wait_for(ws.recv(), 0.3)
                    assert json.loads(frame)["type"] != "message", frame


async def test_bad_both_is_refused(channel: WebSocketChannel) -> None:
    async with connect(ws_url(channel, "b4", both="maybe")) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), WAIT)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4400, "invalid both: use 1 or 0")


async def test_http_read_and_events_with_both(bus: Bus, settings: Settings) -> None:
    """GET ...?both=1 and the event stream with both=1 give the posted messages and the
    replies in order, with cursors; without both, only the replies."""
    async with http_channel(bus, settings) as http:
        url = f"{base(http)}/v1/conversations/h1"
        status, posted, _ = await call("POST", f"{url}/messages",
                                       json_body={"id": ID1, "text": "hi there"})
        assert status == 202
        answer, _ = await http_reply(bus, "h1", "hello!", reply_to=ID1)
        status, body, _ = await call("GET", f"{url}/messages?both=1")
        assert status == 200
        assert [(m["direction"], m["id"]) for m in body["messages"]] == [
            ("in", ID1), ("out", answer.id)]
        assert body["messages"][0]["cursor"] == posted["cursor"]
        assert body["cursor"] == body["messages"][-1]["cursor"]
        status, only_out, _ = await call("GET", f"{url}/messages")
        assert [m["id"] for m in only_out["messages"]] == [answer.id]
        status, after_first, _ = await call(
            "GET", f"{url}/messages?both=1&after={posted['cursor']}")
        assert [m["id"] for m in after_first["messages"]] == [answer.id]
        status, bad, _ = await call("GET", f"{url}/messages?both=yes")
        assert (status, bad["error"]["code"]) == (400, "bad_request")
        # A long poll with both=1 wakes for the user's next message too.
        poll = asyncio.ensure_future(call(
            "GET", f"{url}/messages?both=1&wait=10&after={body['cursor']}"))
        await asyncio.sleep(0.2)
        second = str(uuid.uuid4())
        await call("POST", f"{url}/messages", json_body={"id": second, "text": "again"})
        status, polled, _ = await poll
        assert [(m["direction"], m["id"]) for m in polled["messages"]] == [("in", second)]
        timeout = aiohttp.ClientTimeout(total=WAIT * 3)
        async with aiohttp.ClientSession(timeout=timeout) as client, \
                client.get(f"{url}/events?both=1") as response:
            reader = SseReader(response)
            got = [await reader.next_message() for _ in range(3)]
        assert [m["id"] for _, m in got] == [ID1, answer.id, second]
        assert [m["direction"] for _, m in got] == ["in", "out", "in"]
