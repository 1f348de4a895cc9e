"""The agents' inbox API on a whole hub in this process (real nats-server, real HTTP):
presence, the list of conversations waiting for a person, taking one (exactly one of two
agents wins), answering as an agent, handing back and closing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from inproc import hub_state, ws_port
from wschat import Chat

from commhub.core.config import Settings
from commhub.core.hub import Hub

UNCLEAR = ["blue elephants dancing", "purple monkeys singing loudly"]
WAIT = 20


@pytest.fixture
async def hub(settings: Settings) -> AsyncIterator[Hub]:
    hub = Hub(settings)
    await hub.start()
    yield hub
    await hub.stop()


async def call(hub: Hub, method: str, path: str, body: Any = None,
               token: str | None = None) -> tuple[int, Any]:
    assert hub.web is not None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as client, client.request(
        method, hub.web.url + path, json=body, headers=headers
    ) as response:
        return response.status, await response.json()


async def handed_over(hub: Hub, conversation: str) -> Chat:
    """A user whose two unclear messages get the fallback, then a person."""
    chat = await Chat.open(ws_port(hub), conversation, user="ann")
    first = await chat.say(UNCLEAR[0])
    assert first["text"].startswith("Sorry, I'm not sure")
    second = await chat.say(UNCLEAR[1])
    assert second["text"].startswith("Let me hand you over"), second
    return chat


async def until(predicate: Any, what: str) -> Any:
    async with asyncio.timeout(WAIT):
        while True:
            value = await predicate()
            if value:
                return value
            await asyncio.sleep(0.05)
    raise AssertionError(what)


async def test_take_answer_hand_back(hub: Hub) -> None:
    # Without an agent present, the fallback keeps the conversation.
    chat = await Chat.open(ws_port(hub), "i0", user="bob")
    await chat.say(UNCLEAR[0])
    alone = await chat.say(UNCLEAR[1])
    assert "no colleague is available" in alone["text"]
    await chat.close()

    status, body = await call(hub, "POST", "/v1/inbox/presence", {"agent": "a1", "name": "Eve"})
    assert status == 200
    await call(hub, "POST", "/v1/inbox/presence", {"agent": "a2", "name": "Sam"})
    assert hub.router is not None
    await until(lambda: _true(hub.router.agents.available()), "the router to see agents")
    chat = await handed_over(hub, "i1")

    async def listed() -> list[dict[str, Any]]:
        _, body = await call(hub, "GET", "/v1/inbox/conversations")
        return [c for c in body["conversations"] if c["conversation"] == "i1"]

    [entry] = await until(listed, "the conversation listed")
    assert entry["taken_by"] is None and entry["state"] == "waiting_for_agent"
    assert entry["reason"]["decision"] == "fallback"
    assert entry["reason"]["text"] == UNCLEAR[0]  # what started the fallback

    # Two agents take it at once: exactly one wins.
    results = await asyncio.gather(*(
        call(hub, "POST", "/v1/inbox/conversations/i1/take", {"agent": a, "name": n})
        for a, n in (("a1", "Eve"), ("a2", "Sam"))))
    statuses = sorted(status for status, _ in results)
    assert statuses == [200, 409], results
    winner = next(body for status, body in results if status == 200)["taken_by"]
    loser = "a2" if winner["agent"] == "a1" else "a1"
    joined = await chat.next_frame("message")
    assert joined["text"] == f"{winner['name']} has joined the conversation."
    assert joined["reply_to"].startswith("handoff-accepted-")

    status, body = await call(hub, "POST", "/v1/inbox/conversations/i1/messages",
                              {"agent": loser, "name": "x", "text": "me too"})
    assert (status, body["error"]["code"]) == (409, "not_yours")
    status, body = await call(hub, "POST", "/v1/inbox/conversations/i1/messages", {
        "agent": winner["agent"], "name": "x", "text": "Hi, how can I help?"})
    assert status == 202
    answer = await chat.next_frame("message")
    assert (answer["text"], answer["sender"]["kind"], answer["sender"]["name"]) == (
        "Hi, how can I help?", "agent", winner["name"])
    await chat.send("my order is late")
    status, detail = await call(hub, "GET", "/v1/inbox/conversations/i1")
    assert status == 200
    texts = [(m["direction"], m["text"]) for m in detail["messages"]]
    assert ("in", UNCLEAR[0]) in texts and ("out", "Hi, how can I help?") in texts
    assert [c["decision"] for c in detail["classifications"]] == ["fallback"]
    _, after = await call(hub, "GET", f"/v1/inbox/conversations/i1?after={detail['cursor']}")
    assert after["messages"] == [] and after["cursor"] == detail["cursor"]

    status, _ = await call(hub, "POST", "/v1/inbox/conversations/i1/release",
                           {"agent": winner["agent"]})
    assert status == 200
    left = await chat.next_frame("message")
    assert left["reply_to"].startswith("handoff-end-")
    assert (await hub_state(hub, "i1"))["handoff"] is False
    await until(lambda: _empty(listed()), "the conversation to leave the list")
    status, body = await call(hub, "GET", "/v1/inbox/conversations/i1")
    assert (status, body["error"]["code"]) == (404, "not_waiting")  # not handed over now
    status, _ = await call(hub, "GET", "/v1/inbox/conversations/i0")
    assert status == 404  # never handed over: not for the inbox to read
    # The bot answers again.
    again = await chat.say("I'd like to book a table")
    assert again["text"] == "How many people is the table for?"
    await chat.close()


async def _handoff_over(hub: Hub, conversation: str) -> bool:
    return (await hub_state(hub, conversation))["handoff"] is False


async def _true(value: bool) -> bool:
    return value


async def _empty(listed: Any) -> bool:
    return not await listed


async def test_close_and_long_poll(hub: Hub) -> None:
    await call(hub, "POST", "/v1/inbox/presence", {"agent": "a1", "name": "Eve"})
    assert hub.router is not None
    await until(lambda: _true(hub.router.agents.available()), "the router to see agents")
    _, first = await call(hub, "GET", "/v1/inbox/conversations")
    poll = asyncio.ensure_future(call(hub, "GET",
                                      f"/v1/inbox/conversations?wait=20&version={first['version']}"))
    await asyncio.sleep(0.2)
    assert not poll.done()
    chat = await handed_over(hub, "i2")
    _, changed = await poll
    assert changed["version"] != first["version"]
    assert [c["conversation"] for c in changed["conversations"]] == ["i2"]
    status, _ = await call(hub, "POST", "/v1/inbox/conversations/i2/close", {"agent": "a1"})
    assert status == 409  # not taken
    await call(hub, "POST", "/v1/inbox/conversations/i2/take", {"agent": "a1", "name": "Eve"})
    joined = await chat.next_frame("message")
    assert joined["reply_to"].startswith("handoff-accepted-")
    status, body = await call(hub, "POST", "/v1/inbox/conversations/i2/close", {"agent": "a1"})
    assert (status, body["outcome"]) == (200, "closed")
    left = await chat.next_frame("message")
    assert left["reply_to"].startswith("handoff-end-")
    await chat.close()
    await until(lambda: _handoff_over(hub, "i2"), "the handoff to end")
    status, body = await call(hub, "POST", "/v1/inbox/conversations/i2/take",
                              {"agent": "a1", "name": "Eve"})
    assert (status, body["error"]["code"]) == (409, "not_waiting")
    status, body = await call(hub, "POST", "/v1/inbox/presence/leave", {"agent": "a1"})
    assert status == 200
    await until(lambda: _true(not hub.router.agents.available()), "the agent gone")


async def test_agent_tokens(settings: Settings) -> None:
    hub = Hub(settings.model_copy(update={"agent_tokens": ["agent-secret"]}))
    await hub.start()
    try:
        status, body = await call(hub, "GET", "/v1/inbox/conversations")
        assert (status, body["error"]["code"]) == (401, "unauthorized")
        status, _ = await call(hub, "GET", "/v1/inbox/conversations", token="wrong")
        assert status == 401
        status, _ = await call(hub, "GET", "/v1/inbox/conversations", token="agent-secret")
        assert status == 200
        assert hub.web is not None
        async with aiohttp.ClientSession() as client, client.get(hub.web.url + "/inbox") as r:
            assert r.status == 200 and "inbox.js" in await r.text()
        status, body = await call(hub, "POST", "/v1/inbox/presence", {"agent": "a b"},
                                  token="agent-secret")
        assert status == 422, json.dumps(body)
    finally:
        await hub.stop()
