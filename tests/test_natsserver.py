"""The embedded nats-server: start, stop, and taking over one a dead hub left behind."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
from pathlib import Path

import nats
import pytest
from hubproc import HubProcess, pid_alive, wait_dead
from nats.aio.client import Client

from commhub.core.bus import Bus
from commhub.core.natsauth import NatsCredentials, load_or_create, redact, without_credentials
from commhub.core.natsserver import EmbeddedNats, NatsServerError, find_nats_conf
from commhub.core.subjects import Subjects


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


# -- credentials ----------------------------------------------------------------------------
def command_line(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


async def refused(url: str) -> str:
    """Connect once, without retrying; return nats-py's reason for the refusal."""

    async def quiet(exc: Exception) -> None:
        pass  # raised by connect

    nc = Client()
    with pytest.raises(Exception) as failure:
        await nc.connect(url, connect_timeout=5, allow_reconnect=False, error_cb=quiet)
    await nc.close()  # a refused first connect leaves its socket open
    return str(failure.value)


async def test_with_credentials_only_clients_that_present_them_get_in(tmp_path: Path) -> None:
    """The server asks for the data directory's credentials: a client without them or
    with a wrong password is refused, one with them uses JetStream. The password is in
    a file only its owner reads, and never on the server's command line or in its log."""
    credentials = load_or_create(tmp_path)
    assert stat.S_IMODE((tmp_path / "nats-auth.json").stat().st_mode) == 0o600
    assert load_or_create(tmp_path) == credentials  # made once, then kept
    server = EmbeddedNats(tmp_path, port=0, credentials=credentials)
    url = await server.start()
    try:
        assert "Authorization Violation" in await refused(url)
        wrong = NatsCredentials(credentials.user, "not-the-password")
        assert "Authorization Violation" in await refused(wrong.url(url))
        nc = await nats.connect(credentials.url(url))
        await nc.jetstream().account_info()
        await nc.close()
        assert server.process is not None
        assert credentials.password.encode() not in command_line(server.process.pid)
    finally:
        server.stop()
    assert credentials.password not in (tmp_path / "nats-server.log").read_text()


async def test_a_configuration_without_the_hubs_user_fails_the_start(tmp_path: Path) -> None:
    """A nats_conf that lets anyone in would leave the bus open: the start fails, saying
    so, and no server is left running."""
    conf = tmp_path / "open.conf"
    conf.write_text("listen: 127.0.0.1:4222\njetstream {}\n")
    server = EmbeddedNats(tmp_path, port=0, conf=conf, credentials=load_or_create(tmp_path))
    with pytest.raises(NatsServerError, match="without credentials"):
        await server.start()
    assert server.process is None


async def test_an_outside_service_gets_only_the_permissions_its_user_has(
    tmp_path: Path,
) -> None:
    """The docs' recipe: a copy of nats.conf with a service user beside the hub's. The
    service stores workflow inputs (JetStream acks them) and hears handoffs, but may not
    publish replies to users nor call the SQL API."""
    shipped = find_nats_conf().read_text()
    crm = ('{user: crm, password: "crm-secret", permissions: {\n'
           '  publish: {allow: ["commhub.wf.*"]},\n'
           '  subscribe: {allow: ["commhub.evt.workflow.*.handoff", "_INBOX.>"]}\n}}\n')
    conf = tmp_path / "nats.conf"
    hub_line = "{user: $COMMHUB_NATS_USER, password: $COMMHUB_NATS_PASSWORD}\n"
    assert hub_line in shipped
    conf.write_text(shipped.replace(hub_line, hub_line + crm))
    credentials = load_or_create(tmp_path / "data")
    server = EmbeddedNats(tmp_path / "data", port=0, conf=conf, credentials=credentials)
    url = await server.start()
    try:
        bus = await Bus.connect(credentials.url(url), Subjects("commhub"))
        await bus.ensure_streams()
        await bus.close()

        violations: asyncio.Queue[str] = asyncio.Queue()

        async def keep(exc: Exception) -> None:
            await violations.put(str(exc))

        service = NatsCredentials("crm", "crm-secret")
        nc = await nats.connect(service.url(url), error_cb=keep)
        ack = await nc.jetstream().publish("commhub.wf.conv1", b'{"id":"x","conversation":'
                                           b'"conv1","event":"paid"}')
        assert ack.stream == "commhub_messages"
        await nc.subscribe("commhub.evt.workflow.*.handoff")
        await nc.publish("commhub.out.websocket.conv1", b"{}")
        violation = await asyncio.wait_for(violations.get(), 10)
        assert "permissions violation for publish" in violation.lower()
        await nc.subscribe("commhub.api.sql")
        violation = await asyncio.wait_for(violations.get(), 10)
        assert "permissions violation for subscription" in violation.lower()
        await nc.close()
    finally:
        server.stop()


async def test_commhub_up_closes_the_bus_to_strangers_and_opens_it_to_its_commands(
    hub_process: HubProcess,
) -> None:
    """With zero configuration the hub's embedded server refuses a plain nats-py client,
    while `commhub sql` and a script given `commhub nats-url` get in; the password is
    never printed nor in hub.json, which only its owner reads."""
    hub_process.start()
    data_dir = hub_process.data_dir
    info = json.loads((data_dir / "hub.json").read_text())
    assert "Authorization Violation" in await refused(info["nats_url"])

    answer = hub_process.run("sql", "SELECT 41 + 1 AS answer", "--format", "json")
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout) == [{"answer": 42}]

    printed = hub_process.run("nats-url")
    assert printed.returncode == 0, printed.stderr
    nc = await nats.connect(printed.stdout.strip())
    reply = await nc.request(f"{info['prefix']}.api.health", b"", timeout=10)
    assert json.loads(reply.data)["status"] == "ok"
    await nc.close()

    password = json.loads((data_dir / "nats-auth.json").read_text())["password"]
    assert stat.S_IMODE((data_dir / "nats-auth.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((data_dir / "hub.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert password not in (data_dir / "hub.json").read_text()
    assert hub_process.terminate() == 0
    assert "commhub is up" in hub_process.output()
    assert password not in hub_process.output()


def test_nats_url_without_a_running_hub_says_so(hub_process: HubProcess) -> None:
    """`commhub nats-url` on a data directory no hub runs on: one error line, exit 1."""
    result = hub_process.run("nats-url")
    assert result.returncode == 1
    assert result.stderr.startswith("commhub: error: no hub is running on ")


def test_urls_carry_hide_or_drop_credentials() -> None:
    """Credentials go into every server of a URL list; shown URLs hide the password;
    kept URLs drop it; the password never shows in a repr."""
    credentials = NatsCredentials("commhub", "pw_1-x")
    assert credentials.url("nats://127.0.0.1:4222,nats://old:pw@h:5") == (
        "nats://commhub:pw_1-x@127.0.0.1:4222,nats://commhub:pw_1-x@h:5")
    assert redact("nats://u:secret@h:1,h2:4,u2:s@h3:5/x") == "nats://u:***@h:1,h2:4,u2:***@h3:5/x"
    assert without_credentials("nats://u:secret@h:1,tls://h:2") == "nats://h:1,tls://h:2"
    assert "pw_1-x" not in repr(credentials)
