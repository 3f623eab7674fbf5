"""Redis key and channel names, and the format of what is stored and published under them.

Every name for a project carries the hash tag ``{<project_id>}`` so that the stream, its metadata,
its idempotency keys and its (sharded) pub/sub channel live in one Redis Cluster slot, which is what
lets one Lua script touch them all atomically.

Layout for project 42 with the default prefix ``eventbus``::

    eventbus:{42}:meta      hash    epoch -> random id of this history, seq -> last sequence number
    eventbus:{42}:stream    stream  entry id "<seq>-0", fields f=<frame>, t=<unix ms>
    eventbus:{42}:live      channel messages "<epoch>|<seq>|<published unix ms>|<frame>"
    eventbus:{42}:idem:<k>  string  "<epoch>|<seq>|<digest>" of the first publish with key k
                                    (records of the older form "<epoch>|<seq>" are still read)
    eventbus:{42}:presence:pods     zset    gateway pod id -> deadline (Redis time, unix ms)
    eventbus:{42}:presence:versions hash    pod id -> version of that pod's member records
    eventbus:{42}:presence:pod:<p>  hash    member id -> JSON record, the members on pod p
    eventbus:{42}:presence          channel "<pod>|<version>|<JSON changes>" (docs/presence.md)

Token revocations are not a project's: they live in a slot of their own (hash tag
``{revocations}``), written by one script (``schemas.lua.REVOKE``, see schemas/revocations.py)::

    eventbus:{revocations}:subjects hash    subject -> {"issued_before":<s>,"expires_at":<s>}
    eventbus:{revocations}:version  string  integer, changed by every revocation

A *frame* is the event's JSON with ``"seq":<n>`` appended: exactly the bytes a browser receives.
An *epoch* names one history of a project (:func:`new_epoch` makes candidates); a cursor is only
meaningful together with its epoch.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
from typing import NamedTuple

__all__ = [
    "DEFAULT_PREFIX",
    "Envelope",
    "Keys",
    "MalformedEnvelope",
    "new_epoch",
    "parse_envelope",
]

DEFAULT_PREFIX = "eventbus"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
_EPOCH_RE = re.compile(rb"^[A-Za-z0-9_-]{1,64}\Z")


class Keys:
    """All Redis names of the event bus, under one prefix (one prefix per deployment)."""

    __slots__ = ("_channel_re", "_presence_re", "prefix")

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"key prefix must match {_PREFIX_RE.pattern}, got {prefix!r}")
        self.prefix = prefix
        self._channel_re = re.compile(
            rb"^" + re.escape(prefix.encode()) + rb":\{([1-9][0-9]{0,15})\}:live$"
        )
        self._presence_re = re.compile(
            rb"^" + re.escape(prefix.encode()) + rb":\{([1-9][0-9]{0,15})\}:presence$"
        )

    def meta(self, project_id: int) -> str:
        return f"{self.prefix}:{{{project_id}}}:meta"

    def stream(self, project_id: int) -> str:
        return f"{self.prefix}:{{{project_id}}}:stream"

    def channel(self, project_id: int) -> str:
        return f"{self.prefix}:{{{project_id}}}:live"

    def idempotency(self, project_id: int, key: str) -> str:
        return f"{self.prefix}:{{{project_id}}}:idem:{key}"

    # Presence (docs/presence.md, schemas/presence.py): all in the project's slot, so one script
    # reads or writes a project's presence atomically, also on Redis Cluster.

    def presence_pods(self, project_id: int) -> str:
        return f"{self.prefix}:{{{project_id}}}:presence:pods"

    def presence_versions(self, project_id: int) -> str:
        return f"{self.prefix}:{{{project_id}}}:presence:versions"

    def presence_pod_prefix(self, project_id: int) -> str:
        """Prefix of the per-pod member hashes: append the pod id."""
        return f"{self.prefix}:{{{project_id}}}:presence:pod:"

    def presence_pod(self, project_id: int, pod_id: str) -> str:
        return self.presence_pod_prefix(project_id) + pod_id

    def presence_channel(self, project_id: int) -> str:
        return f"{self.prefix}:{{{project_id}}}:presence"

    # Token revocations (schemas/revocations.py): one slot for the whole deployment, so that the
    # revoke script updates the hash and its version atomically, also on Redis Cluster.

    def revocations(self) -> str:
        """The hash of revoked subjects (field: the subject, value: schemas.revocations)."""
        return f"{self.prefix}:{{revocations}}:subjects"

    def revocations_version(self) -> str:
        """The integer that changes with every revocation: readers reload the hash when it
        differs from the one they last saw."""
        return f"{self.prefix}:{{revocations}}:version"

    def project_of_presence_channel(self, channel: bytes | str) -> int | None:
        """The project id a presence channel name belongs to, or None for another channel."""
        if isinstance(channel, str):
            channel = channel.encode()
        match = self._presence_re.match(channel)
        return int(match.group(1)) if match else None

    def project_of_channel(self, channel: bytes | str) -> int | None:
        """The project id a channel name belongs to, or None for a foreign channel."""
        if isinstance(channel, str):
            channel = channel.encode()
        match = self._channel_re.match(channel)
        return int(match.group(1)) if match else None


class Envelope(NamedTuple):
    """One event as published on a project's channel."""

    epoch: str
    seq: int
    frame: bytes
    published_ms: int = 0  # Redis server time of the publish, for relay-lag metrics


class MalformedEnvelope(ValueError):
    """A channel message that was not written by the publish script."""


def parse_envelope(data: bytes) -> Envelope:
    """Split a channel message ``<epoch>|<seq>|<ms>|<frame>`` without decoding the frame's JSON.

    Raises :class:`MalformedEnvelope` for anything the publish script cannot have written.
    """
    if not isinstance(data, bytes | bytearray):
        raise MalformedEnvelope("expected bytes")
    parts = data.split(b"|", 3)
    if len(parts) != 4:
        raise MalformedEnvelope("expected '<epoch>|<seq>|<ms>|<frame>'")
    epoch, seq, published_ms, frame = parts
    if not _EPOCH_RE.match(epoch):
        raise MalformedEnvelope("invalid epoch")
    if not seq.isdigit() or len(seq) > 16 or seq[0:1] == b"0":
        raise MalformedEnvelope("invalid sequence number")
    if not published_ms.isdigit() or len(published_ms) > 16:
        raise MalformedEnvelope("invalid publish time")
    if not (frame.startswith(b"{") and frame.endswith(b"}")):
        raise MalformedEnvelope("frame is not a JSON object")
    return Envelope(epoch.decode(), int(seq), bytes(frame), int(published_ms))


def stream_entry_seq(entry_id: bytes | str) -> int:
    """The sequence number of a stream entry id ``"<seq>-0"``; ValueError when ``entry_id``
    does not start with one (a foreign entry's, or not an id at all: not text)."""
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    elif not isinstance(entry_id, str):
        raise ValueError(f"not a stream entry id: {entry_id!r}"[:80])
    return int(entry_id.partition("-")[0])


# --- epochs -------------------------------------------------------------------------------------


class _EpochSource:
    """Unique candidate epochs without a ``getrandom()`` system call per publish.

    Every publish passes a candidate epoch (the script uses it only when it creates a history),
    so this is on the hot path: a system call there cost ~5 us of publish latency. A candidate is
    a random 72-bit per-process prefix plus a counter: unique within the process by the counter,
    across processes by the prefix. A forked child draws a new prefix, so parent and child never
    share a sequence of candidates.
    """

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = secrets.token_urlsafe(9)  # 12 URL-safe characters
        self._counter = itertools.count()  # next() is atomic under the GIL: thread-safe

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"


_epochs = _EpochSource()


def new_epoch() -> str:
    """A new unique history id: URL-safe, 13 to 28 characters, 72 random bits per process."""
    return _epochs()
