"""The default TF-IDF classifier: ranking, out-of-scope rejection, edge cases and the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pluggy
import pytest
from pydantic import ValidationError

from commhub.core import hookspecs
from commhub.core.classify import DEFAULT_THRESHOLD, routing_threshold
from commhub.core.config import Settings
from commhub.core.engine.fsm import Engine
from commhub.core.workflow import load_workflows
from commhub.plugins import tfidf
from commhub.plugins.tfidf import (
    BACKGROUND,
    TfidfClassifier,
    TfidfSettings,
    actions,
    calibrate_threshold,
    load_background,
)
from commhub.workflows.builtin import DEFINITIONS

THRESHOLD = DEFAULT_THRESHOLD  # the router's cut-off when the classifier has no calibration

IN_SCOPE = {
    "book a table for 4": "book_table",
    "I want to reserve a table tonight": "book_table",
    "table for two please": "book_table",
    "can I book for saturday": "book_table",
    "my printer is broken": "support_request",
    "I can't access my account": "support_request",
    "the app crashes when I open it": "support_request",
    "refund please, my order arrived broken": "support_request",
}
OUT_OF_SCOPE = [
    "what's the weather",
    "what's the weather in Paris",
    "who painted the Mona Lisa",
    "my dog likes to swim",
    "sing me a song",
    "how do I cook rice",
    "i love pizza",
    "xyzzy",
    "",
]


@pytest.fixture(scope="module")
def examples() -> dict[str, list[str]]:
    return Engine(load_workflows([DEFINITIONS])).examples()


@pytest.fixture(scope="module")
def fitted(examples: dict[str, list[str]]) -> TfidfClassifier:
    classifier = TfidfClassifier()
    classifier.fit(examples)
    return classifier


def test_in_scope_phrases_pick_their_workflow(fitted: TfidfClassifier) -> None:
    """Unseen phrasings of each built-in workflow rank it first, above the fixed default
    threshold and above the calibrated one."""
    assert fitted.threshold is not None
    ranked = fitted.rank(list(IN_SCOPE))
    for (text, expected), alternatives in zip(IN_SCOPE.items(), ranked, strict=True):
        assert alternatives[0].workflow == expected, text
        assert alternatives[0].confidence >= max(THRESHOLD, fitted.threshold), (
            text, alternatives)


def test_out_of_scope_phrases_fall_below_threshold(fitted: TfidfClassifier) -> None:
    """Unrelated text gives every workflow a confidence below the calibrated threshold
    (and so below the fixed default, which is higher)."""
    assert fitted.threshold is not None and fitted.threshold <= THRESHOLD
    for text, alternatives in zip(OUT_OF_SCOPE, fitted.rank(OUT_OF_SCOPE), strict=True):
        assert alternatives, text
        assert alternatives[0].confidence < fitted.threshold, (text, alternatives)


def test_rank_shape_order_and_hidden_background(
    fitted: TfidfClassifier, examples: dict[str, list[str]]
) -> None:
    """rank returns top-n workflows best first, confidences in [0, 1], never the background."""
    [one, two] = fitted.rank(["book a table", "hello"], top=1)
    assert len(one) == 1 and len(two) == 1
    [full] = fitted.rank(["book a table"], top=len(examples) + 2)
    assert full[0].workflow == "book_table"
    assert sorted(a.workflow for a in full) == sorted(examples)
    assert [a.confidence for a in full] == sorted((a.confidence for a in full), reverse=True)
    assert all(0.0 <= a.confidence <= 1.0 for a in full)
    assert full[0].confidence >= full[1].confidence
    assert sum(a.confidence for a in full) < 1.0  # the background keeps its share
    assert all(a.workflow != BACKGROUND for a in full)
    assert fitted.rank([]) == []
    assert fitted.model_id.startswith("tfidf-")


def test_no_workflows_ranks_nothing() -> None:
    """With no workflows (or none with examples) rank answers an empty list per text."""
    classifier = TfidfClassifier()
    classifier.fit({"empty": []})
    assert classifier.rank(["hello", "book a table"]) == [[], []]
    assert classifier.model_id.startswith("tfidf-")


def test_single_workflow_still_rejects_unrelated_text(examples: dict[str, list[str]]) -> None:
    """With one workflow the background class still keeps unrelated text below threshold."""
    classifier = TfidfClassifier()
    classifier.fit({"book_table": examples["book_table"]})
    [hit, miss] = classifier.rank(["reserve a table for six", "what's the weather in Paris"])
    assert hit[0].workflow == "book_table" and hit[0].confidence >= THRESHOLD
    assert miss[0].confidence < THRESHOLD


def test_single_workflow_without_background_is_certain() -> None:
    """Without the background class a lone workflow has nothing to compete with: confidence 1."""
    classifier = TfidfClassifier(TfidfSettings(background=False))
    classifier.fit({"only": ["a phrase"]})
    assert [[(a.workflow, a.confidence) for a in r] for r in classifier.rank(["x"])] == [
        [("only", 1.0)]]


def test_temperature_fitted_or_fixed(examples: dict[str, list[str]]) -> None:
    """A null temperature is fitted by cross-validation; a number is used as given."""
    fitted = TfidfClassifier()
    fitted.fit(examples)
    assert fitted._model is not None and fitted._model.temperature != 1.0
    fixed = TfidfClassifier(TfidfSettings(temperature=2.0))
    fixed.fit(examples)
    assert fixed._model is not None and fixed._model.temperature == 2.0


def test_rank_before_fit_raises() -> None:
    """rank() before fit() is a programming error and says so."""
    with pytest.raises(RuntimeError, match="before fit"):
        TfidfClassifier().rank(["hi"])


def test_background_is_shipped_and_clean(examples: dict[str, list[str]]) -> None:
    """The shipped background phrases load without comments and include no built-in example."""
    background = load_background()
    assert len(background) >= 60
    assert not any(line.startswith("#") for line in background)
    own = {phrase.casefold() for phrases in examples.values() for phrase in phrases}
    assert not own & {line.casefold() for line in background}


def test_cache_second_fit_loads_without_training(
    tmp_path: Path, examples: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second fit with the same examples loads the cached model and does not train."""
    first = TfidfClassifier(cache_dir=tmp_path)
    first.fit(examples)
    assert first.trained
    key = first.model_id.removeprefix("tfidf-")
    assert [p.name for p in tmp_path.iterdir()] == [f"tfidf-{key}-v{TfidfClassifier.version}.npz"]

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained although a cached model exists")

    monkeypatch.setattr(TfidfClassifier, "_train", no_training)
    second = TfidfClassifier(cache_dir=tmp_path)
    second.fit(examples)
    assert not second.trained and second.model_id == first.model_id
    assert second.rank(list(IN_SCOPE)) == first.rank(list(IN_SCOPE))


def test_cache_is_retrained_on_other_settings_or_a_corrupt_file(
    tmp_path: Path, examples: dict[str, list[str]]
) -> None:
    """A cached model from other settings, or an unreadable file, is retrained and replaced."""
    TfidfClassifier(cache_dir=tmp_path).fit(examples)
    other = TfidfClassifier(TfidfSettings(C=1.0, temperature=1.0), cache_dir=tmp_path)
    other.fit(examples)
    assert other.trained
    [path] = tmp_path.iterdir()
    path.write_bytes(b"not a numpy archive")
    again = TfidfClassifier(TfidfSettings(C=1.0, temperature=1.0), cache_dir=tmp_path)
    again.fit(examples)
    assert again.trained
    reloaded = TfidfClassifier(TfidfSettings(C=1.0, temperature=1.0), cache_dir=tmp_path)
    reloaded.fit(examples)
    assert not reloaded.trained


def test_plugin_registers_the_classifier() -> None:
    """The tfidf module contributes TfidfClassifier through register_classifiers."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(tfidf)
    found: list[type] = []
    pm.hook.register_classifiers(register=found.append)
    assert found == [TfidfClassifier]
    assert TfidfClassifier.name == "tfidf" and TfidfClassifier.Settings is TfidfSettings


def test_add_background_teaches_out_of_scope(examples: dict[str, list[str]]) -> None:
    """Phrases offered with add_background join the hidden class and end up below threshold."""
    offered = ["book a table for my cat at the vet", "book a table tennis lesson"]
    plain = TfidfClassifier(TfidfSettings(temperature=1.0))
    plain.fit(examples)
    taught = TfidfClassifier(TfidfSettings(temperature=1.0))
    assert taught.add_background(offered)
    taught.fit(examples)
    before = [r[0].confidence for r in plain.rank(offered)]
    after = [r[0].confidence for r in taught.rank(offered)]
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
    assert not TfidfClassifier(TfidfSettings(background=False)).add_background(offered)


MEANING_EXAMPLES = {
    "book_table": ["book a table", "i want a table for four tonight", "table for two at 8pm"],
    "check_balance": ["what is my balance", "how much is in my account",
                      "show my account balance"],
    "weather": ["what's the weather", "will it rain tomorrow", "is it cold outside"],
    "play_music": ["play a song", "put on some tunes", "play my playlist"],
}
# No word of these is in the right workflow's examples (nor a telling character n-gram).
PARAPHRASES = {"any chance of snow": "weather", "do i have money left": "check_balance"}


def test_the_embedding_expert_ranks_paraphrases_that_share_no_words() -> None:
    classifier = TfidfClassifier()
    classifier.fit(MEANING_EXAMPLES)
    ranked = classifier.rank(list(PARAPHRASES), 1)
    assert [r[0].workflow for r in ranked] == list(PARAPHRASES.values())
    # The same texts with the expert off: n-grams alone get them wrong.
    words_only = TfidfClassifier(TfidfSettings(embeddings=False))
    words_only.fit(MEANING_EXAMPLES)
    wrong = words_only.rank(list(PARAPHRASES), 1)
    assert [r[0].workflow for r in wrong] != list(PARAPHRASES.values())


# Three topics with their own words; the background is about something else entirely.
TOPIC_WORDS = {
    "weather": ["rain", "forecast", "sunny", "snow", "umbrella", "storm", "wind", "fog"],
    "music": ["song", "playlist", "album", "guitar", "concert", "radio", "band", "tune"],
    "banking": ["account", "balance", "transfer", "deposit", "loan", "card", "bank", "cash"],
}
TOPIC_FRAMES = ["tell me about the {}", "what about the {}", "{} please", "I need the {}",
                "show me the {}", "any {} today", "check the {}", "{} now"]
UNRELATED_WORDS = ["volcano", "penguin", "origami", "glacier", "pyramid", "telescope",
                   "marathon", "chess", "knitting", "castle", "parrot", "canoe"]


def test_calibration_puts_the_threshold_between_background_and_examples() -> None:
    """On a small synthetic set the calibrated threshold lies above every unrelated
    phrase's top confidence and below every unseen in-scope phrase's, and it is kept
    after fit for the router (None when calibration is off)."""
    examples = {name: [frame.format(word) for word in words[:6] for frame in TOPIC_FRAMES[:5]]
                for name, words in TOPIC_WORDS.items()}
    background = [frame.format(word) for word in UNRELATED_WORDS for frame in TOPIC_FRAMES[:5]]
    classifier = TfidfClassifier(TfidfSettings(background=True))
    classifier.background = background  # this set's background instead of the shipped one
    classifier.fit(examples)
    threshold = classifier.threshold
    assert threshold is not None and 0.0 < threshold < 1.0
    # Unseen phrasings of both kinds: the same words in other frames.
    unseen = [frame.format(word) for words in TOPIC_WORDS.values() for word in words[:6]
              for frame in TOPIC_FRAMES[5:]]
    unrelated = [frame.format(word) for word in UNRELATED_WORDS for frame in TOPIC_FRAMES[5:]]
    seen = [r[0].confidence for r in classifier.rank(unseen)]
    other = [r[0].confidence for r in classifier.rank(unrelated)]
    assert max(other) < threshold < min(seen), (max(other), threshold, min(seen))

    off = TfidfClassifier(TfidfSettings(calibrate=False))
    off.fit(examples)
    assert off.threshold is None


def test_calibrate_threshold_separates_and_caps_the_fallbacks() -> None:
    """Separable scores: the middle of the gap between background and examples.
    Overlapping scores: no higher than what keeps all but fallback_target of the examples,
    however many background phrases that lets through."""
    in_scope = np.array([0.6, 0.7, 0.8, 0.9, 0.95])
    background = np.array([0.05, 0.1, 0.2, 0.3])
    assert calibrate_threshold(in_scope, background) == pytest.approx((0.3 + 0.6) / 2)
    # The best split of these would be near 0.5, losing 4 of 10 examples; 2% keeps them all.
    overlapping = np.linspace(0.2, 0.9, 10)
    high_background = np.linspace(0.1, 0.5, 50)
    capped = calibrate_threshold(overlapping, high_background, 0.02)
    assert capped is not None and capped <= overlapping[0]
    loose = calibrate_threshold(overlapping, high_background, 0.4)
    assert loose is not None and overlapping[0] < loose <= overlapping[4]
    # No background: only the cap.
    assert calibrate_threshold(in_scope, np.array([])) == 0.6
    assert calibrate_threshold(np.array([]), background) is None


def test_calibrated_threshold_survives_the_cache(
    tmp_path: Path, examples: dict[str, list[str]]
) -> None:
    """A model loaded from the cache brings its calibrated threshold back."""
    first = TfidfClassifier(cache_dir=tmp_path)
    first.fit(examples)
    second = TfidfClassifier(cache_dir=tmp_path)
    second.fit(examples)
    assert not second.trained and second.threshold == first.threshold is not None


def test_too_few_examples_to_hold_out_means_no_calibration() -> None:
    """A workflow with a single phrase leaves nothing to hold out: no threshold, T = 1."""
    classifier = TfidfClassifier()
    classifier.fit({"one": ["book a table"], "two": ["where is my order", "track my parcel"]})
    assert classifier.threshold is None
    assert classifier._model is not None and classifier._model.temperature == 1.0


def test_threshold_setting_is_auto_or_a_number_in_range(tmp_path: Path) -> None:
    """threshold defaults to 0.35, takes "auto" or a number in [0, 1] (also from the
    environment's text), and refuses anything else with one sentence naming the setting."""
    assert Settings(data_dir=tmp_path).threshold == 0.35
    assert Settings(data_dir=tmp_path, threshold="AUTO").threshold == "auto"
    assert Settings(data_dir=tmp_path, threshold="0.4").threshold == 0.4
    assert Settings(data_dir=tmp_path, threshold=1).threshold == 1.0
    for bad in (1.5, -0.1, "high", "nan", True):
        with pytest.raises(ValidationError, match=r'threshold\n.*must be "auto" or a number in '
                                                  r"\[0, 1\], not"):
            Settings(data_dir=tmp_path, threshold=bad)


def test_routing_threshold_prefers_the_setting_then_the_calibration() -> None:
    """A number is used as given; "auto" takes the classifier's calibrated threshold, or
    the default when it has none; a calibrated value out of range is refused."""
    assert routing_threshold(0.5, 0.2) == (0.5, "fixed")
    assert routing_threshold("auto", 0.2) == (0.2, "calibrated")
    assert routing_threshold("auto", None) == (DEFAULT_THRESHOLD, "default")
    with pytest.raises(ValueError, match="calibrated threshold must be a number in"):
        routing_threshold("auto", 1.5)
    with pytest.raises(ValueError, match='"auto" or a number'):
        routing_threshold("sometimes", 0.2)


ACTION_PHRASES = {
    "cancel my reservation": "book_table",
    "I want to change my booking to 8pm": "book_table",
    "cancel my order": "order_status",
    "delete my account": "support_request",
}


def test_a_known_action_on_a_workflows_subject_is_not_confident(
    fitted: TfidfClassifier, examples: dict[str, list[str]]
) -> None:
    """"Cancel my reservation" looks like a booking to the words and the embeddings, but no
    booking example names an action: it falls below the calibrated threshold (the router
    falls back) instead of starting a new booking. Without the penalty it does not."""
    assert fitted.threshold is not None
    for text, alternatives in zip(ACTION_PHRASES, fitted.rank(list(ACTION_PHRASES)),
                                  strict=True):
        assert alternatives[0].confidence < fitted.threshold, (text, alternatives)
    plain = TfidfClassifier(TfidfSettings(action_penalty=0))
    plain.fit(examples)
    ranked = plain.rank(list(ACTION_PHRASES), 1)
    assert [r[0].workflow for r in ranked] == list(ACTION_PHRASES.values())
    assert all(r[0].confidence >= DEFAULT_THRESHOLD for r in ranked)


def test_a_workflow_that_names_actions_keeps_its_messages() -> None:
    """A workflow whose examples name an action (here cancelling) still takes messages
    that name one, and recognises word forms ("cancelled", "cancellation")."""
    assert actions("Cancellation of my cancelled ORDER, then change it") == {"cancel", "chang"}
    assert actions("book a table") == frozenset()
    classifier = TfidfClassifier()
    classifier.fit({"book_table": ["book a table", "reserve a table for two",
                                   "table for four tonight", "make a reservation"],
                    "cancel_booking": ["cancel my booking", "cancel the reservation",
                                       "I need to cancel my table", "call off my booking"]})
    [ranked] = classifier.rank(["please cancel my reservation for tonight"], 1)
    assert ranked[0].workflow == "cancel_booking"
    assert classifier.threshold is not None and ranked[0].confidence >= classifier.threshold
