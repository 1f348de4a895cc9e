"""The HTTP channel (reference in ``docs/http.md``), registered as the built-in plugin
``commhub.channels.http``.

* :mod:`.channel`: the channel, its settings and the ``register_channels`` hook;
* :mod:`.api`: the native routes (post, long-poll read, server-sent events);
* :mod:`.rasa`: the Rasa-compatible REST endpoint's shapes;
* :mod:`.turn`: one request, one turn's replies;
* :mod:`.callbacks`: the callback store and its durable deliverer;
* :mod:`.request`: authentication, validation and JSON errors.
"""

from commhub.channels.http.channel import register_channels

__all__ = ["register_channels"]
