"""One in-flight call shared by every concurrent caller: the shape of a health probe that
anyone may ask at any rate (``/readyz``), where a call per request would take a pooled Redis
connection each; and one per key (:class:`KeyedSingleFlight`): the same page of a project's
history asked for by many pollers at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["KeyedSingleFlight", "SingleFlight"]

K = TypeVar("K")
T = TypeVar("T")


def _retrieve(task: asyncio.Future) -> None:
    """Mark a run's exception retrieved (it is still raised to every caller awaiting it)."""
    if not task.cancelled():
        task.exception()


class SingleFlight(Generic[T]):
    """Calls made while a run of ``run`` is in flight wait for that run and share its outcome;
    the first call after it ended starts the next one.

    A caller that is cancelled (its client left) stops waiting, never the run: the others still
    get its result, so ``run`` must end by itself (put its own timeout inside). An exception of
    the run is raised to every caller waiting then; a run that fails after every caller left
    is not reported as never retrieved (a cancelled ``asyncio.shield`` does not retrieve it:
    Python 3.11.7+ removes its callback from the run). :meth:`cancel` ends a run in flight for
    good (at shutdown): its waiters get ``CancelledError``.

        ping = SingleFlight(ping_redis)
        ok = await ping()
    """

    __slots__ = ("_run", "_task")

    def __init__(self, run: Callable[[], Awaitable[T]]) -> None:
        self._run = run
        self._task: asyncio.Future[T] | None = None

    async def __call__(self) -> T:
        task = self._task
        if task is None or task.done():
            task = self._task = asyncio.ensure_future(self._run())
            task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    @property
    def in_flight(self) -> bool:
        """Whether a run has started and not ended."""
        return self._task is not None and not self._task.done()

    def cancel(self) -> None:
        """Cancel the run in flight, if any."""
        if self._task is not None:
            self._task.cancel()


class KeyedSingleFlight(Generic[K, T]):
    """Calls with equal keys made while a run for that key is in flight wait for it and share its
    outcome (or its exception); a call with another key, or after the run ended, starts its own.

    Unlike :class:`SingleFlight`, a run is its callers' alone: when the last caller waiting for
    it leaves (cancelled: its client went away, or its own timeout passed), the run is cancelled
    too, so runs nobody waits for never pile up (each may hold a connection or a queued read). A
    caller that leaves while others wait does not end it for them. Memory: one entry per key in
    flight, freed as its run ends.

        read = KeyedSingleFlight()
        page = await read(("project", 6, cursor), lambda: store.snapshot(6, ...))
    """

    __slots__ = ("_runs",)

    def __init__(self) -> None:
        #: Per key in flight: [the run, how many callers wait for it].
        self._runs: dict[K, list] = {}

    def __len__(self) -> int:
        """How many keys have a run in flight."""
        return len(self._runs)

    async def __call__(self, key: K, run: Callable[[], Awaitable[T]]) -> T:
        """``run()``'s outcome, shared with every concurrent call with ``key``."""
        entry = self._runs.get(key)
        if entry is None or entry[0].done():  # (ended, its done-callback not run yet)
            task = asyncio.ensure_future(run())
            entry = self._runs[key] = [task, 0]
            task.add_done_callback(lambda _, key=key, entry=entry: self._ended(key, entry))
        entry[1] += 1
        try:
            return await asyncio.shield(entry[0])
        finally:
            entry[1] -= 1
            if not entry[1] and not entry[0].done():
                entry[0].cancel()  # nobody waits for it any more
                self._ended(key, entry)

    def _ended(self, key: K, entry: list) -> None:
        if self._runs.get(key) is entry:
            del self._runs[key]
