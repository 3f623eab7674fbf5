"""The resume window (gateway/window.py), pure: what a feed keeps in memory answers a resume
exactly as one atomic history read at the feed's cursor would, or not at all."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sequencing import Snapshot, plan_subscription
from gateway.window import ResumeWindow, WindowBudget, seed_run
from schemas.protocol import ResyncReason


def item(epoch: str, seq: int) -> str:
    """Every (epoch, seq) names one event; the window's items are opaque."""
    return f"{epoch}:{seq}"


def filled(epoch: str = "e1", last: int = 10, capacity: int = 5) -> ResumeWindow[str]:
    window: ResumeWindow[str] = ResumeWindow(capacity)
    window.reset(epoch, 0)
    for seq in range(1, last + 1):
        window.append(seq, item(epoch, seq), 10)
    return window


def replayed(snapshot: Snapshot | None) -> list[int] | None:
    return None if snapshot is None else [entry[0] for entry in snapshot.entries]


def test_keeps_the_last_capacity_frames_contiguous_up_to_last():
    window = filled(last=10, capacity=5)
    assert (window.lo, window.last) == (6, 10)
    assert [seq for seq, _, _ in window.entries] == [6, 7, 8, 9, 10]


def test_a_cursor_just_inside_the_window_is_answered_and_just_outside_is_not():
    window = filled(last=10, capacity=5)
    assert replayed(window.snapshot("e1", 5, 1000)) == [6, 7, 8, 9, 10]  # lo - 1: inside
    assert window.snapshot("e1", 4, 1000) is None  # one older: only Redis has 5
    assert replayed(window.snapshot("e1", 10, 1000)) == []  # at last: nothing to replay
    assert window.snapshot("e1", 11, 1000) is None  # ahead of the feed: only Redis knows


def test_a_fresh_subscribe_starts_at_last_and_an_empty_window_still_answers_a_cursor_at_last():
    window: ResumeWindow[str] = ResumeWindow(5)
    assert window.snapshot(None, None, 1000) is None  # no baseline yet
    window.reset("e1", 42)
    assert window.snapshot(None, None, 1000) == Snapshot("e1", 42)
    assert replayed(window.snapshot("e1", 42, 1000)) == []
    assert window.snapshot("e1", 41, 1000) is None


def test_a_reset_drops_the_window_and_a_retired_epoch_gets_epoch_changed():
    window = filled(last=10)
    window.reset("e2", 3)  # Redis flushed: the feed resynced to a new history
    assert window.snapshot("e1", 9, 1000) == Snapshot("e2", 3)  # never a replay of e1
    plan = plan_subscription("e1", 9, Snapshot("e2", 3), 1000)
    assert plan.resync is not None and plan.resync.reason == ResyncReason.EPOCH_CHANGED
    assert window.snapshot("e-unknown", 9, 1000) is None  # maybe newer than the feed: Redis
    assert window.snapshot("e2", 2, 1000) is None  # before the resync point: not held


def test_a_resync_within_the_same_epoch_empties_the_window():
    window = filled(last=10)
    window.reset("e1", 10)  # history_lost at the same top: the frames may be other events
    assert not window.entries
    assert window.snapshot("e1", 9, 1000) is None


def test_too_far_behind_is_answered_without_entries():
    window = filled(last=2000, capacity=5)
    snapshot = window.snapshot("e1", 10, 1000)
    assert snapshot == Snapshot("e1", 2000)
    plan = plan_subscription("e1", 10, snapshot, 1000)
    assert plan.resync is not None and plan.resync.reason == ResyncReason.TOO_FAR_BEHIND


def test_a_tagged_cursor_too_far_behind_is_answered_without_a_read():
    """Further behind than ``max_replay`` is a resync to the top whatever the event at the
    cursor: a reconnect storm of clients back from a long outage, each sending a tag the window
    cannot check (their events left it long ago), needs no Redis read per client. A tag the
    window can check and finds another event for is still ``history_lost``."""
    window = filled(last=2000, capacity=5)
    snapshot = window.snapshot("e1", 10, 1000, tag="tag-nobody-knows")
    assert snapshot is not None and snapshot.after_tag is None
    plan = plan_subscription("e1", 10, snapshot, 1000, tag="tag-nobody-knows")
    assert plan.resync is not None and plan.resync.reason == ResyncReason.TOO_FAR_BEHIND
    assert window.snapshot("e1", 1990, 1000, tag="tag-nobody-knows") is None  # in range: a read
    small: ResumeWindow[str] = ResumeWindow(20, tag_of=lambda it: f"tag-of-{it}")
    small.reset("e1", 0)
    for seq in range(1, 21):
        small.append(seq, item("e1", seq), 10)
    known = small.snapshot("e1", 5, 10, tag="another-event")
    assert known is not None and known.after_tag == "tag-of-e1:5"
    plan = plan_subscription("e1", 5, known, 10, tag="another-event")
    assert plan.resync is not None and plan.resync.reason == ResyncReason.HISTORY_LOST


def test_an_append_out_of_sequence_never_leaves_a_hole():
    window = filled(last=10)
    window.append(12, item("e1", 12), 10)
    assert [seq for seq, _, _ in window.entries] == [12]
    assert window.snapshot("e1", 10, 1000) is None


def test_a_window_reset_where_nothing_is_known_of_the_event_answers_only_contiguous_replays():
    """Seed 199 of the interleavings walk, ruled out here: a history_lost reset at 20, whose
    event retention had trimmed (no tag), then the feed's frames. A tagless client at 20 gets
    21' to 23' or a read, never 23' alone."""
    window: ResumeWindow[str] = ResumeWindow(4, tag_of=lambda text: text)
    window.reset("e1", 20, None)
    assert replayed(window.snapshot("e1", 20, 20)) == []  # at the top: nothing to replay
    assert window.snapshot("e1", 20, 20, tag="old 20") is None  # only a read can check it
    for seq in (21, 22, 23):
        window.append(seq, item("e1", seq), 10)
    assert replayed(window.snapshot("e1", 20, 20)) == [21, 22, 23]
    window.reset("e1", 20, None)
    window.append(23, item("e1", 23), 10)  # never done by the hub: the guard empties it
    assert window.snapshot("e1", 20, 20) is None


def test_prepend_only_joins_a_run_that_ends_right_before_the_window():
    window = filled(last=10, capacity=8)  # holds 3..10
    generation = window.generation
    window.entries.popleft()  # 4..10
    window.entries.popleft()  # 5..10 (as if trimmed by the budget)
    run = [(s, item("e1", s), 10) for s in range(1, 4)]  # ends at 3: does not join 5
    assert window.prepend(generation, "e1", run) == 0
    run = [(s, item("e1", s), 10) for s in range(1, 5)]  # ends at 4: joins; room for 2
    assert window.prepend(generation, "e1", run) == 2
    assert [seq for seq, _, _ in window.entries] == list(range(3, 11))
    window.reset("e1", 10)  # a resync at the same cursor (history_lost): lo is 11 again
    run = [(s, item("e1", s), 10) for s in range(5, 11)]  # joins 11, but was read before it
    assert window.prepend(generation, "e1", run) == 0


def test_seed_run_is_the_contiguous_run_ending_at_end():
    assert seed_run([(1, b"a"), (2, b"b"), (4, b"d"), (5, b"e")], 5) == [(4, b"d"), (5, b"e")]
    assert seed_run([(1, b"a"), (2, b"b")], 3) == []  # stops short (trimmed or corrupt at 3)
    assert seed_run([(1, b"a"), (2, b"b"), (3, b"c")], 2) == [(1, b"a"), (2, b"b")]


def test_a_memo_is_forgotten_when_the_entries_change_and_counts_in_the_budget():
    budget = WindowBudget(limit=1000)
    window: ResumeWindow[str] = ResumeWindow(5, budget)
    window.reset("e1", 0)
    for seq in range(1, 4):
        window.append(seq, item("e1", seq), 10)
    assert window.remember(("e1", 1), "replay after 1", 50)
    assert window.recall(("e1", 1)) == "replay after 1" and window.recall(("e1", 2)) is None
    assert window.bytes == budget.bytes == 80
    window.append(4, item("e1", 4), 10)  # a new event: another answer for that cursor
    assert window.recall(("e1", 1)) is None and window.bytes == budget.bytes == 40
    window.remember(("e1", 1), "replay after 1", 50)
    window.drop_oldest()  # trimmed (the budget)
    assert window.recall(("e1", 1)) is None and window.bytes == budget.bytes == 30
    window.remember(("e1", 2), "replay after 2", 50)
    window.prepend(window.generation, "e1", [(1, item("e1", 1), 10)])  # a fill
    assert window.memo is None and window.bytes == budget.bytes == 40
    window.remember(("e1", 2), "replay after 2", 50)
    window.reset("e2", 9)
    assert window.memo is None and window.bytes == budget.bytes == 0
    # Never at an entry's expense: without room in the budget it is not kept.
    for seq in range(10, 15):
        window.append(seq, item("e2", seq), 10)
    budget.limit = budget.bytes + 49
    assert not window.remember(("e2", 9), "replay after 9", 50)
    assert window.memo is None and len(window.entries) == 5 and budget.bytes == 50


def test_the_budget_drops_memos_before_any_entry():
    # A memo only saves work; an entry saves a client a Redis read. When the pod's windows
    # pass the budget, the memos go first: an entry is evicted only if that is not enough.
    budget = WindowBudget(limit=1000)
    idle: ResumeWindow[str] = ResumeWindow(10, budget)
    busy: ResumeWindow[str] = ResumeWindow(10, budget)
    idle.reset("e1", 0)
    busy.reset("e1", 0)
    idle.append(1, item("e1", 1), 300)
    idle.append(2, item("e1", 2), 300)
    assert idle.remember(("e1", 0), "replay after 0", 100)
    busy.append(1, item("e1", 1), 300)
    assert budget.bytes == 1000
    busy.append(2, item("e1", 2), 50)  # 50 over: the idle window's memo is enough
    assert idle.memo is None and len(idle.entries) == 2 and len(busy.entries) == 2
    assert budget.bytes == idle.bytes + busy.bytes == 950
    # Memos of several windows: the one kept longest goes first, then the next one.
    assert idle.remember(("e1", 1), "replay after 1", 20)
    assert busy.remember(("e1", 1), "replay after 1", 20)
    busy.append(3, item("e1", 3), 30)  # (forgets busy's memo) 1000: within the limit
    assert idle.memo is not None and budget.bytes == 1000
    busy.append(4, item("e1", 4), 10)  # 10 over: idle's memo goes, no entry
    assert idle.memo is None and len(idle.entries) == 2 and budget.bytes == 990
    # With no memo left, entries go as before (the least recently appended window first).
    busy.append(5, item("e1", 5), 20)
    assert len(idle.entries) == 1 and budget.bytes == 710


def test_the_pod_budget_evicts_the_least_recently_appended_window_first():
    budget = WindowBudget(limit=100)
    idle: ResumeWindow[str] = ResumeWindow(100, budget)
    busy: ResumeWindow[str] = ResumeWindow(100, budget)
    idle.reset("a", 0)
    busy.reset("b", 0)
    for seq in range(1, 6):
        idle.append(seq, item("a", seq), 10)
    for seq in range(1, 8):
        busy.append(seq, item("b", seq), 10)
    assert budget.bytes == 100 and idle.bytes + busy.bytes == 100
    assert [s for s, _, _ in idle.entries] == [3, 4, 5]  # the idle one lost its oldest first
    assert idle.snapshot("a", 5, 1000) is not None  # its clients, at last, are still answered
    busy.clear()
    assert budget.bytes == idle.bytes == 30


# --- property: random appends, resets, fills and queries against a reference model ------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 2), st.integers(1, 40)),
        st.tuples(st.just("reset"), st.integers(0, 2), st.sampled_from(["e1", "e2", "e3"])),
        st.tuples(st.just("fill"), st.integers(0, 2), st.integers(0, 12)),
        st.tuples(st.just("query"), st.integers(0, 2), st.integers(-2, 40)),
        st.tuples(st.just("memo"), st.integers(0, 2), st.integers(-2, 40)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    ops=operations,
    capacity=st.integers(0, 8),
    limit=st.one_of(st.none(), st.integers(0, 300)),
    max_replay=st.integers(1, 12),
)
def test_window_answers_like_a_read_at_its_cursor_or_not_at_all(ops, capacity, limit, max_replay):
    budget = WindowBudget(limit if limit is not None else 1 << 60)
    windows: list[ResumeWindow[str]] = [ResumeWindow(capacity, budget) for _ in range(3)]
    # The reference: each window's cursor, the epochs it left, and, with no byte limit, how many
    # entries it must hold (all of the run since its last reset, up to the capacity).
    cursor: list[tuple[str, int] | None] = [None, None, None]
    retired: list[list[str]] = [[], [], []]
    held = [0, 0, 0]
    for op, index, arg in ops:
        window = windows[index]
        if op == "append" and cursor[index] is not None:
            epoch, last = cursor[index]
            window.append(last + 1, item(epoch, last + 1), arg)
            cursor[index] = (epoch, last + 1)
            held[index] = min(capacity, held[index] + 1)
        elif op == "reset":
            last = cursor[index][1] if cursor[index] is not None else 0
            if cursor[index] is not None and cursor[index][0] != arg:
                retired[index].append(cursor[index][0])
            window.reset(arg, last + 3)
            cursor[index] = (arg, last + 3)
            held[index] = 0
        elif op == "fill" and cursor[index] is not None:
            epoch, _ = cursor[index]
            end = window.lo - 1
            run = [(s, item(epoch, s), 5) for s in range(max(1, end - arg + 1), end + 1)]
            added = window.prepend(window.generation, epoch, run)
            assert added <= len(run)
            held[index] = min(capacity, held[index] + added)
        elif op == "memo" and cursor[index] is not None:
            # What the hub does: remember what it derived from an answer, for that cursor.
            epoch, _ = cursor[index]
            answer = window.snapshot(epoch, arg, max_replay)
            if answer is not None and answer.entries:
                window.remember((epoch, arg), replayed(answer), 7)
        elif op == "query":
            for epoch in ["e1", "e2", "e3", None]:
                check_answer(window, cursor[index], retired[index], epoch, arg, max_replay)
                # A memo is never stale: what the window would answer now.
                kept = window.recall((epoch, arg))
                if kept is not None:
                    assert kept == replayed(window.snapshot(epoch, arg, max_replay))
            if cursor[index] is not None:
                epoch, last = cursor[index]
                if limit is None and 0 <= last - held[index] <= arg <= last:
                    assert window.snapshot(epoch, arg, max_replay) is not None, "must answer"
        # Invariants: contiguous up to the cursor, within the count, the pod's bytes counted.
        for each, at in zip(windows, cursor, strict=True):
            seqs = [s for s, _, _ in each.entries]
            assert seqs == list(range(each.lo, each.last + 1))
            assert len(seqs) <= capacity
            if at is not None:
                assert (each.epoch, each.last) == at
        assert budget.bytes == sum(w.bytes for w in windows)
        assert budget.bytes <= budget.limit
        if limit is None:
            assert [len(w.entries) for w in windows] == held


def check_answer(window, cursor, retired, epoch, after, max_replay) -> None:
    """An answer, when given, is the one a read at the window's cursor would give."""
    client = (epoch, after if epoch is not None else None)
    answer = window.snapshot(*client, max_replay)
    if answer is None:
        return
    assert cursor is not None
    current, last = cursor
    assert (answer.epoch, answer.top) == (current, last)
    truth = [(s, item(current, s)) for s in range(after + 1, last + 1)]
    plan = plan_subscription(*client, answer, max_replay)
    if epoch is None:
        assert plan.resync is None and plan.replay == []
    elif epoch != current:
        assert epoch in retired
        assert plan.resync is not None and plan.resync.reason == ResyncReason.EPOCH_CHANGED
    elif last - after > max_replay:
        assert plan.resync is not None and plan.resync.reason == ResyncReason.TOO_FAR_BEHIND
    else:
        assert plan.resync is None and [entry[:2] for entry in plan.replay] == truth


def test_a_tagged_cursor_is_answered_only_where_the_window_can_check_it():
    """With tags (schemas.tags), the window names the tags of the events at the cursor and at
    the top; a tagged cursor whose event the window does not hold (``lo - 1``) goes to Redis,
    which can compare it; an untagged one is answered as before."""
    window: ResumeWindow[str] = ResumeWindow(5, tag_of=lambda it: f"tag-of-{it}")
    window.reset("e1", 0)
    for seq in range(1, 11):
        window.append(seq, item("e1", seq), 10)
    inside = window.snapshot("e1", 7, 1000, tag="x")
    assert inside is not None and replayed(inside) == [8, 9, 10]
    assert (inside.after_tag, inside.top_tag) == ("tag-of-e1:7", "tag-of-e1:10")
    # lo - 1: the event the window dropped last, checked from memory too (a storm's cursor).
    base = window.snapshot("e1", 5, 1000, tag="x")
    assert base is not None and replayed(base) == [6, 7, 8, 9, 10]
    assert base.after_tag == "tag-of-e1:5"
    assert window.snapshot("e1", 4, 1000, tag="x") is None  # older: Redis
    fresh = window.snapshot(None, None, 1000)
    assert fresh is not None and fresh.top_tag == "tag-of-e1:10"
    # Reset at a cursor the feed read (a resync, a baseline): its tag is the top's.
    window.reset("e1", 20, "tag-at-20")
    at_top = window.snapshot("e1", 20, 1000, tag="x")
    assert at_top is not None and (at_top.after_tag, at_top.top_tag) == ("tag-at-20", "tag-at-20")
    # A window reset at a read's top and then appended to: the reset's tag names lo - 1.
    window.append(21, item("e1", 21), 10)
    after_reset = window.snapshot("e1", 20, 1000, tag="x")
    assert after_reset is not None and after_reset.after_tag == "tag-at-20"
    window.reset("e1", 30)
    assert window.snapshot("e1", 30, 1000, tag="x") is None


@pytest.mark.parametrize("capacity, budget", [(0, None), (5, 25)])
def test_an_emptied_window_names_the_tag_of_its_own_last_event(capacity, budget):
    """A window with no entry left (capacity 0: windows off; or its entries evicted by the byte
    budget) still answers a resume at ``last``: it names the tag of the event it delivered
    there, not the tag its last reset was given for an older event (which made every tagged
    resume at the top history_lost, and ``subscribed`` name a wrong tag)."""
    limit = WindowBudget(budget) if budget is not None else None
    window: ResumeWindow[str] = ResumeWindow(capacity, limit, tag_of=lambda it: f"tag-of-{it}")
    window.reset("e1", 5, "tag-of-e1:5")
    window.append(6, item("e1", 6), 10)
    if limit is not None:
        other: ResumeWindow[str] = ResumeWindow(5, limit, tag_of=lambda it: f"tag-of-{it}")
        other.reset("e2", 0)
        for seq in range(1, 4):  # the other feed's appends evict this one's entry
            other.append(seq, item("e2", seq), 10)
    assert window.entries == collections.deque() and window.last == 6
    at_top = window.snapshot("e1", 6, 1000, tag="tag-of-e1:6")
    assert at_top is not None and (at_top.after_tag, at_top.top_tag) == ("tag-of-e1:6",) * 2
    plan = plan_subscription("e1", 6, at_top, 1000, tag="tag-of-e1:6")
    assert plan.resync is None and plan.resumed and plan.tag == "tag-of-e1:6"
    fresh = window.snapshot(None, None, 1000)
    assert fresh is not None and fresh.top_tag == "tag-of-e1:6"


def test_the_byte_budget_keeps_nothing_of_what_it_evicts_but_an_emptied_windows_tag():
    """What the budget evicts leaves its bytes: an evicted frame is not kept as the event below
    the window (one per feed, outside the budget, could add up to a frame per project). An
    emptied window keeps its last event's tag, which resumes at its top need."""
    limit = WindowBudget(25)
    window: ResumeWindow[str] = ResumeWindow(5, limit, tag_of=lambda it: f"tag-of-{it}")
    window.reset("e1", 0)
    window.append(1, item("e1", 1), 10)
    window.append(2, item("e1", 2), 10)
    other: ResumeWindow[str] = ResumeWindow(5, limit, tag_of=lambda it: f"tag-of-{it}")
    other.reset("e2", 0)
    other.append(1, item("e2", 1), 10)  # 30 bytes: this window's oldest entry goes
    assert [seq for seq, _, _ in window.entries] == [2] and window.base_item is None
    assert window.tag_at(1) is None
    other.append(2, item("e2", 2), 10)  # and its last one
    assert not window.entries and window.base_item is None
    assert window.tag_at(2) == "tag-of-e1:2"
