"""Presence as stored in Redis: the record format, the merge rule and the three Lua scripts.

Shared by the gateway (which writes and reads presence) and the publisher (which reads it), so it
lives in the contract package and does no I/O. The design is in docs/presence.md; the key names
are in :mod:`schemas.keys`.

Each gateway *pod* (process) owns, per project, one hash of the members connected to it::

    eventbus:{42}:presence:pod:<pod>   member id -> record JSON (one per member, tabs merged)
    eventbus:{42}:presence:pods        zset: pod -> deadline (Redis server time, unix ms)
    eventbus:{42}:presence:versions    hash: pod -> version of that pod's hash

A pod keeps its deadline ahead by refreshing; a pod past its deadline is dead and its members are
gone (every script ignores it, and the write and refresh scripts delete it). So is a pod whose
deadline is further ahead than any pod can set it (now + :data:`MAX_TTL_MS`): no pod wrote it,
and kept it would list that pod's members for ever. Every write bumps
the pod's version and is announced on the project's presence channel as::

    <pod>|<version>|<base>|<JSON object: member id -> record, or null for a member who left>

``base`` is the version the changes apply to, or ``0`` when the message is the pod's complete
member list (a replacement). A reader whose copy of the pod is at ``base`` applies the changes;
one that is further behind has missed a message and re-reads the project (:data:`READ`).
A write whose changes would take more than the pod's announcement bound
(:func:`fits_announcement`, ``--presence-max-announcement``) is announced without them, as
``<pod>|<version>|<base>|`` (nothing after the last ``|``): the records are in Redis, and a
reader behind that version re-reads the project instead of receiving them. Redis closes a
pub/sub connection whose queued messages pass its output buffer limit (every channel of the
pod then goes through a reconnect), so one project's large write must never be published whole.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, NamedTuple

import msgspec
from msgspec import Meta

from schemas.protocol import ItemId, Member
from schemas.tokens import MAX_NAME_LENGTH

__all__ = [
    "DEFAULT_MAX_ANNOUNCEMENT",
    "DEFAULT_MAX_MEMBERS",
    "LISTED_PODS",
    "MAX_ANNOUNCEMENT_LIMIT",
    "MAX_MEMBER_ID_BYTES",
    "MAX_MEMBER_ID_LENGTH",
    "MAX_RECORD_BYTES",
    "MAX_TTL_MS",
    "READ",
    "REFRESH",
    "WRITE",
    "Announcement",
    "MalformedAnnouncement",
    "MalformedReadReply",
    "OversizedAnnouncement",
    "PodRecord",
    "PodState",
    "announced_bytes",
    "decode_record",
    "encode_record",
    "fits_announcement",
    "listed_limit",
    "merge_member",
    "merge_pods",
    "parse_announcement",
    "parse_read_reply",
    "read_args",
    "read_left_out",
    "read_limit",
    "record_digest",
]


#: Unix milliseconds, as a browser reads them exactly.
UnixMs = Annotated[int, Meta(ge=0, le=2**53 - 1)]
#: A display name as :func:`schemas.tokens.verify_token` passes it on.
Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
#: Longest member id (a token's ``sub``) listed in presence: OpenID Connect's bound on ``sub``
#: (255 ASCII characters). Every presence message carries every member's id, so without a bound
#: a backend that put user info in ``sub`` made each message of a 1,000-member project
#: megabytes, past what clients accept (the Python consumer's 4 MiB).
MAX_MEMBER_ID_LENGTH = 255
#: Longest member id in bytes (UTF-8): what :data:`READ` sends at most of one.
MAX_MEMBER_ID_BYTES = 4 * MAX_MEMBER_ID_LENGTH
#: Longest record a pod can write (:func:`encode_record`): a 200-character name of characters
#: JSON escapes (6 bytes each), two item ids and two times, with room to spare. :data:`READ`
#: never sends a longer value: only another writer can have stored it.
MAX_RECORD_BYTES = 2048
#: Longest time a pod sets its deadline ahead (ms): the ttl of its refreshes and its drain
#: grace may not exceed it (checked by ``gateway.config`` and ``PresenceService``; the scripts
#: also cut a longer ttl to it). A deadline further ahead than now + this is no pod's: another
#: writer's (``+inf`` included) or a corrupted one, which would list that pod's members for
#: ever. The scripts take such a pod for dead, as one whose deadline passed. 10 minutes: 60
#: times the default ttl and 40 times the default grace.
MAX_TTL_MS = 600_000
#: ``--presence-max-members``' default: the members listed per project.
DEFAULT_MAX_MEMBERS = 1_000
#: A member id: a token's ``sub``, never empty (:meth:`gateway.presence.PresenceCore.join`).
MemberId = Annotated[str, Meta(min_length=1, max_length=MAX_MEMBER_ID_LENGTH)]


class PodRecord(msgspec.Struct, frozen=True, array_like=True):
    """One member as one pod sees it (its tabs there merged): stored as a JSON array.

    ``at`` orders activity reports (unix ms of the pod that took it); the most recent wins the
    merge. ``since`` is when the member's earliest open tab joined (unix ms). The field types
    are what a pod can write (a token's name, the protocol's item ids): decoding refuses
    anything else, so another writer's values never reach a browser.
    """

    name: Name | None
    viewing: ItemId | None
    answering: ItemId | None
    since: UnixMs
    at: UnixMs


_record_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(PodRecord)
_changes_decoder = msgspec.json.Decoder(dict[MemberId, PodRecord | None])


def encode_record(record: PodRecord) -> bytes:
    return _record_encoder.encode(record)


_TOO_DEEP = "nested too deeply to be read"


def decode_record(data: bytes | str) -> PodRecord:
    """Raises ``msgspec.DecodeError`` (a ``ValueError``) for anything :func:`encode_record`
    cannot have written (a value nested near the recursion limit, too: 2,048 bytes hold a
    thousand levels, and msgspec reads a trailing foreign value to its end)."""
    try:
        return _record_decoder.decode(data)
    except RecursionError:
        raise msgspec.DecodeError(_TOO_DEEP) from None


def records_digest(records: Mapping[str, PodRecord]) -> int:
    """What :data:`REFRESH` compares a pod's records hash with, to know it holds exactly what
    the pod wrote: the sum (mod 2**48) of each record's digest, the first 48 bits of the SHA-1
    of ``<id length in bytes>:<id><record JSON>``, so in no particular order (Redis gives a
    hash's fields in none)."""
    return sum(record_digest(m, r) for m, r in records.items()) % DIGEST_MODULUS


#: :func:`records_digest` is a sum modulo this (48 bits: exact in Lua's doubles).
DIGEST_MODULUS = 2**48


def record_digest(member_id: str, record: PodRecord) -> int:
    """One record's part of :func:`records_digest` (a pod keeps them, so that a change costs
    the digest of the record that changed, not of all)."""
    key = member_id.encode()
    pair = b"%d:%s%s" % (len(key), key, encode_record(record))
    return int.from_bytes(hashlib.sha1(pair).digest()[:6], "big")


def merge_member(member_id: str, records: Iterable[tuple[str, PodRecord]]) -> Member:
    """One member from its records on several pods (``(pod id, record)`` pairs, at least one).

    The activity and name are those of the most recent report (``at``; ties go to the greater pod
    id, so every pod computes the same member); ``since`` is the earliest.
    """
    latest: tuple[int, str, PodRecord] | None = None
    since: int | None = None
    for pod, record in records:
        if latest is None or (record.at, pod) > (latest[0], latest[1]):
            latest = (record.at, pod, record)
        since = record.since if since is None else min(since, record.since)
    if latest is None or since is None:
        raise ValueError("a member needs at least one record")
    winner = latest[2]
    return Member(
        id=member_id,
        name=winner.name,
        viewing=winner.viewing,
        answering=winner.answering,
        since=since,
    )


def merge_pods(pods: Mapping[str, Mapping[str, PodRecord]]) -> dict[str, Member]:
    """The members of a project from every live pod's records (pod id -> member id -> record)."""
    by_member: dict[str, list[tuple[str, PodRecord]]] = {}
    for pod, records in pods.items():
        for member_id, record in records.items():
            by_member.setdefault(member_id, []).append((pod, record))
    return {member_id: merge_member(member_id, recs) for member_id, recs in by_member.items()}


class PodState(NamedTuple):
    """One pod's part of a project as read from Redis."""

    version: int
    records: dict[str, PodRecord]


_POD_RE = re.compile(rb"^[A-Za-z0-9_-]{1,64}\Z")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def _pod_and_version(pod: Any, version: Any) -> tuple[str, int] | None:
    """A pod id and its version as the scripts write them, or None for anything else."""
    if not isinstance(pod, bytes | bytearray):
        pod = str(pod).encode("utf-8", "replace")
    if not isinstance(version, bytes | bytearray):
        version = str(version).encode()
    if not _POD_RE.match(pod) or not version.isdigit() or len(version) > 18:
        return None
    return pod.decode(), int(version)


def parse_versions(flat: list) -> dict[str, int]:
    """A versions hash as ``HGETALL`` returns it (pod, version, ...): pod id -> version. Entries
    the scripts cannot have written (another writer to Redis) are skipped."""
    out = {}
    for i in range(0, len(flat) - 1, 2):
        parsed = _pod_and_version(flat[i], flat[i + 1])
        if parsed is not None:
            out[parsed[0]] = parsed[1]
    return out


class MalformedReadReply(ValueError):
    """A reply that :data:`READ` cannot have given (not values in Redis: the reply's shape
    itself, from a server or proxy that is not Redis, or broken)."""


def read_left_out(reply: list) -> int:
    """How many pods and members the :data:`READ` of ``reply`` left out for the most members
    (:func:`read_limit`): records no pod can have written. Raises :class:`MalformedReadReply`."""
    _check_read_reply(reply)
    return reply[1]


def _check_read_reply(reply: object) -> None:
    # The script's shape: {{pod, version, {member, record, ...}}, ...}, left out count}.
    if not (
        isinstance(reply, list)
        and len(reply) == 2
        and isinstance(reply[0], list)
        and all(isinstance(entry, list) and len(entry) == 3 for entry in reply[0])
        and isinstance(reply[1], int)
    ):
        raise MalformedReadReply(f"unexpected reply from the presence read: {reply!r}"[:300])


def parse_read_reply(reply: list) -> dict[str, PodState]:
    """The reply of :data:`READ`: pod id -> its state. Pods and records the scripts cannot have
    written are skipped (another writer to Redis: presence is advisory, one bad record must not
    hide the rest). A reply of another shape raises :class:`MalformedReadReply`."""
    _check_read_reply(reply)
    pods: dict[str, PodState] = {}
    for entry in reply[0]:
        parsed = _pod_and_version(entry[0], entry[1])
        if parsed is None or not isinstance(entry[2], list):
            continue
        (pod, version), flat = parsed, entry[2]
        records: dict[str, PodRecord] = {}
        for i in range(0, len(flat) - 1, 2):
            member, value = flat[i], flat[i + 1]
            if not isinstance(member, bytes | str) or not isinstance(value, bytes | str):
                continue  # a nested reply: not a hash field the scripts wrote
            if not member or len(member) > MAX_MEMBER_ID_BYTES:
                continue  # no pod lists a member without an id, or with a longer one
            try:
                member_id = _text(member)
                if len(member_id) <= MAX_MEMBER_ID_LENGTH:
                    records[member_id] = decode_record(value)
            except (msgspec.DecodeError, UnicodeDecodeError):
                continue
        pods[pod] = PodState(version, records)
    return pods


class Announcement(NamedTuple):
    """A message of a project's presence channel: changes of one pod's member records."""

    pod: str
    version: int
    base: int  # 0: ``changes`` is the pod's complete member list
    #: None: the write was too large to announce (:func:`fits_announcement`); its records are
    #: in Redis, and a reader that lacks ``version`` reads the project.
    changes: dict[str, PodRecord | None] | None


class MalformedAnnouncement(ValueError):
    """A presence channel message that :data:`WRITE` cannot have published."""


#: Longest entry of an announcement's changes a pod publishes: a member id JSON-encoded by
#: :data:`WRITE` (cjson: at most 6 bytes a character, ``\u001f``), quotes, a colon, a record
#: and a comma.
_ANNOUNCED_BYTES = 6 * MAX_MEMBER_ID_LENGTH + 3 + MAX_RECORD_BYTES + 1

#: ``--presence-max-announcement``' default: the most bytes of changes one announcement carries.
#: A pod of 1,000 members with ordinary ids and names (~100 bytes each) still announces its
#: complete list; a write of more (many joins or activity reports in one write interval, long
#: ids and names) is announced without its records, and the other pods read the project.
DEFAULT_MAX_ANNOUNCEMENT = 256 * 1024
#: The largest ``--presence-max-announcement``: half of Redis's default soft limit on a pub/sub
#: connection's queued output (``client-output-buffer-limit pubsub 32mb 8mb 60``: 8 MB for 60 s,
#: or 32 MB at once, and Redis closes the connection).
MAX_ANNOUNCEMENT_LIMIT = 4 * 1024 * 1024

# Characters cjson writes as 6 bytes (\u0000 to \u001f, \u007f; some of them in 2, counted as
# 6: a bound) and as 2 (\" \\ \/).
_CJSON_SIX = re.compile(r"[\x00-\x1f\x7f]")
_CJSON_TWO = re.compile(r'["\\/]')


def announced_bytes(changes: Mapping[str, PodRecord | None]) -> int:
    """At most how many bytes the changes part of :data:`WRITE`'s announcement of ``changes``
    takes (the JSON object after the last ``|``): ids as cjson encodes them, records as
    :func:`encode_record` does, ``null`` for a member who left. Never less than the real size."""
    total = 2 + max(len(changes) - 1, 0)  # braces, commas
    for member_id, record in changes.items():
        total += len(member_id.encode()) + 3  # quotes, colon
        total += 5 * len(_CJSON_SIX.findall(member_id)) + len(_CJSON_TWO.findall(member_id))
        total += 4 if record is None else len(encode_record(record))
    return total


def fits_announcement(changes: Mapping[str, PodRecord | None], limit: int) -> bool:
    """Whether a write of ``changes`` is announced with them: its changes take at most
    ``limit`` bytes (``--presence-max-announcement``). Costs nothing up to ``limit`` divided by
    the longest entry a pod writes (~3.6 KB: 73 members at the default), and one encoding of
    each record past that."""
    if 2 + len(changes) * _ANNOUNCED_BYTES <= limit:
        return True
    return announced_bytes(changes) <= limit


class OversizedAnnouncement(MalformedAnnouncement):
    """A well-formed presence announcement of more members than any pod writes at once."""


def parse_announcement(data: bytes, most: int | None = None) -> Announcement:
    """Raises :class:`MalformedAnnouncement` for anything :data:`WRITE` cannot have published,
    and for changes of more than ``most`` members (:func:`read_limit`: no pod writes that many
    at once; one that did, churning, is re-read at its next announcement, whose base is then
    unknown). Nothing after the last ``|``: an announcement without its records
    (``changes`` None; :func:`fits_announcement`)."""
    parts = bytes(data).split(b"|", 3)
    if most is not None and len(parts) == 4 and len(parts[3]) > 2 + most * _ANNOUNCED_BYTES:
        # more than ``most`` entries, or entries longer than a pod writes: either way refused,
        # here without decoding it (300,000 entries, 11 MB, took 0.66 s of the event loop)
        raise OversizedAnnouncement(f"changes of {len(parts[3])} bytes")
    if (
        len(parts) != 4
        or not _POD_RE.match(parts[0])
        or not parts[1].isdigit()
        or not parts[2].isdigit()
        or len(parts[1]) > 18
        or len(parts[2]) > 18
    ):
        raise MalformedAnnouncement("expected '<pod>|<version>|<base>|<changes>'")
    if not parts[3]:
        return Announcement(parts[0].decode(), int(parts[1]), int(parts[2]), None)
    try:
        changes = _changes_decoder.decode(parts[3])
    except msgspec.DecodeError as exc:
        raise MalformedAnnouncement(str(exc)) from None
    except RecursionError:  # (it escaped to the pub/sub link: every channel resubscribed)
        raise MalformedAnnouncement(_TOO_DEEP) from None
    if most is not None and len(changes) > most:
        raise OversizedAnnouncement(f"changes of {len(changes)} members, more than {most}")
    return Announcement(parts[0].decode(), int(parts[1]), int(parts[2]), changes)


# --- scripts ----------------------------------------------------------------------------------
# All three declare the project's pods zset and versions hash as KEYS; the per-pod hashes are
# named from a prefix argument (same slot: "{<project>}"), since they are created and deleted
# by the scripts (see schemas/lua.py on why keys that may not exist are not declared).

_NOW_AND_PRUNE = """
local MAX_TTL = __MAX_TTL_MS__
-- Presence is soft state that the live pods rebuild: an index key holding another type (another
-- writer's) is deleted, never anything else, and the pods write their records again at their
-- next write or refresh, as after a flush. Counted in the reply.
local repaired = 0
for i, kind in ipairs({'zset', 'hash'}) do
  local found = redis.call('TYPE', KEYS[i])['ok']
  if found ~= kind and found ~= 'none' then
    redis.call('DEL', KEYS[i])
    repaired = repaired + 1
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Dead: a deadline passed, or one no pod can have set (beyond now + the longest ttl: another
-- writer's, +inf included), which would keep the pod's members listed for ever. Both are
-- removed with the pod's records and version; the impossible ones are counted as repairs.
local function prune(low, high)
  local dead = redis.call('ZRANGEBYSCORE', KEYS[1], low, high)
  for _, p in ipairs(dead) do
    redis.call('DEL', ARGV[1] .. p)
    redis.call('HDEL', KEYS[2], p)
  end
  if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], low, high) end
  return #dead
end
prune('-inf', now)
repaired = repaired + prune('(' .. (now + MAX_TTL), '+inf')
-- Whether a pod's records are as the pod last stored them (version, and a hash to hold them).
local function intact(pod, version)
  return redis.call('HGET', KEYS[2], pod) == version
    and redis.call('TYPE', ARGV[1] .. pod)['ok'] == 'hash'
end
local function keep_alive(pod, ttl)
  ttl = math.min(ttl, MAX_TTL)  -- a longer deadline would read as impossible, the pod as dead
  redis.call('ZADD', KEYS[1], now + ttl, pod)
  redis.call('PEXPIRE', ARGV[1] .. pod, ttl)
  -- the two index keys live as long as the longest-lived pod
  for _, k in ipairs(KEYS) do
    if redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
  end
end
""".replace("__MAX_TTL_MS__", str(MAX_TTL_MS))

#: Write one pod's member changes in a project and announce them.
#:
#: KEYS: pods, versions. ARGV: pod hash prefix, pod, ttl ms, base version ('0' = replace the
#: pod's hash), new version, publish command ('PUBLISH' or 'SPUBLISH'), channel, whether the
#: announcement carries the changes ('1') or not ('0': too large, :func:`fits_announcement`),
#: then pairs of member id, record JSON ('' = the member left this pod).
#: Returns {applied, repaired}: applied 1, or 0 without writing when the pod's stored version is
#: not ``base`` or its records key is not a hash (Redis lost the pod's hash: flushed, restarted,
#: the pod was taken for dead, or another writer replaced it): the caller then writes its
#: complete member list with base '0'. An empty hash removes the pod from the project.
#: ``repaired``: index keys of another type deleted (another writer's; rebuilt by the pods),
#: plus pods removed for a deadline no pod can have set (beyond now + :data:`MAX_TTL_MS`).
WRITE = (
    _NOW_AND_PRUNE
    + """
local pod, ttl, base = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local hash = ARGV[1] .. pod
if base ~= '0' and not intact(pod, base) then return {0, repaired} end
if base == '0' then redis.call('DEL', hash) end
for i = 9, #ARGV - 1, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', hash, ARGV[i])
  else
    redis.call('HSET', hash, ARGV[i], ARGV[i + 1])
  end
end
if redis.call('EXISTS', hash) == 1 then
  redis.call('HSET', KEYS[2], pod, ARGV[5])
  keep_alive(pod, ttl)
else
  redis.call('ZREM', KEYS[1], pod)
  redis.call('HDEL', KEYS[2], pod)
end
if #ARGV >= 9 or base == '0' then
  -- Too large to announce (Redis would close the pub/sub connections it queues on): the other
  -- pods read the records instead, so the body stays empty.
  local body = ''
  if ARGV[8] == '1' then
    -- records are JSON already: splice them in rather than decode and re-encode them
    local parts = {}
    for i = 9, #ARGV - 1, 2 do
      local value = ARGV[i + 1]
      if value == '' then value = 'null' end
      parts[#parts + 1] = cjson.encode(ARGV[i]) .. ':' .. value
    end
    body = '{' .. table.concat(parts, ',') .. '}'
  end
  redis.call(ARGV[6], ARGV[7], pod .. '|' .. ARGV[5] .. '|' .. base .. '|' .. body)
end
return {1, repaired}
"""
)

#: Keep a pod's members alive in a project (one call per project per refresh interval), prune
#: dead pods, and report every live pod's version.
#:
#: KEYS: pods, versions. ARGV: pod hash prefix, pod ('' = only prune and report), ttl ms, the
#: version the pod expects to be stored, and optionally how many records it expects there
#: ('' or absent: not checked; the pod gives it when it has no write pending there) and their
#: :func:`records_digest` ('' or absent: not checked).
#: Returns {ok, {pod, version, pod, version, ...}, repaired}: ok 0 when the pod's stored version
#: is not the expected one or its records key is not a hash (its records were lost: the caller
#: rewrites them with :data:`WRITE`, base '0'), or when the records there are not as many as
#: expected, or not as the pod wrote them (their digest differs: another writer added,
#: removed, replaced or changed some: rewritten so too, and counted in
#: ``repaired``); the pods listed are those with a version and a deadline ahead, by at most
#: :data:`MAX_TTL_MS` (a version without a deadline is deleted); ``repaired`` as for
#: :data:`WRITE`.
REFRESH = (
    _NOW_AND_PRUNE
    + """
-- records_digest() of a pod's records hash: the sum of each pair's digest, in any order.
local function digest(hash)
  local flat = redis.call('HGETALL', hash)
  local sum = 0
  for i = 1, #flat - 1, 2 do
    local pair = #flat[i] .. ':' .. flat[i] .. flat[i + 1]
    -- 48 bits: every sum stays exact in Lua's doubles (below 2^53)
    sum = (sum + tonumber(string.sub(redis.sha1hex(pair), 1, 12), 16)) % 281474976710656
  end
  return sum
end
local ok = 1
if ARGV[2] ~= '' then
  local hash = ARGV[1] .. ARGV[2]
  if not intact(ARGV[2], ARGV[4]) then
    ok = 0
  elseif ARGV[5] and ARGV[5] ~= '' and (
      redis.call('HLEN', hash) ~= tonumber(ARGV[5])
      or (ARGV[6] and ARGV[6] ~= '' and digest(hash) ~= tonumber(ARGV[6]))) then
    -- Members the pod did not write (another writer's, listed by every read for as long as
    -- the pod lives), some of its own removed, or records not as it wrote them (as many, but
    -- another member in one's place, or a record changed): it writes them whole again.
    ok = 0
    repaired = repaired + 1
  else
    keep_alive(ARGV[2], tonumber(ARGV[3]))
  end
end
-- Live: a version and a deadline ahead. A version without a deadline (the pods zset lost while
-- the versions hash stayed) would be reported live forever, its pod's members never leaving
-- any view: it is dropped. A live pod in that state rewrites its records at its next refresh.
local live = {}
local versions = redis.call('HGETALL', KEYS[2])
for i = 1, #versions - 1, 2 do
  if redis.call('ZSCORE', KEYS[1], versions[i]) then
    live[#live + 1] = versions[i]
    live[#live + 1] = versions[i + 1]
  else
    redis.call('HDEL', KEYS[2], versions[i])
  end
end
return {ok, live, repaired}
"""
)

#: A project's presence, atomically: every live pod's version and records. Read-only.
#:
#: KEYS: pods, versions. ARGV: pod hash prefix, longest member id and longest record (bytes),
#: the most members of one pod and the most members in all (see :func:`read_args`; without
#: the last, as before it was added, the most of one pod is the most in all): a pair with
#: a longer id or record, which no pod writes, is left out in Redis instead of being sent
#: (another writer's 100 MB value would cost every read 100 MB); so is, whole, a pod with more
#: records than the most of one pod (no pod lists that many: another writer's, say 1,000,000
#: forged members, which cost a gateway 75 MB of frame and 5 s of CPU per read), and so are
#: live pods past that many (each legitimate pod lists at least one member); past the most
#: members in all, further members are left out, and further pods' records are not read (their
#: count is): 1,000 forged pods of 2,064 records each blocked Redis 2.7 s per read when each
#: was read to be left out (~60 ms now).
#: Returns {{{pod, version, {member, record, ...}}, ...}, left out} for the pods whose deadline
#: is ahead (and at most :data:`MAX_TTL_MS` ahead: one further is no pod's, and the pod is dead
#: as one whose deadline passed; WRITE and REFRESH delete it) and whose records key is a hash:
#: one that is not (another writer) is skipped, not an error that would hide every other pod's
#: members for as long as the key stays. ``left out`` counts the pods and members left out for
#: the most members (the caller counts them). An index key of another
#: type reads as no pods (nobody is listed) until the live pods replace it at their next write
#: or refresh (:data:`WRITE`, :data:`REFRESH`); a project no pod refreshes has nobody to list.
READ = """
local MAX_TTL = __MAX_TTL_MS__
if redis.call('TYPE', KEYS[1])['ok'] ~= 'zset' or redis.call('TYPE', KEYS[2])['ok'] ~= 'hash' then
  return {{}, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
local longest_id, longest_record, most = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local listing = tonumber(ARGV[5]) or most  -- callers of before listed_limit: ARGV[4] in all
local low, high = '(' .. now, now + MAX_TTL
local live = redis.call('ZRANGEBYSCORE', KEYS[1], low, high, 'LIMIT', 0, most)
local left_out = redis.call('ZCOUNT', KEYS[1], low, high) - #live
local seen, listed = {}, 0
for _, p in ipairs(live) do
  local version = redis.call('HGET', KEYS[2], p)
  local size = redis.pcall('HLEN', ARGV[1] .. p)
  if version and type(size) == 'number' then
    if size > most then
      left_out = left_out + 1
    elseif listed >= listing then
      -- The most members in all are listed: the pod's records are counted, not read (another
      -- writer's pods would otherwise cost Redis a read of up to most x most records).
      left_out = left_out + size
      out[#out + 1] = {p, version, {}}
    else
      local records = redis.call('HGETALL', ARGV[1] .. p)
      local kept = {}
      for i = 1, #records - 1, 2 do
        local id = records[i]
        if #id <= longest_id and #records[i + 1] <= longest_record then
          if seen[id] or listed < listing then
            if not seen[id] then
              seen[id] = true
              listed = listed + 1
            end
            kept[#kept + 1] = id
            kept[#kept + 1] = records[i + 1]
          else
            left_out = left_out + 1
          end
        end
      end
      out[#out + 1] = {p, version, kept}
    end
  end
end
return {out, left_out}
""".replace("__MAX_TTL_MS__", str(MAX_TTL_MS))


#: A read or a view lists at most this many pods' worth of members (:func:`listed_limit`).
LISTED_PODS = 16


def read_limit(max_members: int = DEFAULT_MAX_MEMBERS) -> int:
    """The most members one pod lists in a project, and the most pods a presence read
    (:data:`READ`) or a pod's view looks at, for a deployment whose ``--presence-max-members``
    is ``max_members``: twice it, plus 64. A pod checks the cap at least against its own tabs,
    so a pod listing more holds records no pod wrote (another writer's)."""
    return 2 * max_members + 64


def listed_limit(max_members: int = DEFAULT_MAX_MEMBERS) -> int:
    """The most members a presence read or a pod's view of a project lists in all:
    :data:`LISTED_PODS` times :func:`read_limit` (33,024 with the default cap). Not the cap
    itself: a pod without a view of the project (none of its tabs asked for presence) checks
    the cap against its own tabs only, so pods together can list up to pods x cap, every one
    of them admitted (a bound of twice the cap cut 36 of 300 real members with three such pods
    at cap 100). The bound is against another writer's millions of forged members."""
    return LISTED_PODS * read_limit(max_members)


def read_args(pod_prefix: str, max_members: int = DEFAULT_MAX_MEMBERS) -> list[str | int]:
    """The ARGV of :data:`READ` for a project whose pod hashes start with ``pod_prefix``, in a
    deployment whose ``--presence-max-members`` is ``max_members``."""
    return [
        pod_prefix,
        MAX_MEMBER_ID_BYTES,
        MAX_RECORD_BYTES,
        read_limit(max_members),
        listed_limit(max_members),
    ]
