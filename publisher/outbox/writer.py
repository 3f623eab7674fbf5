"""Writing events into the outbox in the caller's transaction, and snapshots with a cursor.

See ``docs/outbox.md``. The relay that publishes the rows is :mod:`publisher.outbox.relay`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from publisher.core import Cursor
from publisher.outbox.db import AsyncDB, SyncDB, adapt
from publisher.outbox.sql import (
    DEFAULT_TABLE,
    NO_TAG_COLUMN,
    POSTGRES,
    SQLITE,
    Statements,
    Step,
    lock_key,
    migration_sql,
    migration_steps,
)
from publisher.outbox.store import log
from schemas.events import ProjectEvent, encode_event
from schemas.tags import is_tag

__all__ = ["Outbox", "Snapshot", "SnapshotTimeout"]

T = TypeVar("T")

#: How often the snapshot helper looks whether the row it waits for has been published.
_SNAPSHOT_POLL = 0.005


class SnapshotTimeout(TimeoutError):
    """The outbox rows a snapshot includes were not all published within the timeout (the relay
    is down, or Redis is): the application answers without a cursor, or with an error.

    ``data`` is what ``read`` returned, read in the snapshot's one transaction: answer with it
    and ``"cursor": null`` rather than reading again outside a transaction.
    """

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.data = data


@dataclass(frozen=True, slots=True)
class Snapshot(Generic[T]):
    """What the application read, and the cursor of exactly the events that data includes.

    ``cursor`` is the ``(epoch, seq)`` of the newest outbox event of the project that the read
    saw committed; a browser subscribing from there receives exactly the events after the data.
    ``None`` means no event of this project has ever gone through the outbox. ``tag`` is the tag
    (docs/protocol.md, "Cursor tags") of the event at that cursor, which the relay recorded when
    it published it: a resume with it is told ``history_lost`` when a Redis failover has since
    given that number to another event. ``None`` when unknown (a row published by a relay
    before tags, or on a table not yet migrated): the cursor is then taken at its number.
    """

    data: T
    cursor: Cursor | None
    tag: str | None = None

    def cursor_json(self) -> dict[str, Any] | None:
        """``{"epoch": "...", "seq": 42, "tag": "..."}`` (``"tag"`` null when unknown) or
        ``None``: the value of ``"cursor"`` in the application's JSON answer."""
        if self.cursor is None:
            return None
        return {"epoch": self.cursor.epoch, "seq": self.cursor.seq, "tag": self.tag}


def _token() -> str:
    # 48 random bits: part of the idempotency key (see sql.POSTGRES_DDL), so a row id re-issued
    # by a restored or re-created table is not mistaken for one published before.
    return secrets.token_urlsafe(6)


class Outbox:
    """One outbox table: write events in your transaction, read snapshots with a cursor.

    >>> outbox = Outbox()                       # table "eventbus_outbox"
    >>> with psycopg.connect(dsn) as conn:      # one transaction
    ...     conn.execute("UPDATE blockers SET status = 'RESOLVED' WHERE id = %s", (123,))
    ...     outbox.write(conn, BlockerResolved(project_id=1, blocker_id=123, ...))

    The event is validated exactly as ``Publisher.publish`` validates it (an invalid event raises
    ``EventValidationError`` before any SQL runs) and inserted in the connection's current
    transaction: it is published by the relay if and only if that transaction commits.

    On PostgreSQL each write takes a transaction-level advisory lock per project (held until
    commit or rollback), so that ids, and hence the published order, follow commit order within
    a project: concurrent transactions writing events of the same project serialize from their
    first outbox write to their commit. Write the events of several projects in one
    :meth:`write_many` call (it locks them in a fixed order), or in the same project order in
    every transaction: two transactions locking two projects in opposite orders deadlock, and
    PostgreSQL then aborts one of them.

    Args:
        table: the outbox table (create it with :meth:`create_table` or :meth:`migration_sql`).
        notify: PostgreSQL only: ``pg_notify`` the relays at commit, so they publish at once
            instead of at their next poll.
    """

    def __init__(self, table: str = DEFAULT_TABLE, *, notify: bool = True) -> None:
        self.table = table
        self.notify = notify
        self._statements = {dialect: Statements(table, dialect) for dialect in (POSTGRES, SQLITE)}
        #: The dialects on which a snapshot found a table without its tag column, and said so.
        #: Nothing else is remembered about the table: each snapshot's query reads the tag of the
        #: database it runs on, or finds that it has none (one Outbox may serve several).
        self._untagged_warned: set[str] = set()

    # --- schema -----------------------------------------------------------------------------

    def migration_sql(self, dialect: str) -> str:
        """The idempotent DDL of this table for ``"postgresql"`` or ``"sqlite"``."""
        return migration_sql(dialect, self.table)

    def create_table(self, conn: Any) -> None:
        """Run the migration on a synchronous connection, in its current transaction (commit
        it yourself; sqlite3 runs DDL in the transaction too): the table and its indexes where
        missing, and the ``tag`` column on a table created before it. Several processes may run
        it at once (each worker of an application at startup): on SQLite, one that another
        beat to adding the column takes that for done (see :func:`.sql.migration_steps`)."""
        db = adapt(conn)
        if not isinstance(db, SyncDB):
            raise TypeError("create_table needs a synchronous connection; use acreate_table")
        steps = migration_steps(db.dialect, self.table)
        rows: list[tuple] | None = None
        error: Exception | None = None
        while (step := _next_step(steps, rows, error)) is not None:
            try:
                rows, error = db.execute(*step), None
            except Exception as exc:
                rows, error = None, exc

    async def acreate_table(self, conn: Any) -> None:
        """:meth:`create_table` for asyncio connections."""
        db = adapt(conn)
        if not isinstance(db, AsyncDB):
            raise TypeError("acreate_table needs an asyncio connection; use create_table")
        steps = migration_steps(db.dialect, self.table)
        rows: list[tuple] | None = None
        error: Exception | None = None
        while (step := _next_step(steps, rows, error)) is not None:
            try:
                rows, error = await db.execute(*step), None
            except Exception as exc:
                rows, error = None, exc

    # --- writing ----------------------------------------------------------------------------

    def write(self, conn: Any, event: ProjectEvent) -> None:
        """Insert ``event`` in ``conn``'s current transaction (see the class docstring)."""
        self.write_many(conn, [event])

    def write_many(self, conn: Any, events: Iterable[ProjectEvent]) -> None:
        """Insert ``events`` in order in ``conn``'s current transaction. Every event is validated
        first: one invalid event writes none of them. On a connection in autocommit mode outside
        a transaction, the write runs in a transaction of its own (committed on return)."""
        db = adapt(conn)
        if not isinstance(db, SyncDB):
            raise TypeError("write needs a synchronous connection; use awrite with asyncio ones")
        steps = list(self._plan(db.dialect, events))  # validates every event first
        with db.atomic():
            for kind, sql, params in steps:
                if kind == "many":
                    db.executemany(sql, params)
                else:
                    db.execute(sql, params)

    async def awrite(self, conn: Any, event: ProjectEvent) -> None:
        """:meth:`write` for ``psycopg.AsyncConnection`` and SQLAlchemy ``AsyncSession`` /
        ``AsyncConnection``."""
        await self.awrite_many(conn, [event])

    async def awrite_many(self, conn: Any, events: Iterable[ProjectEvent]) -> None:
        db = adapt(conn)
        if not isinstance(db, AsyncDB):
            raise TypeError("awrite needs an asyncio connection; use write with synchronous ones")
        steps = list(self._plan(db.dialect, events))
        async with db.atomic():
            for kind, sql, params in steps:
                if kind == "many":
                    await db.executemany(sql, params)
                else:
                    await db.execute(sql, params)

    def _plan(self, dialect: str, events: Iterable[ProjectEvent]) -> Iterator[tuple[str, str, Any]]:
        """The statements of one write: validation and encoding happen before the first one."""
        st = self._statements[dialect]
        now = time.time()
        # Encoded (validated) first: project_id is read only off what is an event.
        encoded = [(encode_event(event).decode(), event) for event in events]
        rows = [
            {
                "project_id": event.project_id,
                "token": _token(),
                "event": payload,
                **({} if dialect == POSTGRES else {"created_at": now}),
            }
            for payload, event in encoded
        ]
        if not rows:
            return
        if dialect != POSTGRES:
            yield ("one", st.insert, rows[0]) if len(rows) == 1 else ("many", st.insert, rows)
            return
        # Locks in one fixed order (sorted keys), so that two write_many calls over the same
        # projects cannot deadlock each other.
        keys = sorted({lock_key(self.table, row["project_id"]) for row in rows})
        if self.notify and len(keys) == 1:
            yield "one", st.lock_and_notify, {"key": keys[0], "channel": st.channel}
        else:
            for key in keys:
                yield "one", st.lock, {"key": key}
            if self.notify:
                yield "one", st.notify, {"channel": st.channel}
        if len(rows) == 1:
            yield "one", st.insert, rows[0]
        else:
            columns = {"project_ids": "project_id", "tokens": "token", "events": "event"}
            yield (
                "one",
                st.insert_many,
                {name: [row[column] for row in rows] for name, column in columns.items()},
            )

    # --- snapshots --------------------------------------------------------------------------

    def snapshot(
        self,
        conn: Any,
        project_id: int,
        read: Callable[[Any], T],
        *,
        max_wait: float = 5.0,
    ) -> Snapshot[T]:
        """Run ``read(conn)`` and return its result with the cursor of exactly the events of
        ``project_id`` that the result includes.

        ``read`` runs in a read-only snapshot transaction opened here (REPEATABLE READ on
        PostgreSQL; one SQLite read transaction), together with a query for the newest outbox
        row of the project visible in the same snapshot. If that row has not been published
        yet, this waits (up to ``max_wait`` seconds, polling every 5 ms on fresh transactions)
        until the relay has published it and recorded its cursor. ``read`` should return plain
        values (what you serialize), not ORM instances, which expire when the transaction ends.

        Raises:
            InTransaction: ``conn`` is inside a transaction.
            SnapshotTimeout: the relay did not publish the row within ``max_wait``; the
                exception's ``data`` holds what ``read`` returned.
        """
        db = adapt(conn)
        if not isinstance(db, SyncDB):
            raise TypeError("snapshot needs a synchronous connection; use asnapshot")
        st = self._statements[db.dialect]
        with db.snapshot_transaction():
            data = read(db.target)
            newest = db.execute(st.newest_of_project, {"project_id": project_id})
        self._warn_if_untagged(db.dialect, newest)
        (cursor, tag), row_id = _cursor_or_wait(newest)
        deadline = time.monotonic() + max_wait
        while cursor is None and row_id is not None:
            if time.monotonic() > deadline:
                raise _timeout(row_id, project_id, max_wait, data)
            time.sleep(_SNAPSHOT_POLL)
            cursor, tag = _published(db.fresh(st.cursor_of_row, {"id": row_id}))
        return Snapshot(data, cursor, tag)

    async def asnapshot(
        self,
        conn: Any,
        project_id: int,
        read: Callable[[Any], Awaitable[T]],
        *,
        max_wait: float = 5.0,
    ) -> Snapshot[T]:
        """:meth:`snapshot` for asyncio connections; ``read`` is a coroutine function."""
        db = adapt(conn)
        if not isinstance(db, AsyncDB):
            raise TypeError("asnapshot needs an asyncio connection; use snapshot")
        st = self._statements[db.dialect]
        async with db.snapshot_transaction():
            data = await read(db.target)
            newest = await db.execute(st.newest_of_project, {"project_id": project_id})
        self._warn_if_untagged(db.dialect, newest)
        (cursor, tag), row_id = _cursor_or_wait(newest)
        deadline = time.monotonic() + max_wait
        while cursor is None and row_id is not None:
            if time.monotonic() > deadline:
                raise _timeout(row_id, project_id, max_wait, data)
            await asyncio.sleep(_SNAPSHOT_POLL)
            cursor, tag = _published(await db.fresh(st.cursor_of_row, {"id": row_id}))
        return Snapshot(data, cursor, tag)

    def _warn_if_untagged(self, dialect: str, newest: list[tuple]) -> None:
        """Say so, once per Outbox and dialect, when the rows of ``Statements.newest_of_project``
        show a table without its tag column. A table not yet migrated (application code of this
        version deployed before the migration ran) gets snapshots whose cursors carry no tag,
        taken at their number as before tags, rather than every snapshot failing with the
        database's ``no such column`` (the relay, on such a table, publishes without tags and
        warns the same way). A project without rows shows nothing either way (and gets no
        cursor)."""
        if not newest or newest[0][3] != NO_TAG_COLUMN:
            return
        if dialect not in self._untagged_warned:
            self._untagged_warned.add(dialect)
            log().warning(
                "outbox_table_not_migrated",
                table=self.table,
                by="snapshot",
                reason="the outbox table has no tag column: snapshot cursors carry no tag (a "
                "resume from one is taken at its number, as before tags); run 'python -m "
                "publisher.outbox migrate' (or Outbox.create_table; see docs/outbox.md)",
            )


_Tagged = tuple[Cursor | None, str | None]


def _cursor_or_wait(newest: list[tuple]) -> tuple[_Tagged, int | None]:
    """((cursor, tag), None) when the newest row is published; ((None, None), row id) to wait
    for that row; ((None, None), None) when the project has no outbox row at all."""
    if not newest:
        return (None, None), None
    row_id, epoch, seq, tag = newest[0]
    if epoch is not None:
        return _tagged(epoch, seq, tag), None
    return (None, None), int(row_id)


def _published(rows: list[tuple]) -> _Tagged:
    if not rows:
        # Deleted: only published rows older than the retention are (and never a project's
        # newest published one), so a row we are waiting for cannot be; say so if it happens.
        raise RuntimeError("the outbox row a snapshot waits for was deleted")
    _, epoch, seq, tag = rows[0]
    return (None, None) if epoch is None else _tagged(epoch, seq, tag)


def _tagged(epoch: str, seq: Any, tag: Any) -> _Tagged:
    # A tag column holding anything else than a tag (a hand edit) is no tag: sent on, a client
    # would refuse it (the Python consumer's cursor check) or the gateway the resume. Nor is
    # NO_TAG_COLUMN, what a table without the column gives.
    return Cursor(epoch, int(seq)), tag if is_tag(tag) else None


def _timeout(row_id: int, project_id: int, timeout: float, data: Any) -> SnapshotTimeout:
    return SnapshotTimeout(
        f"outbox row {row_id} of project {project_id} was not published within {timeout} s "
        "(is the relay running, and Redis reachable?)",
        data,
    )


def _next_step(
    steps: Generator[Step, list[tuple] | None, None],
    rows: list[tuple] | None,
    error: Exception | None,
) -> Step | None:
    """The migration's next statement, given what the last one returned or raised (the first
    call gives neither); None when done. A failure the migration does not take for done is
    raised here."""
    try:
        return steps.send(rows) if error is None else steps.throw(error)
    except StopIteration:
        return None
