"""Child processes that run user SQL, so that no query can grow the hub's memory.

DuckDB's ``memory_limit`` bounds what its buffer manager holds, not everything a query
allocates: a constant folded while the query is planned (``SELECT repeat('x',
1000000000)``), a constant vector spread over 2,048 result rows, or a VALUES list are
plain allocations, and a planner busy folding does not see ``interrupt()``. Measured in
the hub's own process, that one SELECT took 3.8 GB and 20 s past its time limit. So live
SQL runs in worker processes (:class:`SqlWorkers`), each with:

- a **memory ceiling**: ``RLIMIT_DATA`` (the process's heap and private writable
  mappings) at :func:`memory_ceiling` of the DuckDB ``memory_limit``; an allocation past
  it fails inside DuckDB, which reports out of memory (code ``failed``), and the worker
  carries on; a worker that dies of it anyway is replaced;
- a **hard time limit**: a worker that has not answered ``grace`` seconds after the
  query's own time limit (which interrupts DuckDB) is killed and replaced (``timeout``);
- one query at a time, on its own DuckDB instance (:func:`~.sandbox.open_sandboxed`)
  of the snapshot it was asked about, kept open for the next query on the same file and
  closed when the file changes or after ``idle_seconds`` without queries (a deleted
  snapshot's disk space is freed by then).

Workers are fresh interpreters (``python -m commhub.core.records.sqlworkers``: safe
beside the hub's threads, and nothing of the hub's main module runs in them), started on
first use, at most ``size``; they talk to the hub over a socket pair, ignore SIGINT (the
hub stops them) and exit when the hub's end closes, so a killed hub leaves none behind
once their query is done.

Concurrency: :meth:`SqlWorkers.run` is called on the event loop; it waits for a free
worker (at most ``size`` queries run at once) and talks to it from a thread of the given
executor. :meth:`SqlWorkers.close` stops every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

from commhub.core.records.sandbox import (
    ERRORS_BY_CODE,
    QueryResult,
    SqlError,
    SqlFailed,
    SqlTimeout,
)

__all__ = ["SqlWorkers", "memory_bytes", "memory_ceiling"]

log = logging.getLogger(__name__)

#: Room in a worker beyond DuckDB's memory_limit: the interpreter, duckdb and pyarrow
#: themselves (about 200 MB), and a result's Arrow batches and Python values.
HEADROOM = 512 * 1024 * 1024

_UNITS = {
    "b": 1, "byte": 1, "bytes": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$", re.IGNORECASE)


def memory_bytes(text: str) -> int:
    """Bytes of a DuckDB memory size (``1GB`` = 10^9, ``1GiB`` = 2^30); ValueError if
    it is not one."""
    match = _MEMORY.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"not a memory size: {text!r} (use a number and KB, MB, GB, TB or KiB, MiB, "
            "GiB, TiB)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def memory_ceiling(memory_limit: str | None) -> int | None:
    """A worker's RLIMIT_DATA for DuckDB's ``memory_limit``: that plus :data:`HEADROOM`;
    None (no ceiling) without a memory limit."""
    if not memory_limit:
        return None
    return memory_bytes(memory_limit) + HEADROOM


@dataclass(frozen=True)
class _Config:
    memory_limit: str | None
    threads: int | None
    ceiling: int | None
    idle_seconds: float


# How long a worker may take to start (an interpreter, duckdb and pyarrow on a busy machine).
_START_SECONDS = 60.0


class _Gone(Exception):
    """The worker died, or did not answer in time (``late``); it has been killed."""

    def __init__(self, how: str, late: bool) -> None:
        super().__init__(how)
        self.late = late


class _Worker:
    """One child process and the hub's end of its socket. Used by one thread at a time.

    Starting blocks until the worker has imported DuckDB and says it is ready (up to
    ``_START_SECONDS``), so a query's time limit never includes the start; raises
    :class:`SqlFailed` if it does not start.
    """

    def __init__(self, config: _Config) -> None:
        mine, theirs = socket.socketpair()
        with mine, theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), json.dumps(asdict(config))],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
            self.conn = Connection(mine.detach())
        try:
            if self.conn.poll(_START_SECONDS) and self.conn.recv() == ("ready",):
                return
        except (EOFError, OSError):
            pass
        self.kill()
        code = self.process.returncode
        raise SqlFailed(f"the SQL worker process did not start (exit code {code})")

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def call(self, request: tuple[Any, ...], wait: float) -> tuple[Any, ...]:
        """Send one query and wait up to ``wait`` seconds for its reply; raise
        :class:`_Gone` (after killing the process) if none comes."""
        late = False
        try:
            self.conn.send(request)
            if self.conn.poll(wait):
                reply: tuple[Any, ...] = self.conn.recv()
                return reply
            late = True
        except (EOFError, OSError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)  # it closed its end: let it finish dying
        code = self.process.poll()
        self.kill()
        if code is None:
            how = "did not answer"
        elif code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        raise _Gone(how, late)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        self.process.wait()
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()


class SqlWorkers:
    """At most ``size`` worker processes that run sandboxed queries on database files.

    ``memory_limit`` and ``threads`` configure each worker's DuckDB instances; each
    worker's memory ceiling is :func:`memory_ceiling` of ``memory_limit`` (raises
    ValueError at once for a size DuckDB would not take).
    """

    def __init__(
        self,
        size: int = 4,
        *,
        memory_limit: str | None = "1GB",
        threads: int | None = None,
        grace: float = 2.0,
        idle_seconds: float = 5.0,
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self.grace = grace
        self.config = _Config(memory_limit, threads, memory_ceiling(memory_limit), idle_seconds)
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()  # _all is changed from executor threads
        self._closed = False

    def pids(self) -> list[int]:
        """Process ids of the workers that are alive (for tests and diagnostics)."""
        with self._lock:
            return [w.pid for w in self._all if w.alive()]

    async def run(
        self,
        path: str,
        sql: str,
        max_rows: int,
        timeout: float,
        max_bytes: int,
        executor: ThreadPoolExecutor | None = None,
    ) -> QueryResult:
        """Run one query on the database file ``path`` in a worker; raises SqlError."""
        async with self._slots:
            if self._closed:
                raise SqlFailed("the SQL service is stopping")
            worker = self._idle.pop() if self._idle else None
            request = ("query", path, sql, max_rows, timeout, max_bytes)
            loop = asyncio.get_running_loop()
            used, reply = await loop.run_in_executor(
                executor, self._call, worker, request, timeout + self.grace, timeout
            )
            if self._closed:
                await asyncio.to_thread(self._drop, used)
            else:
                self._idle.append(used)
        if reply[0] == "ok":
            _, columns, rows, truncated = reply
            return QueryResult(columns=columns, rows=rows, truncated=truncated)
        _, code, message = reply
        raise ERRORS_BY_CODE.get(code, SqlError)(message)

    def _call(
        self, worker: _Worker | None, request: tuple[Any, ...], wait: float, timeout: float
    ) -> tuple[_Worker, tuple[Any, ...]]:
        # In an executor thread: starting a worker and waiting for it both block.
        if worker is None or not worker.alive():
            if worker is not None:
                self._drop(worker)
            worker = _Worker(self.config)
            with self._lock:
                self._all.add(worker)
        try:
            return worker, worker.call(request, wait)
        except _Gone as gone:
            self._drop(worker)
            if gone.late:
                raise SqlTimeout(f"query exceeded {timeout:g} s") from None
            ceiling = self.config.ceiling
            limit = f" (its memory ceiling is {ceiling / 2**20:,.0f} MiB)" if ceiling else ""
            raise SqlFailed(
                f"the SQL worker process running the query {gone}, most likely out of "
                f"memory{limit}; it has been replaced"
            ) from None

    def _drop(self, worker: _Worker) -> None:
        with self._lock:
            self._all.discard(worker)
        worker.stop()

    async def close(self) -> None:
        """Stop every worker (queries in flight are expected to have finished)."""
        self._closed = True
        with self._lock:
            workers = list(self._all)
            self._all.clear()
        self._idle.clear()
        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in workers))


# -- the worker process ---------------------------------------------------------------
def _main(argv: list[str]) -> None:
    """``python -m commhub.core.records.sqlworkers FD CONFIG``: serve on socket FD."""
    fd, config = int(argv[1]), _Config(**json.loads(argv[2]))
    _serve(Connection(fd), config)


def _serve(conn: Connection, config: _Config) -> None:
    """A worker's main loop: one query at a time until told to stop or the hub is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the hub, which stops us
    if config.ceiling is not None:
        resource.setrlimit(resource.RLIMIT_DATA, (config.ceiling, config.ceiling))
    import duckdb  # after the ceiling: the worker's whole life is under it

    from commhub.core.records.sandbox import SqlSandbox, open_sandboxed

    conn.send(("ready",))
    opened: tuple[str, duckdb.DuckDBPyConnection, SqlSandbox] | None = None

    def close_opened() -> None:
        nonlocal opened
        if opened is not None:
            with contextlib.suppress(duckdb.Error):
                opened[1].close()
            opened = None

    while True:
        try:
            if not conn.poll(config.idle_seconds):
                close_opened()  # let a deleted snapshot's space go
                continue
            request = conn.recv()
        except (EOFError, OSError):
            break  # the hub is gone
        if request is None:
            break
        _, path, sql, max_rows, timeout, max_bytes = request
        reply: tuple[Any, ...]
        try:
            if opened is None or opened[0] != path:
                close_opened()
                connection = open_sandboxed(path, config.memory_limit, config.threads)
                opened = (path, connection, SqlSandbox(connection))
            result = opened[2].query(sql, max_rows, timeout, max_bytes)
            reply = ("ok", result.columns, result.rows, result.truncated)
        except SqlError as exc:
            reply = ("error", exc.code, exc.message)
        except MemoryError:
            reply = ("error", "failed", "the query needs more memory than the SQL worker has")
        except Exception as exc:  # cannot open the snapshot, say
            reply = ("error", "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        try:
            conn.send(reply)
        except MemoryError:
            conn.send(("error", "failed", "the result needs more memory than the SQL worker has"))
        except (EOFError, OSError):
            break
    close_opened()


if __name__ == "__main__":
    _main(sys.argv)
