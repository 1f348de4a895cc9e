"""The ``commhub`` command.

``commhub up`` runs a hub; ``commhub sql`` queries its records (over the bus while it
runs, from the DuckDB file when it is stopped); ``commhub export`` writes them as
day-partitioned Parquet; ``commhub rebuild`` replays the streams into a fresh DuckDB
file (hub stopped); ``commhub nats-url`` prints the running hub's NATS URL with its
credentials; ``commhub schema`` prints the envelope's
JSON Schema; ``commhub token`` mints a signed client token; ``commhub plugins`` lists
plugins; ``commhub workflows check|list|graph`` checks (and warns about), lists and
draws workflows; ``commhub test`` runs conversation test files (in process, or against
a hub with ``--hub``); ``commhub try`` shows how texts would be routed; ``commhub shell``
chats with a running hub. Every error a user can
cause ends in one ``commhub: error: ...`` line and exit status 1; bad command-line usage
and a config file that is missing or not valid TOML exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

__all__ = ["main"]


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file (or COMMHUB_CONFIG)")
    parser.add_argument("--data-dir", type=Path, help="data directory (COMMHUB_DATA_DIR)")
    parser.add_argument("--nats-url", help="use this NATS instead of the embedded server")
    parser.add_argument("--prefix", help="subject prefix (default commhub)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="commhub", description="A message hub for conversations over NATS JetStream."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"commhub {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the hub (embedded NATS unless --nats-url)")
    _settings_flags(up)
    up.add_argument("--role", choices=["all", "channels", "router", "recorder"])
    up.add_argument("--host", help="interface the channels listen on (default 127.0.0.1)")
    up.add_argument("--nats-port", type=int, help="embedded NATS port (0: any free port)")
    up.add_argument("--ws-port", type=int, help="WebSocket port (0: any free port)")
    up.add_argument("--http-port", type=int, help="HTTP port")
    up.add_argument("--workflows", type=Path, action="append", dest="workflow_paths",
                    help="extra workflow file or folder (repeatable)")

    sql = sub.add_parser("sql", help="run a read-only SQL query on the records")
    _settings_flags(sql)
    sql.add_argument("query", help='one SELECT statement, e.g. "SELECT * FROM messages"')
    sql.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    sql.add_argument("--output", type=Path, help="write to FILE instead of stdout "
                     "(needed for parquet)")
    sql.add_argument("--max-rows", type=int, default=None)
    sql.add_argument("--timeout", type=float, default=None, help="seconds")

    rebuild = sub.add_parser("rebuild", help="replay the streams into a fresh DuckDB file "
                             "and swap it in (the hub must be stopped)")
    _settings_flags(rebuild)

    export = sub.add_parser("export", help="export the records as Parquet, partitioned by day")
    _settings_flags(export)
    export.add_argument("directory", type=Path, help="where to write <table>/day=.../*.parquet")
    export.add_argument("--format", choices=["parquet"], default="parquet")

    nats_url = sub.add_parser("nats-url", help="print the running hub's NATS URL with "
                              "its credentials, for local scripts (keep it secret)")
    nats_url.add_argument("--config", help="TOML config file (or COMMHUB_CONFIG)")
    nats_url.add_argument("--data-dir", type=Path, help="data directory (COMMHUB_DATA_DIR)")

    streams = sub.add_parser("streams", help="manage the JetStream streams and buckets")
    streams_sub = streams.add_subparsers(dest="streams_command", required=True)
    apply = streams_sub.add_parser(
        "apply", help="create the streams and buckets, and set their replicas and "
        "placement to the settings' (an admin step: roles then need no create rights)")
    _settings_flags(apply)

    sub.add_parser("schema", help="print the JSON Schema of the bus envelope")

    token = sub.add_parser("token", help="print a signed client token (needs token_secret)")
    token.add_argument("--config", help="TOML config file (or COMMHUB_CONFIG)")
    token.add_argument("--user", required=True, help="the user id the token speaks for")
    token.add_argument("--conversation", help="bind the token to this conversation too")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires")
    plugins = sub.add_parser("plugins", help="list plugins, their versions, origins and hooks")
    plugins.add_argument("--config", help="TOML config file (its disable_plugins)")

    wf = sub.add_parser("workflows", help="check or list workflows")
    wf_sub = wf.add_subparsers(dest="workflows_command", required=True)
    check = wf_sub.add_parser("check", help="check workflow files or folders (errors fail; "
                              "warnings about examples do not)")
    check.add_argument("paths", type=Path, nargs="+")
    check.add_argument("--config", help="TOML config file (classifier, threshold, "
                       "disable_plugins)")
    check.add_argument("--no-overlap", action="store_true", help="skip the overlap check, "
                       "which trains the classifier on the examples (a few seconds)")
    listing = wf_sub.add_parser("list", help="list the installed workflows")
    listing.add_argument("--config", help="TOML config file (its disable_plugins)")
    asks = wf_sub.add_parser("asks", help="print the subjects the installed workflows' "
                             "`ask` states request, one a line (the router's NATS user "
                             "must be allowed to publish on them)")
    asks.add_argument("--config", help="TOML config file (its disable_plugins)")
    asks.add_argument("--workflows", type=Path, action="append", dest="workflow_paths",
                      default=[], help="also load this workflow file or folder (repeatable)")
    graph = wf_sub.add_parser("graph", help="print a workflow's state graph (Mermaid or DOT)")
    graph.add_argument("--config", help="TOML config file (its disable_plugins)")
    graph.add_argument("name", help="an installed workflow, or one from --workflows")
    graph.add_argument("--format", choices=["mermaid", "dot"], default="mermaid")
    graph.add_argument("--workflows", type=Path, action="append", dest="workflow_paths",
                       default=[], help="also load this workflow file or folder (repeatable)")

    test = sub.add_parser("test", help="run conversation test files (in process, or "
                          "against a running hub with --hub)")
    _settings_flags(test)
    test.add_argument("paths", type=Path, nargs="+", help="test files or folders (*.yaml)")
    test.add_argument("--workflows", type=Path, action="append", dest="workflow_paths",
                      help="extra workflow file or folder (repeatable)")
    test.add_argument("--hub", metavar="URL", help="run against a running hub's WebSocket "
                      "channel (ws://HOST:PORT) instead of in process")
    test.add_argument("--token", help="client token for --hub")
    test.add_argument("--junit", type=Path, metavar="FILE", help="also write JUnit XML")
    test.add_argument("-k", dest="select", metavar="TEXT",
                      help="only the tests whose name contains TEXT")

    shell = sub.add_parser("shell", help="chat with a running hub from the terminal")
    _settings_flags(shell)
    shell.add_argument("--hub", metavar="URL", help="the hub's WebSocket channel "
                       "(ws://HOST:PORT); default: the local hub of the data directory")
    shell.add_argument("--token", help="client token")
    shell.add_argument("--conversation", help="conversation id (default: a new one)")
    shell.add_argument("--user", default="shell", help="user id (default: shell)")
    shell.add_argument("--explain", action="store_true", help="show the router's "
                       "classification of each message (read from the bus: needs its NATS "
                       "URL, which the local hub's hub.json has)")

    try_ = sub.add_parser("try", help="show how the classifier ranks texts and what the "
                          "router would do with each")
    try_.add_argument("--config", help="TOML config file (or COMMHUB_CONFIG)")
    try_.add_argument("--data-dir", type=Path, help="data directory (its models/ cache)")
    try_.add_argument("--workflows", type=Path, action="append", dest="workflow_paths",
                      help="extra workflow file or folder (repeatable)")
    try_.add_argument("texts", nargs="+", metavar="TEXT", help="what a user might write")

    bench = sub.add_parser("bench", help="measure a component")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    classifier = bench_sub.add_parser(
        "classifier", help="evaluate a classifier plugin on a CLINC150-format JSON data set")
    classifier.add_argument("--config", help="TOML config file ([plugins.NAME] settings)")
    from commhub.plugins.evaluate import add_arguments

    add_arguments(classifier)
    return parser


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("commhub")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _load_settings(args: argparse.Namespace) -> Any:
    from commhub.core.config import load_settings

    keys = ("data_dir", "nats_url", "prefix", "role", "host", "nats_port", "ws_port",
            "http_port", "workflow_paths")
    overrides = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    return load_settings(getattr(args, "config", None), **overrides)


def _load_plugins(args: argparse.Namespace) -> Any:
    """The plugins, minus the settings' ``disable_plugins`` (environment or config file;
    ``workflows graph --workflows`` is not the ``workflow_paths`` setting)."""
    from commhub.core.config import load_settings
    from commhub.core.plugins import Plugins

    settings = load_settings(getattr(args, "config", None))
    return Plugins.load(disabled=settings.disable_plugins)


# -- commands -------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    settings = _load_settings(args)
    _try_ports(settings)
    from commhub.core.gcpolicy import settle_after_start
    _reach_nats(settings)
    from commhub.core.hub import Hub, StartInterrupted

    hub = Hub(settings)

    def ready(lines: list[str]) -> None:
        # What the start made lives as long as the process: out of the collector's
        # reach, so that a full collection no longer stalls the loop (core/gcpolicy.py).
        settle_after_start()
        print("commhub is up. Serving:", flush=True)
        for line in lines:
            print(f"  {line}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)

    runner = asyncio.Runner(loop_factory=_fast_loop_factory())
    try:
        runner.run(hub.run_until_signalled(ready))
    except StartInterrupted as exc:
        # Everything the start had made is stopped. A worker thread may still be busy
        # (training the classifier) and would hold up the interpreter's exit: leave now.
        print(f"commhub: stopped: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + exc.signum)
    finally:
        runner.close()
    print("commhub stopped.", flush=True)
    return 0


def _try_ports(settings: Any) -> None:
    """A port in use fails ``commhub up`` at once, naming the setting to change: before
    the hub is even imported (its plugins import scikit-learn) and before it starts
    nats-server and trains the classifier. The hub checks again as it starts. A hub that
    already runs on the data directory is left to the lock to report."""
    from commhub.core.lock import hub_is_running
    from commhub.core.web import try_port

    if hub_is_running(settings.data_dir):
        return
    try_port("HTTP server", settings.host, settings.http_port, "COMMHUB_HTTP_PORT")
    if settings.role not in ("all", "channels"):
        return  # the other roles serve only their probes and metrics
    if "commhub.channels.websocket" not in settings.disable_plugins:
        try_port("WebSocket channel", settings.host, settings.ws_port, "COMMHUB_WS_PORT")


def _reach_nats(settings: Any) -> None:
    """An external NATS server that does not answer, or refuses the login, fails ``commhub
    up`` before the hub is imported: its plugins import scikit-learn, seconds of a loaded
    machine's CPU that would otherwise come before the connect's own deadline (5 s). A
    SIGINT or SIGTERM meanwhile ends the start as it does later (exit 128 + signal).
    One connection, closed again at once; the hub makes its own."""
    if settings.embedded_nats:
        return
    import signal

    from commhub.core import natsconnect

    received: list[int] = []

    async def reach() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(sig: int) -> None:
            received.append(sig)
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            nc = await natsconnect.connect(settings.nats_url, name="commhub-up-check",
                                           **settings.nats_options())
            await nc.close()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        asyncio.run(reach())
    except asyncio.CancelledError:
        if not received:
            raise
        name = signal.Signals(received[0]).name
        print(f"commhub: stopped: {name} while starting", file=sys.stderr, flush=True)
        raise SystemExit(128 + received[0]) from None


def _fast_loop_factory() -> Any:
    """uvloop's event loop where it is installed: the hub spends much of its time in the
    loop's own machinery, which uvloop runs in C (libuv)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def cmd_sql(args: argparse.Namespace) -> int:
    from commhub.core.records.formats import format_result, write_parquet
    from commhub.core.records.sqlclient import query_file

    if args.format == "parquet" and args.output is None:
        raise _UserError("--format parquet writes a file: add --output FILE")
    settings = _load_settings(args)
    max_rows = args.max_rows or settings.sql_max_rows
    timeout = args.timeout or settings.sql_timeout_seconds
    url, prefix = _hub_bus(settings)
    if url is not None:
        result = asyncio.run(_sql_over_bus(url, prefix, args.query, max_rows, timeout,
                                           settings.nats_options()))
    else:
        if not settings.duckdb_path.exists():
            raise _UserError(f"no records yet: {settings.duckdb_path} does not exist "
                             "(start the hub with `commhub up` first)")
        result = query_file(settings.duckdb_path, args.query, max_rows, timeout,
                            memory_limit=settings.sql_memory_limit,
                            max_bytes=settings.sql_max_result_bytes)
    if args.format == "parquet":
        write_parquet(result, args.output)
        print(f"{len(result.rows)} rows written to {args.output}", file=sys.stderr)
    elif args.output is not None:
        args.output.write_text(format_result(result, args.format) + "\n")
    else:
        print(format_result(result, args.format))
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from commhub.core.records.progress import Progress, ProgressBar
    from commhub.core.records.rebuild import rebuild

    settings = _load_settings(args)
    bar = ProgressBar(sys.stderr, "rebuild", Progress(0))
    report = asyncio.run(rebuild(settings, progress=lambda done, total: bar.show(done, total)))
    bar.finish(report.records)
    rows = ", ".join(f"{table} {n:,}" for table, n in report.rows.items() if n)
    print(f"rebuilt {report.path} from {report.records:,} records in {report.seconds:.1f} s"
          f" ({rows or 'no rows'})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from commhub.core.records.export import export_parquet

    settings = _load_settings(args)
    url, prefix = _hub_bus(settings)

    def done(table: str, rows: int) -> None:
        print(f"  {table}: {rows:,} rows", file=sys.stderr)

    if url is None:  # no hub: the file itself
        counts = export_parquet(settings.duckdb_path, args.directory, on_table=done)
    else:  # a running hub lends us its snapshot while we read it
        counts = asyncio.run(_export_over_bus(url, prefix, args.directory, done,
                                              settings.nats_options()))
    print(f"exported {sum(counts.values()):,} rows of {len(counts)} tables to {args.directory}")
    return 0


async def _connect(url: str, options: dict[str, Any] | None = None) -> Any:
    """A connection for one command (comma-separated servers allowed); no server within
    the deadline or a refused login is one error line (the URL without its password)."""
    from commhub.core.natsconnect import connect

    return await connect(url, name="commhub-cli", **(options or {}))


async def _export_over_bus(
    url: str, prefix: str, directory: Path, done: Callable[[str, int], None],
    options: dict[str, Any] | None = None,
) -> dict[str, int]:
    from commhub.core.records.export import export_parquet
    from commhub.core.records.sqlclient import leased_snapshot
    from commhub.core.subjects import Subjects

    nc = await _connect(url, options)
    try:
        async with leased_snapshot(nc, Subjects(prefix)) as path:
            if not path.is_file():
                raise _UserError(f"the hub's snapshot is at {path}, which is not on this "
                                 "machine: run commhub export where the hub runs")
            return await asyncio.to_thread(export_parquet, path, directory, done)
    finally:
        await nc.close()


async def _sql_over_bus(url: str, prefix: str, query: str, max_rows: int, timeout: float,
                        options: dict[str, Any] | None = None) -> Any:
    from commhub.core.records.sqlclient import query_over_bus
    from commhub.core.subjects import Subjects

    nc = await _connect(url, options)
    try:
        return await query_over_bus(nc, Subjects(prefix), query, timeout=timeout + 5,
                                    max_rows=max_rows)
    finally:
        await nc.close()


def _hub_bus(settings: Any) -> tuple[str | None, str]:
    """The NATS URL and prefix to reach the hub over the bus: ``nats_url`` when set, else
    those of the hub running on the data directory, with its embedded server's
    credentials; ``(None, prefix)`` when no hub runs there."""
    from commhub.core.lock import hub_is_running, read_hub_info
    from commhub.core.natsauth import read_credentials

    if settings.nats_url is not None:
        return settings.nats_url, settings.prefix
    if not hub_is_running(settings.data_dir):
        return None, settings.prefix
    info = read_hub_info(settings.data_dir) or {}
    url, prefix = info.get("nats_url"), info.get("prefix", settings.prefix)
    credentials = read_credentials(settings.data_dir) if info.get("embedded") else None
    if url is not None and credentials is not None:
        url = credentials.url(url)
    return url, prefix


def cmd_nats_url(args: argparse.Namespace) -> int:
    settings = _load_settings(args)
    url, _ = _hub_bus(settings)
    if url is None:
        raise _UserError(f"no hub is running on {settings.data_dir}: start it with "
                         "`commhub up` (the URL names the port it took)")
    print(url)
    return 0


def cmd_streams(args: argparse.Namespace) -> int:
    from commhub.core.bus import Bus

    settings = _load_settings(args)
    url, prefix = _hub_bus(settings)
    if url is None:
        raise _UserError("no NATS to apply to: give --nats-url (or start the hub)")

    async def apply() -> list[str]:
        from commhub.core import streams
        from commhub.core.subjects import Subjects

        bus = await Bus.connect(url, Subjects(prefix), name="commhub-streams",
                                layout=settings.layout, **settings.nats_options())
        try:
            return await streams.apply(bus.js, bus.subjects, bus.layout)
        finally:
            await bus.close()

    for line in asyncio.run(apply()):
        print(line)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from commhub.core.envelope import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from commhub.core.subjects import valid_token
    from commhub.core.tokens import mint

    settings = _load_settings(args)
    if settings.token_secret is None:
        raise _UserError("no token_secret configured (set COMMHUB_TOKEN_SECRET or token_secret)")
    for what in ("user", "conversation"):
        value = getattr(args, what)
        if value is not None and not valid_token(value):
            raise _UserError(f"invalid {what} {value!r}: use 1-128 letters, digits, - or _")
    if args.ttl <= 0:
        raise _UserError("--ttl must be positive")
    print(mint(settings.token_secret.get_secret_value(), args.user, args.ttl, args.conversation))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    plugins = _load_plugins(args)
    rows = [(p.name, p.version, p.origin, ", ".join(p.hooks)) for p in plugins.describe()]
    print(_table(("name", "version", "origin", "hooks"), rows))
    return 0


def cmd_workflows(args: argparse.Namespace) -> int:
    from commhub.core.workflow import load_workflows

    if args.workflows_command == "graph":
        from commhub.core.engine.graph import render_graph

        found = load_workflows([*_load_plugins(args).workflow_sources(), *args.workflow_paths])
        if args.name not in found:
            raise _UserError(f"no workflow named {args.name!r}; known: {', '.join(sorted(found))}")
        print(render_graph(found[args.name], args.format), end="")
        return 0
    if args.workflows_command == "asks":
        found = load_workflows([*_load_plugins(args).workflow_sources(), *args.workflow_paths])
        for subject in ask_subjects(found.values()):
            print(subject)
        return 0
    if args.workflows_command == "check":
        from commhub.core.engine.check import example_warnings

        definitions = load_workflows(args.paths)
        for name, definition in sorted(definitions.items()):
            print(f"ok  {name}  ({len(definition.states)} states)  {definition.source or ''}",
                  flush=True)
        warnings = [w for d in definitions.values() for w in example_warnings(d)]
        if not args.no_overlap:
            warnings.extend(_overlap_warnings(args, definitions))
        for warning in warnings:
            print(f"commhub: warning: {warning}", file=sys.stderr)
        return 0
    definitions = load_workflows(_load_plugins(args).workflow_sources())
    rows = [(name, str(len(d.states)), str(len(d.examples)), d.description)
            for name, d in sorted(definitions.items())]
    print(_table(("workflow", "states", "examples", "description"), rows))
    return 0


def ask_subjects(definitions: Iterable[Any]) -> list[str]:
    """The subjects the ``ask`` states of ``definitions`` request on, sorted, once each:
    what the router's NATS user must be allowed to publish (docs/permissions.conf)."""
    return sorted({state.ask.subject for d in definitions for state in d.states.values()
                   if state.ask is not None})


def _overlap_warnings(args: argparse.Namespace, definitions: dict[str, Any]) -> list[str]:
    """Train the configured classifier on the checked workflows' examples (not cached)
    and score every example (see ``overlap_warnings``)."""
    from commhub.core.classify import routing_threshold
    from commhub.core.config import load_settings
    from commhub.core.conversation.setup import RANKED, load_classifier
    from commhub.core.engine.check import overlap_warnings
    from commhub.core.engine.fsm import Engine
    from commhub.core.plugins import Plugins

    examples = Engine(definitions).examples()
    if len(examples) < 2:
        return []
    settings = load_settings(args.config)
    plugins = Plugins.load(disabled=settings.disable_plugins)
    classifier = load_classifier(settings, plugins, examples, cache=False)
    threshold, _ = routing_threshold(settings.threshold, classifier.threshold)
    return overlap_warnings({name: definitions[name] for name in examples},
                            lambda texts: classifier.rank(texts, RANKED), threshold)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    from commhub.plugins.evaluate import BenchDataError, run_cli

    try:
        return run_cli(args, _load_settings(args))
    except BenchDataError as exc:
        raise _UserError(str(exc)) from None


def cmd_test(args: argparse.Namespace) -> int:
    import time

    from commhub.core.conversation.report import format_report, write_junit
    from commhub.core.conversation.testfile import load_test_files

    started = time.perf_counter()
    files = load_test_files(args.paths)  # a broken file stops the run before it starts
    if args.hub is not None:
        results, ready = _test_against_hub(args, files)
    else:
        results, ready = _test_in_process(args, files)
    seconds = time.perf_counter() - started
    print(format_report(results, seconds, ready), flush=True)
    if args.junit is not None:
        write_junit(results, args.junit)
    if not results:
        raise _UserError(f"no test matches -k {args.select!r}" if args.select
                         else "no tests to run")
    return 1 if any(r.status == "failed" for r in results) else 0


def _test_in_process(args: argparse.Namespace, files: Any) -> tuple[Any, str]:
    """Run the tests in process: the hub's workflows, policy and classifier, no hub."""
    import time

    from commhub.core.conversation.runner import InProcessBackend, run_files
    from commhub.core.conversation.setup import RankCache, load_router_setup
    from commhub.core.plugins import Plugins

    settings = _load_settings(args)
    plugins = Plugins.load(disabled=settings.disable_plugins)
    setup = load_router_setup(settings, plugins)
    ranks = RankCache(setup.classifier)
    started = time.perf_counter()
    ranks.prime(text for file in files for test in file.tests for text in test.texts())
    ready = (f"classifier {setup.classifier.model_id} ready in {setup.train_seconds:.1f} s, "
             f"ranked every text in {time.perf_counter() - started:.2f} s")
    return run_files(files, InProcessBackend(setup, ranks), args.select), ready


def _test_against_hub(args: argparse.Namespace, files: Any) -> tuple[Any, str]:
    """Run the tests against a running hub over WebSocket (and NATS with --nats-url)."""
    from commhub.core.conversation.hubtest import HubBackend
    from commhub.core.conversation.runner import run_files

    settings = _load_settings(args)
    backend = HubBackend(args.hub, args.token, settings.nats_url, settings.prefix)
    try:
        results = run_files(files, backend, args.select)
    finally:
        backend.close()
    seen = ("replies, classifications, events and state" if settings.nats_url
            else "replies only: give --nats-url to check the rest")
    return results, f"against {args.hub}; {seen}"


def cmd_shell(args: argparse.Namespace) -> int:
    import secrets

    from commhub.core.conversation.hubclient import HubClient, local_hub
    from commhub.core.conversation.shell import run_shell
    from commhub.core.subjects import valid_token

    settings = _load_settings(args)
    if args.hub is not None:
        hub, nats_url, prefix = args.hub, settings.nats_url, settings.prefix
    else:
        local = local_hub(settings.data_dir)
        # The local hub's URL with its embedded server's credentials (hub.json has none).
        hub_url, _ = _hub_bus(settings)
        hub, nats_url, prefix = local.ws, args.nats_url or hub_url or local.nats_url, local.prefix
    if args.explain and not nats_url:
        raise _UserError("--explain reads the router's classifications from the bus: give "
                         "--nats-url (the local hub's hub.json has it)")
    conversation = args.conversation or f"shell-{secrets.token_hex(4)}"
    for what, value in (("conversation", conversation), ("user", args.user)):
        if not valid_token(value):
            raise _UserError(f"invalid {what} {value!r}: use 1-128 letters, digits, - or _")

    async def chat() -> int:
        client = await HubClient.open(hub, conversation, args.user, args.token, nats_url,
                                      prefix)
        try:
            return await run_shell(client, sys.stdout, explain=args.explain)
        finally:
            await client.close()

    return asyncio.run(chat())


def cmd_try(args: argparse.Namespace) -> int:
    from commhub.core.conversation.explain import explain
    from commhub.core.conversation.setup import RANKED, load_router_setup
    from commhub.core.plugins import Plugins

    settings = _load_settings(args)
    setup = load_router_setup(settings, Plugins.load(disabled=settings.disable_plugins))
    ranked = setup.classifier.rank(args.texts, RANKED)
    blocks = [explain(text, alternatives, setup.policy, setup.engine)
              for text, alternatives in zip(args.texts, ranked, strict=True)]
    print("\n\n".join(blocks))
    return 0


class _UserError(Exception):
    pass


COMMANDS = {
    "up": cmd_up,
    "sql": cmd_sql,
    "rebuild": cmd_rebuild,
    "export": cmd_export,
    "nats-url": cmd_nats_url,
    "streams": cmd_streams,
    "schema": cmd_schema,
    "token": cmd_token,
    "plugins": cmd_plugins,
    "workflows": cmd_workflows,
    "bench": cmd_bench,
    "test": cmd_test,
    "try": cmd_try,
    "shell": cmd_shell,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("nats").setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `commhub schema | head`: the reader left; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ValidationError as exc:
        print(f"commhub: error: invalid settings:\n{exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from commhub.core.config import ConfigFileError, SettingsError

        if isinstance(exc, ConfigFileError):  # like bad usage: the command cannot even run
            print(f"commhub: error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, SettingsError):
            for problem in exc.problems:
                print(f"commhub: error: {problem}", file=sys.stderr)
            return 1
        if _is_user_error(exc):
            print(f"commhub: error: {exc}", file=sys.stderr)
            return 1
        raise


def _is_user_error(exc: Exception) -> bool:
    """Errors whose message is the whole story for a user (no traceback needed)."""
    from commhub.core.conversation.hubclient import HubClientError
    from commhub.core.conversation.setup import SetupError
    from commhub.core.conversation.testfile import TestFileError
    from commhub.core.hub import HubError
    from commhub.core.lock import HubAlreadyRunning
    from commhub.core.natsauth import NatsAuthError
    from commhub.core.natsconnect import NatsConnectError
    from commhub.core.natsserver import NatsServerError
    from commhub.core.plugins import PluginError
    from commhub.core.records.export import ExportError
    from commhub.core.records.rebuild import RebuildError
    from commhub.core.records.sandbox import SqlError
    from commhub.core.records.schema import SchemaError
    from commhub.core.streams import StreamSetupError
    from commhub.core.workflow import WorkflowError

    known = (_UserError, HubError, HubAlreadyRunning, NatsServerError, PluginError,
             SqlError, SchemaError, WorkflowError, OSError, TimeoutError, RebuildError,
             ExportError, NatsAuthError, SetupError, TestFileError, HubClientError,
             NatsConnectError, StreamSetupError)
    return isinstance(exc, known)


if __name__ == "__main__":
    sys.exit(main())
