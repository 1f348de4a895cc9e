"""The retry policy of durable delivery, as pure functions: the backoff schedule, the
attempt numbers, and which outcome leads to ack, retry in place, nak, term or give up."""

from __future__ import annotations

import pytest

from commhub.core.retry import (
    Decision,
    Permanent,
    Retry,
    RetryPolicy,
    attempts_within,
    decide,
    exhausted,
)

POLICY = RetryPolicy(first=0.5, factor=2.0, cap=10.0, in_place_attempts=3, max_attempts=8)


def test_waits_double_from_first_up_to_the_cap() -> None:
    assert [POLICY.wait_after(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 10, 10, 10]
    assert POLICY.wait_after(10**6) == 10  # no overflow on absurd attempt numbers
    assert RetryPolicy(first=3, factor=1, cap=3).wait_after(50) == 3


def test_attempt_numbers_continue_across_deliveries_and_never_repeat() -> None:
    """The first delivery makes the in-place attempts 1..3, each later delivery one."""
    assert [POLICY.attempt_number(1, t) for t in (1, 2, 3)] == [1, 2, 3]
    assert [POLICY.attempt_number(d) for d in (2, 3, 4)] == [4, 5, 6]


def test_max_deliver_covers_the_attempts_and_spare_deliveries() -> None:
    # 3 attempts in the first delivery, then 5 deliveries of one: 6, plus 3 spare.
    assert POLICY.max_deliver == 9
    assert not exhausted(POLICY, 9) and exhausted(POLICY, 10)


def test_success_acks_and_permanent_terminates() -> None:
    assert decide(POLICY, attempt=1, delivered=1, failure=None) == Decision("ack")
    assert decide(POLICY, attempt=5, delivered=3, failure=Permanent("bad")) == Decision("term")


def test_failures_retry_in_place_then_hand_back_with_the_next_wait() -> None:
    error = RuntimeError("down")
    assert decide(POLICY, attempt=1, delivered=1, failure=error) == Decision("retry", 0.5)
    assert decide(POLICY, attempt=2, delivered=1, failure=Retry("503")) == Decision("retry", 1)
    assert decide(POLICY, attempt=3, delivered=1, failure=error) == Decision("nak", 2)
    assert decide(POLICY, attempt=6, delivered=4, failure=error) == Decision("nak", 10)


def test_stopping_hands_back_instead_of_holding() -> None:
    assert decide(POLICY, attempt=1, delivered=1, failure=RuntimeError(),
                  stopping=True) == Decision("nak", 0.5)


def test_a_retry_after_longer_than_the_schedule_is_a_nak_within_the_cap() -> None:
    assert decide(POLICY, attempt=1, delivered=1,
                  failure=Retry("429", after=4)) == Decision("nak", 4)
    assert decide(POLICY, attempt=1, delivered=1,
                  failure=Retry("429", after=3600)) == Decision("nak", 10)
    # Shorter than the schedule's own wait: the schedule wins.
    assert decide(POLICY, attempt=2, delivered=1,
                  failure=Retry("429", after=0.1)) == Decision("retry", 1)


def test_the_last_attempt_or_delivery_gives_up() -> None:
    error = RuntimeError("still down")
    assert decide(POLICY, attempt=8, delivered=6, failure=error) == Decision("give_up")
    # Deliveries cut short skipped attempt numbers; the delivery count bounds it too.
    assert decide(POLICY, attempt=4, delivered=9, failure=error) == Decision("give_up")
    assert decide(POLICY, attempt=7, delivered=5, failure=error) == Decision("nak", 10)


def test_attempts_within_a_duration() -> None:
    # Waits 1, 2, 4 (7 s) fit in 7 s: 4 attempts; then 4 more waits of the 4 s cap.
    assert attempts_within(7, first=1, cap=4) == 4
    assert attempts_within(23, first=1, cap=4) == 8
    assert attempts_within(0, first=1, cap=4) == 1
    # 24 hours of 0.5 s doubling up to 10 minutes.
    day = attempts_within(86400, first=0.5, cap=600)
    assert day == 154
    policy = RetryPolicy.lasting(86400, first=0.5, cap=600)
    assert policy.max_attempts == day
    assert 86400 - 600 < policy.total_wait() <= 86400


def test_lasting_honours_a_maximum_of_attempts() -> None:
    policy = RetryPolicy.lasting(86400, first=0.5, cap=600, max_attempts=2)
    assert (policy.max_attempts, policy.in_place_attempts) == (2, 2)


@pytest.mark.parametrize("kwargs", [
    {"first": 0}, {"factor": 0.5}, {"cap": 0.01}, {"in_place_attempts": 0},
    {"max_attempts": 0},
])
def test_nonsense_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
