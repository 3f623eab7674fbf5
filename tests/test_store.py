"""HistoryStore's batching of snapshot reads, without Redis."""

from __future__ import annotations

import asyncio

import pytest

from gateway.store import SNAPSHOT_PIPELINES, HistoryStore
from schemas.keys import Keys


class ReleasedTogether:
    """A client whose pipelines all answer in the same event-loop iteration."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    def register_script(self, script):
        return None

    def pipeline(self, transaction=False):
        client = self

        class Pipe:
            count = 0

            async def __aenter__(self):
                return self

            async def __aexit__(self, *exc_info):
                return False

            def execute_command(self, *args):
                self.count += 1

            async def execute(self, raise_on_error=True):
                await client.release.wait()
                return [[b"E", 5, 0, [], b""]] * self.count

        return Pipe()


async def test_a_follow_up_read_made_as_every_sender_finishes_is_still_sent():
    """Like Hub._read_history: read, then at once read again. When every sender finished in the
    same iteration, the follow-up must still find a sender (or start one)."""
    client = ReleasedTogether()
    store = HistoryStore(client, Keys())
    outcome = {}

    async def reader(project_id: int) -> None:
        await store.snapshot(project_id, "E", 0, 10)
        if project_id == 1:
            async with asyncio.timeout(2):
                outcome["follow_up"] = await store.snapshot(project_id, "E", 5, 10)

    tasks = []
    for project_id in range(1, SNAPSHOT_PIPELINES + 1):  # one sender each
        tasks.append(asyncio.create_task(reader(project_id)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    client.release.set()
    await asyncio.gather(*tasks)
    assert outcome["follow_up"].top == 5
    assert not store._senders and not store._queue


# --- against a real Redis: the SNAPSHOT script and the checks of what it returns (issue 11) ----

KEYS = Keys()


def real_store(redis_url: str) -> HistoryStore:
    from gateway.metrics import Metrics
    from gateway.store import ForeignValues
    from publisher.connection import async_client

    return HistoryStore(async_client(redis_url), KEYS, ForeignValues(Metrics()))


async def test_reading_a_project_without_history_leaves_nothing_permanent(redis_url, publisher):
    import redis

    from gateway.store import NO_HISTORY_TTL_MS
    from tests.support.gateway_client import event

    raw = redis.Redis.from_url(redis_url)
    store = real_store(redis_url)
    first = await store.snapshot(7)
    assert (first.top, first.created) == (0, True)
    ttl = raw.pttl(KEYS.meta(7))
    assert 0 < ttl <= NO_HISTORY_TTL_MS  # expires unless something is published
    again = await store.snapshot(7, first.epoch, 0, 10)
    assert (again.epoch, again.top, again.created) == (first.epoch, 0, False)
    # The first publish continues the reader's cursor: no resync, and event 1 is not missed.
    cursor = await publisher.publish(event(7))
    assert (cursor.epoch, cursor.seq) == (first.epoch, 1)
    after = await store.snapshot(7, first.epoch, 0, 10)
    assert [seq for seq, _ in after.entries] == [1]
    assert raw.pttl(KEYS.meta(7)) == -1  # a history with events is permanent
    raw.close()
    await store.client.aclose()


async def test_foreign_metadata_fails_that_project_only(redis_url, publisher):
    import redis

    from gateway.store import ProjectUnreadable
    from tests.support.gateway_client import event

    raw = redis.Redis.from_url(redis_url)
    for project_id in range(1, 7):
        await publisher.publish(event(project_id))
    raw.hset(KEYS.meta(2), "seq", "abc")
    raw.hset(KEYS.meta(3), "epoch", b"\xff\xfe")
    raw.delete(KEYS.meta(4))
    raw.set(KEYS.meta(4), "a string")
    raw.delete(KEYS.stream(5))
    raw.set(KEYS.stream(5), "a string")
    store = real_store(redis_url)
    epoch = (await store.snapshot(1)).epoch
    epoch5 = raw.hget(KEYS.meta(5), "epoch").decode()
    # All in flight together: they share pipelines, and one error must not fail the others.
    results = await asyncio.gather(
        *(store.snapshot(p, epoch5 if p == 5 else epoch, 0, 10) for p in range(1, 7)),
        return_exceptions=True,
    )
    assert [s.top for s in (results[0], results[5])] == [1, 1]
    problems = {
        p: r.problem
        for p, r in zip(range(1, 7), results, strict=True)
        if isinstance(r, ProjectUnreadable)
    }
    assert problems == {
        2: "has an invalid seq",
        3: "has an invalid epoch",
        4: "is not a hash",
        5: "is not a stream",
    }
    cursors = await store.cursors([1, 2, 3, 4, 6, 99])
    assert cursors[0].seq == 1 and cursors[4].seq == 1 and cursors[5] is None
    assert [type(c).__name__ for c in cursors[1:4]] == ["ProjectUnreadable"] * 3
    assert store.foreign.metrics.foreign_values["meta"] == 6
    raw.close()
    await store.client.aclose()


async def test_foreign_stream_entries_are_left_out_and_the_first_corrupt_one_reported(
    redis_url, publisher
):
    import redis

    from tests.support.gateway_client import event

    raw = redis.Redis.from_url(redis_url)
    for n in range(2):
        await publisher.publish(event(9, n + 1))
    stream, meta = KEYS.stream(9), KEYS.meta(9)
    raw.xadd(stream, {"f": b'{"type":"x","seq":2}', "extra": "y"}, id="2-1")  # foreign id
    raw.xadd(stream, {"x": "y"}, id="3-0")  # no field f
    raw.xadd(stream, {"f": b'{"bad":"\xff"}'}, id="4-0")  # not UTF-8
    raw.hset(meta, "seq", 4)
    store = real_store(redis_url)
    epoch = raw.hget(meta, "epoch").decode()
    snapshot = await store.snapshot(9, epoch, 0, 10)
    assert [seq for seq, _ in snapshot.entries] == [1, 2]
    assert (snapshot.top, snapshot.corrupt_at, snapshot.scanned) == (4, 3, 5)
    assert store.foreign.metrics.foreign_values["stream_entry"] == 3
    raw.close()
    await store.client.aclose()


async def test_the_periodic_check_keeps_a_followed_empty_history_alive(redis_url, publisher):
    import redis

    from gateway.store import NO_HISTORY_TTL_MS
    from tests.support.gateway_client import event

    raw = redis.Redis.from_url(redis_url)
    store = real_store(redis_url)
    await store.snapshot(11)  # followed, nothing published: expires...
    await publisher.publish(event(12))  # ...and a permanent one
    raw.pexpire(KEYS.meta(11), 60_000)  # as if the last read was long ago
    cursors = await store.cursors([11, 12, 13], keep_alive=[11, 12, 13])
    assert [c.seq if c else None for c in cursors] == [0, 1, None]
    assert raw.pttl(KEYS.meta(11)) > NO_HISTORY_TTL_MS - 60_000  # renewed
    assert raw.pttl(KEYS.meta(12)) == -1  # never given a lifetime
    assert not raw.exists(KEYS.meta(13))  # never created
    # Published to after a read created it: made permanent by the check of a pod following it.
    await publisher.publish(event(11))
    await store.cursors([11], make_permanent=[11])
    assert raw.pttl(KEYS.meta(11)) == -1
    raw.close()
    await store.client.aclose()


async def test_a_read_with_a_byte_budget_stops_before_it_but_always_returns_an_entry(
    redis_url, publisher
):
    """A read given ``max_bytes`` (a poll's page) ends before the entry that would take the
    entries it returns past that many bytes, but always holds at least one, so that paging
    progresses whatever an entry's size; the count ``limit`` still applies. Without a budget
    (subscribes, feeds) only the count limits a read."""
    import redis

    from schemas.events import BlockerResolved, utc_now

    events = [
        BlockerResolved(project_id=13, blocker_id=n, answer="x" * (30 * n), resolved_at=utc_now())
        for n in range(1, 151)
    ]
    await publisher.publish_many(events)
    raw = redis.Redis.from_url(redis_url)
    epoch = raw.hget(KEYS.meta(13), "epoch").decode()
    # What an entry weighs: every field name and value of it, as XRANGE returns it.
    sizes = [
        sum(map(len, [*fields, *fields.values()])) for _, fields in raw.xrange(KEYS.stream(13))
    ]
    store = real_store(redis_url)

    async def seqs(after: int, limit: int, max_bytes: int) -> list[int]:
        snapshot = await store.snapshot(13, epoch, after, limit, max_bytes=max_bytes)
        assert snapshot.top == 150
        return [seq for seq, _ in snapshot.entries]

    assert await seqs(0, 1000, 1) == [1]  # larger than the budget: still one
    assert await seqs(149, 1000, 1) == [150]
    assert await seqs(0, 1000, sum(sizes[:3])) == [1, 2, 3]
    assert await seqs(0, 1000, sum(sizes[:3]) - 1) == [1, 2]
    assert await seqs(100, 1000, sizes[100] + sizes[101]) == [101, 102]
    assert await seqs(0, 1000, sum(sizes[:100])) == list(range(1, 101))
    assert await seqs(0, 1000, sum(sizes)) == list(range(1, 151))
    assert await seqs(0, 70, sum(sizes)) == list(range(1, 71))  # the count still applies
    assert await seqs(0, 1000, 0) == list(range(1, 151))  # no budget
    raw.close()
    await store.client.aclose()


@pytest.mark.parametrize("budget", [0, 1 << 20], ids=["replay", "page"])
async def test_a_huge_foreign_entry_is_never_read_whole(redis_url, publisher, budget):
    """A 20 MiB value left in a stream (by hand, by another application) was sent to the
    gateway whole by every replay or page that reached it, only to be found foreign there: a
    few resumes could take the pod's memory. The history script now sends its weight instead:
    the entry is still reported where it is (the first corrupt one), and the read moves a few
    bytes."""
    import redis

    from tests.support.gateway_client import event

    raw = redis.Redis.from_url(redis_url)
    await publisher.publish(event(14, 1))
    raw.xadd(KEYS.stream(14), {"f": b"{" + b"a" * (20 << 20) + b"}", "t": "0"}, id="2-0")
    raw.hset(KEYS.meta(14), "seq", 2)
    await publisher.publish(event(14, 3))
    epoch = raw.hget(KEYS.meta(14), "epoch").decode()
    store = real_store(redis_url)
    sent_before = raw.info("stats")["total_net_output_bytes"]
    snapshot = await store.snapshot(14, epoch, 1, 10, max_bytes=budget)  # the entry first
    sent = raw.info("stats")["total_net_output_bytes"] - sent_before
    assert snapshot.entries == []
    assert (snapshot.top, snapshot.corrupt_at) == (3, 2)
    assert sent < 64 * 1024, f"{sent} bytes sent for a read"
    assert store.foreign.metrics.foreign_values["stream_entry"] == 1
    raw.close()
    await store.client.aclose()


# --- a hung Redis: one call of the gateway's client is bounded by its own timeouts -------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("call", ["snapshot", "cursors", "ping"])
async def test_a_store_call_on_a_hung_redis_ends_after_one_read_timeout(monkeypatch, call):
    """A Redis that accepts connections and never answers: a history read, a reconcile pass
    and the readiness check each give up after one read timeout, without an outer
    ``asyncio.timeout`` (the gateway's timeouts scaled down tenfold: connect 0.2 s, read 0.5 s,
    call 1 s). redis-py retried the connect inside each of its retries, and the health check
    inside each connect: 16 connections and 16 read timeouts, 84 s with the real timeouts."""
    import time

    import gateway.server
    import redisconn
    from gateway.metrics import Metrics
    from gateway.store import ForeignValues, StoreUnavailable
    from tests.support.tcp_proxy import FreezableProxy

    monkeypatch.setattr(redisconn, "CONNECT_TIMEOUT", 0.2)
    monkeypatch.setattr(redisconn, "SOCKET_TIMEOUT", 0.5)
    monkeypatch.setattr(gateway.server, "REDIS_CALL_TIMEOUT", 1.0)
    hung = FreezableProxy("127.0.0.1", 9)  # frozen: accepts, forwards nothing
    hung.freeze()
    client = gateway.server.redis_client(f"redis://127.0.0.1:{hung.port}/0")
    store = HistoryStore(client, KEYS, ForeignValues(Metrics()))
    started = time.monotonic()
    try:
        if call == "ping":
            assert await store.ping() is False
        else:
            with pytest.raises(StoreUnavailable):
                if call == "snapshot":
                    await store.snapshot(1)
                else:
                    await store.cursors([1, 2])
        elapsed = time.monotonic() - started
    finally:
        await client.aclose()
        hung.close()
    # One attempt: a second could not end within the call's bound, so none is made.
    assert hung.accepted == 1
    assert elapsed < gateway.server.REDIS_CALL_TIMEOUT + 0.5  # the bound, plus loop latency


async def test_a_read_names_the_tags_of_the_events_at_the_top_and_at_the_cursor(
    redis_url, publisher
):
    """The SNAPSHOT script computes the tags with ``redis.sha1hex``: the same as
    ``schemas.tags.event_tag`` over the stored frame, which is what a client receives."""
    import redis

    from schemas.tags import event_tag
    from tests.support.gateway_client import event

    raw = redis.Redis.from_url(redis_url)
    for n in range(4):
        await publisher.publish(event(8, n + 1))
    frames = {int(i.split(b"-")[0]): f[b"f"] for i, f in raw.xrange(KEYS.stream(8))}
    store = real_store(redis_url)
    fresh = await store.snapshot(8)
    assert (fresh.top, fresh.top_tag, fresh.after_tag) == (4, event_tag(frames[4]), None)
    resume = await store.snapshot(8, fresh.epoch, 2, 10)
    assert (resume.top_tag, resume.after_tag) == (event_tag(frames[4]), event_tag(frames[2]))
    assert (await store.snapshot(8, fresh.epoch, 4, 10)).after_tag == event_tag(frames[4])
    assert (await store.snapshot(8, "another", 2, 10)).after_tag is None  # not this history
    raw.xdel(KEYS.stream(8), "2-0")  # trimmed: nothing to compare
    assert (await store.snapshot(8, fresh.epoch, 2, 10)).after_tag is None
    empty = await store.snapshot(9)
    assert (empty.top, empty.top_tag) == (0, None)
    raw.close()
    await store.client.aclose()


async def test_foreign_stream_entries_are_counted_and_placed_as_before_the_move(
    redis_url, publisher
):
    """The gateway's read, since its reply is parsed by schemas.history: every foreign entry is
    counted (``eventbus_foreign_values_total{kind="stream_entry"}``), one written beyond the top
    too, none is delivered, and the first at or below the top is ``corrupt_at``."""
    import redis

    from tests.support.gateway_client import event

    raw = redis.Redis.from_url(redis_url)
    for _ in range(2):
        cursor = await publisher.publish(event(8))
    frame = raw.xrange(KEYS.stream(8), "2-0", "2-0")[0][1][b"f"]
    raw.xadd(KEYS.stream(8), {"f": "garbage"}, id="3-0")
    raw.xadd(KEYS.stream(8), {"f": frame.replace(b'"seq":2}', b'"seq":4}')}, id="4-0")
    store = real_store(redis_url)
    counted = store.foreign.metrics.foreign_values
    beyond = await store.snapshot(8, cursor.epoch, 0, 10)
    assert ([s for s, _ in beyond.entries], beyond.top, beyond.corrupt_at) == ([1, 2], 2, None)
    assert counted["stream_entry"] == 2  # the garbage, and the event beyond the top
    raw.hset(KEYS.meta(8), "seq", 4)  # now both are below the top
    below = await store.snapshot(8, cursor.epoch, 0, 10)
    assert ([s for s, _ in below.entries], below.corrupt_at) == ([1, 2], 3)
    assert counted["stream_entry"] == 3
    raw.close()
    await store.client.aclose()
