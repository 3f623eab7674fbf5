"""The gateway's ordering logic, without sockets or Redis."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import sequencing
from gateway.frames import text_frame
from gateway.sequencing import (
    LOST,
    SEND,
    SKIP,
    FeedSequencer,
    Joiner,
    Resync,
    Snapshot,
    Step,
    plan_poll,
    plan_subscription,
)
from gateway.session import SlowConsumerPolicy
from schemas.history import parse_snapshot_reply
from schemas.protocol import ResyncReason
from schemas.tags import event_tag


def frame(seq: int) -> bytes:
    return b'{"type":"x","seq":%d}' % seq


def entries(first: int, last: int) -> list[tuple[int, bytes]]:
    return [(s, frame(s)) for s in range(first, last + 1)]


def started(epoch: str = "e1", top: int = 0) -> FeedSequencer:
    seq = FeedSequencer()
    step = seq.on_read(Snapshot(epoch, top), limit=1000)
    assert step.deliver == [] and not step.needs_read
    return seq


class TestFeedSequencer:
    def test_holds_live_messages_until_the_baseline_read(self):
        seq = FeedSequencer()
        assert seq.on_live("e1", 5, frame(5)).deliver == []
        assert seq.on_live("e1", 6, frame(6)).deliver == []
        step = seq.on_read(Snapshot("e1", 5), limit=1000)
        # 5 is covered by the baseline (subscribers read it themselves); 6 follows on.
        assert [s for s, _ in step.deliver] == [6]
        assert seq.last == 6 and not step.needs_read

    def test_in_order_messages_are_delivered_at_once(self):
        seq = started(top=3)
        for n in (4, 5, 6):
            assert [s for s, _ in seq.on_live("e1", n, frame(n)).deliver] == [n]

    def test_duplicates_are_dropped(self):
        seq = started(top=3)
        seq.on_live("e1", 4, frame(4))
        assert seq.on_live("e1", 4, frame(4)).deliver == []
        assert seq.on_live("e1", 2, frame(2)).deliver == []

    def test_a_gap_holds_later_messages_and_asks_for_a_read(self):
        seq = started(top=3)
        step = seq.on_live("e1", 6, frame(6))
        assert step.needs_read and step.deliver == []
        assert seq.on_live("e1", 7, frame(7)).deliver == []  # held while reading
        step = seq.on_read(Snapshot("e1", 7, entries(4, 7)), limit=1000)
        assert [s for s, _ in step.deliver] == [4, 5, 6, 7]
        assert not step.needs_read

    def test_a_read_cut_by_its_limit_asks_for_more(self):
        seq = started(top=0)
        seq.on_live("e1", 5, frame(5))
        step = seq.on_read(Snapshot("e1", 5, entries(1, 2)), limit=2)
        assert [s for s, _ in step.deliver] == [1, 2] and step.needs_read
        step = seq.on_read(Snapshot("e1", 5, entries(3, 4)), limit=2)
        assert [s for s, _ in step.deliver] == [3, 4, 5] and not step.needs_read

    def test_trimmed_history_gives_a_resync_never_a_silent_skip(self):
        seq = started(top=3)
        seq.on_live("e1", 9, frame(9))
        step = seq.on_read(Snapshot("e1", 9, entries(7, 9)), limit=1000)
        assert step.resync is not None
        assert step.resync.reason is ResyncReason.HISTORY_TRIMMED
        assert (step.resync.epoch, step.resync.seq) == ("e1", 9)
        assert step.deliver == []
        assert seq.on_live("e1", 10, frame(10)).deliver == [(10, frame(10))]

    def test_a_full_read_that_starts_past_the_gap_is_trimmed_history(self):
        """A batch as large as the limit but starting after last+1 must not be re-read forever."""
        seq = started(top=5)
        seq.on_live("e1", 5000, frame(5000))
        step = seq.on_read(Snapshot("e1", 5000, entries(3001, 4000)), limit=1000)
        assert step.resync is not None and step.resync.reason is ResyncReason.HISTORY_TRIMMED
        assert seq.last == 5000 and not step.needs_read

    def test_a_new_epoch_gives_a_resync(self):
        seq = started(top=40)
        step = seq.on_live("e2", 1, frame(1))
        assert step.needs_read and step.deliver == []
        step = seq.on_read(Snapshot("e2", 1), limit=1000)
        assert step.resync is not None and step.resync.reason is ResyncReason.EPOCH_CHANGED
        assert (seq.epoch, seq.last) == ("e2", 1)

    def test_history_behind_the_feed_is_reported_as_lost(self):
        seq = started(top=40)
        assert seq.request_read()
        step = seq.on_read(Snapshot("e1", 12), limit=1000)
        assert step.resync is not None and step.resync.reason is ResyncReason.HISTORY_LOST

    def test_behind_compares_the_observed_cursor(self):
        seq = started(top=4)
        assert not seq.behind("e1", 4)
        assert seq.behind("e1", 5)
        assert seq.behind("e2", 4)
        assert seq.behind(None, None)

    @settings(max_examples=200, deadline=None)
    @given(
        total=st.integers(1, 60),
        lost=st.sets(st.integers(1, 60)),
        dup=st.sets(st.integers(1, 60)),
        seed=st.integers(0, 2**16),
    )
    def test_any_loss_pattern_is_repaired_in_order_exactly_once(self, total, lost, dup, seed):
        """Live messages lost, duplicated and (within a read) reordered: what is delivered is
        always exactly 1..total, in order."""
        rng = random.Random(seed)
        seq = started(top=0)
        delivered: list[int] = []

        def run(step):
            delivered.extend(s for s, _ in step.deliver)
            while step.needs_read:
                available = entries(seq.last + 1, top) if seq.last is not None else []
                limit = rng.randint(1, 8)
                step = seq.on_read(Snapshot("e1", top, available[:limit]), limit=limit)
                delivered.extend(s for s, _ in step.deliver)

        for top in range(1, total + 1):
            if top not in lost:
                run(seq.on_live("e1", top, frame(top)))
            if top in dup:
                run(seq.on_live("e1", top, frame(top)))
        # The periodic check finds the tail that no later message revealed.
        if seq.behind("e1", total):
            assert seq.request_read()
            run(Step(needs_read=True))
        assert delivered == list(range(1, total + 1))


class TestFeedSequencerAgainstForeignValues:
    """What is in Redis may not be what the publish script wrote (issue 11)."""

    def test_a_corrupt_entry_is_announced_with_a_resync_after_the_events_before_it(self):
        seq = started(top=3)
        seq.on_live("e1", 8, frame(8))
        seq.begin_read()
        step = seq.on_read(Snapshot("e1", 8, entries(4, 5), corrupt_at=6, scanned=5), limit=1000)
        assert [s for s, _ in step.deliver] == [4, 5]
        assert step.resync is not None and step.resync.reason is ResyncReason.HISTORY_CORRUPT
        assert (step.resync.epoch, step.resync.seq) == ("e1", 8)
        assert not step.needs_read  # 8 is covered by the resync; 9 follows live
        assert seq.on_live("e1", 9, frame(9)).deliver == [(9, frame(9))]

    def test_an_overwritten_last_entry_is_announced_too(self):
        seq = started(top=3)
        seq.on_live("e1", 4, frame(4))
        seq.request_read()
        seq.begin_read()  # reads from 3 to check that 4 is still what was delivered
        step = seq.on_read(Snapshot("e1", 4, (), corrupt_at=4, scanned=1), limit=1000)
        assert step.resync is not None and step.resync.reason is ResyncReason.HISTORY_CORRUPT

    def test_foreign_entries_count_against_the_limit_so_a_full_read_is_not_trimmed(self):
        seq = started(top=0)
        seq.on_live("e1", 5, frame(5))
        seq.begin_read()
        # Two entries returned, one of them foreign (skipped): the read was cut by its limit.
        step = seq.on_read(Snapshot("e1", 5, entries(1, 1), scanned=2), limit=2)
        assert step.resync is None and step.needs_read
        step = seq.on_read(Snapshot("e1", 5, entries(2, 5)), limit=1000)
        assert [s for s, _ in step.deliver] == [2, 3, 4, 5]

    def test_a_message_numbered_beyond_the_top_is_dropped_by_the_next_read(self):
        seq = started(top=3)
        step = seq.on_live("e1", 999_999, frame(999_999))  # forged on the channel
        assert step.needs_read
        seq.begin_read()  # begun after it arrived: the publish script would have stored it
        step = seq.on_read(Snapshot("e1", 3), limit=1000)
        assert step.dropped_ahead == 1 and not step.needs_read and step.deliver == []
        assert seq.on_live("e1", 4, frame(4)).deliver == [(4, frame(4))]

    def test_a_message_arriving_during_a_read_is_kept_for_the_next_one(self):
        seq = started(top=3)
        seq.on_live("e1", 5, frame(5))
        seq.begin_read()
        seq.on_live("e1", 6, frame(6))  # arrives while the read is in flight
        step = seq.on_read(Snapshot("e1", 4, entries(4, 4)), limit=1000)
        # 5 arrived before the read and is beyond its top 4: it is dropped; 6 may be in flight.
        assert [s for s, _ in step.deliver] == [4] and step.dropped_ahead == 1
        assert step.needs_read and 6 in seq.held
        seq.begin_read()
        step = seq.on_read(Snapshot("e1", 6, entries(5, 6)), limit=1000)
        assert [s for s, _ in step.deliver] == [5, 6] and not step.needs_read

    def test_a_catch_up_asked_during_a_read_runs_right_after_it(self):
        """Issue 11 #13: the read in flight may predate what the caller knows was published."""
        seq = started(top=3)
        assert seq.request_read()
        seq.begin_read()
        assert not seq.request_read()  # a read is in flight: no second one at once...
        step = seq.on_read(Snapshot("e1", 3), limit=1000)
        assert step.needs_read  # ...but one more right after it
        seq.begin_read()
        step = seq.on_read(Snapshot("e1", 5, entries(4, 5)), limit=1000)
        assert [s for s, _ in step.deliver] == [4, 5] and not step.needs_read


class TestJoiner:
    def test_frames_captured_before_the_read_follow_the_replay_without_overlap(self):
        joiner = Joiner()
        for seq in (5, 6, 7):
            assert joiner.offer("e1", seq, f"f{seq}") == (False, False)
        # The read saw the top at 6: 5 and 6 came in the replay, 7 follows `subscribed`.
        assert joiner.start_live("e1", 6) == ["f7"]
        assert joiner.caught_up("e1", 7)

    def test_a_lagging_feed_is_filtered_until_it_reaches_the_start(self):
        joiner = Joiner()
        assert joiner.start_live("e1", 10) == []
        assert not joiner.caught_up("e1", 8)
        assert joiner.offer("e1", 9, "f9") == (False, False)
        assert joiner.offer("e1", 10, "f10") == (False, True)  # caught up, nothing to send
        assert joiner.offer("e1", 11, "f11") == (True, True)

    def test_frames_of_another_epoch_are_never_passed(self):
        joiner = Joiner()
        joiner.offer("old", 50, "stale")
        assert joiner.start_live("new", 3) == []
        assert joiner.offer("old", 51, "stale") == (False, False)

    def test_a_resync_while_joining_moves_the_start(self):
        joiner = Joiner()
        joiner.offer("e1", 8, "f8")
        assert not joiner.offer_resync("e2", 0, "resync")  # captured, sent in order later
        joiner.offer("e2", 1, "g1")
        assert joiner.start_live("e1", 9) == ["resync", "g1"]
        assert (joiner.epoch, joiner.threshold) == ("e2", 1)
        assert joiner.offer_resync("e3", 4, "resync2")  # after the read: send now
        assert joiner.caught_up("e3", 4)

    def test_a_resync_to_where_the_connection_stands_already_is_not_passed_on(self):
        """Redis restarted empty: the connection's own read created the new epoch and told the
        client (``resync_required`` at 0), the feed finds it later and resyncs its subscribers to
        that cursor, or an older one of it: nothing for this client."""
        joiner = Joiner()
        assert joiner.start_live("new", 0) == []
        assert not joiner.offer_resync("new", 0, "resync")
        assert joiner.caught_up("new", 0)
        joiner = Joiner()
        assert joiner.start_live("new", 2) == []
        assert not joiner.offer_resync("new", 1, "resync")  # it would get 2 again after it
        assert (joiner.epoch, joiner.threshold) == ("new", 2)
        assert joiner.offer("new", 2, "g2") == (False, True)
        # Past it: the feed's resync is about where the feed stood; the client stands in this
        # history at 2 and reads 3..5 from it (below).
        assert joiner.offer_resync("new", 5, "resync") == sequencing.CATCH_UP
        assert joiner.catch_up_from() == ("new", 2, None)

    def test_a_feed_resync_past_a_joiner_in_its_own_history_is_a_read_from_the_joiner_cursor(self):
        """Redis restarted empty; a connection's own read created the new epoch and told the
        client ``resync_required(epoch_changed)`` at ``("new", 0)``, ahead of the feed (still
        in the old epoch). Events 1..37 are published; the feed learns of the new epoch from 37
        (it missed 1..36: its pub/sub link was down) and resyncs its subscribers to 37. That
        resync is about the feed's old cursor: the client, at ``("new", 0)``, is owed 1..37,
        exactly once and in order, which its own history still holds. So the connection is not
        told to resync a second time (nor that the epoch it has changed): it reads from its own
        cursor, like a resume, and the feed's resync is kept behind that read (sent only if the
        read does not answer)."""
        feed = started("old", 3)
        joiner: Joiner[str] = Joiner()
        assert joiner.start_live("new", 0, None, feed=(feed.epoch, feed.last)) == []
        assert feed.on_live("new", 37, frame(37)).needs_read
        feed.begin_read()
        step = feed.on_read(Snapshot("new", 37, top_tag="t37"), limit=1000)
        assert step.resync == Resync(ResyncReason.EPOCH_CHANGED, "new", 37, "t37")
        verdict = joiner.offer_resync("new", 37, "resync")
        assert verdict != SEND  # it was sent: the client reloaded a second time, missing 1..37
        assert verdict == sequencing.CATCH_UP
        assert joiner.catch_up_from() == ("new", 0, None)
        assert not joiner.caught_up("new", 37)  # it waits for its read
        assert joiner.offer("new", 38, "f38") == (SKIP, False)  # captured meanwhile
        # The read answers 1..37 (a replay, planned as for a resume), top 37: the feed's
        # resync is behind it, 38 follows.
        plan = plan_subscription("new", 0, Snapshot("new", 38, entries(1, 38)), 1000)
        assert [s for s, _ in plan.replay] == list(range(1, 39)) and plan.resync is None
        assert joiner.start_live(plan.epoch, plan.seq, plan.tag, feed=("new", 38)) == []
        joiner = Joiner()
        joiner.start_live("new", 0)
        assert joiner.offer_resync("new", 37, "resync") == sequencing.CATCH_UP
        joiner.offer("new", 38, "f38")
        assert joiner.start_live("new", 37, feed=("new", 38)) == ["f38"]
        assert joiner.caught_up("new", 38)

    def test_a_feed_resync_captured_during_the_first_read_past_it_is_read_for_too(self):
        """The same resync, captured while the connection's *first* read was in flight (the
        read answered ``("new", 0)``: it created the new history): it is about the feed's
        cursor, not the client's, so it is read for from the read's cursor like one that comes
        after it, and what was captured after it waits behind that read."""
        joiner: Joiner[str] = Joiner()
        assert joiner.offer_resync("new", 37, "resync") == SKIP  # captured
        assert joiner.offer("new", 38, "f38") == (SKIP, False)
        assert joiner.start_live("new", 0, None, feed=("new", 38), catch_up=True) == []
        assert joiner.catch_up_from() == ("new", 0, None)
        assert not joiner.caught_up("new", 38) and not joiner.ahead
        # Its read answers 1..38: the resync and 38 are behind it.
        assert joiner.start_live("new", 38, feed=("new", 38), catch_up=True) == []
        assert joiner.caught_up("new", 38)

    def test_what_is_captured_before_a_resync_read_for_is_sent_first(self):
        joiner: Joiner[str] = Joiner()
        joiner.offer("new", 1, "f1")
        joiner.offer_resync("new", 5, "resync")
        joiner.offer("new", 6, "f6")
        assert joiner.start_live("new", 0, feed=("new", 6), catch_up=True) == ["f1"]
        assert joiner.catch_up_from() == ("new", 1, None)
        # Without ``catch_up`` (the read for it failed), the resync is sent, as before.
        assert joiner.start_live("new", 1, feed=("new", 6)) == ["resync", "f6"]
        assert joiner.caught_up("new", 6)

    def test_a_joiner_whose_own_read_does_not_answer_gets_the_feeds_resync(self):
        """Never silence: when the connection's read fails (Redis unavailable), it stays where
        it stood and the feed's resync, captured first, is sent as it was before."""
        joiner: Joiner[str] = Joiner()
        joiner.start_live("new", 0)
        assert joiner.offer_resync("new", 37, "resync") == sequencing.CATCH_UP
        joiner.offer("new", 38, "f38")
        assert joiner.start_live("new", 0, feed=("new", 38)) == ["resync", "f38"]
        assert joiner.caught_up("new", 38)

    def test_the_resync_read_for_is_dropped_when_the_read_finds_another_history(self):
        """Redis was emptied again before the catch-up read: the read tells the client
        ``epoch_changed`` to ``"again"``; the resync it read for, in the history before, must
        not then take the client back there. A read in the same history keeps it (behind the
        read, or still ahead of it and sent)."""
        joiner: Joiner[str] = Joiner()
        joiner.start_live("new", 0)
        assert joiner.offer_resync("new", 37, "resync") == sequencing.CATCH_UP
        joiner.offer("new", 38, "f38")
        joiner.read_found("again")
        assert joiner.start_live("again", 0, feed=("new", 38)) == []
        assert not joiner.caught_up("new", 38)  # ahead of the feed by a history: it waits
        joiner = Joiner()
        joiner.start_live("new", 0)
        assert joiner.offer_resync("new", 37, "resync") == sequencing.CATCH_UP
        joiner.read_found("new")
        assert joiner.start_live("new", 5, feed=("new", 37)) == ["resync"]

    def test_only_a_resync_in_the_joiners_own_history_is_read_for(self):
        """Another epoch, or ``history_lost`` (the history the client read was rewritten),
        is the client's own resync: sent at once, as before."""
        joiner: Joiner[str] = Joiner()
        joiner.start_live("new", 0)
        assert joiner.offer_resync("newer", 5, "resync") == SEND
        assert joiner.offer_resync("newer", 9, "lost", lost=True) == SEND
        assert (joiner.epoch, joiner.threshold) == ("newer", 9)
        assert joiner.catch_up_from() is None

    def test_a_captured_resync_the_read_is_past_is_not_passed_on(self):
        joiner = Joiner()
        joiner.offer("old", 9, "f9")
        joiner.offer_resync("new", 0, "resync")  # the feed moves while the read is in flight
        joiner.offer("new", 1, "g1")
        joiner.offer("new", 2, "g2")
        assert joiner.start_live("new", 1) == ["g2"]  # the read saw the new epoch up to 1
        assert (joiner.epoch, joiner.threshold) == ("new", 2)

    def test_history_lost_is_passed_on_even_where_the_connection_stands(self):
        """The history the connection read itself was rewritten (a failover): it must reload."""
        joiner = Joiner()
        joiner.offer_resync("e1", 3, "lost", lost=True)
        assert joiner.start_live("e1", 5) == ["lost"]
        assert (joiner.epoch, joiner.threshold) == ("e1", 3)
        assert joiner.offer_resync("e1", 3, "lost again", lost=True)


class TestPlanSubscription:
    def test_fresh_subscribe_starts_at_the_top(self):
        plan = plan_subscription(None, None, Snapshot("e1", 7), max_replay=100)
        assert (plan.replay, plan.resync, plan.seq, plan.resumed) == ([], None, 7, False)

    def test_resume_replays_exactly_what_was_missed(self):
        plan = plan_subscription("e1", 4, Snapshot("e1", 7, entries(5, 7)), max_replay=100)
        assert [s for s, _ in plan.replay] == [5, 6, 7]
        assert plan.resumed and plan.resync is None and plan.seq == 7

    def test_resume_at_the_top_replays_nothing(self):
        plan = plan_subscription("e1", 7, Snapshot("e1", 7), max_replay=100)
        assert plan.replay == [] and plan.resumed

    @pytest.mark.parametrize(
        ("epoch", "after", "snapshot", "reason"),
        [
            ("old", 4, Snapshot("e1", 7), ResyncReason.EPOCH_CHANGED),
            ("e1", 9, Snapshot("e1", 7), ResyncReason.HISTORY_LOST),
            ("e1", 1, Snapshot("e1", 500), ResyncReason.TOO_FAR_BEHIND),
            ("e1", 2, Snapshot("e1", 7, entries(5, 7)), ResyncReason.HISTORY_TRIMMED),
            (
                "e1",
                2,
                Snapshot("e1", 7, entries(3, 4), corrupt_at=5, scanned=3),
                ResyncReason.HISTORY_CORRUPT,
            ),
        ],
    )
    def test_unhonourable_cursors_resync_to_the_top(self, epoch, after, snapshot, reason):
        plan = plan_subscription(epoch, after, snapshot, max_replay=100)
        assert plan.resync is not None and plan.resync.reason is reason
        assert plan.replay == [] and not plan.resumed
        assert (plan.resync.epoch, plan.resync.seq, plan.seq) == ("e1", snapshot.top, snapshot.top)


class TestPlanPoll:
    def test_pages_through_history(self):
        plan = plan_poll("e1", 2, Snapshot("e1", 10, entries(3, 5)), limit=3)
        assert [s for s, _ in plan.events] == [3, 4, 5] and plan.more

    def test_last_page(self):
        plan = plan_poll("e1", 8, Snapshot("e1", 10, entries(9, 10)), limit=3)
        assert [s for s, _ in plan.events] == [9, 10] and not plan.more

    def test_no_cursor_only_tells_the_top(self):
        plan = plan_poll(None, None, Snapshot("e1", 10), limit=3)
        assert plan.events == [] and plan.resync is None

    def test_a_corrupt_entry_ends_the_page_then_resyncs(self):
        snapshot = Snapshot("e1", 10, entries(3, 4), corrupt_at=5, scanned=3)
        plan = plan_poll("e1", 2, snapshot, limit=5)
        assert [s for s, _ in plan.events] == [3, 4] and plan.more and plan.resync is None
        plan = plan_poll("e1", 4, Snapshot("e1", 10, (), corrupt_at=5, scanned=1), limit=5)
        assert plan.events == [] and plan.resync.reason is ResyncReason.HISTORY_CORRUPT
        assert (plan.resync.epoch, plan.resync.seq) == ("e1", 10)

    def test_a_frame_that_is_not_json_ends_the_page_then_resyncs(self):
        """A frame another writer put in the stream, with its header and ``seq`` right but no
        JSON: embedded in the page as stored, it made the whole answer invalid JSON, so a
        poller failed on that page for ever (eventbus.js: poll_failed, the same page again).
        The read takes it for a corrupt entry (schemas.stored's frame check): the events before
        it are paged, then a resync past it."""
        bad = b'{"type":"blocker_resolved","project_id":1,garbage,"seq":5}'

        def read(after: int) -> Snapshot:
            """What the read after ``after`` gives (as the store reads it from Redis)."""
            good = b'{"type":"x","project_id":1,"seq":%d}'
            frames = {seq: good % seq for seq in range(after + 1, 9)} | {5: bad}
            raw = [[b"%d-0" % seq, [b"f", frames[seq]]] for seq in sorted(frames)]
            return parse_snapshot_reply(1, [b"e1", 10, 0, raw, b"", b"", b""])[0]

        plan = plan_poll("e1", 2, read(2), limit=6)
        assert [s for s, _ in plan.events] == [3, 4] and plan.more and plan.resync is None
        plan = plan_poll("e1", 4, read(4), limit=5)
        assert plan.events == [] and plan.resync.reason is ResyncReason.HISTORY_CORRUPT
        assert (plan.resync.epoch, plan.resync.seq) == ("e1", 10)

    def test_a_hole_in_the_history_ends_the_page_then_resyncs(self):
        snapshot = Snapshot("e1", 10, [*entries(3, 4), *entries(6, 8)])
        plan = plan_poll("e1", 2, snapshot, limit=5)
        assert [s for s, _ in plan.events] == [3, 4] and plan.more and plan.resync is None
        plan = plan_poll("e1", 4, Snapshot("e1", 10, entries(6, 8)), limit=5)
        assert plan.events == [] and plan.resync.reason is ResyncReason.HISTORY_TRIMMED

    def test_trimmed_and_foreign_cursors_resync(self):
        assert plan_poll("e1", 1, Snapshot("e1", 10, entries(5, 7)), 3).resync.reason is (
            ResyncReason.HISTORY_TRIMMED
        )
        assert plan_poll("x", 1, Snapshot("e1", 10), 3).resync.reason is (
            ResyncReason.EPOCH_CHANGED
        )


class TestSlowConsumerPolicy:
    def test_over_the_limit(self):
        policy = SlowConsumerPolicy(limit=1000, stall_timeout=5)
        assert not policy.over_limit(1000)
        assert policy.over_limit(1001)

    def test_a_buffer_that_stops_draining_is_stalled_after_the_timeout(self):
        policy = SlowConsumerPolicy(limit=10**6, stall_timeout=5)
        since = policy.stalled(100, 0, None, now=0.0)
        assert since == 0.0
        since = policy.stalled(150, 100, since, now=4.0)
        assert not policy.is_stalled(since, 4.0)
        since = policy.stalled(150, 150, since, now=5.5)
        assert policy.is_stalled(since, 5.5)

    def test_a_draining_buffer_is_not_stalled(self):
        policy = SlowConsumerPolicy(limit=10**6, stall_timeout=5)
        since = policy.stalled(100, 0, None, now=0.0)
        assert policy.stalled(50, 100, since, now=10.0) is None
        assert policy.stalled(0, 50, None, now=20.0) is None


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_text_frames_parse_back(size):
    from websockets.frames import Frame, Opcode
    from websockets.streams import StreamReader

    payload = b"x" * size
    reader = StreamReader()
    reader.feed_data(text_frame(payload))
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        parsed = done.value
    assert parsed.opcode is Opcode.TEXT and parsed.fin and parsed.data == payload


# --- cursor tags: the event at a cursor, not only its number (schemas.tags) ------------------


def other(seq: int) -> bytes:
    """Another event under the same number: what a new master publishes after a failover."""
    return b'{"type":"x","other":true,"seq":%d}' % seq


class TestCursorTags:
    def test_a_resume_whose_event_the_history_replaced_gets_history_lost(self):
        snapshot = Snapshot(
            "e1", 7, entries(6, 7), top_tag=event_tag(frame(7)), after_tag=event_tag(other(5))
        )
        plan = plan_subscription("e1", 5, snapshot, 1000, tag=event_tag(frame(5)))
        assert plan.replay == [] and plan.resync is not None
        assert (plan.resync.reason, plan.resync.seq) == (ResyncReason.HISTORY_LOST, 7)
        assert plan.resync.tag == plan.tag == event_tag(frame(7))  # the cursor to carry on from

    def test_the_same_event_or_no_tag_either_side_resumes_as_before(self):
        snapshot = Snapshot(
            "e1", 7, entries(6, 7), top_tag=event_tag(frame(7)), after_tag=event_tag(frame(5))
        )
        same = plan_subscription("e1", 5, snapshot, 1000, tag=event_tag(frame(5)))
        untagged = plan_subscription("e1", 5, snapshot, 1000)
        unknown = plan_subscription(
            "e1", 5, Snapshot("e1", 7, entries(6, 7)), 1000, tag=event_tag(frame(5))
        )
        for plan in (same, untagged, unknown):
            assert plan.resync is None and [s for s, _ in plan.replay] == [6, 7]
        assert same.tag == event_tag(frame(7)) and unknown.tag is None

    def test_a_cursor_at_the_top_is_checked_too(self):
        snapshot = Snapshot("e1", 5, top_tag=event_tag(other(5)), after_tag=event_tag(other(5)))
        plan = plan_subscription("e1", 5, snapshot, 1000, tag=event_tag(frame(5)))
        assert plan.resync is not None and plan.resync.reason is ResyncReason.HISTORY_LOST

    def test_a_poll_checks_the_tag_and_names_the_tag_to_poll_with_next(self):
        snapshot = Snapshot(
            "e1", 9, entries(6, 9), top_tag=event_tag(frame(9)), after_tag=event_tag(other(5))
        )
        lost = plan_poll("e1", 5, snapshot, 100, tag=event_tag(frame(5)))
        assert lost.events == [] and lost.resync is not None
        assert (lost.resync.reason, lost.resync.tag) == (
            ResyncReason.HISTORY_LOST,
            event_tag(frame(9)),
        )
        page = plan_poll("e1", 5, snapshot, 2, tag=event_tag(other(5)))
        assert [s for s, _ in page.events] == [6, 7] and page.more
        assert page.tag == event_tag(frame(7))  # the last event of the page
        assert plan_poll(None, None, snapshot, 2).tag == event_tag(frame(9))  # the top

    def test_a_feed_whose_baseline_event_is_replaced_resyncs_instead_of_dropping_it(self):
        """The baseline read names the top (5) by tag; a failover then loses it and the new
        master publishes another event as 5: the feed reads and says history_lost, where it
        used to take the message for one it had already delivered, and drop it."""
        seq = FeedSequencer()
        seq.on_read(Snapshot("e1", 5, top_tag=event_tag(frame(5))), limit=1000)
        assert seq.on_live("e1", 5, frame(5)) == Step()  # the same event again: nothing to do
        assert seq.on_live("e1", 5, other(5)).needs_read
        assert seq.read_after() == 5  # the read names the tag at its cursor
        same = Snapshot("e1", 5, top_tag=event_tag(frame(5)), after_tag=event_tag(frame(5)))
        assert seq.on_read(same, 1000).resync is None
        assert seq.on_live("e1", 5, other(5)).needs_read
        replaced = Snapshot("e1", 5, top_tag=event_tag(other(5)), after_tag=event_tag(other(5)))
        step = seq.on_read(replaced, 1000)
        assert step.resync is not None and step.resync.reason is ResyncReason.HISTORY_LOST
        assert step.resync.tag == event_tag(other(5))
        assert step.deliver == []

    def test_a_joiner_told_history_lost_where_the_feed_delivers_another_event(self):
        """The connection's read went ahead of the feed (it has 5 as the old master had it);
        the feed then delivers the new master's 4 and 5: at 5 the client is told, once."""
        lost = []

        def lost_at(epoch: str, seq: int, item: bytes) -> str:
            lost.append((epoch, seq, item))
            return "resync"

        joiner: Joiner[bytes] = Joiner(event_tag, lost_at)
        assert joiner.start_live("e1", 5, event_tag(frame(5))) == []
        assert joiner.offer("e1", 4, other(4)) == (SKIP, False)
        assert joiner.offer("e1", 5, other(5)) == (LOST, True)
        same: Joiner[bytes] = Joiner(event_tag, lost_at)
        same.start_live("e1", 5, event_tag(frame(5)))
        assert same.offer("e1", 5, frame(5)) == (SKIP, True)
        # Captured during the read, the same check; what follows is sent after it.
        captured: Joiner[bytes] = Joiner(event_tag, lost_at)
        for n in (4, 5, 6):
            captured.offer("e1", n, other(n))
        assert captured.start_live("e1", 5, event_tag(frame(5))) == ["resync", other(6)]
        assert lost == [("e1", 5, other(5))]


def test_a_foreign_entry_at_a_read_feeds_cursor_is_not_taken_for_an_event_it_owes():
    """The baseline's top is a foreign entry (someone wrote it by hand; its subscribers were told
    history_corrupt). A later catch-up read starts after it, as before tags, and compares its tag
    as Redis computes it: the events after it are delivered, no resync."""
    seq = FeedSequencer()
    foreign_tag = event_tag(b"not an event")
    seq.on_read(Snapshot("e1", 5, top_tag=foreign_tag, corrupt_at=5), limit=1000)
    assert seq.on_live("e1", 7, frame(7)).needs_read
    assert seq.begin_read() == 5
    step = seq.on_read(Snapshot("e1", 7, entries(6, 7), after_tag=foreign_tag), limit=1000)
    assert step.resync is None and [s for s, _ in step.deliver] == [6, 7]


class TestReadBehindTheFeed:
    """A connection's read finds the feed's epoch with a top below the feed's ``last``: a
    failover lost the feed's last events (seed 199 of the interleavings walk: retention had
    trimmed the event at the feed's ``last``, so nothing else could tell)."""

    def test_the_next_read_begun_after_the_proof_resyncs_everyone_with_history_lost(self):
        seq = FeedSequencer()
        seq.on_read(Snapshot("e1", 22), limit=1000)  # the stream was empty: no tag at 22
        assert not seq.history_behind("e1", 22)  # at the feed's cursor: nothing proven
        assert not seq.history_behind("e2", 20)  # another epoch: the feed learns it itself
        assert seq.history_behind("e1", 20)
        assert seq.reading  # live messages are held until the read
        for n in (21, 22, 23):  # the new master's: no tag tells 22' from the lost 22
            assert seq.on_live("e1", n, other(n)).deliver == []
        seq.begin_read()
        # The stream now holds 21'..23' and names no tag at 22 that differs from the feed's.
        step = seq.on_read(Snapshot("e1", 23, [(23, other(23))]), limit=1000)
        assert step.resync is not None and step.deliver == []
        assert (step.resync.reason, step.resync.seq) == (ResyncReason.HISTORY_LOST, 23)
        assert seq.lost_after is None and not step.needs_read
        assert [s for s, _ in seq.on_live("e1", 24, other(24)).deliver] == [24]

    def test_a_read_in_flight_before_the_proof_does_not_count_and_another_follows_it(self):
        seq = FeedSequencer()
        seq.on_read(Snapshot("e1", 22), limit=1000)
        assert seq.request_read()
        seq.begin_read()  # sent before the failover
        assert not seq.history_behind("e1", 20)  # a read is in flight: it is followed
        step = seq.on_read(Snapshot("e1", 22), limit=1000)  # what Redis held before
        assert step.resync is None and step.needs_read
        seq.begin_read()
        step = seq.on_read(Snapshot("e1", 22, [(22, other(22))]), limit=1000)
        assert step.resync is not None and step.resync.reason is ResyncReason.HISTORY_LOST

    def test_a_feed_that_found_the_lost_top_itself_is_not_resynced_again(self):
        seq = FeedSequencer()
        seq.on_read(Snapshot("e1", 22), limit=1000)
        assert seq.request_read()
        seq.begin_read()  # sent after the failover: it finds the top at 20
        seq.history_behind("e1", 20)
        step = seq.on_read(Snapshot("e1", 20), limit=1000)
        assert step.resync is not None and step.resync.seq == 20
        assert seq.lost_after is None  # the feed claims nothing past 20 any more
        seq.begin_read()  # the read asked for meanwhile
        step = seq.on_read(Snapshot("e1", 22, [(21, other(21)), (22, other(22))]), limit=1000)
        assert step.resync is None and [s for s, _ in step.deliver] == [21, 22]

    def test_a_joiner_behind_the_feed_waits_for_its_resync(self):
        joiner: Joiner[str] = Joiner()
        # Told history_lost at 20 by its read; the feed still stands at the lost 22.
        assert joiner.start_live("e1", 20, None, feed=("e1", 22)) == []
        assert joiner.ahead and not joiner.caught_up("e1", 22)
        assert joiner.offer("e1", 23, "f23") == (SKIP, False)  # follows the lost 22, not 20
        assert joiner.offer_resync("e1", 23, "lost", lost=True)
        assert not joiner.ahead and joiner.caught_up("e1", 23)
        assert joiner.offer("e1", 24, "f24") == (SEND, True)

    def test_a_joiner_level_with_or_ahead_of_the_feed_is_not_held(self):
        for feed in (("e1", 20), ("e1", 18), ("e0", 30), (None, None)):
            joiner: Joiner[str] = Joiner()
            joiner.start_live("e1", 20, feed=feed)
            assert not joiner.ahead, feed
        # Events captured during the read take the connection up to the feed.
        joiner = Joiner()
        joiner.offer("e1", 21, "f21")
        joiner.offer("e1", 22, "f22")
        assert joiner.start_live("e1", 20, feed=("e1", 22)) == ["f21", "f22"]
        assert not joiner.ahead and joiner.caught_up("e1", 22)

    def test_a_captured_frame_that_does_not_follow_on_from_the_read_is_not_passed(self):
        """The feed stood at the lost 2 when the connection joined; during its read (top 0,
        after the failover) the feed delivered the new master's 3, captured: it follows the
        feed's 2, not the client's 0, and neither it nor what follows is sent."""
        joiner: Joiner[str] = Joiner()
        joiner.offer("e1", 3, "f3")
        joiner.offer("e1", 4, "f4")
        assert joiner.start_live("e1", 0, feed=("e1", 4)) == []
        assert joiner.ahead and not joiner.caught_up("e1", 4)
        # A resync captured after them is passed on, and the frames after it.
        joiner = Joiner()
        joiner.offer("e1", 3, "f3")
        joiner.offer_resync("e1", 3, "lost", lost=True)
        joiner.offer("e1", 4, "f4")
        assert joiner.start_live("e1", 0, feed=("e1", 4)) == ["lost", "f4"]
        assert not joiner.ahead and joiner.caught_up("e1", 4)

    def test_new_events_held_during_a_read_that_finds_the_lost_top_follow_the_resync(self):
        """Ruled out for seed 199: the feed's own read finds the top at 20 after the failover;
        21', 22', 23' arrive while it is in flight. They are held through the history_lost
        reset (they arrived after the read began: not "beyond the top" forgeries) and the
        next read delivers them, in order, none dropped."""
        seq = FeedSequencer()
        seq.on_read(Snapshot("e1", 22), limit=1000)  # no tag at 22
        assert seq.request_read()
        seq.begin_read()
        for n in (21, 22, 23):
            assert seq.on_live("e1", n, other(n)).deliver == []
        step = seq.on_read(Snapshot("e1", 20), limit=1000)
        assert step.resync is not None and step.resync.seq == 20 and step.dropped_ahead == 0
        assert step.needs_read and sorted(seq.held) == [21, 22, 23]
        assert seq.begin_read() == 20
        step = seq.on_read(Snapshot("e1", 23, [(n, other(n)) for n in (21, 22, 23)]), 1000)
        assert step.resync is None and [s for s, _ in step.deliver] == [21, 22, 23]
