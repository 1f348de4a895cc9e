"""Names that user SQL may not use, and how to find the names a statement uses.

Some DuckDB functions, views and macros tell more than the records: the settings (which
hold the data directory's absolute path), the attached files, the environment, stored
secrets, other queries and the instance's log; some run SQL text that no check has seen
(``query``, ``query_table``); some change the instance (logging, profiling). The sandbox
refuses a statement that names any of them (:data:`DENIED`, widened by
:func:`with_dependents` to the built-in views and macros that use them), before it runs.

Names come from DuckDB's own parse tree (``json_serialize_sql``), not from the text:
function calls anywhere (scalar, aggregate, window, table functions, lambdas,
subqueries), tables and views in ``FROM`` (a table function without parentheses,
``FROM duckdb_settings``, is a table reference), and ``SHOW name``. A tree is compared
case-insensitively and with any catalog or schema ignored, so ``SYSTEM.MAIN.Current_Setting``
is ``current_setting``. A table reference is refused even when a CTE of the same name
would shadow it: the scope rules are DuckDB's, and refusing is the safe side.

Pure: nothing here touches DuckDB; the caller parses and reads the catalog.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["DENIED", "names_in_tokens", "names_in_tree", "refusal", "with_dependents"]

_SETTINGS = "it reveals the hub's settings, which include its file paths"
_FILES = "it reveals file paths on the hub's machine"
_ENVIRONMENT = "it reveals the hub's environment variables"
_SECRETS = "it reveals stored credentials"
_OTHERS = "it reveals other queries and the database instance's log"
_DYNAMIC = "it runs SQL text that the sandbox cannot check"
_STATE = "it changes the database instance"

#: Refused names and why. Lower case; views and macros built on them are added at run
#: time (:func:`with_dependents`).
DENIED: dict[str, str] = {
    "current_setting": _SETTINGS,
    "duckdb_settings": _SETTINGS,
    "duckdb_profiling_settings": _SETTINGS,
    "pg_settings": _SETTINGS,
    "duckdb_databases": _FILES,
    "pragma_database_list": _FILES,
    "database_list": _FILES,
    "pg_database": _FILES,
    "duckdb_temporary_files": _FILES,
    "duckdb_extensions": _FILES,
    "duckdb_extension_repositories": _FILES,
    "duckdb_external_file_cache": _FILES,
    "getenv": _ENVIRONMENT,
    "duckdb_secrets": _SECRETS,
    "which_secret": _SECRETS,
    "duckdb_logs": _OTHERS,
    "duckdb_logs_parsed": _OTHERS,
    "duckdb_log_contexts": _OTHERS,
    "duckdb_live_query_metrics": _OTHERS,
    "duckdb_prepared_statements": _OTHERS,
    "query": _DYNAMIC,
    "query_table": _DYNAMIC,
    "json_execute_serialized_sql": _DYNAMIC,
    "enable_logging": _STATE,
    "disable_logging": _STATE,
    "truncate_duckdb_logs": _STATE,
    "write_log": _STATE,
    "enable_profile": _STATE,
    "disable_profile": _STATE,
    "enable_object_cache": _STATE,
    "disable_object_cache": _STATE,
    "add_grammar_extension": _STATE,
    "remove_grammar_extension": _STATE,
    "import_database": _STATE,
    "copy_database": _STATE,
}

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


def with_dependents(
    definitions: Iterable[tuple[str, str]], denied: dict[str, str] = DENIED
) -> dict[str, str]:
    """``denied`` plus every view or macro whose definition uses a denied name.

    ``definitions`` are (name, SQL text) of the catalog's built-in views and macros
    (``duckdb_views()``, ``duckdb_functions()``); they are DuckDB's own, so a word match
    on their text is enough, and it errs on the side of refusing. Repeats until nothing
    is added, so a macro over a view over a denied function is refused too.
    """
    result = dict(denied)
    pending = [
        (name.lower(), {word.lower() for word in _WORD.findall(text)}) for name, text in definitions
    ]
    added = True
    while added:
        added = False
        for name, words in pending:
            if name in result:
                continue
            used = sorted(words & result.keys())
            if used:
                result[name] = f"it is built on {used[0]}, and {result[used[0]]}"
                added = True
    return result


def names_in_tree(tree: Any) -> set[str]:
    """The function, table and SHOW names in a ``json_serialize_sql`` tree, lower case."""
    return {name.lower() for name in _walk(tree)}


def _walk(node: Any) -> Iterator[str]:
    if isinstance(node, list):
        for item in node:
            yield from _walk(item)
        return
    if not isinstance(node, dict):
        return
    name = node.get("function_name")
    if isinstance(name, str):
        yield name
    if node.get("type") in ("BASE_TABLE", "SHOW_REF"):
        table = node.get("table_name")
        if isinstance(table, str) and table:
            yield _unquote(table)
    for value in node.values():
        if isinstance(value, dict | list):
            yield from _walk(value)


def names_in_tokens(text: str, tokens: Iterable[tuple[int, str]]) -> set[str]:
    """Every word-like token of ``text``, lower case: the fallback when DuckDB cannot
    serialize a statement's tree (a PIVOT inside a query). Broader than the tree (aliases
    and column names count too), so it may refuse more, never less.

    ``tokens`` are (byte offset, token kind name) as ``duckdb.tokenize`` gives them;
    string constants and comments are skipped.
    """
    data = text.encode("utf-8")
    marks = sorted(tokens)
    names: set[str] = set()
    for i, (start, kind) in enumerate(marks):
        if "string" in kind or "comment" in kind or "numeric" in kind:
            continue
        end = marks[i + 1][0] if i + 1 < len(marks) else len(data)
        token = data[start:end].decode("utf-8", errors="replace").strip()
        names.update(w.lower() for w in _WORD.findall(_unquote(token)))
    return names


def refusal(names: Iterable[str], denied: dict[str, str]) -> str | None:
    """The refusal message for the first denied name (alphabetically), or None."""
    found = sorted(set(names) & denied.keys())
    if not found:
        return None
    name = found[0]
    return f"refused: {name} is not allowed in SQL queries: {denied[name]}"


def _unquote(name: str) -> str:
    if len(name) >= 2 and name[0] == name[-1] == '"':
        return name[1:-1].replace('""', '"')
    return name
