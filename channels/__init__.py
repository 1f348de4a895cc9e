"""commhub's built-in channels, one subpackage each, each registered through the
``register_channels`` hook like an outside channel:

* :mod:`commhub.channels.websocket`: browsers and scripts over JSON WebSocket frames;
* :mod:`commhub.channels.http`: a native JSON API, a Rasa-compatible REST endpoint and
  signed, retried callbacks, on the hub's HTTP server;
* :mod:`commhub.channels.telegram`: a Telegram bot by long polling or webhook.

:mod:`commhub.channels.sendqueue` (a client's bounded send queue: slow clients are
dropped, never their messages) is shared by the WebSocket and HTTP channels; their rate
limits use :mod:`commhub.core.ratelimit`'s token bucket, as the SQL service does.
"""
