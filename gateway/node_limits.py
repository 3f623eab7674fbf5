"""Limits on the Redis calls in flight at once, per Redis Cluster master.

A limit for the whole cluster lets a hung master (its sockets open, nothing answered) take every
place: each call of its projects holds one until the call's bound, and the calls of the projects
the other masters serve wait behind them, past their callers' timeouts, for shards that answer.
:class:`NodeLimits` keeps one semaphore per master instead (one in all for a standalone Redis).
"""

from __future__ import annotations

import asyncio

import redis.asyncio.cluster
import redis.exceptions

__all__ = ["NodeLimits", "node_name"]


class NodeLimits:
    """``limit`` calls at once per master of ``client`` (a standalone client: ``limit`` in
    all). The master is the one the client's slot map names for the key when the call starts:
    a redirect (MOVED, ASK) during the call does not move its place. Before the map is loaded
    (the client's first call), the calls share one semaphore of their own."""

    def __init__(self, client: object, limit: int) -> None:
        self.limit = limit
        self._client = client if isinstance(client, redis.asyncio.cluster.RedisCluster) else None
        #: By node name (None: standalone, or the master is not known).
        self._places: dict[str | None, asyncio.Semaphore] = {}

    def for_key(self, key: str) -> asyncio.Semaphore:
        name = node_name(self._client, key) if self._client is not None else None
        places = self._places.get(name)
        if places is None:
            places = self._places[name] = asyncio.Semaphore(self.limit)
        return places


def node_name(client: object, key: str) -> str | None:
    """The name (``host:port``) of the master a Redis Cluster client routes ``key`` to; None
    for a standalone client, or when its slot map is not loaded or has no master for the key."""
    if not isinstance(client, redis.asyncio.cluster.RedisCluster):
        return None
    try:
        return client.get_node_from_key(key).name
    except (redis.exceptions.RedisClusterException, LookupError, AttributeError):
        return None
