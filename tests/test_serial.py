"""KeyedSerialRunner without a bus: one key's jobs in order, keys in parallel, a failing
job does not stop its key, join and cancel."""

from __future__ import annotations

import asyncio

import pytest

from commhub.core.serial import KeyedSerialRunner

WAIT = 10  # seconds: a guard against hangs, never an assertion about speed


async def test_one_keys_jobs_run_in_submission_order_one_at_a_time() -> None:
    runner = KeyedSerialRunner()
    ran: list[int] = []
    running = 0
    overlap = False

    def job(n: int) -> object:
        async def run() -> None:
            nonlocal running, overlap
            running += 1
            overlap = overlap or running > 1
            await asyncio.sleep(0)  # give another job of the key a chance to overlap
            ran.append(n)
            running -= 1

        return run

    for n in range(20):
        runner.submit("k", job(n))  # type: ignore[arg-type]
    async with asyncio.timeout(WAIT):
        await runner.join()
    assert ran == list(range(20)) and not overlap


async def test_different_keys_run_concurrently() -> None:
    """A job of key b runs while a job of key a is blocked."""
    runner = KeyedSerialRunner()
    release = asyncio.Event()
    b_done = asyncio.Event()

    async def blocked() -> None:
        await release.wait()

    async def other() -> None:
        b_done.set()

    runner.submit("a", blocked)
    runner.submit("b", other)
    async with asyncio.timeout(WAIT):
        await b_done.wait()
    assert runner.queued("a") == 1
    release.set()
    async with asyncio.timeout(WAIT):
        await runner.join()
    assert runner.queued("a") == 0


async def test_a_failing_job_does_not_stop_the_jobs_behind_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = KeyedSerialRunner()
    ran: list[str] = []

    async def fails() -> None:
        ran.append("fails")
        raise RuntimeError("boom")

    async def after() -> None:
        ran.append("after")

    runner.submit("k", fails)
    runner.submit("k", after)
    async with asyncio.timeout(WAIT):
        await runner.join()
    assert ran == ["fails", "after"]
    assert "job for k failed" in caplog.text


async def test_join_waits_for_jobs_submitted_while_running() -> None:
    runner = KeyedSerialRunner()
    ran: list[str] = []

    async def first() -> None:
        runner.submit("k", second)
        runner.submit("other", second)
        ran.append("first")

    async def second() -> None:
        await asyncio.sleep(0)
        ran.append("second")

    runner.submit("k", first)
    async with asyncio.timeout(WAIT):
        await runner.join()
    assert ran == ["first", "second", "second"]


async def test_cancel_stops_running_jobs_and_drops_queued_ones() -> None:
    """cancel() cancels the running job (it sees CancelledError), never runs the queued
    one, returns once the workers ended, and the runner is usable afterwards."""
    runner = KeyedSerialRunner()
    started = asyncio.Event()
    saw_cancel = False
    ran: list[str] = []

    async def long() -> None:
        nonlocal saw_cancel
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            saw_cancel = True
            raise

    async def queued() -> None:
        ran.append("queued")

    runner.submit("k", long)
    runner.submit("k", queued)
    async with asyncio.timeout(WAIT):
        await started.wait()
        await runner.cancel()
        await runner.join()  # idle at once
    assert saw_cancel and ran == [] and runner.queued("k") == 0
    runner.submit("k", queued)
    async with asyncio.timeout(WAIT):
        await runner.join()
    assert ran == ["queued"]
