"""The pure FSM engine: starting runs, stepping on messages, buttons, events and timeouts."""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import pytest

from commhub.core.engine.fsm import DIDNT_GET_THAT, LOST_TRACK, Engine, matches_phrase
from commhub.core.routing.state import ConversationState, Reply, StepResult, Trigger
from commhub.core.workflow import WorkflowDef, check_workflow, load_workflows
from commhub.workflows.builtin import DEFINITIONS


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load_workflows([DEFINITIONS]))


def idle() -> ConversationState:
    return ConversationState(conversation="c1", channel="ws", user="u1", turns=3)


def msg(text: str, n: int = 1) -> Trigger:
    return Trigger(id=f"m{n}", kind="message", text=text)


def press(value: str, n: int = 1) -> Trigger:
    return Trigger(id=f"b{n}", kind="button", payload={"value": value})


def texts(result: StepResult) -> list[str]:
    return [reply.text for reply in result.replies]


def run(engine: Engine, workflow: str, *answers: str) -> StepResult:
    result = engine.start(idle(), workflow, msg("start", 0), "run1", 1.0)
    for n, answer in enumerate(answers, start=1):
        result = engine.step(result.state, msg(answer, n), 1.0 + n)
    return result


def make(states: dict[str, Any], slots: dict[str, Any] | None = None) -> Engine:
    defn = WorkflowDef.model_validate(
        {"name": "t", "slots": slots or {}, "initial": next(iter(states)), "states": states}
    )
    check_workflow(defn)
    return Engine({"t": defn})


def test_start_enters_initial_state_without_consuming_the_trigger(engine: Engine) -> None:
    """start() sets workflow/state/run, says the initial prompt, and leaves the intent unused."""
    before = idle()
    snapshot = copy.deepcopy(before)
    result = engine.start(before, "book_table", msg("I want to book a table", 7), "run1", 5.0)
    state = result.state
    assert (state.workflow, state.state, state.run_id, state.slots) == (
        "book_table", "ask_party_size", "run1", {})
    assert (state.conversation, state.channel, state.user) == ("c1", "ws", "u1")
    assert (state.last_input, state.updated, state.turns) == ("m7", 5.0, 4)
    assert texts(result) == ["How many people is the table for?"]
    [event] = result.events
    assert (event.kind, event.to_state, event.trigger, event.run_id) == (
        "started", "ask_party_size", "message", "run1")
    assert before == snapshot  # the input state is not mutated


def test_book_table_happy_path_emits_typed_data_and_goes_idle(engine: Engine) -> None:
    """A full booking fills every slot, emits table.booked with typed data and completes."""
    result = run(engine, "book_table", "we are four", "14/06/2025", "at 7pm", "Ann",
                 "ann@example.com")
    assert result.state.state == "confirm"
    assert result.replies[0].text == (
        "A table for 4 on 2025-06-14 at 19:00, under the name Ann. Shall I book it?")
    assert [b["payload"] for b in result.replies[0].buttons] == [
        {"value": "yes"}, {"value": "no"}, {"value": "cancel"}]
    done = engine.step(result.state, press("yes", 9), 20.0)
    assert [e.kind for e in done.events] == ["transition", "completed"]
    assert done.events[0].from_state == "confirm" and done.events[0].to_state == "booked"
    assert done.events[1].to_state == "booked"
    assert [e.name for e in done.emits] == ["table.booked"]
    assert done.emits[0].data == {"party_size": 4, "day": "2025-06-14", "time": "19:00",
                                  "name": "Ann", "email": "ann@example.com"}
    assert texts(done)[0].startswith("Booked! A table for 4 on 2025-06-14 at 19:00.")
    assert (done.state.workflow, done.state.state, done.state.run_id, done.state.slots) == (
        None, None, None, {})
    assert not done.state.active


def test_transition_event_records_changed_slots(engine: Engine) -> None:
    """The transition event names from/to states, the trigger kind and only the changed slots."""
    result = run(engine, "book_table", "4")
    step = engine.step(result.state, msg("2025-01-02", 2), 3.0)
    [event] = step.events
    assert (event.kind, event.from_state, event.to_state, event.trigger) == (
        "transition", "ask_day", "ask_time", "message")
    assert event.slots_changed == {"day": "2025-01-02"}


def test_invalid_slot_value_says_invalid_and_keeps_state(engine: Engine) -> None:
    """A value the slot type rejects says the transition's invalid text; only bookkeeping moves."""
    started = run(engine, "book_table")
    result = engine.step(started.state, msg("a crowd", 5), 9.0)
    assert texts(result) == ["Please give a number of guests between 1 and 20."]
    assert result.events == [] and result.emits == []
    expected = msgspec.structs.replace(started.state, last_input="m5", updated=9.0,
                                       turns=started.state.turns + 1)
    assert result.state == expected


def test_unmatched_message_reprompts_with_the_states_say() -> None:
    """No matching transition: "Sorry, I didn't get that." then the state's say again."""
    eng = make({"a": {"say": "Pick", "on": [{"button": "x", "to": "b"}]}, "b": {"final": True}})
    started = eng.start(idle(), "t", msg("go"), "r", 1.0)
    result = eng.step(started.state, msg("what?"), 2.0)
    assert texts(result) == [DIDNT_GET_THAT, "Pick"]
    assert result.state.state == "a" and result.events == []


def test_reprompt_replaces_the_default_and_keeps_buttons(engine: Engine) -> None:
    """A state's reprompt is said instead of the default, with the state's buttons."""
    confirm = run(engine, "book_table", "2", "2025-03-04", "19:30", "Bo", "bo@example.org")
    result = engine.step(confirm.state, msg("perhaps", 9), 10.0)
    assert texts(result) == ["Please answer yes to book the table, no to start over, or cancel."]
    assert [b["title"] for b in result.replies[0].buttons] == [
        "Yes, book it", "No, start over", "Cancel"]
    assert result.state.state == "confirm"


def test_button_matches_payload_typed_value_and_title(engine: Engine) -> None:
    """A button transition fires on the payload value, the typed value or the typed title."""
    confirm = run(engine, "book_table", "2", "2025-03-04", "19:30", "Bo", "bo@example.org")
    for trigger in (press("no"), msg("NO"), msg("no, start over")):
        result = engine.step(confirm.state, trigger, 11.0)
        assert result.state.state == "ask_party_size", trigger
    cancelled = engine.step(confirm.state, msg("Cancel"), 11.0)
    assert texts(cancelled) == ["No problem, I haven't booked anything."]
    assert [e.kind for e in cancelled.events] == ["transition", "completed"]


def test_pressed_button_fills_a_choice_slot(engine: Engine) -> None:
    """A pressed button is a message whose text is its value, so it fills a choice slot."""
    ask = run(engine, "support_request", "The app crashes on start")
    result = engine.step(ask.state, press("urgent"), 5.0)
    assert result.state.state == "ask_email"
    assert result.state.slots["urgency"] == "urgent"


def test_support_request_files_a_ticket_then_follows_the_back_office(engine: Engine) -> None:
    """support_request collects, confirms and emits request.created with its slots, then
    tells the user each progress report and completes on request.resolved."""
    confirm = run(engine, "support_request", "I was charged twice", "Normal", "me@example.com")
    assert confirm.state.state == "confirm"
    filed = engine.step(confirm.state, msg("yes", 9), 9.0)
    assert filed.emits[0].name == "request.created"
    assert filed.emits[0].data == {"description": "I was charged twice", "urgency": "normal",
                                   "email": "me@example.com"}
    assert "filed" in texts(filed)[0]
    assert filed.state.state == "filed" and filed.state.expires is False
    progress = Trigger(id="e1", kind="event", event="request.progress",
                       data={"status": "assigned to Kim", "note": "We are on it."})
    working = engine.step(filed.state, progress, 10.0)
    assert texts(working) == ["Update on your support request: assigned to Kim. We are on it."]
    resolved = Trigger(id="e2", kind="event", event="request.resolved",
                       data={"resolution": "The double charge was refunded."})
    done = engine.step(working.state, resolved, 11.0)
    assert "refunded" in texts(done)[0]
    assert [e.kind for e in done.events] == ["transition", "completed"]
    assert not done.state.active


EVENTS = {
    "wait": {
        "say": "Waiting for the back office.",
        "on": [
            {"event": "request.progress", "to": "progress"},
            {"timeout": 600, "to": "late"},
        ],
    },
    "progress": {"final": True, "say": "Status: {status}."},
    "late": {"final": True, "say": "Still waiting, sorry."},
}


def test_service_event_fills_slots_and_is_named_in_the_event() -> None:
    """An event trigger fills slots from its data (declared slots only) and names the event."""
    eng = make(EVENTS, slots={"status": "text"})
    started = eng.start(idle(), "t", msg("go"), "r", 1.0)
    trigger = Trigger(id="e1", kind="event", event="request.progress",
                      data={"status": "in progress", "other": 1})
    result = eng.step(started.state, trigger, 2.0)
    assert texts(result) == ["Status: in progress."]
    assert result.events[0].trigger == "request.progress"
    assert result.events[0].slots_changed == {"status": "in progress"}


def test_unexpected_event_is_ignored_silently() -> None:
    """An event the state does not listen for produces no reply and no event, only bookkeeping."""
    eng = make(EVENTS, slots={"status": "text"})
    started = eng.start(idle(), "t", msg("go"), "r", 1.0)
    result = eng.step(started.state, Trigger(id="e2", kind="event", event="other"), 2.0)
    assert result.replies == [] and result.events == []
    assert result.state.state == "wait" and result.state.last_input == "e2"


def test_timeout_trigger_and_stale_timeout() -> None:
    """Entering a state arms its timeout in the state; the timer takes the timeout
    transition; one scheduled for another state, run or entry is ignored."""
    eng = make(EVENTS, slots={"status": "text"})
    started = eng.start(idle(), "t", msg("go"), "r", 1.0)
    assert eng.definitions["t"].states["wait"].timeout == 600
    assert (started.state.entered, started.state.timeout_at) == (1.0, 601.0)
    due = {"state": "wait", "run_id": "r", "entered": 1.0, "at": 601.0}
    for stale_data in ({**due, "state": "elsewhere"}, {**due, "run_id": "old"},
                       {**due, "entered": 0.5}, {**due, "at": 300.0}):
        stale = eng.step(started.state, Trigger(id="t1", kind="timeout", data=stale_data), 700.0)
        assert stale.state.state == "wait" and stale.events == [] and stale.replies == []
        assert stale.state.updated == started.state.updated  # a stale timer is no activity
    fired = eng.step(started.state, Trigger(id="t2", kind="timeout", data=due), 700.0)
    assert texts(fired) == ["Still waiting, sorry."]
    assert fired.events[0].trigger == "timeout"
    assert not fired.state.active and fired.state.timeout_at is None


def test_several_timeouts_fire_in_turn() -> None:
    """A state with a reminder and a give-up timeout: the first timer takes the reminder
    only if it loops elsewhere; one that matches nothing arms the next longer one."""
    eng = make({
        "wait": {"say": "Waiting.", "on": [
            {"timeout": 60, "if": {"slot": "n", "filled": True}, "to": "late"},
            {"timeout": 300, "to": "late"},
            {"message": "any", "to": "late"},
        ]},
        "late": {"final": True, "say": "Giving up."},
    }, slots={"n": "number"})
    started = eng.start(idle(), "t", msg("go"), "r", 0.0)
    assert started.state.timeout_at == 60.0
    first = {"state": "wait", "run_id": "r", "entered": 0.0, "at": 60.0}
    nothing = eng.step(started.state, Trigger(id="t1", kind="timeout", data=first), 61.0)
    assert nothing.state.state == "wait" and nothing.state.timeout_at == 300.0
    second = {**first, "at": 300.0}
    done = eng.step(nothing.state, Trigger(id="t2", kind="timeout", data=second), 301.0)
    assert texts(done) == ["Giving up."]


def test_first_matching_transition_wins_and_guards_branch() -> None:
    """Transitions are tried in order; a guard sees the value its transition would fill."""
    eng = make(
        {
            "ask": {"say": "Colour?", "on": [
                {"message": {"match": "^stop$"}, "to": "stopped"},
                {"message": {"slot": "colour"}, "if": {"slot": "colour", "equals": "red"},
                 "to": "red"},
                {"message": {"slot": "colour"}, "to": "other"},
            ]},
            "stopped": {"final": True},
            "red": {"final": True, "say": "Red it is."},
            "other": {"final": True, "say": "{colour}, then."},
        },
        slots={"colour": {"type": "choice", "choices": ["red", "blue"]}},
    )
    started = eng.start(idle(), "t", msg("go"), "r", 1.0)
    assert texts(eng.step(started.state, msg("RED"), 2.0)) == ["Red it is."]
    assert texts(eng.step(started.state, msg("blue"), 2.0)) == ["blue, then."]
    assert eng.step(started.state, msg("stop"), 2.0).events[0].to_state == "stopped"
    assert texts(eng.step(started.state, msg("green"), 2.0)) == [
        "Please answer with one of: red, blue."]


def test_set_renders_templates_and_keeps_types() -> None:
    """``set`` on entry renders templates; a lone "{slot}" keeps the slot's own type."""
    eng = make(
        {
            "ask": {"on": [{"message": {"slot": "n"}, "to": "copy"}]},
            "copy": {"set": {"m": "{n}", "label": "n is {n}"}, "say": "{label}",
                     "on": [{"message": "any", "to": "end"}]},
            "end": {"final": True},
        },
        slots={"n": "number", "m": "number", "label": "text"},
    )
    started = eng.start(idle(), "t", msg("go"), "r", 1.0)
    result = eng.step(started.state, msg("3"), 2.0)
    assert result.state.slots == {"n": 3, "m": 3, "label": "n is 3"}
    assert texts(result) == ["n is 3"]
    assert result.events[0].slots_changed == {"label": "n is 3", "m": 3, "n": 3}


def test_initial_final_state_completes_at_once() -> None:
    """A workflow whose initial state is final says its text, completes and leaves it idle."""
    eng = make({"only": {"final": True, "say": "Hello!"}})
    result = eng.start(idle(), "t", msg("hi"), "r", 1.0)
    assert [e.kind for e in result.events] == ["started", "completed"]
    assert texts(result) == ["Hello!"]
    assert not result.state.active and result.state.slots == {}


def test_fallback_offers_other_workflows_then_hands_off(engine: Engine) -> None:
    """The fallback offers a start button per other workflow, then hands over to a
    person (a handoff event for agents) until an agent ends the handoff."""
    result = engine.start(idle(), "fallback", msg("qwerty"), "r", 1.0)
    [reply] = result.replies
    assert reply.text == "Sorry, I'm not sure what you mean. I can help with:"
    assert reply.buttons == [
        {"title": "Book a table at the restaurant", "payload": {"start": "book_table"}},
        {"title": "Check the status of an order", "payload": {"start": "order_status"}},
        {"title": "Report a problem to customer support",
         "payload": {"start": "support_request"}},
    ]
    handed = engine.step(result.state, msg("still confused", 2), 2.0)
    assert "hand you over" in texts(handed)[0]
    assert [e.kind for e in handed.events] == ["transition", "handoff"]
    assert handed.events[1].data == {"channel": "ws", "user": "u1", "slots": {}}
    assert handed.state.handoff is True and handed.state.active
    accepted = engine.step(handed.state, Trigger(id="a1", kind="event",
                                                 event="handoff.accepted"), 3.0)
    assert accepted.state.state == "with_agent" and accepted.state.handoff
    assert [e.kind for e in accepted.events] == ["transition"]  # announced once
    back = engine.step(accepted.state, Trigger(id="a2", kind="event", event="handoff.end"), 4.0)
    assert "back with the assistant" in texts(back)[0]
    assert not back.state.active and back.state.handoff is False


def test_examples_exclude_fallback_and_empty(engine: Engine) -> None:
    """examples() lists training phrases of every workflow except the fallback."""
    examples = engine.examples()
    assert sorted(examples) == ["book_table", "order_status", "support_request"]
    assert "I'd like to book a table" in examples["book_table"]


def test_cancel_restart_and_expire(engine: Engine) -> None:
    """cancel ends the run with a cancelled event; restart cancels and starts the same
    workflow afresh; expire ends it only if nothing happened since it was scheduled."""
    state = run(engine, "book_table", "3").state
    cancelled = engine.cancel(state, msg("stop", 5), 9.0)
    assert [(e.kind, e.trigger) for e in cancelled.events] == [("cancelled", "cancel")]
    assert not cancelled.state.active and texts(cancelled)
    restarted = engine.restart(state, msg("start over", 5), "run2", 9.0)
    assert [(e.kind, e.trigger) for e in restarted.events] == [
        ("cancelled", "restart"), ("started", "restart")]
    assert restarted.state.run_id == "run2" and restarted.state.slots == {}
    assert restarted.state.state == "ask_party_size"
    due = {"run_id": "run1", "updated": state.updated}
    expired = engine.expire(state, Trigger(id="x1", kind="event", data=due), 9.0)
    assert [e.kind for e in expired.events] == ["expired"] and not expired.state.active
    stale = engine.expire(state, Trigger(id="x2", kind="event",
                                         data={**due, "updated": 0.5}), 9.0)
    assert stale.events == [] and stale.state.active


def test_a_states_own_cancel_button_is_offered(engine: Engine) -> None:
    """offers() is true for a value or title of a button the current state takes, so
    the state's own "cancel" wins over the global phrase."""
    confirm = run(engine, "book_table", "3", "tomorrow", "19:30", "Ann", "a@example.com").state
    assert confirm.state == "confirm"
    assert engine.offers(confirm, "Cancel!") and engine.offers(confirm, "yes, book it")
    assert not engine.offers(confirm, "stop")
    assert not engine.offers(run(engine, "book_table").state, "cancel")


def test_matches_phrase_takes_whole_messages_only() -> None:
    """Phrases match the whole message, ignoring case and punctuation."""
    assert matches_phrase("Start over!", ["start over"])
    assert matches_phrase("  STOP. ", ["stop"])
    assert not matches_phrase("please stop the emails", ["stop"])
    assert not matches_phrase("", ["stop"]) and not matches_phrase(None, ["stop"])


ASKING = {
    "lookup": {"say": "Looking.", "ask": {"subject": "svc.lookup", "data": {"q": "{q}"},
                                          "timeout": 2},
               "on": [{"reply": "ok", "to": "found"}, {"reply": "timeout", "to": "slow"},
                      {"reply": "error", "to": "broken"}]},
    "found": {"final": True, "say": "Found {answer}."},
    "slow": {"final": True, "say": "Too slow."},
    "broken": {"final": True, "say": "Broken."},
}


def test_ask_records_the_request_and_the_reply_takes_its_branch() -> None:
    """Entering an ask state stores the pending request (rendered data, stable id); the
    reply fills slots on ok, and timeout and other errors take their branches; a reply
    for another request is stale."""
    eng = make(ASKING, slots={"q": "text", "answer": "text"})
    begun = idle()
    started = eng.start(begun, "t", msg("go"), "r", 1.0)
    asking = started.state.asking
    assert asking is not None and asking.subject == "svc.lookup" and asking.timeout == 2
    again = eng.start(begun, "t", msg("go"), "r", 1.0).state.asking
    assert again is not None and again.id == asking.id  # deterministic

    def reply(**data: Any) -> StepResult:
        return eng.step(started.state, Trigger(id="r1", kind="reply",
                                               data={"id": asking.id, **data}), 2.0)

    ok = reply(ok=True, reply={"answer": "42", "other": 1})
    assert texts(ok) == ["Found 42."] and ok.events[0].trigger == "reply.ok"
    assert texts(reply(ok=False, error="timeout")) == ["Too slow."]
    assert texts(reply(ok=False, error="no_responders")) == ["Broken."]
    stale = eng.step(started.state, Trigger(id="r2", kind="reply",
                                            data={"id": "other", "ok": True}), 2.0)
    assert stale.events == [] and stale.state.state == "lookup"


def test_engine_is_deterministic(engine: Engine) -> None:
    """The same state, trigger and time always give the same result."""
    state = run(engine, "book_table", "3").state
    first = engine.step(state, msg("tomorrow", 4), 86400.0 * 3)
    second = engine.step(state, msg("tomorrow", 4), 86400.0 * 3)
    assert msgspec.json.encode(first) == msgspec.json.encode(second)
    assert first.state.slots["day"] == "1970-01-05"  # "tomorrow" of now, in UTC


def test_misuse_raises_but_stale_state_fails_softly(engine: Engine) -> None:
    """Stepping an idle state or starting an unknown workflow raises; a vanished state fails."""
    with pytest.raises(ValueError, match="no active workflow"):
        engine.step(idle(), msg("hi"), 1.0)
    with pytest.raises(KeyError, match="unknown workflow 'nope'"):
        engine.start(idle(), "nope", msg("hi"), "r", 1.0)
    gone = msgspec.structs.replace(idle(), workflow="book_table", state="removed", run_id="r")
    result = engine.step(gone, msg("hi"), 2.0)
    assert [e.kind for e in result.events] == ["failed"]
    assert result.replies == [Reply(text=LOST_TRACK)]
    assert not result.state.active


# --------------------------------------------------------------------------- slots from any message
# Wednesday 11 June 2025, 10:00 UTC: "tomorrow" is the 12th, "the 15th" a Sunday.
WED = 1749636000.0


def chat(engine: Engine, state: ConversationState, *lines: str) -> StepResult:
    """The user says each line in turn (a minute apart); the last step's result."""
    result = StepResult(state=state)
    for n, line in enumerate(lines, start=1):
        result = engine.step(result.state, msg(line, n), WED + 60 * n)
    return result


def booking(engine: Engine, first: str) -> StepResult:
    return engine.start(idle(), "book_table", msg(first, 0), "run1", WED)


def test_table_for_four_tomorrow_at_8pm_asks_for_the_name_next(engine: Engine) -> None:
    """The message that starts the booking fills size, day and time; their questions
    are passed over and the next one asked is the name."""
    result = booking(engine, "Table for four tomorrow at 8pm")
    assert result.state.state == "ask_name"
    assert result.state.slots == {"party_size": 4, "day": "2025-06-12", "time": "20:00"}
    assert texts(result) == ["Under which name should I book it?"]
    started, *passed = result.events
    assert (started.kind, started.to_state) == ("started", "ask_party_size")
    assert started.slots_changed == {"party_size": 4, "day": "2025-06-12", "time": "20:00"}
    assert [(e.from_state, e.to_state, e.trigger) for e in passed] == [
        ("ask_party_size", "ask_day", "prefilled"), ("ask_day", "ask_time", "prefilled"),
        ("ask_time", "ask_name", "prefilled")]


def test_a_start_with_only_the_size_asks_for_the_day(engine: Engine) -> None:
    """"Can I reserve a table for four?" is not answered "How many people?"."""
    result = booking(engine, "Can I reserve a table for four?")
    assert (result.state.state, result.state.slots) == ("ask_day", {"party_size": 4})
    assert texts(result)[0].startswith("Which day")


def test_an_answer_that_names_more_fills_the_later_questions_too(engine: Engine) -> None:
    """Asked for the day, "next friday around 8" gives the day and the time (read
    within opening hours: 20:00)."""
    result = chat(engine, booking(engine, "book a table").state, "4", "next friday around 8")
    assert result.state.slots == {"party_size": 4, "day": "2025-06-20", "time": "20:00"}
    assert texts(result) == ["Under which name should I book it?"]


def test_actually_make_it_five_while_the_time_is_asked(engine: Engine) -> None:
    """A correction while another question is asked changes the size and asks the
    time again."""
    asked_time = chat(engine, booking(engine, "book a table").state, "4", "tomorrow")
    assert asked_time.state.state == "ask_time"
    result = chat(engine, asked_time.state, "Actually, make it five")
    assert result.state.state == "ask_time"
    assert result.state.slots["party_size"] == 5
    assert texts(result) == ["Got it, I've changed that.",
                             "At what time? (for example 19:30, 7pm or half past seven)"]
    [event] = result.events
    assert (event.from_state, event.to_state, event.slots_changed) == (
        "ask_time", "ask_time", {"party_size": 5})
    assert chat(engine, result.state, "8pm").state.state == "ask_name"


def test_no_the_15th_at_the_confirmation_changes_the_day(engine: Engine) -> None:
    """At the Yes/No confirmation, "no, the 15th" changes the day and confirms again."""
    confirm = chat(engine, booking(engine, "Table for two tomorrow at 7pm").state,
                   "Ann", "ann@example.com")
    assert confirm.state.state == "confirm"
    result = chat(engine, confirm.state, "no, the 15th")
    assert result.state.state == "confirm"
    assert result.state.slots["day"] == "2025-06-15"
    assert texts(result)[1] == ("A table for 2 on 2025-06-15 at 19:00, under the name Ann. "
                                "Shall I book it?")


def test_a_message_that_changes_nothing_still_gets_the_reprompt(engine: Engine) -> None:
    """Text with no value for any slot at the confirmation is answered as before."""
    confirm = chat(engine, booking(engine, "Table for two tomorrow at 7pm").state,
                   "Ann", "ann@example.com")
    result = chat(engine, confirm.state, "hmm, let me think")
    assert texts(result) == ["Please answer yes to book the table, no to start over, or cancel."]


def test_rasa_style_intent_payload_fills_slots(engine: Engine) -> None:
    """`/book_table{"party_size": 3}`-style values (the message's data) fill slots,
    validated by their types; values that do not fit are dropped."""
    trigger = Trigger(id="m0", kind="message", text="/book_table",
                      data={"party_size": "3", "day": "2025-06-20", "email": "not an email"})
    result = engine.start(idle(), "book_table", trigger, "run1", WED)
    assert result.state.slots == {"party_size": 3, "day": "2025-06-20"}
    assert result.state.state == "ask_time"


PIZZA = {
    "ask_size": {"say": "What size?", "on": [{"message": {"slot": "size"}, "to": "ask_count"}]},
    "ask_count": {"say": "How many?", "on": [{"message": {"slot": "count"}, "to": "done"}]},
    "done": {"final": True, "say": "{count} {size} pizzas."},
}
PIZZA_SLOTS = {
    "size": {"type": "choice", "choices": ["small", "medium", "large"],
             "synonyms": {"medium": ["regular"]}, "fill": ["answer", "button", "entity"]},
    "count": {"type": "number", "min": 1, "max": 9, "integer": True,
              "fill": ["answer", "button", "entity"], "confirm": "{count} pizzas, right?"},
}


def test_i_want_a_medium_pizza_is_not_asked_what_size(engine: Engine) -> None:
    """A choice slot's values and synonyms are entities too."""
    pizza = make(PIZZA, PIZZA_SLOTS)
    result = pizza.start(idle(), "t", msg("I want a medium pizza", 0), "run1", WED)
    assert (result.state.state, result.state.slots) == ("ask_count", {"size": "medium"})
    regular = pizza.start(idle(), "t", msg("a regular one", 0), "run1", WED)
    assert regular.state.slots == {"size": "medium"}


def test_a_prefilled_value_with_confirm_is_asked_yes_or_no(engine: Engine) -> None:
    """A slot with `confirm` filled before its question says that text with Yes/No:
    yes goes on, no asks the question, any other answer answers it."""
    pizza = make(PIZZA, PIZZA_SLOTS)
    start = pizza.start(idle(), "t", msg("two large pizzas", 0), "run1", WED)
    assert start.state.state == "ask_count" and start.state.confirming == "count"
    assert texts(start) == ["2 pizzas, right?"]
    assert [b["payload"] for b in start.replies[0].buttons] == [{"value": "yes"}, {"value": "no"}]
    assert texts(chat(pizza, start.state, "yes")) == ["2 large pizzas."]
    no = chat(pizza, start.state, "no")
    assert texts(no) == ["How many?"] and "count" not in no.state.slots
    assert texts(chat(pizza, no.state, "3")) == ["3 large pizzas."]
    assert texts(chat(pizza, start.state, "make it 4")) == ["4 large pizzas."]


def test_a_slot_filled_by_buttons_only_refuses_typed_text(engine: Engine) -> None:
    """`fill: [button]`: typing a valid value does not answer; pressing does."""
    only = make({"ask": {"say": {"text": "Pick", "buttons": [{"title": "A", "value": "a"}]},
                         "reprompt": "Press a button.",
                         "on": [{"message": {"slot": "pick"}, "to": "done"}]},
                 "done": {"final": True, "say": "Picked {pick}."}},
                {"pick": {"type": "choice", "choices": ["a"], "fill": ["button"]}})
    start = only.start(idle(), "t", msg("go", 0), "run1", WED)
    assert texts(only.step(start.state, msg("a", 1), WED)) == ["Press a button."]
    assert texts(only.step(start.state, press("a", 1), WED)) == ["Picked a."]


def test_no_agent_means_no_handoff(engine: Engine) -> None:
    """A transition into a handoff state is not taken while no agent is available: the
    fallback says nobody is there, offers the workflows and ends its run, so the next
    unclear message is answered again."""
    clarify = engine.start(idle(), "fallback", msg("blah", 0), "run1", WED)
    alone = Trigger(id="m1", kind="message", text="still blah", agents=False)
    result = engine.step(clarify.state, alone, WED)
    assert not result.state.handoff and not result.state.active
    [reply] = result.replies
    assert reply.text.startswith("Sorry, I still don't understand, and no colleague")
    assert {"start": "book_table"} in [b["payload"] for b in reply.buttons]
    staffed = engine.step(clarify.state, msg("still blah", 1), WED)
    assert staffed.state.handoff


def test_the_user_is_told_when_an_agent_joins_and_leaves(engine: Engine) -> None:
    """handoff.accepted with the agent's name says who joined; handoff.end says they
    left and the bot is back."""
    handed = engine.step(engine.start(idle(), "fallback", msg("blah", 0), "r", WED).state,
                         msg("still blah", 1), WED)
    joined = engine.step(handed.state, Trigger(id="a1", kind="event", event="handoff.accepted",
                                               data={"agent": "Eve"}), WED + 5)
    assert texts(joined) == ["Eve has joined the conversation."]
    assert joined.state.handoff
    left = engine.step(joined.state, Trigger(id="a2", kind="event", event="handoff.end"),
                       WED + 50)
    assert texts(left)[0].startswith("Your colleague has left the conversation.")
    assert not left.state.active


def test_a_handoff_nobody_takes_comes_back_to_the_bot_after_a_minute(engine: Engine) -> None:
    """The fallback's waiting state times out after 60 s (the fake clock of the timer's
    input): the bot takes the conversation back and says what it can do."""
    handed = engine.step(engine.start(idle(), "fallback", msg("blah", 0), "r", WED).state,
                         msg("still blah", 1), WED)
    state = handed.state
    assert state.timeout_at == WED + 60
    due = Trigger(id="t1", kind="timeout", ts=WED + 60,
                  data={"run_id": state.run_id, "state": state.state,
                        "entered": state.entered, "at": state.timeout_at})
    back = engine.step(state, due, WED + 60)
    assert not back.state.active and not back.state.handoff
    [reply] = back.replies
    assert reply.text.startswith("Sorry, no colleague could take your conversation.")
    assert {"start": "book_table"} in [b["payload"] for b in reply.buttons]
