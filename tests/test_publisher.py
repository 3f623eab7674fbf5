"""Publisher unit tests: the sans-I/O core, and both publisher flavours against fakeredis (with
Lua). The same behaviour against a real redis-server, with concurrency, retention and outages, is
in ``test_publisher_real_redis.py``."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import fakeredis
import msgspec
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from publisher import (
    AsyncPublisher,
    Cursor,
    EventValidationError,
    IdempotencyConflict,
    Publisher,
    PublishError,
    PublisherUnavailable,
    PublishManyError,
    Retention,
)
from publisher.core import (
    BATCH_SIZE,
    in_order_outcome,
    new_epoch,
    pack_command,
    plan_batches,
    plan_in_order,
    prepare_single,
)
from schemas import (
    AgentResumed,
    Blocker,
    BlockerCreated,
    BlockerExpired,
    BlockerResolved,
    Keys,
    decode_event,
    encode_event,
    parse_envelope,
)
from schemas.protocol import Epoch

KEYS = Keys()
T0 = datetime(2025, 11, 8, 12, 45, 30, tzinfo=UTC)


def resolved(project_id: int = 1, n: int = 1) -> BlockerResolved:
    return BlockerResolved(
        project_id=project_id, blocker_id=n, answer=f"answer {n}", resolved_at=T0
    )


def blocker(**overrides: object) -> Blocker:
    fields: dict[str, object] = {
        "id": 123,
        "agent_id": "backend-worker-001",
        "agent_name": "Backend Worker #1",
        "task_id": 456,
        "task_title": "Implement authentication",
        "blocker_type": "SYNC",
        "question": "Should we use JWT or sessions?",
        "status": "PENDING",
        "created_at": datetime(2025, 11, 8, 12, 34, 56, tzinfo=UTC),
    }
    fields.update(overrides)
    return Blocker(**fields)  # type: ignore[arg-type]


def stream_frames(client: redis.Redis, project_id: int, keys: Keys = KEYS) -> list[dict]:
    return [json.loads(fields[b"f"]) for _id, fields in client.xrange(keys.stream(project_id))]


def drain(pubsub: redis.client.PubSub) -> list[bytes]:
    """Every message already delivered to a fakeredis subscriber (delivery is synchronous)."""
    out = []
    while (message := pubsub.get_message(ignore_subscribe_messages=True, timeout=0)) is not None:
        out.append(message["data"])
    return out


@pytest.fixture
def publisher(fake_redis: fakeredis.FakeRedis) -> Iterator[Publisher]:
    yield Publisher(fake_redis)


@pytest.fixture
def channel(fake_redis: fakeredis.FakeRedis) -> Iterator[redis.client.PubSub]:
    pubsub = fake_redis.pubsub()
    pubsub.psubscribe("eventbus:*")
    pubsub.get_message(timeout=0)  # the psubscribe confirmation
    yield pubsub
    pubsub.close()


# --- the sans-I/O core -----------------------------------------------------------------------


def test_epochs_are_random_and_valid_everywhere_an_epoch_goes() -> None:
    epochs = {new_epoch() for _ in range(200)}
    assert len(epochs) == 200
    for epoch in epochs:
        msgspec.convert(epoch, Epoch)  # the wire protocol's constraint
        assert parse_envelope(f"{epoch}|1|0|{{}}".encode()).epoch == epoch


def test_epochs_differ_in_a_forked_child() -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe()
    process = ctx.Process(target=lambda: child_conn.send([new_epoch() for _ in range(50)]))
    process.start()
    child = set(parent_conn.recv())
    process.join(10)
    parent = {new_epoch() for _ in range(50)}
    assert len(child) == 50 and not child & parent


def test_retention_defaults_and_validation() -> None:
    retention = Retention()
    assert retention.max_len == 10_000
    assert retention.max_age == timedelta(hours=24)
    assert retention.max_age_ms == 86_400_000
    assert Retention(max_age=timedelta(0)).max_age_ms == 0
    with pytest.raises(ValueError, match="max_len"):
        Retention(max_len=0)
    with pytest.raises(ValueError, match="max_age"):
        Retention(max_age=timedelta(seconds=-1))


def test_prepare_single_validates_before_building_anything() -> None:
    bad = resolved()
    bad.blocker_id = 0
    with pytest.raises(EventValidationError, match=r"\$\.blocker_id"):
        prepare_single(bad, keys=KEYS, retention=Retention(), publish_command="PUBLISH")


@pytest.mark.parametrize("key", ["", "has space", "tab\t", "é", "x" * 201, 42, "newline\n"])
def test_prepare_single_rejects_bad_idempotency_keys(key: object) -> None:
    with pytest.raises(ValueError, match="idempotency_key"):
        prepare_single(
            resolved(),
            keys=KEYS,
            retention=Retention(),
            publish_command="PUBLISH",
            idempotency_key=key,  # type: ignore[arg-type]
        )


def test_plan_batches_groups_by_project_in_order_and_splits_large_bursts() -> None:
    events = [resolved(project_id=1 + i % 3, n=i + 1) for i in range(3 * BATCH_SIZE + 30)]
    batches = plan_batches(events, keys=KEYS, retention=Retention(), publish_command="PUBLISH")
    # 510 events per project: two script calls each (500 + 10), all events covered once.
    assert [(b.project_id, b.size) for b in batches] == [
        (1, 500), (1, 10), (2, 500), (2, 10), (3, 500), (3, 10)
    ]  # fmt: skip
    positions = [p for b in batches for p in b.positions]
    assert sorted(positions) == list(range(len(events)))
    for batch in batches:
        assert all(events[p].project_id == batch.project_id for p in batch.positions)
        assert batch.positions == sorted(batch.positions)  # per-project order is the caller's


def test_plan_batches_gives_each_keyed_event_its_own_call_in_order() -> None:
    events = [resolved(project_id=p, n=i + 1) for i, p in enumerate([1, 1, 2, 1, 1, 2])]
    keys = [None, "k1", None, None, None, "k2"]
    batches = plan_batches(
        events, keys=KEYS, retention=Retention(), publish_command="PUBLISH", idempotency_keys=keys
    )
    assert [(b.project_id, b.positions) for b in batches] == [
        (1, [0]), (1, [1]), (1, [3, 4]), (2, [2]), (2, [5])
    ]  # fmt: skip
    keyed = [b for b in batches if str(b.args[6]).endswith((":idem:k1", ":idem:k2"))]
    assert [b.positions for b in keyed] == [[1], [5]]
    assert all(len(str(b.args[7])) == 32 for b in keyed)  # the event's digest
    assert all(b.args[7] == "" for b in batches if b not in keyed)  # retry guards: no digest


def test_a_try_again_later_result_retries_the_whole_pipeline() -> None:
    """A cluster pipeline returns CLUSTERDOWN or a lost node as a result, not an exception."""
    from publisher.client import _unless_unavailable

    fine = [[b"e", 1, 0], redis.exceptions.ResponseError("WRONGTYPE")]
    assert _unless_unavailable(fine) is fine
    for error in (
        redis.exceptions.ClusterDownError("CLUSTERDOWN"),
        redis.exceptions.ConnectionError("lost"),
        redis.exceptions.TimeoutError("late"),
    ):
        with pytest.raises(type(error)):
            _unless_unavailable([[b"e", 1, 0], error])


def test_plan_batches_rejects_the_whole_burst_if_one_event_is_invalid() -> None:
    events = [resolved(n=i + 1) for i in range(10)]
    events[7].answer = ""
    with pytest.raises(EventValidationError, match=r"\$\.answer"):
        plan_batches(events, keys=KEYS, retention=Retention(), publish_command="PUBLISH")


@pytest.mark.parametrize("plan", [plan_batches, plan_in_order])
@pytest.mark.parametrize("keys", ["ab", b"ab"])
def test_a_string_for_idempotency_keys_is_refused_not_taken_for_one_key_per_character(
    plan, keys
) -> None:
    """``idempotency_keys="ab"`` for two events (one key meant for the burst, say): a clear
    ValueError before anything is sent. Before, a ``str`` was a list of one-character keys, "a"
    and "b", and the events were published under them (an IdempotencyConflict at best)."""
    events = [resolved(n=1), resolved(n=2)]
    with pytest.raises(ValueError, match="one entry per event"):
        plan(
            events,
            keys=KEYS,
            retention=Retention(),
            publish_command="PUBLISH",
            idempotency_keys=keys,
        )


def test_plan_in_order_makes_one_call_per_event_in_the_input_order() -> None:
    events = [resolved(project_id=p, n=i + 1) for i, p in enumerate([2, 1, 2, 1])]
    calls = plan_in_order(
        events,
        keys=KEYS,
        retention=Retention(),
        publish_command="PUBLISH",
        idempotency_keys=["k0", None, "k2", None],
    )
    assert [(c.project_id, c.positions, c.size) for c in calls] == [
        (2, [0], 1), (1, [1], 1), (2, [2], 1), (1, [3], 1)
    ]  # fmt: skip
    assert [calls[0].args[6], calls[2].args[6]] == [
        KEYS.idempotency(2, "k0"),
        KEYS.idempotency(2, "k2"),
    ]
    assert all(":idem:~" in str(calls[i].args[6]) for i in (1, 3))  # retry guards of their own
    with pytest.raises(ValueError, match="one entry per event"):
        plan_in_order(
            events,
            keys=KEYS,
            retention=Retention(),
            publish_command="PUBLISH",
            idempotency_keys=["k"],
        )
    with pytest.raises(ValueError, match="idempotency_key"):
        plan_in_order(
            events,
            keys=KEYS,
            retention=Retention(),
            publish_command="PUBLISH",
            idempotency_keys=[None, None, None, "has space"],
        )
    events[3].answer = ""
    with pytest.raises(EventValidationError, match=r"\$\.answer"):
        plan_in_order(events, keys=KEYS, retention=Retention(), publish_command="PUBLISH")


def test_in_order_outcome_reads_the_replies_up_to_the_first_refused_call() -> None:
    """What a transaction came to, from its replies alone: the cursor of every call that ran,
    the first refused one, each refused project's first error. Calls after the refused one ran
    too: another project's is published, a refusal from the project's state (a damaged key)
    refuses its project's later calls, an IdempotencyConflict (one call's own) does not."""
    events = [resolved(project_id=p, n=i + 1) for i, p in enumerate([1, 2, 3, 2, 1, 3, 3])]
    calls = plan_in_order(
        events,
        keys=KEYS,
        retention=Retention(),
        publish_command="PUBLISH",
        idempotency_keys=[f"k{i}" for i in range(7)],
    )
    damaged = redis.exceptions.ResponseError(
        "EVENTBUS_CORRUPT eventbus:{2}:meta is not a hash script: 1a2b, on @user_script:12."
    )
    replies = [
        [b"E1", 4, 0],
        damaged,
        [b"E3", 9, 2],  # CONFLICT: k2 was used for another event
        damaged,
        [b"E1", 5, 1],  # DUPLICATE: published before, its first cursor
        [b"E3", 10, 0],  # project 3 after its refused call: overtook it
        [b"E3", 11],  # a reply the script cannot give
    ]
    cursors, refused, errors = in_order_outcome(calls, replies)
    assert cursors == [Cursor("E1", 4), None, None, None, Cursor("E1", 5), Cursor("E3", 10), None]
    assert refused == 1
    assert list(errors) == [2, 3]
    assert "eventbus:{2}:meta" in str(errors[2]) and "nothing written" in str(errors[2])
    assert isinstance(errors[3], IdempotencyConflict) and errors[3].key == "k2"
    assert errors[3].cursor == Cursor("E3", 9)

    # One call at a time, stopped at the refused one: the others had no reply (not sent).
    cursors, refused, one_by_one = in_order_outcome(calls, replies[:2])
    assert (cursors, refused, list(one_by_one)) == ([Cursor("E1", 4)] + [None] * 6, 1, [2])
    # A transaction Redis discarded (a call refused while queued): nothing ran.
    oom = redis.exceptions.ResponseError("OOM command not allowed")
    cursors, refused, errors = in_order_outcome(calls, [oom])
    assert (cursors, refused, list(errors)) == ([None] * 7, 0, [1])
    assert str(errors[1]) == "publish failed: OOM command not allowed"
    assert in_order_outcome(calls[:1], [[b"E1", 4, 0]]) == ([Cursor("E1", 4)], None, {})

    error = PublishManyError([Cursor("E1", 4), None], {2: PublishError("x")}, stopped_at=1)
    assert error.stopped_at == 1 and error.unpublished == [1]
    assert "stopped at event 1" in str(error)
    assert PublishManyError([None], {2: PublishError("x")}).stopped_at is None


# --- Publisher (sync) against fakeredis -------------------------------------------------------


def test_publish_returns_consecutive_cursors(publisher: Publisher) -> None:
    cursors = [publisher.publish(resolved(n=i)) for i in range(1, 6)]
    assert [c.seq for c in cursors] == [1, 2, 3, 4, 5]
    assert len({c.epoch for c in cursors}) == 1
    assert all(isinstance(c, Cursor) for c in cursors)


def test_epoch_is_stored_with_the_history(publisher: Publisher, fake_redis) -> None:
    cursor = publisher.publish(resolved())
    assert fake_redis.hgetall(KEYS.meta(1)) == {b"epoch": cursor.epoch.encode(), b"seq": b"1"}


def test_stream_and_channel_carry_the_same_frame(publisher: Publisher, fake_redis, channel) -> None:
    event = resolved(n=9)
    cursor = publisher.publish(event)
    frame = dict(json.loads(encode_event(event)), seq=1)
    assert stream_frames(fake_redis, 1) == [frame]
    [message] = drain(channel)
    envelope = parse_envelope(message)
    assert (envelope.epoch, envelope.seq) == cursor
    assert json.loads(envelope.frame) == frame
    # The frame is the event's JSON with seq appended, key order kept: bytes the browser gets.
    assert envelope.frame == encode_event(event)[:-1] + b',"seq":1}'
    assert envelope.published_ms > 0
    [(entry_id, fields)] = fake_redis.xrange(KEYS.stream(1))
    assert entry_id == b"1-0"
    assert fields[b"f"] == envelope.frame


def test_projects_have_independent_sequences_and_epochs(publisher: Publisher) -> None:
    a1, b1, a2 = (publisher.publish(resolved(p)) for p in (1, 2, 1))
    assert (a1.seq, b1.seq, a2.seq) == (1, 1, 2)
    assert a1.epoch == a2.epoch != b1.epoch


def test_typed_helpers_publish_the_contract_events(publisher: Publisher, fake_redis) -> None:
    publisher.blocker_created(7, blocker())
    publisher.blocker_resolved(7, 123, "Use JWT for stateless API", T0)
    publisher.agent_resumed(7, "backend-worker-001", 456, 123, T0)
    publisher.blocker_expired(7, blocker_id=123, task_id=456, expired_at=T0)
    frames = stream_frames(fake_redis, 7)
    assert [f["type"] for f in frames] == [
        "blocker_created",
        "blocker_resolved",
        "agent_resumed",
        "blocker_expired",
    ]
    assert [f["seq"] for f in frames] == [1, 2, 3, 4]
    assert frames[0]["blocker"]["question"] == "Should we use JWT or sessions?"
    assert frames[1] == {
        "type": "blocker_resolved",
        "project_id": 7,
        "blocker_id": 123,
        "answer": "Use JWT for stateless API",
        "resolved_at": "2025-11-08T12:45:30Z",
        "seq": 2,
    }
    assert frames[2]["agent_id"] == "backend-worker-001"
    assert (frames[3]["blocker_id"], frames[3]["task_id"]) == (123, 456)
    for frame in frames:
        assert type(decode_event(json.dumps(frame))) in {
            BlockerCreated,
            BlockerResolved,
            AgentResumed,
            BlockerExpired,
        }


def test_helper_timestamps_default_to_now_utc(publisher: Publisher, fake_redis) -> None:
    before = datetime.now(UTC)
    publisher.blocker_resolved(1, 1, "a")
    publisher.agent_resumed(1, "agent", 1, 1)
    publisher.blocker_expired(1, 1, 1)
    after = datetime.now(UTC)
    for frame, field in zip(
        stream_frames(fake_redis, 1), ["resolved_at", "resumed_at", "expired_at"], strict=True
    ):
        assert frame[field].endswith("Z")
        stamp = datetime.fromisoformat(frame[field])
        assert before <= stamp <= after


def test_helpers_normalise_offsets_to_utc(publisher: Publisher, fake_redis) -> None:
    publisher.blocker_resolved(
        1, 1, "a", datetime(2025, 11, 8, 14, 45, 30, tzinfo=timezone(timedelta(hours=2)))
    )
    assert stream_frames(fake_redis, 1)[0]["resolved_at"] == "2025-11-08T12:45:30Z"


def test_helpers_validate(publisher: Publisher, fake_redis) -> None:
    with pytest.raises(EventValidationError, match=r"\$\.answer"):
        publisher.blocker_resolved(1, 1, "")
    with pytest.raises(EventValidationError, match=r"\$\.project_id"):
        publisher.agent_resumed(0, "agent", 1, 1)
    with pytest.raises(EventValidationError, match=r"\$\.agent_id"):
        publisher.agent_resumed(1, "", 1, 1)
    with pytest.raises(EventValidationError, match=r"\$\.blocker\.blocker_type"):
        publisher.blocker_created(1, blocker(blocker_type="MAYBE"))
    with pytest.raises(EventValidationError, match="timezone-aware"):
        publisher.blocker_expired(1, 1, 1, datetime(2025, 1, 1))
    assert fake_redis.dbsize() == 0


def test_invalid_event_writes_and_publishes_nothing(
    publisher: Publisher, fake_redis, channel
) -> None:
    publisher.publish(resolved())
    before = {k: fake_redis.dump(k) for k in fake_redis.keys("*")}
    bad = resolved()
    bad.project_id = -3
    with pytest.raises(EventValidationError, match=r"\$\.project_id"):
        publisher.publish(bad)
    with pytest.raises(EventValidationError):
        publisher.publish_many([resolved(n=2), bad])
    with pytest.raises(EventValidationError):
        publisher.publish({"type": "blocker_resolved"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="idempotency_key"):
        publisher.publish(resolved(), idempotency_key="not valid")
    assert {k: fake_redis.dump(k) for k in fake_redis.keys("*")} == before
    assert [parse_envelope(m).seq for m in drain(channel)] == [1]


def test_publish_many_keeps_order_and_returns_cursors_in_input_order(
    publisher: Publisher, fake_redis, channel
) -> None:
    publisher.publish(resolved(project_id=2, n=9999))  # project 2 already has one event
    events = [resolved(project_id=(1, 2, 3)[i % 3], n=i + 1) for i in range(1234)]
    cursors = publisher.publish_many(events)
    assert len(cursors) == len(events)
    expected_next = {1: 1, 2: 2, 3: 1}
    for event, cursor in zip(events, cursors, strict=True):
        assert cursor.seq == expected_next[event.project_id]
        expected_next[event.project_id] += 1
    for project in (1, 2, 3):
        mine = [e for e in events if e.project_id == project]
        frames = stream_frames(fake_redis, project)[-len(mine) :]
        assert [f["blocker_id"] for f in frames] == [e.blocker_id for e in mine]
        epochs = {c.epoch for e, c in zip(events, cursors, strict=True) if e.project_id == project}
        assert len(epochs) == 1
    messages = [parse_envelope(m) for m in drain(channel)]
    assert len(messages) == 1 + len(events)
    per_project: dict[int, list[int]] = {}
    for m in messages:
        per_project.setdefault(json.loads(m.frame)["project_id"], []).append(m.seq)
    assert per_project == {p: list(range(1, expected_next[p])) for p in (1, 2, 3)}
    assert len(per_project[1]) == 412  # 1234 events: 412 + 411 + 411, plus the one before


def test_publish_many_of_nothing(publisher: Publisher, fake_redis) -> None:
    assert publisher.publish_many([]) == []
    assert publisher.publish_many(iter([])) == []
    assert fake_redis.dbsize() == 0


def test_publish_many_accepts_any_iterable(publisher: Publisher) -> None:
    cursors = publisher.publish_many(resolved(n=i + 1) for i in range(3))
    assert [c.seq for c in cursors] == [1, 2, 3]


def test_idempotent_retry_publishes_once(publisher: Publisher, fake_redis, channel) -> None:
    first = publisher.publish(resolved(n=1), idempotency_key="resolve-123")
    publisher.publish(resolved(n=2))
    again = publisher.publish(resolved(n=1), idempotency_key="resolve-123")
    # The helper stamps resolved_at anew: still the same event for its idempotency key.
    via_helper = publisher.blocker_resolved(1, 1, "answer 1", idempotency_key="resolve-123")
    assert again == first == via_helper == Cursor(first.epoch, 1)
    assert [f["seq"] for f in stream_frames(fake_redis, 1)] == [1, 2]
    assert [parse_envelope(m).seq for m in drain(channel)] == [1, 2]
    # Keys are per project, and other keys are independent.
    assert publisher.publish(resolved(project_id=2), idempotency_key="resolve-123").seq == 1
    assert publisher.publish(resolved(), idempotency_key="resolve-124").seq == 3


def test_idempotency_window(fake_redis) -> None:
    publisher = Publisher(fake_redis, idempotency_window=timedelta(seconds=90))
    publisher.publish(resolved(), idempotency_key="k")
    assert 89_000 < fake_redis.pttl(KEYS.idempotency(1, "k")) <= 90_000
    default = Publisher(fake_redis)
    default.publish(resolved(), idempotency_key="k2")
    assert 9 * 60_000 < fake_redis.pttl(KEYS.idempotency(1, "k2")) <= 10 * 60_000


def test_zero_idempotency_window_is_refused(fake_redis) -> None:
    publisher = Publisher(fake_redis, idempotency_window=timedelta(0))
    with pytest.raises(ValueError, match="idempotency_window"):
        publisher.publish(resolved(), idempotency_key="k")


def test_retention_by_count_is_applied(fake_redis) -> None:
    publisher = Publisher(fake_redis, retention=Retention(max_len=50, max_age=timedelta(0)))
    publisher.publish_many(resolved(n=i + 1) for i in range(300))
    frames = stream_frames(fake_redis, 1)
    assert 50 <= len(frames) < 300
    assert frames[-1]["seq"] == 300
    assert [f["seq"] for f in frames] == list(range(301 - len(frames), 301))
    assert fake_redis.pttl(KEYS.stream(1)) == -1  # no age limit: no TTL either


def test_retention_by_age_sets_a_ttl(fake_redis) -> None:
    publisher = Publisher(fake_redis, retention=Retention(max_age=timedelta(seconds=30)))
    publisher.publish(resolved())
    assert 29_000 < fake_redis.pttl(KEYS.stream(1)) <= 30_000
    assert fake_redis.pttl(KEYS.meta(1)) == -1  # the epoch outlives the history


def test_custom_prefix(fake_redis) -> None:
    publisher = Publisher(fake_redis, prefix="tenant-a")
    publisher.publish(resolved())
    names = sorted(fake_redis.keys("*"))
    assert names[1:] == [b"tenant-a:{1}:meta", b"tenant-a:{1}:stream"]
    assert names[0].startswith(b"tenant-a:{1}:idem:~")  # the retry guard of that call
    with pytest.raises(ValueError, match="prefix"):
        Publisher(fake_redis, prefix="bad prefix")


def test_epoch_recreated_after_flush(publisher: Publisher, fake_redis) -> None:
    first = publisher.publish(resolved())
    publisher.publish(resolved())
    fake_redis.flushall()
    after = publisher.publish(resolved())
    assert after.seq == 1
    assert after.epoch != first.epoch


def test_lost_metadata_drops_the_stale_stream(publisher: Publisher, fake_redis) -> None:
    # E.g. an eviction took the metadata but not the stream: the old entries must not be mixed
    # into the new epoch's history.
    publisher.publish_many([resolved(n=1), resolved(n=2)])
    fake_redis.delete(KEYS.meta(1))
    cursor = publisher.publish(resolved(n=3))
    assert cursor.seq == 1
    assert [f["blocker_id"] for f in stream_frames(fake_redis, 1)] == [3]


def test_redis_errors_are_publish_errors(fake_redis) -> None:
    publisher = Publisher(fake_redis)
    fake_redis.set(KEYS.meta(1), "not a hash")  # WRONGTYPE inside the script
    with pytest.raises(PublishError, match=r"eventbus:\{1\}:meta is not a hash") as info:
        publisher.publish(resolved())
    assert not isinstance(info.value, PublisherUnavailable)
    with pytest.raises(PublishError):
        publisher.publish_many([resolved()])


def test_connection_failures_are_publisher_unavailable() -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    publisher = Publisher(client)
    publisher.publish(resolved())
    server.connected = False
    with pytest.raises(PublisherUnavailable, match="Redis unavailable"):
        publisher.publish(resolved())
    with pytest.raises(PublisherUnavailable):
        publisher.publish_many([resolved()])
    server.connected = True
    assert publisher.publish(resolved()).seq == 2


def test_context_manager_closes_the_client(fake_redis, monkeypatch) -> None:
    closed: list[bool] = []
    monkeypatch.setattr(fake_redis, "close", lambda: closed.append(True))
    with Publisher(fake_redis) as publisher:
        publisher.publish(resolved())
        assert not closed
    assert closed == [True]


def test_error_hierarchy() -> None:
    assert issubclass(PublisherUnavailable, PublishError)
    assert not issubclass(EventValidationError, PublishError)


def test_from_url_builds_a_client() -> None:
    publisher = Publisher.from_url("redis://127.0.0.1:1/0")
    try:
        assert isinstance(publisher.client, redis.Redis)
        assert publisher._settings.publish_command == "PUBLISH"
    finally:
        publisher.close()


# --- AsyncPublisher against fakeredis ---------------------------------------------------------


@pytest.fixture
async def async_fake():
    client = fakeredis.FakeAsyncRedis()
    yield client
    await client.aclose()


async def test_async_publish_and_helpers(async_fake) -> None:
    publisher = AsyncPublisher(async_fake)
    first = await publisher.publish(resolved())
    second = await publisher.blocker_created(1, blocker())
    third = await publisher.blocker_resolved(1, 123, "yes")
    fourth = await publisher.agent_resumed(1, "a", 1, 1)
    fifth = await publisher.blocker_expired(1, 1, 1)
    assert [c.seq for c in (first, second, third, fourth, fifth)] == [1, 2, 3, 4, 5]
    entries = await async_fake.xrange(KEYS.stream(1))
    assert [json.loads(f[b"f"])["type"] for _id, f in entries] == [
        "blocker_resolved",
        "blocker_created",
        "blocker_resolved",
        "agent_resumed",
        "blocker_expired",
    ]


async def test_async_publish_many_and_idempotency(async_fake) -> None:
    publisher = AsyncPublisher(async_fake)
    events = [resolved(project_id=1 + i % 2, n=i + 1) for i in range(1100)]
    cursors = await publisher.publish_many(events)
    assert [c.seq for c in cursors[:4]] == [1, 1, 2, 2]
    assert cursors[-1].seq == 550
    assert await publisher.publish_many([]) == []
    first = await publisher.publish(resolved(), idempotency_key="k")
    assert await publisher.publish(resolved(), idempotency_key="k") == first
    assert await async_fake.xlen(KEYS.stream(1)) == 551


async def test_async_invalid_event_writes_nothing(async_fake) -> None:
    publisher = AsyncPublisher(async_fake)
    bad = resolved()
    bad.answer = "a" * 5001
    with pytest.raises(EventValidationError, match=r"\$\.answer"):
        await publisher.publish(bad)
    with pytest.raises(EventValidationError):
        await publisher.publish_many([resolved(), bad])
    with pytest.raises(ValueError, match="idempotency_key"):
        await publisher.publish(resolved(), idempotency_key="")
    assert await async_fake.dbsize() == 0


async def test_async_context_manager(async_fake, monkeypatch) -> None:
    closed: list[bool] = []

    async def aclose() -> None:
        closed.append(True)

    monkeypatch.setattr(async_fake, "aclose", aclose)
    async with AsyncPublisher(async_fake) as publisher:
        assert (await publisher.publish(resolved())).seq == 1
        assert not closed
    assert closed == [True]


def test_publishers_share_the_helper_signatures() -> None:
    for name in ("blocker_created", "blocker_resolved", "agent_resumed", "blocker_expired"):
        sync_fn = getattr(Publisher, name)
        async_fn = getattr(AsyncPublisher, name)
        assert sync_fn is async_fn  # one implementation for both flavours
    assert re.search(r"idempotency", Publisher.publish.__doc__ or "")


# --- the hot path's own command encoding -------------------------------------------------------

_command_args = st.lists(
    st.one_of(st.binary(max_size=300), st.text(max_size=100), st.integers(-(2**63), 2**63 - 1)),
    max_size=20,
)


@given(_command_args)
def test_pack_command_is_byte_for_byte_what_redis_py_sends(args) -> None:
    """The publisher packs its script calls itself (publisher.connection.DirectCommands): Redis
    must receive exactly what redis-py would have sent for the same arguments."""
    expected = b"".join(redis.Connection().pack_command("EVALSHA", *args))
    assert pack_command("EVALSHA", *args) == expected
