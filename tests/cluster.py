"""A 3-node nats-server cluster on 127.0.0.1 and commhub role processes, for the cluster
tests (tests/test_cluster.py) and bench/bench_cluster.py."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats

from commhub.core.natsserver import find_nats_server


def free_ports(n: int) -> list[int]:
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class NatsCluster:
    """Three JetStream servers routed to each other, each with a store of its own."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.size = size
        ports = free_ports(2 * size)
        self.client_ports, self.route_ports = ports[:size], ports[size:]
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * size

    @property
    def url(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.client_ports)

    def start(self, only: list[int] | None = None) -> NatsCluster:
        """Write every node's configuration and start the nodes (``only`` these)."""
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.route_ports)
        for i in range(self.size):
            node = self.root / f"n{i + 1}"
            node.mkdir(parents=True, exist_ok=True)
            (node / "server.conf").write_text(
                f"server_name: n{i + 1}\n"
                f"listen: 127.0.0.1:{self.client_ports[i]}\n"
                f"jetstream {{ store_dir: {str(node / 'js')!r}, max_file_store: 2GB, "
                "max_memory_store: 256MB }\n"
                f"cluster {{ name: commhub-test, listen: 127.0.0.1:{self.route_ports[i]}, "
                f"routes: [{routes}] }}\n".replace("'", '"'))
            if only is None or i in only:
                self.start_node(i)
        return self

    def start_node(self, i: int) -> None:
        node = self.root / f"n{i + 1}"
        log = open(node / "server.log", "ab")  # noqa: SIM115 - the child holds it
        self.processes[i] = subprocess.Popen(
            [find_nats_server(), "-c", str(node / "server.conf")],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()

    async def wait_ready(self, timeout: float = 60) -> None:
        """Until JetStream answers (a meta leader was elected)."""
        deadline = time.monotonic() + timeout

        async def quiet(exc: Exception) -> None:
            return None  # refusals while the nodes start are expected: no tracebacks

        while True:
            try:
                nc = await nats.connect(servers=self.url.split(","), connect_timeout=2,
                                        max_reconnect_attempts=1, error_cb=quiet)
                try:
                    info = await nc.jetstream(timeout=2).account_info()
                    if info is not None:
                        return
                finally:
                    await nc.close()
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    def kill(self, i: int) -> None:
        process = self.processes[i]
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def stop(self) -> None:
        for i, process in enumerate(self.processes):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    self.kill(i)


class RoleProcess:
    """``commhub up --role ROLE`` against the cluster, in a data directory of its own."""

    def __init__(self, root: Path, name: str, role: str, nats_url: str,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.role = role
        self.data_dir = root / name
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = root / f"{name}.log"
        self.env = {**os.environ, "COMMHUB_DATA_DIR": str(self.data_dir),
                    "COMMHUB_NATS_URL": nats_url, "COMMHUB_ROLE": role,
                    "COMMHUB_WS_PORT": "0", "COMMHUB_HTTP_PORT": "0", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RoleProcess:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "commhub.core.cli", "up"], env=self.env,
                stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def wait_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "commhub is up" not in self.output():
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.output()}")
            await asyncio.sleep(0.2)

    @property
    def ws_port(self) -> int:
        found = re.search(r"websocket: ws://[\d.]+:(\d+)/ws", self.output())
        assert found, self.output()
        return int(found[1])

    @property
    def http_url(self) -> str:
        found = re.search(r"http: (http://[\d.]+:\d+) ", self.output())
        assert found, self.output()
        return found[1]

    @property
    def standby(self) -> bool:
        return "standby: another recorder is active" in self.output()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self, timeout: float = 30) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode


class TwoOfEach:
    """Two processes of every role on one cluster, started in the order that loses
    nothing: the channels first (what they take in before a router runs waits in the
    streams), then the recorder that becomes the active one, then the routers and the
    standby recorder. Every process goes into ``started`` as soon as it starts, so the
    caller stops it even when a later one fails to come up."""

    def __init__(self, channels: list[RoleProcess], recorders: list[RoleProcess],
                 routers: list[RoleProcess]) -> None:
        self.channels = channels
        self.recorders = recorders
        self.routers = routers

    @classmethod
    async def start(cls, root: Path, nats_url: str, env: dict[str, str],
                    started: list[RoleProcess]) -> TwoOfEach:
        def role(name: str, kind: str) -> RoleProcess:
            process = RoleProcess(root, name, kind, nats_url, env).start()
            started.append(process)
            return process

        channels = [role("channels1", "channels"), role("channels2", "channels")]
        await asyncio.gather(*(p.wait_up() for p in channels))
        active = role("recorder1", "recorder")
        await active.wait_up()
        standby = role("recorder2", "recorder")
        routers = [role("router1", "router"), role("router2", "router")]
        await asyncio.gather(*(p.wait_up() for p in [standby, *routers]))
        return cls(channels, [active, standby], routers)
