"""The reference docs stay in step with the code: hooks, settings, subjects, envelope, links."""

from __future__ import annotations

import inspect
import re
import shlex
import shutil
import subprocess
import typing
from pathlib import Path

import msgspec
import pytest

from commhub.core import envelope, hookspecs, subjects
from commhub.core.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PREFIX = "commhub"


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _hookspecs() -> dict[str, object]:
    marker = f"{hookspecs.PROJECT}_spec"
    return {
        name: fn
        for name, fn in vars(hookspecs).items()
        if inspect.isfunction(fn) and hasattr(fn, marker)
    }


def test_every_hookspec_signature_is_in_plugins_doc() -> None:
    """Every hook in core/hookspecs.py appears in docs/plugins.md as `name(arg, ...)`."""
    text = _read(DOCS / "plugins.md")
    specs = _hookspecs()
    assert len(specs) >= 7, "hookspecs.py lost its markers?"
    missing = []
    for name, fn in specs.items():
        signature = f"{name}({', '.join(inspect.signature(fn).parameters)})"  # type: ignore[arg-type]
        if f"`{signature}`" not in text:
            missing.append(signature)
    assert not missing, f"hooks missing from docs/plugins.md: {missing}"


def test_every_setting_and_env_var_is_in_architecture_doc() -> None:
    """Every field of Settings appears in docs/architecture.md's table with its COMMHUB_ env var."""
    text = _read(DOCS / "architecture.md")
    rows = {line for line in text.splitlines() if line.startswith("| `")}
    missing = []
    for name in Settings.model_fields:
        env = f"COMMHUB_{name.upper()}"
        if not any(row.startswith(f"| `{name}` | `{env}` |") for row in rows):
            missing.append(f"{name} ({env})")
    assert not missing, f"settings missing from docs/architecture.md: {missing}"


def _subject_table() -> list[str]:
    """The subject patterns of the table in core/subjects.py's docstring, with the prefix."""
    doc = subjects.__doc__ or ""
    return [p.replace("{p}", PREFIX) for p in re.findall(r"``(\{p\}\.[^`]+)``", doc)]


def test_subject_table_matches_the_code() -> None:
    """The docstring table of core/subjects.py lists every subject that Subjects builds."""
    s = subjects.Subjects(PREFIX)
    built = {
        s.inbound("{channel}", "{conversation}"),
        s.outbound("{channel}", "{conversation}"),
        s.workflow_input("{conversation}"),
        s.classified("{conversation}"),
        s.workflow_event("{workflow}", "{kind}"),
        s.channel_event("{channel}", "{kind}"),
        s.invalid,
        s.api(">"),
    }
    assert built == set(_subject_table())


def test_every_subject_is_in_bus_doc() -> None:
    """Every subject pattern of core/subjects.py's table appears in docs/bus.md."""
    text = _read(DOCS / "bus.md")
    patterns = _subject_table()
    assert len(patterns) == 8
    missing = [p for p in patterns if f"`{p}`" not in text]
    assert not missing, f"subjects missing from docs/bus.md: {missing}"


def _sections(text: str) -> dict[str, str]:
    """Markdown sections by heading text (any level), each up to the next heading."""
    parts = re.split(r"^#{2,6} +(.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


ENVELOPE_TYPES = [*envelope.RECORD_TYPES, envelope.Sender, envelope.Alternative]


@pytest.mark.parametrize("record_type", ENVELOPE_TYPES, ids=lambda t: t.__name__)
def test_every_envelope_field_is_in_bus_doc(record_type: type) -> None:
    """Every field of an envelope record (and its tag) has a row in its docs/bus.md section."""
    sections = _sections(_read(DOCS / "bus.md"))
    section = sections.get(record_type.__name__)
    assert section is not None, f"docs/bus.md has no section '{record_type.__name__}'"
    fields = [f.encode_name for f in msgspec.structs.fields(record_type)]
    missing = [name for name in fields if f"| `{name}` |" not in section]
    tag = msgspec.inspect.type_info(record_type).tag  # type: ignore[attr-defined]
    if tag is not None and f'| `type` | `"{tag}"` |' not in section:
        missing.append(f"type={tag}")
    assert not missing, f"{record_type.__name__} fields missing from docs/bus.md: {missing}"


_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _relative_links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", _read(path), flags=re.M | re.S)  # code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    links = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # absolute URL, mailto:, or an anchor in the same page
        links.append(target.split("#", 1)[0])
    return links


@pytest.mark.parametrize(
    "path",
    [ROOT / "README.md", *sorted(DOCS.glob("*.md"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_relative_links_point_to_existing_files(path: Path) -> None:
    """Every relative markdown link in README.md and docs/*.md points to an existing file."""
    broken = [t for t in _relative_links(path) if not (path.parent / t).exists()]
    assert not broken, f"broken links in {path.relative_to(ROOT)}: {broken}"


def test_readme_test_command_is_what_ci_runs() -> None:
    """The awk line in .ci/run yields the README's test command, which installs and runs pytest."""
    assert shutil.which("awk"), ".ci/run needs awk to read the test command"
    script = _read(ROOT / ".ci" / "run")
    found = re.search(r"command=\$\(awk (.+) README\.md\)", script)
    assert found, ".ci/run no longer reads the test command from README.md with awk"
    program = shlex.split(found.group(1))
    extracted = subprocess.run(
        ["awk", *program, "README.md"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    lines = _read(ROOT / "README.md").splitlines()
    marker = lines.index("<!-- test-command -->")
    assert lines[marker + 1].startswith("```"), "the test command must be in a code block"
    assert extracted == lines[marker + 2].strip()
    assert "pip install" in extracted
    assert "pytest" in extracted


def test_every_builtin_plugin_is_listed_in_plugins_doc() -> None:
    """docs/plugins.md's list of built-ins is DEFAULT_PLUGINS, all of it."""
    from commhub.core.plugins import DEFAULT_PLUGINS

    text = _read(DOCS / "plugins.md")
    item = text[text.index("1. The built-ins"):text.index("\n2. ", text.index("1. The built-ins"))]
    assert re.findall(r"`(commhub\.[\w.]+)`", item) == list(DEFAULT_PLUGINS)


@pytest.mark.parametrize("doc", ["records.md", "bus.md"])
def test_every_workflow_event_kind_is_in_the_docs(doc: str) -> None:
    """Every kind of WorkflowEvent is in the doc's row for the ``kind`` of workflow events."""
    kinds = typing.get_args(envelope.WorkflowEventKind)
    text = _read(DOCS / doc)
    section = _sections(text)["`workflow_events`" if doc == "records.md" else "WorkflowEvent"]
    (row,) = [line for line in section.splitlines() if line.startswith("| `kind` |")]
    missing = [kind for kind in kinds if f"`{kind}`" not in row and f'`"{kind}"`' not in row]
    assert not missing, f"{doc}: workflow event kinds missing: {missing}"


# What Hub._start does, in the order it must do it, as (code, words the docs use for it).
START_ORDER = [
    ("load_workflows(", "workflow"),
    ("self.lock.acquire()", "lock"),
    ("await self.nats.start()", "nats-server"),
    ("ensure_streams()", "streams"),
    ("_start_apis()", "health and state APIs"),
    ("self._recorder_lease.start()", "recorder"),  # the active one starts its SQL service
    ("SQL service", "SQL service"),
    ("_start_router()", "router"),
    ("_start_channels()", "channel"),
    ("plugins.startup(", "startup"),
    ("await self.web.start()", "serving HTTP"),
    ("write_info(", "hub.json"),
]


def _in_order(text: str, needles: list[str]) -> list[str]:
    """The needles not found in ``text`` after the previous one."""
    at, out_of_order = 0, []
    for needle in needles:
        found = text.find(needle, at)
        if found < 0:
            out_of_order.append(needle)
        else:
            at = found + len(needle)
    return out_of_order


def test_hub_start_order_in_docs_is_the_codes() -> None:
    """core/hub.py's docstring and docs/architecture.md give Hub._start's order."""
    from commhub.core import hub

    code = inspect.getsource(hub.Hub._start)
    assert _in_order(code, [marker for marker, _ in START_ORDER]) == []
    words = [word for _, word in START_ORDER]
    docstring = (hub.__doc__ or "").split("``Hub.stop()``")[0]
    assert _in_order(" ".join(docstring.split()), words) == []
    architecture = _sections(_read(DOCS / "architecture.md"))["Start and stop order"]
    steps = " ".join(architecture.split("`Hub.stop()`")[0].split())
    assert _in_order(steps, words) == []
