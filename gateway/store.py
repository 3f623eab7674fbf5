"""Reads of project history (the Redis streams) for subscribes, gap repair and polling.

Snapshots are batched: every read requested while earlier ones are in flight goes out in the next
pipeline (at most ``SNAPSHOT_BATCH`` per pipeline, ``SNAPSHOT_PIPELINES`` pipelines at once). A
reconnect storm, thousands of clients resuming in the same second, then costs a few dozen round
trips on a few connections. One call per client would hold one pooled connection per waiting
client, and redis-py's pool refuses more than ``max_connections`` (100 by default) with "Too many
connections", which turned a storm into a wave of ``unavailable`` errors. On Redis Cluster the
reads stay one call each (the slots live on different nodes), bounded by a semaphore per master
instead: a hung master holds the reads of its own projects until their bound, never the reads of
the projects the other masters serve (:class:`redisconn.node_limits.NodeLimits`).

Every value read is checked by :mod:`schemas.stored` before it is used, but for the frames of a
project that this pod already checked (:attr:`HistoryStore.checked`, the hub's resume windows):
an entry holding exactly those bytes at that seq is not checked twice. A foreign value (written
by someone else than the event bus) is skipped, counted in ``eventbus_foreign_values_total`` and
logged once per key (:class:`ForeignValues`); a project whose metadata is unreadable raises
:class:`ProjectUnreadable` for that project only.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Collection, Sequence

import redis.asyncio
import redis.asyncio.cluster
import redis.exceptions

from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.sequencing import Snapshot
from redisconn.node_limits import NodeLimits, node_name, node_unanswered
from schemas import lua
from schemas.history import (
    NO_HISTORY_TTL_MS,
    SnapshotUnreadable,
    parse_snapshot_reply,
    snapshot_args,
)
from schemas.keys import Keys, new_epoch
from schemas.stored import (
    CheckedFrames,
    ForeignKind,
    ForeignValue,
    Meta,
    parse_meta,
)

__all__ = ["ForeignValues", "HistoryStore", "ProjectUnreadable", "StoreUnavailable"]

log = get_logger("gateway.store")


class StoreUnavailable(Exception):
    """Redis did not answer a history read."""


class ProjectUnreadable(StoreUnavailable):
    """The project's metadata in Redis is not what the event bus writes (a key of the wrong type,
    an invalid epoch or seq): the project cannot be followed until an operator repairs or deletes
    the key. Only this project is affected."""

    def __init__(self, project_id: int, key: str, problem: str) -> None:
        super().__init__(f"project {project_id}: {key} {problem}")
        self.project_id = project_id
        self.key = key
        self.problem = problem


class ForeignValues:
    """Counts every foreign value read from Redis, and logs it once per key.

    Each value is counted in ``eventbus_foreign_values_total{kind}``. The first one of each key
    is logged at warning level, with the key and the problem; the others of the same key are not
    (a poisoned key is read again on every access). At most ``MAX_KEYS`` keys are remembered;
    past that the memory is emptied and keys may be logged once more, so a writer flooding Redis
    with garbage costs at most one log line per key and per ``MAX_KEYS`` keys.
    """

    MAX_KEYS = 10_000

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._logged: set[tuple[str, str]] = set()

    def report(
        self,
        kind: ForeignKind,
        key: str,
        problem: str,
        project_id: int,
        sample: object = None,
        count: int = 1,
    ) -> None:
        """``count`` foreign values of ``kind`` found under ``key``."""
        self.metrics.foreign_values[kind.value] += count
        if (kind.value, key) in self._logged:
            return
        if len(self._logged) >= self.MAX_KEYS:
            self._logged.clear()
        self._logged.add((kind.value, key))
        details = {}
        if isinstance(sample, bytes | bytearray):
            details["sample"] = bytes(sample[:80]).decode("utf-8", "replace")
        log.warning(
            "skipped a value the event bus did not write",
            kind=kind.value,
            key=key,
            project_id=project_id,
            problem=problem,
            **details,
        )


#: Snapshot reads per pipeline, and pipelines in flight at once (standalone Redis).
SNAPSHOT_BATCH = 200
SNAPSHOT_PIPELINES = 4
#: Seconds each master of a Redis Cluster has to answer a :meth:`HistoryStore.cursors` call
#: (under the hub's ``RECONCILE_TIMEOUT``, 5 s, so that the masters that answer are used).
CLUSTER_CURSORS_TIMEOUT = 4.0
#: Snapshot calls in flight at once per master of a Redis Cluster (below redis-py's pool size
#: per node).
CLUSTER_CONCURRENCY = 64

_Request = tuple[list[str], list, "asyncio.Future[list]"]


class HistoryStore:
    """Atomic snapshots of projects' cursors and history, through the ``SNAPSHOT`` script."""

    def __init__(
        self, client: redis.asyncio.Redis, keys: Keys, foreign: ForeignValues | None = None
    ) -> None:
        self.client = client
        self.keys = keys
        self.foreign = foreign if foreign is not None else ForeignValues(Metrics())
        #: The frames of a project this pod has already checked (the hub's resume window), asked
        #: for when a read's reply is parsed: entries holding the same bytes are not checked
        #: again (:class:`schemas.stored.CheckedFrames`). None: every entry is checked.
        self.checked: Callable[[int], CheckedFrames | None] | None = None
        self._snapshot = client.register_script(lua.SNAPSHOT)
        self._cluster = isinstance(client, redis.asyncio.cluster.RedisCluster)
        self._queue: collections.deque[_Request] = collections.deque()
        self._senders: set[asyncio.Task] = set()
        self._cluster_slots = NodeLimits(client, CLUSTER_CONCURRENCY)

    async def snapshot(
        self,
        project_id: int,
        epoch: str | None = None,
        after: int | None = None,
        limit: int = 0,
        *,
        max_bytes: int = 0,
    ) -> Snapshot:
        """The project's ``(epoch, top)`` and, when ``epoch`` is current and ``after`` is behind,
        up to ``limit`` entries after ``after``. A project without history gets one that expires
        after ``NO_HISTORY_TTL_MS`` unless something is published (``lua.SNAPSHOT``).

        With ``max_bytes`` (a poll's page), the entries stop before the one that would take them
        past that many bytes, but are never none while the stream holds one after ``after``: a
        read cut short so ends before the top, as one cut by ``limit`` does. Reads whose caller
        needs every entry up to ``limit`` (subscribes, feeds) pass none.

        Raises :class:`ProjectUnreadable` when the project's keys hold foreign values,
        :class:`StoreUnavailable` when Redis does not answer. Foreign stream entries are left
        out (``Snapshot.corrupt_at`` says where the first one was)."""
        keys = [self.keys.meta(project_id), self.keys.stream(project_id)]
        args = snapshot_args(epoch, after, limit, new_epoch(), max_bytes)
        try:
            if self._cluster:
                async with self._cluster_slots.for_key(keys[0]):
                    reply = await self._snapshot(keys=keys, args=args)
            else:
                reply = await self._batched(keys, args)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return self._parse_snapshot(project_id, reply)

    def _parse_snapshot(self, project_id: int, reply: object) -> Snapshot:
        """The reply read by :func:`schemas.history.parse_snapshot_reply` (shared with the
        publisher's HTTP API), its foreign values reported here."""
        checked = self.checked(project_id) if self.checked is not None else None
        try:
            snapshot, foreign = parse_snapshot_reply(project_id, reply, checked)
        except SnapshotUnreadable as exc:
            # A reply of another shape (a server or proxy that is not Redis, or broken) is one
            # more way of not answering; a damaged key makes this project unreadable.
            if exc.which is None or exc.kind is None:
                raise StoreUnavailable(str(exc)) from None
            key = (
                self.keys.meta(project_id) if exc.which == "meta" else self.keys.stream(project_id)
            )
            self.foreign.report(exc.kind, key, exc.problem, project_id)
            raise ProjectUnreadable(project_id, key, exc.problem) from None
        stream_key = self.keys.stream(project_id)
        for _seq, value in foreign:
            self.foreign.report(value.kind, stream_key, value.problem, project_id)
        return snapshot

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

    async def cursors(
        self,
        project_ids: Sequence[int],
        keep_alive: Collection[int] = (),
        make_permanent: Collection[int] = (),
    ) -> list[Meta | StoreUnavailable | None]:
        """The cursor of each project: its :class:`Meta`, ``None`` where it has no history, or
        :class:`ProjectUnreadable` where its metadata is foreign (that project only: one bad key
        never hides the others). Raises :class:`StoreUnavailable` when Redis does not answer.

        On Redis Cluster each master is asked on its own, within ``CLUSTER_CURSORS_TIMEOUT``:
        the projects of a master that does not answer get a :class:`StoreUnavailable` (not a
        :class:`ProjectUnreadable`) in their place, the others their cursor; only when no
        master answers does the call raise. (One pipeline for all held every project's cursor
        behind a hung master.)

        The projects of ``keep_alive`` (followed, nothing published yet) have the lifetime of
        their empty history renewed (``PEXPIRE ... XX``: only a history that expires), so a
        subscription that waits for a first event longer than ``NO_HISTORY_TTL_MS`` keeps its
        cursor. The projects of ``make_permanent`` (they hold events) lose any lifetime a read
        gave their history before the first publish (``PERSIST``; a no-op otherwise)."""
        if not project_ids:
            return []
        if not self._cluster:
            return await self._cursors(project_ids, keep_alive, make_permanent)
        keep, permanent = set(keep_alive), set(make_permanent)
        groups: dict[str | None, list[int]] = {}
        for project_id in project_ids:
            groups.setdefault(node_name(self.client, self.keys.meta(project_id)), []).append(
                project_id
            )

        async def ask(ids: list[int]) -> list[Meta | StoreUnavailable | None]:
            try:
                async with asyncio.timeout(CLUSTER_CURSORS_TIMEOUT):
                    return await self._cursors(
                        ids, [p for p in ids if p in keep], [p for p in ids if p in permanent]
                    )
            except TimeoutError:
                raise StoreUnavailable(
                    f"no answer from Redis within {CLUSTER_CURSORS_TIMEOUT:g} s"
                ) from None

        outcomes = await asyncio.gather(
            *(ask(ids) for ids in groups.values()), return_exceptions=True
        )
        found: dict[int, Meta | StoreUnavailable | None] = {}
        for ids, outcome in zip(groups.values(), outcomes, strict=True):
            if isinstance(outcome, StoreUnavailable):
                found.update(dict.fromkeys(ids, outcome))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                found.update(zip(ids, outcome, strict=True))
        if all(isinstance(outcome, StoreUnavailable) for outcome in outcomes):
            raise outcomes[0]  # type: ignore[misc]
        return [found[project_id] for project_id in project_ids]

    async def _cursors(
        self,
        project_ids: Sequence[int],
        keep_alive: Collection[int],
        make_permanent: Collection[int],
    ) -> list[Meta | StoreUnavailable | None]:
        """:meth:`cursors` in one pipeline."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for project_id in project_ids:
                    pipe.hmget(self.keys.meta(project_id), "epoch", "seq")
                for project_id in keep_alive:
                    pipe.pexpire(self.keys.meta(project_id), NO_HISTORY_TTL_MS, xx=True)
                for project_id in make_permanent:
                    pipe.persist(self.keys.meta(project_id))
                rows = await pipe.execute(raise_on_error=False)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        out: list[Meta | StoreUnavailable | None] = []
        for project_id, row in zip(project_ids, rows[: len(project_ids)], strict=True):
            key = self.keys.meta(project_id)
            if isinstance(row, redis.exceptions.ResponseError):
                problem = "is not a hash" if "WRONGTYPE" in str(row) else str(row)[:80]
            elif isinstance(row, BaseException):
                raise StoreUnavailable(str(row)) from row
            elif not (isinstance(row, list) and len(row) == 2):  # not Redis's HMGET reply
                raise StoreUnavailable(f"unexpected HMGET reply: {str(row)[:80]}")
            else:
                try:
                    out.append(parse_meta(*row))
                    continue
                except ForeignValue as exc:
                    problem = exc.problem
            self.foreign.report(ForeignKind.META, key, problem, project_id)
            out.append(ProjectUnreadable(project_id, key, problem))
        return out

    async def ping(self, within: float | None = None) -> bool:
        """Redis answers a ``PING`` (within ``within`` seconds). On Redis Cluster, a majority of
        its masters do, each asked on its own: one hung or failed master must not make every pod
        unready at once (the other shards are served), a pod cut off from most of them is."""
        if self._cluster:
            masters = self.client.get_primaries()
            if masters:
                answers = await asyncio.gather(*(self._ping(node, within) for node in masters))
                return 2 * sum(answers) > len(masters)
        return await self._ping(None, within)

    async def _ping(self, node: object, within: float | None) -> bool:
        try:
            async with asyncio.timeout(within):
                if node is None:
                    return bool(await self.client.ping())
                return bool(await self.client.ping(target_nodes=node))
        except TimeoutError:
            # Cut off by our bound, the PING's error is never seen by redis-py, which reloads
            # its slot map only after errors it sees: a master failed over to its replica
            # stayed in the map, asked by every probe and its replica never, and an idle pod
            # (nothing else to show redis-py an error) with another master hung was unready
            # for good. The next call reloads the map, this node last.
            if node is not None:
                node_unanswered(self.client, getattr(node, "name", None))
            return False
        except (redis.exceptions.RedisError, OSError):
            return False
