"""Presence against real Redis (gateway/presence_store.py, publisher/presence.py): several pods
as several PresenceService instances in one process, each with its own Redis clients.

Timings are scaled down (refresh 0.25 s, ttl 0.8 s, diffs every 0.2 s) so that the bounds the
defaults give in seconds are exercised in fractions of one; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import pytest
import redis
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gateway.presence_store
from gateway.presence import ProjectView, Write, apply_diff
from gateway.presence_store import (
    ANYWHERE,
    DIGEST_EVERY,
    MOVED,
    PIPELINE_CALLS,
    MasterLanes,
    PresenceService,
    PresenceStore,
    group_by_master,
    spread_outcomes,
)
from publisher.presence import aread_presence, read_presence
from schemas.keys import Keys
from schemas.presence import (
    MAX_MEMBER_ID_LENGTH,
    MAX_TTL_MS,
    READ,
    REFRESH,
    WRITE,
    PodRecord,
    PodState,
    encode_record,
    listed_limit,
    parse_read_reply,
    read_args,
    read_left_out,
    read_limit,
)
from schemas.protocol import Member, Presence, PresenceDiff
from schemas.tokens import MAX_NAME_LENGTH
from tests.support.redis_server import RedisServer, hung

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = {"ttl": 0.8, "refresh_interval": 0.25, "flush_interval": 0.02, "diff_interval": 0.2}
#: How long after a pod stops refreshing its members may still be shown (docs/presence.md):
#: ttl + MISSES_BEFORE_DROP refresh intervals + one diff interval.
KILL_BOUND = (
    TIMINGS["ttl"]
    + ProjectView.MISSES_BEFORE_DROP * TIMINGS["refresh_interval"]
    + TIMINGS["diff_interval"]
)
SLACK = 1.0  # scheduling on a loaded 2-core machine

_decode = msgspec.json.Decoder(Presence | PresenceDiff)


class Watcher:
    """A client of the presence messages of one project: applies them as a browser would and
    remembers every member that ever left."""

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self.left: list[str] = []
        self.diffs = 0
        self._changed = asyncio.Event()

    def receive(self, frame: bytes) -> None:
        message = _decode.decode(frame)
        if isinstance(message, Presence):
            self.members = {m.id: m for m in message.members}
        else:
            self.diffs += 1
            self.left += message.left
            self.members = apply_diff(self.members, message)
        self._changed.set()

    async def until(self, predicate: Callable[[dict[str, Member]], bool], within: float) -> None:
        """Wait until the members satisfy ``predicate`` (checked at each message received)."""

        async def wait() -> None:
            while not predicate(self.members):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), within)


async def eventually(check: Callable[[], Awaitable[bool]], within: float) -> None:
    """Poll state that announces nothing (what Redis holds) until ``check`` holds; bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    for _ in itertools.count():
        if await check():
            return
        if loop.time() > deadline:
            raise TimeoutError(f"not true within {within} s")
        await asyncio.sleep(0.05)


async def cluster_round(service: PresenceService, *, refresh_due: bool = False) -> None:
    """One round of the loop on a Redis Cluster, as ``_redis_loop`` runs it there: the lanes
    ``_dispatch`` starts (each free master's refresh, when ``refresh_due``, then its writes),
    waited for until they have ended. (Their done callbacks, ``_lane_done``, have run by then:
    ``asyncio.wait`` is woken after them.) Tests drive a cluster store through this, not
    through ``_flush``/``_refresh``, which only a standalone Redis runs."""
    before = set(service._lane_tasks)
    service._dispatch(refresh_due)
    started = service._lane_tasks - before
    if started:
        await asyncio.wait(started)


class Pods:
    """Start pods (PresenceService) on one Redis; route their deliveries to Watchers."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.watchers: dict[str, Watcher] = {}
        self.services: list[PresenceService] = []

    def deliver(self, sessions, frame: bytes) -> None:
        for session in sessions:
            if session in self.watchers:
                self.watchers[session].receive(frame)

    async def start(self, name: str, **overrides) -> PresenceService:
        client = redis.asyncio.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
        service = PresenceService(client, self.deliver, pod_id=name, **{**TIMINGS, **overrides})
        await service.start()
        self.services.append(service)
        return service

    async def watch(self, service: PresenceService, session: str, project_id: int = 1) -> Watcher:
        watcher = self.watchers[session] = Watcher()
        watcher.receive(await service.subscribe(session, project_id))
        return watcher

    async def close(self) -> None:
        for service in self.services:
            await service.stop()
            await service.client.aclose()


@pytest.fixture
async def pods(redis_url):
    cluster = Pods(redis_url)
    yield cluster
    await cluster.close()


def people(n: int, prefix: str = "u") -> dict[str, str]:
    return {f"{prefix}{i}": f"Person {i}" for i in range(n)}


async def test_members_on_three_pods_are_seen_from_every_pod(pods, redis_url) -> None:
    a, b, c = [await pods.start(name) for name in ("a", "b", "c")]
    everyone = people(30)
    for i, (member_id, name) in enumerate(everyone.items()):
        pod = (a, b, c)[i % 3]
        pod.join(f"tab{i}", 1, member_id, name)
        pod.join(f"second-tab{i}", 1, member_id, name)  # one person, two tabs: one member
    watchers = [await pods.watch(pod, f"watcher-{pod.pod_id}") for pod in (a, b, c)]
    for watcher in watchers:
        await watcher.until(lambda m: set(m) == set(everyone), within=5)
    b.activity("tab1", 1, viewing=123, answering=123)
    for watcher in watchers:
        await watcher.until(lambda m: m["u1"].answering == 123, within=5)
        assert {m.name for m in watcher.members.values()} == set(everyone.values())
    # Backends read the same thing.
    client = redis.Redis.from_url(redis_url)
    try:
        assert read_presence(client, 1) == sorted(watchers[0].members.values(), key=lambda m: m.id)
    finally:
        client.close()
    assert [m.id for m in await aread_presence(a.client, 1)] == sorted(everyone)
    assert await a.get(2) == b'{"type":"presence","project_id":2,"members":[]}'


async def test_a_closed_tab_leaves_at_the_next_diff(pods) -> None:
    a, b = await pods.start("a"), await pods.start("b")
    a.join("tab", 1, "alice", "Alice")
    a.join("other-tab", 1, "bob", None)
    watcher = await pods.watch(b, "watcher")
    await watcher.until(lambda m: set(m) == {"alice", "bob"}, within=5)
    a.close_session("tab")
    await watcher.until(lambda m: set(m) == {"bob"}, within=5)
    assert watcher.left == ["alice"]


async def test_a_pod_that_stops_refreshing_loses_its_members_within_the_bound(pods) -> None:
    victim, survivor = await pods.start("victim"), await pods.start("survivor")
    for i in range(50):
        victim.join(f"tab{i}", 1, f"v{i}", None)
    survivor.join("tab", 1, "stays", None)
    watcher = await pods.watch(survivor, "watcher")
    await watcher.until(lambda m: len(m) == 51, within=5)
    await victim.stop()  # what a SIGKILL looks like to Redis and the other pods: silence
    killed = time.monotonic()
    await watcher.until(lambda m: set(m) == {"stays"}, within=KILL_BOUND + SLACK)
    assert time.monotonic() - killed <= KILL_BOUND + SLACK
    assert sorted(watcher.left) == sorted(f"v{i}" for i in range(50))
    assert [m.id for m in await aread_presence(survivor.client, 1)] == ["stays"]


async def test_a_flush_is_rebuilt_from_live_pods_without_anyone_leaving(pods, redis_client) -> None:
    a, b, c = [await pods.start(name) for name in ("a", "b", "c")]
    for i in range(10):
        (a, b)[i % 2].join(f"tab{i}", 1, f"u{i}", None)
    watcher = await pods.watch(c, "watcher")
    await watcher.until(lambda m: len(m) == 10, within=5)
    redis_client.flushall()
    assert read_presence(redis_client, 1) == []

    async def rebuilt() -> bool:
        return len(read_presence(redis_client, 1)) == 10

    # Each pod notices at its next refresh and writes its members again.
    await eventually(rebuilt, TIMINGS["refresh_interval"] + SLACK)
    a.activity("tab0", 1, 5, None)  # and life goes on
    await watcher.until(lambda m: m["u0"].viewing == 5, within=5)
    assert watcher.left == []  # no leave/join flicker for the flush


async def test_a_redis_restart_is_rebuilt_and_announcements_resume() -> None:
    with RedisServer() as server:
        pods = Pods(server.url)
        try:
            a, b = await pods.start("a"), await pods.start("b")
            a.join("tab", 1, "alice", None)
            watcher = await pods.watch(b, "watcher")
            await watcher.until(lambda m: "alice" in m, within=5)
            server.kill()
            server.start()
            a.join("tab2", 1, "bob", None)  # written once Redis is back
            await watcher.until(lambda m: set(m) == {"alice", "bob"}, within=10)
            client = server.client()
            try:
                await eventually(_reads(client, {"alice", "bob"}), 5)
            finally:
                client.close()
            a.activity("tab", 1, 7, None)
            await watcher.until(lambda m: m["alice"].viewing == 7, within=5)
        finally:
            await pods.close()


def _reads(client: redis.Redis, ids: set[str]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return {m.id for m in read_presence(client, 1)} == ids

    return check


async def test_a_drained_pod_keeps_its_members_through_the_grace(pods) -> None:
    old, new, other = [await pods.start(name, drain_grace=2.0) for name in ("old", "new", "other")]
    old.join("tab-alice", 1, "alice", "Alice")
    old.join("tab-bob", 1, "bob", "Bob")
    watcher = await pods.watch(other, "watcher")
    await watcher.until(lambda m: set(m) == {"alice", "bob"}, within=5)
    await old.drain()  # rolling restart: alice's tab reconnects to the new pod, bob's does not
    new.join("tab-alice", 1, "alice", "Alice")
    drained = time.monotonic()
    await watcher.until(lambda m: set(m) == {"alice"}, within=2.0 + KILL_BOUND + SLACK)
    assert time.monotonic() - drained >= 2.0 - SLACK / 2  # bob stayed through the grace
    assert watcher.left == ["bob"]  # alice never appeared to leave


async def test_diffs_are_coalesced_to_one_per_interval(pods) -> None:
    a, b = await pods.start("a"), await pods.start("b", diff_interval=0.5)
    watcher = await pods.watch(b, "watcher")
    for i in range(20):
        a.join(f"tab{i}", 1, f"u{i}", None)
    for round_ in range(1, 6):  # 100 changes in quick succession
        for i in range(20):
            a.activity(f"tab{i}", 1, round_, None)
    await watcher.until(lambda m: len(m) == 20 and all(x.viewing == 5 for x in m.values()), 5)
    assert watcher.diffs <= 3  # a burst of 120 changes: a couple of diffs, not 120


async def test_refresh_costs_one_command_per_project_not_per_connection(pods, redis_client) -> None:
    service = await pods.start("a", refresh_interval=0.2, ttl=0.6)
    refreshed = asyncio.Condition()
    refreshes = 0
    refresh = service.store.refresh

    async def counted(*args, **kwargs):
        nonlocal refreshes
        try:
            return await refresh(*args, **kwargs)
        finally:
            async with refreshed:
                refreshes += 1
                refreshed.notify_all()

    service.store.refresh = counted
    for i in range(300):
        service.join(f"tab{i}", 1 + i % 3, f"u{i}", None)  # 300 connections, 3 projects
    await pods.watch(service, "watcher", project_id=4)  # and one project only watched
    # Settled: the joins' write answered, then two refreshes, so that what the write and a
    # first refresh set off (a re-read of the watched view) is over. (A sleep of 0.3 s was not
    # always enough on a loaded machine: a write and a read counted as refreshes below.)
    async with asyncio.timeout(5):
        while set(service.core.stored_versions()) != {1, 2, 3}:  # noqa: ASYNC110 - no event
            await asyncio.sleep(0.02)
        async with refreshed:
            settled = refreshes + 2
            await refreshed.wait_for(lambda: refreshes >= settled)

    def script_calls() -> int:
        stats = redis_client.info("commandstats")
        return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval"))

    # Idle, the running service's traffic is its refreshes only: projects per interval. (A
    # refresh Redis ran just before the end of the window may not be answered yet: +1.)
    loop = asyncio.get_running_loop()
    redis_client.config_resetstat()
    first, started = refreshes, loop.time()
    await asyncio.sleep(1.0)
    calls, done = script_calls(), refreshes - first
    assert 1 <= done <= (loop.time() - started) / 0.2 + 1
    assert calls <= 4 * (done + 1)
    # One refresh, alone: the service's loop, which refreshes every 0.2 s, is stopped first (a
    # refresh of its own during this one's round trip, as slow as 0.2 s, counted 8 calls of 4).
    await service.stop()
    redis_client.config_resetstat()
    before = service.store.commands
    await refresh(service.core.refresh_plan())
    assert script_calls() == 4
    # and nothing else per round trip (redis-py's Script objects send SCRIPT EXISTS first)
    assert "cmdstat_script|exists" not in redis_client.info("commandstats")
    assert service.store.commands - before == 4


async def test_presence_get_without_a_view_reads_redis(pods) -> None:
    a, b = await pods.start("a"), await pods.start("b")
    a.join("tab", 3, "alice", "Alice")
    b.join("tab", 3, "alice", "Alice")  # alice has a tab on each pod

    async def both() -> bool:
        return len(msgspec.json.decode(await b.get(3))["members"]) == 1

    await eventually(both, 5)
    a.close_session("tab")
    b.activity("tab", 3, None, 9)

    async def answering() -> bool:  # an answer is at most one diff interval old
        frame = msgspec.json.decode(await b.get(3))
        return [(m["id"], m["answering"]) for m in frame["members"]] == [("alice", 9)]

    await eventually(answering, TIMINGS["diff_interval"] + SLACK)


def test_read_presence_refuses_a_bad_project(redis_client) -> None:
    with pytest.raises(ValueError, match="positive"):
        read_presence(redis_client, 0)


async def test_a_failing_deliver_does_not_end_presence(pods) -> None:
    calls = []

    def deliver(sessions, frame: bytes) -> None:
        calls.append(frame)
        if len(calls) == 1:
            raise RuntimeError("a bug in the gateway's fan-out")
        pods.deliver(sessions, frame)

    a = await pods.start("a")
    a.deliver = deliver
    watcher = await pods.watch(a, "watcher")
    a.join("tab", 1, "alice", None)

    async def first_diff_failed() -> bool:
        return len(calls) >= 1

    await eventually(first_diff_failed, 5)
    a.join("tab2", 1, "bob", None)
    await watcher.until(lambda m: "bob" in m, within=5)


def test_a_pod_id_must_be_a_plain_name() -> None:
    with pytest.raises(ValueError, match="pod_id"):
        PresenceService(redis.asyncio.Redis(), lambda s, f: None, pod_id="a|b")


POD_PROCESS = """
import asyncio, json, sys
import redis.asyncio
from gateway.presence_store import PresenceService

async def main(url, count, timings):
    service = PresenceService(redis.asyncio.Redis.from_url(url), lambda s, f: None,
                              pod_id="doomed", **timings)
    await service.start()
    for i in range(count):
        service.join(f"tab{i}", 1, f"doomed{i}", None)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])))
"""


async def test_a_sigkilled_pod_process_loses_its_members_within_the_bound(pods, redis_url):
    survivor = await pods.start("survivor")
    watcher = await pods.watch(survivor, "watcher")
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", POD_PROCESS, redis_url, "40", json.dumps(TIMINGS)),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert await asyncio.wait_for(process.stdout.readline(), 30) == b"ready\n"
        await watcher.until(lambda m: len(m) == 40, within=10)
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await watcher.until(lambda m: not m, within=KILL_BOUND + SLACK)
        assert time.monotonic() - killed <= KILL_BOUND + SLACK
        assert sorted(watcher.left) == sorted(f"doomed{i}" for i in range(40))
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_writes_go_on_after_redis_forgets_the_scripts(pods, redis_client) -> None:
    a, b = await pods.start("a"), await pods.start("b")
    watcher = await pods.watch(b, "watcher")
    a.join("tab", 1, "alice", None)
    await watcher.until(lambda m: "alice" in m, within=5)
    redis_client.script_flush()  # what a restart does to the script cache
    a.activity("tab", 1, 3, None)
    await watcher.until(lambda m: m["alice"].viewing == 3, within=5)


async def test_a_subscriber_waiting_for_a_load_survives_the_view_being_dropped(pods) -> None:
    """Two tabs wait for the same first read of a project; the first one subscribes and
    closes before the second resumes, which drops the view. The second still gets its
    ``presence`` (the view is loaded again), never an internal error."""
    service = await pods.start("a")
    service.join("other", 4, "bob", "Bob")

    async def subscribe_and_close() -> bytes:
        frame = await service.subscribe("t1", 4)
        service.close_session("t1")  # before the second subscribe resumes
        return frame

    first = asyncio.create_task(subscribe_and_close())
    second = asyncio.create_task(service.subscribe("t2", 4))
    frames = await asyncio.wait_for(asyncio.gather(first, second), 5)
    for frame in frames:
        assert [m["id"] for m in msgspec.json.decode(frame)["members"]] == ["bob"]
    assert service.core.subscribers == {4: {"t2"}}


@pytest.mark.parametrize("linger", [0.0, None])
async def test_a_reread_finishing_after_the_last_subscriber_left_leaves_no_unwatched_view(
    pods, linger
) -> None:
    """A re-read in flight when the project's view is dropped (its last subscriber left: at
    once, or a diff interval later) must not install the view again: nobody is subscribed and
    its channel is no longer watched, so the next subscriber would get a view that no
    announcement updates."""
    a, b = await pods.start("a"), await pods.start("b", view_linger=linger)
    a.join("tab", 1, "alice", "Alice")
    watcher = await pods.watch(b, "w1")
    await watcher.until(lambda m: set(m) == {"alice"}, within=5)
    gate = asyncio.Event()
    reading = asyncio.Event()
    read = b.store.read

    async def slow_read(project_id: int):
        reading.set()
        await gate.wait()
        return await read(project_id)

    b.store.read = slow_read
    b.reread_all()
    await asyncio.wait_for(reading.wait(), 5)
    b.close_session("w1")  # the last subscriber leaves while the re-read waits

    async def dropped() -> bool:
        return 1 not in b.core.views

    await eventually(dropped, 2 * TIMINGS["diff_interval"] + SLACK)
    gate.set()
    await asyncio.sleep(0.2)
    b.store.read = read
    channel = b.keys.presence_channel(1)
    assert 1 not in b.core.views or channel in b._channels, "a loaded view nobody watches"


@pytest.mark.parametrize("linger", [0.0, None])
async def test_a_first_read_answered_after_its_subscriber_gave_up_leaves_no_view(
    pods, linger
) -> None:
    """A presence subscribe whose first read of the project outlasts the subscriber's wait
    (the gateway's ``--subscribe-timeout``: Redis slow or hung for a while; the client is
    answered ``unavailable``): once the read answers, nobody is subscribed, and the view is
    dropped (at once, or after the linger) and its channel unwatched. Before, the view stayed
    loaded for as long as the pod ran, nobody subscribed to it and no sweep reaching it: its
    channel watched and a refresh of it sent every interval, for each project so asked."""
    service = await pods.start("a", view_linger=linger)
    gate = asyncio.Event()
    reading = asyncio.Event()
    read = service.store.read

    async def slow_read(project_id: int):
        reading.set()
        await gate.wait()
        return await read(project_id)

    service.store.read = slow_read
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):  # the gateway's bound on the wait
            await service.subscribe("tab", 7)
    assert reading.is_set()
    gate.set()
    service.store.read = read

    async def forgotten() -> bool:
        return 7 not in service.core.views and service.keys.presence_channel(7) not in (
            service._channels
        )

    await eventually(forgotten, 2 * TIMINGS["diff_interval"] + SLACK)
    assert 7 not in service.core.refresh_plan()


async def test_a_first_read_that_fails_after_its_subscriber_gave_up_logs_no_asyncio_error(
    pods,
) -> None:
    """A presence subscribe whose first read fails (Redis down) after the subscriber stopped
    waiting (``--subscribe-timeout``, answered ``unavailable``): the failure is the pod's
    throttled ``redis unavailable`` warning's business, not asyncio's. Before, nobody retrieved
    the read task's exception (a cancelled ``asyncio.shield`` does not, on Python 3.11.7 and
    later): asyncio logged "Task exception was never retrieved" with a traceback at error
    level, for each project so asked during an outage, and the view stayed as before."""
    service = await pods.start("a")
    gate = asyncio.Event()

    async def failing_read(project_id: int):
        await gate.wait()
        raise redis.exceptions.ConnectionError("Redis went away")

    reported: list[dict] = []
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        service.store.read = failing_read
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):  # the gateway's bound on the wait
                await service.subscribe("tab", 7)
        loading = service._loading[7]
        gate.set()
        await asyncio.wait([loading])
        del loading
        gc.collect()  # (an unretrieved exception is reported when its task is collected)
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(handler)
    assert [c.get("message") for c in reported] == []
    assert 7 not in service.core.views


@pytest.mark.parametrize("damage", ["pods", "versions"])
async def test_a_damaged_project_does_not_stop_the_pods_other_projects(
    pods, redis_client, damage
) -> None:
    """Another writer leaves a key of the wrong type in project 1's presence: the pod's writes
    and refreshes of its other projects must go on (one pipeline carries them all). Project 2's
    member is written, its activity reaches other pods, and it outlives the ttl; project 1's
    key is replaced and its member listed too."""
    a, b = await pods.start("a"), await pods.start("b")
    keys = a.keys
    bad = keys.presence_pods(1) if damage == "pods" else keys.presence_versions(1)
    redis_client.set(bad, "a string, not a zset or hash")
    a.join("tab", 1, "alice", None)  # project 1's write fails on every round
    a.join("tab", 2, "alice", None)
    watcher = await pods.watch(b, "watcher", project_id=2)
    await watcher.until(lambda m: set(m) == {"alice"}, within=5)
    a.activity("tab", 2, 7, None)
    await watcher.until(lambda m: m["alice"].viewing == 7, within=5)
    await asyncio.sleep(TIMINGS["ttl"] + 2 * TIMINGS["refresh_interval"])  # refreshes must land
    assert [m.id for m in read_presence(redis_client, 2)] == ["alice"]
    assert watcher.left == []
    assert [m.id for m in read_presence(redis_client, 1)] == ["alice"]


async def test_a_pod_hash_of_the_wrong_type_hides_only_that_pod(pods, redis_client) -> None:
    """Another writer lists a pod whose records key is not a hash (and never expires): a read
    skips that pod and lists everyone else, from a backend and through a pod alike, instead of
    failing the whole project's presence for as long as the key stays."""
    a, b = await pods.start("a"), await pods.start("b")
    keys = a.keys
    redis_client.zadd(keys.presence_pods(1), {"forged": 2**52})
    redis_client.hset(keys.presence_versions(1), "forged", "1")
    redis_client.set(keys.presence_pod(1, "forged"), "a string, not a hash")
    a.join("tab", 1, "alice", None)

    async def listed() -> bool:
        return [m.id for m in read_presence(redis_client, 1)] == ["alice"]

    await eventually(listed, 5)
    assert [m.id for m in await aread_presence(b.client, 1)] == ["alice"]
    assert msgspec.json.decode(await b.get(1))["members"][0]["id"] == "alice"
    watcher = await pods.watch(b, "watcher")
    assert set(watcher.members) == {"alice"}


async def test_a_tab_closed_while_redis_hangs_leaves_once_it_answers() -> None:
    """Redis stopped (SIGSTOP: connections open, no answer) for longer than the ttl while a tab
    closes: nothing waits on Redis unboundedly (diffs go on, the pods' own changes show), and
    once Redis answers the closed tab's member leaves every view within the kill bound, while
    the member still connected is listed again and stays."""

    with RedisServer() as server:
        pods = Pods(server.url)
        try:
            a, b = await pods.start("a"), await pods.start("b")
            a.join("tab", 1, "alice", None)
            b.join("tab", 1, "bob", None)
            watcher = await pods.watch(b, "watcher")
            await watcher.until(lambda m: set(m) == {"alice", "bob"}, within=5)
            with hung(server):
                a.close_session("tab")
                b.activity("tab", 1, 4, None)  # this pod's own change shows without Redis
                await watcher.until(lambda m: m["bob"].viewing == 4, within=2)
                await asyncio.sleep(3 * TIMINGS["ttl"])  # every deadline in Redis passes
            resumed = time.monotonic()
            # A call in flight may wait out its socket timeout (2 s) first.
            await watcher.until(lambda m: set(m) == {"bob"}, within=2 + KILL_BOUND + SLACK)
            client = server.client()
            try:
                await eventually(_reads(client, {"bob"}), 5)
            finally:
                client.close()
            assert time.monotonic() - resumed <= 2 + KILL_BOUND + SLACK
            assert all(not task.done() for s in (a, b) for task in s._tasks)
        finally:
            await pods.close()


async def test_a_pod_whose_redis_connection_hangs_keeps_its_members_listed(redis_url) -> None:
    """A pod's Redis connections hang (the Redis it spoke to froze; its address now leads to a
    working one, as after a failover) while its members stay connected: its presence refresh
    gives up within a refresh interval and goes through a new connection, so its members stay
    in every view. Before, the refresh waited on the hung connection as long as the gateway's
    Redis client retried (each retry waiting out its socket and connect timeouts: about 100 s
    with the gateway's defaults): the pod's records expired after the ttl and its members were
    shown as gone, to every pod, until then."""
    from redisconn import async_client
    from tests.support.tcp_proxy import FreezableProxy

    port = int(redis_url.rpartition(":")[2].partition("/")[0])
    proxy = FreezableProxy("127.0.0.1", port)
    pods = Pods(redis_url)
    # Pod a reaches Redis through the proxy, with the gateway's own client (gateway.server).
    client = async_client(f"redis://127.0.0.1:{proxy.port}/0")
    a = PresenceService(client, pods.deliver, pod_id="a", **TIMINGS)
    await a.start()
    pods.services.append(a)
    try:
        b = await pods.start("b")
        a.join("tab", 1, "alice", None)
        watcher = await pods.watch(b, "watcher")
        await watcher.until(lambda m: set(m) == {"alice"}, within=5)
        proxy.freeze_existing()
        # Several ttls: long enough for alice's records to expire many times over without a
        # refresh, and for the change to reach b's view.
        await asyncio.sleep(4 * KILL_BOUND)
        assert watcher.left == [], "a hung connection made a connected member leave"
        assert set(watcher.members) == {"alice"}
    finally:
        await pods.close()
        proxy.close()


async def test_a_presence_get_flood_costs_one_read_and_one_encoding_per_interval(
    pods, monkeypatch
) -> None:
    """``presence_get`` answers from state at most one diff interval old (docs/presence.md): a
    client asking in a loop, or many clients at once, must not cost a Redis read (O(members) on
    the Redis every project shares) or an encoding of the whole list (O(members) on the event
    loop) per request."""
    import gateway.presence
    import gateway.presence_store

    a, b = await pods.start("a"), await pods.start("b", diff_interval=5.0)
    for i in range(200):
        a.join(f"tab{i}", 3, f"u{i}", f"Person {i}")

    async def all_there() -> bool:
        return len(msgspec.json.decode(await b.get(3))["members"]) == 200

    await eventually(all_there, 5)
    encodings = []
    encode = gateway.presence_store.encode
    for module in (gateway.presence, gateway.presence_store):
        monkeypatch.setattr(
            module, "encode", lambda m: encodings.append(1) or encode(m), raising=False
        )
    reads = b.store.commands
    frames = await asyncio.gather(*(b.get(3) for _ in range(50)))  # many clients at once
    frames += [await b.get(3) for _ in range(200)]  # one client in a loop
    assert b.store.commands - reads <= 1 and len(encodings) <= 1
    assert len(set(frames)) == 1
    # With a view (presence subscribers on the pod): the frame is built once per state too.
    watcher = await pods.watch(b, "watcher", project_id=3)
    assert len(watcher.members) == 200
    encodings.clear()
    frames = [await b.get(3) for _ in range(200)]
    assert len(encodings) <= 1 and len(set(frames)) == 1


async def test_presence_gets_asked_again_while_redis_hangs_share_the_read_in_flight(pods) -> None:
    """``presence_get`` of a project asked every interval while its read hangs (Redis stopped;
    each asker gives up at its ``--subscribe-timeout``, answered ``unavailable``, and asks
    again): the askers share the read in flight however long it takes, rather than each
    interval starting one more. Before, each interval queued another read of the project
    (16 at once per pod, the rest waiting for a place): with many projects asked so, a backlog
    of reads nobody waited for any more grew for as long as Redis hung, and once it answered
    they went first, ahead of the reads asked then."""
    service = await pods.start("a", diff_interval=0.05)
    gate = asyncio.Event()
    started = []
    read = service.store.read

    async def hung_read(project_id: int):
        started.append(project_id)
        await gate.wait()
        return await read(project_id)

    service.store.read = hung_read
    try:
        for _ in range(10):  # ten intervals of askers giving up
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await service.get(5)
        assert started == [5]
    finally:
        gate.set()
        service.store.read = read
    assert msgspec.json.decode(await asyncio.wait_for(service.get(5), 5))["members"] == []


@pytest.mark.parametrize("damage", ["added", "removed", "swapped", "changed"])
async def test_members_another_writer_adds_to_or_removes_from_a_live_pods_records_are_repaired(
    pods, redis_client, damage
) -> None:
    """Another writer adds a well-formed member to a live pod's records (or removes one of
    its members, puts another in one's place, or changes one's record): the pod's next refresh
    finds its records not as it wrote them and writes them whole again, counted as a repair; a
    watcher sees the forged member go (or the removed one come back), nobody else leave.
    Before, the refresh checked only the version: the forged member was listed by every read
    (a new subscriber, ``presence_get``, a backend's ``Publisher.presence``) for as long as the
    pod lived; and until the records' content was checked, only their number: a member put
    in another's place, or a record changed, stayed for as long as the pod lived."""
    a, b = await pods.start("a"), await pods.start("b")
    a.join("tab1", 1, "alice", None)
    a.join("tab2", 1, "bob", None)
    watcher = await pods.watch(b, "watcher")
    await watcher.until(lambda m: set(m) == {"alice", "bob"}, within=5)
    records = a.keys.presence_pod(1, "a")
    forged = encode_record(PodRecord(name="M", viewing=66, answering=66, since=1, at=1))
    if damage in ("added", "swapped"):
        redis_client.hset(records, "mallory", forged)
    if damage in ("removed", "swapped"):
        redis_client.hdel(records, "bob")
    if damage == "changed":
        redis_client.hset(records, "alice", forged)

    async def repaired() -> bool:
        members = read_presence(redis_client, 1)
        return [(m.id, m.name, m.viewing) for m in members] == [
            ("alice", None, None),
            ("bob", None, None),
        ]

    # A number that differs is found by the next refresh; the same number of records, not
    # those, by the next content check (every DIGEST_EVERY-th refresh of the project).
    refreshes = 3 if damage in ("added", "removed") else DIGEST_EVERY + 2
    await eventually(repaired, refreshes * TIMINGS["refresh_interval"] + SLACK)
    assert a.repaired_keys >= 1
    late = await pods.watch(b, "late")  # (b's view: re-read once a's whole list is announced)
    assert set(late.members) == {"alice", "bob"}
    await watcher.until(lambda m: set(m) == {"alice", "bob"}, within=5)
    assert watcher.left == []


async def test_records_as_the_pod_wrote_them_are_never_taken_for_damaged(pods, monkeypatch) -> None:
    """The refresh's digest of a pod's records is the pod's own, whatever the ids and names
    (bytes outside ASCII, characters JSON escapes) and however they changed: no repair, no
    rewrite, refresh after refresh (each checking the content here)."""
    monkeypatch.setattr(gateway.presence_store, "DIGEST_EVERY", 1)
    a = await pods.start("a")
    a.join("tab1", 1, 'ålice\n"x"', "Zoë 🙂 \u2028")
    a.join("tab2", 1, "bob", None)
    a.activity("tab2", 1, 7, 8)
    a.join("tab3", 2, "карл", "Карл")
    for _ in range(4):
        await asyncio.sleep(TIMINGS["refresh_interval"])
        a.activity("tab2", 1, 9, None)
    written = a.store.commands
    await asyncio.sleep(3 * TIMINGS["refresh_interval"])
    assert a.repaired_keys == 0
    # only refreshes since (one call per project each), no write of the whole list
    assert a.store.commands - written <= 2 * 4


@pytest.mark.parametrize("damage", ["pods", "versions", "records"])
async def test_a_presence_key_of_the_wrong_type_is_rebuilt_by_the_pods(
    pods, redis_client, damage
) -> None:
    """Presence is soft state that the pods rebuild: when another writer leaves a string where
    a project's pods zset or versions hash, or a live pod's records hash, belongs, the pods
    replace that key (only it) and write their members again, as after a flush, within a
    refresh interval. Nobody appears to leave, and a person who joins meanwhile is listed
    without an operator. Index keys replaced are counted."""
    a, b = await pods.start("a"), await pods.start("b")
    keys = a.keys
    bad = {
        "pods": keys.presence_pods(1),
        "versions": keys.presence_versions(1),
        "records": keys.presence_pod(1, "a"),  # a is idle: only its refresh can notice
    }[damage]
    a.join("tab", 1, "alice", None)
    watcher = await pods.watch(b, "watcher")
    await watcher.until(lambda m: set(m) == {"alice"}, within=5)
    neighbours = {  # in the same slot, under the same names with a suffix: never touched
        bad + "x": "not presence",
        keys.presence_pod_prefix(1) + "unlisted": "a string, not a hash",
        "eventbus:{1}:other": "not presence",
    }
    redis_client.mset(neighbours)
    redis_client.set(bad, "a string, not a zset or hash")
    b.join("tab", 1, "bob", None)
    within = TIMINGS["refresh_interval"] + SLACK
    await watcher.until(lambda m: set(m) == {"alice", "bob"}, within=within)

    async def listed() -> bool:
        return [m.id for m in read_presence(redis_client, 1)] == ["alice", "bob"]

    await eventually(listed, TIMINGS["refresh_interval"] + SLACK)
    assert redis_client.type(bad) == (b"zset" if damage == "pods" else b"hash")
    assert watcher.left == []
    assert {k: redis_client.get(k).decode() for k in neighbours} == neighbours
    assert a.repaired_keys + b.repaired_keys == (0 if damage == "records" else 1)


async def test_a_project_whose_index_key_is_damaged_and_empty_still_answers(
    pods, redis_client
) -> None:
    """Nobody present in a project whose pods key another writer replaced: presence_get and a
    presence subscribe answer (nobody) rather than fail for as long as the key stays, and a
    person who joins later is listed."""
    a, b = await pods.start("a"), await pods.start("b")
    redis_client.set(a.keys.presence_pods(5), "a string, not a zset")
    redis_client.set(a.keys.presence_versions(5), "a string, not a hash")
    assert msgspec.json.decode(await a.get(5))["members"] == []
    assert read_presence(redis_client, 5) == []
    watcher = await pods.watch(b, "watcher", project_id=5)
    assert watcher.members == {}
    a.join("tab", 5, "alice", None)
    await watcher.until(lambda m: set(m) == {"alice"}, within=TIMINGS["refresh_interval"] + SLACK)
    assert [m.id for m in read_presence(redis_client, 5)] == ["alice"]


# --- garbage in every presence key, against the real scripts ----------------------------------

_bytes = st.one_of(
    st.binary(max_size=24),
    st.sampled_from([b"a", b"x", b"alice", b"\xff\xfe", b"1", b"-1", b"nan", b"1e400", b""]),
    st.sampled_from([b"h" * 70_000]),  # a huge member or value
)
_records = st.one_of(
    _bytes,
    st.sampled_from(
        [b'["Eve",null,null,1,1]', b"[null,1,2,3]", b'["Eve",0,null,1,1]', b'["x",null,null,-1,1]']
    ),
)
_scores = st.one_of(
    st.floats(allow_nan=False),  # Redis refuses NaN scores; infinities are kept
    st.sampled_from([0.0, 2.0**52, float("inf"), float("-inf")]),
)
_foreign = st.one_of(
    st.none(),  # absent
    st.tuples(st.just("string"), _bytes),
    st.tuples(st.just("list"), st.lists(_bytes, min_size=1, max_size=3)),
    st.tuples(st.just("set"), st.sets(_bytes, min_size=1, max_size=3)),
    st.tuples(st.just("zset"), st.dictionaries(_bytes, _scores, min_size=1, max_size=3)),
    st.tuples(st.just("hash"), st.dictionaries(_bytes, _records, min_size=1, max_size=3)),
)


def _plant(client: redis.Redis, key: str, value) -> None:
    if value is None:
        return
    kind, content = value
    if kind == "string":
        client.set(key, content)
    elif kind == "list":
        client.rpush(key, *content)
    elif kind == "set":
        client.sadd(key, *content)
    elif kind == "zset":
        client.zadd(key, content)
    else:
        client.hset(key, mapping=content)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(pods_key=_foreign, versions_key=_foreign, own_records=_foreign, other_records=_foreign)
def test_garbage_in_every_presence_key_never_stops_a_pod(
    redis_url, pods_key, versions_key, own_records, other_records
) -> None:
    """Whatever another writer left in a project's presence keys (any type, non-UTF-8, huge
    members and values, infinite scores, records no pod writes), a pod's write, refresh and read
    succeed and its members are listed, from the pod and from a backend: only the project's
    own presence keys were changed, and only by replacing what held another type."""
    keys = Keys("h61fuzz")
    sync = redis.Redis.from_url(redis_url)
    project = 7
    damaged = {
        keys.presence_pods(project): pods_key,
        keys.presence_versions(project): versions_key,
        keys.presence_pod(project, "a"): own_records,
        keys.presence_pod(project, "x"): other_records,
    }
    sync.delete(*damaged)
    for key, value in damaged.items():
        _plant(sync, key, value)
    sync.set("h61fuzz:{7}:sentinel", b"not presence")
    record = PodRecord(name="Alice", viewing=1, answering=None, since=1, at=1)

    async def run() -> dict:
        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5)
        try:
            store = PresenceStore(client, "a", keys=keys)
            assert await store.write([Write(project, 0, 1, {"alice": record})]) == [True]
            refreshed = await store.refresh({project: 1, 8: None})
            assert refreshed[project][0] is True and refreshed[project][1]["a"] == 1
            assert await store.write([Write(project, 1, 2, {"bob": record})]) == [True]
            return await store.read(project)
        finally:
            await client.aclose()

    try:
        state = asyncio.run(run())
        assert state["a"] == PodState(2, {"alice": record, "bob": record})
        listed = {m.id for m in read_presence(sync, project, keys=keys)}
        assert {"alice", "bob"} <= listed
        assert sync.get("h61fuzz:{7}:sentinel") == b"not presence"
        assert sync.type(keys.presence_pods(project)) == b"zset"
        assert sync.type(keys.presence_versions(project)) == b"hash"
    finally:
        sync.close()


async def test_a_project_is_read_at_most_once_per_write_round_however_many_announcements_ask(
    pods, redis_url
) -> None:
    """Announcements that ask for a read (without records: writes too large to announce, from
    every pod that writes the project; or another writer's, forged) are coalesced: a pod reads
    a project at most once per round, every ``flush_interval`` (10 a second by default), while
    any number arrive. Before, a read that one asked for while another was under way was made
    at once in the same round: ~125 reads a second of one project per pod with 0.1 s rounds,
    ~1,000 in 8 s, each a read of the whole project (30 to 90 ms of Redis for a large one)."""
    timings = {**TIMINGS, "flush_interval": 0.1}
    a = await pods.start("a", **timings)
    await pods.watch(a, "watcher")
    forger = redis.asyncio.Redis.from_url(redis_url)
    channel = a.keys.presence_channel(1)
    versions = itertools.count(1)
    loop = asyncio.get_running_loop()
    try:
        rereads, start = a.rereads, loop.time()
        while loop.time() < start + 2.0:
            pipe = forger.pipeline(transaction=False)
            for _ in range(20):
                pipe.publish(channel, f"big|{next(versions)}|0|")
            await pipe.execute()
        elapsed = loop.time() - start
        assert a.rereads - rereads <= elapsed / 0.1 + 3
        # Still read, at most a round later: the pod's view is the project as Redis has it.
        a.join("tab", 1, "alice", None)
        await pods.watchers["watcher"].until(lambda m: set(m) == {"alice"}, within=5)
    finally:
        await forger.aclose()


async def test_an_announcement_is_never_larger_than_its_bound_says(redis_url) -> None:
    """The WRITE script's cjson escapes ids its own way (``/`` too, control characters as
    ``\\u00XX`` or two bytes): ``announced_bytes``, which decides whether a write is announced
    with its records, is never below the size Redis publishes, and equal for ids without the
    control characters cjson writes in two bytes. A write over the bound publishes no records
    and stores them all the same."""
    from schemas.presence import announced_bytes

    record = PodRecord("Ann", 1, None, 5, 9)
    short = {"\b", "\t", "\n", "\f", "\r"}
    ids = [chr(c) for c in range(128)] + ["é", "用", "\U0001f600", 'a/b\\c"d']
    changes: dict[str, PodRecord | None] = {m: record for m in ids} | {"gone": None}
    client = redis.asyncio.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    try:
        keys = Keys()
        await pubsub.subscribe(keys.presence_channel(1))
        store = PresenceStore(client, "pod")
        assert await store.write([Write(1, 0, 1, changes, announce=True)]) == [True]
        assert await store.write([Write(1, 1, 2, {"x": record}, announce=False)]) == [True]
        bodies = []
        async with asyncio.timeout(5):
            while len(bodies) < 2:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    bodies.append(message["data"].split(b"|", 3)[3])
        published = len(bodies[0])
        assert announced_bytes(changes) == published + 4 * len(short)  # \\n: 2 bytes, not 6
        assert json.loads(bodies[0]).keys() == changes.keys()
        assert bodies[1] == b""
        read = await store.read(1)
        assert read["pod"].version == 2 and read["pod"].records.keys() == (set(ids) | {"x"})
    finally:
        await pubsub.aclose()
        await client.aclose()


_text_ids = st.text(
    st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=MAX_MEMBER_ID_LENGTH
)
_announced_records = st.none() | st.builds(
    PodRecord,
    st.none() | st.text(st.characters(blacklist_categories=("Cs",)), max_size=MAX_NAME_LENGTH),
    st.none() | st.integers(1, 2**53 - 1),
    st.none() | st.integers(1, 2**53 - 1),
    st.integers(0, 2**53 - 1),
    st.integers(0, 2**53 - 1),
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(changes=st.dictionaries(_text_ids, _announced_records, max_size=6))
def test_announced_bytes_bounds_what_redis_publishes_for_any_ids(redis_url, changes) -> None:
    """Any ids a pod lists (any text: control characters, quotes, slashes, non-BMP) and any
    records: what WRITE's cjson publishes never takes more than ``announced_bytes`` says, and
    parses back to the same members (3,000 draws held when this was written)."""
    from schemas.presence import WRITE, announced_bytes

    keys = Keys("h124bound")
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(keys.presence_channel(1))
        assert pubsub.get_message(timeout=2)["type"] == "subscribe"
        args: list = [keys.presence_pod_prefix(1), "pod", 10_000, 0, 1, "PUBLISH"]
        args += [keys.presence_channel(1), "1"]
        for member_id, record in changes.items():
            args += [member_id, b"" if record is None else encode_record(record)]
        client.eval(WRITE, 2, keys.presence_pods(1), keys.presence_versions(1), *args)
        message = pubsub.get_message(timeout=2)
        body = message["data"].split(b"|", 3)[3]
        assert len(body) <= announced_bytes(changes)
        assert json.loads(body).keys() == changes.keys()
    finally:
        pubsub.close()
        client.close()


def test_the_longest_record_a_pod_writes_is_read_back() -> None:
    """The bound READ applies to values leaves room for every record a pod can write: the
    longest name (each character escaped by JSON), the largest ids and times."""
    from schemas.presence import MAX_MEMBER_ID_BYTES, MAX_RECORD_BYTES, encode_record

    top = 2**53 - 1
    longest = PodRecord(
        name="\x01" * MAX_NAME_LENGTH, viewing=top, answering=top, since=top, at=top
    )
    assert len(encode_record(longest)) <= MAX_RECORD_BYTES
    assert len(("\U0001f600" * 255).encode()) <= MAX_MEMBER_ID_BYTES  # 255 emoji


def test_a_huge_foreign_member_or_record_never_leaves_redis(redis_url) -> None:
    """Another writer's 8 MB value or member in a pod's records: the read leaves it out in
    Redis (it is no record a pod writes), so a presence read costs bytes, not megabytes, and
    the real members around it are listed."""
    keys = Keys("hugepresence")
    sync = redis.Redis.from_url(redis_url)
    project, huge = 9, b"h" * (8 * 1024 * 1024)
    record = PodRecord(name="Alice", viewing=1, answering=None, since=1, at=1)

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5)
        try:
            store = PresenceStore(client, "a", keys=keys)
            assert await store.write([Write(project, 0, 1, {"alice": record})]) == [True]
        finally:
            await client.aclose()

    try:
        sync.delete(keys.presence_pods(project), keys.presence_versions(project))
        asyncio.run(run())
        sync.hset(keys.presence_pod(project, "a"), mapping={"mallory": huge, huge: b"[]"})
        args = read_args(keys.presence_pod_prefix(project))
        reply = sync.eval(
            READ, 2, keys.presence_pods(project), keys.presence_versions(project), *args
        )
        assert len(repr(reply)) < 10_000, "the huge value crossed the wire"
        assert [m.id for m in read_presence(sync, project, keys=keys)] == ["alice"]
    finally:
        sync.delete(*sync.keys("hugepresence:*"))
        sync.close()


def test_a_backend_client_that_decodes_replies_skips_bytes_that_are_not_text(redis_url) -> None:
    """A backend's redis-py client made with ``decode_responses=True`` (common in
    applications) reads presence as any other: another writer's member or record that is not
    UTF-8 is skipped, the real members listed. (Before, redis-py's decoding of the reply
    raised ``UnicodeDecodeError`` out of ``read_presence`` and ``Publisher.presence``, which
    promise a member list or a Redis error.)"""
    from publisher import AsyncPublisher, Publisher

    keys = Keys()  # (the publisher's prefix)
    project = 911
    raw = redis.Redis.from_url(redis_url)
    record = PodRecord(name="Alice", viewing=1, answering=None, since=1, at=1)

    async def write() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5)
        try:
            store = PresenceStore(client, "a", keys=keys)
            assert await store.write([Write(project, 0, 1, {"alice": record})]) == [True]
        finally:
            await client.aclose()

    async def aread() -> tuple[list[Member], list[Member]]:
        client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        try:
            return (
                await aread_presence(client, project, keys=keys),
                await AsyncPublisher(client).presence(project),
            )
        finally:
            await client.aclose()

    decoding = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        raw.delete(keys.presence_pods(project), keys.presence_versions(project))
        asyncio.run(write())
        raw.hset(
            keys.presence_pod(project, "a"),
            mapping={b"\xffmallory": encode_record(record), "bob": b'["\xff",null,null,1,1]'},
        )
        alice = [Member("alice", "Alice", 1, None, 1)]
        assert read_presence(decoding, project, keys=keys) == alice
        assert Publisher(decoding).presence(project) == alice
        assert asyncio.run(aread()) == (alice, alice)
    finally:
        raw.delete(
            keys.presence_pods(project),
            keys.presence_versions(project),
            keys.presence_pod(project, "a"),
        )
        raw.close()
        decoding.close()


async def test_subscribing_and_unsubscribing_in_a_loop_costs_one_read_per_interval(pods) -> None:
    """A client that subscribes to a project's presence and unsubscribes again, in a loop (or
    many clients taking turns), is each time the project's only subscriber on the pod: it must
    not cost a Redis read of the whole project (O(members), on the Redis every project shares)
    per subscribe. The view stays for one diff interval after its last subscriber left, kept
    current meanwhile, and then goes (with its channel), so idle projects cost nothing."""
    a, b = await pods.start("a"), await pods.start("b")
    for i in range(200):
        a.join(f"tab{i}", 3, f"u{i}", None)
    await eventually(lambda: _listed_count(b, 3, 200), 5)
    reads = []
    read = b.store.read
    b.store.read = lambda project_id: reads.append(project_id) or read(project_id)
    for _ in range(50):
        await b.subscribe("hostile", 3)
        b.unsubscribe("hostile", 3)
    assert len(reads) <= 1
    a.activity("tab7", 3, 42, None)  # a change while nobody is subscribed on b
    watcher = await pods.watch(b, "watcher", project_id=3)
    await watcher.until(lambda m: m["u7"].viewing == 42, within=5)
    pods.watchers.pop("watcher")
    b.unsubscribe("watcher", 3)
    channel = b.keys.presence_channel(3)

    async def gone() -> bool:
        return 3 not in b.core.views and channel not in b._channels

    await eventually(gone, 2 * TIMINGS["diff_interval"] + SLACK)


async def _listed_count(service: PresenceService, project_id: int, count: int) -> bool:
    return len(msgspec.json.decode(await service.get(project_id))["members"]) == count


@pytest.mark.parametrize("loss", ["deleted", "replaced"])
async def test_a_pod_that_dies_when_the_pods_index_is_lost_still_leaves_within_the_bound(
    pods, redis_client, loss
) -> None:
    """The pods zset holds the deadlines that make a dead pod's members leave. When it is lost
    (another writer's value replaced, or deleted) while the versions hash stays, a pod that died
    meanwhile has a version and no deadline: refresh reports must not count it live forever (a
    ghost on every dashboard), and it leaves within the kill bound as any dead pod does."""
    victim, survivor = await pods.start("victim"), await pods.start("survivor")
    victim.join("tab", 1, "ghost", None)
    survivor.join("tab", 1, "stays", None)
    watcher = await pods.watch(survivor, "watcher")
    await watcher.until(lambda m: set(m) == {"ghost", "stays"}, within=5)
    await victim.stop()
    killed = time.monotonic()
    if loss == "deleted":
        redis_client.delete(survivor.keys.presence_pods(1))
    else:
        redis_client.set(survivor.keys.presence_pods(1), "a string, not a zset")
    await watcher.until(lambda m: set(m) == {"stays"}, within=KILL_BOUND + SLACK)
    assert time.monotonic() - killed <= KILL_BOUND + SLACK
    assert [m.id for m in read_presence(redis_client, 1)] == ["stays"]


async def test_a_forged_announcement_ahead_of_redis_does_not_freeze_a_pods_members(
    pods, redis_client
) -> None:
    """Another writer publishes a well-formed announcement for a live pod with a version far
    ahead of the pod's (and a made-up record). Views take it, but the pod's own later
    announcements are older than that version: they were ignored forever, the pod's members
    frozen as forged in every view. A view that stays ahead of Redis across two refresh
    reports (never legitimate: a write stores its version before it announces it) is
    re-read, and the forged version is dropped."""
    a, b = await pods.start("a"), await pods.start("b")
    a.join("tab", 1, "alice", "Alice")
    watcher = await pods.watch(b, "watcher")
    await watcher.until(lambda m: set(m) == {"alice"}, within=5)
    forged = b'a|999999999|0|{"alice":["Mallory",666,null,1,1],"eve":[null,null,null,1,1]}'
    redis_client.publish(b.keys.presence_channel(1), forged)
    await watcher.until(lambda m: m.get("eve") is not None, within=5)  # the forgery landed
    a.activity("tab", 1, 7, None)
    bound = 3 * TIMINGS["refresh_interval"] + TIMINGS["diff_interval"] + SLACK
    await watcher.until(
        lambda m: set(m) == {"alice"} and m["alice"].viewing == 7 and m["alice"].name == "Alice",
        within=bound,
    )


# --- deadlines no pod can have set -------------------------------------------------------------


def _server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def _plant_pod(client: redis.Redis, keys: Keys, project: int, pod: str, deadline) -> None:
    """A pod as the scripts write it (version, records), with the given deadline."""
    record = PodRecord(name=pod, viewing=None, answering=None, since=1, at=1)
    client.zadd(keys.presence_pods(project), {pod: deadline})
    client.hset(keys.presence_versions(project), pod, 1)
    client.hset(keys.presence_pod(project, pod), f"{pod}-member", encode_record(record))


@pytest.mark.parametrize("by", ["write", "refresh"])
def test_a_pod_deadline_beyond_the_longest_ttl_is_dead_and_repaired(redis_url, by) -> None:
    """A pod's deadline is at most now + MAX_TTL_MS (the longest ttl or drain grace allowed).
    One further ahead (+inf, ten times the bound, just past it: another writer's or corrupted)
    kept its members listed for ever, people who left shown on every dashboard. Now it is dead
    as one whose deadline passed: READ (the pods and backends) lists none of its members, and
    the next write or refresh removes it with its records and version, counted as a repair. A
    pod at now + ttl, or at the bound itself (a drain at the longest grace), stays listed."""
    keys = Keys("deadlines")
    sync = redis.Redis.from_url(redis_url)
    project, record = 4, PodRecord(name="Alice", viewing=1, answering=None, since=1, at=1)
    repairs: list[tuple[int, int]] = []

    async def write_alice() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5)
        try:
            store = PresenceStore(client, "a", keys=keys)  # ttl 10 s: deadline now + 10 s
            assert await store.write([Write(project, 0, 1, {"alice": record})]) == [True]
        finally:
            await client.aclose()

    async def repair() -> dict[str, int]:
        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5)
        try:
            store = PresenceStore(
                client, "b", keys=keys, on_repaired=lambda p, n: repairs.append((p, n))
            )
            if by == "write":
                assert await store.write([Write(project, 0, 1, {"bob": record})]) == [True]
            return (await store.refresh({project: None}))[project][1]
        finally:
            await client.aclose()

    try:
        asyncio.run(write_alice())
        now = _server_ms(sync)
        _plant_pod(sync, keys, project, "forever", float("inf"))
        _plant_pod(sync, keys, project, "far", now + 10 * MAX_TTL_MS)
        _plant_pod(sync, keys, project, "beyond", now + MAX_TTL_MS + 60_000)
        _plant_pod(sync, keys, project, "grace", now + MAX_TTL_MS - 60_000)
        ghosts = ["forever", "far", "beyond"]

        listed = [m.id for m in read_presence(sync, project, keys=keys)]
        assert listed == ["alice", "grace-member"]

        live = asyncio.run(repair())
        assert set(live) == {"a", "grace"} | ({"b"} if by == "write" else set())
        assert repairs == [(project, len(ghosts))]
        assert sync.zscore(keys.presence_pods(project), "forever") is None
        assert set(sync.zrange(keys.presence_pods(project), 0, -1)) == {p.encode() for p in live}
        assert not sync.hexists(keys.presence_versions(project), "far")
        assert not any(sync.exists(keys.presence_pod(project, p)) for p in ghosts)
        listed = [m.id for m in read_presence(sync, project, keys=keys)]
        assert listed == sorted(["alice", "grace-member"] + (["bob"] if by == "write" else []))
    finally:
        sync.delete(*sync.keys("deadlines:*"))
        sync.close()


def test_a_ttl_beyond_the_bound_is_cut_to_it_not_taken_for_dead(redis_url) -> None:
    """The scripts cut a ttl over MAX_TTL_MS to it (the gateway's config refuses one), so a pod
    given a longer one is listed, not removed as garbage by its own write."""
    keys = Keys("longttl")
    sync = redis.Redis.from_url(redis_url)
    record = PodRecord(name="Alice", viewing=1, answering=None, since=1, at=1)

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5)
        try:
            store = PresenceStore(client, "a", keys=keys, ttl=10 * MAX_TTL_MS / 1000)
            assert await store.write([Write(3, 0, 1, {"alice": record})]) == [True]
            assert (await store.refresh({3: 1}))[3] == (True, {"a": 1})
        finally:
            await client.aclose()

    try:
        asyncio.run(run())
        assert [m.id for m in read_presence(sync, 3, keys=keys)] == ["alice"]
        deadline = sync.zscore(keys.presence_pods(3), "a")
        assert deadline <= _server_ms(sync) + MAX_TTL_MS
    finally:
        sync.delete(*sync.keys("longttl:*"))
        sync.close()


def test_a_ttl_or_grace_beyond_the_bound_is_refused() -> None:
    from gateway.config import ConfigError, load_config

    limit = MAX_TTL_MS / 1000
    for bad in (["--presence-ttl", str(limit + 1)], ["--presence-drain-grace", str(limit + 1)]):
        with pytest.raises(ConfigError, match="at most 600 s"):
            load_config(["--no-auth", *bad], environ={})
    load_config(
        ["--no-auth", "--presence-ttl", str(limit), "--presence-drain-grace", str(limit)],
        environ={},
    )
    for kwargs in ({"ttl": limit + 1}, {"drain_grace": limit + 1}):
        with pytest.raises(ValueError, match="600 s"):
            PresenceService(redis.asyncio.Redis(), lambda s, f: None, pod_id="a", **kwargs)


def test_an_announcement_bound_past_half_the_soft_limit_is_refused() -> None:
    """``--presence-max-announcement`` is 0 to 4 MiB: more would let one write's announcement
    reach Redis's default soft limit on a pub/sub connection (8 MB for 60 s)."""
    from gateway.config import ConfigError, load_config
    from schemas.presence import MAX_ANNOUNCEMENT_LIMIT

    for bad in (str(MAX_ANNOUNCEMENT_LIMIT + 1), "-1"):
        with pytest.raises(ConfigError, match="--presence-max-announcement"):
            load_config(["--no-auth", "--presence-max-announcement", bad], environ={})
    for good in (0, MAX_ANNOUNCEMENT_LIMIT):
        config = load_config(["--no-auth", "--presence-max-announcement", str(good)], environ={})
        assert config.presence_max_announcement == good
    with pytest.raises(ValueError, match="max_announcement"):
        PresenceService(
            redis.asyncio.Redis(),
            lambda s, f: None,
            pod_id="a",
            max_announcement=MAX_ANNOUNCEMENT_LIMIT + 1,
        )


#: Deadlines relative to Redis's now (ms); the scripts run a few ms after the ZADD, so offsets
#: within MARGIN of a boundary (now, now + MAX_TTL_MS) are left out as undecidable here.
_MARGIN = 5_000
_offsets = st.one_of(
    st.floats(allow_nan=False),
    st.integers(-10 * MAX_TTL_MS, 10 * MAX_TTL_MS),
    st.sampled_from([float("inf"), float("-inf"), 2.0**53, -(2.0**53), 1e300]),
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(offsets=st.lists(_offsets, min_size=1, max_size=4))
def test_any_deadline_is_listed_exactly_while_a_pod_can_have_set_it(redis_url, offsets) -> None:
    """For any scores in the pods zset (finite, huge, infinite): a pod's members are listed
    (READ, by backends and pods) exactly when its deadline is ahead and at most MAX_TTL_MS
    ahead, and a refresh leaves exactly those pods, the others removed with their records and
    counted as repairs when they were beyond the bound."""
    from hypothesis import assume

    keys = Keys("deadlinefuzz")
    sync = redis.Redis.from_url(redis_url)
    project = 6
    try:
        sync.delete(*(sync.keys("deadlinefuzz:*") or ["deadlinefuzz:none"]))
        now = _server_ms(sync)
        live, beyond = set(), 0
        for i, offset in enumerate(offsets):
            assume(abs(offset) > _MARGIN and abs(offset - MAX_TTL_MS) > _MARGIN)
            _plant_pod(sync, keys, project, f"p{i}", now + offset)
            if offset > MAX_TTL_MS:
                beyond += 1
            elif offset > 0:
                live.add(f"p{i}")
        listed = {m.id for m in read_presence(sync, project, keys=keys)}
        assert listed == {f"{p}-member" for p in live}
        repairs: list[int] = []

        async def refresh() -> dict[str, int]:
            client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5)
            try:
                store = PresenceStore(
                    client, "w", keys=keys, on_repaired=lambda p, n: repairs.append(n)
                )
                return (await store.refresh({project: None}))[project][1]
            finally:
                await client.aclose()

        assert set(asyncio.run(refresh())) == live
        assert sum(repairs) == beyond
        assert {p.decode() for p in sync.zrange(keys.presence_pods(project), 0, -1)} == live
        assert {
            p for i in range(len(offsets)) if sync.exists(keys.presence_pod(project, p := f"p{i}"))
        } == live
    finally:
        sync.close()


# --- more members than pods can have written ---------------------------------------------------


def _forge_pod(client: redis.Redis, keys: Keys, project: int, pod: str, members: int) -> None:
    """Another writer's pod in a project: ``members`` well-formed records, a version, and a
    deadline a pod can have set (later than the real pods'). Call it in a thread
    (``asyncio.to_thread``): the pods in the event loop must go on refreshing meanwhile."""
    record = encode_record(PodRecord(name="Forged", viewing=None, answering=None, since=1, at=1))
    pipe = client.pipeline(transaction=False)
    for start in range(0, members, 20_000):
        batch = range(start, min(members, start + 20_000))
        pipe.hset(keys.presence_pod(project, pod), mapping={f"{pod}-{i}": record for i in batch})
    pipe.execute()
    # The version and the deadline at once: a pod's REFRESH in between deletes a version
    # without a deadline, and the forged pod is then never read (nothing left out, nothing
    # counted: a loaded machine's flake).
    deadline = _server_ms(client) + MAX_TTL_MS - 60_000
    with client.pipeline(transaction=True) as both:
        both.hset(keys.presence_versions(project), pod, 1)
        both.zadd(keys.presence_pods(project), {pod: deadline})
        both.execute()


async def test_a_forged_pod_of_a_million_members_is_left_out_in_redis(pods, redis_client) -> None:
    """Another writer (or a buggy pod) stores a pod listing 1,000,000 members in a project.
    Read whole, every presence read of the project cost the gateway a 75 MB frame, ~5 s of
    CPU with its event loop blocked (every project of the pod stalled) and ~440 MB of memory.
    No pod lists more than twice --presence-max-members (+64): the read leaves such a pod out
    in Redis, the real members are listed, the rest is counted, and other projects are not
    affected."""
    counted: list[tuple[int, int]] = []
    # A longer ttl: the index keys expire a ttl after the last refresh, and with them the
    # forged pod; a loaded machine must not delay a refresh that long while it is forged.
    slow = {"ttl": 5.0, "refresh_interval": 1.0}
    a = await pods.start("a", **slow)
    b = await pods.start("b", on_left_out=lambda p, n: counted.append((p, n)), **slow)
    a.join("tab", 1, "alice", "Alice")
    a.join("tab", 2, "bob", "Bob")
    await eventually(lambda: _listed(b, 1, {"alice"}), 5)
    await asyncio.to_thread(_forge_pod, redis_client, b.keys, 1, "forged", 1_000_000)

    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.sleep(TIMINGS["diff_interval"])  # the cached answer is at most this old
    frame = await b.get(1)
    assert [m["id"] for m in msgspec.json.decode(frame)["members"]] == ["alice"]
    assert len(frame) < 1_000
    watcher = await pods.watch(b, "watcher", 1)  # a view, read the same way
    assert set(watcher.members) == {"alice"}
    assert loop.time() - started < TIMINGS["diff_interval"] + 2.0
    assert counted and {p for p, _ in counted} == {1} and b.left_out >= 2
    assert await _listed(b, 2, {"bob"})
    assert [m.id for m in read_presence(redis_client, 1)] == ["alice"]  # backends too


async def test_forged_pods_together_listing_too_many_are_cut_to_the_bound(
    pods, redis_client
) -> None:
    """Twenty forged pods of 250 members each (none larger than a real pod can be with
    --presence-max-members 100), 5,000 together: a read lists at most listed_limit(100)
    members (16 pods' worth), counts the rest, and the real pod's members (deadlines sooner
    than the forged ones) are among them."""
    slow = {"ttl": 5.0, "refresh_interval": 1.0}  # as above
    a = await pods.start("a", max_members=100, **slow)
    b = await pods.start("b", max_members=100, **slow)
    a.join("tab", 1, "alice", "Alice")
    await eventually(lambda: _listed(b, 1, {"alice"}), 5)
    for i in range(20):
        await asyncio.to_thread(_forge_pod, redis_client, b.keys, 1, f"forged{i}", 250)
    await asyncio.sleep(TIMINGS["diff_interval"])
    members = [m["id"] for m in msgspec.json.decode(await b.get(1))["members"]]
    assert "alice" in members and len(members) == listed_limit(100) == 16 * (2 * 100 + 64)
    assert b.left_out == 1 + 20 * 250 - listed_limit(100)  # members left out


def test_a_read_reads_no_pod_once_it_lists_the_most_members_in_all(redis_client) -> None:
    """Another writer's pods, each under the per-pod bound: 200 of read_limit(100) = 264
    records at --presence-max-members 100. A read lists listed_limit(100) = 4,224 members (16
    pods' worth) and must not read the other pods' records in Redis only to leave them out:
    it did (HGETALL of every live pod, up to read_limit of them), which at the default cap
    (up to 2,064 pods of 2,064 records) blocked Redis for every client ~2 s per read of the
    project (200 x 2,064 took 194 ms). Now the pods past the bound are counted, not read."""
    keys = Keys()
    for i in range(200):
        _forge_pod(redis_client, keys, 1, f"forged{i:03}", read_limit(100))
    hgetall = redis_client.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0)
    reply = redis_client.eval(
        READ,
        2,
        keys.presence_pods(1),
        keys.presence_versions(1),
        *read_args(keys.presence_pod_prefix(1), 100),
    )
    read = redis_client.info("commandstats")["cmdstat_hgetall"]["calls"] - hgetall
    listed = sum(len(state.records) for state in parse_read_reply(reply).values())
    assert listed == listed_limit(100)
    assert read_left_out(reply) == 200 * read_limit(100) - listed_limit(100)
    assert read == 16  # the pods whose records are listed, and no more


async def test_a_forged_announcement_of_too_many_members_is_left_out(pods, redis_client) -> None:
    """Another writer publishes well-formed announcements on a project's presence channel: one
    of 1,000 members (no pod writes that many at once with --presence-max-members 100), then
    twenty of 250 each under new pod names (together more than any read lists). Taken, every
    subscriber got them all in its next diff, and the view kept them. They are left out and
    counted; the real members stay."""
    a = await pods.start("a", max_members=100)
    b = await pods.start("b", max_members=100)
    a.join("tab", 1, "alice", "Alice")
    watcher = await pods.watch(b, "watcher")
    await watcher.until(lambda m: set(m) == {"alice"}, within=5)
    record = b"[null,null,null,1,1]"

    def announcement(pod: str, n: int) -> bytes:
        body = b",".join(b'"%s-%d":%s' % (pod.encode(), i, record) for i in range(n))
        return pod.encode() + b"|1|0|{" + body + b"}"

    channel = b.keys.presence_channel(1)
    redis_client.publish(channel, announcement("huge", 1_000))
    for i in range(1, 21):
        redis_client.publish(channel, announcement(f"f{i}", 250))
    await eventually(lambda: _true(b.left_out >= 2), 5)
    a.activity("tab", 1, 7, None)  # a change every view shows within the bound
    await watcher.until(lambda m: "alice" in m and m["alice"].viewing == 7, within=5)
    assert len(watcher.members) <= listed_limit(100)
    assert not any(m.startswith(("huge", "f20-")) for m in watcher.members)


async def _true(value: bool) -> bool:
    return value


async def _listed(service: PresenceService, project: int, ids: set[str]) -> bool:
    frame = msgspec.json.decode(await service.get(project))
    return {m["id"] for m in frame["members"]} == ids


async def test_members_each_pod_admits_under_the_cap_are_all_listed(pods, redis_client) -> None:
    """A legitimate deployment: --presence-max-members 100 and three pods whose clients
    subscribe without presence (events only), so no pod has a view of the project and each
    admits members against its own tabs (``PresenceCore.is_full``): 100 each, 300 together,
    every one admitted by the gateway. A presence read and a view must list them all: these
    are the pods' own records, not another writer's."""
    cap = 100
    started = await _pods_each_at_the_cap(pods, redis_client, ["a", "b", "c"], cap)
    everyone = {f"{pod.pod_id}-{i}" for pod in started for i in range(cap)}
    listed = {m["id"] for m in msgspec.json.decode(await started[0].get(1))["members"]}
    assert len(listed) == 3 * cap, (len(listed), started[0].left_out)
    await eventually(lambda: _listed(started[0], 1, everyone), 5)
    watcher = await pods.watch(started[0], "watcher", 1)
    assert set(watcher.members) == everyone
    assert started[0].left_out == 0


async def test_a_backend_reads_every_member_of_a_deployment_with_a_higher_cap(
    pods, redis_client
) -> None:
    """--presence-max-members may be set above the default (1,000): a pod of such a deployment
    lists up to that many members, more than read_limit() of the default (2,064). A backend's
    read given the deployment's setting lists them all; with the default it left the pod out
    whole (none of its 2,100 members listed, nothing said)."""
    a = await pods.start("a", max_members=2_500)
    members = {f"m{i}" for i in range(2_100)}
    for i, member in enumerate(sorted(members)):
        assert not a.core.is_full(1, member, 2_500)
        a.join(f"tab{i}", 1, member, None)

    async def written() -> bool:
        return redis_client.hlen(a.keys.presence_pod(1, "a")) == len(members)

    await eventually(written, 5)
    assert {m.id for m in read_presence(redis_client, 1, max_members=2_500)} == members
    listed = await aread_presence(a.client, 1, max_members=2_500)
    assert {m.id for m in listed} == members


async def test_a_view_of_members_pods_admitted_neither_rereads_nor_flickers(
    pods, redis_client
) -> None:
    """Six pods at --presence-max-members 100 with no view of the project each admit 100 members
    (600, every one admitted by is_full). A seventh watcher's view must then follow their
    activity without re-reading the project at every announcement and without showing members
    leave who never left. Shown: one re-read per round of activity, ~337 members counted as
    another writer's per round, and members leaving the watcher's list."""
    cap = 100
    started = await _pods_each_at_the_cap(pods, redis_client, list("abcdef"), cap)
    a = started[0]
    watcher = await pods.watch(a, "watcher", 1)
    rereads = a.rereads
    await _rounds_of_activity(started[1:], watcher, 5, cap)
    assert (a.rereads - rereads, len(watcher.left)) == (0, 0)


@pytest.mark.parametrize("count", [40, 50])
async def test_a_view_past_the_most_members_in_all_neither_rereads_nor_flickers(
    pods, redis_client, count
) -> None:
    """A legitimate deployment past listed_limit: 50 pods at --presence-max-members 100 with no
    view of the project each admit 100 members (5,000 > listed_limit(100) = 4,224). A read
    lists 4,224 of them (a documented cut); a watcher's view must then follow their activity
    without re-reading the project at every round and without showing members leave who
    never left. With 40 pods (4,000 members, under the bound) every one is listed."""
    cap = 100
    names = [f"p{n:02}" for n in range(count)]
    started = await _pods_each_at_the_cap(pods, redis_client, names, cap)
    a = started[0]
    watcher = await pods.watch(a, "watcher", 1)
    listed = len(watcher.members)  # with the watcher's own pod's members, read from memory
    assert (
        listed == count * cap if count * cap <= listed_limit(cap) else listed >= listed_limit(cap)
    )
    rereads = a.rereads
    await _rounds_of_activity(started[1:], watcher, 3, cap)
    assert (a.rereads - rereads, len(watcher.left)) == (0, 0)
    assert len(watcher.members) == listed <= listed_limit(cap) + cap


def test_a_read_with_the_arguments_of_before_listed_limit_still_answers(redis_client) -> None:
    """READ's ARGV before cbe6c98 ended at the most members (no listed_limit): a caller that
    builds them (another version's code sharing the script text) got a script error at the
    first record ("attempt to compare nil with number"). Without ARGV[5] it lists at most
    ARGV[4] members in all, as it did then."""
    keys = Keys()
    _forge_pod(redis_client, keys, 1, "a", 3)
    _forge_pod(redis_client, keys, 1, "b", 3)
    args = read_args(keys.presence_pod_prefix(1), 1)[:4]
    reply = redis_client.eval(READ, 2, keys.presence_pods(1), keys.presence_versions(1), *args)
    assert sum(len(s.records) for s in parse_read_reply(reply).values()) == 6
    args[3] = 4  # at most 4 of one pod and in all
    reply = redis_client.eval(READ, 2, keys.presence_pods(1), keys.presence_versions(1), *args)
    assert sum(len(s.records) for s in parse_read_reply(reply).values()) == 4
    assert read_left_out(reply) == 2


async def _pods_each_at_the_cap(pods, redis_client, names: list[str], cap: int) -> list:
    """Pods without a view of project 1 (their tabs subscribed without presence), each
    admitting ``cap`` members against its own tabs (``is_full`` says no to none of them), once
    every pod's records are in Redis."""
    slow = {"ttl": 5.0, "refresh_interval": 1.0}
    started = [await pods.start(name, max_members=cap, **slow) for name in names]
    for pod in started:
        for i in range(cap):
            member = f"{pod.pod_id}-{i}"
            assert not pod.core.is_full(1, member, cap)
            pod.join(f"tab{i}", 1, member, None)

    async def written() -> bool:
        return all(
            redis_client.hlen(pod.keys.presence_pod(1, pod.pod_id)) == cap for pod in started
        )

    await eventually(written, 10)
    return started


async def _rounds_of_activity(pods: list, watcher: Watcher, rounds: int, cap: int) -> None:
    """``rounds`` times, every tab of ``pods`` views item 1, 2, ...: each round awaited until
    the watcher sees it (within a write and a diff interval)."""
    for viewing in range(1, rounds + 1):
        for pod in pods:
            for i in range(cap):
                pod.activity(f"tab{i}", 1, viewing, None)
        await watcher.until(lambda m, v=viewing: any(x.viewing == v for x in m.values()), within=5)


def test_the_presence_listeners_probe_pings_each_interval_and_waits_one_for_the_pong():
    """Times of the own pub/sub connection's probe (tests/test_redis_protocol.py ends a trickled
    frame with it against a server). Unlike the link's PongWait, a frame read earlier in the
    interval buys no more time: only a frame from the read that finds the pong late does."""
    from gateway.presence_store import _PubSubProbe

    probe = _PubSubProbe(now=0.0, interval=3.0)
    assert probe.limit == 2
    assert not probe.ping_due(2.9)
    assert probe.ping_due(3.0) and not probe.ping_due(3.1)  # one ping at a time
    assert not probe.overdue(5.0, after_a_frame=True)
    assert not probe.overdue(6.0) and probe.overdue(6.1)  # the frame at 5.0 does not count
    # Just after another frame, one more interval: the pong may be right behind it.
    assert not probe.overdue(9.0, after_a_frame=True) and probe.overdue(9.1, after_a_frame=True)
    probe.answered(4.0)
    assert not probe.overdue(100.0)
    assert not probe.ping_due(6.9) and probe.ping_due(7.0)


class _PubSubStub:
    """What the presence listener uses of a redis-py pub/sub, in memory; ``stall`` names the
    write that never ends (a Redis that stopped reading, its buffers full, with a client of
    yours without a ``socket_timeout``)."""

    def __init__(self, stall: str | None) -> None:
        self.stall = stall
        self.frames: list[dict] = []
        self.confirmed = asyncio.Event()  # a subscribe confirmation was read
        self.connection = None  # (no socket: nothing for the listener to note)

    async def connect(self) -> None:
        pass

    async def _write(self, name: str) -> None:
        if name == self.stall:
            await asyncio.Event().wait()

    async def subscribe(self, *channels: str) -> None:
        await self._write("subscribe")
        self.frames += [{"type": "subscribe", "channel": c.encode()} for c in channels]

    async def unsubscribe(self, *channels: str) -> None:
        await self._write("unsubscribe")

    async def ping(self) -> None:
        await self._write("ping")
        self.frames.append({"type": "pong"})

    async def get_message(self, **read: float) -> dict | None:
        if self.frames:
            frame = self.frames.pop(0)
            if frame["type"] == "subscribe":
                self.confirmed.set()
            return frame
        await asyncio.sleep(read["timeout"])  # (a read that timed out)
        return None

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("stall", ["subscribe", "ping"])
async def test_the_presence_listeners_writes_end_within_a_refresh_interval(stall):
    """A write the listener makes on its own pub/sub connection (a subscribe, the probe's ping)
    that never ends gives that connection up within a refresh interval, and the next one
    serves; before, the listener waited on it for ever."""
    made: list[_PubSubStub] = []
    second = asyncio.Event()

    class Client:
        def register_script(self, script: str) -> None:
            return None  # (the store's scripts: not run here)

        def pubsub(self) -> _PubSubStub:
            made.append(_PubSubStub(stall if not made else None))
            if len(made) == 2:
                second.set()
            return made[-1]

    service = PresenceService(Client(), lambda sessions, frame: None, pod_id="a", **TIMINGS)
    service._channels.add("eventbus:presence:{1}")  # (what watching project 1 adds)
    listener = asyncio.create_task(service._listen_loop())
    try:
        started = time.monotonic()
        async with asyncio.timeout(5):
            await second.wait()
        # A ping after one interval; given up one interval later.
        assert time.monotonic() - started < 3 * TIMINGS["refresh_interval"] + SLACK
        async with asyncio.timeout(5):
            await made[1].confirmed.wait()  # the second connection serves
        assert service._confirmed == {"eventbus:presence:{1}"}
    finally:
        service.stopped = True
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)


async def test_a_loop_busy_past_a_refresh_interval_does_not_reconnect_the_listener(redis_url):
    """The event loop busy past a refresh interval just after the listener's ping, with an
    announcement queued ahead of the pong: the listener reads the frames that are there, the
    pong among them, and keeps its connection. Before, the first frame after the pause (not the
    pong) found the pong overdue and the listener reconnected (and re-read every view)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    channel = "eventbus:presence:{1}"
    made = 0
    pings = 0
    done = asyncio.Event()  # a fourth ping, or a second connection

    class BusyPubSub(redis.asyncio.client.PubSub):
        async def ping(self, *args, **kwargs) -> None:
            nonlocal pings
            pings += 1
            if pings == 4:
                done.set()
            if pings <= 3:
                await client.publish(channel, b"{}")  # ahead of the pong
            await super().ping(*args, **kwargs)
            if pings <= 3:
                time.sleep(0.4)  # noqa: ASYNC251 (the loop busy past the interval, on purpose)

    def pubsub() -> BusyPubSub:
        nonlocal made
        made += 1
        if made == 2:
            done.set()
        return BusyPubSub(client.connection_pool)

    client.pubsub = pubsub
    service = PresenceService(client, lambda sessions, frame: None, pod_id="a", **TIMINGS)
    service._channels.add(channel)  # (what watching project 1 adds)
    listener = asyncio.create_task(service._listen_loop())
    try:
        async with asyncio.timeout(10):
            await done.wait()
        assert made == 1, "the listener reconnected"
    finally:
        service.stopped = True
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await client.aclose()


def test_replies_of_per_master_pipelines_go_back_to_their_calls_and_a_failed_master_to_its_own():
    """The pure part of a cluster write or refresh: calls grouped by master, each group's
    replies put back in the calls' order; a group that failed gives its failure (an OSError as
    a ConnectionError) to its calls alone; only when every group failed is it raised."""
    masters = ["m1", "m2", "m1", None, "m2"]
    groups = group_by_master(range(5), masters.__getitem__)
    assert groups == [[0, 2], [1, 4], [3]]
    down = redis.exceptions.TimeoutError("no answer")
    replies = spread_outcomes(5, groups, [["r0", "r2"], down, ["r3"]])
    assert replies == ["r0", down, "r2", "r3", down]
    replies = spread_outcomes(
        5, groups, [ConnectionRefusedError(111, "refused"), ["a", "b"], ["c"]]
    )
    assert isinstance(replies[0], redis.exceptions.ConnectionError) and replies[0] is replies[2]
    assert replies[1:2] + replies[3:] == ["a", "c", "b"]
    with pytest.raises(redis.exceptions.TimeoutError):
        spread_outcomes(5, groups, [down, down, OSError("gone")])
    with pytest.raises(ZeroDivisionError):  # a bug is not a master's failure
        spread_outcomes(5, groups, [ZeroDivisionError(), ["a", "b"], ["c"]])


class _StoreWithADeadMaster:
    """A PresenceStore's write and refresh as on a cluster whose master of ``dead`` projects
    fails: those projects get a ConnectionError, the others are applied."""

    per_master = True
    group_timeout = 0.1

    def __init__(self) -> None:
        self.dead: set[int] = set()
        self.written: list[Write] = []
        self.refreshed: list[dict[int, int | None]] = []
        self.stored: dict[int, int] = {}
        #: Projects whose reads hang (their master stopped answering) until they are removed.
        self.hung_reads: set[int] = set()
        self.answering = asyncio.Event()  # set: the hung reads answer again
        self.reading: set[int] = set()  # reads begun
        self.hung_waits = 0  # reads that found their master hung
        self.reads: set[int] = set()  # reads answered
        self.changed = asyncio.Event()  # set at each read or write

    def master_of(self, project_id: int) -> str | None:
        return "hung" if project_id in self.hung_reads else None

    async def read(self, project_id: int) -> dict:
        self.reading.add(project_id)
        self.changed.set()
        if project_id in self.hung_reads and not self.answering.is_set():
            self.hung_waits += 1
            await self.answering.wait()
        self.reads.add(project_id)
        self.changed.set()
        return {}

    #: What a dead master's projects are answered: the connection's failure, or an error reply
    #: about the node rather than the keys (the cluster reconfiguring around it).
    down: type[redis.exceptions.RedisError] = redis.exceptions.ConnectionError

    def _down(self) -> redis.exceptions.RedisError:
        return self.down("master down")

    async def write(self, writes, *, at=ANYWHERE):
        self.written += writes
        self.changed.set()
        out = []
        for w in writes:
            if w.project_id in self.dead:
                out.append(self._down())
            elif w.base and self.stored.get(w.project_id) != w.base:
                out.append(False)
            else:
                self.stored[w.project_id] = w.version
                out.append(True)
        return out

    async def refresh(self, plan, ttl_ms=None, *, at=ANYWHERE, counts=None):
        self.refreshed.append(dict(plan))
        return {
            p: self._down()
            if p in self.dead
            else (v is None or (v != 0 and self.stored.get(p) == v), {})
            for p, v in plan.items()
        }


@pytest.mark.parametrize(
    "down",
    [
        redis.exceptions.ConnectionError,
        redis.exceptions.ClusterDownError,  # CLUSTERDOWN, also MASTERDOWN
        redis.exceptions.TryAgainError,  # TRYAGAIN: a slot being moved
        redis.exceptions.ReadOnlyError,  # a master demoted to replica in a failover
    ],
)
async def test_a_project_whose_master_failed_waits_for_the_next_refresh_the_others_go_on(down):
    """A write or refresh answered with its master's failure (Redis Cluster, a master down or
    hung, or an error reply about the node while the cluster reconfigures) leaves that project
    unwritten: its writes are not sent again each round (each would wait for the hung master,
    holding the other masters' writes with it) but once a refresh reaches the master again,
    which writes its members whole; the other projects go on. (The error replies were taken
    for the project's keys being unusable, and its writes were sent again each round.)"""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = _StoreWithADeadMaster()  # type: ignore[assignment]
    store.dead, store.down = {2}, down
    service.join("t1", 1, "alice", None)
    service.join("t2", 2, "hank", None)
    await cluster_round(service)
    assert sorted(w.project_id for w in store.written) == [1, 2]
    assert not service.core.has_pending_writes()  # not sent again at the next round
    assert service.core.stored_versions().keys() == {1}
    store.written.clear()
    service.join("t3", 2, "hugo", None)
    service.join("t4", 1, "bob", None)
    await cluster_round(service)
    assert [w.project_id for w in store.written] == [1]  # the dead master's write waits
    assert not service.core.has_pending_writes()
    store.written.clear()
    # Still down: nothing written, and project 1 is refreshed.
    await cluster_round(service, refresh_due=True)
    assert store.refreshed[-1].keys() == {1, 2} and store.written == []
    store.dead = set()
    # Back: its refresh finds the records missing, written whole.
    await cluster_round(service, refresh_due=True)
    (rewrite,) = store.written
    assert rewrite.project_id == 2 and rewrite.base == 0
    assert set(rewrite.changes) == {"hank", "hugo"}
    assert service.core.stored_versions().keys() == {1, 2}


async def test_a_reread_of_a_project_whose_master_hangs_does_not_hold_the_others():
    """On Redis Cluster, a re-read (after a pub/sub reconnect every view is read again) of a
    project whose master hangs is given up within the per-master bound (a third of the refresh
    interval) and made again after the next refresh; the other projects are read, and a change
    written, meanwhile. Before, the round waited on it until the round's bound (the refresh
    interval) and failed: a write made meanwhile waited that long, and the projects left in the
    batch were not read (the hung one, tried first again, failed the next round too). Once one
    read found the master hung, its other projects of the batch wait too, untried."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    timings = {**TIMINGS, "ttl": 10.0, "refresh_interval": 3.0}
    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **timings)
    store = service.store = _StoreWithADeadMaster()  # type: ignore[assignment]
    store.group_timeout = 1.0  # (PresenceService gives its store refresh_interval / 3)
    store.hung_reads = {1, 4}  # (on one master)
    for project_id in (1, 2, 3, 4):
        service.core.view(project_id)
    service.reread_all()
    loop = asyncio.create_task(service._redis_loop())
    try:

        async def until(check: Callable[[], bool]) -> None:
            while not check():
                store.changed.clear()
                await store.changed.wait()

        async with asyncio.timeout(2):
            await until(lambda: store.hung_waits == 1)
        service.join("bob-tab", 2, "bob", None)
        started = time.monotonic()
        async with asyncio.timeout(5):
            await until(lambda: any(w.project_id == 2 for w in store.written))
        assert time.monotonic() - started < 2.0, "the write waited for the hung read"
        async with asyncio.timeout(2):
            await until(lambda: {2, 3} <= store.reads)
        assert not {1, 4} & store.reads
        store.answering.set()  # it answers again: read after the next refresh
        async with asyncio.timeout(3.0 + SLACK):
            await until(lambda: {1, 4} <= store.reads)
        # The second of its projects was not tried once the first read found it hung.
        assert store.hung_waits == 1
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def test_a_last_member_who_left_while_the_master_failed_is_removed_once_it_answers():
    """The last member of a project leaves this pod while the project's master (Redis Cluster)
    is down or hangs: the write that would remove the pod's records there is not sent then
    (it waits for the next refresh that reaches the master). Once the master answers, that
    refresh writes the pod's (empty) list there, and the member is gone from every view.
    Before, the project was in no refresh plan any more (the pod has no member there and may
    not watch it), so nothing was ever written: the member stayed listed by every pod until
    the pod's records expired and three refresh reports missed them (the bound of a dead pod,
    for a pod that is healthy), and for ever for a pod that went on refreshing it elsewhere."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = _StoreWithADeadMaster()  # type: ignore[assignment]
    service.join("t1", 1, "alice", None)
    service.join("t2", 2, "hank", None)
    await cluster_round(service)
    assert store.stored.keys() == {1, 2}
    store.dead = {2}
    # Its master fails: project 2 waits for the next refresh.
    await cluster_round(service, refresh_due=True)
    service.leave("t2", 2)
    await cluster_round(service)
    store.written.clear()
    store.dead = set()
    await cluster_round(service, refresh_due=True)  # the master answers again
    await cluster_round(service)
    assert [(w.project_id, w.base, w.changes) for w in store.written] == [(2, 0, {})]
    store.written.clear()
    # Written once: nothing more to do there.
    await cluster_round(service, refresh_due=True)
    await cluster_round(service)
    assert store.written == [] and 2 not in store.refreshed[-1]


async def test_a_slow_but_healthy_master_with_many_projects_is_not_taken_for_hung(monkeypatch):
    """On Redis Cluster each master's part of a refresh has ``group_timeout`` (a third of the
    refresh interval) to answer. A healthy master with thousands of the pod's projects takes
    longer than that for all of them (3,000 script calls per master took 1.4 s on a test
    machine): its part is sent in pipelines of at most ``PIPELINE_CALLS`` calls, one after the
    other, each with that bound, so it answers them all; a master that hangs still fails its
    projects within the bound of one pipeline. Before, one pipeline per master was cut off at
    the bound every round: none of the pod's projects there was ever refreshed or written."""
    projects = range(1, 9001)

    def master(key: str) -> str:
        return f"m{int(key.split('{')[1].split('}')[0]) % 3}"

    monkeypatch.setattr("gateway.presence_store.node_name", lambda client, key: master(key))

    class Client:
        def register_script(self, script: str) -> None:
            return None

    store = PresenceStore(Client(), "pod1", group_timeout=0.5)
    store._cluster = True
    sizes: list[int] = []

    async def pipeline(calls):  # a healthy master answers 4,000 calls a second; m2 hangs
        sizes.append(len(calls))
        if master(calls[0][1][0]) == "m2":
            await asyncio.Event().wait()
        await asyncio.sleep(len(calls) / 4000)
        return [[1, [], 0] for _ in calls]

    store._pipeline = pipeline  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    began = loop.time()
    replies = await store.refresh(dict.fromkeys(projects, 1))
    took = loop.time() - began
    hung = {p for p in projects if p % 3 == 2}
    assert {p for p, r in replies.items() if isinstance(r, redis.exceptions.TimeoutError)} == hung
    assert all(replies[p] == (True, {}) for p in projects if p not in hung)
    assert took < 0.5 + 1.0  # the hung master's bound, and the healthy ones' pipelines
    assert max(sizes) <= PIPELINE_CALLS


async def test_a_new_project_of_a_master_that_failed_waits_for_the_refresh_not_its_round():
    """On Redis Cluster, once a master failed a refresh (down or hung), a write of another of
    its projects (a member joining a project new to the pod) waits for the next refresh that
    reaches the master, as the writes of the projects that failed do: sent, it would wait out
    the master's bound and hold the write round, and the writes of the other masters' projects
    made meanwhile with it. Once the master answers, it is written."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = _StoreWithADeadMaster()  # type: ignore[assignment]
    store.master_of = lambda project_id: "m2" if project_id % 2 == 0 else "m1"  # type: ignore
    store.dead = {2, 4}  # m2's projects
    service.join("t1", 1, "alice", None)
    service.join("t2", 2, "hank", None)
    await cluster_round(service, refresh_due=True)
    store.written.clear()
    service.join("t4", 4, "hugo", None)  # new to the pod, on m2
    service.join("t3", 3, "bob", None)
    await cluster_round(service)
    assert [w.project_id for w in store.written] == [3]
    store.dead = set()
    store.written.clear()
    await cluster_round(service, refresh_due=True)
    assert sorted(w.project_id for w in store.written) == [2, 4]


class _StoreWithAHungMaster(_StoreWithADeadMaster):
    """As :class:`_StoreWithADeadMaster`, with the projects spread over two masters (odd: m1,
    even: m2); while ``hung`` a call that has any project of m2 waits until ``answer`` is set
    (the real store's bound, a third of the refresh interval, is left out: the call is simply
    outstanding). Counts the calls each master has outstanding."""

    def __init__(self) -> None:
        super().__init__()
        self.hung = True
        self.answer = asyncio.Event()
        self.outstanding = {"m1": 0, "m2": 0}
        self.most_outstanding = 0  # the most calls one master had outstanding at once
        self.calls = {"m1": 0, "m2": 0}

    def master_of(self, project_id: int) -> str | None:
        return "m2" if project_id % 2 == 0 else "m1"

    async def _call(self, projects, call):
        masters = {self.master_of(p) for p in projects}
        for m in masters:
            self.calls[m] += 1
            self.outstanding[m] += 1
        self.most_outstanding = max(self.most_outstanding, *self.outstanding.values())
        self.changed.set()
        try:
            if "m2" in masters and self.hung:
                await self.answer.wait()
            return await call()
        finally:
            for m in masters:
                self.outstanding[m] -= 1
            self.changed.set()

    async def write(self, writes, *, at=ANYWHERE):
        return await self._call(
            [w.project_id for w in writes], lambda: _StoreWithADeadMaster.write(self, writes, at=at)
        )

    async def refresh(self, plan, ttl_ms=None, *, at=ANYWHERE, counts=None):
        return await self._call(
            list(plan), lambda: _StoreWithADeadMaster.refresh(self, plan, ttl_ms, at=at)
        )


async def _until(store: _StoreWithADeadMaster, check: Callable[[], bool], within: float) -> None:
    """Until ``check`` holds, woken by the store's calls; bounded."""
    async with asyncio.timeout(within):
        while not check():
            store.changed.clear()
            await store.changed.wait()


async def test_a_hung_masters_refresh_does_not_hold_the_writes_of_the_other_masters():
    """On Redis Cluster each master has its own lane: while m2 hangs with the pod's refresh of
    its projects outstanding, a member joining a project of m1 is written at once (the refresh
    of m2 still outstanding, not cut off first), and the next refresh reaches m1 while m2 is
    still not sent a second call (one pipeline outstanding per master at most: no work piles
    up for it). Once m2 answers, its projects are refreshed again and written. Before, a round
    waited for every master's part of the refresh (up to its bound, a third of the refresh
    interval) before writing anything: a join on a healthy master was written up to 1 s late
    at each refresh while a master hung, and shown that late on every other pod."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = _StoreWithAHungMaster()  # type: ignore[assignment]
    service.join("t1", 1, "alice", None)
    service.join("t2", 2, "hank", None)
    await service.start()
    try:
        await _until(store, lambda: store.outstanding["m2"] == 1, within=5)
        service.join("t3", 3, "bob", None)
        await _until(store, lambda: any(w.project_id == 3 for w in store.written), within=5)
        assert store.outstanding["m2"] == 1, "the hung master's call was cut off first"
        m1_refreshes = sum(1 in plan for plan in store.refreshed)
        await _until(
            store, lambda: sum(1 in plan for plan in store.refreshed) > m1_refreshes, within=5
        )
        assert store.calls["m2"] == 1 and store.outstanding["m2"] == 1
        assert store.most_outstanding == 1
        store.hung = False
        store.answer.set()
        refreshes = len(store.refreshed)
        await _until(
            store,
            lambda: any(2 in plan for plan in store.refreshed[refreshes:]),
            within=5,
        )
        assert store.most_outstanding == 1
    finally:
        await service.stop()


def test_master_lanes_keep_one_call_per_master_and_owe_a_hung_one_a_single_refresh():
    """The lanes' rounds: a refresh due starts every free master's call; a busy master (hung)
    is started nothing more, whatever comes due meanwhile (one refresh owed, however many
    intervals it missed), and the free masters' writes are started at once."""
    lanes = MasterLanes()
    lanes.refresh_due(["m1", "m2"])
    assert lanes.start([]) == {"m1": True, "m2": True}
    lanes.finish("m1")  # m2 hangs
    assert lanes.start(["m1", "m2"]) == {"m1": False}  # m1's writes go; m2's stay pending
    lanes.finish("m1")
    for _ in range(3):  # three refresh intervals while m2 hangs
        lanes.refresh_due(["m1", "m2"])
        assert lanes.start([]) == {"m1": True}
        lanes.finish("m1")
    assert lanes.owed == {"m2"} and lanes.busy == {"m2"}
    lanes.finish("m2")  # its pipeline's bound ended
    assert lanes.start(["m2"]) == {"m2": True}  # one refresh, its writes after it
    assert lanes.start(["m2"]) == {}


async def test_a_large_pods_refresh_keeps_the_pipelines_that_answered_past_the_rounds_bound(
    monkeypatch,
):
    """A pod with thousands of projects on one master (Redis Cluster) refreshes them in
    pipelines of ``PIPELINE_CALLS``, each within a third of the refresh interval, and together
    longer than the interval: each pipeline that answered counts (its projects' replies are
    applied), also when a later one is cut off by its bound (its projects, and the ones not
    sent after it, wait for the next refresh). Before, the round's own bound (the refresh
    interval) cut the whole refresh off first: none of those projects was refreshed, round
    after round, and their records expired although every pipeline but the last answered."""
    monkeypatch.setattr("gateway.presence_store.node_name", lambda client, key: "m1")

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(
        Client(),
        lambda s, f: None,
        pod_id="a",
        listen=False,
        ttl=2.0,
        refresh_interval=0.6,  # each pipeline's bound: 0.2 s
        flush_interval=0.02,
        diff_interval=0.2,
    )
    store = service.store
    store._cluster = store.per_master = True
    answered, hang = asyncio.Event(), asyncio.Event()
    sent = 0

    async def pipeline(calls):
        nonlocal sent
        if calls[0][0] != REFRESH:
            return [[1, 0] for _ in calls]
        sent += 1
        if sent == 6:  # the first refresh's last pipeline: cut off by its bound
            answered.set()
            await hang.wait()
        await asyncio.sleep(0.15)  # within the bound; the five answered take 0.75 s
        return [[1, [], 0] for _ in calls]

    store._pipeline = pipeline  # type: ignore[method-assign]
    applied: list[int] = []
    refreshed = service.core.refreshed

    def record(project_id, ok, live):
        applied.append(project_id)
        return refreshed(project_id, ok, live)

    service.core.refreshed = record  # type: ignore[method-assign]
    projects = range(1, 6 * PIPELINE_CALLS + 1)
    for p in projects:
        service.join(f"t{p}", p, "alice", None)
    await service.start()
    try:
        async with asyncio.timeout(5):
            await answered.wait()

        async def first_refresh_applied() -> bool:
            return len(applied) >= 5 * PIPELINE_CALLS

        await eventually(first_refresh_applied, within=5)
        assert applied[: 5 * PIPELINE_CALLS] == list(projects[: 5 * PIPELINE_CALLS])
    finally:
        await service.stop()


class _ClusterOfRecords:
    """A PresenceStore's write and refresh against a cluster modelled by one pod's records per
    project (version and members, as :data:`WRITE` and :data:`REFRESH` keep them), each
    project's master settable (``masters``, a slot moving, a failover). A write to ``slow``
    is applied when it is sent and answered only once ``answer`` is set (its pipeline's other
    calls, or its reply, still on the way)."""

    per_master = True
    group_timeout = 0.1

    def __init__(self) -> None:
        self.masters: dict[int, str] = {}
        self.records: dict[int, tuple[int, dict[str, object]]] = {}
        self.slow: set[str] = set()
        self.answer = asyncio.Event()
        self.sent = asyncio.Event()

    def master_of(self, project_id: int) -> str | None:
        return self.masters.get(project_id)

    async def write(self, writes, *, at=ANYWHERE):
        slow = any(self.master_of(w.project_id) in self.slow for w in writes)
        out = []
        for w in writes:
            if at is not ANYWHERE and self.master_of(w.project_id) != at:
                out.append(MOVED)  # (not sent: as the real store, a lane sends to its master)
                continue
            version, members = self.records.get(w.project_id, (0, {}))
            if w.base and version != w.base:
                out.append(False)
                continue
            members = {} if not w.base else dict(members)
            for member_id, record in w.changes.items():
                if record is None:
                    members.pop(member_id, None)
                else:
                    members[member_id] = record
            self.records[w.project_id] = (w.version, members)
            out.append(True)
        self.sent.set()
        if slow:
            await self.answer.wait()
        return out

    async def refresh(self, plan, ttl_ms=None, *, at=ANYWHERE, counts=None):
        return {
            p: MOVED
            if at is not ANYWHERE and self.master_of(p) != at
            else (v is None or (v != 0 and self.records.get(p, (0, {}))[0] == v), {})
            for p, v in plan.items()
        }


async def test_a_leave_written_while_the_projects_write_is_outstanding_at_its_old_master_is_kept():
    """Redis Cluster: a project's slot moves to another master (a re-shard, a failover) while
    a write of it is outstanding in its old master's lane (applied there, its reply not back
    yet: the other calls of its pipeline). A member leaving meanwhile must be written once the
    first write is answered, not sent at once in the new master's lane, where it is refused
    (based on the version before the outstanding write) and, the outstanding write then
    answering applied, left out for good: the pod's next write carried no change, and its
    refreshes kept the member who left listed on every pod for as long as the pod lived."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = _ClusterOfRecords()  # type: ignore[assignment]
    store.masters[1] = "m1"

    async def settle() -> None:
        while service._lane_tasks:
            await asyncio.wait(set(service._lane_tasks))

    service.join("t1", 1, "alice", None)
    service._dispatch(refresh_due=True)
    await settle()
    assert store.records[1][1].keys() == {"alice"}
    store.slow.add("m1")
    store.sent.clear()
    service.join("t2", 1, "bob", None)
    service._dispatch(refresh_due=False)  # bob's join: outstanding at m1
    async with asyncio.timeout(5):
        await store.sent.wait()
    store.masters[1] = "m2"  # the project's slot moves
    service.leave("t1", 1)
    service._dispatch(refresh_due=False)
    await asyncio.sleep(0)
    store.answer.set()
    await settle()
    for _ in range(3):
        service._dispatch(refresh_due=True)
        await settle()
    assert store.records[1][1].keys() == {"bob"}, "alice left, and is listed for good"


async def test_drain_writes_what_a_lane_took_and_never_sent():
    """Redis Cluster: a drain that begins after a round took a master's writes for its lane
    and before the lane's task ran (it is cancelled before its first step) writes them: they
    are pending again. Before, they were in no lane and not pending: a member who left just
    then stayed listed through the drain's grace, one who joined was not listed."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = _ClusterOfRecords()  # type: ignore[assignment]
    store.masters[1] = "m1"
    service.join("t1", 1, "alice", None)
    service._dispatch(refresh_due=False)  # alice's write taken for m1's lane, not sent yet
    await service.drain()
    assert store.records[1][1].keys() == {"alice"}


class _ClusterWithAHungMaster(_ClusterOfRecords):
    """As :class:`_ClusterOfRecords`, where a call to a master in ``hung`` (the master the slot
    map names when the call is sent, as the real store groups its calls) applies nothing and
    ends once ``answer`` is set, each of its projects answered the TimeoutError the real store
    gives a master that did not answer within its bound. (A lane's call is one master's.)"""

    def __init__(self) -> None:
        super().__init__()
        self.hung: set[str] = set()

    async def _hangs(self, projects) -> redis.exceptions.TimeoutError | None:
        if not any(self.master_of(p) in self.hung for p in projects):
            return None
        self.sent.set()
        await self.answer.wait()
        return redis.exceptions.TimeoutError("no answer from the master within 0.1 s")

    async def write(self, writes, *, at=ANYWHERE):
        failure = await self._hangs([w.project_id for w in writes])
        if failure is not None:
            return [failure] * len(writes)
        return await super().write(writes, at=at)

    async def refresh(self, plan, ttl_ms=None, *, at=ANYWHERE, counts=None):
        failure = await self._hangs(plan)
        if failure is not None:
            return dict.fromkeys(plan, failure)
        return await super().refresh(plan, ttl_ms, at=at)


@pytest.mark.parametrize("outstanding", ["write", "refresh"])
async def test_a_call_that_timed_out_at_a_projects_old_master_does_not_hold_its_new_master(
    outstanding,
):
    """Redis Cluster: a project's slot moves from m1 to m2 (a re-shard, a failover) while a
    write or refresh of it is outstanding in m1's lane, and m1 does not answer within its
    bound. The failure is m1's, the master the call was sent to: m1's other projects' writes
    wait for the next refresh that reaches it, while m2's projects, and the project that moved,
    are written at once. Before, the failure was charged to the project's master when its
    outcome was applied, m2: the healthy master's writes, the moved project's with them,
    waited up to a refresh interval (3 s) for nothing, and m1's other projects were sent
    their writes, each to wait out m1's bound."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = _ClusterWithAHungMaster()  # type: ignore[assignment]
    store.masters.update({1: "m1", 2: "m2", 3: "m1"})

    async def settle() -> None:
        while service._lane_tasks:
            await asyncio.wait(set(service._lane_tasks))

    def members(project_id: int) -> set[str]:
        return set(store.records.get(project_id, (0, {}))[1])

    service.join("t1", 1, "alice", None)
    service.join("t2", 2, "hank", None)
    service.join("t3", 3, "carol", None)
    service._dispatch(refresh_due=True)
    await settle()
    store.hung.add("m1")
    store.sent.clear()
    if outstanding == "write":
        service.join("t4", 1, "bob", None)
        service._dispatch(refresh_due=False)  # bob's join: outstanding at m1
    else:
        service._dispatch(refresh_due=True)  # m1's refresh of projects 1 and 3: outstanding
    async with asyncio.timeout(5):
        await store.sent.wait()
    store.masters[1] = "m2"  # project 1's slot moves
    store.answer.set()  # m1's call ends: not answered within its bound
    await settle()
    service.join("t5", 2, "hugo", None)  # m2's other project
    service.join("t6", 1, "bea", None)  # the project that moved
    service.join("t7", 3, "dave", None)  # m1's other project
    service._dispatch(refresh_due=False)
    await settle()
    assert members(2) == {"hank", "hugo"}, "m2 was taken for failed"
    moved = {"alice", "bea"} | ({"bob"} if outstanding == "write" else set())
    assert members(1) == moved, "the moved project waited for a refresh of m1"
    assert members(3) == {"carol"}, "m1 failed: its projects' writes wait for its next refresh"
    store.hung.clear()  # m1 answers again
    service._dispatch(refresh_due=True)
    await settle()
    assert members(3) == {"carol", "dave"}


@pytest.mark.parametrize("moves", ["before_its_lane_sends", "between_two_pipelines_of_its_lane"])
async def test_a_lane_sends_only_to_its_own_master_when_a_slot_moves_meanwhile(moves, monkeypatch):
    """Redis Cluster: a project's slot moves from m1 to m2 (a re-shard, a failover reloading
    the slot map) after m1's lane took its call and before that call is sent: between the
    round that starts the lane and the lane's task sending it, or while the lane's earlier
    pipeline is outstanding (a call of more than ``PIPELINE_CALLS`` projects). m2 hangs
    meanwhile, with its own lane's call outstanding. The moved project's call is not sent
    to m2 by m1's lane (m2 would have two pipelines outstanding, and a hung master work piled
    up); it is sent in m2's lane once that one is free, its write applied there. Before, the
    store grouped the lane's calls again by the slot map when sending: the moved project's
    call went to m2 beside m2's own outstanding pipeline."""
    monkeypatch.setattr("gateway.presence_store.PIPELINE_CALLS", 2)

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store
    store._cluster = store.per_master = True
    store.group_timeout = 30.0  # (a hung master is released by the test, not cut off)
    masters = {1: "m1", 3: "m1", 5: "m1", 2: "m2"}
    project_of = {service.keys.presence_pods(p): p for p in masters}
    monkeypatch.setattr(
        "gateway.presence_store.node_name", lambda client, key: masters[project_of[key]]
    )
    hung: dict[str, asyncio.Event] = {}
    outstanding = {"m1": 0, "m2": 0}
    most = 0
    written: list[tuple[str, int, set[str]]] = []  # (master, project, members) answered
    changed = asyncio.Event()  # set when a pipeline is sent or answered

    async def pipeline(calls):
        """As redis-py's cluster pipeline: each call goes where the slot map says now."""
        nonlocal most
        sent = [(masters[project_of[keys[0]]], text, keys, args) for text, keys, args in calls]
        at = {m for m, *_ in sent}
        for m in at:
            outstanding[m] += 1
        most = max(most, *outstanding.values())
        changed.set()
        try:
            for m in at:
                if m in hung:
                    await hung[m].wait()
            for m, text, keys, args in sent:
                if text == WRITE:
                    written.append((m, project_of[keys[0]], set(args[8::2])))
            return [[1, 0] if text == WRITE else [1, [], 0] for text, _, _ in calls]
        finally:
            for m in at:
                outstanding[m] -= 1
            changed.set()

    store._pipeline = pipeline  # type: ignore[method-assign]

    async def until(check: Callable[[], bool]) -> None:
        """Until ``check`` holds, woken by a pipeline sent or answered, or a lane ending."""
        async with asyncio.timeout(5):
            while not check():
                changed.clear()
                service._wake.clear()  # (set when a lane ends)
                waits = {asyncio.ensure_future(e.wait()) for e in (changed, service._wake)}
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()

    async def settle() -> None:
        while service._lane_tasks:
            await asyncio.wait(set(service._lane_tasks))

    for p in masters:
        service.join(f"t{p}", p, "alice", None)
    service._dispatch(refresh_due=True)
    await settle()
    hung["m2"] = asyncio.Event()
    if moves == "before_its_lane_sends":
        service._dispatch(refresh_due=True)  # m2's refresh: outstanding, hung
        await until(lambda: outstanding["m2"] == 1 and "m1" not in service._lanes.busy)
        service.join("t7", 5, "bob", None)
        service._dispatch(refresh_due=False)  # bob's join taken for m1's lane, not sent yet
        masters[5] = "m2"
    else:
        hung["m1"] = asyncio.Event()
        service.join("t7", 5, "bob", None)
        service._dispatch(refresh_due=True)  # m1: refresh of 1, 3 | of 5, then writes
        await until(lambda: outstanding["m1"] == 1 and outstanding["m2"] == 1)
        masters[5] = "m2"  # while m1's first pipeline is outstanding
        hung.pop("m1").set()
    await until(lambda: "m1" not in service._lanes.busy or most > 1)
    assert most == 1, "m1's lane sent a pipeline to m2 beside m2's own"
    hung.pop("m2").set()
    await settle()
    for _ in range(2):
        service._dispatch(refresh_due=False)
        await settle()
    assert most == 1
    assert any(m == "m2" and p == 5 and "bob" in members for m, p, members in written)
    assert not service.core.has_pending_writes()


@pytest.mark.parametrize(
    "moves", ["a_call_not_sent_beside_a_failed_one", "after_its_pipeline_failed"]
)
async def test_a_lane_call_whose_slot_moved_is_moved_even_when_its_master_failed(
    moves, monkeypatch
):
    """Redis Cluster: m1's lane refreshes projects 1 and 3; project 3's slot moves to m2 before
    its call is sent, and m1 fails. Project 3's call was never sent to m1: its outcome is
    MOVED (its refresh owed to m2, :meth:`PresenceService._apply_refresh`), not m1's failure,
    whether its call was to go out beside the failed one or in a pipeline after it. Before,
    the store raised m1's failure for the whole call when every pipeline it sent failed
    (the lane then gave every call, the moved one too, that failure), and gave the calls of
    the pipelines after a failed one its failure without looking at the map: the moved
    project's refresh was owed to nobody, and skipped until the next refresh interval."""
    if moves == "after_its_pipeline_failed":
        monkeypatch.setattr("gateway.presence_store.PIPELINE_CALLS", 1)

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store
    store._cluster = store.per_master = True
    masters = {1: "m1", 3: "m1"}
    if moves == "a_call_not_sent_beside_a_failed_one":
        masters[3] = "m2"
    project_of = {service.keys.presence_pods(p): p for p in masters}
    monkeypatch.setattr(
        "gateway.presence_store.node_name", lambda client, key: masters[project_of[key]]
    )
    sent: list[int] = []

    async def pipeline(calls):
        sent.extend(project_of[keys[0]] for _, keys, _ in calls)
        masters[3] = "m2"  # (a failover reloads the map while m1's call is cut off)
        raise redis.exceptions.ConnectionError("m1 is gone")

    store._pipeline = pipeline  # type: ignore[method-assign]
    replies = await store.refresh({1: None, 3: None}, at="m1")
    assert sent == [1]
    assert isinstance(replies[1], redis.exceptions.ConnectionError)
    assert replies[3] is MOVED


async def test_a_refresh_that_timed_out_at_a_projects_old_master_is_sent_at_once_to_its_new_one():
    """Redis Cluster: a project's slot moves from m1 to m2 (a failover reloading the map) while
    m1's refresh of it is outstanding, and m1 does not answer within its bound. The project's
    records were not refreshed: its new master is owed the refresh now, as for a call not sent
    (:data:`MOVED`), and as a write that failed at the old master is written at once at the
    new one. Before, nothing was owed: the project was refreshed at the next refresh interval
    only, its records (already aging while m1 hung) a refresh interval (3 s) nearer to expiry,
    and its members to vanishing on every pod."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    class Store(_ClusterWithAHungMaster):
        def __init__(self) -> None:
            super().__init__()
            self.refreshed: list[tuple[str, int]] = []  # (master, project) answered

        async def refresh(self, plan, ttl_ms=None, *, at=ANYWHERE, counts=None):
            replies = await super().refresh(plan, ttl_ms, at=at)
            self.refreshed += [(at, p) for p, r in replies.items() if isinstance(r, tuple)]
            return replies

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = Store()  # type: ignore[assignment]
    store.masters.update({1: "m1"})

    async def settle() -> None:
        while service._lane_tasks:
            await asyncio.wait(set(service._lane_tasks))

    service.join("t1", 1, "alice", None)
    service._dispatch(refresh_due=True)
    await settle()
    store.hung.add("m1")
    store.sent.clear()
    service._dispatch(refresh_due=True)  # m1's refresh of project 1: outstanding
    async with asyncio.timeout(5):
        await store.sent.wait()
    store.refreshed.clear()
    store.masters[1] = "m2"  # project 1's slot moves
    store.answer.set()  # m1's call ends: not answered within its bound
    await settle()
    service._dispatch(refresh_due=False)  # the next round, before the next refresh interval
    await settle()
    assert store.refreshed == [("m2", 1)], "the moved project waited for the next interval"
    assert store.records[1][1].keys() == {"alice"}


async def test_a_reread_that_failed_at_a_projects_old_master_is_made_at_once_at_its_new_one():
    """Redis Cluster: a project's slot moves from m1 to m2 (a failover reloading the map) while
    a re-read of its view is outstanding at m1, and m1 fails. The failure is m1's: the view is
    read again at the next round, at m2, as a write or refresh of a project that moved is made
    at once at its new master. Before, the re-read waited for the next refresh to reach a
    master, up to a refresh interval (3 s), the view shown as it was meanwhile."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = _ClusterOfRecords()  # type: ignore[assignment]
    store.masters[1] = "m1"
    reads: list[str] = []  # the master of each read

    async def read(project_id: int) -> dict:
        reads.append(store.masters[project_id])
        if store.masters[project_id] == "m1":
            store.masters[project_id] = "m2"  # (the map reloaded while m1's read fails)
            raise redis.exceptions.ConnectionError("m1 is gone")
        return {}

    store.read = read  # type: ignore[attr-defined]
    service.core.view(1)
    service.reread_all()
    await service._reload_batch()  # m1 fails
    await service._reload_batch()  # the next round, before any refresh
    assert reads == ["m1", "m2"], "the re-read waited for the next refresh"
    assert service.core.views[1].loaded


class _ClusterCallsLogged(_ClusterWithAHungMaster):
    """As :class:`_ClusterWithAHungMaster`, each call noted: (kind, ``at``, projects, ttl)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, object, tuple[int, ...], int | None]] = []

    async def write(self, writes, *, at=ANYWHERE):
        self.calls.append(("write", at, tuple(w.project_id for w in writes), None))
        return await super().write(writes, at=at)

    async def refresh(self, plan, ttl_ms=None, *, at=ANYWHERE, counts=None):
        self.calls.append(("refresh", at, tuple(plan), ttl_ms))
        return await super().refresh(plan, ttl_ms, at=at)


async def _mark_m1_failed(service: PresenceService, store: _ClusterWithAHungMaster) -> None:
    """m1 does not answer a refresh within its bound: marked failed, then answers again."""

    async def settle() -> None:
        while service._lane_tasks:
            await asyncio.wait(set(service._lane_tasks))

    service._dispatch(refresh_due=True)
    await settle()
    store.hung.add("m1")
    store.sent.clear()
    service._dispatch(refresh_due=True)
    async with asyncio.timeout(5):
        await store.sent.wait()
    store.answer.set()
    await settle()
    store.hung.clear()  # it has recovered; no refresh has reached it yet
    store.answer.clear()


async def test_a_drain_writes_the_leave_and_keeps_the_members_of_a_master_still_marked_failed():
    """Redis Cluster: a master failed a refresh (marked failed: its projects' writes wait for
    the next refresh that reaches it) and has recovered since, unknown to the pod. A last
    member of one of its projects leaves, and the pod drains before that refresh. The drain
    sends the leave there (the master may have recovered; a call to one still down is cut off
    by its bound): the member is gone at once, not listed by every pod until the pod's records
    expire. And the members still connected there are kept for ``drain_grace``, as on the
    other masters. Before, the drain skipped every write of a master marked failed and did not
    refresh its projects: the member who left was listed for up to the ttl and three refresh
    reports more, and those still connected expired at the ttl, not the grace."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = _ClusterCallsLogged()  # type: ignore[assignment]
    store.masters.update({1: "m1", 2: "m1", 3: "m2"})
    service.join("t1", 1, "alice", None)
    service.join("t2", 2, "hank", None)
    service.join("t3", 3, "carol", None)
    await _mark_m1_failed(service, store)
    service.leave("t1", 1)  # alice, the last member of project 1, leaves
    service._dispatch(refresh_due=False)  # put off: m1 is marked failed
    assert store.records[1][1].keys() == {"alice"}
    store.calls.clear()
    await service.drain()
    assert store.records[1][1].keys() == set(), "the leave was not written at the drain"
    grace = round(service.drain_grace * 1000)
    kept = {
        p
        for kind, _, projects, ttl in store.calls
        if kind == "refresh" and ttl == grace
        for p in projects
    }
    assert kept == {2, 3}, "a member still connected on m1 expires at the ttl, not the grace"


async def test_a_lane_whose_refresh_was_all_moved_leaves_its_master_marked_failed():
    """Redis Cluster: m1 failed a refresh (marked failed) and still hangs; at its next refresh
    every one of its projects has moved to m2 before its lane sends (a re-shard): nothing was
    sent to m1, nothing answered there. m1 stays marked failed: a project of m1 new to the pod
    waits for a refresh that reaches m1, rather than being sent a write that waits out its
    bound. Before, the lane cleared m1's mark as if m1 had answered."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = _ClusterCallsLogged()  # type: ignore[assignment]
    store.masters.update({1: "m1", 3: "m1"})
    service.join("t1", 1, "alice", None)
    service.join("t3", 3, "carol", None)
    await _mark_m1_failed(service, store)
    store.hung.add("m1")  # down again (or still): a call sent there is cut off by its bound
    store.answer.set()

    async def settle() -> None:
        while service._lane_tasks:
            await asyncio.wait(set(service._lane_tasks))

    service._dispatch(refresh_due=True)  # m1's lane takes the refresh of 1 and 3 ...
    store.masters.update({1: "m2", 3: "m2"})  # ... and both move before it is sent
    await settle()
    store.calls.clear()
    store.masters[5] = "m1"
    service.join("t5", 5, "bob", None)  # a project of m1, new to the pod
    service._dispatch(refresh_due=False)
    await settle()
    assert not any(at == "m1" for _, at, _, _ in store.calls), "m1 was taken for answered"


async def test_a_drain_sends_each_masters_writes_to_that_master_when_a_slot_moves(monkeypatch):
    """Redis Cluster: a drain writes each master's pending writes as a lane does, sent to that
    master only: a project whose slot moves to m2 while m1's earlier pipeline is outstanding
    is not sent to m2 by m1's part (m2, hung, would have a second pipeline outstanding, and
    its failure would be charged to m1) but sent to m2 after, and written there. Before, the
    drain's write sent each call where the slot map said then."""
    monkeypatch.setattr("gateway.presence_store.PIPELINE_CALLS", 2)

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store
    store._cluster = store.per_master = True
    store.group_timeout = 30.0  # (a hung master is released by the test, not cut off)
    masters = {1: "m1", 3: "m1", 5: "m1", 2: "m2"}
    project_of = {service.keys.presence_pods(p): p for p in masters}
    monkeypatch.setattr(
        "gateway.presence_store.node_name", lambda client, key: masters[project_of[key]]
    )
    hung = {"m1": asyncio.Event(), "m2": asyncio.Event()}
    outstanding = {"m1": 0, "m2": 0}
    most = 0
    written: list[tuple[str, int]] = []
    changed = asyncio.Event()

    async def pipeline(calls):
        """As redis-py's cluster pipeline: each call goes where the slot map says now."""
        nonlocal most
        sent = [(masters[project_of[keys[0]]], text, keys) for text, keys, _ in calls]
        at = {m for m, *_ in sent}
        for m in at:
            outstanding[m] += 1
        most = max(most, *outstanding.values())
        changed.set()
        try:
            for m in at:
                if m in hung:
                    await hung[m].wait()
            written.extend((m, project_of[keys[0]]) for m, text, keys in sent if text == WRITE)
            return [[1, 0] if text == WRITE else [1, [], 0] for text, _, _ in calls]
        finally:
            for m in at:
                outstanding[m] -= 1
            changed.set()

    store._pipeline = pipeline  # type: ignore[method-assign]
    for p in masters:
        service.join(f"t{p}", p, "alice", None)
    drain = asyncio.create_task(service.drain())
    async with asyncio.timeout(5):
        while not (outstanding["m1"] == 1 and outstanding["m2"] == 1):
            changed.clear()
            await changed.wait()
        masters[5] = "m2"  # while m1's first pipeline is outstanding
        hung.pop("m1").set()
        while outstanding["m1"]:  # (m1's part sends its next pipeline as this one ends)
            changed.clear()
            await changed.wait()
        assert most == 1, "the drain sent m1's call to m2 beside m2's own pipeline"
        hung.pop("m2").set()
        await drain
    assert ("m2", 5) in written


async def test_a_write_held_for_a_busy_master_wakes_the_loop_when_its_lane_ends_not_each_round():
    """Redis Cluster: a write of a project whose master's lane is busy (its call outstanding,
    hung) is held until that lane ends. The pod's loop does not go round every
    ``flush_interval`` meanwhile to look at it again (each round taking the pending writes
    apart), but sleeps until something it can send comes: a refresh due, a new change, a lane
    ending; once the hung master's call ends, the held write is sent at once. Before, the loop
    went round every ``flush_interval`` for as long as the master hung."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = _StoreWithAHungMaster()  # type: ignore[assignment]
    rounds = 0
    dispatch = service._dispatch

    def counted(refresh_due: bool) -> None:
        nonlocal rounds
        rounds += 1
        dispatch(refresh_due)

    service._dispatch = counted  # type: ignore[method-assign]
    service.join("t1", 1, "alice", None)
    service.join("t2", 2, "hank", None)
    await service.start()
    try:
        await _until(store, lambda: store.outstanding["m2"] == 1, within=5)
        service.join("t4", 2, "bob", None)  # held: m2's lane is busy
        m1_refreshes = sum(1 in plan for plan in store.refreshed)
        rounds = 0
        await _until(
            store, lambda: sum(1 in plan for plan in store.refreshed) >= m1_refreshes + 2, within=5
        )
        # Two refresh intervals: a round for each refresh due and each lane ending, the join's.
        assert rounds <= 6, f"{rounds} rounds in two refresh intervals: the loop polls"
        store.hung = False
        store.answer.set()
        await _until(store, lambda: any(w.project_id == 2 for w in store.written), within=5)
    finally:
        await service.stop()


class _ClusterAtMasters(_ClusterOfRecords):
    """As :class:`_ClusterOfRecords`, each call made for one master (``at``) as the real store
    makes it: a call whose project the map names another master for is not sent (MOVED), and
    a call sent to a master in ``hung`` applies nothing and ends once ``answer`` is set, each
    of its projects answered the TimeoutError of the store's bound. Each call is noted
    (kind, ``at``, projects, ttl) and sets ``called``; ``on_hang(at)`` runs as one begins to
    hang."""

    def __init__(self) -> None:
        super().__init__()
        self.hung: set[str] = set()
        self.calls: list[tuple[str, object, tuple[int, ...], int | None]] = []
        self.called = asyncio.Event()
        self.on_hang: Callable[[object], None] = lambda at: None

    async def _hangs(self, at, projects) -> redis.exceptions.TimeoutError | None:
        if at not in self.hung or not any(self.master_of(p) == at for p in projects):
            return None
        self.on_hang(at)
        await self.answer.wait()
        return redis.exceptions.TimeoutError("no answer from the master within its bound")

    def _note(self, kind, at, projects, ttl) -> None:
        self.calls.append((kind, at, tuple(projects), ttl))
        self.called.set()

    async def write(self, writes, *, at=ANYWHERE):
        self._note("write", at, [w.project_id for w in writes], None)
        sent = [self.master_of(w.project_id) == at for w in writes]  # (the map when sent)
        failure = await self._hangs(at, [w.project_id for w in writes])
        if failure is not None:
            return [failure if s else MOVED for s in sent]
        return await super().write(writes, at=at)

    async def refresh(self, plan, ttl_ms=None, *, at=ANYWHERE, counts=None):
        self._note("refresh", at, plan, ttl_ms)
        sent = {p: self.master_of(p) == at for p in plan}  # (the map when sent)
        failure = await self._hangs(at, plan)
        if failure is not None:
            return {p: failure if sent[p] else MOVED for p in plan}
        return await super().refresh(plan, ttl_ms, at=at)


async def test_a_drain_keeps_the_other_masters_members_for_the_grace_while_one_master_hangs():
    """Redis Cluster: a pod drains while m1 hangs with a write of its projects to send (a
    member left there). The drain's refresh of m2's projects (their deadline set to the grace)
    is sent at once, not after m1's write is cut off by its bound: a hung master must not hold
    the other masters' calls. Before, the drain sent every master's writes, waited for all of
    them, and only then refreshed: m2's grace waited out m1's bound (a third of the refresh
    interval), and the gateway bounds the whole presence drain by 2 s (``CLOSE_STEP_TIMEOUT``),
    so with a refresh interval of 6 s or more the grace refresh was never sent: m2's members
    expired at the ttl, not the grace."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = _ClusterAtMasters()  # type: ignore[assignment]
    store.masters.update({1: "m1", 2: "m1", 3: "m2"})
    service.join("t1", 1, "alice", None)
    service.join("t2", 2, "hank", None)
    service.join("t3", 3, "carol", None)
    service._dispatch(refresh_due=True)
    while service._lane_tasks:
        await asyncio.wait(set(service._lane_tasks))
    store.hung.add("m1")
    service.leave("t1", 1)  # a write of m1 to send at the drain
    grace = round(service.drain_grace * 1000)
    drain = asyncio.create_task(service.drain())
    try:
        async with asyncio.timeout(5):
            while not any(
                kind == "refresh" and at == "m2" and ttl == grace
                for kind, at, _, ttl in store.calls
            ):
                store.called.clear()
                await store.called.wait()
        assert ("write", "m1", (1,), None) in store.calls  # and m1's write is outstanding
    finally:
        store.answer.set()
        async with asyncio.timeout(5):
            await drain
    assert store.records[3][1].keys() == {"carol"}


@pytest.mark.parametrize("call", ["write", "refresh"])
async def test_a_drain_never_sends_more_to_a_master_that_failed_during_it(call):
    """Redis Cluster: at a drain m1 hangs (its call cut off by its bound), and while it hangs
    a project of m2 moves to m1 (the slot map reloaded, from a node that had not yet seen a
    failover) before m2's call of it is sent: MOVED, sent again in the next round to the
    master the map names then. m1 failed during this drain: the call is not sent there to wait
    out its bound a second time (the project waits, as its other projects do). Before, the
    next round sent it to m1: the drain waited for the hung master twice (three times with a
    third round), within a drain the gateway gives 2 s."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = _ClusterAtMasters()  # type: ignore[assignment]
    store.masters.update({1: "m1", 2: "m2"})
    service.join("t1", 1, "alice", None)
    service.join("t2", 2, "hank", None)
    service._dispatch(refresh_due=True)
    while service._lane_tasks:
        await asyncio.wait(set(service._lane_tasks))
    if call == "write":
        service.join("t3", 1, "bob", None)  # each master has a write to send at the drain
        service.join("t4", 2, "carol", None)
    store.hung.add("m1")
    store.on_hang = lambda at: store.masters.update({2: "m1"})
    store.calls.clear()
    drain = asyncio.create_task(service.drain())
    try:
        async with asyncio.timeout(5):
            while not any(at == "m1" for _, at, _, _ in store.calls):
                store.called.clear()
                await store.called.wait()
    finally:
        store.answer.set()  # m1's call is cut off by its bound
        async with asyncio.timeout(5):
            await drain
    sent_to_m1 = [(kind, projects) for kind, at, projects, _ in store.calls if at == "m1"]
    assert sent_to_m1 == [(call, (1,))], "the drain sent more to a master that failed in it"
    assert (call, "m2", (2,)) in [(kind, at, projects) for kind, at, projects, _ in store.calls]


async def _written_pod(per_master: bool) -> tuple[PresenceService, _ClusterAtMasters]:
    """A pod whose members are written: alice and bob in project 1 (at m1), carol in 2 (m2),
    on Redis Cluster (``per_master``, a lane round) or standalone Redis (a flush)."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = _ClusterAtMasters()  # type: ignore[assignment]
    store.per_master = per_master
    store.masters.update({1: "m1", 2: "m2"})
    service.join("t1", 1, "alice", None)
    service.join("t2", 1, "bob", None)
    service.join("t3", 2, "carol", None)
    await (cluster_round(service) if per_master else service._flush())  # a round's writes
    return service, store


@pytest.mark.parametrize("per_master", [True, False], ids=["cluster", "standalone"])
async def test_a_drain_rewrites_the_members_of_a_project_whose_records_redis_lost(per_master):
    """Redis lost the pod's records of a project (a flush, a failover that lost the last
    writes) and a member leaves there just before the pod drains: the drain's write of the
    change is refused (its base is gone). The drain writes the pod's members there whole and
    keeps them for the grace, as the next round would have: its clients reconnect elsewhere
    without being shown leaving. Before, the refused write was left pending, and nothing came
    after the drain to send it: the members still connected there were not listed by any pod
    until they reconnected elsewhere (shown leaving and joining again)."""

    service, store = await _written_pod(per_master)
    assert store.records[1][1].keys() == {"alice", "bob"}
    del store.records[1]  # Redis lost them
    service.leave("t1", 1)
    store.calls.clear()
    await service.drain()
    assert store.records.get(1, (0, {}))[1].keys() == {"bob"}, "bob is not listed"
    grace = round(service.drain_grace * 1000)
    kept = {p for kind, _, ps, ttl in store.calls if kind == "refresh" and ttl == grace for p in ps}
    assert kept == {1, 2}


@pytest.mark.parametrize("per_master", [True, False], ids=["cluster", "standalone"])
async def test_a_drain_whose_refresh_finds_the_records_lost_writes_them_and_keeps_them(per_master):
    """Redis lost the pod's records of a project (a flush, a failover that lost the last
    writes) after the pod's last refresh, and nothing changed there since: only the drain's
    refresh finds them gone. The drain writes the pod's members there whole and keeps them for
    the grace, as the next round would have. Before, the refresh's answer was not looked at:
    the members still connected there were listed by no pod until they reconnected elsewhere
    (shown leaving and joining again), although the pod could still have written them."""

    service, store = await _written_pod(per_master)
    del store.records[1]  # Redis lost them; no change is pending
    store.calls.clear()
    await service.drain()
    assert store.records.get(1, (0, {}))[1].keys() == {"alice", "bob"}, "not written again"
    grace = round(service.drain_grace * 1000)
    last_call_of_1 = [(kind, ttl) for kind, _, ps, ttl in store.calls if 1 in ps][-1]
    assert last_call_of_1 == ("refresh", grace), store.calls  # kept for the grace, after it
    assert store.records[2][1].keys() == {"carol"}


async def test_a_drain_sends_no_rewrite_to_a_master_that_failed_in_the_refresh_finding_it_lost():
    """Redis Cluster: at a drain m1 answers the first pipeline of its refresh, which finds the
    pod's records of a project lost there (a failover that lost the last writes), and then
    hangs: the next pipeline is cut off by the store's bound, m1 marked failed. The project
    lost there is not written again at m1: the drain waits for a master that failed in it
    once, not twice (the gateway gives the whole drain 2 s), as for any call of the drain.
    Before, the second pass sent m1 the project's whole write, which waited out the bound
    again."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    class HangsAfterItsFirstPipeline(_ClusterAtMasters):
        async def refresh(self, plan, ttl_ms=None, *, at=ANYWHERE, counts=None):
            replies = await super().refresh(plan, ttl_ms, at=at)
            if at == "m1" and ttl_ms == grace:  # the drain's: project 2 in a later pipeline
                self.hung.add("m1")
                replies[2] = redis.exceptions.TimeoutError("no answer within the bound")
            return replies

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    grace = round(service.drain_grace * 1000)
    store = service.store = HangsAfterItsFirstPipeline()  # type: ignore[assignment]
    store.masters.update({1: "m1", 2: "m1", 3: "m2"})
    service.join("t1", 1, "alice", None)
    service.join("t2", 2, "hank", None)
    service.join("t3", 3, "carol", None)
    await cluster_round(service)  # a round's writes
    del store.records[1]  # Redis lost them; no change is pending
    store.calls.clear()
    store.answer.set()  # (a call to a hung master ends at once: counted, not waited for)
    async with asyncio.timeout(5):
        await service.drain()
    sent_to_m1 = [(kind, projects) for kind, at, projects, _ in store.calls if at == "m1"]
    assert sent_to_m1 == [("refresh", (1, 2))], "the drain sent more to a master that failed"
    assert ("refresh", "m2", (3,), grace) in store.calls


@pytest.mark.parametrize("call", ["write", "refresh"])
async def test_a_drain_sends_a_call_cut_off_at_a_projects_old_master_to_its_new_one(call):
    """Redis Cluster: at a drain m1 hangs, and while the drain's call there is outstanding
    m1 is failed over (the slot map reloaded after the call was cut off by its bound names
    m3 for its project). The project's write (whole) and its refresh to the grace go to m3 in
    the drain's next round, as a lane sends a call that failed at a project's old master to
    its new one at once: the member who left is gone, the others kept for the grace. Before,
    the drain left them (the write pending for a round that never comes): the member who left
    was listed until the records expired, and the others expired at the ttl."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = _ClusterAtMasters()  # type: ignore[assignment]
    store.masters.update({1: "m1", 3: "m1"})
    service.join("t1", 1, "alice", None)
    service.join("t2", 1, "bob", None)
    service.join("t3", 3, "carol", None)  # (refreshed only, at the drain)
    service._dispatch(refresh_due=True)
    while service._lane_tasks:
        await asyncio.wait(set(service._lane_tasks))
    if call == "write":
        service.leave("t1", 1)
    store.hung.add("m1")
    store.on_hang = lambda at: store.masters.update({1: "m3", 3: "m3"})
    store.answer.set()  # (cut off at once)
    store.calls.clear()
    await service.drain()
    grace = round(service.drain_grace * 1000)
    kept = {
        p
        for kind, at, ps, ttl in store.calls
        if (kind, at, ttl) == ("refresh", "m3", grace)
        for p in ps
    }
    assert kept == {1, 3}, "not kept for the grace at m3"
    if call == "write":
        assert store.records[1][1].keys() == {"bob"}, "the leave was not written at m3"


async def test_a_drain_cut_off_by_the_gateways_bound_leaves_what_it_did_not_send_pending():
    """Redis Cluster: the gateway bounds the presence drain (2 s); a drain cut off while m1's
    write hangs ends at once (the healthy master's grace already set), m1's write pending
    again (not lost half-taken), and a stop() after it, as the gateway's close makes, ends."""

    class Client:
        def register_script(self, script: str) -> None:
            return None

    service = PresenceService(Client(), lambda s, f: None, pod_id="a", listen=False, **TIMINGS)
    store = service.store = _ClusterAtMasters()  # type: ignore[assignment]
    store.masters.update({1: "m1", 2: "m2"})
    service.join("t1", 1, "alice", None)
    service.join("t2", 2, "hank", None)
    service._dispatch(refresh_due=True)
    while service._lane_tasks:
        await asyncio.wait(set(service._lane_tasks))
    store.hung.add("m1")
    service.leave("t1", 1)
    grace = round(service.drain_grace * 1000)
    drain = asyncio.create_task(service.drain())
    async with asyncio.timeout(5):
        while not (
            ("write", "m1", (1,), None) in store.calls
            and ("refresh", "m2", (2,), grace) in store.calls
        ):
            store.called.clear()
            await store.called.wait()
    drain.cancel()  # (the gateway's bound)
    with pytest.raises(asyncio.CancelledError):
        await drain
    assert list(service.core.pending_projects()) == [1]
    async with asyncio.timeout(5):
        await service.stop()
