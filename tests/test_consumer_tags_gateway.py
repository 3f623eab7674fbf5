"""Cursor tags end to end: the Python consumer against real ``python -m gateway`` processes on a
private redis-server (the session's, flushed for each test).

A Redis failover can lose the last events a client received, and the new master gives their
numbers to new events. Simulated here by restoring a project's keys (``DUMP``/``RESTORE``) to
what they were before the consumer's last event, then publishing another event: the entry at the
consumer's cursor is now a different event. A resume from the stored cursor must be
``Resync(history_lost)``, not a silent continuation after an event the history no longer has.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import redis.asyncio as aioredis

from consumer import Consumer, Delivery, FileCursorStore, MemoryCursorStore, Resync
from publisher import AsyncPublisher, issue_token
from schemas.events import BlockerResolved, utc_now
from schemas.keys import Keys
from schemas.protocol import ResyncReason
from schemas.tags import event_tag
from tests.support.gateway_process import GatewayProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

KEYS = Keys()
SECRET = "consumer-tags-secret-of-at-least-32-bytes!"


def token() -> str:
    return issue_token(SECRET, [1], ttl=600, subject="consumer-tags-test")


def resolved(ident: int, answer: str = "ok") -> BlockerResolved:
    return BlockerResolved(project_id=1, blocker_id=ident, answer=answer, resolved_at=utc_now())


async def collect(subscription, count: int, within: float = 20.0) -> list:
    items: list = []
    async with asyncio.timeout(within):
        async for item in subscription:
            items.append(item)
            if len(items) == count:
                break
    return items


class Failover:
    """Snapshots of project 1's keys in Redis, restored to simulate a new master that never got
    what was published after the snapshot."""

    def __init__(self, redis_url: str) -> None:
        self.client = aioredis.Redis.from_url(redis_url)
        self.dumps: dict[str, bytes | None] = {}

    async def snapshot(self) -> None:
        for key in (KEYS.meta(1), KEYS.stream(1)):
            self.dumps[key] = await self.client.dump(key)

    async def lose_what_followed(self) -> None:
        for key, dump in self.dumps.items():
            await self.client.delete(key)
            if dump is not None:
                await self.client.restore(key, 0, dump, replace=True)

    async def frame_at(self, seq: int) -> bytes:
        entries = await self.client.xrange(KEYS.stream(1), f"{seq}-0", f"{seq}-0")
        return entries[0][1][b"f"]

    async def aclose(self) -> None:
        await self.client.aclose()


@pytest.mark.parametrize(
    ("store_kind", "new_gateway"),
    [("file", True), ("memory", False)],
    ids=["file-store-new-gateway", "memory-store-same-gateway"],
)
async def test_a_resume_from_an_event_a_failover_replaced_is_history_lost(
    redis_url, tmp_path, store_kind: str, new_gateway: bool
):
    """The consumer received event 6 and saved its cursor; a failover lost event 6 and numbered
    another one 6. Resuming (a restarted consumer, from its store: with a gateway started after
    the failover, or the same one, which followed the project before it) is
    Resync(history_lost) to the new top, with its tag, then the events after it; before tags it
    went on silently after an event the history no longer has (the new 6 never delivered)."""
    store = FileCursorStore(tmp_path / "c.json") if store_kind == "file" else MemoryCursorStore()
    publisher = AsyncPublisher.from_url(redis_url)
    failover = Failover(redis_url)
    with contextlib.ExitStack() as gateways:
        try:
            gateway = gateways.enter_context(GatewayProcess(redis_url, auth_secret=SECRET))
            async with Consumer(gateway.ws_url, token=token, store=store) as bus:
                subscription = bus.events(1)
                await asyncio.wait_for(subscription.wait_subscribed(), 20)
                for ident in range(1, 6):
                    await publisher.publish(resolved(ident))
                await failover.snapshot()  # what the replica has: events 1..5
                await publisher.publish(resolved(6, "the event the failover loses"))
                async with subscription:
                    items = await collect(subscription, 6)
            assert [i.seq for i in items] == [1, 2, 3, 4, 5, 6]
            lost = items[-1]
            assert lost.cursor.tag == event_tag(await failover.frame_at(6))
            saved = await store.load(1)
            assert saved == lost.cursor and saved.tag == lost.cursor.tag
            if new_gateway:
                gateways.close()

            # The failover: the new master lacks event 6; the next publish is numbered 6 too.
            await failover.lose_what_followed()
            await publisher.publish(resolved(60, "another event numbered 6"))
            await publisher.publish(resolved(61))
            assert event_tag(await failover.frame_at(6)) != saved.tag

            if new_gateway:
                gateway = gateways.enter_context(GatewayProcess(redis_url, auth_secret=SECRET))
            async with Consumer(gateway.ws_url, token=token, store=store) as bus:
                async with bus.events(1) as subscription:
                    (resync,) = await collect(subscription, 1)
                    await publisher.publish(resolved(62))
                    (after,) = await collect(subscription, 1)
            top_tag = event_tag(await failover.frame_at(7))
        finally:
            await publisher.aclose()
            await failover.aclose()
    assert isinstance(resync, Resync), resync
    assert resync.reason == ResyncReason.HISTORY_LOST
    assert (resync.epoch, resync.seq, resync.tag) == (saved.epoch, 7, top_tag)
    # Nothing after the replaced event is taken silently: deliveries continue after the resync.
    assert isinstance(after, Delivery) and after.seq == 8
    assert (await store.load(1)).tag == event_tag(after.raw)


async def test_a_resume_of_the_same_history_with_tags_is_no_resync(redis_url, tmp_path):
    """The tag the consumer computes from the frame it received is the gateway's: a resume of
    an untouched history, with the tag, is honoured (no false history_lost), by WebSocket
    replay and by catch-up pages (with ``tag=``, which a gateway with tags accepts)."""
    store = FileCursorStore(tmp_path / "c.json")
    publisher = AsyncPublisher.from_url(redis_url)
    try:
        with GatewayProcess(redis_url, auth_secret=SECRET, args=["--max-replay", "10"]) as gateway:
            async with Consumer(gateway.ws_url, token=token, store=store) as bus:
                subscription = bus.events(1)
                await asyncio.wait_for(subscription.wait_subscribed(), 20)
                await publisher.publish(resolved(1))
                async with subscription:
                    first = await collect(subscription, 1)
            assert (await store.load(1)).tag == first[0].cursor.tag is not None
            for ident in range(2, 6):  # a replay's worth
                await publisher.publish(resolved(ident))
            async with Consumer(gateway.ws_url, token=token, store=store) as bus:
                async with bus.events(1) as subscription:
                    replayed = await collect(subscription, 4)
            for ident in range(6, 40):  # more than one replay: read by pages
                await publisher.publish(resolved(ident))
            async with Consumer(gateway.ws_url, token=token, store=store) as bus:
                async with bus.events(1) as subscription:
                    paged = await collect(subscription, 34)
                assert bus.stats.catch_ups == 1
                assert not bus._untagged_pages  # the pages' tag= was accepted
    finally:
        await publisher.aclose()
    items = first + replayed + paged
    assert all(isinstance(i, Delivery) for i in items), [i for i in items if type(i) is Resync]
    assert [i.seq for i in items] == list(range(1, 40))
    assert bus.stats.resyncs == 0
