"""HTTP on the gateway's port: health, readiness, metrics, the browser client, polling."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import struct
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.websocket import CLOSE_TIMEOUT
from publisher import issue_token
from schemas.events import BlockerResolved, utc_now
from tests.support.gateway_client import (
    REQUIRED_METRICS,
    SECRET,
    hold_reads,
    publish,
    start_gateway,
)
from tests.support.redis_server import RedisServer, hung
from tests.support.ws_client import wait_until

ROOT = Path(__file__).resolve().parents[1]


async def request(
    port: int, path: str, *, method: str = "GET", headers: dict | None = None
) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, body


def bearer(projects) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(SECRET, projects)}"}


async def test_healthz_and_readyz(gateways):
    gateway = await gateways()
    status, _, body = await request(gateway.port, "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, _, body = await request(gateway.port, "/readyz")
    assert status == 200
    assert json.loads(body) == {
        "ready": True,
        "checks": {"redis": True, "pubsub": True, "not_draining": True, "revocations": True},
    }


async def test_readyz_fails_while_redis_is_down_and_recovers():
    with RedisServer() as server:
        gateway = await start_gateway(
            server.url, auth_secret=None, no_auth=True, probe_interval=0.2, probe_timeout=0.2
        )
        try:
            server.kill()
            status, _, body = await request(gateway.port, "/readyz")
            assert status == 503 and json.loads(body)["checks"]["redis"] is False
            server.start()
            async with asyncio.timeout(15):
                while (await request(gateway.port, "/readyz"))[0] != 200:  # noqa: ASYNC110 - an HTTP poll
                    await asyncio.sleep(0.1)
        finally:
            await gateway.drain()


async def test_a_flood_of_readiness_probes_costs_redis_one_ping_at_a_time():
    """``/readyz`` is on the public port: anyone can ask it, as often as they like. Each request
    sent Redis a PING of its own, on a connection of the pool the history reads use (redis-py's
    limit, 100): 300 at once opened 100 connections to Redis, and past them the pool refused
    with "Too many connections". The probes answered 503 (a load balancer takes a ready pod
    out) and the polls made meanwhile 503 ``unavailable``. Concurrent probes now share one
    PING: every probe and every poll is answered 200, and Redis sees a handful of connections.
    A gateway process, so that the requests, all written before any is read, arrive together."""
    import redis.asyncio

    from tests.support.gateway_process import GatewayProcess

    paths = ["/readyz"] * 300 + ["/v1/projects/1/events"] * 20
    with RedisServer() as server, GatewayProcess(server.url) as gateway:
        gateway.start()
        direct = redis.asyncio.Redis.from_url(server.url)
        try:
            clients_before = (await direct.info("clients"))["connected_clients"]
            streams = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in paths]
            for (_, writer), path in zip(streams, paths, strict=True):
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            async with asyncio.timeout(20):
                answers = await asyncio.gather(*(reader.read() for reader, _ in streams))
            for _, writer in streams:
                writer.close()
            statuses = [int(answer.split(b" ", 2)[1]) for answer in answers]
            assert statuses[:300] == [200] * 300, answers[statuses.index(503)][-200:]
            assert statuses[300:] == [200] * 20, answers[300 + statuses[300:].index(503)][-200:]
            opened = (await direct.info("clients"))["connected_clients"] - clients_before
            assert opened <= 5, f"{opened} more connections to Redis"
        finally:
            await direct.aclose()


async def test_metrics_are_prometheus_text(gateways, publisher):
    gateway = await gateways()
    await publish(publisher, 1, 3)
    status, headers, body = await request(gateway.port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = body.decode()
    for name in REQUIRED_METRICS:
        exported = f"{name}_bucket" if name.endswith("_seconds") else name  # a histogram
        assert f"\n{exported}" in "\n" + text, name
    for line in text.splitlines():
        assert line.startswith("#") or len(line.split()) == 2, line


async def test_every_metric_the_gateway_exports_is_in_the_operations_table(gateways) -> None:
    """An operator learns what a metric means from docs/operations.md: one exported and not
    listed there (a counter added without its row) is one nobody can read."""
    gateway = await gateways()
    _, _, body = await request(gateway.port, "/metrics")
    exported = {
        line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE ")
    }
    operations = (ROOT / "docs" / "operations.md").read_text()
    listed = set(re.findall(r"`(eventbus_[a-z_]+)(?:\{[a-z]+\})?`", operations))
    assert exported and exported - listed == set()


async def test_serves_the_browser_client(gateways):
    gateway = await gateways()
    status, headers, body = await request(gateway.port, "/eventbus.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert b"export" in body
    status, _, _ = await request(gateway.port, "/eventbus.d.ts")
    assert status == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nope", 404), ("DELETE", "/healthz", 405), ("POST", "/v1/projects/1/events", 405)],
)
async def test_unknown_routes_and_methods(gateways, method, path, status):
    gateway = await gateways()
    got, headers, body = await request(gateway.port, path, method=method)
    assert got == status and headers["content-type"] == "application/json"
    assert "error" in json.loads(body)


async def test_polling_pages_through_events_after_a_cursor(gateways, publisher):
    gateway = await gateways()
    await publish(publisher, 2, 25)
    status, _, body = await request(gateway.port, "/v1/projects/2/events", headers=bearer([2]))
    assert status == 200
    start = json.loads(body)
    assert start["seq"] == 25 and start["events"] == [] and start["resync_required"] is None
    epoch, after, seen = start["epoch"], 0, []
    while True:
        status, _, body = await request(
            gateway.port,
            f"/v1/projects/2/events?epoch={epoch}&after={after}&limit=10",
            headers=bearer([2]),
        )
        page = json.loads(body)
        seen += [e["seq"] for e in page["events"]]
        after = page["events"][-1]["seq"] if page["events"] else after
        if not page["more"]:
            break
    assert seen == list(range(1, 26))
    assert page["events"][0]["type"] == "blocker_resolved"


async def test_a_poll_page_of_large_events_is_bounded_in_bytes_and_pages_on(gateways, publisher):
    """A page carries at most 1 MiB of stored events (docs/protocol.md), whatever ``limit``
    allows: 1,000 events of 15 KB would be a 15 MB answer, held in the gateway about three
    times over while it is answered, for every such poll at once. Cut short by bytes, the answer
    says ``more`` as when ``limit`` is reached, and paging on gets every event once, in order."""
    gateway = await gateways()
    events = [
        BlockerResolved(project_id=11, blocker_id=n, answer="€" * 5000, resolved_at=utc_now())
        for n in range(1, 301)
    ]
    for start in range(0, len(events), 100):
        await publisher.publish_many(events[start : start + 100])
    _, _, body = await request(gateway.port, "/v1/projects/11/events", headers=bearer([11]))
    epoch, after, seen, pages = json.loads(body)["epoch"], 0, [], 0
    while True:
        status, _, body = await request(
            gateway.port,
            f"/v1/projects/11/events?epoch={epoch}&after={after}&limit=1000",
            headers=bearer([11]),
        )
        assert status == 200 and len(body) <= 2**20 + 1024, len(body)
        page = json.loads(body)
        assert page["resync_required"] is None and page["events"]
        pages += 1
        seen += [e["seq"] for e in page["events"]]
        after = seen[-1]
        assert page["more"] == (after < 300)
        if not page["more"]:
            break
    assert seen == list(range(1, 301))
    assert pages == 5  # 300 events of ~15 KB: about 69 a page


async def test_polling_with_a_foreign_epoch_says_resync(gateways, publisher):
    gateway = await gateways()
    await publish(publisher, 3, 2)
    status, _, body = await request(
        gateway.port, "/v1/projects/3/events?epoch=old&after=1", headers=bearer([3])
    )
    page = json.loads(body)
    assert status == 200 and page["events"] == []
    assert page["resync_required"]["reason"] == "epoch_changed"
    assert page["resync_required"]["seq"] == 2


@pytest.mark.parametrize(
    ("path", "headers", "status", "error"),
    [
        ("/v1/projects/4/events", {}, 401, "missing_token"),
        ("/v1/projects/4/events", {"Authorization": "Bearer nope"}, 401, "invalid_token"),
        ("/v1/projects/4/events", {"Authorization": "Basic abc"}, 401, "missing_token"),
        ("/v1/projects/4/events", "other-project", 403, "forbidden"),
        ("/v1/projects/x/events", "ok", 400, "invalid_project"),
        ("/v1/projects/0/events", "ok", 400, "invalid_project"),
        ("/v1/projects/" + "9" * 5000 + "/events", {}, 400, "invalid_project"),
        ("/v1/projects/4/events?after=3", "ok", 400, "invalid_query"),
        ("/v1/projects/4/events?epoch=e&after=-1", "ok", 400, "invalid_query"),
        # Beyond 2**53 - 1, the protocol's largest seq (a subscribe's ``after`` is refused too).
        ("/v1/projects/4/events?epoch=e&after=9007199254740992", "ok", 400, "invalid_query"),
        ("/v1/projects/4/events?limit=5000", "ok", 400, "invalid_query"),
        ("/v1/projects/4/events?bogus=1", "ok", 400, "invalid_query"),
    ],
)
async def test_polling_rejects_bad_requests_clearly(gateways, path, headers, status, error):
    """Each refusal is the client's mistake: a 4xx, counted as the same mistake is on a stream
    (400 bad_requests_total, 401 auth_failures_total, 403 client_errors_total), never logged
    as an error."""
    gateway = await gateways()
    if headers == "ok":
        headers = bearer([0 + 4] if "/4/" in path else "*")
    elif headers == "other-project":
        headers = bearer([5])
    counters = ("bad_requests_total", "auth_failures_total", "client_errors_total")
    before = {name: getattr(gateway.metrics, name) for name in counters}
    got, _, body = await request(gateway.port, path, headers=headers)
    assert got == status
    assert json.loads(body)["error"] == error
    counted = {400: "bad_requests_total", 401: "auth_failures_total", 403: "client_errors_total"}
    after = {name: getattr(gateway.metrics, name) for name in counters}
    assert after == {**before, counted[status]: before[counted[status]] + 1}


async def test_a_refused_poll_is_logged_at_info_with_its_reason_status_and_peer(gateways):
    """A poll refused for the client's mistake is one info line (never a warning: the client's
    mistake, not the gateway's) saying why, with the status and the client's address, as a
    refused handshake is. Before, it was counted only: a refusal in a group's totals that no
    worker's log showed (tests/test_workers.py's diagnostic)."""
    from structlog.testing import capture_logs

    gateway = await gateways()
    with capture_logs() as logs:
        status, _, _ = await request(
            gateway.port, "/v1/projects/4/events?epoch=x&after=nope", headers=bearer([4])
        )
    assert status == 400
    (line,) = [entry for entry in logs if entry["event"] == "poll refused"]
    assert line["log_level"] == "info"
    assert line["error"] == "invalid_query" and line["status"] == 400
    assert line["reason"].startswith("after must be")
    assert re.fullmatch(r"127\.0\.0\.1:\d+", line["peer"])
    assert "suppressed" not in line


async def test_a_burst_of_refused_polls_logs_a_few_lines_then_how_many_were_dropped(gateways):
    """Anyone can send refused polls as fast as they like: each is counted, a few a minute per
    kind are logged, and the next line logged says how many were dropped meanwhile."""
    from structlog.testing import capture_logs

    from serverkit import LogThrottle

    gateway = await gateways()
    now = [0.0]
    gateway.client_log_throttle = LogThrottle(clock=lambda: now[0])
    failures = gateway.metrics.auth_failures_total
    with capture_logs() as logs:
        for _ in range(30):
            assert (await request(gateway.port, "/v1/projects/4/events"))[0] == 401
        now[0] += gateway.client_log_throttle.interval
        assert (await request(gateway.port, "/v1/projects/4/events"))[0] == 401
    assert gateway.metrics.auth_failures_total == failures + 31
    lines = [entry for entry in logs if entry["event"] == "poll refused"]
    assert len(lines) == gateway.client_log_throttle.burst + 1 == 6
    assert all(entry["log_level"] == "info" for entry in lines)
    assert all(entry["error"] == "missing_token" for entry in lines)
    assert [entry.get("suppressed") for entry in lines] == [None] * 5 + [25]


async def test_a_handshake_refused_for_its_bearer_token_is_logged_at_info(gateways):
    """A WebSocket handshake refused 401 for its ``Authorization`` header: one info line, as a
    refused poll or stream (before, counted only)."""
    from structlog.testing import capture_logs

    gateway = await gateways()
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
        "Authorization": "Bearer nope",
    }
    with capture_logs() as logs:
        status, _, _ = await request(gateway.port, "/", headers=upgrade)
    assert status == 401
    (line,) = [entry for entry in logs if entry["event"] == "handshake refused"]
    assert line["log_level"] == "info"
    assert (line["error"], line["status"]) == ("invalid_token", 401)
    assert line["reason"].startswith("invalid token")
    assert re.fullmatch(r"127\.0\.0\.1:\d+", line["peer"])


async def test_a_poll_whose_token_expires_while_its_page_is_read_gets_401(
    gateways, publisher, monkeypatch
):
    """A poll's token is checked when it arrives; its page is read from Redis after (up to
    --subscribe-timeout on a slow Redis). A token whose ``exp`` passes meanwhile gets the 401
    "token expired" of a poll that arrives with it then, as a WebSocket or a stream is closed
    at its ``exp`` (the same clock judges both): before, the page was answered (200, the
    events) after the token had expired."""
    gateway = await gateways()
    await publish(publisher, 4, 1)
    now = [time.time()]
    gateway.clients.expiry.clock = lambda: now[0]
    token = issue_token(SECRET, [4], ttl=60)
    reading, release = hold_reads(gateway, monkeypatch)
    failures, polls = gateway.metrics.auth_failures_total, gateway.metrics.polls_total
    headers = {"Authorization": f"Bearer {token}"}
    answer = asyncio.create_task(request(gateway.port, "/v1/projects/4/events", headers=headers))
    await asyncio.wait_for(reading.wait(), 5)
    now[0] += 61  # past exp (a whole second after the mint's)
    release.set()
    status, got, body = await answer
    assert (status, json.loads(body)) == (
        401,
        {"error": "invalid_token", "message": "token expired"},
    )
    assert got["www-authenticate"] == "Bearer"
    assert gateway.metrics.auth_failures_total == failures + 1
    assert gateway.metrics.polls_total == polls
    # A poll that arrives before exp and is answered before it is answered.
    now[0] -= 61
    status, _, body = await request(gateway.port, "/v1/projects/4/events", headers=headers)
    assert status == 200 and json.loads(body)["seq"] == 1


async def test_a_poll_with_a_token_past_its_exp_is_refused_without_a_read(gateways):
    """The gateway takes a token up to 5 s past its ``exp`` (its allowance for clock skew), but
    a WebSocket or a stream taking one then is closed at once (4002), and a poll answered then
    would get the 401 above: it gets it without its page read. (The gateway's expiry clock is
    moved past ``exp`` here; the verifier's own, PyJWT's, still takes the token.)"""
    gateway = await gateways()
    now = [time.time()]
    gateway.clients.expiry.clock = lambda: now[0]
    headers = {"Authorization": f"Bearer {issue_token(SECRET, [4], ttl=60)}"}
    now[0] += 61
    reads = gateway.metrics.poll_reads_total
    status, _, body = await request(gateway.port, "/v1/projects/4/events", headers=headers)
    assert (status, json.loads(body)["message"]) == (401, "token expired")
    assert gateway.metrics.poll_reads_total == reads


async def test_cors_preflight_for_polling(gateways):
    gateway = await gateways(allowed_origins=["https://dash.example"])
    status, headers, _ = await request(
        gateway.port,
        "/v1/projects/1/events",
        method="OPTIONS",
        headers={
            "Origin": "https://dash.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert status == 204
    assert headers["access-control-allow-origin"] == "https://dash.example"
    assert "authorization" in headers["access-control-allow-headers"].lower()
    status, _, _ = await request(
        gateway.port,
        "/v1/projects/1/events",
        method="OPTIONS",
        headers={"Origin": "https://evil.example"},
    )
    assert status == 403


async def test_a_poll_from_an_origin_not_allowed_is_refused_like_a_stream(gateways, publisher):
    """With --allowed-origins, a poll from another origin gets 403 forbidden_origin (as a
    WebSocket handshake and an SSE stream do), before its token or Redis is looked at, and is
    counted in connections_rejected_total; so is its preflight, the only request a browser
    makes once that is refused. Allowed origins, and requests without Origin, are answered."""
    gateway = await gateways(allowed_origins=["https://dash.example"])
    await publish(publisher, 12, 1)
    path = "/v1/projects/12/events"
    polls, rejected = gateway.metrics.polls_total, gateway.metrics.connections_rejected_total
    for method in ("GET", "HEAD"):
        for headers in ({}, bearer([12])):
            status, got, body = await request(
                gateway.port,
                path,
                method=method,
                headers={**headers, "Origin": "https://evil.example"},
            )
            assert status == 403, (method, headers, body)
            assert "access-control-allow-origin" not in got
            if method == "GET":
                assert json.loads(body)["error"] == "forbidden_origin"
    status, _, _ = await request(
        gateway.port,
        path,
        method="OPTIONS",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert status == 403
    assert gateway.metrics.connections_rejected_total == rejected + 5
    assert gateway.metrics.polls_total == polls  # nothing was read for them
    status, got, body = await request(
        gateway.port, path, headers={**bearer([12]), "Origin": "https://dash.example"}
    )
    assert status == 200 and json.loads(body)["seq"] == 1
    assert got["access-control-allow-origin"] == "https://dash.example"
    status, _, body = await request(gateway.port, path, headers=bearer([12]))  # not a browser
    assert status == 200 and json.loads(body)["seq"] == 1
    assert gateway.metrics.connections_rejected_total == rejected + 5


@pytest.mark.parametrize("auth_timeout", [10.0, 0.5])
async def test_polling_against_a_hung_redis_gets_503_within_the_subscribe_timeout(auth_timeout):
    # Also with --auth-timeout shorter than --subscribe-timeout: the request, once read, is
    # answered, not dropped at the handshake deadline (which bounds reading it, not the answer).
    import time

    with RedisServer() as server:
        gateway = await start_gateway(
            server.url, subscribe_timeout=1.0, drain_timeout=1, auth_timeout=auth_timeout
        )
        headers = bearer([6])
        try:
            assert (await request(gateway.port, "/v1/projects/6/events", headers=headers))[0] == 200
            with hung(server):  # sockets open, nothing answers
                started = time.monotonic()
                status, got_headers, body = await asyncio.wait_for(
                    request(
                        gateway.port,
                        "/v1/projects/6/events?epoch=e&after=0",
                        headers={**headers, "Origin": "https://dash.example"},
                    ),
                    4,
                )
                elapsed = time.monotonic() - started
            assert status == 503 and got_headers["retry-after"] == "5"
            # ... which a page can read (exposed to CORS), so a browser waits as long as asked.
            assert got_headers["access-control-expose-headers"] == "Retry-After"
            assert json.loads(body)["error"] == "unavailable"
            assert 0.9 < elapsed < 3, elapsed
        finally:
            await gateway.drain()


@pytest.mark.parametrize("path", ["//[x", "//[::1/v1/projects/1/events", "http://[x/healthz"])
async def test_request_targets_that_are_not_plain_paths_get_404_not_500(gateways, path):
    gateway = await gateways()
    status, _, body = await request(gateway.port, path)
    assert status == 404 and json.loads(body)["error"] == "not_found"


async def test_bytes_after_a_request_do_not_stop_its_answer(gateways):
    # A client that pipelines (or sends garbage after the request head) still gets its answer:
    # nothing after an HTTP request is read, let alone parsed as WebSocket frames.
    gateway = await gateways()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n\xff\xff\xff\xff"
    )
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1


@pytest.mark.parametrize("path", ["/healthz", "/v1/projects/2/events"])
async def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(gateways, path):
    # `printf 'GET ...' | nc host port` sends its request and then its EOF: the answer is
    # still written (the request is complete; only the client's sending side is done). The
    # polling answer waits for Redis, so the EOF arrives before it.
    gateway = await gateways()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    head = [f"GET {path} HTTP/1.1", "Host: x"]
    head += [f"{name}: {value}" for name, value in bearer([2]).items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    writer.write_eof()
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer


async def test_an_http_connection_closes_when_the_client_closes_after_the_answer(gateways):
    """The gateway answers, half-closes, and the client, done reading, closes its side: the
    socket is freed at once (keeping the transport for an answer still due must not keep it
    once the answer is written, until CLOSE_TIMEOUT)."""
    gateway = await gateways()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        answer = await reader.read()  # the gateway half-closes after its answer
    assert answer.startswith(b"HTTP/1.1 200"), answer
    writer.close()  # the client closes its side too: nothing is left to do on either side
    await writer.wait_closed()
    started = time.monotonic()
    await wait_until(lambda: not gateway.admission.open, 8, "the connection to be closed")
    held = time.monotonic() - started
    assert held < 1.0, f"the server held the finished connection {held:.1f} s"


async def _raw_socket(port: int, rcvbuf: int) -> socket.socket:
    """A connected non-blocking socket with a small receive buffer: what it does not read, the
    gateway has to keep."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def _read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while chunk := await loop.sock_recv(sock, 1 << 20):
        data += chunk
    return data


async def _large_poll_sent(gateway, publisher, project_id: int, count: int) -> socket.socket:
    """``count`` events of ~15 KB published to the project, and a poll for all of them sent on a
    socket with a small receive buffer (returned, to be closed by the caller)."""
    events = [
        BlockerResolved(
            project_id=project_id, blocker_id=n, answer="€" * 5000, resolved_at=utc_now()
        )
        for n in range(1, count + 1)
    ]
    for start in range(0, len(events), 100):
        await publisher.publish_many(events[start : start + 100])
    path = f"/v1/projects/{project_id}/events"
    _, _, body = await request(gateway.port, path, headers=bearer([project_id]))
    epoch = json.loads(body)["epoch"]
    sock = await _raw_socket(gateway.port, 16384)
    head = [f"GET {path}?epoch={epoch}&after=0&limit={count} HTTP/1.1", "Host: x"]
    head += [f"{name}: {value}" for name, value in bearer([project_id]).items()]
    try:
        await asyncio.get_running_loop().sock_sendall(
            sock, ("\r\n".join(head) + "\r\n\r\n").encode()
        )
    except BaseException:
        sock.close()
        raise
    return sock


async def test_a_client_that_reads_a_large_poll_answer_slowly_gets_all_of_it(gateways, publisher):
    """A poll answer far larger than the client's receive buffer (a full page, about 1 MiB,
    unsent in the gateway's buffers or its kernel's) is written whole to a client that pauses
    longer than CLOSE_TIMEOUT (a slow link, a busy tab) but keeps reading: the answer is cut
    only when it stops moving for --stall-timeout, as for any slow consumer. Cut short, the
    client would ask for the same page again, and get it cut again, for ever."""
    gateway = await gateways()
    sock = await _large_poll_sent(gateway, publisher, 9, 1000)
    loop = asyncio.get_running_loop()
    try:
        first = await loop.sock_recv(sock, 4096)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        await asyncio.sleep(CLOSE_TIMEOUT + 1)  # the slow link: reads nothing for a while
        async with asyncio.timeout(30):
            answer = first + await _read_all(sock)
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert len(body) == length > 1_000_000
    page = json.loads(body)
    assert page["more"] and [e["seq"] for e in page["events"]] == list(range(1, 70))


async def test_a_client_that_reads_none_of_a_poll_answer_is_dropped_after_the_stall_timeout(
    gateways, publisher
):
    """Waiting for a slow reader is bounded by the slow-consumer rule: an answer that stops
    moving for --stall-timeout is dropped, and its socket with it."""
    gateway = await gateways(stall_timeout=0.5)
    sock = await _large_poll_sent(gateway, publisher, 10, 500)
    try:
        await wait_until(lambda: gateway.admission.open == 1, 5, "the request to be answered")
        started = time.monotonic()
        await wait_until(lambda: gateway.admission.open == 0, 15, "the reader to be dropped")
        assert time.monotonic() - started < CLOSE_TIMEOUT + 4
    finally:
        sock.close()


def _answers_in_flight() -> list[asyncio.Task]:
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "").endswith("._answer_http")
    ]


def _reads_in_flight() -> list[asyncio.Task]:
    """The history reads of polls going on (HttpRoutes._read, each in a task of its own)."""
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "").endswith("HttpRoutes._read")
    ]


async def test_a_poll_whose_client_left_stops_waiting_for_redis_at_once():
    """A poll waiting for a hung Redis when its client goes away ends with the socket: its task,
    and the request it holds (headers of up to ~1 MB), are not kept until --subscribe-timeout.
    The socket leaves --max-connections at once, so otherwise a client that opens and closes
    polls as fast as it can would pile them up beyond that bound."""

    with RedisServer() as server:
        gateway = await start_gateway(server.url, subscribe_timeout=10.0, drain_timeout=1)
        headers = bearer([6])
        try:
            assert (await request(gateway.port, "/v1/projects/6/events", headers=headers))[0] == 200
            with hung(server):  # sockets open, nothing answers
                _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
                head = ["GET /v1/projects/6/events?epoch=e&after=0 HTTP/1.1", "Host: x"]
                head += [f"{name}: {value}" for name, value in headers.items()]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
                await wait_until(lambda: len(_answers_in_flight()) == 1, 5, "the poll to wait")
                # A reset (a FIN could be a half-close: the answer would still be due).
                sock = writer.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                await wait_until(lambda: gateway.admission.open == 0, 5, "the socket to close")
                await wait_until(lambda: not _answers_in_flight(), 2, "the poll to end")
        finally:
            await gateway.drain()


async def test_concurrent_polls_at_one_cursor_share_one_history_read():
    """Every poll read the project's history from Redis, one ``SNAPSHOT`` script each: browsers
    of one project polling at the same cursor (all woken by the same event), or a client with a
    valid token asking for the same page as fast as it can, cost Redis one script call per
    request. Polls of the same project, cursor and page size made while a read is in flight now
    wait for it and share its answer: 30 such polls, made while Redis is stopped, cost one read
    (``eventbus_poll_reads_total``), and each gets the same page. A different cursor reads for
    itself."""

    import redis.asyncio

    from publisher import AsyncPublisher

    with RedisServer() as server:
        gateway = await start_gateway(server.url, subscribe_timeout=10.0, drain_timeout=1)
        direct = redis.asyncio.Redis.from_url(server.url)
        direct_publisher = AsyncPublisher.from_url(server.url)
        headers = bearer([6])
        try:
            await publish(direct_publisher, 6, 3)
            _, _, body = await request(gateway.port, "/v1/projects/6/events", headers=headers)
            epoch = json.loads(body)["epoch"]
            evals_before = (await direct.info("commandstats"))["cmdstat_eval"]["calls"]
            reads_before = gateway.metrics.poll_reads_total
            paths = [f"/v1/projects/6/events?epoch={epoch}&after=1"] * 30
            paths.append(f"/v1/projects/6/events?epoch={epoch}&after=2")
            with hung(server):  # every poll waits, none is answered
                polls = [
                    asyncio.ensure_future(request(gateway.port, path, headers=headers))
                    for path in paths
                ]
                await wait_until(
                    lambda: len(_answers_in_flight()) == len(paths), 5, "every poll to wait"
                )
            answers = await asyncio.gather(*polls)
            assert [status for status, _, _ in answers] == [200] * len(paths)
            pages = [json.loads(body) for _, _, body in answers]
            assert all(page == pages[0] for page in pages[:30])
            assert [e["seq"] for e in pages[0]["events"]] == [2, 3]
            assert [e["seq"] for e in pages[30]["events"]] == [3]
            evals = (await direct.info("commandstats"))["cmdstat_eval"]["calls"] - evals_before
            assert evals == 2, f"{evals} history reads for 31 polls at two cursors"
            assert gateway.metrics.poll_reads_total - reads_before == 2
            assert gateway.metrics.polls_total >= 31
        finally:
            await direct_publisher.aclose()
            await direct.aclose()
            await gateway.drain()


async def test_a_shared_poll_read_outlives_a_client_that_leaves_not_the_last_one_or_a_drain():
    """Polls of one page share one read (KeyedSingleFlight), end to end with a hung Redis: a
    client that goes away leaves the read to the others, who get their page once Redis answers;
    when every client of a read has gone, the read is cancelled and forgotten (not kept until
    --subscribe-timeout); a poll still waiting on a shared read when a drain reaches its deadline
    is answered 503 draining, and the read is forgotten too."""

    with RedisServer() as server:
        gateway = await start_gateway(server.url, subscribe_timeout=10.0, drain_timeout=1)
        headers = bearer([6])
        reads = gateway.http._reads
        status, _, body = await request(gateway.port, "/v1/projects/6/events", headers=headers)
        assert status == 200
        path = f"/v1/projects/6/events?epoch={json.loads(body)['epoch']}&after=0"
        head = [f"GET {path} HTTP/1.1", "Host: x", "Connection: close"]
        head += [f"{name}: {value}" for name, value in headers.items()]

        async def poll() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            return reader, writer

        def reset(writer: asyncio.StreamWriter) -> None:
            # A reset (a FIN could be a half-close: the answer would still be due).
            sock = writer.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

        try:
            reads_before = gateway.metrics.poll_reads_total
            with hung(server):
                clients = [await poll() for _ in range(3)]
                await wait_until(lambda: len(_answers_in_flight()) == 3, 5, "the polls to wait")
                assert len(reads) == 1
                reset(clients[0][1])
                await wait_until(lambda: len(_answers_in_flight()) == 2, 5, "the first to end")
                assert len(reads) == 1 and len(_reads_in_flight()) == 1, "the others wait for it"
            async with asyncio.timeout(5):
                answers = [await reader.read() for reader, _ in clients[1:]]
            for _, writer in clients:
                writer.close()
            assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers), answers
            assert gateway.metrics.poll_reads_total - reads_before == 1
            assert len(reads) == 0

            with hung(server):
                clients = [await poll() for _ in range(2)]
                await wait_until(lambda: len(reads) == 1, 5, "the read to start")
                for _, writer in clients:
                    reset(writer)
                await wait_until(
                    lambda: not reads and not _reads_in_flight(),
                    2,
                    "the read nobody waits for to end",
                )

                reader, writer = await poll()
                await wait_until(lambda: len(reads) == 1, 5, "the read to start")
                drain = asyncio.ensure_future(gateway.drain())
                async with asyncio.timeout(5):
                    answer = await reader.read()
                writer.close()
                assert answer.startswith(b"HTTP/1.1 503 ") and b'"draining"' in answer, answer
                await wait_until(lambda: not reads and not _reads_in_flight(), 2, "the read to end")
            await drain
        finally:
            await gateway.drain()


async def test_a_handlers_own_timeout_is_an_internal_error_not_a_drain(gateways):
    """Every HTTP request runs under a bound the drain moves to its deadline, whose expiry is
    answered 503 draining. A TimeoutError of the handler's own (not the drain's) on a pod that
    is not draining is an internal error as before: 500, not a 503 telling the client the pod
    goes away (nor a refusal counted)."""
    gateway = await gateways()

    async def times_out(request):
        raise TimeoutError("the handler's own")

    gateway.http.routes["/healthz"] = times_out
    status, _, body = await request(gateway.port, "/healthz")
    assert status == 500 and json.loads(body)["error"] == "internal", body
    assert gateway.metrics.connections_rejected_total == 0
    assert not gateway.http_answers and not gateway.draining


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /v1/projects/1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /v1/projects/1/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /v1/projects/1/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx",
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nContent-Length: 1\r\n\r\nx",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /healthz\r\n\r\n",
        b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
async def test_a_request_that_cannot_be_read_gets_400_not_a_silent_close(gateways, raw):
    """A request with a body (the gateway takes none: publishing is eventbus-publish's), a
    Transfer-Encoding, or a request line that is not HTTP/1.1 is told why, in the JSON every
    other refusal has, rather than having the connection closed without a word."""
    gateway = await gateways()
    head, body = await _answer_and_close(gateway, raw)
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert json.loads(body)["error"] == "bad_request"
    assert gateway.metrics.bad_requests_total == 1


async def _answer_and_close(gateway, raw: bytes) -> tuple[bytes, bytes]:
    """The gateway's answer to ``raw`` (its head and body), read to the end: the gateway closes
    the connection after it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(raw)
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    await wait_until(lambda: not gateway.admission.open, 5, "the connection to be closed")
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize(
    "start",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        b"GET /v1/projects/1/stream HTTP/1.1\r\nHost: x\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    ],
)
async def test_a_request_head_over_the_limit_gets_431_and_its_socket_is_closed(gateways, start):
    """websockets bounds each header line (8,192 bytes) and their number (128), not their sum:
    a head of ~1 MB was read, and kept until --auth-timeout, so 300 sockets trickling such heads
    took a gateway from 40 to 310 MB. A head past --max-request-bytes (32 KiB) in all, however
    it is cut into reads, is answered 431 at once, counted as a bad request, and its socket
    closed; nothing after it is read. (A handshake, a stream, an HTTP request alike.)"""
    gateway = await gateways()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(start)
    for n in range(100):  # 800 KB in 100 writes; never a blank line: the head never ends
        writer.write(b"X-Filler-%d: %s\r\n" % (n, b"a" * 8000))
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        body = await reader.readexactly(length)
    writer.close()
    assert head.startswith(b"HTTP/1.1 431 "), head
    assert json.loads(body)["error"] == "request_too_large"
    assert gateway.metrics.bad_requests_total == 1
    await wait_until(lambda: not gateway.admission.open, 5, "the connection to be closed")


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        (
            b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            414,
            "the request line takes more than 8192 bytes",
        ),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 9000 + b"\r\n\r\n",
            431,
            "a header line takes more than 8192 bytes",
        ),
        (
            b"GET /healthz HTTP/1.1\r\n"
            + b"".join(b"X-H%d: v\r\n" % n for n in range(129))
            + b"\r\n",
            431,
            "the request has more than 128 headers",
        ),
    ],
    ids=["request_line", "header_line", "headers"],
)
async def test_a_line_or_a_header_count_over_websockets_bounds_gets_a_json_answer(
    gateways, raw, status, message
):
    """websockets bounds a line (8,192 bytes with its end) and the headers (128) itself, under
    --max-request-bytes: such a request gets the gateway's JSON answer, as every other refusal
    (not websockets' plain text), is counted as a bad request, and its socket is closed."""
    gateway = await gateways()
    head, body = await _answer_and_close(gateway, raw)
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    assert b"content-type: application/json" in head.lower(), head
    assert json.loads(body) == {"error": "request_too_large", "message": message}
    assert gateway.metrics.bad_requests_total == 1


_UPGRADE = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
_KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


@pytest.mark.parametrize(
    ("raw", "status", "message", "headers"),
    [
        (
            _UPGRADE + b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
            400,
            "missing Sec-WebSocket-Key header",
            {},
        ),
        (
            _UPGRADE + b"Connection: Upgrade\r\n" + _KEY + b"Sec-WebSocket-Version: 8\r\n\r\n",
            400,
            "invalid Sec-WebSocket-Version header: 8",
            {"sec-websocket-version": "13"},  # RFC 6455 4.4: the version the server speaks
        ),
        (
            _UPGRADE + _KEY + b"Sec-WebSocket-Version: 13\r\n\r\n",
            426,
            "missing Connection header",
            {"upgrade": "websocket"},
        ),
    ],
    ids=["no_key", "version", "no_connection"],
)
async def test_a_malformed_handshake_gets_a_json_answer_and_is_counted(
    gateways, raw, status, message, headers
):
    """websockets checks a handshake's headers itself: a malformed one gets the gateway's JSON
    answer with websockets' status (and the headers that tell the client what to send), counted
    as a bad request, as every other refusal is, instead of websockets' uncounted plain text."""
    gateway = await gateways()
    head, body = await _answer_and_close(gateway, raw)
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    fields = dict(
        (name.strip().lower(), value.strip())
        for name, _, value in (line.decode().partition(":") for line in head.split(b"\r\n")[1:])
    )
    assert fields["content-type"] == "application/json", head
    assert json.loads(body) == {"error": "bad_request", "message": message}
    assert headers.items() <= fields.items(), head
    assert gateway.metrics.bad_requests_total == 1


async def test_a_large_head_within_the_limit_is_answered(gateways):
    """A browser's head can be large (cookies of up to ~8 KB, a token of up to 8 KiB): under
    --max-request-bytes it is answered as ever."""
    gateway = await gateways()
    headers = {**bearer([2]), "Cookie": "c=" + "x" * 8000, "X-Other": "y" * 8000}
    status, _, _ = await request(gateway.port, "/v1/projects/2/events", headers=headers)
    assert status == 200
    assert gateway.metrics.bad_requests_total == 0


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"")), max_size=8),
    after=st.binary(max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_the_head_is_counted_to_its_blank_line_however_it_is_cut_into_reads(lines, after, cuts):
    """What --max-request-bytes counts (WebSocketConnection._head_part, no socket): every byte
    up to and including the blank line that ends the head, never one after it (frames sent with
    the handshake), wherever the reads cut it, the blank line itself included."""
    from types import SimpleNamespace

    from gateway.websocket import WebSocketConnection

    head = b"GET / HTTP/1.1\r\n" + b"".join(b"X-A: " + line + b"\r\n" for line in lines)
    head += b"\r\n"  # (no CR in a line: its first CRLF CRLF is its end)
    assert head.find(b"\r\n\r\n") == len(head) - 4
    wire = head + after
    bounds = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    connection = SimpleNamespace(head_tail=b"")
    counted = 0
    for start, stop in itertools.pairwise(bounds):
        part, ended = WebSocketConnection._head_part(connection, wire[start:stop])
        counted += part
        assert ended == (start < len(head) <= stop)
        if ended:
            break
    assert counted == len(head)


async def test_a_handshake_with_a_large_first_frame_in_the_same_write_is_not_431(gateways):
    """--max-request-bytes bounds the request's head, not what follows it: a handshake of a
    browser's size (a token, ~8 KB of cookies, a long extensions offer) written at once with a
    first frame near --max-frame-bytes (a client that subscribes without waiting for the 101)
    opens as it did before the bound, and the frame is handled. Counting the whole read as head
    answered it 431 request_too_large, a head well under the bound."""
    from websockets.frames import Frame, Opcode

    gateway = await gateways()
    head = (
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {issue_token(SECRET, [3])}\r\nCookie: c={'x' * 8000}\r\n"
        f"Sec-WebSocket-Extensions: {', '.join(f'x-ext-{n}' for n in range(300))}\r\n\r\n"
    ).encode()
    message = json.dumps({"type": "subscribe", "project_id": 3, "pad": "p" * 40_000}).encode()
    frame = Frame(Opcode.TEXT, message).serialize(mask=True, extensions=[])
    assert len(head) < gateway.config.max_request_bytes < len(head) + len(frame)
    assert len(frame) < gateway.config.max_frame_bytes
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(head + frame)  # one write: the gateway reads both at once
    async with asyncio.timeout(5):
        answer = await reader.readuntil(b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 101 "), answer
        replies = []
        while len(replies) < 2:  # ``authenticated`` (the header's token), then the answer
            first, size = await reader.readexactly(2)
            assert first == 0x81 and size < 126  # small text frames
            replies.append(json.loads(await reader.readexactly(size)))
    writer.close()
    assert [(r["type"], r.get("project_id")) for r in replies] == [
        ("authenticated", None),
        ("subscribed", 3),
    ], replies
    assert gateway.metrics.bad_requests_total == 0


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/eventbus.js", "/v1/projects/2/events"])
async def test_head_gets_the_headers_of_get_and_no_body(gateways, path):
    """A HEAD answer has no content (RFC 9110, 9.3.2): bytes after its head would be read by
    a client as the start of its next answer."""
    gateway = await gateways()
    status, headers, body = await request(gateway.port, path, headers=bearer([2]))
    got, head_headers, head_body = await request(
        gateway.port, path, method="HEAD", headers=bearer([2])
    )
    assert (got, head_body) == (status, b"")
    assert head_headers["content-type"] == headers["content-type"]
    if path != "/metrics":  # (its figures change between the two requests)
        assert int(head_headers["content-length"]) == len(body)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(["after", "limit"]),
    value=st.one_of(
        st.text(max_size=20),
        # Arabic-Indic 3, fullwidth 2, superscript 2: digits to str.isdigit()
        st.text("0123456789\u0663\uff12\u00b2", min_size=1, max_size=17),
        st.integers(0, 10**17).map(str),
        st.integers(2**53 - 2, 10**16 - 1).map(str),  # around the protocol's largest seq
        st.integers(4000, 5000).map("9".__mul__),  # past int()'s own limit, 4300 digits
    ),
)
def test_poll_numbers_are_ascii_decimals_or_a_clear_error(name, value):
    """``after`` and ``limit`` are what the protocol says (ASCII decimal digits: no Unicode
    digit that Python's int() would take, no sign, no space; ``after`` at most 2**53 - 1, as a
    subscribe's) or a 400 naming the parameter."""
    from schemas.history import MAX_POLL_LIMIT
    from schemas.history import parse_poll_query as _poll_query

    query = urlencode({"epoch": "e", name: value})
    after_ok = re.fullmatch(r"[0-9]{1,16}", value) is not None and int(value) < 2**53
    limit_ok = re.fullmatch(r"[0-9]{1,4}", value) is not None and 1 <= int(value) <= MAX_POLL_LIMIT
    if value == "":
        return  # a blank parameter is an absent one
    if name == "after":
        if after_ok:
            assert _poll_query(query).after == int(value)
        else:
            with pytest.raises(ValueError, match=r"^after must be"):
                _poll_query(query)
    else:
        query = urlencode({name: value})
        if limit_ok:
            assert _poll_query(query).limit == int(value)
        else:
            with pytest.raises(ValueError, match=r"^limit must be"):
                _poll_query(query)


@pytest.mark.parametrize("rate", [None, 1 << 20], ids=["default", "1MiBps"])
async def test_a_client_that_dribbles_through_an_answer_is_dropped_in_bounded_time(gateways, rate):
    """The patience a slow reader gets has an end even for one that keeps reading: an answer
    must be read at --answer-min-rate (16 KiB/s) on average, so a client without a token cannot
    hold a socket (in --max-connections) for minutes by reading /eventbus.js a few bytes at a
    time. At 1 MiB/s the 77 KB answer has CLOSE_TIMEOUT and next to nothing more (it had ~5 s
    more at the default: the setting is the one used)."""
    from gateway.config import GatewayConfig

    gateway = await gateways(**({} if rate is None else {"answer_min_rate": rate}))
    rate = rate or GatewayConfig(no_auth=True).answer_min_rate
    size = len((await request(gateway.port, "/eventbus.js"))[2])
    bound = CLOSE_TIMEOUT + size / rate + 2
    sock = await _raw_socket(gateway.port, 2048)
    loop = asyncio.get_running_loop()
    received = 0
    started = time.monotonic()
    try:
        await loop.sock_sendall(sock, b"GET /eventbus.js HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(bound + 10):
            while gateway.admission.open:
                received += len(await loop.sock_recv(sock, 256))  # ~1 KiB/s
                await asyncio.sleep(0.25)
    finally:
        sock.close()
    assert time.monotonic() - started < bound
    assert received < size


async def _poll_forever(port: int, project_id: int, records: list, stop: asyncio.Event) -> None:
    """A poller as the protocol describes it: start from the top, then page with its cursor
    (at once while ``more``), carry on from a ``resync_required``'s cursor; Redis being away
    (503, a dropped connection) is retried. Records what it got as the WebSocket tests do."""
    from tests.support.ws_client import Received

    cursor = None
    while not stop.is_set():
        query = "" if cursor is None else f"?epoch={cursor[0]}&after={cursor[1]}&limit=7"
        try:
            status, _, body = await request(
                port, f"/v1/projects/{project_id}/events{query}", headers=bearer([project_id])
            )
        except (OSError, ValueError, IndexError):
            status = 0
        if status != 200:
            await asyncio.sleep(0.05)
            continue
        page = json.loads(body)
        if cursor is None:
            cursor = (page["epoch"], page["seq"])
            records.append(Received("subscribed", *cursor))
        resync = page["resync_required"]
        if resync is not None:
            cursor = (resync["epoch"], resync["seq"])
            records.append(Received("resync", *cursor, reason=resync["reason"]))
        for event in page["events"]:
            cursor = (cursor[0], event["seq"])
            records.append(Received("event", *cursor, ident=event["blocker_id"]))
        if not page["more"]:
            await asyncio.sleep(0.02)


async def test_polling_across_a_redis_restart_is_exact_or_an_explicit_resync():
    """Pollers following their cursors while events are published and Redis restarts without
    its data: every event once, in order, an explicit resync(epoch_changed) for the lost
    history, then every event of the new one, up to the top."""
    from schemas.keys import Keys
    from tests.support.ws_client import PublishLoop, check_delivery, final_state

    projects = [1, 2]
    with RedisServer() as server:
        gateway = await start_gateway(server.url, drain_timeout=1, probe_interval=0.2)
        publishers = PublishLoop(server.url, projects, rate=100)
        stop = asyncio.Event()
        records: dict[int, list] = {p: [] for p in projects}
        pollers = [
            asyncio.create_task(_poll_forever(gateway.port, p, records[p], stop)) for p in projects
        ]
        try:
            await wait_until(lambda: all(records.values()), 10, "the pollers to start")
            publishers.start()
            await wait_until(lambda: publishers.published >= 100, 20, "publishes")
            await asyncio.to_thread(server.kill)
            await asyncio.to_thread(server.start)
            target = publishers.published + 100
            await wait_until(lambda: publishers.published >= target, 30, "publishes after")
            await publishers.stop()
            state = await final_state(server.url, projects, Keys("eventbus"))
            for project_id, (top, _) in state.items():
                await wait_until(
                    lambda p=project_id, t=top: (records[p][-1].epoch, records[p][-1].seq) == t,
                    20,
                    "the top",
                )
        finally:
            stop.set()
            await publishers.stop()
            await asyncio.gather(*pollers)
            await gateway.drain()
    for project_id, (top, history) in state.items():
        got = records[project_id]
        assert (
            check_delivery(got, history=history, final=top, allowed_resyncs={"epoch_changed"}) == []
        ), project_id
        assert [r.reason for r in got if r.kind == "resync"] == ["epoch_changed"]
        events = [r for r in got if r.kind == "event" and r.epoch == top[0]]
        assert [r.seq for r in events] == list(range(events[0].seq, top[1] + 1))


async def test_head_of_a_stream_is_refused_without_a_body(gateways):
    """A stream has no HEAD (405, Allow: GET, OPTIONS), and the refusal, a HEAD answer, has
    no content either."""
    gateway = await gateways()
    got, headers, body = await request(
        gateway.port, "/v1/projects/2/stream", method="HEAD", headers=bearer([2])
    )
    assert (got, headers["allow"], body) == (405, "GET, OPTIONS", b"")
    assert int(headers["content-length"]) > 0  # the length of the GET's JSON error
