"""The chat widget's routes on the hub's HTTP server.

* ``GET /widget.js``: the widget, one plain JavaScript file that any site embeds with
  ``<script src="https://HUB/widget.js" data-hub="https://HUB" ...>`` (``docs/widget.md``).
  Any page may load it (it is a public path of :mod:`commhub.core.web`).
* ``GET /chat``: a demo page of the hub with the widget open.
* ``GET /v1/widget``: what the widget needs to connect: ``{"ws_url": ...}``, the
  WebSocket channel's URL as a page reaches it (setting ``widget_ws_url``, or the host
  the page asked with and the channel's port). It is an API path, so pages of sites not
  in ``cors_origins`` get 403 (``core/web.py``).

Nothing here holds state; the widget talks to the WebSocket channel itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from aiohttp import web

from commhub.core.config import Settings
from commhub.core.web import WebServer, json_error
from commhub.core.widget.assets import Assets

__all__ = ["mount_widget"]

# The widget runs inside other sites' pages: it may be cached a little, never sniffed.
_SCRIPT_HEADERS: Final = {
    "Cache-Control": "public, max-age=300",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Resource-Policy": "cross-origin",
}


def _page_headers(ws_source: str) -> dict[str, str]:
    """The demo page loads its own files and talks to this hub (HTTP and WebSocket)."""
    return {
        "Content-Security-Policy": (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self' {ws_source}; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


def mount_widget(web_server: WebServer, settings: Settings,
                 ws_port: Callable[[], int | None]) -> None:
    """Add the widget's routes; ``ws_port()`` is the WebSocket channel's port once it
    listens (None: no WebSocket channel in this process)."""
    assets = Assets()

    def ws_url(request: web.Request) -> str | None:
        if settings.widget_ws_url:
            return settings.widget_ws_url
        port = ws_port()
        if port is None:
            return None
        host = request.url.host or settings.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        scheme = "wss" if request.headers.get("X-Forwarded-Proto") == "https" or \
            request.secure else "ws"
        return f"{scheme}://{host}:{port}/ws"

    async def script(request: web.Request) -> web.Response:
        return assets.response("widget.js", _SCRIPT_HEADERS)

    async def config(request: web.Request) -> web.Response:
        url = ws_url(request)
        if url is None:
            return json_error(503, "this hub process runs no WebSocket channel", "unavailable")
        return web.json_response({"ws_url": url, "anonymous": settings.anonymous_allowed},
                                 headers={"Cache-Control": "no-store"})

    async def chat(request: web.Request) -> web.Response:
        return assets.response("chat.html", _page_headers("ws: wss:"))

    async def chat_file(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not name.startswith("chat") or name not in assets.files:
            return json_error(404, f"no such file: {name}", "not_found")
        return assets.response(name, _page_headers("ws: wss:"))

    web_server.add_get("/widget.js", script)
    web_server.add_get("/v1/widget", config)
    web_server.add_get("/chat", chat)
    web_server.add_get("/chat/{name}", chat_file)
