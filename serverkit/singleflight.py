"""One in-flight call shared by every concurrent caller: the shape of a health probe that
anyone may ask at any rate (``/readyz``), where a call per request would take a pooled Redis
connection each."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Calls made while a run of ``run`` is in flight wait for that run and share its outcome;
    the first call after it ended starts the next one.

    A caller that is cancelled (its client left) stops waiting, never the run: the others still
    get its result, so ``run`` must end by itself (put its own timeout inside). An exception of
    the run is raised to every caller waiting then (asyncio.shield retrieves it for callers that
    left, so none is reported as never retrieved). :meth:`cancel` ends a run in flight for good
    (at shutdown): its waiters get ``CancelledError``.

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
        return await asyncio.shield(task)

    @property
    def in_flight(self) -> bool:
        """Whether a run has started and not ended."""
        return self._task is not None and not self._task.done()

    def cancel(self) -> None:
        """Cancel the run in flight, if any."""
        if self._task is not None:
            self._task.cancel()
