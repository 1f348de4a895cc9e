"""Workflows as Python classes: the same model, checks and errors as a file, and a class
registered by a plugin running a conversation in a real hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from inproc import ws_port
from wschat import Chat

from commhub.core.config import Settings
from commhub.core.hookspecs import hookimpl
from commhub.core.hub import Hub
from commhub.core.plugins import Plugins
from commhub.core.workflow import (
    State,
    Workflow,
    WorkflowDef,
    WorkflowError,
    load_workflow_file,
    load_workflows,
    on,
    slot,
)

HERE = str(Path(__file__).resolve())


def marked_line(mark: str) -> int:
    """The line of this file that ends with the comment ``# MARK: mark``."""
    lines = Path(HERE).read_text(encoding="utf-8").splitlines()
    found = [n for n, text in enumerate(lines, start=1) if text.endswith(f"# MARK: {mark}")]
    assert len(found) == 1, (mark, found)
    return found[0]


class OrderPizza(Workflow):  # MARK: pizza-class
    """Order pizzas for delivery.

    Asks the size, how many and where to, then confirms.
    """

    name = "order_pizza"  # MARK: pizza-name
    examples: ClassVar[list[str]] = ["I want a pizza", "order a pizza", "pizza delivery please"]
    slots: ClassVar[dict[str, Any]] = {
        "size": slot("choice", choices=["small", "large"]),
        "count": slot("number", min=1, max=9, integer=True),
        "address": slot(),
    }

    ask_size = State(
        say={"text": "Which size?", "buttons": [{"title": "Small", "value": "small"},
                                                {"title": "Large", "value": "large"}]},
        on=on(message={"slot": "size"}, to="ask_count"),
    )
    ask_count = State(
        say="How many?",
        on=[on(message={"slot": "count"}, to="ask_address", invalid="1 to 9 pizzas, please.")],
    )
    ask_address = State(say="Where to?", on=[on(message={"slot": "address"}, to="confirm")])
    confirm = State(
        say={"text": "{count} {size} to {address}. Order?",
             "buttons": [{"title": "Yes", "value": "yes"}, {"title": "No", "value": "no"}]},
        reprompt="Please answer yes or no.",
        on=[
            on(button="yes", if_={"slot": "size", "equals": "large"}, to="ordered_large"),
            on(button="yes", to="ordered"),
            on(button="no", to="cancelled"),
            on(timeout=600, to="cancelled"),
        ],
    )
    ordered = State(say="Ordered, {count} {size} to {address}.", final=True,
                    emit={"name": "pizza.ordered", "data": {"size": "{size}", "count": "{count}"}})
    ordered_large = State(say=["Ordered, {count} large to {address}.", "Enjoy!"], final=True,
                          emit="pizza.ordered")
    cancelled = State(say="Cancelled.", set={"size": None}, final=True)

    def helper(self) -> str:  # methods are allowed in the body and ignored
        return "not a key"


PIZZA_YAML = """
name: order_pizza
description: Order pizzas for delivery.
examples: [I want a pizza, order a pizza, pizza delivery please]
slots:
  size: {type: choice, choices: [small, large]}
  count: {type: number, min: 1, max: 9, integer: true}
  address: text
initial: ask_size
states:
  ask_size:
    say:
      text: Which size?
      buttons: [{title: Small, value: small}, {title: Large, value: large}]
    on: {message: {slot: size}, to: ask_count}
  ask_count:
    say: How many?
    on:
      - {message: {slot: count}, to: ask_address, invalid: "1 to 9 pizzas, please."}
  ask_address:
    say: Where to?
    on: [{message: {slot: address}, to: confirm}]
  confirm:
    say:
      text: "{count} {size} to {address}. Order?"
      buttons: [{title: "Yes", value: "yes"}, {title: "No", value: "no"}]
    reprompt: Please answer yes or no.
    on:
      - {button: "yes", if: {slot: size, equals: large}, to: ordered_large}
      - {button: "yes", to: ordered}
      - {button: "no", to: cancelled}
      - {timeout: 600, to: cancelled}
  ordered:
    say: "Ordered, {count} {size} to {address}."
    final: true
    emit: {name: pizza.ordered, data: {size: "{size}", count: "{count}"}}
  ordered_large:
    say: ["Ordered, {count} large to {address}.", "Enjoy!"]
    final: true
    emit: pizza.ordered
  cancelled:
    say: Cancelled.
    set: {size: null}
    final: true
"""


# -- the same model as a file ------------------------------------------------------------
def test_a_class_compiles_to_the_same_definition_as_the_yaml_file(tmp_path: Path) -> None:
    """Every key, in every form (shorthands, lists, guards, buttons, emits, set), gives
    the definition the equivalent YAML file gives; only ``source`` differs: the class's
    file, whose lines errors use."""
    path = tmp_path / "order_pizza.yaml"
    path.write_text(PIZZA_YAML, encoding="utf-8")
    from_file = load_workflow_file(path)
    from_class = OrderPizza.compile()
    assert isinstance(from_class, WorkflowDef)
    assert from_class.model_dump(exclude={"source"}) == from_file.model_dump(exclude={"source"})
    assert list(from_class.states) == list(from_file.states)  # definition order kept
    assert from_class.source == HERE
    assert from_class.line_of(("name",)) == marked_line("pizza-name")
    assert OrderPizza.compile() is not from_class  # a fresh definition each time


def test_initial_and_description_defaults_and_overrides() -> None:
    """The first State is the initial state and the docstring's first paragraph the
    description, unless ``initial`` or ``description`` is set."""

    class Plain(Workflow):
        """Say hi
        and stop."""

        name = "plain"
        hello = State(say="hi", on=on(message="any", to="bye"))
        bye = State(say="bye", final=True)

    class Explicit(Workflow):
        """Not the description."""

        name = "explicit"
        description = "Go, then end"
        initial = "go"
        end = State(say="end", final=True)
        go = State(say="go", on=on(message="any", to="end"))

    plain = Plain.compile()
    assert (plain.initial, plain.description) == ("hello", "Say hi and stop.")
    explicit = Explicit.compile()
    assert (explicit.initial, explicit.description) == ("go", "Go, then end")
    assert list(explicit.states) == ["end", "go"]


# -- errors name the class's file and line ----------------------------------------------
def test_an_unknown_target_names_the_file_and_line_of_the_transition() -> None:
    class Broken(Workflow):
        name = "broken"
        ask = State(
            say="Hello?",
            on=[
                on(message="any",
                   to="nowhere"),  # MARK: bad-target
            ],
        )
        done = State(final=True)

    with pytest.raises(WorkflowError) as caught:
        Broken.compile()
    error = caught.value
    assert (error.file, error.line) == (HERE, marked_line("bad-target"))
    assert str(error) == (f"{HERE}:{marked_line('bad-target')}: state 'ask': transition "
                          "target 'nowhere' is not a state")


def test_wrong_types_and_keys_name_the_line_of_the_value() -> None:
    """Pydantic's errors go through the loader's path: the key path and its line."""

    class BadTimeout(Workflow):
        name = "bad_timeout"
        wait = State(
            say="Waiting",
            on=on(
                timeout="soon",  # MARK: bad-timeout
                to="done",
            ),
        )
        done = State(final=True)

    class BadButton(Workflow):
        name = "bad_button"
        ask = State(
            say={"text": "Pick",
                 "buttons": [{"tittle": "A", "value": "a"}]},  # MARK: bad-button
            on=on(button="a", to="done"),
        )
        done = State(final=True)

    with pytest.raises(WorkflowError) as caught:
        BadTimeout.compile()
    assert caught.value.line == marked_line("bad-timeout")
    assert "states.wait.on[0].timeout" in caught.value.problem
    with pytest.raises(WorkflowError) as caught:
        BadButton.compile()
    assert caught.value.line == marked_line("bad-button")
    assert "states.ask.say[0].buttons[0].title: Field required" in caught.value.problem


def test_class_level_mistakes_name_the_attribute_or_the_class() -> None:
    class Typo(Workflow):
        name = "typo"
        exampels = ("hello",)  # MARK: typo
        done = State(final=True)

    class StateNamedLikeAKey(Workflow):
        name = "clash"
        initial = State(final=True)  # MARK: clash

    class NoStates(Workflow):  # MARK: no-states
        name = "empty"

    class NoName(Workflow):  # MARK: no-name
        done = State(final=True)

    cases = [
        (Typo, "typo", "exampels: not a workflow key"),
        (StateNamedLikeAKey, "clash", "'initial' is a workflow key, so it cannot be a state"),
        (NoStates, "no-states", "workflow class NoStates has no State attribute"),
        (NoName, "no-name", "name: Field required"),
    ]
    for cls, mark, problem in cases:
        with pytest.raises(WorkflowError) as caught:
            cls.compile()
        assert (caught.value.file, caught.value.line) == (HERE, marked_line(mark)), cls
        assert problem in caught.value.problem


def test_duplicate_names_name_the_class_file() -> None:
    with pytest.raises(WorkflowError, match=r"workflow 'order_pizza' is already defined in "):
        load_workflows([OrderPizza.compile(), OrderPizza.compile()])


def test_helpers_reject_unknown_keys_and_classes_do_not_nest() -> None:
    """The helpers take exactly the file's keys: a misspelling fails where it is written."""
    with pytest.raises(TypeError):
        State(says="hi")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        on(message="any", tos="done")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        on(message="any")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        slot("number", minimum=1)  # type: ignore[call-arg]
    assert slot() == {"type": "text"}
    assert on(event="a.b", to="x", if_={"slot": "s", "filled": True}) == {
        "event": "a.b", "to": "x", "if": {"slot": "s", "filled": True}}
    with pytest.raises(TypeError, match="subclasses workflow class OrderPizza"):
        type("MorePizza", (OrderPizza,), {})
    with pytest.raises(TypeError):
        Workflow.compile()


# -- registered by a plugin, running in a hub ---------------------------------------------
class PizzaPlugin:
    @hookimpl
    def register_workflows(self, register: Any) -> None:
        register(OrderPizza)


async def test_a_class_registered_by_a_plugin_holds_a_conversation(settings: Settings) -> None:
    """``register(OrderPizza)`` makes the class a loaded workflow of a real hub, which
    walks the user through it: buttons, slot validation, a guard, a final state."""
    plugins = Plugins.load(extra=[PizzaPlugin()])
    compiled = [s for s in plugins.workflow_sources() if isinstance(s, WorkflowDef)
                and s.name == "order_pizza"]
    assert compiled == [OrderPizza.compile()]
    hub = Hub(settings, plugins=plugins)
    await hub.start()
    try:
        assert hub.engine is not None and "order_pizza" in hub.engine.definitions
        chat = await Chat.open(ws_port(hub), "pizza1")
        try:
            asked = await chat.say(payload={"start": "order_pizza"})
            assert asked["text"] == "Which size?"
            assert [b["title"] for b in asked["payload"]["buttons"]] == ["Small", "Large"]
            assert (await chat.say(payload={"value": "large"}))["text"] == "How many?"
            assert (await chat.say("twelve"))["text"] == "1 to 9 pizzas, please."
            assert (await chat.say("two"))["text"] == "Where to?"
            confirm = await chat.say("1 Main Street")
            assert confirm["text"] == "2 large to 1 Main Street. Order?"
            done = await chat.say(payload={"value": "yes"})
            assert done["text"] == "Ordered, 2 large to 1 Main Street."
        finally:
            await chat.close()
    finally:
        await hub.stop()


class BrokenPlugin:
    @hookimpl
    def register_workflows(self, register: Any) -> None:
        class Broken(Workflow):
            name = "broken_plugin"
            start = State(say="hi", on=on(message="any", to="missing"))  # MARK: plugin-bad
            done = State(final=True)

        register(Broken)


async def test_a_broken_class_stops_the_hub_with_file_and_line(settings: Settings) -> None:
    hub = Hub(settings, plugins=Plugins.load(extra=[BrokenPlugin()]))
    with pytest.raises(WorkflowError) as caught:
        await hub.start()
    assert (caught.value.file, caught.value.line) == (HERE, marked_line("plugin-bad"))
    assert "transition target 'missing' is not a state" in caught.value.problem
