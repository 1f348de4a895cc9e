"""Helpers for tests in a real headless browser (Debian's chromium through Selenium): the
driver, a page server on another origin, free ports, the widget's shadow DOM, and
screenshots for the docs.

Without ``/usr/bin/chromium``, ``/usr/bin/chromedriver`` or the selenium package the
tests are skipped with the reason, unless ``COMMHUB_REQUIRE_BROWSER=1`` (CI) makes them
fail. Selenium is always given both paths, so Selenium Manager never downloads anything.

``COMMHUB_WRITE_SCREENSHOTS=1`` makes :func:`screenshot` write PNGs into
``docs/images/`` (the docs show what the tests saw); otherwise it does nothing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT = 60  # seconds: a safety net for slow machines, never a claim about speed
DOCS_IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"


def browser_paths() -> tuple[Path, Path]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package")
    if missing:
        reason = (
            f"the browser test needs {', '.join(missing)} (apt-get install chromium "
            "chromium-driver; pip install -e '.[test]')"
        )
        if os.environ.get("COMMHUB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"COMMHUB_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return CHROMIUM, CHROMEDRIVER


def new_driver(profile: Path, width: int = 1280, height: int = 900) -> Any:
    """Headless chromium with a profile of its own (so localStorage is the test's)."""
    chromium, chromedriver = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager stays offline
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--no-first-run", f"--window-size={width},{height}",
                     "--force-device-scale-factor=1", "--hide-scrollbars",
                     f"--user-data-dir={profile}"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path=str(chromedriver)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait(driver: Any, condition: Callable[[Any], Any], what: str, timeout: float = WAIT) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, what)


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll ``condition`` (no browser) until it returns something true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class PageServer:
    """An aiohttp server on 127.0.0.1 in a thread of its own: pages of another origin."""

    def __init__(self, pages: dict[str, str], port: int = 0) -> None:
        self.pages = pages
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PageServer:
        started = threading.Event()

        async def page(request: web.Request) -> web.Response:
            body = self.pages.get(request.path)
            if body is None:
                raise web.HTTPNotFound()
            return web.Response(text=body, content_type="text/html")

        async def serve() -> None:
            app = web.Application()
            app.router.add_get("/{tail:.*}", page)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await site.start()
            server = site._server
            assert server is not None
            self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
            started.set()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(serve())
            self._loop.run_forever()
            assert self._runner is not None
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="page-server", daemon=True)
        self._thread.start()
        assert started.wait(10), "the page server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def screenshot(driver: Any, name: str) -> None:
    """Write ``docs/images/NAME.png`` when ``COMMHUB_WRITE_SCREENSHOTS=1``."""
    if os.environ.get("COMMHUB_WRITE_SCREENSHOTS") != "1":
        return
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(DOCS_IMAGES / f"{name}.png"))
