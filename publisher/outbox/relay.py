"""The relay: publishes the outbox table to Redis, in order per project, exactly once.

How it stays exact (see ``docs/outbox.md`` for the long form):

* Rows are read in id order, which is commit order within a project (the writer's per-project
  advisory lock on PostgreSQL; SQLite has one writer at a time), and published one after the
  other in that order.
* Each row is published with the idempotency key ``outbox:<table>:<id>:<token>``. A row that was
  published but not yet marked (the relay died in between, or another relay got there first) is
  published again as a no-op that returns the first cursor: nothing is duplicated.
* Two relays that both run never reorder: a relay publishes row *k* of a project only after its
  own publish of the project's previous row returned, i.e. after that row is in the stream (put
  there by itself or by the other relay). Leadership (``pg_try_advisory_lock``) only saves the
  duplicated work; correctness does not depend on it. The leader's session has a lease
  (``idle_session_timeout``, and ``tcp_user_timeout`` for a leader frozen while PostgreSQL was
  sending it a batch): a leader frozen for longer loses the lead to a standby, and once it runs
  again it finds out before it publishes anything more.
* The one bound: the idempotency window (10 minutes by default, ``Publisher(idempotency_window=)``).
  A relay that stalls for longer than that between reading a batch and publishing it could
  publish rows again that another relay published meanwhile; a batch older than
  ``stale_after`` (5 minutes) is therefore dropped and read again.
"""

from __future__ import annotations

import contextlib
import heapq
import inspect
import itertools
import json
import math
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, NamedTuple, Protocol, TypeVar

import structlog

from publisher.core import Cursor, PublishError, PublisherUnavailable, valid_idempotency_key
from publisher.outbox.metrics import RateLimiter, RelayMetrics
from publisher.outbox.publishing import CHUNK, KeyedPublisher
from publisher.outbox.sql import (
    DEFAULT_TABLE,
    MAX_EVENT_BYTES,
    POSTGRES,
    SQLITE,
    Statements,
    for_psycopg,
    migration_sql,
)
from schemas.events import EventValidationError, decode_event

__all__ = ["OutboxRelay", "OutboxRow", "PostgresOutboxStore", "SQLiteOutboxStore"]

_T = TypeVar("_T")


def log() -> structlog.typing.FilteringBoundLogger:
    """The logger, looked up per message (rare ones): a logger cached at first use would keep
    the structlog configuration of that moment (tests capture logs by reconfiguring)."""
    return structlog.get_logger("publisher.outbox")


class OutboxRow(NamedTuple):
    id: int
    project_id: int
    token: str
    event: str
    created_at: float  # unix seconds, database clock
    #: Why the row cannot be published as it is, found by the store (a SQLite column holding a
    #: value of another type); the relay reports it and holds the project like an invalid event.
    problem: str | None = None


def idempotency_key(table: str, row: OutboxRow) -> str:
    """The key a row is published with: unique per row, even across a re-created table."""
    return f"outbox:{table}:{row.id}:{row.token}"


class OutboxStore(Protocol):
    """The relay's side of the table (its own connections, never the application's)."""

    table: str

    def lead(self) -> bool:
        """True while this relay may publish (always True without leader election). Asked
        before each batch and before each Redis round trip of one: a leader that may have lost
        the lead meanwhile (frozen for longer than its lease) finds out here, before it
        publishes. Also the store's chance, that often, to read whatever it listens to
        without waiting (PostgreSQL: its LISTEN session, which must never go unread for long);
        a store that does not lead stops listening."""

    def fetch(self, limit: int, held: list[int]) -> list[OutboxRow]:
        """Unpublished rows in id order, without those of the ``held`` projects."""

    def mark(self, published: list[tuple[int, Cursor]]) -> None: ...

    def backlog(self) -> int: ...

    def cleanup(self, retention: timedelta, limit: int) -> int: ...

    def wait(self, timeout: float) -> None:
        """Return when woken (NOTIFY, :meth:`wake`, also one read by :meth:`lead` meanwhile)
        or after ``timeout`` seconds. If it raises, it has closed what it opened to listen,
        and nothing else: the relay pauses, then carries on with the same sessions."""

    def wake(self) -> None: ...

    def reset(self) -> None:
        """Drop the connections after an error; the next call reconnects."""

    def close(self) -> None:
        """Drop the connections for good: none is opened after it, until :meth:`open`."""

    def open(self) -> None:
        """Let a closed store connect again (a relay started again after ``stop``)."""


class _ClosableStore:
    """What both stores share about closing. :meth:`close` may run in any thread while another
    one connects (``OutboxRelay.stop`` closes the store while the relay thread, or stop's own
    wake-up, may be connecting): it marks the store closed under ``_lock``, no connect starts
    after it, and a connect that ends after it closes its connection and fails
    (:meth:`_keep_unless_closed`), so that no connection is left open with a stopped relay.
    :meth:`open` lets the store connect again (a relay started again after ``stop``)."""

    #: What a closed store's connect raises: the driver's ``OperationalError``.
    _closed_error: type[Exception]

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False

    def reset(self) -> None:
        raise NotImplementedError

    def _check_open(self) -> None:
        """Fail a connect about to start on a closed store."""
        if self._closed:
            raise self._closed_error("the store is closed")

    def _keep_unless_closed(self, fresh: Any) -> None:
        """With ``_lock``: close ``fresh`` and fail if :meth:`close` ran while it was connecting.
        Before, a relay thread or a wake-up that connected after ``stop`` stored the connection
        and left it open (and a SQLite relay published with it after ``stop``)."""
        if self._closed:
            fresh.close()
            raise self._closed_error("the store is closed")

    def close(self) -> None:
        """:meth:`reset` for good: from now on (until :meth:`open`) no connection is opened,
        and one that was being opened meanwhile is closed when it is made."""
        with self._lock:
            self._closed = True
        self.reset()

    def open(self) -> None:
        self._closed = False


class PostgresOutboxStore(_ClosableStore):
    """The relay's two connections to PostgreSQL (psycopg 3): one for its work, which also holds
    the leader lock, and one that LISTENs for the writers' NOTIFY.

    Args:
        dsn: a libpq connection string or URL.
        leader: elect one active relay per table with ``pg_try_advisory_lock`` (the others wait
            and take over when its session ends). False lets every relay work: still exact, but
            duplicated work.
        lease: PostgreSQL 14+: the leader's session ends when it has run no statement for this
            long (30 s, ``idle_session_timeout`` on that session alone), or when the relay has
            taken nothing PostgreSQL sends it for this long (``tcp_user_timeout``, likewise),
            which releases the lock: a leader that is frozen (``SIGSTOP``, a paused VM, a
            stalled or deadlocked relay thread) keeps the lead at most ``lease`` seconds, also
            when it froze while PostgreSQL was sending it a batch larger than the socket buffers
            (PostgreSQL then waits to write the rest, the session is not idle, and only the
            second part ends it), and a standby takes over within ``lease`` plus its poll
            interval. A healthy leader runs a statement at least every third of it
            (:meth:`lead`, :meth:`wait`) and reads every answer at once. The second part needs
            a TCP connection and Linux 5.11+ on the server (``outbox_relay_partial_lease``, a
            warning, over a Unix-domain socket). Before, PostgreSQL saw a frozen leader's
            session as alive, and it kept the lock, and the outbox stopped, for as long as it
            was frozen.
        timeout: the longest one statement may wait for the database (30 s), and the connect
            timeout unless the DSN sets ``connect_timeout``. A database that does not answer
            (stopped with its sockets open, a frozen VM, a lost network) fails the statement with
            ``TimeoutError``: the relay reports it and reconnects with backoff. libpq has no
            such bound of its own: without it the relay waited forever, without a word.
    """

    def __init__(
        self,
        dsn: str,
        table: str = DEFAULT_TABLE,
        *,
        leader: bool = True,
        timeout: float = 30.0,
        lease: float = 30.0,
    ) -> None:
        import psycopg  # the optional 'postgres' extra

        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if not lease >= 0.1:
            raise ValueError("lease must be at least 0.1 s")
        super().__init__()
        self._psycopg = psycopg
        self._closed_error = psycopg.OperationalError
        self._connection_class = _interruptible_connection(psycopg, self._connecting)
        self.dsn = dsn
        self.table = table
        self.leader = leader
        self.timeout = timeout
        self.lease = lease
        self.st = Statements(table, POSTGRES)
        self._work: Any = None
        self._listen: Any = None
        self._is_leader = False
        #: Monotonic time the work session's last statement that succeeded was sent: its lease
        #: runs from later than that (the end of that statement's answer), so until a third of
        #: the lease after it the session is known to live. Not when its answer was read: a
        #: leader frozen while its answer was under way reads it once it runs again, by when
        #: the lease may be long gone.
        self._used = 0.0
        self._lease_warned = False
        self._send_lease_warned = False
        #: :meth:`lead` read a notification from the LISTEN session: the next :meth:`wait`
        #: returns at once (a row committed during the batch is not left for the poll).
        self._woken = False
        self._listen_lost_logged = -math.inf
        #: Statements under way -> their connection, and connects under way -> None; with
        #: ``_lock``, :meth:`reset` (called from any thread: ``OutboxRelay.stop`` closes the
        #: store) ends them all, and never closes a connection a statement waits on, whose
        #: descriptor libpq would free under it.
        self._running: dict[_Deadline, Any] = {}

    def _connect(self) -> Any:
        self._check_open()  # (a connect that ends after close(): see _keep_unless_closed)
        # Named, so that operators see the relay's sessions in pg_stat_activity (unless the DSN
        # names them itself).
        params = self._psycopg.conninfo.conninfo_to_dict(self.dsn)
        extra: dict[str, Any] = {}
        if "application_name" not in params:
            extra["application_name"] = "eventbus-outbox-relay"
        if "connect_timeout" not in params:
            extra["connect_timeout"] = max(2, math.ceil(self.timeout))  # libpq: whole seconds
        conn = self._connection_class.connect(self.dsn, autocommit=True, **extra)
        try:
            self._end_with_the_client(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _end_with_the_client(self, conn: Any) -> None:
        """Have the session end when its client is gone, even inside a statement (PostgreSQL
        14+: ``client_connection_check_interval``, 1 s, unless the DSN or the server set it).

        When a statement is ended from here (its deadline, :meth:`reset`, ``stop``), its socket
        is shut down; a server that waits for a lock (another session's row lock on an outbox
        row, a ``LOCK TABLE``) notices only when it next reads from the socket. Before, such a
        session stayed on the server after ``stop`` (and one more after each timed-out
        statement), holding the row locks its UPDATE had taken, until the lock was released;
        then it marked its rows, after the relay had stopped."""
        if conn.info.server_version < 140000:
            return
        with self._deadline(conn):
            try:
                conn.execute(
                    "SELECT set_config('client_connection_check_interval', '1s', false) "
                    "WHERE current_setting('client_connection_check_interval') = '0'"
                )
            except self._psycopg.OperationalError:
                raise
            except self._psycopg.Error:
                pass  # a platform without it (the server refuses a non-zero value)

    def _connecting(self, gen: Any) -> Any:
        """psycopg's connect, step by step (``gen`` yields the socket it waits for, and what it
        waits for): at each step the socket is registered in ``_running`` like a statement's,
        so that :meth:`reset` (and :meth:`close`, from ``OutboxRelay.stop``) shuts it down and
        the connect fails at once. Before, a connect to a server that accepts TCP and never
        answers (hung, frozen) ran to the connect timeout (30 s), whatever ``stop`` was given.
        The socket may change between steps (libpq tries the next address): an interruption
        that hit the old one fails the connect at its next step."""
        deadline: _Deadline | None = None
        try:
            step = next(gen)
            while True:
                deadline = self._connect_step(step[0], deadline)
                try:
                    step = gen.send((yield step))
                except self._closed_error as exc:
                    if deadline.interrupted:  # (libpq says "server closed the connection")
                        raise self._closed_error(_INTERRUPTED) from exc
                    raise
        except StopIteration as done:
            if deadline is not None and deadline.interrupted:  # done just as it was shut down
                done.value.close()
                raise self._closed_error(_INTERRUPTED) from None
            return done.value
        finally:
            if deadline is not None:
                deadline.cancel()
                with self._lock:
                    self._running.pop(deadline, None)  # (gone if _connect_step failed)
            gen.close()

    def _connect_step(self, fd: int, previous: _Deadline | None) -> _Deadline:
        with self._lock:
            if previous is not None:
                previous.cancel()
                del self._running[previous]
                if previous.interrupted:
                    raise self._closed_error(_INTERRUPTED)
            self._check_open()
            current = _Deadline(fd, None)  # bounded by the connect timeout (psycopg's own)
            self._running[current] = None
            return current

    @contextlib.contextmanager
    def _deadline(self, conn: Any, seconds: float | None = None) -> Iterator[None]:
        """Bound what runs inside to ``seconds`` (``timeout``): then the connection's socket is
        shut down, and the statement waiting on it fails at once (psycopg has no client-side
        statement timeout, and the server's ``statement_timeout`` needs a server that runs).
        A :meth:`reset` from another thread meanwhile shuts it down too, and leaves closing the
        connection to this thread, once the statement has let go of it."""
        with self._lock:
            if conn.closed or self._closed:  # reset or closed by another thread meanwhile
                raise self._psycopg.OperationalError("the connection is closed")
            deadline = _Deadline(conn.fileno(), self.timeout if seconds is None else seconds)
            self._running[deadline] = conn
        try:
            yield
        except self._psycopg.OperationalError as exc:
            if deadline.expired:
                raise TimeoutError(f"PostgreSQL did not answer within {self.timeout:g} s") from exc
            raise
        finally:
            deadline.cancel()
            with self._lock:
                del self._running[deadline]
            if deadline.interrupted:
                conn.close()

    def _conn(self) -> Any:
        """The work connection, connected first if there is none (or it broke).

        Two threads may find none at once, the relay's and an application's :meth:`wake`: each
        connects (outside ``_lock``, so that :meth:`reset` never waits for a connect), the first
        to be done keeps its connection, and the other closes its own and uses that one. Before,
        each stored its own in turn, and the one overwritten was never closed."""
        work = self._work
        if work is not None and not work.closed:
            return work
        fresh = self._connect()
        with self._lock:
            self._keep_unless_closed(fresh)
            work = self._work
            if work is None or work.closed:
                self._work, self._is_leader = fresh, False
                return fresh
        fresh.close()
        return work

    def _q(self, sql: str, params: dict[str, Any]) -> list[tuple]:
        conn = self._conn()
        sent = time.monotonic()
        with self._deadline(conn):
            cur = conn.execute(for_psycopg(sql), params)
            rows = cur.fetchall() if cur.description is not None else []
        self._used = sent
        return rows

    def lead(self) -> bool:
        """Take the lead if free; as the leader, renew the lease when a third of it has gone
        by since the last statement was sent. That statement also proves the lead is still
        held (a session that lives holds its lock): a leader that was frozen for longer than
        its lease fails it, because PostgreSQL ended the session, before it publishes anything
        more; the relay reconnects and finds another relay leading. Counted from the send, not
        from the answer: a leader frozen while its batch was under way reads the batch once
        it runs again, and must not take that late answer for a live session.

        Asked before each batch and each Redis round trip, it also reads what the LISTEN
        session was sent meanwhile (:meth:`_keep_up`), so that a leader busy with a backlog
        never holds back PostgreSQL's NOTIFY queue; and a store that does not lead closes its
        LISTEN session (:meth:`_stop_listening`), which a standby never reads. Before, a leader
        that lost the lead without an error (its work session broke under an application's
        :meth:`wake`, and the relay's next statement reconnected) kept its LISTEN session open,
        unread, for as long as it stayed a standby."""
        if self._lead():
            self._keep_up()
            return True
        self._stop_listening()
        return False

    def _lead(self) -> bool:
        if not self.leader:
            return True
        if not self._is_leader:
            if self._conn().info.server_version >= 140000:
                sql = self.st.try_lead_with_lease
            else:
                sql = self.st.try_lead
                if not self._lease_warned:
                    self._lease_warned = True
                    log().warning(
                        "outbox_relay_no_lease",
                        table=self.table,
                        reason="PostgreSQL < 14 has no idle_session_timeout: a frozen leader "
                        "keeps the lead until its session ends",
                    )
            params = {"key": self.st.leader_key, "lease_ms": self._lease_ms()}
            led, *lease = self._q(sql, params)[0]
            self._is_leader = bool(led)
            if led and lease and lease[-1] == "0":
                self._warn_no_send_lease()
        elif time.monotonic() - self._used > self.lease / 3:
            self._q("SELECT 1", {})
        return self._is_leader

    def _lease_ms(self) -> str:
        return str(math.ceil(self.lease * 1000))

    def _warn_no_send_lease(self) -> None:
        """``tcp_user_timeout`` does not apply to the leader's session: it is connected through
        a Unix-domain socket, or the server's platform has no ``TCP_USER_TIMEOUT``."""
        if self._send_lease_warned:
            return
        self._send_lease_warned = True
        log().warning(
            "outbox_relay_partial_lease",
            table=self.table,
            reason="tcp_user_timeout does not apply to this session (a Unix-domain socket, or a "
            "server without TCP_USER_TIMEOUT): a leader frozen while PostgreSQL sends it a batch "
            "keeps the lead until it runs again, and a frozen relay's LISTEN session holds back "
            "PostgreSQL's NOTIFY queue until it runs again; connect the relay over TCP",
        )

    def fetch(self, limit: int, held: list[int]) -> list[OutboxRow]:
        params = {"limit": limit, "held": held, "max_event": MAX_EVENT_BYTES}
        rows = self._q(self.st.pending, params)
        return [
            OutboxRow(r[0], r[1], r[2], r[3] or "", float(r[4]), _size_problem(r[3], r[5]))
            for r in rows
        ]

    def mark(self, published: list[tuple[int, Cursor]]) -> None:
        self._q(
            self.st.mark_many,
            {
                "ids": [i for i, _ in published],
                "epochs": [c.epoch for _, c in published],
                "seqs": [c.seq for _, c in published],
            },
        )

    def backlog(self) -> int:
        return int(self._q(self.st.backlog, {})[0][0])

    def cleanup(self, retention: timedelta, limit: int) -> int:
        conn = self._conn()
        sent = time.monotonic()
        with self._deadline(conn):
            cur = conn.execute(
                for_psycopg(self.st.cleanup),
                {"retention": retention.total_seconds(), "limit": limit},
            )
        self._used = sent
        return cur.rowcount

    def wait(self, timeout: float) -> None:
        """Return when a writer NOTIFYs (also one that :meth:`lead` read during the batch), or
        after ``timeout`` seconds; a leader's wait ends after a third of its lease at the
        latest, so that the relay renews the lease (the next batch's statements) however long
        its poll interval. Without a LISTEN session it opens one and returns at once: rows
        committed before it notified nobody, so the relay looks at the table first. A LISTEN
        session that fails (PostgreSQL dropped it, see :meth:`_listen_lost`) is closed and the
        wait returns: only that session is reopened, the work session and the lead are kept.
        Raises only when opening a LISTEN session fails (its connection is closed then)."""
        if self._is_leader:
            timeout = min(timeout, self.lease / 3)
        if self._woken:
            self._woken = False
            return
        listen = self._listen
        if listen is None or listen.closed:
            self._start_listening()
            return  # rows committed before LISTEN notified nobody: look at the table first
        try:
            with self._deadline(listen, timeout + self.timeout):
                for _ in listen.notifies(timeout=timeout, stop_after=1):
                    pass
                # Several commits may have notified meanwhile: one wake-up serves them all.
                _read_sent_notifications(listen)
        except (self._psycopg.Error, TimeoutError) as exc:
            self._listen_lost(listen, exc)

    def _start_listening(self) -> None:
        """Open the LISTEN session, with a lease of its own (PostgreSQL 12+): PostgreSQL ends it
        when the relay has taken nothing it sends for ``lease`` (``tcp_user_timeout``, as on the
        leader's work session; not ``idle_session_timeout``: a healthy LISTEN session is idle).
        A frozen relay (``SIGSTOP``, a paused VM) reads nothing; its LISTEN session fills the
        socket buffers with notifications and then waits to write the next, and PostgreSQL
        cannot truncate its NOTIFY queue, shared by the whole server, past a session that waits:
        the queue grew for as long as the relay was frozen, and once it is full every commit
        that notifies fails, the application's included. A healthy relay reads its LISTEN
        session at least every third of the lease (:meth:`lead`, :meth:`wait`), so it never
        loses it this way."""
        fresh = self._connect()
        try:
            with self._deadline(fresh):
                if fresh.info.server_version >= 120000:
                    fresh.execute(
                        "SELECT set_config('tcp_user_timeout', %s, false)", [self._lease_ms()]
                    )
                fresh.execute(f"LISTEN {self.st.channel}")
        except BaseException:
            fresh.close()
            raise
        with self._lock:
            self._keep_unless_closed(fresh)
            broken, self._listen, self._woken = self._listen, fresh, False
        if broken is not None:  # (psycopg found it broken: closed, but not by us)
            with contextlib.suppress(Exception):
                broken.close()

    def _keep_up(self) -> None:
        """Read what the LISTEN session was sent since it was last read, without waiting for
        more, and remember a wake-up for :meth:`wait`. PostgreSQL truncates its NOTIFY queue
        only up to the slowest listening session, which advances only as it hands notifications
        to its client: a relay that never read its LISTEN session while it published a backlog
        (batch after batch, for as long as the catch-up lasted) let its socket fill up, and
        held the queue, every database's, for all that time."""
        listen = self._listen
        if listen is None or listen.closed:
            return
        try:
            with self._deadline(listen):
                if _read_sent_notifications(listen):
                    self._woken = True
        except (self._psycopg.Error, TimeoutError) as exc:
            self._listen_lost(listen, exc)

    def _listen_lost(self, listen: Any, exc: Exception) -> None:
        """The LISTEN session failed (PostgreSQL ended it: its lease, an operator, a restart):
        close it; the next :meth:`wait` opens another and returns at once (the table is read
        before the relay waits again). Before, the relay reset the store, the work session too:
        the leader lost the lead for a failure of its LISTEN session, and paused a poll
        interval. Raises ``exc`` again if the store was reset or closed meanwhile (``stop``)."""
        if self._closed or self._listen is not listen:
            raise exc
        with self._lock:
            if self._listen is listen:
                self._listen = None
        with contextlib.suppress(Exception):
            listen.close()
        now = time.monotonic()
        if now - self._listen_lost_logged > 60:  # at most once a minute
            self._listen_lost_logged = now
            log().warning(
                "outbox_relay_listen_lost",
                table=self.table,
                error=repr(exc),
                action="the table is read, then the LISTEN session reopened",
            )

    def _stop_listening(self) -> None:
        """Close the LISTEN session (not leading: a standby only polls)."""
        with self._lock:
            listen, self._listen = self._listen, None
            self._woken = False
        if listen is not None:
            with contextlib.suppress(Exception):
                listen.close()

    def wake(self) -> None:
        with contextlib.suppress(Exception):
            self._q(self.st.notify, {"channel": self.st.channel})

    def apply_migration(self) -> None:
        """Create the outbox table and its indexes where missing (idempotent; one implicit
        transaction): the connect and the DDL each within ``timeout``, else ``TimeoutError``
        (``python -m publisher.outbox migrate --dsn``). A database that never answers fails the
        caller instead of holding it, and the deploy step behind it, for ever."""
        conn = self._conn()
        with self._deadline(conn):
            conn.execute(migration_sql(POSTGRES, self.table))  # no parameters: one simple query

    def reset(self) -> None:
        with self._lock:
            busy = {id(conn) for deadline, conn in self._running.items() if deadline.interrupt()}
            for conn in (self._work, self._listen):
                if conn is not None and id(conn) not in busy:  # (busy: its statement closes it)
                    with contextlib.suppress(Exception):
                        conn.close()
            self._work = self._listen = None
            self._is_leader = self._woken = False


_INTERRUPTED = "the connect was interrupted: the store was closed or reset"

#: The longest one read of a LISTEN session takes what PostgreSQL has sent (50 ms: some 30,000
#: notifications, each a writer's commit): bounded, so a flood of notifications cannot hold the
#: relay up; what is left is read before the next Redis round trip.
_KEEP_UP_BUDGET = 0.05


def _read_sent_notifications(listen: Any) -> bool:
    """Read the notifications already sent to ``listen``, without waiting for more, for up to
    :data:`_KEEP_UP_BUDGET` seconds; True if there was any. ``notifies(timeout=0)`` takes what
    one read of the socket brings (some 32 KB), hence the loop."""
    read = False
    until = time.monotonic() + _KEEP_UP_BUDGET
    while True:
        got = False
        for _ in listen.notifies(timeout=0):
            got = read = True
        if not got or time.monotonic() >= until:
            return read


def _interruptible_connection(psycopg: Any, watch: Any) -> Any:
    """A ``psycopg.Connection`` whose ``connect`` runs its steps through ``watch`` (see
    :meth:`PostgresOutboxStore._connecting`). psycopg connects without blocking, one step per
    wait for the socket, through ``_connect_gen`` (psycopg's internal API, checked with 3.3; the
    tests pin it); without that method this is ``psycopg.Connection``, whose connect ends only
    at the connect timeout."""
    if not callable(getattr(psycopg.Connection, "_connect_gen", None)):
        return psycopg.Connection

    class InterruptibleConnection(psycopg.Connection):
        @classmethod
        def _connect_gen(cls, *args: Any, **kwargs: Any) -> Any:
            return watch(super()._connect_gen(*args, **kwargs))

    return InterruptibleConnection


class _Deadline:
    """Shuts down a socket ``seconds`` from now (never if None), unless cancelled first, or at
    once when :meth:`interrupt` ed.

    ``shutdown``, not ``close``: the descriptor stays libpq's, which closes it with the
    connection; a shut-down socket wakes every wait on it with end-of-file. It is shut down
    through a duplicate of the descriptor, the deadline's own until :meth:`cancel`, never by
    libpq's number, which another socket of the process may hold by then. Every deadline of the
    process is kept by one :class:`_Watchdog` thread (a thread per statement cost the relay's
    lag a millisecond)."""

    def __init__(self, fd: int, seconds: float | None) -> None:
        self.expired = False
        #: Shut down by :meth:`interrupt` (the store was reset): the statement's thread closes
        #: the connection.
        self.interrupted = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        with contextlib.suppress(OSError):  # not a socket: nothing to shut down
            self._sock = socket.socket(fileno=os.dup(fd))
        #: None: no deadline, only :meth:`interrupt` (a connect, which has its own timeout).
        self._watched = seconds is not None
        if seconds is not None:
            _WATCHDOG.add(self, time.monotonic() + seconds)

    @property
    def done(self) -> bool:
        """Cancelled (the statement returned): the watchdog drops it."""
        return self._sock is None

    def expire(self) -> None:
        with self._lock:
            if self._sock is None:  # the statement returned meanwhile: the socket is in use again
                return
            self.expired = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def interrupt(self) -> bool:
        """End the statement now; False if it has already returned."""
        with self._lock:
            if self._sock is None:
                return False
            self.interrupted = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            return True

    def cancel(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()  # the duplicate only
            if self._watched:
                _WATCHDOG.cancelled()


class _Watchdog:
    """One daemon thread that expires :class:`_Deadline` s when they are due.

    Deadlines wait in a heap; a cancelled one stays until it comes up (or until cancelled ones
    are half the heap: then they are swept), so that a statement's return costs no search. The
    thread starts with the first deadline, and again in a forked child (threads do not survive
    a fork)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._order = itertools.count()
        self._cancelled = 0
        self._thread: threading.Thread | None = None

    def add(self, deadline: _Deadline, when: float) -> None:
        with self._condition:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="outbox-statement-deadlines", daemon=True
                )
                self._thread.start()
            entry = (when, next(self._order), deadline)
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._condition.notify()  # sooner than what the thread waits for

    def cancelled(self) -> None:
        with self._condition:
            self._cancelled += 1
            heap = self._heap
            if self._cancelled > 64 and self._cancelled * 2 > len(heap):
                heap[:] = [entry for entry in heap if not entry[2].done]
                heapq.heapify(heap)
                self._cancelled = 0

    def _run(self) -> None:
        heap, condition = self._heap, self._condition
        while True:
            with condition:
                while not heap:
                    condition.wait()
                when, _, deadline = heap[0]
                delay = when - time.monotonic()
                if delay > 0 and not deadline.done:
                    condition.wait(delay)
                    continue
                heapq.heappop(heap)
                if deadline.done:
                    self._cancelled = max(0, self._cancelled - 1)
                    continue
            deadline.expire()

    def after_fork(self) -> None:
        self.__init__()  # the parent's thread, lock and deadlines are not this process's


_WATCHDOG = _Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WATCHDOG.after_fork)


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

    def mark(self, published: list[tuple[int, Cursor]]) -> None:
        now = time.time()
        self._transaction(
            self.st.mark,
            [{"id": i, "epoch": c.epoch, "seq": c.seq, "now": now} for i, c in published],
        )

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
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None and self._using:
                conn.interrupt()  # a statement under way ends now; its thread closes conn
                return
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def _size_problem(event: Any, size: int | None) -> str | None:
    """Why a row's event was not fetched: larger than any event can be (see Statements.pending)."""
    if event is not None or size is None:
        return None
    return f"the event is {size} bytes, more than an event can be ({MAX_EVENT_BYTES} bytes)"


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


def _chunks(rows: list[OutboxRow], size: int) -> Iterator[list[OutboxRow]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


class OutboxRelay:
    """Publishes an outbox table through a :class:`~publisher.Publisher`, in order per project.

    In-process: ``relay.start()`` (a daemon thread) and ``relay.stop()``; or drive it yourself
    with :meth:`run_once` / :meth:`run`. Command line: ``python -m publisher.outbox relay``.

    Args:
        store: :class:`PostgresOutboxStore` or :class:`SQLiteOutboxStore` (or use
            :meth:`postgres` / :meth:`sqlite`).
        publisher: publishes the events; its ``idempotency_window`` (10 minutes by default) is how
            long a published row stays recognisable if it is published again.
        batch_size: rows read per batch (500).
        max_rate: at most this many events per second on average, bursts of a tenth of it
            (5,000/s; 0 for no limit): bounds the catch-up after an outage.
        poll_interval: longest sleep between two looks at the table when nothing woke the relay
            (1 s; NOTIFY wakes a PostgreSQL relay at once).
        retention: published rows are deleted this long after publishing (1 hour), except each
            project's newest published row (its cursor serves snapshots).
        stats_interval: seconds between two ``outbox_relay_stats`` log lines (when anything
            changed).
        stale_after: a batch read longer ago than this is dropped and read again (see the module
            docstring): 5 minutes, or half the publisher's idempotency window if that is less.
        hold_interval: how long a held project (see :meth:`run_once`) waits before its next try.
    """

    def __init__(
        self,
        store: OutboxStore,
        publisher: Any,
        *,
        batch_size: int = 500,
        max_rate: float | None = 5_000,
        poll_interval: float = 1.0,
        retention: timedelta = timedelta(hours=1),
        stats_interval: float = 10.0,
        backlog_interval: float = 1.0,
        cleanup_interval: float = 60.0,
        stale_after: float | None = None,
        max_backoff: float = 5.0,
        hold_interval: float = 5.0,
        metrics: RelayMetrics | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if inspect.iscoroutinefunction(getattr(publisher, "publish", None)):
            raise TypeError("the relay runs in a thread: give it a Publisher, not AsyncPublisher")
        if retention < timedelta(minutes=1):
            raise ValueError("retention must be at least a minute (snapshots read the cursors)")
        self.store = store
        self.publisher = publisher
        self._keyed = KeyedPublisher(publisher, cancelled=self._abandoned)
        self.table = store.table
        self.batch_size = batch_size
        self.limiter = RateLimiter(max_rate)
        self.poll_interval = poll_interval
        self.retention = retention
        self.stats_interval = stats_interval
        self.backlog_interval = backlog_interval
        self.cleanup_interval = cleanup_interval
        if stale_after is None:
            window = getattr(getattr(publisher, "_settings", None), "idempotency_window", None)
            stale_after = min(300.0, window.total_seconds() / 2) if window else 300.0
        self.stale_after = stale_after
        self.max_backoff = max_backoff
        self.metrics = metrics or RelayMetrics()
        self._stop = threading.Event()
        #: Set by :meth:`stop` when it stops waiting for the thread: from then on the thread
        #: sends no further Redis round trip (see :meth:`_abandoned`).
        self._given_up = threading.Event()
        self._thread: threading.Thread | None = None
        #: The thread of the last stop(), which may outlive it (see :meth:`start`).
        self._abandoned_thread: threading.Thread | None = None
        self.hold_interval = hold_interval
        self._held: dict[int, float] = {}  # project -> monotonic time of its next attempt
        #: Rows published whose marks failed, and their lags: marked first by the next batch.
        self._unmarked: tuple[list[tuple[int, Cursor]], list[float]] | None = None
        #: The last batch read as many rows as it could (see :meth:`run`).
        self._full_batch = False
        self._hold_logged: dict[int, float] = {}
        self._invalid_logged: set[int] = set()
        self._database_errors = 0
        self._next_backlog = self._next_cleanup = 0.0
        self._next_stats = time.monotonic() + stats_interval
        self._last_stats: dict[str, Any] | None = None

    @classmethod
    def postgres(
        cls,
        dsn: str,
        publisher: Any,
        *,
        table: str = DEFAULT_TABLE,
        leader: bool = True,
        lease: float = 30.0,
        **kw,
    ) -> OutboxRelay:
        return cls(PostgresOutboxStore(dsn, table, leader=leader, lease=lease), publisher, **kw)

    @classmethod
    def sqlite(cls, path: str, publisher: Any, *, table: str = DEFAULT_TABLE, **kw) -> OutboxRelay:
        return cls(SQLiteOutboxStore(path, table), publisher, **kw)

    # --- one batch ----------------------------------------------------------------------------

    def run_once(self) -> int:
        """Publish one batch (up to ``batch_size`` rows) and mark it; return how many rows were
        published.

        A project whose row does not validate, or whose publish Redis refuses (a damaged key,
        an idempotency conflict), is *held*: nothing later of that project is published, the
        other projects go on, and the project is tried again after ``hold_interval``.
        ``PublisherUnavailable`` (Redis unreachable) and database errors are raised, after
        marking what was published before them. Rows whose marks failed are marked first by
        the next call, before anything is published (see :meth:`_mark`)."""
        if self._unmarked is not None:
            self._mark(*self._unmarked)
        if not self.store.lead():
            # A standby counts nothing (the leader does): its last counts as a leader would
            # stay on as if current, for as long as it stands by.
            self.metrics.backlog = self.metrics.oldest_pending_s = None
            self.metrics.leader = False
            return 0
        self.metrics.leader = True
        now = time.monotonic()
        self._held = {p: until for p, until in self._held.items() if until > now}
        held = list(self._held)
        rows = self.store.fetch(self.batch_size, held)
        self._full_batch = False
        if not rows:
            self.metrics.oldest_pending_s = None
            return 0
        fetched = time.monotonic()
        self.metrics.oldest_pending_s = max(time.time() - rows[0].created_at, 0.0)
        published: list[tuple[int, Cursor]] = []
        lags: list[float] = []
        try:
            # Chunks of at most the rate limiter's burst, so the limit holds within a batch, and
            # of at most one Redis round trip, so that a leader frozen in the middle of a batch
            # sends at most the round trip it was about to send once it runs again (the lead
            # is checked before each chunk, below).
            size = min(self.batch_size, CHUNK)
            if self.limiter.rate:
                size = max(1, min(size, int(self.limiter.burst)))
            for chunk in _chunks(rows, size):
                pause = self.limiter.delay(len(chunk))
                if pause and self._stop.wait(pause):
                    break
                if time.monotonic() - fetched > self.stale_after:
                    break
                # Still the leader? A relay frozen in the middle of a batch for longer than its
                # lease lost the lead, and the rows to another relay: it stops here (raising,
                # as its session is gone) instead of publishing the rest of the batch again.
                if not self.store.lead():
                    self.metrics.leader = False  # (run() then stands by, without a wait)
                    break
                if self._abandoned():
                    break
                self._publish_chunk(chunk, published, lags)
        finally:
            if published:
                self._mark(published, lags)
        # A full batch means the table may hold more, whatever was published of it: a batch of
        # rows all held (invalid rows of as many projects) is followed by the next at once. Only
        # if the next read differs (rows marked, projects newly held and left out of it): a row
        # the read cannot leave out (a SQLite project_id stored as a BLOB) is not read in a loop.
        self._full_batch = len(rows) >= self.batch_size and (
            bool(published) or not self._held.keys() <= set(held)
        )
        return len(published)

    def _mark(self, published: list[tuple[int, Cursor]], lags: list[float]) -> None:
        """Record the cursors of rows this relay published. If that fails they are kept, and
        recorded before anything else is published: this relay never publishes such a row
        again. Before, a mark that kept failing (another session's row lock held past the
        store's timeout, a read-only database, a revoked privilege) made every batch publish
        the rows again, which is a no-op only within the idempotency window: after it, each
        republish was a new event in the stream, a duplicate every window."""
        self._unmarked = (published, lags)
        self.store.mark(published)
        self._unmarked = None
        self.metrics.record_published(lags)

    def _publish_chunk(
        self, chunk: list[OutboxRow], published: list[tuple[int, Cursor]], lags: list[float]
    ) -> None:
        items: list[tuple[OutboxRow, Any]] = []
        for row in chunk:
            if row.project_id in self._held:
                continue
            event = self._decode(row)
            if event is None:
                self._hold(row.project_id)
                continue
            items.append((row, event))
        while items and not self._abandoned():
            cursors, error = self._keyed.publish(
                [(event, idempotency_key(self.table, row)) for row, event in items]
            )
            done = time.time()
            for (row, _), cursor in zip(items, cursors, strict=False):
                published.append((row.id, cursor))
                lags.append((done - row.created_at) * 1000)
            if error is None:
                return
            if isinstance(error, PublisherUnavailable) or not isinstance(error, PublishError):
                raise error
            failed = items[len(cursors)][0]
            self.metrics.errors += 1
            self._hold(failed.project_id, error)
            items = [(r, e) for r, e in items[len(cursors) + 1 :] if r.project_id not in self._held]
            # Another round trip: still the leader? Asked as before each chunk (run_once), so a
            # leader frozen between the two sends neither, and one waiting on a slow Redis
            # renews its lease between them rather than losing its session to it.
            if items and not self.store.lead():
                self.metrics.leader = False
                return

    def _abandoned(self) -> bool:
        """:meth:`stop` has returned (or is about to) while this thread was still in a batch,
        e.g. in a publish that a hung Redis held past stop's timeout: the thread sends no further
        round trip and ends. Before, it went on with the rest of the batch once Redis answered,
        publishing rows after stop had returned and closed the store (a SQLite store, and a
        PostgreSQL store without leader election, ask no database before a round trip),
        rows that it could then not mark."""
        return self._given_up.is_set()

    def _hold(self, project_id: int, error: Exception | None = None) -> None:
        self._held[project_id] = time.monotonic() + self.hold_interval
        if error is None:
            return  # an invalid row: logged once per row by _decode
        last = self._hold_logged.get(project_id)
        if last is None or time.monotonic() - last > 60:  # at most once a minute per project
            self._hold_logged[project_id] = time.monotonic()
            log().error(
                "outbox_project_held",
                table=self.table,
                project_id=project_id,
                error=str(error),
                retry_in_s=self.hold_interval,
            )

    def _decode(self, row: OutboxRow) -> Any:
        """The row's event, or None (reported once per row) if the row cannot be published as
        it is: an event that does not validate or names another project, or a token (a
        hand-made row's) that makes an idempotency key the publisher refuses. The latter raised
        out of every batch before, so one such row stopped the relay for every project."""
        try:
            if row.problem is not None:
                raise EventValidationError(row.problem)
            key = idempotency_key(self.table, row)
            if not valid_idempotency_key(key):
                raise EventValidationError(
                    f"the row's token {row.token!r} makes the idempotency key {key!r}, which the "
                    "publisher refuses (1-200 printable ASCII characters, no spaces)"
                )
            event = decode_event(row.event)
            if event.project_id != row.project_id:
                raise EventValidationError(
                    f"the event's project_id {event.project_id} is not the row's {row.project_id}"
                )
            return event
        except EventValidationError as exc:
            if row.id not in self._invalid_logged:  # once per row, however often it is retried
                self._invalid_logged.add(row.id)
                self.metrics.invalid_rows += 1
                log().error(
                    "outbox_invalid_row",
                    table=self.table,
                    row_id=row.id,
                    project_id=row.project_id,
                    error=str(exc),
                    action="this project's later rows wait until the row is fixed or deleted",
                )
            return None

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Publish until :meth:`stop`: batches back to back while the table has rows, then
        sleep until woken or ``poll_interval``; back off (0.1 s doubling to ``max_backoff``)
        while Redis or the database fails."""
        failures = 0
        outage_started: float | None = None
        was_leader: bool | None = None
        while not self._stop.is_set():
            try:
                count = self.run_once()
            except PublisherUnavailable as exc:
                self.metrics.unavailable += 1
                if outage_started is None:
                    outage_started = time.monotonic()
                    log().warning("outbox_redis_unavailable", table=self.table, error=str(exc))
                failures += 1
                self._stop.wait(min(0.1 * 2 ** (failures - 1), self.max_backoff))
                self._housekeeping()
                continue
            except Exception as exc:  # a Redis error reply, the database gone, ...
                self.metrics.errors += 1
                failures += 1
                if failures == 1 or failures % 50 == 0:  # bounded logging during an outage
                    kind = "redis" if isinstance(exc, PublishError) else "database"
                    log().warning(
                        "outbox_relay_error", table=self.table, source=kind, error=repr(exc)
                    )
                if not isinstance(exc, PublishError):
                    self.store.reset()
                self._stop.wait(min(0.1 * 2 ** (failures - 1), self.max_backoff))
                continue
            failures = 0
            if self.metrics.leader != was_leader:
                was_leader = self.metrics.leader
                log().info(
                    "outbox_relay_leader" if was_leader else "outbox_relay_standby",
                    table=self.table,
                )
            if not was_leader:
                # Another relay is active: try to take over once per poll_interval (its session
                # ending releases the lock), without listening to every commit meanwhile.
                self._stop.wait(self.poll_interval)
                continue
            if outage_started is not None and count:
                log().info(
                    "outbox_redis_available",
                    table=self.table,
                    outage_s=round(time.monotonic() - outage_started, 1),
                    backlog=self.metrics.backlog,
                )
                outage_started = None
            self._housekeeping()
            # Wait only when the last batch read less than a full batch, not when it published
            # less: a batch whose rows were all held (invalid rows of as many projects) counted
            # as an empty table, and the relay waited a poll interval after each; once the
            # first projects' holds ran out before it got past them, it read them again, and
            # the rows behind them, every project's, were never published.
            if not self._full_batch and not self._stop.is_set():
                try:
                    self.store.wait(self.poll_interval)
                except Exception as exc:
                    # No LISTEN session could be opened (the store closed what it opened): poll
                    # after a pause. The work session is not concerned: resetting it, as
                    # before, made a leader lose the lead for its LISTEN session's failure.
                    self._database_error(exc, reset=False)
                    self._stop.wait(self.poll_interval)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        try:
            if now >= self._next_backlog:
                self.metrics.backlog = self.store.backlog()
                # A count over a backlog of millions takes a while: at most 10% of the time.
                spent = time.monotonic() - now
                self._next_backlog = now + max(self.backlog_interval, 10 * spent)
            if now >= self._next_cleanup and self.metrics.leader:
                self._next_cleanup = now + self.cleanup_interval
                self.store.cleanup(self.retention, 10_000)
        except Exception as exc:
            self._database_error(exc)
        if now >= self._next_stats:
            self._next_stats = now + self.stats_interval
            stats = self.metrics.as_dict()
            if stats != self._last_stats:
                self._last_stats = stats
                log().info("outbox_relay_stats", table=self.table, **stats)

    def _database_error(self, exc: Exception, *, reset: bool = True) -> None:
        """Outside a batch (housekeeping, waiting): count, log the first and every 50th, and
        (``reset``) reconnect on the next call."""
        self.metrics.errors += 1
        self._database_errors += 1
        if self._database_errors % 50 == 1:
            log().warning(
                "outbox_relay_error", table=self.table, source="database", error=repr(exc)
            )
        if reset:
            self.store.reset()

    def start(self) -> OutboxRelay:
        """Run :meth:`run` in a daemon thread.

        Raises ``RuntimeError`` while a thread of this relay runs: started and not stopped, or
        one that :meth:`stop` gave up waiting for (a publish a hung Redis holds), which ends
        with that round trip. Before, that thread took up its loop again with the new one (the
        stop flag they share was cleared): two threads on one store and connection, which the
        store never runs at once."""
        running = self._thread or self._abandoned_thread
        if running is not None and running.is_alive():
            raise RuntimeError(
                "the relay's thread still runs (started, or still in a publish that stop() "
                "did not wait for): stop() it, or start() again once it has ended"
            )
        self._stop.clear()
        self._given_up.clear()
        self.store.open()  # closed by a previous stop()
        self._thread = threading.Thread(target=self.run, name="outbox-relay", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        """Look at the table now (call after a commit when the relay runs in-process; PostgreSQL
        writers NOTIFY by themselves)."""
        self.store.wake()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the relay and close its store, within ``timeout`` seconds whatever the database
        does, with the relay thread ended: the thread ends after its current batch, which it
        is given half of ``timeout`` to finish; then the store is closed, which ends at once a
        statement or a connect still waiting for a hung database, and the thread ends within
        the other half; so does a SQLite statement waiting for another connection's lock. Not
        cut short: a publish waiting for a hung Redis (up to the publisher's ``timeout``)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        # The wake-up (PostgreSQL: a NOTIFY to the relay's LISTEN) waits for the database, so
        # it is sent from a thread of its own; closing the store ends it too.
        waker = threading.Thread(target=self.store.wake, name="outbox-relay-stop", daemon=True)
        waker.start()
        thread, self._thread = self._thread, None
        self._abandoned_thread = thread
        if thread is not None:
            thread.join(timeout / 2)
        self._given_up.set()  # a thread still in its batch sends no further round trip
        self.store.close()
        for ending in (thread, waker):
            if ending is not None:
                ending.join(max(0.0, deadline - time.monotonic()))
