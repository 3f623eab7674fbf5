"""The gateway as a real process: CLI, JSON logs, SIGTERM drain, and random input."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from gateway.__main__ import loop_factory
from tests.support.gateway_client import SECRET, RecordingClient, client_for, publish
from tests.support.gateway_process import parse_metrics
from tests.support.redis_server import free_port
from tests.test_gateway_http import request


async def wait_ready(port: int, process: subprocess.Popen, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while True:
        assert process.poll() is None, process.stderr.read().decode()
        try:
            if (await request(port, "/readyz"))[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "gateway did not become ready"
        await asyncio.sleep(0.05)


@pytest.fixture
def gateway_process(redis_url):
    processes = []

    def start(*args: str, sighup=signal.SIG_DFL) -> tuple[subprocess.Popen, int]:
        """Start a gateway with SIGHUP's disposition ``sighup`` (inherited: a test run started
        with ``nohup`` would otherwise start every gateway with SIGHUP ignored)."""
        port = free_port()
        env = {**os.environ, "EVENTBUS_REDIS_URL": redis_url, "EVENTBUS_AUTH_SECRET": SECRET}
        previous = signal.signal(signal.SIGHUP, sighup)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--port", str(port), "--log-format", "json",
                 *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
        finally:
            signal.signal(signal.SIGHUP, previous)
        processes.append(process)
        return process, port

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(10)


@pytest.mark.parametrize(
    ("loop", "stop_signal"),
    [("uvloop", signal.SIGTERM), ("asyncio", signal.SIGTERM), ("asyncio", signal.SIGHUP)],
)
async def test_sigterm_drains_readiness_first_then_closes_clients_with_1012(
    gateway_process, publisher, loop, stop_signal
):
    """SIGTERM (or SIGHUP, whose default action cut every client without a close frame)."""
    process, port = gateway_process("--drain-delay", "0.5", "--drain-timeout", "5", "--loop", loop)
    await wait_ready(port, process)
    url = f"ws://127.0.0.1:{port}/"
    from publisher import issue_token

    clients = [
        await RecordingClient(url, token=issue_token(SECRET, [1])).connect() for _ in range(5)
    ]
    for client in clients:
        await client.subscribe(1)
    await publish(publisher, 1, 3)
    for client in clients:
        await client.wait_for(lambda c=client: c.seqs(1) == [1, 2, 3])
    started = time.monotonic()
    process.send_signal(stop_signal)
    async with asyncio.timeout(5):
        while (await request(port, "/readyz"))[0] != 503:  # noqa: ASYNC110 - an HTTP poll
            await asyncio.sleep(0.02)
    for client in clients:
        await asyncio.wait_for(client.closed.wait(), 10)
        assert client.close_code == 1012
    assert await asyncio.to_thread(process.wait, 10) == 0
    assert time.monotonic() - started < 6
    logs = [json.loads(line) for line in process.stderr.read().decode().splitlines() if line]
    events = [entry["event"] for entry in logs]
    assert "gateway listening" in events and "draining" in events and "drained" in events
    assert next(e for e in logs if e["event"] == "stop signal")["signal"] == stop_signal.name
    assert all("timestamp" in entry and "level" in entry for entry in logs)
    listening = next(entry for entry in logs if entry["event"] == "gateway listening")
    assert listening["loop"] == loop


async def test_a_gateway_started_with_sighup_ignored_keeps_ignoring_it(gateway_process):
    """``nohup python -m gateway``: the terminal closing must not stop it. The kernel's own
    record of the running process says SIGHUP is ignored, not caught (as it is without nohup)."""

    def mask(process, field: str) -> int:
        with open(f"/proc/{process.pid}/status") as status:
            line = next(line for line in status if line.startswith(field + ":"))
        return int(line.split()[1], 16)

    hup = 1 << (signal.SIGHUP - 1)
    plain, port = gateway_process()
    nohup, nohup_port = gateway_process(sighup=signal.SIG_IGN)
    await wait_ready(port, plain)
    await wait_ready(nohup_port, nohup)
    assert mask(plain, "SigCgt") & hup and not mask(plain, "SigIgn") & hup
    assert mask(nohup, "SigIgn") & hup and not mask(nohup, "SigCgt") & hup


def test_the_event_loop_is_asyncio_unless_uvloop_is_asked_for(monkeypatch):
    import uvloop

    assert loop_factory("asyncio") is None
    assert loop_factory("uvloop") is uvloop.new_event_loop
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as on a platform without it
    with pytest.raises(SystemExit, match="uvloop is not installed"):
        loop_factory("uvloop")


def test_bad_configuration_exits_2_with_a_clear_message():
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    result = subprocess.run(
        [sys.executable, "-m", "gateway"], env=env, capture_output=True, timeout=30
    )
    assert result.returncode == 2
    assert b"auth secret is required" in result.stderr and b"Traceback" not in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--no-auth", "--port", "x"],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2 and b"port" in result.stderr
    # A secret that cannot be an HMAC key started a gateway that refused every token.
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--auth-secret", '{"kty": "oct", "k": "c2VjcmV0"}'],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2 and b"Traceback" not in result.stderr
    assert b"EVENTBUS_AUTH_SECRET" in result.stderr and b"JWK" in result.stderr


def test_development_mode_warns_loudly(gateway_process):
    process, port = gateway_process("--no-auth")
    asyncio.run(wait_ready(port, process))
    process.send_signal(signal.SIGTERM)
    process.wait(10)
    stderr = process.stderr.read().decode()
    assert "DEVELOPMENT MODE: authentication is disabled" in stderr


def random_frames(rng: random.Random, count: int) -> list[str | bytes]:
    """Frames a buggy or hostile client might send."""
    values = [None, True, -1, 0, 1, 2**63, 1.5, "", "x" * 300, [], {}, {"a": 1}, "subscribe"]
    kinds = ["auth", "subscribe", "unsubscribe", "ping", "pong", "", None, 7]
    frames: list[str | bytes] = []
    for _ in range(count):
        shape = rng.random()
        if shape < 0.25:
            frames.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))))
        elif shape < 0.35:
            frames.append(rng.choice(["", "{", "}", "null", "[]", '{"type":', "\x00", "💥"]))
        else:
            message = {"type": rng.choice(kinds)}
            for field in rng.sample(
                ["project_id", "epoch", "after", "token", "extra"], rng.randint(0, 4)
            ):
                message[field] = rng.choice(values)
            frames.append(json.dumps(message))
    return frames


async def test_random_frames_never_break_the_gateway_or_other_clients(gateways, publisher):
    gateway = await gateways()
    bystander = await client_for(gateway, [2])
    await bystander.subscribe(2)
    rng = random.Random(1234)
    fuzzer = await client_for(gateway, [1])
    for index, frame in enumerate(random_frames(rng, 400)):
        if fuzzer.closed.is_set():  # 4009 after ten bad frames in a row: come back
            # (or 4029: 480 frames at once are over the rate limit, which refuses some first)
            assert fuzzer.close_code in (4009, 4029)
            await fuzzer.connect()
        try:
            await fuzzer.send(frame)
        except Exception:
            await asyncio.wait_for(fuzzer.closed.wait(), 5)
        if index % 5 == 4 and not fuzzer.closed.is_set():
            pongs = fuzzer.count("pong")
            await fuzzer.send({"type": "ping"})
            await fuzzer.wait_for(
                lambda n=pongs: fuzzer.count("pong") > n or fuzzer.closed.is_set()
            )
    for message in fuzzer.messages:
        if message["type"] == "error":
            assert message["code"] in {
                "invalid_json",
                "invalid_message",
                "unknown_type",
                "invalid_cursor",
                "forbidden",
                "not_subscribed",
                "invalid_token",
                "too_many_subscriptions",
                "rate_limited",
            }
    assert not any(m.get("project_id") == 2 for m in fuzzer.messages if "seq" in m)
    await publish(publisher, 2, 3)
    await bystander.wait_for(lambda: bystander.seqs(2) == [1, 2, 3])
    await bystander.close()
    await fuzzer.close()


async def test_drain_is_bounded_while_redis_hangs():
    """SIGTERM with Redis stopped (sockets open, nothing answers) and live subscribers: the
    process exits within --drain-timeout plus the bounded shutdown steps (docs/operations.md)."""
    from publisher import issue_token
    from tests.support.gateway_process import GatewayProcess
    from tests.support.redis_server import RedisServer, hung

    with (
        RedisServer() as server,
        GatewayProcess(server.url, auth_secret=SECRET, args=["--drain-timeout", "2"]) as gateway,
    ):
        clients = [
            await RecordingClient(gateway.ws_url, token=issue_token(SECRET, [p])).connect()
            for p in (1, 2, 3)
        ]
        for project_id, client in zip((1, 2, 3), clients, strict=True):
            await client.subscribe(project_id)
        with hung(server):
            # A subscribe in flight when Redis stopped, and one more project to let go of.
            await clients[0].send({"type": "subscribe", "project_id": 1})
            started = time.monotonic()
            code = await asyncio.to_thread(gateway.terminate, 30)
            elapsed = time.monotonic() - started
        assert code == 0, gateway.tail()
        assert elapsed < 2 + 8 + 1, f"exited after {elapsed:.1f}s; {gateway.tail()}"
        for client in clients:
            await client.close()


# --- polls while the pod drains or is full; poll settings ---------------------------------------


def _bearer(projects) -> dict[str, str]:
    from publisher import issue_token

    return {"Authorization": f"Bearer {issue_token(SECRET, projects)}"}


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_a_poll_to_a_draining_gateway_is_refused_with_503_and_retry_after(redis_url, loop):
    """A draining pod refused WebSocket handshakes and streams (503, Retry-After), but answered
    polls and catch-up pages from Redis to the end: clients kept reading from the pod going away
    instead of moving on. Now a poll is refused the same way, with CORS headers so that a page
    sees the 503, while /readyz says not ready and /healthz still answers."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    from tests.support.gateway_process import GatewayProcess

    args = ["--drain-delay", "5", "--loop", loop, "--allowed-origins", "https://app.example"]
    with GatewayProcess(redis_url, auth_secret=SECRET, args=args) as gateway:
        poll = "/v1/projects/1/events"
        assert (await request(gateway.port, poll, headers=_bearer([1])))[0] == 200
        gateway.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            while (await request(gateway.port, "/readyz"))[0] != 503:  # noqa: ASYNC110 - an HTTP poll
                await asyncio.sleep(0.02)
        headers = {**_bearer([1]), "Origin": "https://app.example"}
        status, got, body = await request(gateway.port, poll + "?epoch=e&after=0", headers=headers)
        assert status == 503, body
        assert json.loads(body)["error"] == "draining"
        assert got["retry-after"] == "1" and got["connection"] == "close"
        assert got["access-control-allow-origin"] == "https://app.example"
        # As a handshake is, and the same whatever the token: the pod is the reason.
        assert (await request(gateway.port, poll, headers={"Authorization": "Bearer x"}))[0] == 503
        with pytest.raises(InvalidStatus) as refused:
            await connect(gateway.ws_url)
        assert refused.value.response.status_code == 503
        assert (await request(gateway.port, "/healthz"))[0] == 200
        metrics = parse_metrics((await request(gateway.port, "/metrics"))[2].decode())
        assert metrics["eventbus_connections_rejected_total"] == 3
        assert metrics["eventbus_polls_total"] == 1  # only the one before the drain
        assert await asyncio.to_thread(gateway.process.wait, 15) == 0


async def test_a_poll_to_a_full_gateway_is_refused_with_503_and_retry_after(redis_url):
    """At --max-connections a handshake or a stream was refused (503, Retry-After: 5) but a
    poll, whose socket counts in the same bound, was served: a full pod took more work. Now it
    is refused the same way, health probes still answer (the accept slack), and once a socket
    is free the poll is served again."""
    from tests.support.gateway_process import GatewayProcess

    with GatewayProcess(redis_url, auth_secret=SECRET, args=["--max-connections", "2"]) as gateway:
        poll = "/v1/projects/2/events"
        assert (await request(gateway.port, poll, headers=_bearer([2])))[0] == 200
        from publisher import issue_token

        clients = [
            await RecordingClient(gateway.ws_url, token=issue_token(SECRET, [2])).connect()
            for _ in range(2)
        ]
        try:
            status, got, body = await request(gateway.port, poll, headers=_bearer([2]))
            assert status == 503, body
            assert json.loads(body)["error"] == "too_many_connections"
            assert got["retry-after"] == "5" and got["connection"] == "close"
            assert (await request(gateway.port, "/healthz"))[0] == 200
            assert (await request(gateway.port, "/readyz"))[0] == 200  # full is not unready
            await clients.pop().close()
            async with asyncio.timeout(5):
                while (await request(gateway.port, poll, headers=_bearer([2])))[0] != 200:  # noqa: ASYNC110 - an HTTP poll
                    await asyncio.sleep(0.05)
        finally:
            for client in clients:
                await client.close()


async def _poll_sent(port: int, path: str, headers: dict) -> tuple[asyncio.StreamReader, object]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {path} HTTP/1.1", "Host: x", *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    return reader, writer


@contextlib.contextmanager
def _hung_redis(server):
    """A FreezableProxy in front of ``server`` (``.url`` is its address): frozen, it holds the
    gateway's commands as a stopped Redis would, and says when one arrived (``wait_held``)."""
    from tests.support.tcp_proxy import FreezableProxy

    proxy = FreezableProxy("127.0.0.1", server.port)
    proxy.url = f"redis://127.0.0.1:{proxy.port}"
    try:
        yield proxy
    finally:
        proxy.close()


def _parse_answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head, "no answer: the connection ended without one"
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_a_poll_waiting_for_redis_when_the_drain_starts_is_answered_at_its_deadline(loop):
    """A poll waiting for a hung Redis (--subscribe-timeout 30 s) when SIGTERM comes: the drain
    did not know of it, and the process exited under it after the shutdown steps, the client
    left without an answer. Now the drain waits for it up to --drain-timeout (2 s), no longer,
    and then answers it 503 draining with Retry-After: the client polls another pod at once."""
    from tests.support.gateway_process import GatewayProcess
    from tests.support.redis_server import RedisServer

    args = ["--drain-timeout", "2", "--subscribe-timeout", "30", "--loop", loop]
    with (
        RedisServer() as server,
        _hung_redis(server) as proxy,
        GatewayProcess(proxy.url, auth_secret=SECRET, args=args) as gateway,
    ):
        poll = "/v1/projects/6/events?epoch=e&after=0"
        assert (await request(gateway.port, poll, headers=_bearer([6])))[0] == 200
        proxy.freeze()  # sockets open, nothing answers
        try:
            reader, writer = await _poll_sent(gateway.port, poll, _bearer([6]))
            await asyncio.to_thread(proxy.wait_held, b"{6}:stream")  # the poll waits for Redis
            started = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                raw = await reader.read()
            answered = time.monotonic() - started
            writer.close()
            code = await asyncio.to_thread(gateway.process.wait, 15)
            exited = time.monotonic() - started
        finally:
            proxy.thaw()
        status, headers, body = _parse_answer(raw)
        assert status == 503 and json.loads(body)["error"] == "draining", raw[:300]
        assert headers["retry-after"] == "1" and headers["connection"] == "close"
        assert 1.8 < answered < 3, answered  # at the drain's deadline, not before, not after
        assert code == 0, gateway.tail()
        assert exited < 2 + 8 + 1, f"exited after {exited:.1f}s; {gateway.tail()}"
        assert gateway.log_lines('"requests_cut": 1'), gateway.tail()


async def test_a_poll_that_redis_answers_during_the_drain_gets_its_page_before_the_exit():
    """A poll waiting for Redis when SIGTERM comes, and Redis answers 3 s later, within
    --drain-timeout (10 s): the poll gets its page, and the drain, with nothing else to wait
    for, ends then instead of at its deadline. (Before, the drain did not wait for it: the
    shutdown closed the Redis client under it, and the poll got a 503 unavailable, or nothing.)"""
    from tests.support.gateway_process import GatewayProcess
    from tests.support.redis_server import RedisServer

    args = ["--drain-timeout", "10", "--subscribe-timeout", "30"]
    with (
        RedisServer() as server,
        _hung_redis(server) as proxy,
        GatewayProcess(proxy.url, auth_secret=SECRET, args=args) as gateway,
    ):
        poll = "/v1/projects/7/events?epoch=e&after=0"
        assert (await request(gateway.port, poll, headers=_bearer([7])))[0] == 200
        proxy.freeze()
        try:
            reader, writer = await _poll_sent(gateway.port, poll, _bearer([7]))
            await asyncio.to_thread(proxy.wait_held, b"{7}:stream")  # the poll waits for Redis
            started = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(3)  # Redis answers 3 s into the drain
        finally:
            proxy.thaw()
        async with asyncio.timeout(15):
            raw = await reader.read()
        writer.close()
        code = await asyncio.to_thread(gateway.process.wait, 15)
        exited = time.monotonic() - started
        status, _, body = _parse_answer(raw)
        assert status == 200, raw[:300]
        assert json.loads(body)["resync_required"]["reason"] == "epoch_changed"
        assert code == 0 and exited < 8, f"exited after {exited:.1f}s; {gateway.tail()}"


def _content(answer: bytes) -> tuple[bytes, bytes, int]:
    """An HTTP answer's head, body and Content-Length."""
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, body, length


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_a_poll_answer_still_being_sent_when_the_drain_starts_is_sent_whole(
    redis_url, publisher, loop
):
    """A page (4 MiB: more than the kernel's send buffer holds) written to a client that reads
    nothing for a while when SIGTERM comes: the drain waited for the poll's handler only, and
    the process exited at once, cutting the answer still in its transport's buffer (the client
    got ~3.6 of its 4.1 MB). Now the drain waits, within --drain-timeout, until the answer is
    sent, and ends as soon as it is."""
    from tests.support.gateway_process import GatewayProcess
    from tests.test_gateway_http import _large_poll_sent, _read_all

    args = ["--drain-timeout", "20", "--poll-page-bytes", "4128768", "--loop", loop]
    with GatewayProcess(redis_url, auth_secret=SECRET, args=args) as gateway:
        sock = await _large_poll_sent(gateway, publisher, 13, 300)
        ev = asyncio.get_running_loop()
        try:
            first = await ev.sock_recv(sock, 4096)
            assert first.startswith(b"HTTP/1.1 200"), first[:200]
            gateway.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(2)  # a slow link: nothing read for a while
            assert gateway.running, "exited under an answer not sent yet"
            async with asyncio.timeout(30):
                answer = first + await _read_all(sock)
            read = time.monotonic()
        finally:
            sock.close()
        code = await asyncio.to_thread(gateway.process.wait, 15)
        _, body, length = _content(answer)
        assert len(body) == length > 4_000_000, (len(body), length)
        page = json.loads(body)
        assert page["more"] and page["events"][0]["seq"] == 1
        assert code == 0 and time.monotonic() - read < 5, gateway.tail()  # not at the deadline
        assert not gateway.log_lines("answers_unsent"), gateway.tail()


async def test_a_poll_answer_never_read_holds_the_drain_no_longer_than_its_timeout(
    redis_url, publisher
):
    """An answer its client never reads (and never closes: it is not gone) is waited for up to
    --drain-timeout (2 s), no longer: then the exit cuts it, and the log says so."""
    from tests.support.gateway_process import GatewayProcess
    from tests.test_gateway_http import _large_poll_sent

    args = ["--drain-timeout", "2", "--stall-timeout", "60"]
    with GatewayProcess(redis_url, auth_secret=SECRET, args=args) as gateway:
        sock = await _large_poll_sent(gateway, publisher, 14, 100)
        try:
            first = await asyncio.get_running_loop().sock_recv(sock, 4096)
            assert first.startswith(b"HTTP/1.1 200"), first[:200]
            started = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(gateway.process.wait, 15)
            exited = time.monotonic() - started
        finally:
            sock.close()
        assert code == 0, gateway.tail()
        assert 1.8 < exited < 2 + 8 + 1, f"exited after {exited:.1f}s; {gateway.tail()}"
        assert gateway.log_lines('"answers_unsent": 1'), gateway.tail()


async def test_poll_page_bytes_sets_the_size_of_a_page(redis_url, publisher):
    """--poll-page-bytes 32768: 30 events of ~15 KB come two a page, each page with ``more``
    until the last, every event once and in order (1 MiB by default: one page)."""
    from schemas.events import BlockerResolved, utc_now
    from tests.support.gateway_process import GatewayProcess

    events = [
        BlockerResolved(project_id=12, blocker_id=n, answer="€" * 5000, resolved_at=utc_now())
        for n in range(1, 31)
    ]
    await publisher.publish_many(events)
    args = ["--poll-page-bytes", "32768"]
    with GatewayProcess(redis_url, auth_secret=SECRET, args=args) as gateway:
        _, _, body = await request(gateway.port, "/v1/projects/12/events", headers=_bearer([12]))
        epoch, after, seen, pages = json.loads(body)["epoch"], 0, [], 0
        while True:
            status, _, body = await request(
                gateway.port,
                f"/v1/projects/12/events?epoch={epoch}&after={after}&limit=1000",
                headers=_bearer([12]),
            )
            assert status == 200 and len(body) <= 32768 + 1024, len(body)
            page = json.loads(body)
            pages += 1
            seen += [e["seq"] for e in page["events"]]
            after = seen[-1]
            assert len(page["events"]) == 2 and page["more"] == (after < 30), page["more"]
            if not page["more"]:
                break
        assert seen == list(range(1, 31)) and pages == 15


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--poll-page-bytes", "0"], {}, b"--poll-page-bytes"),
        (["--poll-page-bytes", "64MiB"], {}, b"--poll-page-bytes"),
        ([], {"EVENTBUS_POLL_PAGE_BYTES": "8388608"}, b"EVENTBUS_POLL_PAGE_BYTES"),
        (["--answer-min-rate", "0"], {}, b"--answer-min-rate"),
        ([], {"EVENTBUS_ANSWER_MIN_RATE": "-5"}, b"EVENTBUS_ANSWER_MIN_RATE"),
    ],
)
def test_a_nonsensical_poll_setting_is_refused_at_start(args, env, named):
    """A page bound of 0, or past what eventbus.js reads (4 MiB), or a minimum answer rate of
    0 (every answer dropped at once: a division by zero) or less: exit 2 before listening, with
    a message naming the setting, no traceback."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--no-auth", *args],
        env={**base, **env},
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert b"invalid configuration: --" in result.stderr and named in result.stderr, result.stderr
    assert b"Traceback" not in result.stderr, result.stderr
