"""``commhub rebuild``: replay the streams into a fresh DuckDB file, then swap it in.

For a lost or damaged file, or to re-derive every row after a schema change. Steps:

1. Refuse while a hub runs on the data directory (its lock is held), then take the lock
   so that none starts meanwhile.
2. With the embedded default, start the embedded nats-server on the data directory's
   JetStream store (port 0, loopback, the data directory's credentials); otherwise
   connect to ``nats_url``.
3. Note each stream's last sequence, then run a :class:`~commhub.core.records.recorder.Recorder`
   into ``commhub.duckdb.rebuild`` on durables of its own (``{stream}_rebuild``,
   deliver all) until each has acked its stream up to that sequence. Progress goes to a
   callback (the CLI draws a bar on stderr).
4. Close the new file, then swap it in with one ``rename`` (atomic): a crash before
   that leaves the old file untouched, a crash after leaves the new one complete.

The recorder's own durables are not touched. Everything they would still deliver is in
the new file up to the sequences noted in step 3 (the rebuild read at least that far),
and whatever comes after is recorded as usual when the hub starts; records delivered
twice are skipped by the recorder's idempotent inserts. The rebuild durables are deleted
at the end, and at the start of the next rebuild if one was interrupted.

Only what the streams still hold can be rebuilt; the hub sets no retention limits, so by
default that is everything ever published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
from nats.js.errors import NotFoundError

from commhub.core.bus import Bus
from commhub.core.config import Settings
from commhub.core.lock import DataDirLock, hub_is_running, read_hub_info
from commhub.core.natsauth import load_or_create
from commhub.core.natsserver import EmbeddedNats
from commhub.core.records.recorder import Recorder

__all__ = ["RebuildError", "RebuildReport", "rebuild"]

log = logging.getLogger(__name__)

#: ``progress(done, total)``: records written so far, of the total the streams held.
ProgressCallback = Callable[[int, int], None]


class RebuildError(RuntimeError):
    """The rebuild cannot run (a hub is running, no streams); the message says what to do."""


@dataclass
class RebuildReport:
    """What a rebuild did."""

    path: Path
    records: int = 0
    seconds: float = 0.0
    rows: dict[str, int] = field(default_factory=dict)


def rebuild_consumer(stream: str) -> str:
    """The durable a rebuild reads ``stream`` with."""
    return f"{stream}_rebuild"


async def rebuild(settings: Settings, progress: ProgressCallback | None = None) -> RebuildReport:
    """Rebuild ``settings.duckdb_path`` from the streams; see the module doc.

    Raises :class:`RebuildError` when a hub runs on the data directory or the streams do
    not exist; :class:`~commhub.core.lock.HubAlreadyRunning` if a hub started between
    the check and the lock. On any failure the old file stays as it was.
    """
    data_dir = settings.data_dir
    if hub_is_running(data_dir):
        pid = (read_hub_info(data_dir) or {}).get("pid", "?")
        raise RebuildError(
            f"a commhub is running on {data_dir} (pid {pid}); stop it first: "
            "rebuild replaces the database file it writes"
        )
    lock = DataDirLock(data_dir)
    lock.acquire()
    server: EmbeddedNats | None = None
    try:
        if settings.embedded_nats:
            if not (data_dir / "jetstream").is_dir():
                raise RebuildError(
                    f"nothing to rebuild from: {data_dir} has no JetStream store "
                    "(start the hub with `commhub up` first)"
                )
            credentials = load_or_create(data_dir)  # the same ones the hub uses
            server = EmbeddedNats(data_dir, port=0, conf=settings.nats_conf,
                                  credentials=credentials)
            url = credentials.url(await server.start())
        else:
            assert settings.nats_url is not None
            url = settings.nats_url
        bus = await Bus.connect(url, settings.subjects, name="commhub-rebuild",
                                **settings.nats_options())
        try:
            return await _rebuild(bus, settings, progress)
        finally:
            await bus.close()
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        lock.release()


async def _rebuild(
    bus: Bus, settings: Settings, progress: ProgressCallback | None
) -> RebuildReport:
    subjects = settings.subjects
    streams = (subjects.messages_stream, subjects.events_stream)
    targets: dict[str, int] = {}
    total = 0
    for stream in streams:
        try:
            info = await bus.js.stream_info(stream)
        except NotFoundError:
            raise RebuildError(
                f"nothing to rebuild from: stream {stream} does not exist "
                f"(is the prefix {subjects.prefix!r} right?)"
            ) from None
        targets[stream] = info.state.last_seq
        total += info.state.messages
        with contextlib.suppress(NotFoundError):  # an interrupted rebuild's
            await bus.js.delete_consumer(stream, rebuild_consumer(stream))

    final = settings.duckdb_path
    fresh = final.with_name(final.name + ".rebuild")
    for leftover in (fresh, Path(f"{fresh}.wal")):
        leftover.unlink(missing_ok=True)
    started = time.monotonic()
    recorder = Recorder(
        bus,
        fresh,
        batch=settings.recorder_batch,
        flush_seconds=settings.recorder_flush_seconds,
        consumer=rebuild_consumer,
        progress_seconds=None,
        report_refused=False,  # reported when they were first recorded
    )
    await recorder.start()
    try:
        while True:
            if progress is not None:
                progress(recorder.stats.records, total)
            if await _caught_up(bus, targets):
                break
            if not recorder.running:
                raise RebuildError("the recorder stopped during the rebuild (see the log)")
            await asyncio.sleep(0.1)
        # Every record up to the targets is acked, and acks follow commits.
    finally:
        await recorder.stop()
    if progress is not None:
        progress(recorder.stats.records, max(total, recorder.stats.records))
    for stream in streams:
        with contextlib.suppress(NotFoundError):
            await bus.js.delete_consumer(stream, rebuild_consumer(stream))

    report = RebuildReport(path=final, records=recorder.stats.records)
    report.rows = await asyncio.to_thread(_count_rows, fresh)
    await asyncio.to_thread(_swap, fresh, final)
    report.seconds = time.monotonic() - started
    log.info("rebuilt %s from %d records in %.1f s", final, report.records, report.seconds)
    return report


async def _caught_up(bus: Bus, targets: dict[str, int]) -> bool:
    for stream, target in targets.items():
        if target == 0:
            continue
        try:
            info = await bus.js.consumer_info(stream, rebuild_consumer(stream))
        except NotFoundError:
            return False
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        if (floor or 0) < target and (info.num_pending or info.num_ack_pending):
            return False
    return True


def _count_rows(path: Path) -> dict[str, int]:
    from commhub.core.records.schema import DERIVED_TABLES, TABLES

    con = duckdb.connect(str(path), read_only=True)
    try:
        counts = {}
        for table in (*TABLES, *DERIVED_TABLES):
            row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
            counts[table] = int(row[0]) if row else 0
        return counts
    finally:
        con.close()


def _swap(fresh: Path, final: Path) -> None:
    """Put ``fresh`` in place of ``final`` with one rename.

    The old file's write-ahead log (left by a hub that was killed) belongs to the old
    file only; replayed into the new one it would corrupt it, so it is set aside first
    as ``<name>.wal.old``. ``fresh`` was closed cleanly, so it has no log of its own.
    """
    old_wal = Path(f"{final}.wal")
    if old_wal.exists():
        os.replace(old_wal, Path(f"{final}.wal.old"))
    os.replace(fresh, final)
