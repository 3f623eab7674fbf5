"""The typed items a :class:`~consumer.Consumer` yields, its cursor, and its errors.

An iterator of :meth:`Consumer.events` yields :data:`Item` s: a :class:`Delivery` (one event, in
order, once) or a :class:`Resync` (the gateway cannot honour the cursor: reload state, later
deliveries continue after ``(resync.epoch, resync.seq)``). Nothing is ever skipped silently.
"""

from __future__ import annotations

from typing import NamedTuple, TypeAlias, Union

import msgspec

from schemas.events import ProjectEvent
from schemas.protocol import Epoch, ResyncReason, Sequence

__all__ = [
    "AuthenticationFailed",
    "ConsumerClosed",
    "ConsumerError",
    "Cursor",
    "Delivery",
    "Forbidden",
    "GatewayError",
    "Item",
    "Resync",
    "UndecodableEvent",
    "checked_cursor",
]


class Cursor(NamedTuple):
    """Position in a project's history: the epoch (history id) and the sequence number of the last
    event processed. Equal to the publisher's ``Cursor`` as a tuple."""

    epoch: str
    seq: int


_CURSOR = tuple[Epoch, Sequence]


def checked_cursor(value: object) -> Cursor:
    """``value`` (a ``Cursor`` or any ``(epoch, seq)`` pair) as a :class:`Cursor` if a gateway
    accepts it (the protocol's ``Epoch``: 1-64 characters of ``A-Za-z0-9_-``; ``Sequence``: an
    int, 0 to 2**53-1), else ValueError naming what is wrong.

    A cursor the gateway refuses is answered with an error that names no project (the subscribe
    did not decode), so a project subscribed with one would deliver nothing, and say nothing.
    """
    try:
        epoch, seq = msgspec.convert(value, _CURSOR, strict=True)
    except msgspec.ValidationError as exc:
        raise ValueError(f"not a valid cursor: {value!r:.200} ({exc})") from None
    return Cursor(epoch, seq)


class Delivery(msgspec.Struct, frozen=True, gc=False):
    """One event of a project: the ``seq``-th of history ``epoch``.

    ``event`` is the decoded schema Struct (``BlockerCreated``, ``BlockerResolved``, ...);
    ``raw`` is the frame exactly as the gateway sent it (the event's JSON plus ``"seq"``).
    """

    project_id: int
    epoch: str
    seq: int
    event: ProjectEvent
    raw: bytes

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.epoch, self.seq)


class Resync(msgspec.Struct, frozen=True, gc=False):
    """The gateway could not honour the project's cursor (``reason``): events were lost to this
    consumer. Reload whatever state you derive from the events (from your application's API or
    database); deliveries continue with ``seq + 1`` of ``epoch``."""

    project_id: int
    reason: ResyncReason
    epoch: str
    seq: int

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.epoch, self.seq)


Item: TypeAlias = Union[Delivery, Resync]  # noqa: UP007


class ConsumerError(Exception):
    """Base of the errors a consumer raises from its iterators."""


class ConsumerClosed(ConsumerError):
    """The consumer was closed (or its connection task failed) while an iterator was waiting."""


class AuthenticationFailed(ConsumerError):
    """The gateway refused the token (close code 4001/4002) and a new one cannot fix it: the token
    is a fixed string, or the token function kept returning refused tokens."""

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


class GatewayError(ConsumerError):
    """The gateway answered a subscribe with an error for a project (``code`` is the protocol's
    :class:`~schemas.protocol.ErrorCode`); the project is no longer followed."""

    def __init__(self, code: str, message: str, project_id: int | None) -> None:
        super().__init__(f"{code}: {message}" + (f" (project {project_id})" if project_id else ""))
        self.code = code
        self.message = message
        self.project_id = project_id


class Forbidden(GatewayError):
    """The token does not name the project: nothing of it will be delivered."""


class UndecodableEvent(ConsumerError):
    """An event frame that does not decode into a known event type (e.g. a newer publisher added
    a type this consumer's ``schemas`` does not know). Raised from ``__anext__`` in its place in
    the order; the iterator stays usable and the next call continues after it (its cursor counts
    as processed then)."""

    def __init__(self, project_id: int, epoch: str, seq: int, raw: bytes, reason: str) -> None:
        super().__init__(f"project {project_id} seq {seq}: cannot decode event: {reason}")
        self.project_id = project_id
        self.epoch = epoch
        self.seq = seq
        self.raw = raw
        self.reason = reason

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.epoch, self.seq)
