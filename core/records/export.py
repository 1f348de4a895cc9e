"""Parquet exports of the records: one folder per table, partitioned by day, hive style.

``export_parquet(db_path, out_dir)`` writes ``out_dir/<table>/day=YYYY-MM-DD/*.parquet``
for every record table and derived table (the views are queries over them and are not
exported). ``day`` is the UTC date of the row's timestamp (:data:`PARTITIONS` names the
column per table); it comes back as a column when the files are read with hive
partitioning (DuckDB ``read_parquet('out/messages/**/*.parquet', hive_partitioning=true)``,
pandas/pyarrow ``read_parquet('out/messages')``). A table's folder is replaced as a
whole, so exporting again into the same directory leaves no stale partitions; other
files in ``out_dir`` are not touched.

The database is opened read-only in an instance of its own, so ``db_path`` must not be
held by a running hub: ``commhub export`` passes the file of a stopped hub, or a snapshot
the running hub wrote for it (``{prefix}.api.snapshot``). Blocks; raises
:class:`ExportError` with the reason when the file cannot be read or a file cannot be
written (files written before the failure stay).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import duckdb

__all__ = ["PARTITIONS", "ExportError", "export_parquet"]

log = logging.getLogger(__name__)

#: Exported tables and the timestamp column whose UTC date partitions them.
PARTITIONS: dict[str, str] = {
    "messages": "ts",
    "conversations": "first_ts",
    "classifications": "ts",
    "workflow_runs": "started_ts",
    "workflow_events": "ts",
    "channel_events": "ts",
    "workflow_inputs": "ts",
    "invalid_records": "ts",
}


class ExportError(RuntimeError):
    """The export could not read the database or write its files; the message says why."""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def export_parquet(
    db_path: Path | str,
    out_dir: Path | str,
    on_table: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Export every table to ``out_dir`` as day-partitioned Parquet; return rows per table.

    ``on_table(table, rows)`` is called after each table (for progress output). Tables
    with no rows get no folder; tables the database does not have (an older schema) are
    left out.
    """
    source = Path(db_path)
    if not source.is_file():
        raise ExportError(f"no database at {source}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(source), read_only=True)
    except (OSError, duckdb.Error) as exc:
        raise ExportError(f"cannot export {source} to {out}: {str(exc).splitlines()[0]}") from None
    counts: dict[str, int] = {}
    try:
        present = {
            row[0]
            for row in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
            ).fetchall()
        }
        for table, column in PARTITIONS.items():
            if table not in present:
                continue
            row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
            rows = int(row[0]) if row else 0
            counts[table] = rows
            if rows:
                target = _literal(str(out / table))
                con.execute(
                    f"COPY (SELECT *, CAST({column} AS DATE) AS day FROM {table}) "
                    f"TO {target} (FORMAT parquet, PARTITION_BY (day), OVERWRITE true)"
                )
            if on_table is not None:
                on_table(table, rows)
    except duckdb.Error as exc:
        raise ExportError(f"export to {out} failed: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()
    return counts
