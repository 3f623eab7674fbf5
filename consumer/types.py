"""The typed items a :class:`~consumer.Consumer` yields, its cursor, and its errors.

An iterator of :meth:`Consumer.events` yields :data:`Item` s: a :class:`Delivery` (one event, in
order, once) or a :class:`Resync` (the gateway cannot honour the cursor: reload state, later
deliveries continue after ``(resync.epoch, resync.seq)``). Nothing is ever skipped silently.
"""

from __future__ import annotations

from typing import NamedTuple, TypeAlias, Union

import msgspec

from schemas.events import ProjectEvent
from schemas.protocol import Epoch, ResyncReason, Sequence, Tag
from schemas.tags import event_tag

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
    "tag_of",
]


class _Position(NamedTuple):
    epoch: str
    seq: int


class Cursor(_Position):
    """Position in a project's history: the epoch (history id) and the sequence number of the last
    event processed, and the ``tag`` of that event when known (``docs/consumer.md``, "Cursor
    tags"): the gateway then notices when its history holds another event at ``seq`` (a Redis
    failover lost the event and gave its number to a new one) and answers
    ``Resync(history_lost)`` instead of resuming after an event it does not have.

    It is the pair ``(epoch, seq)`` as a tuple: ``epoch, seq = cursor`` and comparisons (equal
    to the publisher's ``Cursor``) see the position only; ``cursor.tag`` is beside it.
    ``Cursor(epoch, seq)`` is a cursor without a tag (unchecked, as before tags). The cursor of
    an event keeps the event's frame and hashes it only when ``tag`` is read.
    """

    # No __slots__: the tag (or the frame to hash) is kept in the instance's __dict__. Class
    # defaults cover instances made by tuple methods (``_replace``, ``_make``).
    _tag: str | None = None
    _frame: bytes | None = None

    def __new__(
        cls, epoch: str, seq: int, tag: str | None = None, *, frame: bytes | None = None
    ) -> Cursor:
        self = super().__new__(cls, epoch, seq)
        if tag is not None:
            self._tag = tag
        elif frame is not None:
            self._frame = frame
        return self

    @property
    def tag(self) -> str | None:
        """The tag of the event at ``seq`` (16 hex digits), or None when not known."""
        tag = self._tag
        if tag is None and self._frame is not None:
            tag = self._tag = event_tag(self._frame)
            self._frame = None
        return tag

    def untagged(self) -> Cursor:
        """The same position without a tag."""
        return Cursor(self.epoch, self.seq)

    def __repr__(self) -> str:
        tag = self.tag
        extra = "" if tag is None else f", tag={tag!r}"
        return f"Cursor(epoch={self.epoch!r}, seq={self.seq!r}{extra})"

    def __reduce__(self) -> tuple[object, ...]:
        return (Cursor, (self.epoch, self.seq, self.tag))


_CURSOR = tuple[Epoch, Sequence]
_TAG = Tag | None


def tag_of(cursor: object) -> str | None:
    """The tag a cursor given by the caller carries: ``Cursor.tag``, or the third item of an
    ``(epoch, seq, tag)`` tuple or list; None for a pair."""
    if isinstance(cursor, Cursor):
        return cursor.tag
    if isinstance(cursor, (tuple, list)) and len(cursor) == 3:
        return cursor[2]  # type: ignore[no-any-return]
    return None


def checked_cursor(value: object) -> Cursor:
    """``value`` (a ``Cursor``, any ``(epoch, seq)`` pair, or an ``(epoch, seq, tag)`` triple
    whose tag may be None) as a :class:`Cursor` if a gateway accepts it (the protocol's
    ``Epoch``: 1-64 characters of ``A-Za-z0-9_-``; ``Sequence``: an int, 0 to 2**53-1; a tag: 16
    lowercase hex digits), else ValueError naming what is wrong.

    A cursor the gateway refuses is answered with an error that names no project (the subscribe
    did not decode), so a project subscribed with one would deliver nothing, and say nothing.
    """
    if isinstance(value, Cursor):
        pair: object = tuple(value)
        frame = value._frame  # an event's own tag, hashed when read: valid by construction
        tag: object = value._tag
    elif isinstance(value, (tuple, list)) and len(value) == 3:
        pair, tag, frame = value[:2], value[2], None
    else:
        pair, tag, frame = value, None, None
    try:
        epoch, seq = msgspec.convert(pair, _CURSOR, strict=True)
        tag = msgspec.convert(tag, _TAG, strict=True)
    except msgspec.ValidationError as exc:
        raise ValueError(f"not a valid cursor: {value!r:.200} ({exc})") from None
    return Cursor(epoch, seq, tag, frame=frame)


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
        """The event's cursor; its tag is the frame's (hashed when read)."""
        return Cursor(self.epoch, self.seq, frame=self.raw)


class Resync(msgspec.Struct, frozen=True, gc=False):
    """The gateway could not honour the project's cursor (``reason``): events were lost to this
    consumer. Reload whatever state you derive from the events (from your application's API or
    database); deliveries continue with ``seq + 1`` of ``epoch``. ``tag`` is the tag of the event
    at ``seq`` when the gateway said it (None when it did not, or ``seq`` is 0)."""

    project_id: int
    reason: ResyncReason
    epoch: str
    seq: int
    tag: str | None = None

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.epoch, self.seq, self.tag)


Item: TypeAlias = Union[Delivery, Resync]  # noqa: UP007


class ConsumerError(Exception):
    """Base of the errors a consumer raises from its iterators."""


class ConsumerClosed(ConsumerError):
    """The consumer was closed (or its connection task failed) while an iterator was waiting."""


class AuthenticationFailed(ConsumerError):
    """The gateway refused the token (close code 4001, 4002, or 4003 when the person's tokens
    were revoked: ``close_code`` says which) and a new one cannot fix it: the token is a fixed
    string, or the token function kept returning refused tokens."""

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
        return Cursor(self.epoch, self.seq, frame=self.raw)
