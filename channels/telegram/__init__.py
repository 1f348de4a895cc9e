"""The Telegram channel (guide in ``docs/telegram.md``), registered as the built-in plugin
``commhub.channels.telegram``.

* :mod:`.channel`: long polling or a secret-checked webhook, and the ``register_channels``
  hook;
* :mod:`.updates`: update parsing, ids, button data, dedupe;
* :mod:`.text`: splitting long replies by UTF-16 units;
* :mod:`.pacing`: per-chat and per-bot pacing;
* :mod:`.send`: sending with retries (the durable outbound consumer is the hub's
  :class:`~commhub.core.delivery.DeliveryLoop`, through ``ctx.deliver_outbound``).
"""

from commhub.channels.telegram.channel import register_channels

__all__ = ["register_channels"]
