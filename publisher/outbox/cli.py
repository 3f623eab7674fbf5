"""``python -m publisher.outbox``: run the outbox relay, print or apply the migration.

    python -m publisher.outbox relay --dsn postgresql://app@db/app --redis-url redis://redis:6379/0
    python -m publisher.outbox relay --sqlite /var/lib/app/app.db
    python -m publisher.outbox migrate --dialect postgresql            # print the DDL
    python -m publisher.outbox migrate --dsn postgresql://app@db/app   # apply it (--timeout 30)

``--dsn`` defaults to ``$EVENTBUS_OUTBOX_DSN``, ``--redis-url`` to ``$EVENTBUS_REDIS_URL`` (else
``redis://127.0.0.1:6379/0``), ``--prefix`` to ``$EVENTBUS_PREFIX``. The relay logs structlog
JSON lines on stderr (``--log-format``, ``--log-level``) and on SIGTERM / SIGINT exits 0
within ``--stop-timeout`` (10 s), whatever the database does (see ``OutboxRelay.stop``).
Exit 2: usage error; 1: the relay thread died.

The same relay is ``eventbus-publish relay`` (:func:`relay_main` takes the arguments after
``relay``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from datetime import timedelta

import structlog

from publisher.outbox.postgres import PostgresOutboxStore
from publisher.outbox.relay import OutboxRelay
from publisher.outbox.sql import DEFAULT_TABLE, POSTGRES, SQLITE, migration_sql, validate_table
from publisher.outbox.sqlite import SQLiteOutboxStore
from publisher.outbox.writer import Outbox
from schemas.keys import DEFAULT_PREFIX
from serverkit.arguments import events_per_second, positive_int, seconds
from serverkit.logs import add_log_arguments, configure_logging, log_arguments_error

__all__ = ["main", "relay_main"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _table(text: str) -> str:
    try:
        return validate_table(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _source(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--dsn",
        default=os.environ.get("EVENTBUS_OUTBOX_DSN"),
        help="PostgreSQL connection string or URL (default $EVENTBUS_OUTBOX_DSN)",
    )
    group.add_argument("--sqlite", metavar="PATH", help="SQLite database file")
    parser.add_argument("--table", type=_table, default=DEFAULT_TABLE, help="outbox table")


def _relay_arguments(parser: argparse.ArgumentParser) -> None:
    _source(parser)
    parser.add_argument(
        "--redis-url", default=os.environ.get("EVENTBUS_REDIS_URL", DEFAULT_REDIS_URL)
    )
    parser.add_argument("--prefix", default=os.environ.get("EVENTBUS_PREFIX", DEFAULT_PREFIX))
    parser.add_argument("--batch-size", type=positive_int, default=500, help="rows per batch (500)")
    parser.add_argument(
        "--max-rate",
        type=events_per_second,
        default=5_000,
        help="events/s at most, e.g. while catching up after an outage (5000; 0: no limit)",
    )
    parser.add_argument(
        "--poll-interval", type=seconds, default=1.0, help="seconds between looks when not woken"
    )
    parser.add_argument(
        "--retention",
        type=seconds,
        default=3600,
        help="seconds published rows are kept (3600; each project's newest is always kept)",
    )
    parser.add_argument(
        "--idempotency-window",
        type=seconds,
        default=600,
        help="seconds a published row stays recognisable if published again (600)",
    )
    parser.add_argument(
        "--no-leader",
        action="store_true",
        help="PostgreSQL: every relay works (default: one active relay per table, the others wait)",
    )
    parser.add_argument(
        "--leader-lease",
        type=seconds,
        default=30.0,
        help="PostgreSQL 14+: seconds a frozen leader keeps the lead before a standby takes "
        "over (30)",
    )
    parser.add_argument(
        "--stop-timeout",
        type=seconds,
        default=10.0,
        help="seconds to exit in after SIGTERM / SIGINT; the batch under way gets half of it (10)",
    )
    parser.add_argument("--stats-interval", type=seconds, default=10.0)
    add_log_arguments(parser, default_format="json")


def _run_relay(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from publisher.client import Publisher

    if args.sqlite:
        store = SQLiteOutboxStore(args.sqlite, args.table)
    elif args.dsn:
        store = PostgresOutboxStore(
            args.dsn, args.table, leader=not args.no_leader, lease=args.leader_lease
        )
    else:
        parser.error("give --dsn (or $EVENTBUS_OUTBOX_DSN) or --sqlite")
    # On stderr, as the gateway's and the HTTP API's (a line that cannot be written is dropped:
    # a relay whose log reader is gone goes on relaying).
    error = log_arguments_error(args)
    if error is not None:
        parser.error(error)
    configure_logging(args.log_format, args.log_level)
    publisher = Publisher.from_url(
        args.redis_url,
        prefix=args.prefix,
        idempotency_window=timedelta(seconds=args.idempotency_window),
    )
    relay = OutboxRelay(
        store,
        publisher,
        batch_size=args.batch_size,
        max_rate=args.max_rate,
        poll_interval=args.poll_interval,
        retention=timedelta(seconds=args.retention),
        stats_interval=args.stats_interval,
    )

    signals: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        # Only noted: the handler runs in the main thread between two of its bytecodes, where
        # taking a lock (Event.set) could deadlock with the code it interrupted.
        signals.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    structlog.get_logger("publisher.outbox").info(
        "outbox_relay_started", table=args.table, source="sqlite" if args.sqlite else "postgresql"
    )
    # The relay works in its thread, so that stop() can end a statement it waits in (another
    # session's lock, a hung database) at once. Before, the relay ran in this thread and the
    # signal only set its stop flag: such a statement held the exit up to the store's timeout
    # (30 s, Kubernetes' default grace period). The join's timeout is how late a signal is
    # noticed (a signal does not end a join: it resumes after the handler).
    thread = relay.start()._thread
    try:
        while not signals and thread is not None and thread.is_alive():
            thread.join(0.1)
    finally:
        relay.stop(args.stop_timeout)
        publisher.close()
    return 0 if signals else 1


def relay_main(argv: Sequence[str] | None = None, prog: str = "python -m publisher.outbox relay"):
    """The ``relay`` subcommand alone (arguments after ``relay``)."""
    parser = argparse.ArgumentParser(prog=prog, description="Publish the outbox table to Redis.")
    _relay_arguments(parser)
    return _run_relay(parser.parse_args(argv), parser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m publisher.outbox",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the docstring's example lines
    )
    sub = parser.add_subparsers(dest="command", required=True)
    relay = sub.add_parser("relay", help="publish the outbox table to Redis, forever")
    _relay_arguments(relay)
    migrate = sub.add_parser("migrate", help="print (or, with --dsn/--sqlite, apply) the DDL")
    migrate.add_argument("--dialect", choices=[POSTGRES, SQLITE])
    _source(migrate)
    migrate.add_argument(
        "--timeout",
        type=seconds,
        default=30.0,
        help="--dsn: seconds the connect, then the DDL, may wait for the database; --sqlite: "
        "for another connection's write lock (30)",
    )
    args = parser.parse_args(argv)
    if args.command == "relay":
        return _run_relay(args, relay)
    if args.sqlite:
        # --timeout is how long it waits for another connection's write lock (a long write
        # transaction of the application's); then, as any refusal, ``migrate failed: ...``.
        conn = sqlite3.connect(args.sqlite, timeout=args.timeout)
        try:
            with conn:  # (and the tag column on a table created before it: SQLite has no
                # ADD COLUMN IF NOT EXISTS, so create_table looks first)
                Outbox(args.table).create_table(conn)
        except sqlite3.Error as exc:
            sys.stderr.write(f"migrate failed: {exc}\n")
            return 1
        finally:
            conn.close()
        return 0
    if args.dsn and not args.dialect:
        import psycopg

        # Through the relay's store: its connect and the DDL are each bounded by --timeout (a
        # bare psycopg.connect has no timeout, nor has a statement: a database that accepts
        # TCP and never answers held the command for ever).
        store = PostgresOutboxStore(args.dsn, args.table, leader=False, timeout=args.timeout)
        try:
            store.apply_migration()
        except (TimeoutError, psycopg.Error) as exc:
            # Any refusal of the database's (a table in use for too long, a ``tag`` column of
            # another type: see sql.POSTGRES_DDL) is its message, not a traceback.
            sys.stderr.write(f"migrate failed: {exc}\n")
            return 1
        finally:
            store.close()
        return 0
    if not args.dialect:
        migrate.error("give --dialect to print the DDL, or --dsn / --sqlite to apply it")
    sys.stdout.write(migration_sql(args.dialect, args.table))
    return 0
