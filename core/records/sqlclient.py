"""Clients of the SQL API: ask a running hub over the bus, or open the file directly
when no hub runs; both through the same sandbox (:mod:`.sandbox`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from commhub.core.records.sandbox import (
    ERRORS_BY_CODE,
    QueryResult,
    SqlError,
    SqlFailed,
    SqlSandbox,
    SqlTimeout,
    open_sandboxed,
)
from commhub.core.subjects import Subjects


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
        raise ERRORS_BY_CODE.get(error.get("code"), SqlError)(error.get("message", "unknown error"))
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


