"""docs/permissions.conf: each role runs with only its NATS user's permissions, and what
a role must not do is refused (a channel publishing `out`, a service reading the state
bucket, anyone but the admin making streams)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from inproc import ws_port
from wschat import Chat

from commhub.core import streams
from commhub.core.bus import Bus
from commhub.core.config import Settings
from commhub.core.hub import Hub
from commhub.core.natsserver import find_nats_server
from commhub.core.records.sqlclient import query_over_bus
from commhub.core.subjects import Subjects

DOCS = Path(__file__).resolve().parent.parent / "docs"
ROLES = ("admin", "channels", "router", "recorder", "service", "agent")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A nats-server whose users are docs/permissions.conf's; (URL, passwords)."""
    root = tmp_path_factory.mktemp("perm")
    shutil.copy(DOCS / "permissions.conf", root / "permissions.conf")
    (root / "server.conf").write_text(
        "jetstream { max_memory_store: 64MB, max_file_store: 1GB }\n"
        "authorization { include \"permissions.conf\" }\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    passwords = {role: secrets.token_hex(12) for role in ROLES}
    env = {**os.environ, **{f"COMMHUB_{r.upper()}_PASSWORD": json.dumps(p)
                            for r, p in passwords.items()}}
    log = open(root / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [find_nats_server(), "-c", str(root / "server.conf"), "-a", "127.0.0.1", "-p",
         str(port), "-sd", str(root / "js")], env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield f"nats://127.0.0.1:{port}", passwords
    server.terminate()
    server.wait(10)
    log.close()


def url_as(guarded: tuple[str, dict[str, str]], role: str) -> str:
    url, passwords = guarded
    return url.replace("nats://", f"nats://{role}:{passwords[role]}@")


class Refusals:
    """A client of one role that collects the server's refusals."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    async def connect(self, url: str) -> nats.NATS:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        return await nats.connect(url, error_cb=on_error, max_reconnect_attempts=0)

    async def refused(self, what: str, timeout: float = 5) -> bool:
        async with asyncio.timeout(timeout):
            while not any("permissions violation" in e.lower() and what.lower() in e.lower()
                          for e in self.errors):
                await asyncio.sleep(0.05)
        return True


@pytest.fixture
async def deployment(
    guarded: tuple[str, dict[str, str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[dict[str, Hub]]:
    """The streams made by the admin, then a recorder, a router and a channels process,
    each with its own user and manage_streams off."""
    caplog.set_level(logging.WARNING)
    admin = await Bus.connect(url_as(guarded, "admin"), Subjects("commhub"))
    try:
        await streams.apply(admin.js, admin.subjects, streams.Layout())
    finally:
        await admin.close()
    url, passwords = guarded
    hubs: dict[str, Hub] = {}
    for role in ("recorder", "router", "channels"):
        hub = Hub(Settings(data_dir=tmp_path / role, nats_url=url, nats_user=role,
                           nats_password=passwords[role], role=role, manage_streams=False,
                           ws_port=0, http_port=0))
        await hub.start()
        hubs[role] = hub
    yield hubs
    for hub in reversed(hubs.values()):
        await hub.stop()


async def test_each_role_works_with_only_its_permissions(
    deployment: dict[str, Hub], guarded: tuple[str, dict[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    chat = await Chat.open(ws_port(deployment["channels"]), "perm1", user="ann")
    for text, expect in (("I'd like to book a table", "how many"), ("4", "which day")):
        assert expect in (await chat.say(text))["text"].lower()
    await chat.close()
    service = await nats.connect(url_as(guarded, "service"))
    try:
        sql = "SELECT count(*) FROM messages WHERE conversation = 'perm1'"
        async with asyncio.timeout(20):
            while (await query_over_bus(service, Subjects("commhub"), sql)).rows[0][0] < 4:
                await asyncio.sleep(0.2)
        reply = await service.request("commhub.api.state",
                                      json.dumps({"conversation": "perm1"}).encode(), 5)
        assert json.loads(reply.data)["workflow"] == "book_table"
    finally:
        await service.close()
    violations = [r.getMessage() for r in [*caplog.get_records("setup"), *caplog.records]
                  if "permissions violation" in r.getMessage().lower()]
    assert violations == []


async def test_what_a_role_must_not_do_is_refused(
    deployment: dict[str, Hub], guarded: tuple[str, dict[str, str]]
) -> None:
    channel = Refusals()
    nc = await channel.connect(url_as(guarded, "channels"))
    await nc.publish("commhub.out.websocket.perm2", b"{}")
    await nc.flush()
    assert await channel.refused('Publish to "commhub.out.websocket.perm2"')
    await nc.close()

    service = Refusals()
    nc = await service.connect(url_as(guarded, "service"))
    with pytest.raises(Exception):  # noqa: B017 - refused: the request goes unanswered
        await nc.jetstream(timeout=2).key_value("commhub_state")
    assert await service.refused("KV_commhub_state")
    await nc.close()

    router = Refusals()
    nc = await router.connect(url_as(guarded, "router"))
    with pytest.raises(Exception):  # noqa: B017
        await nc.jetstream(timeout=2).delete_stream("commhub_messages")
    assert await router.refused("$JS.API.STREAM.DELETE.commhub_messages")
    await nc.close()

    agent = Refusals()
    nc = await agent.connect(url_as(guarded, "agent"))
    kv = await nc.jetstream(timeout=5).key_value("commhub_agents")
    await kv.put("agent-7", b'{"name": "Eve", "capacity": 1}')  # allowed
    await nc.publish("commhub.in.websocket.perm2", b"{}")  # speaking as a user: no
    await nc.flush()
    assert await agent.refused('Publish to "commhub.in.websocket.perm2"')
    await nc.close()


def test_the_routers_permissions_cover_the_built_in_workflows_asks() -> None:
    """Every subject an installed workflow asks on (`commhub workflows asks`) is in the
    router's publish list and a service's subscribe list."""
    from commhub.core.cli import ask_subjects
    from commhub.core.plugins import Plugins
    from commhub.core.workflow import load_workflows

    conf = (DOCS / "permissions.conf").read_text()
    router = conf.split("{user: router")[1].split("subscribe:")[0]
    service = conf.split("{user: service")[1].split("}}")[0]
    asked = ask_subjects(load_workflows(Plugins.load().workflow_sources()).values())
    assert asked == ["shop.orders.status"]
    assert [s for s in asked if f'"{s}"' not in router or f'"{s}"' not in service] == []


async def test_the_router_asks_a_service_each_with_only_its_permissions(
    deployment: dict[str, Hub], guarded: tuple[str, dict[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The built-in order_status workflow's `ask`: the router (its user) requests on
    shop.orders.status, a service (its user) answers, the answer reaches the client."""
    service = await nats.connect(url_as(guarded, "service"))
    try:
        async def orders(msg: nats.aio.msg.Msg) -> None:
            await msg.respond(json.dumps({"status": "shipped", "eta": "Friday"}).encode())

        await service.subscribe("shop.orders.status", cb=orders)
        await service.flush()
        chat = await Chat.open(ws_port(deployment["channels"]), "perm3", user="bob")
        await chat.say(payload={"start": "order_status"})
        await chat.say("it's 12345")
        async with asyncio.timeout(20):
            while not any("shipped" in (m.get("text") or "") for m in chat.messages):
                await chat.next_frame("message")
        assert chat.messages[-1]["text"] == "Order 12345: shipped. Expected delivery: Friday."
        await chat.close()
    finally:
        await service.close()
    assert [r.getMessage() for r in caplog.records
            if "permissions violation" in r.getMessage().lower()] == []
