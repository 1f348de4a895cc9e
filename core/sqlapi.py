"""SQL on the records: the sandbox for user queries, the bus API, and client helpers.

Only one process can open the DuckDB file while the hub runs, so user SQL reaches the
records over the bus (``{prefix}.api.sql``, :class:`SqlService`). The service never runs
user SQL on the recorder's instance: ``enable_external_access`` and
``lock_configuration`` apply to a whole DuckDB instance, so user SQL gets instances of
its own. :class:`LiveSandbox` asks the recorder for a snapshot (a checkpointed copy of
the file, taken when the last one is older than ``max_age``, 1 s by default) and opens
it read-only in a separate instance, configured before any query runs. With no hub
running, :func:`query_file` opens the file itself the same way. Every path runs the
same :class:`SqlSandbox`:

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
import csv
import io
import json
import logging
import math
import os
import threading
import time as _time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import duckdb
import msgspec
import nats.errors
import pyarrow as pa
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .bus import Bus
from .subjects import Subjects

__all__ = [
    "QUEUE_GROUP",
    "LiveSandbox",
    "QueryResult",
    "QueryRunner",
    "SnapshotSource",
    "SqlBadRequest",
    "SqlError",
    "SqlFailed",
    "SqlRefused",
    "SqlSandbox",
    "SqlService",
    "SqlTimeout",
    "check_select",
    "format_result",
    "open_sandboxed",
    "query_file",
    "query_over_bus",
    "snapshot_over_bus",
    "write_parquet",
]

log = logging.getLogger(__name__)

#: Queue group of the SQL API: several hubs share the requests.
QUEUE_GROUP = "commhub-sql"
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


_ERRORS: dict[str, type[SqlError]] = {
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


# -- the bus API ----------------------------------------------------------------------
class SqlService:
    """Answers ``{prefix}.api.sql`` requests (queue group ``commhub-sql``).

    Request: ``{"sql": "...", "max_rows": n}`` (``max_rows`` optional, capped at
    ``max_rows``). Reply: ``{"columns", "rows", "truncated"}`` or
    ``{"error": {"code", "message"}}``. A reply that would exceed the server's max
    payload is cut to fewer rows and marked ``truncated``.

    ``runner`` runs the queries: a :class:`LiveSandbox` on the recorder (what the hub
    uses), or a :class:`SqlSandbox`. With a :class:`LiveSandbox` the service also answers
    ``{prefix}.api.snapshot`` (queue group ``commhub-snapshot``): it writes an export
    snapshot and replies ``{"path": "..."}``, the file's absolute path on the hub's
    machine, which the requester reads and then deletes (``commhub export`` does).
    In-process callers (the HTTP endpoint) use :meth:`query`.

    Concurrency: nats-py runs one subscription's callbacks one at a time, so the callback
    only spawns a task per request; at most ``concurrency`` queries run at once (each in
    its own worker thread), up to ``backlog`` more wait, and beyond that a request is
    answered at once with a ``failed`` error saying the service is busy.
    Stop: no new requests; queries in flight finish (each within ``timeout``) and reply;
    then a :class:`LiveSandbox` runner is closed (its snapshot deleted).
    """

    def __init__(
        self,
        bus: Bus,
        runner: QueryRunner,
        *,
        max_rows: int = 10_000,
        timeout: float = 10.0,
        concurrency: int = 4,
        backlog: int = 256,
    ) -> None:
        if not isinstance(runner, QueryRunner):
            raise TypeError("runner must be a SqlSandbox or a LiveSandbox")
        self.bus = bus
        self.runner = runner
        self.max_rows = max_rows
        self.timeout = timeout
        self.concurrency = concurrency
        self.backlog = backlog
        self._subs: list[Subscription] = []
        self._sem = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Subscribe; from now on requests are answered."""
        self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="commhub-sql")
        subjects = self.bus.subjects
        self._subs.append(
            await self.bus.nc.subscribe(subjects.api("sql"), queue=QUEUE_GROUP,
                                        cb=self._on_request)
        )
        if isinstance(self.runner, LiveSandbox):
            self._subs.append(
                await self.bus.nc.subscribe(subjects.api("snapshot"), queue="commhub-snapshot",
                                            cb=self._on_snapshot)
            )

    async def stop(self) -> None:
        """Unsubscribe, let queries in flight reply; safe to call twice."""
        for sub in self._subs:
            with contextlib.suppress(Exception):  # the connection may be closing
                await sub.unsubscribe()
        self._subs.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
            if isinstance(self.runner, LiveSandbox):
                await self.runner.close()

    async def query(self, sql: str, max_rows: int | None = None) -> QueryResult:
        """Run one sandboxed query for an in-process caller, under the same limits.

        ``max_rows`` is capped at the service's ``max_rows``; the time limit is the
        service's ``timeout``. Raises the :class:`SqlError` subclass for the error code
        (a ``failed`` one when the service is not started, or busy).
        """
        if self._executor is None:
            raise SqlFailed("the SQL service is not running")
        if max_rows is not None and (isinstance(max_rows, bool) or max_rows < 1):
            raise SqlBadRequest("max_rows must be a positive integer")
        if len(self._tasks) >= self.concurrency + self.backlog:
            raise SqlFailed("the SQL service is busy, retry later")
        task = asyncio.create_task(self._run(sql, min(max_rows or self.max_rows, self.max_rows)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await task

    async def _run(self, sql: str, max_rows: int) -> QueryResult:
        async with self._sem:
            if self._executor is None:
                raise SqlFailed("the SQL service is stopping")
            return await self.runner.aquery(sql, max_rows, self.timeout, self._executor)

    async def _on_request(self, msg: Msg) -> None:
        if len(self._tasks) >= self.concurrency + self.backlog:
            await self._reply(msg, _error_body(SqlFailed("the SQL service is busy, retry later")))
            return
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_snapshot(self, msg: Msg) -> None:
        task = asyncio.create_task(self._handle_snapshot(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle_snapshot(self, msg: Msg) -> None:
        assert isinstance(self.runner, LiveSandbox)
        try:
            path = await self.runner.export_snapshot()
            body = msgspec.json.encode({"path": str(path.resolve())})
        except SqlError as exc:
            body = _error_body(exc)
        except Exception as exc:
            log.exception("sql api: snapshot failed")
            body = _error_body(SqlFailed(f"internal error: {exc}"))
        await self._reply(msg, body)

    async def _handle(self, msg: Msg) -> None:
        try:
            sql, max_rows = _parse_request(msg.data, self.max_rows)
            result = await self._run(sql, max_rows)
            body = _fit(result, self.bus.nc.max_payload)
        except SqlError as exc:
            body = _error_body(exc)
        except Exception as exc:
            log.exception("sql api: unexpected error")
            body = _error_body(SqlFailed(f"internal error: {exc}"))
        await self._reply(msg, body)

    @staticmethod
    async def _reply(msg: Msg, body: bytes) -> None:
        if not msg.reply:
            return
        try:
            await msg.respond(body)
        except Exception as exc:  # the requester is gone, or the connection closing
            log.warning("sql api: could not reply: %s", exc)


def _parse_request(data: bytes, cap: int) -> tuple[str, int]:
    try:
        request = json.loads(data)
    except ValueError as exc:
        raise SqlBadRequest(f"the request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise SqlBadRequest('the request must be a JSON object: {"sql": "...", "max_rows": n}')
    sql = request.get("sql")
    if not isinstance(sql, str) or not sql.strip():
        raise SqlBadRequest('the request needs "sql", a non-empty string')
    max_rows = request.get("max_rows")
    if max_rows is None:
        return sql, cap
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise SqlBadRequest('"max_rows" must be a positive integer')
    return sql, min(max_rows, cap)


def _error_body(exc: SqlError) -> bytes:
    return msgspec.json.encode({"error": {"code": exc.code, "message": exc.message}})


def _fit(result: QueryResult, max_payload: int) -> bytes:
    """The reply body, with rows cut (and ``truncated`` set) until it fits ``max_payload``."""
    body = msgspec.json.encode(result.to_dict())
    rows = result.rows
    while len(body) > max_payload and rows:
        keep = min(len(rows) - 1, int(len(rows) * max_payload / len(body) * 0.9))
        rows = rows[: max(keep, 0)]
        body = msgspec.json.encode({"columns": result.columns, "rows": rows, "truncated": True})
    if len(body) > max_payload:
        raise SqlFailed("the result does not fit in one NATS message even without rows")
    return body


# -- clients --------------------------------------------------------------------------
async def query_over_bus(
    nc: NATS,
    subjects: Subjects,
    sql: str,
    timeout: float = 30.0,
    max_rows: int | None = None,
) -> QueryResult:
    """Ask a running hub; raises the :class:`SqlError` subclass of the hub's error code.

    ``timeout`` bounds the whole round trip (use more than the hub's query time limit).
    """
    request: dict[str, Any] = {"sql": sql}
    if max_rows is not None:
        request["max_rows"] = max_rows
    body = await _api_request(nc, subjects.api("sql"), msgspec.json.encode(request), timeout,
                              "no reply from the hub")
    return QueryResult(
        columns=body["columns"], rows=body["rows"], truncated=bool(body.get("truncated"))
    )


async def snapshot_over_bus(nc: NATS, subjects: Subjects, timeout: float = 120.0) -> Path:
    """Ask a running hub for an export snapshot; returns its path on the hub's machine.

    The caller reads the file and deletes it. Raises :class:`SqlFailed` when no hub
    answers or the hub could not write it, :class:`SqlTimeout` after ``timeout``.
    """
    body = await _api_request(nc, subjects.api("snapshot"), b"{}", timeout,
                              "no snapshot from the hub")
    return Path(body["path"])


async def _api_request(
    nc: NATS, subject: str, data: bytes, timeout: float, late: str
) -> dict[str, Any]:
    """One request to a hub API; its JSON body, or the SqlError its error code names."""
    try:
        reply = await nc.request(subject, data, timeout=timeout)
    except nats.errors.NoRespondersError:
        raise SqlFailed(
            f"no hub answers on {subject}: is `commhub up` running with the recorder?"
        ) from None
    except nats.errors.TimeoutError:
        raise SqlTimeout(f"{late} within {timeout:g} s") from None
    try:
        body = json.loads(reply.data)
    except ValueError:
        raise SqlFailed(f"the hub sent an unreadable reply: {reply.data[:200]!r}") from None
    if "error" in body:
        error = body["error"]
        raise _ERRORS.get(error.get("code"), SqlError)(error.get("message", "unknown error"))
    return dict(body)


def query_file(
    db_path: Path | str,
    sql: str,
    max_rows: int,
    timeout: float,
    memory_limit: str | None = None,
) -> QueryResult:
    """Query the DuckDB file directly (no hub running), read-only, with the same sandbox.

    Blocks. Raises :class:`SqlFailed` when the file is missing or a running hub holds it.
    """
    path = Path(db_path)
    if not path.is_file():
        raise SqlFailed(f"no database at {path}")
    try:
        con = open_sandboxed(path, memory_limit)
    except duckdb.Error as exc:  # IOException: locked by a running hub
        raise SqlFailed(
            f"cannot open {path}: {str(exc).splitlines()[0]} "
            "(while a hub runs, query it over the bus: commhub sql)"
        ) from None
    try:
        return SqlSandbox(con).query(sql, max_rows, timeout)
    finally:
        con.close()


# -- output ---------------------------------------------------------------------------
Format = Literal["table", "csv", "json"]


def format_result(result: QueryResult, fmt: Format | str = "table") -> str:
    """Render a result: an aligned text ``table`` for people, ``csv``, or ``json``.

    ``json`` is a list of objects (one per row, keyed by column name); ``table`` ends
    with a row count that says when the result was truncated.
    """
    formatter = _FORMATTERS.get(fmt)
    if formatter is None:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(_FORMATTERS)}")
    return formatter(result)


def _text(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _format_table(result: QueryResult) -> str:
    header = [str(c) for c in result.columns]
    cells = [
        [_text(v).replace("\r", "\\r").replace("\n", "\\n") for v in row] for row in result.rows
    ]
    numeric = [
        bool(result.rows) and all(_is_number(row[i]) for row in result.rows)
        for i in range(len(header))
    ]
    widths = [max([len(header[i])] + [len(row[i]) for row in cells]) for i in range(len(header))]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths)]
    lines += [line(row) for row in cells]
    count = len(result.rows)
    footer = f"({count} row{'s' if count != 1 else ''}"
    footer += ", truncated at the row limit)" if result.truncated else ")"
    lines.append(footer)
    return "\n".join(lines)


def _format_csv(result: QueryResult) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow(
            ["" if v is None else json.dumps(v) if isinstance(v, list | dict) else v for v in row]
        )
    return out.getvalue().rstrip("\n")


def _format_json(result: QueryResult) -> str:
    objects = [dict(zip(result.columns, row, strict=True)) for row in result.rows]
    return json.dumps(objects, ensure_ascii=False, indent=2)


def write_parquet(result: QueryResult, path: Path | str) -> None:
    """Write a result to one Parquet file.

    Each column's type is inferred from its JSON values (numbers, strings, booleans,
    lists, objects); timestamps and dates arrive as ISO strings and stay strings. A
    column whose values have no common type is written as JSON text.
    """
    import pyarrow.parquet as pq

    arrays = []
    for i in range(len(result.columns)):
        values = [row[i] for row in result.rows]
        try:
            arrays.append(pa.array(values))
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            arrays.append(
                pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
            )
    table = pa.Table.from_arrays(arrays, names=[str(c) for c in result.columns])
    pq.write_table(table, str(path))


_FORMATTERS: dict[str, Callable[[QueryResult], str]] = {
    "table": _format_table,
    "csv": _format_csv,
    "json": _format_json,
}
