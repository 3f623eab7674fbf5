"""Property-based fuzzing of the gateway's client edges against a running gateway (issue 11).

A real ``python -m gateway`` process (auth, an Origin allowlist, a small frame limit, a short auth
timeout) on a private Redis gets what hypothesis makes of WebSocket frames (bytes, text, invalid
UTF-8, JSON of any shape, deep nesting, huge numbers, wrong types, oversized), before and after
authentication, and of raw HTTP requests (methods, paths, query strings, headers, repeated ones).
Whatever it gets:

* a frame ends in a documented ``error`` code or a documented close code, never 1011;
* a request gets a documented status, never 500;
* the gateway logs nothing at error level (no traceback) and stays healthy;
* a bystander subscribed to another project all along receives every one of its events, in
  order, exactly once (a publisher feeds that project during the whole module).
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import json
import random
import socket
import string
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from publisher import Publisher, issue_token
from schemas.protocol import ErrorCode
from tests.support.gateway_client import SECRET
from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import RedisServer

ORIGIN = "https://dash.example"
MAX_FRAME = 4096
BYSTANDER_PROJECT = 999
FUZZER_PROJECTS = [1, 2, 3, 4, 5]
#: How often the bystander pings the gateway (and checks the pongs). Not websockets' keepalive
#: (``ping_interval``, off on the module's long-lived connections): it draws ping payloads from
#: the global ``random`` in its own thread, and one drawn while hypothesis generates an example
#: is a HypothesisDeprecationWarning ("Do not use the `random` module inside strategies"),
#: whenever the module ran past the keepalive's first 20 s (a loaded machine). The bystander
#: draws from a ``random.Random`` of its own.
BYSTANDER_PING_INTERVAL = 1.0

#: Close codes a frame may end in (docs/protocol.md): auth failed / token expired before auth,
#: too many malformed frames or too many frames refused by the rate limit after it, and
#: websockets' own protocol closes.
CLOSES_BEFORE_AUTH = {4001, 4002, 1002, 1007, 1009}
CLOSES_AFTER_AUTH = {4009, 4029, 1002, 1007, 1009}
ERROR_CODES = {code.value for code in ErrorCode}
CONTROL = {"authenticated", "subscribed", "unsubscribed", "resync_required", "error", "pong"}
#: Presence messages: like events, only ever of a project the token names.
PRESENCE = {"presence", "presence_diff"}
#: Every status the gateway documents for a request (101: a fuzzed request that happens to be a
#: valid WebSocket upgrade; None: websockets' HTTP parser refused the request, a body, a bad
#: Content-Length or header line, and closed the connection without an answer).
STATUSES = {None, 101, 200, 204, 400, 401, 403, 404, 405, 426, 503, 505}

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --- the running gateway and its bystander ----------------------------------------------------


class Bystander:
    """A healthy subscriber of :data:`BYSTANDER_PROJECT`, and a publisher feeding that project,
    each in a thread for the whole module."""

    def __init__(self, gateway: GatewayProcess, redis_url: str) -> None:
        self.gateway = gateway
        self.publisher = Publisher.from_url(redis_url)
        self.seqs: list[int] = []
        self.start_seq = 0
        self.published = 0  # seq of the last acknowledged publish
        self.unexpected: list[object] = []
        self.closed_with: int | None = None
        #: One event per ping sent, set when its pong came back.
        self.pongs: list[threading.Event] = []
        self._random = random.Random()  # never the global one (BYSTANDER_PING_INTERVAL)
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._threads: list[threading.Thread] = []
        self.ws: ClientConnection | None = None

    def start(self) -> Bystander:
        token = issue_token(SECRET, [BYSTANDER_PROJECT], ttl=3600)
        ws = self.ws = connect(
            self.gateway.ws_url, origin=ORIGIN, open_timeout=5, ping_interval=None
        ).__enter__()
        ws.send(json.dumps({"type": "auth", "token": token}))
        assert json.loads(ws.recv(timeout=5))["type"] == "authenticated"
        ws.send(json.dumps({"type": "subscribe", "project_id": BYSTANDER_PROJECT}))
        subscribed = json.loads(ws.recv(timeout=5))
        assert subscribed["type"] == "subscribed", subscribed
        self.start_seq = self.published = subscribed["seq"]
        self._threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._publish, daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def _read(self) -> None:
        assert self.ws is not None
        try:
            for raw in self.ws:
                message = json.loads(raw)
                with self._changed:
                    if message.get("type") in CONTROL:
                        self.unexpected.append(message)
                    else:
                        self.seqs.append(message["seq"])
                    self._changed.notify_all()
        except ConnectionClosed as exc:
            with self._changed:
                self.closed_with = exc.rcvd.code if exc.rcvd else 1006
                self._changed.notify_all()

    def _publish(self) -> None:
        n = 0
        next_ping = time.monotonic()
        while not self._stop.wait(0.02):
            n += 1
            cursor = self.publisher.blocker_resolved(BYSTANDER_PROJECT, blocker_id=n, answer="ok")
            self.published = cursor.seq
            if time.monotonic() >= next_ping and self.ws is not None:
                next_ping = time.monotonic() + BYSTANDER_PING_INTERVAL
                with contextlib.suppress(ConnectionClosed):
                    self.pongs.append(self.ws.ping(self._random.randbytes(4)))

    def check(self, within: float = 15.0) -> None:
        """Everything published so far arrives, in order, exactly once, on the same connection."""
        target = self.published
        deadline = time.monotonic() + within
        with self._changed:
            while not (self.seqs and self.seqs[-1] >= target) and self.closed_with is None:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"bystander stuck at {self.seqs[-1:]}, published {target}"
                self._changed.wait(remaining)
            assert self.closed_with is None, f"the bystander was closed with {self.closed_with}"
            assert not self.unexpected, self.unexpected
            expected = list(range(self.start_seq + 1, self.seqs[-1] + 1))
            assert self.seqs == expected, "the bystander missed, repeated or reordered events"
        # Outside the lock: the reader thread must go on taking messages meanwhile.
        for pong in list(self.pongs):
            assert pong.wait(max(0.0, deadline - time.monotonic())), "a ping got no pong"

    def stop(self) -> None:
        self._stop.set()
        if self.ws is not None:
            self.ws.close()
        for thread in self._threads:
            thread.join(10)
        self.publisher.close()


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    with RedisServer() as server, GatewayProcess(
        server.url,
        auth_secret=SECRET,
        args=[
            "--allowed-origins", ORIGIN,
            "--max-frame-bytes", str(MAX_FRAME),
            "--auth-timeout", "3",
            "--max-subscriptions", "5",
            "--subscribe-timeout", "3",
        ],
    ) as process:  # fmt: skip
        process.bystander = Bystander(process, server.url).start()  # type: ignore[attr-defined]
        try:
            yield process
        finally:
            process.bystander.stop()  # type: ignore[attr-defined]


@pytest.fixture
def running(gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    """The gateway, checked after each test: alive, ready, no error-level log line, the
    bystander complete."""
    seen = len(gateway.log_lines())
    yield gateway
    assert gateway.running, gateway.tail()
    status, _ = gateway.readyz()
    assert status == 200
    new = gateway.log_lines()[seen:]
    bad = [line for line in new if '"level": "error"' in line or "Traceback" in line]
    bad += [line for line in new if '"level": "critical"' in line]
    assert not bad, "\n".join(bad[:5])
    gateway.bystander.check()  # type: ignore[attr-defined]


def test_the_bystander_pings_without_touching_the_global_random(running) -> None:
    """The module's threads run while hypothesis generates examples, which it takes for a
    strategy using ``random`` when the global state changes meanwhile
    (HypothesisDeprecationWarning, an error under ``-W error``): websockets' keepalive pings
    drew their payloads from it. The bystander's pings come back and leave it alone."""
    bystander = running.bystander
    before = random.getstate()
    sent = len(bystander.pongs)
    deadline = time.monotonic() + 2 * BYSTANDER_PING_INTERVAL + 5
    while len(bystander.pongs) < sent + 2:
        assert time.monotonic() < deadline, "the bystander stopped pinging"
        time.sleep(0.05)
    assert all(pong.wait(5) for pong in bystander.pongs)
    assert random.getstate() == before


# --- frames -------------------------------------------------------------------------------------

huge_numbers = st.one_of(
    st.integers(min_value=2**53 - 2, max_value=2**70),
    st.integers(min_value=-(2**70), max_value=0),
    st.sampled_from([1e308, -1e308, 1.5, 0.1, 10**400]),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | huge_numbers | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=15,
)
message_types = st.sampled_from(
    ["auth", "subscribe", "unsubscribe", "ping", "pong", "", "AUTH", "activity", "presence_get"]
)
item_ids = st.one_of(st.none(), st.integers(min_value=-2, max_value=5), huge_numbers, json_values)
project_ids = st.one_of(
    st.sampled_from([*FUZZER_PROJECTS, BYSTANDER_PROJECT, 0, -1, 2**53, 2**53 - 1]), json_values
)
#: Long text, often not ASCII: error messages and close reasons quote what the client sent.
long_texts = st.text(min_size=40, max_size=150)
messages = st.fixed_dictionaries(
    {},
    optional={
        "type": message_types | json_values | long_texts,
        "project_id": project_ids,
        "epoch": st.sampled_from(["e", "", "bad epoch!", "x" * 65]) | json_values,
        "after": st.integers(min_value=-2, max_value=5) | huge_numbers | json_values,
        "token": st.sampled_from(["", "a.b.c", "not-a-jwt"]) | json_values | long_texts,
        "presence": st.booleans() | json_values,
        "viewing": item_ids,
        "answering": item_ids,
    },
)


@st.composite
def nested(draw) -> str:
    depth = draw(st.integers(1, 1900))  # up to ~3.8 KB, under the frame limit
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    inner = opener * depth + "1" + closer * depth
    kind = draw(st.sampled_from(["auth", "ping", "subscribe"]))
    return f'{{"type":"{kind}","x":{inner},"token":"a","project_id":1}}'


#: (how to send it, payload): "text" a str, "binary" bytes, "raw-text" bytes as a text frame
#: (websockets sends them unchecked: invalid UTF-8 reaches the gateway).
frames = st.one_of(
    st.binary(max_size=200).map(lambda data: ("binary", data)),
    st.binary(min_size=1, max_size=60).map(lambda data: ("raw-text", b"\xff" + data)),
    st.text(max_size=200).map(lambda text: ("text", text)),
    json_values.map(lambda value: ("text", json.dumps(value))),
    messages.map(lambda message: ("text", json.dumps(message))),
    messages.map(lambda message: ("binary", json.dumps(message).encode())),
    nested().map(lambda text: ("text", text)),
    st.integers(MAX_FRAME + 1, MAX_FRAME + 2000).map(lambda n: ("text", "x" * n)),
)


def send(ws: ClientConnection, frame: tuple[str, str | bytes]) -> None:
    how, payload = frame
    if how == "raw-text":
        ws.send(payload, text=True)
    else:
        ws.send(payload)


def read_until_closed(ws: ClientConnection, within: float = 10.0) -> tuple[list[dict], int]:
    """Every message until the gateway closes the connection, and its close code."""
    received = []
    deadline = time.monotonic() + within
    try:
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the connection stayed open; got {received}"
            received.append(json.loads(ws.recv(timeout=remaining)))
    except ConnectionClosed as exc:
        return received, exc.rcvd.code if exc.rcvd else 1006


@FUZZ
@given(frame=frames)
def test_any_first_frame_closes_with_a_documented_code(running, frame):
    with connect(running.ws_url, origin=ORIGIN, open_timeout=5, max_size=2**20) as ws:
        with contextlib.suppress(ConnectionClosed):
            send(ws, frame)
        received, code = read_until_closed(ws)
    assert code in CLOSES_BEFORE_AUTH, (code, frame)
    assert received == [], received


HANDSHAKE = (
    "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    f"Origin: {ORIGIN}\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n"
).encode()


def close_code_of(data: bytes) -> int | None:
    """The code of the close frame the server sent first, if its first frame is one."""
    if len(data) >= 4 and data[0] & 0x0F == 0x8 and data[1] & 0x7F >= 2:
        return int.from_bytes(data[2:4], "big")
    return None


@FUZZ
@given(
    garbage=st.one_of(
        st.binary(min_size=1, max_size=300),
        # A frame header with any opcode and flags, masked or not, then anything.
        st.builds(
            lambda first, second, rest: bytes([first, second]) + rest,
            st.integers(0, 255),
            st.integers(0, 255),
            st.binary(max_size=64),
        ),
    )
)
def test_any_bytes_after_the_handshake_end_in_a_documented_close(running, garbage):
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(HANDSHAKE)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, "no handshake answer"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head[:100]
        data = head.split(b"\r\n\r\n", 1)[1]
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)  # then EOF: an incomplete frame must not wait for more
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                data += chunk
    code = close_code_of(data)
    assert code is None or code in CLOSES_BEFORE_AUTH, (code, garbage)


class Fuzzer:
    """One authenticated connection reused across examples (reconnected after a close)."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.ws: ClientConnection | None = None

    def connection(self) -> ClientConnection:
        if self.ws is None:
            self.ws = connect(  # no keepalive: see BYSTANDER_PING_INTERVAL
                self.gateway.ws_url,
                origin=ORIGIN,
                open_timeout=5,
                max_size=2**20,
                ping_interval=None,
            ).__enter__()
            token = issue_token(SECRET, FUZZER_PROJECTS, ttl=3600)
            self.ws.send(json.dumps({"type": "auth", "token": token}))
            assert json.loads(self.ws.recv(timeout=5))["type"] == "authenticated"
        return self.ws

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None


@pytest.fixture(scope="module")
def fuzzer(gateway: GatewayProcess) -> Iterator[Fuzzer]:
    fuzzer = Fuzzer(gateway)
    yield fuzzer
    fuzzer.close()


def check_messages(received: list[dict]) -> None:
    for message in received:
        kind = message.get("type")
        if kind == "error":
            assert message["code"] in ERROR_CODES, message
        elif kind in PRESENCE:
            assert message["project_id"] in FUZZER_PROJECTS, message
        elif kind not in CONTROL:
            # An event: only of a project the token names, never the bystander's.
            assert message.get("project_id") in FUZZER_PROJECTS, message


@FUZZ
@given(batch=st.lists(frames, min_size=1, max_size=12))
def test_any_frames_after_auth_get_documented_errors_or_closes(running, fuzzer, batch):
    ws = fuzzer.connection()
    try:
        for frame in batch:
            send(ws, frame)
        # The ping's pong (or a close) tells that every frame before it was handled.
        ws.send(json.dumps({"type": "ping"}))
        received: list[dict] = []
        deadline = time.monotonic() + 10
        while not received or received[-1].get("type") != "pong":
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no pong; got {received}"
            received.append(json.loads(ws.recv(timeout=remaining)))
        check_messages(received)
    except ConnectionClosed as exc:
        fuzzer.ws = None
        code = exc.rcvd.code if exc.rcvd else 1006
        assert code in CLOSES_AFTER_AUTH, (code, batch)


# --- HTTP requests ------------------------------------------------------------------------------

paths = st.one_of(
    st.sampled_from(
        [
            "/",
            "/healthz",
            "/readyz",
            "/metrics",
            "/eventbus.js",
            "/eventbus.d.ts",
            "/v1/projects/1/events",
            "/v1/projects/999/events",
            "/v1/projects/0/events",
            "/v1/projects/1/events?epoch=e&after=1&limit=5",
            "/v1/projects/" + "9" * 40 + "/events",
            # SSE streams (gateway.sse takes these over before anything else reads them)
            "/v1/projects/1/stream",
            "/v1/projects/1/stream?presence=1",
            "/v1/projects/01/stream",
            "/v1/stream?project=1&project=2",
            "/v1/stream?project=1&project=1&project=" + "9" * 20,
            "/v1/stream?" + "&".join(["project=1"] * 50),
            "/../etc/passwd",
            "*",
            "//[x",
            "http://[::1/healthz",
        ]
    ),
    st.builds(
        lambda project, query: f"/v1/projects/{project}/events?{query}",
        st.text(string.ascii_letters + string.digits + "%-_.", max_size=12),
        st.text(string.ascii_letters + string.digits + "=&%;+-_.", max_size=40),
    ),
    st.builds(
        lambda query: f"/v1/stream?{query}",
        st.text(string.ascii_letters + string.digits + "=&%;+-_.#", max_size=40),
    ),
    st.text(string.ascii_letters + string.digits + "/?=&%.-_~;:@!$'()*+,[]#", max_size=60).map(
        lambda tail: "/" + tail
    ),
)
methods = st.one_of(
    st.sampled_from(["GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "PATCH", "CONNECT"]),
    st.text(string.ascii_letters, min_size=1, max_size=8),
)
#: Any header text a proxy could pass on: printable ASCII and Latin-1, never CR or LF.
latin1_texts = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40
)
header_values = st.one_of(
    st.sampled_from(
        [
            "websocket",
            "Upgrade",
            "h2c",
            "13",
            "a:1",
            "1=a:1,2=b:2:0123456789abcdef",
            "dGhlIHNhbXBsZSBub25jZQ==",
            ORIGIN,
            "https://evil.example",
            f"Bearer {issue_token(SECRET, [1], ttl=3600)}",
            "Bearer nope",
            "Basic abc",
            "",
            "0",
            "-1",
        ]
    ),
    latin1_texts,
    latin1_texts.map(lambda text: "Bearer " + text),
    st.builds(
        lambda parts: "Bearer " + ".".join(parts),
        st.lists(st.text(string.ascii_letters + string.digits + "-_=", max_size=30), max_size=4),
    ),
)
header_names = st.one_of(
    st.sampled_from(
        [
            "Upgrade",
            "Connection",
            "Origin",
            "Authorization",
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Version",
            "Sec-WebSocket-Extensions",
            "Sec-WebSocket-Protocol",
            "Content-Length",
            "Transfer-Encoding",
            "Host",
            "Access-Control-Request-Method",
            "Last-Event-ID",
        ]
    ),
    st.text(string.ascii_letters + "-", min_size=1, max_size=12),
)


@st.composite
def requests(draw) -> bytes:
    method = draw(methods)
    lines = [f"{method} {draw(paths)} HTTP/{draw(st.sampled_from(['1.1', '1.1', '1.0']))}"]
    if draw(st.booleans()):
        lines.append("Host: 127.0.0.1")
    # Often the pieces of a real upgrade, so the handshake checks are reached, some repeated.
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=8))
    if draw(st.booleans()):
        headers += [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ]
    if headers and draw(st.booleans()):
        headers.append(draw(st.sampled_from(headers)))  # a repeat
    lines += [f"{name}: {value}" for name, value in draw(st.permutations(headers))]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def http_status(port: int, request: bytes, within: float = 10.0) -> int | None:
    """Send ``request``; the status of the answer, None when the connection was closed without
    one (the gateway closes the connection after every non-WebSocket answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=within) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    if not data:
        return None
    status_line = data.split(b"\r\n", 1)[0].split()
    assert status_line[0].startswith(b"HTTP/1.1"), data[:200]
    return int(status_line[1])


@FUZZ
@given(request=requests())
def test_any_request_gets_a_documented_status(running, request):
    status = http_status(running.port, request)
    assert status in STATUSES, (status, request)


# --- the pure parts, without sockets ------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300),
        json_values.map(json.dumps),
        messages.map(json.dumps),
        nested(),
        st.integers(1, 20_000).map(lambda depth: "[" * depth),
    )
)
def test_decode_frame_only_ever_raises_protocol_error(data):
    from gateway.client_input import decode_frame
    from schemas.protocol import ProtocolError

    try:
        decode_frame(data)
    except ProtocolError as exc:
        assert exc.code in ErrorCode and exc.message


@settings(max_examples=200, deadline=None)
@given(headers=st.lists(st.tuples(header_names, header_values), max_size=10))
def test_repeated_header_finds_exactly_the_repeated_single_valued_ones(headers):
    from websockets.datastructures import Headers

    from gateway.client_input import SINGLE_VALUED_HEADERS, repeated_header

    counts = {}
    for name, _ in headers:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    repeated = [n for n in SINGLE_VALUED_HEADERS if counts.get(n.lower(), 0) > 1]
    assert repeated_header(Headers(headers)) == (repeated[0] if repeated else None)
    if not repeated:
        for name in SINGLE_VALUED_HEADERS:
            Headers(headers).get(name)  # never MultipleValuesError


def websockets_reads(data: bytes):
    """What websockets' own parser makes of ``data`` as a connection's first bytes: the request,
    or None (refused, or it waits for more)."""
    from websockets.http11 import Request
    from websockets.server import ServerProtocol

    protocol = ServerProtocol()
    protocol.receive_data(data)
    events = protocol.events_received()
    return events[0] if events and isinstance(events[0], Request) else None


def mutated(data: bytes, at: int, byte: int, insert: bool) -> bytes:
    at %= len(data) + 1
    return data[:at] + bytes([byte]) + data[at + (0 if insert else 1) :]


@st.composite
def nearly_plain_requests(draw) -> bytes:
    """Requests close to what parse_plain_request reads: GET, HTTP/1.1, fields of any header
    text with spaces and tabs around the values, sometimes none or a name alone."""
    lines = [f"GET {draw(paths)} HTTP/1.1"]
    spaces = st.text(" \t", max_size=2)
    for name, value in draw(st.lists(st.tuples(header_names, latin1_texts), max_size=10)):
        lines.append(f"{name}:{draw(spaces)}{value}{draw(spaces)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


any_requests = st.one_of(requests(), nearly_plain_requests())


@settings(max_examples=500, deadline=None)
@given(
    request=st.one_of(
        any_requests,
        st.builds(mutated, any_requests, st.integers(0, 400), st.integers(0, 255), st.booleans()),
    ),
    more=st.sampled_from([b"", b"", b"\x81\x80\x00\x00\x00\x00", b"GET / HTTP/1.1\r\n\r\n"]),
)
def test_a_plain_request_is_read_exactly_as_websockets_reads_it(request, more):
    # The gateway reads a plain first request itself (gateway.client_input): whenever it does,
    # websockets would have made the same request of the same bytes; whatever it does not read
    # goes to websockets' parser as before (any request, valid or hostile, with what follows).
    from gateway.client_input import parse_plain_request

    data = request + more
    plain = parse_plain_request(data)
    if plain is None:
        return
    assert not more  # a plain request is exactly the read: what follows goes to websockets
    theirs = websockets_reads(data)
    assert theirs is not None, data
    assert (plain.method, plain.path, plain.protocol) == (
        theirs.method,
        theirs.path,
        theirs.protocol,
    )
    assert list(plain.headers.raw_items()) == list(theirs.headers.raw_items())


def without_date(response) -> tuple:
    items = [item for item in response.headers.raw_items() if item[0] != "Date"]
    return response.status_code, response.reason_phrase, items, response.body


@st.composite
def handshakes(draw) -> bytes:
    """Opening handshakes, valid or nearly: each field of a valid one, often as is, else in
    another case or a near miss, sometimes missing or repeated, in any order, among others."""

    def value(good: str, *others: str) -> str:
        return draw(st.sampled_from([good, good, good, good, *others]))

    fields = [
        ("Host", "127.0.0.1"),
        ("Connection", value("Upgrade", "upgrade", "keep-alive, Upgrade", "x")),
        ("Upgrade", value("websocket", "WebSocket", "websocket, h2c", "h2c")),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", value("13", "8", "13, 8")),
    ]
    fields = [field for field in fields if draw(st.integers(0, 9))]  # one in ten missing
    fields += draw(st.lists(st.tuples(header_names, header_values), max_size=2))
    if not draw(st.integers(0, 4)):
        fields.append((draw(st.sampled_from(["Connection", "Upgrade", "Origin"])), "websocket"))
    fields = draw(st.permutations(fields))
    lines = ["GET / HTTP/1.1"] + [f"{name}: {text}" for name, text in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@settings(max_examples=1000, deadline=None)
@given(
    request=st.one_of(handshakes(), handshakes(), any_requests),
    key=st.one_of(
        st.just("dGhlIHNhbXBsZSBub25jZQ=="),
        st.binary(min_size=16, max_size=16).map(lambda raw: base64.b64encode(raw).decode()),
        st.binary(min_size=14, max_size=18).map(lambda raw: base64.b64encode(raw).decode()),
        st.text(string.ascii_letters + string.digits + "+/=", min_size=22, max_size=26),
    ),
)
def test_a_plain_handshake_is_answered_exactly_as_websockets_answers_it(request, key):
    # The gateway answers the common handshake itself (gateway.websocket.accept_plain): when
    # it does, websockets would have answered the same (its Date aside, made the same way).
    from websockets.server import ServerProtocol

    from gateway.websocket import accept_plain

    request = request.replace(b"dGhlIHNhbXBsZSBub25jZQ==", key.encode())
    parsed = websockets_reads(request)
    if parsed is None:
        return
    before = int(time.time())
    ours = accept_plain(parsed)
    if ours is None:
        return
    theirs = ServerProtocol().accept(parsed)
    assert without_date(ours) == without_date(theirs)
    dates = {email.utils.formatdate(t, usegmt=True) for t in range(before, int(time.time()) + 1)}
    assert ours.headers["Date"] in dates and theirs.headers["Date"] in dates


def test_the_handshakes_of_browsers_and_tools_are_answered_without_websockets_accept():
    from gateway.client_input import parse_plain_request
    from gateway.websocket import accept_plain

    chrome = (
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Origin: https://app.example.com\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
    )
    for data in (chrome, HANDSHAKE):
        answer = accept_plain(parse_plain_request(data))
        assert answer is not None and answer.status_code == 101
    assert answer.headers["Sec-WebSocket-Accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455
    # Left to websockets: Firefox's "keep-alive, Upgrade", a subprotocol, a bad key.
    for other in (
        chrome.replace(b"Connection: Upgrade", b"Connection: keep-alive, Upgrade"),
        chrome.replace(b"Host: h", b"Host: h\r\nSec-WebSocket-Protocol: chat"),
        chrome.replace(b"x3JJHMbDL1EzLkh9GBhXDw==", b"x3JJHMbDL1EzLkh9GBhXD===", 1),
        chrome.replace(b"Upgrade: websocket", b"Upgrade: websocket\r\nUpgrade: h2c"),
    ):
        assert accept_plain(parse_plain_request(other)) is None


def test_handshakes_of_browsers_and_tools_are_plain_requests():
    from gateway.client_input import parse_plain_request

    browser = (
        b"GET /?v=1 HTTP/1.1\r\nHost: events.example.com\r\nConnection: Upgrade\r\n"
        b"Pragma: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0\r\n"
        b"Upgrade: websocket\r\nOrigin: https://app.example.com\r\nSec-WebSocket-Version: 13\r\n"
        b"Accept-Language: en-US,en;q=0.9\r\nCookie: session=abc; \xe9t\xe9=1 \r\n"
        b"Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
    )
    for data in (browser, HANDSHAKE):
        plain = parse_plain_request(data)
        assert plain is not None
        assert list(plain.headers.raw_items()) == list(websockets_reads(data).headers.raw_items())
    assert parse_plain_request(browser).headers["Cookie"] == "session=abc; \xe9t\xe9=1"
    # Not plain: left to websockets (a body, HTTP/1.0, a bare LF, frames sent early, a part).
    for other in (
        browser.replace(b"Pragma", b"Content-Length: 0\r\nPragma"),
        browser.replace(b"HTTP/1.1", b"HTTP/1.0", 1),
        browser.replace(b"\r\nPragma", b"\nPragma"),
        browser + b"\x81\x80\x00\x00\x00\x00",
        browser[:-2],
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 129 + b"\r\n",
    ):
        assert parse_plain_request(other) is None


@pytest.mark.parametrize(
    ("limit", "value", "request_bytes"),
    [
        # A deployment may lower websockets' limits (WEBSOCKETS_MAX_NUM_HEADERS and
        # WEBSOCKETS_MAX_LINE_LENGTH, read when websockets is imported): a request over them is
        # refused by websockets (431), and so it must not be read as plain either.
        (
            "MAX_NUM_HEADERS",
            16,
            HANDSHAKE.replace(b"\r\n\r\n", b"\r\n" + b"X: y\r\n" * 20 + b"\r\n"),
        ),
        (
            "MAX_LINE_LENGTH",
            1024,
            HANDSHAKE.replace(b"\r\n\r\n", b"\r\nCookie: " + b"a" * 2000 + b"\r\n\r\n"),
        ),
    ],
)
def test_a_request_over_websockets_limits_as_configured_is_not_plain(
    monkeypatch, limit, value, request_bytes
):
    import websockets.http11

    from gateway.client_input import parse_plain_request

    assert parse_plain_request(request_bytes) is not None  # within websockets' defaults
    monkeypatch.setattr(websockets.http11, limit, value)
    assert websockets_reads(request_bytes) is None  # websockets refuses it now (431)
    assert parse_plain_request(request_bytes) is None


def test_reading_a_plain_request_takes_time_linear_in_its_size():
    # A hostile first read: one header value with a long run of spaces inside it (a valid
    # request, so it is read). websockets reads 8 KiB of it in a tenth of a millisecond; the
    # gateway's reading must not be quadratic in it (it was: 32 ms of the event loop for one
    # 8 KiB request, so a few dozen such connections a second held a core). Measured as a
    # ratio, the best of several runs, so that a loaded machine does not decide it: 8 times
    # the bytes must take well under 64 times the time.
    from gateway.client_input import parse_plain_request

    def request(spaces: int) -> bytes:
        return b"GET / HTTP/1.1\r\nX: a" + b" " * spaces + b"b\r\n\r\n"

    def best(data: bytes) -> float:
        timings = []
        for _ in range(7):
            start = time.perf_counter()
            assert parse_plain_request(data) is not None
            timings.append(time.perf_counter() - start)
        return min(timings)

    small, large = request(1000), request(8000)
    best(large)  # warm
    assert best(large) < 20 * best(small)


def test_admission_counts_every_socket_and_bounds_them():
    from gateway.session import Admission

    admission = Admission(max_connections=2, slack=1)
    assert admission.accept() and not admission.full()  # the first asks: 0 others
    assert admission.accept() and not admission.full()  # 1 other
    assert admission.accept() and admission.full()  # 2 others: 503
    assert not admission.accept(), "past the limit and its slack: dropped at accept"
    assert admission.open == 3
    admission.release()
    assert admission.open == 2 and admission.accept()


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_close_reason_fits_a_close_frame_and_keeps_whole_characters(text):
    from gateway.client_input import MAX_CLOSE_REASON_BYTES, close_reason

    reason = close_reason(text)
    assert len(reason.encode()) <= MAX_CLOSE_REASON_BYTES
    assert text.startswith(reason)
    if len(text.encode()) <= MAX_CLOSE_REASON_BYTES:
        assert reason == text
