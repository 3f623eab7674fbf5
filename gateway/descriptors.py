"""The descriptor budget of a gateway process (pure arithmetic; docs/operations.md,
"Descriptors").

Every socket the gateway holds is a descriptor: its clients' (at most ``--max-connections`` plus
the admission slack), its own (:data:`DESCRIPTOR_RESERVE`), and, on Redis Cluster, the sockets it
may hold to each master (:data:`REDIS_SOCKETS_PER_MASTER`). ``--max-connections`` is lowered to
what fits the descriptor limit, so that a full pod refuses connections before anything runs out
of descriptors: accept() (asyncio logs an error and stops accepting for a second) or a Redis
connect (a subscribe answered ``unavailable``).
"""

from __future__ import annotations

__all__ = [
    "DESCRIPTOR_RESERVE",
    "NODE_CONNECTIONS",
    "REDIS_SOCKETS_PER_MASTER",
    "fitted_connections",
]

#: Descriptors a gateway needs besides its clients: its own (the listening socket, Redis
#: connections, epoll, log files, the interpreter's: 9 when idle), and the sockets a burst has
#: accepted but the admission bound has not dropped yet (up to three accept batches, 96 with
#: asyncio: see ``gateway.server.ACCEPT_BATCH``). A flood of 4,000 sockets at once at a full
#: pod first made accept() fail with a reserve of 100. Sized for a standalone Redis: on Redis
#: Cluster each master adds :data:`REDIS_SOCKETS_PER_MASTER`.
DESCRIPTOR_RESERVE = 256

#: Connections the gateway's Redis Cluster client may hold to one master at once (redis-py's
#: pool per node: one more raises "Too many connections", it never opens one). The calls limited
#: per master fit below it: ``gateway.store.CLUSTER_CONCURRENCY`` history reads and
#: ``gateway.presence_store.PRESENCE_READS`` presence reads, with room for the rest (presence
#: pipelines, cursor checks, readiness pings, the revocation watcher).
NODE_CONNECTIONS = 100

#: Sockets the gateway may hold to each master of a Redis Cluster: its client's pool there,
#: and the master's sharded pub/sub link (``gateway.cluster_pubsub.ShardLink``).
REDIS_SOCKETS_PER_MASTER = NODE_CONNECTIONS + 1


def fitted_connections(
    max_connections: int, slack: int, descriptor_limit: int, masters: int = 0
) -> int:
    """The most connections (>= 1) whose sockets, plus ``slack``, the reserve and the sockets
    to each of ``masters`` Redis Cluster masters (0: a standalone Redis), fit the descriptor
    limit."""
    room = descriptor_limit - slack - DESCRIPTOR_RESERVE - masters * REDIS_SOCKETS_PER_MASTER
    return max(1, min(max_connections, room))
