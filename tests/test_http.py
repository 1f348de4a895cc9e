"""The HTTP channel's native API against a real nats-server and a real aiohttp server.

Posting, reading after a cursor (with a long poll), server-sent events with resume,
tokens, and each kind of bad input with its documented answer.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from httpkit import (
    ID1,
    WAIT,
    SseReader,
    base,
    call,
    http_channel,
    inbound_of,
    reply,
    wait_event,
)
from pydantic import SecretStr, ValidationError

from commhub.channels.http.channel import HttpSettings
from commhub.core.bus import Bus
from commhub.core.config import Settings
from commhub.core.hub import Hub
from commhub.core.tokens import mint

SECRET = "test-signing-secret"


def locked(settings: Settings, **changes: Any) -> Settings:
    """The test's settings with tokens required: one static token and a signing secret."""
    return settings.model_copy(update={
        "tokens": ["s3cret"], "token_secret": SecretStr(SECRET), "allow_anonymous": False,
        **changes,
    })


def messages_url(channel: Any, conversation: str, **query: Any) -> str:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return f"{base(channel)}/v1/conversations/{conversation}/messages" + (f"?{qs}" if qs else "")


# -- posting ----------------------------------------------------------------------------
async def test_post_stores_the_message_once_per_id(bus: Bus, settings: Settings) -> None:
    """A POST is answered 202 with id and cursor once stored; the same id again is
    answered the same and stored once."""
    async with http_channel(bus, settings) as channel:
        url = messages_url(channel, "c1")
        body = {"id": ID1, "user": "alice", "text": "hello", "payload": {"k": 1}}
        status, first, _ = await call("POST", url, json_body=body)
        assert status == 202 and first["id"] == ID1 and first["conversation"] == "c1"
        status, again, _ = await call("POST", url, json_body=body)
        assert status == 202 and again == first
        status, other, _ = await call("POST", url, json_body={"text": "no id"})
        assert status == 202 and other["id"] != ID1 and other["cursor"] > first["cursor"]
    stored = await inbound_of(bus, "c1")
    assert [m.id for m in stored] == [ID1, other["id"]]
    assert stored[0].sender.id == "alice" and stored[0].sender.kind == "user"
    assert (stored[0].text, stored[0].payload, stored[0].channel) == ("hello", {"k": 1}, "http")
    assert stored[1].sender.id.startswith("anon-")


# -- reading after a cursor --------------------------------------------------------------
async def test_get_returns_exactly_the_unseen_messages_in_order(
    bus: Bus, settings: Settings
) -> None:
    """GET after a cursor returns the messages after it, in order, with their cursors;
    limit caps the page and the returned cursor continues where it stopped."""
    async with http_channel(bus, settings) as channel:
        sent = [await reply(bus, "c2", f"m{i}") for i in range(5)]
        await reply(bus, "other", "not this conversation")
        status, page, _ = await call("GET", messages_url(channel, "c2"))
        assert status == 200
        assert [m["text"] for m in page["messages"]] == [f"m{i}" for i in range(5)]
        assert [m["cursor"] for m in page["messages"]] == [c for _, c in sent]
        assert page["cursor"] == sent[-1][1]
        first = page["messages"][0]
        assert first["id"] == sent[0][0].id and first["sender"]["kind"] == "bot"

        _, after2, _ = await call("GET", messages_url(channel, "c2", after=sent[1][1]))
        assert [m["text"] for m in after2["messages"]] == ["m2", "m3", "m4"]

        _, p1, _ = await call("GET", messages_url(channel, "c2", limit=2))
        _, p2, _ = await call("GET", messages_url(channel, "c2", limit=2, after=p1["cursor"]))
        _, p3, _ = await call("GET", messages_url(channel, "c2", limit=2, after=p2["cursor"]))
        texts = [m["text"] for p in (p1, p2, p3) for m in p["messages"]]
        assert texts == [f"m{i}" for i in range(5)]

        _, none, _ = await call("GET", messages_url(channel, "c2", after=sent[-1][1]))
        assert none == {"messages": [], "cursor": sent[-1][1]}


async def test_long_poll_waits_for_the_next_message(bus: Bus, settings: Settings) -> None:
    """A GET with wait and nothing new answers with the first message published after it."""
    async with http_channel(bus, settings) as channel:
        _, cursor = await reply(bus, "c3", "seen")
        poll = asyncio.create_task(
            call("GET", messages_url(channel, "c3", after=cursor, wait=WAIT * 2))
        )
        # The poll holds its consumer before the reply goes out: wait for its request to
        # be in the channel's hands (the stream then has the consumer).
        await _until_consumers(bus, 1)
        live, live_cursor = await reply(bus, "c3", "news")
        status, page, _ = await poll
        assert status == 200
        assert [(m["id"], m["cursor"]) for m in page["messages"]] == [(live.id, live_cursor)]
        assert page["cursor"] == live_cursor


async def test_long_poll_without_news_answers_empty(bus: Bus, settings: Settings) -> None:
    """A long poll that sees nothing answers an empty list and the cursor it was given."""
    async with http_channel(bus, settings) as channel:
        _, cursor = await reply(bus, "c4", "seen")
        status, page, _ = await call("GET", messages_url(channel, "c4", after=cursor, wait=0.2))
        assert (status, page) == (200, {"messages": [], "cursor": cursor})


async def _until_consumers(bus: Bus, count: int) -> None:
    async with asyncio.timeout(WAIT):
        while (await bus.js.stream_info(bus.subjects.messages_stream)).state.consumer_count < count:
            await asyncio.sleep(0.01)


# -- server-sent events ------------------------------------------------------------------
async def test_events_resume_from_last_event_id(bus: Bus, settings: Settings) -> None:
    """An event stream sends each message with its cursor as the event id; a reconnect
    with Last-Event-ID gets every later message once, in order, then live ones."""
    async with http_channel(bus, settings) as channel:
        url = f"{base(channel)}/v1/conversations/c5/events"
        sent = [await reply(bus, "c5", f"m{i}") for i in range(3)]
        timeout = aiohttp.ClientTimeout(total=WAIT * 3)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(url) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/event-stream")
                reader = SseReader(response)
                got = [await reader.next_message() for _ in range(2)]
            assert [(c, m["text"]) for c, m in got] == [(sent[0][1], "m0"), (sent[1][1], "m1")]
            last_seen = got[-1][0]
            more = [await reply(bus, "c5", f"m{i}") for i in range(3, 5)]
            headers = {"Last-Event-ID": str(last_seen)}
            async with http.get(url + "?after=0", headers=headers) as response:
                reader = SseReader(response)
                resumed = [await reader.next_message() for _ in range(3)]
                assert [m["text"] for _, m in resumed] == ["m2", "m3", "m4"]
                assert [c for c, _ in resumed] == [sent[2][1], more[0][1], more[1][1]]
                live, live_cursor = await reply(bus, "c5", "live")
                # The next event is the live one: nothing was repeated in between.
                assert await reader.next_message() == (
                    live_cursor, {**resumed[0][1], "cursor": live_cursor, "id": live.id,
                                  "text": "live", "ts": live.ts}
                )


async def test_events_send_keepalive_comments(bus: Bus, settings: Settings) -> None:
    """An idle event stream sends comment lines, which clients ignore."""
    async with http_channel(bus, settings, sse_keepalive_seconds=0.05) as channel:
        url = f"{base(channel)}/v1/conversations/c6/events"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            async with asyncio.timeout(WAIT):
                while (await response.content.readline()) != b": keepalive\n":
                    pass


async def test_stop_ends_event_streams(bus: Bus, settings: Settings) -> None:
    """Stopping the channel ends open event streams instead of leaving them hanging."""
    async with http_channel(bus, settings) as channel:
        url = f"{base(channel)}/v1/conversations/c7/events"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            await response.content.readline()
            await channel.stop()
            async with asyncio.timeout(WAIT):
                rest = await response.content.read()
            assert b"data:" not in rest
    event = await wait_event(bus, "closed", conversation="c7")
    assert event.reason == "channel stopping"


# -- tokens ------------------------------------------------------------------------------
async def test_missing_or_wrong_tokens_get_401(bus: Bus, settings: Settings) -> None:
    """Without a token, with an unknown one, or with a bad header: 401, JSON error,
    WWW-Authenticate, and a rejected ChannelEvent; a good token is accepted."""
    async with http_channel(bus, locked(settings)) as channel:
        url = messages_url(channel, "c8")
        status, body, headers = await call("POST", url, json_body={"text": "hi"})
        assert status == 401 and body["error"]["code"] == "unauthorized"
        assert body["error"]["message"] == "token required"
        assert headers["WWW-Authenticate"].startswith("Bearer")
        event = await wait_event(bus, "rejected", conversation="c8")
        assert event.code == 401 and "token required" in (event.reason or "")

        for auth, reason in (("Bearer nope", "invalid token"),
                             ("Basic czNjcmV0", "use 'Authorization: Bearer <token>'")):
            status, body, headers = await call("POST", url, json_body={"text": "hi"},
                                               headers={"Authorization": auth})
            assert (status, body["error"]["message"]) == (401, reason)
            assert "WWW-Authenticate" in headers
        status, body, _ = await call("GET", url)
        assert status == 401
        status, body, _ = await call("POST", url, data=b"{not json")  # the token comes first
        assert (status, body["error"]["code"]) == (401, "unauthorized")

        status, body, _ = await call("POST", url, json_body={"text": "hi"},
                                     headers={"Authorization": "Bearer s3cret"})
        assert status == 202
        status, body, _ = await call("GET", url + "?token=s3cret")
        assert status == 200


async def test_signed_tokens_bind_user_and_conversation(bus: Bus, settings: Settings) -> None:
    """A signed token speaks as its user (and only in its conversation, when it names
    one): another user, another conversation or an expired token is 401 with the reason."""
    alice = {"Authorization": f"Bearer {mint(SECRET, 'alice')}"}
    alice_c9 = {"Authorization": f"Bearer {mint(SECRET, 'alice', conversation='c9')}"}
    expired = {"Authorization": f"Bearer {mint(SECRET, 'alice', ttl_seconds=-10)}"}
    async with http_channel(bus, locked(settings)) as channel:
        status, body, _ = await call("POST", messages_url(channel, "c9"),
                                     json_body={"text": "hi"}, headers=alice)
        assert status == 202
        status, body, _ = await call("POST", messages_url(channel, "c9"),
                                     json_body={"text": "hi", "user": "bob"}, headers=alice)
        assert (status, body["error"]) == (
            401, {"code": "unauthorized", "message": "token is for another user"})
        status, body, _ = await call("GET", messages_url(channel, "c10"), headers=alice_c9)
        assert (status, body["error"]["message"]) == (401, "token is for another conversation")
        status, body, _ = await call("GET", messages_url(channel, "c9"), headers=expired)
        assert (status, body["error"]["message"]) == (401, "token expired")
    stored = await inbound_of(bus, "c9")
    assert [m.sender.id for m in stored] == ["alice"]


async def test_the_rasa_endpoint_follows_the_same_token_rules(
    bus: Bus, settings: Settings
) -> None:
    """Rasa's REST channel has no auth; here it needs a token like every endpoint, a
    signed token speaks only for its own sender, and a static token (a claim, not a
    proof) cannot enter the conversation a signed user started."""
    async with http_channel(bus, locked(settings), rest_wait_seconds=0.1) as channel:
        url = f"{base(channel)}/webhooks/rest/webhook"
        rasa = {"sender": "alice", "message": "hi"}
        status, body, headers = await call("POST", url, json_body=rasa)
        assert (status, body["error"]["code"]) == (401, "unauthorized")
        assert "WWW-Authenticate" in headers
        alice = {"Authorization": f"Bearer {mint(SECRET, 'alice')}"}
        status, body, _ = await call("POST", url, json_body=rasa, headers=alice)
        assert (status, body) == (200, [])  # stored; no router here to answer
        status, body, _ = await call("POST", url, json_body={**rasa, "sender": "bob"},
                                     headers=alice)
        assert (status, body["error"]["message"]) == (401, "token is for another user")
        status, body, _ = await call("POST", url + "?token=s3cret", json_body=rasa)
        assert (status, body["error"]["code"]) == (403, "forbidden")
        status, body, _ = await call("POST", url + "?token=s3cret",
                                     json_body={**rasa, "sender": "carol"})
        assert status == 200
    assert [m.text for m in await inbound_of(bus, "rest-alice")] == ["hi"]
    assert [m.text for m in await inbound_of(bus, "rest-carol")] == ["hi"]


# -- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"{not json", 400, "bad_json"),
        (b"[1, 2]", 422, "invalid"),
        (json.dumps({"text": 5}).encode(), 422, "invalid"),
        (json.dumps({"payload": "x"}).encode(), 422, "invalid"),
        (json.dumps({}).encode(), 422, "invalid"),
        (json.dumps({"text": "hi", "id": "1"}).encode(), 422, "invalid"),
        (json.dumps({"text": "hi", "user": "a.b"}).encode(), 422, "invalid"),
        # Nested past the decoder's recursion limit (RecursionError, once a 500), and
        # just past MAX_JSON_DEPTH.
        (b'{"text": "hi", "payload": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3001, 400,
         "bad_json"),
        (b'{"text": "hi", "payload": ' + b'{"a": ' * 64 + b"1" + b"}" * 65, 400, "bad_json"),
    ],
    ids=lambda value: value[:30].decode() if isinstance(value, bytes) else None,
)
async def test_bad_bodies_get_json_errors(
    bus: Bus, settings: Settings, data: bytes, status: int, code: str
) -> None:
    """Bad JSON is 400 bad_json; a wrong shape, type or id is 422 invalid; nothing is
    stored, and the refusal is an error ChannelEvent."""
    async with http_channel(bus, settings) as channel:
        got, body, _ = await call("POST", messages_url(channel, "c11"), data=data)
        assert (got, body["error"]["code"]) == (status, code)
        assert body["error"]["message"] and "\n" not in body["error"]["message"]
        event = await wait_event(bus, "error", conversation="c11")
        assert event.code == status and (event.reason or "").startswith(code)
    assert await inbound_of(bus, "c11") == []


@pytest.mark.parametrize(
    "path",
    [
        "/v1/conversations/a.b/messages",
        "/v1/conversations/c12/messages?after=x",
        "/v1/conversations/c12/messages?wait=1000",
        "/v1/conversations/c12/messages?limit=0",
        "/v1/conversations/c12/events?after=-1",
    ],
)
async def test_bad_parameters_get_400(bus: Bus, settings: Settings, path: str) -> None:
    """An invalid conversation id, cursor, wait or limit is 400 bad_request."""
    async with http_channel(bus, settings) as channel:
        status, body, _ = await call("GET", base(channel) + path)
        assert (status, body["error"]["code"]) == (400, "bad_request")


async def test_oversize_body_gets_413(bus: Bus, settings: Settings) -> None:
    """A body over the hub's max_body_bytes is 413 too_large, as JSON, and an error event."""
    small = settings.model_copy(update={"max_body_bytes": 1024})
    async with http_channel(bus, small) as channel:
        big = json.dumps({"text": "x" * 5000}).encode()
        status, body, _ = await call("POST", messages_url(channel, "c13"), data=big)
        assert (status, body["error"]["code"]) == (413, "too_large")
        assert "1024" in body["error"]["message"]
        event = await wait_event(bus, "error", conversation="c13")
        assert event.code == 413
        status, _, _ = await call("POST", messages_url(channel, "c13"),
                                  json_body={"text": "x" * 500})
        assert status == 202


async def test_posts_over_the_rate_get_429_and_store_nothing(
    bus: Bus, settings: Settings
) -> None:
    """Past the per-conversation burst a post is 429 with Retry-After and an error event;
    other conversations are not affected."""
    async with http_channel(bus, settings, max_messages_per_second=0.001,
                            rate_burst=2) as channel:
        url = messages_url(channel, "c20")
        for i in range(2):
            status, _, _ = await call("POST", url, json_body={"text": f"m{i}"})
            assert status == 202
        status, body, headers = await call("POST", url, json_body={"text": "one too many"})
        assert (status, body["error"]["code"]) == (429, "rate_limited")
        assert int(headers["Retry-After"]) >= 1
        event = await wait_event(bus, "error", conversation="c20")
        assert event.code == 429
        status, _, _ = await call("POST", messages_url(channel, "c21"), json_body={"text": "x"})
        assert status == 202
    assert [m.text for m in await inbound_of(bus, "c20")] == ["m0", "m1"]


def test_settings_refuse_unsigned_callbacks() -> None:
    """A callback URL without a secret to sign with is a settings error."""
    with pytest.raises(ValidationError, match="callback_secret"):
        HttpSettings(callback_url="http://127.0.0.1:9/hook")
    with pytest.raises(ValidationError):
        HttpSettings(no_such_setting=1)  # type: ignore[call-arg]


# -- in the whole hub --------------------------------------------------------------------
async def test_hub_serves_the_channel_with_health_and_readiness(hub: Hub) -> None:
    """The hub mounts the HTTP channel; /healthz and /readyz answer and name it."""
    assert hub.web is not None
    status, body, _ = await call("GET", f"{hub.web.url}/healthz")
    assert (status, body["status"]) == (200, "ok")
    status, body, _ = await call("GET", f"{hub.web.url}/readyz")
    assert status == 200 and body["status"] == "ready" and "http" in body["channels"]
    assert any(line.startswith("http: http://") and "/v1/conversations/" in line
               for line in hub.endpoints)


async def test_a_turn_through_post_and_long_poll(hub: Hub) -> None:
    """POST a message, then long-poll after its cursor: the bot's reply comes back."""
    assert hub.web is not None
    url = f"{hub.web.url}/v1/conversations/turn1/messages"
    status, posted, _ = await call("POST", url, json_body={"text": "I'd like to book a table"})
    assert status == 202
    _, page, _ = await call("GET", f"{url}?after={posted['cursor']}&wait={WAIT}")
    assert [m["text"] for m in page["messages"]] == ["How many people is the table for?"]
    assert page["messages"][0]["reply_to"] == posted["id"]
