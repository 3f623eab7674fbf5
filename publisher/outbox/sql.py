"""The outbox table: its migration SQL (PostgreSQL and SQLite) and every statement run on it.

Pure: strings and small functions, no database driver imported. Statements are written once with
named parameters (``:name``, what ``sqlite3`` and SQLAlchemy's ``text()`` take) and converted to
psycopg's ``%(name)s`` by :func:`for_psycopg`.

The migration SQL ships as constants (:data:`POSTGRES_DDL`, :data:`SQLITE_DDL`, formatted with the
table name by :func:`migration_sql`) rather than files, so it is part of the installed package
without package-data settings; ``python -m publisher.outbox migrate --dialect postgres`` prints it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Generator

from schemas.stored import MAX_EVENT_BYTES as STORED_MAX_EVENT_BYTES

__all__ = [
    "DEFAULT_TABLE",
    "MAX_EVENT_BYTES",
    "NO_TAG_COLUMN",
    "POSTGRES",
    "POSTGRES_DDL",
    "SQLITE",
    "SQLITE_ADD_TAG",
    "SQLITE_DDL",
    "Statements",
    "columns_query",
    "for_psycopg",
    "lock_key",
    "migration_sql",
    "migration_steps",
    "notify_channel",
    "split_script",
    "sqlite_columns",
    "sqlite_upgrade",
    "validate_table",
]

POSTGRES = "postgresql"
SQLITE = "sqlite"
DEFAULT_TABLE = "eventbus_outbox"

#: The largest outbox event the relay reads: the largest an event can be (its frame, with its
#: seq, the largest a stream takes: 1 MiB), far above any event of the contract (~30 KB).
MAX_EVENT_BYTES = STORED_MAX_EVENT_BYTES

_TABLE_RE = re.compile(r"^(?:[a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,40}\Z")

#: PostgreSQL. ``id`` order is commit order per project (writers of one project serialize on a
#: transaction-level advisory lock, see ``publisher.outbox.writer``); ``token`` is random per row
#: and part of the idempotency key, so ids re-issued after a restore from backup or a re-created
#: table can never be mistaken for rows already published. ``epoch``/``seq`` are the cursor the
#: relay got for the row, ``tag`` the tag (schemas.tags) of the frame Redis stored there, which
#: the snapshot helper returns.
#:
#: One ``DO`` block, so that the migrations of a table (every pod of a deploy may run one at once)
#: take turns on a transaction-level advisory lock even on an autocommit connection: ``CREATE TABLE
#: IF NOT EXISTS`` racing itself fails all but one (``relation ... already exists``). It creates the
#: table where missing and adds what an existing table lacks (the ``tag`` column on a table created
#: before it, an index), and nothing else; it looks first, because ``ALTER TABLE`` and ``CREATE
#: INDEX`` take their locks even when ``IF NOT EXISTS`` then finds nothing to do (SHARE for an
#: index: it waits for every writer's open transaction, and every writer queues behind it), so a
#: migration run at every deploy would hold the writers up. What it must add, it tries with a
#: ``lock_timeout`` of 100 ms and retries every 100 to 200 ms: a long transaction holding the table
#: (a report, pg_dump) never queues the writers behind the ``ALTER`` for longer than one try; after
#: 20 s the migration fails (lock_not_available) instead of waiting on, run it again. A ``tag``
#: column that is not text fails it with an error that says so (the relay's marks would fail on it,
#: and the relay would publish nothing more). No ``%`` and no ``:name`` here: drivers take those for
#: parameters.
POSTGRES_DDL = """\
DO $$
DECLARE
    tbl      regclass;
    ns       oid;
    kept     text := current_setting('lock_timeout');
    deadline timestamptz := clock_timestamp() + interval '20 seconds';
    tag_type text;
BEGIN
    -- One migration of this table at a time (the two-key form: no other lock of the outbox's).
    PERFORM pg_advisory_xact_lock(hashtext('eventbus outbox migration'), hashtext('{table}'));
    CREATE TABLE IF NOT EXISTS {table} (
        id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        project_id   bigint NOT NULL,
        token        text NOT NULL,
        event        text NOT NULL,
        created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
        published_at timestamptz,
        epoch        text,
        seq          bigint,
        tag          text
    );
    tbl := to_regclass('{table}');
    ns := (SELECT relnamespace FROM pg_class WHERE oid = tbl);
    LOOP BEGIN  -- (a block per try: its changes are undone when it fails)
        PERFORM set_config('lock_timeout', '100ms', true);
        IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = tbl AND attname = 'tag'
                       AND NOT attisdropped) THEN
            ALTER TABLE {table} ADD COLUMN IF NOT EXISTS tag text;
        END IF;
        IF NOT EXISTS (SELECT FROM pg_class WHERE relname = '{name}_pending'
                       AND relnamespace = ns) THEN
            CREATE INDEX IF NOT EXISTS {name}_pending ON {table} (id) WHERE published_at IS NULL;
        END IF;
        IF NOT EXISTS (SELECT FROM pg_class WHERE relname = '{name}_project'
                       AND relnamespace = ns) THEN
            CREATE INDEX IF NOT EXISTS {name}_project ON {table} (project_id, id);
        END IF;
        EXIT;
    EXCEPTION WHEN lock_not_available THEN
        IF clock_timestamp() > deadline THEN
            RAISE EXCEPTION USING ERRCODE = 'lock_not_available', MESSAGE = 'outbox '
                || 'migration: {table} was in use for 20 s (a long transaction holds '
                || 'it); nothing was changed: run the migration again';
        END IF;
        PERFORM pg_sleep(0.1 + random() / 10);
    END; END LOOP;
    PERFORM set_config('lock_timeout', kept, true);
    SELECT format_type(atttypid, atttypmod) INTO tag_type FROM pg_attribute
        WHERE attrelid = tbl AND attname = 'tag' AND NOT attisdropped
        AND NOT (atttypid = CAST('text' AS regtype)
                 OR (atttypid = CAST('varchar' AS regtype) AND (atttypmod < 0 OR atttypmod >= 20)));
    IF tag_type IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'datatype_mismatch', MESSAGE = 'outbox migration: the '
            || 'column tag of {table} is of type ' || tag_type || ', not text: the relay '
            || 'records cursor tags there; rename or drop that column, then migrate again';
    END IF;
END $$;
"""

#: SQLite. AUTOINCREMENT, because a plain INTEGER PRIMARY KEY reuses the highest id once that
#: row is deleted. Times are unix seconds (REAL). SQLite runs one writer at a time, so id order is
#: commit order without any lock of ours. SQLite has no ``ADD COLUMN IF NOT EXISTS``: the upgrade
#: of a table created before ``tag`` (:data:`SQLITE_ADD_TAG`) is run by ``migrate --sqlite`` and
#: ``Outbox.create_table`` only when the column is missing (:func:`sqlite_upgrade`).
SQLITE_DDL = """\
-- A table created before the tag column needs, once (migrate --sqlite and Outbox.create_table
-- run it when the column is missing): ALTER TABLE {table} ADD COLUMN tag TEXT
CREATE TABLE IF NOT EXISTS {table} (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id   INTEGER NOT NULL,
    token        TEXT NOT NULL,
    event        TEXT NOT NULL,
    created_at   REAL NOT NULL,
    published_at REAL,
    epoch        TEXT,
    seq          INTEGER,
    tag          TEXT
);
CREATE INDEX IF NOT EXISTS {name}_pending ON {table} (id) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS {name}_project ON {table} (project_id, id);
"""


#: Upgrades a SQLite table created before the ``tag`` column (run only when it is missing).
SQLITE_ADD_TAG = "ALTER TABLE {table} ADD COLUMN tag TEXT"


def columns_query(table: str) -> str:
    """A query that reads no row, whose result's columns are the table's (either dialect)."""
    return f"SELECT * FROM {validate_table(table)} WHERE 1 = 0"


def sqlite_columns(table: str) -> tuple[str, dict[str, str]]:
    """A SQLite query (and its parameters) for the names of the table's columns."""
    schema, _, name = validate_table(table).rpartition(".")
    if schema:
        sql = "SELECT name FROM pragma_table_info(:name, :schema)"
        return sql, {"name": name, "schema": schema}
    return "SELECT name FROM pragma_table_info(:name)", {"name": name}


def sqlite_upgrade(table: str, columns: set[str]) -> list[str]:
    """The statements that bring a SQLite outbox table with ``columns`` up to date (none when
    it is)."""
    return [] if "tag" in columns else [SQLITE_ADD_TAG.format(table=validate_table(table))]


#: One statement of a migration, as :func:`migration_steps` yields it: SQL, parameters.
Step = tuple[str, dict[str, str]]


def migration_steps(dialect: str, table: str) -> Generator[Step, list[tuple] | None, None]:
    """The migration of ``table`` as the statements to run, one at a time, in the caller's
    transaction; pure (``Outbox.create_table`` and ``acreate_table`` are the I/O around it).

    The caller runs each yielded ``(sql, params)`` and sends back its rows (a list of tuples),
    or, if it raised, throws the exception in: the next statement may depend on what an earlier
    one found. The script of :func:`migration_sql` first, one statement each; then, on SQLite
    (no ``ADD COLUMN IF NOT EXISTS``), the table's columns, and :func:`sqlite_upgrade`'s
    statements for what is missing. An ``ADD COLUMN tag`` that fails because another connection
    added the column in between (every worker of an application may migrate at startup) is
    taken for done once the columns, read again, show it; any other failure is raised out of
    the ``throw``."""
    for statement in split_script(migration_sql(dialect, table)):
        yield statement, {}
    if dialect != SQLITE:
        return
    sql, params = sqlite_columns(table)
    columns = yield sql, params
    for statement in sqlite_upgrade(table, _names(columns)):
        try:
            yield statement, {}
        except Exception as exc:
            if not ("duplicate column name" in str(exc) and "tag" in _names((yield sql, params))):
                raise


def _names(rows: list[tuple] | None) -> set[str]:
    # Lower case: SQLite's column names ignore it (a "Tag" column of the application's own DDL
    # is the column ADD COLUMN tag would duplicate), as the relay and snapshots take them.
    return {str(row[0]).lower() for row in rows or ()}


def split_script(script: str) -> list[str]:
    """The statements of a migration script: split at each ``;`` outside ``$$`` bodies (the
    PostgreSQL script's ``DO`` block), one statement per call (psycopg with parameters, and
    SQLAlchemy, run one at a time)."""
    statements: list[str] = []
    current = ""
    for index, part in enumerate(script.split("$$")):
        if index % 2:  # inside a dollar-quoted body
            current += f"$${part}$$"
            continue
        first, *rest = part.split(";")
        current += first
        for piece in rest:
            statements.append(current)
            current = piece
    statements.append(current)
    return [statement.strip() for statement in statements if statement.strip()]


def validate_table(table: str) -> str:
    """The table name if it is a plain lower-case identifier, optionally schema-qualified (it is
    interpolated into SQL, and the idempotency keys derived from it must stay short)."""
    if not isinstance(table, str) or not _TABLE_RE.match(table):
        raise ValueError(
            "outbox table must be a lower-case identifier (optionally schema.table), "
            f"at most 41 characters for the table itself, got {table!r}"
        )
    return table


def migration_sql(dialect: str, table: str = DEFAULT_TABLE) -> str:
    """The ``CREATE TABLE`` / ``CREATE INDEX`` script for ``dialect`` (idempotent: ``IF NOT
    EXISTS`` everywhere). PostgreSQL's also adds the ``tag`` column to an older table, and
    takes no lock on a table that lacks nothing (see :data:`POSTGRES_DDL`); SQLite cannot say
    so in SQL alone: see :func:`sqlite_upgrade`."""
    validate_table(table)
    name = table.rpartition(".")[2]
    if dialect == POSTGRES:
        return POSTGRES_DDL.format(table=table, name=name)
    if dialect == SQLITE:
        return SQLITE_DDL.format(table=table, name=name)
    raise ValueError(f"unknown dialect {dialect!r}: {POSTGRES!r} or {SQLITE!r}")


def lock_key(table: str, project_id: int) -> int:
    """The PostgreSQL advisory lock key (a signed 64-bit int) of one project's outbox writes.

    Derived from the table and the project, so it does not collide with the application's own
    advisory locks in practice; a collision would only serialize two writers a little more."""
    digest = hashlib.blake2b(f"eventbus-outbox:{table}:{project_id}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def notify_channel(table: str) -> str:
    """The LISTEN/NOTIFY channel that wakes the relays of ``table``."""
    return f"{table.replace('.', '_')}_wakeup"


def leader_key(table: str) -> int:
    """The session-level advisory lock a relay holds while it is the table's active relay."""
    digest = hashlib.blake2b(f"eventbus-outbox-relay:{table}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


#: What the snapshot statements return in the tag's place on a table without the column (not
#: migrated yet): no tag (:func:`schemas.tags.is_tag` refuses it), and tells the snapshot to warn.
NO_TAG_COLUMN = "(no tag column)"


def _with_tag(table: str, rows: str) -> str:
    """``rows`` (a query of ``id, epoch, seq`` on ``table``) with a fourth column: the row's
    ``tag`` as text, or :data:`NO_TAG_COLUMN` when ``table`` has no such column, without failing
    (``no such column``) and without a query of the catalog first. The ``tag`` in the subquery
    is the column of ``table`` where it has one (the innermost name wins); where it has none, the
    name is resolved in the enclosing query, where only ``absent`` has it. Both databases
    resolve it when the statement is prepared, again after a change of the table or of the
    search_path: a prepared statement follows a migration, and the schema a connection is on.
    Written so on both dialects (SQLite has no LATERAL); it costs one primary key lookup of the
    row found. The name ``tag`` as the other statements name it: on PostgreSQL a quoted
    ``"Tag"`` is another column, SQLite ignores case."""
    return (
        f"SELECT o.id, o.epoch, o.seq, (SELECT CAST(tag AS TEXT) FROM {table} AS r "
        f"WHERE r.id = o.id) FROM ({rows}) AS o, (SELECT '{NO_TAG_COLUMN}' AS tag) AS absent"
    )


_NAMED = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


def for_psycopg(sql: str) -> str:
    """``:name`` parameters to psycopg's ``%(name)s`` (the statements here contain no ``%``)."""
    return _NAMED.sub(r"%(\1)s", sql)


class Statements:
    """Every statement on one outbox table, for one dialect (``:name`` parameters)."""

    def __init__(self, table: str, dialect: str) -> None:
        self.table = t = validate_table(table)
        self.dialect = dialect
        if dialect not in (POSTGRES, SQLITE):
            raise ValueError(f"unknown dialect {dialect!r}")
        pg = dialect == POSTGRES
        self.channel = notify_channel(table)
        self.insert = (
            f"INSERT INTO {t} (project_id, token, event) VALUES (:project_id, :token, :event)"
            if pg
            else f"INSERT INTO {t} (project_id, token, event, created_at) "
            "VALUES (:project_id, :token, :event, :created_at)"
        )
        # Taken before the insert and held to commit: the next writer of the project gets its
        # id only after this transaction has committed (or rolled back), so ids are in commit
        # order per project and the relay never sees a later row of a project before an earlier.
        self.lock = "SELECT pg_advisory_xact_lock(:key)"
        # Delivered at commit, once per transaction (PostgreSQL folds identical notifications).
        self.notify = "SELECT pg_notify(:channel, '')"
        # The common case in one round trip: one project's lock, and the notification.
        self.lock_and_notify = "SELECT pg_advisory_xact_lock(:key), pg_notify(:channel, '')"
        # PostgreSQL, several rows in one statement; ORDER BY the position makes the ids follow
        # the caller's order (the id default is evaluated on the sorted rows).
        self.insert_many = (
            f"INSERT INTO {t} (project_id, token, event) "
            "SELECT u.project_id, u.token, u.event FROM unnest(CAST(:project_ids AS bigint[]), "
            "CAST(:tokens AS text[]), CAST(:events AS text[])) WITH ORDINALITY "
            "AS u(project_id, token, event, position) ORDER BY u.position"
        )
        # Projects the relay holds back (a row that does not validate, a Redis key of theirs
        # that refuses writes) are left out, so they cannot starve the others.
        held = (
            "project_id <> ALL(CAST(:held AS bigint[]))"
            if pg
            else "project_id NOT IN (SELECT value FROM json_each(:held))"
        )
        # An event larger than any event can be (MAX_EVENT_BYTES: a hand-made row) is not
        # fetched, only its size: the relay reports the row and holds its project. Fetched, a
        # few such rows (up to 1 GB each in PostgreSQL) took the relay's memory batch after batch.
        size = "octet_length(event)" if pg else "length(CAST(event AS BLOB))"
        self.pending = (
            f"SELECT id, project_id, token, "
            f"CASE WHEN {size} <= :max_event THEN event END, "
            f"{'extract(epoch from created_at)' if pg else 'created_at'}, {size} "
            f"FROM {t} WHERE published_at IS NULL AND {held} ORDER BY id LIMIT :limit"
        )
        # SQLite: one row (executemany, in one transaction); PostgreSQL: a whole batch in one
        # statement (half the cost of one UPDATE per row).
        # A row is marked once: a relay's late retry of a mark that failed (kept while it stood
        # by) must not overwrite the cursor another relay marked since (a new epoch's, say).
        # With the tag, and without it (a table not yet migrated: see OutboxStore.tagged).
        self.mark = (
            f"UPDATE {t} SET published_at = :now, epoch = :epoch, seq = :seq, tag = :tag "
            "WHERE id = :id AND published_at IS NULL"
        )
        self.mark_untagged = (
            f"UPDATE {t} SET published_at = :now, epoch = :epoch, seq = :seq "
            "WHERE id = :id AND published_at IS NULL"
        )
        self.mark_many = (
            f"UPDATE {t} SET published_at = clock_timestamp(), epoch = v.epoch, seq = v.seq, "
            "tag = v.tag FROM unnest(CAST(:ids AS bigint[]), CAST(:epochs AS text[]), "
            "CAST(:seqs AS bigint[]), CAST(:tags AS text[])) AS v(id, epoch, seq, tag) "
            f"WHERE {t}.id = v.id AND {t}.published_at IS NULL"
        )
        self.mark_many_untagged = (
            f"UPDATE {t} SET published_at = clock_timestamp(), epoch = v.epoch, seq = v.seq "
            "FROM unnest(CAST(:ids AS bigint[]), CAST(:epochs AS text[]), "
            f"CAST(:seqs AS bigint[])) AS v(id, epoch, seq) "
            f"WHERE {t}.id = v.id AND {t}.published_at IS NULL"
        )
        self.columns = columns_query(t)
        self.backlog = f"SELECT count(*) FROM {t} WHERE published_at IS NULL"
        # Published rows older than the retention go, except each project's newest published
        # row: it holds the project's last cursor, which the snapshot helper may still need.
        older = "clock_timestamp() - make_interval(secs => :retention)" if pg else ":cutoff"
        self.cleanup = (
            f"DELETE FROM {t} WHERE id IN (SELECT o.id FROM {t} o "
            f"WHERE o.published_at IS NOT NULL AND o.published_at < {older} "
            f"AND o.id < (SELECT max(n.id) FROM {t} n WHERE n.project_id = o.project_id "
            "AND n.published_at IS NOT NULL) LIMIT :limit)"
        )
        # A snapshot's statements read the tag in the same query whether or not the table has
        # its tag column (one Outbox may serve several databases or schemas, some not migrated
        # yet; looking first would cost a query per snapshot, and remembering what was found
        # holds only for the database it was found on): see _with_tag.
        self.newest_of_project = _with_tag(
            t,
            f"SELECT id, epoch, seq FROM {t} WHERE project_id = :project_id "
            "ORDER BY id DESC LIMIT 1",
        )
        self.cursor_of_row = _with_tag(t, f"SELECT id, epoch, seq FROM {t} WHERE id = :id")
        self.try_lead = "SELECT pg_try_advisory_lock(:key)"
        # PostgreSQL 14+: the lock and the session's lease in one statement (the subquery, kept
        # apart by OFFSET 0, takes the lock first; each CASE sets its part of the lease only
        # when the lock was taken): a session holds the lock only with the lease, and a
        # standby's session, which only polls, gets none. The lease has two parts, because a
        # frozen leader leaves its session in one of two states. Idle (it had read everything
        # PostgreSQL sent): idle_session_timeout ends the session. Busy (PostgreSQL still has
        # part of a result to send, more than the socket buffers hold, and waits to write it,
        # where neither idle_session_timeout nor statement_timeout ends it): tcp_user_timeout
        # (PostgreSQL 12+; Linux 5.11+ counts a zero receive window as unacknowledged data too)
        # makes the kernel drop the connection, and PostgreSQL ends the session. Either way the
        # lock is released. Returns (led, idle_session_timeout, tcp_user_timeout as the server
        # shows it: '0' where it does not apply, a Unix-domain socket or a server without it).
        self.try_lead_with_lease = (
            "SELECT l.led, "
            "CASE WHEN l.led THEN set_config('idle_session_timeout', :lease_ms, false) END, "
            "CASE WHEN l.led THEN set_config('tcp_user_timeout', :lease_ms, false) END "
            "FROM (SELECT pg_try_advisory_lock(:key) AS led OFFSET 0) AS l"
        )
        self.leader_key = leader_key(table)
