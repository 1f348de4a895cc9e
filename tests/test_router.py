"""Router guarantees under faults: order per conversation, no doubled step on a re-run."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import nats
import nats.errors
import pytest
from inproc import hub_state, ws_port
from nats.js.errors import (
    InvalidKeyError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    ServerError,
    ServiceUnavailableError,
)
from wschat import Chat

from commhub.core.busfaults import bus_unavailable
from commhub.core.config import Settings
from commhub.core.envelope import InvalidRecord, Message, Sender, decode_as, encode, new_id
from commhub.core.hookspecs import hookimpl
from commhub.core.hub import Hub
from commhub.core.plugins import Plugins
from commhub.core.routing import router as router_module


async def count_out_messages(hub: Hub, conversation: str) -> int:
    """Outbound messages of a conversation stored in the stream (what clients can get)."""
    assert hub.bus is not None
    subject = hub.bus.subjects.outbound("websocket", conversation)
    info = await hub.bus.js.stream_info(hub.bus.subjects.messages_stream, subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


async def test_a_failed_commit_publishes_nothing_and_the_step_runs_again(hub: Hub) -> None:
    """If the state write fails, none of the step's outputs go out; the step is computed
    again and its replies and events are published once."""
    assert hub.bus is not None
    kv = await hub.bus.state_bucket()
    chat = await Chat.open(ws_port(hub), "fault1")
    await chat.say("I'd like to book a table")
    before = await count_out_messages(hub, "fault1")

    real_update = kv.update
    failures = 0
    out_at_failure = -1

    async def update_failing_once(key: str, value: bytes, last: Any = None) -> int:
        nonlocal failures, out_at_failure
        if key == "fault1" and failures == 0:
            failures += 1
            out_at_failure = await count_out_messages(hub, "fault1")
            raise RuntimeError("simulated failure of the state write")
        return await real_update(key, value, last=last)

    kv.update = update_failing_once  # type: ignore[method-assign]
    try:
        message_id = await chat.send("4")
        await chat.replies_to(message_id)
        marker = await chat.send("tomorrow")  # proves the retried step was committed
        await chat.replies_to(marker)
    finally:
        kv.update = real_update  # type: ignore[method-assign]

    assert failures == 1
    assert out_at_failure == before  # nothing went out before the commit
    assert [m["reply_to"] for m in chat.messages].count(message_id) == 1
    assert await count_out_messages(hub, "fault1") == before + 2
    state = await hub_state(hub, "fault1")
    assert state["state"] == "ask_time"
    await chat.close()


async def test_a_crash_between_commit_and_publish_republishes_the_outbox_once(
    hub: Hub,
) -> None:
    """If publishing fails after the state committed (as in a crash), the retried input
    finds its step committed and publishes the stored outputs, exactly once."""
    assert hub.bus is not None
    chat = await Chat.open(ws_port(hub), "fault2")
    await chat.say("I'd like to book a table")
    before = await count_out_messages(hub, "fault2")

    real_publish_all = hub.bus.publish_all
    failures = 0

    async def publish_failing_once(items: Any) -> Any:
        nonlocal failures
        items = list(items)
        if failures == 0 and any(".out." in subject for subject, _ in items):
            failures += 1
            # Part of it went out before the "crash": the retry must not double it.
            await real_publish_all(items[:1])
            raise RuntimeError("simulated crash after commit, mid-publish")
        return await real_publish_all(items)

    hub.bus.publish_all = publish_failing_once  # type: ignore[method-assign]
    try:
        message_id = await chat.send("4")
        await chat.replies_to(message_id)
        marker = await chat.send("tomorrow")
        await chat.replies_to(marker)
    finally:
        hub.bus.publish_all = real_publish_all  # type: ignore[method-assign]

    assert failures == 1
    assert hub.router is not None and hub.router.stats.skipped_redeliveries >= 1
    assert [m["reply_to"] for m in chat.messages].count(message_id) == 1
    assert await count_out_messages(hub, "fault2") == before + 2
    await chat.close()


async def test_a_state_written_by_another_router_wins_over_the_cache(hub: Hub) -> None:
    """When another process changed the conversation's state, the next input is handled
    on that state, and the stale computation publishes nothing."""
    assert hub.bus is not None
    kv = await hub.bus.state_bucket()
    chat = await Chat.open(ws_port(hub), "stale1")
    await chat.say("I'd like to book a table")
    # Another router moves the conversation on (here: straight to the email question).
    entry = await kv.get("stale1")
    stored = msgspec.json.decode(entry.value)
    stored["state"].update(state="ask_email", slots={
        "party_size": 2, "day": "2030-01-01", "time": "19:30", "name": "Bo"})
    stored["outbox"] = []
    await kv.put("stale1", msgspec.json.encode(stored))

    message_id = await chat.send("bo@example.com")
    (reply,) = await chat.replies_to(message_id)
    assert "Shall I book" in reply["text"] and "Bo" in reply["text"]
    marker = await chat.send("yes")
    await chat.replies_to(marker)
    assert [m["reply_to"] for m in chat.messages].count(message_id) == 1
    assert hub.router is not None and hub.router.stats.conflicts >= 1
    await chat.close()


async def test_a_late_redelivery_is_acked_without_running_or_publishing_again(
    hub: Hub, nats_url: str
) -> None:
    """An input handled before later inputs of its conversation, coming back late (its
    ack was lost), is acked: no step runs and nothing is published, neither its own
    replies nor the stored outbox of the last input."""
    assert hub.bus is not None and hub.router is not None
    chat = await Chat.open(ws_port(hub), "late1")
    first = await chat.send("I'd like to book a table")
    await chat.replies_to(first)
    for text in ("4", "tomorrow"):
        await chat.say(text)
    before = await hub_state(hub, "late1")
    skipped = hub.router.stats.skipped_redeliveries
    published: list[tuple[str, Any]] = []
    real_publish_all = hub.bus.publish_all

    async def recording(items: Any) -> Any:
        items = list(items)
        published.extend(items)
        return await real_publish_all(items)

    hub.bus.publish_all = recording  # type: ignore[method-assign]
    try:
        copy = Message(id=first, conversation="late1", channel="websocket", direction="in",
                       sender=Sender(id="u1"), text="I'd like to book a table")
        nc = await nats.connect(nats_url)
        # Another Nats-Msg-Id gets it past the duplicate window, as a redelivery of the
        # stored message would: only the state can tell it was handled.
        await nc.jetstream().publish(hub.bus.subjects.inbound("websocket", "late1"),
                                     encode(copy), headers={"Nats-Msg-Id": "late-copy"})
        await nc.close()
        marker = await chat.send("19:30")  # handled after the copy (same conversation)
        await chat.replies_to(marker)
    finally:
        hub.bus.publish_all = real_publish_all  # type: ignore[method-assign]

    assert hub.router.stats.skipped_redeliveries == skipped + 1
    assert [m["reply_to"] for m in chat.messages].count(first) == 1
    handled = {getattr(r, "reply_to", None) or getattr(r, "message_id", None)
               for _, r in published}
    assert handled == {marker}  # the copy published nothing, not even the last outbox
    after = await hub_state(hub, "late1")
    assert after["turns"] == before["turns"] + 1 and after["state"] == "ask_name"
    assert first in after["recent_inputs"]
    await chat.close()


class RewriteToBooking:
    """Inbound middleware that turns the text "xyzzy" into a booking request."""

    @hookimpl
    def inbound_message(self, message: Message) -> Any:
        if message.text != "xyzzy":
            return None
        return msgspec.structs.replace(message, text="I'd like to book a table")


async def test_the_classification_records_the_message_the_middleware_returned(
    settings: Settings, nats_url: str
) -> None:
    """What the rules classified is what the Classification records: the text as the
    inbound middleware rewrote it, not the text as it arrived."""
    hub = Hub(settings, plugins=Plugins.load(extra=[RewriteToBooking()]))
    await hub.start()
    try:
        assert hub.bus is not None
        nc = await nats.connect(nats_url)
        sub = await nc.subscribe(hub.bus.subjects.classified("mw1"))
        await nc.flush()  # the server knows the subscription before the message is sent
        chat = await Chat.open(ws_port(hub), "mw1")
        reply = await chat.say("xyzzy")
        assert "how many" in reply["text"].lower()
        classified = msgspec.json.decode((await sub.next_msg(timeout=15)).data)
        assert (classified["text"], classified["workflow"]) == (
            "I'd like to book a table", "book_table")
        await chat.close()
        await nc.close()
    finally:
        await hub.stop()


def test_the_backoff_in_place_adds_up_to_what_the_comment_says() -> None:
    """The router retries a failing step in place with pauses of 1.55 s in all (none
    after the last in-place attempt: the input is then handed back with a nak)."""
    policy = router_module.RETRY_POLICY
    pauses = [policy.wait_after(a) for a in range(1, policy.in_place_attempts)]
    assert sum(pauses) == pytest.approx(1.55)


async def invalid_reports(hub: Hub) -> list[InvalidRecord]:
    """Every InvalidRecord stored on the hub's evt.invalid so far."""
    assert hub.bus is not None
    s = hub.bus.subjects
    info = await hub.bus.js.stream_info(s.events_stream, subjects_filter=s.invalid)
    count = (info.state.subjects or {}).get(s.invalid, 0)
    if not count:
        return []
    sub = await hub.bus.js.subscribe(s.invalid, ordered_consumer=True)
    try:
        return [decode_as((await sub.next_msg(timeout=10)).data, InvalidRecord)
                for _ in range(count)]
    finally:
        await sub.unsubscribe()


async def test_an_input_whose_subject_names_no_valid_conversation_is_reported_once(
    hub: Hub,
) -> None:
    """A valid Message on ``in.websocket.a+b`` (not a usable conversation id: it cannot
    be a state key) is terminated at once and reported once on evt.invalid, never
    retried or redelivered; the router goes on with the next input."""
    assert hub.bus is not None and hub.router is not None
    s = hub.bus.subjects
    poison = Message(id=new_id(), conversation="a+b", channel="websocket", direction="in",
                     sender=Sender(id="mallory"), text="I'd like to book a table")
    await hub.bus.publish(s.inbound("websocket", "a+b"), poison)
    chat = await Chat.open(ws_port(hub), "after-poison")
    assert "how many" in (await chat.say("I'd like to book a table"))["text"].lower()
    await chat.close()
    async with asyncio.timeout(15):
        while not (reports := await invalid_reports(hub)):
            await asyncio.sleep(0.05)
        while True:
            infos = [await hub.bus.js.consumer_info(s.inputs_stream, s.partition_consumer(k))
                     for k in hub.router.held_partitions]
            if not any(i.num_ack_pending for i in infos):
                break
            await asyncio.sleep(0.05)
    (report,) = reports
    assert (report.subject, report.source) == (s.inbound("websocket", "a+b"), "router")
    assert "invalid conversation 'a+b'" in report.reason
    assert decode_as(report.data.encode(), Message).id == poison.id
    assert not any(i.num_redelivered for i in infos)
    assert (hub.router.stats.invalid, hub.router.stats.retries) == (1, 0)


async def test_one_conversation_is_handled_in_order(hub: Hub) -> None:
    """Messages sent back to back without waiting are answered in the order sent."""
    chat = await Chat.open(ws_port(hub), "order1")
    ids = [await chat.send(text) for text in
           ("I'd like to book a table", "4", "tomorrow", "19:30", "Ann")]
    replies = [(await chat.replies_to(i))[0] for i in ids]
    assert [r["cursor"] for r in replies] == sorted(r["cursor"] for r in replies)
    assert "how many" in replies[0]["text"].lower()
    assert "email" in replies[-1]["text"].lower()
    await chat.close()


async def test_a_bus_outage_longer_than_the_retries_in_place_keeps_the_order(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node dies under the first of three messages sent back to back: its state reads
    fail with "no response from stream" (what a leader change raises; the other such
    failures are listed in the test below), more times than the retries in place
    allow. The router holds the message through the outage instead of handing it back,
    so the two after it do not overtake it: the replies come in the order sent."""
    fault = NoStreamResponseError()
    monkeypatch.setattr(router_module, "BUS_PAUSE_FIRST_SECONDS", 0.01)
    monkeypatch.setattr(router_module, "BUS_PAUSE_CAP_SECONDS", 0.05)
    in_place = router_module.RETRY_POLICY.in_place_attempts
    store = hub.router.store
    real_load = store.load
    failures = 0

    async def load_failing_first(conversation: str) -> Any:
        nonlocal failures
        if conversation == "outage1" and failures <= in_place:
            failures += 1
            raise fault
        return await real_load(conversation)

    monkeypatch.setattr(store, "load", load_failing_first)
    chat = await Chat.open(ws_port(hub), "outage1")
    ids = [await chat.send(text) for text in ("I'd like to book a table", "4", "tomorrow")]
    replies = [(await chat.replies_to(i))[0] for i in ids]
    assert failures == in_place + 1
    assert [r["cursor"] for r in replies] == sorted(r["cursor"] for r in replies)
    assert "how many" in replies[0]["text"].lower()
    assert hub.router.stats.handed_back == 0
    await chat.close()


def test_what_a_leader_change_raises_is_an_outage_and_a_bug_is_not() -> None:
    for outage in (NoStreamResponseError(), ServiceUnavailableError(), ServerError(),
                   nats.errors.NoRespondersError(), nats.errors.TimeoutError(),
                   nats.errors.ConnectionReconnectingError(), TimeoutError(),
                   ConnectionResetError()):
        assert bus_unavailable(outage), outage
    for bug in (RuntimeError("boom"), KeyError("slot"), ValueError("bad"),
                KeyWrongLastSequenceError(), InvalidKeyError()):
        assert not bus_unavailable(bug), bug


async def test_many_conversations_progress_in_parallel(hub: Hub) -> None:
    """Twenty concurrent conversations each finish a booking with their own slots."""

    async def book(n: int) -> str:
        chat = await Chat.open(ws_port(hub), f"par{n}", user=f"user{n}")
        for text in ("I'd like to book a table", str(n % 9 + 1), "tomorrow", "19:30",
                     f"Guest{n}", f"guest{n}@example.com"):
            await chat.say(text)
        done = await chat.say(payload={"value": "yes"})
        await chat.close()
        return str(done["text"])

    results = await asyncio.gather(*(book(n) for n in range(20)))
    for n, text in enumerate(results):
        assert f"guest{n}@example.com" in text and f"for {n % 9 + 1} " in text
