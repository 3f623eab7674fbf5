"""``Publisher`` (sync) and ``AsyncPublisher`` (asyncio): publish typed events to Redis.

Each publish validates the event, encodes it once, and runs one Lua script that appends it to the
project's stream and publishes it on the project's channel atomically (see :mod:`schemas.lua`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from typing import Generic, NoReturn, TypeVar

import redis
import redis.asyncio
import redis.cluster
import redis.exceptions
from redis.commands.core import Script as _Script

from publisher import connection
from publisher.connection import (
    AsyncDirectCommands,
    DirectCommands,
    OutOfStep,
    async_client,
    is_cluster_url,
    sync_client,
)
from publisher.core import (
    IDEMPOTENCY_ARG,
    RETRY_GUARD,
    TRANSACTION_SIZE,
    Cursor,
    IdempotencyConflict,
    PreparedBatch,
    PublishError,
    PublisherUnavailable,
    PublishManyError,
    PublishManyUnavailable,
    Retention,
    RetryPolicy,
    call_outcome,
    check_max_revocations,
    check_positive,
    check_retry_guard,
    in_order_outcome,
    now_if_none,
    pack_command,
    plan_batches,
    plan_in_order,
    prepare_revocation,
    prepare_single,
    refused_during_migration,
    script_error,
    script_reply_valid,
)
from publisher.presence import aread_presence, read_presence
from schemas import lua
from schemas.events import (
    AgentResumed,
    Blocker,
    BlockerCreated,
    BlockerExpired,
    BlockerResolved,
    ProjectEvent,
)
from schemas.history import (
    DEFAULT_PAGE_BYTES,
    DEFAULT_POLL_LIMIT,
    SnapshotUnreadable,
    check_page,
    parse_snapshot_reply,
    plan_poll,
    poll_response,
    snapshot_args,
)
from schemas.keys import DEFAULT_PREFIX, Keys, new_epoch
from schemas.presence import DEFAULT_MAX_MEMBERS
from schemas.protocol import Member, PollResponse
from schemas.revocations import DEFAULT_MAX_REVOCATIONS, Revocation, parse_revoke_reply

__all__ = ["AsyncPublisher", "Publisher"]

R = TypeVar("R")
T = TypeVar("T")
#: Default bound of every publisher call when Redis does not answer (see RetryPolicy).
DEFAULT_TIMEOUT = 10.0
#: Default ``keep_for`` of ``revoke_tokens``: longer than any token should live (15 minutes by
#: default, schemas.tokens.DEFAULT_TOKEN_TTL).
DEFAULT_KEEP_FOR = timedelta(hours=24)
_UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
    # Redis Cluster: CLUSTERDOWN during a failover, redirects/TRYAGAIN until the client's TTL ran
    # out ("TTL exhausted"), and RedisClusterException, which redis-py raises when no node is
    # reachable at all (and which is not even a RedisError). All mean "try again later".
    redis.exceptions.ClusterError,
    redis.exceptions.RedisClusterException,
)


def _unavailable(exc: object) -> bool:
    """Whether ``exc`` means "Redis did not answer: try again later" (:data:`_UNAVAILABLE`), a
    ``BUSY`` refusal included: Redis runs another client's script past its
    ``busy-reply-threshold`` (5 s) and runs nothing else until it ends or is killed, a Redis
    that does not answer. The command was not run. redis-py raises it as a plain
    ``ResponseError``, which was taken for the script's own refusal (a damaged key). And a
    replica's ``READONLY`` (redis-py's ``ReadOnlyError``), once a damaged key too: see below."""
    return isinstance(exc, (*_UNAVAILABLE, redis.exceptions.ReadOnlyError)) or (
        isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith("BUSY ")
    )


# A ``READONLY`` refusal (redis-py's ReadOnlyError) is "unavailable" too: the address pointed at
# a replica for a while (a managed-Redis failover, a DNS switch), whose every write is refused
# and nothing written (a script refused at its first write has written nothing: a replica takes
# none). A connection to the replica stays one to the replica, though: the idle connections are
# dropped after it (see _drop_idle), so that the next attempt connects afresh, to wherever the
# address points by then (as redis-py's Sentinel connections do).


def _drop_idle(client: object, direct: DirectCommands | None) -> None:
    """After a ``READONLY`` refusal: disconnect the idle connections of a standalone client's
    pool (the lane's idle ones given back to it first); those in use by other calls are theirs
    (each one dropped in turn after its own refusal). A cluster client follows its slot map."""
    pool = getattr(client, "connection_pool", None)
    if isinstance(client, redis.Redis) and isinstance(pool, redis.ConnectionPool):
        if direct is not None:
            direct.close()
        pool.disconnect(inuse_connections=False)


async def _adrop_idle(client: object, direct: AsyncDirectCommands | None) -> None:
    """:func:`_drop_idle` for an asyncio client."""
    pool = getattr(client, "connection_pool", None)
    if isinstance(client, redis.asyncio.Redis) and isinstance(pool, redis.asyncio.ConnectionPool):
        if direct is not None:
            await direct.aclose()
        await pool.disconnect(inuse_connections=False)


class _ContractHelpers(Generic[R]):
    """Typed helpers mirroring the contract's ``broadcast_*`` functions; timestamps default to
    now (UTC). Each returns what ``publish`` returns: a Cursor, or an awaitable of one."""

    _settings: _Settings
    _policy: RetryPolicy
    #: Stream entries that :meth:`history` reads skipped as not the event bus's (another writer
    #: to the project's stream, or corruption: docs/operations.md, "A writer to Redis"), since
    #: this publisher was made. The HTTP API reports it as ``eventbus_foreign_values_total``.
    foreign_entries_skipped: int = 0

    @property
    def idempotency_window(self) -> timedelta:
        """How long an idempotency key is remembered (the constructor's ``idempotency_window``):
        publishing the same event under the same key within it is a no-op returning the first
        cursor. Read-only."""
        return self._settings.idempotency_window

    @property
    def keys(self) -> Keys:
        """The deployment's key names (the constructor's ``prefix``). Read-only."""
        return self._settings.keys

    @property
    def timeout(self) -> float:
        """The bound, in seconds, on a call when Redis does not answer (the constructor's
        ``timeout``, default 10; see its documentation for clients you built). Read-only."""
        return self._policy.timeout

    @property
    def max_revocations(self) -> int:
        """The cap of the token revocation list (the constructor's ``max_revocations``): a
        revocation of a new subject beyond it raises ``RevocationListFull``. Read-only."""
        return self._settings.max_revocations

    def publish(self, event: ProjectEvent, *, idempotency_key: str | None = None) -> R:
        raise NotImplementedError

    def blocker_created(
        self, project_id: int, blocker: Blocker, *, idempotency_key: str | None = None
    ) -> R:
        return self.publish(
            BlockerCreated(project_id=project_id, blocker=blocker), idempotency_key=idempotency_key
        )

    def blocker_resolved(
        self,
        project_id: int,
        blocker_id: int,
        answer: str,
        resolved_at: datetime | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> R:
        event = BlockerResolved(
            project_id=project_id,
            blocker_id=blocker_id,
            answer=answer,
            resolved_at=now_if_none(resolved_at),
        )
        return self.publish(event, idempotency_key=idempotency_key)

    def agent_resumed(
        self,
        project_id: int,
        agent_id: str,
        task_id: int,
        blocker_id: int,
        resumed_at: datetime | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> R:
        event = AgentResumed(
            project_id=project_id,
            agent_id=agent_id,
            task_id=task_id,
            blocker_id=blocker_id,
            resumed_at=now_if_none(resumed_at),
        )
        return self.publish(event, idempotency_key=idempotency_key)

    def blocker_expired(
        self,
        project_id: int,
        blocker_id: int,
        task_id: int,
        expired_at: datetime | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> R:
        event = BlockerExpired(
            project_id=project_id,
            blocker_id=blocker_id,
            task_id=task_id,
            expired_at=now_if_none(expired_at),
        )
        return self.publish(event, idempotency_key=idempotency_key)


class _Settings:
    def __init__(
        self,
        *,
        prefix: str,
        retention: Retention | None,
        idempotency_window: timedelta,
        sharded: bool,
        retry_guard: timedelta | None,
        max_revocations: int = DEFAULT_MAX_REVOCATIONS,
    ) -> None:
        check_retry_guard(retry_guard)
        self.max_revocations = check_max_revocations(max_revocations)
        self.keys = Keys(prefix)
        self.retention = retention or Retention()
        self.idempotency_window = idempotency_window
        self.retry_guard = retry_guard
        self.publish_command = "SPUBLISH" if sharded else "PUBLISH"

    def single(self, event: ProjectEvent, idempotency_key: str | None) -> PreparedBatch:
        return prepare_single(
            event,
            keys=self.keys,
            retention=self.retention,
            publish_command=self.publish_command,
            idempotency_key=idempotency_key,
            idempotency_window=self.idempotency_window,
            retry_guard=self.retry_guard,
        )

    def batches(
        self, events: Iterable[ProjectEvent], idempotency_keys: Iterable[str | None] | None
    ) -> list[PreparedBatch]:
        return plan_batches(
            events,
            keys=self.keys,
            retention=self.retention,
            publish_command=self.publish_command,
            retry_guard=self.retry_guard,
            idempotency_keys=idempotency_keys,
            idempotency_window=self.idempotency_window,
        )

    def in_order(
        self, events: Iterable[ProjectEvent], idempotency_keys: Iterable[str | None] | None
    ) -> list[PreparedBatch]:
        return plan_in_order(
            events,
            keys=self.keys,
            retention=self.retention,
            publish_command=self.publish_command,
            retry_guard=self.retry_guard,
            idempotency_keys=idempotency_keys,
            idempotency_window=self.idempotency_window,
        )


class _NodeScript(_Script):
    """A script of a synchronous Redis Cluster client: EVALSHA, and after NOSCRIPT (a node
    that never ran it: a promoted replica, a restarted node) the text with EVAL, to the keys'
    node alone, which caches it too. redis-py's Script sends SCRIPT LOAD to every master: one
    hung master failed ``history`` and ``revoke_tokens`` on every other one."""

    def __call__(self, keys=None, args=None, client=None):
        client = self.registered_client if client is None else client
        keys, args = list(keys or []), list(args or [])
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return client.execute_command("EVAL", self.script, len(keys), *keys, *args)


def _queue_eval(pipe, batch: PreparedBatch) -> None:
    # redis-py's cluster pipelines refuse EVALSHA (they cannot load a script on whichever node
    # a slot lives on). EVAL carries the script text, so it also works on a node that never saw
    # the script: a promoted replica after a failover, or a slot's new owner after a migration.
    # Redis caches the compiled script by its SHA, so the cost is the ~2 KB of text per batch.
    # (ClusterPipeline.eval() is a stub that raises, hence execute_command.)
    pipe.execute_command("EVAL", lua.PUBLISH, len(batch.keys), *batch.keys, *batch.args)


def _unguarded_or_raise(batch: PreparedBatch, exc: Exception) -> PreparedBatch:
    """The call to run again after ``exc``: without its retry guard when a cluster node that is
    importing the slot refused it (see PreparedBatch.unguarded); any other error is raised."""
    fallback = batch.unguarded() if refused_during_migration(exc) else None
    if fallback is None:
        raise exc
    return fallback


def _to_rerun(batches: list[PreparedBatch], results: list) -> list[tuple[int, PreparedBatch]]:
    """The pipelined calls refused by a node importing their slot, to run again without their
    guard (index, call); other errors stay in ``results``."""
    reruns = []
    for index, (batch, result) in enumerate(zip(batches, results, strict=True)):
        if isinstance(result, Exception) and refused_during_migration(result):
            fallback = batch.unguarded()
            if fallback is not None:
                reruns.append((index, fallback))
    return reruns


def _unless_unavailable(results: list) -> list:
    """A pipeline's results, or the first "try again later" error among them raised (a cluster
    pipeline returns CLUSTERDOWN or a lost node as a result), so that the whole pipeline is
    attempted again: every call in it is guarded or keyed, so a call that did run is not
    published twice."""
    for result in results:
        if _unavailable(result):
            raise result
    return results


def _collect(batches: list[PreparedBatch], results: list, total: int) -> list[Cursor]:
    """Cursors in the input order, or PublishManyError naming what was and was not written.

    Every error reply of the publish script comes before its first write (schemas.lua.PUBLISH),
    so a failed call wrote nothing and the events of the calls that succeeded are exactly the
    published ones.
    """
    cursors: list[Cursor | None] = [None] * total
    errors: dict[int, PublishError] = {}
    for batch, result in zip(batches, results, strict=True):
        if isinstance(result, Exception):
            errors.setdefault(batch.project_id, script_error(result))
            continue
        try:
            batch_cursors = batch.cursors(result)
        except IdempotencyConflict as conflict:  # that event only; the others went on
            errors.setdefault(batch.project_id, conflict)
            continue
        for position, cursor in zip(batch.positions, batch_cursors, strict=True):
            cursors[position] = cursor
    if errors:
        raise PublishManyError(cursors, errors)
    return cursors  # type: ignore[return-value]


def _transaction_replies(calls: list[PreparedBatch], run: Callable[[], list]) -> list | None:
    """The replies of one ``MULTI``/``EXEC`` of ``calls`` (``run()`` sends it): see
    :func:`_checked_transaction`."""
    try:
        replies: object = run()
    except Exception as exc:
        replies = _failed_transaction(exc)
    return _checked_transaction(calls, replies)


async def _atransaction_replies(
    calls: list[PreparedBatch], run: Callable[[], Awaitable[list]]
) -> list | None:
    """:func:`_transaction_replies` for an asyncio client."""
    try:
        replies: object = await run()
    except Exception as exc:
        replies = _failed_transaction(exc)
    return _checked_transaction(calls, replies)


class _OneByOne(Exception):
    """Send the calls of this transaction one at a time instead (see :func:`_failed_transaction`
    and :func:`_out_of_step_transaction`)."""


def _failed_transaction(exc: Exception) -> Exception:
    """What an ``EXEC`` that raised ``exc`` came to. "Try again later" errors are raised again
    (the publisher sends the transaction again). When Redis refused a call while queueing it,
    it ran none of them (``EXECABORT``; redis-py raises the refusal, of whichever call it was):
    :class:`_OneByOne`, so that the burst stops exactly at the refused call, with its own
    project's error. Anything else (``EXEC`` refused itself, e.g. "EXEC without MULTI" when
    ``MULTI`` was refused and each call ran on its own; a reply redis-py cannot read) leaves
    unknown which calls ran: ``exc`` is returned as the transaction's reply, which
    :func:`_checked_transaction` takes for one of the wrong shape."""
    if isinstance(exc, _UNAVAILABLE):
        raise exc
    if isinstance(exc, redis.exceptions.ExecAbortError) or isinstance(
        exc.__cause__ or exc.__context__, redis.exceptions.ExecAbortError
    ):
        raise _OneByOne from exc
    return exc


def _checked_transaction(calls: list[PreparedBatch], replies: object) -> list | None:
    """The replies of a transaction of ``calls``, one per call with error replies as exceptions;
    None when every reply was ``NOSCRIPT`` (nothing ran: load the script and send it again).
    When which calls ran is unknown (``EXEC`` refused, or answered as no Redis does: a broken
    server or proxy, a user that may not run ``MULTI``), see :func:`_out_of_step_transaction`."""
    if not isinstance(replies, list) or len(replies) != len(calls):
        raise _out_of_step_transaction(calls, replies)
    if all(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies):
        return None
    if replies and all(isinstance(reply, redis.exceptions.ReadOnlyError) for reply in replies):
        raise replies[0]  # a replica: none ran ("unavailable": sent again, see _unavailable)
    return replies


def _out_of_step_transaction(calls: list[PreparedBatch], replies: object) -> Exception:
    """The error for a transaction of which the calls that ran are unknown. When every call
    carries an idempotency key or a retry guard, :class:`_OneByOne`: each call sent again on its
    own returns its first cursor if it ran, publishes its event if not, and the burst stops at
    the first one refused; a setup that never answers a transaction right (a proxy without
    transactions) still publishes, as one round trip per call. Otherwise a ``PublishError``
    (a retry might publish an event twice), as for a single call (:func:`_after_out_of_step`)."""
    if all(call.args[IDEMPOTENCY_ARG] for call in calls):
        return _OneByOne()
    shown = f"{type(replies).__name__}: {replies}" if isinstance(replies, Exception) else replies
    return PublishError(
        f"unexpected reply to a transaction of publish calls: {shown!r}"[:300]
        + " (which of them ran is unknown; calls without a retry guard are not sent again)"
    )


def _stop_or_go(
    cursors: list[Cursor | None], start: int, calls: list[PreparedBatch], replies: list
) -> None:
    """Record the cursors of one round trip of an in-order burst (``calls`` are its events from
    ``start`` on); raise :class:`PublishManyError` if a call was refused."""
    done, refused, errors = in_order_outcome(calls, replies)
    cursors[start : start + len(done)] = done
    if refused is not None:
        raise PublishManyError(cursors, errors, stopped_at=start + refused)


class _CutShort(Exception):
    """A call of an in-order burst sent one per round trip failed without an answer (``error``:
    Redis lost or hung); ``replies`` are those of the calls before it."""

    def __init__(self, replies: list, error: Exception) -> None:
        super().__init__(repr(error))
        self.replies = replies
        self.error = error


#: What a round trip of an in-order burst can fail with, short of an answer to read: Redis lost
#: or hung (PublisherUnavailable, or asyncio's TimeoutError), a transaction of which the calls
#: that ran are unknown (PublishError), a Redis error raised rather than replied.
_ROUND_TRIP_FAILURES = (PublishError, redis.exceptions.RedisError, TimeoutError)


def _stop_cut_short(
    cursors: list[Cursor | None],
    calls: list[PreparedBatch],
    start: int,
    chunk: list[PreparedBatch],
    cut: _CutShort,
    cluster: bool,
    timeout: float,
) -> NoReturn:
    """Raise what an in-order burst raises when a call of its chunk ``chunk`` (from ``start``),
    sent one per round trip, got no answer (:class:`_CutShort`): the cursors of the calls
    answered before it are kept, and the calls that may have run from it on are that one on
    Redis Cluster (the chunk's only sending), else the chunk's rest too, which its transaction
    had sent (it may have run them: :func:`_out_of_step_transaction`)."""
    _stop_or_go(cursors, start, chunk, cut.replies)
    at = start + len(cut.replies)
    unsure = 1 if cluster else start + len(chunk) - at
    _stop_short(cursors, calls, at, unsure, cut.error, timeout)


def _stop_short(
    cursors: list[Cursor | None],
    calls: list[PreparedBatch],
    stopped_at: int,
    unsure: int,
    exc: Exception,
    timeout: float,
) -> NoReturn:
    """Raise what an in-order burst raises when its round trip of ``unsure`` calls from
    ``stopped_at`` on failed without an answer (``exc``): the error a single publish would
    raise for it when nothing was published before it (as before); else a
    :class:`PublishManyError` (also a :class:`PublisherUnavailable` when that error is one) with
    the cursors of the events published before it, the round trip's events as
    ``maybe_published``, and that error as the stopped event's project's error and ``__cause__``.
    """
    error: PublishError
    if isinstance(exc, PublishError):
        if stopped_at == 0:
            raise exc
        error = exc
    else:
        if isinstance(exc, TimeoutError):  # asyncio.timeout ran out (redis-py's is not one)
            error = PublisherUnavailable(f"Redis unavailable: no reply within {timeout} s")
        else:
            error = script_error(exc)
        if stopped_at == 0:
            raise error from exc
        error.__cause__ = exc
    kind = PublishManyUnavailable if isinstance(error, PublisherUnavailable) else PublishManyError
    raise kind(
        cursors,
        {calls[stopped_at].project_id: error},
        stopped_at=stopped_at,
        maybe_published=range(stopped_at, stopped_at + unsure),
    ) from error


def _valid_timeout(timeout: object) -> float:
    """``timeout`` as a finite positive number of seconds (None: DEFAULT_TIMEOUT), or ValueError."""
    if timeout is None:
        return DEFAULT_TIMEOUT
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout < float("inf")
    ):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _policy(timeout: float | None, built: bool, client: object) -> RetryPolicy:
    """The retry policy of a publisher: retries within ``timeout`` when one attempt's worst case
    is known (a client ``from_url`` built, or one of yours configured the same way), else one
    attempt."""
    timeout = _valid_timeout(timeout)
    attempt = sum(_attempt_timeout(timeout)) if built else _attempt_bound(client)
    if attempt is not None and attempt > timeout:
        attempt = None  # an attempt may outlast the timeout: no retries can fit
    return RetryPolicy(timeout, attempt)


def _attempt_bound(client: object) -> float | None:
    """How long one attempt on a client of yours can take when Redis does not answer, when that
    is known: a standalone client (sync or asyncio) with ``socket_connect_timeout`` and
    ``socket_timeout`` set and no retries of its own (``retry=Retry(NoBackoff(), 0)``), so one
    call is one connect and one read. None otherwise (redis-py retries by default)."""
    if getattr(client, "connection", None) is not None:
        return None  # a single-connection client
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        return None  # a cluster client, or something else
    connect, read = kwargs.get("socket_connect_timeout"), kwargs.get("socket_timeout")
    retry = kwargs.get("retry")
    retries = retry.get_retries() if retry is not None else 0
    timeouts = (connect, read)
    if retries or not all(isinstance(t, int | float) and 0 < t < float("inf") for t in timeouts):
        return None
    return float(connect + read)


def _attempt_timeout(timeout: float) -> tuple[float, float]:
    """Connect and socket timeouts of the clients ``from_url`` builds for a call ``timeout``:
    the defaults, shrunk to fit for a short ``timeout`` (connect 20 %, read 50 % of it)."""
    return (
        min(connection.CONNECT_TIMEOUT, timeout * 0.2),
        min(connection.SOCKET_TIMEOUT, timeout * 0.5),
    )


class Publisher(_ContractHelpers[Cursor]):
    """Publish events synchronously (threads, WSGI apps, scripts, cron jobs).

    >>> publisher = Publisher.from_url("redis://localhost:6379/0")
    >>> publisher.blocker_resolved(1, blocker_id=123, answer="Use JWT")
    Cursor(epoch='...', seq=42)

    Args:
        client: an existing ``redis.Redis`` or ``redis.cluster.RedisCluster``.
        prefix: key prefix shared with the gateway.
        retention: how much history each project keeps (see :class:`Retention`).
        idempotency_window: how long an idempotency key is remembered.
        sharded: use ``SPUBLISH`` (Redis Cluster sharded pub/sub); defaults to True for a cluster
            client. Must match the gateway's setting.
        retry_guard: how long each script call is remembered under a unique key, so that a
            retry of a call that timed out or lost its connection after reaching Redis returns
            the first result instead of publishing twice (60 s; the keys cost ~100 bytes each
            for that long). ``None`` disables it.
        timeout: with a client made by :meth:`from_url` (or one of yours with both socket
            timeouts set and no retries of its own), every call returns or raises
            ``PublisherUnavailable`` within this many seconds (default 10) when Redis is down
            or hung; see :class:`publisher.core.RetryPolicy`. With another client of yours,
            its timeouts and retry policy decide, and the publisher makes one attempt.
        max_revocations: the cap of the token revocation list (default 100,000 entries; see
            :meth:`revoke_tokens`): a revocation of a new subject beyond it raises
            ``RevocationListFull``. Every publisher that revokes should be given the same.
    """

    def __init__(
        self,
        client: redis.Redis | redis.cluster.RedisCluster,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention: Retention | None = None,
        idempotency_window: timedelta = timedelta(minutes=10),
        sharded: bool | None = None,
        retry_guard: timedelta | None = RETRY_GUARD,
        timeout: float | None = None,
        max_revocations: int = DEFAULT_MAX_REVOCATIONS,
        _built: bool = False,
    ) -> None:
        is_cluster = isinstance(client, redis.cluster.RedisCluster)
        self._settings = _Settings(
            prefix=prefix,
            retention=retention,
            idempotency_window=idempotency_window,
            sharded=is_cluster if sharded is None else sharded,
            retry_guard=retry_guard,
            max_revocations=max_revocations,
        )
        self._policy = _policy(timeout, _built, client)
        self.client = client
        self._cluster = is_cluster
        self._script = client.register_script(lua.PUBLISH)
        script = _NodeScript if isinstance(client, redis.cluster.RedisCluster) else _Script
        self._revoke_script = script(client, lua.REVOKE)
        self._snapshot_script = script(client, lua.SNAPSHOT)
        self._direct = DirectCommands(client) if DirectCommands.supports(client) else None

    @classmethod
    def from_url(cls, url: str, *, timeout: float | None = None, **kwargs) -> Publisher:
        """Connect to ``redis://...`` or ``redis+cluster://...``.

        The client makes one connect and one command per attempt (connect timeout 2 s, read
        timeout 5 s, shrunk for a ``timeout`` under 10 s); the publisher retries within
        ``timeout``. URL schemes are described in :mod:`publisher.connection`.
        """
        kwargs.setdefault("sharded", is_cluster_url(url))
        timeout = _valid_timeout(timeout)
        connect, read = _attempt_timeout(timeout)
        try:
            client = sync_client(url, retries=0, connect_timeout=connect, socket_timeout=read)
        except redis.exceptions.RedisClusterUnreachableError as exc:
            # A cluster client loads the slot map while it is built: no node of the URL answered
            # (not a RedisError; other RedisClusterExceptions, such as a URL naming a node not
            # in cluster mode, are mistakes to fix, not outages to wait out).
            raise PublisherUnavailable(f"Redis unavailable: {exc}") from exc
        if isinstance(client, redis.cluster.RedisCluster):
            connection.defer_refresh_after_timeouts(client)  # else a hang costs 5 s per node
        return cls(client, timeout=timeout, _built=True, **kwargs)

    def publish(self, event: ProjectEvent, *, idempotency_key: str | None = None) -> Cursor:
        """Validate, append and publish one event; return its cursor.

        With ``idempotency_key``, publishing the same event with the same key again within the
        idempotency window returns the first publish's cursor and writes nothing.

        Raises:
            EventValidationError: the event breaks the contract; nothing was written.
            ValueError: a malformed idempotency key; nothing was written.
            IdempotencyConflict: the key was already used for a different event; nothing was
                written.
            PublisherUnavailable: Redis unreachable or hung within ``timeout``.
            PublishError: Redis refused the call (a damaged key, OOM); nothing was written.
        """
        batch = self._settings.single(event, idempotency_key)
        started = time.monotonic()
        try:
            try:
                result = self._run(lambda: self._evalsha(batch.keys, batch.args), started)
            except redis.exceptions.ResponseError as exc:
                fallback = _unguarded_or_raise(batch, exc)
                result = self._run(lambda: self._evalsha(fallback.keys, fallback.args), started)
        except redis.exceptions.RedisError as exc:
            raise script_error(exc) from exc
        return batch.cursors(result)[0]

    def presence(self, project_id: int, *, max_members: int = DEFAULT_MAX_MEMBERS) -> list[Member]:
        """Who is on the project's dashboards now, merged over every gateway pod (see
        docs/presence.md): one atomic read, members sorted by id, empty when nobody is there.
        ``max_members``: the gateways' ``--presence-max-members``, when not the default (a pod
        listing more than a read of the default takes is left out whole).

        Raises:
            ValueError: ``project_id`` is not a positive integer.
            PublisherUnavailable: Redis unreachable or hung within ``timeout``.
            PublishError: Redis refused the read, or answered what the read script cannot
                have given (a server or proxy that is not Redis, or broken).
        """
        keys = self._settings.keys
        started = time.monotonic()
        try:
            return self._run(
                lambda: read_presence(self.client, project_id, keys=keys, max_members=max_members),
                started,
            )
        except redis.exceptions.RedisError as exc:
            raise PublishError(f"presence read failed: {exc}") from exc

    def history(
        self,
        project_id: int,
        *,
        epoch: str | None = None,
        after: int | None = None,
        tag: str | None = None,
        limit: int = DEFAULT_POLL_LIMIT,
        max_bytes: int = DEFAULT_PAGE_BYTES,
    ) -> PollResponse:
        """A page of the project's stored history after the cursor ``(epoch, after)``, exactly
        as the gateway's polling fallback answers it (docs/protocol.md, "HTTP polling"): up to
        ``limit`` events (1-1,000) and ``max_bytes`` of them (a single larger event is still a
        page), in order, each as stored; ``more`` when further events wait; the project's
        ``epoch`` and top ``seq``. Without a cursor, no events: the cursor to start from.
        A cursor of another epoch, one past what retention keeps, or one whose ``tag`` names
        another event gets ``resync_required`` (and no events): reload your state, then page
        on from its ``(epoch, seq)``. One atomic read; a project without history gets one
        (that expires in a day unless something is published), so that its cursor is real.

        Raises:
            ValueError: a ``project_id``, cursor or ``limit`` out of range.
            PublisherUnavailable: Redis unreachable or hung within ``timeout``.
            PublishError: Redis refused the read, or the project's keys hold values the
                publisher cannot have written (another writer).
        """
        keys, args = _page_request(
            self._settings.keys, project_id, epoch, after, tag, limit, max_bytes
        )
        started = time.monotonic()
        try:
            reply = self._run(lambda: self._snapshot_script(keys=keys, args=args), started)
        except redis.exceptions.RedisError as exc:
            raise PublishError(f"history read failed: {exc}") from exc
        page, foreign = _page(project_id, epoch, after, tag, limit, reply)
        self.foreign_entries_skipped += foreign
        return page

    def revoke_tokens(
        self,
        subject: str,
        *,
        issued_before: datetime | float | None = None,
        keep_for: timedelta | float = DEFAULT_KEEP_FOR,
    ) -> Revocation:
        """Refuse the tokens of ``subject`` (their ``sub``) issued before ``issued_before``, on
        every gateway: within about a second (the gateways' ``--revocation-poll-interval``),
        connections holding such a token are closed (code 4003) and the token is refused when
        presented; tokens issued since stay valid (see docs/publisher.md, "Revoking tokens").

        ``issued_before``: None for now (by Redis' clock, rounded up to the next whole second:
        the tokens issued earlier in the current second are refused too), else an aware
        ``datetime`` or unix seconds, rounded up, not later than a minute past this machine's
        clock. ``keep_for``: how long the gateways keep refusing them, counted from
        ``issued_before``: at least the longest lifetime of the tokens you issue plus 5 s, the
        gateways' allowance past ``exp`` (after it the tokens it refuses have expired anyway),
        at most 366 days.

        The subject's entry merges with an earlier one by taking the later of each time: a
        revocation never lowers nor shortens another. Returns the subject's entry after the
        merge. A call Redis answered too late to be seen may be retried within ``timeout``:
        then the later attempt's "now" counts.

        The list holds at most ``max_revocations`` entries (the constructor's, 100,000 by
        default): a subject already in it is always updated; a new one is added when the list,
        less the expired entries the call sweeps, has room, else ``RevocationListFull``.

        Raises:
            ValueError: a subject that is not 1 to 1024 bytes of text, a ``keep_for`` out of
                range, an ``issued_before`` in the future or so early that the revocation has
                already ended; nothing was written.
            RevocationListFull: a new subject and the list full (a ``PublishError``); nothing
                was revoked (the expired entries the call read are removed all the same).
            PublisherUnavailable: Redis unreachable or hung within ``timeout``.
            PublishError: Redis refused the call (the revocation keys damaged by another writer,
                OOM); nothing was written.
        """
        keys, args = prepare_revocation(
            subject,
            issued_before,
            keep_for,
            keys=self._settings.keys,
            now=time.time(),
            max_entries=self._settings.max_revocations,
        )
        started = time.monotonic()
        try:
            reply = self._run(lambda: self._revoke_script(keys=keys, args=args), started)
        except redis.exceptions.RedisError as exc:
            raise script_error(exc, "revocation") from exc
        return _revocation(subject, reply)

    def _run(self, attempt: Callable[[], T], started: float) -> T:
        """``attempt()`` until it succeeds or the retry policy gives up (PublisherUnavailable)."""
        failures = 0
        while True:
            try:
                return attempt()
            except Exception as exc:
                if not _unavailable(exc):
                    raise
                if isinstance(exc, redis.exceptions.ReadOnlyError):
                    _drop_idle(self.client, self._direct)
                failures += 1
                pause = self._policy.delay(failures, time.monotonic() - started)
                if pause is None:
                    raise PublisherUnavailable(f"Redis unavailable: {_describe(exc)}") from exc
                if pause:
                    time.sleep(pause)

    def _evalsha(self, keys: list[str], args: list) -> list:
        """One attempt of one script call."""
        direct = self._direct
        if direct is not None:
            # The hot path: one send and one read on a held connection (see DirectCommands).
            try:
                return direct.execute(
                    pack_command("EVALSHA", self._script.sha, len(keys), *keys, *args),
                    script_reply_valid,
                )
            except OutOfStep as exc:
                _after_out_of_step(exc, args, self._policy)  # (returned: once more via redis-py)
            except redis.exceptions.NoScriptError:
                pass  # loaded below
            except _UNAVAILABLE:
                if self._policy.attempt_timeout is not None:
                    raise  # the next attempt (RetryPolicy) takes another connection
                # A client of your own: one more try through redis-py with your retry policy;
                # the script's retry guard makes a call that did reach Redis return its first
                # result instead of publishing twice.
        # EVALSHA straight through execute_command: redis-py's Script wrapper costs several us per
        # call on the hot path (argument tuples, an import, isinstance checks).
        client, sha = self.client, self._script.sha
        try:
            return client.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            # Redis restarted or SCRIPT FLUSH (on a cluster: a promoted replica, a new node): the
            # text once more, with EVAL, which also caches it there. Not SCRIPT LOAD: on a
            # cluster redis-py sends that to every master, and one hung master failed the
            # publishes to all the others.
            return client.execute_command("EVAL", lua.PUBLISH, len(keys), *keys, *args)

    def publish_many(
        self,
        events: Iterable[ProjectEvent],
        *,
        idempotency_keys: Iterable[str | None] | None = None,
        in_order: bool = False,
    ) -> list[Cursor]:
        """Publish a burst in one pipelined round trip; cursors come back in the input order.

        Every event (and idempotency key) is validated before anything is sent. Events of one
        project keep their relative order and are appended by one script call per 500 events.
        ``idempotency_keys``, one per event (``None`` for none), publishes each keyed event as
        ``publish(event, idempotency_key=key)`` would, in the same pipeline.

        Raises:
            EventValidationError: an event breaks the contract; nothing was written.
            ValueError: a malformed idempotency key, or not one per event; nothing was written.
            PublisherUnavailable: Redis unreachable or hung within ``timeout``; a prefix of the
                script calls may have been applied (retrying keyed events is exact).
            PublishManyError: Redis refused some script calls (e.g. a damaged key of one
                project, an idempotency key used for another event); its ``cursors`` say
                exactly which events were published.

        ``in_order=True`` publishes the events in the input order and stops at the first one
        Redis refuses (what an outbox relay needs): one script call per event (keyed, or under
        a retry guard of its own), up to :data:`publisher.core.TRANSACTION_SIZE` (100) of them
        per ``MULTI``/``EXEC`` round trip, and no round trip after one with a refused call.
        ``PublishManyError.stopped_at`` is then the refused event: every event before it was
        published, none after its transaction was sent, and ``cursors`` also shows the events
        after it in its transaction that Redis ran (see docs/publisher.md). ``timeout`` bounds
        each round trip. A round trip that fails without an answer (Redis lost or hung, a
        transaction whose outcome is unknown) after earlier ones were published raises
        ``PublishManyError`` all the same, with their cursors, ``stopped_at`` its first event and
        its events in ``maybe_published`` (each may have been published: retry them under the
        same keys), also a ``PublisherUnavailable`` when Redis was unavailable; the first round
        trip's failure is raised as it is. A transaction Redis discards (``EXECABORT``)
        or answers leaving unknown which calls ran (every one keyed or guarded) is sent again one
        call per round trip. On Redis Cluster (a transaction cannot span the slots of several
        projects) each call is a round trip of its own. Each cursor (in ``PublishManyError.cursors``
        too) carries the tag of the frame its call stored (``Cursor.tag``; None for one answered
        from an idempotency record): what the outbox relay records. A subclass that changes what
        is stored overrides this method (and ``publish``) and passes what it stores to
        ``super()``: the cursors it returns then carry the tags of the bytes Redis holds.
        """
        if in_order:
            return self._publish_in_order(events, idempotency_keys)
        events = list(events)
        batches = self._settings.batches(events, idempotency_keys)
        if not batches:
            return []
        started = time.monotonic()
        try:
            results = self._run(lambda: self._pipeline(batches), started)
            for index, fallback in _to_rerun(batches, results):
                try:
                    results[index] = self._run(
                        lambda f=fallback: self._evalsha(f.keys, f.args), started
                    )
                except redis.exceptions.ResponseError as exc:
                    results[index] = exc
        except redis.exceptions.RedisError as exc:
            raise script_error(exc) from exc
        return _collect(batches, results, len(events))

    def _pipeline(self, batches: list[PreparedBatch]) -> list:
        """One attempt: every script call in one pipeline; error replies come back as results."""
        with self.client.pipeline(transaction=False) as pipe:
            for batch in batches:
                if self._cluster:
                    _queue_eval(pipe, batch)
                else:
                    self._script(keys=batch.keys, args=batch.args, client=pipe)
            return _unless_unavailable(pipe.execute(raise_on_error=False))

    def _publish_in_order(
        self, events: Iterable[ProjectEvent], idempotency_keys: Iterable[str | None] | None
    ) -> list[Cursor]:
        return self._send_in_order(self._settings.in_order(events, idempotency_keys))

    def _send_in_order(self, calls: list[PreparedBatch]) -> list[Cursor]:
        """``publish_many(..., in_order=True)`` of its calls, one per event
        (:func:`publisher.core.plan_in_order`); each cursor carries the tag of the frame its
        call stored (``Cursor.tag``, read off the call that was sent:
        :func:`publisher.core.with_stored_tag`)."""
        cursors: list[Cursor | None] = [None] * len(calls)
        timeout = self._policy.timeout
        for start in range(0, len(calls), TRANSACTION_SIZE):
            chunk = calls[start : start + TRANSACTION_SIZE]
            started = time.monotonic()
            try:
                if self._cluster:
                    replies = self._one_by_one(chunk)
                else:
                    try:
                        replies = self._run(lambda c=chunk: self._transaction(c), started)
                    except _OneByOne:
                        replies = self._one_by_one(chunk)
            except _CutShort as cut:  # the calls before it were answered: their cursors
                _stop_cut_short(cursors, calls, start, chunk, cut, self._cluster, timeout)
            except _ROUND_TRIP_FAILURES as exc:
                # Not lost with it: the cursors of the events published before this round trip.
                _stop_short(cursors, calls, start, len(chunk), exc, timeout)
            _stop_or_go(cursors, start, chunk, replies)
        return cursors  # type: ignore[return-value]

    def _transaction(self, calls: list[PreparedBatch]) -> list:
        """One attempt: ``calls`` in one MULTI/EXEC (see :func:`_transaction_replies`); raises
        :class:`_OneByOne` when they are to be sent one at a time instead."""

        def run(sha: str) -> list:
            with self.client.pipeline(transaction=True) as pipe:
                for call in calls:
                    pipe.execute_command("EVALSHA", sha, len(call.keys), *call.keys, *call.args)
                return pipe.execute(raise_on_error=False)

        replies = _transaction_replies(calls, lambda: run(self._script.sha))
        if replies is None:  # Redis restarted or SCRIPT FLUSH: load the script, send them again
            self._script.sha = sha = self.client.script_load(lua.PUBLISH)
            replies = _transaction_replies(calls, lambda: run(sha))
        if replies is None:
            raise PublishError("publish script not found right after loading it")
        return replies

    def _one_by_one(self, calls: list[PreparedBatch]) -> list:
        """Replies to ``calls`` sent one per round trip (each as ``publish`` sends it), up to
        and including the first refused one; :class:`_CutShort` when one gets no answer."""
        replies: list = []
        for call in calls:
            started = time.monotonic()
            try:
                try:
                    reply = self._run(lambda c=call: self._evalsha(c.keys, c.args), started)
                except redis.exceptions.ResponseError as exc:
                    f = _unguarded_or_raise(call, exc)
                    reply = self._run(lambda f=f: self._evalsha(f.keys, f.args), started)
            except redis.exceptions.ResponseError as exc:
                reply = exc
            except _ROUND_TRIP_FAILURES as exc:
                raise _CutShort(replies, exc) from exc
            replies.append(reply)
            if isinstance(call_outcome(call, reply), PublishError):
                break
        return replies

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        self.client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncPublisher(_ContractHelpers[Awaitable[Cursor]]):
    """Publish events from asyncio code; same arguments and behaviour as :class:`Publisher`.

    >>> publisher = AsyncPublisher.from_url("redis://localhost:6379/0")
    >>> await publisher.agent_resumed(1, "backend-worker-001", task_id=456, blocker_id=123)

    With any client (yours too), every call also ends within ``timeout`` (default 10 s): when
    it runs out, the call is cancelled (its connection dropped) and PublisherUnavailable raised.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention: Retention | None = None,
        idempotency_window: timedelta = timedelta(minutes=10),
        sharded: bool | None = None,
        retry_guard: timedelta | None = RETRY_GUARD,
        timeout: float | None = None,
        max_revocations: int = DEFAULT_MAX_REVOCATIONS,
        _built: bool = False,
    ) -> None:
        import redis.asyncio.cluster

        is_cluster = isinstance(client, redis.asyncio.cluster.RedisCluster)
        self._settings = _Settings(
            prefix=prefix,
            retention=retention,
            idempotency_window=idempotency_window,
            sharded=is_cluster if sharded is None else sharded,
            retry_guard=retry_guard,
            max_revocations=max_revocations,
        )
        self._policy = _policy(timeout, _built, client)
        self.client = client
        self._cluster = is_cluster
        self._script = client.register_script(lua.PUBLISH)
        self._revoke_script = client.register_script(lua.REVOKE)
        self._snapshot_script = client.register_script(lua.SNAPSHOT)
        self._direct = AsyncDirectCommands(client) if AsyncDirectCommands.supports(client) else None

    @classmethod
    def from_url(cls, url: str, *, timeout: float | None = None, **kwargs) -> AsyncPublisher:
        """See :meth:`Publisher.from_url`."""
        kwargs.setdefault("sharded", is_cluster_url(url))
        timeout = _valid_timeout(timeout)
        connect, read = _attempt_timeout(timeout)
        client = async_client(url, retries=0, connect_timeout=connect, socket_timeout=read)
        return cls(client, timeout=timeout, _built=True, **kwargs)

    async def publish(self, event: ProjectEvent, *, idempotency_key: str | None = None) -> Cursor:
        """See :meth:`Publisher.publish`."""
        batch = self._settings.single(event, idempotency_key)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._policy.timeout):
                try:
                    result = await self._run(lambda: self._evalsha(batch.keys, batch.args), started)
                except redis.exceptions.ResponseError as exc:
                    fallback = _unguarded_or_raise(batch, exc)
                    result = await self._run(
                        lambda: self._evalsha(fallback.keys, fallback.args), started
                    )
        except TimeoutError as exc:  # asyncio.timeout ran out (redis-py's TimeoutError is not one)
            raise PublisherUnavailable(
                f"Redis unavailable: no reply within {self._policy.timeout} s"
            ) from exc
        except redis.exceptions.RedisError as exc:
            raise script_error(exc) from exc
        return batch.cursors(result)[0]

    async def presence(
        self, project_id: int, *, max_members: int = DEFAULT_MAX_MEMBERS
    ) -> list[Member]:
        """See :meth:`Publisher.presence`."""
        keys = self._settings.keys
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._policy.timeout):
                return await self._run(
                    lambda: aread_presence(
                        self.client, project_id, keys=keys, max_members=max_members
                    ),
                    started,
                )
        except TimeoutError as exc:
            raise PublisherUnavailable(
                f"Redis unavailable: no reply within {self._policy.timeout} s"
            ) from exc
        except redis.exceptions.RedisError as exc:
            raise PublishError(f"presence read failed: {exc}") from exc

    async def history(
        self,
        project_id: int,
        *,
        epoch: str | None = None,
        after: int | None = None,
        tag: str | None = None,
        limit: int = DEFAULT_POLL_LIMIT,
        max_bytes: int = DEFAULT_PAGE_BYTES,
    ) -> PollResponse:
        """See :meth:`Publisher.history`."""
        keys, args = _page_request(
            self._settings.keys, project_id, epoch, after, tag, limit, max_bytes
        )
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._policy.timeout):
                reply = await self._run(
                    lambda: self._snapshot_script(keys=keys, args=args), started
                )
        except TimeoutError as exc:
            raise PublisherUnavailable(
                f"Redis unavailable: no reply within {self._policy.timeout} s"
            ) from exc
        except redis.exceptions.RedisError as exc:
            raise PublishError(f"history read failed: {exc}") from exc
        page, foreign = _page(project_id, epoch, after, tag, limit, reply)
        self.foreign_entries_skipped += foreign
        return page

    async def revoke_tokens(
        self,
        subject: str,
        *,
        issued_before: datetime | float | None = None,
        keep_for: timedelta | float = DEFAULT_KEEP_FOR,
    ) -> Revocation:
        """See :meth:`Publisher.revoke_tokens`."""
        keys, args = prepare_revocation(
            subject,
            issued_before,
            keep_for,
            keys=self._settings.keys,
            now=time.time(),
            max_entries=self._settings.max_revocations,
        )
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._policy.timeout):
                reply = await self._run(lambda: self._revoke_script(keys=keys, args=args), started)
        except TimeoutError as exc:
            raise PublisherUnavailable(
                f"Redis unavailable: no reply within {self._policy.timeout} s"
            ) from exc
        except redis.exceptions.RedisError as exc:
            raise script_error(exc, "revocation") from exc
        return _revocation(subject, reply)

    async def _run(self, attempt: Callable[[], Awaitable[T]], started: float) -> T:
        """See :meth:`Publisher._run`."""
        failures = 0
        while True:
            try:
                return await attempt()
            except Exception as exc:
                if not _unavailable(exc):
                    raise
                if isinstance(exc, redis.exceptions.ReadOnlyError):
                    await _adrop_idle(self.client, self._direct)
                failures += 1
                pause = self._policy.delay(failures, time.monotonic() - started)
                if pause is None:
                    raise PublisherUnavailable(f"Redis unavailable: {_describe(exc)}") from exc
                await asyncio.sleep(pause)

    async def _evalsha(self, keys: list[str], args: list) -> list:
        # See Publisher._evalsha.
        direct = self._direct
        if direct is not None:
            try:
                return await direct.execute(
                    pack_command("EVALSHA", self._script.sha, len(keys), *keys, *args),
                    script_reply_valid,
                )
            except OutOfStep as exc:
                _after_out_of_step(exc, args, self._policy)  # (returned: once more via redis-py)
            except redis.exceptions.NoScriptError:
                pass
            except _UNAVAILABLE:
                if self._policy.attempt_timeout is not None:
                    raise
        client, sha = self.client, self._script.sha
        try:
            return await client.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:  # (EVAL, not SCRIPT LOAD: see Publisher)
            return await client.execute_command("EVAL", lua.PUBLISH, len(keys), *keys, *args)

    async def publish_many(
        self,
        events: Iterable[ProjectEvent],
        *,
        idempotency_keys: Iterable[str | None] | None = None,
        in_order: bool = False,
    ) -> list[Cursor]:
        """See :meth:`Publisher.publish_many`."""
        if in_order:
            return await self._publish_in_order(events, idempotency_keys)
        events = list(events)
        batches = self._settings.batches(events, idempotency_keys)
        if not batches:
            return []
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._policy.timeout):
                results = await self._run(lambda: self._pipeline(batches), started)
                for index, fallback in _to_rerun(batches, results):
                    try:
                        results[index] = await self._run(
                            lambda f=fallback: self._evalsha(f.keys, f.args), started
                        )
                    except redis.exceptions.ResponseError as exc:
                        results[index] = exc
        except TimeoutError as exc:
            raise PublisherUnavailable(
                f"Redis unavailable: no reply within {self._policy.timeout} s"
            ) from exc
        except redis.exceptions.RedisError as exc:
            raise script_error(exc) from exc
        return _collect(batches, results, len(events))

    async def _pipeline(self, batches: list[PreparedBatch]) -> list:
        async with self.client.pipeline(transaction=False) as pipe:
            for batch in batches:
                if self._cluster:
                    _queue_eval(pipe, batch)
                else:
                    await self._script(keys=batch.keys, args=batch.args, client=pipe)
            return _unless_unavailable(await pipe.execute(raise_on_error=False))

    async def _publish_in_order(
        self, events: Iterable[ProjectEvent], idempotency_keys: Iterable[str | None] | None
    ) -> list[Cursor]:
        # See Publisher._publish_in_order; each round trip also ends within timeout.
        calls = self._settings.in_order(events, idempotency_keys)
        cursors: list[Cursor | None] = [None] * len(calls)
        timeout = self._policy.timeout
        for start in range(0, len(calls), TRANSACTION_SIZE):
            chunk = calls[start : start + TRANSACTION_SIZE]
            try:
                if self._cluster:
                    replies = await self._one_by_one(chunk)
                else:
                    try:
                        started = time.monotonic()
                        async with asyncio.timeout(timeout):
                            replies = await self._run(lambda c=chunk: self._transaction(c), started)
                    except _OneByOne:  # each call within timeout
                        replies = await self._one_by_one(chunk)
            except _CutShort as cut:
                _stop_cut_short(cursors, calls, start, chunk, cut, self._cluster, timeout)
            except _ROUND_TRIP_FAILURES as exc:
                _stop_short(cursors, calls, start, len(chunk), exc, timeout)
            _stop_or_go(cursors, start, chunk, replies)
        return cursors  # type: ignore[return-value]

    async def _transaction(self, calls: list[PreparedBatch]) -> list:
        """See :meth:`Publisher._transaction`."""

        async def run(sha: str) -> list:
            async with self.client.pipeline(transaction=True) as pipe:
                for call in calls:
                    pipe.execute_command("EVALSHA", sha, len(call.keys), *call.keys, *call.args)
                return await pipe.execute(raise_on_error=False)

        replies = await _atransaction_replies(calls, lambda: run(self._script.sha))
        if replies is None:
            self._script.sha = sha = await self.client.script_load(lua.PUBLISH)
            replies = await _atransaction_replies(calls, lambda: run(sha))
        if replies is None:
            raise PublishError("publish script not found right after loading it")
        return replies

    async def _one_by_one(self, calls: list[PreparedBatch]) -> list:
        """See :meth:`Publisher._one_by_one`; each call ends within timeout."""
        replies: list = []
        for call in calls:
            try:
                replies.append(await self._bounded_call(call))
            except _ROUND_TRIP_FAILURES as exc:
                raise _CutShort(replies, exc) from exc
            if isinstance(call_outcome(call, replies[-1]), PublishError):
                break
        return replies

    async def _bounded_call(self, call: PreparedBatch) -> object:
        """One call as :meth:`publish` makes it, within timeout; its error reply returned."""
        started = time.monotonic()
        async with asyncio.timeout(self._policy.timeout):
            try:
                try:
                    return await self._run(lambda: self._evalsha(call.keys, call.args), started)
                except redis.exceptions.ResponseError as exc:
                    fallback = _unguarded_or_raise(call, exc)
                    return await self._run(
                        lambda: self._evalsha(fallback.keys, fallback.args), started
                    )
            except redis.exceptions.ResponseError as exc:
                return exc

    async def aclose(self) -> None:
        if self._direct is not None:
            await self._direct.aclose()
        await self.client.aclose()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _after_out_of_step(exc: OutOfStep, args: list, policy: RetryPolicy) -> None:
    """A held connection answered a script call with what the script cannot give (a stray reply
    of a broken proxy before the real one, say): the lane dropped it. A call under a retry guard
    or an idempotency key is then tried again like one whose connection was lost (the retry
    returns this call's own cursor, published once): with the publisher's own client, raised
    as a ``ConnectionError`` for its next attempt; with a client of your own, this returns and
    the call goes once more through redis-py. One without (``retry_guard=None``) is not, a
    retry might publish it twice: the OutOfStep is raised (PublishError)."""
    if not args[IDEMPOTENCY_ARG]:  # neither a retry guard nor an idempotency key
        raise exc
    if policy.attempt_timeout is not None:
        raise redis.exceptions.ConnectionError(str(exc)) from exc


def _page_request(
    keys: Keys,
    project_id: int,
    epoch: str | None,
    after: int | None,
    tag: str | None,
    limit: int,
    max_bytes: int,
) -> tuple[list[str], list[str | int]]:
    """The keys and arguments of a history page's SNAPSHOT call, or ValueError."""
    check_positive(project_id, "project_id")
    check_page(epoch, after, tag, limit)
    check_positive(max_bytes, "max_bytes")
    args = snapshot_args(epoch, after, limit, new_epoch(), max_bytes)
    return [keys.meta(project_id), keys.stream(project_id)], args


def _page(
    project_id: int,
    epoch: str | None,
    after: int | None,
    tag: str | None,
    limit: int,
    reply: object,
) -> tuple[PollResponse, int]:
    """The page a SNAPSHOT reply holds for the cursor, and how many stream entries another
    writer left it skipped (the first one after the cursor is a ``history_corrupt`` resync, as
    on a gateway)."""
    try:
        snapshot, foreign = parse_snapshot_reply(project_id, reply)
    except SnapshotUnreadable as exc:
        raise PublishError(f"history read failed: project {project_id}: {exc}") from None
    page = poll_response(project_id, snapshot, plan_poll(epoch, after, snapshot, limit, tag))
    return page, len(foreign)


def _revocation(subject: str, reply: object) -> Revocation:
    """The entry from the REVOKE script's reply, or PublishError for one it cannot give."""
    try:
        return parse_revoke_reply(subject, reply).revocation
    except ValueError as exc:
        raise PublishError(str(exc)) from None


def _describe(exc: BaseException) -> str:
    """An exception for a message: its text, or its type when it has none (a bare timeout)."""
    return str(exc) or type(exc).__name__
