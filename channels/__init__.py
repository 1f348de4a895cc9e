"""commhub's built-in channels, each registered through the ``register_channels`` hook.

* :mod:`commhub.channels.websocket`: browsers and scripts over JSON WebSocket frames
  (protocol in ``docs/websocket.md``), with its sans-I/O helpers
  :mod:`~commhub.channels.frames` (frame codec), :mod:`~commhub.channels.admission`
  (connect URL and token rules), :mod:`~commhub.channels.outbox` (bounded outbound
  queue) and :mod:`~commhub.channels.ratelimit` (token bucket).

A built-in channel uses nothing an outside plugin could not: a
:class:`commhub.core.channel.Channel` subclass and its
:class:`~commhub.core.channel.ChannelContext`.
"""
