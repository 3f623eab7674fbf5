"""A connection joining a feed across a failover (gateway/hub.py, gateway/sequencing.py), without
sockets or Redis: the connection's own read and the feed's knowledge disagree about the history,
and what the connection receives after ``subscribed`` must still follow on from where it was
told it stands, or be an explicit resync.

Driven through the hub with the tagged model of Redis of tests/test_hub_cursor_tags_property.py
(retention trims, a failover loses the last events and hands their numbers to other ones).
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.hub import Hub
from gateway.metrics import Metrics
from schemas.tags import event_tag
from tests.test_hub import FakeLink
from tests.test_hub_cursor_tags_property import CHANNEL, KEYS, PROJECT, Client, ModelRedis


class GatedRedis(ModelRedis):
    """A :class:`ModelRedis` whose reads, while ``holding``, answer (what Redis held when they
    were sent) only when the test sets their gate, in ``gates``."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = False
        self.gates: list[asyncio.Event] = []

    async def snapshot(self, project_id, epoch=None, after=None, limit=0, max_bytes=0):
        gate = None
        if self.holding:
            gate = asyncio.Event()
            self.gates.append(gate)
        snapshot = await super().snapshot(project_id, epoch, after, limit, max_bytes)
        if gate is not None:
            await gate.wait()
        return snapshot


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


@pytest.mark.parametrize("before", [0, 1], ids=["none-before", "one-before"])
@pytest.mark.parametrize("feed_read", ["none", "before-the-failover", "after-the-failover"])
async def test_a_client_told_history_lost_behind_a_feed_that_missed_the_failover_gets_every_event(
    before: int, feed_read: str
):
    """Seed 199 of the interleavings walk (60 steps). Retention trimmed the whole stream at 22,
    so the feed, which started there, knows no tag for its ``last`` (22). A failover loses 21
    and 22 while the pod's pub/sub link is down. A client at the old 22 resumes: its read finds
    the top at 20 and tells it ``history_lost`` there, ``subscribed`` at 20; the feed, still at
    22, counted as caught up with it. The new master publishes 21', 22', 23': the feed takes
    21' and 22' for events it delivered already (no tag to compare 22' with) and delivered 23'
    to the client at 20. Now the connection's read proves the feed's 22 lost: the feed resyncs
    everyone (``history_lost``), and the client gets nothing from it before that.

    ``before``: new events published before the client's read (its top is then 21, still
    behind the feed); ``feed_read``: the feed's own read (the link came back), sent before or
    after the failover, is still in flight when the connection goes live and answers after
    the new events arrived live (held meanwhile)."""
    redis = GatedRedis()
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

    async def feed_reads() -> None:
        redis.holding = True
        hub.on_link_resubscribed()
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(redis.gates) == 1
        redis.holding = False

    if feed_read == "before-the-failover":
        await feed_reads()
    redis.failover(2)  # top 20, the pub/sub link down: nothing on the channel
    for _ in range(before):
        redis.publish()  # not relayed: the link is down
    if feed_read == "after-the-failover":
        await feed_reads()
    second = Client(hub, sse=False, cursor=(redis.epoch, 22, old))
    await hub.subscribe(second.session, PROJECT, redis.epoch, 22, old)
    for _ in range(3 - before):  # the link is back: the others arrive live
        hub.on_pubsub_message(CHANNEL, redis.publish())
    for gate in redis.gates:
        gate.set()
    await settle(hub)
    record = [(kind, seq) for kind, _, seq, _, _ in second.record()]
    told = 20 + before
    assert record[:2] == [("resync_required", told), ("subscribed", told)], record
    assert problems(second, redis) == [], record
    # Both end at the top; the first one, which had the lost 22, was told so.
    assert record[-1][1] == 23, record
    first_record = [(kind, seq) for kind, _, seq, _, _ in first.record()]
    assert problems(first, redis) == [], first_record
    assert first_record[-1][1] == 23, first_record
    assert "resync_required" in [kind for kind, _ in first_record], first_record
