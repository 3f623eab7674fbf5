"""Property: whatever the interleaving of publishes, lost and late live messages (also during the
feed's first read), Redis flushes, periodic checks and subscribes (fresh or resuming, inside, at
the edge of or outside the window), every connection's record is gapless and exactly-once from
its starting point, with explicit resyncs only when the history really moved (a new epoch) or the
cursor is too far behind, and ends at the project's top; every cursor the gateway names carries
the tag of its event. Driven through the hub with a model of Redis, so the window answers some
subscribes and reads answer the others. After every step, the frames a history read would take
without checking them again (Hub.checked_frames) are the window's own, at their seqs, of its
epoch, each passing the frame check for this project and that seq."""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.hub import Hub
from gateway.metrics import Metrics
from gateway.sequencing import Snapshot
from schemas.keys import Keys
from schemas.stored import ForeignKind, Meta, check_frame
from schemas.tags import event_tag
from tests.test_hub import FakeLink, session_of

KEYS = Keys()
PROJECT = 3
CHANNEL = KEYS.channel(PROJECT).encode()


def frame(epoch: str, seq: int) -> bytes:
    return b'{"type":"x","project_id":%d,"e":"%s","seq":%d}' % (PROJECT, epoch.encode(), seq)


def tag_at(epoch: str | None, after: int | None) -> str | None:
    """The tag a client holding ``(epoch, after)`` sends: that of the event it received there
    (none before the first event). No failover here, so a tag never justifies a resync."""
    return event_tag(frame(epoch, after)) if epoch is not None and after else None


class ModelRedis:
    """One project's history: its epoch and events 1..top; a flush starts a new epoch."""

    def __init__(self) -> None:
        self.epochs = (f"ep{n}" for n in itertools.count())
        self.epoch = next(self.epochs)
        self.top = 0

    def flush(self) -> None:
        self.epoch, self.top = next(self.epochs), 0

    async def snapshot(self, project_id, epoch=None, after=None, limit=0) -> Snapshot:
        entries = ()
        if epoch == self.epoch and after is not None and 0 <= after < self.top:
            last = self.top if not limit else min(self.top, after + limit)
            entries = tuple((s, frame(self.epoch, s)) for s in range(after + 1, last + 1))
        # The tags Redis names (schemas.tags): of the top, and of the event at the cursor.
        top_tag = event_tag(frame(self.epoch, self.top)) if self.top else None
        after_tag = None
        if epoch == self.epoch and after is not None and 1 <= after <= self.top:
            after_tag = event_tag(frame(self.epoch, after))
        # Taken now, answered after a round trip: events published meanwhile are not in it.
        snapshot = Snapshot(self.epoch, self.top, entries, top_tag=top_tag, after_tag=after_tag)
        await asyncio.sleep(0)
        return snapshot

    async def cursors(self, project_ids, keep_alive=(), make_permanent=()):
        return [Meta(self.epoch, self.top) for _ in project_ids]


operation = st.one_of(
    st.tuples(st.just("publish"), st.sampled_from(["live", "live", "lost", "late"])),
    st.tuples(st.just("deliver_late"), st.integers(0, 5)),
    st.tuples(st.just("subscribe"), st.integers(-3, 12)),
    # A reconnect storm: three clients resume at one cursor in a row (the first one's replay is
    # the window's memo, sent as it is to the next ones until the window changes). The cursor
    # is a seq, not a distance from the top: storms before and after a change of the window
    # (an event, an eviction, a flush) resume at the same cursor.
    st.tuples(st.just("storm"), st.integers(0, 8)),
    st.tuples(st.just("storm"), st.integers(0, 8)),
    st.tuples(st.just("flush"), st.just(0)),
    st.tuples(st.just("reconcile"), st.just(0)),
    st.tuples(st.just("run"), st.integers(1, 4)),
)


@settings(max_examples=150, deadline=None)
# A storm's replay kept as the window's memo, then an event, then a storm at the same cursor:
# its clients get the event too (the memo built before it must not answer them).
@example(
    ops=[("publish", "live")] * 5 + [("storm", 3), ("publish", "live"), ("storm", 3)],
    window_events=6,
    max_replay=10,
    window_bytes=1 << 20,
)
# The feed's first read done, then events into the window: what a read parsed then would skip
# the frame check for is the window's frame at each seq (check_checked_frames).
@example(
    ops=[("run", 2)] + [("publish", "live")] * 3 + [("run", 1)],
    window_events=6,
    max_replay=10,
    window_bytes=1 << 20,
)
@given(
    ops=st.lists(operation, max_size=40),
    window_events=st.integers(0, 6),
    max_replay=st.integers(2, 10),
    # The pod's byte budget for windows: none to speak of, a few entries (evicting, and leaving
    # a replay's memo no room, or just room), or plenty. A resume answered from the window's
    # memo (the replay built for an earlier client at the same cursor) is checked as any other.
    window_bytes=st.sampled_from([1 << 20, 1 << 20, 0, 300, 700, 1200, 2000]),
)
def test_every_record_is_gapless_exactly_once_and_ends_at_the_top(
    ops, window_events, max_replay, window_bytes
):
    asyncio.run(scenario(ops, window_events, max_replay, window_bytes))


async def scenario(ops, window_events: int, max_replay: int, window_bytes: int = 1 << 20) -> None:
    redis = ModelRedis()
    hub = Hub(
        keys=KEYS,
        store=redis,
        metrics=Metrics(),
        max_replay=max_replay,
        subscribe_timeout=5,
        window_events=window_events,
        window_bytes=window_bytes,
    )
    hub.link = FakeLink()
    late: list[bytes] = []
    starts = []  # (session, epoch, after) as subscribed
    tasks = []

    def live(message: bytes) -> None:
        hub.on_pubsub_message(CHANNEL, message)

    # The pod starts following the project as the interleaving starts: events published while
    # its first read is in flight are held and delivered after it, and the subscribes made
    # meanwhile join it. Afterwards most subscribes are answered from the window.
    keeper = session_of(hub)
    starts.append((keeper, None, None))
    tasks.append(asyncio.create_task(hub.subscribe(keeper, PROJECT, None, None)))
    await asyncio.sleep(0)
    for op, arg in ops:
        if op == "publish":
            redis.top += 1
            message = b"%s|%d|0|%s" % (
                redis.epoch.encode(),
                redis.top,
                frame(redis.epoch, redis.top),
            )
            if arg == "live":
                live(message)
            elif arg == "late":
                late.append(message)
        elif op == "deliver_late" and late:
            live(late.pop(arg % len(late)))
        elif op == "subscribe":
            session = session_of(hub)
            if arg < 0:
                epoch, after = None, None  # fresh
            elif arg == 11:
                epoch, after = "ep-unknown", 1
            else:
                epoch, after = redis.epoch, max(0, redis.top - arg)
            starts.append((session, epoch, after))
            tag = tag_at(epoch, after)
            tasks.append(asyncio.create_task(hub.subscribe(session, PROJECT, epoch, after, tag)))
            await asyncio.sleep(0)  # its synchronous part (registration, a window answer) runs
        elif op == "storm":
            epoch, after = redis.epoch, min(arg, redis.top)
            for _ in range(3):
                session = session_of(hub)
                starts.append((session, epoch, after))
                tag = tag_at(epoch, after) if arg % 2 else None  # with and without tags
                tasks.append(
                    asyncio.create_task(hub.subscribe(session, PROJECT, epoch, after, tag))
                )
            await asyncio.sleep(0)
        elif op == "flush":
            redis.flush()
        elif op == "reconcile":
            await hub.reconcile()
        elif op == "run":
            for _ in range(arg):
                await asyncio.sleep(0)
        check_checked_frames(hub)
    # Settle: late messages arrive, subscribes finish, the periodic check finds what was lost.
    for message in late:
        live(message)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    for _ in range(4):
        for _ in range(10):
            await asyncio.sleep(0)
        await hub.reconcile()
    for _ in range(20):
        await asyncio.sleep(0)
        feed = hub.feeds.get(PROJECT)
        if feed is None or (feed.reader is None or feed.reader.done()):
            break
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    for session, epoch, after in starts:
        check_record(session, epoch, after, redis)


def check_checked_frames(hub: Hub) -> None:
    """What a history read parsed now would skip the frame check for (Hub.checked_frames): at
    every seq it names, the frame the window holds there, of the window's epoch, which passed
    the check for this project and that seq. A read's entry of the same bytes is then one the
    check passes too."""
    checked = hub.checked_frames(PROJECT)
    feed = hub.feeds.get(PROJECT)
    if checked is None:
        assert feed is None or not feed.window.entries or feed.window.epoch is None
        return
    window = feed.window
    assert checked.epoch == window.epoch and checked.last == window.last
    assert window.lo <= checked.lo <= checked.last
    held = {seq: item.payload for seq, item, _ in window.entries}
    for seq in range(checked.lo, checked.last + 1):
        frame_ = checked.frame_at(seq)
        assert frame_ is held[seq] and frame_ == frame(window.epoch, seq)
        check_frame(frame_, ForeignKind.STREAM_ENTRY, PROJECT, seq)


def check_record(session, epoch, after, redis: ModelRedis) -> None:
    """Events follow on one by one from the client's position; ``resync_required`` and
    ``subscribed`` move it explicitly, and the tag they name, when they name one, is that of
    the event at their cursor (a client resumes with it); every event is the one the history
    holds at that number in the client's epoch; the record ends at the project's top."""
    import json

    for message in session.transport.messages():
        if message["type"] in ("resync_required", "subscribed") and message.get("tag"):
            assert message["tag"] == tag_at(message["epoch"], message["seq"]), message

    position = (epoch, after) if epoch is not None and after is not None else None
    for message in session.transport.messages():
        kind = message["type"]
        if kind == "x":
            assert position is not None, "an event before any starting point"
            assert message["e"] == position[0] and message["seq"] == position[1] + 1, (
                message,
                position,
            )
            position = (position[0], message["seq"])
        elif kind == "resync_required":
            # The model never trims nor rewrites: a new epoch (a flush, or a cursor of an epoch
            # unknown to the pod) and a cursor too far behind are the only reasons there are.
            assert message["reason"] in ("epoch_changed", "too_far_behind"), message
            if message["reason"] == "too_far_behind":
                assert position is not None and message["seq"] - position[1] > 0, message
            position = (message["epoch"], message["seq"])
        elif kind == "subscribed":
            if message["resumed"]:
                assert position == (message["epoch"], message["seq"]), (message, position)
            position = (message["epoch"], message["seq"])
        else:
            raise AssertionError(json.dumps(message))
    assert position == (redis.epoch, redis.top), (position, redis.epoch, redis.top)
