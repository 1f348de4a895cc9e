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

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from msgspec.structs import replace

from commhub.core.engine import entities as entity_extractor
from commhub.core.envelope import Entity, derived_id
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
    ButtonDef,
    SayDef,
    SlotDef,
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
    "UPDATED",
    "Engine",
    "matches_phrase",
    "normalize_phrase",
]

DIDNT_GET_THAT = "Sorry, I didn't get that."
CANCELLED = "Okay, I've stopped that. What else can I do for you?"
LOST_TRACK = "Sorry, I lost track of our conversation. Could you say that again?"
UPDATED = "Got it, I've changed that."
_MISSING = object()
_YES = frozenset({"yes", "y", "yeah", "yep", "yes please", "correct", "right", "that s right",
                  "sure", "ok", "okay"})
_NO = frozenset({"no", "n", "nope", "no thanks", "wrong"})
# A message that begins with one of these corrects an earlier answer before it answers
# the current question: "Actually, make it five" is no name.
_CORRECTION_CUES = ("actually", "no", "sorry", "wait", "oops", "make it", "change it",
                    "i meant", "i mean", "instead")
_CONFIRM_BUTTONS = [ButtonDef(title="Yes", value="yes"), ButtonDef(title="No", value="no")]


class Engine:
    """Runs checked :class:`WorkflowDef` s. Stateless between calls; safe to share.

    ``fallback`` names the workflow the router starts when no workflow is confident
    enough; it is left out of :meth:`examples` and of ``buttons_from: workflows``.
    ``tz`` is the time zone relative dates are read in ("tomorrow").
    """

    def __init__(
        self, definitions: Mapping[str, WorkflowDef], fallback: str = "fallback",
        tz: str = "UTC",
    ) -> None:
        self.definitions: dict[str, WorkflowDef] = dict(definitions)
        self.fallback = fallback
        self.tz = tz
        # Every choice slot's phrases by entity kind (slots of one name share them).
        self.lexicon: dict[str, dict[str, str]] = {}
        for defn in self.definitions.values():
            for name, slot in defn.slots.items():
                if slot.type == "choice":
                    kind = slot.entity_kind(name) or name
                    self.lexicon.setdefault(kind, {}).update(slot.lexicon())

    def extract(self, text: str | None, now: float) -> list[Entity]:
        """The entities in ``text`` said at ``now``, in the engine's time zone, with
        every choice slot's lexicon (see :mod:`commhub.core.engine.entities`)."""
        if not text:
            return []
        return entity_extractor.extract(text, now, self.tz, self.lexicon)

    def _entities(self, trigger: Trigger, now: float) -> list[Entity]:
        if trigger.kind not in ("message", "button"):
            return []
        if trigger.entities is not None:
            return trigger.entities
        return self.extract(_message_text(trigger), now)

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
        # "Table for four tomorrow at 8pm": the message that chose the workflow fills
        # the slots that take entities; their questions are passed over.
        prefill = _fills(defn, {}, self._entities(trigger, now), self._given(defn, trigger, now),
                         overwrite=False)
        begun = replace(
            state,
            workflow=workflow,
            state=defn.initial,
            run_id=run_id,
            slots=prefill,
            last_input=trigger.id,
            updated=now,
            turns=state.turns + 1,
            prefilled=sorted(prefill),
            confirming=None,
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
        spoken = trigger.kind in ("message", "button")
        entities = self._entities(trigger, now)
        given = self._given(defn, trigger, now)
        if spoken and state.confirming is not None:
            confirmed = self._confirmation(defn, current, state, moved, trigger, now)
            if confirmed is not None:
                return confirmed
            moved = replace(moved, confirming=None)  # anything else answers the question
            result.state = moved

        if spoken and _corrects(_message_text(trigger)):
            corrected = self._correct(defn, current, state, moved, entities, given, trigger, now)
            if corrected is not None:
                return corrected
        invalid: tuple[TransitionDef, str] | None = None
        for transition in current.on:
            filled = _match(defn, current, transition, trigger, elapsed)
            if filled is None:
                continue
            if not trigger.agents and defn.states[transition.to].handoff and not current.handoff:
                continue  # no human agent is there to hand over to
            slot = transition.slot
            answered: Entity | None = None
            if slot is not None:
                slot_def = defn.slots[slot]
                source = "button" if trigger.kind == "button" else "answer"
                if source not in slot_def.fill:
                    continue
                if slot in given:
                    ok, value = True, given[slot]  # named with the message: /inform{...}
                else:
                    ok, value = slot_def.parse(_message_text(trigger) or "", entities)
                if not ok:
                    invalid = invalid or (transition, slot)
                    continue
                filled = {**filled, slot: value}
                answered = _entity_of(slot_def, slot, entities, value)
            tentative = {**state.slots, **filled}
            if transition.if_ is not None and not transition.if_.holds(tentative):
                continue
            # The other values the message names fill the slots still empty.
            rest = [e for e in entities if e is not answered]
            extra = _fills(defn, tentative, rest, given, overwrite=False,
                           exclude={slot} if slot else set())
            tentative.update(extra)
            prefilled = sorted((set(state.prefilled) | set(extra)) - set(filled))
            event = StepEvent(kind="transition", workflow=defn.name, run_id=state.run_id or "",
                              from_state=state.state, to_state=transition.to,
                              trigger=_trigger_name(trigger))
            result.state = replace(moved, state=transition.to, slots=tentative,
                                   prefilled=prefilled)
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
        corrected = self._correct(defn, current, state, moved, entities, given, trigger, now)
        if corrected is not None:
            return corrected
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

    def _given(self, defn: WorkflowDef, trigger: Trigger, now: float) -> dict[str, Any]:
        """Slot values a message names explicitly (``/intent{"slot": value}``), each
        validated by its slot's type; values that do not fit are left out."""
        if trigger.kind not in ("message", "button") or not trigger.data:
            return {}
        given: dict[str, Any] = {}
        for name, value in trigger.data.items():
            slot = defn.slots.get(name)
            if slot is None or value is None or isinstance(value, dict | list):
                continue
            text = str(value)
            ok, parsed = slot.parse(text, self.extract(text, now))
            if ok:
                given[name] = parsed
        return given

    def _correct(
        self,
        defn: WorkflowDef,
        current: StateDef,
        state: ConversationState,
        moved: ConversationState,
        entities: Sequence[Entity],
        given: Mapping[str, Any],
        trigger: Trigger,
        now: float,
    ) -> StepResult | None:
        """A message that answers nothing here may change what was said before
        ("Actually, make it five" while the time is asked; "no, the 15th" at the
        confirmation): its entities replace the values of the slots that take them,
        and the current state is entered again (its question asked again). None when
        the message changes no slot."""
        asked = _asked_slot(current)
        changes = {k: v for k, v in _fills(defn, state.slots, entities, given, overwrite=True,
                                           exclude={asked} if asked else set()).items()
                   if state.slots.get(k, _MISSING) != v}
        if not changes:
            return None
        result = StepResult(state=moved)
        newly = {k for k in changes if state.slots.get(k) is None}
        result.state = replace(moved, slots={**state.slots, **changes},
                               prefilled=sorted(set(state.prefilled) | newly))
        result.replies.append(Reply(text=UPDATED))
        event = StepEvent(kind="transition", workflow=defn.name, run_id=state.run_id or "",
                          from_state=state.state, to_state=state.state,
                          trigger=_trigger_name(trigger))
        self._enter(defn, state.state or defn.initial, result, event, state.slots, trigger.id,
                    now)
        return result

    def _confirmation(
        self,
        defn: WorkflowDef,
        current: StateDef,
        state: ConversationState,
        moved: ConversationState,
        trigger: Trigger,
        now: float,
    ) -> StepResult | None:
        """The answer to "A table for 4, right?" (a prefilled slot's ``confirm``): yes
        takes the question's transition with that value, no clears it and asks the
        question. None for any other message, which answers the question itself."""
        slot = state.confirming or ""
        said = normalize_phrase(_message_text(trigger) or "")
        result = StepResult(state=replace(moved, confirming=None))
        if said in _YES:
            transition = _slot_transition(current, slot, state.slots)
            if transition is None:
                return None
            event = StepEvent(kind="transition", workflow=defn.name, run_id=state.run_id or "",
                              from_state=state.state, to_state=transition.to,
                              trigger=_trigger_name(trigger))
            result.state = replace(result.state, state=transition.to)
            self._enter(defn, transition.to, result, event, state.slots, trigger.id, now)
            return result
        if said in _NO:
            slots = {k: v for k, v in state.slots.items() if k != slot}
            result.state = replace(result.state, slots=slots)
            result.replies.extend(self._say(current.say, slots))
            return result
        return None

    def question(self, state: ConversationState) -> list[Reply]:
        """What the current state asks, said again after an aside (small talk): its
        ``say`` (or its confirmation of a prefilled value), with its buttons; while its
        ``ask`` is pending, its ``reprompt`` if it has one (saying "Let me look up..."
        again would read as a second lookup); nothing for an idle conversation or a
        state that no longer exists."""
        defn = self.definitions.get(state.workflow or "")
        current = defn.states.get(state.state or "") if defn is not None else None
        if defn is None or current is None:
            return []
        if state.asking is not None and current.reprompt is not None:
            return [Reply(text=render_template(current.reprompt, state.slots),
                          buttons=self._buttons(current, state.slots))]
        if state.confirming is not None and state.confirming == _asked_slot(current):
            text = defn.slots[state.confirming].confirm or ""
            return self._say([SayDef(text=text, buttons=_CONFIRM_BUTTONS)], state.slots)
        return self._say(current.say, state.slots)

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
        timeout; hand off if it is a handoff state; finish the run if it is final.

        A state that asks for a slot filled from an entity before its question came is
        passed over: its question's transition is taken with that value (events record
        the state entered and left, trigger ``prefilled``), and its actions do not run.
        When the slot has a ``confirm`` text, the state is entered and says that
        instead of its question, with Yes/No buttons.
        """
        for _ in range(len(defn.states)):
            target = defn.states[name]
            asked = _asked_slot(target)
            if asked is None or asked not in result.state.prefilled:
                break
            prefilled = [p for p in result.state.prefilled if p != asked]
            if defn.slots[asked].confirm is not None:
                result.state = replace(result.state, prefilled=prefilled, confirming=asked)
                break
            transition = _slot_transition(target, asked, result.state.slots)
            if transition is None:
                break
            slots = result.state.slots
            changed = {k: slots.get(k) for k in sorted(set(slots) | set(before))
                       if slots.get(k, _MISSING) != before.get(k, _MISSING)}
            result.events.append(replace(first_event, slots_changed=changed))
            first_event = StepEvent(kind="transition", workflow=defn.name,
                                    run_id=result.state.run_id or "", from_state=name,
                                    to_state=transition.to, trigger="prefilled")
            result.state = replace(result.state, state=transition.to, prefilled=prefilled)
            before, name = slots, transition.to
        target = defn.states[name]
        slots = dict(result.state.slots)
        for slot, value in target.set.items():
            slots[slot] = _render_value(value, slots)
        changed = {k: slots.get(k) for k in sorted(set(slots) | set(before))
                   if slots.get(k, _MISSING) != before.get(k, _MISSING)}
        result.events.append(replace(first_event, slots_changed=changed))
        confirming = result.state.confirming
        if confirming is not None and confirming == _asked_slot(target):
            text = defn.slots[confirming].confirm or ""
            result.replies.extend(self._say([SayDef(text=text, buttons=_CONFIRM_BUTTONS)], slots))
        else:
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
    return bool(typed) and any(typed == _normalized_phrase(p) for p in phrases)


@functools.lru_cache(maxsize=4096)
def _normalized_phrase(phrase: str) -> str:
    """:func:`normalize_phrase` of a configured phrase, kept: the router compares every
    message of a run with the cancel and restart phrases, twice a step, and normalizing
    them each time was 20 us a step. Phrases come from the configuration and the
    workflows, a bounded set; the cache bounds it anyway. Thread-safe (lru_cache)."""
    return normalize_phrase(phrase)


def _idle(state: ConversationState) -> ConversationState:
    return replace(state, workflow=None, state=None, run_id=None, slots={}, handoff=False,
                   entered=0.0, timeout_at=None, asking=None, expires=True, prefilled=[],
                   confirming=None)


def _corrects(text: str | None) -> bool:
    """Whether a message begins like a correction ("actually", "no, ...", "make it")."""
    said = normalize_phrase(text or "")
    return any(said == cue or said.startswith(cue + " ") for cue in _CORRECTION_CUES)


def _asked_slot(state: StateDef) -> str | None:
    """The slot a state asks for: that of its first ``message: {slot}`` transition."""
    return next((t.slot for t in state.on if t.slot is not None), None)


def _slot_transition(
    state: StateDef, slot: str, slots: Mapping[str, Any]
) -> TransitionDef | None:
    """The first transition of ``state`` that fills ``slot`` and whose guard holds with
    the slots as they are: where an answer already given leads."""
    for transition in state.on:
        if transition.slot == slot and (transition.if_ is None or transition.if_.holds(slots)):
            return transition
    return None


def _fills(
    defn: WorkflowDef,
    slots: Mapping[str, Any],
    entities: Sequence[Entity],
    given: Mapping[str, Any],
    *,
    overwrite: bool,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The slots a message's entities and explicitly given values fill: each slot that
    takes entities (``fill: [entity]``) gets the first unused entity of its kind that
    is a valid value, in the order slots are declared; ``given`` values (already
    validated) fill any slot. Slots with a value are left alone unless ``overwrite``;
    ``exclude`` is never filled from entities."""
    fills: dict[str, Any] = {}
    used: set[int] = set()
    for name, slot in defn.slots.items():
        if name in exclude or name in given or "entity" not in slot.fill:
            continue
        if not overwrite and slots.get(name) is not None:
            continue
        kind = slot.entity_kind(name)
        for i, entity in enumerate(entities):
            if i in used or entity.kind != kind:
                continue
            ok, value = slot.accept(entity)
            if ok:
                fills[name] = value
                used.add(i)
                break
    for name, value in given.items():
        if overwrite or slots.get(name) is None:
            fills[name] = value
    return fills


def _entity_of(slot: SlotDef, name: str, entities: Sequence[Entity], value: Any) -> Entity | None:
    """The entity an answer's value came from, so it fills no other slot."""
    kind = slot.entity_kind(name)
    return next((e for e in entities if e.kind == kind and slot.accept(e)[1] == value), None)


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
