"""The recorder: every record on the bus into DuckDB, in batches, idempotent, acked after commit.

One durable pull consumer per stream (``{stream}_recorder``, deliver policy ALL, so a
fresh database catches up from the whole stream) feeds one writer. The writer decodes
each record with :func:`commhub.core.envelope.decode`, routes it by type to its table
(:mod:`commhub.core.records.schema`), and writes the batch as Arrow tables with
``INSERT ... BY NAME ... ON CONFLICT DO NOTHING``: one transaction for the whole batch,
across all tables. Bytes that do not decode become a row of ``invalid_records`` (the
reason, the subject and the raw data), so a bad publisher never blocks the stream. So
does an ``out`` record that breaks the bus contract
(:func:`commhub.core.envelope.record_problem`): no channel delivered it, so it is not
written to ``messages``; it is also reported on ``evt.invalid`` (after the commit,
before the acks, under the id its row has).
Turning messages into rows and Arrow tables is :mod:`commhub.core.records.rows`; this
module fetches, writes, commits and acks. In the same transaction it recomputes the
derived rows (``workflow_runs``, then ``conversations``) of the runs and conversations
the batch touched, from the base tables, so they are exact under redelivery too. A
recompute reads every row of those conversations, so while a backlog waits behind the
batch it is deferred: the batch's transaction lists the touched keys in
``recorder_stale`` instead, and one recompute of everything listed runs at most every
``refresh_seconds``, as soon as nothing waits, before a snapshot, at start and at stop.

Failure contract:

- **Acks follow commits.** A record is acked only after the transaction holding it
  committed. A crash between commit and ack means redelivery, and redelivery writes
  nothing twice: every table is keyed on the envelope id (undecodable input on a
  deterministic id from its stream and sequence), and the insert skips existing ids.
  (A batch of first deliveries is inserted without that skip, which is half an insert's
  cost; the primary key refuses a stored id, the transaction rolls back as a whole, and
  the batch is written again with the skip, which stays on until a batch holds no
  stored record.)
- **A failed write loses nothing.** When DuckDB refuses a batch (disk full, a bug), the
  transaction rolls back, the error is logged, every record of the batch is nak'd with
  a delay that doubles up to 30 s, and the recorder keeps running; the records come back
  and are retried until they commit. Nothing is ever dropped or terminated.
- **One bad record does not poison a batch.** A record that decodes but cannot be
  stored (a ``ts`` outside years 1-9999, a close code too big for its column) becomes an
  ``invalid_records`` row with the reason, like bytes that do not decode.
- **Acks are explicit, one per record** (``AckPolicy.EXPLICIT``), pipelined: an ack is
  a buffered core publish, not a round trip, and the batch's acks leave together with
  the next flush (measured: about 5 us of CPU per ack, 3 % of the recorder's time per
  record; ``docs/architecture.md``). ``AckPolicy.ALL`` would save that, but a nak'd
  failed batch followed by a committed later batch would ack the failed records too,
  and an existing durable's ack policy cannot be changed in place (it would have to be
  recreated at its ack floor); explicit acks keep "acked implies committed" true record
  by record.

Concurrency: :meth:`start` and :meth:`stop` run on the event loop; one fetch task per
stream and one writer task. Every DuckDB call on the writer connection runs in a single
dedicated worker thread, so the event loop never blocks on DuckDB and the connection is
never used from two threads. Fetching continues while a batch is written (a small
bounded queue between them gives backpressure). Readers use cursors of the same
database instance through :attr:`Recorder.connection` from any thread.

Snapshots: user SQL never runs on this instance. :meth:`Recorder.snapshot` checkpoints
and copies the file (in the writer thread, between batches, so the copy is consistent);
:class:`commhub.core.records.sandbox.LiveSandbox` opens such copies in instances of their own.
The writer instance is locked down anyway (``enable_external_access=false``,
``lock_configuration=true`` after migrating), so nothing that reaches it through
:attr:`Recorder.connection` can touch files either.

Catching up: every fetched batch says how many records are still pending on its stream
(from the ack subject, no extra request). While more than a batch is pending, a log
line every ``progress_seconds`` shows the backlog, the share done and the rate, and one
line says when the recorder caught up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from commhub.core.bus import Bus
from commhub.core.envelope import InvalidRecord
from commhub.core.pull import Puller
from commhub.core.records.progress import Progress
from commhub.core.records.rows import Batch, num_delivered, num_pending, stream_seq
from commhub.core.records.schema import REFRESH_CONVERSATIONS, REFRESH_RUNS, migrate

__all__ = ["Recorder", "RecorderStats"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long JetStream waits for an ack before redelivering. Far above a batch's commit
# time; a redelivery that does happen is harmless (idempotent inserts).
ACK_WAIT_SECONDS = 60.0
# A file this recorder creates must open in the DuckDB of the tools users have (the CLI,
# Debian's duckdb 1.5, DBeaver): DuckDB 2.0 writes new files in a storage format that
# DuckDB 1.x cannot read unless told otherwise. A file keeps the format it was created
# with, so an existing one is opened as it is.
STORAGE_COMPATIBILITY_VERSION = "v1.0.0"
FILE_CONFIG: dict[str, str | bool | int | float | list[str]] = {
    "storage_compatibility_version": STORAGE_COMPATIBILITY_VERSION}


@dataclass
class RecorderStats:
    """Counters since start; read them from the event loop."""

    records: int = 0
    """Records in committed batches (a redelivered record counts again)."""
    inserted: int = 0
    """New rows written (records already stored are skipped, not counted)."""
    invalid: int = 0
    """Records the recorder itself wrote to ``invalid_records`` (undecodable, unstorable)."""
    batches: int = 0
    """Committed batches."""
    failures: int = 0
    """Batches DuckDB refused; their records were nak'd for redelivery."""
    last_commit: float | None = None
    """Epoch seconds of the last commit."""
    pending: int = 0
    """Records not yet committed: waiting on the streams (as of the last fetch) plus
    fetched and not yet written."""
    caught_up: int = 0
    """Records copied at start from before the durable's ack floor (another recorder's
    share, or everything for a new file)."""
    refreshes: int = 0
    """Recomputes of the derived rows (one per batch while caught up, at most one per
    ``refresh_seconds`` while catching up)."""

class Recorder:
    """Writes every record of both streams into the DuckDB file at ``db_path``.

    ``batch`` is the most records fetched from a stream at once and written in one
    transaction (a little more when both streams deliver together); ``flush_seconds``
    bounds how long a record waits for its batch to fill (its fetch waits up to half of
    that, the writer up to all of it). ``consumer`` names the durable
    of a stream (default: :meth:`Subjects.recorder_consumer`; ``commhub rebuild`` uses
    its own). ``progress_seconds`` is the interval of the catch-up log lines (None: none).
    ``refresh_seconds`` is the longest the derived rows lag while a backlog waits.
    ``report_refused`` publishes the ``out`` records it refuses on ``evt.invalid`` (a
    rebuild, which replays records reported long ago, turns it off).
    """

    #: First and largest redelivery delay after a failed write, in seconds.
    retry_delay: tuple[float, float] = (0.5, 30.0)

    def __init__(
        self,
        bus: Bus,
        db_path: Path,
        batch: int = 1000,
        flush_seconds: float = 0.2,
        *,
        consumer: Callable[[str], str] | None = None,
        progress_seconds: float | None = 5.0,
        report_refused: bool = True,
        refresh_seconds: float = 1.0,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if flush_seconds <= 0:
            raise ValueError("flush_seconds must be positive")
        self.bus = bus
        self.db_path = Path(db_path)
        self.batch = batch
        self.flush_seconds = flush_seconds
        self.consumer = consumer or bus.subjects.recorder_consumer
        self.progress_seconds = progress_seconds
        self.report_refused = report_refused
        self.refresh_seconds = refresh_seconds
        self.stats = RecorderStats()
        self.metrics: Any = None  # a HubMetrics, set by the hub: batch times
        self._pending: dict[str, int] = {}
        self._in_flight = 0  # fetched, not yet committed or nak'd
        self._executor: ThreadPoolExecutor | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._readers: duckdb.DuckDBPyConnection | None = None
        self._subs: list[tuple[str, Puller]] = []
        self._queue: asyncio.Queue[tuple[str, list[Msg]] | None] = asyncio.Queue(maxsize=4)
        self._tasks: list[asyncio.Task[None]] = []
        self._writer: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._delay = self.retry_delay[0]
        # When the oldest entry of recorder_stale was added (None: the table is empty).
        # Written in the worker thread; the write loop reads it to flush an idle backlog.
        self._stale_since: float | None = None
        # The keys recorder_stale holds (as of the last commit), so that a batch lists
        # only keys not listed yet; worker thread only.
        self._stale_keys: set[tuple[str, str]] = set()
        # True after stored records came back as first deliveries, until a batch holds
        # none: inserts check for conflicts meanwhile; worker thread only.
        self._replaying = False

    # -- public ---------------------------------------------------------------------
    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        """A connection of the recorder's database instance, for in-process readers.

        Call ``.cursor()`` on it for each query (tests and tools do). User SQL goes to
        snapshots instead (:meth:`snapshot`), never here. The instance has no external
        access and a locked configuration. Valid between :meth:`start` and :meth:`stop`.
        """
        if self._readers is None:
            raise RuntimeError("the recorder is not running")
        return self._readers

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._writer is not None and not self._writer.done()

    def stats_dict(self) -> dict[str, Any]:
        """:attr:`stats` as a JSON-ready dict (for the health API)."""
        return dataclasses.asdict(self.stats)

    async def start(self) -> None:
        """Open and migrate the database, bind the durable consumers, start consuming.

        Raises if the database cannot be opened (another process holds the file, a
        newer schema) or a stream does not exist (run :meth:`Bus.ensure_streams` first);
        nothing keeps running in that case.
        """
        if self._executor is not None:
            raise RuntimeError("the recorder was already started")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commhub-recorder")
        try:
            await self._in_thread(self._open)
            subjects = self.bus.subjects
            for stream in (subjects.messages_stream, subjects.events_stream):
                await self._catch_up(stream)
                self._subs.append((stream, await self._bind(stream)))
        except BaseException:
            await self._unsubscribe()
            await self._close_db()
            raise
        self._tasks = [
            asyncio.create_task(self._fetch_loop(stream, sub), name=f"recorder-fetch-{stream}")
            for stream, sub in self._subs
        ]
        self._writer = asyncio.create_task(self._write_loop(), name="recorder-writer")
        if self.progress_seconds:
            self._tasks.append(
                asyncio.create_task(self._progress_loop(self.progress_seconds),
                                    name="recorder-progress")
            )
        log.info("recorder writing %s from %s", self.db_path, [s for s, _ in self._subs])

    async def stop(self) -> None:
        """Stop fetching, commit and ack what was fetched, close the database.

        Takes about ``flush_seconds`` plus committing what was fetched. Safe to call twice
        and after a failed start. Records fetched but not committed (a failing final
        write) are nak'd and come back to the next recorder on this durable.
        """
        if self._executor is None:
            return
        self._stopping = True
        self._stop_event.set()
        if self._writer is not None and self._writer.done():
            for task in self._tasks:  # nobody drains the queue: do not wait on a full one
                task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._writer is not None:
            if not self._writer.done():
                await self._queue.put(None)
            await asyncio.gather(self._writer, return_exceptions=True)
        if not self.bus.nc.is_closed:
            try:
                await self.bus.nc.flush(timeout=5)  # the last acks reach the server
            except Exception as exc:  # unacked records are redelivered
                log.warning("recorder: could not flush acks: %s", exc)
        await self._unsubscribe()
        if self._con is not None:
            try:
                await self._in_thread(self._refresh_stale)
            except Exception as exc:  # the next start refreshes them
                log.warning("recorder: could not refresh the derived rows at stop: %s", exc)
        await self._close_db()

    async def snapshot(self, dest: Path) -> None:
        """Write a consistent copy of the database to ``dest`` (replacing it atomically).

        Runs in the writer thread between batches: ``CHECKPOINT`` folds the write-ahead
        log into the file, which is then copied (and the log too, if DuckDB kept one) to
        a temporary name and renamed. Costs a copy of the file; raises if the recorder is
        not running or the copy fails (``dest`` is then left as it was).
        """
        if self._con is None:
            raise RuntimeError("the recorder is not running")
        await self._in_thread(self._snapshot, Path(dest))

    def _snapshot(self, dest: Path) -> None:
        con = self._con
        if con is None:
            raise RuntimeError("the recorder is not running")
        self._refresh_stale()  # a snapshot's derived rows match its base tables
        con.execute("CHECKPOINT")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        wal = Path(f"{self.db_path}.wal")
        dest_wal = Path(f"{dest}.wal")
        try:
            shutil.copyfile(self.db_path, tmp)
            if wal.exists() and wal.stat().st_size:
                shutil.copyfile(wal, dest_wal)  # a checkpoint skipped: keep the log
            else:
                dest_wal.unlink(missing_ok=True)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    async def _unsubscribe(self) -> None:
        for _stream, sub in self._subs:
            with contextlib.suppress(Exception):  # the connection may be closing
                await sub.unsubscribe()
        self._subs.clear()

    # -- setup ----------------------------------------------------------------------
    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open(self) -> None:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(self.db_path), config=FILE_CONFIG)
        try:
            version = migrate(con)
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            self._readers = con.cursor()
        except BaseException:
            con.close()
            raise
        self._con = con
        stale = con.execute("SELECT count(*) FROM recorder_stale").fetchone()
        if stale and stale[0]:  # a recorder stopped while catching up
            self._stale_since = time.monotonic()
            self._refresh_stale()
        log.debug("recorder database %s at schema version %d", self.db_path, version)

    async def _close_db(self) -> None:
        if self._executor is None:
            return
        if self._con is not None:
            await self._in_thread(self._close_connections)
        self._executor.shutdown(wait=True)
        self._executor = None

    def _close_connections(self) -> None:
        if self._readers is not None:
            self._readers.close()
            self._readers = None
        if self._con is not None:
            self._con.close()
            self._con = None

    async def _catch_up(self, stream: str) -> None:
        """Copy into this file what the durable's ack floor says is recorded but this
        file lacks: what another recorder wrote while this one stood by, or everything
        for a new file. Read with an ephemeral consumer (no acks, the durable untouched);
        inserts skip what is already here."""
        try:
            info = await self.bus.js.consumer_info(stream, self.consumer(stream))
        except NotFoundError:
            return  # a first start: the durable starts at the beginning anyway
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        position = await self._in_thread(self._position, stream)
        if position is None:
            log.info("recorder: %s keeps no position for %s (an older file): taking it "
                     "as up to the ack floor %d", self.db_path, stream, floor)
            return
        if position >= floor:
            return
        log.info("recorder: %s holds %s up to %d, the ack floor is %d: catching up",
                 self.db_path, stream, position, floor)
        sub = await self.bus.js.pull_subscribe(
            "", stream=stream, config=ConsumerConfig(
                ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=position + 1, inactive_threshold=60.0,
                max_ack_pending=-1,
            ))
        done = position
        try:
            while done < floor:
                try:
                    msgs = await sub.fetch(self.batch, timeout=5)
                except TimeoutError:
                    break  # the rest was removed from the stream meanwhile
                msgs = [m for m in msgs if (stream_seq(m) or 0) <= floor]
                if not msgs:
                    break
                done = max(stream_seq(m) or 0 for m in msgs)
                self.stats.pending = floor - done  # a backlog: the refresh may wait
                await self._in_thread(self._write, [(stream, msgs)])
                self.stats.caught_up += len(msgs)
        finally:
            self.stats.pending = 0
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self._in_thread(self._refresh_stale)
        log.info("recorder: caught up %s to %d", stream, done)

    async def _bind(self, stream: str) -> Puller:
        # The only writer (the DuckDB file lock guarantees it), so records a crashed
        # recorder held are rewound and come back now; ON CONFLICT DO NOTHING skips
        # those it had already written.
        config = ConsumerConfig(
            durable_name=self.consumer(stream),
            description="commhub recorder: every record into DuckDB",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT_SECONDS,
            max_ack_pending=max(50_000, 10 * self.batch),
            max_deliver=-1,  # never give up on a record
        )
        return await self.bus.bind_durable(stream, config, rewind_unacked=True)

    # -- loops ----------------------------------------------------------------------
    async def _fetch_loop(self, stream: str, sub: Puller) -> None:
        # Not cancelled on stop: a cancelled fetch can leave a pull request on the server
        # that captures records for a dead inbox (they would wait ACK_WAIT to come back).
        failing = False  # an outage is logged once, not on every retry
        while not self._stopping:
            try:
                # A fetch that fills: at a low rate one pull request and one status per
                # stream every half flush, not per record; a backlog fills it at once.
                msgs = await sub.fetch(self.batch, timeout=self.flush_seconds / 2, fill=True)
            except TimeoutError:  # nats.errors.TimeoutError too: nothing pending
                failing = False
                self._set_pending(stream, 0)
                continue
            except Exception as exc:  # reconnecting, server restart, ...
                if self._stopping:
                    break
                if not failing:
                    log.warning("recorder: fetch from %s failed, retrying every second "
                                "until it works: %s", stream, exc)
                failing = True
                await asyncio.sleep(1.0)
                continue
            failing = False
            if msgs:
                pending = num_pending(msgs[-1])
                self._in_flight += len(msgs)
                if pending is not None:
                    self._set_pending(stream, pending)
                await self._queue.put((stream, msgs))

    def _set_pending(self, stream: str, pending: int) -> None:
        self._pending[stream] = pending
        self.stats.pending = sum(self._pending.values()) + self._in_flight

    async def _progress_loop(self, interval: float) -> None:
        """Log the backlog while the recorder is behind by more than a batch."""
        progress: Progress | None = None
        start = 0
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), interval)
            if self._stopping:
                break
            pending = self.stats.pending
            done = self.stats.records - start
            if pending > self.batch:
                if progress is None:
                    progress, start, done = Progress(pending), self.stats.records, 0
                progress.update(done, done + pending)
                log.info("%s", progress.line("recorder catching up"))
            elif progress is not None:
                progress.update(done, done + pending)
                log.info("recorder caught up: %s records written at %s records/s",
                         f"{done:,}", f"{progress.rate:,.0f}")
                progress = None

    async def _next_item(self) -> tuple[str, list[Msg]] | None:
        """The next fetched batch; while derived rows are stale and nothing arrives,
        refresh them every ``refresh_seconds`` (a backlog that went away unfetched)."""
        while True:
            if self._stale_since is None:
                return await self._queue.get()
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(self._queue.get(), self.refresh_seconds)
            try:
                await self._in_thread(self._refresh_stale)
            except Exception as exc:  # retried on the next batch or pause
                log.warning("recorder: could not refresh the derived rows: %s", exc)

    async def _write_loop(self) -> None:
        last = False
        while not last:
            item = await self._next_item()
            if item is None:
                break
            pending = [item]
            last = await self._fill(pending)
            try:
                committed = await self._commit(pending)
            except Exception:  # a bug; the records come back after ACK_WAIT_SECONDS
                log.exception("recorder: unexpected error while writing a batch")
                committed = False
            if committed:
                self._delay = self.retry_delay[0]
            else:
                # Back off so that a database that keeps failing is not hammered; the
                # fetchers wait meanwhile on the full queue.
                with contextlib.suppress(TimeoutError):  # stop() cuts the pause short
                    await asyncio.wait_for(self._stop_event.wait(), self._delay)
                self._delay = min(self._delay * 2, self.retry_delay[1])

    async def _fill(self, pending: list[tuple[str, list[Msg]]]) -> bool:
        """Add fetched batches to ``pending`` until it holds ``batch`` records or
        ``flush_seconds`` passed since its first one arrived; True when the stop marker
        came meanwhile (nothing follows it).

        Why wait: each stream's fetch returns on its own, so at a low rate the streams'
        few records would each make a transaction (several a turn at one
        conversation), each costing milliseconds of DuckDB's CPU that the turns on the
        same cores then wait for. Records are acked after their commit as before;
        waiting only delays them in the file, by at most ``flush_seconds`` here.
        """
        count = sum(len(msgs) for _stream, msgs in pending)
        deadline = time.monotonic() + self.flush_seconds
        while count < self.batch:
            try:
                more = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    return False
                try:
                    # An item that arrives as this times out is either returned or
                    # left in the queue for the next get: none is lost.
                    more = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    return False
            if more is None:
                return True
            pending.append(more)
            count += len(more[1])
        return False

    async def _commit(self, pending: Sequence[tuple[str, list[Msg]]]) -> bool:
        msgs = [msg for _stream, batch in pending for msg in batch]
        self._in_flight -= len(msgs)  # committed or nak'd below: either way, not held
        self.stats.pending = sum(self._pending.values()) + self._in_flight
        started = time.perf_counter()
        try:
            inserted, invalid, reports = await self._in_thread(self._write, pending)
            if reports and self.report_refused:
                # Refused out records are reported before their acks: a failed report
                # is retried with the batch (same ids: one report, one row).
                await self.bus.publish_all([(self.bus.subjects.invalid, r) for r in reports])
        except Exception as exc:  # any write failure: redeliver, keep running
            self.stats.failures += 1
            log.error(
                "recorder: writing a batch of %d records failed, will retry: %s", len(msgs), exc
            )
            await self._settle(msgs, ack=False, delay=0.0 if self._stopping else self._delay)
            return False
        self.stats.records += len(msgs)
        self.stats.inserted += inserted
        self.stats.invalid += invalid
        self.stats.batches += 1
        self.stats.last_commit = time.time()
        if self.metrics is not None:
            self.metrics.observe_batch(time.perf_counter() - started, len(msgs))
        await self._settle(msgs, ack=True)
        return True

    async def _settle(self, msgs: list[Msg], ack: bool, delay: float = 0.0) -> None:
        try:
            for msg in msgs:
                if ack:
                    await msg.ack()
                else:
                    await msg.nak(delay=delay or None)
        except Exception as exc:  # unsettled records come back after ack_wait
            log.warning("recorder: could not %s records: %s", "ack" if ack else "nak", exc)

    # -- the worker thread ----------------------------------------------------------
    def _write(
        self, pending: Sequence[tuple[str, list[Msg]]]
    ) -> tuple[int, int, list[InvalidRecord]]:
        """Decode, route and insert one batch in one transaction; return (inserted,
        invalid, the reports of refused out records for ``evt.invalid``)."""
        batch = Batch(self.bus.subjects)
        for stream, msgs in pending:
            for msg in msgs:
                batch.add(msg, stream)
        tables = batch.arrow_tables()
        # A batch of first deliveries is inserted without the conflict check, which is
        # most of an insert's cost; the primary keys still refuse a row stored before
        # (a record written but not acked, then delivered anew by a recreated durable),
        # and then the batch is written again with the check. Redeliveries, which may
        # well be stored already, take the checked path at once.
        # After such a refusal (a replay: more stored records follow) the check stays
        # on until a checked batch finds nothing stored.
        first_deliveries = not self._replaying and all(
            num_delivered(msg) == 1 for _stream, msgs in pending for msg in msgs)
        if first_deliveries:
            try:
                inserted = self._write_tables(batch, tables, pending, check_conflicts=False)
                return inserted, batch.invalid, batch.reports
            except duckdb.ConstraintException:
                log.debug("recorder: a batch of first deliveries held stored records; "
                          "writing it again with the conflict check")
                self._replaying = True
        inserted = self._write_tables(batch, tables, pending, check_conflicts=True)
        if inserted == sum(table.num_rows for table in tables.values()):
            self._replaying = False
        return inserted, batch.invalid, batch.reports

    def _write_tables(
        self,
        batch: Batch,
        tables: dict[str, pa.Table],
        pending: Sequence[tuple[str, list[Msg]]],
        *,
        check_conflicts: bool,
    ) -> int:
        """Insert the batch's tables, its derived rows or stale keys and the positions in
        one transaction and commit; return the rows inserted. Without
        ``check_conflicts`` a row whose id is stored raises ``duckdb.ConstraintException``
        and the transaction is rolled back (nothing of the batch is kept)."""
        con = self._con
        assert con is not None
        conflict = " ON CONFLICT DO NOTHING" if check_conflicts else ""
        inserted = 0
        new_rows: dict[str, int] = {}
        con.execute("BEGIN TRANSACTION")
        try:
            for name, table in tables.items():
                view = f"_recorder_batch_{name}"
                con.register(view, table)
                try:
                    row = con.execute(
                        f"INSERT INTO {name} BY NAME SELECT * FROM {view}{conflict}"
                    ).fetchone()
                except duckdb.Error:
                    # The transaction is aborted, and unregistering needs a usable one.
                    with contextlib.suppress(duckdb.Error):
                        con.execute("ROLLBACK")
                    raise
                finally:
                    con.unregister(view)
                new_rows[name] = int(row[0]) if row else 0
                inserted += new_rows[name]
            # Only new rows change a derived row; a replayed batch skips the recompute.
            touched = bool(new_rows.get("messages") or new_rows.get("workflow_events"))
            stale_since = self._stale_since
            listed: set[tuple[str, str]] = set()
            if self._refresh_due():
                if stale_since is None:
                    if touched:
                        self._refresh_derived(con, batch)
                else:
                    if touched:
                        self._mark_stale(con, batch)
                    self._refresh_listed(con)
                stale_since = None
            elif touched:
                listed = self._mark_stale(con, batch)
                stale_since = stale_since or time.monotonic()
            self._advance_positions(con, pending)
            con.execute("COMMIT")
        except BaseException:
            # The failed statement may already have ended the transaction.
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise
        if stale_since is None and (touched or self._stale_since is not None):
            self.stats.refreshes += 1
            self._stale_keys.clear()
        self._stale_keys |= listed
        self._stale_since = stale_since
        return inserted

    def _refresh_due(self) -> bool:
        """Recompute the derived rows in this batch's transaction? Yes when nothing is
        known to wait behind it, when stopping, or when the oldest stale key waited
        ``refresh_seconds``. (``stats.pending`` is set on the event loop; a stale read
        only moves a refresh by one batch.)"""
        if self.stats.pending <= 0 or self._stopping:
            return True
        since = self._stale_since
        return since is not None and time.monotonic() - since >= self.refresh_seconds

    def _mark_stale(self, con: duckdb.DuckDBPyConnection, batch: Batch) -> set[tuple[str, str]]:
        """List the runs and conversations the batch touched in recorder_stale (those
        not listed yet: a backlog keeps touching the same ones); return what it added."""
        conversations, runs = batch.touched_keys()
        added = {("run", key) for key in runs.column(0).to_pylist()}
        added |= {("conversation", key) for key in conversations.column(0).to_pylist()}
        added -= self._stale_keys
        if added:
            new = pa.table({"kind": [kind for kind, _ in added], "key": [key for _, key in added]})
            con.register("_recorder_stale_new", new)
            try:
                con.execute("INSERT INTO recorder_stale SELECT * FROM _recorder_stale_new "
                            "ON CONFLICT DO NOTHING")
            finally:
                con.unregister("_recorder_stale_new")
        return added

    @staticmethod
    def _refresh_listed(con: duckdb.DuckDBPyConnection) -> None:
        """Recompute the derived rows listed in recorder_stale and empty it (in the
        caller's transaction)."""
        con.execute(REFRESH_RUNS.format(
            runs="SELECT key FROM recorder_stale WHERE kind = 'run'"))
        con.execute(REFRESH_CONVERSATIONS.format(
            conversations="SELECT key AS conversation FROM recorder_stale "
                          "WHERE kind = 'conversation'"))
        con.execute("DELETE FROM recorder_stale")

    def _refresh_stale(self) -> None:
        """Recompute what recorder_stale lists, in a transaction of its own (worker
        thread). A failure rolls back and raises; the keys stay listed."""
        if self._stale_since is None:
            return
        con = self._con
        assert con is not None
        con.execute("BEGIN TRANSACTION")
        try:
            self._refresh_listed(con)
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise
        self._stale_since = None
        self._stale_keys.clear()
        self.stats.refreshes += 1

    @staticmethod
    def _advance_positions(
        con: duckdb.DuckDBPyConnection, pending: Sequence[tuple[str, list[Msg]]]
    ) -> None:
        """Remember the highest sequence of each stream this file now holds."""
        highest: dict[str, int] = {}
        for stream, msgs in pending:
            for msg in (msgs[0], msgs[-1]) if msgs else ():
                seq = stream_seq(msg)
                if seq is not None:
                    highest[stream] = max(highest.get(stream, 0), seq)
        for stream, seq in highest.items():
            # A plain UPDATE costs a third of an upsert; a stream's first batch inserts.
            updated = con.execute(
                "UPDATE recorder_positions SET seq = greatest(seq, ?) WHERE stream = ?",
                [seq, stream],
            ).fetchone()
            if not updated or not updated[0]:
                con.execute("INSERT INTO recorder_positions VALUES (?, ?)", [stream, seq])

    def _position(self, stream: str) -> int | None:
        """The highest sequence of ``stream`` written to this file; None when the file
        says nothing (it predates positions: it has rows, or it is new: it has none)."""
        con = self._con
        assert con is not None
        row = con.execute("SELECT seq FROM recorder_positions WHERE stream = ?",
                          [stream]).fetchone()
        if row is not None:
            return int(row[0])
        (rows,) = con.execute("SELECT (SELECT count(*) FROM messages) + "
                              "(SELECT count(*) FROM workflow_events)").fetchone() or (0,)
        return None if rows else 0

    @staticmethod
    def _refresh_derived(con: duckdb.DuckDBPyConnection, batch: Batch) -> None:
        """Recompute the workflow_runs and conversations rows the batch touched."""
        conversations, runs = batch.touched_keys()
        for view, keys, statement, column in (
            ("_recorder_touched_runs", runs, REFRESH_RUNS, "runs"),
            ("_recorder_touched_conversations", conversations, REFRESH_CONVERSATIONS,
             "conversations"),
        ):
            if not keys.num_rows:
                continue
            con.register(view, keys)
            try:
                con.execute(statement.format(**{column: f"SELECT * FROM {view}"}))
            finally:
                con.unregister(view)
