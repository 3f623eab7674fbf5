"""The per-connection rate limit on client frames: a token bucket (pure; tested without sockets).

Every frame an authenticated connection sends (``subscribe``, ``unsubscribe``, ``activity``,
``presence_get``, a token refresh ``auth``, ``ping``, a malformed one; not the first ``auth``,
not WebSocket pings and pongs, not an ``unsubscribe`` that ends a subscription, which its
``subscribe`` paid for: the caller skips those) takes a token. The bucket holds ``burst``
tokens and refills at ``rate`` per second: a client may send ``burst`` frames at once (a
reconnect subscribing to every project it follows), and ``rate`` per second sustained. A frame
that finds no token is *refused* (:data:`REFUSED`): the gateway does not execute it and answers
``error`` ``rate_limited``; the connection stays usable and the client retries later.

Refused frames are counted too, in a second bucket of the same size that drains at the same
rate: ``strikes``. A client that keeps sending while refused (more than ``burst`` refusals net of
what the rate forgives: a flood past an empty bucket, or a steady stream at more than twice
``rate``) gets :data:`CLOSE` and is disconnected; one that slows down is never closed, however
often it was refused before.

The state is three floats kept by the caller (the session's ``__slots__``; :class:`Bucket` for
tests): tokens, strikes and the time of the last refill. A new connection's stamp is
:data:`NEVER`, which makes its first frame find the bucket full; its three values are shared
constants, so nothing is allocated per connection until it sends. The clock is the caller's
(monotonic seconds); a clock that goes backwards refills nothing and moves nothing back.
"""

from __future__ import annotations

import math
from typing import Protocol

__all__ = [
    "ALLOWED",
    "CLOSE",
    "NEVER",
    "REFUSED",
    "Bucket",
    "FrameRateLimit",
    "frame_rate_limit",
]

#: :meth:`FrameRateLimit.take`'s verdicts: execute the frame; refuse it; refuse it and close.
ALLOWED = 0
REFUSED = 1
CLOSE = 2

#: The stamp of a bucket that never took a frame: the first one finds it full.
NEVER = float("-inf")


class BucketState(Protocol):
    rate_tokens: float
    rate_strikes: float
    rate_stamp: float


class Bucket:
    """A bucket's state on its own (the gateway keeps it in each session's slots instead)."""

    __slots__ = ("rate_stamp", "rate_strikes", "rate_tokens")

    def __init__(self) -> None:
        self.rate_tokens = 0.0
        self.rate_strikes = 0.0
        self.rate_stamp = NEVER


class FrameRateLimit:
    """``rate`` frames per second, bursts of ``burst``: one per gateway, shared by every
    connection (each keeps its own state; see the module)."""

    __slots__ = ("burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = float(burst)

    def take(self, bucket: BucketState, now: float) -> int:
        """One frame at ``now``: :data:`ALLOWED` (a token taken), :data:`REFUSED` (no token; a
        strike), or :data:`CLOSE` (no token, and more than ``burst`` strikes)."""
        tokens = bucket.rate_tokens
        strikes = bucket.rate_strikes
        elapsed = now - bucket.rate_stamp
        if elapsed > 0.0:
            bucket.rate_stamp = now
            refill = elapsed * self.rate
            tokens += refill
            if tokens > self.burst:
                tokens = self.burst
            if strikes:
                strikes = strikes - refill if strikes > refill else 0.0
                bucket.rate_strikes = strikes
        if tokens >= 1.0:
            bucket.rate_tokens = tokens - 1.0
            return ALLOWED
        bucket.rate_tokens = tokens
        strikes += 1.0
        bucket.rate_strikes = strikes
        return CLOSE if strikes > self.burst else REFUSED

    def retry_after(self, bucket: BucketState) -> float:
        """Seconds until ``bucket`` holds a token again (as of its last refill)."""
        return max(0.0, (1.0 - bucket.rate_tokens) / self.rate)

    def retry_after_ms(self, bucket: BucketState) -> int:
        """:meth:`retry_after` in whole milliseconds, rounded up, for the ``rate_limited`` error's
        ``retry_after_ms``: a frame sent again that many milliseconds after the refusal finds a
        token (if nothing else of the connection took it first). At least 1 after a refusal
        (the bucket then holds less than a token), so a client never reads "now"."""
        # Rounded up, less a nanosecond of float noise (0.02 of a token at 1/s is 20.000000000000018
        # ms): a frame at the instant named finds the token within that nanosecond.
        if bucket.rate_tokens >= 1.0:
            return 0
        return max(1, math.ceil((1.0 - bucket.rate_tokens) * 1000.0 / self.rate - 1e-6))

    def describe(self) -> str:
        """The limit in words, for the ``rate_limited`` error's message."""
        return f"at most {self.rate:g} frames per second, bursts of {self.burst:g}"


def frame_rate_limit(rate: float, burst: int) -> FrameRateLimit | None:
    """The limit of ``--client-rate`` / ``--client-burst``; None when ``rate`` is 0 (off)."""
    return FrameRateLimit(rate, burst) if rate > 0 else None
