"""Small talk detection and its replies, as pure functions: whole-message phrases, no
false positive on the workflows' own example phrases, overrides from the settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from commhub.core.routing.smalltalk import REPLIES, SmallTalk, detect
from commhub.core.workflow import load_workflows
from commhub.workflows.builtin import DEFINITIONS

ENTITY_SET = Path(__file__).resolve().parent.parent / "bench" / "data" / "entities_en.yaml"

SAID = [
    ("hello", "greeting"), ("Hi!", "greeting"), ("hey there :)", "greeting"),
    ("what's up?", "greeting"), ("Good morning", "greeting"), ("how are you?", "greeting"),
    ("thanks", "thanks"), ("Thank you very much!", "thanks"), ("cheers", "thanks"),
    ("bye", "goodbye"), ("See you later", "goodbye"), ("that's all, thanks", "goodbye"),
    ("what can you do?", "capabilities"), ("help", "capabilities"),
    ("hi, what can you do?", "capabilities"), ("How can you help me?", "capabilities"),
    ("are you a bot?", "bot"), ("Am I talking to a human?", "bot"), ("are you real", "bot"),
]


@pytest.mark.parametrize(("text", "intent"), SAID)
def test_small_talk_is_recognised(text: str, intent: str) -> None:
    assert detect(text) == intent


def test_no_workflow_example_and_no_request_is_small_talk() -> None:
    """Measured against false positives: none of the built-in workflows' example
    phrases, none of the labelled entity phrases, and no request that merely starts
    with a greeting."""
    examples = [e for d in load_workflows([DEFINITIONS]).values() for e in d.examples]
    phrases = [row["text"] for row in yaml.safe_load(ENTITY_SET.read_text())["rows"]]
    requests = ["hello, I'd like to book a table", "hi, where is my order?",
                "thanks, and can you also book a table for 2?", "help me book a table",
                "I need help with my account", "no thanks, start over", "bye the way, 4 people"]
    hits = [t for t in [*examples, *phrases, *requests] if detect(t) is not None]
    assert len(examples) > 40
    # The entity set's phrases without entities include four that are small talk.
    assert hits == ["hello", "what's up?", "are you a bot?", "thanks a lot"]


def test_flow_authors_override_a_text_or_turn_an_intent_off() -> None:
    talk = SmallTalk.from_settings({"greeting": "Hi, I'm Resto!", "thanks": False,
                                    "bot": True})
    assert talk.intent("hello") == "greeting" and talk.reply("greeting") == "Hi, I'm Resto!"
    assert talk.intent("thanks") is None  # off: classified like any text
    assert talk.reply("bot") == REPLIES["bot"]
    with pytest.raises(ValueError, match="unknown small-talk intent 'weather'"):
        SmallTalk.from_settings({"weather": "Sunny."})
