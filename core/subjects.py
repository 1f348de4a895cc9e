"""Subject names, stream names and id validation: the bus's public address book.

Every subject starts with a configurable prefix (``commhub`` by default), so several
hubs, or several test cases, can share one NATS server without seeing each other.

======================================  ==========  =====================================
subject                                 stream      payload
======================================  ==========  =====================================
``{p}.in.{channel}.{conversation}``     messages    Message (user to hub)
``{p}.out.{channel}.{conversation}``    messages    Message (hub or agent to user)
``{p}.wf.{conversation}``               messages    WorkflowInput (a service's event)
``{p}.evt.classified.{conversation}``   events      Classification
``{p}.evt.workflow.{workflow}.{kind}``  events      WorkflowEvent
``{p}.evt.channel.{channel}.{kind}``    events      ChannelEvent
``{p}.evt.invalid``                     events      InvalidRecord
``{p}.api.>``                           (none)      request/reply: sql, state, health
======================================  ==========  =====================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MIN_ID_CHARS", "Subjects", "TOKEN_RE", "valid_id", "valid_token", "check_token"]

# One subject token: no dots, wildcards or whitespace, and short enough for a KV key.
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

#: The shortest id a message or workflow input may have. Its id is its ``Nats-Msg-Id``,
#: which JetStream deduplicates on across the whole stream: it must be unique (a UUID,
#: or an id derived from one), not a counter like ``1`` or ``x1``.
MIN_ID_CHARS = 16


def valid_token(value: str) -> bool:
    """True when ``value`` can be one subject token (a conversation, channel or workflow id)."""
    return bool(TOKEN_RE.match(value))


def valid_id(value: str) -> bool:
    """True when ``value`` can be a record id on ``in``, ``out`` and ``wf`` subjects:
    :data:`MIN_ID_CHARS` to 128 letters, digits, ``-`` or ``_``."""
    return len(value) >= MIN_ID_CHARS and valid_token(value)


def check_token(value: str, what: str) -> str:
    """Return ``value`` if it is a valid token, else raise ValueError naming ``what``."""
    if not valid_token(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-128 letters, digits, '-' or '_' "
            "(no '.', '*', '>' or spaces)"
        )
    return value


_EVENT_TAGS = {
    "classified": "classification",
    "workflow": "workflow_event",
    "channel": "channel_event",
    "invalid": "invalid",
}


@dataclass(frozen=True)
class Subjects:
    """Subject, stream, consumer and bucket names for one prefix."""

    prefix: str = "commhub"

    def __post_init__(self) -> None:
        check_token(self.prefix, "subject prefix")

    # -- subjects ---------------------------------------------------------------
    def inbound(self, channel: str, conversation: str) -> str:
        return f"{self.prefix}.in.{channel}.{conversation}"

    def outbound(self, channel: str, conversation: str) -> str:
        return f"{self.prefix}.out.{channel}.{conversation}"

    def workflow_input(self, conversation: str) -> str:
        return f"{self.prefix}.wf.{conversation}"

    def classified(self, conversation: str) -> str:
        return f"{self.prefix}.evt.classified.{conversation}"

    def workflow_event(self, workflow: str, kind: str) -> str:
        return f"{self.prefix}.evt.workflow.{workflow}.{kind}"

    def channel_event(self, channel: str, kind: str) -> str:
        return f"{self.prefix}.evt.channel.{channel}.{kind}"

    @property
    def invalid(self) -> str:
        return f"{self.prefix}.evt.invalid"

    def api(self, name: str) -> str:
        return f"{self.prefix}.api.{name}"

    # -- wildcards ----------------------------------------------------------------
    @property
    def all_inbound(self) -> str:
        return f"{self.prefix}.in.>"

    @property
    def all_outbound(self) -> str:
        return f"{self.prefix}.out.>"

    @property
    def all_workflow_input(self) -> str:
        return f"{self.prefix}.wf.>"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}.evt.>"

    def record_tag(self, subject: str) -> str | None:
        """The envelope type (its ``type`` tag) that ``subject`` carries, if it is ours.

        Lets readers decode records whose publisher left the tag out: the subject
        already says what they must be.
        """
        parts = subject.split(".")
        if len(parts) < 2 or parts[0] != self.prefix:
            return None
        if parts[1] in ("in", "out"):
            return "message"
        if parts[1] == "wf":
            return "workflow_input"
        if parts[1] == "evt" and len(parts) > 2:
            return _EVENT_TAGS.get(parts[2])
        return None

    # -- JetStream names ------------------------------------------------------------
    @property
    def messages_stream(self) -> str:
        return f"{self.prefix}_messages"

    @property
    def events_stream(self) -> str:
        return f"{self.prefix}_events"

    @property
    def state_bucket(self) -> str:
        return f"{self.prefix}_state"

    @property
    def owners_bucket(self) -> str:
        """KV bucket of conversation owners (``core/owners.py``)."""
        return f"{self.prefix}_owners"

    @property
    def agents_bucket(self) -> str:
        """Human agents' heartbeats: key = agent id, value = JSON ``{name, ts,
        capacity}``, expiring after the hub's ``agent_ttl_seconds``."""
        return f"{self.prefix}_agents"

    @property
    def inputs_stream(self) -> str:
        """``in`` and ``wf`` records copied by the server into partitions by conversation
        (``core/streams.py``); the routers read it."""
        return f"{self.prefix}_inputs"

    @property
    def leases_bucket(self) -> str:
        """KV bucket of leases: which router holds each partition, which recorder is
        active (entries expire unless renewed)."""
        return f"{self.prefix}_leases"

    def partition(self, k: int) -> str:
        """Every input of partition ``k`` in the inputs stream."""
        return f"{self.prefix}.part.{k}.>"

    def unpartitioned(self, subject: str) -> str:
        """``{p}.part.{k}.in.{ch}.{conv}`` -> ``{p}.in.{ch}.{conv}`` (others unchanged)."""
        head = f"{self.prefix}.part."
        if not subject.startswith(head):
            return subject
        rest = subject[len(head):].split(".", 1)
        return f"{self.prefix}.{rest[1]}" if len(rest) == 2 else subject

    @property
    def router_consumer(self) -> str:
        """The durable of releases before partitions (``in`` and ``wf`` on the messages
        stream); deleted by the first start that partitions."""
        return f"{self.prefix}_router"

    def partition_consumer(self, k: int) -> str:
        return f"{self.prefix}_router_{k}"

    def recorder_consumer(self, stream: str) -> str:
        return f"{stream}_recorder"
