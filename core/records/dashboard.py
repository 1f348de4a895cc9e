"""The dashboard page and SQL over HTTP, mounted on the hub's HTTP server.

Routes (added by :func:`mount_dashboard` before the server starts serving):

- ``GET /dashboard``: the page (``dashboard_static/index.html``). It holds no data: it
  runs its queries in the browser through ``POST /v1/sql``, so it needs the same token.
- ``GET /dashboard/{name}``: the page's own files (script, style sheet). Only files of
  the ``dashboard_static`` folder are served, read once at mount; nothing is loaded from
  anywhere else, and a strict Content-Security-Policy says so to the browser.
- ``POST /v1/sql``: ``{"sql": "SELECT ...", "max_rows": n}`` (the bus API's request body)
  answers the bus API's reply, ``{"columns", "rows", "truncated"}``.

Where the query runs: the endpoint forwards it over the bus (``{prefix}.api.sql``) to
whichever process runs the recorder's SQL service, so the page works in role ``all``
and in a ``channels`` process alike, and the same sandbox applies (one read-only SELECT,
no files, a time and a row limit).

Who may run SQL (:func:`sql_access`): a request must carry ``Authorization: Bearer T``
with ``T`` in the setting ``sql_tokens``. With no ``sql_tokens`` configured, requests
without a token are allowed only while the hub listens on a loopback address and
``allow_anonymous`` is not false (the one-command demo); on any other interface the
endpoint then refuses every request (403) until ``sql_tokens`` is set. A token that is
given but wrong is refused (401) even where none is needed, so a misconfigured client
learns of it. The chat channels' tokens (``tokens``, signed tokens) do not grant SQL:
records hold every user's conversations, which a chat client must not read.

Errors are JSON ``{"error": {"code", "message"}}``: 401 ``unauthorized`` (missing or
wrong token), 403 ``forbidden`` (SQL over HTTP not enabled), 400 with the SQL service's
code (``refused``, ``result_too_large``, ``bad_request``, ``failed``) and its message, 504
``timeout`` (the query hit its time limit, or no reply came in time), 429
``rate_limited`` and 503 ``busy`` (the SQL service's limits), 503 ``unavailable`` (no
process answers SQL on the bus, or the bus is down).

Concurrency: each request is its own task; a query waits on one NATS request/reply and
never blocks the event loop. Cancelling a request (the client went away) cancels the
wait; the query itself still finishes, bounded by its time limit, in the SQL service.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any, Final

import msgspec
import nats.errors
from aiohttp import web

from commhub.core.bus import Bus
from commhub.core.config import Settings, is_loopback
from commhub.core.jsonlimit import JsonInputError, decode_json
from commhub.core.tokens import BearerAccess
from commhub.core.web import WebServer, json_error

__all__ = ["mount_dashboard", "sql_access"]

log = logging.getLogger(__name__)

#: The package folder the page's files come from.
STATIC_PACKAGE: Final = "commhub.core.records"
STATIC_FOLDER: Final = "dashboard_static"
_CONTENT_TYPES: Final = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".txt": "text/plain",
}
# The page loads nothing but its own files and talks to nothing but this hub; saying so
# in a CSP also means injected markup could neither run script nor send data elsewhere.
_PAGE_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # The page may be opened with ?token=...; never hand that URL to anyone else.
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# HTTP status for each error code of the SQL bus API; unknown codes are the hub's fault.
_SQL_STATUS: Final = {
    "bad_request": 400,
    "refused": 400,
    "result_too_large": 400,
    "failed": 400,
    "timeout": 504,
    "busy": 503,
    "rate_limited": 429,
    "unavailable": 503,
}
# Extra seconds the HTTP endpoint waits beyond the query time limit, so the SQL service's
# own "timeout" reply (which names the limit) arrives before our round-trip timeout.
_ROUND_TRIP_MARGIN: Final = 5.0


def sql_access(settings: Settings) -> BearerAccess:
    """Who may run SQL over HTTP, for these settings (see the module docstring)."""
    local = is_loopback(settings.host) and settings.allow_anonymous is not False
    return BearerAccess(settings.sql_tokens, local, "SQL over HTTP", "sql_tokens")


def _load_assets() -> dict[str, tuple[bytes, str]]:
    """The page's files by name, with their content types (read once, from the package)."""
    folder = resources.files(STATIC_PACKAGE).joinpath(STATIC_FOLDER)
    assets: dict[str, tuple[bytes, str]] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _CONTENT_TYPES:
            assets[entry.name] = (entry.read_bytes(), _CONTENT_TYPES[suffix])
    if "index.html" not in assets:
        raise RuntimeError(f"the dashboard's files are missing ({STATIC_FOLDER}/index.html)")
    return assets


def mount_dashboard(web_server: WebServer, settings: Settings, bus: Bus) -> None:
    """Add ``/dashboard``, its files and ``POST /v1/sql`` to ``web_server`` (before it serves).

    Raises RuntimeError when the page's files are not installed (a broken package).
    """
    assets = _load_assets()
    access = sql_access(settings)
    round_trip = settings.sql_timeout_seconds + _ROUND_TRIP_MARGIN
    subject = bus.subjects.api("sql")

    def asset(name: str) -> web.Response:
        body, content_type = assets[name]
        charset = "utf-8" if content_type.startswith("text/") else None
        return web.Response(
            body=body, content_type=content_type, charset=charset, headers=_PAGE_HEADERS
        )

    async def page(request: web.Request) -> web.Response:
        return asset("index.html")

    async def page_slash(request: web.Request) -> web.Response:
        # The page's links are relative to /dashboard; under /dashboard/ they would miss.
        raise web.HTTPPermanentRedirect("/dashboard")

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in assets:
            return json_error(404, f"no such dashboard file: {name}", "not_found")
        return asset(name)

    async def sql(request: web.Request) -> web.Response:
        refusal = access.check(request.headers.get("Authorization"))
        if refusal is not None:
            headers = {"WWW-Authenticate": 'Bearer realm="commhub-sql"'}
            return json_error(refusal.status, refusal.message, refusal.code,
                              headers=headers if refusal.status == 401 else None)
        try:
            body = decode_json(await request.read())
        except JsonInputError as exc:  # not JSON, invalid UTF-8, nested too deep
            return json_error(400, f"the request body is {exc}", "bad_request")
        if not isinstance(body, dict):
            return json_error(
                400, 'the request must be a JSON object: {"sql": "...", "max_rows": n}',
                "bad_request",
            )
        # Forward only the fields the bus API knows; it validates them.
        forward: dict[str, Any] = {"sql": body.get("sql")}
        if "max_rows" in body:
            forward["max_rows"] = body["max_rows"]
        return await _ask(bus, subject, forward, round_trip)

    web_server.add_get("/dashboard", page)
    web_server.add_get("/dashboard/", page_slash)
    web_server.add_get("/dashboard/{name}", static)
    web_server.add_post("/v1/sql", sql)


async def _ask(bus: Bus, subject: str, request: dict[str, Any], timeout: float) -> web.Response:
    """One round trip to the SQL service; its reply passes through as the HTTP body."""
    try:
        reply = await bus.nc.request(subject, msgspec.json.encode(request), timeout=timeout)
    except nats.errors.NoRespondersError:
        return json_error(
            503, f"no recorder answers SQL on {subject}: is a hub with the recorder running?",
            "unavailable",
        )
    except nats.errors.TimeoutError:
        return json_error(504, f"no reply from the SQL service within {timeout:g} s", "timeout")
    except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError,
            nats.errors.ConnectionReconnectingError) as exc:
        return json_error(503, f"the bus is not available: {exc}", "unavailable")
    try:
        decoded = msgspec.json.decode(reply.data)
    except msgspec.DecodeError:
        log.warning("sql over http: unreadable reply from %s: %r", subject, reply.data[:200])
        return json_error(502, "the SQL service sent an unreadable reply", "bad_gateway")
    error = decoded.get("error") if isinstance(decoded, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code", "failed"))
        message = str(error.get("message", "unknown error"))
        return json_error(_SQL_STATUS.get(code, 502), message, code)
    # A good reply is already the documented JSON shape: hand it on without re-encoding.
    return web.Response(
        body=reply.data, content_type="application/json", headers={"Cache-Control": "no-store"}
    )
