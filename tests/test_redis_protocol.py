"""A server that speaks broken or hostile RESP: a buggy Redis-compatible server or proxy, a MITM.

tests/test_redis_garbage.py puts garbage VALUES in a real Redis, tests/test_redisconn.py hangs
one; here the replies themselves misbehave. Each component talks to a fake server
(:mod:`tests.support.fake_resp`) in front of the session's private Redis, which rewrites or
replaces replies; the promise is an error the component documents (``PublisherUnavailable``,
``PublishError``, ``StoreUnavailable``, an ``unavailable`` frame), within its timeouts, never a
bare ``TypeError`` or a hang, and every event exactly once once the real Redis answers again.

Some tests here passed before any change, and stay as the record of what holds: an error reply
(``-ERR``, ``-OOM``, ``-BUSY``, ``-NOSCRIPT``, ``-READONLY``, ``-MOVED``, ``-LOADING``) to
everything, a publish reply cut half-way (retried, published once), a trickled huge reply to the
asyncio clients (their calls are bounded as a whole) and to the pub/sub link (its probe). Also
fine, not tested here: a RESP3 push frame before a publish's reply (redis-py reads past it), a
``message`` on a channel the pod does not follow (the hub drops it). Not defensible at this
level: a MITM that swaps two well-formed replies, or forges a whole one (use ``rediss://``).

The tests of a trickled reply, and of a Redis that stops reading, run over TCP and over a Unix
socket (``any_fake``): the clients build a different connection for each, and ``unix://`` had
holes of its own (a sync reply bounded per ``recv`` only; a pub/sub link that never connected).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import os
import resource
import socket
import threading
import time

import pytest
import redis.asyncio
import redis.exceptions

from gateway.store import HistoryStore, StoreUnavailable
from publisher import AsyncPublisher, Publisher
from publisher.__main__ import main as publisher_main
from publisher.core import PublishError, PublisherUnavailable
from redisconn import async_client
from schemas import lua
from schemas.events import BlockerResolved, utc_now
from schemas.keys import Keys
from schemas.tags import event_tag
from tests.support.fake_resp import PROXY, FakeResp, Rewrite, proxy, trickle

PREFIX = "protocoltest"
KEYS = Keys(PREFIX)
SCRIPTS = (b"EVALSHA", b"EVAL")
NOW = utc_now()


@pytest.fixture
def fake(redis_url, redis_server):
    with FakeResp(("127.0.0.1", redis_server.port)) as server:
        yield server


@pytest.fixture(params=["tcp", "unix"])
def any_fake(request, redis_url, redis_server):
    """The fake server on TCP (a ``redis://`` URL), then on a Unix socket (``unix://``): the
    clients build different connections for each."""
    with FakeResp(("127.0.0.1", redis_server.port), unix=request.param == "unix") as server:
        yield server


def answering_scripts(reply) -> object:
    """An ``answer`` that replaces the reply of every script call (and passes the rest)."""

    def answer(command: list[bytes]) -> object:
        return reply if command[0].upper() in SCRIPTS else PROXY

    return answer


def history(redis_server, project_id: int) -> list[int]:
    client = redis_server.client()
    try:
        entries = client.xrange(KEYS.stream(project_id))
    finally:
        client.close()
    return [int(entry_id.split(b"-")[0]) for entry_id, _ in entries]


def in_thread(call, bound: float):
    """``call()`` in a daemon thread, waited for at most ``bound`` seconds: a hang fails the
    test instead of holding the suite (closing the fake server then ends the call)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(call())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    try:
        return future.result(bound)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"still running after {bound} s")


def within_timeout(call, timeout: float):
    """``call()``, which must return or raise within about ``timeout`` seconds (1 s of slack
    for a loaded machine), run as :func:`in_thread` does so that a hang fails the test."""
    started = time.monotonic()
    try:
        return in_thread(call, timeout + 15)
    finally:
        elapsed = time.monotonic() - started
        assert elapsed < timeout + 1, f"took {elapsed:.1f} s, timeout {timeout} s"


# --- the publisher -------------------------------------------------------------------------------

#: Replies announcing a huge length, then trickled a byte at a time, each byte well within the
#: read timeout: redis-py's sync client applied its timeout to each recv, so the call never ended.
HUGE_TRICKLES = {
    "bulk": b"$2147483647\r\n" + b"x" * 10_000,
    "array": b"*1000000000\r\n" + b":1\r\n" * 10_000,
}


@pytest.mark.parametrize("announced", HUGE_TRICKLES.values(), ids=HUGE_TRICKLES.keys())
def test_sync_publish_gives_up_within_its_timeout_on_a_trickled_reply(
    any_fake, redis_server, announced
):
    """On TCP and on a Unix socket alike: before, a ``unix://`` publisher read each byte within
    its read timeout and waited for the whole announced reply (for ever, in practice)."""
    fake = any_fake
    fake.answer = answering_scripts(trickle(announced, 0.1))
    publisher = Publisher.from_url(fake.url, prefix=PREFIX, timeout=2)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with pytest.raises(PublisherUnavailable):
            within_timeout(lambda: publisher.blocker_resolved(1, blocker_id=1, answer="a"), 2)
        # Only what was received is held, never the announced length.
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100_000  # KiB
        fake.answer = proxy  # the real Redis answers again
        cursor = publisher.blocker_resolved(1, blocker_id=2, answer="b")
    finally:
        publisher.close()
    # The trickled call never reached Redis (the fake answered it): exactly the second event.
    assert history(redis_server, 1) == [cursor.seq] == [1]


def test_sync_publish_many_presence_and_the_cli_give_up_on_a_trickled_reply(any_fake):
    fake = any_fake
    fake.answer = answering_scripts(trickle(HUGE_TRICKLES["bulk"], 0.1))
    publisher = Publisher.from_url(fake.url, prefix=PREFIX, timeout=2)
    try:
        with pytest.raises(PublisherUnavailable):
            within_timeout(
                lambda: publisher.publish_many(
                    [
                        BlockerResolved(project_id=1, blocker_id=i, answer="a", resolved_at=NOW)
                        for i in (1, 2)
                    ]
                ),
                2,
            )
        with pytest.raises(PublisherUnavailable):
            within_timeout(lambda: publisher.presence(1), 2)
    finally:
        publisher.close()
    # The CLI's timeout is the publisher's default, 10 s (its presence is publisher.presence).
    stderr = io.StringIO()
    argv = ["--redis-url", fake.url, "--prefix", PREFIX, "history", "1"]
    code = within_timeout(lambda: publisher_main(argv, stdout=io.StringIO(), stderr=stderr), 10)
    assert code == 3 and "Redis unavailable" in stderr.getvalue()


async def test_async_publish_gives_up_within_its_timeout_on_a_trickled_reply(any_fake):
    fake = any_fake
    fake.answer = answering_scripts(trickle(HUGE_TRICKLES["bulk"], 0.1))
    async with AsyncPublisher.from_url(fake.url, prefix=PREFIX, timeout=2) as publisher:
        for call in (
            lambda: publisher.blocker_resolved(1, blocker_id=1, answer="a"),
            lambda: publisher.presence(1),
        ):
            started = time.monotonic()
            async with asyncio.timeout(15):
                with pytest.raises(PublisherUnavailable):
                    await call()
            assert time.monotonic() - started < 3
        fake.answer = proxy
        assert (await publisher.blocker_resolved(1, blocker_id=2, answer="b")).seq == 1


#: Replies of the wrong shape where a script's array is expected.
WRONG_SHAPES = {
    "integer": b":7\r\n",
    "bulk": b"$3\r\nabc\r\n",
    "flat array": b"*3\r\n:1\r\n:2\r\n:3\r\n",
    "nested wrong": b"*5\r\n*1\r\n:1\r\n:0\r\n$1\r\nx\r\n:9\r\n*0\r\n",
    "null": b"*-1\r\n",
}


@pytest.mark.parametrize("reply", WRONG_SHAPES.values(), ids=WRONG_SHAPES.keys())
def test_publisher_presence_and_cli_refuse_a_reply_of_the_wrong_shape(fake, reply):
    fake.answer = answering_scripts(reply)
    publisher = Publisher.from_url(fake.url, prefix=PREFIX, timeout=2)
    try:
        with pytest.raises(PublishError) as raised:
            publisher.presence(1)
        assert not isinstance(raised.value, PublisherUnavailable)
        with pytest.raises(PublishError):
            publisher.blocker_resolved(1, blocker_id=1, answer="a")
    finally:
        publisher.close()
    for command in (["history", "1"], ["presence", "1"]):
        stderr = io.StringIO()
        argv = ["--redis-url", fake.url, "--prefix", PREFIX, *command]
        assert publisher_main(argv, stdout=io.StringIO(), stderr=stderr) == 1, stderr.getvalue()
        assert "unexpected reply" in stderr.getvalue()


@pytest.mark.parametrize("reply", WRONG_SHAPES.values(), ids=WRONG_SHAPES.keys())
async def test_async_publisher_presence_refuses_a_reply_of_the_wrong_shape(fake, reply):
    fake.answer = answering_scripts(reply)
    async with AsyncPublisher.from_url(fake.url, prefix=PREFIX, timeout=2) as publisher:
        with pytest.raises(PublishError):
            await publisher.presence(1)


# --- the gateway's history reads -----------------------------------------------------------------

SNAPSHOT_SHAPES = {
    **WRONG_SHAPES,
    "entries not an array": b"*5\r\n$1\r\ne\r\n:3\r\n:0\r\n:5\r\n$0\r\n\r\n",
    "problem an integer": b"*5\r\n$0\r\n\r\n:0\r\n:0\r\n*0\r\n:7\r\n",
    "problem an array": b"*5\r\n$0\r\n\r\n:0\r\n:0\r\n*0\r\n*1\r\n:1\r\n",
    # No epoch: the script creates the history when there is none, so it always answers one.
    "epoch nil": b"*5\r\n$-1\r\n:0\r\n:0\r\n*0\r\n$0\r\n\r\n",
}


@pytest.mark.parametrize("reply", SNAPSHOT_SHAPES.values(), ids=SNAPSHOT_SHAPES.keys())
async def test_history_read_of_the_wrong_shape_is_store_unavailable(fake, reply):
    fake.answer = answering_scripts(reply)
    client = async_client(fake.url, call_timeout=5)
    try:
        store = HistoryStore(client, KEYS)
        with pytest.raises(StoreUnavailable):
            await store.snapshot(1, None, 0, 10)
        fake.answer = proxy
        snapshot = await store.snapshot(1, None, 0, 10)
        assert snapshot.top == 0 and snapshot.entries == []
    finally:
        await client.aclose()


CURSOR_ROWS = {
    "integer": b":7\r\n",
    "short array": b"*1\r\n$1\r\nx\r\n",
    "long array": b"*3\r\n$-1\r\n$-1\r\n$-1\r\n",
}


@pytest.mark.parametrize("row", CURSOR_ROWS.values(), ids=CURSOR_ROWS.keys())
async def test_cursor_reads_of_the_wrong_shape_are_store_unavailable(fake, row):
    fake.answer = lambda command: row if command[0].upper() == b"HMGET" else PROXY
    client = async_client(fake.url, call_timeout=5)
    try:
        store = HistoryStore(client, KEYS)
        with pytest.raises(StoreUnavailable):
            await store.cursors([1, 2])
        fake.answer = proxy
        assert await store.cursors([1, 2]) == [None, None]
    finally:
        await client.aclose()


def test_an_error_reply_to_everything_is_a_redis_error(fake):
    """-ERR, -OOM, -BUSY, -NOSCRIPT, -READONLY, -MOVED, -LOADING to every command: the
    publisher raises its own errors, and publishes again once Redis answers."""
    for error in (b"ERR x", b"OOM x", b"BUSY x", b"NOSCRIPT x", b"READONLY x", b"MOVED 1 h:1"):
        fake.answer = answering_scripts(b"-" + error + b"\r\n")
        with Publisher.from_url(fake.url, prefix=PREFIX, timeout=2) as publisher:
            with pytest.raises(PublishError):
                publisher.blocker_resolved(1, blocker_id=1, answer="a")
    fake.answer = answering_scripts(b"-LOADING Redis is loading\r\n")
    with Publisher.from_url(fake.url, prefix=PREFIX, timeout=2) as publisher:
        with pytest.raises(PublisherUnavailable):
            publisher.blocker_resolved(1, blocker_id=1, answer="a")
        fake.answer = proxy
        assert publisher.blocker_resolved(1, blocker_id=2, answer="b").seq == 1


# --- presence in the gateway ----------------------------------------------------------------------


@pytest.mark.parametrize("reply", WRONG_SHAPES.values(), ids=WRONG_SHAPES.keys())
async def test_presence_read_of_the_wrong_shape_is_a_redis_error(fake, reply):
    """What ``presence_get`` and a presence subscribe answer with ``unavailable`` (they catch
    ``RedisError``); before, a TypeError escaped them."""
    from gateway.presence_store import PresenceStore

    fake.answer = answering_scripts(reply)
    client = async_client(fake.url, call_timeout=5)
    try:
        store = PresenceStore(client, "pod", keys=KEYS)
        with pytest.raises(redis.exceptions.RedisError):
            await store.read(1)
        fake.answer = proxy
        assert await store.read(1) == {}
    finally:
        await client.aclose()


async def test_a_trickled_frame_on_presences_own_pubsub_connection_is_ended_by_a_probe(any_fake):
    """A PresenceService without the gateway's link listens on a pub/sub connection of its
    own: a frame trickled there, each byte in time, reconnects it within two refresh
    intervals (its ping gets no pong), and the pod reads its views again. Before, each read
    timed out quietly (``get_message(timeout=0.2)``) inside the frame for ever: no
    announcement of another pod reached this one, and nothing was said."""
    from structlog.testing import capture_logs

    from gateway.presence_store import PresenceService

    fake = any_fake
    loop = asyncio.get_running_loop()
    subscribes = 0
    resubscribed = asyncio.Event()

    def answer(command: list[bytes]) -> object:  # (in the fake server's thread)
        nonlocal subscribes
        if command[0].upper() != b"SUBSCRIBE":
            return PROXY
        subscribes += 1
        if subscribes > 1:
            loop.call_soon_threadsafe(resubscribed.set)
            return PROXY
        confirm = b"*3\r\n" + _bulk(b"subscribe") + _bulk(command[1]) + b":1\r\n"
        return trickle(confirm + HUGE_TRICKLES["bulk"], 0.01)

    fake.answer = answer
    client = redis.asyncio.Redis.from_url(fake.url, socket_timeout=2, socket_connect_timeout=2)
    service = PresenceService(
        client, lambda sessions, frame: None, pod_id="a", keys=KEYS, ttl=0.8,
        refresh_interval=0.25, flush_interval=0.02, diff_interval=0.2,
    )  # fmt: skip
    with capture_logs() as logs:
        await service.start()
        try:
            async with asyncio.timeout(5):
                await service.subscribe("tab", 1)
            started = time.monotonic()
            async with asyncio.timeout(10):
                await resubscribed.wait()
            # Trickling the confirmation takes 0.4 s; then two intervals and a reconnect.
            assert time.monotonic() - started < 2
            # The real Redis answers each ping: no reconnect in the next four intervals (a
            # window: what must not happen has no event to wait for).
            await asyncio.sleep(1.0)
            assert subscribes == 2
        finally:
            await service.stop()
            await client.aclose()
    assert [e["event"] for e in logs].count("presence: pub/sub down") == 1


def _sockets_to(fake: FakeResp) -> int:
    """How many of this process's sockets are connected to ``fake`` (the clients' ends; the
    fake's own ends have the clients' addresses as peers)."""
    peer = fake.url.removeprefix("unix://") if fake.port is None else ("127.0.0.1", fake.port)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:["):
                continue
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue  # (closed meanwhile)
        with sock, contextlib.suppress(OSError):
            count += sock.getpeername() == peer
    return count


def _stop_reading_after_the_handshake(fake: FakeResp, handshakes: int) -> asyncio.Event:
    """Answer every connection's handshake, then read nothing more from it (a Redis that hung
    with its sockets open); the event is set at the ``handshakes``-th connection."""
    loop = asyncio.get_running_loop()
    reached = asyncio.Event()
    seen = 0

    def answer(command: list[bytes]) -> object:  # (in the fake server's thread)
        nonlocal seen
        if command[:3] != [b"CLIENT", b"SETINFO", b"LIB-VER"]:
            return b"+OK\r\n"
        seen += 1
        if seen == handshakes:
            loop.call_soon_threadsafe(reached.set)

        async def stop_reading(reader, writer) -> None:
            writer.write(b"+OK\r\n")
            await asyncio.Event().wait()  # (until the fake server closes)

        return stop_reading

    fake.answer = answer
    return reached


async def test_presences_own_pubsub_leaves_no_socket_open_per_reconnect_to_a_hung_redis(any_fake):
    """A PresenceService without a link, watching more projects than the sockets' buffers hold
    the SUBSCRIBE of, and a Redis that stopped reading: every connection is given up within a
    refresh interval, and its socket is closed then, not left open with its unsent bytes (an
    asyncio transport stays open until they are sent, and a hung Redis never takes them). Before,
    each reconnect left one more socket open: a pod with a hung Redis for an hour ran out of
    descriptors. Stopping the service closes the last one too."""
    from gateway.presence_store import PresenceService

    fake = any_fake
    reconnected = _stop_reading_after_the_handshake(fake, handshakes=4)
    client = redis.asyncio.Redis.from_url(
        fake.url, protocol=2, socket_timeout=2, socket_connect_timeout=2
    )
    service = PresenceService(
        client, lambda sessions, frame: None, pod_id="a", keys=KEYS, ttl=0.8,
        refresh_interval=0.25, flush_interval=0.02, diff_interval=0.2,
    )  # fmt: skip
    # 6 MB of SUBSCRIBE: more than a loopback TCP or a Unix socket buffers.
    service._channels.update(KEYS.presence_channel(project) for project in range(200_000))
    listener = asyncio.create_task(service._listen_loop())
    try:
        async with asyncio.timeout(20):
            await reconnected.wait()
        assert _sockets_to(fake) <= 1  # the current connection's, at most
    finally:
        await service.stop()
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await client.aclose()
    assert _sockets_to(fake) == 0


# --- the outbox relay's batched publishing --------------------------------------------------------


def test_a_transaction_reply_of_the_wrong_shape_keeps_the_relay_batching(fake, redis_server):
    """One EXEC answered with something no Redis sends fails that round (which calls ran is
    unknown: every call is keyed, so the publisher sends them one by one, which the server answers
    wrongly too here, and gives up with PublisherUnavailable within its 2 s), and the next round
    is one MULTI/EXEC again; before, the relay took it for a change of the publisher's internals
    and published one row per round trip for the rest of its life. Every row is published exactly
    once in the end."""
    from publisher.outbox.publishing import KeyedPublisher

    loader = redis_server.client()
    loader.script_load(lua.PUBLISH)  # (as a relay that ran before finds it)
    loader.close()
    inside = {b"MULTI": b"+OK\r\n", b"EVALSHA": b"+QUEUED\r\n", b"EXEC": b":7\r\n"}
    fake.answer = lambda command: inside.get(command[0].upper(), PROXY)
    rows = [
        (BlockerResolved(project_id=1, blocker_id=i, answer="a", resolved_at=NOW), f"row-{i}")
        for i in (1, 2, 3)
    ]
    with Publisher.from_url(fake.url, prefix=PREFIX, timeout=2) as publisher:
        keyed = KeyedPublisher(publisher)
        cursors, error = keyed.publish(rows)
        assert cursors == [] and isinstance(error, PublisherUnavailable)
        fake.answer = proxy
        sent = len(fake.commands)
        published, error = keyed.publish(rows)
    assert error is None and [cursor.seq for cursor, _tag in published] == [1, 2, 3]
    names = fake.names()[sent:]  # one round trip: MULTI, the three calls, EXEC
    assert names.count(b"MULTI") == 1 and names[names.index(b"EXEC") + 1 :] == []
    assert history(redis_server, 1) == [1, 2, 3]


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_proxy_that_spoils_every_exec_reply_still_gets_each_row_published_once(
    fake, redis_server, flavour
):
    """A proxy that passes the transaction on but spoils every EXEC reply: the calls ran, and
    which of them is unknown to the publisher. They are sent again one by one under their keys,
    which returns their first cursors: every row published once, its cursor exact, the burst
    done. Before, the publisher sent the transaction again and again (Redis ran it each time)
    until PublisherUnavailable: a relay behind such a proxy never marked a row, and published
    each anew once its key expired; the relay before publish_many(in_order=True) published
    them one by one."""
    from publisher.outbox.publishing import KeyedPublisher

    loader = redis_server.client()
    loader.script_load(lua.PUBLISH)
    loader.close()
    spoilt = Rewrite(lambda reply: b":7\r\n")
    fake.answer = lambda command: spoilt if command[0].upper() == b"EXEC" else PROXY
    rows = [
        (BlockerResolved(project_id=1 + i % 2, blocker_id=i, answer="a", resolved_at=NOW), f"r{i}")
        for i in range(1, 6)
    ]
    if flavour == "sync":
        with Publisher.from_url(fake.url, prefix=PREFIX, timeout=2) as publisher:
            published, error = KeyedPublisher(publisher).publish(rows)
            cursors = [cursor for cursor, _tag in published]  # (each with its stored frame's tag)
    else:

        async def publish() -> list:
            async with AsyncPublisher.from_url(fake.url, prefix=PREFIX, timeout=2) as publisher:
                return await publisher.publish_many(
                    [event for event, _ in rows],
                    idempotency_keys=[key for _, key in rows],
                    in_order=True,
                )

        cursors, error = asyncio.run(publish()), None
    assert error is None
    assert [(c.seq, event.project_id) for c, (event, _) in zip(cursors, rows, strict=True)] == [
        (1, 2),
        (1, 1),
        (2, 2),
        (2, 1),
        (3, 2),
    ]
    assert history(redis_server, 1) == [1, 2] and history(redis_server, 2) == [1, 2, 3]
    assert fake.names().count(b"EXEC") == 1


def _lose_the_reply(reply: bytes) -> bytes:
    raise ConnectionResetError("the reply is lost with the connection (Redis ran the EXEC)")


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_an_in_order_transaction_whose_reply_is_lost_is_sent_again_and_returns_first_cursors(
    fake, redis_server, flavour
):
    """The first EXEC runs in Redis and its connection drops before the reply: the publisher
    sends that transaction again under the same keys and retry guards, and gets the first
    cursors of its calls. Every event published once, in order, its cursor exact (a regression
    guard for publish_many(in_order=True): it held before this test). Each cursor also carries
    the tag of the frame Redis stored (what the outbox relay records): the retry's calls are
    answered from the records the first run wrote, of these very bytes (the publish script
    compares them); before, those cursors carried no tag."""
    loader = redis_server.client()
    loader.script_load(lua.PUBLISH)
    loader.close()
    lost: list[bytes] = []

    def answer(command: list[bytes]) -> object:
        if command[0].upper() == b"EXEC" and not lost:
            lost.append(command[0])
            return Rewrite(_lose_the_reply)
        return PROXY

    fake.answer = answer
    events = [
        BlockerResolved(project_id=1 + i % 2, blocker_id=i, answer="a", resolved_at=NOW)
        for i in range(1, 151)
    ]
    keys = [None if i % 3 else f"lost-{i}" for i in range(1, 151)]
    if flavour == "sync":
        with Publisher.from_url(fake.url, prefix=PREFIX) as publisher:
            cursors = publisher.publish_many(events, idempotency_keys=keys, in_order=True)
    else:

        async def publish() -> list:
            async with AsyncPublisher.from_url(fake.url, prefix=PREFIX) as publisher:
                return await publisher.publish_many(events, idempotency_keys=keys, in_order=True)

        cursors = asyncio.run(publish())
    assert lost and fake.names().count(b"EXEC") == 3  # two transactions, the first one twice
    for project_id in (1, 2):
        seqs = [c.seq for e, c in zip(events, cursors, strict=True) if e.project_id == project_id]
        assert seqs == list(range(1, 76)) == history(redis_server, project_id)
    client = redis_server.client()
    try:
        for event, cursor in zip(events, cursors, strict=True):
            ((_, fields),) = client.xrange(KEYS.stream(event.project_id), cursor.seq, cursor.seq)
            assert cursor.tag == event_tag(fields[b"f"])
    finally:
        client.close()


# --- the gateway's pub/sub link -------------------------------------------------------------------

CHANNEL = b"protocoltest:ch:1"


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


CONFIRM = b"*3\r\n" + _bulk(b"subscribe") + _bulk(CHANNEL) + b":1\r\n"
#: Frames no Redis sends on a RESP2 subscribed connection.
PUBSUB_GARBAGE = {
    "message of two": b"*2\r\n" + _bulk(b"message") + _bulk(CHANNEL),
    "message of four": b"*4\r\n" + _bulk(b"message") + _bulk(CHANNEL) + _bulk(b"x") + b":1\r\n",
    "channel an integer": b"*3\r\n" + _bulk(b"message") + b":5\r\n" + _bulk(b"x"),
    "data an array": b"*3\r\n" + _bulk(b"message") + _bulk(CHANNEL) + b"*1\r\n:1\r\n",
    "confirmation of an array": b"*3\r\n" + _bulk(b"subscribe") + b"*0\r\n:1\r\n",
    "kind an array": b"*2\r\n*0\r\n:1\r\n",
}


@pytest.mark.parametrize("frame", PUBSUB_GARBAGE.values(), ids=PUBSUB_GARBAGE.keys())
async def test_a_pubsub_frame_no_redis_sends_is_a_broken_link_not_a_crash(fake, frame):
    """The link reconnects (and the hub catches up from the streams) as after a lost
    connection, says so in a warning, and hands nothing of the frame to the hub; before, the
    frame reached the hub or failed the link with a logged traceback ("pubsub link failed")."""
    from structlog.testing import capture_logs

    from gateway.metrics import Metrics
    from gateway.pubsub import PubSubLink

    connections = 0

    def answer(command: list[bytes]) -> object:
        nonlocal connections
        name = command[0].upper()
        if name == b"SUBSCRIBE":
            connections += 1
            return CONFIRM + (frame if connections == 1 else b"")
        if name == b"PING":
            return b"*2\r\n" + _bulk(b"pong") + _bulk(b"")
        return b"+OK\r\n"  # the handshake (CLIENT SETINFO)

    fake.answer = answer
    messages: list[tuple] = []
    resubscribed = asyncio.Event()
    link = PubSubLink(
        fake.url,
        sharded=False,
        on_message=lambda channel, data: messages.append((channel, data)),
        on_resubscribed=resubscribed.set,
        metrics=Metrics(),
    )
    with capture_logs() as logs:
        link.start()
        try:
            async with asyncio.timeout(10):
                await link.subscribe(CHANNEL)
                await resubscribed.wait()  # a second connection, every channel confirmed
        finally:
            await link.close()
    assert link.connections == 2 and connections == 2
    assert messages == []
    assert [e["event"] for e in logs if e["log_level"] in ("error", "critical")] == []
    assert any(e["event"] == "pubsub link down" for e in logs)


async def test_a_trickled_cluster_slot_map_is_given_up_within_its_read_timeout(fake):
    """The Cluster link asks a node for the slot map with a client of its own (no call
    timeout): a node trickling the reply costs one read timeout (2 s), as one that never
    answers, and the next node is asked. Passed before; the record that it holds."""
    from gateway.cluster_pubsub import ClusterPubSub
    from gateway.metrics import Metrics

    def answer(command: list[bytes]) -> object:
        if command[0].upper() == b"CLUSTER":
            # (Not the huge array: hiredis makes a list of the announced length for it, and
            # freeing that list takes seconds, in whichever test the collector runs.)
            return trickle(HUGE_TRICKLES["bulk"], 0.1)
        return PROXY

    fake.answer = answer
    cluster = ClusterPubSub(
        f"redis+cluster://127.0.0.1:{fake.port}",
        on_message=lambda channel, data: None,
        on_recovered=lambda channels: None,
        metrics=Metrics(),
    )
    started = time.monotonic()
    async with asyncio.timeout(15):
        with pytest.raises(redis.exceptions.ConnectionError, match="no cluster node answered"):
            await cluster._load_map()
    elapsed = time.monotonic() - started
    assert elapsed < 3, f"took {elapsed:.1f} s"
    assert fake.names().count(b"CLUSTER") == 1, fake.names()


def _probed_link(fake, resubscribed: asyncio.Event):
    """A pub/sub link to ``fake`` probing every 0.5 s (a pong due within 0.5 s), messages
    dropped, ``resubscribed`` set at each resubscribe."""
    from gateway.metrics import Metrics
    from gateway.pubsub import PubSubLink

    return PubSubLink(
        fake.url,
        sharded=False,
        on_message=lambda channel, data: None,
        on_resubscribed=resubscribed.set,
        metrics=Metrics(),
        probe_interval=0.5,
        probe_timeout=0.5,
    )


async def test_a_pubsub_link_whose_redis_stopped_reading_is_ended_by_the_probe(any_fake):
    """Redis stops reading the link's connection (hung) while the pod sends it more than the
    sockets' buffers hold (subscribes): the probe's ping cannot even be written, and the link
    reconnects within about probe_interval + probe_timeout. Before, the probe waited on that
    write for redis-py's 5 s write timeout, and then neither its "disconnect" nor the
    subscribes' own ones closed the socket (asyncio keeps it open until its buffer is sent):
    the reader waited for as long as Redis did, and the link never came back."""

    fake = any_fake
    loop = asyncio.get_running_loop()
    connections = 0
    reconnected = asyncio.Event()

    def confirm(channels: list[bytes]) -> bytes:
        return b"".join(b"*3\r\n" + _bulk(b"subscribe") + _bulk(c) + b":1\r\n" for c in channels)

    def answer(command: list[bytes]) -> object:
        nonlocal connections
        name = command[0].upper()
        if name == b"SUBSCRIBE":
            connections += 1
            if connections > 1:
                loop.call_soon_threadsafe(reconnected.set)  # (in the fake server's thread)
                return confirm(command[1:])

            async def stop_reading(reader, writer) -> None:
                writer.write(confirm(command[1:]))
                await writer.drain()
                await asyncio.Event().wait()  # (until the fake server closes)

            return stop_reading
        if name == b"PING":
            return b"*2\r\n" + _bulk(b"pong") + _bulk(b"")
        return b"+OK\r\n"  # the handshake (CLIENT SETINFO)

    fake.answer = answer
    resubscribed = asyncio.Event()
    link = _probed_link(fake, resubscribed)
    link.start()
    waiting: list[asyncio.Task] = []
    try:
        async with asyncio.timeout(5):
            await link.subscribe(CHANNEL)
        started = time.monotonic()
        # 6 MB of subscribes: more than a loopback TCP or a Unix socket buffers.
        waiting = [
            asyncio.create_task(link.subscribe(b"x" * 60_000 + b"%d" % i)) for i in range(100)
        ]
        async with asyncio.timeout(10):
            await reconnected.wait()
        elapsed = time.monotonic() - started
        assert elapsed < 3, f"took {elapsed:.1f} s"
        async with asyncio.timeout(10):  # (6 MB to resubscribe)
            await resubscribed.wait()
            assert all(await asyncio.gather(*waiting))  # confirmed on the new connection
    finally:
        for task in waiting:
            task.cancel()
        await link.close()
    assert link.connections == 2


#: Frames no Redis sends that redis-py's pub/sub fails on (an IndexError, a TypeError); it
#: takes the others for frames of some kind, which the presence listener reads past.
PUBSUB_CRASHERS = {
    "message of two": PUBSUB_GARBAGE["message of two"],
    "kind an array": PUBSUB_GARBAGE["kind an array"],
    "not an array": b":7\r\n",
}


@pytest.mark.parametrize("frame", PUBSUB_CRASHERS.values(), ids=PUBSUB_CRASHERS.keys())
async def test_a_frame_no_redis_sends_on_presences_own_pubsub_is_a_reconnect_not_its_end(
    fake, frame
):
    """A frame no Redis sends, on the pub/sub connection of a PresenceService without a link (a
    broken server or proxy): a warning and a reconnect, as the gateway's link does. Before, the
    listener ended for good at the first one (an IndexError or TypeError in a task nobody
    awaits), without a word: no announcement of another pod reached this one again."""
    from structlog.testing import capture_logs

    from gateway.presence_store import PresenceService

    loop = asyncio.get_running_loop()
    subscribes = 0
    resubscribed = asyncio.Event()

    def answer(command: list[bytes]) -> object:  # (in the fake server's thread)
        nonlocal subscribes
        if command[0].upper() != b"SUBSCRIBE":
            return PROXY
        subscribes += 1
        if subscribes == 1:
            return frame
        loop.call_soon_threadsafe(resubscribed.set)
        return PROXY

    fake.answer = answer
    client = redis.asyncio.Redis.from_url(fake.url, socket_timeout=2, socket_connect_timeout=2)
    service = PresenceService(
        client, lambda sessions, frame: None, pod_id="a", keys=KEYS, ttl=0.8,
        refresh_interval=0.25, flush_interval=0.02, diff_interval=0.2,
    )  # fmt: skip
    service._channels.add(CHANNEL.decode())
    listener = asyncio.create_task(service._listen_loop())
    with capture_logs() as logs:
        try:
            async with asyncio.timeout(5):
                await resubscribed.wait()
        finally:
            service.stopped = True
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await client.aclose()
    assert "presence: pub/sub down" in [entry["event"] for entry in logs]


def test_frame_problem_passes_every_frame_redis_sends():
    from gateway.pubsub import frame_problem

    for frame in (
        [b"message", CHANNEL, b"data"],
        [b"subscribe", CHANNEL, 1],
        [b"unsubscribe", CHANNEL, 0],
        [b"unsubscribe", None, 0],  # from every channel, subscribed to none
        [b"pong", b""],
        [b"smessage", CHANNEL, b""],
    ):
        assert frame_problem(frame, b"message", b"subscribe") is None, frame
    assert frame_problem([b"ssubscribe", CHANNEL, 1], b"smessage", b"ssubscribe") is None
    assert frame_problem([b"smessage", CHANNEL], b"smessage", b"ssubscribe") is not None


def test_the_links_probe_waits_another_timeout_only_while_whole_frames_are_read():
    """The pub/sub link's pong wait (gateway.pubsub.PongWait), without sockets: one probe
    timeout, one more each time the last one read whole frames (a backlog the pong is behind),
    up to PONG_WINDOWS in all; a timeout without a whole frame (a silent connection, a frame
    trickled a byte at a time) ends it."""
    from gateway.pubsub import PONG_WINDOWS, PongWait

    assert PONG_WINDOWS == 6
    wait = PongWait(frames_read=10)
    assert wait.another(frames_read=11)  # a frame during the first timeout
    assert wait.another(frames_read=50)
    assert not wait.another(frames_read=50)  # none during the third: given up
    assert wait.windows == 3

    flowing = PongWait(frames_read=0)
    assert [flowing.another(frames_read=n) for n in range(1, 8)] == [True] * 5 + [False] * 2
    assert flowing.windows == PONG_WINDOWS

    assert not PongWait(frames_read=7).another(frames_read=7)  # silent from the start
    assert [PongWait(0, limit=2).another(1), PongWait(0, limit=1).another(1)] == [True, False]


# --- a reply cut short ----------------------------------------------------------------------------


def _cut_first_publish(fake: FakeResp):
    """An answer that runs the first publish in Redis and closes the connection half-way
    through its reply, then lets everything through."""
    cut = []

    def answer(command: list[bytes]) -> object:
        if command[0].upper() != b"EVALSHA" or cut:
            return PROXY
        cut.append(command)

        async def half(reader, writer) -> None:
            reply = await fake.forward(command)
            writer.write(reply[: len(reply) // 2])
            await writer.drain()
            writer.close()

        return half

    return answer


def _load_script(redis_server) -> None:
    loader = redis_server.client()
    loader.script_load(lua.PUBLISH)  # the cut call is the one that publishes
    loader.close()


def test_a_publish_whose_reply_is_cut_is_retried_and_published_once(fake, redis_server):
    _load_script(redis_server)
    fake.answer = _cut_first_publish(fake)
    with Publisher.from_url(fake.url, prefix=PREFIX, timeout=5) as publisher:
        cursor = publisher.blocker_resolved(1, blocker_id=1, answer="a")
    assert fake.names().count(b"EVALSHA") == 2  # the cut one, and the retry
    assert history(redis_server, 1) == [cursor.seq] == [1]


async def test_an_async_publish_whose_reply_is_cut_is_retried_and_published_once(
    fake, redis_server
):
    _load_script(redis_server)
    fake.answer = _cut_first_publish(fake)
    async with AsyncPublisher.from_url(fake.url, prefix=PREFIX, timeout=5) as publisher:
        cursor = await publisher.blocker_resolved(1, blocker_id=1, answer="a")
    assert fake.names().count(b"EVALSHA") == 2
    assert history(redis_server, 1) == [cursor.seq] == [1]


# --- replies out of step --------------------------------------------------------------------------


def _one_extra_reply(extra: bytes):
    """An answer that puts ``extra`` before the first publish's reply: every later reply on that
    connection answers the command before it (a buggy proxy; or a MITM)."""
    done = []

    def answer(command: list[bytes]) -> object:
        if command[0].upper() != b"EVALSHA" or done:
            return PROXY
        done.append(command)
        return Rewrite(lambda reply: extra + reply)

    return answer


@pytest.mark.parametrize("extra", [b"+OK\r\n", b":1\r\n", b"*2\r\n:1\r\n:2\r\n"])
def test_a_connection_whose_replies_are_out_of_step_is_dropped(fake, redis_server, extra):
    """Each publish returns its own event's cursor. Before, the publisher's held connection
    kept the first publish's real reply unread, so the NEXT publish returned the previous
    event's cursor (and so on for the connection's life), and the first one raised PublishError
    although its event was published."""
    _load_script(redis_server)
    fake.answer = _one_extra_reply(extra)
    with Publisher.from_url(fake.url, prefix=PREFIX, timeout=5) as publisher:
        cursors = [publisher.blocker_resolved(1, blocker_id=i, answer="a") for i in (1, 2, 3)]
    assert [c.seq for c in cursors] == history(redis_server, 1) == [1, 2, 3]


async def test_an_async_connection_whose_replies_are_out_of_step_is_dropped(fake, redis_server):
    _load_script(redis_server)
    fake.answer = _one_extra_reply(b"+OK\r\n")
    async with AsyncPublisher.from_url(fake.url, prefix=PREFIX, timeout=5) as publisher:
        cursors = [await publisher.blocker_resolved(1, blocker_id=i, answer="a") for i in (1, 2, 3)]
    assert [c.seq for c in cursors] == history(redis_server, 1) == [1, 2, 3]


def test_a_stray_error_reply_does_not_put_the_next_publishes_out_of_step(fake, redis_server):
    """An error reply before the real one: that publish raises PublishError (an error reply
    can be the script's own: nothing tells them apart), but the next ones return their own
    cursors. Before, the held connection was kept with the real reply unread, and each later
    publish returned the cursor of the one before."""
    _load_script(redis_server)
    fake.answer = _one_extra_reply(b"-ERR stray\r\n")
    with Publisher.from_url(fake.url, prefix=PREFIX, timeout=5) as publisher:
        with pytest.raises(PublishError):
            publisher.blocker_resolved(1, blocker_id=1, answer="a")
        cursors = [publisher.blocker_resolved(1, blocker_id=i, answer="a") for i in (2, 3)]
    assert [c.seq for c in cursors] == [2, 3] and history(redis_server, 1) == [1, 2, 3]


async def test_an_async_stray_error_reply_does_not_put_the_next_publishes_out_of_step(
    fake, redis_server
):
    _load_script(redis_server)
    fake.answer = _one_extra_reply(b"-ERR stray\r\n")
    async with AsyncPublisher.from_url(fake.url, prefix=PREFIX, timeout=5) as publisher:
        with pytest.raises(PublishError):
            await publisher.blocker_resolved(1, blocker_id=1, answer="a")
        cursors = [await publisher.blocker_resolved(1, blocker_id=i, answer="a") for i in (2, 3)]
    assert [c.seq for c in cursors] == [2, 3] and history(redis_server, 1) == [1, 2, 3]


def test_with_a_client_of_your_own_a_reply_out_of_step_goes_once_more_through_redis_py(
    fake, redis_server
):
    """As after a lost connection: the call is tried once more through redis-py (whose pool
    checks a connection for unread data), and returns its own cursor. Before, it raised
    PublisherUnavailable although its event was published and the retry guard made a retry
    exact."""
    _load_script(redis_server)
    fake.answer = _one_extra_reply(b"+OK\r\n")
    client = redis.Redis.from_url(fake.url, socket_timeout=5)
    try:
        publisher = Publisher(client, prefix=PREFIX)
        cursors = [publisher.blocker_resolved(1, blocker_id=i, answer="a") for i in (1, 2, 3)]
    finally:
        client.close()
    assert [c.seq for c in cursors] == history(redis_server, 1) == [1, 2, 3]


async def test_with_an_async_client_of_your_own_a_reply_out_of_step_goes_through_redis_py(
    fake, redis_server
):
    _load_script(redis_server)
    fake.answer = _one_extra_reply(b"+OK\r\n")
    client = redis.asyncio.Redis.from_url(fake.url, socket_timeout=5)
    try:
        publisher = AsyncPublisher(client, prefix=PREFIX)
        cursors = [await publisher.blocker_resolved(1, blocker_id=i, answer="a") for i in (1, 2, 3)]
    finally:
        await client.aclose()
    assert [c.seq for c in cursors] == history(redis_server, 1) == [1, 2, 3]


def test_without_a_retry_guard_a_reply_out_of_step_is_not_retried(fake, redis_server):
    """``retry_guard=None``: the publish that got the stray reply raises PublishError (a retry
    might publish its event twice); the connection is dropped all the same, so the next
    publishes return their own cursors."""
    _load_script(redis_server)
    fake.answer = _one_extra_reply(b"+OK\r\n")
    with Publisher.from_url(fake.url, prefix=PREFIX, timeout=5, retry_guard=None) as publisher:
        with pytest.raises(PublishError) as raised:
            publisher.blocker_resolved(1, blocker_id=1, answer="a")
        assert not isinstance(raised.value, PublisherUnavailable)
        cursors = [publisher.blocker_resolved(1, blocker_id=i, answer="a") for i in (2, 3)]
    assert fake.names().count(b"EVALSHA") == 3  # never retried
    assert [c.seq for c in cursors] == [2, 3] and history(redis_server, 1) == [1, 2, 3]


# --- huge announced lengths to the gateway ------------------------------------------------------


async def test_a_trickled_huge_history_reply_is_store_unavailable_within_the_call_timeout(
    any_fake,
):
    fake = any_fake
    fake.answer = answering_scripts(trickle(HUGE_TRICKLES["bulk"], 0.1))
    client = async_client(fake.url, call_timeout=2)
    try:
        store = HistoryStore(client, KEYS)
        started = time.monotonic()
        async with asyncio.timeout(15):
            with pytest.raises(StoreUnavailable):
                await store.snapshot(1, None, 0, 10)
        assert time.monotonic() - started < 3
    finally:
        await client.aclose()


@pytest.mark.parametrize("announced", HUGE_TRICKLES.values(), ids=HUGE_TRICKLES.keys())
async def test_a_trickled_huge_pubsub_frame_is_ended_by_the_probe(any_fake, announced):
    """The reader waits inside the frame; the probe's ping gets no pong, and the link
    reconnects (after probe_interval + probe_timeout), holding only what was received."""

    fake = any_fake

    connections = 0

    def answer(command: list[bytes]) -> object:
        nonlocal connections
        if command[0].upper() != b"SUBSCRIBE":
            return b"+OK\r\n"
        connections += 1
        if connections == 1:
            return trickle(CONFIRM + announced, 0.01)
        return CONFIRM

    fake.answer = answer
    resubscribed = asyncio.Event()
    link = _probed_link(fake, resubscribed)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    link.start()
    try:
        async with asyncio.timeout(15):
            await link.subscribe(CHANNEL)
            await resubscribed.wait()
    finally:
        await link.close()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100_000  # KiB
