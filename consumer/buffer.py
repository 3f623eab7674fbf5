"""A subscription's buffer: an asyncio FIFO bounded by a number of items *and* a number of bytes.

The consumer's connection task puts a subscription's items here and the caller's iterator takes
them (``Consumer(buffer=..., buffer_bytes=...)``). When an item does not fit, its ``put`` waits
for the caller to make room: the connection task then stops reading (backpressure). A count
alone bounded the memory by ``buffer`` times the largest frame (10,000 of 4 MiB: 40 GB); the
bytes bound it by what the caller sized.

* An item fits when fewer than ``maxitems`` are held and its size added stays within
  ``maxbytes``, or when the queue is empty: one item larger than ``maxbytes`` is admitted alone
  (else it would wait for ever).
* Waiting puts are admitted in the order they came, and none overtakes them: a large item
  waiting is not passed by smaller ones (starved), and items of one project put from two tasks
  (the connection's, a catch-up's) keep their order.
* A waiting put cancelled leaves nothing behind; one cancelled after its item was admitted
  raises CancelledError with its item queued.

Pure asyncio (no sockets): unit-tested in ``tests/test_consumer_buffer.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["BoundedQueue"]


class BoundedQueue:
    """A FIFO of at most ``maxitems`` items and ``maxbytes`` bytes, sizes by ``size(item)``
    (a size of 0 counts 1; none is negative), except that an empty queue admits one item of
    any size."""

    __slots__ = ("_getters", "_items", "_nbytes", "_putters", "_size", "maxbytes", "maxitems")

    def __init__(self, maxitems: int, maxbytes: int, size: Callable[[Any], int]) -> None:
        if maxitems < 1 or maxbytes < 1:
            raise ValueError("maxitems and maxbytes must be >= 1")
        self.maxitems = maxitems
        self.maxbytes = maxbytes
        self._size = size
        self._items: deque[tuple[Any, int]] = deque()
        self._nbytes = 0
        self._getters: deque[asyncio.Future[None]] = deque()
        #: Waiting puts, oldest first: (future set when admitted, item, size).
        self._putters: deque[tuple[asyncio.Future[None], Any, int]] = deque()

    def qsize(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """The sizes of the items held, summed."""
        return self._nbytes

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        """No item fits (of any size: sizes are at least 1)."""
        return bool(self._putters) or (
            bool(self._items)
            and (len(self._items) >= self.maxitems or self._nbytes >= self.maxbytes)
        )

    def fits(self, item: Any) -> bool:
        """Whether ``item`` would be admitted now (nothing waits ahead of it, and there is room)."""
        return not self._putters and self._room(self._sizeof(item))

    def _sizeof(self, item: Any) -> int:
        return self._size(item) or 1

    def _room(self, size: int) -> bool:
        items = self._items
        return not items or (len(items) < self.maxitems and self._nbytes + size <= self.maxbytes)

    def put_nowait(self, item: Any) -> None:
        """Queue ``item`` now; :class:`asyncio.QueueFull` when it does not fit."""
        size = self._size(item) or 1  # (the hot path: _sizeof and _room inlined)
        items = self._items
        if self._putters or (
            items and (len(items) >= self.maxitems or self._nbytes + size > self.maxbytes)
        ):
            raise asyncio.QueueFull
        items.append((item, size))
        self._nbytes += size
        if self._getters:
            self._wake_getter()

    async def put(self, item: Any) -> None:
        """Queue ``item``, waiting (behind any put waiting already) until it fits."""
        size = self._sizeof(item)
        if not self._putters and self._room(size):
            self._append(item, size)
            return
        admitted = asyncio.get_running_loop().create_future()
        entry = (admitted, item, size)
        self._putters.append(entry)
        try:
            await admitted
        except asyncio.CancelledError:
            if not admitted.done() or admitted.cancelled():
                # Not admitted: leave no trace, and let the puts behind it in if they fit now.
                with contextlib.suppress(ValueError):  # (dropped by _admit already)
                    self._putters.remove(entry)
                self._admit()
            raise  # (admitted and then cancelled: the item stays queued)

    def get_nowait(self) -> Any:
        """The oldest item; :class:`asyncio.QueueEmpty` when there is none."""
        if not self._items:
            raise asyncio.QueueEmpty
        item, size = self._items.popleft()
        self._nbytes -= size
        if self._putters:
            self._admit()
        return item

    async def get(self) -> Any:
        """The oldest item, waiting for one."""
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except asyncio.CancelledError:
                with contextlib.suppress(ValueError):
                    self._getters.remove(getter)
                if self._items and not getter.cancelled():
                    self._wake_getter()  # (it was woken for an item it will not take)
                raise
        return self.get_nowait()

    def _append(self, item: Any, size: int) -> None:
        self._items.append((item, size))
        self._nbytes += size
        self._wake_getter()

    def _admit(self) -> None:
        """Move waiting puts into the queue, oldest first, while they fit."""
        putters = self._putters
        while putters:
            admitted, item, size = putters[0]
            if admitted.done():  # cancelled, its task not yet resumed: it waits no more
                putters.popleft()
                continue
            if not self._room(size):
                return
            putters.popleft()
            self._append(item, size)
            admitted.set_result(None)

    def _wake_getter(self) -> None:
        getters = self._getters
        while getters:
            getter = getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return
