"""Acceptance: scripted conversations over two channels, then the analytics views answer.

A whole hub runs in this process. Conversations arrive over the WebSocket channel and,
as a second channel named ``sms``, from a service that injects user messages on
``{prefix}.in.sms.{conversation}``. Meanwhile the test listens to the bus and keeps
every message, classification and workflow event it sees. The views, queried over the
bus like an analyst would, must match what was sent and what crossed the bus.
"""

from __future__ import annotations

import asyncio
import math
import re
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from inproc import ws_port
from wschat import Chat

from commhub.core.classify import BatchingClassifier, Classifier
from commhub.core.envelope import (
    Alternative,
    Classification,
    Message,
    Record,
    Sender,
    WorkflowEvent,
    decode_tagged,
    new_id,
)
from commhub.core.hub import Hub
from commhub.core.records.sandbox import QueryResult
from commhub.core.records.sqlclient import query_over_bus

pytestmark = pytest.mark.timeout(180)

# The sms user messages claim to have been written this long before they were injected
# (a slow phone network), so their first-response latencies are at least this much.
SMS_DELAY = 2.5


class BusLog:
    """Every message, classification and workflow event published under the prefix."""

    def __init__(self) -> None:
        self.messages: dict[str, Message] = {}
        self.classifications: dict[str, Classification] = {}
        self.events: dict[str, WorkflowEvent] = {}

    def add(self, record: Record) -> None:
        match record:
            case Message():
                self.messages[record.id] = record
            case Classification():
                self.classifications[record.id] = record
            case WorkflowEvent():
                self.events[record.id] = record


async def listen(hub: Hub) -> BusLog:
    assert hub.bus is not None
    bus, log = hub.bus, BusLog()

    async def on_msg(msg: Any) -> None:
        tag = bus.subjects.record_tag(msg.subject)
        if tag is not None:
            log.add(decode_tagged(msg.data, tag))

    prefix = bus.subjects.prefix
    for pattern in (f"{prefix}.in.>", f"{prefix}.out.>", f"{prefix}.evt.>"):
        await bus.nc.subscribe(pattern, cb=on_msg)
    await bus.nc.flush()
    return log


async def sql(hub: Hub, query: str) -> QueryResult:
    assert hub.bus is not None
    return await query_over_bus(hub.bus.nc, hub.bus.subjects, query, timeout=30)


async def rows(hub: Hub, query: str) -> list[dict[str, Any]]:
    result = await sql(hub, query)
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]


async def inject(hub: Hub, conversation: str, user: str, text: str) -> Message:
    """A service injects a user message of the ``sms`` channel, written SMS_DELAY ago."""
    assert hub.bus is not None
    message = Message(
        id=new_id(),
        conversation=conversation,
        channel="sms",
        direction="in",
        sender=Sender(id=user, name=user.title()),
        text=text,
        ts=time.time() - SMS_DELAY,
    )
    await hub.bus.publish(hub.bus.subjects.inbound("sms", conversation), message)
    return message


async def wait_for(check: Any, what: str, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout  # a safety net only
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def micros(ts: float) -> int:
    return round(ts * 1_000_000)


def quantile_cont(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks, as DuckDB's quantile_cont."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def first_response_latencies(messages: list[Message]) -> dict[str, list[float]]:
    """By channel: each conversation's first inbound message to the first outbound one
    stamped at or after it, in seconds (the documented definition)."""
    by_conversation: dict[str, list[Message]] = defaultdict(list)
    for m in messages:
        by_conversation[m.conversation].append(m)
    latencies: dict[str, list[float]] = defaultdict(list)
    for conversation_messages in by_conversation.values():
        inbound = sorted(
            (m for m in conversation_messages if m.direction == "in"),
            key=lambda m: (micros(m.ts), m.id),
        )
        if not inbound:
            continue
        first = inbound[0]
        replies = [m for m in conversation_messages
                   if m.direction == "out" and micros(m.ts) >= micros(first.ts)]
        if replies:
            reply = min(replies, key=lambda m: micros(m.ts))
            latencies[first.channel].append((micros(reply.ts) - micros(first.ts)) / 1e6)
    return latencies


async def test_views_answer_from_conversations_over_two_channels(hub: Hub) -> None:
    """Messages per channel, intents with counts and mean confidence, fallback rate,
    funnel and completion per workflow, and p50/p95 first-response latency match what
    was sent and what crossed the bus."""
    log = await listen(hub)
    port = ws_port(hub)

    # WebSocket: one booking completed, one abandoned after two answers, one unclear.
    booked = await Chat.open(port, "ws-booked", user="bob")
    for text in ("I'd like to book a table", "2", "tomorrow", "19:30", "Bob",
                 "bob@example.com"):
        await booked.say(text)
    await booked.say(payload={"value": "yes"})
    await booked.close()
    abandoned = await Chat.open(port, "ws-abandoned", user="ann")
    await abandoned.say("I'd like to book a table")
    await abandoned.say("4")
    await abandoned.close()
    unclear = await Chat.open(port, "ws-unclear", user="cat")
    await unclear.say("xqzzy blorp vlim")
    await unclear.close()
    ws_sent = 7 + 2 + 1

    # sms, injected by a service: a support request and an unclear message.
    sms = [
        await inject(hub, "sms-support", "dan", "I have a problem with my order"),
        await inject(hub, "sms-unclear", "eve", "zzkq wvvx"),
    ]

    async def sms_answered() -> bool:
        answered = {m.conversation for m in log.messages.values() if m.direction == "out"}
        return {m.conversation for m in sms} <= answered

    await wait_for(sms_answered, "the router's replies to the sms conversations")

    # Every record the bus carried is in DuckDB (the recorder's snapshot may lag ~1 s).
    async def recorded() -> bool:
        counts = (await sql(hub, "SELECT (SELECT count(*) FROM messages), "
                                 "(SELECT count(*) FROM classifications), "
                                 "(SELECT count(*) FROM workflow_events)")).rows[0]
        return counts == [len(log.messages), len(log.classifications), len(log.events)]

    await wait_for(recorded, "DuckDB to hold what the bus carried")
    messages = list(log.messages.values())
    classifications = list(log.classifications.values())

    # Messages per channel: what was sent in, and every reply out.
    volume = await rows(hub, "SELECT channel, sum(messages_in) AS n_in, "
                             "sum(messages_out) AS n_out FROM message_volume_daily "
                             "GROUP BY channel ORDER BY channel")
    sent_out = Counter(m.channel for m in messages if m.direction == "out")
    assert volume == [
        {"channel": "sms", "n_in": len(sms), "n_out": sent_out["sms"]},
        {"channel": "websocket", "n_in": ws_sent, "n_out": sent_out["websocket"]},
    ]
    assert sent_out["sms"] >= 2 and sent_out["websocket"] >= ws_sent

    # Intents: counts and mean confidence per workflow chosen ('(none)': the fallback).
    intents = {r["workflow"]: r for r in await rows(hub, "SELECT * FROM intent_mix")}
    by_workflow: dict[str, list[float]] = defaultdict(list)
    for c in classifications:
        by_workflow[c.workflow or "(none)"].append(c.confidence)
    assert set(intents) == set(by_workflow)
    for workflow, confidences in by_workflow.items():
        assert intents[workflow]["classifications"] == len(confidences)
        assert intents[workflow]["mean_confidence"] == pytest.approx(
            statistics.fmean(confidences)
        )
    assert len(by_workflow["book_table"]) == 2
    assert len(by_workflow["support_request"]) == 1

    # Fallback rate: the two unclear messages, of every classification.
    (fallback,) = await rows(hub, "SELECT * FROM fallback_rate")
    assert fallback["fallbacks"] == len(by_workflow["(none)"]) == 2
    assert fallback["classifications"] == len(classifications)
    assert fallback["fallback_rate"] == pytest.approx(2 / len(classifications))
    histogram = await rows(hub, "SELECT * FROM confidence_histogram ORDER BY bucket")
    assert [r["bucket"] for r in histogram] == list(range(10))
    assert sum(r["classifications"] for r in histogram) == len(classifications)

    # Funnel per workflow: the runs that reached each state, from the workflow events.
    reached: dict[tuple[str, str], set[str]] = defaultdict(set)
    for e in log.events.values():
        if e.to_state is not None and e.kind != "emitted":
            reached[(e.workflow, e.to_state)].add(e.run_id)
    funnel = await rows(hub, "SELECT workflow, state, runs FROM workflow_funnel")
    assert {(r["workflow"], r["state"]): r["runs"] for r in funnel} == {
        key: len(runs) for key, runs in reached.items()
    }
    book = {r["state"]: r["runs"] for r in funnel if r["workflow"] == "book_table"}
    assert (book["ask_party_size"], book["ask_day"], book["ask_time"], book["booked"]) == (
        2, 2, 1, 1
    )
    (completion,) = await rows(
        hub, "SELECT runs, completed, open, completion_rate FROM workflow_completion "
             "WHERE workflow = 'book_table'"
    )
    assert completion == {"runs": 2, "completed": 1, "open": 1, "completion_rate": 0.5}

    # First-response latency percentiles per channel, by the documented definition.
    expected = first_response_latencies(messages)
    percentiles = {
        r["channel"]: r
        for r in await rows(hub, "SELECT * FROM latency_percentiles "
                                 "WHERE measure = 'first_response'")
    }
    assert set(percentiles) == {"websocket", "sms", "(all)"}
    expected["(all)"] = [x for values in list(expected.values()) for x in values]
    for channel, latencies in expected.items():
        row = percentiles[channel]
        assert row["responses"] == len(latencies)
        assert row["p50_seconds"] == pytest.approx(quantile_cont(latencies, 0.5), abs=1e-6)
        assert row["p95_seconds"] == pytest.approx(quantile_cont(latencies, 0.95), abs=1e-6)
    assert percentiles["sms"]["p50_seconds"] >= SMS_DELAY
    assert percentiles["sms"]["responses"] == 2
    assert percentiles["websocket"]["responses"] == 3

    # Conversations: one row each, with its channel, user, counts and outcome.
    conversations = {
        r["conversation"]: r
        for r in await rows(hub, "SELECT conversation, channel, user_id, messages_in, "
                                 "workflows, outcome FROM conversations")
    }
    assert set(conversations) == {"ws-booked", "ws-abandoned", "ws-unclear", "sms-support",
                                  "sms-unclear"}
    assert conversations["ws-booked"] == {
        "conversation": "ws-booked", "channel": "websocket", "user_id": "bob",
        "messages_in": 7, "workflows": ["book_table"], "outcome": "completed",
    }
    assert conversations["ws-abandoned"]["outcome"] == "open"
    assert conversations["sms-support"]["channel"] == "sms"
    assert conversations["sms-support"]["user_id"] == "dan"
    assert conversations["sms-support"]["workflows"] == ["support_request"]
    assert conversations["sms-unclear"]["workflows"] == ["fallback"]

    # Active users per day: five people wrote, over both channels.
    active = {r["channel"]: r["users"]
              for r in await rows(hub, "SELECT channel, sum(users) AS users "
                                       "FROM active_users_daily GROUP BY channel")}
    assert active == {"websocket": 3, "sms": 2, "(all)": 5}


# Fixed rankings: the top two too close to call (a clarifying question), and nothing sure.
SCRIPTED = {
    "which one is it": [Alternative("book_table", 0.46), Alternative("order_status", 0.41)],
    "zzqx vlorp": [Alternative("book_table", 0.12), Alternative("order_status", 0.05)],
}


class Scripted(Classifier):
    """The hub's own classifier, except for the texts of SCRIPTED."""

    name = "scripted"

    def __init__(self, inner: Classifier) -> None:
        super().__init__()
        self.inner = inner
        self.model_id = inner.model_id

    def rank(self, texts: Sequence[str], top: int = 3) -> list[list[Alternative]]:
        return [SCRIPTED.get(text) or self.inner.rank([text], top)[0] for text in texts]


def dashboard_query(title: str) -> str:
    """The SQL block docs/dashboard.md shows under the paragraph starting ``title``."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "dashboard.md").read_text()
    found = re.search(rf"^{re.escape(title)}.*?```sql\n(.*?)```", page, re.M | re.S)
    assert found, f"docs/dashboard.md has no query under {title!r}"
    return found.group(1)


async def test_a_clarifying_question_is_not_a_fallback_and_a_cancelled_booking_not_completed(
    hub: Hub,
) -> None:
    """One clarified and one fallback conversation: fallback_rate counts one fallback and
    one clarification apart, and so do intent_mix and the dashboard's queries. A booking
    the user cancels with the workflow's own Cancel button ends in its ``cancelled``
    final state: cancelled, not completed, in workflow_completion, the runs and the
    dashboard's funnel."""
    assert hub.router is not None and hub.classifier is not None
    hub.router.classifier = BatchingClassifier(Scripted(hub.classifier))
    port = ws_port(hub)

    clarified = await Chat.open(port, "an-clarify", user="ann")
    question = await clarified.say("which one is it")
    assert question["text"].startswith("Did you mean")
    await clarified.close()
    unclear = await Chat.open(port, "an-fallback", user="bob")
    await unclear.say("zzqx vlorp")
    await unclear.close()
    booking = await Chat.open(port, "an-cancel", user="cat")
    for text in ("I'd like to book a table", "2", "tomorrow", "19:30", "Cat",
                 "cat@example.com"):
        await booking.say(text)
    own = await booking.say(payload={"value": "cancel"})
    assert own["text"] == "No problem, I haven't booked anything."
    await booking.close()

    async def recorded() -> bool:
        (row,) = await rows(hub, "SELECT (SELECT count(*) FROM classifications) AS c, "
                                 "(SELECT count(*) FROM workflow_runs WHERE "
                                 "workflow = 'book_table' AND outcome <> 'open') AS ended")
        return row == {"c": 3, "ended": 1}

    await wait_for(recorded, "the three classifications and the ended booking")

    decisions = dict((await sql(hub, "SELECT conversation, decision FROM classifications")).rows)
    assert decisions == {"an-clarify": "clarify", "an-fallback": "fallback",
                         "an-cancel": "workflow"}
    (fallback,) = await rows(hub, "SELECT * FROM fallback_rate")
    assert fallback == {"classifications": 3, "fallbacks": 1,
                        "fallback_rate": pytest.approx(1 / 3), "clarifications": 1}
    (daily,) = await rows(hub, "SELECT fallbacks, clarifications FROM fallback_rate_daily")
    assert daily == {"fallbacks": 1, "clarifications": 1}
    intents = dict((await sql(hub, "SELECT workflow, classifications FROM intent_mix")).rows)
    assert intents == {"(clarify)": 1, "(none)": 1, "book_table": 1}
    histogram = await rows(hub, "SELECT sum(fallbacks) AS f, sum(clarifications) AS c "
                                "FROM confidence_histogram")
    assert histogram == [{"f": 1, "c": 1}]

    (completion,) = await rows(
        hub, "SELECT runs, completed, cancelled, completion_rate FROM workflow_completion "
             "WHERE workflow = 'book_table'")
    assert completion == {"runs": 1, "completed": 0, "cancelled": 1, "completion_rate": 0.0}
    (conversation,) = await rows(
        hub, "SELECT outcome FROM conversations WHERE conversation = 'an-cancel'")
    assert conversation == {"outcome": "cancelled"}

    # The dashboard's queries, as docs/dashboard.md shows them (the page runs the same).
    daily_rate = await rows(hub, dashboard_query("Fallback rate per day"))
    assert [(r["fallbacks"], r["classifications"]) for r in daily_rate] == [(1, 3)]
    mix = {r["workflow"]: r["classifications"]
           for r in await rows(hub, dashboard_query("Intent mix"))}
    assert mix == intents
    funnel = await rows(hub, dashboard_query("Workflow funnel"))
    book = {r["state"]: (r["started"], r["completed"]) for r in funnel
            if r["workflow"] == "book_table"}
    assert book["cancelled"] == (1, 0)
