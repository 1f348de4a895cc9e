"""The event loop's lag: the probe sees a stall of the loop, the window keeps the
largest recent lag, and every role serves both as metrics."""

from __future__ import annotations

import asyncio
import time

from commhub.core.looplag import LagWindow, LoopLagProbe, lateness


def test_lateness_is_the_wake_up_past_the_interval_and_never_negative() -> None:
    assert abs(lateness(10.0, 10.35, 0.1) - 0.25) < 1e-9
    assert lateness(10.0, 10.05, 0.1) == 0.0  # a timer that fired early is no lag


def test_the_window_keeps_the_largest_lag_of_the_last_one_to_two_windows() -> None:
    window = LagWindow(window=10.0)
    assert window.largest(0.0) == 0.0
    window.add(0.0, 0.002)
    window.add(5.0, 0.3)
    window.add(9.0, 0.01)
    assert window.largest(9.5) == 0.3
    window.add(12.0, 0.004)  # a new window: the stall is still in the previous one
    assert window.largest(12.0) == 0.3
    window.add(23.0, 0.001)  # and then it is gone
    assert window.largest(23.0) == 0.004
    assert window.largest(60.0) == 0.0  # nothing measured for two windows: nothing to show


async def test_the_probe_measures_a_stall_of_the_loop() -> None:
    seen: list[float] = []
    probe = LoopLagProbe(seen.append, interval=0.01)
    task = asyncio.create_task(probe.run())
    try:
        while not seen:  # the probe runs
            await asyncio.sleep(0.01)
        time.sleep(0.3)  # noqa: ASYNC251 - the point: a blocking call holds every task
        count = len(seen)
        while len(seen) == count:
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert max(seen) >= 0.25
    assert probe.largest_recent() >= 0.25
