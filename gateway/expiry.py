"""Token expiry of every connection, on one coarse timer: per-second buckets, swept once a tick.

Each authenticated connection used to hold an ``asyncio.TimerHandle`` of its own (``call_at``
its token's ``exp``): ~0.15 KiB per idle connection, and a push/pop on the event loop's heap for
every connect, refresh and close. Here a connection is one entry in the set of the second its
token expires in; a heap holds each such second once (at most a token lifetime's worth of
seconds, however many connections), and one callback a tick pops the seconds that have passed.

Contract (:class:`ExpiryWheel`):

* a key added for ``at`` is expired (``expire(key)`` called) exactly once, never before
  ``clock() >= at``, and at most one tick after that (plus the event loop's own lag);
* adding it again (a refreshed token) moves its deadline: pass the slot the previous
  :meth:`ExpiryWheel.add` returned, the old one is dropped;
* a key removed (:meth:`ExpiryWheel.remove`, a closed connection) is never expired.

The wheel holds no reference to a key past its expiry or removal. It is pure: the event loop is
used only to schedule :meth:`ExpiryWheel.sweep` while something is pending, so tests drive
:meth:`ExpiryWheel.sweep` with a clock of their own.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from gateway.logs import get_logger

__all__ = ["TICK", "ExpiryWheel"]

#: Seconds between sweeps; the most an expiry is late (a token's ``exp`` is whole seconds).
TICK = 1.0

K = TypeVar("K", bound=Hashable)

log = get_logger("gateway")


class ExpiryWheel(Generic[K]):
    """Deadlines on the wall clock (``clock``, :func:`time.time`: a token's ``exp`` is one),
    bucketed by ``tick``; ``expire(key)`` is called for each key whose deadline has passed.

    The caller keeps the slot :meth:`add` returns (an int: where the key is) and gives it back
    to :meth:`add` (refresh) and :meth:`remove`; keeping it on the key's own object costs the
    wheel no mapping per key."""

    def __init__(
        self,
        expire: Callable[[K], None],
        *,
        tick: float = TICK,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not tick > 0:
            raise ValueError("tick must be positive")
        self.expire = expire
        self.tick = tick
        self.clock = clock
        #: Slot (deadline // tick, rounded up) -> the keys due then.
        self._buckets: dict[int, set[K]] = {}
        #: Every slot of ``_buckets`` once (a slot emptied by removals stays until swept).
        self._slots: list[int] = []
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._buckets.values())

    def add(self, key: K, at: float, previous: int | None = None) -> int:
        """Expire ``key`` once ``clock() >= at``; ``previous``: the slot of its earlier deadline,
        which this one replaces. Returns the key's slot. Schedules the sweeps on the running
        event loop when none is (call it from the loop's thread)."""
        slot = math.ceil(at / self.tick)
        if previous is not None:
            if previous == slot:
                return slot
            self.remove(key, previous)
        keys = self._buckets.get(slot)
        if keys is None:
            keys = self._buckets[slot] = set()
            heapq.heappush(self._slots, slot)
        keys.add(key)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.tick, self._tick)
        return slot

    def remove(self, key: K, slot: int | None) -> None:
        """Forget ``key`` (its slot as :meth:`add` returned it; None: nothing to do). A key
        already expired, or never added, is ignored."""
        if slot is None:
            return
        keys = self._buckets.get(slot)
        if keys is not None:
            keys.discard(key)
            # The emptied slot stays in the heap until swept: popping it here would cost a
            # search, and a slot is at most one entry per second of token lifetime.

    def sweep(self, now: float | None = None) -> int:
        """Expire every key whose deadline is at or before ``now`` (default ``clock()``), each
        once; returns how many. A key's ``expire`` raising does not stop the others'."""
        if now is None:
            now = self.clock()
        due = math.floor(now / self.tick)
        slots, buckets = self._slots, self._buckets
        expired = 0
        while slots and slots[0] <= due:
            keys = buckets.pop(heapq.heappop(slots), None)
            for key in keys or ():
                expired += 1
                try:
                    self.expire(key)
                except Exception:  # one broken close must not keep the rest of the slot open
                    log.exception("token expiry failed")
        return expired

    def close(self) -> None:
        """Stop the sweeps (the gateway is closing); pending keys are left unexpired."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self._handle = None
        try:
            self.sweep()
        finally:
            if self._slots and self._handle is None:
                self._handle = asyncio.get_running_loop().call_later(self.tick, self._tick)
