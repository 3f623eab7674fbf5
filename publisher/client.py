"""``Publisher`` (sync) and ``AsyncPublisher`` (asyncio): publish typed events to Redis.

Each publish validates the event, encodes it once, and runs one Lua script that appends it to the
project's stream and publishes it on the project's channel atomically (see :mod:`schemas.lua`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from datetime import datetime, timedelta
from typing import Generic, TypeVar

import redis
import redis.asyncio
import redis.cluster
import redis.exceptions

from publisher.connection import (
    AsyncDirectCommands,
    DirectCommands,
    async_client,
    is_cluster_url,
    sync_client,
)
from publisher.core import (
    RETRY_GUARD,
    Cursor,
    PreparedBatch,
    PublishError,
    PublisherUnavailable,
    Retention,
    now_if_none,
    pack_command,
    plan_batches,
    prepare_single,
    refused_during_migration,
)
from schemas import lua
from schemas.events import (
    AgentResumed,
    Blocker,
    BlockerCreated,
    BlockerExpired,
    BlockerResolved,
    ProjectEvent,
)
from schemas.keys import DEFAULT_PREFIX, Keys

__all__ = ["AsyncPublisher", "Publisher"]

R = TypeVar("R")
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


class _ContractHelpers(Generic[R]):
    """Typed helpers mirroring the contract's ``broadcast_*`` functions; timestamps default to
    now (UTC). Each returns what ``publish`` returns: a Cursor, or an awaitable of one."""

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
    ) -> None:
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

    def batches(self, events: Iterable[ProjectEvent]) -> list[PreparedBatch]:
        return plan_batches(
            events,
            keys=self.keys,
            retention=self.retention,
            publish_command=self.publish_command,
            retry_guard=self.retry_guard,
        )


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
    """The pipelined calls to run again (index, call), as :func:`_unguarded_or_raise` decides."""
    return [
        (index, _unguarded_or_raise(batch, result))
        for index, (batch, result) in enumerate(zip(batches, results, strict=True))
        if isinstance(result, Exception)
    ]


def _collect(batches: list[PreparedBatch], results: list, total: int) -> list[Cursor]:
    cursors: list[Cursor] = [None] * total  # type: ignore[list-item]
    for batch, result in zip(batches, results, strict=True):
        for position, cursor in zip(batch.positions, batch.cursors(result), strict=True):
            cursors[position] = cursor
    return cursors


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
        retry_guard: how long each script call is remembered under a unique key, so that
            redis-py's automatic retry of a call that timed out or lost its connection after
            reaching Redis returns the first result instead of publishing twice (60 s; the keys
            cost ~100 bytes each for that long). ``None`` disables it.
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
    ) -> None:
        is_cluster = isinstance(client, redis.cluster.RedisCluster)
        self._settings = _Settings(
            prefix=prefix,
            retention=retention,
            idempotency_window=idempotency_window,
            sharded=is_cluster if sharded is None else sharded,
            retry_guard=retry_guard,
        )
        self.client = client
        self._cluster = is_cluster
        self._script = client.register_script(lua.PUBLISH)
        self._direct = DirectCommands(client) if DirectCommands.supports(client) else None

    @classmethod
    def from_url(cls, url: str, **kwargs) -> Publisher:
        """Connect to ``redis://...`` or ``redis+cluster://...``.

        URL schemes and the retry policy are described in :mod:`publisher.connection`.
        """
        kwargs.setdefault("sharded", is_cluster_url(url))
        return cls(sync_client(url), **kwargs)

    def publish(self, event: ProjectEvent, *, idempotency_key: str | None = None) -> Cursor:
        """Validate, append and publish one event; return its cursor.

        With ``idempotency_key``, publishing the same key again within the idempotency window
        returns the first publish's cursor and writes nothing.

        Raises:
            EventValidationError: the event breaks the contract; nothing was written.
            PublisherUnavailable: Redis unreachable after bounded retries.
        """
        batch = self._settings.single(event, idempotency_key)
        try:
            try:
                result = self._evalsha(batch.keys, batch.args)
            except redis.exceptions.ResponseError as exc:
                fallback = _unguarded_or_raise(batch, exc)
                result = self._evalsha(fallback.keys, fallback.args)
        except _UNAVAILABLE as exc:
            raise PublisherUnavailable(f"Redis unavailable: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            raise PublishError(f"publish failed: {exc}") from exc
        return batch.cursors(result)[0]

    def _evalsha(self, keys: list[str], args: list) -> list:
        direct = self._direct
        if direct is not None:
            # The hot path: one send and one read on a held connection (see DirectCommands).
            # On any failure the call goes again through redis-py below, which loads the script
            # after NOSCRIPT and retries with backoff; the script's retry guard makes a call that
            # did reach Redis return its first result instead of publishing twice.
            try:
                return direct.execute(
                    pack_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
                )
            except (redis.exceptions.NoScriptError, *_UNAVAILABLE):
                pass
        # EVALSHA straight through execute_command: redis-py's Script wrapper costs several us per
        # call on the hot path (argument tuples, an import, isinstance checks).
        client, sha = self.client, self._script.sha
        try:
            return client.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            # Redis restarted or SCRIPT FLUSH (on a cluster: a promoted replica): load, retry once.
            self._script.sha = sha = client.script_load(lua.PUBLISH)
            return client.execute_command("EVALSHA", sha, len(keys), *keys, *args)

    def publish_many(self, events: Iterable[ProjectEvent]) -> list[Cursor]:
        """Publish a burst in one pipelined round trip; cursors come back in the input order.

        Every event is validated before anything is sent. Events of one project keep their
        relative order and are appended by one script call per 500 events.
        """
        events = list(events)
        batches = self._settings.batches(events)
        if not batches:
            return []
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for batch in batches:
                    if self._cluster:
                        _queue_eval(pipe, batch)
                    else:
                        self._script(keys=batch.keys, args=batch.args, client=pipe)
                results = pipe.execute(raise_on_error=False)
            for index, fallback in _to_rerun(batches, results):
                results[index] = self._evalsha(fallback.keys, fallback.args)
        except _UNAVAILABLE as exc:
            raise PublisherUnavailable(f"Redis unavailable: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            raise PublishError(f"publish failed: {exc}") from exc
        return _collect(batches, results, len(events))

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
    ) -> None:
        import redis.asyncio.cluster

        is_cluster = isinstance(client, redis.asyncio.cluster.RedisCluster)
        self._settings = _Settings(
            prefix=prefix,
            retention=retention,
            idempotency_window=idempotency_window,
            sharded=is_cluster if sharded is None else sharded,
            retry_guard=retry_guard,
        )
        self.client = client
        self._cluster = is_cluster
        self._script = client.register_script(lua.PUBLISH)
        self._direct = AsyncDirectCommands(client) if AsyncDirectCommands.supports(client) else None

    @classmethod
    def from_url(cls, url: str, **kwargs) -> AsyncPublisher:
        kwargs.setdefault("sharded", is_cluster_url(url))
        return cls(async_client(url), **kwargs)

    async def publish(self, event: ProjectEvent, *, idempotency_key: str | None = None) -> Cursor:
        """See :meth:`Publisher.publish`."""
        batch = self._settings.single(event, idempotency_key)
        try:
            try:
                result = await self._evalsha(batch.keys, batch.args)
            except redis.exceptions.ResponseError as exc:
                fallback = _unguarded_or_raise(batch, exc)
                result = await self._evalsha(fallback.keys, fallback.args)
        except _UNAVAILABLE as exc:
            raise PublisherUnavailable(f"Redis unavailable: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            raise PublishError(f"publish failed: {exc}") from exc
        return batch.cursors(result)[0]

    async def _evalsha(self, keys: list[str], args: list) -> list:
        # See Publisher._evalsha.
        direct = self._direct
        if direct is not None:
            try:
                return await direct.execute(
                    pack_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
                )
            except (redis.exceptions.NoScriptError, *_UNAVAILABLE):
                pass
        client, sha = self.client, self._script.sha
        try:
            return await client.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self._script.sha = sha = await client.script_load(lua.PUBLISH)
            return await client.execute_command("EVALSHA", sha, len(keys), *keys, *args)

    async def publish_many(self, events: Iterable[ProjectEvent]) -> list[Cursor]:
        """See :meth:`Publisher.publish_many`."""
        events = list(events)
        batches = self._settings.batches(events)
        if not batches:
            return []
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for batch in batches:
                    if self._cluster:
                        _queue_eval(pipe, batch)
                    else:
                        await self._script(keys=batch.keys, args=batch.args, client=pipe)
                results = await pipe.execute(raise_on_error=False)
            for index, fallback in _to_rerun(batches, results):
                results[index] = await self._evalsha(fallback.keys, fallback.args)
        except _UNAVAILABLE as exc:
            raise PublisherUnavailable(f"Redis unavailable: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            raise PublishError(f"publish failed: {exc}") from exc
        return _collect(batches, results, len(events))

    async def aclose(self) -> None:
        if self._direct is not None:
            await self._direct.aclose()
        await self.client.aclose()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
