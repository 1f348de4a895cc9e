"""Event-loop lag: how late the loop runs a callback that was due, the time every
other task of the process waited behind whatever held the loop.

Every role runs one :class:`LoopLagProbe` (started with the process's metrics). It
sleeps ``interval`` seconds on the loop's clock, and the time it wakes up past that
is the lag: near zero on a loop that only waits for I/O, the length of the stall when
something CPU-heavy ran on the loop (a classifier, a DuckDB call, a large decode) or
when the process did not get a core (a busy machine). :class:`LagWindow` keeps the
largest lag of the current and the previous window, so a gauge can show the worst
stall of the last few seconds without a scrape resetting it for other scrapers.

Concurrency: the probe is one task on the loop it measures and the only writer of
its window; a scrape may read the window from another thread (the metrics render in
one), which only reads. Failure: none expected; the task ends only when
cancelled. Resolution: uvloop's timers have a resolution of one millisecond, so lags
under a millisecond read as zero or one millisecond.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["LAG_INTERVAL_SECONDS", "LAG_WINDOW_SECONDS", "LagWindow", "LoopLagProbe", "lateness"]

LAG_INTERVAL_SECONDS = 0.1  # ten wake-ups a second: the probe's own cost is negligible
LAG_WINDOW_SECONDS = 10.0


class LagWindow:
    """The largest lag seen in the last ``window`` to ``2 * window`` seconds.

    Pure bookkeeping on times the caller passes in (the loop's clock), so it is
    testable without a loop."""

    def __init__(self, window: float = LAG_WINDOW_SECONDS) -> None:
        self.window = window
        self._started: float | None = None
        self._current = 0.0
        self._previous = 0.0

    def add(self, at: float, lag: float) -> None:
        self._roll(at)
        self._current = max(self._current, lag)

    def largest(self, at: float) -> float:
        """Read-only, so another thread may call it while the probe writes."""
        started = self._started
        if started is None or at - started >= 2 * self.window:
            return 0.0
        if at - started >= self.window:
            return self._current
        return max(self._current, self._previous)

    def _roll(self, at: float) -> None:
        if self._started is None:
            self._started = at
        elapsed = at - self._started
        if elapsed < self.window:
            return
        # One window passed: the current becomes the previous; two or more: both empty.
        self._previous = self._current if elapsed < 2 * self.window else 0.0
        self._current = 0.0
        self._started = at


def lateness(slept_from: float, woke_at: float, interval: float) -> float:
    """How much later than ``interval`` after ``slept_from`` the probe woke up."""
    return max(0.0, woke_at - slept_from - interval)


class LoopLagProbe:
    """Measures the running loop's lag every ``interval`` seconds and passes each
    measurement to ``observe`` (a histogram) and to :attr:`window` (a gauge)."""

    def __init__(self, observe: Callable[[float], None] | None = None,
                 interval: float = LAG_INTERVAL_SECONDS) -> None:
        self.interval = interval
        self.observe = observe
        self.window = LagWindow()
        self.last = 0.0

    def largest_recent(self) -> float:
        """The largest lag of the last 10 to 20 seconds; any thread may ask."""
        return self.window.largest(time.monotonic())

    async def run(self) -> None:
        """Measure until cancelled."""
        while True:
            # The real clock, not loop.time(): uvloop's is cached per loop iteration,
            # so it would miss a stall by a callback run before the probe's.
            slept_from = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.last = lateness(slept_from, time.perf_counter(), self.interval)
            self.window.add(time.monotonic(), self.last)
            if self.observe is not None:
                self.observe(self.last)
