"""Validation of every value the gateway reads from Redis (pure: no I/O).

Anything in Redis may have been written by someone else than the event bus: an operator's
``XADD`` or ``HSET`` by hand, another application sharing the prefix, a bug, a corrupted restore.
Each value is therefore checked once, at the boundary, by the functions here. A value the
publish script cannot have written raises :class:`ForeignValue`, which says which kind of value
it was and what is wrong with it; the caller skips it, counts it and logs it (see
``gateway.store.ForeignValues``), and the project carries on as the delivery guarantee says.

What is checked, and why it is enough (the gateway never decodes an event's JSON on its hot path):

* a **frame** (stream field ``f``, or the last part of a channel message) is valid UTF-8, starts
  with ``{`` and ends with ``}``, and is at most :data:`MAX_FRAME_BYTES` long. The publish script
  builds every frame by splicing ``,"seq":N}`` into a JSON object the publisher encoded (an event
  whose every field is bounded by the contract: ~30 KB at most), so a frame of ours always
  passes; a frame that passes is safe to send as a WebSocket text frame (valid UTF-8 is what
  browsers require; anything else makes them fail the connection) that every client accepts
  (the Python consumer's limit is 4 MiB: a larger one closed its connection, every project's,
  on every replay that reached it).
* a **channel message** is ``<epoch>|<seq>|<unix ms>|<frame>`` (:func:`parse_channel_message`).
* a **stream entry** has the id ``<seq>-0`` and a field ``f`` holding a frame
  (:func:`parse_stream_entry`).
* a **meta hash** has ``epoch`` (1-64 characters of ``[A-Za-z0-9_-]``) and ``seq`` (a decimal
  integer, at most 15 digits so it stays exact everywhere) (:func:`parse_meta`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from typing import NamedTuple

from schemas.keys import Envelope, MalformedEnvelope, parse_envelope

__all__ = [
    "MAX_FRAME_BYTES",
    "ForeignKind",
    "ForeignValue",
    "Meta",
    "check_frame",
    "parse_channel_message",
    "parse_meta",
    "parse_stream_entries",
    "parse_stream_entry",
]

#: Largest frame the gateway relays: far above any event of the contract, below every client's
#: message limit (the Python consumer's is 4 MiB).
MAX_FRAME_BYTES = 1 << 20

_EPOCH_RE = re.compile(rb"^[A-Za-z0-9_-]{1,64}\Z")
_SEQ_RE = re.compile(rb"^(?:0|[1-9][0-9]{0,14})\Z")
_ENTRY_ID_RE = re.compile(rb"^([1-9][0-9]{0,14})-0\Z")


class ForeignKind(enum.StrEnum):
    """Which kind of stored value was foreign (the ``kind`` label of the metric)."""

    #: A message on a project's channel that the publish script cannot have written.
    CHANNEL_MESSAGE = "channel_message"
    #: A channel message numbered beyond the project's history (forged, or lost in a failover).
    CHANNEL_SEQ = "channel_seq"
    #: A stream entry with a foreign id, without a field ``f``, or with an invalid frame.
    STREAM_ENTRY = "stream_entry"
    #: The stream key holds another type than a stream.
    STREAM_KEY = "stream_key"
    #: The meta key holds another type than a hash, or its epoch or seq is invalid.
    META = "meta"


class ForeignValue(ValueError):
    """A value read from Redis that the event bus cannot have written."""

    def __init__(self, kind: ForeignKind, problem: str) -> None:
        super().__init__(problem)
        self.kind = kind
        self.problem = problem


def check_frame(frame: object, kind: ForeignKind) -> bytes:
    """``frame`` as bytes when it is a frame the publish script can have built (see the module
    doc), else :class:`ForeignValue` of ``kind``."""
    if not isinstance(frame, bytes | bytearray):
        raise ForeignValue(kind, "frame is not a string")
    if not (frame.startswith(b"{") and frame.endswith(b"}")):
        raise ForeignValue(kind, "frame is not a JSON object")
    if len(frame) > MAX_FRAME_BYTES:
        raise ForeignValue(kind, f"frame is longer than {MAX_FRAME_BYTES} bytes")
    if not frame.isascii():  # the common case costs one fast scan; only non-ASCII is decoded
        try:
            frame.decode("utf-8")
        except UnicodeDecodeError:
            raise ForeignValue(kind, "frame is not valid UTF-8") from None
    return bytes(frame)


def parse_channel_message(data: object) -> Envelope:
    """A channel message ``<epoch>|<seq>|<unix ms>|<frame>``, or :class:`ForeignValue`."""
    try:
        envelope = parse_envelope(data)  # type: ignore[arg-type]
    except MalformedEnvelope as exc:
        raise ForeignValue(ForeignKind.CHANNEL_MESSAGE, str(exc)) from None
    check_frame(envelope.frame, ForeignKind.CHANNEL_MESSAGE)
    return envelope


def parse_stream_entry(entry_id: object, fields: object) -> tuple[int, bytes]:
    """``(seq, frame)`` of one stream entry as ``XRANGE`` returns it (a flat
    ``[field, value, ...]`` list inside a script, a dict through redis-py), or
    :class:`ForeignValue`."""
    kind = ForeignKind.STREAM_ENTRY
    if isinstance(entry_id, str):
        entry_id = entry_id.encode()
    match = _ENTRY_ID_RE.match(entry_id) if isinstance(entry_id, bytes) else None
    if match is None:
        raise ForeignValue(kind, "entry id is not '<seq>-0'")
    if isinstance(fields, dict):
        frame = fields.get(b"f")
    elif isinstance(fields, list | tuple):
        # Field names are at even positions; a value that happens to be b"f" is not a name.
        names = fields[0::2]
        frame = fields[2 * names.index(b"f") + 1] if b"f" in names[: len(fields) // 2] else None
    else:
        frame = None
    if frame is None:
        raise ForeignValue(kind, "entry has no field 'f'")
    return int(match.group(1)), check_frame(frame, kind)


class Meta(NamedTuple):
    """A project's cursor as its meta hash holds it."""

    epoch: str
    seq: int


def parse_meta(epoch: object, seq: object) -> Meta | None:
    """The ``epoch`` and ``seq`` fields of a meta hash (``HMGET`` results): the cursor, ``None``
    when the project has no history (no epoch: the publish script creates one then), or
    :class:`ForeignValue`."""
    if epoch is None:
        return None
    if not isinstance(epoch, bytes) or not _EPOCH_RE.match(epoch):
        raise ForeignValue(ForeignKind.META, "epoch is not 1-64 characters of [A-Za-z0-9_-]")
    if not isinstance(seq, bytes) or not _SEQ_RE.match(seq):
        raise ForeignValue(ForeignKind.META, "seq is not a non-negative integer")
    return Meta(epoch.decode(), int(seq))


def parse_stream_entries(
    raw_entries: Sequence[object],
) -> tuple[list[tuple[int, bytes]], list[tuple[int | None, ForeignValue]]]:
    """Parse the entries of one ``XRANGE`` in order: the valid ``(seq, frame)`` entries, and the
    foreign ones as ``(seq or None when the id itself is foreign, ForeignValue)``."""
    good: list[tuple[int, bytes]] = []
    bad: list[tuple[int | None, ForeignValue]] = []
    for raw in raw_entries:
        entry_id, fields = _pair(raw)
        try:
            good.append(parse_stream_entry(entry_id, fields))
        except ForeignValue as exc:
            bad.append((_entry_seq(entry_id), exc))
    return good, bad


def _pair(raw: object) -> tuple[object, object]:
    if isinstance(raw, list | tuple) and len(raw) == 2:
        return raw[0], raw[1]
    return None, None


def _entry_seq(entry_id: object) -> int | None:
    if isinstance(entry_id, str):
        entry_id = entry_id.encode()
    match = _ENTRY_ID_RE.match(entry_id) if isinstance(entry_id, bytes) else None
    return int(match.group(1)) if match else None


# --- idempotency records (read by the publish script; this is its rule, in Python) -------------


class IdempotencyRecord(NamedTuple):
    """What the publish script remembers under an idempotency key or a retry guard."""

    epoch: str
    seq: int
    #: Hex digest of the event (publisher.core.event_digest); None for retry guards and for
    #: records written before digests existed: such a record answers without a conflict check.
    digest: str | None


_RECORD_RE = re.compile(rb"^([A-Za-z0-9_-]+)\|([1-9][0-9]{0,14})(?:\|([0-9A-Fa-f]+))?\Z")


def parse_idempotency_record(value: object) -> IdempotencyRecord | None:
    """An idempotency record ``<epoch>|<seq>`` or ``<epoch>|<seq>|<digest>``, or None when the
    publish script cannot have written it.

    The check itself runs inside the publish script (``schemas.lua.PUBLISH``), which refuses a
    key holding anything else ("is not an idempotency record") before writing; this function is
    the same rule for Python readers, and ``tests/test_publisher_edges.py`` checks that the two
    agree on arbitrary values. A record whose epoch is not the project's current one is stale.
    """
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")
    match = _RECORD_RE.match(value) if isinstance(value, bytes) else None
    if match is None:
        return None
    epoch, seq, digest = match.groups()
    return IdempotencyRecord(epoch.decode(), int(seq), digest.decode() if digest else None)
