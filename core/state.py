"""Conversation state and the values a workflow step consumes and produces.

Plain data, no I/O: the FSM engine (``fsm.py``) is a pure function from a state and a
trigger to a :class:`StepResult`; the router does the I/O around it (KV, bus). The state
is stored as JSON in the KV bucket under the conversation id.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ["ConversationState", "Trigger", "Reply", "Emit", "StepEvent", "StepResult"]


class ConversationState(msgspec.Struct, kw_only=True):
    """Where one conversation is. ``workflow`` is None between workflow runs.

    ``last_input`` is the id of the last inbound message or workflow input whose step
    was committed: a redelivered copy of it is recognised and not run twice.
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

    @property
    def active(self) -> bool:
        return self.workflow is not None


TriggerKind = Literal["message", "button", "event", "timeout"]


class Trigger(msgspec.Struct, frozen=True, kw_only=True):
    """What moves a workflow: a user's text, a pressed button, a service event, a timeout.

    ``id`` is the id of the inbound message or workflow input; derived ids of the step's
    outputs are built from it, so a re-run step yields the same ids.
    """

    id: str
    kind: TriggerKind
    text: str | None = None
    payload: dict[str, Any] | None = None
    event: str | None = None
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    ts: float = 0.0


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

    kind: Literal["started", "transition", "completed", "failed", "expired", "cancelled"]
    workflow: str
    run_id: str
    from_state: str | None = None
    to_state: str | None = None
    trigger: str | None = None
    slots_changed: dict[str, Any] = msgspec.field(default_factory=dict)


class StepResult(msgspec.Struct, kw_only=True):
    """The new state and everything the step says and publishes, in order."""

    state: ConversationState
    replies: list[Reply] = msgspec.field(default_factory=list)
    events: list[StepEvent] = msgspec.field(default_factory=list)
    emits: list[Emit] = msgspec.field(default_factory=list)
