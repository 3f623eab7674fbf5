"""The publisher against a real redis-server (a private one on a free port, flushed per test).

What users rely on: gapless per-project sequences under concurrent publishers (threads and
processes), a channel that carries exactly what the stream holds, bounded retention, idempotent
retries, invalid events that never reach Redis, a documented error when Redis is down, and a new
epoch when Redis loses its data.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from publisher import (
    AsyncPublisher,
    Cursor,
    EventValidationError,
    Publisher,
    PublishError,
    PublisherUnavailable,
    PublishManyError,
    Retention,
)
from schemas import BlockerResolved, Envelope, Keys, encode_event, lua, parse_envelope
from tests.support.redis_server import RedisServer, free_port

KEYS = Keys()
T0 = datetime(2025, 11, 8, 12, 45, 30, tzinfo=UTC)
WORKERS = 8
PER_WORKER = 500


def event(project_id: int, n: int) -> BlockerResolved:
    return BlockerResolved(
        project_id=project_id, blocker_id=n, answer=f"answer {n}", resolved_at=T0
    )


def wait_until(condition: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll ``condition`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(interval)
    return result


def stream_entries(client: redis.Redis, project_id: int) -> list[tuple[int, bytes, int]]:
    """(seq from the entry id, frame, publish ms) of every stored entry, oldest first."""
    return [
        (int(entry_id.split(b"-")[0]), fields[b"f"], int(fields[b"t"]))
        for entry_id, fields in client.xrange(KEYS.stream(project_id))
    ]


class ChannelSubscriber:
    """Collects a project's channel messages in a thread; subscribed before ``__init__`` returns,
    so nothing published afterwards can be missed."""

    def __init__(self, url: str, channel: str, *, pattern: bool = False) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        if pattern:
            self.pubsub.psubscribe(channel)
        else:
            self.pubsub.subscribe(channel)
        # The confirmation proves the server registered the subscription.
        confirmation = self.pubsub.get_message(timeout=5)
        assert confirmation and confirmation["type"] in ("subscribe", "psubscribe")
        self.messages: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
            if message is not None:
                with self._lock:
                    self.messages.append(message["data"])

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Envelope]:
        wait_until(lambda: len(self.messages) >= count, timeout)
        with self._lock:
            return [parse_envelope(m) for m in self.messages]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()
        self.client.close()


@pytest.fixture
def publisher(redis_url: str) -> Iterator[Publisher]:
    with Publisher.from_url(redis_url) as pub:
        yield pub


@pytest.fixture
def subscriber(redis_url: str) -> Iterator[Callable[..., ChannelSubscriber]]:
    made: list[ChannelSubscriber] = []

    def make(channel: str, *, pattern: bool = False) -> ChannelSubscriber:
        made.append(ChannelSubscriber(redis_url, channel, pattern=pattern))
        return made[-1]

    yield make
    for sub in made:
        sub.close()


def assert_channel_matches_stream(
    envelopes: list[Envelope], client: redis.Redis, project_id: int, total: int
) -> None:
    """The channel carried exactly the stream's entries, in order, with one epoch."""
    entries = stream_entries(client, project_id)
    assert [e[0] for e in entries] == list(range(1, total + 1))  # no gap, no duplicate
    assert len(envelopes) == total
    assert [(m.seq, m.frame) for m in envelopes] == [(seq, frame) for seq, frame, _t in entries]
    assert [m.published_ms for m in envelopes] == [t for _seq, _frame, t in entries]
    epoch = client.hget(KEYS.meta(project_id), "epoch").decode()
    assert {m.epoch for m in envelopes} == {epoch}
    for seq, frame, _t in entries:
        assert json.loads(frame)["seq"] == seq


# --- basics -----------------------------------------------------------------------------------


def test_publish_returns_cursors_1_to_n(publisher: Publisher, redis_client) -> None:
    cursors = [publisher.publish(event(1, i)) for i in range(1, 21)]
    assert [c.seq for c in cursors] == list(range(1, 21))
    assert {c.epoch for c in cursors} == {redis_client.hget(KEYS.meta(1), "epoch").decode()}
    assert redis_client.hget(KEYS.meta(1), "seq") == b"20"


def test_stream_and_channel_content(
    publisher: Publisher, redis_client, subscriber, redis_url: str
) -> None:
    sub = subscriber(KEYS.channel(5))
    events = [event(5, i) for i in range(1, 4)]
    cursors = [publisher.publish(e) for e in events]
    envelopes = sub.wait_for(3)
    assert_channel_matches_stream(envelopes, redis_client, 5, 3)
    for e, cursor, envelope in zip(events, cursors, envelopes, strict=True):
        assert (envelope.epoch, envelope.seq) == cursor
        assert envelope.frame == encode_event(e)[:-1] + f',"seq":{cursor.seq}}}'.encode()
    # publish time is Redis's clock, close to ours
    assert abs(envelopes[0].published_ms / 1000 - time.time()) < 5


def test_typed_helpers(publisher: Publisher, redis_client) -> None:
    publisher.blocker_resolved(3, 123, "Use JWT for stateless API", resolved_at=T0)
    publisher.agent_resumed(3, "backend-worker-001", task_id=456, blocker_id=123)
    publisher.blocker_expired(3, blocker_id=124, task_id=457)
    frames = [json.loads(f) for _s, f, _t in stream_entries(redis_client, 3)]
    assert frames[0] == {
        "type": "blocker_resolved",
        "project_id": 3,
        "blocker_id": 123,
        "answer": "Use JWT for stateless API",
        "resolved_at": "2025-11-08T12:45:30Z",
        "seq": 1,
    }
    assert [f["type"] for f in frames] == ["blocker_resolved", "agent_resumed", "blocker_expired"]
    assert frames[1]["resumed_at"].endswith("Z") and frames[2]["expired_at"].endswith("Z")


def test_publish_many_mixed_projects_over_one_batch(
    publisher: Publisher, redis_client, subscriber
) -> None:
    sub = subscriber(KEYS.prefix + ":*", pattern=True)
    publisher.publish(event(2, 1))
    events = [event(1 + (i % 7 == 0), i + 2) for i in range(1300)]  # mostly project 1, some 2
    cursors = publisher.publish_many(events)
    next_seq = {1: 1, 2: 2}
    for e, cursor in zip(events, cursors, strict=True):
        assert cursor.seq == next_seq[e.project_id]
        next_seq[e.project_id] += 1
    for project in (1, 2):
        entries = stream_entries(redis_client, project)
        assert [s for s, _f, _t in entries] == list(range(1, next_seq[project]))
        stored_ids = [json.loads(f)["blocker_id"] for _s, f, _t in entries]
        published = [e.blocker_id for e in events if e.project_id == project]
        assert stored_ids[-len(published) :] == published
    envelopes = sub.wait_for(1301)
    per_project: dict[int, list[int]] = {1: [], 2: []}
    for m in envelopes:
        per_project[json.loads(m.frame)["project_id"]].append(m.seq)
    assert per_project == {p: list(range(1, next_seq[p])) for p in (1, 2)}


def test_epoch_created_on_first_publish_and_renewed_after_flushall(
    publisher: Publisher, redis_client
) -> None:
    assert redis_client.exists(KEYS.meta(1)) == 0
    first = publisher.publish(event(1, 1))
    assert redis_client.hget(KEYS.meta(1), "epoch").decode() == first.epoch
    assert publisher.publish(event(1, 2)) == Cursor(first.epoch, 2)
    redis_client.flushall()
    renewed = publisher.publish(event(1, 3))  # also reloads the flushed script
    assert renewed.seq == 1 and renewed.epoch != first.epoch
    redis_client.flushall()
    [batch_first, _] = publisher.publish_many([event(1, 4), event(1, 5)])
    assert batch_first.seq == 1 and batch_first.epoch not in (first.epoch, renewed.epoch)


def test_script_cache_flush_is_survived(publisher: Publisher, redis_client) -> None:
    publisher.publish(event(1, 1))
    redis_client.script_flush()
    assert publisher.publish(event(1, 2)).seq == 2
    redis_client.script_flush()
    assert [c.seq for c in publisher.publish_many([event(1, 3), event(1, 4)])] == [3, 4]


async def test_async_script_cache_flush_is_survived(redis_url: str, redis_client) -> None:
    async with AsyncPublisher.from_url(redis_url) as pub:
        await pub.publish(event(1, 1))
        redis_client.script_flush()
        assert (await pub.publish(event(1, 2))).seq == 2
        redis_client.script_flush()
        assert [c.seq for c in await pub.publish_many([event(1, 3), event(1, 4)])] == [3, 4]


# --- publish_many(..., in_order=True): in order, stopping at the first refused call -------------


def _burst_with_a_damaged_project() -> tuple[list[BlockerResolved], list[str]]:
    """250 keyed events, three transactions of 100: projects 1 and 3 alternate up to index 150,
    then projects 1, 2 and 3 take turns; project 2 (whose meta key the test damages) first
    appears at index 150, in the middle of the second transaction."""
    events = [event(1 + 2 * (i % 2), i + 1) for i in range(150)]
    events += [event(1 + (i + 1) % 3, i + 1) for i in range(150, 250)]
    return events, [f"in-order-{i}" for i in range(250)]


def _in_order(url: str, flavour: str, events: list, keys: list) -> list[Cursor]:
    """``publish_many(events, idempotency_keys=keys, in_order=True)`` with a new sync or asyncio
    publisher."""
    if flavour == "sync":
        with Publisher.from_url(url) as pub:
            return pub.publish_many(events, idempotency_keys=keys, in_order=True)

    async def run() -> list[Cursor]:
        async with AsyncPublisher.from_url(url) as pub:
            return await pub.publish_many(events, idempotency_keys=keys, in_order=True)

    return asyncio.run(run())


def _stored(client: redis.Redis, project_id: int) -> list[tuple[int, int]]:
    """(seq, blocker id) of every entry of the project's stream, oldest first."""
    return [
        (seq, json.loads(frame)["blocker_id"])
        for seq, frame, _t in stream_entries(client, project_id)
    ]


def _transactions_run(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0))


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_in_order_publishing_stops_at_the_first_refused_event_and_says_exactly_what_ran(
    redis_url: str, redis_client, flavour: str
) -> None:
    """A damaged key of project 2 refuses its first event, index 150, in the second of three
    transactions: every event before it is published, the third transaction is never sent, and
    ``PublishManyError`` says exactly what Redis ran (its cursors are the streams' entries, the
    events of projects 1 and 3 after 150 in the same transaction included). Plain
    ``publish_many`` goes on after a refused call (all of projects 1 and 3 published: an outbox
    relay's later rows ahead of a held one). After the repair, the same burst under the same keys
    publishes each event exactly once, in order, those that ran returning their first cursors."""
    events, keys = _burst_with_a_damaged_project()
    redis_client.set(KEYS.meta(2), "not a hash")
    redis_client.script_load(lua.PUBLISH)  # (else a first transaction finds NOSCRIPT: one more)
    redis_client.config_resetstat()
    with pytest.raises(PublishManyError) as caught:
        _in_order(redis_url, flavour, events, keys)
    error = caught.value
    assert error.stopped_at == 150
    assert list(error.errors) == [2] and "eventbus:{2}:meta" in str(error.errors[2])
    assert _transactions_run(redis_client) == 2  # nothing sent after the one with the refusal
    ran = [i for i, cursor in enumerate(error.cursors) if cursor is not None]
    assert ran == list(range(150)) + [i for i in range(151, 200) if events[i].project_id != 2]
    assert error.unpublished == [i for i in range(250) if i not in ran]
    for project_id in (1, 3):
        assert _stored(redis_client, project_id) == [
            (error.cursors[i].seq, events[i].blocker_id)
            for i in ran
            if events[i].project_id == project_id
        ]
    assert _stored(redis_client, 2) == []

    redis_client.delete(KEYS.meta(2))  # repaired: project 2 starts a history
    cursors = _in_order(redis_url, flavour, events, keys)
    assert [cursors[i] for i in ran] == [error.cursors[i] for i in ran]  # their first cursors
    for project_id in (1, 2, 3):
        mine = [i for i in range(250) if events[i].project_id == project_id]
        assert _stored(redis_client, project_id) == [
            (n, events[i].blocker_id) for n, i in enumerate(mine, 1)
        ]
        assert [cursors[i].seq for i in mine] == list(range(1, len(mine) + 1))


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_in_order_publishing_survives_a_script_cache_flush_and_a_burst_without_keys(
    redis_url: str, redis_client, flavour: str
) -> None:
    """After SCRIPT FLUSH every call of the transaction is refused with NOSCRIPT and none ran:
    the publisher loads the script and sends the transaction again. Events without a key are
    each published once under a retry guard of their own."""
    _in_order(redis_url, flavour, [event(1, 10)], [None])
    redis_client.script_flush()
    events = [event(1 + i % 2, i) for i in range(1, 6)]
    cursors = _in_order(redis_url, flavour, events, [None, "k2", None, "k4", None])
    assert [(e.project_id, c.seq) for e, c in zip(events, cursors, strict=True)] == [
        (2, 1),
        (1, 2),
        (2, 2),
        (1, 3),
        (2, 3),
    ]
    assert _stored(redis_client, 1) == [(1, 10), (2, 2), (3, 4)]
    assert _stored(redis_client, 2) == [(1, 1), (2, 3), (3, 5)]


@pytest.fixture
def user_url(redis_server: RedisServer, redis_url: str) -> Iterator[Callable[..., str]]:
    """``user_url(*rules)``: the URL of a Redis user made with these ACL rules (deleted after)."""
    admin = redis_server.client()
    made: list[str] = []

    def make(*rules: str) -> str:
        name = f"user{len(made)}"
        admin.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", *rules)
        made.append(name)
        return f"redis://{name}:pw@127.0.0.1:{redis_server.port}/0"

    yield make
    for name in made:
        admin.execute_command("ACL", "DELUSER", name)
    admin.close()


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_in_order_publishing_stops_at_the_call_redis_refused_while_queueing_the_transaction(
    redis_client, user_url, flavour: str
) -> None:
    """A user without access to project 2's keys: Redis refuses its call while queueing the
    transaction (NOPERM) and runs none of it (EXECABORT). The calls are then sent one by one,
    so the burst stops exactly at project 2's event with project 2's error. Before, the refusal
    was reported at the transaction's first event, under that event's project (1, which nothing
    was wrong with: an outbox relay held it, with project 2's error)."""
    url = user_url("~eventbus:{1}:*", "~eventbus:{3}:*", "&*", "+@all")
    redis_client.script_load(lua.PUBLISH)
    events = [event(1, 1), event(3, 2), event(2, 3), event(1, 4)]
    with pytest.raises(PublishManyError) as caught:
        _in_order(url, flavour, events, ["k1", None, "k3", "k4"])
    error = caught.value
    assert error.stopped_at == 2
    assert list(error.errors) == [2] and "permissions" in str(error.errors[2])
    assert [c is not None for c in error.cursors] == [True, True, False, False]
    assert _stored(redis_client, 1) == [(error.cursors[0].seq, 1)]
    assert _stored(redis_client, 3) == [(error.cursors[1].seq, 2)]


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_in_order_publishing_says_what_ran_when_redis_refuses_the_transaction_itself(
    redis_client, user_url, flavour: str
) -> None:
    """A user that may not run MULTI (an ACL, or a proxy without transactions): each call of the
    "transaction" runs on its own and EXEC is refused ("EXEC without MULTI"), so which calls ran
    is not known from the replies. The keyed and guarded calls are sent again one by one, which
    returns the first cursors of those that ran: every event published once, its cursor exact.
    Before, ``PublishManyError`` said that none was published (``stopped_at`` 0) while every
    one was: retrying ``error.unpublished`` duplicated them, and a relay never marked its rows
    (republishing them each round, as new events once their keys expired)."""
    url = user_url("~*", "&*", "+@all", "-multi")
    redis_client.script_load(lua.PUBLISH)
    events = [event(1 + n % 2, n) for n in range(1, 8)]
    keys = [None, "k2", None, "k4", "k5", None, "k7"]
    cursors = _in_order(url, flavour, events, keys)
    for project_id in (1, 2):
        mine = [i for i in range(7) if events[i].project_id == project_id]
        assert _stored(redis_client, project_id) == [
            (cursors[i].seq, events[i].blocker_id) for i in mine
        ]
    assert [c.seq for c in cursors] == [1, 1, 2, 2, 3, 3, 4]


def test_in_order_publishing_without_retry_guards_says_why_it_cannot_tell_what_ran(
    redis_client, user_url
) -> None:
    """The same refused EXEC with ``retry_guard=None`` and no keys: sending the calls again
    could publish events twice, so PublishError, naming Redis's answer (before: "None")."""
    url = user_url("~*", "&*", "+@all", "-multi")
    redis_client.script_load(lua.PUBLISH)
    with Publisher.from_url(url, retry_guard=None) as pub:
        with pytest.raises(PublishError, match=r"EXEC without MULTI.*ran is unknown") as caught:
            pub.publish_many([event(1, 1), event(1, 2)], in_order=True)
    assert not isinstance(caught.value, PublishManyError)


def _in_order_with_a_fault(
    url: str, flavour: str, events: list, keys: list, fault: Callable[[], None], **kwargs: Any
) -> PublishError:
    """What ``publish_many(events, idempotency_keys=keys, in_order=True)`` raises, with a new
    sync or asyncio publisher (``timeout=1``, ``kwargs``), when ``fault()`` strikes just before
    its second transaction is sent."""
    sent = 0

    def second() -> bool:
        nonlocal sent
        sent += 1
        return sent == 2

    if flavour == "sync":
        with Publisher.from_url(url, timeout=1, **kwargs) as pub:
            transaction = pub._transaction

            def faulty(calls: list) -> list:
                if second():
                    fault()
                return transaction(calls)

            pub._transaction = faulty
            with pytest.raises(PublishError) as caught:
                pub.publish_many(events, idempotency_keys=keys, in_order=True)
            return caught.value

    async def run() -> PublishError:
        async with AsyncPublisher.from_url(url, timeout=1, **kwargs) as pub:
            transaction = pub._transaction

            async def faulty(calls: list) -> list:
                if second():
                    fault()
                return await transaction(calls)

            pub._transaction = faulty
            with pytest.raises(PublishError) as caught:
                await pub.publish_many(events, idempotency_keys=keys, in_order=True)
            return caught.value

    return asyncio.run(run())


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_an_in_order_burst_that_loses_redis_after_a_transaction_keeps_the_published_cursors(
    flavour: str,
) -> None:
    """Redis dies (a private server, killed) after the first of three transactions: the
    publisher gives up on the second within its timeout, and the error still carries the
    cursors of the 100 events published (those Redis held), ``stopped_at`` the first event of
    the failed transaction, whose events may or may not have been published. It is a
    PublishManyError and, as the same outage was before, a PublisherUnavailable. Before, a
    bare PublisherUnavailable: the caller lost the cursors of the events that were published."""
    events = [event(1 + n % 3, n + 1) for n in range(250)]
    keys = [f"lost-{n}" for n in range(250)]
    held: dict[int, list[tuple[int, int]]] = {}
    with RedisServer() as server:

        def read_then_kill() -> None:
            client = server.client()
            held.update({p: _stored(client, p) for p in (1, 2, 3)})
            client.close()
            server.kill()

        error = _in_order_with_a_fault(server.url, flavour, events, keys, read_then_kill)
    assert isinstance(error, PublishManyError) and isinstance(error, PublisherUnavailable)
    assert (error.stopped_at, error.maybe_published) == (100, range(100, 200))
    assert [c is not None for c in error.cursors] == [True] * 100 + [False] * 150
    assert error.unpublished == list(range(100, 250))
    assert list(error.errors) == [events[100].project_id]
    assert error.__cause__ is error.errors[events[100].project_id]
    assert type(error.__cause__) is PublisherUnavailable
    for project_id in (1, 2, 3):
        assert held[project_id] == [
            (error.cursors[i].seq, events[i].blocker_id)
            for i in range(100)
            if events[i].project_id == project_id
        ]
    assert "stopped at event 100 (events 100 to 199 may have been published)" in str(error)


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_an_in_order_burst_whose_later_transaction_has_an_unknown_outcome_keeps_the_cursors(
    redis_server: RedisServer, redis_client, user_url, flavour: str
) -> None:
    """After the first transaction the user may no longer run MULTI (an ACL changed): each call
    of the second runs on its own and EXEC is refused, so which ran is unknown, and without
    retry guards or keys none is sent again. The PublishManyError (not a PublisherUnavailable)
    keeps the first transaction's cursors and says that the second's events may have been
    published: here they all were. Before, a bare PublishError (without the cursors)."""
    url = user_url("~*", "&*", "+@all")
    redis_client.script_load(lua.PUBLISH)
    events = [event(1 + n % 2, n + 1) for n in range(150)]
    admin = redis_server.client()
    try:
        error = _in_order_with_a_fault(
            url,
            flavour,
            events,
            [None] * 150,
            lambda: admin.execute_command("ACL", "SETUSER", "user0", "-multi"),
            retry_guard=None,
        )
    finally:
        admin.close()
    assert type(error) is PublishManyError
    assert (error.stopped_at, error.maybe_published) == (100, range(100, 150))
    assert [c is not None for c in error.cursors] == [True] * 100 + [False] * 50
    cause = error.errors[events[100].project_id]
    assert error.__cause__ is cause and "EXEC without MULTI" in str(cause)
    for project_id in (1, 2):
        mine = [i for i in range(150) if events[i].project_id == project_id]
        stored = _stored(redis_client, project_id)
        assert stored[:50] == [(error.cursors[i].seq, events[i].blocker_id) for i in mine[:50]]
        assert [b for _, b in stored] == [events[i].blocker_id for i in mine]  # all ran, in order


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_an_in_order_burst_sent_call_by_call_that_loses_redis_keeps_the_answered_cursors(
    flavour: str,
) -> None:
    """A user that may not run MULTI: each transaction's calls run on their own, EXEC is
    refused, and the calls (all keyed) are sent again one per round trip, which returns their
    cursors. Redis dies (a private server, killed) before the call of event 150: the error
    keeps the cursors of events 0 to 149, stops at 150, and says that 150 to 199 (which the
    refused transaction had sent) may have been published: here they were. Before, a bare
    PublisherUnavailable."""
    events = [event(1 + n % 2, n + 1) for n in range(200)]
    keys = [f"cut-{n}" for n in range(200)]
    held: dict[int, list[tuple[int, int]]] = {}
    with RedisServer() as server:
        admin = server.client()
        admin.execute_command(
            "ACL", "SETUSER", "nomulti", "on", ">pw", "~*", "&*", "+@all", "-multi"
        )
        admin.close()
        url = f"redis://nomulti:pw@127.0.0.1:{server.port}/0"
        calls = 0

        def read_then_kill() -> None:
            client = server.client()
            held.update({p: _stored(client, p) for p in (1, 2)})
            client.close()
            server.kill()

        def before_a_call() -> None:
            nonlocal calls
            calls += 1
            if calls == 151:  # 100 for the first transaction, 50 for the second
                read_then_kill()

        if flavour == "sync":
            with Publisher.from_url(url, timeout=1) as pub:
                evalsha = pub._evalsha

                def counted(keys: list, args: list) -> list:
                    before_a_call()
                    return evalsha(keys, args)

                pub._evalsha = counted
                with pytest.raises(PublishManyError) as caught:
                    pub.publish_many(events, idempotency_keys=keys, in_order=True)
        else:

            async def run() -> None:
                async with AsyncPublisher.from_url(url, timeout=1) as pub:
                    evalsha = pub._evalsha

                    async def counted(keys: list, args: list) -> list:
                        before_a_call()
                        return await evalsha(keys, args)

                    pub._evalsha = counted
                    await pub.publish_many(events, idempotency_keys=keys, in_order=True)

            with pytest.raises(PublishManyError) as caught:
                asyncio.run(run())
    error = caught.value
    assert isinstance(error, PublisherUnavailable)
    assert (error.stopped_at, error.maybe_published) == (150, range(150, 200))
    assert [c is not None for c in error.cursors] == [True] * 150 + [False] * 50
    assert error.__cause__ is error.errors[events[150].project_id]
    for project_id in (1, 2):
        mine = [i for i in range(200) if events[i].project_id == project_id]
        assert [b for _, b in held[project_id]] == [events[i].blocker_id for i in mine]  # all ran
        assert held[project_id][:75] == [
            (error.cursors[i].seq, events[i].blocker_id) for i in mine[:75]
        ]


async def test_an_in_order_transaction_cut_short_by_the_timeout_leaves_no_reply_for_the_next_call(
    redis_url: str, redis_client
) -> None:
    """An asyncio publisher on a client of its own (no socket timeout: ``timeout`` cancels the
    call): Redis is paused while a transaction waits for its reply, the call ends with
    PublisherUnavailable after 1 s. The next calls of the same publisher get their own replies
    (none reads the reply of the cancelled transaction: its connection was dropped, not put
    back in the pool), and the same burst again under the same keys is exact (a regression
    guard: this held before this test)."""
    redis_client.script_load(lua.PUBLISH)
    keyed = [event(1, n) for n in range(1, 6)]
    keys = [f"cut-{n}" for n in range(1, 6)]
    async with AsyncPublisher(redis.asyncio.Redis.from_url(redis_url), timeout=1) as pub:
        assert [c.seq for c in await pub.publish_many([event(2, 1)], in_order=True)] == [1]
        redis_client.execute_command("CLIENT", "PAUSE", 1_500, "ALL")
        with pytest.raises(PublisherUnavailable, match=r"no reply within 1\.0 s"):
            await pub.publish_many(keyed, idempotency_keys=keys, in_order=True)
        redis_client.ping()  # answered once the pause is over (UNPAUSE would be paused too)
        redis_client.config_resetstat()
        others = await pub.publish_many([event(2, n) for n in range(2, 5)], in_order=True)
        assert [c.seq for c in others] == [2, 3, 4]
        stats = redis_client.info("commandstats")  # one transaction, as on a clean connection
        assert (stats["cmdstat_exec"]["calls"], stats["cmdstat_evalsha"]["calls"]) == (1, 3)
        cursors = await pub.publish_many(keyed, idempotency_keys=keys, in_order=True)
    assert _stored(redis_client, 1) == [
        (c.seq, e.blocker_id) for c, e in zip(cursors, keyed, strict=True)
    ]
    assert _stored(redis_client, 2) == [(n, n) for n in range(1, 5)]


# --- concurrency ------------------------------------------------------------------------------


def test_concurrent_threads_give_gapless_sequences(
    publisher: Publisher, redis_client, subscriber
) -> None:
    sub = subscriber(KEYS.channel(1))
    barrier = threading.Barrier(WORKERS)
    results: dict[int, list[Cursor]] = {}
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            barrier.wait(10)
            results[worker] = [
                publisher.publish(event(1, worker * 10_000 + i + 1)) for i in range(PER_WORKER)
            ]
        except BaseException as exc:  # reported below, with the failing worker
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    total = WORKERS * PER_WORKER
    seqs = sorted(c.seq for cursors in results.values() for c in cursors)
    assert seqs == list(range(1, total + 1))
    for cursors in results.values():  # each thread's own publishes are in its order
        assert [c.seq for c in cursors] == sorted(c.seq for c in cursors)
    assert_channel_matches_stream(sub.wait_for(total), redis_client, 1, total)
    # The frame with seq n is the event whose publish returned n.
    by_seq = {c.seq: w * 10_000 + i + 1 for w, cs in results.items() for i, c in enumerate(cs)}
    for seq, frame, _t in stream_entries(redis_client, 1):
        assert json.loads(frame)["blocker_id"] == by_seq[seq]


def _process_worker(url: str, worker: int, barrier: Any, out: Any) -> None:
    with Publisher.from_url(url) as pub:
        barrier.wait(30)
        seqs = [pub.publish(event(1, worker * 10_000 + i + 1)).seq for i in range(PER_WORKER)]
    out.put((worker, seqs))


def test_concurrent_processes_give_gapless_sequences(
    redis_url: str, redis_client, subscriber
) -> None:
    sub = subscriber(KEYS.channel(1))
    # spawn, not fork: this process runs threads (the subscriber), which fork must not copy.
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    out = ctx.Queue()
    processes = [
        ctx.Process(target=_process_worker, args=(redis_url, w, barrier, out))
        for w in range(WORKERS)
    ]
    for p in processes:
        p.start()
    try:
        results = dict(out.get(timeout=60) for _ in processes)
    finally:
        for p in processes:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in processes] == [0] * WORKERS
    total = WORKERS * PER_WORKER
    assert sorted(s for seqs in results.values() for s in seqs) == list(range(1, total + 1))
    for seqs in results.values():
        assert seqs == sorted(seqs)
    assert_channel_matches_stream(sub.wait_for(total), redis_client, 1, total)
    by_seq = {s: w * 10_000 + i + 1 for w, seqs in results.items() for i, s in enumerate(seqs)}
    for seq, frame, _t in stream_entries(redis_client, 1):
        assert json.loads(frame)["blocker_id"] == by_seq[seq]


def test_concurrent_publish_many_interleave_as_whole_batches(
    publisher: Publisher, redis_client, subscriber
) -> None:
    sub = subscriber(KEYS.channel(1))
    barrier = threading.Barrier(4)
    results: dict[int, list[Cursor]] = {}

    def work(worker: int) -> None:
        barrier.wait(10)
        results[worker] = publisher.publish_many(
            [event(1, worker * 10_000 + i + 1) for i in range(300)]
        )

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for cursors in results.values():  # one script call per 300 events: a contiguous block
        assert [c.seq for c in cursors] == list(range(cursors[0].seq, cursors[0].seq + 300))
    assert_channel_matches_stream(sub.wait_for(1200), redis_client, 1, 1200)


# --- retention --------------------------------------------------------------------------------


def test_retention_by_count_is_bounded(redis_url: str, redis_client) -> None:
    node_size = int(redis_client.config_get("stream-node-max-entries")["stream-node-max-entries"])
    retention = Retention(max_len=100, max_age=timedelta(0))
    with Publisher.from_url(redis_url, retention=retention) as pub:
        for i in range(1, 601):
            pub.publish(event(1, i))
        pub.publish_many(event(2, i) for i in range(1, 2001))
    for project, top in ((1, 600), (2, 2000)):
        seqs = [s for s, _f, _t in stream_entries(redis_client, project)]
        # MAXLEN ~ trims whole radix-tree nodes: at least max_len kept, at most a node more.
        assert 100 <= len(seqs) <= 100 + node_size
        assert seqs == list(range(top - len(seqs) + 1, top + 1))  # the newest, contiguous
    assert redis_client.pttl(KEYS.stream(1)) == -1


def test_retention_by_age_trims_on_the_next_publish(
    redis_url: str, redis_client, subscriber
) -> None:
    sub = subscriber(KEYS.channel(1))
    max_age_ms = 200
    retention = Retention(max_age=timedelta(milliseconds=max_age_ms))
    with Publisher.from_url(redis_url, retention=retention) as pub:
        pub.publish_many(event(1, i) for i in range(1, 11))
        assert 0 < redis_client.pttl(KEYS.stream(1)) <= max_age_ms
        # Keep the project busy (each publish renews the TTL, so the key itself never expires)
        # until a publish has trimmed the first batch. Redis's clock decides: poll, not sleep.
        deadline = time.monotonic() + 5
        while True:
            last = pub.publish(event(1, 99))
            if stream_entries(redis_client, 1)[0][0] > 10:
                break
            assert time.monotonic() < deadline, "age retention never trimmed the stream"
            time.sleep(0.02)
    entries = stream_entries(redis_client, 1)
    assert entries[-1][0] == last.seq
    # Exactly the events younger than max_age at the last publish are kept, and every older one
    # is gone (the channel saw them all, with the same Redis timestamps).
    cutoff = entries[-1][2] - max_age_ms
    published = sub.wait_for(last.seq)
    assert [(s, t) for s, _f, t in entries] == [
        (m.seq, m.published_ms) for m in published if m.published_ms >= cutoff
    ]
    assert 0 < redis_client.pttl(KEYS.stream(1)) <= max_age_ms


def test_idle_history_expires_but_the_sequence_continues(redis_url: str, redis_client) -> None:
    retention = Retention(max_age=timedelta(milliseconds=100))
    with Publisher.from_url(redis_url, retention=retention) as pub:
        first = pub.publish_many([event(1, 1), event(1, 2)])[0]
        wait_until(lambda: not redis_client.exists(KEYS.stream(1)), timeout=3)
        after = pub.publish(event(1, 3))
    # The epoch and sequence survive, so a client that saw seq 2 resumes without a resync.
    assert after == Cursor(first.epoch, 3)
    assert [s for s, _f, _t in stream_entries(redis_client, 1)] == [3]


# --- idempotency ------------------------------------------------------------------------------


def test_idempotent_retries_publish_once(publisher: Publisher, redis_client, subscriber) -> None:
    sub = subscriber(KEYS.channel(1))
    first = publisher.publish(event(1, 1), idempotency_key="req-7f3a")
    publisher.publish(event(1, 2))
    for _ in range(3):  # e.g. retries after a timeout
        assert publisher.publish(event(1, 1), idempotency_key="req-7f3a") == first
    assert [s for s, _f, _t in stream_entries(redis_client, 1)] == [1, 2]
    assert [m.seq for m in sub.wait_for(2)] == [1, 2]
    # A sentinel published afterwards is the next message: the retries published nothing.
    publisher.publish(event(1, 3))
    assert [m.seq for m in sub.wait_for(3)] == [1, 2, 3]


def test_concurrent_idempotent_retries_publish_once(publisher: Publisher, redis_client) -> None:
    barrier = threading.Barrier(WORKERS)
    cursors: list[Cursor] = []

    def work() -> None:
        barrier.wait(10)
        cursors.append(publisher.blocker_resolved(1, 1, "yes", T0, idempotency_key="once"))

    threads = [threading.Thread(target=work) for _ in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(cursors) == WORKERS and len(set(cursors)) == 1
    assert redis_client.xlen(KEYS.stream(1)) == 1


def test_idempotency_key_expires_after_the_window(redis_url: str, redis_client) -> None:
    with Publisher.from_url(redis_url, idempotency_window=timedelta(milliseconds=150)) as pub:
        first = pub.publish(event(1, 1), idempotency_key="k")
        assert pub.publish(event(1, 1), idempotency_key="k") == first
        wait_until(lambda: not redis_client.exists(KEYS.idempotency(1, "k")), timeout=3)
        assert pub.publish(event(1, 1), idempotency_key="k").seq == 2


# --- nothing reaches Redis for invalid input --------------------------------------------------


def _snapshot(client: redis.Redis) -> dict[bytes, bytes | None]:
    return {key: client.dump(key) for key in client.keys("*")}


def _script_and_write_calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {
        name: stats.get(f"cmdstat_{name}", {}).get("calls", 0)
        for name in ("eval", "evalsha", "xadd", "publish", "hincrby", "set")
    }


def test_invalid_input_never_reaches_redis(publisher: Publisher, redis_client, subscriber) -> None:
    sub = subscriber(KEYS.prefix + ":*", pattern=True)
    publisher.publish(event(1, 1))
    before = _snapshot(redis_client)
    redis_client.config_resetstat()
    bad = event(1, 2)
    bad.answer = ""
    attempts: list[Callable[[], object]] = [
        lambda: publisher.publish(bad),
        lambda: publisher.publish_many([event(1, 3), event(2, 4), bad]),
        lambda: publisher.blocker_resolved(1, 0, "x"),
        lambda: publisher.publish(event(1, 5), idempotency_key="white space"),
        lambda: publisher.publish(event(1, 5), idempotency_key="k" * 201),
    ]
    for attempt in attempts:
        with pytest.raises((EventValidationError, ValueError)):
            attempt()
    assert _script_and_write_calls(redis_client) == dict.fromkeys(
        ("eval", "evalsha", "xadd", "publish", "hincrby", "set"), 0
    )
    assert _snapshot(redis_client) == before
    publisher.publish(event(1, 6))  # sentinel: the next message after seq 1 must be seq 2
    assert [(m.seq, json.loads(m.frame)["blocker_id"]) for m in sub.wait_for(2)] == [(1, 1), (2, 6)]


def test_validation_error_names_the_field(publisher: Publisher) -> None:
    with pytest.raises(EventValidationError, match=r"`\$\.blocker_id`"):
        publisher.blocker_resolved(1, -4, "x")


# --- Redis down -------------------------------------------------------------------------------


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def _assert_unavailable_quickly(call: Callable[[], object], limit: float = 5.0) -> None:
    started = time.monotonic()
    with pytest.raises(PublisherUnavailable, match="Redis unavailable"):
        call()
    assert time.monotonic() - started < limit


def test_redis_down_raises_publisher_unavailable(own_server: RedisServer) -> None:
    with Publisher.from_url(own_server.url) as pub:
        first = pub.publish(event(1, 1))
        own_server.kill()
        _assert_unavailable_quickly(lambda: pub.publish(event(1, 2)))
        _assert_unavailable_quickly(lambda: pub.publish_many([event(1, 3), event(1, 4)]))
        _assert_unavailable_quickly(lambda: pub.blocker_expired(1, 1, 1))
        # Redis comes back empty (no persistence): publishing resumes in a new epoch.
        own_server.start()
        after = pub.publish(event(1, 5))
    assert after.seq == 1 and after.epoch != first.epoch


def test_redis_never_reachable_raises_publisher_unavailable() -> None:
    with Publisher.from_url(f"redis://127.0.0.1:{free_port()}/0") as pub:
        _assert_unavailable_quickly(lambda: pub.publish(event(1, 1)))


async def test_async_redis_down_raises_publisher_unavailable(own_server: RedisServer) -> None:
    async with AsyncPublisher.from_url(own_server.url) as pub:
        first = await pub.publish(event(1, 1))
        own_server.kill()
        for call in (
            lambda: pub.publish(event(1, 2)),
            lambda: pub.publish_many([event(1, 3)]),
        ):
            started = time.monotonic()
            with pytest.raises(PublisherUnavailable, match="Redis unavailable"):
                await call()
            assert time.monotonic() - started < 5
        own_server.start()
        after = await pub.publish(event(1, 4))
    assert after.seq == 1 and after.epoch != first.epoch


# --- AsyncPublisher parity --------------------------------------------------------------------


async def test_async_publisher_parity(redis_url: str, redis_client, subscriber) -> None:
    sub = subscriber(KEYS.channel(1))
    async with AsyncPublisher.from_url(redis_url) as pub:
        first = await pub.publish(event(1, 1))
        assert first.seq == 1
        assert await pub.publish(event(1, 2), idempotency_key="a") == Cursor(first.epoch, 2)
        assert await pub.publish(event(1, 2), idempotency_key="a") == Cursor(first.epoch, 2)
        helpers = [
            await pub.blocker_resolved(1, 3, "x"),
            await pub.agent_resumed(1, "agent-1", 4, 3),
            await pub.blocker_expired(1, 5, 6),
        ]
        assert [c.seq for c in helpers] == [3, 4, 5]
        many = await pub.publish_many([event(1 + i % 2, 100 + i) for i in range(1001)])
        assert [c.seq for c in many[:4]] == [6, 1, 7, 2]
        bad = event(1, 7)
        bad.project_id = 0
        with pytest.raises(EventValidationError, match=r"\$\.project_id"):
            await pub.publish(bad)
        with pytest.raises(EventValidationError):
            await pub.publish_many([event(1, 8), bad])
    total = 5 + 501
    assert_channel_matches_stream(sub.wait_for(total), redis_client, 1, total)


async def test_async_concurrent_tasks_give_gapless_sequences(
    redis_url: str, redis_client, subscriber
) -> None:
    sub = subscriber(KEYS.channel(1))
    async with AsyncPublisher.from_url(redis_url) as pub:

        async def work(worker: int) -> list[int]:
            return [
                (await pub.publish(event(1, worker * 10_000 + i + 1))).seq
                for i in range(PER_WORKER)
            ]

        results = await asyncio.gather(*(work(w) for w in range(WORKERS)))
    total = WORKERS * PER_WORKER
    assert sorted(s for seqs in results for s in seqs) == list(range(1, total + 1))
    assert all(seqs == sorted(seqs) for seqs in results)
    assert_channel_matches_stream(sub.wait_for(total), redis_client, 1, total)


# --- retries never duplicate ------------------------------------------------------------------


@pytest.mark.parametrize("many", [False, True])
def test_a_retry_after_a_late_reply_does_not_publish_twice(redis_url, monkeypatch, many):
    """Redis busy for longer than the socket timeout: redis-py gives up on the reply and sends
    the call again, and both reach Redis. The retry guard makes the second a no-op."""
    import threading

    import publisher.connection as connection

    monkeypatch.setattr(connection, "SOCKET_TIMEOUT", 0.5)
    pub = Publisher.from_url(redis_url)
    pub.publish(event(7, 1))  # seq 1; the script is loaded
    busy = redis.Redis.from_url(redis_url)
    busy.ping()  # connected now: the stall goes out at once (a handshake took the 0.1 s below)
    stalled = threading.Event()

    def stall_redis() -> None:  # a slow command elsewhere, a fork, a long script
        stalled.set()
        busy.eval(
            "local t = redis.call('TIME'); local s = t[1] * 1e6 + t[2]; "
            "while true do local n = redis.call('TIME'); "
            "if n[1] * 1e6 + n[2] - s > 1200000 then break end end",
            0,
        )

    thread = threading.Thread(target=stall_redis)
    thread.start()
    stalled.wait()
    time.sleep(0.1)  # let the busy script start before the publish is sent
    try:
        if many:
            cursors = pub.publish_many([event(7, 2), event(7, 3)])
        else:
            cursors = [pub.publish(event(7, 2))]
    finally:
        thread.join()
    expected = [1, 2, 3] if many else [1, 2]
    assert [c.seq for c in cursors] == expected[1:]
    assert [s for s, _f, _t in stream_entries(busy, 7)] == expected
    pub.close()
    busy.close()


# --- the hot path: connections held by the publisher (publisher.connection.DirectCommands) ------


def test_a_killed_connection_costs_nothing(publisher: Publisher, redis_client) -> None:
    """Redis closes the publisher's connection (CLIENT KILL, a proxy's idle timeout, a restart
    of a load balancer): the next publish goes through, exactly once."""
    cursors = [publisher.publish(event(3, 1)), publisher.publish(event(3, 2))]
    killed = redis_client.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    cursors += [publisher.publish(event(3, n)) for n in (3, 4)]
    assert [c.seq for c in cursors] == [1, 2, 3, 4]
    assert [s for s, _f, _t in stream_entries(redis_client, 3)] == [1, 2, 3, 4]


def _publish_in_forked_child(pub: Publisher, out) -> None:
    out.send([tuple(pub.publish(event(4, 1000 + n))) for n in range(200)])
    out.close()


def test_a_forked_child_never_shares_the_parents_connection(
    publisher: Publisher, redis_client
) -> None:
    """A publisher created before a fork (a pre-forking web server) keeps working in parent and
    child at once: a shared socket would interleave their replies."""
    first = publisher.publish(event(4, 1))  # the parent now holds a connection
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_publish_in_forked_child, args=(publisher, send))
    child.start()
    send.close()
    mine = [publisher.publish(event(4, 2 + n)) for n in range(200)]
    theirs = [Cursor(*c) for c in receive.recv()]
    child.join(30)
    assert child.exitcode == 0
    seqs = sorted(c.seq for c in [first, *mine, *theirs])
    assert seqs == list(range(1, 402))
    assert {c.epoch for c in [first, *mine, *theirs]} == {first.epoch}
    assert [s for s, _f, _t in stream_entries(redis_client, 4)] == seqs


async def test_async_a_killed_connection_costs_nothing(redis_url: str, redis_client) -> None:
    async with AsyncPublisher.from_url(redis_url) as pub:
        cursors = [await pub.publish(event(5, 1))]
        assert redis_client.client_kill_filter(_type="normal", skipme=True) >= 1
        cursors += [await pub.publish(event(5, n)) for n in (2, 3)]
    assert [c.seq for c in cursors] == [1, 2, 3]
    assert [s for s, _f, _t in stream_entries(redis_client, 5)] == [1, 2, 3]


async def test_async_a_cancelled_publish_leaves_no_reply_behind(
    redis_url: str, redis_client
) -> None:
    """A publish cancelled while waiting for its reply (a request timeout in a web app) must not
    leave that reply on a connection for the next publish to read as its own."""
    async with AsyncPublisher.from_url(redis_url) as pub:
        await pub.publish(event(6, 1))
        busy = redis.asyncio.Redis.from_url(redis_url)
        # Connected first: the script's EVAL then leaves at the task's first step, before the
        # publish below. Its connection's handshake came first, and on a Redis slow to answer
        # it took longer than 0.05 s: the publish went first, was answered at once, and was
        # never cancelled (DID NOT RAISE, with a 0.1 s handshake).
        await busy.ping()
        stall = asyncio.create_task(busy.eval(_STALL_SCRIPT % 300_000, 0))
        await asyncio.sleep(0.05)  # the busy script runs: the next reply is late
        cancelled = asyncio.create_task(pub.publish(event(6, 2)))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await stall
        await busy.aclose()
        after = await pub.publish(event(6, 3))
    entries = stream_entries(redis_client, 6)
    assert [s for s, _f, _t in entries] == [1, 2, 3]  # the cancelled call did reach Redis
    assert after.seq == 3
    assert json.loads(entries[-1][1])["blocker_id"] == 3


_STALL_SCRIPT = (
    "local t = redis.call('TIME'); local s = t[1] * 1e6 + t[2]; "
    "while true do local n = redis.call('TIME'); "
    "if n[1] * 1e6 + n[2] - s > %d then break end end"
)


async def test_async_a_burst_past_the_pools_limit_leaves_the_publisher_working(
    redis_url: str, redis_client
) -> None:
    """More concurrent publishes than the client's pool allows (redis-py's default limit is 100
    connections) right after Redis lost its scripts (a restart, SCRIPT FLUSH). Before, the held
    connections kept every connection of the pool: each call answered NOSCRIPT on one and went
    to redis-py to load the script, which had none left. Every publish, ``publish_many``,
    ``presence`` and the client's own commands raised "Too many connections" from then on, with
    Redis healthy."""
    redis_client.script_flush()
    limit = 20
    # Configured like the clients from_url builds (no retries of its own): the publisher
    # retries a call that found no free connection, within its timeout.
    client = redis.asyncio.Redis.from_url(
        redis_url,
        max_connections=limit,
        socket_connect_timeout=2,
        socket_timeout=2,
        retry=AsyncRetry(NoBackoff(), 0),
    )
    async with AsyncPublisher(client, timeout=10) as pub:
        burst = await asyncio.gather(
            *(pub.publish(event(8, n)) for n in range(1, 3 * limit + 1)), return_exceptions=True
        )
        assert [r for r in burst if isinstance(r, BaseException)] == []
        after = await pub.publish(event(8, 1000))
        many = await pub.publish_many([event(8, 1001), event(8, 1002)])
        assert await pub.presence(8) == []
        assert await client.ping()
    assert [c.seq for c in [after, *many]] == [3 * limit + 1, 3 * limit + 2, 3 * limit + 3]
    assert len(stream_entries(redis_client, 8)) == 3 * limit + 3


def test_a_blocking_pool_is_never_deadlocked_by_the_held_connections(
    redis_url: str, redis_client
) -> None:
    """A client of your own on a ``BlockingConnectionPool`` (which waits for a free connection,
    here for ever): more threads than its connections publish at once, and your own commands
    go on. Before, the publisher kept the connections its calls had used: the thread waiting for
    one, and every later command of the client, waited for ever, with Redis healthy."""
    pool = redis.BlockingConnectionPool.from_url(
        redis_url, max_connections=2, timeout=None, socket_connect_timeout=2, socket_timeout=2
    )
    client = redis.Redis(connection_pool=pool)
    pub = Publisher(client)
    threads, per_thread = 4, 50
    start = threading.Barrier(threads)
    published: list[Cursor] = []

    def publish() -> None:
        start.wait()
        published.extend(pub.publish(event(9, n)) for n in range(1, per_thread + 1))

    workers = [threading.Thread(target=publish, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 20
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    assert not any(worker.is_alive() for worker in workers), "publishing threads deadlocked"
    assert len(published) == threads * per_thread
    # The client's own commands, in a thread: one waiting for ever must not hang the suite.
    answered = threading.Event()
    threading.Thread(target=lambda: client.ping() and answered.set(), daemon=True).start()
    assert answered.wait(5), "the client's own command waited for a connection for ever"
    pub.close()
    assert sorted(s for s, _f, _t in stream_entries(redis_client, 9)) == list(
        range(1, threads * per_thread + 1)
    )
