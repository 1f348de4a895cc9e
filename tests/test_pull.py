"""Fetching from a durable with core/pull.py's Puller, against a real nats-server."""

from __future__ import annotations

import asyncio
import json

import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import APIError

from commhub.core.bus import Bus
from commhub.core.envelope import Message, Sender
from commhub.core.pull import Puller

#: A bound for a fetch that should return long before its own timeout: a hang guard,
#: far above what any run needs, not a timing assertion.
HANG = 20.0


def _message(id_: str) -> Message:
    return Message(id=id_, conversation="c1", channel="test", direction="in",
                   sender=Sender(id="u1"), text="hi")


async def _durable(bus: Bus, name: str) -> Puller:
    config = ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT, ack_wait=60,
                            filter_subject=bus.subjects.all_inbound)
    return await bus.bind_durable(bus.subjects.messages_stream, config)


async def _publish(bus: Bus, *ids: str) -> None:
    for id_ in ids:
        await bus.publish(bus.subjects.inbound("test", "c1"), _message(id_))


def _ids(msgs: list[Msg]) -> list[str]:
    return [json.loads(m.data)["id"] for m in msgs]


async def test_a_fetch_returns_what_is_there_without_waiting_out_its_timeout(bus: Bus) -> None:
    """Three records and a batch of ten with a long timeout: the server's "no more
    messages" ends the fetch with the three, in order."""
    await _publish(bus, "a", "b", "c")
    puller = await _durable(bus, "there")
    msgs = await asyncio.wait_for(puller.fetch(10, timeout=600), HANG)
    assert _ids(msgs) == ["a", "b", "c"]
    for msg in msgs:
        await msg.ack()
    await puller.unsubscribe()


async def test_a_fetch_takes_what_arrives_while_it_waits(bus: Bus) -> None:
    puller = await _durable(bus, "waits")
    fetch = asyncio.create_task(puller.fetch(10, timeout=600))
    await asyncio.sleep(0.2)  # the pull request is at the server
    await _publish(bus, "late")
    msgs = await asyncio.wait_for(fetch, HANG)
    assert _ids(msgs) == ["late"]
    await puller.unsubscribe()


async def test_a_fetch_of_nothing_times_out(bus: Bus) -> None:
    puller = await _durable(bus, "nothing")
    with pytest.raises(nats.errors.TimeoutError):
        await puller.fetch(5, timeout=0.3)
    await puller.unsubscribe()


async def test_a_batch_is_at_most_what_was_asked_and_the_rest_comes_next(bus: Bus) -> None:
    await _publish(bus, *"abcde")
    puller = await _durable(bus, "batches")
    first = await puller.fetch(2, timeout=5)
    second = await puller.fetch(10, timeout=5)
    assert _ids(first) == ["a", "b"]
    assert _ids(second) == ["c", "d", "e"]
    await puller.unsubscribe()


async def test_the_end_of_an_abandoned_request_does_not_end_the_next_fetch(bus: Bus) -> None:
    """A "no messages" status for a request no fetch waits on any more (it arrived after
    its fetch gave up) must not cut the next fetch short: that fetch still gets the
    record published while it waits."""
    puller = await _durable(bus, "stale")
    await _publish(bus, "before")
    assert _ids(await puller.fetch(10, timeout=5)) == ["before"]
    earlier = puller._sequence  # that fetch's request
    fetch = asyncio.create_task(puller.fetch(10, timeout=600))
    await asyncio.sleep(0.2)
    stale = Msg(bus.nc, subject=f"{puller._inbox}.{earlier}", data=b"",
                headers={"Status": "404", "Description": "No Messages"})
    await puller._on_msg(stale)  # as the server would deliver it
    await asyncio.sleep(0.2)
    assert not fetch.done()
    await _publish(bus, "after")
    assert _ids(await asyncio.wait_for(fetch, HANG)) == ["after"]
    await puller.unsubscribe()


async def test_a_record_delivered_between_fetches_is_returned_by_the_next(bus: Bus) -> None:
    """The server can deliver to a request whose fetch has returned (a lost answer, a
    request still open): the record is kept for the next fetch, not dropped."""
    await _publish(bus, "between")
    puller = await _durable(bus, "between")
    # A pull request sent to the puller's inbox outside any fetch.
    await bus.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{bus.subjects.messages_stream}.between",
                         json.dumps({"batch": 1}).encode(), reply=f"{puller._inbox}.77")
    await bus.nc.flush()
    for _ in range(100):
        if puller._records:
            break
        await asyncio.sleep(0.05)
    msgs = await puller.fetch(5, timeout=0.5)
    assert _ids(msgs) == ["between"]
    await puller.unsubscribe()


async def test_records_delivered_and_not_fetched_are_handed_back_on_unsubscribe(
    bus: Bus,
) -> None:
    """They come again at once (a nak), not after the 60 s ack wait."""
    await _publish(bus, "x", "y")
    puller = await _durable(bus, "handback")
    await bus.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{bus.subjects.messages_stream}.handback",
                         json.dumps({"batch": 2}).encode(), reply=f"{puller._inbox}.5")
    for _ in range(100):
        if len(puller._records) == 2:
            break
        await asyncio.sleep(0.05)
    await puller.unsubscribe()
    again = await _durable(bus, "handback")
    msgs = await again.fetch(2, timeout=5)
    assert _ids(msgs) == ["x", "y"]
    assert [m.metadata.num_delivered for m in msgs] == [2, 2]
    await again.unsubscribe()


async def test_a_deleted_consumer_is_an_error_not_an_empty_fetch(bus: Bus) -> None:
    puller = await _durable(bus, "deleted")
    fetch = asyncio.create_task(puller.fetch(5, timeout=600))
    await asyncio.sleep(0.2)
    await bus.js.delete_consumer(bus.subjects.messages_stream, "deleted")
    with pytest.raises(APIError) as failure:
        await asyncio.wait_for(fetch, HANG)
    assert failure.value.code == 409
    await puller.unsubscribe()


async def test_a_leadership_change_ends_a_fetch_as_nothing_for_now(bus: Bus) -> None:
    """A "409 Leadership Change" (a cluster electing the consumer's leader) is not a
    failure: the fetch ends empty, and the next one goes to the new leader."""
    puller = await _durable(bus, "leader")
    fetch = asyncio.create_task(puller.fetch(5, timeout=600))
    await asyncio.sleep(0.2)
    change = Msg(bus.nc, subject=f"{puller._inbox}.{puller._request}", data=b"",
                 headers={"Status": "409", "Description": "Leadership Change"})
    await puller._on_msg(change)
    with pytest.raises(nats.errors.TimeoutError):
        await asyncio.wait_for(fetch, HANG)
    await _publish(bus, "next")
    assert _ids(await puller.fetch(5, timeout=5)) == ["next"]
    await puller.unsubscribe()


async def test_a_filling_fetch_gathers_what_trickles_in_until_its_time_is_up(bus: Bus) -> None:
    """With ``fill`` a record that arrives after the first is in the same batch (a
    plain fetch would have returned the first alone)."""
    puller = await _durable(bus, "fill")
    fetch = asyncio.create_task(puller.fetch(10, timeout=2.0, fill=True))
    await asyncio.sleep(0.2)
    await _publish(bus, "first")
    await asyncio.sleep(0.3)
    await _publish(bus, "second")
    assert _ids(await asyncio.wait_for(fetch, HANG)) == ["first", "second"]
    await puller.unsubscribe()


async def test_a_filling_fetch_returns_as_soon_as_its_batch_is_full(bus: Bus) -> None:
    await _publish(bus, "a", "b", "c")
    puller = await _durable(bus, "full")
    msgs = await asyncio.wait_for(puller.fetch(3, timeout=600, fill=True), HANG)
    assert _ids(msgs) == ["a", "b", "c"]
    await puller.unsubscribe()
