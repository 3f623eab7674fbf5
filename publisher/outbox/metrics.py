"""Pure pieces of the relay: its metrics and its rate limit (no I/O, injectable clocks)."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["LAG_BUCKETS_MS", "LagHistogram", "RateLimiter", "RelayMetrics"]

#: Upper bounds (ms) of the relay-lag histogram's buckets; one more bucket holds everything above.
LAG_BUCKETS_MS: tuple[float, ...] = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 60_000, 600_000, 3_600_000,
)  # fmt: skip


class LagHistogram:
    """Cumulative histogram of commit-to-publish times, in milliseconds (Prometheus-style
    buckets: ``counts[i]`` is the number of samples <= ``LAG_BUCKETS_MS[i]``, non-cumulative
    here, the last count is above every bound)."""

    def __init__(self, bounds: tuple[float, ...] = LAG_BUCKETS_MS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum_ms = 0.0
        self.max_ms = 0.0

    def observe(self, lag_ms: float) -> None:
        lag_ms = max(lag_ms, 0.0)  # clocks of the database and the relay may differ slightly
        self.counts[bisect.bisect_left(self.bounds, lag_ms)] += 1
        self.count += 1
        self.sum_ms += lag_ms
        self.max_ms = max(self.max_ms, lag_ms)

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the ``q`` quantile (``max_ms`` for the last
        bucket); None without samples. Coarse by design: good enough for "p99 under 50 ms"."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank and count:
                return self.bounds[index] if index < len(self.bounds) else self.max_ms
        return self.max_ms


class RelayMetrics:
    """What a relay exposes: a plain object, read it from any thread (``as_dict()``).

    - ``published``: events this relay published (a republish the idempotency key turned into a
      no-op counts too: the relay cannot tell);
    - ``lag``: :class:`LagHistogram` of the time from the row's insert (database clock,
      ``created_at``) to the end of its publish (relay clock);
    - ``backlog``: unpublished rows in the table at the last count (every
      ``backlog_interval``), or None before the first and on a standby (the leader counts);
    - ``oldest_pending_s``: age of the oldest unpublished row seen in the last batch;
    - ``unavailable``: batches that stopped because Redis was unreachable; ``errors``: other
      failures (database, Redis errors); ``invalid_rows``: rows that no longer validate.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.published = 0
        self.lag = LagHistogram()
        self.backlog: int | None = None
        self.oldest_pending_s: float | None = None
        self.unavailable = 0
        self.errors = 0
        self.invalid_rows = 0
        self.leader = False

    def record_published(self, lags_ms: list[float]) -> None:
        with self._lock:
            self.published += len(lags_ms)
            for lag in lags_ms:
                self.lag.observe(lag)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "published": self.published,
                "backlog": self.backlog,
                "oldest_pending_s": self.oldest_pending_s,
                "lag_ms_p50": self.lag.quantile(0.5),
                "lag_ms_p99": self.lag.quantile(0.99),
                "lag_ms_max": round(self.lag.max_ms, 3) if self.lag.count else None,
                "unavailable": self.unavailable,
                "errors": self.errors,
                "invalid_rows": self.invalid_rows,
                "leader": self.leader,
            }


class RateLimiter:
    """Token bucket: at most ``rate`` events per second on average, bursts of up to ``burst``.

    ``delay(n)`` takes ``n`` tokens and says how long to sleep before using them (0 when they
    were there). ``rate`` of 0 or None means unlimited.
    """

    def __init__(
        self,
        rate: float | None,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate or 0.0
        self.burst = burst if burst is not None else max(self.rate / 10, 1.0)
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()

    def delay(self, n: int) -> float:
        if not self.rate:
            return 0.0
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
