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

Anything else with ``publish(event, idempotency_key=)`` (a wrapper of your own) gets one
``publish`` per row, stopping at the first error; a cluster ``Publisher`` (whose in-order mode
makes one round trip per row anyway) one in-order call of one row per round trip, the same
script call ``publish`` makes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import redis.cluster
import structlog

from publisher.client import Publisher
from publisher.core import TRANSACTION_SIZE, Cursor, PreparedBatch, PublishManyError, Republished
from schemas.events import ProjectEvent
from schemas.tags import stored_tag

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
        #: Rows go :data:`CHUNK` at a time through the in-order path (``publish_many(...,
        #: in_order=True)``, or its two halves: see ``stores_encoded``); else one row per round
        #: trip (``publish``, or that path with one row). A cluster publisher's in-order mode
        #: makes a round trip per row too, and one row at a time lets ``cancelled`` end the
        #: rows between any two.
        self.batched = isinstance(publisher, Publisher) and not isinstance(
            publisher.client, redis.cluster.RedisCluster
        )
        #: The publisher stores each event as ``encode_event`` encodes it (this package's
        #: ``Publisher``), so the relay knows the frame, and its tag, from the cursor. Not a
        #: subclass that overrides ``publish`` or ``publish_many``: it may store another event
        #: (a tag of the relay's encoding would then name bytes Redis does not hold, and every
        #: resume from a snapshot ending there would be told history_lost). Such a publisher's
        #: calls are planned here (``Publisher._plan_in_order``: validated and encoded once) and
        #: sent as its ``publish_many(..., in_order=True)`` sends them
        #: (``Publisher._send_in_order``), so that each tag is that of the bytes the call sent,
        #: read off the call rather than encoded a second time. That bypasses ``publish_many``
        #: and ``_publish_in_order``: only when they, and the two it calls instead, are the
        #: package's own (see :func:`_publishes_as_the_package_does`).
        self.stores_encoded = _publishes_as_the_package_does(publisher)
        #: The calls Redis ran after a refused one in the same transaction (other projects'),
        #: by idempotency key: their cursors and tags. The relay publishes those rows again
        #: under the same keys, a no-op answered from the idempotency record with the same
        #: cursor (:class:`~publisher.core.Republished`); Redis holds these bytes there, so
        #: their tags are known. Kept from one :meth:`publish` to the next only.
        self._ran_after_refusal: dict[str, Tagged] = {}

    def publish(
        self, items: Sequence[tuple[ProjectEvent, str]]
    ) -> tuple[list[Tagged], Exception | None]:
        cancelled = self.cancelled
        published: list[Tagged] = []
        earlier, self._ran_after_refusal = self._ran_after_refusal, {}
        step = CHUNK if self.batched else 1
        for start in range(0, len(items), step):
            if start and cancelled is not None and cancelled():
                return published, None
            chunk = items[start : start + step]
            calls: list[PreparedBatch] = []
            try:
                if self.stores_encoded:
                    calls = self.publisher._plan_in_order(
                        [event for event, _ in chunk], [key for _, key in chunk]
                    )
                    cursors = self.publisher._send_in_order(calls)
                    published.extend(_tagged(calls, chunk, cursors, earlier))
                elif self.batched:
                    cursors = self.publisher.publish_many(
                        [event for event, _ in chunk],
                        idempotency_keys=[key for _, key in chunk],
                        in_order=True,
                    )
                    published.extend((cursor, None) for cursor in cursors)
                else:
                    event, key = chunk[0]
                    published.append((self.publisher.publish(event, idempotency_key=key), None))
            except PublishManyError as error:
                stopped = error.stopped_at
                if stopped is None:  # (in_order always says where it stopped)
                    return published, error
                if calls:  # (planned here: the tags are known)
                    tagged = list(_tagged(calls, chunk, error.cursors, earlier))
                    published.extend(tagged[:stopped])  # type: ignore[arg-type]
                    self._ran_after_refusal = {
                        chunk[index][1]: tagged[index]  # type: ignore[misc]
                        for index in range(stopped + 1, len(chunk))
                        if tagged[index][0] is not None
                    }
                else:
                    done = error.cursors[:stopped]  # (all published: not None)
                    published.extend((cursor, None) for cursor in done)  # type: ignore[misc]
                project_id = chunk[stopped][0].project_id
                _report_overtaking(chunk, error, stopped)
                return published, error.errors.get(project_id, error)
            except Exception as exc:
                return published, exc
        return published, None


#: The methods through which a Publisher's publishes go, from the relay's calls down to the
#: ones it now makes itself (Publisher._plan_in_order, Publisher._send_in_order).
_PUBLISHING_METHODS = ("publish", "publish_many", "_publish_in_order", "_plan_in_order",
                       "_send_in_order")  # fmt: skip


def _publishes_as_the_package_does(publisher: object) -> bool:
    """Whether ``publisher`` is this package's ``Publisher`` publishing through its own methods:
    not a subclass overriding any of :data:`_PUBLISHING_METHODS` (it may store other bytes than
    the calls the relay plans: a tag read off those would be wrong), nor one with such a method
    replaced on the object itself (a wrapper set on the instance: the relay, calling
    ``_send_in_order`` directly, would bypass it)."""
    if not isinstance(publisher, Publisher):
        return False
    replaced = getattr(publisher, "__dict__", {})
    return all(
        getattr(type(publisher), name) is getattr(Publisher, name) and name not in replaced
        for name in _PUBLISHING_METHODS
    )


def _tagged(
    calls: Sequence[PreparedBatch],
    items: Sequence[tuple[ProjectEvent, str]],
    cursors: Sequence[Cursor | None],
    earlier: dict[str, Tagged],
) -> Iterator[tuple[Cursor | None, str | None]]:
    """Each cursor with the tag of the frame its call stored: the call's payload with
    ``,"seq":N`` spliced in, as the publish script stores it. A publish answered from its
    idempotency record (:class:`~publisher.core.Republished`) stored nothing: Redis holds the
    first publish's bytes, which may be encoded otherwise (a relay published the row before
    and did not mark it), so no tag, that no snapshot names an event by a tag Redis does not
    have; unless that first publish was this one's round trip refused after it (``earlier``,
    by idempotency key), whose bytes and cursor are known. None stays None (not published)."""
    for call, (_, key), cursor in zip(calls, items, cursors, strict=False):
        if cursor is None:
            yield None, None
        elif not isinstance(cursor, Republished):
            yield cursor, stored_tag(call.payloads()[0], cursor.seq)
        else:
            known = earlier.get(key)
            yield cursor, known[1] if known is not None and known[0] == cursor else None


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
