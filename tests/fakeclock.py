"""A clock for timer tests: epoch seconds that move only when the test says so."""

from __future__ import annotations

import time

from commhub.core.routing.timers import TimerScheduler


class FakeClock:
    """Starts at the present and stands still. ``advance`` and ``set`` move it and tell
    the attached schedulers to look at their deadlines again."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now
        self._schedulers: list[TimerScheduler] = []

    def __call__(self) -> float:
        return self.now

    def attach(self, *schedulers: TimerScheduler) -> FakeClock:
        """Make ``schedulers`` (running or not) read this clock."""
        for scheduler in schedulers:
            scheduler.clock = self
            self._schedulers.append(scheduler)
            scheduler.check_now()
        return self

    def advance(self, seconds: float) -> None:
        self.set(self.now + seconds)

    def set(self, now: float) -> None:
        self.now = now
        for scheduler in self._schedulers:
            scheduler.check_now()
