"""Presence through real gateways: what a person on a dashboard sees of the others.

Each browser here is a :class:`RecordingClient`; its view of a project is rebuilt from the
``presence`` and ``presence_diff`` frames it received, exactly as eventbus.js applies them, and
compared with who is really connected. Gateways run in-process (three of them on one Redis,
members spread over them) with short presence intervals; the pod-kill test runs real gateway
processes and SIGKILLs one.
"""

from __future__ import annotations

import asyncio
import json
import time

import redis.asyncio

from publisher import issue_token
from publisher.presence import aread_presence
from tests.support.gateway_client import SECRET, RecordingClient, ws_url
from tests.support.gateway_process import GatewayProcess
from tests.support.sse_client import open_stream

#: Fast presence for tests: diffs every 0.2 s, refresh every 0.5 s, records live 2 s.
FAST = {
    "presence_diff_interval": 0.2,
    "presence_refresh_interval": 0.5,
    "presence_ttl": 2.0,
    "presence_drain_grace": 1.0,
}


def token(projects="*", sub: str | None = None, name: str | None = None) -> str:
    return issue_token(SECRET, projects, ttl=300, subject=sub, name=name)


async def person(gateway, sub: str | None, name: str | None = None, projects="*"):
    client = RecordingClient(ws_url(gateway), token=token(projects, sub, name))
    return await client.connect()


def view(client: RecordingClient, project_id: int) -> dict[str, dict] | None:
    """The members as the client knows them: its last ``presence`` plus every later diff."""
    members: dict[str, dict] | None = None
    for message in client.messages:
        if message.get("project_id") != project_id:
            continue
        if message["type"] == "presence":
            members = {m["id"]: m for m in message["members"]}
        elif message["type"] == "presence_diff":
            assert members is not None, "a presence_diff before any presence"
            for member_id in message["left"]:
                del members[member_id]
            for member in (*message["joined"], *message["changed"]):
                members[member["id"]] = member
    return members


def ids(client: RecordingClient, project_id: int = 1) -> set[str] | None:
    members = view(client, project_id)
    return None if members is None else set(members)


async def until(client: RecordingClient, predicate, within: float = 5.0) -> None:
    await client.wait_for(predicate, within)


async def test_members_spread_over_three_gateways_see_each_other_and_their_activity(gateways):
    pods = [await gateways(**FAST) for _ in range(3)]
    alice = await person(pods[0], "alice", "Alice")
    alice_tab2 = await person(pods[2], "alice", "Alice")
    bob = await person(pods[1], "bob", "Bob")
    carol = await person(pods[2], "carol", None)
    everyone = [alice, alice_tab2, bob, carol]
    for client in everyone:
        await client.subscribe(1, presence=True)
    for client in everyone:
        await until(client, lambda c=client: ids(c) == {"alice", "bob", "carol"})
    members = view(bob, 1)
    assert members["alice"]["name"] == "Alice" and members["carol"]["name"] is None
    assert members["alice"]["viewing"] is None

    # One person's activity reaches every pod; the tab that reported last wins.
    await alice.send({"type": "activity", "project_id": 1, "viewing": 12, "answering": 12})
    for client in everyone:
        await until(client, lambda c=client: view(c, 1)["alice"]["answering"] == 12)
    await alice_tab2.send({"type": "activity", "project_id": 1, "viewing": 7})
    for client in everyone:
        await until(
            client,
            lambda c=client: (
                (view(c, 1)["alice"]["viewing"], view(c, 1)["alice"]["answering"]) == (7, None)
            ),
        )

    # Every view is the same.
    assert all(view(c, 1) == view(alice, 1) for c in everyone)


async def test_a_closed_tab_leaves_but_the_person_stays_while_another_tab_is_open(gateways):
    # A presence TTL of 8 s: a leave that waited for the entry to expire comes after 7.5 s at
    # the earliest, far from the bound below, which leaves a loaded machine room.
    pods = [await gateways(**{**FAST, "presence_ttl": 8.0}) for _ in range(2)]
    watcher = await person(pods[0], "watcher")
    await watcher.subscribe(1, presence=True)
    tab1 = await person(pods[0], "dave", "Dave")
    tab2 = await person(pods[1], "dave", "Dave")
    await tab1.subscribe(1)
    await tab2.subscribe(1)
    await until(watcher, lambda: ids(watcher) == {"watcher", "dave"})
    await tab1.close()
    await tab2.send({"type": "ping"})
    await tab2.wait_for(lambda: tab2.last("pong") is not None)
    # Dave is still here on the other pod: no leave is ever shown.
    left_before = [m for m in watcher.messages if m["type"] == "presence_diff" and m["left"]]
    await tab2.close()
    started = time.monotonic()
    await until(watcher, lambda: ids(watcher) == {"watcher"}, within=10.0)
    # A closed tab leaves within ~1 s (write + diff), not when its entry expires (>= 7.5 s).
    assert time.monotonic() - started < 4
    assert left_before == []


async def test_a_refreshed_token_that_drops_the_project_leaves_it(gateways):
    gateway = await gateways(**FAST)
    watcher = await person(gateway, "watcher")
    await watcher.subscribe(1, presence=True)
    erin = await person(gateway, "erin", "Erin", projects=[1, 2])
    await erin.subscribe(1, presence=True)
    await until(watcher, lambda: ids(watcher) == {"watcher", "erin"})
    await erin.send({"type": "auth", "token": token([2], "erin", "Erin")})
    await erin.wait_for(lambda: erin.last("unsubscribed") is not None)
    assert erin.last("error")["code"] == "forbidden"
    await until(watcher, lambda: ids(watcher) == {"watcher"})
    # Erin gets no more presence of project 1, and may not ask for it.
    seen = len([m for m in erin.messages if m.get("type", "").startswith("presence")])
    await watcher.send({"type": "activity", "project_id": 1, "viewing": 3})
    await until(watcher, lambda: view(watcher, 1)["watcher"]["viewing"] == 3)
    await erin.send({"type": "presence_get", "project_id": 1})
    await erin.wait_for(lambda: erin.count("error") == 2)
    assert erin.of("error")[-1]["code"] == "forbidden"
    assert len([m for m in erin.messages if m.get("type", "").startswith("presence")]) == seen


async def test_a_refreshed_token_naming_another_person_moves_the_tab_with_its_activity(gateways):
    """A token refresh naming another ``sub`` (someone else signed in in the same tab) lists
    the tab under the new person on every pod, with the activity the tab reported: activity
    lives as long as the connection, and eventbus.js sends it again only when it changes."""
    pods = [await gateways(**FAST) for _ in range(2)]
    watcher = await person(pods[0], "watcher")
    await watcher.subscribe(1, presence=True)
    tab = await person(pods[1], "erin", "Erin")
    await tab.subscribe(1, presence=True)
    await tab.send({"type": "activity", "project_id": 1, "viewing": 5, "answering": 6})
    await until(watcher, lambda: (view(watcher, 1) or {}).get("erin", {}).get("answering") == 6)
    await tab.send({"type": "auth", "token": token("*", "frank", "Frank")})
    await until(watcher, lambda: ids(watcher) == {"watcher", "frank"})
    frank = view(watcher, 1)["frank"]
    assert (frank["name"], frank["viewing"], frank["answering"]) == ("Frank", 5, 6)
    await until(tab, lambda: view(tab, 1) == view(watcher, 1))


async def test_a_forbidden_project_leaks_nothing(gateways):
    gateway = await gateways(**FAST)
    insider = await person(gateway, "insider", "Insider", projects=[1])
    await insider.subscribe(1, presence=True)
    await insider.send({"type": "activity", "project_id": 1, "viewing": 99})
    outsider = await person(gateway, "outsider", "Mallory", projects=[2])
    await outsider.subscribe(2, presence=True)
    for message in (
        {"type": "subscribe", "project_id": 1, "presence": True},
        {"type": "presence_get", "project_id": 1},
        {"type": "activity", "project_id": 1, "viewing": 99},
    ):
        count = outsider.count("error")
        await outsider.send(message)
        await outsider.wait_for(lambda c=count: outsider.count("error") > c)
    codes = [m["code"] for m in outsider.of("error")]
    assert codes == ["forbidden", "forbidden", "not_subscribed"]
    # The outsider is not listed in project 1, and saw nothing of it; the insider sees no
    # trace of the outsider.
    await until(insider, lambda: view(insider, 1)["insider"]["viewing"] == 99)
    await outsider.send({"type": "ping"})
    await outsider.wait_for(lambda: outsider.last("pong") is not None)
    assert not [m for m in outsider.messages if m.get("project_id") == 1 and "members" in m]
    assert not [
        m for m in outsider.messages if m.get("type") == "presence_diff" and m["project_id"] == 1
    ]
    assert ids(insider) == {"insider"}
    assert ids(outsider, 2) == {"outsider"}


async def test_presence_get_activity_rules_and_tokens_without_a_subject(gateways):
    gateway = await gateways(**FAST)
    reader = await person(gateway, None)  # a token without sub: reads, is not listed
    frank = await person(gateway, "frank", "Frank")
    await frank.send({"type": "activity", "project_id": 1, "viewing": 1})
    await frank.wait_for(lambda: frank.last("error") is not None)
    assert frank.last("error")["code"] == "not_subscribed"
    await frank.subscribe(1)
    await reader.subscribe(1, presence=True)
    await reader.send({"type": "activity", "project_id": 1, "viewing": 4})  # ignored, no error
    await until(reader, lambda: ids(reader) == {"frank"})
    await reader.send({"type": "presence_get", "project_id": 1})
    await reader.wait_for(lambda: reader.count("presence") == 2)
    assert [m["id"] for m in reader.of("presence")[-1]["members"]] == ["frank"]
    assert reader.of("error") == []
    # presence_get needs no subscription, only the token.
    await frank.send({"type": "presence_get", "project_id": 1})
    await frank.wait_for(lambda: frank.last("presence") is not None)
    assert frank.last("presence")["members"][0]["name"] == "Frank"


async def test_presence_comes_after_subscribed_and_a_resubscribe_keeps_the_member(gateways):
    gateway = await gateways(**FAST)
    watcher = await person(gateway, "watcher")
    await watcher.subscribe(1, presence=True)
    types = [m["type"] for m in watcher.messages if m.get("project_id") == 1]
    await watcher.wait_for(lambda: watcher.count("presence") == 1)
    types = [m["type"] for m in watcher.messages if m.get("project_id") == 1]
    assert types[:2] == ["subscribed", "presence"]
    grace = await person(gateway, "grace", "Grace")
    await grace.subscribe(1)
    await grace.send({"type": "activity", "project_id": 1, "answering": 5})
    await until(watcher, lambda: (view(watcher, 1).get("grace") or {}).get("answering") == 5)
    for _ in range(3):  # a client resuming from its cursor: the person never leaves
        await grace.subscribe(1, resume=True)
    await watcher.send({"type": "activity", "project_id": 1, "viewing": 8})
    await until(watcher, lambda: view(watcher, 1)["watcher"]["viewing"] == 8)
    assert not [m for m in watcher.of("presence_diff") if "grace" in m["left"]]
    assert view(watcher, 1)["grace"]["answering"] == 5
    # A re-subscribe without the flag stops presence messages; events go on.
    other = await person(gateway, "other")
    await other.subscribe(1, presence=True)
    await until(other, lambda: ids(other) == {"watcher", "grace", "other"})
    await watcher.subscribe(1, resume=True)
    diffs = watcher.count("presence_diff")
    await grace.send({"type": "activity", "project_id": 1, "answering": None})
    await until(other, lambda: view(other, 1)["grace"]["answering"] is None)
    assert watcher.count("presence_diff") == diffs  # the same diff went to presence subscribers


async def test_sse_streams_get_presence_as_named_events(gateways):
    gateway = await gateways(**FAST)
    base = f"http://127.0.0.1:{gateway.port}"
    headers = {"Authorization": f"Bearer {token('*', 'sse-viewer', 'Heidi')}"}
    status, _, stream = await open_stream(base, "/v1/projects/1/stream?presence=1", headers)
    assert status == 200
    try:
        seen = await stream.until("presence")
        assert [e.event for e in seen] == ["authenticated", "subscribed", "presence"]
        first = json.loads(seen[-1].data)
        assert [m["id"] for m in first["members"]] == ["sse-viewer"]  # the stream is listed
        ivan = await person(gateway, "ivan", "Ivan")
        await ivan.subscribe(1)
        diff = json.loads((await stream.until("presence_diff")).pop().data)
        assert [m["id"] for m in diff["joined"]] == ["ivan"]
    finally:
        stream.close()
    status, _, stream = await open_stream(base, "/v1/projects/1/stream?presence=maybe", headers)
    assert status == 400
    stream.close()


async def test_past_the_member_cap_people_read_but_are_not_listed(gateways):
    """Past the cap a person reads presence and is not listed, until a place frees: then
    they are listed, with the activity they reported meanwhile (before, they stayed unlisted
    for as long as their connection lived, the list having room)."""
    gateways_ = [await gateways(**FAST, presence_max_members=2) for _ in range(2)]
    people = [await person(gateways_[n % 2], f"p{n}") for n in range(3)]
    for client in people[:2]:
        await client.subscribe(1, presence=True)
    # (the cap is checked against what the gateway knows: p2's sees p1 before p2 comes)
    await until(people[0], lambda: ids(people[0]) == {"p0", "p1"})
    await people[2].subscribe(1, presence=True)
    await until(people[2], lambda: ids(people[2]) == {"p0", "p1"})
    assert gateways_[0].metrics.presence_unlisted_total == 1
    await people[2].send({"type": "activity", "project_id": 1, "viewing": 1})  # no error
    await people[2].send({"type": "ping"})
    await people[2].wait_for(lambda: people[2].last("pong") is not None)
    await until(people[1], lambda: ids(people[1]) == {"p0", "p1"})
    await people[1].close()  # a place frees on the other gateway
    for client in (people[0], people[2]):
        await until(client, lambda c=client: ids(c) == {"p0", "p2"})
        assert view(client, 1)["p2"]["viewing"] == 1


async def test_a_person_signing_in_as_another_in_a_full_project_takes_their_own_place(gateways):
    """At the member cap, a tab whose refreshed token names another person moves to that
    person when the tab was the only one of the person it leaves: the move frees the place it
    takes. (Before, the cap was checked with the person leaving still counted: the tab was left
    listed as nobody, one place empty, counted as past the cap.) A person still listed
    elsewhere keeps their place, so the new one is refused then."""
    gateway = await gateways(**FAST, presence_max_members=2)
    watcher = await person(gateway, "watcher")
    await watcher.subscribe(1, presence=True)
    tab = await person(gateway, "erin")
    await tab.subscribe(1)
    await until(watcher, lambda: ids(watcher) == {"watcher", "erin"})
    await tab.send({"type": "auth", "token": token("*", "frank")})
    await until(watcher, lambda: ids(watcher) == {"watcher", "frank"})
    assert gateway.metrics.presence_unlisted_total == 0
    # frank's other tab keeps him listed: this one moving to gina would take a third place.
    other = await person(gateway, "frank")
    await other.subscribe(1)
    await other.send({"type": "ping"})
    await other.wait_for(lambda: other.last("pong") is not None)
    await tab.send({"type": "auth", "token": token("*", "gina")})
    await tab.wait_for(lambda: tab.count("authenticated") == 3)
    await tab.send({"type": "ping"})
    await tab.wait_for(lambda: tab.count("pong") == 1)
    assert gateway.metrics.presence_unlisted_total == 1
    await watcher.send({"type": "activity", "project_id": 1, "viewing": 2})
    await until(watcher, lambda: view(watcher, 1)["watcher"]["viewing"] == 2)
    assert ids(watcher) == {"watcher", "frank"}


async def test_a_sigkilled_pods_members_leave_every_view_within_the_bound(redis_url):
    args = [
        "--presence-ttl", "2",
        "--presence-refresh-interval", "0.5",
        "--presence-diff-interval", "0.5",
    ]  # fmt: skip
    bound = 2 + 3 * 0.5 + 0.5  # ttl + 3 refresh intervals + one diff interval (docs/presence.md)
    pods = [GatewayProcess(redis_url, auth_secret=SECRET, args=args) for _ in range(3)]
    clients: list[RecordingClient] = []
    try:
        for pod in pods:
            await asyncio.to_thread(pod.start)
        for n in range(30):  # ten people per pod
            pod = pods[n % 3]
            client = RecordingClient(pod.ws_url, token=token("*", f"user-{n:02}"))
            clients.append(await client.connect())
            await client.subscribe(1, presence=True)
        everyone = {f"user-{n:02}" for n in range(30)}
        for client in clients:
            await until(client, lambda c=client: ids(c) == everyone, within=10)
        await asyncio.to_thread(pods[0].kill)
        killed_at = time.monotonic()
        survivors = [c for n, c in enumerate(clients) if n % 3]
        remaining = {f"user-{n:02}" for n in range(30) if n % 3}
        for client in survivors:
            await until(client, lambda c=client: ids(c) == remaining, within=bound + 5)
        took = time.monotonic() - killed_at
        assert took <= bound + 1.0, f"ghosts stayed {took:.1f} s (bound {bound} s)"
        # Nobody else flickered out meanwhile.
        for client in survivors:
            left = {i for m in client.of("presence_diff") for i in m["left"]}
            assert left == everyone - remaining
    finally:
        for client in clients:
            await client.close()
        for pod in pods:
            await asyncio.to_thread(pod.close)


async def test_a_rolling_restart_shows_no_leave_for_people_who_come_back_in_the_grace(gateways):
    old, new = await gateways(**{**FAST, "presence_drain_grace": 5.0}), await gateways(**FAST)
    watcher = await person(new, "watcher")
    await watcher.subscribe(1, presence=True)
    judy = await person(old, "judy", "Judy")
    await judy.subscribe(1)
    await judy.send({"type": "activity", "project_id": 1, "viewing": 3})
    await until(watcher, lambda: (view(watcher, 1).get("judy") or {}).get("viewing") == 3)
    await old.drain()  # SIGTERM: Judy's client is closed with 1012 ...
    await judy.closed.wait()
    assert judy.close_code == 1012
    # A diff goes out while Judy is away (she takes longer than one diff interval to return).
    await watcher.send({"type": "activity", "project_id": 1, "viewing": 1})
    await until(watcher, lambda: view(watcher, 1)["watcher"]["viewing"] == 1)
    back = await person(new, "judy", "Judy")  # ... and comes back on the other pod
    await back.subscribe(1)
    await back.send({"type": "activity", "project_id": 1, "viewing": 3, "answering": 3})
    await until(watcher, lambda: view(watcher, 1)["judy"]["answering"] == 3)
    # The old pod's records expire after its grace; by then Judy's new tab is listed, so the
    # merged member never goes: wait until the old pod is dropped from the view, then check.
    view_of_new = new.presence.core.views[1]
    async with asyncio.timeout(5.0 + 3 * 0.5 + 3):
        while old.presence.pod_id in view_of_new.pods:  # noqa: ASYNC110 (no event for it)
            await asyncio.sleep(0.1)
    await watcher.send({"type": "activity", "project_id": 1, "viewing": 4})
    await until(watcher, lambda: view(watcher, 1)["watcher"]["viewing"] == 4)
    assert not [m for m in watcher.of("presence_diff") if "judy" in m["left"]]
    assert ids(watcher) == {"watcher", "judy"}


async def test_a_redis_flush_is_rebuilt_without_anyone_leaving(gateways, redis_url):
    pods = [await gateways(**FAST) for _ in range(2)]
    kim = await person(pods[0], "kim", "Kim")
    leo = await person(pods[1], "leo", "Leo")
    for client in (kim, leo):
        await client.subscribe(1, presence=True)
    await until(leo, lambda: ids(leo) == {"kim", "leo"})
    flusher = redis.asyncio.Redis.from_url(redis_url)
    try:
        await flusher.flushall()

        # Every pod rewrites its members at its next refresh: Redis has them both again.
        async def stored() -> set[str]:
            return {m.id for m in await aread_presence(flusher, 1)}

        async with asyncio.timeout(5):
            while await stored() != {"kim", "leo"}:  # noqa: ASYNC110 (polls Redis)
                await asyncio.sleep(0.1)
    finally:
        await flusher.aclose()
    await kim.send({"type": "activity", "project_id": 1, "viewing": 11})
    await until(leo, lambda: view(leo, 1)["kim"]["viewing"] == 11)
    for client in (kim, leo):
        assert not [m for m in client.of("presence_diff") if m["left"]]


async def test_presence_across_gateways_on_a_redis_cluster(redis_cluster_url):
    from gateway.config import GatewayConfig
    from gateway.server import Gateway

    pods = []
    try:
        for _ in range(2):
            pod = Gateway(
                GatewayConfig(
                    redis_url=redis_cluster_url, port=0, auth_secret=SECRET, drain_timeout=2, **FAST
                )
            )
            await pod.start()
            pods.append(pod)
        people = []
        for n, project_id in enumerate((1, 2, 3, 4, 5, 6)):  # spread over the masters' slots
            for pod in pods:
                client = await person(pod, f"p{n}-{pod.port}")
                await client.subscribe(project_id, presence=True)
                people.append((client, project_id))
        for client, project_id in people:
            expected = {f"p{n}-{pod.port}" for pod in pods for n in [project_id - 1]}
            await until(client, lambda c=client, p=project_id, e=expected: ids(c, p) == e)
        first, project_id = people[0]
        await first.send({"type": "activity", "project_id": project_id, "viewing": 2})
        other = people[1][0]
        me = f"p0-{pods[0].port}"
        await until(other, lambda: view(other, project_id)[me]["viewing"] == 2)
    finally:
        for pod in pods:
            await pod.drain()


# A record's five fields, then a value nested 1,000 lists deep: 2,020 bytes.
_DEEP_RECORD = b"[null,null,null,1,1," + b"[" * 1000 + b"]" * 1000 + b"]"


async def test_garbage_in_a_projects_presence_keys_stays_in_that_project(gateways, redis_url):
    """Another writer to Redis: presence of the damaged project is served from what can be read
    (or answers ``unavailable``), other projects never notice, and the pod's loops go on. An
    index key of another type is replaced, and counted."""
    from schemas.keys import Keys

    gateway = await gateways(**FAST)
    keys = Keys()
    raw = redis.asyncio.Redis.from_url(redis_url)
    watcher = await person(gateway, "watcher")
    await watcher.subscribe(2, presence=True)
    damages = [
        lambda: raw.hset(keys.presence_versions(1), mapping={"pod-x": "not a number"}),
        lambda: raw.zadd(keys.presence_pods(1), {"pod-x": 2**52, "bad pod!": 2**52}),
        lambda: raw.hset(keys.presence_versions(1), mapping={"bad pod!": "1", "pod-y": "2"}),
        lambda: raw.zadd(keys.presence_pods(1), {"pod-y": 2**52}),
        lambda: raw.hset(keys.presence_pod(1, "pod-y"), mapping={"eve": "{garbage", "al": "[]"}),
        lambda: raw.publish(keys.presence_channel(1), b"\xff|garbage"),
        lambda: raw.publish(keys.presence_channel(2), b"pod-z|1|0|{}"),
        # nested past the recursion limit, after fields that decode (a RecursionError escaped
        # the decoders): an announcement, and a record within the 2,048 bytes a read keeps
        lambda: raw.publish(keys.presence_channel(1), b'pod-y|3|0|{"eve":' + _DEEP_RECORD + b"}"),
        lambda: raw.hset(keys.presence_pod(1, "pod-y"), mapping={"deep": _DEEP_RECORD}),
        lambda: raw.delete(keys.presence_versions(1)),
        lambda: raw.set(keys.presence_versions(1), "a string, not a hash"),
    ]
    try:
        for step, damage in enumerate(damages):
            await damage()
            reader = await person(gateway, f"reader-{step}")
            await reader.send({"type": "subscribe", "project_id": 1, "presence": True})
            await reader.wait_for(
                lambda r=reader: r.last("presence") is not None or r.last("error") is not None
            )
            error = reader.last("error")
            assert error is None or error["code"] == "unavailable", error
            # Project 2 is untouched: the watcher still sees changes there.
            await watcher.send({"type": "activity", "project_id": 2, "viewing": step + 1})
            await until(watcher, lambda s=step: view(watcher, 2)["watcher"]["viewing"] == s + 1)
            await reader.close()
        assert all(not task.done() for task in gateway.presence._tasks)
        # No garbage took the pod's pub/sub link down (every project's channels resubscribed)
        assert gateway.metrics.pubsub_reconnects_total == 0
        assert gateway.metrics.foreign_values["presence_key"] >= 1
        assert await raw.type(keys.presence_versions(1)) in (b"hash", b"none")
    finally:
        await raw.aclose()


async def test_a_subscribe_that_ends_unavailable_does_not_list_the_person(gateways, redis_url):
    """A subscribe whose project turns out unreadable (its metadata in Redis is foreign) gets
    ``error`` ``unavailable`` and no subscription: the person must not be listed in the
    project's presence either (presence is visible only where events are), and an
    ``unsubscribe`` is then rightly ``not_subscribed``."""
    from schemas.keys import Keys

    gateway = await gateways(**FAST)
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        await raw.set(Keys().meta(1), "not a hash")
    finally:
        await raw.aclose()
    ghost = await person(gateway, "ghost")
    await ghost.send({"type": "subscribe", "project_id": 1, "presence": True})
    await ghost.wait_for(lambda: ghost.last("error") is not None)
    assert ghost.last("error")["code"] == "unavailable"
    await asyncio.sleep(0.3)  # a listing would have been written by now (flush interval 0.1 s)
    watcher = await person(gateway, "watcher")
    await watcher.send({"type": "presence_get", "project_id": 1})
    await watcher.wait_for(lambda: watcher.last("presence") is not None)
    assert watcher.last("presence")["members"] == []
    assert gateway.presence.core.table.records(1) == {}


async def test_a_live_subscription_ended_as_unavailable_leaves_the_presence_too(
    gateways, redis_url
):
    """The periodic check finds a followed project's metadata foreign: its subscriptions end
    with ``error`` ``unavailable``. Their tabs leave the project's presence with them: they are
    no longer listed, and they get no more ``presence_diff`` of a project they do not follow."""
    from schemas.keys import Keys

    # A presence TTL of 8 s: a tab left listed until its entry expired would show for 7.5 s at
    # least, far from the deadline below, which leaves a loaded machine room.
    gateway = await gateways(reconcile_interval=0.2, **{**FAST, "presence_ttl": 8.0})
    gone = await person(gateway, "gone")
    await gone.subscribe(1, presence=True)
    await until(gone, lambda: ids(gone) == {"gone"})
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        await raw.hset(Keys().meta(1), "seq", "garbage")
    finally:
        await raw.aclose()
    await gone.wait_for(lambda: gone.last("error") is not None)
    assert (gone.last("error")["code"], gone.last("error")["project_id"]) == ("unavailable", 1)
    assert gone.last("error").get("ended") is True  # (not a failed presence read: docs/protocol.md)
    assert gateway.presence.core.subscribers.get(1, set()) == set()  # no more diffs for it
    newcomer = await person(gateway, "newcomer")
    # No subscription needed; the answer is at most a diff interval old (docs/presence.md).
    deadline = time.monotonic() + 2 * FAST["presence_diff_interval"] + 3.5
    while True:
        asked = newcomer.count("presence")
        await newcomer.send({"type": "presence_get", "project_id": 1})
        await newcomer.wait_for(lambda n=asked: newcomer.count("presence") > n)
        if newcomer.last("presence")["members"] == [] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert newcomer.last("presence")["members"] == []


async def test_a_subscription_ended_while_its_presence_read_fails_gets_no_presence_error(gateways):
    """The hub ends the subscription (its project unreadable: ``error`` ``unavailable`` with
    ``ended``) while the subscribe's presence read waits, and that read then fails. The client
    was told the subscription ended: an ``unavailable`` without ``ended`` now would say the
    opposite (only presence failed, the events flow, docs/protocol.md), and a client that
    subscribed again meanwhile would take it for the answer to that subscribe."""
    import redis.exceptions

    from gateway.store import ProjectUnreadable

    gateway = await gateways(**FAST)

    async def read_failing_as_the_feed_fails(session, project_id):
        hub = gateway.hub
        hub._fail_feed(hub.feeds[project_id], ProjectUnreadable(project_id, "meta", "garbage"))
        raise redis.exceptions.ConnectionError("presence's Redis did not answer")

    gateway.presence.subscribe = read_failing_as_the_feed_fails
    client = await person(gateway, "alice")
    await client.subscribe(1, presence=True)
    await client.send({"type": "ping"})  # answered after the subscribe, frames in order
    await client.wait_for(lambda: client.last("pong") is not None)
    errors = [(m["code"], m.get("ended")) for m in client.of("error")]
    assert errors == [("unavailable", True)]


async def test_a_name_or_subject_that_is_not_text_breaks_nothing(gateways, redis_url):
    """A backend that cuts a display name at a fixed length in UTF-16 (JavaScript's slice) can
    split an emoji and sign a token whose ``name`` ends in half a surrogate pair; JSON carries
    it, but it is not text and cannot be encoded. Such a name is dropped as any bad name is, and
    a token with such a subject is refused (4001: no revocation could name it), so everyone
    else's presence on the pod goes on: the pod writes all its projects in one pipeline, and
    diffs of all projects go out of one loop."""
    import jwt

    def foreign_token(sub: str, name: str) -> str:  # as a backend in another language signs it
        claims = {"projects": "*", "aud": "eventbus", "exp": int(time.time()) + 300}
        return jwt.encode({**claims, "sub": sub, "name": name}, SECRET, algorithm="HS256")

    gateway = await gateways(**FAST)
    watcher = await person(gateway, "watcher")
    await watcher.subscribe(2, presence=True)
    split_name = RecordingClient(ws_url(gateway), token=foreign_token("alice", "Alice \ud83d"))
    await split_name.connect()
    await split_name.subscribe(1, presence=True)
    split_subject = foreign_token("bob \udc00", "Bob")
    refused = await RecordingClient(ws_url(gateway), token=split_subject).connect(auth=False)
    await refused.send({"type": "auth", "token": split_subject})
    await asyncio.wait_for(refused.closed.wait(), 5)
    assert refused.close_code == 4001
    await until(watcher, lambda: ids(watcher, 2) == {"watcher"})
    reader = await person(gateway, "reader")
    await reader.subscribe(1, presence=True)
    await until(reader, lambda: ids(reader, 1) == {"alice", "reader"})
    assert view(reader, 1)["alice"]["name"] is None
    carol = await person(gateway, "carol")
    await carol.subscribe(2)
    await until(watcher, lambda: ids(watcher, 2) == {"watcher", "carol"})
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert [m.id for m in await aread_presence(raw, 2)] == ["carol", "watcher"]
        assert [m.id for m in await aread_presence(raw, 1)] == ["alice", "reader"]
    finally:
        await raw.aclose()
    assert all(not task.done() for task in gateway.presence._tasks)


async def test_a_subject_too_long_to_list_reads_presence_but_is_not_listed(gateways):
    """Every presence message carries every member's id: a backend that puts user info in
    ``sub`` (here ~1 KB, near the longest a token may carry: 1,024 bytes) would make each
    message of a 1,000-member project 1 MB. Such a person reads presence and is not listed,
    counted as the member cap counts; everyone else is listed as before."""
    gateway = await gateways(**FAST)
    watcher = await person(gateway, "watcher")
    await watcher.subscribe(1, presence=True)
    heavy = await person(gateway, json.dumps({"user": "bob", "bio": "x" * 980}))
    await heavy.subscribe(1, presence=True)
    # `presence` comes after `subscribed`, once the project's view is read (the watcher's read,
    # which may still be under way: its subscribe returned at its own `subscribed`).
    await until(heavy, lambda: ids(heavy, 1) is not None)
    assert ids(heavy, 1) == {"watcher"}
    carol = await person(gateway, "c" * 255)
    await carol.subscribe(1)
    await until(watcher, lambda: ids(watcher, 1) == {"watcher", "c" * 255})
    assert gateway.metrics.presence_unlisted_total == 1


async def test_a_storm_of_presence_reads_leaves_redis_connections_for_everything_else():
    """300 connections asking presence of 300 projects at once (a reconnect storm of dashboards
    with presence, or one client with many sockets): each read took a connection of the pool
    every Redis call of the gateway shares (redis-py's, 100 at most). Past 100 the pool
    refused "Too many connections": a third of them got ``unavailable``, and so did the
    polls, subscribes and readiness checks made meanwhile, against a healthy Redis. Presence
    reads now take at most ``PRESENCE_READS`` connections at once, the others wait their turn
    (within ``--subscribe-timeout``). A gateway process, so that the frames arrive together."""
    import websockets

    from gateway.presence_store import PRESENCE_READS
    from tests.support.redis_server import RedisServer

    def ask(project_id: int) -> str:
        if project_id % 2:
            return json.dumps({"type": "presence_get", "project_id": project_id})
        return json.dumps({"type": "subscribe", "project_id": project_id, "presence": True})

    async def answer(client) -> dict:
        while (message := json.loads(await client.recv()))["type"] == "subscribed":
            pass
        return message

    with RedisServer() as server, GatewayProcess(server.url) as gateway:
        gateway.start()
        direct = redis.asyncio.Redis.from_url(server.url)
        clients = []
        try:
            connected_before = (await direct.info("clients"))["connected_clients"]
            clients = [await websockets.connect(gateway.ws_url) for _ in range(300)]
            polls = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(20)]
            await asyncio.gather(*(c.send(ask(p)) for p, c in enumerate(clients, start=1)))
            for _, writer in polls:
                writer.write(b"GET /v1/projects/1/events HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(20):
                answers = await asyncio.gather(*map(answer, clients))
                polled = await asyncio.gather(*(reader.read() for reader, _ in polls))
            for _, writer in polls:
                writer.close()
            refused = [a for a in answers if a["type"] != "presence"]
            assert not refused, f"{len(refused)} presence reads refused: {refused[0]}"
            assert [p.split(b" ", 2)[1] for p in polled] == [b"200"] * 20, polled[0][-120:]
            opened = (await direct.info("clients"))["connected_clients"] - connected_before
            assert opened <= PRESENCE_READS + 10, f"{opened} more connections to Redis"
        finally:
            await asyncio.gather(*(c.close() for c in clients))
            await direct.aclose()


async def test_a_forged_pod_of_a_million_members_costs_a_gateway_nothing(gateways, redis_url):
    """Another writer stores a pod listing 1,000,000 members in project 1. Read whole, a
    ``presence_get`` answered a 75 MB frame after ~5 s of the gateway's CPU (its event loop,
    and every other project's presence and events, blocked meanwhile). The read leaves the pod
    out in Redis: the client gets the real members, the pod is counted in
    ``eventbus_foreign_values_total{kind="presence_members"}``, project 2 goes on as before."""
    import redis as sync_redis

    from schemas.keys import Keys
    from tests.test_presence_store import _forge_pod

    gateway = await gateways(**{**FAST, "presence_ttl": 5.0, "presence_refresh_interval": 1.0})
    alice = await person(gateway, "alice", "Alice")
    await alice.subscribe(1)  # listed; no view of project 1 on the gateway: reads go to Redis
    watcher = await person(gateway, "watcher")
    await watcher.subscribe(2, presence=True)
    client = sync_redis.Redis.from_url(redis_url)
    try:
        await asyncio.to_thread(_forge_pod, client, Keys(), 1, "forged", 1_000_000)
    finally:
        client.close()
    reader = await person(gateway, "reader", projects=[1])
    started = time.monotonic()
    await reader.send({"type": "presence_get", "project_id": 1})
    await reader.wait_for(lambda: reader.last("presence") is not None, 10)
    assert [m["id"] for m in reader.last("presence")["members"]] == ["alice"]
    assert time.monotonic() - started < 2.0
    assert gateway.metrics.foreign_values["presence_members"] >= 1
    await watcher.send({"type": "activity", "project_id": 2, "viewing": 5})
    await until(watcher, lambda: view(watcher, 2)["watcher"]["viewing"] == 5)


#: 100 people whose ids and names are as long as presence lists them, in a script of 3 bytes a
#: character (Chinese): ~1.4 KB of records each.
LONG_NAME = "名" * 200


def long_id(i: int) -> str:
    return f"{i:03d}" + "用" * 252


async def test_a_large_presence_write_leaves_every_pods_pubsub_link_connected(gateways):
    """100 people with long ids and names open project 1 on one pod at once (a meeting starts,
    a pod's clients come back after a deploy), then all report activity at once, ten times.
    Redis here queues at most 32 KB for a pub/sub connection (``client-output-buffer-limit
    pubsub``; 32 MB, or 8 MB for 60 s, by default, which larger projects reach the same way).
    Announced whole, each of those writes (~140 KB) made Redis close both pods' pub/sub links:
    8 and 11 reconnects, and project 2's events, on the same links, arrived up to 1.9 s late
    (caught up from the stream after each reconnect). Now a write over
    ``--presence-max-announcement`` is announced without its records and the pods read the
    project: no link is closed, and every pod shows all 100 people and their last activity."""
    from publisher import AsyncPublisher
    from tests.support.gateway_client import event
    from tests.support.redis_server import RedisServer

    with RedisServer() as server:
        direct = redis.asyncio.Redis.from_url(server.url)
        publisher = AsyncPublisher.from_url(server.url)
        pods = []
        people: list[RecordingClient] = []
        try:
            await direct.config_set("client-output-buffer-limit", "pubsub 32kb 16kb 60")
            settings = {**FAST, "redis_url": server.url, "presence_max_announcement": 8192}
            pods += [await gateways(**settings) for _ in range(2)]
            watchers = [await person(pod, f"watcher-{i}") for i, pod in enumerate(pods)]
            for watcher in watchers:
                await watcher.subscribe(1, presence=True)
                await watcher.subscribe(2)
            people += [
                RecordingClient(ws_url(pods[0]), token=token(sub=long_id(i), name=LONG_NAME))
                for i in range(100)
            ]
            await asyncio.gather(*(p.connect() for p in people))
            await asyncio.gather(*(p.send({"type": "subscribe", "project_id": 1}) for p in people))
            expected = {"watcher-0", "watcher-1"} | {long_id(i) for i in range(100)}
            for watcher in watchers:
                await until(watcher, lambda w=watcher: ids(w) == expected, 10)
            for n in range(1, 11):
                activity = {"type": "activity", "project_id": 1, "viewing": n}
                await asyncio.gather(*(p.send(activity) for p in people))
                await publisher.publish(event(2, n))
                await asyncio.sleep(0.2)  # the next round in another write
            for watcher in watchers:
                await until(watcher, lambda w=watcher: len(w.seqs(2)) == 10, 10)
                await until(
                    watcher,
                    lambda w=watcher: all(
                        view(w, 1)[long_id(i)]["viewing"] == 10 for i in range(100)
                    ),
                    10,
                )
                assert view(watcher, 1)[long_id(7)]["name"] == LONG_NAME
            assert [pod.metrics.pubsub_reconnects_total for pod in pods] == [0, 0]
            assert pods[0].metrics.presence_unannounced_writes_total >= 10
        finally:
            await asyncio.gather(*(p.close() for p in people))
            for pod in pods:
                await pod.drain()
            await publisher.aclose()
            await direct.aclose()


async def test_people_leaving_in_a_write_too_large_to_announce_leave_every_pod_at_once(gateways):
    """20 people with long ids and names, the only ones on their pod, close their tabs at once:
    ~16 KB of departures, over an 8 KB bound. Announced without records, the other pod read
    the project, found the pod gone from Redis (its last member left) and kept its members, as
    after a flush, until three refresh reports missed the pod: 6 to 9 s with the default 3 s
    refreshes. Now the other pod's subscribers see them leave at the next diffs."""
    settings = {"presence_diff_interval": 0.2, "presence_max_announcement": 8192}
    pods = [await gateways(**settings) for _ in range(2)]
    watcher = await person(pods[1], "watcher")
    await watcher.subscribe(1, presence=True)
    people = [await person(pods[0], long_id(i), LONG_NAME) for i in range(20)]
    try:
        await asyncio.gather(*(p.send({"type": "subscribe", "project_id": 1}) for p in people))
        expected = {"watcher"} | {long_id(i) for i in range(20)}
        await until(watcher, lambda: ids(watcher) == expected, 10)
        arrivals = pods[0].metrics.presence_unannounced_writes_total
        assert arrivals >= 1
    finally:
        await asyncio.gather(*(p.close() for p in people))
    await until(watcher, lambda: ids(watcher) == {"watcher"}, 3)
    # The departures were announced (as an empty list), not left for the other pod to read.
    assert pods[0].metrics.presence_unannounced_writes_total == arrivals
