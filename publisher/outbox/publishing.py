"""Publishing a run of outbox rows in order, each under its own idempotency key.

The public API publishes a keyed event per round trip (``Publisher.publish(event,
idempotency_key=...)``); ``publish_many`` pipelines but takes no keys. The relay needs both: keys
(a republished row must be a no-op) and batches (one round trip per row caps a relay at a few
thousand events/s). So :class:`KeyedPublisher` sends up to :data:`CHUNK` keyed script calls in one
``MULTI``/``EXEC`` round trip, built by the publisher's own sans-I/O half (validation, encoding,
idempotency digest, reply parsing), and falls back to one ``publish`` per row, from the first row
without a reply, whenever anything about that path is unexpected.

Why that keeps the stream exact:

* Redis runs the calls of one ``EXEC`` in order with nothing in between, so row *k+1* of a project
  runs after row *k* is in the stream, as with one call per round trip.
* One ``EXEC`` per round trip, and nothing sent after a failed one: an error at row *k* (a damaged
  key, ``OOM``: refused at the script's first write) is followed, in the same ``EXEC``, only by
  calls that meet the same state and fail the same way, and the fallback then publishes from row
  *k* one call at a time, stopping at the first error.
* A reply lost with the connection: the fallback publishes the same rows again under the same
  keys, which returns the first cursors for those that ran.

Why not ``Publisher.publish_many(events, idempotency_keys=...)``: it pipelines without
``MULTI`` and goes on after a refused call, so a later row of a project could be published ahead
of an earlier one that failed; the relay must stop at the first failure. TODO(lead): a public
"in order, stop at the first failure" mode of ``publish_many`` would make this module a thin call
to the public API (it reaches ``Publisher._settings`` and ``Publisher._script`` today, and only
for a standalone, synchronous ``Publisher``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import redis.exceptions
import structlog

from publisher.client import Publisher
from publisher.core import Cursor, PublishError
from schemas.events import ProjectEvent

__all__ = ["CHUNK", "KeyedPublisher"]

#: Script calls per MULTI/EXEC: about 1-2 ms of Redis time, which other clients wait for.
CHUNK = 100


def log() -> structlog.typing.FilteringBoundLogger:
    """The logger, looked up per message (rare ones): a logger cached at first use would keep
    the structlog configuration of that moment (tests capture logs by reconfiguring)."""
    return structlog.get_logger("publisher.outbox")


class KeyedPublisher:
    """``publish(items)``: publish ``(event, idempotency_key)`` pairs in order; returns the
    cursors of the prefix that was published and the error that stopped it (or None)."""

    def __init__(self, publisher: Publisher, cancelled: Callable[[], bool] | None = None) -> None:
        self.publisher = publisher
        #: Asked before each round trip after the first: True ends :meth:`publish` there (what
        #: was published is returned, without an error). The relay's: stop() gave up waiting.
        self.cancelled = cancelled
        self.batched = (
            isinstance(publisher, Publisher)
            and not getattr(publisher, "_cluster", True)
            and hasattr(publisher, "_settings")
            and hasattr(publisher, "_script")
        )
        self._fallback_logged = False

    def publish(
        self, items: Sequence[tuple[ProjectEvent, str]]
    ) -> tuple[list[Cursor], Exception | None]:
        cancelled = self.cancelled
        cursors: list[Cursor] = []
        if self.batched:
            for start in range(0, len(items), CHUNK):
                if start and cancelled is not None and cancelled():
                    return cursors, None
                chunk = items[start : start + CHUNK]
                done = self._exec(chunk)
                cursors.extend(done)
                if len(done) < len(chunk):
                    break
        for index, (event, key) in enumerate(items[len(cursors) :]):
            if (index or self.batched) and cancelled is not None and cancelled():
                return cursors, None
            try:
                cursors.append(self.publisher.publish(event, idempotency_key=key))
            except Exception as exc:
                return cursors, exc
        return cursors, None

    def _exec(self, chunk: Sequence[tuple[ProjectEvent, str]]) -> list[Cursor]:
        """The cursors of the chunk's leading calls that got a good reply in one MULTI/EXEC."""
        publisher = self.publisher
        try:
            calls = [publisher._settings.single(event, key) for event, key in chunk]
            sha = publisher._script.sha
        except Exception as exc:  # the publisher's internals changed: use the public API only
            if not self._fallback_logged:
                self._fallback_logged = True
                log().warning("outbox_batched_publish_disabled", error=repr(exc))
            self.batched = False
            return []
        try:
            with publisher.client.pipeline(transaction=True) as pipe:
                for call in calls:
                    pipe.execute_command("EVALSHA", sha, len(call.keys), *call.keys, *call.args)
                replies = pipe.execute(raise_on_error=False)
            cursors = []
            for call, reply in zip(calls, replies, strict=True):
                if isinstance(reply, Exception):
                    break
                try:
                    cursors.append(call.cursors(reply)[0])
                except PublishError:  # e.g. IdempotencyConflict: the fallback raises it
                    break
            if len(cursors) < len(calls):
                _report_overtaking(calls, replies, len(cursors))
            return cursors
        except (redis.exceptions.RedisError, OSError):
            return []  # the fallback retries these rows one by one (with the publisher's policy)
        except Exception:
            # A reply no Redis gives (an EXEC answered with an integer: a broken server or
            # proxy), which redis-py fails on with TypeError and the like. This round only: the
            # fallback publishes the rows one by one and says what is wrong; the next round
            # batches again (disabling batching here slowed the relay for good).
            return []


def _report_overtaking(calls: list, replies: list, failed: int) -> None:
    """Say so, loudly, if a later call of the failed call's project succeeded in the same EXEC.

    Errors that depend on the project's state (a damaged key, OOM) fail every later call of the
    project in the same EXEC too; only an error specific to one row (an IdempotencyConflict: the
    row's event was changed after it was first published) can let a later row of the project
    through ahead of it. That cannot be undone, so it is never silent either."""
    project_id = calls[failed].project_id
    overtaken = [
        index
        for index in range(failed + 1, len(calls))
        if calls[index].project_id == project_id and _published(calls[index], replies[index])
    ]
    if overtaken:
        log().error(
            "outbox_event_overtaken",
            project_id=project_id,
            failed_call=failed,
            later_calls_published=len(overtaken),
            error=repr(replies[failed])[:300],
        )


def _published(call, reply: object) -> bool:
    if isinstance(reply, Exception):
        return False
    try:
        call.cursors(reply)
    except PublishError:
        return False
    return True
