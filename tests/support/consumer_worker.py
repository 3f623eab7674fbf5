"""A consumer process for restart tests: ``python -m tests.support.consumer_worker``.

Follows one project from the beginning and, for every item, performs its "effect" then saves the
cursor, printing ``<kind> <epoch> <seq> <blocker_id>`` on stdout (flushed) as it goes:

* ``--file PATH``: cursor in a :class:`~consumer.FileCursorStore` (auto-commit: saved when the
  next item is asked for; the effect is the printed line, so a kill between the two replays one);
* ``--sqlite PATH``: the effect is a row in an SQLite table, written in the same transaction as
  the cursor (:meth:`~consumer.SqlCursorStore.save_in`): exactly once across kills.

``--work SECONDS`` simulates processing time per event, so a test can kill the process mid-way.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys

import structlog

from consumer import Consumer, Delivery, FileCursorStore, SqlCursorStore
from schemas.tokens import issue_token


async def run(args: argparse.Namespace) -> None:
    db = None
    if args.sqlite:
        db = sqlite3.connect(args.sqlite)
        store = SqlCursorStore(db, "worker")
        store.create_table()
        db.execute(
            "CREATE TABLE IF NOT EXISTS effects (seq INTEGER PRIMARY KEY, epoch TEXT, ident INT)"
        )
        db.commit()
    else:
        store = FileCursorStore(args.file)

    def token() -> str:
        return issue_token(args.secret, [args.project], ttl=600)

    async with Consumer(
        args.url, token=token, store=store, start="beginning", auto_commit=db is None
    ) as consumer:
        async for item in consumer.events(args.project):
            ident = item.event.blocker_id if isinstance(item, Delivery) else 0  # type: ignore[attr-defined]
            kind = "event" if isinstance(item, Delivery) else "resync"
            if args.work:
                await asyncio.sleep(args.work)
            if db is not None:
                cursor = db.cursor()
                cursor.execute(
                    "INSERT INTO effects VALUES (?, ?, ?)", (item.seq, item.epoch, ident)
                )
                store.save_in(cursor, args.project, item.cursor)  # type: ignore[union-attr]
                db.commit()
            print(kind, item.epoch, item.seq, ident, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--project", type=int, default=1)
    parser.add_argument("--file")
    parser.add_argument("--sqlite")
    parser.add_argument("--work", type=float, default=0.0)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: items
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
