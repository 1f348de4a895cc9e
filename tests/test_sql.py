"""The SQL sandbox, the bus API and the file client, on a real recorder's database."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import duckdb
import pytest

from commhub.core.bus import Bus
from commhub.core.envelope import Message, Sender
from commhub.core.records.formats import format_result, write_parquet
from commhub.core.records.recorder import Recorder
from commhub.core.records.sandbox import (
    LiveSandbox,
    QueryResult,
    SqlBadRequest,
    SqlFailed,
    SqlRefused,
    SqlSandbox,
    SqlTimeout,
    open_sandboxed,
)
from commhub.core.records.sqlclient import query_file, query_over_bus, snapshot_over_bus
from commhub.core.records.sqlservice import SqlService

N_MESSAGES = 12
ENDLESS = "SELECT count(*) FROM range(10000000000000) a, range(1000) b"


async def _wait_for(recorder: Recorder, records: int) -> None:
    deadline = asyncio.get_running_loop().time() + 20  # a safety net, not a timing claim
    while recorder.stats.records < records:
        assert asyncio.get_running_loop().time() < deadline, "records never landed"
        await asyncio.sleep(0.02)


@pytest.fixture
async def recorder(bus: Bus, db_path: Path) -> AsyncIterator[Recorder]:
    """A running recorder holding N_MESSAGES messages of conversation c1."""
    recorder = Recorder(bus, db_path, flush_seconds=0.05)
    await recorder.start()
    records = [
        Message(
            id=f"m{i:02d}",
            conversation="c1",
            channel="ws",
            direction="in" if i % 2 == 0 else "out",
            sender=Sender(id="u1"),
            text=f"hello {i}",
            ts=1_700_000_000 + i,
        )
        for i in range(N_MESSAGES)
    ]
    await bus.publish_all([(bus.subjects.inbound("ws", "c1"), m) for m in records])
    await _wait_for(recorder, N_MESSAGES)
    yield recorder
    await recorder.stop()


@pytest.fixture
async def sandbox(recorder: Recorder, tmp_path: Path) -> AsyncIterator[SqlSandbox]:
    """A sandbox on a snapshot of the recorder's database, in an instance of its own."""
    path = tmp_path / "snapshot.duckdb"
    await recorder.snapshot(path)
    connection = open_sandboxed(path, memory_limit="256MB")
    yield SqlSandbox(connection)
    connection.close()


@pytest.fixture
async def service(bus: Bus, recorder: Recorder, tmp_path: Path) -> AsyncIterator[SqlService]:
    """The bus API as the hub runs it: on snapshots that are at most 0.2 s old."""
    live = LiveSandbox(recorder, tmp_path / "snapshots", max_age=0.2, memory_limit="256MB")
    service = SqlService(bus, live, max_rows=5, timeout=2.0)
    await service.start()
    yield service
    await service.stop()


def test_a_select_returns_columns_rows_and_json_values(sandbox: SqlSandbox) -> None:
    """A SELECT returns its columns and rows, with timestamps as ISO strings."""
    result = sandbox.query(
        "WITH t AS (SELECT id, ts FROM messages ORDER BY id LIMIT 2) SELECT * FROM t", 10, 5.0
    )
    assert result == QueryResult(
        columns=["id", "ts"],
        rows=[["m00", "2023-11-14T22:13:20"], ["m01", "2023-11-14T22:13:21"]],
        truncated=False,
    )


def test_every_duckdb_type_comes_back_json_serializable(sandbox: SqlSandbox) -> None:
    """Timestamps, decimals, lists, structs, maps, blobs, intervals and NaN become JSON values."""
    result = sandbox.query(
        "SELECT now() AS n, 1.50::DECIMAL(4,2) AS d, 12::HUGEINT AS h, [1, 2] AS l, "
        "{'a': 1} AS s, MAP([1], ['x']) AS m, 'ab'::BLOB AS b, INTERVAL 1 DAY AS i, "
        "uuid() AS u, 'nan'::DOUBLE AS f, DATE '2024-01-02' AS dt, TIME '10:30' AS t",
        1,
        5.0,
    )
    row = dict(zip(result.columns, result.rows[0], strict=True))
    json.dumps(result.rows, allow_nan=False)
    assert isinstance(row["n"], str)
    assert row["d"] == 1.5
    assert row["h"] == 12
    assert row["l"] == [1, 2]
    assert row["s"] == {"a": 1}
    assert row["b"] == "YWI="
    assert row["i"] == {"months": 0, "days": 1, "nanoseconds": 0}
    assert row["m"] == [[1, "x"]]
    assert row["f"] is None
    assert (row["dt"], row["t"]) == ("2024-01-02", "10:30:00")


@pytest.mark.parametrize(
    ("sql", "says"),
    [
        ("SELECT * FROM read_csv('/etc/passwd')", "cannot access files"),
        ("SELECT * FROM read_text('/etc/hostname')", "cannot access files"),
        ("COPY messages TO '{tmp}/x.csv'", "only SELECT statements are allowed, got COPY"),
        ("ATTACH '{tmp}/x.db'", "only SELECT statements are allowed, got ATTACH"),
        ("INSTALL httpfs", "only SELECT statements are allowed, got LOAD"),
        ("LOAD httpfs", "only SELECT statements are allowed, got LOAD"),
        ("SET threads = 1", "only SELECT statements are allowed, got SET"),
        ("DROP TABLE messages", "only SELECT statements are allowed, got DROP"),
        ("SELECT 1; DROP TABLE messages", "exactly one SELECT statement is allowed, got 2"),
        ("  ;  ", "no SQL statement given"),
    ],
)
def test_anything_but_one_select_is_refused(
    sandbox: SqlSandbox, tmp_path: Path, sql: str, says: str
) -> None:
    """Files, writes, attach, extensions, settings and multiple statements are refused clearly."""
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SqlRefused, match=r"^refused: ") as refused:
        sandbox.query(sql.format(tmp=out), 10, 5.0)
    assert says in refused.value.message
    assert not list(out.iterdir()), "a refused statement touched the file system"
    assert sandbox.query("SELECT count(*) FROM messages", 10, 5.0).rows == [[N_MESSAGES]]


def test_a_syntax_error_fails_with_duckdbs_message(sandbox: SqlSandbox) -> None:
    """SQL that does not parse or names a missing table fails with DuckDB's explanation."""
    with pytest.raises(SqlFailed, match="syntax error"):
        sandbox.query("SELEC 1", 10, 5.0)
    with pytest.raises(SqlFailed, match="nope"):
        sandbox.query("SELECT * FROM nope", 10, 5.0)


def test_the_row_limit_truncates(sandbox: SqlSandbox) -> None:
    """At most max_rows rows come back, and truncated says whether there were more."""
    cut = sandbox.query("SELECT * FROM range(100000)", 10, 5.0)
    assert cut.rows == [[i] for i in range(10)]
    assert cut.truncated is True
    whole = sandbox.query("SELECT * FROM range(10)", 10, 5.0)
    assert len(whole.rows) == 10
    assert whole.truncated is False


def test_a_long_query_is_interrupted_by_the_time_limit(sandbox: SqlSandbox) -> None:
    """A query past its time limit is interrupted and reported; the next query works."""
    with pytest.raises(SqlTimeout, match=r"query exceeded 0\.3 s"):
        sandbox.query(ENDLESS, 10, 0.3)
    assert sandbox.query("SELECT 42 AS answer", 10, 5.0).rows == [[42]]


async def test_query_over_the_bus(bus: Bus, service: SqlService) -> None:
    """The bus API answers a SELECT, caps rows, and reports refusals with their code."""
    result = await query_over_bus(
        bus.nc, bus.subjects, "SELECT id FROM messages ORDER BY id", timeout=10
    )
    assert result.columns == ["id"]
    assert result.rows == [["m00"], ["m01"], ["m02"], ["m03"], ["m04"]]  # the service's cap
    assert result.truncated is True
    two = await query_over_bus(bus.nc, bus.subjects, "SELECT 1 FROM messages", 10, max_rows=2)
    assert (len(two.rows), two.truncated) == (2, True)

    with pytest.raises(SqlRefused, match="got DROP"):
        await query_over_bus(bus.nc, bus.subjects, "DROP TABLE messages", timeout=10)
    with pytest.raises(SqlRefused, match="cannot access files"):
        await query_over_bus(bus.nc, bus.subjects, "FROM read_csv('/etc/passwd')", timeout=10)
    with pytest.raises(SqlTimeout, match="query exceeded 2 s"):
        await query_over_bus(bus.nc, bus.subjects, ENDLESS, timeout=10)


async def test_a_malformed_request_is_a_bad_request(bus: Bus, service: SqlService) -> None:
    """Non-JSON, a missing sql and a bad max_rows get a bad_request error reply."""
    subject = bus.subjects.api("sql")
    for body in (b"SELECT 1", b'{"query": "SELECT 1"}', b'{"sql": "SELECT 1", "max_rows": 0}'):
        reply = json.loads((await bus.nc.request(subject, body, timeout=10)).data)
        assert reply["error"]["code"] == "bad_request", body
        assert reply["error"]["message"]


async def test_a_slow_query_does_not_block_other_requests(bus: Bus, service: SqlService) -> None:
    """While one query runs into its time limit, another request is answered."""
    slow = asyncio.create_task(query_over_bus(bus.nc, bus.subjects, ENDLESS, timeout=10))
    await asyncio.sleep(0.2)  # let the slow request reach the service first
    fast = await query_over_bus(bus.nc, bus.subjects, "SELECT 7", timeout=10)
    assert fast.rows == [[7]]
    assert not slow.done(), "the fast answer waited for the slow query"
    with pytest.raises(SqlTimeout):
        await slow


async def test_query_over_the_bus_without_a_hub(bus: Bus) -> None:
    """With no SQL service subscribed, the client says so instead of hanging."""
    with pytest.raises(SqlFailed, match="no hub answers"):
        await query_over_bus(bus.nc, bus.subjects, "SELECT 1", timeout=5)


async def test_query_file_reads_a_stopped_recorders_database(
    recorder: Recorder, db_path: Path
) -> None:
    """With the recorder stopped, the file is queried read-only under the same sandbox."""
    await recorder.stop()
    result = query_file(
        db_path, "SELECT direction, count(*) AS n FROM messages GROUP BY 1 ORDER BY 1", 10, 5.0
    )
    assert result.rows == [["in", N_MESSAGES // 2], ["out", N_MESSAGES // 2]]
    with pytest.raises(SqlRefused, match="cannot access files"):
        query_file(db_path, "SELECT * FROM read_csv('/etc/passwd')", 10, 5.0)
    with pytest.raises(SqlRefused, match="got DROP"):
        query_file(db_path, "DROP TABLE messages", 10, 5.0)
    with pytest.raises(SqlTimeout):
        query_file(db_path, ENDLESS, 10, 0.3)
    with pytest.raises(SqlFailed, match="no database"):
        query_file(db_path.with_name("missing.duckdb"), "SELECT 1", 10, 5.0)


def test_format_result_renders_table_csv_and_json() -> None:
    """A result renders as an aligned table, as CSV and as a JSON list of objects."""
    result = QueryResult(
        columns=["name", "n", "tags"],
        rows=[["ann", 3, ["a", "b"]], ["bob, jr", 12, None]],
        truncated=True,
    )
    table = format_result(result, "table").splitlines()
    assert table[0].split() == ["name", "n", "tags"]
    assert table[2].split() == ["ann", "3", '["a",', '"b"]']
    assert table[2].index("3") == table[3].index("12") + 1  # numbers are right-aligned
    assert table[-1] == "(2 rows, truncated at the row limit)"

    parsed = list(csv.reader(io.StringIO(format_result(result, "csv"))))
    assert parsed == [["name", "n", "tags"], ["ann", "3", '["a", "b"]'], ["bob, jr", "12", ""]]

    assert json.loads(format_result(result, "json")) == [
        {"name": "ann", "n": 3, "tags": ["a", "b"]},
        {"name": "bob, jr", "n": 12, "tags": None},
    ]
    with pytest.raises(ValueError, match="unknown format"):
        format_result(result, "xml")


def test_bad_arguments_are_bad_requests(sandbox: SqlSandbox) -> None:
    """A non-positive row limit is refused as a bad request before anything runs."""
    with pytest.raises(SqlBadRequest):
        sandbox.query("SELECT 1", 0, 5.0)


REFUSED_OVER_THE_BUS = [
    ("SELECT * FROM read_csv('/etc/passwd')", "cannot access files"),
    ("COPY messages TO '{tmp}/x.csv'", "got COPY"),
    ("COPY (SELECT 1) TO '{tmp}/x.parquet' (FORMAT parquet)", "got COPY"),
    ("ATTACH '{tmp}/x.db' AS x", "got ATTACH"),
    ("INSTALL httpfs", "got LOAD"),
    ("LOAD httpfs", "got LOAD"),
    ("SET enable_external_access = true", "got SET"),
    ("DROP TABLE messages", "got DROP"),
    ("SELECT 1; SELECT 2", "exactly one SELECT statement is allowed, got 2"),
]


async def test_live_sql_refuses_each_escape_and_still_answers(
    bus: Bus, service: SqlService, tmp_path: Path
) -> None:
    """Over the bus, on the hub's snapshot sandbox, every escape is refused with a clear
    message, nothing reaches the file system, and a normal query still works after each."""
    out = tmp_path / "escape"
    out.mkdir()
    for sql, says in REFUSED_OVER_THE_BUS:
        with pytest.raises(SqlRefused, match=r"^refused: ") as refused:
            await query_over_bus(bus.nc, bus.subjects, sql.format(tmp=out), timeout=10)
        assert says in refused.value.message, sql
        result = await query_over_bus(bus.nc, bus.subjects, "SELECT count(*) FROM messages", 10)
        assert result.rows == [[N_MESSAGES]]
    assert not list(out.iterdir()), "a refused statement touched the file system"


async def test_live_sql_runs_in_its_own_locked_instance(
    bus: Bus, service: SqlService, recorder: Recorder, db_path: Path, tmp_path: Path
) -> None:
    """User SQL reads a snapshot in an instance of its own with external access off, the
    configuration locked and a memory limit, never the recorder's writer instance."""
    result = await service.query(
        "SELECT current_setting('enable_external_access') AS external, "
        "current_setting('lock_configuration') AS locked, "
        "current_setting('memory_limit') AS memory, "
        "(SELECT list(path) FROM duckdb_databases() WHERE path IS NOT NULL) AS files"
    )
    external, locked, memory, files = result.rows[0]
    assert (external, locked) == (False, True)
    assert memory.endswith("MiB") and float(memory.split()[0]) < 300
    assert len(files) == 1
    assert Path(files[0]).parent == tmp_path / "snapshots"
    assert Path(files[0]) != db_path
    # The writer was untouched by all this and keeps writing.
    more = Message(id="late", conversation="c1", channel="ws", direction="in",
                   sender=Sender(id="u1"), text="late")
    await bus.publish(bus.subjects.inbound("ws", "c1"), more)
    await _wait_for(recorder, N_MESSAGES + 1)


async def test_live_sql_sees_new_records_once_the_snapshot_ages(
    bus: Bus, service: SqlService, recorder: Recorder, tmp_path: Path
) -> None:
    """Records committed after a snapshot show up in a later snapshot; superseded snapshot
    files are deleted, and stopping the service deletes the last one."""
    query = "SELECT count(*) FROM messages"
    assert (await service.query(query)).rows == [[N_MESSAGES]]
    records = [
        Message(id=f"new{i}", conversation="c2", channel="ws", direction="in",
                sender=Sender(id="u2"), text="more")
        for i in range(3)
    ]
    await bus.publish_all([(bus.subjects.inbound("ws", "c2"), m) for m in records])
    await _wait_for(recorder, N_MESSAGES + 3)
    deadline = asyncio.get_running_loop().time() + 20  # a safety net, not a timing claim
    while (await service.query(query)).rows != [[N_MESSAGES + 3]]:
        assert asyncio.get_running_loop().time() < deadline, "new records never showed"
        await asyncio.sleep(0.05)
    snapshots = tmp_path / "snapshots"
    assert len(list(snapshots.glob("sql-*.duckdb"))) == 1
    await service.stop()
    assert list(snapshots.glob("sql-*")) == []


async def test_an_export_snapshot_over_the_bus(bus: Bus, service: SqlService) -> None:
    """api.snapshot writes a fresh copy of the records and replies with its path."""
    path = await snapshot_over_bus(bus.nc, bus.subjects, timeout=20)
    assert path.is_file()
    con = open_sandboxed(path)
    try:
        assert con.execute("SELECT count(*) FROM messages").fetchall() == [(N_MESSAGES,)]
    finally:
        con.close()
    path.unlink()


async def test_the_in_process_api_applies_the_same_rules(service: SqlService) -> None:
    """SqlService.query caps rows at the service limit and refuses what the bus refuses."""
    result = await service.query("SELECT id FROM messages ORDER BY id", max_rows=100)
    assert (len(result.rows), result.truncated) == (5, True)
    with pytest.raises(SqlRefused, match="got DROP"):
        await service.query("DROP TABLE messages")
    with pytest.raises(SqlBadRequest):
        await service.query("SELECT 1", max_rows=0)


def test_write_parquet_round_trips_through_duckdb(tmp_path: Path) -> None:
    """A result written as Parquet reads back with its columns, values and nulls."""
    result = QueryResult(
        columns=["name", "n", "score", "tags", "mixed"],
        rows=[["ann", 3, 0.5, ["a"], 1], ["bob", None, 1.25, [], "x"]],
    )
    path = tmp_path / "out.parquet"
    write_parquet(result, path)
    con = duckdb.connect()
    try:
        rows = con.execute(f"SELECT * FROM read_parquet('{path}')").fetchall()
    finally:
        con.close()
    assert rows == [("ann", 3, 0.5, ["a"], "1"), ("bob", None, 1.25, [], '"x"')]
