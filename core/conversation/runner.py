"""Running conversation tests: turn by turn through a :class:`Backend`, stopping a test
at its first turn that does not show what the test expects.

Two backends: :class:`InProcessBackend` (a :class:`ConversationDriver` per test: the
real rules, engine and classifier, a fixed clock, human agents as the test says, no
hub) and
:class:`~commhub.core.conversation.hubtest.HubBackend` (a running hub over WebSocket).
A backend says which tests it cannot run (``skip_reason``) and, per turn, which
expectations it could not observe (:attr:`Observed.hidden`).

Failure behaviour: a mismatch, a button that was never shown, or an input the
conversation cannot take (:class:`TurnError`) fails the test at that turn; any other
exception propagates (a bug, or a hub that went away).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from commhub.core.conversation.driver import ConversationDriver, DriverError, Outcome
from commhub.core.conversation.expect import (
    Mismatch,
    Observed,
    SeenClassification,
    SeenEvent,
    ShownReply,
    Unchecked,
    check_turn,
    find_button,
    shown_buttons,
)
from commhub.core.conversation.setup import RankCache, RouterSetup
from commhub.core.conversation.testfile import (
    ConversationFile,
    ConversationTest,
    EventInput,
    Step,
    Turn,
)
from commhub.core.routing.state import Emit

__all__ = [
    "Backend",
    "InProcessBackend",
    "TestResult",
    "TurnError",
    "TurnFailure",
    "conversation_id",
    "observed_in_process",
    "run_files",
    "run_test",
]


class TurnError(Exception):
    """An input the conversation could not take (the test fails at that turn)."""


class Backend(Protocol):
    """Where tests run: one conversation per test, one :meth:`send` per turn."""

    def skip_reason(self, test: ConversationTest) -> str | None:
        """Why this backend cannot run ``test`` (None: it can)."""

    def begin(self, test: ConversationTest) -> None:
        """Start a new conversation for ``test``."""

    def send(self, turn: Turn, payload: dict[str, Any] | None) -> Observed:
        """Run the turn's input (``payload``: a pressed button's) and observe what it
        produced (the turn's expectations say how many replies to wait for); raise
        TurnError if the conversation cannot take it."""

    def end(self) -> None:
        """The test is over (passed or not)."""


@dataclass
class TurnFailure:
    """Where a test failed: the turn (from 1), its input, and what did not hold."""

    number: int
    step: Step
    mismatches: list[Mismatch] = field(default_factory=list)
    error: str | None = None


@dataclass
class TestResult:
    """One test's outcome. ``notes`` are the expectations that were not checked."""

    __test__ = False  # not a pytest test class

    test: ConversationTest
    status: Literal["passed", "failed", "skipped"]
    seconds: float = 0.0
    failure: TurnFailure | None = None
    notes: list[Unchecked] = field(default_factory=list)
    reason: str | None = None


def run_test(test: ConversationTest, backend: Backend) -> TestResult:
    """Run ``test`` turn by turn; see the module docstring for failures."""
    reason = backend.skip_reason(test)
    if reason is not None:
        return TestResult(test, "skipped", reason=reason)
    started = time.perf_counter()
    shown: list[ShownReply] = []
    notes: list[Unchecked] = []
    failure: TurnFailure | None = None
    backend.begin(test)
    try:
        for number, turn in enumerate(test.turns, start=1):
            step = turn.input
            payload = None
            if step.kind == "press":
                payload = find_button(shown, step.value)
                if payload is None:
                    offered = ", ".join(shown_buttons(shown)) or "none"
                    failure = TurnFailure(number, step, [Mismatch(
                        step.line, "button", step.value, f"no such button (buttons shown: "
                        f"{offered})")])
                    break
            try:
                observed = backend.send(turn, payload)
            except TurnError as exc:
                failure = TurnFailure(number, step, error=str(exc))
                break
            mismatches, turn_notes = check_turn(turn, observed)
            notes.extend(turn_notes)
            shown.extend(observed.replies)
            if mismatches:
                failure = TurnFailure(number, step, mismatches)
                break
    finally:
        backend.end()
    seconds = time.perf_counter() - started
    status: Literal["passed", "failed"] = "failed" if failure else "passed"
    return TestResult(test, status, seconds, failure, notes)


def run_files(
    files: Iterable[ConversationFile],
    backend: Backend,
    select: str | None = None,
    on_result: Callable[[TestResult], None] | None = None,
) -> list[TestResult]:
    """Run every test of ``files`` (those whose name contains ``select``, case-
    insensitively, when given), in order; ``on_result`` sees each result as it comes."""
    results = []
    for file in files:
        for test in file.tests:
            if select and select.casefold() not in test.name.casefold():
                continue
            result = run_test(test, backend)
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results


# -- in process ------------------------------------------------------------------------
class InProcessBackend:
    """Each test is a :class:`ConversationDriver` on the test's clock, services and
    agents, with the real engine, routing policy and classifier (ranked through
    ``ranks``)."""

    def __init__(self, setup: RouterSetup, ranks: RankCache) -> None:
        self.setup = setup
        self.ranks = ranks
        self.driver: ConversationDriver | None = None

    def skip_reason(self, test: ConversationTest) -> str | None:
        return None

    def begin(self, test: ConversationTest) -> None:
        self.driver = ConversationDriver(
            self.setup.engine, self.setup.policy, self.ranks,
            conversation=conversation_id(test.name), now=test.clock,
            idle_expiry=self.setup.idle_expiry, services=test.services,
            agents=test.agents, needs_agent=self.setup.needs_agent,
        )

    def send(self, turn: Turn, payload: dict[str, Any] | None) -> Observed:
        driver = self.driver
        assert driver is not None, "begin() first"
        try:
            outcome = _input(driver, turn.input, payload)
        except DriverError as exc:
            raise TurnError(str(exc)) from None
        return observed_in_process(outcome, driver)

    def end(self) -> None:
        self.driver = None


def _input(driver: ConversationDriver, step: Step, payload: dict[str, Any] | None) -> Outcome:
    if step.kind == "user":
        return driver.message(step.value)
    if step.kind == "press":
        return driver.message(None, payload)
    if step.kind == "event":
        event: EventInput = step.value
        return driver.event(event.name, event.data)
    if step.kind == "answer":
        return driver.answer(step.value)
    if step.kind == "agent":
        return driver.agent(step.value)
    assert step.kind == "wait", step.kind
    return driver.wait(float(step.value))


def observed_in_process(outcome: Outcome, driver: ConversationDriver) -> Observed:
    """Everything an in-process turn shows (nothing is hidden)."""
    fields = outcome.classification
    classification = None
    if fields is not None:
        classification = SeenClassification(
            fields.decision, fields.workflow, float(fields.confidence),
            tuple((a.workflow, a.confidence) for a in fields.alternatives),
        )
    events = [SeenEvent(e.name, dict(e.data)) if isinstance(e, Emit)
              else SeenEvent(e.kind, dict(e.data)) for e in outcome.events]
    state = driver.state
    return Observed(
        replies=[ShownReply(r.text, tuple(r.buttons)) for r in outcome.replies],
        events=events,
        classification=classification,
        workflow=state.workflow,
        state=state.state,
        slots=dict(state.slots),
    )


def conversation_id(name: str) -> str:
    """A conversation id (a subject token) that reads like the test's name."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:64]
    return f"test-{slug or 'conversation'}"
