"""Ordering logic, without I/O: how live messages, history reads and client cursors combine.

Two small state machines carry the delivery guarantee ("per project, every event in sequence
order, exactly once, no gap, or an explicit resync"):

* :class:`FeedSequencer`, one per active project per pod, turns the live pub/sub messages into a
  gap-free sequence, asking for a history read whenever it cannot prove there is no gap.
* :func:`plan_subscription` decides what a subscribing client gets: replayed history, a resync,
  and the ``subscribed`` acknowledgement, from the client's cursor and one atomic history read.

Both are driven by :mod:`gateway.hub`, which only adds the Redis round trips and the sockets.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from schemas.history import (  # (pure, shared with the publisher's HTTP API: re-exported)
    Entry,
    PollPlan,
    Resync,
    Snapshot,
    other_event_at_cursor,
    plan_poll,
)
from schemas.protocol import ResyncReason
from schemas.tags import event_tag, tags_differ

__all__ = [
    "Entry",
    "FeedSequencer",
    "PollPlan",
    "Resync",
    "Snapshot",
    "SubscriptionPlan",
    "other_event_at_cursor",
    "plan_poll",
    "plan_subscription",
]

_SEQ = operator.itemgetter(0)
T = TypeVar("T")


@dataclass(slots=True)
class Step:
    """What the sequencer asks of its driver after an input."""

    deliver: list[Entry] = field(default_factory=list)
    resync: Resync | None = None
    #: Read history after ``sequencer.last`` (a gap, an unknown baseline, or a read that was cut
    #: short by its count limit). While set, live messages are held.
    needs_read: bool = False
    #: How many delivered events came from the stream without ever arriving live.
    repaired: int = 0
    #: Held live messages numbered beyond the history's top although the read started after
    #: they arrived, dropped (see :meth:`FeedSequencer.on_read`).
    dropped_ahead: int = 0


class FeedSequencer:
    """Gap-free ordering of one project's live messages on one pod.

    ``last`` is the last sequence delivered to subscribers (``None`` until a first history read
    gives the baseline). A live message is delivered at once when it is exactly ``last + 1``;
    anything else is held and a history read is requested. A read's entries fill the gap; when the
    history cannot (trimmed, recreated, or behind us), a :class:`Resync` moves everyone to the new
    cursor: nothing is skipped silently.

    A number is not always proof of identity: a Redis failover can lose events the old master had
    already published (replication is asynchronous), and the new master then hands their numbers
    out again to new events. ``last_frame`` remembers what was delivered at ``last``; reads start
    one entry early to compare it (:meth:`read_after`), and a live message with that number but
    other bytes triggers such a read. A mismatch is ``history_lost``, never a silent swap. Where
    the feed did not deliver ``last`` itself (the baseline, a resync), ``last_tag``, the tag of
    the event the read found there, stands in for the frame, compared with the tag each read
    names at its cursor.

    Live messages cannot be trusted further than Redis itself: the publish script appends an
    event to the stream and publishes it in one atomic step, so a message numbered beyond the
    stream's top *in a read that started after the message arrived* was not published by it
    (someone wrote to the channel, or a failover lost the event). Such messages are dropped
    (``Step.dropped_ahead``) instead of being waited for: one forged number costs at most two
    reads. Reads are numbered (:meth:`begin_read`) to tell which messages arrived before a read.

    A read made by someone else can prove more than the feed's own: a subscribing connection's
    read that finds the feed's epoch with a top below ``last`` (:meth:`history_behind`) proves
    that the events after that top were lost, even where the feed knows neither the frame nor
    the tag of the event at ``last`` (retention had trimmed it) and would take the new events
    published under those numbers for the ones it delivered. The next read begun after that
    proof resyncs everyone with ``history_lost``, whatever it finds.
    """

    __slots__ = (
        "epoch",
        "held",
        "last",
        "last_frame",
        "last_tag",
        "lost_after",
        "read_number",
        "reading",
        "reread",
    )

    #: Held live messages beyond this are dropped; they are re-read from the stream anyway.
    MAX_HELD = 10_000

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.last: int | None = None
        self.last_frame: bytes | None = None  # delivered at ``last`` (None: not by this feed)
        #: The tag of the event at ``last`` when ``last_frame`` is None (a read's top), if known.
        self.last_tag: str | None = None
        #: seq -> (epoch, frame, number of the last read begun when it arrived)
        self.held: dict[int, tuple[str, bytes, int]] = {}
        self.reading = True  # the baseline read is always the first
        #: A catch-up was asked for while a read was in flight: read again after it.
        self.reread = False
        self.read_number = 0
        #: ``(epoch, top, read number)`` of :meth:`history_behind`: the events after ``top``
        #: are lost; the first read numbered beyond ``read number`` says so to everyone.
        self.lost_after: tuple[str, int, int] | None = None

    @property
    def tag(self) -> str | None:
        """The tag (schemas.tags) of the event at ``last``, when known: of the frame this feed
        delivered there, else the one its read found (``last_tag``)."""
        if self.last_frame is not None:
            return event_tag(self.last_frame)
        return self.last_tag

    def on_live(self, epoch: str, seq: int, frame: bytes) -> Step:
        """A message arrived on the project's channel."""
        if self.reading:
            if epoch == self.epoch or self.epoch is None:
                self._hold(epoch, seq, frame)
            return Step()
        if epoch != self.epoch:
            # The history was recreated behind our back; only a read can say where it stands.
            self.held.clear()
            self.reading = True
            return Step(needs_read=True)
        assert self.last is not None
        if seq <= self.last:
            if seq == self.last and self._other_event(frame):
                # Same number, another event: the history was rewritten (see the class doc).
                self.reading = True
                return Step(needs_read=True)
            return Step()  # already delivered (e.g. filled from the stream by a repair)
        if seq == self.last + 1:
            self.last, self.last_frame = seq, frame
            deliver = [(seq, frame)]
            if self.held:
                deliver.extend(self._drain_held())
            return Step(deliver=deliver)
        self._hold(epoch, seq, frame)
        self.reading = True
        return Step(needs_read=True)

    def begin_read(self) -> int | None:
        """A read is about to be sent: the cursor it starts after (:meth:`read_after`)."""
        self.read_number += 1
        return self.read_after()

    def read_after(self) -> int | None:
        """The cursor the next history read starts after: one entry before ``last`` when this
        feed delivered ``last`` itself, so that :meth:`on_read` can check it is still there."""
        if self.last_frame is not None and self.last:
            return self.last - 1
        return self.last

    def on_read(self, snapshot: Snapshot, limit: int) -> Step:
        """Apply a history read of entries after :meth:`read_after` (at most ``limit``), begun
        with the latest :meth:`begin_read`."""
        step = Step()
        if self.last is None or self.epoch is None:
            # Baseline: everything up to the top is history the subscribers read themselves.
            self.epoch, self.last = snapshot.epoch, snapshot.top
            self.last_frame, self.last_tag = None, snapshot.top_tag
        elif snapshot.epoch != self.epoch:
            step.resync = self._reset(ResyncReason.EPOCH_CHANGED, snapshot)
        elif snapshot.top < self.last or self._rewritten(snapshot) or self._proven_lost():
            step.resync = self._reset(ResyncReason.HISTORY_LOST, snapshot)
        else:
            gap = False
            for seq, frame in snapshot.entries:
                if seq <= self.last:
                    continue
                if seq != self.last + 1:
                    gap = True
                    break
                self.last, self.last_frame = seq, frame
                step.deliver.append((seq, frame))
                if seq not in self.held:
                    step.repaired += 1
            corrupt = snapshot.corrupt_at
            if not gap and corrupt is not None and corrupt <= self.last + 1:
                # The next event we owe is not an event (or the one at ``last`` was overwritten
                # with garbage): it cannot be delivered, so everyone moves past it, explicitly.
                step.resync = self._reset(ResyncReason.HISTORY_CORRUPT, snapshot)
            elif self.last < snapshot.top and (gap or snapshot.read_count < limit):
                # The stream does not hold what we missed (it starts after our next event, or
                # ends before the top): retention trimmed it.
                step.resync = self._reset(ResyncReason.HISTORY_TRIMMED, snapshot)
        # Drop what the read covered (and what belongs to another history), and what claims a
        # number beyond the top although it arrived before this read began (see the class doc).
        number = self.read_number
        for seq, (epoch, _, arrived) in list(self.held.items()):
            if seq <= self.last or epoch != self.epoch:
                del self.held[seq]
            elif seq > snapshot.top and arrived < number:
                del self.held[seq]
                step.dropped_ahead += 1
        # Deliver what now follows on, and decide whether more must be read.
        if step.resync is None:
            step.deliver.extend(self._drain_held())
        # else what is still held follows the resync: the next read delivers it, in order.
        lost = self.lost_after
        if lost is not None and (
            lost[0] != self.epoch
            or self.last <= lost[1]
            or (step.resync is not None and self.read_number > lost[2])
        ):
            # The feed no longer claims an event after the lost top (or has told everyone).
            self.lost_after = None
        self.reading = self.last < snapshot.top or bool(self.held) or self.reread
        self.reread = False
        step.needs_read = self.reading
        return step

    def request_read(self) -> bool:
        """Hold live messages and ask for a read (catch-up after a reconnect or a check).
        False when a read is already pending; the pending read is then followed by another one
        (the one in flight may have started before what the caller knows was published)."""
        if self.reading:
            self.reread = True
            return False
        self.reading = True
        return True

    def history_behind(self, epoch: str, top: int) -> bool:
        """Another atomic read (a subscribing connection's), begun while this feed stood where
        it stands now, found ``(epoch, top)``. A top of the feed's epoch below ``last`` proves
        the events after it lost (a failover: a history's top only moves back so), the one at
        ``last`` included, whatever the feed knows of it: the next read begun from now on resets
        everyone with ``history_lost`` (held live messages wait for it). True when a read must be
        started (False: none needed, or one is in flight and another follows it)."""
        if epoch != self.epoch or self.last is None or top >= self.last:
            return False
        self.lost_after = (epoch, top, self.read_number)
        return self.request_read()

    def _proven_lost(self) -> bool:
        """The read being applied began after :meth:`history_behind` proved ``last`` lost."""
        lost = self.lost_after
        return (
            lost is not None
            and lost[0] == self.epoch
            and self.last is not None
            and self.last > lost[1]
            and self.read_number > lost[2]
        )

    def behind(self, epoch: str | None, top: int | None) -> bool:
        """Whether an observed cursor (from a periodic check) proves we missed something."""
        if self.reading or self.last is None:
            return False
        return epoch != self.epoch or top is None or top != self.last

    def _rewritten(self, snapshot: Snapshot) -> bool:
        """The read's entry at ``last`` is not the event this feed delivered (or found) there.

        A frame the feed delivered is compared with the entry read one early; a tag (the feed
        delivered nothing at ``last``) with the tag the read names at its cursor, ``last``
        (:meth:`read_after`): computed by Redis from the stored bytes, it compares a foreign
        entry too, which reading one entry early would instead have taken for a corrupt event
        owed to the subscribers (and hidden everything after it)."""
        if self.last_frame is not None:
            entries = snapshot.entries
            return bool(entries and entries[0][0] == self.last and entries[0][1] != self.last_frame)
        return tags_differ(self.last_tag, snapshot.after_tag)

    def _other_event(self, frame: bytes) -> bool:
        """``frame``, numbered ``last``, is not the event this feed knows at ``last``."""
        if self.last_frame is not None:
            return frame != self.last_frame
        return self.last_tag is not None and event_tag(frame) != self.last_tag

    def _reset(self, reason: ResyncReason, snapshot: Snapshot) -> Resync:
        # Held messages are kept: those after the new top (of its epoch) are the events that
        # follow the resync; on_read drops the others.
        self.epoch, self.last, self.last_frame = snapshot.epoch, snapshot.top, None
        self.last_tag = snapshot.top_tag
        return Resync(reason, snapshot.epoch, snapshot.top, snapshot.top_tag)

    def _hold(self, epoch: str, seq: int, frame: bytes) -> None:
        if len(self.held) < self.MAX_HELD:
            self.held[seq] = (epoch, frame, self.read_number)

    def _drain_held(self) -> list[Entry]:
        out: list[Entry] = []
        assert self.last is not None
        while (held := self.held.pop(self.last + 1, None)) is not None:
            self.last += 1
            self.last_frame = held[1]
            out.append((self.last, held[1]))
        return out


_EVENT, _RESYNC, _LOST = 0, 1, 2  # what a Joiner captured: an event, a resync, history_lost


#: What a Joiner says of a frame the feed delivers: drop it, send it, or tell the client its
#: history was rewritten (:attr:`Joiner.tag`).
SKIP, SEND, LOST = 0, 1, 2
#: What a Joiner says of a resync of the feed past where the connection stands in the same
#: history: read that history after the connection's cursor (:meth:`Joiner.catch_up_from`).
CATCH_UP = 3


class Joiner(Generic[T]):
    """One connection between its ``subscribe`` and going live, for one project.

    Until the history read returns, every frame the feed delivers is captured (tagged with the
    feed's epoch then). Afterwards, while the feed has not yet delivered up to the client's
    starting point ``(epoch, threshold)``, frames at or below it are dropped (the replay had
    them). Items are opaque to this class (the hub passes pre-built frames).

    The connection's own read may be ahead of the feed, even in an epoch the feed has not seen
    yet (Redis restarted empty: the read created the new history and told the client). The
    feed's resync to a cursor of the connection's epoch at or before its starting point is
    then about what the feed missed, not the connection: it is not passed on (the client would
    reload its state again for nothing, and receive again the events it has after that
    cursor). Except ``history_lost``: the history the connection read was itself rewritten.

    A resync of the feed to a later cursor of the connection's history (not ``history_lost``)
    is about what the feed could not read from where *it* stood (an epoch it had not seen yet,
    a trimmed gap): the connection's own events after its cursor may all be there. It is not
    sent: the connection reads them itself, from its cursor (:meth:`catch_up_from`, tag
    included), like a resume, capturing the feed's frames again meanwhile, with the feed's
    resync first (:data:`CATCH_UP`). :meth:`start_live` then takes the read's answer (the
    feed's resync is behind it, or still ahead of it and sent), or, when the read failed, the
    cursor the connection stood at (the resync is sent, as it would have been at once); a read
    that found another history (:meth:`read_found`) drops it. Such a resync captured during
    the connection's first read is read for the same way (:meth:`start_live` with
    ``catch_up``).

    Ahead of the feed, the read may also have found events that a Redis failover then lost: the
    feed later delivers other events under those numbers. ``tag`` is the tag of the event the
    client stands at (``threshold``); when the feed delivers a frame numbered ``threshold``
    whose tag (``tag_of``) differs, the client is told ``history_lost`` there (``lost`` builds
    that message from the epoch, the seq and the feed's frame) instead of carrying on silently.

    The read may also be *behind* the feed: it found the feed's epoch with a top below where
    the feed stood when the connection joined, which only a failover does (everything the feed
    had delivered was in the history then). It shows as a captured frame that does not follow on
    from the start, or as a feed still past the start (``feed`` of :meth:`start_live`). The
    client stands in the new history, the feed in the old one, where its next frames follow
    events the client never had: nothing the feed delivers is passed on, and the connection is
    not caught up, until the feed's next resync (:attr:`ahead`;
    :meth:`FeedSequencer.history_behind` makes sure one comes).
    """

    __slots__ = ("ahead", "buffer", "epoch", "lost", "tag", "tag_of", "threshold")

    def __init__(
        self,
        tag_of: Callable[[T], str | None] | None = None,
        lost: Callable[[str, int, T], T] | None = None,
    ) -> None:
        self.buffer: list[tuple[str | None, int, T, int]] | None = []
        self.epoch: str | None = None
        self.threshold = 0
        self.tag: str | None = None
        self.tag_of = tag_of
        self.lost = lost
        #: The feed stood past the start in its epoch (see the class doc): wait for its resync.
        self.ahead = False

    def offer(self, epoch: str | None, seq: int, item: T) -> tuple[int, bool]:
        """A frame the feed delivers: ``(SKIP, SEND or LOST, the connection has caught up)``."""
        if self.buffer is not None:
            self.buffer.append((epoch, seq, item, _EVENT))
            return SKIP, False
        if epoch != self.epoch or self.ahead:
            return SKIP, False
        if seq > self.threshold:
            return SEND, True
        if seq == self.threshold:
            return (LOST if self._diverges(item) else SKIP), True
        return SKIP, False

    def _diverges(self, item: T) -> bool:
        return self.tag is not None and self.tag_of is not None and self.tag_of(item) != self.tag

    def offer_resync(self, epoch: str, seq: int, item: T, *, lost: bool = False) -> int:
        """A resync of the whole feed (``lost``: history_lost): :data:`SEND` it now,
        :data:`SKIP` it (captured, or the connection stands at or past it already), or
        :data:`CATCH_UP`: it passes the connection in the connection's own history, which is
        read from :meth:`catch_up_from` (see the class doc) before anything more is sent."""
        if self.buffer is not None:
            self.buffer.append((epoch, seq, item, _LOST if lost else _RESYNC))
            return SKIP
        self.ahead = False  # the feed has moved: it stands where it says
        if self._past(epoch, seq, lost):
            return SKIP
        if not lost and epoch == self.epoch:
            self.buffer = [(epoch, seq, item, _RESYNC)]
            return CATCH_UP
        self.epoch, self.threshold, self.tag = epoch, seq, self._tag(item)  # where the feed is
        return SEND

    def catch_up_from(self) -> tuple[str, int, str | None] | None:
        """After :data:`CATCH_UP`, until :meth:`start_live`: the cursor to read the connection's
        history after, ``(epoch, seq, tag of the event there when known)``."""
        if self.buffer is None or self.epoch is None:
            return None
        return self.epoch, self.threshold, self.tag

    def read_found(self, epoch: str) -> None:
        """After :data:`CATCH_UP`, the read for it answered with history ``epoch``: the resync
        it read for, captured first and older than the read (which began after it), is
        dropped when it names another history. Redis was emptied again: the read tells the
        client ``epoch_changed`` to the new history, and that resync would then take it back
        to the one before, which no gateway can resume from any more."""
        if self.buffer and self.buffer[0][3] == _RESYNC and self.buffer[0][0] != epoch:
            del self.buffer[0]

    def _tag(self, item: T) -> str | None:
        """The tag of the event at an item's cursor (an event's own, a resync's), if known."""
        return self.tag_of(item) if self.tag_of is not None else None

    def _past(self, epoch: str | None, seq: int, lost: bool) -> bool:
        return not lost and epoch == self.epoch and seq <= self.threshold

    def start_live(
        self,
        epoch: str,
        seq: int,
        tag: str | None = None,
        feed: tuple[str | None, int | None] | None = None,
        *,
        catch_up: bool = False,
    ) -> list[T]:
        """The history read is done and the client starts after ``(epoch, seq)`` (the event
        there has tag ``tag``): the captured items to send after ``subscribed``, in order.
        ``feed``: where the feed stands now, ``(epoch, last)``; past the start in its epoch,
        the connection waits for the feed's next resync (:attr:`ahead`, see the class doc).

        ``catch_up``: a captured resync of the feed past the start in its history (not
        ``history_lost``) is read for, as :meth:`offer_resync` does after the read
        (:data:`CATCH_UP`): the items before it are returned, it and the ones after it stay
        captured, and :meth:`catch_up_from` says where to read. Without it (the read for such a
        resync failed), the resync is sent."""
        self.epoch, self.threshold, self.tag = epoch, seq, tag
        captured, self.buffer = self.buffer or [], None
        out: list[T] = []
        self.ahead = False
        for index, (item_epoch, item_seq, item, kind) in enumerate(captured):
            if kind != _EVENT:
                self.ahead = False  # the feed has moved: it stands where it says
                if not self._past(item_epoch, item_seq, kind == _LOST):
                    if catch_up and kind == _RESYNC and item_epoch == self.epoch:
                        self.buffer = captured[index:]
                        return out
                    out.append(item)
                    self.epoch, self.threshold = item_epoch, item_seq
                    self.tag = self._tag(item)
            elif item_epoch == self.epoch and item_seq > self.threshold:
                if self.ahead or item_seq != self.threshold + 1:
                    # It follows events the read did not see: the feed was past the start
                    # when the connection joined (the feed delivers without holes otherwise).
                    self.ahead = True
                    continue
                out.append(item)
                self.threshold, self.tag = item_seq, self._tag(item)
            elif item_epoch == self.epoch and item_seq == self.threshold and self._diverges(item):
                assert self.lost is not None  # set with tag_of
                out.append(self.lost(item_epoch, item_seq, item))
                self.tag = self._tag(item)  # the client reloads, this event included
        if feed is not None and not self.ahead:
            feed_epoch, feed_last = feed
            self.ahead = (
                feed_epoch == self.epoch and feed_last is not None and feed_last > self.threshold
            )
        return out

    def caught_up(self, epoch: str | None, last: int | None) -> bool:
        """Whether the feed, at ``(epoch, last)``, has delivered up to the starting point."""
        return (
            self.buffer is None
            and not self.ahead
            and epoch == self.epoch
            and last is not None
            and last >= self.threshold
        )


@dataclass(frozen=True, slots=True)
class SubscriptionPlan:
    """What a subscribing client is sent, in order: ``replay``, then ``resync`` (if any), then the
    ``subscribed`` acknowledgement; live events follow from ``seq + 1``."""

    replay: list[Entry]
    resync: Resync | None
    epoch: str
    seq: int
    resumed: bool
    #: The tag of the event at ``seq`` (the top), when known.
    tag: str | None = None


def plan_subscription(
    epoch: str | None,
    after: int | None,
    snapshot: Snapshot,
    max_replay: int,
    tag: str | None = None,
) -> SubscriptionPlan:
    """Decide how to honour a client's cursor given an atomic read of the project's history.

    ``snapshot.entries`` must be the entries after ``after`` (at most ``max_replay``), read only
    when ``epoch`` is the snapshot's epoch. ``tag``: the tag of the event the client has at
    ``after``, if it sent one; compared with ``snapshot.after_tag``.
    """
    top = snapshot.top
    top_tag = snapshot.top_tag

    def resync(reason: ResyncReason) -> SubscriptionPlan:
        return SubscriptionPlan(
            [], Resync(reason, snapshot.epoch, top, top_tag), snapshot.epoch, top, False, top_tag
        )

    if epoch is None or after is None:
        return SubscriptionPlan([], None, snapshot.epoch, top, False, top_tag)
    if epoch != snapshot.epoch:
        return resync(ResyncReason.EPOCH_CHANGED)
    if after > top or other_event_at_cursor(after, tag, snapshot):
        return resync(ResyncReason.HISTORY_LOST)
    if after == top:
        return SubscriptionPlan([], None, snapshot.epoch, top, True, top_tag)
    if top - after > max_replay:
        return resync(ResyncReason.TOO_FAR_BEHIND)
    if snapshot.corrupt_at is not None:
        return resync(ResyncReason.HISTORY_CORRUPT)
    entries = snapshot.entries
    if type(entries) is not list:
        entries = list(entries)
    # Exactly after + 1 .. top, each once, in order (compared in C: a storm does this 10,000
    # times). Only the seq is read: entries may be longer tuples (a window's carry a size).
    if len(entries) != top - after or list(map(_SEQ, entries)) != list(range(after + 1, top + 1)):
        return resync(ResyncReason.HISTORY_TRIMMED)
    return SubscriptionPlan(entries, None, snapshot.epoch, top, True, top_tag)
