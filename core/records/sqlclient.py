"""Clients of the SQL API: ask a running hub over the bus, or open the file directly
when no hub runs; both through the same sandbox (:mod:`.sandbox`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from commhub.core.records.sandbox import (
    DEFAULT_MAX_RESULT_BYTES,
    ERRORS_BY_CODE,
    QueryResult,
    SqlError,
    SqlFailed,
    SqlSandbox,
    SqlTimeout,
    open_sandboxed,
)
from commhub.core.subjects import Subjects

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class SnapshotLease:
    """A snapshot the hub lends: read ``path`` (on the hub's machine), never delete it,
    and give it back with :func:`release_snapshot` (the hub then deletes it)."""

    path: Path
    lease: str
    release_subject: str


async def snapshot_over_bus(
    nc: NATS, subjects: Subjects, timeout: float = 120.0
) -> SnapshotLease:
    """Ask a running hub to lend its current snapshot (it takes one if that is stale).

    Raises :class:`SqlFailed` when no hub answers or the hub could not write it,
    ``SqlBusy``/``SqlRateLimited`` past the hub's limits, :class:`SqlTimeout` after
    ``timeout``. Prefer :func:`leased_snapshot`, which releases it.
    """
    body = await _api_request(nc, subjects.api("snapshot"), b"{}", timeout,
                              "no snapshot from the hub")
    return SnapshotLease(Path(body["path"]), str(body["lease"]), str(body["release"]))


async def release_snapshot(nc: NATS, lease: SnapshotLease, timeout: float = 10.0) -> bool:
    """Give a snapshot back; True if the hub still held the lease (False: it expired or
    the hub restarted, and the file is gone or going anyway)."""
    body = await _api_request(nc, lease.release_subject,
                              msgspec.json.encode({"lease": lease.lease}), timeout,
                              "no answer to the snapshot release")
    return bool(body.get("released"))


@contextlib.asynccontextmanager
async def leased_snapshot(
    nc: NATS, subjects: Subjects, timeout: float = 120.0
) -> AsyncIterator[Path]:
    """The path of a snapshot lent by the running hub for the ``async with`` block;
    released when the block ends, even by an error (a failed release is logged: the
    lease expires on its own)."""
    lease = await snapshot_over_bus(nc, subjects, timeout)
    try:
        yield lease.path
    finally:
        try:
            await release_snapshot(nc, lease)
        except SqlError as exc:
            log.warning("could not release snapshot %s: %s", lease.path, exc.message)


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
    max_bytes: int = DEFAULT_MAX_RESULT_BYTES,
) -> QueryResult:
    """Query the DuckDB file directly (no hub running), read-only, with the same sandbox
    and limits.

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
        return SqlSandbox(con).query(sql, max_rows, timeout, max_bytes)
    finally:
        con.close()


