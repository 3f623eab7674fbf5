"""Resumes answered from a feed's window (gateway/hub.py + gateway/window.py), without sockets or
Redis: which subscribes read history, and that what each connection receives is exactly its
missed events, then ``subscribed``, then live ones; or an explicit resync."""

from __future__ import annotations

import asyncio
import dataclasses

from gateway.hub import Hub, _window_size
from gateway.sequencing import Snapshot
from gateway.session import Outgoing
from gateway.websocket import WebSocketSession as Session
from schemas.tags import event_tag
from tests.test_hub import (
    EPOCH,
    KEYS,
    PROJECT,
    FakeStore,
    frame,
    hub_with,
    live,
    next_iteration,
    reader_done,
    received,
    session_of,
    until,
)


class HistoryStore(FakeStore):
    """A fake history with an epoch that can change, a stream trimmed below ``first``, and
    frames that can be rewritten (``rewritten`` seqs carry other bytes)."""

    def __init__(self, top: int) -> None:
        super().__init__(top)
        self.epoch = EPOCH
        self.first = 1
        self.rewritten: set[int] = set()

    def frame_at(self, seq: int) -> bytes:
        if seq in self.rewritten:
            return b'{"type":"x","project_id":%d,"v":2,"seq":%d}' % (PROJECT, seq)
        return frame(seq)

    async def snapshot(self, project_id, epoch=None, after=None, limit=0) -> Snapshot:
        self.reads += 1
        entries = ()
        if epoch == self.epoch and after is not None and after < self.top:
            last = self.top if not limit else min(self.top, after + limit)
            start = max(after + 1, self.first)
            entries = tuple((s, self.frame_at(s)) for s in range(start, last + 1))
        snapshot = Snapshot(self.epoch, self.top, entries)
        if self.gate is not None:
            await self.gate.wait()
        return snapshot


async def live_at(top: int, **options) -> tuple[Hub, HistoryStore, Session]:
    """A hub whose feed of PROJECT is live at ``top``, with one subscriber keeping it, and the
    events 1..top delivered live (so they are in the window)."""
    store = HistoryStore(top=0)
    hub = await hub_with(store, **options)
    keeper = session_of(hub)
    await hub.subscribe(keeper, PROJECT, None, None)
    live(hub, *range(1, top + 1))
    store.top = top
    await next_iteration()
    return hub, store, keeper


async def resume(hub: Hub, after: int | None, epoch: str | None = EPOCH) -> Session:
    session = session_of(hub)
    await hub.subscribe(session, PROJECT, epoch, after)
    await next_iteration()
    return session


async def test_a_resume_inside_the_window_reads_nothing_and_gets_exactly_what_it_missed():
    hub, store, _ = await live_at(20)
    reads, answered = store.reads, hub.resumes_from_memory
    session = await resume(hub, 12)
    live(hub, 21)
    await next_iteration()
    assert received(session) == [13, 14, 15, 16, 17, 18, 19, 20, "subscribed", 21]
    assert store.reads == reads and hub.resumes_from_memory == answered + 1


async def test_a_resume_at_the_top_and_a_fresh_subscribe_read_nothing():
    hub, store, _ = await live_at(5)
    reads = store.reads
    at_top, fresh = await resume(hub, 5), await resume(hub, None, None)
    live(hub, 6)
    await next_iteration()
    assert received(at_top) == received(fresh) == ["subscribed", 6]
    assert store.reads == reads


async def test_just_inside_and_just_outside_a_trimmed_window():
    hub, store, _ = await live_at(10, window_events=4)  # holds 7..10
    assert hub.feeds[PROJECT].window.lo == 7
    reads = store.reads
    inside = await resume(hub, 6)
    assert received(inside) == [7, 8, 9, 10, "subscribed"]
    assert store.reads == reads
    # One older than the window: a read that can only cover the window's capacity is useless,
    # so the client reads for itself (the atomic read of every subscribe before the window).
    outside = await resume(hub, 5)
    assert received(outside) == [6, 7, 8, 9, 10, "subscribed"]
    assert hub.subscribe_reads == 1 and hub.window_fills == 0


async def test_resumes_older_than_the_window_share_one_read_that_fills_it():
    store = HistoryStore(top=100)
    hub = await hub_with(store)
    gate = store.gate = asyncio.Event()
    sessions = [session_of(hub) for _ in range(50)]
    subscribes = [
        asyncio.create_task(hub.subscribe(s, PROJECT, EPOCH, n)) for n, s in enumerate(sessions)
    ]
    await next_iteration()
    gate.set()
    await asyncio.wait_for(asyncio.gather(*subscribes), 5)
    await next_iteration()
    assert store.reads == 2  # the feed's baseline, then one fill for all 50
    assert hub.window_fills == 1 and hub.subscribe_reads == 0
    live(hub, 101)
    await next_iteration()
    for n, session in enumerate(sessions):
        assert received(session) == [*range(n + 1, 101), "subscribed", 101]


async def test_a_feed_repairing_a_gap_never_answers_from_its_window():
    hub, store, keeper = await live_at(5)
    store.top = 7
    gate = store.gate = asyncio.Event()
    live(hub, 7)  # 6 was lost: the feed holds 7 and reads
    assert hub.feeds[PROJECT].sequencer.reading
    answered = hub.resumes_from_memory
    waiting = session_of(hub)
    subscribe = asyncio.create_task(hub.subscribe(waiting, PROJECT, EPOCH, 3))
    await next_iteration()
    gate.set()
    await asyncio.wait_for(subscribe, 5)
    await reader_done(hub)
    await next_iteration()
    assert hub.resumes_from_memory == answered and hub.subscribe_reads == 1
    assert received(waiting) == [4, 5, 6, 7, "subscribed"]
    assert received(keeper) == ["subscribed", 1, 2, 3, 4, 5, 6, 7]
    # Repaired: the window is whole again (6 came from the stream) and answers.
    again = await resume(hub, 3)
    assert received(again) == [4, 5, 6, 7, "subscribed"]
    assert hub.resumes_from_memory == answered + 1


async def test_an_epoch_change_is_never_answered_with_a_replay_of_the_old_window():
    hub, store, keeper = await live_at(10)
    # Redis flushed and a publisher started a new history: its first event arrives live.
    store.epoch, store.top = "e-new", 1
    gate = store.gate = asyncio.Event()
    channel = KEYS.channel(PROJECT).encode()
    hub.on_pubsub_message(channel, b"e-new|1|0|" + frame(1))
    answered = hub.resumes_from_memory
    during = session_of(hub)  # resumes while the feed is finding out
    subscribe = asyncio.create_task(hub.subscribe(during, PROJECT, EPOCH, 8))
    await next_iteration()
    gate.set()
    await asyncio.wait_for(subscribe, 5)
    await reader_done(hub)
    store.gate = None
    after = await resume(hub, 8)  # the old cursor again, once the feed has resynced
    for session in (during, after):
        # No event of the old history; the resync (the one joining during the feed's own read
        # may get the feed's identical resync too, which the protocol allows) then subscribed.
        messages = session.transport.messages()
        assert {m["type"] for m in messages} == {"resync_required", "subscribed"}
        for message in messages:
            assert message["epoch"] == "e-new" and message.get("seq") == 1
            if message["type"] == "resync_required":
                assert message["reason"] == "epoch_changed"
    assert hub.resumes_from_memory == answered + 1  # a retired epoch, told from memory
    assert received(keeper)[-1] == "resync_required"


async def test_a_history_lost_at_the_same_top_empties_the_window():
    hub, store, keeper = await live_at(10)
    store.rewritten = {10}  # a failover handed number 10 to another event
    hub.on_pubsub_message(
        KEYS.channel(PROJECT).encode(), b"%s|10|0|%s" % (EPOCH.encode(), store.frame_at(10))
    )
    await reader_done(hub)
    assert received(keeper)[-1] == "resync_required"
    assert not hub.feeds[PROJECT].window.entries
    # The old window's 9 and 10 are never replayed: the late client gets the stream's own
    # events (through a fill, as a read would), where 10 is now the other event.
    late = await resume(hub, 8)
    assert received(late) == [9, 10, "subscribed"]
    assert late.transport.messages()[1]["v"] == 2
    assert hub.window_fills == 1


async def test_a_fill_that_finds_a_trimmed_stream_leaves_the_window_alone():
    store = HistoryStore(top=50)
    store.first = 30  # retention dropped 1..29
    hub = await hub_with(store)
    session = await resume(hub, 10)
    assert hub.window_fills == 1
    assert hub.feeds[PROJECT].window.lo == 30  # filled with 30..50, contiguous up to last
    assert [m["type"] for m in session.transport.messages()] == ["resync_required", "subscribed"]
    assert session.transport.messages()[0]["reason"] == "history_trimmed"
    inside = await resume(hub, 29)
    assert received(inside) == [*range(30, 51), "subscribed"]


async def test_a_fill_is_not_mixed_with_a_rewritten_stream():
    size = _window_size(Outgoing(frame(9)))
    hub, store, _ = await live_at(10, window_bytes=4 * size)  # the budget keeps the last 3-4
    lo = hub.feeds[PROJECT].window.lo
    assert 5 < lo < 10
    hub.window_budget.limit = 1 << 30  # room again: only the check can refuse the fill
    store.rewritten = {lo}  # the stream now holds another event at the window's oldest
    late = await resume(hub, 2)  # a fill, whose entry at lo does not match: not merged
    assert hub.window_fills == 1 and hub.feeds[PROJECT].window.lo == lo
    assert hub.subscribe_reads == 1  # the client then read for itself, as without a window
    assert received(late)[-1] == "subscribed"


async def test_the_pod_byte_budget_bounds_every_window_together():
    hub, _, _ = await live_at(50, window_bytes=20 * 250)
    window = hub.feeds[PROJECT].window
    assert hub.window_budget.bytes == window.bytes <= 20 * 250
    assert window.last == 50 and 0 < len(window.entries) < 50
    lo = window.lo
    inside = await resume(hub, lo - 1)
    assert received(inside) == [*range(lo, 51), "subscribed"]
    # No room in the budget to keep that replay for the next client: not kept, and no entry
    # was dropped for it.
    assert window.memo is None and window.lo == lo and hub.window_budget.bytes == window.bytes
    hub.window_budget.limit = 1 << 30
    before = window.bytes
    again = await resume(hub, lo - 1)  # room now: kept, and counted in the budget
    assert received(again) == [*range(lo, 51), "subscribed"]
    assert window.memo is not None and window.lo == lo
    assert hub.window_budget.bytes == window.bytes == before + window.memo[2]
    hub.unsubscribe(again, PROJECT)
    hub.unsubscribe(inside, PROJECT)
    for session in list(hub.feeds[PROJECT].live):
        hub.unsubscribe(session, PROJECT)
    assert PROJECT not in hub.feeds and hub.window_budget.bytes == 0


async def test_clients_resuming_at_one_cursor_share_its_replay_until_the_window_changes():
    """A storm resumes a project's clients at the same cursor: the replay is built once, and an
    event between two resumes makes the next one a replay of its own (never a stale one)."""
    hub, _, _ = await live_at(30)
    window = hub.feeds[PROJECT].window
    first, second = await resume(hub, 20), await resume(hub, 20)
    kept = window.memo
    assert kept is not None and kept[0] == (EPOCH, 20)
    assert received(first) == received(second) == [*range(21, 31), "subscribed"]
    assert first.transport.messages()[-1] == second.transport.messages()[-1]  # same subscribed
    live(hub, 31)  # the entries change: the memo is forgotten
    assert window.memo is None
    third = await resume(hub, 20)
    live(hub, 32)
    await next_iteration()
    assert received(first) == received(second) == [*range(21, 31), "subscribed", 31, 32]
    assert received(third) == [*range(21, 32), "subscribed", 32]
    assert third.transport.messages()[-2]["seq"] == 31  # its subscribed is at 31, not 30
    assert window.memo is None and hub.metrics.replayed_total == 31
    assert hub.subscribe_reads == 0


class TaggedStore(HistoryStore):
    """A history that names the tags of the events at the top and at the cursor, as Redis's
    snapshot script does (schemas.tags)."""

    async def snapshot(self, project_id, epoch=None, after=None, limit=0) -> Snapshot:
        read = await super().snapshot(project_id, epoch, after, limit)
        after_tag = None
        if epoch == read.epoch and after is not None and max(1, self.first) <= after <= read.top:
            after_tag = event_tag(self.frame_at(after))
        top_tag = event_tag(self.frame_at(read.top)) if read.top else None
        return dataclasses.replace(read, top_tag=top_tag, after_tag=after_tag)


async def tagged_resume(hub: Hub, after: int) -> Session:
    session = session_of(hub)
    await hub.subscribe(session, PROJECT, EPOCH, after, event_tag(frame(after)))
    await next_iteration()
    return session


async def test_a_tagged_resume_just_below_the_window_is_answered_from_memory():
    """The window knows the tag of the event just below its oldest entry: its baseline's (the
    top the feed's first read named), or the entry it last trimmed. A tagged resume there (the
    clients that subscribed at the baseline and missed what came since; every SSE client
    resumes with a tag) is answered from memory, as an untagged one is, not by one Redis read
    per client."""
    store = TaggedStore(top=3)
    hub = await hub_with(store, window_events=4)
    keeper = session_of(hub)
    await hub.subscribe(keeper, PROJECT, None, None)  # the baseline: 3
    store.top = 6
    live(hub, 4, 5, 6)
    await next_iteration()
    reads = store.reads
    at_baseline = await tagged_resume(hub, 3)
    assert received(at_baseline) == [4, 5, 6, "subscribed"]
    store.top = 10
    live(hub, 7, 8, 9, 10)  # the window trims to 7..10
    await next_iteration()
    below = await tagged_resume(hub, 6)
    assert received(below) == [7, 8, 9, 10, "subscribed"]
    assert store.reads == reads and hub.subscribe_reads == 0
    # Still checked: another event at that number is history_lost, from memory too.
    other = session_of(hub)
    await hub.subscribe(other, PROJECT, EPOCH, 6, event_tag(b"another event"))
    await next_iteration()
    assert received(other) == ["resync_required", "subscribed"]
    assert other.transport.messages()[0]["reason"] == "history_lost"
    assert store.reads == reads


async def test_events_held_during_the_baseline_read_leave_the_window_the_tag_of_its_top():
    """Events published while the feed's first read is in flight are held, then delivered
    after it: the window starts at the last of them, and names that event's tag (not the tag of
    the top the read found). A wrong tag there went into every ``subscribed`` answered from
    memory: each client joining during the read was at once told ``history_lost`` (the events
    it captured meanwhile include the top, under another tag), and each client later resuming
    with that tag was too."""
    store = TaggedStore(top=3)
    store.gate = asyncio.Event()
    hub = await hub_with(store)
    keeper = session_of(hub)
    subscribing = asyncio.create_task(hub.subscribe(keeper, PROJECT, None, None))
    await until(lambda: store.reads >= 1)  # the baseline read, taken at top 3, is held
    live(hub, 4, 5)
    store.gate.set()
    await subscribing
    await reader_done(hub)
    # The keeper joined during that read, and was answered from the window: at 5, then nothing
    # (4 and 5, which it captured while joining, are before its cursor); no history_lost.
    assert received(keeper) == ["subscribed"]
    assert keeper.transport.messages()[0]["seq"] == 5
    store.gate = None
    fresh = await resume(hub, None, None)
    subscribed = fresh.transport.messages()[-1]
    assert (subscribed["type"], subscribed["seq"]) == ("subscribed", 5)
    assert subscribed["tag"] == event_tag(frame(5))
    reads = store.reads
    again = await tagged_resume(hub, 5)
    assert received(again) == ["subscribed"]
    assert store.reads == reads


async def test_a_window_filled_after_another_feed_emptied_it_names_no_stale_tag():
    """The pod's byte budget empties a feed's window for another feed's events: the window keeps
    only the tag of its ``last`` event. A resume older than it fills the window from the
    history; the event just below the filled entries is then not known (the tag kept was that
    of ``last``, now an entry): a tagged resume there is checked by Redis, never told
    ``history_lost`` by a window naming ``last``'s tag for it."""
    store = TaggedStore(top=0)
    size = _window_size(Outgoing(frame(1), PROJECT, 1))
    hub = await hub_with(store, window_events=4, window_bytes=4 * size)
    keeper = session_of(hub)
    await hub.subscribe(keeper, PROJECT, None, None)
    live(hub, *range(1, 7))
    store.top = 6
    other = session_of(hub)
    await hub.subscribe(other, 2, None, None)  # (every project's history is the same: at 6)
    live(hub, 7, 8, 9, 10, project=2)  # its entries evict all of this feed's
    window = hub.feeds[PROJECT].window
    assert not window.entries and window.tag_at(6) == event_tag(frame(6))
    filling = await tagged_resume(hub, 3)  # older than the window: one read fills it
    assert received(filling) == [4, 5, 6, "subscribed"]
    assert [seq for seq, _, _ in window.entries] == [3, 4, 5, 6]
    below = await tagged_resume(hub, 2)
    assert received(below) == [3, 4, 5, 6, "subscribed"]
    subscribed = below.transport.messages()[-1]
    assert (subscribed["seq"], subscribed["tag"]) == (6, event_tag(frame(6)))


async def test_a_storm_of_tagged_clients_too_far_behind_reads_nothing():
    """Clients back from a long outage, further behind than ``--max-replay``, each resuming
    with the tag of its last event (which left the window long ago): ``too_far_behind`` to the
    top from memory, not one Redis read per client."""
    hub, store, _ = await live_at(30, window_events=4)
    hub.max_replay = 10
    reads = store.reads
    sessions = [await tagged_resume(hub, after) for after in (3, 5, 12)]
    for session in sessions:
        assert received(session) == ["resync_required", "subscribed"]
        resync = session.transport.messages()[0]
        assert (resync["reason"], resync["seq"]) == ("too_far_behind", 30)
        assert resync["tag"] == event_tag(frame(30))
    assert store.reads == reads and hub.subscribe_reads == 0
