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

Anything else with ``publish(event, idempotency_key=)`` (a wrapper of your own), and a
``Publisher`` whose ``publish`` alone is overridden or replaced (``publish_many`` would go
around it), gets one ``publish`` per row, stopping at the first error, without tags; a cluster
``Publisher`` (whose in-order mode makes one round trip per row anyway) one in-order call of
one row per round trip, the same script call ``publish`` makes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import redis.cluster
import structlog

from publisher.client import Publisher
from publisher.core import TRANSACTION_SIZE, Cursor, PublishManyError
from schemas.events import ProjectEvent

__all__ = ["CHUNK", "KeyedPublisher"]

#: Rows per MULTI/EXEC round trip: the publisher's in-order transaction size (about 1-2 ms of
#: Redis time, which other clients wait for).
CHUNK = TRANSACTION_SIZE


def log() -> structlog.typing.FilteringBoundLogger:
    """The logger, looked up per message (rare ones): a logger cached at first use would keep
    the structlog configuration of that moment (tests capture logs by reconfiguring)."""
    return structlog.get_logger("publisher.outbox")


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
            try:
                if self.in_order:
                    cursors = self.publisher.publish_many(
                        [event for event, _ in chunk],
                        idempotency_keys=[key for _, key in chunk],
                        in_order=True,
                    )
                else:
                    event, key = chunk[0]
                    cursors = [self.publisher.publish(event, idempotency_key=key)]
                published.extend(_tagged(cursors))
            except PublishManyError as error:
                stopped = error.stopped_at
                if stopped is None:  # (in_order always says where it stopped)
                    return published, error
                published.extend(_tagged(error.cursors[:stopped]))  # (all published)
                project_id = chunk[stopped][0].project_id
                _report_overtaking(chunk, error, stopped)
                return published, error.errors.get(project_id, error)
            except Exception as exc:
                return published, exc
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


def _tagged(cursors: Sequence[Cursor | None]) -> list[Tagged]:
    """Each cursor with the tag of the frame Redis holds there: the one it carries
    (``Cursor.tag``, given by the call that sent those bytes). A publish answered from its
    idempotency record carries one only when Redis holds exactly the bytes it sent (the publish
    script compares them: a retry of a call whose reply was lost, a row republished unchanged);
    otherwise (a row edited since a relay published it and died before marking it) none, that
    no snapshot names an event by a tag Redis does not have."""
    return [(cursor, getattr(cursor, "tag", None)) for cursor in cursors]  # type: ignore[misc]


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
