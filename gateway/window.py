"""A feed's most recent frames, kept in memory so that most resumes need no Redis read (pure).

A :class:`ResumeWindow` holds the frames a feed delivered last, contiguous and ending at the
feed's ``last``: entries ``lo .. last`` of one epoch, with no hole. It is appended to in
delivery order, reset when the feed moves to another cursor (a resync), trimmed from its oldest
end when it holds more than its count, and by :class:`WindowBudget` when the windows of the whole
pod hold more bytes than the budget. Trimming only ever drops the oldest entries, so what is left
is still contiguous up to ``last``.

:meth:`ResumeWindow.snapshot` answers a subscribe as one atomic history read at the feed's
``(epoch, last)`` would, or returns ``None`` when only Redis can answer (a cursor older than the
window, ahead of the feed, or of an epoch the feed never had). Whoever calls it must make sure the
feed is not repairing (see :meth:`gateway.hub.Hub`); anything after ``last`` reaches the client
through the feed, exactly as after a read whose top was ``last``. The answer goes through the same
:func:`gateway.sequencing.plan_subscription` as a read, so the rules (epoch, ``history_lost``,
``too_far_behind``) are the same.

A window also keeps one **memo** (:meth:`ResumeWindow.remember`): a value its owner derived
from the entries for one cursor (the hub's replay for it, built once for every client resuming
there, as a reconnect storm's clients of one project do). Every change of the entries forgets
it, and its bytes count in the window's (and the budget's) until then.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from gateway.sequencing import Snapshot

__all__ = ["ResumeWindow", "WindowBudget", "seed_run"]

T = TypeVar("T")

#: Epochs a window remembers it moved away from: a client resuming with one of them is told
#: ``epoch_changed`` from memory (a storm after a Redis flush) instead of one read per client.
RETIRED_EPOCHS = 4


class WindowBudget:
    """The bytes the windows of one pod may hold together, evicted least recently appended first.

    Each window reports its byte count changes (:meth:`grow`/:meth:`shrink`) and its appends
    (:meth:`touched`); when the total passes ``limit``, the oldest entries of the window that
    went longest without an append are dropped first (an idle project's clients resume at its
    ``last``, which needs no entry), then the next one's. Memos (:meth:`ResumeWindow.remember`)
    are dropped before any entry, the one kept longest first: a memo only saves work, an entry
    saves a client a read.
    """

    __slots__ = ("_memos", "_order", "bytes", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self._order: collections.OrderedDict[ResumeWindow, None] = collections.OrderedDict()
        #: The windows holding a memo, in the order they remembered it.
        self._memos: dict[ResumeWindow, None] = {}

    def touched(self, window: ResumeWindow) -> None:
        self._order[window] = None
        self._order.move_to_end(window)

    def holds(self, window: ResumeWindow) -> None:
        """``window`` holds entries (it is evicted in its turn, without counting as an append)."""
        self._order.setdefault(window, None)

    def forget(self, window: ResumeWindow) -> None:
        self._order.pop(window, None)

    def enforce(self) -> None:
        """Drop memos, then oldest entries, least recently appended window first, until within
        the limit."""
        memos = self._memos
        while self.bytes > self.limit and memos:
            next(iter(memos)).forget_memo()
        while self.bytes > self.limit and self._order:
            window = next(iter(self._order))
            while self.bytes > self.limit and window.entries:
                window.drop_oldest(evict=True)
            if not window.entries:
                self.forget(window)


class ResumeWindow(Generic[T]):
    """The last frames of one feed: ``entries`` hold ``(seq, item, size)`` for ``lo .. last``.

    ``epoch``/``last`` mirror the feed's cursor (``epoch`` is ``None`` until the feed knows its
    baseline); items are opaque (the hub keeps its pre-built frames). ``generation`` changes on
    every reset, so that a read begun before one is not merged into the new history.
    """

    __slots__ = (
        "__weakref__",
        "base_item",
        "base_tag",
        "budget",
        "bytes",
        "capacity",
        "entries",
        "epoch",
        "generation",
        "last",
        "memo",
        "retired",
        "tag_of",
    )

    def __init__(
        self,
        capacity: int,
        budget: WindowBudget | None = None,
        tag_of: Callable[[T], str | None] | None = None,
    ) -> None:
        self.capacity = capacity
        self.budget = budget
        #: The tag (schemas.tags) of an item's event; None: the window knows no tags, and
        #: leaves every cursor that carries one to Redis (but one too far behind anyway).
        self.tag_of = tag_of
        self.epoch: str | None = None
        self.last = 0
        #: The event at ``lo - 1``, just before the oldest held, when known: its tag as
        #: :meth:`reset` gave it (for an empty window, ``lo - 1`` is ``last``), or the item
        #: :meth:`drop_oldest` dropped last (its tag computed only if asked for). A client
        #: resuming there, the commonest cursor of a storm, can then be checked from memory.
        self.base_tag: str | None = None
        self.base_item: T | None = None
        self.entries: collections.deque[tuple[int, T, int]] = collections.deque()
        self.bytes = 0
        self.generation = 0
        self.retired: collections.deque[str] = collections.deque(maxlen=RETIRED_EPOCHS)
        #: ``(key, value, size)`` of :meth:`remember`, or None.
        self.memo: tuple[object, object, int] | None = None

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    @property
    def lo(self) -> int:
        """The oldest seq held (``last + 1`` when empty)."""
        return self.last - len(self.entries) + 1

    def reset(self, epoch: str | None, last: int, tag: str | None = None) -> None:
        """The feed now stands at ``(epoch, last)`` (where the event has tag ``tag``, if known)
        without having delivered what led there: drop everything (a window never spans a
        resync)."""
        if self.epoch is not None and epoch != self.epoch and self.epoch not in self.retired:
            self.retired.append(self.epoch)
        self.clear()
        self.epoch, self.last, self.base_tag = epoch, last, tag
        self.generation += 1

    def clear(self) -> None:
        """Drop every entry and give their bytes back to the budget (the feed is going away)."""
        self.entries.clear()
        self.base_tag = self.base_item = None
        self.forget_memo()
        if self.budget is not None:
            self.budget.bytes -= self.bytes
            self.budget.forget(self)
        self.bytes = 0

    def append(self, seq: int, item: T, size: int) -> None:
        """The feed delivered ``seq``. Anything but ``last + 1`` empties the window first, so it
        stays contiguous (the hub never does that; it is a guard, not a path)."""
        if seq != self.last + 1 or self.epoch is None:
            self.clear()
        elif self.memo is not None:
            self.forget_memo()
        self.last = seq
        self.entries.append((seq, item, size))
        self.bytes += size
        if len(self.entries) > self.capacity:
            self.drop_oldest()
        if self.budget is not None:
            self.budget.bytes += size
            self.budget.touched(self)
            self.budget.enforce()

    def drop_oldest(self, evict: bool = False) -> None:
        """Drop the oldest entry. It is kept as the event just below the window (its tag is
        computed only if asked for), except when the byte budget evicts it (``evict``): then
        nothing of its bytes is kept, only its tag when it was the last entry (an emptied
        window's top, where resumes are still answered)."""
        if self.memo is not None:
            self.forget_memo()
        _, item, size = self.entries.popleft()
        if not evict:
            self.base_tag, self.base_item = None, item
        elif not self.entries and self.tag_of is not None:
            self.base_tag, self.base_item = self.tag_of(item), None
        else:
            self.base_tag = self.base_item = None
        self.bytes -= size
        if self.budget is not None:
            self.budget.bytes -= size

    def prepend(self, generation: int, epoch: str, run: list[tuple[int, T, int]]) -> int:
        """Add older entries read from the history: ``run`` must be contiguous and end at
        ``lo - 1`` (see :func:`seed_run`), read in ``epoch`` while the window was at
        ``generation``. Keeps the newest of them that fit the capacity; returns how many."""
        if generation != self.generation or epoch != self.epoch or not run:
            return 0
        if run[-1][0] != self.lo - 1:
            return 0
        room = self.capacity - len(self.entries)
        if room <= 0:
            return 0
        taken = run[-room:]
        if self.memo is not None:
            self.forget_memo()
        self.entries.extendleft(reversed(taken))
        self.base_tag = self.base_item = None  # the event before the oldest read: not read
        size = sum(entry[2] for entry in taken)
        self.bytes += size
        if self.budget is not None:
            self.budget.bytes += size
            self.budget.holds(self)
            self.budget.enforce()
        return len(taken)

    def remember(self, key: object, value: object, size: int) -> bool:
        """Keep ``value``, derived from the current entries for ``key``, until they change, and
        count its ``size`` bytes in the window's and the budget's. Replaces any earlier memo.
        Not kept (False) when the budget has no room for it: a memo only saves work, it never
        takes an entry's place."""
        if self.memo is not None:
            self.forget_memo()
        budget = self.budget
        if budget is not None and budget.bytes + size > budget.limit:
            return False
        self.memo = (key, value, size)
        self.bytes += size
        if budget is not None:
            budget.bytes += size
            budget.holds(self)
            budget._memos[self] = None
        return True

    def recall(self, key: object) -> object | None:
        """The value remembered for ``key``, if the entries have not changed since; else None."""
        memo = self.memo
        if memo is not None and memo[0] == key:
            return memo[1]
        return None

    def forget_memo(self) -> None:
        memo = self.memo
        if memo is None:
            return
        self.memo = None
        size = memo[2]
        self.bytes -= size
        budget = self.budget
        if budget is not None:
            budget.bytes -= size
            del budget._memos[self]

    def snapshot(
        self, epoch: str | None, after: int | None, max_replay: int, tag: str | None = None
    ) -> Snapshot | None:
        """What one atomic read at ``(self.epoch, self.last)`` would give a client resuming after
        ``(epoch, after)``; ``None`` when only Redis knows. Its entries are the window's own
        ``(seq, item, size)`` triples: ``entry[0]`` and ``entry[1]`` are a read's seq and frame.

        A fresh subscribe (no cursor) starts at ``last``; a cursor of a retired epoch gets the
        current one (``epoch_changed``); a cursor further behind than ``max_replay`` gets
        ``too_far_behind`` (the history holds at least ``last`` in this epoch). A cursor ahead of
        ``last`` (the client saw events this feed has not delivered yet) or older than the
        window needs a read, and so does a cursor with a ``tag`` whose event the window does not
        know (:meth:`tag_at`: only a read can compare it), unless it is too far behind anyway.
        The snapshot's ``top_tag`` and ``after_tag`` are those of the window's events at
        ``last`` and ``after``.
        """
        current = self.epoch
        if current is None:
            return None
        if epoch is None or after is None:
            return Snapshot(current, self.last, top_tag=self.tag_at(self.last))
        if epoch != current:
            if epoch in self.retired:
                return Snapshot(current, self.last, top_tag=self.tag_at(self.last))
            return None
        if after > self.last or after < 0:
            return None
        after_tag = None if tag is None else self.tag_at(after)
        top_tag = self.tag_at(self.last)
        if self.last - after > max_replay:
            # A resync to the top whatever the event at the cursor: ``too_far_behind``, or
            # ``history_lost`` when the window knows another event there. A read might say
            # ``history_lost`` where the window knows no tag: either way the client reloads,
            # and a catch-up by pages (the Python consumer's) checks its tag page by page.
            return Snapshot(current, self.last, top_tag=top_tag, after_tag=after_tag)
        if tag is not None and after > 0 and after_tag is None:
            return None  # a cursor only a read can check
        count = self.last - after
        if count > len(self.entries):
            return None  # older than the window
        # The newest ``count`` entries, taken from the right: a resume is usually a few events
        # behind a window of up to a thousand, and the triples are shared, not rebuilt.
        entries = list(itertools.islice(reversed(self.entries), count))
        entries.reverse()
        return Snapshot(
            current,
            self.last,
            entries,  # type: ignore[arg-type]
            top_tag=top_tag,
            after_tag=after_tag,
        )

    def tag_at(self, seq: int) -> str | None:
        """The tag of the event at ``seq`` when the window knows it: one it holds, or the one
        just before them (:attr:`base_tag`, :attr:`base_item`)."""
        tag_of = self.tag_of
        if seq < 1 or tag_of is None:
            return None
        entries = self.entries
        index = seq - self.lo
        if 0 <= index < len(entries):
            return tag_of(entries[index][1])
        if index == -1:
            return tag_of(self.base_item) if self.base_item is not None else self.base_tag
        return None


def seed_run(entries: Iterable[tuple[int, bytes]], end: int) -> list[tuple[int, bytes]]:
    """The longest contiguous run of ``entries`` (in seq order) that ends exactly at ``end``;
    empty when none does (a hole, a corrupt entry or a trimmed stream right before ``end``)."""
    run: list[tuple[int, bytes]] = []
    for seq, frame in entries:
        if seq > end:
            break
        if run and seq != run[-1][0] + 1:
            run = []
        run.append((seq, frame))
    if not run or run[-1][0] != end:
        return []
    return run
