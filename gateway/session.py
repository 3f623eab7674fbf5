"""One client connection: its token, its projects, its outbound queue and its write path.

:class:`ClientSession` is the transport-agnostic part (what the client protocol in
:mod:`gateway.clients` and the hub in :mod:`gateway.hub` work with);
:class:`gateway.websocket.WebSocketSession` adds what is WebSocket-specific (websockets'
protocol state, close frames, compression), and :class:`gateway.sse.SseSession` what is
SSE-specific. Both share the write path and the
slow-consumer, stall and drain behaviour described here.

Outbound frames are queued and written once per event-loop iteration, so a burst of events costs
one write per connection instead of one per event. A project's frames are queued once for all its
live subscribers (see :mod:`gateway.hub`) and reach each of them through
:meth:`ClientSession.write`; what concerns one connection alone (replies, replay) waits in its
own outbox. Frames are the same pre-built bytes for every subscriber (see :mod:`gateway.frames`);
websockets still owns the handshake, reading, pings and the closing handshake.

The write itself is the hot path of the whole gateway (one per subscriber per event at low rates),
so while the transport has nothing buffered it skips every check: on asyncio's own transports it
is a single ``os.write`` on the socket (same bytes, same order, without asyncio's per-call
bookkeeping), on uvloop's the transport's own ``write``, in C. Whatever the socket does not take
is buffered by the transport, and from then on every write goes through the checked path until
that buffer is empty again, so frames (ours, and websockets' pings and close frames) are never
reordered or interleaved.

The slow-consumer policy lives here too: a connection whose write buffer passes
``outbound_limit``, or whose unsent bytes (its write buffer plus what the kernel has not sent yet,
looked at once a second) stop shrinking for ``stall_timeout``, is cut with close code 4008 and its
transport aborted, which frees its buffer at once. It reconnects and resumes from its cursors.

:class:`Admission` counts every socket of the port from accept to close (``--max-connections``).
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import operator
import os
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.frames import text_frame
from gateway.ratelimit import NEVER
from schemas.protocol import CloseCode, ResyncRequired, Subscribed, encode
from schemas.tags import event_tag
from schemas.tokens import TokenClaims

if TYPE_CHECKING:
    from schemas.protocol import ServerMessage

__all__ = [
    "Admission",
    "ClientSession",
    "Outgoing",
    "Session",
    "SlowConsumerPolicy",
    "bound_unacknowledged",
    "joined",
    "unsent",
]

_ids = itertools.count(1)
_UNKNOWN = object()  # an Outgoing's tag not computed yet
_INT = struct.Struct("i")


class Outgoing:
    """A payload and its frame, built once and shared by every recipient.

    ``project_id`` and ``seq`` say which event it is (0 for control messages, and when the
    sender did not say); ``kind`` is the control message's type ("" for an event) and
    ``epoch`` the epoch a ``subscribed`` or ``resync_required`` continues from: what a
    transport that numbers its messages by cursor (SSE) needs, read without decoding JSON.
    :attr:`tag` completes that cursor.
    """

    __slots__ = ("_tag", "epoch", "kind", "payload", "project_id", "seq", "wire")

    def __init__(self, payload: bytes, project_id: int = 0, seq: int = 0) -> None:
        self.payload = payload
        self.wire = text_frame(payload)
        self.project_id = project_id
        self.seq = seq
        self.kind = ""
        self.epoch: str | None = None
        self._tag: str | object | None = _UNKNOWN

    @property
    def tag(self) -> str | None:
        """The tag (schemas.tags) of the event at this item's cursor: an event's own, computed
        once on first use (most events never need it); a ``subscribed``'s or
        ``resync_required``'s, as it says; None for anything else."""
        tag = self._tag
        if tag is _UNKNOWN:
            tag = self._tag = event_tag(self.payload) if self.seq and not self.kind else None
        return tag  # type: ignore[return-value]

    @classmethod
    def frames(cls, wire: bytes) -> Outgoing:
        """Frames already joined (a replay's), queued as one item by a transport that writes
        frames as they are; it has no payload, and is never re-framed or decoded."""
        item = cls.__new__(cls)
        item.payload = b""
        item.wire = wire
        item.project_id = 0
        item.seq = 0
        item.kind = ""
        item.epoch = None
        item._tag = None
        return item

    @classmethod
    def message(cls, message: ServerMessage) -> Outgoing:
        item = cls(encode(message), getattr(message, "project_id", None) or 0)
        item.kind = type(message).__struct_config__.tag or ""
        if isinstance(message, Subscribed | ResyncRequired):
            item.epoch = message.epoch
            item.seq = message.seq
            item._tag = message.tag
        else:
            item._tag = None
        return item


_WIRE = operator.attrgetter("wire")


def joined(items: list[Outgoing]) -> bytes:
    """The frames of ``items`` as one write."""
    return items[0].wire if len(items) == 1 else b"".join(map(_WIRE, items))


class SlowConsumerPolicy:
    """When to give up on a connection that does not read (pure; tested without sockets).

    A connection is cut when its buffered bytes exceed ``limit``, or when its buffer has been
    non-empty without shrinking for ``stall_timeout`` seconds (a client that stopped reading while
    no new event arrives would otherwise hold its buffer forever).
    """

    __slots__ = ("limit", "stall_timeout")

    def __init__(self, limit: int, stall_timeout: float) -> None:
        self.limit = limit
        self.stall_timeout = stall_timeout

    def over_limit(self, buffered: int) -> bool:
        return buffered > self.limit

    def stalled(
        self, buffered: int, previous: int, stalled_since: float | None, now: float
    ) -> float | None:
        """Track since when a buffer has stopped draining: None while it is empty or shrinking,
        else the time it was first seen stuck. :meth:`is_stalled` judges the result."""
        if buffered == 0 or buffered < previous:
            return None
        return now if stalled_since is None else stalled_since

    def is_stalled(self, stalled_since: float | None, now: float) -> bool:
        return stalled_since is not None and now - stalled_since > self.stall_timeout


class Admission:
    """How many sockets the WebSocket port holds, from accept to close (pure).

    Every TCP connection counts, whatever it has done so far: one that has sent nothing yet, one
    waiting for its handshake answer, one not yet authenticated, one subscribed, an HTTP request.
    A handshake is refused (503) while the *other* sockets reach ``max_connections``; a socket
    accepted while ``max_connections + slack`` are open is dropped at once, so silent sockets
    can never hold more descriptors than that. The slack keeps room for polite 503 answers and
    for health probes while the pod is full.
    """

    __slots__ = ("max_connections", "open", "slack")

    def __init__(self, max_connections: int, slack: int) -> None:
        self.max_connections = max_connections
        self.slack = slack
        self.open = 0

    def accept(self) -> bool:
        """A socket was accepted: count it, or False when it must be dropped now."""
        if self.open >= self.max_connections + self.slack:
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1

    def full(self) -> bool:
        """No room for a new WebSocket (the asking socket itself is counted already)."""
        return self.open - 1 >= self.max_connections


#: ``ioctl`` request for the bytes in a TCP socket's send queue not yet sent (Linux
#: ``SIOCOUTQNSD``): what a client that stopped reading leaves in the kernel once its receive
#: window is closed. Bytes sent but not yet acknowledged are not counted, so a healthy client on a
#: slow link does not look stuck.
SIOCOUTQNSD = 0x894B


class ClientSession:
    """One client connection, whatever its transport: its token, its projects, its outbox, and
    the write path with the slow-consumer policy.

    Transport-specific subclasses (:class:`WebSocketSession`, :class:`gateway.sse.SseSession`)
    say how frames become bytes (:meth:`write` may be overridden to re-frame ``items``), how a
    connection is closed (:meth:`_send_close`, :meth:`_close_gracefully`), whether it is open
    (:meth:`is_open`) and how it is kept alive (:meth:`ping`).
    """

    __slots__ = (
        "__weakref__",  # gateway.keepalive holds sessions weakly
        "allowance",
        "allowance_granted",
        "claims",
        "closing",
        "errors",
        "expiry",
        "fast",
        "fd",
        "id",
        "kernel_fd",
        "last_buffered",
        "outbox",
        "policy",
        "projects",
        "rate_stamp",
        "rate_strikes",
        "rate_tokens",
        "schedule_flush",
        "sent_since_check",
        "stalled_since",
        "transport",
        "writable",
    )

    #: The transport's name, as reported in logs and to clients ("websocket", "sse").
    transport_name = "websocket"

    def __init__(
        self,
        transport: asyncio.Transport,
        policy: SlowConsumerPolicy,
        schedule_flush: Callable[[ClientSession], None],
        *,
        direct: bool = True,
    ) -> None:
        self.id = next(_ids)
        self.transport = transport
        self.policy = policy
        self.schedule_flush = schedule_flush
        #: The socket's descriptor for direct writes, or -1 (not asyncio's own transport of a
        #: plain socket, or ``direct`` is off because the transport frames each message itself).
        self.fd = _direct_fd(transport) if direct else -1
        #: The socket's descriptor for the once-a-second look at the kernel's send queue, on
        #: any event loop (-1 when not a plain socket).
        self.kernel_fd = _socket_fd(transport)
        #: Whether writes may skip the checks while nothing is buffered: to ``fd`` (asyncio),
        #: or through the transport's own write, in C (uvloop: writing to its descriptor behind
        #: its back would rest on libuv's buffering and close order, which nothing here checks;
        #: asyncio's are what the rules of ``writable`` were shown against).
        self.fast = direct and self.kernel_fd >= 0
        #: True while a write may take the fast path: ``fast``, open, not closing, nothing
        #: buffered in the transport. Cleared by whatever changes one of those (our own writes,
        #: and the transport library's); set again by the next full check.
        self.writable = False
        self.claims: TokenClaims | None = None
        self.projects: set[int] = set()
        self.outbox: list[Outgoing] = []
        self.closing = False
        self.errors = 0  # consecutive malformed frames
        #: The rate limit's bucket of client frames (gateway.ratelimit): shared constants until
        #: the first frame after auth, which finds it full.
        self.rate_tokens = 0.0
        self.rate_strikes = 0.0
        self.rate_stamp = NEVER
        #: The slot of its token's expiry in ``ClientProtocol.expiry`` (gateway.expiry), or None.
        self.expiry: int | None = None
        self.last_buffered = 0
        self.stalled_since: float | None = None
        #: Set by every write, and kept set by :meth:`check_stall` while the kernel holds unsent
        #: bytes: only such connections are asked for their kernel queue once a second.
        self.sent_since_check = False
        #: Replay bytes still in the write buffer, tolerated on top of the limit, so that a
        #: resume with a large replay is not mistaken for a slow consumer (and cut, and resumed
        #: again, forever). Granted with the replay, counted once written, shrinks as it drains.
        self.allowance = 0
        self.allowance_granted = 0

    # --- transport-specific ------------------------------------------------------------------

    def is_open(self) -> bool:
        """True while frames may be written (not closing, the transport's protocol is open)."""
        raise NotImplementedError

    def _send_close(self, code: CloseCode, reason: str) -> None:
        """Queue this transport's goodbye (a close frame, a final SSE event) before an abort."""
        raise NotImplementedError

    def _close_gracefully(self, code: CloseCode, reason: str) -> None:
        """Start an orderly close (the outbox has been flushed)."""
        raise NotImplementedError

    def ping(self, now: float) -> bytes | None:
        """Keepalive: send a ping, returning what identifies its answer (None: none awaited)."""
        raise NotImplementedError

    def ping_unanswered(self, data: bytes) -> bool:
        """True when the ping ``data`` has not been answered yet."""
        return False

    def read_paused_for(self, now: float) -> float:
        """Seconds, up to ``now`` (the event loop's clock), during which the gateway held reading
        this connection paused by its own choice; the keepalive does not count them against a
        ping, whose answer may be waiting unread. Never decreases; 0.0 for a transport that
        never pauses (SSE)."""
        return 0.0

    # --- the write path ----------------------------------------------------------------------

    def send(self, item: Outgoing) -> None:
        """Queue a frame; it is written at the end of this event-loop iteration."""
        if self.closing:
            return
        if not self.outbox:
            self.schedule_flush(self)
        self.outbox.append(item)

    def send_replay(self, items: list[Outgoing], wire: bytes) -> None:
        """Queue a replay's frames at once (:meth:`send` for each, in one call), and tolerate
        their bytes on top of the outbound limit, so a large resume is not taken for a slow
        consumer. ``wire`` is their frames joined (:func:`joined`), which a transport that
        writes frames as they are may queue instead of the items."""
        if not items:
            return
        self.allowance_granted += len(wire)
        if self.closing:
            return
        if not self.outbox:
            self.schedule_flush(self)
        self.outbox.extend(items)

    def send_message(self, message: ServerMessage) -> None:
        self.send(Outgoing.message(message))

    def flush(self) -> bool:
        """Write this connection's own queued frames; False when it was cut as slow."""
        outbox = self.outbox
        if not outbox:
            return True
        self.outbox = []
        return self.write(joined(outbox), outbox)

    def write(self, wire: bytes, items: list[Outgoing]) -> bool:
        """Write ``items``, whose frames joined are ``wire``, now; False when cut as slow.

        The hub calls this with one feed's frames for every live subscriber, the same ``wire``
        for all of them, and :meth:`flush` with this connection's own frames. A transport whose
        bytes differ from WebSocket frames overrides this to build them, then calls it.
        """
        self.sent_since_check = True
        if self.writable:
            fd = self.fd
            if fd < 0:
                # uvloop: its write tries the socket at once and buffers what is left.
                transport = self.transport
                transport.write(wire)
                if transport.get_write_buffer_size():
                    self.writable = False  # what follows waits behind it, checked
            else:
                # The hot path: one flag, one system call. ``fd`` is still this connection's
                # while ``writable``: asyncio closes the socket only after connection_lost,
                # which clears it.
                try:
                    sent = os.write(fd, wire)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    sent = 0  # a dead peer: transport.write below meets the error and closes
                if sent < len(wire):
                    self.writable = False  # the rest waits in the transport, and what follows
                    self.transport.write(wire[sent:] if sent else wire)
        elif not self._write_checked(wire, items):
            return False
        if self.allowance_granted:
            self.allowance += self.allowance_granted
            self.allowance_granted = 0
        return True

    def _write_checked(self, wire: bytes, items: list[Outgoing]) -> bool:
        """:meth:`write` with every check made; False when cut as slow."""
        if not self.is_open():
            return True
        transport = self.transport
        if transport.get_write_buffer_size():
            if self.over_limit():
                self.cut_slow()
                return False
            transport.write(wire)
            return True
        self.writable = self.fast  # drained: the fast path again from now on
        if self.writable:
            return ClientSession.write(self, wire, items)
        transport.write(wire)
        return True

    def over_limit(self) -> bool:
        buffered = self.transport.get_write_buffer_size()
        if self.allowance:
            # The buffer is FIFO and the replay went in first: at most ``buffered`` of it is left.
            self.allowance = min(self.allowance, buffered)
        return self.policy.over_limit(buffered - self.allowance)

    def check_stall(self, now: float) -> bool:
        """Periodic check; cuts a connection whose buffer stopped draining. True if cut."""
        if self.closing:
            return False
        if self.writable and not self.sent_since_check:
            # Nothing buffered, nothing written since the last check, nothing left in the
            # kernel then: the common case (an idle or healthy connection), made cheap.
            self.stalled_since = None
            self.last_buffered = 0
            return False
        # What the client has not taken yet: our transport's buffer plus what the kernel has not
        # sent (a client that reads nothing fills its receive window, then the kernel's send
        # buffer, megabytes that the transport never sees, before anything reaches ours).
        unsent = unsent_in_kernel(self.kernel_fd)
        self.sent_since_check = unsent > 0
        buffered = (0 if self.writable else self.transport.get_write_buffer_size()) + unsent
        self.stalled_since = self.policy.stalled(
            buffered, self.last_buffered, self.stalled_since, now
        )
        self.last_buffered = buffered
        if self.policy.is_stalled(self.stalled_since, now) or self.over_limit():
            self.cut_slow()
            return True
        return False

    def cut_slow(self) -> None:
        self.abort(CloseCode.SLOW_CONSUMER, "slow consumer: resume from your cursor")

    def abort(self, code: CloseCode, reason: str) -> None:
        """Close without waiting for the peer: queue the goodbye, then abort the transport.

        An orderly close waits for the buffer to drain, which a stalled client never does. The
        goodbye reaches a client that is merely slow; a stalled one sees the TCP connection
        reset. Either way the buffer is freed now.
        """
        if self.closing:
            return
        self.closing = True
        self.writable = False
        self.outbox.clear()
        try:
            self._send_close(code, reason)
        except Exception:
            pass
        self.transport.abort()

    def close_later(self, code: CloseCode, reason: str) -> None:
        """Start a normal close from synchronous code."""
        if self.closing:
            return
        self.flush()  # what is queued (e.g. the error that explains the close) goes first
        self.closing = True
        self.writable = False
        self._close_gracefully(code, reason)


#: The name the hub and tests use for any session.
Session = ClientSession


def unsent_in_kernel(fd: int) -> int:
    """Bytes queued in the socket's kernel send buffer and not yet sent (0 if unknown)."""
    if fd < 0:
        return 0
    try:
        return _INT.unpack(fcntl.ioctl(fd, SIOCOUTQNSD, b"\0\0\0\0"))[0]
    except OSError:
        return 0  # not a TCP socket (a pipe in tests), or already closed


def unsent(transport: asyncio.WriteTransport) -> int:
    """Bytes written to ``transport`` that have not been sent to the peer yet: the transport's
    buffer plus the kernel's unsent bytes (:func:`unsent_in_kernel`)."""
    return transport.get_write_buffer_size() + unsent_in_kernel(_socket_fd(transport))


#: Linux's ``TCP_USER_TIMEOUT`` (None where the platform has no such option).
_TCP_USER_TIMEOUT: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)


def bound_unacknowledged(transport: asyncio.BaseTransport, seconds: float) -> bool:
    """Have the kernel end the connection once bytes written to it stay unacknowledged for
    ``seconds`` (or stay unsent for that long behind a receive window the peer keeps closed):
    Linux's ``TCP_USER_TIMEOUT``. True when set; False, silently, where the option does not
    exist (another platform, not a TCP socket, a test double).

    For a transport that awaits no answer from its peer (SSE): a peer that vanished without a
    FIN or RST (a partition, a crashed machine) acknowledges nothing, yet what was written to
    it counts as *sent*, so the stall check (:data:`SIOCOUTQNSD`) never sees it, and the kernel
    would otherwise retransmit for ~15 minutes (``tcp_retries2``) before giving up. The
    connection then fails with ``ETIMEDOUT`` and ``connection_lost`` follows as for any reset.
    """
    if _TCP_USER_TIMEOUT is None:
        return False
    try:
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, max(1, round(seconds * 1000)))
    except (AttributeError, OSError):
        return False
    return True


def _socket_fd(transport: asyncio.BaseTransport) -> int:
    """The descriptor of a transport's plain TCP socket, asyncio's or uvloop's, or -1 (TLS, a
    test double, ...)."""
    try:
        if transport.get_extra_info("sslcontext") is not None:
            return -1
        sock = transport.get_extra_info("socket")
        return sock.fileno() if sock is not None else -1
    except (AttributeError, OSError):
        return -1


def _direct_fd(transport: asyncio.BaseTransport) -> int:
    """:func:`_socket_fd` for asyncio's own transports only: their Python ``write`` is what
    direct writes save, and their buffering is what the rules of ``writable`` were shown
    against. uvloop's ``write`` is C already (``isinstance`` is False for its transports)."""
    return _socket_fd(transport) if isinstance(transport, asyncio.Transport) else -1


def release_transport(transport: asyncio.BaseTransport | None) -> None:
    """Break the reference cycle of a closed asyncio socket transport, from ``connection_lost``.

    On Python 3.11 asyncio's socket transport keeps a bound method of itself
    (``_read_ready_cb``) for its lifetime (CPython gh-100348, fixed in 3.12): every closed
    connection's transport, its socket and their dicts waited for a cyclic collection, and a
    reconnect storm of 10,000 clients left 30,000+ objects for the collector to walk and free.
    Reading has stopped by the time ``connection_lost`` runs (asyncio removed the reader first),
    so the callback is never called again. Nothing to do on uvloop or Python 3.12+.
    """
    if getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None  # type: ignore[union-attr]
