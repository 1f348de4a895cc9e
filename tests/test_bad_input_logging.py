"""One bad input is at most one log line, never a traceback.

A fuzz of 100,000 inputs once left 45,779 tracebacks in the log: an operator could not
find a real failure among them. Here a whole hub runs in this process (WebSocket and
HTTP channels, router, recorder) and gets bad input on every door; every record it
logged meanwhile is counted.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
from inproc import ws_port
from websockets.asyncio.client import connect

from commhub.core.envelope import Message, Sender, encode, new_id
from commhub.core.hub import Hub

DEEP = "[" * 3000 + "]" * 3000

BAD_FRAMES = [
    "{not json",
    DEEP,
    json.dumps({"type": "nope"}),
    json.dumps({"type": "message", "text": 5}),
    json.dumps({"type": "message", "id": "x" * 300, "text": "hi"}),
    json.dumps({"type": "message", "payload": {"buttons": "no"}}),
    json.dumps([1, 2, 3]),
]
BAD_BODIES = [b"{not json", DEEP.encode(), b"[]", b'{"sender": 5}', b"\xff\xfe"]


def http_base(hub: Hub) -> str:
    return str(hub.web.url)  # type: ignore[union-attr]


def invalid_rows(hub: Hub) -> int:
    assert hub.recorder is not None
    cursor = hub.recorder.connection.cursor()
    try:
        (count,) = cursor.execute("SELECT count(*) FROM invalid_records").fetchone() or (0,)
        return int(count)
    finally:
        cursor.close()


async def test_bad_input_on_every_door_logs_no_traceback_and_a_line_at_most_each(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    """Bad WebSocket frames, HTTP and Rasa bodies, and bad records on the bus (nested
    3,000 deep, an invalid subject token, the wrong direction on ``out``) each get at
    most one log line, and none comes with a traceback."""
    assert hub.bus is not None
    caplog.set_level(logging.INFO, logger="commhub")
    inputs = 0
    async with connect(f"ws://127.0.0.1:{ws_port(hub)}/ws?conversation=bl1&user=u1") as ws:
        assert json.loads(await ws.recv())["event"] == "connected"
        for frame in BAD_FRAMES:
            await ws.send(frame)
            inputs += 1
            answer = json.loads(await ws.recv())
            assert answer["type"] == "error", (frame[:80], answer)
    async with aiohttp.ClientSession() as session:
        for body in BAD_BODIES:
            for path in ("/v1/conversations/bl2/messages", "/webhooks/rest/webhook"):
                async with session.post(http_base(hub) + path, data=body) as resp:
                    assert 400 <= resp.status < 500
                inputs += 1
    s = hub.bus.subjects
    good = Message(id=new_id(), conversation="bl3", channel="websocket", direction="in",
                   sender=Sender(id="svc"), text="hello")
    bus_inputs: list[tuple[str, bytes]] = [
        (s.inbound("websocket", "bl3"), DEEP.encode()),
        (s.inbound("websocket", "a+b"), encode(good)),
        (s.outbound("websocket", "bl3"), encode(good)),  # direction "in" on out
        (s.workflow_input("bl3"), b'{"a":' * 3000 + b"1" + b"}" * 3000),
        (s.classified("bl3"), b"\xff\xfe"),
    ]
    before = invalid_rows(hub)
    for subject, data in bus_inputs:
        await hub.bus.js.publish(subject, data)
        inputs += 1
    async with asyncio.timeout(30):  # a safety net: every bad record is recorded
        while invalid_rows(hub) < before + len(bus_inputs):
            await asyncio.sleep(0.05)
    await asyncio.sleep(0)

    ours = [r for r in caplog.records if r.name.startswith("commhub")]
    with_traceback = [f"{r.name}: {r.getMessage()}" for r in ours if r.exc_info]
    assert with_traceback == []
    assert all("\n" not in r.getMessage() for r in ours)
    warnings = [r for r in ours if r.levelno >= logging.WARNING]
    assert len(warnings) <= inputs, [r.getMessage() for r in warnings]
