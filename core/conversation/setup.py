"""The router's parts, set up in process as ``commhub up`` sets them up: the workflows
(the plugins' and ``workflow_paths``) on an engine in the hub's ``timezone``, the routing
policy from the settings (small talk included), whether a handoff needs an agent, and the
configured classifier plugin, trained on the workflows' examples or loaded from its
cache in ``{data_dir}/models`` (the same cache the hub uses, so a second run, or a run
after the hub started, loads instead of training).

:class:`RankCache` ranks texts through the classifier once each: a test run ranks every
text its files say in one batch before the first test starts.

Errors: :class:`SetupError` (one line, for the CLI) for a missing fallback workflow, an
unknown classifier, bad classifier settings or a classifier that cannot be trained;
:class:`~commhub.core.workflow.WorkflowError` for a broken workflow.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from commhub.core.classify import Classifier, routing_threshold
from commhub.core.config import Settings
from commhub.core.engine.fsm import Engine
from commhub.core.envelope import Alternative
from commhub.core.plugins import Plugins
from commhub.core.routing.rules import RoutingPolicy
from commhub.core.routing.smalltalk import SmallTalk
from commhub.core.workflow import WorkflowDef, load_workflows

__all__ = ["RANKED", "RankCache", "RouterSetup", "SetupError", "load_classifier",
           "load_engine", "load_router_setup"]

RANKED = 3  # alternatives per text, as the router's BatchingClassifier asks for
_BATCH = 256


class SetupError(RuntimeError):
    """The router's parts cannot be set up as configured; the message says what to fix."""


@dataclass
class RouterSetup:
    """What the router runs with: the engine, the policy, the trained classifier."""

    engine: Engine
    policy: RoutingPolicy
    classifier: Classifier
    idle_expiry: float
    train_seconds: float  # how long training (or loading from the cache) took
    needs_agent: bool = True  # handoff_needs_agent: hand off only while an agent is there


def load_engine(
    plugins: Plugins, paths: Iterable[Path | str | WorkflowDef], tz: str = "UTC"
) -> Engine:
    """The engine over the plugins' workflows and ``paths``, reading relative dates in
    ``tz``; raises SetupError without a ``fallback`` workflow (the router needs one),
    WorkflowError for a broken one."""
    definitions = load_workflows([*plugins.workflow_sources(), *paths])
    if "fallback" not in definitions:
        raise SetupError("no workflow named 'fallback': the router needs one for messages "
                         "no workflow is confident about (is commhub.workflows.builtin "
                         "disabled?)")
    return Engine(definitions, tz=tz)


def load_classifier(
    settings: Settings, plugins: Plugins, examples: dict[str, list[str]], cache: bool = True
) -> Classifier:
    """The configured classifier plugin, fitted on ``examples`` (or loaded from its cache
    in ``{data_dir}/models``; ``cache=False``: always trained, nothing written). Raises
    SetupError as the module docstring says."""
    classes = plugins.classifiers()
    if settings.classifier not in classes:
        raise SetupError(f"classifier {settings.classifier!r} is not installed; available: "
                         f"{sorted(classes)}")
    cls = classes[settings.classifier]
    model: type[BaseModel] | None = getattr(cls, "Settings", None)
    raw: dict[str, Any] = settings.plugin_settings(settings.classifier)
    own: BaseModel | None = None
    if model is not None:
        try:
            own = model(**raw)
        except ValidationError as exc:
            raise SetupError(f"classifier {cls.name}: invalid settings: {exc}") from None
    elif raw:
        raise SetupError(f"classifier {cls.name} takes no settings, but [plugins] gives "
                         f"{sorted(raw)}")
    classifier = cls(own, cache_dir=settings.data_dir / "models" if cache else None)
    try:
        classifier.fit(examples)
    except (RuntimeError, ValueError, OSError) as exc:
        raise SetupError(f"classifier {cls.name} cannot be trained: {exc}") from exc
    return classifier


def load_router_setup(
    settings: Settings, plugins: Plugins, extra_paths: Sequence[Path] = ()
) -> RouterSetup:
    """Workflows (plugins', ``settings.workflow_paths``, ``extra_paths``), the policy
    from ``settings`` and the trained classifier."""
    engine = load_engine(plugins, [*settings.workflow_paths, *extra_paths], settings.timezone)
    started = time.perf_counter()
    classifier = load_classifier(settings, plugins, engine.examples())
    try:  # the hub's rule: the setting, or the classifier's calibration for "auto"
        threshold, _ = routing_threshold(settings.threshold, classifier.threshold)
    except ValueError as exc:
        raise SetupError(str(exc)) from exc
    policy = RoutingPolicy.for_engine(
        engine,
        threshold=threshold,
        clarify_margin=settings.clarify_margin,
        cancel_phrases=settings.cancel_phrases,
        restart_phrases=settings.restart_phrases,
        smalltalk=SmallTalk.from_settings(settings.smalltalk),
    )
    return RouterSetup(engine, policy, classifier, settings.idle_expiry_seconds,
                       time.perf_counter() - started, settings.handoff_needs_agent)


class RankCache:
    """Ranks each distinct text once. The classifier is deterministic, so a text ranked
    before is ranked the same again; :meth:`prime` ranks many texts in batches (one
    classifier call ranks a batch in about the time it ranks one text)."""

    def __init__(self, classifier: Classifier, top: int = RANKED) -> None:
        self.classifier = classifier
        self.top = top
        self._ranked: dict[str, list[Alternative]] = {}

    def prime(self, texts: Iterable[str]) -> None:
        """Rank every text not ranked yet."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._ranked))
        for start in range(0, len(todo), _BATCH):
            batch = todo[start:start + _BATCH]
            for text, ranked in zip(batch, self.classifier.rank(batch, self.top), strict=True):
                self._ranked[text] = ranked

    def __call__(self, text: str) -> list[Alternative]:
        if text not in self._ranked:
            self.prime([text])
        return list(self._ranked[text])
