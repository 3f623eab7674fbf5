"""A publisher whose Redis address points at a replica for a while (a managed-Redis failover, a
DNS switch): every write is answered ``READONLY``, the script did not run. That is "try again
later" (``PublisherUnavailable``, HTTP 503 ``unavailable``), not a refusal of the script (a damaged
key, 502), and each retry connects afresh, since a connection to a replica stays one to the
replica however the address resolves by then. Private redis-servers: one is made a replica."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from publisher import AsyncPublisher, Publisher, PublisherUnavailable
from schemas.keys import Keys
from tests.support.redis_server import RedisServer
from tests.test_http_api import EXPIRED, Api, serving_app
from tests.test_http_api_reads import ReadApi, read_credentials
from tests.test_publisher import resolved

KEYS = Keys()


@pytest.fixture
def pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    """Two redis-servers, ``(master, replica)``: the second is the replica of the first."""
    with RedisServer() as master, RedisServer() as server:
        client = server.client()
        client.replicaof("127.0.0.1", master.port)
        client.close()
        yield master, server


@pytest.fixture
def replica(pair) -> RedisServer:
    return pair[1]


def _readonly_refusals(client: redis.Redis) -> int:
    return int(client.info("errorstats").get("errorstat_READONLY", {"count": 0})["count"])


@contextlib.contextmanager
def after_a_refusal(server: RedisServer, then: Callable[[redis.Redis], None]) -> Iterator[None]:
    """Calls ``then`` (with a client of the replica) as soon as the replica has refused a write
    ``READONLY``, during the block."""
    client = server.client()
    stop = threading.Event()

    def promote() -> None:
        while not stop.is_set() and _readonly_refusals(client) == 0:
            time.sleep(0.005)
        if not stop.is_set():
            then(client)

    thread = threading.Thread(target=promote, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        client.close()


def _written(server: RedisServer, project: int = 1) -> int:
    client = server.client()
    try:
        return client.xlen(KEYS.stream(project))
    finally:
        client.close()


def test_a_publish_to_a_replica_is_unavailable_within_the_timeout(replica) -> None:
    """Before: ``PublishError`` at once ("a damaged key"), nothing retried."""
    client = replica.client()
    before = client.info("stats")["total_connections_received"]
    with Publisher.from_url(replica.url, timeout=1.5) as publisher:
        started = time.monotonic()
        with pytest.raises(PublisherUnavailable, match="read only replica"):
            publisher.publish(resolved(1))
        assert time.monotonic() - started < 2
    # Each attempt asked on a connection of its own: after a failover the address's new
    # server answers the next one.
    assert _readonly_refusals(client) >= 2
    after = client.info("stats")["total_connections_received"]
    assert after - before >= _readonly_refusals(client)
    client.close()


def _promote(client: redis.Redis) -> None:
    client.replicaof("NO", "ONE")


def test_a_replica_promoted_during_the_retries_gets_the_publish_once(replica) -> None:
    with after_a_refusal(replica, _promote), Publisher.from_url(replica.url, timeout=5) as p:
        cursor = p.publish(resolved(1))
    assert cursor.seq == 1
    assert _written(replica) == 1


def test_an_address_that_resolves_to_the_master_again_gets_the_retry(pair, monkeypatch) -> None:
    """The failover as a managed Redis or a DNS switch makes it: the replica stays a replica and
    the address resolves to the master from then on (here: a name resolved by a patched
    ``getaddrinfo``). Before the retries reconnected, they asked the replica on its connection
    until the timeout."""
    master, replica = pair
    points_at = {"port": replica.port}
    resolve = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "redis.failover.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", points_at["port"]))]
        return resolve(host, port, *args, **kwargs)

    def switch(_: redis.Redis) -> None:
        points_at["port"] = master.port

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with (
        Publisher.from_url("redis://redis.failover.test:6379/0", timeout=5) as publisher,
        after_a_refusal(replica, switch),
    ):
        cursor = publisher.publish(resolved(1))
    monkeypatch.undo()
    assert cursor.seq == 1
    assert _written(master) == 1


async def test_an_async_publish_to_a_replica_is_unavailable_then_published_once(replica) -> None:
    publisher = AsyncPublisher.from_url(replica.url, timeout=1.5)
    try:
        with pytest.raises(PublisherUnavailable, match="read only replica"):
            await publisher.publish(resolved(1))
        with after_a_refusal(replica, _promote):
            cursor = await publisher.publish(resolved(1))
        assert cursor.seq == 1
        assert _written(replica) == 1
    finally:
        await publisher.aclose()


async def test_the_http_api_answers_a_replica_503_unavailable(replica) -> None:
    """Before: 502 ``publish_failed``."""
    publisher = AsyncPublisher.from_url(replica.url, timeout=1)
    async with serving_app(publisher, read_credentials()) as (_, _, port):
        api = Api(port)
        status, headers, body = await api.post(1, EXPIRED)
        assert (status, body["error"]["code"]) == (503, "unavailable"), body
        assert headers["retry-after"] == "1"
        status, _, body = await api.post(1, [EXPIRED, EXPIRED])
        assert (status, body["error"]["code"]) == (503, "unavailable"), body
        # The history read of a project without history writes one: refused too (was 502
        # read_failed). Presence is a plain read: a replica answers it.
        status, headers, body = await ReadApi(port).get("/v1/projects/1/events")
        assert (status, body["error"]["code"]) == (503, "unavailable"), body
        assert (await ReadApi(port).get("/v1/projects/1/presence"))[0] == 200
        with after_a_refusal(replica, _promote):
            status, _, body = await api.post(1, EXPIRED)
        assert status == 200, body
    assert _written(replica) == 1


@pytest.mark.parametrize("in_order", [False, True])
def test_publish_many_to_a_replica_is_unavailable_then_published_once(replica, in_order) -> None:
    """Both paths: a pipeline of script calls, and ``in_order``'s MULTI/EXEC, in which every
    call is refused ``READONLY`` (none ran)."""
    events = [resolved(1, n) for n in range(1, 4)]
    with Publisher.from_url(replica.url, timeout=1) as publisher:
        with pytest.raises(PublisherUnavailable, match="read only replica"):
            publisher.publish_many(events, in_order=in_order)
        with after_a_refusal(replica, _promote):
            cursors = publisher.publish_many(events, in_order=in_order)
    assert [cursor.seq for cursor in cursors] == [1, 2, 3]
    assert _written(replica) == 3
