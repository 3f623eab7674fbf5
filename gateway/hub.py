"""The pod's fan-out hub: which connections follow which project, and in what order they get what.

For every project with at least one subscriber on this pod there is one :class:`Feed`: one
pub/sub channel subscription (reference-counted through its subscribers), one
:class:`~gateway.sequencing.FeedSequencer` that turns live messages into a gap-free sequence, and
the sets of connections that are live or still joining.

Live frames are queued per feed, not per connection: in each event-loop iteration a feed's new
frames are joined once and the same bytes are written to each of its live subscribers, after
each connection's own queued frames (replay, ``subscribed``, replies). A subscriber that went live
during the iteration gets only the feed's frames queued after that moment (the ones before reached
it through its joiner).

Joining (gapless subscribe): the connection is registered first, so every frame the feed delivers
from then on is captured; then the pod makes sure it is subscribed to the channel; then one atomic
read gives the history after the client's cursor and the top. The client is sent the replay, then
``subscribed``, then the captured frames after the top, and goes live. No frame can fall between
the read and the capture, and duplicates are dropped by sequence number. A resync of the feed
that passes a joining connection in the connection's own history is about the feed's cursor:
the connection reads again from its own (:meth:`Hub._catch_up`) instead of reloading.

Resuming from memory: each feed keeps the frames it delivered last in a
:class:`~gateway.window.ResumeWindow` (``window_events`` per feed, ``window_bytes`` for the whole
pod). A subscribe whose cursor falls in that window, while the feed is not repairing, is answered
from it synchronously at the feed's ``(epoch, last)``: the window is contiguous up to ``last`` and
everything after ``last`` reaches the connection through the feed, as after a read whose top was
``last``. A resume older than the window triggers one read that fills the window for every resume
of the project waiting at that moment (single-flight); whatever the window still cannot answer
takes the atomic read above.

A reconnect storm resumes many clients of a project at one cursor (they were all caught up with
the pod they left): the first one's replay (its plan, items, frames joined, and ``subscribed``)
is kept as the window's memo (:class:`Replay`) and sent as it is to the next ones, until the
window changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import time
from collections.abc import Callable
from typing import cast

from gateway.logs import describe, get_logger
from gateway.metrics import Metrics
from gateway.pubsub import PubSubLink
from gateway.sequencing import (
    CATCH_UP,
    LOST,
    SEND,
    FeedSequencer,
    Joiner,
    Resync,
    Snapshot,
    Step,
    SubscriptionPlan,
    other_event_at_cursor,
    plan_subscription,
)
from gateway.session import Outgoing, Session, joined
from gateway.store import ForeignValues, HistoryStore, ProjectUnreadable, StoreUnavailable
from gateway.tasks import spawn
from gateway.window import ResumeWindow, WindowBudget, seed_run
from schemas.keys import Keys
from schemas.protocol import CloseCode, Error, ErrorCode, ResyncReason, ResyncRequired, Subscribed
from schemas.stored import CheckedFrames, ForeignKind, ForeignValue, parse_channel_message
from schemas.tags import event_tag

__all__ = ["Feed", "Hub", "SubscribeUnavailable"]

log = get_logger("gateway.hub")

#: Entries per history read while repairing a gap or catching up after a reconnect.
REPAIR_BATCH = 1000
#: Seconds one history read may take before it is retried.
READ_TIMEOUT = 10.0
#: Pause after a history read that made no progress (what is held is ahead of the stream's top),
#: doubled after each such read up to the cap; reset by a read that makes progress.
IDLE_READ_PAUSE = 0.01
IDLE_READ_PAUSE_CAP = 1.0
#: Seconds one reconcile pass (one pipeline of HMGETs) may take; a pass that times out is
#: skipped and the next one starts ``--reconcile-interval`` later.
RECONCILE_TIMEOUT = 5.0
#: Frames each feed keeps for resumes, and the bytes all the feeds of a pod may keep together.
WINDOW_EVENTS = 1000
WINDOW_BYTES = 64 * 1024 * 1024
#: Bytes a window entry is counted for beyond its payload and frame (the objects around them).
WINDOW_ENTRY_OVERHEAD = 160
#: How deep into a window a history read's entries are looked up, to be compared with its
#: frames instead of being checked again (:meth:`Hub.checked_frames`): a deque is indexed in
#: O(distance from its nearer end), 64 entries a block, ~0.1 us this deep where the check costs
#: ~1.5 us; in the middle of a window of a million, ~40 us. A larger window gives its newest.
CHECKED_FRAMES_SPAN = 4096


_ITEM = operator.itemgetter(1)


class Replay:
    """A resume's answer from a window, the same for every client resuming at its cursor until
    the window changes (see :meth:`ResumeWindow.remember`): the plan, the replay's items and
    their frames joined (``wire``), and the ``subscribed`` that follows them."""

    __slots__ = ("items", "plan", "subscribed", "wire")

    def __init__(self, plan: SubscriptionPlan, items: list[Outgoing], project_id: int) -> None:
        self.plan = plan
        self.items = items
        self.wire = joined(items)
        self.subscribed = Outgoing.message(_subscribed(project_id, plan))


def _window_size(item: Outgoing) -> int:
    return len(item.payload) + len(item.wire) + WINDOW_ENTRY_OVERHEAD


def _write_failed(session: Session) -> None:
    """A write raised (a bug, or a transport in a state we did not foresee): that connection is
    closed with 1011 and resumes from its cursors; the others of the iteration are still served."""
    log.exception("write failed; closing the connection", conn_id=session.id)
    session.abort(CloseCode.INTERNAL_ERROR, "internal error: reconnect and resume")


def _subscribed(project_id: int, plan: SubscriptionPlan) -> Subscribed:
    return Subscribed(
        project_id=project_id,
        epoch=plan.epoch,
        seq=plan.seq,
        resumed=plan.resumed,
        replayed=len(plan.replay),
        tag=plan.tag,
    )


def _tag_of(item: Outgoing) -> str | None:
    return item.tag


def _nothing(*args: object) -> None:
    pass


class SubscribeUnavailable(Exception):
    """Redis could not be reached in time to start a subscription."""


class Feed:
    """One project followed by this pod."""

    __slots__ = (
        "channel",
        "failed",
        "fill",
        "joining",
        "live",
        "pending",
        "permanent",
        "project_id",
        "promoted",
        "reader",
        "ready",
        "sequencer",
        "suspect_top",
        "waits",
        "window",
    )

    def __init__(
        self, project_id: int, channel: bytes, window: ResumeWindow[Outgoing] | None = None
    ) -> None:
        self.project_id = project_id
        self.channel = channel
        self.sequencer = FeedSequencer()
        self.live: dict[Session, None] = {}  # insertion-ordered set
        self.joining: dict[Session, Joiner] = {}
        #: Joining sessions whose subscribe waits for Redis -> that wait's deadline, brought
        #: forward to now when the subscription ends first (:meth:`Hub._end_wait`).
        self.waits: dict[Session, asyncio.Timeout] = {}
        #: Frames for every live subscriber, written at the end of this event-loop iteration.
        self.pending: list[Outgoing] = []
        #: Subscribers that went live in this iteration -> how much of ``pending`` is not theirs.
        self.promoted: dict[Session, int] = {}
        self.ready = asyncio.Event()  # subscribed to the channel and baseline known
        self.reader: asyncio.Task | None = None
        self.suspect_top: int | None = None
        #: Why the project cannot be followed (its metadata in Redis is unreadable); set with
        #: ``ready`` so that waiting subscribes see it at once.
        self.failed: ProjectUnreadable | None = None
        #: The periodic check made the project's history permanent (once it held events).
        self.permanent = False
        #: The frames delivered last, contiguous up to ``sequencer.last`` (see the module doc).
        self.window: ResumeWindow[Outgoing] = window if window is not None else ResumeWindow(0)
        #: The read that extends the window for resumes older than it (one at a time).
        self.fill: asyncio.Task | None = None

    @property
    def idle(self) -> bool:
        return not self.live and not self.joining


class _JoiningWait:
    """``async with``: a joining connection's wait for Redis (a subscribe's, a catch-up's),
    bounded by ``delay`` seconds (TimeoutError, as ``asyncio.timeout``) and registered in
    ``feed.waits`` while it lasts, so that the subscription ending ends it at once
    (:meth:`Hub._end_wait`)."""

    __slots__ = ("feed", "session", "timeout")

    def __init__(self, feed: Feed, session: Session, delay: float) -> None:
        self.feed = feed
        self.session = session
        self.timeout: asyncio.Timeout | None = asyncio.timeout(delay)

    async def __aenter__(self) -> None:
        timeout = cast("asyncio.Timeout", self.timeout)
        await timeout.__aenter__()
        self.feed.waits[self.session] = timeout

    async def __aexit__(self, *exc_info: object) -> bool | None:
        timeout = cast("asyncio.Timeout", self.timeout)
        # The Timeout holds its task: should the task end with an exception (cancelled by its
        # transport), that exception's traceback holds the awaiting frame, this, and so the task.
        self.timeout = None
        try:
            return await timeout.__aexit__(*exc_info)  # type: ignore[arg-type]
        finally:
            waits = self.feed.waits
            if waits.get(self.session) is timeout:
                del waits[self.session]


class Hub:
    """Routes live messages to subscribers and runs the per-project recovery machinery."""

    def __init__(
        self,
        *,
        keys: Keys,
        store: HistoryStore,
        metrics: Metrics,
        max_replay: int,
        subscribe_timeout: float,
        window_events: int | None = None,
        window_bytes: int | None = None,
    ) -> None:
        self.keys = keys
        self.store = store
        self.metrics = metrics
        self.max_replay = max_replay
        self.subscribe_timeout = subscribe_timeout
        self.feeds: dict[int, Feed] = {}
        # Defaults read at construction (not bound at definition) so that a benchmark can run a
        # pod without windows by setting the module's constants.
        self.window_events = WINDOW_EVENTS if window_events is None else window_events
        self.window_budget = WindowBudget(WINDOW_BYTES if window_bytes is None else window_bytes)
        self.link: PubSubLink | None = None
        self.foreign = ForeignValues(metrics)
        self._unreadable_logged: set[str] = set()
        if isinstance(store, HistoryStore):
            store.foreign = self.foreign  # counted in this gateway's metrics, logged once per key
            store.checked = self.checked_frames  # a window's frames are not checked twice
        self._dirty: list[Session] = []  # sessions with frames of their own queued
        self._dirty_feeds: list[Feed] = []  # feeds with pending frames
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        #: Called with ``(session, project_id)`` for each subscription the hub itself ends
        #: (:meth:`_fail_feed`), so that what goes with a subscription (the tab's presence)
        #: ends with it; the gateway wires it to ``PresenceService.leave``.
        self.on_subscription_ended: Callable[[Session, int], object] = _nothing

    @property
    def resumes_from_memory(self) -> int:
        """Subscribes answered from a feed's window, without a history read."""
        return self.metrics.resumes_from_memory_total

    @property
    def subscribe_reads(self) -> int:
        """History reads made for subscribes (shared by concurrent ones)."""
        return self.metrics.subscribe_reads_total

    @property
    def window_fills(self) -> int:
        """History reads merged into a feed's window."""
        return self.metrics.window_fills_total

    # --- outbound batching -------------------------------------------------------------------

    def schedule_flush(self, session: Session) -> None:
        """Called by a session when its outbox goes from empty to non-empty."""
        self._dirty.append(session)
        self._schedule()

    def _queue(self, feed: Feed, item: Outgoing) -> None:
        """Queue a frame for every live subscriber of ``feed``."""
        if not feed.pending:
            self._dirty_feeds.append(feed)
            self._schedule()
        feed.pending.append(item)

    def _schedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        cut = 0
        # Each connection's own frames first: a subscriber promoted in this iteration was sent
        # its replay and ``subscribed`` that way, and they come before its first live frame.
        dirty, self._dirty = self._dirty, []
        for session in dirty:
            try:
                if not session.flush():
                    cut += 1
            except Exception:
                _write_failed(session)
        feeds, self._dirty_feeds = self._dirty_feeds, []
        for feed in feeds:
            items, feed.pending = feed.pending, []
            promoted, feed.promoted = feed.promoted, {}
            wire = joined(items)
            for session in feed.live:
                try:
                    if promoted and session in promoted:
                        mine = items[promoted[session] :]
                        if mine and not session.write(joined(mine), mine):
                            cut += 1
                    elif not session.write(wire, items):
                        cut += 1
                except Exception:
                    _write_failed(session)
        self.metrics.slow_consumer_disconnects_total += cut

    # --- live path ---------------------------------------------------------------------------

    def on_pubsub_message(self, channel: bytes, data: bytes) -> None:
        """Every message of every subscribed channel, in Redis order (called by the link)."""
        project_id = self.keys.project_of_channel(channel)
        feed = self.feeds.get(project_id) if project_id is not None else None
        if feed is None:
            return  # a channel we just left, or a foreign one
        try:
            envelope = parse_channel_message(data, feed.project_id)
        except ForeignValue as exc:
            self.metrics.malformed_messages_total += 1
            self.foreign.report(exc.kind, channel.decode(), exc.problem, feed.project_id, data)
            return
        self.metrics.events_in_total += 1
        if envelope.published_ms:
            self.metrics.relay_lag.observe(max(0.0, time.time() - envelope.published_ms / 1000))
        self._apply(feed, feed.sequencer.on_live(envelope.epoch, envelope.seq, envelope.frame))

    def _apply(self, feed: Feed, step: Step) -> None:
        window = feed.window
        project_id = feed.project_id
        for seq, frame in step.deliver:
            # The item says which event it is: a transport numbering events by cursor (SSE)
            # takes that from the feed, never from the frame, whose JSON may be anyone's.
            item = Outgoing(frame, project_id, seq)
            self._fanout(feed, seq, item)
            window.append(seq, item, _window_size(item))
        sequencer = feed.sequencer
        if step.resync is not None:
            self._fanout_resync(feed, step.resync)
        if (
            step.resync is not None
            or window.epoch != sequencer.epoch
            or window.last != sequencer.last
        ):
            # A resync, or the baseline (or anything else that moved the feed without
            # delivering): the window starts empty at the feed's cursor. Its tag is the
            # sequencer's: the baseline may have delivered events held during its read, and the
            # top it read is then not ``last``.
            window.reset(sequencer.epoch, sequencer.last or 0, sequencer.tag)
        if step.needs_read:
            self._start_reader(feed)

    def _fanout(self, feed: Feed, seq: int, item: Outgoing) -> None:
        if feed.live:
            self._queue(feed, item)
            self.metrics.deliveries_total += len(feed.live)
        if feed.joining:
            epoch = feed.sequencer.epoch
            for session, joiner in list(feed.joining.items()):
                verdict, caught_up = joiner.offer(epoch, seq, item)
                if verdict == SEND:
                    session.send(item)
                    self.metrics.deliveries_total += 1
                elif verdict == LOST:
                    assert epoch is not None
                    session.send(self._history_lost_at(epoch, seq, item))
                    self.metrics.resyncs_total += 1
                if caught_up:
                    self._promote(feed, session)

    def _fanout_resync(self, feed: Feed, resync: Resync) -> None:
        item = Outgoing.message(
            ResyncRequired(
                project_id=feed.project_id,
                reason=resync.reason,
                epoch=resync.epoch,
                seq=resync.seq,
                tag=resync.tag,
            )
        )
        log.warning(
            "resync required",
            project_id=feed.project_id,
            reason=resync.reason.value,
            epoch=resync.epoch,
            seq=resync.seq,
            subscribers=len(feed.live) + len(feed.joining),
        )
        if feed.live:
            self._queue(feed, item)
            self.metrics.resyncs_total += len(feed.live)
        lost = resync.reason is ResyncReason.HISTORY_LOST
        for session, joiner in list(feed.joining.items()):
            verdict = joiner.offer_resync(resync.epoch, resync.seq, item, lost=lost)
            if verdict == SEND:
                self.metrics.resyncs_total += 1
                session.send(item)
            elif verdict == CATCH_UP:
                cursor = joiner.catch_up_from()
                assert cursor is not None
                spawn(self._catch_up(feed, session, joiner, cursor))
            self._promote_if_caught_up(feed, session, joiner)

    def _joiner(self) -> Joiner[Outgoing]:
        return Joiner(_tag_of, self._history_lost_at)

    def _history_lost_at(self, epoch: str, seq: int, item: Outgoing) -> Outgoing:
        """A joining client read, ahead of the feed, another event at ``seq`` than the one the
        feed now delivers there (``item``): a failover lost what the client read. It reloads,
        the feed's event included, and carries on after ``seq``."""
        log.warning(
            "resync required",
            project_id=item.project_id,
            reason=ResyncReason.HISTORY_LOST.value,
            epoch=epoch,
            seq=seq,
            subscribers=1,
        )
        return Outgoing.message(
            ResyncRequired(
                project_id=item.project_id,
                reason=ResyncReason.HISTORY_LOST,
                epoch=epoch,
                seq=seq,
                tag=item.tag,
            )
        )

    def _promote(self, feed: Feed, session: Session) -> None:
        del feed.joining[session]
        feed.live[session] = None
        if feed.pending:
            feed.promoted[session] = len(feed.pending)

    def _promote_if_caught_up(self, feed: Feed, session: Session, joiner: Joiner) -> None:
        sequencer = feed.sequencer
        if joiner.caught_up(sequencer.epoch, sequencer.last):
            self._promote(feed, session)

    # --- history reads: baseline, gap repair, catch-up ---------------------------------------

    def _start_reader(self, feed: Feed) -> None:
        if feed.reader is None or feed.reader.done():
            feed.reader = asyncio.create_task(self._read_history(feed))

    async def _read_history(self, feed: Feed) -> None:
        """Read the stream until the sequencer has caught up; retry while Redis is down."""
        delay = 0.05
        idle_pause = IDLE_READ_PAUSE
        while self.feeds.get(feed.project_id) is feed:
            sequencer = feed.sequencer
            baseline = sequencer.last is None
            before = sequencer.last
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    snapshot = await self.store.snapshot(
                        feed.project_id, sequencer.epoch, sequencer.begin_read(), REPAIR_BATCH
                    )
            except ProjectUnreadable as exc:
                self._fail_feed(feed, exc)
                return
            except (StoreUnavailable, TimeoutError) as exc:
                log.warning("history read failed", project_id=feed.project_id, error=describe(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            step = sequencer.on_read(snapshot, REPAIR_BATCH)
            if step.dropped_ahead:
                self.foreign.report(
                    ForeignKind.CHANNEL_SEQ,
                    feed.channel.decode(),
                    f"{step.dropped_ahead} message(s) numbered beyond the history's top "
                    f"{snapshot.top}, dropped",
                    feed.project_id,
                    count=step.dropped_ahead,
                )
            if step.repaired:
                self.metrics.gaps_repaired_total += step.repaired
                log.info(
                    "gap repaired",
                    project_id=feed.project_id,
                    events=step.repaired,
                    last=sequencer.last,
                )
            self._apply(feed, Step(step.deliver, step.resync))
            if baseline:
                feed.ready.set()
            if not step.needs_read:
                return
            if sequencer.last == before and step.resync is None:
                # No progress: what is held is ahead of the stream's top (still in flight, or
                # dropped by the next read if it is not). Give it a moment instead of spinning on
                # Redis, longer each time, so a writer flooding the channel with numbers ahead
                # costs at most a few reads a second.
                await asyncio.sleep(idle_pause)
                idle_pause = min(idle_pause * 2, IDLE_READ_PAUSE_CAP)
            else:
                idle_pause = IDLE_READ_PAUSE

    def request_catch_up(self, feed: Feed) -> None:
        """Read history after the feed's cursor (after a reconnect or a suspicious check)."""
        if feed.sequencer.request_read():
            self._start_reader(feed)

    def on_link_resubscribed(self) -> None:
        """The pub/sub link came back: anything published meanwhile is only in the streams."""
        for feed in list(self.feeds.values()):
            self.request_catch_up(feed)

    async def reconcile(self) -> None:
        """Compare every feed with its project's top in Redis; catch up where they differ.

        This finds a lost *last* message (no later one reveals the gap) and a history that was
        flushed while nobody published. A top that is merely in flight is given one interval
        to arrive before it counts. A project whose metadata is unreadable ends its
        subscriptions (:meth:`_fail_feed`); the others are compared as usual. The pass gives up
        after ``RECONCILE_TIMEOUT`` seconds (raising ``TimeoutError``) when Redis hangs; on a
        Redis Cluster, the projects of a master that does not answer are left for the next
        pass and the others compared (:meth:`HistoryStore.cursors`).
        """
        feeds = [f for f in self.feeds.values() if f.ready.is_set() and not f.sequencer.reading]
        if not feeds:
            return
        # A history created by a read expires unless something is published: renew it while
        # its followers wait for a first event, and make it permanent (once per feed) when it
        # holds events, so that it never expires under its subscribers (HistoryStore.cursors).
        waiting = [f.project_id for f in feeds if f.sequencer.last == 0]
        started = [f for f in feeds if f.sequencer.last and not f.permanent]
        async with asyncio.timeout(RECONCILE_TIMEOUT):
            cursors = await self.store.cursors(
                [f.project_id for f in feeds], waiting, [f.project_id for f in started]
            )
        unanswered = {
            feed.project_id
            for feed, cursor in zip(feeds, cursors, strict=True)
            if isinstance(cursor, StoreUnavailable) and not isinstance(cursor, ProjectUnreadable)
        }
        for feed in started:
            if feed.project_id not in unanswered:
                feed.permanent = True
        for feed, cursor in zip(feeds, cursors, strict=True):
            if self.feeds.get(feed.project_id) is not feed:
                continue  # released while we waited
            if isinstance(cursor, ProjectUnreadable):
                self._fail_feed(feed, cursor)
                continue
            if feed.project_id in unanswered:
                continue  # its Redis Cluster master did not answer: checked at the next pass
            epoch, top = cursor if cursor is not None else (None, None)
            sequencer = feed.sequencer
            if not sequencer.behind(epoch, top):
                feed.suspect_top = None
                continue
            assert sequencer.last is not None
            confirmed = feed.suspect_top is not None and sequencer.last < feed.suspect_top
            if epoch != sequencer.epoch or top is None or top < sequencer.last or confirmed:
                feed.suspect_top = None
                self.request_catch_up(feed)
            else:
                feed.suspect_top = top

    def _fail_feed(self, feed: Feed, exc: ProjectUnreadable) -> None:
        """The project's metadata in Redis is unreadable: end its subscriptions explicitly.

        Every subscriber, live or joining, gets ``error`` ``unavailable`` naming the project,
        with ``ended`` (clients subscribe again later, as after any ``unavailable``) and the
        subscription ends. The feed is dropped, so the next subscribe reads the metadata afresh.
        """
        if exc.key not in self._unreadable_logged:  # once per key: clients retry subscribing
            if len(self._unreadable_logged) >= ForeignValues.MAX_KEYS:
                self._unreadable_logged.clear()
            self._unreadable_logged.add(exc.key)
            log.warning(
                "project unreadable: subscriptions ended",
                project_id=feed.project_id,
                key=exc.key,
                problem=exc.problem,
                subscribers=len(feed.live) + len(feed.joining),
            )
        feed.failed = exc
        feed.window.clear()
        feed.ready.set()  # wakes the subscribes waiting for the baseline; they see ``failed``
        message = Error(
            code=ErrorCode.UNAVAILABLE,
            message=f"the project's data in Redis is unreadable ({exc.problem}); "
            "subscribe again later",
            project_id=feed.project_id,
            # A live subscriber may be waiting for its presence read: an `unavailable` then is
            # otherwise presence's failure, which leaves the subscription standing.
            ended=True,
        )
        for session in [*feed.live, *feed.joining]:
            session.projects.discard(feed.project_id)
            session.send_message(message)
            self.on_subscription_ended(session, feed.project_id)
            self._end_wait(feed, session)  # a subscribe in its own read: nothing left to read for
        feed.live.clear()
        feed.joining.clear()
        feed.pending.clear()
        feed.promoted.clear()
        if self.feeds.get(feed.project_id) is feed:
            del self.feeds[feed.project_id]
            if self.link is not None:
                spawn(self.link.unsubscribe(feed.channel))
        if feed.reader is not None and feed.reader is not asyncio.current_task():
            feed.reader.cancel()
            feed.reader = None  # not kept: see _release

    # --- subscriptions -----------------------------------------------------------------------

    def _acquire(self, project_id: int) -> Feed:
        feed = self.feeds.get(project_id)
        if feed is None:
            channel = self.keys.channel(project_id).encode()
            window = ResumeWindow[Outgoing](self.window_events, self.window_budget, _tag_of)
            feed = self.feeds[project_id] = Feed(project_id, channel, window)
            feed.reader = asyncio.create_task(self._start_feed(feed))
        return feed

    async def _start_feed(self, feed: Feed) -> None:
        """Subscribe to the feed's channel, then read its baseline. A feed released meanwhile
        cancels this task, and its unsubscribe wakes the link's wait (the subscribe returns
        False) should the cancellation not stop it first."""
        assert self.link is not None
        await self.link.subscribe(feed.channel)
        feed.reader = None
        if self.feeds.get(feed.project_id) is feed:
            self._start_reader(feed)

    def _release(self, feed: Feed) -> None:
        if not feed.idle or self.feeds.get(feed.project_id) is not feed:
            return
        del self.feeds[feed.project_id]
        feed.window.clear()
        # Cancelled tasks are let go: each keeps its CancelledError, whose traceback holds the
        # task's frame and so the feed (a cycle the collector alone would free).
        if feed.reader is not None:
            feed.reader.cancel()
            feed.reader = None
        if feed.fill is not None:
            feed.fill.cancel()
            feed.fill = None
        if self.link is not None:
            spawn(self.link.unsubscribe(feed.channel))

    async def subscribe(
        self,
        session: Session,
        project_id: int,
        epoch: str | None,
        after: int | None,
        tag: str | None = None,
    ) -> None:
        """Start (or restart) a subscription: replay, ``subscribed``, then live. ``tag``: the
        tag of the event the client has at ``after`` (schemas.tags), when it sent one.

        Raises :class:`SubscribeUnavailable` when Redis does not answer in time. A subscription
        that ends while this waits for Redis (unsubscribed, the connection closed, the project
        unreadable) ends the wait at once: this returns without sending anything.
        """
        if project_id in session.projects:
            self.unsubscribe(session, project_id)
        if self.subscribe_from_memory(session, project_id, epoch, after, tag):
            return
        feed = self._acquire(project_id)
        joiner = feed.joining[session] = self._joiner()
        session.projects.add(project_id)
        snapshot = None
        from_memory = False
        try:
            async with _JoiningWait(feed, session, self.subscribe_timeout):
                await feed.ready.wait()  # no suspension when the feed is ready
                snapshot = self._from_window(feed, epoch, after, tag)
                if snapshot is None and self._fill_would_answer(feed, epoch, after):
                    fill = feed.fill
                    if fill is None or fill.done():
                        fill = feed.fill = asyncio.create_task(self._fill_window(feed))
                    await asyncio.wait({fill})  # a timeout here leaves the shared read alone
                    if feed.joining.get(session) is joiner:
                        snapshot = self._from_window(feed, epoch, after, tag)
                from_memory = snapshot is not None
                if snapshot is None and feed.failed is None and feed.joining.get(session) is joiner:
                    self.metrics.subscribe_reads_total += 1
                    snapshot = await self.store.snapshot(project_id, epoch, after, self.max_replay)
        except (TimeoutError, StoreUnavailable) as exc:
            if feed.joining.get(session) is joiner:
                del feed.joining[session]
                session.projects.discard(project_id)
                self._release(feed)
                raise SubscribeUnavailable(str(exc) or "Redis did not answer in time") from None
        if snapshot is None or feed.joining.get(session) is not joiner:
            # Unsubscribed (or the connection closed) while we waited, or the project turned
            # out unreadable and _fail_feed has told the client.
            return
        if from_memory:
            self.metrics.resumes_from_memory_total += 1
        self._go_live(feed, session, joiner, epoch, after, tag, snapshot, from_memory)

    def subscribe_from_memory(
        self,
        session: Session,
        project_id: int,
        epoch: str | None,
        after: int | None,
        tag: str | None = None,
    ) -> bool:
        """:meth:`subscribe`, when the feed's window answers it: the common case of a reconnect
        storm, without a timer, a suspension or a task. False (and nothing changed) when only
        :meth:`subscribe` can: no ready feed, a cursor outside the window, or a re-subscribe."""
        feed = self.feeds.get(project_id)
        if feed is None or project_id in session.projects:
            return False
        snapshot = self._from_window(feed, epoch, after, tag)
        if snapshot is None:
            return False
        joiner = feed.joining[session] = self._joiner()
        session.projects.add(project_id)
        self.metrics.resumes_from_memory_total += 1
        self._go_live(feed, session, joiner, epoch, after, tag, snapshot, True)
        return True

    def _from_window(
        self, feed: Feed, epoch: str | None, after: int | None, tag: str | None = None
    ) -> Snapshot | None:
        """The window's answer to a subscribe (entries are the feed's :class:`Outgoing` items),
        or ``None`` when only Redis can answer: the feed is unready, failed, repairing (holding
        messages, or it saw another epoch on the channel), or the cursor is outside the window."""
        sequencer = feed.sequencer
        window = feed.window
        if (
            not feed.ready.is_set()
            or feed.failed is not None
            or sequencer.reading
            or self.feeds.get(feed.project_id) is not feed
            or window.epoch is None
            or window.epoch != sequencer.epoch
            or window.last != sequencer.last
        ):
            return None
        return window.snapshot(epoch, after, self.max_replay, tag)

    def checked_frames(self, project_id: int) -> CheckedFrames | None:
        """The frames of the project's window, for a history read parsed now (synchronously:
        the window cannot change meanwhile). Each passed the frame check for its project and
        seq when the feed took it (live, or from a read), so an entry of the same bytes at that
        seq needs no second check: a resume read from Redis reads back what the window holds.
        A window of over twice :data:`CHECKED_FRAMES_SPAN` gives only its newest that many,
        where a resume read lands (each lookup stays that close to an end of the deque, and
        cheap). None when the pod holds none."""
        feed = self.feeds.get(project_id)
        if feed is None:
            return None
        window = feed.window
        entries = window.entries
        if window.epoch is None or not entries:
            return None
        lo, last = window.lo, window.last

        def frame_at(seq: int) -> bytes:
            return entries[seq - lo][1].payload  # (lo <= seq <= last: held, contiguous)

        span = CHECKED_FRAMES_SPAN
        return CheckedFrames(
            window.epoch, lo if last - lo < 2 * span else last - span + 1, last, frame_at
        )

    def _fill_would_answer(self, feed: Feed, epoch: str | None, after: int | None) -> bool:
        """Whether a read extending the window back to its capacity would cover this cursor."""
        window = feed.window
        return (
            feed.failed is None
            and not feed.sequencer.reading
            and after is not None
            and epoch is not None
            and epoch == window.epoch
            and window.last - window.capacity <= after < window.lo - 1
        )

    async def _fill_window(self, feed: Feed) -> None:
        """One read of the entries before the window, shared by every resume waiting for it.

        The entries are taken only when they join the window exactly: same epoch and
        generation (no resync since the read began), a top not behind the window, contiguous up
        to the window's oldest entry, and that oldest entry (or, for an empty window, the frame
        the feed delivered at ``last``) still the same bytes in the stream. Failures are left to
        the waiting subscribes, which then read for themselves."""
        window = feed.window
        generation, epoch, lo, last = window.generation, window.epoch, window.lo, window.last
        if epoch is None:
            return
        check_tag = None
        if window.entries:
            check_seq, check = lo, window.entries[0][1].payload
        else:
            check_seq, check = last, feed.sequencer.last_frame
            if check is None:
                check_tag = window.tag_at(last)
        start = max(0, last - window.capacity)
        if start >= lo - 1:
            return
        self.metrics.window_fills_total += 1
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                snapshot = await self.store.snapshot(feed.project_id, epoch, start, lo - start)
        except (StoreUnavailable, TimeoutError):
            return
        if snapshot.epoch != epoch or snapshot.top < window.last:
            return
        if check is not None:
            if not any(seq == check_seq and frame == check for seq, frame in snapshot.entries):
                return  # the stream no longer holds what the feed delivered: not ours to mix
        elif check_tag is not None and not any(
            seq == check_seq and event_tag(frame) == check_tag for seq, frame in snapshot.entries
        ):
            return  # nor what the feed found there
        run = []
        for seq, frame in seed_run(snapshot.entries, lo - 1):
            item = Outgoing(frame, feed.project_id, seq)
            run.append((seq, item, _window_size(item)))
        window.prepend(generation, epoch, run)

    def _go_live(
        self,
        feed: Feed,
        session: Session,
        joiner: Joiner,
        epoch: str | None,
        after: int | None,
        tag: str | None,
        snapshot: Snapshot,
        prebuilt: bool = False,
        *,
        acknowledge: bool = True,
    ) -> None:
        """``prebuilt``: the snapshot's entries are a window's ``(seq, item, size)`` triples,
        whose items are the :class:`Outgoing` frames the feed delivered; a replay from them is
        built once per cursor and kept as the window's memo (:class:`Replay`). ``acknowledge``:
        send ``subscribed`` (not for a connection subscribed already, :meth:`_catch_up`).

        A resync of the feed captured during the read, past the read's cursor in its history,
        is read for (:meth:`_catch_up`) after a subscribe's read; after a catch-up's own read
        (``acknowledge`` False) it is sent: one more read at most, never a loop of them (a
        failover that moved the history's top back below the feed's resync would otherwise
        read again and again until the feed noticed)."""
        # Synchronous from here on: nothing can be delivered to the feed in between.
        replay: Replay | None = None
        if prebuilt and not other_event_at_cursor(after, tag, snapshot):
            # The same cursor and the same entries (the memo is forgotten when they change)
            # plan the same replay: built for the first client resuming there, then shared.
            window = feed.window
            key = (epoch, after)
            replay = cast("Replay | None", window.recall(key))
            if replay is None:
                plan = plan_subscription(epoch, after, snapshot, self.max_replay, tag)
                if plan.replay:
                    replay = Replay(plan, list(map(_ITEM, plan.replay)), feed.project_id)
                    window.remember(key, replay, len(replay.wire))
            else:
                plan = replay.plan
        else:
            plan = plan_subscription(epoch, after, snapshot, self.max_replay, tag)
        if replay is not None:
            session.send_replay(replay.items, replay.wire)
        elif plan.replay:
            project_id = feed.project_id
            items = [Outgoing(frame, project_id, seq) for seq, frame in plan.replay]
            session.send_replay(items, joined(items))
        self.metrics.replayed_total += len(plan.replay)
        self.metrics.deliveries_total += len(plan.replay)
        if plan.resync is not None:
            self.metrics.resyncs_total += 1
            session.send_message(
                ResyncRequired(
                    project_id=feed.project_id,
                    reason=plan.resync.reason,
                    epoch=plan.resync.epoch,
                    seq=plan.resync.seq,
                    tag=plan.resync.tag,
                )
            )
        if replay is not None:
            session.send(replay.subscribed)
        elif acknowledge:
            session.send_message(_subscribed(feed.project_id, plan))
        sequencer = feed.sequencer
        self._send_captured(feed, session, joiner, plan.epoch, plan.seq, plan.tag, acknowledge)
        cursor = joiner.catch_up_from()
        if cursor is not None:
            # The feed resynced during the read, past where the read put the client in its
            # history: read for what the client missed from there (see _fanout_resync).
            spawn(self._catch_up(feed, session, joiner, cursor))
            return
        if joiner.ahead and sequencer.history_behind(plan.epoch, plan.seq):
            # The read found the feed's history rewritten behind it (see Joiner): the feed
            # reads, and resyncs everyone, the connection included.
            self._start_reader(feed)
        self._promote_if_caught_up(feed, session, joiner)

    async def _catch_up(
        self, feed: Feed, session: Session, joiner: Joiner, cursor: tuple[str, int, str | None]
    ) -> None:
        """A joining connection that the feed's resync passed in the connection's own history
        (:data:`~gateway.sequencing.CATCH_UP`): read that history after its cursor, as a resume
        would, and send what the read plans (the events it missed, or a resync of its own with
        its own reason), without a second ``subscribed``. When Redis does not answer, the
        connection stays where it stood and is sent the feed's resync, as before: never
        silence. The wait ends early, as a subscribe's does, when the subscription ends."""
        if feed.joining.get(session) is not joiner:
            return  # ended before this task started
        epoch, after, tag = cursor
        snapshot = None
        sequencer = feed.sequencer
        standing = (sequencer.epoch, sequencer.last)  # past the feed's resync, in its epoch
        try:
            async with _JoiningWait(feed, session, self.subscribe_timeout):
                self.metrics.subscribe_reads_total += 1
                snapshot = await self.store.snapshot(feed.project_id, epoch, after, self.max_replay)
        except (TimeoutError, StoreUnavailable, ProjectUnreadable) as exc:
            if feed.joining.get(session) is joiner:  # (else the subscription ended the wait)
                log.warning("catch-up read failed", project_id=feed.project_id, error=describe(exc))
        if feed.joining.get(session) is not joiner or self.feeds.get(feed.project_id) is not feed:
            return  # unsubscribed, closed, or the feed failed or was released meanwhile
        if snapshot is None:
            self._send_captured(feed, session, joiner, epoch, after, tag, False)
            self._promote_if_caught_up(feed, session, joiner)
            return
        joiner.read_found(snapshot.epoch)
        if (sequencer.epoch, sequencer.last) == standing and sequencer.history_behind(
            snapshot.epoch, snapshot.top
        ):
            # A read begun after the feed resynced to its cursor found the top below it: a
            # failover lost what the feed stands past; the feed resyncs everyone (history_lost).
            self._start_reader(feed)
        self._go_live(feed, session, joiner, epoch, after, tag, snapshot, acknowledge=False)

    def _send_captured(
        self,
        feed: Feed,
        session: Session,
        joiner: Joiner,
        epoch: str,
        seq: int,
        tag: str | None,
        catch_up: bool,
    ) -> None:
        """Send what the joiner captured past the connection's ``(epoch, seq)`` while it read
        (:meth:`Joiner.start_live`); a resync the feed issued meanwhile is counted as sent."""
        sequencer = feed.sequencer
        for item in joiner.start_live(
            epoch, seq, tag, feed=(sequencer.epoch, sequencer.last), catch_up=catch_up
        ):
            if item.kind:
                self.metrics.resyncs_total += 1
            session.send(item)

    def unsubscribe(self, session: Session, project_id: int) -> bool:
        """Stop a subscription; False if the session did not have it."""
        if project_id not in session.projects:
            return False
        session.projects.discard(project_id)
        feed = self.feeds.get(project_id)
        if feed is not None:
            feed.live.pop(session, None)
            feed.joining.pop(session, None)
            self._end_wait(feed, session)
            self._release(feed)
        return True

    def _end_wait(self, feed: Feed, session: Session) -> None:
        """A subscribe still waiting for Redis for a subscription that has just ended returns
        now, not at its deadline: a closed connection's task (and the session it holds) must not
        linger for ``subscribe_timeout`` behind a hung Redis. Its deadline is brought forward,
        so the wait ends as a timeout would (what it awaited is cancelled, a shared read is left
        alone), and :meth:`subscribe` returns quietly since its joiner is gone."""
        wait = feed.waits.pop(session, None)
        if wait is not None and not wait.expired():
            wait.reschedule(self._loop.time())

    def remove(self, session: Session) -> None:
        """The connection closed: drop all its subscriptions."""
        for project_id in list(session.projects):
            self.unsubscribe(session, project_id)

    @property
    def subscriptions(self) -> int:
        return sum(len(f.live) + len(f.joining) for f in self.feeds.values())

    async def close(self) -> None:
        for feed in list(self.feeds.values()):  # a release may run while a reader finishes
            if feed.fill is not None:
                feed.fill.cancel()
            if feed.reader is not None:
                feed.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await feed.reader
        self.feeds.clear()
