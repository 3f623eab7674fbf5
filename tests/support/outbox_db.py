"""Databases for the outbox tests: a private PostgreSQL database per test session on the machine's
server (127.0.0.1:5432, trust auth), and helpers to read what reached Redis.

``EVENTBUS_TEST_POSTGRES`` overrides the server's admin URL (default: user ``postgres``, else
``root``, database ``postgres`` on 127.0.0.1:5432). Without a reachable server the PostgreSQL tests
are skipped with that reason; SQLite tests always run.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from schemas import Keys, decode_event

KEYS = Keys()


def _admin_urls() -> list[str]:
    if url := os.environ.get("EVENTBUS_TEST_POSTGRES"):
        return [url]
    return [
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "postgresql://root@127.0.0.1:5432/postgres",
    ]


@contextlib.contextmanager
def private_database(suffix: str = "") -> Iterator[str]:
    """Create ``eventbus_test_<pid><suffix>`` and yield its URL; drop it afterwards (a module
    with a session database of its own passes a suffix, so that two such modules in one run
    never drop each other's database)."""
    import psycopg

    errors = []
    for admin_url in _admin_urls():
        try:
            admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)
            break
        except psycopg.OperationalError as exc:
            errors.append(str(exc).strip())
    else:
        pytest.skip(f"no PostgreSQL server for the outbox tests: {errors}")
    name = f"eventbus_test_{os.getpid()}{suffix}"
    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield admin_url.rpartition("/")[0] + "/" + name
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def stream_ids(client: redis.Redis, project_id: int) -> list[tuple[int, int]]:
    """(seq, blocker_id) of every event in the project's stream, oldest first (the tests use
    blocker_id as the event's identity)."""
    out = []
    for entry_id, fields in client.xrange(KEYS.stream(project_id)):
        seq = int(entry_id.split(b"-")[0])
        frame = fields[b"f"]
        event = decode_event(frame[: frame.rindex(b',"seq":')] + b"}")
        out.append((seq, event.blocker_id))
    return out


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll ``condition`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(interval)
    return result
