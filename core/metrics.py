"""Prometheus metrics of one hub process, served on ``GET /metrics`` by every role.

Each :class:`Hub` has a registry of its own (several hubs may share a test process).
Two kinds of metrics:

* **observed** where they happen: latency histograms of the router's stages and of the
  recorder's batches, classifications by decision, workflow outcomes, and on every
  role the event loop's lag (:mod:`commhub.core.looplag`);
* **collected** at scrape time from the counters the components keep anyway
  (``RouterStats``, ``RecorderStats``, each delivery loop's ``DeliveryStats``), from the
  channels (WebSocket connections) and from the server: each durable this process
  reads, its lag (records not yet delivered plus delivered and not acked) and its
  redelivered records, refreshed every few seconds by a background task (a scrape
  never waits on NATS).

Names start with ``commhub_``; docs/architecture.md lists them, docs/grafana-dashboard.json
charts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from commhub.core.looplag import LoopLagProbe

if TYPE_CHECKING:
    from commhub.core.hub import Hub

__all__ = ["CONTENT_TYPE", "HubMetrics", "StageTimer"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LAG_REFRESH_SECONDS = 5.0
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# uvloop's timers tick in milliseconds: finer buckets would only split rounding.
_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class _Lag:
    stream: str
    durable: str
    pending: int
    ack_pending: int
    redelivered: int


class HubMetrics:
    """The metrics of one process; components call the ``observe_*`` methods."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.stage_seconds = Histogram(
            "commhub_router_stage_seconds",
            "Time the router spends in each stage of a step (load, classify, decide, "
            "commit, publish) and in the whole step (total).",
            ["stage"], registry=r, buckets=_BUCKETS)
        self._stages: dict[str, Any] = {}  # stage -> its histogram child
        self.classifications = Counter(
            "commhub_classifications", "Classifications published, by decision.",
            ["decision"], registry=r)
        self.workflow_events = Counter(
            "commhub_workflow_events", "Workflow steps by workflow and kind (started, "
            "completed, failed, cancelled, expired, handoff, ...).",
            ["workflow", "kind"], registry=r)
        self.batch_seconds = Histogram(
            "commhub_recorder_batch_seconds",
            "Time the recorder takes to write and commit one batch.",
            registry=r, buckets=_BUCKETS)
        self.batch_records = Histogram(
            "commhub_recorder_batch_records", "Records in each committed batch.",
            registry=r, buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000))
        self.loop_lag_seconds = Histogram(
            "commhub_event_loop_lag_seconds",
            "How late the event loop ran a timer that was due, measured every 0.1 s: "
            "the time every task waited behind whatever held the loop (or for a core).",
            registry=r, buckets=_LAG_BUCKETS)
        self.loop_lag = LoopLagProbe(self.loop_lag_seconds.observe)
        self._lags: list[_Lag] = []
        self._hub: Hub | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._lag_probe: asyncio.Task[None] | None = None
        r.register(_Collected(self))

    def bind(self, hub: Hub) -> None:
        self._hub = hub

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- observations -------------------------------------------------------------------
    def observe_stage(self, stage: str, seconds: float) -> None:
        # The child of each stage is looked up once: labels() takes a lock and checks
        # the values on every call, half the cost of an observation (seven a step).
        child = self._stages.get(stage)
        if child is None:
            child = self._stages[stage] = self.stage_seconds.labels(stage)
        child.observe(seconds)

    def observe_classification(self, decision: str | None) -> None:
        self.classifications.labels(decision or "none").inc()

    def observe_workflow_event(self, workflow: str, kind: str) -> None:
        self.workflow_events.labels(workflow, kind).inc()

    def observe_batch(self, seconds: float, records: int) -> None:
        self.batch_seconds.observe(seconds)
        self.batch_records.observe(records)

    # -- consumer lag -------------------------------------------------------------------
    def start(self) -> None:
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="metrics-lag")
        if self._lag_probe is None:
            self._lag_probe = asyncio.create_task(self.loop_lag.run(), name="loop-lag")

    async def stop(self) -> None:
        tasks = [self._refresher, self._lag_probe]
        self._refresher = self._lag_probe = None
        for task in tasks:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _refresh_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # the bus may be away: try again later
                self._lags = await self._read_lags()
            await asyncio.sleep(LAG_REFRESH_SECONDS)

    async def _read_lags(self) -> list[_Lag]:
        hub = self._hub
        if hub is None or hub.bus is None:
            return []
        lags = []
        for stream, durable in _durables(hub):
            info = await hub.bus.js.consumer_info(stream, durable)
            lags.append(_Lag(stream, durable, int(info.num_pending or 0),
                             int(info.num_ack_pending or 0), int(info.num_redelivered or 0)))
        return lags


def _durables(hub: Hub) -> Iterator[tuple[str, str]]:
    """(stream, durable) of every durable this process reads now."""
    s = hub.settings.subjects
    if hub.router is not None:
        for k in hub.router.held_partitions:
            yield s.inputs_stream, s.partition_consumer(k)
    if hub.recorder is not None:
        for stream in (s.messages_stream, s.events_stream):
            yield stream, s.recorder_consumer(stream)
    for loop in _loops_of_channels(hub):
        yield loop.stream, loop.durable


def _loops_of_channels(hub: Hub) -> list[Any]:
    """The delivery loops the channels run (HTTP callbacks, Telegram replies, ...)."""
    from commhub.core.delivery import DeliveryLoop

    found = []
    for channel in hub.channels.values():
        for value in vars(channel).values():
            if isinstance(value, DeliveryLoop):
                found.append(value)
            elif hasattr(value, "__dict__"):
                found.extend(v for v in vars(value).values() if isinstance(v, DeliveryLoop))
    return found


class _Collected(Collector):
    """Metrics read at scrape time from the components' own counters."""

    def __init__(self, metrics: HubMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        hub = self.metrics._hub
        if hub is None:
            return
        yield from _router_metrics(hub)
        yield from _recorder_metrics(hub)
        loops: list[tuple[str, Any]] = [(loop.durable, loop) for loop in _loops_of_channels(hub)]
        if hub.router is not None:
            loops += [(loop.durable, loop) for loop in hub.router._loops.values()]
        redeliveries = CounterMetricFamily(
            "commhub_redeliveries", "Records delivered again (num_delivered > 1) to this "
            "process's delivery loops, by durable.", labels=["durable"])
        handed_back = CounterMetricFamily(
            "commhub_handed_back", "Failed attempts handed back with a delayed nak.",
            labels=["durable"])
        for durable, loop in loops:
            redeliveries.add_metric([durable], loop.stats.redelivered)
            handed_back.add_metric([durable], loop.stats.handed_back)
        yield redeliveries
        yield handed_back
        lag = GaugeMetricFamily(
            "commhub_consumer_lag", "Records of a durable this process reads that are not "
            "acked yet: not delivered (pending) or delivered and not acked (ack_pending).",
            labels=["stream", "durable", "state"])
        redelivered = GaugeMetricFamily(
            "commhub_consumer_redelivered",
            "Records of a durable delivered more than once and not acked yet.",
            labels=["stream", "durable"])
        for item in self.metrics._lags:
            lag.add_metric([item.stream, item.durable, "pending"], item.pending)
            lag.add_metric([item.stream, item.durable, "ack_pending"], item.ack_pending)
            redelivered.add_metric([item.stream, item.durable], item.redelivered)
        yield lag
        yield redelivered
        connections = GaugeMetricFamily(
            "commhub_websocket_connections", "Open WebSocket connections of this process.")
        channel = hub.channels.get("websocket")
        connections.add_metric([], getattr(channel, "connection_count", 0) if channel else 0)
        yield connections
        lag_max = GaugeMetricFamily(
            "commhub_event_loop_lag_max_seconds",
            "The largest event-loop lag of the last 10 to 20 seconds.")
        lag_max.add_metric([], self.metrics.loop_lag.largest_recent())
        yield lag_max
        up = GaugeMetricFamily("commhub_up", "1 while the process runs, by role.",
                               labels=["role"])
        up.add_metric([hub.role], 1)
        yield up
        yield from _nats_metrics(hub)


def _nats_metrics(hub: Hub) -> Iterator[Metric]:
    """The counters nats-py keeps for this process's connection: every message a turn
    costs on the bus (publishes, their acks, pull requests and their statuses, record
    deliveries and acks) shows here."""
    if hub.bus is None:  # not connected yet
        return
    stats = hub.bus.nc.stats
    messages = CounterMetricFamily(
        "commhub_nats_messages", "Messages this process's NATS connection received (in) "
        "and published (out), JetStream acks, pull requests and statuses included.",
        labels=["direction"])
    volume = CounterMetricFamily(
        "commhub_nats_bytes", "Payload bytes of those messages.", labels=["direction"])
    for direction in ("in", "out"):
        messages.add_metric([direction], stats.get(f"{direction}_msgs", 0))
        volume.add_metric([direction], stats.get(f"{direction}_bytes", 0))
    yield messages
    yield volume
    yield _counter("commhub_nats_reconnects", "Reconnects of this process's NATS connection.",
                   stats.get("reconnects", 0))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc)
    family.add_metric([], value)
    return family


def _router_metrics(hub: Hub) -> Iterator[Metric]:
    router = hub.router
    if router is None:
        return
    st = router.stats
    yield _counter("commhub_turns", "Inputs the router stepped (committed and published).",
                   st.handled)
    yield _counter("commhub_router_conflicts", "Steps recomputed after a revision conflict.",
                   st.conflicts)
    yield _counter("commhub_router_retries", "Failed steps retried.", st.retries)
    yield _counter("commhub_router_dead_letters", "Inputs given up after the last attempt.",
                   st.gave_up)
    invalid = CounterMetricFamily("commhub_invalid_records",
                                  "Records refused as invalid, by component.",
                                  labels=["source"])
    invalid.add_metric(["router"], st.invalid)
    if hub.recorder is not None:
        invalid.add_metric(["recorder"], hub.recorder.stats.invalid)
    yield invalid
    held = GaugeMetricFamily("commhub_router_partitions",
                             "Partitions of the inputs this router holds.")
    held.add_metric([], len(router.held_partitions))
    yield held


def _recorder_metrics(hub: Hub) -> Iterator[Metric]:
    active = GaugeMetricFamily("commhub_recorder_active",
                               "1 when this process is the active recorder, 0 on standby.")
    if hub.settings.role not in ("all", "recorder"):
        return
    recorder = hub.recorder
    active.add_metric([], 1 if recorder is not None else 0)
    yield active
    if recorder is None:
        return
    st = recorder.stats
    yield _counter("commhub_recorder_records", "Records in committed batches.", st.records)
    yield _counter("commhub_recorder_rows", "New rows written.", st.inserted)
    yield _counter("commhub_recorder_failures", "Batches DuckDB refused (retried).", st.failures)
    if hub.router is None:
        invalid = CounterMetricFamily("commhub_invalid_records",
                                      "Records refused as invalid, by component.",
                                      labels=["source"])
        invalid.add_metric(["recorder"], st.invalid)
        yield invalid
    pending = GaugeMetricFamily("commhub_recorder_pending", "Records not yet committed.")
    pending.add_metric([], st.pending)
    yield pending


class StageTimer:
    """Times the stages of one step: ``with timer("classify"): ...``."""

    def __init__(self, observe: Callable[[str, float], None] | None) -> None:
        self._observe = observe
        self._started = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._observe is not None:
                self._observe(stage, time.perf_counter() - start)

    def total(self) -> None:
        if self._observe is not None:
            self._observe("total", time.perf_counter() - self._started)
