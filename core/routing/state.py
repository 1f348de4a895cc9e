"""Conversation state and the values a workflow step consumes and produces.

Plain data, no I/O: the FSM engine (``fsm.py``) is a pure function from a state and a
trigger to a :class:`StepResult`; the router does the I/O around it (KV, bus). The state
is stored as JSON in the KV bucket under the conversation id.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from commhub.core.envelope import Entity

__all__ = [
    "EXPIRE_EVENT",
    "HANDOFF_END_EVENT",
    "REPLY_EVENT",
    "ROUTER_EVENTS",
    "TIMEOUT_EVENT",
    "ConversationState",
    "PendingAsk",
    "Trigger",
    "Reply",
    "Emit",
    "StepEvent",
    "StepResult",
]

# WorkflowInput events the router itself publishes on ``{prefix}.wf.{conversation}``:
# a due state timeout, an idle conversation's expiry, a service's answer to ``ask``.
# Workflows cannot listen for them as ``event:`` triggers.
TIMEOUT_EVENT = "timeout"
EXPIRE_EVENT = "expire"
REPLY_EVENT = "reply"
ROUTER_EVENTS = (TIMEOUT_EVENT, EXPIRE_EVENT, REPLY_EVENT)
# The event an agent (any service) publishes to end a handoff.
HANDOFF_END_EVENT = "handoff.end"


class PendingAsk(msgspec.Struct, frozen=True, kw_only=True):
    """A request to a service that a state's ``ask`` action made and whose answer the
    run waits for. ``id`` is deterministic (derived from the input that entered the
    state) and travels as the ``Commhub-Request-Id`` header, so a service can drop a
    request it already answered when a crash made the router ask again."""

    id: str
    subject: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    timeout: float = 5.0


class ConversationState(msgspec.Struct, kw_only=True):
    """Where one conversation is. ``workflow`` is None between workflow runs.

    ``last_input`` is the id of the last inbound message or workflow input whose step
    was committed: a redelivered copy of it is recognised and not run twice;
    ``recent_inputs`` holds the few before it, for a redelivery whose ack was lost
    after later inputs of the conversation were already handled.

    ``handoff`` is true while the current state is a handoff state (a human agent has
    the conversation; the bot does not answer). ``entered`` is when the current state
    was entered, ``timeout_at`` when its next ``timeout`` transition is due (None: the
    state has none left), ``asking`` the service request the run waits for,
    ``expires`` whether the current state is subject to idle expiry. The
    router's timer scheduler reads ``timeout_at`` and ``updated`` (idle expiry) from
    the bucket, so timers survive restarts and every router knows them.

    ``prefilled`` names the slots filled from entities whose questions have not come
    yet (the engine passes over those states, or asks to confirm); ``confirming`` is
    the slot whose prefilled value the current state asks the user to confirm.
    """

    conversation: str
    channel: str | None = None
    user: str | None = None
    workflow: str | None = None
    state: str | None = None
    run_id: str | None = None
    slots: dict[str, Any] = msgspec.field(default_factory=dict)
    last_input: str | None = None
    updated: float = 0.0
    turns: int = 0
    handoff: bool = False
    entered: float = 0.0
    timeout_at: float | None = None
    asking: PendingAsk | None = None
    expires: bool = True
    recent_inputs: list[str] = msgspec.field(default_factory=list)
    prefilled: list[str] = msgspec.field(default_factory=list)
    confirming: str | None = None

    @property
    def active(self) -> bool:
        return self.workflow is not None


TriggerKind = Literal["message", "button", "event", "timeout", "reply"]


class Trigger(msgspec.Struct, frozen=True, kw_only=True):
    """What moves a workflow: a user's text, a pressed button, a service event, a timeout,
    or the answer to a state's ``ask`` (``reply``).

    For ``timeout``, ``data`` holds what the timer was scheduled for (``run_id``,
    ``state``, ``entered``, ``at``); for ``reply``, the request ``id``, ``ok``, the
    failure ``error`` (``timeout``, ``no_responders``, ``bad_reply``, ``error``) and the
    service's ``reply`` object.

    ``id`` is the id of the inbound message or workflow input; derived ids of the step's
    outputs are built from it, so a re-run step yields the same ids.

    For a message, ``data`` holds slot values given with it (Rasa's
    ``/intent{"slot": value}`` form) and ``entities`` the entities found in its text
    (None: the engine finds them itself). ``agents`` says whether a human agent is
    available: a transition into a handoff state is not taken while none is.
    """

    id: str
    kind: TriggerKind
    text: str | None = None
    payload: dict[str, Any] | None = None
    event: str | None = None
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    ts: float = 0.0
    entities: list[Entity] | None = None
    agents: bool = True


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """Something the bot says: text, and optionally buttons ``[{"title", "payload"}]``."""

    text: str
    buttons: list[dict[str, Any]] = msgspec.field(default_factory=list)


class Emit(msgspec.Struct, frozen=True, kw_only=True):
    """An event a workflow publishes for services: ``{prefix}.evt.workflow.{wf}.{name}``."""

    name: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class StepEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A workflow event the step caused, before the router gives it an id and a ts."""

    kind: Literal[
        "started", "transition", "completed", "failed", "expired", "cancelled", "handoff"
    ]
    workflow: str
    run_id: str
    from_state: str | None = None
    to_state: str | None = None
    trigger: str | None = None
    slots_changed: dict[str, Any] = msgspec.field(default_factory=dict)
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class StepResult(msgspec.Struct, kw_only=True):
    """The new state and everything the step says and publishes, in order."""

    state: ConversationState
    replies: list[Reply] = msgspec.field(default_factory=list)
    events: list[StepEvent] = msgspec.field(default_factory=list)
    emits: list[Emit] = msgspec.field(default_factory=list)
