"""Progress through a known amount of work, as plain text: counts, percent, rate, time left.

:class:`Progress` turns (done, total) into one line; :class:`ProgressBar` writes such
lines to a text stream (stderr) at most every ``interval`` seconds: rewriting one line
with a carriage return on a terminal, one line per ``interval * 5`` otherwise (so a log
file gets a readable trail, not thousands of lines). The recorder logs the same lines
while it catches up; ``commhub rebuild`` shows a bar.

Not thread-safe; each instance belongs to one task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "ProgressBar"]


class Progress:
    """Counts ``done`` of ``total`` items since it was created, and how fast."""

    def __init__(
        self, total: int, unit: str = "records", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total = max(total, 0)
        self.done = 0
        self.unit = unit
        self._clock = clock
        self._started = clock()

    def update(self, done: int, total: int | None = None) -> None:
        """Set what is done (and the total, when the work grew meanwhile)."""
        self.done = done
        if total is not None:
            self.total = total
        self.total = max(self.total, self.done)

    @property
    def fraction(self) -> float:
        return 1.0 if self.total == 0 else self.done / self.total

    @property
    def rate(self) -> float:
        """Items per second since the start."""
        elapsed = self._clock() - self._started
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self, label: str) -> str:
        """``label: 1,200 of 5,000 records (24.0%), 950 records/s, about 4 s left``."""
        text = f"{label}: {self.done:,} of {self.total:,} {self.unit} ({self.fraction:.1%})"
        rate = self.rate
        if rate > 0:
            text += f", {rate:,.0f} {self.unit}/s"
            left = (self.total - self.done) / rate
            if self.done < self.total:
                text += f", about {left:,.0f} s left"
        return text


class ProgressBar:
    """Shows a :class:`Progress` on ``stream``, rate-limited; call :meth:`finish` at the end."""

    WIDTH = 30

    def __init__(
        self, stream: TextIO, label: str, progress: Progress, interval: float = 0.25
    ) -> None:
        self.stream = stream
        self.label = label
        self.progress = progress
        self.interval = interval
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last = float("-inf")

    def show(self, done: int, total: int | None = None, force: bool = False) -> None:
        self.progress.update(done, total)
        now = time.monotonic()
        every = self.interval if self.tty else self.interval * 5
        if not force and now - self._last < every:
            return
        self._last = now
        filled = int(self.WIDTH * self.progress.fraction)
        bar = "[" + "#" * filled + "." * (self.WIDTH - filled) + "] "
        text = bar + self.progress.line(self.label)
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self, done: int) -> None:
        """Show the final count and end the line."""
        self.show(done, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
