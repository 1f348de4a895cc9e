"""A conversation belongs to the user who started it, on every channel.

The WebSocket and HTTP channels run side by side on one bus (as in one hub), so a
conversation bob started on one channel is refused to alice on every other one. Each
refusal has the same reason and is a ``rejected`` ChannelEvent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import urlencode

import pytest
from httpkit import WAIT, base, call, http_channel, inbound_of, reply
from pydantic import SecretStr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from commhub.channels.http.channel import HttpChannel
from commhub.channels.websocket.channel import WebSocketChannel, WebSocketSettings
from commhub.core.bus import Bus
from commhub.core.channel import ChannelContext
from commhub.core.config import Settings
from commhub.core.envelope import ChannelEvent, Message, decode_as
from commhub.core.owners import ConversationForbidden, Owner, OwnerBook, Verdict, decide
from commhub.core.tokens import mint

SECRET = "owners-test-secret"
REASON = "forbidden: the conversation belongs to another user"
T = TypeVar("T")


def signed(settings: Settings, **changes: Any) -> Settings:
    """Settings with signed tokens and a static token; anonymous clients as given."""
    return settings.model_copy(update={
        "tokens": ["s3cret"], "token_secret": SecretStr(SECRET), **changes,
    })


def token(user: str, conversation: str | None = None) -> str:
    return mint(SECRET, user, 600, conversation)


def bearer(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}


@asynccontextmanager
async def channels(bus: Bus, settings: Settings) -> AsyncIterator[tuple[WebSocketChannel,
                                                                        HttpChannel]]:
    """The WebSocket and HTTP channels on one bus prefix, as one hub runs them."""
    ws = WebSocketChannel(ChannelContext("websocket", bus, settings), WebSocketSettings())
    await ws.start()
    try:
        async with http_channel(bus, settings, rest_wait_seconds=0.1) as http:
            yield ws, http
    finally:
        await ws.stop()


def ws_url(channel: WebSocketChannel, **params: str) -> str:
    return f"ws://127.0.0.1:{channel.port}/ws?{urlencode(params)}"


async def ws_say(address: str, text: str) -> None:
    """Connect, send one message, wait for its ack."""
    async with connect(address) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["event"] == "connected"
        await ws.send(json.dumps({"type": "message", "text": text}))
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["type"] == "ack"


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), WAIT)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def stored(bus: Bus, stream: str, subject: str, kind: type[T]) -> list[T]:
    """Every record stored on ``subject``, in stream order."""
    info = await bus.js.stream_info(stream, subjects_filter=subject)
    count = (info.state.subjects or {}).get(subject, 0)
    if not count:
        return []
    sub = await bus.js.subscribe(subject, ordered_consumer=True)
    try:
        return [decode_as((await sub.next_msg(timeout=WAIT)).data, kind) for _ in range(count)]
    finally:
        await sub.unsubscribe()


async def inbound_of_ws(bus: Bus, conversation: str) -> list[Message]:
    subject = bus.subjects.inbound("websocket", conversation)
    return await stored(bus, bus.subjects.messages_stream, subject, Message)


async def rejected(bus: Bus, channel: str, conversation: str) -> list[ChannelEvent]:
    """Every ``rejected`` ChannelEvent stored so far for ``conversation`` on ``channel``."""
    subject = bus.subjects.channel_event(channel, "rejected")
    events = await stored(bus, bus.subjects.events_stream, subject, ChannelEvent)
    return [event for event in events if event.conversation == conversation]


# -- the rule -----------------------------------------------------------------------------
def test_the_rule_keeps_signed_users_and_claims_apart() -> None:
    """A signed user enters only its own conversations; a client without a signed token
    only conversations no signed user owns; a token naming the conversation enters."""
    alice, bob = Owner("alice", True), Owner("bob", True)
    claimed_bob, claimed_carol = Owner("bob", False), Owner("carol", False)
    assert decide(None, alice) is Verdict.CLAIM
    assert decide(bob, bob) is Verdict.ENTER
    assert decide(bob, alice) is Verdict.REFUSE
    assert decide(bob, claimed_bob) is Verdict.REFUSE  # a claim is not a proof
    assert decide(claimed_bob, bob) is Verdict.REFUSE  # nor squatting on a signed name
    assert decide(claimed_bob, alice) is Verdict.REFUSE
    assert decide(claimed_bob, claimed_carol) is Verdict.ENTER  # claims are not told apart
    assert decide(bob, alice, granted=True) is Verdict.ENTER


async def test_of_two_clients_racing_into_a_conversation_one_owns_it(bus: Bus) -> None:
    """Two processes (two books) claim the same new conversations at once: each
    conversation gets exactly one owner, and the other user is refused there."""
    first, second = OwnerBook(bus), OwnerBook(bus)
    names = [f"race{i}" for i in range(20)]

    async def claim(book: OwnerBook, conversation: str, user: str) -> str:
        try:
            await book.claim(conversation, Owner(user, True))
        except ConversationForbidden:
            return "refused"
        return user

    results = await asyncio.gather(*(
        asyncio.gather(claim(first, c, "alice"), claim(second, c, "bob")) for c in names
    ))
    for pair in results:
        assert sorted(pair) in (["alice", "refused"], ["bob", "refused"])
    for conversation, (alice_result, _) in zip(names, results, strict=True):
        owner = "alice" if alice_result == "alice" else "bob"
        fresh = OwnerBook(bus)  # a third process reads the same record
        assert (await fresh.claim(conversation, Owner(owner, True))).user == owner


# -- WebSocket ----------------------------------------------------------------------------
async def test_websocket_refuses_another_users_conversation(
    bus: Bus, settings: Settings
) -> None:
    """bob starts a conversation; alice's token (no conversation claim) is closed with
    4403 and the reason, with a rejected event; an anonymous client is refused too;
    bob reconnects fine."""
    async with channels(bus, signed(settings)) as (ws_channel, _):
        await ws_say(ws_url(ws_channel, conversation="bobs", token=token("bob")), "my booking")
        async with connect(ws_url(ws_channel, conversation="bobs", token=token("alice"))) as ws:
            assert await closed_with(ws) == (4403, REASON)
        async with connect(ws_url(ws_channel, conversation="bobs", user="bob")) as ws:
            assert await closed_with(ws) == (4403, REASON)  # anonymous, claiming bob
        await ws_say(ws_url(ws_channel, conversation="bobs", token=token("bob")), "again")
    assert [m.text for m in await inbound_of_ws(bus, "bobs")] == ["my booking", "again"]
    events = await rejected(bus, "websocket", "bobs")
    assert [(e.code, e.reason, e.user) for e in events] == [
        (4403, REASON, "alice"), (4403, REASON, "bob")
    ]


async def test_a_token_naming_the_conversation_enters_it(bus: Bus, settings: Settings) -> None:
    """A signed token bound to the conversation is the signer's explicit grant."""
    async with channels(bus, signed(settings)) as (ws_channel, _):
        await ws_say(ws_url(ws_channel, conversation="shared", token=token("bob")), "hi")
        granted = token("agent7", conversation="shared")
        await ws_say(ws_url(ws_channel, conversation="shared", token=granted), "hello bob")
    assert [m.sender.id for m in await inbound_of_ws(bus, "shared")] == ["bob", "agent7"]


# -- HTTP: native API and Rasa --------------------------------------------------------------
async def test_http_refuses_another_users_conversation_everywhere(
    bus: Bus, settings: Settings
) -> None:
    """bob's conversation, started on the WebSocket: alice's token gets 403 on POST, GET,
    the event stream and the callback endpoint, each a rejected event with the same
    reason; bob's own token reads his replies."""
    async with channels(bus, signed(settings)) as (ws_channel, http):
        await ws_say(ws_url(ws_channel, conversation="bobs", token=token("bob")), "book")
        await reply(bus, "bobs", "Your booking for bob@example.com")
        root = f"{base(http)}/v1/conversations/bobs"
        for method, path, body in (
            ("POST", "/messages", {"text": "cancel"}),
            ("GET", "/messages", None),
            ("GET", "/events", None),
            ("POST", "/callback", {"url": "http://127.0.0.1:9/steal"}),
            ("GET", "/callback", None),
        ):
            status, answer, _ = await call(method, root + path, json_body=body,
                                           headers=bearer("alice"))
            assert (status, answer) == (403, {"error": {
                "code": "forbidden", "message": "the conversation belongs to another user"}}), (
                method, path)
        status, page, _ = await call("GET", root + "/messages", headers=bearer("bob"))
        assert status == 200
        assert [m["text"] for m in page["messages"]] == ["Your booking for bob@example.com"]
    assert [m.text for m in await inbound_of(bus, "bobs")] == []  # alice's cancel: never stored
    events = await rejected(bus, "http", "bobs")
    assert len(events) == 5
    assert all(e.code == 403 and (e.reason or "").startswith(REASON) for e in events)


async def test_the_rasa_endpoint_refuses_another_users_conversation(
    bus: Bus, settings: Settings
) -> None:
    """Rasa's sender picks the conversation (rest-<sender>): where another user owns
    it, the webhook answers 403 and stores nothing; its owner's turn goes through."""
    async with channels(bus, signed(settings)) as (_, http):
        # bob took the id "rest-alice" first, over the native API.
        status, _, _ = await call("POST", f"{base(http)}/v1/conversations/rest-alice/messages",
                                  json_body={"text": "mine"}, headers=bearer("bob"))
        assert status == 202
        webhook = f"{base(http)}/webhooks/rest/webhook"
        status, answer, _ = await call("POST", webhook, headers=bearer("alice"),
                                       json_body={"sender": "alice", "message": "hi"})
        assert (status, answer["error"]["code"]) == (403, "forbidden")
        status, answer, _ = await call("POST", webhook, headers=bearer("bob"),
                                       json_body={"sender": "bob", "message": "hi"})
        assert (status, answer) == (200, [])  # stored; no router here to answer
    assert [m.sender.id for m in await inbound_of(bus, "rest-alice")] == ["bob"]
    assert [m.sender.id for m in await inbound_of(bus, "rest-bob")] == ["bob"]
    [event] = await rejected(bus, "http", "rest-alice")
    assert event.code == 403 and (event.reason or "").startswith(REASON)


async def test_anonymous_clients_share_what_anonymous_clients_started(
    bus: Bus, settings: Settings
) -> None:
    """Without tokens a user id is a claim: anonymous clients are not told apart, so a
    conversation started anonymously stays open to them (documented), but closed to a
    signed token, which would otherwise read a squatter's conversation as its own."""
    async with channels(bus, signed(settings, allow_anonymous=True)) as (ws_channel, http):
        await ws_say(ws_url(ws_channel, conversation="anon1", user="ann"), "hello")
        status, _, _ = await call("GET", f"{base(http)}/v1/conversations/anon1/messages")
        assert status == 200
        status, _, _ = await call("GET", f"{base(http)}/v1/conversations/anon1/messages",
                                  headers=bearer("ann"))
        assert status == 403
