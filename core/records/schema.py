"""The DuckDB schema of the records, and its migrations by version.

Every table is keyed on the record's envelope id, which is what makes the recorder's
``INSERT ... ON CONFLICT DO NOTHING`` idempotent. ``ts`` columns are ``TIMESTAMP`` in
UTC (converted from the envelope's epoch seconds); JSON-shaped fields are ``JSON``.
``docs/records.md`` documents every table and column.

Migrations: :data:`MIGRATIONS` is an append-only list of steps; step N's statements
never change once released, a later change is a new step. :func:`migrate` applies the
steps a database has not seen, each in its own transaction together with its row in
``schema_version``, so a crash mid-migration leaves the database at the previous
version and the next start retries the step.

Derived tables: ``conversations`` (one row per conversation) and ``workflow_runs`` (one
row per run) are kept current by the recorder. After inserting a batch it recomputes the
rows of the conversations and runs the batch touched from the base tables
(:data:`REFRESH_RUNS`, then :data:`REFRESH_CONVERSATIONS`, ``INSERT OR REPLACE ...
GROUP BY``), in the batch's transaction. Recomputing rather than adding up keeps them
exact under redelivery: a record written twice is one row of its base table, so it
counts once.

Concurrency: :func:`migrate` runs on the writer connection before anything else uses
the database (the recorder calls it in :meth:`Recorder.start`); it is not meant to run
concurrently with itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb

__all__ = [
    "CANCELLED_FINAL_STATES",
    "DECISION_OF_OLD_ROWS",
    "DERIVED_TABLES",
    "MIGRATIONS",
    "REFRESH_CONVERSATIONS",
    "REFRESH_RUNS",
    "TABLES",
    "VIEWS",
    "Migration",
    "SchemaError",
    "current_version",
    "latest_version",
    "migrate",
]

log = logging.getLogger(__name__)

#: Record tables, in the order the recorder writes them.
TABLES: tuple[str, ...] = (
    "messages",
    "classifications",
    "workflow_events",
    "channel_events",
    "workflow_inputs",
    "invalid_records",
)

#: Tables the recorder derives from the record tables (recomputed per touched key).
DERIVED_TABLES: tuple[str, ...] = ("workflow_runs", "conversations")

#: Views over the tables, for the questions analysts ask first.
VIEWS: tuple[str, ...] = (
    "message_volume_daily",
    "active_users_daily",
    "intent_mix",
    "fallback_rate",
    "fallback_rate_daily",
    "confidence_histogram",
    "workflow_funnel",
    "workflow_completion",
    "response_latency",
    "first_response_latency",
    "latency_percentiles",
)


class SchemaError(RuntimeError):
    """The database's schema cannot be used by this version of commhub."""


@dataclass(frozen=True)
class Migration:
    """One schema step: the statements that bring version ``version - 1`` to ``version``."""

    version: int
    description: str
    statements: tuple[str, ...]


_V1 = Migration(
    version=1,
    description="record tables, conversations and daily volume views",
    statements=(
        """
        CREATE TABLE messages (
            id           VARCHAR PRIMARY KEY,
            conversation VARCHAR NOT NULL,
            channel      VARCHAR NOT NULL,
            direction    VARCHAR NOT NULL,   -- 'in' (user to hub) or 'out' (hub to user)
            sender_id    VARCHAR NOT NULL,
            sender_kind  VARCHAR NOT NULL,   -- user, bot, agent, service
            sender_name  VARCHAR,
            text         VARCHAR,
            payload      JSON,
            reply_to     VARCHAR,
            ts           TIMESTAMP NOT NULL, -- UTC
            meta         JSON,
            stream_seq   BIGINT              -- sequence in the messages stream
        )
        """,
        """
        CREATE TABLE classifications (
            id            VARCHAR PRIMARY KEY,
            message_id    VARCHAR NOT NULL,
            conversation  VARCHAR NOT NULL,
            text          VARCHAR,
            workflow      VARCHAR,           -- NULL: no workflow reached the threshold
            confidence    DOUBLE NOT NULL,
            threshold     DOUBLE NOT NULL,
            alternatives  JSON,              -- [{"workflow": ..., "confidence": ...}, ...]
            model         VARCHAR,
            model_version VARCHAR,
            ts            TIMESTAMP NOT NULL
        )
        """,
        """
        CREATE TABLE workflow_events (
            id            VARCHAR PRIMARY KEY,
            run_id        VARCHAR NOT NULL,
            conversation  VARCHAR NOT NULL,
            workflow      VARCHAR NOT NULL,
            kind          VARCHAR NOT NULL,  -- started, transition, completed, failed, ...
            from_state    VARCHAR,
            to_state      VARCHAR,
            trigger       VARCHAR,
            slots_changed JSON,
            message_id    VARCHAR,
            ts            TIMESTAMP NOT NULL,
            event         VARCHAR,           -- kind 'emitted': the event's name
            data          JSON               -- kind 'emitted': the event's data
        )
        """,
        """
        CREATE TABLE channel_events (
            id           VARCHAR PRIMARY KEY,
            channel      VARCHAR NOT NULL,
            kind         VARCHAR NOT NULL,   -- accepted, rejected, closed, error, ...
            connection   VARCHAR,
            conversation VARCHAR,
            user_id      VARCHAR,
            reason       VARCHAR,
            code         INTEGER,
            ts           TIMESTAMP NOT NULL
        )
        """,
        """
        CREATE TABLE workflow_inputs (
            id           VARCHAR PRIMARY KEY,
            conversation VARCHAR NOT NULL,
            event        VARCHAR NOT NULL,
            data         JSON,
            sender_id    VARCHAR NOT NULL,
            sender_kind  VARCHAR NOT NULL,
            ts           TIMESTAMP NOT NULL
        )
        """,
        """
        CREATE TABLE invalid_records (
            id      VARCHAR PRIMARY KEY,
            subject VARCHAR NOT NULL,
            reason  VARCHAR NOT NULL,
            data    VARCHAR,
            source  VARCHAR,
            ts      TIMESTAMP NOT NULL
        )
        """,
        """
        CREATE VIEW conversations AS
        SELECT
            conversation,
            arg_min(channel, ts)                      AS channel,
            min(ts)                                   AS first_ts,
            max(ts)                                   AS last_ts,
            count(*)                                  AS messages,
            count(*) FILTER (WHERE direction = 'in')  AS messages_in,
            count(*) FILTER (WHERE direction = 'out') AS messages_out
        FROM messages
        GROUP BY conversation
        """,
        """
        CREATE VIEW message_volume_daily AS
        SELECT
            CAST(ts AS DATE)                          AS day,
            channel,
            count(*) FILTER (WHERE direction = 'in')  AS messages_in,
            count(*) FILTER (WHERE direction = 'out') AS messages_out,
            count(DISTINCT conversation)              AS conversations
        FROM messages
        GROUP BY ALL
        """,
    ),
)

# Workflow event kinds that move a run along; any other kind (completed, failed,
# expired, cancelled, handoff, and kinds added later) ends it, as far as the derived
# tables are concerned, and names its outcome.
_PROGRESS_KINDS = "('started', 'transition', 'emitted')"

# Events of one step share a ts; this key orders them: started < transition < emitted <
# an ending kind < handoff (a handoff says more about the outcome than the completion
# of the state it happened in). Microseconds times 8 stay inside BIGINT until year 9999.
_EVENT_ORDER = """
    epoch_us(ts) * 8 + CASE
        WHEN kind = 'started' THEN 0
        WHEN kind = 'transition' THEN 1
        WHEN kind = 'emitted' THEN 2
        WHEN kind IN ('handoff', 'handed_off') THEN 4
        ELSE 3 END"""

# Recompute the workflow_runs rows of the run ids that ``{runs}`` (a query with a
# ``run_id`` column) yields, from workflow_events. Version 2's shape.
_V2_REFRESH_RUNS = f"""
INSERT OR REPLACE INTO workflow_runs
SELECT
    run_id,
    arg_min(workflow, k)                                      AS workflow,
    arg_min(conversation, k)                                  AS conversation,
    coalesce(min(ts) FILTER (WHERE kind = 'started'), min(ts)) AS started_ts,
    arg_max(ts, k) FILTER (WHERE kind NOT IN {_PROGRESS_KINDS}) AS ended_ts,
    arg_max(coalesce(to_state, from_state), k)
        FILTER (WHERE kind <> 'emitted' AND coalesce(to_state, from_state) IS NOT NULL)
                                                              AS last_state,
    count(*) FILTER (WHERE kind = 'transition')               AS transitions,
    coalesce(
        arg_max(CASE WHEN kind = 'handoff' THEN 'handed_off' ELSE kind END, k)
            FILTER (WHERE kind NOT IN {_PROGRESS_KINDS}),
        'open')                                               AS outcome
FROM (
    SELECT *, {_EVENT_ORDER} AS k
    FROM workflow_events
    WHERE run_id <> '' AND run_id IN ({{runs}})
)
GROUP BY run_id
"""

# Recompute the conversations rows of the conversations that ``{conversations}`` (a
# query with a ``conversation`` column) yields, from messages and workflow_runs (which
# must be current for them: refresh the runs first). Version 2's shape.
_V2_REFRESH_CONVERSATIONS = """
INSERT OR REPLACE INTO conversations
WITH keys AS (SELECT DISTINCT conversation FROM ({conversations})),
m AS (
    SELECT
        conversation,
        arg_min(channel, ts)                                  AS channel,
        arg_min(sender_id, ts) FILTER (WHERE direction = 'in') AS user_id,
        min(ts)                                               AS first_ts,
        max(ts)                                               AS last_ts,
        count(*)                                              AS messages,
        count(*) FILTER (WHERE direction = 'in')              AS messages_in,
        count(*) FILTER (WHERE direction = 'out')             AS messages_out
    FROM messages
    WHERE conversation IN (FROM keys)
    GROUP BY conversation
),
per_workflow AS (
    SELECT conversation, workflow, min(started_ts) AS first_started
    FROM workflow_runs
    WHERE conversation IN (FROM keys)
    GROUP BY ALL
),
r AS (
    SELECT
        conversation,
        count(*)                                             AS runs,
        arg_max(workflow, epoch_us(started_ts))              AS last_workflow,
        arg_max(outcome, epoch_us(started_ts))               AS outcome
    FROM workflow_runs
    WHERE conversation IN (FROM keys)
    GROUP BY conversation
),
w AS (
    SELECT conversation, list(workflow ORDER BY first_started, workflow) AS workflows
    FROM per_workflow
    GROUP BY conversation
)
SELECT
    coalesce(m.conversation, r.conversation)                 AS conversation,
    m.channel,
    m.user_id,
    m.first_ts,
    m.last_ts,
    coalesce(m.messages, 0)                                  AS messages,
    coalesce(m.messages_in, 0)                               AS messages_in,
    coalesce(m.messages_out, 0)                              AS messages_out,
    coalesce(r.runs, 0)                                      AS runs,
    coalesce(w.workflows, [])                                AS workflows,
    r.last_workflow,
    coalesce(r.outcome, 'open')                              AS outcome
FROM m
FULL OUTER JOIN r ON r.conversation = m.conversation
LEFT JOIN w ON w.conversation = coalesce(m.conversation, r.conversation)
"""

_V2 = Migration(
    version=2,
    description=(
        "conversations and workflow_runs tables kept by the recorder; views for activity, "
        "intents, fallbacks, confidence, funnels, completion and response latency"
    ),
    statements=(
        "DROP VIEW conversations",
        """
        CREATE TABLE workflow_runs (
            run_id       VARCHAR PRIMARY KEY,
            workflow     VARCHAR NOT NULL,
            conversation VARCHAR NOT NULL,
            started_ts   TIMESTAMP NOT NULL,  -- its started event (else its first event)
            ended_ts     TIMESTAMP,           -- its ending event; NULL while open
            last_state   VARCHAR,
            transitions  BIGINT NOT NULL,
            outcome      VARCHAR NOT NULL     -- open, completed, failed, expired, ...
        )
        """,
        """
        CREATE TABLE conversations (
            conversation  VARCHAR PRIMARY KEY,
            channel       VARCHAR,            -- of its first message
            user_id       VARCHAR,            -- sender of its first inbound message
            first_ts      TIMESTAMP,
            last_ts       TIMESTAMP,
            messages      BIGINT NOT NULL,
            messages_in   BIGINT NOT NULL,
            messages_out  BIGINT NOT NULL,
            runs          BIGINT NOT NULL,
            workflows     VARCHAR[] NOT NULL, -- distinct, in the order they first started
            last_workflow VARCHAR,
            outcome       VARCHAR NOT NULL    -- the latest run's outcome; open without runs
        )
        """,
        _V2_REFRESH_RUNS.format(runs="SELECT run_id FROM workflow_events"),
        _V2_REFRESH_CONVERSATIONS.format(
            conversations="SELECT conversation FROM messages "
            "UNION ALL SELECT conversation FROM workflow_runs"
        ),
        """
        CREATE VIEW active_users_daily AS
        SELECT
            CAST(ts AS DATE)                       AS day,
            coalesce(channel, '(all)')             AS channel,
            count(DISTINCT sender_id)              AS users,
            count(DISTINCT conversation)           AS conversations,
            count(*)                               AS messages_in
        FROM messages
        WHERE direction = 'in'
        GROUP BY GROUPING SETS ((CAST(ts AS DATE), channel), (CAST(ts AS DATE)))
        """,
        """
        CREATE VIEW intent_mix AS
        SELECT
            coalesce(workflow, '(none)')           AS workflow,
            count(*)                               AS classifications,
            avg(confidence)                        AS mean_confidence,
            count(*) / sum(count(*)) OVER ()       AS share
        FROM classifications
        GROUP BY ALL
        """,
        """
        CREATE VIEW fallback_rate AS
        SELECT
            count(*)                                          AS classifications,
            count(*) FILTER (WHERE workflow IS NULL)          AS fallbacks,
            count(*) FILTER (WHERE workflow IS NULL) / nullif(count(*), 0) AS fallback_rate
        FROM classifications
        """,
        """
        CREATE VIEW fallback_rate_daily AS
        SELECT
            CAST(c.ts AS DATE)                                AS day,
            m.channel,
            count(*)                                          AS classifications,
            count(*) FILTER (WHERE c.workflow IS NULL)        AS fallbacks,
            count(*) FILTER (WHERE c.workflow IS NULL) / count(*) AS fallback_rate
        FROM classifications c
        LEFT JOIN messages m ON m.id = c.message_id
        GROUP BY ALL
        """,
        """
        CREATE VIEW confidence_histogram AS
        WITH buckets AS (SELECT range AS bucket FROM range(10)),
        counted AS (
            SELECT
                CAST(least(greatest(floor(confidence * 10), 0), 9) AS BIGINT) AS bucket,
                count(*)                                   AS classifications,
                count(*) FILTER (WHERE workflow IS NULL)   AS fallbacks
            FROM classifications
            GROUP BY ALL
        )
        SELECT
            b.bucket,
            b.bucket / 10                          AS low,
            (b.bucket + 1) / 10                    AS high,
            coalesce(c.classifications, 0)         AS classifications,
            coalesce(c.fallbacks, 0)               AS fallbacks
        FROM buckets b
        LEFT JOIN counted c USING (bucket)
        """,
        """
        CREATE VIEW workflow_funnel AS
        WITH reached AS (
            SELECT workflow, to_state AS state, count(DISTINCT run_id) AS runs,
                   min(k) AS first_step
            FROM (
                SELECT *, row_number() OVER (
                    PARTITION BY run_id ORDER BY ts, kind <> 'started'
                ) AS k
                FROM workflow_events
                WHERE to_state IS NOT NULL AND kind <> 'emitted' AND run_id <> ''
            )
            GROUP BY ALL
        ),
        started AS (SELECT workflow, count(*) AS runs FROM workflow_runs GROUP BY ALL)
        SELECT
            r.workflow,
            r.state,
            r.runs,
            r.runs / s.runs                        AS share,
            r.first_step
        FROM reached r
        JOIN started s USING (workflow)
        """,
        """
        CREATE VIEW workflow_completion AS
        SELECT
            workflow,
            count(*)                                         AS runs,
            count(*) FILTER (WHERE outcome = 'completed')    AS completed,
            count(*) FILTER (WHERE outcome = 'failed')       AS failed,
            count(*) FILTER (WHERE outcome = 'expired')      AS expired,
            count(*) FILTER (WHERE outcome = 'cancelled')    AS cancelled,
            count(*) FILTER (WHERE outcome = 'handed_off')   AS handed_off,
            count(*) FILTER (WHERE outcome = 'open')         AS open,
            count(*) FILTER (WHERE outcome NOT IN (
                'completed', 'failed', 'expired', 'cancelled', 'handed_off', 'open'
            ))                                               AS other,
            count(*) FILTER (WHERE outcome = 'completed') / count(*) AS completion_rate
        FROM workflow_runs
        GROUP BY workflow
        """,
        """
        CREATE VIEW response_latency AS
        WITH i AS (
            SELECT id, conversation, channel, ts,
                   row_number() OVER (PARTITION BY conversation ORDER BY ts, id) = 1 AS first
            FROM messages
            WHERE direction = 'in'
        ),
        o AS (SELECT id, conversation, ts FROM messages WHERE direction = 'out')
        SELECT
            i.id                                   AS message_id,
            i.conversation,
            i.channel,
            i.ts                                   AS in_ts,
            o.id                                   AS reply_id,
            o.ts                                   AS reply_ts,
            (epoch_us(o.ts) - epoch_us(i.ts)) / 1e6 AS seconds,
            i.first
        FROM i
        ASOF JOIN o ON o.conversation = i.conversation AND o.ts >= i.ts
        """,
        """
        CREATE VIEW first_response_latency AS
        SELECT message_id, conversation, channel, in_ts, reply_id, reply_ts, seconds
        FROM response_latency
        WHERE first
        """,
        """
        CREATE VIEW latency_percentiles AS
        WITH measured AS (
            SELECT 'first_response' AS measure, channel, seconds
            FROM response_latency WHERE first
            UNION ALL
            SELECT 'response' AS measure, channel, seconds FROM response_latency
        )
        SELECT
            measure,
            coalesce(channel, '(all)')             AS channel,
            count(*)                               AS responses,
            quantile_cont(seconds, 0.5)            AS p50_seconds,
            quantile_cont(seconds, 0.9)            AS p90_seconds,
            quantile_cont(seconds, 0.95)           AS p95_seconds,
            quantile_cont(seconds, 0.99)           AS p99_seconds,
            avg(seconds)                           AS mean_seconds,
            max(seconds)                           AS max_seconds
        FROM measured
        GROUP BY GROUPING SETS ((measure, channel), (measure))
        """,
    ),
)

#: Final states whose run counts as ``cancelled``, not ``completed``: a workflow's own
#: way out (book_table's ``cancelled``) is the user calling it off, like a cancel phrase.
CANCELLED_FINAL_STATES: tuple[str, ...] = ("cancelled", "canceled")
_CANCELLED_STATES_SQL = "(" + ", ".join(f"'{name}'" for name in CANCELLED_FINAL_STATES) + ")"

# Version 3's run refresh: as version 2's, except that a run completing in one of
# CANCELLED_FINAL_STATES has the outcome 'cancelled'.
_V3_REFRESH_RUNS = _V2_REFRESH_RUNS.replace(
    "arg_max(CASE WHEN kind = 'handoff' THEN 'handed_off' ELSE kind END, k)",
    f"""arg_max(CASE
            WHEN kind = 'handoff' THEN 'handed_off'
            WHEN kind = 'completed' AND to_state IN {_CANCELLED_STATES_SQL} THEN 'cancelled'
            ELSE kind END, k)""",
)
assert _V3_REFRESH_RUNS != _V2_REFRESH_RUNS

#: What a classification decided, for records without ``decision`` (published before
#: the router set it): a ``button`` model is a start button; a workflow is ``workflow``;
#: no workflow although the best candidate reached the threshold is ``clarify`` (only a
#: "Did you mean A or B?" leaves it unset then); else ``fallback``. ``rows.py`` applies
#: the same rule to such records as it writes them.
DECISION_OF_OLD_ROWS = """
    CASE
        WHEN model = 'button' THEN 'button'
        WHEN workflow IS NOT NULL THEN 'workflow'
        WHEN confidence >= threshold THEN 'clarify'
        ELSE 'fallback'
    END"""

_V3 = Migration(
    version=3,
    description=(
        "classifications.decision and workflow_inputs.sender_name; fallbacks count only "
        "the fallback, not clarifying questions; a run ending in a final state named "
        "cancelled is cancelled, not completed"
    ),
    statements=(
        "ALTER TABLE classifications ADD COLUMN decision VARCHAR",
        f"UPDATE classifications SET decision = {DECISION_OF_OLD_ROWS} WHERE decision IS NULL",
        "ALTER TABLE workflow_inputs ADD COLUMN sender_name VARCHAR",
        """
        CREATE OR REPLACE VIEW intent_mix AS
        SELECT
            CASE WHEN decision = 'clarify' THEN '(clarify)'
                 ELSE coalesce(workflow, '(none)') END AS workflow,
            count(*)                               AS classifications,
            avg(confidence)                        AS mean_confidence,
            count(*) / sum(count(*)) OVER ()       AS share
        FROM classifications
        GROUP BY ALL
        """,
        """
        CREATE OR REPLACE VIEW fallback_rate AS
        SELECT
            count(*)                                          AS classifications,
            count(*) FILTER (WHERE decision = 'fallback')     AS fallbacks,
            count(*) FILTER (WHERE decision = 'fallback') / nullif(count(*), 0) AS fallback_rate,
            count(*) FILTER (WHERE decision = 'clarify')      AS clarifications
        FROM classifications
        """,
        """
        CREATE OR REPLACE VIEW fallback_rate_daily AS
        SELECT
            CAST(c.ts AS DATE)                                AS day,
            m.channel,
            count(*)                                          AS classifications,
            count(*) FILTER (WHERE c.decision = 'fallback')   AS fallbacks,
            count(*) FILTER (WHERE c.decision = 'fallback') / count(*) AS fallback_rate,
            count(*) FILTER (WHERE c.decision = 'clarify')    AS clarifications
        FROM classifications c
        LEFT JOIN messages m ON m.id = c.message_id
        GROUP BY ALL
        """,
        """
        CREATE OR REPLACE VIEW confidence_histogram AS
        WITH buckets AS (SELECT range AS bucket FROM range(10)),
        counted AS (
            SELECT
                CAST(least(greatest(floor(confidence * 10), 0), 9) AS BIGINT) AS bucket,
                count(*)                                        AS classifications,
                count(*) FILTER (WHERE decision = 'fallback')   AS fallbacks,
                count(*) FILTER (WHERE decision = 'clarify')    AS clarifications
            FROM classifications
            GROUP BY ALL
        )
        SELECT
            b.bucket,
            b.bucket / 10                          AS low,
            (b.bucket + 1) / 10                    AS high,
            coalesce(c.classifications, 0)         AS classifications,
            coalesce(c.fallbacks, 0)               AS fallbacks,
            coalesce(c.clarifications, 0)          AS clarifications
        FROM buckets b
        LEFT JOIN counted c USING (bucket)
        """,
        _V3_REFRESH_RUNS.format(runs="SELECT run_id FROM workflow_events"),
        _V2_REFRESH_CONVERSATIONS.format(
            conversations="SELECT conversation FROM messages "
            "UNION ALL SELECT conversation FROM workflow_runs"
        ),
    ),
)

_V4 = Migration(
    version=4,
    description="classifications.entities: the values found in the text, with their spans",
    statements=(
        # [{"kind", "value", "text", "start", "end", "alternative"}, ...]
        "ALTER TABLE classifications ADD COLUMN entities JSON",
    ),
)

_V5 = Migration(
    version=5,
    description="recorder_positions: the highest stream sequence written, per stream, so "
    "a recorder taking over (or a new file) catches up from where its file ends",
    statements=(
        """
        CREATE TABLE recorder_positions (
            stream VARCHAR PRIMARY KEY,
            seq    BIGINT NOT NULL      -- highest sequence of the stream written here
        )
        """,
    ),
)

_V6 = Migration(
    version=6,
    description="recorder_stale: the runs and conversations whose derived rows wait for "
    "the recorder's next refresh (it refreshes them once a second while catching up)",
    statements=(
        """
        CREATE TABLE recorder_stale (
            kind VARCHAR NOT NULL,  -- 'run' (a workflow_runs row) or 'conversation'
            key  VARCHAR NOT NULL,  -- the run id or the conversation
            PRIMARY KEY (kind, key)
        )
        """,
    ),
)

#: Every schema step, oldest first. Append new steps; never edit a released one.
MIGRATIONS: tuple[Migration, ...] = (_V1, _V2, _V3, _V4, _V5, _V6)

#: The recorder's refresh of ``workflow_runs`` for the run ids ``{runs}`` yields (the
#: latest schema's shape); run it before :data:`REFRESH_CONVERSATIONS`.
REFRESH_RUNS = _V3_REFRESH_RUNS
#: The recorder's refresh of ``conversations`` for ``{conversations}``.
REFRESH_CONVERSATIONS = _V2_REFRESH_CONVERSATIONS


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def latest_version() -> int:
    """The schema version this code writes."""
    return MIGRATIONS[-1].version


def current_version(con: duckdb.DuckDBPyConnection) -> int:
    """The version a database is at (0 for a fresh file)."""
    found = con.execute(
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_schema = 'main' AND table_name = 'schema_version'"
    ).fetchone()
    if not found or not found[0]:
        return 0
    row = con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(con: duckdb.DuckDBPyConnection, target: int | None = None) -> int:
    """Bring the database up to :func:`latest_version`; return the version it ends at.

    ``target`` stops at an older version (tests use it to build a database as an older
    commhub left it).

    Raises :class:`SchemaError` when the database is newer than this code (a downgrade),
    rather than writing rows a newer schema may not expect. A failing step is rolled
    back and its exception propagates.
    """
    con.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_version (
            version     INTEGER PRIMARY KEY,
            description VARCHAR NOT NULL,
            applied_at  TIMESTAMP NOT NULL  -- UTC
        )
        """
    )
    version = current_version(con)
    if version > latest_version():
        raise SchemaError(
            f"the database is at schema version {version}, newer than this commhub "
            f"understands ({latest_version()}): upgrade commhub or use another data directory"
        )
    for step in MIGRATIONS:
        if step.version <= version or (target is not None and step.version > target):
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            for statement in step.statements:
                con.execute(statement)
            con.execute(
                "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                [step.version, step.description, _utcnow()],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        log.info("database schema migrated to version %d: %s", step.version, step.description)
        version = step.version
    return version
