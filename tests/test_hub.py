"""The hub's write path, without sockets or Redis: which frames each connection gets, in order.

The hub queues a project's live frames once per event-loop iteration for all its live
subscribers (see :mod:`gateway.hub`). These tests drive it message by message with a fake history
store and fake connections, so that the interleavings that real timing makes rare happen every
time: a subscriber that catches up (and goes live) in the very iteration whose frames are
already queued for the others.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json

import pytest
from structlog.testing import capture_logs
from websockets.protocol import State

from gateway.hub import Feed, Hub
from gateway.metrics import Metrics
from gateway.sequencing import Snapshot
from gateway.session import SlowConsumerPolicy
from gateway.store import ProjectUnreadable, StoreUnavailable
from gateway.websocket import WebSocketSession as Session
from schemas.history import parse_snapshot_reply
from schemas.keys import Keys
from schemas.stored import Meta
from schemas.tags import event_tag

KEYS = Keys()
PROJECT = 1
EPOCH = "e0000000000001"


def frame(seq: int, project_id: int = PROJECT) -> bytes:
    """A frame as the publish script stores it: the project first, the seq last."""
    return b'{"type":"x","project_id":%d,"seq":%d}' % (project_id, seq)


class FakeStore:
    """The project's history as the hub's reads see it: entries 1..top (every project has the
    same history). ``gate``, when set, holds each read's answer (taken at the call) until it is
    set; ``unreadable`` projects have foreign metadata."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.reads = 0
        self.gate: asyncio.Event | None = None
        self.unreadable: set[int] = set()

    async def snapshot(self, project_id, epoch=None, after=None, limit=0) -> Snapshot:
        self.reads += 1
        if project_id in self.unreadable:
            raise ProjectUnreadable(project_id, KEYS.meta(project_id), "has an invalid seq")
        entries = ()
        if epoch == EPOCH and after is not None and after < self.top:
            last = self.top if not limit else min(self.top, after + limit)
            entries = tuple((s, frame(s, project_id)) for s in range(after + 1, last + 1))
        snapshot = Snapshot(EPOCH, self.top, entries)
        if self.gate is not None:
            await self.gate.wait()
        return snapshot

    async def cursors(self, project_ids, keep_alive=(), make_permanent=()):
        return [
            ProjectUnreadable(p, KEYS.meta(p), "has an invalid seq")
            if p in self.unreadable
            else Meta(EPOCH, self.top)
            for p in project_ids
        ]


class FakeLink:
    async def subscribe(self, channel: bytes) -> None:
        pass

    async def unsubscribe(self, channel: bytes) -> None:
        pass


class RecordingTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.data += data

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        self.aborted = True

    def messages(self) -> list[dict]:
        """The server-to-client text frames written so far (unmasked, short)."""
        out, data, i = [], bytes(self.data), 0
        while i < len(data):
            assert data[i] == 0x81
            length, start = data[i + 1], i + 2
            if length == 126:
                length, start = int.from_bytes(data[i + 2 : i + 4], "big"), i + 4
            out.append(json.loads(data[start : start + length]))
            i = start + length
        return out


class FakeConnection:
    def __init__(self) -> None:
        self.transport = RecordingTransport()
        self.protocol = self
        self.state = State.OPEN
        self.extensions: list = []


async def hub_with(store: FakeStore, **options) -> Hub:
    hub = Hub(
        keys=KEYS, store=store, metrics=Metrics(), max_replay=1000, subscribe_timeout=5, **options
    )
    hub.link = FakeLink()
    return hub


def session_of(hub: Hub) -> Session:
    return Session(FakeConnection(), SlowConsumerPolicy(1 << 20, 30), hub.schedule_flush, raw=True)


def live(hub: Hub, *seqs: int, project: int = PROJECT) -> None:
    """Deliver pub/sub messages, all in one event-loop iteration."""
    channel = KEYS.channel(project).encode()
    for seq in seqs:
        message = b"%s|%d|0|%s" % (EPOCH.encode(), seq, frame(seq, project))
        hub.on_pubsub_message(channel, message)


async def until(predicate, within: float = 2.0) -> None:
    """Let the event loop run until ``predicate()`` holds, checked every millisecond (the hub's
    reader pauses briefly between reads that make no progress), at most ``within`` seconds."""
    for _ in range(int(within * 1000)):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not reached")


async def reader_done(hub: Hub, project: int = PROJECT) -> None:
    feed = hub.feeds[project]
    await until(lambda: feed.reader is None or feed.reader.done())


def received(session: Session) -> list:
    """What one connection was sent: event seqs, and the types of other messages."""
    return [m["seq"] if m["type"] == "x" else m["type"] for m in session.transport.messages()]


async def next_iteration() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def live_subscribers(count: int) -> tuple[Hub, list[Session]]:
    """A hub over an empty history and ``count`` connections live on the project."""
    hub = await hub_with(FakeStore(top=0))
    sessions = [session_of(hub) for _ in range(count)]
    for session in sessions:
        await hub.subscribe(session, PROJECT, None, None)
    await next_iteration()
    return hub, sessions


async def test_a_subscriber_that_catches_up_mid_iteration_gets_each_frame_once() -> None:
    store = FakeStore(top=3)
    hub = await hub_with(store, window_events=0)  # every resume reads: no window to answer
    first = session_of(hub)
    await hub.subscribe(first, PROJECT, None, None)  # live from seq 3
    # The second one resumes from 0 and reads up to 5, which this pod has not relayed yet: it
    # stays joining until 4 and 5 arrive live, and 5 makes it live in the same iteration in
    # which 4 and 5 were queued for the first one.
    store.top = 5
    second = session_of(hub)
    await hub.subscribe(second, PROJECT, EPOCH, 0)
    await next_iteration()
    live(hub, 4, 5)
    await next_iteration()
    live(hub, 6)
    await next_iteration()
    assert received(first) == ["subscribed", 4, 5, 6]
    assert received(second) == [1, 2, 3, 4, 5, "subscribed", 6]


async def test_live_frames_of_one_iteration_are_one_write_shared_by_all_subscribers() -> None:
    hub, sessions = await live_subscribers(3)
    before = [len(s.transport.data) for s in sessions]
    live(hub, 1, 2, 3)
    await next_iteration()
    writes = {bytes(s.transport.data[n:]) for s, n in zip(sessions, before, strict=True)}
    assert len(writes) == 1  # the same bytes for everyone
    assert [m["seq"] for m in sessions[0].transport.messages()[1:]] == [1, 2, 3]
    assert hub.metrics.deliveries_total == 9


async def test_an_unsubscribe_takes_effect_for_frames_not_yet_written() -> None:
    hub, (staying, leaving) = await live_subscribers(2)
    live(hub, 1)
    hub.unsubscribe(leaving, PROJECT)
    await next_iteration()
    assert received(staying) == ["subscribed", 1]
    assert received(leaving) == ["subscribed"]


async def test_a_connection_whose_write_fails_does_not_hold_up_the_others() -> None:
    hub, sessions = await live_subscribers(3)

    def broken(data: bytes) -> None:
        raise RuntimeError("a transport in a state nobody foresaw")

    sessions[1].transport.write = broken
    live(hub, 1)
    await next_iteration()
    assert received(sessions[0]) == ["subscribed", 1]
    assert received(sessions[2]) == ["subscribed", 1]
    assert sessions[1].closing and sessions[1].transport.aborted


# --- Redis values the event bus did not write, and recovery reads (issue 11) ------------------


async def test_a_catch_up_asked_while_a_read_is_in_flight_runs_right_after_it() -> None:
    hub, (session,) = await live_subscribers(1)
    store = hub.store
    live(hub, 1, 2, 3)
    store.top = 3
    await next_iteration()
    feed = hub.feeds[PROJECT]
    store.gate = asyncio.Event()
    reads = store.reads
    hub.request_catch_up(feed)  # e.g. the pub/sub link came back
    await until(lambda: store.reads == reads + 1)  # this read is taken at top 3, and held
    # Event 4 is published and its live message lost, while that read (taken at top 3) is in
    # flight; the periodic check notices and asks for a catch-up.
    store.top = 4
    hub.request_catch_up(feed)
    store.gate.set()
    await reader_done(hub)
    await next_iteration()
    assert received(session) == ["subscribed", 1, 2, 3, 4]


async def test_a_forged_number_on_the_channel_costs_one_read_and_delays_nothing() -> None:
    hub, (session,) = await live_subscribers(1)
    store = hub.store
    reads = store.reads
    live(hub, 999_999)  # "<epoch>|999999|..." written to the channel by someone else
    await reader_done(hub)
    assert store.reads == reads + 1
    assert hub.metrics.foreign_values["channel_seq"] == 1
    store.top = 1
    live(hub, 1)
    await next_iteration()
    assert received(session) == ["subscribed", 1]
    assert store.reads == reads + 1


async def test_foreign_channel_messages_are_never_relayed_and_logged_once_per_channel() -> None:
    hub, (session,) = await live_subscribers(1)
    channel = KEYS.channel(PROJECT).encode()
    with capture_logs() as logs:
        hub.on_pubsub_message(channel, EPOCH.encode() + b"|1|0|{\xff\xfe}")  # not UTF-8
        hub.on_pubsub_message(channel, EPOCH.encode() + b"|1|0|[1]")  # not an object
        hub.on_pubsub_message(channel, b"garbage")
    await next_iteration()
    assert received(session) == ["subscribed"]
    assert hub.metrics.foreign_values["channel_message"] == 3
    assert hub.metrics.malformed_messages_total == 3
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["key"] == channel.decode()
    live(hub, 1)
    await next_iteration()
    assert received(session) == ["subscribed", 1]


async def test_an_unreadable_project_ends_its_subscriptions_and_spares_the_others() -> None:
    """Issue 11 #3: one bad meta key must not stop the catch-up check of every project."""
    store = FakeStore(top=0)
    hub = await hub_with(store)
    healthy, poisoned = session_of(hub), session_of(hub)
    await hub.subscribe(healthy, 1, None, None)
    await hub.subscribe(poisoned, 2, None, None)
    await next_iteration()
    store.unreadable.add(2)  # e.g. HSET eventbus:{2}:meta seq abc
    store.top = 1  # project 1's event 1 was published, its live message lost
    await hub.reconcile()  # suspicious: a top may be in flight
    await hub.reconcile()  # confirmed: caught up
    await reader_done(hub, 1)
    await next_iteration()
    assert received(healthy) == ["subscribed", 1]
    assert received(poisoned) == ["subscribed", "error"]
    error = poisoned.transport.messages()[-1]
    assert (error["code"], error["project_id"]) == ("unavailable", 2)
    # Says the subscription ended: a client cannot tell it by its place among the frames from
    # the `unavailable` of a failed presence read, which leaves the subscription standing.
    assert error.get("ended") is True
    assert 2 not in hub.feeds and 2 not in poisoned.projects


async def test_subscribing_to_an_unreadable_project_is_an_explicit_error() -> None:
    store = FakeStore(top=0)
    store.unreadable.add(1)
    hub = await hub_with(store)
    session = session_of(hub)
    await hub.subscribe(session, 1, None, None)  # the feed's first read fails and tells it
    await next_iteration()
    assert [(m["type"], m["code"], m.get("ended")) for m in session.transport.messages()] == [
        ("error", "unavailable", True)
    ]
    assert 1 not in hub.feeds and 1 not in session.projects
    store.unreadable.clear()  # repaired: the next subscribe works
    await hub.subscribe(session, 1, None, None)
    await next_iteration()
    assert received(session) == ["error", "subscribed"]


async def test_a_reconcile_pass_against_a_hung_redis_gives_up_in_time(monkeypatch) -> None:
    import gateway.hub

    class HungStore(FakeStore):
        async def cursors(self, project_ids, keep_alive=(), make_permanent=()):
            await asyncio.Event().wait()  # Redis stopped: never answers

    monkeypatch.setattr(gateway.hub, "RECONCILE_TIMEOUT", 0.05)
    hub = await hub_with(HungStore(top=0))
    await hub.subscribe(session_of(hub), PROJECT, None, None)
    async with asyncio.timeout(2):  # the pass itself must end, not this guard
        try:
            await hub.reconcile()
        except TimeoutError:
            pass
        else:
            raise AssertionError("the pass returned without an answer")


# --- a subscribe waiting for Redis ends with its subscription, not at its deadline -----------


class HungLink(FakeLink):
    """The pod's channel subscribe is confirmed only once ``confirm`` is set (Redis hangs)."""

    def __init__(self) -> None:
        self.confirm = asyncio.Event()

    async def subscribe(self, channel: bytes) -> None:
        await self.confirm.wait()


@pytest.mark.parametrize("waiting_for", ["channel", "baseline", "read"])
async def test_a_subscribe_whose_connection_closed_returns_at_once_the_others_wait(
    waiting_for,
) -> None:
    """A subscribe waiting for Redis (the feed's channel confirmation, the feed's first read, or
    its own read) for a connection that closes meanwhile returns at once, not at
    ``subscribe_timeout``: its task, which holds the session, ends. A subscriber of the same
    project that stays still waits, and gets every event once, in order, when Redis answers."""
    store = FakeStore(top=0)
    hub = await hub_with(store, window_events=0)  # a resume reads: "read" waits in the store
    cursor: tuple[str | None, int | None] = (None, None)
    if waiting_for == "channel":
        hub.link = link = HungLink()
    elif waiting_for == "baseline":
        store.gate = asyncio.Event()
    else:
        await hub.subscribe(session_of(hub), PROJECT, None, None)  # the feed is ready
        store.top = 2  # published, not relayed yet
        store.gate = asyncio.Event()
        cursor = (EPOCH, 1)  # ahead of what the feed relayed: only a read answers
    staying, leaving = session_of(hub), session_of(hub)
    stays = asyncio.create_task(hub.subscribe(staying, PROJECT, *cursor))
    goes = asyncio.create_task(hub.subscribe(leaving, PROJECT, *cursor))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not stays.done() and not goes.done()  # both wait for Redis

    hub.remove(leaving)  # the connection closed
    done, _ = await asyncio.wait({goes}, timeout=3)  # subscribe_timeout is 5 s, from the start
    assert done, f"the closed connection's subscribe still waits for the {waiting_for}"
    assert goes.result() is None and received(leaving) == []
    assert not stays.done()  # nothing changed for the one that stays

    if waiting_for == "channel":
        link.confirm.set()
    else:
        store.gate.set()  # Redis answers again
    async with asyncio.timeout(2):
        await stays
    live(hub, 1, 2, 3, 4)
    await next_iteration()
    expected = [2, "subscribed", 3, 4] if waiting_for == "read" else ["subscribed", 1, 2, 3, 4]
    assert received(staying) == expected


@pytest.mark.parametrize("during", ["channel", "baseline", "repair", "fill"])
async def test_a_feed_released_while_it_waits_for_redis_is_freed_by_reference_counting(
    during,
) -> None:
    """A feed released while one of its tasks waits for Redis (its channel subscribe, its first
    read, a gap repair, a window fill) is freed at once, not left in a reference cycle for the
    collector: a cancelled task keeps its CancelledError, whose traceback holds the task's
    frame, which holds the feed; the feed must not hold that task."""
    project = 4242  # no other test's feed
    store = FakeStore(top=0)
    hub = await hub_with(store)
    gc.collect()
    gc.disable()  # what reference counting does not free stays until the collection below
    try:
        keeper, resumer = session_of(hub), session_of(hub)
        if during == "channel":
            hub.link = HungLink()
        elif during == "baseline":
            store.gate = asyncio.Event()
        else:
            await hub.subscribe(keeper, project, None, None)
            store.gate = asyncio.Event()
            if during == "repair":
                live(hub, 2, project=project)  # 1 is missing: a read repairs the gap
            else:
                live(hub, 1, 2, 3, project=project)
                store.top = 3
                await next_iteration()
                hub.feeds[project].window.clear()  # older resumes take a fill (the read waits)
        waiting = asyncio.create_task(hub.subscribe(resumer, project, EPOCH, 1))
        for _ in range(10):
            await asyncio.sleep(0)
        # Reads begun (all held): the feed's baseline, then its repair (and the resume's own
        # read, while the feed repairs) or the fill.
        assert store.reads == {"channel": 0, "baseline": 1, "repair": 3, "fill": 2}[during]
        assert hub.window_fills == (during == "fill")
        hub.remove(keeper)
        hub.remove(resumer)  # the feed is released: its waiting task is cancelled
        for _ in range(10):
            await asyncio.sleep(0)
        assert waiting.done() and not hub.feeds
        del waiting
        alive = [o for o in gc.get_objects() if type(o) is Feed and o.project_id == project]
        assert not alive, "a released feed that only the cycle collector frees"
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [o for o in gc.garbage if type(o) is Feed]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


class OrderedStore(FakeStore):
    """A FakeStore whose history keeps only entries from ``first`` on (retention trimmed the
    rest), and, while ``held`` is a list, holds each read's answer until the test releases it
    (``held[i].set()``): reads then answer in the order the test chooses."""

    def __init__(self, top: int) -> None:
        super().__init__(top)
        self.first = 1
        self.held: list[asyncio.Event] | None = None

    async def snapshot(self, project_id, epoch=None, after=None, limit=0) -> Snapshot:
        self.reads += 1
        entries = ()
        if epoch == EPOCH and after is not None and after < self.top:
            start = max(after + 1, self.first)
            entries = tuple((s, frame(s, project_id)) for s in range(start, self.top + 1))
        snapshot = Snapshot(EPOCH, self.top, entries)
        if self.held is not None:
            release = asyncio.Event()
            self.held.append(release)
            await release.wait()
        return snapshot


async def test_a_resync_captured_while_joining_is_counted_when_it_is_sent() -> None:
    """``eventbus_resyncs_total`` counts the ``resync_required`` frames sent: one reaching a
    connection after ``subscribed`` counts then (here its own catch-up read's: the feed's
    resync passed it while its first read was in flight, and that one is not sent)."""
    store = OrderedStore(top=3)
    hub = await hub_with(store, window_events=0)  # every subscribe reads
    first = session_of(hub)
    await hub.subscribe(first, PROJECT, None, None)  # live from 3
    store.held = []
    second = session_of(hub)
    joining = asyncio.create_task(hub.subscribe(second, PROJECT, EPOCH, 1))
    await until(lambda: len(store.held) == 1)  # its read answers 2..3, held
    store.top, store.first = 10, 8  # 4..7 published and trimmed before this pod saw them
    live(hub, 10)  # a gap: the feed reads, finds 4..7 gone and resyncs everyone to 10
    await until(lambda: len(store.held) == 2)
    store.held[1].set()
    await until(lambda: received(first)[-1:] == ["resync_required"])  # the joiner captures it
    store.held[0].set()
    await joining
    # The resync passes it (at 3) in its own history: it reads for itself from 3 and finds
    # 4..7 gone too, which its own resync says.
    await until(lambda: len(store.held) == 3)
    store.held[2].set()
    await until(lambda: second in hub.feeds[PROJECT].live)
    await next_iteration()
    assert received(first) == ["subscribed", "resync_required"]
    assert received(second) == [2, 3, "subscribed", "resync_required"]
    assert hub.metrics.resyncs_total == 2


class FlakyStore(OrderedStore):
    """An OrderedStore whose reads after the cursor ``failing`` fail (Redis unavailable)."""

    failing: int | None = None

    async def snapshot(self, project_id, epoch=None, after=None, limit=0) -> Snapshot:
        if after is not None and after == self.failing:
            self.reads += 1
            raise StoreUnavailable("connection refused")
        return await super().snapshot(project_id, epoch, after, limit)


async def joined_ahead_of_a_trimmed_gap(store: OrderedStore) -> tuple[Hub, Session, Session]:
    """``first`` live at 3; ``second`` resumed from 1 and read up to 6, ahead of the feed (4..6
    still in flight), so it is still joining; then 4 is trimmed, 12 arrives, and the feed,
    which cannot fill its gap at 4, resyncs everyone to 12 (``history_trimmed``)."""
    hub = await hub_with(store, window_events=0)  # every subscribe reads
    first, second = session_of(hub), session_of(hub)
    await hub.subscribe(first, PROJECT, None, None)
    store.top = 6
    await hub.subscribe(second, PROJECT, EPOCH, 1)
    assert second in hub.feeds[PROJECT].joining
    store.top, store.first = 12, 5
    live(hub, 12)
    await reader_done(hub)
    return hub, first, second


async def test_a_feed_resync_past_a_joining_connection_is_its_own_read_from_its_cursor() -> None:
    """The feed's ``history_trimmed`` is about the gap at 4 after *its* cursor (3). The joining
    connection stands at 6 and its own history still holds 7..12: it gets them, once, in order,
    after the events of its resume, and no ``resync_required`` (nor a second ``subscribed``)."""
    store = OrderedStore(top=3)
    hub, first, second = await joined_ahead_of_a_trimmed_gap(store)
    await until(lambda: second in hub.feeds[PROJECT].live)
    await next_iteration()
    assert received(first) == ["subscribed", "resync_required"]
    assert received(second) == [2, 3, 4, 5, 6, "subscribed", *range(7, 13)]
    live(hub, 13)
    await next_iteration()
    assert received(first)[-1:] == received(second)[-1:] == [13]
    assert hub.metrics.resyncs_total == 1


class TrimmingStore(OrderedStore):
    """An OrderedStore whose retention trims up to ``trim_to`` right after the read after 3
    (the feed's) is answered: the joining connection's read, which follows it, finds its own
    events gone too."""

    trim_to = 9

    def __init__(self, top: int) -> None:
        super().__init__(top)
        self.afters: list[int | None] = []  # the cursor of each read, in order

    async def snapshot(self, project_id, epoch=None, after=None, limit=0) -> Snapshot:
        self.afters.append(after)
        snapshot = await super().snapshot(project_id, epoch, after, limit)
        if after == 3 and self.top == 12:
            self.first = self.trim_to
        return snapshot


async def test_a_joining_connection_whose_own_events_are_trimmed_is_told_so_once() -> None:
    """Where the connection's own history no longer holds what it is owed (7 and 8 trimmed by
    the time it reads), its read says so: one ``resync_required(history_trimmed)`` to the top,
    then live, as a resume from 6 would be told."""
    store = TrimmingStore(top=3)
    hub, first, second = await joined_ahead_of_a_trimmed_gap(store)
    await until(lambda: second in hub.feeds[PROJECT].live)
    await next_iteration()
    assert received(second) == [2, 3, 4, 5, 6, "subscribed", "resync_required"]
    resync = second.transport.messages()[-1]
    assert (resync["reason"], resync["seq"]) == ("history_trimmed", 12)
    assert store.afters[-2:] == [3, 6]  # the feed's read, then the connection's own
    live(hub, 13)
    await next_iteration()
    assert received(first)[-1:] == received(second)[-1:] == [13]


async def test_a_joining_connection_whose_own_read_fails_gets_the_feeds_resync() -> None:
    """Never silence: when Redis does not answer the connection's read, it is sent the feed's
    resync (as it was before it read for itself) and goes live from there."""
    store = FlakyStore(top=3)
    store.failing = 6  # the connection's read, after its cursor 6; the feed's is after 3
    hub, first, second = await joined_ahead_of_a_trimmed_gap(store)
    await until(lambda: second in hub.feeds[PROJECT].live)
    await next_iteration()
    assert received(second) == [2, 3, 4, 5, 6, "subscribed", "resync_required"]
    resync = second.transport.messages()[-1]
    assert (resync["reason"], resync["seq"]) == ("history_trimmed", 12)
    live(hub, 13)
    await next_iteration()
    assert received(first)[-1:] == received(second)[-1:] == [13]
    assert hub.metrics.resyncs_total == 2


# --- cursor tags: a failover that replaced events a connection read ahead of the feed -------


def replaced(seq: int) -> bytes:
    """Another event under the number ``seq``: what a new master publishes after a failover lost
    the old one."""
    return b'{"type":"x","project_id":%d,"replaced":true,"seq":%d}' % (PROJECT, seq)


class TaggedStore(FakeStore):
    """A :class:`FakeStore` whose reads name the tags of the events at the top and the cursor,
    and whose events can be replaced (``frames``), as a failover does."""

    def __init__(self, top: int) -> None:
        super().__init__(top)
        self.frames: dict[int, bytes] = {}

    def frame_at(self, seq: int, project_id: int) -> bytes:
        return self.frames.get(seq) or frame(seq, project_id)

    async def snapshot(self, project_id, epoch=None, after=None, limit=0) -> Snapshot:
        self.reads += 1
        top, entries, after_tag = self.top, (), None
        if epoch == EPOCH and after is not None and 1 <= after <= top:
            after_tag = event_tag(self.frame_at(after, project_id))
        if epoch == EPOCH and after is not None and after < top:
            last = top if not limit else min(top, after + limit)
            entries = tuple((s, self.frame_at(s, project_id)) for s in range(after + 1, last + 1))
        top_tag = event_tag(self.frame_at(top, project_id)) if top else None
        return Snapshot(EPOCH, top, entries, top_tag=top_tag, after_tag=after_tag)


async def test_a_joiner_whose_read_went_ahead_of_a_failover_is_told_history_lost() -> None:
    """A connection resumes and its read finds 1 to 5; this pod has not relayed 4 and 5 yet. The
    master dies before its replica got them: the new master publishes other events as 4, 5 and
    6. The feed delivers those; at 5, where the connection stands, the event is not the one it
    has: it is told ``history_lost`` there (it used to drop 4 and 5 as already sent, keeping
    the lost ones and never getting their replacements), then gets 6."""
    store = TaggedStore(top=3)
    hub = await hub_with(store, window_events=0)  # every resume reads
    first = session_of(hub)
    await hub.subscribe(first, PROJECT, None, None)  # live from 3
    store.top = 5
    second = session_of(hub)
    await hub.subscribe(second, PROJECT, EPOCH, 0)  # older than the feed's cursor: it reads
    await next_iteration()
    store.frames = {n: replaced(n) for n in (4, 5, 6)}
    store.top = 6
    channel = KEYS.channel(PROJECT).encode()
    for seq in (4, 5, 6):
        hub.on_pubsub_message(channel, b"%s|%d|0|%s" % (EPOCH.encode(), seq, replaced(seq)))
    await next_iteration()
    assert received(first) == ["subscribed", 4, 5, 6]
    assert received(second) == [1, 2, 3, 4, 5, "subscribed", "resync_required", 6]
    resync = second.transport.messages()[6]
    assert (resync["reason"], resync["seq"], resync["tag"]) == (
        "history_lost",
        5,
        event_tag(replaced(5)),
    )
    assert hub.metrics.resyncs_total == 1
    # Without a failover, the same race passes nothing but the events (see the first test).


# --- a joiner's own catch-up read (Hub._catch_up) while the world moves ----------------------


def catch_up_tasks() -> list[asyncio.Task]:
    """The hub's catch-up reads still running."""
    from gateway import tasks

    return [t for t in tasks._running if not t.done() and "_catch_up" in repr(t.get_coro())]


async def catching_up(
    store: OrderedStore, subscribe_timeout: float = 5
) -> tuple[Hub, Session, Session]:
    """As :func:`joined_ahead_of_a_trimmed_gap`, but the joining connection's own catch-up read
    (after 6) is held: ``store.held[1]`` answers it (taken at the call: 7..12, top 12)."""
    hub = await hub_with(store, window_events=0)
    first, second = session_of(hub), session_of(hub)
    await hub.subscribe(first, PROJECT, None, None)
    store.top = 6
    await hub.subscribe(second, PROJECT, EPOCH, 1)
    store.top, store.first = 12, 5
    store.held = []
    hub.subscribe_timeout = subscribe_timeout  # the catch-up read's bound
    live(hub, 12)
    await until(lambda: len(store.held) == 1)  # the feed's read after 3
    store.held[0].set()
    await until(lambda: len(store.held) == 2)  # the connection's own, after 6
    assert second in hub.feeds[PROJECT].waits
    return hub, first, second


async def test_a_connection_that_unsubscribes_during_its_catch_up_read_leaves_nothing_behind() -> (
    None
):
    store = OrderedStore(top=3)
    hub, first, second = await catching_up(store)
    feed = hub.feeds[PROJECT]
    assert hub.unsubscribe(second, PROJECT)
    assert second not in feed.waits and second not in feed.joining
    await next_iteration()
    assert not catch_up_tasks()  # its wait ended with the subscription, not at its deadline
    live(hub, 13)
    store.held[1].set()
    await next_iteration()
    await next_iteration()
    assert received(second) == [2, 3, 4, 5, 6, "subscribed"]
    assert hub.subscriptions == 1
    hub.remove(first)
    assert PROJECT not in hub.feeds


async def test_a_second_feed_resync_during_the_catch_up_read_reaches_the_connection_once() -> None:
    """While the connection reads after 6 (answer: 7..12), 13 arrives live, then 14..19 are
    published and trimmed and 20 arrives: the feed resyncs everyone to 20. The connection gets
    7..12 from its read, 13 from the feed, then that resync, once; then live."""
    store = OrderedStore(top=3)
    hub, first, second = await catching_up(store)
    store.top = 13
    live(hub, 13)
    store.top, store.first = 20, 15
    live(hub, 20)  # a gap at 14: the feed reads
    await until(lambda: len(store.held) == 3)
    store.held[2].set()
    await until(lambda: received(first)[-1:] == ["resync_required"])
    store.held[1].set()
    await until(lambda: second in hub.feeds[PROJECT].live)
    live(hub, 21)
    await next_iteration()
    assert received(second) == [2, 3, 4, 5, 6, "subscribed", *range(7, 14), "resync_required", 21]
    assert second.transport.messages()[-2]["seq"] == 20
    assert received(first) == ["subscribed", "resync_required", 13, "resync_required", 21]
    assert hub.subscribe_reads == 2  # the second one's subscribe read, then its catch-up read


async def test_a_catch_up_read_that_redis_never_answers_ends_at_the_subscribe_timeout() -> None:
    store = OrderedStore(top=3)
    hub, _, second = await catching_up(store, subscribe_timeout=0.05)
    feed = hub.feeds[PROJECT]
    await until(lambda: second in feed.live)
    await next_iteration()
    assert received(second) == [2, 3, 4, 5, 6, "subscribed", "resync_required"]
    assert second not in feed.waits


async def test_a_project_that_fails_during_a_catch_up_read_ends_the_wait_and_says_so() -> None:
    store = OrderedStore(top=3)
    hub, _, second = await catching_up(store)
    feed = hub.feeds[PROJECT]
    hub._fail_feed(feed, ProjectUnreadable(PROJECT, KEYS.meta(PROJECT), "has an invalid seq"))
    assert not feed.waits
    store.held[1].set()
    await next_iteration()
    await next_iteration()
    assert received(second) == [2, 3, 4, 5, 6, "subscribed", "error"]
    assert PROJECT not in hub.feeds and hub.subscriptions == 0


async def test_a_resubscribe_during_a_catch_up_read_is_answered_once_by_its_own_read() -> None:
    store = OrderedStore(top=3)
    hub, _, second = await catching_up(store)
    store.held = None
    await hub.subscribe(second, PROJECT, EPOCH, 10)
    await next_iteration()
    feed = hub.feeds[PROJECT]
    await until(lambda: second in feed.live)
    live(hub, 13)
    await next_iteration()
    assert received(second) == [2, 3, 4, 5, 6, "subscribed", 11, 12, "subscribed", 13]
    assert not catch_up_tasks()


async def test_a_feed_resync_captured_during_a_first_read_it_passes_is_read_for_too() -> None:
    """The feed's ``history_trimmed`` to 12 (about the gap at 4 after *its* cursor, 3) arrives
    while the connection's first read (after 1: 2..6) is in flight. Its own history still
    holds 7..12: it gets them after ``subscribed``, from a read of its own, not a resync."""
    store = OrderedStore(top=3)
    hub = await hub_with(store, window_events=0)  # every subscribe reads
    first, second = session_of(hub), session_of(hub)
    await hub.subscribe(first, PROJECT, None, None)  # live from 3
    store.top, store.held = 6, []
    joining = asyncio.create_task(hub.subscribe(second, PROJECT, EPOCH, 1))
    await until(lambda: len(store.held) == 1)  # its read answers 2..6, held
    store.top, store.first = 12, 5
    live(hub, 12)  # a gap: the feed reads after 3, finds 4 gone and resyncs everyone to 12
    await until(lambda: len(store.held) == 2)
    store.held[1].set()
    await until(lambda: received(first)[-1:] == ["resync_required"])  # the joiner captures it
    held, store.held = store.held, None  # the reads from now on answer at once
    held[0].set()  # the connection's first read: 2..6, top 6 (taken at its call)
    await joining
    await until(lambda: second in hub.feeds[PROJECT].live)
    live(hub, 13)
    await next_iteration()
    assert received(second) == [2, 3, 4, 5, 6, "subscribed", *range(7, 14)]
    assert hub.metrics.resyncs_total == 1  # the live one's only


class FailedOverStore(OrderedStore):
    """An OrderedStore that a failover set back to ``top = 5`` (the events after it lost)
    just before the read after 6, the joining connection's catch-up read."""

    async def snapshot(self, project_id, epoch=None, after=None, limit=0) -> Snapshot:
        if after == 6 and self.top == 12:
            self.top, self.first = 5, 1
        return await super().snapshot(project_id, epoch, after, limit)


async def test_a_catch_up_read_behind_the_feeds_resync_proves_the_loss_to_everyone() -> None:
    """The feed resynced everyone to 12; the connection's own read, begun after that, finds
    the history's top at 5: only a failover moves a top back, so the events after 5 that the
    feed stands past are lost. The feed is told (as by a subscribe read behind it) and resyncs
    everyone with ``history_lost``, at once: not after whatever number the next publish
    happens to reach, nor at the next periodic check."""
    store = FailedOverStore(top=3)
    hub, first, second = await joined_ahead_of_a_trimmed_gap(store)
    await until(lambda: len(received(first)) == 3)
    told = first.transport.messages()[-1]
    assert (told["reason"], told["seq"]) == ("history_lost", 5)
    await until(lambda: second in hub.feeds[PROJECT].live)
    told = second.transport.messages()[-1]
    assert (told["reason"], told["seq"]) == ("history_lost", 5)
    # The next event published, numbered 6 again, reaches both (a feed still at 12 would have
    # taken it for one it had delivered, and dropped it).
    store.top = 6
    live(hub, 6)
    await next_iteration()
    assert received(first)[-1:] == received(second)[-1:] == [6]


class FlushedAgainStore(OrderedStore):
    """An OrderedStore whose Redis was flushed again (a new, empty history ``"again"``) just
    before the read after 6, the joining connection's catch-up read."""

    async def snapshot(self, project_id, epoch=None, after=None, limit=0) -> Snapshot:
        if after == 6:
            self.reads += 1
            return Snapshot("again", 0, ())
        return await super().snapshot(project_id, epoch, after, limit)


async def test_a_catch_up_read_that_finds_another_history_drops_the_resync_it_read_for() -> None:
    """The connection read for the feed's resync to 12 and found Redis emptied again: it is
    told ``epoch_changed`` to the new history by its own read. The feed's resync it read for
    (to 12 of the history before) is older than that read: it is not sent after it, which took
    the client back to a history that is gone (one reload more, to a cursor no gateway can
    resume from) until the feed itself moved on."""
    store = FlushedAgainStore(top=3)
    hub, first, second = await joined_ahead_of_a_trimmed_gap(store)
    await until(lambda: received(second)[-1:] == ["resync_required"])
    await next_iteration()
    assert received(second) == [2, 3, 4, 5, 6, "subscribed", "resync_required"]
    told = second.transport.messages()[-1]
    assert (told["reason"], told["epoch"], told["seq"]) == ("epoch_changed", "again", 0)
    # Still joining: its history is ahead of the feed's, which has not seen it yet.
    assert second in hub.feeds[PROJECT].joining
    live(hub, 13)  # the feed's old history goes on: nothing of it reaches the connection
    await next_iteration()
    assert received(first)[-1:] == [13] and received(second)[-1:] == ["resync_required"]


async def test_a_read_in_the_middle_of_a_large_window_looks_up_no_frame_far_from_its_ends(
    frame_checks: list[int],
):
    """A read's entries are compared with the window's frames at their seqs (Hub.checked_frames)
    instead of being checked again, but a deque is indexed in O(distance from its nearer end):
    with a window of a million events, a read in its middle took ~40 us per entry to look up
    what the check does in ~1.5 us (a 1,000-entry poll page 19 ms instead of 3 ms). Only the
    frames near the window's top (4,096: 64 of the deque's blocks), where a resume read lands,
    are looked up; the others are checked in full, and the read parses the same."""
    from gateway.hub import CHECKED_FRAMES_SPAN as near

    events = 3 * near
    hub = await hub_with(FakeStore(0), window_events=events)
    await hub.subscribe(session_of(hub), PROJECT, None, None)
    live(hub, *range(1, events + 1))
    window = hub.feeds[PROJECT].window
    assert (window.lo, window.last) == (1, events)
    depths: list[int] = []

    class Watched(collections.deque):
        def __getitem__(self, index):
            depths.append(min(index, len(self) - 1 - index))
            return super().__getitem__(index)

    window.entries = Watched(window.entries)
    checks = frame_checks

    def read(first: int, last: int) -> list[int]:
        depths.clear()
        checks.clear()
        entries = [[b"%d-0" % s, [b"f", frame(s), b"t", b"0"]] for s in range(first, last + 1)]
        reply = [EPOCH.encode(), events, 0, entries, b"", b"", b""]
        snapshot, foreign = parse_snapshot_reply(PROJECT, reply, hub.checked_frames(PROJECT))
        assert foreign == [] and [s for s, _ in snapshot.entries] == list(range(first, last + 1))
        return checks[:]

    middle = events // 2
    assert read(middle - 500, middle + 500) == list(range(middle - 500, middle + 501))
    assert depths == []  # nothing looked up in the middle: checked instead
    # A resume read near the top still takes the window's frames without checking them again.
    assert read(events - 999, events) == []
    assert len(depths) == 1000 and max(depths) < near
    # A window of up to twice that is looked up whole: no frame of it is further from an end.
    while len(window.entries) > 2 * near:
        window.drop_oldest()
    assert read(window.lo, events) == [] and max(depths) < near
