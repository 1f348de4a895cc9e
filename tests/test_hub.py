"""The whole hub in one process: a conversation end to end, seen from every side."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import pytest
from inproc import hub_state, ws_port
from wschat import Chat

from commhub.core import hub as hub_module
from commhub.core.config import Settings
from commhub.core.envelope import (
    Classification,
    Message,
    Sender,
    WorkflowEvent,
    decode,
)
from commhub.core.hub import Hub
from commhub.core.records.sqlclient import query_file, query_over_bus
from commhub.core.web import ListenError
from commhub.core.workflow import WorkflowError

BOOKING = ["4", "tomorrow", "19:30", "Ann", "ann@example.com"]






class Observer:
    """Another process's view of the bus: a plain nats-py subscription to everything."""

    def __init__(self) -> None:
        self.records: list[tuple[str, Any]] = []
        self.changed = asyncio.Event()

    async def handler(self, msg: nats.aio.msg.Msg) -> None:
        self.records.append((msg.subject, decode(msg.data)))
        self.changed.set()

    def of(self, kind: type) -> list[Any]:
        return [r for _, r in self.records if isinstance(r, kind)]

    async def wait_for(self, predicate: Any, timeout: float = 15) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def observer(url: str, prefix: str) -> AsyncIterator[Observer]:
    nc = await nats.connect(url)
    seen = Observer()
    await nc.subscribe(f"{prefix}.>", cb=seen.handler)
    try:
        yield seen
    finally:
        await nc.close()


async def test_a_conversation_runs_a_workflow_to_its_final_state(
    hub: Hub, settings: Settings, nats_url: str, prefix: str
) -> None:
    """A WebSocket user books a table; another process sees the inbound message, the
    classification with its confidence and every workflow event; SQL sees the rows."""
    async with observer(nats_url, prefix) as seen:
        chat = await Chat.open(ws_port(hub), "conv1", user="ann")
        first = await chat.say("I'd like to book a table for dinner")
        assert "how many" in first["text"].lower()
        for answer in BOOKING:
            await chat.say(answer)
        confirm = chat.messages[-1]
        assert confirm["payload"]["buttons"][0]["payload"] == {"value": "yes"}
        done = await chat.say(payload={"value": "yes"})
        assert "Ann" in done["text"] or "4" in done["text"]
        await chat.close()

        # A step's emits are published after its workflow events: wait for both.
        await seen.wait_for(lambda: {"completed", "emitted"} <= {
            e.kind for e in seen.of(WorkflowEvent)})
        inbound = [m for m in seen.of(Message) if m.direction == "in"]
        assert inbound[0].text == "I'd like to book a table for dinner"
        assert inbound[0].conversation == "conv1" and inbound[0].sender.id == "ann"
        (classification,) = seen.of(Classification)
        assert classification.workflow == "book_table"
        # The default threshold is the fixed 0.35, recorded with each classification.
        assert classification.threshold == 0.35
        assert classification.confidence >= classification.threshold
        [router_line] = [e for e in hub.endpoints if e.startswith("router:")]
        assert router_line.endswith("threshold 0.350 (fixed)")
        assert classification.alternatives[0].workflow == "book_table"
        kinds = [e.kind for e in seen.of(WorkflowEvent)
                 if e.workflow == "book_table" and e.kind != "emitted"]
        assert kinds[0] == "started" and kinds[-1] == "completed"
        assert kinds.count("transition") == 6
        emitted = [e for e in seen.of(WorkflowEvent) if e.kind == "emitted"]
        assert emitted[0].event == "table.booked" and emitted[0].data["party_size"] == 4

    sql = "SELECT workflow, confidence FROM classifications WHERE conversation = 'conv1'"
    live = None
    async with asyncio.timeout(15):  # the recorder commits in batches: poll until it has
        while not (live and live.rows):
            live = await query_over_bus(hub.bus.nc, hub.bus.subjects, sql, timeout=5)
    assert live.rows[0][0] == "book_table"
    assert live.rows[0][1] == pytest.approx(classification.confidence)

    await hub.stop()  # now the file is free: the same query straight from DuckDB
    stopped = query_file(settings.duckdb_path, sql, max_rows=10, timeout=5)
    assert stopped.rows == live.rows


async def test_unclear_text_goes_to_the_fallback_with_start_buttons(hub: Hub) -> None:
    """Text no workflow is confident about gets the fallback, whose buttons start one."""
    chat = await Chat.open(ws_port(hub), "conv2")
    reply = await chat.say("what is the capital of mongolia")
    starts = [b["payload"]["start"] for b in reply["payload"]["buttons"]]
    assert sorted(starts) == ["book_table", "order_status", "support_request"]
    started = await chat.say(payload={"start": "support_request"})
    assert started["text"]
    state = await hub_state(hub, "conv2")
    assert state["workflow"] == "support_request"
    await chat.close()


async def test_clear_text_while_clarifying_starts_that_workflow(hub: Hub) -> None:
    """After the fallback asks, a clear request starts its workflow instead of a handoff."""
    chat = await Chat.open(ws_port(hub), "conv3")
    await chat.say("blue elephants dancing")
    reply = await chat.say("I want to reserve a table for four")
    assert "which day" in reply["text"].lower()  # the size is taken from the request
    state = await hub_state(hub, "conv3")
    assert state["workflow"] == "book_table"
    await chat.close()




APPROVAL = """
name: approval
description: Ask for a refund approval
examples: [I want a refund, refund my order please, can I get my money back,
           I would like a refund for my purchase, please refund me]
initial: waiting
states:
  waiting:
    say: I have asked a colleague to approve your refund.
    on:
      - event: refund.approved
        to: approved
  approved:
    final: true
    say: Your refund of {amount} was approved.
slots:
  amount: text
"""


async def test_a_service_advances_a_workflow_over_the_bus(
    settings: Settings, nats_url: str, tmp_path: Any
) -> None:
    """A plain nats-py service publishes a WorkflowInput (hand-written JSON, no type tag);
    the workflow moves to its final state and the user sees the answer."""
    path = tmp_path / "approval.yaml"
    path.write_text(APPROVAL)
    hub = Hub(settings.model_copy(update={"workflow_paths": [path]}))
    await hub.start()
    try:
        assert hub.bus is not None
        chat = await Chat.open(ws_port(hub), "conv4")
        waiting = await chat.say("I want a refund for my order")
        assert "approve" in waiting["text"]
        nc = await nats.connect(nats_url)
        body = {"id": "svc-refund-000001", "conversation": "conv4", "event": "refund.approved",
                "data": {"amount": "12 EUR"}}
        await nc.jetstream().publish(hub.bus.subjects.workflow_input("conv4"),
                                     msgspec.json.encode(body))
        await nc.close()
        answer = await chat.replies_to("svc-refund-000001")
        assert answer[0]["text"] == "Your refund of 12 EUR was approved."
        state = await hub_state(hub, "conv4")
        assert state["workflow"] is None and state["last_input"] == "svc-refund-000001"
        await chat.close()
    finally:
        await hub.stop()


async def test_a_redelivered_message_gets_no_second_reply(hub: Hub, nats_url: str) -> None:
    """The same inbound message stored twice (as a redelivery would present it) is
    answered once."""
    assert hub.bus is not None
    subjects = hub.bus.subjects
    chat = await Chat.open(ws_port(hub), "conv5")
    message_id = await chat.send("I'd like to book a table")
    await chat.replies_to(message_id)
    copy = Message(id=message_id, conversation="conv5", channel="websocket", direction="in",
                   sender=Sender(id="u1"), text="I'd like to book a table")
    nc = await nats.connect(nats_url)
    # A different Nats-Msg-Id gets past the duplicate window: only the router's own
    # bookkeeping can tell it was handled.
    await nc.jetstream().publish(subjects.inbound("websocket", "conv5"),
                                 msgspec.json.encode(copy), headers={"Nats-Msg-Id": "other"})
    marker = await chat.send("4")
    await chat.replies_to(marker)
    await nc.close()
    answers = [m for m in chat.messages if m["reply_to"] == message_id]
    assert len(answers) == 1
    await chat.close()


async def test_invalid_input_is_reported_and_the_next_message_still_works(
    hub: Hub, nats_url: str, prefix: str
) -> None:
    """Garbage on an inbound subject lands on evt.invalid; routing goes on."""
    assert hub.bus is not None
    async with observer(nats_url, prefix) as seen:
        nc = await nats.connect(nats_url)
        await nc.jetstream().publish(hub.bus.subjects.inbound("websocket", "conv6"), b"{oops")
        await nc.close()
        await seen.wait_for(lambda: any(s.endswith(".evt.invalid") for s, _ in seen.records))
        invalid = next(r for s, r in seen.records if s.endswith(".evt.invalid"))
        assert invalid.source == "router" and "{oops" in invalid.data
    chat = await Chat.open(ws_port(hub), "conv6")
    assert (await chat.say("I'd like to book a table"))["text"]
    await chat.close()


async def test_a_broken_workflow_file_stops_the_hub_with_file_and_line(
    settings: Settings, tmp_path: Any
) -> None:
    """A workflow with an unknown target fails start, naming the file and the line."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "name: broken\ndescription: x\nexamples: [hello]\ninitial: a\nstates:\n"
        "  a:\n    say: hi\n    on:\n      - message: any\n        to: nowhere\n"
    )
    hub = Hub(settings.model_copy(update={"workflow_paths": [broken]}))
    with pytest.raises(WorkflowError) as error:
        await hub.start()
    assert str(broken) in str(error.value) and ":10:" in str(error.value)
    assert "nowhere" in str(error.value)
    assert hub.bus is None and hub.lock is None  # nothing left running


async def test_the_state_api_answers_unknown_conversations_with_not_found(hub: Hub) -> None:
    """`{prefix}.api.state` for a conversation that never spoke says not_found."""
    answer = await hub_state(hub, "never-seen")
    assert answer["error"]["code"] == "not_found"


@pytest.mark.parametrize(("setting", "variable"), [("ws_port", "COMMHUB_WS_PORT"),
                                                    ("http_port", "COMMHUB_HTTP_PORT")])
async def test_a_port_in_use_stops_the_start_before_the_slow_steps(
    settings: Settings, setting: str, variable: str
) -> None:
    """A port in use fails the start with a ListenError naming the setting to change,
    before the recorder opens DuckDB and before the classifier is trained (neither the
    DuckDB file nor the model cache exists), and leaves nothing running."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        hub = Hub(settings.model_copy(update={setting: port}))
        with pytest.raises(ListenError) as error:
            await hub.start()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in str(error.value)
    assert f"to use another port set {variable}, or 0 for any free one" in str(error.value)
    assert not settings.duckdb_path.exists() and not (settings.data_dir / "models").exists()
    assert hub.bus is None and hub.lock is None and hub.web is None


async def test_the_websocket_channel_names_its_port_setting_itself(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the WebSocket port is taken after the hub's early check, the channel's own
    error names COMMHUB_WS_PORT too."""
    monkeypatch.setattr(hub_module, "try_port", lambda *args: None)  # skip the early check
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        hub = Hub(settings.model_copy(update={"ws_port": port}))
        with pytest.raises(ListenError, match=f"WebSocket channel cannot listen on "
                           f"127.0.0.1:{port}: .*COMMHUB_WS_PORT"):
            await hub.start()
    assert hub.bus is None and hub.lock is None
