"""The Telegram channel end to end: a whole hub in this process against the fake Bot API.

Real parts everywhere (nats-server, the router and recorder, the hub's HTTP server, HTTP
between the channel and the fake); only Telegram's servers are faked, by
``tests/fake_botapi.py``. Pacing is set fast here (it has its own tests with a clock).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from fake_botapi import FakeBotAPI
from inproc import ws_port
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from commhub.channels.telegram.channel import SECRET_HEADER, TelegramChannel, TelegramSettings
from commhub.channels.telegram.text import utf16_len
from commhub.core.config import Settings
from commhub.core.envelope import ChannelEvent, Message, Sender, decode, new_id
from commhub.core.hub import Hub

CHAT = 424242
SECRET = "s3cret-Token_for-tests"

BOOKING = [
    ("I'd like to book a table", "How many people is the table for?"),
    ("4", "Which day would you like to come?"),
    ("tomorrow", "At what time?"),
    ("19:30", "Under which name should I book it?"),
    ("Ann", "What email address should the confirmation go to?"),
    ("ann@example.com", "A table for 4 on"),
]


@pytest.fixture
async def fake() -> AsyncIterator[FakeBotAPI]:
    """A fake Bot API on a free port."""
    async with FakeBotAPI() as api:
        yield api


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One classifier cache for this module's hubs: the model is trained once, not per test
    (the cache is keyed on the workflows' examples, which are the same everywhere here)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def settings(settings: Settings, model_cache: Path) -> Settings:
    models = settings.data_dir / "models"
    models.parent.mkdir(parents=True, exist_ok=True)
    models.symlink_to(model_cache, target_is_directory=True)
    return settings


def telegram_settings(settings: Settings, fake: FakeBotAPI, **extra: Any) -> Settings:
    table = {
        "token": fake.token,
        "api_url": fake.api_url,
        "poll_timeout": 5,
        "chat_rate": 1000.0,
        "chat_burst": 100,
        "global_rate": 1000.0,
        "global_burst": 100,
        "retry_base": 0.01,
        "retry_max": 0.05,
        "stop_grace": 1.0,
        **extra,
    }
    return settings.model_copy(update={"plugins": {"telegram": table}})


@pytest.fixture
async def polling_hub(settings: Settings, fake: FakeBotAPI) -> AsyncIterator[Hub]:
    """A whole hub whose Telegram channel long-polls the fake."""
    hub = Hub(telegram_settings(settings, fake))
    await hub.start()
    yield hub
    await hub.stop()


@pytest.fixture
async def webhook_hub(settings: Settings, fake: FakeBotAPI) -> AsyncIterator[Hub]:
    """A whole hub whose Telegram channel is called by the fake's webhook deliveries."""
    hub = Hub(telegram_settings(settings, fake, mode="webhook", webhook_secret=SECRET))
    await hub.start()
    yield hub
    await hub.stop()


async def converse(fake: FakeBotAPI, chat: int = CHAT) -> None:
    """Book a table: every reply arrives once, in order, with a 429 in the middle, a
    duplicated update, and the confirmation button pressed as a callback query."""
    for turn, (said, expected) in enumerate(BOOKING):
        if turn == 2:
            fake.fail_next("sendMessage", 429, retry_after=1)
        # The party size arrives twice (same update_id): a webhook retry or poll overlap.
        fake.user_says(chat, said, times=2 if said == "4" else 1)
        texts = await fake.wait_sent(chat, turn + 1)
        assert texts[-1].startswith(expected), texts
    confirm = fake.sent[chat][-1]
    titles = [row[0]["text"] for row in confirm["reply_markup"]["inline_keyboard"]]
    assert titles == ["Yes, book it", "No, start over", "Cancel"]
    update = fake.press(chat, "Yes, book it")
    texts = await fake.wait_sent(chat, len(BOOKING) + 1)
    assert texts[-1].startswith("Booked! A table for 4 on"), texts
    query_id = update["callback_query"]["id"]
    await fake.wait_until(lambda: any(a["callback_query_id"] == query_id for a in fake.answered))
    # Nothing more is coming: one more message gets exactly one more reply, the first
    # of a new booking, and no stray copy of an earlier one shows up before it.
    fake.user_says(chat, "I want to make a reservation")
    texts = await fake.wait_sent(chat, len(BOOKING) + 2)
    assert texts[-1] == "How many people is the table for?"
    assert len(texts) == len(BOOKING) + 2
    assert [c.status for c in fake.calls_of("sendMessage")].count(429) == 1


async def inbound_on_bus(hub: Hub, conversation: str) -> list[Message]:
    """Every inbound message of ``conversation`` stored on the messages stream."""
    assert hub.bus is not None
    subject = hub.bus.subjects.inbound("telegram", conversation)
    sub = await hub.bus.js.subscribe(subject, ordered_consumer=True)
    found: list[Message] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except TimeoutError:
                return found
            record = decode(msg.data)
            assert isinstance(record, Message)
            found.append(record)
    finally:
        await sub.unsubscribe()


async def test_polling_conversation_replies_once_to_each_message(
    polling_hub: Hub, fake: FakeBotAPI
) -> None:
    """Long polling: a booking with buttons, a 429 and a duplicated update gets each
    reply exactly once, in order."""
    await converse(fake)
    inbound = await inbound_on_bus(polling_hub, f"tg-{CHAT}")
    assert [m.text for m in inbound][:3] == ["I'd like to book a table", "4", "tomorrow"]
    assert len(inbound) == len(BOOKING) + 2  # the duplicate was dropped
    press = inbound[len(BOOKING)]
    assert press.text is None and press.payload == {"value": "yes"}
    assert press.sender == Sender(id=str(CHAT), kind="user", name="Ann")


async def test_webhook_conversation_replies_once_to_each_message(
    webhook_hub: Hub, fake: FakeBotAPI
) -> None:
    """Webhook: the same booking through POSTs from the fake, with the secret header."""
    assert fake.webhook is not None
    assert fake.webhook["secret_token"] == SECRET
    assert fake.webhook["url"].endswith("/telegram/webhook")
    await converse(fake)
    delivered = [update_id for update_id, status in fake.webhook_deliveries if status == 200]
    assert len(delivered) == len(set(delivered)) + 1  # the duplicate really was delivered
    inbound = await inbound_on_bus(webhook_hub, f"tg-{CHAT}")
    assert len(inbound) == len(BOOKING) + 2


async def test_webhook_refuses_missing_or_wrong_secret(webhook_hub: Hub, fake: FakeBotAPI) -> None:
    """A webhook request without the secret header gets 401, with a wrong one 403."""
    assert webhook_hub.web is not None
    url = f"{webhook_hub.web.url}/telegram/webhook"
    update = fake.user_says(CHAT, "hello")  # a well-formed update; the fake delivers it too
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=update) as response:
            assert response.status == 401
            body = await response.json()
            assert body["error"]["code"] == "unauthorized"
        async with session.post(url, json=update, headers={SECRET_HEADER: "wrong"}) as response:
            assert response.status == 403
            assert (await response.json())["error"]["code"] == "forbidden"
        async with session.post(url, data=b"[1]", headers={SECRET_HEADER: SECRET}) as response:
            assert response.status == 400


async def wait_event(sub: Any) -> ChannelEvent:
    msg = await sub.next_msg(timeout=15)
    record = decode(msg.data)
    assert isinstance(record, ChannelEvent)
    return record


async def test_blocked_user_is_a_delivery_failed_event(
    polling_hub: Hub, fake: FakeBotAPI
) -> None:
    """A 403 (the user blocked the bot) becomes a delivery_failed ChannelEvent; the
    channel goes on serving other chats."""
    assert polling_hub.bus is not None
    subject = polling_hub.bus.subjects.channel_event("telegram", "delivery_failed")
    sub = await polling_hub.bus.nc.subscribe(subject)
    fake.block(CHAT)
    fake.user_says(CHAT, "I'd like to book a table")
    event = await wait_event(sub)
    assert event.conversation == f"tg-{CHAT}" and event.code == 403
    assert event.reason is not None and "blocked" in event.reason
    assert fake.texts(CHAT) == []
    fake.user_says(777, "I'd like to book a table")
    assert await fake.wait_sent(777, 1) == ["How many people is the table for?"]


async def publish_reply(hub: Hub, conversation: str, text: str, **kw: Any) -> None:
    """Publish an outbound message the way an agent or service does."""
    assert hub.bus is not None
    message = Message(
        id=new_id(), conversation=conversation, channel="telegram", direction="out",
        sender=Sender(id="agent-1", kind="agent"), text=text, **kw,
    )
    await hub.bus.publish(hub.bus.subjects.outbound("telegram", conversation), message)


async def test_long_reply_is_split_in_order(polling_hub: Hub, fake: FakeBotAPI) -> None:
    """A reply over 4,096 UTF-16 units (emoji count 2) arrives in parts, each within the
    limit, in order, cut at paragraph breaks."""
    fake.user_says(CHAT, "hello there")  # Telegram knows the chat once the user wrote
    await fake.wait_sent(CHAT, 1)
    paragraphs = [f"Paragraph {i}: " + "😀" * 300 for i in range(12)]  # 12 x 614 units
    text = "\n\n".join(paragraphs)
    # Fewer code points than the limit, more UTF-16 units: only UTF-16 counting splits it.
    assert len(text) < 4096 < utf16_len(text)
    await publish_reply(polling_hub, f"tg-{CHAT}", text)
    await fake.wait_until(lambda: "\n\n".join(fake.texts(CHAT)[1:]) == text)
    parts = fake.texts(CHAT)[1:]
    assert parts == ["\n\n".join(paragraphs[:6]), "\n\n".join(paragraphs[6:])]
    assert all(utf16_len(p) <= 4096 for p in parts)
    assert all(p.startswith("Paragraph") and p.endswith("😀") for p in parts)


async def test_network_errors_and_5xx_are_retried(polling_hub: Hub, fake: FakeBotAPI) -> None:
    """Dropped connections and 502s on sendMessage are retried: the reply arrives once."""
    fake.user_says(CHAT, "hi")
    await fake.wait_sent(CHAT, 1)
    fake.drop_next("sendMessage", 2)
    fake.fail_next("sendMessage", 502, 2)
    await publish_reply(polling_hub, f"tg-{CHAT}", "after the storm")
    texts = await fake.wait_sent(CHAT, 2)
    assert texts[1] == "after the storm"
    statuses = [c.status for c in fake.calls_of("sendMessage")]
    assert statuses[1:] == [0, 0, 502, 502, 200]
    # The next reply is the next message sent: no copy of the retried one came after it.
    await publish_reply(polling_hub, f"tg-{CHAT}", "calm again")
    assert (await fake.wait_sent(CHAT, 3))[1:] == ["after the storm", "calm again"]


async def test_long_button_payload_round_trips(polling_hub: Hub, fake: FakeBotAPI) -> None:
    """A button payload over 64 bytes is sent as a short key; pressing the button
    brings back the whole payload."""
    fake.user_says(CHAT, "hi")
    await fake.wait_sent(CHAT, 1)
    big = {"action": "choose", "item": "x" * 80}
    await publish_reply(
        polling_hub, f"tg-{CHAT}", "Pick one",
        payload={"buttons": [{"title": "The long one", "payload": big},
                             {"title": "Short", "payload": {"value": "s"}}]},
    )
    await fake.wait_sent(CHAT, 2)
    fake.press(CHAT, "The long one")
    await fake.wait_until(lambda: len(fake.answered) == 1)
    assert polling_hub.bus is not None
    inbound = await inbound_on_bus(polling_hub, f"tg-{CHAT}")
    assert inbound[-1].payload == big


async def test_edited_message_is_passed_on(polling_hub: Hub, fake: FakeBotAPI) -> None:
    """An edited message arrives as a new inbound message marked as an edit."""
    update = fake.user_says(CHAT, "I'd like to book a tabel")
    await fake.wait_sent(CHAT, 1)
    fake.edit(CHAT, update["message"]["message_id"], "I'd like to book a table")
    await fake.wait_sent(CHAT, 2)
    inbound = await inbound_on_bus(polling_hub, f"tg-{CHAT}")
    assert inbound[-1].text == "I'd like to book a table"
    assert inbound[-1].meta["telegram"]["kind"] == "edited"


async def test_group_chat_conversation_id(polling_hub: Hub, fake: FakeBotAPI) -> None:
    """A group (negative chat id) is conversation tg-m<id>, and replies reach it."""
    fake.user_says(-100123, "I'd like to book a table", user_id=55)
    assert await fake.wait_sent(-100123, 1) == ["How many people is the table for?"]
    inbound = await inbound_on_bus(polling_hub, "tg-m100123")
    assert inbound[0].sender.id == "55"


async def test_restart_resumes_after_stored_offset(
    settings: Settings, fake: FakeBotAPI
) -> None:
    """The polling offset is stored: a restarted channel asks for the updates after the
    last one it published, and a reply published while it was down is sent after."""
    hub = Hub(telegram_settings(settings, fake))
    await hub.start()
    try:
        update = fake.user_says(CHAT, "I'd like to book a table")
        await fake.wait_sent(CHAT, 1)
    finally:
        await hub.stop()
    polls_before = len(fake.calls_of("getUpdates"))
    hub = Hub(telegram_settings(settings, fake))
    await hub.start()
    try:
        await publish_reply(hub, f"tg-{CHAT}", "sent after the restart")
        await fake.wait_sent(CHAT, 2)
        first_poll = fake.calls_of("getUpdates")[polls_before]
        assert first_poll.params["offset"] == update["update_id"] + 1
    finally:
        await hub.stop()


async def test_off_without_token(settings: Settings) -> None:
    """Without a token the channel says it is off and the hub runs without it."""
    hub = Hub(settings)
    endpoints = await hub.start()
    try:
        assert "telegram: off (set COMMHUB_TELEGRAM_TOKEN to enable)" in endpoints
    finally:
        await hub.stop()


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """COMMHUB_TELEGRAM_* variables configure the channel and beat the file's table."""
    monkeypatch.setenv("COMMHUB_TELEGRAM_TOKEN", "1:abc")
    monkeypatch.setenv("COMMHUB_TELEGRAM_API_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("COMMHUB_TELEGRAM_MODE", "webhook")
    monkeypatch.setenv("COMMHUB_TELEGRAM_WEBHOOK_SECRET", "abc")
    settings = TelegramSettings(**{"api_url": "http://file.example", "edited_messages": False})
    assert settings.token is not None and settings.token.get_secret_value() == "1:abc"
    assert settings.api_url == "http://127.0.0.1:1"
    assert settings.mode == "webhook" and settings.edited_messages is False
    assert "1:abc" not in repr(settings)
    assert TelegramChannel.Settings is TelegramSettings


def test_webhook_mode_requires_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Webhook mode without a valid secret token is refused at start."""
    monkeypatch.delenv("COMMHUB_TELEGRAM_WEBHOOK_SECRET", raising=False)
    with pytest.raises(ValueError, match="webhook_secret"):
        TelegramSettings(token="1:abc", mode="webhook")
    with pytest.raises(ValueError, match="webhook_secret"):
        TelegramSettings(token="1:abc", mode="webhook", webhook_secret="has space")
    assert TelegramSettings(mode="webhook").token is None  # off: nothing to check


async def test_bad_token_stops_the_start(settings: Settings, fake: FakeBotAPI) -> None:
    """A token the Bot API refuses stops the hub's start with the reason."""
    bad = telegram_settings(settings, fake)
    bad.plugins["telegram"]["token"] = "1:wrong"
    hub = Hub(bad)
    with pytest.raises(RuntimeError, match="refuses the token"):
        await hub.start()


async def test_unknown_conversation_is_a_delivery_failed_event(
    polling_hub: Hub, fake: FakeBotAPI
) -> None:
    """A reply to a conversation that is no Telegram chat is reported, not sent."""
    assert polling_hub.bus is not None
    subject = polling_hub.bus.subjects.channel_event("telegram", "delivery_failed")
    sub = await polling_hub.bus.nc.subscribe(subject)
    await publish_reply(polling_hub, "demo1", "hello")
    event = await wait_event(sub)
    assert event.conversation == "demo1" and event.code == 400
    await asyncio.sleep(0)
    assert msgspec.json.encode(event)  # a complete record


async def test_clients_of_other_channels_cannot_enter_a_telegram_chat(
    polling_hub: Hub, fake: FakeBotAPI
) -> None:
    """A Telegram chat's conversation (tg-<chat id>) is the chat's: a WebSocket client
    naming the same id is refused with 4403, and the chat goes on as before."""
    fake.user_says(CHAT, "I'd like to book a table")
    await fake.wait_sent(CHAT, 1)
    address = f"ws://127.0.0.1:{ws_port(polling_hub)}/ws?conversation=tg-{CHAT}&user=ann"
    async with connect(address) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
        4403, "forbidden: the conversation belongs to another user")
    fake.user_says(CHAT, "4")
    texts = await fake.wait_sent(CHAT, 2)
    assert texts[-1].startswith("Which day would you like to come?")
