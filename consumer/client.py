"""``Consumer``: an asyncio client of the gateway's WebSocket protocol (``docs/protocol.md``) with
the guarantees of ``eventbus.js``, for Python services::

    store = FileCursorStore("cursors.json")
    async with Consumer("ws://gateway:8765/", token=mint_token, store=store) as c:
        async for item in c.events(1):
            match item:
                case Delivery(event=BlockerResolved() as event):
                    ...
                case Resync():
                    ...  # reload state; deliveries continue after item.cursor

One background task owns the connection: it connects (round robin over the URLs), authenticates
with the token in the first frame, subscribes every followed project from its cursor, routes each
frame through the project's :class:`~consumer.ordering.ProjectState`, refreshes the token in-band
before it expires, and reconnects forever with full-jitter exponential backoff. Each
:meth:`Consumer.events` call returns a :class:`Subscription`: an async iterator over a queue of
typed items bounded by count and by bytes (:mod:`consumer.buffer`). When the caller reads slower
than events arrive the queue fills and the connection stops reading (TCP backpressure; the gateway
may then cut it as a slow consumer, after which it resumes from its cursor, losing nothing).
:meth:`Consumer.presence` returns a :class:`PresenceSubscription`: the project's members pushed
as coalesced views (:mod:`consumer.presence`), on the same connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import random as _random
import time
import traceback
import urllib.error
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

import msgspec
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.proxy import get_proxy
from websockets.uri import parse_uri

from consumer.answers import PendingAnswers, ReadingClock
from consumer.buffer import BoundedQueue
from consumer.frames import (
    EVENT_TAGS,
    EVENT_TYPES,
    PRESENCE_TYPES,
    FrameError,
    decode_frame,
    event_header,
    event_seq,
)
from consumer.lookups import is_ip_address, open_socket
from consumer.ordering import ProjectState, Verdict
from consumer.pages import PageUnavailable, read_page
from consumer.policy import (
    ABNORMAL_CLOSURE,
    Backoff,
    FramePacer,
    ReconnectPolicy,
    Retry,
    close_action,
    decode_token_claims,
    refresh_delay,
)
from consumer.presence import PresenceTable, PresenceView, PresenceWatch
from consumer.stores import CursorStore
from consumer.types import (
    AuthenticationFailed,
    ConsumerClosed,
    ConsumerError,
    Cursor,
    Delivery,
    Forbidden,
    GatewayError,
    Item,
    Resync,
    UndecodableEvent,
    checked_cursor,
)
from schemas.events import ProjectEvent
from schemas.protocol import (
    MAX_SEQ,
    Authenticated,
    Error,
    ErrorCode,
    Member,
    PollResponse,
    Presence,
    ResyncReason,
    ResyncRequired,
    Subscribed,
    Unsubscribed,
)
from schemas.tags import is_tag, tags_differ
from schemas.tokens import MAX_EXP

__all__ = [
    "Consumer",
    "ConsumerStats",
    "PresenceSubscription",
    "Start",
    "Subscription",
    "TokenSource",
]

log = structlog.get_logger("eventbus.consumer")

#: A fixed token, or a function (plain or async) returning a fresh one each time it is called.
TokenSource = str | Callable[[], str | Awaitable[str]]
#: Where a project without a cursor starts: "now" (live), "beginning" (seq 1 of the current epoch;
#: a Resync(history_trimmed) when retention dropped it), or a seq of the current epoch to start
#: after.
Start = Literal["now", "beginning"] | int

_encode = msgspec.json.encode
_CLOSED = object()  # queue sentinel: wake a waiting iterator
#: The size counted in a subscription's ``buffer_bytes`` for an item without a frame (a Resync,
#: a refusal, the close sentinel): about what such an object takes in memory.
CONTROL_ITEM_BYTES = 256
_poll_decoder = msgspec.json.Decoder(PollResponse)


def _page_frame(raw: msgspec.Raw) -> bytes:
    """An event of a catch-up page, checked for UTF-8. A page's events are embedded without
    being parsed (``msgspec.Raw``), and the fields of an event that no event type has are
    skipped unchecked: a page from a broken gateway (or a proxy) with bytes that are not UTF-8
    there delivered events whose ``raw`` did not decode. JSON is UTF-8: such a page raises
    (UnicodeDecodeError, a ValueError), a page that cannot be read. (Each event, not the whole
    body at once: up to 64 MiB of text, 4 bytes a character with one wide one among them.)"""
    frame = bytes(raw)
    frame.decode()
    return frame


#: Events per page when catching up (the polling endpoint's maximum).
POLL_PAGE = 1000

#: How many connections' close codes :attr:`Consumer.close_codes` keeps.
CLOSE_CODES_KEPT = 1000
#: Unexpected send failures in a row (see Consumer._send) are logged at error the first and
#: every this many times; the others at debug.
SEND_FAILURES_LOGGED_EVERY = 50


#: Seconds websockets waits for the gateway's answer to the consumer's close frame; and, from
#: :func:`_close`, the longest a close takes in all before the connection is dropped.
CLOSE_TIMEOUT = 2.0

#: Bytes of the consumer's own frames waiting to go out beyond which the gateway is not reading
#: the connection (the frames the consumer sends are small: a subscribe per project, a token).
MAX_UNSENT = 2**22


#: Projects read for presence only beyond which every frame's header is read, rather than each
#: frame's beginning compared with theirs (:meth:`Consumer._unread_prefixes`).
UNREAD_SEARCHES = 8

#: Bytes of a read handed to websockets at a time (see :meth:`_Connection.data_received`): with
#: permessage-deflate a slice inflates to about one frame at most (deflate's ratio tops out near
#: 1,000:1); without it, a slice holds at most this many bytes of frames, and a larger one costs
#: fewer calls into websockets per read (a backlog's replay comes in reads of up to 256 KiB).
READ_SLICE = 65536
INFLATE_SLICE = 4096


class _Connection(ClientConnection):
    """websockets' connection, dropped (aborted: 1006, then a reconnect with backoff) when the
    gateway does not read it while the consumer has frames for it.

    websockets answers every ping by itself, whatever the consumer does: a gateway sending
    pings and reading nothing piled the answers up in the write buffer without bound; and every
    send waits for that buffer to drain, the keepalive's ping and the close frame included, so
    no timeout ended the connection, nor did ``aclose()`` return. So more than
    :data:`MAX_UNSENT` bytes waiting, or writing paused (the buffer above websockets'
    ``write_limit``) for ``ping_timeout`` (:attr:`write_timeout` with keepalive off), gives the
    connection up: such a gateway would have answered no ping either.
    """

    _unread: asyncio.TimerHandle | None = None
    _given_up = False
    #: How long writing may stay held up when keepalive is off (``ping_timeout`` None): the
    #: consumer's ``open_timeout``, set once connected. Without it, a gateway reading nothing
    #: held every send for ever, the unsubscribe of ``aclose()`` included.
    write_timeout: float | None = None
    #: The frames of a binary message are being dropped (its continuations follow).
    _binary = False
    #: Called for each binary message dropped (the consumer counts and logs it).
    on_binary: Callable[[], None] | None = None
    #: Bytes read from the socket and not handed to websockets yet: reading is paused.
    _held = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.recv_messages.resume = self._resume_reading

    def data_received(self, data: bytes) -> None:
        """Hand ``data`` to websockets :data:`READ_SLICE` bytes at a time (:data:`INFLATE_SLICE`
        with permessage-deflate), and keep the rest while its queue of frames is paused (over its
        high-water mark, ``max_queue``).

        websockets parses every frame of a read at once, and pauses reading only after: one
        read (up to 256 KiB) holds dozens of frames that inflate to ``max_size`` (4 MiB) each
        with compression, or a hundred thousand empty ones, all queued past the mark. A gateway
        sending them while a subscription was full made the consumer hold a quarter of a GB
        besides its ``buffer_bytes``. A compressed slice inflates to about one frame at most;
        an uncompressed one holds at most 64 KiB of frames."""
        if self._held:  # (reading is paused: no more should come; kept in order if it does)
            self._held += data
            return
        size = INFLATE_SLICE if self.protocol.extensions else READ_SLICE
        view = memoryview(data)
        while view:
            piece, view = view[:size], view[size:]
            super().data_received(bytes(piece))  # (answers the pings among it)
            if self.transport.get_write_buffer_size() > MAX_UNSENT:
                self._give_up()
                return
            if view and self.recv_messages.paused:
                self._held = bytes(view)
                return

    def process_event(self, event: object) -> None:
        """Drop binary messages, frame by frame: the gateway sends text frames only, and
        websockets checks only those for UTF-8 (a text frame that is not closes with 1007).
        Taken as text (``recv(decode=False)`` returns either as bytes), a binary frame made a
        :class:`~consumer.Delivery` whose ``raw`` was not UTF-8 (the unknown fields of an event
        are skipped unchecked): ``raw.decode()`` raised in the application, for that event again
        after every restart. Dropped, it is a frame the gateway never sends (``stats.ignored``),
        and an event it held leaves a gap, repaired like any other."""
        if isinstance(event, Frame) and (
            event.opcode is Opcode.BINARY or (self._binary and event.opcode is Opcode.CONT)
        ):
            self._binary = not event.fin
            if event.opcode is Opcode.BINARY and self.on_binary is not None:
                self.on_binary()
            return
        super().process_event(event)  # type: ignore[arg-type]

    def eof_received(self) -> bool | None:
        if self._held:  # what came before the end goes first (the queue's bound aside)
            held, self._held = self._held, b""
            super().data_received(held)
        return super().eof_received()

    def _resume_reading(self) -> None:
        """websockets' queue went under its low-water mark: the held bytes first (on the loop's
        next turn, not inside the ``recv`` that made room), then the socket."""
        if self._held:
            self.loop.call_soon(self._feed_held)
        else:
            self.transport.resume_reading()

    def _feed_held(self) -> None:
        if self.transport.is_closing() or self.recv_messages.paused:
            return  # (gone; or paused again meanwhile: its resume feeds them)
        held, self._held = self._held, b""
        self.data_received(held)
        if not self._held and not self.recv_messages.paused:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        super().pause_writing()
        limit = self.ping_timeout if self.ping_timeout is not None else self.write_timeout
        if limit is not None:
            self._unread = self.loop.call_later(limit, self._give_up)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stop_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _stop_timer(self) -> None:
        if self._unread is not None:
            self._unread.cancel()
            self._unread = None

    def _give_up(self) -> None:
        self._stop_timer()
        if not self._given_up:
            self._given_up = True
            log.warning(
                "the gateway does not read the connection; dropping it",
                unsent=self.transport.get_write_buffer_size(),
            )
            self.transport.abort()


class _connect(connect):
    """websockets' ``connect`` without following redirects: the gateway never answers a
    handshake with one (nor do browsers follow one for eventbus.js), and the token, sent in the
    first frame, would go to whatever host the ``Location`` names. A redirect is a refused
    handshake (:class:`InvalidStatus`).

    And without the event loop's default executor: websockets connects with
    ``loop.create_connection``, which looks the host name up there (``loop.getaddrinfo``).
    ``open_timeout`` ended the wait, not the lookup: on a resolver that does not answer, each
    attempt's lookup held an executor thread until the resolver gave up, ``asyncio.run`` did not
    return meanwhile (it waits for those threads), and once reconnects had them all, the
    program's own ``asyncio.to_thread`` waited too. The name is looked up in a daemon thread
    (:func:`consumer.lookups.open_socket`, one lookup of a name at a time, under ``open_timeout``
    still), its addresses tried in order, and websockets is given the connected socket: TLS
    still sends and checks the URL's host name, and the Host header is the URL's. An IP address
    needs no lookup, and a connection through a proxy (websockets' ``proxy``, from the
    environment by default) is websockets' own, its lookups included."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc

    async def open_tcp_connection(self) -> ClientConnection:
        host, kwargs = self.ws_uri.host, self.create_connection_kwargs
        proxy = get_proxy(self.ws_uri) if self.proxy is True else self.proxy
        if is_ip_address(host) or proxy is not None or "sock" in kwargs:
            return await super().open_tcp_connection()
        sock = await open_socket(host, self.ws_uri.port)
        self.create_connection_kwargs = {**kwargs, "sock": sock}
        try:
            return await super().open_tcp_connection()
        except BaseException:
            sock.close()  # (asyncio closed it already when the TLS handshake failed)
            raise
        finally:
            self.create_connection_kwargs = kwargs


def _refused_frame(ws: ClientConnection) -> Close | None:
    """The close frame the consumer sent first for a protocol violation *of the gateway's* (a
    frame over ``max_size``: 1009, a text frame that is not UTF-8: 1007, a broken frame: 1002),
    or None (the gateway closed first, or the consumer closed for another reason)."""
    protocol = ws.protocol
    sent = protocol.close_sent
    if sent is None or protocol.close_rcvd_then_sent or not close_action(sent.code).client_bug:
        return None
    return sent


async def _close(ws: ClientConnection) -> None:
    """Close ``ws`` within :data:`CLOSE_TIMEOUT`, else drop it (abort: 1006).

    websockets' close first waits for the write buffer to drain, and only then for the
    gateway's answer within its ``close_timeout``: with keepalive off (``ping_timeout=None``:
    no :class:`_Connection` give-up either), a gateway that read nothing (its pings' answers
    waiting unsent) held the close, ``aclose()`` and the connection for ever."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await ws.close()
    except TimeoutError:
        ws.transport.abort()


async def _none() -> None:
    return None


#: How the error log names a frame whose send failed (``cannot send a subscribe; reconnecting``).
_SENT_FRAMES = {"auth": "the token", "subscribe": "a subscribe", "unsubscribe": "an unsubscribe"}


def _http_url(ws_url: str) -> str:
    """The origin of the gateway's HTTP endpoints for a WebSocket URL (same host and port)."""
    parts = urlsplit(ws_url)
    return urlunsplit(("https" if parts.scheme == "wss" else "http", parts.netloc, "", "", ""))


def _given_tag(tag: object, seq: int) -> str | None:
    """A tag the gateway gave for the event at ``seq``, when it is one: anything else (a
    broken gateway's, or one for seq 0, where there is no event) is taken as not said, never
    sent back in a subscribe, which the gateway would refuse as ``invalid_cursor`` (an error
    naming no project: the project silent)."""
    return tag if seq > 0 and is_tag(tag) else None  # type: ignore[return-value]


def _check_start(start: object) -> None:
    """ValueError unless ``start`` is a :data:`Start`: a seq the gateway would refuse as a
    cursor's (a bool, over 2**53-1) made a subscribe refused with an error naming no project (the
    project silent), and one that is no int at all stopped the consumer (ConsumerClosed)."""
    if start in ("now", "beginning"):
        return
    if type(start) is not int or not 0 <= start <= MAX_SEQ:
        raise ValueError(
            f"start must be 'now', 'beginning' or a sequence number 0 to {MAX_SEQ}, got {start!r}"
        )


@dataclass(slots=True)
class ConsumerStats:
    """What a consumer went through, for metrics and tests (counters since it started)."""

    delivered: int = 0  # Delivery items queued for the caller
    duplicates: int = 0  # events dropped as already received (replay overlap)
    gaps: int = 0  # resubscribes after a missing event was noticed client-side
    resyncs: int = 0  # Resync items surfaced
    catch_ups: int = 0  # resumes read page by page instead of a Resync(too_far_behind)
    page_retries: int = 0  # catch-up pages answered 503 (draining, full, Redis away), asked again
    unavailable: int = 0  # subscribes the gateway answered 'unavailable' (Redis down), retried
    rate_limited: int = 0  # frames the gateway refused with 'rate_limited' (too many), resent
    ignored: int = 0  # frames the gateway never sends (see Consumer._ignored), dropped
    presence_malformed: int = 0  # presence messages refused as malformed (also in `ignored`)


def _item_bytes(item: object) -> int:
    """An item's size in its subscription's ``buffer_bytes``: its frame's length (a Delivery,
    an UndecodableEvent), or :data:`CONTROL_ITEM_BYTES`."""
    if type(item) is Delivery:
        return len(item.raw)
    raw = getattr(item, "raw", None)  # (an UndecodableEvent's)
    return len(raw) if type(raw) is bytes else CONTROL_ITEM_BYTES


def _check_url(url: object) -> None:
    """ValueError unless ``url`` is a ``ws://`` or ``wss://`` URL whose host can be looked up:
    taken, such a URL stopped the consumer at its first attempt (websockets' InvalidURI, or the
    lookup's UnicodeError for an empty or over-long label), even with good URLs beside it."""
    try:
        host = parse_uri(url).host  # type: ignore[arg-type]
        if not is_ip_address(host):
            host.encode("idna")  # what socket.getaddrinfo does to it (labels of 1-63)
    except (InvalidURI, UnicodeError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a gateway URL (ws:// or wss://): {url!r}: {exc}") from None


def check_arguments(
    url: str | Sequence[str], *, start: Start = "now", token: TokenSource | None = None
) -> None:
    """Raise the ValueError :class:`Consumer` raises for these gateway URL(s), ``start`` and
    ``token``, without making one: a command line checks its arguments before it starts an
    event loop."""
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise ValueError("at least one gateway URL is required")
    for each in urls:
        _check_url(each)
    _check_start(start)
    if isinstance(token, str) and not _sendable_token(token):
        raise ValueError("the token is not UTF-8 (lone surrogates): it cannot be sent")


def _sendable_token(token: str) -> bool:
    """Whether ``token`` can go in an auth frame: a text frame is UTF-8, and a str read with
    ``errors="surrogateescape"`` (os.environ, a file) holds lone surrogates for bytes that are
    not. Such a token's frame fails to encode on every connection, and the encoder's error
    carries the token's text: it is refused before any frame is made, saying so without it."""
    try:
        token.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_bound(name: str, value: object) -> None:
    """ValueError unless ``value`` is an int >= 1 (a bool is no count)."""
    if type(value) is not int or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class _Route:
    """Where the connection task puts a subscription's items. Held by the consumer, apart from
    the :class:`Subscription` the caller holds, so that a subscription the caller dropped can be
    collected (and its projects unfollowed) instead of stalling the connection once full."""

    __slots__ = ("active", "queue", "ready")

    def __init__(self, project_ids: tuple[int, ...], buffer: int, buffer_bytes: int) -> None:
        self.active = set(project_ids)  # projects not refused by the gateway
        self.queue = BoundedQueue(buffer, buffer_bytes, _item_bytes)
        self.ready: dict[int, asyncio.Event] = {p: asyncio.Event() for p in project_ids}

    def wake(self) -> None:
        """Wake an iterator waiting on the queue (to notice a close)."""
        if self.queue.fits(_CLOSED):
            self.queue.put_nowait(_CLOSED)


class Subscription:
    """The items of some projects, in order per project: ``async for item in subscription``.

    Items are :class:`~consumer.Delivery` and :class:`~consumer.Resync`. With the consumer's
    ``auto_commit`` (the default), the cursor of an item is saved to the store when the caller asks
    for the next one (so only after it was processed), and when an ``async with`` block around the
    subscription exits without an exception. A gateway refusal for a project (e.g.
    :class:`~consumer.Forbidden`) is raised in order; the other projects go on, and the iterator
    ends when no project is left. Iteration ends when the consumer is closed, and raises the
    consumer's fatal error (e.g. :class:`~consumer.AuthenticationFailed`) if it failed.

    A subscription the caller drops without closing it (``break`` out of ``async for`` over
    ``bus.events(1)`` without keeping it) is unsubscribed when Python collects it.
    """

    def __init__(self, consumer: Consumer, project_ids: tuple[int, ...], route: _Route) -> None:
        self._consumer = consumer
        self.project_ids = project_ids
        self._route = route
        self._uncommitted: Item | UndecodableEvent | None = None
        self._closed = False
        # Must not reference `self`: it runs when nothing else does.
        self._finalizer = weakref.finalize(self, consumer._abandon, route, project_ids)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Item:
        consumer = self._consumer
        if self._uncommitted is not None:
            done, self._uncommitted = self._uncommitted, None
            if consumer.auto_commit:
                await consumer.commit(done)
        while True:
            if self._closed or (consumer._closed and consumer._failure is None):
                raise StopAsyncIteration
            queue = self._route.queue
            if consumer._failure is not None and queue.empty():
                raise consumer._failure
            if not self._route.active and queue.empty():
                raise StopAsyncIteration
            item = await queue.get()
            if item is _CLOSED:
                continue
            if type(item) is Delivery or type(item) is Resync:
                self._uncommitted = item
                return item
            if isinstance(item, UndecodableEvent):
                self._uncommitted = item
            raise item

    async def wait_subscribed(self) -> None:
        """Wait until the gateway acknowledged every project of this subscription once (its
        cursor is known): from then on, nothing published is missed. Bound it with
        ``asyncio.timeout``. Raises the consumer's fatal error, or :class:`ConsumerClosed`, if it
        stops meanwhile."""
        consumer = self._consumer
        for event in self._route.ready.values():
            if not event.is_set() and not consumer._stopped.is_set():
                ready = asyncio.ensure_future(event.wait())
                stopped = asyncio.ensure_future(consumer._stopped.wait())
                try:
                    await asyncio.wait((ready, stopped), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    ready.cancel()
                    stopped.cancel()
            if not event.is_set():
                raise consumer._failure or ConsumerClosed("the consumer is closed")

    async def commit(self) -> None:
        """Save the cursor of the item returned last (with ``auto_commit=False``, or to save it
        before asking for the next item)."""
        if self._uncommitted is not None:
            done, self._uncommitted = self._uncommitted, None
            await self._consumer.commit(done)

    async def aclose(self) -> None:
        """Stop following these projects (unsubscribes them on the gateway).

        The projects are unfollowed whatever happens; the other subscriptions never notice.
        An unexpected error sending an unsubscribe (anything but the connection closing: a bug
        in websockets or a transport) is raised here, to the caller leaving, after it was
        logged (``cannot send an unsubscribe; reconnecting``) and the connection dropped to be
        made again (nobody knows whether the frame went; on the next connection the gateway
        holds no subscription of these projects, and the others resume from their cursors).
        A send failing on a connection that is ending anyway is no error: the gateway drops
        every subscription of a connection that ends."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        self._route.wake()
        await self._consumer._unregister(self._route, self.project_ids)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None and self._consumer.auto_commit:
                await self.commit()
        finally:
            await self.aclose()


class _PresenceRoute:
    """A project's presence as the connection task keeps it: its member table, the wake-up of
    every reader (held here apart from the :class:`PresenceSubscription` s, which can then be
    collected), and the gateway's refusal of the project once it came."""

    __slots__ = ("error", "table", "wakes")

    def __init__(self, project_id: int) -> None:
        self.table = PresenceTable(project_id)
        self.wakes: set[asyncio.Event] = set()
        self.error: ConsumerError | None = None

    def notify(self) -> None:
        for wake in self.wakes:
            wake.set()


class PresenceSubscription:
    """Who is on a project's dashboards, pushed: ``async for view in subscription``.

    Each :class:`~consumer.presence.PresenceView` is the whole member list (sorted by id) with
    what changed since the last list this iterator gave; ``view.members`` is None when presence
    became unknown (the connection went away; the next list after the reconnect replaces it).
    Coalesced: a reader slower than the changes gets the latest list, never a backlog. A gateway
    refusal of the project (:class:`~consumer.Forbidden`) is raised, then iteration ends; it ends
    when the consumer is closed, and raises the consumer's fatal error if it failed. Dropped
    without being closed, it is closed when Python collects it.
    """

    def __init__(self, consumer: Consumer, project_id: int, route: _PresenceRoute) -> None:
        self._consumer = consumer
        self.project_id = project_id
        self._route = route
        self._watch = PresenceWatch()
        self._wake = asyncio.Event()
        self._wake.set()  # (look at the table at once: it may be known already)
        route.wakes.add(self._wake)
        self._closed = False
        # Must not reference `self`: it runs when nothing else does.
        self._finalizer = weakref.finalize(
            self, consumer._abandon_presence, route, project_id, self._wake
        )

    def __aiter__(self) -> PresenceSubscription:
        return self

    async def __anext__(self) -> PresenceView:
        consumer, route = self._consumer, self._route
        while True:
            if self._closed or (consumer._closed and consumer._failure is None):
                raise StopAsyncIteration
            if consumer._failure is not None:
                raise consumer._failure
            if route.error is not None:
                await self.aclose()
                raise route.error
            view = self._watch.next_view(route.table)
            if view is not None:
                return view
            self._wake.clear()
            await self._wake.wait()

    @property
    def members(self) -> tuple[Member, ...] | None:
        """The project's members now (sorted by id), or None while presence is unknown."""
        return self._route.table.members

    async def aclose(self) -> None:
        """Stop reading presence (the project's subscribe stops asking for it when no reader is
        left; a project followed only for presence is unsubscribed). An unexpected error
        sending that unsubscribe is raised here, as :meth:`Subscription.aclose` says."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        self._wake.set()
        error = await self._consumer._drop_presence(self._route, self.project_id, self._wake)
        if error is not None:
            raise error

    async def __aenter__(self) -> PresenceSubscription:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        await self.aclose()


class Consumer:
    """An asyncio client of one or more gateways, following any number of projects.

    Args:
        url: the gateway's WebSocket URL (``ws://`` or ``wss://``), or several: each reconnect
            goes to the next one (round robin), like a client behind a load balancer.
        token: a fixed token, or a function (plain or async) returning a fresh token. A function
            is called for every new connection and again before the token expires (refreshed
            in-band). None for a gateway running ``--no-auth``. A token that is not UTF-8 (a
            str with lone surrogates) can never be sent: a fixed one raises ValueError here, a
            function's counts as the function failing.
        store: where cursors are loaded from and saved to (see :mod:`consumer.stores`); None keeps
            them in memory only (resumes across reconnects, not across restarts).
        start: where a project without a saved cursor starts (:data:`Start`), "now" by default.
        auto_commit: save each item's cursor once the caller asked for the next item. False: the
            caller saves, with :meth:`commit` or in its own transaction
            (:meth:`~consumer.SqlCursorStore.save_in`).
        reconnect: backoff and authentication-retry policy.
        buffer: items held per subscription before the connection stops reading.
        buffer_bytes: bytes of frames held per subscription before the connection stops reading
            (an item without a frame counts :data:`CONTROL_ITEM_BYTES`); one item larger than
            that is held alone.
        open_timeout, ping_interval, ping_timeout: WebSocket handshake timeout (also the time a
            catch-up page, an async token function, a cursor store's load or save, and the
            gateway's answer to the token or to a subscribe may take) and keepalive (a
            connection that answers no ping within ``ping_timeout`` is dropped and resumed).
        compression: offer permessage-deflate (the gateway uses it only with ``--compression``).
        catch_up: when a resume is further behind than one replay carries (``resync_required``
            ``too_far_behind``) but the history still holds the cursor, read the missed events
            page by page from the gateway's polling endpoint instead of surfacing a resync.
        http_url: base URL of that endpoint (default: the WebSocket URL's origin, http(s)).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: TokenSource | None = None,
        store: CursorStore | None = None,
        start: Start = "now",
        auto_commit: bool = True,
        reconnect: ReconnectPolicy | None = None,
        buffer: int = 10_000,
        buffer_bytes: int = 64 * 2**20,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        compression: bool = False,
        catch_up: bool = True,
        http_url: str | None = None,
        random: Callable[[], float] | None = None,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        check_arguments(urls, start=start, token=token)
        _check_bound("buffer", buffer)
        _check_bound("buffer_bytes", buffer_bytes)
        self.urls = urls
        self.store = store
        self.start = start
        self.auto_commit = auto_commit
        self.policy = reconnect or ReconnectPolicy()
        self.buffer = buffer
        self.buffer_bytes = buffer_bytes
        self.catch_up = catch_up
        self.http_url = http_url.rstrip("/") if http_url else None
        self._current_url = urls[0]
        self._open_timeout = self._poll_timeout = open_timeout
        self._token_source = token
        self._connect_options: dict[str, Any] = {
            "open_timeout": open_timeout,
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
            "compression": "deflate" if compression else None,
            "max_size": 2**22,
            "close_timeout": CLOSE_TIMEOUT,
            "create_connection": _Connection,
        }
        # Jitter from a generator of its own unless given one: the application's global
        # ``random`` state is left alone (seeded simulations, property-based tests).
        self._random = random or _random.Random().random
        self._backoff = Backoff(self.policy, self._random)
        self._url_index = itertools.count()
        self._states: dict[int, ProjectState] = {}
        self._routes: dict[int, _Route] = {}
        #: Projects whose presence is read (see :meth:`presence`). A project in it has a
        #: ProjectState whether or not it is followed for events (in ``_routes``): its
        #: subscribe carries ``"presence": true``, and its events go to no one.
        self._presence: dict[int, _PresenceRoute] = {}
        #: :meth:`_unread_prefixes`, or None when a project's presence or state changed since:
        #: made again at the next frame. (Stale, it costs a header read or a full decode too
        #: many, never a wrong placement: :meth:`_on_unread_event` checks the project's state.)
        self._unread: tuple[bytes, ...] | None = None
        self._ws: ClientConnection | None = None
        # The connection whose subscribes went out: a project added later subscribes by itself.
        self._subscribed_on: ClientConnection | None = None
        #: Projects unsubscribed on this connection -> unsubscribes the gateway has not answered
        #: yet: until it does, every frame of the project is the old subscription's.
        self._unsubscribing: dict[int, int] = {}
        self._authenticated = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._helpers: set[asyncio.Task[Any]] = set()
        self._closed = False
        #: ``aclose()``'s shutdown, in a task of its own: a caller cancelled meanwhile does not
        #: stop it half way (readers never woken, the connection task left running).
        self._shutdown: asyncio.Future[None] | None = None
        self._stopped = asyncio.Event()  # set when closed or failed
        self._failure: ConsumerError | None = None
        self._token: tuple[str, float] | None = None  # (token, monotonic time it was obtained)
        self._auth_failures = 0
        self._failed_attempts = 0  # connection attempts in a row that did not open
        #: A prompt reconnect was made since the last stable connection (the next is backoff).
        self._prompted = False
        #: Project -> subscribes answered 'unavailable' in a row (refused, or the subscription
        #: ended by the gateway): the subscribe's backoff; a `subscribed` starts it over.
        self._unavailable: dict[int, int] = {}
        #: Project -> presence reads failed in a row ('unavailable' after a `subscribed` with
        #: the flag; the subscription stands): presence's backoff, which only a `presence` list
        #: starts over (the `subscribed` before each failure does not: the re-asks would never
        #: back off). Apart from the subscribe's: shared, a subscription the gateway ended would
        #: wait the delay presence had grown (up to ``max``), its events silent meanwhile.
        self._presence_unavailable: dict[int, int] = {}
        #: The connection's pending token refresh (scheduled, or a retry): one at a time.
        self._refresh: asyncio.Future[None] | None = None
        #: Project -> its retry after 'unavailable', while it sleeps (one at a time per project).
        self._retries: dict[int, asyncio.Future[None]] = {}
        #: The projects whose retry in ``_retries`` asks for presence again after a failed
        #: read (their subscription stands): one the gateway then ends is retried sooner.
        self._presence_retries: set[int] = set()
        #: Frames refused by the gateway's rate limit, and those sent after them, go out paced
        #: (policy.FramePacer, on the event loop's clock): one pacing for the whole connection,
        #: keyed by project (its subscribe) and "auth" (the token refresh); and its task.
        self._pacer = FramePacer(self.policy.resend_interval, self.policy.max, self.policy.initial)
        self._pacing: asyncio.Future[None] | None = None
        #: The bound on a subscribe's answer (consumer.answers), on a clock that stands still
        #: while the connection task waits for the caller's room; one lazy timer. The clock is
        #: the event loop's (its timers'), bound when the connection task starts; nothing reads
        #: it before.
        self._answers = PendingAnswers(open_timeout)
        self._clock = ReadingClock(time.monotonic)
        self._answer_timer: asyncio.TimerHandle | None = None
        #: The connection the consumer gave up on for not answering (not a stable one).
        self._given_up: ClientConnection | None = None
        #: Sends that failed unexpectedly since the last stable connection (see :meth:`_send`).
        self._send_failures = 0
        #: When (``time.monotonic()``) the current connection opened.
        self._opened_at: float | None = None
        #: A catch-up page with a tag was refused (400: a gateway from before cursor tags): pages
        #: are asked for without tags until a gateway names a tag (:meth:`_tags_known`), or the
        #: next connection.
        self._untagged_pages = False
        self.stats = ConsumerStats()
        self.connects = 0  # connections that opened (for tests and metrics)
        #: How the last :data:`CLOSE_CODES_KEPT` connections ended, oldest first (a list of
        #: every one grew by an entry per reconnect for as long as the process lived).
        self.close_codes: list[int | None] = []

    # --- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Consumer:
        self.start_connection()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def start_connection(self) -> None:
        """Start the connection task (``async with`` does it)."""
        if self._closed:
            raise ConsumerClosed("the consumer is closed")
        if self._task is None:
            self._clock = ReadingClock(asyncio.get_running_loop().time)
            self._task = asyncio.create_task(self._run(), name="eventbus-consumer")

    async def aclose(self) -> None:
        """Close the connection for good; iterators end (``StopAsyncIteration``). The shutdown
        runs to its end even if the calling task is cancelled meanwhile (the close handshake
        waits for the gateway, up to ``CLOSE_TIMEOUT``); a later call waits for it."""
        if self._shutdown is None:
            if self._closed:
                return  # failed: _fail stopped everything
            self._closed = True
            self._stopped.set()
            self._shutdown = asyncio.ensure_future(self._shut_down())
        await asyncio.shield(self._shutdown)

    async def _shut_down(self) -> None:
        for task in list(self._helpers):
            task.cancel()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await _close(ws)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for route in set(self._routes.values()):
            route.wake()
        for presence in self._presence.values():
            presence.table.forget()
            presence.notify()

    @property
    def live(self) -> bool:
        """True while a connection is open and authenticated."""
        return self._ws is not None and self._authenticated.is_set()

    def cursor(self, project_id: int) -> Cursor | None:
        """The cursor of the last item *received* for the project (may be ahead of what the
        caller processed), or None before the gateway first acknowledged it."""
        state = self._states.get(project_id)
        return state.cursor if state is not None else None

    # --- subscriptions ---------------------------------------------------------------------------

    def events(
        self,
        *project_ids: int,
        after: Cursor | Mapping[int, Cursor] | None = None,
        start: Start | None = None,
    ) -> Subscription:
        """Follow ``project_ids`` on this consumer's connection; returns their async iterator.

        Each project resumes after ``after`` (one cursor, or one per project) when given, else
        after the cursor in the store, else as ``start`` says (default: the consumer's ``start``).
        A project may be followed by one subscription at a time. A cursor the gateway would refuse
        (:func:`~consumer.types.checked_cursor`) raises ValueError here; one loaded from the store,
        a fatal :class:`ConsumerError`.
        """
        if not project_ids:
            raise ValueError("give at least one project id")
        for project_id in project_ids:
            if not isinstance(project_id, int) or isinstance(project_id, bool) or project_id <= 0:
                raise ValueError(f"project ids are positive integers, got {project_id!r}")
            if project_id in self._routes:
                raise ValueError(f"project {project_id} is already followed")
        if len(set(project_ids)) != len(project_ids):
            raise ValueError("a project id is repeated")
        if self._closed:
            raise ConsumerClosed("the consumer is closed")
        explicit = {
            p: checked_cursor(cursor)
            for p in project_ids
            if (cursor := after.get(p) if isinstance(after, Mapping) else after) is not None
        }
        if start is not None:
            _check_start(start)
        self.start_connection()
        start = self.start if start is None else start
        route = _Route(tuple(project_ids), self.buffer, self.buffer_bytes)
        for project_id in project_ids:
            self._routes[project_id] = route
            self._spawn(self._prepare(route, project_id, explicit.get(project_id), start))
        return Subscription(self, tuple(project_ids), route)

    def presence(self, project_id: int) -> PresenceSubscription:
        """Who is on the project's dashboards, pushed (``docs/presence.md``): returns an async
        iterator of :class:`~consumer.presence.PresenceView` s (see :class:`PresenceSubscription`).

        The project's subscribe carries ``"presence": true`` while a reader is open: a project
        followed with :meth:`events` is subscribed again from its cursor with the flag (nothing
        lost or repeated); one that is not is subscribed live for presence, and its events go to
        no one. This consumer's token is listed as a member when it has a ``sub``; a service's
        token without ``sub`` reads presence without being listed.
        """
        if not isinstance(project_id, int) or isinstance(project_id, bool) or project_id <= 0:
            raise ValueError(f"project ids are positive integers, got {project_id!r}")
        if self._closed:
            raise ConsumerClosed("the consumer is closed")
        self.start_connection()
        route = self._presence.get(project_id)
        first = route is None
        if route is None:
            route = self._presence[project_id] = _PresenceRoute(project_id)
            self._unread = None
        subscription = PresenceSubscription(self, project_id, route)
        if first:
            state = self._states.get(project_id)
            if state is None and project_id not in self._routes:
                # Followed for presence only: live from now.
                state = self._states[project_id] = ProjectState(project_id, delivers=False)
            if state is not None and self._subscribed_on is not None and state.ask_again():
                # (a state still being prepared subscribes with the flag when it is ready; one
                # whose subscribe is in flight, once it is answered)
                self._spawn(self._send_subscribe(state))
        return subscription

    def members(self, project_id: int) -> tuple[Member, ...] | None:
        """The project's members now (sorted by id), or None while presence is unknown (no
        reader of its presence, not connected, or no list from the gateway yet)."""
        route = self._presence.get(project_id)
        return None if route is None else route.table.members

    async def _drop_presence(
        self, route: _PresenceRoute, project_id: int, wake: asyncio.Event
    ) -> Exception | None:
        """A presence reader closed. Returns the unexpected error of the unsubscribe's send
        when the last reader of a project read for presence only left (see
        :meth:`_send`), for the caller who closed it to raise."""
        route.wakes.discard(wake)
        if route.wakes or self._presence.get(project_id) is not route:
            return None
        del self._presence[project_id]
        # Presence is no longer asked: its failures in a row end here (no `presence` list comes
        # to say so), and a reader opened later starts from the first delay, not from the one
        # this run had grown to (up to ``max``, its members unknown meanwhile).
        self._presence_unavailable.pop(project_id, None)
        self._unread = None
        if self._closed or self._subscribed_on is None:
            if project_id not in self._routes:
                self._drop_state(project_id)
            return None
        if project_id in self._routes:
            state = self._states.get(project_id)
            if state is not None and state.ask_again():
                await self._send_subscribe(state)  # without the flag: no more diffs
        elif self._drop_state(project_id):
            return await self._unsubscribe(project_id)
        return None

    def _abandon_presence(
        self, route: _PresenceRoute, project_id: int, wake: asyncio.Event
    ) -> None:
        """A presence subscription was collected without being closed (see :meth:`_abandon`).
        An unexpected failure of its unsubscribe has no caller to reach: it was logged."""
        with contextlib.suppress(RuntimeError):  # no running loop: nothing left to unfollow
            asyncio.get_running_loop().call_soon(
                lambda: self._spawn(self._drop_presence(route, project_id, wake))
            )

    async def _prepare(
        self, route: _Route, project_id: int, explicit: Cursor | None, start: Start
    ) -> None:
        cursor = explicit
        if cursor is None and self.store is not None:
            try:
                # A store on a hung Redis or database must not keep the project unsubscribed,
                # and its iterator waiting, for ever without a word.
                cursor = await self._bounded(self.store.load(project_id), "the cursor store's load")
                if cursor is not None:
                    cursor = checked_cursor(cursor)  # whatever store it comes from
            except Exception as exc:
                # Starting from anywhere else could skip or repeat events: stop, loudly.
                raise ConsumerError(
                    f"cannot load the cursor of project {project_id}: {exc!r}"
                ) from exc

        start_after = None if start == "now" else 0 if start == "beginning" else int(start)
        state = ProjectState(project_id, cursor, start_after)
        if self._routes.get(project_id) is not route:
            return  # unsubscribed meanwhile (and perhaps followed again by a newer subscription)
        # A project whose presence is read has a subscription already (live from when presence
        # was asked for): it is left first, its frames dropped until the gateway says so, so
        # that none of them is taken for this cursor's.
        leave = self._end_state(project_id)
        self._states[project_id] = state
        self._unread = None
        if cursor is not None:
            route.ready[project_id].set()
        if await leave is not None:
            return  # (the connection is dropped: the next one subscribes it, from its cursor)
        # Unless its subscribe went out meanwhile (presence asked for or dropped while the
        # unsubscribe was being sent subscribes a state with no subscribe in flight; two in
        # flight could not be told apart: the second answer was taken for a resume refused).
        if (
            self._subscribed_on is not None
            and self._states.get(project_id) is state
            and not state.pending
            and state.stream_epoch is None
        ):
            await self._send_subscribe(state)

    async def _unregister(self, route: _Route, project_ids: tuple[int, ...]) -> None:
        """Unfollow a subscription's projects; raises the unexpected error of an unsubscribe's
        send (see :meth:`_send`) to the caller leaving, and to no one else."""
        forgotten = self._forget(route, project_ids)
        if forgotten:
            # In a task of its own: a caller cancelled while one was being written would leave
            # the others subscribed on the gateway, sending events to no one. (Waited for, not
            # shielded: the consumer closing meanwhile cancels it, which is no error here.)
            task = self._spawn(self._unsubscribe_each(forgotten))
            await asyncio.wait((task,))
            error = None if task.cancelled() else task.result()
            if error is not None:
                raise error

    async def _unsubscribe_each(self, project_ids: list[int]) -> Exception | None:
        """Unsubscribe the projects; returns the first unexpected error of a send, after which
        the rest are sent none (the connection is dropped), yet are left all the same: until
        it ends, the frames it still holds of them are their old subscriptions' (see
        :meth:`_unsubscribe`), never taken for those of a subscription following one of them
        again meanwhile. Returned, not raised: a helper task's exception stops the consumer,
        and this one is only the leaving caller's."""
        error = None
        for project_id in project_ids:
            if error is None:
                error = await self._unsubscribe(project_id)
            else:
                self._leaving(project_id)
        return error

    def _unsubscribe(self, project_id: int) -> Awaitable[Exception | None]:
        """Unsubscribe on the current connection (the send to await; it returns what
        :meth:`_send` does). Until the gateway answers (``unsubscribed``, or
        ``not_subscribed`` when it had ended the subscription itself), the project's frames
        are the old subscription's: events, ``subscribed``, errors sent before the gateway read
        the unsubscribe. A subscription following the project again meanwhile must not take
        them for its own (an event of another epoch under its cursor's epoch; a
        ``not_subscribed`` ending it)."""
        ws = self._leaving(project_id)
        if ws is None:
            return _none()  # no connection, or not subscribed on it yet: nothing to leave
        return self._send(ws, {"type": "unsubscribe", "project_id": project_id})

    def _leaving(self, project_id: int) -> ClientConnection | None:
        """Count the project's subscription on the current connection as left (its frames
        dropped until the gateway's answer, or the connection's end); returns that connection,
        or None when there is none to leave (no connection, or not subscribed on it yet)."""
        ws = self._ws
        if ws is None or ws is not self._subscribed_on:
            return None
        self._unsubscribing[project_id] = self._unsubscribing.get(project_id, 0) + 1
        return ws

    async def _send(self, ws: ClientConnection, frame: dict[str, object]) -> Exception | None:
        """Send ``frame`` (any the consumer sends: the token, a subscribe, an unsubscribe) on
        ``ws``; the one way every frame goes out. Returns None when it went, or needed not:
        ``ws`` closed (ConnectionClosed), or any failure on a connection ending anyway (closing,
        dropped, given up, or no longer the consumer's), which the next connection replaces
        (the gateway drops a connection's subscriptions with it; the next one subscribes every
        project, and sends a fresh token). Any other failure is unexpected (a bug in
        websockets, a transport's): logged with the frame's type and project (below), and
        returned, for a caller who asked to raise it (only leaving a project does:
        :meth:`_unregister`); never raised, so that no frame stops the consumer (a helper
        task's exception does, the connection task's too). Nobody knows whether the frame
        went, or what of it: the connection is dropped (1006) and made again with backoff,
        every project resuming from its cursor.

        Such failures are counted (``failures`` in the log line) until a connection is stable
        again (:meth:`_connect_once`; or was, up ``stable_after`` before its send broke): the
        first, and then one in every :data:`SEND_FAILURES_LOGGED_EVERY`, is logged at error
        with the traceback; the ones between at debug, without it."""
        try:
            await ws.send(_encode(frame), text=True)
        except ConnectionClosed:
            return None
        except Exception as exc:
            kind = frame["type"]
            about = {} if "project_id" not in frame else {"project_id": frame["project_id"]}
            if (
                self._ws is not ws
                or self._given_up is ws
                or ws.state is not State.OPEN
                or ws.transport.is_closing()
            ):
                log.debug(
                    "frame not sent on a connection going away",
                    type=kind,
                    error=repr(exc),
                    **about,
                )
                return None
            # A send that breaks on every connection (a bug no reconnect heals) is dropped and
            # made again up to every `max` (30 s) for as long as it lasts: an error each time
            # filled the logs. Counted until a connection is stable (the backoff's reset): a
            # connection where a send broke never is, and the frames that went before it there
            # (the token before a subscribe that breaks) do not end the count. One that was up
            # `stable_after` before its send broke was stable: this failure is a new one (else,
            # after the first failure ever, each sporadic one, a long-lived connection apart,
            # went to debug).
            opened_at = self._opened_at
            if opened_at is not None and time.monotonic() - opened_at >= self.policy.stable_after:
                self._send_failures = 0
            self._send_failures += 1
            failures = self._send_failures
            event = f"cannot send {_SENT_FRAMES.get(kind, kind)}; reconnecting"
            if failures != 1 and failures % SEND_FAILURES_LOGGED_EVERY:
                log.debug(event, error=repr(exc), failures=failures, **about)
            else:
                # The frame itself is never logged: an auth frame carries the token. Nor, for
                # that one, the exception as exc_info: the tracebacks structlog draws (rich's in
                # its console renderer, dict_tracebacks) show every frame's locals, this frame
                # and websockets' encoded message among them. Its text says what broke, and
                # where.
                trace: dict[str, object] = (
                    {"traceback": "".join(traceback.format_exception(exc))}
                    if kind == "auth"
                    else {"exc_info": exc}
                )
                log.error(event, error=repr(exc), failures=failures, **trace, **about)
            # Not a stable connection (see _connect_once): a send that breaks on every
            # connection must not reconnect at once each time.
            self._given_up = ws
            ws.transport.abort()
            return exc
        return None

    def _left(self, project_id: int | None, message: object) -> bool:
        """Whether a frame of ``project_id`` belongs to a subscription left on this connection
        and not yet confirmed gone (dropped); the confirmation itself is consumed."""
        count = self._unsubscribing.get(project_id)  # type: ignore[arg-type]
        if not count:
            return False
        cls = type(message)
        if cls is Unsubscribed or (
            cls is Error and message.code == ErrorCode.NOT_SUBSCRIBED  # type: ignore[attr-defined]
        ):
            if count == 1:
                del self._unsubscribing[project_id]  # type: ignore[arg-type]
            else:
                self._unsubscribing[project_id] = count - 1  # type: ignore[index]
        return True

    def _forget(self, route: _Route, project_ids: tuple[int, ...]) -> list[int]:
        """Stop routing the projects to ``route``; returns those to unsubscribe on the gateway."""
        forgotten = []
        for project_id in project_ids:
            if self._routes.get(project_id) is route:
                del self._routes[project_id]
                if project_id in self._presence:
                    # Its presence is still read: the subscription stays, delivering nothing
                    # (or, when its state was not prepared yet, one is made for presence).
                    state = self._states.get(project_id)
                    self._unread = None
                    if state is not None:
                        state.delivers = False
                    else:
                        state = self._states[project_id] = ProjectState(project_id, delivers=False)
                        if self._subscribed_on is not None:
                            self._spawn(self._send_subscribe(state))
                    continue
                if self._drop_state(project_id):
                    forgotten.append(project_id)
        return forgotten

    def _drop_state(self, project_id: int) -> bool:
        """Forget the project's state; returns whether the gateway may hold a subscription of it
        to leave (an unsubscribe to send)."""
        self._cancel_retry(project_id)
        # Its refusals in a row end with it (followed again, it starts from the first delay),
        # and a caller following and leaving project after project does not grow them without
        # bound (presence's end when presence is no longer read: _drop_presence).
        self._unavailable.pop(project_id, None)
        # Its held subscribe is moot; left in the queue until its turn, a caller following and
        # leaving project after project would grow it without bound.
        self._pacer.drop(project_id)
        state = self._states.pop(project_id, None)
        self._unread = None
        # Only a project the gateway may hold a subscription of (a subscribe sent, or answered,
        # on this connection) is left there: an unsubscribe of a project whose subscribe never
        # went out (held by the pacing) is one of nothing, which the gateway's rate limit counts
        # (eventbus.js sends none either).
        return state is not None and (state.pending or state.stream_epoch is not None)

    def _end_state(self, project_id: int) -> Awaitable[Exception | None]:
        """Drop a project's state kept for presence only (when events of it are followed from
        now on): the unsubscribe to await when the gateway holds its subscription."""
        if project_id not in self._states or self._drop_state(project_id) is False:
            return _none()
        return self._unsubscribe(project_id)

    def _abandon(self, route: _Route, project_ids: tuple[int, ...]) -> None:
        """A subscription was collected without being closed: unfollow its projects.

        Runs wherever the garbage collector happens to run (in the middle of frame handling,
        say), so it only schedules the work for the event loop's next turn."""
        with contextlib.suppress(RuntimeError):  # no running loop: nothing left to unfollow
            asyncio.get_running_loop().call_soon(self._drop_abandoned, route, project_ids)

    def _drop_abandoned(self, route: _Route, project_ids: tuple[int, ...]) -> None:
        forgotten = self._forget(route, project_ids)
        if forgotten and self._subscribed_on is not None and not self._closed:
            log.info("unsubscribing the projects of a dropped subscription", projects=forgotten)
            # (an unexpected failure of a send has no caller to reach: it was logged)
            self._spawn(self._unsubscribe_each(forgotten))

    async def commit(self, item: Item | UndecodableEvent) -> None:
        """Save the cursor of ``item`` (processed by the caller) to the store, if any; a save
        that takes longer than ``open_timeout`` raises TimeoutError (it may have been made)."""
        if self.store is not None:
            await self._bounded(
                self.store.save(item.project_id, item.cursor), "the cursor store's save"
            )

    async def _bounded(self, operation: Awaitable[Any], what: str) -> Any:
        """``operation`` (a cursor store's, a token function's) within ``open_timeout``, else
        TimeoutError naming ``what``; its own TimeoutError passes as it is. Only what awaits can
        be bounded: a store or function that blocks the event loop (a DB-API store, a plain
        token function) cannot be interrupted from here."""
        deadline = asyncio.timeout(self._open_timeout)
        try:
            async with deadline:
                return await operation
        except TimeoutError:
            if not deadline.expired():
                raise  # the store's own
            raise TimeoutError(f"{what} did not finish within {self._open_timeout} s") from None

    # --- the connection task ---------------------------------------------------------------------

    def _spawn(self, coroutine: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coroutine)
        self._helpers.add(task)
        task.add_done_callback(self._helper_done)
        return task

    def _helper_done(self, task: asyncio.Future[Any]) -> None:
        self._helpers.discard(task)  # type: ignore[arg-type]
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, ConsumerError):
                self._fail(exc)
            elif not isinstance(exc, ConnectionClosed):
                # Where it broke, as the connection task's (_run): the traceback's text, not
                # exc_info, whose renderers show every frame's locals (the token refresh's hold
                # the token).
                log.error(
                    "consumer helper failed",
                    error=repr(exc),
                    traceback="".join(traceback.format_exception(exc)),
                )
                self._fail(ConsumerClosed(f"internal error: {exc!r}"))

    def _fail(self, error: ConsumerError) -> None:
        """A fatal error: every iterator raises it; no more reconnects."""
        if self._failure is None:
            self._failure = error
            log.error("consumer stopped", error=str(error))
        self._closed = True
        self._stopped.set()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        ws = self._ws
        if ws is not None:
            self._spawn(_close(ws))
        for route in set(self._routes.values()):
            route.wake()
        for presence in self._presence.values():
            presence.table.forget()
            presence.notify()

    async def _run(self) -> None:
        try:
            while not self._closed:
                delay = await self._connect_once()
                if self._closed:
                    return
                await asyncio.sleep(delay)
        except ConsumerError as exc:
            self._fail(exc)
        except Exception as exc:
            # A bug here must not leave the iterators waiting forever: they raise it.
            # Its traceback's text, not exc_info: the tracebacks structlog draws (rich's in its
            # console renderer, dict_tracebacks) show every frame's locals, and this task's hold
            # the token (_connect_once, _session).
            log.error(
                "consumer connection task failed",
                error=repr(exc),
                traceback="".join(traceback.format_exception(exc)),
            )
            self._fail(ConsumerClosed(f"internal error: {exc!r}"))

    async def _connect_once(self) -> float:
        """One connection attempt and its session; returns the delay before the next attempt."""
        url = self.urls[next(self._url_index) % len(self.urls)]
        try:
            # A fresh token for every connection (like eventbus.js): a reused one may be about to
            # expire, and a refused one must not be sent again.
            token = await self._get_token(renew=True)
        except ConsumerError:
            raise
        except Exception as exc:  # the caller's token function failed: try again later
            self._log_failure("token function failed", error=repr(exc))
            return self._backoff.next()
        opened_at = None
        code: int | None = None
        refused: Close | None = None
        was_live = False
        retry_after = 0.0
        try:
            ws = await _connect(url, **self._connect_options)
        except InvalidStatus as exc:
            # HTTP answer instead of a WebSocket: 503 (full or draining) says when to come back.
            # Headers are ISO-8859-1: only ASCII digits are a number ("\u00b2" passes
            # isdigit and float() raised out of the connection task, stopping the consumer for
            # good); and no answer makes it wait longer than the policy's max.
            header = exc.response.headers.get("Retry-After", "")
            if header.isascii() and header.isdigit():
                retry_after = min(float(header), self.policy.max)
            self._log_failure("handshake refused", url=url, status=exc.response.status_code)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            self._log_failure("cannot connect", url=url, error=str(exc) or type(exc).__name__)
        else:
            opened_at = self._opened_at = time.monotonic()
            self.connects += 1
            self._ws = ws
            self._current_url = url
            if isinstance(ws, _Connection):
                ws.on_binary = self._on_binary
                ws.write_timeout = self._open_timeout
            self._untagged_pages = False
            log.info("connected", url=url)
            try:
                await self._session(ws, token)
            except (ConnectionClosed, OSError):
                pass  # the connection ended; how is in its close code
            finally:
                self._connection_ended()
                was_live = self._authenticated.is_set()
                self._authenticated.clear()
                await _close(ws)
                # No close frame (killed gateway, reset, keepalive timeout): 1006.
                code = ws.close_code if ws.close_code is not None else ABNORMAL_CLOSURE
                refused = _refused_frame(ws)
        if opened_at is not None:
            self._failed_attempts = 0
            self.close_codes.append(code)
            if len(self.close_codes) > CLOSE_CODES_KEPT:
                del self.close_codes[0]
            log.info("disconnected", url=url, code=code)
            # A connection given up on for not answering was up, not stable: keep backing off.
            if (
                time.monotonic() - opened_at >= self.policy.stable_after
                and self._given_up is not ws
            ):
                self._backoff.reset()
                self._prompted = False
                self._send_failures = 0
            self._given_up = None
        if self._closed:
            return 0.0
        if refused is not None:
            # The consumer closed the connection over what the gateway sent (a frame over
            # max_size, a text frame that is not UTF-8): the gateway's fault, or a proxy's. Else
            # nothing would say so: websockets discards what follows a failure, the gateway's
            # echo of the code included, and the connection ends as a plain 1006.
            log.warning(
                "refused a frame from the gateway", code=refused.code, reason=refused.reason
            )
        return max(retry_after, self._after_close(code, was_live))

    def _log_failure(self, event: str, **fields: object) -> None:
        # Once when the gateway becomes unreachable, then every tenth attempt: a consumer that
        # retries for hours must not fill the logs.
        self._failed_attempts += 1
        if self._failed_attempts % 10 == 1:
            log.warning(event, attempts=self._failed_attempts, **fields)

    def _after_close(self, code: int | None, was_live: bool) -> float:
        """The delay before the next attempt after a connection ended with ``code`` (None: it
        did not open); ``was_live``: it was authenticated."""
        action = close_action(code)
        if action.client_bug:
            log.error("the gateway closed the connection for a protocol violation", code=code)
        if action.auth_failure:
            if not callable(self._token_source):
                what = "no token was given" if self._token_source is None else "the token is fixed"
                raise AuthenticationFailed(
                    f"the gateway refused the token (close code {code}) and {what}", code
                )
            self._auth_failures += 1
            if self._auth_failures >= self.policy.max_auth_failures:
                raise AuthenticationFailed(
                    f"the gateway refused {self._auth_failures} tokens in a row "
                    f"(last close code {code})",
                    code,
                )
        if action.renew_token:
            self._token = None
        # Prompt only for a connection the gateway had taken (as eventbus.js), and once until
        # one is stable: a drained pod refuses new handshakes, so a second such close soon
        # after is no drain moving us elsewhere. A gateway closing every connection so would be
        # connected to, and a token minted for, several times a second for ever.
        if action.retry is Retry.PROMPT and was_live and not self._prompted:
            self._prompted = True
            return max(action.min_delay, self._random() * self.policy.prompt_max)
        return max(action.min_delay, self._backoff.next())

    async def _session(self, ws: ClientConnection, token: str | None) -> None:
        try:
            if token is not None:
                if await self._send(ws, {"type": "auth", "token": token}) is not None:
                    return  # dropped: the next connection sends a fresh token
            else:
                self._authenticated.set()
            # The gateway reads the auth frame before anything else: subscribes can follow it at
            # once (a refused token closes the connection with 4001 before they are read).
            await self._subscribe_all(ws)
            # A gateway that never answers the token (its handler stuck, a proxy that accepts
            # and forwards nothing) would hold this connection, answering pings, for ever.
            auth_deadline = None
            if token is not None:
                auth_deadline = asyncio.get_running_loop().time() + self._open_timeout
            while True:
                if auth_deadline is None:
                    raw = await ws.recv(decode=False)
                else:
                    try:
                        async with asyncio.timeout_at(auth_deadline):
                            raw = await ws.recv(decode=False)
                    except TimeoutError:
                        log.warning(
                            "no answer to the token; reconnecting", timeout=self._open_timeout
                        )
                        self._given_up = ws
                        return
                message = await self._on_frame(ws, raw)
                if type(message) is Authenticated:
                    if auth_deadline is not None:
                        # The gateway reads the subscribes after the token: they wait from here.
                        self._answers.progressed(self._clock.now())
                    auth_deadline = None
                    self._authenticated.set()
                    self._auth_failures = 0
                    if self._refresh is not None:
                        self._refresh.cancel()
                    self._refresh = self._schedule_refresh(ws, message)
        finally:
            if self._refresh is not None:
                self._refresh.cancel()
                self._refresh = None

    async def _subscribe_all(self, ws: ClientConnection) -> None:
        """A new connection (its token sent): subscribe every project on it."""
        self._unsubscribing.clear()  # (what the last connection left, it answers no more)
        self._subscribed_on = ws
        self._answers.start(self._clock.now())
        for project_id, state in list(self._states.items()):
            if not state.delivers:
                # Followed for its presence only: live from now (the events it missed would go
                # to no one).
                self._states[project_id] = ProjectState(project_id, delivers=False)
        for state in self._states.values():
            state.on_connection()
        for state in list(self._states.values()):
            # Skipped: one unfollowed while an earlier send waited, one catching up (it
            # subscribes when its pages are read), and one subscribed on this connection
            # meanwhile (presence asked for while a send waited on a full write buffer: a
            # second subscribe in flight could not be told from it, and two live ones made the
            # second's answer look like a resume refused, a Resync history_lost).
            if (
                self._states.get(state.project_id) is state
                and not state.catching_up
                and not state.pending
            ):
                if await self._send(ws, self._subscribe_message(state)) is not None:
                    return  # dropped: the next connection subscribes every project

    def _connection_ended(self) -> None:
        """The connection is gone: nothing sent on it will be answered."""
        self._ws = self._subscribed_on = None
        # Presence is unknown until the next connection's `presence` replaces it.
        for presence in self._presence.values():
            if presence.table.forget():
                presence.notify()
        for project_id in list(self._retries):  # the next connection subscribes anyway
            self._cancel_retry(project_id)
        # The next connection has a bucket of its own on the gateway.
        self._pacer.reset()
        if self._pacing is not None:
            self._pacing.cancel()
            self._pacing = None
        self._answers.start(self._clock.now())
        if self._answer_timer is not None:
            self._answer_timer.cancel()
            self._answer_timer = None

    def _ignored(self, event: str, *, level: str = "warning", **fields: object) -> None:
        """A frame the gateway never sends, dropped: counted, and logged once, then every
        1,000th (a broken or hostile gateway sending them as fast as it can must not write tens
        of thousands of lines a second into the service's logs)."""
        self.stats.ignored += 1
        if self.stats.ignored % 1000 == 1:
            getattr(log, level)(event, ignored=self.stats.ignored, **fields)

    def _on_binary(self) -> None:
        self._ignored("ignored a binary frame (the gateway sends text frames only)")

    def _has_valid_cursor(self, message: Subscribed | ResyncRequired) -> bool:
        """Whether a ``subscribed`` or ``resync_required`` names a cursor the gateway accepts;
        one that does not (an epoch of garbage, a negative seq) is not taken as the project's
        cursor, which the caller would be handed, save, and have refused on every restart (as
        eventbus.js, which reports such a frame as ``invalid_frame`` and ignores it)."""
        try:
            checked_cursor((message.epoch, message.seq))
        except ValueError as exc:
            self._ignored(
                "ignored a frame with an invalid cursor",
                type=type(message).__struct_config__.tag,
                project_id=message.project_id,
                error=str(exc),
            )
            return False
        return True

    async def _on_frame(self, ws: ClientConnection, raw: bytes) -> object:
        unread = self._unread
        if unread is None:
            unread = self._unread = self._unread_prefixes()
        if unread and raw.startswith(unread) and await self._on_unread_event(ws, raw):
            return None
        try:
            message = decode_frame(raw)
        except FrameError as exc:
            if exc.presence is not None:
                if not (self._unsubscribing and self._left(exc.presence, None)):
                    self._malformed_presence(exc.presence, str(exc))
                    if exc.listing:
                        # Still the presence answer owed (in order), only unreadable: taken
                        # for none, the subscribe held behind it never went and the bound
                        # gave the connection up, on every connection again.
                        await self._presence_answered(ws, exc.presence)
                return None
            if exc.header is None:
                self._ignored("ignored a frame that is not a protocol message", error=str(exc))
                return None
            if self._unsubscribing and self._left(exc.header[1], None):
                return None
            state = self._states.get(exc.header[1])
            if state is not None:
                pending = state.pending
                verdict = await self._on_undecodable(state, exc, raw)
                if pending and verdict is Verdict.DELIVER:
                    self._heard(state.project_id)  # (see below)
                if verdict is Verdict.GAP:
                    await self._on_gap(ws, state)
            return None
        cls = type(message)
        if self._unsubscribing and self._left(getattr(message, "project_id", None), message):
            return None
        if cls in EVENT_TYPES:
            state = self._states.get(message.project_id)  # type: ignore[attr-defined]
            if state is None:
                return None  # unsubscribed meanwhile
            pending = state.pending
            verdict = await self._on_event(state, message, raw)  # type: ignore[arg-type]
            if pending and verdict is Verdict.DELIVER:
                # The replay answering the subscribe (its live events are dropped meanwhile,
                # and come whether or not the gateway handles the subscribe: not an answer;
                # nor are events we have: a gateway sending an old one again and again kept
                # the project waiting, silent, for ever).
                self._heard(state.project_id)
            if verdict is Verdict.GAP:
                await self._on_gap(ws, state)
            return None
        if (cls is Subscribed or cls is ResyncRequired) and not self._has_valid_cursor(message):
            return None
        if cls is Subscribed:
            state = self._states.get(message.project_id)  # type: ignore[attr-defined]
            if state is None:
                return None
            tag = self._tags_known(_given_tag(message.tag, message.seq))  # type: ignore[attr-defined]
            answering = state.pending  # (else a broken gateway's, answering nothing of ours)
            state.presence_due = state.asked_presence  # (its list, or its failure, follows)
            if state.presence_due:
                self._heard(state.project_id)  # (answered in part: the bound covers the rest)
            else:
                self._answered(state.project_id)
            outcome = state.on_subscribed(
                message.epoch,  # type: ignore[attr-defined]
                message.seq,  # type: ignore[attr-defined]
                message.resumed,  # type: ignore[attr-defined]
                tag,
            )
            # (with the flag, the presence read may still fail: that backoff is presence's own)
            if answering:
                # Only an answer to our subscribe starts the backoff (and its warnings) over: a
                # gateway sending `subscribed` and `unavailable` by turns, unasked, would have
                # each `unavailable` be a first failure, a warning each.
                self._unavailable.pop(state.project_id, None)
            self._cancel_retry(state.project_id)  # answered: nothing left to retry
            if outcome.resync is not None:
                log.info(
                    "resync required",
                    project_id=state.project_id,
                    reason=str(outcome.resync.reason),
                )
                await self._put(state.project_id, outcome.resync)
            if outcome.resubscribe:
                await self._send_subscribe(state)
            else:
                route = self._routes.get(state.project_id)
                if route is not None and state.delivers:
                    route.ready[state.project_id].set()
            return None
        if cls is ResyncRequired:
            state = self._states.get(message.project_id)  # type: ignore[attr-defined]
            if state is None:
                return None
            reason, epoch = message.reason, message.epoch  # type: ignore[attr-defined]
            tag = self._tags_known(_given_tag(message.tag, message.seq))  # type: ignore[attr-defined]
            self._heard(state.project_id)  # (its `subscribed` follows)
            if state.catching_up and reason == ResyncReason.TOO_FAR_BEHIND:
                return None  # the catch-up in progress covers it
            if state.at_top(reason, epoch, message.seq, tag):  # type: ignore[attr-defined]
                return None  # (its `subscribed` follows)
            if state.stands_at(reason, epoch, message.seq, tag):  # type: ignore[attr-defined]
                # A catch-up's page surfaced it already; the gateway had not read the
                # resubscribe from there yet (see ProjectState.stands_at).
                log.debug("resync at the cursor already surfaced", project_id=state.project_id)
                return None
            if self.catch_up and state.delivers and state.can_catch_up(reason, epoch):
                # Still in the history, only more than one replay carries: read it by pages.
                state.begin_catch_up()
                self.stats.catch_ups += 1
                fallback = Resync(state.project_id, reason, epoch, message.seq, tag)  # type: ignore[attr-defined]
                self._spawn(self._catch_up(state, state.generation, fallback))
                return None
            resync = state.on_resync(reason, epoch, message.seq, tag)  # type: ignore[attr-defined]
            log.info("resync required", project_id=state.project_id, reason=str(resync.reason))
            await self._put(state.project_id, resync)
            return None
        if cls is Error:
            await self._on_error(ws, message)  # type: ignore[arg-type]
            return None
        if cls is Unsubscribed:
            return None
        if cls in PRESENCE_TYPES:
            if cls is Presence:
                # The presence read answered: a later failure starts its backoff over (the
                # `subscribed` before a failed read does not: the retries would never back off).
                self._presence_unavailable.pop(message.project_id, None)  # type: ignore[attr-defined]
            self._on_presence(message)
            if cls is Presence:
                await self._presence_answered(ws, message.project_id)  # type: ignore[attr-defined]
            return None
        return message  # Authenticated, Pong

    def _unread_prefixes(self) -> tuple[bytes, ...]:
        """How the event frames of the projects read for presence only begin, for each event
        type this consumer knows, as the gateway relays them (the publisher's compact JSON: the
        tag, then the project): only a frame beginning so has its header read
        (:meth:`_on_unread_event`); every other goes straight to the full decode. A header
        read of every frame, the followed projects' too, cost a replay about 6% of its CPU per
        event (``bench.consumer --presence``). Such an event written otherwise (spaces: a
        foreign stream entry), or of a type this consumer does not know (whose decode stops at
        the tag), is placed and given to no one all the same. Past
        :data:`UNREAD_SEARCHES` such projects, ``b"{"``: every frame's header is read (one
        decode then costs less than the comparisons)."""
        projects = [
            project_id
            for project_id in self._presence
            if (state := self._states.get(project_id)) is not None and not state.delivers
        ]
        if len(projects) > UNREAD_SEARCHES:
            return (b"{",)
        return tuple(
            b'{"type":"%s","project_id":%d,' % (tag.encode(), project_id)
            for project_id in projects
            for tag in EVENT_TAGS
        )

    async def _on_unread_event(self, ws: ClientConnection, raw: bytes) -> bool:
        """An event of a project followed for its presence only (the protocol has no presence
        without events: ``docs/consumer.md``): ordered by its header alone, its body never
        decoded, nothing queued. Returns False for any other frame (decoded as usual)."""
        header = event_header(raw)
        if header is None:
            return False
        project_id, seq = header
        state = self._states.get(project_id)
        if state is None or state.delivers:
            return False
        if self._unsubscribing and self._left(project_id, None):
            return True
        pending = state.pending
        verdict = state.on_event(seq, frame=raw)
        if pending and verdict is Verdict.DELIVER:
            self._heard(project_id)  # (its subscribe's replay: see _on_frame)
        elif verdict is Verdict.GAP:
            await self._on_gap(ws, state)
        return True

    def _on_presence(self, message: Any) -> None:
        """A ``presence`` or ``presence_diff``: applied to the project's table, whose readers
        are woken when it changed. A project nobody reads the presence of any more (its
        resubscribe without the flag not read yet) has none."""
        route = self._presence.get(message.project_id)
        if route is None:
            return
        table = route.table
        refused = table.malformed
        if table.receive(message):
            route.notify()  # (also when it became unknown: a list past MAX_MEMBERS)
        if table.malformed != refused:
            self._malformed_presence(
                message.project_id, "a member or id the gateway never sends", counted=True
            )

    async def _presence_answered(self, ws: ClientConnection, project_id: int) -> None:
        """A ``presence`` list came (applied, refused, or not even decodable): the answer owed
        to the last subscribe with the flag (:attr:`ProjectState.presence_due`), after which the
        subscribe held meanwhile goes."""
        state = self._states.get(project_id)
        if state is None or not state.presence_due:
            return
        state.presence_due = False
        self._answered(project_id)
        if state.resubscribe_when_acknowledged and not state.pending:
            await self._send_subscribe(state)  # (the one held while the list was owed)

    def _malformed_presence(self, project_id: int, error: str, *, counted: bool = False) -> None:
        """A presence message refused (the table's list as it was): counted (in the project's
        table too, unless it ``counted`` it itself) and logged as a frame the gateway never
        sends."""
        route = self._presence.get(project_id)
        if route is not None and not counted:
            route.table.reject()
        self.stats.presence_malformed += 1
        self._ignored("ignored a malformed presence message", project_id=project_id, error=error)

    async def _on_event(
        self, state: ProjectState, event: ProjectEvent, raw: bytes, *, paged: bool = False
    ) -> Verdict:
        """Order one decoded event frame and queue it when it is the next one."""
        try:
            seq = event_seq(raw)
        except msgspec.DecodeError:
            # An event without its place in the order (no seq, or one no cursor can hold): the
            # gateway never sends one. It cannot be delivered in order; say so (the next event
            # shows whether one is missing).
            self._ignored("ignored an event frame without a valid seq", frame=raw[:200])
            return Verdict.DROP
        verdict = state.on_event(seq, paged=paged, frame=raw)
        if verdict is Verdict.CORRUPT:
            await self._surface_corrupt(state)
        if verdict is Verdict.DELIVER or verdict is Verdict.CORRUPT:
            project_id = state.project_id
            route = self._routes.get(project_id)
            if route is None or not state.delivers:
                # Followed for its presence only: the events go to no one (also while an
                # events() subscription of the project prepares its own state: the live
                # subscription's events are not the ones after that one's cursor).
                return verdict
            delivery = Delivery(project_id, state.cursor[0], seq, event, raw)  # type: ignore[index]
            self.stats.delivered += 1
            queue = route.queue
            try:
                queue.put_nowait(delivery)
            except asyncio.QueueFull:
                await self._wait_for_room(queue, delivery)
        elif verdict is Verdict.DUPLICATE:
            self.stats.duplicates += 1
        return verdict

    async def _on_undecodable(
        self, state: ProjectState, exc: FrameError, raw: bytes, *, paged: bool = False
    ) -> Verdict:
        """An event of a type this consumer does not know keeps its place in the order."""
        seq = exc.header[2]  # type: ignore[index]
        verdict = state.on_event(seq, paged=paged, frame=raw)
        if verdict is Verdict.CORRUPT:
            await self._surface_corrupt(state)
        if verdict is Verdict.DELIVER or verdict is Verdict.CORRUPT:
            epoch = state.cursor.epoch  # type: ignore[union-attr]
            item = UndecodableEvent(state.project_id, epoch, seq, raw, str(exc))
            await self._put(state.project_id, item)
        return verdict

    async def _on_gap(self, ws: ClientConnection, state: ProjectState) -> None:
        """An event frame (decoded or not) past a gap: resubscribe from the cursor."""
        self.stats.gaps += 1
        log.warning("gap in a project's events; resubscribing", project_id=state.project_id)
        await self._send_subscribe(state)

    async def _surface_corrupt(self, state: ProjectState) -> None:
        """A gap that repairs did not fill: its Resync, before the event after it."""
        resync = state.corrupt
        assert resync is not None
        log.warning(
            "events after a gap never came; surfacing a resync",
            project_id=state.project_id,
            seq=resync.seq,
        )
        await self._put(state.project_id, resync)

    async def _put(self, project_id: int, item: Any) -> None:
        route = self._routes.get(project_id)
        state = self._states.get(project_id)
        if route is not None and (state is None or state.delivers):
            if type(item) is Resync:
                self.stats.resyncs += 1
            await self._wait_for_room(route.queue, item)

    async def _wait_for_room(self, queue: BoundedQueue, item: Any) -> None:
        """Queue an item, waiting for the caller to make room. While the connection task waits,
        nothing is read: that time is the consumer's, not the gateway's (the reading clock)."""
        if queue.fits(item) or asyncio.current_task() is not self._task:
            await queue.put(item)  # (a catch-up's task waiting does not stop the reading)
            return
        self._clock.pause()
        try:
            await queue.put(item)
        finally:
            self._clock.resume()

    async def _on_error(self, ws: ClientConnection, error: Error) -> None:
        project_id = error.project_id
        state = self._states.get(project_id) if project_id is not None else None
        unavailable = error.code == ErrorCode.UNAVAILABLE and state is not None
        presence_due = state is not None and state.presence_due
        # The gateway ended the project's subscription itself (its metadata in Redis
        # unreadable), live or being made: it says so with `ended` (docs/protocol.md).
        ended = unavailable and error.ended
        # The gateway's read of presence for the subscribe answered last failed (its events
        # flow): no other subscribe went since (ProjectState.answer_due), so this answers that
        # one. A gateway from before `ended` sends the same error when it ends the subscription
        # in that moment: taken for presence's failure, whose retry subscribes it again too.
        presence_read = unavailable and not ended and presence_due
        # Ended while that answer was owed: the answer never comes (the read that finishes
        # later finds the project gone), and this answers no subscribe in flight (the gateway
        # handles the project's next frame after that read).
        cut_short = ended and presence_due
        if state is not None and state.pending != (presence_read or cut_short):
            # (the subscribe in flight, or the presence answer owed; an error answering neither,
            # a broken gateway's, must not lift the bound on that answer: the subscribe held
            # behind it would never go)
            self._answered(state.project_id)
        if error.code == ErrorCode.RATE_LIMITED:
            await self._on_rate_limited(error, state)
            return
        if unavailable and state is not None:
            presence = self._presence.get(state.project_id)
            if presence is not None and presence.table.forget():
                presence.notify()  # (no diffs come: unknown until the retry's `presence`)
            if presence_read:
                state.presence_due = False
                if state.pending:
                    # A subscribe is in flight (one sent before that one was answered, or on
                    # an older gateway): it asks for presence again while presence is read; a
                    # retry now would be a second in flight, whose answers could not be told
                    # apart.
                    return
                if state.resubscribe_when_acknowledged:
                    # One held while the answer was owed (a replay, a gap's repair, the reader
                    # closed): it goes now. Without the flag there is nothing to retry; with
                    # it, it is the retry (counted as one), not held for the retry's backoff:
                    # a failure of presence does not delay the events.
                    if state.project_id in self._presence:
                        self._cancel_retry(state.project_id)
                        self.stats.unavailable += 1
                        failures = self._presence_unavailable
                        failures[state.project_id] = failures.get(state.project_id, 0) + 1
                    await self._send_subscribe(state)
                    return
            elif cut_short:
                state.presence_due = False
                if state.pending:
                    return  # (its answer brings the project back, or its refusal's retry)
                # A subscribe held while the answer was owed goes as the retry, on its backoff.
            else:
                state.pending = False  # (answered: it failed, the gateway holds none)
            self._retry_unavailable(ws, state, presence=presence_read, ended=ended)
            return
        if error.code == ErrorCode.INVALID_TOKEN:
            # An in-band refresh was refused; the connection keeps its token until it expires
            # (then 4002 and a reconnect with a new one). Try again after a while, unless a
            # refresh is pending already: then this error answers no refresh of ours (a gateway
            # bug, or a hostile one), and a task and a token call for each would be a burst.
            if self._refresh is not None and not self._refresh.done():
                return
            log.warning("token refresh refused", message=error.message)
            self._refresh = self._spawn(self._refresh_later(ws, self._random() * self.policy.max))
            return
        if state is not None and (
            error.code == ErrorCode.FORBIDDEN
            or (state.pending and error.code != ErrorCode.NOT_SUBSCRIBED)
        ):
            # A refusal of the subscribe in flight; or `forbidden`, which the gateway also
            # sends unasked (a refreshed token that no longer allows the project, with its
            # `unsubscribed`). Any other error answers nothing of ours (`not_subscribed`
            # answers an unsubscribe, an activity): from a broken or hostile gateway, it ended
            # the project for good, its later events never delivered. Ignored, below.
            kind = Forbidden if error.code == ErrorCode.FORBIDDEN else GatewayError
            route = self._routes.get(project_id)  # type: ignore[arg-type]
            del self._states[project_id]  # type: ignore[arg-type]
            presence = self._presence.pop(project_id, None)  # type: ignore[arg-type]
            self._unread = None
            if presence is not None:
                presence.error = kind(error.code, error.message, project_id)
                presence.table.forget()
                presence.notify()
            if route is not None:
                del self._routes[project_id]  # type: ignore[arg-type]
                route.active.discard(project_id)  # type: ignore[arg-type]
                route.ready[project_id].set()  # type: ignore[index]
                await self._wait_for_room(route.queue, kind(error.code, error.message, project_id))
            return
        # An error naming no project we follow, or none, or answering no subscribe of it: it
        # answers nothing of ours.
        self._ignored(
            "gateway error",
            level="error",
            code=str(error.code),
            message=error.message[:200],
            project_id=project_id,
        )

    # --- catching up by pages -----------------------------------------------------------------

    async def _catch_up(self, state: ProjectState, generation: int, fallback: Resync) -> None:
        """Read the events after the cursor from the gateway's polling endpoint, page by page,
        then resubscribe from where the pages ended. If the pages cannot be read, surface the
        gateway's ``resync_required`` (``fallback``) after all: never silence."""
        project_id = state.project_id

        def current() -> bool:
            return self._states.get(project_id) is state and state.generation == generation

        # Whether the pages said more than "nothing new": a resync, or a gap (whose repairs are
        # counted, and end in a resync).
        start, answered = state.cursor, False
        try:
            for _page in range(100_000):
                cursor = state.cursor
                assert cursor is not None
                page = await self._poll_until_answered(project_id, cursor, current)
                if page is None or not current():
                    return
                if page.resync_required is not None:
                    resync = page.resync_required
                    checked_cursor((resync.epoch, resync.seq))  # else the fallback, below
                    tag = self._tags_known(_given_tag(resync.tag, resync.seq))
                    item = state.on_resync(resync.reason, resync.epoch, resync.seq, tag, paged=True)
                    await self._put(project_id, item)
                    answered = True
                    break
                more = page.more and bool(page.events)
                for raw in page.events:
                    frame = _page_frame(raw)
                    # The page speaks for this project only: an event naming another one (a
                    # broken gateway's) would take this project's place of its seq, and this
                    # project's own event of that seq be dropped as a duplicate. Skipped (as
                    # eventbus.js): the place it leaves is a gap, asked for again.
                    try:
                        event = decode_frame(frame)
                    except FrameError as exc:
                        if exc.header is None:
                            raise
                        if exc.header[1] != project_id:
                            continue
                        verdict = await self._on_undecodable(state, exc, frame, paged=True)
                    else:
                        if type(event) not in EVENT_TYPES:
                            raise FrameError(f"not an event: {frame[:80]!r}", None)
                        if event.project_id != project_id:  # type: ignore[attr-defined]
                            continue
                        verdict = await self._on_event(state, event, frame, paged=True)  # type: ignore[arg-type]
                    if not current():
                        return
                    if verdict not in (Verdict.DELIVER, Verdict.DUPLICATE, Verdict.CORRUPT):
                        # Out of order: the resubscribe after the pages repairs it (a gap's
                        # repairs are counted: they end in a resync).
                        answered = answered or verdict is Verdict.GAP
                        more = False
                        break
                else:
                    self._take_page_tag(state, page)
                # A page that moved nothing would be asked for again as it is (as eventbus.js).
                if not more or state.cursor == cursor:
                    break
            if state.cursor == start and not answered:
                # Nothing after the cursor, which the gateway says is too far behind: a
                # resubscribe would be answered so again, and these pages read again, for
                # ever. An answer that cannot be read: its resync, below.
                raise ValueError("the pages hold no event after the cursor")
            log.info("caught up by pages", project_id=project_id, cursor=state.cursor)
        except Exception as exc:
            if not current():
                return
            cursor = state.cursor
            if (
                cursor is not None
                and cursor.epoch == fallback.epoch
                and cursor.seq >= fallback.seq
                and not (cursor.seq == fallback.seq and tags_differ(cursor.tag, fallback.tag))
            ):
                # The pages went past the resync's top (events kept coming): nothing is missing
                # up to the cursor, and the resubscribe below continues from it exactly. The
                # resync would take the cursor back, and deliver those events again. Not at the
                # top itself when the resync named another event there (at_top refused it so:
                # a failover replaced the one the consumer has): that news is surfaced.
                log.warning(
                    "catch-up failed past the resync's top; resubscribing from the cursor",
                    project_id=project_id,
                    error=repr(exc),
                )
                return
            log.warning(
                "catch-up failed; surfacing the resync", project_id=project_id, error=repr(exc)
            )
            item = state.on_resync(fallback.reason, fallback.epoch, fallback.seq, fallback.tag)
            await self._put(project_id, item)
        finally:
            # The WebSocket's events were dropped meanwhile: resubscribe from the cursor (on the
            # current connection; a later one subscribes every project anyway).
            if self._states.get(project_id) is state:
                message = state.end_catch_up()
                if message is not None and self._subscribed_on is not None:
                    await self._send_subscribe(state)

    def _tags_known(self, tag: str | None) -> str | None:
        """A tag a gateway named (in a ``subscribed``, a ``resync_required``, a page): it knows
        tags, so pages carry them again after an old gateway refused one (as eventbus.js): a
        stable connection kept every later page unchecked for as long as it lasted, the fleet
        upgraded or not, and a failover that replaced the event at a page's cursor went unseen
        (the page went on after it). Returns ``tag``."""
        if tag is not None:
            self._untagged_pages = False
        return tag

    def _take_page_tag(self, state: ProjectState, page: PollResponse) -> None:
        """A page read whole: its ``tag`` (of the event at the cursor to poll with next) for a
        cursor that has none, when the page ends at the cursor (no events: at ``seq``). The
        cursor of an event the page brought has the tag of its own frame."""
        tag = self._tags_known(_given_tag(page.tag, page.seq))
        cursor = state.cursor
        if cursor is None or page.events or cursor.tag is not None:
            return
        if tag is not None and cursor == (page.epoch, page.seq):
            state.cursor = Cursor(cursor.epoch, cursor.seq, tag)

    async def _poll_until_answered(
        self, project_id: int, cursor: Cursor, current: Callable[[], bool]
    ) -> PollResponse | None:
        """:meth:`_poll`, asked again for as long as the gateway answers 503 (it drains, it is
        full, or Redis is away: a load balancer sends the next request to another pod), after
        the answer's ``Retry-After`` or the next backoff delay, whichever is longer (at most the
        policy's ``max``): the cursor stays, nothing is surfaced. None when the catch-up became
        obsolete meanwhile (a resync, an unfollow). Any other failure raises."""
        backoff = Backoff(self.policy, self._random)
        while True:
            try:
                return await self._poll(project_id, cursor)
            except PageUnavailable as exc:
                if not current():
                    return None
                delay = backoff.next()
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, self.policy.max))
                self.stats.page_retries += 1
                if backoff.attempt % 10 == 1:  # once, then every tenth: a long outage logs little
                    log.warning(
                        "catch-up page refused; asking again",
                        project_id=project_id,
                        error=exc.error or None,
                        retry_in=round(delay, 3),
                        attempts=backoff.attempt,
                    )
                await asyncio.sleep(delay)
                if not current():
                    return None

    async def _poll(self, project_id: int, cursor: Cursor) -> PollResponse:
        """One page of ``GET /v1/projects/{id}/events`` after ``cursor`` (with its ``tag`` when
        it has one), read within ``open_timeout`` (TimeoutError after it).

        A gateway from before cursor tags refuses a query parameter it does not know (400
        ``invalid_query``): a page asked for with a tag and answered 400 is asked once more
        without it (unchecked, as that gateway would have it), and later pages are asked for
        without tags until a gateway names a tag (:meth:`_tags_known`: a ``subscribed``, a
        ``resync_required``, a page), or the next connection (else, behind a load balancer of
        old gateways, each page was asked for twice). Any other 400 is answered so again, and
        raises then. A 401 (the token expired or was revoked since it was taken) is asked once
        more with the token function's next token, when there is a token function (as
        eventbus.js does); a second 401 raises."""
        base = self.http_url or _http_url(self._current_url)
        params: dict[str, object] = {"epoch": cursor[0], "after": cursor[1], "limit": POLL_PAGE}
        tag = cursor.tag if isinstance(cursor, Cursor) and not self._untagged_pages else None
        if tag is not None:
            url = f"{base}/v1/projects/{project_id}/events?{urlencode({**params, 'tag': tag})}"
            try:
                return _poll_decoder.decode(await self._read_page(url))
            except urllib.error.HTTPError as exc:
                if exc.code != 400:
                    raise
                self._untagged_pages = True
                log.warning(
                    "a catch-up page with a cursor tag was refused (a gateway before tags?); "
                    "asking for pages without tags until a gateway names one",
                    project_id=project_id,
                )
        url = f"{base}/v1/projects/{project_id}/events?{urlencode(params)}"
        return _poll_decoder.decode(await self._read_page(url))

    async def _read_page(self, url: str) -> bytes:
        """The body of the page at ``url``, asked with the current token, and once more with a
        fresh one after a 401 (the connection's token expired meanwhile: a gateway refuses a
        page once its ``exp`` has passed)."""
        try:
            return await read_page(url, await self._get_token(renew=False), self._poll_timeout)
        except urllib.error.HTTPError as exc:
            if exc.code != 401 or not callable(self._token_source):
                raise
        return await read_page(url, await self._get_token(renew=True), self._poll_timeout)

    def _retry_unavailable(
        self, ws: ClientConnection, state: ProjectState, *, presence: bool, ended: bool
    ) -> None:
        """Subscribe the project again later, after ``unavailable``: with backoff (Redis may stay
        away a while), logged when it starts and then every tenth attempt. ``presence``: its
        presence read failed (the subscription stands), on presence's backoff; else a subscribe
        was refused or (``ended``) the gateway ended the subscription, on the subscribe's.

        One retry per project at a time: more such errors while it sleeps answer no subscribe
        of ours (a gateway bug, or a hostile one) and would each have started a task and, when
        it woke, a subscribe. But a subscription ended while presence's retry sleeps is not
        left waiting for it: the subscribe's retry replaces it."""
        project_id = state.project_id
        retry = self._retries.get(project_id)
        if retry is not None and not retry.done():
            if not (ended and project_id in self._presence_retries):
                return
            self._cancel_retry(project_id)
        self.stats.unavailable += 1
        counts = self._presence_unavailable if presence else self._unavailable
        attempts = counts.get(project_id, 0)
        counts[project_id] = attempts + 1
        if attempts % 10 == 0:
            if presence:
                what = "presence unavailable; retrying"
            elif ended:
                what = "subscription ended by the gateway; subscribing again"
            else:
                what = "subscribe unavailable; retrying"
            log.warning(what, project_id=project_id, attempts=attempts + 1)
        delay = self._random() * self._backoff.cap(attempts)
        self._retries[project_id] = self._spawn(self._resubscribe_later(ws, state, delay))
        if presence:
            self._presence_retries.add(project_id)
        else:
            self._presence_retries.discard(project_id)

    async def _resubscribe_later(self, ws: ClientConnection, state: ProjectState, delay: float):
        await asyncio.sleep(delay)
        if self._retries.get(state.project_id) is asyncio.current_task():
            del self._retries[state.project_id]  # awake: the next 'unavailable' may retry again
            self._presence_retries.discard(state.project_id)
        if self._ws is ws and not state.pending:
            # (one sent meanwhile, a gap's repair say, is in flight: it is the retry, its
            # answer either cancels this or fails again)
            await self._send_subscribe(state)

    # --- pacing after rate_limited ---------------------------------------------------------------

    async def _on_rate_limited(self, error: Error, state: ProjectState | None) -> None:
        """``error`` ``rate_limited``: the frame was not executed. A subscribe of a followed
        project (the only frame of ours naming a project that the gateway refuses: it executes
        every unsubscribe), or without a project our token refresh while it awaits its
        ``authenticated``, is held and sent again when the connection's pacing allows
        (:class:`~consumer.policy.FramePacer`: from the gateway's ``retry_after_ms``, one after
        the other, spaced), with every subscribe sent after it. A subscribe of a project
        unfollowed since needs nothing."""
        refresh = self._refresh
        if state is None and (
            error.project_id is not None or refresh is None or not refresh.done()
        ):
            return
        self.stats.rate_limited += 1
        first = self._pacer.held == 0
        self._pacer.refused(self._now(), error.retry_after_ms)
        if state is not None:
            if first:  # once when refusals start, not once per project
                log.warning(
                    "subscribe rate limited; retrying",
                    project_id=state.project_id,
                    retry_after_ms=error.retry_after_ms,
                    message=error.message,
                )
            await self._send_subscribe(state)
            return
        log.warning("token refresh rate limited; retrying", message=error.message)
        await self._send_paced("auth", self._refresh_message)

    def _refresh_message(self) -> dict[str, object] | None:
        token = self._token
        return None if token is None else {"type": "auth", "token": token[0]}

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def _send_subscribe(self, state: ProjectState) -> None:
        """Subscribe ``state``'s project on the current connection, now or (paced) later: the
        frame is made when it goes out, from the cursor of then."""

        def message() -> dict[str, object] | None:
            if self._states.get(state.project_id) is not state or state.catching_up:
                return None  # unfollowed since, or its catch-up subscribes when it ends
            if state.presence_due and not state.pending:
                # The last one's presence answer is owed: this one goes when it comes
                # (ProjectState.answer_due).
                state.resubscribe_when_acknowledged = True
                return None
            return self._subscribe_message(state)

        await self._send_paced(state.project_id, message)

    async def _send_paced(
        self, key: object, message: Callable[[], dict[str, object] | None]
    ) -> None:
        """A frame the gateway's rate limit may refuse, made by ``message()`` (None: nothing to
        send any more): sent now, or held under ``key`` while refused frames wait."""
        ws = self._subscribed_on
        if ws is None:
            return  # not subscribed on a connection yet: it subscribes every project
        if self._pacer.may_send_now(self._now()):
            frame = message()
            if frame is not None:
                await self._send(ws, frame)  # (a failure is logged, the connection dropped)
            return
        self._pacer.hold(key, message)
        if self._pacing is None or self._pacing.done():
            self._pacing = self._spawn(self._send_held(ws))

    async def _send_held(self, ws: ClientConnection) -> None:
        """The held frames of ``ws``, each when the pacing allows (those with nothing left to
        send are skipped), until none is held."""
        pacer = self._pacer
        while self._subscribed_on is ws:
            due = pacer.due_at()
            if due is None:
                return
            wait = due - self._now()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            message = pacer.next(self._now())
            frame = message() if message is not None else None
            if frame is not None:
                pacer.resent(self._now())
                if await self._send(ws, frame) is not None:
                    return  # dropped: what is held is sent on the next connection, or moot

    def _cancel_retry(self, project_id: int) -> None:
        self._presence_retries.discard(project_id)
        retry = self._retries.pop(project_id, None)
        if retry is not None:
            retry.cancel()

    # --- the bound on a subscribe's answer --------------------------------------------------------

    def _subscribe_message(self, state: ProjectState) -> dict[str, object]:
        """The project's subscribe frame, for a send now on the current connection."""
        message = state.subscribe_message()
        state.asked_presence = state.project_id in self._presence
        if state.asked_presence:
            message["presence"] = True
        self._asking(state.project_id)
        return message

    def _asking(self, project_id: int) -> None:
        """A subscribe of the project goes out now: its answer is due (:meth:`_check_answers`)."""
        self._answers.asking(project_id, self._clock.now())
        if self._answer_timer is None and self._subscribed_on is not None:
            loop = asyncio.get_running_loop()
            self._answer_timer = loop.call_later(
                self._open_timeout, self._check_answers, self._subscribed_on
            )

    def _heard(self, project_id: int) -> None:
        """A frame answering the project's subscribe in part (its replay, a resync_required):
        every replayed event, so the clock is read only when the project is waiting."""
        answers = self._answers
        if project_id in answers:
            answers.heard(project_id, self._clock.now())

    def _answered(self, project_id: int) -> None:
        """The project's subscribe is answered (``subscribed``, an error)."""
        self._answers.answered(project_id, self._clock.now())

    def _check_answers(self, ws: ClientConnection) -> None:
        """The timer of the bound on a subscribe's answer (:mod:`consumer.answers`). When it has
        passed, the consumer gives the connection up (warning) and connects again with backoff,
        resuming every project from its cursor: a stuck handler holds every later message of the
        connection, so a subscribe sent again on it would wait behind the stuck one.

        The timer is lazy: pushing the bound back is a store, and the timer, when it fires,
        checks the bounds and sets itself for the earliest.
        """
        self._answer_timer = None
        if self._subscribed_on is not ws or self._given_up is ws:
            return
        now = self._clock.now()

        def waiting(project_id: int) -> bool:
            state = self._states.get(project_id)
            return state is not None and state.answer_due

        overdue, earliest = self._answers.overdue(now, waiting)
        if overdue is not None:
            log.warning(
                "no answer to a subscribe; reconnecting",
                project_id=overdue,
                timeout=self._open_timeout,
            )
            self._given_up = ws
            self._spawn(_close(ws))
            return
        if earliest != float("inf"):
            # While the connection task waits for a caller the reading clock stands still:
            # look again later rather than every few milliseconds.
            delay = self._open_timeout if self._clock.paused else earliest - now
            self._answer_timer = asyncio.get_running_loop().call_later(
                delay, self._check_answers, ws
            )

    # --- tokens ----------------------------------------------------------------------------------

    async def _get_token(self, *, renew: bool) -> str | None:
        source = self._token_source
        if source is None or isinstance(source, str):
            return source
        if not renew and self._token is not None:
            return self._token[0]
        value = source()
        if inspect.isawaitable(value):
            # A token endpoint that never answers must not hold the connection task (no
            # connection, no retry, no word) for ever.
            value = await self._bounded(value, "the token function")
        if not isinstance(value, str) or not value:
            raise TypeError("the token function returned no token")
        if not _sendable_token(value):
            # (Not the encoder's error: its message holds the token.)
            raise ValueError("the token function returned a token that is not UTF-8")
        self._token = (value, time.monotonic())
        return value

    def _schedule_refresh(
        self, ws: ClientConnection, message: Authenticated
    ) -> asyncio.Future[None] | None:
        """The next in-band refresh of ``ws``'s token, after ``message``: a helper task (the
        caller keeps it in ``_refresh``; the connection's end cancels it), or None when there is
        none to make (a fixed token, an unknown lifetime)."""
        if not callable(self._token_source) or self._token is None:
            return None  # a fixed token cannot be renewed
        token, obtained_at = self._token
        claims = decode_token_claims(token) or {}
        now = time.monotonic()
        # An int of any size to the decoder: one no token can carry (above MAX_EXP, or before
        # 1970) is not used (as a float, 400 digits raised OverflowError: a stopped consumer).
        expires_at = message.expires_at
        if expires_at is not None:
            expires_at = now + (expires_at - time.time()) if 0 <= expires_at <= MAX_EXP else None
        delay = refresh_delay(
            iat=claims.get("iat"),
            exp=claims.get("exp"),
            obtained_at=obtained_at,
            now=now,
            expires_at=expires_at,
        )
        if delay is None:
            return None
        # A helper like any other (as the retry after `invalid_token` is): an exception out of
        # it, which is never the token function's (those are retried below), is a bug of ours
        # and stops the consumer (_helper_done), loudly. Not a reconnect, as a failed send gets
        # (_send): that heals a connection in a state nobody knows, while this bug would break
        # every connection's refresh again, each one ending at the token's expiry (4002). In a
        # task nobody watched, it went unheard while exactly that happened.
        return self._spawn(self._refresh_later(ws, delay))

    async def _refresh_later(self, ws: ClientConnection, delay: float) -> None:
        """After ``delay``, send a fresh token on ``ws`` (while it is the consumer's), calling
        the token function again with backoff while it fails. Runs as a helper (:meth:`_spawn`):
        any other exception stops the consumer."""
        await asyncio.sleep(delay)
        backoff = Backoff(ReconnectPolicy(initial=1.0, max=10.0), self._random)
        while self._ws is ws:
            try:
                token = await self._get_token(renew=True)
            except Exception as exc:
                # If the token expires meanwhile the gateway closes with 4002 and we reconnect.
                log.warning("token refresh failed", error=repr(exc))
                await asyncio.sleep(backoff.next())
                continue
            if self._subscribed_on is ws:
                # On the connection's pacing: while refused subscribes are held, a refresh sent
                # at once would be refused too (a strike towards 4029).
                await self._send_paced("auth", lambda token=token: {"type": "auth", "token": token})
            return  # answered by `authenticated`, which schedules the next refresh
