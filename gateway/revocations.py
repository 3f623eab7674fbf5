"""Token revocation, the gateway's side: which tokens are refused, and which connections end.

A revocation says "tokens of subject S issued before T are refused" (the publisher writes it:
docs/publisher.md; the format is :mod:`schemas.revocations`). Every gateway process keeps the
whole list in memory and checks it wherever it verifies a token (:meth:`gateway.server.Gateway.
verify`: the first ``auth``, a refresh, a handshake's or a stream's ``Authorization`` header, a
poll), so a check costs a dictionary lookup and never waits for Redis.

The list is polled, not pushed: every ``--revocation-poll-interval`` (1 s) the watcher reads the
version key (one ``GETRANGE`` of its first 21 bytes) and reads the hash (``HSCAN``, a slice at
a time: :data:`SCAN_COUNT`) only when the version changed, on its first poll, while the version
is unusable, and every :data:`RELOAD_INTERVAL` seconds anyway. A poll cannot lose a revocation
across a reconnect or a failover, as a pub/sub message can; the delay is bounded by the
interval. On each new list the connections of this process whose token it newly revokes (among
its entries new or changed: :func:`_revokes_more`) are closed with 4003, found through a subject
index (:class:`SubjectIndex`) rather than a walk over every connection. A hash of more than
:data:`schemas.revocations.MAX_REVOCATIONS` fields is not read: the last list stays in force,
and a process without one yet stays without one (not ready, refusing tokens), looking again
every :data:`FAILED_POLL_RETRY`.

Failures never reach the clients: a Redis that does not answer within :data:`READ_TIMEOUT`
(hung, unreachable, failing over) leaves the last list in force and is tried again after
:data:`FAILED_POLL_RETRY` (or the interval, when shorter); a key of another type, a version
that is not an integer or a hash value that does not parse is counted in
``eventbus_foreign_values_total`` (``revocation_key``, ``revocation_entry``) and skipped.
Warnings are throttled (a few a minute per kind).

The pure part (:class:`SubjectIndex`, :func:`sessions_to_close`) is tested without sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Generic, NamedTuple, Protocol, TypeVar

import redis.exceptions

from gateway.logs import describe, get_logger
from schemas.revocations import MAX_REVOCATIONS, Revocation, RevocationList
from schemas.stored import ForeignKind
from schemas.tokens import InvalidToken, TokenClaims
from serverkit import LogThrottle

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from schemas.keys import Keys

__all__ = [
    "FAILED_POLL_RETRY",
    "READ_TIMEOUT",
    "RELOAD_INTERVAL",
    "SCAN_COUNT",
    "RevocationWatcher",
    "RevocationsUnknown",
    "SubjectIndex",
    "TokenRevoked",
    "sessions_to_close",
]

log = get_logger("gateway")

#: Seconds each wait of a poll for Redis may last (the read of the version, each ``HSCAN``
#: slice when it changed): past it the poll gives up, the last list stays in force, and the next
#: poll comes ``--revocation-poll-interval`` later on a new connection. Not a bound on the whole
#: read: a large list takes what its slices take (~0.3 s per 100,000 entries).
READ_TIMEOUT = 5.0

#: Seconds after which the hash is read again even though the version did not change. A backstop:
#: the revoke script makes every version new (at least Redis' time in microseconds), but a
#: version that comes back to one already seen with other entries (set by hand, restored from a
#: backup) would hide them until the next revocation.
RELOAD_INTERVAL = 60.0

#: Entries asked for per ``HSCAN`` of the hash. The hash is read a slice at a time, each slice
#: parsed as it comes, so that a large list (a mass revocation: 100,000 entries) does not hold
#: the event loop, nor Redis, for one long reply: a reload of 100,000 took ~250 ms of the loop
#: in one piece with ``HGETALL``, ~3 ms at a time with slices of this size.
SCAN_COUNT = 1000

#: Seconds after which a poll that failed is tried again, when ``--revocation-poll-interval`` is
#: longer: a Redis that failed one poll (a blip, a failover) must not leave the process without
#: the newest list, nor unready when it failed the first, for a whole interval (up to an hour).
FAILED_POLL_RETRY = 1.0

#: The longest version value taken as one (INCR's replies have at most 20 digits); the poll
#: reads one byte more, to tell a longer value.
_MAX_VERSION_DIGITS = 20


class _ListTooLong(Exception):
    """The revocation hash holds more than :data:`schemas.revocations.MAX_REVOCATIONS` fields:
    not read (see :meth:`RevocationWatcher.poll_once`)."""


class TokenRevoked(InvalidToken):
    """A token that verifies, but whose subject's tokens issued before its ``iat`` are revoked.

    An :class:`InvalidToken`, so that every place that refuses an invalid token refuses it too
    (401 ``invalid_token`` for a poll, a stream or a handshake, ``error`` ``invalid_token`` for a
    refresh); only the first ``auth`` tells it apart, closing with 4003 instead of 4001."""

    def __init__(self) -> None:
        super().__init__("token revoked")


class RevocationsUnknown(Exception):
    """The list has not been read since the process started, so a valid token cannot be told
    from a revoked one: it is refused for now (fail closed), not taken. Not the token's fault
    (not an :class:`InvalidToken`): the first ``auth`` closes with 1013, a poll, a stream or a
    handshake gets 503 ``unavailable`` with ``Retry-After: 1``, and the client tries again."""

    def __init__(self) -> None:
        super().__init__("token checks are not ready (the revocation list is not read yet); retry")


class _HasClaims(Protocol):
    claims: TokenClaims | None
    closing: bool


S = TypeVar("S", bound=_HasClaims)


class SubjectIndex(Generic[S]):
    """The open connections of this process by their token's ``sub``: what a revocation of one
    subject finds without a walk over every connection.

    A subject with one connection (the common case: one tab) holds it directly; one with more
    holds a dict of them (ordered, no per-entry object). Connections without a ``sub`` are not
    held: their tokens cannot be revoked. Costs one entry of a dict per connection with a
    subject (about 40 bytes at 100,000 subjects), nothing per connection without one."""

    __slots__ = ("_by_subject",)

    def __init__(self) -> None:
        self._by_subject: dict[str, S | dict[S, None]] = {}

    def add(self, subject: str, session: S) -> None:
        held = self._by_subject.get(subject)
        if held is None:
            self._by_subject[subject] = session
        elif type(held) is dict:
            held[session] = None
        elif held is not session:
            self._by_subject[subject] = {held: None, session: None}  # type: ignore[dict-item]

    def remove(self, subject: str, session: S) -> None:
        """Forget ``session`` under ``subject`` (nothing when it is not held there)."""
        held = self._by_subject.get(subject)
        if held is session:
            del self._by_subject[subject]
        elif type(held) is dict:
            held.pop(session, None)
            if len(held) == 1:
                self._by_subject[subject] = next(iter(held))
            elif not held:  # (not reached: a dict holds two or more)
                del self._by_subject[subject]

    def sessions_of(self, subject: str) -> list[S]:
        held = self._by_subject.get(subject)
        if held is None:
            return []
        if type(held) is dict:
            return list(held)
        return [held]  # type: ignore[list-item]

    def __len__(self) -> int:
        """How many subjects have a connection."""
        return len(self._by_subject)

    def __contains__(self, subject: object) -> bool:
        return subject in self._by_subject


def sessions_to_close(
    raised: Iterable[Revocation],
    index: SubjectIndex[S],
    revocations: RevocationList,
    now: float,
) -> list[S]:
    """The open connections that ``revocations`` (the new list) revokes among those of the
    subjects in ``raised`` (its new or raised entries): each whose token's subject and ``iat``
    the list refuses at ``now``, and that is not closing already. The index only narrows the
    search: the token itself decides."""
    out: list[S] = []
    for revocation in raised:
        for session in index.sessions_of(revocation.subject):
            claims = session.claims
            if session.closing or claims is None:
                continue
            if revocations.is_revoked(claims.sub, claims.iat, now):
                out.append(session)
    return out


class RevocationWatcher(Generic[S]):
    """Keeps this process's copy of the revocation list (:attr:`current`) and closes the
    connections it revokes (see the module).

    ``close(session)`` ends one connection (the gateway closes it with 4003); ``clock`` is the
    wall clock the entries' times are compared with (unix seconds)."""

    def __init__(
        self,
        redis_client,
        keys: Keys,
        *,
        interval: float,
        metrics: Metrics,
        close: Callable[[S], None],
        clock: Callable[[], float] = time.time,
        read_timeout: float | None = None,
    ) -> None:
        self.redis = redis_client
        self.keys = keys
        self.interval = interval
        self.metrics = metrics
        self.close = close
        self.clock = clock
        self.read_timeout = READ_TIMEOUT if read_timeout is None else read_timeout
        #: The list in force: the last one read (empty until the first read).
        self.current: RevocationList = RevocationList.EMPTY
        #: Set once the list has been read from Redis (readiness waits for it).
        self.loaded = asyncio.Event()
        self.index: SubjectIndex[S] = SubjectIndex()
        #: Polls made, and lists read (the hash's HSCAN); failed polls are counted in the metrics.
        self.polls = 0
        self.loads = 0
        self._version: bytes | None = None
        self._loaded_at = -float("inf")  # monotonic time of the last read of the hash
        self._throttle = LogThrottle()
        self._task: asyncio.Task | None = None
        self._stopped = False

    # --- what the gateway asks -------------------------------------------------------------

    def is_revoked(self, claims: TokenClaims) -> bool:
        """Whether the list in force refuses this token (a dictionary lookup, no I/O)."""
        return self.current.is_revoked(claims.sub, claims.iat, self.clock())

    def subject_changed(self, session: S, previous: str | None, subject: str | None) -> None:
        """``session``'s token now has ``subject`` (None: none), instead of ``previous``."""
        if previous == subject:
            return
        if previous is not None:
            self.index.remove(previous, session)
        if subject is not None:
            self.index.add(subject, session)

    def forget(self, session: S) -> None:
        """``session`` closed."""
        claims = session.claims
        if claims is not None and claims.sub is not None:
            self.index.remove(claims.sub, session)

    # --- the poll --------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="revocations")

    async def stop(self) -> None:
        """Stop polling (without a Redis call). redis-py's reads can swallow a cancel that
        coincides with their own timeout: cancelled until done, boundedly."""
        self._stopped = True
        task, self._task = self._task, None
        if task is None:
            return
        for _ in range(3):
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=1.0)
            if done:
                return

    async def _run(self) -> None:
        while not self._stopped:
            answered = False
            try:
                answered = await self.poll_once()
            except Exception as exc:  # (poll_once catches its own; this is the last guard)
                # A loop that ended here would end revocation on this process for good, with
                # nothing but a line at garbage collection to say so.
                self.metrics.revocation_poll_failures_total += 1
                self._warn("poll_failed", "revocations: a poll failed", error=repr(exc))
            await asyncio.sleep(
                self.interval if answered else min(self.interval, FAILED_POLL_RETRY)
            )

    async def poll_once(self) -> bool:
        """One poll, each of its waits for Redis bounded by :attr:`read_timeout`; never raises
        (but CancelledError). True when Redis answered it."""
        self.polls += 1
        try:
            reply = await self._read()
        except (redis.exceptions.RedisError, OSError) as exc:  # (TimeoutError is an OSError)
            self.metrics.revocation_poll_failures_total += 1
            self._warn(
                "redis_error",
                "revocations: Redis did not answer; the last list stays in force",
                error=describe(exc),
                timeout=self.read_timeout,
                entries=len(self.current),
            )
            return False
        except _ListTooLong:
            # Not read (warned and counted as a foreign key), and no list either: unlike a key
            # of another type, which no publisher writes, a list this long may be real revocations
            # (a publisher of a release whose cap went higher), so a process without a list stays
            # without one, not ready and refusing tokens (fail closed), and looks again soon.
            self.metrics.revocation_poll_failures_total += 1
            return False
        except Exception as exc:  # a reply nobody foresaw must not end the checks
            self.metrics.revocation_poll_failures_total += 1
            self._warn("poll_failed", "revocations: a poll failed", error=repr(exc))
            return False
        if reply is not None:
            self._apply(reply.revocations, reply.malformed, reply.raised)
        self.loaded.set()
        return True

    async def _read(self) -> _Loaded | None:
        """The new list, or None when it is unchanged (or unreadable: counted, the last list
        stays)."""
        keys = self.keys
        version_key = keys.revocations_version()
        # Each wait for Redis is bounded, not the whole read: a hung Redis ends the poll within
        # read_timeout wherever it stops, and a large list takes what its slices take (a bound
        # on the whole read made a list of ~700,000 entries unreadable for good on a loaded
        # machine: every poll timed out, new pods never became ready).
        timeout = self.read_timeout
        try:
            async with asyncio.timeout(timeout):
                # Its first bytes only, not GET: a version key another writer filled with
                # megabytes would be fetched whole every second by every process. More than
                # _MAX_VERSION_DIGITS is no version anyway; an empty value reads as no key.
                version = await self.redis.getrange(version_key, 0, _MAX_VERSION_DIGITS) or None
        except redis.exceptions.ResponseError as exc:
            if not _wrong_type(exc):
                raise  # (CLUSTERDOWN and the like: Redis is unavailable, not the key foreign)
            self._foreign(version_key, "is not a string", b"")
            version = None
            usable = False
        else:
            usable = version is None or _is_version(version)
            if not usable:
                self._foreign(version_key, "is not an integer", version)
        now = time.monotonic()
        if (
            usable
            and self.loaded.is_set()
            and version == self._version
            and now - self._loaded_at < RELOAD_INTERVAL
        ):
            return None
        hash_key = keys.revocations()
        # A slice at a time (HSCAN), not HGETALL: see SCAN_COUNT. Not a snapshot, and need not
        # be: an entry there for the whole read is read (HSCAN's guarantee); one written during
        # it comes with a new version, read before the slices, so the next poll reads it.
        previous = self.current
        entries: dict[str, Revocation] = {}
        raised: dict[str, Revocation] = {}
        malformed = 0
        wall = self.clock()
        cursor = 0
        try:
            # Every entry is held in memory: a hash larger than any publisher writes (another
            # writer's) is not read, one O(1) HLEN first, and a read that grows past the bound
            # is dropped. Its version is not remembered: it is looked at again at every poll.
            async with asyncio.timeout(timeout):
                size = await self.redis.hlen(hash_key)
            if size > MAX_REVOCATIONS:
                self._foreign(hash_key, f"holds {size} fields, more than {MAX_REVOCATIONS}", b"")
                raise _ListTooLong
            while True:
                async with asyncio.timeout(timeout):
                    cursor, items = await self.redis.hscan(hash_key, cursor, count=SCAN_COUNT)
                part, bad = RevocationList.from_hash(items, wall)
                malformed += bad
                for revocation in part:
                    subject = revocation.subject
                    entries[subject] = revocation
                    if _revokes_more(revocation, previous.get(subject)):
                        raised[subject] = revocation
                    else:
                        raised.pop(subject, None)  # (a slice read twice: its last value)
                if len(entries) > MAX_REVOCATIONS:
                    self._foreign(hash_key, f"holds more than {MAX_REVOCATIONS} fields", b"")
                    raise _ListTooLong
                if not cursor:
                    break
        except redis.exceptions.ResponseError as exc:
            if not _wrong_type(exc):
                raise
            self._foreign(hash_key, "is not a hash", b"")
            return None
        self.loads += 1
        self._loaded_at = now
        # An unusable version is not remembered: the hash is read on every poll meanwhile.
        self._version = version if usable else None
        return _Loaded(RevocationList(entries.values()), malformed, list(raised.values()))

    def _apply(self, revocations: RevocationList, malformed: int, raised: list[Revocation]) -> None:
        """Put ``revocations`` in force and close the connections it newly revokes (``raised``:
        its entries that revoke more than the list in force did, :func:`_revokes_more`)."""
        if malformed:
            self.metrics.foreign_values[ForeignKind.REVOCATION_ENTRY.value] += malformed
            self._warn(
                "malformed",
                "revocations: skipped values of the revocation hash that do not parse",
                key=self.keys.revocations(),
                malformed=malformed,
            )
        self.current = revocations
        if not raised:
            return
        closing = sessions_to_close(raised, self.index, revocations, self.clock())
        closed = 0
        for session in closing:
            # The list is in force already: a connection skipped here would not be met again
            # (its entry is no longer new), so a failure to close one must not spare the rest.
            try:
                self.close(session)
            except Exception as exc:
                self._warn(
                    "close_failed", "revocations: closing a connection failed", error=repr(exc)
                )
                continue
            closed += 1
        self.metrics.revocation_disconnects_total += closed
        if closed:
            log.info(
                "closed connections whose token was revoked",
                connections=closed,
                subjects=len(raised),
            )

    def _foreign(self, key: str, problem: str, value: bytes) -> None:
        """A revocation key holds what the event bus cannot have written: counted each time it
        is read (as every foreign value is), logged a few times a minute."""
        self.metrics.foreign_values[ForeignKind.REVOCATION_KEY.value] += 1
        extra = {"sample": value[:80].decode("utf-8", "replace")} if value else {}
        self._warn(
            "foreign_key",
            "revocations: skipped a key the event bus did not write",
            key=key,
            problem=problem,
            **extra,
        )

    def _warn(self, kind: str, event: str, **fields: object) -> None:
        self._throttle.log(kind, log.warning, event, **fields)


def _revokes_more(revocation: Revocation, before: Revocation | None) -> bool:
    """Whether ``revocation`` may refuse a token that ``before`` (the subject's entry in the
    list in force) let in: whether it is new or changed. A superset (a later ``expires_at``
    alone closes nothing: the token decides), but it has to include a revocation written again
    after ``before`` expired, with the same ``issued_before``: the tokens taken meanwhile are
    refused again. Comparing ``issued_before`` alone (risen or not) missed those, and no clock
    can tell them reliably while the hash is read a slice at a time."""
    return revocation != before


class _Loaded(NamedTuple):
    """A list read from Redis: its malformed values (counted), and its entries that are new or
    raised since the list in force when it was read (whose connections to check)."""

    revocations: RevocationList
    malformed: int
    raised: list[Revocation]


def _wrong_type(exc: redis.exceptions.ResponseError) -> bool:
    """Whether Redis refused a command for the key's type (the key is foreign)."""
    return str(exc).startswith("WRONGTYPE")


def _is_version(value: object) -> bool:
    """Whether the version key's value (its first bytes) is a version the revoke script can have
    written (a non-negative integer)."""
    return (
        isinstance(value, bytes)
        and 0 < len(value) <= _MAX_VERSION_DIGITS
        and value.isdigit()  # (bytes.isdigit: ASCII digits only)
    )
