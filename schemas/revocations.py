"""Token revocation: "refuse the tokens of subject S issued before T" (docs/publisher.md).

The publisher writes revocations with the script :data:`schemas.lua.REVOKE`; every gateway
reads them (one ``GETRANGE`` of the version key per poll, the hash a slice at a time,
``HSCAN``, when the version changed) and refuses, and closes, the connections whose token they
name. Both sides agree on what is stored here, with no I/O:

* the hash :meth:`schemas.keys.Keys.revocations`: field = the subject (the token's ``sub``, as
  UTF-8, 1 to :data:`MAX_SUBJECT_BYTES` bytes), value = :func:`encode_entry`'s JSON
  ``{"issued_before":<unix s>,"expires_at":<unix s>}``, exactly that form (no spaces, the two
  fields in that order, whole numbers of 0 to :data:`MAX_TIMESTAMP` without leading zeros,
  ``issued_before`` less than ``expires_at``, which every revocation has). A
  token of that subject whose ``iat`` is earlier than ``issued_before`` is refused while the
  time is before ``expires_at``. Any other field or value is *malformed*: the script removes it
  when it sees it, the readers leave it out (and count it);
* the version key :meth:`schemas.keys.Keys.revocations_version`: a decimal integer that changes
  on every revocation (the readers reload the hash when it differs from the one they saw).

The hash holds at most a cap of fields (:data:`DEFAULT_MAX_REVOCATIONS` unless the publisher
is given another): every live entry is in each reader's memory. The script refuses a new
subject when the hash is full after its sweep (:func:`parse_full_error` reads that refusal);
a subject already in the hash is always updated.

:class:`RevocationList` is a reader's snapshot of the hash.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import ClassVar

import msgspec

from schemas import tokens

__all__ = [
    "DEFAULT_MAX_REVOCATIONS",
    "FULL_MARK",
    "MAX_REVOCATIONS",
    "MAX_SUBJECT_BYTES",
    "MAX_TIMESTAMP",
    "REVOKE_SWEEP",
    "MalformedRevocation",
    "Revocation",
    "RevocationList",
    "RevokeReply",
    "decode_entry",
    "decode_subject",
    "encode_entry",
    "parse_full_error",
    "parse_revoke_reply",
]

#: Longest subject, in UTF-8 bytes (:data:`schemas.tokens.MAX_SUBJECT_BYTES`: no token has a
#: longer one): longer ones are refused by the publisher's ``revoke_tokens`` (and by the
#: script) and left out (as malformed) when read.
MAX_SUBJECT_BYTES = tokens.MAX_SUBJECT_BYTES
#: Entries the revoke script reads at most per call (schemas.lua.REVOKE): a hash of up to this
#: many is read whole, a larger one this many at a time.
REVOKE_SWEEP = 500
#: Most fields the revocations hash may hold, unless the publisher is given another cap
#: (``max_revocations``): the script refuses a new subject beyond it (schemas.lua.REVOKE). Each
#: gateway process holds every live entry (~250 bytes for a subject of the size of a user id,
#: 36 characters: ~24 MB at 100,000; more with long subjects) and re-reads them all when the
#: list changes: ~0.3 s at 100,000.
DEFAULT_MAX_REVOCATIONS = 100_000
#: The largest cap a publisher may be given, and the most fields a gateway reads: a hash of more
#: (only another writer can make one) is not read, as a hash of another type (~250 MB in every
#: gateway process at this size; 10 million would be ~2.5 GB, read whole).
MAX_REVOCATIONS = 1_000_000
#: Prefix of the error reply with which the script refuses a new subject on a full hash:
#: ``EVENTBUS_REVOCATIONS_FULL <fields in the hash> <cap>``.
FULL_MARK = "EVENTBUS_REVOCATIONS_FULL "
#: Largest ``issued_before``/``expires_at``: the largest integer every reader (a Lua number, a
#: JavaScript number) holds exactly, as for a token's ``exp`` (schemas.tokens.MAX_EXP).
MAX_TIMESTAMP = 2**53 - 1

#: The one form of a stored value (what encode_entry writes, what the script writes and parses
#: with the same rule: see schemas.lua.REVOKE).
_ENTRY_RE = re.compile(
    rb'\{"issued_before":(0|[1-9][0-9]{0,15}),"expires_at":(0|[1-9][0-9]{0,15})\}'
)


class Revocation(msgspec.Struct, frozen=True):
    """Tokens of ``subject`` whose ``iat`` is earlier than ``issued_before`` are refused while the
    time (unix seconds) is earlier than ``expires_at``."""

    subject: str
    issued_before: int
    expires_at: int


class MalformedRevocation(ValueError):
    """A field or value of the revocations hash that the publisher cannot have written."""


def encode_entry(revocation: Revocation) -> bytes:
    """The hash value of ``revocation`` (its subject is the hash field, not part of it).

    Raises ``ValueError`` for what :func:`decode_entry` would refuse: times that are not
    integers of 0 to :data:`MAX_TIMESTAMP`, ``issued_before`` not less than ``expires_at``."""
    values = (revocation.issued_before, revocation.expires_at)
    for value in values:
        if type(value) is not int or not 0 <= value <= MAX_TIMESTAMP:
            raise ValueError(f"revocation times must be integers of 0 to {MAX_TIMESTAMP}")
    if values[0] >= values[1]:
        raise ValueError("issued_before must be less than expires_at")
    return b'{"issued_before":%d,"expires_at":%d}' % values


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):  # a client with decode_responses=True
        try:
            return value.encode()
        except UnicodeEncodeError:
            raise MalformedRevocation("not text") from None
    raise MalformedRevocation(f"expected bytes, got {type(value).__name__}")


def decode_subject(subject: object) -> str:
    """The subject of a hash field: 1 to :data:`MAX_SUBJECT_BYTES` bytes of UTF-8, or
    :class:`MalformedRevocation`."""
    raw = _as_bytes(subject)
    if not 0 < len(raw) <= MAX_SUBJECT_BYTES:
        raise MalformedRevocation(f"a subject must be 1 to {MAX_SUBJECT_BYTES} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise MalformedRevocation("a subject must be UTF-8") from None


def decode_entry(subject: bytes, value: bytes) -> Revocation:
    """The revocation stored under hash field ``subject`` with ``value``.

    Raises :class:`MalformedRevocation` (and nothing else, whatever the arguments) for a field
    or value that is not of the one form the publisher writes (see the module's docstring)."""
    name = decode_subject(subject)
    match = _ENTRY_RE.fullmatch(_as_bytes(value))
    if match is None:
        raise MalformedRevocation('expected {"issued_before":<int>,"expires_at":<int>}')
    issued_before, expires_at = int(match.group(1)), int(match.group(2))
    if expires_at > MAX_TIMESTAMP:  # (and so is issued_before, below it)
        raise MalformedRevocation(f"revocation times must be at most {MAX_TIMESTAMP}")
    if issued_before >= expires_at:
        raise MalformedRevocation("issued_before must be less than expires_at")
    return Revocation(name, issued_before, expires_at)


class RevocationList:
    """A snapshot of the revocations hash: subject -> :class:`Revocation`. Immutable."""

    __slots__ = ("_entries",)

    EMPTY: ClassVar[RevocationList]

    def __init__(self, revocations: Iterable[Revocation] = ()) -> None:
        entries: dict[str, Revocation] = {}
        for revocation in revocations:
            entries[revocation.subject] = revocation
        self._entries = entries

    @classmethod
    def from_hash(cls, items: Mapping[bytes, bytes], now: float) -> tuple[RevocationList, int]:
        """Parse ``HGETALL``'s reply; expired (``now >= expires_at``) and malformed entries are
        left out. Returns the list and the number of malformed entries (for a counter).

        Never raises for what the mapping holds (any keys and values: each is an entry or a
        malformed one)."""
        kept: list[Revocation] = []
        malformed = 0
        for field, value in items.items():
            try:
                revocation = decode_entry(field, value)
            except MalformedRevocation:
                malformed += 1
                continue
            if now < revocation.expires_at:
                kept.append(revocation)
        return cls(kept), malformed

    def is_revoked(self, subject: str | None, issued_at: int | None, now: float) -> bool:
        """Whether a token of ``subject`` issued at ``issued_at`` (its ``iat``) is revoked at
        ``now``.

        ``subject`` None (a token without ``sub``) -> False: only tokens with a subject can be
        revoked. ``issued_at`` None (a token without ``iat``) counts as issued at 0: revoked by
        any live entry of its subject."""
        if subject is None:
            return False
        revocation = self._entries.get(subject)
        if revocation is None or now >= revocation.expires_at:
            return False
        return (issued_at if issued_at is not None else 0) < revocation.issued_before

    def get(self, subject: str) -> Revocation | None:
        """The entry of ``subject`` (expired or not), or None."""
        return self._entries.get(subject)

    def __iter__(self) -> Iterator[Revocation]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"RevocationList({list(self._entries.values())!r})"


RevocationList.EMPTY = RevocationList()


class RevokeReply(msgspec.Struct, frozen=True):
    """What :data:`schemas.lua.REVOKE` answers: the subject's entry after the merge, and the
    new version of the hash."""

    revocation: Revocation
    version: int


def parse_revoke_reply(subject: str, reply: object) -> RevokeReply:
    """Check the REVOKE script's reply ``[issued_before, expires_at, version]`` (integers) at
    the boundary; anything else (not Redis, or a broken proxy) raises ``ValueError``."""
    if isinstance(reply, list | tuple) and len(reply) == 3:
        issued_before, expires_at, version = reply
        if (
            all(type(value) is int for value in reply)
            and 0 <= issued_before < expires_at <= MAX_TIMESTAMP
            and version > 0
        ):
            return RevokeReply(Revocation(subject, issued_before, expires_at), version)
    raise ValueError(f"unexpected reply from the revoke script: {reply!r}"[:300])


_FULL_RE = re.compile(re.escape(FULL_MARK) + r"([0-9]{1,16}) ([0-9]{1,16})(?: |\Z)")


def parse_full_error(text: str) -> tuple[int, int] | None:
    """``(fields in the hash, cap)`` from the REVOKE script's refusal of a new subject on a full
    hash (:data:`FULL_MARK`, followed in Redis 7 by `` script: ...``), else None (any other
    error reply)."""
    match = _FULL_RE.match(text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))
