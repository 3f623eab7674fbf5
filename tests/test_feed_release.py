"""A feed released while its channel subscribe is still under way (real Redis, real link).

A client that subscribes to a project nobody on the pod follows, then goes (or unsubscribes)
before Redis has confirmed the channel, releases the feed while its ``_start_feed`` task is
still inside ``PubSubLink.subscribe``. Whatever the event-loop iteration the release falls in,
that task must end, the channel must be left, and the shared pub/sub connection must stay up.
These tests step through every iteration of that window instead of hoping to hit it.

Before the fix, on Python 3.11 (the image's), the cancellation was lost inside redis-py's write
(``asyncio.wait_for`` returns normally when the inner write finished as the cancellation came):
the task went on waiting on an event that the feed's unsubscribe had just dropped, forever, and
was garbage collected pending ("Task was destroyed but it is pending!").
"""

from __future__ import annotations

import asyncio
import gc

import redis.asyncio

from gateway.cluster_pubsub import ClusterPubSub
from gateway.hub import Hub
from gateway.metrics import Metrics
from gateway.pubsub import PubSubLink
from gateway.store import HistoryStore
from gateway.tasks import _running
from schemas.keys import Keys
from tests.test_hub import session_of

KEYS = Keys()
PROJECT = 7
#: Event-loop iterations stepped through between the start of a subscribe and its release: the
#: write of ``SUBSCRIBE`` and the wait for its confirmation take a few (Redis answers later).
WINDOW = 8


def link_for(url: str, metrics: Metrics, hub: Hub | None = None) -> PubSubLink:
    return PubSubLink(
        url,
        sharded=False,
        on_message=hub.on_pubsub_message if hub else lambda channel, data: None,
        on_resubscribed=hub.on_link_resubscribed if hub else lambda: None,
        metrics=metrics,
    )


async def settled(link: PubSubLink) -> None:
    """Until the spawned unsubscribes and writes are done (bounded)."""
    async with asyncio.timeout(5):
        while _running:
            await asyncio.wait(set(_running))


async def redis_channels(url: str) -> set[bytes]:
    client = redis.asyncio.Redis.from_url(url)
    try:
        return set(await client.pubsub_channels())
    finally:
        await client.aclose()


async def test_a_feed_released_at_any_point_of_its_subscribe_leaves_nothing_behind(redis_url):
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    client = redis.asyncio.Redis.from_url(redis_url)
    metrics = Metrics()
    hub = Hub(
        keys=KEYS,
        store=HistoryStore(client, KEYS),
        metrics=metrics,
        max_replay=100,
        subscribe_timeout=5,
    )
    link = hub.link = link_for(redis_url, metrics, hub)
    link.start()
    try:
        async with asyncio.timeout(5):
            await link.subscribe(b"warm-up")  # connected
        for steps in range(WINDOW):
            session = session_of(hub)
            subscribing = asyncio.create_task(hub.subscribe(session, PROJECT, None, None))
            await asyncio.sleep(0)  # the subscribe registers: the feed and its _start_feed task
            starting = hub.feeds[PROJECT].reader
            assert starting is not None
            for _ in range(steps):
                await asyncio.sleep(0)
            hub.remove(session)  # the connection closed: the feed is released
            done, _ = await asyncio.wait({starting}, timeout=2)
            assert done, f"_start_feed still pending, released after {steps} iteration(s)"
            # The subscribe ends with its subscription, not at subscribe_timeout (5 s): waited
            # for at most 2 + 2.5 s since it started, under the timeout however slow the machine.
            done, _ = await asyncio.wait({subscribing}, timeout=2.5)
            assert done, f"the subscribe still waits, released after {steps} iteration(s)"
            assert subscribing.result() is None
            await settled(link)
        assert not hub.feeds
        assert set(link._channels) == {b"warm-up"}
        assert await redis_channels(redis_url) == {b"warm-up"}
        assert link.connections == 1, "no write was interrupted: the connection never dropped"

        # The project can be followed again at once.
        session = session_of(hub)
        async with asyncio.timeout(5):
            await hub.subscribe(session, PROJECT, None, None)
        assert hub.feeds[PROJECT].ready.is_set()
        assert KEYS.channel(PROJECT).encode() in await redis_channels(redis_url)
        gc.collect()
        assert not reported, [context.get("message") for context in reported]
    finally:
        await hub.close()
        await link.close()
        await client.aclose()


async def test_a_feed_released_while_its_read_waits_for_a_hung_redis_is_freed_at_once():
    """Redis stopped (SIGSTOP, a private server) while a feed reads its history: the release
    cancels the read inside ``asyncio.timeout`` and redis-py's pipeline, and the feed is freed by
    reference counting (the cancelled task, whose traceback holds the feed, is not kept by it)."""
    import os
    import signal

    from gateway.hub import Feed
    from tests.support.redis_server import RedisServer

    with RedisServer() as server:
        client = redis.asyncio.Redis.from_url(server.url)
        metrics = Metrics()
        hub = Hub(
            keys=KEYS,
            store=HistoryStore(client, KEYS),
            metrics=metrics,
            max_replay=100,
            subscribe_timeout=5,
        )
        link = hub.link = link_for(server.url, metrics, hub)
        link.start()
        session = session_of(hub)
        try:
            async with asyncio.timeout(5):
                await hub.subscribe(session, PROJECT, None, None)
            gc.collect()
            gc.disable()  # what reference counting does not free stays until the end
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                hub.request_catch_up(hub.feeds[PROJECT])  # a read that Redis never answers
                reading = hub.feeds[PROJECT].reader
                await asyncio.sleep(0.1)
                assert reading is not None and not reading.done()
                hub.remove(session)  # the feed is released: its read is cancelled
                await asyncio.wait({reading}, timeout=1)
                assert reading.cancelled() and not hub.feeds
                del reading
                budget = hub.window_budget  # shared by this hub's feeds only
                alive = [
                    o for o in gc.get_objects() if type(o) is Feed and o.window.budget is budget
                ]
                gc.set_debug(gc.DEBUG_SAVEALL)
                gc.collect()
                garbage = [type(o).__name__ for o in gc.garbage]
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
            assert not alive, "the released feed is kept for the cycle collector"
            assert "Feed" not in garbage
        finally:
            await hub.close()
            await link.close()
            await client.aclose()


async def test_a_cancelled_subscribe_is_cancelled_wherever_the_cancellation_finds_it(redis_url):
    """The cancellation reaches the caller (it used to be lost in the write on Python 3.11, the
    subscribe then returning normally once Redis confirmed) and never interrupts the write."""
    metrics = Metrics()
    link = link_for(redis_url, metrics)
    link.start()
    try:
        async with asyncio.timeout(5):
            await link.subscribe(b"warm-up")
        for steps in range(WINDOW):
            channel = b"cancelled-%d" % steps
            subscribing = asyncio.create_task(link.subscribe(channel))
            for _ in range(steps):
                await asyncio.sleep(0)
            if not subscribing.done():  # else Redis confirmed already: nothing to cancel
                subscribing.cancel()
                await asyncio.wait({subscribing}, timeout=2)
                assert subscribing.cancelled(), f"not cancelled after {steps} iteration(s)"
            await link.unsubscribe(channel)
        await settled(link)
        assert link.connections == 1
        assert metrics.pubsub_reconnects_total == 0
        assert await redis_channels(redis_url) == {b"warm-up"}
    finally:
        await link.close()


async def test_a_subscribe_still_waiting_when_its_channel_is_left_returns_false() -> None:
    """The contract both links keep: no confirmation will come for a channel nobody wants, so its
    waiters are let go (here while the link is down: nothing is sent, nothing confirmed)."""
    standalone = link_for("redis://127.0.0.1:1", Metrics())  # never started: never connected
    cluster = ClusterPubSub(
        "redis+cluster://127.0.0.1:1",
        on_message=lambda channel, data: None,
        on_recovered=lambda channels: None,
        metrics=Metrics(),
    )  # never started: no slot map, nothing placed
    for link in (standalone, cluster):
        waiting = asyncio.create_task(link.subscribe(b"left"))
        await asyncio.sleep(0)
        assert not waiting.done()
        await link.unsubscribe(b"left")
        async with asyncio.timeout(1):
            assert await waiting is False
        # A later subscribe waits for its own confirmation again.
        again = asyncio.create_task(link.subscribe(b"left"))
        await asyncio.sleep(0)
        assert not again.done()
        again.cancel()
        await asyncio.wait({again}, timeout=1)
        assert again.cancelled()
    await standalone.close()
    await cluster.close()


async def shard_channels(cluster: ClusterPubSub) -> set[bytes]:
    """The shard channels every master of the cluster has subscribers for."""
    found: set[bytes] = set()
    for host, port in list(cluster._links):
        client = redis.asyncio.Redis(host=host, port=port)
        try:
            found |= set(await client.execute_command("PUBSUB", "SHARDCHANNELS"))
        finally:
            await client.aclose()
    return found


async def test_a_cluster_channel_left_twice_while_placements_wait_is_left(redis_cluster_url):
    """Redis Cluster: a project released, followed again and released again while the placement
    lock is held (a reconcile pass, another subscribe's write) must not stay subscribed on its
    shard. The first unsubscribe used to take the route away without leaving the channel (it was
    wanted again), and the second found no route: the shard kept the channel for good, even
    across reconnects."""
    cluster = ClusterPubSub(
        redis_cluster_url,
        on_message=lambda channel, data: None,
        on_recovered=lambda channels: None,
        metrics=Metrics(),
    )
    cluster.start()
    channel = KEYS.channel(PROJECT).encode()
    try:
        async with asyncio.timeout(10):
            await cluster.subscribe(channel)
        assert await shard_channels(cluster) == {channel}
        go_on = asyncio.Event()

        async def another_placement() -> None:
            async with cluster._lock:
                await go_on.wait()

        # Placements of other channels hold the lock; this channel's changes queue up behind.
        async with cluster._lock:
            first = asyncio.create_task(cluster.unsubscribe(channel))  # released
            await asyncio.sleep(0)
            other = asyncio.create_task(another_placement())
            await asyncio.sleep(0)
            again = asyncio.create_task(cluster.subscribe(channel))  # followed again
            await asyncio.sleep(0)
        await asyncio.wait({first}, timeout=5)  # the first unsubscribe had the lock first
        assert not again.done()
        again.cancel()  # released again before it was placed
        second = asyncio.create_task(cluster.unsubscribe(channel))
        await asyncio.sleep(0)
        go_on.set()
        await asyncio.wait({first, other, again, second}, timeout=5)
        assert first.done() and again.done() and second.done()
        await settled(cluster)
        assert not cluster._wanted
        assert all(not link.channels for link in cluster._links.values())
        assert await shard_channels(cluster) == set()

        # Released and followed again while the lock is held: the new subscribe is confirmed.
        async with asyncio.timeout(10):
            await cluster.subscribe(channel)
        async with cluster._lock:
            first = asyncio.create_task(cluster.unsubscribe(channel))
            await asyncio.sleep(0)
            again = asyncio.create_task(cluster.subscribe(channel))
            await asyncio.sleep(0)
        async with asyncio.timeout(5):
            assert await again is True
        await asyncio.wait({first}, timeout=5)
        await settled(cluster)
        assert await shard_channels(cluster) == {channel}
        assert cluster.alive
    finally:
        await cluster.close()


async def test_a_link_closed_while_unsubscribes_are_written_logs_nothing(redis_url):
    """A drain: the clients' unsubscribes are being written as the link closes. Each write
    failed on the connection torn down under it (redis-py: 'NoneType' object has no attribute
    'writelines') and logged the warning "pubsub send failed": dozens at every deploy, for
    writes nothing needed any more."""
    from structlog.testing import capture_logs

    link = link_for(redis_url, Metrics())
    link.start()
    channels = [f"closing-link:{i}".encode() for i in range(50)]
    await asyncio.wait_for(asyncio.gather(*(link.subscribe(c) for c in channels)), 10)
    with capture_logs() as logs:
        leaving = [asyncio.ensure_future(link.unsubscribe(c)) for c in channels]
        await asyncio.sleep(0)
        await link.close()
        await asyncio.gather(*leaving)
        await settled(link)
    assert [entry for entry in logs if entry["log_level"] != "debug"] == []
