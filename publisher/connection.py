"""Building Redis clients from URLs, standalone or Cluster, with bounded retries.

``redis://`` / ``rediss://`` / ``unix://`` give a standalone client; ``redis+cluster://host:port``
(or ``rediss+cluster://``) gives a Redis Cluster client seeded from that node. The gateway uses
the same functions, so one URL means the same thing everywhere.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.backoff import ExponentialBackoff

__all__ = [
    "AsyncDirectCommands",
    "DirectCommands",
    "async_client",
    "defer_refresh_after_timeouts",
    "is_cluster_url",
    "sync_client",
]

#: Retries per command for clients made with the default ``retries`` (the gateway's): the first
#: attempt plus 3 retries, with backoff 100 ms, 200 ms, 400 ms (redis-py's ExponentialBackoff
#: sleeps ``base * 2**failures``). redis-py applies this policy around each command AND around
#: each connect inside it, so with a hung server the waits multiply. The publisher therefore
#: builds its clients with ``retries=0`` (one connect, one command per call) and retries itself
#: within one deadline (publisher.core.RetryPolicy).
RETRIES = 3
CONNECT_TIMEOUT = 2.0
SOCKET_TIMEOUT = 5.0


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme.endswith("+cluster")


def _plain_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=parts.scheme.removesuffix("+cluster")))


def _options(connect_timeout: float | None, socket_timeout: float | None) -> dict:
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT if connect_timeout is None else connect_timeout,
        "socket_timeout": SOCKET_TIMEOUT if socket_timeout is None else socket_timeout,
        "health_check_interval": 30,
    }


def sync_client(
    url: str,
    *,
    retries: int = RETRIES,
    connect_timeout: float | None = None,
    socket_timeout: float | None = None,
) -> redis.Redis | redis.cluster.RedisCluster:
    """A synchronous client for ``url``: ``retries`` retries per command (0: one attempt, one
    connect), CONNECT_TIMEOUT and SOCKET_TIMEOUT unless given."""
    from redis.retry import Retry

    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries)
    options = _options(connect_timeout, socket_timeout)
    if is_cluster_url(url):
        return redis.cluster.RedisCluster.from_url(_plain_url(url), retry=retry, **options)
    return redis.Redis.from_url(
        url,
        retry=retry,
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
        if retries
        else [],
        **options,
    )


def async_client(
    url: str,
    *,
    retries: int = RETRIES,
    connect_timeout: float | None = None,
    socket_timeout: float | None = None,
) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
    """An asyncio client for ``url`` (same arguments as :func:`sync_client`)."""
    from redis.asyncio.retry import Retry

    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries)
    options = _options(connect_timeout, socket_timeout)
    if is_cluster_url(url):
        return redis.asyncio.cluster.RedisCluster.from_url(_plain_url(url), retry=retry, **options)
    return redis.asyncio.Redis.from_url(
        url,
        retry=retry,
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
        if retries
        else [],
        **options,
    )


def defer_refresh_after_timeouts(client: redis.cluster.RedisCluster) -> None:
    """Make a sync cluster client refresh its topology in the background after a timeout.

    After a command times out, redis-py's RedisCluster asks the cluster's nodes for the slot map
    before it raises, one node after the other, each with the full read timeout: with every node
    hung (a stopped host, a stalled network) a publish took its timeout plus 5 s per node. After
    this call, a refresh that redis-py starts while handling a ``TimeoutError`` runs in a daemon
    thread instead (one at a time), and the error reaches the caller at once, who retries
    within its own deadline; the next attempt uses the refreshed map when it is there. Refreshes
    after anything else (a refused connection in a failover, MOVED, CLUSTERDOWN) still run inline,
    as before: the nodes answer then. The asyncio client needs none of this (its calls are
    bounded by ``asyncio.timeout``).
    """
    manager = client.nodes_manager
    refresh = manager.initialize
    running = threading.Lock()

    def initialize(*args, **kwargs):
        if not isinstance(sys.exc_info()[1], redis.exceptions.TimeoutError):
            return refresh(*args, **kwargs)
        if not running.acquire(blocking=False):
            return None  # one refresh is already under way

        def run() -> None:
            try:
                refresh(*args, **kwargs)
            except Exception:  # the caller's next attempt reports what is wrong
                pass
            finally:
                running.release()

        threading.Thread(target=run, name="eventbus-cluster-refresh", daemon=True).start()
        return None

    manager.initialize = initialize


class DirectCommands:
    """Run pre-packed commands on connections held outside redis-py's command layer.

    ``Redis.execute_command`` takes a connection from the pool and gives it back on every call,
    and the pool checks each connection it hands out with a ``poll()`` system call, besides
    recording metrics: on a single ``publish`` that was about 30 µs of a 100 µs round trip on our
    benchmark machine. A publisher keeps its own stack of idle connections instead (taken from
    the client's pool once, so the pool's limits and connection settings, such as password,
    TLS, database and timeouts, still apply) and runs each call as one send and one read.

    This lane makes one attempt and no retry: on a connection error or timeout the connection is
    dropped and the error raised, and the caller repeats the call (the publish script's retry
    guard makes that repeat safe). Taking a new connection from the pool connects with the
    client's own connect policy (one connect for the clients the publisher builds). Reply errors
    leave the connection in a clean state and keep it.

    Thread-safe: a connection is used by one call at a time (``list.pop``/``append`` are atomic).
    A forked child starts with no idle connections, never sharing its parent's sockets.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._idle: list[redis.connection.AbstractConnection] = []
        _lanes.add(self)

    @staticmethod
    def supports(client: object) -> bool:
        """Standalone clients with a pool of their own (not a single-connection client)."""
        return (
            isinstance(client, redis.Redis)
            and client.connection is None
            and isinstance(client.connection_pool, redis.ConnectionPool)
        )

    def execute(self, packed: bytes):
        """Send one packed command and return its parsed reply (raises its error reply)."""
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self._pool.get_connection()
        try:
            conn.send_packed_command((packed,))
            reply = conn.read_response()
        except redis.exceptions.ResponseError:
            self._idle.append(conn)  # a complete error reply: the connection is still in step
            raise
        except BaseException:
            conn.disconnect()
            self._pool.release(conn)
            raise
        self._idle.append(conn)
        return reply

    def close(self) -> None:
        """Give the idle connections back to the client's pool."""
        while self._idle:
            self._pool.release(self._idle.pop())

    def _forget(self) -> None:
        self._idle = []


class AsyncDirectCommands:
    """:class:`DirectCommands` for ``redis.asyncio`` clients (same rules; a call cancelled
    half-way drops its connection, which may hold half a reply)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._pool = client.connection_pool
        self._idle: list[redis.asyncio.connection.AbstractConnection] = []
        _lanes.add(self)

    @staticmethod
    def supports(client: object) -> bool:
        return (
            isinstance(client, redis.asyncio.Redis)
            and client.connection is None
            and isinstance(client.connection_pool, redis.asyncio.ConnectionPool)
        )

    async def execute(self, packed: bytes):
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = await self._pool.get_connection()
        try:
            await conn.send_packed_command((packed,))
            reply = await conn.read_response()
        except redis.exceptions.ResponseError:
            self._idle.append(conn)
            raise
        except BaseException:
            await conn.disconnect(nowait=True)
            await self._pool.release(conn)
            raise
        self._idle.append(conn)
        return reply

    async def aclose(self) -> None:
        while self._idle:
            await self._pool.release(self._idle.pop())

    def _forget(self) -> None:
        self._idle = []


_lanes: weakref.WeakSet[DirectCommands | AsyncDirectCommands] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lane in list(_lanes):
        lane._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)
