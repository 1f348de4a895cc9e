"""The routing rules as pure functions: one table row per rule, no nats-server.

Each row gives a conversation state, an input and the classifier's ranking (when the
rules ask for one), and says what the rules decide: the action, where the conversation
is afterwards, the classification recorded and the first reply.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from commhub.core.config import DEFAULT_CANCEL_PHRASES, DEFAULT_RESTART_PHRASES
from commhub.core.engine.fsm import CANCELLED, Engine
from commhub.core.envelope import Alternative, Message, Sender, WorkflowInput, derived_id
from commhub.core.routing import rules
from commhub.core.routing.rules import (
    BUTTON_MODEL,
    RECENT_INPUTS,
    Decision,
    RoutingPolicy,
    already_handled,
    decide,
    dropped,
    needs_classification,
    pending_ask,
)
from commhub.core.routing.state import EXPIRE_EVENT, ConversationState
from commhub.core.workflow import WorkflowDef, load_workflows
from commhub.workflows.builtin import DEFINITIONS

ENGINE = Engine(load_workflows([DEFINITIONS]))
POLICY = RoutingPolicy.for_engine(
    ENGINE, threshold=0.35, clarify_margin=0.1,
    cancel_phrases=DEFAULT_CANCEL_PHRASES, restart_phrases=DEFAULT_RESTART_PHRASES,
)
NOW = 1000.0
REVISION = 7


# -- states -------------------------------------------------------------------------
def idle() -> ConversationState:
    return ConversationState(conversation="c1", channel="ws", user="u1", last_input="m0",
                             turns=2, updated=900.0)


def at(workflow: str, state: str, **fields: Any) -> ConversationState:
    return msgspec.structs.replace(idle(), workflow=workflow, state=state, run_id="run0",
                                   **fields)


BOOKING = at("book_table", "ask_party_size")
CONFIRM = at("book_table", "confirm", slots={"party_size": 2, "day": "2030-01-01",
                                              "time": "19:30", "name": "Ann",
                                              "email": "ann@example.com"})
CLARIFYING = at("fallback", "clarify")
HANDED_OFF = at("fallback", "waiting_for_agent", handoff=True)


# -- inputs -------------------------------------------------------------------------
def msg(text: str | None, payload: dict[str, Any] | None = None) -> Message:
    return Message(id="m1", conversation="c1", channel="ws", direction="in",
                   sender=Sender(id="u1"), text=text, payload=payload, ts=950.0)


def start(workflow: str) -> Message:
    return msg(None, {"start": workflow})


def wf(event: str, data: dict[str, Any] | None = None) -> WorkflowInput:
    return WorkflowInput(id="w1", conversation="c1", event=event, data=data or {}, ts=960.0)


def ranked(*pairs: tuple[str, float]) -> list[Alternative]:
    return [Alternative(name, confidence) for name, confidence in pairs]


CLEAR = ranked(("book_table", 0.8), ("order_status", 0.1))
UNCLEAR = ranked(("support_request", 0.2), ("book_table", 0.1))
CLOSE = ranked(("book_table", 0.46), ("order_status", 0.41), ("support_request", 0.13))


@dataclass(frozen=True)
class Row:
    """One rule: given a state, an input and a ranking, the decision expected.

    ``alternatives`` is what the classifier would say; the test passes it only when
    :func:`needs_classification` asks (``classify`` says whether it must).
    """

    name: str
    state: ConversationState
    record: Message | WorkflowInput
    alternatives: list[Alternative] | None
    classify: bool
    action: rules.Action
    workflow: str | None  # the active workflow afterwards
    at: str | None  # its state afterwards
    decision: str | None  # the classification's decision recorded, if any
    reply: str | None  # the start of the first reply (None: nothing said)
    agents: bool = True  # a human agent is available


ROWS = [
    Row("a start button starts its workflow", idle(), start("order_status"), None, False,
        "start", "order_status", "ask_order", "button", "What is your order number?"),
    Row("a start button during a run replaces the run", BOOKING, start("order_status"),
        None, False, "start", "order_status", "ask_order", "button", "What is your order"),
    Row("a start button naming no workflow is unclear", idle(), start("no_such"), None,
        False, "fallback", "fallback", "clarify", "fallback", "Sorry, I'm not sure"),
    Row("a cancel phrase ends the run", BOOKING, msg("Stop!"), None, False,
        "cancel", None, None, None, CANCELLED),
    Row("a restart phrase starts the run again", at("book_table", "ask_day",
        slots={"party_size": 4}), msg("start over"), None, False,
        "restart", "book_table", "ask_party_size", None, "How many people"),
    Row("a state's own button named like a phrase wins", CONFIRM, msg("cancel"), None,
        False, "step", None, None, None, "No problem, I haven't booked anything."),
    Row("a phrase with no run is classified like any text", idle(), msg("stop"),
        UNCLEAR, True, "fallback", "fallback", "clarify", "fallback", "Sorry, I'm not"),
    Row("an active workflow takes the message as its step", BOOKING, msg("4"), None,
        False, "step", "book_table", "ask_day", None, "Which day"),
    Row("a message over the threshold starts its workflow", idle(),
        msg("book a table"), CLEAR, True,
        "start", "book_table", "ask_party_size", "workflow", "How many people"),
    Row("a message under the threshold gets the fallback", idle(), msg("blue elephants"),
        UNCLEAR, True, "fallback", "fallback", "clarify", "fallback", "Sorry, I'm not"),
    Row("two close candidates get a clarifying question", idle(), msg("my table order"),
        CLOSE, True, "clarify", None, None, "clarify",
        'Did you mean "Book a table at the restaurant" or "Check the status of an order"?'),
    Row("clear text while clarifying leaves the fallback for its workflow", CLARIFYING,
        msg("book a table"), CLEAR, True,
        "start", "book_table", "ask_party_size", "workflow", "How many people"),
    Row("unclear text while clarifying hands over while an agent is there", CLARIFYING,
        msg("purple"), UNCLEAR, True,
        "fallback", "fallback", "waiting_for_agent", None, "Let me hand you over"),
    Row("unclear text while clarifying, nobody there: the bot says so and keeps it",
        CLARIFYING, msg("purple"), UNCLEAR, True,
        "fallback", None, None, None, "Sorry, I still don't understand, and no colleague",
        agents=False),
    Row("a greeting is answered with what the bot can do", idle(), msg("hello"), None,
        False, "smalltalk", None, None, None, "Hello! I can help with:"),
    Row("what's up? is a greeting too", idle(), msg("what's up?"), None, False,
        "smalltalk", None, None, None, "Hello!"),
    Row("a greeting during a booking leaves the booking where it was", BOOKING,
        msg("Hi!"), None, False, "smalltalk", "book_table", "ask_party_size", None,
        "Hello!"),
    Row("thanks", idle(), msg("thanks a lot"), None, False, "smalltalk", None, None, None,
        "You're welcome!"),
    Row("goodbye", idle(), msg("bye"), None, False, "smalltalk", None, None, None,
        "Goodbye!"),
    Row("what can you do? lists the workflows", CLARIFYING, msg("what can you do?"), None,
        False, "smalltalk", "fallback", "clarify", None, "I can help with:"),
    Row("are you a bot?", idle(), msg("Are you a bot?"), None, False, "smalltalk", None,
        None, None, "Yes, I'm an automated assistant."),
    Row("a greeting inside a request is the request", idle(),
        msg("hello, I'd like to book a table"), CLEAR, True,
        "start", "book_table", "ask_party_size", "workflow", "How many people"),
    Row("a /workflow{...} payload starts it with its slots", idle(),
        msg('/book_table{"party_size": 4, "day": "2030-01-01"}'), None, False,
        "start", "book_table", "ask_time", "button", "At what time?"),
    Row("a /intent{...} payload during a run fills its slots", BOOKING,
        msg('/inform{"party_size": 3}'), None, False,
        "step", "book_table", "ask_day", None, "Which day"),
    Row("close candidates while clarifying ask again, the fallback stays", CLARIFYING,
        msg("my table order"), CLOSE, True,
        "clarify", "fallback", "clarify", "clarify", "Did you mean"),
    Row("the bot is silent during a handoff", HANDED_OFF, msg("hello?"), None, False,
        "silent", "fallback", "waiting_for_agent", None, None),
    Row("a start button leaves a handoff", HANDED_OFF, start("book_table"),
        None, False, "start", "book_table", "ask_party_size", "button", "How many people"),
    Row("cancel ends a handoff", HANDED_OFF, msg("cancel"), None, False,
        "cancel", None, None, None, CANCELLED),
    Row("restart during a handoff starts the fallback again", HANDED_OFF, msg("restart"),
        None, False, "restart", "fallback", "clarify", None, "Sorry, I'm not sure"),
    Row("small talk gets no answer during a handoff", HANDED_OFF, msg("hello"), None, False,
        "silent", "fallback", "waiting_for_agent", None, None),
    Row("empty text is unclear without asking the classifier", idle(), msg("   "), None,
        False, "fallback", "fallback", "clarify", "fallback", "Sorry, I'm not"),
    Row("a pressed value with no run is unclear", idle(), msg(None, {"value": "yes"}),
        None, False, "fallback", "fallback", "clarify", "fallback", "Sorry, I'm not"),
    Row("a pressed button steps the run", CONFIRM, msg(None, {"value": "yes"}), None,
        False, "step", None, None, None, "Booked!"),
    Row("a workflow input for an idle conversation is ignored", idle(), wf("refund.ok"),
        None, False, "ignore", None, None, None, None),
    Row("a service event moves the run", HANDED_OFF, wf("handoff.end"), None, False,
        "step", None, None, None, "Your colleague has left the conversation."),
    Row("an event the state does not expect changes nothing", BOOKING, wf("refund.ok"),
        None, False, "step", "book_table", "ask_party_size", None, None),
    Row("an expiry for the current run ends it", BOOKING,
        wf(EXPIRE_EVENT, {"run_id": "run0", "updated": 900.0}), None, False,
        "expire", None, None, None, None),
    Row("a stale expiry changes nothing", BOOKING,
        wf(EXPIRE_EVENT, {"run_id": "run0", "updated": 800.0}), None, False,
        "expire", "book_table", "ask_party_size", None, None),
]


def run_row(row: Row) -> Decision:
    alternatives = None
    if isinstance(row.record, Message) and needs_classification(
            row.state, row.record, POLICY, ENGINE):
        alternatives = row.alternatives
    return decide(row.state, row.record, alternatives, POLICY, ENGINE, REVISION, NOW,
                  agents_available=row.agents)


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_routing_rule(row: Row) -> None:
    """Each rule decides its action, moves the conversation where it says, records the
    classification it says, and says what it says; the input is marked handled."""
    if isinstance(row.record, Message):
        assert needs_classification(row.state, row.record, POLICY, ENGINE) is row.classify
    before = msgspec.structs.replace(row.state)
    decision = run_row(row)
    state = decision.result.state
    assert decision.action == row.action
    assert (state.workflow, state.state) == (row.workflow, row.at)
    recorded = decision.classification
    assert (recorded.decision if recorded else None) == row.decision
    first = decision.result.replies[0].text if decision.result.replies else None
    if row.reply is None:
        assert first is None
    else:
        assert first is not None and first.startswith(row.reply)
    assert state.last_input == row.record.id
    assert state.recent_inputs == [*row.state.recent_inputs, "m0"]
    assert row.state == before  # the input state is not mutated


def test_a_start_button_records_full_confidence_from_the_button() -> None:
    """The classification of a start button names the workflow with confidence 1 and
    the button as its model; a run it replaces is recorded as cancelled first."""
    decision = run_row(ROWS[1])
    assert decision.classification == rules.ClassificationFields(
        "order_status", 1.0, [], "button", model=BUTTON_MODEL)
    kinds = [(e.kind, e.workflow) for e in decision.result.events]
    assert kinds[:2] == [("cancelled", "book_table"), ("started", "order_status")]


def test_the_classification_carries_the_ranking() -> None:
    """Below the threshold, the fallback's classification keeps the best confidence and
    every alternative, with no workflow; a clarifying question names none either and
    offers a start button for each of the two."""
    unclear = decide(idle(), msg("blue elephants"), UNCLEAR, POLICY, ENGINE, REVISION, NOW)
    assert unclear.classification == rules.ClassificationFields(
        None, 0.2, UNCLEAR, "fallback")
    close = decide(idle(), msg("my table order"), CLOSE, POLICY, ENGINE, REVISION, NOW)
    assert close.classification is not None and close.classification.workflow is None
    assert [b["payload"] for b in close.result.replies[0].buttons] == [
        {"start": "book_table"}, {"start": "order_status"}]


def test_clarify_needs_both_over_the_threshold_and_a_margin() -> None:
    """No question when the second is under the threshold, when they are a margin
    apart, when one is the fallback or unknown, or when the margin is 0."""
    candidates = rules.clarify_candidates
    assert candidates(CLOSE, POLICY) == ["book_table", "order_status"]
    assert candidates(ranked(("book_table", 0.4), ("order_status", 0.34)), POLICY) is None
    assert candidates(ranked(("book_table", 0.7), ("order_status", 0.5)), POLICY) is None
    assert candidates(ranked(("book_table", 0.5), ("fallback", 0.45)), POLICY) is None
    assert candidates(ranked(("book_table", 0.5), ("gone", 0.45)), POLICY) is None
    assert candidates(CLOSE, dataclasses.replace(POLICY, clarify_margin=0.0)) is None


def test_a_message_that_needs_classifying_without_a_ranking_is_an_error() -> None:
    """The router must ask the classifier when the rules say so; forgetting is a bug
    that fails loudly instead of routing to the fallback."""
    with pytest.raises(ValueError, match="alternatives"):
        decide(idle(), msg("book a table"), None, POLICY, ENGINE, REVISION, NOW)


def test_a_new_conversation_takes_its_channel_and_user_from_the_message() -> None:
    """The first message fixes where the conversation's replies go."""
    new = ConversationState(conversation="c1")
    decision = decide(new, msg("book a table"), CLEAR, POLICY, ENGINE, None, NOW)
    assert (decision.result.state.channel, decision.result.state.user) == ("ws", "u1")
    assert decision.result.state.recent_inputs == []  # nothing handled before


def test_run_ids_derive_from_the_input_and_the_revision() -> None:
    """The same arguments give the same decision (a recomputed step names its run the
    same way); another revision gives another run."""
    first = decide(idle(), msg("book a table"), CLEAR, POLICY, ENGINE, REVISION, NOW)
    again = decide(idle(), msg("book a table"), CLEAR, POLICY, ENGINE, REVISION, NOW)
    other = decide(idle(), msg("book a table"), CLEAR, POLICY, ENGINE, REVISION + 1, NOW)
    assert first == again
    assert first.result.state.run_id == derived_id("m1", REVISION, "run")
    assert other.result.state.run_id != first.result.state.run_id


def test_a_dropped_message_is_remembered_and_nothing_else() -> None:
    """A message the inbound middleware dropped is marked handled (a redelivered copy
    is recognised) and changes nothing else."""
    decision = dropped(BOOKING, "m1", NOW)
    assert decision.action == "ignore"
    assert decision.result.replies == [] and decision.result.events == []
    assert msgspec.structs.replace(decision.result.state, last_input="m0", updated=900.0,
                                   recent_inputs=[]) == BOOKING
    assert already_handled(decision.result.state, "m1") == "last"


# -- redeliveries ----------------------------------------------------------------------
def test_inputs_handled_earlier_are_recognised_as_late_redeliveries() -> None:
    """After a few inputs, the last one is "last" (its outbox is stored), the ones
    before are "earlier" (only their ack was lost), up to RECENT_INPUTS of them; an
    input never handled, or long forgotten, is None."""
    state = ConversationState(conversation="c1")
    assert already_handled(None, "x") is None
    ids = [f"i{n}" for n in range(RECENT_INPUTS + 3)]
    for n, input_id in enumerate(ids):
        message = msgspec.structs.replace(msg("blue elephants"), id=input_id)
        state = decide(state, message, UNCLEAR, POLICY, ENGINE, n, NOW).result.state
    assert already_handled(state, ids[-1]) == "last"
    assert already_handled(state, ids[-2]) == "earlier"
    assert already_handled(state, ids[-1 - RECENT_INPUTS]) == "earlier"
    assert already_handled(state, ids[-2 - RECENT_INPUTS]) is None  # forgotten
    assert already_handled(state, "never") is None
    assert len(state.recent_inputs) == RECENT_INPUTS


def test_a_silent_or_ignored_step_remembers_the_input_before_it() -> None:
    """Steps that say nothing still push the previous input into the recent ones, so
    its late redelivery is recognised after them too."""
    for state, record in ((HANDED_OFF, msg("hello?")), (idle(), wf("refund.ok"))):
        decision = decide(state, record, None, POLICY, ENGINE, REVISION, NOW)
        assert already_handled(decision.result.state, "m0") == "earlier"


# -- asks ------------------------------------------------------------------------------
def test_the_step_that_enters_an_ask_state_is_the_one_that_asks() -> None:
    """An order number moves order_status into looking_up, which asks the shop: the
    ask belongs to that input, not to later inputs while the run still waits."""
    asking = at("order_status", "ask_order")
    decision = decide(asking, msg("12345"), None, POLICY, ENGINE, REVISION, NOW)
    state = decision.result.state
    assert state.state == "looking_up"
    ask = pending_ask(state, "m1")
    assert ask is not None and ask.subject == "shop.orders.status"
    assert ask.data == {"order_id": "12345"}
    later = msgspec.structs.replace(msg("hello?"), id="m2")
    waiting = decide(state, later, None, POLICY, ENGINE, REVISION + 1, NOW).result.state
    assert waiting.asking == ask and pending_ask(waiting, "m2") is None
    assert pending_ask(idle(), "m1") is None


@pytest.mark.parametrize(("body", "error", "ok", "reason", "filled"), [
    ({"status": "shipped", "eta": "Friday"}, None, True, None, "found"),
    ({"error": "no such shop"}, None, False, "error", "unavailable"),
    (["not", "an", "object"], None, False, "bad_reply", "unavailable"),
    (None, "no_responders", False, "no_responders", "unavailable"),
])
def test_a_service_answer_becomes_the_reply_input_that_takes_its_branch(
    body: Any, error: str | None, ok: bool, reason: str | None, filled: str
) -> None:
    """ask_reply turns an answer (or the failure to get one) into the reply input: an
    object is ok, an object with an error key or anything else is a failure; its id is
    derived from the request, and the engine takes the matching branch."""
    state = decide(at("order_status", "ask_order"), msg("12345"), None, POLICY, ENGINE,
                   REVISION, NOW).result.state
    ask = pending_ask(state, "m1")
    assert ask is not None
    reply = rules.ask_reply(ask, "c1", body, error, 970.0)
    assert reply.id == derived_id(ask.id, "reply") and reply.event == "reply"
    assert (reply.data["ok"], reply.data["error"], reply.ts) == (ok, reason, 970.0)
    after = decide(state, reply, None, POLICY, ENGINE, REVISION + 1, NOW).result
    assert after.events[0].to_state == filled


# -- layering --------------------------------------------------------------------------
def test_no_channel_imports_the_routing_package() -> None:
    """Channels talk to the hub through ChannelContext only: no module under channels/
    imports commhub.core.routing (the router, its rules or its storage format)."""
    root = Path(__file__).resolve().parent.parent / "channels"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(root)}: {name}" for name in names
                          if name.startswith("commhub.core.routing")]
    assert offenders == []


# -- small talk and workflows ----------------------------------------------------------
def test_a_workflow_trained_on_a_greeting_gets_it() -> None:
    """A phrase that is one of a workflow's examples is that workflow's, not small
    talk: "hello there" is classified; "hi" (not an example) is still small talk."""
    greet = WorkflowDef.model_validate({
        "name": "greet", "description": "Say hello", "examples": ["hello there"],
        "initial": "done", "states": {"done": {"final": True, "say": "Hello from greet!"}}})
    engine = Engine({**load_workflows([DEFINITIONS]), "greet": greet})
    policy = RoutingPolicy.for_engine(engine, threshold=0.35, clarify_margin=0.1,
                                      cancel_phrases=(), restart_phrases=())
    assert needs_classification(idle(), msg("Hello there!"), policy, engine)
    chosen = decide(idle(), msg("Hello there!"), ranked(("greet", 0.9)), policy, engine,
                    REVISION, NOW)
    assert chosen.result.replies[0].text == "Hello from greet!"
    small = decide(idle(), msg("hi"), None, policy, engine, REVISION, NOW)
    assert small.action == "smalltalk"
