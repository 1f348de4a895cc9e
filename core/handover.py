"""The hand-over from history to live for one reader of a conversation, as pure bookkeeping.

A reader that resumes after a cursor reads the conversation's stored messages (its
history) while the process-wide live feed goes on delivering new ones. To miss nothing,
the reader is registered with the feed *before* its history is read, so a message can
reach it both ways: stored before the history read began, and delivered live after
registration. To show nothing twice, every message is known by its stream sequence, and
a message is handed out only if its sequence is past the last one handed out.

:class:`Handover` holds that rule and the live messages that arrive while the history is
read. It does no I/O and never waits: the caller feeds it and asks it what to emit. Not
thread-safe; one event loop owns it.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

__all__ = ["Handover"]

T = TypeVar("T")


class Handover(Generic[T]):
    """Orders one reader's messages: history first, then live, each sequence once.

    * :meth:`history` is called for each stored message read, in stream order.
    * :meth:`live` is called by the live feed for each new message, in stream order, at
      any time (also while the history is still being read): it is held, not emitted.
    * :meth:`next_live` hands out held live messages, dropping those the history (or an
      earlier live message) already covered.

    ``max_held`` bounds the live messages held for a reader that does not read them;
    past it :meth:`live` refuses and ``overflowed`` is set (the reader must stop and
    resume from ``last``: nothing is lost, the stream still has the messages).
    """

    __slots__ = ("_held", "last", "max_held", "overflowed")

    def __init__(self, after: int | None, max_held: int = 10_000) -> None:
        if max_held < 1:
            raise ValueError("max_held must be >= 1")
        self.last = after or 0  # the sequence of the last message handed out
        self.max_held = max_held
        self.overflowed = False
        self._held: deque[tuple[int, T]] = deque()

    def history(self, seq: int) -> bool:
        """True if the stored message ``seq`` is to be emitted now (it is past ``last``)."""
        if seq <= self.last:
            return False
        self.last = seq
        return True

    def live(self, seq: int, item: T) -> bool:
        """Hold a live message for :meth:`next_live`; False (and ``overflowed``) when the
        reader already has ``max_held`` messages waiting."""
        if self.overflowed:
            return False
        if len(self._held) >= self.max_held:
            self.overflowed = True
            self._held.clear()  # it will resume from ``last``; these are on the stream
            return False
        self._held.append((seq, item))
        return True

    def next_live(self) -> tuple[int, T] | None:
        """The next held live message past ``last`` (which it becomes), or None."""
        while self._held:
            seq, item = self._held.popleft()
            if seq > self.last:
                self.last = seq
                return seq, item
        return None

    @property
    def held(self) -> int:
        """Live messages waiting (some may turn out to be duplicates of the history)."""
        return len(self._held)
