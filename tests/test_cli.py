"""The ``commhub`` command as a user runs it: output, exit codes, error messages."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import duckdb
import pytest

from commhub.core.cli import main
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


def test_version_prints_the_version() -> None:
    """`commhub --version` prints `commhub X.Y.Z`."""
    result = commhub("--version")
    assert result.returncode == 0
    assert result.stdout == f"commhub {metadata.version('commhub')}\n"


def test_a_broken_config_file_is_one_line_with_file_and_line(tmp_path: Path) -> None:
    """A TOML syntax error in the config file: one line naming the file, the line and the
    problem, exit 2, no traceback."""
    config = tmp_path / "commhub.toml"
    config.write_text('prefix = "mine"\nws_port = \n')
    result = commhub("up", "--config", str(config), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2
    assert result.stderr == f"commhub: error: {config}:2:11: invalid TOML: Invalid value\n"


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    """A --config or COMMHUB_CONFIG file that does not exist stops the command, exit 2."""
    missing = tmp_path / "nope.toml"
    result = commhub("up", "--config", str(missing), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2
    assert result.stderr == f"commhub: error: config file {missing} does not exist\n"
    result = commhub("plugins", env={"COMMHUB_CONFIG": str(missing)})
    assert result.returncode == 2
    assert result.stderr == (f"commhub: error: config file {missing} (from COMMHUB_CONFIG) "
                             "does not exist\n")
    assert not (tmp_path / "data").exists()


def test_a_wrong_type_in_the_config_file_names_the_file_and_setting(tmp_path: Path) -> None:
    """A value of the wrong type in the config file names the file, line and setting."""
    config = tmp_path / "commhub.toml"
    config.write_text('prefix = "mine"\nhttp_port = "eighty"\n')
    result = commhub("up", "--config", str(config), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 1
    assert result.stderr == (
        f"commhub: error: invalid setting http_port = 'eighty' (from {config}, line 2): "
        "Input should be a valid integer, unable to parse string as an integer\n")


@pytest.mark.parametrize(("flag", "variable"), [("--ws-port", "COMMHUB_WS_PORT"),
                                                ("--http-port", "COMMHUB_HTTP_PORT")])
def test_a_port_in_use_names_its_setting_before_anything_starts(
    tmp_path: Path, flag: str, variable: str
) -> None:
    """`commhub up` on a port in use: one line naming the port and the setting to change,
    exit 1, and nothing was started first (no nats-server log, no DuckDB file, no trained
    classifier in the data directory)."""
    data = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--ws-port": "0", "--http-port": "0", flag: str(port)}
        result = commhub("up", "--data-dir", str(data), "--nats-port", "0",
                         *(item for pair in ports.items() for item in pair))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("commhub: error: ")
    assert line.endswith(f"cannot listen on 127.0.0.1:{port}: Address already in use "
                         f"(to use another port set {variable}, or 0 for any free one)")
    for started in ("nats-server.log", "commhub.duckdb", "models"):
        assert not (data / started).exists()


@pytest.mark.parametrize("disabled", [
    '["commhub.plugins.tfidf", "commhub.workflows.builtin"]',
    "commhub.plugins.tfidf, commhub.workflows.builtin",
], ids=["json-list", "comma-list"])
def test_disable_plugins_is_honoured_by_plugins_and_workflows_list(
    disabled: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """COMMHUB_DISABLE_PLUGINS as a JSON list or a comma list (read by the settings, as
    `commhub up` reads it) keeps those plugins out of `commhub plugins` and their
    workflows out of `commhub workflows list`; so does the config file's list."""
    monkeypatch.delenv("COMMHUB_CONFIG", raising=False)
    monkeypatch.setenv("COMMHUB_DISABLE_PLUGINS", disabled)
    assert main(["plugins"]) == 0
    listed = capsys.readouterr().out
    assert "commhub.channels.websocket" in listed
    assert "commhub.plugins.tfidf" not in listed and "commhub.workflows.builtin" not in listed
    assert main(["workflows", "list"]) == 0
    workflows = capsys.readouterr().out
    assert "book_table" not in workflows and "fallback" not in workflows

    monkeypatch.delenv("COMMHUB_DISABLE_PLUGINS")
    config = tmp_path / "commhub.toml"
    config.write_text('disable_plugins = ["commhub.workflows.builtin"]\n')
    assert main(["workflows", "list", "--config", str(config)]) == 0
    assert "book_table" not in capsys.readouterr().out
    assert main(["workflows", "list"]) == 0
    assert "book_table" in capsys.readouterr().out
