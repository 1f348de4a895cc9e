"""Failing well: an unreachable NATS, a refused login and a signal during the start end
every command quickly, with one line that names the server (no secrets) and why.

Every command runs as a subprocess; its timeout is the time bound.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubproc import pid_alive

from commhub.core.config import Settings
from commhub.core.hub import Hub
from commhub.core.natsauth import NatsCredentials
from commhub.core.natsserver import EmbeddedNats

SECRET = "s3cret-never-shown"


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "commhub.core.cli", *args]


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "COMMHUB_DATA_DIR": str(tmp_path / "data"), "COMMHUB_WS_PORT": "0",
            "COMMHUB_HTTP_PORT": "0", **extra}


def run(tmp_path: Path, *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(*args), env=env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("commhub: error:")]


@pytest.fixture(scope="module")
def guarded_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A nats-server that wants a user and password (URL without them)."""
    server = EmbeddedNats(tmp_path_factory.mktemp("guarded"), port=0,
                          credentials=NatsCredentials("hub", "right-password"))
    url = asyncio.run(server.start())
    yield url
    server.stop()


UNREACHABLE_COMMANDS = [("up", "--role", "router"), ("up",), ("sql", "SELECT 1"),
                        ("export", "out")]


def test_an_unreachable_server_is_one_line_naming_it(tmp_path: Path) -> None:
    """Every command that needs the bus ends with one line naming the URL (password
    masked) when nothing listens there. The commands run side by side: each waits out
    the same connect deadline."""
    url = f"nats://hub:{SECRET}@127.0.0.1:1"
    processes = []
    for i, args in enumerate(UNREACHABLE_COMMANDS):
        folder = tmp_path / str(i)
        folder.mkdir()
        processes.append((args, subprocess.Popen(
            command(*args, "--nats-url", url), env=env(folder), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)))
    try:
        for args, process in processes:
            stdout, stderr = process.communicate(timeout=15)
            assert process.returncode == 1, (args, stderr)
            assert error_lines(stderr) == [
                "commhub: error: cannot connect to NATS at nats://hub:***@127.0.0.1:1: "
                "connection refused (is nats-server running there?)"], (args, stderr)
            assert SECRET not in stderr + stdout, args
    finally:
        for _, process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.parametrize("args", [("up", "--role", "channels"), ("sql", "SELECT 1"),
                                  ("export", "out")])
def test_a_refused_login_is_one_line_at_once(
    tmp_path: Path, guarded_nats: str, args: tuple[str, ...]
) -> None:
    url = guarded_nats.replace("nats://", f"nats://hub:{SECRET}@")
    result = run(tmp_path, *args, "--nats-url", url, timeout=10)
    assert result.returncode == 1, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "the server refused the login" in lines[0]
    assert "hub:***@127.0.0.1" in lines[0]
    assert SECRET not in result.stderr + result.stdout


async def test_sql_takes_a_list_of_servers_and_skips_the_dead_one(
    settings: Settings, nats_url: str, tmp_path: Path
) -> None:
    hub = Hub(settings.model_copy(update={"role": "recorder"}))
    await hub.start()
    try:
        servers = f"nats://127.0.0.1:1,{nats_url}"
        process = await asyncio.create_subprocess_exec(
            *command("sql", "--nats-url", servers, "--prefix", settings.prefix,
                     "--format", "csv", "SELECT 41 + 1 AS answer"),
            env=env(tmp_path, COMMHUB_DATA_DIR=str(tmp_path / "client")),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, err.decode()
        assert out.decode().split() == ["answer", "42"]
    finally:
        await hub.stop()


def _accept_then_signal(listener: socket.socket, pid: list[int], sig: int) -> None:
    """Accept one connection (the hub is connecting now), say nothing, signal the hub."""
    listener.settimeout(60)
    try:
        conn, _ = listener.accept()
    except OSError:
        return
    os.kill(pid[0], sig)
    time.sleep(5)  # hold the connection open and silent meanwhile
    conn.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_connecting_ends_the_start(tmp_path: Path, sig: int) -> None:
    """A server that accepts and never greets: the start is in the connect when the
    signal comes, and ends at once (well before the connect's own deadline)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        pid: list[int] = []
        process = subprocess.Popen(
            command("up", "--role", "router", "--nats-url", f"nats://127.0.0.1:{port}"),
            env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        pid.append(process.pid)
        watcher = threading.Thread(target=_accept_then_signal, args=(listener, pid, sig),
                                   daemon=True)
        watcher.start()
        try:
            _, err = process.communicate(timeout=30)
        finally:
            process.kill()
    assert process.returncode == 128 + sig, err
    assert f"commhub: stopped: {signal.Signals(sig).name} while starting" in err


def test_sigterm_during_the_start_stops_what_it_started(tmp_path: Path) -> None:
    """SIGTERM as soon as the embedded nats-server runs (the hub is still creating its
    streams, opening DuckDB, training the classifier): the hub and the server are gone
    within a few seconds."""
    data = tmp_path / "data"
    process = subprocess.Popen(command("up"), env=env(tmp_path, COMMHUB_NATS_PORT="0"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (data / "nats-server.pid").exists() and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.01)
        server_pid = int((data / "nats-server.pid").read_text() or 0)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=5)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "commhub is up" not in out
    assert not server_pid or not pid_alive(server_pid)
    assert not (data / "hub.json").exists()


@pytest.mark.slow
def test_an_outage_is_logged_once_and_the_hub_carries_on(tmp_path: Path) -> None:
    """A hub on a server that goes away for 4 s says so once, and once when it is back."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = EmbeddedNats(tmp_path / "nats", port=port)
    url = asyncio.run(server.start())
    log = tmp_path / "hub.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command("up", "--role", "recorder", "--nats-url", url),
                                   env=env(tmp_path), stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while "commhub is up" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
        server.stop()
        time.sleep(4)
        asyncio.run(server.start())
        deadline = time.monotonic() + 20
        while "reconnected to NATS" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        process.kill()
        server.stop()
    text = log.read_text()
    assert text.count("lost the connection to NATS") == 1, text
    assert text.count("reconnected to NATS") == 1, text
    assert text.count("nats error") == 0, text
    assert text.count("failed, retrying") <= 2, text  # one per stream, if any
