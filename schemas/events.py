"""The project events of the contract (docs/contract.md), as msgspec types.

Every event is a :class:`ProjectEvent` subclass tagged on ``"type"``; field names, nesting and JSON
shapes are exactly the contract's. These Structs are the single source of truth: the publisher
validates against them, the JSON Schema export is generated from them, and the gateway never
re-encodes them.

Adding an event type is one new Struct in this module::

    class TaskStatusChanged(ProjectEvent, tag="task_status_changed"):
        task_id: PositiveId
        status: Literal["PENDING", "IN_PROGRESS", "DONE", "FAILED"]
        changed_at: UtcDatetime

Every subclass defined here joins :data:`Event` (the tagged union), :func:`decode_event`, the
publisher and ``python -m schemas`` automatically.

msgspec checks constraints (``Meta``) when decoding, not in ``__init__``. The publisher therefore
validates every event by decoding the bytes it is about to send (see :func:`encode_event`), so an
invalid event built in Python is rejected before anything reaches Redis.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeAlias, Union

import msgspec
from msgspec import Meta

from schemas.protocol import PROTOCOL_TYPES
from schemas.stored import MAX_EVENT_BYTES

__all__ = [
    "AgentResumed",
    "Blocker",
    "BlockerCreated",
    "BlockerExpired",
    "BlockerResolved",
    "BlockerStatus",
    "BlockerType",
    "Event",
    "EventValidationError",
    "NumberOutOfRange",
    "ProjectEvent",
    "decode_event",
    "encode_event",
    "event_types",
    "repeated_key",
    "utc_now",
]

PositiveId = Annotated[int, Meta(gt=0, le=2**53 - 1, description="A positive integer id.")]
AgentId = Annotated[str, Meta(min_length=1, max_length=200, description="Non-empty agent id.")]
Question = Annotated[str, Meta(min_length=1, max_length=2000)]
Answer = Annotated[str, Meta(min_length=1, max_length=5000)]
ShortText = Annotated[str, Meta(min_length=1, max_length=500)]
UtcDatetime = Annotated[
    datetime, Meta(tz=True, description="RFC 3339 timestamp, encoded in UTC with a 'Z' suffix.")
]
BlockerType = Literal["SYNC", "ASYNC"]
BlockerStatus = Literal["PENDING", "RESOLVED", "EXPIRED"]


class EventValidationError(ValueError):
    """An event does not satisfy the contract; the message names the offending field."""


def utc_now() -> datetime:
    """The current time as a timezone-aware UTC datetime (the default for event timestamps)."""
    return datetime.now(UTC)


def _to_utc(value: datetime, field: str) -> datetime:
    # Naive datetimes are ambiguous on the wire; the contract's timestamps are all UTC.
    # EventValidationError is a ValueError, so msgspec still reports it as a ValidationError when
    # this runs in ``__post_init__`` during decoding, and callers building events in Python get
    # the same exception type that ``publish`` documents.
    if not isinstance(value, datetime):
        raise EventValidationError(
            f"Expected `datetime`, got `{type(value).__name__}` - at `$.{field}`"
        )
    if value.tzinfo is None or value.utcoffset() is None:
        raise EventValidationError(f"Expected a timezone-aware datetime - at `$.{field}`")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # 9999-12-31T23:59-05:00 or 0001-01-01T00:00+05:00: no UTC datetime. OverflowError is
        # no ValueError: it escaped msgspec's decode as it was (a 500 from the HTTP API, a relay
        # stopped for every project by one outbox row, a consumer's connection task dead).
        raise EventValidationError(
            f"Expected a datetime that exists in UTC (years 1-9999) - at `$.{field}`"
        ) from None


class Blocker(msgspec.Struct, kw_only=True):
    """A question an agent raised and is waiting on (the ``blocker`` of ``blocker_created``)."""

    id: PositiveId
    agent_id: AgentId
    agent_name: ShortText
    task_id: PositiveId
    task_title: ShortText
    blocker_type: BlockerType
    question: Question
    status: BlockerStatus
    created_at: UtcDatetime

    def __post_init__(self) -> None:
        created_at = self.created_at
        if created_at.__class__ is not datetime or created_at.tzinfo is not UTC:
            self.created_at = _to_utc(created_at, "created_at")


_DATETIME_FIELDS: dict[type, tuple[str, ...]] = {}


def _datetime_fields(cls: type) -> tuple[str, ...]:
    """Names of the fields of ``cls`` typed as datetimes (also ``datetime | None``), cached:
    ``__post_init__`` runs on every construction and every decode, so it must not introspect."""
    names = _DATETIME_FIELDS.get(cls)
    if names is None:

        def is_datetime(t: msgspec.inspect.Type) -> bool:
            if isinstance(t, msgspec.inspect.Metadata):  # Annotated[..., Meta(...)]
                return is_datetime(t.type)
            if isinstance(t, msgspec.inspect.UnionType):
                return any(is_datetime(member) for member in t.types)
            return isinstance(t, msgspec.inspect.DateTimeType)

        info = msgspec.inspect.type_info(cls)
        names = tuple(f.name for f in info.fields if is_datetime(f.type))  # type: ignore[attr-defined]
        _DATETIME_FIELDS[cls] = names
    return names


class ProjectEvent(msgspec.Struct, tag_field="type"):
    """Base of every event: tagged on ``"type"``, scoped to one project."""

    project_id: PositiveId

    def __post_init__(self) -> None:
        # Normalise every datetime field to UTC so that it encodes with a 'Z' suffix. Values
        # decoded from "...Z" already are UTC datetimes: the identity checks skip them cheaply.
        for name in _datetime_fields(type(self)):
            value = getattr(self, name)
            if value is not None and (value.__class__ is not datetime or value.tzinfo is not UTC):
                setattr(self, name, _to_utc(value, name))


class BlockerCreated(ProjectEvent, tag="blocker_created"):
    """Emitted when an agent creates a blocker."""

    blocker: Blocker


class BlockerResolved(ProjectEvent, tag="blocker_resolved"):
    """Emitted when a user resolves a blocker."""

    blocker_id: PositiveId
    answer: Answer
    resolved_at: UtcDatetime


class AgentResumed(ProjectEvent, tag="agent_resumed"):
    """Emitted when an agent resumes after its blocker was resolved."""

    agent_id: AgentId
    task_id: PositiveId
    blocker_id: PositiveId
    resumed_at: UtcDatetime


class BlockerExpired(ProjectEvent, tag="blocker_expired"):
    """Emitted when a blocker auto-expires after being pending too long (24 h by default)."""

    blocker_id: PositiveId
    task_id: PositiveId
    expired_at: UtcDatetime


def event_types() -> tuple[type[ProjectEvent], ...]:
    """Every concrete event type, in definition order. Raises ``TypeError`` for one whose tag is
    the ``type`` of a protocol message (``activity``, ``subscribed``...: ``PROTOCOL_TYPES``):
    clients would take its events for control messages, and gateways skip them."""
    types = tuple(ProjectEvent.__subclasses__())
    for event_type in types:
        tag = event_type.__struct_config__.tag
        if tag in PROTOCOL_TYPES:
            raise TypeError(
                f"event type {event_type.__name__}: its tag {tag!r} is the type of a protocol "
                f"message; choose another (the protocol's: {', '.join(sorted(PROTOCOL_TYPES))})"
            )
    return types


# The tagged union of every event type defined above; decode with ``decode_event``.
Event: TypeAlias = Union[event_types()]  # type: ignore[valid-type]  # noqa: UP007

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def decode_event(data: bytes | str, *, keys_checked: bool = False) -> ProjectEvent:
    """Decode and validate one event from JSON.

    Raises :class:`EventValidationError` with msgspec's message, which names the field path
    (e.g. ``Expected `int` >= 1 - at `$.blocker.id```), for a key given twice in one object
    (see :func:`repeated_key`), or for JSON nested too deeply to be read (:data:`TOO_DEEP`).
    ``keys_checked``: ``data`` cannot repeat a key (msgspec's encoding of a decoded object,
    whose source was checked): the check, most of the cost of a large event, is skipped.
    """
    try:
        event = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EventValidationError(str(exc)) from None
    except RecursionError:  # (an unknown field's value is parsed too, to its very end)
        raise EventValidationError(TOO_DEEP) from None
    except UnicodeEncodeError:  # a str holding lone surrogates (undecodable bytes escaped)
        raise EventValidationError("JSON is malformed: not valid UTF-8 text") from None
    if not keys_checked and (key := repeated_key(data)) is not None:
        raise EventValidationError(f"the key {key!r} is given twice in one object")
    return event


TOO_DEEP = "the JSON is nested too deeply to be read (no event nests more than two objects)"
"""The message of the :class:`EventValidationError` for JSON nested near Python's recursion
limit (about a thousand levels): msgspec and the repeated-key check both stop there."""


class _RepeatedKey(Exception):
    pass


class NumberOutOfRange(Exception):
    """A number msgspec does not decode, found by :func:`repeated_key` (``numbers=True``). Not
    a ValueError: ``json`` would take it for malformed JSON."""


#: The longest integer msgspec decodes, in characters (its sign counted): past it "Integer value
#: out of range", as a float past 1.8e308 is "Number out of range".
_LONGEST_INT = 4300


def _int_text(text: str) -> str:
    if len(text) > _LONGEST_INT:
        raise NumberOutOfRange(text[:20])
    return text


def _float_text(text: str) -> str:
    if math.isinf(float(text)):  # (float() rounds as msgspec does: correctly)
        raise NumberOutOfRange(text[:20])
    return text


def _repeat(pairs: list[tuple[str, object]]) -> str | None:
    """The first key of ``pairs`` given twice, or None."""
    if len(pairs) > 1 and len({key for key, _ in pairs}) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                return key
            seen.add(key)
    return None


def _no_repeated_keys(pairs: list[tuple[str, object]]) -> None:
    key = _repeat(pairs)
    if key is not None:
        raise _RepeatedKey(key)
    # (None: the objects themselves are never needed, only whether their keys repeat)


def repeated_key(data: bytes | str, *, numbers: bool = False) -> str | None:
    """The first key found twice in one object of the JSON document ``data``, or None.

    JSON leaves a repeated key's meaning open and decoders differ (msgspec, Python's ``json`` and
    JavaScript's ``JSON.parse`` keep the last value, others the first), so an event such as
    ``{"answer": "yes", ..., "answer": "no"}`` is refused rather than guessed, as a repeated
    HTTP header is. None too for data that is not JSON at all: the decoder says what is wrong.
    Raises :class:`EventValidationError` (:data:`TOO_DEEP`) for a document nested too deeply to
    be checked (near a thousand levels, less deep inside a deep call stack): answering None
    there would let a repeated key through behind a deep enough value.
    About 5 us for an event of a few hundred bytes (msgspec decodes it in under 1): paid by
    :func:`decode_event` (JSON from outside), not by :func:`encode_event` (msgspec's own bytes).

    ``numbers``: read every number too, and raise :class:`NumberOutOfRange` for one msgspec
    does not decode (a float past 1.8e308, an integer written in over 4,300 characters), wherever
    it is (after a repeated key too), for a caller whose msgspec decoders skip values unread (an
    event's unknown fields): msgspec decoding all of it refused the whole document for one.
    """
    found: list[str] = []

    def first_repeat(pairs: list[tuple[str, object]]) -> None:
        if not found and (key := _repeat(pairs)) is not None:
            found.append(key)  # (and read on, for the numbers after it)

    # (numbers kept as text: int() refuses over 4,300 digits, JSON does not)
    hooks = (first_repeat, _int_text, _float_text) if numbers else (_no_repeated_keys, str, str)
    try:  # (one frame, as deep as ever: the depth refused as TOO_DEEP is the same)
        json.loads(data, object_pairs_hook=hooks[0], parse_int=hooks[1], parse_float=hooks[2])
    except _RepeatedKey as repeat:
        return str(repeat.args[0])
    except ValueError:  # (UnicodeDecodeError is one)
        return None
    except RecursionError:
        raise EventValidationError(TOO_DEEP) from None
    return found[0] if found else None


def encode_event(event: ProjectEvent | Any) -> bytes:
    """Encode an event to JSON once, validating it against the contract on the way.

    The bytes are decoded again with the strict types, which runs every ``Meta`` constraint that
    ``__init__`` skips. The validated copy is then encoded once more: fields assigned after
    construction (a datetime with a +02:00 offset, an ISO string in a datetime field) would
    otherwise reach the wire as given, while the contract wants UTC with ``Z``. The returned bytes
    are exactly what is stored and relayed: at most ``schemas.stored.MAX_EVENT_BYTES`` (a
    longer event, possible only for an added type with an unbounded field, is refused with
    :class:`EventValidationError`: stored, every gateway would skip it).
    """
    if not isinstance(event, ProjectEvent):
        raise EventValidationError(
            f"Expected one of the event types {[t.__name__ for t in event_types()]}, "
            f"got `{type(event).__name__}`"
        )
    try:
        data = _encoder.encode(event)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EventValidationError(str(exc)) from None
    # Re-encoding the decoded copy costs ~0.5 us, far less than the decode that validates it.
    # (msgspec's own bytes cannot repeat a key: _decoder, not decode_event's extra check)
    try:
        data = _encoder.encode(_decoder.decode(data))
    except msgspec.DecodeError as exc:
        raise EventValidationError(str(exc)) from None
    if len(data) > MAX_EVENT_BYTES:
        raise EventValidationError(
            f"the event's JSON takes {len(data)} bytes, more than an event can be "
            f"({MAX_EVENT_BYTES} bytes: its stored frame, with its seq, is at most 1 MiB)"
        )
    return data
