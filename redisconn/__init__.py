"""Redis clients built from URLs, standalone or Cluster, with bounded retries.

The neutral home of what the publisher, the gateway and the tools share about connecting to
Redis: it depends on redis-py only, never on ``publisher`` or ``gateway``, so both can use it
without depending on each other. ``redis://`` / ``rediss://`` / ``unix://`` give a standalone
client; ``redis+cluster://host:port`` (or ``rediss+cluster://``) gives a Redis Cluster client
seeded from that node: one URL means the same thing everywhere.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.backoff import ExponentialBackoff

from redisconn.bounded import BoundedRedis, BoundedRedisCluster, CallRetry
from redisconn.resolving import (
    ResolvingConnection,
    ResolvingSSLConnection,
    WholeReplyUnixConnection,
)

__all__ = [
    "CONNECT_TIMEOUT",
    "RETRIES",
    "SOCKET_TIMEOUT",
    "BoundedRedis",
    "BoundedRedisCluster",
    "CallRetry",
    "ResolvingConnection",
    "ResolvingSSLConnection",
    "SeededRedisCluster",
    "WholeReplyUnixConnection",
    "async_client",
    "defer_refresh_after_timeouts",
    "is_cluster_url",
    "plain_url",
    "sync_client",
]

#: Retries per call for clients made with the default ``retries`` (the gateway's): the first
#: attempt plus 3 retries, with backoff 100 ms, 200 ms, 400 ms (redis-py's ExponentialBackoff
#: sleeps ``base * 2**failures``). redis-py applies a connection's policy around each command AND
#: around the connect and the health check inside it; the asyncio clients built here retry at the
#: outermost level only (:class:`~redisconn.bounded.CallRetry`), so the waits of a hung server do
#: not multiply. Those of a synchronous client still do (16 read timeouts for one call with 3
#: retries): the publisher therefore builds its clients with ``retries=0`` (one connect, one
#: command per call) and retries itself within one deadline (publisher.core.RetryPolicy).
RETRIES = 3
CONNECT_TIMEOUT = 2.0
SOCKET_TIMEOUT = 5.0


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme.endswith("+cluster")


def plain_url(url: str) -> str:
    """A cluster URL as redis-py's cluster client takes it: the scheme without ``+cluster``."""
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
    connect), CONNECT_TIMEOUT and SOCKET_TIMEOUT unless given. Host names are looked up within
    the connect timeout, and each reply is read within the socket timeout in all, not per
    ``recv``, on every kind of URL: TCP and TLS, standalone or Cluster
    (:class:`~redisconn.resolving.ResolvingConnection`, its TLS variant), and Unix sockets
    (:class:`~redisconn.resolving.WholeReplyUnixConnection`)."""
    from redis.retry import Retry

    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries)
    options = _options(connect_timeout, socket_timeout)
    plain = plain_url(url)
    tls = urlsplit(plain).scheme == "rediss"
    if is_cluster_url(url):
        # redis-py's cluster client lets a rediss:// URL replace the connection class given,
        # so the URL says redis:// and the class brings TLS (the URL's TLS options still apply).
        return SeededRedisCluster.from_url(
            urlunsplit(urlsplit(plain)._replace(scheme="redis")) if tls else plain,
            retry=retry,
            connection_class=ResolvingSSLConnection if tls else ResolvingConnection,
            **options,
        )
    if urlsplit(url).scheme == "unix":  # (a path needs no lookup, its replies a bound)
        options["connection_class"] = WholeReplyUnixConnection
    else:
        options["connection_class"] = ResolvingSSLConnection if tls else ResolvingConnection
    return redis.Redis.from_url(
        url,
        retry=retry,
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
        if retries
        else [],
        **options,
    )


class SeededRedisCluster(redis.cluster.RedisCluster):
    """redis-py's synchronous cluster client, reading its command table from a node that
    answers. redis-py reads it while the client is built, from its default node (the master
    of slot 0): with that master hung, building the client (``Publisher.from_url``) raised
    a ``TimeoutError`` every time, although the seed and the other masters answered. Here the
    seed (the URL's node, which has just answered ``CLUSTER SLOTS``) comes first, then every
    other master, the default node last."""

    def __init__(self, *args, **kwargs) -> None:
        url = kwargs.get("url")
        parts = urlsplit(url) if url else None
        host = kwargs.get("host") or (parts.hostname if parts else None)
        port = kwargs.get("port") or (parts.port if parts else None) or 6379
        self._seed_name = f"{host}:{port}" if host else None
        super().__init__(*args, **kwargs)

    def command(self, **kwargs):
        if kwargs or not hasattr(self, "nodes_manager"):
            return super().command(**kwargs)
        manager = self.nodes_manager
        default = manager.default_node
        candidates = (
            [manager.nodes_cache[self._seed_name]] if self._seed_name in manager.nodes_cache else []
        )
        candidates += [n for n in self.get_primaries() if n not in candidates and n is not default]
        candidates += [n for n in (default,) if n is not None and n not in candidates]
        error: Exception | None = None
        for node in candidates:
            try:
                return super().command(target_nodes=node)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                error = exc
        if error is not None:
            raise error
        return super().command()


def async_client(
    url: str,
    *,
    retries: int = RETRIES,
    connect_timeout: float | None = None,
    socket_timeout: float | None = None,
    call_timeout: float | None = None,
    node_connections: int | None = None,
) -> BoundedRedis | BoundedRedisCluster:
    """An asyncio client for ``url`` (same arguments as :func:`sync_client`).

    ``retries`` retries per call, made at the outermost level only (a connect inside a command
    is not retried on its own: see :class:`~redisconn.bounded.CallRetry`), so a hung server
    costs one read timeout per attempt, not the square of the attempts. With ``call_timeout``,
    every call (a command, a registered script's call, a pipeline's ``execute``) ends within
    that many seconds, raising ``redis.exceptions.TimeoutError`` when it runs out, whatever
    happens inside it; retries are made only while the next attempt can end in time. Each
    reply is read within ``socket_timeout`` in all, on TCP and Unix sockets alike (redis-py's
    asyncio connections read a reply under one timeout). Pub/sub reads are not bounded by
    either: see :mod:`redisconn.bounded`.

    ``node_connections``: on Redis Cluster, the connections the client may hold to each node
    (redis-py's pool per node; a call past them fails with "Too many connections", no socket
    opened), redis-py's 100 unless given. Not used for a standalone Redis.
    """
    connect_timeout = CONNECT_TIMEOUT if connect_timeout is None else connect_timeout
    socket_timeout = SOCKET_TIMEOUT if socket_timeout is None else socket_timeout
    retry = CallRetry(
        ExponentialBackoff(cap=0.5, base=0.05),
        retries,
        attempt_timeout=connect_timeout + socket_timeout,
    )
    options = _options(connect_timeout, socket_timeout)
    client: BoundedRedis | BoundedRedisCluster
    if is_cluster_url(url):
        if node_connections is not None:
            options["max_connections"] = node_connections
        client = BoundedRedisCluster.from_url(plain_url(url), retry=retry, **options)
    else:
        client = BoundedRedis.from_url(
            url,
            retry=retry,
            retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
            if retries
            else [],
            **options,
        )
    client.call_timeout = call_timeout
    return client


def defer_refresh_after_timeouts(client: redis.cluster.RedisCluster) -> None:
    """Make a sync cluster client refresh its topology in the background after a timeout.

    After a command times out, redis-py's RedisCluster asks the cluster's nodes for the slot map,
    one node after the other, each with the full read timeout: up to 8.1 before the command
    raises, from 8.2 on in the next command the client runs (of any caller), before it is sent.
    With every node hung (a stopped host, a stalled network) a publish took its timeout plus
    5 s per node. After this call, a refresh that redis-py starts or asks for while handling a
    ``TimeoutError`` runs in a daemon thread instead (one at a time), and the error reaches the
    caller at once, who retries within its own deadline; the next attempt uses the refreshed map
    when it is there. Refreshes after anything else (a refused connection in a failover, MOVED,
    CLUSTERDOWN) still run inline, as redis-py runs them: the nodes answer then. The asyncio
    client needs none of this (its calls are bounded by ``asyncio.timeout``: its callers', and
    its own with ``call_timeout``).
    """
    manager = client.nodes_manager
    refresh = manager.initialize
    running = threading.Lock()

    def after_timeout() -> bool:
        return isinstance(sys.exc_info()[1], redis.exceptions.TimeoutError)

    def in_background(*args, **kwargs) -> None:
        if not running.acquire(blocking=False):
            return  # one refresh is already under way

        def run() -> None:
            try:
                refresh(*args, **kwargs)
            except Exception:  # the caller's next attempt reports what is wrong
                pass
            finally:
                running.release()

        threading.Thread(target=run, name="eventbus-cluster-refresh", daemon=True).start()

    def initialize(*args, **kwargs):
        # redis-py up to 8.1 refreshes in the except clause of the timeout.
        if not after_timeout():
            return refresh(*args, **kwargs)
        in_background(*args, **kwargs)
        return None

    manager.initialize = initialize

    request = getattr(manager, "_request_refresh", None)
    if request is None or not _takes_arguments_of(refresh, request):
        return
    # redis-py 8.2 asks for the refresh there instead, and the next command runs it, inline.
    # Its arguments are initialize's, by name (not in the same order).
    signature = inspect.signature(request)

    def request_refresh(*args, **kwargs):
        if not after_timeout():
            return request(*args, **kwargs)
        in_background(**signature.bind(*args, **kwargs).arguments)
        return None

    manager._request_refresh = request_refresh


def _takes_arguments_of(function: Callable, other: Callable) -> bool:
    """Whether ``function`` accepts by name every argument ``other`` has (none of them ``*args``
    or ``**kwargs``): else a refresh asked for with other's arguments is left to redis-py."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    takes = inspect.signature(function).parameters
    return all(
        parameter.kind in named and name in takes and takes[name].kind in named
        for name, parameter in inspect.signature(other).parameters.items()
    )
