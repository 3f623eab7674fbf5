"""The relay's SQLite store: :class:`SQLiteOutboxStore`.

One connection to the database file, used by the relay's thread only; no leader election (one
relay per file; a second one is exact too, only wasteful); woken by ``wake()`` from the writing
process, else by polling. Waiting for another connection's lock is done by the store, not by
SQLite's busy handler, so that ``close()`` from another thread (``OutboxRelay.stop``) ends it at
once. Rows are fetched through :func:`_sqlite_row`, which reports a value of the wrong type
(column types are only affinities in SQLite) instead of failing the batch.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from publisher.outbox.sql import DEFAULT_TABLE, MAX_EVENT_BYTES, SQLITE, Statements
from publisher.outbox.store import Mark, OutboxRow, _ClosableStore, _size_problem, mark_tag

__all__ = ["SQLiteOutboxStore"]

_T = TypeVar("_T")


class SQLiteOutboxStore(_ClosableStore):
    """The relay's connection to a SQLite database file. No leader election (run one relay per
    file; a second one is exact too, only wasteful); woken by :meth:`wake` from the writing
    process, else by polling. Only the relay's thread runs statements; :meth:`close` (from
    ``OutboxRelay.stop``) may run in another thread meanwhile.

    Args:
        timeout: the longest one step (a read, a batch's marks, a cleanup) waits for another
            connection's lock (an application's write transaction) before it fails with
            ``database is locked`` (30 s): the relay reports it and tries again with backoff.
            :meth:`close` ends such a wait at once.
    """

    _closed_error = sqlite3.OperationalError

    def __init__(self, path: str, table: str = DEFAULT_TABLE, *, timeout: float = 30.0) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        super().__init__()
        self.path = path
        self.table = table
        self.timeout = timeout
        self.st = Statements(table, SQLITE)
        self._conn: sqlite3.Connection | None = None
        #: With ``_lock``: a statement of the relay's thread runs on ``_conn`` (see :meth:`_run`).
        self._using = False
        self._closing = threading.Event()  # set by close(): a wait for a lock ends at once
        self._woken = threading.Event()

    def _connect(self) -> sqlite3.Connection:
        self._check_open()
        # Autocommit (isolation_level=None): each statement is its own transaction, and the
        # marks of a batch one explicit transaction. No busy timeout (timeout=0): SQLite's busy
        # handler cannot be cut short (sqlite3_interrupt does not end its wait), so waiting for
        # another writer's lock is done by _run, where close() can end it.
        return sqlite3.connect(self.path, isolation_level=None, timeout=0, check_same_thread=False)

    def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """``work(connection)``, connected first if there is none, run again while another
        connection's lock makes it fail with ``SQLITE_BUSY`` (pausing 1 ms doubling to 50 ms),
        for up to ``timeout`` seconds; ``work`` must be safe to run again after a failure.

        While it runs, :meth:`close` from another thread interrupts it and leaves closing the
        connection to this thread: closing a ``sqlite3`` connection while another thread runs
        a statement on it crashed the process (a segmentation fault, once the statement
        returned), and the close itself waited for the statement, up to the busy timeout (30 s)
        while another writer held the lock, whatever ``stop`` was given."""
        with self._lock:
            self._check_open()
            conn = self._conn
            self._using = conn is not None
        if conn is None:
            fresh = self._connect()
            with self._lock:
                self._keep_unless_closed(fresh)
                self._conn = conn = fresh
                self._using = True
        try:
            deadline = time.monotonic() + self.timeout
            pause = 0.001
            while True:
                try:
                    return work(conn)
                except sqlite3.OperationalError as exc:
                    if self._closed:
                        raise self._closed_error("the store is closed") from exc
                    busy = getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
                    left = deadline - time.monotonic()
                    if not busy or left <= 0:
                        raise
                    self._closing.wait(min(pause, left))
                    pause = min(2 * pause, 0.05)
        finally:
            with self._lock:
                self._using = False
                orphaned = conn is not self._conn  # reset or closed meanwhile
            if orphaned:
                conn.close()

    def _transaction(self, sql: str, params: list[dict[str, Any]]) -> int:
        """``sql`` for each of ``params`` in one write transaction (taken at once: ``BEGIN
        IMMEDIATE``), run again as a whole if the lock is busy (the statements are
        idempotent); the number of rows changed."""

        def work(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            try:
                changed = db.executemany(sql, params).rowcount
                db.execute("COMMIT")
                return changed
            except BaseException:
                if db.in_transaction:  # (a busy BEGIN opened none; an interrupt rolled back)
                    db.execute("ROLLBACK")
                raise

        return self._run(work)

    def lead(self) -> bool:
        return True

    def fetch(self, limit: int, held: list[int]) -> list[OutboxRow]:
        params = {"limit": limit, "held": json.dumps(held), "max_event": MAX_EVENT_BYTES}
        rows = self._run(lambda db: db.execute(self.st.pending, params).fetchall())
        return [_sqlite_row(*row) for row in rows]

    def mark(self, published: Sequence[Mark]) -> None:
        now = time.time()
        rows = [{"id": m[0], "epoch": m[1].epoch, "seq": m[1].seq, "now": now} for m in published]
        if self._tagged(self._columns):
            for row, m in zip(rows, published, strict=True):
                row["tag"] = mark_tag(m)
            self._transaction(self.st.mark, rows)
        else:
            self._transaction(self.st.mark_untagged, rows)

    def _columns(self) -> dict[str, str | None]:
        def read(db: sqlite3.Connection) -> dict[str, str | None]:
            cur = db.execute(self.st.columns)
            # Lower case: SQLite's column names ignore it. No type: it stores text in any column.
            names: dict[str, str | None] = {
                str(column[0]).lower(): None for column in cur.description or ()
            }
            cur.fetchall()
            return names

        return self._run(read)

    def backlog(self) -> int:
        return int(self._run(lambda db: db.execute(self.st.backlog).fetchone()[0]))

    def cleanup(self, retention: timedelta, limit: int) -> int:
        cutoff = time.time() - retention.total_seconds()
        return self._transaction(self.st.cleanup, [{"cutoff": cutoff, "limit": limit}])

    def wait(self, timeout: float) -> None:
        self._woken.wait(timeout)
        self._woken.clear()

    def wake(self) -> None:
        self._woken.set()

    def close(self) -> None:
        super().close()
        self._closing.set()

    def open(self) -> None:
        self._closing.clear()
        super().open()

    def reset(self) -> None:
        self._tag_column = None
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None and self._using:
                conn.interrupt()  # a statement under way ends now; its thread closes conn
                return
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def _sqlite_row(
    row_id: int, project_id: Any, token: Any, event: Any, created_at: Any, size: Any
) -> OutboxRow:
    """One fetched SQLite row. Column types are only affinities there: a hand-made ``INSERT``
    can leave text in ``project_id`` or ``created_at``, which raised (a str in arithmetic, in
    ``sorted``) out of every batch that fetched the row, stopping the relay for every project.
    Such a row gets a ``problem`` (reported, its project held), a text ``project_id`` to hold
    it by, and the relay's clock as its ``created_at`` (its lag is unknown)."""
    problem = _size_problem(event, size)
    if event is None:
        event = ""
    if type(project_id) is not int:
        problem = problem or f"the row's project_id {project_id!r} is not an integer"
        project_id = str(project_id)
    if type(created_at) not in (int, float):
        problem = problem or f"the row's created_at {created_at!r} is not a number (unix seconds)"
        created_at = time.time()
    return OutboxRow(row_id, project_id, token, event, created_at, problem)
