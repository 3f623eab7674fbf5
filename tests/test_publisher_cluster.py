"""The publisher against a real local Redis Cluster (tests/support/redis_cluster.py).

What must hold on a cluster: the one Lua script runs on the master that owns the project's slot
(its keys and channel share the ``{project}`` hash tag), events go out with SPUBLISH to sharded
subscribers, projects spread over every shard, sequences stay gapless under concurrent
publishers, and a slot migration, a failover or a whole-cluster outage never breaks the sequence
silently.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
import pytest
import redis
import redis.cluster

from publisher import AsyncPublisher, Cursor, Publisher, PublisherUnavailable, PublishManyError
from schemas.events import BlockerResolved
from schemas.keys import Envelope, Keys, parse_envelope
from tests.support.redis_cluster import ClusterNode, RedisCluster

KEYS = Keys()


def event(project_id: int, n: int) -> BlockerResolved:
    return BlockerResolved(
        project_id=project_id,
        blocker_id=n,
        answer=f"answer {n}",
        resolved_at=datetime(2025, 11, 8, 12, 45, 30, tzinfo=UTC),
    )


class ShardedSubscriber:
    """SSUBSCRIBE through redis-py's cluster pub/sub (it routes each channel to its shard)."""

    def __init__(self, cluster: RedisCluster, *project_ids: int) -> None:
        self.client = cluster.client()
        self.pubsub = self.client.pubsub()
        channels = [KEYS.channel(p) for p in project_ids]
        self.pubsub.ssubscribe(*channels)
        confirmed = 0
        deadline = time.monotonic() + 5
        while confirmed < len(channels):
            assert time.monotonic() < deadline, "SSUBSCRIBE was not confirmed"
            message = self.pubsub.get_sharded_message(timeout=0.1)
            if message and message["type"] == "ssubscribe":
                confirmed += 1

    def collect(self, count: int, timeout: float = 10.0) -> dict[int, list[Envelope]]:
        """Wait for ``count`` messages; return them per project, in arrival order."""
        received: dict[int, list[Envelope]] = {}
        total = 0
        deadline = time.monotonic() + timeout
        while total < count and time.monotonic() < deadline:
            # Poll without blocking: with a timeout, redis-py waits that long on every shard
            # that has nothing, one shard after the other.
            message = self.pubsub.get_sharded_message(timeout=0.0)
            if message is None:
                time.sleep(0.002)
            elif message["type"] == "smessage":
                project_id = KEYS.project_of_channel(message["channel"])
                assert project_id is not None, message
                received.setdefault(project_id, []).append(parse_envelope(message["data"]))
                total += 1
        assert total == count, f"received {total} of {count} messages"
        return received

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


@pytest.fixture
def cluster(redis_cluster: RedisCluster, redis_cluster_url: str) -> RedisCluster:
    """The session cluster, flushed (``redis_cluster_url`` does that)."""
    return redis_cluster


@pytest.fixture
def publisher(redis_cluster_url: str):
    with Publisher.from_url(redis_cluster_url) as bus:
        yield bus


def keys_on(node: ClusterNode, project_id: int) -> set[str]:
    """Which of the project's keys this node holds itself. COUNTKEYSINSLOT answers from the
    node's own dataset; EXISTS would be redirected (MOVED) by a node not serving the slot."""
    slot = RedisCluster.project_slot(project_id)
    if not node.execute("CLUSTER", "COUNTKEYSINSLOT", slot):
        return set()
    names = {"meta": KEYS.meta(project_id), "stream": KEYS.stream(project_id)}
    return {kind for kind, key in names.items() if node.client().exists(key)}


def test_from_url_gives_a_cluster_client_with_sharded_publish(cluster: RedisCluster) -> None:
    bus = Publisher.from_url(cluster.url)
    try:
        assert isinstance(bus.client, redis.cluster.RedisCluster)
        assert bus.publish(event(7, 1)).seq == 1
    finally:
        bus.close()


def test_project_keys_and_channel_share_one_slot() -> None:
    for project_id in (1, 42, 10**9):
        slots = {
            RedisCluster.key_slot(name)
            for name in (
                KEYS.meta(project_id),
                KEYS.stream(project_id),
                KEYS.channel(project_id),
                KEYS.idempotency(project_id, "k"),
            )
        }
        assert slots == {RedisCluster.project_slot(project_id)}


def test_the_script_runs_on_the_master_owning_the_project(
    cluster: RedisCluster, publisher: Publisher
) -> None:
    owner = cluster.node_for_project(42)
    cursor = publisher.publish(event(42, 1))

    assert cursor.seq == 1
    assert keys_on(owner, 42) == {"meta", "stream"}
    for other in cluster.masters():
        if other is not owner:
            assert keys_on(other, 42) == set()
    frame = owner.client().xrange(KEYS.stream(42))[0][1][b"f"]
    assert msgspec.json.decode(frame)["seq"] == 1


def test_events_are_spublished_to_sharded_subscribers_only(
    cluster: RedisCluster, publisher: Publisher
) -> None:
    subscriber = ShardedSubscriber(cluster, 42)
    # A classic SUBSCRIBE on every master: PUBLISH would reach it (cluster-wide broadcast),
    # SPUBLISH must not.
    classic = [m.client().pubsub(ignore_subscribe_messages=True) for m in cluster.masters()]
    for pubsub in classic:
        pubsub.subscribe(KEYS.channel(42))
    try:
        cursors = [publisher.publish(event(42, n)) for n in range(1, 6)]
        received = subscriber.collect(5)[42]

        assert [e.seq for e in received] == [1, 2, 3, 4, 5]
        assert {e.epoch for e in received} == {cursors[0].epoch}
        assert [msgspec.json.decode(e.frame)["seq"] for e in received] == [1, 2, 3, 4, 5]
        assert all(e.published_ms > 0 for e in received)
        time.sleep(0.2)
        assert all(pubsub.get_message(timeout=0.05) is None for pubsub in classic)
    finally:
        subscriber.close()
        for pubsub in classic:
            pubsub.close()


def test_projects_spread_over_every_shard(cluster: RedisCluster, publisher: Publisher) -> None:
    projects = list(range(1, 61))
    spread = cluster.projects_by_master(projects)
    assert set(spread) == set(cluster.masters()), "60 projects should land on all 3 masters"

    for project_id in projects:
        assert publisher.publish(event(project_id, 1)).seq == 1

    for master, owned in spread.items():
        for project_id in owned:
            assert keys_on(master, project_id) == {"meta", "stream"}
        local_metas = {key.decode() for key in master.client().scan_iter(match="eventbus:*:meta")}
        assert local_metas == {KEYS.meta(p) for p in owned}


def test_publish_many_across_shards(cluster: RedisCluster, publisher: Publisher) -> None:
    projects = list(range(100, 130))
    assert len(cluster.projects_by_master(projects)) == 3
    subscriber = ShardedSubscriber(cluster, *projects)
    try:
        # Interleaved: event n of every project, then n + 1 of every project, ...
        events = [event(p, n) for n in range(1, 11) for p in projects]
        cursors = publisher.publish_many(events)

        assert len(cursors) == len(events)
        per_project: dict[int, list[Cursor]] = {}
        for ev, cursor in zip(events, cursors, strict=True):
            per_project.setdefault(ev.project_id, []).append(cursor)
        for project_id, got in per_project.items():
            assert [c.seq for c in got] == list(range(1, 11)), project_id
            assert len({c.epoch for c in got}) == 1

        received = subscriber.collect(len(events))
        for project_id in projects:
            assert [e.seq for e in received[project_id]] == list(range(1, 11))
            answers = [msgspec.json.decode(e.frame)["answer"] for e in received[project_id]]
            assert answers == [f"answer {n}" for n in range(1, 11)]
    finally:
        subscriber.close()


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_in_order_publishing_on_a_cluster_stops_at_the_first_refused_event(
    cluster: RedisCluster, redis_cluster_url: str, flavour: str
) -> None:
    """A transaction cannot span the slots of several projects: on a cluster, in-order publishing
    sends one call per round trip and stops at the first refused one (project 102's damaged
    key, index 5); nothing after it is sent. After the repair, the same keys are exact."""
    projects = [100, 101, 102, 103]
    order = [100, 101, 103, 100, 102, 101, 103, 102, 100, 101, 102, 103]  # 102 first at 4
    events = [event(p, order[:i].count(p) + 1) for i, p in enumerate(order)]
    keys = [f"k-{e.project_id}-{e.blocker_id}" for e in events]
    client = cluster.client()
    try:
        client.set(KEYS.meta(102), "not a hash")

        def run() -> list[Cursor]:
            if flavour == "sync":
                with Publisher.from_url(redis_cluster_url) as bus:
                    return bus.publish_many(events, idempotency_keys=keys, in_order=True)

            async def run_async() -> list[Cursor]:
                async with AsyncPublisher.from_url(redis_cluster_url) as bus:
                    return await bus.publish_many(events, idempotency_keys=keys, in_order=True)

            return asyncio.run(run_async())

        with pytest.raises(PublishManyError) as caught:
            run()
        error = caught.value
        assert error.stopped_at == 4 and list(error.errors) == [102]
        assert [c is not None for c in error.cursors] == [True] * 4 + [False] * 8
        stored = {p: client.xlen(KEYS.stream(p)) for p in projects}
        assert stored == {100: 2, 101: 1, 102: 0, 103: 1}
        client.delete(KEYS.meta(102))
        cursors = run()
        assert cursors[:4] == error.cursors[:4]
        assert {p: client.xlen(KEYS.stream(p)) for p in projects} == dict.fromkeys(projects, 3)
    finally:
        client.close()


async def test_async_publisher_on_cluster(cluster: RedisCluster, redis_cluster_url: str) -> None:
    subscriber = ShardedSubscriber(cluster, 5, 6, 7)
    try:
        async with AsyncPublisher.from_url(redis_cluster_url) as bus:
            first = await bus.publish(event(5, 1))
            many = await bus.publish_many([event(p, n) for n in (1, 2) for p in (6, 7)])
            helper = await bus.agent_resumed(5, "worker-1", task_id=2, blocker_id=3)

        assert first.seq == 1 and helper.seq == 2
        assert [c.seq for c in many] == [1, 1, 2, 2]
        received = await asyncio.to_thread(subscriber.collect, 6)
        assert {p: [e.seq for e in envs] for p, envs in received.items()} == {
            5: [1, 2],
            6: [1, 2],
            7: [1, 2],
        }
    finally:
        subscriber.close()


def test_concurrent_publishers_on_one_project_are_gapless(
    cluster: RedisCluster, redis_cluster_url: str
) -> None:
    publishers, per_publisher, project_id = 4, 250, 77
    subscriber = ShardedSubscriber(cluster, project_id)
    results: list[list[Cursor]] = [[] for _ in range(publishers)]
    errors: list[BaseException] = []
    start = threading.Barrier(publishers)

    def run(index: int) -> None:
        try:
            with Publisher.from_url(redis_cluster_url) as bus:
                start.wait(10)
                for n in range(per_publisher):
                    results[index].append(bus.publish(event(project_id, index * 1000 + n + 1)))
        except BaseException as exc:  # reported below, with the thread's own traceback lost
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(publishers)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        total = publishers * per_publisher

        seqs = sorted(c.seq for got in results for c in got)
        assert seqs == list(range(1, total + 1))
        assert len({c.epoch for got in results for c in got}) == 1
        for got in results:  # each publisher's own events got increasing sequence numbers
            assert [c.seq for c in got] == sorted(c.seq for c in got)

        received = subscriber.collect(total, timeout=20)[project_id]
        assert [e.seq for e in received] == list(range(1, total + 1))
        owner = cluster.node_for_project(project_id)
        stream = owner.client().xrange(KEYS.stream(project_id))
        assert [int(entry_id.split(b"-")[0]) for entry_id, _ in stream] == seqs
    finally:
        subscriber.close()


def test_slot_migration_is_followed(cluster: RedisCluster, publisher: Publisher) -> None:
    project_id = 4242
    slot = cluster.project_slot(project_id)
    before = [publisher.publish(event(project_id, n)).seq for n in range(1, 4)]
    source = cluster.node_for_project(project_id)
    target = next(m for m in cluster.masters() if m is not source)

    migration = cluster.start_slot_migration(slot, target)
    # While the slot is MIGRATING with the keys still on the source, and after the keys moved
    # but before the slot is handed over (ASK redirect to the target): publishing goes on.
    during = [publisher.publish(event(project_id, 4)).seq]
    migration.move_keys()
    during += [c.seq for c in publisher.publish_many([event(project_id, 5), event(project_id, 6)])]
    migration.finish()

    assert cluster.node_for_project(project_id) is target
    assert keys_on(source, project_id) == set()
    assert keys_on(target, project_id) == {"meta", "stream"}

    subscriber = ShardedSubscriber(cluster, project_id)  # subscribes on the new owner
    try:
        after = [publisher.publish(event(project_id, n)).seq for n in (7, 8)]
        assert subscriber.collect(2)[project_id][-1].seq == 8
    finally:
        subscriber.close()

    assert before + during + after == list(range(1, 9))
    stream = target.client().xrange(KEYS.stream(project_id))
    assert [msgspec.json.decode(f[b"f"])["seq"] for _, f in stream] == list(range(1, 9))
    epochs = {target.client().hget(KEYS.meta(project_id), "epoch")}
    assert len(epochs) == 1 and None not in epochs


def _publish_until_it_works(
    publish: Callable[[], Cursor], timeout: float = 20.0
) -> tuple[Cursor, int]:
    """Publish, tolerating only PublisherUnavailable (the documented outage error), until it
    succeeds; return the cursor and how many attempts failed."""
    failures = 0
    deadline = time.monotonic() + timeout
    while True:
        try:
            return publish(), failures
        except PublisherUnavailable:
            failures += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.slow
def test_failover_keeps_the_sequence(redis_cluster_factory) -> None:
    cluster: RedisCluster = redis_cluster_factory(masters=3, replicas=1)
    project_id = 9
    with Publisher.from_url(cluster.url) as bus:
        first = [bus.publish(event(project_id, n)) for n in (1, 2, 3)]
        old_master = cluster.node_for_project(project_id)
        new_master = cluster.kill_master(old_master)
        assert cluster.node_for_project(project_id) is new_master

        # The promoted replica never loaded the script (SCRIPT LOAD is not replicated): the
        # single publish must recover from NOSCRIPT, publish_many uses EVAL.
        cursor, _ = _publish_until_it_works(lambda: bus.publish(event(project_id, 4)))
        batch = bus.publish_many([event(project_id, 5), event(project_id, 6)])

    # The replica was in sync when its master died, so the history survived: same epoch, no gap.
    assert [c.seq for c in [*first, cursor, *batch]] == [1, 2, 3, 4, 5, 6]
    assert {c.epoch for c in [*first, cursor, *batch]} == {first[0].epoch}


@pytest.mark.slow
def test_whole_cluster_down_fails_clearly_then_recovers(redis_cluster_factory) -> None:
    cluster: RedisCluster = redis_cluster_factory(masters=3, replicas=0)
    with Publisher.from_url(cluster.url) as bus:
        before = bus.publish(event(3, 1))
        for node in cluster.nodes:
            cluster.kill(node)

        started = time.monotonic()
        with pytest.raises(PublisherUnavailable):
            bus.publish(event(3, 2))
        with pytest.raises(PublisherUnavailable):
            bus.publish_many([event(3, 2), event(4, 1)])
        assert time.monotonic() - started < 10, "an outage must fail fast, not hang"

        for node in cluster.nodes:
            node.start()
        cluster.wait_healthy(30)
        # No persistence: the data is gone, so the history starts again under a new epoch,
        # which is what tells gateways and clients to resync.
        after, _ = _publish_until_it_works(lambda: bus.publish(event(3, 2)))
    assert after.seq == 1 and after.epoch != before.epoch

    processes = [node.process for node in cluster.nodes]
    cluster.close()
    assert not cluster.dir.exists()
    assert all(node.process is None for node in cluster.nodes)
    assert all(p is None or p.poll() is not None for p in processes)


def test_plain_redis_url_is_not_sharded(redis_url: str) -> None:
    """Sanity check of the other branch: a redis:// URL publishes with PUBLISH (a classic
    subscriber receives it), so one codebase serves both deployments."""
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(KEYS.channel(1))
    try:
        with Publisher.from_url(redis_url) as bus:
            cursor = bus.publish(event(1, 1))
        message = None
        deadline = time.monotonic() + 5
        while message is None and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
        assert message is not None
        assert parse_envelope(message["data"]).seq == cursor.seq == 1
    finally:
        pubsub.close()
        client.close()
