"""The WebSocket acceptance: a client away for the middle of a conversation misses nothing,
and a client that stays connected while the nats-server restarts keeps chatting.

While the client is disconnected, the workflow goes on answering (the same conversation
is driven from a second tab) and the hub is killed and restarted. The client reconnects
with the last cursor it saw and gets every reply it missed, once each, in order, then
live replies.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from hubproc import HubProcess
from inproc import ws_port
from wschat import Chat

from commhub.core.config import Settings
from commhub.core.hub import Hub
from commhub.core.natsserver import EmbeddedNats

pytestmark = pytest.mark.timeout(240)


async def test_reconnect_after_absence_and_restart_gets_every_reply_once_in_order(
    hub_process: HubProcess,
) -> None:
    hub_process.start()
    away = await Chat.open(hub_process.ws_port, "resume1", user="ann")
    await away.say("I'd like to book a table")
    left_at = away.cursor
    assert left_at is not None
    await away.close()

    # The conversation goes on without it: a second tab answers two questions...
    tab = await Chat.open(hub_process.ws_port, "resume1", user="ann", after=left_at)
    await tab.say("4")
    await tab.say("tomorrow")
    await tab.close()
    missed = list(tab.messages)
    # ...the hub dies and comes back...
    hub_process.kill()
    hub_process.start()
    # ...and the tab answers one more question on the new hub.
    tab = await Chat.open(hub_process.ws_port, "resume1", user="ann", after=tab.cursor)
    await tab.say("19:30")
    await tab.close()
    missed += tab.messages
    assert len(missed) >= 3

    back = await Chat.open(hub_process.ws_port, "resume1", user="ann", after=left_at)
    while len(back.messages) < len(missed):
        await back.next_frame("message")
    assert [m["id"] for m in back.messages] == [m["id"] for m in missed]
    assert [m["text"] for m in back.messages] == [m["text"] for m in missed]
    # Then live, with nothing repeated in between: the next frame is the new reply.
    live = await back.say("Ann")
    assert back.messages[len(missed)] == live
    cursors = [m["cursor"] for m in back.messages]
    assert cursors == sorted(set(cursors)) and cursors[0] > left_at
    await back.close()
    assert hub_process.terminate() == 0


async def test_an_open_connection_gets_its_reply_after_a_nats_restart(tmp_path: Path) -> None:
    """The nats-server restarts under a connected client: the message the client sends
    next is answered on the same connection, without reconnecting (the channel's live
    consumer re-creates itself when the bus reconnects), and nothing comes twice."""
    server = EmbeddedNats(tmp_path / "nats", port=0)
    url = await server.start()
    port = int(url.rsplit(":", 1)[1])
    hub = Hub(Settings(data_dir=tmp_path / "data", nats_url=url, prefix="restart",
                       ws_port=0, http_port=0))
    try:
        await hub.start()
        chat = await Chat.open(ws_port(hub), "restart1", user="ann")
        await chat.say("I'd like to book a table")
        server.stop()
        server = EmbeddedNats(tmp_path / "nats", port=port)
        await server.start()
        # The client re-sends with the same id until the hub acks it, as documented for
        # an "unavailable" error frame.
        message_id = uuid.uuid4().hex
        async with asyncio.timeout(60):
            while True:
                await chat.ws.send(json.dumps({"type": "message", "id": message_id,
                                               "text": "4"}))
                frame = json.loads(await chat.ws.recv())
                while frame["type"] == "message":  # (none expected; kept if any)
                    chat.messages.append(frame)
                    frame = json.loads(await chat.ws.recv())
                if frame["type"] == "ack":
                    break
                assert frame["type"] == "error" and frame["code"] == "unavailable", frame
                await asyncio.sleep(0.2)
        answer = (await chat.replies_to(message_id, timeout=60))[0]
        assert answer["text"].startswith("Which day")
        cursors = [m["cursor"] for m in chat.messages]
        assert cursors == sorted(set(cursors))
        await chat.close()
    finally:
        await hub.stop()
        server.stop()
