"""Gateway processes on a real Redis Cluster: sharded pub/sub routed per master, slot migrations
and master failovers followed, full sequences compared end to end.

Every test runs real ``python -m gateway`` processes against a local cluster (see
``tests/support/redis_cluster.py``), publishes identifiable events with several publishers, and
checks each client's complete record with :func:`check_delivery` against what Redis finally holds.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway.cluster_pubsub import SlotMap, channel_slot
from schemas.keys import Keys
from tests.support.gateway_process import GatewayGroup, GatewayProcess
from tests.support.redis_cluster import RedisCluster
from tests.support.ws_client import (
    Publishers,
    ResumingClient,
    stop_clients,
    verify_clients,
    wait_live,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KEYS = Keys()


@pytest.fixture
def gateways():
    with GatewayGroup() as group:
        yield group


class TestSlotMap:
    """The pure part of the cluster pub/sub routing."""

    REPLY = [
        [0, 5460, [b"10.0.0.1", 7000, b"id1"], [b"10.0.0.4", 7003, b"id4"]],
        [5461, 10922, [b"", 7001, b"id2"]],
        [10923, 16383, [b"?", 7002, b"id3"]],
    ]

    def test_owner_of_each_range_and_its_edges(self):
        slots = SlotMap.from_cluster_slots(self.REPLY, "10.0.0.9")
        assert slots.owner(0) == slots.owner(5460) == ("10.0.0.1", 7000)
        assert slots.owner(5461) == slots.owner(10922) == ("10.0.0.9", 7001)  # empty host
        assert slots.owner(10923) == slots.owner(16383) == ("10.0.0.9", 7002)  # unknown host
        assert slots.masters == {("10.0.0.1", 7000), ("10.0.0.9", 7001), ("10.0.0.9", 7002)}

    def test_uncovered_slots_have_no_owner(self):
        slots = SlotMap.from_cluster_slots(self.REPLY[1:2], "h")
        assert slots.owner(0) is None and slots.owner(16000) is None

    def test_moved_overrides_one_slot(self):
        slots = SlotMap.from_cluster_slots(self.REPLY, "h")
        slots.moved(100, ("10.0.0.5", 7005))
        assert slots.owner(100) == ("10.0.0.5", 7005)
        assert slots.owner(101) == ("10.0.0.1", 7000)
        assert ("10.0.0.5", 7005) in slots.masters

    def test_a_project_channel_lives_in_the_slot_of_its_keys(self):
        assert channel_slot(KEYS.channel(42).encode()) == RedisCluster.project_slot(42)


def projects_on_every_master(cluster: RedisCluster, per_master: int) -> list[int]:
    """Project ids spread evenly over the masters (by the slot of their ``{id}`` tag)."""
    spread = cluster.projects_by_master(range(1, 500))
    assert len(spread) == len(cluster.masters())
    return sorted(p for projects in spread.values() for p in projects[:per_master])


def make_clients(
    pods: list[GatewayProcess], projects: list[int], count: int, per_client: int, seed: int
) -> list[ResumingClient]:
    rng = random.Random(seed)
    urls = [pod.ws_url for pod in pods]
    return [
        ResumingClient(urls, rng.sample(projects, per_client), start=i, name=str(i)).start()
        for i in range(count)
    ]


async def test_every_client_gets_every_event_of_projects_on_all_shards(
    redis_cluster: RedisCluster, redis_cluster_url: str, gateways: GatewayGroup
):
    projects = projects_on_every_master(redis_cluster, 3)  # 9 projects, 3 per master
    pods = await asyncio.to_thread(gateways.start, redis_cluster_url, 2)
    clients = make_clients(pods, projects, count=16, per_client=3, seed=1)
    publishers = Publishers(redis_cluster_url, projects, count=3, rate=150)
    try:
        await wait_live(clients)
        publishers.start()
        await publishers.wait_published(900)
        await publishers.stop()
        state = await verify_clients(clients, redis_cluster_url, keys=KEYS)
        assert sum(cursor[1] for cursor, _ in state.values()) >= 900
    finally:
        await publishers.stop()
        await stop_clients(clients)
    for pod in pods:
        status, body = pod.readyz()
        assert status == 200, body


async def test_slot_migration_of_a_busy_project_loses_nothing(
    redis_cluster: RedisCluster, redis_cluster_url: str, gateways: GatewayGroup
):
    """Move a busy project's slot to another master and back while events flow. The old owner
    pushes ``sunsubscribe``; each gateway resubscribes on the new owner and catches the project
    up from the stream: no gap, no duplicate, no resync."""
    projects = projects_on_every_master(redis_cluster, 2)
    busy = projects[0]
    slot = redis_cluster.project_slot(busy)
    home = redis_cluster.master_of_slot(slot)
    away = next(m for m in redis_cluster.masters() if m is not home)
    # No periodic top check: the pub/sub link itself must follow the slot.
    pods = await asyncio.to_thread(
        gateways.start, redis_cluster_url, 2, args=["--reconcile-interval", "3600"]
    )
    clients = make_clients(pods, projects, count=12, per_client=3, seed=2)
    for client in clients[:6]:  # half of them follow the busy project for sure
        if busy not in client.projects:
            client.projects[0] = busy
            client.log = {p: [] for p in client.projects}
    publishers = Publishers(redis_cluster_url, projects, count=2, rate=100)
    hot = Publishers(redis_cluster_url, [busy], count=2, rate=150)
    try:
        await wait_live(clients)
        publishers.start()
        hot.start()
        for target in (away, home):
            await hot.wait_published(150)
            await asyncio.to_thread(redis_cluster.migrate_slot, slot, target)
            assert redis_cluster.master_of_slot(slot) is target
        await hot.wait_published(150)
        await publishers.stop()
        await hot.stop()
        state = await verify_clients(clients, redis_cluster_url, keys=KEYS)
        assert state[busy][0][1] >= 450
    finally:
        await publishers.stop()
        await hot.stop()
        await stop_clients(clients)
    for pod in pods:
        assert pod.readyz()[0] == 200
        assert pod.log_lines("pubsub slot moved"), "the link did not follow the slot"


async def test_master_failovers_give_everything_or_resync_required(
    redis_cluster_factory, gateways: GatewayGroup
):
    """A manual failover (the replica catches up first) loses nothing; a master killed with
    SIGKILL may lose writes it acknowledged but had not replicated yet. Clients get every event
    Redis kept, and an explicit ``resync_required`` wherever what they saw is no longer Redis'
    history: never silence, never someone else's event under a sequence number they trust."""
    cluster: RedisCluster = await asyncio.to_thread(redis_cluster_factory, 3, 1)
    url = cluster.url
    projects = projects_on_every_master(cluster, 2)
    graceful, killed = [cluster.node_for_project(p) for p in (projects[0], projects[2])]
    assert graceful is not killed
    on_graceful = set(cluster.projects_by_master(projects)[graceful])
    pods = await asyncio.to_thread(
        gateways.start, url, 2, args=["--probe-interval", "1", "--reconcile-interval", "3600"]
    )
    clients = make_clients(pods, projects, count=10, per_client=3, seed=3)
    publishers = Publishers(url, projects, count=3, rate=100)
    try:
        await wait_live(clients)
        publishers.start()
        await publishers.wait_published(200)
        await asyncio.to_thread(cluster.failover, graceful)
        await publishers.wait_published(200)
        await asyncio.to_thread(cluster.kill_master, killed)
        await publishers.wait_published(300, within=60)
        await publishers.stop()
        for pod in pods:
            await asyncio.to_thread(pod.wait_ready, 30)
        await verify_clients(
            clients, cluster.url, keys=KEYS, allowed_resyncs={"history_lost", "epoch_changed"}
        )
    finally:
        await publishers.stop()
        await stop_clients(clients)
    for client in clients:
        for project_id in on_graceful & set(client.projects):
            assert not client.resyncs(project_id), "a manual failover must lose nothing"


async def test_writes_lost_in_a_failover_are_never_silent(
    redis_cluster_factory, gateways: GatewayGroup
):
    """Force the bad case: the replica stops replicating (``SIGSTOP``) while its master
    keeps acknowledging and relaying events, then the master dies and the stale replica takes
    over. The sequence numbers the lost events had are then handed out again to new events,
    and publishers rush past the old top before any gateway reads the stream. Clients already
    saw the lost events: they must be told ``resync_required`` (not be fed the new events as
    if nothing happened)."""
    cluster: RedisCluster = await asyncio.to_thread(redis_cluster_factory, 3, 1)
    url = cluster.url
    projects = projects_on_every_master(cluster, 2)
    victim = cluster.node_for_project(projects[0])
    doomed = cluster.projects_by_master(projects)[victim]
    replica = cluster.replicas_of(victim)[0]
    pods = await asyncio.to_thread(
        gateways.start, url, 2, args=["--probe-interval", "1", "--reconcile-interval", "3600"]
    )
    clients = make_clients(pods, projects, count=8, per_client=3, seed=4)
    publishers = Publishers(url, projects, count=3, rate=100)
    burst = Publishers(url, doomed, count=1, rate=1)
    try:
        await wait_live(clients)
        publishers.start()
        await publishers.wait_published(150)
        # The replica stops (SIGSTOP), and its replication link is cut while it is stopped:
        # what the master acknowledges from now on never reaches it (not even a socket buffer).
        # It stays stopped until the master is dead, however long that takes on a loaded
        # machine (a DEBUG SLEEP of 2 s could end first: the replica then caught up, and
        # nothing was lost).
        await asyncio.to_thread(replica.freeze)
        try:
            await asyncio.to_thread(victim.execute, "CLIENT", "KILL", "TYPE", "replica")
            await publishers.wait_published(120)  # acknowledged by the master, never replicated
            await asyncio.to_thread(victim.kill)
        finally:
            replica.thaw()
        await asyncio.to_thread(cluster.wait_promotion, replica)
        for _ in range(120):  # reuse the lost sequence numbers, and more, at once
            for project_id in doomed:
                await burst.loops[0].publish_one(project_id)
        await publishers.wait_published(150, within=60)
        await publishers.stop()
        for pod in pods:
            await asyncio.to_thread(pod.wait_ready, 30)
        state = await verify_clients(
            clients, url, keys=KEYS, allowed_resyncs={"history_lost", "epoch_changed"}
        )
    finally:
        await publishers.stop()
        await burst.stop()
        await stop_clients(clients)
    lost = [
        cursor
        for loop in publishers.loops
        for p in doomed
        for cursor, ident in loop.acked[p].items()
        if state[p][1].get(cursor) != ident
    ]
    assert lost, "the scenario did not lose any write; it tests nothing"
    for client in clients:
        for project_id in set(doomed) & set(client.projects):
            assert client.resyncs(project_id), f"client {client.name} was never told"
