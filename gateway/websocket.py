"""The WebSocket transport: websockets' Sans-I/O protocol, driven from asyncio's callbacks.

websockets parses and writes RFC 6455 (the opening handshake, frames and masking, pings and pongs,
the closing handshake, permessage-deflate, size limits); this module only moves bytes between it
and the socket and hands each complete message to the client protocol (:mod:`gateway.clients`).

Nothing waits on a connection's behalf. websockets' asyncio server keeps a task per connection
blocked in ``recv()`` (the task, its coroutine frames, a message queue, a handful of futures):
about 3 KiB of an idle connection's ~9 and a third of the CPU of a reconnect storm
(docs/benchmarks.md). Here a connection is its protocol object, websockets' parser, the session
and the socket; a message is handled in ``data_received`` itself, and only what has to wait for
Redis (a subscribe the feed's memory cannot answer, presence) runs in a task, which ends with it.

Per connection, in order:

1. **The request.** A stream request is taken over by :mod:`gateway.sse`; any other request
   without ``Upgrade: websocket`` is answered by :mod:`gateway.http`; a WebSocket handshake is
   checked by :meth:`WebSocketEndpoint.check_request` (draining, full, ``Origin``, a bearer
   token), then accepted or refused by websockets (``accept`` answers 400/426 to a malformed
   handshake on its own). A first read that is exactly one plain request is read without
   websockets' incremental parser (:func:`~gateway.client_input.parse_plain_request`), and a
   plainly valid handshake answered without its ``accept`` (:func:`accept_plain`): the same
   request and the same 101, for a fraction of the CPU of a reconnect storm's handshakes.
2. **Authentication.** Unless the handshake carried a valid bearer token (or ``--no-auth``), the
   first message must be a valid ``auth``; anything else closes with 4001 (4002 for an expired
   token). The handshake and the ``auth`` together must arrive within ``auth_timeout`` of the
   TCP accept, or the socket is dropped (no handshake) or closed with 4001.
3. **Messages**, in the order received: each text or binary message (fragments joined; a text
   message that is not UTF-8 closes with 1007) is decoded and handled by the client protocol
   (:meth:`ClientProtocol.handle_decoded`). When that returns work still to do (it waits for
   Redis), a task finishes it, and the messages that must come after it are held back until it
   is done (:mod:`gateway.lanes`: those of the same project, or all after an ``auth``), so a
   subscribe is never overtaken by the unsubscribe after it, while other projects' messages and
   pings go on; reading pauses at :data:`MAX_BACKLOG` held back (the rest of the read that
   filled it waits undecoded, ``unread``; a closing connection drops what it held back and
   reads again, for the client's side of the close). Time reading is paused does
   not count against the client's pong deadline (:meth:`WebSocketConnection.paused_for`,
   :mod:`gateway.keepalive`). With permessage-deflate, or once open a read of more than
   :data:`INFLATE_SLICE` bytes, a read is given to websockets that many bytes at a time, and what
   is left of it when the backlog fills waits, as read, until it drains: a read of tiny messages
   is never decompressed, nor kept parsed, whole.
4. **Closing.** A close frame from either side, or a protocol error (1002, 1007, 1009, sent by
   websockets), ends with a half-close; a peer that does not close its side within
   :data:`CLOSE_TIMEOUT` s is dropped.

Every wait is bounded by a timer on the event loop, not by a task per connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import inspect
import logging
import random
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from websockets.datastructures import Headers
from websockets.exceptions import (
    HeaderLineTooLong,
    InvalidMessage,
    RequestLineTooLong,
    TooManyHeaders,
)
from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.frames import CloseCode as WebSocketCloseCode
from websockets.frames import Frame, Opcode
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS, Request, Response
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader
from websockets.utils import accept_key

from gateway.client_input import (
    close_reason,
    decode_frame,
    parse_plain_request,
    repeated_header,
)
from gateway.http import json_response, tokens_unchecked_response
from gateway.lanes import CONCURRENCY as LANES_CONCURRENCY
from gateway.lanes import FrameLanes, Lane
from gateway.logs import ConnectionLog, get_logger, peer_of
from gateway.revocations import RevocationsUnknown, TokenRevoked
from gateway.session import (
    Admission,
    ClientSession,
    Outgoing,
    SlowConsumerPolicy,
    release_transport,
    unsent,
)
from gateway.tasks import spawn
from schemas.protocol import Auth, CloseCode, ProtocolError
from schemas.tokens import InvalidToken, TokenClaims

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from gateway.server import Gateway

__all__ = [
    "ANSWER_CHECK_INTERVAL",
    "CLOSE_TIMEOUT",
    "INFLATE_SLICE",
    "MAX_BACKLOG",
    "PROTOCOL_VIOLATIONS",
    "WebSocketConnection",
    "WebSocketEndpoint",
    "WebSocketSession",
    "accept_plain",
]

log = get_logger("gateway")
#: websockets' logger, looked up once rather than by every connection's protocol object.
_WEBSOCKETS_LOG = logging.getLogger("websockets.server")

#: Seconds a peer has to close its side of the TCP connection after the closing handshake (or
#: after an HTTP answer has been sent) before the socket is dropped.
CLOSE_TIMEOUT = 5.0

#: Seconds between looks at an HTTP answer still being sent CLOSE_TIMEOUT after it was written
#: (:meth:`WebSocketConnection._answer_wait`), as the stall check looks at sessions.
ANSWER_CHECK_INTERVAL = 1.0

#: Messages a connection may have held back behind ones that wait for Redis (gateway.lanes)
#: before reading from its socket pauses (websockets' ``max_queue``): the kernel's buffers, then
#: TCP, hold the rest.
MAX_BACKLOG = 4

#: Bytes of a read handed to websockets at a time on a connection with permessage-deflate
#: (``--compression``), each slice's messages handled before the next is fed. websockets
#: decompresses every message of what it is given at once, and deflate inflates up to 1,032
#: times (a 258-byte match per two bits): a 256 KiB read of tiny messages that each inflate to
#: nearly ``--max-frame-bytes`` could be ~140 MB (36 MB measured in one connection). A slice is
#: at most ~2 MiB of messages, plus one begun in an earlier slice (at most ``--max-frame-bytes``);
#: once the backlog is full the rest of the read waits, compressed, until it drains. A raw
#: connection's read over this size is fed the same way: kept parsed while the backlog is full,
#: a 256 KiB read of empty frames is ~40,000 websockets frames (~5 MB); kept as read, 256 KiB.
INFLATE_SLICE = 2048

#: Close codes websockets itself sends when a client breaks the WebSocket protocol: 1002 (a bad
#: frame), 1007 (a text frame that is not UTF-8), 1009 (a frame over ``--max-frame-bytes``).
PROTOCOL_VIOLATIONS = frozenset({1002, 1007, 1009})

_TEXT, _BINARY, _CONT, _PONG = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PONG
_OPEN = State.OPEN
_CONNECTING = State.CONNECTING
_PING = struct.Struct("!I")
#: A keepalive ping's header: FIN and opcode 9, then its payload's length (4 bytes). A server's
#: frames are not masked and a control frame is never compressed, so the header and the payload
#: are what websockets' ``send_ping`` would write on any connection, permessage-deflate or not.
_PING_HEADER = b"\x89\x04"
#: A client's pong to a keepalive ping when a read is that alone: FIN and opcode 10, the mask
#: bit and a 4-byte payload, then the mask and the masked payload (ten bytes in all).
_PONG_HEADER = b"\x8a\x84"
_MASKED_PONG = struct.Struct("!II")
#: What websockets refuses itself while reading a request (a status, and the gateway's message).
_OVER_WEBSOCKETS_BOUNDS: dict[type, tuple[int, str]] = {
    RequestLineTooLong: (414, f"the request line takes more than {MAX_LINE_LENGTH} bytes"),
    HeaderLineTooLong: (431, f"a header line takes more than {MAX_LINE_LENGTH} bytes"),
    TooManyHeaders: (431, f"the request has more than {MAX_NUM_HEADERS} headers"),
}
#: The generators websockets' parser is made of (a server's handshake, then frames), and the one
#: it waits in between two frames: how :meth:`WebSocketConnection.between_frames` tells.
_SERVER_PARSE = ServerProtocol.parse.__code__
_FRAMES_PARSE = Protocol.parse.__code__
_AT_EOF = StreamReader.at_eof.__code__


def accept_plain(request: Request) -> Response | None:
    """websockets' ``ServerProtocol.accept`` for the common handshake, when the server offers
    no extension and no subprotocol (no ``--compression``): the same 101 response (``Date``,
    ``Upgrade``, ``Connection``, ``Sec-WebSocket-Accept``), without parsing header lists.

    Only for a request that is plainly valid: ``GET`` over ``HTTP/1.1``, one ``Connection:
    Upgrade`` and one ``Upgrade: websocket`` (any case), one ``Sec-WebSocket-Key`` of 16 bytes
    in base64, one ``Sec-WebSocket-Version: 13``, at most one ``Origin``, and no
    ``Sec-WebSocket-Protocol`` (websockets refuses a malformed one). None for anything else,
    which websockets' ``accept`` then answers as it always has (a refusal included)."""
    if request.method != "GET" or request.protocol != "HTTP/1.1":
        return None
    headers = request.headers
    connection = headers.get_all("Connection")
    upgrade = headers.get_all("Upgrade")
    key = headers.get_all("Sec-WebSocket-Key")
    if (
        len(connection) != 1
        or connection[0].lower() != "upgrade"
        or len(upgrade) != 1
        or upgrade[0].lower() != "websocket"
        or len(key) != 1
        or len(key[0]) != 24
        or headers.get_all("Sec-WebSocket-Version") != ["13"]
        or len(headers.get_all("Origin")) > 1
        or "Sec-WebSocket-Protocol" in headers
    ):
        return None
    try:
        if len(base64.b64decode(key[0].encode(), validate=True)) != 16:
            return None
    except (binascii.Error, UnicodeEncodeError):
        return None
    answer = Headers()
    answer["Date"] = _http_date()
    answer["Upgrade"] = "websocket"
    answer["Connection"] = "Upgrade"
    answer["Sec-WebSocket-Accept"] = accept_key(key[0])
    return Response(101, "Switching Protocols", answer)


_date: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The ``Date`` header websockets writes (``email.utils.formatdate``), made once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True))
    return _date[1]


class WebSocketEndpoint:
    """What every WebSocket connection of one gateway process shares: the gateway, the client
    protocol, the handshake checks, websockets' settings. :meth:`connection` is the asyncio
    protocol factory for ``loop.create_server``."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        config = gateway.config
        self.config = config
        self.clients = gateway.clients
        self.metrics = gateway.metrics
        self.admission: Admission = gateway.admission
        self.policy: SlowConsumerPolicy = gateway.policy
        self.max_size = config.max_frame_bytes
        #: Bytes a request's head may take (--max-request-bytes; see _head_too_large).
        self.max_request_bytes = config.max_request_bytes
        #: Bytes per second an HTTP answer must be read at on average (``--answer-min-rate``,
        #: 16 KiB/s): once written it has CLOSE_TIMEOUT plus its size at this rate to be sent,
        #: however steadily the client reads. A full poll page (``--poll-page-bytes``, 1 MiB)
        #: has ~70 s; a client without a token fetching ``/eventbus.js`` (70 KB) a few bytes at a
        #: time cannot hold a socket past ~10 s.
        self.answer_min_rate = config.answer_min_rate
        self.extensions = enable_server_permessage_deflate(None) if config.compression else None
        #: The hub's ``schedule_flush``, bound once (the hub exists once the gateway started).
        self.schedule_flush: Callable[[ClientSession], None] | None = None
        #: Called with every request first: True when it took the connection over (SSE).
        self.takeover: Callable[[WebSocketConnection, Request], bool] = gateway.streams.takeover

    def connection(self) -> WebSocketConnection:
        return WebSocketConnection(self)

    def check_request(
        self, request: Request, peer: str | None = None
    ) -> tuple[Response | None, TokenClaims | None, bool]:
        """Judge a request that is not an SSE stream's: ``(refusal, claims, is_websocket)``.

        A request without ``Upgrade: websocket`` is HTTP (``is_websocket`` False, for
        :meth:`answer_http`). A WebSocket handshake is refused when the gateway is draining or
        full, for a foreign ``Origin``, or for a bad bearer token; else ``refusal`` is None and
        ``claims`` are those of a valid ``Authorization`` header, if it has one."""
        gateway = self.gateway
        headers = request.headers
        repeated = repeated_header(headers)  # first: Headers.get raises on a repeated header
        if repeated is not None:
            return gateway.bad_request(f"the {repeated} header is given more than once"), None, True
        if headers.get("Upgrade", "").lower() != "websocket":
            return None, None, False
        refusal = self.clients.refusal(headers.get("Origin"))
        if refusal is not None:
            return refusal, None, True
        header = headers.get("Authorization")
        if header and not self.config.no_auth:
            try:
                return None, self.clients.verify_bearer(header), True
            except InvalidToken as exc:
                gateway.client_log(
                    "handshake refused",
                    kind="handshake_invalid_token",
                    error="invalid_token",
                    reason=str(exc)[:200],
                    status=401,
                    peer=peer,
                )
                refusal = json_response(401, {"error": "invalid_token", "message": str(exc)})
                return refusal, None, True
            except RevocationsUnknown as exc:
                return tokens_unchecked_response(exc), None, True
        return None, None, True

    async def answer_http(self, request: Request, peer: str | None = None) -> Response:
        """A plain HTTP request on the port (health, metrics, polling, CORS preflight), from
        ``peer`` (``host:port``, for the log lines of its refusals)."""
        try:
            return await self.gateway.http.handle(request, peer)
        except Exception:
            log.exception("request failed", path=request.path[:200])
            return json_response(500, {"error": "internal", "message": "internal error"})


class WebSocketConnection(asyncio.Protocol):
    """One TCP connection of the gateway's port, from accept to close (see the module).

    It counts itself in the endpoint's :class:`Admission` from accept to close (dropping itself
    at once when the port is over its bound), holds websockets' :class:`ServerProtocol` for the
    bytes, and, once the handshake succeeds, a :class:`WebSocketSession` for the client protocol.
    """

    __slots__ = (
        "answer_deadline",
        "answer_stalled_since",
        "answer_unsent",
        "answering_http",
        "awaiting_auth",
        "close_armed",
        "counted",
        "endpoint",
        "finishing",
        "fragment_text",
        "fragments",
        "fresh",
        "head_bytes",
        "head_tail",
        "inflating",
        "lanes",
        "paused",
        "paused_at",
        "paused_total",
        "peer_done",
        "protocol",
        "session",
        "timer",
        "transport",
        "unfed",
        "unread",
        "workers",
    )

    def __init__(self, endpoint: WebSocketEndpoint) -> None:
        self.endpoint = endpoint
        self.protocol = ServerProtocol(
            extensions=endpoint.extensions, max_size=endpoint.max_size, logger=_WEBSOCKETS_LOG
        )
        self.transport: Any = None
        self.session: WebSocketSession | None = None
        self.counted = False
        #: The one pending deadline: the handshake and ``auth`` (from accept), then the peer's
        #: side of the close. None when there is none (an open, authenticated connection).
        self.timer: asyncio.TimerHandle | None = None
        self.awaiting_auth = False
        self.close_armed = False
        #: An HTTP request is being answered: what else the client sends is not read.
        self.answering_http = False
        #: The client half-closed after its HTTP request (its EOF came before the answer).
        self.peer_done = False
        #: An HTTP answer's unsent bytes at the last look (None: not looked at yet), and since
        #: when they stopped shrinking (:meth:`_answer_wait`).
        self.answer_unsent: int | None = None
        self.answer_stalled_since: float | None = None
        #: When an HTTP answer must have been sent, whatever its progress (--answer-min-rate).
        self.answer_deadline = 0.0
        #: The order of messages while some wait for Redis (gateway.lanes; None: nothing waits).
        self.lanes: HeldBack | None = None
        #: The tasks finishing messages that wait for Redis, each with the message's coroutine
        #: it was started with (None: no task).
        self.workers: dict[asyncio.Task, Coroutine[Any, Any, Any]] | None = None
        self.paused = False
        #: When reading was last paused, and for how long it was paused before that in all:
        #: time the keepalive does not count against the client (:meth:`paused_for`).
        self.paused_at = 0.0
        self.paused_total = 0.0
        #: permessage-deflate is negotiated: reads are fed to websockets in slices (_inflate).
        self.inflating = False
        #: What websockets was not given yet of the read that filled the lanes' backlog
        #: (as read: compressed with permessage-deflate).
        self.unfed: bytes | None = None
        #: The frames websockets made of a read and not handled yet, when the lanes' backlog
        #: filled before the last of them (kept as read, not decoded: :meth:`_frames`).
        self.unread: list | None = None
        #: The task answering an HTTP request, and its coroutine.
        self.finishing: tuple[asyncio.Task, Coroutine[Any, Any, Any]] | None = None
        #: The fragments of a message in progress (rare: browsers send small messages whole).
        self.fragments: list[bytes] | None = None
        self.fragment_text = False
        #: Nothing has been read yet: the first read may be a plain request (_plain_request).
        self.fresh = True
        #: Bytes of the request's head read so far (--max-request-bytes); -1 once it ended.
        self.head_bytes = 0
        #: The head's last bytes read (at most 3): its end may be cut across two reads.
        self.head_tail = b""

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        endpoint = self.endpoint
        if not endpoint.admission.accept():
            transport.abort()
            endpoint.metrics.connections_dropped_total += 1
            return
        self.counted = True
        loop = asyncio.get_running_loop()
        self.timer = loop.call_at(loop.time() + endpoint.config.auth_timeout, self._deadline)

    def data_received(self, data: bytes) -> None:
        if self.answering_http:
            return  # nothing after an HTTP request is read (websockets would parse it as frames)
        if (
            self.inflating
            or self.unfed is not None
            or (self.session is not None and len(data) > INFLATE_SLICE)
        ):
            # Sliced: reading may pause part way through it (the lanes' backlog full), and the
            # rest then waits as read, not as thousands of frames parsed (_inflate).
            self._inflate(data)
            return
        if len(data) == 10 and data.startswith(_PONG_HEADER) and self.between_frames():
            # A keepalive pong and nothing else, an idle connection's most frequent read:
            # websockets would only hand it back, after building a Frame and an event list
            # for it (half of what an idle connection costs, measured with py-spy).
            mask, masked = _MASKED_PONG.unpack_from(data, 2)
            self.session.pong(_PING.pack(mask ^ masked))  # type: ignore[union-attr]
            return
        if self.fresh:
            self.fresh = False
            request = parse_plain_request(data)
            if request is not None:
                self._plain_request(request)
                return
        rest = None
        if self.head_bytes >= 0 and self.session is None and not self.close_armed:
            part, ended = self._head_part(data)
            self.head_bytes += part
            if self.head_bytes > self.endpoint.max_request_bytes:
                self._head_too_large()
                return
            if ended:
                self.head_bytes = -1  # what follows is frames: counted no more
                if len(data) - part > INFLATE_SLICE:
                    # Frames right behind the request: fed in slices once it is open.
                    data, rest = data[:part], data[part:]
        protocol = self.protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        try:
            if self.session is None and events and type(events[0]) is not Frame:
                # The request, answered before whatever websockets wrote in reply to bytes that
                # came after it in the same read.
                self._request(events[0])  # type: ignore[arg-type]
                if self.session is None:
                    return  # taken over, refused, or an HTTP request: no frames follow
                events = events[1:]
            elif self.session is None and not events and self._unreadable_request():
                return
            self._dispatch(events)
        except Exception:
            self._failed()
            return
        if rest is not None and self.session is not None:
            self._inflate(rest)

    def _plain_request(self, request: Request) -> None:
        """The first read was a plain request, exactly (:func:`parse_plain_request`): handled
        without going through websockets' incremental parser, which is given none of it and
        still waits for a request. Once the handshake has opened the connection, its parser is
        started again, from the state the handshake left (``OPEN``): reading frames, as it would
        be had it read the request itself. Any other answer leaves it as websockets set it
        (discarding what follows a refusal); an HTTP request or a stream reads nothing more."""
        try:
            self._request(request)
            protocol = self.protocol
            if protocol.state is not _CONNECTING and protocol.parser is not None:
                protocol.parser = protocol.parse()
                next(protocol.parser)
        except Exception:
            self._failed()

    def between_frames(self) -> bool:
        """Whether the connection is open and websockets' parser waits for the first byte of a
        frame with nothing buffered, outside a fragmented message: a read then starts with a
        frame, and one that is exactly a pong can be handled without websockets, which would do
        nothing more with it than hand it back. websockets has no API for this; it is read off
        its parser's generators (the frames loop waiting in ``StreamReader.at_eof``). Another
        websockets, where they are different, is never "between frames": every read goes
        through it as before."""
        protocol = self.protocol
        parser = protocol.parser
        if (
            self.session is None
            or parser is None
            or protocol.state is not _OPEN
            or protocol.reader.buffer
            # Inside a fragmented message websockets checks a control frame's payload against
            # what is left of the message's limit too (a pong can be 1009 there): no shortcut.
            or getattr(protocol, "current_size", 0) is not None
            or parser.gi_code is not _SERVER_PARSE
        ):
            return False
        frames = parser.gi_yieldfrom
        if frames is None or frames.gi_code is not _FRAMES_PARSE:
            return False
        waiting = frames.gi_yieldfrom
        return waiting is not None and waiting.gi_code is _AT_EOF

    def _unreadable_request(self) -> bool:
        """websockets could not read the request (a request line that is not HTTP/1.1, a
        request body or ``Transfer-Encoding``: the gateway takes none) and only half-closes:
        answer 400 first, so the client learns why. True when answered (now or before)."""
        exc = self.protocol.handshake_exc
        if type(exc) is InvalidMessage:
            if not self.close_armed:
                reason = str(exc.__cause__)[:200]  # (it may quote the request line)
                response = self.endpoint.gateway.bad_request(f"unreadable request: {reason}")
                self.transport.write(response.serialize())
                self.send_data()  # websockets' half-close
                self._expect_close()
            return True
        over = _OVER_WEBSOCKETS_BOUNDS.get(type(exc))
        if over is None:
            return False  # none
        # websockets bounds a line and the number of headers itself, below
        # --max-request-bytes, and wrote its own plain-text answer: the gateway's JSON one,
        # counted, goes instead, as for every other refusal.
        if not self.close_armed:
            status, message = over
            self._answer_instead(self.endpoint.gateway.request_too_large(message, status))
        return True

    def _head_part(self, data: bytes) -> tuple[int, bool]:
        """How many bytes of ``data`` belong to the request's head, and whether the head ends in
        it: all of it, or up to and including the blank line that ends the head (websockets'
        parser needs CRLF line ends, so the first CRLF CRLF is that end; it may be cut across
        two reads). What follows the head in the same read is frames (a client that sends its
        first message without waiting for the 101), bounded by ``--max-frame-bytes`` each:
        counted as head, they had a small handshake with a large first message answered 431."""
        tail = self.head_tail
        end = (tail + data[:3]).find(b"\r\n\r\n")
        if end >= 0:
            end += 4 - len(tail)
        else:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.head_tail = (tail + data[-3:])[-3:]
                return len(data), False
            end += 4
        self.head_tail = b""
        return end, True

    def _head_too_large(self) -> None:
        """The request's head went past ``--max-request-bytes`` before it ended: 431, and the
        socket is closed. websockets bounds each line (8,192 bytes) and the number of headers
        (128), not their sum: a head of ~1 MB was read and kept until ``--auth-timeout``, and
        300 sockets trickling such heads held 270 MB of the gateway's memory (an idle
        connection holds ~9 KiB). What the client sends after it is read and dropped (so its
        close is seen at once); the socket is dropped CLOSE_TIMEOUT s after the answer."""
        self.answering_http = True  # what the client sends next is dropped unread
        limit = self.endpoint.max_request_bytes
        self._answer_instead(
            self.endpoint.gateway.request_too_large(
                f"the request line and headers take more than {limit} bytes"
            )
        )

    def _answer_instead(self, response: Response) -> None:
        """Answer ``response`` instead of whatever websockets wrote in reply to the request so
        far (dropped), half-close, and give the client CLOSE_TIMEOUT s to close."""
        self.protocol.data_to_send()
        self.transport.write(response.serialize())
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._expect_close()

    def _dispatch(self, events: list) -> None:
        """What websockets made of a read: its own answers (pongs, the close echo) go out first,
        a close it now expects arms the close deadline, then the frames are handled in order."""
        if self.send_data() and self._answers_over_limit():
            return  # cut: the rest of the read is of no use
        if self.protocol.close_expected():
            self._expect_close()
        if self.session is not None:
            if self.unread is not None:  # not expected: nothing is read while paused
                self.unread.extend(events)
                return
            self._frames(events)

    def _frames(self, events: list) -> None:
        """Handle a read's frames in order, until the lanes' backlog is full: the rest wait in
        ``unread`` for :meth:`_resume`, as read. One read holds hundreds of tiny frames, and
        each held back decoded, in its project's queue, would cost ten times its bytes."""
        last = len(events) - 1
        for index, event in enumerate(events):
            self._frame(event)
            if index < last:
                lanes = self.lanes
                if lanes is not None and lanes.full:
                    self.unread = events[index + 1 :]
                    return

    def _answers_over_limit(self) -> bool:
        """Whether websockets' answers to a read (pongs, written at once) took the connection
        past ``--outbound-limit``; it is then cut (4008), as it would be before a write of ours.
        A client that sends pings as fast as it can and reads nothing would otherwise make the
        gateway buffer its pongs until the once-a-second check (16 MB measured, against a 64 KiB
        limit)."""
        session = self.session
        if session is None or session.closing or not session.over_limit():
            return False
        session.cut_slow()
        self.endpoint.metrics.slow_consumer_disconnects_total += 1
        return True

    def _failed(self) -> None:
        """A bug while handling a read: this connection ends (1011), no other is affected."""
        log.exception("connection failed")
        if self.session is not None:
            self.session.abort(CloseCode.INTERNAL_ERROR, "internal error")
        else:
            self.transport.abort()

    def eof_received(self) -> bool | None:
        if self.answering_http:
            if self.close_armed:
                # The answer is written and our side half-closed: the client, done reading,
                # closes its side too. Both are done: close now (not at CLOSE_TIMEOUT).
                return None
            # The client sent its request and then its EOF (`printf ... | nc`): the answer is
            # still due. True keeps the transport; _answer_http closes it after writing.
            self.peer_done = True
            return True
        self.protocol.receive_eof()
        self.send_data()
        # None: asyncio closes the transport (WebSocket never writes after the peer's EOF).

    def connection_lost(self, exc: Exception | None) -> None:
        session = self.session
        if session is not None:
            # First of all: asyncio closes the socket after this returns, even should anything
            # below raise, and no direct write may reach a descriptor number reused since.
            session.writable = False
            session.closing = True
        protocol = self.protocol
        protocol.receive_eof()  # idempotent; the state is CLOSED from here on
        # Reference cycles, broken so that a closed connection is freed at once instead of
        # waiting for a full cyclic collection: websockets' parser's, asyncio's transport's, and
        # the session's, which points back here (dropped below).
        self._drop_parser()
        release_transport(self.transport)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.counted:
            self.counted = False
            self.endpoint.admission.release()
        self.unfed = self.unread = None
        if session is None:
            if self.answering_http:
                self.endpoint.gateway.answer_closed(self.transport)
            self._stop_finishing()  # an HTTP answer still waiting (a poll, for Redis)
            return
        self._stop_workers()
        sent = protocol.close_sent
        if sent is not None and sent.code in PROTOCOL_VIOLATIONS:
            self.endpoint.metrics.protocol_violations_total += 1
        self.endpoint.gateway.remove_session(session)
        self.log().debug("disconnected", code=self.close_code)
        self.session = None

    def _stop_finishing(self) -> None:
        """The connection is gone: the HTTP answer it waits for (a poll, for Redis) is of no
        use (:func:`_stop`)."""
        finishing = self.finishing
        if finishing is not None:
            self.finishing = None
            _stop(*finishing)

    def _stop_workers(self) -> None:
        """The connection is gone: what its messages still wait for (Redis, for a subscribe, its
        presence, a ``presence_get``) is of no use (:func:`_stop`), nor what they held back."""
        lanes, workers = self.lanes, self.workers
        self.lanes = self.workers = None
        if lanes is not None:
            lanes.clear()
        if workers:
            for task, pending in workers.items():
                _stop(task, pending)

    # --- what the session and the SSE takeover use -------------------------------------------

    @property
    def remote_address(self) -> Any:
        return self.transport.get_extra_info("peername") if self.transport is not None else None

    @property
    def close_code(self) -> int | None:
        return self.protocol.close_code if self.protocol.state is State.CLOSED else None

    def log(self) -> ConnectionLog:
        """This connection's logger (bound on first use: most connections never log)."""
        session_id = self.session.id if self.session is not None else 0
        return ConnectionLog(log, session_id, connection=self)

    def send_data(self) -> bool:
        """Write what websockets has to send (frames, a response; an empty one: half-close).
        True when there were bytes to write."""
        transport = self.transport
        wrote = False
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
                wrote = True
            elif transport.can_write_eof():
                try:
                    transport.write_eof()
                except Exception:  # OSError; the peer is gone, connection_lost follows
                    pass
            else:
                transport.close()
        if self.session is not None:
            self.session.on_websockets_write()
        return wrote

    def close(self, code: CloseCode | int, reason: str) -> None:
        """Start the closing handshake; the peer has :data:`CLOSE_TIMEOUT` s to finish it."""
        if self.protocol.state is _OPEN:
            self.protocol.send_close(code, close_reason(reason))
            self.send_data()
            self._expect_close()

    def detach(self, stand_in: Any) -> tuple[asyncio.Transport, bool]:
        """Give the transport to another protocol (an SSE stream, see ``takeover``): this
        connection keeps ``stand_in``, no timer and no parser. Returns the transport, and
        whether this connection counted it in the admission: that count moves to the new owner,
        who releases it."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        # This connection never hears connection_lost now: websockets' parser is let go here.
        self._drop_parser()
        transport, self.transport = self.transport, stand_in
        counted, self.counted = self.counted, False
        return transport, counted

    def _drop_parser(self) -> None:
        """Break websockets' reference cycles once nothing more is fed to it: its parser
        generator (suspended, its frame holds the protocol and the handshake request) and the
        exception that stopped it (its traceback holds the generator's frame) both point back
        at the protocol. So does a refused handshake's exception (``handshake_exc``, which the
        request holds too): the frames of its traceback, and of its causes', hold this
        connection and the protocol."""
        protocol = self.protocol
        protocol.parser_exc = None
        protocol.parser = None  # type: ignore[assignment]
        exc = protocol.handshake_exc
        if exc is not None:
            protocol.handshake_exc = None
            for _ in range(8):  # websockets chains one or two
                exc.__traceback__ = None
                exc = exc.__cause__ or exc.__context__
                if exc is None:
                    break

    @property
    def admission(self) -> Admission:
        return self.endpoint.admission

    # --- the handshake -----------------------------------------------------------------------

    def _request(self, request: Request) -> None:
        endpoint = self.endpoint
        protocol = self.protocol
        try:
            if endpoint.takeover(self, request):
                return
            response, claims, websocket = endpoint.check_request(request, peer_of(self))
            if not websocket:
                # An HTTP request (health, metrics, polling): answered once its handler has run,
                # written here (websockets may have failed on bytes after the request already).
                self.answering_http = True
                protocol.data_to_send()  # dropped
                # --auth-timeout bounded reading the request; the answer is bounded by its
                # handler (a poll waits --subscribe-timeout for Redis, then answers 503), with
                # this as the backstop: a poll must not be dropped unanswered at the handshake
                # deadline when --auth-timeout is the shorter of the two.
                self._cancel_timer()
                loop = asyncio.get_running_loop()
                answer_by = loop.time() + endpoint.config.subscribe_timeout + CLOSE_TIMEOUT
                self.timer = loop.call_at(answer_by, self._deadline)
                # Kept, so that a client that goes away stops it (connection_lost): a poll waits
                # for Redis, and the socket no longer counts in --max-connections.
                pending = self._answer_http(request)
                self.finishing = (spawn(pending), pending)
                return
            if protocol.eof_sent:
                # What followed the handshake request in the same read was not a WebSocket frame
                # (a client may not send any before the answer): websockets has given up on it.
                self.transport.abort()
                return
            if response is None:
                response = accept_plain(request) if endpoint.extensions is None else None
                if response is not None:
                    # As websockets' accept would have (its answer is the same).
                    protocol.accept_called = True
                    protocol.origin = request.headers.get("Origin")  # type: ignore[assignment]
                else:
                    response = protocol.accept(request)
                    if response.status_code != 101:  # 400/426: a malformed handshake
                        response = endpoint.gateway.bad_handshake(
                            response.status_code, protocol.handshake_exc, response.headers
                        )
        except Exception:
            log.exception("request failed", path=request.path[:200])
            response = json_response(500, {"error": "internal", "message": "internal error"})
            claims = None
            if protocol.eof_sent:
                self.transport.abort()
                return
        # websockets' replies to frames sent too early (a pong) go after the answer, not before.
        early = protocol.data_to_send()
        protocol.send_response(response)
        # websockets' parser keeps the request for the connection's lifetime; its headers are
        # not read again, and with a browser's user agent and cookies they are a few KiB and a
        # dozen objects for the garbage collector to walk, per connection.
        request.headers.clear()
        self.send_data()
        if protocol.state is _OPEN:
            for data in early:
                self.transport.write(data)
            self._open(claims)
        else:
            self._expect_close()

    async def _answer_http(self, request: Request) -> None:
        endpoint = self.endpoint
        response = await endpoint.answer_http(request, peer_of(self))
        self.finishing = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client left (or the deadline passed) before the answer
        data = response.serialize()
        transport.write(data)
        endpoint.gateway.answer_written(transport)  # the drain waits for it to be sent
        loop = asyncio.get_running_loop()
        self.answer_deadline = loop.time() + CLOSE_TIMEOUT + len(data) / endpoint.answer_min_rate
        if self.peer_done:
            transport.close()  # both sides are done: close once the answer is written
            self._expect_close()  # (bounded like any answer: a client that reads none of it)
            return
        # Half-close, and let the client close (closing now could reset the connection under a
        # response the client has not read yet); it has CLOSE_TIMEOUT s.
        try:
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
        except OSError:
            transport.abort()
            return
        self._expect_close()

    def _open(self, claims: TokenClaims | None) -> None:
        endpoint = self.endpoint
        gateway = endpoint.gateway
        # Without permessage-deflate, the gateway's pre-built frames go out as they are.
        schedule_flush = endpoint.schedule_flush
        if schedule_flush is None:  # one bound method for all sessions, not one each
            schedule_flush = endpoint.schedule_flush = gateway.hub.schedule_flush
        session = WebSocketSession(
            self, endpoint.policy, schedule_flush, raw=not self.protocol.extensions
        )
        self.session = session
        # From here on frames are parsed with the extensions the handshake negotiated (before,
        # an early frame is not decompressed: websockets refuses a compressed one).
        self.inflating = not session.raw
        gateway.add_session(session)
        gateway.keepalive.add(session)
        self.log().debug("connected")
        if claims is not None:
            endpoint.clients.authenticate(session, claims)
        elif not endpoint.config.no_auth:
            self.awaiting_auth = True
            return  # the deadline runs on until the auth message
        self._cancel_timer()

    def _deadline(self) -> None:
        """``auth_timeout`` after accept: no handshake yet (drop the socket), or no ``auth``; for
        an HTTP request, the backstop of its answer (``_request``)."""
        self.timer = None
        if self.session is None:
            self.transport.abort()
        elif self.awaiting_auth:
            self._refuse(CloseCode.AUTH_FAILED, "no auth message in time")

    def _first_auth(self, data: bytes | str) -> None:
        """The first message: a valid ``auth``, or the connection closes (4001, 4002, 4003)."""
        session = self.session
        assert session is not None
        clients = self.endpoint.clients
        try:
            message = decode_frame(data)
        except ProtocolError as exc:
            return self._refuse(CloseCode.AUTH_FAILED, f"expected an auth message: {exc.message}")
        if not isinstance(message, Auth):
            return self._refuse(CloseCode.AUTH_FAILED, "the first message must be auth")
        try:
            claims = self.endpoint.gateway.verify(message.token)
        except RevocationsUnknown as exc:
            # Not the token's fault, nor counted as an auth failure: the client retries later.
            return self._end_before_auth(CloseCode.TRY_AGAIN_LATER, str(exc))
        except InvalidToken as exc:
            if isinstance(exc, TokenRevoked):
                code = CloseCode.TOKEN_REVOKED
            else:
                code = CloseCode.TOKEN_EXPIRED if exc.expired else CloseCode.AUTH_FAILED
            return self._refuse(code, str(exc))
        self.awaiting_auth = False
        self._cancel_timer()
        clients.authenticate(session, claims)
        return None

    def _refuse(self, code: CloseCode, reason: str) -> None:
        gateway = self.endpoint.gateway
        gateway.metrics.auth_failures_total += 1
        gateway.client_log_throttle.log(
            "auth_failed",
            self.log().info,
            "authentication failed",
            reason=reason[:200],
            code=int(code),
        )
        self._end_before_auth(code, reason)

    def _end_before_auth(self, code: CloseCode, reason: str) -> None:
        """Close a connection that has no token (yet): no frame of it is handled any more."""
        self.awaiting_auth = False
        if self.session is not None:
            self.session.closing = True
        self.close(code, reason)

    # --- messages ----------------------------------------------------------------------------

    def _inflate(self, data: bytes) -> None:
        """A read of a connection with permessage-deflate (or a large one): given to websockets
        :data:`INFLATE_SLICE` bytes at a time, each slice's frames handled before the next is
        fed, so that no more than a slice's messages are ever decompressed at once. When the
        backlog is full (reading paused), the rest of the read is kept in ``unfed``, as read,
        until :meth:`_resume` feeds it, before anything read later."""
        if self.unfed is not None:  # not expected: nothing is read while paused
            self.unfed += data
            return
        protocol = self.protocol
        transport = self.transport
        size = len(data)
        start = 0
        try:
            while start < size:
                end = start + INFLATE_SLICE
                protocol.receive_data(data[start:end])
                start = end
                self._dispatch(protocol.events_received())
                if start >= size or transport.is_closing():
                    return  # all fed; or aborted (a slow consumer): the rest is of no use
                lanes = self.lanes
                if lanes is not None and lanes.full:
                    self.unfed = data[start:]  # reading is paused: _resume goes on from here
                    return
        except Exception:
            self._failed()

    def _resume(self) -> None:
        """The lanes' backlog has room again (or is gone): what was left unhandled (``unread``)
        and unfed of the read that filled it goes first, then the socket is read again, unless
        that filled it again."""
        transport = self.transport
        unread = self.unread
        if unread is not None:
            self.unread = None
            if not transport.is_closing() and self.session is not None:
                try:
                    self._frames(unread)  # held behind the waiting ones, or handled
                except Exception:
                    self._failed()
            lanes = self.lanes
            if lanes is not None and lanes.full:
                return  # still paused: the next _work round comes back here
        unfed = self.unfed
        if unfed is not None:
            self.unfed = None
            if not transport.is_closing():
                self._inflate(unfed)  # its messages are held behind the waiting ones, or handled
            lanes = self.lanes
            if lanes is not None and lanes.full:
                return  # still paused: the next _work round comes back here
        self.paused = False
        self.paused_total += asyncio.get_running_loop().time() - self.paused_at
        if not transport.is_closing():
            transport.resume_reading()

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is _TEXT or opcode is _BINARY:
            if not frame.fin:
                self.fragments = [frame.data]
                self.fragment_text = opcode is _TEXT
                return
            data = frame.data
            text = opcode is _TEXT
        elif opcode is _CONT:
            fragments = self.fragments
            assert fragments is not None  # websockets refuses a stray continuation (1002)
            fragments.append(frame.data)
            if not frame.fin:
                return
            self.fragments = None
            data = b"".join(fragments)
            text = self.fragment_text
        else:
            if opcode is _PONG:
                self.session.pong(bytes(frame.data))  # type: ignore[union-attr]
            return  # pings are answered and close frames handled by websockets
        if text:
            try:
                message: bytes | str = data.decode()
            except UnicodeDecodeError as exc:
                # RFC 6455: a text message must be UTF-8 (websockets checks this in recv()).
                self.session.closing = True  # type: ignore[union-attr]
                self.protocol.fail(
                    WebSocketCloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}"
                )
                self.send_data()
                self._expect_close()
                return
        else:
            message = bytes(data)
        self._message(message)

    def _message(self, data: bytes | str) -> None:
        session = self.session
        if session is None or session.closing:
            return
        if self.awaiting_auth:
            self._first_auth(data)
            return
        clients = self.endpoint.clients
        try:
            message, error = clients.decode(data)
            lanes = self.lanes
            if lanes is not None:
                # Some messages wait for Redis: this one may have to wait behind them.
                lane = clients.lane_of(session, message, lanes.projects())
                held = lanes.read(message, error)
                if not lanes.admit(lane, held):
                    lanes.untaken.append(held)
                    if error is None:
                        # Malformed frames count "in a row" in the order sent, and those after
                        # this one are answered before it (they wait for nothing).
                        session.errors = 0
                    if lanes.full and not self.paused:
                        self.paused = True
                        self.paused_at = asyncio.get_running_loop().time()
                        self.transport.pause_reading()
                    return
                self._take_tokens(session, lanes, held)  # (it overtakes every one held back)
            pending = clients.handle_decoded(session, message, error, self.log())
            if pending is None:
                return
            # It waits for Redis: what it holds back is its project's frames, or all (a
            # subscribe at the limit). Its coroutine has not started, so the connection is
            # still as the frame found it.
            if lanes is None:
                lanes = self.lanes = HeldBack()
                lane = clients.lane_of(session, message, ())
            lanes.started(lane)
        except Exception:
            log.exception("message handling failed", conn_id=session.id)
            session.abort(CloseCode.INTERNAL_ERROR, "internal error")
            return
        task = spawn(self._work(session, lanes, lane, pending))
        if self.workers is None:
            self.workers = {}
        self.workers[task] = pending

    def _take_tokens(self, session: WebSocketSession, lanes: HeldBack, handled: Held) -> None:
        """``handled`` is handled now: the messages held back that came before it take their
        rate-limit tokens first, in the order sent (ClientProtocol.take_token), so that one
        answered before them (a ping) does not take theirs; then ``handled`` its own, if it is
        among them (a message handled at once takes it when handled)."""
        untaken = lanes.untaken
        clients = self.endpoint.clients
        while untaken and untaken[0].arrival <= handled.arrival:
            held = untaken.popleft()
            held.verdict = clients.take_token(session, held.message)

    async def _work(
        self,
        session: WebSocketSession,
        lanes: HeldBack,
        lane: Lane,
        pending: Coroutine[Any, Any, Any],
    ) -> None:
        """Finish a message that waits for Redis, then the messages that were held back behind
        it, and those of other projects waiting for a place (gateway.lanes), until none is
        left for this task."""
        clients = self.endpoint.clients
        task = asyncio.current_task()
        try:
            if session.closing:  # the connection went before this task started
                pending.close()
                return
            while True:
                await pending
                while True:
                    if session.closing or self.lanes is not lanes:
                        return
                    turn = lanes.next(lane)
                    if turn is None:
                        return
                    if self.paused and lanes.roomy:
                        self._resume()
                        if session.closing or self.lanes is not lanes:
                            return  # (a close frame in what was fed)
                    lane, held = turn
                    self._take_tokens(session, lanes, held)
                    next_pending = clients.handle_decoded(
                        session, held.message, held.error, self.log(), held.verdict, held=True
                    )
                    if next_pending is not None:
                        pending = next_pending
                        break
        except Exception:
            log.exception("message handling failed", conn_id=session.id)
            session.abort(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            workers = self.workers
            if workers is not None:
                workers.pop(task, None)  # type: ignore[arg-type]
                if not workers:
                    self.workers = None
            if self.lanes is lanes and (session.closing or not lanes.busy):
                # Closing: what is held back is of no use, and must not keep reading paused
                # (the client's close reply is read, or the close waits for CLOSE_TIMEOUT).
                lanes.clear()
                self.lanes = None
            if self.paused and (self.lanes is None or self.lanes.roomy):
                self._resume()  # the rest of a compressed read first (its close frame, say)

    # --- timers ------------------------------------------------------------------------------

    def paused_for(self, now: float) -> float:
        """Seconds, up to ``now``, that reading was paused (a full backlog waiting for Redis)."""
        if self.paused:
            return self.paused_total + (now - self.paused_at)
        return self.paused_total

    def _expect_close(self) -> None:
        """websockets expects the TCP connection to end: give the peer CLOSE_TIMEOUT s."""
        if self.close_armed:
            return
        self.close_armed = True
        if self.timer is not None:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_at(loop.time() + CLOSE_TIMEOUT, self._close_overdue)

    def _close_overdue(self) -> None:
        self.timer = None
        wait = self._answer_wait() if self.answering_http else None
        if wait is None:
            self.transport.abort()
            return
        loop = asyncio.get_running_loop()
        self.timer = loop.call_at(loop.time() + wait, self._close_overdue)

    def _answer_wait(self) -> float | None:
        """Seconds until an HTTP answer is looked at again, or None to drop the connection now.

        The CLOSE_TIMEOUT a client has to close its side starts only once the answer is sent: a
        large poll answer on a slow link takes longer than that, and cut short the client would
        ask for the same page again, and have it cut again, for ever. Two bounds: the
        slow-consumer rule (the answer's unsent bytes, the transport's and the kernel's, may not
        stop shrinking for ``--stall-timeout``; looked at every :data:`ANSWER_CHECK_INTERVAL`),
        and a deadline, CLOSE_TIMEOUT plus the answer's size at ``--answer-min-rate``, so that
        a client reading a few bytes at a time cannot hold the socket for ever.
        """
        left = unsent(self.transport)
        previous, self.answer_unsent = self.answer_unsent, left
        if left == 0:
            # Sent since the last look: CLOSE_TIMEOUT from now to close; else that has passed.
            return CLOSE_TIMEOUT if previous else None
        now = asyncio.get_running_loop().time()
        if now >= self.answer_deadline:
            return None
        policy = self.endpoint.policy
        self.answer_stalled_since = policy.stalled(
            left, left + 1 if previous is None else previous, self.answer_stalled_since, now
        )
        return None if policy.is_stalled(self.answer_stalled_since, now) else ANSWER_CHECK_INTERVAL

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class WebSocketSession(ClientSession):
    """A :class:`ClientSession` on a :class:`WebSocketConnection`: websockets owns the framing
    of what it sends itself (pings, pongs, close frames); the gateway's frames are pre-built
    (see :mod:`gateway.frames`) and written by :class:`ClientSession` directly, unless
    permessage-deflate is negotiated (``raw`` False), when websockets frames and compresses
    each one."""

    __slots__ = ("connection", "pings", "protocol", "raw")

    def __init__(
        self,
        connection: Any,
        policy: SlowConsumerPolicy,
        schedule_flush: Callable[[ClientSession], None],
        *,
        raw: bool,
    ) -> None:
        super().__init__(connection.transport, policy, schedule_flush, direct=raw)
        #: The :class:`WebSocketConnection` (anything with ``transport``, ``protocol``,
        #: ``send_data()`` and ``close(code, reason)``).
        self.connection = connection
        self.protocol = connection.protocol
        self.raw = raw  # False when permessage-deflate is negotiated: websockets frames each one
        #: The payloads of the keepalive pings not answered yet, oldest first (None: none). A
        #: pong answers its ping and every earlier one (as websockets' ``pending_pings``).
        self.pings: list[bytes] | None = None

    def is_open(self) -> bool:
        return not self.closing and self.protocol.state is _OPEN

    def send_replay(self, items: list[Outgoing], wire: bytes) -> None:
        # Written as they are (no permessage-deflate): the frames already joined, shared by
        # every client resuming at the same cursor, as one item instead of a hundred.
        if self.raw and len(items) > 1:
            super().send_replay([Outgoing.frames(wire)], wire)
        else:
            super().send_replay(items, wire)

    def _write_framed(self, items: list) -> None:
        for item in items:
            self.protocol.send_text(item.payload)
        self.connection.send_data()

    def _write_checked(self, wire: bytes, items: list) -> bool:
        if self.raw:
            return super()._write_checked(wire, items)
        if not self.is_open():
            return True
        # The same limit as a raw write, checked before websockets frames (and compresses) the
        # messages: a client that stops reading is cut here, not up to a second of traffic
        # later by the periodic check.
        if self.transport.get_write_buffer_size() and self.over_limit():
            self.cut_slow()
            return False
        self._write_framed(items)  # whatever the transport (a test double included)
        return True

    def on_websockets_write(self) -> None:
        """websockets wrote to the transport (a ping, a pong, a close frame) or lost it."""
        if self.writable and (
            self.protocol.state is not _OPEN or self.transport.get_write_buffer_size()
        ):
            self.writable = False

    def _send_close(self, code: CloseCode, reason: str) -> None:
        if self.protocol.state is _OPEN:
            self.protocol.send_close(code, close_reason(reason))
            self.connection.send_data()

    def _close_gracefully(self, code: CloseCode, reason: str) -> None:
        self.connection.close(code, reason)

    def ping(self, now: float) -> bytes | None:
        # Written directly, not through websockets' protocol (which keeps no record of the
        # pings it sends): the keepalive is most of what an idle connection costs, and building
        # a Frame to serialize four bytes was a third of each ping.
        if not self.is_open():
            return None
        data = _PING.pack(random.getrandbits(32))
        transport = self.transport
        try:
            transport.write(_PING_HEADER + data)
        except Exception:
            return None  # the connection is going away
        if self.writable and transport.get_write_buffer_size():
            self.writable = False  # what follows waits behind it, checked
        if self.pings is None:
            self.pings = []
        self.pings.append(data)
        return data

    def pong(self, data: bytes) -> None:
        """A pong arrived: it answers the ping with its payload, and every earlier one."""
        pings = self.pings
        if pings is not None and data in pings:
            del pings[: pings.index(data) + 1]
            if not pings:
                self.pings = None

    def ping_unanswered(self, data: bytes) -> bool:
        return self.pings is not None and data in self.pings

    def read_paused_for(self, now: float) -> float:
        # While the lanes' backlog is full nothing is read, pongs included: the gateway's wait.
        return self.connection.paused_for(now)


class Held:
    """A message read while some wait for Redis (gateway.lanes): decoded, its place in the
    order sent, and its rate-limit verdict once taken (None: taken when handled)."""

    __slots__ = ("arrival", "error", "message", "verdict")

    def __init__(self, message: Any, error: ProtocolError | None, arrival: int) -> None:
        self.message = message
        self.error = error
        self.arrival = arrival
        self.verdict: int | None = None


class HeldBack(FrameLanes[Held]):
    """A connection's :class:`~gateway.lanes.FrameLanes` while some of its messages wait for
    Redis (none otherwise: an idle connection carries no such state), with the order the
    messages were read in, for the rate limit: the messages held back whose token is not taken
    yet, oldest first (``untaken``); one handled before them (a ping at once, another
    project's) first has theirs taken (:meth:`WebSocketConnection._take_tokens`)."""

    __slots__ = ("arrivals", "untaken")

    def __init__(self) -> None:
        super().__init__(LANES_CONCURRENCY, MAX_BACKLOG)
        self.arrivals = 0
        self.untaken: deque[Held] = deque()

    def read(self, message: Any, error: ProtocolError | None) -> Held:
        """A message read now, numbered in the order sent."""
        held = Held(message, error, self.arrivals)
        self.arrivals += 1
        return held


def _stop(task: asyncio.Task, pending: Coroutine[Any, Any, Any]) -> None:
    """A wait for Redis that the connection no longer needs must not hold its task and session
    (or request) until ``--subscribe-timeout``: cancelled as that timeout would (every such wait
    is cancellation-safe); a coroutine its task has not started yet is closed instead of left
    unawaited."""
    if inspect.getcoroutinestate(pending) == inspect.CORO_CREATED:
        pending.close()
    task.cancel()
