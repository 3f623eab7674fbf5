"""The event contract as code: round-trips of the contract's examples, every constraint, property
tests of the decoders, the committed JSON Schema, and the Redis key layout."""

from __future__ import annotations

import copy
import itertools
import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import (
    AgentResumed,
    Blocker,
    BlockerCreated,
    BlockerExpired,
    BlockerResolved,
    EventValidationError,
    Keys,
    ProjectEvent,
    decode_event,
    encode_event,
    event_types,
    parse_envelope,
    repeated_key,
)
from schemas.events import TOO_DEEP, UtcDatetime, _datetime_fields
from schemas.keys import MalformedEnvelope, stream_entry_seq
from schemas.protocol import (
    Auth,
    ErrorCode,
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    decode_client_message,
)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "schemas" / "eventbus.schema.json"
CONTRACT_FILE = ROOT.parent / "shared" / "contract" / "websocket-events.md"

# The four JSON examples of shared/contract/websocket-events.md, verbatim (the contract lives
# outside this repository; test_embedded_examples_match_the_contract keeps these in step with it).
CONTRACT_EXAMPLES: dict[str, str] = {
    "blocker_created": """{
  "type": "blocker_created",
  "project_id": 1,
  "blocker": {
    "id": 123,
    "agent_id": "backend-worker-001",
    "agent_name": "Backend Worker #1",
    "task_id": 456,
    "task_title": "Implement authentication",
    "blocker_type": "SYNC",
    "question": "Should we use JWT or sessions?",
    "status": "PENDING",
    "created_at": "2025-11-08T12:34:56Z"
  }
}""",
    "blocker_resolved": """{
  "type": "blocker_resolved",
  "project_id": 1,
  "blocker_id": 123,
  "answer": "Use JWT for stateless API",
  "resolved_at": "2025-11-08T12:45:30Z"
}""",
    "agent_resumed": """{
  "type": "agent_resumed",
  "project_id": 1,
  "agent_id": "backend-worker-001",
  "task_id": 456,
  "blocker_id": 123,
  "resumed_at": "2025-11-08T12:45:35Z"
}""",
    "blocker_expired": """{
  "type": "blocker_expired",
  "project_id": 1,
  "blocker_id": 123,
  "task_id": 456,
  "expired_at": "2025-11-09T12:34:56Z"
}""",
}
EXPECTED_TYPES = {
    "blocker_created": BlockerCreated,
    "blocker_resolved": BlockerResolved,
    "agent_resumed": AgentResumed,
    "blocker_expired": BlockerExpired,
}


def compact(value: Any) -> bytes:
    """The compact JSON of a parsed value, keeping key order: what the encoder must produce."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def example(tag: str) -> dict[str, Any]:
    return json.loads(CONTRACT_EXAMPLES[tag])


# --- the contract's examples -----------------------------------------------------------------


def test_embedded_examples_match_the_contract() -> None:
    if not CONTRACT_FILE.exists():
        pytest.skip(f"contract not found at {CONTRACT_FILE}")
    text = CONTRACT_FILE.read_text()
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, re.S)]
    found = {block["type"]: block for block in blocks}
    assert found == {tag: example(tag) for tag in CONTRACT_EXAMPLES}


def test_every_contract_event_type_is_defined() -> None:
    assert {t.__struct_config__.tag for t in event_types()} >= set(CONTRACT_EXAMPLES)


@pytest.mark.parametrize("tag", CONTRACT_EXAMPLES)
def test_contract_example_round_trips_exactly(tag: str) -> None:
    event = decode_event(CONTRACT_EXAMPLES[tag])
    assert type(event) is EXPECTED_TYPES[tag]
    encoded = encode_event(event)
    # Same JSON, and the same bytes as the example in compact form: key order and nesting included.
    assert json.loads(encoded) == example(tag)
    assert encoded == compact(example(tag))


@pytest.mark.parametrize("tag", CONTRACT_EXAMPLES)
def test_contract_example_key_order_is_kept_at_every_level(tag: str) -> None:
    def key_paths(value: Any, path: str = "$") -> list[str]:
        if not isinstance(value, dict):
            return []
        out = []
        for key, child in value.items():
            out.append(f"{path}.{key}")
            out.extend(key_paths(child, f"{path}.{key}"))
        return out

    encoded = json.loads(encode_event(decode_event(CONTRACT_EXAMPLES[tag])))
    assert key_paths(encoded) == key_paths(example(tag))


def test_decoded_contract_values() -> None:
    event = decode_event(CONTRACT_EXAMPLES["blocker_created"])
    assert isinstance(event, BlockerCreated)
    assert event.project_id == 1
    assert event.blocker.id == 123
    assert event.blocker.blocker_type == "SYNC"
    assert event.blocker.created_at == datetime(2025, 11, 8, 12, 34, 56, tzinfo=UTC)
    assert event.blocker.created_at.tzinfo is UTC


def test_python_built_events_encode_like_the_contract() -> None:
    blocker = Blocker(
        id=123,
        agent_id="backend-worker-001",
        agent_name="Backend Worker #1",
        task_id=456,
        task_title="Implement authentication",
        blocker_type="SYNC",
        question="Should we use JWT or sessions?",
        status="PENDING",
        created_at=datetime(2025, 11, 8, 12, 34, 56, tzinfo=UTC),
    )
    built = {
        "blocker_created": BlockerCreated(project_id=1, blocker=blocker),
        "blocker_resolved": BlockerResolved(
            project_id=1,
            blocker_id=123,
            answer="Use JWT for stateless API",
            resolved_at=datetime(2025, 11, 8, 12, 45, 30, tzinfo=UTC),
        ),
        "agent_resumed": AgentResumed(
            project_id=1,
            agent_id="backend-worker-001",
            task_id=456,
            blocker_id=123,
            resumed_at=datetime(2025, 11, 8, 12, 45, 35, tzinfo=UTC),
        ),
        "blocker_expired": BlockerExpired(
            project_id=1,
            blocker_id=123,
            task_id=456,
            expired_at=datetime(2025, 11, 9, 12, 34, 56, tzinfo=UTC),
        ),
    }
    for tag, event in built.items():
        assert encode_event(event) == compact(example(tag)), tag


def test_contract_broadcast_timestamp_format_is_accepted() -> None:
    # The contract's backend writes `datetime.utcnow().isoformat() + "Z"` (microseconds).
    event = example("blocker_resolved")
    event["resolved_at"] = "2025-11-08T12:45:30.123456Z"
    assert encode_event(decode_event(json.dumps(event))) == compact(event)


def test_relayed_frame_with_seq_still_decodes() -> None:
    # Frames in the stream carry "seq"; tools that decode them must not choke on it.
    frame = dict(example("blocker_expired"), seq=42)
    assert decode_event(json.dumps(frame)) == decode_event(CONTRACT_EXAMPLES["blocker_expired"])


# --- constraints -----------------------------------------------------------------------------

# (event, JSON path to change, new value, text the error must contain: the field's path)
INVALID: list[tuple[str, tuple[str, ...], Any, str]] = [
    ("blocker_created", ("project_id",), 0, "$.project_id"),
    ("blocker_created", ("project_id",), -1, "$.project_id"),
    ("blocker_created", ("project_id",), 2**53, "$.project_id"),
    ("blocker_created", ("project_id",), "1", "$.project_id"),
    ("blocker_created", ("project_id",), True, "$.project_id"),
    ("blocker_created", ("project_id",), 1.5, "$.project_id"),
    ("blocker_created", ("blocker", "id"), 0, "$.blocker.id"),
    ("blocker_created", ("blocker", "task_id"), -5, "$.blocker.task_id"),
    ("blocker_created", ("blocker", "agent_id"), "", "$.blocker.agent_id"),
    ("blocker_created", ("blocker", "agent_name"), "", "$.blocker.agent_name"),
    ("blocker_created", ("blocker", "task_title"), "", "$.blocker.task_title"),
    ("blocker_created", ("blocker", "blocker_type"), "sync", "$.blocker.blocker_type"),
    ("blocker_created", ("blocker", "blocker_type"), "BLOCKING", "$.blocker.blocker_type"),
    ("blocker_created", ("blocker", "status"), "DONE", "$.blocker.status"),
    ("blocker_created", ("blocker", "status"), None, "$.blocker.status"),
    ("blocker_created", ("blocker", "question"), "", "$.blocker.question"),
    ("blocker_created", ("blocker", "question"), "q" * 2001, "$.blocker.question"),
    ("blocker_created", ("blocker", "created_at"), "2025-11-08T12:34:56", "$.blocker.created_at"),
    ("blocker_created", ("blocker", "created_at"), "yesterday", "$.blocker.created_at"),
    ("blocker_created", ("blocker",), None, "$.blocker"),
    ("blocker_resolved", ("blocker_id",), 0, "$.blocker_id"),
    ("blocker_resolved", ("answer",), "", "$.answer"),
    ("blocker_resolved", ("answer",), "a" * 5001, "$.answer"),
    ("blocker_resolved", ("resolved_at",), "2025-11-08T12:45:30", "$.resolved_at"),
    ("agent_resumed", ("agent_id",), "", "$.agent_id"),
    ("agent_resumed", ("task_id",), 0, "$.task_id"),
    ("agent_resumed", ("blocker_id",), -1, "$.blocker_id"),
    ("agent_resumed", ("resumed_at",), "2025-11-08 12:45:35", "$.resumed_at"),
    ("blocker_expired", ("blocker_id",), 0, "$.blocker_id"),
    ("blocker_expired", ("task_id",), 0, "$.task_id"),
    ("blocker_expired", ("expired_at",), 1762000000, "$.expired_at"),
]


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("tag", "path", "value", "field"),
    INVALID,
    ids=[f"{t}:{'.'.join(p)}={str(v)[:12]!r}" for t, p, v, _ in INVALID],
)
def test_invalid_json_is_rejected_naming_the_field(
    tag: str, path: tuple[str, ...], value: Any, field: str
) -> None:
    doc = _set(example(tag), path, value)
    with pytest.raises(EventValidationError) as info:
        decode_event(json.dumps(doc))
    assert f"`{field}`" in str(info.value)


@pytest.mark.parametrize(
    ("tag", "path", "value", "field"),
    INVALID,
    ids=[f"{t}:{'.'.join(p)}={str(v)[:12]!r}" for t, p, v, _ in INVALID],
)
def test_invalid_python_event_is_rejected_by_encode(
    tag: str, path: tuple[str, ...], value: Any, field: str
) -> None:
    # msgspec skips Meta constraints in __init__; encode_event (what the publisher calls) must not.
    event = decode_event(CONTRACT_EXAMPLES[tag])
    target: Any = event
    for key in path[:-1]:
        target = getattr(target, key)
    with pytest.raises(EventValidationError) as info:
        setattr(target, path[-1], value)  # plain attribute set: no validation yet
        encode_event(event)
    assert f"`{field}`" in str(info.value)


@pytest.mark.parametrize(
    ("tag", "path", "value"),
    [
        ("blocker_created", ("blocker", "question"), "q" * 2000),
        ("blocker_created", ("blocker", "question"), "?"),
        ("blocker_created", ("blocker", "blocker_type"), "ASYNC"),
        ("blocker_created", ("blocker", "status"), "RESOLVED"),
        ("blocker_created", ("blocker", "status"), "EXPIRED"),
        ("blocker_resolved", ("answer",), "a" * 5000),
        ("blocker_resolved", ("answer",), "é 日本 \U0001f600"),
        ("blocker_expired", ("project_id",), 2**53 - 1),
    ],
)
def test_boundary_values_are_accepted(tag: str, path: tuple[str, ...], value: Any) -> None:
    doc = _set(example(tag), path, value)
    assert json.loads(encode_event(decode_event(json.dumps(doc)))) == doc


def test_missing_field_is_named() -> None:
    doc = example("blocker_resolved")
    del doc["answer"]
    with pytest.raises(EventValidationError, match="missing required field `answer`"):
        decode_event(json.dumps(doc))


@pytest.mark.parametrize("tag", [None, "blocker_deleted", "BLOCKER_CREATED", 1])
def test_unknown_or_missing_type_is_rejected(tag: Any) -> None:
    doc = example("blocker_resolved")
    if tag is None:
        del doc["type"]
    else:
        doc["type"] = tag
    with pytest.raises(EventValidationError, match="type"):
        decode_event(json.dumps(doc))


def _with_repeated_key(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> str:
    """``doc`` as JSON with the key at ``path`` given a second time, with ``value``, at the end of
    its object (what a hand-built body or a buggy encoder sends)."""
    if len(path) == 1:
        body = json.dumps(doc)
        return body[:-1] + f", {json.dumps(path[0])}: {json.dumps(value)}}}"
    inner = _with_repeated_key(doc[path[0]], path[1:], value)
    rest = {k: v for k, v in doc.items() if k != path[0]}
    return json.dumps(rest)[:-1] + f", {json.dumps(path[0])}: {inner}}}"


@pytest.mark.parametrize(
    ("tag", "path", "value"),
    [
        ("blocker_resolved", ("answer",), "no"),  # last wins in msgspec, json and JSON.parse
        ("blocker_resolved", ("answer",), "answer"),  # the same value is still refused
        ("blocker_resolved", ("project_id",), 8),
        ("blocker_resolved", ("type",), "blocker_resolved"),
        ("blocker_created", ("blocker", "question"), "another question"),
    ],
)
def test_a_key_given_twice_is_refused_rather_than_guessed(
    tag: str, path: tuple[str, ...], value: Any
) -> None:
    data = _with_repeated_key(example(tag), path, value)
    with pytest.raises(EventValidationError, match=f"the key '{path[-1]}' is given twice"):
        decode_event(data)
    assert repeated_key(data.encode()) == path[-1]
    # spelled with an escape, it is still the same key
    escaped = data.replace(f'"{path[-1]}": ', f'"\\u{ord(path[-1][0]):04x}{path[-1][1:]}": ', 1)
    assert repeated_key(escaped) == path[-1]


def _nested_below(depth: int, stack: int) -> Any:
    """decode_event of an event holding a repeated key and a value ``depth`` lists deep, called
    ``stack`` Python frames down (a framework's handler, a worker's callback): the event, or
    the exception."""
    if stack:
        return _nested_below(depth, stack - 1)
    doc = CONTRACT_EXAMPLES["blocker_resolved"].rstrip()[:-1] + ', "answer": "no", "x": '
    try:
        return decode_event(doc + "[" * depth + "]" * depth + "}")
    except Exception as exc:
        return exc


@pytest.mark.parametrize("stack", [0, 300, 600])
@pytest.mark.parametrize("depth", [900, 980, 990, 994, 997, 1000, 1100, 100_000])
def test_json_nested_near_the_recursion_limit_is_refused_never_let_through(
    depth: int, stack: int
) -> None:
    """Python's json (the repeated-key check) gives up a few levels before msgspec: a repeated
    key behind a value nested in between passed as "no repeated key" (the event was accepted
    with one of its answers picked), and deeper, msgspec's RecursionError escaped decode_event
    (a traceback from the CLI; the outbox relay's invalid-row handler missed it). Now such a
    document is always refused with an EventValidationError, whatever the stack depth."""
    result = _nested_below(depth, stack)
    assert isinstance(result, EventValidationError), result
    assert str(result) in (TOO_DEEP, "the key 'answer' is given twice in one object")
    if depth >= 1000:
        assert str(result) == TOO_DEEP


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.integers() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.lists(st.tuples(st.text(max_size=3), inner), max_size=5)
        ),
        max_leaves=20,
    )
)
def test_repeated_key_finds_exactly_the_objects_with_a_key_twice(value: Any) -> None:
    """Objects are drawn as lists of (key, value) pairs, so they can hold a key twice; which of
    several repeated keys is named first is the decoder's order, so any of them will do."""

    def encode(v: Any) -> str:
        if isinstance(v, list) and v and isinstance(v[0], tuple):
            return "{" + ",".join(f"{json.dumps(k)}:{encode(x)}" for k, x in v) + "}"
        if isinstance(v, list):
            return "[" + ",".join(encode(x) for x in v) + "]"
        return json.dumps(v)

    def repeats(v: Any) -> set[str]:
        if isinstance(v, list) and v and isinstance(v[0], tuple):
            keys = [k for k, _ in v]
            found = {k for k in keys if keys.count(k) > 1}
            return found.union(*(repeats(x) for _, x in v))
        if isinstance(v, list):
            return set().union(*(repeats(x) for x in v))
        return set()

    found = repeated_key(encode(value))
    expected = repeats(value)
    assert (found is None) == (not expected) and (found is None or found in expected)


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"[]", b"null", b'"x"', b"\xff\xfe", "{\x00}", '{"type": "\udcff"}'],
)
def test_malformed_json_is_rejected(data: bytes | str) -> None:
    with pytest.raises(EventValidationError):
        decode_event(data)


def test_naive_datetime_is_rejected_when_built_in_python() -> None:
    with pytest.raises(EventValidationError, match=r"timezone-aware.*`\$\.resolved_at`"):
        BlockerResolved(
            project_id=1, blocker_id=1, answer="a", resolved_at=datetime(2025, 11, 8, 12, 0)
        )
    with pytest.raises(EventValidationError, match=r"`\$\.created_at`"):
        Blocker(
            id=1,
            agent_id="a",
            agent_name="A",
            task_id=1,
            task_title="t",
            blocker_type="SYNC",
            question="q",
            status="PENDING",
            created_at=datetime(2025, 11, 8, 12, 0),
        )


@pytest.mark.parametrize("when", ["9999-12-31T23:59:00-05:00", "0001-01-01T00:00:00+05:00"])
def test_a_datetime_beyond_utcs_range_is_a_validation_error(when: str) -> None:
    """Converting it to UTC overflows; the OverflowError used to escape every decoder."""
    from consumer.frames import FrameError, decode_frame
    from publisher.http_api import ApiError
    from publisher.http_api.core import parse_events

    event = {"type": "blocker_resolved", "blocker_id": 1, "answer": "a", "resolved_at": when}
    data = json.dumps({**event, "project_id": 1}).encode()
    with pytest.raises(EventValidationError, match=r"UTC.*`\$\.resolved_at`"):
        decode_event(data)
    with pytest.raises(EventValidationError, match=r"`\$\.resolved_at`"):
        BlockerResolved(
            project_id=1, blocker_id=1, answer="a", resolved_at=datetime.fromisoformat(when)
        )
    with pytest.raises(ApiError) as error:  # the HTTP API: 422, not 500
        parse_events(json.dumps(event).encode(), 1, 10)
    assert error.value.status == 422
    with pytest.raises(FrameError) as frame_error:  # the consumer: an undecodable event
        decode_frame(data[:-1] + b',"seq":3}')
    assert frame_error.value.header == ("blocker_resolved", 1, 3)


def test_naive_datetime_assigned_after_construction_is_rejected_by_encode() -> None:
    event = decode_event(CONTRACT_EXAMPLES["agent_resumed"])
    event.resumed_at = datetime(2025, 11, 8, 12, 0)  # type: ignore[attr-defined]
    with pytest.raises(EventValidationError, match=r"`\$\.resumed_at`"):
        encode_event(event)


def test_non_datetime_blocker_timestamp_is_rejected_in_python() -> None:
    with pytest.raises(EventValidationError, match=r"Expected `datetime`.*`\$\.created_at`"):
        Blocker(
            id=1,
            agent_id="a",
            agent_name="A",
            task_id=1,
            task_title="t",
            blocker_type="SYNC",
            question="q",
            status="PENDING",
            created_at="2025-11-08T12:00:00Z",  # type: ignore[arg-type]
        )


def test_non_utc_offsets_are_normalised_to_z_when_decoding() -> None:
    doc = example("blocker_created")
    doc["blocker"]["created_at"] = "2025-11-08T14:34:56+02:00"
    event = decode_event(json.dumps(doc))
    assert event.blocker.created_at.utcoffset() == timedelta(0)  # type: ignore[attr-defined]
    assert encode_event(event) == compact(example("blocker_created"))


def test_non_utc_offsets_are_normalised_to_z_when_built_in_python() -> None:
    plus_two = timezone(timedelta(hours=2))
    minus_five = timezone(timedelta(hours=-5, minutes=-30))
    event = BlockerResolved(
        project_id=1,
        blocker_id=123,
        answer="Use JWT for stateless API",
        resolved_at=datetime(2025, 11, 8, 14, 45, 30, tzinfo=plus_two),
    )
    assert encode_event(event) == compact(example("blocker_resolved"))
    expired = BlockerExpired(
        project_id=1,
        blocker_id=123,
        task_id=456,
        expired_at=datetime(2025, 11, 9, 7, 4, 56, tzinfo=minus_five),
    )
    assert encode_event(expired) == compact(example("blocker_expired"))


def test_offsets_assigned_after_construction_still_encode_as_z() -> None:
    event = decode_event(CONTRACT_EXAMPLES["blocker_resolved"])
    event.resolved_at = datetime(  # type: ignore[attr-defined]
        2025, 11, 8, 14, 45, 30, tzinfo=timezone(timedelta(hours=2))
    )
    assert encode_event(event) == compact(example("blocker_resolved"))
    event.resolved_at = "2025-11-08T13:45:30+01:00"  # type: ignore[attr-defined]
    assert encode_event(event) == compact(example("blocker_resolved"))


@pytest.mark.parametrize("value", [{"type": "blocker_resolved"}, None, "event", 42])
def test_encode_rejects_non_events(value: Any) -> None:
    with pytest.raises(EventValidationError, match="Expected one of the event types"):
        encode_event(value)


def test_encode_rejects_unencodable_values() -> None:
    event = decode_event(CONTRACT_EXAMPLES["blocker_resolved"])
    event.answer = object()  # type: ignore[attr-defined]
    with pytest.raises(EventValidationError):
        encode_event(event)


def test_event_validation_error_is_a_value_error() -> None:
    assert issubclass(EventValidationError, ValueError)


# --- property tests ---------------------------------------------------------------------------

ids = st.integers(min_value=1, max_value=2**53 - 1)
text_1_200 = st.text(min_size=1, max_size=200)
offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
aware = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC) | offsets
)
blockers = st.builds(
    Blocker,
    id=ids,
    agent_id=text_1_200,
    agent_name=st.text(min_size=1, max_size=500),
    task_id=ids,
    task_title=st.text(min_size=1, max_size=500),
    blocker_type=st.sampled_from(["SYNC", "ASYNC"]),
    question=st.text(min_size=1, max_size=2000),
    status=st.sampled_from(["PENDING", "RESOLVED", "EXPIRED"]),
    created_at=aware,
)
events = st.one_of(
    st.builds(BlockerCreated, project_id=ids, blocker=blockers),
    st.builds(
        BlockerResolved,
        project_id=ids,
        blocker_id=ids,
        answer=st.text(min_size=1, max_size=5000),
        resolved_at=aware,
    ),
    st.builds(
        AgentResumed,
        project_id=ids,
        agent_id=text_1_200,
        task_id=ids,
        blocker_id=ids,
        resumed_at=aware,
    ),
    st.builds(BlockerExpired, project_id=ids, blocker_id=ids, task_id=ids, expired_at=aware),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=15,
)
EVENT_TAGS = [t.__struct_config__.tag for t in event_types()]
EVENT_FIELDS = sorted({f for t in event_types() for f in t.__struct_fields__} | {"blocker"})
event_like = st.fixed_dictionaries(
    {"type": st.sampled_from([*EVENT_TAGS, "nope"]) | json_values},
    optional={field: json_values | ids for field in EVENT_FIELDS},
)
CLIENT_TAGS = ["auth", "subscribe", "unsubscribe", "ping", "nope"]
client_like = st.fixed_dictionaries(
    {"type": st.sampled_from(CLIENT_TAGS) | json_values},
    optional={
        "token": json_values,
        "project_id": json_values | ids,
        "epoch": json_values | st.from_regex(r"\A[A-Za-z0-9_-]{1,70}\Z"),
        "after": json_values | st.integers(min_value=-1, max_value=2**54),
    },
)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(events)
def test_valid_events_round_trip(event: ProjectEvent) -> None:
    data = encode_event(event)
    decoded = decode_event(data)
    assert decoded == event  # aware datetimes compare by instant
    assert encode_event(decoded) == data
    for value in re.findall(rb'_at":"([^"]*)"', data):
        assert value.endswith(b"Z")


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_decode_event(data: bytes) -> None:
    try:
        decode_event(data)
    except EventValidationError:
        pass


@FAST
@given(json_values | event_like)
def test_random_json_never_crashes_decode_event(value: Any) -> None:
    try:
        event = decode_event(json.dumps(value))
    except EventValidationError:
        return
    assert isinstance(event, ProjectEvent)


@FAST
@given(events, st.sampled_from(EVENT_FIELDS), json_values)
def test_mutated_valid_events_decode_or_raise_validation_error(
    event: ProjectEvent, field: str, value: Any
) -> None:
    doc = json.loads(encode_event(event))
    doc[field] = value
    try:
        decode_event(json.dumps(doc))
    except EventValidationError as exc:
        assert "`$" in str(exc) or "JSON" in str(exc) or "field" in str(exc)


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_decode_client_message(data: bytes) -> None:
    try:
        decode_client_message(data)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.message


@FAST
@given(json_values | client_like)
def test_random_json_never_crashes_decode_client_message(value: Any) -> None:
    try:
        decode_client_message(json.dumps(value))
    except ProtocolError as exc:
        assert exc.code in {
            ErrorCode.INVALID_JSON,
            ErrorCode.INVALID_MESSAGE,
            ErrorCode.UNKNOWN_TYPE,
            ErrorCode.INVALID_CURSOR,
        }


# --- the wire protocol's decoder -------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ('{"type":"auth","token":"abc"}', Auth(token="abc")),
        ('{"type":"subscribe","project_id":1}', Subscribe(project_id=1)),
        (
            '{"type":"subscribe","project_id":1,"epoch":"e-1_X","after":41}',
            Subscribe(project_id=1, epoch="e-1_X", after=41),
        ),
        ('{"type":"unsubscribe","project_id":1}', Unsubscribe(project_id=1)),
        ('{"type":"ping"}', Ping()),
    ],
)
def test_protocol_examples_decode(frame: str, expected: Any) -> None:
    assert decode_client_message(frame) == expected


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", ErrorCode.INVALID_JSON),
        ('{"project_id":1}', ErrorCode.UNKNOWN_TYPE),
        ('{"type":"shout"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type":"subscribe"}', ErrorCode.INVALID_MESSAGE),
        ('{"type":"subscribe","project_id":0}', ErrorCode.INVALID_MESSAGE),
        ('{"type":"subscribe","project_id":1,"epoch":"bad epoch!","after":1}', "invalid_cursor"),
        ('{"type":"subscribe","project_id":1,"epoch":"e","after":-1}', "invalid_cursor"),
        ('{"type":"subscribe","project_id":1,"epoch":"e\\n","after":1}', "invalid_cursor"),
        ('{"type":"auth","token":""}', ErrorCode.INVALID_MESSAGE),
    ],
)
def test_protocol_errors_carry_a_precise_code(frame: str, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_client_message(frame)
    assert info.value.code == code
    assert str(info.value) == info.value.message


# --- JSON Schema export -----------------------------------------------------------------------


def exported_schema() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "schemas"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout


@pytest.fixture(scope="module")
def schema_doc() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


def test_committed_schema_is_up_to_date() -> None:
    committed = SCHEMA_FILE.read_text()
    assert exported_schema() == committed, (
        "schemas/eventbus.schema.json is stale: run `make schema` and commit the result"
    )


def _validator(schema_doc: dict[str, Any], part: str) -> jsonschema.Draft202012Validator:
    schema = {"$defs": schema_doc["$defs"], **schema_doc["properties"][part]}
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_schema_validates_the_contract_examples(schema_doc: dict[str, Any]) -> None:
    validator = _validator(schema_doc, "event")
    for tag in CONTRACT_EXAMPLES:
        validator.validate(example(tag))
        validator.validate(dict(example(tag), seq=7))  # as relayed, with seq


@pytest.mark.parametrize(
    ("tag", "path", "value"),
    [
        ("blocker_created", ("project_id",), 0),
        ("blocker_created", ("blocker", "blocker_type"), "sync"),
        ("blocker_created", ("blocker", "question"), ""),
        ("blocker_resolved", ("answer",), "a" * 5001),
        ("agent_resumed", ("agent_id",), ""),
        ("blocker_expired", ("type",), "blocker_exploded"),
    ],
)
def test_schema_rejects_what_the_decoder_rejects(
    schema_doc: dict[str, Any], tag: str, path: tuple[str, ...], value: Any
) -> None:
    doc = _set(example(tag), path, value)
    assert not _validator(schema_doc, "event").is_valid(doc)


def test_schema_covers_every_event_and_protocol_message(schema_doc: dict[str, Any]) -> None:
    titles = set(schema_doc["$defs"])
    assert {t.__name__ for t in event_types()} <= titles
    assert {"Auth", "Subscribe", "Unsubscribe", "Ping", "Subscribed", "ResyncRequired"} <= titles
    client = _validator(schema_doc, "client_message")
    client.validate({"type": "subscribe", "project_id": 1, "epoch": "abc", "after": 41})
    assert not client.is_valid({"type": "subscribe", "project_id": -1})


@settings(max_examples=40, deadline=None)
@given(events)
def test_schema_accepts_every_valid_event(event: ProjectEvent) -> None:
    doc = json.loads(SCHEMA_FILE.read_text())
    _validator(doc, "event").validate(json.loads(encode_event(event)))


# --- Redis key layout -------------------------------------------------------------------------


def test_keys_share_one_hash_tag_per_project() -> None:
    keys = Keys("eventbus")
    names = [keys.meta(42), keys.stream(42), keys.channel(42), keys.idempotency(42, "k")]
    assert names == [
        "eventbus:{42}:meta",
        "eventbus:{42}:stream",
        "eventbus:{42}:live",
        "eventbus:{42}:idem:k",
    ]
    assert {re.search(r"\{(.*?)\}", name).group(1) for name in names} == {"42"}  # type: ignore[union-attr]


def test_project_of_channel() -> None:
    keys = Keys("bus.test")
    assert keys.project_of_channel(keys.channel(7)) == 7
    assert keys.project_of_channel(keys.channel(7).encode()) == 7
    assert keys.project_of_channel("eventbus:{7}:live") is None
    assert keys.project_of_channel("bus.test:{07}:live") is None
    assert keys.project_of_channel("bus.test:{7}:stream") is None


@pytest.mark.parametrize("prefix", ["", "a b", "x:y", "{tag}", "é", "p" * 65, "eventbus\n"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Keys(prefix)


def test_parse_envelope() -> None:
    frame = b'{"type":"ping","project_id":1,"x":"a|b","seq":12}'
    envelope = parse_envelope(b"Ep0ch_-x|12|1762605896123|" + frame)
    assert envelope == ("Ep0ch_-x", 12, frame, 1762605896123)
    assert (envelope.epoch, envelope.seq, envelope.frame) == ("Ep0ch_-x", 12, frame)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"e|1|1",
        b"e|1|1|not-json",
        b"bad epoch|1|1|{}",
        b"epoch\n|1|1|{}",
        b"|1|1|{}",
        b"e|0|1|{}",
        b"e|01|1|{}",
        b"e|-1|1|{}",
        b"e|x|1|{}",
        b"e|12345678901234567|1|{}",
        b"e|1|x|{}",
        "e|1|1|{}",
    ],
)
def test_parse_envelope_rejects_foreign_messages(data: Any) -> None:
    with pytest.raises(MalformedEnvelope):
        parse_envelope(data)


def test_stream_entry_seq() -> None:
    assert stream_entry_seq(b"42-0") == 42
    assert stream_entry_seq("7-0") == 7
    for not_ours in (b"x-0", 5, None, [b"5-0"]):  # a foreign id, or none at all: ValueError
        with pytest.raises(ValueError):
            stream_entry_seq(not_ours)  # type: ignore[arg-type]


def test_msgspec_struct_is_the_source_of_event_types() -> None:
    # Adding an event type is one Struct: every subclass joins the union automatically.
    for event_type in event_types():
        assert issubclass(event_type, msgspec.Struct)
        assert event_type.__struct_config__.tag_field == "type"


class _Sample(msgspec.Struct):  # module level: annotations are strings resolved by name
    a: UtcDatetime
    b: int
    c: UtcDatetime | None = None
    d: datetime | None = None


def test_datetime_fields_are_found_through_annotations_and_optionals() -> None:
    assert _datetime_fields(_Sample) == ("a", "c", "d")
    assert _datetime_fields(BlockerResolved) == ("resolved_at",)
    assert _datetime_fields(BlockerCreated) == ()  # the nested Blocker normalises itself


def test_event_tags_never_collide_with_control_messages() -> None:
    # Browsers tell events from the gateway's control messages by "type".
    from schemas.protocol import ServerMessage

    control = {t.__struct_config__.tag for t in ServerMessage.__args__}
    assert control >= {"authenticated", "subscribed", "resync_required", "error", "pong"}
    assert not control & set(EVENT_TAGS)


def _events_module_with(added: str):
    """schemas/events.py as a user changes it to add an event type (docs/events.md): ``added``
    (a Struct's source) above ``event_types()``, loaded as a module of its own (its own
    ProjectEvent: the real module's types are untouched)."""
    import types

    source = Path("schemas/events.py").read_text()
    anchor = "\ndef event_types()"
    assert source.count(anchor) == 1
    module = types.ModuleType(f"schemas_events_with_an_added_type_{next(_added_types)}")
    sys.modules[module.__name__] = module  # (msgspec resolves annotations through it, later)
    code = source.replace(anchor, "\n" + added + "\n" + anchor, 1)
    exec(compile(code, "schemas/events.py (with an added type)", "exec"), module.__dict__)
    return module


_added_types = itertools.count()


@pytest.mark.parametrize("tag", ["activity", "subscribed", "presence_diff", "auth", "pong"])
def test_an_added_event_type_named_like_a_protocol_message_is_refused(tag) -> None:
    """Clients tell events from control messages by ``type``, and gateways skip a stored event
    of a protocol message's type (schemas.stored): an event type so named is refused when the
    module loads, with a message naming it, instead of publishing events no one receives."""
    added = f'class Clash(ProjectEvent, tag="{tag}"):\n    note: ShortText\n'
    with pytest.raises(TypeError, match=rf"event type Clash: its tag '{tag}' is the type of a"):
        _events_module_with(added)
    # Another tag is fine, and joins the union.
    fine = _events_module_with(added.replace(f'"{tag}"', '"task_noted"'))
    assert [t.__struct_config__.tag for t in fine.event_types()][-1] == "task_noted"


def test_an_event_over_the_largest_frame_is_refused_before_it_is_stored() -> None:
    """An added event type with an unbounded field can make an event larger than a stored frame
    may be (1 MiB with its seq): every gateway would skip it (clients get ``resync_required``
    ``history_corrupt``) after the publisher had answered with a cursor. ``encode_event``, which
    every publish goes through, refuses it with a message; one byte less is published, and its
    frame at the largest seq is still one that gateways relay."""
    from schemas.protocol import MAX_SEQ
    from schemas.stored import MAX_EVENT_BYTES, MAX_FRAME_BYTES, ForeignKind, check_frame

    module = _events_module_with(
        'class TaskNoted(ProjectEvent, tag="task_noted"):\n    notes: str\n'
    )
    empty = len(module.encode_event(module.TaskNoted(project_id=1, notes="")))
    largest = module.TaskNoted(project_id=1, notes="x" * (MAX_EVENT_BYTES - empty))
    payload = module.encode_event(largest)
    assert len(payload) == MAX_EVENT_BYTES
    frame = payload[:-1] + b',"seq":%d}' % MAX_SEQ  # (what the publish script stores)
    assert len(frame) == MAX_FRAME_BYTES
    assert check_frame(frame, ForeignKind.STREAM_ENTRY, 1, MAX_SEQ) == frame
    with pytest.raises(module.EventValidationError, match=r"takes 1048554 bytes, more than"):
        module.encode_event(
            module.TaskNoted(project_id=1, notes="x" * (MAX_EVENT_BYTES - empty + 1))
        )


def test_eventbus_js_knows_every_close_code_of_the_protocol() -> None:
    # eventbus.js (and its types) mirror CloseCode by hand: a code added to the protocol and not
    # to the browser client would be handled there as an unknown one.
    from schemas.protocol import CloseCode

    static = ROOT / "gateway" / "static"
    js = re.search(
        r"export const CloseCode = Object\.freeze\(\{(.*?)\}\);",
        (static / "eventbus.js").read_text(),
        re.S,
    )
    ts = re.search(r"CloseCode: Readonly<\{(.*?)\}>", (static / "eventbus.d.ts").read_text(), re.S)
    assert js is not None and ts is not None
    in_js = {name: int(code) for name, code in re.findall(r"(\w+): (\d+),", js.group(1))}
    in_ts = {name: int(code) for name, code in re.findall(r"(\w+): (\d+);", ts.group(1))}
    for code in CloseCode:
        assert in_js.get(code.name) == code.value, code
        assert in_ts.get(code.name) == code.value, code
