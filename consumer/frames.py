"""Decoding of the gateway's frames: events into the schema Structs, control messages into the
protocol Structs, in one pass.

Every frame is one JSON object tagged on ``"type"``; the events of ``schemas.events`` and the
control messages of ``schemas.protocol`` share that tag field, so one msgspec decoder for their
union parses either. An event frame is the event's JSON with ``,"seq":N`` spliced in before the
closing brace (``docs/architecture.md``, "A frame is built once"): the sequence number is read
from that tail without a second parse, and with a small second decode for any other layout.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from schemas.events import event_types
from schemas.protocol import (
    MAX_SEQ,
    Authenticated,
    Error,
    ErrorCode,
    Pong,
    Presence,
    PresenceDiff,
    ResyncRequired,
    Sequence,
    Subscribed,
    Unsubscribed,
)

__all__ = [
    "CONTROL_TYPES",
    "EVENT_TAGS",
    "EVENT_TYPES",
    "PRESENCE_TYPES",
    "FrameError",
    "decode_frame",
    "event_header",
    "event_seq",
    "is_event",
]

EVENT_TYPES: frozenset[type] = frozenset(event_types())
#: The ``type`` of each event type this consumer knows.
EVENT_TAGS: tuple[str, ...] = tuple(sorted(t.__struct_config__.tag for t in EVENT_TYPES))
CONTROL_TYPES = (Authenticated, Subscribed, Unsubscribed, ResyncRequired, Error, Pong)
#: Presence messages (``docs/presence.md``): decoded here as the schema's Structs, checked
#: further by :class:`consumer.presence.PresenceTable`.
PRESENCE_TYPES = (Presence, PresenceDiff)

_decoder = msgspec.json.Decoder(Union[(*event_types(), *CONTROL_TYPES, *PRESENCE_TYPES)])


class _Header(msgspec.Struct):
    """The fields every event frame has, whatever its type (unknown fields are skipped). A seq
    no cursor can hold (negative, above 2**53-1) gives the frame no place in the order: taken
    as the next event, it would become a cursor every gateway refuses."""

    type: str
    project_id: int
    seq: Sequence


_header_decoder = msgspec.json.Decoder(_Header)


class _Tagged(msgspec.Struct):
    """The type and project of a frame (to tell a malformed presence message's project)."""

    type: str
    project_id: int


_tagged_decoder = msgspec.json.Decoder(_Tagged)
_PRESENCE_TAGS = frozenset(t.__struct_config__.tag for t in PRESENCE_TYPES)


class _LooseError(msgspec.Struct, tag_field="type", tag="error"):
    """An ``error`` whose optional hints may be anything (see :func:`_loose_error`)."""

    code: ErrorCode
    message: str
    project_id: int | None = None
    # Raw: a number no Python type holds (1e999) is still a hint left out, not a frame dropped.
    retry_after_ms: msgspec.Raw = msgspec.Raw(b"null")
    refused: msgspec.Raw = msgspec.Raw(b"null")
    # Kept like the hints: dropped, an ended subscription was taken for a failed presence read.
    ended: msgspec.Raw = msgspec.Raw(b"false")


_loose_error_decoder = msgspec.json.Decoder(_LooseError)


def _hint(raw: msgspec.Raw, kind: type) -> Any:
    """An error's optional hint when it is a ``kind``, else None."""
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    return value if type(value) is kind else None


def _loose_error(raw: bytes) -> Error | None:
    """An ``error`` frame whose ``retry_after_ms``, ``refused`` or ``ended`` is not what the
    protocol says (a string, a float, a negative number: another gateway's, a proxy's), as the
    error it is with those hints left out (``ended`` false, as from a gateway before it); None
    when it is malformed elsewhere. A ``rate_limited`` error dropped whole would leave its
    refused frame never sent again, where one without hints is sent again on the client's own
    delay. The hints that are what the protocol says are kept, ``ended`` among them."""
    try:
        loose = _loose_error_decoder.decode(raw)
    except msgspec.DecodeError:
        return None
    # An int as the protocol says (a negative one is FramePacer's to ignore, as from a strict
    # decode); not a bool, a float or anything else.
    retry_after_ms = _hint(loose.retry_after_ms, int)
    refused = _hint(loose.refused, str)
    ended = _hint(loose.ended, bool) is True
    return Error(loose.code, loose.message, loose.project_id, retry_after_ms, refused, ended)


_CONTROL_TAGS = frozenset(t.__struct_config__.tag for t in (*CONTROL_TYPES, *PRESENCE_TYPES))
_SEQ_KEY = b',"seq":'


class FrameError(ValueError):
    """A frame that is neither a known control message nor a known event.

    ``header`` holds ``(type, project_id, seq)`` when the frame at least looks like an event (so
    its place in the order can still be kept), else None. ``presence`` holds the project of a
    malformed ``presence`` or ``presence_diff`` (its table counts it), else None; ``listing``
    says it is a ``presence`` (a list: the answer a subscribe with the flag is owed).
    """

    def __init__(
        self,
        message: str,
        header: tuple[str, int, int] | None,
        presence: int | None = None,
        *,
        listing: bool = False,
    ) -> None:
        super().__init__(message)
        self.header = header
        self.presence = presence
        self.listing = listing


def event_seq(raw: bytes) -> int:
    """The ``seq`` of an event frame: read from the ``,"seq":N}`` tail the gateway's frames end
    with, else by a decode of the header fields; msgspec.DecodeError when it has none, or one
    outside the protocol's ``Sequence`` (0 to 2**53-1)."""
    index = raw.rfind(_SEQ_KEY)
    if index > 0 and raw[-1:] == b"}":
        try:
            seq = int(raw[index + 7 : -1])
        except ValueError:
            pass
        else:
            if 0 <= seq <= MAX_SEQ:
                return seq
    return _header_decoder.decode(raw).seq


def event_header(raw: bytes) -> tuple[int, int] | None:
    """``(project_id, seq)`` of a frame that is an event (of any type, known or not), read
    without decoding its body (the other fields are skipped, not built); None for a control or
    presence message, or a frame with no such header (:func:`decode_frame` says what it is).
    For events nobody reads: those of a project followed for its presence only."""
    try:
        header = _header_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    if header.type in _CONTROL_TAGS:
        return None
    return header.project_id, header.seq


def decode_frame(raw: bytes) -> object:
    """Decode one gateway frame into an event Struct (see :data:`EVENT_TYPES`), a control
    message Struct (:data:`CONTROL_TYPES`) or a presence message (:data:`PRESENCE_TYPES`);
    raise :class:`FrameError` for anything else."""
    try:
        return _decode_frame(raw)
    except RecursionError:
        # Nested near Python's recursion limit (no protocol message nests beyond two objects;
        # the gateway skips such stored frames): its header cannot be read either, so it has
        # no place in the order. The next event's seq shows the gap it leaves.
        raise FrameError("frame nests too deeply to be read", None) from None


def _decode_frame(raw: bytes) -> object:
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        error = _loose_error(raw)
        if error is not None:
            return error
        try:
            tagged = _tagged_decoder.decode(raw)
        except msgspec.DecodeError:
            pass
        else:
            if tagged.type in _PRESENCE_TAGS:
                listing = tagged.type == Presence.__struct_config__.tag
                raise FrameError(str(exc), None, tagged.project_id, listing=listing) from None
        try:
            header = _header_decoder.decode(raw)
        except msgspec.DecodeError:
            raise FrameError(str(exc), None) from None
        if header.type in _CONTROL_TAGS:
            # A malformed control message is not an event, whatever fields it has.
            raise FrameError(str(exc), None) from None
        raise FrameError(str(exc), (header.type, header.project_id, header.seq)) from None


def is_event(message: object) -> bool:
    """Whether a decoded frame is an event (a :class:`~schemas.events.ProjectEvent`)."""
    return type(message) in EVENT_TYPES
