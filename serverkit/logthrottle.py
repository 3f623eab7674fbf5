"""Rate limit for log lines that others can cause (clients, an outage): a few lines per kind and
interval, each saying how many of its kind were dropped before it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

__all__ = ["LogThrottle"]


class LogThrottle:
    """Rate limit for log lines caused by clients (one per bad request would let anyone flood the
    logs): at most ``burst`` lines per key in each ``interval`` seconds.

    Keys name the kind of line (``"auth_failed"``), never client data, so the table stays small;
    it is emptied at the start of each interval anyway. The metric counters count every case.
    An interval starts with the first line after the previous one ended (the first with the first
    line): with a ``burst`` of 1, a line is logged when ``interval`` seconds have passed since
    the last one logged.

        throttle.log("auth_failed", log.info, "authentication failed", reason=reason)
    """

    __slots__ = ("_clock", "_counts", "_suppressed", "_window_start", "burst", "interval")

    def __init__(
        self, interval: float = 60.0, burst: int = 5, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.burst = burst
        self._clock = clock
        self._window_start = -math.inf
        self._counts: dict[str, int] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None when this line must be dropped; else how many lines of ``key`` were dropped since
        the last one logged (to be logged with it)."""
        now = self._clock()
        if now - self._window_start >= self.interval:
            self._window_start = now
            self._counts.clear()
        count = self._counts.get(key, 0) + 1
        self._counts[key] = count
        if count > self.burst:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        return self._suppressed.pop(key, 0)

    def log(self, key: str, emit: Callable[..., Any], event: str, /, **fields: Any) -> None:
        """Log one line of ``key`` unless :meth:`allow` drops it: ``emit(event, **fields)``
        (``emit`` is the logger's method of the level wanted, ``log.warning``), with
        ``suppressed=n`` added when ``n`` lines of ``key`` were dropped since the last one logged
        (no such field when none were). Returns nothing: the caller's other work (counters,
        replies) does not depend on whether the line was logged. (``key`` is positional only: a
        line may have a field of that name.)"""
        suppressed = self.allow(key)
        if suppressed is None:
            return
        if suppressed:
            fields["suppressed"] = suppressed
        emit(event, **fields)
