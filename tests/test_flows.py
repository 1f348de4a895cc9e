"""Workflow features end to end on a real hub and NATS: services driving a run, agents,
request/reply, timeouts with two routers, idle expiry, cancel/restart, clarification."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import nats
import pytest
from fakeclock import FakeClock
from inproc import hub_state, ws_port
from wschat import Chat

from commhub.core.bus import Bus
from commhub.core.classify import BatchingClassifier, Classifier
from commhub.core.config import Settings
from commhub.core.envelope import Alternative
from commhub.core.hub import Hub
from commhub.core.routing.router import REQUEST_ID_HEADER, Router

pytestmark = pytest.mark.timeout(180)


async def wait_for_text(chat: Chat, needle: str, timeout: float = 20) -> dict[str, Any]:
    """The first bot message containing ``needle``, waiting (bounded) for it to arrive."""
    async with asyncio.timeout(timeout):
        while True:
            for message in chat.messages:
                if needle in (message.get("text") or ""):
                    return message
            await chat.next_frame("message")


async def wait_until(predicate: Any, timeout: float = 20) -> None:
    """Poll an async predicate until it holds (bounded)."""
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(settings: Settings, **update: Any) -> AsyncIterator[Hub]:
    hub = Hub(settings.model_copy(update=update))
    await hub.start()
    try:
        yield hub
    finally:
        await hub.stop()


@contextlib.asynccontextmanager
async def service(url: str) -> AsyncIterator[nats.aio.client.Client]:
    """Another process's plain nats-py connection."""
    nc = await nats.connect(url)
    try:
        yield nc
    finally:
        await nc.close()


async def publish_input(nc: Any, prefix: str, conversation: str, event: str,
                        data: dict[str, Any]) -> str:
    """Publish a WorkflowInput as hand-written JSON, as a service in any language would."""
    wid = uuid.uuid4().hex
    body = {"type": "workflow_input", "id": wid, "conversation": conversation,
            "event": event, "data": data, "sender": {"id": "backoffice", "kind": "service"}}
    await nc.jetstream().publish(f"{prefix}.wf.{conversation}", json.dumps(body).encode(),
                                 headers={"Nats-Msg-Id": wid})
    return wid


async def stored_count(hub: Hub, subject: str) -> int:
    assert hub.bus is not None
    info = await hub.bus.js.stream_info(hub.bus.subjects.messages_stream,
                                        subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


# --------------------------------------------------------------------------- services
async def test_a_back_office_service_drives_a_support_request_to_completion(
    hub: Hub, nats_url: str, prefix: str
) -> None:
    """A plain nats-py back office gets request.created, reports progress and the
    resolution on {prefix}.wf.{conversation}; the WebSocket user sees every step."""
    async with service(nats_url) as nc:
        created: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def on_created(msg: Any) -> None:
            await created.put(json.loads(msg.data))

        await nc.subscribe(f"{prefix}.evt.workflow.support_request.request.created",
                           cb=on_created)
        chat = await Chat.open(ws_port(hub), "sr1", user="sam")
        assert "describe" in (await chat.say("I was charged twice"))["text"]
        await chat.say("My card was charged twice for order 5521")
        await chat.say(payload={"value": "urgent"})
        confirm = await chat.say("sam@example.com")
        assert "Shall I send it?" in confirm["text"]
        filed = await chat.say(payload={"value": "yes"})
        assert "filed" in filed["text"]

        event = await asyncio.wait_for(created.get(), 15)
        assert event["kind"] == "emitted" and event["conversation"] == "sr1"
        assert event["data"] == {"description": "My card was charged twice for order 5521",
                                 "urgency": "urgent", "email": "sam@example.com"}
        conversation = event["conversation"]
        await publish_input(nc, prefix, conversation, "request.progress",
                            {"status": "assigned to Kim", "note": "She is checking it."})
        assert "assigned to Kim" in (await wait_for_text(chat, "Update on"))["text"]
        # The user asks meanwhile: the run stays open and says so.
        waiting = await chat.say("any news?")
        assert "being worked on" in waiting["text"]
        await publish_input(nc, prefix, conversation, "request.resolved",
                            {"resolution": "The second charge was refunded."})
        done = await wait_for_text(chat, "resolved")
        assert "refunded" in done["text"]
        state = await hub_state(hub, "sr1")
        assert state["workflow"] is None
        await chat.close()


async def test_order_lookup_asks_a_service_over_request_reply(
    hub: Hub, nats_url: str
) -> None:
    """order_status asks shop.orders.status with the order number and a request id
    header; the service's JSON reply fills the answer. With no service at all, the
    error branch says so."""
    async with service(nats_url) as nc:
        asked: list[tuple[dict[str, Any], str]] = []

        async def orders(msg: Any) -> None:
            asked.append((json.loads(msg.data), msg.headers[REQUEST_ID_HEADER]))
            await msg.respond(json.dumps({"status": "shipped", "eta": "2030-01-02"}).encode())

        sub = await nc.subscribe("shop.orders.status", cb=orders)
        await nc.flush()
        chat = await Chat.open(ws_port(hub), "ord1")
        await chat.say(payload={"start": "order_status"})
        looking = await chat.say("it's 12345")
        assert "look up order 12345" in looking["text"]
        found = await wait_for_text(chat, "shipped")
        assert found["text"] == "Order 12345: shipped. Expected delivery: 2030-01-02."
        assert [body for body, _ in asked] == [{"order_id": "12345"}]
        assert asked[0][1]  # the id a service can dedupe on
        await sub.unsubscribe()
        await nc.flush()

        await chat.say(payload={"start": "order_status"})
        await chat.say("order 55555")
        assert "can't reach the order system" in (await wait_for_text(chat, "reach"))["text"]
        await chat.close()


SLOW_ASK = """
name: slow_lookup
description: Ask a slow service
initial: lookup
slots: {{answer: text}}
states:
  lookup:
    say: Asking.
    ask: {{subject: {subject}, timeout: 0.5}}
    on:
      - reply: ok
        to: answered
      - reply: timeout
        to: too_slow
      - reply: error
        to: failed
  answered: {{final: true, say: "Answer: {{answer}}"}}
  too_slow: {{final: true, say: The service took too long.}}
  failed: {{final: true, say: The service failed.}}
"""


async def test_a_service_that_does_not_answer_in_time_takes_the_timeout_branch(
    settings: Settings, nats_url: str, tmp_path: Path
) -> None:
    """A service that receives the request but never answers: after the ask's timeout
    the run takes its ``reply: timeout`` transition."""
    subject = f"slow.{uuid.uuid4().hex}"
    path = tmp_path / "slow.yaml"
    path.write_text(SLOW_ASK.format(subject=subject))
    async with running(settings, workflow_paths=[path]) as hub, service(nats_url) as nc:
        received = asyncio.Event()

        async def silent(msg: Any) -> None:
            received.set()  # and never respond

        await nc.subscribe(subject, cb=silent)
        await nc.flush()
        chat = await Chat.open(ws_port(hub), "slow1")
        await chat.say(payload={"start": "slow_lookup"})
        assert (await wait_for_text(chat, "took too long"))["text"]
        assert received.is_set()
        assert hub.router is not None and hub.router.stats.ask_failures == 1
        await chat.close()


# --------------------------------------------------------------------------- handoff
async def test_handoff_round_trip_with_an_agent(hub: Hub, nats_url: str, prefix: str) -> None:
    """Unclear twice: the fallback hands over. Agents get a handoff event; the bot stays
    silent while the user and a plain nats-py agent talk over the bus; the agent's
    handoff.end returns the conversation to the bot."""
    async with service(nats_url) as agent:
        handoffs: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def on_handoff(msg: Any) -> None:
            await handoffs.put(json.loads(msg.data))

        user_lines: list[str] = []

        async def on_user(msg: Any) -> None:
            user_lines.append(json.loads(msg.data).get("text") or "")

        await agent.subscribe(f"{prefix}.evt.workflow.*.handoff", cb=on_handoff)
        await agent.subscribe(f"{prefix}.in.*.ho1", cb=on_user)
        # The agent announces itself: without a heartbeat the fallback hands off to nobody.
        agents = await agent.jetstream().key_value(f"{prefix}_agents")
        await agents.put("agent-7", json.dumps({"name": "Eve", "ts": 0, "capacity": 1}).encode())
        assert hub.router is not None and hub.router.agents is not None
        await wait_until(lambda: _true(hub.router.agents.available()))
        chat = await Chat.open(ws_port(hub), "ho1", user="una")
        await chat.say("xyzzy plugh frobnicate")
        handed = await chat.say("qwerty asdf zxcv")
        assert "hand you over" in handed["text"]

        event = await asyncio.wait_for(handoffs.get(), 15)
        assert event["kind"] == "handoff" and event["conversation"] == "ho1"
        channel = event["data"]["channel"]
        assert channel == "websocket" and event["data"]["user"] == "una"

        silent_id = await chat.send("hello? is anyone there?")
        await publish_input(agent, prefix, "ho1", "handoff.accepted", {})
        aid = uuid.uuid4().hex
        reply = {"type": "message", "id": aid, "conversation": "ho1", "channel": channel,
                 "direction": "out", "sender": {"id": "agent-7", "kind": "agent", "name": "Eve"},
                 "text": "Hi, Eve here. How can I help?"}
        await agent.jetstream().publish(f"{prefix}.out.{channel}.ho1",
                                        json.dumps(reply).encode(),
                                        headers={"Nats-Msg-Id": aid})
        seen = await wait_for_text(chat, "Eve here")
        assert seen["id"] == aid
        await chat.send("I need to change my delivery address")
        await wait_until(lambda: _true(any("delivery address" in t for t in user_lines)))
        assert not [m for m in chat.messages if m.get("reply_to") == silent_id]
        assert (await hub_state(hub, "ho1"))["handoff"] is True

        await publish_input(agent, prefix, "ho1", "handoff.end", {})
        assert await wait_for_text(chat, "back with the assistant")
        state = await hub_state(hub, "ho1")
        assert state["handoff"] is False and state["workflow"] is None
        booking = await chat.say("I'd like to book a table")
        assert "how many" in booking["text"].lower()  # the bot answers again
        bot_during_handoff = [m for m in chat.messages if m["sender"]["kind"] == "bot"
                              and m["cursor"] > handed["cursor"]
                              and m["cursor"] < seen["cursor"]]
        assert bot_during_handoff == []
        await chat.close()


async def _true(value: bool) -> bool:
    return value


# --------------------------------------------------------------------------- phrases
async def test_cancel_and_restart_phrases_work_in_any_workflow(hub: Hub) -> None:
    """"start over" restarts the active workflow; "stop" cancels it; a state's own
    cancel button still goes to the workflow's own cancelled state."""
    chat = await Chat.open(ws_port(hub), "cr1")
    await chat.say("I'd like to book a table")
    await chat.say("4")
    restarted = await chat.say("Start over!")
    assert "how many" in restarted["text"].lower()
    state = await hub_state(hub, "cr1")
    assert state["state"] == "ask_party_size" and state["slots"] == {}
    cancelled = await chat.say("stop")
    assert "stopped" in cancelled["text"]
    assert (await hub_state(hub, "cr1"))["workflow"] is None

    await chat.say("I'd like to book a table")
    for answer in ("2", "tomorrow", "19:30", "Ann", "ann@example.com"):
        await chat.say(answer)
    own = await chat.say("cancel")
    assert own["text"] == "No problem, I haven't booked anything."
    await chat.close()


# --------------------------------------------------------------------------- clarify
class TwoClose(Classifier):
    """A deterministic classifier that finds two workflows equally likely."""

    name = "two-close"

    def fit(self, examples: Any) -> None:
        self.model_id = "two-close"

    def rank(self, texts: Sequence[str], top: int = 3) -> list[list[Alternative]]:
        return [[Alternative("book_table", 0.46), Alternative("order_status", 0.41),
                 Alternative("support_request", 0.13)] for _ in texts]


async def test_two_close_candidates_get_a_clarifying_question(
    hub: Hub, nats_url: str, prefix: str
) -> None:
    """When the top two are within clarify_margin, the user is asked which one, with a
    start button each; the classification records the decision; a press starts it."""
    assert hub.router is not None
    hub.router.classifier = BatchingClassifier(TwoClose())
    async with service(nats_url) as nc:
        classifications: list[dict[str, Any]] = []

        async def on_classified(msg: Any) -> None:
            classifications.append(json.loads(msg.data))

        await nc.subscribe(f"{prefix}.evt.classified.cl1", cb=on_classified)
        chat = await Chat.open(ws_port(hub), "cl1")
        question = await chat.say("my table order")
        assert question["text"] == ('Did you mean "Book a table at the restaurant" or '
                                    '"Check the status of an order"?')
        assert [b["payload"] for b in question["payload"]["buttons"]] == [
            {"start": "book_table"}, {"start": "order_status"}]
        assert (await hub_state(hub, "cl1"))["workflow"] is None
        started = await chat.say(payload={"start": "order_status"})
        assert "order number" in started["text"]
        await wait_until(lambda: _true(len(classifications) == 2))
        first, second = classifications
        assert first["decision"] == "clarify" and first["workflow"] is None
        assert [a["workflow"] for a in first["alternatives"]][:2] == ["book_table", "order_status"]
        assert second["decision"] == "button" and second["workflow"] == "order_status"
        await chat.close()


# --------------------------------------------------------------------------- timers
# The routers' timers read a FakeClock: a deadline passes when the test moves the
# clock, not after seconds of waiting. The engine stamps deadlines from the messages'
# own times (the wall clock), so the fake clock starts at the present.
REMINDER = """
name: reminder
description: A half-minute deadline
initial: waiting
states:
  waiting:
    say: Say anything within half a minute.
    on:
      - message: any
        to: in_time
      - timeout: 30
        to: too_late
  in_time: {final: true, say: Just in time.}
  too_late: {final: true, say: Time is up.}
"""


async def test_a_timeout_fires_once_with_two_routers(
    settings: Settings, nats_url: str, tmp_path: Path
) -> None:
    """Two routers on one prefix both schedule the state's timeout from the bucket and
    both publish it when it is due; JetStream keeps one copy, and the transition runs
    once."""
    path = tmp_path / "reminder.yaml"
    path.write_text(REMINDER)
    async with running(settings, workflow_paths=[path]) as hub:
        assert hub.router is not None and hub.engine is not None and hub.bus is not None
        router = hub.router
        bus2 = await Bus.connect(nats_url, hub.bus.subjects)
        second = Router(bus2, hub.engine, router.classifier, hub.plugins,
                        threshold=router.policy.threshold)
        clock = FakeClock().attach(router.timers, second.timers)
        await second.start()
        try:
            chat = await Chat.open(ws_port(hub), "tm1")
            await chat.say(payload={"start": "reminder"})
            await wait_until(lambda: _true(router.timers.pending("tm1") >= 1
                                           and second.timers.pending("tm1") >= 1))
            clock.advance(60)
            await wait_for_text(chat, "Time is up.")
            await wait_until(lambda: _true(
                router.timers.published >= 1 and second.timers.published >= 1))
            # Both published; the stream holds one timeout input, and one reply.
            assert await stored_count(hub, hub.bus.subjects.workflow_input("tm1")) == 1
            clock.set(time.time())  # back to the present: the next deadline is ahead
            marker = await chat.say(payload={"start": "reminder"})  # flushes the pipeline
            assert marker["text"] == "Say anything within half a minute."
            assert [m["text"] for m in chat.messages].count("Time is up.") == 1
            on_time = await chat.say("here I am")
            assert on_time["text"] == "Just in time."
            await chat.close()
        finally:
            await second.stop()
            await bus2.close()


async def test_timers_survive_a_router_restart(
    settings: Settings, nats_url: str, tmp_path: Path
) -> None:
    """A timeout armed while one hub ran fires from the next hub: the deadline is in
    the bucket, and the new router rebuilds its timers from it."""
    path = tmp_path / "reminder.yaml"
    path.write_text(REMINDER)
    async with running(settings, workflow_paths=[path]) as hub:
        first = hub.router
        assert first is not None
        FakeClock().attach(first.timers)  # stands still: the deadline never comes here
        chat = await Chat.open(ws_port(hub), "tm2")
        await chat.say(payload={"start": "reminder"})
        await wait_until(lambda: _true(first.timers.pending("tm2") >= 1))
        await first.stop()
        hub.router = None
        await chat.close()
    assert first.timers.published == 0
    async with running(settings, workflow_paths=[path]) as hub:
        assert hub.router is not None
        later = hub.router
        await wait_until(lambda: _true(later.timers.pending("tm2") >= 1))  # from the bucket
        FakeClock().attach(later.timers).advance(60)
        chat = await Chat.open(ws_port(hub), "tm2", after=0)
        assert await wait_for_text(chat, "Time is up.")
        await chat.close()


async def test_an_idle_run_expires(settings: Settings, nats_url: str, prefix: str) -> None:
    """A run with no input for idle_expiry_seconds (an hour by default) ends with an
    expired WorkflowEvent and the conversation is idle again."""
    async with running(settings) as hub, service(nats_url) as nc:
        assert hub.router is not None
        router = hub.router
        clock = FakeClock().attach(router.timers)
        expired: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def on_expired(msg: Any) -> None:
            await expired.put(json.loads(msg.data))

        await nc.subscribe(f"{prefix}.evt.workflow.*.expired", cb=on_expired)
        chat = await Chat.open(ws_port(hub), "idle1")
        await chat.say("I'd like to book a table")
        state = await hub_state(hub, "idle1")
        await wait_until(lambda: _true(router.timers.pending("idle1") >= 1))
        clock.set(time.time() + settings.idle_expiry_seconds + 1)  # an hour after the input
        event = await asyncio.wait_for(expired.get(), 20)
        assert event["workflow"] == "book_table" and event["run_id"] == state["run_id"]
        assert event["from_state"] == "ask_party_size"
        assert (await hub_state(hub, "idle1"))["workflow"] is None
        clock.set(time.time())  # back to the present for the next run
        # The next message is classified afresh.
        assert "how many" in (await chat.say("book a table please"))["text"].lower()
        await chat.close()
