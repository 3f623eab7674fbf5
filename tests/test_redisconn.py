"""redisconn's asyncio clients: retries once per call, not once per nesting level of redis-py,
and calls bounded as a whole (``call_timeout``) whatever the socket timeouts are; a sync cluster
client's topology refresh after a timeout, in the background."""

from __future__ import annotations

import queue
import threading

import pytest
import redis.asyncio.retry
import redis.cluster
import redis.exceptions
from redis.backoff import NoBackoff

from redisconn import _takes_arguments_of, async_client, defer_refresh_after_timeouts
from redisconn.bounded import CallRetry, within
from tests.support.tcp_proxy import FreezableProxy


async def _ignore(*args) -> None:
    pass


class Failing:
    """An operation that fails ``failures`` times with ``error``, then answers "ok"."""

    def __init__(self, failures: float, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


async def nested_attempts(retry: redis.asyncio.retry.Retry) -> tuple[int, int]:
    """A command whose every attempt runs a connect with the same policy (what redis-py does),
    against a server that never answers: (outer attempts, inner attempts)."""
    inner = Failing(float("inf"), redis.exceptions.TimeoutError("Timeout reading"))
    outer_calls = 0

    async def command() -> str:
        nonlocal outer_calls
        outer_calls += 1
        return await retry.call_with_retry(inner, _ignore)

    with pytest.raises(redis.exceptions.TimeoutError):
        await retry.call_with_retry(command, _ignore)
    return outer_calls, inner.calls


async def test_a_nested_run_makes_one_attempt_and_the_outer_run_retries():
    # redis-py's own policy multiplies: 4 commands, each with 4 connects.
    assert await nested_attempts(redis.asyncio.retry.Retry(NoBackoff(), 3)) == (4, 16)
    assert await nested_attempts(CallRetry(NoBackoff(), 3, attempt_timeout=1.0)) == (4, 4)


async def test_quick_failures_are_retried_within_a_bounded_call():
    """A refused connection while Redis restarts fails at once: retried, the call succeeds."""
    retry = CallRetry(NoBackoff(), 3, attempt_timeout=0.01)
    refused = Failing(2, redis.exceptions.ConnectionError("Connection refused"))
    assert await within(10, retry.call_with_retry(refused, _ignore)) == "ok"
    assert refused.calls == 3


async def test_no_retry_is_made_that_could_not_end_before_the_calls_deadline():
    retry = CallRetry(NoBackoff(), 3, attempt_timeout=20)
    refused = Failing(float("inf"), redis.exceptions.ConnectionError("Connection refused"))
    with pytest.raises(redis.exceptions.ConnectionError):
        await within(10, retry.call_with_retry(refused, _ignore))
    assert refused.calls == 1
    # Outside a bounded call, only the number of retries limits them.
    refused.calls = 0
    with pytest.raises(redis.exceptions.ConnectionError):
        await retry.call_with_retry(refused, _ignore)
    assert refused.calls == 4


@pytest.fixture
def hung_server():
    """A server that accepts connections and never answers (a stopped Redis, a dead proxy)."""
    proxy = FreezableProxy("127.0.0.1", 9)  # frozen: never connects to its target
    proxy.freeze()
    yield proxy
    proxy.close()


async def test_a_hung_server_costs_one_read_timeout_per_attempt(hung_server):
    """redis-py retried the connect inside each attempt, and the health check inside each
    connect, with the full policy: 16 connections, 16 read timeouts for 3 retries."""
    client = async_client(f"redis://127.0.0.1:{hung_server.port}/0", retries=3, socket_timeout=0.2)
    try:
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.get("key")
    finally:
        await client.aclose()
    assert hung_server.accepted == 4


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cluster", [False, True], ids=["standalone", "cluster"])
async def test_every_call_ends_within_the_call_timeout_whatever_the_socket_timeouts(
    hung_server, cluster
):
    """Read and connect timeouts of a minute, a call bound of 0.3 s: a command, a script and a
    pipeline (on a cluster: each loading the slot map first) each end with redis-py's
    TimeoutError, no outer asyncio.timeout needed."""
    scheme = "redis+cluster" if cluster else "redis"
    client = async_client(
        f"{scheme}://127.0.0.1:{hung_server.port}",
        connect_timeout=60,
        socket_timeout=60,
        call_timeout=0.3,
    )
    script = client.register_script("return 1")
    try:
        with pytest.raises(redis.exceptions.TimeoutError, match=r"within 0\.3 s"):
            await client.get("key")
        with pytest.raises(redis.exceptions.TimeoutError, match=r"within 0\.3 s"):
            await script(keys=["key"])
        with pytest.raises(redis.exceptions.TimeoutError, match=r"within 0\.3 s"):
            async with client.pipeline(transaction=False) as pipe:
                pipe.get("key")
                await pipe.execute()
    finally:
        await client.aclose()


# --- synchronous connections: the host-name lookup inside the connect timeout ------------------


@pytest.fixture
def stuck_lookups(monkeypatch):
    """``socket.getaddrinfo`` never answering for ``*.stuck.test`` (until the test ends);
    addresses are looked up as usual. Yields the hosts asked for, in order."""
    import socket
    import threading

    real, release, asked = socket.getaddrinfo, threading.Event(), []

    def getaddrinfo(host, *args, **kwargs):
        asked.append(host)
        if host.endswith(".stuck.test"):
            release.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield asked
    release.set()


def test_a_lookup_is_waited_for_at_most_the_timeout(stuck_lookups):
    import socket

    from redisconn.resolving import resolve

    with pytest.raises(socket.gaierror, match=r"no answer from the resolver for 'a\.stuck\.test'"):
        resolve("a.stuck.test", 6379, 0, 0.05)
    assert resolve("127.0.0.1", 6379, 0, 0.05)[0][4] == ("127.0.0.1", 6379)
    assert resolve("::1", 6379, 0, 0.05)[0][4][:2] == ("::1", 6379)


def test_lookups_still_waiting_are_capped(stuck_lookups, monkeypatch):
    """Each lookup the resolver never answers holds a thread until it gives up: past the cap a
    connect fails at once instead of starting one more."""
    import socket

    import redisconn.resolving
    from redisconn.resolving import resolve

    monkeypatch.setattr(redisconn.resolving, "MAX_PENDING_LOOKUPS", 2)
    for name in ("a.stuck.test", "b.stuck.test"):
        with pytest.raises(socket.gaierror, match="no answer from the resolver"):
            resolve(name, 6379, 0, 0.05)
    with pytest.raises(socket.gaierror, match="2 lookups still wait for the resolver"):
        resolve("c.stuck.test", 6379, 0, 60)
    assert "c.stuck.test" not in stuck_lookups
    assert resolve("127.0.0.1", 6379, 0, 60)  # an address needs no lookup: not capped


# --- synchronous connections: each reply read within the read timeout in all -----------------


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:1/0", "rediss://localhost:1", "unix:///nonexistent/redis.sock"],
    ids=["tcp", "tls", "unix"],
)
def test_every_sync_client_reads_each_reply_within_its_read_timeout(url):
    """The connections of every standalone kind bound a reply as a whole (tests/
    test_redis_protocol.py trickles replies over TCP and a Unix socket); before, ``unix://``
    ones bounded each ``recv`` only. Nothing is connected here."""
    from redisconn import sync_client
    from redisconn.resolving import WholeReplyParser

    client = sync_client(url, retries=0)
    try:
        connection = client.connection_pool.make_connection()
        assert isinstance(connection._parser, WholeReplyParser), type(connection)
    finally:
        client.close()


def test_a_sync_cluster_client_reads_each_reply_within_its_read_timeout(redis_cluster_url):
    from redisconn import sync_client
    from redisconn.resolving import ResolvingConnection, WholeReplyParser

    client = sync_client(redis_cluster_url, retries=0)
    try:
        for node in client.get_nodes():
            connection = node.redis_connection.connection_pool.make_connection()
            assert isinstance(connection, ResolvingConnection)
            assert isinstance(connection._parser, WholeReplyParser)
    finally:
        client.close()


class Refreshes:
    """A sync cluster client's nodes manager, as far as defer_refresh_after_timeouts sees it:
    ``initialize`` is the refresh (it records which thread ran it and for which failed node).
    ``asks`` is True for redis-py 8.2 and later, where an error asks for the refresh
    (``_request_refresh``) and the client's next command runs it before it is sent
    (:meth:`next_command`); up to 8.1 the error handler calls ``initialize`` itself."""

    def __init__(self, asks: bool) -> None:
        self.nodes_manager = self  # the client and its manager are one object here
        self.ran: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self.asked: dict | None = None
        if not asks:
            self._request_refresh = None

    def initialize(
        self,
        additional_startup_nodes_info=None,
        disconnect_startup_nodes_pools=True,
        last_failed_node_name=None,
    ) -> None:
        self.ran.put((threading.current_thread().name, last_failed_node_name))

    def _request_refresh(
        self,
        additional_startup_nodes_info=None,
        last_failed_node_name=None,
        disconnect_startup_nodes_pools=True,
    ) -> None:
        self.asked = {"last_failed_node_name": last_failed_node_name}

    def command_fails(self, error: Exception) -> None:
        try:
            raise error
        except redis.exceptions.RedisError:
            if self._request_refresh is None:
                self.initialize(last_failed_node_name="node-1")
            else:
                self._request_refresh(last_failed_node_name="node-1")

    def next_command(self) -> None:
        if self.asked is not None:
            asked, self.asked = self.asked, None
            self.initialize(**asked)


@pytest.mark.parametrize("asks", [False, True], ids=["redis-py<=8.1", "redis-py>=8.2"])
def test_a_sync_cluster_client_refreshes_in_the_background_after_a_timeout(asks):
    """With every node hung, a refresh run in a caller's command costs a read timeout per node:
    after a timeout it runs in a thread of its own, neither in the failed command nor in the next
    one (redis-py 8.2 moved it there)."""
    client = Refreshes(asks)
    defer_refresh_after_timeouts(client)
    client.command_fails(redis.exceptions.TimeoutError("Timeout reading from node-1"))
    client.next_command()
    assert client.ran.get(timeout=10) == ("eventbus-cluster-refresh", "node-1")


@pytest.mark.parametrize("asks", [False, True], ids=["redis-py<=8.1", "redis-py>=8.2"])
def test_a_sync_cluster_client_refreshes_inline_after_a_refused_connection(asks):
    """A refused connection (a failover): the nodes answer, and the next attempt is to use the
    new slot map, so the refresh runs where redis-py runs it."""
    client = Refreshes(asks)
    defer_refresh_after_timeouts(client)
    client.command_fails(redis.exceptions.ConnectionError("Connection refused"))
    client.next_command()
    assert client.ran.get_nowait() == (threading.current_thread().name, "node-1")


def test_the_installed_redis_py_asks_for_refreshes_in_a_way_that_can_be_deferred():
    """The stand-in above is redis-py's own protocol: a ``_request_refresh`` whose arguments
    ``initialize`` takes by name (else the refresh after a timeout runs in the next command)."""
    manager = redis.cluster.NodesManager
    request = getattr(manager, "_request_refresh", None)
    assert request is None or _takes_arguments_of(manager.initialize, request)
