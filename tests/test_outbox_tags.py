"""Outbox snapshot cursors carry the tag of their event (docs/outbox.md, "Snapshot with a
cursor"; docs/protocol.md, "Cursor tags").

What users rely on: a page that reloaded its state from ``Outbox.snapshot`` and resumes from its
cursor is told ``history_lost`` when a Redis failover lost the event at that cursor and gave its
number to another event, instead of silently keeping the lost event and skipping its
replacement. The relay records the tag when it publishes (the frame Redis stored), in the
``tag`` column; tables created before it are upgraded by the same migration, and a relay on a
table not yet upgraded keeps publishing, without tags.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
import redis
import structlog

from consumer import Cursor as ConsumerCursor
from publisher import Publisher
from publisher.outbox import Outbox, OutboxRelay
from publisher.outbox import store as store_module
from schemas import BlockerResolved
from schemas.keys import Keys
from schemas.tags import event_tag
from tests.support.failover import failover
from tests.support.gateway_client import client_for
from tests.test_outbox import T0, pg_url  # noqa: F401 (the session's private database)

ROOT = Path(__file__).resolve().parent.parent
KEYS = Keys()

#: The outbox table as the DDL created it before cursor tags (no ``tag`` column).
OLD_POSTGRES = """\
CREATE TABLE {table} (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id   bigint NOT NULL,
    token        text NOT NULL,
    event        text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at timestamptz,
    epoch        text,
    seq          bigint
)"""
OLD_SQLITE = """\
CREATE TABLE {table} (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id   INTEGER NOT NULL,
    token        TEXT NOT NULL,
    event        TEXT NOT NULL,
    created_at   REAL NOT NULL,
    published_at REAL,
    epoch        TEXT,
    seq          INTEGER
)"""


def event(project_id: int, n: int) -> BlockerResolved:
    return BlockerResolved(
        project_id=project_id, blocker_id=n, answer=f"answer {n}", resolved_at=T0
    )


@pytest.fixture
def table() -> str:
    return f"outbox_{uuid.uuid4().hex[:12]}"


class Database:
    """One outbox table on PostgreSQL or SQLite: connect, write committed events, relay them."""

    def __init__(self, dialect: str, url: str, table: str) -> None:
        self.dialect, self.url, self.table = dialect, url, table
        self.outbox = Outbox(table)

    def connect(self):
        if self.dialect == "postgresql":
            return psycopg.connect(self.url, autocommit=True)
        return sqlite3.connect(self.url, isolation_level=None)

    def execute(self, sql: str) -> list[tuple]:
        conn = self.connect()
        try:
            cur = conn.execute(sql)
            return list(cur.fetchall()) if cur.description is not None else []
        finally:
            conn.close()

    def create(self) -> None:
        conn = self.connect()
        try:
            self.outbox.create_table(conn)
        finally:
            conn.close()

    def write(self, *events: BlockerResolved) -> None:
        conn = self.connect()
        try:
            self.outbox.write_many(conn, events)
        finally:
            conn.close()

    def relay(self, publisher) -> OutboxRelay:
        if self.dialect == "postgresql":
            return OutboxRelay.postgres(self.url, publisher, table=self.table)
        return OutboxRelay.sqlite(self.url, publisher, table=self.table)

    def drain(self, publisher) -> int:
        relay = self.relay(publisher)
        try:
            total = 0
            while count := relay.run_once():
                total += count
            return total
        finally:
            relay.store.close()

    def snapshot(self, project_id: int):
        conn = self.connect()
        try:
            return self.outbox.snapshot(conn, project_id, lambda c: None, max_wait=1)
        finally:
            conn.close()

    def columns(self) -> set[str]:
        conn = self.connect()
        try:
            cur = conn.execute(f"SELECT * FROM {self.table} WHERE 1 = 0")
            names = {column[0] for column in cur.description}
            cur.fetchall()
            return names
        finally:
            conn.close()


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request, tmp_path, table) -> Database:
    if request.param == "postgresql":
        return Database("postgresql", request.getfixturevalue("pg_url"), table)
    return Database("sqlite", str(tmp_path / "app.db"), table)


def stored_frame(client: redis.Redis, project_id: int, seq: int) -> bytes:
    ((_, fields),) = client.xrange(KEYS.stream(project_id), f"{seq}-0", f"{seq}-0")
    return fields[b"f"]


def test_a_snapshot_cursor_carries_the_tag_of_the_event_redis_holds_at_its_seq(db, bus):
    db.create()
    db.write(event(1, 1), event(1, 2), event(2, 7), event(1, 3))
    assert db.drain(bus) == 4
    snap = db.snapshot(1)
    tag = event_tag(stored_frame(bus.client, 1, 3))
    assert snap.cursor_json() == {"epoch": snap.cursor.epoch, "seq": 3, "tag": tag}
    assert snap.tag == tag
    # Every published row records the tag of the frame Redis stored under its cursor.
    for project_id, seq, row_tag in db.execute(f"SELECT project_id, seq, tag FROM {db.table}"):
        assert row_tag == event_tag(stored_frame(bus.client, project_id, seq))
    # The Python consumer takes it as it comes, tag included (sent with its resume).
    assert ConsumerCursor(**snap.cursor_json()).tag == tag


async def test_a_resume_from_a_snapshot_cursor_whose_event_a_failover_replaced_gets_history_lost(
    db, bus, gateways, redis_url
):
    db.create()
    db.write(event(1, 1), event(1, 2), event(1, 3))
    db.drain(bus)
    cursor = db.snapshot(1).cursor_json()
    assert cursor["seq"] == 3
    gateway = await gateways()
    # Nothing changed: the resume from the snapshot is honoured.
    client = await client_for(gateway, [1])
    await client.send({"type": "subscribe", "project_id": 1, "epoch": cursor["epoch"],
                       "after": cursor["seq"], "tag": cursor["tag"]})  # fmt: skip
    await client.wait_for(lambda: client.count("subscribed") == 1)
    assert client.last("subscribed")["resumed"] is True and client.last("resync_required") is None
    await client.close()
    # A failover lost event 3 (the page's state includes it); the new master's 3 is another.
    failover(redis_url, 1, keep=2)
    db.write(event(1, 30))
    db.drain(bus)
    resumed = await client_for(gateway, [1])
    await resumed.send({"type": "subscribe", "project_id": 1, "epoch": cursor["epoch"],
                        "after": cursor["seq"], "tag": cursor["tag"]})  # fmt: skip
    await resumed.wait_for(lambda: resumed.count("subscribed") == 1)
    resync = resumed.last("resync_required")
    assert resync is not None and resync["reason"] == "history_lost"
    assert resumed.seqs(1) == []
    await resumed.close()
    # The reload's snapshot names the new event 3: a resume from it is honoured (no loop).
    again = db.snapshot(1).cursor_json()
    assert (again["seq"], again["tag"]) == (3, event_tag(stored_frame(bus.client, 1, 3)))
    assert again["tag"] != cursor["tag"]
    client = await client_for(gateway, [1])
    await client.send({"type": "subscribe", "project_id": 1, "epoch": again["epoch"],
                       "after": again["seq"], "tag": again["tag"]})  # fmt: skip
    await client.wait_for(lambda: client.count("subscribed") == 1)
    assert client.last("subscribed")["resumed"] is True and client.last("resync_required") is None
    await client.close()


def test_rows_published_without_a_tag_give_a_cursor_without_one(db, bus):
    """Rows an older relay published (tag NULL) are taken at their number, as before."""
    db.create()
    db.write(event(1, 1))
    db.drain(bus)
    db.execute(f"UPDATE {db.table} SET tag = NULL")
    snap = db.snapshot(1)
    assert snap.cursor_json() == {"epoch": snap.cursor.epoch, "seq": 1, "tag": None}
    # A tag column holding something that is not a tag (a hand edit) is no tag either.
    db.execute(f"UPDATE {db.table} SET tag = 'not a tag'")
    assert db.snapshot(1).cursor_json()["tag"] is None


def test_the_migration_adds_the_tag_column_to_an_older_table_and_runs_again_harmlessly(db, bus):
    old = OLD_POSTGRES if db.dialect == "postgresql" else OLD_SQLITE
    db.execute(old.format(table=db.table))
    assert "tag" not in db.columns()
    db.create()
    assert "tag" in db.columns()
    db.create()  # idempotent
    db.write(event(1, 1))
    db.drain(bus)
    assert db.snapshot(1).cursor_json()["tag"] == event_tag(stored_frame(bus.client, 1, 1))


def test_the_sqlite_migration_takes_a_tag_column_declared_in_another_case_for_the_column(
    tmp_path, table, bus
):
    """A SQLite table whose DDL the application wrote itself, declaring ``Tag TEXT``: SQLite's
    column names ignore case, and the relay and snapshots take it for the tag column (they
    record and read tags in it). The migration (``Outbox.create_table`` at every start, ``migrate
    --sqlite``) looked for ``tag`` exactly, ran ``ADD COLUMN tag``, and failed with ``duplicate
    column name: tag``: an application migrating at startup could not start."""
    db = Database("sqlite", str(tmp_path / "app.db"), table)
    own_ddl = OLD_SQLITE.format(table=table).replace("seq          INTEGER", "seq INT, Tag TEXT")
    db.execute(own_ddl)
    db.create()
    db.create()
    db.write(event(1, 1))
    db.drain(bus)
    assert db.snapshot(1).tag == event_tag(stored_frame(bus.client, 1, 1))


def test_the_cli_migration_upgrades_an_older_table(db):
    old = OLD_POSTGRES if db.dialect == "postgresql" else OLD_SQLITE
    db.execute(old.format(table=db.table))
    source = ["--dsn", db.url] if db.dialect == "postgresql" else ["--sqlite", db.url]
    command = [sys.executable, "-m", "publisher.outbox", "migrate", *source, "--table", db.table]
    for _ in range(2):  # idempotent
        subprocess.run(command, cwd=ROOT, check=True, timeout=60)
        assert "tag" in db.columns()


def run(relay: OutboxRelay) -> int:
    total = 0
    while count := relay.run_once():
        total += count
    return total


def test_a_relay_on_a_table_not_yet_migrated_keeps_publishing_without_tags(db, bus, monkeypatch):
    old = OLD_POSTGRES if db.dialect == "postgresql" else OLD_SQLITE
    db.execute(old.format(table=db.table))
    db.write(event(1, 1), event(1, 2))
    relay = db.relay(bus)
    try:
        with structlog.testing.capture_logs() as logs:
            assert run(relay) == 2
            db.write(event(1, 3))
            assert run(relay) == 1
        assert db.execute(f"SELECT seq FROM {db.table} ORDER BY id") == [(1,), (2,), (3,)]
        warnings = [entry for entry in logs if entry["event"] == "outbox_table_not_migrated"]
        assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
        # Migrated while the relay runs: it looks again (every minute; now at once) and records
        # tags from then on.
        db.create()
        monkeypatch.setattr(store_module, "TAG_COLUMN_RECHECK", 0.0)
        db.write(event(1, 4))
        assert run(relay) == 1
    finally:
        relay.store.close()
    rows = db.execute(f"SELECT seq, tag FROM {db.table} ORDER BY id")
    assert [tag for _, tag in rows[:3]] == [None, None, None]
    assert rows[3] == (4, event_tag(stored_frame(bus.client, 1, 4)))
    # A snapshot ending at an untagged row has a cursor without a tag.
    db.execute(f"DELETE FROM {db.table} WHERE seq = 4")
    assert db.snapshot(1).cursor_json()["tag"] is None


def test_a_snapshot_on_a_table_not_yet_migrated_gives_cursors_without_tags_and_warns_once(db, bus):
    """Application code of this version deployed before the migration ran: its snapshots keep
    answering, with cursors taken at their number as before tags (the relay, on such a table,
    publishes without tags), instead of failing every reload with ``no such column: tag``."""
    old = OLD_POSTGRES if db.dialect == "postgresql" else OLD_SQLITE
    db.execute(old.format(table=db.table))
    db.write(event(1, 1), event(1, 2))
    with structlog.testing.capture_logs() as logs:
        db.drain(bus)
        first, second = db.snapshot(1), db.snapshot(1)
    for snap in (first, second):
        assert snap.cursor_json() == {"epoch": snap.cursor.epoch, "seq": 2, "tag": None}
    warnings = [
        entry
        for entry in logs
        if entry["event"] == "outbox_table_not_migrated" and entry.get("by") == "snapshot"
    ]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert "python -m publisher.outbox migrate" in warnings[0]["reason"]
    # Migrated meanwhile: the same Outbox's next snapshot reads the tags.
    db.create()
    db.write(event(1, 3))
    db.drain(bus)
    assert db.snapshot(1).cursor_json()["tag"] == event_tag(stored_frame(bus.client, 1, 3))


async def test_an_asnapshot_on_a_table_not_yet_migrated_gives_a_cursor_without_a_tag(
    request, table, bus
):
    url = request.getfixturevalue("pg_url")
    db = Database("postgresql", url, table)
    db.execute(OLD_POSTGRES.format(table=table))
    db.write(event(6, 1))
    db.drain(bus)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:

        async def read(c):
            return "data"

        snap = await db.outbox.asnapshot(conn, 6, read)
    assert snap.cursor_json() == {"epoch": snap.cursor.epoch, "seq": 1, "tag": None}


@pytest.fixture
def tenants(request, tmp_path, table) -> tuple[Database, Database]:
    """Two databases holding one outbox table of the same name, as one application serving a
    database (SQLite: a file; PostgreSQL: a schema, chosen by the connection's search_path)
    per tenant sees them; each with its own Outbox, which the test replaces by a shared one."""
    if request.param == "sqlite":
        return (
            Database("sqlite", str(tmp_path / "a.db"), table),
            Database("sqlite", str(tmp_path / "b.db"), table),
        )
    url = request.getfixturevalue("pg_url")
    out = []
    for name in ("a", "b"):
        schema = f"tenant_{name}_{table}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        out.append(Database("postgresql", f"{url}?options=-csearch_path%3D{schema}", table))
    return out[0], out[1]


@pytest.mark.parametrize("tenants", ["postgresql", "sqlite"], indirect=True)
def test_one_outbox_on_a_migrated_and_a_not_yet_migrated_database_snapshots_both(tenants, bus):
    """One Outbox object shared by the databases (or schemas) of several tenants, some not yet
    migrated. Before, once a snapshot had found the tag column on one of them, the Outbox took
    it for present everywhere: every snapshot on the others failed (``no such column: tag``,
    ``column "tag" does not exist``). Now each snapshot reads the tag of the database it runs
    on: tags where the column is, none (and the one warning) where it is not."""
    migrated, old = tenants
    shared = Outbox(migrated.table)
    migrated.create()
    old.execute(
        (OLD_POSTGRES if old.dialect == "postgresql" else OLD_SQLITE).format(table=old.table)
    )
    migrated.write(event(1, 1))
    old.write(event(2, 1))
    migrated.drain(bus)
    old.drain(bus)
    migrated.outbox = old.outbox = shared
    with structlog.testing.capture_logs() as logs:
        tagged = migrated.snapshot(1)
        untagged = old.snapshot(2)
        again = migrated.snapshot(1)
    assert tagged.tag == again.tag == event_tag(stored_frame(bus.client, 1, 1))
    assert untagged.cursor_json() == {"epoch": untagged.cursor.epoch, "seq": 1, "tag": None}
    warnings = [entry for entry in logs if entry["event"] == "outbox_table_not_migrated"]
    assert len(warnings) == 1 and warnings[0]["by"] == "snapshot"
    # The other one migrated meanwhile: the same Outbox's next snapshot there reads its tags.
    old.create()
    old.write(event(2, 2))
    old.drain(bus)
    assert old.snapshot(2).tag == event_tag(stored_frame(bus.client, 2, 2))


def test_rows_published_before_and_after_a_refused_row_record_their_tags(db, bus):
    """A row Redis refuses (its project's key damaged) stops its round trip: the rows before it
    in that round trip, and those after it that Redis ran in the same transaction (other
    projects'), record the tags of their frames. The latter are published again under their
    keys, a no-op answered from the idempotency record; they got no tag before, and a snapshot
    ending at one had a cursor without one."""
    db.create()
    db.write(event(1, 1), event(1, 2), event(2, 1), event(1, 3))
    bus.client.set(KEYS.meta(2), "not a hash")
    assert db.drain(bus) == 3
    rows = db.execute(f"SELECT project_id, seq, tag FROM {db.table} ORDER BY id")
    assert [(p, s) for p, s, _ in rows] == [(1, 1), (1, 2), (2, None), (1, 3)]
    for project_id, seq, tag in rows:
        if seq is not None:
            assert tag == event_tag(stored_frame(bus.client, project_id, seq))


def test_a_relay_publishing_to_a_redis_cluster_records_the_tags(tmp_path, table, redis_cluster_url):
    """On a cluster the relay publishes one row per round trip (a transaction cannot span the
    projects' slots); each row still records the tag of the frame its shard stored."""
    db = Database("sqlite", str(tmp_path / "app.db"), table)
    db.create()
    db.write(*[event(project_id, n) for n in range(1, 4) for project_id in (1, 2, 3)])
    with Publisher.from_url(redis_cluster_url) as publisher:
        assert db.drain(publisher) == 9
        rows = db.execute(f"SELECT project_id, seq, tag FROM {db.table}")
        assert sorted((p, s) for p, s, _ in rows) == [(p, s) for p in (1, 2, 3) for s in (1, 2, 3)]
        for project_id, seq, tag in rows:
            assert tag == event_tag(stored_frame(publisher.client, project_id, seq))


def test_a_relay_whose_publisher_is_not_ours_records_no_tag(db, bus):
    """A wrapper may store something else than the event as encode_event encodes it: no tag
    rather than one that names bytes Redis does not hold (a reload at every resume)."""

    class Wrapped:
        def publish(self, event, *, idempotency_key=None):
            return bus.publish(event, idempotency_key=idempotency_key)

    db.create()
    db.write(event(1, 1))
    assert db.drain(Wrapped()) == 1
    snap = db.snapshot(1)
    assert snap.cursor.seq == 1 and snap.tag is None


async def test_asnapshot_and_acreate_table_on_postgresql(request, table, bus):
    url = request.getfixturevalue("pg_url")
    outbox = Outbox(table)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(OLD_POSTGRES.format(table=table))
        await outbox.acreate_table(conn)
        await outbox.acreate_table(conn)
    db = Database("postgresql", url, table)
    assert "tag" in db.columns()
    db.write(event(5, 1), event(5, 2))
    db.drain(bus)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:

        async def read(c):
            return "data"

        snap = await outbox.asnapshot(conn, 5, read)
    assert snap.cursor_json() == {
        "epoch": snap.cursor.epoch,
        "seq": 2,
        "tag": event_tag(stored_frame(bus.client, 5, 2)),
    }


async def test_asnapshot_and_acreate_table_on_sqlite_through_sqlalchemy(tmp_path, table, bus):
    """aiosqlite: ``acreate_table`` on an ``AsyncConnection`` and an ``AsyncSession`` upgrades a
    table created before the tag column (and runs again harmlessly); ``asnapshot`` on either
    returns the tag the relay recorded."""
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    db = Database("sqlite", str(tmp_path / "app.db"), table)
    db.execute(OLD_SQLITE.format(table=table))
    outbox = Outbox(table)
    engine = create_async_engine(f"sqlite+aiosqlite:///{db.url}")
    try:
        async with engine.begin() as connection:
            await outbox.acreate_table(connection)
        assert "tag" in db.columns()
        async with engine.begin() as connection:
            await outbox.acreate_table(connection)
        async with AsyncSession(engine) as session, session.begin():
            await outbox.acreate_table(session)
        db.write(event(5, 1), event(5, 2))
        db.drain(bus)

        async def read(conn):
            return "data"

        tag = event_tag(stored_frame(bus.client, 5, 2))
        for connect in (lambda: AsyncSession(engine), engine.connect):
            async with connect() as conn:
                snap = await outbox.asnapshot(conn, 5, read)
            assert snap.cursor_json() == {"epoch": snap.cursor.epoch, "seq": 2, "tag": tag}
    finally:
        await engine.dispose()


async def test_the_python_consumer_resuming_from_a_snapshot_cursor_is_told_history_lost(
    db, bus, gateways, redis_url
):
    """A backend worker that loads its state from a snapshot and follows the project from its
    cursor with the Python consumer (``after=Cursor(**cursor)``): the consumer sends the tag,
    and a failover that replaced the event at the cursor is a Resync(history_lost)."""
    from consumer import Consumer, Delivery, Resync
    from publisher import issue_token
    from schemas.protocol import ResyncReason
    from tests.support.gateway_client import SECRET, ws_url

    db.create()
    db.write(event(1, 1), event(1, 2), event(1, 3))
    db.drain(bus)
    cursor = db.snapshot(1).cursor_json()
    failover(redis_url, 1, keep=2)
    db.write(event(1, 30), event(1, 31))
    db.drain(bus)
    gateway = await gateways()
    token = issue_token(SECRET, [1], ttl=300)
    async with Consumer(ws_url(gateway), token=token) as consumer:
        async with consumer.events(1, after=ConsumerCursor(**cursor)) as subscription:
            first = await anext(aiter(subscription))
            db.write(event(1, 32))
            db.drain(bus)
            second = await anext(aiter(subscription))
    assert isinstance(first, Resync) and first.reason == ResyncReason.HISTORY_LOST
    assert (first.seq, first.tag) == (4, event_tag(stored_frame(bus.client, 1, 4)))
    assert isinstance(second, Delivery) and (second.seq, second.event.blocker_id) == (5, 32)


# --- The migration on a live PostgreSQL table (hostile review of the tag column's upgrade) ----


@pytest.fixture
def pg(request) -> str:
    """The session's private PostgreSQL database."""
    return request.getfixturevalue("pg_url")


def test_a_migration_run_again_on_a_live_table_does_not_wait_for_its_writers(pg, table):
    """A deploy runs ``migrate`` every time: on a table already up to date it must take no lock
    that waits for the writers' open transactions (and holds up every writer queued behind it
    meanwhile). Before, the ``CREATE INDEX IF NOT EXISTS`` statements took the table's SHARE
    lock even when the indexes existed."""
    db = Database("postgresql", pg, table)
    db.create()
    writer = psycopg.connect(pg)
    migrator = psycopg.connect(pg, autocommit=True)
    try:
        db.outbox.write(writer, event(1, 1))  # a writer's transaction, still open
        migrator.execute("SET lock_timeout = '2s'")  # waiting for it fails the migration
        db.outbox.create_table(migrator)
        writer.commit()
    finally:
        writer.close()
        migrator.close()


def _wait_until_active(url: str, pid: int) -> None:
    """Until the session ``pid`` is running a statement (the migration has started)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(2000):
            row = conn.execute(
                "SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            if row is not None and row[0] == "active":
                return
            conn.execute("SELECT pg_sleep(0.005)")
    raise AssertionError("the migration never started")


def test_upgrading_a_table_a_long_transaction_holds_does_not_stop_the_writers(pg, table):
    """The one-time ``ALTER TABLE ... ADD COLUMN tag`` needs the table's exclusive lock: while a
    long transaction holds the table (a report, pg_dump), a plain ALTER waits in the lock queue,
    and every writer queues behind it until that transaction ends, for minutes or hours (and
    ``migrate``'s client-side timeout leaves the queued ALTER in the server). Now the migration
    tries the lock briefly, lets the writers through between tries, and adds the column once
    the table is free."""
    import threading

    db = Database("postgresql", pg, table)
    db.execute(OLD_POSTGRES.format(table=table))
    reader = psycopg.connect(pg)
    migrator = psycopg.connect(pg, autocommit=True)
    writer = psycopg.connect(pg, autocommit=True)
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            db.outbox.create_table(migrator)
        except BaseException as exc:  # (reported by the assertion below)
            errors.append(exc)

    thread = threading.Thread(target=migrate)
    try:
        reader.execute(f"SELECT count(*) FROM {table}").fetchall()  # holds it until rollback
        thread.start()
        _wait_until_active(pg, migrator.info.backend_pid)
        writer.execute("SET lock_timeout = '3s'")  # held longer: the writers are stopped
        for n in range(1, 4):
            with writer.transaction():
                db.outbox.write(writer, event(1, n))
        assert thread.is_alive()  # still waiting for the table
    finally:
        reader.rollback()
        thread.join(30)
        reader.close()
        migrator.close()
        writer.close()
    assert not thread.is_alive() and errors == []
    assert "tag" in db.columns()
    assert len(db.execute(f"SELECT id FROM {table}")) == 3


def test_the_migration_refuses_a_tag_column_of_another_type_with_a_clear_error(pg, table):
    """A ``tag`` column that is not text (someone's own column of that name): before, the
    migration took it, and the relay published one batch and then failed every mark (``column
    "tag" is of type integer``), publishing nothing more for good. Now the migration says so."""
    db = Database("postgresql", pg, table)
    db.execute(OLD_POSTGRES.format(table=table))
    db.execute(f"ALTER TABLE {table} ADD COLUMN tag integer")
    with pytest.raises(psycopg.Error, match=r"tag .*integer.*text"):
        db.create()
    result = subprocess.run(
        [sys.executable, "-m", "publisher.outbox", "migrate", "--dsn", pg, "--table", table],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_two_processes_upgrading_one_sqlite_table_at_once_both_succeed(tmp_path, table):
    """Every worker process of an application may run ``create_table`` at startup (or two
    ``migrate --sqlite`` at once): SQLite has no ``ADD COLUMN IF NOT EXISTS``, so each looks at
    the columns first, and another may add ``tag`` between its look and its ``ALTER``. Before,
    that one failed (``duplicate column name: tag``) and the worker did not start."""
    path = str(tmp_path / "app.db")
    with sqlite3.connect(path) as conn:
        conn.execute(OLD_SQLITE.format(table=table))

    class Interleaved(sqlite3.Cursor):
        """Another process's migration runs right after this one has read the columns."""

        def execute(self, sql, *args):
            result = super().execute(sql, *args)
            if "pragma_table_info" in sql:
                rows = result.fetchall()
                other = sqlite3.connect(path, isolation_level=None)
                try:
                    Outbox(table).create_table(other)
                finally:
                    other.close()
                return FetchedRows(rows)
            return result

    class FetchedRows(list):
        def fetchall(self):
            return list(self)

    class Connection(sqlite3.Connection):
        def cursor(self, factory=Interleaved):
            return super().cursor(factory)

    conn = sqlite3.connect(path, isolation_level=None, factory=Connection)
    try:
        Outbox(table).create_table(conn)
    finally:
        conn.close()
    assert "tag" in Database("sqlite", path, table).columns()


def test_a_publisher_subclass_that_stores_another_event_records_no_wrong_tag(db, redis_url):
    """A subclass of ``Publisher`` whose ``publish``/``publish_many`` change the event (here,
    redact the answer) stores other bytes than the relay's encoding of the row: a tag computed
    from the row would name bytes Redis does not hold, and every resume from a snapshot ending
    there would answer history_lost (a reload at every page load and reconnect). Before, any
    subclass counted as this package's Publisher and got such a tag. The relay publishes through
    the subclass's ``publish_many`` (never around it: the redaction holds), and records the tag
    its cursors carry, that of the redacted frame Redis stored; before, such a subclass's rows
    got no tag (the relay could not tell what it stored)."""
    import msgspec

    class Redacting(Publisher):
        def publish(self, event, *, idempotency_key=None):
            return super().publish(msgspec.structs.replace(event, answer="x"),
                                   idempotency_key=idempotency_key)  # fmt: skip

        def publish_many(self, events, **options):
            redacted = [msgspec.structs.replace(e, answer="x") for e in events]
            return super().publish_many(redacted, **options)

    publisher = Redacting.from_url(redis_url)
    try:
        db.create()
        db.write(event(1, 1))
        assert db.drain(publisher) == 1
        frame = stored_frame(publisher.client, 1, 1)
        assert b'"answer":"x"' in frame  # (not bypassed)
        snap = db.snapshot(1)
        assert snap.cursor.seq == 1 and snap.tag == event_tag(frame)
    finally:
        publisher.close()


def test_a_publisher_subclass_that_only_adds_to_its_methods_keeps_the_tags(db, redis_url):
    """A subclass that does not override the publishing methods stores what the package's
    Publisher stores: its rows keep their tags."""

    class Counting(Publisher):
        pass

    publisher = Counting.from_url(redis_url)
    try:
        db.create()
        db.write(event(1, 1))
        assert db.drain(publisher) == 1
        assert db.snapshot(1).tag == event_tag(stored_frame(publisher.client, 1, 1))
    finally:
        publisher.close()


def test_a_publisher_subclass_that_changes_the_calls_it_sends_records_no_wrong_tag(db, redis_url):
    """A subclass of ``Publisher`` that overrides the in-order internals (here
    ``_send_in_order``, rewriting each call's event before it is sent; no supported seam) stores
    other bytes than the relay's events encode to: a tag of those would name bytes Redis does
    not hold (every resume from a snapshot ending there told history_lost). The subclass's own
    sending runs, and no tag but that of the bytes it sent is recorded."""

    class Rewriting(Publisher):
        def _send_in_order(self, calls):
            rewritten = [
                call._replace(args=[*call.args[:-1], call.args[-1].replace(b"answer", b"ANSWER")])
                for call in calls
            ]
            return super()._send_in_order(rewritten)

    publisher = Rewriting.from_url(redis_url)
    try:
        db.create()
        db.write(event(1, 1))
        assert db.drain(publisher) == 1
        frame = stored_frame(publisher.client, 1, 1)
        assert b"ANSWER 1" in frame  # (the subclass's own sending did run)
        snap = db.snapshot(1)
        assert snap.cursor.seq == 1 and snap.tag in (None, event_tag(frame))
    finally:
        publisher.close()


def test_a_publisher_subclass_that_makes_its_own_cursors_records_no_tag(db, redis_url):
    """A subclass whose ``publish_many`` returns cursors it made itself (not those the package's
    sending returned) says nothing of the bytes Redis holds there: its rows get no tag, never
    one of the relay's own encoding of the row."""
    from publisher.core import Cursor as PublisherCursor

    class Copying(Publisher):
        def publish_many(self, events, **options):
            cursors = super().publish_many(events, **options)
            return [PublisherCursor(cursor.epoch, cursor.seq) for cursor in cursors]

    publisher = Copying.from_url(redis_url)
    try:
        db.create()
        db.write(event(1, 1))
        assert db.drain(publisher) == 1
        snap = db.snapshot(1)
        assert snap.cursor.seq == 1 and snap.tag is None
    finally:
        publisher.close()


def test_in_order_cursors_carry_the_tag_of_the_frame_their_call_stored(bus):
    """What the relay records: each cursor of ``publish_many(..., in_order=True)`` carries the
    tag of the frame its call stored (``Cursor.tag``), and a cursor answered from an idempotency
    record from another call, none (Redis holds that call's bytes). The cursors stay equal to,
    and shown as, plain cursors; ``publish``'s carry no tag."""
    from publisher.core import Cursor as PublisherCursor

    cursors = bus.publish_many([event(7, 1), event(8, 1), event(7, 2)],
                               idempotency_keys=["a", "b", None], in_order=True)  # fmt: skip
    assert [(c.seq, c.tag) for c in cursors] == [
        (1, event_tag(stored_frame(bus.client, 7, 1))),
        (1, event_tag(stored_frame(bus.client, 8, 1))),
        (2, event_tag(stored_frame(bus.client, 7, 2))),
    ]
    assert cursors[0] == PublisherCursor(cursors[0].epoch, 1)
    assert repr(cursors[0]) == repr(PublisherCursor(cursors[0].epoch, 1))
    assert bus.publish(event(7, 3)).tag is None
    stamped = BlockerResolved(project_id=7, blocker_id=1, answer="answer 1",
                              resolved_at=T0.replace(second=31))  # fmt: skip
    (again,) = bus.publish_many([stamped], idempotency_keys=["a"], in_order=True)
    assert again == cursors[0] and again.tag is None


def test_a_republished_cursor_whose_frame_redis_no_longer_holds_carries_no_tag(bus):
    """The publish script gives a no-op's cursor the tag of this call's bytes only when the
    stream holds exactly them at that number: after the entry is gone (trimmed, deleted), the
    cursor carries none, though the event and its encoding are the same."""
    (first,) = bus.publish_many([event(6, 1)], idempotency_keys=["g"], in_order=True)
    (same,) = bus.publish_many([event(6, 1)], idempotency_keys=["g"], in_order=True)
    assert same == first and same.tag == first.tag is not None
    bus.client.xdel(KEYS.stream(6), "1-0")
    (gone,) = bus.publish_many([event(6, 1)], idempotency_keys=["g"], in_order=True)
    assert gone == first and gone.tag is None


def test_cursors_pickled_by_this_version_are_read_by_an_older_one(bus, monkeypatch):
    """A cursor pickled here (a task queue, a cache, a multiprocessing result) is read by a
    process of an older version during a rolling deploy or a rollback: it pickles as the public
    ``Cursor`` or ``Republished`` those versions have, equal to the cursor (its tag, which they
    do not know, is not kept: no tag is no claim). Before, an in-order cursor pickled as
    ``publisher.core._Stored`` and a retried ``publish``'s as ``_RepublishedAsSent``, classes an
    older version lacks: unpickling raised AttributeError."""
    import pickle

    from publisher import core

    (stored,) = bus.publish_many([event(9, 1)], idempotency_keys=["p"], in_order=True)
    (as_sent,) = bus.publish_many([event(9, 1)], idempotency_keys=["p"], in_order=True)
    bus.publish(event(9, 2), idempotency_key="q")
    retried = bus.publish(event(9, 2), idempotency_key="q")
    cursors = [stored, as_sent, retried]
    assert stored.tag is not None and as_sent.tag is not None  # (what is pickled)
    pickled = [pickle.dumps(cursor, protocol) for cursor in cursors for protocol in (2, 5)]
    monkeypatch.delattr(core, "_Stored")  # (an older version)
    monkeypatch.delattr(core, "_RepublishedAsSent")
    loaded = [pickle.loads(data) for data in pickled]
    assert loaded == [cursor for cursor in cursors for _ in (2, 5)]
    kinds = [type(cursor).__name__ for cursor in loaded]
    assert kinds == ["Cursor"] * 2 + ["Republished"] * 4
    assert all(cursor.tag is None for cursor in loaded)


def test_a_publish_many_replaced_on_the_publisher_object_is_still_what_the_relay_calls(
    db, redis_url
):
    """``publish_many`` replaced on the ``Publisher`` object itself (a wrapper set on the
    instance: instrumentation, a redaction, a test double) is what the relay publishes through,
    as it was before the relay planned its calls itself. Its rows get the tags of what the
    wrapper's call of the original stored (the redacted frame); before, they got none."""
    import msgspec

    publisher = Publisher.from_url(redis_url)
    original = publisher.publish_many

    calls = []

    def redacting(events, **options):
        calls.append(options)
        return original([msgspec.structs.replace(e, answer="x") for e in events], **options)

    publisher.publish_many = redacting
    try:
        db.create()
        db.write(event(1, 1))
        assert db.drain(publisher) == 1
        assert calls and all(options.get("in_order") for options in calls)
        frame = stored_frame(publisher.client, 1, 1)
        assert b'"answer":"x"' in frame
        snap = db.snapshot(1)
        assert snap.cursor.seq == 1 and snap.tag == event_tag(frame)
    finally:
        publisher.close()


@pytest.mark.parametrize("where", ["subclass", "object"])
def test_a_publish_overridden_alone_is_not_bypassed_by_the_relay(db, redis_url, where):
    """A ``Publisher`` whose ``publish`` alone redacts (overridden in a subclass, or replaced on
    the object: the method the typed helpers call, the obvious one to override) and whose
    ``publish_many`` is the package's own: the relay publishes each row through that
    ``publish``, never around it, so Redis stores the redacted event. Before, the relay sent
    the rows through ``publish_many(..., in_order=True)``, which does not call ``publish``: the
    unredacted event was stored and broadcast to every browser of the project."""
    import msgspec

    class Redacting(Publisher):
        def publish(self, event, *, idempotency_key=None):
            return super().publish(msgspec.structs.replace(event, answer="x"),
                                   idempotency_key=idempotency_key)  # fmt: skip

    if where == "subclass":
        publisher = Redacting.from_url(redis_url)
    else:
        publisher = Publisher.from_url(redis_url)
        original = publisher.publish

        def redacting(event, *, idempotency_key=None):
            return original(msgspec.structs.replace(event, answer="x"),
                            idempotency_key=idempotency_key)  # fmt: skip

        publisher.publish = redacting
    try:
        db.create()
        db.write(event(1, 1), event(1, 2))
        assert db.drain(publisher) == 2
        for seq in (1, 2):
            frame = stored_frame(publisher.client, 1, seq)
            assert b'"answer":"x"' in frame  # (not bypassed)
        snap = db.snapshot(1)
        assert snap.cursor.seq == 2
        assert snap.tag in (None, event_tag(stored_frame(publisher.client, 1, 2)))
    finally:
        publisher.close()


def test_cli_migrate_sqlite_on_a_locked_database_fails_with_a_message_within_its_timeout(
    tmp_path, table
):
    """``migrate --sqlite`` while another connection holds the database's write lock (a long
    write transaction of the application): it waits ``--timeout`` seconds, then says why on
    stderr and exits 1. Before, it ignored ``--timeout`` (5 s, sqlite3's default) and died with
    a traceback (``database is locked``)."""
    path = str(tmp_path / "app.db")
    with sqlite3.connect(path) as conn:
        conn.execute(OLD_SQLITE.format(table=table))
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        command = [sys.executable, "-m", "publisher.outbox", "migrate", "--sqlite", path,
                   "--table", table, "--timeout", "0.5"]  # fmt: skip
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        holder.rollback()
        holder.close()
    assert result.returncode == 1
    assert "migrate failed: database is locked" in result.stderr
    assert "Traceback" not in result.stderr
    subprocess.run(command, cwd=ROOT, check=True, timeout=60)  # the lock gone, it upgrades
    assert "tag" in Database("sqlite", path, table).columns()


def publish_and_die_before_marking(db: Database, bus: Publisher) -> None:
    """A relay publishes the table's rows and dies before it marks them."""
    dying = db.relay(bus)

    def fail(published):
        raise RuntimeError("the relay died before its mark")

    dying.store.mark = fail
    try:
        with pytest.raises(RuntimeError, match="died"):
            dying.run_once()  # published, not marked
    finally:
        dying.store.close()
    assert {published for (published,) in db.execute(f"SELECT published_at FROM {db.table}")} == {
        None
    }


def test_a_row_republished_as_a_no_op_of_the_same_bytes_records_their_tag(db, bus):
    """A relay published a row and died before marking it; the next relay's publish of the row,
    unchanged, is a no-op under its idempotency key, and Redis holds at its cursor exactly the
    bytes this publish would have stored (the publish script compares them): the row records
    their tag. Before, any no-op republish recorded none, and a snapshot ending there had a
    cursor without a tag."""
    db.create()
    db.write(event(1, 1), event(2, 1))
    publish_and_die_before_marking(db, bus)
    assert db.drain(bus) == 2
    assert bus.client.xlen(KEYS.stream(1)) == bus.client.xlen(KEYS.stream(2)) == 1  # no-ops
    for project_id in (1, 2):
        snap = db.snapshot(project_id)
        assert snap.cursor.seq == 1
        assert snap.tag == event_tag(stored_frame(bus.client, project_id, 1))


def test_a_row_republished_as_a_no_op_records_no_tag_of_bytes_redis_does_not_hold(db, bus):
    """A relay published a row and died before marking it; the row's timestamp was corrected
    meanwhile (or another version encodes it differently). The next relay's publish of it is a
    no-op under the row's idempotency key (timestamps are not part of what the key compares),
    answered with the first publish's cursor: Redis holds the first bytes there. Before, the
    relay recorded the tag of its own encoding, which named bytes Redis does not hold: every
    resume from a snapshot ending there was answered history_lost (a reload at every page load
    and reconnect). Now a no-op republish records no tag: the cursor is taken at its number."""
    db.create()
    db.write(event(1, 1))
    publish_and_die_before_marking(db, bus)
    edited = BlockerResolved(project_id=1, blocker_id=1, answer="answer 1",
                             resolved_at=T0.replace(second=31))  # fmt: skip
    from schemas.events import encode_event

    conn = db.connect()
    try:
        sql = f"UPDATE {db.table} SET event = ?" if db.dialect == "sqlite" else (
            f"UPDATE {db.table} SET event = %s")  # fmt: skip
        conn.execute(sql, (encode_event(edited).decode(),))
    finally:
        conn.close()
    assert db.drain(bus) == 1
    snap = db.snapshot(1)
    assert snap.cursor.seq == 1 and bus.client.xlen(KEYS.stream(1)) == 1  # a no-op indeed
    assert snap.tag in (None, event_tag(stored_frame(bus.client, 1, 1)))


def test_a_publish_answered_from_its_idempotency_record_says_so(bus):
    """What the relay goes by: the first publish under a key is a plain Cursor, a repeat one a
    Republished, equal to it and shown alike (nothing changes for code that compares them)."""
    from publisher.core import Cursor as PublisherCursor
    from publisher.core import Republished

    first = bus.publish(event(9, 1), idempotency_key="k-1")
    again = bus.publish(event(9, 1), idempotency_key="k-1")
    (many,) = bus.publish_many([event(9, 1)], idempotency_keys=["k-1"], in_order=True)
    assert type(first) is PublisherCursor and not isinstance(first, Republished)
    assert isinstance(again, Republished) and isinstance(many, Republished)
    assert again == first == many and repr(again) == repr(first)


def test_a_relay_on_a_table_whose_tag_column_is_not_text_keeps_publishing(pg, table, bus):
    """A ``tag`` column of another type (a column of the application's own, and the migration,
    which now refuses it, not run): before, the relay published its first batch and then failed
    every mark (``column "tag" is of type integer``), and published nothing more, for good. Now
    it relays such a table as one without the column, and warns."""
    db = Database("postgresql", pg, table)
    db.execute(OLD_POSTGRES.format(table=table))
    db.execute(f"ALTER TABLE {table} ADD COLUMN tag integer")
    db.write(event(1, 1))
    relay = db.relay(bus)
    try:
        with structlog.testing.capture_logs() as logs:
            assert run(relay) == 1
            db.write(event(1, 2))
            assert run(relay) == 1
    finally:
        relay.store.close()
    assert db.execute(f"SELECT seq, tag FROM {table} ORDER BY id") == [(1, None), (2, None)]
    warnings = [entry for entry in logs if entry["event"] == "outbox_table_not_migrated"]
    assert len(warnings) == 1 and "of type int4, not text" in warnings[0]["reason"]


def test_migrations_run_at_once_on_a_fresh_database_all_succeed(pg, table):
    """Every pod of a first deploy may run the migration at the same moment (an init container
    per pod, or ``create_table`` at each worker's startup). Before, ``CREATE TABLE IF NOT
    EXISTS`` racing itself failed all but one (``relation ... already exists``: the check and
    the creation are not atomic in PostgreSQL). Now the migrations of one table take turns."""
    import threading

    start = threading.Barrier(3)
    errors: list[BaseException] = []

    def migrate() -> None:
        with psycopg.connect(pg, autocommit=True) as conn:
            start.wait()
            try:
                Outbox(table).create_table(conn)
            except BaseException as exc:  # (reported by the assertion below)
                errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert "tag" in Database("postgresql", pg, table).columns()


def test_a_relay_on_a_table_with_a_quoted_mixed_case_tag_column_keeps_publishing(pg, table, bus):
    """PostgreSQL keeps a quoted ``"Tag"`` apart from ``tag``: a table with only the former
    has no tag column. Before, the relay's column check ignored case, took ``"Tag"`` for it and
    failed every mark (``column "tag" does not exist``): it published nothing more."""
    db = Database("postgresql", pg, table)
    db.execute(OLD_POSTGRES.format(table=table))
    db.execute(f'ALTER TABLE {table} ADD COLUMN "Tag" text')
    db.write(event(1, 1))
    relay = db.relay(bus)
    try:
        assert run(relay) == 1
        db.write(event(1, 2))
        assert run(relay) == 1
    finally:
        relay.store.close()
    assert db.execute(f"SELECT seq FROM {table} ORDER BY id") == [(1,), (2,)]
