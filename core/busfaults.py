"""Which failures say "the bus is away for a moment" rather than "this is wrong".

A node of the cluster dies, a stream or bucket elects a new leader, the connection
reconnects to another server: for a few seconds requests time out, find no responder,
get a 503, or get no answer from the stream at all. Code that must keep its order
(the router holding a conversation's input) waits such a failure out instead of
handing the work back; everything else is a real failure and goes the usual way.

The decision is a pure function of the exception, so that every caller classifies
the same way and a test can list the cases.
"""

from __future__ import annotations

import nats.errors
from nats.js.errors import NoStreamResponseError, ServerError, ServiceUnavailableError

__all__ = ["BUS_UNAVAILABLE", "bus_unavailable"]

#: The exception types that mean the bus (not the request) failed for now.
BUS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    TimeoutError,  # nats.errors.TimeoutError and FlushTimeoutError are TimeoutErrors too
    ConnectionError,  # a socket reset while the client reconnects
    nats.errors.NoRespondersError,  # the stream's leader is being elected
    nats.errors.NoServersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,  # the reconnect buffer is full
    NoStreamResponseError,  # a publish's ack lost in a leader change
    ServiceUnavailableError,  # 503: JetStream not ready
    ServerError,  # 500 during a leader change
)


def bus_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the bus is away for a moment (see the module docstring)."""
    return isinstance(exc, BUS_UNAVAILABLE)
