"""Conversation tests against a running hub: ``commhub test --hub ws://HOST:PORT``.

Each test is a new conversation (``test-<name>-<random>``) on the hub's WebSocket
channel. What can be checked there:

* always: the replies and their buttons (every outbound message of the conversation
  that arrives after the input, up to the next input), and pressing buttons;
* with ``--nats-url``: also the classification, the workflow events and emits
  (``{prefix}.evt.>``), the workflow, state and slots (``{prefix}.api.state``), and
  ``event:`` inputs (published on ``{prefix}.wf.{conversation}``). Without it those
  expectations are skipped with a note, and tests with ``event:`` inputs are skipped.

Tests that set or move the clock (``clock:``, ``wait:``), play a service
(``services:``, ``answer:``) or human agents (``agents:``, ``agent:``) are skipped: a
hub runs on the real time, asks the real services and sees the real agents. (A test
without ``clock:`` runs on 2030-01-01 in process and on today's date against a hub, so
a test whose replies name a date says ``clock:``.)

A turn ends when the hub has committed the input's step (with NATS: the state names
the input), or when the replies the test expects have come (without), and then no
further message came for ``settle`` seconds; a turn waits at most ``timeout`` seconds
for its replies. So against a hub a turn takes at least ``settle`` seconds.

Failure behaviour: a hub that cannot be reached when a test begins raises
:class:`~commhub.core.conversation.hubclient.HubClientError` (the run stops); a message
the hub refuses or does not ack, a connection it drops mid-test, or an input that does
not commit in time fails that test at that turn (:class:`TurnError`).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Any

from commhub.core.conversation.expect import Observed, SeenClassification, SeenEvent, ShownReply
from commhub.core.conversation.hubclient import HubClient, HubClientError
from commhub.core.conversation.runner import TurnError, conversation_id
from commhub.core.conversation.testfile import ConversationTest, EventInput, Turn

__all__ = ["HubBackend"]

BUS_ONLY = ("classified", "workflow", "state", "slots", "events")
NO_BUS = "needs --nats-url (it is seen on the bus, not over WebSocket)"


class HubBackend:
    """Runs tests against the hub at ``hub`` (see the module docstring); call
    :meth:`close` when done. Synchronous, like the in-process backend: it runs its
    client on an event loop of its own."""

    def __init__(
        self,
        hub: str,
        token: str | None = None,
        nats_url: str | None = None,
        prefix: str = "commhub",
        timeout: float = 10.0,
        settle: float = 0.3,
    ) -> None:
        self.hub = hub
        self.token = token
        self.nats_url = nats_url
        self.prefix = prefix
        self.timeout = timeout
        self.settle = settle
        self._runner = asyncio.Runner()
        self._client: HubClient | None = None

    def close(self) -> None:
        self._runner.close()

    def skip_reason(self, test: ConversationTest) -> str | None:
        if test.clock_given:
            return "'clock:' fixes the date, which only the in-process run can do"
        if test.uses("wait"):
            return "'wait:' moves the clock, which only the in-process run can do"
        if test.services or test.uses("answer"):
            return "'services:' and 'answer:' play a service, which only the in-process run " \
                   "can do (a hub asks the real services)"
        if test.agents_given or test.uses("agent"):
            return "'agents:' and 'agent:' play the human agents, which only the in-process " \
                   "run can do (a hub sees the real agents' heartbeats)"
        if test.uses("event") and not self.nats_url:
            return "'event:' publishes a workflow input on the bus: give --nats-url"
        return None

    def begin(self, test: ConversationTest) -> None:
        conversation = f"{conversation_id(test.name)[:100]}-{secrets.token_hex(4)}"
        conversation = re.sub(r"[^A-Za-z0-9_-]", "-", conversation)
        try:
            self._client = self._runner.run(HubClient.open(
                self.hub, conversation, "tester", self.token, self.nats_url, self.prefix))
        except HubClientError as exc:
            raise HubClientError(f"{test.where}: {exc}") from None

    def end(self) -> None:
        if self._client is not None:
            self._runner.run(self._client.close())
            self._client = None

    def send(self, turn: Turn, payload: dict[str, Any] | None) -> Observed:
        assert self._client is not None, "begin() first"
        try:
            return self._runner.run(self._turn(self._client, turn, payload))
        except HubClientError as exc:
            raise TurnError(str(exc)) from None

    async def _turn(self, client: HubClient, turn: Turn, payload: dict[str, Any] | None
                    ) -> Observed:
        step = turn.input
        since = len(client.messages)
        if step.kind == "user":
            input_id = await client.send(step.value)
        elif step.kind == "press":
            input_id = await client.send(None, payload)
        else:
            assert step.kind == "event", step.kind  # others are skipped
            event: EventInput = step.value
            input_id = await client.publish_input(event.name, event.data)
        state = None
        if client.has_bus:
            state = await client.committed(input_id, self.timeout)
        expected = sum(s.kind == "bot" for s in turn.expect)
        frames = await client.replies(since, expected, self.timeout, self.settle)
        observed = Observed(replies=[_shown(f) for f in frames])
        if state is None:
            observed.hidden = dict.fromkeys(BUS_ONLY, NO_BUS)
            return observed
        observed.workflow = state.get("workflow")
        observed.state = state.get("state")
        observed.slots = dict(state.get("slots") or {})
        for c in client.classifications:
            if c.message_id == input_id:
                observed.classification = SeenClassification(
                    c.decision, c.workflow, c.confidence,
                    tuple((a.workflow, a.confidence) for a in c.alternatives))
        observed.events = [
            SeenEvent(e.event or e.kind, dict(e.data)) if e.kind == "emitted"
            else SeenEvent(e.kind, dict(e.data))
            for e in client.events if e.message_id == input_id
        ]
        return observed


def _shown(frame: dict[str, Any]) -> ShownReply:
    payload = frame.get("payload") or {}
    buttons = payload.get("buttons") if isinstance(payload, dict) else None
    return ShownReply(str(frame.get("text") or ""),
                      tuple(b for b in buttons or [] if isinstance(b, dict)))
