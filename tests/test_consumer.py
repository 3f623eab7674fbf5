"""The Python consumer end to end: real ``python -m gateway`` processes on a real Redis.

Every test compares what the consumer delivered with what Redis holds at the end: each event of
each project exactly once, in order, or a typed ``Resync`` where history was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from consumer import (
    AuthenticationFailed,
    Consumer,
    ConsumerError,
    Cursor,
    Delivery,
    FileCursorStore,
    Forbidden,
    MemoryCursorStore,
    ReconnectPolicy,
    Resync,
)
from publisher import AsyncPublisher, issue_token
from schemas.events import BlockerResolved, utc_now
from schemas.keys import Keys
from schemas.protocol import ResyncReason
from tests.support.gateway_process import ROOT, GatewayGroup, GatewayProcess
from tests.support.redis_server import RedisServer
from tests.support.ws_client import PublishLoop, final_state, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KEYS = Keys()
SECRET = "consumer-tests-secret-of-at-least-32-bytes"


def tokens(projects: list[int], ttl: float = 600):
    """A token function that counts its calls."""

    def mint() -> str:
        mint.calls += 1  # type: ignore[attr-defined]
        return issue_token(SECRET, projects, ttl=ttl, subject="consumer-test")

    mint.calls = 0  # type: ignore[attr-defined]
    return mint


def async_tokens(projects: list[int]):
    """An async token function (as one that asks the application's token endpoint would be)."""

    async def mint() -> str:
        await asyncio.sleep(0)
        return issue_token(SECRET, projects, ttl=600, subject="consumer-test")

    return mint


@pytest.fixture
def gateway(redis_url):
    with GatewayProcess(redis_url, auth_secret=SECRET) as process:
        yield process


async def collect(subscription, until, within: float = 30.0) -> list:
    """Items of ``subscription`` until ``until(items)`` holds (TimeoutError after ``within``)."""
    items: list = []
    async with asyncio.timeout(within):
        async for item in subscription:
            items.append(item)
            if until(items):
                break
    return items


def resolved(project_id: int, ident: int) -> BlockerResolved:
    return BlockerResolved(
        project_id=project_id, blocker_id=ident, answer=f"answer {ident}", resolved_at=utc_now()
    )


async def history(redis_url: str, projects: list[int]) -> dict[int, list[tuple[str, int, int]]]:
    """``project -> [(epoch, seq, blocker_id), ...]`` of what Redis holds, in order."""
    state = await final_state(redis_url, projects, KEYS)
    return {
        p: [(epoch, seq, ident) for (epoch, seq), ident in sorted(held.items())]
        for p, (_, held) in state.items()
    }


def as_records(items: list) -> dict[int, list[tuple[str, int, int]]]:
    records: dict[int, list[tuple[str, int, int]]] = {}
    for item in items:
        assert isinstance(item, Delivery), item
        records.setdefault(item.project_id, []).append(
            (item.epoch, item.seq, item.event.blocker_id)  # type: ignore[attr-defined]
        )
    return records


async def test_every_event_of_several_projects_exactly_once_in_order(gateway, redis_url):
    projects = [1, 2, 3]
    mint = tokens(projects)
    publisher = AsyncPublisher.from_url(redis_url)
    try:
        async with Consumer(gateway.ws_url, token=mint) as consumer:
            subscription = consumer.events(*projects)
            async with asyncio.timeout(20):
                await subscription.wait_subscribed()
            ident = 0
            for _round in range(5):
                burst = []
                for _ in range(60):
                    ident += 1
                    burst.append(resolved(projects[ident % 3], ident))
                await publisher.publish_many(burst)
                ident += 1
                await publisher.publish(resolved(2, ident))
            items = await collect(subscription, lambda items: len(items) == ident)
            await asyncio.sleep(0.2)  # anything extra (a duplicate) would be queued by now
            assert subscription._route.queue.empty()
    finally:
        await publisher.aclose()
    assert as_records(items) == await history(redis_url, projects)
    assert consumer.connects == 1 and mint.calls == 1
    assert consumer.stats.gaps == consumer.stats.duplicates == consumer.stats.resyncs == 0


def _start_worker(gateway: GatewayProcess, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "tests.support.consumer_worker", "--url", gateway.ws_url]
    command += ["--secret", SECRET, *args]
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )


async def _read_raw(process: subprocess.Popen[str], count: int) -> list[str]:
    """The next ``count`` lines a child process prints."""

    def read() -> list[str]:
        assert process.stdout is not None
        lines: list[str] = []
        while len(lines) < count:
            line = process.stdout.readline()
            if not line:
                raise AssertionError(f"the process exited ({process.poll()}) after {lines[-1:]}")
            lines.append(line.rstrip("\n"))
        return lines

    return await asyncio.wait_for(asyncio.to_thread(read), 60)


async def _read_lines(process: subprocess.Popen[str], count: int) -> list[list[str]]:
    """The next ``count`` lines the worker prints, split (``kind epoch seq ident``)."""
    return [line.split() for line in await _read_raw(process, count)]


def _kill(process: subprocess.Popen[str]) -> list[list[str]]:
    """SIGKILL, then whatever it printed before dying."""
    process.send_signal(signal.SIGKILL)
    rest, _ = process.communicate(timeout=10)
    return [line.split() for line in rest.splitlines()]


async def _publish(publisher: AsyncPublisher, project: int, first: int, count: int) -> None:
    await publisher.publish_many(resolved(project, i) for i in range(first, first + count))


async def test_a_killed_consumer_resumes_exactly_after_its_file_cursor(
    gateway, redis_url, tmp_path: Path
):
    """SIGKILL mid-stream: the restarted process starts with the event right after the cursor
    in its file. Saving after processing is at-least-once: the event being processed when the
    process died (after the saved cursor) may have had its effect (printed) already."""
    path = tmp_path / "cursors.json"
    publisher = AsyncPublisher.from_url(redis_url)
    try:
        await _publish(publisher, 1, 1, 300)
        first = _start_worker(gateway, "--file", str(path), "--work", "0.002")
        printed = await _read_lines(first, 100)
        printed += _kill(first)
        saved = await FileCursorStore(path).load(1)
        # Printed means processed; the cursor of the last one printed may not be saved yet.
        assert saved is not None and len(printed) - 1 <= saved.seq < 300, (saved, len(printed))
        await _publish(publisher, 1, 301, 100)  # published while nobody listens
        second = _start_worker(gateway, "--file", str(path))
        try:
            resumed = await _read_lines(second, 400 - saved.seq)
        finally:
            second.kill()
            second.communicate(timeout=10)
    finally:
        await publisher.aclose()
    (held,) = (await history(redis_url, [1])).values()
    epoch = held[0][0]
    as_tuples = [(e, int(s), int(i)) for kind, e, s, i in resumed if kind == "event"]
    assert as_tuples == held[saved.seq :], "the restart resumes right after the saved cursor"
    seen = [int(s) for _, _, s, _ in printed]
    assert seen[: saved.seq] == list(range(1, saved.seq + 1))
    assert seen[saved.seq :] in ([], [saved.seq + 1]), "at most the in-flight event twice"
    assert all(e == epoch for _, e, _, _ in printed + resumed)


async def test_the_cursor_in_the_callers_transaction_gives_exactly_once_across_kills(
    gateway, redis_url, tmp_path: Path
):
    """The documented exactly-once pattern: effect and cursor in one SQLite transaction. Killed
    twice mid-stream, the effects table ends up with every event once, in order."""
    db_path = tmp_path / "app.db"
    publisher = AsyncPublisher.from_url(redis_url)
    try:
        await _publish(publisher, 1, 1, 300)
        for stop_after in (80, 60):
            worker = _start_worker(gateway, "--sqlite", str(db_path), "--work", "0.002")
            await _read_lines(worker, stop_after)
            _kill(worker)
        await _publish(publisher, 1, 301, 50)
        worker = _start_worker(gateway, "--sqlite", str(db_path))
        try:
            db = sqlite3.connect(db_path)

            def done() -> bool:
                return db.execute("SELECT count(*) FROM effects").fetchone()[0] >= 350

            await wait_until(done, 60, "350 effects")
            rows = db.execute("SELECT epoch, seq, ident FROM effects ORDER BY seq").fetchall()
            db.close()
        finally:
            worker.kill()
            worker.communicate(timeout=10)
    finally:
        await publisher.aclose()
    (held,) = (await history(redis_url, [1])).values()
    assert rows == held  # a duplicate would have violated the primary key and killed the worker


async def test_through_a_gateway_sigkill_to_a_second_gateway_nothing_lost_or_repeated(
    redis_url,
):
    projects = [1, 2]
    with GatewayGroup() as group:
        first, second = await asyncio.to_thread(group.start, redis_url, 2, auth_secret=SECRET)
        loop = PublishLoop(redis_url, projects, rate=200)
        urls = [first.ws_url, second.ws_url]
        async with Consumer(urls, token=async_tokens(projects)) as consumer:
            subscription = consumer.events(*projects)
            async with asyncio.timeout(20):
                await subscription.wait_subscribed()
            items: list = []

            async def read() -> None:
                async for item in subscription:
                    items.append(item)

            reader = asyncio.create_task(read())
            try:
                loop.start()
                await wait_until(lambda: len(items) >= 150, 30, "150 events")
                assert await asyncio.to_thread(first.kill) == -9
                await wait_until(lambda: consumer.connects == 2 and consumer.live, 30, "resumed")
                published = loop.published
                await wait_until(lambda: loop.published >= published + 150, 30, "150 more")
                await loop.stop()
                state = await final_state(redis_url, projects, KEYS)
                finals = {p: cursor for p, (cursor, _) in state.items()}
                await wait_until(
                    lambda: all(consumer.cursor(p) == finals[p] for p in projects),
                    30,
                    "the final cursors",
                )
            finally:
                await loop.stop()
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
    assert consumer.close_codes[0] == 1006  # then 1000: the consumer closed at the end
    assert consumer.stats.gaps == consumer.stats.resyncs == 0
    records = as_records(items)
    for project in projects:
        _, held = state[project]
        assert records[project] == [(e, s, i) for (e, s), i in sorted(held.items())]


async def test_a_flushed_redis_is_surfaced_as_a_typed_resync(redis_url):
    client = redis.Redis.from_url(redis_url)
    publisher = AsyncPublisher.from_url(redis_url)
    args = ["--reconcile-interval", "0.5"]
    try:
        with GatewayProcess(redis_url, auth_secret=SECRET, args=args) as gateway:
            async with Consumer(gateway.ws_url, token=tokens([1])) as consumer:
                subscription = consumer.events(1)
                async with asyncio.timeout(20):
                    await subscription.wait_subscribed()
                await _publish(publisher, 1, 1, 5)
                before = await collect(subscription, lambda items: len(items) == 5)
                old_epoch = before[0].epoch
                client.flushall()
                (resync,) = await collect(subscription, lambda items: True)
                await _publish(publisher, 1, 6, 3)
                after = await collect(subscription, lambda items: len(items) == 3)
    finally:
        client.close()
        await publisher.aclose()
    assert [d.seq for d in before] == [1, 2, 3, 4, 5]
    assert isinstance(resync, Resync)
    assert resync.reason is ResyncReason.EPOCH_CHANGED and resync.epoch != old_epoch
    (held,) = (await history(redis_url, [1])).values()
    assert [(d.epoch, d.seq, d.event.blocker_id) for d in after] == held[-3:]
    assert after[0].cursor == Cursor(resync.epoch, resync.seq + 1)
    assert consumer.stats.resyncs == 1


async def test_a_token_function_refreshes_in_band_and_the_connection_stays_up(gateway, publisher):
    """3-second tokens: without an in-band refresh the gateway closes the connection at expiry
    (4002); with the token function, the consumer sends fresh tokens on the same connection."""
    mint = tokens([1], ttl=3)
    async with Consumer(gateway.ws_url, token=mint) as consumer:
        subscription = consumer.events(1)
        async with asyncio.timeout(20):
            await subscription.wait_subscribed()
        await wait_until(lambda: mint.calls >= 5, 30, "four refreshes")  # ~6 s: past two expiries
        await publisher.publish(resolved(1, 1))
        (item,) = await collect(subscription, lambda items: True)
    assert consumer.connects == 1 and 4002 not in consumer.close_codes
    assert isinstance(item, Delivery) and item.seq == 1


async def test_a_fixed_token_that_expires_is_surfaced_not_retried(gateway):
    async with Consumer(gateway.ws_url, token=issue_token(SECRET, [1], ttl=2)) as consumer:
        subscription = consumer.events(1)
        with pytest.raises(AuthenticationFailed) as info:
            await collect(subscription, lambda items: False)
    assert info.value.close_code == 4002
    assert consumer.connects == 1


async def test_a_refused_token_is_surfaced_and_a_bad_token_function_gives_up(gateway):
    async with Consumer(gateway.ws_url, token="not-a-token") as consumer:
        subscription = consumer.events(1)
        with pytest.raises(AuthenticationFailed) as info:
            async with asyncio.timeout(20):
                await subscription.wait_subscribed()
        with pytest.raises(AuthenticationFailed):
            await collect(subscription, lambda items: False)
    assert info.value.close_code == 4001 and consumer.connects == 1

    calls = []

    def wrong_secret() -> str:
        calls.append(1)
        return issue_token("another-secret-of-at-least-32-bytes!!", [1])

    policy = ReconnectPolicy(initial=0.05, max=0.2, max_auth_failures=3)
    async with Consumer(gateway.ws_url, token=wrong_secret, reconnect=policy) as consumer:
        with pytest.raises(AuthenticationFailed):
            await collect(consumer.events(1), lambda items: False)
    assert len(calls) == 3 and consumer.connects == 3


async def test_a_forbidden_project_is_surfaced_and_the_others_go_on(gateway, publisher):
    async with Consumer(gateway.ws_url, token=tokens([1])) as consumer:
        subscription = consumer.events(1, 2)
        with pytest.raises(Forbidden) as info:
            await collect(subscription, lambda items: False, within=20)
        assert info.value.project_id == 2 and info.value.code == "forbidden"
        async with asyncio.timeout(20):
            await subscription.wait_subscribed()
        await publisher.publish(resolved(1, 1))
        await publisher.publish(resolved(2, 2))
        await publisher.publish(resolved(1, 3))
        items = await collect(subscription, lambda items: len(items) == 2)
    assert [(d.project_id, d.event.blocker_id) for d in items] == [(1, 1), (1, 3)]


async def test_a_stored_cursor_the_gateway_would_refuse_is_an_error_not_silence(
    gateway, publisher, tmp_path
):
    """A cursor file holding a cursor no gateway accepts (an epoch with a space, a negative seq):
    the gateway answers the subscribe with an ``invalid_cursor`` error that names no project
    (the frame did not decode), so the consumer logged it and the project stayed subscribed to
    nothing, on every reconnect, for ever: no item, no error. Now loading it fails loudly."""
    path = tmp_path / "cursors.json"
    path.write_text(json.dumps({"1": ["not an epoch", -1]}))
    async with Consumer(gateway.ws_url, token=tokens([1]), store=FileCursorStore(path)) as bus:
        subscription = bus.events(1)
        await publisher.publish(resolved(1, 1))
        with pytest.raises(ConsumerError, match="cannot load the cursor of project 1"):
            await collect(subscription, lambda items: True, within=10)


async def test_tail_prints_the_history_then_live_events(gateway, redis_url):
    publisher = AsyncPublisher.from_url(redis_url)
    try:
        await _publish(publisher, 1, 1, 3)
        command = [sys.executable, "-m", "consumer", "tail", "1", "--from-start", "--json"]
        command += ["--count", "5", "--url", gateway.ws_url]
        env = {**os.environ, "EVENTBUS_AUTH_SECRET": SECRET}
        process = subprocess.Popen(  # noqa: ASYNC220 - a child that runs beside the test
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            first = await _read_raw(process, 3)
            await _publish(publisher, 1, 4, 2)
            rest, errors = await asyncio.to_thread(process.communicate, timeout=30)
        finally:
            process.kill()
    finally:
        await publisher.aclose()
    assert process.returncode == 0, errors
    frames = first + rest.splitlines()
    (held,) = (await history(redis_url, [1])).values()
    assert [(json.loads(f)["seq"], json.loads(f)["blocker_id"]) for f in frames] == [
        (seq, ident) for _, seq, ident in held
    ]


async def test_a_caller_too_slow_for_the_gateway_is_cut_and_resumes_exactly(redis_url):
    """The caller stops reading: the consumer's buffer fills, the connection stops reading, the
    gateway's write buffer passes --outbound-limit and it cuts the connection (4008). Once the
    caller reads again, the consumer resumes from the last item it received: exact sequence."""
    # 12 MB of events: more than the kernel's socket buffers on loopback hold, so the gateway's
    # own write buffer grows; a replay of that many must not be "too far behind".
    count = 3000
    args = ["--outbound-limit", "1024", "--max-replay", str(count)]
    publisher = AsyncPublisher.from_url(redis_url)
    try:
        with GatewayProcess(redis_url, auth_secret=SECRET, args=args) as gateway:
            async with Consumer(gateway.ws_url, token=tokens([1]), buffer=5) as consumer:
                subscription = consumer.events(1)
                async with asyncio.timeout(20):
                    await subscription.wait_subscribed()
                big = "x" * 4000
                await publisher.publish_many(
                    BlockerResolved(project_id=1, blocker_id=i, answer=big, resolved_at=utc_now())
                    for i in range(1, count + 1)
                )
                await wait_until(
                    lambda: gateway.metrics()["eventbus_slow_consumer_disconnects_total"] >= 1,
                    30,
                    "the gateway to cut the consumer",
                )
                items = await collect(subscription, lambda items: len(items) == count, within=60)
    finally:
        await publisher.aclose()
    assert consumer.connects >= 2 and consumer.close_codes[0] in (4008, 1006), consumer.close_codes
    assert as_records(items) == await history(redis_url, [1])


def test_tail_exits_2_naming_a_forbidden_project(gateway):
    token = issue_token(SECRET, [1], ttl=600)
    command = [sys.executable, "-m", "consumer", "tail", "2", "--url", gateway.ws_url]
    result = subprocess.run(
        [*command, "--token", token], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "python -m consumer tail: error: forbidden" in result.stderr
    assert "(project 2)" in result.stderr
    assert result.stdout == ""


async def _first_events(gateway, publisher, store, project_id: int, count: int) -> list:
    """A consumer with ``store`` follows the project from now, events 1..``count`` are published
    and received (their cursors committed), and it leaves: the items it got."""
    async with Consumer(gateway.ws_url, token=tokens([project_id]), store=store) as consumer:
        subscription = consumer.events(project_id)
        async with asyncio.timeout(20):
            await subscription.wait_subscribed()
        await _publish(publisher, project_id, 1, count)
        async with subscription:
            return await collect(subscription, lambda items: len(items) == count)


async def test_a_resume_beyond_one_replay_catches_up_by_pages_exactly(redis_url):
    """A consumer that was away for more events than one replay carries (--max-replay 50) but
    that the history still holds: it reads them from the polling endpoint page by page while
    events keep coming, then goes live; exact sequence, no Resync. With catch-up off, the same
    resume is the gateway's Resync(too_far_behind)."""
    store = MemoryCursorStore()
    args = ["--max-replay", "50"]
    publisher = AsyncPublisher.from_url(redis_url)
    loop = PublishLoop(redis_url, [1], rate=150)
    try:
        with GatewayProcess(redis_url, auth_secret=SECRET, args=args) as gateway:
            first = await _first_events(gateway, publisher, store, 1, 30)
            assert await store.load(1) == first[-1].cursor
            await _publish(publisher, 1, 31, 2500)  # three pages of 1,000

            async with Consumer(gateway.ws_url, token=tokens([1]), catch_up=False) as consumer:
                (resync,) = await collect(
                    consumer.events(1, after=first[-1].cursor), lambda items: True
                )
            assert isinstance(resync, Resync) and resync.reason is ResyncReason.TOO_FAR_BEHIND

            async with Consumer(gateway.ws_url, token=tokens([1]), store=store) as consumer:
                subscription = consumer.events(1)
                loop.start()  # and events keep coming during the catch-up
                items: list = []

                async def read() -> None:
                    async for item in subscription:
                        items.append(item)

                reader = asyncio.create_task(read())
                try:
                    await wait_until(lambda: len(items) >= 2600, 60, "the backlog and more")
                    await loop.stop()
                    ((cursor, _),) = (await final_state(redis_url, [1], KEYS)).values()
                    await wait_until(lambda: consumer.cursor(1) == cursor, 30, "the top")
                finally:
                    await loop.stop()
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
    finally:
        await publisher.aclose()
    assert consumer.connects == 1
    assert consumer.stats.catch_ups >= 1 and consumer.stats.resyncs == 0
    assert as_records(first + items) == await history(redis_url, [1])


async def test_a_catch_up_through_pages_cut_by_bytes_is_exact(redis_url):
    """Poll pages carry at most 1 MiB (--poll-page-bytes), fewer events than the
    consumer's ``limit`` when events are large: the catch-up follows ``more`` all the same and
    goes live without a gap or a Resync."""
    store = MemoryCursorStore()
    publisher = AsyncPublisher.from_url(redis_url)
    try:
        with GatewayProcess(redis_url, auth_secret=SECRET, args=["--max-replay", "50"]) as gateway:
            first = await _first_events(gateway, publisher, store, 3, 1)
            large = [
                BlockerResolved(
                    project_id=3, blocker_id=n, answer="€" * 5000, resolved_at=utc_now()
                )
                for n in range(2, 202)
            ]
            for start in range(0, 200, 50):  # 200 events of ~15 KB: three pages
                await publisher.publish_many(large[start : start + 50])
            polls = gateway.metrics()["eventbus_polls_total"]
            async with Consumer(gateway.ws_url, token=tokens([3]), store=store) as consumer:
                items = await collect(consumer.events(3), lambda items: len(items) == 200)
            assert gateway.metrics()["eventbus_polls_total"] - polls >= 3  # cut by bytes
    finally:
        await publisher.aclose()
    assert consumer.stats.catch_ups == 1 and consumer.stats.resyncs == 0
    assert as_records(first + items) == await history(redis_url, [3])


class RoundRobin:
    """A load balancer in front of gateways' HTTP port: each new connection goes to the next
    gateway in turn (``served`` lists which, by port), whatever state that gateway is in."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.served: list[int] = []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc_info: object) -> None:
        self.server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = self.ports[len(self.served) % len(self.ports)]
        self.served.append(port)
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(1 << 16):
                    sink.write(data)
                    await sink.drain()
                if sink.can_write_eof():
                    sink.write_eof()  # a half-close passes through, as HTTP uses it

        await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))
        writer.close()
        upstream_writer.close()


async def test_a_catch_up_through_a_load_balancer_skips_a_draining_gateway_exactly(redis_url):
    """A consumer catches up by pages through a load balancer that sends every other request to
    a gateway that drains (SIGTERM, --drain-delay: still listening). That gateway answered the
    pages it got as usual; now it refuses them (503 draining, Retry-After: 1), and the consumer
    asks for each refused page again, from the same cursor, and gets it from the other gateway:
    exact sequence, no Resync (before, a refused page surfaced Resync(too_far_behind))."""
    store = MemoryCursorStore()
    publisher = AsyncPublisher.from_url(redis_url)
    args = ["--max-replay", "50", "--drain-delay", "60"]
    try:
        with (
            GatewayProcess(redis_url, auth_secret=SECRET, args=args) as draining,
            GatewayProcess(redis_url, auth_secret=SECRET, args=args) as serving,
        ):
            first = await _first_events(serving, publisher, store, 4, 30)
            await _publish(publisher, 4, 31, 2500)  # three pages of 1,000
            draining.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(draining.wait_ready, 10, status=503)
            balancer = RoundRobin([draining.port, serving.port])
            async with balancer as http_url:
                async with Consumer(
                    serving.ws_url, token=tokens([4]), store=store, http_url=http_url
                ) as consumer:
                    items = await collect(consumer.events(4), lambda items: len(items) == 2500)
            assert draining.running  # it was still draining all along
    finally:
        await publisher.aclose()
    assert consumer.stats.catch_ups == 1 and consumer.stats.resyncs == 0
    assert consumer.stats.page_retries >= 1
    assert draining.port in balancer.served and serving.port in balancer.served
    assert as_records(first + items) == await history(redis_url, [4])


async def test_a_draining_gateway_1012_is_left_promptly_for_another_exactly(redis_url):
    """A rolling deploy: SIGTERM drains the gateway, which closes its clients with 1012; the
    consumer reconnects at once (no backoff) to the next URL and resumes: exact sequence."""
    with GatewayGroup() as group:
        first, second = await asyncio.to_thread(
            group.start, redis_url, 2, auth_secret=SECRET, args=["--drain-timeout", "5"]
        )
        slow = ReconnectPolicy(initial=30.0, max=30.0)  # a backoff would outlast the test
        loop = PublishLoop(redis_url, [1], rate=200)
        urls = [first.ws_url, second.ws_url]
        # random() near 1: any backoff delay is ~30 s, a prompt reconnect ~0.5 s.
        consumer = Consumer(urls, token=tokens([1]), reconnect=slow, random=lambda: 0.99)
        async with consumer:
            subscription = consumer.events(1)
            async with asyncio.timeout(20):
                await subscription.wait_subscribed()
            items: list = []

            async def read() -> None:
                async for item in subscription:
                    items.append(item)

            reader = asyncio.create_task(read())
            try:
                loop.start()
                await wait_until(lambda: len(items) >= 100, 30, "100 events")
                assert await asyncio.to_thread(first.terminate) == 0
                await wait_until(lambda: consumer.connects == 2 and consumer.live, 10, "moved")
                published = loop.published
                await wait_until(lambda: loop.published >= published + 100, 30, "100 more")
                await loop.stop()
                ((cursor, _),) = (await final_state(redis_url, [1], KEYS)).values()
                await wait_until(lambda: consumer.cursor(1) == cursor, 30, "the final cursor")
            finally:
                await loop.stop()
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
    assert consumer.close_codes[0] == 1012
    assert as_records(items) == await history(redis_url, [1])


async def test_a_subscribe_while_redis_is_down_is_retried_until_it_is_back():
    """The gateway answers 'unavailable' while Redis is down; the consumer keeps asking (with
    backoff) and, once Redis is back, follows the project as if nothing happened."""
    args = ["--subscribe-timeout", "0.5", "--probe-interval", "0.5"]
    policy = ReconnectPolicy(initial=0.2, max=1.0)
    with RedisServer() as server:
        with GatewayProcess(server.url, auth_secret=SECRET, args=args) as gateway:
            await asyncio.to_thread(server.kill)
            async with Consumer(gateway.ws_url, token=tokens([1]), reconnect=policy) as consumer:
                subscription = consumer.events(1)
                await wait_until(lambda: consumer.stats.unavailable > 0, 20, "an 'unavailable'")
                await asyncio.to_thread(server.start)
                async with asyncio.timeout(30):
                    await subscription.wait_subscribed()
                publisher = AsyncPublisher.from_url(server.url)
                try:
                    await _publish(publisher, 1, 1, 3)
                finally:
                    await publisher.aclose()
                items = await collect(subscription, lambda items: len(items) == 3)
    assert [(d.seq, d.event.blocker_id) for d in items] == [(1, 1), (2, 2), (3, 3)]
    assert consumer.connects == 1 and consumer.stats.resyncs == 0


async def test_through_a_gateway_sigkill_and_restart_on_the_same_url_exactly(redis_url):
    """One URL: the gateway is SIGKILLed, events are published while it is down, and it comes
    back on the same port; the consumer retries (backoff) until it answers, then resumes."""
    policy = ReconnectPolicy(initial=0.2, max=1.0)
    publisher = AsyncPublisher.from_url(redis_url)
    try:
        with GatewayProcess(redis_url, auth_secret=SECRET) as gateway:
            async with Consumer(gateway.ws_url, token=tokens([1]), reconnect=policy) as consumer:
                subscription = consumer.events(1)
                async with asyncio.timeout(20):
                    await subscription.wait_subscribed()
                await _publish(publisher, 1, 1, 50)
                items = await collect(subscription, lambda items: len(items) == 50)
                assert await asyncio.to_thread(gateway.kill) == -9
                await _publish(publisher, 1, 51, 50)  # nobody relays these now
                await wait_until(lambda: not consumer.live, 10, "the consumer to notice")
                await asyncio.to_thread(gateway.start)
                await _publish(publisher, 1, 101, 50)
                items += await collect(subscription, lambda items: len(items) == 100)
    finally:
        await publisher.aclose()
    assert consumer.connects == 2 and consumer.close_codes[0] == 1006
    assert as_records(items) == await history(redis_url, [1])
