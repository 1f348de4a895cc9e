"""Connecting to NATS: a bounded first connect, one clear line when it fails, and quiet
reconnects afterwards.

nats-py's ``connect`` with unlimited reconnects (what a long-running hub wants) never
returns when no server answers or the server refuses the login: it retries the first
connect forever too. :func:`connect` runs it under a deadline and gives up at once when
a server refuses the credentials, raising a :class:`NatsConnectError` whose message is
one line that names the servers (passwords hidden) and the reason. Once connected the
client reconnects forever, and an outage is logged once when it begins and once when it
ends, not on every failed attempt.

Servers: ``url`` may list several, comma-separated (``nats://a:4222,nats://b:4222``);
the client tries them in turn, and learns the rest of a cluster from the servers.

Concurrency: :func:`connect` is a coroutine for the caller's event loop; the callbacks
it installs run there too. Thread-safe otherwise (module state is constants only).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import (
    AuthorizationError,
    ConnectionClosedError,
    StaleConnectionError,
    UnexpectedEOF,
)

from commhub.core.natsauth import redact

__all__ = ["CONNECT_DEADLINE", "NatsConnectError", "auth_options", "connect", "describe_failure",
           "servers_of"]

log = logging.getLogger(__name__)

#: Longest a first connect may take before it is given up (seconds).
CONNECT_DEADLINE = 5.0

Callback = Callable[[], Awaitable[None]]

# Errors that only say the connection is gone (the disconnect callback logs the outage).
_CONNECTION_ERRORS = (UnexpectedEOF, StaleConnectionError, ConnectionClosedError, OSError)


class NatsConnectError(RuntimeError):
    """The first connect failed; the message is one line: servers (no secrets) and why."""


def servers_of(url: str) -> list[str]:
    """The servers of a comma-separated ``url``, stripped, empty parts dropped."""
    return [part.strip() for part in url.split(",") if part.strip()]


def describe_failure(exc: BaseException | None, deadline: float) -> str:
    """Why a connect failed, in a few words a person can act on."""
    if exc is None:
        return f"no server answered within {deadline:.0f} s"
    if isinstance(exc, AuthorizationError) or "authorization" in str(exc).lower():
        return ("the server refused the login (authorization violation: check the user, "
                "password, token or credentials)")
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return "connection refused (is nats-server running there?)"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return f"no server answered within {deadline:.0f} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def auth_options(
    *,
    creds: Path | None = None,
    nkey: Path | None = None,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_ca: Path | None = None,
) -> dict[str, Any]:
    """nats-py ``connect`` options for credentials and TLS. Files are checked here, so
    a missing one is a :class:`NatsConnectError` naming the setting, not a traceback."""
    options: dict[str, Any] = {}
    for setting, path in (("nats_creds", creds), ("nats_nkey", nkey),
                          ("nats_tls_cert", tls_cert), ("nats_tls_key", tls_key),
                          ("nats_tls_ca", tls_ca)):
        if path is not None and not Path(path).is_file():
            raise NatsConnectError(f"{setting} {path} is not a readable file")
    if creds is not None:
        options["user_credentials"] = str(creds)
    if nkey is not None:
        options["nkeys_seed"] = str(nkey)
    if user is not None:
        options["user"] = user
    if password is not None:
        options["password"] = password
    if token is not None:
        options["token"] = token
    if (tls_cert is None) != (tls_key is None):
        raise NatsConnectError("nats_tls_cert and nats_tls_key go together: set both")
    if tls_cert is not None or tls_ca is not None:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(tls_ca) if tls_ca else None)
        if tls_cert is not None and tls_key is not None:
            try:
                context.load_cert_chain(str(tls_cert), str(tls_key))
            except (ssl.SSLError, OSError) as exc:
                raise NatsConnectError(
                    f"cannot load the client certificate {tls_cert}: {exc}") from None
        options["tls"] = context
    return options


class _Outage:
    """Logs a connection's outages once each, and passes other errors on."""

    def __init__(self, servers: str, reconnected: Callback | None) -> None:
        self.servers = servers
        self.connected = False
        self.last_error: BaseException | None = None
        self.refused = asyncio.Event()
        self.down_since: float | None = None
        self._reconnected = reconnected
        self.nc: NATS | None = None

    async def error(self, exc: Exception) -> None:
        if not self.connected:  # the first connect: remembered, reported by connect()
            if self._login_cut_short(exc):
                exc = AuthorizationError()
            self.last_error = exc
            if isinstance(exc, AuthorizationError) or "authorization" in str(exc).lower():
                self.refused.set()
            return
        if self.down_since is not None or isinstance(exc, _CONNECTION_ERRORS):
            # A lost connection or a failed reconnect: the outage is logged on its own.
            log.debug("nats: %r", exc)
            return
        # A JetStream permission denial only shows up here; the publish just times out.
        log.warning("nats error: %s", exc)

    def _login_cut_short(self, exc: Exception) -> bool:
        """A server that asked for credentials and then dropped the connection refused
        them: it closes right after its ``-ERR 'Authorization Violation'``, and the close
        can overtake the error line (a reset discards what was not read yet)."""
        info = getattr(self.nc, "_server_info", None) or {}
        return bool(info.get("auth_required")) and isinstance(
            exc, (ConnectionResetError, UnexpectedEOF, BrokenPipeError))

    async def disconnected(self) -> None:
        if not self.connected or self.down_since is not None:
            return
        if self.nc is not None and (self.nc.is_closed or self.nc.is_draining):
            return  # closing on purpose
        self.down_since = time.monotonic()
        log.warning("lost the connection to NATS at %s; reconnecting", self._current())

    async def reconnected(self) -> None:
        if self.down_since is not None:
            log.info("reconnected to NATS at %s after %.1f s", self._current(),
                     time.monotonic() - self.down_since)
        self.down_since = None
        if self._reconnected is not None:
            await self._reconnected()

    def _current(self) -> str:
        url = self.nc.connected_url if self.nc is not None else None
        if url is not None and url.hostname:
            return f"{url.scheme}://{url.hostname}:{url.port}"
        return self.servers


async def connect(
    url: str,
    *,
    name: str = "commhub",
    deadline: float = CONNECT_DEADLINE,
    reconnected_cb: Callback | None = None,
    **options: Any,
) -> NATS:
    """A connected client, or :class:`NatsConnectError` within ``deadline`` seconds.

    ``url`` may carry a user and password (hidden in messages) and list several servers.
    A refused login fails at once; no server answering fails at the deadline with the
    last reason seen. Once connected, the client reconnects forever (``reconnected_cb``
    is awaited after each reconnect) and logs each outage once. ``options`` go to
    nats-py's ``connect`` (credentials, TLS).
    """
    servers = servers_of(url)
    if not servers:
        raise NatsConnectError("no NATS server given (the URL is empty)")
    shown = redact(",".join(servers))
    outage = _Outage(shown, reconnected_cb)
    nc = NATS()
    outage.nc = nc
    attempt = asyncio.create_task(nc.connect(
        servers=servers,
        name=name,
        error_cb=outage.error,
        disconnected_cb=outage.disconnected,
        reconnected_cb=outage.reconnected,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py takes seconds as float
        connect_timeout=min(5, max(1, int(deadline))),
        **options,
    ), name="nats-connect")
    refused = asyncio.create_task(outage.refused.wait(), name="nats-connect-refused")
    try:
        done, _ = await asyncio.wait({attempt, refused}, timeout=deadline,
                                     return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled (a signal during the start): leave nothing behind
        await _abandon(nc, attempt, refused)
        raise
    if attempt in done and attempt.exception() is None:
        refused.cancel()
        outage.connected = True
        return nc
    failure = attempt.exception() if attempt in done else outage.last_error
    await _abandon(nc, attempt, refused)
    raise NatsConnectError(
        f"cannot connect to NATS at {shown}: {describe_failure(failure, deadline)}"
    )


async def _abandon(nc: NATS, *tasks: asyncio.Task[Any]) -> None:
    """Stop a first connect for good, within a second whatever state it is in.

    nats-py's connect can miss a cancellation while it waits for the server's greeting
    (``asyncio.wait_for`` in Python 3.11), so the tasks are not awaited without bound.
    """
    for task in tasks:
        task.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.shield(nc.close()), 1.0)  # its socket, its tasks
    await asyncio.wait(tasks, timeout=1.0)
