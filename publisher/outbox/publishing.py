"""Publishing a run of outbox rows in order, each under its own idempotency key.

The relay needs both keys (a republished row must be a no-op) and batches (one round trip per
row caps a relay at a few thousand events/s), and it must stop at the first row Redis refuses.
That is the publisher's own ``publish_many(events, idempotency_keys=keys, in_order=True)``: one
keyed script call per row, up to :data:`CHUNK` of them in one ``MULTI``/``EXEC`` round trip, and
no round trip after one with a refused call (see docs/publisher.md). :class:`KeyedPublisher`
sends the rows :data:`CHUNK` at a time through it, asking the relay between two round trips
whether to go on, and reads ``PublishManyError.stopped_at``: the rows before it were published,
the error is why it was not.

Why that keeps the stream exact:

* Redis runs the calls of one ``EXEC`` in order with nothing in between, so row *k+1* of a project
  runs after row *k* is in the stream, as with one call per round trip.
* One ``EXEC`` per round trip, and nothing sent after one with a refused call: an error at row
  *k* (a damaged key, ``OOM``: refused at the script's first write) is followed, in the same
  ``EXEC``, only by calls of its project that meet the same state and fail the same way; the
  relay holds that project and publishes the rows after *k* of the others again, under the same
  keys (those that ran in that ``EXEC`` return their first cursors).
* A reply lost with the connection: the publisher sends the same transaction again under the
  same keys, which returns the first cursors for the calls that ran.

Each cursor of that call carries the tag of the frame its call stored (``Cursor.tag``: the bytes
the call sent, ``"seq"`` spliced in), which the relay records. That is the seam for a subclass
of ``Publisher`` that changes what is stored (a redaction): it overrides ``publish_many`` (and
``publish``) and passes what it stores to ``super()``, whose cursors then carry the tags of the
bytes Redis holds; a ``publish_many`` replaced on the object (instrumentation) is called the
same way. Cursors made otherwise carry no tag, and their rows get none: no tag names bytes
Redis does not hold.

Whatever publishes, the relay marks a row only with a cursor it was given for exactly that row:
one cursor per event, in their order, is the contract of ``publish_many`` (and one cursor that of
``publish``). An answer that breaks it (a cursor fewer: an event filtered out or deduplicated; one
more: an event of the publisher's own; None, a non-cursor, a ``PublishManyError`` whose
``cursors`` are not one per event) cannot be paired with the rows: the round trip fails with
:class:`PublisherContractError` naming the publisher's class, and none of its rows is marked.
Before, the cursors were paired with the rows in order: a row never stored could be marked with
the cursor and tag of another row's event (lost without a word), and a None recorded as a cursor
made every later mark fail (the relay published nothing more).

Anything else with ``publish(event, idempotency_key=)`` (a wrapper of your own), and a
``Publisher`` whose ``publish`` alone is overridden or replaced (``publish_many`` would go
around it), gets one ``publish`` per row, stopping at the first error, without tags; a cluster
``Publisher`` (whose in-order mode makes one round trip per row anyway) one in-order call of
one row per round trip, the same script call ``publish`` makes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis.cluster
import structlog

from publisher.client import Publisher
from publisher.core import TRANSACTION_SIZE, Cursor, PublishError, PublishManyError
from schemas.events import ProjectEvent

__all__ = ["CHUNK", "KeyedPublisher", "PublisherContractError", "PublisherFailed"]

#: Rows per MULTI/EXEC round trip: the publisher's in-order transaction size (about 1-2 ms of
#: Redis time, which other clients wait for).
CHUNK = TRANSACTION_SIZE


def log() -> structlog.typing.FilteringBoundLogger:
    """The logger, looked up per message (rare ones): a logger cached at first use would keep
    the structlog configuration of that moment (tests capture logs by reconfiguring)."""
    return structlog.get_logger("publisher.outbox")


class _PublisherFault(RuntimeError):
    """What :class:`PublisherContractError` and :class:`PublisherFailed` both say: the
    publisher's class (``publisher_class``, ``module.QualName``), the method that answered
    (``method``) and how many rows it was given (``rows``)."""

    def __init__(self, publisher: Any, method: str, rows: int, message: str) -> None:
        kind = type(publisher)
        self.publisher_class = f"{kind.__module__}.{kind.__qualname__}"
        self.method = method
        self.rows = rows
        super().__init__(f"{self.publisher_class}.{method} {message}")


class PublisherContractError(_PublisherFault):
    """The relay's publisher answered a round trip with something that does not give each row
    its own cursor: ``publish_many`` returned more or fewer cursors than events, or anything but
    cursors (None, a None among them, ``(epoch, seq)`` tuples), or raised a ``PublishManyError``
    whose ``cursors`` are not one per event or whose ``stopped_at`` names no event given; or a
    ``publish`` returned anything but a cursor.

    A bug of that publisher (a subclass's or wrapper's): the relay cannot tell which row Redis
    holds where, so it marks none of the round trip's rows (the rows of earlier round trips,
    answered properly, are marked), raises this out of :meth:`OutboxRelay.run_once`, and in its
    loop reports it (``outbox_relay_error``, error level, ``source="publisher"``) and retries
    with backoff: the rows go out, under their idempotency keys, once the publisher is fixed.

    ``publisher_class`` is the publisher's class (``module.QualName``), ``method`` the method
    that answered (``"publish_many"`` or ``"publish"``), ``rows`` how many rows it was given."""

    def __init__(self, publisher: Any, method: str, problem: str, rows: int) -> None:
        super().__init__(
            publisher,
            method,
            rows,
            f"{problem}: the relay marks a row only with the "
            f"cursor Redis holds for that row (one per event, in their order), so none of these "
            f"{rows} rows is marked; they are published again under their idempotency keys once "
            'the publisher is fixed (docs/outbox.md, "Publishers of your own")',
        )


class PublisherFailed(_PublisherFault):
    """The relay's publisher raised an exception of its own from ``publish_many`` or
    ``publish``: not a Redis error (``PublishError``, ``PublisherUnavailable``, a
    ``redis.RedisError``), but e.g. a ValueError from a subclass's or wrapper's redaction. The
    original is ``error`` (and ``__cause__``).

    As with :class:`PublisherContractError`, the round trip's rows are not marked (rows
    confirmed by earlier cursors are), and the relay's loop reports it as the publisher's error
    (``outbox_relay_error``, error level, ``source="publisher"``) and retries with backoff,
    without resetting its database session. Events that Redis stored before the publisher
    raised (a wrapper raising after ``super().publish_many`` returned) are sent again under
    their idempotency keys: Redis answers with their first cursors, nothing is stored twice.

    ``publisher_class``, ``method`` and ``rows`` as for :class:`PublisherContractError`."""

    def __init__(self, publisher: Any, method: str, error: BaseException, rows: int) -> None:
        super().__init__(
            publisher,
            method,
            rows,
            f"raised {error!r}: a failure of the publisher, not of "
            f"Redis or the database; none of these {rows} rows is marked, they are published "
            "again under their idempotency keys (as no-ops where Redis stored them) on the "
            'next try (docs/outbox.md, "Publishers of your own")',
        )
        self.error = error
        self.__cause__ = error


#: A row published: its cursor, and the tag (schemas.tags) of the frame Redis stored there, or
#: None when unknown.
Tagged = tuple[Cursor, str | None]


class KeyedPublisher:
    """``publish(items)``: publish ``(event, idempotency_key)`` pairs in order; returns the
    cursors, each with its tag, of the prefix that was published and the error that stopped it
    (or None)."""

    def __init__(self, publisher: Publisher, cancelled: Callable[[], bool] | None = None) -> None:
        self.publisher = publisher
        #: Asked before each round trip after the first: True ends :meth:`publish` there (what
        #: was published is returned, without an error). The relay's: stop() gave up waiting.
        self.cancelled = cancelled
        #: A ``Publisher`` (or a subclass): rows go through ``publish_many(..., in_order=True)``,
        #: whose cursors carry their tags; anything else gets ``publish`` per row, no tags. So
        #: does a ``Publisher`` whose ``publish`` alone is its own (overridden, or replaced on
        #: the object: a redaction in the method the typed helpers call): the package's
        #: ``publish_many`` does not call ``publish``, and would store the unredacted event.
        self.in_order = isinstance(publisher, Publisher) and not _publish_overridden_alone(
            publisher
        )
        #: Rows go :data:`CHUNK` at a time through the in-order path; else one row per round
        #: trip. A cluster publisher's in-order mode makes a round trip per row too, and one row
        #: at a time lets ``cancelled`` end the rows between any two.
        self.batched = self.in_order and not isinstance(
            publisher.client, redis.cluster.RedisCluster
        )

    def publish(
        self, items: Sequence[tuple[ProjectEvent, str]]
    ) -> tuple[list[Tagged], Exception | None]:
        cancelled = self.cancelled
        published: list[Tagged] = []
        step = CHUNK if self.batched else 1
        for start in range(0, len(items), step):
            if start and cancelled is not None and cancelled():
                return published, None
            chunk = items[start : start + step]
            method = "publish_many" if self.in_order else "publish"
            try:
                if self.in_order:
                    answer = self.publisher.publish_many(
                        [event for event, _ in chunk],
                        idempotency_keys=[key for _, key in chunk],
                        in_order=True,
                    )
                    # (inside the try: a generator's own PublishManyError is met here)
                    cursors = _cursors_of(self.publisher, answer, len(chunk))
                else:
                    event, key = chunk[0]
                    answer = self.publisher.publish(event, idempotency_key=key)
                    if not _is_cursor(answer):
                        raise PublisherContractError(
                            self.publisher, method, f"returned {_shown(answer)}, not a cursor", 1
                        )
                    cursors = [answer]
                published.extend(_tagged(cursors))
            except PublishManyError as error:
                stopped = error.stopped_at
                if stopped is None:  # (in_order always says where it stopped)
                    return published, error
                problem = _misshapen(error, len(chunk))
                if problem is not None:
                    return published, PublisherContractError(
                        self.publisher, method, problem, len(chunk)
                    )
                published.extend(_tagged(error.cursors[:stopped]))  # (all published)
                project_id = chunk[stopped][0].project_id
                _report_overtaking(chunk, error, stopped)
                return published, error.errors.get(project_id, error)
            except (PublishError, PublisherContractError, redis.RedisError) as exc:
                return published, exc  # (Redis's answer, or a contract already named)
            except Exception as exc:
                # Anything else is the publisher's own failure (a bug in a subclass or wrapper:
                # a ValueError from a redaction), which the relay must not take for the
                # database's. Raised after Redis stored some of these events or not, none of
                # them was confirmed: they go again under their keys, as no-ops where stored.
                return published, PublisherFailed(self.publisher, method, exc, len(chunk))
        return published, None


def _publish_overridden_alone(publisher: Publisher) -> bool:
    """Whether ``publisher``'s ``publish`` is not the package's own (a subclass's override, or
    one replaced on the object) while its ``publish_many`` is: sending rows through that
    ``publish_many`` would go around whatever its ``publish`` does to the event (a redaction),
    and store what it was written to keep out of Redis. Not a guard against subclasses: it only
    picks the public method that publishes as the publisher's owner made it publish."""
    own = getattr(publisher, "__dict__", {})
    publish_is_own = "publish" not in own and type(publisher).publish is Publisher.publish
    many_is_own = (
        "publish_many" not in own and type(publisher).publish_many is Publisher.publish_many
    )
    return many_is_own and not publish_is_own


def _is_cursor(value: object) -> bool:
    """Whether ``value`` can be recorded as a row's cursor: a ``Cursor`` (or anything with a
    string ``epoch`` and an integer ``seq``, as a wrapper's own cursor type may be). None, a
    plain tuple or a string is not: recorded, its row's mark would fail, and so would every
    mark after it (the relay retries the marks it owes before publishing anything else)."""
    epoch, seq = getattr(value, "epoch", None), getattr(value, "seq", None)
    return isinstance(epoch, str) and isinstance(seq, int) and not isinstance(seq, bool)


def _shown(value: object) -> str:
    """``value`` for an error message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _cursors_of(publisher: Any, answer: object, count: int) -> list[Cursor]:
    """``publish_many``'s answer for ``count`` events, as a list of exactly ``count`` cursors (a
    list, a tuple or a generator of them), else :class:`PublisherContractError`."""
    if not isinstance(answer, Iterable) or isinstance(answer, str | bytes):
        raise PublisherContractError(
            publisher, "publish_many", f"returned {_shown(answer)}, not one cursor per event", count
        )
    cursors = list(answer)
    if len(cursors) != count:
        raise PublisherContractError(
            publisher, "publish_many", f"returned {len(cursors)} cursors for {count} events", count
        )
    for index, cursor in enumerate(cursors):
        if not _is_cursor(cursor):
            problem = f"returned {_shown(cursor)} as the cursor of event {index}, not a cursor"
            raise PublisherContractError(publisher, "publish_many", problem, count)
    return cursors


def _misshapen(error: PublishManyError, count: int) -> str | None:
    """What makes an in-order ``PublishManyError`` for ``count`` events unusable (None if
    nothing): ``cursors`` not one per event, ``stopped_at`` naming no event given, or a
    non-cursor before it (every event before ``stopped_at`` was published)."""
    name = type(error).__name__
    cursors, stopped = error.cursors, error.stopped_at
    if not isinstance(cursors, Sequence) or len(cursors) != count:
        shown = f"{len(cursors)} cursors" if isinstance(cursors, Sequence) else _shown(cursors)
        return f"raised {name} with {shown} for {count} events"
    if not isinstance(stopped, int) or isinstance(stopped, bool) or not 0 <= stopped < count:
        return f"raised {name} with stopped_at={stopped!r} for {count} events"
    for index in range(stopped):
        if not _is_cursor(cursors[index]):
            return (
                f"raised {name} with {_shown(cursors[index])} as the cursor of event {index}, "
                f"before stopped_at={stopped} (every event before it was published)"
            )
    return None


def _tagged(cursors: Sequence[Cursor | None]) -> list[Tagged]:
    """Each cursor with the tag of the frame Redis holds there: the one it carries
    (``Cursor.tag``, given by the call that sent those bytes). A publish answered from its
    idempotency record carries one only when Redis holds exactly the bytes it sent (the publish
    script compares them: a retry of a call whose reply was lost, a row republished unchanged);
    otherwise (a row edited since a relay published it and died before marking it) none, that
    no snapshot names an event by a tag Redis does not have."""
    tagged = []
    for cursor in cursors:
        tag = getattr(cursor, "tag", None)
        tagged.append((cursor, tag if isinstance(tag, str) else None))  # (a wrapper's own type)
    return tagged  # type: ignore[return-value]


def _report_overtaking(
    chunk: Sequence[tuple[ProjectEvent, str]], error: PublishManyError, failed: int
) -> None:
    """Say so, loudly, if a later row of the failed row's project was published in the same
    EXEC.

    Errors that depend on the project's state (a damaged key, OOM) fail every later call of the
    project in the same EXEC too; only an error specific to one row (an IdempotencyConflict: the
    row's event was changed after it was first published) can let a later row of the project
    through ahead of it. That cannot be undone, so it is never silent either."""
    project_id = chunk[failed][0].project_id
    overtaken = [
        index
        for index in range(failed + 1, len(chunk))
        if chunk[index][0].project_id == project_id and error.cursors[index] is not None
    ]
    if overtaken:
        log().error(
            "outbox_event_overtaken",
            project_id=project_id,
            failed_call=failed,
            later_calls_published=len(overtaken),
            error=repr(error.errors.get(project_id))[:300],
        )
