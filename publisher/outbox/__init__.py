"""Transactional outbox publishing: write events in your database transaction, a relay publishes
them in order, exactly once (PostgreSQL through psycopg 3, sync and async; SQLite; SQLAlchemy
sessions and connections on either, without SQLAlchemy being a dependency).

Usage (see ``docs/outbox.md``)::

    from publisher.outbox import Outbox, OutboxRelay

    outbox = Outbox()                                   # table "eventbus_outbox"
    with psycopg.connect(dsn) as conn:                  # your transaction
        conn.execute("UPDATE blockers SET status = 'RESOLVED' WHERE id = %s", (123,))
        outbox.write(conn, BlockerResolved(project_id=1, blocker_id=123, ...))

    relay = OutboxRelay.postgres(dsn, Publisher.from_url(redis_url)).start()   # or the CLI:
    # python -m publisher.outbox relay --dsn postgresql://... --redis-url redis://...

    snap = outbox.snapshot(conn, 1, read=lambda c: list_pending_blockers(c))
    return {"blockers": snap.data, "cursor": snap.cursor_json()}
"""

from publisher.outbox.db import InTransaction
from publisher.outbox.metrics import LagHistogram, RateLimiter, RelayMetrics
from publisher.outbox.postgres import PostgresOutboxStore
from publisher.outbox.publishing import PublisherContractError, PublisherFailed
from publisher.outbox.relay import OutboxRelay, idempotency_key
from publisher.outbox.sql import (
    DEFAULT_TABLE,
    POSTGRES_DDL,
    SQLITE_DDL,
    migration_sql,
)
from publisher.outbox.sqlite import SQLiteOutboxStore
from publisher.outbox.store import OutboxRow
from publisher.outbox.writer import Outbox, Snapshot, SnapshotTimeout

__all__ = [
    "DEFAULT_TABLE",
    "POSTGRES_DDL",
    "SQLITE_DDL",
    "InTransaction",
    "LagHistogram",
    "Outbox",
    "OutboxRelay",
    "OutboxRow",
    "PostgresOutboxStore",
    "PublisherContractError",
    "PublisherFailed",
    "RateLimiter",
    "RelayMetrics",
    "SQLiteOutboxStore",
    "Snapshot",
    "SnapshotTimeout",
    "idempotency_key",
    "migration_sql",
]
