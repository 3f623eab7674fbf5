"""The sans-I/O half of the publisher: turning events into Lua script calls and back.

:class:`~publisher.Publisher` and :class:`~publisher.AsyncPublisher` only add the Redis round
trips around these functions, so both flavours behave identically.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import NamedTuple

import msgspec

from schemas.events import ProjectEvent, encode_event, utc_now
from schemas.keys import Keys, new_epoch
from schemas.revocations import (
    DEFAULT_MAX_REVOCATIONS,
    MAX_REVOCATIONS,
    MAX_SUBJECT_BYTES,
    MAX_TIMESTAMP,
    parse_full_error,
)
from schemas.tags import stored_tag
from schemas.tokens import is_text

__all__ = [
    "Cursor",
    "IdempotencyConflict",
    "PreparedBatch",
    "PublishError",
    "PublishManyError",
    "PublishManyUnavailable",
    "PublisherUnavailable",
    "Republished",
    "Retention",
    "RetryPolicy",
    "RevocationListFull",
    "check_max_revocations",
    "check_positive",
    "in_order_outcome",
    "new_epoch",
    "pack_command",
    "plan_batches",
    "plan_in_order",
    "prepare_revocation",
    "prepare_single",
]

#: Events per script call in ``publish_many``: large enough to amortise the round trip, small
#: enough to keep one script from blocking Redis for long (about a millisecond).
BATCH_SIZE = 500
#: Script calls per ``MULTI``/``EXEC`` round trip in ``publish_many(..., in_order=True)``: about
#: 1-2 ms of Redis time for keyed calls, which other clients wait for.
TRANSACTION_SIZE = 100
_IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,200}\Z")


class PublishError(Exception):
    """Base of the publisher's own errors (validation errors are ``EventValidationError``)."""


class PublisherUnavailable(PublishError):
    """Redis could not be reached (refused, reset, timed out, hung, busy running another
    client's script (``BUSY``), a replica refusing writes (``READONLY``: the address led to a
    replica during a failover), or answered what no Redis can: a broken proxy) within the
    publisher's ``timeout``. Nothing was published, or, if the
    script was sent before the connection failed, the event may have been published exactly
    once: pass an ``idempotency_key`` to make retrying such a publish safe."""


class IdempotencyConflict(PublishError):
    """An idempotency key was used again, within its window and the same epoch, for a different
    event (another type, or any field other than the event's own timestamp). Nothing was written;
    ``cursor`` is where the first event under ``key`` was published."""

    def __init__(self, key: str, cursor: Cursor) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used for a different event "
            f"(published at epoch {cursor.epoch!r}, seq {cursor.seq}); nothing was written"
        )
        self.key = key
        self.cursor = cursor


class RevocationListFull(PublishError):
    """``revoke_tokens`` of a subject not in the revocation list, which holds ``limit`` entries
    (the publisher's ``max_revocations``) even after the expired ones the call swept. Nothing
    was revoked: no entry was added or changed and the list's version did not move (the
    expired and malformed entries the call read are removed all the same: no gateway uses
    them, and the next call finds more room). A subject already in the list is still updated
    at the cap.

    What to do (docs/publisher.md, "When the list is full"): raise ``max_revocations`` (on
    every publisher that revokes), revoke with a shorter ``keep_for`` so that entries leave
    sooner, or rotate the token signing secret, which logs everyone out and makes the list
    useless (then delete its hash). ``entries``: the fields the hash holds, after the sweep."""

    def __init__(self, entries: int, limit: int) -> None:
        super().__init__(
            f"the token revocation list is full ({entries} entries, at most {limit}): a new "
            "subject cannot be added, nothing was revoked (raise max_revocations, revoke with "
            "a shorter keep_for, or rotate the signing secret)"
        )
        self.entries = entries
        self.limit = limit


class PublishManyError(PublishError):
    """``publish_many``: Redis refused some of the burst's script calls (e.g. a project whose
    keys another writer damaged) while the others were applied.

    ``cursors`` has one entry per input event, in the input order: the event's cursor if it was
    published, ``None`` if nothing of it was written. ``errors`` maps each project that failed to
    its error. Retrying exactly the events at ``unpublished`` neither loses nor duplicates any
    (those at ``maybe_published``: under the same idempotency keys).

    ``stopped_at`` (``in_order=True`` only, else ``None``): the index of the event whose call was
    refused first, or the first event of the round trip that failed without an answer (Redis
    lost or hung, a transaction whose outcome is unknown) after earlier ones were published.
    Every event before it was published, and no round trip after its own was sent;
    ``errors[events[stopped_at].project_id]`` is why it stopped (then ``__cause__`` too).

    ``maybe_published`` (indices, empty unless a round trip failed without an answer): the
    events that round trip (or the transaction sent before it, whose calls were being sent again
    one by one) may have run. Their ``cursors`` are ``None`` although each may have been
    published (the connection lost during ``EXEC``): retry them under the same idempotency keys
    (an event without a key could be published twice). No other event of ``unpublished`` was.
    """

    def __init__(
        self,
        cursors: list[Cursor | None],
        errors: dict[int, PublishError],
        stopped_at: int | None = None,
        maybe_published: range = range(0),
    ) -> None:
        self.cursors = cursors
        self.errors = errors
        self.stopped_at = stopped_at
        self.maybe_published = maybe_published
        self.unpublished = [i for i, cursor in enumerate(cursors) if cursor is None]
        published = len(cursors) - len(self.unpublished)
        reasons = "; ".join(f"project {p}: {e}" for p, e in sorted(errors.items()))
        stop = "" if stopped_at is None else f", stopped at event {stopped_at}"
        if maybe_published:
            first, last = maybe_published[0], maybe_published[-1]
            which = f"event {first}" if first == last else f"events {first} to {last}"
            stop += f" ({which} may have been published)"
        super().__init__(
            f"{len(self.unpublished)} of {len(cursors)} events not published, "
            f"{published} published (see .cursors){stop}: {reasons}"
        )


class PublishManyUnavailable(PublishManyError, PublisherUnavailable):
    """``publish_many(..., in_order=True)``: Redis became unavailable (unreachable, hung, within
    ``timeout``) at a round trip after earlier ones were published. A :class:`PublishManyError`
    (``cursors`` of those, ``stopped_at``, ``maybe_published``) that is also a
    :class:`PublisherUnavailable`, as the same failure was before."""


class RetryPolicy(NamedTuple):
    """When a publisher call tries again after Redis did not answer, and when it gives up.

    A call makes attempts, pausing ``backoff[i]`` seconds before attempt ``i + 2``; it gives up
    with :class:`PublisherUnavailable` when the pauses are used up or when the next attempt could
    end later than ``timeout`` seconds after the call began, an attempt taking at most
    ``attempt_timeout`` when Redis does not answer (one connect plus one read timeout: the
    clients the publisher builds make exactly one connect and one command per attempt). So a call
    never fails later than ``timeout`` (as long as ``attempt_timeout <= timeout``), and re-sends
    the same script call with the same retry guard, so an attempt that reached Redis late is not
    published twice. ``attempt_timeout=None`` (a client you built, with your timeouts and retries)
    means one attempt and no retry by the publisher.
    """

    timeout: float
    attempt_timeout: float | None
    backoff: tuple[float, ...] = (0.0, 0.1, 0.2, 0.4)

    def delay(self, failures: int, elapsed: float) -> float | None:
        """The pause before the next attempt after ``failures`` failed ones, ``elapsed`` seconds
        into the call, or None to give up."""
        if self.attempt_timeout is None or failures > len(self.backoff):
            return None
        pause = self.backoff[failures - 1]
        if elapsed + pause + self.attempt_timeout > self.timeout:
            return None
        return pause


class Cursor(NamedTuple):
    """Position of an event in its project's history."""

    epoch: str
    seq: int
    #: The tag (schemas.tags) of the frame Redis holds at this cursor, as the call that returned
    #: it stored it, or None when that call does not say. ``publish_many(..., in_order=True)``
    #: gives each cursor the tag of the bytes its call sent (the outbox relay records it:
    #: docs/outbox.md); a cursor answered from an idempotency record, a cursor of ``publish``
    #: or of a plain ``publish_many``, and one built from its two numbers carry None. Not a
    #: field: equality, unpacking and ``repr`` are those of ``(epoch, seq)``.
    tag = None  # (a class attribute: a Cursor has no instance attributes)


class Republished(Cursor):
    """A :class:`Cursor` the publish script answered from an idempotency record: the event was
    published before under the same key, and nothing was written now. Equal to, and shown as,
    the plain cursor; what it tells is that Redis holds the *first* publish's bytes there, which
    may differ from this call's encoding of the event (in its timestamps, which the key does
    not compare, or when another version encoded it). Such a cursor of an in-order burst carries
    no tag, unless the publish script found there exactly the frame this call would have
    stored (docs/outbox.md, "Snapshot with a cursor")."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Cursor(epoch={self.epoch!r}, seq={self.seq!r})"


class _Stored(Cursor):
    """A :class:`Cursor` whose call stored its frame, carrying its ``tag`` (no ``__slots__``:
    the tag is an instance attribute); shown as the plain cursor. Pickled as the plain cursor,
    without its tag (see :func:`_as_public`)."""

    __repr__ = Republished.__repr__

    def __reduce__(self) -> tuple[object, ...]:
        return _as_public(Cursor, self)

    def __copy__(self) -> _Stored:
        return self  # (immutable: a copy that dropped the tag would be a loss for nothing)

    def __deepcopy__(self, memo: object) -> _Stored:
        return self


class _RepublishedAsSent(Republished):
    """A :class:`Republished` cursor where Redis holds exactly the frame this call would have
    stored (the publish script compared them: status 3), so this call's payload gives its tag:
    a retry of a call whose reply was lost, or the same bytes published before. Carries the
    tag once :func:`with_stored_tag` gives it one (no ``__slots__``). Pickled as a plain
    :class:`Republished`, without its tag (see :func:`_as_public`)."""

    def __reduce__(self) -> tuple[object, ...]:
        return _as_public(Republished, self)

    def __copy__(self) -> _RepublishedAsSent:
        return self

    def __deepcopy__(self, memo: object) -> _RepublishedAsSent:
        return self


def _as_public(kind: type[Cursor], cursor: Cursor) -> tuple[object, ...]:
    """How a cursor of a private class pickles: as the public ``kind`` with its two numbers,
    which every version of the package has, so that a process of an older version (a rolling
    deploy, a rollback) reads what a newer one pickled (a task queue, a cache). Its tag is not
    kept: ``kind`` cannot hold one, and a cursor without a tag claims nothing."""
    return (kind, (cursor.epoch, cursor.seq))


def _carrying(kind: type[Cursor], cursor: Cursor, tag: str) -> Cursor:
    tagged = kind(cursor.epoch, cursor.seq)
    tagged.tag = tag  # type: ignore[misc]
    return tagged


class Retention(msgspec.Struct, frozen=True):
    """How much history each project keeps for replay.

    Defaults: the last 10,000 events, none older than 24 hours. 24 h matches the contract's
    blocker lifetime, so a dashboard left closed overnight resumes without a full reload; 10,000
    events bounds memory per project (~4 MB at typical event sizes) when a project is busy. Clients
    further behind than this get ``resync_required``. ``max_age`` of 0 keeps events by count only.
    """

    max_len: int = 10_000
    max_age: timedelta = timedelta(hours=24)

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError("Retention.max_len must be >= 1")
        if self.max_age < timedelta(0):
            raise ValueError("Retention.max_age must not be negative")

    @property
    def max_age_ms(self) -> int:
        return int(self.max_age.total_seconds() * 1000)


class PreparedBatch(NamedTuple):
    """One call of the publish script: events of one project, in order."""

    project_id: int
    keys: list[str]
    args: list[bytes | str | int]
    size: int
    positions: list[int]  # index of each event in the caller's list

    def unguarded(self) -> PreparedBatch | None:
        """This call without its retry guard key, or None when it has none (or the caller's own
        idempotency key, which must never be dropped).

        During a Redis Cluster slot migration the importing node refuses a script that touches a
        key it was not given as a key ("non local key"); the guard key cannot be declared (a
        declared key that does not exist yet is refused with TRYAGAIN while the slot migrates),
        so such a call is run once more without it. The refusal happens before anything is
        written, so the second run is not a duplicate.
        """
        key = self.args[IDEMPOTENCY_ARG]
        if not (isinstance(key, str) and GUARD_MARK in key):
            return None
        args = list(self.args)
        args[IDEMPOTENCY_ARG] = ""
        return self._replace(args=args)

    def payloads(self) -> list[bytes]:
        """The encoded events of this call, in order: what the script stores, each with
        ``,"seq":N`` spliced in (schemas.tags.stored_tag gives the tag of that frame)."""
        return self.args[len(self.args) - self.size :]  # type: ignore[return-value]

    def cursors(self, result: object) -> list[Cursor]:
        """The cursors of this call's events from the script's reply.

        A publish answered from its idempotency record gives :class:`Republished` cursors.
        Raises :class:`IdempotencyConflict` when the idempotency key was used for another event,
        and :class:`PublishError` for a reply the script cannot have given.
        """
        reply = parse_reply(result)
        if reply.status == CONFLICT:
            key = str(self.args[IDEMPOTENCY_ARG]).partition(":idem:")[2]
            raise IdempotencyConflict(key, Cursor(reply.epoch, reply.last))
        if reply.last < self.size:
            raise PublishError(f"unexpected reply from the publish script: {result!r}")
        kind = _KINDS[reply.status]
        return [kind(reply.epoch, reply.last - self.size + i + 1) for i in range(self.size)]


#: Statuses of the publish script's reply (see schemas.lua.PUBLISH).
PUBLISHED, DUPLICATE, CONFLICT, DUPLICATE_AS_SENT = 0, 1, 2, 3
#: The cursors of each status but CONFLICT.
_KINDS: dict[int, type[Cursor]] = {
    PUBLISHED: Cursor,
    DUPLICATE: Republished,
    DUPLICATE_AS_SENT: _RepublishedAsSent,
}
_REPLY_EPOCH_RE = re.compile(rb"^[A-Za-z0-9_-]{1,64}\Z")


class ScriptReply(NamedTuple):
    epoch: str
    last: int
    status: int


def parse_reply(result: object) -> ScriptReply:
    """Check the publish script's reply ``[epoch, last seq, status]`` at the boundary: an epoch as
    the script writes it, a positive seq, a known status. Anything else raises PublishError (not
    a bare UnicodeDecodeError or ValueError from deep inside the publisher)."""
    if isinstance(result, list | tuple) and len(result) == 3:
        epoch, last, status = result
        if isinstance(epoch, str):
            epoch = epoch.encode()
        if (
            isinstance(epoch, bytes)
            and _REPLY_EPOCH_RE.match(epoch)
            and isinstance(last, int)
            and 0 < last < 2**53
            and status in (PUBLISHED, DUPLICATE, CONFLICT, DUPLICATE_AS_SENT)
        ):
            return ScriptReply(epoch.decode(), last, status)
    raise PublishError(f"unexpected reply from the publish script: {result!r}"[:300])


def script_reply_valid(result: object) -> bool:
    """Whether ``result`` has the shape of the publish script's reply (a list of three): what
    the publisher's held connections check each reply against, to find one out of step (a stray
    reply of another command before the real one: ``+OK``, an integer, a shorter array), which
    is dropped (see ``DirectCommands.execute``). What the three are is :func:`parse_reply`'s to
    check, once, on the hot path: a full parse here as well cost every publish ~10,000 more
    instructions (+8%, callgrind)."""
    return type(result) is list and len(result) == 3


#: Prefix of the error reply with which the publish script refuses a damaged key.
CORRUPT_MARK = "EVENTBUS_CORRUPT "


def script_error(exc: Exception, action: str = "publish") -> PublishError:
    """The publisher's error for an error reply of the publish (or revoke) script.

    A key another writer damaged (see schemas.lua.PUBLISH, schemas.lua.REVOKE) names that key;
    nothing was written, and every call on that key is refused the same way until the key is
    repaired or deleted (deleting a project's meta key starts a new epoch: clients resync).
    """
    text = str(exc)
    full = parse_full_error(text)
    if full is not None:
        return RevocationListFull(*full)
    if text.startswith(CORRUPT_MARK):
        detail = text[len(CORRUPT_MARK) :].partition(" script:")[0]
        return PublishError(
            f"refused, nothing written: the Redis key {detail} (not written by this publisher: "
            "repair or delete it)"
        )
    return PublishError(f"{action} failed: {text}")


#: Longest ``keep_for`` of a revocation: far longer than any browser token should live (the
#: default lifetime is 15 minutes); a larger value is taken for a mistake of unit (milliseconds
#: given as seconds), which would keep the entry, and its cost to every gateway, for ages.
MAX_KEEP_FOR = timedelta(days=366)
#: How far past the publisher's clock ``issued_before`` may be: the clock skew between the
#: machines that issue tokens. Later would also refuse the tokens they issue until then.
ISSUED_BEFORE_SKEW = timedelta(minutes=1)


def check_positive(value: object, name: str) -> int:
    """``value`` when it is an integer of at least 1 (a bool is not one), else ``ValueError``
    ("<name> must be a positive integer")."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer")
    return value


def check_max_revocations(value: object) -> int:
    """A publisher's ``max_revocations`` (the cap of the revocation list): a whole number of 1
    to :data:`schemas.revocations.MAX_REVOCATIONS` (the most fields a gateway reads: a larger
    list would not be read at all), else ``ValueError``."""
    if type(value) is not int or not 1 <= value <= MAX_REVOCATIONS:
        raise ValueError(
            f"max_revocations must be a whole number of 1 to {MAX_REVOCATIONS}, the most a "
            f"gateway reads (default {DEFAULT_MAX_REVOCATIONS}), got {value!r}"[:200]
        )
    return value


def prepare_revocation(
    subject: object,
    issued_before: datetime | float | None,
    keep_for: timedelta | float,
    *,
    keys: Keys,
    now: float,
    max_entries: int = DEFAULT_MAX_REVOCATIONS,
) -> tuple[list[str], list[str]]:
    """Check the arguments of ``revoke_tokens`` and make the REVOKE script's keys and
    arguments (schemas.lua.REVOKE); ``now`` is the caller's clock (unix seconds),
    ``max_entries`` the cap of the list (checked by :func:`check_max_revocations`).

    ``subject``: a token's ``sub``, text of 1 to 1024 UTF-8 bytes. ``issued_before``: None
    (now, by Redis' clock, rounded up to the next second), an aware ``datetime`` or unix
    seconds, rounded up to a whole second (a token's ``iat`` is whole seconds: one issued at
    12:00:00.5 says 12:00:00); at most :data:`ISSUED_BEFORE_SKEW` past ``now``. ``keep_for``: a
    ``timedelta`` or seconds, more than 0 and at most :data:`MAX_KEEP_FOR`, rounded up; the
    revocation must end after ``now`` (else every token it names has expired already).

    Raises ``ValueError`` naming the argument; nothing is sent then."""
    if (
        not isinstance(subject, str)
        or not is_text(subject)
        or not 0 < len(subject.encode()) <= MAX_SUBJECT_BYTES
    ):
        raise ValueError(
            f"subject must be a non-empty string of at most {MAX_SUBJECT_BYTES} UTF-8 bytes "
            f"(a token's 'sub'), got {subject!r}"[:200]
        )
    keep = _seconds(keep_for, "keep_for")
    if not 0 < keep <= MAX_KEEP_FOR.total_seconds():
        raise ValueError(
            f"keep_for must be more than 0 and at most {MAX_KEEP_FOR.days} days "
            f"(at least the lifetime of the tokens you issue), got {keep_for!r}"
        )
    keep_for_arg = str(math.ceil(keep))
    if issued_before is None:
        before_arg = ""
    else:
        if isinstance(issued_before, datetime):
            if issued_before.tzinfo is None or issued_before.utcoffset() is None:
                raise ValueError("issued_before must be timezone-aware (e.g. datetime.now(UTC))")
            before = issued_before.timestamp()
        else:
            before = _seconds(issued_before, "issued_before")
        if not 0 <= before <= now + ISSUED_BEFORE_SKEW.total_seconds():
            raise ValueError(
                "issued_before must be a time that has passed (unix seconds, at most "
                f"{ISSUED_BEFORE_SKEW.total_seconds():g} s ahead of this clock): a later one "
                f"would also refuse the tokens issued until then; got {issued_before!r}"
            )
        rounded = math.ceil(before)
        if rounded + math.ceil(keep) <= now:
            raise ValueError(
                "issued_before + keep_for has passed: every token this would refuse has expired "
                "already (keep_for must be at least the lifetime of the tokens you issue)"
            )
        if rounded + math.ceil(keep) > MAX_TIMESTAMP:  # (unreachable with the bounds above)
            raise ValueError("issued_before + keep_for is too far in the future")
        before_arg = str(rounded)
    return [keys.revocations(), keys.revocations_version()], [
        subject,
        before_arg,
        keep_for_arg,
        str(check_max_revocations(max_entries)),
    ]


def _seconds(value: object, name: str) -> float:
    """``value`` (a ``timedelta`` or a real number of seconds) in seconds, or ValueError."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if not isinstance(value, bool) and isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond a float's range
            seconds = math.inf
        if math.isfinite(seconds):
            return seconds
    raise ValueError(f"{name} must be a finite number of seconds, got {value!r}"[:200])


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def event_digest(event: ProjectEvent, payload: bytes) -> str:
    """What an idempotency record remembers of its event: a 128-bit BLAKE2b digest of the
    encoded event without its own top-level timestamps.

    Two publishes under one key are the same event when they agree on the type and on every
    field but those timestamps, so a retry that stamps the time anew (the typed helpers default
    to now) is recognised, and anything else is an :class:`IdempotencyConflict`.
    """
    names = _FIELD_NAMES.get(type(event))
    if names is None:  # msgspec.structs.fields costs ~45 us: once per event type
        names = _FIELD_NAMES[type(event)] = tuple(f.name for f in msgspec.structs.fields(event))
    stamps = [name for name in names if isinstance(getattr(event, name), datetime)]
    if stamps:
        document = msgspec.json.decode(payload)
        for name in stamps:
            document.pop(name, None)
        payload = msgspec.json.encode(document)
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


#: Where the publish script's arguments hold the idempotency key (the caller's, or the retry
#: guard's; "" for none): ``ARGV[7]`` in schemas.lua.PUBLISH, as :func:`_common_args` lays them out.
IDEMPOTENCY_ARG = 6


def _common_args(
    retention: Retention,
    idempotency_window: timedelta,
    publish_command: str,
    channel: str,
    idempotency_key: str,
    digest: str = "",
) -> list[bytes | str | int]:
    return [
        new_epoch(),
        retention.max_len,
        retention.max_age_ms,
        int(idempotency_window.total_seconds() * 1000),
        publish_command,
        channel,  # arguments, not keys: see schemas.lua.PUBLISH
        idempotency_key,
        digest,
    ]


def _keys(keys: Keys, project_id: int) -> list[str]:
    return [keys.meta(project_id), keys.stream(project_id)]


#: How long the key that guards a script call against redis-py's own retries is remembered.
#: A retry after a timeout or a dropped connection may reach Redis after the first attempt ran;
#: with the key, it returns the first attempt's cursor instead of publishing the event again.
RETRY_GUARD = timedelta(seconds=60)


GUARD_MARK = ":idem:~"


def _retry_guard_key(keys: Keys, project_id: int) -> str:
    # Unique per call: a random per-process prefix and a counter (see new_epoch).
    return keys.idempotency(project_id, "~" + new_epoch())


def refused_during_migration(exc: BaseException) -> bool:
    """A script refused by a cluster node importing its slot (see PreparedBatch.unguarded)."""
    return "non local key" in str(exc)


def prepare_single(
    event: ProjectEvent,
    *,
    keys: Keys,
    retention: Retention,
    publish_command: str,
    idempotency_key: str | None = None,
    idempotency_window: timedelta = timedelta(minutes=10),
    retry_guard: timedelta | None = RETRY_GUARD,
) -> PreparedBatch:
    """Validate and encode one event into a script call (raises ``EventValidationError``).

    Without an ``idempotency_key``, the call still carries a unique key remembered for
    ``retry_guard``, so that a retry of this very call can never publish the event twice.
    """
    check_retry_guard(retry_guard)
    payload = encode_event(event)
    if idempotency_key is not None:
        _check_idempotency_key(idempotency_key, idempotency_window)
        return _keyed_call(
            event, payload, 0, idempotency_key, keys, retention, publish_command, idempotency_window
        )
    key_name = ""
    if retry_guard:
        key_name = _retry_guard_key(keys, event.project_id)
        idempotency_window = retry_guard
    args = _common_args(
        retention, idempotency_window, publish_command, keys.channel(event.project_id), key_name
    )
    args.append(payload)
    return PreparedBatch(event.project_id, _keys(keys, event.project_id), args, 1, [0])


def valid_idempotency_key(key: object) -> bool:
    """Whether ``key`` is an idempotency key the publisher takes: 1-200 printable ASCII
    characters, no spaces."""
    return isinstance(key, str) and _IDEMPOTENCY_KEY_RE.match(key) is not None


#: The shortest window the publish script can remember a call for: it writes the record with
#: ``SET ... PX <ms>`` after the events, and Redis refuses ``PX`` below 1 (the script would fail
#: half-way, with the events stored and relayed).
MIN_WINDOW = timedelta(milliseconds=1)


def _check_idempotency_key(key: object, window: timedelta) -> None:
    if not valid_idempotency_key(key):
        raise ValueError("idempotency_key must be 1-200 printable ASCII characters, no spaces")
    if window < MIN_WINDOW:
        raise ValueError("idempotency_window must be at least 1 ms")


def check_retry_guard(retry_guard: timedelta | None) -> None:
    """``retry_guard`` is None or 0 (no guard), or at least :data:`MIN_WINDOW`."""
    if retry_guard and retry_guard < MIN_WINDOW:
        raise ValueError("retry_guard must be None, 0 (no guard) or at least 1 ms")


def _keyed_call(
    event: ProjectEvent,
    payload: bytes,
    position: int,
    idempotency_key: str,
    keys: Keys,
    retention: Retention,
    publish_command: str,
    window: timedelta,
) -> PreparedBatch:
    """The script call of one event under the caller's idempotency key (with the digest that
    lets the script tell a retry from another event)."""
    project_id = event.project_id
    args = _common_args(
        retention,
        window,
        publish_command,
        keys.channel(project_id),
        keys.idempotency(project_id, idempotency_key),
        event_digest(event, payload),
    )
    args.append(payload)
    return PreparedBatch(project_id, _keys(keys, project_id), args, 1, [position])


def plan_batches(
    events: Iterable[ProjectEvent],
    *,
    keys: Keys,
    retention: Retention,
    publish_command: str,
    batch_size: int = BATCH_SIZE,
    retry_guard: timedelta | None = RETRY_GUARD,
    idempotency_keys: Iterable[str | None] | None = None,
    idempotency_window: timedelta = timedelta(minutes=10),
) -> list[PreparedBatch]:
    """Validate and encode every event first (so an invalid one publishes nothing), then group
    the events of each project, in the caller's order, into script calls (each guarded against
    retries like :func:`prepare_single`).

    ``idempotency_keys`` (one per event, ``None`` for an event without) makes each keyed event a
    script call of its own under its key, exactly as :func:`prepare_single` would; the events
    without a key between them are grouped as usual. Malformed keys raise ``ValueError``.
    """
    check_retry_guard(retry_guard)
    events = list(events)
    encoded = [(event.project_id, encode_event(event)) for event in events]
    keyed: dict[int, str] = {}
    if idempotency_keys is not None:
        for position, key in enumerate(_one_key_per_event(idempotency_keys, len(events))):
            if key is not None:
                _check_idempotency_key(key, idempotency_window)
                keyed[position] = key
    # Sequences are per project, so only the order within a project is observable: bucket by
    # project (keeping that order) to make script calls as large as possible in mixed bursts.
    by_project: dict[int, list[int]] = {}
    for position, (project_id, _) in enumerate(encoded):
        by_project.setdefault(project_id, []).append(position)
    calls: list[PreparedBatch] = []
    for project_id, positions in by_project.items():
        run: list[int] = []  # consecutive events without a key
        for position in positions:
            key = keyed.get(position)
            if key is None:
                run.append(position)
                continue
            calls.extend(
                _guarded_calls(
                    project_id,
                    run,
                    encoded,
                    keys,
                    retention,
                    publish_command,
                    batch_size,
                    retry_guard,
                )
            )
            run = []
            calls.append(
                _keyed_call(
                    events[position],
                    encoded[position][1],
                    position,
                    key,
                    keys,
                    retention,
                    publish_command,
                    idempotency_window,
                )
            )
        calls.extend(
            _guarded_calls(
                project_id, run, encoded, keys, retention, publish_command, batch_size, retry_guard
            )
        )
    return calls


def _guarded_calls(
    project_id: int,
    positions: list[int],
    encoded: list[tuple[int, bytes]],
    keys: Keys,
    retention: Retention,
    publish_command: str,
    batch_size: int,
    retry_guard: timedelta | None,
) -> Iterator[PreparedBatch]:
    """Script calls of up to ``batch_size`` events of one project, each under a retry guard."""
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        args = _common_args(
            retention,
            retry_guard or timedelta(0),
            publish_command,
            keys.channel(project_id),
            _retry_guard_key(keys, project_id) if retry_guard else "",
        )
        args.extend(encoded[i][1] for i in chunk)
        yield PreparedBatch(project_id, _keys(keys, project_id), args, len(chunk), chunk)


def plan_in_order(
    events: Iterable[ProjectEvent],
    *,
    keys: Keys,
    retention: Retention,
    publish_command: str,
    retry_guard: timedelta | None = RETRY_GUARD,
    idempotency_keys: Iterable[str | None] | None = None,
    idempotency_window: timedelta = timedelta(minutes=10),
) -> list[PreparedBatch]:
    """One script call per event, in the caller's order (``positions`` is ``[i]`` for the
    ``i``-th), each exactly the call :func:`prepare_single` makes for it: under its idempotency
    key, or under a retry guard of its own. Everything is validated and encoded first, so an
    invalid event or key publishes nothing (``EventValidationError``, ``ValueError``, also when
    ``idempotency_keys`` does not have one entry per event)."""
    check_retry_guard(retry_guard)
    events = list(events)
    keyed = _one_key_per_event(idempotency_keys, len(events))
    return [
        prepare_single(
            event,
            keys=keys,
            retention=retention,
            publish_command=publish_command,
            idempotency_key=key,
            idempotency_window=idempotency_window,
            retry_guard=retry_guard,
        )._replace(positions=[position])
        for position, (event, key) in enumerate(zip(events, keyed, strict=True))
    ]


def _one_key_per_event(
    idempotency_keys: Iterable[str | None] | None, count: int
) -> list[str | None]:
    if idempotency_keys is None:
        return [None] * count
    if isinstance(idempotency_keys, str | bytes):  # (else a key per character)
        raise ValueError(
            "idempotency_keys must have one entry per event (a list of keys or None), "
            f"not a {type(idempotency_keys).__name__}"
        )
    idempotency_keys = list(idempotency_keys)
    if len(idempotency_keys) != count:
        raise ValueError(
            f"idempotency_keys must have one entry per event: got {len(idempotency_keys)} "
            f"for {count} events"
        )
    return idempotency_keys


def call_outcome(call: PreparedBatch, reply: object) -> Cursor | PublishError:
    """What one call of one event came to: its cursor, or the error it was refused with (an
    error reply of Redis as :func:`script_error` words it, an :class:`IdempotencyConflict`, or a
    :class:`PublishError` for a reply the script cannot have given)."""
    if isinstance(reply, Exception):
        return reply if isinstance(reply, PublishError) else script_error(reply)
    try:
        return call.cursors(reply)[0]
    except PublishError as exc:
        return exc


def in_order_outcome(
    calls: list[PreparedBatch], replies: list
) -> tuple[list[Cursor | None], int | None, dict[int, PublishError]]:
    """Read the replies to calls of :func:`plan_in_order` sent in order (one ``MULTI``/``EXEC``,
    or one call at a time up to the first refused one): the cursor of each call (``None``: it
    was refused, or had no reply because it was not sent), the index of the first refused call
    (``None``: none was), and each refused project's first error.

    The calls after a refused one in the same transaction ran too: those of other projects are
    published; those of the refused call's project were refused the same way when the refusal
    came from the project's state (a damaged key; OOM refuses every project), but not after an
    error of that one call (an :class:`IdempotencyConflict`): their cursors say so.
    """
    cursors: list[Cursor | None] = [None] * len(calls)
    refused: int | None = None
    errors: dict[int, PublishError] = {}
    for index, (call, reply) in enumerate(zip(calls, replies, strict=False)):
        outcome = call_outcome(call, reply)
        if isinstance(outcome, PublishError):
            errors.setdefault(call.project_id, outcome)
            if refused is None:
                refused = index
        else:
            cursors[index] = with_stored_tag(call, outcome)
    return cursors, refused, errors


def with_stored_tag(call: PreparedBatch, cursor: Cursor) -> Cursor:
    """``cursor``, the reply to ``call`` (a call of one event), carrying the tag of the frame
    Redis holds there (:attr:`Cursor.tag`): the call's payload, the bytes it sent, with
    ``,"seq":N`` spliced in as the publish script does, when the call stored it, or when the
    script found exactly that frame there (a retry whose first reply was lost). Any other
    :class:`Republished` cursor stays as it is (no tag): Redis holds another call's bytes
    there, which may be encoded otherwise."""
    kind = _Stored if type(cursor) is Cursor else type(cursor)
    if kind is Republished:
        return cursor
    return _carrying(kind, cursor, stored_tag(call.payloads()[0], cursor.seq))


def pack_command(*args: bytes | str | int) -> bytes:
    """One Redis command in RESP (an array of bulk strings), encoded as redis-py would encode it
    (``str`` as UTF-8, ``int`` in decimal), in one join: about a third of the cost of redis-py's
    general-purpose ``pack_command`` for a publish call's dozen arguments."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        parts.append(b"$%d\r\n" % len(arg))
        parts.append(arg)
        parts.append(b"\r\n")
    return b"".join(parts)


def now_if_none(value: datetime | None) -> datetime:
    return utc_now() if value is None else value
