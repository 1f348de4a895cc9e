"""The ``commhub`` command as a user runs it: output, exit codes, error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb

from commhub.core.records.schema import migrate

BROKEN = """name: broken
description: A workflow with a bad target
examples: [hello]
initial: start
states:
  start:
    say: hi
    on:
      - message: any
        to: nowhere
"""


def commhub(*args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "commhub.core.cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def test_schema_prints_the_json_schema_of_every_record() -> None:
    """`commhub schema` prints JSON Schema with a definition per envelope record."""
    result = commhub("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    for name in ("Message", "Classification", "WorkflowEvent", "ChannelEvent",
                 "WorkflowInput", "InvalidRecord"):
        assert name in schema["$defs"]
    assert "conversation" in schema["$defs"]["Message"]["properties"]


def test_workflows_check_accepts_the_built_in_workflows() -> None:
    """`commhub workflows check` passes on the shipped definitions."""
    folder = Path(__file__).parent.parent / "workflows" / "definitions"
    result = commhub("workflows", "check", str(folder))
    assert result.returncode == 0, result.stderr
    assert "ok  book_table" in result.stdout and "ok  support_request" in result.stdout


def test_workflows_check_names_file_line_and_problem(tmp_path: Path) -> None:
    """A broken workflow file fails the check with its file, line and problem, exit 1."""
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = commhub("workflows", "check", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith(f"commhub: error: {path}:10:")
    assert "nowhere" in result.stderr
    assert "Traceback" not in result.stderr


def test_up_refuses_a_broken_workflow_and_leaves_nothing_running(tmp_path: Path) -> None:
    """`commhub up` with a broken workflow exits 1 naming the file, starting no server."""
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    data = tmp_path / "data"
    result = commhub("up", "--workflows", str(path), "--data-dir", str(data),
                     "--nats-port", "0", "--ws-port", "0")
    assert result.returncode == 1
    assert f"{path}:10:" in result.stderr
    assert not (data / "nats-server.pid").exists()


def test_workflows_list_shows_the_installed_workflows() -> None:
    """`commhub workflows list` lists the built-in workflows with their descriptions."""
    result = commhub("workflows", "list")
    assert result.returncode == 0, result.stderr
    for name in ("book_table", "support_request", "fallback"):
        assert name in result.stdout


def test_a_bad_setting_is_named(tmp_path: Path) -> None:
    """An invalid environment setting fails at start with the setting's name, exit 1."""
    result = commhub("up", "--data-dir", str(tmp_path), env={"COMMHUB_WS_PORT": "lots"})
    assert result.returncode == 1
    assert "ws_port" in result.stderr and "Traceback" not in result.stderr


def test_sql_without_records_says_so(tmp_path: Path) -> None:
    """`commhub sql` on an empty data directory explains there are no records yet."""
    result = commhub("sql", "SELECT 1", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "no records yet" in result.stderr


def test_sql_on_a_stopped_hub_reads_the_file_and_refuses_writes(tmp_path: Path) -> None:
    """With no hub running, `commhub sql` queries the DuckDB file, sandboxed."""
    con = duckdb.connect(str(tmp_path / "commhub.duckdb"))
    migrate(con)
    con.execute("INSERT INTO channel_events (id, channel, kind, ts) "
                "VALUES ('e1', 'websocket', 'accepted', now())")
    con.close()
    result = commhub("sql", "SELECT id, kind FROM channel_events", "--format", "csv",
                     "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["id,kind", "e1,accepted"]
    refused = commhub("sql", "DROP TABLE channel_events", "--data-dir", str(tmp_path))
    assert refused.returncode == 1
    assert "commhub: error:" in refused.stderr and "SELECT" in refused.stderr
    still = commhub("sql", "SELECT count(*) AS n FROM channel_events", "--format", "json",
                    "--data-dir", str(tmp_path))
    assert json.loads(still.stdout) == [{"n": 1}]


def test_workflows_graph_prints_mermaid_and_dot(tmp_path: Path) -> None:
    """`commhub workflows graph NAME` prints the state graph; --workflows adds files;
    an unknown name is an error naming the known ones."""
    result = commhub("workflows", "graph", "support_request")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("stateDiagram-v2\n")
    assert "filed --> in_progress : event request.progress" in result.stdout
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ninitial: a\nstates:\n  a: {final: true}\n")
    dot = commhub("workflows", "graph", "mine", "--format", "dot", "--workflows", str(path))
    assert dot.returncode == 0 and dot.stdout.startswith('digraph "mine" {'), dot.stderr
    missing = commhub("workflows", "graph", "nope")
    assert missing.returncode == 1 and "no workflow named 'nope'" in missing.stderr
