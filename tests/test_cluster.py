"""The cluster acceptance test: a 3-node NATS cluster, two channel processes, two routers
and two recorders with replicas = 3; under paced and burst clients one NATS node, the
active router, the active recorder and a channel process are killed one after another.
Every conversation's replies arrive in send order, once each; DuckDB holds every
message once; the streams have 3 replicas; the standby recorder took over."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
from cluster import NatsCluster, RoleProcess, TwoOfEach
from steadyclient import TEXTS, SteadyClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


async def sql(url: str, query: str, patience: float = 30) -> list[dict]:
    """`commhub sql` against the cluster; retried while no recorder answers yet (the
    standby takes over within the lease TTL of the active one's death)."""
    deadline = time.monotonic() + patience
    while True:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "commhub.core.cli", "sql", "--nats-url", url, "--format",
            "json", "--data-dir", "/nonexistent-commhub-client", query,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        if process.returncode == 0:
            return list(json.loads(out))
        assert "no hub answers" in err.decode() and time.monotonic() < deadline, err.decode()
        await asyncio.sleep(1)


async def test_faults_one_after_another_lose_and_reorder_nothing(tmp_path: Path) -> None:
    started = time.monotonic()
    cluster = NatsCluster(tmp_path / "nats").start()
    processes: list[RoleProcess] = []
    try:
        await cluster.wait_ready()
        roles = await TwoOfEach.start(tmp_path, cluster.url, {"COMMHUB_REPLICAS": "3"},
                                      processes)
        channels, routers = roles.channels, roles.routers
        recorder1, recorder2 = roles.recorders
        assert not recorder1.standby and recorder2.standby
        ports = [p.ws_port for p in channels]

        clients = [SteadyClient(ports, f"cl-paced-{n}", paced=True, first=n)
                   for n in range(12)]
        clients += [SteadyClient(ports, f"cl-burst-{n}", paced=False, first=n)
                    for n in range(12)]

        async def later(client: SteadyClient, delay: float) -> None:
            await asyncio.sleep(delay)
            await client.run(120)

        # Paced clients start a second apart and take about 6 s each; bursts come every
        # 1.25 s: traffic runs through every fault below.
        traffic = [asyncio.create_task(later(c, 1.0 * n)) for n, c in enumerate(clients[:12])]
        traffic += [asyncio.create_task(later(c, 1.25 * n))
                    for n, c in enumerate(clients[12:])]

        faults = [
            ("nats node n3", lambda: cluster.kill(2)),
            ("router1", routers[0].kill),
            ("recorder1 (active)", recorder1.kill),
            ("channels1", channels[0].kill),
        ]
        for _what, fault in faults:
            await asyncio.sleep(3)
            fault()
        await asyncio.gather(*traffic)

        assert sum(c.reconnects for c in clients) > 0  # channels1 died under its clients
        for client in clients:
            sent = [message_id for message_id, _ in client.sent]
            assert client.replied_to() == sent, (client.conversation, client.replied_to())
            reply_ids = [m["id"] for m in client.replies]
            assert len(reply_ids) == len(set(reply_ids)) == len(TEXTS)

        url = ",".join(cluster.url.split(",")[:2])  # n3 is down
        expected = len(clients) * 2 * len(TEXTS)
        deadline = time.monotonic() + 60
        while True:
            (row,) = await sql(url, "SELECT count(*) AS n, count(DISTINCT id) AS d FROM "
                                    "messages WHERE conversation LIKE 'cl-%'")
            if row["n"] >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        assert (row["n"], row["d"]) == (expected, expected)
        recorded = {r["id"] for r in await sql(
            url, "SELECT id FROM messages WHERE conversation LIKE 'cl-%' AND direction = 'in'")}
        assert recorded == {mid for c in clients for mid, _ in c.sent}
        assert "this process is the active recorder now" in recorder2.output()

        nc = await nats.connect(servers=url.split(","))
        try:
            js = nc.jetstream()
            for stream in ("commhub_messages", "commhub_events", "commhub_inputs",
                           "KV_commhub_state", "KV_commhub_leases"):
                assert (await js.stream_info(stream)).config.num_replicas == 3, stream
        finally:
            await nc.close()
        assert time.monotonic() - started < 180
    finally:
        for process in processes:
            process.stop()
        cluster.stop()


async def test_replicas_set_by_hand_survive_a_restart_and_apply_sets_them(
    tmp_path: Path,
) -> None:
    """R1 streams edited to R3 by an operator stay R3 through the next start (which does
    not fail on the bucket); `streams apply` sets replicas; 5 replicas on 3 servers is
    one clear line."""
    import dataclasses

    from commhub.core import streams
    from commhub.core.bus import Bus
    from commhub.core.subjects import Subjects

    cluster = NatsCluster(tmp_path / "nats").start()
    try:
        await cluster.wait_ready()
        subjects = Subjects("handset")
        bus = await Bus.connect(cluster.url, subjects, layout=streams.Layout(replicas=1))
        try:
            await bus.ensure_streams()
            for name in (subjects.messages_stream, f"KV_{subjects.state_bucket}"):
                config = (await bus.js.stream_info(name)).config
                await bus.js.update_stream(dataclasses.replace(config, num_replicas=3))
            assert await bus.ensure_streams() == []  # the next start: nothing reverted
            for name in (subjects.messages_stream, f"KV_{subjects.state_bucket}"):
                assert (await bus.js.stream_info(name)).config.num_replicas == 3
            await bus.state_bucket()

            lines = await streams.apply(bus.js, subjects, streams.Layout(replicas=3))
            assert f"{subjects.events_stream}: updated (num_replicas 1 -> 3)" in lines
            assert f"{subjects.messages_stream}: unchanged (3 replicas)" in lines
            assert (await bus.js.stream_info(subjects.inputs_stream)).config.num_replicas == 3

            with pytest.raises(streams.StreamSetupError) as caught:
                await streams.apply(bus.js, Subjects("five"), streams.Layout(replicas=5))
            assert "\n" not in str(caught.value)
            assert "with 5 replicas" in str(caught.value)
        finally:
            await bus.close()
    finally:
        cluster.stop()


async def test_stream_setup_waits_for_a_cluster_still_electing_its_leader(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """One node of a new three-node cluster is up: JetStream has no meta leader and does
    not answer (a new cluster elects its first leader once every node it was configured
    with has joined). The stream setup waits, instead of failing with "nats: timeout",
    and completes once the other nodes start and a leader is elected."""
    from commhub.core.bus import Bus
    from commhub.core.subjects import Subjects

    cluster = NatsCluster(tmp_path / "nats").start(only=[0])
    try:
        subjects = Subjects("electing")
        bus = await Bus.connect(cluster.url, subjects)
        try:
            setup = asyncio.create_task(bus.ensure_streams())
            await asyncio.sleep(3)
            assert not setup.done()  # waiting, not failed
            cluster.start_node(1)
            cluster.start_node(2)
            lines = await asyncio.wait_for(setup, 90)
            assert f"{subjects.messages_stream}: created with 1 replica" in " ".join(lines)
            assert (await bus.js.stream_info(subjects.inputs_stream)).config.name
            waits = [r for r in caplog.records
                     if "does not answer the stream setup yet" in r.getMessage()]
            assert len(waits) == 1  # one line for the wait, not one a second
        finally:
            await bus.close()
    finally:
        cluster.stop()
