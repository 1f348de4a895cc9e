"""The Telegram channel's pure parts: splitting, pacing, ids, buttons, dedupe, sending.

No hub here; the sender tests run python-telegram-bot's real client against the fake
Bot API with an injected sleep, so retry and 429 handling are checked without waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fake_botapi import FakeBotAPI
from telegram import Bot, Update
from telegram.error import Conflict

from commhub.channels.telegram.channel import TelegramSettings
from commhub.channels.telegram.pacing import Pacer, RateCell
from commhub.channels.telegram.send import Backoff, keyboard, make_bot, send_reply
from commhub.channels.telegram.text import split_text, utf16_len
from commhub.channels.telegram.updates import (
    RecentUpdates,
    callback_data_for,
    chat_id_of,
    conversation_id,
    message_id_for,
    parse_callback_data,
    parse_update,
)
from commhub.core.subjects import valid_token

# -- splitting ------------------------------------------------------------------------------


def test_utf16_len_counts_astral_characters_twice() -> None:
    """Telegram's unit: an emoji outside the BMP is two UTF-16 code units."""
    assert utf16_len("abc") == 3
    assert utf16_len("😀") == 2
    assert utf16_len("é😀x") == 4


def test_short_text_is_one_part() -> None:
    """A text within the limit is sent whole; a blank one not at all."""
    assert split_text("hello", 10) == ["hello"]
    assert split_text("   \n ", 10) == []


def test_split_prefers_paragraphs_then_lines_then_words() -> None:
    """Cuts at a blank line, else a line break, else a space, dropping the separator."""
    assert split_text("aaaa\n\nbbbb cc\ndd", 12) == ["aaaa\n\nbbbb", "cc\ndd"]
    assert split_text("aaaaaa\nbbbbbb", 10) == ["aaaaaa", "bbbbbb"]
    assert split_text("aaaa bbbb cccc", 10) == ["aaaa bbbb", "cccc"]


def test_split_avoids_tiny_parts() -> None:
    """A separator near the start of a part is passed over for a fuller part."""
    text = "a\n\n" + "b" * 5 + " " + "c" * 20
    parts = split_text(text, 10)
    assert parts[0] == "a\n\nbbbbb"
    assert all(utf16_len(p) <= 10 for p in parts)


def test_hard_cut_never_splits_an_emoji() -> None:
    """Without any separator the cut is hard, but never inside a surrogate pair."""
    text = "x" + "😀" * 10  # 21 units
    parts = split_text(text, 4)
    assert all(utf16_len(p) <= 4 for p in parts)
    assert "".join(parts) == text
    assert parts[0] == "x😀"


def test_split_keeps_everything_in_order() -> None:
    """Joined with the separators they were cut at, the parts give back the text."""
    words = [f"word{i}" + "😀" * (i % 3) for i in range(3000)]
    text = " ".join(words)
    parts = split_text(text)
    assert len(parts) > 1
    assert all(utf16_len(p) <= 4096 for p in parts)
    assert " ".join(parts) == text


# -- pacing ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_cell_allows_a_burst_then_spaces_out() -> None:
    """Three at once, then one a second, reservations queued in order."""
    cell = RateCell(rate=1.0, burst=3)
    assert [cell.reserve(0.0) for _ in range(5)] == [0.0, 0.0, 0.0, 1.0, 2.0]
    assert cell.reserve(10.0) == 0.0  # idle long enough: a burst again


def test_pacer_paces_each_chat_and_the_whole_bot() -> None:
    """Per-chat pacing does not slow other chats; the global rate caps them all."""
    clock = Clock()
    pacer = Pacer(chat_rate=1.0, chat_burst=1, global_rate=10.0, global_burst=2, clock=clock)
    assert pacer.reserve("a") == 0.0
    assert pacer.reserve("a") == pytest.approx(1.0)
    assert pacer.reserve("b") == pytest.approx(0.1)  # chat b is free, the bot's burst is not
    clock.now += 5
    assert pacer.reserve("a") == 0.0


def test_pacer_holds_a_chat_after_retry_after() -> None:
    """After a 429 with retry_after, that chat waits that long; others do not."""
    clock = Clock()
    pacer = Pacer(chat_rate=100.0, chat_burst=5, global_rate=100.0, global_burst=50, clock=clock)
    pacer.penalize("a", 7.0)
    assert pacer.reserve("a") == pytest.approx(7.0)
    assert pacer.reserve("b") == 0.0


def test_pacer_forgets_idle_chats() -> None:
    """Memory follows active chats: quiet chats' cells are dropped."""
    clock = Clock()
    pacer = Pacer(chat_rate=1000.0, chat_burst=1, global_rate=1e9, global_burst=10**6, clock=clock)
    for i in range(2000):
        pacer.reserve(i)
        clock.now += 1
    assert pacer.tracked_chats < 1100


# -- ids and buttons -----------------------------------------------------------------------


@pytest.mark.parametrize("chat_id", [1, 424242, -100123456789, -5])
def test_conversation_ids_round_trip(chat_id: int) -> None:
    """Chat ids become valid subject tokens and back."""
    conversation = conversation_id(chat_id)
    assert valid_token(conversation)
    assert chat_id_of(conversation) == chat_id


def test_foreign_conversations_are_not_chats() -> None:
    for conversation in ("demo1", "tg-", "tg-m", "tg-12a", "tg-m-1", "tg-١٢"):
        assert chat_id_of(conversation) is None


def test_message_id_is_stable_per_bot_and_update() -> None:
    """A re-delivered update gets the same id (JetStream drops it); others differ."""
    assert message_id_for(1, 10) == message_id_for(1, 10)
    assert message_id_for(1, 10) != message_id_for(1, 11)
    assert message_id_for(1, 10) != message_id_for(2, 10)


def test_short_payload_travels_inline() -> None:
    data, stored = callback_data_for({"value": "yes"})
    assert stored is None and len(data.encode()) <= 64
    assert parse_callback_data(data) == ("payload", {"value": "yes"})


def test_long_payload_is_stored_under_a_hash() -> None:
    payload = {"start": "book_table", "note": "ü" * 40}
    data, stored = callback_data_for(payload)
    assert stored is not None and data.startswith("h:") and len(data.encode()) <= 64
    kind, key = parse_callback_data(data)
    assert kind == "stored" and isinstance(key, str) and key in data
    assert callback_data_for(payload) == (data, stored)  # stable


def test_foreign_callback_data_is_a_value() -> None:
    assert parse_callback_data("yes") == ("payload", {"value": "yes"})
    assert parse_callback_data("{oops") == ("payload", {"value": "{oops"})


def test_keyboard_has_one_button_a_row() -> None:
    markup = keyboard([("Yes", '{"value":"yes"}'), ("No", '{"value":"no"}')])
    assert markup is not None
    assert [[b.text for b in row] for row in markup.inline_keyboard] == [["Yes"], ["No"]]
    assert keyboard([]) is None


# -- update parsing and dedupe -----------------------------------------------------------------


def test_parse_complete_updates() -> None:
    """The fake's complete objects parse into what the channel needs."""
    fake = FakeBotAPI()
    update = fake.user_says(-1001, "hello", user_id=9, first_name="Bo")
    parsed = parse_update(Update.de_json(update, None))
    assert parsed is not None
    assert (parsed.kind, parsed.chat_id, parsed.user_id, parsed.text) == (
        "message", -1001, 9, "hello"
    )
    assert parsed.chat_type == "supergroup" and parsed.user_name == "Bo"
    edited = fake.edit(-1001, update["message"]["message_id"], "hello!")
    parsed = parse_update(Update.de_json(edited, None))
    assert parsed is not None and parsed.kind == "edited" and parsed.text == "hello!"


def test_updates_without_text_are_skipped() -> None:
    fake = FakeBotAPI()
    update = fake.user_says(5, "x")
    del update["message"]["text"]
    update["message"]["sticker"] = {"file_id": "f", "file_unique_id": "u", "type": "regular",
                                    "width": 1, "height": 1, "is_animated": False,
                                    "is_video": False}
    assert parse_update(Update.de_json(update, None)) is None


async def test_recent_updates_run_each_id_once() -> None:
    """A duplicate (even a concurrent one) is not run again; a failure is forgotten."""
    recent = RecentUpdates(size=2)
    runs: list[int] = []
    gate = asyncio.Event()

    async def slow() -> None:
        runs.append(1)
        await gate.wait()

    first = asyncio.create_task(recent.run_once(1, slow))
    second = asyncio.create_task(recent.run_once(1, slow))
    await asyncio.sleep(0)
    gate.set()
    assert await first is True and await second is False
    assert runs == [1]

    async def boom() -> None:
        raise OSError("bus down")

    with pytest.raises(OSError):
        await recent.run_once(2, boom)
    assert not recent.seen(2)

    async def ok() -> None:
        runs.append(2)

    assert await recent.run_once(2, ok) is True
    assert runs == [1, 2]


# -- sending against the fake Bot API ------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeBotAPI]:
    async with FakeBotAPI() as api:
        yield api


@pytest.fixture
async def bot(fake: FakeBotAPI) -> AsyncIterator[Bot]:
    bot = make_bot(fake.token, fake.api_url)
    await bot.initialize()
    yield bot
    await bot.shutdown()


class Sleeps:
    """An injected sleep that records what it was asked to wait, and waits nothing."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)


async def test_send_honours_retry_after(fake: FakeBotAPI, bot: Bot) -> None:
    """A 429 makes the chat wait retry_after, then the same part is sent once."""
    fake.user_says(1, "hi")
    fake.fail_next("sendMessage", 429, retry_after=3)
    sleeps = Sleeps()
    result = await send_reply(bot, 1, ["one"], None, Pacer(1000, 10), Backoff(), sleep=sleeps)
    assert result.ok and fake.texts(1) == ["one"]
    assert sleeps.asked == [pytest.approx(3.0, abs=0.05)]


async def test_send_backs_off_on_5xx_and_drops(fake: FakeBotAPI, bot: Bot) -> None:
    """5xx and dropped connections are retried with growing delays; nothing is lost."""
    fake.user_says(1, "hi")
    fake.fail_next("sendMessage", 502, 2)
    fake.drop_next("sendMessage")
    sleeps = Sleeps()
    backoff = Backoff(base=0.5, cap=1.5, jitter=0.0)
    result = await send_reply(bot, 1, ["a", "b"], None, Pacer(1000, 10), backoff, sleep=sleeps)
    assert result.ok and fake.texts(1) == ["a", "b"]
    assert sleeps.asked == [0.5, 1.0, 1.5]


async def test_send_stops_at_403_and_400(fake: FakeBotAPI, bot: Bot) -> None:
    """A blocked user or a refused request fails for good, with the reason."""
    fake.user_says(1, "hi")
    fake.block(1)
    result = await send_reply(bot, 1, ["a"], None, Pacer(1000, 10), Backoff())
    assert (result.ok, result.code) == (False, 403) and "blocked" in (result.reason or "")
    result = await send_reply(bot, 999, ["a"], None, Pacer(1000, 10), Backoff())
    assert (result.ok, result.code) == (False, 400)
    assert "chat not found" in (result.reason or "").lower()


async def test_send_puts_the_keyboard_on_the_last_part(fake: FakeBotAPI, bot: Bot) -> None:
    fake.user_says(1, "hi")
    markup = keyboard([("Yes", '{"value":"yes"}')])
    result = await send_reply(bot, 1, ["a", "b"], markup, Pacer(1000, 10), Backoff())
    assert result.ok
    assert "reply_markup" not in fake.sent[1][0]
    assert fake.sent[1][1]["reply_markup"]["inline_keyboard"][0][0]["text"] == "Yes"


async def test_send_waits_for_its_pacing_slot(fake: FakeBotAPI, bot: Bot) -> None:
    """With one message a second and no burst, the second part waits a second."""
    fake.user_says(1, "hi")
    clock = Clock()
    sleeps = Sleeps()
    pacer = Pacer(chat_rate=1.0, chat_burst=1, clock=clock)
    await send_reply(bot, 1, ["a", "b", "c"], None, pacer, Backoff(), sleep=sleeps)
    assert sleeps.asked == [pytest.approx(1.0), pytest.approx(2.0)]


# -- the fake itself -----------------------------------------------------------------------------


async def test_fake_newer_poll_ends_older_with_409(fake: FakeBotAPI, bot: Bot) -> None:
    """Like Telegram: a second getUpdates (another bot process) ends the pending one
    with 409 Conflict; the newer one returns as soon as an update arrives."""
    older = asyncio.create_task(bot.get_updates(timeout=5))
    await fake.wait_until(lambda: fake.polling)
    async with make_bot(fake.token, fake.api_url) as other:
        newer = asyncio.create_task(other.get_updates(timeout=30))
        with pytest.raises(Conflict, match="terminated by other getUpdates"):
            await older
        fake.user_says(3, "wake up")
        updates = await newer
    assert [u.message.text for u in updates if u.message] == ["wake up"]


async def test_fake_refuses_getupdates_while_a_webhook_is_set(fake: FakeBotAPI, bot: Bot) -> None:
    await bot.set_webhook("http://127.0.0.1:9/hook", secret_token="abc")
    with pytest.raises(Conflict, match="webhook is active"):
        await bot.get_updates()
    await bot.delete_webhook()
    assert await bot.get_updates() == ()


def test_every_setting_is_in_the_telegram_doc() -> None:
    """docs/telegram.md documents every field of TelegramSettings."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "telegram.md").read_text()
    missing = [name for name in TelegramSettings.model_fields if f"`{name}`" not in doc]
    assert not missing, missing
