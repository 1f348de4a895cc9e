"""Snapshots of the live database for user SQL and exports, bounded in number and life.

The recorder holds the DuckDB file, so live SQL and ``commhub export`` read copies of it
(snapshots), each a file in ``{data_dir}/snapshots``. :class:`LiveSandbox` keeps them
from filling the disk:

- **One snapshot, shared while fresh.** A query or an export uses the current snapshot
  if it is at most ``max_age`` seconds old, and otherwise takes a new one first (one at a
  time: requests arriving meanwhile wait for it and share it).
- **Deleted once nobody needs it.** A snapshot is deleted as soon as it is no longer
  fresh (or a newer one replaced it) and no query or export holds it: an export holds it
  through a lease from :meth:`LiveSandbox.lease` until :meth:`LiveSandbox.release`, or
  until the lease expires after ``lease_seconds`` (an exporter that vanished).
- **At most** ``max_leases`` **leases at once** (:class:`~.sandbox.SqlBusy` beyond), so
  files in use are bounded by one per lease and one per query in flight, plus the
  current one.
- **Nothing left behind.** :meth:`LiveSandbox.close` deletes every snapshot (and drops
  the leases); creating a LiveSandbox deletes what a crashed hub left in the directory.

Queries run in worker processes (:mod:`.sqlworkers`), which open the snapshot they are
asked about read-only in a sandboxed instance of their own, under a memory ceiling and a
hard time limit; the hub process itself never opens a snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import duckdb

from commhub.core.records.sandbox import (
    DEFAULT_MAX_RESULT_BYTES,
    QueryResult,
    SqlBadRequest,
    SqlBusy,
    SqlFailed,
    check_select,
    sandbox_config,
)
from commhub.core.records.sqlworkers import SqlWorkers

__all__ = ["LiveSandbox", "SnapshotLease", "SnapshotSource"]

# File names of snapshots in the directory: ours, and those of older versions' exports.
_PATTERNS = ("sql-*.duckdb*", "export-*.duckdb*")


class SnapshotSource(Protocol):
    """Writes a consistent copy of a live database (the recorder)."""

    async def snapshot(self, dest: Path) -> None: ...


@dataclass(eq=False)
class _Generation:
    path: Path
    taken: float
    users: int = 0
    retired: bool = False
    stale_timer: asyncio.TimerHandle | None = field(default=None, repr=False)


@dataclass(eq=False)
class SnapshotLease:
    """A snapshot lent to a reader outside the hub (an export): ``path`` stays until
    :meth:`LiveSandbox.release` (or the lease expires)."""

    id: str
    path: Path
    _generation: _Generation = field(repr=False)
    _expiry: asyncio.TimerHandle | None = field(default=None, repr=False)


class LiveSandbox:
    """User SQL and exports on snapshots of a database that a writer keeps changing.

    A query sees every batch the recorder committed up to ``max_age`` seconds before it
    arrived, and possibly later ones. Each snapshot is a file ``sql-N.duckdb``; queries
    on it run in one of ``workers`` worker processes (:class:`~.sqlworkers.SqlWorkers`,
    with ``memory_limit`` and ``threads`` for their DuckDB instances). How long files
    live: see the module doc.

    Concurrency: every method runs on one event loop; the queries themselves run in
    worker threads. A failed snapshot raises :class:`~.sandbox.SqlFailed` for the
    requests that waited for it; the next one tries again. After :meth:`close`, queries
    and leases raise :class:`~.sandbox.SqlFailed`.
    """

    def __init__(
        self,
        source: SnapshotSource,
        directory: Path,
        *,
        max_age: float = 1.0,
        memory_limit: str | None = "1GB",
        threads: int | None = None,
        max_leases: int = 4,
        lease_seconds: float = 600.0,
        workers: int = 4,
    ) -> None:
        self.source = source
        self.directory = Path(directory)
        self.max_age = max_age
        self.memory_limit = memory_limit
        self.threads = threads
        self.max_leases = max_leases
        self.lease_seconds = lease_seconds
        self.workers = SqlWorkers(workers, memory_limit=memory_limit, threads=threads)
        self._current: _Generation | None = None
        self._leases: dict[str, SnapshotLease] = {}
        self._leasing = 0  # leases waiting for their snapshot: they count against the cap
        self._refresh = asyncio.Lock()
        self._counter = 0
        self._closed = False
        # Parses statements before a snapshot is taken for them (refusals cost nothing).
        self._parser = duckdb.connect(":memory:", config=sandbox_config())
        self.directory.mkdir(parents=True, exist_ok=True)
        for pattern in _PATTERNS:  # a crashed hub's
            for stale in self.directory.glob(pattern):
                stale.unlink(missing_ok=True)

    def files(self) -> list[Path]:
        """The snapshot files in the directory now (for tests and health checks)."""
        return sorted(p for pattern in _PATTERNS for p in self.directory.glob(pattern))

    async def aquery(
        self,
        sql: str,
        max_rows: int,
        timeout: float,
        executor: ThreadPoolExecutor | None = None,
        max_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    ) -> QueryResult:
        """Run one sandboxed SELECT on a fresh enough snapshot; raises SqlError."""
        if not isinstance(sql, str):
            raise SqlBadRequest("sql must be a string")
        check_select(self._parser, sql)
        generation = await self._acquire()
        try:
            return await self.workers.run(
                str(generation.path), sql, max_rows, timeout, max_bytes, executor
            )
        finally:
            self._release(generation)

    async def lease(self) -> SnapshotLease:
        """Lend a fresh enough snapshot to an outside reader until :meth:`release`.

        Raises :class:`~.sandbox.SqlBusy` when ``max_leases`` leases are out, and
        :class:`~.sandbox.SqlFailed` when no snapshot could be taken.
        """
        if len(self._leases) + self._leasing >= self.max_leases:
            raise SqlBusy(
                f"{self.max_leases} snapshots are lent out already (at most "
                f"{self.max_leases} at once); retry when an export finished"
            )
        self._leasing += 1
        try:
            generation = await self._acquire()
        finally:
            self._leasing -= 1
        lease = SnapshotLease(uuid.uuid4().hex, generation.path, generation)
        lease._expiry = asyncio.get_running_loop().call_later(
            self.lease_seconds, self.release, lease.id
        )
        self._leases[lease.id] = lease
        return lease

    def release(self, lease_id: str) -> bool:
        """End a lease; its snapshot goes once nothing else holds it. False if unknown
        (released already, expired, or never lent)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        if lease._expiry is not None:
            lease._expiry.cancel()
        self._release(lease._generation)
        return True

    async def close(self) -> None:
        """Drop the leases, delete every snapshot (after the queries using one finish) and
        stop the worker processes."""
        self._closed = True
        for lease_id in list(self._leases):
            self.release(lease_id)
        async with self._refresh:
            if self._current is not None:
                self._retire(self._current)
                self._current = None
        await self.workers.close()
        self._parser.close()

    async def _acquire(self) -> _Generation:
        async with self._refresh:
            if self._closed:
                raise SqlFailed("the SQL service is stopping")
            current = self._current
            if current is None or self._stale(current):
                current = await self._take()
            current.users += 1
            return current

    async def _take(self) -> _Generation:
        self._counter += 1
        path = self.directory / f"sql-{self._counter}.duckdb"
        taken = time.monotonic()  # the data is at least this fresh
        try:
            await self.source.snapshot(path)
        except Exception as exc:
            _remove_database(path)
            raise SqlFailed(f"could not snapshot the database: {exc}") from None
        generation = _Generation(path, taken)
        if self._current is not None:
            self._retire(self._current)
        self._current = generation
        generation.stale_timer = asyncio.get_running_loop().call_later(
            max(self.max_age, 0.0), self._on_stale, generation
        )
        return generation

    def _stale(self, generation: _Generation) -> bool:
        return time.monotonic() - generation.taken > self.max_age

    def _on_stale(self, generation: _Generation) -> None:
        # A snapshot nobody uses is deleted when it stops being fresh, not when the next
        # request happens to come.
        if generation is self._current and generation.users == 0:
            self._current = None
            self._retire(generation)

    def _release(self, generation: _Generation) -> None:
        generation.users -= 1
        if generation.users:
            return
        if generation is self._current and self._stale(generation):
            self._current = None
            generation.retired = True
        if generation.retired:
            self._dispose(generation)

    def _retire(self, generation: _Generation) -> None:
        generation.retired = True
        if generation.users == 0:
            self._dispose(generation)

    @staticmethod
    def _dispose(generation: _Generation) -> None:
        # A worker may still hold the file open: its space goes when the worker moves on
        # to a newer snapshot or sits idle (SqlWorkers' idle_seconds).
        if generation.stale_timer is not None:
            generation.stale_timer.cancel()
        _remove_database(generation.path)


def _remove_database(path: Path) -> None:
    for file in (path, Path(f"{path}.wal"), Path(f"{path}.tmp")):
        with contextlib.suppress(OSError):
            os.unlink(file)
