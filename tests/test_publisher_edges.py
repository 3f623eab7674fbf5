"""The publisher at the edges (issue 11): a hung Redis, damaged keys, misused idempotency keys,
a burst that is only partly accepted, and arbitrary arguments.

What users rely on: every call ends within its documented ``timeout`` with
``PublisherUnavailable`` when Redis hangs, and the retries it made never publish an event twice;
a key another writer damaged gives a ``PublishError`` naming it and writes nothing, while other
projects go on; ``publish_many`` says exactly which events were written; an idempotency key never
answers for another event or another epoch; bad arguments get documented errors, never a Redis
error or a partial write. Real Redis (a private server for anything that stops it) unless a test
says otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from publisher import (
    AsyncPublisher,
    Cursor,
    EventValidationError,
    IdempotencyConflict,
    Publisher,
    PublishError,
    PublisherUnavailable,
    PublishManyError,
)
from publisher.__main__ import main as cli_main
from publisher.client import DEFAULT_TIMEOUT
from publisher.core import Retention, RetryPolicy, event_digest
from schemas import AgentResumed, BlockerExpired, BlockerResolved, Keys, encode_event
from schemas.stored import parse_idempotency_record
from tests.support.redis_server import RedisServer, hung

KEYS = Keys()
T0 = datetime(2025, 11, 8, 12, 45, 30, tzinfo=UTC)
#: Scheduling noise allowed on top of a documented bound (2 shared cores).
SLACK = 2.0


def event(project_id: int, n: int, answer: str | None = None) -> BlockerResolved:
    return BlockerResolved(
        project_id=project_id,
        blocker_id=n,
        answer=answer or f"answer {n}",
        resolved_at=T0,
    )


def stream(client: redis.Redis, project_id: int) -> list[tuple[int, int]]:
    """(seq, blocker_id) of every stored entry, oldest first."""
    return [
        (int(entry_id.split(b"-")[0]), json.loads(fields[b"f"])["blocker_id"])
        for entry_id, fields in client.xrange(KEYS.stream(project_id))
    ]


def assert_exactly_once(client: redis.Redis, project_id: int) -> list[int]:
    """The project's history is gapless from 1 and holds no event twice; its blocker ids."""
    entries = stream(client, project_id)
    assert [seq for seq, _ in entries] == list(range(1, len(entries) + 1))
    ids = [blocker_id for _, blocker_id in entries]
    assert len(ids) == len(set(ids)), f"an event was published twice: {ids}"
    return ids


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as own:
        yield own


def fails_within(call: Callable[[], object], bound: float) -> float:
    started = time.monotonic()
    with pytest.raises(PublisherUnavailable, match="Redis unavailable"):
        call()
    elapsed = time.monotonic() - started
    assert elapsed < bound + SLACK, f"took {elapsed:.1f} s, documented bound {bound} s"
    return elapsed


async def afails_within(call: Callable[[], object], bound: float) -> float:
    started = time.monotonic()
    with pytest.raises(PublisherUnavailable, match="Redis unavailable"):
        await call()  # type: ignore[misc]
    elapsed = time.monotonic() - started
    assert elapsed < bound + SLACK, f"took {elapsed:.1f} s, documented bound {bound} s"
    return elapsed


# --- the retry policy (pure) ------------------------------------------------------------------


def test_retry_policy_never_starts_an_attempt_that_could_end_after_the_timeout() -> None:
    policy = RetryPolicy(timeout=10.0, attempt_timeout=7.0)
    assert policy.delay(1, elapsed=0.01) == 0.0  # a dropped connection: at once
    assert policy.delay(2, elapsed=0.02) == 0.1
    assert policy.delay(3, elapsed=2.9) is None or policy.delay(3, elapsed=2.9) == 0.2
    assert policy.delay(1, elapsed=5.0) is None  # 5 + 7 > 10: a hung server is tried once
    assert policy.delay(5, elapsed=0.1) is None  # pauses used up
    assert RetryPolicy(timeout=10.0, attempt_timeout=None).delay(1, 0.0) is None


# --- a hung Redis (SIGSTOP): every call ends within its timeout --------------------------------


def test_a_publish_on_a_new_connection_fails_within_the_default_timeout(server) -> None:
    """The issue's case: 167 s on a fresh connection (redis-py's retry around the command and
    again around each connect). Now one deadline: DEFAULT_TIMEOUT."""
    with Publisher.from_url(server.url) as pub, hung(server):
        fails_within(lambda: pub.publish(event(1, 1)), DEFAULT_TIMEOUT)


def test_every_sync_call_fails_within_its_timeout_and_nothing_is_published_twice(
    server,
) -> None:
    timeout = 2.0
    with Publisher.from_url(server.url, timeout=timeout) as pub:
        first = pub.publish(event(1, 1), idempotency_key="e1")  # the lane holds a connection
        pub.publish_many([event(1, 2), event(2, 1)])  # the pool holds one for pipelines
        with hung(server):
            # On the held connection (the script is sent, then no reply), on a new one (the
            # handshake gets no reply), as a pipeline.
            fails_within(lambda: pub.publish(event(1, 3), idempotency_key="e3"), timeout)
            fails_within(lambda: pub.publish(event(1, 4), idempotency_key="e4"), timeout)
            fails_within(lambda: pub.publish_many([event(1, 5), event(2, 2)]), timeout)
            fails_within(lambda: pub.blocker_expired(2, 3, 3, idempotency_key="x3"), timeout)
        # Redis resumes and runs whatever reached it. The caller retries what failed, with the
        # same idempotency keys: each event ends up in the history exactly once.
        again = [
            pub.publish(event(1, 3), idempotency_key="e3"),
            pub.publish(event(1, 4), idempotency_key="e4"),
        ]
        assert pub.publish(event(1, 1), idempotency_key="e1") == first
    client = server.client()
    ids = assert_exactly_once(client, 1)
    assert {1, 2, 3, 4} <= set(ids) <= {1, 2, 3, 4, 5}
    assert [c.seq for c in again] == [ids.index(3) + 1, ids.index(4) + 1]
    assert_exactly_once(client, 2)
    client.close()


def test_retries_that_all_reached_a_hung_redis_publish_the_event_once(server, monkeypatch) -> None:
    """Three attempts send the same script on three held connections while Redis is stopped;
    when it resumes it runs all three: the retry guard makes two of them no-ops."""
    from publisher import connection

    monkeypatch.setattr(connection, "SOCKET_TIMEOUT", 0.5)
    monkeypatch.setattr(connection, "CONNECT_TIMEOUT", 0.2)
    admin = server.client()
    with Publisher.from_url(server.url, timeout=3.0) as pub:
        pub.publish(event(1, 1))
        assert pub._direct is not None
        # Three idle connections in the held-connection lane (as after concurrent publishes).
        pub._direct._idle[:] = [pub.client.connection_pool.get_connection() for _ in range(3)]
        calls = admin.info("commandstats")["cmdstat_evalsha"]["calls"]
        with hung(server):
            fails_within(lambda: pub.publish(event(1, 2)), 3.0)
        # Redis resumes and runs every script call that reached it (awaited, not slept on).
        deadline = time.monotonic() + 5
        while admin.info("commandstats")["cmdstat_evalsha"]["calls"] < calls + 3:
            assert time.monotonic() < deadline, "the three attempts never ran"
            time.sleep(0.01)
        assert pub.publish(event(1, 3)).seq == 3
    assert stream(admin, 1) == [(1, 1), (2, 2), (3, 3)]
    admin.close()


async def test_every_async_call_fails_within_its_timeout_and_nothing_is_published_twice(
    server,
) -> None:
    timeout = 2.0
    async with AsyncPublisher.from_url(server.url, timeout=timeout) as pub:
        await pub.publish(event(1, 1))
        await pub.publish_many([event(1, 2), event(2, 1)])
        with hung(server):
            await afails_within(lambda: pub.publish(event(1, 3), idempotency_key="e3"), timeout)
            await afails_within(lambda: pub.publish(event(1, 4), idempotency_key="e4"), timeout)
            await afails_within(lambda: pub.publish_many([event(1, 5), event(2, 2)]), timeout)
        again = await pub.publish(event(1, 3), idempotency_key="e3")
        await pub.publish(event(1, 4), idempotency_key="e4")
        later = await pub.publish(event(1, 6))  # no reply of a cancelled call is read as its own
    client = server.client()
    ids = assert_exactly_once(client, 1)
    assert again.seq == ids.index(3) + 1
    assert later.seq == ids.index(6) + 1 == len(ids)
    assert_exactly_once(client, 2)
    client.close()


async def test_an_async_publisher_on_a_client_of_your_own_is_bounded_too(server) -> None:
    """A client you built keeps its timeouts and retries (here: none, so it would wait forever
    on a hung server); the publisher still ends the call at its timeout."""
    client = redis.asyncio.Redis.from_url(server.url, socket_timeout=None)
    async with AsyncPublisher(client, timeout=1.0) as pub:
        await pub.publish(event(1, 1))
        with hung(server):
            await afails_within(lambda: pub.publish(event(1, 2)), 1.0)
        assert (await pub.publish(event(1, 3))).seq in (2, 3)


def test_a_client_of_your_own_configured_like_from_urls_gets_the_bound(server) -> None:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis.from_url(
        server.url, socket_timeout=0.5, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    with Publisher(client, timeout=2.0) as pub:
        assert pub._policy.attempt_timeout == pytest.approx(0.7)
        pub.publish(event(1, 1))
        with hung(server):
            fails_within(lambda: pub.publish(event(1, 2)), 2.0)
            fails_within(lambda: pub.publish_many([event(1, 3)]), 2.0)
    # redis-py's defaults retry on their own (and have no read timeout): one attempt, their bound.
    assert Publisher(redis.Redis.from_url(server.url))._policy.attempt_timeout is None
    slow = redis.Redis.from_url(
        server.url, socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
    )
    assert Publisher(slow, timeout=3)._policy.attempt_timeout is None  # 7 s > 3 s


def test_cli_history_fails_within_the_default_timeout(server) -> None:
    with Publisher.from_url(server.url) as pub:
        pub.publish(event(1, 1))
    err = io.StringIO()
    with hung(server):
        started = time.monotonic()
        code = cli_main(
            ["--redis-url", server.url, "history", "1"], stdout=io.StringIO(), stderr=err
        )
        elapsed = time.monotonic() - started
    assert code == 3, err.getvalue()
    assert "Redis unavailable" in err.getvalue()
    assert elapsed < DEFAULT_TIMEOUT + SLACK


@pytest.mark.slow
def test_a_hung_cluster_fails_within_the_timeout(redis_cluster_factory) -> None:
    """One master hung, then every node: redis-py's topology refresh after a timeout (one read
    timeout per node, 20 s with 3 masters) no longer runs inside the call."""
    cluster = redis_cluster_factory(masters=3, replicas=0)
    url = cluster.url  # asks the nodes: not while they are stopped
    timeout = 3.0

    @contextmanager
    def stopped(nodes):
        pids = [node.process.pid for node in nodes]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    def publish_until_it_works(pub: Publisher, n: int) -> Cursor:
        deadline = time.monotonic() + 30
        while True:
            try:
                return pub.publish(event(5, n))
            except PublisherUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.1)

    async def async_calls() -> None:
        async with AsyncPublisher.from_url(url, timeout=timeout) as apub:
            await afails_within(lambda: apub.publish(event(5, 90)), timeout)
            await afails_within(lambda: apub.publish_many([event(5, 91)]), timeout)

    with Publisher.from_url(url, timeout=timeout) as pub:
        pub.publish(event(5, 1))
        with stopped([cluster.node_for_project(5)]):
            fails_within(lambda: pub.publish(event(5, 2)), timeout)
            fails_within(lambda: pub.publish_many([event(5, 3)]), timeout)
        cluster.wait_healthy(30)
        publish_until_it_works(pub, 4)
        with stopped(cluster.nodes):
            fails_within(lambda: pub.publish(event(5, 5)), timeout)
            fails_within(lambda: pub.publish_many([event(5, 6), event(6, 1)]), timeout)
            fails_within(lambda: pub.publish(event(6, 2)), timeout)
            asyncio.run(async_calls())
        cluster.wait_healthy(30)
        last = publish_until_it_works(pub, 7)
    client = cluster.client()
    entries = [
        json.loads(fields[b"f"])["blocker_id"] for _id, fields in client.xrange(KEYS.stream(5))
    ]
    client.close()
    # Whatever Redis ran after resuming is there once; nothing published is missing.
    assert len(entries) == len(set(entries)) == last.seq
    assert {1, 4, 7} <= set(entries) <= {1, 2, 3, 4, 5, 6, 7, 90, 91}
    assert entries[-1] == 7


# --- name resolution: inside the bound, TLS and IPv6 as before ---------------------------------


@contextmanager
def resolver(monkeypatch, names: dict[str, str | None]) -> Iterator[None]:
    """``socket.getaddrinfo`` of this process answering for made-up ``names``: each gets the
    addresses of the IP given, or (None) waits for a resolver that never answers. A name left
    waiting is released when the block ends (its lookup then fails, as a real one gives up)."""
    real = socket.getaddrinfo
    release = threading.Event()

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in names:
            return real(host, port, *args, **kwargs)
        if names[host] is None:
            release.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(names[host], port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        yield
    finally:
        release.set()


def test_a_resolver_that_never_answers_fails_a_publish_within_its_timeout(monkeypatch) -> None:
    """redis-py looked the host name up in the calling thread before any timeout applied: a
    DNS server that does not answer held publish() for the system resolver's own limit on top
    of ``timeout`` (here: for as long as the lookup waits). Now the lookup is part of the
    connect timeout, and the call fails within ``timeout`` saying why."""
    timeout = 2.0
    with resolver(monkeypatch, {"hung-resolver.test": None}):
        pub = Publisher.from_url("redis://hung-resolver.test:6379/0", timeout=timeout)
        started = time.monotonic()
        with pytest.raises(
            PublisherUnavailable, match=r"no answer from the resolver for 'hung-resolver\.test'"
        ):
            pub.publish(event(1, 1))
        elapsed = time.monotonic() - started
        pub.close()
    assert elapsed < timeout + SLACK, f"took {elapsed:.1f} s, documented bound {timeout} s"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[tuple[RedisServer, int, str]]:
    """A private Redis on 127.0.0.1 and ::1, also serving TLS with a certificate for the name
    ``localhost`` only (no IP address in it): (server, TLS port, CA file)."""
    from tests.support.redis_server import free_port
    from tests.support.tls import localhost_certificate

    cert, key = localhost_certificate(tmp_path_factory.mktemp("tls"))
    tls_port = free_port()
    with RedisServer(
        None,
        "--bind", "127.0.0.1 ::1",
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(cert),
        "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert),
        "--tls-auth-clients", "no",
    ) as own:  # fmt: skip
        yield own, tls_port, str(cert)


def test_tls_checks_the_certificate_against_the_urls_host_name(monkeypatch, tls_server) -> None:
    """The name is looked up in another thread; TLS still checks the certificate against the
    URL's name: ``localhost`` passes (a check against the address it was looked up to would
    fail: the certificate names no address), another name of the same address is refused."""
    _, tls_port, ca = tls_server
    with Publisher.from_url(f"rediss://localhost:{tls_port}/0?ssl_ca_certs={ca}") as pub:
        assert pub.publish(event(1, 1)).seq == 1
    with resolver(monkeypatch, {"other-name.test": "127.0.0.1"}):
        url = f"rediss://other-name.test:{tls_port}/0?ssl_ca_certs={ca}"
        with Publisher.from_url(url) as pub:
            with pytest.raises(PublisherUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                pub.publish(event(1, 2))


def test_a_name_that_resolves_to_ipv6_addresses_connects(monkeypatch, tls_server) -> None:
    server, _, _ = tls_server
    with resolver(monkeypatch, {"ipv6-only.test": "::1"}):
        for host in ("ipv6-only.test", "[::1]"):
            with Publisher.from_url(f"redis://{host}:{server.port}/0") as pub:
                pub.publish(event(2, 1))
                assert pub.client.client_info()["addr"].startswith("[::1]:")


# --- keys another writer damaged: a clear error naming the key, nothing written --------------


@pytest.fixture
def pub(redis_url: str) -> Iterator[Publisher]:
    with Publisher.from_url(redis_url) as publisher:
        yield publisher


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda c: c.hset(KEYS.meta(1), mapping={"epoch": b"\xff\xfe", "seq": 1}), "meta"),
        (lambda c: c.hset(KEYS.meta(1), mapping={"epoch": "e" * 65, "seq": 1}), "meta"),
        (lambda c: c.hset(KEYS.meta(1), mapping={"epoch": "ok", "seq": "abc"}), "meta"),
        (lambda c: c.hset(KEYS.meta(1), mapping={"epoch": "ok", "seq": "-1"}), "meta"),
        (lambda c: c.hset(KEYS.meta(1), mapping={"epoch": "ok", "seq": "01"}), "meta"),
        (lambda c: c.hset(KEYS.meta(1), "epoch", "ok"), "meta"),  # no seq
        (lambda c: c.rpush(KEYS.meta(1), "x"), "meta"),
        (lambda c: c.set(KEYS.stream(1), "x"), "stream"),
        (lambda c: c.xadd(KEYS.stream(1), {"x": "y"}, id="9-0"), "stream"),  # ahead of seq
    ],
)
def test_a_damaged_key_refuses_the_publish_and_names_the_key(
    pub: Publisher, redis_client, damage, named
) -> None:
    pub.publish(event(1, 1))  # a normal history: epoch, seq 1
    meta_before = redis_client.hgetall(KEYS.meta(1))
    key = KEYS.meta(1) if named == "meta" else KEYS.stream(1)
    if redis_client.type(key) != b"stream" or named == "meta":
        redis_client.delete(key)
    damage(redis_client)
    raw = {k: redis_client.dump(k) for k in (KEYS.meta(1), KEYS.stream(1))}
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(KEYS.channel(1))
    with pytest.raises(PublishError) as info:
        pub.publish(event(1, 2))
    assert not isinstance(info.value, PublisherUnavailable)
    assert key in str(info.value) and "nothing written" in str(info.value)
    # Nothing was written: both keys as they were (the seq did not advance), nothing published.
    assert {k: redis_client.dump(k) for k in raw} == raw
    if named == "stream":
        assert redis_client.hgetall(KEYS.meta(1)) == meta_before
    assert pubsub.get_message(timeout=0.1) is None  # a publish would already be there
    pubsub.close()
    # Other projects are not affected, nor is this one once the key is repaired (deleted).
    assert pub.publish(event(2, 1)).seq == 1
    redis_client.delete(KEYS.meta(1), KEYS.stream(1))
    assert pub.publish(event(1, 3)).seq == 1


def test_cli_history_reports_a_damaged_meta_and_skips_foreign_entries(
    pub: Publisher, redis_client, redis_url
) -> None:
    for n in (1, 2):
        pub.publish(event(1, n))
    redis_client.xadd(KEYS.stream(1), {"x": "y"}, id="3-0")  # a foreign entry...
    redis_client.hincrby(KEYS.meta(1), "seq", 1)  # ...counted as an event
    pub.publish(event(1, 4))
    other = b'{"type":"x","project_id":2,"seq":5}'  # project 2's frame, in project 1's stream
    redis_client.xadd(KEYS.stream(1), {"f": other, "t": "0"}, id="5-0")
    redis_client.hincrby(KEYS.meta(1), "seq", 1)
    out, err = io.StringIO(), io.StringIO()
    assert cli_main(["--redis-url", redis_url, "history", "1"], stdout=out, stderr=err) == 0
    header, *frames = (json.loads(line) for line in out.getvalue().splitlines())
    assert header["seq"] == 5 and header["count"] == 3
    assert [f["seq"] for f in frames] == [1, 2, 4]
    assert "skipped entry 3" in err.getvalue()
    assert "skipped entry 5" in err.getvalue() and "does not name project 1" in err.getvalue()

    redis_client.hset(KEYS.meta(1), "epoch", b"\xff")
    out, err = io.StringIO(), io.StringIO()
    assert cli_main(["--redis-url", redis_url, "history", "1"], stdout=out, stderr=err) == 1
    assert KEYS.meta(1) in err.getvalue() and "Traceback" not in err.getvalue()


def test_cli_history_never_reads_a_huge_foreign_entry_whole(
    pub: Publisher, redis_client, redis_url
) -> None:
    """An entry heavier than any frame (another writer's: 3 MiB here, up to 512 MiB possible)
    comes back from Redis as its weight, never whole, whether it is the oldest entry or one
    after the cursor: skipped with a warning that says so, the real frames around it printed."""
    from schemas.stored import MAX_ENTRY_BYTES

    huge = b"x" * (3 * 1024 * 1024)
    redis_client.xadd(KEYS.stream(1), {"f": huge}, id="1-0")  # the oldest entry
    redis_client.hset(KEYS.meta(1), mapping={"epoch": "e1", "seq": 1})
    pub.publish(event(1, 2))
    redis_client.xadd(KEYS.stream(1), {"f": huge, "t": "0"}, id="3-0")
    redis_client.hincrby(KEYS.meta(1), "seq", 1)
    pub.publish(event(1, 4))
    out, err = io.StringIO(), io.StringIO()
    assert cli_main(["--redis-url", redis_url, "history", "1"], stdout=out, stderr=err) == 0
    header, *frames = (json.loads(line) for line in out.getvalue().splitlines())
    assert header["seq"] == 4 and header["oldest"] == 1 and header["count"] == 2
    assert [f["seq"] for f in frames] == [2, 4]
    weight = f"entry weighs {len(huge) + 1} bytes, over {MAX_ENTRY_BYTES}"
    assert f"skipped entry 1 of {KEYS.stream(1)}: {weight}" in err.getvalue()
    # Its weight, which only the script's stand-in gives: the 3 MiB never left Redis.
    assert (
        f"skipped entry 3 of {KEYS.stream(1)}: entry weighs {len(huge) + 3} bytes" in err.getvalue()
    )


# --- publish_many: a burst partly refused says exactly what was written ------------------------


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_publish_many_names_what_was_written_and_a_retry_of_the_rest_is_exact(
    redis_url: str, redis_client, flavour: str
) -> None:
    redis_client.set(KEYS.meta(2), "not a hash")  # project 2 is damaged
    burst = [event(1, 1), event(2, 1), event(3, 1), event(1, 2), event(2, 2)]

    def publish_many(events):
        if flavour == "sync":
            with Publisher.from_url(redis_url) as pub:
                return pub.publish_many(events)

        async def run():
            async with AsyncPublisher.from_url(redis_url) as pub:
                return await pub.publish_many(events)

        return asyncio.run(run())

    with pytest.raises(PublishManyError) as info:
        publish_many(burst)
    error = info.value
    assert isinstance(error, PublishError)
    assert error.unpublished == [1, 4]
    assert [c is None for c in error.cursors] == [False, True, False, False, True]
    assert [c.seq for c in error.cursors if c is not None] == [1, 1, 2]
    assert list(error.errors) == [2] and KEYS.meta(2) in str(error)
    assert stream(redis_client, 1) == [(1, 1), (2, 2)]
    assert stream(redis_client, 3) == [(1, 1)]
    assert redis_client.get(KEYS.meta(2)) == b"not a hash"  # untouched

    # The operator repairs the key; the caller retries exactly the events not published.
    redis_client.delete(KEYS.meta(2))
    retried = publish_many([burst[i] for i in error.unpublished])
    assert [c.seq for c in retried] == [1, 2]
    for project_id in (1, 2, 3):
        assert_exactly_once(redis_client, project_id)
    assert stream(redis_client, 2) == [(1, 1), (2, 2)]


def test_cli_publish_prints_what_was_written_when_a_project_refuses(
    redis_url: str, redis_client
) -> None:
    redis_client.set(KEYS.meta(2), "not a hash")
    lines = "\n".join(json.dumps(json.loads(_json(e))) for e in (event(1, 1), event(2, 1)))
    out, err = io.StringIO(), io.StringIO()
    code = cli_main(
        ["--redis-url", redis_url, "publish", "-"],
        stdin=_Stdin(lines),
        stdout=out,
        stderr=err,
    )
    assert code == 1
    written, refused = (json.loads(line) for line in out.getvalue().splitlines())
    assert written["project_id"] == 1 and written["seq"] == 1
    assert refused == {"project_id": 2, "published": False}
    assert KEYS.meta(2) in err.getvalue()


class _Stdin(io.StringIO):
    def isatty(self) -> bool:
        return False


def _json(e: BlockerResolved) -> bytes:
    from schemas import encode_event

    return encode_event(e)


# --- idempotency keys: never another event, never another epoch --------------------------------


def test_a_key_reused_for_another_event_is_a_conflict_and_writes_nothing(
    pub: Publisher, redis_client
) -> None:
    first = pub.publish(event(1, 1, "Use JWT"), idempotency_key="k")
    with pytest.raises(IdempotencyConflict) as info:
        pub.publish(event(1, 1, "Use sessions"), idempotency_key="k")
    assert info.value.cursor == first and info.value.key == "k"
    assert "'k'" in str(info.value)
    with pytest.raises(IdempotencyConflict):  # another type under the same key
        pub.publish(
            BlockerExpired(project_id=1, blocker_id=1, task_id=1, expired_at=T0),
            idempotency_key="k",
        )
    with pytest.raises(IdempotencyConflict):
        pub.agent_resumed(1, "agent-1", 1, 1, idempotency_key="k")
    assert stream(redis_client, 1) == [(1, 1)]
    # The same event stamped anew (a helper's default time on retry) is the same event.
    later = T0 + timedelta(seconds=30)
    restamped = BlockerResolved(project_id=1, blocker_id=1, answer="Use JWT", resolved_at=later)
    assert pub.publish(restamped, idempotency_key="k") == first
    assert pub.blocker_resolved(1, 1, "Use JWT", idempotency_key="k") == first
    assert stream(redis_client, 1) == [(1, 1)]


async def test_async_conflict(redis_url: str) -> None:
    async with AsyncPublisher.from_url(redis_url) as pub:
        first = await pub.agent_resumed(1, "agent-1", 2, 3, idempotency_key="r")
        assert await pub.agent_resumed(1, "agent-1", 2, 3, idempotency_key="r") == first
        with pytest.raises(IdempotencyConflict):
            await pub.agent_resumed(1, "agent-2", 2, 3, idempotency_key="r")


def test_a_key_never_answers_with_a_cursor_of_a_lost_epoch(pub: Publisher, redis_client) -> None:
    """Redis lost the project's metadata (a flush, a restore, an eviction): the record still
    points into the dead history. The event is not in the live one, so it is published there."""
    first = pub.publish(event(1, 1), idempotency_key="k")
    redis_client.delete(KEYS.meta(1))
    again = pub.publish(event(1, 1), idempotency_key="k")
    assert again.epoch != first.epoch and again.seq == 1
    assert stream(redis_client, 1) == [(1, 1)]  # the stale stream went with its epoch
    assert pub.publish(event(1, 1), idempotency_key="k") == again  # and now it is recorded


def test_records_of_the_old_format_keep_working(pub: Publisher, redis_client) -> None:
    """Records written before digests existed ("<epoch>|<seq>") still answer retries (they
    cannot detect a conflict; they expire with the idempotency window)."""
    first = pub.publish(event(1, 1))
    redis_client.set(KEYS.idempotency(1, "old"), f"{first.epoch}|1", px=60_000)
    assert pub.publish(event(1, 1), idempotency_key="old") == first
    assert pub.publish(event(1, 9), idempotency_key="old") == first  # no digest: no check
    assert stream(redis_client, 1) == [(1, 1)]


@pytest.mark.parametrize("record", [b"garbage", b"e|x", b"\xff|1", b"ok|1|zz"])
def test_a_damaged_idempotency_record_is_refused(pub: Publisher, redis_client, record) -> None:
    pub.publish(event(1, 1))
    redis_client.set(KEYS.idempotency(1, "k"), record)
    with pytest.raises(PublishError, match=r"idem:k is not an idempotency record"):
        pub.publish(event(1, 2), idempotency_key="k")
    redis_client.delete(KEYS.idempotency(1, "k"))
    redis_client.hset(KEYS.idempotency(1, "k"), "a", "b")
    with pytest.raises(PublishError, match=r"idem:k is not a string"):
        pub.publish(event(1, 2), idempotency_key="k")
    assert stream(redis_client, 1) == [(1, 1)]


_record_parts = st.tuples(
    st.sampled_from([b"EPOCH", b"other-epoch", b"", b"a b", b"\xff", b"E" * 70]),
    st.sampled_from([b"|"]),
    st.sampled_from([b"1", b"2", b"0", b"007", b"123456789012345", b"1234567890123456", b"x"]),
    st.sampled_from([b"", b"|DIGEST", b"|abc", b"|ABC", b"|zz", b"|", b"|DIGEST\n"]),
).map(b"".join)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.one_of(_record_parts, st.binary(max_size=30)))
def test_the_script_and_the_python_parser_agree_on_idempotency_records(
    pub: Publisher, redis_client, raw: bytes
) -> None:
    """schemas.stored.parse_idempotency_record is the publish script's rule: for any value under
    an idempotency key, the script refuses it, answers with it, reports a conflict or treats it as
    stale exactly as the parser predicts."""
    redis_client.delete(KEYS.meta(1), KEYS.stream(1), KEYS.idempotency(1, "k"))
    current = pub.publish(event(1, 1))
    again = event(1, 2)
    digest = event_digest(again, encode_event(again))
    value = raw.replace(b"EPOCH", current.epoch.encode()).replace(b"DIGEST", digest.encode())
    redis_client.set(KEYS.idempotency(1, "k"), value)
    record = parse_idempotency_record(value)
    if record is None:
        with pytest.raises(PublishError, match="is not an idempotency record"):
            pub.publish(again, idempotency_key="k")
    elif record.epoch != current.epoch:  # stale: published in the live history
        assert pub.publish(again, idempotency_key="k") == Cursor(current.epoch, 2)
    elif record.digest not in (None, digest):
        with pytest.raises(IdempotencyConflict) as info:
            pub.publish(again, idempotency_key="k")
        assert info.value.cursor == Cursor(current.epoch, record.seq)
    else:
        assert pub.publish(again, idempotency_key="k") == Cursor(current.epoch, record.seq)


# --- arbitrary arguments: documented errors, never a Redis error or a partial write ----------

_FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.binary(max_size=10),
    st.datetimes(timezones=st.one_of(st.none(), st.just(UTC))),
)
_project_ids = st.one_of(st.integers(min_value=1, max_value=5), _anything)
_texts = st.one_of(
    st.text(min_size=0, max_size=20),  # lone surrogates included
    st.text(min_size=4990, max_size=5010, alphabet="ab"),
    _anything,
)


@st.composite
def _events(draw) -> Callable[[], object]:
    """A thunk building an event from arbitrary field values: building may already raise the
    documented EventValidationError (a timestamp that is not a datetime)."""
    kind = draw(st.sampled_from(["resolved", "resumed", "expired"]))
    project_id = draw(_project_ids)
    when = draw(st.one_of(st.just(T0), _anything))
    ids = st.one_of(st.integers(1, 9), _anything)
    if kind == "resolved":
        return functools.partial(
            BlockerResolved,
            project_id=project_id,
            blocker_id=draw(ids),
            answer=draw(_texts),
            resolved_at=when,
        )
    if kind == "resumed":
        return functools.partial(
            AgentResumed,
            project_id=project_id,
            agent_id=draw(_texts),
            task_id=draw(ids),
            blocker_id=1,
            resumed_at=when,
        )
    return functools.partial(
        BlockerExpired, project_id=project_id, blocker_id=1, task_id=1, expired_at=when
    )


_keys = st.one_of(st.none(), st.text(max_size=210), _anything)


def _snapshot(client) -> dict:
    return {key: client.dump(key) for key in sorted(client.keys("eventbus:{[0-9]*}:*[ma]"))}


@pytest.fixture(params=["fakeredis", "redis-server"])
def fuzz_redis(request):
    """Both Lua engines: fakeredis (fast) and the private redis-server (the real one)."""
    if request.param == "fakeredis":
        client = fakeredis.FakeRedis()
    else:
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    yield client
    client.close()


@_FUZZ
@given(candidate=_events(), key=_keys)
def test_fuzz_publish(fuzz_redis, candidate, key) -> None:
    pub = Publisher(fuzz_redis)
    before = _snapshot(fuzz_redis)
    try:
        candidate = candidate()
        cursor = pub.publish(candidate, idempotency_key=key)  # type: ignore[arg-type]
    except (EventValidationError, ValueError, IdempotencyConflict):
        assert _snapshot(fuzz_redis) == before  # nothing written
        return
    assert isinstance(cursor, Cursor) and cursor.seq >= 1
    frame = fuzz_redis.xrange(KEYS.stream(candidate.project_id), "-", "+")[-1][1][b"f"]
    assert json.loads(frame)["seq"] == cursor.seq


_STAMPS = ("resolved_at", "resumed_at", "expired_at")


@_FUZZ
@given(
    items=st.lists(
        st.tuples(_events(), st.one_of(st.none(), st.sampled_from("ab"), _keys)), max_size=12
    ),
    keyed=st.booleans(),
)
def test_fuzz_publish_many(fuzz_redis, items, keyed) -> None:
    pub = Publisher(fuzz_redis)
    before = _snapshot(fuzz_redis)
    keys = [key for _, key in items] if keyed else None
    try:
        burst = [build() for build, _ in items]
        cursors = pub.publish_many(burst, idempotency_keys=keys)
    except (EventValidationError, ValueError):
        assert _snapshot(fuzz_redis) == before  # one invalid event or key: none published
        return
    except PublishManyError as error:  # only a key reused for another event can refuse here
        assert all(isinstance(e, IdempotencyConflict) for e in error.errors.values())
        cursors = error.cursors
    assert len(cursors) == len(burst)
    keys = keys or [None] * len(burst)
    for event_, key, cursor in zip(burst, keys, cursors, strict=True):
        if cursor is None:
            continue
        # The cursor points at this event in the stream (for a keyed retry: the same event,
        # perhaps stamped at another time).
        entry = fuzz_redis.xrange(KEYS.stream(event_.project_id), f"{cursor.seq}-0", "+", count=1)
        stored = json.loads(entry[0][1][b"f"])
        assert stored.pop("seq") == cursor.seq
        expected = json.loads(encode_event(event_))
        if key is not None:
            for name in _STAMPS:
                stored.pop(name, None)
                expected.pop(name, None)
        assert stored == expected


@settings(max_examples=60, deadline=None)
@given(
    timeout=st.one_of(_anything, st.floats(min_value=-5, max_value=5)),
)
def test_fuzz_timeout(timeout) -> None:
    try:
        pub = Publisher.from_url("redis://127.0.0.1:1/0", timeout=timeout)  # type: ignore[arg-type]
    except ValueError:
        number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
        assert not (number and 0 < timeout < float("inf"))
        assert timeout is not None
        return
    expected = DEFAULT_TIMEOUT if timeout is None else timeout
    assert pub._policy.timeout == float(expected) > 0  # an int is taken as a float
    assert pub._policy.attempt_timeout <= expected  # the bound holds for any timeout
    pub.close()


def test_parse_of_the_script_reply_is_strict() -> None:
    from publisher.core import parse_reply

    assert parse_reply([b"ok", 3, 0]) == ("ok", 3, 0)
    bad_replies = ([b"\xff", 1, 0], [b"ok\n", 1, 0], [b"ok", b"1", 0], [b"ok", 0, 0], [b"ok", 1, 7])
    for bad in (*bad_replies, "x", None, []):
        with pytest.raises(PublishError, match="unexpected reply"):
            parse_reply(bad)


# --- publish_many with idempotency keys (one per event) -----------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_publish_many_with_idempotency_keys_is_exact_on_retry(
    redis_url: str, redis_client, flavour: str
) -> None:
    burst = [event(1, 1), event(2, 1), event(1, 2), event(1, 3), event(2, 2)]
    keys = ["a", "b", None, "c", "d"]

    def publish_many(events, idempotency_keys):
        if flavour == "sync":
            with Publisher.from_url(redis_url) as pub:
                return pub.publish_many(events, idempotency_keys=idempotency_keys)

        async def run():
            async with AsyncPublisher.from_url(redis_url) as pub:
                return await pub.publish_many(events, idempotency_keys=idempotency_keys)

        return asyncio.run(run())

    first = publish_many(burst, keys)
    assert [c.seq for c in first] == [1, 1, 2, 3, 2]  # order within each project kept
    assert stream(redis_client, 1) == [(1, 1), (2, 2), (3, 3)]
    # The whole burst again, keyed events only: each answers with its first cursor.
    keyed = [i for i, k in enumerate(keys) if k is not None]
    again = publish_many([burst[i] for i in keyed], [keys[i] for i in keyed])
    assert again == [first[i] for i in keyed]
    assert stream(redis_client, 1) == [(1, 1), (2, 2), (3, 3)]
    assert stream(redis_client, 2) == [(1, 1), (2, 2)]
    # A key used for another event: that event only is refused, the rest is published.
    with pytest.raises(PublishManyError) as info:
        publish_many([event(1, 9), event(2, 9)], ["a", "new"])
    assert info.value.unpublished == [0]
    assert isinstance(info.value.errors[1], IdempotencyConflict)
    assert info.value.cursors[1] == Cursor(first[1].epoch, 3)
    assert stream(redis_client, 1) == [(1, 1), (2, 2), (3, 3)]


def test_publish_many_checks_its_idempotency_keys_before_sending(pub, redis_client) -> None:
    for keys in (["a"], ["a", "b", "c"], ["a", "has space"], [None, ""], [1, None]):
        with pytest.raises(ValueError, match="idempotency_key"):
            pub.publish_many([event(1, 1), event(1, 2)], idempotency_keys=keys)
    assert redis_client.keys("*") == []


def test_the_first_publish_makes_a_history_a_read_created_permanent(pub, redis_client) -> None:
    """A gateway's read of a never-published project creates an expiring history (seq 0), so
    that its subscriber gets a real cursor; the first event keeps that epoch and makes it
    permanent."""
    redis_client.hset(KEYS.meta(1), mapping={"epoch": "readmade", "seq": 0})
    redis_client.pexpire(KEYS.meta(1), 60_000)
    assert pub.publish(event(1, 1)) == Cursor("readmade", 1)
    assert redis_client.pttl(KEYS.meta(1)) == -1
    assert redis_client.hgetall(KEYS.meta(1)) == {b"epoch": b"readmade", b"seq": b"1"}


# --- age retention over entries another writer left ---------------------------------------------

#: Values of an entry's 't' field that the publish script cannot have written (it writes the
#: digits of a Unix ms; an entry with such a 't' is taken at its word, whoever wrote it).
_foreign_times = st.one_of(
    st.binary(max_size=6).filter(lambda t: not (t.isdigit() and t.isascii())),
    st.sampled_from([b"", b"-5", b"nan", b"inf", b"-inf", b"1e3", b" 7", b"0x10", b"9" * 30]),
)
_foreign_entries = st.lists(
    st.dictionaries(
        st.sampled_from([b"f", b"t", b"x"]),
        st.one_of(_foreign_times, st.just(b'{"type":"x"}')),
        min_size=1,
        max_size=3,
    ),
    min_size=1,
    max_size=4,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    foreign=_foreign_entries,
    first_foreign=st.integers(1, 5),
    old=st.integers(0, 8),
)
def test_age_retention_copes_with_entries_another_writer_left(
    redis_server: RedisServer, foreign, first_foreign, old
) -> None:
    """Entries of the history that the publish script did not write (no 't', or a 't' that is
    not its Unix ms) were read as numbers by the age-retention check, which runs after the
    events are written: the script failed half-way, so the caller got a PublishError for events
    that were in fact stored and relayed (and a retry published them twice). Now such an entry
    counts as young: every publish succeeds, and no real entry younger than ``max_age`` is
    trimmed (the ``old`` first ones are older; foreign ones among them may go with them)."""
    client = redis_server.client()
    client.flushall()
    retention = Retention(max_age=timedelta(hours=1))
    with Publisher(redis_server.client(), retention=retention) as pub:
        for n in range(1, 9):
            pub.publish(event(1, n))
        # Rewrite the history: the first ones made old, a run of foreign ones in their place.
        real = client.xrange(KEYS.stream(1))
        foreign_ids = range(first_foreign, first_foreign + len(foreign))
        client.delete(KEYS.stream(1))
        for n, (entry_id, fields) in enumerate(real, start=1):
            if n in foreign_ids:
                fields = foreign[n - first_foreign]
            elif n <= old:
                fields = {**fields, b"t": b"1"}
            client.xadd(KEYS.stream(1), fields, id=entry_id)
        # 16 more events: the retention check runs at least once, whatever the seq.
        cursors = [pub.publish(event(1, 100 + n)) for n in range(16)]
    assert [c.seq for c in cursors] == list(range(9, 25))
    kept = {int(i.split(b"-")[0]) for i, _ in client.xrange(KEYS.stream(1))}
    young = {n for n in range(old + 1, 25) if n not in foreign_ids}
    assert young <= kept
    if old and first_foreign > old:  # nothing foreign among the old ones: they all went
        assert min(kept) == old + 1
    client.close()


@pytest.mark.parametrize(
    "settings",
    [
        {"retry_guard": timedelta(microseconds=500)},
        {"retry_guard": timedelta(seconds=-1)},
        {"idempotency_window": timedelta(microseconds=500)},
    ],
)
def test_a_window_under_a_millisecond_is_refused_before_anything_is_written(
    redis_client, redis_url: str, settings
) -> None:
    """The publish script remembers a call (idempotency key, retry guard) with ``SET ... PX <ms>``
    after the events are written, and Redis refuses ``PX`` below 1: a window under a millisecond
    (or a negative retry guard) failed every publish half-way, so the caller got a PublishError
    for an event that was stored and relayed (and publishing it again stored it twice). Such a
    window is now a ValueError before anything is sent, and the script itself refuses one before
    its first write."""
    key = "order-1" if "idempotency_window" in settings else None
    with pytest.raises(ValueError, match="at least 1 ms"):
        with Publisher.from_url(redis_url, **settings) as pub:
            pub.publish(event(1, 1), idempotency_key=key)
    assert redis_client.xlen(KEYS.stream(1)) == 0
    # The script on its own (any caller): refused, nothing written.
    from publisher.core import prepare_single
    from schemas import lua

    batch = prepare_single(
        event(1, 1),
        keys=KEYS,
        retention=Retention(),
        publish_command="PUBLISH",
        idempotency_key="order-1",
    )
    args = list(batch.args)
    args[3] = 0  # the window, in ms
    with pytest.raises(redis.ResponseError, match="at least 1 ms"):
        redis_client.eval(lua.PUBLISH, len(batch.keys), *batch.keys, *args)
    assert redis_client.xlen(KEYS.stream(1)) == 0
    assert not redis_client.exists(KEYS.meta(1))
