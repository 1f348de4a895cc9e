"""What happens after an attempt to handle a delivered record: pure decisions, no I/O.

A handler signals its outcome by how it returns:

* it returns: done; the message is acked;
* it raises :class:`Permanent`: the record can never be handled (a retry cannot fix
  it); the message is terminated and reported on ``{prefix}.evt.invalid``;
* it raises :class:`Retry` (or any other exception): this attempt failed for a reason
  that may pass (a receiver down, a bus hiccup); it is tried again later.

When "later" is, and whether the record is held meanwhile or handed back to JetStream,
is :func:`decide`'s answer from the :class:`RetryPolicy`, the attempt number and the
delivery count JetStream reports (``num_delivered``):

* the first ``in_place_attempts`` attempts of a delivery are retried **in place**: the
  record stays in hand, so the key's later records wait behind it and keep their order;
* after that the message is **handed back** with a nak whose delay is the next wait of
  the schedule: the wait lives in JetStream and survives a restart, and one attempt is
  made per redelivery. Later records of the key may overtake it then;
* after ``max_attempts`` attempts (or ``max_deliver`` deliveries, which also bounds a
  record whose handling kills the process) the record is **given up**: terminated and
  reported as a dead letter.

The wait after attempt ``n`` is ``first * factor**(n-1)``, capped at ``cap``.

Attempt numbers follow from the delivery count: the first delivery makes attempts
``1..in_place_attempts``, delivery ``d > 1`` makes attempt ``in_place_attempts + d - 1``.
A delivery cut short (a stop, a crash) therefore skips numbers; a number is never
repeated, so the count a receiver sees only grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Decision",
    "Permanent",
    "Retry",
    "RetryPolicy",
    "attempts_within",
    "decide",
    "exhausted",
]

# Deliveries beyond those the attempts need, for deliveries cut short by a stop or a
# crash before they made their attempt.
SPARE_DELIVERIES = 3


class Permanent(Exception):
    """Raised by a handler (or a decoder): this record can never be handled; retrying
    cannot fix it. The message is terminated and reported with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Retry(Exception):
    """Raised by a handler: this attempt failed for a reason that may pass.

    ``after`` asks for at least that many seconds before the next attempt (a 429's
    ``Retry-After``); the policy's cap still applies. Any other exception means the same
    as ``Retry`` and is logged with its traceback; ``Retry`` is logged as one line.
    """

    def __init__(self, reason: str, after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after = after


@dataclass(frozen=True)
class RetryPolicy:
    """The backoff schedule and the bounds of retrying one record (see the module
    docstring). Immutable; safe to share."""

    first: float = 0.1
    factor: float = 2.0
    cap: float = 300.0
    in_place_attempts: int = 3
    max_attempts: int = 50

    def __post_init__(self) -> None:
        if not (self.first > 0 and self.factor >= 1 and self.cap >= self.first):
            raise ValueError("a retry policy needs first > 0, factor >= 1 and cap >= first")
        if self.in_place_attempts < 1:
            raise ValueError("in_place_attempts must be at least 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def wait_after(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based) before the next."""
        if self.factor == 1:
            return self.first
        # The exponent is bounded so that a huge attempt number cannot overflow.
        steps = min(attempt - 1, math.ceil(math.log(self.cap / self.first, self.factor)) + 1)
        return min(self.cap, self.first * self.factor ** max(0, steps))

    def attempt_number(self, delivered: int, try_in_delivery: int = 1) -> int:
        """The attempt number of the ``try_in_delivery``-th try of delivery ``delivered``
        (JetStream's ``num_delivered``, 1 on the first delivery)."""
        start = 1 if delivered <= 1 else self.in_place_attempts + delivered - 1
        return start + try_in_delivery - 1

    @property
    def max_deliver(self) -> int:
        """Deliveries after which a record that still fails is given up: those its
        ``max_attempts`` need, plus a few spare for deliveries cut short."""
        needed = max(1, self.max_attempts - self.in_place_attempts + 1)
        return needed + SPARE_DELIVERIES

    def total_wait(self, attempts: int | None = None) -> float:
        """Seconds of waiting between the first and the last of ``attempts`` attempts
        (``max_attempts`` when omitted): how long a record is retried at most, not
        counting the attempts' own time."""
        n = self.max_attempts if attempts is None else attempts
        return sum(self.wait_after(a) for a in range(1, n))

    @classmethod
    def lasting(
        cls,
        seconds: float,
        *,
        first: float,
        cap: float,
        factor: float = 2.0,
        in_place_attempts: int = 3,
        max_attempts: int | None = None,
    ) -> RetryPolicy:
        """A policy that retries for about ``seconds`` (the waits between the attempts add
        up to at most that), and for at most ``max_attempts`` attempts when given."""
        attempts = attempts_within(seconds, first=first, cap=cap, factor=factor)
        if max_attempts is not None:
            attempts = min(attempts, max_attempts)
        return cls(first=first, factor=factor, cap=cap,
                   in_place_attempts=min(in_place_attempts, attempts), max_attempts=attempts)


def attempts_within(seconds: float, *, first: float, cap: float, factor: float = 2.0) -> int:
    """How many attempts fit when the waits between them (``first``, growing by
    ``factor`` up to ``cap``) may add up to at most ``seconds``. At least 1."""
    if first <= 0 or cap < first or factor < 1:
        raise ValueError("need first > 0, cap >= first and factor >= 1")
    attempts, spent, wait = 1, 0.0, first
    while wait < cap and spent + wait <= seconds:
        spent += wait
        attempts += 1
        wait = min(cap, wait * factor) if factor > 1 else cap
    if wait >= cap and spent + cap <= seconds:
        attempts += int((seconds - spent) // cap)  # the rest of the waits are all ``cap``
    return attempts


Action = Literal["ack", "retry", "nak", "term", "give_up"]


@dataclass(frozen=True)
class Decision:
    """What to do with a message after an attempt.

    ``ack``: done. ``retry``: try again in place after ``delay`` seconds. ``nak``: hand
    it back to JetStream, redelivered after ``delay`` seconds. ``term``: terminate and
    report it as invalid. ``give_up``: terminate and report it as a dead letter.
    """

    action: Action
    delay: float = 0.0


ACK = Decision("ack")
TERM = Decision("term")
GIVE_UP = Decision("give_up")


def decide(
    policy: RetryPolicy,
    *,
    attempt: int,
    delivered: int,
    failure: BaseException | None,
    stopping: bool = False,
) -> Decision:
    """The decision after attempt ``attempt`` of delivery ``delivered`` ended with
    ``failure`` (None: the handler returned). ``stopping``: the consumer is stopping,
    so nothing more is retried in place."""
    if failure is None:
        return ACK
    if isinstance(failure, Permanent):
        return TERM
    if attempt >= policy.max_attempts or delivered >= policy.max_deliver:
        return GIVE_UP
    wait = policy.wait_after(attempt)
    asked = failure.after if isinstance(failure, Retry) else None
    if asked is not None and asked > wait:
        # The other side said when to come back: honoured within the cap, and a wait
        # it asked for is not spent holding the record.
        return Decision("nak", min(policy.cap, asked))
    if attempt < policy.in_place_attempts and not stopping:
        return Decision("retry", wait)
    return Decision("nak", wait)


def exhausted(policy: RetryPolicy, delivered: int) -> bool:
    """True when a delivery is past ``max_deliver``: earlier deliveries ended without an
    outcome (the process died or stopped each time), and the record is given up
    without running it again."""
    return delivered > policy.max_deliver
