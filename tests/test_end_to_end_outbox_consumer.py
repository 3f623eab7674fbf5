"""From a committed PostgreSQL transaction to a Python consumer's iterator, under faults.

Every piece has fault tests of its own (test_outbox.py: the relay; test_faults.py and
test_consumer.py: gateways and the consumer); this one follows the events across all of them at
once. Writers on three threads commit outbox rows for three projects continuously (every fourth
transaction rolled back); a relay process (``python -m publisher.outbox relay``) publishes them to
a private redis-server; two gateway processes relay them; one ``Consumer`` given both gateways'
URLs follows the three projects through the first. During the run the relay is SIGKILLed in the
middle of a batch (rows published but not yet marked) and a new relay takes over, and the
consumer's gateway is drained (SIGTERM: close 1012), so the consumer resumes on the other one.

What a user relies on, per project: the consumer gets every committed event exactly once, in commit
order, and never an event whose transaction rolled back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from consumer import Consumer, Delivery, Resync
from publisher.outbox import Outbox
from schemas import BlockerResolved, decode_event
from schemas.protocol import ResyncReason
from tests.support.gateway_process import ROOT, GatewayGroup
from tests.support.outbox_db import private_database, stream_ids
from tests.support.redis_server import RedisServer
from tests.support.ws_client import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PROJECTS = (1, 2, 3)
T0 = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def pg_url():
    with private_database("_e2e") as url:
        yield url


def resolved(project_id: int, ident: int) -> BlockerResolved:
    return BlockerResolved(
        project_id=project_id, blocker_id=ident, answer=f"answer {ident}", resolved_at=T0
    )


class Writers:
    """Threads committing outbox rows until ``stop()``: transactions of 1-3 events over the three
    projects, every fourth one rolled back. ``blocker_id`` is unique across all of them."""

    def __init__(self, url: str, outbox: Outbox, threads: int = 3) -> None:
        self.url = url
        self.outbox = outbox
        self.rolled_back: set[int] = set()
        self.commits = 0
        self.errors: list[BaseException] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,)) for w in range(threads)]

    def transaction(self, conn: psycopg.Connection, n: int, worker: int) -> None:
        with self._lock:
            idents = [next(self._ids) for _ in range(1 + (n + worker) % 3)]
        events = [resolved(PROJECTS[(n + k + worker) % 3], i) for k, i in enumerate(idents)]
        # write_many locks the projects in one fixed order: transactions writing the same
        # projects serialize (commit order is id order per project) and never deadlock.
        self.outbox.write_many(conn, events)
        if n % 4 == 3:
            conn.rollback()
            with self._lock:
                self.rolled_back.update(idents)
        else:
            conn.commit()
            with self._lock:
                self.commits += 1

    def _run(self, worker: int) -> None:
        try:
            with psycopg.connect(self.url) as conn:
                for n in itertools.count():
                    if self._stop.wait(0.02):  # paced: a loaded 2-core machine runs the rest too
                        return
                    self.transaction(conn, n, worker)
        except BaseException as exc:
            self.errors.append(exc)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self._threads)
        assert not self.errors, self.errors


class RelayProcess:
    """``python -m publisher.outbox relay`` as a subprocess, its stderr in a file."""

    def __init__(self, log: Path, pg_url: str, table: str, redis_url: str, *args: str) -> None:
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "publisher.outbox", "relay",
                    "--dsn", pg_url, "--table", table, "--redis-url", redis_url,
                    "--poll-interval", "0.05", *args,
                ],
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out,
            )  # fmt: skip

    def end(self, sig: signal.Signals) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(15)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])


def committed_in_order(url: str, table: str) -> dict[int, list[int]]:
    """Each project's committed events (blocker ids) in id order, which is commit order."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT project_id, event FROM {table} ORDER BY id").fetchall()
    out: dict[int, list[int]] = {p: [] for p in PROJECTS}
    for project_id, payload in rows:
        out[project_id].append(decode_event(payload).blocker_id)
    return out


def unpublished(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        sql = f"SELECT count(*) FROM {table} WHERE published_at IS NULL"
        return conn.execute(sql).fetchone()[0]


def marked(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        sql = f"SELECT count(*) FROM {table} WHERE published_at IS NOT NULL"
        return conn.execute(sql).fetchone()[0]


@pytest.mark.parametrize(
    "redis_restart",
    [False, True],
    ids=["relay-killed-gateway-drained", "and-redis-restarted-empty"],
)
async def test_committed_events_reach_the_consumer_once_in_order_across_relay_and_gateway_faults(
    pg_url, tmp_path, redis_restart
):
    """With ``redis_restart``, Redis is also killed and started again empty (no persistence)
    after the drain: the relay publishes its backlog into a new epoch, and each project's
    consumer gets an explicit ``Resync(epoch_changed)`` standing for what was lost, then the
    events of the new epoch, each once, in commit order, up to the last one committed."""
    table = f"outbox_e2e_{int(redis_restart)}"
    outbox = Outbox(table)
    with psycopg.connect(pg_url) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        outbox.create_table(conn)
    writers = Writers(pg_url, outbox)
    relays: list[RelayProcess] = []
    with RedisServer() as redis_server, GatewayGroup() as group:
        client = redis_server.client()
        first, second = await asyncio.to_thread(group.start, redis_server.url, 2)

        def in_stream() -> int:
            return sum(len(stream_ids(client, p)) for p in PROJECTS)

        def start_relay(*args: str) -> None:
            log = tmp_path / "relay.log"
            relays.append(RelayProcess(log, pg_url, table, redis_server.url, *args))

        items: list = []
        async with Consumer([first.ws_url, second.ws_url]) as consumer:
            subscription = consumer.events(*PROJECTS)
            async with asyncio.timeout(20):
                await subscription.wait_subscribed()

            latest: dict[int, int] = {}  # project -> blocker id of its latest delivery

            async def read() -> None:
                async for item in subscription:
                    items.append(item)
                    if isinstance(item, Delivery):
                        latest[item.project_id] = item.event.blocker_id

            reader = asyncio.create_task(read())
            try:
                # A backlog of ~450 committed rows (75 transactions rolled back among them)
                # before the first relay starts: its first batch holds all of them, published at
                # 200 events/s and marked only at its end, so it is killed in the middle of it.
                def backlog() -> None:
                    with psycopg.connect(pg_url) as conn:
                        for n in range(300):
                            writers.transaction(conn, n, 0)

                await asyncio.to_thread(backlog)
                assert marked(pg_url, table) == 0
                writers.start()
                start_relay("--max-rate", "200", "--batch-size", "1000")
                await wait_until(lambda: in_stream() >= 60, 30, "60 events from the first relay")
                assert await asyncio.to_thread(relays[0].end, signal.SIGKILL) == -9
                published, done = in_stream(), await asyncio.to_thread(marked, pg_url, table)
                # Published but not marked: the next relay must publish them again, and the
                # idempotency keys must make that a no-op.
                assert done < published, relays[0].tail()
                await wait_until(lambda: len(items) >= 30, 30, "the consumer's first events")

                start_relay("--max-rate", "2000", "--batch-size", "50")
                seen = len(items)
                await wait_until(lambda: len(items) >= seen + 300, 30, "events of the new relay")

                # Drain the consumer's gateway (the first URL): it closes with 1012 and the
                # consumer resumes on the other one from its cursors.
                assert consumer.connects == 1
                assert await asyncio.to_thread(first.terminate) == 0
                await wait_until(
                    lambda: consumer.connects == 2 and consumer.live, 30, "the resume on :second"
                )
                assert consumer.close_codes == [1012]
                seen = len(items)
                await wait_until(lambda: len(items) >= seen + 200, 30, "events after the resume")

                if redis_restart:
                    await asyncio.to_thread(redis_server.kill)
                    await wait_until(
                        lambda: "outbox_redis_unavailable" in relays[1].log.read_text(),
                        30,
                        "the relay to find Redis gone",
                    )
                    await asyncio.to_thread(redis_server.start)
                    await asyncio.to_thread(second.wait_ready, 30)
                    await wait_until(
                        lambda: (
                            {i.project_id for i in items if isinstance(i, Resync)} == set(PROJECTS)
                        ),
                        30,
                        "a resync of every project",
                    )
                    seen = len(items)
                    await wait_until(
                        lambda: len(items) >= seen + 200, 30, "events after the resyncs"
                    )

                await asyncio.to_thread(writers.stop)
                await wait_until(
                    lambda: unpublished(pg_url, table) == 0, 30, "every committed row marked"
                )
                expected = await asyncio.to_thread(committed_in_order, pg_url, table)
                last = {p: ids[-1] for p, ids in expected.items()}
                await wait_until(
                    lambda: latest == last, 30, "the last committed event of each project"
                )
                await asyncio.sleep(0.2)  # a duplicate would have been delivered by now
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                with contextlib.suppress(AssertionError):
                    writers.stop()
                for relay in relays:
                    relay.end(signal.SIGTERM)
        streams = {p: stream_ids(client, p) for p in PROJECTS}
        client.close()

    assert relays[1].process.returncode == 0, relays[1].tail()
    assert writers.commits > 200 and len(writers.rolled_back) > 50
    assert consumer.stats.gaps == 0
    assert consumer.stats.resyncs == (len(PROJECTS) if redis_restart else 0)
    for project in PROJECTS:
        mine = [item for item in items if item.project_id == project]
        check_project(project, mine, expected[project], writers.rolled_back)
        # The stream holds the committed events in commit order (the new epoch's: the last ones)
        in_redis = [b for _, b in streams[project]]
        if redis_restart:
            assert in_redis == expected[project][len(expected[project]) - len(in_redis) :]
        else:
            assert in_redis == expected[project], f"project {project}"


def check_project(project: int, items: list, committed: list[int], rolled_back: set[int]) -> None:
    """A project's items are its committed events (blocker ids, in commit order) exactly once,
    in order, seq after seq of one epoch, save where a ``Resync`` stands for what was lost: each
    stretch of deliveries (before the first resync, between two, after the last) is a run of
    consecutive committed events, the first starting at the first event (seq 1), the last ending
    at the last one, each after a resync continuing at the resync's ``seq + 1`` of its epoch.
    Never an event whose transaction rolled back."""
    assert not {i.event.blocker_id for i in items if isinstance(i, Delivery)} & rolled_back
    stretches: list[tuple[Resync | None, list[Delivery]]] = [(None, [])]
    for item in items:
        if isinstance(item, Resync):
            assert item.reason is ResyncReason.EPOCH_CHANGED, item
            stretches.append((item, []))
        else:
            assert isinstance(item, Delivery), item
            stretches[-1][1].append(item)
    position = {ident: n for n, ident in enumerate(committed)}
    for n, (resync, deliveries) in enumerate(stretches):
        where = f"project {project}, stretch {n}"
        ids = [d.event.blocker_id for d in deliveries]
        assert set(ids) <= position.keys(), where
        if resync is None:
            assert ids == committed[: len(ids)], where
            first_seq = 1
        else:
            start = position[ids[0]] if ids else len(committed)
            assert ids == committed[start : start + len(ids)], where
            first_seq = resync.seq + 1
        assert [d.seq for d in deliveries] == list(range(first_seq, first_seq + len(ids))), where
        epochs = {d.epoch for d in deliveries} | ({resync.epoch} if resync else set())
        assert len(epochs) <= 1, where
    assert [d.event.blocker_id for d in stretches[-1][1]][-1:] == committed[-1:], project
