"""Load generator for the gateway benchmark: raw-socket WebSocket clients that count frames in bulk.

Each worker process runs one ``epoll`` loop over thousands of non-blocking sockets. A client does
the opening handshake by hand and sends its ``subscribe`` as a masked text frame. From then on it
counts frames without building any per-frame Python object: the benchmark's events are ASCII JSON
of 140 to 255 bytes, so in a chunk without ping or close frames the text frames are exactly the
``0x81`` header bytes, counted by ``bytes.count`` at C speed; other chunks get an exact walk of
the frame headers, which also answers pings. Reads are as large as the kernel has buffered
(``SO_RCVLOWAT`` makes them larger while counting), so a worker that falls behind reads more
frames per system call and catches up: the server under test, not the load generator, sets the
pace.

Modes (per worker, switched between phases):

* ``count``: count text frames (the hot path).
* ``latency``: also read the publish timestamp embedded in each event (``"answer":"t<ns>"``) and
  record two latencies per frame (same machine, same clock): *arrival*, from the kernel's receive
  timestamp of the segment (``SO_TIMESTAMPNS``, read with ``recvmsg``), the moment the frame
  reached the client's socket; and *handled*, from the clock when this worker got round to it.
  Arrival is the server's figure: a client on another machine sees the frame then, whatever its
  own process is doing. Handled adds this worker's own scheduling lag on a core it shares with
  Redis and the publisher, and is reported beside it so that the difference stays visible.
  A client that falls an event behind loses the first frame's own arrival: the kernel merges
  segments waiting in a receive queue into one carrying the later timestamp
  (``tcp_try_coalesce``), and ``recvmsg`` reports the timestamp of the last segment it read
  anyway. Such a frame is dated by the later arrival, an upper bound; ``stats()["shared"]``
  counts them (every text frame of a read but its last).
* ``record``: also keep every payload, so that a resume can be checked seq by seq afterwards.

Transports (per load generator): ``websocket`` (above), or ``sse``: each client opens
``GET /v1/projects/{id}/stream`` (a gateway run with ``--no-auth``), is live at its
``event: subscribed``, and counts events as ``data: {`` lines (every line of the stream is
complete before it is counted; the benchmark's events hold no line break); in latency mode each
event's timestamp is read the same way. ``record`` and ``resubscribe`` are WebSocket-only.

Transport ``socketio``: a socket.io 4 client on the WebSocket transport alone (Engine.IO protocol
v4, Socket.IO protocol v5), for the socket.io baseline (``bench/socketio``). The handshake goes to
``/socket.io/?EIO=4&transport=websocket``; the client waits for the server's Engine.IO open packet
``0{..}``, connects to the main namespace with ``40``, waits for ``40{"sid":..}``, then sends
``42["subscribe",{"project_id":N}]`` and is live at ``42["subscribed",..]``, as socket.io-client
does (an event that reaches socket.io 4.8 before the namespace's socket exists, which is only once
its middlewares ran, makes it close the connection: "invalid state"). Each ``42["event",{..}]``
counts as a delivery; Engine.IO pings (``2``, text frames from the server) are answered ``3`` and
never counted, and so is nothing else: events are 126-byte-form frames (``0x81 0x7e``), so a chunk
whose every ``0x81`` is followed by ``0x7e`` holds events only and takes the hot path; any other
chunk gets the exact walk. ``resubscribe`` works (``unsubscribe`` then ``subscribe``); a resume does
not (socket.io has no history: the cursor of a spec is ignored).

Authentication (WebSocket): a gateway run with an auth secret gets, per client, the token given
to :meth:`LoadGen.connect`. The client does what ``eventbus.js`` and the Python consumer do: its
first frame is ``{"type":"auth","token":..}``, and its ``subscribe`` goes right behind it, in the
same write (the gateway reads the token first; ``authenticated`` is answered before
``subscribed``). Without tokens (a gateway run with ``--no-auth``) the ``subscribe`` follows the
handshake at once.

The parent drives workers through :class:`LoadGen` (commands over a pipe); each worker publishes
its running frame count in shared memory so that the publisher can pace itself on deliveries.
"""

from __future__ import annotations

import array
import errno
import json
import multiprocessing
import os
import random
import re
import resource
import select
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["LoadGen", "raise_nofile", "verify_resume"]

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_LINGER_RST = struct.pack("ii", 1, 0)
_TS_RE = re.compile(rb'"answer": ?"t(\d+)')
#: Linux's SO_TIMESTAMPNS (= SCM_TIMESTAMPNS; not in Python's socket module): receive timestamps
#: as a struct timespec of two longs. Room for one such control message per recvmsg.
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_ANC_SIZE = socket.CMSG_SPACE(16)
_TIMESPEC = struct.Struct("@qq")
_SEQ_RE = re.compile(rb'"seq": ?(\d+)')
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT

# Client states.
CONNECTING, HANDSHAKE, AUTHENTICATING, SUBSCRIBING, LIVE, DEAD = range(6)
# socket.io only: waiting for the Engine.IO open packet, then for the namespace's CONNECT answer.
OPENING, JOINING = range(6, 8)


def raise_nofile(want: int = 0) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (and both to ``want`` when the process may:
    root, up to ``fs.nr_open``); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (OSError, ValueError):
            pass
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def masked_text(payload: bytes) -> bytes:
    """A client-to-server text frame (masking key 0: the payload goes through unchanged)."""
    length = len(payload)
    if length < 126:
        return bytes((0x81, 0x80 | length)) + b"\0\0\0\0" + payload
    return struct.pack("!BBH", 0x81, 0x80 | 126, length) + b"\0\0\0\0" + payload


def _control(opcode: int, payload: bytes) -> bytes:
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


def subscribe_frame(
    project_id: int, epoch: str | None = None, after: int | None = None, tag: str | None = None
) -> bytes:
    message: dict[str, Any] = {"type": "subscribe", "project_id": project_id}
    if epoch is not None:
        message["epoch"], message["after"] = epoch, after
    if tag is not None:  # the tag of the event at the cursor, as eventbus.js sends it
        message["tag"] = tag
    return masked_text(json.dumps(message, separators=(",", ":")).encode())


def auth_frame(token: str) -> bytes:
    return masked_text(json.dumps({"type": "auth", "token": token}).encode())


def unsubscribe_frame(project_id: int) -> bytes:
    return masked_text(b'{"type":"unsubscribe","project_id":%d}' % project_id)


def sio_event(name: str, project_id: int) -> bytes:
    """A socket.io EVENT (Engine.IO message ``4``, Socket.IO event ``2``) to the main namespace:
    ``42["<name>",{"project_id":N}]``, as socket.io-client sends ``socket.emit(name, {..})``."""
    return masked_text(b'42["%s",{"project_id":%d}]' % (name.encode(), project_id))


#: Engine.IO v4: the server pings (``2``), the client answers ``3``; ``40`` connects to ``/``.
_SIO_PONG = masked_text(b"3")
_SIO_CONNECT = masked_text(b"40")


class Client:
    __slots__ = (
        "done_at",
        "error",
        "frames",
        "fresh",
        "head",
        "live",
        "project",
        "record",
        "rest",
        "sock",
        "spec",
        "state",
        "token",
    )

    def __init__(
        self, sock: socket.socket, spec: tuple[int, str | None, int | None], token: str | None
    ) -> None:
        self.sock = sock
        self.spec = spec
        self.token = token
        self.project = spec[0]
        self.state = CONNECTING
        self.live = False
        self.head = b""
        self.rest = b""
        self.frames = 0
        self.record: list[bytes] | None = None
        self.done_at = 0.0
        self.error: str | None = None
        self.fresh = True  # not yet in the worker's list of live clients


class Worker:
    """One load-generator process (runs :meth:`run` until told to quit)."""

    def __init__(
        self,
        ctrl,
        counter,
        host: str,
        port: int,
        sources: Sequence[str],
        transport: str = "websocket",
    ) -> None:
        self.ctrl = ctrl
        self.sse = transport == "sse"
        self.sio = transport == "socketio"
        self.host_header = f"{host}:{port}"
        self.counter = counter
        self.addr = (host, port)
        self.sources = list(sources)
        self.source_index = 0
        path = "/socket.io/?EIO=4&transport=websocket" if self.sio else "/"
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\nOrigin: http://localhost\r\n\r\n"
        ).encode()
        self.ep = select.epoll()
        self.clients: dict[int, Client] = {}
        self.order: list[Client] = []  # live clients, in connection order
        self.total = 0
        self.dead = 0
        self.pings = 0  # pings answered (WebSocket, or socket.io's Engine.IO pings)
        self.mode = "count"
        self.latencies = array.array("q")  # arrival (kernel receive timestamp) - publish
        self.handled = array.array("q")  # processing time in this worker - publish
        self.shared = 0  # latency mode: frames read together with a later one (see the docstring)
        self.arrival_ns = 0  # kernel receive timestamp of the chunk being walked (latency mode)
        # Pending operation: clients waiting for "subscribed", clients not yet started.
        self.waiting: set[Client] = set()
        self.queue: list[tuple[float, tuple[int, str | None, int | None], str | None]] = []
        self.inflight = 256
        self.op: str | None = None
        self.op_started = 0.0
        self.op_failed = 0

    # --- control -----------------------------------------------------------------------------

    def run(self) -> None:
        self.ep.register(self.ctrl.fileno(), _EPOLLIN)
        ctrl_fd = self.ctrl.fileno()
        clients = self.clients
        recv_size = 1 << 16
        while True:
            events = self.ep.poll((0.002 if self.queue else 0.05) if self.op else 0.5)
            total = 0
            for fd, mask in events:
                client = clients.get(fd)
                if client is None:
                    if fd == ctrl_fd and not self._command():
                        return
                    continue
                state = client.state
                if state == CONNECTING:
                    self._connected(client, mask)
                    continue
                try:
                    if self.mode == "latency":
                        data, ancdata, _, _ = client.sock.recvmsg(recv_size, _ANC_SIZE)
                        self.arrival_ns = _arrival_ns(ancdata)
                    else:
                        data = client.sock.recv(recv_size)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._kill(client, "connection closed by the server")
                    continue
                if state == HANDSHAKE:
                    data = self._handshake(client, data)
                    if not data:
                        continue
                if client.rest:
                    data = client.rest + data
                if self.sse:
                    total += self._sse_chunk(client, data)
                    continue
                live = client.live
                plain = live and self.mode == "count"
                # --- the hot path: count text frames with C-speed scans -------------------------
                # Event payloads are ASCII JSON of 140..255 bytes, so the only bytes >= 0x80 in
                # the stream are frame headers and 16-bit length bytes, and those lengths are
                # never 0x81, 0x88 or 0x89: 0x81 counts text frames exactly. Chunks with a
                # possible ping (0x89) or close (0x88) go through the exact walk below, and so
                # do socket.io chunks with a frame other than an event (see the module doc).
                if (
                    plain
                    and data.find(b"\x89") < 0
                    and data.find(b"\x88") < 0
                    and (not self.sio or data.count(b"\x81") == data.count(b"\x81\x7e"))
                ):
                    count = data.count(b"\x81")
                    last = data.rfind(b"\x81")
                    n = len(data)
                    if last < 0:
                        client.rest = b""  # (cannot happen: data starts at a frame header)
                        continue
                    # Is the last frame complete? If not, keep it (aligned) for the next read.
                    end = n + 1
                    if last + 1 < n:
                        b1 = data[last + 1]
                        if b1 < 126:
                            end = last + 2 + b1
                        elif last + 3 < n:
                            end = last + 4 + ((data[last + 2] << 8) | data[last + 3])
                    if end > n:
                        client.rest = data[last:]
                        count -= 1
                    else:
                        client.rest = b""
                    client.frames += count
                    total += count
                    continue
                # --- the exact path: walk frame headers ----------------------------------------
                n = len(data)
                i = 0
                count = 0
                texts = 0
                while n - i >= 2:
                    b1 = data[i + 1]
                    if b1 < 126:
                        end = i + 2 + b1
                        start = i + 2
                    elif b1 == 126:
                        if n - i < 4:
                            break
                        start = i + 4
                        end = start + ((data[i + 2] << 8) | data[i + 3])
                    else:
                        if n - i < 10:
                            break
                        start = i + 10
                        end = start + int.from_bytes(data[i + 2 : i + 10], "big")
                    if end > n:
                        break
                    # socket.io: only an EVENT is a delivery; pings and answers go to _frame.
                    event = data[i] == 0x81 and (not self.sio or data.startswith(b"42", start))
                    if event:
                        texts += 1
                    if event and plain:
                        count += 1
                    elif not self._frame(client, data[i], data, start, end):
                        n = -1
                        break
                    i = end
                if n < 0:
                    continue
                if texts > 1 and self.mode == "latency":
                    self.shared += texts - 1
                client.rest = data[i:] if i < len(data) else b""
                client.frames += count
                total += count
            self.total += total
            self.counter.value = self.total
            if self.op:
                self._progress()

    def _command(self) -> bool:
        try:
            cmd, arg = self.ctrl.recv()
        except EOFError:
            return False
        if cmd == "connect":
            specs, tokens, self.inflight, record, spread = arg
            self.mode = "record" if record else self.mode
            # Each client starts at a random moment within ``spread`` seconds (a reconnect
            # storm with the client's own jitter); the queue is popped from its end.
            now = time.time()
            starts = [now + (random.random() * spread if spread else 0.0) for _ in specs]
            if tokens is None:
                tokens = [None] * len(specs)
            self.queue = sorted(
                zip(starts, specs, tokens, strict=True), key=lambda x: x[0], reverse=True
            )
            self._begin("connect")
        elif cmd == "resubscribe":
            # arg: new project per live client (in order); unsubscribe the old one first.
            for client, project in zip(self._live(), arg, strict=False):
                if self.sio:
                    frames = sio_event("unsubscribe", client.project) + sio_event(
                        "subscribe", project
                    )
                else:
                    frames = unsubscribe_frame(client.project) + subscribe_frame(project)
                client.project = project
                client.live = False
                client.state = SUBSCRIBING
                self.waiting.add(client)
                self._send(client, frames)
            self._begin("resubscribe")
        elif cmd == "mode":
            self.mode = arg
            if arg == "latency":
                self.latencies = array.array("q")
                self.handled = array.array("q")
                self.shared = 0
                for client in self._live():
                    client.sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            if arg == "record":
                for client in self._live():
                    client.record = []
        elif cmd == "lowat":
            # Readable only once this many bytes are queued: fewer, larger reads (and fewer
            # ACKs) per delivery while counting; 1 (the default) to see every last byte.
            for client in self._live():
                try:
                    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, arg)
                except OSError:
                    pass
            self.ctrl.send(len(self.order))
        elif cmd == "stats":
            projects: dict[int, int] = {}
            for client in self._live():
                projects[client.project] = projects.get(client.project, 0) + 1
            self.ctrl.send(
                {
                    "clients": len(self.order),
                    "frames": self.total,
                    "dead": self.dead,
                    "pings": self.pings,
                    "latencies": len(self.latencies),
                    "shared": self.shared,
                    "projects": projects,
                }
            )
        elif cmd == "latencies":
            self.ctrl.send((self.latencies.tobytes(), self.handled.tobytes()))
        elif cmd == "records":
            self.ctrl.send([(c.spec, c.record or [], c.done_at) for c in self._live()])
            for client in self.order:
                client.record = None
        elif cmd == "close":
            count = len(self._live()) if arg is None else arg
            victims, self.order = self.order[:count], self.order[count:]
            for client in victims:
                self._drop(client)
            self.ctrl.send(len(victims))
        elif cmd == "quit":
            for client in list(self.clients.values()):
                self._drop(client)
            self.ctrl.send(True)
            return False
        return True

    def _begin(self, op: str) -> None:
        self.op = op
        self.op_started = time.time()
        self.op_failed = 0
        self._progress()

    def _progress(self) -> None:
        now = time.time()
        while self.queue and len(self.waiting) < self.inflight and self.queue[-1][0] <= now:
            _, spec, token = self.queue.pop()
            self._open(spec, token)
        if not self.queue and not self.waiting:
            done = [c.done_at for c in self._live() if c.done_at]
            self.ctrl.send(
                {
                    "op": self.op,
                    "clients": len(self.order),
                    "failed": self.op_failed,
                    "started": self.op_started,
                    "finished": max(done, default=time.time()),
                }
            )
            self.op = None

    # --- connections -------------------------------------------------------------------------

    def _open(self, spec: tuple[int, str | None, int | None], token: str | None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        source = self.sources[self.source_index % len(self.sources)]
        self.source_index += 1
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        except OSError:
            pass
        client = Client(sock, spec, token)
        self.waiting.add(client)
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            self._fail(client, os.strerror(err))
            sock.close()
            return
        self.clients[sock.fileno()] = client
        self.ep.register(sock.fileno(), _EPOLLOUT)

    def _connected(self, client: Client, mask: int) -> None:
        err = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._kill(client, os.strerror(err))
            return
        client.state = HANDSHAKE
        self.ep.modify(client.sock.fileno(), _EPOLLIN)
        if self.sse:
            self._send(
                client,
                f"GET /v1/projects/{client.project}/stream HTTP/1.1\r\nHost: {self.host_header}\r\n"
                "Accept: text/event-stream\r\nOrigin: http://localhost\r\n\r\n".encode(),
            )
            return
        self._send(client, self.request)

    def _sse_chunk(self, client: Client, data: bytes) -> int:
        """An SSE client's bytes: count the ``data: {`` lines of events (complete lines only);
        returns the events counted."""
        cut = data.rfind(b"\n") + 1
        client.rest = data[cut:]
        if not client.live:
            at = data.find(b"event: subscribed\n", 0, cut)
            if (
                data.find(b"event: error\n", 0, cut) >= 0
                or data.find(b"event: close\n", 0, cut) >= 0
            ):
                self._kill(client, data[:cut].decode("utf-8", "replace")[:200])
                return 0
            if at < 0:
                return 0
            end = data.find(b"\n\n", at)
            client.live = True
            client.state = LIVE
            client.done_at = time.time()
            self.waiting.discard(client)
            if client.fresh:
                client.fresh = False
                self.order.append(client)
            start = end + 2 if end >= 0 else cut
        else:
            start = 0
            if data.find(b"event: close\n", 0, cut) >= 0:
                self._kill(client, "close event")
                return 0
        count = data.count(b"data: {", start, cut)
        if count and self.mode == "latency":
            if count > 1:
                self.shared += count - 1
            now = time.time_ns()
            for match in _TS_RE.finditer(data, start, cut):
                published = int(match.group(1))
                self.handled.append(now - published)
                self.latencies.append((self.arrival_ns or now) - published)
        client.frames += count
        return count

    def _handshake(self, client: Client, data: bytes) -> bytes:
        head = client.head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            client.head = head
            return b""
        client.head = b""
        if self.sse:
            if not head.startswith(b"HTTP/1.1 200"):
                self._kill(client, head.split(b"\r\n", 1)[0].decode("latin-1"))
                return b""
            client.state = SUBSCRIBING
            return head[end + 4 :]
        if not head.startswith(b"HTTP/1.1 101"):
            self._kill(client, head.split(b"\r\n", 1)[0].decode("latin-1"))
            return b""
        if self.mode == "record":
            client.record = []
        if self.sio:
            client.state = OPENING  # the open packet comes first, unasked
        elif client.token is not None:
            client.state = AUTHENTICATING
            self._send(client, auth_frame(client.token) + subscribe_frame(*client.spec))
        else:
            client.state = SUBSCRIBING
            self._send(client, subscribe_frame(*client.spec))
        return head[end + 4 :]

    def _frame(self, client: Client, op: int, data: bytes, start: int, end: int) -> bool:
        """Every frame but a plain counted one; False when the client is gone."""
        if op == 0x81 and self.sio and not data.startswith(b"42", start):
            return self._sio_packet(client, data[start:end])
        if op == 0x81:
            if client.live:
                client.frames += 1
                self.total += 1
                if self.mode == "latency":
                    match = _TS_RE.search(data, start, end)
                    if match is not None:
                        published = int(match.group(1))
                        self.handled.append(time.time_ns() - published)
                        self.latencies.append((self.arrival_ns or time.time_ns()) - published)
                elif client.record is not None:
                    client.record.append(data[start:end])
                return True
            payload = data[start:end]
            if client.state == AUTHENTICATING and payload.startswith(
                (b'{"type":"authenticated"', b'{"type": "authenticated"')
            ):  # not recorded: a record holds what the subscribe brought
                client.state = SUBSCRIBING
                return True
            if client.record is not None:
                client.record.append(payload)
            if payload.startswith(
                (b'{"type":"subscribed"', b'{"type": "subscribed"', b'42["subscribed"')
            ):
                client.live = True
                client.state = LIVE
                client.done_at = time.time()
                self.waiting.discard(client)
                if client.fresh:
                    client.fresh = False
                    self.order.append(client)
            elif payload.startswith((b'{"type":"error"', b'{"type": "error"')):
                self._kill(client, payload.decode("utf-8", "replace"))
                return False
            return True
        if op == 0x89:  # ping
            self.pings += 1
            self._send(client, _control(0xA, data[start:end]))
            return True
        if op == 0x88:  # close
            self._kill(client, f"close frame {data[start:end][:2].hex()}")
            return False
        return True  # pong, binary, continuation: ignored

    def _sio_packet(self, client: Client, payload: bytes) -> bool:
        """A socket.io text frame other than an EVENT; False when the client is gone."""
        if payload == b"2":  # Engine.IO ping
            self.pings += 1
            self._send(client, _SIO_PONG)
            return client.state != DEAD
        if client.state == OPENING and payload.startswith(b"0{"):
            client.state = JOINING
            self._send(client, _SIO_CONNECT)
            return client.state != DEAD
        if client.state == JOINING and payload.startswith(b"40{"):
            client.state = SUBSCRIBING
            self._send(client, sio_event("subscribe", client.project))
            return client.state != DEAD
        if payload.startswith((b"1", b"41", b"44")):  # close, DISCONNECT, CONNECT_ERROR
            self._kill(client, f"socket.io {payload[:200].decode('utf-8', 'replace')}")
            return False
        return True  # noop, unexpected: ignored

    def _send(self, client: Client, data: bytes) -> None:
        try:
            sent = client.sock.send(data)
        except OSError as exc:
            self._kill(client, str(exc))
            return
        if sent != len(data):  # never happens with these tiny frames and empty buffers
            self._kill(client, "short write")

    def _fail(self, client: Client, reason: str) -> None:
        if client in self.waiting:
            self.waiting.discard(client)
            self.op_failed += 1
            if self.op_failed <= 3:
                print(f"loadgen: client failed: {reason}", flush=True)

    def _kill(self, client: Client, reason: str) -> None:
        if client.state == DEAD:
            return
        self._fail(client, reason)
        if client.state == LIVE or client.live:
            self.dead += 1
        self._drop(client)  # dropped from self.order lazily (see _live)

    def _live(self) -> list[Client]:
        self.order = [c for c in self.order if c.state != DEAD]
        return self.order

    def _drop(self, client: Client) -> None:
        """Close with a reset: no closing handshake, no TIME_WAIT."""
        client.state = DEAD
        client.live = False
        sock = client.sock
        self.clients.pop(sock.fileno(), None)
        self.waiting.discard(client)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
        sock.close()


def _arrival_ns(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The SCM_TIMESTAMPNS of a ``recvmsg`` (the last segment read), or 0 when absent."""
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
            seconds, nanoseconds = _TIMESPEC.unpack_from(payload)
            return seconds * 1_000_000_000 + nanoseconds
    return 0


def _worker_main(ctrl, counter, host, port, sources, cpus, transport="websocket") -> None:
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:
            pass
    raise_nofile()
    Worker(ctrl, counter, host, port, sources, transport).run()


class LoadGen:
    """The parent's handle on a few worker processes (clients are spread round-robin)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        workers: int = 2,
        sources: Sequence[str] = ("127.0.0.1",),
        cpus: set[int] | None = None,
        transport: str = "websocket",
    ) -> None:
        """``transport``: "websocket", "sse" or "socketio" (see the module doc)."""
        ctx = multiprocessing.get_context("spawn")
        self.counters = [ctx.RawValue("q", 0) for _ in range(workers)]
        self.pipes = []
        self.procs = []
        for index in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(child, self.counters[index], host, port, list(sources), cpus, transport),
                daemon=True,
                name=f"loadgen-{index}",
            )
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def frames(self) -> int:
        """Text frames counted by every client so far (cheap: shared memory)."""
        return sum(counter.value for counter in self.counters)

    def _all(self, cmd: str, args: Sequence[Any], timeout: float = 600) -> list[Any]:
        for pipe, arg in zip(self.pipes, args, strict=True):
            pipe.send((cmd, arg))
        return [self._reply(pipe, timeout) for pipe in self.pipes]

    def _reply(self, pipe, timeout: float) -> Any:
        if not pipe.poll(timeout):
            raise TimeoutError("load generator did not answer")
        return pipe.recv()

    def _split(self, items: Sequence[Any]) -> list[list[Any]]:
        n = len(self.pipes)
        return [list(items[i::n]) for i in range(n)]

    def connect(
        self,
        specs: Sequence[tuple[int, str | None, int | None] | tuple[int, str, int, str | None]],
        *,
        inflight: int = 512,
        record: bool = False,
        timeout: float = 300,
        spread: float = 0.0,
        tokens: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Open one client per spec ``(project, epoch, after)`` or ``(project, epoch, after,
        tag)``; return when all are subscribed.
        With ``spread``, each client starts at a uniformly random moment within that many seconds
        (at most ``inflight`` handshakes in progress at once either way). ``tokens``: one per
        spec, each client's own, sent in its ``auth`` frame before it subscribes (WebSocket).

        Returns the number of clients, failures, and the wall-clock time from the command to the
        last ``subscribed`` received.
        """
        started = time.time()
        if tokens is not None and len(tokens) != len(specs):
            raise ValueError("one token per spec")
        per = max(1, inflight // len(self.pipes))
        token_parts = self._split(tokens) if tokens is not None else [None] * len(self.pipes)
        args = [
            (part, part_tokens, per, record, spread)
            for part, part_tokens in zip(self._split(specs), token_parts, strict=True)
        ]
        replies = self._all("connect", args, timeout)
        finished = max(r["finished"] for r in replies)
        return {
            "clients": sum(r["clients"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "seconds": finished - started,
        }

    def resubscribe(self, project_of: Sequence[int], timeout: float = 300) -> dict[str, Any]:
        """Move the live clients (worker by worker, in order) to new projects."""
        started = time.time()
        replies = self._all("resubscribe", self._split(project_of), timeout)
        return {
            "clients": sum(r["clients"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "seconds": max(r["finished"] for r in replies) - started,
        }

    def mode(self, mode: str) -> None:
        for pipe in self.pipes:
            pipe.send(("mode", mode))

    def lowat(self, nbytes: int) -> None:
        """Set SO_RCVLOWAT on every live client (see :meth:`Worker._command`)."""
        self._all("lowat", [nbytes] * len(self.pipes), 60)

    def stats(self) -> dict[str, Any]:
        """Live clients, frames counted, clients cut by the server, pings answered,
        subscribers per project."""
        replies = self._all("stats", [None] * len(self.pipes), 30)
        out: dict[str, Any] = {
            key: sum(r[key] for r in replies)
            for key in ("clients", "frames", "dead", "latencies", "shared", "pings")
        }
        projects: dict[int, int] = {}
        for reply in replies:
            for project, count in reply["projects"].items():
                projects[project] = projects.get(project, 0) + count
        out["projects"] = projects
        return out

    def latencies(self) -> tuple[array.array, array.array]:
        """Nanoseconds from publish to (arrival at the socket, handling by a worker), per frame
        received in ``latency`` mode, in no particular order."""
        arrival, handled = array.array("q"), array.array("q")
        for raw_arrival, raw_handled in self._all("latencies", [None] * len(self.pipes), 60):
            arrival.frombytes(raw_arrival)
            handled.frombytes(raw_handled)
        return arrival, handled

    def records(self) -> list[tuple[tuple[int, str | None, int | None], list[bytes], float]]:
        out = []
        for part in self._all("records", [None] * len(self.pipes), 120):
            out.extend(part)
        return out

    def close(self, count: int | None = None) -> int:
        """Reset ``count`` clients (all by default), spread evenly over the workers."""
        if count is None:
            args: list[int | None] = [None] * len(self.pipes)
        else:
            n = len(self.pipes)
            args = [count // n + (1 if i < count % n else 0) for i in range(n)]
        return sum(self._all("close", args, 60))

    def quit(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("quit", None))
                pipe.poll(10)
            except (OSError, EOFError):
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def verify_resume(
    records: Sequence[tuple[tuple[int, str | None, int | None], list[bytes], float]],
    expected: int,
) -> dict[str, Any]:
    """Check every resumed client got exactly ``after+1 .. after+expected``, then ``subscribed``."""
    ok = 0
    problems: list[str] = []
    for (project, _epoch, after, *_tag), payloads, _done in records:
        seqs = []
        subscribed = None
        for payload in payloads:
            if payload.startswith(b'{"type":"subscribed"'):
                subscribed = json.loads(payload)
                break
            match = _SEQ_RE.search(payload)
            seqs.append(int(match.group(1)) if match else -1)
        assert after is not None
        want = list(range(after + 1, after + expected + 1))
        good = (
            seqs == want
            and subscribed is not None
            and subscribed.get("resumed") is True
            and subscribed.get("replayed") == expected
            and subscribed.get("seq") == after + expected
        )
        if good:
            ok += 1
        elif len(problems) < 5:
            problems.append(
                f"project {project} after {after}: got {len(seqs)} events "
                f"({seqs[:3]}..{seqs[-3:]}), subscribed={subscribed}"
            )
    return {"clients": len(records), "exact": ok, "problems": problems}
