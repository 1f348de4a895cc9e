"""The JetStream objects a hub needs, how many replicas they have and where, and how an
existing one is brought up to date without undoing an operator's changes.

Objects (names use the prefix):

================  =====================  ==============================================
kind              name                   holds
================  =====================  ==============================================
stream            ``{p}_messages``       ``in``, ``out`` and ``wf`` records
stream            ``{p}_events``         ``evt`` records
stream            ``{p}_inputs``         ``in`` and ``wf`` copied from ``{p}_messages``
                                         by the server, their subjects partitioned by
                                         conversation: ``{p}.part.{k}.in.{ch}.{conv}``
KV bucket         ``{p}_state``          conversation states
KV bucket         ``{p}_owners``         conversation owners
KV bucket         ``{p}_agents``         human agents' heartbeats (TTL, in memory)
KV bucket         ``{p}_leases``         router partitions and the active recorder (TTL,
                                         in memory)
================  =====================  ==============================================

Two ways to use it:

* :func:`reconcile` (every start, unless ``manage_streams`` is off): creates what is
  missing with the settings' replicas and placement; brings an existing stream's
  commhub-owned fields (subjects, duplicate window, direct gets, sources) up to date and
  keeps everything else as it is, replicas, placement and limits included, so that what
  an operator changed on purpose (``nats stream edit --replicas 3``) survives a restart.
  A bucket that exists is used as it is.
* :func:`apply` (``commhub streams apply``, an admin step with rights to create
  streams): the same, and also sets every object's replicas and placement to the
  settings'. Roles can then run with ``manage_streams = false`` and no create rights.

A cluster that cannot hold what is asked (3 replicas on 1 server, tags no server has)
is a :class:`StreamSetupError` with one line naming the object, the replicas and the
placement, and the server's reason.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    Placement,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamSource,
    SubjectTransform,
)
from nats.js.errors import APIError, NotFoundError

from commhub.core.subjects import Subjects

if TYPE_CHECKING:
    from nats.js import JetStreamContext

__all__ = [
    "DEFAULT_PARTITIONS",
    "LEASE_TTL_SECONDS",
    "Layout",
    "StreamSetupError",
    "apply",
    "bucket_configs",
    "partitions_of",
    "reconcile",
    "stream_configs",
]

log = logging.getLogger(__name__)

# How long JetStream remembers a Nats-Msg-Id (see core/bus.py).
DUPLICATE_WINDOW_SECONDS = 15 * 60
#: Partitions of the inputs stream when it is created (fixed from then on).
DEFAULT_PARTITIONS = 16
#: A lease (a router's partition, the active recorder) lasts this long unless renewed.
LEASE_TTL_SECONDS = 6.0

_PARTITION_RE = re.compile(r"\{\{\s*partition\(\s*(\d+)\s*,")


class StreamSetupError(RuntimeError):
    """A stream or bucket cannot be made as the settings ask; one line saying why."""


@dataclass(frozen=True)
class Layout:
    """Replicas and placement of every stream and bucket, and the inputs' partitions."""

    replicas: int = 1
    placement_tags: tuple[str, ...] = ()
    placement_cluster: str | None = None
    partitions: int = DEFAULT_PARTITIONS
    agent_ttl: float = 30.0

    @property
    def placement(self) -> Placement | None:
        if not self.placement_tags and not self.placement_cluster:
            return None
        return Placement(cluster=self.placement_cluster,
                         tags=list(self.placement_tags) or None)

    def describe(self) -> str:
        where = []
        if self.placement_cluster:
            where.append(f"cluster {self.placement_cluster}")
        if self.placement_tags:
            where.append(f"tags {', '.join(self.placement_tags)}")
        return f"{self.replicas} replica{'s' if self.replicas != 1 else ''}" + (
            f" ({'; '.join(where)})" if where else "")


def stream_configs(s: Subjects, layout: Layout, *, inputs_start: int | None = None
                   ) -> list[StreamConfig]:
    """The three streams as the settings want them. ``inputs_start``: the messages
    stream's sequence the inputs stream starts copying at (None: its beginning)."""
    common = {
        "retention": RetentionPolicy.LIMITS,
        "storage": StorageType.FILE,
        "discard": DiscardPolicy.OLD,
        "duplicate_window": DUPLICATE_WINDOW_SECONDS,
        "num_replicas": layout.replicas,
        "placement": layout.placement,
    }
    n = layout.partitions
    p = s.prefix
    return [
        StreamConfig(
            name=s.messages_stream,
            description="commhub conversation messages: in, out and workflow inputs",
            subjects=[s.all_inbound, s.all_outbound, s.all_workflow_input],
            # Channels read a conversation's history with direct gets (no consumer
            # per reader: nats-server allows only so many consumers per stream).
            allow_direct=True,
            **common,  # type: ignore[arg-type]
        ),
        StreamConfig(
            name=s.events_stream,
            description="commhub events: classifications, workflow and channel events",
            subjects=[s.all_events],
            allow_direct=False,
            **common,  # type: ignore[arg-type]
        ),
        StreamConfig(
            name=s.inputs_stream,
            description=f"commhub router inputs: in and wf, copied from "
                        f"{s.messages_stream} into {n} partitions by conversation",
            sources=[StreamSource(
                name=s.messages_stream,
                opt_start_seq=inputs_start,
                subject_transforms=[
                    SubjectTransform(
                        src=f"{p}.in.*.*",
                        dest=f"{p}.part.{{{{partition({n},2)}}}}.in."
                             "{{wildcard(1)}}.{{wildcard(2)}}"),
                    SubjectTransform(
                        src=f"{p}.wf.*",
                        dest=f"{p}.part.{{{{partition({n},1)}}}}.wf.{{{{wildcard(1)}}}}"),
                ],
            )],
            allow_direct=False,
            **{**common, "retention": RetentionPolicy.WORK_QUEUE},  # type: ignore[arg-type]
        ),
    ]


def bucket_configs(s: Subjects, layout: Layout) -> list[KeyValueConfig]:
    """The KV buckets as the settings want them."""
    common = {"replicas": layout.replicas, "placement": layout.placement, "history": 1}
    return [
        KeyValueConfig(
            bucket=s.state_bucket,
            description="commhub conversation state: workflow, state, slots, run id",
            storage=StorageType.FILE,
            direct=True,  # plain gets need no extra permissions, and are faster
            **common,  # type: ignore[arg-type]
        ),
        KeyValueConfig(
            bucket=s.owners_bucket,
            description="commhub conversation owners: who started each one",
            storage=StorageType.FILE,
            direct=True,
            **common,  # type: ignore[arg-type]
        ),
        KeyValueConfig(
            bucket=s.agents_bucket, description="commhub human agents' heartbeats",
            ttl=layout.agent_ttl, storage=StorageType.MEMORY, direct=True,
            **common,  # type: ignore[arg-type]
        ),
        KeyValueConfig(
            bucket=s.leases_bucket,
            description="commhub leases: router partitions, the active recorder",
            ttl=LEASE_TTL_SECONDS, storage=StorageType.MEMORY, direct=True,
            **common,  # type: ignore[arg-type]
        ),
    ]


def partitions_of(config: StreamConfig) -> int | None:
    """The partition count written in an inputs stream's transforms."""
    for source in config.sources or []:
        for transform in source.subject_transforms or []:
            found = _PARTITION_RE.search(transform.dest)
            if found:
                return int(found[1])
    return None


# Fields commhub owns on a stream: brought up to date on every start. All the others
# (replicas, placement, limits, ...) are the operator's once the stream exists.
_OWNED = ("subjects", "duplicate_window", "allow_direct", "description", "discard")


async def reconcile(js: JetStreamContext, s: Subjects, layout: Layout) -> list[str]:
    """Create what is missing, update commhub-owned fields of what exists; returns one
    line per object that changed. Never changes an existing object's replicas."""
    return await _setup(js, s, layout, force_layout=False)


async def apply(js: JetStreamContext, s: Subjects, layout: Layout) -> list[str]:
    """:func:`reconcile`, and set every object's replicas and placement to ``layout``'s;
    returns one line per object saying what it is now."""
    return await _setup(js, s, layout, force_layout=True)


async def check(js: JetStreamContext, s: Subjects) -> None:
    """Raise :class:`StreamSetupError` unless every stream and bucket exists (for
    processes that do not manage them)."""
    names = [s.messages_stream, s.events_stream, s.inputs_stream,
             *(f"KV_{b.bucket}" for b in bucket_configs(s, Layout()))]
    for name in names:
        try:
            await js.stream_info(name)
        except NotFoundError:
            raise StreamSetupError(
                f"stream {name} does not exist and manage_streams is off: run `commhub "
                "streams apply` once with rights to create streams") from None


async def _setup(js: JetStreamContext, s: Subjects, layout: Layout, *, force_layout: bool
                 ) -> list[str]:
    lines: list[str] = []
    for wanted in stream_configs(s, layout):
        try:
            info = await js.stream_info(wanted.name or "")
        except NotFoundError:
            info = None
        if info is None:
            if wanted.name == s.inputs_stream:
                start = await _upgrade_start(js, s)
                if start is not None:
                    # An upgrade: copy what the old shared router durable has not
                    # acked yet, not the history it handled.
                    wanted = _with_inputs_start(wanted, start)
            await _create(js, wanted, layout)
            lines.append(f"{wanted.name}: created with {layout.describe()}")
            continue
        have = info.config
        if wanted.name == s.inputs_stream:
            existing = partitions_of(have)
            if existing is not None and existing != layout.partitions:
                log.warning("%s has %d partitions, settings say %d: kept %d (the count is "
                            "fixed when the stream is created)", wanted.name, existing,
                            layout.partitions, existing)
            # Sources are fixed at creation (changing them would copy history again).
            wanted = dataclasses.replace(wanted, sources=have.sources)
        update = dataclasses.replace(have, **{f: getattr(wanted, f) for f in _OWNED})
        if force_layout:
            update = dataclasses.replace(update, num_replicas=layout.replicas,
                                         placement=layout.placement or have.placement)
        elif (have.num_replicas or 1) != layout.replicas:
            log.warning("%s has %d replicas, settings say %d: left as it is (`commhub "
                        "streams apply` changes it)", wanted.name, have.num_replicas or 1,
                        layout.replicas)
        if _differs(have, update):
            await _update(js, update, layout)
            lines.append(f"{wanted.name}: updated ({_changes(have, update)})")
        elif force_layout:
            lines.append(f"{wanted.name}: unchanged ({layout.describe()})")
    for bucket in bucket_configs(s, layout):
        lines.extend(await _bucket(js, bucket, layout, force_layout))
    try:
        # Releases before partitions read in and wf with one durable on the messages
        # stream; the inputs stream replaces it.
        await js.delete_consumer(s.messages_stream, s.router_consumer)
        lines.append(f"{s.router_consumer}: deleted (replaced by the partitioned inputs)")
    except NotFoundError:
        pass
    return lines


async def _upgrade_start(js: JetStreamContext, s: Subjects) -> int | None:
    """Where the inputs stream starts copying when a release before partitions ran on
    this prefix (its shared durable ``{p}_router`` exists): after that durable's ack
    floor. None (from the beginning) for a new deployment."""
    try:
        info = await js.consumer_info(s.messages_stream, s.router_consumer)
    except NotFoundError:
        return None
    floor = info.ack_floor.stream_seq if info.ack_floor else 0
    log.info("upgrading from a shared router durable: the inputs start after its ack "
             "floor, %d", floor)
    return floor + 1


def _with_inputs_start(config: StreamConfig, start: int) -> StreamConfig:
    sources = [dataclasses.replace(src, opt_start_seq=start) for src in config.sources or []]
    return dataclasses.replace(config, sources=sources)


def _differs(have: StreamConfig, want: StreamConfig) -> bool:
    return have.as_dict() != want.as_dict()


def _changes(have: StreamConfig, want: StreamConfig) -> str:
    a, b = have.as_dict(), want.as_dict()
    return ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k))[:300]


async def reconcile_bucket(js: JetStreamContext, config: KeyValueConfig, layout: Layout
                           ) -> list[str]:
    """Create one bucket if it does not exist; an existing one is used as it is."""
    return await _bucket(js, config, layout, force_layout=False)


async def _bucket(js: JetStreamContext, config: KeyValueConfig, layout: Layout,
                  force_layout: bool) -> list[str]:
    stream = f"KV_{config.bucket}"
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        info = None
    if info is None:
        try:
            await js.create_key_value(config)
        except APIError as exc:
            if exc.err_code == 10058:  # made meanwhile by another process: use it
                return []
            raise _setup_error(config.bucket, "bucket", layout, exc) from None
        return [f"{config.bucket}: created with {layout.describe()}"]
    have = info.config
    if not force_layout:
        if (have.num_replicas or 1) != layout.replicas:
            log.warning("bucket %s has %d replicas, settings say %d: left as it is "
                        "(`commhub streams apply` changes it)", config.bucket,
                        have.num_replicas or 1, layout.replicas)
        return []
    update = dataclasses.replace(have, num_replicas=layout.replicas,
                                 placement=layout.placement or have.placement)
    if not _differs(have, update):
        return [f"{config.bucket}: unchanged ({layout.describe()})"]
    await _update(js, update, layout, what="bucket", shown=config.bucket)
    return [f"{config.bucket}: updated ({_changes(have, update)})"]


async def _create(js: JetStreamContext, config: StreamConfig, layout: Layout) -> None:
    try:
        await js.add_stream(config)
    except APIError as exc:
        if exc.err_code == 10058:  # made meanwhile by another process
            return
        raise _setup_error(config.name or "", "stream", layout, exc) from None


async def _update(js: JetStreamContext, config: StreamConfig, layout: Layout,
                  what: str = "stream", shown: str | None = None) -> None:
    try:
        await js.update_stream(config)
    except APIError as exc:
        raise _setup_error(shown or config.name or "", what, layout, exc) from None


def _setup_error(name: str, what: str, layout: Layout, exc: APIError) -> StreamSetupError:
    reason = (exc.description or str(exc)).strip()
    hint = ""
    if layout.replicas > 1 or layout.placement is not None:
        hint = (f" (does the cluster have {layout.replicas} JetStream servers"
                f"{' with those tags' if layout.placement_tags else ''}? set replicas "
                "(COMMHUB_REPLICAS) to what it can hold)")
    return StreamSetupError(
        f"cannot set up {what} {name} with {layout.describe()}: {reason} "
        f"(err {exc.err_code}){hint}")
