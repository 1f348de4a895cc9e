"""The bus contract on ``out``: a record that may not travel on its subject reaches no
client and no table but ``invalid_records``, and is reported on ``evt.invalid`` once.

A whole hub runs in this process (WebSocket channel, router, recorder). Nothing stands
between a service publishing on ``{prefix}.out.{channel}.{conversation}`` and the
channels, so each consumer checks the record with ``record_problem`` itself.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from httpkit import WAIT, base, call, http_channel, reply
from inproc import ws_port
from wschat import Chat

from commhub.core.bus import Bus
from commhub.core.config import Settings
from commhub.core.envelope import (
    InvalidRecord,
    Message,
    Record,
    Sender,
    WorkflowInput,
    decode_as,
    encode,
    invalid_id,
    new_id,
    record_problem,
)
from commhub.core.hub import Hub
from commhub.core.web import WebServer

AGENT = Sender(id="agent-7", kind="agent")


def out_message(**changes: Any) -> Message:
    fields: dict[str, Any] = {"id": new_id(), "conversation": "oc1", "channel": "websocket",
                              "direction": "out", "sender": AGENT, "text": "hello"}
    return Message(**{**fields, **changes})


def rows(hub: Hub, sql: str) -> list[tuple[Any, ...]]:
    assert hub.recorder is not None
    cursor = hub.recorder.connection.cursor()
    try:
        return cursor.execute(sql).fetchall()
    finally:
        cursor.close()


async def wait_until(check: Any, what: str, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout  # a safety net only
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_out_records_that_break_the_contract_are_refused_everywhere(hub: Hub) -> None:
    """Another conversation, direction "in", a short id and a bad button each: refused to
    evt.invalid once (two connected clients and the recorder all refuse it), delivered
    to no WebSocket client, recorded only in invalid_records; a good message after them
    is delivered and recorded as usual."""
    assert hub.bus is not None
    bus = hub.bus
    subject = bus.subjects.outbound("websocket", "oc1")
    bad = {
        "conversation": out_message(conversation="oc2"),
        "direction": out_message(direction="in", sender=Sender(id="u1")),
        "id": out_message(id="x1"),
        "button": out_message(payload={"buttons": [{"payload": {"value": "no title"}}]}),
    }
    chats = [await Chat.open(ws_port(hub), "oc1", user="u1") for _ in range(2)]
    try:
        sequences = {}
        for name, message in bad.items():
            ack = await bus.js.publish(subject, encode(message))  # raw: any id goes
            sequences[name] = ack.seq
        good = out_message(text="the good one")
        await bus.publish(subject, good)
        for chat in chats:  # in stream order: a bad one delivered would come first
            frame = await chat.next_frame("message")
            assert (frame["id"], frame["text"]) == (good.id, "the good one")
    finally:
        for chat in chats:
            await chat.close()

    stream = bus.subjects.messages_stream
    await wait_until(lambda: len(rows(hub, "SELECT id FROM invalid_records")) >= len(bad)
                     and rows(hub, "SELECT count(*) FROM messages")[0][0] >= 1,
                     "the recorder to commit every record")
    assert rows(hub, "SELECT id, conversation FROM messages") == [(good.id, "oc1")]
    recorded = {row[0]: row[1:] for row in rows(
        hub, "SELECT id, subject, reason, data FROM invalid_records")}
    assert set(recorded) == {invalid_id(stream, seq) for seq in sequences.values()}
    for name, seq in sequences.items():
        row_subject, reason, data = recorded[invalid_id(stream, seq)]
        assert row_subject == subject
        assert reason == record_problem(subject, bad[name])
        assert decode_as(data.encode(), Message) == bad[name]
    mismatched = recorded[invalid_id(stream, sequences["conversation"])]
    assert "conversation 'oc2' does not match" in mismatched[1]

    # One report per refused record on the events stream, whoever refused it first.
    info = await bus.js.stream_info(bus.subjects.events_stream,
                                    subjects_filter=bus.subjects.invalid)
    assert info.state.subjects == {bus.subjects.invalid: len(bad)}


async def test_http_callbacks_post_no_record_that_breaks_the_contract(
    bus: Bus, settings: Settings
) -> None:
    """The HTTP channel's callbacks refuse the same records: nothing is POSTed for them,
    each is reported on evt.invalid under its stream sequence's id, and the good reply
    after them is delivered."""
    posted: list[dict[str, Any]] = []
    got_one = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        posted.append(await request.json())
        got_one.set()
        return web.Response(status=200)

    server = WebServer("127.0.0.1", 0)
    server.add_post("/hook", hook)
    await server.start()
    try:
        async with http_channel(bus, settings, callback_secret="s3cret-callbacks") as channel:
            url = f"{base(channel)}/v1/conversations/cbx/callback"
            status, _, _ = await call("POST", url, json_body={"url": f"{server.url}/hook"})
            assert status == 200
            subject = bus.subjects.outbound("http", "cbx")
            bad = [out_message(channel="http", conversation="cbx-other"),
                   out_message(channel="http", conversation="cbx", direction="in"),
                   out_message(channel="http", conversation="cbx", id="x1")]
            sequences = [(await bus.js.publish(subject, encode(m))).seq for m in bad]
            good, _ = await reply(bus, "cbx", "the good one")
            async with asyncio.timeout(WAIT):
                await got_one.wait()
    finally:
        await server.stop()
    assert [body["id"] for body in posted] == [good.id]
    stream = bus.subjects.messages_stream
    reports = await invalid_reports(bus, len(bad))
    assert {r.id for r in reports} == {invalid_id(stream, seq) for seq in sequences}
    assert {r.source for r in reports} == {"channel:http"}


async def invalid_reports(bus: Bus, count: int) -> list[InvalidRecord]:
    """The first ``count`` InvalidRecords stored on evt.invalid."""
    sub = await bus.js.subscribe(bus.subjects.invalid, ordered_consumer=True)
    try:
        return [decode_as((await sub.next_msg(timeout=WAIT)).data, InvalidRecord)
                for _ in range(count)]
    finally:
        await sub.unsubscribe()


@pytest.mark.parametrize(
    ("subject", "record", "reason"),
    [
        ("p.out.websocket.c1", out_message(conversation="c1"), None),
        ("p.in.websocket.c1", out_message(conversation="c1", direction="in"), None),
        ("p.out.websocket.c1", out_message(conversation="c2"),
         "conversation 'c2' does not match the subject's 'c1'"),
        ("p.out.websocket.c1", out_message(conversation="c1", direction="in"),
         "direction 'in' on an 'out' subject"),
        ("p.in.websocket.c1", out_message(conversation="c1"),
         "direction 'out' on an 'in' subject"),
        ("p.out.sms.c1", out_message(conversation="c1"),
         "channel 'websocket' does not match the subject's 'sms'"),
        ("p.out.websocket.c1", out_message(conversation="c1", id="x1"),
         "id 'x1' is not 16-128 letters, digits, '-' or '_' (it is the Nats-Msg-Id: use a UUID)"),
        ("p.out.websocket.c1", out_message(conversation="c1", id="a.b.c.d.e.f.g.h.i.j"),
         "id 'a.b.c.d.e.f.g.h.i.j' is not 16-128 letters, digits, '-' or '_' (it is the "
         "Nats-Msg-Id: use a UUID)"),
        ("p.out.websocket.c1", out_message(conversation="c1", payload={"buttons": "yes"}),
         "payload.buttons must be a list of buttons"),
        ("p.out.websocket.c1",
         out_message(conversation="c1", payload={"quick_replies": [{"title": "A", "payload": 1}]}),
         "payload.quick_replies[0].payload must be an object"),
        ("p.out.websocket.c1",
         out_message(conversation="c1", payload={"buttons": [{"title": "A"}, {"title": 2}]}),
         "payload.buttons[1] must be an object with a string 'title'"),
        ("p.wf.c1", WorkflowInput(id=new_id(), conversation="c1", event="paid"), None),
        ("p.wf.c1", WorkflowInput(id=new_id(), conversation="c2", event="paid"),
         "conversation 'c2' does not match the subject's 'c1'"),
        ("p.wf.c1", WorkflowInput(id="svc-1", conversation="c1", event="paid"),
         "id 'svc-1' is not 16-128 letters, digits, '-' or '_' (it is the Nats-Msg-Id: use a "
         "UUID)"),
        ("p.wf.c1", out_message(conversation="c1"), "a Message on a workflow input subject"),
        ("p.out.websocket.c1", WorkflowInput(id=new_id(), conversation="c1", event="x"),
         "a WorkflowInput on a message subject"),
        ("p.out.websocket.c1.extra", out_message(conversation="extra"),
         "'out' subjects are {prefix}.out.{channel}.{conversation}"),
        ("p.evt.invalid", InvalidRecord(id="i", subject="s", reason="r", data=""), None),
    ],
)
def test_record_problem_is_the_bus_contract(
    subject: str, record: Record, reason: str | None
) -> None:
    assert record_problem(subject, record) == reason


def test_record_problem_reasons_stay_one_short_line() -> None:
    """Values from the record are quoted and cut short, so a hostile one cannot make the
    reason long or multi-line."""
    hostile = "x\n" * 10_000
    reason = record_problem("p.out.websocket.c1", out_message(conversation=hostile))
    assert reason is not None and "\n" not in reason and len(reason) < 200
