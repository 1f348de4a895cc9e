"""Which web origins may use the hub from a browser: the rule as pure functions.

A browser names the page that makes a request in its ``Origin`` header (scheme, host
and port: ``https://shop.example``). Pages the hub serves itself (``/chat``,
``/dashboard``, ``/inbox``) are always allowed; pages on other sites only when their
origin is in the ``cors_origins`` setting. Clients that send no ``Origin`` (scripts,
services, ``curl``, server-side back ends) are not browsers acting for a page, and are
judged by their tokens alone.

:class:`OriginPolicy` decides, from the ``Origin`` and ``Host`` headers:

* an origin listed in ``cors_origins`` (or ``*`` listed: any origin) is **allowed**, and
  the HTTP server adds CORS headers for it;
* an origin whose host and port are the request's own ``Host`` (a page of the hub
  calling the hub), or whose host is the ``Host``'s and whose port is one of the hub's
  own HTTP ports (a page of the hub opening the WebSocket port), is **same-site**:
  allowed, without CORS headers;
* any other origin is refused: an HTTP preflight gets 403, a request 403, a WebSocket
  handshake 403 before the upgrade.

Origins are compared normalised: scheme and host lower case, the default port (80 for
``http``, 443 for ``https``) dropped. ``null`` (a sandboxed frame, a ``file://`` page)
matches only a listed ``null``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import Enum
from urllib.parse import urlsplit

__all__ = ["OriginPolicy", "OriginVerdict", "check_origin", "normalise_origin"]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class OriginVerdict(Enum):
    NONE = "none"  # no Origin header: not a browser page's request
    SAME_SITE = "same_site"  # one of the hub's own pages
    ALLOWED = "allowed"  # listed in cors_origins: answer with CORS headers
    REFUSED = "refused"


def normalise_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case without a default port, or None when
    ``origin`` is not an origin (a path, a query, no host). ``null`` stays ``null``."""
    origin = origin.strip()
    if origin == "null":
        return "null"
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def check_origin(value: str) -> str:
    """A ``cors_origins`` entry as stored (``*``, ``null`` or a normalised origin);
    raises ValueError naming what is wrong."""
    if value.strip() == "*":
        return "*"
    normal = normalise_origin(value)
    if normal is None:
        raise ValueError(
            f"{value!r} is not an origin: use scheme://host[:port] (like "
            "https://shop.example or http://127.0.0.1:3000), '*' or 'null'"
        )
    return normal


def _host_port(host: str, scheme: str) -> tuple[str, int] | None:
    """The host name and port of a ``Host`` header (the scheme's default port if none)."""
    try:
        parts = urlsplit(f"//{host.strip()}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS[scheme]


class OriginPolicy:
    """The allowed origins of one hub (``cors_origins``) and its own HTTP ports.

    Immutable after construction except :meth:`add_own_port` (the HTTP server's port is
    known only once it is bound); safe to share between tasks.
    """

    def __init__(self, allowed: Sequence[str] = (), own_ports: Iterable[int] = ()) -> None:
        normal = [check_origin(origin) for origin in allowed]
        self.any = "*" in normal
        self.allowed = frozenset(origin for origin in normal if origin != "*")
        self.own_ports = set(own_ports)

    def add_own_port(self, port: int) -> None:
        """A port on which the hub serves its own pages (its HTTP server's)."""
        self.own_ports.add(port)

    def judge(self, origin: str | None, host: str | None) -> OriginVerdict:
        """The verdict for a request with these ``Origin`` and ``Host`` headers."""
        if origin is None:
            return OriginVerdict.NONE
        normal = normalise_origin(origin)
        if normal is None:
            return OriginVerdict.REFUSED
        if normal != "null" and host:
            scheme = normal.split("://", 1)[0]
            page = _host_port(normal.split("://", 1)[1], scheme)
            target = _host_port(host, scheme)
            if page is not None and target is not None and page[0] == target[0] and (
                page[1] == target[1] or page[1] in self.own_ports
            ):
                return OriginVerdict.SAME_SITE
        if self.any or normal in self.allowed:
            return OriginVerdict.ALLOWED
        return OriginVerdict.REFUSED
