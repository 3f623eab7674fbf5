"""Every cursor the gateway names carries the tag of the event at that cursor, or no tag; never
another event's (docs/protocol.md, "Cursor tags"), on the paths other than a WebSocket joining a
feed (tests/test_hub_window_property.py): the resume window's edges (appends past its capacity,
the pod's byte budget evicting, fills from the history, resets with or without a tag, memos),
and a poll page's ``tag``. Pure: no sockets, no Redis."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.sequencing import Snapshot, plan_poll, plan_subscription
from gateway.window import ResumeWindow, WindowBudget
from schemas.tags import event_tag


def frame(epoch: str, seq: int, version: int = 0) -> bytes:
    """The event at ``(epoch, seq)``; ``version`` tells apart the events a failover made
    reuse one number."""
    return b'{"type":"x","project_id":1,"e":"%s","v":%d,"seq":%d}' % (epoch.encode(), version, seq)


# --- the resume window -----------------------------------------------------------------------

window_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 2), st.integers(1, 40)),
        # The feed moves without delivering (a resync, a baseline): to a new epoch, further on
        # in its epoch (retention trimmed what it missed), or back and on again after a
        # failover lost its last events and their numbers went to other events; the tag given
        # is that of the event there (a read's top), or none.
        st.tuples(st.just("reset"), st.integers(0, 2), st.integers(0, 11)),
        st.tuples(st.just("fill"), st.integers(0, 2), st.integers(0, 6)),
        st.tuples(st.just("memo"), st.integers(0, 2), st.integers(0, 30)),
    ),
    max_size=80,
)


class History:
    """One feed's history as Redis holds it now: its epoch and the event at each seq."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.resets = 0
        self.epoch = f"{name}e0"
        self.events: dict[int, bytes] = {}

    def at(self, seq: int) -> bytes:
        return self.events.setdefault(seq, frame(self.epoch, seq))

    def tag(self, seq: int) -> str | None:
        return event_tag(self.at(seq)) if seq > 0 else None


@settings(max_examples=500, deadline=None)
# A reset naming its top's tag, two events, and the byte budget evicts the first: the event
# below the window is now that one, whose tag the window no longer knows (not the reset's).
@example(ops=[("reset", 0, 7), ("append", 0, 10), ("append", 0, 10)], capacity=6, limit=15)
# The same after a drop by count, which keeps the dropped frame as the event below the window.
@example(
    ops=[("append", 0, 1), ("append", 0, 1), ("append", 0, 10), ("append", 0, 10)],
    capacity=2,
    limit=15,
)
@given(
    ops=window_ops,
    capacity=st.integers(0, 6),
    limit=st.sampled_from([None, 0, 15, 40, 90, 200]),
)
def test_the_window_names_the_tag_of_the_event_at_each_cursor_or_none(ops, capacity, limit):
    """Three windows sharing a pod's byte budget, each following its history: whatever the
    appends, evictions (by count and by bytes, of another window's doing too), resets (a new
    epoch, a trim, a failover that handed numbers out again), fills and memos, every tag the
    window names (:meth:`ResumeWindow.tag_at`, a snapshot's ``top_tag`` and ``after_tag``, the
    ``subscribed`` planned from it, a memo's) is that of its history's event at that seq, or
    None; and a client holding that event is never told its history was lost."""
    budget = WindowBudget(limit if limit is not None else 1 << 60)
    windows: list[ResumeWindow[bytes]] = [
        ResumeWindow(capacity, budget, tag_of=event_tag) for _ in range(3)
    ]
    histories = [History(f"w{i}") for i in range(3)]
    for window, history in zip(windows, histories, strict=True):
        window.reset(history.epoch, 0)
    for op, index, arg in ops:
        window = windows[index]
        history = histories[index]
        if op == "append":
            seq = window.last + 1
            window.append(seq, history.at(seq), arg)
        elif op == "reset":
            kind, distance = arg % 3, arg // 3
            last = window.last + distance
            if kind == 0:
                history.resets += 1
                history.epoch, history.events = f"{history.name}e{history.resets}", {}
            elif kind == 2:
                # The failover lost the events after ``lost``; new ones took their numbers.
                lost = max(0, window.last - distance)
                history.resets += 1
                for seq in range(lost + 1, last + 1):
                    history.events[seq] = frame(history.epoch, seq, history.resets)
            window.reset(history.epoch, last, history.tag(last) if arg % 2 else None)
        elif op == "fill":
            end = window.lo - 1
            run = [(s, history.at(s), 5) for s in range(max(1, end - arg + 1), end + 1)]
            window.prepend(window.generation, history.epoch, run)
        elif op == "memo":
            answer = window.snapshot(history.epoch, arg, 1000)
            if answer is not None and answer.entries:
                plan = plan_subscription(history.epoch, arg, answer, 1000)
                window.remember((history.epoch, arg), plan, 7)
        for each, at in zip(windows, histories, strict=True):
            check_tags(each, at)


def check_tags(window: ResumeWindow[bytes], history: History) -> None:
    last, epoch = window.last, history.epoch
    for seq in range(0, last + 2):
        named = window.tag_at(seq)
        assert named is None or named == history.tag(seq), (seq, window.lo, last)
    for after in range(0, last + 1):
        truth = history.tag(after)
        answer = window.snapshot(epoch, after, 1000, tag=truth)
        if answer is None:
            continue
        assert answer.top_tag in (None, history.tag(last))
        assert answer.after_tag in (None, truth)
        plan = plan_subscription(epoch, after, answer, 1000, truth)
        # The client's own tag, checked from memory, is never taken for another event's.
        assert plan.resync is None, (after, plan)
        assert plan.tag in (None, history.tag(plan.seq))
        kept = window.recall((epoch, after))
        if kept is not None:
            assert kept.tag in (None, history.tag(kept.seq))
    fresh = window.snapshot(None, None, 1000)
    assert fresh is not None
    assert fresh.top_tag in (None, history.tag(last))


def test_a_window_emptied_by_the_budget_after_a_fill_names_its_last_events_tag():
    """A fill prepends older entries; the budget then evicts the whole window, oldest first:
    what is left is the tag of the event at ``last``, never that of an entry evicted before."""
    budget = WindowBudget(1 << 20)
    window: ResumeWindow[bytes] = ResumeWindow(6, budget, tag_of=event_tag)
    window.reset("e", 4, event_tag(frame("e", 4)))
    window.append(5, frame("e", 5), 10)
    assert window.prepend(window.generation, "e", [(s, frame("e", s), 10) for s in (2, 3, 4)])
    budget.limit = 0
    budget.enforce()
    assert not window.entries
    assert window.tag_at(5) == event_tag(frame("e", 5))
    assert window.tag_at(4) is None


# --- poll pages ------------------------------------------------------------------------------


@st.composite
def poll_cases(draw):
    """A history (an epoch, its top, the entries the stream still holds after retention, maybe a
    hole or a foreign entry) as one atomic read sees it, and a poll's cursor (its epoch, the
    same or another; a seq behind, at or ahead of the top; the tag of the event the client has
    there, of another event the failover made it have, or none) with the page's limits."""
    epoch = "e1"
    top = draw(st.integers(0, 30))
    first = draw(st.integers(1, top + 1))  # retention kept first..top
    hole = draw(st.one_of(st.none(), st.integers(first, top + 1)))
    corrupt = draw(st.one_of(st.none(), st.integers(first, top + 1)))
    held = [s for s in range(first, top + 1) if s != hole]
    client_epoch = draw(st.sampled_from([epoch, epoch, epoch, "e0", None]))
    after = draw(st.integers(0, top + 3))
    version = draw(st.sampled_from([0, 0, 1, None]))  # 1: another event at that number
    limit = draw(st.integers(1, 8))
    cut = draw(st.integers(1, 8))  # the byte bound of a page: this many entries at most
    return epoch, top, held, corrupt, client_epoch, after, version, limit, cut


def read(epoch, top, held, corrupt, client_epoch, after, limit, cut) -> Snapshot:
    """What the SNAPSHOT script answers (schemas.lua), parsed as gateway.store does."""
    stored = set(held)

    def tag_at(seq: int) -> str | None:
        # Redis hashes what the entry holds, an event or not.
        if seq < 1 or seq not in stored:
            return None
        return event_tag(b"foreign" if seq == corrupt else frame(epoch, seq))

    entries: list[tuple[int, bytes]] = []
    corrupt_at = None
    if client_epoch == epoch and after is not None and 0 <= after < top:
        raw = [s for s in sorted(stored) if s > after][: min(limit, cut)]
        for seq in raw:
            if seq == corrupt:
                corrupt_at = seq
                break
            entries.append((seq, frame(epoch, seq)))
    after_tag = None
    if client_epoch == epoch and after is not None and 1 <= after <= top:
        after_tag = tag_at(after)
    return Snapshot(
        epoch, top, entries, corrupt_at=corrupt_at, top_tag=tag_at(top), after_tag=after_tag
    )


@settings(max_examples=600, deadline=None)
@given(case=poll_cases())
def test_a_poll_page_names_the_tag_of_the_event_at_the_cursor_to_poll_with_next(case):
    """The page's ``tag`` is that of the event at the cursor the client polls with next (the
    last event of the page; with none, the top); a resync's is that of the event at its seq."""
    epoch, top, held, corrupt, client_epoch, after, version, limit, cut = case
    if client_epoch is None:
        after = None
    tag = None
    if after and version is not None:
        tag = event_tag(frame(client_epoch, after, version))
    snapshot = read(epoch, top, held, corrupt, client_epoch, after, limit, cut)
    plan = plan_poll(client_epoch, after, snapshot, limit, tag)

    def truth(seq: int) -> str | None:
        if seq < 1 or seq not in held:
            return None
        return event_tag(b"foreign" if seq == corrupt else frame(epoch, seq))

    if plan.resync is not None:
        assert plan.events == []
        assert (plan.resync.epoch, plan.resync.seq) == (epoch, top)
        assert plan.resync.tag in (None, truth(top))
        assert plan.tag in (None, truth(top))
        return
    nxt = plan.events[-1][0] if plan.events else (after if after is not None else top)
    assert plan.tag in (None, truth(nxt)), (plan, nxt)
    if plan.events:
        assert plan.tag == event_tag(plan.events[-1][1])
    elif after is not None:
        # At the top: the client's own event there, checked (a tag of another one is a resync).
        assert after == top
        assert tag is None or plan.tag is None or plan.tag == tag
