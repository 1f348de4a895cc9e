"""The WebSocket channel (protocol in ``docs/websocket.md``), registered as the built-in
plugin ``commhub.channels.websocket``.

* :mod:`.channel`: the server, one task per connection, and the ``register_channels`` hook;
* :mod:`.frames`: the sans-I/O frame codec;
* :mod:`.admission`: the connect URL and token rules.

A connection's bounded send queue is :mod:`commhub.channels.sendqueue`, shared with the
HTTP channel's streams.
"""

from commhub.channels.websocket.channel import register_channels

__all__ = ["register_channels"]
