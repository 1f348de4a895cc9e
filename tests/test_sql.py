"""The SQL sandbox, the bus API and the file client, on a real recorder's database."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import duckdb
import pytest

from commhub.core.bus import Bus
from commhub.core.envelope import Message, Sender
from commhub.core.records.formats import format_result, write_parquet
from commhub.core.records.recorder import Recorder
from commhub.core.records.sandbox import (
    QueryResult,
    SqlBadRequest,
    SqlBusy,
    SqlFailed,
    SqlRateLimited,
    SqlRefused,
    SqlSandbox,
    SqlTimeout,
    SqlTooLarge,
    open_sandboxed,
)
from commhub.core.records.snapshots import LiveSandbox
from commhub.core.records.sqlclient import (
    leased_snapshot,
    query_file,
    query_over_bus,
)
from commhub.core.records.sqlnames import DENIED, names_in_tokens, refusal, with_dependents
from commhub.core.records.sqlservice import SqlService
from commhub.core.records.sqlworkers import HEADROOM, memory_bytes, memory_ceiling

N_MESSAGES = 12
ENDLESS = "SELECT count(*) FROM range(10000000000000) a, range(1000) b"


async def _wait_for(recorder: Recorder, records: int) -> None:
    await _until(lambda: recorder.stats.records >= records, "records never landed")


async def _until(condition: Callable[[], bool], never: str) -> None:
    """Wait until ``condition()`` holds; the deadline is a safety net, not a timing claim."""
    deadline = asyncio.get_running_loop().time() + 20
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, never
        await asyncio.sleep(0.02)


def _count_in_another_process(path: Path) -> int:
    """Messages in a snapshot, read by another process as `commhub export` reads it."""
    code = (
        "import duckdb, sys\n"
        "con = duckdb.connect(sys.argv[1], read_only=True)\n"
        "print(con.execute('SELECT count(*) FROM messages').fetchall()[0][0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


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
    await _until(lambda: service.in_flight == 1, "the slow request never reached the service")
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


async def test_live_sql_runs_on_a_snapshot_never_the_writer(
    bus: Bus, service: SqlService, recorder: Recorder
) -> None:
    """User SQL reads a snapshot (the database it sees is a snapshot file, not the
    recorder's), and the writer keeps writing meanwhile."""
    result = await service.query("SELECT current_database() AS db, count(*) FROM messages")
    database, count = result.rows[0]
    assert database.startswith("sql-")  # the snapshot's file name, not "commhub"
    assert count == N_MESSAGES
    more = Message(id="late", conversation="c1", channel="ws", direction="in",
                   sender=Sender(id="u1"), text="late")
    await bus.publish(bus.subjects.inbound("ws", "c1"), more)
    await _wait_for(recorder, N_MESSAGES + 1)


async def test_a_sandboxed_instance_is_locked_down_before_any_query(
    recorder: Recorder, tmp_path: Path
) -> None:
    """open_sandboxed gives an instance whose settings, seen from the hub's side, forbid
    file access, lock the configuration, bound memory, and name no temporary directory;
    and its configuration cannot be changed afterwards."""
    path = tmp_path / "locked.duckdb"
    await recorder.snapshot(path)
    con = open_sandboxed(path, memory_limit="200MB")
    try:
        settings = dict(con.execute(
            "SELECT name, value FROM duckdb_settings() WHERE name IN ('enable_external_access',"
            " 'lock_configuration', 'memory_limit', 'temp_directory',"
            " 'autoload_known_extensions', 'autoinstall_known_extensions')"
        ).fetchall())
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("SET enable_external_access = true")
    finally:
        con.close()
    assert settings["enable_external_access"] == "false"
    assert settings["lock_configuration"] == "true"
    assert float(settings["memory_limit"].split()[0]) < 200
    assert settings["temp_directory"] == ""
    assert settings["autoload_known_extensions"] == "false"
    assert settings["autoinstall_known_extensions"] == "false"


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
    assert len(list(snapshots.glob("sql-*.duckdb"))) <= 1
    await service.stop()
    assert list(snapshots.glob("sql-*")) == []


async def test_an_export_reads_a_lent_snapshot_that_goes_once_released(
    bus: Bus, service: SqlService
) -> None:
    """api.snapshot lends the current snapshot; another process reads it; after the
    release (leased_snapshot does it) the hub deletes it once it is no longer fresh."""
    async with leased_snapshot(bus.nc, bus.subjects) as path:
        assert path.is_file()
        assert await asyncio.to_thread(_count_in_another_process, path) == N_MESSAGES
    await _until(lambda: not path.exists(), "the released snapshot was never deleted")


async def test_a_leased_snapshot_outlives_newer_ones_until_released(
    recorder: Recorder, tmp_path: Path
) -> None:
    """A lent snapshot stays while newer ones replace it for queries, and goes at its
    release; a second release of the same lease is refused; close leaves no file."""
    live = LiveSandbox(recorder, tmp_path / "snapshots", max_age=0.0)
    try:
        lease = await live.lease()
        assert (await live.aquery("SELECT count(*) FROM messages", 10, 5.0)).rows == [
            [N_MESSAGES]
        ]
        assert lease.path.exists(), "a newer snapshot deleted the one lent out"
        assert await asyncio.to_thread(_count_in_another_process, lease.path) == N_MESSAGES
        assert live.release(lease.id) is True
        assert not lease.path.exists()
        assert live.release(lease.id) is False
    finally:
        await live.close()
    assert live.files() == []


async def test_an_abandoned_lease_expires(recorder: Recorder, tmp_path: Path) -> None:
    """A lease nobody releases ends after lease_seconds, and its snapshot is deleted."""
    live = LiveSandbox(recorder, tmp_path / "snapshots", max_age=0.0, lease_seconds=0.0)
    try:
        lease = await live.lease()
        await _until(lambda: not lease.path.exists(), "the abandoned lease never expired")
        assert live.release(lease.id) is False
    finally:
        await live.close()


async def test_thirty_snapshot_requests_share_one_file_and_none_outlive_stop(
    bus: Bus, recorder: Recorder, tmp_path: Path
) -> None:
    """30 api.snapshot requests at once get one shared snapshot (leases up to the cap,
    then busy, then rate_limited, each with a message), and stopping deletes it."""
    live = LiveSandbox(recorder, tmp_path / "snapshots", max_age=600.0, max_leases=4)
    service = SqlService(bus, live, snapshot_rate=(0.001, 5))
    await service.start()
    try:
        subject = bus.subjects.api("snapshot")
        replies = await asyncio.gather(
            *(bus.nc.request(subject, b"{}", timeout=60) for _ in range(30))
        )
        bodies = [json.loads(reply.data) for reply in replies]
        paths = {body["path"] for body in bodies if "lease" in body}
        errors = [body["error"] for body in bodies if "error" in body]
        assert sum("lease" in body for body in bodies) == 4
        assert Counter(error["code"] for error in errors) == {"busy": 1, "rate_limited": 25}
        assert all(error["message"] for error in errors)
        assert len(paths) == 1, "the requests did not share one snapshot"
        assert [p for p in live.files() if p.suffix == ".duckdb"] == [Path(paths.pop())]
    finally:
        await service.stop()
    assert live.files() == []


async def test_a_crashed_hubs_snapshots_are_removed_at_start(
    recorder: Recorder, tmp_path: Path
) -> None:
    """Snapshot files a killed hub left behind are deleted when the next one starts;
    other files in the folder are not touched."""
    folder = tmp_path / "snapshots"
    folder.mkdir()
    for name in ("sql-7.duckdb", "sql-7.duckdb.wal", "export-0a1b.duckdb", "notes.txt"):
        (folder / name).write_text("x")
    live = LiveSandbox(recorder, folder)
    try:
        assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    finally:
        await live.close()


async def test_busy_and_rate_limited_requests_get_their_own_codes(
    bus: Bus, recorder: Recorder, tmp_path: Path
) -> None:
    """Past its concurrency and backlog the service answers busy; past its request rate,
    rate_limited; both at once, without running the query."""
    live = LiveSandbox(recorder, tmp_path / "snapshots")
    service = SqlService(bus, live, timeout=2.0, concurrency=1, backlog=0, sql_rate=(0.001, 3))
    await service.start()
    try:
        slow = asyncio.create_task(query_over_bus(bus.nc, bus.subjects, ENDLESS, timeout=10))
        await _until(lambda: service.in_flight == 1, "the slow request never reached the service")
        with pytest.raises(SqlBusy, match="busy"):
            await query_over_bus(bus.nc, bus.subjects, "SELECT 1", timeout=10)
        with pytest.raises(SqlTimeout):
            await slow
        for _ in range(2):  # the two requests left of the burst of 3
            assert (await query_over_bus(bus.nc, bus.subjects, "SELECT 1", 10)).rows == [[1]]
        with pytest.raises(SqlRateLimited, match="SQL requests a second"):
            await query_over_bus(bus.nc, bus.subjects, "SELECT 1", timeout=10)
    finally:
        await service.stop()


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


# -- what user SQL may not look at ----------------------------------------------------
DENIED_SQL = [
    ("SELECT current_setting('home_directory')", "current_setting"),
    ("SELECT current_setting('temp_directory')", "current_setting"),
    ("SELECT SYSTEM.MAIN.\"Current_Setting\"('memory_limit')", "current_setting"),
    ("SELECT 'secret_directory'.current_setting()", "current_setting"),
    ("SELECT name, value FROM duckdb_settings()", "duckdb_settings"),
    ("FROM duckdb_settings", "duckdb_settings"),
    ("SELECT * FROM pg_catalog.pg_settings", "pg_settings"),
    ("SELECT * FROM duckdb_profiling_settings()", "duckdb_profiling_settings"),
    ("SELECT path FROM duckdb_databases()", "duckdb_databases"),
    ("SELECT * FROM pragma_database_list", "pragma_database_list"),
    ("SELECT * FROM pg_catalog.pg_database", "pg_database"),
    ("SELECT install_path FROM duckdb_extensions()", "duckdb_extensions"),
    ("SELECT getenv('HOME')", "getenv"),
    ("SELECT * FROM duckdb_temporary_files()", "duckdb_temporary_files"),
    ("SELECT * FROM duckdb_secrets()", "duckdb_secrets"),
    ("SELECT * FROM which_secret('s3://bucket/x', 's3')", "which_secret"),
    ("SELECT * FROM duckdb_logs", "duckdb_logs"),
    ("SELECT * FROM query('SELECT current_database()')", "query"),
    ("SELECT * FROM query_table('messages')", "query_table"),
    ("FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1'))",
     "json_execute_serialized_sql"),
    ("FROM histogram_values(messages, stream_seq)", "histogram_values"),  # a macro over one
    ("WITH s AS (SELECT current_setting('home_directory') AS h) SELECT * FROM s",
     "current_setting"),
    ("SELECT list_transform([1], x -> current_setting('home_directory'))", "current_setting"),
    ("SELECT count(*) FILTER (WHERE getenv('HOME') IS NULL) OVER () FROM messages", "getenv"),
    ("SELECT id FROM messages WHERE id IN (SELECT path FROM duckdb_databases())",
     "duckdb_databases"),
    ("DESCRIBE SELECT * FROM duckdb_settings()", "duckdb_settings"),
    ("SELECT * FROM (PIVOT (SELECT current_setting('home_directory') AS h, 1 AS n) "
     "ON h IN ('x') USING sum(n))", "current_setting"),
]


@pytest.mark.parametrize(("sql", "name"), DENIED_SQL)
def test_functions_that_reveal_the_hub_are_refused_by_name(
    sandbox: SqlSandbox, tmp_path: Path, sql: str, name: str
) -> None:
    """Settings, attached files, environment, secrets, logs and SQL-from-text are refused
    before they run, naming the function, however the call is spelled or nested."""
    with pytest.raises(SqlRefused) as refused:
        sandbox.query(sql, 10, 5.0)
    assert refused.value.message.startswith(f"refused: {name} is not allowed in SQL queries: ")
    assert str(tmp_path) not in refused.value.message


def test_denied_names_reach_views_and_macros_built_on_them() -> None:
    """A built-in view or macro over a denied function is denied too, through any depth;
    the fallback on tokens finds names outside strings and comments."""
    denied = with_dependents(
        [
            ("outer_macro", "FROM inner_view()"),
            ("inner_view", "SELECT path FROM duckdb_databases()"),
            ("harmless", "SELECT 1 AS current_settings_count"),
        ],
        {"duckdb_databases": "it reveals file paths"},
    )
    assert set(denied) == {"duckdb_databases", "inner_view", "outer_macro"}
    assert refusal({"outer_macro"}, denied) == (
        "refused: outer_macro is not allowed in SQL queries: it is built on inner_view, "
        "and it is built on duckdb_databases, and it reveals file paths"
    )
    text = "SELECT 'getenv' AS x, \"GetEnv\"('HOME') -- query\n"
    tokens = [(position, str(kind)) for position, kind in duckdb.tokenize(text)]
    names = names_in_tokens(text, tokens)
    assert "getenv" in names and "query" not in names
    assert refusal(names, DENIED) == (
        "refused: getenv is not allowed in SQL queries: it reveals the hub's environment variables"
    )


INTROSPECTION = [
    "SHOW DATABASES",
    "SHOW ALL TABLES",
    "SELECT * FROM information_schema.schemata",
    "SELECT current_database(), current_schema()",
    "SELECT * FROM duckdb_tables()",
    "SELECT * FROM pragma_database_size()",
    "SELECT * FROM duckdb_views()",
    "SHOW temp_directory",  # a setting's name: only ever a table here
    "SHOW secret_directory",
    "SHOW allowed_paths",
    "SELECT * FROM sqlite_scan('x.db', 't')",  # an extension that would be installed
    "SELECT * FROM read_csv('https://example.com/x.csv')",
]


@pytest.mark.parametrize("sql", INTROSPECTION)
def test_allowed_introspection_reveals_no_path(
    sandbox: SqlSandbox, tmp_path: Path, sql: str
) -> None:
    """What user SQL may still ask about the database, and the errors it gets, name no
    directory of the hub's machine: not the data directory, not the home directory."""
    try:
        seen = json.dumps(sandbox.query(sql, 1000, 5.0).to_dict())
    except (SqlRefused, SqlFailed) as exc:
        seen = exc.message
    assert str(tmp_path) not in seen
    home = str(Path.home())
    assert home == "/" or home not in seen


# -- the byte limit -------------------------------------------------------------------
def test_the_byte_limit_truncates_and_refuses_a_first_row_over_it(sandbox: SqlSandbox) -> None:
    """Rows stop at max_bytes (marked truncated); a first row over it, text or list,
    is refused with a message that names the setting."""
    query = "SELECT repeat('x', 1000) || i AS s FROM range(100) t(i)"
    cut = sandbox.query(query, 1000, 5.0, max_bytes=10_000)
    assert cut.truncated is True
    assert 0 < len(cut.rows) < 100
    assert sum(len(row[0]) for row in cut.rows) <= 10_000
    assert cut.rows[0][0] == "x" * 1000 + "0"
    whole = sandbox.query(query, 1000, 5.0, max_bytes=1_000_000)
    assert (len(whole.rows), whole.truncated) == (100, False)
    for big in ("SELECT repeat('x', 2000000) AS big", "SELECT range(1000000) AS big"):
        with pytest.raises(SqlTooLarge, match=r"^result too large: its first row takes") as err:
            sandbox.query(big, 10, 5.0, max_bytes=1_000_000)
        assert "sql_max_result_bytes" in err.value.message


async def test_result_too_large_reaches_a_bus_client_with_its_code(bus: Bus, recorder: Recorder,
                                                             tmp_path: Path) -> None:
    """The service applies its max_bytes, and the client raises SqlTooLarge for it."""
    live = LiveSandbox(recorder, tmp_path / "snapshots")
    service = SqlService(bus, live, max_bytes=100_000)
    await service.start()
    try:
        with pytest.raises(SqlTooLarge, match="100,000-byte limit"):
            await query_over_bus(bus.nc, bus.subjects, "SELECT repeat('x', 200000)", 10)
    finally:
        await service.stop()


# -- worker processes: memory and time bounds that hold -------------------------------
def _reset_peak_rss() -> int:
    """Reset the process's peak RSS (VmHWM) to its current RSS, and return it."""
    Path("/proc/self/clear_refs").write_text("5")
    return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


async def test_a_huge_value_cannot_grow_the_hub(service: SqlService) -> None:
    """SELECT repeat('x', 1000000000), twice at once, fails with a clear out-of-memory
    error inside the workers' memory ceiling, and the hub process's peak RSS stays put
    (in the hub it took 3.8 GB); the next query is answered."""
    await service.query("SELECT 1")  # workers started, snapshot taken
    before = _reset_peak_rss()
    huge = "SELECT repeat('x', 1000000000) AS x"
    outcomes = await asyncio.gather(
        service.query(huge), service.query(huge), return_exceptions=True
    )
    for outcome in outcomes:
        assert isinstance(outcome, SqlFailed), outcome
        assert "needs more memory than" in outcome.message
        assert "\n" not in outcome.message
    assert _peak_rss_bytes() - before < 256 * 2**20
    assert (await service.query("SELECT 42")).rows == [[42]]


async def test_a_worker_that_stops_answering_is_killed_and_replaced(
    bus: Bus, recorder: Recorder, tmp_path: Path
) -> None:
    """A worker that does not answer by the time limit plus grace (here: stopped, as one
    stuck planning a huge constant would be) is killed; the query gets timeout, and the
    next query runs in a new worker."""
    live = LiveSandbox(recorder, tmp_path / "snapshots", workers=1)
    live.workers.grace = 1.0
    service = SqlService(bus, live, timeout=3.0, concurrency=1)
    await service.start()
    try:
        await service.query("SELECT 1")
        (stuck,) = live.workers.pids()
        os.kill(stuck, signal.SIGSTOP)
        with pytest.raises(SqlTimeout, match=r"query exceeded 3 s"):
            await service.query("SELECT 2")
        assert (await service.query("SELECT 3")).rows == [[3]]
        assert stuck not in live.workers.pids()
        assert not _alive(stuck)
    finally:
        await service.stop()


async def test_a_worker_that_dies_is_replaced_and_stop_leaves_none(
    bus: Bus, recorder: Recorder, tmp_path: Path
) -> None:
    """A worker killed mid-query fails that query with a message saying so; the next
    query gets a new worker; stopping the service leaves no worker process."""
    live = LiveSandbox(recorder, tmp_path / "snapshots", workers=1)
    service = SqlService(bus, live, timeout=30.0, concurrency=1)
    await service.start()
    try:
        await service.query("SELECT 1")
        (doomed,) = live.workers.pids()
        slow = asyncio.create_task(service.query(ENDLESS))
        await _until(lambda: service.in_flight == 1, "the query never started")
        os.kill(doomed, signal.SIGKILL)
        with pytest.raises(SqlFailed, match="was killed by SIGKILL"):
            await slow
        assert (await service.query("SELECT 4")).rows == [[4]]
        (replacement,) = live.workers.pids()
        assert replacement != doomed
    finally:
        await service.stop()
    assert live.workers.pids() == []
    assert not _alive(replacement)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_memory_sizes_read_as_duckdb_reads_them() -> None:
    """Memory limits parse with DuckDB's units (KB = 1000, KiB = 1024); the ceiling adds
    the headroom; anything else is a clear ValueError."""
    assert memory_bytes("1GB") == 10**9
    assert memory_bytes(" 512 MiB ") == 512 * 2**20
    assert memory_bytes("2.5gb") == 2_500_000_000
    assert memory_ceiling("1GiB") == 2**30 + HEADROOM
    assert memory_ceiling(None) is None
    for bad in ("80%", "1000", "lots"):
        with pytest.raises(ValueError, match="not a memory size"):
            memory_bytes(bad)
