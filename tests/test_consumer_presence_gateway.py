"""Presence in the Python consumer, end to end: real gateways on a real Redis, people driven by
browser-like WebSocket clients with a ``sub`` (as in tests/test_presence_gateway.py), and a
backend reading ``Consumer.presence()``: people arrive, change activity and leave across two
pods; presence becomes unknown when its gateway is SIGKILLed and is replaced after the reconnect;
events and presence share one connection, every event exactly once, in order."""

from __future__ import annotations

import asyncio

import pytest

from consumer import Consumer, Delivery, Forbidden, PresenceView, ReconnectPolicy
from publisher import AsyncPublisher
from schemas.tokens import issue_token
from tests.support.gateway_client import SECRET, RecordingClient, event, ws_url
from tests.support.gateway_process import GatewayProcess
from tests.test_consumer import history
from tests.test_presence_gateway import FAST, person, token

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def ids(view: PresenceView) -> list[str] | None:
    return None if view.members is None else [m.id for m in view.members]


async def views_until(presence, predicate, seen: list | None = None, within: float = 10.0):
    """Views of ``presence`` until one satisfies ``predicate`` (returned); all go to ``seen``."""
    async with asyncio.timeout(within):
        async for view in presence:
            if seen is not None:
                seen.append(view)
            if predicate(view):
                return view
    raise AssertionError("the presence iterator ended")


async def test_a_service_sees_people_arrive_change_activity_and_leave_across_two_pods(gateways):
    pods = [await gateways(**FAST) for _ in range(2)]
    # A service's token: no `sub`, so it reads presence without being listed itself.
    async with Consumer(ws_url(pods[0]), token=token("*")) as bus:
        presence = bus.presence(1)
        first = await views_until(presence, lambda v: v.known)
        assert first.members == () and bus.members(1) == ()
        alice = await person(pods[0], "alice", "Alice")
        bob = await person(pods[1], "bob", "Bob")
        await alice.subscribe(1, presence=True)
        await bob.subscribe(1)  # listed without reading presence
        seen: list[PresenceView] = []
        both = await views_until(presence, lambda v: ids(v) == ["alice", "bob"], seen)
        assert {m.id for v in seen for m in v.change.joined} == {"alice", "bob"}
        assert not [v for v in seen if v.change.left]
        assert both.member("alice").name == "Alice" and both.member("bob").answering is None
        # Bob (on the other pod) starts answering blocker 5; Alice looks at it.
        await bob.send({"type": "activity", "project_id": 1, "viewing": 5, "answering": 5})
        await alice.send({"type": "activity", "project_id": 1, "viewing": 5})
        seen.clear()
        view = await views_until(
            presence,
            lambda v: v.member("bob").answering == 5 and v.member("alice").viewing == 5,
            seen,
        )
        assert {m.id for v in seen for m in v.change.changed} == {"alice", "bob"}
        assert not [v for v in seen if v.change.joined or v.change.left]
        # Alice closes her tab: she leaves; Bob stays, as he was.
        await alice.close()
        seen.clear()
        view = await views_until(presence, lambda v: ids(v) == ["bob"], seen)
        assert view.change.left == ("alice",) and view.member("bob").answering == 5
        assert bus.members(1) == view.members
        await bob.close()
        await views_until(presence, lambda v: v.members == ())
        # Presence only: the project's events were subscribed for it, delivered to no one.
        assert bus.stats.delivered == 0 and bus.stats.presence_malformed == 0
        await presence.aclose()
        assert bus.members(1) is None


async def test_a_consumer_whose_token_has_a_sub_is_listed_and_a_forbidden_project_raises(
    gateways,
):
    gateway = await gateways(**FAST)
    watcher = await person(gateway, "watcher")
    await watcher.subscribe(1, presence=True)
    # Its list first (it follows the `subscribed`): else the agent, connecting meanwhile, may be
    # in it already, and no diff tells the watcher of the agent's arrival.
    await watcher.wait_for(lambda: bool(watcher.of("presence")), 5)
    async with Consumer(ws_url(gateway), token=token([1], "agent-7", "Agent")) as bus:
        presence = bus.presence(1)
        view = await views_until(presence, lambda v: ids(v) == ["agent-7", "watcher"])
        assert view.member("agent-7").name == "Agent"
        # The people on the dashboard see the agent arrive.
        await watcher.wait_for(
            lambda: any(
                m["id"] == "agent-7" for d in watcher.of("presence_diff") for m in d["joined"]
            ),
            5,
        )
        forbidden = bus.presence(2)
        with pytest.raises(Forbidden):
            await views_until(forbidden, lambda v: True)
        with pytest.raises(StopAsyncIteration):
            await forbidden.__anext__()
        # The allowed project is unaffected.
        await watcher.close()
        await views_until(presence, lambda v: ids(v) == ["agent-7"])


async def test_events_and_presence_on_one_connection_exactly_once_in_order(gateways, redis_url):
    gateway = await gateways(**FAST)
    publisher = AsyncPublisher.from_url(redis_url)
    people: list[RecordingClient] = []
    published = {1: 0, 2: 0}

    async def publish(project_id: int, count: int) -> None:
        for _ in range(count):
            published[project_id] += 1
            await publisher.publish(event(project_id, published[project_id]))

    try:
        async with Consumer(ws_url(gateway), token=token("*"), start="beginning") as bus:
            events = bus.events(1)
            await events.wait_subscribed()
            await publish(1, 20)
            # Asked for while events flow: the project is subscribed again from its cursor.
            presence = bus.presence(1)
            await publish(1, 20)
            for n in range(3):
                people.append(await person(gateway, f"user-{n}"))
                await people[-1].subscribe(1)
                await publish(1, 10)
            await views_until(presence, lambda v: ids(v) == ["user-0", "user-1", "user-2"])
            # Presence of a project whose events are not followed: they go to no one.
            other = bus.presence(2)
            await views_until(other, lambda v: v.known)
            await publish(2, 15)
            await people[0].close()
            await views_until(presence, lambda v: ids(v) == ["user-1", "user-2"])
            # The last reader leaves: subscribed again without the flag, events go on.
            await presence.aclose()
            await publish(1, 20)
            # Followed for events after its presence: from the beginning, each event once.
            events2 = bus.events(2, start="beginning")
            await publish(2, 5)
            items = []
            async with asyncio.timeout(30):
                async for item in events:
                    items.append(item)
                    if len(items) == published[1]:
                        break
                async for item in events2:
                    items.append(item)
                    if len([i for i in items if i.project_id == 2]) == published[2]:
                        break
            await other.aclose()
            held = await history(redis_url, [1, 2])
            for project_id in (1, 2):
                got = [
                    (i.epoch, i.seq, i.event.blocker_id)
                    for i in items
                    if isinstance(i, Delivery) and i.project_id == project_id
                ]
                assert got == held[project_id]
            assert all(isinstance(i, Delivery) for i in items)
            assert bus.stats.delivered == len(items)
    finally:
        for client in people:
            await client.close()
        await publisher.aclose()


async def test_presence_is_unknown_when_its_gateway_is_killed_and_replaced_after_reconnect(
    redis_url,
):
    args = [
        "--presence-ttl", "2",
        "--presence-refresh-interval", "0.5",
        "--presence-diff-interval", "0.2",
    ]  # fmt: skip
    pods = [GatewayProcess(redis_url, auth_secret=SECRET, args=args) for _ in range(2)]
    alice = bob = None
    try:
        for pod in pods:
            await asyncio.to_thread(pod.start)
        alice = await RecordingClient(pods[1].ws_url, token=token("*", "alice")).connect()
        await alice.subscribe(1)
        policy = ReconnectPolicy(initial=0.1, max=0.5)
        urls = [pods[0].ws_url, pods[1].ws_url]
        async with Consumer(urls, token=token("*"), reconnect=policy) as bus:
            presence = bus.presence(1)
            await views_until(presence, lambda v: ids(v) == ["alice"])
            assert await asyncio.to_thread(pods[0].kill) == -9
            unknown = await views_until(presence, lambda v: True)
            assert unknown.members is None and not unknown.change
            assert bus.members(1) is None
            # Reconnected to the other pod: its `presence` replaces the list.
            back = await views_until(presence, lambda v: v.known)
            assert ids(back) == ["alice"] and not back.change  # as it was before
            assert bus.connects == 2
            bob = await RecordingClient(pods[1].ws_url, token=token("*", "bob")).connect()
            await bob.subscribe(1)
            view = await views_until(presence, lambda v: ids(v) == ["alice", "bob"])
            assert [m.id for m in view.change.joined] == ["bob"]
    finally:
        for client in (alice, bob):
            if client is not None:
                await client.close()
        for pod in pods:
            await asyncio.to_thread(pod.close)


async def test_tail_with_presence_prints_a_line_per_change_beside_the_events(gateways):
    import io

    from consumer.tail import tail

    class Output(io.StringIO):
        """tail's stdout, awaited: each write wakes the test."""

        written = asyncio.Event()

        def write(self, text: str) -> int:
            self.written.set()
            return super().write(text)

        async def shows(self, text: str) -> None:
            while text not in self.getvalue():
                self.written.clear()
                await self.written.wait()

    gateway = await gateways(**FAST)
    out = Output()
    publisher = AsyncPublisher.from_url(gateway.config.redis_url)
    alice = None
    try:
        task = asyncio.create_task(
            tail(ws_url(gateway), [1], token=token("*"), count=1, out=out, presence=True)
        )
        async with asyncio.timeout(10):
            await out.shows("p1  presence  members=0")
            alice = await person(gateway, "alice", "Alice")
            await alice.subscribe(1)
            await alice.send({"type": "activity", "project_id": 1, "answering": 4})
            await out.shows("answering=4")
            await publisher.publish(event(1, 9))
            assert await task == 1
        lines = out.getvalue().splitlines()
        assert any('joined="alice" ("Alice")' in line for line in lines), lines
        assert "blocker_resolved" in lines[-1] and "blocker_id=9" in lines[-1]
    finally:
        if alice is not None:
            await alice.close()
        await publisher.aclose()


async def test_presence_asked_and_dropped_at_any_moment_leaves_events_exactly_once(
    gateways, redis_url
):
    """Readers opened and closed around every step of a subscription's life (before its cursor
    is known, while its subscribe is in flight, live), while events flow: each toggle subscribes
    the project again from its cursor, and every event still comes once, in order."""
    gateway = await gateways(**FAST)
    publisher = AsyncPublisher.from_url(redis_url)
    published = 0

    async def publish(count: int) -> None:
        nonlocal published
        for _ in range(count):
            published += 1
            await publisher.publish(event(1, published))

    try:
        for turns in (0, 1, 2, 3, 5, 8, 13, 40):
            async with Consumer(ws_url(gateway), token=token("*"), start="beginning") as bus:
                events = bus.events(1)
                for _ in range(turns):
                    await asyncio.sleep(0)
                readers = [bus.presence(1)]
                flow = asyncio.create_task(publish(10))
                for n in range(6):
                    for _ in range(turns % 4 + 1):
                        await asyncio.sleep(0)
                    if n % 2:
                        readers.append(bus.presence(1))
                    else:
                        await readers.pop().aclose()
                await flow
                got = []
                async with asyncio.timeout(20):
                    async for item in events:
                        assert isinstance(item, Delivery), item
                        got.append(item.seq)
                        if len(got) == published:
                            break
                assert got == list(range(1, published + 1)), turns
                assert bus.stats.duplicates >= 0 and bus.stats.resyncs == 0
    finally:
        await publisher.aclose()


async def test_a_drain_and_a_refresh_that_drops_a_project_keep_events_exact_and_presence_right(
    gateways, redis_url
):
    """Events of project 1 and presence of projects 1 and 2 (2 for presence only) on one
    connection, while events flow on both: the gateway drains (1012) and the consumer moves to
    the other pod; presence goes unknown and comes back as it is there; then a refreshed token
    that no longer allows project 2 raises Forbidden from its reader only. Every event of
    project 1 comes once, in order, never a Resync."""
    old, new = await gateways(**FAST), await gateways(**FAST)
    publisher = AsyncPublisher.from_url(redis_url)
    published = {1: 0, 2: 0}
    allowed: list = ["*"]

    async def publish(count: int) -> None:
        for _ in range(count):
            for project_id in (1, 2):
                published[project_id] += 1
                await publisher.publish(event(project_id, published[project_id]))

    def mint() -> str:
        return issue_token(SECRET, allowed[0], ttl=3)

    people: list[RecordingClient] = []
    try:
        people.append(await person(new, "ann"))
        await people[-1].subscribe(1)
        people.append(await person(new, "bob"))
        await people[-1].subscribe(2)
        policy = ReconnectPolicy(initial=0.05, max=0.2, prompt_max=0.05)
        urls = [ws_url(old), ws_url(new)]
        async with Consumer(urls, token=mint, start="beginning", reconnect=policy) as bus:
            events = bus.events(1)
            one, two = bus.presence(1), bus.presence(2)
            await views_until(one, lambda v: ids(v) == ["ann"])
            await views_until(two, lambda v: ids(v) == ["bob"])
            flow = asyncio.create_task(publish(30))
            await asyncio.sleep(0.05)
            await old.drain()
            await views_until(one, lambda v: v.members is None)
            back = await views_until(one, lambda v: v.known)  # from the other pod
            assert ids(back) == ["ann"] and not back.change
            await flow
            assert bus.members(1) is not None and [m.id for m in bus.members(1)] == ["ann"]
            assert [m.id for m in bus.members(2)] == ["bob"]
            assert 1012 in bus.close_codes
            # The next refresh (3-second tokens) no longer allows project 2.
            allowed[0] = [1]
            with pytest.raises(Forbidden):
                async with asyncio.timeout(10):
                    async for _view in two:
                        pass
            await publish(5)
            people.append(await person(new, "cat"))
            await people[-1].subscribe(1)
            await views_until(one, lambda v: ids(v) == ["ann", "cat"])
            got = []
            async with asyncio.timeout(20):
                async for item in events:
                    assert isinstance(item, Delivery), item
                    got.append(item.seq)
                    if len(got) == published[1]:
                        break
            assert got == list(range(1, published[1] + 1))
            assert bus.stats.resyncs == 0
    finally:
        for client in people:
            await client.close()
        await publisher.aclose()


async def wait_for_stat(bus: Consumer, name: str, at_least: int, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while getattr(bus.stats, name) < at_least:  # noqa: ASYNC110 - a counter
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("presence_fails", [False, True])
async def test_a_project_whose_metadata_turns_unreadable_resumes_exactly_once_when_repaired(
    gateways, redis_url, presence_fails
):
    """The gateway's periodic check finds project 1's metadata in Redis unreadable and ends its
    subscriptions (``error`` ``unavailable``, ``"ended": true``); project 2 goes on. The consumer
    follows 1's events and presence: its subscribe is retried (refused while the metadata stays
    unreadable, on the subscribe's backoff), and once the metadata is repaired every event of
    project 1 comes once, in order, on the same connection, never a Resync; its presence comes
    back. ``presence_fails``: the gateway's presence reads fail meanwhile (Redis did not answer
    them), each after a ``subscribed``: presence's retries and the subscription's end mix."""
    import redis.asyncio

    from schemas.keys import Keys

    gateway = await gateways(reconcile_interval=0.2, **FAST)
    failing = [presence_fails]
    read_presence = gateway.presence.subscribe

    async def presence_read(session, project_id):
        if failing[0]:
            raise TimeoutError  # (as when Redis does not answer within --subscribe-timeout)
        return await read_presence(session, project_id)

    gateway.presence.subscribe = presence_read
    publisher = AsyncPublisher.from_url(redis_url)
    published = {1: 0, 2: 0}

    async def publish(project_id: int, count: int) -> None:
        for _ in range(count):
            published[project_id] += 1
            await publisher.publish(event(project_id, published[project_id]))

    async def read(events, count: int) -> list[int]:
        got: list[int] = []
        async with asyncio.timeout(20):
            async for item in events:
                assert isinstance(item, Delivery), item
                got.append(item.seq)
                if len(got) == count:
                    return got
        raise AssertionError("the events ended")

    raw = redis.asyncio.Redis.from_url(redis_url)
    watcher = await person(gateway, "watcher")
    policy = ReconnectPolicy(initial=0.05, max=0.4)
    try:
        await watcher.subscribe(1)
        await publish(1, 3)
        await publish(2, 2)
        async with Consumer(
            ws_url(gateway), token=token("*"), start="beginning", reconnect=policy
        ) as bus:
            events, other = bus.events(1), bus.events(2)
            presence = bus.presence(1)
            if presence_fails:
                await wait_for_stat(bus, "unavailable", 3)  # presence's reads, retried
            else:
                await views_until(presence, lambda v: ids(v) == ["watcher"])
            assert await read(events, 3) == [1, 2, 3]
            assert await read(other, 2) == [1, 2]
            unavailable = bus.stats.unavailable
            seq = await raw.hget(Keys().meta(1), "seq")
            await raw.hset(Keys().meta(1), "seq", "garbage")  # (not written by the event bus)
            if not presence_fails:
                await views_until(presence, lambda v: v.members is None)  # the subscription ended
            await publish(2, 2)  # the others go on
            assert await read(other, 2) == [3, 4]
            # Ended, then refused again while it stays unreadable.
            await wait_for_stat(bus, "unavailable", unavailable + 3)
            await raw.hset(Keys().meta(1), "seq", seq)  # repaired
            failing[0] = False
            await watcher.subscribe(1)  # (its subscription ended too, and its listing with it)
            await publish(1, 4)
            assert await read(events, 4) == [4, 5, 6, 7]
            await views_until(presence, lambda v: ids(v) == ["watcher"])
            await publish(1, 1)
            assert await read(events, 1) == [8]
            held = await history(redis_url, [1])
            assert [s for (_epoch, s, _blocker) in held[1]] == list(range(1, 9))
            assert bus.stats.resyncs == 0 and bus.connects == 1
    finally:
        await watcher.close()
        await raw.aclose()
        await publisher.aclose()
