"""A workflow's state graph as Mermaid or Graphviz DOT text (``commhub workflows graph``).

Pure functions of a checked :class:`~commhub.core.workflow.WorkflowDef`: one node per
state (final states marked, handoff and ask states labelled), one edge per transition,
labelled with its trigger and guard, in the order the engine tries them.
"""

from __future__ import annotations

import json

from commhub.core.engine.model import StateDef, TransitionDef, WorkflowDef

__all__ = ["FORMATS", "render_graph", "to_dot", "to_mermaid", "transition_label"]

FORMATS = ("mermaid", "dot")


def transition_label(t: TransitionDef) -> str:
    """A short label: ``message slot=size``, ``button yes``, ``event x``,
    ``timeout 300s``, ``reply error``, plus ``if size = 1`` for a guard."""
    if t.message is not None:
        parts = [f"{k}={v}" for k, v in (("match", t.message.match), ("slot", t.message.slot))
                 if v is not None]
        label = " ".join(["message", *parts])
    elif t.button is not None:
        label = f"button {t.button}"
    elif t.event is not None:
        label = f"event {t.event}"
    elif t.timeout is not None:
        label = f"timeout {t.timeout:g}s"
    else:
        label = f"reply {t.reply}"
    if t.if_ is not None:
        condition = (f"= {t.if_.equals}" if t.if_.filled is None
                     else "filled" if t.if_.filled else "empty")
        label += f" if {t.if_.slot} {condition}"
    return label


def _node_note(state: StateDef) -> str:
    notes = []
    if state.handoff:
        notes.append("handoff")
    if state.ask is not None:
        notes.append(f"ask {state.ask.subject}")
    if state.emit:
        notes.append("emit " + ", ".join(e.name for e in state.emit))
    return ", ".join(notes)


def _mermaid_text(text: str) -> str:
    # Mermaid ends a statement at ";" and quotes with '"': write both as entity codes.
    return text.replace('"', "#quot;").replace(";", "#59;")


def to_mermaid(defn: WorkflowDef) -> str:
    """``stateDiagram-v2`` text; paste it in any Markdown viewer that renders Mermaid."""
    lines = ["stateDiagram-v2", f"    [*] --> {defn.initial}"]
    for name, state in defn.states.items():
        note = _node_note(state)
        if note:
            lines.append(f'    {name} : {_mermaid_text(note)}')
    for name, state in defn.states.items():
        for t in state.on:
            lines.append(f"    {name} --> {t.to} : {_mermaid_text(transition_label(t))}")
        if state.final:
            lines.append(f"    {name} --> [*]")
    return "\n".join(lines) + "\n"


def to_dot(defn: WorkflowDef) -> str:
    """Graphviz DOT text (``dot -Tsvg``); final states are double circles."""
    q = json.dumps  # a JSON string is a valid DOT quoted string
    lines = [f"digraph {q(defn.name)} {{", "    rankdir=LR;",
             '    node [shape=box, style=rounded];', '    __start [shape=point];',
             f"    __start -> {q(defn.initial)};"]
    for name, state in defn.states.items():
        note = _node_note(state)
        label = f"{name}\\n{note}" if note else name
        shape = ", shape=doublecircle" if state.final else ""
        lines.append(f"    {q(name)} [label={q(label).replace(chr(92) * 2, chr(92))}{shape}];")
    for name, state in defn.states.items():
        for t in state.on:
            lines.append(f"    {q(name)} -> {q(t.to)} [label={q(transition_label(t))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_graph(defn: WorkflowDef, fmt: str = "mermaid") -> str:
    """The graph in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "dot":
        return to_dot(defn)
    if fmt == "mermaid":
        return to_mermaid(defn)
    raise ValueError(f"unknown graph format {fmt!r} (expected one of: {', '.join(FORMATS)})")
