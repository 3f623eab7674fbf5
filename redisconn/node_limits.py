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

__all__ = ["NodeLimits", "node_name", "node_unanswered"]


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


def node_unanswered(client: object, name: str | None) -> None:
    """Tell a Redis Cluster client that its node ``name`` did not answer within a bound of the
    caller's own (an ``asyncio.timeout`` shorter than the client's socket timeout), as redis-py
    tells itself after its own timeout: the client reloads its slot map before its next call,
    asking that node last. Nothing for a standalone client, or without a name.

    redis-py reloads the map only after errors it sees itself; a call it never saw end (the
    caller cancelled it) leaves the map as it was. A master that hung and was failed over to its
    replica was then asked again and again by the callers that bound their calls more tightly
    (presence: a third of its refresh interval) for as long as it hung: its projects' presence
    was not written at their new master at all."""
    if name is None or not isinstance(client, redis.asyncio.cluster.RedisCluster):
        return
    # (redis-py's own, as its error paths use them; older versions lack some.)
    last = getattr(client.nodes_manager, "move_node_to_end_of_cached_nodes", None)
    request = getattr(client, "_request_refresh", None)
    if last is not None:
        last(name)
    if request is not None:  # redis-py 8.2: the next call reloads the map, this node last
        request(last_failed_node_name=name)
    elif last is not None:  # before: the flag its error paths set (the map asked in order)
        client._initialize = True
    # Else nothing: a reload asking the hung node first would wait out the bound of the call
    # that runs it, whichever master that call is for.
