"""The SQL sandbox for user queries: one read-only SELECT, no file or network access, a
time and a row limit.

Only one process can open the DuckDB file while the hub runs, so user SQL reaches the
records over the bus (:mod:`.sqlservice`). User SQL never runs on the recorder's
instance: ``enable_external_access`` and ``lock_configuration`` apply to a whole DuckDB
instance, so user SQL gets instances of its own. :class:`LiveSandbox` asks the recorder
for a snapshot (a checkpointed copy of the file, taken when the last one is older than
``max_age``, 1 s by default) and opens it read-only in a separate instance, configured
before any query runs. With no hub running, :func:`~.sqlclient.query_file` opens the
file itself the same way. Every path runs the same :class:`SqlSandbox`:

1. The text must be exactly one statement of type SELECT (``WITH ... SELECT``,
   ``FROM t``, ``VALUES``, ``DESCRIBE``, ``SHOW``, ``SUMMARIZE`` count as SELECT);
   anything else, or several statements, is refused before it runs.
2. It runs in a ``READ ONLY`` transaction on a fresh cursor, on a read-only instance
   whose ``enable_external_access`` is false and whose configuration is locked: no file
   or network access (``read_csv('/etc/passwd')`` is refused), no settings changes, no
   writes; the instance's ``memory_limit`` bounds its memory.
3. A timer calls ``cursor.interrupt()`` after ``timeout`` seconds.
4. At most ``max_rows`` rows come back; ``truncated`` says whether there were more.

Errors are :class:`SqlError` subclasses whose ``code`` is the bus API's error code:
``refused``, ``timeout``, ``bad_request`` or ``failed``. Values in results are plain
JSON values (timestamps and dates as ISO strings, decimals as numbers, blobs as base64,
NaN and infinities as null; JSON columns stay JSON text).

Concurrency: :meth:`SqlSandbox.query` blocks; call it from a worker thread (the
service does, one thread per query in flight, at most ``concurrency``). Queries do not
block the recorder: they read a snapshot; taking one waits for the batch being written.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import os
import threading
import time as _time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import duckdb
import pyarrow as pa

log = logging.getLogger(__name__)

# Rows converted per Arrow batch while reading a result.
_READ_BATCH = 2048


# -- results and errors ---------------------------------------------------------------
@dataclass
class QueryResult:
    """Column names, rows (lists of JSON values) and whether rows were left out."""

    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The bus API's reply body."""
        return {"columns": self.columns, "rows": self.rows, "truncated": self.truncated}


class SqlError(Exception):
    """A query that did not produce a result; ``code`` is the API error code."""

    code = "failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SqlRefused(SqlError):
    """The sandbox refused the query: not one SELECT, file access, a write, a setting."""

    code = "refused"


class SqlTimeout(SqlError):
    """The query ran longer than its time limit and was interrupted."""

    code = "timeout"


class SqlBadRequest(SqlError):
    """The request itself was malformed (not JSON, no ``sql``, a bad ``max_rows``)."""

    code = "bad_request"


class SqlFailed(SqlError):
    """DuckDB could not run the query (syntax, unknown table, ...) or no hub answered."""

    code = "failed"


ERRORS_BY_CODE: dict[str, type[SqlError]] = {
    cls.code: cls for cls in (SqlRefused, SqlTimeout, SqlBadRequest, SqlFailed)
}


# -- the sandbox ----------------------------------------------------------------------
def check_select(cursor: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise :class:`SqlRefused` unless ``sql`` is exactly one SELECT statement."""
    try:
        statements = cursor.extract_statements(sql)
    except duckdb.Error as exc:
        raise SqlFailed(str(exc)) from None
    if not statements:
        raise SqlRefused("refused: no SQL statement given")
    if len(statements) > 1:
        raise SqlRefused(
            f"refused: exactly one SELECT statement is allowed, got {len(statements)} statements"
        )
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise SqlRefused(f"refused: only SELECT statements are allowed, got {kind.name}")


def open_sandboxed(
    path: Path | str, memory_limit: str | None = None, threads: int | None = None
) -> duckdb.DuckDBPyConnection:
    """Open a DuckDB file read-only in an instance of its own, locked down before use.

    The instance has ``enable_external_access=false`` and ``lock_configuration=true``
    from the start (they are connect-time configuration, so no statement ever ran
    without them), and ``memory_limit``/``threads`` when given. Raises ``duckdb.Error``
    when the file cannot be opened (missing, locked by another process's writer).
    """
    config: dict[str, Any] = {"enable_external_access": False, "lock_configuration": True}
    if memory_limit:
        config["memory_limit"] = memory_limit
    if threads:
        config["threads"] = threads
    return duckdb.connect(str(path), read_only=True, config=config)


class SqlSandbox:
    """Runs user SQL on new cursors of one DuckDB instance, sandboxed (see the module doc).

    ``connection`` must belong to an instance with ``enable_external_access=false`` and
    ``lock_configuration=true`` (one from :func:`open_sandboxed`); it is used only to
    create cursors, under a lock, so one sandbox serves any number of threads.
    """

    def __init__(self, connection: duckdb.DuckDBPyConnection) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    def query(self, sql: str, max_rows: int, timeout: float) -> QueryResult:
        """Run one SELECT and return at most ``max_rows`` rows; blocks, raises SqlError."""
        if not isinstance(sql, str):
            raise SqlBadRequest("sql must be a string")
        if max_rows < 1:
            raise SqlBadRequest("max_rows must be at least 1")
        if timeout <= 0:
            raise SqlBadRequest("timeout must be positive")
        with self._lock:
            cursor = self._connection.cursor()
        try:
            check_select(cursor, sql)
            return _run(cursor, sql, max_rows, timeout)
        finally:
            cursor.close()

    async def aquery(
        self, sql: str, max_rows: int, timeout: float, executor: ThreadPoolExecutor | None = None
    ) -> QueryResult:
        """:meth:`query` in a worker thread (of ``executor``, else the loop's default)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self.query, sql, max_rows, timeout)


@runtime_checkable
class QueryRunner(Protocol):
    """What :class:`SqlService` runs queries on: a :class:`SqlSandbox` or :class:`LiveSandbox`."""

    async def aquery(
        self, sql: str, max_rows: int, timeout: float, executor: ThreadPoolExecutor | None = None
    ) -> QueryResult: ...


class SnapshotSource(Protocol):
    """Writes a consistent copy of a live database (the recorder)."""

    async def snapshot(self, dest: Path) -> None: ...


@dataclass(eq=False)
class _Generation:
    path: Path
    taken: float
    connection: duckdb.DuckDBPyConnection
    sandbox: SqlSandbox
    users: int = 0
    retired: bool = False


class LiveSandbox:
    """User SQL on snapshots of a database that a writer keeps changing.

    A query uses the current snapshot if it is at most ``max_age`` seconds old;
    otherwise ``source.snapshot`` first writes a new one (one refresh at a time: queries
    arriving meanwhile wait for it and share it). So a query sees every batch the
    recorder committed up to ``max_age`` seconds before it arrived, and possibly later
    ones. Each snapshot is a file in ``directory`` (``sql-N.duckdb``), opened with
    :func:`open_sandboxed` in an instance of its own; a superseded snapshot is closed
    and deleted once the queries that use it have finished.

    Concurrency: :meth:`aquery`, :meth:`export_snapshot` and :meth:`close` run on one
    event loop; the queries themselves run in worker threads. A failed snapshot raises
    :class:`SqlFailed` for the queries that waited for it; the next query tries again.
    """

    #: Export snapshots older than this are deleted when the next one is made.
    export_max_age = 600.0

    def __init__(
        self,
        source: SnapshotSource,
        directory: Path,
        *,
        max_age: float = 1.0,
        memory_limit: str | None = "1GB",
        threads: int | None = None,
    ) -> None:
        self.source = source
        self.directory = Path(directory)
        self.max_age = max_age
        self.memory_limit = memory_limit
        self.threads = threads
        self._current: _Generation | None = None
        self._refresh = asyncio.Lock()
        self._counter = 0
        self._closed = False
        # Parses statements before a snapshot is taken for them (refusals cost nothing).
        self._parser = duckdb.connect(":memory:", config={"enable_external_access": False})
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob("sql-*.duckdb*"):  # a crashed hub's
            stale.unlink(missing_ok=True)

    async def aquery(
        self, sql: str, max_rows: int, timeout: float, executor: ThreadPoolExecutor | None = None
    ) -> QueryResult:
        """Run one sandboxed SELECT on a fresh enough snapshot; raises :class:`SqlError`."""
        if not isinstance(sql, str):
            raise SqlBadRequest("sql must be a string")
        check_select(self._parser, sql)
        generation = await self._acquire()
        try:
            return await generation.sandbox.aquery(sql, max_rows, timeout, executor)
        finally:
            self._release(generation)

    async def export_snapshot(self) -> Path:
        """A new snapshot file for someone else to read (an export); they delete it.

        Export snapshots older than :attr:`export_max_age` are deleted first, so
        abandoned ones do not pile up.
        """
        cutoff = _time.time() - self.export_max_age
        for old in self.directory.glob("export-*.duckdb*"):
            with contextlib.suppress(OSError):
                if old.stat().st_mtime < cutoff:
                    old.unlink()
        path = self.directory / f"export-{uuid.uuid4().hex}.duckdb"
        try:
            await self.source.snapshot(path)
        except Exception as exc:
            raise SqlFailed(f"could not snapshot the database: {exc}") from None
        return path

    async def close(self) -> None:
        """Close and delete the current snapshot (after the queries using it finish)."""
        self._closed = True
        async with self._refresh:
            if self._current is not None:
                self._retire(self._current)
                self._current = None
        self._parser.close()

    async def _acquire(self) -> _Generation:
        async with self._refresh:
            if self._closed:
                raise SqlFailed("the SQL service is stopping")
            current = self._current
            if current is None or _time.monotonic() - current.taken > self.max_age:
                current = await self._take()
            current.users += 1
            return current

    async def _take(self) -> _Generation:
        self._counter += 1
        path = self.directory / f"sql-{self._counter}.duckdb"
        taken = _time.monotonic()  # the data is at least this fresh
        try:
            await self.source.snapshot(path)
            connection = await asyncio.to_thread(
                open_sandboxed, path, self.memory_limit, self.threads
            )
        except Exception as exc:
            _remove_database(path)
            raise SqlFailed(f"could not snapshot the database: {exc}") from None
        generation = _Generation(path, taken, connection, SqlSandbox(connection))
        if self._current is not None:
            self._retire(self._current)
        self._current = generation
        return generation

    def _release(self, generation: _Generation) -> None:
        generation.users -= 1
        if generation.retired and generation.users == 0:
            self._dispose(generation)

    def _retire(self, generation: _Generation) -> None:
        generation.retired = True
        if generation.users == 0:
            self._dispose(generation)

    @staticmethod
    def _dispose(generation: _Generation) -> None:
        with contextlib.suppress(duckdb.Error):
            generation.connection.close()
        _remove_database(generation.path)


def _remove_database(path: Path) -> None:
    for file in (path, Path(f"{path}.wal"), Path(f"{path}.tmp")):
        with contextlib.suppress(OSError):
            os.unlink(file)


def _run(cursor: duckdb.DuckDBPyConnection, sql: str, max_rows: int, timeout: float) -> QueryResult:
    fired = threading.Event()

    def interrupt() -> None:
        fired.set()
        cursor.interrupt()

    timer = threading.Timer(timeout, interrupt)
    timer.daemon = True
    timer.start()
    try:
        cursor.execute("BEGIN TRANSACTION READ ONLY")
        try:
            reader = cursor.sql(sql).to_arrow_reader(min(max_rows + 1, _READ_BATCH))
            columns = list(reader.schema.names)
            rows: list[list[Any]] = []
            for batch in reader:
                values = [_column_values(batch.column(i)) for i in range(batch.num_columns)]
                rows.extend([list(row) for row in zip(*values, strict=True)])
                if len(rows) > max_rows:
                    break
        finally:
            timer.cancel()
            with contextlib.suppress(duckdb.Error):
                cursor.execute("ROLLBACK")
    except SqlError:
        raise
    except duckdb.Error as exc:
        raise _explain(exc, fired.is_set(), timeout) from None
    except Exception as exc:  # a value pyarrow cannot convert, say
        if fired.is_set():
            raise SqlTimeout(f"query exceeded {timeout:g} s") from None
        raise SqlFailed(f"{type(exc).__name__}: {exc}") from None
    truncated = len(rows) > max_rows
    return QueryResult(columns=columns, rows=rows[:max_rows], truncated=truncated)


def _explain(exc: duckdb.Error, timed_out: bool, timeout: float) -> SqlError:
    message = str(exc).strip()
    if timed_out or isinstance(exc, duckdb.InterruptException):
        return SqlTimeout(f"query exceeded {timeout:g} s")
    if isinstance(exc, duckdb.PermissionException):
        return SqlRefused(
            "refused: SQL queries cannot access files, the network or extensions "
            f"({message.splitlines()[0]})"
        )
    if isinstance(exc, duckdb.TransactionException) and "read-only" in message:
        return SqlRefused(f"refused: SQL queries are read-only ({message.splitlines()[0]})")
    if "configuration has been locked" in message:
        return SqlRefused(f"refused: settings cannot be changed ({message.splitlines()[0]})")
    return SqlFailed(message)


def _column_values(column: pa.ChunkedArray | pa.Array) -> list[Any]:
    values = column.to_pylist()
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_boolean(kind):
        return values
    if pa.types.is_integer(kind):
        return values
    return [_jsonable(v) for v in values]


def _jsonable(value: Any) -> Any:
    """One DuckDB value as a JSON value."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None
        return int(value) if value.as_tuple().exponent == 0 else float(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "nanoseconds"):  # an interval
        months, days, nanoseconds = value
        return {"months": months, "days": days, "nanoseconds": nanoseconds}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


