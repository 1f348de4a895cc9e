"""The agents' inbox and the chat widget together, in a real headless browser (Debian's
chromium through Selenium), against a real hub subprocess: two tabs, the user's chat
(the hub's ``/chat`` page) and the agent's ``/inbox``.

With no inbox open, a conversation that reaches the fallback stays with the bot. With
the inbox open (its heartbeat makes an agent present), the next one is handed over: it
appears in the inbox, the agent takes it and answers, the user's widget shows the
"joined" notice and the answer, the agent hands it back and the bot answers again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browserkit import new_driver, screenshot, wait
from hubproc import HubProcess
from test_widget_browser import bot_said, messages, say, widget_ready

UNCLEAR = ["blue elephants dancing", "purple monkeys singing loudly"]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path / "data")
    try:
        yield process.start()
    finally:
        if process.process is not None and process.process.poll() is None:
            process.terminate()


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Any]:
    browser = new_driver(tmp_path / "chromium", width=1280, height=860)
    try:
        yield browser
    finally:
        browser.quit()


def inbox_items(driver: Any) -> list[dict[str, str]]:
    return list(driver.execute_script(
        "return [...document.querySelectorAll('#queue li')].map(e => ({...e.dataset,"
        " text: e.textContent}));"))


@pytest.mark.slow
def test_agent_takes_answers_and_hands_back(hub: HubProcess, driver: Any) -> None:
    base = hub.http_url
    driver.get(f"{base}/chat")
    chat_tab = driver.current_window_handle
    widget_ready(driver)
    conversation = driver.execute_script(
        "return document.getElementById('commhub-widget').dataset.conversation")

    # Nobody at the inbox: the fallback keeps the conversation with the bot.
    say(driver, UNCLEAR[0])
    bot_said(driver, "I'm not sure what you mean")
    say(driver, UNCLEAR[1])
    bot_said(driver, "no colleague is available")

    # The agent opens the inbox: present while the page is open.
    driver.switch_to.new_window("tab")
    inbox_tab = driver.current_window_handle
    driver.get(f"{base}/inbox")
    driver.execute_script(
        "const i = document.getElementById('agent-name'); i.value = 'Eve';"
        "i.dispatchEvent(new Event('change'));")
    wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-present")
         == "1", "the inbox's heartbeat")
    assert driver.find_element("id", "presence").text == "Available as Eve"

    driver.switch_to.window(chat_tab)
    say(driver, UNCLEAR[0])
    bot_said(driver, "I'm not sure what you mean", count=2)
    say(driver, UNCLEAR[1])
    bot_said(driver, "Let me hand you over")

    driver.switch_to.window(inbox_tab)
    item = wait(driver, lambda d: next((i for i in inbox_items(d)
                                        if i["conversation"] == conversation), None),
                "the conversation in the inbox")
    assert item["status"] == "waiting" and UNCLEAR[0] in item["text"]
    driver.find_element("css selector", f'#queue li[data-conversation="{conversation}"] button'
                        ).click()
    wait(driver, lambda d: len(d.find_elements("css selector", "#transcript li")) >= 6,
         "the transcript")
    assert "no workflow was sure" in driver.find_element("id", "reason").text
    driver.find_element("id", "take").click()
    wait(driver, lambda d: d.find_element("id", "detail").get_attribute("data-mine") == "1",
         "the conversation taken")
    box = driver.find_element("id", "reply-input")
    box.send_keys("Hi, Eve here. How can I help?")
    driver.find_element("css selector", "#reply-form button").click()
    wait(driver, lambda d: any(li.get_attribute("data-kind") == "agent" for li in
                               d.find_elements("css selector", "#transcript li")),
         "the answer in the transcript")
    item = next(i for i in inbox_items(driver) if i["conversation"] == conversation)
    assert item["status"] == "taken" and "with Eve" in item["text"]
    screenshot(driver, "inbox")

    # The user's widget: the notice, then the agent's answer.
    driver.switch_to.window(chat_tab)
    answer = bot_said(driver, "Eve here")[0]
    assert answer["kind"] == "agent"
    page = messages(driver)
    joined = next(m for m in page if m["text"] == "Eve has joined the conversation.")
    assert joined["notice"] == "1"
    assert page.index(joined) < page.index(answer)

    # Handed back: the "left" notice, and the bot answers again.
    driver.switch_to.window(inbox_tab)
    driver.find_element("id", "release").click()
    wait(driver, lambda d: not any(i["conversation"] == conversation
                                   for i in inbox_items(d)), "the conversation to leave")
    driver.switch_to.window(chat_tab)
    left = bot_said(driver, "has left the conversation")[0]
    assert left["notice"] == "1"
    say(driver, "I'd like to book a table")
    bot_said(driver, "How many people")
    page = messages(driver)
    assert len({m["id"] for m in page}) == len(page)
