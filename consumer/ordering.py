"""Per-project ordering of a consumer, as a pure state machine (no sockets, no clock).

:class:`ProjectState` holds the project's cursor (the last event *received*, which may be ahead of
the last one the caller processed) and decides, frame by frame, what the client does: deliver an
event, drop a duplicate, resubscribe from the cursor after a gap, or surface a resync. The rules
are the ones of ``eventbus.js``'s ``ProjectCursor``:

* an event is delivered only when it is exactly ``seq + 1``; lower numbers are duplicates (replay
  overlap after a reconnect) and are dropped;
* a higher number is a gap, which the gateway never leaves on purpose: the client resubscribes
  from its cursor (the gateway replays what is missing) instead of skipping an event (except for
  a project whose events go to no one, :attr:`ProjectState.delivers` False: its cursor moves
  past the gap, as past a replay stopping short of its top; nothing to repair); after
  :data:`GAP_REPAIRS` such repairs from the same cursor (the history does not have the missing
  event, or numbers an entry wrongly), the next gap from it is surfaced as ``history_corrupt``
  to just before the event, which is then delivered: asking again would loop for ever, nothing
  delivered and nothing said (``eventbus.js`` does the same);
* while a subscribe is in flight, out-of-order events are dropped: that subscribe's replay (which
  always precedes its ``subscribed``) brings them in order; a ``subscribed`` that leaves the cursor
  behind the top it announces is a gap too; twice in a row from the same cursor, it is surfaced
  as ``history_corrupt`` instead: the next event cannot be delivered (a stream entry someone else
  wrote, which the gateway relays but no client can place), and asking again would loop;
* ``resync_required`` moves the cursor to the given ``(epoch, seq)`` and is surfaced as an item;
  except ``too_far_behind`` in the cursor's own epoch, which the client may *catch up* instead: it
  reads the missed events page by page (the gateway's HTTP polling endpoint has no replay bound),
  ignoring the WebSocket's events meanwhile, then resubscribes from where the pages ended;
  and except one naming the cursor itself, the same event (tag): a catch-up's page said it first
  (:meth:`ProjectState.stands_at`);
* event frames carry no epoch: the WebSocket's events are taken to be in the epoch its last
  ``subscribed`` or ``resync_required`` named. When a catch-up's page moved the cursor to another
  epoch (the history was flushed while the pages were read), the WebSocket's events are still the
  old epoch's, and are dropped until it names the cursor's epoch too;
* the cursor carries the tag of the event at its ``seq`` (``docs/consumer.md``, "Cursor tags"):
  an event's cursor keeps the event's frame, hashed only when the tag is read (a subscribe, a
  store's save); ``subscribed`` and ``resync_required`` give theirs. A resumed ``subscribed``
  whose top is the cursor but whose tag is not the cursor's is ``history_lost`` (a gateway
  checks the tag itself and says ``resync_required`` first; never trust silence, though).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from consumer.types import Cursor, Resync
from schemas.protocol import ResyncReason
from schemas.tags import tags_differ

__all__ = ["GAP_REPAIRS", "ProjectState", "SubscribedOutcome", "Verdict"]

#: Resubscribes after a gap from one cursor before the next gap from it is a resync.
GAP_REPAIRS = 2


class Verdict(enum.Enum):
    """What to do with one event frame."""

    DELIVER = "deliver"  # the next event: hand it to the caller (the cursor moved)
    DUPLICATE = "duplicate"  # already received: drop
    GAP = "gap"  # events are missing: drop it and send a subscribe from the cursor
    DROP = "drop"  # out of order while a subscribe is in flight: its replay brings it
    #: A gap the repairs did not fill: surface ``ProjectState.corrupt`` (a Resync to just before
    #: this event), then deliver this event (the cursor moved to it).
    CORRUPT = "corrupt"


@dataclass(frozen=True, slots=True)
class SubscribedOutcome:
    """The reaction to a ``subscribed`` message: an item to surface, and/or a subscribe to send."""

    resync: Resync | None = None
    resubscribe: bool = False


@dataclass(slots=True)
class ProjectState:
    """The consumer's view of one project.

    Args:
        project_id: the project.
        cursor: where to resume (the last event processed, e.g. from a cursor store), or None.
        start_after: without a cursor, the sequence number to start after in the project's
            current epoch (0: from the start of the retained history); None: live from now.
    """

    project_id: int
    cursor: Cursor | None = None
    start_after: int | None = None
    pending: bool = False  # a subscribe was sent and its `subscribed` has not arrived yet
    resync_seen: bool = False  # a resync_required arrived since the last subscribe
    #: The last ``resync_required`` since the last subscribe came on the WebSocket: the cursor
    #: has moved only by it and the live events after it (not by a catch-up's pages).
    resync_live: bool = False
    catching_up: bool = False  # missed events are being read page by page
    resubscribe_when_acknowledged: bool = False  # a catch-up ended before its `subscribed`
    generation: int = 0  # bumps on every resync and catch-up: a stale catch-up recognises itself
    #: The epoch of the WebSocket's events: what its last ``subscribed`` or ``resync_required``
    #: for the project named (None: nothing yet on this connection).
    stream_epoch: str | None = None
    #: The cursor of the last resubscribe made because a replay stopped short of its top.
    short_replay: Cursor | None = None
    #: The cursor the last gap repairs were made from, and how many.
    gap_from: Cursor | None = None
    gap_repairs: int = 0
    #: The Resync of the last :attr:`Verdict.CORRUPT`.
    corrupt: Resync | None = None
    #: Its items go to the caller. False for a project subscribed only for its presence
    #: (``Consumer.presence``): ordered all the same, delivered to no one, and a gap in its
    #: events (or a replay short of its top) skipped, not repaired.
    delivers: bool = True
    #: The subscribe in flight asked for presence (``"presence": true``).
    asked_presence: bool = False
    #: The subscribe answered last asked for presence, whose answer (the ``presence`` list, or
    #: ``unavailable`` when the gateway's read of it failed) has not come yet: the gateway sends
    #: it after the ``subscribed``, before anything about a later subscribe.
    presence_due: bool = False

    @property
    def answer_due(self) -> bool:
        """Whether the gateway still owes an answer to a subscribe of ours: its ``subscribed``
        (:attr:`pending`), or after it its presence answer (:attr:`presence_due`). No other
        subscribe goes meanwhile: the gateway handles a project's frames in order (it would
        wait behind that one there anyway), and answers to two could not be told apart (an
        ``unavailable`` after a presence answer never sent was taken for that answer)."""
        return self.pending or self.presence_due

    @property
    def subscribe_coming(self) -> bool:
        """Whether a subscribe from the cursor is in flight, or held until the presence answer
        owed comes (:attr:`answer_due`): its replay covers an event past a gap meanwhile."""
        return self.pending or (self.presence_due and self.resubscribe_when_acknowledged)

    @property
    def known(self) -> bool:
        return self.cursor is not None

    def on_connection(self) -> None:
        """A new connection: what was sent on an earlier one is never answered (a subscribe
        still unacknowledged there must not hold back the next one), and none of its events
        follow."""
        self.pending = False
        self.resubscribe_when_acknowledged = False
        self.stream_epoch = None
        self.asked_presence = self.presence_due = False

    def subscribe_message(self) -> dict[str, object]:
        """The subscribe frame to send now (on every connect, and after a gap), with the tag of
        the cursor when it has one."""
        self.pending = True
        self.resync_seen = False
        self.resync_live = False
        self.resubscribe_when_acknowledged = False  # this subscribe is the one
        message: dict[str, object] = {"type": "subscribe", "project_id": self.project_id}
        cursor = self.cursor
        if cursor is not None:
            message["epoch"], message["after"] = cursor
            tag = cursor.tag
            if tag is not None:
                message["tag"] = tag
        return message

    def ask_again(self) -> bool:
        """Whether a subscribe with other options (``presence`` asked for or dropped) may go
        now. Not while one is in flight: the gateway's answer to it could not be told from the
        answer to the new one (a live subscribe answered after a resume from the cursor was
        sent looked like a resume refused: ``history_lost``); :meth:`on_subscribed` asks for
        it when that one is answered (the client, when its presence answer comes)."""
        if self.answer_due:
            self.resubscribe_when_acknowledged = True
            return False
        return True

    def on_event(self, seq: int, *, paged: bool = False, frame: bytes | None = None) -> Verdict:
        """An event frame from the WebSocket, or (``paged``) from a catch-up page; ``frame`` is
        its text as received, whose tag becomes the cursor's when it is delivered."""
        if self.catching_up and not paged:
            return Verdict.DROP  # the pages bring it; the resubscribe after them the rest
        cursor = self.cursor
        if cursor is None:
            # Only a `subscribed` places the first event; the subscribe in flight covers it.
            return Verdict.DROP
        if not paged and self.stream_epoch is not None and self.stream_epoch != cursor[0]:
            # A catch-up's page moved the cursor to a newer epoch; this event is of the old one
            # (it carries no epoch of its own), whatever its number: the resubscribe brings the
            # new epoch's.
            return Verdict.DROP if self.subscribe_coming else Verdict.GAP
        last = cursor[1]
        if seq == last + 1:
            self.cursor = Cursor(cursor[0], seq, frame=frame)
            return Verdict.DELIVER
        if seq <= last:
            return Verdict.DUPLICATE
        if self.subscribe_coming and not paged:
            return Verdict.DROP  # (a page's gap is not in that replay: the pages stop at it)
        if not self.delivers:
            # Its events go to no one (presence only): a gap has nothing to repair, and a
            # resubscribe would cost the gateway a replay nobody reads. The cursor moves past
            # it (a retry's subscribe from there replays little).
            self.cursor = Cursor(cursor[0], seq, frame=frame)
            return Verdict.DELIVER
        if self.gap_from != cursor:
            self.gap_from, self.gap_repairs = cursor, 0
        if self.gap_repairs < GAP_REPAIRS:
            self.gap_repairs += 1
            return Verdict.GAP
        self.corrupt = self._corrupt(cursor[0], seq - 1)
        self.cursor = Cursor(cursor[0], seq, frame=frame)
        return Verdict.CORRUPT

    def on_subscribed(
        self, epoch: str, seq: int, resumed: bool, tag: str | None = None
    ) -> SubscribedOutcome:
        """The gateway's ``subscribed``: the project is live after ``(epoch, seq)``; ``tag``:
        the tag of the event at ``seq`` it gave (a valid one, or None)."""
        self.pending = False
        self.stream_epoch = epoch
        again = self.resubscribe_when_acknowledged
        self.resubscribe_when_acknowledged = False
        if self.cursor is None:
            # (first, also when another subscribe is asked for: the answer places the cursor,
            # which that one goes from; live again, it dropped the events between the answers)
            start = self.start_after
            self.start_after = None
            if start is not None and start < seq:
                # Replay from `start` of this epoch: one more subscribe, with that cursor.
                self.cursor = Cursor(epoch, start)
                return SubscribedOutcome(resubscribe=True)
            self.cursor = Cursor(epoch, seq, tag)
            return SubscribedOutcome(resubscribe=again)
        if again:
            return SubscribedOutcome(resubscribe=True)
        if self.resync_seen:
            own = self.cursor
            if not self.resync_live or (epoch == own.epoch and seq >= own.seq):
                return SubscribedOutcome()  # resync_required came first and was surfaced
            # The subscribe's answer names a top behind the cursor that resync (and the live
            # events after it, which Redis held before this answer's read) took it to, or
            # another epoch: the history moved again since (a failover lost those events after
            # the live feed told of an earlier one). Carrying on from the cursor would drop the
            # next events under those numbers as duplicates, in silence.
            lost = epoch == own.epoch
            reason = ResyncReason.HISTORY_LOST if lost else ResyncReason.EPOCH_CHANGED
            return SubscribedOutcome(resync=self.on_resync(reason, epoch, seq, tag))
        if not resumed or epoch != self.cursor.epoch or seq < self.cursor.seq:
            # The gateway always says resync_required first; never trust silence, though. A top
            # behind the cursor in its epoch (history lost) would otherwise have every event up
            # to the cursor dropped as a duplicate.
            reason = (
                ResyncReason.EPOCH_CHANGED
                if epoch != self.cursor.epoch
                else ResyncReason.HISTORY_LOST
            )
            self.cursor = Cursor(epoch, seq, tag)
            return SubscribedOutcome(resync=Resync(self.project_id, reason, epoch, seq, tag))
        if self.cursor.seq < seq and not self.delivers:
            # A replay short of its top, of events that go to no one: nothing to ask again.
            self.cursor = Cursor(epoch, seq, tag)
            return SubscribedOutcome()
        if self.cursor.seq < seq:
            if self.short_replay == self.cursor:
                # The replay from this cursor stopped short twice: the event after it is one no
                # client can place (a foreign frame in the stream, relayed as it is), and every
                # further replay would stop there again, a busy loop with nothing delivered.
                # Skip to the top, as the gateway's own history_corrupt does: never silence.
                return SubscribedOutcome(resync=self._corrupt(epoch, seq, tag))
            # The replay did not bring us up to the announced top: ask again from the cursor
            # (once: an event dropped while the subscribe was in flight is in the next replay).
            self.short_replay = self.cursor
            return SubscribedOutcome(resubscribe=True)
        if tag is not None:
            # At the top: the event there is the one we have, or the gateway lost ours and
            # numbered another one so (a failover) without saying it.
            own = self.cursor.tag
            if own is None:
                self.cursor = Cursor(epoch, seq, tag)  # (unchecked until now: take the top's)
            elif own != tag:
                self.cursor = Cursor(epoch, seq, tag)
                self.short_replay = self.gap_from = None
                self.generation += 1
                resync = Resync(self.project_id, ResyncReason.HISTORY_LOST, epoch, seq, tag)
                return SubscribedOutcome(resync=resync)
        return SubscribedOutcome()

    def _corrupt(self, epoch: str, seq: int, tag: str | None = None) -> Resync:
        self.cursor = Cursor(epoch, seq, tag)
        self.short_replay = self.gap_from = None
        self.generation += 1
        return Resync(self.project_id, ResyncReason.HISTORY_CORRUPT, epoch, seq, tag)

    def at_top(self, reason: ResyncReason, epoch: str, seq: int, tag: str | None = None) -> bool:
        """Whether a ``resync_required`` says ``too_far_behind`` of the cursor itself: the
        gateway handles a resubscribe after the messages before it, the project's live events
        (the next ones, delivered) keep coming meanwhile, and it unsubscribes, then reads its
        top. More than one replay came so: nothing is missing. Taken as the subscribe's answer
        (its ``subscribed`` acknowledges the cursor), neither surfaced nor caught up (whose pages
        hold nothing after the cursor: a catch-up that cannot be read).

        Not when its ``tag`` names another event at ``seq`` than the cursor's: a failover
        replaced the event the consumer has, and the replacement would never come (the
        ``subscribed`` after a resync is not checked again). A cursor without a tag takes it."""
        if reason != ResyncReason.TOO_FAR_BEHIND or self.cursor != (epoch, seq):
            return False
        own = self.cursor.tag
        if tags_differ(own, tag):
            return False
        if own is None and tag is not None:
            self.cursor = Cursor(epoch, seq, tag)
        self.resync_seen = True
        self.resync_live = True
        self.stream_epoch = epoch
        return True

    def stands_at(self, reason: ResyncReason, epoch: str, seq: int, tag: str | None) -> bool:
        """Whether a WebSocket ``resync_required`` names where the cursor already stands, the
        same event (both tags known and equal): a catch-up's page said that resync first (the
        polling endpoint reads Redis, which the gateway's live feed learns of later: its pub/sub
        link was down), it was surfaced then, and the gateway, which had not yet read the
        resubscribe from there, says it again to a connection it still counts at the old cursor.
        Nothing happened since for the caller to reload: it is not surfaced again. It only tells
        that the WebSocket's events are in that epoch from now on. Not ``history_lost`` (the
        history the cursor came from was rewritten: never dropped, as the gateway's own rule
        for a joining connection), nor without a tag on either side (it cannot tell the event
        at ``seq`` is the one the consumer has: surfaced, a reload too many rather than a
        replacement skipped); at ``seq`` 0 there is no event to tell apart (the start of the
        epoch, which names one history only), and no tag is needed."""
        own = self.cursor
        if reason == ResyncReason.HISTORY_LOST or own is None or own != (epoch, seq):
            return False
        if seq == 0:
            same = not tags_differ(own.tag, tag)
        else:
            same = tag is not None and own.tag == tag
        if not same:
            return False
        self.stream_epoch = epoch
        return True

    def can_catch_up(self, reason: ResyncReason, epoch: str) -> bool:
        """Whether a ``resync_required`` only says the replay would be too long: the events are
        still in the history of the cursor's epoch and can be read page by page."""
        return (
            reason == ResyncReason.TOO_FAR_BEHIND
            and self.cursor is not None
            and self.cursor.epoch == epoch
            and not self.catching_up
        )

    def begin_catch_up(self) -> None:
        """Read the missed events by pages; WebSocket events are dropped until :meth:`end_catch_up`
        (the ``subscribed`` that follows the resync too: it acknowledges a position we skip)."""
        self.catching_up = True
        self.resync_seen = True
        self.resync_live = False  # the pages move the cursor on
        self.generation += 1
        if self.cursor is not None:
            self.stream_epoch = self.cursor.epoch  # the resync named it (see can_catch_up)

    def end_catch_up(self) -> dict[str, object] | None:
        """The pages are read (or failed): the subscribe to send now, from wherever the cursor
        is, or None when the gateway has not yet acknowledged the subscribe that led here (its
        ``subscribed`` cannot be told from the answer to a new one): :meth:`on_subscribed` asks
        for the resubscribe then."""
        self.catching_up = False
        if self.answer_due:
            self.resubscribe_when_acknowledged = True
            return None
        return self.subscribe_message()

    def on_resync(
        self,
        reason: ResyncReason,
        epoch: str,
        seq: int,
        tag: str | None = None,
        *,
        paged: bool = False,
    ) -> Resync:
        """The gateway's ``resync_required``: later events continue after ``(epoch, seq)``, whose
        event's tag is ``tag`` (a valid one, or None); ``paged``: it came with a catch-up's page,
        not on the WebSocket (whose events are still in the epoch it last named)."""
        self.cursor = Cursor(epoch, seq, tag)
        self.short_replay = self.gap_from = None
        if not paged:
            self.stream_epoch = epoch
        self.start_after = None
        self.resync_seen = True
        self.resync_live = not paged
        self.catching_up = False  # a catch-up in progress is obsolete
        self.generation += 1
        return Resync(self.project_id, reason, epoch, seq, tag)
