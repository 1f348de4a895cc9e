"""The hub: starts every component a role needs, in order, and stops them in reverse.

``Hub.start()`` (role ``all``, embedded defaults), in this order: load and check the
workflows (a broken one stops the start before anything runs); lock the data directory;
bind the HTTP port and check the WebSocket port (so that a port in use fails at once,
not after the slow steps); start nats-server; connect the bus and create the streams
and the state bucket; subscribe the health and state APIs; start the recorder, then the
SQL service; train (or load) the classifier and start the router; start the channels;
run the plugins' startup hooks; start serving HTTP; write ``hub.json``.
``Hub.stop()`` undoes it in reverse: channels stop taking input and the HTTP server
stops, the router finishes and acks what it holds, the SQL service answers what is in
flight, the recorder commits and acks its last batch, the shutdown hooks run, the bus
drains, the server stops, the lock is released.

Roles (``--role``) run a subset against an existing NATS: ``channels``, ``router``,
``recorder``, or ``all``. Only ``all`` and ``recorder`` open the DuckDB file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp.web import Request, Response, json_response
from pydantic import ValidationError

from commhub.core.bus import Bus
from commhub.core.channel import Channel, ChannelContext
from commhub.core.classify import BatchingClassifier, Classifier, routing_threshold
from commhub.core.config import Settings
from commhub.core.engine.entities import warm_up as warm_up_entities
from commhub.core.engine.fsm import Engine
from commhub.core.leases import Leases, member_id
from commhub.core.lock import DataDirLock
from commhub.core.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from commhub.core.metrics import HubMetrics
from commhub.core.natsauth import load_or_create, redact, without_credentials
from commhub.core.natsserver import EmbeddedNats
from commhub.core.plugins import Plugins
from commhub.core.records.dashboard import mount_dashboard
from commhub.core.records.recorder import Recorder
from commhub.core.records.snapshots import LiveSandbox
from commhub.core.records.sqlservice import SqlService
from commhub.core.routing.router import Router
from commhub.core.routing.smalltalk import SmallTalk
from commhub.core.routing.store import StateStore
from commhub.core.web import WebServer, json_error, try_port
from commhub.core.widget.inbox import Inbox
from commhub.core.widget.pages import mount_widget
from commhub.core.workflow import load_workflows

__all__ = ["Hub", "HubError", "StartInterrupted"]

log = logging.getLogger(__name__)


# How the banner's router line says where the threshold comes from.
_THRESHOLD_SOURCES = {
    "fixed": "fixed",
    "calibrated": "calibrated",
    "default": "auto: the classifier has no calibration",
}


class HubError(RuntimeError):
    """The hub cannot start as configured; the message says what to fix."""


class Hub:
    """One commhub process. ``start`` and ``stop`` are called from one task."""

    def __init__(self, settings: Settings, plugins: Plugins | None = None) -> None:
        self.settings = settings
        self.plugins = plugins or Plugins.load(disabled=settings.disable_plugins)
        self.lock: DataDirLock | None = None
        self.nats: EmbeddedNats | None = None
        self.bus: Bus | None = None
        self.engine: Engine | None = None
        self.classifier: Classifier | None = None
        self.router: Router | None = None
        self.recorder: Recorder | None = None
        self.sql: SqlService | None = None
        self.channels: dict[str, Channel] = {}
        self.web: WebServer | None = None
        self.inbox: Inbox | None = None
        self.endpoints: list[str] = []
        self.nats_url: str | None = None
        self._api_subs: list[Any] = []
        self._recorder_lease: Leases | None = None
        # This process's name on the bus (leases, api.health.{process}).
        self.process_id = member_id()
        self.metrics = HubMetrics()
        self.metrics.bind(self)
        self._started = False

    @property
    def role(self) -> str:
        return self.settings.role

    def _runs(self, component: str) -> bool:
        return self.role in ("all", component)

    # -- start ------------------------------------------------------------------------
    async def start(self) -> list[str]:
        """Start everything this role runs; returns the endpoint lines to print.

        On any failure, what was already started is stopped again before the error
        propagates, so a failed start leaves no server or lock behind.
        """
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        self._started = True
        return self.endpoints

    async def _start(self) -> None:
        s = self.settings
        # A new data directory is private: it holds the records, the JetStream store and
        # the bus credentials. (An existing one keeps the mode its owner gave it.)
        s.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Check the definitions before anything starts: a broken file stops the hub
        # with its file and line, and nothing is left running.
        if self._runs("router"):
            definitions = load_workflows([*self.plugins.workflow_sources(), *s.workflow_paths])
            if "fallback" not in definitions:
                raise HubError(
                    "no workflow named 'fallback': the router needs one for messages no "
                    "workflow is confident about (is commhub.workflows.builtin disabled?)"
                )
            self.engine = Engine(definitions, tz=s.timezone)
        if self._runs("recorder") or s.embedded_nats:
            self.lock = DataDirLock(s.data_dir)
            self.lock.acquire()
        if self._runs("channels"):
            self._claim_ports()
        else:  # every role serves its probes and metrics
            self.web = WebServer(s.host, s.http_port, max_body_bytes=s.max_body_bytes)
            self.web.bind()
        if s.embedded_nats:
            # Only clients with the data directory's credentials get into the server;
            # the hub's own connection carries them, the URL shown and kept does not.
            credentials = load_or_create(s.data_dir)
            self.nats = EmbeddedNats(s.data_dir, port=s.nats_port, conf=s.nats_conf,
                                     credentials=credentials)
            self.nats_url = await self.nats.start()
            connect_url = credentials.url(self.nats_url)
            self.endpoints.append(f"nats: {self.nats_url} (embedded, store in {s.data_dir}; "
                                  "credentials: commhub nats-url)")
        else:
            assert s.nats_url is not None
            connect_url = s.nats_url
            self.nats_url = without_credentials(s.nats_url)
            self.endpoints.append(f"nats: {redact(s.nats_url)} (external)")
        self.bus = await Bus.connect(connect_url, s.subjects, name=f"commhub-{self.role}",
                                     layout=s.layout, **s.nats_options())
        if s.manage_streams:
            await self.bus.ensure_streams()
        else:
            await self.bus.check_streams()
        await self._start_apis()
        if self.web is not None:
            self._mount_probes(self.web)
        self.metrics.start()
        if self._runs("recorder"):
            # One active recorder per prefix, by lease: a second one stands by and takes
            # over within seconds of the first dying (see _activate_recorder).
            self._recorder_lease = Leases(self.bus, "recorder", ["active"],
                                          self._activate_recorder, self._deactivate_recorder,
                                          greedy=True, member=self.process_id)
            await self._recorder_lease.start()
            # Holding the lease, this process started the recorder, then the SQL service.
            state = "live SQL: commhub sql \"...\"" if self.recorder is not None else (
                "standby: another recorder is active; this one takes over if it stops")
            self.endpoints.append(f"duckdb: {s.duckdb_path} ({state})")
        if self._runs("router"):
            await self._start_router()
        if self._runs("channels"):
            await self._start_channels()
        await self.plugins.startup(self)
        if self.web is not None:
            await self.web.start()
        if self.lock is not None:
            self.lock.write_info({
                "pid": os.getpid(),
                "nats_url": self.nats_url,  # never with credentials
                "embedded": s.embedded_nats,
                "prefix": s.prefix,
                "role": self.role,
                "endpoints": self.endpoints,
            })

    async def _activate_recorder(self, _slot: str) -> None:
        """This process holds the recorder lease: open the file, catch up to the
        durables' ack floor, consume, answer SQL."""
        s = self.settings
        assert self.bus is not None
        recorder = Recorder(self.bus, s.duckdb_path, batch=s.recorder_batch,
                            flush_seconds=s.recorder_flush_seconds)
        recorder.metrics = self.metrics
        await recorder.start()
        # User SQL runs on snapshots in instances of its own, never on the writer's.
        live = LiveSandbox(recorder, s.data_dir / "snapshots", max_age=s.sql_snapshot_seconds,
                           memory_limit=s.sql_memory_limit)
        sql = SqlService(self.bus, live, max_rows=s.sql_max_rows, timeout=s.sql_timeout_seconds,
                         max_bytes=s.sql_max_result_bytes)
        try:
            await sql.start()
        except BaseException:
            await recorder.stop()
            raise
        self.recorder, self.sql = recorder, sql
        if self._started:
            log.info("this process is the active recorder now (%s)", s.duckdb_path)

    async def _deactivate_recorder(self, _slot: str, graceful: bool) -> None:
        """The lease is gone (stopping, or lost): stop answering SQL and recording."""
        if self.sql is not None:
            await _quietly(self.sql.stop, "sql service")
            self.sql = None
        if self.recorder is not None:
            await _quietly(self.recorder.stop, "recorder")
            self.recorder = None
        if not graceful:
            log.warning("lost the recorder lease: standing by")

    async def _start_router(self) -> None:
        s = self.settings
        assert self.bus is not None and self.engine is not None
        classes = self.plugins.classifiers()
        if s.classifier not in classes:
            raise HubError(
                f"classifier {s.classifier!r} is not installed; available: {sorted(classes)}"
            )
        cls = classes[s.classifier]
        settings = _plugin_settings(cls, s.plugin_settings(s.classifier), f"classifier {cls.name}")
        self.classifier = cls(settings, cache_dir=s.data_dir / "models")
        try:
            await asyncio.to_thread(self.classifier.fit, self.engine.examples())
        except (RuntimeError, ValueError, OSError) as exc:
            # A missing model file or a broken install: the message is the story; a bug
            # in a plugin raises something else and keeps its traceback.
            raise HubError(f"classifier {cls.name} cannot be trained: {exc}") from exc
        # The entity parser loads its time zone table once (about a second): now, not
        # on the first message.
        await asyncio.to_thread(warm_up_entities, s.timezone)
        try:
            threshold, source = routing_threshold(
                s.threshold, getattr(self.classifier, "threshold", None))
        except ValueError as exc:
            raise HubError(f"classifier {cls.name}: {exc}") from exc
        self.router = Router(
            self.bus,
            self.engine,
            BatchingClassifier(self.classifier),
            self.plugins,
            threshold=threshold,
            concurrency=s.router_concurrency,
            model=(self.classifier.model_id, cls.version),
            # With the server it started itself, this hub is the only router there.
            exclusive=s.embedded_nats and self.role == "all",
            clarify_margin=s.clarify_margin,
            idle_expiry=s.idle_expiry_seconds,
            cancel_phrases=s.cancel_phrases,
            restart_phrases=s.restart_phrases,
            smalltalk=SmallTalk.from_settings(s.smalltalk),
            agent_ttl=s.agent_ttl_seconds,
            handoff_needs_agent=s.handoff_needs_agent,
        )
        self.router.metrics = self.metrics
        self.router.member = self.process_id
        await self.router.start()
        self.endpoints.append(
            f"router: {len(self.engine.definitions)} workflows "
            f"({', '.join(sorted(self.engine.definitions))}), "
            f"classifier {self.classifier.model_id}, "
            f"threshold {threshold:.3f} ({_THRESHOLD_SOURCES[source]})"
        )

    def _claim_ports(self) -> None:
        """Bind the HTTP server's socket and check that the WebSocket port is free, before
        the slow steps (nats-server, DuckDB, training the classifier): a port in use stops
        the start at once with a ListenError naming the setting to change.

        The HTTP socket stays bound (the server serves on it later). The WebSocket port is
        only tried: the ``websocket`` channel binds it itself when it starts, and still
        names the setting if another process took the port meanwhile.
        """
        s = self.settings
        self.web = WebServer(s.host, s.http_port, max_body_bytes=s.max_body_bytes,
                             origins=s.origin_policy())
        self.web.bind()
        if s.ws_port and "websocket" in self.plugins.channels():
            try_port("WebSocket channel", s.host, s.ws_port, "COMMHUB_WS_PORT")

    async def _start_channels(self) -> None:
        """Mount the hub's routes on the HTTP server (bound by ``_claim_ports``), then
        start each channel (they mount routes on it too).

        The server serves only once ``_start`` has run the startup hooks too, so every
        route is in place before the first request.
        """
        assert self.bus is not None and self.web is not None
        s = self.settings
        self._mount_hub_routes(self.web)
        self.endpoints.append(f"dashboard: {self.web.url}/dashboard (SQL over HTTP: POST /v1/sql)")
        self.endpoints.append(f"widget: {self.web.url}/widget.js (demo: {self.web.url}/chat); "
                              f"agents' inbox: {self.web.url}/inbox")
        for name, cls in self.plugins.channels().items():
            settings = _plugin_settings(cls, s.plugin_settings(name), f"channel {name}")
            channel = cls(ChannelContext(name, self.bus, s, self.web), settings)
            self.endpoints.extend(await channel.start())
            self.channels[name] = channel

    def _mount_probes(self, web: WebServer) -> None:
        """``/healthz``: the process answers. ``/readyz``: started and the bus is up.
        ``/metrics``: Prometheus's text format. Every role serves them."""

        async def healthz(request: Request) -> Response:
            return json_response({"status": "ok", "role": self.role})

        async def readyz(request: Request) -> Response:
            connected = self.bus is not None and self.bus.nc.is_connected
            if not (self._started and connected):
                reason = "starting" if not self._started else "bus disconnected"
                return json_error(503, reason, "not_ready")
            return json_response({"status": "ready", "role": self.role,
                             "channels": sorted(self.channels)})

        async def metrics(request: Request) -> Response:
            body = await asyncio.to_thread(self.metrics.render)
            return Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

        web.add_get("/healthz", healthz)
        web.add_get("/readyz", readyz)
        web.add_get("/metrics", metrics)
        self.endpoints.append(f"http: {web.url} (health: /healthz, readiness: /readyz, "
                              "metrics: /metrics)")

    def _mount_hub_routes(self, web: WebServer) -> None:
        """The dashboard and SQL over HTTP (channels)."""
        assert self.bus is not None
        mount_dashboard(web, self.settings, self.bus)
        mount_widget(web, self.settings, self._ws_port)
        self.inbox = Inbox(self.bus, self.settings)
        self.inbox.mount(web)

    def _ws_port(self) -> int | None:
        """The WebSocket channel's port, once it listens (the widget connects to it)."""
        channel = self.channels.get("websocket")
        port = getattr(channel, "port", None)
        return port if isinstance(port, int) else None

    async def _start_apis(self) -> None:
        """Request/reply APIs any service can call: health and conversation state."""
        assert self.bus is not None
        bus = self.bus
        states = StateStore(bus, cache_size=0)  # answers from the bucket, never a cache

        async def health(msg: Any) -> None:
            body = {
                "status": "ok",
                "role": self.role,
                "process": self.process_id,
                "partitions": self.router.held_partitions if self.router else None,
                "router": dataclasses.asdict(self.router.stats) if self.router else None,
                "recorder": self.recorder.stats_dict() if self.recorder else None,
                "recorder_standby": self._recorder_lease is not None and self.recorder is None,
                "channels": sorted(self.channels),
            }
            await msg.respond(msgspec.json.encode(body))

        async def state(msg: Any) -> None:
            try:
                conversation = msgspec.json.decode(msg.data)["conversation"]
                stored = await states.read(conversation)
                body: Any = stored.state if stored is not None else {
                    "error": {"code": "not_found", "message": "no such conversation"}}
            except Exception as exc:  # answered, not raised
                body = {"error": {"code": "bad_request", "message": str(exc)}}
            await msg.respond(msgspec.json.encode(body))

        for name, handler in (("health", health), ("state", state)):
            self._api_subs.append(
                await bus.nc.subscribe(bus.subjects.api(name), queue=f"commhub-{name}",
                                       cb=handler)
            )
        # api.health.{process}: this process only (its id is in every health reply).
        self._api_subs.append(await bus.nc.subscribe(
            f"{bus.subjects.api('health')}.{self.process_id}", cb=health))

    # -- stop -------------------------------------------------------------------------
    async def stop(self) -> None:
        """Stop in reverse order; safe after a partial start and safe to call twice."""
        for name, channel in list(self.channels.items()):
            await _quietly(channel.stop, f"channel {name}")
            await _quietly(channel.ctx.close, f"channel {name} outbound")
        self.channels.clear()
        if self.web is not None:
            await _quietly(self.web.stop, "http server")
            self.web = None
        if self.inbox is not None:
            await _quietly(self.inbox.stop, "inbox")
            self.inbox = None
        if self.router is not None:
            await _quietly(self.router.stop, "router")
            self.router = None
        if self._recorder_lease is not None:
            await _quietly(self._recorder_lease.stop, "recorder lease")  # hands over
            self._recorder_lease = None
        if self.sql is not None:
            await _quietly(self.sql.stop, "sql service")
            self.sql = None
        if self.recorder is not None:
            await _quietly(self.recorder.stop, "recorder")
            self.recorder = None
        if self._started:
            await _quietly(lambda: self.plugins.shutdown(self), "plugin shutdown")
            self._started = False
        await _quietly(self.metrics.stop, "metrics")
        for sub in self._api_subs:
            await _quietly(sub.unsubscribe, "api")
        self._api_subs.clear()
        if self.bus is not None:
            await _quietly(self.bus.close, "bus")
            self.bus = None
        if self.nats is not None:
            await asyncio.to_thread(self.nats.stop)
            self.nats = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    async def run_until_signalled(self, on_ready: Callable[[list[str]], None]) -> None:
        """Start, call ``on_ready`` with the endpoint lines, run until SIGINT/SIGTERM, stop.

        A signal during the start cancels it wherever it is (connecting, training the
        classifier, binding consumers): what already started is stopped, and
        :class:`StartInterrupted` says which signal it was.
        """
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        received: list[int] = []
        starting: asyncio.Task[list[str]] | None = None

        def on_signal(sig: int) -> None:
            received.append(sig)
            stop.set()
            if starting is not None and not starting.done():
                starting.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            starting = asyncio.create_task(self.start(), name="hub-start")
            try:
                lines = await starting
            except asyncio.CancelledError:
                if received and starting.cancelled():
                    raise StartInterrupted(received[0]) from None
                raise
            on_ready(lines)
            await stop.wait()
            log.info("stopping: draining and acking what is in flight")
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.stop()


class StartInterrupted(Exception):
    """SIGINT or SIGTERM arrived while the hub was starting; it was stopped again."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} while starting")


def _plugin_settings(cls: type, raw: dict[str, Any], what: str) -> Any:
    model = getattr(cls, "Settings", None)
    if model is None:
        if raw:
            raise HubError(f"{what} takes no settings, but [plugins] gives {sorted(raw)}")
        return None
    try:
        return model(**raw)
    except ValidationError as exc:
        raise HubError(f"{what}: invalid settings:\n{exc}") from None


async def _quietly(step: Callable[[], Any], what: str) -> None:
    try:
        await step()
    except Exception:
        log.exception("%s did not stop cleanly", what)

