"""Cursor persistence: where a consumer keeps, per project, the cursor of the last event the
caller *processed*, so that a restarted consumer resumes exactly there.

:class:`CursorStore` is the protocol (two coroutines); three implementations ship:

* :class:`FileCursorStore`: one JSON file, replaced atomically on every save;
* :class:`RedisCursorStore`: a Redis hash (any redis-py asyncio client);
* :class:`SqlCursorStore`: a table in the caller's own database through a DB-API connection
  (sqlite3, psycopg 3, ...). Its :meth:`SqlCursorStore.save_in` writes the cursor *inside the
  caller's transaction*, next to the effect of the event: the one pattern that gives exactly-once
  processing across crashes (see ``docs/consumer.md``).

Each keeps a cursor's ``tag`` (``docs/consumer.md``, "Cursor tags") beside its position, read
(hashed, for an event's cursor) when it is saved. A cursor saved before tags, without one, still
loads: as a cursor without a tag (unchecked).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import msgspec
import structlog

from consumer.types import Cursor, checked_cursor, tag_of

__all__ = [
    "CursorStore",
    "FileCursorStore",
    "MemoryCursorStore",
    "RedisCursorStore",
    "SqlCursorStore",
]

log = structlog.get_logger("eventbus.consumer")


@runtime_checkable
class CursorStore(Protocol):
    """Loads and saves the cursor of each project.

    ``save`` is called after the caller processed the item with that cursor; it must be durable
    (or at least atomic) when it returns. Keep ``cursor.tag`` with the position (read it at
    save: an event's cursor hashes its frame then) and load it back as ``Cursor(epoch, seq,
    tag)``; a store that drops it resumes unchecked, as before tags. ``load`` returns None for a
    project never saved, and raises (the shipped stores: ValueError) when what it holds is not
    a valid cursor (:func:`~consumer.types.checked_cursor`; the consumer checks a loaded cursor
    too).
    """

    async def load(self, project_id: int) -> Cursor | None: ...

    async def save(self, project_id: int, cursor: Cursor) -> None: ...


class MemoryCursorStore:
    """A dict: cursors survive reconnects of one process, not a restart (useful in tests)."""

    def __init__(self) -> None:
        self.cursors: dict[int, Cursor] = {}

    async def load(self, project_id: int) -> Cursor | None:
        return self.cursors.get(project_id)

    async def save(self, project_id: int, cursor: Cursor) -> None:
        self.cursors[project_id] = Cursor(cursor[0], cursor[1], tag_of(cursor))


class FileCursorStore:
    """Every project's cursor in one JSON file (``{"1": ["<epoch>", 42, "<tag>"], ...}``; a
    cursor without a tag, as saved before tags, is ``["<epoch>", 42]``).

    Each save writes a temporary file in the same directory and renames it over the old one, so
    the file always holds a complete state: a process killed at any instant leaves either the old
    or the new cursor, never a torn file. With ``durable=True`` the data and the directory are
    fsync'ed too, so the cursor also survives a power loss or kernel crash (costs a disk flush,
    about a millisecond or more, per save).

    One file belongs to one consumer process at a time.
    """

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = False) -> None:
        self.path = Path(path)
        self.durable = durable
        self._cursors: dict[int, Cursor] | None = None

    def _read(self) -> dict[int, Cursor]:
        """The file's cursors; ValueError when it is not such a file (truncated, or another
        shape): one project's garbage makes every load fail, as the file cannot be trusted."""
        if self._cursors is None:
            try:
                text = self.path.read_bytes()
            except FileNotFoundError:
                text = b"{}"
            try:
                data = msgspec.json.decode(text, type=dict[int, list[Any]])
                self._cursors = {k: checked_cursor(v) for k, v in data.items()}
            except (msgspec.DecodeError, ValueError) as exc:
                raise ValueError(f"{self.path} is not a cursor file: {exc}") from None
        return self._cursors

    async def load(self, project_id: int) -> Cursor | None:
        return self._read().get(project_id)

    async def save(self, project_id: int, cursor: Cursor) -> None:
        cursors = self._read()
        cursors[project_id] = Cursor(cursor[0], cursor[1], tag_of(cursor))
        payload = json.dumps({str(k): _file_entry(c) for k, c in cursors.items()})
        directory = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "w") as file:
                file.write(payload)
                if self.durable:
                    file.flush()
                    os.fsync(file.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.durable:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself
            finally:
                os.close(dir_fd)


def _file_entry(cursor: Cursor) -> list[object]:
    tag = cursor.tag
    return [cursor.epoch, cursor.seq] if tag is None else [cursor.epoch, cursor.seq, tag]


class RedisCursorStore:
    """Cursors in one Redis hash, ``<key>`` -> ``{project_id: "<epoch>|<seq>"}``, and the tag in
    the field ``<project_id>:tag`` as ``"<epoch>|<seq>|<tag>"`` (``""`` for none; both fields
    are written by one ``HSET``). The tag is taken only when its position is the cursor's: a
    consumer from before tags, which writes the first field only, leaves no stale tag behind
    that would make the next resume a false ``history_lost``.

    Args:
        client: a ``redis.asyncio.Redis`` (or cluster) client.
        name: the consumer's name; the hash is ``eventbus:consumer:<name>:cursors``.

    To save the cursor atomically with an effect the caller also keeps in Redis, queue
    :meth:`save_in` on the same ``MULTI`` pipeline as that effect.
    """

    def __init__(self, client: Any, name: str, *, prefix: str = "eventbus:consumer") -> None:
        self.client = client
        self.key = f"{prefix}:{name}:cursors"

    async def load(self, project_id: int) -> Cursor | None:
        value, tagged = await self.client.hmget(self.key, [str(project_id), f"{project_id}:tag"])
        if value is None:
            return None
        text = value.decode() if isinstance(value, bytes) else str(value)
        epoch, _, seq = text.rpartition("|")
        # int() also takes " 5", "5_0" and other scripts' digits: only what save() writes.
        if not (seq.isascii() and seq.isdigit()):
            raise ValueError(f"not a valid cursor in {self.key}: {text!r:.200}")
        tag = None
        if tagged:
            tagged = tagged.decode() if isinstance(tagged, bytes) else str(tagged)
            position, _, tag = tagged.rpartition("|")
            if position != text:
                tag = None  # another position's (written before the cursor was saved again)
        return checked_cursor((epoch, int(seq), tag))

    async def save(self, project_id: int, cursor: Cursor) -> None:
        await self.client.hset(self.key, mapping=self._fields(project_id, cursor))

    def save_in(self, pipeline: Any, project_id: int, cursor: Cursor) -> None:
        """Queue the save on ``pipeline`` (e.g. ``client.pipeline(transaction=True)``)."""
        pipeline.hset(self.key, mapping=self._fields(project_id, cursor))

    @staticmethod
    def _fields(project_id: int, cursor: Cursor) -> dict[str, str]:
        position = f"{cursor[0]}|{cursor[1]}"
        tag = tag_of(cursor)
        return {
            str(project_id): position,
            f"{project_id}:tag": "" if tag is None else f"{position}|{tag}",
        }


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")


class SqlCursorStore:
    """Cursors in a table of the caller's database, through a DB-API 2.0 connection.

    The table (created by :meth:`create_table`, or by your migrations with :meth:`ddl`)::

        CREATE TABLE IF NOT EXISTS eventbus_cursors (
            consumer   TEXT   NOT NULL,
            project_id BIGINT NOT NULL,
            epoch      TEXT   NOT NULL,
            seq        BIGINT NOT NULL,
            tag        TEXT,
            PRIMARY KEY (consumer, project_id)
        )

    A table created before cursor tags has no ``tag`` column: the store notices (once per
    instance) and keeps cursors without tags there, with a warning, until the column is added
    (``ALTER TABLE eventbus_cursors ADD COLUMN tag TEXT``; :meth:`add_tag_column`).

    The upsert (``INSERT ... ON CONFLICT ... DO UPDATE``) works on PostgreSQL and SQLite >= 3.24.

    Two ways to use it:

    * as the consumer's ``store`` with ``auto_commit=True``: ``save`` writes and commits the
      connection (at-least-once: a crash between your effect and this save replays one event);
      give the store a connection of its own then, as that commit would commit anything else
      pending on it;
    * exactly-once: ``Consumer(..., store=store, auto_commit=False)``, and in your own transaction
      call :meth:`save_in` with the same DB-API cursor that applies the event's effect, then
      commit: the effect and the cursor are stored together or not at all.

    DB-API calls block; they run on the event loop's thread (a local database answers in well
    under a millisecond). ``paramstyle`` is the driver's (``"qmark"`` for sqlite3, ``"format"``
    for psycopg); by default it is taken from the connection's module.
    """

    def __init__(
        self,
        connection: Any,
        name: str,
        *,
        table: str = "eventbus_cursors",
        paramstyle: str | None = None,
    ) -> None:
        if not _IDENTIFIER.match(table):
            raise ValueError(f"table must be a plain SQL identifier, got {table!r}")
        self.connection = connection
        self.name = name
        self.table = table
        style = paramstyle or _paramstyle_of(connection)
        if style not in ("qmark", "format"):
            raise ValueError(f"paramstyle must be 'qmark' or 'format', got {style!r}")
        mark = "?" if style == "qmark" else "%s"
        where = f"WHERE consumer = {mark} AND project_id = {mark}"
        self._select = f"SELECT epoch, seq, tag FROM {table} {where}"
        self._select_untagged = f"SELECT epoch, seq FROM {table} {where}"
        self._upsert = (
            f"INSERT INTO {table} (consumer, project_id, epoch, seq, tag) "
            f"VALUES ({mark}, {mark}, {mark}, {mark}, {mark}) "
            "ON CONFLICT (consumer, project_id) "
            "DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq, tag = excluded.tag"
        )
        self._upsert_untagged = (
            f"INSERT INTO {table} (consumer, project_id, epoch, seq) "
            f"VALUES ({mark}, {mark}, {mark}, {mark}) "
            "ON CONFLICT (consumer, project_id) "
            "DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq"
        )
        #: Whether the table has the ``tag`` column (None: not looked yet).
        self._tagged: bool | None = None

    def ddl(self) -> str:
        """The ``CREATE TABLE`` statement of the cursor table."""
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} (consumer TEXT NOT NULL, "
            "project_id BIGINT NOT NULL, epoch TEXT NOT NULL, seq BIGINT NOT NULL, "
            "tag TEXT, PRIMARY KEY (consumer, project_id))"
        )

    def create_table(self) -> None:
        """Create the cursor table unless it exists (:meth:`ddl`), and commit."""
        cursor = self.connection.cursor()
        try:
            cursor.execute(self.ddl())
        finally:
            cursor.close()
        self.connection.commit()
        self._tagged = None

    def add_tag_column(self) -> None:
        """Add the ``tag`` column to a table created before cursor tags (and commit)."""
        cursor = self.connection.cursor()
        try:
            cursor.execute(f"ALTER TABLE {self.table} ADD COLUMN tag TEXT")
        finally:
            cursor.close()
        self.connection.commit()
        self._tagged = None

    def _has_tag_column(self) -> bool:
        """Whether the table has the ``tag`` column, looked up once (a query that reads no row
        and fails on nothing: the caller's transaction may be open on this connection)."""
        if self._tagged is None:
            cursor = self.connection.cursor()
            try:
                cursor.execute(f"SELECT * FROM {self.table} WHERE 1 = 0")
                names = {str(column[0]).lower() for column in cursor.description or ()}
                cursor.fetchall()
            finally:
                cursor.close()
            self._tagged = "tag" in names
            if not self._tagged:
                log.warning(
                    "the cursor table has no tag column: cursors are kept without tags "
                    "(add it: SqlCursorStore.add_tag_column)",
                    table=self.table,
                )
        return self._tagged

    async def load(self, project_id: int) -> Cursor | None:
        # No commit here: the connection may be the caller's, in the middle of its own
        # transaction (a project subscribed while another one's event is being applied). But
        # a transaction the driver began for this read, on a connection that had none open
        # (the store's own, in auto-commit mode), is ended: left open until the first save,
        # hours later for a quiet project, PostgreSQL's idle_in_transaction_session_timeout
        # ended the connection, and every save after it failed.
        began = _in_transaction(self.connection) is False
        try:
            select = self._select if self._has_tag_column() else self._select_untagged
            cursor = self.connection.cursor()
            try:
                cursor.execute(select, (self.name, project_id))
                row = cursor.fetchone()
            finally:
                cursor.close()
        finally:
            if began and _in_transaction(self.connection):
                with contextlib.suppress(Exception):  # (a read only: nothing to lose)
                    self.connection.rollback()
        # As stored (SQLite keeps any type in any column): a float or text seq is garbage, not
        # a position to round to.
        return None if row is None else checked_cursor(tuple(row))

    async def save(self, project_id: int, cursor: Cursor) -> None:
        """Write the cursor and commit the connection; a save that fails rolls the connection
        back before it raises. A statement that fails (a ``lock_timeout`` or
        ``statement_timeout``, a deadlock) aborts a PostgreSQL transaction, which refuses every
        statement until a rollback: without it, every later save failed too, although the
        database had recovered."""
        try:
            db_cursor = self.connection.cursor()
            try:
                self.save_in(db_cursor, project_id, cursor)
            finally:
                db_cursor.close()
            self.connection.commit()
        except BaseException:
            with contextlib.suppress(Exception):  # (a connection lost: its own error is raised)
                self.connection.rollback()
            raise

    def save_in(self, db_cursor: Any, project_id: int, cursor: Cursor) -> None:
        """Write the cursor with ``db_cursor`` inside the caller's open transaction (no commit)."""
        if self._has_tag_column():
            row = (self.name, project_id, cursor[0], cursor[1], tag_of(cursor))
            db_cursor.execute(self._upsert, row)
        else:
            db_cursor.execute(self._upsert_untagged, (self.name, project_id, cursor[0], cursor[1]))


def _in_transaction(connection: Any) -> bool | None:
    """Whether a DB-API connection has a transaction open, for the drivers that say (sqlite3,
    psycopg 3, psycopg2); None when unknown."""
    flag = getattr(connection, "in_transaction", None)  # sqlite3
    if isinstance(flag, bool):
        return flag
    status = getattr(getattr(connection, "info", None), "transaction_status", None)  # psycopg 3
    if status is None and callable(getattr(connection, "get_transaction_status", None)):
        status = connection.get_transaction_status()  # psycopg2
    if isinstance(status, int):
        return status != 0  # IDLE (both psycopgs): none open
    return None


def _paramstyle_of(connection: Any) -> str:
    module = type(connection).__module__.split(".")[0]
    if module == "sqlite3":
        return "qmark"
    if module == "psycopg" or module == "psycopg2":
        return "format"
    with contextlib.suppress(ImportError, AttributeError):
        return str(__import__(module).paramstyle)
    return "format"
