"""Workflow definitions: loading YAML/TOML, the load-time checks and their file:line errors."""

from __future__ import annotations

import datetime as dt
import re
import textwrap
from pathlib import Path

import pluggy
import pytest

from commhub.core import hookspecs
from commhub.core.workflow import (
    SlotDef,
    StateDef,
    TransitionDef,
    WorkflowDef,
    WorkflowError,
    check_workflow,
    load_workflow_file,
    load_workflows,
    render_template,
    template_fields,
)
from commhub.workflows import builtin

GOOD = """\
name: demo
description: A demo
examples: [hello demo]
slots:
  size: {type: number, min: 1, max: 9}
initial: ask
states:
  ask:
    say: How many?
    on:
      - message: {slot: size}
        to: done
  done:
    final: true
    say: Got {size}.
"""


def write(tmp_path: Path, text: str, name: str = "wf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(tmp_path: Path, text: str, name: str = "wf.yaml") -> WorkflowError:
    path = write(tmp_path, text, name)
    with pytest.raises(WorkflowError) as info:
        load_workflow_file(path)
    return info.value


def line_of(text: str, needle: str) -> int:
    """1-based number of the first line of ``text`` containing ``needle``."""
    for number, line in enumerate(textwrap.dedent(text).splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in text")


# --------------------------------------------------------------------------- built-ins
def test_builtin_definitions_load_and_check() -> None:
    """The shipped workflows load, pass every check and are realistic (>= 3 states + final)."""
    defs = load_workflows([builtin.DEFINITIONS])
    assert list(defs) == ["book_table", "fallback", "order_status", "support_request"]
    for name in ("book_table", "order_status", "support_request"):
        defn = defs[name]
        assert defn.source is not None and defn.source.endswith(f"{name}.yaml")
        assert len([s for s in defn.states.values() if not s.final]) >= 3
        assert any(s.final for s in defn.states.values())
        assert len(defn.examples) >= 15
        assert defn.description
    assert defs["fallback"].examples == []


def test_builtin_plugin_registers_the_definitions_folder() -> None:
    """The builtin workflows module contributes its definitions folder through the hook."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin)
    found: list[object] = []
    pm.hook.register_workflows(register=found.append)
    assert found == [builtin.DEFINITIONS]
    assert (builtin.DEFINITIONS / "book_table.yaml").is_file()


def test_support_request_emits_request_created_with_slots() -> None:
    """support_request's filed state emits request.created carrying its slots."""
    defn = load_workflows([builtin.DEFINITIONS])["support_request"]
    emits = [e for s in defn.states.values() for e in s.emit]
    assert [e.name for e in emits] == ["request.created"]
    assert set(emits[0].data) == {"description", "urgency", "email"}


# --------------------------------------------------------------------------- YAML reading
def test_yaml_reads_on_yes_no_as_strings(tmp_path: Path) -> None:
    """YAML 1.2 booleans: the ``on:`` key and bare yes/no values stay strings."""
    defn = load_workflow_file(write(tmp_path, """\
        name: yn
        slots:
          answer: {type: choice, choices: [yes, no]}
        initial: ask
        states:
          ask:
            say: {text: 'Sure?', buttons: [{title: Yes, value: yes}]}
            on:
              - button: yes
                to: done
              - button: no
                to: done
          done: {final: true}
        """))
    ask = defn.states["ask"]
    assert [t.button for t in ask.on] == ["yes", "no"]
    assert ask.say[0].buttons[0].value == "yes"
    assert defn.slots["answer"].choices == ["yes", "no"]


def test_say_accepts_string_mapping_and_list(tmp_path: Path) -> None:
    """``say`` may be a string, a {text, buttons} mapping or a list of either."""
    state = StateDef.model_validate(
        {"say": ["one", {"text": "two", "buttons": [{"title": "B", "value": 1}]}], "final": True}
    )
    assert [s.text for s in state.say] == ["one", "two"]
    assert state.say[1].buttons[0].value == "1"
    assert StateDef.model_validate({"say": "only"}).say[0].text == "only"


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    """A YAML syntax error is a WorkflowError with the file and the line of the problem."""
    err = load_error(tmp_path, "name: x\nstates:\n  a: [unclosed\n  b: 1\n")
    assert err.file is not None and err.file.endswith("wf.yaml")
    assert err.line in (3, 4)
    assert str(err).startswith(f"{err.file}:{err.line}: invalid YAML")


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    """Two states with the same name are reported at the second one's line, not merged."""
    text = GOOD + "  done:\n    final: true\n"
    err = load_error(tmp_path, text)
    assert err.line == len(text.splitlines()) - 1
    assert "duplicate key 'done'" in err.problem


# --------------------------------------------------------------------------- the checks
def test_unknown_target_names_file_line_and_state(tmp_path: Path) -> None:
    """A transition to a missing state reports file:line: state 'x': transition target..."""
    text = GOOD.replace("to: done", "to: dne")
    path = write(tmp_path, text)
    with pytest.raises(WorkflowError) as info:
        load_workflow_file(path)
    line = line_of(text, "to: dne")
    assert str(info.value) == f"{path}:{line}: state 'ask': transition target 'dne' is not a state"
    assert info.value.line == line and info.value.file == str(path)


def test_unreachable_state(tmp_path: Path) -> None:
    """A state no transition leads to is reported at its own line."""
    text = GOOD + "  orphan:\n    final: true\n"
    err = load_error(tmp_path, text)
    assert err.line == line_of(text, "orphan:")
    assert err.problem == "state 'orphan' is unreachable from initial state 'ask'"


def test_state_without_transitions_has_no_way_out(tmp_path: Path) -> None:
    """A non-final state with no transitions is a 'no way out' error."""
    text = GOOD.replace("    final: true\n", "")
    err = load_error(tmp_path, text)
    assert err.line == line_of(text, "  done:")
    assert "state 'done': no way out" in err.problem


def test_loop_that_never_reaches_a_final_state(tmp_path: Path) -> None:
    """States that only lead to each other, never to a final state, are a 'no way out' error."""
    err = load_error(tmp_path, """\
        name: loop
        initial: a
        states:
          a:
            on: [{message: any, to: b}, {button: quit, to: end}]
          b:
            on: [{message: any, to: c}]
          c:
            on: [{message: any, to: b}]
          end: {final: true}
        """)
    assert "state 'b': no way out (no path from it to a final state)" in str(err)


def test_unknown_slot_in_message_trigger(tmp_path: Path) -> None:
    """A transition filling an undeclared slot is reported at that line."""
    text = GOOD.replace("{slot: size}", "{slot: sizes}")
    err = load_error(tmp_path, text)
    assert err.line == line_of(text, "sizes")
    assert err.problem == "state 'ask': unknown slot 'sizes'"


def test_unknown_slot_in_template(tmp_path: Path) -> None:
    """A ``{placeholder}`` that is not a slot is reported at the say line."""
    text = GOOD.replace("Got {size}.", "Got {sise}.")
    err = load_error(tmp_path, text)
    assert err.line == line_of(text, "Got {sise}")
    assert "unknown slot {sise}" in err.problem


def test_malformed_template_braces(tmp_path: Path) -> None:
    """An unbalanced brace in a template is a load error, not a runtime crash."""
    text = GOOD.replace("Got {size}.", "'Got {size.'")
    err = load_error(tmp_path, text)
    assert err.line == line_of(text, "Got {size.")
    assert "bad template" in err.problem


def test_unknown_slot_in_set_and_emit(tmp_path: Path) -> None:
    """``set`` keys and ``emit`` data templates must name declared slots."""
    set_text = GOOD.replace("    say: Got {size}.", "    set: {colour: red}")
    assert "set: unknown slot 'colour'" in load_error(tmp_path, set_text).problem
    emit_text = GOOD.replace("    say: Got {size}.", "    emit: {name: x.y, data: {n: '{nope}'}}")
    err = load_error(tmp_path, emit_text)
    assert "unknown slot {nope}" in err.problem
    assert err.line == line_of(emit_text, "emit:")


def test_unknown_slot_type(tmp_path: Path) -> None:
    """An unknown slot type names the slot and lists the known types, at the slot's line."""
    text = GOOD.replace("type: number, min: 1, max: 9", "type: numbr")
    err = load_error(tmp_path, text)
    assert err.line == line_of(text, "numbr")
    assert "slot 'size': unknown type 'numbr' (expected one of: text, number" in err.problem


def test_slot_options_must_fit_the_type(tmp_path: Path) -> None:
    """choice needs choices, regex needs a valid pattern, min <= max."""
    for slot, problem in [
        ("{type: choice}", "needs a non-empty 'choices'"),
        ("{type: regex, pattern: '(['}", "bad regex"),
        ("{type: number, min: 5, max: 1}", "min 5.0 is greater than max 1.0"),
        ("{type: text, min: 1}", "apply to types number and time only"),
        ("{type: text, integer: true}", "integer applies to type number only"),
        ("{type: time, max: 25}", "hours from 0 to 24"),
        ("{type: text, synonyms: {a: [b]}}", "synonyms apply to type choice only"),
        ("{type: choice, choices: [a], synonyms: {b: [c]}}", "synonyms of 'b'"),
        ("{type: text, fill: [entity]}", "needs 'entity: KIND'"),
    ]:
        text = GOOD.replace("{type: number, min: 1, max: 9}", slot).replace(
            "{slot: size}", "{}").replace("Got {size}.", "Done.")
        assert problem in load_error(tmp_path, text).problem, slot


def test_workflow_name_must_be_a_subject_token(tmp_path: Path) -> None:
    """A name with a dot or space is rejected at the ``name:`` line."""
    err = load_error(tmp_path, GOOD.replace("name: demo", "name: my demo.x"))
    assert err.line == 1
    assert "workflow name 'my demo.x' must be" in err.problem


def test_misspelled_key_is_an_error_with_line(tmp_path: Path) -> None:
    """An unknown key (``tos:``) is rejected at its line instead of silently ignored."""
    text = GOOD.replace("        to: done", "        to: done\n        tos: done")
    err = load_error(tmp_path, text)
    assert err.line == line_of(text, "tos:")
    assert "states.ask.on[0].tos" in err.problem


def test_transition_needs_exactly_one_trigger(tmp_path: Path) -> None:
    """A transition with both a message and a button trigger is rejected."""
    text = GOOD.replace("        to: done", "        button: ok\n        to: done")
    err = load_error(tmp_path, text)
    assert err.line == line_of(text, "- message")
    assert "exactly one trigger" in err.problem


def test_final_state_cannot_have_transitions(tmp_path: Path) -> None:
    """Transitions out of a final state could never fire, so they are an error."""
    text = GOOD + "    on: [{message: any, to: ask}]\n"
    assert "a final state ends the run" in load_error(tmp_path, text).problem


def test_reserved_emit_name(tmp_path: Path) -> None:
    """An emit named like a workflow event kind (completed) would collide on the bus."""
    text = GOOD.replace("    say: Got {size}.", "    emit: completed")
    assert "emit name 'completed'" in load_error(tmp_path, text).problem


def test_timeout_is_modelled_and_validated() -> None:
    """A state's shortest timeout trigger is exposed; a non-positive timeout is rejected."""
    state = StateDef.model_validate(
        {"on": [{"timeout": 300, "to": "a"}, {"timeout": 60, "to": "b"},
                {"message": {}, "to": "c"}]}
    )
    assert state.timeout == 60
    assert StateDef().timeout is None
    with pytest.raises(ValueError, match="greater than 0"):
        TransitionDef.model_validate({"timeout": 0, "to": "a"})


def test_missing_file_and_wrong_suffix(tmp_path: Path) -> None:
    """A missing path or a non-workflow suffix is a WorkflowError naming the file."""
    with pytest.raises(WorkflowError, match="no such file or folder"):
        load_workflows([tmp_path / "nope"])
    with pytest.raises(WorkflowError, match="not a workflow file"):
        load_workflow_file(write(tmp_path, GOOD, "wf.json"))


# --------------------------------------------------------------------------- TOML
TOML = """\
name = "demo"
description = "A demo"
examples = ["hello demo"]
initial = "ask"

[slots]
size = { type = "number", min = 1, max = 9 }

[states.ask]
say = "How many?"

[[states.ask.on]]
message = { slot = "size" }
to = "done"

[states.done]
final = true
say = "Got {size}."
"""


def test_toml_loads_like_yaml(tmp_path: Path) -> None:
    """A TOML definition gives the same model as its YAML twin."""
    from_toml = load_workflow_file(write(tmp_path, TOML, "wf.toml"))
    from_yaml = load_workflow_file(write(tmp_path, GOOD, "wf.yaml"))
    assert from_toml.model_dump(exclude={"source"}) == from_yaml.model_dump(exclude={"source"})


def test_toml_errors_name_the_line(tmp_path: Path) -> None:
    """TOML check errors find the line of the key or table header (best effort)."""
    text = TOML.replace('to = "done"', 'to = "dne"')
    err = load_error(tmp_path, text, "wf.toml")
    assert err.line == line_of(text, 'to = "dne"')
    assert err.problem == "state 'ask': transition target 'dne' is not a state"
    orphan = TOML + '\n[states.orphan]\nfinal = true\n'
    err = load_error(tmp_path, orphan, "wf.toml")
    assert err.line == line_of(orphan, "[states.orphan]")


def test_toml_syntax_error_line(tmp_path: Path) -> None:
    """A TOML syntax error reports tomllib's line."""
    err = load_error(tmp_path, 'name = "x"\ninitial = \n', "wf.toml")
    assert err.line == 2 and "invalid TOML" in err.problem


# --------------------------------------------------------------------------- many files
def test_folder_loads_sorted_and_duplicates_name_both_files(tmp_path: Path) -> None:
    """A folder loads its workflow files in name order; one name twice names both files."""
    write(tmp_path, GOOD.replace("name: demo", "name: zed"), "a.yaml")
    write(tmp_path, GOOD, "b.yml")
    (tmp_path / "notes.txt").write_text("not a workflow")
    assert list(load_workflows([tmp_path])) == ["zed", "demo"]
    second = write(tmp_path, GOOD, "c.toml.yaml")
    with pytest.raises(WorkflowError) as info:
        load_workflows([tmp_path])
    assert str(info.value) == (
        f"{second}:1: workflow 'demo' is already defined in {tmp_path / 'b.yml'}"
    )


# --------------------------------------------------------------------------- Python
def code_workflow(**changes: object) -> WorkflowDef:
    fields: dict[str, object] = {
        "name": "coded",
        "slots": {"n": SlotDef(type="number")},
        "initial": "ask",
        "states": {
            "ask": {"say": "n?", "on": [TransitionDef(message={"slot": "n"}, to="end")]},
            "end": StateDef(final=True, say="n={n}"),
        },
    }
    fields.update(changes)
    return WorkflowDef.model_validate(fields)


def test_python_definition_passes_the_same_checks() -> None:
    """A WorkflowDef built in code is checked like a file; errors say <workflow NAME>."""
    good = code_workflow()
    check_workflow(good)
    assert load_workflows([good]) == {"coded": good}
    bad = code_workflow(initial="nowhere")
    with pytest.raises(WorkflowError) as info:
        load_workflows([bad])
    assert str(info.value) == "<workflow coded>: initial state 'nowhere' is not a state"
    assert info.value.file is None and info.value.line is None


# --------------------------------------------------------------------------- slots, templates
def test_number_slot_parsing() -> None:
    """number finds digits or numbers in words, keeps ints whole, enforces
    min/max/integer."""
    slot = SlotDef(type="number", min=1, max=20, integer=True)
    assert slot.parse("we are 4") == (True, 4)
    assert slot.parse("four of us") == (True, 4)
    assert slot.parse("a party of twelve") == (True, 12)
    assert slot.parse("21")[0] is False
    assert slot.parse("2.5")[0] is False
    assert slot.parse("lots")[0] is False
    assert SlotDef(type="number").parse("2,5") == (True, 2.5)


# 2025-12-31 12:00 UTC
NEW_YEARS_EVE = dt.datetime(2025, 12, 31, 12, tzinfo=dt.UTC).timestamp()


def test_other_slot_types_parse() -> None:
    """email, choice, regex, date, time and text validate and normalise as documented."""
    assert SlotDef(type="email").parse("it's ann@example.com thanks") == (True, "ann@example.com")
    assert SlotDef(type="email").parse("ann at example")[0] is False
    choice = SlotDef(type="choice", choices=["low", "urgent"], synonyms={"urgent": ["asap"]})
    assert choice.parse("URGENT") == (True, "urgent")
    assert choice.parse("it's urgent, please") == (True, "urgent")
    assert choice.parse("ASAP") == (True, "urgent")
    assert choice.parse("medium")[0] is False
    assert SlotDef(type="regex", pattern=r"\d{4}").parse("code 1234 ok") == (True, "1234")
    date = SlotDef(type="date")
    assert date.parse("14/06/2025") == (True, "2025-06-14")
    assert date.parse("2025-06-14") == (True, "2025-06-14")
    assert date.parse("31/02/2025")[0] is False
    assert date.parse("tomorrow", now=NEW_YEARS_EVE) == (True, "2026-01-01")
    assert date.parse("next friday", now=NEW_YEARS_EVE) == (True, "2026-01-09")
    time = SlotDef(type="time", min=11, max=23)
    assert time.parse("8pm") == (True, "20:00")
    assert time.parse("around 8", now=NEW_YEARS_EVE) == (True, "20:00")
    assert time.parse("8") == (True, "20:00")  # a bare hour, within opening hours
    assert time.parse("half past seven") == (True, "19:30")
    assert time.parse("3am")[0] is False
    assert SlotDef().parse("  hi  ") == (True, "hi")
    assert SlotDef().parse("   ")[0] is False


def test_templates() -> None:
    """Templates list their placeholders, escape doubled braces and render missing slots empty."""
    assert template_fields("A {a} and {b}, {{literal}}") == ["a", "b"]
    assert render_template("{a} {{x}} [{b}]", {"a": 1}) == "1 {x} []"
    assert render_template("{a}", {"a": "{b}"}) == "{b}"  # user text is never re-parsed
    for bad in ("{", "}", "{a.b}", "{a!r}", "{a:>3}", "{}"):
        with pytest.raises(ValueError):
            template_fields(bad)


def test_docs_examples_load(tmp_path: Path) -> None:
    """Every complete YAML/TOML workflow in docs/workflows.md loads and passes the checks."""
    doc = (Path(__file__).parent.parent / "docs" / "workflows.md").read_text()
    blocks = re.findall(r"```(yaml|toml)\n(.*?)```", doc, re.S)
    complete = [(kind, text) for kind, text in blocks if re.match(r"name\s*[:=]", text)]
    assert len(complete) >= 3
    names = []
    for n, (kind, text) in enumerate(complete):
        names.append(load_workflow_file(write(tmp_path, text, f"doc{n}.{kind}")).name)
    assert names == ["feedback", "fallback", "demo"]
    broken = complete[0][1].replace("  thanks:\n", "  thank_you:\n")
    err = load_error(tmp_path, broken, "feedback.yaml")
    assert f"feedback.yaml:{err.line}: {err.problem}" in doc


# --------------------------------------------------------------------------- new actions
def test_handoff_state_needs_a_way_back(tmp_path: Path) -> None:
    """A handoff state must listen for handoff.end (how the agent hands back)."""
    text = """\
    name: ho
    initial: wait
    states:
      wait:
        handoff: true
        on:
          - timeout: 60
            to: done
      done: {final: true}
    """
    error = load_error(tmp_path, text)
    assert error.line == line_of(text, "handoff: true")
    assert "handoff.end" in error.problem


def test_ask_needs_an_error_branch_and_a_valid_subject(tmp_path: Path) -> None:
    """An ask state needs 'reply: error'; a 'reply' without 'ask' and a wildcard
    subject are errors with their lines."""
    text = """\
    name: asks
    initial: look
    states:
      look:
        ask: {subject: orders.status}
        on:
          - reply: ok
            to: done
      done: {final: true}
    """
    error = load_error(tmp_path, text)
    assert error.line == line_of(text, "ask:") and "reply: error" in error.problem
    wildcard = text.replace("orders.status", "orders.*").replace("reply: ok", "reply: error")
    error = load_error(tmp_path, wildcard)
    assert "subject 'orders.*'" in error.problem and error.line == line_of(wildcard, "ask:")
    orphan = text.replace("        ask: {subject: orders.status}\n", "")
    assert "need an 'ask'" in load_error(tmp_path, orphan).problem


def test_router_event_names_are_reserved(tmp_path: Path) -> None:
    """'event: timeout' is refused: timeouts and replies have their own triggers."""
    text = GOOD.replace("- message: {slot: size}", "- event: timeout")
    error = load_error(tmp_path, text)
    assert "router's own" in error.problem
    assert error.line == line_of(text, "event: timeout")


def test_graph_in_mermaid_and_dot() -> None:
    """The graph names every state and transition with its trigger, in both formats."""
    from commhub.core.engine.graph import render_graph

    defn = load_workflows([builtin.DEFINITIONS])["order_status"]
    mermaid = render_graph(defn, "mermaid")
    assert mermaid.startswith("stateDiagram-v2\n    [*] --> ask_order\n")
    assert "    looking_up --> not_found : reply ok if status = unknown\n" in mermaid
    assert "    looking_up : ask shop.orders.status\n" in mermaid
    assert "    found --> [*]\n" in mermaid
    dot = render_graph(defn, "dot")
    assert dot.startswith('digraph "order_status" {')
    assert '"ask_order" -> "looking_up" [label="message slot=order_id"];' in dot
    assert '"found" [label="found", shape=doublecircle];' in dot
    with pytest.raises(ValueError, match="unknown graph format"):
        render_graph(defn, "svg")
