"""The tags the SNAPSHOT script names (schemas.lua) and the cursors a poll page and a subscribe
name from them, against a real Redis: for every cursor (behind, at and ahead of the top; with
the tag of the event the client has there, another event's, or none), every page size and byte
bound, over a history that a failover rewrote, retention trimmed, and another writer left a
foreign entry in, the tag a page or a resync or ``subscribed`` names is that of the entry Redis
holds at its cursor (the next poll's ``after``), computed from the stored bytes as a client
computes it from what it received."""

from __future__ import annotations

import redis.asyncio

from gateway.sequencing import plan_poll, plan_subscription
from gateway.store import HistoryStore
from schemas.keys import Keys
from schemas.tags import event_tag
from tests.support.failover import failover
from tests.support.gateway_client import publish

KEYS = Keys()
PROJECT = 61


async def test_every_cursor_a_page_or_a_subscribe_names_carries_the_stored_events_tag(
    redis_url, publisher
):
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await publish(publisher, PROJECT, 8)
        failover(redis_url, PROJECT, keep=5)  # 6..8 lost; their numbers go to other events
        await publish(publisher, PROJECT, 6)  # 6..11
        stream = KEYS.stream(PROJECT)
        await client.xtrim(stream, minid="3-0")  # retention: 1 and 2 are gone
        # Another writer's value in place of event 9 (the stream is rebuilt to rewrite it).
        entries = await client.xrange(stream)
        await client.delete(stream)
        for entry_id, fields in entries:
            if entry_id == b"9-0":
                fields = {b"f": b'{"not":"an event"}'}
            await client.xadd(stream, fields, id=entry_id)
        stored = {int(i.split(b"-")[0]): f[b"f"] for i, f in await client.xrange(stream)}
        store = HistoryStore(client, KEYS)
        cursor = await store.snapshot(PROJECT)
        epoch, top = cursor.epoch, cursor.top
        assert top == 11

        def truth(seq: int) -> str | None:
            return event_tag(stored[seq]) if seq in stored else None

        assert cursor.top_tag == truth(top)
        old = event_tag(b"an event a failover lost")
        for after in range(0, top + 2):
            for tag in {truth(after), old, None} if after else {None}:
                for limit in (1, 3, 100):
                    for max_bytes in (0, 1, 200):
                        snapshot = await store.snapshot(
                            PROJECT, epoch, after, limit, max_bytes=max_bytes
                        )
                        where = (after, tag, limit, max_bytes)
                        assert snapshot.top_tag == truth(top), where
                        if 1 <= after <= top:
                            assert snapshot.after_tag == truth(after), where
                        plan = plan_poll(epoch, after, snapshot, limit, tag)
                        if plan.resync is not None:
                            assert plan.resync.seq == top and plan.resync.tag == truth(top)
                            assert plan.tag == truth(top), where
                        else:
                            nxt = plan.events[-1][0] if plan.events else after
                            assert plan.tag in (None, truth(nxt)), (where, plan)
                        sub = plan_subscription(epoch, after, snapshot, limit, tag)
                        assert sub.seq == top and sub.tag in (None, truth(top)), where
                        if sub.resync is not None:
                            assert sub.resync.tag in (None, truth(top)), where
        # A poll without a cursor, and one of another epoch: named at the top.
        for snapshot, plan_epoch in (
            (await store.snapshot(PROJECT), None),
            (await store.snapshot(PROJECT, "other", 3, 10), "other"),
        ):
            plan = plan_poll(plan_epoch, None if plan_epoch is None else 3, snapshot, 10)
            assert plan.tag == truth(top)
    finally:
        await client.aclose()
