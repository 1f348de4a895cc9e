"""Run ``commhub up`` as a real subprocess for tests, and read where it listens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from commhub.core.natsauth import read_credentials


class HubProcess:
    """A ``commhub up`` child on a data directory, with embedded NATS on free ports."""

    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.log = data_dir.parent / f"{data_dir.name}-hub.log"
        self.extra = extra
        self.env = {
            **os.environ,
            "COMMHUB_DATA_DIR": str(data_dir),
            "COMMHUB_NATS_PORT": "0",
            "COMMHUB_WS_PORT": "0",
            "COMMHUB_HTTP_PORT": "0",
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "commhub.core.cli", *args]

    def start(self, timeout: float = 60) -> HubProcess:
        """Start the hub and wait until it wrote hub.json (all components are up)."""
        (self.data_dir / "hub.json").unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command("up", *self.extra), env=self.env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"hub exited {self.process.returncode}:\n{self.output()}")
            try:
                self.info = json.loads((self.data_dir / "hub.json").read_text())
                return self
            except (OSError, ValueError):
                time.sleep(0.05)
        raise RuntimeError(f"hub did not start:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def ws_port(self) -> int:
        for line in self.info["endpoints"]:
            if line.startswith("websocket: ws://"):
                return int(line.split("ws://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        raise AssertionError(f"no websocket endpoint in {self.info}")

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the hub's HTTP server."""
        for line in self.info["endpoints"]:
            if line.startswith("http: http://"):
                return line.split(" ", 2)[1]
        raise AssertionError(f"no http endpoint in {self.info}")

    @property
    def nats_url(self) -> str:
        """The hub's NATS URL with its credentials (its embedded server wants them)."""
        url = str(self.info["nats_url"])
        credentials = read_credentials(self.data_dir)
        return credentials.url(url) if credentials is not None else url

    def nats_server_pid(self) -> int:
        return int((self.data_dir / "nats-server.pid").read_text())

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the hub."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run another commhub command with the same environment."""
        return subprocess.run(self.command(*args), env=self.env, capture_output=True,
                              text=True, timeout=timeout)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False


def wait_dead(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False
