"""Scale-out and faults with real processes: several gateway processes, restarts, kills, a Redis
that loses everything; every client's full record compared with what was published.

Gateways run as ``python -m gateway`` subprocesses (:mod:`tests.support.gateway_process`), clients
are :class:`~tests.support.ws_client.ResumingClient` s that reconnect round robin over the
gateways and resume from their cursors, and publishers publish identifiable events. At the end
:func:`~tests.support.ws_client.verify_clients` checks that each client received each event of
its projects exactly once, in order, with no gap, or an allowed ``resync_required``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest
import redis
import redis.asyncio

from publisher import PublisherUnavailable, issue_token
from schemas.keys import Keys
from tests.support.gateway_process import GatewayGroup, GatewayProcess
from tests.support.redis_server import RedisServer, hung
from tests.support.ws_client import (
    Publishers,
    ResumingClient,
    stop_clients,
    verify_clients,
    wait_live,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KEYS = Keys()
SECRET = "fault-tests-secret-of-at-least-32-bytes"


def plain_link(url: str, *, metrics=None, on_message=None, **options):
    """A pub/sub link (not sharded) to ``url`` for the link's own tests: messages dropped unless
    ``on_message`` takes them, resubscribes ignored; ``options`` are PubSubLink's own (probe
    times, connect timeout)."""
    from gateway.metrics import Metrics
    from gateway.pubsub import PubSubLink

    return PubSubLink(
        url,
        sharded=False,
        on_message=on_message or (lambda channel, data: None),
        on_resubscribed=lambda: None,
        metrics=metrics if metrics is not None else Metrics(),
        **options,
    )


@pytest.fixture
def gateways():
    with GatewayGroup() as group:
        yield group


def make_clients(
    pods: list[GatewayProcess],
    projects: list[int],
    count: int,
    per_client: int,
    *,
    seed: int,
    auth: bool = False,
) -> list[ResumingClient]:
    """``count`` clients, each on ``per_client`` random projects, spread over the pods."""
    rng = random.Random(seed)
    urls = [pod.ws_url for pod in pods]
    clients = []
    for i in range(count):
        followed = rng.sample(projects, per_client)
        token = issue_token(SECRET, followed, ttl=600, subject=f"client-{i}") if auth else None
        clients.append(ResumingClient(urls, followed, token=token, start=i, name=str(i)))
    return [client.start() for client in clients]


async def test_three_gateways_many_clients_every_event_exactly_once(
    redis_url: str, gateways: GatewayGroup
):
    projects = list(range(1, 11))
    pods = await asyncio.to_thread(gateways.start, redis_url, 3)
    clients = make_clients(pods, projects, 30, 3, seed=1)
    publishers = Publishers(redis_url, projects, count=4, rate=100)
    try:
        await wait_live(clients)
        assert {c.url for c in clients} == {p.ws_url for p in pods}
        publishers.start()
        await publishers.wait_published(1500)
        await publishers.stop()
        state = await verify_clients(clients, redis_url, keys=KEYS)
    finally:
        await publishers.stop()
        await stop_clients(clients)
    assert sum(cursor[1] for cursor, _ in state.values()) >= 1500
    assert all(c.stats.connects == 1 for c in clients), "nobody should have been disconnected"


async def test_rolling_restart_loses_nothing(redis_url: str, gateways: GatewayGroup):
    """SIGTERM each gateway in turn (and start it again) while events flow: its clients are
    closed with 1012, resume on the others from their cursors, and miss nothing."""
    projects = list(range(1, 9))
    pods = await asyncio.to_thread(
        gateways.start, redis_url, 3, auth_secret=SECRET, args=["--drain-timeout", "5"]
    )
    clients = make_clients(pods, projects, 24, 3, seed=2, auth=True)
    publishers = Publishers(redis_url, projects, count=3, rate=100)
    try:
        await wait_live(clients)
        publishers.start()
        for pod in pods:
            await publishers.wait_published(150)
            moved = [c for c in clients if c.url == pod.ws_url]
            assert moved
            assert await asyncio.to_thread(pod.terminate) == 0
            for client in moved:
                await client.wait_for(
                    lambda c=client, gone=pod.ws_url: (
                        c.url not in (None, gone) and c.live == set(c.projects)
                    ),
                    20,
                    "resumed on another gateway",
                )
                assert 1012 in client.stats.close_codes
            await asyncio.to_thread(pod.start)
        await publishers.wait_published(150)
        await publishers.stop()
        await verify_clients(clients, redis_url, keys=KEYS)
    finally:
        await publishers.stop()
        await stop_clients(clients)


async def test_a_killed_gateway_loses_nothing(redis_url: str, gateways: GatewayGroup):
    """SIGKILL: no drain, no close frame. The clients see their connections drop, reconnect to
    the other gateways and resume; nothing is lost."""
    projects = list(range(1, 9))
    pods = await asyncio.to_thread(gateways.start, redis_url, 3)
    clients = make_clients(pods, projects, 24, 3, seed=3)
    publishers = Publishers(redis_url, projects, count=3, rate=100)
    try:
        await wait_live(clients)
        publishers.start()
        await publishers.wait_published(300)
        victim = pods[0]
        orphans = [c for c in clients if c.url == victim.ws_url]
        assert orphans
        assert await asyncio.to_thread(victim.kill) == -9
        for client in orphans:
            await client.wait_for(
                lambda c=client: c.url not in (None, victim.ws_url) and c.live == set(c.projects),
                20,
                "resumed on another gateway",
            )
        await publishers.wait_published(300)
        await publishers.stop()
        await verify_clients(clients, redis_url, keys=KEYS)
    finally:
        await publishers.stop()
        await stop_clients(clients)
    assert all(c.stats.connects == 2 for c in orphans)
    assert all(1006 in c.stats.close_codes for c in orphans)


async def test_redis_restarted_empty_gives_resync_then_exactly_once(gateways: GatewayGroup):
    """Redis dies and comes back without its data. Publishers raise PublisherUnavailable while
    it is down and work again after; gateways report 503 on /readyz meanwhile, recover by
    themselves (pub/sub reconnects in /metrics); every client gets ``resync_required``
    (epoch_changed) for each project, then every later event exactly once."""
    projects = list(range(1, 5))
    with RedisServer() as server:
        url = server.url
        pods = await asyncio.to_thread(gateways.start, url, 2, args=["--probe-interval", "1"])
        clients = make_clients(pods, projects, 10, 2, seed=4)
        publishers = Publishers(url, projects, count=2, rate=60)
        try:
            await wait_live(clients)
            publishers.start()
            await publishers.wait_published(100)
            before = [pod.metrics()["eventbus_pubsub_reconnects_total"] for pod in pods]

            await asyncio.to_thread(server.kill)
            await wait_until(lambda: publishers.unavailable > 0, 20, "a publisher to fail")
            errors = [loop.last_error for loop in publishers.loops if loop.last_error]
            assert all(isinstance(e, PublisherUnavailable) for e in errors)
            for pod in pods:
                await asyncio.to_thread(pod.wait_ready, 20, status=503)
                status, body = pod.readyz()
                assert status == 503 and body["checks"]["redis"] is False, body

            await asyncio.to_thread(server.start)
            for pod in pods:
                await asyncio.to_thread(pod.wait_ready, 20)
            await publishers.wait_published(150)
            await publishers.stop()
            await verify_clients(clients, url, keys=KEYS, allowed_resyncs={"epoch_changed"})
        finally:
            await publishers.stop()
            await stop_clients(clients)
        after = [pod.metrics()["eventbus_pubsub_reconnects_total"] for pod in pods]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    for client in clients:
        for project_id in client.projects:
            reasons = [r.reason for r in client.resyncs(project_id)]
            assert reasons and set(reasons) == {"epoch_changed"}, (client.name, reasons)


async def test_a_rewritten_history_gives_history_lost_never_a_silent_swap(
    redis_url: str, redis_client: redis.Redis, gateways: GatewayGroup
):
    """What an asynchronously replicated failover can do (see test_cluster_gateway for the real
    thing): events 8..10 were relayed, then lost, and their numbers are handed out again to new
    events. Clients must be told ``resync_required`` (history_lost), not be given event 11 as if
    8..10 were still the history."""
    project = 1
    (pod,) = await asyncio.to_thread(
        gateways.start, redis_url, 1, args=["--reconcile-interval", "3600"]
    )
    clients = make_clients([pod], [project], 3, 1, seed=5)
    publishers = Publishers(redis_url, [project], count=1, rate=1)
    loop = publishers.loops[0]
    try:
        await wait_live(clients)
        for _ in range(10):
            await loop.publish_one(project)
        await wait_until(
            lambda: all(c.cursors[project][1] == 10 for c in clients), 10, "events 1..10"
        )
        # The "failover": the new master never got the last three events.
        stream = KEYS.stream(project)
        kept = redis_client.xrange(stream, "-", "7-0")
        with redis_client.pipeline(transaction=True) as pipe:
            pipe.delete(stream)
            for entry_id, fields in kept:
                pipe.xadd(stream, fields, id=entry_id)
            pipe.hset(KEYS.meta(project), "seq", 7)
            pipe.execute()
        for _ in range(4):
            await loop.publish_one(project)  # 8', 9', 10', 11'
        await verify_clients(clients, redis_url, keys=KEYS, allowed_resyncs={"history_lost"})
    finally:
        await publishers.stop()
        await stop_clients(clients)
    for client in clients:
        assert [r.reason for r in client.resyncs(project)] == ["history_lost"]


async def test_the_probe_of_an_idle_link_does_not_break_it(
    redis_url: str, redis_client: redis.Redis, gateways: GatewayGroup
):
    """A pub/sub connection with no channel left is out of subscribed mode, and Redis answers
    its probe PING with a plain PONG, not the subscribed-mode ["pong", ""]. Either is a pong: a
    quiet pod (every client gone) must not see probe failures, reconnects and readiness flaps."""
    (pod,) = await asyncio.to_thread(
        gateways.start, redis_url, 1, args=["--probe-interval", "0.3", "--probe-timeout", "0.3"]
    )
    clients = make_clients([pod], [1], 1, 1, seed=6)
    await wait_live(clients)
    await stop_clients(clients)  # the project is unsubscribed: no channel left on the link
    await wait_until(lambda: pod.metrics()["eventbus_subscriptions"] == 0, 10, "unsubscribed")

    def pings() -> int:
        return int(redis_client.info("commandstats").get("cmdstat_ping", {}).get("calls", 0))

    start = pings()
    await wait_until(lambda: pings() >= start + 5, 10, "five probes")
    metrics = pod.metrics()
    assert metrics["eventbus_pubsub_probe_failures_total"] == 0
    assert metrics["eventbus_pubsub_reconnects_total"] == 0


async def test_the_pubsub_reconnect_backoff_starts_again_after_a_healthy_period(redis_url: str):
    """Issue 11 #9: after a few quick reconnects, a link that then stayed healthy must reconnect
    with the base delay (50 ms), not the capped one (2 s) for the rest of the process's life."""
    admin = redis.Redis.from_url(redis_url)  # the private server: killing its clients is fine
    link = plain_link(redis_url)
    link.healthy_period = 0.5
    link.start()
    try:
        async with asyncio.timeout(10):
            await link.subscribe(b"backoff-test")

        async def kill_and_wait_for_the_reconnect() -> None:
            connections = link.connections
            assert admin.client_kill_filter(_type="pubsub") >= 1
            await wait_until(
                lambda: link.connections > connections and link.alive, 15, "the reconnect", 0.01
            )

        for _ in range(4):  # each one right after the reconnect: never healthy for 0.5 s
            await kill_and_wait_for_the_reconnect()
        assert link.backoff_attempts == 4
        await asyncio.sleep(0.6)  # the time that makes the connection healthy (no event to await)
        await kill_and_wait_for_the_reconnect()
        assert link.backoff_attempts == 1  # the base delay again
    finally:
        await link.close()
        admin.close()


async def test_a_loop_busy_past_the_probe_timeout_does_not_reconnect_a_live_link(redis_url):
    """The event loop busy (a long collection, a blocking call) from just after the probe's ping
    until past the probe's timeout, while Redis answered at once: the pong is read in the same
    turn of the loop as the timeout fires, and the link is not dead. No probe failure and no
    reconnect (each reconnect catches up every project of the pod from the streams); before,
    each such pause cost one."""
    from gateway.metrics import Metrics

    metrics = Metrics()
    link = plain_link(redis_url, metrics=metrics, probe_interval=0.2, probe_timeout=0.2)
    link.start()
    try:
        async with asyncio.timeout(10):
            await link.subscribe(b"busy-loop-test")
        conn = link._conn
        send = conn.send_command
        pings = 0

        async def send_then_busy(*args, **kwargs) -> None:
            nonlocal pings
            await send(*args, **kwargs)
            if args[0] == "PING":
                pings += 1
                if pings <= 3:
                    time.sleep(0.4)  # noqa: ASYNC251 (the loop busy past the probe timeout)

        conn.send_command = send_then_busy
        # Three pauses, then one more ping on the same connection (or a reconnect).
        await wait_until(lambda: pings >= 4 or link.connections > 1, 10, "four probes", 0.01)
        assert (metrics.pubsub_probe_failures_total, link.connections) == (0, 1)
    finally:
        await link.close()


async def test_a_backlog_read_past_the_probe_timeout_does_not_reconnect_a_live_link(
    redis_url: str, redis_client: redis.Redis
):
    """A burst the pod reads slower than Redis sends it (a handler taking 4 ms a message, 250
    messages: 1 s of backlog, twice the probe's timeout of 0.5 s): the probe's pong
    comes behind the backlog. Whole frames read meanwhile show the link delivers: no probe
    failure, no reconnect (whose catch-up of every project would load a pod that is already
    behind), every message once, in order. Before, the probe reconnected the live link, and the
    messages still queued on the old connection were lost to it."""
    from gateway.metrics import Metrics

    # 1 s of backlog against a pong wait of up to 3 s (PONG_WINDOWS x 0.5 s): room for a busy
    # machine reading the backlog slower than the handler alone would.
    count, probe_timeout = 250, 0.5
    # 8 KiB each: a few dozen a read (asyncio reads up to 256 KiB at once), so the probe runs
    # between reads every 0.1 to 0.2 s of backlog.
    payloads = [b"%05d" % i + b"x" * 8192 for i in range(count)]
    received: list[bytes] = []
    done = asyncio.Event()

    def slow_handler(channel: bytes, data: bytes) -> None:
        time.sleep(0.004)  # a handler slower than Redis sends: the backlog
        received.append(data)
        if len(received) == count:
            done.set()

    metrics = Metrics()
    link = plain_link(
        redis_url,
        metrics=metrics,
        on_message=slow_handler,
        probe_interval=0.05,
        probe_timeout=probe_timeout,
    )
    loop = asyncio.get_running_loop()
    link.start()
    try:
        async with asyncio.timeout(10):
            await link.subscribe(b"backlog-test")
        conn = link._conn
        send = conn.send_command
        pings: list[float] = []

        async def noting_pings(*args, **kwargs) -> None:
            if args[0] == "PING":
                pings.append(loop.time())
            await send(*args, **kwargs)

        conn.send_command = noting_pings
        with redis_client.pipeline(transaction=False) as pipe:  # the burst, all queued at once
            for payload in payloads:
                pipe.publish(b"backlog-test", payload)
            pipe.execute()
        started = loop.time()
        await wait_until(lambda: done.is_set() or link.connections > 1, 30, "the burst", 0.01)
        ended = loop.time()
        assert link.connections == 1
        assert received == payloads
        assert (metrics.pubsub_probe_failures_total, metrics.pubsub_reconnects_total) == (0, 0)
        # The case at hand: a ping went out with more than a probe timeout of backlog after it.
        assert any(started <= t < ended - 1.5 * probe_timeout for t in pings), (
            started,
            ended,
            pings,
        )
    finally:
        await link.close()


@pytest.mark.parametrize("frames", [True, False], ids=["frames-flowing", "silent"])
async def test_a_link_that_loses_its_pings_is_reconnected_frames_or_not(
    redis_url: str, frames: bool
):
    """The link's writes are lost (a path that still forwards Redis's pushes, not what the pod
    sends): the probe's pings never get a pong. With messages still arriving, each probe
    timeout that read whole frames waits one more, up to 6 in all (PONG_WINDOWS), and the link
    then reconnects all the same; with nothing arriving, it reconnects after one, as before."""
    from gateway.metrics import Metrics
    from gateway.pubsub import PONG_WINDOWS

    probe_timeout = 0.3
    metrics = Metrics()
    link = plain_link(redis_url, metrics=metrics, probe_interval=0.05, probe_timeout=probe_timeout)
    loop = asyncio.get_running_loop()
    publisher = redis.asyncio.Redis.from_url(redis_url)
    link.start()
    feeding: asyncio.Task | None = None
    stopping = False
    try:
        async with asyncio.timeout(10):
            await link.subscribe(b"lost-pings")
        lost: list[float] = []

        async def losing_pings(*args, **kwargs) -> None:
            if args[0] == "PING":
                lost.append(loop.time())  # never written: no pong ever
            else:
                raise AssertionError(f"unexpected write {args!r}")

        async def feed() -> None:
            while not stopping:  # (not cancelled: redis-py may lose a cancellation)
                await publisher.publish(b"lost-pings", b"still flowing")
                await asyncio.sleep(0.02)

        if frames:
            feeding = asyncio.create_task(feed())
        link._conn.send_command = losing_pings
        await wait_until(lambda: link.connections > 1, 10, "the reconnect", 0.01)
        reconnected = loop.time()
        assert len(lost) == 1, lost
        waited = reconnected - lost[0]
        assert metrics.pubsub_probe_failures_total == 1
        if frames:
            assert PONG_WINDOWS * probe_timeout <= waited < PONG_WINDOWS * probe_timeout + 1.5
        else:
            # After one timeout, not six (the bound leaves a loaded machine 1.5 s of slack).
            assert probe_timeout <= waited < PONG_WINDOWS * probe_timeout, waited
    finally:
        stopping = True
        if feeding is not None:
            await feeding
        await link.close()
        await publisher.aclose()


class _CancellationLost:
    """A link's task whose cancellation is lost (as redis-py's writes lose one on Python 3.11:
    they go through asyncio.wait_for, which returns normally when the write ended as the
    cancellation came); awaiting it awaits the task, shielded (a timeout of the waiter must not
    cancel it either)."""

    def __init__(self, task: asyncio.Task) -> None:
        self.task = task

    def cancel(self, *args: object) -> bool:
        return False

    def __await__(self):
        return asyncio.shield(self.task).__await__()


async def test_a_closing_link_whose_cancellation_was_lost_ends_without_reconnecting(redis_url):
    """close() marks the link closing and cancels its task. A cancellation lost on the way (see
    _CancellationLost) left the task running: the probe then dropped its connection (a closing
    link writes nothing), and the link reconnected, again and again, each new connection dropped
    the same way, while close() waited for the task for ever. Seen once in 15 runs of a test
    that closed a link just after it reconnected. A closing link ends instead of reconnecting."""
    link = plain_link(redis_url, probe_interval=0.05, probe_timeout=0.3)
    link.start()
    task = link._task
    assert task is not None
    try:
        async with asyncio.timeout(10):
            await link.subscribe(b"closing")
        link._task = _CancellationLost(task)  # type: ignore[assignment]
        async with asyncio.timeout(2):  # (close() swallows the cancellation of its own wait)
            await link.close()
        assert task.done() and not task.cancelled(), "the link's task went on"
        assert link.connections == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_subscribe_written_as_the_link_drops_its_connection_opens_no_other_one(
    redis_url: str, redis_client: redis.Redis
):
    """A subscribe whose write comes after redis-py disconnected the link's connection (a
    failed write: the probe's ping, another subscribe) and the link dropped its socket, before
    the reader noticed: it writes nothing, and the reconnect subscribes the channel. Before,
    redis-py connected that connection object again to write it: a second subscribed
    connection that nobody read (Redis kept its messages until its output buffer limit) and a
    socket the link no longer knew about."""
    link = plain_link(redis_url)
    link.start()
    try:
        async with asyncio.timeout(10):
            await link.subscribe(b"first")
        late = asyncio.create_task(link.subscribe(b"late"))  # its write: in the next turns
        await link._conn.disconnect(nowait=True)  # (what redis-py does after a failed write)
        link._drop_socket()  # (and the link then)
        async with asyncio.timeout(10):
            assert await late  # confirmed, on the new connection
        assert link.connections == 2
        assert len(redis_client.client_list(_type="pubsub")) == 1
    finally:
        await link.close()


async def test_a_pubsub_connect_to_a_peer_that_never_answers_is_given_up_and_retried(redis_url):
    """A Redis that accepts the connection and never answers its handshake (a hung server, a
    dead proxy): each connection is given up after the link's connect timeout and tried again
    on the backoff, even with no socket timeout on the connection (redis-py before 8 set none),
    and once it answers the link subscribes."""
    from tests.support.tcp_proxy import FreezableProxy

    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    proxy = FreezableProxy(host, int(port))
    proxy.freeze()
    link = plain_link(f"redis://127.0.0.1:{proxy.port}", connect_timeout=0.5)
    link._pool.connection_kwargs["socket_timeout"] = None  # as redis-py 5's default
    link.start()
    try:
        await wait_until(lambda: link.backoff_attempts >= 2, 10, "two connects given up", 0.01)
        assert not link.connected
        proxy.thaw()
        async with asyncio.timeout(10):
            await link.subscribe(b"connect-timeout-test")
        assert link.alive
    finally:
        await link.close()
        proxy.close()


async def test_a_pubsub_link_comes_back_after_more_than_a_thousand_failed_connects(
    redis_url, monkeypatch
):
    """Redis away for a long outage (with the default delays, over 1,000 reconnects are some
    17 minutes of refused connections): once it answers, the link subscribes. Before, the
    backoff computed ``0.05 * 2**attempt`` before capping it, which raised OverflowError at the
    1,024th delay, out of the link's task: the pod never had a pub/sub connection again, for
    its life. (The delays are capped at 0 here so that the test takes seconds: the overflow
    came before the cap.)"""
    import functools

    import gateway.pubsub
    from tests.support.fake_resp import FakeResp, proxy, then_close

    monkeypatch.setattr(
        gateway.pubsub, "backoff_delays", functools.partial(gateway.pubsub.backoff_delays, cap=0)
    )
    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    with FakeResp((host, int(port)), lambda command: then_close(b"")) as fake:
        link = plain_link(fake.url)
        link.start()
        try:
            await wait_until(lambda: link.backoff_attempts > 1100, 60, "1,100 failed connects")
            fake.answer = proxy
            async with asyncio.timeout(10):
                await link.subscribe(b"long-outage-test")
            assert link.alive
        finally:
            await link.close()


async def test_gateway_reads_recover_from_a_hung_redis_with_nothing_lost(monkeypatch):
    """Redis stopped (SIGSTOP: sockets open, no answer) under live subscribers: the gateway stays
    responsive, its periodic checks give up in time instead of piling up, and once Redis answers
    again a lost message is still repaired and every event arrives in order."""

    import gateway.hub
    from gateway.config import GatewayConfig
    from gateway.server import Gateway
    from publisher import AsyncPublisher
    from tests.support.gateway_client import SECRET as GATEWAY_SECRET
    from tests.support.gateway_client import client_for, publish

    monkeypatch.setattr(gateway.hub, "RECONCILE_TIMEOUT", 0.3)
    with RedisServer() as server:
        gw = Gateway(
            GatewayConfig(
                redis_url=server.url,
                port=0,
                auth_secret=GATEWAY_SECRET,
                reconcile_interval=0.1,
                drain_timeout=1,
            )
        )
        await gw.start()
        publisher = AsyncPublisher.from_url(server.url)
        client = await client_for(gw, [1, 2])
        try:
            for project_id in (1, 2):
                await client.subscribe(project_id)
                await publish(publisher, project_id, 3)
            await client.wait_for(lambda: len(client.seqs(1)) == 3 and len(client.seqs(2)) == 3)
            with hung(server):
                for _ in range(3):  # the gateway answers while Redis does not
                    pongs = client.count("pong")
                    await client.send({"type": "ping"})
                    await client.wait_for(lambda p=pongs: client.count("pong") > p, 2)
                    await asyncio.sleep(0.3)  # let reconcile passes start and time out
            # A message lost while the project is quiet: only the periodic check can find it.
            raw = redis.Redis.from_url(server.url)
            frame = b'{"type":"x","project_id":1,"seq":4}'
            raw.xadd(KEYS.stream(1), {"f": frame, "t": "0"}, id="4-0")
            raw.hset(KEYS.meta(1), "seq", 4)
            raw.close()
            await publish(publisher, 2, 2)
            await client.wait_for(lambda: len(client.seqs(1)) == 4 and len(client.seqs(2)) == 5)
            assert client.events[1] == [1, 2, 3, 4] and client.events[2] == [1, 2, 3, 4, 5]
        finally:
            await client.close()
            await publisher.aclose()
            await gw.drain()
