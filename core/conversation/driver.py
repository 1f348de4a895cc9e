"""One conversation run in process, the way the router runs it, without NATS.

:class:`ConversationDriver` holds a conversation's :class:`ConversationState` and takes
its inputs one at a time: a user's message or button press, a service's workflow input,
a service's answer to an ``ask``, and the passing of time. For each it calls what the
router and the timer scheduler call, in the same order:

* :func:`~commhub.core.routing.rules.needs_classification`, then the classifier;
* for a message, :func:`~commhub.core.routing.rules.message_entities` (the engine reads
  the text's entities on the driver's clock, in the engine's time zone) and whether a
  human agent is available (:attr:`ConversationDriver.agents`, set by
  :meth:`ConversationDriver.agent`; always when the hub hands off without asking,
  ``needs_agent=False``);
* :func:`~commhub.core.routing.rules.decide` (which calls the pure engine; small talk,
  slots filled from entities, corrections and handoffs are its rules);
* :func:`~commhub.core.routing.rules.pending_ask`, then the service's canned answer
  through :func:`~commhub.core.routing.rules.ask_reply`;
* :func:`~commhub.core.routing.timers.due_timers` for state timeouts and idle expiry,
  fired when :meth:`ConversationDriver.wait` moves the clock past them.

It collects what the router would publish for each input (replies, workflow events,
emits, the classification) into an :class:`Outcome`. The clock is the driver's own
(``now``): nothing reads the machine's time, so a run is the same every time.

Differences from a hub, on purpose: no inbound or outbound middleware plugins run, no
records are written, a service's answer to an ``ask`` comes from ``services``
(a mapping of subject to answer) instead of the bus, and human agents are present or
not as the driver is told (:meth:`ConversationDriver.agent`) instead of by their
heartbeats in the agents bucket.

Errors: :class:`DriverError` for an input the conversation cannot take (an answer when
no request waits, a negative wait). Classifier errors propagate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from commhub.core.engine.fsm import Engine
from commhub.core.envelope import Alternative, Message, Sender, WorkflowInput, derived_id
from commhub.core.routing import rules
from commhub.core.routing.rules import ClassificationFields, RoutingPolicy
from commhub.core.routing.state import ConversationState, Emit, PendingAsk, Reply, StepEvent
from commhub.core.routing.timers import Timing, due_timers

__all__ = [
    "NO_RESPONDERS",
    "SILENT",
    "ConversationDriver",
    "DriverError",
    "Outcome",
]

# Service answers that are not a JSON body: nobody listens on the subject (the default
# for a subject without an answer), or a service takes the request and never answers
# (the run waits until the ask's timeout, which a wait can pass).
NO_RESPONDERS = "no_responders"
SILENT = "silent"
MAX_TIMERS_PER_WAIT = 1000  # a workflow whose timeouts re-arm forever stops here

Classify = Callable[[str], list[Alternative]]


class DriverError(ValueError):
    """An input the conversation cannot take; the message says why."""


@dataclass
class Outcome:
    """What one input produced, with the inputs it caused at once (the answer to an
    ``ask``, timers that fell due): in publish order, as the router publishes them."""

    replies: list[Reply] = field(default_factory=list)
    # Workflow events and emits, in the order of the steps (a step's events, then its emits).
    events: list[StepEvent | Emit] = field(default_factory=list)
    classification: ClassificationFields | None = None
    actions: list[str] = field(default_factory=list)
    asked: list[PendingAsk] = field(default_factory=list)


class ConversationDriver:
    """One conversation, stepped in process; see the module docstring.

    ``classify`` ranks a text (best first), as the router's classifier does.
    ``services`` maps an ``ask`` subject to its answer: a JSON object (the reply),
    :data:`SILENT`, :data:`NO_RESPONDERS` (also for a subject not listed), or any other
    JSON value (a reply that is not an object: ``bad_reply``). ``now`` is the clock in
    epoch seconds; only :meth:`wait` moves it. ``agents``: whether a human agent is
    there to take a handoff (as their heartbeats would say; :meth:`agent` changes it);
    ``needs_agent`` is the hub's ``handoff_needs_agent`` (False: hand off regardless).
    """

    def __init__(
        self,
        engine: Engine,
        policy: RoutingPolicy,
        classify: Classify,
        *,
        conversation: str = "test",
        channel: str = "test",
        user: str = "tester",
        now: float = 0.0,
        idle_expiry: float = 3600.0,
        services: Mapping[str, Any] | None = None,
        agents: bool = False,
        needs_agent: bool = True,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.classify = classify
        self.conversation = conversation
        self.channel = channel
        self.user = user
        self.now = now
        self.idle_expiry = idle_expiry
        self.services = dict(services or {})
        self.agents = agents
        self.needs_agent = needs_agent
        self.state = ConversationState(conversation=conversation)
        self.revision: int | None = None  # as the KV bucket would number the commits
        self._inputs = 0
        # A request a silent service holds, and when the router's request times out.
        self._waiting: tuple[PendingAsk, float] | None = None

    # -- inputs ------------------------------------------------------------------------
    def message(self, text: str | None, payload: dict[str, Any] | None = None) -> Outcome:
        """The user writes ``text``, or presses a button (``payload``, no text)."""
        record = Message(
            id=self._next_id(), conversation=self.conversation, channel=self.channel,
            direction="in", sender=Sender(id=self.user), text=text, payload=payload,
            ts=self.now,
        )
        outcome = Outcome()
        self._handle(record, outcome)
        return outcome

    def event(self, name: str, data: Mapping[str, Any] | None = None) -> Outcome:
        """A service publishes the workflow input ``name`` with ``data``."""
        record = WorkflowInput(id=self._next_id(), conversation=self.conversation, event=name,
                               data=dict(data or {}), ts=self.now)
        outcome = Outcome()
        self._handle(record, outcome)
        return outcome

    def answer(self, body: Any) -> Outcome:
        """The service the run is waiting for answers now with ``body`` (any JSON value).
        Raises DriverError when the run waits for no answer."""
        asking = self.state.asking
        if asking is None:
            raise DriverError("no request waits for an answer (the run is in no 'ask' state)")
        self._waiting = None
        outcome = Outcome()
        self._handle(rules.ask_reply(asking, self.conversation, body, None, self.now), outcome)
        return outcome

    def agent(self, present: bool) -> Outcome:
        """A human agent comes (their heartbeats start) or goes (the last one's stop).
        Nothing is said: presence only decides whether later handoffs are taken."""
        self.agents = present
        return Outcome()

    def wait(self, seconds: float) -> Outcome:
        """Move the clock ``seconds`` on, firing every timer that falls due on the way,
        at its due time and in order: state timeouts, idle expiry, and the timeout of a
        request a silent service holds. Raises DriverError for a negative wait, or when
        timers keep firing without end."""
        if seconds < 0:
            raise DriverError(f"cannot wait a negative time ({seconds} s)")
        until = self.now + seconds
        outcome = Outcome()
        for _ in range(MAX_TIMERS_PER_WAIT):
            due = self._next_timer()
            if due is None or due[0] > until:
                break
            self.now = max(self.now, due[0])
            self._handle(due[1], outcome)
        else:
            raise DriverError(f"more than {MAX_TIMERS_PER_WAIT} timers fired in one wait")
        self.now = until
        return outcome

    # -- the router's step --------------------------------------------------------------
    def _handle(self, record: Message | WorkflowInput, outcome: Outcome) -> None:
        if isinstance(record, Message):
            alternatives = None
            if rules.needs_classification(self.state, record, self.policy, self.engine):
                alternatives = self.classify(record.text or "")
            entities = rules.message_entities(self.state, record, self.engine, self.now)
            decision = rules.decide(self.state, record, alternatives, self.policy, self.engine,
                                    self.revision, self.now, entities=entities,
                                    agents_available=self.agents or not self.needs_agent)
        else:
            decision = rules.decide(self.state, record, None, self.policy, self.engine,
                                    self.revision, self.now)
        result = decision.result
        channel = result.state.channel or (record.channel if isinstance(record, Message)
                                           else None)
        self.state = result.state
        self.revision = (self.revision or 0) + 1
        outcome.actions.append(decision.action)
        if decision.classification is not None:
            outcome.classification = decision.classification
        outcome.events.extend(result.events)
        outcome.events.extend(result.emits)
        if channel is not None:  # the router has nowhere to send replies otherwise
            outcome.replies.extend(result.replies)
        asking = rules.pending_ask(self.state, record.id)
        if asking is not None:
            outcome.asked.append(asking)
            self._ask(asking, outcome)

    def _ask(self, asking: PendingAsk, outcome: Outcome) -> None:
        """The router's request, answered from ``services``: at once, or (a silent
        service) by the request's timeout, which :meth:`wait` fires."""
        answer = self.services.get(asking.subject, NO_RESPONDERS)
        if answer == SILENT:
            self._waiting = (asking, self.now + asking.timeout)
            return
        error = NO_RESPONDERS if answer == NO_RESPONDERS else None
        body = None if error else answer
        self._handle(rules.ask_reply(asking, self.conversation, body, error, self.now), outcome)

    def _next_timer(self) -> tuple[float, WorkflowInput] | None:
        """The earliest timer the current state asks for, with the input it publishes."""
        timing = msgspec.convert(self.state, Timing, from_attributes=True)
        timers = due_timers(self.conversation, timing, self.idle_expiry)
        if self._waiting is not None:
            asking, at = self._waiting
            if self.state.asking == asking:
                timers.append((at, rules.ask_reply(asking, self.conversation, None,
                                                   "timeout", at)))
            else:
                self._waiting = None  # answered, or the run moved on
        if not timers:
            return None
        at, record = min(timers, key=lambda timer: timer[0])
        return at, msgspec.structs.replace(record, ts=max(at, self.now))

    def _next_id(self) -> str:
        self._inputs += 1
        return derived_id(self.conversation, "input", self._inputs)
