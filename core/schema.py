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
    "MIGRATIONS",
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

#: Views over the tables, for the questions analysts ask first.
VIEWS: tuple[str, ...] = ("conversations", "message_volume_daily")


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

#: Every schema step, oldest first. Append new steps; never edit a released one.
MIGRATIONS: tuple[Migration, ...] = (_V1,)


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


def migrate(con: duckdb.DuckDBPyConnection) -> int:
    """Bring the database up to :func:`latest_version`; return the version it ends at.

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
        if step.version <= version:
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
