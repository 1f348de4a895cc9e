"""The SQL sandbox for user queries: one read-only SELECT, no file or network access, no
look at the hub's settings or files, a time, a row and a byte limit.

Only one process can open the DuckDB file while the hub runs, so user SQL reaches the
records over the bus (:mod:`.sqlservice`). User SQL never runs on the recorder's
instance: ``enable_external_access`` and ``lock_configuration`` apply to a whole DuckDB
instance, so user SQL gets instances of its own (:func:`open_sandboxed`): the hub's
snapshots (:class:`~.snapshots.LiveSandbox`), or with no hub running the file itself
(:func:`~.sqlclient.query_file`). Every path runs the same :class:`SqlSandbox`:

1. The text must be exactly one statement of type SELECT (``WITH ... SELECT``,
   ``FROM t``, ``VALUES``, ``DESCRIBE``, ``SHOW``, ``SUMMARIZE`` count as SELECT), and
   name no function, view or macro of :data:`~.sqlnames.DENIED` (settings, attached
   files, environment, secrets, other queries, SQL text run as SQL), found in DuckDB's
   parse tree; anything else is refused before it runs.
2. It runs in a ``READ ONLY`` transaction on a fresh cursor, on a read-only instance
   whose ``enable_external_access`` is false and whose configuration is locked: no file
   or network access (``read_csv('/etc/passwd')`` is refused), no settings changes, no
   writes, no extension loading, no temporary directory; the instance's
   ``memory_limit`` bounds what DuckDB's buffer manager holds.
3. A timer calls ``cursor.interrupt()`` after ``timeout`` seconds.
4. At most ``max_rows`` rows and ``max_bytes`` bytes of values come back; ``truncated``
   says whether rows were left out. Rows are read in small Arrow batches, each measured
   before it becomes Python values; a first row over ``max_bytes`` is refused
   (``result_too_large``).

Errors are :class:`SqlError` subclasses whose ``code`` is the bus API's error code:
``refused``, ``timeout``, ``result_too_large``, ``bad_request``, ``failed`` (and, from the
service, ``busy`` and ``rate_limited``). Values in results are plain JSON values
(timestamps and dates as ISO strings, decimals as numbers, blobs as base64, NaN and
infinities as null; JSON columns stay JSON text).

Concurrency: :meth:`SqlSandbox.query` blocks; call it from a worker thread, or (as the
hub does, :mod:`.sqlworkers`) in a worker process, where its memory is bounded too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import math
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import duckdb
import pyarrow as pa

from commhub.core.records.sqlnames import (
    DENIED,
    names_in_tokens,
    names_in_tree,
    refusal,
    with_dependents,
)

log = logging.getLogger(__name__)

#: Most rows converted per Arrow batch while reading a result: small enough that a batch
#: is measured against the byte budget before much of it is copied.
_READ_BATCH = 256

#: Default byte budget of one result (``sql_max_result_bytes``).
DEFAULT_MAX_RESULT_BYTES = 16 * 1024 * 1024


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
    """The sandbox refused the query: not one SELECT, file access, a write, a setting,
    a denied function."""

    code = "refused"


class SqlTimeout(SqlError):
    """The query ran longer than its time limit and was interrupted."""

    code = "timeout"


class SqlTooLarge(SqlError):
    """Not even the first row, or one value, fits the result's byte limit."""

    code = "result_too_large"


class SqlBadRequest(SqlError):
    """The request itself was malformed (not JSON, no ``sql``, a bad ``max_rows``)."""

    code = "bad_request"


class SqlBusy(SqlError):
    """The service has as many requests (or export snapshots) as it takes; retry later."""

    code = "busy"


class SqlRateLimited(SqlError):
    """Requests arrive faster than the service's rate limit; retry later."""

    code = "rate_limited"


class SqlFailed(SqlError):
    """DuckDB could not run the query (syntax, unknown table, ...) or no hub answered."""

    code = "failed"


ERRORS_BY_CODE: dict[str, type[SqlError]] = {
    cls.code: cls
    for cls in (
        SqlRefused, SqlTimeout, SqlTooLarge, SqlBadRequest, SqlBusy, SqlRateLimited, SqlFailed
    )
}


# -- the checks before a query runs ---------------------------------------------------
def check_select(cursor: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise :class:`SqlRefused` unless ``sql`` is exactly one SELECT statement that
    names nothing denied (:mod:`.sqlnames`); :class:`SqlFailed` if it does not parse."""
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
    reason = refusal(_names_used(cursor, sql), _denied(cursor))
    if reason is not None:
        raise SqlRefused(reason)


def _names_used(cursor: duckdb.DuckDBPyConnection, sql: str) -> set[str]:
    """The names in the statement's parse tree; every word token if DuckDB cannot
    serialize the tree (a PIVOT inside a query), which refuses more, never less."""
    try:
        rows = cursor.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()
        tree = json.loads(rows[0][0]) if rows else {"error": True}
    except (duckdb.Error, ValueError):
        tree = {"error": True}
    if not tree.get("error"):
        return names_in_tree(tree.get("statements"))
    try:
        tokens = [(position, str(kind)) for position, kind in duckdb.tokenize(sql)]
    except Exception as exc:  # nothing left to check the text with: refuse it
        raise SqlRefused(f"refused: the query could not be checked ({exc})") from None
    return names_in_tokens(sql, tokens)


_denied_lock = threading.Lock()
_denied_names: dict[str, str] | None = None


def _denied(cursor: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """:data:`DENIED` plus the built-in views and macros over it; read from the catalog
    once per process (built-ins are the same in every instance of one DuckDB)."""
    global _denied_names
    with _denied_lock:
        if _denied_names is None:
            views = cursor.execute(
                "SELECT view_name, sql FROM duckdb_views() WHERE internal AND sql IS NOT NULL"
            ).fetchall()
            macros = cursor.execute(
                "SELECT function_name, macro_definition FROM duckdb_functions() "
                "WHERE macro_definition IS NOT NULL"
            ).fetchall()
            _denied_names = with_dependents([*views, *macros], DENIED)
        return _denied_names


# -- opening an instance --------------------------------------------------------------
#: Connect-time settings of every sandboxed instance beyond external access and the
#: lock: no temporary directory (no path to show, no spilling to fill the disk), no
#: extension installing or autoloading (whose errors name the extension directory), no
#: persistent secrets, and ``SHOW name`` only ever describes a table, never a setting.
#: A setting this DuckDB does not know is left out.
_OPTIONAL_SETTINGS: dict[str, Any] = {
    "temp_directory": "",
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_persistent_secrets": False,
    "show_behavior": "table",
}


@functools.cache
def _known_settings() -> frozenset[str]:
    con = duckdb.connect(":memory:")
    try:
        rows = con.execute("SELECT name FROM duckdb_settings()").fetchall()
        return frozenset(row[0] for row in rows)
    finally:
        con.close()


def sandbox_config(memory_limit: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """The connect-time configuration of an instance that runs user SQL."""
    known = _known_settings()
    config: dict[str, Any] = {"enable_external_access": False, "lock_configuration": True}
    config.update({k: v for k, v in _OPTIONAL_SETTINGS.items() if k in known})
    if memory_limit:
        config["memory_limit"] = memory_limit
    if threads:
        config["threads"] = threads
    return config


def open_sandboxed(
    path: Path | str, memory_limit: str | None = None, threads: int | None = None
) -> duckdb.DuckDBPyConnection:
    """Open a DuckDB file read-only in an instance of its own, locked down before use.

    The instance has :func:`sandbox_config` from the start (connect-time configuration,
    so no statement ever ran without it), and ``memory_limit``/``threads`` when given.
    Raises ``duckdb.Error`` when the file cannot be opened (missing, locked by another
    process's writer).
    """
    return duckdb.connect(str(path), read_only=True, config=sandbox_config(memory_limit, threads))


# -- the sandbox ----------------------------------------------------------------------
class SqlSandbox:
    """Runs user SQL on new cursors of one DuckDB instance, sandboxed (see the module doc).

    ``connection`` must belong to an instance with ``enable_external_access=false`` and
    ``lock_configuration=true`` (one from :func:`open_sandboxed`); it is used only to
    create cursors, under a lock, so one sandbox serves any number of threads.
    """

    def __init__(self, connection: duckdb.DuckDBPyConnection) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    def query(
        self, sql: str, max_rows: int, timeout: float, max_bytes: int = DEFAULT_MAX_RESULT_BYTES
    ) -> QueryResult:
        """Run one SELECT and return at most ``max_rows`` rows and about ``max_bytes``
        bytes of values; blocks, raises SqlError."""
        if not isinstance(sql, str):
            raise SqlBadRequest("sql must be a string")
        if max_rows < 1:
            raise SqlBadRequest("max_rows must be at least 1")
        if timeout <= 0:
            raise SqlBadRequest("timeout must be positive")
        if max_bytes < 1:
            raise SqlBadRequest("max_bytes must be at least 1")
        with self._lock:
            cursor = self._connection.cursor()
        try:
            check_select(cursor, sql)
            return _run(cursor, sql, max_rows, timeout, max_bytes)
        finally:
            cursor.close()

    async def aquery(
        self,
        sql: str,
        max_rows: int,
        timeout: float,
        executor: ThreadPoolExecutor | None = None,
        max_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    ) -> QueryResult:
        """:meth:`query` in a worker thread (of ``executor``, else the loop's default)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            executor, self.query, sql, max_rows, timeout, max_bytes
        )


@runtime_checkable
class QueryRunner(Protocol):
    """What :class:`SqlService` runs queries on: a :class:`SqlSandbox` or a LiveSandbox."""

    async def aquery(
        self,
        sql: str,
        max_rows: int,
        timeout: float,
        executor: ThreadPoolExecutor | None = None,
        max_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    ) -> QueryResult: ...


def _run(
    cursor: duckdb.DuckDBPyConnection, sql: str, max_rows: int, timeout: float, max_bytes: int
) -> QueryResult:
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
            rows, truncated = _read(reader, max_rows, max_bytes)
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
    return QueryResult(columns=columns, rows=rows, truncated=truncated)


# -- bounding the result --------------------------------------------------------------
def _read(
    reader: pa.RecordBatchReader, max_rows: int, max_bytes: int
) -> tuple[list[list[Any]], bool]:
    """Rows of ``reader`` as JSON values, at most ``max_rows`` and ``max_bytes`` (Arrow
    bytes of the values), and whether rows were left out. Each batch is measured before
    it is converted; reading stops at the first row that does not fit."""
    rows: list[list[Any]] = []
    used = 0
    for whole in reader:
        batch = whole.slice(0, max_rows + 1 - len(rows))  # one more row: were there more?
        fit = rows_within(batch, max_bytes - used)
        if fit < batch.num_rows:
            if not rows and fit == 0:
                size = batch.slice(0, 1).nbytes
                raise SqlTooLarge(
                    f"result too large: its first row takes {size:,} bytes, over the "
                    f"{max_bytes:,}-byte limit of one result (sql_max_result_bytes); select "
                    "fewer or shorter values, e.g. left(text, 1000)"
                )
            rows.extend(_batch_rows(batch.slice(0, fit)))
            return rows[:max_rows], True
        used += batch.nbytes
        rows.extend(_batch_rows(batch))
        if len(rows) > max_rows:
            break
    return rows[:max_rows], len(rows) > max_rows


def rows_within(batch: pa.RecordBatch, budget: int) -> int:
    """How many leading rows of ``batch`` take at most ``budget`` bytes (Arrow sizes)."""
    if batch.nbytes <= budget:
        return batch.num_rows
    low, high = 0, batch.num_rows - 1
    while low < high:  # the largest count that fits; sizes grow with the count
        middle = (low + high + 1) // 2
        if batch.slice(0, middle).nbytes <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def _batch_rows(batch: pa.RecordBatch) -> list[list[Any]]:
    values = [_column_values(batch.column(i)) for i in range(batch.num_columns)]
    return [list(row) for row in zip(*values, strict=True)]


def _explain(exc: duckdb.Error, timed_out: bool, timeout: float) -> SqlError:
    message = str(exc).strip()
    first = message.splitlines()[0] if message else type(exc).__name__
    if timed_out or isinstance(exc, duckdb.InterruptException):
        return SqlTimeout(f"query exceeded {timeout:g} s")
    if isinstance(exc, duckdb.PermissionException):
        return SqlRefused(
            f"refused: SQL queries cannot access files, the network or extensions ({first})"
        )
    if isinstance(exc, duckdb.TransactionException) and "read-only" in message:
        return SqlRefused(f"refused: SQL queries are read-only ({first})")
    if "configuration has been locked" in message:
        return SqlRefused(f"refused: settings cannot be changed ({first})")
    if isinstance(exc, duckdb.OutOfMemoryException):
        # DuckDB's advice (SET threads, SET memory_limit) is not the user's to follow.
        return SqlFailed(f"the query needs more memory than sql_memory_limit allows ({first})")
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


