"""What the relay reads the outbox table through, whichever the database: the row it fetches
(:class:`OutboxRow`), the store protocol (:class:`OutboxStore`) that
:class:`~publisher.outbox.relay.OutboxRelay` drives, and what the two stores share
(:class:`_ClosableStore`: closing from another thread; :func:`_size_problem`: a row whose event
is too large to fetch). The stores themselves are :mod:`publisher.outbox.postgres` and
:mod:`publisher.outbox.sqlite`. A store holds the relay's own connections, never the
application's.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any, NamedTuple, Protocol

import structlog

from publisher.core import Cursor
from publisher.outbox.sql import MAX_EVENT_BYTES

__all__ = ["OutboxRow", "OutboxStore"]


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


def _size_problem(event: Any, size: int | None) -> str | None:
    """Why a row's event was not fetched: larger than any event can be (see Statements.pending)."""
    if event is not None or size is None:
        return None
    return f"the event is {size} bytes, more than an event can be ({MAX_EVENT_BYTES} bytes)"
