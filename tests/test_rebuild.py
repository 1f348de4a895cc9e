"""``commhub rebuild`` and ``commhub export`` on a real hub process's data directory."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import duckdb
import pytest
from hubproc import HubProcess

from commhub.core.bus import Bus
from commhub.core.envelope import Message, Sender, WorkflowEvent
from commhub.core.subjects import Subjects

pytestmark = pytest.mark.timeout(240)

DAYS = (1_714_557_600.0, 1_714_644_000.0)  # 2024-05-01 10:00 and 2024-05-02 10:00 UTC


async def publish_records(hub: HubProcess) -> int:
    """Agent messages on two days and a workflow run; returns how many messages."""
    bus = await Bus.connect(hub.nats_url, Subjects(hub.info["prefix"]))
    try:
        s = bus.subjects
        items: list = []
        for i in range(40):
            m = Message(id=f"rebuild-note-{i:03d}", conversation=f"c{i % 4}", channel="sms",
                        direction="out", sender=Sender(id="agent", kind="agent"),
                        text=f"note {i}", ts=DAYS[i % 2] + i)
            items.append((s.outbound("sms", m.conversation), m))
        items.append((s.workflow_event("audit", "started"), WorkflowEvent(
            id="we1", run_id="run1", conversation="c0", workflow="audit", kind="started",
            to_state="check", ts=DAYS[0])))
        await bus.publish_all(items)
        return 40
    finally:
        await bus.close()


def sql_json(hub: HubProcess, query: str) -> list[dict]:
    result = hub.run("sql", query, "--format", "json")
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


async def wait_recorded(hub: HubProcess, n: int) -> None:
    for _ in range(600):  # a safety net, not a timing claim
        if sql_json(hub, "SELECT count(*) AS n FROM messages")[0]["n"] >= n:
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the records never landed")


def read_parquet(directory: Path, table: str, key: str = "id") -> list[tuple]:
    con = duckdb.connect()
    try:
        return con.execute(
            f"SELECT {key}, conversation, CAST(day AS VARCHAR) FROM read_parquet("
            f"'{directory / table}/**/*.parquet', hive_partitioning = true) ORDER BY 1"
        ).fetchall()
    finally:
        con.close()


async def test_rebuild_replays_the_streams_into_a_fresh_file(hub_process: HubProcess) -> None:
    """With the hub stopped and its database lost, rebuild recreates every row from the
    streams, with a progress bar; while a hub runs it refuses."""
    hub_process.start()
    n = await publish_records(hub_process)
    await wait_recorded(hub_process, n)

    refused = hub_process.run("rebuild")
    assert refused.returncode == 1
    assert "commhub: error: a commhub is running on" in refused.stderr
    assert "stop it first" in refused.stderr

    assert hub_process.terminate() == 0
    db = hub_process.data_dir / "commhub.duckdb"
    db.unlink()  # the file is lost

    rebuilt = hub_process.run("rebuild", timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "rebuild: " in rebuilt.stderr and "(100.0%)" in rebuilt.stderr
    assert f"rebuilt {db}" in rebuilt.stdout
    assert not db.with_name("commhub.duckdb.rebuild").exists()

    rows = sql_json(hub_process, "SELECT count(*) AS n, count(DISTINCT id) AS ids, "
                                 "min(id) AS first, max(id) AS last FROM messages")
    assert rows == [{"n": n, "ids": n, "first": "rebuild-note-000", "last": "rebuild-note-039"}]
    assert sql_json(hub_process, "SELECT run_id, outcome FROM workflow_runs") == [
        {"run_id": "run1", "outcome": "open"}
    ]
    assert sql_json(hub_process, "SELECT count(*) AS n FROM conversations") == [{"n": 4}]

    # The hub starts on the rebuilt file and records only what is new, once.
    hub_process.start()
    bus = await Bus.connect(hub_process.nats_url, Subjects(hub_process.info["prefix"]))
    late = Message(id="late-after-rebuild", conversation="c9", channel="sms", direction="out",
                   sender=Sender(id="agent", kind="agent"), text="after the rebuild")
    await bus.publish(bus.subjects.outbound("sms", "c9"), late)
    await bus.close()
    await wait_recorded(hub_process, n + 1)
    assert sql_json(hub_process, "SELECT count(*) AS n, count(DISTINCT id) AS ids "
                                 "FROM messages") == [{"n": n + 1, "ids": n + 1}]
    assert hub_process.terminate() == 0


async def test_export_writes_day_partitions_while_running_and_stopped(
    hub_process: HubProcess, tmp_path: Path
) -> None:
    """export writes hive-style day partitions that DuckDB reads back, from the running
    hub (through a snapshot it writes) and from the stopped hub's file."""
    hub_process.start()
    n = await publish_records(hub_process)
    await wait_recorded(hub_process, n)

    live = tmp_path / "live"
    result = hub_process.run("export", "--format", "parquet", str(live))
    assert result.returncode == 0, result.stderr
    assert "exported" in result.stdout
    rows = read_parquet(live, "messages")
    assert len(rows) == n
    assert {day for _id, _c, day in rows} == {"2024-05-01", "2024-05-02"}
    assert sorted(p.name for p in (live / "messages").iterdir()) == [
        "day=2024-05-01", "day=2024-05-02"
    ]
    assert len(read_parquet(live, "conversations", key="messages")) == 4
    assert list((hub_process.data_dir / "snapshots").glob("export-*")) == []

    assert hub_process.terminate() == 0
    stopped = tmp_path / "stopped"
    result = hub_process.run("export", str(stopped))
    assert result.returncode == 0, result.stderr
    assert read_parquet(stopped, "messages") == rows

    parquet = tmp_path / "q.parquet"
    result = hub_process.run("sql", "SELECT id, text FROM messages ORDER BY id LIMIT 3",
                             "--format", "parquet", "--output", str(parquet))
    assert result.returncode == 0, result.stderr
    con = duckdb.connect()
    try:
        assert con.execute(f"SELECT id FROM '{parquet}'").fetchall() == [
            ("rebuild-note-000",), ("rebuild-note-001",), ("rebuild-note-002",)
        ]
    finally:
        con.close()
    no_file = hub_process.run("sql", "SELECT 1", "--format", "parquet")
    assert no_file.returncode == 1 and "--output FILE" in no_file.stderr
