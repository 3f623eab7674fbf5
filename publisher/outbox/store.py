"""What the relay reads the outbox table through, whichever the database: the row it fetches
(:class:`OutboxRow`), the store protocol (:class:`OutboxStore`) that
:class:`~publisher.outbox.relay.OutboxRelay` drives, and what the two stores share
(:class:`_ClosableStore`: closing from another thread; :func:`_size_problem`: a row whose event
is too large to fetch). The stores themselves are :mod:`publisher.outbox.postgres` and
:mod:`publisher.outbox.sqlite`. A store holds the relay's own connections, never the
application's.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, NamedTuple, Protocol

import structlog

from publisher.core import Cursor
from publisher.outbox.sql import MAX_EVENT_BYTES

__all__ = ["Mark", "OutboxRow", "OutboxStore"]

#: A row published: ``(row id, cursor, tag)``, the tag (schemas.tags) of the frame Redis stored
#: at that cursor, or None when unknown. ``(row id, cursor)`` is taken as a mark without a tag.
Mark = tuple[int, Cursor, str | None] | tuple[int, Cursor]

#: How often a store that found the table without the ``tag`` column looks again (the
#: migration may run while the relay does).
TAG_COLUMN_RECHECK = 60.0

#: PostgreSQL's names (psycopg's ``type_display``) of the column types a tag fits in.
_TEXT_TYPE = re.compile(r"^(?:text|varchar(?:\((?:1[6-9]|[2-9]\d|\d{3,})\))?)\Z")


def mark_tag(mark: Mark) -> str | None:
    return mark[2] if len(mark) > 2 else None  # type: ignore[misc]


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

    def mark(self, published: Sequence[Mark]) -> None:
        """Record each row's cursor, and its tag where the table has the ``tag`` column (a
        table not yet migrated gets the cursors alone: see :meth:`_ClosableStore._tagged`)."""

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

    table: str

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        #: Whether the table has the ``tag`` column: None until looked (again after a reset).
        self._tag_column: bool | None = None
        self._tag_column_seen = -math.inf
        self._untagged_warned = False

    def reset(self) -> None:
        raise NotImplementedError

    def _tagged(self, columns: Callable[[], dict[str, str | None]]) -> bool:
        """Whether to record tags: the table has the ``tag`` column, of a type that takes them.
        ``columns()`` reads the table's columns (name, as the ``UPDATE`` would name it: lower
        case on SQLite, where case does not matter, as it is on PostgreSQL, where a quoted
        ``"Tag"`` is another column; to the type as the database names it, None where it does
        not say: SQLite, which stores text in a column of any type); it is asked
        once, and again every :data:`TAG_COLUMN_RECHECK` seconds while the column is missing
        (and after a reset). A table not yet migrated is relayed without tags (snapshot cursors
        of its rows have none), with a warning, rather than not at all: a relay upgraded before
        the migration ran must not stop the events. So is a ``tag`` column of another type (a
        column of the application's own, which the migration refuses): every mark would fail
        on it, and the relay would publish nothing more."""
        if self._tag_column or (
            self._tag_column is False
            and time.monotonic() - self._tag_column_seen < TAG_COLUMN_RECHECK
        ):
            return bool(self._tag_column)
        kinds = columns()
        kind = kinds.get("tag")
        self._tag_column = "tag" in kinds and (kind is None or _TEXT_TYPE.match(kind) is not None)
        self._tag_column_seen = time.monotonic()
        if not self._tag_column and not self._untagged_warned:
            self._untagged_warned = True
            what = (
                f"the outbox table's tag column is of type {kind}, not text"
                if "tag" in kinds
                else "the outbox table has no tag column"
            )
            log().warning(
                "outbox_table_not_migrated",
                table=self.table,
                reason=f"{what}: rows are published and marked without tags, and snapshot "
                "cursors of them carry none; run 'python -m publisher.outbox migrate' (see "
                "docs/outbox.md)",
            )
        return self._tag_column

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


def _size_problem(event: Any, size: int | None) -> str | None:
    """Why a row's event was not fetched: larger than any event can be (see Statements.pending)."""
    if event is not None or size is None:
        return None
    return f"the event is {size} bytes, more than an event can be ({MAX_EVENT_BYTES} bytes)"
