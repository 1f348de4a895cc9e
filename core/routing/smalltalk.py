"""Small talk: greetings, thanks, goodbyes, "what can you do?", "are you a bot?".

Pure data and functions, no I/O. :func:`detect` says which small-talk intent a whole
message is, if any; the routing rules (:mod:`.rules`) answer it with :func:`reply`
without ending an active workflow, which then asks its question again.

**How it is detected: phrases, not the classifier.** A message is small talk when,
case and punctuation ignored, it *is* one of the phrases below (optionally after a
leading greeting: "hi, what can you do?"). Whole-message phrases cannot fire inside a
real request ("hello, I'd like to book a table" is a booking), need no training, and
leave the classifier's confidence calibration alone (hidden small-talk intents would
change the scores every workflow is measured by). Measured on the built-in workflows'
example phrases and the labelled entity set (``tests/test_smalltalk.py``): no false
positive; every listed variant is found.

**Overrides.** The hub setting ``smalltalk`` maps an intent to its reply text, or to
``false`` to turn it off (its messages then go to the classifier like any text):
``[smalltalk]`` in the config file, or ``COMMHUB_SMALLTALK='{"thanks": false}'``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from commhub.core.engine.fsm import normalize_phrase

__all__ = [
    "INTENTS",
    "PHRASES",
    "REPLIES",
    "SmallTalk",
    "detect",
]

#: Small-talk intents, in the order they are tried.
INTENTS = ("capabilities", "bot", "thanks", "goodbye", "greeting")

#: Whole messages (normalised) that are each intent.
PHRASES: dict[str, tuple[str, ...]] = {
    "greeting": (
        "hi", "hello", "hey", "hiya", "howdy", "yo", "greetings", "hi there", "hello there",
        "hey there", "good morning", "good afternoon", "good evening", "morning",
        "what s up", "whats up", "sup", "how are you", "how are you doing", "how s it going",
        "hows it going", "hello hello", "hi hi",
    ),
    "thanks": (
        "thanks", "thank you", "thanks a lot", "thank you very much", "thanks so much",
        "many thanks", "thx", "ty", "cheers", "great thanks", "ok thanks", "okay thanks",
        "thanks a bunch", "much appreciated", "perfect thanks", "thank you so much",
    ),
    "goodbye": (
        "bye", "goodbye", "bye bye", "see you", "see you later", "see ya", "good night",
        "that s all", "thats all", "that s all thanks", "that s it thanks", "ciao",
        "have a nice day", "talk to you later",
    ),
    "capabilities": (
        "what can you do", "what do you do", "help", "help me", "what can i ask",
        "what can i ask you", "what are my options", "how can you help", "how can you help me",
        "what can you help with", "what can you help me with", "menu", "options",
        "what do you offer", "what are you able to do", "what can you do for me",
    ),
    "bot": (
        "are you a bot", "are you human", "are you a human", "are you a robot",
        "am i talking to a bot", "am i talking to a human", "am i talking to a person",
        "is this a bot", "are you real", "are you a person", "is this a real person",
        "are you an ai", "are you a machine",
    ),
}

#: Built-in replies. ``capabilities`` and ``bot`` list the workflows as start buttons.
REPLIES: dict[str, str] = {
    "greeting": "Hello! I can help with:",
    "thanks": "You're welcome!",
    "goodbye": "Goodbye! Write any time if there is anything else.",
    "capabilities": "I can help with:",
    "bot": "Yes, I'm an automated assistant. I can help with:",
}

#: Intents whose reply lists what the bot can do, as start buttons.
LISTS_WORKFLOWS = frozenset({"greeting", "capabilities", "bot"})

_LEADING_GREETINGS = ("hi", "hello", "hey", "hi there", "hello there", "hey there")


def detect(text: str | None, phrases: Mapping[str, tuple[str, ...]] = PHRASES) -> str | None:
    """The small-talk intent the whole of ``text`` is, or None.

    A leading greeting may come first ("hi, what can you do?" is ``capabilities``,
    "hello!" alone ``greeting``).
    """
    said = normalize_phrase(text or "")
    if not said:
        return None
    for candidate in _without_greeting(said):
        for intent in INTENTS:
            if candidate in phrases.get(intent, ()):
                return intent
    return None


def _without_greeting(said: str) -> list[str]:
    out = [said]
    for greeting in sorted(_LEADING_GREETINGS, key=len, reverse=True):
        if said.startswith(greeting + " "):
            out.append(said[len(greeting) + 1:])
            break
    return out


@dataclass(frozen=True)
class SmallTalk:
    """The small talk in force: each intent's reply text, and the intents turned off.

    Build it with :meth:`from_settings` from the hub's ``smalltalk`` setting.
    """

    replies: Mapping[str, str] = field(default_factory=lambda: dict(REPLIES))
    off: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, overrides: Mapping[str, str | bool] | None) -> SmallTalk:
        """The built-in replies with ``overrides`` applied: a text replaces an intent's
        reply, ``false`` turns it off (``true`` keeps the built-in). Raises ValueError
        for an unknown intent."""
        replies = dict(REPLIES)
        off = set()
        for intent, value in (overrides or {}).items():
            if intent not in REPLIES:
                raise ValueError(f"unknown small-talk intent {intent!r} "
                                 f"(expected one of: {', '.join(REPLIES)})")
            if value is False:
                off.add(intent)
            elif isinstance(value, str):
                replies[intent] = value
        return cls(replies=replies, off=frozenset(off))

    def intent(self, text: str | None) -> str | None:
        """The small-talk intent of ``text`` that is turned on, or None."""
        found = detect(text)
        return None if found is None or found in self.off else found

    def reply(self, intent: str) -> str:
        return self.replies[intent]

    def lists_workflows(self, intent: str) -> bool:
        return intent in LISTS_WORKFLOWS
