"""What a turn showed, against what a test expects of it: pure comparisons.

An :class:`Observed` is what one input produced, as far as it can be seen (in process
everything; against a hub over WebSocket only the replies, unless a NATS URL shows the
rest: ``hidden`` names what could not be seen, and why). :func:`check_turn` compares it
with a turn's expectations and returns every :class:`Mismatch` (expected, got, the line
of the expectation) and a note for each expectation it could not check.

Replies are strict: when a turn lists ``bot`` replies, they must be all the replies,
in order. A turn that lists none does not check its replies (``silent: true`` says
there must be none). ``events`` must happen in the order listed, with others allowed
in between.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from commhub.core.conversation.testfile import (
    BotExpect,
    ClassifiedExpect,
    EventExpect,
    Step,
    Turn,
    ValueExpect,
)

__all__ = [
    "Mismatch",
    "Observed",
    "SeenClassification",
    "SeenEvent",
    "ShownReply",
    "Unchecked",
    "check_turn",
    "find_button",
    "shown_buttons",
]


@dataclass(frozen=True)
class ShownReply:
    """A reply as the user sees it: its text and buttons (``{"title", "payload"}``)."""

    text: str
    buttons: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class SeenEvent:
    """A workflow event (its kind) or an emitted event (its name), with its data."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SeenClassification:
    """The classification recorded for a message."""

    decision: str | None
    workflow: str | None
    confidence: float
    alternatives: tuple[tuple[str, float], ...] = ()

    def describe(self) -> str:
        ranked = ", ".join(f"{name} {confidence:.2f}" for name, confidence in self.alternatives)
        chosen = f" {self.workflow}" if self.workflow else ""
        return (f"{self.decision}{chosen} (confidence {self.confidence:.2f}"
                + (f"; ranked: {ranked})" if ranked else ")"))


@dataclass
class Observed:
    """What one input produced. ``hidden`` maps an expectation kind (``state``,
    ``events``...) that could not be observed to the reason."""

    replies: list[ShownReply] = field(default_factory=list)
    events: list[SeenEvent] = field(default_factory=list)
    classification: SeenClassification | None = None
    workflow: str | None = None
    state: str | None = None
    slots: dict[str, Any] = field(default_factory=dict)
    hidden: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Unchecked:
    """An expectation that could not be checked (its line and kind), and why."""

    line: int
    kind: str
    reason: str


@dataclass(frozen=True)
class Mismatch:
    """One expectation that did not hold: where it is written, what, expected, got."""

    line: int
    what: str
    expected: str
    got: str


# ---------------------------------------------------------------------------------------
def check_turn(turn: Turn, observed: Observed) -> tuple[list[Mismatch], list[Unchecked]]:
    """The mismatches of ``turn``'s expectations with ``observed``, and the
    expectations that could not be checked."""
    mismatches: list[Mismatch] = []
    notes: list[Unchecked] = []
    bots = [s for s in turn.expect if s.kind == "bot"]
    for step in turn.expect:
        if step.kind in observed.hidden:
            notes.append(Unchecked(step.line, step.kind, observed.hidden[step.kind]))
            continue
        if step.kind == "bot":
            mismatches.extend(_reply(step, bots.index(step), observed.replies))
        elif step.kind == "silent" and observed.replies:
            mismatches.append(Mismatch(step.line, "replies", "(no reply)",
                                       _replies(observed.replies)))
        elif step.kind == "classified":
            mismatches.extend(_classified(step, observed.classification))
        elif step.kind == "workflow" and observed.workflow != step.value:
            mismatches.append(Mismatch(step.line, "workflow", _name(step.value),
                                       _name(observed.workflow)))
        elif step.kind == "state" and observed.state != step.value:
            where = f" (workflow {observed.workflow})" if observed.workflow else ""
            mismatches.append(Mismatch(step.line, "state", step.value,
                                       f"{_name(observed.state)}{where}"))
        elif step.kind == "slots":
            mismatches.extend(_slots(step, observed.slots))
        elif step.kind == "events":
            mismatches.extend(_events(step, observed.events))
    if bots and "bot" not in observed.hidden:
        for i, extra in enumerate(observed.replies[len(bots):], start=len(bots) + 1):
            mismatches.append(Mismatch(bots[-1].line, f"reply {i}", "(no more replies)",
                                       _reply_text(extra)))
    return mismatches, notes


def find_button(shown: Sequence[ShownReply], label: str) -> dict[str, Any] | None:
    """The payload of the button ``label`` names: by title (case-insensitive), else by
    its payload's ``value`` or ``start``; the newest reply first. None if no reply
    shown so far offers it."""
    wanted = label.strip().casefold()
    for key in ("title", "value", "start"):
        for reply in reversed(shown):
            for button in reply.buttons:
                payload = button.get("payload") or {}
                found = button.get("title") if key == "title" else payload.get(key)
                if found is not None and str(found).strip().casefold() == wanted:
                    return dict(payload)
    return None


def shown_buttons(shown: Sequence[ShownReply]) -> list[str]:
    """The titles of the buttons offered so far, newest reply first, each once (for a
    report)."""
    titles = [str(b.get("title")) for r in reversed(shown) for b in r.buttons]
    return list(dict.fromkeys(titles))


# ---------------------------------------------------------------------------------------
def _reply(step: Step, index: int, replies: Sequence[ShownReply]) -> list[Mismatch]:
    expect: BotExpect = step.value
    what = f"reply {index + 1}"
    if index >= len(replies):
        got = "(no reply)" if not replies else f"(only {len(replies)} replies)"
        return [Mismatch(step.line, what, expect.describe_text(), got)]
    reply = replies[index]
    out = []
    if not expect.text_matches(reply.text):
        out.append(Mismatch(step.line, what, expect.describe_text(), reply.text))
    if expect.buttons is not None:
        buttons = list(reply.buttons)
        if len(buttons) != len(expect.buttons) or not all(
            e.matches(b) for e, b in zip(expect.buttons, buttons, strict=False)
        ):
            out.append(Mismatch(step.line, f"{what} buttons",
                                _list(b.describe() for b in expect.buttons),
                                _list(_button(b, e is not None and e.payload is not None)
                                      for b, e in _pairs(buttons, expect.buttons))))
    return out


def _classified(step: Step, seen: SeenClassification | None) -> list[Mismatch]:
    expect: ClassifiedExpect = step.value
    got = seen.describe() if seen is not None else "none (no classification recorded)"
    if expect.none:
        return [] if seen is None else [Mismatch(step.line, "classification", "none", got)]
    wanted = _describe_classified(expect)
    if seen is None:
        return [Mismatch(step.line, "classification", wanted, got)]
    decision_ok = (seen.decision == expect.decision if expect.decision is not None
                   else seen.decision in ("workflow", "button"))
    workflow_ok = expect.workflow is None or seen.workflow == expect.workflow
    confident = expect.min_confidence is None or seen.confidence >= expect.min_confidence
    if decision_ok and workflow_ok and confident:
        return []
    return [Mismatch(step.line, "classification", wanted, got)]


def _describe_classified(expect: ClassifiedExpect) -> str:
    parts = [expect.decision or "workflow"]
    if expect.workflow:
        parts.append(expect.workflow)
    if expect.min_confidence is not None:
        parts.append(f"(confidence at least {expect.min_confidence:.2f})")
    return " ".join(parts)


def _slots(step: Step, slots: dict[str, Any]) -> list[Mismatch]:
    expected: dict[str, ValueExpect] = step.value
    return [Mismatch(step.line, f"slot {name}", _value(want.raw, want.value),
                     _value(None, slots.get(name)))
            for name, want in expected.items() if not want.matches(slots.get(name))]


def _events(step: Step, seen: Sequence[SeenEvent]) -> list[Mismatch]:
    expected: tuple[EventExpect, ...] = step.value
    at = 0
    for want in expected:
        while at < len(seen) and not _event_matches(want, seen[at]):
            at += 1
        if at == len(seen):
            return [Mismatch(step.line, "events", _list(_describe_event(e) for e in expected)
                             + " (in this order)",
                             _list(_describe_seen(e) for e in seen) or "(none)")]
        at += 1
    return []


def _event_matches(want: EventExpect, seen: SeenEvent) -> bool:
    if want.name != seen.name:
        return False
    return want.data is None or all(v.matches(seen.data.get(k)) for k, v in want.data.items())


def _describe_event(event: EventExpect) -> str:
    if event.data is None:
        return event.name
    return f"{event.name} {{{', '.join(f'{k}: {v.raw}' for k, v in event.data.items())}}}"


def _describe_seen(event: SeenEvent) -> str:
    if not event.data or event.name in ("started", "transition", "completed", "cancelled",
                                        "expired", "failed", "handoff"):
        return event.name
    return f"{event.name} {{{', '.join(f'{k}: {_value(None, v)}' for k, v in event.data.items())}}}"


def _pairs(got: list[dict[str, Any]], expected: Sequence[Any]) -> list[tuple[Any, Any]]:
    return [(b, expected[i] if i < len(expected) else None) for i, b in enumerate(got)]


def _button(button: dict[str, Any], with_payload: bool) -> str:
    title = str(button.get("title"))
    if not with_payload:
        return title
    return f"{title} {json.dumps(button.get('payload'), sort_keys=True)}"


def _list(items: Any) -> str:
    return "[" + ", ".join(items) + "]"


def _replies(replies: Sequence[ShownReply]) -> str:
    return " / ".join(_reply_text(r) for r in replies)


def _reply_text(reply: ShownReply) -> str:
    if not reply.buttons:
        return reply.text
    return f"{reply.text} {_list(str(b.get('title')) for b in reply.buttons)}"


def _name(value: str | None) -> str:
    return "none" if value is None else value


def _value(raw: str | None, value: Any) -> str:
    if raw is not None:
        return raw
    return "(not set)" if value is None else str(value)
