"""The SQL bus API: ``{prefix}.api.sql`` (and ``api.snapshot``) answered by the hub
that holds the DuckDB file, running each query in the sandbox (:mod:`.sandbox`) on
snapshots (:mod:`.snapshots`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from commhub.core.bus import Bus
from commhub.core.ratelimit import TokenBucket
from commhub.core.records.sandbox import (
    DEFAULT_MAX_RESULT_BYTES,
    QueryResult,
    QueryRunner,
    SqlBadRequest,
    SqlBusy,
    SqlError,
    SqlFailed,
    SqlRateLimited,
)
from commhub.core.records.snapshots import LiveSandbox

log = logging.getLogger(__name__)

#: Queue group of the SQL API: several hubs share the requests.
QUEUE_GROUP = "commhub-sql"

#: Per-process rate limits, (requests a second, burst). SQL requests are cheap to refuse
#: and bounded by ``concurrency`` and ``backlog`` too; each export snapshot may cost a
#: copy of the database file.
SQL_RATE = (50.0, 200)
SNAPSHOT_RATE = (0.1, 5)

# -- the bus API ----------------------------------------------------------------------
class SqlService:
    """Answers ``{prefix}.api.sql`` requests (queue group ``commhub-sql``).

    Request: ``{"sql": "...", "max_rows": n}`` (``max_rows`` optional, capped at
    ``max_rows``). Reply: ``{"columns", "rows", "truncated"}`` or
    ``{"error": {"code", "message"}}``. Results hold at most ``max_bytes`` bytes of values;
    a reply that would exceed the server's max payload is cut to fewer rows and marked
    ``truncated``.

    ``runner`` runs the queries: a :class:`~.snapshots.LiveSandbox` on the recorder (what
    the hub uses), or a :class:`~.sandbox.SqlSandbox`. With a LiveSandbox the service also
    answers ``{prefix}.api.snapshot`` (queue group ``commhub-snapshot``): it lends the
    current snapshot (taking one if it is stale) and replies ``{"path", "lease",
    "release"}``: the file's absolute path on the hub's machine, which the requester
    reads but never deletes, and the lease to send to the ``release`` subject when done
    (``{"lease": "..."}``, answered ``{"released": true|false}``); ``commhub export``
    does this through :func:`~.sqlclient.leased_snapshot`. In-process callers (the HTTP
    endpoint) use :meth:`query`.

    Limits, all per process: at most ``concurrency`` queries run at once (each from its
    own thread; a LiveSandbox runs them in worker processes, :mod:`.sqlworkers`) and up
    to ``backlog`` more wait; beyond that a request is answered
    at once with ``busy``. Requests beyond ``sql_rate`` (a second, burst) and snapshot
    requests beyond ``snapshot_rate`` are answered with ``rate_limited``; a snapshot
    request while the LiveSandbox's leases are all out gets ``busy``.

    Concurrency: nats-py runs one subscription's callbacks one at a time, so the callback
    only spawns a task per request. Stop: no new requests; queries in flight finish (each
    within ``timeout``) and reply; then a LiveSandbox runner is closed (its leases dropped
    and its snapshots deleted).
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
        max_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        sql_rate: tuple[float, int] = SQL_RATE,
        snapshot_rate: tuple[float, int] = SNAPSHOT_RATE,
    ) -> None:
        if not isinstance(runner, QueryRunner):
            raise TypeError("runner must be a SqlSandbox or a LiveSandbox")
        self.bus = bus
        self.runner = runner
        self.max_rows = max_rows
        self.timeout = timeout
        self.concurrency = concurrency
        self.backlog = backlog
        self.max_bytes = max_bytes
        self._sql_bucket = TokenBucket(*sql_rate)
        self._snapshot_bucket = TokenBucket(*snapshot_rate)
        # Releases go to this process, which holds the leases (not to the queue group).
        self.release_subject = bus.subjects.api(f"snapshot.release.{uuid.uuid4().hex}")
        self._subs: list[Subscription] = []
        self._sem = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Subscribe; from now on requests are answered (the subscriptions are flushed
        to the server before this returns: a client told that this process is the
        active recorder must not get "no hub answers" meanwhile; if the bus is away,
        they reach the server when it reconnects)."""
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
            self._subs.append(
                await self.bus.nc.subscribe(self.release_subject, cb=self._on_release)
            )
        # nats-py sends SUB from a background flusher: without this round trip, a
        # request right after start() can reach the server before the subscription.
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self.bus.nc.flush(timeout=5)

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

    @property
    def in_flight(self) -> int:
        """Requests being handled now: running, waiting for a worker, or replying."""
        return len(self._tasks)

    async def query(self, sql: str, max_rows: int | None = None) -> QueryResult:
        """Run one sandboxed query for an in-process caller, under the same limits.

        ``max_rows`` is capped at the service's ``max_rows``; the time limit is the
        service's ``timeout``, its byte limit ``max_bytes``. Raises the :class:`SqlError`
        subclass for the error code (``failed`` when the service is not started, ``busy``
        or ``rate_limited`` past the service's limits).
        """
        if self._executor is None:
            raise SqlFailed("the SQL service is not running")
        if max_rows is not None and (isinstance(max_rows, bool) or max_rows < 1):
            raise SqlBadRequest("max_rows must be a positive integer")
        self._admit()
        task = asyncio.create_task(self._run(sql, min(max_rows or self.max_rows, self.max_rows)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await task

    async def _run(self, sql: str, max_rows: int) -> QueryResult:
        async with self._sem:
            if self._executor is None:
                raise SqlFailed("the SQL service is stopping")
            return await self.runner.aquery(
                sql, max_rows, self.timeout, self._executor, max_bytes=self.max_bytes
            )

    def _admit(self) -> None:
        """Raise ``busy`` or ``rate_limited`` for a query over the service's limits."""
        if len(self._tasks) >= self.concurrency + self.backlog:
            raise SqlBusy(
                f"the SQL service is busy ({self.concurrency} queries running, "
                f"{self.backlog} waiting), retry later"
            )
        if not self._sql_bucket.take():
            raise SqlRateLimited(
                f"over {self._sql_bucket.rate:g} SQL requests a second, retry later"
            )

    async def _on_request(self, msg: Msg) -> None:
        try:
            self._admit()
        except SqlError as exc:
            await self._reply(msg, _error_body(exc))
            return
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_snapshot(self, msg: Msg) -> None:
        if not self._snapshot_bucket.take():
            rate = self._snapshot_bucket.rate
            error = SqlRateLimited(
                f"over {rate * 60:g} snapshot requests a minute, retry later"
            )
            await self._reply(msg, _error_body(error))
            return
        task = asyncio.create_task(self._handle_snapshot(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_release(self, msg: Msg) -> None:
        assert isinstance(self.runner, LiveSandbox)
        try:
            request = json.loads(msg.data)
            lease = request.get("lease") if isinstance(request, dict) else None
            if not isinstance(lease, str):
                raise ValueError('the request needs "lease", a string')
        except ValueError as exc:
            await self._reply(msg, _error_body(SqlBadRequest(f"bad release request: {exc}")))
            return
        released = self.runner.release(lease)
        await self._reply(msg, msgspec.json.encode({"released": released}))

    async def _handle_snapshot(self, msg: Msg) -> None:
        assert isinstance(self.runner, LiveSandbox)
        try:
            lease = await self.runner.lease()
            body = msgspec.json.encode({
                "path": str(lease.path.resolve()),
                "lease": lease.id,
                "release": self.release_subject,
            })
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


