"""SQLite persistence of the demo application: agents, tasks, blockers and an activity log, with
its events written through :mod:`publisher.outbox`.

Every state change writes its event with :meth:`publisher.outbox.Outbox.write` in the same
transaction as the change itself; the library's relay (:class:`publisher.outbox.OutboxRelay`, run
in-process by :class:`examples.dashboard.server.DemoApp`) publishes the outbox in order. So a
crash between "blocker resolved in the database" and "blocker_resolved published" cannot lose
the event, and a restart loses nothing: the relay carries on with what is left in the outbox.

Reads that the page resumes from (:meth:`Store.state`, :meth:`Store.blocker_list`) are outbox
snapshots: they come with the cursor of exactly the events they include.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from publisher.outbox import Outbox, SnapshotTimeout
from schemas.events import (
    AgentResumed,
    Blocker,
    BlockerCreated,
    BlockerExpired,
    BlockerResolved,
    ProjectEvent,
    decode_event,
)

__all__ = [
    "MAX_ANSWER_LENGTH",
    "MAX_QUESTION_LENGTH",
    "OUTBOX",
    "REVIEWER_PREFIX",
    "Conflict",
    "NotFound",
    "Store",
    "ValidationFailed",
]

MAX_ANSWER_LENGTH = 5000  # the contract's limit (schemas.events.Answer)
MAX_QUESTION_LENGTH = 2000
#: Every answer of the demo's simulated reviewer starts with this, so that the activity feed (and
#: the page, from the event) can say who answered.
REVIEWER_PREFIX = "[simulated reviewer] "

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    project_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,              -- working | blocked | idle
    task_id INTEGER,
    next_action_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL,
    title TEXT NOT NULL,
    agent_id TEXT,
    status TEXT NOT NULL,              -- IN_PROGRESS | BLOCKED | DONE | FAILED
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS blockers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    agent_name TEXT NOT NULL,
    task_id INTEGER NOT NULL,
    task_title TEXT NOT NULL,
    blocker_type TEXT NOT NULL,
    question TEXT NOT NULL,
    status TEXT NOT NULL,              -- PENDING | RESOLVED | EXPIRED
    created_at TEXT NOT NULL,
    created_ts REAL NOT NULL,
    answer TEXT,
    resolved_at TEXT,
    resolved_ts REAL,
    expired_at TEXT,
    resumed_at TEXT,
    first_seen_at TEXT,                -- when a person first opened it (RFC 3339), and who
    first_seen_by TEXT,
    first_seen_ts REAL
);
CREATE INDEX IF NOT EXISTS blockers_pending ON blockers (status, created_ts);
CREATE TABLE IF NOT EXISTS activity (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL,
    key TEXT NOT NULL UNIQUE,          -- "<event type>:<blocker id>", shared with the page
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    at TEXT NOT NULL
);
"""

#: The demo's outbox: publisher.outbox's table, created by its own migration SQL.
OUTBOX = Outbox()
#: How long a state read waits for the relay to publish the newest event it includes (then it
#: answers without a cursor, and the page subscribes as without a snapshot).
SNAPSHOT_MAX_WAIT = 2.0

log = logging.getLogger("examples.dashboard")

DEFAULT_AGENTS = (
    ("backend-worker-001", "Backend Worker #1"),
    ("frontend-worker-001", "Frontend Worker #1"),
    ("test-worker-001", "Test Worker #1"),
)


class NotFound(LookupError):
    pass


class Conflict(RuntimeError):
    """The blocker is no longer pending (``status`` says what it became)."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


class ValidationFailed(ValueError):
    pass


def _duration(seconds: float) -> str:
    """ "8 s", "3 min 5 s", "2 h 4 min": how long an agent waited, for the activity feed."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _now() -> tuple[datetime, str, float]:
    moment = datetime.now(UTC)
    return moment, moment.isoformat().replace("+00:00", "Z"), moment.timestamp()


class Store:
    """One SQLite database used from several threads (HTTP handlers, agents, sweeper, relay).

    A single connection behind a lock keeps it simple: SQLite serialises writers anyway, and the
    demo's load is a few requests per second.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path == ":memory:":
            # The relay and the snapshot reads open connections of their own to the same file.
            raise ValueError("the demo store needs a database file, not :memory:")
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.outbox = OUTBOX
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            # A database of an earlier demo version: add the columns it lacks.
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(blockers)")}
            for column, kind in (
                ("first_seen_at", "TEXT"),
                ("first_seen_by", "TEXT"),
                ("first_seen_ts", "REAL"),
            ):
                if column not in columns:
                    self._db.execute(f"ALTER TABLE blockers ADD COLUMN {column} {kind}")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self.outbox.create_table(self._db)
                self._adopt_old_outbox()
            except BaseException:
                self._db.execute("ROLLBACK")
                self._db.close()
                raise
            self._db.execute("COMMIT")
        self.on_outbox: list = []  # callables notified after a commit that added events

    def _adopt_old_outbox(self) -> None:
        """A database of a demo version before publisher.outbox had a table ``outbox`` of its
        own: its unpublished events move to the library's table, in order, and it goes."""
        exists = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outbox'"
        ).fetchone()
        if exists is None:
            return
        events = []
        for row in self._db.execute(
            "SELECT id, event FROM outbox WHERE published_at IS NULL ORDER BY id"
        ).fetchall():
            raw = row["event"]
            try:
                # Only text or a blob can be an event (bytes() of an integer would allocate it).
                if not isinstance(raw, (str, bytes)):
                    raise TypeError(f"a {type(raw).__name__}, not JSON text")
                events.append(decode_event(raw.encode() if isinstance(raw, str) else raw))
            except Exception as exc:  # written by this demo, validated then; never expected
                log.error("dropping undecodable event %s of the old outbox: %s", row["id"], exc)
        if events:
            self.outbox.write_many(self._db, events)
        self._db.execute("DROP TABLE outbox")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _emit(self, db: sqlite3.Connection, event: ProjectEvent) -> None:
        # Validated against the contract first: an invalid event aborts the whole transaction.
        self.outbox.write(db, event)

    def _notify(self) -> None:
        for callback in self.on_outbox:
            callback()

    def _activity(
        self, db: sqlite3.Connection, project_id: int, key: str, kind: str, text: str, at: str
    ) -> None:
        db.execute(
            "INSERT OR IGNORE INTO activity (project_id, key, kind, text, at) VALUES (?,?,?,?,?)",
            (project_id, key, kind, text, at),
        )

    # --- seeding -------------------------------------------------------------------------------

    def seed(self, project_id: int, agents: tuple[tuple[str, str], ...] = DEFAULT_AGENTS) -> None:
        """Create the project's agents (idle, no task) unless they exist."""
        with self._tx() as db:
            for agent_id, name in agents:
                db.execute(
                    "INSERT OR IGNORE INTO agents (id, project_id, name, status) "
                    "VALUES (?, ?, ?, 'idle')",
                    (agent_id, project_id, name),
                )

    # --- reads ---------------------------------------------------------------------------------

    def blockers(self, project_id: int, status: str | None = "PENDING") -> list[dict[str, Any]]:
        """Blockers of a project, SYNC first, then newest first (the BlockerPanel's order)."""
        with self._lock:
            return _blockers(self._db, project_id, status)

    def blocker_list(
        self, project_id: int, status: str | None = "PENDING"
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """:meth:`blockers` with the cursor of the events it includes (see :meth:`state`)."""
        return self._snapshot(project_id, lambda db: _blockers(db, project_id, status))

    def state(self, project_id: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Everything the page shows (agents, tasks, pending blockers, activity), read in one
        transaction, and the cursor ``{"epoch", "seq", "tag"}`` of exactly the events it
        includes (``tag``: of the event at ``seq``, so that a resume from it notices a Redis
        failover that replaced that event; null when unknown).

        The page subscribes from that cursor, so an event committed after this read is
        delivered and applied once, and none before it is applied on top of the state again
        (the race of "fetch the full list on reconnect"). The cursor is None when the project
        has no published event yet, or when the relay did not publish the newest event this
        read includes within :data:`SNAPSHOT_MAX_WAIT` (Redis down): the page then subscribes
        as it would without a snapshot.
        """

        def read(db: sqlite3.Connection) -> dict[str, Any]:
            return {
                "agents": _agents(db, project_id),
                "tasks": _tasks(db, project_id),
                "blockers": _blockers(db, project_id, "PENDING"),
                "activity": _activity(db, project_id),
            }

        return self._snapshot(project_id, read)

    def _snapshot(self, project_id: int, read: Any) -> tuple[Any, dict[str, Any] | None]:
        # A connection of its own: the snapshot holds a read transaction, then may wait for the
        # relay, and neither should hold up the writers behind self._lock.
        db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            snapshot = self.outbox.snapshot(db, project_id, read, max_wait=SNAPSHOT_MAX_WAIT)
        except SnapshotTimeout as exc:
            # Redis or the relay is down: every page load says so, so not a warning each time.
            log.debug("state without a cursor: %s", exc)
            return exc.data, None
        finally:
            db.close()
        return snapshot.data, snapshot.cursor_json()

    def pending_async_before(self, project_id: int, created_before: float) -> list[int]:
        """Ids of the project's pending ASYNC blockers raised before ``created_before``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM blockers WHERE project_id = ? AND status = 'PENDING' "
                "AND blocker_type = 'ASYNC' AND created_ts <= ? ORDER BY id",
                (project_id, created_before),
            ).fetchall()
        return [row["id"] for row in rows]

    def blocker(self, blocker_id: int) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute("SELECT * FROM blockers WHERE id = ?", (blocker_id,)).fetchone()
        if row is None:
            raise NotFound(f"blocker {blocker_id} not found")
        return _blocker_dict(row)

    def agents(self, project_id: int) -> list[dict[str, Any]]:
        with self._lock:
            return _agents(self._db, project_id)

    def tasks(self, project_id: int, limit: int = 50) -> list[dict[str, Any]]:
        with self._lock:
            return _tasks(self._db, project_id, limit)

    def activity(self, project_id: int, limit: int = 50) -> list[dict[str, Any]]:
        with self._lock:
            return _activity(self._db, project_id, limit)

    def agent_rows(self) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute("SELECT * FROM agents ORDER BY id").fetchall()

    # --- tasks ---------------------------------------------------------------------------------

    def start_task(self, agent_id: str, title: str, next_action_at: float) -> int:
        """Give an agent a new task (IN_PROGRESS) and set when it next does something."""
        _, stamp, _ = _now()
        with self._tx() as db:
            agent = db.execute("SELECT * FROM agents WHERE id = ?", (agent_id,)).fetchone()
            if agent is None:
                raise NotFound(f"agent {agent_id} not found")
            task_id = db.execute(
                "INSERT INTO tasks (project_id, title, agent_id, status, updated_at) "
                "VALUES (?, ?, ?, 'IN_PROGRESS', ?)",
                (agent["project_id"], title, agent_id, stamp),
            ).lastrowid
            db.execute(
                "UPDATE agents SET status = 'working', task_id = ?, next_action_at = ? "
                "WHERE id = ?",
                (task_id, next_action_at, agent_id),
            )
        return task_id

    def finish_task(self, agent_id: str) -> None:
        _, stamp, _ = _now()
        with self._tx() as db:
            db.execute(
                "UPDATE tasks SET status = 'DONE', updated_at = ? WHERE id = "
                "(SELECT task_id FROM agents WHERE id = ?) AND status = 'IN_PROGRESS'",
                (stamp, agent_id),
            )
            db.execute(
                "UPDATE agents SET status = 'idle', task_id = NULL WHERE id = ?", (agent_id,)
            )

    def set_next_action(self, agent_id: str, when: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE agents SET next_action_at = ? WHERE id = ?", (when, agent_id))

    # --- blockers ------------------------------------------------------------------------------

    def create_blocker(
        self,
        project_id: int,
        agent_id: str,
        blocker_type: str,
        question: str,
        task_title: str | None = None,
    ) -> dict[str, Any]:
        """An agent raises a blocker on its current task (a new task when it has none).

        The agent becomes ``blocked``, its task ``BLOCKED``; ``blocker_created`` is published.
        """
        if blocker_type not in ("SYNC", "ASYNC"):
            raise ValidationFailed("blocker_type must be SYNC or ASYNC")
        if not isinstance(question, str) or not question.strip():
            raise ValidationFailed("question must be a non-empty string")
        if len(question) > MAX_QUESTION_LENGTH:
            raise ValidationFailed(f"question is longer than {MAX_QUESTION_LENGTH} characters")
        moment, stamp, ts = _now()
        with self._tx() as db:
            agent = db.execute(
                "SELECT * FROM agents WHERE id = ? AND project_id = ?", (agent_id, project_id)
            ).fetchone()
            if agent is None:
                raise NotFound(f"agent {agent_id} not found in project {project_id}")
            if agent["status"] == "blocked":
                raise Conflict(f"agent {agent_id} is already blocked", "blocked")
            task_id = agent["task_id"]
            current = None
            if task_id is not None:
                current = db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if current is not None and task_title and task_title != current["title"]:
                # The agent moved on to another task: the one it was working on is done.
                db.execute(
                    "UPDATE tasks SET status = 'DONE', updated_at = ? "
                    "WHERE id = ? AND status = 'IN_PROGRESS'",
                    (stamp, task_id),
                )
                current = None
            if current is None:
                task_id = db.execute(
                    "INSERT INTO tasks (project_id, title, agent_id, status, updated_at) "
                    "VALUES (?, ?, ?, 'IN_PROGRESS', ?)",
                    (project_id, task_title or "Unnamed task", agent_id, stamp),
                ).lastrowid
            task = db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
            blocker_id = db.execute(
                "INSERT INTO blockers (project_id, agent_id, agent_name, task_id, task_title, "
                "blocker_type, question, status, created_at, created_ts) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'PENDING', ?, ?)",
                (
                    project_id,
                    agent_id,
                    agent["name"],
                    task_id,
                    task["title"],
                    blocker_type,
                    question,
                    stamp,
                    ts,
                ),
            ).lastrowid
            db.execute(
                "UPDATE tasks SET status = 'BLOCKED', updated_at = ? WHERE id = ?", (stamp, task_id)
            )
            db.execute(
                "UPDATE agents SET status = 'blocked', task_id = ? WHERE id = ?",
                (task_id, agent_id),
            )
            blocker = Blocker(
                id=blocker_id,
                agent_id=agent_id,
                agent_name=agent["name"],
                task_id=task_id,
                task_title=task["title"],
                blocker_type=blocker_type,
                question=question,
                status="PENDING",
                created_at=moment,
            )
            self._emit(db, BlockerCreated(project_id=project_id, blocker=blocker))
            self._activity(
                db,
                project_id,
                f"blocker_created:{blocker_id}",
                "blocker_created",
                f"{agent['name']} raised {blocker_type} blocker #{blocker_id}",
                stamp,
            )
        self._notify()
        return self.blocker(blocker_id)

    def resolve_blocker(self, blocker_id: int, answer: Any) -> dict[str, Any]:
        """A user answers a pending blocker; ``blocker_resolved`` is published."""
        if not isinstance(answer, str) or not answer.strip():
            raise ValidationFailed("answer must be a non-empty string")
        if len(answer) > MAX_ANSWER_LENGTH:
            raise ValidationFailed(f"answer is longer than {MAX_ANSWER_LENGTH} characters")
        moment, stamp, ts = _now()
        with self._tx() as db:
            row = db.execute("SELECT * FROM blockers WHERE id = ?", (blocker_id,)).fetchone()
            if row is None:
                raise NotFound(f"blocker {blocker_id} not found")
            if row["status"] != "PENDING":
                raise Conflict(
                    f"blocker {blocker_id} is already {row['status'].lower()}", row["status"]
                )
            db.execute(
                "UPDATE blockers SET status = 'RESOLVED', answer = ?, resolved_at = ?, "
                "resolved_ts = ? WHERE id = ?",
                (answer, stamp, ts, blocker_id),
            )
            self._emit(
                db,
                BlockerResolved(
                    project_id=row["project_id"],
                    blocker_id=blocker_id,
                    answer=answer,
                    resolved_at=moment,
                ),
            )
            self._activity(
                db,
                row["project_id"],
                f"blocker_resolved:{blocker_id}",
                "blocker_resolved",
                f"Blocker #{blocker_id} resolved"
                + (" by the simulated reviewer" if answer.startswith(REVIEWER_PREFIX) else ""),
                stamp,
            )
        self._notify()
        return self.blocker(blocker_id)

    def mark_seen(self, blocker_id: int, by: str | None) -> dict[str, Any]:
        """A person opened the blocker: the first time is recorded (who, when) with an activity
        entry giving the agent's time-to-first-view; later calls change nothing."""
        _, stamp, ts = _now()
        with self._tx() as db:
            row = db.execute("SELECT * FROM blockers WHERE id = ?", (blocker_id,)).fetchone()
            if row is None:
                raise NotFound(f"blocker {blocker_id} not found")
            if row["first_seen_at"] is None:
                db.execute(
                    "UPDATE blockers SET first_seen_at = ?, first_seen_by = ?, first_seen_ts = ? "
                    "WHERE id = ?",
                    (stamp, by, ts, blocker_id),
                )
                waited = max(0.0, ts - row["created_ts"])
                self._activity(
                    db,
                    row["project_id"],
                    f"blocker_seen:{blocker_id}",
                    "blocker_seen",
                    f"Blocker #{blocker_id} of {row['agent_name']} first seen"
                    + (f" by {by}" if by else "")
                    + f" {_duration(waited)} after it was asked",
                    stamp,
                )
        return self.blocker(blocker_id)

    def answered_waiting(self, project_id: int) -> list[tuple[int, float]]:
        """``(blocker id, resolved at)`` of the project's resolved blockers whose agent has not
        resumed yet, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, resolved_ts FROM blockers WHERE project_id = ? AND status = 'RESOLVED' "
                "AND resumed_at IS NULL ORDER BY id",
                (project_id,),
            ).fetchall()
        return [(row["id"], row["resolved_ts"]) for row in rows]

    def resume_agent(self, blocker_id: int) -> bool:
        """The agent of a resolved blocker goes back to work; ``agent_resumed`` is published."""
        moment, stamp, _ = _now()
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM blockers WHERE id = ? AND status = 'RESOLVED' "
                "AND resumed_at IS NULL",
                (blocker_id,),
            ).fetchone()
            if row is None:
                return False
            db.execute("UPDATE blockers SET resumed_at = ? WHERE id = ?", (stamp, blocker_id))
            db.execute(
                "UPDATE tasks SET status = 'IN_PROGRESS', updated_at = ? WHERE id = ? "
                "AND status = 'BLOCKED'",
                (stamp, row["task_id"]),
            )
            db.execute(
                "UPDATE agents SET status = 'working' WHERE id = ? AND task_id = ?",
                (row["agent_id"], row["task_id"]),
            )
            self._emit(
                db,
                AgentResumed(
                    project_id=row["project_id"],
                    agent_id=row["agent_id"],
                    task_id=row["task_id"],
                    blocker_id=blocker_id,
                    resumed_at=moment,
                ),
            )
            self._activity(
                db,
                row["project_id"],
                f"agent_resumed:{blocker_id}",
                "agent_resumed",
                f"{row['agent_name']}: Agent resumed after blocker resolution",
                stamp,
            )
        self._notify()
        return True

    def expire_due(self, max_age: float) -> list[int]:
        """Expire blockers pending for more than ``max_age`` seconds: blocker EXPIRED, its task
        FAILED, its agent idle; ``blocker_expired`` is published for each."""
        moment, stamp, ts = _now()
        expired: list[int] = []
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM blockers WHERE status = 'PENDING' AND created_ts <= ? ORDER BY id",
                (ts - max_age,),
            ).fetchall()
            for row in rows:
                db.execute(
                    "UPDATE blockers SET status = 'EXPIRED', expired_at = ? WHERE id = ?",
                    (stamp, row["id"]),
                )
                db.execute(
                    "UPDATE tasks SET status = 'FAILED', updated_at = ? WHERE id = ?",
                    (stamp, row["task_id"]),
                )
                db.execute(
                    "UPDATE agents SET status = 'idle', task_id = NULL "
                    "WHERE id = ? AND task_id = ?",
                    (row["agent_id"], row["task_id"]),
                )
                self._emit(
                    db,
                    BlockerExpired(
                        project_id=row["project_id"],
                        blocker_id=row["id"],
                        task_id=row["task_id"],
                        expired_at=moment,
                    ),
                )
                self._activity(
                    db,
                    row["project_id"],
                    f"blocker_expired:{row['id']}",
                    "blocker_expired",
                    f"Blocker #{row['id']} expired - task failed",
                    stamp,
                )
                expired.append(row["id"])
        if expired:
            self._notify()
        return expired

    # --- outbox --------------------------------------------------------------------------------

    def unpublished_count(self) -> int:
        """Events written and not published yet (tests wait for 0)."""
        with self._lock:
            return self._db.execute(
                f"SELECT count(*) FROM {self.outbox.table} WHERE published_at IS NULL"
            ).fetchone()[0]


# --- reads, on any connection (the store's own, or a snapshot's) --------------------------------


def _blocker_dict(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "project_id": row["project_id"],
        "agent_id": row["agent_id"],
        "agent_name": row["agent_name"],
        "task_id": row["task_id"],
        "task_title": row["task_title"],
        "blocker_type": row["blocker_type"],
        "question": row["question"],
        "status": row["status"],
        "created_at": row["created_at"],
        "answer": row["answer"],
        "resolved_at": row["resolved_at"],
        "expired_at": row["expired_at"],
        "first_seen_at": row["first_seen_at"],
        "first_seen_by": row["first_seen_by"],
    }


def _blockers(db: sqlite3.Connection, project_id: int, status: str | None) -> list[dict[str, Any]]:
    query = "SELECT * FROM blockers WHERE project_id = ?"
    args: list[Any] = [project_id]
    if status is not None:
        query += " AND status = ?"
        args.append(status)
    query += " ORDER BY blocker_type = 'SYNC' DESC, created_ts DESC, id DESC"
    return [_blocker_dict(row) for row in db.execute(query, args)]


def _agents(db: sqlite3.Connection, project_id: int) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT a.id, a.name, a.status, a.task_id, t.title AS task_title FROM agents a "
        "LEFT JOIN tasks t ON t.id = a.task_id WHERE a.project_id = ? ORDER BY a.id",
        (project_id,),
    ).fetchall()
    return [dict(row) for row in rows]


def _tasks(db: sqlite3.Connection, project_id: int, limit: int = 50) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT id, title, agent_id, status, updated_at FROM tasks WHERE project_id = ? "
        "ORDER BY id DESC LIMIT ?",
        (project_id, limit),
    ).fetchall()
    return [dict(row) for row in rows]


def _activity(db: sqlite3.Connection, project_id: int, limit: int = 50) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT key, kind, text, at FROM activity WHERE project_id = ? ORDER BY id DESC LIMIT ?",
        (project_id, limit),
    ).fetchall()
    return [dict(row) for row in rows]


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
