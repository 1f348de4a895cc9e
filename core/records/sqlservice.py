"""The SQL bus API: ``{prefix}.api.sql`` (and ``api.snapshot``) answered by the hub
that holds the DuckDB file, running each query in the sandbox (:mod:`.sandbox`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from commhub.core.bus import Bus
from commhub.core.records.sandbox import (
    LiveSandbox,
    QueryResult,
    QueryRunner,
    SqlBadRequest,
    SqlError,
    SqlFailed,
)

log = logging.getLogger(__name__)

#: Queue group of the SQL API: several hubs share the requests.
QUEUE_GROUP = "commhub-sql"

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


