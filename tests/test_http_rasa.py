"""The Rasa-compatible REST endpoint: a client written for Rasa's REST channel, unchanged.

The client is what Rasa's docs show: a plain JSON POST of ``{"sender", "message"}`` to
``/webhooks/rest/webhook``, reading back a JSON list of ``{"recipient_id", "text",
"buttons"?}``; pressing a button sends the button's ``payload`` string as the message.
It runs in a thread with urllib, against a whole hub in this process.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from httpkit import base, http_channel, inbound_of, reply
from inproc import hub_state

from commhub.channels.http.rasa import (
    button_payload,
    conversation_for,
    parse_request,
    rasa_replies,
)
from commhub.channels.http.request import ApiError
from commhub.channels.http.turn import run_turn
from commhub.core.bus import Bus
from commhub.core.config import Settings
from commhub.core.envelope import Message, Sender, new_id
from commhub.core.hub import Hub
from commhub.core.routing.state import ConversationState
from commhub.core.routing.store import OutboxEntry, StateStore, StoredState
from commhub.core.subjects import valid_token

WAIT = 30  # seconds: a safety net against hangs, never an assertion about speed


def rasa_post(url: str, sender: str, message: str, wait: float | None = None) -> Any:
    """Rasa's documented REST client: POST JSON, read the JSON list of bot messages
    (``wait``: commhub's body field asking for later replies too)."""
    body: dict[str, Any] = {"sender": sender, "message": message}
    if wait is not None:
        body["wait"] = wait
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        return json.loads(response.read())


async def say(hub: Hub, sender: str, message: str) -> list[dict[str, Any]]:
    assert hub.web is not None
    url = f"{hub.web.url}/webhooks/rest/webhook"
    return list(await asyncio.to_thread(rasa_post, url, sender, message))


async def test_a_rasa_client_books_a_table_unchanged(hub: Hub) -> None:
    """The booking workflow runs start to finish through Rasa's REST shape, buttons
    included: each POST answers exactly the replies of its turn."""
    replies = await say(hub, "u1", "I'd like to book a table")
    assert replies == [{"recipient_id": "u1", "text": "How many people is the table for?"}]
    assert (await say(hub, "u1", "4"))[0]["text"].startswith("Which day")
    assert (await say(hub, "u1", "tomorrow"))[0]["text"].startswith("At what time?")
    assert (await say(hub, "u1", "19:30"))[0]["text"] == "Under which name should I book it?"
    assert (await say(hub, "u1", "Ann"))[0]["text"].startswith("What email address")
    confirm = await say(hub, "u1", "ann@example.com")
    assert len(confirm) == 1 and confirm[0]["recipient_id"] == "u1"
    assert confirm[0]["text"].startswith("A table for 4 on")
    buttons = confirm[0]["buttons"]
    assert [b["title"] for b in buttons] == ["Yes, book it", "No, start over", "Cancel"]
    assert all(isinstance(b["payload"], str) for b in buttons)
    # A Rasa client sends the pressed button's payload string back as the message.
    booked = await say(hub, "u1", buttons[0]["payload"])
    assert len(booked) == 1 and booked[0]["text"].startswith("Booked! A table for 4")
    state = await hub_state(hub, "rest-u1")
    assert state["channel"] == "http" and state["workflow"] is None  # the run finished


async def test_a_rasa_hello_gets_a_greeting(hub: Hub) -> None:
    """'hi' is small talk: a greeting with the workflows as Rasa buttons."""
    [greeting] = await say(hub, "v8", "hi")
    assert greeting["text"] == "Hello! I can help with:"
    assert "Book a table at the restaurant" in [b["title"] for b in greeting["buttons"]]


async def test_a_rasa_client_waits_for_a_service_s_answer_with_wait(
    hub: Hub, nats_url: str
) -> None:
    """Without ?wait= the turn is the step's own replies; with ?wait=N the replies a
    service's answer brings within N seconds come in the same response."""
    import nats

    nc = await nats.connect(nats_url)

    async def orders(msg: Any) -> None:
        await msg.respond(json.dumps({"status": "shipped", "eta": "2030-01-02"}).encode())

    await nc.subscribe("shop.orders.status", cb=orders)
    await nc.flush()
    try:
        assert hub.web is not None
        url = f"{hub.web.url}/webhooks/rest/webhook"
        await say(hub, "o1", "where is my order")
        alone = await say(hub, "o1", "12345")
        assert [r["text"] for r in alone] == ["Let me look up order 12345..."]
        await say(hub, "o1", "where is my order")
        waited = await asyncio.to_thread(rasa_post, url + "?wait=20", "o1", "12345")
        assert [r["text"] for r in waited] == [
            "Let me look up order 12345...", "Order 12345: shipped. Expected delivery: 2030-01-02."]
        await say(hub, "o1", "where is my order")
        body_wait = await asyncio.to_thread(rasa_post, url, "o1", "55555", 20)
        assert len(body_wait) == 2
    finally:
        await nc.close()


async def test_a_rasa_unclear_message_gets_the_fallback_with_buttons(hub: Hub) -> None:
    """Text that matches no workflow: the fallback's question and its start buttons
    come back in Rasa's button shape, and pressing one starts that workflow."""
    replies = await say(hub, "visitor 7 <a@b>", "qwerty asdf zxcv")
    assert len(replies) == 1 and replies[0]["recipient_id"] == "visitor 7 <a@b>"
    assert replies[0]["text"].startswith("Sorry, I'm not sure what you mean")
    titles = {b["title"]: b["payload"] for b in replies[0]["buttons"]}
    assert "Book a table at the restaurant" in titles
    started = await say(hub, "visitor 7 <a@b>", titles["Book a table at the restaurant"])
    assert started == [{"recipient_id": "visitor 7 <a@b>",
                        "text": "How many people is the table for?"}]


async def test_a_turn_ends_when_the_router_commits_it(hub: Hub) -> None:
    """The turn is over as soon as the router's commit of the message is seen and every
    reply it lists arrived (complete), well before the wait runs out."""
    channel = hub.channels["http"]
    turn = await run_turn(channel.ctx, _inbound("rest-t1", "I'd like to book a table"),
                          wait=WAIT)
    assert turn.complete and [m.text for m in turn.replies] == [
        "How many people is the table for?"]
    invalid = _inbound("rest-t1", "lots")
    turn = await run_turn(channel.ctx, invalid, wait=WAIT)
    assert turn.complete and turn.replies
    assert turn.replies[0].text == (
        "Please give a number of guests between 1 and 20.")
    assert all(m.reply_to == invalid.id for m in turn.replies)


async def test_a_turn_follows_the_commit_protocol_not_the_router_itself(
    bus: Bus, settings: Settings
) -> None:
    """Whoever commits the step (here the test, as a router would: state with
    last_input, outbox listing the replies) ends the turn; only replies to the message
    count. Nobody committing: the turn ends incomplete after the wait."""
    async with http_channel(bus, settings) as channel:
        message = _inbound("rest-t2", "hello")

        async def commit() -> None:
            async with asyncio.timeout(WAIT):  # answer once the message is stored
                while not await inbound_of(bus, "rest-t2"):
                    await asyncio.sleep(0.01)
            await reply(bus, "rest-t2", "unrelated")
            answer, _ = await reply(bus, "rest-t2", "an answer", reply_to=message.id)
            stored = StoredState(
                state=ConversationState(conversation="rest-t2", last_input=message.id),
                outbox=[OutboxEntry(bus.subjects.outbound("http", "rest-t2"), answer)],
            )
            await StateStore(bus).commit("rest-t2", stored, None)

        committing = asyncio.create_task(commit())
        turn = await run_turn(channel.ctx, message, wait=WAIT * 2)
        await committing
        assert turn.complete
        assert [m.text for m in turn.replies] == ["an answer"]

        lonely = await run_turn(channel.ctx, _inbound("rest-t3", "anyone?"), wait=0.2)
        assert (lonely.complete, lonely.replies) == (False, [])


async def test_a_turn_whose_commit_was_overtaken_reads_its_replies_from_the_stream(
    bus: Bus, settings: Settings
) -> None:
    """When later inputs of the conversation were handled before the turn looked (the
    state lists the message among its recent inputs, the outbox is another step's),
    the replies are the stored messages that answer it, marked not complete."""
    async with http_channel(bus, settings) as channel:
        message = _inbound("rest-t4", "first")
        cursor = await channel.ctx.publish_inbound(message)
        await reply(bus, "rest-t4", "the answer", reply_to=message.id)
        later = _inbound("rest-t4", "second")
        await channel.ctx.publish_inbound(later)
        other, _ = await reply(bus, "rest-t4", "the later answer", reply_to=later.id)
        state = ConversationState(conversation="rest-t4", last_input=later.id,
                                  recent_inputs=[message.id])
        stored = StoredState(
            state=state, outbox=[OutboxEntry(bus.subjects.outbound("http", "rest-t4"), other)])
        await StateStore(bus).commit("rest-t4", stored, None)

        found = await channel.ctx.turn_replies("rest-t4", message.id, WAIT, after=cursor)
        assert ([m.text for m in found.replies], found.complete) == (["the answer"], False)
        current = await channel.ctx.turn_replies("rest-t4", later.id, WAIT)
        assert ([m.text for m in current.replies], current.complete) == (
            ["the later answer"], True)


async def test_bad_webhook_bodies_get_json_errors(bus: Bus, settings: Settings) -> None:
    """A body that is not JSON (or nested too deep), or misses sender or message, or a
    button payload nested too deep, is a JSON error."""
    async with http_channel(bus, settings) as channel:
        url = f"{base(channel)}/webhooks/rest/webhook"
        deep = b"[" * 3000 + b"]" * 3000  # past the decoder's recursion limit
        deep_button = json.dumps(
            {"sender": "u", "message": "/button" + '{"a": ' * 3000 + "1" + "}" * 3000}
        ).encode()
        for data, status in ((b"nope", 400), (b'{"sender": "u"}', 422),
                             (b'{"message": "hi"}', 422),
                             (b'{"sender": 1, "message": "x"}', 422),
                             (deep, 400), (deep_button, 400),
                             (b'{"sender": "u", "message": "x", "wait": "soon"}', 400),
                             (b'{"sender": "u", "message": "x", "wait": -1}', 400)):
            request = urllib.request.Request(url, data=data, method="POST")
            with pytest.raises(urllib.error.HTTPError) as caught:
                await asyncio.to_thread(urllib.request.urlopen, request, None, WAIT)
            assert caught.value.code == status
            body = json.loads(caught.value.read())
            assert set(body["error"]) == {"code", "message"}
            caught.value.close()


def _inbound(conversation: str, text: str) -> Message:
    return Message(id=new_id(), conversation=conversation, channel="http", direction="in",
                   sender=Sender(id="u", kind="user"), text=text)


# -- the mapping, as plain functions ------------------------------------------------------
def test_conversation_ids_are_tokens_and_stable() -> None:
    """Any sender maps to one valid conversation id, the same every time; distinct
    senders map to distinct ids."""
    senders = ["u1", "visitor 7 <a@b>", "a.b", "x" * 300, "émile", "u1 "]
    ids = [conversation_for(s)[0] for s in senders]
    assert all(valid_token(c) for c in ids)
    assert len(set(ids)) == len(ids)
    assert ids == [conversation_for(s)[0] for s in senders]
    assert conversation_for("u1") == ("rest-u1", "u1")


def test_buttons_round_trip_through_rasa_strings() -> None:
    """A button payload goes out as a Rasa payload string and comes back as the payload;
    other payload data goes out as custom."""
    message = Message(
        id="m", conversation="rest-u1", channel="http", direction="out",
        sender=Sender(id="commhub", kind="bot"), text="Shall I?",
        payload={"buttons": [{"title": "Yes", "payload": {"value": "yes"}}], "card": {"k": 1}},
    )
    [out] = rasa_replies("u1", [message])
    assert out == {"recipient_id": "u1", "text": "Shall I?",
                   "buttons": [{"title": "Yes", "payload": button_payload({"value": "yes"})}],
                   "custom": {"card": {"k": 1}}}
    pressed = parse_request({"sender": "u1", "message": out["buttons"][0]["payload"]})
    assert (pressed.text, pressed.payload) == (None, {"value": "yes"})
    typed = parse_request({"sender": "u1", "message": "/button not json", "metadata": {"a": 1}})
    assert (typed.text, typed.payload, typed.metadata) == ("/button not json", None, {"a": 1})
    with pytest.raises(ApiError):
        parse_request({"sender": "u1", "message": "hi", "metadata": []})
