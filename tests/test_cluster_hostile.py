"""Redis Cluster with one shard in trouble: the projects of the other shards are unaffected.

Real ``redis-server`` nodes (tests/support/redis_cluster.py), one of them hung with ``SIGSTOP``
(a paused VM, a stuck host: its sockets stay open, nothing is answered). The cluster runs with
``cluster-require-full-coverage no``, so the other masters keep serving their slots, as they do
anyway with the default until the hung node is declared failed (``cluster-node-timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
import redis.exceptions

from gateway.cluster_pubsub import ClusterPubSub, SlotMap
from gateway.metrics import Metrics
from gateway.presence import Write
from gateway.presence_store import PRESENCE_READS, PresenceService, PresenceStore
from gateway.store import CLUSTER_CONCURRENCY, ForeignValues, HistoryStore, StoreUnavailable
from publisher import AsyncPublisher, Publisher
from redisconn import async_client
from redisconn.node_limits import node_name
from schemas.keys import Keys
from schemas.presence import REFRESH, WRITE, PodRecord
from tests.support.fake_resp import PROXY, FakeResp, proxy
from tests.support.gateway_client import RecordingClient
from tests.support.gateway_process import GatewayGroup
from tests.support.redis_cluster import RedisCluster
from tests.support.sse_client import open_stream, stream_path
from tests.support.ws_client import ResumingClient, wait_live
from tests.test_presence_store import Watcher, cluster_round, eventually

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


# A CLUSTER SLOTS reply no Redis sends (a broken proxy, a server that is not Redis at the seed's
# address): each is as good as no answer, never the end of the link's upkeep.
GARBAGE_SLOT_MAPS = {
    "port not a number": b"*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n$3\r\nabc\r\n",
    "entry too short": b"*1\r\n*2\r\n:0\r\n:16383\r\n",
    "entry not an array": b"*1\r\n:7\r\n",
    "not an array": b"$5\r\nhello\r\n",
    "node without a port": b"*1\r\n*3\r\n:0\r\n:16383\r\n*1\r\n$9\r\n127.0.0.1\r\n",
}


def _pubsub_through(port: int) -> ClusterPubSub:
    """A cluster pub/sub whose seed is ``127.0.0.1:port`` (a FakeResp in front of a node)."""
    return ClusterPubSub(
        f"redis+cluster://127.0.0.1:{port}",
        on_message=lambda channel, data: None,
        on_recovered=lambda channels: None,
        metrics=Metrics(),
    )


@pytest.mark.parametrize("garbage", GARBAGE_SLOT_MAPS.values(), ids=GARBAGE_SLOT_MAPS.keys())
async def test_a_garbage_slot_map_is_retried_not_the_end_of_cluster_pubsub(
    redis_cluster: RedisCluster, redis_cluster_url: str, garbage: bytes
):
    """The seed answers CLUSTER SLOTS with garbage, then like Redis again: the sharded pub/sub
    comes up and a subscribe is confirmed. Before, parsing the garbage raised (IndexError,
    ValueError, TypeError) out of the task that keeps the slot map, which nobody awaited: the
    map was never asked for again, no link was made, and every subscribe waited for ever (an
    'unavailable' to every client of the pod, until it was restarted)."""
    seed = redis_cluster.masters()[0]
    asked = asyncio.Event()
    loop = asyncio.get_running_loop()

    def spoiled(command: list[bytes]) -> object:
        if [part.upper() for part in command[:2]] == [b"CLUSTER", b"SLOTS"]:
            loop.call_soon_threadsafe(asked.set)
            return garbage
        return PROXY

    with FakeResp(("127.0.0.1", seed.port), spoiled) as fake:
        pubsub = _pubsub_through(fake.port)
        pubsub.start()
        try:
            async with asyncio.timeout(10):
                await asked.wait()
                fake.answer = proxy  # (the garbage is on its way: the answer was chosen)
                assert await pubsub.subscribe(KEYS.channel(7).encode())
        finally:
            await pubsub.close()


@pytest.mark.parametrize("host", [b"user:pw@evil", b"host/15", b"host?db=3", b"a b", b"[::1]"])
def test_a_slot_map_naming_a_host_that_would_change_the_node_url_is_refused(host: bytes):
    """The host goes into the node's URL: one that would change its meaning there (credentials,
    a database, options) is a reply no Redis sends."""
    reply = [[0, 16383, [host, 7000, b"id"]]]
    with pytest.raises(redis.exceptions.InvalidResponse):
        SlotMap.from_cluster_slots(reply, "127.0.0.1")
    assert SlotMap.from_cluster_slots([[0, 16383, [b"::1", 7000]]], "h").owner(5) == ("::1", 7000)


async def test_cluster_pubsub_comes_back_after_more_than_a_thousand_failed_map_loads(
    redis_cluster: RedisCluster, redis_cluster_url: str, monkeypatch
):
    """The seed refuses the slot map for a long outage (over 1,000 loads: some 35 minutes at
    the 2 s cap), then answers: the sharded pub/sub comes up. Before, the pause after a failed
    load was ``min(2.0, 0.05 * 2**failures)``, which raised OverflowError at the 1,075th
    failure, out of the task that keeps the map: the pod never subscribed anything again. (The
    module's pauses are skipped here, so that the test takes seconds.)"""
    import types

    import gateway.cluster_pubsub

    real_sleep = asyncio.sleep

    async def no_pause(delay: float, result: object = None) -> object:
        return await real_sleep(0, result)

    hurried = types.ModuleType("asyncio")
    hurried.__dict__.update(vars(asyncio))
    hurried.sleep = no_pause  # type: ignore[attr-defined]
    monkeypatch.setattr(gateway.cluster_pubsub, "asyncio", hurried)
    seed = redis_cluster.masters()[0]
    refusals = 0
    enough = asyncio.Event()
    loop = asyncio.get_running_loop()

    def refusing(command: list[bytes]) -> object:
        nonlocal refusals
        if command[0].upper() == b"CLUSTER":
            refusals += 1
            if refusals == 1100:
                loop.call_soon_threadsafe(enough.set)
            return b"-ERR not now\r\n"
        return b"+OK\r\n"  # the handshake

    with FakeResp(("127.0.0.1", seed.port), refusing) as fake:
        pubsub = _pubsub_through(fake.port)
        pubsub.start()
        try:
            waiting = asyncio.ensure_future(enough.wait())
            async with asyncio.timeout(90):
                await asyncio.wait([waiting, pubsub._task], return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            assert not pubsub._task.done(), f"the upkeep ended: {pubsub._task!r}"
            fake.answer = proxy
            async with asyncio.timeout(10):
                assert await pubsub.subscribe(KEYS.channel(7).encode())
        finally:
            await pubsub.close()


async def test_the_periodic_top_check_of_healthy_shards_goes_on_while_one_hangs(
    partial_cluster: RedisCluster,
):
    """The reconcile pass reads every followed project's top to find a last event that never
    came live. With one master hung, the projects of the others are still checked: an event
    of a healthy shard that its pub/sub never carried (published with classic PUBLISH here,
    which the gateway's SSUBSCRIBE does not hear) reaches the client. Before, the tops of all
    projects were read in one pipeline, which the hung master held until the pass gave up: no
    project was checked for as long as it hung."""
    cluster = partial_cluster
    spread = cluster.projects_by_master(range(1, 5000))
    hung, healthy = cluster.masters()[:2]
    project, stuck = spread[healthy][0], spread[hung][0]
    silent = Publisher.from_url(cluster.url, sharded=False)  # stored, never heard live
    silent.blocker_resolved(project, blocker_id=1, answer="ok")  # (its script loaded)
    with GatewayGroup() as gateways:
        (pod,) = await asyncio.to_thread(
            gateways.start, cluster.url, 1, args=["--reconcile-interval", "1"]
        )
        client = ResumingClient([pod.ws_url], [project, stuck]).start()
        try:
            await wait_live([client])
            await asyncio.to_thread(hung.freeze)
            try:
                cursor = await asyncio.to_thread(
                    silent.blocker_resolved, project, blocker_id=2, answer="ok"
                )
                await client.wait_for(
                    lambda: client.cursors.get(project) == (cursor.epoch, cursor.seq),
                    20,
                    "the event found by the top check",
                )
            finally:
                hung.thaw()
        finally:
            await client.stop()
            silent.close()


@contextlib.asynccontextmanager
async def _pod_beside_a_hung_master(cluster: RedisCluster, projects: int):
    """A gateway pod (--subscribe-timeout 3 s) on ``cluster``, ``projects`` projects on each of
    two masters, and a publisher: yields ``(pod, publisher, stuck, fine, hung)``. ``async with
    hung():`` hangs the master of ``stuck`` (SIGSTOP) for its block and thaws it (SIGCONT)
    after, however the block ends; ``fine`` are a healthy master's projects. The publisher
    has already published to the last of ``fine`` (its slot map loaded, its script on the
    healthy master), so publishing to them needs nothing of the hung master. The publisher is
    closed, and the pod stopped, at the end."""
    spread = cluster.projects_by_master(range(1, 5000))
    troubled, healthy = cluster.masters()[:2]
    stuck, fine = spread[troubled][:projects], spread[healthy][:projects]

    @contextlib.asynccontextmanager
    async def hung():
        await asyncio.to_thread(troubled.freeze)
        try:
            yield
        finally:
            await asyncio.to_thread(troubled.thaw)

    publisher = AsyncPublisher.from_url(cluster.url)
    with GatewayGroup() as gateways:
        (pod,) = await asyncio.to_thread(
            gateways.start, cluster.url, 1, args=["--subscribe-timeout", "3"]
        )
        try:
            await publisher.blocker_resolved(fine[-1], blocker_id=1, answer="ok")
            yield pod, publisher, stuck, fine, hung
        finally:
            await publisher.aclose()


async def test_a_connection_s_other_projects_are_answered_while_one_waits_for_a_hung_master(
    partial_cluster: RedisCluster,
):
    """A page follows projects on two masters, one of which hangs (SIGSTOP). Its subscribes
    (with presence) to the hung master's projects, new to the pod, wait for Redis up to
    --subscribe-timeout (3 s); meanwhile the same connection's ping, subscribes and presence
    reads of the healthy master's projects are answered at once, and their events flow.
    Before, every frame waited behind the ones before it: the healthy projects' ``subscribed``
    came 3 s late per hung project sent before them (a minute for a page of twenty). Answers
    about one project still come in the order of its frames: the hung project's unsubscribe,
    sent right after its subscribe, is answered after that subscribe's ``unavailable``."""
    async with _pod_beside_a_hung_master(partial_cluster, 3) as (pod, publisher, stuck, fine, hung):
        client = await RecordingClient(pod.ws_url).connect()  # (--no-auth)
        try:
            async with hung():
                for project in stuck:
                    await client.send(
                        {"type": "subscribe", "project_id": project, "presence": True}
                    )
                await client.send({"type": "unsubscribe", "project_id": stuck[0]})
                await client.send({"type": "ping"})
                for project in fine:
                    await client.send(
                        {"type": "subscribe", "project_id": project, "presence": True}
                    )
                await client.wait_for(
                    lambda: client.count("presence") == len(fine) and client.count("pong") == 1
                )
                cursor = await publisher.blocker_resolved(fine[0], blocker_id=1, answer="ok")
                await client.wait_for(lambda: client.events[fine[0]] == [cursor.seq])
                # Nothing about the hung projects yet: their wait is not over.
                assert not client.of("error"), client.of("error")
                await client.wait_for(lambda: client.count("error") == len(stuck) + 1, within=15)
            about = {
                project: [
                    (m["type"], m.get("code"))
                    for m in client.messages
                    if m.get("project_id") == project
                ]
                for project in stuck
            }
            # In the order of each project's frames: the unsubscribe answered after its
            # subscribe's refusal (the subscription was never made: not_subscribed).
            assert about == {
                stuck[0]: [("error", "unavailable"), ("error", "not_subscribed")],
                stuck[1]: [("error", "unavailable")],
                stuck[2]: [("error", "unavailable")],
            }
            await client.subscribe(stuck[1], presence=True)  # the master is back
        finally:
            await client.close()


async def test_a_stream_s_other_projects_are_subscribed_while_one_waits_for_a_hung_master(
    partial_cluster: RedisCluster,
):
    """The same over SSE: a stream of projects on two masters, presence asked, the hung
    master's projects first. The healthy ones are subscribed (with their presence) at once,
    and their events flow; the hung ones' subscribes are refused after --subscribe-timeout
    (an ``error`` each), and the stream goes on for the healthy ones: their events still come
    on it. Before, the stream's projects were subscribed one after the other: the healthy ones
    waited for the hung ones' timeouts (and never came when the first was refused); and later
    the first refusal ended the whole stream (1011)."""
    async with _pod_beside_a_hung_master(partial_cluster, 2) as (pod, publisher, stuck, fine, hung):
        async with hung():
            path = stream_path([*stuck, *fine]) + "&presence=1&partial=1"
            status, _, stream = await open_stream(pod.ws_url, path)
            assert status == 200
            head = []
            while sum(e.event == "presence" for e in head) < len(fine):
                head.append(await stream.next(within=2))
            cursor = await publisher.blocker_resolved(fine[0], blocker_id=1, answer="ok")
            event = await stream.next(within=2)
            assert event is not None and event.event == "message"
            assert json.loads(event.data)["seq"] == cursor.seq
            subscribed = [json.loads(e.data)["project_id"] for e in head if e.event == "subscribed"]
            assert sorted(subscribed) == sorted(fine)
            assert not [e for e in head if e.event == "error"]
            rest = []
            while sum(e.event == "error" for e in rest) < len(stuck):
                item = await stream.next(within=10)
                assert item is not None and item.event != "close", rest
                rest.append(item)
        errors = [json.loads(e.data) for e in rest if e.event == "error"]
        assert sorted((e["code"], e["project_id"]) for e in errors) == [
            ("unavailable", p) for p in sorted(stuck)
        ]
        # The stream goes on for the healthy projects.
        cursor = await publisher.blocker_resolved(fine[-1], blocker_id=2, answer="ok")
        event = await stream.next(within=2)
        assert event is not None and event.event == "message"
        assert json.loads(event.data)["seq"] == cursor.seq
        stream.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_publisher_new_to_a_node_publishes_there_while_another_master_hangs(
    partial_cluster: RedisCluster, kind: str
):
    """A node that never ran the publish script (a new publisher, a promoted replica, a
    restarted node) answers NOSCRIPT. Before, the publisher then loaded the script with
    SCRIPT LOAD, which redis-py sends to every master: with one of them hung, publishing to
    the healthy ones failed (PublisherUnavailable) for as long as it hung. The script is now
    sent with EVAL to the node of the project's slot alone."""
    cluster = partial_cluster
    url = cluster.url  # (seeded from the first master: not the one that hangs)
    spread = cluster.projects_by_master(range(1, 5000))
    healthy, hung = cluster.masters()[1:]
    project = spread[healthy][0]
    await asyncio.to_thread(hung.freeze)
    try:
        if kind == "sync":
            with Publisher.from_url(url, timeout=4) as bus:
                cursor = await asyncio.to_thread(
                    bus.blocker_resolved, project, blocker_id=1, answer="ok"
                )
        else:
            async with AsyncPublisher.from_url(url, timeout=4) as abus:
                cursor = await abus.blocker_resolved(project, blocker_id=1, answer="ok")
    finally:
        hung.thaw()
    assert cursor.seq == 1


async def test_gateway_reads_on_a_node_new_to_the_scripts_work_while_another_master_hangs(
    partial_cluster: RedisCluster,
):
    """The gateway's history and presence reads are scripts too: on a node that never ran
    them (a promoted replica, a restarted node) NOSCRIPT was followed by redis-py's SCRIPT
    LOAD, sent to every master, so one hung master made the reads of every other shard's
    projects fail. The text now goes with EVAL to the key's node alone."""
    cluster = partial_cluster
    url = cluster.url  # (seeded from the first master: not the one that hangs)
    spread = cluster.projects_by_master(range(1, 5000))
    healthy, hung = cluster.masters()[1:]
    project = spread[healthy][0]
    client = async_client(url, call_timeout=4.0)
    try:
        await client.ping()  # (the slot map loaded)
        await asyncio.to_thread(hung.freeze)
        try:
            history = HistoryStore(client, KEYS, ForeignValues(Metrics()))
            presence = PresenceStore(client, "pod1", publish_command="SPUBLISH")
            assert (await history.snapshot(project)).top == 0
            assert await presence.read(project) == {}
        finally:
            hung.thaw()
    finally:
        await client.aclose()


def test_a_publisher_reads_history_on_a_node_new_to_the_script_while_another_master_hangs(
    partial_cluster: RedisCluster,
):
    """``Publisher.history`` runs the SNAPSHOT script: after NOSCRIPT, redis-py's SCRIPT LOAD
    went to every master, and one hung master failed the read of a healthy shard's project."""
    cluster = partial_cluster
    url = cluster.url  # (seeded from the first master: not the one that hangs)
    spread = cluster.projects_by_master(range(1, 5000))
    healthy, hung = cluster.masters()[1:]
    project = spread[healthy][0]
    with Publisher.from_url(url, timeout=4) as bus:
        bus.client.execute_command("EVAL", "return 1", 1, KEYS.meta(project))  # (a connection)
        hung.freeze()
        try:
            page = bus.history(project)
        finally:
            hung.thaw()
    assert page.events == []


async def test_asyncio_clients_started_while_the_first_master_hangs_serve_the_others(
    partial_cluster: RedisCluster,
):
    """redis-py's asyncio cluster client reads the command table (COMMAND) from its "default
    node", the master of slot 0, once, when it first loads the slot map. With that master hung,
    an AsyncPublisher or a gateway started then failed every call, for every shard, for as long
    as it hung (each call loading the map again, and asking the hung node again). The table is
    now read from a node that answers, the seed first."""
    cluster = partial_cluster
    hung = cluster.master_of_slot(0)
    seed = next(master for master in cluster.masters() if master is not hung)
    project = next(p for p in range(1, 5000) if cluster.node_for_project(p) is seed)
    url = f"redis+cluster://{seed.address}"
    await asyncio.to_thread(hung.freeze)
    try:
        async with AsyncPublisher.from_url(url, timeout=4) as bus:
            cursor = await bus.blocker_resolved(project, blocker_id=1, answer="ok")
        client = async_client(url, call_timeout=4.0)
        try:
            history = HistoryStore(client, KEYS, ForeignValues(Metrics()))
            assert (await history.snapshot(project)).top == cursor.seq == 1
        finally:
            await client.aclose()
    finally:
        hung.thaw()


def test_a_publisher_started_while_the_first_master_hangs_serves_the_others(
    partial_cluster: RedisCluster,
):
    """The same for a synchronous Publisher: redis-py's cluster client reads the command table
    while it is built, from its default node, the master of slot 0. With that master hung,
    ``Publisher.from_url`` raised redis-py's TimeoutError, every time, although the seed (and
    the project's master) answered."""
    cluster = partial_cluster
    hung = cluster.master_of_slot(0)
    seed = next(master for master in cluster.masters() if master is not hung)
    project = next(p for p in range(1, 5000) if cluster.node_for_project(p) is seed)
    hung.freeze()
    try:
        with Publisher.from_url(f"redis+cluster://{seed.address}", timeout=4) as bus:
            cursor = bus.blocker_resolved(project, blocker_id=1, answer="ok")
    finally:
        hung.thaw()
    assert cursor.seq == 1


async def test_a_gateway_stays_ready_while_a_majority_of_the_masters_answer(
    partial_cluster: RedisCluster,
):
    """``/readyz`` was 503 while any master did not answer (its PING went to every master, its
    pub/sub wanted a link to each): one hung master made every pod of a deployment unready at
    once, and the load balancer then refused the projects of the shards that answer too. A pod
    is ready while a majority of the masters answer and keep their pub/sub link (the other
    shards' projects are served; the hung one's get ``unavailable`` and catch up later), and
    unready once a majority does not (a pod cut off from most of the cluster)."""
    cluster = partial_cluster
    first, second, _ = cluster.masters()
    with GatewayGroup() as gateways:
        (pod,) = await asyncio.to_thread(gateways.start, cluster.url, 1)
        await asyncio.to_thread(pod.wait_ready)
        await asyncio.to_thread(first.freeze)
        try:
            # The hung master's link is found down (its pings unanswered): pubsub_up is 0.
            deadline = asyncio.get_running_loop().time() + 30
            while (await asyncio.to_thread(pod.metrics))["eventbus_pubsub_up"] != 0:
                assert asyncio.get_running_loop().time() < deadline, "the hung link not noticed"
                await asyncio.sleep(0.2)
            status, body = await asyncio.to_thread(pod.readyz)
            assert status == 200, body
            await asyncio.to_thread(second.freeze)
            try:
                await asyncio.to_thread(pod.wait_ready, 30, status=503)
            finally:
                second.thaw()
        finally:
            first.thaw()


def test_a_publisher_started_while_its_seed_is_down_raises_publisher_unavailable():
    """A synchronous cluster client connects while it is built: with the URL's node down,
    ``Publisher.from_url`` raised redis-py's ``RedisClusterUnreachableError`` (not a
    ``RedisError``), which code that catches ``PublisherUnavailable`` (as the docs say to, for
    a Redis that cannot be reached) did not catch. (``AsyncPublisher`` connects at its first
    call, and says ``PublisherUnavailable`` there.)"""
    from publisher import PublisherUnavailable
    from tests.support.redis_server import free_port

    with pytest.raises(PublisherUnavailable, match="cannot be connected"):
        Publisher.from_url(f"redis+cluster://127.0.0.1:{free_port()}", timeout=2)


class _ClusterPods:
    """Presence services (pods) on a cluster, each with its own client and sharded pub/sub link
    (as a gateway has), their deliveries routed to Watchers."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.watchers: dict[str, Watcher] = {}
        self.closing: list = []

    def deliver(self, sessions, frame: bytes) -> None:
        for session in sessions:
            if session in self.watchers:
                self.watchers[session].receive(frame)

    async def start(
        self, name: str, ttl: float = 3.0, refresh_interval: float = 1.0
    ) -> PresenceService:
        client = async_client(self.url, call_timeout=10.0)  # the gateway's
        holder: list[PresenceService] = []
        link = ClusterPubSub(
            self.url,
            on_message=lambda channel, data: holder[0].on_message(channel, data),
            on_recovered=lambda channels: holder[0].reread_all(),
            metrics=Metrics(),
            probe_interval=1.0,
            probe_timeout=1.0,
        )
        service = PresenceService(
            client,
            self.deliver,
            pod_id=name,
            publish_command="SPUBLISH",
            link=link,
            ttl=ttl,
            refresh_interval=refresh_interval,
            flush_interval=0.05,
            diff_interval=0.2,
        )
        holder.append(service)
        link.start()
        await service.start()
        self.closing += [service.stop, link.close, client.aclose]
        return service

    async def watch(self, service: PresenceService, session: str, project_id: int) -> Watcher:
        watcher = self.watchers[session] = Watcher()
        async with asyncio.timeout(10):
            watcher.receive(await service.subscribe(session, project_id))
        return watcher

    async def close(self) -> None:
        for close in self.closing:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(close(), 5)


@pytest.mark.parametrize("trouble", ["hung", "down"])
async def test_presence_of_a_healthy_shard_goes_on_while_another_master_hangs(
    partial_cluster: RedisCluster, trouble: str
):
    """Pod a has members in a project of a healthy master and in one of a master that hangs
    (SIGSTOP) or is down (SIGKILL, restarted empty afterwards); pod b watches both. Meanwhile a
    member joining the healthy project is seen by b within seconds, and a's records there keep
    being refreshed (nobody leaves); once the master is back, the troubled project's members,
    those who joined meanwhile too, are seen. Before, a pod's presence writes and refreshes
    went in one pipeline for all its projects, which the troubled master failed whole: a's
    deadline in the healthy project was never pushed on while the master hung, so its
    members were shown as gone once their records expired."""
    cluster = partial_cluster
    spread = cluster.projects_by_master(range(1, 5000))
    troubled, healthy = cluster.masters()[:2]
    g, h = spread[healthy][0], spread[troubled][0]
    if trouble == "hung":
        begin, end = troubled.freeze, troubled.thaw
    else:
        begin, end = troubled.kill, lambda: cluster.restart(troubled)
    pods = _ClusterPods(cluster.url)
    try:
        a, b = await pods.start("a"), await pods.start("b")
        a.join("alice-tab", g, "alice", "Alice")
        a.join("hank-tab", h, "hank", "Hank")
        on_g, on_h = await pods.watch(b, "wg", g), await pods.watch(b, "wh", h)
        await on_g.until(lambda m: set(m) == {"alice"}, within=10)
        await on_h.until(lambda m: set(m) == {"hank"}, within=10)
        node = healthy.client()
        await asyncio.to_thread(begin)
        try:
            began_at = (await asyncio.to_thread(node.time))[0] * 1000
            a.join("hugo-tab", h, "hugo", "Hugo")  # in the same write round as bob
            a.join("bob-tab", g, "bob", "Bob")
            await on_g.until(lambda m: set(m) == {"alice", "bob"}, within=5)

            async def refreshed_past_ttls() -> bool:
                deadline = await asyncio.to_thread(node.zscore, KEYS.presence_pods(g), "a")
                return deadline is not None and deadline > began_at + 3 * 3000

            await eventually(refreshed_past_ttls, within=15)
            assert set(on_g.members) == {"alice", "bob"} and on_g.left == []
        finally:
            await asyncio.to_thread(end)
        a.join("carol-tab", h, "carol", "Carol")
        await on_h.until(lambda m: set(m) == {"hank", "hugo", "carol"}, within=20)
        a.join("dora-tab", g, "dora", "Dora")
        await on_g.until(lambda m: set(m) == {"alice", "bob", "dora"}, within=5)
    finally:
        await pods.close()


async def test_a_join_on_a_healthy_master_is_written_while_a_hung_masters_refresh_waits(
    partial_cluster: RedisCluster,
):
    """Pod a (the default refresh interval, 3 s: each master's pipeline has 1 s) refreshes its
    projects while one of their masters hangs (SIGSTOP): a member who joins a project of a
    healthy master meanwhile is written there while the hung master's refresh pipeline is still
    outstanding, and pod b sees him. Before, the round waited for every master's part of the
    refresh, the hung one's until its bound: at each refresh, a join on a healthy master was
    written up to 1 s late (and shown that late on every other pod)."""
    cluster = partial_cluster
    spread = cluster.projects_by_master(range(1, 5000))
    troubled, healthy = cluster.masters()[:2]
    g, h = spread[healthy][0], spread[troubled][0]
    pods = _ClusterPods(cluster.url)
    try:
        a = await pods.start("a", ttl=10.0, refresh_interval=3.0)
        b = await pods.start("b", ttl=10.0)
        a.join("alice-tab", g, "alice", "Alice")
        a.join("hank-tab", h, "hank", "Hank")
        on_g, on_h = await pods.watch(b, "wg", g), await pods.watch(b, "wh", h)
        await on_g.until(lambda m: set(m) == {"alice"}, within=10)
        await on_h.until(lambda m: set(m) == {"hank"}, within=10)  # (a's writes are done)
        outstanding = {troubled.address: 0}  # the hung master's pipelines sent, not ended
        hung_refresh = asyncio.Event()
        #: For each write pipeline sent to the healthy master after bob joined: the hung
        #: master's pipelines outstanding then.
        healthy_writes: list[int] = []
        joined = False
        pipeline = a.store._pipeline

        async def watched(calls):
            master = node_name(a.store.client, calls[0][1][0])
            if joined and master == healthy.address and calls[0][0] == WRITE:
                healthy_writes.append(outstanding[troubled.address])
            if master != troubled.address:
                return await pipeline(calls)
            outstanding[master] += 1
            if calls[0][0] == REFRESH:
                hung_refresh.set()
            try:
                return await pipeline(calls)
            finally:
                outstanding[master] -= 1

        await asyncio.to_thread(troubled.freeze)
        a.store._pipeline = watched  # type: ignore[method-assign]
        try:
            async with asyncio.timeout(10):  # the next refresh (within 3 s)
                await hung_refresh.wait()
            a.join("bob-tab", g, "bob", "Bob")
            joined = True
            await on_g.until(lambda m: set(m) == {"alice", "bob"}, within=5)
            assert healthy_writes[0] == 1, "the write waited for the hung master's refresh"
        finally:
            await asyncio.to_thread(troubled.thaw)
    finally:
        await pods.close()


async def test_presence_follows_a_hung_master_failed_over_to_its_replica(redis_cluster_factory):
    """Pod a has members in a project whose master hangs (SIGSTOP) and is failed over to its
    replica (cluster-node-timeout, 1 s), the old master staying hung; pod b watches. A member
    who joins after the failover is seen by b, and the members listed before stay listed."""
    cluster = redis_cluster_factory(3, 1)
    spread = cluster.projects_by_master(range(1, 5000))
    troubled = cluster.masters()[0]
    (replica,) = cluster.replicas_of(troubled)
    h = spread[troubled][0]
    pods = _ClusterPods(cluster.url)
    try:
        a, b = await pods.start("a"), await pods.start("b")
        a.join("hank-tab", h, "hank", "Hank")
        on_h = await pods.watch(b, "wh", h)
        await on_h.until(lambda m: set(m) == {"hank"}, within=10)
        await asyncio.to_thread(troubled.freeze)
        try:
            await asyncio.to_thread(
                cluster.wait_until,
                "the replica to take over",
                lambda: replica.role() == "master" or None,
            )
            a.join("hugo-tab", h, "hugo", "Hugo")
            try:
                await on_h.until(lambda m: set(m) == {"hank", "hugo"}, within=15)
            except TimeoutError:
                raise AssertionError(
                    f"b shows {set(on_h.members)}; a routes the project to {a.store.master_of(h)}"
                    f" (old master {troubled.address}, new {replica.address})"
                ) from None
            assert on_h.left == [], "a member of a healthy pod was shown leaving"
        finally:
            await asyncio.to_thread(troubled.thaw)
    finally:
        await pods.close()


async def test_replies_a_hung_master_sends_after_a_cut_off_presence_call_reach_no_later_call(
    partial_cluster: RedisCluster,
):
    """A presence refresh cut off by its per-master bound while the master hangs (SIGSTOP):
    after SIGCONT the master answers it (and runs it), but the next calls of that master read
    their own replies, never the late ones (redis-py drops a connection whose read was
    cancelled): a refresh of another project reports that project's pods, a read its records."""
    cluster = partial_cluster
    spread = cluster.projects_by_master(range(1, 5000))
    hung = cluster.masters()[0]
    p1, p2 = spread[hung][:2]
    client = async_client(cluster.url, call_timeout=10.0)
    x = PresenceStore(client, "x", publish_command="SPUBLISH", group_timeout=0.3)
    y = PresenceStore(client, "y", publish_command="SPUBLISH", group_timeout=0.3)
    record = PodRecord(name=None, viewing=None, answering=None, since=1, at=1)
    try:
        # The first calls also connect to the master: not bounded by the cut-off's 0.3 s (a
        # busy machine took longer, and the test failed before the master ever hung).
        x.group_timeout = y.group_timeout = 10.0
        assert await x.write([Write(p1, 0, 7, {"xavier": record})]) == [True]
        assert await y.write([Write(p2, 0, 9, {"yann": record})]) == [True]
        x.group_timeout = y.group_timeout = 0.3
        await asyncio.to_thread(hung.freeze)
        try:
            # Sent on the connection the calls above left in the pool (a new one would wait
            # in its handshake, nothing sent); one master: its failure is the call's.
            with pytest.raises(redis.exceptions.TimeoutError):
                await x.write([Write(p1, 7, 8, {"xena": record})])
            with pytest.raises(redis.exceptions.TimeoutError):
                await x.refresh({p1: 8})
        finally:
            await asyncio.to_thread(hung.thaw)
        x.group_timeout = y.group_timeout = 10.0  # (what follows reconnects, on a busy machine)
        for _ in range(3):
            replies = await y.refresh({p2: 9})
            assert replies == {p2: (True, {"y": 9})}
            assert set(await y.read(p2)) == {"y"}
            assert (await y.read(p2))["y"].records.keys() == {"yann"}
        # The late write ran when the master woke up: its reply was lost, not its effect.
        assert (await x.read(p1))["x"].version == 8
    finally:
        await client.aclose()


async def test_presence_follows_a_slot_migrated_between_two_rounds_and_during_one(
    redis_cluster_factory,
):
    """A project's slot moves to another master while pods run (the slot map of their clients
    changes between a round's grouping and its sending, and the writes and refreshes of the
    migration meet MOVED and ASK): the members listed stay listed, and a member who joins
    during and after the move is seen by the other pod."""
    cluster = redis_cluster_factory(3, 0)
    spread = cluster.projects_by_master(range(1, 5000))
    source, target = cluster.masters()[:2]
    h = spread[source][0]
    slot = cluster.project_slot(h)
    pods = _ClusterPods(cluster.url)
    try:
        a, b = await pods.start("a"), await pods.start("b")
        a.join("hank-tab", h, "hank", "Hank")
        on_h = await pods.watch(b, "wh", h)
        await on_h.until(lambda m: set(m) == {"hank"}, within=10)
        migration = await asyncio.to_thread(cluster.start_slot_migration, slot, target)
        await asyncio.to_thread(migration.move_keys)
        a.join("hugo-tab", h, "hugo", "Hugo")  # while MIGRATING/IMPORTING: ASK
        await on_h.until(lambda m: set(m) == {"hank", "hugo"}, within=10)
        await asyncio.sleep(2.5)  # refreshes of the moved keys, still ASKed
        await asyncio.to_thread(migration.finish)
        a.join("hilda-tab", h, "hilda", "Hilda")  # the clients learn the move from MOVED
        await on_h.until(lambda m: set(m) == {"hank", "hugo", "hilda"}, within=10)
        await asyncio.sleep(4.0)  # past a ttl: every record was refreshed where it lives now
        assert set(on_h.members) == {"hank", "hugo", "hilda"} and on_h.left == []
        assert a.store.master_of(h) == target.address
    finally:
        await pods.close()


@contextlib.asynccontextmanager
async def _hanks_master_hung(cluster: RedisCluster):
    """Pod a lists hank in project h and alice in a project of a healthy master (so that a
    healthy master answers a's calls); pod b watches h. Then h's master hangs (SIGSTOP, to be
    shorter than a's ttl of 10 s): yields ``(a, h, on_h, thaw)`` (b's view of h; ``thaw`` makes
    the master answer again) once a's refresh found the master hung, so that a's writes of h
    wait for the next refresh that reaches it. The master is thawed at the end in any case."""
    spread = cluster.projects_by_master(range(1, 5000))
    troubled, healthy = cluster.masters()[:2]
    h, g = spread[troubled][0], spread[healthy][0]
    pods = _ClusterPods(cluster.url)
    frozen = False

    async def thaw() -> None:
        nonlocal frozen
        if frozen:
            frozen = False
            await asyncio.to_thread(troubled.thaw)

    try:
        a, b = await pods.start("a", ttl=10.0), await pods.start("b", ttl=10.0)
        a.join("alice-tab", g, "alice", "Alice")
        a.join("hank-tab", h, "hank", "Hank")
        on_h = await pods.watch(b, "wh", h)
        await on_h.until(lambda m: set(m) == {"hank"}, within=10)
        await asyncio.to_thread(troubled.freeze)
        frozen = True

        async def found_hung() -> bool:
            return a._waits_for_refresh(h)

        await eventually(found_hung, within=5)
        yield a, h, on_h, thaw
    finally:
        await thaw()
        await pods.close()


async def _write_taken(pod: PresenceService) -> None:
    """Until the pod took its pending writes (those of a hung master's project: put off)."""

    async def taken() -> bool:
        return not pod.core.has_pending_writes()

    await eventually(taken, within=5)


async def test_a_member_who_left_while_the_master_hung_is_gone_soon_after_it_answers(
    partial_cluster: RedisCluster,
):
    """Hank, pod a's only member in a project, closes his tab while the project's master hangs
    (SIGSTOP, shorter than a's ttl; a's refresh already found it hung, so the write waits).
    Once the master answers, pod b shows him leaving within a few refresh intervals. Before,
    a had nothing of the project left to refresh and never wrote the removal: b listed him
    until a's records expired (ttl, 10 s here) and three refresh reports missed them, as if
    pod a had died. (Had the write been sent, it would have run late, once the master woke
    up; and with no other master answering a's calls, they fail whole and are retried.)"""
    async with _hanks_master_hung(partial_cluster) as (a, _, on_h, thaw):
        a.close_session("hank-tab")
        await _write_taken(a)
        await thaw()
        await on_h.until(lambda m: not m, within=4.0)


async def test_a_member_who_joined_while_the_master_hung_is_seen_once_it_answers(
    partial_cluster: RedisCluster,
):
    """Hugo joins a project of pod a while its master hangs (a's refresh already found it hung,
    so the write waits), and nothing changes after: once the master answers, the next refresh
    that reaches it writes a's members there whole, and pod b sees him, with hank still
    listed (nobody shown leaving)."""
    async with _hanks_master_hung(partial_cluster) as (a, h, on_h, thaw):
        a.join("hugo-tab", h, "hugo", "Hugo")
        await _write_taken(a)
        await thaw()
        await on_h.until(lambda m: set(m) == {"hank", "hugo"}, within=4.0)
        assert on_h.left == []


async def test_a_drain_sets_the_grace_on_the_healthy_masters_while_another_master_hangs(
    partial_cluster: RedisCluster,
):
    """A pod drains while one master of its projects hangs (SIGSTOP) with a write of its to
    send (a member left there), within the 2 s the gateway gives the presence drain
    (``CLOSE_STEP_TIMEOUT``), with a refresh interval of 6 s: each master's pipeline has 2 s.
    The pod's deadline on the healthy master is set to the grace all the same. Before, the
    drain waited for every master's writes, the hung one's until its bound, before sending
    any refresh: the gateway's bound cut it off first, and the healthy master's members
    expired at the ttl, not the grace."""
    cluster = partial_cluster
    spread = cluster.projects_by_master(range(1, 5000))
    troubled, healthy = cluster.masters()[:2]
    g, h = spread[healthy][0], spread[troubled][0]
    client = async_client(cluster.url, call_timeout=10.0)
    service = PresenceService(
        client,
        lambda sessions, frame: None,
        pod_id="a",
        listen=False,
        publish_command="SPUBLISH",
        ttl=13.0,
        refresh_interval=6.0,
        drain_grace=60.0,
    )
    node = healthy.client()
    try:
        service.join("alice-tab", g, "alice", "Alice")
        service.join("hank-tab", h, "hank", "Hank")
        service.join("hugo-tab", h, "hugo", "Hugo")
        await cluster_round(service)  # (what the loop's rounds would have written by now)
        await asyncio.to_thread(troubled.freeze)
        try:
            service.leave("hank-tab", h)  # a write of the hung master's, for the drain
            began_at = (await asyncio.to_thread(node.time))[0] * 1000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):  # the gateway's bound (CLOSE_STEP_TIMEOUT)
                    await service.drain()
            deadline = await asyncio.to_thread(node.zscore, KEYS.presence_pods(g), "a")
            assert deadline is not None and deadline > began_at + 30_000, "not the grace"
        finally:
            await asyncio.to_thread(troubled.thaw)
    finally:
        await service.stop()
        await client.aclose()
        node.close()


@contextlib.asynccontextmanager
async def one_master_failed_over_and_another_hung(cluster):
    """The first master hung until its replica has taken over, then the third hung with its
    replicas (its slots unserved: no failover of it), two of the three masters serving the
    slots answering, until the block ends."""
    first, _, third = cluster.masters()
    (promoted,) = cluster.replicas_of(first)
    frozen = [first]
    await asyncio.to_thread(first.freeze)
    try:
        await asyncio.to_thread(
            cluster.wait_until,
            "the replica to take over",
            lambda: promoted.role() == "master" or None,
        )
        for node in (*cluster.replicas_of(third), third):  # (its replicas first)
            await asyncio.to_thread(node.freeze)
            frozen.append(node)
        yield
    finally:
        for node in frozen:
            node.thaw()


async def test_the_http_api_s_readyz_follows_a_master_failed_over_to_its_replica(
    redis_cluster_factory,
):
    """The HTTP API's ``/readyz`` asks the masters of redis-py's slot map, each PING cut off at
    ``--ready-timeout``, a bound redis-py never sees: a master hung and failed over to its replica
    stayed in the map, asked and unanswered by every probe, its replica never asked (redis-py
    reloads its map only after errors it sees itself, and an unready process gets no publish
    whose own timeout would show it one). Another master then hung (its slots unserved, the
    replica's too), the process said "2 of 3 masters" not ready for good, where two of the three
    masters serving the slots answered. The unanswered master is reported to redis-py, whose
    next call reloads the map."""
    from tests.test_http_api_reads import ReadApi, _serve

    cluster = redis_cluster_factory(3, 1, extra_args=PARTIAL)
    async with _serve(cluster.url, redis_timeout=3.0, ready_timeout=0.5) as (_, _, port):
        api = ReadApi(port)
        assert (await api.get("/readyz", key=None))[0] == 200
        async with one_master_failed_over_and_another_hung(cluster):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while (answer := await api.get("/readyz", key=None))[0] != 200:
                assert loop.time() < deadline, answer[2]  # (each probe: 0.5 s at most)
            assert answer[2] == {"ready": True}


async def test_the_gateway_s_readiness_ping_follows_a_master_failed_over_to_its_replica(
    redis_cluster_factory,
):
    """The gateway's readiness PING (``HistoryStore.ping``) asks the masters of redis-py's slot
    map, each cut off at the readiness bound, which redis-py never sees: a master hung and failed
    over to its replica stayed in the map, asked and unanswered by every probe. With another
    master then hung (its slots unserved), an idle pod said not ready for good, where two of the
    three masters serving the slots answered."""
    cluster = redis_cluster_factory(3, 1, extra_args=PARTIAL)
    client = async_client(cluster.url, call_timeout=4.0)
    store = HistoryStore(client, KEYS, ForeignValues(Metrics()))
    try:
        assert await store.ping(0.5)
        async with one_master_failed_over_and_another_hung(cluster):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while not await store.ping(0.5):
                assert loop.time() < deadline, "not ready: the map still names the old master"
    finally:
        await client.aclose()
