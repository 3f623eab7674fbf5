"""Thin adapters over the connections an application already has, found by duck typing.

Supported: ``sqlite3.Connection``, ``psycopg.Connection`` / ``psycopg.AsyncConnection``, and
SQLAlchemy ``Session`` / ``scoped_session`` / ``Connection`` / ``AsyncSession`` /
``AsyncConnection`` on PostgreSQL or SQLite. Neither psycopg nor SQLAlchemy is imported here: a
connection object of theirs can only exist if the application imported them, so the classes are
looked up in ``sys.modules``.

Every adapter runs statements written with ``:name`` parameters (see :mod:`.sql`) in the caller's
current transaction, and can open the short read-only snapshot transaction the snapshot helper
needs.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from publisher.outbox.sql import POSTGRES, SQLITE, for_psycopg

__all__ = ["AsyncDB", "SyncDB", "adapt"]

Params = dict[str, Any]
_REPEATABLE_READ = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"


class InTransaction(RuntimeError):
    """The snapshot helper was given a connection already inside a transaction."""

    def __init__(self) -> None:
        super().__init__(
            "snapshot() opens its own read-only snapshot transaction: call it on a connection "
            "(or session) that is not inside a transaction"
        )


def _class(module: str, name: str) -> type | None:
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def _isinstance(obj: object, module: str, name: str) -> bool:
    cls = _class(module, name)
    return cls is not None and isinstance(obj, cls)


def _sqlalchemy_dialect(bind: Any) -> str:
    name = bind.dialect.name
    if name == "postgresql":
        return POSTGRES
    if name == "sqlite":
        return SQLITE
    raise TypeError(f"the outbox supports PostgreSQL and SQLite, not SQLAlchemy dialect {name!r}")


class SyncDB:
    """Base of the synchronous adapters."""

    dialect: str

    def execute(self, sql: str, params: Params) -> list[tuple]:
        raise NotImplementedError

    def executemany(self, sql: str, params: Sequence[Params]) -> None:
        raise NotImplementedError

    def snapshot_transaction(self) -> contextlib.AbstractContextManager[None]:
        """A read-only transaction in which every statement sees one snapshot of the database."""
        raise NotImplementedError

    def atomic(self) -> contextlib.AbstractContextManager[None]:
        """The caller's transaction if there is one, else (autocommit) one of our own, so that a
        write's statements (the lock, the insert) are never split across transactions."""
        return contextlib.nullcontext()

    def fresh(self, sql: str, params: Params) -> list[tuple]:
        """Run one query in a short transaction of its own (sees everything committed)."""
        raise NotImplementedError

    @property
    def target(self) -> Any:
        """What the application's own ``read`` callable receives."""
        raise NotImplementedError


class AsyncDB:
    """Base of the asyncio adapters (same methods as :class:`SyncDB`, as coroutines)."""

    dialect: str

    async def execute(self, sql: str, params: Params) -> list[tuple]:
        raise NotImplementedError

    async def executemany(self, sql: str, params: Sequence[Params]) -> None:
        raise NotImplementedError

    def snapshot_transaction(self) -> contextlib.AbstractAsyncContextManager[None]:
        raise NotImplementedError

    def atomic(self) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()

    async def fresh(self, sql: str, params: Params) -> list[tuple]:
        raise NotImplementedError

    @property
    def target(self) -> Any:
        raise NotImplementedError


class _SQLite(SyncDB):
    dialect = SQLITE

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    @property
    def target(self) -> sqlite3.Connection:
        return self.conn

    def execute(self, sql: str, params: Params) -> list[tuple]:
        cursor = self.conn.cursor()
        cursor.row_factory = None  # tuples, whatever row factory the application set
        return cursor.execute(sql, params).fetchall()

    def executemany(self, sql: str, params: Sequence[Params]) -> None:
        self.conn.executemany(sql, params)

    @contextlib.contextmanager
    def snapshot_transaction(self) -> Iterator[None]:
        if self.conn.in_transaction:
            raise InTransaction()
        # An explicit BEGIN: sqlite3 would not open a transaction for SELECTs alone, and then
        # each SELECT would see the database as of its own start.
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.rollback()

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        # Only an autocommit connection (isolation_level=None) outside BEGIN needs one: the
        # default mode opens a transaction before the INSERT by itself.
        if self.conn.isolation_level is not None or self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.conn.rollback()
            raise
        self.conn.commit()

    def fresh(self, sql: str, params: Params) -> list[tuple]:
        rows = self.execute(sql, params)
        if self.conn.in_transaction:  # isolation_level=None connections never are
            self.conn.rollback()
        return rows


def _tuple_row() -> Any:
    return sys.modules["psycopg.rows"].tuple_row  # imported by psycopg itself


class _Psycopg(SyncDB):
    dialect = POSTGRES

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    @property
    def target(self) -> Any:
        return self.conn

    def execute(self, sql: str, params: Params) -> list[tuple]:
        # Tuples, whatever row factory (dict_row, ...) the application set on the connection.
        with self.conn.cursor(row_factory=_tuple_row()) as cur:
            cur.execute(for_psycopg(sql), params)
            return cur.fetchall() if cur.description is not None else []

    def executemany(self, sql: str, params: Sequence[Params]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(for_psycopg(sql), params)

    @contextlib.contextmanager
    def snapshot_transaction(self) -> Iterator[None]:
        if self.conn.info.transaction_status != 0:  # pq.TransactionStatus.IDLE
            raise InTransaction()
        with self.conn.transaction():
            self.conn.execute(_REPEATABLE_READ)
            yield

    def fresh(self, sql: str, params: Params) -> list[tuple]:
        with self.conn.transaction():
            return self.execute(sql, params)

    def atomic(self) -> contextlib.AbstractContextManager[Any]:
        if self.conn.autocommit and self.conn.info.transaction_status == 0:
            return self.conn.transaction()
        return contextlib.nullcontext()


class _AsyncPsycopg(AsyncDB):
    dialect = POSTGRES

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    @property
    def target(self) -> Any:
        return self.conn

    async def execute(self, sql: str, params: Params) -> list[tuple]:
        async with self.conn.cursor(row_factory=_tuple_row()) as cur:
            await cur.execute(for_psycopg(sql), params)
            return await cur.fetchall() if cur.description is not None else []

    async def executemany(self, sql: str, params: Sequence[Params]) -> None:
        async with self.conn.cursor() as cur:
            await cur.executemany(for_psycopg(sql), params)

    @contextlib.asynccontextmanager
    async def snapshot_transaction(self) -> AsyncIterator[None]:
        if self.conn.info.transaction_status != 0:
            raise InTransaction()
        async with self.conn.transaction():
            await self.conn.execute(_REPEATABLE_READ)
            yield

    async def fresh(self, sql: str, params: Params) -> list[tuple]:
        async with self.conn.transaction():
            return await self.execute(sql, params)

    def atomic(self) -> contextlib.AbstractAsyncContextManager[Any]:
        if self.conn.autocommit and self.conn.info.transaction_status == 0:
            return self.conn.transaction()
        return contextlib.nullcontext()


def _text(sql: str) -> Any:
    from sqlalchemy import text  # only reached with a SQLAlchemy object in hand

    return text(sql)


def _rows(result: Any) -> list[tuple]:
    return [tuple(row) for row in result.fetchall()] if result.returns_rows else []


class _SQLAlchemy(SyncDB):
    """A ``Session`` or a ``Connection``: both have ``execute``, ``begin`` and
    ``in_transaction``; the statements run in its current transaction (autobegun if none)."""

    def __init__(self, conn: Any, dialect: str) -> None:
        self.conn = conn
        self.dialect = dialect

    @property
    def target(self) -> Any:
        return self.conn

    def execute(self, sql: str, params: Params) -> list[tuple]:
        return _rows(self.conn.execute(_text(sql), params))

    def executemany(self, sql: str, params: Sequence[Params]) -> None:
        self.conn.execute(_text(sql), list(params))

    @contextlib.contextmanager
    def snapshot_transaction(self) -> Iterator[None]:
        if self.conn.in_transaction():
            raise InTransaction()
        with self.conn.begin():
            if self.dialect == POSTGRES:
                self.conn.execute(_text(_REPEATABLE_READ))
            else:
                # pysqlite opens no transaction for SELECTs (see _SQLite.snapshot_transaction).
                self.conn.execute(_text("BEGIN"))
            yield

    def fresh(self, sql: str, params: Params) -> list[tuple]:
        with self.conn.begin():
            return self.execute(sql, params)


class _AsyncSQLAlchemy(AsyncDB):
    def __init__(self, conn: Any, dialect: str) -> None:
        self.conn = conn
        self.dialect = dialect

    @property
    def target(self) -> Any:
        return self.conn

    async def execute(self, sql: str, params: Params) -> list[tuple]:
        return _rows(await self.conn.execute(_text(sql), params))

    async def executemany(self, sql: str, params: Sequence[Params]) -> None:
        await self.conn.execute(_text(sql), list(params))

    @contextlib.asynccontextmanager
    async def snapshot_transaction(self) -> AsyncIterator[None]:
        if self.conn.in_transaction():
            raise InTransaction()
        async with self.conn.begin():
            if self.dialect == POSTGRES:
                await self.conn.execute(_text(_REPEATABLE_READ))
            else:
                await self.conn.execute(_text("BEGIN"))
            yield

    async def fresh(self, sql: str, params: Params) -> list[tuple]:
        async with self.conn.begin():
            return await self.execute(sql, params)


def adapt(conn: Any) -> SyncDB | AsyncDB:
    """The adapter for ``conn``; ``TypeError`` for anything unsupported."""
    if isinstance(conn, sqlite3.Connection):
        return _SQLite(conn)
    if _isinstance(conn, "psycopg", "Connection"):
        return _Psycopg(conn)
    if _isinstance(conn, "psycopg", "AsyncConnection"):
        return _AsyncPsycopg(conn)
    if _isinstance(conn, "sqlalchemy.orm", "scoped_session"):
        conn = conn()  # the thread's (or scope's) Session
    if _isinstance(conn, "sqlalchemy.orm", "Session"):
        return _SQLAlchemy(conn, _sqlalchemy_dialect(conn.get_bind()))
    if _isinstance(conn, "sqlalchemy.engine", "Connection"):
        return _SQLAlchemy(conn, _sqlalchemy_dialect(conn))
    if _isinstance(conn, "sqlalchemy.ext.asyncio", "AsyncSession"):
        return _AsyncSQLAlchemy(conn, _sqlalchemy_dialect(conn.get_bind()))
    if _isinstance(conn, "sqlalchemy.ext.asyncio", "AsyncConnection"):
        return _AsyncSQLAlchemy(conn, _sqlalchemy_dialect(conn))
    raise TypeError(
        "the outbox writes through a sqlite3.Connection, a psycopg (async) Connection, or a "
        f"SQLAlchemy (async) Session/Connection; got {type(conn).__module__}.{type(conn).__name__}"
    )
