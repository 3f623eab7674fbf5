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
  ``stale_after`` (5 minutes; its age on whichever clock counted the most, so that a suspended
  machine or paused VM counts) is therefore dropped and read again.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import redis

from publisher.core import (
    PublishError,
    PublisherUnavailable,
    valid_idempotency_key,
)
from publisher.outbox.metrics import RateLimiter, RelayMetrics
from publisher.outbox.postgres import PostgresOutboxStore
from publisher.outbox.publishing import (
    CHUNK,
    KeyedPublisher,
    PublisherContractError,
    PublisherFailed,
    _PublisherFault,
)
from publisher.outbox.sql import DEFAULT_TABLE
from publisher.outbox.sqlite import SQLiteOutboxStore
from publisher.outbox.store import Mark, OutboxRow, OutboxStore, log
from schemas.events import EventValidationError, decode_event, encode_event

#: The stores were defined here before they had modules of their own: still importable from here.
__all__ = [
    "OutboxRelay",
    "OutboxRow",
    "PostgresOutboxStore",
    "PublisherContractError",
    "PublisherFailed",
    "SQLiteOutboxStore",
]

#: Errors out of :meth:`OutboxRelay.run_once` that the publisher raised, by their source in the
#: loop's report: Redis's (a refusal; a ``redis.RedisError`` a wrapper let through), and the
#: publisher's own faults. Neither resets the database session; anything else is the database's.
_REDIS_ERRORS = (PublishError, redis.RedisError)
_PUBLISHER_FAULTS = (_PublisherFault,)


def idempotency_key(table: str, row: OutboxRow) -> str:
    """The key a row is published with: unique per row, even across a re-created table."""
    return f"outbox:{table}:{row.id}:{row.token}"


#: The clocks a batch's age is read on. ``monotonic`` does not count the time a machine was
#: suspended (``CLOCK_BOOTTIME`` does, on Linux) and, on some hypervisors, the time a paused VM
#: stood still, which the wall clock shows once it is set again; Redis expires the idempotency
#: keys on its own clock, which went on meanwhile.
_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def _clocks() -> tuple[float, ...]:
    """Now, on every clock a stall could show on (see :func:`_elapsed_since`)."""
    if _BOOTTIME is None:
        return (time.monotonic(), time.time())
    return (time.monotonic(), time.time(), time.clock_gettime(_BOOTTIME))


def _elapsed_since(then: tuple[float, ...]) -> float:
    """Seconds since ``then`` (a :func:`_clocks` reading) on the clock that counted the most.
    For the staleness of a batch, where counting too much only reads the batch again and
    counting too little could publish rows again after their idempotency keys expired: a
    relay frozen by a suspended or paused machine is caught by whichever clock saw the pause
    (a wall clock set back shows less, and the others decide)."""
    return max(now - before for now, before in zip(_clocks(), then, strict=True))


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
            window = getattr(publisher, "idempotency_window", None)  # (a wrapper may lack it)
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
        self._unmarked: tuple[list[Mark], list[float]] | None = None
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
        ``PublisherUnavailable`` (Redis unreachable), database errors and
        :class:`~publisher.outbox.publishing.PublisherContractError` (the publisher answered a
        round trip without one cursor per row: none of that round trip's rows is marked) and
        :class:`~publisher.outbox.publishing.PublisherFailed` (the publisher raised an exception
        of its own, not a Redis error: likewise) are raised, after marking what was published
        before them. Rows whose marks failed are
        marked first by the next call, before anything is published (see :meth:`_mark`)."""
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
        fetched = _clocks()
        self.metrics.oldest_pending_s = max(time.time() - rows[0].created_at, 0.0)
        published: list[Mark] = []
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
                if _elapsed_since(fetched) > self.stale_after:
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

    def _mark(self, published: list[Mark], lags: list[float]) -> None:
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
        self, chunk: list[OutboxRow], published: list[Mark], lags: list[float]
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
            # Each cursor comes with the tag of the frame Redis stored there, which snapshots
            # hand out with it (docs/outbox.md, "Snapshot with a cursor"): recorded now, from
            # the bytes the publish sent, not recomputed from the row later (the row may be
            # edited since, and another version may encode differently); None where unknown
            # (see KeyedPublisher).
            cursors, error = self._keyed.publish(
                [(event, idempotency_key(self.table, row)) for row, event in items]
            )
            done = time.time()
            # One cursor per row, in order, for a prefix of the rows: KeyedPublisher checked the
            # publisher's answer (PublisherContractError when it was not one per event).
            for (row, _), (cursor, tag) in zip(items, cursors, strict=False):
                published.append((row.id, cursor, tag))
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
            # What the publisher will send, checked here: a hand-made row just under the size
            # limit can encode longer (a time "…00.1Z" is written "…00.100000Z"), and refused
            # in the publish, the row would stop the rows of every project, not its own.
            encode_event(event)
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
                self._stop.wait(self._backoff(failures))
                self._housekeeping()
                continue
            except Exception as exc:  # a Redis error reply, the database gone, ...
                self.metrics.errors += 1
                failures += 1
                if failures == 1 or failures % 50 == 0:  # bounded logging during an outage
                    if isinstance(exc, _PUBLISHER_FAULTS):
                        # A bug of the user's publisher (a wrong answer, or an exception of its
                        # own), which no retry heals: an error, not a warning, and not the
                        # database's (its session is not reset for it).
                        log().error(
                            "outbox_relay_error",
                            table=self.table,
                            source="publisher",
                            error=repr(exc),
                            failures=failures,
                        )
                    else:
                        kind = "redis" if isinstance(exc, _REDIS_ERRORS) else "database"
                        log().warning(
                            "outbox_relay_error", table=self.table, source=kind, error=repr(exc)
                        )
                if not isinstance(exc, _REDIS_ERRORS + _PUBLISHER_FAULTS):
                    self.store.reset()
                self._stop.wait(self._backoff(failures))
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

    def _backoff(self, failures: int) -> float:
        """The pause after ``failures`` failed rounds in a row: 0.1 s doubling to
        ``max_backoff``. The exponent stops growing far past any cap: ``0.1 * 2 ** (failures -
        1)`` raised OverflowError at the 1,025th failure, out of the relay's thread, which then
        published nothing more until a restart."""
        return min(0.1 * 2 ** min(failures - 1, 60), self.max_backoff)

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
