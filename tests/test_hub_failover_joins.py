"""A connection joining a feed across a failover (gateway/hub.py, gateway/sequencing.py), without
sockets or Redis: the connection's own read and the feed's knowledge disagree about the history,
and what the connection receives after ``subscribed`` must still follow on from where it was
told it stands, or be an explicit resync.

Driven through the hub with the tagged model of Redis of tests/test_hub_cursor_tags_property.py
(retention trims, a failover loses the last events and hands their numbers to other ones).
"""

from __future__ import annotations

import asyncio

from gateway.hub import Hub
from gateway.metrics import Metrics
from schemas.tags import event_tag
from tests.test_hub import FakeLink
from tests.test_hub_cursor_tags_property import CHANNEL, KEYS, PROJECT, Client, ModelRedis


def problems(client: Client, redis: ModelRedis) -> list[str]:
    """Where a connection's record breaks the promise: an event that is not the one right after
    the cursor it was last named (by an event, a ``resync_required`` or ``subscribed``), or not
    the event Redis now holds there."""
    out = []
    cursor: tuple[str, int] | None = None
    for kind, epoch, seq, _, message in client.record():
        if kind == "x":
            if cursor is not None and (epoch, seq) != (cursor[0], cursor[1] + 1):
                out.append(f"event {epoch}:{seq} after {cursor}")
            elif epoch == redis.epoch and redis.events.get(seq) is not None:
                if message["v"] != redis.version and seq > redis.top - 3:
                    out.append(f"event {epoch}:{seq} of version {message['v']}, lost")
        cursor = (epoch, seq)
    return out


async def settle(hub: Hub) -> None:
    for _ in range(4):
        for _ in range(10):
            await asyncio.sleep(0)
        await hub.reconcile()
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_connection_told_history_lost_behind_a_feed_that_missed_the_failover_gets_every_event():
    """Seed 199 of the interleavings walk (60 steps). Retention trimmed the whole stream at 22,
    so the feed, which started there, knows no tag for its ``last`` (22). A failover loses 21
    and 22 while the pod's pub/sub link is down. A client at the old 22 resumes: its read finds
    the top at 20 and tells it ``history_lost`` there, ``subscribed`` at 20; the feed, still at
    22, counted as caught up with it. The new master publishes 21', 22', 23': the feed takes
    21' and 22' for events it delivered already (no tag to compare 22' with) and delivers 23'.
    The client, at 20, must get 21', 22' and 23' (or be told to resync), never 23' alone."""
    redis = ModelRedis()
    hub = Hub(
        keys=KEYS,
        store=redis,
        metrics=Metrics(),
        max_replay=20,
        subscribe_timeout=5,
        window_events=4,
    )
    hub.link = FakeLink()
    for _ in range(22):
        redis.publish()
    old = event_tag(redis.events[22])
    redis.trim(22)  # the stream is empty, its top still 22
    first = Client(hub, sse=False, cursor=None)
    await hub.subscribe(first.session, PROJECT, None, None)  # the feed's baseline: 22, no tag
    redis.failover(2)  # top 20, the pub/sub link down: nothing on the channel
    second = Client(hub, sse=False, cursor=(redis.epoch, 22, old))
    await hub.subscribe(second.session, PROJECT, redis.epoch, 22, old)
    for _ in range(3):  # the link is back: 21', 22', 23' arrive live
        hub.on_pubsub_message(CHANNEL, redis.publish())
    await settle(hub)
    record = [(kind, seq) for kind, _, seq, _, _ in second.record()]
    assert record[:2] == [("resync_required", 20), ("subscribed", 20)], record
    assert problems(second, redis) == [], record
    # It ends at the top, on the new history's event.
    assert record[-1] == ("x", 23), record
