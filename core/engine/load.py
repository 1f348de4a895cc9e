"""Loading workflow files: YAML and TOML readers that keep line numbers for errors.

:func:`load_workflow_file` reads one ``.yaml``/``.yml``/``.toml`` file into a
:class:`~commhub.core.workflow.WorkflowDef` and checks it with
:func:`~commhub.core.engine.check.check_workflow`; :func:`load_workflows` loads files,
folders and ready-made definitions at once and rejects duplicate names. Both are also
importable from :mod:`commhub.core.workflow`.

Every problem is raised as a :class:`~commhub.core.workflow.WorkflowError` reading
``file:line: problem``: unreadable files, syntax errors, unknown keys or wrong types
(pydantic's first error, its location mapped back to a line) and every check. The
readers record the line of each key and list item as they go; TOML lines are
best-effort, since ``tomllib`` reports none.

YAML is read with YAML 1.2 booleans: only ``true``/``false`` are booleans, so ``on:``,
``yes`` and ``no`` stay strings (YAML 1.1 would turn the ``on:`` key into ``True``).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from commhub.core.engine.check import check_workflow
from commhub.core.engine.model import WORKFLOW_FILE_SUFFIXES, Path_, WorkflowDef, WorkflowError

__all__ = ["load_workflow_file", "load_workflows", "yaml12_loader"]


def yaml12_loader(dates_as_text: bool = False) -> type[yaml.SafeLoader]:
    """A SafeLoader where only true/false are booleans (``on``, ``yes``, ``no`` are text,
    as in YAML 1.2); with ``dates_as_text``, dates and times stay text (``2030-01-02``)."""
    dropped = {"tag:yaml.org,2002:bool"}
    if dates_as_text:
        dropped.add("tag:yaml.org,2002:timestamp")

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in dropped]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
        list("tTfF"),
    )
    return Loader


_Loader = yaml12_loader()


def _read_yaml(text: str, file: str) -> tuple[Any, dict[Path_, int]]:
    loader = _Loader(text)
    lines: dict[Path_, int] = {}
    try:
        node = loader.get_single_node()
        data = None if node is None else _build(loader, node, (), lines, file)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise WorkflowError(f"invalid YAML: {exc.problem or exc}", file,
                            mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise WorkflowError(f"invalid YAML: {exc}", file) from None
    finally:
        loader.dispose()
    return data, lines


def _build(loader: Any, node: yaml.Node, path: Path_, lines: dict[Path_, int], file: str) -> Any:
    """Construct a YAML node's value, recording the line of every key and list item."""
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolve ``<<: *anchor`` merges
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int):
                raise WorkflowError(f"unsupported mapping key {key!r}", file,
                                    key_node.start_mark.line + 1)
            if key in out:
                raise WorkflowError(f"duplicate key {key!r}", file, key_node.start_mark.line + 1)
            lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _build(loader, value_node, (*path, key), lines, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, (*path, i), lines, file) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


_TOML_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_TOML_KEY = re.compile(r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
                       r"(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=")


def _toml_key_parts(dotted: str) -> list[str]:
    parts = re.findall(r"\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+", dotted)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def _toml_lines(text: str) -> dict[Path_, int]:
    """Best-effort line numbers for TOML (tomllib has none): table headers, array-of-
    tables entries and ``key =`` lines; keys inside inline tables map to their line."""
    lines: dict[Path_, int] = {(): 1}
    current: Path_ = ()
    counts: dict[Path_, int] = {}
    in_multiline = False
    for number, raw in enumerate(text.splitlines(), start=1):
        if in_multiline:
            if raw.count('"""') % 2 == 1 or raw.count("'''") % 2 == 1:
                in_multiline = False
            continue
        header = _TOML_HEADER.match(raw)
        if header:
            parts = tuple(_toml_key_parts(header.group(2)))
            if header.group(1) == "[[":
                index = counts.get(parts, 0)
                counts[parts] = index + 1
                current = (*parts, index)
                lines.setdefault(parts, number)
            else:
                current = parts
            for end in range(1, len(current) + 1):
                lines.setdefault(current[:end], number)
            continue
        key = _TOML_KEY.match(raw)
        if key:
            path = (*current, *_toml_key_parts(key.group(1)))
            for end in range(len(current) + 1, len(path) + 1):
                lines.setdefault(path[:end], number)
            if raw.count('"""') % 2 == 1 or raw.count("'''") % 2 == 1:
                in_multiline = True
    return lines


def _read_toml(text: str, file: str) -> tuple[Any, dict[Path_, int]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        raise WorkflowError(f"invalid TOML: {exc}", file,
                            int(found.group(1)) if found else None) from None
    return data, _toml_lines(text)


def _describe_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "workflow"


def _from_data(data: Any, lines: dict[Path_, int], file: str) -> WorkflowDef:
    if not isinstance(data, dict):
        raise WorkflowError("a workflow file must hold a mapping (name, states, ...)", file, 1)
    name = data.get("name") if isinstance(data.get("name"), str) else ""
    try:
        defn = WorkflowDef.model_validate({**data, "source": file})
    except ValidationError as exc:
        first = exc.errors()[0]
        # pydantic adds model-validator and alias steps to loc that are not file keys.
        loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and "[" in p))
        probe = WorkflowDef.model_construct(name=name, source=file)
        probe._lines = lines
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        message = first["msg"].removeprefix("Value error, ")
        raise probe.error(loc, f"{_describe_loc(loc)}: {message}{more}") from None
    defn._lines = lines
    return defn


def load_workflow_file(path: Path) -> WorkflowDef:
    """Load and check one YAML (``.yaml``/``.yml``) or TOML (``.toml``) workflow file.

    Raises :class:`WorkflowError` naming the file and line for unreadable files, syntax
    errors, wrong keys or types, and every :func:`check_workflow` problem.
    """
    path = Path(path)
    file = str(path)
    suffix = path.suffix.lower()
    if suffix not in WORKFLOW_FILE_SUFFIXES:
        raise WorkflowError(f"not a workflow file (expected {', '.join(WORKFLOW_FILE_SUFFIXES)})",
                            file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowError(f"cannot read: {exc}", file) from None
    data, lines = _read_toml(text, file) if suffix == ".toml" else _read_yaml(text, file)
    defn = _from_data(data, lines, file)
    check_workflow(defn)
    return defn


def _files_in(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir()
                      if p.is_file() and p.suffix.lower() in WORKFLOW_FILE_SUFFIXES)
    if path.is_file():
        return [path]
    raise WorkflowError("no such file or folder", str(path))


def load_workflows(sources: Iterable[Path | str | WorkflowDef]) -> dict[str, WorkflowDef]:
    """Load and check every source: a file, a folder (its ``*.yaml``/``*.yml``/``*.toml``,
    sorted by name, not recursive) or a :class:`WorkflowDef`; returns them by name in load
    order. Two definitions with one name raise :class:`WorkflowError` naming both."""
    found: dict[str, WorkflowDef] = {}
    for source in sources:
        if isinstance(source, WorkflowDef):
            check_workflow(source)
            defs = [source]
        else:
            defs = [load_workflow_file(p) for p in _files_in(Path(source))]
        for defn in defs:
            if defn.name in found:
                first = found[defn.name].source or f"<workflow {defn.name}>"
                raise defn.error(("name",), f"workflow {defn.name!r} is already defined in "
                                 f"{first}")
            found[defn.name] = defn
    return found
