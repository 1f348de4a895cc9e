"""One active recorder per prefix: a second one stands by, takes over within seconds of
the first dying, catches its own file up to the ack floor, and neither loses nor doubles
a row; SQL is answered by the active one."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from commhub.core.bus import Bus
from commhub.core.config import Settings
from commhub.core.envelope import Message, Sender
from commhub.core.hub import Hub
from commhub.core.records.sqlclient import query_over_bus
from commhub.core.streams import LEASE_TTL_SECONDS


def agent_message(n: int) -> tuple[str, Message]:
    conversation = f"standby{n % 7}"
    return f"{conversation}", Message(
        id=f"standby-message-{n:05d}", conversation=conversation, channel="sms",
        direction="out", sender=Sender(id="agent-7", kind="agent"), text=f"message {n}")


async def publish(bus: Bus, numbers: range) -> None:
    await bus.publish_all([(bus.subjects.outbound("sms", c), m)
                           for c, m in map(agent_message, numbers)])


async def count(bus: Bus, sql: str) -> int:
    result = await query_over_bus(bus.nc, bus.subjects, sql)
    return int(result.rows[0][0])


async def test_the_standby_takes_over_from_the_ack_floor(
    settings: Settings, bus: Bus, tmp_path: Path
) -> None:
    first = Hub(settings.model_copy(update={"role": "recorder", "data_dir": tmp_path / "r1"}))
    second = Hub(settings.model_copy(update={"role": "recorder", "data_dir": tmp_path / "r2"}))
    await first.start()
    await second.start()
    try:
        assert first.recorder is not None and second.recorder is None
        assert any("standby" in line for line in second.endpoints)
        await publish(bus, range(0, 500))
        sql = "SELECT count(*) FROM messages WHERE conversation LIKE 'standby%'"
        async with asyncio.timeout(20):
            while await count(bus, sql) < 500:
                await asyncio.sleep(0.1)

        # The active one dies: its connection goes, nothing is released.
        assert first.bus is not None and first._recorder_lease is not None
        for task in first._recorder_lease._tasks:
            task.cancel()
        await first.bus.nc.close()
        died = time.monotonic()
        await publish(bus, range(500, 1000))

        async with asyncio.timeout(LEASE_TTL_SECONDS + 20):
            while second.recorder is None:
                await asyncio.sleep(0.1)
        took_over = time.monotonic() - died
        assert took_over < LEASE_TTL_SECONDS + 5
        async with asyncio.timeout(30):
            while await count(bus, sql) < 1000:  # answered by the second one now
                await asyncio.sleep(0.2)
        ids = await query_over_bus(
            bus.nc, bus.subjects,
            "SELECT count(*), count(DISTINCT id) FROM messages WHERE conversation LIKE "
            "'standby%'")
        assert ids.rows[0] == [1000, 1000]
        assert second.recorder.stats.caught_up >= 500  # the first one's share
    finally:
        await second.stop()
        await first.stop()


async def test_a_recorder_that_cannot_open_its_file_fails_the_start(
    settings: Settings, tmp_path: Path
) -> None:
    """Taking the lease at start and failing to open the file (a newer schema) is an
    error of the start, not a silent standby; the lease is free again."""
    import duckdb
    import pytest

    from commhub.core.records import schema

    data = tmp_path / "newer"
    data.mkdir()
    con = duckdb.connect(str(data / "commhub.duckdb"))
    schema.migrate(con)
    con.execute("INSERT INTO schema_version VALUES (99, 'from the future', now())")
    con.close()
    hub = Hub(settings.model_copy(update={"role": "recorder", "data_dir": data}))
    with pytest.raises(schema.SchemaError):
        await hub.start()
    other = Hub(settings.model_copy(update={"role": "recorder", "data_dir": tmp_path / "ok"}))
    await other.start()
    try:
        assert other.recorder is not None  # not kept out by a stale lease
    finally:
        await other.stop()
