"""Pytest fixtures for Redis Cluster tests (registered by ``pytest_plugins`` in tests/conftest.py).

- ``redis_cluster``: one 3-master cluster for the whole session (started on first use). Tests may
  migrate slots on it but must leave every node running; anything destructive (kills, failovers)
  takes its own cluster from ``redis_cluster_factory``.
- ``redis_cluster_url``: the session cluster, flushed and healthy, as a ``redis+cluster://`` URL.
- ``redis_cluster_factory``: ``make(masters=3, replicas=1, ...)`` starts a private cluster that is
  torn down after the test, whatever happens in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.redis_cluster import RedisCluster


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    with RedisCluster(masters=3, replicas=0) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisCluster) -> str:
    """A clean session cluster. Fails (rather than hides it) if an earlier test left it broken."""
    redis_cluster.wait_healthy(timeout=15)
    redis_cluster.flushall()
    return redis_cluster.url


@pytest.fixture
def redis_cluster_factory() -> Iterator[Callable[..., RedisCluster]]:
    clusters: list[RedisCluster] = []

    def make(masters: int = 3, replicas: int = 1, **kwargs: object) -> RedisCluster:
        cluster = RedisCluster(masters, replicas, **kwargs)  # type: ignore[arg-type]
        clusters.append(cluster)
        return cluster.start()

    yield make
    for cluster in clusters:
        cluster.close()
