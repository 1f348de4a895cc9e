"""The chat widget, embedded in a page of another origin, in a real headless browser
(Debian's chromium through Selenium) against a real hub subprocess.

The page is served by a second aiohttp server on 127.0.0.1 (an origin listed in the
hub's ``cors_origins``) and loads ``/widget.js`` from the hub. The test books a table
through the widget (with a button press), reloads the page mid-booking and sees the
whole conversation drawn again, both sides, each message once; stops the hub, writes
while it is down, starts it again on the same ports and data directory, and gets the
reply, with the page's messages equal to the bus's (nothing missed, nothing twice). An
agent's message holding markup is shown as text. A page of another origin is refused
by the CORS preflight and at the WebSocket handshake.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from browserkit import (
    PageServer,
    free_port,
    new_driver,
    screenshot,
    wait,
    wait_for,
)
from hubproc import HubProcess

from commhub.core.envelope import Message, Sender, encode, new_id
from commhub.core.tokens import mint

XSS = '<img src=x onerror="window.__xss=1"><b>bold?</b>'
WIDGET_JS = Path(__file__).resolve().parent.parent / "core" / "widget" / "static" / "widget.js"
GZIP_BUDGET = 30 * 1024  # bytes: the widget's size budget, gzipped
SECRET = "widget-test-secret"


def test_widget_fits_its_size_budget() -> None:
    """The widget is one file under 30 KB gzipped (docs/widget.md states the budget)."""
    raw = WIDGET_JS.read_bytes()
    assert len(gzip.compress(raw, 9)) < GZIP_BUDGET
    text = raw.decode()
    assert "innerHTML" not in text and "insertAdjacentHTML" not in text
    assert "eval(" not in text and "document.write" not in text


def page_html(hub: str, title: str = "Shop chat", token: str = "") -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>A shop</title></head>
<body style="font-family: sans-serif; margin: 0; padding: 24px; background: #fafaf9">
<h1>Trattoria Example</h1>
<p>Fresh pasta every day. Book a table with our assistant.</p>
<script src="{hub}/widget.js" data-hub="{hub}" data-title="{title}" data-color="#0f766e"
  data-lang="en" data-start="Hello! I can book a table for you." data-token="{token}"
  async></script>
</body></html>"""


# -- the page, through the widget's shadow DOM -------------------------------------------
SHADOW = "document.getElementById('commhub-widget').shadowRoot"


def messages(driver: Any) -> list[dict[str, str]]:
    """Every message element of the widget, in page order."""
    return list(driver.execute_script(
        f"const r = {SHADOW}; if (!r) return [];"
        "return [...r.querySelectorAll('.log > [data-id]')].map(e => ({"
        " id: e.dataset.id, cursor: e.dataset.cursor || '', direction: e.dataset.direction,"
        " kind: e.dataset.kind, notice: e.classList.contains('notice') ? '1' : '',"
        " pending: e.classList.contains('pending') ? '1' : '',"
        " text: (e.querySelector('.bubble') || e).textContent}));"
    ))


def shadow(driver: Any, css: str) -> Any:
    return driver.execute_script(f"return {SHADOW}.querySelector(arguments[0]);", css)


def widget_ready(driver: Any) -> None:
    wait(driver, lambda d: d.execute_script(
        "const h = document.getElementById('commhub-widget');"
        "return h && h.getAttribute('data-state') === 'online';"), "the widget online")


def bot_said(driver: Any, fragment: str, count: int = 1) -> list[dict[str, str]]:
    def seen(d: Any) -> list[dict[str, str]] | None:
        found = [m for m in messages(d) if m["direction"] == "out" and fragment in m["text"]]
        return found if len(found) >= count else None

    return list(wait(driver, seen, f"the bot to say {fragment!r}"))


def say(driver: Any, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = shadow(driver, "textarea")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def press(driver: Any, title: str) -> None:
    button = wait(driver, lambda d: d.execute_script(
        f"return [...{SHADOW}.querySelectorAll('.buttons button')]"
        ".find(b => b.textContent === arguments[0] && !b.disabled) || null;", title),
        f"a button {title!r}")
    button.click()


def assert_each_once(page: list[dict[str, str]]) -> None:
    ids = [m["id"] for m in page]
    assert len(ids) == len(set(ids)), f"a message drawn twice: {ids}"
    cursors = [int(m["cursor"]) for m in page if m["cursor"]]
    assert cursors == sorted(cursors), f"messages out of order: {cursors}"


async def _stored(nats_url: str, prefix: str, conversation: str) -> list[tuple[int, str, str]]:
    """Every message of the conversation on the WebSocket channel, both sides, from the
    bus: (sequence, id, direction)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(f"{prefix}.*.websocket.{conversation}",
                                 stream=f"{prefix}_messages", ordered_consumer=True)
        found = []
        try:
            while True:
                msg = await sub.next_msg(timeout=1)
                body = json.loads(msg.data)
                found.append((msg.metadata.sequence.stream, body["id"], body["direction"]))
        except nats.errors.TimeoutError:
            pass
        await sub.unsubscribe()
        return found
    finally:
        await nc.close()


async def _agent_says(nats_url: str, prefix: str, conversation: str, text: str) -> str:
    nc = await nats.connect(nats_url)
    try:
        message = Message(id=new_id(), conversation=conversation, channel="websocket",
                          direction="out", sender=Sender(id="agent-7", kind="agent", name="Eve"),
                          text=text)
        await nc.jetstream().publish(f"{prefix}.out.websocket.{conversation}", encode(message),
                                     headers={"Nats-Msg-Id": message.id})
        return message.id
    finally:
        await nc.close()


def preflight(url: str, origin: str) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, method="OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


# -- the test ------------------------------------------------------------------------------
@pytest.fixture
def ports() -> dict[str, int]:
    return {"nats": free_port(), "ws": free_port(), "http": free_port(), "page": free_port()}


@pytest.fixture
def hub(tmp_path: Path, ports: dict[str, int]) -> Iterator[HubProcess]:
    page_origin = f"http://127.0.0.1:{ports['page']}"
    process = HubProcess(tmp_path / "data", env={
        "COMMHUB_NATS_PORT": str(ports["nats"]),
        "COMMHUB_WS_PORT": str(ports["ws"]),
        "COMMHUB_HTTP_PORT": str(ports["http"]),
        "COMMHUB_CORS_ORIGINS": page_origin,
        "COMMHUB_TOKEN_SECRET": SECRET,
    })
    try:
        yield process.start()
    finally:
        if process.process is not None and process.process.poll() is None:
            process.terminate()


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Any]:
    browser = new_driver(tmp_path / "chromium")
    try:
        yield browser
    finally:
        browser.quit()


@pytest.mark.slow
def test_widget_books_a_table_across_reload_and_hub_restart(
    hub: HubProcess, driver: Any, ports: dict[str, int]
) -> None:
    hub_url = hub.http_url
    prefix = "commhub"
    with PageServer({"/": page_html(hub_url)}, port=ports["page"]) as site:
        driver.get(site.url())
        launcher = wait(driver, lambda d: d.execute_script(
            "const h = document.getElementById('commhub-widget');"
            "return h && h.shadowRoot && h.shadowRoot.querySelector('.launch');"),
            "the widget's launcher")
        widget_ready(driver)
        conversation = driver.execute_script(
            "return document.getElementById('commhub-widget').dataset.conversation")
        # Keyboard: the launcher is a button; Enter opens the panel and focuses the box.
        from selenium.webdriver.common.keys import Keys

        launcher.send_keys(Keys.ENTER)
        assert driver.execute_script(
            f"return {SHADOW}.activeElement && {SHADOW}.activeElement.tagName") == "TEXTAREA"
        # The typing indicator shows from the ack of the user's message to the reply.
        driver.execute_script(
            f"const t = {SHADOW}.querySelector('.typing'); window.__typing = [];"
            "new MutationObserver(() => window.__typing.push(t.hidden))"
            ".observe(t, {attributes: true, attributeFilter: ['hidden']});")
        say(driver, "I'd like to book a table")
        bot_said(driver, "How many people")
        wait(driver, lambda d: d.execute_script(
            f"return {SHADOW}.querySelector('.typing').hidden"), "the indicator to go")
        assert False in driver.execute_script("return window.__typing"), "never shown"
        say(driver, "4")
        bot_said(driver, "Which day")
        say(driver, "tomorrow")
        bot_said(driver, "At what time")
        before = messages(driver)
        assert [m["direction"] for m in before] == ["in", "out"] * 3
        screenshot(driver, "widget-desktop")

        # A reload mid-booking draws the whole conversation again, each message once.
        driver.refresh()
        widget_ready(driver)
        redrawn = wait(driver, lambda d: (lambda m: m if len(m) >= 6 else None)(messages(d)),
                       "the conversation redrawn")
        assert [(m["id"], m["direction"], m["text"]) for m in redrawn] == [
            (m["id"], m["direction"], m["text"]) for m in before]
        assert_each_once(redrawn)
        assert driver.execute_script(
            "return document.getElementById('commhub-widget').dataset.conversation"
        ) == conversation

        say(driver, "7pm")
        bot_said(driver, "Under which name")
        say(driver, "Ann Example")
        bot_said(driver, "What email")
        say(driver, "ann@example.com")
        bot_said(driver, "Shall I book it?")
        press(driver, "Yes, book it")
        bot_said(driver, "Booked!")
        pressed = [m for m in messages(driver) if m["direction"] == "in"][-1]
        assert pressed["text"] == "Yes, book it"

        # An agent's message holding markup is text, not markup.
        agent_id = asyncio.run(_agent_says(hub.nats_url, prefix, conversation, XSS))
        wait(driver, lambda d: any(m["id"] == agent_id for m in messages(d)), "the agent")
        shown = next(m for m in messages(driver) if m["id"] == agent_id)
        assert shown["text"] == XSS and shown["kind"] == "agent"
        assert driver.execute_script(f"return {SHADOW}.querySelectorAll('img').length") == 0
        assert driver.execute_script("return window.__xss === undefined")

        # The hub stops while the page is open; a message written meanwhile waits.
        hub.terminate()
        wait(driver, lambda d: d.execute_script(
            "return document.getElementById('commhub-widget').dataset.state") == "offline",
            "the widget to notice the hub is gone")
        say(driver, "thanks")
        queued = messages(driver)[-1]
        assert queued["pending"] == "1" and queued["text"] == "thanks"
        stored = json.loads(driver.execute_script(
            "return localStorage.getItem(arguments[0])", f"commhub-widget:{hub_url}"))
        assert [q["text"] for q in stored["queue"]] == ["thanks"]
        hub.start()
        widget_ready(driver)
        wait(driver, lambda d: (lambda m: m[-1]["direction"] == "out" and
                                m[-2]["text"] == "thanks" and not m[-2]["pending"])(messages(d)),
             "the reply to the message written while the hub was down")
        final = messages(driver)
        assert_each_once(final)
        on_bus = asyncio.run(_stored(hub.nats_url, prefix, conversation))
        assert [(m["id"], m["direction"]) for m in final] == [(i, d) for _, i, d in on_bus]
        assert [int(m["cursor"]) for m in final] == [s for s, _, _ in on_bus]

        # The layout at 360 px: the panel fills the screen, nothing spills sideways.
        driver.set_window_size(360, 740)
        layout = driver.execute_script(
            f"const p = {SHADOW}.querySelector('.panel').getBoundingClientRect();"
            "return {left: p.left, right: p.right, width: p.width, inner: window.innerWidth,"
            " scroll: document.documentElement.scrollWidth};")
        assert layout["left"] >= 0 and layout["right"] <= layout["inner"] + 0.5, layout
        assert layout["scroll"] <= layout["inner"], layout
        screenshot(driver, "widget-360")


def test_widget_badge_links_and_notices(hub: HubProcess, driver: Any,
                                        ports: dict[str, int]) -> None:
    """While minimised, replies count on the launcher's badge (and its label); opening
    clears it. Links are http(s) only, opened safely; other schemes stay text. Replies
    to an agent's handoff inputs are notices, not bubbles."""
    prefix = "commhub"
    with PageServer({"/": page_html(hub.http_url)}, port=ports["page"]) as site:
        driver.get(site.url())
        widget_ready(driver)
        conversation = driver.execute_script(
            "return document.getElementById('commhub-widget').dataset.conversation")
        assert shadow(driver, ".panel").get_attribute("hidden") is not None  # minimised
        asyncio.run(_agent_says(hub.nats_url, prefix, conversation,
                                "See https://example.com/menu?x=1, or javascript:alert(1)."))
        badge = wait(driver, lambda d: (lambda b: b if b.text == "1" else None)(
            shadow(d, ".badge")), "the unread badge")
        launcher = shadow(driver, ".launch")
        assert "1 unread" in launcher.get_attribute("aria-label")
        links = driver.execute_script(
            f"return [...{SHADOW}.querySelectorAll('.bubble a')].map(a => "
            "[a.getAttribute('href'), a.rel, a.target, a.textContent]);")
        assert links == [["https://example.com/menu?x=1", "noopener noreferrer nofollow",
                          "_blank", "https://example.com/menu?x=1"]]
        launcher.click()
        wait(driver, lambda d: not badge.is_displayed(), "the badge to clear")
        assert driver.execute_script(
            f"return {SHADOW}.querySelector('.log').getAttribute('aria-live')") == "polite"
        # A reload keeps what was read: no badge for messages seen before.
        driver.refresh()
        widget_ready(driver)
        wait(driver, lambda d: len(messages(d)) == 1, "the message redrawn")
        assert not shadow(driver, ".badge").is_displayed()
        # A notice: the bot's reply to an input named handoff-accepted-...
        asyncio.run(_bot_replies_to(hub.nats_url, prefix, conversation,
                                    f"handoff-accepted-{new_id()}", "Eve has joined."))
        notice = wait(driver, lambda d: next(
            (m for m in messages(d) if m["text"] == "Eve has joined."), None), "the notice")
        assert notice["notice"] == "1"

    # A site with its own login: a signed token minted by its back end (data-token).
    # The widget speaks as the token's user; an expired token stops it with a reason.
    pages = {"/signed": page_html(hub.http_url, token=mint(SECRET, "shop-42", 600)),
             "/expired": page_html(hub.http_url, token=mint(SECRET, "shop-42", -10))}
    with PageServer(pages, port=ports["page"]) as site:
        driver.get(site.url("/signed"))
        widget_ready(driver)
        stored = json.loads(driver.execute_script(
            "return localStorage.getItem(arguments[0])", f"commhub-widget:{hub.http_url}:t"))
        assert stored["user"] == "shop-42"
        driver.execute_script("localStorage.clear();")
        driver.get(site.url("/expired"))
        wait(driver, lambda d: "expired" in d.execute_script(
            f"return {SHADOW}.querySelector('.status').textContent"), "the expired notice")


async def _bot_replies_to(nats_url: str, prefix: str, conversation: str, reply_to: str,
                          text: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        message = Message(id=new_id(), conversation=conversation, channel="websocket",
                          direction="out", sender=Sender(id="commhub", kind="bot"),
                          text=text, reply_to=reply_to)
        await nc.jetstream().publish(f"{prefix}.out.websocket.{conversation}", encode(message),
                                     headers={"Nats-Msg-Id": message.id})
    finally:
        await nc.close()


def test_other_origins_are_refused(hub: HubProcess, driver: Any, ports: dict[str, int]) -> None:
    """A preflight from the listed page origin succeeds and from another fails; in the
    browser, the listed page's fetch works and another origin's WebSocket is refused."""
    hub_url = hub.http_url
    allowed = f"http://127.0.0.1:{ports['page']}"
    url = f"{hub_url}/v1/conversations/o1/messages"
    status, headers = preflight(url, allowed)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == allowed
    status, headers = preflight(url, "http://evil.example")
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    with PageServer({"/": "<!doctype html><title>x</title><p>x</p>"},
                    port=ports["page"]) as site:
        probe = """
            const [hub, ws, done] = arguments;
            const out = {};
            fetch(hub + '/v1/conversations/o1/messages', {method: 'POST',
                  headers: {'Content-Type': 'application/json'},
                  body: JSON.stringify({text: 'hi'})})
              .then(r => { out.fetch = r.status; }, () => { out.fetch = 'blocked'; })
              .then(() => new Promise(resolve => {
                 const s = new WebSocket(ws + '?conversation=o2&user=u');
                 s.onopen = () => { out.ws = 'open'; s.close(); resolve(); };
                 s.onclose = e => { out.ws = out.ws || ('closed ' + e.code); resolve(); };
              }))
              .then(() => done(out));
        """
        ws_url = f"ws://127.0.0.1:{ports['ws']}/ws"
        driver.set_script_timeout(30)
        driver.get(site.url())
        assert driver.execute_async_script(probe, hub_url, ws_url) == {
            "fetch": 202, "ws": "open"}
        # The same server under another name is another origin, not in cors_origins.
        driver.get(site.url(host="localhost"))
        assert driver.execute_async_script(probe, hub_url, ws_url) == {
            "fetch": "blocked", "ws": "closed 1006"}
    assert wait_for(lambda: "origin not allowed" in _rejections(hub), "the rejected event")


def _rejections(hub: HubProcess) -> str:
    async def read() -> str:
        nc = await nats.connect(hub.nats_url)
        try:
            sub = await nc.jetstream().subscribe("commhub.evt.channel.websocket.rejected",
                                                 ordered_consumer=True)
            reasons = []
            try:
                while True:
                    reasons.append(json.loads((await sub.next_msg(timeout=1)).data)["reason"])
            except nats.errors.TimeoutError:
                pass
            return " | ".join(reasons)
        finally:
            await nc.close()

    return asyncio.run(read())
