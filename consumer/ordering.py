"""Per-project ordering of a consumer, as a pure state machine (no sockets, no clock).

:class:`ProjectState` holds the project's cursor (the last event *received*, which may be ahead of
the last one the caller processed) and decides, frame by frame, what the client does: deliver an
event, drop a duplicate, resubscribe from the cursor after a gap, or surface a resync. The rules
are the ones of ``eventbus.js``'s ``ProjectCursor``:

* an event is delivered only when it is exactly ``seq + 1``; lower numbers are duplicates (replay
  overlap after a reconnect) and are dropped;
* a higher number is a gap, which the gateway never leaves on purpose: the client resubscribes
  from its cursor (the gateway replays what is missing) instead of skipping an event;
* while a subscribe is in flight, out-of-order events are dropped: that subscribe's replay (which
  always precedes its ``subscribed``) brings them in order; a ``subscribed`` that leaves the cursor
  behind the top it announces is a gap too;
* ``resync_required`` moves the cursor to the given ``(epoch, seq)`` and is surfaced as an item.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from consumer.types import Cursor, Resync
from schemas.protocol import ResyncReason

__all__ = ["ProjectState", "SubscribedOutcome", "Verdict"]


class Verdict(enum.Enum):
    """What to do with one event frame."""

    DELIVER = "deliver"  # the next event: hand it to the caller (the cursor moved)
    DUPLICATE = "duplicate"  # already received: drop
    GAP = "gap"  # events are missing: drop it and send a subscribe from the cursor
    DROP = "drop"  # out of order while a subscribe is in flight: its replay brings it


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

    @property
    def known(self) -> bool:
        return self.cursor is not None

    def subscribe_message(self) -> dict[str, object]:
        """The subscribe frame to send now (on every connect, and after a gap)."""
        self.pending = True
        self.resync_seen = False
        message: dict[str, object] = {"type": "subscribe", "project_id": self.project_id}
        if self.cursor is not None:
            message["epoch"], message["after"] = self.cursor
        return message

    def on_event(self, seq: int) -> Verdict:
        cursor = self.cursor
        if cursor is None:
            # Only a `subscribed` places the first event; the subscribe in flight covers it.
            return Verdict.DROP
        last = cursor[1]
        if seq == last + 1:
            self.cursor = Cursor(cursor[0], seq)
            return Verdict.DELIVER
        if seq <= last:
            return Verdict.DUPLICATE
        return Verdict.DROP if self.pending else Verdict.GAP

    def on_subscribed(self, epoch: str, seq: int, resumed: bool) -> SubscribedOutcome:
        """The gateway's ``subscribed``: the project is live after ``(epoch, seq)``."""
        self.pending = False
        if self.cursor is None:
            start = self.start_after
            self.start_after = None
            if start is not None and start < seq:
                # Replay from `start` of this epoch: one more subscribe, with that cursor.
                self.cursor = Cursor(epoch, start)
                return SubscribedOutcome(resubscribe=True)
            self.cursor = Cursor(epoch, seq)
            return SubscribedOutcome()
        if self.resync_seen:
            return SubscribedOutcome()  # resync_required came first and was surfaced
        if not resumed or epoch != self.cursor.epoch:
            # The gateway always says resync_required first; never trust silence, though.
            reason = (
                ResyncReason.EPOCH_CHANGED
                if epoch != self.cursor.epoch
                else ResyncReason.HISTORY_LOST
            )
            self.cursor = Cursor(epoch, seq)
            return SubscribedOutcome(resync=Resync(self.project_id, reason, epoch, seq))
        if self.cursor.seq < seq:
            # The replay did not bring us up to the announced top: ask again from the cursor.
            return SubscribedOutcome(resubscribe=True)
        return SubscribedOutcome()

    def on_resync(self, reason: ResyncReason, epoch: str, seq: int) -> Resync:
        """The gateway's ``resync_required``: later events continue after ``(epoch, seq)``."""
        self.cursor = Cursor(epoch, seq)
        self.start_after = None
        self.resync_seen = True
        return Resync(self.project_id, reason, epoch, seq)
