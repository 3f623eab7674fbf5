"""The relay's PostgreSQL store (psycopg 3): :class:`PostgresOutboxStore`.

What it guarantees the relay (the long form is in its docstring and ``docs/outbox.md``):

* Two sessions of its own: one for the work, which also holds the leader lock
  (``pg_try_advisory_lock``) under a lease (``idle_session_timeout`` and ``tcp_user_timeout`` on
  that session alone), and one that LISTENs for the writers' NOTIFY, read often enough that it
  never holds back PostgreSQL's NOTIFY queue.
* Every statement waits at most ``timeout`` for the database (psycopg has no client-side
  statement timeout), and every statement or connect under way ends at once when the store is
  reset or closed from another thread (``OutboxRelay.stop``): a :class:`_Deadline` shuts its
  socket down, when due or when interrupted. One :class:`_Watchdog` thread per process expires
  the deadlines that are due.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

from publisher.outbox.sql import (
    DEFAULT_TABLE,
    MAX_EVENT_BYTES,
    POSTGRES,
    Statements,
    for_psycopg,
    migration_sql,
)
from publisher.outbox.store import (
    Mark,
    OutboxRow,
    _ClosableStore,
    _size_problem,
    log,
    mark_tag,
)

__all__ = ["PostgresOutboxStore"]


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

    def mark(self, published: Sequence[Mark]) -> None:
        params: dict[str, Any] = {
            "ids": [m[0] for m in published],
            "epochs": [m[1].epoch for m in published],
            "seqs": [m[1].seq for m in published],
        }
        if self._tagged(self._columns):
            params["tags"] = [mark_tag(m) for m in published]
            self._q(self.st.mark_many, params)
        else:
            self._q(self.st.mark_many_untagged, params)

    def _columns(self) -> dict[str, str | None]:
        conn = self._conn()
        sent = time.monotonic()
        with self._deadline(conn):
            cur = conn.execute(self.st.columns)
            kinds = {column.name: column.type_display for column in cur.description or ()}
            cur.fetchall()
        self._used = sent
        return kinds

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
            self._tag_column = None


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
