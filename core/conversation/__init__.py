"""Conversations without a hub, and against one: the tools behind ``commhub test``,
``commhub try`` and ``commhub shell``.

* ``driver``: :class:`~.driver.ConversationDriver`, one conversation run in process as
  the router runs it (the routing rules, the engine, the classifier, the timers, the
  message's entities), on a clock of its own, with human agents present or not as told;
* ``setup``: the workflows, the routing policy and the trained classifier, as the hub
  sets them up;
* ``testfile``: the conversation test format (YAML), read with line numbers;
* ``expect``: what a turn showed against what a test expects, as readable differences;
* ``runner``, ``report``: running test files in process or against a hub; the text
  report and JUnit XML;
* ``hubclient``: a WebSocket (and optionally NATS) client of a running hub, used by
  ``commhub test --hub`` and ``commhub shell``;
* ``shell``, ``explain``: the interactive shell, and ``commhub try``'s explanation of a
  decision.
"""
