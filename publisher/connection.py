"""Building Redis clients from URLs, standalone or Cluster, with bounded retries.

``redis://`` / ``rediss://`` / ``unix://`` give a standalone client; ``redis+cluster://host:port``
(or ``rediss+cluster://``) gives a Redis Cluster client seeded from that node. The gateway uses
the same functions, so one URL means the same thing everywhere.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.backoff import ExponentialBackoff

__all__ = ["async_client", "is_cluster_url", "sync_client"]

#: Retries per command before a publish gives up with ``PublisherUnavailable``: the first attempt
#: plus 3 retries, with backoff 100 ms, 200 ms, 400 ms (redis-py's ExponentialBackoff sleeps
#: ``base * 2**failures``), i.e. about 0.7 s when the server refuses connections, plus up to
#: CONNECT_TIMEOUT per attempt when the host does not answer, or SOCKET_TIMEOUT per attempt when
#: a connected server hangs (worst case about 4 x 5 s + 0.7 s).
RETRIES = 3
CONNECT_TIMEOUT = 2.0
SOCKET_TIMEOUT = 5.0


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme.endswith("+cluster")


def _plain_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=parts.scheme.removesuffix("+cluster")))


def _options() -> dict:
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": SOCKET_TIMEOUT,
        "health_check_interval": 30,
    }


def sync_client(url: str) -> redis.Redis | redis.cluster.RedisCluster:
    """A synchronous client for ``url``."""
    if is_cluster_url(url):
        return redis.cluster.RedisCluster.from_url(
            _plain_url(url),
            retry=redis.retry.Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
            **_options(),
        )
    return redis.Redis.from_url(
        url,
        retry=redis.retry.Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        **_options(),
    )


def async_client(url: str) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
    """An asyncio client for ``url``."""
    from redis.asyncio.retry import Retry

    if is_cluster_url(url):
        return redis.asyncio.cluster.RedisCluster.from_url(
            _plain_url(url),
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
            **_options(),
        )
    return redis.asyncio.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        **_options(),
    )
