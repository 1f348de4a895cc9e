"""Pacing of outgoing Telegram messages: per chat and for the whole bot.

Telegram asks bots to send about one message a second to one chat (short bursts are
tolerated) and at most about 30 a second overall; beyond that it answers 429 with a
``retry_after``. Pacing ahead of time avoids most 429s; the sender still honours
``retry_after`` for the rest.

:class:`Pacer` is a generic cell rate algorithm (GCRA, "virtual scheduling"): each key
keeps the theoretical time its next message is due. :meth:`Pacer.reserve` books the next
slot and returns how long to wait for it, so concurrent callers of one chat are spaced
out in the order they asked, and a burst of ``burst`` messages goes out at once. It is
pure and synchronous: the clock is injected (tests drive it by hand), nothing sleeps
here, and one event loop uses it (no locks needed: ``reserve`` never awaits).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = ["Pacer", "RateCell"]


class RateCell:
    """``rate`` events a second on average, ``burst`` at once; reservations queue up."""

    __slots__ = ("_due", "burst", "interval", "tolerance")

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.interval = 1.0 / rate
        self.burst = burst
        self.tolerance = (burst - 1) * self.interval
        self._due = float("-inf")  # theoretical arrival time of the next event

    def reserve(self, now: float) -> float:
        """Book the next slot; return the seconds to wait until it (0: go now)."""
        due = max(self._due, now)
        self._due = due + self.interval
        return max(0.0, due - self.tolerance - now)

    def delay_until(self, when: float) -> None:
        """Push the next slot to ``when`` at the earliest (after a 429's retry_after)."""
        self._due = max(self._due, when + self.tolerance)

    def idle(self, now: float) -> bool:
        """True when the cell is back to a full burst: it may be forgotten."""
        return self._due <= now


class Pacer:
    """One :class:`RateCell` per chat plus one for the whole bot.

    ``reserve(chat)`` books a slot in both and returns the longer wait. Cells of chats
    that went quiet are dropped now and then, so memory follows the active chats.
    """

    def __init__(
        self,
        chat_rate: float = 1.0,
        chat_burst: int = 3,
        global_rate: float = 30.0,
        global_burst: int = 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        RateCell(chat_rate, chat_burst)  # validates
        self.chat_rate = chat_rate
        self.chat_burst = chat_burst
        self._global = RateCell(global_rate, global_burst)
        self._chats: dict[Hashable, RateCell] = {}
        self._clock = clock
        self._reservations = 0

    def reserve(self, chat: Hashable) -> float:
        """Book the next send to ``chat``; return the seconds to wait before sending."""
        now = self._clock()
        self._reservations += 1
        if self._reservations % 1024 == 0:
            self._forget_idle(now)
        cell = self._chats.get(chat)
        if cell is None:
            cell = self._chats[chat] = RateCell(self.chat_rate, self.chat_burst)
        return max(cell.reserve(now), self._global.reserve(now))

    def penalize(self, chat: Hashable, seconds: float) -> None:
        """Telegram said "retry after ``seconds``" for ``chat``: hold its next slots."""
        cell = self._chats.get(chat)
        if cell is None:
            cell = self._chats[chat] = RateCell(self.chat_rate, self.chat_burst)
        cell.delay_until(self._clock() + seconds)

    @property
    def tracked_chats(self) -> int:
        return len(self._chats)

    def _forget_idle(self, now: float) -> None:
        for chat in [c for c, cell in self._chats.items() if cell.idle(now)]:
            del self._chats[chat]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff for retryable failures: ``base * 2**n`` capped at ``cap``."""

    base: float = 1.0
    cap: float = 60.0
    jitter: float = 0.1  # fraction added at random, so many chats do not retry in step

    def delay(self, attempt: int) -> float:
        value = min(self.cap, self.base * (2 ** min(attempt, 30)))
        return value * (1 + random.uniform(0, self.jitter))
