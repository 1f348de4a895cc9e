"""The durable delivery loop against the real nats-server: per-key order, retry then
success, poison records terminated and reported once, the dead letter after the last
attempt, retries that outlive a restart, and a stop that finishes the work in hand.

Records here are plain JSON objects on ``{prefix}.wf.{key}`` (the messages stream), so
the loop is tested apart from any commhub record type.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from nats.js.api import ConsumerConfig, DeliverPolicy

from commhub.core.bus import Bus
from commhub.core.delivery import Delivery, DeliveryLoop, Permanent, Retry, RetryPolicy
from commhub.core.envelope import InvalidRecord, decode_as

WAIT = 15  # seconds: a guard against hangs, never an assertion about speed
FAST = RetryPolicy(first=0.01, cap=0.05, in_place_attempts=3, max_attempts=20)

Record = dict[str, Any]


def decode_json(subject: str, data: bytes) -> Record:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise Permanent("not a JSON object")
    return value


@asynccontextmanager
async def delivering(
    bus: Bus, handler: Callable[[Delivery[Record]], Awaitable[None]], *,
    policy: RetryPolicy = FAST, durable: str = "test", ack_wait: float = 60,
    max_ack_pending: int | None = None, **kwargs: Any,
) -> AsyncIterator[DeliveryLoop[Record]]:
    s = bus.subjects
    loop: DeliveryLoop[Record] = DeliveryLoop(
        bus, stream=s.messages_stream,
        consumer=ConsumerConfig(durable_name=f"{s.prefix}_{durable}",
                                filter_subject=s.all_workflow_input,
                                deliver_policy=DeliverPolicy.ALL,
                                # Longer than WAIT by default: a redelivery seen
                                # here came from a nak, not from the ack wait.
                                ack_wait=ack_wait, max_ack_pending=max_ack_pending),
        decode=decode_json, handler=handler, source="test", policy=policy,
        fetch_timeout=0.2, **kwargs,
    )
    await loop.start()
    try:
        yield loop
    finally:
        await loop.stop()


async def put(bus: Bus, key: str, body: Any, raw: bytes | None = None) -> None:
    data = raw if raw is not None else json.dumps(body).encode()
    await bus.js.publish(bus.subjects.workflow_input(key), data,
                         headers={"Nats-Msg-Id": uuid.uuid4().hex})


async def until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not predicate():
            await asyncio.sleep(0.01)


async def invalid_reports(bus: Bus) -> list[InvalidRecord]:
    """Every InvalidRecord stored so far on this prefix's evt.invalid."""
    s = bus.subjects
    info = await bus.js.stream_info(s.events_stream, subjects_filter=s.invalid)
    count = (info.state.subjects or {}).get(s.invalid, 0)
    if not count:
        return []
    sub = await bus.js.subscribe(s.invalid, ordered_consumer=True)
    try:
        return [decode_as((await sub.next_msg(timeout=WAIT)).data, InvalidRecord)
                for _ in range(count)]
    finally:
        await sub.unsubscribe()


async def settled(bus: Bus, loop: DeliveryLoop[Record]) -> Any:
    """The durable's info once nothing is pending ack (every delivery was settled)."""
    async with asyncio.timeout(WAIT):
        while True:
            info = await bus.js.consumer_info(loop.stream, loop.durable)
            if info.num_ack_pending == 0 and info.num_pending == 0:
                return info
            await asyncio.sleep(0.02)


async def test_one_keys_records_run_in_order_while_other_keys_go_on(bus: Bus) -> None:
    """Key a's records are handled one at a time in stream order, even while its first
    one is blocked; key b's records are handled meanwhile."""
    seen: dict[str, list[int]] = defaultdict(list)
    release = asyncio.Event()

    async def handler(delivery: Delivery[Record]) -> None:
        record = delivery.record
        if record["key"] == "a" and record["n"] == 0:
            await release.wait()
        await asyncio.sleep(0.001 * (record["n"] % 3))  # uneven handling times
        seen[record["key"]].append(record["n"])

    async with delivering(bus, handler, max_in_flight=64) as loop:
        for n in range(10):
            await put(bus, "a", {"key": "a", "n": n})
            await put(bus, "b", {"key": "b", "n": n})
        await until(lambda: len(seen["b"]) == 10)
        assert seen["a"] == []  # all of a waits behind its blocked first record
        release.set()
        await until(lambda: len(seen["a"]) == 10)
        info = await settled(bus, loop)
    assert seen["a"] == list(range(10)) and seen["b"] == list(range(10))
    assert info.num_redelivered == 0
    assert loop.stats.acked == 20


async def test_a_failing_record_is_retried_in_place_then_succeeds_once(bus: Bus) -> None:
    """A record that fails twice is retried in place (attempts 1, 2, 3 in its first
    delivery) and acked once; the key's next record waits behind it."""
    attempts: list[tuple[int, int, int]] = []
    order: list[int] = []

    async def handler(delivery: Delivery[Record]) -> None:
        n = delivery.record["n"]
        attempts.append((n, delivery.delivered, delivery.attempt))
        if n == 0 and delivery.attempt < 3:
            raise Retry("receiver says 503")
        order.append(n)

    async with delivering(bus, handler) as loop:
        await put(bus, "k", {"n": 0})
        await put(bus, "k", {"n": 1})
        await until(lambda: len(order) == 2)
        info = await settled(bus, loop)
    assert attempts == [(0, 1, 1), (0, 1, 2), (0, 1, 3), (1, 1, 1)]
    assert order == [0, 1]
    assert info.num_redelivered == 0 and loop.stats.retried == 2
    assert await invalid_reports(bus) == []


async def test_poison_records_are_terminated_and_reported_once(bus: Bus) -> None:
    """Undecodable for any reason (bad JSON, nesting that overflows the decoder's
    recursion, a Permanent from the decoder, a subject token that is no valid id): each
    is reported once on evt.invalid and terminated, never handled, never redelivered;
    the good record behind them is handled."""
    handled: list[Record] = []

    async def handler(delivery: Delivery[Record]) -> None:
        handled.append(delivery.record)

    async with delivering(bus, handler) as loop:
        await put(bus, "p1", None, raw=b"{not json")
        await put(bus, "p2", None, raw=b"[" * 200_000 + b"]" * 200_000)  # RecursionError
        await put(bus, "p3", [1, 2, 3])
        await put(bus, "a+b", {"n": 1})
        await put(bus, "p1", {"n": "good"})
        await until(lambda: bool(handled))
        info = await settled(bus, loop)
        reports = await invalid_reports(bus)
    assert handled == [{"n": "good"}]
    assert info.num_redelivered == 0 and loop.stats.terminated == 4
    by_subject = {r.subject.rsplit(".", 1)[-1]: r for r in reports}
    assert len(reports) == 4 and set(by_subject) == {"p1", "p2", "p3", "a+b"}
    assert by_subject["p1"].reason.startswith("undecodable: JSONDecodeError")
    assert "RecursionError" in by_subject["p2"].reason
    assert by_subject["p3"].reason == "not a JSON object"
    assert "'a+b' is not a valid id" in by_subject["a+b"].reason
    assert {r.source for r in reports} == {"test"}


async def test_a_record_that_keeps_failing_is_a_dead_letter_after_its_last_attempt(
    bus: Bus,
) -> None:
    """With 1 attempt per delivery and 3 in all, a record that always fails is handed
    back twice (redelivered by JetStream with delivery counts 2 and 3), then given up:
    terminated, reported once as a dead letter, and on_give_up called once."""
    policy = RetryPolicy(first=0.02, cap=0.05, in_place_attempts=1, max_attempts=3)
    seen: list[tuple[int, int]] = []
    given_up: list[tuple[int, str]] = []

    async def handler(delivery: Delivery[Record]) -> None:
        seen.append((delivery.delivered, delivery.attempt))
        raise RuntimeError("the receiver is gone")

    async def on_give_up(delivery: Delivery[Record], error: BaseException | None,
                         reason: str) -> None:
        given_up.append((delivery.attempt, reason))

    async with delivering(bus, handler, policy=policy, on_give_up=on_give_up) as loop:
        assert (await bus.js.consumer_info(loop.stream, loop.durable)).config.max_deliver \
            == policy.max_deliver + 1
        await put(bus, "dl", {"n": 1})
        await until(lambda: bool(given_up))
        await settled(bus, loop)
        reports = await invalid_reports(bus)
    assert seen == [(1, 1), (2, 2), (3, 3)]
    assert loop.stats.handed_back == 2 and loop.stats.given_up == 1
    (report,) = reports
    assert report.reason.startswith("dead letter: gave up after attempt 3 (delivery 3)")
    assert "RuntimeError: the receiver is gone" in report.reason
    assert json.loads(report.data) == {"n": 1}
    assert given_up[0][0] == 3


async def test_a_handed_back_retry_outlives_a_restart(bus: Bus) -> None:
    """A record handed back with a delay is redelivered to the next loop on the same
    durable, with the delivery count and the attempt number going on from there."""
    policy = RetryPolicy(first=0.3, cap=0.3, in_place_attempts=1, max_attempts=10)
    seen: list[tuple[int, int]] = []
    handed_back = asyncio.Event()

    async def failing(delivery: Delivery[Record]) -> None:
        seen.append((delivery.delivered, delivery.attempt))
        raise Retry("down")

    async def on_retry(delivery: Delivery[Record], error: BaseException, decision: Any) -> None:
        handed_back.set()

    async with delivering(bus, failing, policy=policy, on_retry=on_retry):
        await put(bus, "r", {"n": 1})
        async with asyncio.timeout(WAIT):
            await handed_back.wait()

    async def working(delivery: Delivery[Record]) -> None:
        seen.append((delivery.delivered, delivery.attempt))

    async with delivering(bus, working, policy=policy) as loop:
        await until(lambda: len(seen) == 2)
        await settled(bus, loop)
    assert seen == [(1, 1), (2, 2)]


async def test_stop_finishes_the_records_in_hand_and_acks_them(bus: Bus) -> None:
    """stop() while a handler runs lets it finish and acks it, with the record queued
    behind it."""
    started = asyncio.Event()
    release = asyncio.Event()
    done: list[int] = []

    async def slow(delivery: Delivery[Record]) -> None:
        started.set()
        await release.wait()
        done.append(delivery.record["n"])

    loop: DeliveryLoop[Record]
    async with delivering(bus, slow) as loop:
        await put(bus, "s", {"n": 1})
        await put(bus, "s", {"n": 2})
        async with asyncio.timeout(WAIT):
            await started.wait()
            await until(lambda: loop.held == 2)
        stopping = asyncio.create_task(loop.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done()  # waits for the work in hand
        release.set()
        await stopping
    assert done == [1, 2]
    info = await bus.js.consumer_info(loop.stream, loop.durable)
    assert (info.num_ack_pending, info.num_redelivered) == (0, 0)


async def test_stop_with_a_grace_hands_back_what_does_not_finish(bus: Bus) -> None:
    """After the grace, a handler that does not finish is cancelled and its record, and
    the one queued behind it, are handed back at once: the next loop gets both."""
    started = asyncio.Event()

    async def hangs(delivery: Delivery[Record]) -> None:
        started.set()
        await asyncio.Event().wait()

    async with delivering(bus, hangs) as loop:
        await put(bus, "h", {"n": 1})
        await put(bus, "h", {"n": 2})
        async with asyncio.timeout(WAIT):
            await started.wait()
            await until(lambda: loop.held == 2)
        await loop.stop(grace=0.1)

    redelivered: list[tuple[int, int]] = []

    async def record(delivery: Delivery[Record]) -> None:
        redelivered.append((delivery.record["n"], delivery.delivered))

    async with delivering(bus, record) as loop:
        await until(lambda: len(redelivered) == 2)
        await settled(bus, loop)
    assert redelivered == [(1, 2), (2, 2)]


async def test_a_record_that_never_gets_an_outcome_is_given_up_unrun(bus: Bus) -> None:
    """A record whose handling never ends (as if it killed the process each time) comes
    back on every start; past the policy's max_deliver it is given up without running
    the handler again, and reported once."""
    policy = RetryPolicy(first=0.01, cap=0.01, in_place_attempts=1, max_attempts=1)
    runs: list[int] = []

    async def hangs(delivery: Delivery[Record]) -> None:
        runs.append(delivery.delivered)
        await asyncio.Event().wait()

    await put(bus, "stuck", {"n": 1})
    # A process that dies acks nothing and naks nothing: its record comes back when the
    # ack wait runs out (short here), whether or not the stop below managed to hand it
    # back first.
    for expected in range(1, policy.max_deliver + 1):
        async with delivering(bus, hangs, policy=policy, ack_wait=2) as loop:
            await until(lambda n=expected: len(runs) == n)  # type: ignore[misc]
            await loop.stop(grace=0)
    async with delivering(bus, hangs, policy=policy, ack_wait=2) as loop:
        await until(lambda: loop.stats.given_up == 1)
        await settled(bus, loop)
    assert runs == list(range(1, policy.max_deliver + 1))
    (report,) = await invalid_reports(bus)
    assert report.reason.startswith(
        f"dead letter: delivered {policy.max_deliver + 1} times without an outcome")


async def test_a_delivery_that_went_elsewhere_does_not_let_the_next_record_overtake(
    bus: Bus,
) -> None:
    """A record's delivery goes to another reader of the durable (a process whose lease
    ran out but whose pull was still open, or an inbox whose connection died) and is
    never acked there. With strict order the loop sees the skipped delivery number,
    finishes what it holds and re-reads from the ack floor: the key's records still
    run in the order they were stored, the lost one first."""
    busy = asyncio.Event()
    release = asyncio.Event()
    order: list[str] = []

    async def handle(delivery: Delivery[Record]) -> None:
        if delivery.key == "blocker":
            busy.set()
            await release.wait()
        order.append(f"{delivery.key} {delivery.record['n']}")

    # One record in hand at a time: while the blocker runs, the loop fetches nothing,
    # and the other reader below gets the next delivery.
    async with delivering(bus, handle, ack_wait=2, max_in_flight=1, max_ack_pending=10,
                          strict_order=True) as loop:
        try:
            await put(bus, "blocker", {"n": 0})
            await asyncio.wait_for(busy.wait(), WAIT)
            await put(bus, "k", {"n": 1})
            other = await bus.js.pull_subscribe_bind(durable=loop.durable, stream=loop.stream)
            (stolen,) = await other.fetch(1, timeout=WAIT)  # and never acked
            assert json.loads(stolen.data) == {"n": 1}
            await other.unsubscribe()
            await put(bus, "k", {"n": 2})
            await put(bus, "k", {"n": 3})
        finally:
            release.set()
        await until(lambda: len([o for o in order if o.startswith("k ")]) >= 3)
        await settled(bus, loop)
    assert order == ["blocker 0", "k 1", "k 2", "k 3"]
    assert loop.stats.rewinds == 1
