"""Transactional outbox publishing (publisher.outbox) against the real PostgreSQL on this machine,
SQLite, and a real redis-server.

What users rely on: an event written in a transaction is published if and only if the transaction
commits; per project, the stream holds the committed events in commit order, each exactly once,
whatever happens to the relay (SIGKILL mid-batch, two relays at once) or to Redis (down, then back
empty); a snapshot's cursor covers exactly the events its data includes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import structlog

from publisher import (
    AsyncPublisher,
    Cursor,
    EventValidationError,
    Publisher,
    PublisherUnavailable,
)
from publisher.outbox import (
    InTransaction,
    LagHistogram,
    Outbox,
    OutboxRelay,
    OutboxRow,
    PostgresOutboxStore,
    RateLimiter,
    SnapshotTimeout,
    SQLiteOutboxStore,
    idempotency_key,
    migration_sql,
)
from publisher.outbox import relay as relay_module
from publisher.outbox.publishing import CHUNK
from publisher.outbox.sql import for_psycopg, lock_key, validate_table
from schemas import BlockerResolved, encode_event, lua
from tests.support.outbox_db import KEYS, private_database, stream_ids, wait_until
from tests.support.redis_server import RedisServer
from tests.support.tcp_proxy import FreezableProxy

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2025, 11, 8, 12, 45, 30, tzinfo=UTC)


def event(project_id: int, n: int) -> BlockerResolved:
    return BlockerResolved(
        project_id=project_id, blocker_id=n, answer=f"answer {n}", resolved_at=T0
    )


@pytest.fixture(scope="session")
def pg_url():
    with private_database() as url:
        yield url


@pytest.fixture
def table() -> str:
    return f"outbox_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def pg_outbox(pg_url, table) -> Outbox:
    outbox = Outbox(table)
    with psycopg.connect(pg_url) as conn:
        outbox.create_table(conn)
    return outbox


@pytest.fixture
def sqlite_path(tmp_path, table) -> str:
    path = str(tmp_path / "app.db")
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        Outbox(table).create_table(conn)
    return path


def drain(relay: OutboxRelay) -> int:
    """Run batches until the table has nothing left to publish; the number published."""
    total = 0
    while count := relay.run_once():
        total += count
    assert relay.store.backlog() == 0
    return total


def pg_rows(url: str, table: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            f"SELECT id, project_id, event, epoch, seq FROM {table} ORDER BY id"
        ).fetchall()


def blocker_ids_by_project(url: str, table: str) -> dict[int, list[int]]:
    """The committed events of each project, in id order (commit order per project)."""
    from schemas import decode_event

    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT project_id, event FROM {table} ORDER BY id").fetchall()
    out: dict[int, list[int]] = {}
    for project_id, payload in rows:
        out.setdefault(project_id, []).append(decode_event(payload).blocker_id)
    return out


def assert_exact(client: redis.Redis, expected: dict[int, list[int]]) -> None:
    """Each project's stream holds exactly ``expected`` in that order, seq 1..n, no gap."""
    for project_id, ids in expected.items():
        got = stream_ids(client, project_id)
        assert [b for _, b in got] == ids, f"project {project_id}"
        assert [s for s, _ in got] == list(range(1, len(ids) + 1)), f"project {project_id}"


# --- pure pieces -------------------------------------------------------------------------------


def test_migration_sql_for_both_dialects_and_table_names_are_checked():
    pg = migration_sql("postgresql", "app.events_outbox")
    assert "CREATE TABLE IF NOT EXISTS app.events_outbox" in pg
    assert "events_outbox_pending ON app.events_outbox (id) WHERE published_at IS NULL" in pg
    assert "AUTOINCREMENT" in migration_sql("sqlite")
    # "x\n": a regex's $ matches before a final newline; LISTEN and the keys broke on it.
    for bad in ["x; DROP TABLE users", "Outbox", "a.b.c", "", "1abc", "a" * 42, "x\n"]:
        with pytest.raises(ValueError):
            validate_table(bad)
    with pytest.raises(ValueError):
        migration_sql("mysql")


def run_migration(dialect: str, answers: list) -> list[str]:
    """Drive ``migration_steps`` as create_table does, answering each statement after the
    script's with the next of ``answers`` (rows, or an exception it raised); the statements."""
    from publisher.outbox.sql import migration_steps, split_script

    script = split_script(migration_sql(dialect, "t"))
    steps = migration_steps(dialect, "t")
    ran: list[str] = []
    answer: Any = None
    while True:
        try:
            if isinstance(answer, Exception):
                sql, _ = steps.throw(answer)
            else:
                sql, _ = steps.send(answer)
        except StopIteration:
            return ran
        ran.append(sql)
        answer = [] if sql in script else answers.pop(0)  # (DDL returns no rows)


def test_the_migration_steps_decide_the_sqlite_upgrade_from_the_columns_found():
    from publisher.outbox.sql import split_script

    script = split_script(migration_sql("sqlite", "t"))
    pragma = "SELECT name FROM pragma_table_info(:name)"
    add = "ALTER TABLE t ADD COLUMN tag TEXT"
    # PostgreSQL: the script alone (its DO block looks at the table itself).
    assert run_migration("postgresql", []) == split_script(migration_sql("postgresql", "t"))
    # SQLite: the script, then the columns; the ALTER only where tag is missing.
    assert run_migration("sqlite", [[("id",), ("tag",)]]) == [*script, pragma]
    assert run_migration("sqlite", [[("id",), ("Tag",)]]) == [*script, pragma]  # (case ignored)
    assert run_migration("sqlite", [[("id",)], []]) == [*script, pragma, add]
    # Another connection added it in between: taken for done once the columns show it.
    duplicate = sqlite3.OperationalError("duplicate column name: tag")
    done = run_migration("sqlite", [[("id",)], duplicate, [("id",), ("tag",)]])
    assert done == [*script, pragma, add, pragma]
    # Any other failure, or a duplicate whose column is still not there, is raised.
    locked = sqlite3.OperationalError("database is locked")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        run_migration("sqlite", [[("id",)], locked])
    with pytest.raises(sqlite3.OperationalError, match="duplicate"):
        run_migration("sqlite", [[("id",)], duplicate, [("id",)]])


def test_psycopg_parameters_and_lock_keys():
    assert for_psycopg("SELECT :a, CAST(:b AS text) WHERE x = :c") == (
        "SELECT %(a)s, CAST(%(b)s AS text) WHERE x = %(c)s"
    )
    assert lock_key("t", 1) == lock_key("t", 1) != lock_key("t", 2) != lock_key("u", 2)
    assert -(2**63) <= lock_key("t", 10**15) < 2**63


def test_idempotency_key_fits_the_publishers_limit_for_the_longest_table_name():
    table = validate_table("s" * 63 + "." + "t" * 41)
    key = idempotency_key(table, OutboxRow(2**63 - 1, 1, "AbCdEfGh", "{}", 0.0))
    assert len(key) <= 200 and " " not in key


def test_rate_limiter_bounds_the_average_rate():
    now = [0.0]
    limiter = RateLimiter(100, clock=lambda: now[0])  # burst 10
    assert limiter.delay(10) == 0
    assert limiter.delay(10) == pytest.approx(0.1)  # 10 more tokens take 0.1 s at 100/s
    now[0] += 0.1
    assert limiter.delay(5) == pytest.approx(0.05)
    # Over a long run, n events never take less than n / rate seconds (after the burst).
    total_sleep = sum(limiter.delay(10) for _ in range(100))
    assert total_sleep >= 1000 / 100 - 0.2
    assert RateLimiter(0).delay(10**6) == 0


def test_rate_limiter_never_lets_more_than_burst_plus_rate_times_elapsed_through():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=200, deadline=None)
    @given(
        st.floats(1, 10_000),
        st.lists(st.tuples(st.floats(0, 2), st.integers(1, 500)), max_size=50),
    )
    def check(rate, steps):
        now = [0.0]
        limiter = RateLimiter(rate, clock=lambda: now[0])
        taken = 0
        for idle, n in steps:
            now[0] += idle
            now[0] += limiter.delay(n)  # the caller sleeps what it is told
            taken += n
            assert taken <= limiter.burst + rate * now[0] + 1e-6 * taken

    check()


def test_lag_histogram_quantiles():
    histogram = LagHistogram()
    assert histogram.quantile(0.99) is None
    for lag in [0.5] * 98 + [30, 700]:
        histogram.observe(lag)
    assert histogram.quantile(0.5) == 1
    assert histogram.quantile(0.99) == 50
    assert histogram.quantile(1.0) == 1_000
    histogram.observe(10**8)
    assert histogram.quantile(1.0) == 10**8  # above every bucket: the maximum


# --- writing in the caller's transaction -------------------------------------------------------


def test_an_invalid_event_writes_nothing(sqlite_path, table):
    outbox = Outbox(table)
    bad = BlockerResolved(project_id=1, blocker_id=0, answer="x", resolved_at=T0)
    with sqlite3.connect(sqlite_path) as conn:
        with pytest.raises(EventValidationError, match="blocker_id"):
            outbox.write_many(conn, [event(1, 1), bad])
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    with pytest.raises(TypeError, match=r"sqlite3\.Connection"):
        outbox.write(object(), event(1, 1))


@pytest.mark.parametrize("bad", [None, {"type": "blocker_resolved", "project_id": 1}, "event"])
def test_something_that_is_not_an_event_is_refused_as_publish_refuses_it(sqlite_path, table, bad):
    """Not an event at all (None, a dict, a string): ``EventValidationError`` naming the event
    types, as ``Publisher.publish`` raises, and nothing written. Before, the writer read
    ``project_id`` off it before validating, and raised ``AttributeError``."""
    with sqlite3.connect(sqlite_path) as conn:
        with pytest.raises(EventValidationError, match="Expected one of the event types"):
            Outbox(table).write_many(conn, [event(1, 1), bad])
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)


def test_postgres_commit_publishes_and_rollback_publishes_nothing(pg_url, pg_outbox, bus):
    client = bus.client
    with psycopg.connect(pg_url) as conn:
        pg_outbox.write(conn, event(1, 1))
        pg_outbox.write_many(conn, [event(1, 2), event(2, 3)])
    with psycopg.connect(pg_url) as conn:  # rolled back: the with block raises
        with pytest.raises(RuntimeError), conn.transaction():
            pg_outbox.write(conn, event(1, 99))
            raise RuntimeError("the application's transaction fails")
        conn.rollback()
    with psycopg.connect(pg_url) as conn:
        pg_outbox.write(conn, event(1, 4))
    relay = OutboxRelay.postgres(pg_url, bus, table=pg_outbox.table)
    try:
        assert drain(relay) == 4
    finally:
        relay.store.close()
    assert_exact(client, {1: [1, 2, 4], 2: [3]})
    # Each row carries the cursor it was published at.
    rows = pg_rows(pg_url, pg_outbox.table)
    assert [(r[1], r[4]) for r in rows] == [(1, 1), (1, 2), (2, 1), (1, 3)]
    assert relay.metrics.published == 4 and relay.metrics.lag.count == 4


def test_write_many_keeps_the_callers_order(pg_url, pg_outbox, sqlite_path, table, bus):
    import random

    order = list(range(1, 201))
    random.Random(7).shuffle(order)
    with psycopg.connect(pg_url) as conn:
        pg_outbox.write_many(conn, [event(21 + n % 2, n) for n in order])
    with sqlite3.connect(sqlite_path) as conn:
        Outbox(table).write_many(conn, [event(23, n) for n in order])
    for relay in [
        OutboxRelay.postgres(pg_url, bus, table=pg_outbox.table),
        OutboxRelay.sqlite(sqlite_path, bus, table=table),
    ]:
        drain(relay)
        relay.store.close()
    assert_exact(
        bus.client,
        {21: [n for n in order if n % 2 == 0], 22: [n for n in order if n % 2], 23: order},
    )


def test_a_write_on_an_autocommit_connection_is_one_transaction(
    pg_url, pg_outbox, sqlite_path, table, bus, monkeypatch
):
    """The project lock and the insert must share a transaction (else the lock protects
    nothing): on an autocommit connection outside a transaction the write opens its own."""
    from publisher.outbox import db as outbox_db

    seen: list[object] = []
    original = outbox_db._Psycopg.execute

    def spy(self, sql, params):
        seen.append(self.conn.info.transaction_status)
        return original(self, sql, params)

    monkeypatch.setattr(outbox_db._Psycopg, "execute", spy)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        pg_outbox.write_many(conn, [event(71, 1), event(71, 2)])
    assert seen == [psycopg.pq.TransactionStatus.INTRANS] * 2  # lock+notify, insert

    sqlite_outbox = Outbox(table)
    conn = sqlite3.connect(sqlite_path, isolation_level=None)
    with pytest.raises(EventValidationError):
        sqlite_outbox.write_many(conn, [event(72, 1), event(72, 0)])
    sqlite_outbox.write_many(conn, [event(72, 1), event(72, 2)])
    assert not conn.in_transaction  # committed on return
    conn.close()
    relay = OutboxRelay.sqlite(sqlite_path, bus, table=table)
    drain(relay)
    relay.store.close()
    assert_exact(bus.client, {72: [1, 2]})


async def test_postgres_async_connection(pg_url, pg_outbox, bus):
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        await pg_outbox.awrite(conn, event(7, 1))
        await pg_outbox.awrite_many(conn, [event(7, 2), event(7, 3)])
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        await pg_outbox.awrite(conn, event(7, 99))
        await conn.rollback()
    with pytest.raises(TypeError, match="awrite"):
        with psycopg.connect(pg_url) as conn:
            await pg_outbox.awrite(conn, event(7, 4))
    relay = OutboxRelay.postgres(pg_url, bus, table=pg_outbox.table)
    try:
        await asyncio.to_thread(drain, relay)
    finally:
        relay.store.close()
    assert_exact(bus.client, {7: [1, 2, 3]})


def test_stale_after_defaults_to_half_the_publishers_idempotency_window(
    sqlite_path, table, redis_url
):
    """A batch read longer ago than the window's keys live must be read again, so the default
    ``stale_after`` is half the publisher's window (at most 300 s), read from its public
    ``idempotency_window``; a publisher of the user's own without one gets 300 s."""
    short = Publisher.from_url(redis_url, idempotency_window=timedelta(seconds=60))
    assert short.idempotency_window == timedelta(seconds=60)
    relays = [OutboxRelay.sqlite(sqlite_path, short, table=table)]
    default = Publisher.from_url(redis_url)
    relays.append(OutboxRelay.sqlite(sqlite_path, default, table=table))

    class OwnPublisher:  # publish(event, idempotency_key=) only
        def publish(self, event, *, idempotency_key=None):
            raise AssertionError("not called")

    relays.append(OutboxRelay.sqlite(sqlite_path, OwnPublisher(), table=table))
    try:
        assert [relay.stale_after for relay in relays] == [30.0, 300.0, 300.0]
    finally:
        for relay in relays:
            relay.store.close()
        short.close()
        default.close()


@pytest.mark.parametrize("stalled_clock", ["monotonic", "wall", "boottime"])
def test_a_batch_that_stalled_past_stale_after_on_any_clock_is_read_again(
    stalled_clock, sqlite_path, table, bus, monkeypatch
):
    """A relay frozen between reading a batch and publishing it (a suspended laptop, a paused
    VM, a stopped process) for longer than ``stale_after`` publishes nothing of that batch: it
    reads it again (another relay may have published those rows meanwhile, and their
    idempotency keys expire on Redis's clock, which went on). The stall is counted on whichever
    clock saw it: ``monotonic`` alone misses a suspend (``CLOCK_BOOTTIME`` counts it) and, on
    some hypervisors, a paused VM (the wall clock shows it once set again)."""
    with sqlite3.connect(sqlite_path) as conn:
        Outbox(table).write_many(conn, [event(5, 1), event(5, 2)])
    relay = OutboxRelay.sqlite(sqlite_path, bus, table=table, stale_after=300.0)
    real = relay_module._clocks
    stalled = ["monotonic", "wall", "boottime"].index(stalled_clock)
    readings = iter([real()])  # the batch is read at this moment, then the relay stalls

    def clocks() -> tuple[float, ...]:
        then = next(readings, None)
        if then is not None:
            return then
        now = list(real())
        now[stalled] += 301.0  # what the other clocks did not count
        return tuple(now)

    monkeypatch.setattr(relay_module, "_clocks", clocks)
    try:
        assert relay.run_once() == 0  # nothing of the stale batch is published
        assert stream_ids(bus.client, 5) == []
        monkeypatch.setattr(relay_module, "_clocks", real)
        assert relay.run_once() == 2  # read again, and published once
    finally:
        relay.store.close()
    assert_exact(bus.client, {5: [1, 2]})


def test_sqlite_commit_and_rollback(sqlite_path, table, bus):
    outbox = Outbox(table)
    conn = sqlite3.connect(sqlite_path)
    outbox.write(conn, event(3, 1))
    conn.commit()
    outbox.write(conn, event(3, 99))
    conn.rollback()
    with conn:  # sqlite3's context manager commits
        outbox.write_many(conn, [event(3, 2), event(4, 3)])
    conn.close()
    relay = OutboxRelay.sqlite(sqlite_path, bus, table=table)
    assert drain(relay) == 3
    relay.store.close()
    assert_exact(bus.client, {3: [1, 2], 4: [3]})


def test_sqlalchemy_sessions_and_connections(pg_url, pg_outbox, sqlite_path, table, bus):
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session, scoped_session, sessionmaker

    pg_engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    sqlite_engine = create_engine(f"sqlite:///{sqlite_path}")
    sqlite_outbox = Outbox(table)
    try:
        for engine, outbox, project in [
            (pg_engine, pg_outbox, 11),
            (sqlite_engine, sqlite_outbox, 12),
        ]:
            with Session(engine) as session, session.begin():
                outbox.write(session, event(project, 1))
                session.execute(text("SELECT 1"))
            with Session(engine) as session:
                outbox.write(session, event(project, 99))
                session.rollback()
            with engine.begin() as connection:
                outbox.write_many(connection, [event(project, 2), event(project, 3)])
            scoped = scoped_session(sessionmaker(engine))
            outbox.write(scoped, event(project, 4))
            scoped.commit()
            scoped.remove()
    finally:
        pg_engine.dispose()
        sqlite_engine.dispose()
    for relay in [
        OutboxRelay.postgres(pg_url, bus, table=pg_outbox.table),
        OutboxRelay.sqlite(sqlite_path, bus, table=table),
    ]:
        drain(relay)
        relay.store.close()
    assert_exact(bus.client, {11: [1, 2, 3, 4], 12: [1, 2, 3, 4]})


async def test_sqlalchemy_async_session(pg_url, pg_outbox, bus):
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    engine = create_async_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        async with AsyncSession(engine) as session, session.begin():
            await pg_outbox.awrite(session, event(13, 1))
        async with AsyncSession(engine) as session:
            await pg_outbox.awrite(session, event(13, 99))
            await session.rollback()
        async with engine.begin() as connection:
            await pg_outbox.awrite_many(connection, [event(13, 2)])
    finally:
        await engine.dispose()
    relay = OutboxRelay.postgres(pg_url, bus, table=pg_outbox.table)
    try:
        await asyncio.to_thread(drain, relay)
    finally:
        relay.store.close()
    assert_exact(bus.client, {13: [1, 2]})


async def test_sqlalchemy_async_session_and_connection_on_sqlite(sqlite_path, table, bus):
    """aiosqlite (``sqlite+aiosqlite://``): what the synchronous SQLAlchemy test does on SQLite,
    through an ``AsyncSession`` and an ``AsyncConnection``; and their snapshots."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    outbox = Outbox(table)
    engine = create_async_engine(f"sqlite+aiosqlite:///{sqlite_path}")
    relay = OutboxRelay.sqlite(sqlite_path, bus, table=table)
    try:
        async with AsyncSession(engine) as session, session.begin():
            await outbox.awrite(session, event(14, 1))
            await session.execute(text("SELECT 1"))
        async with AsyncSession(engine) as session:
            await outbox.awrite(session, event(14, 99))
            await session.rollback()
        async with engine.begin() as connection:
            await outbox.awrite_many(connection, [event(14, 2), event(15, 1)])
        async with engine.connect() as connection:
            await outbox.awrite(connection, event(14, 3))
            await connection.commit()
        await asyncio.to_thread(drain, relay)
        assert_exact(bus.client, {14: [1, 2, 3], 15: [1]})

        def commit_another_event() -> None:
            with contextlib.closing(sqlite3.connect(sqlite_path)) as other, other:
                outbox.write(other, event(14, 100))

        async def read(conn) -> int:
            # Another connection commits an event of the project while the snapshot reads: the
            # snapshot sees neither it nor its row (else it would wait for its publish).
            counted = f"SELECT count(*) FROM {table} WHERE project_id = 14"
            before = (await conn.execute(text(counted))).scalar_one()
            commit_another_event()
            assert (await conn.execute(text(counted))).scalar_one() == before
            return before

        for connect in (lambda: AsyncSession(engine), engine.connect):
            async with connect() as conn:
                await asyncio.to_thread(drain, relay)  # (the event the last read committed)
                snap = await outbox.asnapshot(conn, 14, read, max_wait=0.5)
                assert snap.data == snap.cursor.seq  # the cursor covers exactly the data
                assert not conn.in_transaction()
                await asyncio.to_thread(drain, relay)  # the event committed meanwhile
                again = await outbox.asnapshot(conn, 14, read, max_wait=0.5)
                assert again.cursor.seq == snap.cursor.seq + 1 == again.data
                async with conn.begin():
                    with pytest.raises(InTransaction):
                        await outbox.asnapshot(conn, 14, read)
    finally:
        relay.store.close()
        await engine.dispose()


# --- the relay under faults --------------------------------------------------------------------


def _write_committed(url: str, outbox: Outbox, events: list[BlockerResolved]) -> None:
    with psycopg.connect(url) as conn:
        outbox.write_many(conn, events)


def test_relay_killed_mid_batch_then_a_new_relay_publishes_each_event_exactly_once(
    pg_url, pg_outbox, bus, redis_url
):
    events = [event(1 + n % 2, n) for n in range(1, 401)]
    _write_committed(pg_url, pg_outbox, events)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [
            sys.executable, "-m", "publisher.outbox", "relay",
            "--dsn", pg_url, "--table", pg_outbox.table,
            "--redis-url", redis_url,
            "--max-rate", "400", "--batch-size", "500", "--poll-interval", "0.1",
        ],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    client = bus.client
    try:
        # At 400 events/s the first batch (all 400 rows) takes a second to publish and is marked
        # only at its end: kill the relay in the middle of it.
        wait_until(lambda: len(stream_ids(client, 1)) + len(stream_ids(client, 2)) >= 60)
    finally:
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=10)
    in_stream = len(stream_ids(client, 1)) + len(stream_ids(client, 2))
    marked = sum(1 for r in pg_rows(pg_url, pg_outbox.table) if r[3] is not None)
    assert 0 < in_stream < 400, stderr
    assert marked < in_stream  # published but not marked: the new relay must republish them
    relay = OutboxRelay.postgres(pg_url, bus, table=pg_outbox.table)
    try:
        drain(relay)
    finally:
        relay.store.close()
    assert_exact(client, blocker_ids_by_project(pg_url, pg_outbox.table))
    rows = pg_rows(pg_url, pg_outbox.table)
    assert len(rows) == 400 and all(r[4] is not None for r in rows)


@pytest.mark.parametrize("leader", [False, True], ids=["no-leader", "leader"])
def test_two_relays_at_once_keep_each_projects_commit_order(pg_url, pg_outbox, bus, leader):
    """Writers on three threads (projects interleaved, transactions of 1-3 events), two relays
    running at the same time with small batches. Without leader election both publish the same
    rows concurrently: the idempotency keys and in-order publishing keep the stream exact."""
    relays = [
        OutboxRelay.postgres(
            pg_url, bus, table=pg_outbox.table, leader=leader, batch_size=7, poll_interval=0.05,
            max_rate=None,
        ).start()
        for _ in range(2)
    ]  # fmt: skip
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        try:
            with psycopg.connect(pg_url) as conn:
                for n in range(60):
                    size = 1 + (n + worker) % 3
                    # write_many locks the projects in one fixed order: no deadlock between
                    # transactions writing the same projects (see Outbox).
                    pg_outbox.write_many(
                        conn,
                        [
                            event(1 + (n + k + worker) % 3, 1 + worker * 1000 + n * 10 + k)
                            for k in range(size)
                        ],
                    )
                    conn.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors
        with psycopg.connect(pg_url) as conn:
            wait_until(
                lambda: (
                    conn.execute(
                        f"SELECT count(*) FROM {pg_outbox.table} WHERE published_at IS NULL"
                    ).fetchone()[0]
                    == 0
                )
            )
    finally:
        for relay in relays:
            relay.stop()
    expected = blocker_ids_by_project(pg_url, pg_outbox.table)
    assert sum(map(len, expected.values())) == 3 * 60 * 2
    assert_exact(bus.client, expected)
    if leader:
        assert sorted(r.metrics.published > 0 for r in relays) in ([False, True], [True, True])


def test_redis_down_then_back_the_outbox_grows_then_drains_in_order(pg_url, pg_outbox):
    with RedisServer() as server:
        publisher = Publisher.from_url(server.url)
        relay = OutboxRelay.postgres(
            pg_url, publisher, table=pg_outbox.table, poll_interval=0.05, max_backoff=0.2,
            backlog_interval=0.02,
        ).start()  # fmt: skip
        try:
            _write_committed(pg_url, pg_outbox, [event(1, n) for n in range(1, 11)])
            wait_until(lambda: len(stream_ids(server.client(), 1)) == 10)
            with structlog.testing.capture_logs() as logs:
                server.kill()
                during = [event(1 + n % 3, n) for n in range(100, 250)]
                for start in range(0, len(during), 10):
                    _write_committed(pg_url, pg_outbox, during[start : start + 10])
                wait_until(lambda: relay.metrics.unavailable >= 2 and relay.metrics.backlog == 150)
                server.start()  # back, empty: a new epoch for every project
                wait_until(lambda: relay.metrics.backlog == 0 and relay.metrics.published == 160)
        finally:
            relay.stop()
            publisher.close()
        # One warning for the whole outage (however many retries), one line when it ends.
        names = [entry["event"] for entry in logs]
        assert names.count("outbox_redis_unavailable") == 1
        assert names.count("outbox_redis_available") == 1
        expected: dict[int, list[int]] = {}
        for e in during:
            expected.setdefault(e.project_id, []).append(e.blocker_id)
        assert_exact(server.client(), expected)


def test_the_relay_reconnects_after_its_database_sessions_are_killed(pg_url, pg_outbox, bus):
    relay = OutboxRelay.postgres(
        pg_url, bus, table=pg_outbox.table, poll_interval=0.05, max_backoff=0.2
    ).start()
    try:
        _write_committed(pg_url, pg_outbox, [event(1, n) for n in range(1, 21)])
        wait_until(lambda: relay.metrics.published == 20)
        relay_sessions = (
            "FROM pg_stat_activity "
            "WHERE application_name = 'eventbus-outbox-relay' AND datname = current_database()"
        )
        with psycopg.connect(pg_url, autocommit=True) as admin:
            # The LISTEN session is opened when the relay first waits: after the 20 are
            # published if its first batch found them (a relay thread late to start).
            wait_until(
                lambda: admin.execute(f"SELECT count(*) {relay_sessions}").fetchone()[0] >= 2
            )
            killed = admin.execute(
                f"SELECT count(pg_terminate_backend(pid)) {relay_sessions}"
            ).fetchone()[0]
        assert killed >= 2  # its work and LISTEN sessions
        _write_committed(pg_url, pg_outbox, [event(1, n) for n in range(21, 41)])
        wait_until(lambda: relay.metrics.published == 40)
        assert relay.metrics.errors >= 1
    finally:
        relay.stop()
    assert_exact(bus.client, {1: list(range(1, 41))})


def test_a_hung_database_holds_up_the_relay_only_for_its_statement_timeout(pg_url, pg_outbox, bus):
    """PostgreSQL stopped with its sockets open (SIGSTOP, a frozen VM; a frozen proxy here):
    nothing refuses, nothing answers. Each of the relay's statements ends within the store's
    ``timeout``: the relay reports it and reconnects with backoff, publishes again once the
    database answers, and ``stop()`` returns with the thread ended. Before, the relay waited
    for the answer forever without a word, and ``stop()`` left its thread running."""
    proxy = FreezableProxy("127.0.0.1", int(pg_url.rpartition(":")[2].partition("/")[0]))
    url = pg_url.replace(":5432/", f":{proxy.port}/")
    relay = OutboxRelay(
        PostgresOutboxStore(url, pg_outbox.table, timeout=1.0),
        bus,
        poll_interval=0.1,
        max_backoff=0.2,
    ).start()
    try:
        _write_committed(pg_url, pg_outbox, [event(1, 1)])
        wait_until(lambda: len(stream_ids(bus.client, 1)) == 1)
        proxy.freeze()
        _write_committed(pg_url, pg_outbox, [event(1, 2)])
        wait_until(lambda: relay.metrics.errors >= 2, timeout=8)  # noticed, again and again
        proxy.thaw()
        wait_until(lambda: len(stream_ids(bus.client, 1)) == 2)
        proxy.freeze()
        time.sleep(0.3)  # the relay is inside a statement or about to start one
        thread, started = relay._thread, time.monotonic()
        relay.stop(timeout=5)
        assert time.monotonic() - started < 4
        assert thread is not None and not thread.is_alive()
    finally:
        relay._stop.set()
        proxy.close()
    assert_exact(bus.client, {1: [1, 2]})


def test_stop_returns_within_its_timeout_while_the_database_hangs(pg_url, pg_outbox, bus):
    """``stop(timeout)`` against a hung PostgreSQL (a frozen proxy): it returns within its
    ``timeout``, with the relay thread ended. stop() sent its waking NOTIFY and waited for it
    first, which a hung database answers only at the deadline (30 s by default), whatever
    ``timeout`` the caller gave; then it closed the store only once ``timeout`` had run out,
    so the thread waiting in a statement ended after stop returned (and one connecting, at the
    connect timeout: see the next test)."""
    proxy = FreezableProxy("127.0.0.1", int(pg_url.rpartition(":")[2].partition("/")[0]))
    url = pg_url.replace(":5432/", f":{proxy.port}/")
    relay = OutboxRelay(
        PostgresOutboxStore(url, pg_outbox.table, timeout=5.0),
        bus,
        poll_interval=0.2,
        max_backoff=0.2,
    ).start()
    try:
        _write_committed(pg_url, pg_outbox, [event(1, 1)])
        wait_until(lambda: len(stream_ids(bus.client, 1)) == 1)
        proxy.freeze()
        time.sleep(0.5)  # the relay is inside a statement, or waiting for a notification
        thread, started = relay._thread, time.monotonic()
        relay.stop(timeout=2.5)
        assert time.monotonic() - started < 3.5  # a statement's own timeout is 5 s
        assert thread is not None and not thread.is_alive()
    finally:
        relay._stop.set()
        proxy.close()
    assert_exact(bus.client, {1: [1]})


def test_stop_ends_a_connect_that_a_hung_database_never_answers(pg_url, pg_outbox, bus):
    """PostgreSQL accepts TCP but never answers the startup (a frozen proxy from the start: a
    hung server, a frozen VM). The relay thread, and stop's own wake-up, wait in psycopg's
    connect; ``stop(timeout)`` returns within its timeout with both ended, and the row waits
    in the table: the same relay started again once the database answers publishes it. Before,
    nothing interrupted a connect: the relay thread and its socket stayed until the connect
    timeout, here 30 s (the store's ``timeout``)."""
    _write_committed(pg_url, pg_outbox, [event(1, 1)])
    proxy = FreezableProxy("127.0.0.1", int(pg_url.rpartition(":")[2].partition("/")[0]))
    proxy.freeze()
    url = pg_url.replace(":5432/", f":{proxy.port}/")
    relay = OutboxRelay(
        PostgresOutboxStore(url, pg_outbox.table), bus, poll_interval=0.1, max_backoff=0.2
    ).start()
    before = set(threading.enumerate())
    try:
        wait_until(lambda: proxy._sockets)  # the relay thread is connecting
        time.sleep(0.2)
        thread, started = relay._thread, time.monotonic()
        relay.stop(timeout=3.0)
        assert time.monotonic() - started < 4.5  # the connect's own timeout is 30 s
        assert thread is not None and not thread.is_alive()
        wakers = [t for t in threading.enumerate() if t.name == "outbox-relay-stop"]
        assert not [t for t in wakers if t not in before]  # stop's wake-up ended too
        assert not relay.store._running
        assert stream_ids(bus.client, 1) == []
        proxy.thaw()
        relay.start()
        wait_until(lambda: len(stream_ids(bus.client, 1)) == 1)
        relay.stop()
    finally:
        relay._stop.set()
        proxy.close()
    assert_exact(bus.client, {1: [1]})


def sessions_left(url: str, pids: list[int]) -> int:
    """How many of these PostgreSQL sessions are still there (the relay's name, this database)."""
    with psycopg.connect(url, autocommit=True) as admin:
        return admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) "
            "AND application_name = 'eventbus-outbox-relay' AND datname = current_database()",
            [pids],
        ).fetchone()[0]


def recording_connects(store: PostgresOutboxStore) -> tuple[list, list[int]]:
    """Wrap the store's ``_connect``: each connection it makes, and its session's pid, are
    appended to the returned lists (which keep it from the garbage collector: it is closed only
    if the store closes it)."""
    connect, made, pids = store._connect, [], []

    def recorded() -> Any:
        conn = connect()
        made.append(conn)
        pids.append(conn.info.backend_pid)
        return conn

    store._connect = recorded
    return made, pids


def test_a_wake_and_the_relay_that_connect_at_once_leave_no_connection_open(pg_url, pg_outbox):
    """An application's ``wake()`` (a NOTIFY on the work connection) and the relay thread both
    find no work connection (at start, or after a reset) and connect at once: here each connect
    waits for the other's before returning. Both statements run, on one connection; the other
    is closed at once, and ``close()`` leaves no session. Before, each thread stored its own in
    turn and the one overwritten was never closed by the store: it stayed open until the
    garbage collector got to it (with a ResourceWarning), holding the leader lock if it had
    taken it."""
    store = PostgresOutboxStore(pg_url, pg_outbox.table)
    both = threading.Barrier(2, timeout=10)
    made, pids = recording_connects(store)
    connect = store._connect

    def connect_with_the_other() -> Any:
        conn = connect()
        both.wait()  # both threads have connected before either stores its connection
        return conn

    store._connect = connect_with_the_other
    waker = threading.Thread(target=store.wake, daemon=True)  # the application's thread
    waker.start()
    try:
        assert store.backlog() == 0  # the relay's thread
        waker.join(10)
        assert not waker.is_alive() and both.n_waiting == 0 and not both.broken
        assert len(made) == 2
        kept = [conn for conn in made if not conn.closed]
        assert kept == [store._work]
    finally:
        store.close()
    assert all(conn.closed for conn in made)
    wait_until(lambda: sessions_left(pg_url, pids) == 0, timeout=5)


def test_a_relay_thread_that_connects_after_stop_leaves_no_connection_open(pg_url, pg_outbox, bus):
    """stop() runs while the relay thread, and stop's own wake-up, are connecting to PostgreSQL
    (here each connect returns only once stop has returned; in life a slow or hung server, which
    libpq lets take up to the connect timeout): stop returns within its timeout, and the
    connections that arrive after it are closed at once; an application's ``wake()`` after stop
    opens none. Before, each was stored and used after ``close()``, and stayed open with the
    stopped relay."""
    store = PostgresOutboxStore(pg_url, pg_outbox.table)
    made, pids = recording_connects(store)
    connect, connecting, go_on = store._connect, threading.Semaphore(0), threading.Event()

    def connect_after_stop() -> Any:
        conn = connect()
        connecting.release()
        assert go_on.wait(10)  # the connect returns only now
        return conn

    store._connect = connect_after_stop
    relay = OutboxRelay(store, bus, poll_interval=0.05, max_backoff=0.1).start()
    thread = relay._thread
    try:
        assert connecting.acquire(timeout=10)  # the relay thread is connecting
        started = time.monotonic()
        relay.stop(timeout=3.0)
        assert time.monotonic() - started < 4.5  # the connect returns only after it (or 10 s)
        assert connecting.acquire(timeout=10)  # so is stop's wake-up (and stays so)
    finally:
        go_on.set()
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()
    wait_until(lambda: len(made) == 2 and all(conn.closed for conn in made))
    relay.wake()  # an application's, after stop: nothing to wake, nothing to connect
    assert len(made) == 2
    wait_until(lambda: sessions_left(pg_url, pids) == 0, timeout=5)


def test_a_row_lock_held_by_another_session_leaves_no_relay_session_behind(pg_url, pg_outbox, bus):
    """Another session holds a row lock on an outbox row (``SELECT ... FOR UPDATE``, or a
    hand-made ``UPDATE``, in a transaction left open): the relay publishes the row and its mark
    waits for the lock. ``stop(timeout)`` returns within its timeout, and the relay's session
    ends on the server too while the lock is still held; once the lock is released, the relay
    started again marks the row with the cursor it kept: nothing lost, nothing duplicated.
    Before, the session whose socket stop() shut down stayed on the server waiting for the
    lock (PostgreSQL notices a client gone only when it next reads from it), with the row locks
    its UPDATE had taken, and marked the rows after the relay had stopped; a relay whose
    statement timed out on such a lock left one more such session each time."""
    _write_committed(pg_url, pg_outbox, [event(1, 1)])
    store = PostgresOutboxStore(pg_url, pg_outbox.table)
    _, pids = recording_connects(store)
    relay = OutboxRelay(store, bus, poll_interval=0.05)
    with psycopg.connect(pg_url) as holder, psycopg.connect(pg_url, autocommit=True) as admin:
        holder.execute(f"SELECT id FROM {pg_outbox.table} FOR UPDATE")
        relay.start()
        thread = relay._thread
        wait_until(
            lambda: admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) "
                "AND wait_event_type = 'Lock'",
                [pids],
            ).fetchone()[0]
        )  # published, and its mark waits for the row lock
        started = time.monotonic()
        relay.stop(timeout=3.0)
        assert time.monotonic() - started < 4.5  # the lock is held until the rollback below
        assert thread is not None and not thread.is_alive()
        wait_until(lambda: sessions_left(pg_url, pids) == 0, timeout=5)  # lock still held
        holder.rollback()
    assert [r[4] for r in pg_rows(pg_url, pg_outbox.table)] == [None]  # not marked after stop
    relay.start()
    try:
        wait_until(lambda: relay.metrics.published == 1)
    finally:
        relay.stop()
    assert [r[4] for r in pg_rows(pg_url, pg_outbox.table)] == [1]
    assert_exact(bus.client, {1: [1]})


def test_a_sqlite_relay_that_connects_after_stop_leaves_no_connection_open_and_starts_again(
    sqlite_path, table, bus, monkeypatch
):
    """The SQLite store closes like the PostgreSQL one: stop() runs while the relay thread is
    connecting (here ``sqlite3.connect`` returns only once stop has returned; in life a slow
    file system, or a thread descheduled there). The late connection is closed at once and
    used for nothing; the row waits in the table, and the relay started again publishes it.
    Before, ``close()`` only dropped the connection there was: the late one was stored, the
    stopped relay published the row with it, and it stayed open."""
    with sqlite3.connect(sqlite_path) as conn:
        Outbox(table).write(conn, event(1, 1))
    connect, made = sqlite3.connect, []
    connecting, go_on = threading.Semaphore(0), threading.Event()

    def connect_after_stop(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)
        if threading.current_thread().name == "outbox-relay":
            made.append(conn)
            if len(made) == 1:
                connecting.release()
                assert go_on.wait(10)  # the first connect returns only now
        return conn

    def closed(conn: sqlite3.Connection) -> bool:
        try:
            conn.execute("SELECT 1")
        except sqlite3.ProgrammingError:  # "Cannot operate on a closed database."
            return True
        return False

    monkeypatch.setattr(sqlite3, "connect", connect_after_stop)
    relay = OutboxRelay.sqlite(sqlite_path, bus, table=table, poll_interval=0.05, max_backoff=0.1)
    relay.start()
    thread = relay._thread
    try:
        assert connecting.acquire(timeout=10)  # the relay thread is connecting
        started = time.monotonic()
        relay.stop(timeout=3.0)
        assert time.monotonic() - started < 4.5  # the connect returns only after it (or 10 s)
    finally:
        go_on.set()
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()
    assert len(made) == 1 and closed(made[0])
    assert stream_ids(bus.client, 1) == []  # nothing published after stop, nothing lost
    relay.start()  # stopped, then started again
    try:
        wait_until(lambda: len(stream_ids(bus.client, 1)) == 1)
    finally:
        relay.stop()
    assert len(made) == 2 and all(closed(conn) for conn in made)
    assert_exact(bus.client, {1: [1]})


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_a_connect_that_ends_after_close_is_closed_at_once_and_used_for_nothing(
    kind, pg_url, pg_outbox, sqlite_path, table
):
    """The store itself, without a relay: ``close()`` runs (from another thread, in life: the
    relay's ``stop``) while a connect is under way. The connection that arrives after it is
    closed at once and the call fails as on a closed store, so no statement runs on it and
    nothing holds it open. The relay tests above catch a missing check only now and then (the
    relay's own reset after its next error often closed the leftover connection anyway)."""
    if kind == "postgres":
        store: Any = PostgresOutboxStore(pg_url, pg_outbox.table)
        closed_error: type[Exception] = psycopg.OperationalError
    else:
        store = SQLiteOutboxStore(sqlite_path, table)
        closed_error = sqlite3.OperationalError
    connect, made = store._connect, []

    def connect_then_closed() -> Any:
        conn = connect()
        made.append(conn)
        store.close()  # closed while this connect was under way
        return conn

    store._connect = connect_then_closed
    with pytest.raises(closed_error, match="the store is closed"):
        store.backlog()
    assert len(made) == 1
    if kind == "postgres":
        assert made[0].closed
    else:
        with pytest.raises(sqlite3.ProgrammingError):  # "Cannot operate on a closed database."
            made[0].execute("SELECT 1")
    with pytest.raises(closed_error, match="the store is closed"):
        store.backlog()  # and no connect starts on the closed store
    assert len(made) == 1


def test_the_store_closed_while_a_statement_waits_ends_it_and_harms_no_other_socket(
    pg_url, pg_outbox
):
    """The store closed from another thread while one of its statements waits (what
    ``OutboxRelay.stop`` does once ``join(timeout)`` gives up on the thread, and a reset after a
    failure does while an application thread's ``wake()`` waits). libpq used to close the
    connection's descriptor at once: the next socket opened in the process got its number, the
    statement went on waiting on that socket, and its deadline, when it fired, shut that
    socket down (here a socket pair; in an application, any connection of its own, or the
    publisher's to Redis). Now the statement ends at once, and no other socket is touched."""
    import socket

    store = PostgresOutboxStore(pg_url, pg_outbox.table, timeout=1.5)
    pid = store._conn().info.backend_pid
    outcome: list[tuple[BaseException | None, float]] = []

    def slow_statement() -> None:
        try:
            store._q("SELECT pg_sleep(3)", {})
            outcome.append((None, time.monotonic()))
        except BaseException as exc:  # recorded for the assertion below
            outcome.append((exc, time.monotonic()))

    def sleeping() -> bool:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            query = "SELECT query FROM pg_stat_activity WHERE pid = %s AND state = 'active'"
            return admin.execute(query, [pid]).fetchone() == ("SELECT pg_sleep(3)",)

    thread = threading.Thread(target=slow_statement, daemon=True)
    thread.start()
    wait_until(sleeping)  # the statement waits for PostgreSQL (a sleep of 0.3 s hoped so)
    closed = time.monotonic()
    store.close()  # from this thread, as stop() does
    others = [socket.socketpair() for _ in range(4)]  # (one got the freed number before)
    try:
        time.sleep(1.7)  # past the statement's deadline (1.5 s)
        for left, right in others:
            left.sendall(b"ping")  # EPIPE once shut down
            assert right.recv(4) == b"ping"
            right.sendall(b"pong")
            assert left.recv(4) == b"pong"
        thread.join(2)
        assert len(outcome) == 1
        error, ended = outcome[0]
        assert isinstance(error, psycopg.OperationalError)
        assert ended - closed < 0.5  # at once: not at its deadline, nor the statement's end
        assert store._work is None and not store._running
    finally:
        for pair in others:
            for sock in pair:
                sock.close()


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_stop_returns_within_its_timeout_while_another_sqlite_writer_holds_the_lock(
    tmp_path, table, bus, journal
):
    """Another connection holds SQLite's lock (an application transaction left open): in WAL
    mode the relay has published a row and waits to mark it; in rollback-journal mode an
    exclusive lock keeps it from even reading the table. ``stop(timeout)`` returns within its
    timeout with the thread ended, and once the lock is released the relay started again
    publishes the row (WAL: marks it with the cursor it kept): nothing lost, nothing
    duplicated. Before, the statement waited in SQLite's busy handler for up to 30 s; stop()
    closed the connection under it from its own thread, which waited for the statement and
    then crashed the process (a segmentation fault, here when a timer released the lock after
    5 s)."""
    sqlite_path = str(tmp_path / f"{journal}.db")
    with contextlib.closing(sqlite3.connect(sqlite_path)) as conn, conn:
        conn.execute(f"PRAGMA journal_mode={journal}")
        Outbox(table).create_table(conn)
        Outbox(table).write(conn, event(1, 1))
    holder = sqlite3.connect(sqlite_path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE" if journal == "wal" else "BEGIN EXCLUSIVE")
    release = threading.Timer(10, holder.rollback)  # well after stop's bound (4.5 s)
    release.start()
    relay = OutboxRelay.sqlite(sqlite_path, bus, table=table, poll_interval=0.05)
    relay.start()
    thread = relay._thread
    try:
        if journal == "wal":
            wait_until(lambda: len(stream_ids(bus.client, 1)) == 1)  # published, to be marked
        else:
            wait_until(lambda: relay.store._using)  # reading, or waiting to
        started = time.monotonic()
        relay.stop(timeout=3.0)
        assert time.monotonic() - started < 4.5  # the lock is held for 10 s
        assert thread is not None and not thread.is_alive()
    finally:
        release.cancel()
        holder.rollback()
        holder.close()
    with sqlite3.connect(sqlite_path) as conn:
        assert conn.execute(f"SELECT count(*) FROM {table} WHERE seq IS NULL").fetchone()[0] == 1
    relay.start()
    try:
        wait_until(lambda: relay.metrics.published == 1)
    finally:
        relay.stop()
    with sqlite3.connect(sqlite_path) as conn:
        assert conn.execute(f"SELECT seq FROM {table}").fetchall() == [(1,)]
    assert_exact(bus.client, {1: [1]})


def test_a_relay_whose_publish_outlasts_stop_publishes_no_further_round_trip(sqlite_path, table):
    """stop() returns while the relay thread still waits for a hung Redis (which stop cannot cut
    short); when Redis answers, the thread ends with that round trip: none of the batch's later
    rows is published after stop (they wait in the table for the next relay). Before, the thread
    went on with the batch, chunk after chunk, after stop had returned and closed the store (a
    SQLite store, and a PostgreSQL store without leader election, ask no database before a
    round trip): here all 300 rows, 200 of them after stop, none of them marked."""
    with _relay_behind_a_frozen_redis(sqlite_path, table) as (relay, proxy, redis_server):
        relay.start()
        thread = relay._thread
        proxy.wait_held(b"EVALSHA")  # the first chunk's round trip waits for Redis
        relay.stop(timeout=1.0)
        assert thread is not None and thread.is_alive()  # still in that round trip
        proxy.thaw()
        thread.join(10)
        assert not thread.is_alive()
        published = stream_ids(redis_server.client(), 1)
        assert [b for _, b in published] == list(range(1, CHUNK + 1))


@contextlib.contextmanager
def _relay_behind_a_frozen_redis(sqlite_path: str, table: str):
    """3 x CHUNK rows of project 1, and a relay (not started) whose Redis is reached through a
    proxy frozen once the publisher is connected and its script loaded (the first round trip
    publishes once answered): yields ``(relay, proxy, redis_server)``."""
    with sqlite3.connect(sqlite_path) as conn:
        Outbox(table).write_many(conn, [event(1, n) for n in range(1, 3 * CHUNK + 1)])
    with RedisServer() as redis_server:
        proxy = FreezableProxy("127.0.0.1", redis_server.port)
        publisher = Publisher.from_url(f"redis://127.0.0.1:{proxy.port}/0", timeout=60)
        relay = OutboxRelay.sqlite(sqlite_path, publisher, table=table, max_rate=None)
        try:
            publisher.publish(event(2, 1))
            proxy.freeze()
            yield relay, proxy, redis_server
        finally:
            proxy.close()
            publisher.close()


def test_start_refuses_while_a_thread_that_stop_gave_up_on_still_runs(sqlite_path, table):
    """stop() returns while the relay thread waits for a hung Redis; start() meanwhile raises
    (as does a second start() of a running relay), and once that thread has ended with its
    round trip, start() runs the relay again: one thread at a time, every row once, in order.
    Before, start() cleared the stop flag both threads share: the old thread took up its loop
    again beside the new one (2 relay threads on one store and one SQLite connection)."""
    with _relay_behind_a_frozen_redis(sqlite_path, table) as (relay, proxy, redis_server):
        try:
            relay.start()
            old = relay._thread
            with pytest.raises(RuntimeError):
                relay.start()
            proxy.wait_held(b"EVALSHA")
            relay.stop(timeout=1.0)
            assert old is not None and old.is_alive()
            with pytest.raises(RuntimeError):
                relay.start()
            proxy.thaw()
            old.join(10)
            assert not old.is_alive()
            relay.start()
            wait_until(lambda: relay.store.backlog() == 0)
            assert [t.name for t in threading.enumerate()].count("outbox-relay") == 1
        finally:
            relay.stop()
        assert [b for _, b in stream_ids(redis_server.client(), 1)] == list(range(1, 3 * CHUNK + 1))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_row_is_marked_once_and_a_late_retry_keeps_the_newer_cursor(
    kind, sqlite_path, pg_url, pg_outbox, table
):
    """A relay keeps the marks that failed and retries them at its next batch, which may come
    after another relay published and marked the rows (a new epoch's cursor, say): the late
    retry used to overwrite that cursor with its older one."""
    if kind == "sqlite":
        with sqlite3.connect(sqlite_path) as conn:
            Outbox(table).write_many(conn, [event(1, 1), event(1, 2)])
        store: Any = SQLiteOutboxStore(sqlite_path, table)
    else:
        with psycopg.connect(pg_url) as conn:
            pg_outbox.write_many(conn, [event(1, 1), event(1, 2)])
        store = PostgresOutboxStore(pg_url, table)
    try:
        first, second = store.fetch(10, [])
        store.mark([(first.id, Cursor("e-new", 1)), (second.id, Cursor("e-new", 2))])
        store.mark([(first.id, Cursor("e-old", 7)), (second.id, Cursor("e-old", 8))])
        assert store.fetch(10, []) == []
    finally:
        store.close()
    if kind == "sqlite":
        with sqlite3.connect(sqlite_path) as conn:
            marked = conn.execute(f"SELECT epoch, seq FROM {table} ORDER BY id").fetchall()
    else:
        marked = [(epoch, seq) for _, _, _, epoch, seq in pg_rows(pg_url, table)]
    assert marked == [("e-new", 1), ("e-new", 2)]


def test_a_sqlite_store_waits_for_another_writers_lock_up_to_its_timeout(sqlite_path, table):
    """The relay's SQLite statements wait for another connection's lock (released here by a
    timer after 0.3 s) and then succeed; a lock held longer than the store's ``timeout`` fails
    the statement with ``database is locked`` once that time is up, not before."""
    with sqlite3.connect(sqlite_path) as conn:
        Outbox(table).write(conn, event(1, 1))
    store = SQLiteOutboxStore(sqlite_path, table, timeout=1.0)
    holder = sqlite3.connect(sqlite_path, isolation_level=None, check_same_thread=False)
    try:
        (row,) = store.fetch(10, [])
        holder.execute("BEGIN IMMEDIATE")
        threading.Timer(0.3, holder.rollback).start()
        store.mark([(row.id, Cursor("e", 1))])  # waited for the lock
        assert store.fetch(10, []) == []
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.cleanup(timedelta(minutes=1), 10)
        assert 1.0 <= time.monotonic() - started < 2.0
    finally:
        holder.close()
        store.close()


def test_rows_whose_marks_keep_failing_are_not_published_again(tmp_path, table, redis_url):
    """The database keeps refusing the relay's marks (here a trigger; in life another
    session's row lock held past the store's timeout, a read-only database, a revoked
    privilege) for longer than the idempotency window. The relay retries the marks it owes
    before it publishes anything else, so the row is published once; when the database
    accepts the marks again, the row is marked with its cursor. Before, every batch published
    the row again, a no-op only within the idempotency window: after it, each republish was a
    new event in the stream (a duplicate every window, for as long as the marks failed)."""
    path = str(tmp_path / "app.db")
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        Outbox(table).create_table(conn)
        Outbox(table).write(conn, event(1, 1))
        conn.execute(
            f"CREATE TRIGGER refuse BEFORE UPDATE ON {table} "
            "BEGIN SELECT RAISE(ABORT, 'marks refused'); END"
        )
    window = timedelta(seconds=1)
    publisher = Publisher.from_url(redis_url, idempotency_window=window)
    relay = OutboxRelay.sqlite(path, publisher, table=table, poll_interval=0.05, max_backoff=0.1)
    relay.start()
    try:
        wait_until(lambda: relay.metrics.errors >= 1)  # published, its mark refused
        refused = time.monotonic()
        wait_until(lambda: time.monotonic() - refused > 2.5 * window.total_seconds())
        assert relay.metrics.errors >= 5  # the marks were retried meanwhile
        assert stream_ids(publisher.client, 1) == [(1, 1)]
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("DROP TRIGGER refuse")
        wait_until(lambda: relay.metrics.published == 1)
        relay.stop()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute(f"SELECT seq FROM {table}").fetchall() == [(1,)]
        assert_exact(publisher.client, {1: [1]})
    finally:
        relay.stop()
        publisher.close()


def test_the_catch_up_after_an_outage_is_paced_by_max_rate(sqlite_path, table, bus):
    """3,000 queued rows at max_rate=1,000/s: the relay sleeps (on a fake clock here) so that
    publishing them takes at least (3,000 - one burst) / 1,000 s, in chunks of one burst."""
    with sqlite3.connect(sqlite_path) as conn:
        Outbox(table).write_many(conn, [event(1 + n % 4, n) for n in range(1, 3001)])
    relay = OutboxRelay.sqlite(sqlite_path, bus, table=table, max_rate=1000)
    now = [0.0]
    relay.limiter = RateLimiter(1000, clock=lambda: now[0])  # bursts of 100
    slept: list[float] = []

    def fake_wait(seconds: float) -> bool:
        slept.append(seconds)
        now[0] += seconds
        return False

    relay._stop.wait = fake_wait
    published_per_chunk = []
    original = relay._keyed.publish

    def counting(items):
        published_per_chunk.append(len(items))
        return original(items)

    relay._keyed.publish = counting
    assert drain(relay) == 3000
    relay.store.close()
    assert max(published_per_chunk) == 100
    assert sum(slept) == pytest.approx((3000 - 100) / 1000)
    expected: dict[int, list[int]] = {}
    for n in range(1, 3001):
        expected.setdefault(1 + n % 4, []).append(n)
    assert_exact(bus.client, expected)


def test_a_relay_that_stands_by_reports_no_backlog_of_its_own(sqlite_path, table, bus):
    """The backlog and the oldest row's age are counted by the leader only: a relay that lost
    the lead kept reporting its last counts (a standby never counts), as if they were
    current, for as long as it stood by."""
    with sqlite3.connect(sqlite_path) as conn:
        Outbox(table).write_many(conn, [event(1, n) for n in range(1, 4)])

    class LeadsUntilTold(SQLiteOutboxStore):
        leading = True

        def lead(self) -> bool:
            return self.leading

    relay = OutboxRelay(LeadsUntilTold(sqlite_path, table), bus, batch_size=2, hold_interval=0)
    try:
        assert relay.run_once() == 2
        relay._housekeeping()
        assert relay.metrics.backlog == 1 and relay.metrics.oldest_pending_s is not None
        relay.store.leading = False  # another relay took the lead
        assert relay.run_once() == 0 and not relay.metrics.leader
        assert relay.metrics.backlog is None and relay.metrics.oldest_pending_s is None
        assert relay.run_once() == 0 and relay.metrics.backlog is None
    finally:
        relay.store.close()


def test_a_leader_that_loses_the_lead_mid_batch_publishes_at_most_one_round_trip_more(
    sqlite_path, table, bus
):
    """The relay asks whether it still leads before each Redis round trip of a batch (100 rows),
    not only before each rate-limit burst (a whole 500-row batch by default): a leader frozen
    in the middle of a batch, whose lease ended meanwhile, sends at most the round trip it was
    about to send once it runs again. Before, it sent the rest of the batch (no-op republishes
    of rows the new leader had published, but publishes all the same)."""
    with sqlite3.connect(sqlite_path) as conn:
        Outbox(table).write_many(conn, [event(1 + n % 2, n) for n in range(1, 501)])

    class LeadLostAfterFirstRoundTrip(SQLiteOutboxStore):
        asked = 0

        def lead(self) -> bool:
            self.asked += 1
            return self.asked <= 2  # the batch's question and its first round trip's

    relay = OutboxRelay(LeadLostAfterFirstRoundTrip(sqlite_path, table), bus)
    try:
        assert relay.run_once() == CHUNK
        assert not relay.metrics.leader  # a standby now: run() waits as one
    finally:
        relay.store.close()
    assert_exact(bus.client, {1: list(range(2, 101, 2)), 2: list(range(1, 100, 2))})


def test_a_leader_asks_whether_it_leads_before_each_retry_round_trip_of_a_chunk(
    sqlite_path, table, bus
):
    """A round trip that Redis refuses for one project (a damaged key) is followed, within the
    same chunk, by another one with the rest: the lead is asked before it too. Before, those
    round trips ran without asking: a leader frozen between them sent them once it ran again
    (publishes after losing the lead), and a healthy leader against a slow Redis ran no
    statement during all of them, which ended its session at the lease."""
    with sqlite3.connect(sqlite_path) as conn:
        Outbox(table).write_many(conn, [event(81 + n % 3, n) for n in range(1, 31)])
    damaged = ["eventbus:{82}:meta", "eventbus:{83}:meta"]
    for key in damaged:
        bus.client.set(key, "not a hash")

    class LeadLostAfterFirstRoundTrip(SQLiteOutboxStore):
        asked = 0

        def lead(self) -> bool:
            self.asked += 1
            return self.asked <= 2  # the batch's question and its first round trip's

    relay = OutboxRelay(LeadLostAfterFirstRoundTrip(sqlite_path, table), bus, hold_interval=3600)
    sent = []
    publish = relay._keyed.publish
    relay._keyed.publish = lambda items: sent.append(len(items)) or publish(items)
    try:
        # The first round trip fails at project 82's first row; the lead is lost: no other one
        # (there were two more before: one failing at project 83, one with project 81's rows).
        assert relay.run_once() == 0
        assert sent == [30] and relay.store.asked == 3 and not relay.metrics.leader
    finally:
        relay.store.close()
        bus.client.delete(*damaged)


@pytest.mark.parametrize(
    "bad",
    [
        '{"type":"nope"}',
        # nested past msgspec's recursion limit: its RecursionError escaped the relay's
        # invalid-row handler and failed every batch, for every project
        encode_event(event(5, 9)).decode()[:-1] + ',"x":' + "[" * 5000 + "]" * 5000 + "}",
    ],
    ids=["unknown-type", "nested-too-deeply"],
)
def test_an_invalid_row_holds_its_project_only_and_is_reported_once(sqlite_path, table, bus, bad):
    outbox = Outbox(table)
    with sqlite3.connect(sqlite_path) as conn:
        outbox.write(conn, event(5, 1))
        conn.execute(
            f"INSERT INTO {table} (project_id, token, event, created_at) VALUES (5, 'tok', ?, 0)",
            (bad,),
        )
        outbox.write_many(conn, [event(5, 2), event(6, 3)])
    relay = OutboxRelay.sqlite(sqlite_path, bus, table=table, hold_interval=0)
    assert relay.run_once() == 2  # project 5's first event and project 6's
    assert relay.run_once() == 0
    assert relay.metrics.invalid_rows == 1
    assert_exact(bus.client, {5: [1], 6: [3]})
    with sqlite3.connect(sqlite_path) as conn:  # the operator deletes the bad row
        conn.execute(f"DELETE FROM {table} WHERE token = 'tok'")
    drain(relay)
    relay.store.close()
    assert_exact(bus.client, {5: [1, 2], 6: [3]})


def test_a_row_the_publisher_would_refuse_holds_its_project_only(
    sqlite_path, table, bus, monkeypatch
):
    """A row whose event decodes but that ``encode_event`` refuses (a hand-made row just under
    the size limit can encode longer: a time "...00.1Z" is written "...00.100000Z") is reported
    and holds its project, as an invalid row does. Refused in the publish instead, it stopped
    every project's rows (the relay took the publisher's refusal for its failure)."""
    import publisher.core
    import publisher.outbox.relay
    from schemas.events import EventValidationError

    def refusing(real):
        def encode(event):
            if getattr(event, "blocker_id", None) == 9:
                raise EventValidationError("the event's JSON takes 1048560 bytes, more than")
            return real(event)

        return encode

    monkeypatch.setattr(publisher.core, "encode_event", refusing(publisher.core.encode_event))
    monkeypatch.setattr(
        publisher.outbox.relay,
        "encode_event",
        refusing(getattr(publisher.outbox.relay, "encode_event", encode_event)),
        raising=False,
    )
    outbox = Outbox(table)
    with sqlite3.connect(sqlite_path) as conn:
        outbox.write_many(conn, [event(5, 1), event(6, 2)])
        conn.execute(
            f"INSERT INTO {table} (project_id, token, event, created_at) VALUES (5, 'tok', ?, 0)",
            (encode_event(event(5, 9)).decode(),),
        )
        outbox.write_many(conn, [event(5, 3), event(6, 4)])
    relay = OutboxRelay.sqlite(sqlite_path, bus, table=table, hold_interval=0)
    try:
        assert relay.run_once() == 3  # project 5's first event and both of project 6's
        assert relay.metrics.invalid_rows == 1
        assert_exact(bus.client, {5: [1], 6: [2, 4]})
    finally:
        relay.store.close()


def test_rows_behind_a_full_batch_of_invalid_rows_go_out_without_waiting_a_poll_interval(
    sqlite_path, table, bus
):
    """A batch that held every row it read (invalid rows of 40 projects: a contract change under
    queued events, a batch of hand-made rows) is followed by the next batch at once, as any full
    batch is, so that the valid rows behind them go out. Before, the relay counted what it
    published (nothing) and took the table for read: it waited a poll interval after each such
    batch, and once the held projects' holds ran out before it got past them (here 4 batches of
    invalid rows at a 1 s poll, holds of 3 s) it read the same invalid rows again and again and
    the rows behind them were never published, every project's."""
    outbox = Outbox(table)
    with sqlite3.connect(sqlite_path) as conn:
        for project_id in range(100, 140):
            conn.execute(
                f"INSERT INTO {table} (project_id, token, event, created_at) "
                "VALUES (?, 'tok', '{\"type\":\"from_a_newer_contract\"}', 0)",
                (project_id,),
            )
        outbox.write(conn, event(1, 1))
    relay = OutboxRelay.sqlite(
        sqlite_path, bus, table=table, batch_size=10, poll_interval=1.0, hold_interval=3.0
    ).start()
    try:
        deadline = time.monotonic() + 8
        while not relay.metrics.published and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.metrics.published == 1, "the valid row behind the invalid ones never went out"
        # At once, not after the poll interval per batch of invalid rows (4 s here).
        assert relay.metrics.lag.count == 1 and relay.metrics.as_dict()["lag_ms_max"] < 2000
        assert relay.metrics.invalid_rows == 40
    finally:
        relay.stop()
    assert_exact(bus.client, {1: [1]})


def test_a_full_batch_that_changes_nothing_is_not_read_again_in_a_loop(sqlite_path, table, bus):
    """Rows the read cannot leave out once their project is held (hand-made, a project_id
    stored as a BLOB: reported, held under its text form, which no BLOB equals) fill every batch:
    the relay reads them again only after its poll interval, not back to back."""
    with sqlite3.connect(sqlite_path) as conn:
        for n in range(10):
            conn.execute(
                f"INSERT INTO {table} (project_id, token, event, created_at) "
                "VALUES (?, 'tok', '{}', 0)",
                (bytes([n]),),
            )
    relay = OutboxRelay.sqlite(
        sqlite_path, bus, table=table, batch_size=10, poll_interval=1.0, hold_interval=60
    )
    reads = []
    fetch = relay.store.fetch
    relay.store.fetch = lambda *args: reads.append(1) or fetch(*args)
    relay.start()
    try:
        wait_until(lambda: reads, timeout=5)
        time.sleep(1.5)
        assert len(reads) <= 3, f"{len(reads)} reads in 1.5 s"
        assert relay.metrics.invalid_rows == 10
    finally:
        relay.stop()


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_rows_larger_than_any_event_are_reported_without_being_read(
    dialect, pg_url, sqlite_path, table, bus
):
    """Hand-made rows with events of 8 MB (an event of the contract is ~30 KB at most, a stream
    frame 1 MiB): each is reported (too large, with its size) and holds its project, the other
    projects go on, and the relay does not read them: its batch allocates less than one of them.
    Before, each batch read them whole (PostgreSQL takes up to 1 GB per row): a few such rows
    took hundreds of MB per batch, read again after each hold, and more than the machine has
    ended the relay for every project."""
    import tracemalloc

    outbox = Outbox(table)
    big = 8 << 20
    if dialect == "postgresql":
        with psycopg.connect(pg_url) as conn:
            outbox.create_table(conn)
            outbox.write(conn, event(1, 1))
            for n in range(4):
                conn.execute(
                    f"INSERT INTO {table} (project_id, token, event) "
                    "VALUES (%s, 'tok', '{\"type\":\"x\",\"pad\":\"' || repeat('x', %s) || '\"}')",
                    (10 + n, big),
                )
            outbox.write(conn, event(2, 2))
        relay = OutboxRelay.postgres(pg_url, bus, table=table)
    else:
        with sqlite3.connect(sqlite_path) as conn:
            outbox.write(conn, event(1, 1))
            for n in range(4):
                conn.execute(
                    f"INSERT INTO {table} (project_id, token, event, created_at) "
                    "VALUES (?, 'tok', ?, 0)",
                    (10 + n, '{"type":"x","pad":"' + "x" * big + '"}'),
                )
            outbox.write(conn, event(2, 2))
        relay = OutboxRelay.sqlite(sqlite_path, bus, table=table)
    try:
        tracemalloc.start()
        try:
            assert relay.run_once() == 2
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < big, f"the batch allocated {peak} bytes"
        assert relay.metrics.invalid_rows == 4
        assert relay.run_once() == 0
    finally:
        relay.store.close()
    assert_exact(bus.client, {1: [1], 2: [2]})


@pytest.mark.parametrize("token", ["to k", "x" * 200, "t\u00f6k"])
def test_a_row_whose_token_makes_an_unusable_key_holds_its_project_only(
    sqlite_path, table, bus, token
):
    """A hand-made row whose token makes an idempotency key the publisher refuses (a space,
    too long, not ASCII) is an invalid row like any other: reported, its project held, the other
    projects published. It used to raise out of every batch: one such row stopped the relay
    for every project, for good."""
    outbox = Outbox(table)
    with sqlite3.connect(sqlite_path) as conn:
        conn.execute(
            f"INSERT INTO {table} (project_id, token, event, created_at) VALUES (5, ?, ?, 0)",
            (token, encode_event(event(5, 1)).decode()),
        )
        outbox.write_many(conn, [event(5, 2), event(6, 3)])
    relay = OutboxRelay.sqlite(sqlite_path, bus, table=table, hold_interval=0)
    try:
        assert relay.run_once() == 1  # project 6's event
        assert relay.run_once() == 0
        assert relay.metrics.invalid_rows == 1
        assert relay._keyed.batched  # nothing made the relay give up its MULTI/EXEC path
        assert_exact(bus.client, {5: [], 6: [3]})
        with sqlite3.connect(sqlite_path) as conn:  # the operator fixes the token
            conn.execute(f"UPDATE {table} SET token = 'fixed' WHERE project_id = 5 AND id = 1")
        drain(relay)
    finally:
        relay.store.close()
    assert_exact(bus.client, {5: [1, 2], 6: [3]})


@pytest.mark.parametrize(
    ("project_id", "created_at"), [("'abc'", "0"), ("x'05'", "0"), ("5", "'yesterday'")]
)
def test_sqlite_columns_of_another_type_hold_that_row_s_project_only(
    sqlite_path, table, bus, project_id, created_at
):
    """SQLite keeps whatever a hand-made INSERT gives a column (text in an INTEGER or REAL
    column). Such a row, first in the table and next to a held project, used to raise out of
    every batch (TypeError): the relay stopped for every project. Now it is an invalid row."""
    outbox = Outbox(table)
    with sqlite3.connect(sqlite_path) as conn:
        conn.execute(
            f"INSERT INTO {table} (project_id, token, event, created_at) "
            f"VALUES ({project_id}, 'tok', ?, {created_at})",
            (encode_event(event(5, 1)).decode(),),
        )
        conn.execute(
            f"INSERT INTO {table} (project_id, token, event, created_at) "
            "VALUES (7, 'tok', '{}', 0)"
        )
        outbox.write_many(conn, [event(6, 2), event(7, 3)])
    relay = OutboxRelay.sqlite(sqlite_path, bus, table=table, hold_interval=3600)
    try:
        assert relay.run_once() == 1  # project 6's event
        assert relay.run_once() == 0
        assert relay.metrics.invalid_rows == 2
        assert_exact(bus.client, {5: [], 6: [2], 7: []})
    finally:
        relay.store.close()


def test_a_damaged_redis_key_holds_that_project_while_the_others_go_on(pg_url, pg_outbox, bus):
    """Redis refuses every publish of project 2 (its meta key was overwritten by something
    else): projects 1 and 3 are published completely, project 2 waits, with nothing of it
    published out of order, and resumes once the key is repaired."""
    _write_committed(pg_url, pg_outbox, [event(1 + n % 3, n) for n in range(1, 31)])
    bus.client.set("eventbus:{2}:meta", "not a hash")
    relay = OutboxRelay.postgres(pg_url, bus, table=pg_outbox.table, hold_interval=3600)
    try:
        assert drain_available(relay) == 20
        assert relay.metrics.errors == 1
        assert_exact(bus.client, {1: list(range(3, 31, 3)), 3: list(range(2, 31, 3))})
        bus.client.delete("eventbus:{2}:meta")  # repaired (a new epoch for project 2)
        relay.hold_interval = 0
        relay._held.clear()
        assert drain(relay) == 10
    finally:
        relay.store.close()
    assert_exact(bus.client, {2: list(range(1, 31, 3))})


@pytest.fixture
def user_bus(redis_server: RedisServer, redis_url: str):
    """``user_bus(*rules)``: a publisher of a Redis user made with these ACL rules (both gone
    after the test)."""
    admin = redis_server.client()
    made: list[tuple[str, Publisher]] = []

    def make(*rules: str) -> Publisher:
        name = f"relayuser{len(made)}"
        admin.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", *rules)
        url = f"redis://{name}:pw@127.0.0.1:{redis_server.port}/0"
        made.append((name, Publisher.from_url(url)))
        return made[-1][1]

    yield make
    for name, publisher in made:
        publisher.close()
        admin.execute_command("ACL", "DELUSER", name)
    admin.close()


def _sqlite_rows(path: str, table: str, events: list[BlockerResolved]) -> None:
    with sqlite3.connect(path) as conn:
        Outbox(table).write_many(conn, events)


def test_a_redis_user_that_may_not_run_multi_still_gets_every_row_published_once_and_marked(
    sqlite_path, table, redis_client, user_bus
):
    """A user (or a proxy) without transactions: each call of the relay's MULTI/EXEC runs on its
    own and EXEC is refused ("EXEC without MULTI"). The rows are published once each, in order,
    and marked. Before (publish_many(in_order=True) took the refused EXEC for "nothing ran"),
    the relay held every project in turn and marked no row, although Redis had published them
    all: it published them again each round, as new events once their keys expired; the relay
    before in_order published them one by one."""
    bus = user_bus("~*", "&*", "+@all", "-multi")
    bus.client.script_load(lua.PUBLISH)
    _sqlite_rows(sqlite_path, table, [event(1 + n % 3, n) for n in range(1, 31)])
    relay = OutboxRelay.sqlite(sqlite_path, bus, table=table, hold_interval=3600)
    try:
        assert drain(relay) == 30
        assert relay.metrics.errors == 0
    finally:
        relay.store.close()
    assert_exact(
        redis_client, {1: list(range(3, 31, 3)), 2: list(range(1, 31, 3)), 3: list(range(2, 31, 3))}
    )


def test_a_call_redis_refuses_while_queueing_the_transaction_holds_its_own_project_only(
    sqlite_path, table, redis_client, user_bus
):
    """A user whose ACL leaves out project 2's keys: Redis refuses project 2's call while
    queueing the relay's transaction (NOPERM, EXECABORT: nothing ran). Project 2 is held, with
    its own error; projects 1 and 3 are published completely. Before, the refusal was charged to
    the transaction's first row: project 1 (nothing wrong with it) was held too, for the hold
    interval, with project 2's error."""
    bus = user_bus("~eventbus:{1}:*", "~eventbus:{3}:*", "&*", "+@all")
    redis_client.script_load(lua.PUBLISH)
    _sqlite_rows(sqlite_path, table, [event(1 + (n - 1) % 3, n) for n in range(1, 31)])
    relay = OutboxRelay.sqlite(sqlite_path, bus, table=table, hold_interval=3600)
    try:
        assert drain_available(relay) == 20
        assert list(relay._held) == [2] and relay.metrics.errors == 1
    finally:
        relay.store.close()
    assert_exact(redis_client, {1: list(range(1, 31, 3)), 3: list(range(3, 31, 3)), 2: []})


def drain_available(relay: OutboxRelay) -> int:
    total = 0
    while count := relay.run_once():
        total += count
    return total


def test_a_row_changed_after_its_publish_is_held_and_reported_never_silent(pg_url, pg_outbox, bus):
    """Row 1 was published, then (by hand) unmarked and given another event: its key now
    conflicts. Row 2 of the same project, in the same MULTI/EXEC, goes out ahead of it: that
    cannot be undone, so it is logged as an error, and the project is held."""
    _write_committed(pg_url, pg_outbox, [event(61, 1)])
    relay = OutboxRelay.postgres(pg_url, bus, table=pg_outbox.table, hold_interval=3600)
    try:
        drain(relay)
        changed = encode_event(event(61, 99)).decode()
        with psycopg.connect(pg_url) as conn:
            conn.execute(
                f"UPDATE {pg_outbox.table} SET published_at = NULL, epoch = NULL, seq = NULL, "
                "event = %s",
                (changed,),
            )
        _write_committed(pg_url, pg_outbox, [event(61, 2)])
        with structlog.testing.capture_logs() as logs:
            assert relay.run_once() == 0
    finally:
        relay.store.close()
    assert 61 in relay._held
    events = {entry["event"]: entry for entry in logs}
    assert events["outbox_event_overtaken"]["later_calls_published"] == 1
    assert "already used for a different event" in events["outbox_project_held"]["error"]
    assert [b for _, b in stream_ids(bus.client, 61)] == [1, 2]


def test_cleanup_keeps_each_projects_newest_published_row(pg_url, pg_outbox, bus):
    _write_committed(pg_url, pg_outbox, [event(1, 1), event(1, 2), event(2, 3), event(1, 4)])
    relay = OutboxRelay.postgres(pg_url, bus, table=pg_outbox.table)
    try:
        drain(relay)
        _write_committed(pg_url, pg_outbox, [event(1, 5)])  # not published: never deleted
        assert relay.store.cleanup(timedelta(0), 100) == 2
    finally:
        relay.store.close()
    remaining = [(r[1], r[4]) for r in pg_rows(pg_url, pg_outbox.table)]
    assert remaining == [(2, 1), (1, 3), (1, None)]


# --- snapshots with a cursor -------------------------------------------------------------------


def test_snapshot_waits_for_the_relay_and_returns_exactly_the_included_events_cursor(
    pg_url, pg_outbox, bus
):
    _write_committed(pg_url, pg_outbox, [event(1, 1), event(1, 2), event(2, 3)])
    pending = psycopg.connect(pg_url)  # a transaction that commits after the snapshot's read
    pg_outbox.write(pending, event(1, 4))
    relay = OutboxRelay.postgres(pg_url, bus, table=pg_outbox.table, poll_interval=0.05)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with pytest.raises(SnapshotTimeout, match="not published within") as timed_out:
            pg_outbox.snapshot(conn, 1, lambda c: "read before the wait", max_wait=0.1)
        # What was read in the snapshot transaction, to answer with "cursor": null.
        assert timed_out.value.data == "read before the wait"
        relay.start()
        try:
            snap = pg_outbox.snapshot(conn, 1, lambda c: "data")
            assert snap.data == "data"
            assert snap.cursor_json() == {"epoch": snap.cursor.epoch, "seq": 2, "tag": snap.tag}
            pending.commit()
            wait_until(lambda: len(stream_ids(bus.client, 1)) == 3)
            assert pg_outbox.snapshot(conn, 1, lambda c: None).cursor.seq == 3
            assert pg_outbox.snapshot(conn, 99, lambda c: None).cursor is None
        finally:
            relay.stop()
            pending.close()
        with conn.transaction(), pytest.raises(InTransaction):
            pg_outbox.snapshot(conn, 1, lambda c: None)


@pytest.mark.parametrize(
    "flavour", ["psycopg", "sqlite", "sqlalchemy-postgresql", "sqlalchemy-sqlite"]
)
def test_snapshot_cursor_matches_the_data_under_concurrent_commits(
    flavour, pg_url, pg_outbox, sqlite_path, table, bus
):
    """A writer commits (item row + its event) continuously; every snapshot's data (the number of
    items) must equal its cursor's seq: the cursor covers exactly the events the data includes."""
    items = f"items_{table}"
    if flavour.endswith("sqlite"):
        outbox = Outbox(table)

        def connect():
            return sqlite3.connect(sqlite_path, timeout=30)

        relay = OutboxRelay.sqlite(sqlite_path, bus, table=table, poll_interval=0.01)
    else:
        outbox = pg_outbox

        def connect():
            return psycopg.connect(pg_url)

        relay = OutboxRelay.postgres(pg_url, bus, table=pg_outbox.table, poll_interval=0.05)
    with connect() as conn:
        conn.execute(f"CREATE TABLE {items} (n integer)")
        conn.commit()
    stop = threading.Event()

    def writer() -> None:
        conn = connect()
        n = 0
        while not stop.is_set():
            n += 1
            conn.execute(f"INSERT INTO {items} (n) VALUES ({n})")
            outbox.write(conn, event(1, n))
            conn.commit()
            relay.wake()
            # Paced: SQLite's busy handler is not fair, and a writer committing in a tight loop
            # can keep the relay from ever taking the write lock to mark its batch.
            stop.wait(0.001)
        conn.close()

    def count(c) -> int:
        if flavour.startswith("sqlalchemy"):
            from sqlalchemy import text

            return c.execute(text(f"SELECT count(*) FROM {items}")).scalar_one()
        return c.execute(f"SELECT count(*) FROM {items}").fetchone()[0]

    thread = threading.Thread(target=writer)
    relay.start()
    thread.start()
    engine = None
    try:
        if flavour.startswith("sqlalchemy"):
            from sqlalchemy import create_engine
            from sqlalchemy.orm import Session

            engine = create_engine(
                f"sqlite:///{sqlite_path}"
                if flavour.endswith("sqlite")
                else pg_url.replace("postgresql://", "postgresql+psycopg://")
            )
            reader = Session(engine)
        elif flavour == "sqlite":
            reader = sqlite3.connect(sqlite_path, timeout=30)
        else:
            reader = psycopg.connect(pg_url)
        wait_until(lambda: len(stream_ids(bus.client, 1)) >= 10)
        seen: set[int] = set()
        deadline = time.monotonic() + 20
        while len(seen) < 5:  # snapshots interleaved with at least five states of the writer
            assert time.monotonic() < deadline, seen
            snap = outbox.snapshot(reader, 1, count)
            assert snap.cursor is not None
            assert snap.data == snap.cursor.seq
            seen.add(snap.data)
        reader.close()
    finally:
        stop.set()
        thread.join(30)
        relay.stop()
        if engine is not None:
            engine.dispose()


async def test_async_snapshot(pg_url, pg_outbox, bus):
    _write_committed(pg_url, pg_outbox, [event(4, 1), event(4, 2)])
    relay = OutboxRelay.postgres(pg_url, bus, table=pg_outbox.table, poll_interval=0.05).start()
    try:
        async with await psycopg.AsyncConnection.connect(pg_url) as conn:

            async def read(c):
                return (await (await c.execute("SELECT 42")).fetchone())[0]

            snap = await pg_outbox.asnapshot(conn, 4, read)
        assert snap.data == 42 and snap.cursor.seq == 2
    finally:
        await asyncio.to_thread(relay.stop)


# --- command line ------------------------------------------------------------------------------


def test_cli_prints_and_applies_the_migration(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "publisher.outbox", "migrate", "--dialect", "sqlite"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out == migration_sql("sqlite")
    path = tmp_path / "x.db"
    subprocess.run(
        [sys.executable, "-m", "publisher.outbox", "migrate", "--sqlite", str(path)],
        cwd=ROOT, env=env, check=True,
    )  # fmt: skip
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM eventbus_outbox").fetchone() == (0,)
    bad = subprocess.run(
        [sys.executable, "-m", "publisher.outbox", "relay", "--table", "x;y"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "lower-case identifier" in bad.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["relay", "--stop-timeout", "inf"],  # was a traceback (OverflowError)
        ["relay", "--stop-timeout", "nan"],  # was a traceback (ValueError)
        ["relay", "--retention", "nan"],  # was a traceback
        ["relay", "--poll-interval", "-1"],  # was taken: no wait between looks
        ["relay", "--poll-interval", "0"],
        ["relay", "--leader-lease", "inf"],  # was taken: a frozen leader kept the lead for ever
        ["relay", "--idempotency-window", "0"],
        ["relay", "--stats-interval", "0"],
        ["relay", "--max-rate", "inf"],
        ["relay", "--max-rate", "-5"],
        ["relay", "--batch-size", "0"],
        ["migrate", "--sqlite", "x.db", "--timeout", "inf"],
    ],
)
def test_cli_refuses_numbers_it_cannot_use_with_a_usage_error(args, capsys):
    from publisher.outbox.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {args[-2]}:" in err and "Traceback" not in err


def test_cli_migrate_against_a_hung_database_fails_within_its_timeout(pg_url, table):
    """``migrate --dsn`` (a deploy step, an init container) against a PostgreSQL that accepts
    TCP and never answers (a frozen proxy: a hung server, a frozen VM) exits 1 within
    ``--timeout`` with the reason on stderr, and applies the migration once the database
    answers. Before, psycopg's connect had no timeout and the DDL none either: the command,
    and the deploy behind it, waited for ever without a word."""
    proxy = FreezableProxy("127.0.0.1", int(pg_url.rpartition(":")[2].partition("/")[0]))
    url = pg_url.replace(":5432/", f":{proxy.port}/")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "publisher.outbox", "migrate", "--dsn", url]
    command += ["--table", table, "--timeout", "2"]
    try:
        proxy.freeze()
        started = time.monotonic()
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("migrate waited for ever on a database that never answers")
        assert done.returncode == 1, done.stderr
        assert time.monotonic() - started < 2 + 3
        assert "timeout" in done.stderr, done.stderr
        proxy.thaw()
        subprocess.run(command, env=env, check=True, timeout=20)
    finally:
        proxy.close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)


def test_a_migration_whose_ddl_is_never_answered_fails_within_the_timeout(pg_url, table):
    """Connected, then the database stops answering: the DDL fails with TimeoutError within the
    store's ``timeout`` (what ``migrate --dsn`` runs after its connect)."""
    proxy = FreezableProxy("127.0.0.1", int(pg_url.rpartition(":")[2].partition("/")[0]))
    store = PostgresOutboxStore(pg_url.replace(":5432/", f":{proxy.port}/"), table, timeout=1)
    try:
        store._conn()  # connected while the database answers
        proxy.freeze()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            store.apply_migration()
        assert time.monotonic() - started < 1 + 1.5
    finally:
        store.close()
        proxy.close()


# --- order per project is commit order ---------------------------------------------------------


def test_a_later_writer_of_the_same_project_waits_so_the_stream_follows_commit_order(
    pg_url, pg_outbox, bus
):
    """Transaction A writes an event of project 1 and stays open; B writes another event of
    project 1 and commits. Without the writers' per-project lock B would commit first although
    its id is larger, and the relay (reading in id order) would publish A's event before B's:
    the opposite of the order in which the database changed."""
    committed: list[int] = []
    a = psycopg.connect(pg_url)
    pg_outbox.write(a, event(1, 1))

    def b() -> None:
        with psycopg.connect(pg_url) as conn:
            pg_outbox.write(conn, event(1, 2))
            conn.commit()
            committed.append(2)

    thread = threading.Thread(target=b)
    thread.start()
    with psycopg.connect(pg_url, autocommit=True) as observer:
        # B either committed already (no lock) or waits for A's advisory lock.
        wait_until(
            lambda: (
                committed
                or observer.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event = 'advisory' AND datname = current_database()"
                ).fetchone()[0]
            )
        )
    # Read before A commits: once A's commit releases the lock, B's thread may record its own
    # commit before this thread gets to record A's, so the order of appends after it is a race.
    committed_while_a_open = list(committed)
    a.commit()
    thread.join(10)
    a.close()
    assert committed_while_a_open == [], "B committed while A, an earlier writer, was open"
    assert committed == [2]
    relay = OutboxRelay.postgres(pg_url, bus, table=pg_outbox.table)
    try:
        drain(relay)
    finally:
        relay.store.close()
    assert [b for _, b in stream_ids(bus.client, 1)] == [1, 2]


# --- property: random interleavings of transactions --------------------------------------------


def test_random_interleavings_of_writes_commits_rollbacks_and_relay_runs(pg_url, redis_url):
    """Three connections write events of three projects in interleaved open transactions,
    commit or roll back at random, while the relay runs between any two steps: each project's
    stream ends up equal to its committed events in commit order, each once."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    steps = st.lists(
        st.one_of(
            st.tuples(st.just("write"), st.integers(0, 2), st.integers(1, 3)),
            st.tuples(st.just("commit"), st.integers(0, 2), st.just(0)),
            st.tuples(st.just("rollback"), st.integers(0, 2), st.just(0)),
            st.tuples(st.just("relay"), st.just(0), st.just(0)),
        ),
        max_size=40,
    )
    client = redis.Redis.from_url(redis_url)
    publisher = Publisher.from_url(redis_url)
    conns = [psycopg.connect(pg_url) for _ in range(3)]

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(steps)
    def run(plan):
        client.flushall()
        outbox = Outbox(f"outbox_{uuid.uuid4().hex[:12]}")
        with psycopg.connect(pg_url) as conn:
            outbox.create_table(conn)
        relay = OutboxRelay.postgres(pg_url, publisher, table=outbox.table, batch_size=3)
        open_writes: list[list[tuple[int, int]]] = [[], [], []]
        expected: dict[int, list[int]] = {1: [], 2: [], 3: []}
        counter = 0
        try:
            for action, index, project in plan:
                if action == "write":
                    # A project locked by another open transaction would block this one (that
                    # is the lock's job); a single thread cannot wait for it, so skip the step.
                    if any(
                        project == p
                        for other, writes in enumerate(open_writes)
                        if other != index
                        for p, _ in writes
                    ):
                        continue
                    counter += 1
                    outbox.write(conns[index], event(project, counter))
                    open_writes[index].append((project, counter))
                elif action == "commit":
                    conns[index].commit()
                    for p, n in open_writes[index]:
                        expected[p].append(n)
                    open_writes[index] = []
                elif action == "rollback":
                    conns[index].rollback()
                    open_writes[index] = []
                else:
                    relay.run_once()
            for index, conn in enumerate(conns):
                conn.commit()
                for p, n in open_writes[index]:
                    expected[p].append(n)
            drain(relay)
        finally:
            for conn in conns:
                conn.rollback()
            relay.store.close()
        assert_exact(client, expected)

    try:
        run()
    finally:
        for conn in conns:
            conn.close()
        publisher.close()
        client.close()


def test_any_object_with_publish_can_be_the_relays_publisher(sqlite_path, table, bus):
    """The batched path (MULTI/EXEC of keyed calls) is an optimisation for a standalone
    ``Publisher``; anything else with ``publish(event, idempotency_key=)`` gets one call per
    row, with the same result."""
    from publisher.outbox.publishing import KeyedPublisher

    class Wrapped:
        def __init__(self) -> None:
            self.calls = 0

        def publish(self, event, *, idempotency_key=None):
            self.calls += 1
            return bus.publish(event, idempotency_key=idempotency_key)

    assert KeyedPublisher(bus).batched
    with pytest.raises(TypeError, match="AsyncPublisher"):
        OutboxRelay.sqlite(sqlite_path, AsyncPublisher.from_url("redis://127.0.0.1:1"))
    wrapped = Wrapped()
    assert not KeyedPublisher(wrapped).batched
    with sqlite3.connect(sqlite_path) as conn:
        Outbox(table).write_many(conn, [event(8, n) for n in range(1, 6)])
    relay = OutboxRelay.sqlite(sqlite_path, wrapped, table=table)
    assert drain(relay) == 5 and wrapped.calls == 5
    relay.store.close()
    assert_exact(bus.client, {8: [1, 2, 3, 4, 5]})


def test_a_standby_relay_takes_over_when_the_leader_stops(pg_url, pg_outbox, bus):
    def relay() -> OutboxRelay:
        return OutboxRelay.postgres(
            pg_url, bus, table=pg_outbox.table, poll_interval=0.05, max_rate=None
        ).start()

    first = relay()
    wait_until(lambda: first.metrics.leader)
    second = relay()
    try:
        _write_committed(pg_url, pg_outbox, [event(1, n) for n in range(1, 6)])
        wait_until(lambda: first.metrics.published == 5)
        assert not second.metrics.leader and second.metrics.published == 0
        first.stop()  # its session ends: the advisory lock is released
        _write_committed(pg_url, pg_outbox, [event(1, n) for n in range(6, 11)])
        wait_until(lambda: second.metrics.published == 5)
        assert second.metrics.leader
    finally:
        first.stop()
        second.stop()
    assert_exact(bus.client, {1: list(range(1, 11))})


class StderrLines:
    """A subprocess's stderr, read line by line on a thread, so that a test can wait for a log
    line while the process runs."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)

    def count(self, name: str) -> int:
        return sum(f'"event": "{name}"' in line for line in list(self.lines))

    def text(self) -> str:
        self._thread.join(5)
        return "".join(self.lines)


def assert_marks_match_stream(client: redis.Redis, url: str, table: str) -> None:
    """Every row is marked with the cursor its event has in the stream."""
    by_project: dict[int, list[tuple]] = {}
    for row in pg_rows(url, table):
        by_project.setdefault(row[1], []).append(row)
    for project_id, rows in by_project.items():
        epoch = client.hget(KEYS.meta(project_id), "epoch").decode()
        assert [(r[3], r[4]) for r in rows] == [(epoch, n) for n in range(1, len(rows) + 1)]


def test_a_frozen_leader_loses_the_lead_within_its_lease_and_publishes_nothing_after(
    pg_url, pg_outbox, bus, redis_url
):
    """The leader relay (a process) is frozen in the middle of a batch (SIGSTOP: a paused VM, a
    GC-stalled or deadlocked process look the same to PostgreSQL: a live idle session). Its
    session ends ``lease`` seconds after its last statement, which releases the leader lock: the
    standby takes over within ``lease + poll_interval`` and publishes everything. Resumed
    (SIGCONT), the old leader notices before its next publish that it lost the lead and
    publishes nothing more: each event once, in order, every row marked with its stream cursor.
    A healthy leader in a batch longer than the lease keeps the lead meanwhile. Before, the
    frozen leader kept the lock as long as it was frozen, and the outbox stopped, silently."""
    lease, poll = 2.0, 0.1
    events = [event(1 + n % 2, n) for n in range(1, 101)]
    _write_committed(pg_url, pg_outbox, events)
    process = subprocess.Popen(
        [
            sys.executable, "-m", "publisher.outbox", "relay",
            "--dsn", pg_url, "--table", pg_outbox.table, "--redis-url", redis_url,
            # one batch of 100 rows at 10 events/s (chunks of one row): 10 s, five leases
            "--max-rate", "10", "--batch-size", "100", "--poll-interval", str(poll),
            "--leader-lease", str(lease),
        ],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    logs = StderrLines(process)
    client = bus.client

    def in_stream() -> int:
        return len(stream_ids(client, 1)) + len(stream_ids(client, 2))

    standby = OutboxRelay(
        PostgresOutboxStore(pg_url, pg_outbox.table, lease=lease),
        bus,
        poll_interval=poll,
        max_rate=None,
    )
    try:
        wait_until(lambda: in_stream() >= 1)  # the process leads
        standby.start()
        # A healthy leader keeps the lead through a batch that lasts longer than its lease.
        wait_until(lambda: in_stream() >= 10 * (lease + 1), timeout=15)
        assert standby.metrics.published == 0 and not standby.metrics.leader
        process.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        published_by_leader = in_stream()  # (a round trip under way may add one row)
        # The standby takes over within the bound (with some slack for a loaded machine).
        wait_until(lambda: standby.metrics.leader, timeout=lease + poll + 3)
        assert time.monotonic() - stopped < lease + poll + 3
        wait_until(lambda: standby.metrics.backlog == 0 and in_stream() == 100)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            wait_until(
                lambda: (
                    not conn.execute(
                        f"SELECT count(*) FROM {pg_outbox.table} WHERE published_at IS NULL"
                    ).fetchone()[0]
                )
            )
            (resumed_at,) = conn.execute("SELECT clock_timestamp()").fetchone()
        process.send_signal(signal.SIGCONT)
        wait_until(lambda: logs.count("outbox_relay_standby"), timeout=10)
    finally:
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
        standby.stop()
    assert process.returncode == 0, logs.text()
    with psycopg.connect(pg_url) as conn:
        # What the old leader marked after it resumed: only rows it had published before it
        # was frozen (their marks were due), none it published afterwards.
        marked_after = [
            row_id
            for (row_id,) in conn.execute(
                f"SELECT id FROM {pg_outbox.table} WHERE published_at > %s ORDER BY id",
                [resumed_at],
            )
        ]
        first_ids = [
            row_id
            for (row_id,) in conn.execute(
                f"SELECT id FROM {pg_outbox.table} ORDER BY id LIMIT %s",
                [published_by_leader + 1],
            )
        ]
    assert set(marked_after) <= set(first_ids), logs.text()
    assert_exact(client, blocker_ids_by_project(pg_url, pg_outbox.table))
    assert_marks_match_stream(client, pg_url, pg_outbox.table)


def redis_publish_calls(client: redis.Redis) -> int:
    """Script calls and transactions Redis has run so far (every publish, no-op republishes
    included, is one of them): the session's private redis-server, so only this test's."""
    stats = client.info("commandstats")
    return sum(
        int(fields["calls"])
        for name, fields in stats.items()
        if name.startswith(("cmdstat_eval", "cmdstat_exec", "cmdstat_fcall"))
    )


@pytest.mark.parametrize(
    ("answer", "rows", "session_while_frozen"),
    [
        # ~20 KB rows, one batch of ~20 MB: far more than the loopback socket buffers hold, so
        # PostgreSQL is still sending the batch when the leader freezes: the session is busy.
        ("\N{GRINNING FACE}" * 5000, 1000, ("active", "ClientWrite")),
        # small rows: the batch is in the leader's socket buffer and the session idle.
        ("answer", 20, ("idle", "ClientRead")),
    ],
    ids=["frozen-while-postgres-sends-the-batch", "frozen-before-reading-the-batch"],
)
def test_a_leader_frozen_while_it_receives_a_batch_loses_the_lead_within_its_lease(
    pg_url, pg_outbox, bus, redis_url, answer, rows, session_while_frozen
):
    """The leader relay (a process) freezes (SIGSTOP, a paused VM) just as PostgreSQL answers its
    read of a batch. With a batch larger than the socket buffers, the leader's session is not
    idle: PostgreSQL waits to write the rest, so ``idle_session_timeout`` never ends it; the
    lease must end it anyway (``tcp_user_timeout``: the leader's socket accepts nothing for a
    lease). The standby takes over within ``lease + poll_interval``, every event is published
    once and in order, and the old leader, continued, stands down without publishing anything
    (not even a no-op republish of the batch it read). Before, a leader frozen with PostgreSQL
    blocked in that write kept the lead, and the outbox stopped, for as long as it was frozen.

    The moment is caught without timing: the test holds an exclusive lock on the table, so that
    the leader's read waits for it; it freezes the leader, then releases the lock."""
    lease, poll = 2.0, 0.1
    events = [
        BlockerResolved(project_id=1 + n % 2, blocker_id=n, answer=answer, resolved_at=T0)
        for n in range(1, rows + 1)
    ]
    _write_committed(pg_url, pg_outbox, events)
    name = f"frozen-{pg_outbox.table}"
    admin = psycopg.connect(pg_url, autocommit=True)
    locker = psycopg.connect(pg_url)
    locker.execute(f"LOCK TABLE {pg_outbox.table} IN ACCESS EXCLUSIVE MODE")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "publisher.outbox", "relay",
            "--dsn", f"{pg_url}?application_name={name}", "--table", pg_outbox.table,
            "--redis-url", redis_url, "--batch-size", "1000", "--max-rate", "0",
            "--poll-interval", str(poll), "--leader-lease", str(lease),
        ],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    logs = StderrLines(process)
    client = bus.client
    standby = OutboxRelay(
        PostgresOutboxStore(pg_url, pg_outbox.table, lease=lease),
        bus,
        poll_interval=poll,
        max_rate=None,
    )

    def leader_session() -> tuple | None:
        return admin.execute(
            "SELECT pid, state, wait_event_type, wait_event FROM pg_stat_activity "
            "WHERE application_name = %s AND query LIKE %s",
            [name, "%published_at IS NULL%"],
        ).fetchone()

    def in_stream() -> int:
        return len(stream_ids(client, 1)) + len(stream_ids(client, 2))

    try:
        # The leader took the lead and waits for the table lock to read its batch.
        pid = wait_until(lambda: (s := leader_session()) and s[2] == "Lock" and s[0])
        standby.start()
        process.send_signal(signal.SIGSTOP)
        locker.commit()
        frozen = time.monotonic()
        wait_until(lambda: (s := leader_session()) and (s[1], s[3]) == session_while_frozen)
        calls_before = redis_publish_calls(client)
        # The standby takes over within the bound (with some slack for a loaded machine).
        wait_until(lambda: standby.metrics.leader, timeout=lease + poll + 3)
        took_over = time.monotonic() - frozen
        assert took_over < lease + poll + 3
        assert (
            admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()[
                0
            ]
            == 0
        )
        wait_until(lambda: in_stream() == rows, timeout=30)
        wait_until(
            lambda: (
                not admin.execute(
                    f"SELECT count(*) FROM {pg_outbox.table} WHERE published_at IS NULL"
                ).fetchone()[0]
            )
        )
        assert redis_publish_calls(client) > calls_before  # (the counter counts the standby)
        calls_before_resume = redis_publish_calls(client)
        (resumed_at,) = admin.execute("SELECT clock_timestamp()").fetchone()
        process.send_signal(signal.SIGCONT)
        wait_until(lambda: logs.count("outbox_relay_standby"), timeout=10)
    finally:
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
        standby.stop()
        locker.close()
    assert process.returncode == 0, logs.text()
    # The old leader published nothing once continued, not even a no-op: no script call reached
    # Redis, and it marked no row.
    assert redis_publish_calls(client) == calls_before_resume, logs.text()
    marked_after = admin.execute(
        f"SELECT count(*) FROM {pg_outbox.table} WHERE published_at > %s", [resumed_at]
    ).fetchone()[0]
    admin.close()
    assert marked_after == 0, logs.text()
    assert_exact(client, blocker_ids_by_project(pg_url, pg_outbox.table))
    assert_marks_match_stream(client, pg_url, pg_outbox.table)


def test_an_idle_leader_keeps_the_lead_however_long_its_poll_interval(pg_url, pg_outbox, bus):
    """The lease is renewed while the leader waits for work: with a poll interval far longer
    than the lease and nothing to publish, the leader's session stays, and a NOTIFY still wakes
    it at once. (Nothing can be awaited here: the test is that nothing happens for three
    leases.)"""
    lease = 0.6
    leader = OutboxRelay.postgres(
        pg_url, bus, table=pg_outbox.table, lease=lease, poll_interval=30
    ).start()
    standby = OutboxRelay.postgres(
        pg_url, bus, table=pg_outbox.table, lease=lease, poll_interval=0.05
    )
    try:
        wait_until(lambda: leader.metrics.leader)
        standby.start()
        session = leader.store._work.info.backend_pid
        time.sleep(3 * lease)
        assert leader.store._work.info.backend_pid == session and leader.metrics.errors == 0
        assert not standby.metrics.leader
        _write_committed(pg_url, pg_outbox, [event(1, 1)])
        wait_until(lambda: leader.metrics.published == 1, timeout=2)
    finally:
        leader.stop()
        standby.stop()
    assert standby.metrics.published == 0
    assert_exact(bus.client, {1: [1]})


def test_the_leaders_session_alone_gets_the_lease_and_a_unix_socket_is_reported(pg_url, table):
    """The lease is both session settings on the leader's session, none on a standby's (it only
    polls). Through a Unix-domain socket ``tcp_user_timeout`` does not apply: the leader says so
    once (a warning naming what is not covered), and leads all the same."""
    leader = PostgresOutboxStore(pg_url, table, lease=5)
    standby = PostgresOutboxStore(pg_url, table, lease=5)
    settings = "SELECT current_setting('idle_session_timeout'), current_setting('tcp_user_timeout')"
    try:
        with structlog.testing.capture_logs() as logs:
            assert leader.lead() and not standby.lead()
        assert leader._q(settings, {})[0] == ("5s", "5000")
        assert standby._q(settings, {})[0] == ("0", "0")
        assert not [e for e in logs if e.get("table") == table and e["log_level"] == "warning"]
    finally:
        leader.close()
        standby.close()
    socket_dir = "/var/run/postgresql"
    unix_url = psycopg.conninfo.make_conninfo(pg_url, host=socket_dir)
    try:
        psycopg.connect(unix_url, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL Unix-domain socket in {socket_dir}: {exc}")
    local = PostgresOutboxStore(unix_url, table, lease=5)
    try:
        with structlog.testing.capture_logs() as logs:
            # (The sessions closed above release the lock once their server process has ended.)
            wait_until(local.lead)
            local.reset()  # a new session leads again: still reported once
            wait_until(local.lead)
        assert local._q(settings, {})[0] == ("5s", "0")
    finally:
        local.close()
    warnings = [e for e in logs if e["event"] == "outbox_relay_partial_lease"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert "Unix-domain socket" in warnings[0]["reason"]


# --- the relay's LISTEN session and PostgreSQL's NOTIFY queue ----------------------------------
#
# PostgreSQL keeps one NOTIFY queue for the whole server, and truncates it only up to the slowest
# listening session, which advances only as it hands notifications to its client. A LISTEN
# session that is not read (its client busy, frozen, or no longer looking) pins the queue; once
# the queue is full, every transaction that notifies fails at commit: the application's.


def flood_notifications(url: str, channel: str, megabytes: int) -> None:
    """Commit ``megabytes`` of notifications on ``channel`` in one transaction: distinct
    payloads of 8 KB (PostgreSQL folds identical ones within a transaction), far more than the
    socket buffers between a listening session and its client hold."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "SELECT pg_notify(%s, g::text || repeat('x', 8000 - 10)) FROM generate_series(1, %s) g",
            [channel, megabytes * 128],
        )


def pinned_notify_queue_mb(conn: psycopg.Connection) -> float:
    """How much of PostgreSQL's NOTIFY queue cannot be truncated (MB): first a commit that
    truncates it (PostgreSQL does so in a committing notifier, when it has written a fourth
    page since: five 8 KB notifications on a channel nobody listens to), then the queue's
    usage, which counts from the slowest listening session."""
    conn.execute(
        "SELECT pg_notify('eventbus_test_nobody', g::text || repeat('y', 8000 - 10)) "
        "FROM generate_series(1, 5) g"
    )
    usage, pages = conn.execute(
        "SELECT pg_notification_queue_usage(), "
        "coalesce(current_setting('max_notify_queue_pages', true)::float, 1048576)"
    ).fetchone()
    return usage * pages * 8192 / 2**20


def backend(conn: psycopg.Connection, pid: int) -> tuple | None:
    """(state, wait_event) of the server process ``pid``, or None once it has ended."""
    return conn.execute(
        "SELECT state, wait_event FROM pg_stat_activity WHERE pid = %s", [pid]
    ).fetchone()


def test_a_leader_busy_with_a_backlog_keeps_reading_its_listen_session(pg_url, pg_outbox, bus):
    """A leader catching up on a backlog (batch after batch, paced by ``max_rate``) still reads
    its LISTEN session between Redis round trips: 40 MB of notifications committed meanwhile
    are taken as they come, PostgreSQL's NOTIFY queue is truncated while the catch-up goes on,
    and the session is the same throughout (never dropped by its lease). Every event is
    published once, in order. Before, a busy leader never read its LISTEN session until the
    backlog was gone: its server process blocked writing to it (``ClientWrite``), and the
    queue, for every database of the server, could not be truncated for as long as the
    catch-up lasted (hours for a large backlog: a full queue fails the application's
    commits)."""
    rows = 2000
    relay = OutboxRelay.postgres(
        pg_url, bus, table=pg_outbox.table, max_rate=50, lease=6
    ).start()  # 2000 rows at 50 events/s: 40 s of catch-up
    admin = psycopg.connect(pg_url, autocommit=True)
    client = bus.client

    def in_stream() -> int:
        return len(stream_ids(client, 1)) + len(stream_ids(client, 2))

    try:
        listen_pid = wait_until(lambda: (s := relay.store._listen) and s.info.backend_pid)
        _write_committed(pg_url, pg_outbox, [event(1 + n % 2, n) for n in range(1, rows + 1)])
        wait_until(lambda: in_stream() >= 1)
        flood_notifications(pg_url, relay.store.st.channel, 40)
        wait_until(lambda: pinned_notify_queue_mb(admin) < 8, timeout=15)
        assert in_stream() < rows  # still catching up
        assert backend(admin, listen_pid) is not None
        assert relay.store._listen.info.backend_pid == listen_pid
        relay.limiter = RateLimiter(None)  # the rest at once
        wait_until(lambda: relay.metrics.backlog == 0 and in_stream() == rows, timeout=30)
    finally:
        relay.stop()
        admin.close()
    assert relay.metrics.errors == 0
    assert_exact(client, blocker_ids_by_project(pg_url, pg_outbox.table))


def test_a_frozen_relays_listen_session_ends_within_its_lease(pg_url, pg_outbox, bus, redis_url):
    """A relay process frozen (SIGSTOP, a paused VM) while writers keep notifying: its LISTEN
    session fills the socket buffers to the relay and then waits to write (``ClientWrite``),
    pinning PostgreSQL's NOTIFY queue; PostgreSQL ends that session once the relay has taken
    nothing for its lease (``tcp_user_timeout``, set on the LISTEN session too), and the queue
    is truncated. Continued, the relay publishes what was committed meanwhile, once, in order.
    Before, the frozen relay's LISTEN session pinned the queue for as long as it was frozen."""
    lease = 2.0
    name = f"listen-{pg_outbox.table}"
    admin = psycopg.connect(pg_url, autocommit=True)
    process = subprocess.Popen(
        [
            sys.executable, "-m", "publisher.outbox", "relay",
            "--dsn", f"{pg_url}?application_name={name}", "--table", pg_outbox.table,
            "--redis-url", redis_url, "--poll-interval", "0.1", "--leader-lease", str(lease),
        ],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    logs = StderrLines(process)

    def listen_session() -> int | None:
        row = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND query LIKE %s",
            [name, "%LISTEN%"],
        ).fetchone()
        return row and row[0]

    try:
        pid = wait_until(listen_session)
        _write_committed(pg_url, pg_outbox, [event(1, 1)])
        wait_until(lambda: len(stream_ids(bus.client, 1)) == 1)
        process.send_signal(signal.SIGSTOP)
        flood_notifications(pg_url, f"{pg_outbox.table}_wakeup", 40)
        _write_committed(pg_url, pg_outbox, [event(1, 2)])
        wait_until(lambda: (s := backend(admin, pid)) is None or s[1] == "ClientWrite")
        # Ended within the lease of the relay's socket filling up (slack for a loaded machine).
        wait_until(lambda: backend(admin, pid) is None, timeout=lease + 5)
        wait_until(lambda: pinned_notify_queue_mb(admin) < 8)
        process.send_signal(signal.SIGCONT)
        _write_committed(pg_url, pg_outbox, [event(1, 3)])
        wait_until(lambda: len(stream_ids(bus.client, 1)) == 3, timeout=15)
    finally:
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
        admin.close()
    assert process.returncode == 0, logs.text()
    assert_exact(bus.client, {1: [1, 2, 3]})


def test_a_leader_whose_listen_session_is_dropped_reopens_it_and_keeps_the_lead(
    pg_url, pg_outbox, bus
):
    """PostgreSQL ends the leader's LISTEN session (its lease, an operator): the relay reads the
    table, reopens that session and goes on, with the same work session and the lead (a
    warning says what happened). Rows committed meanwhile are published at once, not after the
    poll interval. Before, the relay reset the store: the leader dropped its work session too,
    and with it the lead, and it paused for a poll interval."""
    relay = OutboxRelay.postgres(
        pg_url, bus, table=pg_outbox.table, poll_interval=60, lease=90, max_rate=None
    )  # a leader waits a third of its lease at most: 30 s without a NOTIFY
    admin = psycopg.connect(pg_url, autocommit=True)
    with structlog.testing.capture_logs() as logs:
        relay.start()
        try:
            listen_pid = wait_until(lambda: (s := relay.store._listen) and s.info.backend_pid)
            work_pid = relay.store._work.info.backend_pid
            admin.execute("SELECT pg_terminate_backend(%s)", [listen_pid])
            _write_committed(pg_url, pg_outbox, [event(1, 1)])
            wait_until(lambda: relay.metrics.published == 1, timeout=5)
            wait_until(lambda: (s := relay.store._listen) and s.info.backend_pid != listen_pid)
            _write_committed(pg_url, pg_outbox, [event(1, 2)])  # the new session wakes it
            wait_until(lambda: relay.metrics.published == 2, timeout=5)
            assert relay.store._work.info.backend_pid == work_pid and relay.metrics.leader
        finally:
            relay.stop()
            admin.close()
    assert relay.metrics.errors == 0
    lost = [e for e in logs if e["event"] == "outbox_relay_listen_lost"]
    assert len(lost) == 1 and lost[0]["log_level"] == "warning"
    assert not [e for e in logs if e["event"] in ("outbox_relay_error", "outbox_relay_standby")]
    assert_exact(bus.client, {1: [1, 2]})


def test_a_store_that_loses_the_lead_without_an_error_stops_listening(pg_url, table):
    """The leader's work session breaks under an application's ``wake()`` (which reports
    nothing), another relay takes the lead, and the old leader's next question finds a new
    session that does not lead: no error, it is a standby now, and it closes its LISTEN session
    (a standby never reads it). Before, that session stayed open and unread for as long as
    the relay stayed a standby, and once writers had filled its socket buffers it held back
    PostgreSQL's NOTIFY queue."""
    old = PostgresOutboxStore(pg_url, table, lease=0.3)
    new = PostgresOutboxStore(pg_url, table, lease=60)
    admin = psycopg.connect(pg_url, autocommit=True)
    try:
        assert old.lead()
        old.wait(0)  # opens the LISTEN session
        listen_pid = old._listen.info.backend_pid
        admin.execute("SELECT pg_terminate_backend(%s)", [old._work.info.backend_pid])
        old.wake()  # fails on the broken session, silently
        wait_until(new.lead)  # the lock went with the old leader's session
        wait_until(lambda: not old.lead())
        wait_until(lambda: backend(admin, listen_pid) is None)
        assert old._listen is None
    finally:
        old.close()
        new.close()
        admin.close()


def test_a_wake_up_read_during_a_batch_still_wakes_the_leader(pg_url, pg_outbox, bus):
    """A commit during a batch notifies the LISTEN session, which the leader reads between Redis
    round trips: the row is published right after the batch, not a poll interval later (the
    wake-up read during the batch is kept for the wait that follows it)."""

    class CommitsDuringTheBatch:
        """Publishes; during its first call commits one more row and waits until that row's
        notification has reached the relay (its LISTEN socket is readable)."""

        calls = 0

        def publish(self, event: Any, *, idempotency_key: str | None = None) -> Cursor:
            self.calls += 1
            if self.calls == 1:
                _write_committed(pg_url, pg_outbox, [late])
                sock = relay.store._listen.pgconn.socket
                wait_until(lambda: select.select([sock], [], [], 0)[0])
            return bus.publish(event, idempotency_key=idempotency_key)

    late = event(1, 4)
    relay = OutboxRelay.postgres(
        pg_url,
        CommitsDuringTheBatch(),
        table=pg_outbox.table,
        poll_interval=60,
        lease=90,  # a leader waits a third of its lease at most: 30 s without a wake-up
        max_rate=10,  # one row per round trip: the leader reads its LISTEN session before each
    ).start()
    try:
        wait_until(lambda: relay.store._listen)
        _write_committed(pg_url, pg_outbox, [event(1, n) for n in range(1, 4)])
        wait_until(lambda: relay.metrics.published == 3)
        wait_until(lambda: relay.metrics.published == 4, timeout=5)
    finally:
        relay.stop()
    assert_exact(bus.client, {1: [1, 2, 3, 4]})


async def test_snapshots_through_sqlalchemy_on_sqlite_and_asyncio(
    pg_url, pg_outbox, sqlite_path, table, bus
):
    from sqlalchemy import create_engine, text
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
    from sqlalchemy.orm import Session

    _write_committed(pg_url, pg_outbox, [event(31, 1), event(31, 2)])
    with sqlite3.connect(sqlite_path) as conn:
        Outbox(table).write_many(conn, [event(32, 1), event(32, 2), event(32, 3)])
    relays = [
        OutboxRelay.postgres(pg_url, bus, table=pg_outbox.table, poll_interval=0.05).start(),
        OutboxRelay.sqlite(sqlite_path, bus, table=table, poll_interval=0.05).start(),
    ]
    sync_engine = create_engine(f"sqlite:///{sqlite_path}")
    async_engine = create_async_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with Session(sync_engine) as session:
            snap = await asyncio.to_thread(
                Outbox(table).snapshot,
                session,
                32,
                lambda s: s.execute(text(f"SELECT count(*) FROM {table}")).scalar_one(),
            )
            assert (snap.data, snap.cursor.seq) == (3, 3)
            assert not session.in_transaction()

        async def read(session):
            return (await session.execute(text("SELECT 7"))).scalar_one()

        async with AsyncSession(async_engine) as session:
            snap = await pg_outbox.asnapshot(session, 31, read)
            assert (snap.data, snap.cursor.seq) == (7, 2)
            async with session.begin():
                with pytest.raises(InTransaction):
                    await pg_outbox.asnapshot(session, 31, read)
    finally:
        sync_engine.dispose()
        await async_engine.dispose()
        for relay in relays:
            await asyncio.to_thread(relay.stop)


def test_neither_sqlalchemy_nor_psycopg_is_imported_for_sqlite(tmp_path):
    code = (
        "import sqlite3, sys\n"
        "from publisher.outbox import Outbox\n"
        "from schemas import BlockerResolved, utc_now\n"
        f"conn = sqlite3.connect({str(tmp_path / 'a.db')!r})\n"
        "Outbox().create_table(conn)\n"
        "Outbox().write(conn, BlockerResolved(project_id=1, blocker_id=1, answer='a',"
        " resolved_at=utc_now()))\n"
        "conn.commit()\n"
        "print(sorted(m for m in ('sqlalchemy', 'psycopg') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.strip() == "[]"


def test_cli_relay_publishes_and_stops_cleanly_on_sigterm(sqlite_path, table, bus, redis_url):
    with sqlite3.connect(sqlite_path) as conn:
        Outbox(table).write_many(conn, [event(41, n) for n in range(1, 4)])
    process = subprocess.Popen(
        [
            sys.executable, "-m", "publisher.outbox", "relay", "--sqlite", sqlite_path,
            "--table", table, "--redis-url", redis_url, "--poll-interval", "0.1",
        ],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: len(stream_ids(bus.client, 41)) == 3)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
    assert process.returncode == 0, stderr
    assert '"event": "outbox_relay_started"' in stderr
    assert_exact(bus.client, {41: [1, 2, 3]})


def test_cli_relay_exits_within_its_stop_timeout_on_sigterm_while_its_mark_waits_for_a_lock(
    pg_url, pg_outbox, bus, redis_url
):
    """SIGTERM while the command-line relay's statement waits for another session's row lock
    (a transaction left open on outbox rows): the process exits 0 within ``--stop-timeout``,
    its session ends on the server though the lock is still held, and the rows it published
    but could not mark are marked by the next relay (a no-op republish): nothing lost, nothing
    duplicated. Before, the signal only set the stop flag and the process waited for the
    statement to fail at the store's timeout (30 s), as long as Kubernetes' default grace
    period."""
    _write_committed(pg_url, pg_outbox, [event(1, n) for n in range(1, 4)])
    stop_timeout = 2.0
    # The database is shared by the module's tests: other tests' relays may have sessions too.
    relay_sessions = (
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'eventbus-outbox-relay' "
        "AND datname = current_database()"
    )
    with psycopg.connect(pg_url) as holder, psycopg.connect(pg_url, autocommit=True) as admin:
        holder.execute(f"SELECT id FROM {pg_outbox.table} FOR UPDATE")

        def relay_pids() -> set[int]:
            return {row[0] for row in admin.execute(relay_sessions)}

        others = relay_pids()
        process = subprocess.Popen(
            [
                sys.executable, "-m", "publisher.outbox", "relay",
                "--dsn", pg_url, "--table", pg_outbox.table, "--redis-url", redis_url,
                "--poll-interval", "0.1", "--stop-timeout", str(stop_timeout),
            ],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            # Published, and its mark waits for the row lock.
            wait_until(
                lambda: admin.execute(relay_sessions + " AND wait_event_type = 'Lock'").fetchone()
            )
            assert len(stream_ids(bus.client, 1)) == 3
            ours = relay_pids() - others
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=60)
            elapsed = time.monotonic() - started
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 0, stderr
        assert elapsed < stop_timeout + 1.0, stderr
        wait_until(lambda: not ours & relay_pids(), timeout=5)
        holder.rollback()
    assert [r[4] for r in pg_rows(pg_url, pg_outbox.table)] == [None, None, None]
    relay = OutboxRelay.postgres(pg_url, bus, table=pg_outbox.table)
    try:
        drain(relay)
    finally:
        relay.store.close()
    assert_exact(bus.client, {1: [1, 2, 3]})
    assert_marks_match_stream(bus.client, pg_url, pg_outbox.table)


def test_the_ddl_in_the_docs_is_what_the_package_ships():
    docs = (ROOT / "docs" / "outbox.md").read_text()
    blocks = [block.split("```", 1)[0] for block in docs.split("```sql\n")[1:]]
    assert blocks[:2] == [migration_sql("postgresql"), migration_sql("sqlite")]


def test_the_applications_row_factories_do_not_matter(pg_url, pg_outbox, sqlite_path, table, bus):
    from psycopg.rows import dict_row

    with psycopg.connect(pg_url, row_factory=dict_row) as conn:
        pg_outbox.write(conn, event(51, 1))
    sqlite_outbox = Outbox(table)
    with sqlite3.connect(sqlite_path) as conn:
        sqlite_outbox.write(conn, event(52, 1))
    for relay in [
        OutboxRelay.postgres(pg_url, bus, table=pg_outbox.table),
        OutboxRelay.sqlite(sqlite_path, bus, table=table),
    ]:
        drain(relay)
        relay.store.close()
    with psycopg.connect(pg_url, row_factory=dict_row, autocommit=True) as conn:
        snap = pg_outbox.snapshot(conn, 51, lambda c: c.execute("SELECT 1 AS one").fetchone())
        assert snap.data == {"one": 1} and snap.cursor.seq == 1
    conn = sqlite3.connect(sqlite_path)
    conn.row_factory = lambda cursor, row: {
        column[0]: value for column, value in zip(cursor.description, row, strict=True)
    }
    snap = sqlite_outbox.snapshot(conn, 52, lambda c: c.execute("SELECT 2 AS two").fetchone())
    assert snap.data == {"two": 2} and snap.cursor.seq == 1
    conn.close()


@pytest.mark.parametrize(
    ("settings", "console"),
    [
        ({"EVENTBUS_LOG_FORMAT": "console"}, True),
        ({"argv": ["--log-format", "console", "--log-level", "INFO"]}, True),
        ({}, False),
    ],
)
def test_cli_relay_log_format_and_level_come_from_flags_or_the_environment(
    sqlite_path, table, redis_url, settings, console
):
    """As the gateway's and the HTTP API's: ``--log-format``/``--log-level`` or
    ``$EVENTBUS_LOG_FORMAT``/``$EVENTBUS_LOG_LEVEL`` (the relay had no format choice: JSON
    always). JSON stays the default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_LOG")}
    env.update({k: v for k, v in settings.items() if k != "argv"}, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [
            sys.executable, "-m", "publisher.outbox", "relay", "--sqlite", sqlite_path,
            "--table", table, "--redis-url", redis_url, "--poll-interval", "0.1",
            "--log-level", "info", *settings.get("argv", []),
        ],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        first = process.stderr.readline()
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=15)
    assert process.returncode == 0, first + rest
    if console:
        assert "outbox_relay_started" in first and not first.startswith("{"), first
    else:
        assert json.loads(first)["event"] == "outbox_relay_started", first


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EVENTBUS_LOG_FORMAT", "text"),
        ("EVENTBUS_LOG_LEVEL", "loud"),
        # Names the logging module knows but --log-level does not (nor the gateway, nor the
        # HTTP API): the relay ran with them (notset logging debug lines).
        ("EVENTBUS_LOG_LEVEL", "warn"),
        ("EVENTBUS_LOG_LEVEL", "notset"),
    ],
)
def test_cli_relay_refuses_a_log_setting_from_the_environment_it_does_not_know(
    sqlite_path, variable, value
):
    out = subprocess.run(
        [sys.executable, "-m", "publisher.outbox", "relay", "--sqlite", sqlite_path],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), variable: value},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert variable in out.stderr and value in out.stderr, out.stderr


# --- a publisher whose answer does not match the rows it was given --------------------------------


def _marks(path: str, table: str) -> list[tuple]:
    """(id, seq, tag) of every row, in id order: seq None while the row is unmarked."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"SELECT id, seq, tag FROM {table} ORDER BY id").fetchall()


def _assert_each_row_marked_with_its_own_event(path: str, table: str, client, project_id) -> None:
    """Every row is marked, with the cursor at which Redis holds the row's own event (row n
    carries blocker n), and the tag of the frame stored there."""
    from schemas.tags import event_tag

    stored = dict(stream_ids(client, project_id))
    for row_id, seq, tag in _marks(path, table):
        assert seq is not None and stored[seq] == row_id, f"row {row_id}"
        ((_, fields),) = client.xrange(KEYS.stream(project_id), f"{seq}-0", f"{seq}-0")
        assert tag == event_tag(fields[b"f"]), f"row {row_id}"


class _Faulty(Publisher):
    """A ``Publisher`` subclass whose ``publish_many`` answers wrongly while ``broken``: how is
    up to ``answer(events, keys, options)``; fixed, it is the package's own."""

    broken = True

    def answer(self, events, keys, options):  # pragma: no cover (each test's own)
        raise NotImplementedError

    def publish_many(self, events, *, idempotency_keys=None, **options):
        if not self.broken:
            return super().publish_many(events, idempotency_keys=idempotency_keys, **options)
        return self.answer(list(events), list(idempotency_keys or ()), options)


def _faulty(redis_url: str, answer) -> _Faulty:
    kind = type("Faulty", (_Faulty,), {"answer": answer})
    return kind.from_url(redis_url)


def test_a_publish_many_that_returns_a_cursor_too_few_marks_no_row(sqlite_path, table, redis_url):
    """A subclass whose ``publish_many`` leaves an event out (a filter, a dedupe) returns one
    cursor fewer than the rows it was given. The relay cannot tell which row has none: it fails
    the round trip with an error naming the class and the counts, marks none of its rows, and
    once the publisher is fixed publishes them again under their keys, each row then marked
    with the cursor of its own event. Before, the relay paired the cursors with the rows in
    order: row 2, never stored, was marked published with the cursor (and tag) of row 3's
    event, and was never published (silent loss)."""
    from publisher.outbox import PublisherContractError

    def dropping_the_second(self, events, keys, options):
        del events[1], keys[1]
        return Publisher.publish_many(self, events, idempotency_keys=keys, **options)

    publisher = _faulty(redis_url, dropping_the_second)
    _sqlite_rows(sqlite_path, table, [event(1, n) for n in (1, 2, 3)])
    relay = OutboxRelay.sqlite(sqlite_path, publisher, table=table)
    try:
        with pytest.raises(PublisherContractError, match=r"returned 2 cursors for 3 events"):
            relay.run_once()
        assert [seq for _, seq, _ in _marks(sqlite_path, table)] == [None, None, None]
        publisher.broken = False
        assert drain(relay) == 3
        _assert_each_row_marked_with_its_own_event(sqlite_path, table, publisher.client, 1)
    finally:
        relay.store.close()
        publisher.close()


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_publish_many_that_returns_a_cursor_too_many_marks_no_row(
    sqlite_path, table, redis_url, where
):
    """A subclass whose ``publish_many`` publishes an event of its own with the rows (an audit
    event) and returns its cursor too: one cursor more than rows. The round trip fails loudly,
    no row is marked, and the fixed publisher's relay marks each row with its own cursor.
    Before, with the extra cursor first, every row was marked with its predecessor's cursor
    (row 1 with the audit event's, of another project); with it last, the extra was dropped
    without a word."""
    from publisher.outbox import PublisherContractError

    def with_an_audit_event(self, events, keys, options):
        audit, events = [event(99, len(events))], list(events)
        events = [*audit, *events] if where == "first" else [*events, *audit]
        keys = [None, *keys] if where == "first" else [*keys, None]
        return Publisher.publish_many(self, events, idempotency_keys=keys, **options)

    publisher = _faulty(redis_url, with_an_audit_event)
    _sqlite_rows(sqlite_path, table, [event(1, n) for n in (1, 2, 3)])
    relay = OutboxRelay.sqlite(sqlite_path, publisher, table=table)
    try:
        with pytest.raises(PublisherContractError, match=r"returned 4 cursors for 3 events"):
            relay.run_once()
        assert [seq for _, seq, _ in _marks(sqlite_path, table)] == [None, None, None]
        publisher.broken = False
        assert drain(relay) == 3
        _assert_each_row_marked_with_its_own_event(sqlite_path, table, publisher.client, 1)
    finally:
        relay.store.close()
        publisher.close()


@pytest.mark.parametrize("answer", ["None", "a None among the cursors", "plain tuples"])
def test_a_publish_many_that_returns_no_cursors_marks_no_row_and_the_relay_recovers(
    sqlite_path, table, redis_url, answer
):
    """``publish_many`` answers with something other than one ``Cursor`` per event: None (a
    wrapper that forgot its ``return``), a list with a None in it, ``(epoch, seq)`` tuples. The
    relay fails the round trip with an error naming the class and what it returned, marks no
    row, and publishes them all as soon as the publisher is fixed. Before, None raised a bare
    ``TypeError: 'NoneType' object is not iterable``; a None among the cursors, or a tuple, was
    paired with its row, whose mark then failed (``AttributeError``) before and after every
    later publish: the relay kept retrying that mark and never published anything again."""
    from publisher.outbox import PublisherContractError

    def wrong(self, events, keys, options):
        cursors = Publisher.publish_many(self, events, idempotency_keys=keys, **options)
        if answer == "None":
            return None
        if answer == "plain tuples":
            return [(cursor.epoch, cursor.seq) for cursor in cursors]
        return [cursors[0], None, *cursors[2:]]

    publisher = _faulty(redis_url, wrong)
    _sqlite_rows(sqlite_path, table, [event(1, n) for n in (1, 2, 3)])
    relay = OutboxRelay.sqlite(sqlite_path, publisher, table=table)
    try:
        with pytest.raises(PublisherContractError, match=r"Faulty\.publish_many returned"):
            relay.run_once()
        assert [seq for _, seq, _ in _marks(sqlite_path, table)] == [None, None, None]
        publisher.broken = False
        assert drain(relay) == 3
        _assert_each_row_marked_with_its_own_event(sqlite_path, table, publisher.client, 1)
    finally:
        relay.store.close()
        publisher.close()


def test_a_wrapper_whose_publish_returns_none_marks_no_row(sqlite_path, table, bus):
    """The same for a publisher object of your own (one ``publish`` per row): a ``publish`` that
    returns None fails the row loudly instead of being recorded as its cursor. Before, the
    row's mark failed with AttributeError, and kept failing: the relay was stuck."""
    from publisher.outbox import PublisherContractError

    class Forgetful:
        broken = True

        def publish(self, event, *, idempotency_key=None):
            cursor = bus.publish(event, idempotency_key=idempotency_key)
            return None if self.broken else cursor

    wrapper = Forgetful()
    _sqlite_rows(sqlite_path, table, [event(1, n) for n in (1, 2)])
    relay = OutboxRelay.sqlite(sqlite_path, wrapper, table=table)
    try:
        with pytest.raises(PublisherContractError, match=r"Forgetful\.publish returned None"):
            relay.run_once()
        assert [seq for _, seq, _ in _marks(sqlite_path, table)] == [None, None]
        wrapper.broken = False
        assert drain(relay) == 2
        assert [seq for _, seq, _ in _marks(sqlite_path, table)] == [1, 2]
    finally:
        relay.store.close()


@pytest.mark.parametrize("shape", ["too few cursors", "stopped past the events"])
def test_a_publish_many_error_that_does_not_match_the_rows_marks_none_of_them(
    sqlite_path, table, redis_url, shape
):
    """A ``PublishManyError`` (a refusal) whose ``cursors`` are not one per event, or whose
    ``stopped_at`` names no event given, says nothing exact about which rows were published:
    the round trip fails as a contract error, none of its rows is marked and no project is
    held for it. Before, the relay took the short list as the published prefix and then failed
    with an IndexError, or held the project of whichever row came at that length."""
    from publisher.core import PublishError, PublishManyError
    from publisher.outbox import PublisherContractError

    def misshapen(self, events, keys, options):
        cursors = Publisher.publish_many(self, events, idempotency_keys=keys, **options)
        if shape == "too few cursors":
            raise PublishManyError(cursors[:1], {1: PublishError("refused")}, stopped_at=1)
        raise PublishManyError([*cursors], {1: PublishError("refused")}, stopped_at=5)

    publisher = _faulty(redis_url, misshapen)
    _sqlite_rows(sqlite_path, table, [event(1, n) for n in (1, 2, 3)])
    relay = OutboxRelay.sqlite(sqlite_path, publisher, table=table)
    try:
        with pytest.raises(PublisherContractError, match=r"Faulty\.publish_many raised"):
            relay.run_once()
        assert [seq for _, seq, _ in _marks(sqlite_path, table)] == [None, None, None]
        assert not relay._held
        publisher.broken = False
        assert drain(relay) == 3
        _assert_each_row_marked_with_its_own_event(sqlite_path, table, publisher.client, 1)
    finally:
        relay.store.close()
        publisher.close()


def test_a_publish_many_that_returns_a_generator_of_cursors_is_taken_as_they_come(
    sqlite_path, table, redis_url
):
    """One cursor per event is the contract, not the list: a ``publish_many`` that yields them
    (a generator) has its rows marked as a list's would be, tags included."""

    def yielding(self, events, keys, options):
        yield from Publisher.publish_many(self, events, idempotency_keys=keys, **options)

    publisher = _faulty(redis_url, yielding)
    _sqlite_rows(sqlite_path, table, [event(1, n) for n in (1, 2, 3)])
    relay = OutboxRelay.sqlite(sqlite_path, publisher, table=table)
    try:
        assert drain(relay) == 3
        _assert_each_row_marked_with_its_own_event(sqlite_path, table, publisher.client, 1)
    finally:
        relay.store.close()
        publisher.close()


def _loop_until_the_publisher_is_fixed(relay, publisher) -> tuple[list[dict], list[int]]:
    """Run ``relay``'s loop until it failed three rounds on ``publisher``, fix it (``broken =
    False``) and wait for its two rows to go out; the database session must not have been
    reset meanwhile. Returns the captured logs and the failure counts the loop's pauses were
    computed for."""
    resets, pauses = [], []
    reset, backoff = relay.store.reset, relay._backoff
    relay.store.reset = lambda: resets.append(1) or reset()
    relay._backoff = lambda failures: pauses.append(failures) or backoff(failures)
    with structlog.testing.capture_logs() as logs:
        relay.start()
        try:
            wait_until(lambda: relay.metrics.errors >= 3)
            publisher.broken = False
            wait_until(lambda: relay.metrics.published == 2)
            assert not resets  # (stop() closes the store, which resets it: counted before)
        finally:
            relay.stop()
            publisher.close()
    return logs, pauses


def test_a_running_relay_reports_a_publisher_contract_error_and_backs_off(
    sqlite_path, table, redis_url
):
    """In the relay's loop, a publisher that breaks its contract is reported as the
    publisher's error (``outbox_relay_error``, at error level, ``source="publisher"``, naming
    the class), counted in ``errors``, retried with the usual backoff, and the rows go out once
    it is fixed; the database session is not reset for it (nothing is wrong with it). Before,
    the same failure (then a TypeError) was reported as ``source="database"`` and the store
    was reconnected each round."""

    def answering_none(self, events, keys, options):
        return None

    publisher = _faulty(redis_url, answering_none)
    _sqlite_rows(sqlite_path, table, [event(1, n) for n in (1, 2)])
    relay = OutboxRelay.sqlite(sqlite_path, publisher, table=table, max_backoff=0.05)
    logs, _ = _loop_until_the_publisher_is_fixed(relay, publisher)
    (reported,) = [entry for entry in logs if entry["event"] == "outbox_relay_error"]
    assert reported["log_level"] == "error" and reported["source"] == "publisher"
    assert "Faulty.publish_many returned None" in reported["error"]
    assert [seq for _, seq, _ in _marks(sqlite_path, table)] == [1, 2]


# --- a publisher that raises ------------------------------------------------------------------


def _raising(stored_first: bool):
    """A ``_Faulty`` answer that raises a ValueError (a bug of the publisher's own, e.g. in a
    redaction), before storing anything or (``stored_first``) after ``super().publish_many``
    stored every event."""

    def answer(self, events, keys, options):
        if stored_first:
            Publisher.publish_many(self, events, idempotency_keys=keys, **options)
        raise ValueError("redaction bug")

    return answer


@pytest.mark.parametrize("stored_first", [False, True], ids=["before storing", "after storing"])
def test_a_publish_many_that_raises_marks_no_row_and_names_the_publisher(
    sqlite_path, table, redis_url, stored_first
):
    """A subclass whose ``publish_many`` raises (a ValueError of its own) fails the round trip
    with ``PublisherFailed``, naming the class and the error, and marks none of its rows. Raised
    after ``super().publish_many`` stored the events, the rows are in Redis but unconfirmed:
    the fixed publisher's relay sends them again under their idempotency keys, which Redis
    answers with the first cursors (no event is stored twice), and each row is marked with its
    own event's cursor and tag. Before, the bare ValueError came out of ``run_once``, which the
    loop took for a database error."""
    from publisher.outbox import PublisherFailed

    publisher = _faulty(redis_url, _raising(stored_first))
    _sqlite_rows(sqlite_path, table, [event(1, n) for n in (1, 2, 3)])
    relay = OutboxRelay.sqlite(sqlite_path, publisher, table=table)
    try:
        with pytest.raises(PublisherFailed, match=r"Faulty\.publish_many raised ValueError"):
            relay.run_once()
        assert [seq for _, seq, _ in _marks(sqlite_path, table)] == [None, None, None]
        assert len(stream_ids(publisher.client, 1)) == (3 if stored_first else 0)
        publisher.broken = False
        assert drain(relay) == 3
        assert stream_ids(publisher.client, 1) == [(1, 1), (2, 2), (3, 3)]  # none twice
        _assert_each_row_marked_with_its_own_event(sqlite_path, table, publisher.client, 1)
    finally:
        relay.store.close()
        publisher.close()


def test_a_wrapper_whose_publish_raises_after_storing_marks_the_rows_before_it(
    sqlite_path, table, bus
):
    """A publisher object of your own (one ``publish`` per row) that raises at row 2 after
    storing it: row 1, confirmed by its cursor, is marked; row 2 and 3 are not, and go out (row
    2 as a no-op under its key) once the wrapper is fixed."""
    from publisher.outbox import PublisherFailed

    class Raising:
        broken = True

        def publish(self, event, *, idempotency_key=None):
            cursor = bus.publish(event, idempotency_key=idempotency_key)
            if self.broken and cursor.seq == 2:
                raise ValueError("redaction bug")
            return cursor

    wrapper = Raising()
    _sqlite_rows(sqlite_path, table, [event(1, n) for n in (1, 2, 3)])
    relay = OutboxRelay.sqlite(sqlite_path, wrapper, table=table)
    try:
        with pytest.raises(PublisherFailed, match=r"Raising\.publish raised ValueError"):
            relay.run_once()
        assert [seq for _, seq, _ in _marks(sqlite_path, table)] == [1, None, None]
        wrapper.broken = False
        assert drain(relay) == 2
        assert [seq for _, seq, _ in _marks(sqlite_path, table)] == [1, 2, 3]
        assert stream_ids(bus.client, 1) == [(1, 1), (2, 2), (3, 3)]
    finally:
        relay.store.close()


def test_a_running_relay_reports_a_raising_publisher_as_the_publishers_error(
    sqlite_path, table, redis_url
):
    """In the relay's loop, a publisher that raises is reported as the publisher's error
    (``outbox_relay_error``, error level, ``source="publisher"``, the class and the error),
    counted in ``errors``, retried with the usual doubling backoff, and the database session is
    not reset for it; once fixed, the rows go out. Before, it was a warning with
    ``source="database"`` (operators looked at the database) and the store reconnected each
    round."""
    publisher = _faulty(redis_url, _raising(stored_first=True))
    _sqlite_rows(sqlite_path, table, [event(1, n) for n in (1, 2)])
    relay = OutboxRelay.sqlite(sqlite_path, publisher, table=table, max_backoff=0.05)
    logs, pauses = _loop_until_the_publisher_is_fixed(relay, publisher)
    assert pauses[:3] == [1, 2, 3]  # consecutive failures: the pause doubles
    (reported,) = [entry for entry in logs if entry["event"] == "outbox_relay_error"]
    assert reported["log_level"] == "error" and reported["source"] == "publisher"
    assert "Faulty.publish_many raised ValueError(" in reported["error"]
    assert "redaction bug" in reported["error"]
    assert [seq for _, seq, _ in _marks(sqlite_path, table)] == [1, 2]


def test_the_relay_publishes_after_more_than_a_thousand_failed_rounds(sqlite_path, table, bus):
    """Redis unavailable for a long outage (over 1,000 failed rounds: some 2 hours at the
    default 5 s backoff), then back: the relay publishes the rows. Before, the pause computed
    ``0.1 * 2 ** (failures - 1)`` before capping it, which raised OverflowError at the 1,025th
    failure, out of the relay's thread: the outbox was never published again until a restart.
    (``max_backoff=0`` so that the test takes seconds: the overflow came before the cap.)"""

    class Outage:
        """The publisher, refusing every publish while ``down``."""

        down = True

        def __getattr__(self, name: str) -> Any:
            attribute = getattr(bus, name)
            if name.startswith("publish") and self.down:

                def refuse(*args: Any, **kwargs: Any) -> Any:
                    raise PublisherUnavailable("Redis unavailable: down for the test")

                return refuse
            return attribute

    project = 10**9 + uuid.uuid4().int % 10**9  # (the shared Redis: a project of its own)
    _sqlite_rows(sqlite_path, table, [event(project, n) for n in range(1, 4)])
    outage = Outage()
    relay = OutboxRelay.sqlite(sqlite_path, outage, table=table, max_backoff=0, max_rate=None)
    relay.start()
    try:
        wait_until(lambda: relay.metrics.unavailable > 1100 or not relay._thread.is_alive(), 60)
        assert relay._thread.is_alive(), "the relay's thread ended"
        outage.down = False
        wait_until(lambda: relay.store.backlog() == 0, 30)
    finally:
        relay.stop()
    assert stream_ids(bus.client, project) == [(1, 1), (2, 2), (3, 3)]
