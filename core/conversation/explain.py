"""What the router would do with a message: the ranking and the rule that applies.

:func:`explain` runs the classifier's ranking of a text through the real routing rules
(:func:`~commhub.core.routing.rules.decide`) for a conversation with no workflow
running, and says what they decided and why: answer small talk (the whole text is a
greeting, thanks, ...: not classified), start a workflow (its confidence reaches the
threshold), ask "Did you mean A or B?" (the top two are closer than
``clarify_margin``), or the fallback (nothing reaches the threshold). Pure.
"""

from __future__ import annotations

from commhub.core.engine.fsm import Engine
from commhub.core.envelope import Alternative, Message, Sender
from commhub.core.routing import rules
from commhub.core.routing.rules import RoutingPolicy
from commhub.core.routing.state import ConversationState

__all__ = ["explain"]


def explain(
    text: str, alternatives: list[Alternative], policy: RoutingPolicy, engine: Engine
) -> str:
    """Lines: the text, each ranked workflow with its confidence, then ``-> `` and the
    decision with its reason."""
    idle = ConversationState(conversation="try")
    message = Message(id="try", conversation="try", channel="try", direction="in",
                      sender=Sender(id="try"), text=text, ts=0.0)
    ranked = alternatives if rules.needs_classification(idle, message, policy, engine) else []
    decision = rules.decide(idle, message, ranked, policy, engine, None, 0.0)
    width = max([len(a.workflow) for a in ranked] + [8])
    lines = [f"{text!r}"]
    lines.extend(f"  {a.workflow.ljust(width)}  {a.confidence:.3f}" for a in ranked)
    lines.append(f"  -> {_why(decision, ranked, policy, text)}")
    return "\n".join(lines)


def _why(
    decision: rules.Decision, ranked: list[Alternative], policy: RoutingPolicy, text: str
) -> str:
    threshold = f"{policy.threshold:.2f}"
    if decision.action == "smalltalk":
        reply = decision.result.replies[0]
        shown = " and the start buttons" if reply.buttons else ""
        return (f"small talk ({policy.smalltalk.intent(text)}): answered with "
                f"\"{reply.text}\"{shown}; not classified")
    if decision.action == "clarify":
        first, second = ranked[0], ranked[1]
        gap = first.confidence - second.confidence
        asked = decision.result.replies[0].text if decision.result.replies else ""
        return (f"clarify: {asked} (both reach the threshold {threshold} and are "
                f"{gap:.3f} apart, less than clarify_margin {policy.clarify_margin:.2f})")
    if decision.action == "start":
        best = ranked[0]
        return f"start {best.workflow} ({best.confidence:.3f} reaches the threshold {threshold})"
    if not ranked:
        return f"fallback: nothing to classify (the fallback workflow {policy.fallback!r} starts)"
    best = ranked[0]
    return (f"fallback: no workflow reaches the threshold {threshold} (best: {best.workflow} "
            f"{best.confidence:.3f}); the fallback workflow {policy.fallback!r} starts")
