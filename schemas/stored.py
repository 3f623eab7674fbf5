"""Validation of every value the gateway reads from Redis (pure: no I/O).

Anything in Redis may have been written by someone else than the event bus: an operator's
``XADD`` or ``HSET`` by hand, another application sharing the prefix, a bug, a corrupted restore.
Each value is therefore checked once, at the boundary, by the functions here. A value the
publish script cannot have written raises :class:`ForeignValue`, which says which kind of value
it was and what is wrong with it; the caller skips it, counts it and logs it (see
``gateway.store.ForeignValues``), and the project carries on as the delivery guarantee says.

What is checked, and why it is enough (the gateway never builds an event from its JSON on its hot
path: it relays the frame's bytes):

* a **frame** (stream field ``f``, or the last part of a channel message) is valid UTF-8, starts
  with ``{`` and ends with ``}``, and is at most :data:`MAX_FRAME_BYTES` long. The publish script
  builds every frame by splicing ``,"seq":N}`` into a JSON object the publisher encoded (an event
  whose every field is bounded by the contract: ~30 KB at most), so a frame of ours always
  passes; a frame that passes is safe to send as a WebSocket text frame (valid UTF-8 is what
  browsers require; anything else makes them fail the connection) that every client accepts
  (the Python consumer's limit is 4 MiB: a larger one closed its connection, every project's,
  on every replay that reached it).
* a frame also **names its place**: it starts ``{"type":"<tag>","project_id":<P>,`` with ``P``
  the project whose key it was read from, and ends ``,"seq":<N>}`` with ``N`` the seq it is
  stored under (the stream entry's id, the channel message's seq). Every event the publisher
  encodes starts with its tag and then ``project_id``, the first field of ``ProjectEvent``
  (msgspec writes the tag first, then the fields in order), and the publish script appends the
  seq; ``tests/test_stored.py`` checks this for every event type. Clients take an event's project
  and seq from these fields, so without the check a frame copied or written into project 1's
  keys that named project 2 was relayed to project 1's subscribers, and a client following both
  projects on one connection took it as project 2's event (and then dropped project 2's real
  event of that seq as a duplicate): garbage in one project's keys corrupted another project.
  This is a bytes check (an anchored regex and an ``endswith``: no JSON is decoded). The tag must
  not be a protocol message's (``authenticated``, ``subscribed``...): clients read the type
  first, and such a frame would act on the connection instead of being an event; nor decode to
  one (``"\\u0061uthenticated"``): a tag with a ``\\u`` escape is decoded by the exact check below.
* a frame holds each of those keys (``type``, ``project_id``, ``seq``) **once at its top level**.
  ``JSON.parse``, msgspec and most decoders keep the last of a repeated key, so
  ``{"type":"blocker_created","project_id":1,...,"project_id":2,"seq":5}`` in project 1's keys,
  which the check above passes, is project 2's event to a client (with a second ``"type"``, a
  protocol message). The publisher never writes one: msgspec encodes the tag and each field
  once, no event has a field ``type`` or ``seq``, and the script appends the seq once. Every
  top-level key but the first follows a comma, so a second one is a comma, JSON whitespace and
  the quoted name (``,"project_id"``), or a key with a ``\\u`` escape: only a frame holding
  either past its header (one regex search and a ``find`` of a backslash, ~0.7 µs on a 400-byte
  ``blocker_created`` frame) is decoded (``json``, only its top-level keys looked at). Such a name
  in a nested object or an array, or a ``\\u`` in a string value, costs that decode and passes; a
  frame that is no JSON there is foreign too. Other keys repeated are not looked for (that would
  decode every frame into objects): they take no event to another project, seq or type, and
  whoever can write them into a project's keys can write any event of that project.
* a frame is **JSON**: last, one validating scan of msgspec that builds nothing (``Raw``; ~0.3
  µs on a 324-byte frame, once per event and pod, not per client). A frame whose header, place
  and encoding are right but whose middle is not JSON (``"blocker_id":,``, another writer's) was
  relayed as stored: every client's parser refused it (eventbus.js resynced only after two
  repairs of the gap), and a poll page embedding it was invalid JSON as a whole.
* a **channel message** is ``<epoch>|<seq>|<unix ms>|<frame>``, the frame of that project and seq
  (:func:`parse_channel_message`).
* a **stream entry** has the id ``<seq>-0`` and a field ``f`` holding a frame of that project and
  seq (:func:`parse_stream_entry`). A reader that already holds a frame of that project checked
  at that seq (the gateway's resume window) may pass it (``checked`` of
  :func:`parse_stream_entries`): an entry whose frame is the same bytes is not checked again,
  since every check above depends only on the bytes, the project and the seq (one ``memcmp``
  instead of ~2-3 µs); its id and field ``f`` still are. Readers never take an entry of more than
  :data:`MAX_ENTRY_BYTES` whole: the history script gives back its weight instead of its content
  (``{'oversize', '<bytes>'}``), so a huge value left in a stream costs a replay nothing.
* a **meta hash** has ``epoch`` (1-64 characters of ``[A-Za-z0-9_-]``) and ``seq`` (a decimal
  integer, at most 15 digits so it stays exact everywhere) (:func:`parse_meta`).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import msgspec

from schemas.keys import Envelope, MalformedEnvelope, parse_envelope
from schemas.protocol import MAX_SEQ, PROTOCOL_TYPES

__all__ = [
    "MAX_ENTRY_BYTES",
    "MAX_EVENT_BYTES",
    "MAX_FRAME_BYTES",
    "CheckedFrames",
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
#: Largest event JSON (what ``schemas.events.encode_event`` returns, which refuses a longer one):
#: the publish script makes its frame ``,"seq":<seq>`` longer (a seq has at most 16 digits), and
#: the frame must fit :data:`MAX_FRAME_BYTES`, else every gateway would skip it as not the bus's.
MAX_EVENT_BYTES = MAX_FRAME_BYTES - len(',"seq":') - len(str(MAX_SEQ))
#: Largest stream entry (the bytes of its field names and values) a history read returns whole:
#: the publish script writes ``f`` (a frame) and ``t`` (a Unix ms), at most this much.
MAX_ENTRY_BYTES = MAX_FRAME_BYTES + 64

_EPOCH_RE = re.compile(rb"^[A-Za-z0-9_-]{1,64}\Z")
_SEQ_RE = re.compile(rb"^(?:0|[1-9][0-9]{0,14})\Z")
_ENTRY_ID_RE = re.compile(rb"^([1-9][0-9]{0,14})-0\Z")
#: The start of every frame the publisher encodes, up to the project id: the tag (a JSON string
#: without quotes, as every event type's is: tests/test_stored.py) then ``project_id``. ``match``
#: anchors it at the start of the frame.
_HEADER_RE = re.compile(rb'\{"type":"[^"]*","project_id":')
#: Decodes a frame only as far as telling whether it is JSON (nothing is built from it).
_JSON_CHECK = msgspec.json.Decoder(msgspec.Raw)
#: Where the tag starts in a frame: after ``{"type":"``.
_TAG_START = 9
_PROTOCOL_TYPE = "frame's type is a protocol message's, not an event's"
#: The keys a client places an event by; a frame holds each once at its top level.
_PLACING_KEYS = frozenset(("type", "project_id", "seq"))
#: A key so named after a comma (and JSON whitespace): how a frame without ``\u`` escapes holds
#: one of them a second time at its top level, past its header (every key but the first follows
#: a comma). Also matches such a key in a nested object; the exact check tells them apart.
_PLACING_KEY_RE = re.compile(rb',[ \t\n\r]*"(?:type|project_id|seq)"')
#: Headers of frames whose type is a protocol message's (``authenticated``, ``subscribed``...):
#: a client reads the type first, so such a "event" would act on its connection (a forged
#: ``authenticated`` moves the browser client's token refresh). No event can have one.
_PROTOCOL_HEADERS = frozenset(b'{"type":"%s","project_id":' % t.encode() for t in PROTOCOL_TYPES)


class ForeignKind(enum.StrEnum):
    """Which kind of stored value was foreign (the ``kind`` label of the metric)."""

    #: A message on a project's channel that the publish script cannot have written (also one
    #: whose frame names another project, or another seq than its envelope).
    CHANNEL_MESSAGE = "channel_message"
    #: A channel message numbered beyond the project's history (forged, or lost in a failover).
    CHANNEL_SEQ = "channel_seq"
    #: A stream entry with a foreign id, without a field ``f``, or with an invalid frame (also
    #: one of another project or seq).
    STREAM_ENTRY = "stream_entry"
    #: The stream key holds another type than a stream.
    STREAM_KEY = "stream_key"
    #: The meta key holds another type than a hash, or its epoch or seq is invalid.
    META = "meta"
    #: A presence index key (a project's ``:presence:pods`` or ``:presence:versions``) held
    #: another type: deleted by a gateway pod, and rebuilt by the live pods.
    PRESENCE_KEY = "presence_key"
    #: A project's presence held more than pods can have written (a pod or an announcement of
    #: over twice ``--presence-max-members`` plus 64 members, more pods than that, or more than
    #: ``schemas.presence.listed_limit`` members in all): left out, counted one per pod, member
    #: or announcement.
    PRESENCE_MEMBERS = "presence_members"
    #: A value of the revocation hash (``Keys.revocations()``) that does not parse as an entry
    #: (``schemas.revocations``): skipped, the other entries stay in force.
    REVOCATION_ENTRY = "revocation_entry"
    #: The revocation hash is not a hash, or its version key is not a string holding an
    #: integer: the gateway keeps its last list (and reads the hash on every poll meanwhile).
    REVOCATION_KEY = "revocation_key"


class ForeignValue(ValueError):
    """A value read from Redis that the event bus cannot have written."""

    def __init__(self, kind: ForeignKind, problem: str) -> None:
        super().__init__(problem)
        self.kind = kind
        self.problem = problem


def check_frame(frame: object, kind: ForeignKind, project_id: int, seq: int) -> bytes:
    """``frame`` as bytes when it is a frame the publish script can have built for event ``seq``
    of project ``project_id`` (see the module doc), else :class:`ForeignValue` of ``kind``."""
    return _check_frame(frame, kind, b"%d," % project_id, b',"seq":%d}' % seq)


def _check_frame(frame: object, kind: ForeignKind, project: bytes, tail: bytes) -> bytes:
    """:func:`check_frame` with the project as ``b"<id>,"`` and the seq as ``b',"seq":<n>}'``
    (made once per read, not once per entry: this runs for every event the gateway relays)."""
    if type(frame) is not bytes:  # (what redis-py gives; the check is cheaper than isinstance)
        if not isinstance(frame, bytearray):
            raise ForeignValue(kind, "frame is not a string")
        frame = bytes(frame)
    header = _HEADER_RE.match(frame)
    if (
        header is None
        or frame[: header.end()] in _PROTOCOL_HEADERS
        or not frame.startswith(project, header.end())
        or not frame.endswith(tail)
        or len(frame) > MAX_FRAME_BYTES
    ):
        raise ForeignValue(kind, _frame_problem(frame, project, tail))
    if not frame.isascii():  # the common case costs one fast scan; only non-ASCII is decoded
        try:
            frame.decode("utf-8")
        except UnicodeDecodeError:
            raise ForeignValue(kind, "frame is not valid UTF-8") from None
    # A placing key repeated at the top level, or an escaped protocol type (module doc): the
    # common case costs one regex search and one memchr; only a frame with a key so named past its
    # header, or a \u escape past "type", is decoded.
    if (
        _PLACING_KEY_RE.search(frame, header.end(), len(frame) - len(tail) + 1) is not None
        or (frame.find(b"\\", _TAG_START) >= 0 and frame.find(b"\\u", _TAG_START) >= 0)
    ) and (problem := _top_level_problem(frame)) is not None:
        raise ForeignValue(kind, problem)  # (every check before this one passed)
    try:
        _JSON_CHECK.decode(frame)
    except msgspec.DecodeError:
        raise ForeignValue(kind, "frame is not valid JSON") from None
    return frame


def _top_level_problem(frame: bytes) -> str | None:
    """The exact check behind the cheap test of :func:`_check_frame`: what is wrong with the top
    level of ``frame`` (valid UTF-8) as a JSON decoder reads it (escapes decoded, whitespace
    skipped): a key a client places an event by held twice, a type that is a protocol message's
    once decoded, or no JSON at all (no client can read it). None when none of these."""
    top: list[list[tuple[str, object]]] = [[]]

    def keep(pairs: list[tuple[str, object]]) -> None:
        top[0] = pairs  # objects end inside out: the top level is the last one

    try:  # (numbers kept as text: int() refuses over 4,300 digits, JSON does not)
        json.loads(frame.decode("utf-8"), object_pairs_hook=keep, parse_int=str)
    except ValueError:  # (UnicodeDecodeError is one)
        return "frame is not valid JSON"
    except RecursionError:  # (no event nests beyond two objects)
        return "frame nests too deep to be read"
    seen: set[str] = set()
    for key, _ in top[0]:
        if key in seen and key in _PLACING_KEYS:
            return f"frame has a duplicate top-level key {key!r}"
        seen.add(key)
    if top[0] and top[0][0][1] in PROTOCOL_TYPES:  # the first key is "type" (the header's)
        return _PROTOCOL_TYPE
    return None


def _frame_problem(frame: bytes, project: bytes, tail: bytes) -> str:
    """What is wrong with a frame the bytes checks of :func:`_check_frame` refused (its first
    problem, in the order of the module doc)."""
    if not (frame.startswith(b"{") and frame.endswith(b"}")):
        return "frame is not a JSON object"
    if len(frame) > MAX_FRAME_BYTES:
        return f"frame is longer than {MAX_FRAME_BYTES} bytes"
    try:
        frame.decode("utf-8")
    except UnicodeDecodeError:
        return "frame is not valid UTF-8"
    header = _HEADER_RE.match(frame)
    if header is None:
        return 'frame does not start with {"type":<tag>,"project_id":'
    if frame[: header.end()] in _PROTOCOL_HEADERS:
        return _PROTOCOL_TYPE
    if not frame.endswith(tail):
        return f"frame does not end with {tail.decode()}"
    return f"frame does not name project {project[:-1].decode()}"


def parse_channel_message(data: object, project_id: int) -> Envelope:
    """A channel message ``<epoch>|<seq>|<unix ms>|<frame>`` of project ``project_id``'s channel,
    or :class:`ForeignValue`."""
    try:
        envelope = parse_envelope(data)  # type: ignore[arg-type]
    except MalformedEnvelope as exc:
        raise ForeignValue(ForeignKind.CHANNEL_MESSAGE, str(exc)) from None
    project, tail = b"%d," % project_id, b',"seq":%d}' % envelope.seq
    _check_frame(envelope.frame, ForeignKind.CHANNEL_MESSAGE, project, tail)
    return envelope


def parse_stream_entry(entry_id: object, fields: object, project_id: int) -> tuple[int, bytes]:
    """``(seq, frame)`` of one entry of project ``project_id``'s stream as ``XRANGE`` returns it
    (a flat ``[field, value, ...]`` list inside a script, a dict through redis-py), or
    :class:`ForeignValue`."""
    return _parse_stream_entry(entry_id, fields, b"%d," % project_id)


class CheckedFrames(NamedTuple):
    """Frames of one project that a reader has already checked (each passed
    :func:`check_frame` for that project and its seq), at every seq from ``lo`` to ``last``:
    ``frame_at(seq)`` is the one at ``seq`` (called only within that range, during the parse it
    is given to). ``epoch``: the history they belong to; a read of another one uses none of
    them (:func:`schemas.history.parse_snapshot_reply`)."""

    epoch: str
    lo: int
    last: int
    frame_at: Callable[[int], bytes]


def _parse_stream_entry(
    entry_id: object,
    fields: object,
    project: bytes,
    known_lo: int = 1,
    known_last: int = 0,
    frame_at: Callable[[int], bytes] | None = None,
) -> tuple[int, bytes]:
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
        if len(fields) == 2 and fields[0] == b"oversize":  # the history script's stand-in
            weight = fields[1].decode("ascii", "replace") if isinstance(fields[1], bytes) else "?"
            raise ForeignValue(kind, f"entry weighs {weight} bytes, over {MAX_ENTRY_BYTES}")
        frame = fields[2 * names.index(b"f") + 1] if b"f" in names[: len(fields) // 2] else None
    else:
        frame = None
    if frame is None:
        raise ForeignValue(kind, "entry has no field 'f'")
    digits = match.group(1)
    seq = int(digits)
    # The same bytes as a frame already checked at this seq of this project: the check would
    # pass them again (it depends on nothing else). Anything else, garbage a writer put in
    # place of such an entry included, is checked in full. (Outside the known seqs, the cost is
    # two comparisons; without any, lo > last and frame_at is never called.)
    if known_lo <= seq <= known_last and type(frame) is bytes:
        if frame == frame_at(seq):  # type: ignore[misc]
            return seq, frame
    return seq, _check_frame(frame, kind, project, b',"seq":' + digits + b"}")


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
    project_id: int,
    checked: CheckedFrames | None = None,
) -> tuple[list[tuple[int, bytes]], list[tuple[int | None, ForeignValue]]]:
    """Parse the entries of one ``XRANGE`` of project ``project_id``'s stream in order: the valid
    ``(seq, frame)`` entries, and the foreign ones as ``(seq or None when the id itself is
    foreign, ForeignValue)``.

    ``checked``: frames of this project the caller already checked, of the history these
    entries were read from (its epoch is the caller's to compare). An entry whose frame is
    exactly the bytes of the one checked at its seq is taken without checking its frame again;
    any other is checked in full."""
    good: list[tuple[int, bytes]] = []
    bad: list[tuple[int | None, ForeignValue]] = []
    project = b"%d," % project_id
    lo, last, frame_at = (1, 0, None) if checked is None else checked[1:]
    for raw in raw_entries:
        entry_id, fields = _pair(raw)
        try:
            good.append(_parse_stream_entry(entry_id, fields, project, lo, last, frame_at))
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
