"""The routing rules: which step an input gets, as pure functions.

The router (:mod:`.router`) does the I/O around them: the inbound middleware, the
classifier call, loading and committing the state, publishing, acking. Everything it
decides comes from here:

* :func:`already_handled`: is an input a redelivery of one the state records?
* :func:`needs_classification`: do the rules need the classifier's ranking for a message?
* :func:`message_entities`: the entities of a message that :func:`decide` takes;
* :func:`decide`: the state, the input (a user's :class:`Message` after the inbound
  middleware, or a :class:`WorkflowInput`), the ranked alternatives (or None when
  :func:`needs_classification` said no), a :class:`RoutingPolicy`, the :class:`Engine`,
  the revision the state was read at and the time in; a :class:`Decision` out: what was
  decided, the step (a :class:`StepResult` from the pure engine), and the fields of the
  :class:`Classification` to record, if any;
* :func:`dropped`: the decision for a message the inbound middleware dropped;
* :func:`pending_ask`: did this input's step enter an ``ask`` state?
* :func:`ask_reply`: the ``reply`` input that a service's answer to it (or the failure
  to get one) becomes.

A message goes through these rules, the first that applies wins:

1. a start button (``payload.start``) or a ``/workflow{"slot": value}`` payload text
   naming a workflow **start** s it, with those slots (a run in progress, a handoff
   included, is cancelled first);
2. during a run, a whole-message cancel phrase **cancel** s it, and a restart phrase
   **restart** s it from its initial state, unless the current state has a button of
   that name (the state's own "cancel" wins); during a handoff too;
3. the conversation is handed off to a person: the bot stays **silent**;
4. small talk (a greeting, thanks, goodbye, "what can you do?", "are you a bot?", as
   the whole message, see :mod:`.smalltalk`) is answered (**smalltalk**); a run stays
   where it is and asks its question again;
5. a run other than the fallback's takes the message as its next **step** (its
   entities may fill or correct slots);
6. otherwise the text is classified (empty text counts as unclear): when the top two
   both reach the threshold and are closer than ``clarify_margin``, the user is asked
   to **clarify** ("Did you mean A or B?"); when the best reaches the threshold its
   workflow **start** s (leaving the fallback's run, if the user was in it); else the
   **fallback** handles it (starts, or its run goes on, which hands over to a person
   only while ``agents_available``; with nobody there it says so).

A workflow input moves an active run (**step**; the ``expire`` event **expire** s it);
for an idle conversation it is recorded as handled and otherwise **ignore** d.

No I/O, no clock, no randomness: the same arguments give the same decision, and the
ids in it (run ids) are derived from the input's id and the revision, so a step
computed again after a conflict or a crash names everything the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from msgspec.structs import replace

from commhub.core.engine.fsm import Engine, matches_phrase, normalize_phrase
from commhub.core.envelope import (
    Alternative,
    ClassificationDecision,
    Entity,
    Message,
    Sender,
    WorkflowInput,
    derived_id,
)
from commhub.core.routing.smalltalk import SmallTalk
from commhub.core.routing.state import (
    EXPIRE_EVENT,
    REPLY_EVENT,
    TIMEOUT_EVENT,
    ConversationState,
    PendingAsk,
    Reply,
    StepEvent,
    StepResult,
    Trigger,
    TriggerKind,
)

__all__ = [
    "ASK_SENDER",
    "BUTTON_MODEL",
    "RECENT_INPUTS",
    "Action",
    "ClassificationFields",
    "Decision",
    "RoutingPolicy",
    "already_handled",
    "ask_reply",
    "ask_reply_id",
    "clarify_candidates",
    "decide",
    "dropped",
    "intent_payload",
    "message_entities",
    "message_trigger",
    "needs_classification",
    "pending_ask",
]

RECENT_INPUTS = 16  # earlier input ids a state keeps to recognise late redeliveries
# Rasa's payload text: "/intent" or "/intent{JSON object}" as the whole message.
_INTENT_PAYLOAD_RE = re.compile(r"^/([A-Za-z0-9_-]{1,128})(\{.*\})?$", re.S)
BUTTON_MODEL = "button"  # the "model" a classification chosen by a start button records
ASK_SENDER = Sender(id="commhub-ask", kind="service", name="ask")  # sends ``reply`` inputs

Action = Literal[
    "start", "restart", "step", "cancel", "clarify", "fallback", "silent", "ignore", "expire",
    "smalltalk",
]


@dataclass(frozen=True)
class RoutingPolicy:
    """The settings the rules apply, fixed for a router's lifetime.

    ``workflows`` maps every workflow's name to its description (the title of its
    start button; the name when empty), the fallback included. ``smalltalk`` is the
    small talk in force (its replies, the intents turned off); ``claimed`` the
    workflows' example phrases (normalised), which are theirs, not small talk (a
    workflow trained on "hello there" gets it).
    """

    threshold: float
    clarify_margin: float
    cancel_phrases: tuple[str, ...]
    restart_phrases: tuple[str, ...]
    fallback: str
    workflows: Mapping[str, str]
    smalltalk: SmallTalk = field(default_factory=SmallTalk)
    claimed: frozenset[str] = frozenset()

    @classmethod
    def for_engine(
        cls,
        engine: Engine,
        *,
        threshold: float,
        clarify_margin: float,
        cancel_phrases: Iterable[str],
        restart_phrases: Iterable[str],
        smalltalk: SmallTalk | None = None,
    ) -> RoutingPolicy:
        """The policy for ``engine``'s workflows and fallback."""
        return cls(
            threshold=threshold,
            clarify_margin=clarify_margin,
            cancel_phrases=tuple(cancel_phrases),
            restart_phrases=tuple(restart_phrases),
            fallback=engine.fallback,
            workflows={name: defn.description for name, defn in engine.definitions.items()},
            smalltalk=smalltalk or SmallTalk(),
            claimed=frozenset(normalize_phrase(example)
                              for examples in engine.examples().values()
                              for example in examples),
        )

    def title(self, workflow: str) -> str:
        """What a start button for ``workflow`` says."""
        return self.workflows.get(workflow) or workflow

    def start_buttons(self) -> list[dict[str, Any]]:
        """A start button for every workflow but the fallback, titled by its
        description, in load order: what the bot can do."""
        return [{"title": self.title(name), "payload": {"start": name}}
                for name in self.workflows if name != self.fallback]


@dataclass(frozen=True)
class ClassificationFields:
    """What the :class:`~commhub.core.envelope.Classification` of a message records;
    the router adds the ids, the threshold, the model and the time.

    ``model`` is None for the router's classifier, :data:`BUTTON_MODEL` when a start
    button chose the workflow.
    """

    workflow: str | None
    confidence: float
    alternatives: list[Alternative]
    decision: ClassificationDecision
    model: str | None = None
    entities: list[Entity] = field(default_factory=list)


@dataclass
class Decision:
    """What the rules decided for one input: the action, the step it produced (the new
    state and what to say and publish) and the classification to record, if any."""

    action: Action
    result: StepResult
    classification: ClassificationFields | None = field(default=None)


# -- redeliveries and asks -------------------------------------------------------------
def already_handled(
    state: ConversationState | None, input_id: str
) -> Literal["last", "earlier"] | None:
    """Whether ``state`` records ``input_id`` as handled.

    ``"last"``: it is the last input whose step committed; the stored outbox holds that
    step's outputs, which may not all have gone out (publish them again, then ack).
    ``"earlier"``: it was handled before later inputs of the conversation, whose steps
    committed and published after its own: its outputs went out then, only its ack was
    lost (ack it; running or publishing it again would double or reorder replies).
    None: not handled yet (or so long ago that the state forgot it).
    """
    if state is None:
        return None
    if state.last_input == input_id:
        return "last"
    if input_id in state.recent_inputs:
        return "earlier"
    return None


def ask_reply_id(ask: PendingAsk) -> str:
    """The id of the ``reply`` WorkflowInput that carries the answer to ``ask``
    (derived from the request id, so every router names it the same way)."""
    return derived_id(ask.id, "reply")


def pending_ask(state: ConversationState, input_id: str) -> PendingAsk | None:
    """The service request to make because input ``input_id``'s step entered an ``ask``
    state (the engine derives the request id from the input, run and state), or None
    when the run waits for no request or waits for one an earlier input made."""
    asking = state.asking
    if asking is None or asking.id != derived_id(input_id, state.run_id or "", state.state,
                                                  "ask"):
        return None
    return asking


def ask_reply(
    ask: PendingAsk, conversation: str, body: object, error: str | None, ts: float
) -> WorkflowInput:
    """The ``reply`` WorkflowInput for the answer to ``ask``, which steps the run.

    ``body`` is the service's decoded JSON answer (None when there was none); ``error``
    the failure to get one (``timeout``, ``no_responders``, ``bad_reply``), else None.
    An answer that is not a JSON object is a ``bad_reply``; an object with an ``error``
    key is the service's own ``error``. The input's id is derived from the request id,
    so asking again after a crash yields the same input (and JetStream keeps one copy).
    """
    if error is None and not isinstance(body, dict):
        error, body = "bad_reply", None
    elif error is None and isinstance(body, dict) and "error" in body:
        error = "error"
    return WorkflowInput(
        id=ask_reply_id(ask),
        conversation=conversation,
        event=REPLY_EVENT,
        data={"id": ask.id, "subject": ask.subject, "ok": error is None, "error": error,
              "reply": body},
        sender=ASK_SENDER,
        ts=ts,
    )


# -- messages ----------------------------------------------------------------------
def needs_classification(
    state: ConversationState, message: Message, policy: RoutingPolicy, engine: Engine
) -> bool:
    """True when :func:`decide` needs the classifier's ranking of ``message.text``:
    no earlier rule applies (a start button or payload, a phrase, a handoff, small talk,
    a run taking the message as its step) and the text is not empty (empty text is
    unclear without asking)."""
    if _start_button(message, policy) is not None or _payload_start(message, policy):
        return False
    if _phrase(state, message, policy, engine) is not None or state.handoff:
        return False
    if _small_talk(message, policy) is not None:
        return False
    if state.active and state.workflow != policy.fallback:
        return False
    return bool((message.text or "").strip())


def message_entities(
    state: ConversationState, message: Message, engine: Engine, now: float
) -> list[Entity]:
    """The entities of ``message`` to pass to :func:`decide`, read by the engine as of
    ``now`` (the time the message is handled): none during a handoff (the bot answers
    nothing, and reading costs about a millisecond) nor in a ``/intent{...}`` payload
    text (it gives its values itself)."""
    if state.handoff or intent_payload(message.text) is not None:
        return []
    return engine.extract(message.text, now)


def decide(
    state: ConversationState,
    record: Message | WorkflowInput,
    alternatives: list[Alternative] | None,
    policy: RoutingPolicy,
    engine: Engine,
    revision: int | None,
    now: float,
    *,
    entities: list[Entity] | None = None,
    agents_available: bool = True,
) -> Decision:
    """Decide what ``record`` does to ``state`` (see the module docstring for the rules).

    ``alternatives`` is the classifier's ranking of the message's text, best first; pass
    None when :func:`needs_classification` is False. ``revision`` is the state's KV
    revision (None for a new conversation): run ids are derived from it and the input's
    id. ``now`` stamps the state of a step the engine does not take (silence, ignore).
    ``entities`` are the message text's (the engine finds them when None);
    ``agents_available`` says whether a human agent announced themselves (no handoff
    without one). Raises ValueError when the rules need alternatives and got None.
    """
    if isinstance(record, WorkflowInput):
        decision = _on_input(state, record, engine, now)
    else:
        decision = _on_message(state, record, alternatives, policy, engine, revision, now,
                               entities, agents_available)
    decision.result.state = _remember_input(state, decision.result.state)
    return decision


def dropped(state: ConversationState, input_id: str, now: float) -> Decision:
    """The inbound middleware dropped the message: nothing is said, but the state
    records it as handled, so a redelivered copy is recognised."""
    moved = replace(state, last_input=input_id, updated=now)
    return Decision("ignore", StepResult(state=_remember_input(state, moved)))


def intent_payload(text: str | None) -> tuple[str, dict[str, Any]] | None:
    """Rasa's payload text, ``/intent`` or ``/intent{"slot": value, ...}`` as the whole
    message: the intent and the slot values, or None for any other text (or a
    malformed object)."""
    matched = _INTENT_PAYLOAD_RE.match((text or "").strip())
    if matched is None:
        return None
    data: Any = {}
    if matched.group(2):
        try:
            data = msgspec.json.decode(matched.group(2))
        except msgspec.DecodeError:
            return None
        if not isinstance(data, dict):
            return None
    return matched.group(1), data


def message_trigger(
    message: Message, entities: list[Entity] | None = None, agents: bool = True
) -> Trigger:
    """The engine's trigger for a user's message: a ``button`` when the payload has a
    ``value`` (its text is the value when the message has no text), else a ``message``.
    A ``/intent{...}`` payload text gives its values as the trigger's ``data`` (slot
    values) and no text to answer with."""
    payload = message.payload or {}
    value = payload.get("value")
    text = message.text if message.text is not None else _str_or_none(value)
    data: dict[str, Any] = {}
    given = intent_payload(message.text)
    if given is not None:
        text, data = None, given[1]
    return Trigger(
        id=message.id,
        kind="button" if "value" in payload else "message",
        text=text,
        payload=payload or None,
        data=data,
        ts=message.ts,
        entities=[] if given is not None else entities,
        agents=agents,
    )


def clarify_candidates(
    alternatives: list[Alternative], policy: RoutingPolicy
) -> list[str] | None:
    """The top two workflows when both reach the threshold and are less than
    ``clarify_margin`` apart (too close to guess), else None. Never the fallback, nor a
    workflow the router does not know."""
    if len(alternatives) < 2 or policy.clarify_margin <= 0:
        return None
    first, second = alternatives[0], alternatives[1]
    if second.confidence < policy.threshold:
        return None
    if first.confidence - second.confidence >= policy.clarify_margin:
        return None
    names = [first.workflow, second.workflow]
    if any(n not in policy.workflows or n == policy.fallback for n in names):
        return None
    return names


def _on_message(
    state: ConversationState,
    message: Message,
    alternatives: list[Alternative] | None,
    policy: RoutingPolicy,
    engine: Engine,
    revision: int | None,
    now: float,
    entities: list[Entity] | None,
    agents_available: bool,
) -> Decision:
    if state.channel is None or state.user is None:
        # The conversation's replies go to the channel it began on.
        state = replace(state, channel=message.channel, user=message.sender.id)
    trigger = message_trigger(message, entities, agents_available)
    found = list(entities or [])
    ts = message.ts
    # A start button, a /workflow{...} payload, cancel and restart work in every state,
    # during a handoff too: the user can always leave.
    start = _start_button(message, policy) or _payload_start(message, policy)
    if start is not None:
        picked = ClassificationFields(start, 1.0, [], "button", model=BUTTON_MODEL,
                                      entities=found)
        return Decision("start", _start(engine, state, start, trigger, revision), picked)
    phrase = _phrase(state, message, policy, engine)
    if phrase == "cancel":
        return Decision("cancel", engine.cancel(state, trigger, ts))
    if phrase == "restart":
        run_id = derived_id(trigger.id, revision, "run")
        return Decision("restart", engine.restart(state, trigger, run_id, ts))
    if state.handoff:
        # A person has the conversation: the message is on the bus and recorded, and
        # counts as activity (idle expiry), but the bot says nothing.
        silent = replace(state, last_input=message.id, updated=now, turns=state.turns + 1)
        return Decision("silent", StepResult(state=silent))
    chat = _small_talk(message, policy)
    if chat is not None:
        return Decision("smalltalk", _answer_small_talk(state, trigger, chat, policy, engine,
                                                        ts))
    clarifying = state.workflow == policy.fallback
    if state.active and not clarifying:
        return Decision("step", engine.step(state, trigger, ts))

    if not (message.text or "").strip():
        alternatives = []  # nothing to classify: unclear
    elif alternatives is None:
        raise ValueError(f"message {message.id!r} needs the classifier's alternatives")
    best = alternatives[0] if alternatives else None
    confident = best is not None and best.confidence >= policy.threshold
    confidence = best.confidence if best is not None else 0.0
    close = clarify_candidates(alternatives, policy)
    if close is not None:
        asked = ClassificationFields(None, confidence, alternatives, "clarify", entities=found)
        return Decision("clarify", _clarify(state, trigger, close, policy, ts), asked)
    if confident:
        assert best is not None
        chosen = ClassificationFields(best.workflow, confidence, alternatives, "workflow",
                                      entities=found)
        # Clear text while the fallback asks what they want: leave its run for this one.
        return Decision("start", _start(engine, state, best.workflow, trigger, revision),
                        chosen)
    if clarifying:
        # Still unclear: the fallback's run goes on (it hands over to a person while
        # one is available). Its first unclear message was recorded when it started.
        return Decision("fallback", engine.step(state, trigger, ts))
    unclear = ClassificationFields(None, confidence, alternatives, "fallback", entities=found)
    return Decision("fallback", _start(engine, state, policy.fallback, trigger, revision),
                    unclear)


def _small_talk(message: Message, policy: RoutingPolicy) -> str | None:
    """The small-talk intent of the message, unless a workflow claims the phrase as one
    of its examples."""
    intent = policy.smalltalk.intent(message.text)
    if intent is None or normalize_phrase(message.text or "") in policy.claimed:
        return None
    return intent


def _answer_small_talk(
    state: ConversationState,
    trigger: Trigger,
    intent: str,
    policy: RoutingPolicy,
    engine: Engine,
    ts: float,
) -> StepResult:
    """Answer small talk; a run in progress stays where it is and asks its question
    again (the fallback's too)."""
    talk = policy.smalltalk
    buttons = policy.start_buttons() if talk.lists_workflows(intent) else []
    replies = [Reply(text=talk.reply(intent), buttons=buttons)]
    if state.active:
        replies.extend(engine.question(state))
    moved = replace(state, last_input=trigger.id, updated=ts, turns=state.turns + 1)
    return StepResult(state=moved, replies=replies)


def _payload_start(message: Message, policy: RoutingPolicy) -> str | None:
    """The workflow a ``/workflow{...}`` payload text names, if the router knows it
    (never the fallback)."""
    given = intent_payload(message.text)
    if given is None or given[0] not in policy.workflows or given[0] == policy.fallback:
        return None
    return given[0]


def _start_button(message: Message, policy: RoutingPolicy) -> str | None:
    """The workflow a pressed start button names (the fallback and clarifying
    questions offer them), if the router knows it."""
    start = (message.payload or {}).get("start")
    return start if isinstance(start, str) and start in policy.workflows else None


def _phrase(
    state: ConversationState, message: Message, policy: RoutingPolicy, engine: Engine
) -> Literal["cancel", "restart"] | None:
    """A cancel or restart phrase said during a run, unless the current state offers a
    button of that name (then it is the state's own answer)."""
    text = message.text
    if not state.active or not text or engine.offers(state, text):
        return None
    if matches_phrase(text, policy.cancel_phrases):
        return "cancel"
    if matches_phrase(text, policy.restart_phrases):
        return "restart"
    return None


def _start(
    engine: Engine,
    state: ConversationState,
    workflow: str,
    trigger: Trigger,
    revision: int | None,
) -> StepResult:
    """Start ``workflow``; a run still active is recorded as cancelled first."""
    run_id = derived_id(trigger.id, revision, "run")
    result = engine.start(state, workflow, trigger, run_id, trigger.ts)
    if state.active and state.workflow is not None and state.run_id is not None:
        cancelled = StepEvent(
            kind="cancelled", workflow=state.workflow, run_id=state.run_id,
            from_state=state.state, trigger=trigger.kind,
        )
        result.events.insert(0, cancelled)
    return result


def _clarify(
    state: ConversationState,
    trigger: Trigger,
    names: list[str],
    policy: RoutingPolicy,
    ts: float,
) -> StepResult:
    """Ask "Did you mean A or B?" with a start button for each; the state stays as it
    was (a run in progress, such as the fallback's, goes on if the user types)."""
    titles = [policy.title(n) for n in names]
    buttons = [{"title": title, "payload": {"start": name}}
               for name, title in zip(names, titles, strict=True)]
    reply = Reply(text=f'Did you mean "{titles[0]}" or "{titles[1]}"?', buttons=buttons)
    moved = replace(state, last_input=trigger.id, updated=ts, turns=state.turns + 1)
    return StepResult(state=moved, replies=[reply])


# -- workflow inputs ---------------------------------------------------------------
_INPUT_KINDS: dict[str, TriggerKind] = {TIMEOUT_EVENT: "timeout", REPLY_EVENT: "reply"}


def _on_input(
    state: ConversationState, record: WorkflowInput, engine: Engine, now: float
) -> Decision:
    if not state.active:
        # No run to move (it ended, or never began): recorded as handled, nothing else.
        moved = replace(state, last_input=record.id, updated=now)
        return Decision("ignore", StepResult(state=moved))
    kind = _INPUT_KINDS.get(record.event, "event")
    trigger = Trigger(id=record.id, kind=kind, event=record.event, data=record.data,
                      ts=record.ts)
    if record.event == EXPIRE_EVENT:
        return Decision("expire", engine.expire(state, trigger, record.ts))
    return Decision("step", engine.step(state, trigger, record.ts))


# -- bookkeeping -------------------------------------------------------------------
def _remember_input(before: ConversationState, after: ConversationState) -> ConversationState:
    """``after`` with ``before``'s last input added to the recent ones (when the step
    handled a new input), so that a late redelivery of it is recognised."""
    if before.last_input is None or after.last_input == before.last_input:
        return after
    recent = [*before.recent_inputs, before.last_input][-RECENT_INPUTS:]
    return replace(after, recent_inputs=recent)


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)
