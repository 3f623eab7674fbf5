"""A connection's write path, without a network: direct writes never overtake buffered bytes.

``Session.write`` writes straight to the socket while ``Session.writable`` says nothing is
buffered in the transport and the connection is open; websockets' own writes (pings, pongs, close
frames) reach the transport behind its back, and :class:`gateway.websocket.WebSocketConnection`
reports them. Here the "socket" is a pipe and the transport a stand-in that buffers everything
until told to flush, so the order in which bytes reach the pipe is the order on the wire.
"""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

import pytest
from websockets.protocol import State

from gateway.metrics import Metrics
from gateway.session import Admission, Outgoing, SlowConsumerPolicy
from gateway.websocket import WebSocketConnection, WebSocketSession


class HoldingTransport:
    """A transport whose socket is full: it keeps every write until :meth:`flush_to`."""

    def __init__(self) -> None:
        self.held = bytearray()

    def write(self, data: bytes) -> None:
        self.held += data

    def get_write_buffer_size(self) -> int:
        return len(self.held)

    def is_closing(self) -> bool:
        return False

    # What websockets calls when the connection is made.
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def flush_to(self, fd: int) -> None:
        os.write(fd, self.held)
        self.held.clear()


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked short frame in ``data``."""
    out, i = [], 0
    while i < len(data):
        length = data[i + 1] & 0x7F
        out.append((data[i] & 0x0F, data[i + 2 : i + 2 + length]))
        i += 2 + length
    return out


@pytest.fixture
def pipe():
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


def read_all(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""


class StubEndpoint:
    """What a connection asks of its endpoint, without a gateway behind it."""

    def __init__(self) -> None:
        self.admission = Admission(10, 0)
        self.config = SimpleNamespace(auth_timeout=10.0, no_auth=True)
        self.extensions = None
        self.max_size = 1 << 16
        self.metrics = Metrics()
        self.removed: list = []
        self.gateway = SimpleNamespace(remove_session=self.removed.append)


async def session_on(
    write_end: int,
) -> tuple[WebSocketSession, WebSocketConnection, HoldingTransport]:
    connection = WebSocketConnection(StubEndpoint())  # type: ignore[arg-type]
    transport = HoldingTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.protocol.state = State.OPEN  # as after the handshake
    session = WebSocketSession(
        connection, SlowConsumerPolicy(1 << 20, 30), lambda s: None, raw=True
    )
    connection.session = session
    session.fd = write_end  # the "socket"
    session.fast = True  # as for asyncio's own transport of a plain socket
    return session, connection, transport


async def test_an_event_frame_never_overtakes_a_ping_websockets_left_in_the_buffer(pipe) -> None:
    read_end, write_end = pipe
    session, connection, transport = await session_on(write_end)
    first = Outgoing(b'{"seq":1}')
    session.write(first.wire, [first])  # checked once, then direct
    assert session.writable
    # A keepalive ping meets a full socket: websockets leaves it in the transport's buffer.
    connection.protocol.send_ping(b"ping")
    connection.send_data()
    second = Outgoing(b'{"seq":2}')
    session.write(second.wire, [second])
    transport.flush_to(write_end)  # the socket drains: asyncio writes what it holds
    assert frames(read_all(read_end)) == [(0x1, b'{"seq":1}'), (0x9, b"ping"), (0x1, b'{"seq":2}')]


async def test_writes_go_direct_again_once_the_buffer_is_empty(pipe) -> None:
    read_end, write_end = pipe
    session, connection, transport = await session_on(write_end)
    connection.protocol.send_ping(b"ping")
    connection.send_data()
    items = [Outgoing(b'{"seq":%d}' % n) for n in (1, 2, 3)]
    session.write(items[0].wire, items[:1])  # behind the ping, in the transport
    transport.flush_to(write_end)
    session.write(items[1].wire, items[1:2])  # nothing buffered any more: direct
    assert session.writable
    session.write(items[2].wire, items[2:])
    assert transport.held == b""
    assert [p for _, p in frames(read_all(read_end))] == [b"ping", *(i.payload for i in items)]


async def test_nothing_is_written_to_the_descriptor_once_the_connection_is_lost(pipe) -> None:
    """asyncio closes the socket right after connection_lost, and the descriptor number may then
    be given to a new connection: a frame written to it would reach another client."""
    read_end, write_end = pipe
    session, connection, _ = await session_on(write_end)
    first = Outgoing(b'{"seq":1}')
    session.write(first.wire, [first])
    read_all(read_end)
    connection.connection_lost(None)
    second = Outgoing(b'{"seq":2}')
    session.write(second.wire, [second])
    assert read_all(read_end) == b""


# --- messages in fragments ----------------------------------------------------------------


async def test_a_connection_reads_fragmented_messages(gateways):
    # A message in fragments is joined before it is read; text and binary alike.
    import json

    from websockets.asyncio.client import connect

    from publisher import issue_token
    from tests.support.gateway_client import SECRET, ws_url

    gateway = await gateways()
    async with connect(ws_url(gateway)) as ws:
        token = json.dumps({"type": "auth", "token": issue_token(SECRET, [1])})
        await ws.send([token[:10], token[10:20], token[20:]])  # one text message, three frames
        assert json.loads(await ws.recv())["type"] == "authenticated"
        await ws.send(['{"type":', '"ping"}'])
        assert json.loads(await ws.recv())["type"] == "pong"
        # A character split between two fragments is still one valid UTF-8 message.
        await ws.send([b'{"type":"ping","x":"\xc3', b'\xa9"}'], text=True)
        assert json.loads(await ws.recv())["type"] == "pong"
        await ws.send([b'{"type":', b'"ping"}'])  # binary, in fragments
        assert json.loads(await ws.recv())["type"] == "pong"


async def test_a_plain_handshake_read_without_websockets_parser_leaves_it_reading_frames(
    gateways, monkeypatch
):
    # websockets' client sends a plain request, which the gateway reads itself (nothing of it
    # goes to websockets' parser): the parser then reads frames as after a request of its own,
    # between frames at first (the pong shortcut is live), and every kind of frame works.
    import json

    from websockets.asyncio.client import connect

    import gateway.websocket
    from publisher import issue_token
    from tests.support.gateway_client import SECRET, ws_url

    read: list[object] = []
    plain = gateway.websocket.parse_plain_request
    monkeypatch.setattr(
        gateway.websocket, "parse_plain_request", lambda data: read.append(plain(data)) or read[-1]
    )
    started = await gateways()
    async with connect(ws_url(started)) as ws:
        assert len(read) == 1 and read[0] is not None  # the request was plain
        (session,) = started.sessions
        connection = session.connection
        assert connection.between_frames()
        await ws.send(json.dumps({"type": "auth", "token": issue_token(SECRET, [1])}))
        assert json.loads(await ws.recv())["type"] == "authenticated"
        await ws.send(['{"type":', '"ping"}'])  # fragments, and websockets' own ping
        assert json.loads(await ws.recv())["type"] == "pong"
        await asyncio.wait_for(await ws.ping(), 5)
        assert connection.between_frames()


async def test_a_pong_answers_its_ping_and_every_earlier_one(pipe) -> None:
    _, write_end = pipe
    session, _, _ = await session_on(write_end)
    first, second, third = (session.ping(0.0) for _ in range(3))
    assert first and second and third
    session.pong(second)  # RFC 6455 lets a client answer only the latest ping it processed
    assert not session.ping_unanswered(first) and not session.ping_unanswered(second)
    assert session.ping_unanswered(third)
    session.pong(third)
    assert not session.ping_unanswered(third)


async def opened_by_handshake(write_end: int) -> tuple[WebSocketSession, WebSocketConnection]:
    """A session whose websockets parser went through a real opening handshake, so that it
    parses frames as on a live connection (``session_on`` only sets the state)."""
    session, connection, _ = await session_on(write_end)
    protocol = connection.protocol
    protocol.state = State.CONNECTING
    protocol.receive_data(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    (request,) = protocol.events_received()
    protocol.send_response(protocol.accept(request))
    protocol.data_to_send()
    assert protocol.state is State.OPEN
    return session, connection


def masked_pong(payload: bytes) -> bytes:
    from websockets.frames import Frame, Opcode

    return Frame(Opcode.PONG, payload).serialize(mask=True, extensions=[])


async def test_a_pong_read_on_its_own_answers_its_ping_without_websockets(pipe) -> None:
    # An idle connection's most frequent read: handled without websockets' parser (half of
    # an idle connection's CPU). With the locked websockets the shortcut must be live: a
    # websockets whose parser is made differently would turn it off, and this test says so.
    _, write_end = pipe
    session, connection = await opened_by_handshake(write_end)
    assert connection.between_frames()
    payload = session.ping(0.0)
    assert payload is not None
    fed: list[bytes] = []
    connection.protocol.receive_data = fed.append  # type: ignore[method-assign]
    connection.data_received(masked_pong(payload))
    assert fed == []
    assert not session.ping_unanswered(payload)


async def test_pong_shaped_bytes_are_a_frames_payload_when_they_arrive_inside_one(
    pipe, monkeypatch
) -> None:
    # Ten bytes that look like a pong are the payload of a frame whose header came in an
    # earlier read (or the rest of a frame begun there): websockets must parse them.
    _, write_end = pipe
    session, connection = await opened_by_handshake(write_end)
    payload = session.ping(0.0)
    assert payload is not None
    pong = masked_pong(payload)
    messages: list[bytes | str] = []
    monkeypatch.setattr(WebSocketConnection, "_message", lambda self, data: messages.append(data))
    connection.data_received(b"\x82\x8a\x00\x00\x00\x00")  # binary, 10 bytes, zero mask
    assert not connection.between_frames()
    connection.data_received(pong)
    assert messages == [pong]
    assert session.ping_unanswered(payload)
    # A read that ends inside a frame header leaves bytes buffered: not between frames either.
    connection.data_received(pong[:1])
    assert not connection.between_frames()
    connection.data_received(pong[1:])
    assert not session.ping_unanswered(payload)
    assert connection.between_frames()


async def test_a_pong_inside_a_fragmented_message_meets_websockets_limit_as_before(pipe) -> None:
    # websockets checks every frame of a fragmented message, control frames included, against
    # what is left of --max-frame-bytes: a 4-byte pong after fragments 2 bytes short of it is
    # 1009, in a read of its own as in one with other bytes. The shortcut must not accept it.
    from websockets.frames import Frame, Opcode

    _, write_end = pipe
    session, connection = await opened_by_handshake(write_end)
    closed: list[bool] = []
    connection.transport.can_write_eof = lambda: False  # websockets' half-close: a close here
    connection.transport.close = lambda: closed.append(True)
    payload = session.ping(0.0)
    assert payload is not None
    limit = connection.endpoint.max_size
    first = Frame(Opcode.BINARY, b"x" * (limit - 2), fin=False)
    connection.data_received(first.serialize(mask=True, extensions=[]))
    assert connection.protocol.state is State.OPEN
    connection.data_received(masked_pong(payload))
    assert connection.protocol.close_sent is not None
    assert connection.protocol.close_sent.code == 1009
    assert closed == [True]
    assert session.ping_unanswered(payload)


def test_the_unacknowledged_bound_is_set_on_tcp_sockets_and_skipped_elsewhere():
    # TCP_USER_TIMEOUT in ms on a TCP socket; False, quietly, for a socket without the option
    # (a Unix socket), a transport without a socket, or one without get_extra_info at all.
    import socket

    from gateway.session import bound_unacknowledged

    def transport(sock):
        return SimpleNamespace(get_extra_info=lambda name, default=None: sock)

    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    left, right = socket.socketpair()
    try:
        assert bound_unacknowledged(transport(accepted), 2.5) is True
        got = accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        assert got == 2500
        assert bound_unacknowledged(transport(left), 2.5) is False
        assert bound_unacknowledged(transport(None), 2.5) is False
        assert bound_unacknowledged(SimpleNamespace(), 2.5) is False
    finally:
        for sock in (server, client, accepted, left, right):
            sock.close()


def _handshake(*extra: bytes, drop: bytes = b"", path: bytes = b"/") -> bytes:
    """A plain handshake with the ``extra`` header lines added and the one starting with
    ``drop`` left out."""
    lines = [
        b"Host: 127.0.0.1",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Origin: https://app.example",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
    ]
    lines = [line for line in lines if not (drop and line.startswith(drop))] + list(extra)
    return b"GET " + path + b" HTTP/1.1\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


async def _answer(port: int, request: bytes) -> tuple[bytes, list[bytes], bytes]:
    """The gateway's answer to ``request`` sent in one write: its status line, its header lines
    but ``Date`` (sorted), and its body; after a 101, what came with the head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status, *fields = head[:-4].split(b"\r\n")
        if status.startswith(b"HTTP/1.1 101"):
            body = b""
        else:
            body = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    fields = sorted(field for field in fields if not field.lower().startswith(b"date:"))
    return status, fields, body


async def test_every_handshake_is_answered_the_same_with_or_without_the_plain_paths(
    gateways, monkeypatch
):
    # The gateway reads a plain first request itself and answers a plainly valid upgrade itself
    # (parse_plain_request, accept_plain); with both turned off every request goes through
    # websockets' parser and accept as before. The answers (Date aside) must be the same for
    # any request a client may send: the Origin allowlist, the bearer token, repeated or
    # malformed headers, another version, keep-alive, mixed case, a query, a subprotocol.
    import gateway.websocket
    from publisher import issue_token
    from tests.support.gateway_client import SECRET

    bearer = b"Authorization: Bearer " + issue_token(SECRET, [1]).encode()
    requests = [
        _handshake(),
        _handshake(bearer),
        _handshake(b"Authorization: Bearer nope"),
        _handshake(bearer, bearer),
        _handshake(b"Host: other"),
        _handshake(b"Upgrade: websocket"),
        _handshake(b"Upgrade: h2c"),
        _handshake(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="),
        _handshake(b"Origin: https://app.example"),
        _handshake(b"Origin: https://evil.example", drop=b"Origin"),
        _handshake(drop=b"Origin"),
        _handshake(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ", drop=b"Sec-WebSocket-Key"),
        _handshake(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZT==", drop=b"Sec-WebSocket-Key"),
        _handshake(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=x", drop=b"Sec-WebSocket-Key"),
        _handshake(b"Sec-WebSocket-Key: \xe9GhlIHNhbXBsZSBub25jZQ==", drop=b"Sec-WebSocket-Key"),
        _handshake(drop=b"Sec-WebSocket-Key"),
        _handshake(b"Sec-WebSocket-Version: 12", drop=b"Sec-WebSocket-Version"),
        _handshake(b"Sec-WebSocket-Version:  13 ", drop=b"Sec-WebSocket-Version"),
        _handshake(b"Sec-WebSocket-Version: 13"),
        _handshake(b"Connection: keep-alive, Upgrade", drop=b"Connection"),
        _handshake(b"Connection: keep-alive", drop=b"Connection"),
        _handshake(b"Connection: Upgrade"),
        _handshake(b"connection: UPGRADE", b"upgrade: WebSocket", drop=b"Upgrade"),
        _handshake(b"Sec-WebSocket-Protocol: chat"),
        _handshake(b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"),
        _handshake(b"Content-Length: 0"),
        _handshake(b"X-Folded: a", b" b"),
        _handshake(b"X-Nul: a\x00b"),
        _handshake(path=b"/%2e%2e/?token=x&project=1"),
        _handshake(path=b"/?a=%00"),
        _handshake().replace(b"\r\nOrigin", b"\nOrigin"),
        _handshake().replace(b"HTTP/1.1", b"HTTP/1.0", 1),
        _handshake().replace(b"GET", b"POST", 1),
    ]
    started = await gateways(allowed_origins=["https://app.example"])
    fast = [await _answer(started.port, request) for request in requests]
    monkeypatch.setattr(gateway.websocket, "parse_plain_request", lambda data: None)
    monkeypatch.setattr(gateway.websocket, "accept_plain", lambda request: None)
    slow = [await _answer(started.port, request) for request in requests]
    for request, ours, theirs in zip(requests, fast, slow, strict=True):
        assert ours == theirs, request
    statuses = {answer[0].split(b" ")[1] for answer in fast}
    assert {b"101", b"400", b"401", b"403", b"426"} <= statuses, statuses


async def test_with_compression_a_plain_handshake_negotiates_permessage_deflate(gateways):
    # With --compression the 101 is websockets' (accept_plain answers only when the server
    # offers no extension): a browser's offer of permessage-deflate is taken up.
    started = await gateways(compression=True)
    offer = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
    status, fields, _ = await _answer(started.port, _handshake(offer))
    assert status.startswith(b"HTTP/1.1 101")
    assert any(
        field.startswith(b"Sec-WebSocket-Extensions: permessage-deflate") for field in fields
    )
    (session,) = started.sessions
    assert not session.raw  # frames are compressed, and read through the inflating path
