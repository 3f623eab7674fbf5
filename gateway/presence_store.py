"""Presence against Redis: :class:`PresenceStore` (the Redis calls, batched) and
:class:`PresenceService` (the loops that run :class:`gateway.presence.PresenceCore` with them).

Cost per pod (docs/presence.md has the formulas): one pipeline per ``flush_interval`` when
something changed, with one script call per changed project; one pipeline per
``refresh_interval`` with one script call per project the pod has members in or watches; one
read per project when a subscriber first needs it or an announcement was missed (a view
outlives its last subscriber by ``view_linger``, a diff interval, so subscribing in a loop
costs one read per interval). Nothing is sent per connection. On Redis Cluster each of those
pipelines is one per master that owns some of its projects (one per ``PIPELINE_CALLS`` calls
there), each master in a lane of its own (:class:`MasterLanes`): a master that is down or hangs
fails only its own projects' presence (see :class:`PresenceStore`), and delays no other
master's writes or refreshes.

Bounds, with the defaults (all settable on :class:`PresenceService`):

* A pod's records live ``ttl`` = 10 s past its last refresh (every ``refresh_interval`` = 3 s).
* A SIGKILLed pod's members leave every view within ttl + 3 x refresh_interval + diff_interval
  = 20 s (other pods drop a pod after missing it from three refresh reports in a row: fewer
  would show a Redis flush or restart as everyone leaving and joining again).
* A drained pod (SIGTERM, rolling restart) keeps its members for ``drain_grace`` = 15 s: a client
  that reconnects to another pod within it never appears to leave.
* A closed tab is written within ``flush_interval`` = 0.1 s and reaches subscribers at the next
  diff, within ``diff_interval`` = 1 s.
* An announcement carries at most ``max_announcement`` = 256 KiB of records; a larger write is
  announced without them and the pods watching the project read it (Redis closes a pub/sub
  connection that queues past its output buffer limit, with every project's events on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import redis.asyncio
import redis.asyncio.cluster
import redis.exceptions

from gateway.logs import describe, get_logger
from gateway.presence import PresenceCore, SessionKey, Write
from gateway.tasks import spawn
from redisconn.node_limits import NodeLimits, node_name, node_unanswered
from schemas.keys import Keys
from schemas.presence import (
    DEFAULT_MAX_ANNOUNCEMENT,
    DEFAULT_MAX_MEMBERS,
    MAX_ANNOUNCEMENT_LIMIT,
    MAX_TTL_MS,
    READ,
    REFRESH,
    WRITE,
    MalformedAnnouncement,
    MalformedReadReply,
    OversizedAnnouncement,
    PodState,
    encode_record,
    parse_announcement,
    parse_read_reply,
    parse_versions,
    read_args,
    read_left_out,
    read_limit,
)
from schemas.protocol import encode
from serverkit import LogThrottle

__all__ = ["DIGEST_EVERY", "MasterLanes", "PresenceService", "PresenceStore", "new_pod_id"]

log = get_logger("gateway.presence")

#: Deliver one encoded message to some sessions (the gateway's fan-out; must not block).
Deliver = Callable[[Sequence[SessionKey], bytes], None]
#: Told ``(project_id, keys)`` when a write or refresh deleted index keys of another type in a
#: project (another writer's; the pods rebuild them), or removed pods whose deadline no pod can
#: have set (beyond now + ``MAX_TTL_MS``; counted one per pod): the gateway counts them.
OnRepaired = Callable[[int, int], None]
#: Told ``(project_id, n)`` when ``n`` of this pod's writes of a project were announced without
#: their records (more than ``max_announcement`` bytes of them): each costs every pod that
#: watches the project a read of it. The gateway counts them.
OnUnannounced = Callable[[int, int], None]
#: Told ``(project_id, n)`` when a read or an announcement of a project held more members or
#: pods than pods can have written (``schemas.presence.read_limit``, ``listed_limit``): ``n``
#: pods, members or announcements left out. Another writer's: the gateway counts them.
OnLeftOut = Callable[[int, int], None]

#: Presence reads (:data:`~schemas.presence.READ`, one call each) in flight at once per pod (per
#: master on Redis Cluster: :class:`redisconn.node_limits.NodeLimits`); the others wait their
#: turn. Every Redis call of the gateway takes a connection of one pool (redis-py's, 100 at most,
#: past which it refuses "Too many connections"): a read per ``presence_get`` or presence
#: subscribe of a project not in memory, 300 of them at once (a reconnect storm of dashboards),
#: took the pool, and the history reads, polls and readiness checks made meanwhile failed as if
#: Redis were down.
PRESENCE_READS = 16

#: A project's refresh checks this pod's records in Redis by content (their digest: another
#: writer's record put in place of one, or changed) at every this many refreshes (30 s at the
#: default 3 s interval), and by number at every one: Redis hashes each record to compare
#: (~1.8 µs), which at every refresh would take a million records' Redis 60 % of its time.
DIGEST_EVERY = 10

#: On Redis Cluster, the most script calls of a write or refresh sent to one master in one
#: pipeline; more go in further pipelines, one after the other, each within
#: :attr:`PresenceStore.group_timeout` (the pod's lane of that master has no bound in all: each
#: pipeline that answered counts, also when a later one is cut off). A healthy master answers
#: this many in well under that bound (3,000 took 1.4 s on a test machine, with three
#: masters' replies read at once), so only one that hangs, or is overloaded, fails its
#: projects; one pipeline for all of a master's projects was cut off every round for a pod
#: with thousands of them there.
PIPELINE_CALLS = 256

#: Redis Cluster, outside the lanes (a drain): the most times one write or refresh is sent,
#: to the master the slot map names each time, while its slot keeps moving away before it is
#: sent (:meth:`PresenceService._drain_masters`): each round waits for every master's part of
#: it, so a drain is bounded by this many rounds, each of one master's writes and refresh
#: (each pipeline within the store's bound).
MOVED_ROUNDS = 3

#: The per-project outcome of a write or a refresh that did not apply: the error Redis answered
#: for that project alone (``ResponseError``: its keys are unusable), or, on Redis Cluster, the
#: failure of the master that owns the project's slot (``ConnectionError``, ``TimeoutError``:
#: it is down or did not answer within :attr:`PresenceStore.group_timeout`).
ProjectFailure = redis.exceptions.RedisError


class _Moved:
    def __repr__(self) -> str:
        return "MOVED"


#: Redis Cluster: the outcome of a call made for one master (``at`` of
#: :meth:`PresenceStore.write`, :meth:`PresenceStore.refresh`) that was not sent, because when
#: its pipeline was to be sent the slot map named another master for its project (a re-shard,
#: a failover). Not a failure of anything: the caller sends it again, to its new master.
MOVED: Any = _Moved()

#: ``at`` of :meth:`PresenceStore.write` and :meth:`PresenceStore.refresh`: every call goes to
#: the master that owns its project.
ANYWHERE: Any = object()


class ChannelLink(Protocol):
    """A pub/sub connection someone else owns (the gateway's :class:`gateway.pubsub.PubSubLink`
    or its cluster counterpart) that presence channels can ride on: the owner routes their
    messages to :meth:`PresenceService.on_message` and calls
    :meth:`PresenceService.reread_all` after it resubscribed."""

    async def subscribe(self, channel: bytes) -> None:
        """Subscribe and return once Redis confirmed it."""

    async def unsubscribe(self, channel: bytes) -> None: ...


def new_pod_id() -> str:
    """A new pod id: random per process start, so a restarted pod never inherits a dead one's
    records (they expire on their own)."""
    return secrets.token_urlsafe(9)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


class PresenceStore:
    """The Redis calls of one pod's presence. Each method is one round trip (a pipeline) on a
    standalone Redis; on Redis Cluster, :meth:`write` and :meth:`refresh` send one pipeline per
    master that owns some of the projects (one per :data:`PIPELINE_CALLS` calls there, one
    after the other), concurrently, each within ``group_timeout``: a master
    that is down or hangs fails its own projects only (their outcome is the error), and the
    call raises only when no master answered. (One pipeline for all held every project's
    presence behind one hung master.)"""

    def __init__(
        self,
        client: Any,
        pod_id: str,
        *,
        keys: Keys | None = None,
        ttl: float = 10.0,
        publish_command: str = "PUBLISH",
        on_repaired: OnRepaired | None = None,
        max_members: int = DEFAULT_MAX_MEMBERS,
        on_left_out: OnLeftOut | None = None,
        group_timeout: float = 1.0,
    ) -> None:
        self.client = client
        #: Seconds each master of a Redis Cluster has to answer its part of a write or refresh.
        self.group_timeout = group_timeout
        self.on_repaired = on_repaired
        self.on_left_out = on_left_out
        self.max_members = max_members
        self.pod_id = pod_id
        self.keys = keys or Keys()
        self.ttl_ms = round(ttl * 1000)
        self.publish_command = publish_command
        self._read = client.register_script(READ)
        self._reads = NodeLimits(client, PRESENCE_READS)
        self._shas = {text: hashlib.sha1(text.encode()).hexdigest() for text in (WRITE, REFRESH)}
        self._cluster = isinstance(client, redis.asyncio.cluster.RedisCluster)
        #: On Redis Cluster, one master failing must not fail the calls of the others.
        self.per_master = self._cluster
        #: Commands sent and round trips made: what the cost bounds count. A round trip is one
        #: pipeline (or read): on Redis Cluster a write or refresh makes one per master its
        #: projects live on (one per :data:`PIPELINE_CALLS` calls there), sent concurrently.
        self.commands = 0
        self.round_trips = 0

    def master_of(self, project_id: int) -> str | None:
        """The master (``host:port``) of the project's slot on Redis Cluster; None on a
        standalone Redis, or before the client loaded the slot map."""
        return node_name(self.client, self.keys.presence_pods(project_id))

    def _keys(self, project_id: int) -> list[str]:
        return [self.keys.presence_pods(project_id), self.keys.presence_versions(project_id)]

    async def write(
        self, writes: Sequence[Write], *, at: Any = ANYWHERE
    ) -> list[bool | ProjectFailure]:
        """Apply writes (one script call each, one pipeline; on a cluster one per master); per
        write, whether it was applied (False: Redis had lost this pod's records, so it must be
        written whole), or the :data:`ProjectFailure` of that project alone (the error Redis
        answered for it, or its master's failure on a cluster: not known to be applied), or,
        with ``at`` (a master, on a cluster), :data:`MOVED` (not sent: see :meth:`_calls`).
        Index keys of another type that a write deleted are reported to ``on_repaired``."""
        if not writes:
            return []
        calls = []
        for w in writes:
            args: list[Any] = [
                self.keys.presence_pod_prefix(w.project_id),
                self.pod_id,
                self.ttl_ms,
                w.base,
                w.version,
                self.publish_command,
                self.keys.presence_channel(w.project_id),
                "1" if w.announce else "0",
            ]
            for member_id, record in w.changes.items():
                args += [member_id, b"" if record is None else encode_record(record)]
            calls.append((WRITE, self._keys(w.project_id), args))
        replies = await self._calls(calls, at)
        out: list[bool | ProjectFailure] = []
        for w, reply in zip(writes, replies, strict=True):
            if reply is MOVED or isinstance(reply, redis.exceptions.RedisError):
                out.append(reply)
            else:
                applied, repaired = reply
                self._repaired(w.project_id, repaired)
                out.append(int(applied) == 1)
        return out

    async def refresh(
        self,
        plan: Mapping[int, int | None],
        ttl_ms: int | None = None,
        *,
        at: Any = ANYWHERE,
        counts: Mapping[int, tuple[int, int]] | None = None,
    ) -> dict[int, tuple[bool, dict[str, int]] | ProjectFailure]:
        """Keep this pod's records alive in the projects mapped to a version (None: only watch
        the project) and report each project's live pods: project -> (ok, pod -> version), or
        the :data:`ProjectFailure` of that project alone (the error Redis answered for it, or
        its master's failure on a cluster), or, with ``at`` (a master, on a cluster),
        :data:`MOVED` (not sent: see :meth:`_calls`). Index keys of another type that a
        refresh deleted are reported to ``on_repaired``. ``counts``: how many records the pod
        has stored in some of the projects, and their digest
        (:meth:`PresenceCore.refresh_counts`): a project whose records there are not as many,
        or not those, is answered not ok (written whole again), and counted to
        ``on_repaired``."""
        if not plan:
            return {}
        counts = counts or {}
        ttl_ms = self.ttl_ms if ttl_ms is None else ttl_ms
        calls = []
        projects = list(plan)
        for project_id in projects:
            version = plan[project_id]
            args = [
                self.keys.presence_pod_prefix(project_id),
                "" if version is None else self.pod_id,
                ttl_ms,
                version or 0,
                *counts.get(project_id, ("", "")),
            ]
            calls.append((REFRESH, self._keys(project_id), args))
        replies = await self._calls(calls, at)
        out: dict[int, tuple[bool, dict[str, int]] | ProjectFailure] = {}
        for project_id, reply in zip(projects, replies, strict=True):
            if reply is MOVED or isinstance(reply, redis.exceptions.RedisError):
                out[project_id] = reply
            else:
                ok, flat, repaired = reply
                self._repaired(project_id, repaired)
                out[project_id] = (ok == 1, parse_versions(flat))
        return out

    async def read(self, project_id: int) -> dict[str, PodState]:
        """A project's presence on every live pod, read atomically. At most
        :data:`PRESENCE_READS` run at once (per master on Redis Cluster); the others wait
        (callers bound the wait). Pods and members past what pods can have written
        (``read_limit(max_members)``) are left out in Redis, and counted to ``on_left_out``. A
        reply the script cannot have given raises ``redis.exceptions.InvalidResponse`` (a
        ``RedisError``, as when Redis does not answer)."""
        keys = self._keys(project_id)
        async with self._reads.for_key(keys[0]):
            reply = await self._read(
                keys=keys,
                args=read_args(self.keys.presence_pod_prefix(project_id), self.max_members),
            )
        self._count(1)
        try:
            left_out = read_left_out(reply)
            pods = parse_read_reply(reply)
        except MalformedReadReply as exc:  # not Redis, or a broken one: as if it did not answer
            raise redis.exceptions.InvalidResponse(str(exc)) from None
        if left_out and self.on_left_out is not None:
            self.on_left_out(project_id, left_out)
        return pods

    async def _calls(self, calls: list[tuple[str, list, list]], at: Any = ANYWHERE) -> list:
        """Run script calls and return their replies, a call's :data:`ProjectFailure` in its
        place. Standalone: one pipeline, which raises when Redis fails. Cluster: one pipeline
        per master (the master the slot map names for the call's first key: a project's keys
        share its slot), concurrently, each within :attr:`group_timeout`; a master with more
        than :data:`PIPELINE_CALLS` calls gets them in pipelines of that many, one after the
        other, each within that bound. A master that fails or does not answer gives its calls
        not answered yet its error (a ``RedisError``; the ones after are not sent), and only
        when no master answered any does this raise.

        With ``at`` (a master's name, or None for the calls the slot map names no master for),
        on a cluster: one master's calls only, in pipelines as above, each sent with the calls
        the slot map names ``at`` for right before it is sent (redis-py routes each call by
        the map it has then); a call it names another master for is not sent, its outcome
        :data:`MOVED`, also when the master failed: a call not sent, beside or after the
        pipeline that failed, is MOVED, not given the failure (and the failure is not raised
        while a call was MOVED). A pod's lane of a master (:class:`MasterLanes`) so sends only
        there, whatever the map became since the lane took its calls."""
        if not self._cluster:
            replies = await self._pipeline(calls)
            self._count(len(calls))
            return replies

        def master_of(i: int) -> str | None:
            return node_name(self.client, calls[i][1][0])

        if at is ANYWHERE:
            groups = group_by_master(range(len(calls)), master_of)
        else:
            groups = [list(range(len(calls)))]
        parts = [chunks(indexes, PIPELINE_CALLS) for indexes in groups]
        sent = 0

        async def run(own: list[Sequence[int]]) -> list[tuple[Sequence[int], Any]]:
            """One master's pipelines, one after the other: the calls and the outcome of each
            (its replies, or the failure that it and the ones after it, not sent, get)."""
            nonlocal sent
            master = master_of(own[0][0]) if at is ANYWHERE else at  # (the map grouped by)
            outcomes: list[tuple[Sequence[int], Any]] = []
            for n, part in enumerate(own):
                if at is not ANYWHERE:
                    part = [i for i in part if master_of(i) == at]  # (the map now)
                    if not part:
                        continue
                sent += 1
                try:
                    async with asyncio.timeout(self.group_timeout):
                        outcomes.append((part, await self._pipeline([calls[i] for i in part])))
                        continue
                except TimeoutError:
                    # redis-py never saw this end: it is told, and reloads its slot map (a
                    # master failed over meanwhile is then no longer asked).
                    node_unanswered(self.client, master)
                    failure: Exception = redis.exceptions.TimeoutError(
                        f"no answer from the master within {self.group_timeout:g} s"
                    )
                except (redis.exceptions.RedisError, OSError) as exc:
                    failure = exc
                # The rest is not sent: it would wait for the master too. (With ``at``, a
                # call the map names another master for now is MOVED, not this one's failure.)
                outcomes.append((part, failure))
                for rest in own[n + 1 :]:
                    if at is not ANYWHERE:
                        rest = [i for i in rest if master_of(i) == at]
                    if rest:
                        outcomes.append((rest, failure))
                return outcomes
            return outcomes

        try:
            per_master = await asyncio.gather(*(run(own) for own in parts), return_exceptions=True)
        finally:
            self._count(len(calls), sent)
        ran: list[tuple[Sequence[int], Any]] = []
        for result in per_master:
            if isinstance(result, BaseException):
                raise result  # a bug, not a master's failure
            ran += result
        # The calls not sent (MOVED) are a group of their own that did not fail: the others'
        # failure is not raised for them, their new master is owed them.
        answered = {i for p, _ in ran for i in p}
        moved = [i for i in range(len(calls)) if i not in answered]
        if moved:
            ran.append((moved, [MOVED] * len(moved)))
        return spread_outcomes(len(calls), [p for p, _ in ran], [o for _, o in ran])

    async def _pipeline(self, calls: list[tuple[str, list, list]]) -> list:
        """Run script calls in one pipeline and return their replies, a call's error reply
        (``ResponseError``) in its place: one project's keys of the wrong type must not fail the
        calls of every other project in the pipeline. A lost connection raises.

        EVALSHA by the script's SHA, without redis-py's ``SCRIPT EXISTS`` before each pipeline;
        the calls Redis refuses with NOSCRIPT (it restarted, or ``SCRIPT FLUSH``) did not run:
        they run again once with the scripts loaded. On a cluster, EVAL: redis-py's cluster
        pipelines refuse EVALSHA, and EVAL also runs on a node that never saw the script (as
        the publisher does, publisher/client.py).
        """

        async def run(indexes: list[int]) -> list:
            pipe = self.client.pipeline(transaction=False)
            for i in indexes:
                text, keys, args = calls[i]
                if self._cluster:
                    pipe.execute_command("EVAL", text, len(keys), *keys, *args)
                else:
                    pipe.execute_command("EVALSHA", self._shas[text], len(keys), *keys, *args)
            return await pipe.execute(raise_on_error=False)

        replies = await run(list(range(len(calls))))
        missing = [
            i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)
        ]
        if missing:
            for text in {calls[i][0] for i in missing}:
                await self.client.script_load(text)
            for i, reply in zip(missing, await run(missing), strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception) and not isinstance(
                reply, redis.exceptions.ResponseError
            ):
                raise reply
        return replies

    def _repaired(self, project_id: int, keys: int) -> None:
        if keys and self.on_repaired is not None:
            self.on_repaired(project_id, int(keys))

    def _count(self, commands: int, round_trips: int = 1) -> None:
        self.commands += commands
        self.round_trips += round_trips


def group_by_master(
    calls: Sequence[Any], master_of: Callable[[Any], str | None]
) -> list[list[int]]:
    """The indexes of ``calls`` grouped by the master ``master_of`` names for each (None, the
    slot map not loaded yet, is a group of its own), in the order each master first appears."""
    groups: dict[str | None, list[int]] = {}
    for i, call in enumerate(calls):
        groups.setdefault(master_of(call), []).append(i)
    return list(groups.values())


def chunks(indexes: Sequence[int], size: int) -> list[Sequence[int]]:
    """``indexes`` in runs of at most ``size``, in order (one pipeline each)."""
    return [indexes[i : i + size] for i in range(0, len(indexes), size)]


def spread_outcomes(n: int, groups: Sequence[Sequence[int]], outcomes: Sequence[Any]) -> list:
    """The replies of ``n`` calls sent in ``groups`` (one pipeline each) whose pipelines ended
    with ``outcomes`` (a list of replies, or what the pipeline raised): each call's reply, or
    its group's failure (a ``RedisError``; an ``OSError`` is given as a ``ConnectionError``).
    Raises the first failure when every group failed, and anything but a ``RedisError`` or an
    ``OSError`` (a bug, a cancel) at once."""
    replies: list[Any] = [None] * n
    failures = []
    for indexes, outcome in zip(groups, outcomes, strict=True):
        if isinstance(outcome, OSError):
            outcome = redis.exceptions.ConnectionError(describe(outcome))
        if isinstance(outcome, redis.exceptions.RedisError):
            failures.append(outcome)
            for i in indexes:
                replies[i] = outcome
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            for i, reply in zip(indexes, outcome, strict=True):
                replies[i] = reply
    if failures and len(failures) == len(groups):
        raise failures[0]
    return replies


class MasterLanes:
    """Which Redis Cluster masters a pod may send a presence pipeline now (pure bookkeeping;
    :class:`PresenceService` runs it). Each master is a lane: at most one call of the pod
    (a refresh of its projects and the writes that follow, or writes) is outstanding there at
    a time, and the lanes do not wait for one another, so a master that hangs holds its own
    projects only, for the bound of the pipeline it was sent.

    A refresh that comes due for a master whose lane is busy is owed, once (not queued: a
    master that hangs through several refresh intervals is sent one refresh when it is free,
    whatever it missed); writes of its projects stay pending in the core meanwhile, merged
    into one write per project. So nothing piles up for a hung master but one flag."""

    def __init__(self) -> None:
        #: Masters with a call outstanding (None: the slot map does not name one yet).
        self.busy: set[str | None] = set()
        #: Masters whose refresh came due and was not sent yet.
        self.owed: set[str | None] = set()

    def refresh_due(self, masters: Iterable[str | None]) -> None:
        """A refresh interval ended: each of ``masters`` (those owning a project to refresh)
        is owed a refresh."""
        self.owed.update(masters)

    def is_free(self, master: str | None) -> bool:
        return master not in self.busy

    def start(self, with_writes: Iterable[str | None]) -> dict[str | None, bool]:
        """The lanes to start now: each free master owed a refresh or with writes in
        ``with_writes``, mapped to whether its call begins with that refresh. They are busy
        until :meth:`finish`."""
        started = {m: m in self.owed for m in {*self.owed, *with_writes} if m not in self.busy}
        self.busy.update(started)
        self.owed.difference_update(started)
        return started

    def finish(self, master: str | None) -> None:
        self.busy.discard(master)


#: Error replies about the node, not the project's keys: the cluster reconfiguring around a
#: master (CLUSTERDOWN, MASTERDOWN, TRYAGAIN while a slot moves, READONLY from a master demoted
#: in a failover). Its projects wait for the next refresh that reaches it, as for a master that
#: does not answer.
_NODE_REPLIES = (
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
)


def _retrieved(task: asyncio.Task) -> None:
    """A done callback that marks the task's exception retrieved (it is raised to whoever
    awaits the task; this only keeps asyncio from reporting it when nobody does)."""
    if not task.cancelled():
        task.exception()


def _as_redis_error(exc: BaseException) -> redis.exceptions.RedisError:
    """What a call raised as the failure of its projects (an ``OSError`` as a
    ``ConnectionError``, as :func:`spread_outcomes` gives it)."""
    if isinstance(exc, redis.exceptions.RedisError):
        return exc
    return redis.exceptions.ConnectionError(describe(exc))


def _answered(outcome: object) -> bool:
    """Whether a call's outcome came from the master it was sent to (a reply, or an error
    reply about the project's own keys), not MOVED (not sent) nor the node's failure."""
    if outcome is MOVED:
        return False
    return not isinstance(outcome, redis.exceptions.RedisError) or _keys_at_fault(outcome)


def _node_failure(outcome: object) -> bool:
    """Whether a write's or refresh's outcome is its master's failure (Redis Cluster: down,
    hung, or an error reply about the node), rather than a reply, MOVED or its keys' fault."""
    return isinstance(outcome, redis.exceptions.RedisError) and not _keys_at_fault(outcome)


def _keys_at_fault(outcome: object) -> bool:
    """Whether a write's or refresh's outcome is Redis refusing that project's own keys (an
    error reply the scripts did not foresee), rather than a success or its node's trouble."""
    return isinstance(outcome, redis.exceptions.ResponseError) and not isinstance(
        outcome, _NODE_REPLIES
    )


class PresenceService:
    """Presence for one gateway pod: the calls the connection lifecycle makes, and the loops.

    The gateway calls, for each connection (``session`` is any hashable naming it):

    * :meth:`join` when it subscribes to a project (token subject and display name),
      :meth:`activity` for an ``activity`` message, :meth:`leave` on unsubscribe or when a token
      refresh drops the project, :meth:`close_session` when the connection ends;
    * :meth:`subscribe` for ``subscribe`` with ``"presence": true`` (returns the ``presence``
      frame to send), :meth:`unsubscribe`, and :meth:`get` for ``presence_get``;
    * :meth:`start` once, :meth:`drain` on SIGTERM (records kept for ``drain_grace``).

    Diffs reach sessions through ``deliver(sessions, frame)``. Access control is the caller's:
    call these only for projects the connection's token allows.
    """

    def __init__(
        self,
        client: Any,
        deliver: Deliver,
        *,
        keys: Keys | None = None,
        pod_id: str | None = None,
        ttl: float = 10.0,
        refresh_interval: float = 3.0,
        flush_interval: float = 0.1,
        diff_interval: float = 1.0,
        drain_grace: float = 15.0,
        publish_command: str = "PUBLISH",
        listen: bool = True,
        link: ChannelLink | None = None,
        clock_ms: Callable[[], int] | None = None,
        on_repaired: OnRepaired | None = None,
        view_linger: float | None = None,
        max_members: int = DEFAULT_MAX_MEMBERS,
        on_left_out: OnLeftOut | None = None,
        max_announcement: int = DEFAULT_MAX_ANNOUNCEMENT,
        on_unannounced: OnUnannounced | None = None,
    ) -> None:
        if not refresh_interval * 2 < ttl:
            raise ValueError("ttl must exceed two refresh intervals")
        if not 0 <= max_announcement <= MAX_ANNOUNCEMENT_LIMIT:
            raise ValueError(f"max_announcement must be 0 to {MAX_ANNOUNCEMENT_LIMIT} bytes")
        if round(ttl * 1000) > MAX_TTL_MS or round(drain_grace * 1000) > MAX_TTL_MS:
            # a deadline further ahead is taken for another writer's: the pod for dead
            raise ValueError(f"ttl and drain_grace may not exceed {MAX_TTL_MS // 1000} s")
        self.keys = keys or Keys()
        self.pod_id = pod_id or new_pod_id()
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.pod_id):
            raise ValueError("pod_id must be 1 to 64 of A-Z a-z 0-9 _ -")
        self.store = PresenceStore(
            client,
            self.pod_id,
            keys=self.keys,
            ttl=ttl,
            publish_command=publish_command,
            on_repaired=self._repaired,
            max_members=max_members,
            on_left_out=self._left_out,
            # A third of an interval per pipeline: a hung master's lane is free again well
            # before the next refresh (and on a standalone Redis, unused: the round's bound).
            group_timeout=refresh_interval / 3,
        )
        #: Projects whose master (Redis Cluster) failed or did not answer at the last refresh
        #: or since: their writes wait for the next refresh that reaches it (which finds the
        #: records to write whole), so that a hung master holds one call per refresh interval,
        #: not every write round of the other masters' projects.
        self._unreachable: set[int] = set()
        #: Their masters (``host:port``): the writes and re-reads of the masters' other
        #: projects wait for the next refresh too (each would wait out the master's bound).
        self._failed_masters: set[str] = set()
        #: Re-reads of such projects, made after the next refresh that reaches their master.
        self._reread_later: set[int] = set()
        #: On Redis Cluster, one lane per master (:class:`MasterLanes`), and the tasks running
        #: their calls: a master that hangs holds its own lane only.
        self._lanes = MasterLanes()
        self._lane_tasks: set[asyncio.Task] = set()
        #: Projects with a write outstanding in a lane: their next write waits for its outcome,
        #: also when the project's slot moved to another master meanwhile (a re-shard, a
        #: failover), whose lane is free. Two writes of a project outstanding at once, both
        #: based on the same version, may be answered out of order: the later one refused (the
        #: earlier applied first), then the earlier one's success recorded, and the later
        #: one's changes (a leave) never written.
        self._writing: set[int] = set()
        #: Per master with a lane task, the writes it took and has not applied: pending again
        #: when the task ends (:meth:`_lane_done`), also when stop() cancelled it before its
        #: first step (its ``finally`` never runs then: drain() must still write them).
        self._lane_writes: dict[str | None, list[Write]] = {}
        self._on_repaired = on_repaired
        self._on_left_out = on_left_out
        self._on_unannounced = on_unannounced
        #: The most members of one pod, and the most pods, in a view or a read: twice
        #: ``max_members``, plus 64 (``read_limit``; in all, ``listed_limit``).
        self.most = read_limit(max_members)
        # A project's view outlives its last subscriber by a diff interval (None), so that
        # subscribing and unsubscribing in a loop costs one read per interval, not one each.
        linger = diff_interval if view_linger is None else view_linger
        self.core = PresenceCore(
            self.pod_id,
            clock_ms or (lambda: int(time.time() * 1000)),
            round(linger * 1000),
            self.most,
            max_announcement,
        )
        self.client = client
        self.deliver = deliver
        self.refresh_interval = refresh_interval
        self.flush_interval = flush_interval
        self.diff_interval = diff_interval
        self.drain_grace = drain_grace
        # With a ``link`` the presence channels ride on the owner's pub/sub connection (one
        # connection per pod, and sharded pub/sub on a Cluster); else ``listen`` runs our own.
        self._link = link
        self._listen = listen and link is None
        self._tasks: list[asyncio.Task] = []
        self._wake = asyncio.Event()
        self._loading: dict[int, asyncio.Task] = {}
        #: project -> (until when, the read of its ``presence`` frame) for ``presence_get``
        #: without a view.
        self._answers: dict[int, tuple[float, asyncio.Task]] = {}
        self._reread: set[int] = set()
        self._channels: set[str] = set()
        self._pubsub: Any = None
        #: The sockets (asyncio transports) the listener's pub/sub connection has had; aborted
        #: when the listener gives it up (:meth:`_drop_pubsub_sockets`).
        self._pubsub_sockets: list[asyncio.BaseTransport] = []
        self._channels_changed = asyncio.Event()
        self._confirmed: set[str] = set()  # channels Redis confirmed on the current connection
        self._confirmations = asyncio.Event()
        self._throttle = LogThrottle()
        self.stopped = False
        #: Counters for metrics and the benchmark.
        self.deliveries = 0
        self.diffs = 0
        self.rereads = 0
        self.repaired_keys = 0
        #: Writes announced without their records (over ``max_announcement``).
        self.unannounced = 0
        #: Pods, members and announcements left out for being more than pods can have
        #: written (another writer's).
        self.left_out = 0

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        loops: list[Callable[[], Awaitable[None]]] = [self._redis_loop, self._diff_loop]
        if self._listen:
            loops.append(self._listen_loop)
        self._tasks = [asyncio.create_task(loop()) for loop in loops]

    async def drain(self) -> None:
        """Hand over for a rolling restart: write what is pending, then keep this pod's records
        for ``drain_grace`` (its clients reconnect elsewhere meanwhile) and stop. No leave is
        announced: members who come back within the grace never appear to leave.

        What waits for a refresh to reach its master (Redis Cluster: a master marked failed,
        :meth:`_master_failed`) is written now, whole, with the rest: no refresh comes after a
        drain, and the master may have recovered since. So a last member who left there is
        gone at once (not listed by every pod until the records expire), and the members still
        connected there are kept for the grace too. A project whose records Redis lost (found
        by a refused write, or by the drain's refresh alone) is written whole and refreshed
        once more (:meth:`_lost_at_drain`). A master still down cuts those writes off
        within the store's bound (``refresh_interval`` / 3 per pipeline) and is then not sent
        the drain's refresh (its projects' records expire at the ttl): the drain waits for it
        once, not twice. On a cluster each master's writes and then its refresh go to that
        master only, as a lane's, every master's at once (:meth:`_drain_masters`): a master
        that hangs holds its own projects only."""
        await self.stop()
        self.core.write_whole(p for p, v in self.core.refresh_plan().items() if v == 0)
        self._unreachable.clear()
        self._failed_masters.clear()
        ttl_ms = round(self.drain_grace * 1000)
        if self.store.per_master:
            await self._drain_masters(ttl_ms)
            return
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await self._flush()
            if self.core.has_pending_writes():  # refused (Redis lost the records): whole now
                await self._flush()
            plan = {p: v for p, v in self.core.refresh_plan().items() if v}
            lost = self._lost_at_drain(await self.store.refresh(plan, ttl_ms=ttl_ms))
            if lost:  # found by the refresh alone: written whole, then kept for the grace
                await self._flush()
                plan = {p: v for p, v in self.core.refresh_plan().items() if v and p in lost}
                await self.store.refresh(plan, ttl_ms=ttl_ms)

    def _lost_at_drain(self, replies: Mapping[int, Any]) -> set[int]:
        """The projects a drain's refresh found without this pod's records (Redis lost them: a
        flush, a failover that lost writes, since the last refresh), each made a whole write
        pending: no round comes after a drain to find them, so the drain writes them itself
        and refreshes them once more, for its members to be kept through the grace."""
        lost = {p for p, reply in replies.items() if isinstance(reply, tuple) and not reply[0]}
        for project_id in lost:
            self.core.refreshed(project_id, False, {})
        return lost

    async def _drain_masters(self, ttl_ms: int) -> None:
        """Redis Cluster, :meth:`drain`: each master's pending writes, then the refresh of its
        projects that keeps them for the grace (``ttl_ms``), in a sequence of its own, every
        master's at once, each call sent to that master only (``at``, as a lane's). A master
        that fails or hangs holds its own sequence only, for its bound, and is not sent its
        refresh once its writes failed (its projects' records expire at the ttl); the other
        masters' grace is set meanwhile. A call whose slot moved away before it was sent
        (:data:`MOVED`; a write with the refresh of its project) is sent again to the master
        the map names then, once every master's part of the round ended (no master has two
        pipelines outstanding), up to :data:`MOVED_ROUNDS` rounds. (Before, every master's
        writes were waited for before any refresh was sent: a hung master held every other
        master's grace for its bound, and the gateway bounds the whole presence drain by 2 s,
        so with a refresh interval of 6 s or more that grace was never set.)"""
        master_of = self.store.master_of
        writes = {w.project_id: w for w in self.core.take_writes()}
        refresh = set(self.core.refresh_plan())
        unapplied = dict(writes)  # pending again if the drain ends before their outcome
        try:
            for _ in range(MOVED_ROUNDS):
                # A master that failed during the drain is sent nothing more (its bound is
                # waited for once): a call moved there waits, as its own projects do.
                for project_id in [p for p in writes if self._waits_for_refresh(p)]:
                    self.core.written(writes.pop(project_id), ok=False, retry=False)
                    del unapplied[project_id]
                refresh = {p for p in refresh if not self._waits_for_refresh(p)}
                if not (writes or refresh):
                    break
                parts: dict[str | None, tuple[dict[int, Write], set[int]]] = {}
                for project_id, w in writes.items():
                    parts.setdefault(master_of(project_id), ({}, set()))[0][project_id] = w
                for project_id in refresh:
                    parts.setdefault(master_of(project_id), ({}, set()))[1].add(project_id)
                moved = await asyncio.gather(
                    *(
                        self._drain_master(master, own, plan, ttl_ms, unapplied)
                        for master, (own, plan) in parts.items()
                    )
                )
                writes = {p: w for own, _ in moved for p, w in own.items()}
                refresh = {p for _, plan in moved for p in plan}
        finally:
            # Not sent (cancelled, or still MOVED after the last round): pending again.
            for w in unapplied.values():
                self.core.written(w, ok=False)
        if unapplied or refresh:
            self._throttle.log(
                "drain_moved",
                log.warning,
                "presence: a drain's writes or refreshes were not sent: their slots kept "
                "moving (their records expire at the ttl)",
                writes=len(unapplied),
                refreshes=len(refresh),
            )

    async def _drain_master(
        self,
        master: str | None,
        writes: dict[int, Write],
        projects: set[int],
        ttl_ms: int,
        unapplied: dict[int, Write],
    ) -> tuple[dict[int, Write], set[int]]:
        """One master's part of a drain round (:meth:`_drain_masters`): its ``writes`` (those
        refused, Redis having lost the records, once more, whole), then the refresh of its
        ``projects`` to ``ttl_ms`` unless its writes failed (a failure of either marks it
        failed, :meth:`_master_failed`: the drain sends it nothing more); each applied write
        is taken out of ``unapplied``. Returns the writes and refreshes for the next round:
        those MOVED (a write's project with it: its refresh goes after it, at its new master),
        and those that failed here while their slot moved to another master."""
        moved_writes: dict[int, Write] = {}
        moved_projects: set[int] = set()
        for _ in range(2):
            # The second pass: projects whose refresh found the records lost, written whole
            # and refreshed again (:meth:`_lost_at_drain`).
            lost = await self._drain_master_pass(
                master, writes, projects, ttl_ms, unapplied, moved_writes, moved_projects
            )
            if not lost:
                break
            writes = {}
            for w in self.core.take_writes(lost.__contains__):
                if self._waits_for_refresh(w.project_id):
                    # The master failed in that very refresh (a later pipeline cut off): sent
                    # nothing more, as in :meth:`_drain_masters` (its bound is waited for once).
                    self.core.written(w, ok=False, retry=False)
                else:
                    writes[w.project_id] = w
            unapplied.update(writes)
            projects = set(writes)
        return moved_writes, moved_projects

    async def _drain_master_pass(
        self,
        master: str | None,
        writes: dict[int, Write],
        projects: set[int],
        ttl_ms: int,
        unapplied: dict[int, Write],
        moved_writes: dict[int, Write],
        moved_projects: set[int],
    ) -> set[int]:
        """One pass of :meth:`_drain_master`: the writes, then the refresh (adding to
        ``moved_writes`` and ``moved_projects`` what goes to another master). Returns the
        projects whose refresh found this pod's records lost there."""
        for _ in range(2):
            if not writes:
                break
            try:
                results: list[Any] = await self.store.write(list(writes.values()), at=master)
            except (redis.exceptions.RedisError, OSError) as exc:
                results = [_as_redis_error(exc)] * len(writes)
            applied = []
            for w, result in zip(writes.values(), results, strict=True):
                if result is MOVED:
                    moved_writes[w.project_id] = w
                    moved_projects.add(w.project_id)
                else:
                    applied.append((w, result))
                    del unapplied[w.project_id]
            self._apply_writes([w for w, _ in applied], [r for _, r in applied], lambda p: master)
            # A write refused because Redis lost the pod's records there (a flush, a failover
            # that lost writes) is pending again, whole: sent now, as the next round would
            # (none comes after a drain), so that its members are kept for the grace.
            refused = {w.project_id for w, result in applied if result is False}
            writes = {w.project_id: w for w in self.core.take_writes(refused.__contains__)}
            unapplied.update(writes)
            # A write that failed here while its slot moved to another master (a failover
            # reloading the map) is pending again, whole: sent there in the next round, with
            # its refresh, as a lane sends it at once (:meth:`_master_failed`).
            elsewhere = {
                w.project_id
                for w, result in applied
                if _node_failure(result) and self.store.master_of(w.project_id) != master
            }
            for w in self.core.take_writes(elsewhere.__contains__):
                unapplied[w.project_id] = moved_writes[w.project_id] = w
                moved_projects.add(w.project_id)
        if master in self._failed_masters:
            # Its writes failed: not sent its refresh (its bound is waited for once); those of
            # its projects whose slot moved since (a failover) are refreshed at their new one.
            moved_projects.update(p for p in projects if self.store.master_of(p) != master)
            return set()
        versions = self.core.refresh_plan()
        part = {
            p: versions[p]
            for p in projects - moved_projects
            if versions.get(p) and not self._waits_for_refresh(p)
        }
        if part:
            try:
                replies: Mapping[int, Any] = await self.store.refresh(part, ttl_ms, at=master)
            except (redis.exceptions.RedisError, OSError) as exc:  # none of it answered
                replies = dict.fromkeys(part, _as_redis_error(exc))
            for project_id, reply in replies.items():
                if reply is MOVED:
                    moved_projects.add(project_id)
                elif _node_failure(reply) and not self._master_failed(project_id, reply, master):
                    moved_projects.add(project_id)  # (failed here, moved since: sent there)
                # (else its records expire at the ttl; the master is sent nothing more)
            return self._lost_at_drain(replies)
        return set()

    async def stop(self) -> None:
        """Stop every loop without touching Redis (what a crash looks like to other pods)."""
        self.stopped = True
        tasks = self._tasks + list(self._loading.values()) + list(self._lane_tasks)
        tasks += [task for _, task in self._answers.values() if not task.done()]
        self._tasks = []
        for _ in range(3):
            # redis-py's read timeouts can swallow a cancel that coincides with them (the loops
            # also check ``stopped``): cancel until done, boundedly.
            for task in tasks:
                task.cancel()
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=1.0)
                tasks = list(pending)
        if self._pubsub is not None:
            self._drop_pubsub_sockets()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pubsub.aclose(), 1.0)
            self._pubsub = None

    # --- the connection lifecycle -------------------------------------------------------------

    def join(self, session: SessionKey, project_id: int, member_id: str, name: str | None) -> None:
        self.core.join(session, project_id, member_id, name)
        self._wake.set()

    def wait(
        self, session: SessionKey, project_id: int, member_id: str, name: str | None, cap: int
    ) -> None:
        """The tab is not listed, the project being at ``cap`` members: it is listed once a
        place frees (:meth:`PresenceCore.wait`), within a diff interval."""
        self.core.wait(session, project_id, member_id, name, cap)
        self._wake.set()

    def activity(
        self, session: SessionKey, project_id: int, viewing: int | None, answering: int | None
    ) -> bool:
        """False when the session has not joined the project (answer ``not_subscribed``)."""
        ok = self.core.activity(session, project_id, viewing, answering)
        self._wake.set()
        return ok

    def leave(self, session: SessionKey, project_id: int, *, messages: bool = True) -> None:
        """The tab is no longer listed in the project; with ``messages`` (the default) its
        presence messages of the project stop too."""
        self.core.leave(session, project_id)
        if messages:
            self.unsubscribe(session, project_id)
        self._wake.set()

    def close_session(self, session: SessionKey) -> None:
        for project_id in self.core.close_session(session):
            self._unwatch(project_id)
        self._wake.set()

    async def subscribe(self, session: SessionKey, project_id: int) -> bytes:
        """Start presence messages for a session; returns its ``presence`` frame.

        Waits (callers bound the wait) until the project's view is loaded; a view dropped while
        this waited (its last subscriber left first) is loaded again."""
        while True:
            await self._ensure_loaded(project_id)
            view = self.core.views.get(project_id)
            if view is not None and view.loaded:
                self.core.subscribe(session, project_id)
                return view.snapshot_frame()

    def unsubscribe(self, session: SessionKey, project_id: int) -> None:
        if self.core.unsubscribe(session, project_id):
            self._unwatch(project_id)

    async def get(self, project_id: int) -> bytes:
        """The ``presence`` frame for ``presence_get``: from the view when this pod has one
        (the state its subscribers' diffs start from), else read from Redis.

        Either is at most ``diff_interval`` old, as a view is: a read's frame answers every
        ``presence_get`` of the project for that long (and concurrent ones share the read, also
        past that while it has not answered), so a client asking in a loop costs Redis one read
        per project per interval, not one per request."""
        view = self.core.views.get(project_id)
        if view is not None and view.loaded:
            return view.snapshot_frame()
        now = asyncio.get_running_loop().time()
        answer = self._answers.get(project_id)
        # A read still in flight is shared however old (Redis slow or hung): its answer is as
        # fresh as when Redis runs it, and one more read per interval would only queue behind
        # it, a backlog nobody waits for once Redis answers.
        if answer is None or (answer[0] <= now and answer[1].done()):
            if len(self._answers) >= 256:  # frames of projects nobody asked for lately
                self._answers = {
                    p: a for p, a in self._answers.items() if a[0] > now or not a[1].done()
                }
            task = asyncio.ensure_future(self._read_frame(project_id))
            answer = self._answers[project_id] = (now + self.diff_interval, task)
            task.add_done_callback(lambda t, p=project_id, a=answer: self._read_done(p, a))
        # Shielded: a caller whose wait ends (its timeout, its connection closed) must not
        # cancel the read the others wait for.
        return await asyncio.shield(answer[1])

    async def _read_frame(self, project_id: int) -> bytes:
        return encode(self.core.snapshot_of_read(project_id, await self.store.read(project_id)))

    def _read_done(self, project_id: int, answer: tuple[float, asyncio.Task]) -> None:
        task = answer[1]
        if task.cancelled() or task.exception() is not None:  # (retrieved: never logged)
            if self._answers.get(project_id) is answer:
                del self._answers[project_id]  # a failure is not an answer: the next one reads

    def on_message(self, channel: bytes | str, data: bytes) -> None:
        """A message of a presence channel (from this service's listener, or from the gateway's
        own pub/sub when it routes the channels itself, e.g. sharded on Redis Cluster)."""
        project_id = self.keys.project_of_presence_channel(channel)
        if project_id is None:
            return
        try:
            announcement = parse_announcement(data, self.most)
        except OversizedAnnouncement:
            self._left_out(project_id, 1)  # counted, not logged: bounded, and said in metrics
            return
        except MalformedAnnouncement as exc:
            self._throttle.log(
                "malformed_announcement",
                log.warning,
                "malformed presence announcement",
                error=describe(exc),
            )
            return
        view = self.core.views.get(project_id)
        dropped = 0 if view is None else view.left_out
        if not self.core.on_announcement(project_id, announcement):
            self._reread.add(project_id)
            self._wake.set()
        if view is not None and view.left_out > dropped:
            self._left_out(project_id, view.left_out - dropped)

    def reread_all(self) -> None:
        """Read every watched project again: call after the pub/sub connection that feeds
        :meth:`on_message` reconnected (announcements sent meanwhile are lost)."""
        self._reread.update(self.core.views)
        self._wake.set()

    # --- loops --------------------------------------------------------------------------------

    async def _ensure_loaded(self, project_id: int) -> None:
        view = self.core.view(project_id)
        if view.loaded:
            return
        task = self._loading.get(project_id)
        if task is None:
            task = self._loading[project_id] = asyncio.create_task(self._load(project_id))
            # Its failure is raised to the subscribers waiting then; with none left (each
            # stopped at its bound), it is retrieved here: a cancelled shield no longer does
            # (Python 3.11.7+), and asyncio logged "Task exception was never retrieved" at
            # error level for each project whose first read failed in an outage.
            task.add_done_callback(_retrieved)
        await asyncio.shield(task)

    async def _load(self, project_id: int) -> None:
        try:
            await self._watch(project_id)
            if not self.core.load(project_id, await self.store.read(project_id)):
                self._reread.add(project_id)  # loaded; an early announcement showed a gap
                self._wake.set()
            self.core.first_read_done(project_id)  # (its subscribers, if any, come next)
        except BaseException:
            if not self.core.subscribers.get(project_id):
                self.core.views.pop(project_id, None)  # nobody waits for it any more
                self._unwatch(project_id)
            raise
        finally:
            self._loading.pop(project_id, None)

    async def _reload(self, project_id: int) -> None:
        self.rereads += 1
        view = self.core.views.get(project_id)
        if view is None:
            return
        snapshot = await self.store.read(project_id)
        # Only into the view the read was made for: one dropped meanwhile (its last subscriber
        # left, its channel unwatched) must not come back loaded, unwatched, for the next
        # subscriber to take as it is.
        if self.core.views.get(project_id) is view and not self.core.load(project_id, snapshot):
            self._reread.add(project_id)

    async def _reload_batch(self) -> None:
        """Read the projects asked for now, each once.

        On Redis Cluster each read is given ``refresh_interval`` / 3, like each master's part of
        a write or refresh: a project whose master fails or does not answer in time (or had
        already failed since the last refresh) is read after the next refresh that reaches it
        (at the next round if its slot moved to another master meanwhile), and the others are
        read now. Before, the first read of a hung master's project held the
        round until its bound, and the other projects' reads waited for the master too (a
        re-read of every view follows each pub/sub reconnect)."""
        batch, self._reread = self._reread, set()
        while batch:
            project_id = batch.pop()
            try:
                if not self.store.per_master:
                    await self._reload(project_id)
                    continue
                master = self.store.master_of(project_id)
                if project_id in self._unreachable or master in self._failed_masters:
                    self._reread_later.add(project_id)
                    continue
                try:
                    async with asyncio.timeout(self.store.group_timeout):
                        await self._reload(project_id)
                except (redis.exceptions.RedisError, OSError) as exc:
                    if isinstance(exc, TimeoutError):  # our bound's: redis-py never saw it end
                        node_unanswered(self.client, master)
                    if self._master_failed(project_id, exc, master):  # its others: later too
                        self._reread_later.add(project_id)
                    else:  # moved to another master meanwhile: read there next round
                        self._reread.add(project_id)
            except BaseException:
                # read them again on the next round
                self._reread |= batch | {project_id}
                raise

    async def _watch(self, project_id: int) -> None:
        """Listen to the project's presence channel and wait (at most 2 s) until Redis confirms
        the subscription, so that a read made next misses no announcement. Without the built-in
        listener, or past the wait, a missed announcement shows up as a gap that the next
        announcement or refresh repairs with a read."""
        channel = self.keys.presence_channel(project_id)
        if channel not in self._channels:
            self._channels.add(channel)
            self._channels_changed.set()
        if self._link is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._link.subscribe(channel.encode())
            return
        if not self._listen:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                while channel not in self._confirmed and channel in self._channels:
                    self._confirmations.clear()
                    await self._confirmations.wait()

    def _unwatch(self, project_id: int) -> None:
        channel = self.keys.presence_channel(project_id)
        if channel in self._channels:
            self._channels.discard(channel)
            self._channels_changed.set()
            if self._link is not None:
                spawn(self._drop(channel))

    async def _drop(self, channel: str) -> None:
        # Checked when the task runs: a project watched again meanwhile keeps its channel.
        if channel not in self._channels and self._link is not None:
            await self._link.unsubscribe(channel.encode())

    async def _flush(self) -> None:
        """Standalone Redis only (the loop's rounds there, and its :meth:`drain`): every
        pending write now, in one call, waited for. On a cluster the rounds send each master's
        writes in its lane (:meth:`_dispatch`, :meth:`_lane`) and a drain in its own sequence
        (:meth:`_drain_masters`); this is not called there."""
        self._standalone_only("_flush")
        writes = self._put_off(self.core.take_writes())
        if not writes:
            return
        try:
            masters = self._masters(w.project_id for w in writes)
            results = await self.store.write(writes)
        except BaseException:
            for w in writes:
                self.core.written(w, ok=False)
            raise
        self._apply_writes(writes, results, masters.get)

    def _standalone_only(self, method: str) -> None:
        """A call on a cluster of what only a standalone Redis runs is a bug: said at once,
        rather than answered by a second cluster path no production round takes."""
        if self.store.per_master:
            raise RuntimeError(
                f"PresenceService.{method} is for a standalone Redis: on a cluster the rounds "
                "run the masters' lanes (_dispatch) and a drain _drain_masters"
            )

    def _put_off(self, writes: list[Write]) -> list[Write]:
        """``writes`` but those that wait for the next refresh that reaches their master (it
        failed since the last one): counted as not applied, written whole then."""
        if not (self._unreachable or self._failed_masters):
            return writes
        waiting = {w.project_id for w in writes if self._waits_for_refresh(w.project_id)}
        for w in writes:
            if w.project_id in waiting:
                self.core.written(w, ok=False, retry=False)  # written whole when it answers
        return [w for w in writes if w.project_id not in waiting]

    def _apply_writes(
        self,
        writes: list[Write],
        results: list[bool | ProjectFailure],
        sent_to: Callable[[int], str | None],
    ) -> None:
        """The outcomes of ``writes``, each the store's for it; ``sent_to`` names the master
        each project's write was sent to (:meth:`_master_failed`)."""
        for w, result in zip(writes, results, strict=True):
            if result is MOVED:
                # Not sent (its slot moved away from the lane's master): pending again, for
                # the next round to send in its new master's lane (written whole: the core's
                # retry of a write whose outcome it does not know).
                self.core.written(w, ok=False)
                continue
            if result is True and not w.announce:
                self.unannounced += 1
                if self._on_unannounced is not None:
                    self._on_unannounced(w.project_id, 1)
            if _keys_at_fault(result):
                # Written whole at the next refresh (not every write interval while it fails).
                self._project_error(w.project_id, result)
                self.core.written(w, ok=False, retry=False)
            elif isinstance(result, redis.exceptions.RedisError):
                # Its master (Redis Cluster) failed or hangs: written whole at the next refresh
                # that reaches it (or at once, whole, if the project moved to another master
                # meanwhile); the other masters' projects went on.
                waits = self._master_failed(w.project_id, result, sent_to(w.project_id))
                self.core.written(w, ok=False, retry=not waits)
            else:
                self.core.written(w, result)

    async def _refresh(self) -> None:
        """Standalone Redis only (the loop's rounds there): refresh every project now, in one
        call, waited for, then write what Redis lost. On a cluster each master's refresh is
        its lane's (:meth:`_dispatch`, :meth:`_lane`); this is not called there."""
        self._standalone_only("_refresh")
        plan = self.core.refresh_plan()
        masters = self._masters(plan)
        counts = self.core.refresh_counts(plan, digest_every=DIGEST_EVERY)
        replies = await self.store.refresh(plan, counts=counts)
        self._unreachable = set()
        self._failed_masters = set()
        self._apply_refresh(replies, masters.get)
        await self._flush()  # rewrite whatever Redis lost, now

    def _apply_refresh(
        self, replies: Mapping[int, Any], sent_to: Callable[[int], str | None]
    ) -> None:
        """The outcomes of a refresh (of every project, or of one master's), each the store's
        for it; the projects' masters were cleared of their failures before. ``sent_to`` names
        the master each project's refresh was sent to (:meth:`_master_failed`)."""
        reread_later, self._reread_later = self._reread_later, set()
        for project_id, reply in replies.items():
            if reply is MOVED:
                # Not sent (its slot moved away from the lane's master): its new master is
                # owed a refresh, sent in that master's lane when it is free.
                self._lanes.refresh_due([self.store.master_of(project_id)])
                continue
            if _keys_at_fault(reply):
                self._project_error(project_id, reply)
                self.core.refresh_failed(project_id)
            elif isinstance(reply, redis.exceptions.RedisError):
                # Its master (Redis Cluster) failed or hangs: not refreshed, as in a failed
                # round (the records live on until their ttl); tried again at the next refresh
                # (at once if the project moved to another master meanwhile: that one is
                # owed its refresh, as for a call not sent there, MOVED).
                if not self._master_failed(project_id, reply, sent_to(project_id)):
                    self._lanes.refresh_due([self.store.master_of(project_id)])
            elif self.core.refreshed(project_id, *reply):
                self._reread.add(project_id)
        # The re-reads put off for a master that failed: now, if it answered this refresh.
        waiting = {p for p in reread_later if self._waits_for_refresh(p)}
        self._reread_later = waiting
        self._reread |= reread_later - waiting

    def _dispatch(self, refresh_due: bool) -> None:
        """Redis Cluster: start the calls of the masters whose lane is free (:class:`MasterLanes`):
        a refresh of each master owed one (all of them when ``refresh_due``), followed by its
        projects' pending writes, or those writes alone. A busy master's writes stay pending
        and its refresh owed, for when its call ends (it wakes the loop). Nothing here waits."""
        lanes, master_of = self._lanes, self.store.master_of
        parts: dict[str | None, dict[int, int | None]] = {}
        if refresh_due:
            plan = self.core.refresh_plan()
            for project_id, version in plan.items():
                parts.setdefault(master_of(project_id), {})[project_id] = version
            lanes.refresh_due(parts)
            self._unreachable &= plan.keys()  # (a project no longer refreshed is forgotten)
        # The writes of a master owed a refresh go after it, taken then (the refresh may find
        # records lost: those writes are whole ones).
        held = lanes.busy | lanes.owed
        writes = self._take_writes(lambda p: master_of(p) not in held)
        by_master: dict[str | None, list[Write]] = {}
        for w in writes:
            by_master.setdefault(master_of(w.project_id), []).append(w)
        started = lanes.start(by_master)
        if any(started.values()) and not refresh_due:
            for project_id, version in self.core.refresh_plan().items():
                master = master_of(project_id)
                if started.get(master):
                    parts.setdefault(master, {})[project_id] = version
        for master, refresh in started.items():
            part = parts.get(master, {}) if refresh else {}
            self._lane_writes[master] = by_master.get(master, [])
            task = asyncio.create_task(self._lane(master, part))
            self._lane_tasks.add(task)
            task.add_done_callback(self._lane_tasks.discard)
            task.add_done_callback(functools.partial(self._lane_done, master))

    def _writes_to_send(self) -> bool:
        """Whether a round could send a pending write now: on a standalone Redis, whether any
        is pending; on a cluster, one of a project with no write outstanding whose master's
        lane is free (:meth:`_dispatch`). The others are held until that lane ends, which
        wakes the loop (:meth:`_lane_done`), so the loop sleeps until then, or a change, or
        the next refresh, instead of going round every ``flush_interval`` to look at them
        again for as long as a master hangs. (A held write whose slot moves to a free master
        meanwhile is sent at the next wake: at the latest when the busy lane ends, within
        its master's bound.)"""
        if not self.store.per_master:
            return self.core.has_pending_writes()
        held, writing, master_of = (
            self._lanes.busy | self._lanes.owed,
            self._writing,
            self.store.master_of,
        )
        return any(
            p not in writing and master_of(p) not in held for p in self.core.pending_projects()
        )

    def _take_writes(self, which: Callable[[int], bool]) -> list[Write]:
        """The pending writes of the projects ``which`` accepts and no write of which is
        outstanding (:attr:`_writing`), but those put off (:meth:`_put_off`): outstanding from
        now until their lane applies their outcome."""
        writing = self._writing
        writes = self._put_off(self.core.take_writes(lambda p: p not in writing and which(p)))
        writing.update(w.project_id for w in writes)
        return writes

    async def _lane(self, master: str | None, part: dict[int, int | None]) -> None:
        """One master's call (Redis Cluster): the refresh of its projects in ``part`` (if any),
        then its writes (those taken with it, and its projects' pending ones once refreshed),
        each in pipelines of at most :data:`PIPELINE_CALLS`, each within the store's bound,
        sent to this master only: a call whose slot moved to another master since it was
        taken (a re-shard, a failover reloading the slot map) is not sent (:data:`MOVED`) but
        left to that master's lane, a write pending again, a refresh owed to it. (Before,
        the store sent it where the map said then: another master had a second pipeline
        outstanding beside its own lane's, and its failure was charged to this one.)
        A failure of the master is its projects' alone: they wait for its next refresh. The
        writes taken and not applied are pending again, whatever ends this (:meth:`_lane_done`)."""
        try:
            if part:
                # (Not the projects whose write is outstanding: the count is of what is stored.)
                counts = self.core.refresh_counts(part, self._writing, digest_every=DIGEST_EVERY)
                try:
                    replies: Mapping[int, Any] = await self.store.refresh(
                        part, at=master, counts=counts
                    )
                except (redis.exceptions.RedisError, OSError) as exc:  # none of it answered
                    failure = _as_redis_error(exc)
                    replies = dict.fromkeys(part, failure)
                # The master's failed mark goes only if it answered some call itself: a
                # refresh all MOVED (every project's slot moved away before it was sent)
                # reached no one there. (Before, the mark went anyway, and the next write of
                # a project of a master still down was sent, to wait out its bound.)
                if any(_answered(replies[p]) for p in part):
                    self._failed_masters.discard(master)
                self._unreachable.difference_update(p for p in part if replies[p] is not MOVED)
                self._apply_refresh(replies, lambda p: master)
                # Whatever Redis lost there is written now, with the writes pending meanwhile.
                self._lane_writes[master] += self._take_writes(
                    lambda p: self.store.master_of(p) == master
                )
            writes = self._lane_writes[master]
            if writes:
                try:
                    results: list[Any] = await self.store.write(writes, at=master)
                except (redis.exceptions.RedisError, OSError) as exc:
                    results = [_as_redis_error(exc)] * len(writes)
                self._lane_writes[master] = []
                self._writing.difference_update(w.project_id for w in writes)
                self._apply_writes(writes, results, lambda p: master)
        except Exception as exc:  # a reply nobody foresaw must not end the master's lane
            self._throttle.log(
                "loop_failed", log.warning, "presence: a round failed", error=repr(exc)
            )

    def _lane_done(self, master: str | None, task: asyncio.Task) -> None:
        """A lane's task ended (done, failed, or cancelled by stop(), maybe before its first
        step): the writes it took and did not apply are pending again (drain() writes them),
        and the master is free."""
        for w in self._lane_writes.pop(master, []):
            self.core.written(w, ok=False)
            self._writing.discard(w.project_id)
        self._lanes.finish(master)
        self._wake.set()

    def _repaired(self, project_id: int, keys: int) -> None:
        """A write or refresh deleted index keys of another type in a project (another writer's;
        the live pods rebuild them, as after a flush), or removed pods whose deadline no pod can
        have set (and their records), or found this pod's records not as many as it wrote (it
        writes them whole again). Said in the log (someone writes where only the gateway
        should) and counted."""
        self.repaired_keys += keys
        if self._on_repaired is not None:
            self._on_repaired(project_id, keys)
        self._throttle.log(
            "repaired",
            log.warning,
            "presence: repaired a project's keys (an index key of another type, a pod "
            "deadline beyond the longest ttl, or members another writer added to or removed "
            "from a pod's records)",
            project_id=project_id,
            keys=keys,
        )

    def _left_out(self, project_id: int, n: int) -> None:
        """A read or an announcement of the project held more than pods can have written:
        ``n`` pods, members or announcements left out. Counted (not logged: the cost of it is
        bounded, and a flood of it must not flood the log)."""
        self.left_out += n
        if self._on_left_out is not None:
            self._on_left_out(project_id, n)

    def _project_error(self, project_id: int, exc: Exception) -> None:
        """One project's presence calls answer errors (unforeseen: the scripts replace index
        keys of another type and skip foreign values): said in the log; the pod's other
        projects go on."""
        self._throttle.log(
            "project_error",
            log.warning,
            "presence: a project's keys in Redis are unusable",
            project_id=project_id,
            error=describe(exc),
        )

    def _waits_for_refresh(self, project_id: int) -> bool:
        """Whether the project's writes wait for the next refresh: its master (Redis Cluster)
        failed or did not answer since the last one, for this project or another."""
        if project_id in self._unreachable:
            return True
        return (
            bool(self._failed_masters) and self.store.master_of(project_id) in self._failed_masters
        )

    def _masters(self, projects: Iterable[int]) -> dict[int, str | None]:
        """The master each project's call goes to if made now: the store groups its calls by
        the same slot map, read in the same step (nothing is awaited in between)."""
        return {p: self.store.master_of(p) for p in projects}

    def _master_failed(self, project_id: int, exc: Exception, sent_to: str | None) -> bool:
        """On Redis Cluster, the master ``sent_to`` failed or did not answer its part of a
        write or refresh of a project, or a read of it: that master's projects' writes and
        re-reads wait for the next refresh that reaches it; the others went on. Whether this
        project waits too: not if its slot has moved to another master since the call was sent
        (a failover, a re-shard; the cluster client reloads its map after a call cut off by
        its bound), which is not charged with the old one's failure: the project is planned
        for its new master, as any of that master's. (Before, the failure was charged to the
        project's master when its outcome was applied: after a slot moved, the healthy new
        master, whose projects' writes then waited up to a refresh interval for nothing.)"""
        current = self.store.master_of(project_id)
        moved = sent_to is not None and current is not None and current != sent_to
        if sent_to is not None:
            self._failed_masters.add(sent_to)
        if not moved:
            self._unreachable.add(project_id)
        self._throttle.log(
            "master_failed",
            log.warning,
            "presence: a project's master is unavailable (the other masters' projects go on)",
            project_id=project_id,
            error=describe(exc),
        )
        return not moved

    async def _redis_loop(self) -> None:
        """Writes, refreshes and re-reads, one at a time (a write and a refresh never race; on
        Redis Cluster, one at a time per master).

        A round gives up after ``refresh_interval`` (``TimeoutError``, logged as Redis being
        unavailable), and the next one, which refreshes at once, takes a new connection: a
        refresh late by at most one interval more keeps the pod's records (the ttl exceeds two
        intervals). Before, a round waited on a hung connection as long as the client retried
        (each retry waiting out its timeouts: about 100 s with the gateway's client), and the
        pod's members were shown as gone to every pod meanwhile, also after Redis was back at
        its address (a failover).

        On Redis Cluster a round waits for no master: it starts the writes and refreshes of the
        masters whose lane is free (:meth:`_dispatch`), each master's in a task of its own, and
        the next round starts those of the masters free then. (A round that waited for every
        master's part of the refresh held the healthy masters' next writes for the bound of a
        hung one, up to a third of the refresh interval, at every refresh.) Between rounds the
        loop sleeps ``flush_interval`` (coalescing changes), then until there is something it
        can send (:meth:`_writes_to_send`, a re-read), a wake (a change, a lane ending) or the
        next refresh."""
        loop = asyncio.get_running_loop()
        next_refresh = loop.time()
        backoff = self.flush_interval
        while True:
            try:
                async with asyncio.timeout(self.refresh_interval):
                    refresh_due = loop.time() >= next_refresh
                    if refresh_due:
                        next_refresh = loop.time() + self.refresh_interval
                    if self.store.per_master:
                        self._dispatch(refresh_due)
                    else:
                        if refresh_due:
                            await self._refresh()
                        await self._flush()
                    # The projects asked for now, each read once: one asked for again while
                    # a read is under way waits for the next round, so that announcements
                    # asking for reads (writes too large to announce, from every pod that
                    # writes the project, or forged) cost at most one read per project per
                    # round, not one each as fast as Redis answers.
                    await self._reload_batch()
                backoff = self.flush_interval
            except (redis.exceptions.RedisError, OSError) as exc:  # (TimeoutError is an OSError)
                self._throttle.log(
                    "redis_error", log.warning, "presence: redis unavailable", error=describe(exc)
                )
                backoff = min(backoff * 2, self.refresh_interval)
            except Exception as exc:  # a reply nobody foresaw must not end presence for the pod
                self._throttle.log(
                    "loop_failed", log.warning, "presence: a round failed", error=repr(exc)
                )
                backoff = min(backoff * 2, self.refresh_interval)
            await asyncio.sleep(backoff)  # coalesces a burst of changes into one write
            if not (self._writes_to_send() or self._reread):
                with contextlib.suppress(TimeoutError):
                    timeout = max(0.0, next_refresh - loop.time())
                    await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()

    async def _diff_loop(self) -> None:
        while True:
            await asyncio.sleep(self.diff_interval)
            for project_id in self.core.sweep():
                self._unwatch(project_id)
            if self.core.promote():  # tabs waiting at the cap, listed as places freed
                self._wake.set()
            for sessions, diff in self.core.tick():
                frame = encode(diff)
                self.diffs += 1
                self.deliveries += len(sessions)
                try:
                    self.deliver(sessions, frame)
                except Exception as exc:  # the gateway's bug must not end presence for all
                    self._throttle.log(
                        "deliver_failed",
                        log.error,
                        "presence: deliver failed",
                        error=repr(exc),
                        project_id=diff.project_id,
                    )

    async def _listen_loop(self) -> None:
        """Listen to the presence channels of the watched projects. After a reconnect every
        view is read again: announcements sent while disconnected are lost.

        While subscribed, a ``PING`` goes through the connection every ``refresh_interval``,
        and a pong not read within the next interval counts as a lost connection (a reconnect;
        within the next two while other frames are still read, see :class:`_PubSubProbe`): the
        reads wait at most 0.2 s each and then carry on, so a connection that hangs, or a
        server that trickles a frame a byte at a time, would otherwise hold the listener for
        ever, silently, with every announcement of the other pods lost. Each write (a
        subscribe, an unsubscribe, the ping) that takes longer than an interval gives the
        connection up the same way. A connection given up has its socket aborted, unsent bytes
        and all (:meth:`_drop_pubsub_sockets`)."""
        backoff = 0.05
        loop = asyncio.get_running_loop()
        try:
            while not self.stopped:
                subscribed: set[str] = set()
                try:
                    self._confirmed.clear()
                    self._pubsub = self.client.pubsub()
                    reconnected = bool(self.core.views)
                    probe = _PubSubProbe(loop.time(), self.refresh_interval)
                    while not self.stopped:
                        self._channels_changed.clear()
                        wanted = set(self._channels)
                        # Each write within an interval too: a Redis that stopped reading holds a
                        # write once the socket's buffers are full (for ever with a client of
                        # yours without a socket_timeout).
                        if wanted - subscribed:
                            async with asyncio.timeout(self.refresh_interval):
                                await self._connect_pubsub()
                                await self._pubsub.subscribe(*(wanted - subscribed))
                        if subscribed - wanted:
                            async with asyncio.timeout(self.refresh_interval):
                                await self._connect_pubsub()
                                await self._pubsub.unsubscribe(*(subscribed - wanted))
                        subscribed = wanted
                        if reconnected:
                            reconnected = False
                            self.reread_all()
                        if not subscribed:
                            await self._channels_changed.wait()
                            probe = _PubSubProbe(loop.time(), self.refresh_interval)
                            continue
                        if probe.ping_due(loop.time()):
                            async with asyncio.timeout(self.refresh_interval):
                                await self._connect_pubsub()
                                await self._pubsub.ping()
                        message = await self._pubsub.get_message(timeout=0.2)
                        kind = message and message.get("type")
                        if kind == "pong":
                            probe.answered(loop.time())
                        elif probe.overdue(loop.time(), after_a_frame=message is not None):
                            raise redis.exceptions.TimeoutError(
                                f"no pong on the presence pub/sub connection within "
                                f"{self.refresh_interval:g} s"
                            )
                        if kind == "message":
                            self.on_message(message["channel"], message["data"])
                        elif kind == "subscribe":
                            self._confirmed.add(_text(message["channel"]))
                            self._confirmations.set()
                        elif kind == "unsubscribe":
                            self._confirmed.discard(_text(message["channel"]))
                        backoff = 0.05
                except (redis.exceptions.RedisError, OSError) as exc:
                    self._throttle.log(
                        "pubsub_error", log.warning, "presence: pub/sub down", error=describe(exc)
                    )
                except Exception as exc:
                    # A frame no Redis sends (a broken server or proxy) fails inside redis-py's
                    # pub/sub (IndexError, TypeError): what else the connection says cannot be
                    # trusted either, so it is a lost connection, as on the gateway's link. Before,
                    # it ended the listener for good, without a word.
                    self._throttle.log(
                        "pubsub_error", log.warning, "presence: pub/sub down", error=repr(exc)
                    )
                pubsub, self._pubsub = self._pubsub, None
                self._drop_pubsub_sockets()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        finally:
            # However the listener ends (cancelled by stop(), or in a write that a Redis which
            # stopped reading holds), the sockets it noted are aborted: a connection made just
            # as stop() dropped the others would otherwise stay open with its unsent bytes.
            self._drop_pubsub_sockets()

    async def _connect_pubsub(self) -> None:
        """Connect the listener's pub/sub connection (if it is not) and note its socket, before
        a write: a write that then never ends (a Redis that stopped reading) leaves the socket
        where :meth:`_drop_pubsub_sockets` finds it. (A Cluster client's pub/sub picks its node
        at the subscribe: it connects there, and its socket is not noted.)"""
        if isinstance(self.client, redis.asyncio.cluster.RedisCluster):
            return
        await self._pubsub.connect()
        writer = getattr(self._pubsub.connection, "_writer", None)  # (redis-py's own)
        if writer is not None and writer.transport not in self._pubsub_sockets:
            self._pubsub_sockets.append(writer.transport)

    def _drop_pubsub_sockets(self) -> None:
        """Close the sockets of the pub/sub connection given up at once, unsent bytes and all.

        redis-py "disconnects" a connection whose write timed out or was cancelled by closing
        its transport, and asyncio keeps a transport open until what it holds is sent: with a
        Redis that stopped reading, never. Each reconnect then left one more socket open, and a
        pod with a hung Redis ran out of descriptors. An abort closes it now."""
        sockets, self._pubsub_sockets = self._pubsub_sockets, []
        for transport in sockets:
            transport.abort()


class _PubSubProbe:
    """When the presence listener pings its pub/sub connection and when the pong is overdue
    (times from the loop's clock): a ping every ``interval`` while none is unanswered, its pong
    due within ``interval`` of it, or within ``limit`` intervals while each read returns a frame.

    The same idea as the pub/sub link's :class:`gateway.pubsub.PongWait` (frames still read: the
    pong may be behind them), not the same rule, which is why it is not that class with a limit
    of 2. The listener reads at most 0.2 s at a time and asks at each read; the link decides only
    when a whole probe timeout ends. Here the frame must come with the read that finds the pong
    late (one frame earlier in the interval, then silence: given up at the first empty read past
    the interval); there any whole frame during the timeout just ended buys a whole timeout more
    (given up at its end). And this class also says when to ping.
    """

    #: Intervals after its ping a pong is waited for in all, at most (``PongWait.limit``), while
    #: the reads go on returning frames.
    limit = 2

    def __init__(self, now: float, interval: float) -> None:
        self.interval = interval
        self.next_ping = now + interval
        #: When the unanswered ping went out (None: none is).
        self.sent: float | None = None

    def ping_due(self, now: float) -> bool:
        """Whether to send a ping now (counted as sent when True)."""
        if self.sent is not None or now < self.next_ping:
            return False
        self.sent = now
        return True

    def answered(self, now: float) -> None:
        self.sent = None
        self.next_ping = now + self.interval

    def overdue(self, now: float, *, after_a_frame: bool = False) -> bool:
        """Whether the pong is late: past an interval, or past :attr:`limit` intervals
        ``after_a_frame`` (another frame was just read: the connection delivers, and the pong
        may be right behind, the loop having been busy past the interval; were only the pong
        to count, a live connection would be reconnected after every such pause)."""
        if self.sent is None:
            return False
        return now - self.sent > (self.limit if after_a_frame else 1) * self.interval
