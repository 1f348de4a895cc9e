"""The embedded nats-server: start, stop, and taking over one a dead hub left behind."""

from __future__ import annotations

import socket
from pathlib import Path

import nats
import pytest
from hubproc import pid_alive, wait_dead

from commhub.core.natsserver import EmbeddedNats, NatsServerError


async def test_a_server_left_on_the_data_dir_is_taken_over(tmp_path: Path) -> None:
    """A second start on the same data directory stops the server recorded there first,
    so a hub that died without its server never blocks the next one."""
    left_behind = EmbeddedNats(tmp_path, port=0)
    await left_behind.start()
    assert left_behind.process is not None
    orphan_pid = left_behind.process.pid

    successor = EmbeddedNats(tmp_path, port=0)
    url = await successor.start()
    try:
        assert wait_dead(orphan_pid)
        assert successor.process is not None and pid_alive(successor.process.pid)
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.account_info()  # JetStream works on the taken-over store
        await nc.close()
    finally:
        successor.stop()
        left_behind.process.wait(10)  # reap it: it was our child in this test


async def test_stop_ends_the_server_and_clears_its_pid_file(tmp_path: Path) -> None:
    """stop() ends the process and removes the pid file; a second stop() does nothing."""
    server = EmbeddedNats(tmp_path, port=0)
    await server.start()
    assert server.process is not None
    pid = server.process.pid
    assert (tmp_path / "nats-server.pid").read_text() == str(pid)
    server.stop()
    assert wait_dead(pid)
    assert not (tmp_path / "nats-server.pid").exists()
    server.stop()


async def test_a_port_in_use_is_reported_with_the_servers_reason(tmp_path: Path) -> None:
    """When the server cannot listen, the error carries nats-server's own reason."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(NatsServerError, match="address already in use") as error:
            await EmbeddedNats(tmp_path, port=port).start()
    assert "COMMHUB_NATS_PORT" in str(error.value)
