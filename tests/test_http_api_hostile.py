"""The HTTP publish API against hostile clients: what one connection may make the server hold.

Every test serves the API with uvicorn in this event loop (``server_config``, as ``serve`` does)
against the session's private Redis, and attacks it over a raw socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import resource
import socket
import subprocess
import sys
import threading
import time

import msgspec
import redis
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from publisher import AsyncPublisher
from publisher.http_api import hash_key
from publisher.http_api.server import (
    ACCEPT_BATCHES,
    ACCEPT_SLACK,
    DESCRIPTOR_RESERVE,
    LISTEN_BACKLOG,
    MAX_PIPELINED,
    MIN_LISTEN_BACKLOG,
    fitted_concurrency,
    listen_backlog,
)
from tests.support.redis_server import free_port
from tests.test_http_api import EXPIRED, KEY_ALL, KEY_ONE, serving_app, stream

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
#: A request the API answers at once, and not past --limit-concurrency (the probes are): 401.
CHEAP = b"GET /v1/projects/1/presence HTTP/1.1\r\nHost: t\r\n\r\n"


def publish_request(body: bytes, *, close: bool = False, extra: bytes = b"") -> bytes:
    head = (
        "POST /v1/projects/1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY_ALL}\r\nContent-Length: {len(body)}\r\n"
        + ("Connection: close\r\n" if close else "")
    )
    return head.encode() + extra + b"\r\n" + body


class GatedPublisher:
    """An AsyncPublisher whose ``publish`` waits at a gate: a request held in progress."""

    def __init__(self, publisher: AsyncPublisher) -> None:
        self._publisher = publisher
        self.client = publisher.client
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def publish(self, event, **kwargs):
        self.entered.set()
        await self.gate.wait()
        return await self._publisher.publish(event, **kwargs)

    async def aclose(self) -> None:
        await self._publisher.aclose()


@contextlib.asynccontextmanager
async def serving(redis_url: str, *, gated: bool = False, **overrides):
    publisher = AsyncPublisher.from_url(redis_url)
    async with serving_app(GatedPublisher(publisher) if gated else publisher, **overrides) as api:
        yield api


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return int(lines[0].split()[1]), headers, body


async def send_all(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write ``data`` the way an attacker does: without waiting for an answer, and without
    minding that the server stopped reading (a reset is the expected end)."""
    with contextlib.suppress(ConnectionError):
        for start in range(0, len(data), 65536):
            writer.write(data[start : start + 65536])
            await writer.drain()


async def test_request_headers_over_the_limit_are_refused_with_431(redis_url) -> None:
    """httptools and uvicorn keep every byte of a request's head until it ends, and only
    --header-timeout bounded that wait: one connection sending headers as fast as it could (or
    one endless header, or an endless URL) made the process hold gigabytes within those 10 s.
    Past --max-header-bytes the request is answered 431 and its connection closed, at once."""
    filler = b"X-Filler: " + b"a" * 100 + b"\r\n"
    floods = [
        b"POST /v1/projects/1/events HTTP/1.1\r\n" + filler * 3000,
        b"POST /v1/projects/1/events HTTP/1.1\r\nX-Endless: " + b"a" * 300_000,
        b"GET /" + b"a" * 300_000,
    ]
    async with serving(redis_url, max_header_bytes=16384, header_timeout=60) as (app, _, port):
        for flood in floods:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            sending = asyncio.create_task(send_all(writer, flood))
            async with asyncio.timeout(5):
                status, headers, body = await read_answer(reader)
                assert await reader.read() == b""  # and the connection is closed
            await sending
            writer.close()
            assert status == 431 and headers["connection"] == "close", (status, body)
            assert msgspec.json.decode(body)["error"]["code"] == "headers_too_large"
        # Headers under the limit are served, also when sent a few bytes at a time.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = publish_request(
            json.dumps(EXPIRED).encode(), close=True, extra=b"X-Trace: " + b"t" * 12000 + b"\r\n"
        )
        for start in range(0, len(request), 1000):
            writer.write(request[start : start + 1000])
            await writer.drain()
        async with asyncio.timeout(5):
            status, _, body = await read_answer(reader)
        writer.close()
        assert status == 200, body
        assert app.counters.responses[431, "headers_too_large"] == 3
    assert len(stream(redis_url, 1)) == 1


async def test_pipelined_requests_are_read_only_as_fast_as_they_are_answered(redis_url) -> None:
    """uvicorn parses every request a connection pipelines and queues them all, resuming its
    reads after each answer: one connection that sent requests without waiting for answers
    made the server hold 1.4 GB in 10 s. Now at most MAX_PIPELINED requests (and the bytes of
    one read) wait behind the one in progress; the rest stays unread in the socket, and every
    request is still answered, in order."""
    count = 5000
    async with serving(redis_url, gated=True) as (app, server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sending = asyncio.create_task(
            send_all(writer, publish_request(json.dumps(EXPIRED).encode()) + HEALTHZ * count)
        )
        async with asyncio.timeout(5):
            await app.publisher.entered.wait()
        (connection,) = server.server_state.connections
        queued = len(connection.pipeline)
        app.publisher.gate.set()
        # One slice (4 KiB) is parsed at a time, so a few more may be queued than the bound.
        assert queued <= MAX_PIPELINED + 4096 // len(HEALTHZ), queued
        async with asyncio.timeout(20):
            status, _, body = await read_answer(reader)
            assert status == 200 and b'"seq":1' in body
            for _ in range(count):
                assert (await read_answer(reader))[2] == b'{"status":"ok"}'
        await sending
        writer.close()


async def test_requests_that_are_not_http_are_counted_and_upgrades_are_not_served(
    redis_url,
) -> None:
    """A WebSocket upgrade reached uvicorn's WebSocket protocol, which the API does not serve:
    a 500 and an error-level log line per request, for any client. A request httptools cannot
    parse was answered in plain text and logged as a warning; it is a client's mistake, so it
    is now the documented JSON 400 and a counter."""
    upgrade = (
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    not_http = [
        b"HELLO\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nNo colon\r\n\r\n",
        # Versions the API does not speak, which llhttp passes: they were answered as HTTP/1.1
        # (a request line without a version is HTTP/0.9 to it), where the API is documented to
        # refuse them; an HTTP/2 client would read an HTTP/1.1 answer.
        b"GET /healthz HTTP/2.0\r\nHost: t\r\n\r\n",
        b"GET /healthz HTTP/0.9\r\nHost: t\r\n\r\n",
        b"GET /healthz\r\nHost: t\r\n\r\n",
    ]
    async with serving(redis_url) as (app, _, port):
        for request in [upgrade, *not_http]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request + HEALTHZ)  # nothing after it is read as a request
            async with asyncio.timeout(5):
                status, headers, body = await read_answer(reader)
                assert await reader.read() == b""
            writer.close()
            assert headers["connection"] == "close"
            if request is upgrade:
                assert (status, body) == (200, b'{"status":"ok"}')
            else:
                assert status == 400 and b'"invalid_http"' in body, (status, body)
        # A chunked body that breaks off after a valid head: the refusal is that request's
        # answer (the body it waits for never ends).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/projects/1/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        async with asyncio.timeout(5):
            status, _, body = await read_answer(reader)
            assert await reader.read() == b""
        writer.close()
        assert status == 400 and b'"invalid_http"' in body
        assert app.counters.responses[400, "invalid_http"] == len(not_http) + 1


async def test_a_body_that_cannot_be_read_to_its_end_is_answered_at_once(redis_url, caplog) -> None:
    """A request whose body turns out not to be HTTP (a broken chunk, a Transfer-Encoding
    that is not chunked) waited for the rest of its body until --body-timeout and was answered
    408 ``body_timeout``, a second answer (the 400) following it: a client was told its body
    was slow, ten seconds later, when it was malformed. The refusal is now its answer, at once,
    and nothing is published."""
    head = (
        b"POST /v1/projects/1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + KEY_ALL.encode() + b"\r\n"
    )
    body = json.dumps(EXPIRED).encode()
    broken = [
        head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body + b"\r\nzz\r\n",
        head + b"Transfer-Encoding: identity\r\n\r\n" + body,
        # (sent without waiting for 100 Continue, which must not follow the refusal)
        head + b"Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ]
    async with serving(redis_url, body_timeout=60, header_timeout=60) as (app, _, port):
        for request in broken:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            async with asyncio.timeout(5):
                status, headers, answer = await read_answer(reader)
                assert await reader.read() == b""  # the only answer, and the connection ends
            writer.close()
            assert (status, headers["connection"]) == (400, "close"), answer
            assert msgspec.json.decode(answer)["error"]["code"] == "invalid_http"
        await asyncio.sleep(0.1)  # (the cut requests' applications end)
        # One answer each, counted once: the application's own outcome of a request it can no
        # longer answer (400 ``disconnected``) was counted beside the refusal.
        assert app.counters.responses == {(400, "invalid_http"): len(broken)}
    assert not stream(redis_url, 1)
    assert "Exception" not in caplog.text and "Traceback" not in caplog.text, caplog.text


async def hold_a_share(
    app, port: int, padded: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A publish of key "all" whose body (``padded``) trickles in, all but its last 4,000 bytes
    sent: it holds its whole declared length (the key's share, when ``padded`` is a full
    ``--max-body``) once the API has taken it; returns its connection."""
    taken = asyncio.Event()
    take = app.bodies.take

    def taking(key_id: str, size: int) -> bool:
        taken.set()
        return take(key_id, size)

    app.bodies.take = taking
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(publish_request(padded)[:-4000])
    async with asyncio.timeout(5):
        await taken.wait()
    return reader, writer


async def test_bodies_held_at_once_are_bounded_in_all_and_per_key(redis_url) -> None:
    """1,000 connections (--limit-concurrency) each sending a 4 MiB body, slowly, held 4-8 GB:
    nothing bounded their sum. Bodies now count against --max-body-memory from their headers
    (for their declared length) or as their chunks arrive; past it, or past a quarter of it for
    one key, a request is answered 503 ``overloaded`` at once and its connection closed, while
    other keys go on publishing."""
    limits = {"max_body": 4096, "max_body_memory": 16384, "body_timeout": 60}
    async with serving(redis_url, **limits) as (app, _, port):
        body = json.dumps(EXPIRED).encode()
        padded = body + b" " * (4096 - len(body))
        slow_reader, slow_writer = await hold_a_share(app, port, padded)
        assert app.bodies.held == 4096
        refused = [
            publish_request(body),  # declared: refused before a byte of it is read
            publish_request(b"").replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
            + b"%x\r\n" % len(body)
            + body
            + b"\r\n0\r\n\r\n",  # chunked: refused as its first chunk arrives
        ]
        for request in refused:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            async with asyncio.timeout(5):
                status, headers, answer = await read_answer(reader)
                assert await reader.read() == b""  # and the connection is closed
            writer.close()
            assert (status, headers["retry-after"]) == (503, "1"), answer
            assert msgspec.json.decode(answer)["error"]["code"] == "overloaded"
        # Another key publishes meanwhile, and /metrics shows what is held.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(publish_request(body).replace(KEY_ALL.encode(), KEY_ONE.encode()))
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await read_answer(reader))[0] == 200
            status, _, metrics = await read_answer(reader)
        writer.close()
        assert b"eventbus_http_publish_body_bytes 4096\n" in metrics
        # The slow body ends: published, and its memory given back.
        slow_writer.write(publish_request(padded)[-4000:])
        async with asyncio.timeout(5):
            status, _, answer = await read_answer(slow_reader)
        slow_writer.close()
        assert status == 200, answer
        assert app.bodies.held == 0
        assert app.counters.responses[503, "overloaded"] == 2
    assert len(stream(redis_url, 1)) == 2


async def test_a_client_still_sending_its_body_reads_the_503_overloaded(redis_url) -> None:
    """A body refused 503 ``overloaded`` from its headers (no room under --max-body-memory) had
    its connection closed at once, its body still arriving: the kernel answered the rest with
    a reset, and Python's http.client, sending it, got BrokenPipeError or ConnectionResetError
    instead of the answer and its Retry-After. The API now closes its side after the answer and
    drops what still arrives for a while (as after a 431), so the client reads the answer."""
    mib = 1024 * 1024
    limits = {"max_body": 4 * mib, "max_body_memory": 16 * mib, "body_timeout": 60}
    async with serving(redis_url, **limits) as (app, _, port):
        body = json.dumps(EXPIRED).encode()
        padded = body + b" " * (4 * mib - len(body))
        _, slow_writer = await hold_a_share(app, port, padded)
        assert app.bodies.held == 4 * mib

        def post() -> tuple[int, str | None] | str:
            client = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                headers = {"Authorization": f"Bearer {KEY_ALL}", "Content-Type": "application/json"}
                client.request("POST", "/v1/projects/1/events", body=padded, headers=headers)
                answer = client.getresponse()
                answer.read()
                return answer.status, answer.getheader("retry-after")
            except OSError as exc:
                return repr(exc)
            finally:
                client.close()

        answers = [await asyncio.to_thread(post) for _ in range(3)]
        slow_writer.close()
        assert answers == [(503, "1")] * 3
        assert app.counters.responses[503, "overloaded"] == 3


def test_fitted_concurrency() -> None:
    assert listen_backlog(20_000) == LISTEN_BACKLOG
    assert fitted_concurrency(1000, 20_000) == 1000
    room = 20_000 - ACCEPT_SLACK - ACCEPT_BATCHES * LISTEN_BACKLOG - DESCRIPTOR_RESERVE
    assert fitted_concurrency(50_000, 20_000) == room // 2
    # Below that, the sockets accepted at once take at most a quarter of what is left, so
    # common limits still serve the default 1,000 (4,096), or hundreds (1,024).
    for limit in (1024, 4096, 6000):
        accepting = ACCEPT_BATCHES * listen_backlog(limit)
        assert accepting <= (limit - ACCEPT_SLACK - DESCRIPTOR_RESERVE) // 4
        assert fitted_concurrency(1000, limit) == min(
            1000, (limit - ACCEPT_SLACK - accepting - DESCRIPTOR_RESERVE) // 2
        )
    assert fitted_concurrency(1000, 4096) == 1000
    assert fitted_concurrency(1000, 1024) > 200
    assert listen_backlog(100) == MIN_LISTEN_BACKLOG
    assert fitted_concurrency(1000, 100) == 1  # (which serves one connection at a time)


async def test_connections_past_the_limit_are_closed_at_accept(redis_url, caplog) -> None:
    """uvicorn accepts every connection (only their requests past --limit-concurrency get 503):
    idle sockets piled up until the process had no descriptor left. Past the limit and
    ACCEPT_SLACK a connection is closed at once; the others are served as before. The 503 past
    the limit was uvicorn's plain text and a warning logged per request: now the documented
    JSON error, counted."""
    async with serving(redis_url, limit_concurrency=2, header_timeout=3) as (app, _, port):
        # (Accepted and seen in the order they connected: all before the next one.)
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2 + ACCEPT_SLACK)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEALTHZ)
        async with asyncio.timeout(1.5):  # not the header timeout: at once
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
        writer.close()
        assert app.counters.closed["full"] == 1
        # The held ones are served (uvicorn's 503: past the limit of requests in progress)...
        held[0][1].write(CHEAP)
        async with asyncio.timeout(5):
            status, headers, body = await read_answer(held[0][0])
        assert status == 503 and headers["retry-after"] == "1", (status, body)
        assert msgspec.json.decode(body)["error"]["code"] == "overloaded"
        assert app.counters.responses[503, "overloaded"] == 1
        assert "concurrency" not in caplog.text
        # ... or closed at their header timeout, which frees their places.
        async with asyncio.timeout(10):
            for held_reader, held_writer in held:
                assert await held_reader.read() == b""
                held_writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEALTHZ)
        async with asyncio.timeout(5):
            assert (await read_answer(reader))[2] == b'{"status":"ok"}'
        writer.close()
        metrics = app.counters.render()
        assert b'eventbus_http_publish_connections_closed_total{reason="full"} 1' in metrics
        assert b'connections_closed_total{reason="header_timeout"} 65' in metrics


@contextlib.contextmanager
def _api_process(redis_url: str, tmp_path, descriptor_limit: int, *args: str):
    """``serve`` in its own process under a hard descriptor limit of ``descriptor_limit``, once
    it has published a first event (waited for): yields ``(port, publish, log, first_answer)``,
    where ``publish()`` sends one event on a new connection and returns the whole answer."""
    keys = tmp_path / "keys.json"
    entry = {"id": "all", "sha256": hash_key(KEY_ALL), "projects": "*"}
    keys.write_text(json.dumps({"keys": [entry]}))
    port = free_port()
    log = tmp_path / "api.log"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (descriptor_limit, descriptor_limit))

    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "publisher.http_api", "serve", "--keys-file", str(keys),
             "--port", str(port), "--redis-url", redis_url, *args],
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit,
        )  # fmt: skip

    def publish() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(publish_request(json.dumps(EXPIRED).encode(), close=True))
            return client.makefile("rb").read()

    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                answer = publish()
                assert b'"seq":1' in answer, answer
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, log.read_text()
                time.sleep(0.05)
        yield port, publish, log, answer
    finally:
        process.terminate()
        process.wait(30)


def test_a_socket_flood_past_the_descriptor_limit_is_refused_quietly(redis_url, tmp_path) -> None:
    """With fewer descriptors than --limit-concurrency needs, a flood of sockets made every
    accept fail (a traceback at error level each time) and a client wait in the backlog; now
    ``serve`` lowers the limit to fit, the connections past it are closed at once, and the API
    serves again as soon as the flood is gone."""
    sockets: list[socket.socket] = []
    with _api_process(
        redis_url, tmp_path, 4700, "--header-timeout", "60", "--limit-concurrency", "5000"
    ) as (port, publish, log, _):
        try:
            # (4700 - 64 - 4 * 273 - 256) // 2, with the backlog fitted to 273
            lowered = [json.loads(line) for line in log.read_text().splitlines()]
            assert 1644 in [line.get("effective") for line in lowered], lowered  # JSON lines
            for _ in range(5000):  # more than the process has descriptors
                with contextlib.suppress(OSError):
                    sockets.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            started = time.monotonic()
            with contextlib.suppress(ConnectionError):
                assert b"HTTP/1.1 200" not in publish()  # refused at once, not left in the backlog
            assert time.monotonic() - started < 2
            for s in sockets:
                s.close()
            sockets.clear()
            deadline = time.monotonic() + 20
            while True:  # served again as soon as the flood is gone
                try:
                    assert b'"seq":2' in publish()
                    break
                except ConnectionError:
                    assert time.monotonic() < deadline, log.read_text()[-2000:]
                    time.sleep(0.1)
            text = log.read_text()
            assert "out of system resource" not in text and "Too many open files" not in text, text
        finally:
            for s in sockets:
                s.close()


async def test_a_client_that_does_not_read_its_answers_is_dropped(redis_url) -> None:
    """An answer waits for the client to read it (uvicorn pauses at 64 KiB unsent) without a
    bound: a client that pipelined requests and never read the answers held its connection
    and a task for ever, both counted against --limit-concurrency, so a thousand such clients
    shut the API for good without sending another byte. Past --send-timeout it is dropped."""
    async with serving(redis_url, send_timeout=1) as (app, server, port):
        # Small buffers on both ends, set before the connection exists (an accepted socket
        # takes its listener's): the server's send buffer autotunes up to 4 MiB on loopback, so
        # ~29,000 answers went into it before the first one waited (seconds of CPU: over the
        # 15 s bound with a tenth of a core); now ~1,500.
        for listener in server.servers[0].sockets:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        # Its writes stall too (the server stops reading), until the drop resets them.
        async with asyncio.timeout(15):
            await send_all(writer, HEALTHZ * 200_000)
            # The kernel's buffers (up to ~10 MB on loopback: the server's receive buffer and
            # this end's send buffer) can take every byte before --send-timeout runs out, so
            # the write returning says nothing yet: wait for the drop itself (the answers
            # queued before it, then the end of the stream).
            with contextlib.suppress(ConnectionError):
                while await reader.read(1 << 20):
                    pass
        writer.close()
        assert app.counters.closed["send_timeout"] == 1
        assert not server.server_state.connections


_PIPELINED = st.lists(
    st.tuples(
        st.sampled_from(["healthz", "event", "not_json", "not_found", "not_found_body"]),
        st.integers(0, 31_000),  # bytes of an extra header (under --max-header-bytes)
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests=_PIPELINED, cuts=st.lists(st.integers(1, 30_000), min_size=1, max_size=50))
def test_pipelined_requests_cut_anywhere_are_answered_in_order(redis_url, requests, cuts) -> None:
    """Requests pipelined on one connection and sent in pieces cut anywhere (the server parses
    4 KiB at a time and stops at MAX_PIPELINED): every one is answered, in order, and the
    events are published once each, in order."""
    expected = {"healthz": 200, "event": 200, "not_json": 400, "not_found": 404}
    data = bytearray()
    for number, (kind, pad) in enumerate(requests):
        extra = b"X-Pad: " + b"p" * pad + b"\r\n"
        if kind == "healthz":
            data += b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + extra + b"\r\n"
        elif kind == "event":
            body = json.dumps({**EXPIRED, "blocker_id": number + 1}).encode()
            data += publish_request(body, extra=extra)
        elif kind == "not_json":
            data += publish_request(b"{nope", extra=extra)
        else:
            body = b"x" * (pad if kind == "not_found_body" else 0)
            data += b"POST /nowhere HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    pieces, start = [], 0
    while start < len(data):
        size = cuts[len(pieces) % len(cuts)]
        pieces.append(bytes(data[start : start + size]))
        start += size

    async def run() -> list[int]:
        async with serving(redis_url) as (_, _, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)

            async def write() -> None:
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()

            sending = asyncio.create_task(write())
            async with asyncio.timeout(30):
                statuses = [(await read_answer(reader))[0] for _ in requests]
                await sending
            writer.close()
            return statuses

    redis_client = redis.Redis.from_url(redis_url)
    redis_client.flushall()
    redis_client.close()
    statuses = asyncio.run(run())
    assert statuses == [expected.get(kind, 404) for kind, _ in requests]
    published = [number + 1 for number, (kind, _) in enumerate(requests) if kind == "event"]
    assert [frame["blocker_id"] for frame in stream(redis_url, 1)] == published


def test_a_common_descriptor_limit_leaves_the_api_serving(redis_url, tmp_path) -> None:
    """A hard descriptor limit of 4,096 (a common default) left no room once 4,096 descriptors
    were set aside for sockets being accepted: ``serve`` lowered --limit-concurrency to 1, and a
    connection counts itself, so every request was answered 503 ``overloaded``. The backlog,
    and so the sockets accepted at once, now shrinks with the limit instead."""
    with _api_process(redis_url, tmp_path, 4096) as (_, _, log, answer):
        assert answer.startswith(b"HTTP/1.1 200") and b'"seq":1' in answer, answer
        assert "limit_concurrency lowered" not in log.read_text()  # 1,000 fits in 4,096


async def test_the_limit_counts_the_connection_asking(redis_url) -> None:
    """At most --limit-concurrency connections are served at once, as documented: a request on
    the limit-th connection was refused (the connection counted itself against the limit), so
    --limit-concurrency 1, or a limit fitted down to 1, answered every request 503."""
    async with serving(redis_url, limit_concurrency=1) as (app, _, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEALTHZ)
        async with asyncio.timeout(5):
            assert (await read_answer(reader))[0] == 200
        # A second connection is past the limit: refused, and the first is served again.
        other_reader, other_writer = await asyncio.open_connection("127.0.0.1", port)
        other_writer.write(CHEAP)
        async with asyncio.timeout(5):
            assert (await read_answer(other_reader))[0] == 503
        writer.write(HEALTHZ)
        async with asyncio.timeout(5):
            assert (await read_answer(reader))[0] == 200
        writer.close()
        other_writer.close()
        assert app.counters.responses[503, "overloaded"] == 1


async def test_the_probes_and_metrics_are_answered_past_the_limit(redis_url) -> None:
    """Past --limit-concurrency every request was answered 503 ``overloaded``, the probes too:
    while Redis hangs every request in progress waits 10 s, and a liveness probe (``/healthz``)
    then failed under load, so Kubernetes restarted a process that was only waiting, losing the
    requests in progress. The probes and ``/metrics`` hold no Redis connection (``/readyz``'s
    PING is shared) and end at once: they are answered past the limit."""
    async with serving(redis_url, gated=True, limit_concurrency=2) as (app, server, port):
        held = []
        for _ in range(2):  # the limit's requests in progress, waiting at the gate
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(publish_request(json.dumps(EXPIRED).encode()))
            held.append((reader, writer))
        # (both started: uvicorn's tasks, no event to wait for)
        async with asyncio.timeout(5):
            while len(server.server_state.tasks) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        for request, expected in [
            (HEALTHZ, b'{"status":"ok"}'),
            (b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n", b'{"ready":true}'),
        ]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            async with asyncio.timeout(5):
                status, _, body = await read_answer(reader)
            writer.close()
            assert (status, body) == (200, expected), request
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        async with asyncio.timeout(5):
            status, _, body = await read_answer(reader)
        writer.close()
        assert status == 200 and b'responses_total{status="503",code="overloaded"} ' not in body
        # Anything else is still refused past the limit.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(CHEAP)
        async with asyncio.timeout(5):
            status, _, body = await read_answer(reader)
        writer.close()
        assert (status, msgspec.json.decode(body)["error"]["code"]) == (503, "overloaded")
        app.publisher.gate.set()
        for reader, writer in held:
            async with asyncio.timeout(10):
                assert (await read_answer(reader))[0] == 200
            writer.close()


async def test_a_flood_of_readiness_probes_does_not_take_the_api_out(redis_url) -> None:
    """``/readyz`` needs no key: anyone who reaches the port may ask it, as often as they like.
    Each probe sent Redis a ``PING`` of its own on a connection of the publisher's pool
    (redis-py's, 100): 300 at once took the pool, and the probes past it answered 503 "Too many
    connections" against a healthy Redis (a load balancer then takes the API out). Concurrent
    probes now share one ``PING``: all 300 are answered 200, with a handful of connections."""
    direct = redis.Redis.from_url(redis_url)
    async with serving(redis_url) as (_, _, port):
        connected_before = direct.info("clients")["connected_clients"]
        streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(300)]
        for _, writer in streams:  # all written before any is read: they arrive together
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(20):
            answers = [await read_answer(reader) for reader, _ in streams]
        for _, writer in streams:
            writer.close()
        opened = direct.info("clients")["connected_clients"] - connected_before
    direct.close()
    refused = [body for status, _, body in answers if status != 200]
    assert not refused, f"{len(refused)} probes refused: {refused[0]!r}"
    assert opened <= 5, f"{opened} more connections to Redis"


async def test_a_client_that_stops_reading_short_of_64_kib_is_dropped(redis_url) -> None:
    """uvicorn pauses an answer only once 64 KiB are unsent, so --send-timeout started only
    then: a client that pipelined a few answers more than the kernel's buffers take and then
    read nothing, sending nothing either, left up to 64 KiB unsent. Its connection was then
    closed for --header-timeout (or keep-alive, or an answer with ``Connection: close``), and
    ``close`` waits for the unsent bytes to go out: never. The connection stayed open and
    counted against --limit-concurrency for good, so a few hundred such clients shut the API
    without another byte. Any unsent answer now has --send-timeout to be read."""
    loop = asyncio.get_running_loop()
    async with (
        serving(redis_url, send_timeout=1, header_timeout=1) as (app, server, port),
        contextlib.AsyncExitStack() as stack,
    ):
        for listener in server.servers[0].sockets:  # (small kernel buffers: see above)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock = socket.socket()  # a bare socket: never read (a StreamReader would read ahead)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        stack.callback(sock.close)  # (before the server stops: it waited for the connection)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        async with asyncio.timeout(5):
            while not server.server_state.connections:  # noqa: ASYNC110 - the accept has none
                await asyncio.sleep(0.01)
        (connection,) = server.server_state.connections
        transport = connection.transport
        lost = asyncio.Event()
        connection_lost = connection.connection_lost
        connection.connection_lost = lambda exc: (connection_lost(exc), lost.set())
        # Each answer either goes out whole or is the first left unsent (writing pauses).
        heard = asyncio.Queue()
        for name in ("on_response_complete", "pause_writing"):
            method = getattr(connection, name)
            setattr(connection, name, lambda m=method: (m(), heard.put_nowait(None)))
        async with asyncio.timeout(10):
            while transport.get_write_buffer_size() == 0:
                await loop.sock_sendall(sock, HEALTHZ)
                await heard.get()
        assert 0 < transport.get_write_buffer_size() < 65536  # under uvicorn's pause
        # The client goes quiet, reading nothing: the connection must still end.
        async with asyncio.timeout(10):
            await lost.wait()
        assert not server.server_state.connections
        assert app.counters.closed["send_timeout"] == 1


async def test_a_request_target_uvicorn_cannot_parse_is_refused_and_its_connection_closed(
    redis_url,
) -> None:
    """``CONNECT example.com:443`` (a CONNECT's only valid target, the authority form) passes
    httptools' parser, and uvicorn's URL split then raised inside the headers' callback: the
    request was counted as unanswered but never started, so the 400 waited for its answer for
    ever, and the header deadline had been cancelled. The connection stayed open without an
    answer and counted against --limit-concurrency for good: a thousand such requests, one
    small packet each, shut the API. Now it is answered 400 ``invalid_http`` and closed."""
    async with serving(redis_url, header_timeout=60) as (app, server, port):
        for target, after_an_answer in ((b"example.com:443", False), (b"[::1]:8766", True)):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if after_an_answer:  # (the connection's previous request answered)
                writer.write(HEALTHZ)
                assert (await read_answer(reader))[0] == 200
            writer.write(b"CONNECT " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n" + HEALTHZ)
            async with asyncio.timeout(5):
                status, headers, body = await read_answer(reader)
                assert await reader.read() == b""  # and the connection is closed
            writer.close()
            assert status == 400 and headers["connection"] == "close", (status, body)
            assert msgspec.json.decode(body)["error"]["code"] == "invalid_http"
        async with asyncio.timeout(5):
            while server.server_state.connections:  # noqa: ASYNC110 - closed by the server
                await asyncio.sleep(0.01)
        assert app.counters.responses[400, "invalid_http"] == 2


async def test_trailers_of_a_chunked_body_are_bounded_like_headers(redis_url) -> None:
    """A chunked body may end with trailer fields, which httptools parses as headers and uvicorn
    keeps with the request's headers, but --max-header-bytes counted only the head before the
    body: a client sending trailers as fast as it could after a body's last chunk made the
    process hold hundreds of megabytes a second until --body-timeout answered 408, and then
    --header-timeout closed the connection (1.7 GB in 6 s with both at 3 s). Trailers now
    count as a head of their own: past --max-header-bytes the request is refused with 431 and
    its connection closed."""
    head = (
        b"POST /v1/projects/1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + KEY_ALL.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    body = json.dumps(EXPIRED).encode()
    chunked = head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n"
    trailer = b"X-Trailer: " + b"t" * 100 + b"\r\n"
    limits = {"max_header_bytes": 16384, "header_timeout": 60, "body_timeout": 60}
    async with serving(redis_url, **limits) as (app, _, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sending = asyncio.create_task(send_all(writer, chunked + trailer * 20_000))  # 2 MB
        async with asyncio.timeout(10):
            # The request's answer (its body never ends), and the connection is closed.
            status, _, answer = await read_answer(reader)
            assert await reader.read() == b""
            await sending
        writer.close()
        assert status == 431, answer
        assert msgspec.json.decode(answer)["error"]["code"] == "headers_too_large"
        assert app.counters.responses[431, "headers_too_large"] == 1
        assert not stream(redis_url, 1)  # the request was not published: its body never ended
        # A few trailers are a request's business: read as a chunked body's end, published.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(chunked + trailer * 10 + b"\r\n")
        async with asyncio.timeout(5):
            status, _, answer = await read_answer(reader)
        writer.close()
        assert status == 200 and b'"seq":1' in answer, answer


_METHODS = st.sampled_from(
    ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "CONNECT", "PATCH", "QUERY", "TRACE"]
)
_TARGETS = st.sampled_from(
    [
        "/v1/projects/1/events",
        "/v1/projects/1/presence",
        "/v1/revocations",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "*",
        "example.com:443",
        "[::1]:80",
        "http://t/v1/projects/1/events",
        "/v1/projects/1/events?limit=2",
        "/%2e%2e/",
        "//x",
        "/v1/projects/01/events",
        "/nowhere?a=%ff",
    ]
) | st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20)
_VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.2", ""])
_HEADERS = st.lists(
    st.sampled_from(
        [
            f"Authorization: Bearer {KEY_ALL}",
            "Authorization: Bearer nope",
            "Authorization: x",
            "Content-Type: application/json",
            "Content-Type: text/plain",
            "Content-Length: 0",
            "Content-Length: 2",
            "Content-Length: 99",
            "Content-Length: -1",
            "Content-Length: x",
            "Content-Length: 99999999999999999999999",
            "Transfer-Encoding: chunked",
            "Transfer-Encoding: identity",
            "Transfer-Encoding: gzip, chunked",
            "Expect: 100-continue",
            "Connection: close",
            "Connection: keep-alive, Upgrade",
            "Upgrade: websocket",
            "Upgrade: h2c",
            "Idempotency-Key: k",
            "Idempotency-Key: a b",
            "Host: t",
            "X-Bad-\x7f: 1",
            "X: \x01",
            " Folded: 1",
            "NoColon",
        ]
    ),
    max_size=6,
)
_BODIES = st.sampled_from(
    [b"", b"{}", b"[]", json.dumps(EXPIRED).encode(), b"2\r\n{}\r\n0\r\n\r\n", b"0\r\n\r\n",
     b"zz\r\n", b"0\r\nX-T: 1\r\n\r\n", b"\x00\xff", b"GET /healthz HTTP/1.1\r\n\r\n"]
) | st.binary(max_size=64)  # fmt: skip
#: Every code an answer may carry, and the statuses they go with (docs/http-publish.md).
_CODES = {
    400: {"invalid_json", "invalid_body", "repeated_key", "repeated_header", "invalid_header",
          "invalid_idempotency_key", "invalid_query", "invalid_http"},
    401: {"unauthorized"}, 403: {"forbidden"}, 404: {"not_found"}, 405: {"method_not_allowed"},
    408: {"body_timeout"}, 409: {"idempotency_conflict"},
    413: {"body_too_large", "too_many_events"}, 415: {"unsupported_media_type"},
    422: {"invalid_event", "invalid_revocation"},
    429: {"rate_limited"}, 431: {"headers_too_large"}, 503: {"overloaded"},
}  # fmt: skip


@contextlib.contextmanager
def _api_in_a_thread(redis_url: str, **overrides):
    """The API served in a thread's event loop (as ``serving``), for synchronous clients:
    yields ``(app, server, port)``."""
    started, stop = [], None
    ready = threading.Event()

    async def run() -> None:
        nonlocal stop
        stop = asyncio.Event()
        async with serving(redis_url, **overrides) as served:
            started.append(served)
            ready.set()
            await stop.wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(run(),))
    thread.start()
    try:
        assert ready.wait(10)
        yield started[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


def _answers(data: bytes, head_only: bool) -> list[tuple[int, dict[str, str], bytes]]:
    """The answers in ``data``, a connection's whole output (interim 1xx ones left out);
    ``head_only``: the first answer is to a HEAD (no body, whatever its Content-Length)."""
    answers = []
    while data:
        head, separator, data = data.partition(b"\r\n\r\n")
        assert separator, head
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        # (uvicorn's answer to a HEAD has no body; the server's own refusals, without a
        # ``server`` header, are to what it could not read as a request, and have one)
        answer_to_head = head_only and status >= 200 and "server" in headers
        length = 0 if answer_to_head else int(headers.get("content-length", 0))
        body, data = data[:length], data[length:]
        if status >= 200:
            answers.append((status, headers, body))
            head_only = False  # (a later answer is the refusal that ends the connection)
    return answers


def test_any_request_is_answered_as_documented_and_its_connection_ends(redis_url, caplog) -> None:
    """Requests made of any method, target, version, headers and body bytes, on their own
    connection, which the client then stops writing to: every answer is a documented status
    with a JSON body carrying a documented code (a probe's, the metrics' or a page otherwise),
    and the server ends the connection within its timeouts (a CONNECT to ``host:port`` held
    its connection for ever, unanswered); nothing is logged (clients' mistakes are counted)."""
    limits = {"header_timeout": 0.5, "body_timeout": 0.5, "send_timeout": 0.5}
    with _api_in_a_thread(redis_url, **limits) as (_, server, port):

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(_METHODS, _TARGETS, _VERSIONS, st.booleans(), _HEADERS, _BODIES)
        def check(method, target, version, authorized, headers, body) -> None:
            if authorized:  # (a request that gets as far as its body, often)
                own = [line for line in headers if not line.startswith("Auth")]
                headers = [
                    f"Authorization: Bearer {KEY_ALL}",
                    "Content-Type: application/json",
                    *own,
                ]
            request = f"{method} {target} {version}".rstrip() + "\r\n"
            request += "".join(f"{line}\r\n" for line in headers) + "\r\n"
            with socket.create_connection(("127.0.0.1", port), timeout=6) as client:
                client.sendall(request.encode("latin-1") + body)
                client.shutdown(socket.SHUT_WR)  # (the server may still answer and close)
                started, received = time.monotonic(), b""
                with contextlib.suppress(ConnectionResetError):
                    while chunk := client.recv(65536):
                        received += chunk
                # header, body and send timeouts, the linger after a refusal, and slack
                assert time.monotonic() - started < 5, (request, body, received)
            note(f"{request!r} {body!r} -> {received!r}")
            for status, answer_headers, answer in _answers(received, method == "HEAD"):
                if answer_headers.get("content-type") == "text/plain":
                    assert (status, target) == (200, "/metrics"), answer
                    continue
                assert answer_headers.get("content-type") == "application/json", answer
                if not answer:
                    assert method == "HEAD", (status, answer_headers)
                    continue
                decoded = msgspec.json.decode(answer)
                if status in (200, 503) and "error" not in decoded:
                    continue  # a page, presence, a probe, a cursor
                assert decoded["error"]["code"] in _CODES[status], (status, answer)

        check()
        deadline = time.monotonic() + 5
        while server.server_state.connections:  # none is left open
            assert time.monotonic() < deadline, server.server_state.connections
            time.sleep(0.05)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def exchange(port: int, request: bytes, *, half_close: bool) -> bytes:
    """Send ``request`` on a connection of its own (then stop writing, with ``half_close``) and
    read everything until the server ends the connection (within 5 s)."""
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    try:
        await loop.sock_sendall(sock, request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        async with asyncio.timeout(5):
            while chunk := await loop.sock_recv(sock, 65536):
                received += chunk
        return received
    finally:
        sock.close()


async def test_a_client_that_half_closes_after_its_requests_gets_their_answers(redis_url) -> None:
    """A client may end its side once its request is sent (``shutdown(SHUT_WR)``: ``nc -N``, a
    script's one-shot request): uvicorn closed the connection at that end of input, so every
    answer not written in the same instant was lost, a publish included, published and
    counted 200 but never told. The requests that arrived are answered, then the connection
    is closed (not at --header-timeout); a body that breaks off at the end still ends it."""
    history = f"GET /v1/projects/1/events HTTP/1.1\r\nAuthorization: Bearer {KEY_ALL}\r\n\r\n"
    async with serving(redis_url, header_timeout=60, body_timeout=60) as (_, server, port):

        async def half_closed(request: bytes) -> bytes:
            return await exchange(port, request, half_close=True)

        event = publish_request(json.dumps(EXPIRED).encode())
        assert b'"seq":1' in await half_closed(event)
        assert b'"events":[' in await half_closed(history.encode())
        pipelined = await half_closed(event + HEALTHZ + history.encode())
        assert pipelined.count(b"HTTP/1.1 200") == 3 and b'"seq":2' in pipelined, pipelined
        cut = publish_request(json.dumps(EXPIRED).encode())[:-5]  # the body breaks off
        assert await half_closed(cut) == b""
        async with asyncio.timeout(5):
            while server.server_state.connections:  # noqa: ASYNC110 - closed by the server
                await asyncio.sleep(0.01)
    assert len(stream(redis_url, 1)) == 2


async def test_a_pipelined_request_whose_body_breaks_off_gets_one_answer_at_once(
    redis_url, caplog
) -> None:
    """A request queued behind another (pipelined) whose body breaks off (a broken chunk) was
    started once the first was answered, waited --body-timeout for a body that could never end
    and was answered 408 ``body_timeout``, then the refusal followed: two answers to one
    request, the 400 ten seconds late. It never starts now: the first request's answer, then
    the refusal at once. A client that half-closes after such a pipeline (a complete request,
    then one whose body is cut by the end of its input) gets the first one's answer, where the
    connection was closed at once and that answer (of a publish) was lost."""
    head = (
        b"POST /v1/projects/1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + KEY_ALL.encode() + b"\r\n"
    )
    body = json.dumps(EXPIRED).encode()
    broken = head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body + b"\r\nzz\r\n"
    event = publish_request(body)
    async with serving(redis_url, body_timeout=60, header_timeout=60) as (app, server, port):
        answers = _answers(await exchange(port, event + broken + HEALTHZ, half_close=False), False)
        assert [status for status, _, _ in answers] == [200, 400], answers
        assert msgspec.json.decode(answers[1][2])["error"]["code"] == "invalid_http"
        answers = _answers(await exchange(port, event + event[:-5], half_close=True), False)
        assert [status for status, _, _ in answers] == [200], answers
        async with asyncio.timeout(5):
            while server.server_state.connections:  # noqa: ASYNC110 - closed by the server
                await asyncio.sleep(0.01)
        assert (408, "body_timeout") not in app.counters.responses
        assert app.counters.responses[400, "invalid_http"] == 1
        assert app.counters.responses[200, "ok"] == 2
    assert len(stream(redis_url, 1)) == 2
    assert "Exception" not in caplog.text and "Traceback" not in caplog.text, caplog.text


async def test_a_body_breaking_off_after_its_answer_gets_no_second_answer(redis_url) -> None:
    """A request answered before its body ended (401 for an unknown key, 413 past --max-body:
    the rest of the body is read and dropped) whose body then broke off (a broken chunk) got
    the refusal as well: a second answer to one request, which a client that pipelined its next
    request reads as that one's. The connection now ends after the one answer."""
    chunked = (
        b"POST /v1/projects/1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nAuthorization: Bearer "
    )
    cases = [
        (chunked + b"ebk_unknown\r\n\r\n5\r\nhello\r\n", 401),
        (chunked + KEY_ALL.encode() + b"\r\n\r\n400\r\n" + b"x" * 1024 + b"\r\n", 413),
    ]
    async with serving(redis_url, body_timeout=60, header_timeout=60, max_body=100) as (
        app,
        _,
        port,
    ):
        for request, status in cases:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            async with asyncio.timeout(5):
                assert (await read_answer(reader))[0] == status
                writer.write(b"zz\r\n" + HEALTHZ)  # the body breaks off
                assert await reader.read() == b""  # no second answer; the connection ends
            writer.close()
        await asyncio.sleep(0.1)
        assert app.counters.responses == {(401, "unauthorized"): 1, (413, "body_too_large"): 1}
