"""The dashboard in a real headless browser (Debian's chromium through Selenium), on a real
hub with conversations over two channels.

Needs ``/usr/bin/chromium``, ``/usr/bin/chromedriver`` (Debian's ``chromium`` and
``chromium-driver``) and the ``selenium`` package. Without them the test is skipped with
the reason, unless ``COMMHUB_REQUIRE_BROWSER=1`` (as in CI), which makes it fail instead.
Selenium is always given both paths, so Selenium Manager never downloads a browser.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from browserkit import browser_paths
from inproc import ws_port
from wschat import Chat

from commhub.core.classify import BatchingClassifier, Classifier
from commhub.core.config import Settings
from commhub.core.envelope import Alternative, Message, Sender, encode, new_id
from commhub.core.hub import Hub
from commhub.core.records.sqlclient import query_over_bus

TOKEN = "dash-analyst-token"
WAIT = 60  # seconds: a safety net for slow machines, never a claim about speed

# (channel, conversation, user, texts). The phrases are the workflows' own examples, or
# text no workflow knows, so the classifier's choices are known in advance; CLARIFY's
# ranking is fixed (Scripted): two candidates too close to call.
CLARIFY = "which one is it"
CONVERSATIONS = [
    ("websocket", "ws-book", "ann", ["I'd like to book a table", "4"]),
    ("websocket", "ws-help", "bob", ["I have a problem with my order"]),
    ("websocket", "ws-what", "ann", ["what is the capital of mongolia"]),
    ("websocket", "ws-which", "cat", [CLARIFY]),
    ("sms", "sms-book", "+100", ["reserve a table for tonight"]),
    ("sms", "sms-what", "+200", ["blue elephants dancing"]),
]
SENT_IN = {"websocket": 5, "sms": 2}
INTENTS = {"book_table": 2, "support_request": 1, "(none)": 2, "(clarify)": 1}
RUNS = 5  # a clarifying question starts no run
SMS_INTENTS = {"book_table": 1, "(none)": 1}


class Scripted(Classifier):
    """The hub's own classifier, except for CLARIFY: two candidates too close to call."""

    name = "scripted"

    def __init__(self, inner: Classifier) -> None:
        super().__init__()
        self.inner = inner
        self.model_id = inner.model_id

    def rank(self, texts: Sequence[str], top: int = 3) -> list[list[Alternative]]:
        close = [Alternative("book_table", 0.46), Alternative("order_status", 0.41)]
        return [close if text == CLARIFY else self.inner.rank([text], top)[0] for text in texts]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared hub settings, with a SQL token the page must use."""
    return settings.model_copy(update={"sql_tokens": [TOKEN]})


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """Headless chromium, driven through Debian's chromedriver; never downloads anything."""
    chromium, chromedriver = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # belt and braces: Selenium Manager stays offline
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--no-first-run", "--window-size=1280,2000",
                     f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=str(chromedriver)))
    try:
        yield browser
    finally:
        browser.quit()


async def _converse(hub: Hub) -> None:
    """Chat over the WebSocket channel, and inject the 'sms' conversations as another
    service would: plain nats-py, a Message on {prefix}.in.sms.{conversation}."""
    assert hub.nats_url is not None
    for channel, conversation, user, texts in CONVERSATIONS:
        if channel != "websocket":
            continue
        chat = await Chat.open(ws_port(hub), conversation, user=user)
        for text in texts:
            await chat.say(text)
        await chat.close()
    nc = await nats.connect(hub.nats_url)
    try:
        js = nc.jetstream()
        for channel, conversation, user, texts in CONVERSATIONS:
            if channel == "websocket":
                continue
            for text in texts:
                message = Message(id=new_id(), conversation=conversation, channel=channel,
                                  direction="in", sender=Sender(id=user), text=text)
                await js.publish(hub.settings.subjects.inbound(channel, conversation),
                                 encode(message), headers={"Nats-Msg-Id": message.id})
    finally:
        await nc.close()


async def _sql(hub: Hub, sql: str) -> list[dict[str, Any]]:
    assert hub.bus is not None
    result = await query_over_bus(hub.bus.nc, hub.bus.subjects, sql, timeout=20)
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]


async def _wait_until_recorded(hub: Hub) -> None:
    """Poll the SQL API until every message, reply, classification and workflow step of
    the conversations is in DuckDB (the recorder commits in batches; SQL reads a
    snapshot)."""
    sent = sum(SENT_IN.values())
    want = {"inbound": sent, "answered": sent, "classified": sum(INTENTS.values()),
            "started": RUNS, "transitions": 1}
    sql = """
        SELECT
          (SELECT count(*) FROM messages WHERE direction = 'in') AS inbound,
          (SELECT count(*) FROM messages i WHERE direction = 'in' AND EXISTS (
              SELECT 1 FROM messages o WHERE o.direction = 'out' AND o.reply_to = i.id
          )) AS answered,
          (SELECT count(*) FROM classifications) AS classified,
          (SELECT count(*) FROM workflow_events WHERE kind = 'started') AS started,
          (SELECT count(*) FROM workflow_events WHERE kind = 'transition') AS transitions
    """
    seen: dict[str, Any] = {}
    async with asyncio.timeout(WAIT):
        while seen != want:
            seen = (await _sql(hub, sql))[0]
            if seen != want:
                await asyncio.sleep(0.2)


# -- in the browser (blocking Selenium calls, run in a worker thread) ------------------
def _wait(driver: Any, condition: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(condition, what)


def _refreshed(driver: Any, after: int) -> dict[str, str]:
    """Wait until the page has finished a refresh after refresh number ``after``."""
    def done(d: Any) -> dict[str, str] | None:
        body = d.find_element("tag name", "body")
        count = int(body.get_attribute("data-refreshes") or 0)
        state = body.get_attribute("data-state") or ""
        return {"state": state, "count": str(count)} if count > after else None

    return dict(_wait(driver, done, f"a dashboard refresh after #{after}"))


def _refreshes(driver: Any) -> int:
    return int(driver.find_element("tag name", "body").get_attribute("data-refreshes") or 0)


def _marks(driver: Any, css: str) -> list[dict[str, str]]:
    """The data-* attributes of every element matching ``css``."""
    return list(driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => ({...e.dataset}));", css
    ))


def _sum(marks: list[dict[str, str]], key: str, **match: str) -> float:
    return sum(float(m[key]) for m in marks
               if all(m.get(k) == v for k, v in match.items()))


def _apply_filters(driver: Any, channel: str = "", start: str = "", end: str = "") -> None:
    from selenium.webdriver.support.ui import Select

    before = _refreshes(driver)
    Select(driver.find_element("id", "filter-channel")).select_by_value(channel)
    for field, value in (("filter-from", start), ("filter-to", end)):
        # Typing into a date input depends on the browser's locale; set it as a user's
        # date picker would.
        driver.execute_script("arguments[0].value = arguments[1];",
                              driver.find_element("id", field), value)
    driver.find_element("id", "filter-apply").click()
    assert _refreshed(driver, before)["state"] == "ready"


def _run_sql_box(driver: Any, sql: str) -> None:
    box = driver.find_element("id", "sql-input")
    box.clear()
    box.send_keys(sql)
    driver.execute_script(
        "document.getElementById('sql-status').textContent = '';"
        "document.getElementById('sql-error').hidden = true;"
    )
    driver.find_element("id", "sql-run").click()
    _wait(driver, lambda d: d.find_element("id", "sql-status").text not in ("", "Running…")
          or d.find_element("id", "sql-error").is_displayed(), "the SQL box's answer")


def _table(driver: Any, css: str) -> list[list[str]]:
    return list(driver.execute_script(
        "return [...document.querySelectorAll(arguments[0] + ' tbody tr')]"
        ".map(r => [...r.cells].map(c => c.textContent));", css
    ))


def _check_page(driver: Any, base: str, truth: dict[str, Any]) -> None:
    # Opened with ?token=: the page keeps it for the tab and drops it from the address.
    driver.get(f"{base}/dashboard?token={TOKEN}")
    assert _refreshed(driver, 0)["state"] == "ready"
    assert "token" not in driver.current_url
    assert driver.title == "commhub dashboard"

    # Volume: one bar per day and channel, carrying the recorded in/out counts.
    volume = _marks(driver, "#chart-volume rect.bar")
    assert {m["channel"] for m in volume} == set(SENT_IN)
    for channel, count in SENT_IN.items():
        assert _sum(volume, "in", channel=channel) == count
        assert _sum(volume, "out", channel=channel) == truth["out"][channel]

    # Intent mix: classifications per workflow, with the recorded mean confidence.
    intents = _marks(driver, "#chart-intents rect.bar")
    assert {m["workflow"]: int(m["value"]) for m in intents} == INTENTS
    for mark in intents:
        assert float(mark["confidence"]) == pytest.approx(truth["confidence"][mark["workflow"]])

    # Fallback rate: 2 of the 6 first messages were unclear; the clarifying question is
    # not a fallback.
    summary = _marks(driver, "#chart-fallback p.summary")[0]
    assert (int(summary["fallbacks"]), int(summary["classifications"])) == (2, 6)
    assert float(summary["rate"]) == pytest.approx(2 / 6)
    assert driver.find_element("id", "tile-fallback").text == "33%"

    # Confidence distribution: every classification in one bucket, fallbacks and the
    # clarifying question apart.
    confidence = _marks(driver, "#chart-confidence rect.bar")
    assert _sum(confidence, "value") == 6
    assert _sum(confidence, "value", series="fallbacks") == 2
    assert _sum(confidence, "value", series="clarified") == 1

    # Funnel: runs per workflow, and how many reached each state.
    funnels = {m["workflow"]: int(m["started"]) for m in _marks(driver, "#chart-funnel h3")}
    assert funnels == {"book_table": 2, "fallback": 2, "support_request": 1}
    steps = {(m["workflow"], m["state"]): int(m["value"])
             for m in _marks(driver, "#chart-funnel rect.bar")}
    assert steps[("book_table", "ask_party_size")] == 2
    assert steps[("book_table", "ask_day")] == 1  # only ws-book answered the first question
    assert steps[("support_request", "ask_description")] == 1

    # First-response latency: the recorded p50 and p95 of the five conversations.
    latency = _marks(driver, "#chart-latency rect.bar")
    overall = {m["measure"]: m for m in latency if m["channel"] == "(all)"}
    assert int(overall["p50"]["responses"]) == 6
    assert float(overall["p50"]["value"]) == pytest.approx(truth["p50"])
    assert float(overall["p95"]["value"]) == pytest.approx(truth["p95"])

    # Totals.
    assert driver.find_element("id", "tile-messages").text == str(truth["messages"])
    assert driver.find_element("id", "tile-conversations").text == "6"
    assert driver.find_element("id", "tile-users").text == "5"  # ann, bob, cat, +100, +200

    # The channel filter re-runs every query for that channel only.
    _apply_filters(driver, channel="sms")
    volume = _marks(driver, "#chart-volume rect.bar")
    assert {m["channel"] for m in volume} == {"sms"} and _sum(volume, "in") == 2
    intents = _marks(driver, "#chart-intents rect.bar")
    assert {m["workflow"]: int(m["value"]) for m in intents} == SMS_INTENTS
    assert driver.find_element("id", "tile-conversations").text == "2"

    # The date range too: nothing after today, everything today (UTC).
    today = truth["today"]
    tomorrow = (datetime.fromisoformat(today) + timedelta(days=1)).date().isoformat()
    _apply_filters(driver, start=tomorrow)
    assert _marks(driver, "#chart-volume rect.bar") == []
    assert "No data" in driver.find_element("css selector", "#chart-volume .chart").text
    _apply_filters(driver, start=today, end=today)
    assert _sum(_marks(driver, "#chart-volume rect.bar"), "in") == sum(SENT_IN.values())

    # The SQL box shows a query's rows as a table ...
    _run_sql_box(driver, "SELECT channel, count(*) AS n FROM messages "
                         "WHERE direction = 'in' GROUP BY channel ORDER BY channel")
    assert _table(driver, "#sql-result") == [["sms", "2"], ["websocket", "5"]]
    assert driver.find_element("id", "sql-status").text == "2 rows"
    headers = driver.find_elements("css selector", "#sql-result th")
    assert [h.text for h in headers] == ["channel", "n"]
    # ... and a refused one as a readable error, with no stale table.
    _run_sql_box(driver, "DROP TABLE messages")
    error = driver.find_element("id", "sql-error")
    assert error.is_displayed()
    assert "refused" in error.text and "only SELECT statements are allowed" in error.text
    assert _table(driver, "#sql-result") == []

    # Without the token the page asks for it; typed into the field, it works again.
    driver.execute_script("sessionStorage.clear();")
    driver.get(f"{base}/dashboard")
    assert _refreshed(driver, 0)["state"] == "error"
    assert "needs a SQL token" in driver.find_element("id", "token-note").text
    assert "401" not in driver.find_element("id", "tile-messages").text
    before = _refreshes(driver)
    driver.find_element("id", "token-input").send_keys(TOKEN)
    driver.find_element("css selector", "#token-form button").click()
    assert _refreshed(driver, before)["state"] == "ready"
    assert driver.find_element("id", "tile-messages").text == str(truth["messages"])


async def test_dashboard_renders_recorded_conversations_and_runs_sql(
    driver: Any, hub: Hub
) -> None:
    """After conversations over two channels, the page (in headless chromium) draws
    every chart from the recorded data, its filters re-query, and its SQL box shows a
    query's rows and a refusal."""
    assert hub.router is not None and hub.classifier is not None
    hub.router.classifier = BatchingClassifier(Scripted(hub.classifier))
    await _converse(hub)
    await _wait_until_recorded(hub)
    out = await _sql(hub, "SELECT channel, count(*) AS n FROM messages "
                          "WHERE direction = 'out' GROUP BY channel")
    confidence = await _sql(hub, "SELECT CASE WHEN decision = 'clarify' THEN '(clarify)' "
                                 "ELSE coalesce(workflow, '(none)') END AS w, "
                                 "avg(confidence) AS c FROM classifications GROUP BY ALL")
    latency = await _sql(hub, "SELECT quantile_cont(seconds, 0.5) AS p50, "
                              "quantile_cont(seconds, 0.95) AS p95 FROM first_response_latency")
    total = await _sql(hub, "SELECT count(*) AS n, CAST(max(ts) AS DATE) AS day FROM messages")
    truth = {
        "out": {row["channel"]: row["n"] for row in out},
        "confidence": {row["w"]: row["c"] for row in confidence},
        "p50": latency[0]["p50"],
        "p95": latency[0]["p95"],
        "messages": total[0]["n"],
        "today": total[0]["day"],
    }
    assert set(truth["out"]) == set(SENT_IN)  # every channel got replies
    assert hub.web is not None
    # Selenium blocks: drive it from a worker thread so the hub keeps serving meanwhile.
    await asyncio.to_thread(_check_page, driver, hub.web.url, truth)


# -- the conversations list, a transcript, and the layout fixes -------------------------
def _conversations(driver: Any) -> list[dict[str, str]]:
    return _marks(driver, "#conv-list tbody tr")


def _search(driver: Any, workflow: str = "", outcome: str = "", text: str = "") -> None:
    from selenium.webdriver.support.ui import Select

    before = int(driver.find_element("tag name", "body").get_attribute("data-conversations")
                 or 0)
    Select(driver.find_element("id", "conv-workflow")).select_by_value(workflow)
    Select(driver.find_element("id", "conv-outcome")).select_by_value(outcome)
    box = driver.find_element("id", "conv-text")
    box.clear()
    box.send_keys(text)
    driver.find_element("id", "conv-search").click()
    _wait(driver, lambda d: int(d.find_element("tag name", "body").get_attribute(
        "data-conversations") or 0) > before, "the conversations list again")


def _timeline(driver: Any) -> list[dict[str, str]]:
    return list(driver.execute_script(
        "return [...document.querySelectorAll('#timeline li')].map(e => ({...e.dataset,"
        " text: (e.querySelector('.text') || {}).textContent || ''}));"))


def _check_conversations(driver: Any, base: str, port: int, screenshot: Any) -> None:
    driver.set_window_size(1280, 2000)
    driver.get(f"{base}/dashboard?token={TOKEN}")
    assert _refreshed(driver, 0)["state"] == "ready"
    # "Updated" is in UTC, like the date filters.
    assert driver.find_element("id", "status").text.endswith(" UTC.")
    # A channel's colour is its own, not its place in the list.
    fills = {m["channel"]: f for m, f in zip(
        _marks(driver, "#chart-volume rect.bar"),
        driver.execute_script("return [...document.querySelectorAll('#chart-volume rect.bar')]"
                              ".map(r => r.getAttribute('fill'));"), strict=True)}
    assert fills["websocket"] == "#0072B2"
    # The confidence chart marks the threshold.
    [marker] = _marks(driver, "#chart-confidence g.marker")
    assert float(marker["threshold"]) == pytest.approx(0.35)
    # The fallback's funnel line says where its runs went.
    fallback = driver.find_element("css selector", '#chart-funnel h3[data-workflow="fallback"]')
    assert "handed to a person" in fallback.text and "went on to a workflow" in fallback.text
    # The latency chart is drawn at its box's width: its text keeps its size.
    scale = driver.execute_script(
        "const s = document.querySelector('#chart-latency svg');"
        "return s.getBoundingClientRect().width / s.viewBox.baseVal.width;")
    assert scale == pytest.approx(1, abs=0.05)

    # Every conversation, newest first; filters by workflow, outcome and text.
    _wait(driver, lambda d: len(_conversations(d)) == 6, "six conversations")
    _search(driver, workflow="book_table")
    assert {m["conversation"] for m in _conversations(driver)} == {"ws-book", "sms-book"}
    _search(driver, text="ELEPHANTS")
    assert [m["conversation"] for m in _conversations(driver)] == ["sms-what"]
    _search(driver, text="100%_ off")  # LIKE's own characters are plain text
    assert _conversations(driver) == []
    _search(driver, outcome="open", workflow="book_table")
    assert {m["outcome"] for m in _conversations(driver)} == {"open"}
    _search(driver)

    # One conversation's transcript: every kind of record on one timeline.
    driver.find_element("css selector", '#conv-list tr[data-conversation="ws-book"] button'
                        ).click()
    _wait(driver, lambda d: len(_timeline(d)) > 0, "the transcript")
    timeline = _timeline(driver)
    sources = [t["source"] for t in timeline]
    assert {"message", "classification", "workflow", "channel"} <= set(sources)
    said = [t["text"] for t in timeline if t["source"] == "message" and t["kind"] == "in"]
    assert said == ["I'd like to book a table", "4"]
    first_in = sources.index("message")
    assert timeline[first_in]["kind"] == "in"
    assert sources.index("classification") < len(sources)
    assert driver.current_url.endswith("#conversation=ws-book")
    # It refreshes itself while open: a new message shows without a click.
    loads = int(driver.find_element("id", "transcript").get_attribute("data-loads"))

    async def more() -> None:
        chat = await Chat.open(port, "ws-book", user="ann")
        await chat.say("tomorrow")
        await chat.close()

    asyncio.run(more())
    _wait(driver, lambda d: "tomorrow" in [t["text"] for t in _timeline(d)],
          "the new message in the open transcript")
    assert int(driver.find_element("id", "transcript").get_attribute("data-loads")) > loads
    driver.set_window_size(1280, 1000)
    driver.execute_script("document.getElementById('transcript').scrollIntoView();")
    screenshot(driver, "dashboard-transcript")

    # At 400 px nothing spills sideways.
    driver.set_window_size(400, 900)
    _wait(driver, lambda d: d.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth;"),
        "no sideways scrolling at 400 px")
    spill = driver.execute_script(
        "return [...document.querySelectorAll('.card, .tile, .filters')]"
        ".filter(e => e.getBoundingClientRect().right > window.innerWidth + 1).length;")
    assert spill == 0


async def test_dashboard_conversations_transcript_and_layout(driver: Any, hub: Hub) -> None:
    """The conversations list filters by workflow, outcome and text; a conversation's
    transcript puts its messages, classifications, workflow and channel events on one
    timeline and refreshes itself; channel colours are stable, the threshold is drawn,
    the fallback's funnel line reads, the latency chart keeps its text size, "Updated"
    is UTC, and nothing spills at 400 px."""
    from browserkit import screenshot

    assert hub.router is not None and hub.classifier is not None
    hub.router.classifier = BatchingClassifier(Scripted(hub.classifier))
    await _converse(hub)
    await _wait_until_recorded(hub)
    assert hub.web is not None
    # Selenium blocks, and the test sends a message meanwhile: both in a worker thread,
    # the hub keeps serving on this loop.
    await asyncio.to_thread(_check_conversations, driver, hub.web.url, ws_port(hub), screenshot)
