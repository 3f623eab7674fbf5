"""Pure reconnect and token policies of the consumer (no sockets, no clock of its own).

* :class:`Backoff`: exponential backoff with *full jitter* (the delay is uniform in
  ``[0, min(max, initial * factor**attempt)]``), so thousands of consumers cut off by the same
  gateway restart spread their reconnects instead of arriving in waves.
* :func:`close_action`: what a close code of ``docs/protocol.md`` asks the client to do.
* :func:`refresh_delay`: when to refresh a token in-band, from its own lifetime.
* :class:`FramePacer`: when to send frames again after the gateway's rate limit refused one.
"""

from __future__ import annotations

import base64
import enum
import json
import math
import random as _random
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from schemas.protocol import CloseCode
from schemas.tokens import MAX_EXP

__all__ = [
    "Backoff",
    "CloseAction",
    "FramePacer",
    "ReconnectPolicy",
    "Retry",
    "close_action",
    "decode_token_claims",
    "refresh_delay",
]

#: websockets reports a connection that ended without a close frame (reset, killed peer) as 1006.
ABNORMAL_CLOSURE = 1006
#: RFC 6455: a frame that breaks the protocol (sent by websockets, not in CloseCode).
PROTOCOL_ERROR = 1002
#: RFC 6455: a text frame that is not UTF-8 (sent by the gateway's websockets, not in CloseCode).
INVALID_DATA = 1007
#: The shortest wait, seconds, after a 4003 (token revoked) before the next attempt. A token's
#: ``iat`` is whole seconds and a revocation's default ``issued_before`` is the next whole second
#: after it was written, so a token minted within that second is refused too; the close comes
#: after the write, so a token minted a second after the close is issued after the revocation
#: (when the minting clock agrees with Redis'). Without it, a consumer cut early in a second
#: spent ``max_auth_failures`` on such tokens and stopped, its person still having access.
REVOKED_RETRY_FLOOR = 1.0


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How the consumer reconnects. It never gives up on a transport failure (forever).

    Attributes:
        initial: cap of the first backoff delay, seconds.
        max: largest cap, seconds.
        factor: growth of the cap per failed attempt.
        stable_after: a connection that stayed up this long resets the backoff (a gateway that
            flaps keeps the delays growing; one restart is retried within ``initial``).
        prompt_max: upper bound of the small random delay before a *prompt* reconnect (gateway
            draining with 1012, slow consumer 4008, expired token): spreads the herd.
        max_auth_failures: refused tokens (4001, or 4003: revoked) in a row, each fetched anew
            from the token function, before :class:`~consumer.AuthenticationFailed` is raised.
        resend_interval: seconds between subscribes sent again after the gateway's rate limit
            refused some (doubled each time one of them is refused again, up to ``max``; see
            :class:`FramePacer`). The first goes when the gateway's ``retry_after_ms`` says
            (``initial`` when a gateway does not say).
    """

    initial: float = 1.0
    max: float = 30.0
    factor: float = 2.0
    stable_after: float = 10.0
    prompt_max: float = 0.5
    max_auth_failures: int = 3
    resend_interval: float = 0.1

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.max) or self.factor < 1 or self.prompt_max < 0:
            raise ValueError("need 0 < initial <= max, factor >= 1, prompt_max >= 0")
        if not 0 < self.resend_interval <= self.max:
            raise ValueError("need 0 < resend_interval <= max")
        if self.max_auth_failures < 1:
            raise ValueError("max_auth_failures must be >= 1")


class Backoff:
    """Full-jitter exponential backoff: ``next()`` returns the delay before the next attempt and
    grows the cap; ``reset()`` starts over. Every delay lies in ``[0, policy.max]``."""

    def __init__(
        self, policy: ReconnectPolicy | None = None, random: Callable[[], float] | None = None
    ) -> None:
        self.policy = policy or ReconnectPolicy()
        # A generator of its own by default: the jitter leaves the application's global
        # ``random`` state alone (seeded simulations, property-based tests).
        self.random = random or _random.Random().random
        self.attempt = 0

    def cap(self, attempt: int) -> float:
        """The upper bound of the delay of attempt ``attempt`` (0-based)."""
        policy = self.policy
        # The exponent is capped so that factor**attempt never overflows on a process left
        # retrying for weeks.
        return min(policy.max, policy.initial * policy.factor ** min(attempt, 64))

    def next(self) -> float:
        delay = self.random() * self.cap(self.attempt)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class Retry(enum.Enum):
    """How soon to reconnect after a close."""

    PROMPT = "prompt"  # a small random delay (ReconnectPolicy.prompt_max)
    BACKOFF = "backoff"  # the next Backoff delay


@dataclass(frozen=True, slots=True)
class CloseAction:
    """What to do after the connection closed with a given code.

    ``renew_token``: ask the token function for a new token first. ``auth_failure``: counts
    towards ``max_auth_failures`` (and is fatal at once with a fixed token). ``client_bug``: the
    gateway says this client broke the protocol; logged as an error, then retried with backoff.
    ``min_delay``: the next attempt waits at least this long, seconds, whatever ``retry`` drew.
    """

    retry: Retry
    renew_token: bool = False
    auth_failure: bool = False
    client_bug: bool = False
    min_delay: float = 0.0


def close_action(code: int | None) -> CloseAction:
    """The reaction to close code ``code`` (``docs/protocol.md``, "Close codes"); ``None`` or
    1006 mean the connection ended without a close frame (killed gateway, reset, refused)."""
    if code in (CloseCode.GOING_AWAY, CloseCode.SERVICE_RESTART, CloseCode.SLOW_CONSUMER):
        # Draining pod, or we read too slowly: resume at once elsewhere; the cursor loses nothing.
        return CloseAction(Retry.PROMPT)
    if code == CloseCode.TOKEN_EXPIRED:
        # A new token fixes it; no reason to wait (a fixed token cannot be renewed: fatal).
        return CloseAction(Retry.PROMPT, renew_token=True, auth_failure=True)
    if code == CloseCode.AUTH_FAILED:
        # A fresh token may fix it, but a token source that keeps minting refused tokens must
        # not be hammered, nor retried forever: back off, and give up after max_auth_failures.
        return CloseAction(Retry.BACKOFF, renew_token=True, auth_failure=True)
    if code == CloseCode.TOKEN_REVOKED:
        # As a refused token; and after a revocation one minted now is taken if the subject
        # still has access, but only from the revocation's second on: wait that out first.
        return CloseAction(
            Retry.BACKOFF, renew_token=True, auth_failure=True, min_delay=REVOKED_RETRY_FLOOR
        )
    if code in (
        PROTOCOL_ERROR,
        INVALID_DATA,
        CloseCode.POLICY_VIOLATION,
        CloseCode.MESSAGE_TOO_BIG,
        CloseCode.TOO_MANY_ERRORS,
        CloseCode.TOO_MANY_REQUESTS,  # frames sent on while the rate limit refused them
    ):
        return CloseAction(Retry.BACKOFF, client_bug=True)
    # 1000 from the server, 1006 (killed, reset, refused), 1011 and anything unknown.
    return CloseAction(Retry.BACKOFF)


def decode_token_claims(token: str) -> dict | None:
    """The claims of a JWT, read without verifying it (only to learn ``iat``/``exp``), or None."""
    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError, TypeError, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None


def _claim_time(value: object) -> bool:
    """Whether a claim read unverified from a token is a time a token can carry: a number (not a
    bool) of 0..2**53-1 seconds. Others (an int of 400 digits, ``Infinity``) count as absent:
    their arithmetic overflowed, or scheduled a refresh that never comes."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= MAX_EXP


def _finite(value: int | float) -> bool:
    """Whether a number is a finite one a float holds (an int of 400 digits is not: the
    arithmetic on it raises OverflowError, as ``math.isfinite`` itself does)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def refresh_delay(
    *,
    iat: float | None,
    exp: float | None,
    obtained_at: float,
    now: float,
    expires_at: float | None = None,
) -> float | None:
    """Seconds from ``now`` until the token obtained at ``obtained_at`` (local monotonic clock)
    should be refreshed, or None when its lifetime is unknown.

    The token's own lifetime (``exp - iat``), counted from when this process got it, is used, so
    a local clock that is off by minutes does not matter. Refreshes a minute before expiry, or at
    3/4 of the lifetime for tokens shorter than 4 minutes. ``expires_at`` (the gateway's
    ``authenticated.expires_at`` converted by the caller to the clock of ``now``) is only a
    fallback for tokens without ``iat``. Claims that are no time a token can carry (below 0,
    past 2**53-1, not finite, not numbers) count as absent.
    """
    if _claim_time(iat) and _claim_time(exp) and exp > iat:
        # iat is truncated to the second: the token may have been minted up to 1 s after it.
        expiry = obtained_at + (exp - iat) - 1.0
    elif isinstance(expires_at, int | float) and _finite(expires_at):
        expiry = float(expires_at)
    else:
        return None
    lifetime = max(0.0, expiry - obtained_at)
    margin = min(60.0, lifetime / 4)
    return max(0.5, expiry - margin - now)


class FramePacer:
    """The connection-wide pacing of frames after the gateway's rate limit refused one
    (``docs/protocol.md``, "Rate limit"), as eventbus.js's ``FramePacer``; the caller's clock, in
    seconds. The gateway counts every frame of a connection in one bucket, so retries per
    project that each wait their own delay arrive together when many projects were refused
    together, and are refused again: each refusal a strike towards the close (4029). Instead the
    connection keeps one "not before" instant and one queue of held frames:

    * :meth:`refused`: nothing goes out before ``now`` plus the gateway's ``retry_after_ms``
      (when its bucket holds a token again; at most ``max_spacing``; without it, an old gateway:
      ``max(fallback_delay, spacing)``). If a held frame went out since the last refusal and a
      refusal still came, the spacing doubles (at most ``max_spacing``): the gateway's rate is
      lower than this pace.
    * :meth:`may_send_now`: a frame goes out at once only when nothing is held and no refusal
      asks to wait; else the caller holds it (:meth:`hold`) under a key (a project's subscribe, the
      token refresh): a key already held keeps its place and takes the new item (the frame is
      made when it goes out, from the state of then).
    * :meth:`next` gives the first held item once due; :meth:`resent`, after sending it, makes
      the next one wait ``spacing``. When the queue empties the spacing starts over.

    Bounded: one item per key.
    """

    __slots__ = (
        "fallback_delay",
        "initial_spacing",
        "max_spacing",
        "not_before",
        "queue",
        "resent_since_refusal",
        "spacing",
    )

    def __init__(
        self, spacing: float = 0.1, max_spacing: float = 30.0, fallback_delay: float = 1.0
    ) -> None:
        if spacing <= 0 or fallback_delay < 0:
            raise ValueError("need spacing > 0 and fallback_delay >= 0")
        self.initial_spacing = spacing
        self.max_spacing = max(spacing, max_spacing)
        self.fallback_delay = fallback_delay
        self.reset()

    def reset(self) -> None:
        """A new connection: a new bucket on the gateway, nothing held."""
        self.not_before = -math.inf
        self.spacing = self.initial_spacing
        self.queue: dict[Hashable, Any] = {}
        self.resent_since_refusal = False

    @property
    def held(self) -> int:
        return len(self.queue)

    def may_send_now(self, now: float) -> bool:
        return not self.queue and now >= self.not_before

    def refused(self, now: float, retry_after_ms: object) -> None:
        """A frame was refused at ``now``; ``retry_after_ms`` the error's (None: not given)."""
        if self.resent_since_refusal:
            self.spacing = min(self.spacing * 2, self.max_spacing)
        self.resent_since_refusal = False
        # An int of any size (JSON's): compared as it is, never made a float first (400 digits
        # raised OverflowError out of the frame's handling, stopping the consumer).
        if (type(retry_after_ms) is int and retry_after_ms >= 0) or (
            type(retry_after_ms) is float and math.isfinite(retry_after_ms) and retry_after_ms >= 0
        ):
            wait = min(retry_after_ms, self.max_spacing * 1000) / 1000  # type: ignore[operator]
        else:
            wait = max(self.fallback_delay, self.spacing)
        self.not_before = max(self.not_before, now + wait)

    def hold(self, key: Hashable, item: Any) -> None:
        self.queue[key] = item  # (a key already held keeps its place in a dict)

    def drop(self, key: Hashable) -> None:
        self.queue.pop(key, None)

    def due_at(self) -> float | None:
        """When the first held item is due (None: nothing held)."""
        return self.not_before if self.queue else None

    def next(self, now: float) -> Any:
        """The first held item when due at ``now`` (removed), else None."""
        if not self.queue or now < self.not_before:
            return None
        key = next(iter(self.queue))
        return self.queue.pop(key)

    def resent(self, now: float) -> None:
        """A held item went out at ``now``: the next one waits ``spacing``."""
        self.not_before = now + self.spacing
        self.resent_since_refusal = True
        if not self.queue:
            self.spacing = self.initial_spacing
