"""commhub's built-in channels, each registered through the ``register_channels`` hook.

* :mod:`commhub.channels.websocket`: browsers and scripts over JSON WebSocket frames
  (protocol in ``docs/websocket.md``), with its sans-I/O helpers
  :mod:`~commhub.channels.frames` (frame codec), :mod:`~commhub.channels.admission`
  (connect URL and token rules), :mod:`~commhub.channels.outbox` (bounded outbound
  queue) and :mod:`~commhub.channels.ratelimit` (token bucket).
* :mod:`commhub.channels.http`: a native JSON API (post, long-poll read, server-sent
  events), a Rasa-compatible REST endpoint and signed, retried callbacks, on the hub's
  HTTP server (reference in ``docs/http.md``), with :mod:`~commhub.channels.http_api`
  (native routes), :mod:`~commhub.channels.http_rasa` (Rasa's shape),
  :mod:`~commhub.channels.http_turn` (one request, one turn's replies),
  :mod:`~commhub.channels.http_callbacks` (callback store and durable deliverer) and
  :mod:`~commhub.channels.http_request` (auth, validation, JSON errors).
* :mod:`commhub.channels.telegram`: a Telegram bot by long polling or a secret-checked
  webhook (guide in ``docs/telegram.md``), with :mod:`~commhub.channels.telegram_updates`
  (update parsing, ids, button data, dedupe), :mod:`~commhub.channels.telegram_text`
  (splitting by UTF-16 units), :mod:`~commhub.channels.telegram_pacing` (per-chat and
  per-bot pacing), :mod:`~commhub.channels.telegram_send` (sending with retries) and
  :mod:`~commhub.channels.telegram_outbound` (the durable outbound consumer).

A built-in channel uses nothing an outside plugin could not: a
:class:`commhub.core.channel.Channel` subclass and its
:class:`~commhub.core.channel.ChannelContext`.
"""
