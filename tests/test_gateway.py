"""The gateway end to end: real Redis (private), real gateways in-process, real WebSocket clients.

Every delivery test compares full sequences: what a client received must be exactly what was
published for its projects, in order, once, or an explicit ``resync_required``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time

import pytest
import redis.asyncio

from publisher import issue_token
from publisher.core import Retention, prepare_single
from schemas.events import BlockerResolved, utc_now
from schemas.keys import Keys
from schemas.protocol import CloseCode
from tests.support.gateway_client import (
    SECRET,
    RawClient,
    RecordingClient,
    client_for,
    event,
    publish,
    served_transport,
    start_gateway,
    ws_url,
)

# --- delivery guarantees ---------------------------------------------------------------------


async def test_every_client_gets_exactly_its_projects_events_in_order(gateways, publisher):
    gateway = await gateways()
    clients = []
    for i in range(12):
        projects = [1 + i % 4, 5 + i % 3]
        client = await client_for(gateway, projects)
        for project_id in projects:
            subscribed = await client.subscribe(project_id)
            assert subscribed["seq"] == 0
        clients.append((client, projects))
    for round_ in range(5):
        for project_id in range(1, 8):
            await publish(publisher, project_id, 10 + round_)
    expected = sum(10 + r for r in range(5))
    for client, projects in clients:
        await client.wait_for(
            lambda c=client, p=projects: all(len(c.seqs(x)) == expected for x in p)
        )
        for project_id in projects:
            assert client.seqs(project_id) == list(range(1, expected + 1))
        assert set(client.events) == set(projects), "no event of another project"
        for message in client.messages:
            if "seq" in message and message["type"] not in ("subscribed", "resync_required"):
                assert message["project_id"] in projects
    for client, _ in clients:
        await client.close()


async def test_compressed_and_plain_connections_get_the_same_events(gateways, publisher):
    """With --compression, a client that negotiates permessage-deflate gets its frames from
    websockets (compressed per connection), one that does not gets the shared raw frames:
    both exactly the published events, in order, bursts and single events alike."""
    gateway = await gateways(compression=True)
    compressed = await client_for(gateway, [21])
    plain = await RecordingClient(
        ws_url(gateway), token=issue_token(SECRET, [21], ttl=300), compression=None
    ).connect()
    assert compressed.ws.protocol.extensions and not plain.ws.protocol.extensions
    for client in (compressed, plain):
        await client.subscribe(21)
    await publish(publisher, 21, 40)  # one burst: several frames per write
    for n in range(10):
        await publisher.publish(event(21, 100 + n))
    for client in (compressed, plain):
        await client.wait_for(lambda c=client: len(c.seqs(21)) == 50)
        assert client.seqs(21) == list(range(1, 51))
        await client.close()


async def test_a_client_that_floods_pings_without_reading_is_cut_at_the_outbound_limit(
    gateways, monkeypatch
):
    """websockets answers every ping with a pong, written at once: a client that sends pings
    as fast as it can and reads nothing makes the gateway buffer pongs. The outbound limit
    applies to them too, checked after each read: the connection is cut (4008) holding at most
    the limit plus one read's pongs, not whatever the client uploads before the once-a-second
    check (gigabytes a second on a fast link)."""
    from gateway.websocket import WebSocketConnection, WebSocketSession

    # Only the read path can cut it here: the once-a-second stall and limit check is off.
    monkeypatch.setattr(WebSocketSession, "check_stall", lambda self, now: False)
    limit = 64 * 1024
    gateway = await gateways(outbound_limit=limit)
    client = await RawClient.connect(gateway.port, rcvbuf=4096)
    await client.send({"type": "auth", "token": issue_token(SECRET, [1], ttl=300)})
    (session,) = gateway.sessions
    await wait_until_true(lambda: session.claims is not None)
    transport = session.transport
    peak = 0
    send_data = WebSocketConnection.send_data

    def measuring_send_data(connection: WebSocketConnection):
        nonlocal peak
        result = send_data(connection)
        if connection.session is session and not session.closing:  # 4008 is queued on purpose
            peak = max(peak, transport.get_write_buffer_size())
        return result

    monkeypatch.setattr(WebSocketConnection, "send_data", measuring_send_data)
    ping = b"\x89\xfd" + b"\0\0\0\0" + b"p" * 125  # masked (with a zero key), 125 bytes
    sent = 0
    with contextlib.suppress(OSError):
        while not session.closing and sent < 32 * 1024 * 1024:
            client.writer.write(ping * 8000)  # ~1 MB
            await client.writer.drain()
            sent += len(ping) * 8000
    assert session.closing, f"never cut; {peak} bytes of pongs buffered, nothing read"
    assert gateway.metrics.slow_consumer_disconnects_total == 1
    assert peak <= limit + 512 * 1024, peak
    client.writer.transport.abort()
    await wait_until_true(lambda: not gateway.sessions)


async def test_a_compressed_connection_that_stops_reading_is_cut_before_passing_the_limit(
    gateways, publisher, monkeypatch
):
    """With --compression, websockets frames and compresses each message, and the outbound
    limit is still checked before each write, as on a raw connection: a client that stops
    reading holds at most the limit plus one write in the gateway, then it is cut (4008)."""
    import base64
    import os
    import socket

    from websockets.asyncio.client import connect

    from gateway.websocket import WebSocketConnection, WebSocketSession

    # Only the write path can cut it here: the once-a-second stall and limit check is off.
    monkeypatch.setattr(WebSocketSession, "check_stall", lambda self, now: False)
    limit = 64 * 1024
    gateway = await gateways(compression=True, outbound_limit=limit)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
    # max_queue=1: once a message waits unread, websockets stops reading the socket.
    ws = await connect(ws_url(gateway), sock=sock, compression="deflate", max_queue=1)
    await ws.send(json.dumps({"type": "auth", "token": issue_token(SECRET, [41], ttl=300)}))
    assert json.loads(await ws.recv())["type"] == "authenticated"
    await ws.send(json.dumps({"type": "subscribe", "project_id": 41}))
    assert json.loads(await ws.recv())["type"] == "subscribed"
    (session,) = gateway.sessions
    assert not session.raw  # permessage-deflate negotiated: websockets frames each message
    transport = session.transport
    peak = 0
    send_data = WebSocketConnection.send_data

    def measuring_send_data(connection: WebSocketConnection) -> None:
        # Every byte websockets frames for a compressed connection is written here (a uvloop
        # transport's own write cannot be wrapped: its attributes are read-only).
        nonlocal peak
        send_data(connection)
        if connection.session is session and not session.closing:  # 4008 is queued on purpose
            peak = max(peak, transport.get_write_buffer_size())

    monkeypatch.setattr(WebSocketConnection, "send_data", measuring_send_data)
    batch = 8  # ~30 KB compressed per write: random base64 barely compresses
    published = 0
    while not session.closing and published < 4000:  # ~15 MB of payload at most
        await publisher.publish_many(
            BlockerResolved(
                project_id=41,
                blocker_id=published + n + 1,
                answer=base64.b64encode(os.urandom(3600)).decode(),
                resolved_at=utc_now(),
            )
            for n in range(batch)
        )
        published += batch
        # Each batch is written on its own (the next one is published after it was).
        await wait_until_true(
            lambda n=published: session.closing or gateway.metrics.deliveries_total >= n
        )
    assert session.closing, f"never cut; {peak} bytes buffered for a client reading nothing"
    assert gateway.metrics.slow_consumer_disconnects_total == 1
    assert peak <= limit + 64 * 1024, peak
    await wait_until_true(lambda: not gateway.sessions)
    ws.transport.abort()


def _burst(ws, count: int) -> bytes:
    """The wire bytes of a subscribe to a project the gateway does not follow yet (it waits for
    Redis) and ``count`` unsubscribes of it (each held back behind it), padded to nearly
    --max-frame-bytes, each compressed to ~100 bytes by the client's permessage-deflate (``ws``
    writes none of it)."""
    pad = "x" * 65_000  # unknown fields are ignored
    ws.protocol.send_text(json.dumps({"type": "subscribe", "project_id": 5}).encode())
    for _ in range(count):
        message = {"type": "unsubscribe", "project_id": 5, "pad": pad}
        ws.protocol.send_text(json.dumps(message).encode())
    return b"".join(ws.protocol.data_to_send())


def _answers_in_order(answers: list[dict], count: int) -> tuple[bool, list[tuple]]:
    """What the burst's messages are answered with, in order: ``subscribed``, ``unsubscribed``,
    then one ``not_subscribed`` error per later unsubscribe; a prefix of that is in order.
    Returns (in order, the last answer)."""
    expected = [("subscribed", None, 5), ("unsubscribed", None, 5)]
    expected += [("error", "not_subscribed", 5)] * (count - 1)
    got = [(a["type"], a.get("code"), a.get("project_id")) for a in answers]
    return got == expected[: len(got)], got[-1:]


async def test_a_compressed_read_is_decompressed_a_slice_at_a_time(gateways, monkeypatch):
    """With --compression, websockets decompresses every message of what it is given at once,
    and deflate inflates up to ~1,000 times: of ~110 KB of tiny messages that each inflate to
    nearly --max-frame-bytes, 36 MB were decompressed at once in one connection. The gateway
    feeds websockets a compressed read INFLATE_SLICE bytes at a time, and keeps the rest of the
    read, compressed, while its backlog is full: what a connection holds decompressed (what
    websockets just parsed, measured after every feed; a message held back is kept decoded,
    its unknown fields dropped) stays within a slice's worth plus the backlog, every message is
    answered in order, and the client goes on as usual."""
    from websockets.asyncio.client import connect
    from websockets.frames import Frame
    from websockets.server import ServerProtocol

    from gateway.websocket import INFLATE_SLICE, MAX_BACKLOG

    # 1,000 frames at once: over --client-burst, the rate limit would close the connection
    # (4029) half way; it has tests of its own.
    gateway = await gateways(compression=True, client_rate=0)
    connection = None
    peak = 0
    fed_while_paused = 0
    receive_data = ServerProtocol.receive_data

    def measured_receive_data(self, data):
        nonlocal peak, fed_while_paused
        receive_data(self, data)
        if connection is not None and self is connection.protocol:
            parsed = sum(len(e.data) for e in self.events if isinstance(e, Frame))
            peak = max(peak, parsed)
            fed_while_paused += connection.paused

    monkeypatch.setattr(ServerProtocol, "receive_data", measured_receive_data)
    count = 1000
    async with connect(ws_url(gateway), compression="deflate", max_size=None) as ws:
        await ws.send(json.dumps({"type": "auth", "token": issue_token(SECRET, "*", ttl=300)}))
        assert json.loads(await ws.recv())["type"] == "authenticated"
        (session,) = gateway.sessions
        assert not session.raw  # permessage-deflate negotiated
        connection = session.connection
        wire = _burst(ws, count)
        assert len(wire) < 150_000, len(wire)  # ~65 MB of messages
        ws.transport.write(wire)
        answers = []
        async with asyncio.timeout(30):
            while len(answers) < 1 + count:
                answers.append(json.loads(await ws.recv()))
        in_order, last = _answers_in_order(answers, count)
        assert in_order, last
        # Deflate's limit (1,032:1) on a slice, a message begun in an earlier slice, the backlog.
        bound = INFLATE_SLICE * 1032 + MAX_BACKLOG * gateway.config.max_frame_bytes
        assert peak <= bound, f"{peak} bytes decompressed at once (bound {bound})"
        assert fed_while_paused, "the backlog never filled: the test proves nothing"
        # The same client goes on as usual.
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv()) == {"type": "pong"}
        await ws.send(json.dumps({"type": "subscribe", "project_id": 5}))
        assert json.loads(await ws.recv())["type"] == "subscribed"
    assert connection.unfed is None


@pytest.mark.parametrize("trailer", ["close", "bad frame"])
async def test_a_close_or_a_bad_frame_behind_a_compressed_burst_is_read_in_its_turn(
    gateways, monkeypatch, trailer
):
    """A close frame (or a frame websockets refuses: unmasked) in the same write as a burst of
    compressed messages is in the part of the read the gateway keeps while the backlog is full:
    it is fed once the backlog drains, after every message before it (each handled), and ends
    the connection as promptly as ever (1000 echoed, or 1002), long before CLOSE_TIMEOUT.
    (Answers still queued when the close goes out are not sent, as on any connection.)"""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from gateway.websocket import CLOSE_TIMEOUT, WebSocketConnection

    kept = 0  # times the backlog drained with part of a read still unfed
    resume = WebSocketConnection._resume

    def counted_resume(self):
        nonlocal kept
        kept += self.unfed is not None
        resume(self)

    monkeypatch.setattr(WebSocketConnection, "_resume", counted_resume)
    gateway = await gateways(compression=True)
    count = 200
    async with connect(ws_url(gateway), compression="deflate", max_size=None) as ws:
        await ws.send(json.dumps({"type": "auth", "token": issue_token(SECRET, "*", ttl=300)}))
        assert json.loads(await ws.recv())["type"] == "authenticated"
        (session,) = gateway.sessions
        connection = session.connection
        wire = _burst(ws, count)
        if trailer == "close":
            ws.protocol.send_close(1000)
            wire += b"".join(ws.protocol.data_to_send())
        else:
            wire += b"\x81\x02hi"  # a text frame without a mask
        started = time.monotonic()
        ws.transport.write(wire)
        answers = []
        async with asyncio.timeout(CLOSE_TIMEOUT / 2):
            with contextlib.suppress(ConnectionClosed):
                while True:
                    answers.append(json.loads(await ws.recv()))
            await ws.wait_closed()
        assert time.monotonic() - started < CLOSE_TIMEOUT / 2
        in_order, last = _answers_in_order(answers, count)
        assert in_order, last
        assert ws.protocol.close_rcvd.code == (1000 if trailer == "close" else 1002)
    await wait_until_true(lambda: not gateway.sessions)
    # Every unsubscribe before the close (the first one's answer is "unsubscribed").
    assert gateway.metrics.client_errors_total == count - 1
    assert kept, "the backlog never filled: the test proves nothing"
    assert connection.unfed is None


async def test_events_carry_the_contract_json_plus_seq(gateways, publisher):
    gateway = await gateways()
    client = await client_for(gateway, [1])
    await client.subscribe(1)
    cursor = await publisher.blocker_resolved(1, blocker_id=123, answer="Use JWT for stateless API")
    await client.wait_for(lambda: client.seqs(1) == [1])
    received = next(m for m in client.messages if m["type"] == "blocker_resolved")
    assert received == {
        "type": "blocker_resolved",
        "project_id": 1,
        "blocker_id": 123,
        "answer": "Use JWT for stateless API",
        "resolved_at": received["resolved_at"],
        "seq": cursor.seq,
    }
    assert received["resolved_at"].endswith("Z")
    await client.close()


async def test_resume_after_disconnect_replays_exactly_what_was_missed(gateways, publisher):
    gateway = await gateways()
    client = await client_for(gateway, [3])
    await client.subscribe(3)
    await publish(publisher, 3, 5)
    await client.wait_for(lambda: len(client.seqs(3)) == 5)
    await client.close()
    await publish(publisher, 3, 7)  # missed while away
    await client.connect()
    subscribed = await client.subscribe(3, resume=True)
    assert subscribed["resumed"] and subscribed["replayed"] == 7 and subscribed["seq"] == 12
    await publish(publisher, 3, 3)
    await client.wait_for(lambda: len(client.seqs(3)) == 15)
    assert client.seqs(3) == list(range(1, 16))
    # The replay comes before `subscribed`, live events after it.
    kinds = [m["type"] for m in client.messages if m.get("project_id") == 3]
    assert kinds.index("subscribed", 1) == 1 + 5 + 7  # first ack, 5 live, 7 replayed
    await client.close()


async def test_resume_on_another_gateway(gateways, publisher):
    first, second = await gateways(), await gateways()
    client = await client_for(first, [4])
    await client.subscribe(4)
    await publish(publisher, 4, 20)
    await client.wait_for(lambda: len(client.seqs(4)) == 20)
    await client.close()
    await publish(publisher, 4, 20)
    client.url = ws_url(second)
    await client.connect()
    await client.subscribe(4, resume=True)
    await publish(publisher, 4, 5)
    await client.wait_for(lambda: len(client.seqs(4)) == 45)
    assert client.seqs(4) == list(range(1, 46))
    await client.close()


async def test_subscribes_racing_with_publishes_are_gapless(gateways, publisher):
    """Clients subscribe (fresh and resuming) while events stream in: each one gets a
    contiguous run from its starting point to the end, without gap or duplicate."""
    gateway = await gateways()
    total = 600
    done = asyncio.Event()

    async def produce():
        for n in range(total // 20):
            await publish(publisher, 5, 20)
            await asyncio.sleep(0.002 * (n % 3))
        done.set()

    producer = asyncio.create_task(produce())
    clients = []
    for i in range(15):
        client = await client_for(gateway, [5])
        if i % 3 == 0 and clients:
            # Resume from another client's position, mid-stream.
            donor = clients[-1]
            epoch, seq = donor.cursor(5)
            await client.subscribe(5, epoch=epoch, after=max(0, seq - 3))
            start = max(0, seq - 3)
        else:
            start = (await client.subscribe(5))["seq"]
        clients.append(client)
        client.start = start
        await asyncio.sleep(0.01)
    await producer
    assert done.is_set()
    for client in clients:
        await client.wait_for(lambda c=client: c.cursor(5)[1] == total)
        assert client.seqs(5) == list(range(client.start + 1, total + 1))
        await client.close()


async def _publish_without_live(redis_url: str, project_id: int) -> None:
    """Append an event to the stream exactly as the publish script does, but publish it on a
    channel nobody listens to: a pub/sub message lost between Redis and the pod."""
    client = redis.asyncio.Redis.from_url(redis_url)
    from schemas import lua

    batch = prepare_single(
        event(project_id, 99), keys=Keys(), retention=Retention(), publish_command="PUBLISH"
    )
    args = list(batch.args)
    channel = Keys().channel(project_id)
    args[args.index(channel)] = "eventbus:void"
    await client.eval(lua.PUBLISH, len(batch.keys), *batch.keys, *args)
    await client.aclose()


async def test_a_lost_pubsub_message_is_repaired_before_later_events(
    gateways, publisher, redis_url
):
    gateway = await gateways(reconcile_interval=60)  # only the gap detection can repair it
    client = await client_for(gateway, [6])
    await client.subscribe(6)
    await publish(publisher, 6, 3)
    await _publish_without_live(redis_url, 6)  # seq 4 never arrives live
    await publish(publisher, 6, 3)
    await client.wait_for(lambda: len(client.seqs(6)) == 7)
    assert client.seqs(6) == list(range(1, 8))
    assert gateway.metrics.gaps_repaired_total == 1
    await client.close()


async def test_a_lost_last_message_is_found_by_the_periodic_check(gateways, publisher, redis_url):
    gateway = await gateways(reconcile_interval=0.1)
    client = await client_for(gateway, [7])
    await client.subscribe(7)
    await publish(publisher, 7, 2)
    await _publish_without_live(redis_url, 7)  # nothing after it reveals the gap
    await client.wait_for(lambda: len(client.seqs(7)) == 3)
    assert client.seqs(7) == [1, 2, 3]
    await client.close()


async def test_killing_the_pubsub_connection_loses_nothing(gateways, publisher, redis_client):
    gateway = await gateways(reconcile_interval=60)
    client = await client_for(gateway, [8, 9])
    await client.subscribe(8)
    await client.subscribe(9)
    await publish(publisher, 8, 10)
    await client.wait_for(lambda: len(client.seqs(8)) == 10)
    reconnects = gateway.metrics.pubsub_reconnects_total
    for _ in range(3):
        redis_client.client_kill_filter(_type="pubsub")
        # Published while the link is down or resubscribing: only the stream has them.
        await publish(publisher, 8, 10)
        await publish(publisher, 9, 10)
        await asyncio.sleep(0.05)
    await client.wait_for(lambda: len(client.seqs(8)) == 40 and len(client.seqs(9)) == 30)
    assert client.seqs(8) == list(range(1, 41))
    assert client.seqs(9) == list(range(1, 31))
    assert gateway.metrics.pubsub_reconnects_total > reconnects
    await client.close()


async def test_flushed_redis_gives_resync_required_then_events_continue(
    gateways, publisher, redis_client
):
    gateway = await gateways(reconcile_interval=0.1)
    client = await client_for(gateway, [10])
    first = await client.subscribe(10)
    await publish(publisher, 10, 5)
    await client.wait_for(lambda: len(client.seqs(10)) == 5)
    redis_client.flushall()
    await client.wait_for(lambda: client.count("resync_required", 10) == 1)
    resync = client.last("resync_required")
    assert resync["reason"] == "epoch_changed" and resync["epoch"] != first["epoch"]
    await publish(publisher, 10, 3)
    await client.wait_for(lambda: len(client.seqs(10)) == 8)
    after = client.events[10][client.events[10].index(-resync["seq"] - 1) + 1 :]
    assert after == list(range(resync["seq"] + 1, resync["seq"] + 4))
    # A client resuming with the old cursor is told too.
    late = await client_for(gateway, [10])
    await late.send({"type": "subscribe", "project_id": 10, "epoch": first["epoch"], "after": 5})
    await late.wait_for(lambda: late.count("subscribed", 10) == 1)
    assert late.last("resync_required")["reason"] == "epoch_changed"
    assert gateway.metrics.resyncs_total >= 2
    await client.close()
    await late.close()


async def test_a_client_that_stops_reading_is_cut_and_resumes_with_nothing_lost(
    gateways, publisher
):
    gateway = await gateways(outbound_limit=64 * 1024, stall_timeout=1.0, max_replay=2000)
    healthy = await client_for(gateway, [11])
    await healthy.subscribe(11)
    # A raw client that authenticates, subscribes, then never reads again. Its receive window
    # is tiny, so the gateway's kernel send buffer fills first, then its user-space buffer.
    stalled = await RawClient.connect(gateway.port, rcvbuf=4096)
    await stalled.send({"type": "auth", "token": issue_token(SECRET, [11], ttl=300)})
    await stalled.send({"type": "subscribe", "project_id": 11})
    async with asyncio.timeout(5):  # subscribed before the events, or it would miss them
        while b'"subscribed"' not in (await stalled.receive())[1]:
            pass
    # It stops reading from its socket: its stream reader (a 4 MiB limit, on this test's own
    # event loop) would otherwise go on taking most of the 7 MB and it would never stall.
    stalled.writer.transport.pause_reading()
    total = 1500  # ~7 MB: beyond the limit and whatever the kernel buffers hold
    big_answer = "x" * 4900
    await publisher.publish_many(
        BlockerResolved(project_id=11, blocker_id=n + 1, answer=big_answer, resolved_at=utc_now())
        for n in range(total)
    )
    deadline = time.monotonic() + 10
    while gateway.metrics.slow_consumer_disconnects_total == 0:
        assert time.monotonic() < deadline, "the stalled client was never cut"
        await asyncio.sleep(0.05)
    await healthy.wait_for(lambda: len(healthy.seqs(11)) == total)
    assert healthy.seqs(11) == list(range(1, total + 1))
    assert len(gateway.sessions) == 1
    stalled.close()
    # The slow client comes back with its cursor (it had seen nothing) and loses nothing.
    epoch = healthy.cursor(11)[0]
    back = await client_for(gateway, [11])
    await back.send({"type": "subscribe", "project_id": 11, "epoch": epoch, "after": 0})
    await back.wait_for(lambda: back.count("subscribed", 11) == 1)
    assert back.seqs(11) == list(range(1, total + 1))
    await healthy.close()
    await back.close()


async def test_a_stalled_client_is_cut_when_all_it_has_not_read_is_in_the_kernel(
    gateways, publisher
):
    # Nothing waits in the gateway's own buffer: the frames the client does not read sit in the
    # kernel's send queue. The once-a-second stall check must see them there (on both event
    # loops: uvloop's transports are not asyncio.Transport instances).
    gateway = await gateways(stall_timeout=1.0)
    stalled = await RawClient.connect(gateway.port, rcvbuf=4096)
    await stalled.send({"type": "auth", "token": issue_token(SECRET, [12], ttl=300)})
    await stalled.send({"type": "subscribe", "project_id": 12})
    async with asyncio.timeout(5):
        while b'"subscribed"' not in (await stalled.receive())[1]:
            pass
    stalled.writer.transport.pause_reading()  # the client stops reading from its socket
    await publisher.publish_many(
        BlockerResolved(project_id=12, blocker_id=n + 1, answer="x" * 2000, resolved_at=utc_now())
        for n in range(10)
    )
    await wait_until_true(lambda: gateway.metrics.slow_consumer_disconnects_total == 1, within=8)
    await wait_until_true(lambda: not gateway.sessions, within=2)  # connection_lost comes next
    stalled.close()


# --- authentication and authorisation --------------------------------------------------------


async def test_forbidden_project_gets_an_error_and_never_an_event(gateways, publisher):
    gateway = await gateways()
    client = await client_for(gateway, [12])
    await client.send({"type": "subscribe", "project_id": 13})
    await client.wait_for(lambda: client.last("error") is not None)
    assert client.last("error") == {
        "type": "error",
        "code": "forbidden",
        "message": "the token does not allow project 13",
        "project_id": 13,
    }
    await client.subscribe(12)  # the connection stays usable for its other projects
    await publish(publisher, 13, 3)
    await publish(publisher, 12, 1)
    await client.wait_for(lambda: client.seqs(12) == [1])
    assert 13 not in client.events
    await client.close()


@pytest.mark.parametrize(
    ("first_frame", "code"),
    [
        ({"type": "subscribe", "project_id": 1}, 4001),
        ({"type": "auth", "token": "not-a-jwt"}, 4001),
        ({"type": "auth", "token": issue_token("another-secret-0123456789abcdef-x", [1])}, 4001),
        ("{not json", 4001),
    ],
)
async def test_bad_first_message_closes_with_auth_failed(gateways, first_frame, code):
    gateway = await gateways()
    client = await RecordingClient(ws_url(gateway)).connect(auth=False)
    await client.send(first_frame)
    await asyncio.wait_for(client.closed.wait(), 5)
    assert client.close_code == code
    assert gateway.metrics.auth_failures_total == 1


async def test_frames_sent_right_behind_the_token_wait_for_it(gateways, publisher):
    """Clients send their subscribes right behind the token, without waiting for
    ``authenticated`` (docs/protocol.md): the gateway reads the token first, answers
    ``authenticated`` before anything else, and never reads what follows a refused token."""
    gateway = await gateways()
    client = await RecordingClient(ws_url(gateway)).connect(auth=False)
    await client.send({"type": "auth", "token": issue_token(SECRET, [17])})
    await client.send({"type": "subscribe", "project_id": 17})
    await client.send({"type": "subscribe", "project_id": 18})  # not allowed by the token
    await client.wait_for(lambda: client.count("subscribed", 17) and client.count("error", 18))
    assert client.messages[0]["type"] == "authenticated"
    assert client.last("error")["code"] == "forbidden"
    await publish(publisher, 17, 2)
    await client.wait_for(lambda: client.seqs(17) == [1, 2])
    await client.close()

    refused = await RecordingClient(ws_url(gateway)).connect(auth=False)
    await refused.send(
        {"type": "auth", "token": issue_token("another-secret-0123456789abcdef-x", [17])}
    )
    await refused.send({"type": "subscribe", "project_id": 17})
    await asyncio.wait_for(refused.closed.wait(), 5)
    assert refused.close_code == 4001
    assert refused.messages == []
    assert gateway.metrics.auth_failures_total == 1


async def test_expired_token_closes_with_token_expired(gateways):
    import jwt

    gateway = await gateways()
    token = jwt.encode(
        {"projects": [1], "aud": "eventbus", "exp": int(time.time()) - 60},
        SECRET,
        algorithm="HS256",
    )
    client = await RecordingClient(ws_url(gateway)).connect(auth=False)
    await client.send({"type": "auth", "token": token})
    await asyncio.wait_for(client.closed.wait(), 5)
    assert client.close_code == 4002


async def test_no_auth_message_in_time_closes_with_auth_failed(gateways):
    gateway = await gateways(auth_timeout=0.3)
    client = await RecordingClient(ws_url(gateway)).connect(auth=False)
    await asyncio.wait_for(client.closed.wait(), 5)
    assert client.close_code == 4001


async def test_token_in_authorization_header(gateways, publisher):
    gateway = await gateways()
    token = issue_token(SECRET, [14])
    client = await RecordingClient(
        ws_url(gateway), headers={"Authorization": f"Bearer {token}"}
    ).connect(auth=False)
    await client.wait_for(lambda: client.last("authenticated") is not None)
    await client.subscribe(14)
    await publish(publisher, 14, 2)
    await client.wait_for(lambda: client.seqs(14) == [1, 2])
    await client.close()


async def test_token_expiry_closes_and_in_band_refresh_keeps_the_connection(gateways):
    gateway = await gateways()
    client = await client_for(gateway, [15])
    await client.subscribe(15)
    # Refresh with a short-lived token that names fewer projects: 15 is dropped.
    await client.send({"type": "auth", "token": issue_token(SECRET, [16], ttl=1)})
    await client.wait_for(lambda: client.count("authenticated") == 2)
    assert client.count("unsubscribed", 15) == 1
    await asyncio.wait_for(client.closed.wait(), 10)
    assert client.close_code == 4002
    # A bad refresh token is an error, not a disconnect.
    other = await client_for(gateway, [15])
    await other.send({"type": "auth", "token": "garbage"})
    await other.wait_for(lambda: other.last("error") is not None)
    assert other.last("error")["code"] == "invalid_token"
    await other.send({"type": "ping"})
    await other.wait_for(lambda: other.last("pong") is not None)
    await other.close()


async def test_a_closed_connection_leaves_the_token_expiry_timer(gateways):
    # One shared timer holds every connection's expiry (gateway.expiry): a closed connection
    # must leave it, or the timer would keep every session that ever connected.
    gateway = await gateways()
    client = await client_for(gateway, [15])
    await client.wait_for(lambda: client.last("authenticated") is not None)
    assert len(gateway.clients.expiry) == 1
    await client.close()
    await wait_until_true(lambda: not gateway.sessions)
    assert len(gateway.clients.expiry) == 0


async def test_development_mode_needs_no_token(gateways, publisher):
    gateway = await gateways(no_auth=True, auth_secret=None)
    client = await RecordingClient(ws_url(gateway)).connect(auth=False)
    await client.subscribe(17)
    await publish(publisher, 17, 1)
    await client.wait_for(lambda: client.seqs(17) == [1])
    await client.close()


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{nope", "invalid_json"),
        ('{"type":"teleport"}', "unknown_type"),
        ('{"project_id":1}', "unknown_type"),
        ('{"type":"subscribe"}', "invalid_message"),
        ('{"type":"subscribe","project_id":-4}', "invalid_message"),
        ('{"type":"subscribe","project_id":"1"}', "invalid_message"),
        ('{"type":"subscribe","project_id":1,"after":-1,"epoch":"e"}', "invalid_cursor"),
        ('{"type":"subscribe","project_id":1,"after":3}', "invalid_cursor"),
        ('{"type":"subscribe","project_id":1,"epoch":"bad epoch!","after":3}', "invalid_cursor"),
        ('{"type":"unsubscribe","project_id":1}', "not_subscribed"),
        ("[]", "invalid_message"),
        ('"hello"', "invalid_message"),
    ],
)
async def test_bad_frames_get_a_documented_error_and_the_connection_stays_usable(
    gateways, frame, code
):
    gateway = await gateways()
    client = await client_for(gateway, "*")
    await client.send(frame)
    await client.wait_for(lambda: client.last("error") is not None)
    assert client.last("error")["code"] == code
    await client.send({"type": "ping"})
    await client.wait_for(lambda: client.last("pong") is not None)
    await client.close()


async def test_ten_malformed_frames_in_a_row_close_the_connection(gateways):
    gateway = await gateways()
    client = await client_for(gateway)
    for _ in range(10):
        await client.send("{")
    await asyncio.wait_for(client.closed.wait(), 5)
    assert client.close_code == 4009
    assert client.count("error") == 10  # the last error arrives before the close


async def test_oversized_frames_close_with_1009_without_affecting_others(gateways, publisher):
    gateway = await gateways(max_frame_bytes=1024)
    bystander = await client_for(gateway, [18])
    await bystander.subscribe(18)
    client = await client_for(gateway)
    await client.send(json.dumps({"type": "ping", "pad": "x" * 2000}))
    await asyncio.wait_for(client.closed.wait(), 5)
    assert client.close_code == 1009
    assert gateway.metrics.protocol_violations_total == 1
    await publish(publisher, 18, 1)
    await bystander.wait_for(lambda: bystander.seqs(18) == [1])
    await bystander.close()


async def test_too_many_subscriptions(gateways):
    gateway = await gateways(max_subscriptions=2)
    client = await client_for(gateway)
    await client.subscribe(1)
    await client.subscribe(2)
    await client.send({"type": "subscribe", "project_id": 3})
    await client.wait_for(lambda: client.last("error") is not None)
    assert client.last("error")["code"] == "too_many_subscriptions"
    await client.send({"type": "unsubscribe", "project_id": 1})
    await client.wait_for(lambda: client.count("unsubscribed", 1) == 1)
    await client.subscribe(3)
    await client.close()


# --- the rate limit on client frames (--client-rate, --client-burst) ----------------------------


class StoppedClock:
    """The gateway's rate-limit clock, standing still until a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_frames_over_the_rate_limit_are_refused_and_the_connection_stays_usable(
    gateways, publisher
):
    """A burst of valid subscribe/unsubscribe flips: the first --client-burst subscribes are
    executed (each unsubscribe that ends a subscription is free: its subscribe paid), the
    next subscribes get error rate_limited naming their project (not executed: no subscription),
    a ping is executed all the same, and once the bucket refills the client subscribes as
    usual. A bystander on the same gateway gets every event meanwhile."""
    gateway = await gateways(client_rate=2, client_burst=10, max_subscriptions=5)
    gateway.clients.clock = clock = StoppedClock()
    bystander = await client_for(gateway, [7])
    await bystander.subscribe(7)  # (its bucket: one frame taken)
    client = await client_for(gateway, [1, 2])
    for _ in range(10):  # ten subscribes: the whole burst; the unsubscribes take nothing
        await client.send({"type": "subscribe", "project_id": 1})
        await client.send({"type": "unsubscribe", "project_id": 1})
    await client.wait_for(lambda: client.count("unsubscribed", 1) == 10)
    assert client.count("subscribed", 1) == 10 and not client.of("error")
    for _ in range(3):
        await client.send({"type": "subscribe", "project_id": 2})
    await client.send({"type": "ping"})
    await client.wait_for(lambda: client.last("pong") is not None)
    errors = client.of("error")
    assert [(e["code"], e.get("project_id")) for e in errors] == [("rate_limited", 2)] * 3
    assert "at most 2 frames per second, bursts of 10" in errors[0]["message"]
    # The clock stands still and the bucket is empty: a token is half a second away.
    assert [e["retry_after_ms"] for e in errors] == [500] * 3
    assert [e["refused"] for e in errors] == ["subscribe"] * 3  # which frame was not executed
    assert client.count("subscribed", 2) == 0, "a refused subscribe is not executed"
    await publish(publisher, 7, 3)
    await publish(publisher, 2, 1)
    await bystander.wait_for(lambda: bystander.seqs(7) == [1, 2, 3])
    assert gateway.metrics.client_frames_rate_limited_total == 3
    # Half a second later the bucket has a token again: the same connection subscribes.
    clock.now += 0.5
    subscribed = await client.subscribe(2)
    assert subscribed["seq"] == 1
    await publish(publisher, 2, 1)
    await client.wait_for(lambda: client.seqs(2) == [2])
    assert not client.closed.is_set()
    assert gateway.metrics.rate_limit_disconnects_total == 0
    assert b"\neventbus_client_frames_rate_limited_total 3\n" in gateway.metrics.render()
    await client.close()
    await bystander.close()


async def test_a_client_that_keeps_sending_while_refused_is_closed_with_4029(gateways, publisher):
    """--client-burst subscribes executed (their unsubscribes free), then as many frames refused
    (an unsubscribe of nothing over the limit is executed but counts as well): the next frame
    closes the connection with 4029, after its rate_limited error. A bystander on the same
    gateway is not affected."""
    gateway = await gateways(client_rate=2, client_burst=10, max_subscriptions=5)
    gateway.clients.clock = StoppedClock()
    bystander = await client_for(gateway, [7])
    await bystander.subscribe(7)
    client = await client_for(gateway, [1])
    for _ in range(16):  # 10 flips executed, then 10 frames refused, the 11th closes
        await client.send({"type": "subscribe", "project_id": 1})
        with contextlib.suppress(Exception):  # (the last one may meet the close)
            await client.send({"type": "unsubscribe", "project_id": 1})
    await asyncio.wait_for(client.closed.wait(), 5)
    assert client.close_code == 4029
    codes = [e["code"] for e in client.of("error")]
    # The subscribes of flips 11 to 16 refused; the unsubscribes after them executed (nothing
    # to leave: not_subscribed) and counted.
    assert codes == ["rate_limited", "not_subscribed"] * 5 + ["rate_limited"]
    assert gateway.metrics.rate_limit_disconnects_total == 1
    assert gateway.metrics.client_frames_rate_limited_total == 6
    await publish(publisher, 7, 2)
    await bystander.wait_for(lambda: bystander.seqs(7) == [1, 2])
    await bystander.close()


async def test_a_real_flood_of_subscribe_flips_is_closed_and_others_keep_their_events(
    gateways, publisher
):
    """The default limit, the real clock: a client flipping a project's subscription as fast
    as it can (each subscribe of the released project a Redis read) gets rate_limited errors
    and is closed with 4029 within a second or two, while a bystander keeps getting events."""
    gateway = await gateways()
    bystander = await client_for(gateway, [7])
    await bystander.subscribe(7)
    client = await client_for(gateway, [1])
    publishing = asyncio.create_task(publish_slowly(publisher, 7, 20))
    started = time.monotonic()
    sent = 0
    with contextlib.suppress(Exception):
        while not client.closed.is_set() and sent < 20_000:
            await client.send({"type": "subscribe", "project_id": 1})
            await client.send({"type": "unsubscribe", "project_id": 1})
            sent += 2
            if sent % 100 == 0:
                await asyncio.sleep(0)  # let the reader see the close
    await asyncio.wait_for(client.closed.wait(), 10)
    assert client.close_code == 4029, client.close_code
    assert time.monotonic() - started < 10
    assert client.count("error") > 0
    assert {e["code"] for e in client.of("error")} <= {"rate_limited", "not_subscribed"}
    assert gateway.metrics.rate_limit_disconnects_total == 1
    await publishing
    await bystander.wait_for(lambda: bystander.seqs(7) == list(range(1, 21)))
    await bystander.close()


async def publish_slowly(publisher, project_id: int, count: int) -> None:
    for n in range(count):
        await publisher.publish(event(project_id, n + 1))
        await asyncio.sleep(0.01)


async def test_a_reconnect_subscribing_every_project_at_once_is_not_rate_limited(gateways):
    """The defaults never throttle a legitimate client: a reconnect sends a subscribe for
    every project it follows (--max-subscriptions, 100), back to back, and eventbus.js then an
    activity for each; all 200 frames are executed."""
    gateway = await gateways()
    limit = gateway.config.max_subscriptions
    assert gateway.config.client_burst >= 2 * limit
    client = await RecordingClient(
        ws_url(gateway), token=issue_token(SECRET, "*", ttl=300, subject="u-1")
    ).connect()
    for project_id in range(1, limit + 1):
        await client.send({"type": "subscribe", "project_id": project_id})
    for project_id in range(1, limit + 1):
        await client.send({"type": "activity", "project_id": project_id, "viewing": 5})
    await client.send({"type": "ping"})  # a token refresh or a ping may come along too
    await client.wait_for(lambda: client.count("subscribed") == limit and client.of("pong"))
    assert client.of("error") == []
    assert gateway.metrics.client_frames_rate_limited_total == 0
    await client.close()


@pytest.mark.parametrize("burst", [15, 20, 29, 30])
async def test_every_burst_the_gateway_accepts_lets_an_eventbus_js_reconnect_through(
    gateways, burst
):
    """eventbus.js reconnecting with presence and an activity in each of its projects sends a
    subscribe per project and, after each `subscribed`, an activity: two frames a project, up to
    2 x --max-subscriptions. The gateway accepted a --client-burst of only --max-subscriptions,
    so such a reconnect had activities refused, and eventbus.js answered each refused frame of a
    project with a resubscribe (then the activity again): every reconnect of a dashboard with
    150 presence projects on --max-subscriptions 150 --client-burst 200 ended in 4029 a few
    seconds later (modelled with the real bucket). A burst the gateway starts with now always
    holds a whole reconnect."""
    from gateway.config import ConfigError

    limit = 15
    try:
        gateway = await gateways(client_rate=2, client_burst=burst, max_subscriptions=limit)
    except ConfigError as exc:
        assert "--client-burst must be at least twice --max-subscriptions" in str(exc)
        return
    gateway.clients.clock = StoppedClock()  # nothing refills while the frames arrive
    client = await RecordingClient(
        ws_url(gateway), token=issue_token(SECRET, "*", ttl=300, subject="u-1")
    ).connect()
    for project_id in range(1, limit + 1):
        await client.send({"type": "subscribe", "project_id": project_id, "presence": True})
    await client.wait_for(lambda: client.count("subscribed") + client.count("error") >= limit)
    for project_id in range(1, limit + 1):
        await client.send({"type": "activity", "project_id": project_id, "viewing": 5})
    await client.send({"type": "ping"})  # (executed even over the limit: answered after them)
    await client.wait_for(lambda: client.last("pong") is not None)
    assert client.of("error") == [], f"burst {burst} refused a reconnect"
    assert gateway.metrics.client_frames_rate_limited_total == 0
    await client.close()


async def test_the_consumer_retries_subscribes_refused_by_the_rate_limit(gateways, publisher):
    """The Python consumer against the rate limit: its connection's bucket is empty when it
    follows three more projects; the subscribes are refused (rate_limited), retried with backoff
    on the same connection, and once the bucket refills every project follows, none dropped."""
    from consumer import Consumer, Delivery, ReconnectPolicy

    gateway = await gateways(client_rate=2, client_burst=100, max_subscriptions=50)
    gateway.clients.clock = clock = StoppedClock()
    token = issue_token(SECRET, "*", ttl=300)
    policy = ReconnectPolicy(initial=0.05, max=0.2)
    async with Consumer(ws_url(gateway), token=token, reconnect=policy) as consumer:
        first = consumer.events(1)
        await asyncio.wait_for(first.wait_subscribed(), 10)
        (session,) = gateway.sessions
        session.rate_tokens, session.rate_stamp = 0.0, clock.now  # as after a burst
        others = consumer.events(2, 3, 4)
        await wait_until_true(lambda: consumer.stats.rate_limited >= 3)
        assert consumer.live and consumer.connects == 1
        clock.now += 60  # the bucket refills; the next retries go through
        await asyncio.wait_for(others.wait_subscribed(), 10)
        for project_id in (2, 3, 4):
            await publish(publisher, project_id, 1)
        items = [await asyncio.wait_for(anext(others), 10) for _ in range(3)]
    assert all(isinstance(item, Delivery) for item in items)
    assert sorted((item.project_id, item.seq) for item in items) == [(2, 1), (3, 1), (4, 1)]
    assert consumer.connects == 1 and gateway.metrics.rate_limit_disconnects_total == 0


async def test_the_consumer_retrying_many_refused_subscribes_is_never_closed(gateways):
    """The default limit (20/s, bursts of 200) on a clock 4 times as fast as the consumer's
    (whose policy is the default one divided by 4): the consumer's bucket is empty when it
    follows 99 more projects at once, all refused. It retried each after a random part of its
    backoff cap, from 0 up: the first round came within a second, when the bucket held a
    handful of tokens, refused again (each refusal a strike), and the second round took the
    strikes past the burst: 4029 after 1.6 s (the random draw is fixed at the middle here;
    about half of all draws closed, in a simulation of the retries against the real bucket).
    Subscribes refused with rate_limited are now held and sent again one after the other from
    the error's retry_after_ms (tests/test_client_pacing.py): every project follows on the same
    connection."""
    from consumer import Consumer, ReconnectPolicy

    gateway = await gateways()
    metrics = gateway.metrics

    def clock() -> float:
        # Standing still until the 99 subscribes sent at once are all refused, then 4 times as
        # fast as the consumer's. Running from the start, it refilled the bucket while the 99
        # arrived: a loaded machine, slower to send and read them, had fewer refused (75 in a
        # loaded run) and tested another scenario than this one.
        if metrics.client_frames_rate_limited_total < 99:
            return 1000.0
        if not started:
            started.append(time.monotonic())
        return 1000.0 + (time.monotonic() - started[0]) * 4

    started: list[float] = []
    gateway.clients.clock = clock
    token = issue_token(SECRET, "*", ttl=300)
    policy = ReconnectPolicy(initial=0.25, max=7.5, prompt_max=0.125, resend_interval=0.025)
    consumer = Consumer(ws_url(gateway), token=token, reconnect=policy, random=lambda: 0.5)
    async with consumer:
        first = consumer.events(1)
        await asyncio.wait_for(first.wait_subscribed(), 10)
        (session,) = gateway.sessions
        session.rate_tokens, session.rate_stamp = 0.0, clock()  # as after a burst
        others = consumer.events(*range(2, 101))
        await asyncio.wait_for(others.wait_subscribed(), 20)
        assert consumer.stats.rate_limited >= 99  # every one of the first round, then retries
        assert consumer.connects == 1
    assert gateway.metrics.rate_limit_disconnects_total == 0


async def test_a_consumer_following_a_hundred_projects_reconnects_without_being_limited(
    gateways, publisher
):
    """Default settings: a consumer following --max-subscriptions (100) projects subscribes to
    all of them at once on every connection; after a reconnect (the pod drains) none of its
    subscribes is refused."""
    from consumer import Consumer, ReconnectPolicy

    gateway = await gateways()
    projects = list(range(1, gateway.config.max_subscriptions + 1))
    token = issue_token(SECRET, "*", ttl=300)
    policy = ReconnectPolicy(initial=0.05, max=0.2, prompt_max=0.05)
    async with Consumer(ws_url(gateway), token=token, reconnect=policy) as consumer:
        subscription = consumer.events(*projects)
        await asyncio.wait_for(subscription.wait_subscribed(), 10)
        (session,) = gateway.sessions
        session.close_later(CloseCode.SERVICE_RESTART, "restart")  # as a draining pod does
        await wait_until_true(lambda: consumer.connects == 2 and consumer.live)
        await publish(publisher, projects[-1], 1)
        item = await asyncio.wait_for(anext(subscription), 10)
        assert (item.project_id, item.seq) == (projects[-1], 1)
    assert consumer.stats.rate_limited == 0
    assert gateway.metrics.client_frames_rate_limited_total == 0


async def test_garbage_on_a_redis_channel_is_skipped(gateways, publisher, redis_client):
    gateway = await gateways()
    client = await client_for(gateway, [19])
    await client.subscribe(19)
    await publish(publisher, 19, 1)
    await client.wait_for(lambda: client.seqs(19) == [1])
    channel = Keys().channel(19)
    for garbage in (b"hello", b"\xff\xfe|1|2|{}", b"e|x|1|{}", b"e|2|1|not json", b""):
        redis_client.publish(channel, garbage)
    await publish(publisher, 19, 1)
    await client.wait_for(lambda: client.seqs(19) == [1, 2])
    assert gateway.metrics.malformed_messages_total == 5
    await client.close()


async def test_origin_allowlist(gateways):
    gateway = await gateways(allowed_origins=["https://dash.example"])
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        await connect(ws_url(gateway), origin="https://evil.example")
    assert refused.value.response.status_code == 403
    async with connect(ws_url(gateway), origin="https://dash.example") as ws:
        await ws.send(json.dumps({"type": "auth", "token": issue_token(SECRET, [1])}))
        assert json.loads(await ws.recv())["type"] == "authenticated"
    # No Origin at all: not a browser (the Python consumer, tail): the token decides.
    async with connect(ws_url(gateway)) as ws:
        await ws.send(json.dumps({"type": "auth", "token": issue_token(SECRET, [1])}))
        assert json.loads(await ws.recv())["type"] == "authenticated"


async def test_connection_limit(gateways):
    gateway = await gateways(max_connections=2)
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    a = await client_for(gateway)
    b = await client_for(gateway)
    with pytest.raises(InvalidStatus) as refused:
        await connect(ws_url(gateway))
    assert refused.value.response.status_code == 503
    await a.close()
    await b.close()


async def test_resubscribing_right_after_the_last_unsubscribe_stays_live(gateways, publisher):
    """Releasing a project's channel and acquiring it again in the same instant must leave the
    pod subscribed (the UNSUBSCRIBE of the old feed must not cancel the new SUBSCRIBE)."""
    gateway = await gateways(reconcile_interval=60)  # only the live path may deliver
    client = await client_for(gateway, [21])
    for round_ in range(5):
        await client.subscribe(21)
        if round_ % 2:
            await client.send({"type": "unsubscribe", "project_id": 21})
        await client.subscribe(21)  # a restart when still subscribed: release + acquire at once
        await publish(publisher, 21, 1)
        await client.wait_for(lambda n=round_: len(client.seqs(21)) == n + 1, within=3)
    assert client.seqs(21) == [1, 2, 3, 4, 5]
    await client.close()


async def test_a_large_replay_to_a_client_that_reads_late_is_not_cut_as_slow(gateways, publisher):
    """The replay may exceed the outbound limit: it is tolerated while it drains, so a resume
    is not cut, resumed, cut again, forever."""
    gateway = await gateways(max_replay=3000, outbound_limit=256 * 1024)
    first = await client_for(gateway, [31])
    subscribed = await first.subscribe(31)
    await first.close()
    await publisher.publish_many(
        BlockerResolved(project_id=31, blocker_id=n + 1, answer="x" * 4900, resolved_at=utc_now())
        for n in range(3000)  # ~15 MB missed while away
    )
    client = await RawClient.connect(gateway.port, rcvbuf=65536)
    await client.send({"type": "auth", "token": issue_token(SECRET, [31], ttl=300)})
    await client.send(
        {"type": "subscribe", "project_id": 31, "epoch": subscribed["epoch"], "after": 0}
    )
    await asyncio.sleep(1.5)  # the browser is busy for a moment before it reads
    await publisher.publish(event(31, 3001))  # a live event while the replay still drains
    seqs = []
    async with asyncio.timeout(20):
        while len(seqs) < 3001:
            opcode, data = await client.receive()
            assert opcode == 1, f"closed: {data[:2]!r}"
            message = json.loads(data)
            if "seq" in message and message["type"] not in ("subscribed", "authenticated"):
                seqs.append(message["seq"])
    assert seqs == list(range(1, 3002))
    assert gateway.metrics.slow_consumer_disconnects_total == 0
    client.close()


async def test_drain_closes_with_1012_even_after_the_pod_was_once_empty(gateways):
    gateway = await gateways(drain_timeout=5)
    early = await client_for(gateway, [1])
    await early.close()
    await early.closed.wait()
    async with asyncio.timeout(5):
        while gateway.sessions:  # noqa: ASYNC110 - the handler's cleanup has no event of its own
            await asyncio.sleep(0.01)
    late = [await client_for(gateway, [1]) for _ in range(3)]
    await gateway.drain()
    for client in late:
        await asyncio.wait_for(client.closed.wait(), 5)
    assert [c.close_code for c in late] == [1012, 1012, 1012]


async def test_handshakes_rejected_after_token_check_leave_nothing_behind(gateways):
    import gc

    gateway = await gateways()
    token = issue_token(SECRET, [1], ttl=300)
    for _ in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        # A valid token but no Sec-WebSocket-Key: our checks pass, websockets answers 400.
        writer.write(
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Authorization: Bearer {token}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert (await reader.readline()).startswith(b"HTTP/1.1 400")
        await reader.read()
        writer.close()
    await asyncio.sleep(0.1)
    gc.collect()
    # No session, no socket counted, and no connection object alive.
    from gateway.websocket import WebSocketConnection

    assert not gateway.sessions and gateway.admission.open == 0
    assert not [o for o in gc.get_objects() if isinstance(o, WebSocketConnection)]


async def test_a_refused_handshake_is_freed_without_waiting_for_the_cycle_collector(gateways):
    # A handshake websockets refuses (400, 426), or a request it cannot parse, leaves the reason
    # in the protocol (``handshake_exc``, and the request's); the exception's traceback holds
    # the frames that led to it, and they hold the connection and the protocol: unlinked when
    # the connection is lost, like the parser. Checked by what is still alive with the
    # collector off (a cycle through a generator never shows in gc.garbage).
    import gc

    from websockets.http11 import Request
    from websockets.server import ServerProtocol

    from gateway.websocket import WebSocketConnection

    gateway = await gateways()
    head = b"GET /refused HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    key = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    refused = [
        (b"HTTP/1.1 400", head + b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n"),
        (
            b"HTTP/1.1 400",
            head + b"Connection: Upgrade\r\n" + key + b"Sec-WebSocket-Version: 8\r\n\r\n",
        ),
        (
            b"HTTP/1.1 426",
            head + b"Connection: keep-alive\r\n" + key + b"Sec-WebSocket-Version: 13\r\n\r\n",
        ),
        (b"", b"GARBAGE\r\n\r\n"),  # not HTTP: websockets closes without an answer
    ]
    ours = (WebSocketConnection, ServerProtocol, Request)
    gc.collect()
    gc.disable()  # what reference counting does not free stays alive until gc.enable()
    try:
        for status, request in refused:
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(request)
            answer = await asyncio.wait_for(reader.read(), 5)  # until the gateway's EOF
            writer.close()
            assert answer.startswith(status), (request, answer[:100])
        await wait_until_true(lambda: gateway.admission.open == 0)
        left = [
            type(o).__name__
            for o in gc.get_objects()
            # (a Request of another path is a client's, from another test)
            if isinstance(o, ours) and (not isinstance(o, Request) or o.path == "/refused")
        ]
    finally:
        gc.enable()
    assert left == []


# --- never silent at the edges (issue 11) -----------------------------------------------------

DEEP = "[" * 1000 + "]" * 1000  # ~2 KB, far deeper than the JSON decoder recurses


async def test_deeply_nested_json_before_auth_closes_with_auth_failed_not_1011(gateways):
    gateway = await gateways()
    client = await RecordingClient(ws_url(gateway)).connect(auth=False)
    await client.send('{"type":"auth","x":' + DEEP + ',"token":"a"}')
    await asyncio.wait_for(client.closed.wait(), 5)
    assert client.close_code == 4001
    assert gateway.metrics.auth_failures_total == 1


async def test_deeply_nested_json_after_auth_is_an_invalid_json_error(gateways):
    gateway = await gateways()
    client = await client_for(gateway)
    await client.send('{"type":"ping","x":' + DEEP + "}")
    await client.wait_for(lambda: client.last("error") is not None)
    assert client.last("error")["code"] == "invalid_json"
    await client.send({"type": "ping"})
    await client.wait_for(lambda: client.last("pong") is not None)
    await client.close()


@pytest.mark.parametrize("authenticated", [False, True])
async def test_a_text_frame_that_is_not_utf8_closes_with_1007(gateways, authenticated):
    gateway = await gateways()
    client = await RecordingClient(ws_url(gateway), token=issue_token(SECRET, [1])).connect(
        auth=authenticated
    )
    assert client.ws is not None
    # websockets sends bytes with text=True as they are: a text frame carrying invalid UTF-8.
    await client.ws.send(b'{"type":"ping","x":"\xff\xfe"}', text=True)
    await asyncio.wait_for(client.closed.wait(), 5)
    assert client.close_code == 1007
    assert gateway.metrics.protocol_violations_total == 1


@pytest.mark.parametrize("header", ["Origin", "Authorization", "Upgrade"])
@pytest.mark.parametrize("path", ["/", "/healthz", "/v1/projects/1/events"])
async def test_a_repeated_header_gets_400_not_500(gateways, header, path):
    gateway = await gateways()
    values = {"Origin": "https://a.example", "Authorization": "Bearer x", "Upgrade": "websocket"}
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: localhost",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{name}: {value}" for name, value in values.items() if name != header]
    lines += [f"{header}: {values[header]}", f"{header}: {values[header]}"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split()[1] == b"400", raw[:300]
    assert json.loads(body) == {
        "error": "bad_request",
        "message": f"the {header} header is given more than once",
    }
    assert gateway.metrics.bad_requests_total == 1


async def test_silent_sockets_count_against_the_connection_limit_until_the_auth_timeout(gateways):
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    gateway = await gateways(max_connections=3, auth_timeout=1.0)
    silent = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(3)]
    assert gateway.admission.open == 3
    with pytest.raises(InvalidStatus) as refused:
        await connect(ws_url(gateway))
    assert refused.value.response.status_code == 503
    # Silent sockets are dropped auth_timeout after their accept, handshake or not.
    for reader, _ in silent:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    client = await client_for(gateway)
    assert gateway.admission.open == 1
    await client.close()


async def test_sockets_beyond_the_limit_and_its_slack_are_dropped_at_accept(gateways):
    from gateway.server import ACCEPT_SLACK

    gateway = await gateways(max_connections=1, auth_timeout=5.0)
    held = [
        await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(1 + ACCEPT_SLACK)
    ]
    await wait_until_true(lambda: gateway.admission.open == 1 + ACCEPT_SLACK)
    assert gateway.metrics.connections_dropped_total == 0
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    assert await asyncio.wait_for(reader.read(), 5) == b"", "dropped at once"
    assert gateway.admission.open == 1 + ACCEPT_SLACK
    assert gateway.metrics.connections_dropped_total == 1  # (counted nowhere before)
    assert b"eventbus_connections_dropped_total 1\n" in gateway.metrics.render()
    for _, held_writer in [*held, (reader, writer)]:
        held_writer.close()
    await wait_until_true(lambda: gateway.admission.open == 0)


async def test_a_client_that_reads_nothing_is_cut_even_when_the_kernel_holds_its_backlog(
    gateways, publisher
):
    # All it is sent fits in the kernel's send buffer: the gateway's own buffer stays empty,
    # so only the kernel's unsent bytes show that this client stopped reading.
    gateway = await gateways(stall_timeout=1.0)
    stalled = await RawClient.connect(gateway.port, rcvbuf=4096)
    await stalled.send({"type": "auth", "token": issue_token(SECRET, [23], ttl=300)})
    await stalled.send({"type": "subscribe", "project_id": 23})
    # Subscribed before the events, or it would miss them: a subscribe counts in
    # hub.subscriptions from the start, but is live only from the feed's baseline, which a
    # loaded machine may read after the publish below (then nothing was delivered).
    async with asyncio.timeout(5):
        while b'"subscribed"' not in (await stalled.receive())[1]:
            pass
    stalled.writer.transport.pause_reading()  # it reads nothing more from its socket
    (session,) = gateway.sessions
    await publisher.publish_many(
        BlockerResolved(project_id=23, blocker_id=n + 1, answer="x" * 500, resolved_at=utc_now())
        for n in range(60)
    )
    await wait_until_true(lambda: gateway.metrics.deliveries_total == 60)
    assert session.transport.get_write_buffer_size() == 0, "all of it went to the kernel"
    await wait_until_true(lambda: gateway.metrics.slow_consumer_disconnects_total == 1, within=8)
    stalled.close()


def handlers() -> list[asyncio.Task]:
    """The in-process gateway's connection tasks for messages that wait for Redis."""
    from gateway.tasks import _running

    return [t for t in _running if t.get_coro().__qualname__ == "WebSocketConnection._work"]


async def wait_until_true(predicate, within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - state of an in-process gateway, no event to await
            await asyncio.sleep(0.02)


def test_the_documented_error_codes_are_exactly_the_protocol_s():
    """docs/protocol.md's error table lists every ErrorCode and nothing else (it once listed a
    `not_authenticated` error the gateway never sends: a first frame that is not `auth` closes
    the connection with 4001)."""
    from pathlib import Path

    from schemas.protocol import ErrorCode

    text = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    table = text.split("### Error codes", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE))
    assert documented == {code.value for code in ErrorCode}
    assert "not_authenticated" not in documented


async def test_a_first_frame_echoing_long_non_ascii_text_still_closes_with_auth_failed(gateways):
    # The close reason quotes the decoder's message, which quotes the client's text: cut to the
    # 123 bytes a close frame allows, not 120 characters (here 2 bytes each).
    gateway = await gateways()
    client = await RecordingClient(ws_url(gateway)).connect(auth=False)
    await client.send(json.dumps({"type": "é" * 100}, ensure_ascii=False))
    await asyncio.wait_for(client.closed.wait(), 5)
    assert client.close_code == 4001


async def test_a_gateway_and_publishers_on_a_unix_socket_deliver_live_events(gateways):
    """``unix://`` URLs work end to end: the gateway's pub/sub link comes up, a subscribe is
    answered and events published by a sync and an async publisher arrive live. Before, every
    connect of the link failed (it passed TCP keepalive to redis-py's Unix-socket connection,
    which refuses it), so each subscribe answered ``unavailable`` after --subscribe-timeout."""
    import os
    import shutil
    import tempfile

    from publisher import AsyncPublisher, Publisher
    from tests.support.redis_server import RedisServer

    directory = tempfile.mkdtemp(prefix="eventbus-unix-")  # (a socket's path is short)
    path = os.path.join(directory, "redis.sock")
    try:
        with RedisServer(None, "--unixsocket", path, "--unixsocketperm", "700"):
            url = f"unix://{path}"
            gateway = await gateways(redis_url=url, subscribe_timeout=2.0)
            client = await client_for(gateway, [41])
            try:
                await client.subscribe(41)
                with Publisher.from_url(url) as publisher:
                    for n in (1, 2):
                        await asyncio.to_thread(publisher.publish, event(41, n))
                async with AsyncPublisher.from_url(url) as async_publisher:
                    await publish(async_publisher, 41, 1)
                await client.wait_for(lambda: client.seqs(41) == [1, 2, 3], within=5)
            finally:
                await client.close()
                await gateway.drain()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_subscribe_against_a_hung_redis_gets_unavailable_in_time_then_works():

    from publisher import AsyncPublisher
    from tests.support.redis_server import RedisServer, hung

    with RedisServer() as server:
        gateway = await _hung_redis_gateway(server, subscribe_timeout=1.0)
        client = await client_for(gateway, [31])
        try:
            with hung(server):  # sockets open, nothing answers
                started = time.monotonic()
                await client.send({"type": "subscribe", "project_id": 31})
                await client.wait_for(lambda: client.last("error") is not None, within=4)
                elapsed = time.monotonic() - started
            assert client.last("error") == {
                "type": "error",
                "code": "unavailable",
                "message": "Redis is unavailable; subscribe again later",
                "project_id": 31,
            }
            assert 0.9 < elapsed < 3, elapsed
            # Redis is back: the same connection subscribes and gets every event.
            await client.subscribe(31)
            publisher = AsyncPublisher.from_url(server.url)
            await publish(publisher, 31, 3)
            await publisher.aclose()
            await client.wait_for(lambda: client.seqs(31) == [1, 2, 3])
        finally:
            await client.close()
            await gateway.drain()


@pytest.mark.parametrize(
    "message",
    [
        {"type": "presence_get", "project_id": 33},
        {"type": "subscribe", "project_id": 33, "presence": True},
    ],
    ids=["presence_get", "subscribe_with_presence"],
)
async def test_a_connection_closed_while_presence_waits_for_a_hung_redis_is_let_go_at_once(message):
    # As a subscribe's own wait (below): a client that goes while its presence read waits for
    # Redis does not leave its handler task, and the session, waiting for --subscribe-timeout.
    # The feed answers the subscribe from memory; only presence waits.
    import weakref

    from publisher import AsyncPublisher
    from tests.support.redis_server import RedisServer, hung

    with RedisServer() as server:
        gateway = await _hung_redis_gateway(server, subscribe_timeout=5.0)
        staying = await client_for(gateway, [33])
        await staying.subscribe(33)
        leaving = await client_for(gateway, [33])
        try:
            with hung(server):  # sockets open, nothing answers
                # Measured from the send: --subscribe-timeout (5 s) cannot end the wait sooner,
                # so a let-go within 4 s of it can only be the close's doing, however slow the
                # machine is between the send and the close.
                sent = time.monotonic()
                await leaving.send(message)
                await wait_until_true(lambda: len(handlers()) == 1)
                session = weakref.ref(list(gateway.sessions)[1])  # the leaving client's
                await asyncio.sleep(0.2)
                assert len(handlers()) == 1, "presence waits for Redis"
                await leaving.close()
                await wait_until_true(lambda: not handlers() and session() is None, within=8)
                elapsed = time.monotonic() - sent
            assert elapsed < 4, f"let go {elapsed:.2f} s after the send (subscribe timeout: 5 s)"
            publisher = AsyncPublisher.from_url(server.url)
            await publish(publisher, 33, 3)
            await publisher.aclose()
            await staying.wait_for(lambda: staying.seqs(33) == [1, 2, 3])
            assert not staying.of("error")
        finally:
            await staying.close()
            await leaving.close()
            await gateway.drain()


async def test_a_connection_closed_while_its_subscribe_waits_for_a_hung_redis_is_let_go_at_once():
    # Bounded and prompt: a client that goes while its subscribe waits for Redis (stopped: the
    # feed's channel confirmation never comes) does not leave its handler task, and with it the
    # session, waiting for --subscribe-timeout. A client of the same project that stays still
    # waits, and once Redis answers gets subscribed, then every event once, in order.
    import weakref

    from publisher import AsyncPublisher
    from tests.support.redis_server import RedisServer, hung

    with RedisServer() as server:
        gateway = await _hung_redis_gateway(server, subscribe_timeout=5.0)
        staying = await client_for(gateway, [33])
        leaving = await client_for(gateway, [33])
        try:
            with hung(server):  # sockets open, nothing answers
                # Measured from the sends: --subscribe-timeout (5 s) cannot end the wait sooner,
                # so a let-go within 4 s of them can only be the close's doing, however slow the
                # machine is between the sends and the close.
                sent = time.monotonic()
                for client in (staying, leaving):
                    await client.send({"type": "subscribe", "project_id": 33})
                await wait_until_true(lambda: len(handlers()) == 2)
                session = weakref.ref(list(gateway.sessions)[1])  # the leaving client's
                await asyncio.sleep(0.2)
                assert len(handlers()) == 2, "both wait for Redis"
                await leaving.close()
                await wait_until_true(lambda: len(handlers()) == 1 and session() is None, within=8)
                elapsed = time.monotonic() - sent
                assert len(gateway.sessions) == 1 and not staying.of("subscribed")
            assert elapsed < 4, f"let go {elapsed:.2f} s after the sends (subscribe timeout: 5 s)"
            await staying.wait_for(lambda: staying.count("subscribed") == 1, within=4)
            publisher = AsyncPublisher.from_url(server.url)
            await publish(publisher, 33, 3)
            await publisher.aclose()
            await staying.wait_for(lambda: staying.seqs(33) == [1, 2, 3])
            assert staying.count("subscribed") == 1 and not staying.of("error")
        finally:
            await staying.close()
            await leaving.close()
            await gateway.drain()


async def _hung_redis_gateway(server, **overrides):
    """A started in-process gateway on ``server`` (a private redis-server the test may stop)."""
    return await start_gateway(server.url, **{"drain_timeout": 1, **overrides})


#: Subscribes that each wait --subscribe-timeout for a hung Redis: LANES_CONCURRENCY of them at
#: once, MAX_BACKLOG more held back, and their connection's reading pauses behind them for
#: several ping timeouts.
_WAITING = list(range(41, 61))


async def test_a_hung_redis_does_not_get_a_client_that_answers_its_pings_closed():
    # A dashboard subscribes to many projects while Redis hangs: the subscribes are answered
    # LANES_CONCURRENCY at a time, each after --subscribe-timeout, and the gateway reads nothing
    # while MAX_BACKLOG more are held back, the client's pongs included. That time is the
    # gateway's, not the client's: the keepalive does not count it, and the client gets an
    # `unavailable` error for each project, then subscribes once Redis is back, on the same
    # connection.

    from gateway.lanes import CONCURRENCY as LANES_CONCURRENCY
    from gateway.websocket import MAX_BACKLOG
    from publisher import AsyncPublisher
    from tests.support.redis_server import RedisServer, hung

    with RedisServer() as server:
        gateway = await _hung_redis_gateway(
            server, subscribe_timeout=0.4, ping_interval=0.1, ping_timeout=0.3
        )
        client = await client_for(gateway)
        try:
            with hung(server):
                for project_id in _WAITING:
                    await client.send({"type": "subscribe", "project_id": project_id})
                await client.wait_for(
                    lambda: client.count("error") == len(_WAITING) or client.closed.is_set(),
                    within=len(_WAITING) * 0.4 + 5,
                )
            assert len(_WAITING) > LANES_CONCURRENCY + MAX_BACKLOG  # (reading paused)
            assert not client.closed.is_set(), client.close_code
            errors = client.of("error")
            assert sorted(e["project_id"] for e in errors) == _WAITING
            assert {e["code"] for e in errors} == {"unavailable"}
            await client.subscribe(_WAITING[0])
            publisher = AsyncPublisher.from_url(server.url)
            await publish(publisher, _WAITING[0], 2)
            await publisher.aclose()
            await client.wait_for(lambda: client.seqs(_WAITING[0]) == [1, 2])
            assert not client.closed.is_set()
        finally:
            await client.close()
            await gateway.drain()


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    """One client frame (masked), for writing several in one write."""
    import os

    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def test_a_connection_closed_while_reading_is_paused_reads_the_close_reply_after_redis():
    # Reading paused behind a subscribe waiting for a hung Redis (MAX_BACKLOG held back), and
    # the same read then gets the connection closed (ten malformed frames: 4009). Once the wait
    # for Redis ends (--subscribe-timeout), the gateway reads again: the client's close reply
    # is read and the TCP connection ends then, not CLOSE_TIMEOUT (5 s) later with the held
    # frames (of no use any more) still keeping reading paused.

    from tests.support.redis_server import RedisServer, hung

    with RedisServer() as server:
        gateway = await _hung_redis_gateway(server, subscribe_timeout=0.5)
        client = await RawClient.connect(gateway.port, rcvbuf=65536)
        try:
            await client.send({"type": "auth", "token": issue_token(SECRET, "*", ttl=300)})
            opcode, payload = await client.receive()
            assert json.loads(payload)["type"] == "authenticated"
            with hung(server):
                subscribe = json.dumps({"type": "subscribe", "project_id": 41}).encode()
                client.writer.write(
                    _masked_frame(1, subscribe) * 6 + _masked_frame(1, b"not json") * 10
                )
                async with asyncio.timeout(5):
                    while opcode != 8:
                        opcode, payload = await client.receive()
                assert int.from_bytes(payload[:2], "big") == 4009
                closed_at = time.monotonic()
                client.writer.write(_masked_frame(8, payload[:2]))
                with contextlib.suppress(ConnectionResetError):  # (dropped: the failure)
                    async with asyncio.timeout(10):
                        while await client.reader.read(4096):
                            pass
                elapsed = time.monotonic() - closed_at
        finally:
            client.close()
            await gateway.drain()
    assert elapsed < 2.5, f"the TCP connection ended {elapsed:.2f} s after the close"


async def test_one_read_of_thousands_of_frames_is_held_back_no_more_than_the_backlog():
    # A client writes thousands of presence_get frames, each of another project, at once while
    # Redis hangs: LANES_CONCURRENCY of them wait for Redis and reading pauses with MAX_BACKLOG
    # held back, also within the read that brought them (the rest of it waits, as read, until
    # the backlog drains: decoded and held per project, each frame would cost ten times its
    # bytes, a megabyte per connection for one 64 KiB read).
    # Once Redis answers, every project gets its presence, once.

    from gateway.websocket import MAX_BACKLOG
    from tests.support.redis_server import RedisServer, hung

    projects = range(1000, 4000)
    with RedisServer() as server:
        gateway = await _hung_redis_gateway(server, subscribe_timeout=2.0, client_rate=0)
        client = await RawClient.connect(gateway.port, rcvbuf=1 << 20)
        try:
            await client.send({"type": "auth", "token": issue_token(SECRET, "*", ttl=300)})
            _, payload = await client.receive()
            assert json.loads(payload)["type"] == "authenticated"
            (session,) = gateway.sessions
            connection = session.connection
            with hung(server):
                client.writer.write(
                    b"".join(
                        _masked_frame(1, b'{"type":"presence_get","project_id":%d}' % p)
                        for p in projects
                    )
                )
                await wait_until_true(lambda: connection.paused)
                held = connection.lanes.waiting
            answered = []
            async with asyncio.timeout(30):
                while len(answered) < len(projects):
                    _, payload = await client.receive()
                    message = json.loads(payload)
                    answered.append((message["type"], message["project_id"]))
        finally:
            client.close()
            await gateway.drain()
    assert held <= MAX_BACKLOG, f"{held} frames held back"
    assert sorted(answered) == [("presence", p) for p in projects]


async def test_a_paused_connection_keeps_no_more_than_a_slice_of_a_read_parsed():
    # Reading pauses with MAX_BACKLOG frames held behind a subscribe waiting for a hung Redis,
    # in the middle of one read of ~200 KB of empty pongs (6 bytes each on the wire). What the
    # connection keeps of that read until the backlog drains is at most a slice's frames
    # parsed (INFLATE_SLICE bytes' worth, ~140 bytes each), the rest as the bytes it read: a
    # read parsed whole and kept as ~35,000 frames is ~5 MB a connection for as long as Redis
    # hangs. Once Redis answers, every subscribe is answered, in order, and the client goes on.

    from gateway.websocket import INFLATE_SLICE, MAX_BACKLOG
    from tests.support.redis_server import RedisServer, hung

    with RedisServer() as server:
        gateway = await _hung_redis_gateway(server, subscribe_timeout=0.5, client_rate=0)
        client = await RawClient.connect(gateway.port, rcvbuf=1 << 20)
        try:
            await client.send({"type": "auth", "token": issue_token(SECRET, "*", ttl=300)})
            _, payload = await client.receive()
            assert json.loads(payload)["type"] == "authenticated"
            (session,) = gateway.sessions
            connection = session.connection
            kept = 0
            with hung(server):
                subscribe = json.dumps({"type": "subscribe", "project_id": 41}).encode()
                client.writer.write(
                    _masked_frame(1, subscribe) * (1 + MAX_BACKLOG)
                    + _masked_frame(10, b"") * 35_000
                )
                await wait_until_true(lambda: connection.paused)
                kept = len(connection.unread or ())
            answers = []
            async with asyncio.timeout(10):
                while len(answers) < 1 + MAX_BACKLOG:
                    _, payload = await client.receive()
                    answers.append(json.loads(payload))
            assert [a["project_id"] for a in answers] == [41] * (1 + MAX_BACKLOG)
            await client.send({"type": "ping"})
            _, payload = await client.receive()
            assert json.loads(payload) == {"type": "pong"}
        finally:
            client.close()
            await gateway.drain()
    assert kept <= INFLATE_SLICE // 6, f"{kept} frames kept parsed while paused"


async def test_frames_in_the_handshake_read_are_kept_no_more_than_a_slice_parsed():
    # The same, with the frames in the read that brings the handshake (a client sending its
    # auth and subscribes without waiting for the 101): reading pauses part way through them,
    # and what is kept of that read parsed is at most a slice's frames.
    import base64
    import os

    from gateway.websocket import INFLATE_SLICE, MAX_BACKLOG
    from tests.support.redis_server import RedisServer, hung

    with RedisServer() as server:
        gateway = await _hung_redis_gateway(server, subscribe_timeout=0.5, client_rate=0)
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            auth = json.dumps({"type": "auth", "token": issue_token(SECRET, "*", ttl=300)})
            subscribe = json.dumps({"type": "subscribe", "project_id": 41}).encode()
            kept = 0
            with hung(server):
                writer.write(
                    "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
                    + b"\x81\xfe"  # a text frame, masked, a 16-bit length
                    + len(auth).to_bytes(2, "big")
                    + b"\0\0\0\0"  # (a mask of zeros: the payload as it is)
                    + auth.encode()
                    + _masked_frame(1, subscribe) * (1 + MAX_BACKLOG)
                    + _masked_frame(10, b"") * 10_000
                )
                await wait_until_true(lambda: len(gateway.sessions) == 1)
                (session,) = gateway.sessions
                connection = session.connection
                await wait_until_true(lambda: connection.paused)
                kept = len(connection.unread or ())
            await reader.readuntil(b"\r\n\r\n")
            client = RawClient(reader, writer)
            answers = []
            async with asyncio.timeout(10):
                while len(answers) < 2 + MAX_BACKLOG:
                    _, payload = await client.receive()
                    answers.append(json.loads(payload))
            assert answers[0]["type"] == "authenticated"
            assert [a["project_id"] for a in answers[1:]] == [41] * (1 + MAX_BACKLOG)
        finally:
            writer.close()
            await gateway.drain()
    assert kept <= INFLATE_SLICE // 6, f"{kept} frames kept parsed while paused"


async def test_malformed_frames_count_in_a_row_in_the_order_sent_while_frames_wait():
    # Ten malformed frames in a row close a connection (4009), in the order they were sent: a
    # valid frame between them starts the count again, also when it is held back behind a
    # frame of its project waiting for Redis while the malformed ones (which wait for nothing)
    # are answered at once. A client sending a frame type this gateway does not know (a newer
    # client) between its others is not closed because Redis is slow.

    from tests.support.redis_server import RedisServer, hung

    with RedisServer() as server:
        gateway = await _hung_redis_gateway(server, subscribe_timeout=1.0)
        client = await client_for(gateway, [41])
        try:
            with hung(server):
                await client.send({"type": "presence_get", "project_id": 41})
                for _ in range(2):
                    for _ in range(6):
                        await client.send({"type": "typing", "project_id": 41})
                    await client.send({"type": "presence_get", "project_id": 41})
                await client.send({"type": "ping"})
                await client.wait_for(lambda: client.count("pong") or client.closed.is_set())
            assert not client.closed.is_set(), client.close_code
            await client.wait_for(
                lambda: client.count("presence") + client.count("error") == 15, within=5
            )
            assert not client.closed.is_set(), client.close_code
        finally:
            await client.close()
            await gateway.drain()


async def test_the_rate_limit_counts_frames_in_the_order_sent_while_some_are_held_back():
    # The rate limit's tokens go to the frames in the order they were sent: a ping (answered at
    # once, never refused) sent after a frame held back behind its project's Redis wait does
    # not take that frame's token. With a burst of 4 and the clock stopped: a presence_get of
    # 41 waits for Redis, a second one waits behind it, one of 42 waits, then three pings: the
    # pings are the frames over the limit (executed all the same), no presence_get is refused.

    from tests.support.redis_server import RedisServer, hung

    with RedisServer() as server:
        gateway = await _hung_redis_gateway(
            server, subscribe_timeout=1.0, client_rate=2, client_burst=4, max_subscriptions=2
        )
        gateway.clients.clock = StoppedClock()
        client = await client_for(gateway, [41, 42])
        try:
            with hung(server):
                await client.send({"type": "presence_get", "project_id": 41})
                await client.send({"type": "presence_get", "project_id": 41})
                await client.send({"type": "presence_get", "project_id": 42})
                for _ in range(3):
                    await client.send({"type": "ping"})
                await client.wait_for(lambda: client.count("pong") == 3)
            await client.wait_for(
                lambda: client.count("presence") + client.count("error") == 3, within=5
            )
            assert [m for m in client.of("error") if m["code"] == "rate_limited"] == []
            assert not client.closed.is_set()
        finally:
            await client.close()
            await gateway.drain()


async def test_a_client_that_never_answers_pings_is_dropped_once_reading_resumes():
    # Subscribes of one project, each held back behind the one before, from a client that
    # never answers a ping: the time reading was paused is not counted against it, but once
    # the gateway reads again for good the ping timeout runs, and it is closed with 1011 before
    # its last subscribes are answered. Reading pauses with MAX_BACKLOG (4) messages held back
    # (the 2nd to 5th; the rest unread) and resumes below half: once with the 4th waiting for
    # Redis (the 6th to 8th read, the 9th and 10th left), and for good with the 7th waiting
    # and the 8th to 10th behind it, nothing more to read, so the close comes within
    # ping_timeout + a tick (0.4 s), before the 7th's answer (0.6 s).

    from tests.support.redis_server import RedisServer, hung

    with RedisServer() as server:
        gateway = await _hung_redis_gateway(
            server, subscribe_timeout=0.6, ping_interval=0.1, ping_timeout=0.3
        )
        client = await RawClient.connect(gateway.port, rcvbuf=65536)
        try:
            await client.send({"type": "auth", "token": issue_token(SECRET, "*", ttl=300)})
            with hung(server):
                for _ in range(10):
                    await client.send({"type": "subscribe", "project_id": 41})
                errors, close = [], None
                async with asyncio.timeout(10 * 0.6 + 5):
                    while close is None:
                        opcode, payload = await client.receive()
                        if opcode == 1 and json.loads(payload)["type"] == "error":
                            errors.append(json.loads(payload)["project_id"])
                        elif opcode == 8:
                            close = int.from_bytes(payload[:2], "big")
        finally:
            client.close()
            await gateway.drain()
    assert close == 1011
    assert errors == [41] * 6  # before: closed during the first pause, after one


async def test_failed_authentications_are_counted_each_but_logged_a_few_times_a_minute(gateways):
    from structlog.testing import capture_logs

    gateway = await gateways()
    with capture_logs() as logs:
        for _ in range(30):
            client = await RecordingClient(ws_url(gateway)).connect(auth=False)
            await client.send({"type": "auth", "token": "not-a-jwt"})
            await asyncio.wait_for(client.closed.wait(), 5)
            assert client.close_code == 4001
    assert gateway.metrics.auth_failures_total == 30
    lines = [entry for entry in logs if entry["event"] == "authentication failed"]
    assert len(lines) == gateway.client_log_throttle.burst == 5
    assert all(entry["log_level"] == "info" for entry in lines)


async def test_messages_behind_a_subscribe_that_waits_for_redis_keep_their_order(gateways):
    # A subscribe to a project this pod does not follow yet waits for Redis; what the client sent
    # about that project after it waits behind it, and the answers about each project come in
    # the order of its messages: never an "unsubscribed" before its "subscribed". (A ping waits
    # for nothing: test_cluster_hostile.py shows it answered while a subscribe waits.)
    gateway = await gateways()
    client = await client_for(gateway)
    burst = [
        {"type": "subscribe", "project_id": 7},
        {"type": "unsubscribe", "project_id": 7},
        {"type": "ping"},
        {"type": "subscribe", "project_id": 8},
        *[{"type": "ping"}] * 6,
        {"type": "unsubscribe", "project_id": 8},
    ]
    for message in burst:
        await client.send(message)
    await client.wait_for(lambda: client.count("unsubscribed") == 2)
    answers = [(m["type"], m.get("project_id")) for m in client.messages[1:]]
    assert [a for a in answers if a[1] == 7] == [("subscribed", 7), ("unsubscribed", 7)]
    assert [a for a in answers if a[1] == 8] == [("subscribed", 8), ("unsubscribed", 8)]
    assert answers.count(("pong", None)) == 7
    assert len(answers) == 11
    await client.close()


def _answers(client, since: int) -> list[tuple]:
    """(type, code, project) of what ``client`` received from message ``since`` on."""
    return [(m["type"], m.get("code"), m.get("project_id")) for m in client.messages[since:]]


async def test_a_subscribe_at_the_limit_waits_for_the_unsubscribe_sent_before_it():
    # At --max-subscriptions a page drops a project and subscribes another. The dropped
    # project's unsubscribe is held behind its presence_get, which waits for a hung Redis; the
    # subscribe after it (whose answer depends on it) waits for it too: answered `subscribed`,
    # not `too_many_subscriptions`, as if the frames were handled one after the other.

    from tests.support.redis_server import RedisServer, hung

    with RedisServer() as server:
        gateway = await _hung_redis_gateway(server, subscribe_timeout=0.5, max_subscriptions=2)
        warm = await client_for(gateway, [3])
        await warm.subscribe(3)  # project 3's feed is live: a subscribe of it needs no Redis
        client = await client_for(gateway)
        try:
            await client.subscribe(1)
            await client.subscribe(2)
            since = len(client.messages)
            with hung(server):
                await client.send({"type": "presence_get", "project_id": 1})
                await client.send({"type": "unsubscribe", "project_id": 1})
                await client.send({"type": "subscribe", "project_id": 3})
                await client.wait_for(lambda: len(client.messages) >= since + 3)
            assert _answers(client, since) == [
                ("error", "unavailable", 1),
                ("unsubscribed", None, 1),
                ("subscribed", None, 3),
            ]
        finally:
            await client.close()
            await warm.close()
            await gateway.drain()


async def test_a_token_refresh_waits_for_the_frames_before_it_and_judges_those_after_it():
    # An `auth` sent while a presence_get waits for a hung Redis is handled after it, and what
    # the client sent after the `auth` is judged by the new token: in the order of the frames,
    # the old token's answer, then the refresh (its project dropped), then a subscribe only the
    # new token allows.

    from tests.support.redis_server import RedisServer, hung

    with RedisServer() as server:
        gateway = await _hung_redis_gateway(server, subscribe_timeout=0.5)
        warm = await client_for(gateway, [4])
        await warm.subscribe(4)
        client = await client_for(gateway, [1, 3])
        try:
            await client.subscribe(1)
            since = len(client.messages)
            with hung(server):
                await client.send({"type": "presence_get", "project_id": 1})
                await client.send({"type": "auth", "token": issue_token(SECRET, [3, 4], ttl=300)})
                await client.send({"type": "subscribe", "project_id": 4})
                await client.wait_for(lambda: len(client.messages) >= since + 5)
            assert _answers(client, since) == [
                ("error", "unavailable", 1),
                ("error", "forbidden", 1),
                ("unsubscribed", None, 1),
                ("authenticated", None, None),
                ("subscribed", None, 4),
            ]
        finally:
            await client.close()
            await warm.close()
            await gateway.drain()


@pytest.mark.parametrize("trailer", [b"\xff\xff\xff\xff", b"\x89\x80abcd"])
async def test_bytes_sent_before_the_handshake_answer_are_handled_quietly(
    gateways, caplog, trailer
):
    # Garbage (or a ping) in the same write as the handshake request: a client may not send a
    # frame before the 101. Garbage drops the socket; a valid frame waits for the handshake.
    # Either way nothing is logged as an error, and the socket is released.
    import logging

    gateway = await gateways()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        + trailer
    )
    async with asyncio.timeout(5):
        head = await reader.read(4096)
    writer.close()
    if trailer.startswith(b"\xff"):
        assert head == b""  # dropped
    else:
        assert head.startswith(b"HTTP/1.1 101")
    async with asyncio.timeout(5):
        while gateway.admission.open:  # noqa: ASYNC110 - the server side of the close
            await asyncio.sleep(0.01)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_closed_connection_is_freed_without_waiting_for_the_cycle_collector(gateways):
    # A closed connection leaves no reference cycle (websockets' parser generator, the exception
    # that stopped it, the session and its connection, asyncio's transport on Python 3.11):
    # refcounting frees it at once, so the gateway can run cyclic collections rarely
    # (gateway.__main__.tune_gc).
    import gc

    from websockets.server import ServerProtocol

    from gateway.websocket import WebSocketConnection, WebSocketSession

    gateway = await gateways()
    gc.collect()
    gc.disable()  # what refcounting does not free stays until the collection below
    try:
        for abort in (True, False):  # dropped, then closed cleanly
            client = await client_for(gateway)
            await client.subscribe(1)
            if abort:
                client.ws.transport.abort()
            await client.close()
        async with asyncio.timeout(5):
            while gateway.sessions:  # noqa: ASYNC110 - the server side of the close
                await asyncio.sleep(0.01)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        ours = (WebSocketConnection, WebSocketSession, ServerProtocol)
        left = [o for o in gc.garbage if type(o) in ours or served_transport(o, gateway.port)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


@pytest.mark.parametrize("interval, pong_wait", [(0.2, 0.2), (0.2, 0.5), (0.5, 0.2)])
async def test_a_client_that_never_answers_pings_is_dropped_one_that_does_stays(
    gateways, interval, pong_wait
):
    # Keepalive: a ping unanswered within ping_timeout ends the connection (1011), whatever the
    # interval (a newer ping sent meanwhile does not excuse the older one); a client that
    # answers (websockets does, in its protocol layer) stays connected.
    gateway = await gateways(no_auth=True, ping_interval=interval, ping_timeout=pong_wait)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert (await reader.readline()).startswith(b"HTTP/1.1 101")
    answering = await RecordingClient(ws_url(gateway)).connect(auth=False)
    received = b""
    async with asyncio.timeout(interval + pong_wait + 5):
        while chunk := await reader.read(4096):  # pings, then the close frame, then EOF
            received += chunk
    writer.close()
    assert b"\x88" in received  # a close frame (1011) before the end
    await asyncio.sleep(2 * (interval + pong_wait))
    assert not answering.closed.is_set()
    await answering.close()


async def test_a_compressed_connection_gets_pings_it_can_answer_and_stays(gateways, publisher):
    # The gateway writes its pings itself (not through websockets' protocol): on a connection
    # that negotiated permessage-deflate they must still be plain control frames, which the
    # client's websockets answers, and events keep flowing after them.
    gateway = await gateways(compression=True, ping_interval=0.1, ping_timeout=0.3)
    client = await client_for(gateway, [23])
    await client.subscribe(23)
    await asyncio.sleep(1.0)  # ten keepalive rounds: each pong must arrive within 0.3 s
    await publish(publisher, 23, 2)
    await client.wait_for(lambda: client.seqs(23) == [1, 2])
    assert not client.closed.is_set() and not client.of("error")
    await client.close()


def test_the_gateways_ping_frame_is_what_websockets_would_write():
    from websockets.extensions.permessage_deflate import PerMessageDeflate
    from websockets.frames import Frame, Opcode

    from gateway.websocket import _PING_HEADER

    data = b"\x01\x02\x03\x04"
    for extensions in ([], [PerMessageDeflate(False, False, 15, 15)]):
        expected = Frame(Opcode.PING, data).serialize(mask=False, extensions=extensions)
        assert _PING_HEADER + data == expected


async def test_a_refused_client_that_keeps_sending_is_dropped_after_the_close_timeout(gateways):
    # Refused (4001: no auth in time), the client never closes but keeps sending pings: the
    # close deadline is armed once, not restarted by every read, so the socket (and its place
    # under --max-connections) is released after CLOSE_TIMEOUT.
    from gateway.websocket import CLOSE_TIMEOUT

    gateway = await gateways(auth_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert (await reader.readline()).startswith(b"HTTP/1.1 101")
    loop = asyncio.get_running_loop()
    started = loop.time()
    ping = b"\x89\x80abcd"  # a masked, empty ping
    with contextlib.suppress(ConnectionError):
        while gateway.admission.open and loop.time() - started < CLOSE_TIMEOUT + 5:
            writer.write(ping)
            await asyncio.sleep(0.5)
    writer.close()
    assert gateway.admission.open == 0


async def test_a_close_behind_unsent_frames_to_a_client_that_reads_nothing_frees_its_socket(
    gateways, publisher
):
    """The gateway closes a connection (here its token expires: 4002; a revocation, a drain's
    1012 the same way) while frames it wrote wait unsent, well under --outbound-limit and
    asyncio's write-buffer marks, and the client neither reads nor sends anything more: its
    close frame never goes out, nor does the client's. The socket is dropped CLOSE_TIMEOUT
    after the close, so it does not hold its place in --max-connections for ever."""
    import socket

    from gateway.websocket import CLOSE_TIMEOUT
    from tests.support.gateway_client import publish_until_unsent

    # Nothing else may end it first: a long stall timeout, a limit above what is published.
    gateway = await gateways(outbound_limit=16 * 2**20, stall_timeout=60.0)
    for listener in gateway.server.sockets:  # small kernel buffers: the transport's fills soon
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stalled = await RawClient.connect(gateway.port, rcvbuf=4096)
    try:
        await stalled.send({"type": "auth", "token": issue_token(SECRET, [13], ttl=300)})
        await stalled.send({"type": "subscribe", "project_id": 13})
        async with asyncio.timeout(5):
            while b'"subscribed"' not in (await stalled.receive())[1]:
                pass
        stalled.writer.transport.pause_reading()  # it reads nothing more from here on
        (session,) = gateway.sessions
        transport = session.transport
        await publish_until_unsent(gateway, publisher, 13, transport)
        assert transport.get_write_buffer_size() < 4096  # far under asyncio's high-water mark
        gateway.clients.expire(session)  # what the expiry wheel does at the token's exp
        assert session.closing
        loop = asyncio.get_running_loop()
        closed = loop.time()
        async with asyncio.timeout(CLOSE_TIMEOUT + 5):
            while gateway.admission.open:  # noqa: ASYNC110 - no event to await
                await asyncio.sleep(0.05)
        assert loop.time() - closed >= CLOSE_TIMEOUT * 0.9  # the close deadline, not earlier
        assert not gateway.sessions
    finally:
        stalled.writer.transport.abort()
