"""The hub's HTTP server: one aiohttp application that channels and the hub mount routes on.

Why aiohttp: it is a mature asyncio HTTP server *and* client in one package (the HTTP
channel's callbacks and the Telegram webhook need both), streams responses (server-sent
events), and enforces a request size limit itself. One server per hub process serves the
HTTP channel (``/v1/...``, ``/webhooks/rest/webhook``), webhook channels such as
Telegram's, the dashboard and SQL endpoint, and ``/healthz`` / ``/readyz``.

Life cycle (driven by :class:`commhub.core.hub.Hub`):

1. :meth:`WebServer.bind` opens the listening socket, so the real port is known (port 0
   picks a free one) before any channel starts and can print its URL.
2. Channels and the hub add routes with :meth:`add_routes` (aiohttp freezes the router
   once serving starts, so every route is added before step 3).
3. :meth:`start` serves; :meth:`stop` stops accepting, lets in-flight requests finish
   for ``shutdown_timeout`` seconds, then closes.

Browsers (``core/origins.py``): a request whose ``Origin`` is a page of another site is
answered only when that origin is in ``cors_origins``: a CORS preflight (``OPTIONS``
with ``Access-Control-Request-Method``) gets 204 and the CORS headers, and every answer
to it carries ``Access-Control-Allow-Origin``; any other foreign origin gets 403
``origin_not_allowed`` (the preflight too), except on the public paths
(:data:`PUBLIC_PATHS`). Requests without ``Origin`` (scripts, services) and the hub's
own pages are not affected.

Errors: every 4xx/5xx leaves as JSON ``{"error": {"code": ..., "message": ...}}``, also
aiohttp's own (unknown path, wrong method, body over ``max_body_bytes``), so a client
never has to parse HTML. An exception in a handler is logged and answered with 500;
it never stops the server.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

from commhub.core.origins import OriginPolicy, OriginVerdict

__all__ = ["PUBLIC_PATHS", "ListenError", "WebServer", "json_error", "listen_error",
           "try_port"]

log = logging.getLogger(__name__)

MAX_BODY = web.AppKey("max_body_bytes", int)
ORIGINS = web.AppKey("origins", OriginPolicy)
#: Paths any page may fetch (the widget's script, the probes): no origin is refused.
PUBLIC_PATHS = frozenset({"/widget.js", "/healthz", "/readyz"})
_CORS_METHODS = "GET, POST, DELETE, OPTIONS"
_CORS_HEADERS = "Authorization, Content-Type, Last-Event-ID"
_CORS_EXPOSE = "Retry-After, WWW-Authenticate"
_PREFLIGHT_MAX_AGE = "600"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "rate_limited",
    500: "internal",
    502: "bad_gateway",
    503: "unavailable",
    504: "timeout",
}


class ListenError(OSError):
    """A server cannot listen; the message says on what, why, and which setting to change."""

    def __str__(self) -> str:  # the message alone, without "[Errno 98]"
        return str(self.strerror)


def listen_error(what: str, host: str, port: int, exc: OSError, port_setting: str) -> ListenError:
    """The error for ``what`` failing to bind ``host:port``, with the setting to change:
    ``port_setting`` for a port in use or not allowed, ``COMMHUB_HOST`` for an address
    that is not this machine's."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno == errno.EADDRNOTAVAIL:
        hint = "set COMMHUB_HOST to an address of this machine"
    else:
        hint = f"to use another port set {port_setting}, or 0 for any free one"
    return ListenError(exc.errno, f"{what} cannot listen on {host}:{port}: {reason} ({hint})")


def try_port(what: str, host: str, port: int, port_setting: str) -> None:
    """Bind ``host:port`` the way asyncio's servers do and let go at once: a
    :class:`ListenError` naming ``port_setting`` if that fails. Port 0 always works, and a
    host that does not resolve is left to the server's own bind to report."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise listen_error(what, host, port, exc, port_setting) from None


def json_error(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON error response: ``{"error": {"code": code, "message": message}}``."""
    body = {"error": {"code": code or _CODES.get(status, "error"), "message": message}}
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        message = exc.reason
        if exc.status == 413:
            message = f"request body too large (limit {request.app[MAX_BODY]} bytes)"
        elif exc.status == 404:
            message = f"no such endpoint: {request.path}"
        elif exc.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        return json_error(exc.status, message, headers=_kept_headers(exc))
    except Exception:
        log.exception("HTTP %s %s failed", request.method, request.path)
        return json_error(500, "internal error; the hub log has the details")


@web.middleware
async def _origin_check(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer CORS preflights, and refuse requests from pages of origins not allowed."""
    origin = request.headers.get("Origin")
    if origin is None:
        return await handler(request)
    verdict = request.app[ORIGINS].judge(origin, request.host)
    refused = verdict is OriginVerdict.REFUSED
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if refused:
            return _origin_refused(origin)
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": _CORS_METHODS,
            "Access-Control-Allow-Headers": _CORS_HEADERS,
            "Access-Control-Max-Age": _PREFLIGHT_MAX_AGE,
            "Vary": "Origin",
        })
    if refused and request.path not in PUBLIC_PATHS:
        return _origin_refused(origin)
    return await handler(request)


def _origin_refused(origin: str) -> web.Response:
    return json_error(403, f"pages of {origin[:200]} may not use this hub: the origin is "
                      "not in cors_origins", "origin_not_allowed")


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the CORS headers of an answer to an allowed origin (also
    on streams and errors, which are prepared after the handler returned or raised)."""
    origin = request.headers.get("Origin")
    if origin is None or "Access-Control-Allow-Origin" in response.headers:
        return
    if request.app[ORIGINS].judge(origin, request.host) is OriginVerdict.ALLOWED:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = _CORS_EXPOSE
        vary = response.headers.get("Vary")
        response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"


def _kept_headers(exc: web.HTTPException) -> dict[str, str]:
    keep = ("Allow", "Retry-After", "WWW-Authenticate")
    return {name: exc.headers[name] for name in keep if name in exc.headers}


class WebServer:
    """One aiohttp server. ``bind``, ``add_routes`` and ``start`` are called in order from
    one task at start; handlers then run concurrently, one task per request."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_body_bytes: int = 1024 * 1024,
        shutdown_timeout: float = 5.0,
        port_setting: str = "COMMHUB_HTTP_PORT",
        origins: OriginPolicy | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.port_setting = port_setting
        self.shutdown_timeout = shutdown_timeout
        #: Which browser pages may call the server (``cors_origins``); shared with the
        #: WebSocket channel, which learns the server's port from it.
        self.origins = origins or OriginPolicy()
        self.app = web.Application(client_max_size=max_body_bytes,
                                   middlewares=[_origin_check, _json_errors])
        self.app[MAX_BODY] = max_body_bytes
        self.app[ORIGINS] = self.origins
        self.app.on_response_prepare.append(_cors_headers)
        self.port: int | None = None
        self._sock: socket.socket | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """``http://host:port``, once bound."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def bind(self) -> int:
        """Open the listening socket; return the port (a free one when asked for 0).

        Raises :class:`ListenError` naming the setting to change (``port_setting``).
        """
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as exc:
            sock.close()
            raise listen_error("HTTP server", self.host, self.requested_port, exc,
                               self.port_setting) from None
        sock.listen(512)
        sock.setblocking(False)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self.origins.add_own_port(self.port)
        return self.port

    def add_routes(self, routes: Iterable[web.AbstractRouteDef]) -> None:
        """Mount routes; only before :meth:`start` (aiohttp freezes the router then)."""
        self.app.add_routes(list(routes))

    def add_get(self, path: str, handler: Handler, **kwargs: Any) -> None:
        self.app.router.add_get(path, handler, **kwargs)

    def add_post(self, path: str, handler: Handler, **kwargs: Any) -> None:
        self.app.router.add_post(path, handler, **kwargs)

    async def start(self) -> None:
        """Serve on the bound socket (binding now if :meth:`bind` was not called)."""
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        self._runner = web.AppRunner(
            self.app, access_log=None, shutdown_timeout=self.shutdown_timeout
        )
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        elif self._sock is not None:
            self._sock.close()
        self._sock = None

