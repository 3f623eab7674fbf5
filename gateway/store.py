"""Reads of project history (the Redis streams) for subscribes, gap repair and polling.

Snapshots are batched: every read requested while earlier ones are in flight goes out in the next
pipeline (at most ``SNAPSHOT_BATCH`` per pipeline, ``SNAPSHOT_PIPELINES`` pipelines at once). A
reconnect storm, thousands of clients resuming in the same second, then costs a few dozen round
trips on a few connections. One call per client would hold one pooled connection per waiting
client, and redis-py's pool refuses more than ``max_connections`` (100 by default) with "Too many
connections", which turned a storm into a wave of ``unavailable`` errors. On Redis Cluster the
reads stay one call each (the slots live on different nodes), bounded by a semaphore instead.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence

import redis.asyncio
import redis.asyncio.cluster
import redis.exceptions

from gateway.sequencing import Snapshot
from publisher.core import new_epoch
from schemas import lua
from schemas.keys import Keys, stream_entry_seq

__all__ = ["HistoryStore", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """Redis did not answer a history read."""


#: Snapshot reads per pipeline, and pipelines in flight at once (standalone Redis).
SNAPSHOT_BATCH = 200
SNAPSHOT_PIPELINES = 4
#: Snapshot calls in flight at once on Redis Cluster (below redis-py's pool size per node).
CLUSTER_CONCURRENCY = 64

_Request = tuple[list[str], list, "asyncio.Future[list]"]


class HistoryStore:
    """Atomic snapshots of projects' cursors and history, through the ``SNAPSHOT`` script."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._snapshot = client.register_script(lua.SNAPSHOT)
        self._cluster = isinstance(client, redis.asyncio.cluster.RedisCluster)
        self._queue: collections.deque[_Request] = collections.deque()
        self._senders: set[asyncio.Task] = set()
        self._cluster_slots = asyncio.Semaphore(CLUSTER_CONCURRENCY)

    async def snapshot(
        self, project_id: int, epoch: str | None = None, after: int | None = None, limit: int = 0
    ) -> Snapshot:
        """The project's ``(epoch, top)`` and, when ``epoch`` is current and ``after`` is behind,
        up to ``limit`` entries after ``after``. Creates the history if it does not exist."""
        keys = [self.keys.meta(project_id), self.keys.stream(project_id)]
        args = [new_epoch(), epoch or "", -1 if after is None else after, limit]
        try:
            if self._cluster:
                async with self._cluster_slots:
                    reply = await self._snapshot(keys=keys, args=args)
            else:
                reply = await self._batched(keys, args)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        raw_epoch, top, created, raw_entries = reply
        entries = [(stream_entry_seq(entry_id), _frame(fields)) for entry_id, fields in raw_entries]
        return Snapshot(raw_epoch.decode(), int(top), entries, bool(created))

    def _batched(self, keys: list[str], args: list) -> asyncio.Future[list]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list] = loop.create_future()
        self._queue.append((keys, args, future))
        if len(self._senders) < SNAPSHOT_PIPELINES:
            task = loop.create_task(self._send_batches())
            self._senders.add(task)
            task.add_done_callback(self._senders.discard)
        return future

    async def _send_batches(self) -> None:
        """Send queued snapshots, one pipeline at a time, until the queue is empty."""
        try:
            await self._drain_queue()
        finally:
            # Leave the sender set now, not in a done-callback one loop iteration later: a caller
            # woken by our last results may enqueue at once and must then see room for a sender.
            self._senders.discard(asyncio.current_task())

    async def _drain_queue(self) -> None:
        queue = self._queue
        while queue:
            batch: list[_Request] = []
            while queue and len(batch) < SNAPSHOT_BATCH:
                request = queue.popleft()
                if not request[2].done():  # not cancelled meanwhile (subscribe timed out)
                    batch.append(request)
            if not batch:
                continue
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for keys, args, _ in batch:
                        # EVAL, not EVALSHA: Redis finds the compiled script by its hash, and a
                        # restarted Redis that lost its script cache needs no second attempt.
                        pipe.execute_command("EVAL", lua.SNAPSHOT, len(keys), *keys, *args)
                    results = await pipe.execute(raise_on_error=False)
            except (redis.exceptions.RedisError, OSError) as exc:
                results = [exc] * len(batch)
            except BaseException:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(StoreUnavailable("history read cancelled"))
                raise
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def cursors(self, project_ids: Sequence[int]) -> list[tuple[str | None, int | None]]:
        """``(epoch, top)`` of each project, ``(None, None)`` where its history is missing."""
        if not project_ids:
            return []
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for project_id in project_ids:
                    pipe.hmget(self.keys.meta(project_id), "epoch", "seq")
                rows = await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return [
            (epoch.decode(), int(seq)) if epoch is not None and seq is not None else (None, None)
            for epoch, seq in rows
        ]

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (redis.exceptions.RedisError, OSError):
            return False


def _frame(fields: list[bytes] | dict) -> bytes:
    # XRANGE inside a script returns a flat [field, value, ...] list.
    if isinstance(fields, dict):
        return fields[b"f"]
    return fields[fields.index(b"f") + 1]
