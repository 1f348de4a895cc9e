"""Credentials and TLS as settings: an nkey seed, a .creds file (operator mode), a token,
a client certificate with a CA; secrets are never printed or written to hub.json."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from commhub.core.config import Settings
from commhub.core.hub import Hub
from commhub.core.natsconnect import NatsConnectError
from commhub.core.natsserver import find_nats_server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """A nats-server with a configuration of the test's own."""

    def __init__(self, root: Path, conf: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (root / "server.conf").write_text("jetstream { max_file_store: 1GB }\n" + conf)
        self.log = open(root / "server.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [find_nats_server(), "-c", str(root / "server.conf"), "-a", "127.0.0.1",
             "-p", str(self.port), "-sd", str(root / "js")],
            stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[list[Server]]:
    servers: list[Server] = []
    yield servers
    for server in servers:
        server.stop()


async def start_recorder(tmp_path: Path, **settings: object) -> Hub:
    hub = Hub(Settings(data_dir=tmp_path / "data", role="recorder", **settings))  # type: ignore[arg-type]
    await hub.start()
    return hub


async def test_an_nkey_seed_file_logs_in(tmp_path: Path, server_factory: list[Server]) -> None:
    import nkeys

    seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    server = Server(tmp_path / "srv", f'authorization {{ users = [{{nkey: "{public}"}}] }}\n')
    server_factory.append(server)
    (tmp_path / "user.nk").write_bytes(seed)
    hub = await start_recorder(tmp_path, nats_url=f"nats://127.0.0.1:{server.port}",
                               nats_nkey=tmp_path / "user.nk")
    assert hub.recorder is not None
    await hub.stop()


def _jwt(issuer: Any, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (v2) for ``subject``, signed by the ``issuer`` nkey pair (what `nsc`
    writes; the server checks the signature chain operator -> account -> user)."""
    import base64
    import hashlib

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    claims: dict[str, Any] = {"iat": int(time.time()), "iss": issuer.public_key.decode(),
                              "name": name, "sub": subject, "nats": nats}
    claims["jti"] = base64.b32encode(
        hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()).decode()
    signed = f"{b64(json.dumps({'typ': 'JWT', 'alg': 'ed25519-nkey'}).encode())}." \
             f"{b64(json.dumps(claims).encode())}"
    return f"{signed}.{b64(issuer.sign(signed.encode()))}"


def _operator_mode(root: Path) -> tuple[str, Path, Path]:
    """nats-server settings for operator (JWT) mode with a memory resolver, the .creds
    file of a user of its account, and that of a user of an account it does not know."""
    import nkeys

    def pair(prefix: int) -> tuple[bytes, Any]:
        seed = nkeys.encode_seed(secrets.token_bytes(32), prefix)
        return seed, nkeys.from_seed(bytearray(seed))

    no_limits = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                 "wildcards": True, "conn": -1, "leaf": -1}
    _, operator = pair(nkeys.PREFIX_BYTE_OPERATOR)
    accounts = {}
    for name, limits in (("SYS", no_limits), ("commhub", {
            **no_limits, "mem_storage": -1, "disk_storage": -1, "streams": -1,
            "consumer": -1}), ("stranger", no_limits)):
        _, account = pair(nkeys.PREFIX_BYTE_ACCOUNT)
        accounts[name] = (account, _jwt(operator, account.public_key.decode(), name, {
            "type": "account", "version": 2, "limits": limits}))
    system = accounts["SYS"][0].public_key.decode()
    operator_jwt = _jwt(operator, operator.public_key.decode(), "test-operator",
                        {"type": "operator", "version": 2, "system_account": system})
    known = {k: accounts[k] for k in ("SYS", "commhub")}
    conf = (f'operator: "{operator_jwt}"\nsystem_account: {system}\nresolver: MEMORY\n'
            "resolver_preload: { " + ", ".join(
                f'{a.public_key.decode()}: "{token}"' for a, token in known.values()) + " }\n")
    files = []
    for name in ("commhub", "stranger"):
        seed, user = pair(nkeys.PREFIX_BYTE_USER)
        token = _jwt(accounts[name][0], user.public_key.decode(), f"{name}-user", {
            "type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1,
            "payload": -1})
        path = root / f"{name}.creds"
        path.write_text(f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT"
                        f"------\n\n-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n"
                        "------END USER NKEY SEED------\n")
        files.append(path)
    return conf, files[0], files[1]


async def test_a_creds_file_logs_in_to_an_operator_mode_server(
    tmp_path: Path, server_factory: list[Server]
) -> None:
    """`nats_creds`: a user JWT and its nkey seed, as `nsc` writes them, on a server in
    operator mode: the recorder makes its streams and takes its lease as that user; a
    user of an account the server does not know is refused in one line."""
    conf, creds, stranger = _operator_mode(tmp_path)
    server = Server(tmp_path / "srv", conf)
    server_factory.append(server)
    url = f"nats://127.0.0.1:{server.port}"
    hub = await start_recorder(tmp_path, nats_url=url, nats_creds=creds)
    try:
        assert hub.recorder is not None
    finally:
        await hub.stop()
    with pytest.raises(NatsConnectError, match="the server refused the login"):
        await start_recorder(tmp_path / "other", nats_url=url, nats_creds=stranger)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_a_client_certificate_and_a_ca_over_tls(
    tmp_path: Path, server_factory: list[Server]
) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=commhub test CA", cwd=pki)
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"),
                        ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=pki)
        (pki / f"{name}.ext").write_text(extra + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                 f"{name}.ext", cwd=pki)
    server = Server(tmp_path / "srv", (
        f'tls {{ cert_file: "{pki}/server.pem", key_file: "{pki}/server.key", '
        f'ca_file: "{pki}/ca.pem", verify: true }}\n'))
    server_factory.append(server)
    url = f"tls://127.0.0.1:{server.port}"
    hub = await start_recorder(tmp_path, nats_url=url, nats_tls_ca=pki / "ca.pem",
                               nats_tls_cert=pki / "client.pem", nats_tls_key=pki / "client.key")
    assert hub.recorder is not None
    await hub.stop()
    with pytest.raises(NatsConnectError, match=f"cannot connect to NATS at {url}"):
        await start_recorder(tmp_path, nats_url=url, nats_tls_ca=pki / "ca.pem")


def test_a_token_is_used_and_never_shown(tmp_path: Path, server_factory: list[Server]) -> None:
    token = "tok-" + secrets.token_hex(16)
    server = Server(tmp_path / "srv", f'authorization {{ token: "{token}" }}\n')
    server_factory.append(server)
    data = tmp_path / "data"
    env = {**os.environ, "COMMHUB_DATA_DIR": str(data), "COMMHUB_NATS_TOKEN": token,
           "COMMHUB_NATS_URL": f"nats://127.0.0.1:{server.port}"}
    command = [sys.executable, "-m", "commhub.core.cli", "up", "--role", "recorder"]
    log = tmp_path / "hub.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while not (data / "hub.json").exists() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
        info = (data / "hub.json").read_text()
        assert json.loads(info)["role"] == "recorder"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        process.kill()
    assert token not in info and token not in log.read_text()

    wrong = subprocess.run(command, env={**env, "COMMHUB_NATS_TOKEN": "wrong-" + token},
                           capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 1
    assert "the server refused the login" in wrong.stderr
    assert token not in wrong.stderr + wrong.stdout

    bad = subprocess.run(command, env={**env, "COMMHUB_REPLICAS": "9"},
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and token not in bad.stderr


async def test_a_missing_credentials_file_names_its_setting(tmp_path: Path) -> None:
    with pytest.raises(NatsConnectError, match=r"nats_creds .* is not a readable file"):
        Settings(nats_creds=tmp_path / "nope.creds").nats_options()
    await asyncio.sleep(0)
