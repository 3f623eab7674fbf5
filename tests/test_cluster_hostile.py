"""Redis Cluster with one shard in trouble: the projects of the other shards are unaffected.

Real ``redis-server`` nodes (tests/support/redis_cluster.py), one of them hung with ``SIGSTOP``
(a paused VM, a stuck host: its sockets stay open, nothing is answered). The cluster runs with
``cluster-require-full-coverage no``, so the other masters keep serving their slots, as they do
anyway with the default until the hung node is declared failed (``cluster-node-timeout``).
"""

from __future__ import annotations

import asyncio

import pytest
import redis.exceptions

from gateway.metrics import Metrics
from gateway.presence_store import PRESENCE_READS, PresenceStore
from gateway.store import CLUSTER_CONCURRENCY, ForeignValues, HistoryStore, StoreUnavailable
from redisconn import async_client
from schemas.keys import Keys
from tests.support.redis_cluster import RedisCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

KEYS = Keys()
PARTIAL = ["--cluster-require-full-coverage", "no"]


@pytest.fixture
def partial_cluster(redis_cluster_factory) -> RedisCluster:
    """3 masters, no replica; a failed master leaves the others serving their slots."""
    return redis_cluster_factory(3, 0, extra_args=PARTIAL)


async def test_history_reads_of_a_healthy_shard_do_not_wait_behind_a_hung_one(
    partial_cluster: RedisCluster,
):
    """A hung master holds each read of its projects until the call's bound. Reads are limited
    per shard, not for the whole cluster: before, CLUSTER_CONCURRENCY reads of the hung shard's
    projects (a reconnect storm of its clients) took every place, and a read of a project on a
    healthy master waited the hung ones' bound behind them (10 s in the gateway, twice its
    5 s subscribe_timeout: its clients got 'unavailable' for a shard that answers)."""
    cluster = partial_cluster
    spread = cluster.projects_by_master(range(1, 5000))
    hung, healthy = cluster.masters()[:2]
    stuck_projects = spread[hung][: CLUSTER_CONCURRENCY + 8]
    assert len(stuck_projects) == CLUSTER_CONCURRENCY + 8
    project = spread[healthy][0]
    client = async_client(cluster.url, call_timeout=4.0)
    store = HistoryStore(client, KEYS, ForeignValues(Metrics()))
    try:
        await store.snapshot(project)  # the slot map is loaded, a connection to each node made
        await store.snapshot(stuck_projects[0])
        hung.freeze()
        try:
            stuck = [asyncio.create_task(store.snapshot(p)) for p in stuck_projects]
            await asyncio.sleep(0)  # every one of them has its place (or waits for one)
            read = await store.snapshot(project)
            assert read.top == 0
            assert not any(task.done() for task in stuck), "the healthy read waited for them"
            for outcome in await asyncio.gather(*stuck, return_exceptions=True):
                assert isinstance(outcome, StoreUnavailable)
        finally:
            hung.thaw()
    finally:
        await client.aclose()


async def test_presence_reads_of_a_healthy_shard_do_not_wait_behind_a_hung_one(
    partial_cluster: RedisCluster,
):
    """The same for presence reads (at most PRESENCE_READS at once): per master, so that the
    dashboards of a hung shard's projects do not hold the presence of every other project."""
    cluster = partial_cluster
    spread = cluster.projects_by_master(range(1, 5000))
    hung, healthy = cluster.masters()[:2]
    stuck_projects = spread[hung][: PRESENCE_READS + 4]
    project = spread[healthy][0]
    client = async_client(cluster.url, call_timeout=4.0)
    store = PresenceStore(client, "pod1", publish_command="SPUBLISH")
    try:
        await store.read(project)
        await store.read(stuck_projects[0])
        hung.freeze()
        try:
            stuck = [asyncio.create_task(store.read(p)) for p in stuck_projects]
            await asyncio.sleep(0)
            assert await store.read(project) == {}
            assert not any(task.done() for task in stuck), "the healthy read waited for them"
            for outcome in await asyncio.gather(*stuck, return_exceptions=True):
                assert isinstance(outcome, redis.exceptions.TimeoutError)
        finally:
            hung.thaw()
    finally:
        await client.aclose()
