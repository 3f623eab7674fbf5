"""The WebSocket fault tests, over SSE: gateway processes killed and drained, a Redis that loses
everything, the pub/sub link dropped, a client that stops reading. Every SSE client resumes with
the ``Last-Event-ID`` the gateway gave it, and its full record is compared with what Redis holds:
every event exactly once, in order, or an allowed ``resync_required``; and every ``id`` it got
was the cursor of what it had just received (:class:`ResumingSseClient` checks that)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket

import pytest

from gateway.sse import CLOSE_TIMEOUT as SSE_CLOSE_TIMEOUT
from gateway.sse import SseParser
from publisher import issue_token
from schemas.events import BlockerResolved, utc_now
from schemas.keys import Keys
from tests.support.gateway_client import SECRET as INPROC_SECRET
from tests.support.gateway_client import publish, publish_until_unsent
from tests.support.gateway_process import GatewayGroup, GatewayProcess
from tests.support.redis_server import RedisServer
from tests.support.sse_client import (
    ResumingSseClient,
    Stream,
    open_stream,
    stream_path,
    untagged,
)
from tests.support.ws_client import (
    Publishers,
    stop_clients,
    verify_clients,
    wait_live,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KEYS = Keys()
SECRET = "fault-tests-secret-of-at-least-32-bytes"


@pytest.fixture
def group():
    with GatewayGroup() as gateways:
        yield gateways


def make_clients(
    pods: list[GatewayProcess], projects: list[int], count: int, *, seed: int, auth: bool = False
) -> list[ResumingSseClient]:
    """``count`` SSE clients over the pods: every other one follows two projects on one stream
    (compound cursors), the others one project."""
    rng = random.Random(seed)
    urls = [pod.http_url for pod in pods]
    clients = []
    for i in range(count):
        followed = rng.sample(projects, 1 + i % 2)
        token = issue_token(SECRET, followed, ttl=600) if auth else None
        clients.append(ResumingSseClient(urls, followed, token=token, start=i, name=f"sse-{i}"))
    return [client.start() for client in clients]


async def test_a_killed_gateway_loses_nothing_over_sse(redis_url: str, group: GatewayGroup):
    projects = list(range(1, 7))
    pods = await asyncio.to_thread(group.start, redis_url, 2)
    clients = make_clients(pods, projects, 16, seed=11)
    publishers = Publishers(redis_url, projects, count=3, rate=100)
    try:
        await wait_live(clients)
        publishers.start()
        await publishers.wait_published(300)
        victim = pods[0]
        orphans = [c for c in clients if c.url == victim.http_url]
        assert orphans
        assert await asyncio.to_thread(victim.kill) == -9
        for client in orphans:
            await client.wait_for(
                lambda c=client: c.url not in (None, victim.http_url) and c.live == set(c.projects),
                20,
                "resumed on the other gateway",
            )
        await publishers.wait_published(300)
        await publishers.stop()
        await verify_clients(clients, redis_url, keys=KEYS)
    finally:
        await publishers.stop()
        await stop_clients(clients)
    assert all(c.stats.connects >= 2 for c in orphans)


async def test_a_rolling_restart_loses_nothing_over_sse(redis_url: str, group: GatewayGroup):
    """SIGTERM each gateway in turn: its streams end with ``close`` 1012, the clients resume on
    the other one with Last-Event-ID and miss nothing."""
    projects = list(range(1, 7))
    pods = await asyncio.to_thread(
        group.start, redis_url, 2, auth_secret=SECRET, args=["--drain-timeout", "5"]
    )
    clients = make_clients(pods, projects, 12, seed=12, auth=True)
    publishers = Publishers(redis_url, projects, count=2, rate=100)
    try:
        await wait_live(clients)
        publishers.start()
        for pod in pods:
            await publishers.wait_published(150)
            moved = [c for c in clients if c.url == pod.http_url]
            assert moved
            assert await asyncio.to_thread(pod.terminate) == 0
            for client in moved:
                await client.wait_for(
                    lambda c=client, gone=pod.http_url: (
                        c.url not in (None, gone) and c.live == set(c.projects)
                    ),
                    20,
                    "resumed on the other gateway",
                )
                assert 1012 in client.stats.close_codes
            await asyncio.to_thread(pod.start)
        await publishers.wait_published(150)
        await publishers.stop()
        await verify_clients(clients, redis_url, keys=KEYS)
    finally:
        await publishers.stop()
        await stop_clients(clients)


async def test_redis_restarted_empty_gives_resync_then_exactly_once_over_sse(group: GatewayGroup):
    projects = list(range(1, 4))
    with RedisServer() as server:
        url = server.url
        pods = await asyncio.to_thread(group.start, url, 2, args=["--probe-interval", "1"])
        clients = make_clients(pods, projects, 8, seed=13)
        publishers = Publishers(url, projects, count=2, rate=60)
        try:
            await wait_live(clients)
            publishers.start()
            await publishers.wait_published(100)
            await asyncio.to_thread(server.kill)
            await wait_until(lambda: publishers.unavailable > 0, 20, "a publisher to fail")
            await asyncio.to_thread(server.start)
            for pod in pods:
                await asyncio.to_thread(pod.wait_ready, 20)
            await publishers.wait_published(150)
            await publishers.stop()
            await verify_clients(clients, url, keys=KEYS, allowed_resyncs={"epoch_changed"})
        finally:
            await publishers.stop()
            await stop_clients(clients)
    for client in clients:
        for project_id in client.projects:
            reasons = [r.reason for r in client.resyncs(project_id)]
            assert reasons and set(reasons) == {"epoch_changed"}, (client.name, reasons)


# --- in-process gateways ---------------------------------------------------------------------


def _auth(projects, **extra) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(INPROC_SECRET, projects, ttl=300)}", **extra}


async def _seqs(stream: Stream, count: int) -> list[int]:
    out = []
    while len(out) < count:
        item = await stream.next(within=10)
        assert item is not None, f"the stream ended after {out}"
        if item.event == "message":
            out.append(json.loads(item.data)["seq"])
    return out


async def test_killing_the_pubsub_connection_loses_nothing_over_sse(
    gateways, publisher, redis_client
):
    gateway = await gateways(reconcile_interval=60)
    url = f"http://127.0.0.1:{gateway.port}"
    _, _, single = await open_stream(url, "/v1/projects/8/stream", _auth([8]))
    _, _, multi = await open_stream(url, "/v1/stream?project=8&project=9", _auth([8, 9]))
    await single.until("subscribed")
    await multi.until("subscribed")
    await multi.until("subscribed")
    await publish(publisher, 8, 10)
    for _ in range(3):
        redis_client.client_kill_filter(_type="pubsub")
        # Published while the link is down or resubscribing: only the stream has them.
        await publish(publisher, 8, 10)
        await publish(publisher, 9, 10)
        await asyncio.sleep(0.05)
    assert await _seqs(single, 40) == list(range(1, 41))
    got: dict[int, list[int]] = {8: [], 9: []}
    while len(got[8]) < 40 or len(got[9]) < 30:
        item = await multi.next(within=10)
        assert item is not None
        if item.event == "message":
            frame = json.loads(item.data)
            got[frame["project_id"]].append(frame["seq"])
            assert f"{frame['project_id']}=" in item.id
    assert got == {8: list(range(1, 41)), 9: list(range(1, 31))}
    single.close()
    multi.close()


async def test_a_stream_that_stops_reading_is_cut_and_resumes_with_nothing_lost(
    gateways, publisher
):
    gateway = await gateways(outbound_limit=64 * 1024, stall_timeout=1.0, max_replay=2000)
    url = f"http://127.0.0.1:{gateway.port}"
    _, _, healthy = await open_stream(url, "/v1/projects/11/stream", _auth([11]))
    subscribed = json.loads((await healthy.until("subscribed"))[-1].data)
    # A raw stream with a tiny receive window that reads its head, then nothing more.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**22)
    token = issue_token(INPROC_SECRET, [11], ttl=300)
    writer.write(
        f"GET /v1/projects/11/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    await wait_until(lambda: len(gateway.sessions) == 2 and gateway.hub.subscriptions == 2, 5, "")
    # It stops reading from its socket: its stream reader (a 4 MiB limit, on this test's own
    # event loop) would otherwise go on taking most of the 7 MB, and it might never stall.
    writer.transport.pause_reading()
    total = 1500  # ~7 MB: beyond the limit and whatever the kernel buffers hold
    healthy_seqs = asyncio.create_task(_seqs(healthy, total))  # it keeps reading meanwhile
    await publisher.publish_many(
        BlockerResolved(project_id=11, blocker_id=n + 1, answer="x" * 4900, resolved_at=utc_now())
        for n in range(total)
    )
    await wait_until(
        lambda: gateway.metrics.slow_consumer_disconnects_total == 1, 10, "the stalled cut"
    )
    assert await healthy_seqs == list(range(1, total + 1))
    assert len(gateway.sessions) == 1
    writer.close()
    # It comes back with the cursor it had (it had seen nothing) and loses nothing.
    last_id = f"{subscribed['epoch']}:0"
    _, _, back = await open_stream(
        url, "/v1/projects/11/stream", _auth([11], **{"Last-Event-ID": last_id})
    )
    head = await back.until("subscribed")
    seqs = [json.loads(e.data)["seq"] for e in head if e.event == "message"]
    assert seqs == list(range(1, total + 1))
    assert json.loads(head[-1].data)["resumed"] is True
    healthy.close()
    back.close()


@pytest.mark.parametrize(
    ("projects", "limit"),
    [([31], 16 * 1024), (list(range(32, 42)), 2**20)],
    ids=["one_project", "ten_projects"],
)
async def test_a_resume_read_slowly_is_not_taken_for_a_slow_consumer(
    gateways, publisher, projects, limit
):
    """A stream resumed far behind (a replay of 1,000 events per project) by a client that reads
    it slowly (nothing for 2.5 s, a small receive window) gets all of it, as a WebSocket
    resuming from the same cursor does: the replay's bytes are tolerated on top of
    --outbound-limit. Before, that allowance was the size of the events' WebSocket frames, not
    of the stream's bytes, which are larger (``data:`` and ``id:`` lines per event, and on a
    stream of several projects every project's cursor in each ``id``): the stream was cut as a
    slow consumer (no ``close``, the connection reset) in the middle of its replay, here with
    the default limit on a stream of ten projects."""
    gateway = await gateways(outbound_limit=limit, stall_timeout=30.0)
    url = f"http://127.0.0.1:{gateway.port}"
    path = stream_path(projects)
    _, _, stream = await open_stream(url, path, _auth(projects))
    head: list = []
    for _ in projects:
        head += await stream.until("subscribed")
    last_id = head[-1].id
    stream.close()
    total = 1000
    for project_id in projects:
        await publisher.publish_many(
            BlockerResolved(project_id=project_id, blocker_id=n, answer="x" * 100, resolved_at=now)
            for n, now in ((n, utc_now()) for n in range(1, total + 1))
        )
    for listener in gateway.server.sockets:  # small kernel buffers: the transport's fills
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", gateway.port))
        token = issue_token(INPROC_SECRET, projects, ttl=300)
        await loop.sock_sendall(
            sock,
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Last-Event-ID: {last_id}\r\n\r\n".encode(),
        )
        await asyncio.sleep(2.5)  # reads nothing: the stall check looks at least twice
        received = b""
        events: list = []
        parser = None
        async with asyncio.timeout(20):
            while sum(e.event == "subscribed" for e in events) < len(projects):
                chunk = await loop.sock_recv(sock, 65536)
                assert chunk, f"the stream ended: {[e for e in events if e.event != 'message']}"
                if parser is None:
                    received += chunk
                    head_end = received.find(b"\r\n\r\n")
                    if head_end < 0:
                        continue
                    parser, chunk = SseParser(), received[head_end + 4 :]
                events += parser.feed(chunk)
    finally:
        sock.close()
    assert gateway.metrics.slow_consumer_disconnects_total == 0
    seqs: dict[int, list[int]] = {p: [] for p in projects}
    for item in events:
        if item.event == "message":
            message = json.loads(item.data)
            seqs[message["project_id"]].append(message["seq"])
    assert seqs == {p: list(range(1, total + 1)) for p in projects}


# Not on uvloop: the same code runs there, but its socket takes the event whole into the kernel
# here, so nothing is left over the limit in the transport's buffer to find.
@pytest.mark.asyncio_loop_only
async def test_a_stream_cut_as_a_slow_consumer_is_counted_whatever_write_finds_it_over(
    gateways, publisher
):
    """An event larger than --outbound-limit is written behind the few bytes waiting in a
    stream's buffer (a write is checked against the limit before it, not after); what is
    written next finds the buffer over the limit, and the stream is cut as a slow consumer,
    counted in ``eventbus_slow_consumer_disconnects_total``. Before, when that next write was the
    stream's keepalive comment (every --sse-keepalive-interval, more often than the
    once-a-second stall check), the cut was not counted: an operator saw streams cut, and
    resuming, without the metric that says why."""
    gateway = await gateways(outbound_limit=1024, stall_timeout=30.0, sse_keepalive_interval=0.05)
    for listener in gateway.server.sockets:  # small kernel buffers: the transport's fills
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    loop = asyncio.get_running_loop()
    sock = socket.socket()  # never read past the head
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", gateway.port))
        token = issue_token(INPROC_SECRET, [22], ttl=300)
        await loop.sock_sendall(
            sock,
            f"GET /v1/projects/22/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}"
            "\r\n\r\n".encode(),
        )
        await wait_until(lambda: gateway.hub.subscriptions == 1, 5, "the subscription")
        (session,) = gateway.sessions
        # The kernel's buffers full, a few hundred bytes waiting in the transport's, under the
        # limit: the next event is written behind them, and takes the buffer over the limit.
        await publish_until_unsent(gateway, publisher, 22, session.transport)
        assert gateway.metrics.slow_consumer_disconnects_total == 0
        await publisher.publish(
            BlockerResolved(project_id=22, blocker_id=1, answer="x" * 5000, resolved_at=utc_now())
        )
        await wait_until(lambda: not gateway.sessions, 5, "the cut")
        assert gateway.metrics.slow_consumer_disconnects_total == 1
    finally:
        sock.close()


@pytest.mark.parametrize("ping_timeout", [1.0, 30.0])
async def test_a_stream_closed_while_its_client_reads_nothing_still_frees_its_socket(
    gateways, publisher, ping_timeout
):
    """The gateway ends a stream (here its token expires: 4002; a revocation, 1011 or a drain
    close it the same way) while what it wrote last waits unsent in the transport's buffer,
    the client's receive window closed, and the client reads and sends nothing more. That
    close waits for the buffer to drain, and the stall check no longer looks at a closing
    stream: the socket would hold its place in --max-connections for ever. The kernel ends it
    instead, once nothing could be sent for --ping-timeout (``TCP_USER_TIMEOUT``, which covers
    a closed receive window as it covers unacknowledged bytes, on Linux 5.11 and later), and
    the gateway aborts it CLOSE_TIMEOUT after the close whatever the kernel does (a long
    --ping-timeout, another platform)."""
    # Nothing else may end it first: a long stall timeout, a limit above what is published.
    gateway = await gateways(
        outbound_limit=16 * 2**20, stall_timeout=60.0, ping_timeout=ping_timeout, max_replay=2000
    )
    for listener in gateway.server.sockets:  # small kernel buffers: the transport's fills soon
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    loop = asyncio.get_running_loop()
    sock = socket.socket()  # a bare socket: never read past the head (no stream reader)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", gateway.port))
        token = issue_token(INPROC_SECRET, [12], ttl=300)
        await loop.sock_sendall(
            sock,
            f"GET /v1/projects/12/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}"
            "\r\n\r\n".encode(),
        )
        await wait_until(lambda: gateway.hub.subscriptions == 1, 5, "the subscription")
        (session,) = gateway.sessions
        transport = session.transport
        await publish_until_unsent(gateway, publisher, 12, transport)
        assert 0 < transport.get_write_buffer_size() < 4096
        gateway.clients.expire(session)  # what the expiry wheel does at the token's exp
        assert session.closing and transport.is_closing()
        closed = loop.time()
        bound = min(ping_timeout, SSE_CLOSE_TIMEOUT) + 3
        await wait_until(lambda: session not in gateway.sessions, bound, "the close")
        assert loop.time() - closed < bound
        assert gateway.admission.open == 0  # its place in --max-connections is free again
    finally:
        sock.close()


# --- a peer that vanishes without a FIN or RST -----------------------------------------------

#: The SSE client run inside the namespace: it opens a stream, says "ready" once subscribed,
#: then reads (and so acknowledges) keepalive comments until it is killed.
_VANISHING_CLIENT = """
import socket, sys
host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sock = socket.create_connection((host, port), timeout=10)
sock.sendall(f"GET /v1/projects/21/stream HTTP/1.1\\r\\nHost: x\\r\\n"
             f"Authorization: Bearer {token}\\r\\n\\r\\n".encode())
seen = b""
while b"event: subscribed" not in seen:
    chunk = sock.recv(65536)
    if not chunk:
        sys.exit("the stream ended")
    seen += chunk
print("ready", flush=True)
sock.settimeout(None)
while sock.recv(65536):
    pass
"""


@pytest.fixture
def veth_peer():
    """A network namespace behind a veth pair (tests/support/netns.py), always removed. Not
    skipped where ``ip netns`` fails: CI runs as root, and the fault it reproduces matters."""
    from tests.support.netns import VethPeer

    with VethPeer() as peer:
        yield peer


async def test_a_stream_whose_peer_vanished_is_dropped_after_the_ping_timeout(
    gateways, publisher, veth_peer
):
    """A client in another network namespace opens a stream; its link is cut, then it is
    SIGKILLed, so no FIN or RST ever reaches the gateway (a partition, a crashed machine). Its
    keepalive comments are sent but never acknowledged, which the stall check (unsent bytes)
    never sees: the kernel would retransmit for ~15 minutes. TCP_USER_TIMEOUT (--ping-timeout)
    ends the stream within the next keepalive plus the ping timeout; a healthy stream on the
    same gateway is untouched."""
    import os
    import signal
    import sys

    keepalive, ping_timeout = 0.2, 1.0
    gateway = await gateways(
        host=veth_peer.host_address, sse_keepalive_interval=keepalive, ping_timeout=ping_timeout
    )
    url = f"http://{veth_peer.host_address}:{gateway.port}"
    _, _, healthy = await open_stream(url, "/v1/projects/21/stream", _auth([21]))
    await healthy.until("subscribed")
    (control,) = gateway.sessions
    token = issue_token(INPROC_SECRET, [21], ttl=300)
    argv = [sys.executable, "-c", _VANISHING_CLIENT, veth_peer.host_address, str(gateway.port)]
    client = await asyncio.create_subprocess_exec(
        *veth_peer.command(*argv, token), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert await asyncio.wait_for(client.stdout.readline(), 10) == b"ready\n"
        (victim,) = [s for s in gateway.sessions if s is not control]
        await asyncio.sleep(3 * keepalive)  # healthy: its keepalives are acknowledged
        assert victim in gateway.sessions
        loop = asyncio.get_running_loop()
        cut = loop.time()
        await asyncio.to_thread(veth_peer.cut)
        os.kill(client.pid, signal.SIGKILL)  # its FIN or RST goes nowhere
        assert await client.wait() == -signal.SIGKILL
        bound = keepalive + ping_timeout + 2.0  # the next comment, its timeout, RTO and slack
        await wait_until(lambda: victim not in gateway.sessions, bound, "the vanished stream")
        assert loop.time() - cut >= ping_timeout * 0.9  # ended by the timeout, not by the cut
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    assert victim.closing and gateway.admission.open == 1
    assert gateway.hub.subscriptions == 1
    # The healthy stream carries on: keepalives only, then the next event.
    await publish(publisher, 21, 1)
    events = [e for e in await healthy.until("message") if e.event == "message"]
    assert [json.loads(e.data)["seq"] for e in events] == [1]
    assert list(gateway.sessions) == [control]
    healthy.close()


# --- one project's garbage on a stream of several ---------------------------------------------


@pytest.mark.parametrize("presence", [False, True], ids=["events", "presence"])
@pytest.mark.parametrize("when", ["before_open", "while_live"])
async def test_a_garbage_project_leaves_the_others_of_its_stream_live(
    group: GatewayGroup, redis_url: str, publisher, redis_client, when: str, presence: bool
):
    """A stream of three projects on a gateway process; project 72's metadata in Redis is
    overwritten with garbage (not written by the event bus), before the stream opens (its
    subscribe is refused) or while it is live (the periodic check ends its subscription,
    ``ended``). 72 gets its ``error`` ``unavailable``; the stream goes on: the events of 71 and
    73 published after it arrive on the same stream, in order, exactly once, their ids still
    naming 72's last cursor. Once 72 is repaired, a stream reopened from the last id resumes
    every project exactly: 72's events from where it stopped, nothing of 71 and 73 again.
    With ``?presence=1`` nothing of 72's presence comes after its ``error``. (All with
    ``?partial=1``, the client's word that it polls a failed project itself.)"""
    (pod,) = group.start(redis_url, 1, args=["--reconcile-interval", "0.2"])
    projects, bad = (71, 72, 73), 72
    path = stream_path(projects) + "&partial=1" + ("&presence=1" if presence else "")
    for project_id in projects:
        await publish(publisher, project_id, 2)
    meta = KEYS.meta(bad)
    saved = redis_client.hgetall(meta)
    start = ",".join(f"{p}={redis_client.hget(KEYS.meta(p), 'epoch').decode()}:2" for p in projects)
    if when == "before_open":
        redis_client.hset(meta, "seq", "garbage")
    _, _, stream = await open_stream(pod.http_url, path, {"Last-Event-ID": start})
    head = []
    while sum(e.event in ("subscribed", "error") for e in head) < 3:
        item = await stream.next(within=10)
        assert item is not None, head
        head.append(item)
    if when == "while_live":
        assert [e.event for e in head].count("subscribed") == 3
        await publish(publisher, bad, 2)  # 72's events before the garbage: 3, 4
        assert await _seqs(stream, 2) == [3, 4]
        saved = redis_client.hgetall(meta)
        redis_client.hset(meta, "seq", "garbage")
        head += await stream.until("error", within=10)
    errors = [json.loads(e.data) for e in head if e.event == "error"]
    assert [(e["code"], e["project_id"]) for e in errors] == [("unavailable", bad)]
    if when == "while_live":
        assert errors[0]["ended"] is True
    top = 4 if when == "while_live" else 2
    bad_cursor = re.search(rf"{bad}=([^,]+)", head[-1].id).group(1)
    assert untagged(bad_cursor).split(":")[1] == str(top)
    # The others go on, on the same stream: every event once, in order, nothing else.
    await publish(publisher, 71, 3)
    await publish(publisher, 73, 2)
    got: dict[int, list[int]] = {71: [], 73: []}
    last_id = None
    while len(got[71]) < 3 or len(got[73]) < 2:
        item = await stream.next(within=10)
        assert item is not None, got
        frame = json.loads(item.data)
        if presence and item.event in ("presence", "presence_diff"):
            assert frame["project_id"] != bad, item  # its presence ended with its subscription
            continue
        assert item.event == "message", item
        got[frame["project_id"]].append(frame["seq"])
        last_id = item.id
        assert f"{bad}={bad_cursor}" in item.id  # the failed project's cursor, kept
    assert got == {71: [3, 4, 5], 73: [3, 4]}
    stream.close()
    # Repaired: reopened from the last id, every project resumes exactly.
    redis_client.delete(meta)
    redis_client.hset(meta, mapping=saved)
    await publish(publisher, bad, 1)
    await publish(publisher, 71, 1)
    _, _, stream = await open_stream(pod.http_url, path, {"Last-Event-ID": last_id})
    reopened = []
    while sum(e.event == "subscribed" for e in reopened) < 3:
        item = await stream.next(within=10)
        assert item is not None and item.event != "error", reopened
        reopened.append(item)
    replayed = [
        (json.loads(e.data)["project_id"], json.loads(e.data)["seq"])
        for e in reopened
        if e.event == "message"
    ]
    assert sorted(replayed) == [(71, 6), (bad, top + 1)]
    stream.close()


async def test_a_garbage_project_ends_a_stream_that_did_not_ask_partial(
    group: GatewayGroup, redis_url: str, publisher, redis_client
):
    """Without ``?partial=1`` (an older eventbus.js, a bare ``EventSource``: clients that do not
    poll a project whose subscription failed), the first failure ends the stream with 1011, as
    it always did: its client reopens it, or polls, and is never left silent on that project
    while the stream stays open for the others."""
    (pod,) = group.start(redis_url, 1)
    for project_id in (74, 75):
        await publish(publisher, project_id, 1)
    redis_client.hset(KEYS.meta(75), "seq", "garbage")
    _, _, stream = await open_stream(pod.http_url, stream_path([74, 75]), {})
    rest = await stream.rest(within=10)
    errors = [json.loads(e.data) for e in rest if e.event == "error"]
    assert [(e["code"], e["project_id"]) for e in errors] == [("unavailable", 75)]
    assert rest[-1].event == "close" and json.loads(rest[-1].data)["code"] == 1011
