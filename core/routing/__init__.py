"""Routing: inbound messages and service inputs to workflow steps.

* :mod:`.router`: the consumer of ``in`` and ``wf``: load state, step, commit, publish, ack
  (the I/O only);
* :mod:`.rules`: every routing decision, as pure functions;
* :mod:`.store`: the conversation states in the KV bucket (load, commit, watch);
* :mod:`.state`: a conversation's state and a step's result (plain data);
* :mod:`.timers`: timeouts and idle expiry, scheduled from the state bucket.
"""
