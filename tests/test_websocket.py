"""The WebSocket channel against a real nats-server and a real websockets server on port 0.

The tests stand in for the hub: they publish outbound Messages on the bus themselves and
read inbound Messages and ChannelEvents straight from the streams.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any
from urllib.parse import urlencode

import pluggy
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError

from commhub.channels.sendqueue import SendQueue, SlowConsumer
from commhub.channels.websocket import channel as websocket_plugin
from commhub.channels.websocket.admission import Admitted, Refused, admit
from commhub.channels.websocket.channel import WebSocketChannel, WebSocketSettings
from commhub.channels.websocket.frames import FrameError, MessageFrame, PingFrame, decode_frame
from commhub.core import hookspecs
from commhub.core.aio import cancel_and_wait
from commhub.core.bus import Bus
from commhub.core.channel import ChannelContext
from commhub.core.config import Settings
from commhub.core.envelope import (
    ChannelEvent,
    InvalidRecord,
    Message,
    Sender,
    decode_as,
    new_id,
)
from commhub.core.hub import Hub
from commhub.core.ratelimit import TokenBucket
from commhub.core.tokens import Identity, TokenAuthority, mint

ID1 = "5f0c7e1e-2b1d-4c55-9a43-0d8f6b1f9b21"  # client ids must look unique (a UUID)
WAIT = 5  # seconds: a safety net against hangs, never an assertion about speed

Factory = Callable[..., Awaitable[WebSocketChannel]]


# -- fixtures and helpers ---------------------------------------------------------------
@pytest.fixture
async def start_channel(bus: Bus, settings: Settings) -> AsyncIterator[Factory]:
    """Start WebSocket channels on 127.0.0.1:0; stops them all after the test."""
    started: list[WebSocketChannel] = []

    async def start(
        hub: Settings | None = None,
        ctx_class: type[ChannelContext] = ChannelContext,
        **plugin_settings: Any,
    ) -> WebSocketChannel:
        ctx = ctx_class("websocket", bus, hub or settings)
        channel = WebSocketChannel(ctx, WebSocketSettings(**plugin_settings))
        await channel.start()
        started.append(channel)
        return channel

    yield start
    for channel in started:
        await channel.stop()
        await channel.ctx.close()


def url(channel: WebSocketChannel, path: str = "/ws", **params: Any) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"ws://127.0.0.1:{channel.port}{path}" + (f"?{query}" if query else "")


async def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), WAIT))


async def send(ws: ClientConnection, frame: Any) -> None:
    await ws.send(json.dumps(frame))


async def open_ws(address: str, **kwargs: Any) -> ClientConnection:
    """Connect and consume the ``connected`` event frame."""
    ws = await connect(address, **kwargs)
    hello = await recv(ws)
    assert hello["type"] == "event" and hello["event"] == "connected", hello
    return ws


async def reply(bus: Bus, conversation: str, text: str, **fields: Any) -> Message:
    """Publish an outbound message as a workflow would."""
    message = Message(
        id=new_id(), conversation=conversation, channel="websocket", direction="out",
        sender=Sender(id="bot", kind="bot", name="Bot"), text=text, **fields,
    )
    await bus.publish(bus.subjects.outbound("websocket", conversation), message)
    return message


async def last_inbound(bus: Bus, conversation: str) -> Message:
    raw = await bus.js.get_last_msg(
        bus.subjects.messages_stream, bus.subjects.inbound("websocket", conversation)
    )
    return decode_as(raw.data, Message)


async def stored_messages(bus: Bus) -> int:
    return (await bus.js.stream_info(bus.subjects.messages_stream)).state.messages


async def wait_event(bus: Bus, kind: str, **match: Any) -> ChannelEvent:
    """The first stored or future ChannelEvent of ``kind`` whose fields match."""
    sub = await bus.js.subscribe(
        bus.subjects.channel_event("websocket", kind), ordered_consumer=True
    )
    try:
        while True:
            event = decode_as((await sub.next_msg(timeout=WAIT)).data, ChannelEvent)
            if all(getattr(event, key) == value for key, value in match.items()):
                return event
    finally:
        await sub.unsubscribe()


async def closed_with(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Read until the server closes; return the close code and reason received."""
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), WAIT)
    return ws.close_code, ws.close_reason


# -- inbound --------------------------------------------------------------------------
async def test_message_is_acked_and_lands_on_the_bus(start_channel: Factory, bus: Bus) -> None:
    """A message frame is published as an inbound Message with the right fields, then acked."""
    channel = await start_channel()
    async with await open_ws(url(channel, conversation="c1", user="alice")) as ws:
        await send(ws, {"type": "message", "id": ID1, "text": "hello", "payload": {"k": 1}})
        ack = await recv(ws)
    assert ack == {"type": "ack", "id": ID1}
    message = await last_inbound(bus, "c1")
    assert message.id == ID1
    assert (message.conversation, message.channel, message.direction) == ("c1", "websocket", "in")
    assert message.sender == Sender(id="alice", kind="user")
    assert (message.text, message.payload) == ("hello", {"k": 1})
    assert message.meta["connection"]


async def test_button_press_is_a_payload_only_message(start_channel: Factory, bus: Bus) -> None:
    """A frame with only a payload (a button press) is accepted and keeps its payload."""
    channel = await start_channel()
    async with await open_ws(url(channel, conversation="c1")) as ws:
        await send(ws, {"type": "message", "payload": {"button": "yes"}})
        ack = await recv(ws)
    message = await last_inbound(bus, "c1")
    assert ack["id"] == message.id
    assert (message.text, message.payload) == (None, {"button": "yes"})
    assert message.sender.id.startswith("anon-")


async def test_duplicate_client_id_is_stored_once(start_channel: Factory, bus: Bus) -> None:
    """Re-sending a message id gets a second ack but the stream keeps one message."""
    channel = await start_channel()
    async with await open_ws(url(channel, conversation="c1", user="u")) as ws:
        await send(ws, {"type": "message", "id": ID1, "text": "one"})
        first = await recv(ws)
    async with await open_ws(url(channel, conversation="c1", user="u")) as ws:  # reconnected
        await send(ws, {"type": "message", "id": ID1, "text": "one"})
        second = await recv(ws)
    assert first == second == {"type": "ack", "id": ID1}
    assert await stored_messages(bus) == 1


async def test_replies_carry_the_client_id_in_reply_to(start_channel: Factory, bus: Bus) -> None:
    """A reply to a client's message names the client's own id in reply_to."""
    channel = await start_channel()
    async with await open_ws(url(channel, conversation="c1")) as ws:
        await send(ws, {"type": "message", "id": ID1, "text": "hi"})
        assert await recv(ws) == {"type": "ack", "id": ID1}
        inbound = await last_inbound(bus, "c1")
        await reply(bus, "c1", "hello", reply_to=inbound.id)
        answer = await recv(ws)
    assert answer["reply_to"] == ID1


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{not json", "bad_json"),
        ("[1, 2]", "bad_frame"),
        ('{"type": "nope"}', "unknown_type"),
        ('{"type": "message"}', "bad_frame"),
        ('{"type": "message", "text": 5}', "bad_frame"),
        ('{"type": "message", "text": "x", "payload": [1]}', "bad_frame"),
        ('{"type": "message", "id": "1", "text": "counter ids collide"}', "bad_frame"),
        ('{"type": "message", "id": "has a space in it!!", "text": "x"}', "bad_frame"),
        (b"\x00\x01", "bad_frame"),
        # Nested past the decoder's recursion limit (RecursionError, once a 1011 close),
        # and just past MAX_JSON_DEPTH.
        ("[" * 3000 + "]" * 3000, "bad_frame"),
        ('{"type": "message", "text": "x", "payload": ' + '{"a": ' * 3000 + "1"
         + "}" * 3000 + "}", "bad_frame"),
        ('{"type": "message", "text": "x", "payload": ' + '{"a": ' * 64 + "1"
         + "}" * 64 + "}", "bad_frame"),
    ],
    ids=lambda value: value[:40] if isinstance(value, str) else None,
)
async def test_bad_frames_get_an_error_and_the_connection_survives(
    start_channel: Factory, bus: Bus, raw: str | bytes, code: str
) -> None:
    """A bad frame is answered with an error frame; the next good frame is still acked."""
    channel = await start_channel()
    async with await open_ws(url(channel, conversation="c1")) as ws:
        await ws.send(raw)
        error = await recv(ws)
        await send(ws, {"type": "ping"})
        pong = await recv(ws)
        await send(ws, {"type": "message", "id": ID1, "text": "still here"})
        ack = await recv(ws)
    assert error["type"] == "error" and error["code"] == code and error["message"]
    assert "\n" not in error["message"] and len(error["message"]) < 300
    assert pong == {"type": "pong"}
    assert ack == {"type": "ack", "id": ID1}
    event = await wait_event(bus, "error")
    assert event.reason is not None and event.reason.startswith(code)


async def test_oversize_frame_closes_with_1009(
    start_channel: Factory, bus: Bus, settings: Settings
) -> None:
    """A frame over max_frame_bytes closes the connection with 1009 and records an error."""
    hub = settings.model_copy(update={"max_frame_bytes": 1024})
    channel = await start_channel(hub)
    async with await open_ws(url(channel, conversation="c1")) as ws:
        await send(ws, {"type": "message", "text": "x" * 2000})
        code, _ = await closed_with(ws)
    assert code == 1009
    event = await wait_event(bus, "error")
    assert event.code == 1009 and "max_frame_bytes" in (event.reason or "")
    assert await stored_messages(bus) == 0


async def test_rate_limited_frames_are_refused(start_channel: Factory, bus: Bus) -> None:
    """Frames over the burst get a rate_limited error and are not published."""
    channel = await start_channel(max_messages_per_second=0.001, rate_burst=2)
    async with await open_ws(url(channel, conversation="c1")) as ws:
        answers = []
        for i in range(3):
            await send(ws, {"type": "message", "id": f"{ID1}-{i}", "text": "hi"})
            answers.append(await recv(ws))
    assert [a["type"] for a in answers] == ["ack", "ack", "error"]
    assert answers[2]["code"] == "rate_limited" and answers[2]["id"] == f"{ID1}-2"
    assert await stored_messages(bus) == 2


class _DownContext(ChannelContext):
    async def publish_inbound(self, message: Message) -> int:
        raise TimeoutError("nats: timeout")


async def test_bus_failure_gives_unavailable_with_the_id(start_channel: Factory) -> None:
    """When the bus refuses a message the client gets 'unavailable' with the id to retry."""
    channel = await start_channel(ctx_class=_DownContext)
    async with await open_ws(url(channel, conversation="c1")) as ws:
        await send(ws, {"type": "message", "id": ID1, "text": "hi"})
        error = await recv(ws)
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}
    assert error == {
        "type": "error", "code": "unavailable", "id": ID1, "message": error["message"]
    }


# -- outbound ---------------------------------------------------------------------------
async def test_history_then_live_messages_with_increasing_cursors(
    start_channel: Factory, bus: Bus
) -> None:
    """Without after, a client gets the conversation's history then live replies, in order."""
    channel = await start_channel()
    first = await reply(bus, "c1", "one", payload={"buttons": [{"title": "Yes"}]})
    await reply(bus, "other", "not for c1")
    async with await open_ws(url(channel, conversation="c1")) as ws:
        got = [await recv(ws)]
        await reply(bus, "c1", "two", reply_to="m0")
        await reply(bus, "c1", "three")
        got += [await recv(ws), await recv(ws)]
    assert [frame["text"] for frame in got] == ["one", "two", "three"]
    assert got[0]["cursor"] < got[1]["cursor"] < got[2]["cursor"]
    assert got[0] == {
        "type": "message", "id": first.id, "direction": "out", "text": "one",
        "payload": first.payload,
        "sender": {"id": "bot", "kind": "bot", "name": "Bot"}, "reply_to": None,
        "ts": first.ts, "cursor": got[0]["cursor"],
    }
    assert got[1]["reply_to"] == "m0"


async def test_reconnect_after_cursor_gets_exactly_the_missed(
    start_channel: Factory, bus: Bus
) -> None:
    """Reconnecting with after=<last cursor> yields only later messages, in order, once."""
    channel = await start_channel()
    await reply(bus, "c1", "1")
    await reply(bus, "c1", "2")
    async with await open_ws(url(channel, conversation="c1")) as ws:
        seen = [await recv(ws), await recv(ws)]
    last = seen[-1]["cursor"]
    for text in ("3", "4"):
        await reply(bus, "c1", text)
    async with await open_ws(url(channel, conversation="c1", after=last)) as ws:
        missed = [await recv(ws), await recv(ws)]
        await reply(bus, "c1", "5")
        live = await recv(ws)
    assert [f["text"] for f in seen] == ["1", "2"]
    assert [f["text"] for f in [*missed, live]] == ["3", "4", "5"]
    assert last < missed[0]["cursor"] < missed[1]["cursor"] < live["cursor"]


async def test_two_connections_on_one_conversation_both_get_the_reply(
    start_channel: Factory, bus: Bus
) -> None:
    """Every connection on a conversation receives each outbound message."""
    channel = await start_channel()
    async with (
        await open_ws(url(channel, conversation="c1", user="a")) as a,
        await open_ws(url(channel, conversation="c1", user="b")) as b,
    ):
        sent = await reply(bus, "c1", "to both")
        got_a, got_b = await recv(a), await recv(b)
    assert got_a["id"] == got_b["id"] == sent.id
    assert got_a["cursor"] == got_b["cursor"]


async def test_slow_consumer_is_closed_with_1013_and_resumes(
    start_channel: Factory, bus: Bus
) -> None:
    """A client that stops reading is closed with 1013 and a cursor; resuming loses nothing."""
    channel = await start_channel(max_queue=2, ping_interval=None, close_timeout=10)
    # No compression, a tiny receive buffer and a one-frame client queue make the socket back
    # up after little data; then the server's queue of 2 overflows.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", channel.port))
    errors = await bus.nc.subscribe(bus.subjects.channel_event("websocket", "error"))
    ws = await open_ws(url(channel, conversation="c1"), sock=sock, max_queue=1, max_size=None,
                     compression=None)
    body = "x" * 60_000
    subject = bus.subjects.outbound("websocket", "c1")
    published, overflow = 0, None
    while overflow is None and published < 600:  # 36 MB: far beyond any socket buffer
        batch = [
            (subject, Message(id=new_id(), conversation="c1", channel="websocket",
                              direction="out", sender=Sender(id="bot", kind="bot"),
                              text=f"{published + i}:{body}"))
            for i in range(20)
        ]
        await bus.publish_all(batch)
        published += len(batch)
        try:
            overflow = decode_as((await errors.next_msg(timeout=0.05)).data, ChannelEvent)
        except TimeoutError:
            continue
    assert overflow is not None and overflow.code == 1013
    received = []
    with pytest.raises(ConnectionClosedError):
        while True:
            received.append(json.loads(await asyncio.wait_for(ws.recv(), WAIT)))
    assert ws.close_code == 1013
    last = received[-1]["cursor"]
    assert ws.close_reason == f"slow consumer: resume with after={last}"
    assert [int(f["text"].split(":")[0]) for f in received] == list(range(len(received)))
    async with await open_ws(url(channel, conversation="c1", after=last), max_size=None) as ws2:
        resumed = await recv(ws2)
    assert int(resumed["text"].split(":")[0]) == len(received)
    await errors.unsubscribe()


async def test_a_bad_outbound_record_is_skipped_and_the_conversation_goes_on(
    start_channel: Factory, bus: Bus
) -> None:
    """An outbound record that cannot be decoded (here: nested too deeply) is skipped
    and reported; clients connecting before and after it get every good message, and
    reconnecting with a cursor keeps working."""
    channel = await start_channel()
    first = await reply(bus, "c1", "before")
    deep = b'{"id":"x","conversation":"c1","channel":"websocket","direction":"out",' \
        b'"sender":{"id":"b"},"payload":{"a":' + b"[" * 5000 + b"]" * 5000 + b"}}"
    async with await open_ws(url(channel, conversation="c1")) as live:
        assert (await recv(live))["id"] == first.id
        await bus.js.publish(bus.subjects.outbound("websocket", "c1"), deep)
        second = await reply(bus, "c1", "after")
        assert (await recv(live))["id"] == second.id
        cursor = None
        async with await open_ws(url(channel, conversation="c1")) as history:
            got = [await recv(history), await recv(history)]
            cursor = got[0]["cursor"]
        assert [f["id"] for f in got] == [first.id, second.id]
        async with await open_ws(url(channel, conversation="c1", after=cursor)) as resumed:
            assert (await recv(resumed))["id"] == second.id
            await send(resumed, {"type": "ping"})
            assert await recv(resumed) == {"type": "pong"}
    sub = await bus.js.subscribe(bus.subjects.invalid, ordered_consumer=True)
    report = decode_as((await sub.next_msg(timeout=WAIT)).data, InvalidRecord)
    await sub.unsubscribe()
    assert report.source == "channel:websocket" and "deeply" in report.reason


async def test_clients_that_close_at_once_log_no_errors(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    """300 clients that connect and close straight away (before, during or after their
    outbound stream starts) end without an ERROR record."""
    caplog.set_level(logging.WARNING)
    channel = hub.channels["websocket"]
    assert isinstance(channel, WebSocketChannel)

    async def hit_and_run(i: int) -> None:
        ws = await connect(url(channel, conversation=f"c{i % 7}"))
        if i % 2:
            await ws.recv()  # the "connected" frame: its outbound stream is starting
        await ws.close()

    await asyncio.gather(*(hit_and_run(i) for i in range(300)))
    async with asyncio.timeout(WAIT * 6):
        while channel.connection_count:
            await asyncio.sleep(0.05)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors[:3]]


# -- admission --------------------------------------------------------------------------
@pytest.fixture
def token_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"allow_anonymous": False, "tokens": ["s3cret"]})


@pytest.mark.parametrize(("token", "reason"), [(None, "token required"), ("bad", "invalid token")])
async def test_missing_or_bad_token_closes_with_4401(
    start_channel: Factory, bus: Bus, token_settings: Settings, token: str | None, reason: str
) -> None:
    """Without anonymous access, a missing or wrong token is closed with 4401 and a reason."""
    channel = await start_channel(token_settings)
    async with connect(url(channel, conversation="c1", user="u", token=token)) as ws:
        assert await closed_with(ws) == (4401, reason)
    event = await wait_event(bus, "rejected")
    assert (event.code, event.reason, event.conversation, event.user) == (
        4401, reason, "c1", "u"
    )


async def test_good_token_is_accepted(
    start_channel: Factory, bus: Bus, token_settings: Settings
) -> None:
    """A known token is accepted and recorded as an accepted ChannelEvent."""
    channel = await start_channel(token_settings)
    async with await open_ws(url(channel, conversation="c1", user="u", token="s3cret")) as ws:
        await send(ws, {"type": "message", "text": "hi"})
        assert (await recv(ws))["type"] == "ack"
    event = await wait_event(bus, "accepted")
    assert (event.channel, event.conversation, event.user) == ("websocket", "c1", "u")
    closed = await wait_event(bus, "closed", connection=event.connection)
    assert closed.code == 1000


@pytest.mark.parametrize(
    "params",
    [{}, {"conversation": "a.b"}, {"conversation": "c1", "user": "x y"},
     {"conversation": "c1", "after": "-1"}],
)
async def test_bad_query_params_close_with_4400(
    start_channel: Factory, bus: Bus, params: dict[str, str]
) -> None:
    """A missing or invalid conversation, user or after is closed with 4400."""
    channel = await start_channel()
    async with connect(url(channel, **params)) as ws:
        code, reason = await closed_with(ws)
    assert code == 4400 and reason
    assert (await wait_event(bus, "rejected")).code == 4400


async def test_too_many_connections_close_with_4429(start_channel: Factory) -> None:
    """Past max_connections a new client is closed with 4429; existing ones keep working."""
    channel = await start_channel(max_connections=1)
    async with await open_ws(url(channel, conversation="c1")) as first:
        async with connect(url(channel, conversation="c1")) as second:
            assert (await closed_with(second))[0] == 4429
        await send(first, {"type": "ping"})
        assert await recv(first) == {"type": "pong"}


async def test_healthz_and_unknown_paths(start_channel: Factory) -> None:
    """GET /healthz answers 200 ok over plain HTTP; other paths get a 404."""
    channel = await start_channel()
    base = f"http://127.0.0.1:{channel.port}"

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(base + path, timeout=WAIT) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read()

    assert await asyncio.to_thread(get, "/healthz") == (200, b"ok\n")
    status, body = await asyncio.to_thread(get, "/nope")
    assert status == 404 and json.loads(body)["error"] == "not_found"


# -- lifecycle --------------------------------------------------------------------------
async def test_start_reports_the_url_and_stop_closes_with_1001(
    start_channel: Factory, bus: Bus, settings: Settings
) -> None:
    """start() names the real port and the anonymity rule; stop() closes clients with 1001."""
    channel = WebSocketChannel(ChannelContext("websocket", bus, settings))
    lines = await channel.start()
    assert lines == [
        f"websocket: ws://127.0.0.1:{channel.port}/ws?conversation=ID&user=ID "
        "(anonymous clients allowed: bound to loopback)"
    ]
    async with await open_ws(url(channel, conversation="c1")) as ws:
        await channel.stop()
        assert (await closed_with(ws))[0] == 1001
    await channel.stop()  # idempotent
    assert channel.connection_count == 0


def test_registered_through_the_channel_hook() -> None:
    """The module registers WebSocketChannel through register_channels, like any plugin."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(websocket_plugin)
    found: list[type] = []
    pm.hook.register_channels(register=found.append)
    assert found == [WebSocketChannel]


# -- sans-I/O units -----------------------------------------------------------------------
def test_admission_rules() -> None:
    """admit() parses the query and applies the token and anonymity rules."""
    anon_ok = TokenAuthority(anonymous_allowed=True)
    ok = admit("/ws?conversation=c1&user=u&after=7", authority=anon_ok)
    assert ok == Admitted(conversation="c1", user="u", after=7, anonymous=True,
                          identity=Identity("anonymous"))
    anon = admit("/ws?conversation=c1", authority=anon_ok)
    assert isinstance(anon, Admitted) and anon.user.startswith("anon-") and anon.after is None
    with_token = admit("/ws?conversation=c1&token=t", authority=TokenAuthority(["t"]))
    assert isinstance(with_token, Admitted) and not with_token.anonymous
    wrong = admit(
        "/ws?conversation=c1&token=x", authority=TokenAuthority(["t"], anonymous_allowed=True)
    )
    assert isinstance(wrong, Refused) and wrong.code == 4401
    assert admit("/ws?conversation=c1&after=abc", authority=anon_ok) == (
        Refused(4400, "invalid after: use a cursor from a message frame", "c1")
    )


def test_admission_signed_token_binds_user() -> None:
    """A signed token admits its own user (taken when the URL names none), nobody else."""
    authority = TokenAuthority(secret="k")
    token = mint("k", "alice", 60)
    taken = admit(f"/ws?conversation=c1&token={token}", authority=authority)
    assert isinstance(taken, Admitted) and taken.user == "alice" and not taken.anonymous
    other = admit(f"/ws?conversation=c1&user=bob&token={token}", authority=authority)
    assert other == Refused(4401, "token is for another user", "c1", "bob")
    expired = admit(f"/ws?conversation=c1&token={mint('k', 'alice', -1)}", authority=authority)
    assert isinstance(expired, Refused) and expired.reason == "token expired"


def test_decode_frame_units() -> None:
    """decode_frame() returns typed frames or the right error code, and never raises."""
    assert decode_frame('{"type":"ping"}') == PingFrame()
    assert decode_frame('{"type":"message","text":"hi","extra":1}') == MessageFrame(
        None, "hi", None
    )
    empty_id = decode_frame('{"type":"message","id":"","text":"x"}')
    assert isinstance(empty_id, FrameError) and empty_id.code == "bad_frame"
    assert decode_frame(f'{{"type":"message","id":"{ID1}","payload":{{}}}}') == MessageFrame(
        ID1, None, {}
    )
    assert isinstance(decode_frame('{"type":"message","text":""}'), FrameError)
    assert decode_frame('{"type":1}') == FrameError("bad_frame", "a frame needs a string 'type'")
    assert decode_frame(b"{}") == FrameError(
        "bad_frame", "binary frames are not supported; send JSON text"
    )


def test_token_bucket_units() -> None:
    """The bucket allows a burst, refuses beyond it, and refills with time."""
    now = [0.0]
    bucket = TokenBucket(rate=2, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.5  # one token back
    assert [bucket.take(), bucket.take()] == [True, False]


async def test_sendqueue_overflow_raises_slow_consumer_with_last_cursor() -> None:
    """With a stalled sender, the queue overflows and names the last cursor handed over."""
    sent: list[int] = []
    stall = asyncio.Event()
    closed = asyncio.Event()

    async def items() -> AsyncIterator[tuple[int, Message]]:
        try:
            for cursor in range(1, 100):
                yield cursor, Message(id=str(cursor), conversation="c", channel="websocket",
                                      direction="out", sender=Sender(id="bot"))
                await asyncio.sleep(0)
        finally:
            closed.set()

    async def send(cursor: int, message: Message) -> None:
        sent.append(cursor)
        await stall.wait()  # the client never reads

    queue = SendQueue(max_queue=2, start=None)
    iterator = items()
    with pytest.raises(SlowConsumer) as info:
        await asyncio.wait_for(queue.run(iterator, send), WAIT)
    await iterator.aclose()
    assert sent == [1]
    assert info.value.last_cursor == 1 and queue.last_cursor == 1
    assert closed.is_set()


async def test_sendqueue_cancel_stops_both_sides() -> None:
    """Cancelling run() cancels the reader of the bus iterator, whose finally runs."""
    closed = asyncio.Event()
    started = asyncio.Event()

    async def items() -> AsyncIterator[tuple[int, Message]]:
        try:
            started.set()
            await asyncio.Event().wait()  # a live subscription with nothing new
            yield 0, Message(id="x", conversation="c", channel="w", direction="out",
                             sender=Sender(id="bot"))
        finally:
            closed.set()

    async def send(cursor: int, message: Message) -> None:
        raise AssertionError("nothing to send")

    task = asyncio.create_task(SendQueue(4).run(items(), send))
    await asyncio.wait_for(started.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed.is_set()


async def test_sendqueue_cleanup_is_not_cut_short_by_a_second_cancel() -> None:
    """run() returns only after its reader of the items has ended, even when the caller
    is cancelled again meanwhile (the connection handler re-cancels): closing the items
    next never finds them still running ("aclose(): asynchronous generator is already
    running", the close race of clients that leave at once)."""
    busy = asyncio.Event()
    release = asyncio.Event()

    async def items() -> AsyncIterator[tuple[int, Message]]:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:  # nats-py's wait_for race: the cancel is swallowed
            busy.set()
            await release.wait()
            raise
        yield 0, Message(id="x", conversation="c", channel="w", direction="out",
                         sender=Sender(id="bot"))

    async def send(cursor: int, message: Message) -> None:
        raise AssertionError("nothing to send")

    async def outbound() -> None:
        iterator = items()
        async with aclosing(iterator):
            await SendQueue(4).run(iterator, send)

    task = asyncio.create_task(outbound())
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.wait_for(busy.wait(), WAIT)
    task.cancel()  # again, while the reader is still inside the generator
    await asyncio.sleep(0.01)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)


async def test_cancel_and_wait_recancels_a_task_that_swallowed_the_cancel() -> None:
    """A task that swallows a cancellation (Python 3.11 wait_for race) is cancelled again."""
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # what a racing wait_for inside nats-py does
        await asyncio.Event().wait()

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, recancel_every=0.01), WAIT)
    assert swallowed.is_set() and task.cancelled()
