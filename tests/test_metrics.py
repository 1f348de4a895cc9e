"""Every role serves /healthz, /readyz and Prometheus /metrics; the counters move with
traffic; api.health can be addressed to one process."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from inproc import ws_port
from prometheus_client.parser import text_string_to_metric_families
from wschat import Chat

from commhub.core.config import Settings
from commhub.core.hub import Hub

DASHBOARD = (Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"
             ).read_text()


def http_url(hub: Hub) -> str:
    assert hub.web is not None
    return hub.web.url


async def scrape(hub: Hub) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, session.get(
            f"{http_url(hub)}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
async def split(settings: Settings, tmp_path: Path) -> AsyncIterator[dict[str, Hub]]:
    hubs: dict[str, Hub] = {}
    for role in ("recorder", "router", "channels"):
        hub = Hub(settings.model_copy(update={"role": role, "data_dir": tmp_path / role}))
        await hub.start()
        hubs[role] = hub
    yield hubs
    for hub in reversed(hubs.values()):
        await hub.stop()


async def test_every_role_serves_probes_and_metrics_that_move_with_traffic(
    split: dict[str, Hub],
) -> None:
    async with aiohttp.ClientSession() as session:
        for role, hub in split.items():
            for path in ("/healthz", "/readyz"):
                async with session.get(f"{http_url(hub)}{path}") as response:
                    assert response.status == 200, (role, path)
                    assert (await response.json())["role"] == role
    before = {role: await scrape(hub) for role, hub in split.items()}
    chat = await Chat.open(ws_port(split["channels"]), "metrics1")
    await chat.say("I'd like to book a table")
    await chat.say("4")
    await chat.say("cancel")
    await chat.close()
    recorder, router = split["recorder"], split["router"]
    assert recorder.recorder is not None
    async with asyncio.timeout(20):
        while (await scrape(recorder)).get(("commhub_recorder_records_total", ()), 0) < 6:
            await asyncio.sleep(0.2)
        await asyncio.sleep(6)  # the lag gauges refresh every 5 s
    after = {role: await scrape(hub) for role, hub in split.items()}

    r0, r1 = before["router"], after["router"]
    assert value(r1, "commhub_turns_total") - value(r0, "commhub_turns_total") == 3
    assert value(r1, "commhub_classifications_total", decision="workflow") >= 1
    assert value(r1, "commhub_workflow_events_total", workflow="book_table",
                 kind="started") >= 1
    assert value(r1, "commhub_workflow_events_total", workflow="book_table",
                 kind="cancelled") >= 1
    for stage in ("load", "classify", "decide", "commit", "publish", "total"):
        assert value(r1, "commhub_router_stage_seconds_count", stage=stage) > 0, stage
    assert value(r1, "commhub_router_partitions") == 16
    lags = [k for k in r1 if k[0] == "commhub_consumer_lag"]
    assert len(lags) == 2 * 16  # pending and ack_pending of every partition it holds
    assert value(r1, "commhub_consumer_lag", stream=router.settings.subjects.inputs_stream,
                 durable=router.settings.subjects.partition_consumer(0), state="pending") == 0

    c1 = after["recorder"]
    assert value(c1, "commhub_recorder_batch_seconds_count") > 0
    assert value(c1, "commhub_recorder_active") == 1
    assert ("commhub_invalid_records_total", (("source", "recorder"),)) in c1
    assert value(after["channels"], "commhub_up", role="channels") == 1
    for role, samples in after.items():  # every role measures its event loop's lag
        assert value(samples, "commhub_event_loop_lag_seconds_count") > 0, role
        assert ("commhub_event_loop_lag_max_seconds", ()) in samples, role
    assert ("commhub_websocket_connections", ()) in after["channels"]
    # Every role's NATS connection counts what the three turns cost it on the bus.
    for role in split:
        for direction in ("in", "out"):
            moved = (value(after[role], "commhub_nats_messages_total", direction=direction)
                     - value(before[role], "commhub_nats_messages_total", direction=direction))
            assert moved >= 3, (role, direction, moved)

    # Every series the sample Grafana dashboard charts is served by some role.
    charted = set(re.findall(r"commhub_\w+", DASHBOARD))
    served = {name for samples in after.values() for name, _ in samples}
    assert charted - served == set()


async def test_api_health_can_be_addressed_to_one_process(split: dict[str, Hub]) -> None:
    router = split["router"]
    assert router.bus is not None
    subject = router.bus.subjects.api("health")
    for role, hub in split.items():
        reply = await router.bus.nc.request(f"{subject}.{hub.process_id}", b"", timeout=5)
        body = json.loads(reply.data)
        assert (body["role"], body["process"]) == (role, hub.process_id)
    body = json.loads((await router.bus.nc.request(
        f"{subject}.{router.process_id}", b"", timeout=5)).data)
    assert len(body["partitions"]) == 16
