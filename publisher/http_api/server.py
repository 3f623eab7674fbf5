"""uvicorn serving the HTTP publish API: its configuration, and bounds on what a connection holds.

uvicorn bounds a request body only by what the application does (``--body-timeout``,
``--max-body``) and an idle keep-alive connection by ``timeout_keep_alive``, which every byte
received cancels. :class:`BoundedHttpProtocol` adds the bounds it lacks:

* **Time to send the headers.** Nothing bounded the wait for a request's headers: a client that
  connected and sent nothing, or its headers a byte every few seconds (slowloris), held its
  connection for ever, and every connection counts against ``--limit-concurrency``. A connection
  whose request headers are not complete within ``--header-timeout`` of its start or of the
  previous answer is closed.
* **Size of the headers.** httptools and uvicorn keep a request's line and headers until they end:
  one client sending headers as fast as it could (or one endless header, or an endless URL) made
  the process hold gigabytes within the header timeout. Past ``--max-header-bytes`` the request
  is answered 431 and the connection closed. A chunked body's chunk lines and trailers (which
  httptools parses as headers, and uvicorn keeps with the request's) are bounded the same way.
* **Time to read the answers.** uvicorn's answer waits for the client to read it (past 64 KiB
  unsent) without a bound: a client that pipelined requests and never read the answers held its
  connection and a task for ever, both counted against ``--limit-concurrency``; and below 64 KiB
  nothing waited, but closing the connection waits for the unsent bytes, for ever when the
  client reads nothing. A connection whose unsent answers (any: writing pauses at the first
  byte the kernel does not take) do not drain within ``--send-timeout`` is dropped.
* **Connections.** uvicorn accepts every connection and answers 503 to the requests past
  ``--limit-concurrency``: a flood of idle sockets used up the process' descriptors, every accept
  then failed (asyncio logs each at error level) and new Redis connections could not be opened.
  Connections past ``--limit-concurrency`` and :data:`ACCEPT_SLACK` are closed at once, and
  ``serve`` lowers ``--limit-concurrency`` to what the descriptor limit holds
  (:func:`fit_descriptors`).
* **Requests read ahead.** uvicorn parses every request a connection pipelines and queues it
  behind the one in progress, and resumes reading after each answer: a client that sent requests
  without reading the answers grew that queue by thousands per answer (1.4 GB in 10 s). At most
  :data:`MAX_PIPELINED` requests are parsed ahead; the rest stays unread, in the socket.

Requests past ``--limit-concurrency`` are answered the documented JSON 503 (``overloaded``) and
counted, where uvicorn answered plain text and logged a warning for each (the probes and
``/metrics`` are answered past it: :data:`UNBOUNDED_PATHS`); requests that are not
HTTP/1.1 are answered 400 (``invalid_http``) and counted, not logged (a request whose body breaks
off gets that answer at once, not the 408 of a body that never ends);
Upgrade requests (WebSocket, h2c) are answered as plain requests, then the connection is closed.
A client that ends its side once its requests are sent (a half-close) gets their answers, where
uvicorn closed the connection at once and they were lost. An answer that ends its connection
(``Connection: close``: a 503 ``overloaded``) while its request's body still arrives closes our
side and drops what still arrives for :data:`LINGER` seconds, as a refusal does: uvicorn closed
at once, and a client still sending the body got a reset rather than the answer.

Imported only to serve (uvicorn is the ``http-api`` extra).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httptools
import structlog
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from publisher.http_api.app import Counters, HttpApiSettings, PublishApi
from publisher.http_api.core import REFUSED_SCOPE_KEY, ApiError, error_body
from serverkit import raise_descriptor_limit, warn_lowered

__all__ = [
    "ACCEPT_SLACK",
    "MAX_PIPELINED",
    "UNBOUNDED_PATHS",
    "BoundedHttpProtocol",
    "fit_descriptors",
    "fitted_concurrency",
    "listen_backlog",
    "server_config",
]

log = structlog.get_logger("eventbus.http_api")

#: Requests of one connection parsed and queued behind the one in progress. HTTP/1.1 answers in
#: order, so parsing further ahead gains nothing but memory.
MAX_PIPELINED = 16
#: Bytes handed to the parser at a time, so that the bounds above are checked between pieces
#: (a read is up to 256 KiB: thousands of small requests).
FEED_SLICE = 4096
#: Seconds a refused connection's further input is still read and dropped after its answer, so
#: that the client reads the answer rather than a reset for the bytes left unread.
LINGER = 2.0

#: Connections accepted past ``--limit-concurrency`` (their requests answered 503 ``overloaded``)
#: before further ones are closed at accept.
ACCEPT_SLACK = 64
#: Descriptors the process needs besides its clients and their Redis connections: the listening
#: socket, epoll, log files, the interpreter's own.
DESCRIPTOR_RESERVE = 256
#: Pending connections the kernel queues for accept(), where the descriptor limit allows it
#: (:func:`listen_backlog`). asyncio accepts up to this many per iteration of its loop, and a
#: protocol sees its socket (and closes it when past the bound) two iterations later, its
#: descriptor freed one more later: ACCEPT_BATCHES of them are in flight in a flood, and the
#: descriptor fit leaves room for them (uvicorn's 2,048 would take 8,192). Not much less: a
#: burst of connects meeting a full queue waits for the SYN retransmission (1 s), and on a busy
#: machine the loop may not accept for a few milliseconds.
LISTEN_BACKLOG = 1024
ACCEPT_BATCHES = 4
#: The smallest backlog :func:`listen_backlog` fits to a low descriptor limit.
MIN_LISTEN_BACKLOG = 32

#: Paths answered past ``--limit-concurrency`` (see :meth:`BoundedHttpProtocol._start_request`).
UNBOUNDED_PATHS = frozenset((b"/healthz", b"/readyz", b"/metrics"))

_NOTHING = memoryview(b"")
#: The HTTP versions served (1.0 is read like 1.1).
_VERSIONS = ("1.1", "1.0")


class _NotHttp11(Exception):
    """A request of another HTTP version than :data:`_VERSIONS`."""


class _HeldFlowControl(FlowControl):
    """uvicorn's flow control, except that reading stays paused while ``holding()``: uvicorn
    resumes reading after every answer and whenever the application asks for body bytes."""

    def __init__(self, transport: asyncio.Transport, holding: Callable[[], bool]) -> None:
        super().__init__(transport)
        self._holding = holding

    def resume_reading(self) -> None:
        if not self._holding():
            super().resume_reading()


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of this module. A request whose headers
    arrived is bounded by the application from then on (``--body-timeout``, ``--max-body``, the
    publisher's ``timeout``)."""

    header_timeout: float = HttpApiSettings().header_timeout
    send_timeout: float = HttpApiSettings().send_timeout
    max_header_bytes: int = HttpApiSettings().max_header_bytes
    counters: Counters | None = None
    #: Connections open at once; past it a new one is closed at accept (None: no bound).
    max_connections: int | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn's own check answers plain text and logs a warning per request: ours instead.
        self._limit, self.limit_concurrency = self.limit_concurrency, None
        self.flow = _HeldFlowControl(transport, self._holding)
        # Writing pauses (and --send-timeout starts) at the first byte the kernel does not take,
        # not at asyncio's 64 KiB: under it nothing bounded unsent answers, and closing the
        # connection (--header-timeout, keep-alive, ``Connection: close``) waits for them to go
        # out: a client that stopped reading a few answers short held its place for ever.
        transport.set_write_buffer_limits(high=0)
        self._unread = _NOTHING  # received, not parsed yet: MAX_PIPELINED requests are queued
        self._unanswered = 0  # requests whose headers arrived and whose answer is not complete
        self._in_head = True  # the next bytes parsed are a request's line or headers
        self._head_bytes = 0  # of the request line and headers being parsed (about: per slice)
        self._boundaries = 0  # request heads and messages completed, to see one in a slice
        self._in_message = False  # between a request's headers and its message's end
        self._refusal: bytes | None = None  # an answer to write once the earlier ones are out
        self._dropping = False  # refused or upgraded: further bytes are not requests
        self._header_deadline: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        self._eof = False  # the client ended its side: close once its requests are answered
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self._count_closed("full")
            transport.abort()  # before its descriptor is needed for Redis, or for accept()
            return
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        for timer in (self._linger, self._send_deadline):
            if timer is not None:
                timer.cancel()
        self._unread = _NOTHING
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:
        """The client ended its side (``shutdown(SHUT_WR)``) once its requests were sent: they
        are still answered, then the connection is closed. uvicorn closed it at once, so every
        answer not yet written was lost (a publish's too: written, counted, never told). A
        body still being read can never end: the connection is closed, as before."""
        cycle = self.cycle
        body_cut = cycle is not None and cycle.more_body and not cycle.response_complete
        if body_cut and self._drop_queued_cut():
            body_cut = False  # (the requests before it are still answered)
        if body_cut or not self._pending():
            return None  # (asyncio closes the transport)
        self._eof = True
        return True  # keep the transport open for the answers

    def _drop_queued_cut(self) -> bool:
        """Whether the request whose body broke off (the last parsed, ``self.cycle``) was
        queued behind another one, and is now dropped: it never starts. Started after the
        answers before it, it waited --body-timeout for a body that can never end, and was
        answered 408 before the refusal (two answers to one request, the first ten seconds
        late); and a half-close cutting it closed the connection at once, losing the answers
        to the complete requests before it."""
        cycle = self.cycle
        if not self.pipeline or self.pipeline[0][0] is not cycle:
            return False
        self.pipeline.popleft()  # (uvicorn queues at the left, starts from the right)
        self._unanswered -= 1
        return True

    def _pending(self) -> bool:
        """Whether requests wait for their answers, or bytes to be parsed."""
        return self._unanswered > 0 or bool(self._unread) or self._refusal is not None

    def _holding(self) -> bool:
        return bool(self._unread) or self._refusal is not None

    # --- reading ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._dropping:
            return
        self._unread = memoryview(bytes(self._unread) + data) if self._unread else memoryview(data)
        self._feed()

    def _feed(self) -> None:
        """Parse held bytes a slice at a time while fewer than MAX_PIPELINED requests wait."""
        if self._unread:
            self._unset_keepalive_if_required()
        while self._unread and len(self.pipeline) < MAX_PIPELINED:
            if self._dropping or self.transport.is_closing():
                self._unread = _NOTHING
                return
            piece, self._unread = self._unread[:FEED_SLICE], self._unread[FEED_SLICE:]
            in_head, boundaries = self._in_head, self._boundaries
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                self._upgraded()
                return
            except httptools.HttpParserError:
                self._refuse(400, "invalid_http", "the request is not valid HTTP/1.1")
                return
            if self._in_head:
                # A slice in which a request's head began after another ended is not counted:
                # the bound is exact to within one slice, in the client's favour.
                same = in_head and boundaries == self._boundaries
                self._head_bytes = self._head_bytes + len(piece) if same else 0
                if self._head_bytes > self.max_header_bytes:
                    self._refuse(
                        431,
                        "headers_too_large",
                        f"the request line and headers (or a chunked body's chunk lines and "
                        f"trailers) exceed {self.max_header_bytes} bytes",
                    )
                    return
        if self._unread:
            self.flow.pause_reading()

    def on_headers_complete(self) -> None:
        if self.parser.get_http_version() not in _VERSIONS:
            # llhttp passes any ``HTTP/d.d`` and a request line without one (HTTP/0.9), and
            # uvicorn answered each as HTTP/1.1: an HTTP/2 or HTTP/0.9 client read an answer
            # it cannot parse. Raised here, it is the parser's error: the 400 ``invalid_http``.
            raise _NotHttp11
        self._unanswered += 1
        self._in_head = False
        self._boundaries += 1
        self._cancel_deadline()
        try:
            self._start_request()
        except BaseException:
            # uvicorn raised before the request started (its URL split refuses a CONNECT's
            # ``host:port``, which httptools passes): no answer of it will ever complete, so it
            # must not count as one the 400 that follows waits for (it waited for ever, and the
            # connection stayed open, its header deadline cancelled).
            self._unanswered -= 1
            raise
        self._in_message = True  # (a request that never started is in no message)

    def _start_request(self) -> None:
        limit = self._limit
        # (This connection is one of ``connections``: at most ``limit`` of them are served, as
        # documented. uvicorn's own ``<`` served limit - 1, and none at a limit of 1.)
        if limit is None or (len(self.connections) <= limit and len(self.tasks) < limit):
            super().on_headers_complete()
            self._close_gently(self.cycle)
            return
        if self.url.partition(b"?")[0] in UNBOUNDED_PATHS:
            # The probes and /metrics past the limit too: they hold no Redis connection
            # (/readyz's PING is shared, bounded by --ready-timeout) and end at once, and the
            # connections asking are bounded at accept. Refused, a liveness probe failed while
            # a hung Redis held every request in progress for 10 s, and the process was
            # restarted for waiting (its requests in progress lost).
            super().on_headers_complete()
            return
        app, self.app = self.app, _overloaded  # for this request only
        try:
            super().on_headers_complete()
        finally:
            self.app = app
        self._close_gently(self.cycle)
        if self.counters is not None:  # (a request uvicorn refused is the 400's, not a 503)
            self.counters.count(503, "overloaded")

    def _close_gently(self, cycle: Any) -> None:
        """Give the request's cycle a transport whose close, while its body is still arriving,
        is :meth:`_close_after_answer`'s: uvicorn closed the connection at once after an answer
        with ``Connection: close`` (a 503 ``overloaded``, from a body's headers past
        --max-body-memory), and the kernel answered the body's next bytes with a reset, which a
        client still sending it (Python's http.client) got instead of the answer."""
        if cycle is not None and cycle.transport is self.transport:
            cycle.transport = _GentleClose(self.transport, cycle, self._close_after_answer)

    def _close_after_answer(self) -> None:
        """End the connection after an answer written while its request's body still arrives:
        the requests queued behind it are not answered (the answer said ``Connection:
        close``), and what still arrives is read and dropped for LINGER seconds, as after a
        refusal."""
        self._dropping = True
        self._unread = _NOTHING
        self._unanswered -= len(self.pipeline)
        self.pipeline.clear()
        self._cancel_deadline()
        self._half_close()

    # A chunked body's chunk lines and trailer fields are a head of their own: the bytes from a
    # chunk's header to its data, and from its end to the next chunk's header, count against
    # --max-header-bytes as a request's head does. httptools parses trailers as headers, which
    # uvicorn keeps with the request's: uncounted, a client sending trailers after the last
    # chunk made the process hold hundreds of megabytes a second until --body-timeout.

    def on_chunk_header(self) -> None:
        self._enter_head(True)

    def on_body(self, body: bytes) -> None:
        self._enter_head(False)
        super().on_body(body)

    def on_chunk_complete(self) -> None:
        self._enter_head(True)

    def _enter_head(self, in_head: bool) -> None:
        if self._in_head != in_head:
            self._in_head = in_head
            self._boundaries += 1

    def on_message_complete(self) -> None:
        self._in_message = False
        self._in_head = True
        self._head_bytes = 0
        self._boundaries += 1
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._unanswered -= 1
        super().on_response_complete()  # starts the next queued request
        if self.transport.is_closing() or self._linger is not None:
            return  # (closing: no further request is read, nor awaited)
        if self._unanswered == 0 and self._refusal is not None:
            self._write_refusal()
            return
        if self._unread:
            self._feed()
            if not self._holding():
                self.flow.resume_reading()  # what uvicorn did while bytes were held
        if self._eof and not self._pending():  # the client sends nothing more
            self.transport.close()
            return
        if self._unanswered == 0:  # (a pipelined request's headers are already in)
            self._await_headers()

    # --- ending -----------------------------------------------------------------------------

    def _upgraded(self) -> None:
        """An Upgrade request (WebSocket, h2c): none is served, so it is answered as a plain
        request; the bytes after it are another protocol's, so the connection ends after it."""
        self._dropping = True
        self._unread = _NOTHING
        if self.cycle is not None:
            self.cycle.keep_alive = False
            if self.cycle.response_complete:  # (answered before the parser stopped)
                self.transport.close()

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` (after the answers to the requests before it) and end the
        connection: what follows in it cannot be parsed."""
        self._dropping = True
        self._unread = _NOTHING
        self._cancel_deadline()
        cycle = self.cycle
        if self._in_message and cycle is not None and cycle.response_started:
            # Its body broke off after its answer began (a 401, a 413: the rest of a body is
            # read and dropped): that answer is its one, and the connection ends after it. The
            # refusal followed it, a second answer to one request, which a client that
            # pipelined its next request reads as that one's.
            cycle.keep_alive = False
            if cycle.response_complete:
                self._half_close()
            return
        if self.counters is not None:
            self.counters.count(status, code)
        cut = cycle is not None and cycle.more_body and not cycle.response_started
        if cut and self._drop_queued_cut():
            pass  # the refusal is its answer, after the answers before it
        elif cut and self._unanswered == 1 and not self.pipeline:
            # The request in progress is the one whose body broke off: that body never ends,
            # so the refusal is its answer, now. It waited for --body-timeout (a 408 telling a
            # client its malformed body was slow, ten seconds later, and then this answer).
            # Its application sees the client gone (its answer, if any, goes nowhere); it has
            # written nothing: a publish or a revocation waits for the whole body.
            cycle.disconnected = True
            cycle.scope[REFUSED_SCOPE_KEY] = True  # (counted here, not by the application)
            # (its body read would write the 100 Continue it owes after the refusal's end)
            cycle.waiting_for_100_continue = False
            cycle.message_event.set()
            self._unanswered = 0
        body = error_body(ApiError(status, code, message))
        self._refusal = b"".join(
            [
                STATUS_LINE[status],
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        if self._unanswered == 0:
            self._write_refusal()
        else:
            self.flow.pause_reading()

    def _write_refusal(self) -> None:
        refusal, self._refusal = self._refusal, None
        self.transport.write(refusal)  # type: ignore[arg-type]
        self._half_close()

    def _half_close(self) -> None:
        if self._linger is not None or self.transport.is_closing():
            return  # (closing already)
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        # Half-close, then drop what still arrives for LINGER seconds: closing with unread
        # bytes makes the kernel answer a reset, which may destroy the answer in flight.
        self.transport.write_eof()
        self.flow.resume_reading()
        self._linger = self.loop.call_later(LINGER, self.transport.close)

    # --- the send deadline ------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_deadline is None:
            self._send_deadline = self.loop.call_later(self.send_timeout, self._send_late)

    def resume_writing(self) -> None:
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None
        super().resume_writing()

    def _send_late(self) -> None:
        self._send_deadline = None
        if not self.transport.is_closing():
            self._count_closed("send_timeout")
        # abort, not close: close would wait for the unsent bytes, which are the problem. The
        # answer waiting for the drain then sees the connection lost and ends.
        self.transport.abort()

    # --- the header deadline ----------------------------------------------------------------

    def _await_headers(self) -> None:
        self._cancel_deadline()
        if not self.transport.is_closing():
            self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def _cancel_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self._unanswered == 0 and not self.transport.is_closing():
            self._count_closed("header_timeout")
            self.transport.close()

    def _count_closed(self, reason: str) -> None:
        if self.counters is not None:
            self.counters.closed[reason] += 1


class _GentleClose:
    """A request's view of its connection's transport (uvicorn's cycle writes its answer
    through it): closed while the request's body still arrives, it calls ``gently`` (the
    protocol's :meth:`BoundedHttpProtocol._close_after_answer`) instead."""

    def __init__(self, transport: asyncio.Transport, cycle: Any, gently: Callable[[], None]):
        self._transport = transport
        self._cycle = cycle
        self._gently = gently

    def close(self) -> None:
        if self._cycle.more_body and not self._transport.is_closing():
            self._gently()
        else:
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


_OVERLOADED = error_body(
    ApiError(503, "overloaded", "too many connections or requests at once: retry")
)


async def _overloaded(scope: dict, receive: Any, send: Any) -> None:
    """The answer past ``--limit-concurrency``; the connection is closed after it, to free its
    place (as uvicorn's own answer does)."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(_OVERLOADED)),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": _OVERLOADED})


def listen_backlog(descriptor_limit: int) -> int:
    """The listen backlog for ``descriptor_limit`` (pure): :data:`LISTEN_BACKLOG`, or less when
    the sockets it lets asyncio accept at once (:data:`ACCEPT_BATCHES` backlogs) would take more
    than a quarter of the descriptors left besides ACCEPT_SLACK and the reserve. A fixed 1,024
    set 4,096 descriptors aside: under a hard limit of 4,096 (a common default) nothing was
    left for requests."""
    room = descriptor_limit - ACCEPT_SLACK - DESCRIPTOR_RESERVE
    return max(MIN_LISTEN_BACKLOG, min(LISTEN_BACKLOG, room // (4 * ACCEPT_BATCHES)))


def fitted_concurrency(limit_concurrency: int, descriptor_limit: int) -> int:
    """The largest ``--limit-concurrency`` (at least 1, at most the one asked) whose descriptors
    fit ``descriptor_limit``: each request in progress holds its socket and may hold a Redis
    connection (all of them at once while Redis hangs), plus ACCEPT_SLACK sockets, the sockets
    asyncio accepts before they are closed (with :func:`listen_backlog`), and the reserve
    (pure)."""
    in_flight = ACCEPT_BATCHES * listen_backlog(descriptor_limit)
    room = (descriptor_limit - ACCEPT_SLACK - in_flight - DESCRIPTOR_RESERVE) // 2
    return max(1, min(limit_concurrency, room))


def fit_descriptors(limit_concurrency: int) -> tuple[int, int]:
    """Raise the soft descriptor limit to the hard one, and return ``limit_concurrency``
    lowered (with a warning) to what the limit holds, and the listen backlog that goes with it
    (:func:`listen_backlog`): past the limit every accept fails and no Redis connection can be
    opened, so the bound on connections must refuse them first."""
    limit = raise_descriptor_limit()
    fitted = fitted_concurrency(limit_concurrency, limit)
    if fitted < limit_concurrency:
        warn_lowered(log, "limit_concurrency", limit_concurrency, fitted, limit)
    return fitted, listen_backlog(limit)


def server_config(
    app: PublishApi, *, host: str = "127.0.0.1", port: int = 8766, **options: Any
) -> uvicorn.Config:
    """The uvicorn configuration serving ``app``: httptools with the bounds of
    ``app.settings`` (:class:`BoundedHttpProtocol`), no WebSocket; ``options`` are further
    ``uvicorn.Config`` arguments (``limit_concurrency``, which also bounds the connections
    accepted, ``backlog``, ``log_level``, ...)."""
    limit = options.get("limit_concurrency")
    protocol = type(
        "BoundedHttpProtocol",
        (BoundedHttpProtocol,),
        {
            "header_timeout": app.settings.header_timeout,
            "send_timeout": app.settings.send_timeout,
            "max_header_bytes": app.settings.max_header_bytes,
            "counters": app.counters,
            "max_connections": None if limit is None else limit + ACCEPT_SLACK,
        },
    )
    settings: dict[str, Any] = {
        "loop": "asyncio",
        "lifespan": "on",
        "access_log": False,
        "log_level": "warning",
        # uvicorn's own lines go through the root logger, as JSON like the API's own
        # (serverkit.logs), not through the plain-text handlers of uvicorn's default log_config.
        "log_config": None,
        "ws": "none",  # the API has no WebSocket endpoint (one answered 500, logged as an error)
        "backlog": LISTEN_BACKLOG,
        **options,
    }
    return uvicorn.Config(app, host=host, port=port, http=protocol, **settings)
