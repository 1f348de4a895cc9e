"""The workflow engine: a pure function from (conversation state, trigger, now) to a step.

No I/O, no asyncio, no clock and no randomness: the router loads the state from KV,
calls :meth:`Engine.start`, :meth:`Engine.step`, :meth:`Engine.cancel`,
:meth:`Engine.restart` or :meth:`Engine.expire`, then stores the returned state and
publishes the replies, events and emits. The same inputs always give the same
:class:`~commhub.core.routing.state.StepResult`, so a redelivered message re-run after a crash
produces the same outputs (and, through derived ids, the same message ids).

Input states are never mutated; every result carries a new :class:`ConversationState`.
User input never raises: it matches a transition, fails a slot's validation (the
``invalid`` text is said, the state stays), or matches nothing (a re-prompt is said).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from typing import Any

from msgspec.structs import replace

from commhub.core.envelope import derived_id
from commhub.core.routing.state import (
    ConversationState,
    Emit,
    PendingAsk,
    Reply,
    StepEvent,
    StepResult,
    Trigger,
)
from commhub.core.workflow import (
    SayDef,
    StateDef,
    TransitionDef,
    WorkflowDef,
    render_template,
    template_fields,
)

__all__ = [
    "CANCELLED",
    "DIDNT_GET_THAT",
    "LOST_TRACK",
    "Engine",
    "matches_phrase",
    "normalize_phrase",
]

DIDNT_GET_THAT = "Sorry, I didn't get that."
CANCELLED = "Okay, I've stopped that. What else can I do for you?"
LOST_TRACK = "Sorry, I lost track of our conversation. Could you say that again?"
_MISSING = object()


class Engine:
    """Runs checked :class:`WorkflowDef` s. Stateless between calls; safe to share.

    ``fallback`` names the workflow the router starts when no workflow is confident
    enough; it is left out of :meth:`examples` and of ``buttons_from: workflows``.
    """

    def __init__(self, definitions: Mapping[str, WorkflowDef], fallback: str = "fallback") -> None:
        self.definitions: dict[str, WorkflowDef] = dict(definitions)
        self.fallback = fallback

    def examples(self) -> dict[str, list[str]]:
        """Training phrases by workflow, leaving out the fallback and workflows without any."""
        return {
            name: list(defn.examples)
            for name, defn in self.definitions.items()
            if name != self.fallback and defn.examples
        }

    # ------------------------------------------------------------------ public steps
    def start(
        self,
        state: ConversationState,
        workflow: str,
        trigger: Trigger,
        run_id: str,
        now: float,
        trigger_name: str | None = None,
    ) -> StepResult:
        """Begin a run of ``workflow`` and enter its initial state.

        The trigger is the message that chose the workflow (its intent phrase), so it is
        recorded but not consumed as an answer. Any run in progress is replaced. If the
        initial state is final the run completes at once and the state is idle again.
        ``trigger_name`` is what the ``started`` event records (default: the trigger's
        kind). Raises KeyError for an unknown workflow (the caller picks the name, not
        the user).
        """
        if workflow not in self.definitions:
            raise KeyError(f"unknown workflow {workflow!r}")
        defn = self.definitions[workflow]
        begun = replace(
            state,
            workflow=workflow,
            state=defn.initial,
            run_id=run_id,
            slots={},
            last_input=trigger.id,
            updated=now,
            turns=state.turns + 1,
        )
        result = StepResult(state=begun)
        started = StepEvent(kind="started", workflow=workflow, run_id=run_id,
                            to_state=defn.initial, trigger=trigger_name or trigger.kind)
        self._enter(defn, defn.initial, result, started, {}, trigger.id, now)
        return result

    def restart(
        self, state: ConversationState, trigger: Trigger, run_id: str, now: float
    ) -> StepResult:
        """Cancel the active run and start its workflow again from the initial state
        (the user said a restart phrase). Raises ValueError if ``state`` is idle."""
        if not state.active or state.workflow not in self.definitions:
            raise ValueError(f"conversation {state.conversation!r} has no run to restart")
        result = self.start(state, state.workflow, trigger, run_id, now, "restart")
        result.events.insert(0, StepEvent(kind="cancelled", workflow=state.workflow,
                                          run_id=state.run_id or "", from_state=state.state,
                                          trigger="restart"))
        return result

    def cancel(self, state: ConversationState, trigger: Trigger, now: float) -> StepResult:
        """End the active run at the user's request (a cancel phrase): a ``cancelled``
        event, the :data:`CANCELLED` reply, and the conversation is idle."""
        moved = replace(state, last_input=trigger.id, updated=now, turns=state.turns + 1)
        result = StepResult(state=_idle(moved))
        if state.active:
            result.events.append(StepEvent(kind="cancelled", workflow=state.workflow or "",
                                           run_id=state.run_id or "", from_state=state.state,
                                           trigger="cancel"))
            result.replies.append(Reply(text=CANCELLED))
        return result

    def expire(self, state: ConversationState, trigger: Trigger, now: float) -> StepResult:
        """End a run that stayed idle too long: an ``expired`` event, nothing said.

        ``trigger.data`` names the ``run_id`` and the ``updated`` time the expiry was
        scheduled for; if the conversation moved since, the expiry is stale and only
        recorded as handled.
        """
        moved = replace(state, last_input=trigger.id, updated=now, turns=state.turns + 1)
        stale = (not state.active or trigger.data.get("run_id") != state.run_id
                 or trigger.data.get("updated") != state.updated)
        if stale:
            # Keep ``updated``: a stale timer is not activity, and must not push the
            # real expiry further away.
            return StepResult(state=replace(moved, updated=state.updated))
        result = StepResult(state=_idle(moved))
        result.events.append(StepEvent(kind="expired", workflow=state.workflow or "",
                                       run_id=state.run_id or "", from_state=state.state,
                                       trigger="expire"))
        return result

    def step(self, state: ConversationState, trigger: Trigger, now: float) -> StepResult:
        """Advance an active run with ``trigger``; raises ValueError if ``state`` is idle.

        The first transition of the current state that matches wins. A message or button
        that matches none gets a re-prompt; an event, timeout or reply that matches none
        is ignored silently. A timeout or reply meant for another state, run or request
        (stale) changes nothing. A run whose workflow or state no longer exists (the
        definitions changed under a stored conversation) fails: the state goes idle and
        the user is asked to repeat.
        """
        if not state.active:
            raise ValueError(f"conversation {state.conversation!r} has no active workflow")
        moved = replace(state, last_input=trigger.id, updated=now, turns=state.turns + 1)
        result = StepResult(state=moved)
        defn = self.definitions.get(state.workflow or "")
        current = defn.states.get(state.state or "") if defn is not None else None
        if defn is None or current is None:
            result.events.append(StepEvent(kind="failed", workflow=state.workflow or "",
                                           run_id=state.run_id or "", from_state=state.state,
                                           trigger=_trigger_name(trigger)))
            result.replies.append(Reply(text=LOST_TRACK))
            result.state = _idle(moved)
            return result
        if self._stale(state, trigger):
            result.state = replace(moved, updated=state.updated)  # a stale timer is no activity
            return result
        elapsed = _timer_elapsed(state, trigger)

        invalid: tuple[TransitionDef, str] | None = None
        for transition in current.on:
            filled = _match(defn, current, transition, trigger, elapsed)
            if filled is None:
                continue
            slot = transition.slot
            if slot is not None:
                ok, value = defn.slots[slot].parse(_message_text(trigger) or "", _utc_date(now))
                if not ok:
                    invalid = invalid or (transition, slot)
                    continue
                filled = {**filled, slot: value}
            tentative = {**state.slots, **filled}
            if transition.if_ is not None and not transition.if_.holds(tentative):
                continue
            event = StepEvent(kind="transition", workflow=defn.name, run_id=state.run_id or "",
                              from_state=state.state, to_state=transition.to,
                              trigger=_trigger_name(trigger))
            result.state = replace(moved, state=transition.to, slots=tentative)
            self._enter(defn, transition.to, result, event, state.slots, trigger.id, now)
            return result

        if trigger.kind == "timeout":
            # This timer fired and nothing took it: the next longer one is due next.
            later = current.next_timeout(elapsed)
            result.state = replace(moved, timeout_at=None if later is None
                                   else state.entered + later)
            return result
        if trigger.kind == "reply":
            return _with_state(result, asking=None)  # answered; nothing listens for it
        if trigger.kind == "event":
            return result  # a service event this state does not expect
        buttons = self._buttons(current, state.slots)
        if invalid is not None:
            transition, slot = invalid
            text = transition.invalid or defn.slots[slot].default_invalid()
            result.replies.append(Reply(text=render_template(text, state.slots), buttons=buttons))
        elif current.reprompt is not None:
            result.replies.append(
                Reply(text=render_template(current.reprompt, state.slots), buttons=buttons))
        else:
            result.replies.append(Reply(text=DIDNT_GET_THAT))
            result.replies.extend(self._say(current.say, state.slots))
        return result

    def offers(self, state: ConversationState, text: str) -> bool:
        """True when the current state has a button whose value or title is ``text``
        (case-insensitive): such a state's own "cancel" button wins over the global
        cancel phrase."""
        defn = self.definitions.get(state.workflow or "")
        current = defn.states.get(state.state or "") if defn is not None else None
        if current is None:
            return False
        typed = normalize_phrase(text)
        values = {normalize_phrase(t.button) for t in current.on if t.button is not None}
        for say in current.say:
            for button in say.buttons:
                if normalize_phrase(button.value) in values:
                    values.add(normalize_phrase(button.title))
        return typed in values

    def _stale(self, state: ConversationState, trigger: Trigger) -> bool:
        """A timer or reply scheduled for another run, state or request is ignored.

        The router passes what a timeout was scheduled for in ``trigger.data``
        (``run_id``, ``state``, ``entered``, ``at``) and the request id of a reply
        (``id``); entering a state again gives it a new ``entered`` time, so an old
        timer of the same state is stale too.
        """
        data = trigger.data
        if trigger.kind == "timeout":
            expected = (("state", state.state), ("run_id", state.run_id),
                        ("entered", state.entered), ("at", state.timeout_at))
            return any(key in data and data[key] != current for key, current in expected)
        if trigger.kind == "reply":
            return state.asking is None or data.get("id") != state.asking.id
        return False

    # ------------------------------------------------------------------ entering states
    def _enter(
        self,
        defn: WorkflowDef,
        name: str,
        result: StepResult,
        first_event: StepEvent,
        before: Mapping[str, Any],
        input_id: str,
        now: float,
    ) -> None:
        """Run ``name``'s entry actions on ``result`` (set, say, emit, ask); arm its
        timeout; hand off if it is a handoff state; finish the run if it is final."""
        target = defn.states[name]
        slots = dict(result.state.slots)
        for slot, value in target.set.items():
            slots[slot] = _render_value(value, slots)
        changed = {k: slots.get(k) for k in sorted(set(slots) | set(before))
                   if slots.get(k, _MISSING) != before.get(k, _MISSING)}
        result.events.append(replace(first_event, slots_changed=changed))
        result.replies.extend(self._say(target.say, slots))
        result.emits.extend(
            Emit(name=emit.name, data=_render_value(emit.data, slots)) for emit in target.emit
        )
        run_id = result.state.run_id or ""
        asking = None
        if target.ask is not None:
            asking = PendingAsk(
                # Derived from the input, run and state: a recomputed step asks with the
                # same id, which services can use to drop a repeated request.
                id=derived_id(input_id, run_id, name, "ask"),
                subject=target.ask.subject,
                data=_render_value(target.ask.data, slots),
                timeout=target.ask.timeout,
            )
        timeout = target.timeout
        handed_off = result.state.handoff  # already with agents: do not announce it again
        result.state = replace(result.state, slots=slots, handoff=target.handoff, entered=now,
                               timeout_at=None if timeout is None else now + timeout,
                               asking=asking, expires=target.expires)
        if target.handoff and not handed_off:
            state = result.state
            result.events.append(StepEvent(
                kind="handoff", workflow=defn.name, run_id=run_id, to_state=name,
                trigger=first_event.trigger,
                data={"channel": state.channel, "user": state.user, "slots": slots},
            ))
        if target.final:
            result.events.append(StepEvent(kind="completed", workflow=defn.name,
                                           run_id=run_id, to_state=name,
                                           trigger=first_event.trigger))
            result.state = _idle(result.state)

    def _say(self, says: list[SayDef], slots: Mapping[str, Any]) -> list[Reply]:
        return [Reply(text=render_template(say.text, slots), buttons=self._say_buttons(say, slots))
                for say in says]

    def _say_buttons(self, say: SayDef, slots: Mapping[str, Any]) -> list[dict[str, Any]]:
        buttons: list[dict[str, Any]] = [
            {"title": render_template(b.title, slots), "payload": {"value": b.value}}
            for b in say.buttons
        ]
        if say.buttons_from == "workflows":
            buttons.extend(
                {"title": defn.description or name, "payload": {"start": name}}
                for name, defn in self.definitions.items()
                if name != self.fallback
            )
        return buttons

    def _buttons(self, state: StateDef, slots: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Every button the state offers, repeated under an invalid/re-prompt answer."""
        return [button for say in state.say for button in self._say_buttons(say, slots)]


def _match(
    defn: WorkflowDef,
    current: StateDef,
    transition: TransitionDef,
    trigger: Trigger,
    elapsed: float,
) -> dict[str, Any] | None:
    """Slots the trigger fills if ``transition``'s trigger matches it (before slot
    validation and guard), else None. Messages and button presses match both ``message``
    and ``button`` triggers: a typed "yes" presses the yes button, a pressed button is a
    message whose text is its value."""
    kind = transition.kind
    if kind in ("message", "button") and trigger.kind not in ("message", "button"):
        return None
    if kind == "message":
        assert transition.message is not None
        pattern = transition.message.match
        if pattern is not None and re.search(
            pattern, _message_text(trigger) or "", re.IGNORECASE
        ) is None:
            return None
        return {}
    if kind == "button":
        assert transition.button is not None
        value = _button_value(current, trigger)
        matched = value is not None and value.casefold() == transition.button.casefold()
        return {} if matched else None
    if kind == "event":
        if trigger.kind != "event" or trigger.event != transition.event:
            return None
        return {k: v for k, v in trigger.data.items() if k in defn.slots}
    if kind == "timeout":
        assert transition.timeout is not None
        # Only the timers that are due: a state may have several (remind, give up).
        due = trigger.kind == "timeout" and transition.timeout <= elapsed + 1e-6
        return {} if due else None
    if kind == "reply":
        if trigger.kind != "reply":
            return None
        ok = bool(trigger.data.get("ok"))
        wanted = transition.reply
        if not ((wanted == "ok" and ok) or (wanted == "error" and not ok)
                or (wanted == "timeout" and not ok and trigger.data.get("error") == "timeout")):
            return None
        answer = trigger.data.get("reply")
        if not isinstance(answer, dict):
            return {}
        return {k: v for k, v in answer.items() if k in defn.slots}
    return None


def _timer_elapsed(state: ConversationState, trigger: Trigger) -> float:
    """For a timeout trigger, how long the state had waited when the timer was due."""
    if trigger.kind != "timeout":
        return 0.0
    at = trigger.data.get("at")
    return (float(at) if isinstance(at, int | float) else trigger.ts) - state.entered


def _with_state(result: StepResult, **changes: Any) -> StepResult:
    """``result`` with its state's fields replaced."""
    result.state = replace(result.state, **changes)
    return result


def normalize_phrase(text: str) -> str:
    """Text as phrases are compared: case-folded, punctuation dropped, spaces collapsed
    (``"Start over!"`` is ``"start over"``)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def matches_phrase(text: str | None, phrases: Iterable[str]) -> bool:
    """True when the whole ``text`` is one of ``phrases`` (see :func:`normalize_phrase`):
    "stop" matches, "please stop the emails" does not."""
    if not text:
        return False
    typed = normalize_phrase(text)
    return bool(typed) and any(typed == normalize_phrase(p) for p in phrases)


def _utc_date(now: float) -> dt.date:
    """The UTC calendar day of ``now``: what "today" means to a date slot (UTC, so the
    result does not depend on the machine's time zone)."""
    return dt.datetime.fromtimestamp(now, dt.UTC).date()


def _idle(state: ConversationState) -> ConversationState:
    return replace(state, workflow=None, state=None, run_id=None, slots={}, handoff=False,
                   entered=0.0, timeout_at=None, asking=None, expires=True)


def _trigger_name(trigger: Trigger) -> str:
    """What a WorkflowEvent records as its trigger: the event's name, the kind, or
    ``reply.ok`` / ``reply.error`` / ``reply.timeout`` for an answer to ``ask``."""
    if trigger.kind == "event":
        return trigger.event or "event"
    if trigger.kind == "reply":
        if trigger.data.get("ok"):
            return "reply.ok"
        return "reply.timeout" if trigger.data.get("error") == "timeout" else "reply.error"
    return trigger.kind


def _message_text(trigger: Trigger) -> str | None:
    """A message's text; for a pressed button, its value (so a slot can take it)."""
    value = (trigger.payload or {}).get("value")
    if value is not None and not isinstance(value, dict | list):
        return str(value)
    return trigger.text


def _button_value(state: StateDef, trigger: Trigger) -> str | None:
    """The button value a trigger stands for: a payload's ``value``, or typed text equal
    to a button's value or title in the current state (case-insensitive)."""
    value = (trigger.payload or {}).get("value")
    if value is not None and not isinstance(value, dict | list):
        return str(value)
    typed = (trigger.text or "").strip().casefold()
    if not typed:
        return None
    for say in state.say:
        for button in say.buttons:
            if typed in (button.value.casefold(), button.title.casefold()):
                return button.value
    return typed


def _render_value(value: Any, slots: Mapping[str, Any]) -> Any:
    """Render templates inside ``set``/``emit`` values; ``"{slot}"`` alone keeps its type."""
    if isinstance(value, str):
        fields = template_fields(value)
        if len(fields) == 1 and value == f"{{{fields[0]}}}":
            return slots.get(fields[0])
        return render_template(value, slots)
    if isinstance(value, dict):
        return {k: _render_value(v, slots) for k, v in value.items()}
    if isinstance(value, list):
        return [_render_value(v, slots) for v in value]
    return value
