"""Load-time checks of a workflow definition: :func:`check_workflow`.

Everything pydantic cannot see on its own is checked here, once, when a definition is
loaded or built (never at run time): names are subject tokens, slot options fit their
type, templates and ``set``/``emit`` name declared slots, regexes compile, transition
targets exist, every state is reachable and can reach a final state.

The first problem found is raised as a :class:`~commhub.core.workflow.WorkflowError`
reading ``file:line: problem`` (``book_table.yaml:12: state 'confirm': transition
target 'dne' is not a state``), or ``<workflow NAME>: problem`` for a definition built
in code. :func:`check_workflow` is also importable from :mod:`commhub.core.workflow`.

Warnings are for definitions that load but will classify badly; they never stop a
load, and read like errors (``file:line: problem``). :func:`example_warnings`: too few
examples, examples shorter than two words; :func:`overlap_warnings`: examples of one
workflow that the classifier, trained on all of them, still scores high for another.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from commhub.core.engine.model import (
    SLOT_TYPES,
    Path_,
    SlotDef,
    StateDef,
    TransitionDef,
    WorkflowDef,
    template_fields,
)
from commhub.core.envelope import Alternative
from commhub.core.routing.state import HANDOFF_END_EVENT, ROUTER_EVENTS

__all__ = ["MIN_EXAMPLES", "MIN_EXAMPLE_WORDS", "check_workflow", "example_warnings",
           "overlap_warnings"]

MIN_EXAMPLES = 5  # fewer, and the classifier has too little to tell a workflow by
MIN_EXAMPLE_WORDS = 2  # a one-word example teaches a word, not a way of asking

# Workflow-event kinds share the subject space ``evt.workflow.{wf}.{kind}`` with emits.
_RESERVED_EMITS = {
    "started", "transition", "completed", "failed", "expired", "cancelled", "emitted",
    "handoff",
}
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_DOTTED_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_SUBJECT_RE = re.compile(r"^[^.*>\s]+(\.[^.*>\s]+)*$")


def check_workflow(defn: WorkflowDef) -> None:
    """Check a definition; raise :class:`WorkflowError` for the first problem found.

    Checks, in order: the name is a subject token; slot types and their options; the
    initial state exists; each state's transitions (targets exist, slots known, regexes
    compile, event names valid and not the router's own, no transitions out of a final
    state; an ``ask`` has a valid subject and a ``reply: error`` transition, ``reply``
    triggers only where there is an ``ask``; a handoff state is not final and takes
    ``event: handoff.end``); every template and ``set``/``emit``/``ask`` names a declared
    slot; no state is unreachable from ``initial``;
    every non-final state has a way out, and a final state can be reached from it.
    """
    if not _TOKEN_RE.match(defn.name):
        raise defn.error(("name",), f"workflow name {defn.name!r} must be 1-128 letters, "
                         "digits, '-' or '_' (it is a subject token)")
    for slot_name, slot in defn.slots.items():
        _check_slot(defn, slot_name, slot)
    if not defn.states:
        raise defn.error(("states",), "a workflow needs at least one state")
    if defn.initial not in defn.states:
        raise defn.error(("initial",), f"initial state {defn.initial!r} is not a state")
    for state_name, state in defn.states.items():
        _check_state(defn, state_name, state)
    _check_graph(defn)


def _check_slot(defn: WorkflowDef, name: str, slot: SlotDef) -> None:
    path: Path_ = ("slots", name)
    if not name.isidentifier():
        raise defn.error(path, f"slot name {name!r} must be a Python-style identifier")
    if slot.type not in SLOT_TYPES:
        raise defn.error((*path, "type"), f"slot {name!r}: unknown type {slot.type!r} "
                         f"(expected one of: {', '.join(SLOT_TYPES)})")
    if slot.type not in ("number", "time") and (slot.min is not None or slot.max is not None):
        raise defn.error(path, f"slot {name!r}: min and max apply to types number and time only")
    if slot.type != "number" and slot.integer:
        raise defn.error(path, f"slot {name!r}: integer applies to type number only")
    if slot.type == "time" and any(v is not None and not 0 <= v <= 24
                                   for v in (slot.min, slot.max)):
        raise defn.error(path, f"slot {name!r}: a time's min and max are hours from 0 to 24")
    if slot.min is not None and slot.max is not None and slot.min > slot.max:
        raise defn.error(path, f"slot {name!r}: min {slot.min} is greater than max {slot.max}")
    if slot.type == "choice" and not slot.choices:
        raise defn.error(path, f"slot {name!r}: type choice needs a non-empty 'choices' list")
    if slot.type != "choice" and slot.choices is not None:
        raise defn.error((*path, "choices"), f"slot {name!r}: choices apply to type choice only")
    if slot.synonyms and slot.type != "choice":
        raise defn.error((*path, "synonyms"), f"slot {name!r}: synonyms apply to type choice only")
    for choice in slot.synonyms:
        if choice not in (slot.choices or ()):
            raise defn.error((*path, "synonyms"),
                             f"slot {name!r}: synonyms of {choice!r}, which is not a choice")
    if "entity" in slot.fill and slot.entity_kind(name) is None:
        raise defn.error((*path, "fill"), f"slot {name!r}: a {slot.type} slot filled from an "
                         "entity needs 'entity: KIND' (number, date, time, email, or a choice "
                         "slot's name)")
    if slot.confirm is not None:
        _check_template(defn, (*path, "confirm"), f"slot {name!r}", slot.confirm)
    if slot.type == "regex":
        if not slot.pattern:
            raise defn.error(path, f"slot {name!r}: type regex needs a 'pattern'")
        _check_regex(defn, (*path, "pattern"), f"slot {name!r}", slot.pattern)
    elif slot.pattern is not None:
        raise defn.error((*path, "pattern"), f"slot {name!r}: pattern applies to type regex only")


def _check_regex(defn: WorkflowDef, path: Path_, what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise defn.error(path, f"{what}: bad regex {pattern!r}: {exc}") from None


def _check_template(defn: WorkflowDef, path: Path_, what: str, template: str) -> None:
    try:
        fields = template_fields(template)
    except ValueError as exc:
        raise defn.error(path, f"{what}: bad template {template!r}: {exc}") from None
    for field in fields:
        if field not in defn.slots:
            raise defn.error(path, f"{what}: template {template!r} uses unknown slot {{{field}}}")


def _check_slot_ref(defn: WorkflowDef, path: Path_, what: str, slot: str) -> None:
    if slot not in defn.slots:
        raise defn.error(path, f"{what}: unknown slot {slot!r}")


def _templates_in(value: Any, path: Path_) -> Iterator[tuple[Path_, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _templates_in(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _templates_in(item, (*path, index))


def _check_state(defn: WorkflowDef, name: str, state: StateDef) -> None:
    base: Path_ = ("states", name)
    what = f"state {name!r}"
    if not _TOKEN_RE.match(name):
        raise defn.error(base, f"state name {name!r} must be letters, digits, '-' or '_'")
    for i, say in enumerate(state.say):
        _check_template(defn, (*base, "say", i, "text"), what, say.text)
        for j, button in enumerate(say.buttons):
            _check_template(defn, (*base, "say", i, "buttons", j, "title"), what, button.title)
    if state.reprompt is not None:
        _check_template(defn, (*base, "reprompt"), what, state.reprompt)
    for slot, value in state.set.items():
        _check_slot_ref(defn, (*base, "set", slot), f"{what}: set", slot)
        for path, template in _templates_in(value, (*base, "set", slot)):
            _check_template(defn, path, what, template)
    for i, emit in enumerate(state.emit):
        path = (*base, "emit", i)
        if not _DOTTED_RE.match(emit.name) or emit.name in _RESERVED_EMITS:
            raise defn.error((*path, "name"), f"{what}: emit name {emit.name!r} must be "
                             "dot-separated subject tokens and not a workflow event kind "
                             f"({', '.join(sorted(_RESERVED_EMITS))})")
        for tpath, template in _templates_in(emit.data, (*path, "data")):
            _check_template(defn, tpath, what, template)
    if state.final and state.on:
        raise defn.error((*base, "on"), f"{what}: a final state ends the run, so it can have "
                         "no transitions")
    for i, transition in enumerate(state.on):
        _check_transition(defn, (*base, "on", i), what, transition)
    _check_ask(defn, base, what, state)
    if state.handoff:
        if state.final:
            raise defn.error((*base, "handoff"), f"{what}: a handoff state cannot be final "
                             "(the run waits there until the agent ends the handoff)")
        if not any(t.event == HANDOFF_END_EVENT for t in state.on):
            raise defn.error((*base, "handoff"), f"{what}: a handoff state needs a transition "
                             f"on 'event: {HANDOFF_END_EVENT}' (how the agent hands back)")


def _check_ask(defn: WorkflowDef, base: Path_, what: str, state: StateDef) -> None:
    replies = [t for t in state.on if t.reply is not None]
    if state.ask is None:
        if replies:
            raise defn.error((*base, "on"), f"{what}: 'reply' transitions need an 'ask' in "
                             "the same state")
        return
    path = (*base, "ask")
    if state.final:
        raise defn.error(path, f"{what}: a final state ends the run, so it cannot wait for "
                         "an 'ask'")
    if not _SUBJECT_RE.match(state.ask.subject):
        raise defn.error((*path, "subject"), f"{what}: ask subject {state.ask.subject!r} must "
                         "be dot-separated NATS subject tokens without wildcards")
    for tpath, template in _templates_in(state.ask.data, (*path, "data")):
        _check_template(defn, tpath, what, template)
    if not any(t.reply == "error" for t in replies):
        raise defn.error(path, f"{what}: a state that asks a service needs a 'reply: error' "
                         "transition (taken when the service fails or does not answer)")


def _check_transition(defn: WorkflowDef, path: Path_, what: str, t: TransitionDef) -> None:
    if t.to not in defn.states:
        raise defn.error((*path, "to"), f"{what}: transition target {t.to!r} is not a state")
    if t.message is not None:
        if t.message.match is not None:
            _check_regex(defn, (*path, "message", "match"), what, t.message.match)
        if t.message.slot is not None:
            _check_slot_ref(defn, (*path, "message", "slot"), what, t.message.slot)
    if t.event is not None and not _DOTTED_RE.match(t.event):
        raise defn.error((*path, "event"), f"{what}: event name {t.event!r} must be "
                         "dot-separated letters, digits, '-' or '_'")
    if t.event in ROUTER_EVENTS:
        raise defn.error((*path, "event"), f"{what}: event name {t.event!r} is the router's "
                         f"own ({', '.join(ROUTER_EVENTS)}); use a 'timeout:' or 'reply:' "
                         "trigger instead")
    if t.if_ is not None:
        _check_slot_ref(defn, (*path, "if", "slot"), f"{what}: guard", t.if_.slot)
    if t.invalid is not None:
        if t.slot is None:
            raise defn.error((*path, "invalid"), f"{what}: 'invalid' needs a message slot to "
                             "validate")
        _check_template(defn, (*path, "invalid"), what, t.invalid)


def _check_graph(defn: WorkflowDef) -> None:
    reached = _closure([defn.initial], lambda s: [t.to for t in defn.states[s].on])
    for name in defn.states:
        if name not in reached:
            raise defn.error(("states", name), f"state {name!r} is unreachable from initial "
                             f"state {defn.initial!r}")
    finals = [name for name, state in defn.states.items() if state.final]
    incoming: dict[str, list[str]] = {name: [] for name in defn.states}
    for name, state in defn.states.items():
        for t in state.on:
            incoming[t.to].append(name)
    can_finish = _closure(finals, lambda s: incoming[s])
    for name, state in defn.states.items():
        if not state.final and not state.on:
            raise defn.error(("states", name), f"state {name!r}: no way out (not final and no "
                             "transitions)")
    for name, state in defn.states.items():
        if not state.final and name not in can_finish:
            raise defn.error(("states", name), f"state {name!r}: no way out (no path from it "
                             "to a final state)")


def _closure(start: Iterable[str], next_of: Any) -> set[str]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(next_of(name))
    return seen


# -- warnings ----------------------------------------------------------------------------
def example_warnings(defn: WorkflowDef, fallback: str = "fallback") -> list[str]:
    """Warnings about ``defn``'s examples (none for the ``fallback`` workflow, which the
    classifier never picks): fewer than :data:`MIN_EXAMPLES` (none at all: only a start
    button can start it), and each example shorter than :data:`MIN_EXAMPLE_WORDS` words."""
    if defn.name == fallback:
        return []
    found = []
    count = len(defn.examples)
    if count == 0:
        found.append(str(defn.error(("name",), f"workflow {defn.name!r} has no examples: "
                                    "the classifier never picks it (only a start button "
                                    "can start it)")))
    elif count < MIN_EXAMPLES:
        found.append(str(defn.error(("examples",), f"workflow {defn.name!r} has {count} "
                                    f"example{'s' if count != 1 else ''}; give it at least "
                                    f"{MIN_EXAMPLES} (a dozen varied ones is better)")))
    for i, example in enumerate(defn.examples):
        if len(example.split()) < MIN_EXAMPLE_WORDS:
            found.append(str(defn.error(("examples", i), f"workflow {defn.name!r}: example "
                                        f"{example!r} is shorter than {MIN_EXAMPLE_WORDS} "
                                        "words; write it as a user would ask")))
    return found


def overlap_warnings(
    definitions: Mapping[str, WorkflowDef],
    rank: Callable[[Sequence[str]], list[list[Alternative]]],
    threshold: float,
) -> list[str]:
    """Warnings about examples that overlap another workflow's: ``rank`` is a classifier
    trained on all the examples of ``definitions`` (best first); an example of A whose
    ranking gives another workflow B at least ``threshold``, or more than A, would start
    B (or make the router ask which one) although the classifier learnt it as A. One
    warning per example, naming the workflow it scores highest for. Near misses are not
    found this way (the classifier has seen every example); ``commhub bench classifier``
    measures held-out accuracy."""
    owned = [(name, i, text) for name, defn in definitions.items()
             for i, text in enumerate(defn.examples)]
    if len({name for name, _, _ in owned}) < 2:
        return []
    found = []
    for (name, i, text), ranked in zip(owned, rank([t for _, _, t in owned]), strict=True):
        own = next((a.confidence for a in ranked if a.workflow == name), 0.0)
        others = [a for a in ranked if a.workflow != name
                  and (a.confidence >= threshold or a.confidence > own)]
        if others:
            other = max(others, key=lambda a: a.confidence)
            found.append(str(definitions[name].error(
                ("examples", i),
                f"workflow {name!r}: example {text!r} scores {other.confidence:.2f} for "
                f"{other.workflow!r} ({own:.2f} for its own workflow; threshold "
                f"{threshold:.2f}): the two workflows' examples overlap",
            )))
    return found
