"""Query results for people and tools: an aligned table, CSV, JSON or a Parquet file."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from commhub.core.records.sandbox import QueryResult

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

