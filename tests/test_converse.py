"""Talking to the hub as a new user would, over WebSocket, on a real hub and NATS:
small talk, slots from the first message, the fallback with and without a human agent
present, and leaving a handoff."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from inproc import hub_state, ws_port
from wschat import Chat

from commhub.core.config import Settings
from commhub.core.hub import Hub
from commhub.workflows.builtin import DEFINITIONS

pytestmark = pytest.mark.timeout(180)

UNCLEAR = ["xyzzy plugh frobnicate", "qwerty asdf zxcv", "blorp snarf quux"]


@contextlib.asynccontextmanager
async def agent(nats_url: str, prefix: str, agent_id: str = "eve") -> AsyncIterator[Any]:
    """A human agent's service: a heartbeat in {prefix}_agents while it runs, removed
    when it leaves."""
    nc = await nats.connect(nats_url)
    kv = await nc.jetstream().key_value(f"{prefix}_agents")
    beat = json.dumps({"name": "Eve", "ts": time.time(), "capacity": 2}).encode()
    await kv.put(agent_id, beat)
    try:
        yield nc
    finally:
        await kv.delete(agent_id)
        await nc.close()


async def wait_for_text(chat: Chat, needle: str, timeout: float = 20) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            for message in chat.messages:
                if needle in (message.get("text") or ""):
                    return message
            await chat.next_frame("message")


async def agents_seen(hub: Hub, present: bool) -> None:
    """Wait (bounded) until the router's view of the agents bucket says so."""
    assert hub.router is not None and hub.router.agents is not None
    async with asyncio.timeout(10):
        while hub.router.agents.available() is not present:
            await asyncio.sleep(0.02)


async def test_hello_gets_a_greeting_and_what_the_bot_can_do(hub: Hub) -> None:
    """"hello" then "what's up?": two greetings with start buttons, nobody handed over."""
    chat = await Chat.open(ws_port(hub), "hi1")
    hello = await chat.say("hello")
    assert hello["text"] == "Hello! I can help with:"
    assert {"start": "book_table"} in [b["payload"] for b in hello["payload"]["buttons"]]
    again = await chat.say("what's up?")
    assert again["text"].startswith("Hello!")
    assert (await hub_state(hub, "hi1"))["handoff"] is False
    await chat.close()


async def test_unclear_messages_always_get_an_answer_when_no_agent_is_there(hub: Hub) -> None:
    """Three unclear messages in a row with no agent heartbeat: each gets an answer,
    the second says nobody is available, and the bot keeps the conversation."""
    await agents_seen(hub, False)
    chat = await Chat.open(ws_port(hub), "alone1")
    first = await chat.say(UNCLEAR[0])
    assert first["text"].startswith("Sorry, I'm not sure what you mean")
    second = await chat.say(UNCLEAR[1])
    assert "no colleague is available right now" in second["text"]
    third = await chat.say(UNCLEAR[2])
    assert third["text"].startswith("Sorry, I'm not sure what you mean")
    assert (await hub_state(hub, "alone1"))["handoff"] is False
    assert "how many" in (await chat.say("I'd like to book a table"))["text"].lower()
    await chat.close()


async def test_table_for_four_tomorrow_at_8pm_asks_for_the_name_next(hub: Hub) -> None:
    """The first message fills the size, the day and the time; a correction later
    changes the size and asks the current question again."""
    chat = await Chat.open(ws_port(hub), "tb1")
    asked = await chat.say("Can I get a table for four tomorrow at 8pm?")
    assert asked["text"] == "Under which name should I book it?"
    state = await hub_state(hub, "tb1")
    assert state["slots"]["party_size"] == 4 and state["slots"]["time"] == "20:00"
    fixed = await chat.say("Actually, make it five")
    assert fixed["text"] == "Got it, I've changed that."
    assert (await hub_state(hub, "tb1"))["slots"]["party_size"] == 5
    await chat.close()


async def test_with_an_agent_present_the_fallback_hands_over_and_cancel_leaves(
    hub: Hub, nats_url: str, prefix: str
) -> None:
    """An agent's heartbeat: the second unclear message hands over; the agent's
    handoff.accepted and reply reach the user; "cancel" during the handoff ends it.
    With the heartbeat gone, the next unclear messages are not handed over."""
    async with agent(nats_url, prefix) as nc:
        await agents_seen(hub, True)
        chat = await Chat.open(ws_port(hub), "ag1")
        await chat.say(UNCLEAR[0])
        handed = await chat.say(UNCLEAR[1])
        assert "hand you over" in handed["text"]
        wid = uuid.uuid4().hex
        accepted = {"id": wid, "conversation": "ag1", "event": "handoff.accepted",
                    "data": {"agent": "Eve"}}
        await nc.jetstream().publish(f"{prefix}.wf.ag1", json.dumps(accepted).encode(),
                                     headers={"Nats-Msg-Id": wid})
        assert await wait_for_text(chat, "Eve has joined the conversation.")
        aid = uuid.uuid4().hex
        reply = {"id": aid, "conversation": "ag1", "channel": "websocket", "direction": "out",
                 "sender": {"id": "eve", "kind": "agent", "name": "Eve"},
                 "text": "Hi, Eve here."}
        await nc.jetstream().publish(f"{prefix}.out.websocket.ag1",
                                     json.dumps(reply).encode(), headers={"Nats-Msg-Id": aid})
        assert (await wait_for_text(chat, "Eve here"))["id"] == aid
        cancelled = await chat.say("cancel")
        assert "stopped" in cancelled["text"]
        assert (await hub_state(hub, "ag1"))["handoff"] is False
    await agents_seen(hub, False)
    await chat.say(UNCLEAR[0])
    assert "no colleague is available" in (await chat.say(UNCLEAR[1]))["text"]
    await chat.close()


async def test_a_handoff_nobody_takes_comes_back_to_the_bot(
    settings: Settings, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    """The fallback's wait for an agent, shortened to one second here (60 by default):
    nobody takes the conversation, the bot says so and answers again."""
    folder = tmp_path / "workflows"
    shutil.copytree(DEFINITIONS, folder)
    fallback = folder / "fallback.yaml"
    fallback.write_text(fallback.read_text().replace("timeout: 60", "timeout: 1"))
    hub = Hub(settings.model_copy(update={
        "disable_plugins": ["commhub.workflows.builtin"], "workflow_paths": [folder]}))
    await hub.start()
    try:
        async with agent(nats_url, prefix):
            await agents_seen(hub, True)
            chat = await Chat.open(ws_port(hub), "late1")
            await chat.say(UNCLEAR[0])
            assert "hand you over" in (await chat.say(UNCLEAR[1]))["text"]
            back = await wait_for_text(chat, "no colleague could take your conversation")
            assert back["payload"]["buttons"]
            assert (await hub_state(hub, "late1"))["workflow"] is None
            assert (await chat.say("hello"))["text"].startswith("Hello!")
            await chat.close()
    finally:
        await hub.stop()
