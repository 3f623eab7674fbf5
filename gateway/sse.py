"""Server-Sent Events: the live fallback when a WebSocket cannot connect.

``GET /v1/projects/{id}/stream`` (one project) or ``GET /v1/stream?project=1&project=2`` (several)
on the gateway's port answers ``text/event-stream`` carrying exactly what a WebSocket client gets
(see docs/protocol.md, "Server-Sent Events"):

* an event is the default ``message`` event, ``data`` the event's JSON frame, ``id`` the cursor
  after it: ``<epoch>:<seq>:<tag>`` (the tag of the event, schemas.tags), or for a stream of
  several projects the cursor of every project, ``1=<epoch>:<seq>:<tag>,2=...``; a
  ``Last-Event-ID`` header of either form (with or without the tags) resumes exactly;
* control messages are named events (``subscribed``, ``resync_required``, ``error``,
  ``authenticated``, ...) with the same JSON; ``subscribed`` and ``resync_required`` carry the
  cursor as their ``id`` too;
* the stream's last event is ``close``, ``{"type":"close","code":<the WebSocket close code>,
  "reason":...}`` (1012 draining, 4002 token expired and 4003 token revoked (each after an
  ``error``), 4008 slow consumer, 1011 a subscription failed), when the gateway gets to write
  it;
* a project whose subscription is refused or ended (``error`` ``unavailable`` naming it, with
  ``"ended": true`` when the hub ended it: Redis did not answer, or the project's keys hold
  garbage) ends the stream (1011), unless the request says ``?partial=1``: then the others go
  on, and the failed project's last cursor stays in every later ``id``, so a stream reopened
  from any of them resumes it exactly (the client polls it meanwhile, and reopens the stream
  to try it live again); only when no project is left subscribed does such a stream end
  (1011). Opt-in, so that a client which does not poll the failed project (an older
  eventbus.js, a bare ``EventSource``) is never left silent on it;
* a comment line every ``--sse-keepalive-interval`` (15 s) keeps proxies from closing the stream;
  what the peer leaves unacknowledged for ``--ping-timeout`` ends it (``TCP_USER_TIMEOUT``: a
  peer that vanished without a FIN or RST is not held for the kernel's ~15 minutes).

The pure part (formatting, parsing, cursors, the request path) is tested without sockets; the
I/O part takes the TCP connection over from the WebSocket transport before it answers the
request (see :class:`gateway.websocket.WebSocketConnection` and docs/architecture.md), then
drives the same :class:`gateway.clients.ClientProtocol` and the same write path
(:class:`gateway.session.ClientSession`) as a WebSocket.
"""

from __future__ import annotations

import asyncio
import bisect
import re
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs

import msgspec
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from gateway.client_input import parse_project_id, repeated_header
from gateway.http import answer_to, cors_headers, json_response, tokens_unchecked_response
from gateway.lanes import CONCURRENCY
from gateway.logs import ConnectionLog, get_logger, peer_of
from gateway.revocations import RevocationsUnknown
from gateway.session import (
    Admission,
    ClientSession,
    Outgoing,
    SlowConsumerPolicy,
    bound_unacknowledged,
    release_transport,
)
from gateway.tasks import spawn
from schemas.protocol import MAX_SEQ, CloseCode
from schemas.tags import is_tag
from schemas.tokens import InvalidToken

if TYPE_CHECKING:
    from collections.abc import Callable

    from gateway.server import Gateway

__all__ = [
    "CLOSE_TIMEOUT",
    "Cursor",
    "SseEvent",
    "SseParser",
    "SseSession",
    "StreamRequest",
    "comment",
    "data_lines",
    "format_cursor",
    "format_event",
    "parse_last_event_id",
    "parse_stream_target",
]

log = get_logger("gateway")

_SINGLE_PATH = re.compile(r"^/v1/projects/([^/]+)/stream$")
_MULTI_PATH = "/v1/stream"
_EPOCH = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SEQ = re.compile(r"0|[1-9][0-9]{0,15}")
#: Any of the three line ends SSE knows (CRLF first, so it counts as one).
_LINE_END = re.compile(rb"\r\n|\r|\n")
#: CR and LF as tabs (bytes.translate): the same JSON whitespace between tokens, and, as they
#: are, a raw control character inside a string (not JSON). Not spaces: a string holding a raw
#: line break (a foreign frame, no JSON) became a valid string with a space, another value that
#: an SSE client applied where a WebSocket client refuses the frame.
_TABS = bytes.maketrans(b"\r\n", b"\t\t")

#: Sent first on every stream: how long EventSource-style clients wait before reconnecting (ms).
RETRY_MS = 1000
#: A keepalive: an SSE comment line, ignored by every parser, and an empty line.
KEEPALIVE = b":\n\n"


class Cursor(NamedTuple):
    epoch: str
    seq: int
    #: The tag of the event at ``seq`` (schemas.tags), when known.
    tag: str | None = None


# --- pure: formatting ------------------------------------------------------------------------


def data_lines(payload: bytes) -> bytes:
    """``payload`` as ``data:`` lines, so that no byte of it can end a field early or start
    another one: one line, or, when it holds line breaks (CR, LF, CRLF: only a foreign frame
    does, the bus's are compact JSON), two, cut at the first one, every later CR or LF turned
    into a tab. A parser joins them back with ``\\n``: other bytes (a client takes such an
    event's tag from its ``id``, not from the data), but JSON exactly when the frame is, and
    then the same value: between tokens LF and tab are whitespace, inside a string both are
    raw control characters, which no JSON decoder takes (a space there would be).

    Two lines, not one per line break: a frame of a megabyte of line breaks written to Redis by
    hand took 7 MB on every stream (a ``data:`` line each) and ~0.3 s to build, per stream of
    several projects (their ``id`` differs, so each builds its own bytes)."""
    if b"\n" not in payload and b"\r" not in payload:
        return b"data: " + payload + b"\n"
    first = _LINE_END.search(payload)
    assert first is not None
    rest = payload[first.end() :].translate(_TABS)
    return b"data: " + payload[: first.start()] + b"\ndata: " + rest + b"\n"


def format_event(payload: bytes, *, event: str | None = None, event_id: str | None = None) -> bytes:
    """One SSE event: optional ``event:`` and ``id:`` lines, the data, an empty line.

    ``event`` and ``event_id`` are ours (a message type, a cursor: no line breaks, no NUL).
    """
    head = b""
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    if event_id is not None:
        head += b"id: " + event_id.encode() + b"\n"
    return head + data_lines(payload) + b"\n"


def comment(text: str = "") -> bytes:
    """A comment line (ignored by parsers), e.g. a keepalive."""
    return b":" + _LINE_END.sub(b" ", text.encode()) + b"\n\n"


def _cursor_text(cursor: Cursor) -> str:
    if cursor.tag is None:
        return f"{cursor.epoch}:{cursor.seq}"
    return f"{cursor.epoch}:{cursor.seq}:{cursor.tag}"


def format_cursor(cursors: dict[int, Cursor], multi: bool) -> str:
    """The ``id`` of an event: ``<epoch>:<seq>:<tag>``, or ``<project>=<epoch>:<seq>:<tag>,...``
    (sorted by project) for a stream of several projects; without ``:<tag>`` when the tag of
    the event at the cursor is not known."""
    if not multi:
        (cursor,) = cursors.values()
        return _cursor_text(cursor)
    return ",".join(f"{p}={_cursor_text(c)}" for p, c in sorted(cursors.items()))


def _parse_cursor(text: str) -> Cursor:
    parts = text.split(":")
    epoch, seq, tag = parts[0], parts[1] if len(parts) > 1 else "", None
    if len(parts) == 3:
        tag = parts[2] if is_tag(parts[2]) else ""
    # The seq within the protocol's bound, as a WebSocket subscribe's ``after`` and a poll's.
    if (
        not 2 <= len(parts) <= 3
        or tag == ""
        or not _EPOCH.fullmatch(epoch)
        or not _SEQ.fullmatch(seq)
        or int(seq) > MAX_SEQ
    ):
        raise ValueError(
            f"{text[:80]!r} is not a cursor <epoch>:<seq> or <epoch>:<seq>:<tag> "
            f"(seq at most {MAX_SEQ}, tag 16 hex digits)"
        )
    return Cursor(epoch, int(seq), tag)


def parse_last_event_id(value: str | None, projects: list[int]) -> dict[int, Cursor]:
    """The cursors a ``Last-Event-ID`` names for the stream's ``projects``.

    ``<epoch>:<seq>`` applies to a stream of one project; ``<project>=<epoch>:<seq>,...`` to any
    stream (projects it names that the stream does not follow are ignored; projects it does not
    name start from now). Empty or absent: no cursor. Anything else raises ``ValueError``.
    """
    if not value:
        return {}
    if "=" not in value:
        if len(projects) != 1:
            raise ValueError("a stream of several projects resumes from <project>=<epoch>:<seq>,…")
        return {projects[0]: _parse_cursor(value)}
    cursors: dict[int, Cursor] = {}
    wanted = set(projects)
    parts = value.split(",")
    if len(parts) > 1000:
        raise ValueError("too many cursors")
    for part in parts:
        raw_id, _, cursor = part.partition("=")
        project_id = parse_project_id(raw_id, f"{raw_id[:20]!r} is not a project id")
        if project_id in cursors:
            raise ValueError(f"project {project_id} is given twice")
        parsed = _parse_cursor(cursor)
        if project_id in wanted:
            cursors[project_id] = parsed
    return cursors


class StreamRequest(NamedTuple):
    """What a stream request asks for: its projects, in order, whether the stream is the
    several-project kind (compound cursors), whether it wants presence messages
    (``?presence=1``: ``presence`` and ``presence_diff`` events, docs/presence.md), and
    whether it goes on for its other projects when one's subscription fails (``?partial=1``:
    a client that polls that project itself; without it the stream ends at the first
    failure, as it always has, so that a client unaware of it is never left silent)."""

    projects: list[int]
    multi: bool
    presence: bool = False
    partial: bool = False


def is_stream_target(target: str) -> bool:
    path = target.partition("?")[0]
    return path == _MULTI_PATH or _SINGLE_PATH.match(path) is not None


def parse_stream_target(target: str, max_projects: int) -> StreamRequest:
    """The projects of ``/v1/projects/{id}/stream`` or ``/v1/stream?project=1&project=2``;
    ``ValueError`` with a message for the client otherwise."""
    path, _, query = target.partition("?")
    query = query.partition("#")[0]
    match = _SINGLE_PATH.match(path)
    # Read no further than the most a stream may ask for (its projects, presence, partial, one
    # spare): thousands of ids cost nothing, and get the limit, not parse_qs's own message.
    if query.count("&") + 1 > max_projects + 3:
        raise ValueError(
            f"at most {max_projects} projects per stream (a query of at most "
            f"{max_projects + 3} parameters)"
        )
    params = parse_qs(query, keep_blank_values=True)
    allowed = {"presence", "partial"} if match else {"project", "presence", "partial"}
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"unknown query parameters: {', '.join(sorted(unknown))[:200]}")
    presence = _flag(params.get("presence", []), "presence")
    partial = _flag(params.get("partial", []), "partial")
    if match:
        return StreamRequest([parse_project_id(match.group(1))], False, presence, partial)
    raw = params.get("project", [])
    if not raw:
        raise ValueError("name the projects: /v1/stream?project=1&project=2")
    projects = list(dict.fromkeys(parse_project_id(value) for value in raw))
    if len(projects) > max_projects:
        raise ValueError(f"at most {max_projects} projects per stream")
    return StreamRequest(projects, True, presence, partial)


def _flag(values: list[str], name: str) -> bool:
    if not values:
        return False
    if len(values) > 1 or values[0] not in ("0", "1", "true", "false"):
        raise ValueError(f"{name} takes one of 1, true, 0, false")
    return values[0] in ("1", "true")


def _log_refusal(gateway: Gateway, status: int, code: str, message: str, peer: str | None) -> None:
    """A stream refused 401/403 for its token: "stream refused" at info (the client's mistake),
    throttled per ``code`` as a refused poll or handshake (its 400s are logged as "bad
    request" by ``Gateway.bad_request``)."""
    gateway.client_log(
        "stream refused",
        kind=f"stream_{code}",
        error=code,
        reason=message[:200],
        status=status,
        peer=peer,
    )


# --- pure: parsing (tests, benchmarks, non-browser clients) ----------------------------------


class SseEvent(NamedTuple):
    event: str  # "message" when the stream names none
    data: str
    id: str | None  # the last event id in force after this event (None: never set)


class SseParser:
    """The WHATWG event-stream parsing algorithm, fed bytes as they come.

    Lines end at CRLF, CR or LF; ``field: value`` (one space after the colon dropped); ``data``
    lines are joined with ``\\n``; an empty line dispatches an event (none when there is no
    data); comments (a leading colon) and unknown fields are ignored; an ``id`` containing NUL
    is ignored. ``comments`` counts comment lines (keepalives).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self.last_id: str | None = None
        self.comments = 0
        self.retry: int | None = None
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        events: list[SseEvent] = []
        buffer = self._buffer + chunk
        start = 0
        while True:
            if self._skip_lf and start < len(buffer):
                if buffer[start : start + 1] == b"\n":
                    start += 1
                self._skip_lf = False
            match = re.compile(rb"\r|\n").search(buffer, start)
            if match is None:
                break
            line = buffer[start : match.start()]
            if match.group() == b"\r":
                if match.end() == len(buffer):
                    self._skip_lf = True  # a CRLF may be split between chunks
                elif buffer[match.end() : match.end() + 1] == b"\n":
                    start = match.end() + 1
                    self._line(line.decode("utf-8", "replace"), events)
                    continue
            start = match.end()
            self._line(line.decode("utf-8", "replace"), events)
        self._buffer = buffer[start:]
        return events

    def _line(self, line: str, events: list[SseEvent]) -> None:
        if not line:
            if self._data:
                events.append(
                    SseEvent(self._event or "message", "\n".join(self._data), self.last_id)
                )
            self._data = []
            self._event = ""
            return
        if line.startswith(":"):
            self.comments += 1
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)


# --- I/O: the session and the connection -----------------------------------------------------


class _JoinCache:
    """The last (items list -> bytes) a single-project stream built, for the next subscriber.

    The hub writes the same ``items`` list object to every live subscriber of a feed in turn;
    their cursors before it are the same (they have seen the same events), so the bytes are
    too. The cache holds a reference to ``items``, so the identity test cannot match a new list
    at a recycled address.
    """

    __slots__ = ("after", "before", "data", "items")

    def __init__(self) -> None:
        self.items: list[Outgoing] | None = None
        self.before: Cursor | None = None
        self.after: Cursor | None = None
        self.data = b""


_cache = _JoinCache()


class _Head(msgspec.Struct):
    project_id: int = 0


_head_decoder = msgspec.json.Decoder(_Head)


def _project_of(item: Outgoing, cursors: dict[int, Cursor]) -> int:
    """The project of an event ``item`` of a several-project stream, read from its frame once
    per event (the item is shared by every subscriber) when the hub did not say; 0 if unknown."""
    try:
        project_id = _head_decoder.decode(item.payload).project_id
    except (msgspec.DecodeError, RecursionError):
        project_id = 0
    item.project_id = project_id
    return project_id


#: Seconds a stream the gateway closed has to send what it still holds (the ``close`` event
#: last) before it is aborted: a client that stopped reading cannot hold the socket longer.
CLOSE_TIMEOUT = 5.0

#: Closes caused by the stream's token: an ``error`` event (``invalid_token``) precedes the
#: ``close``, with this message.
_TOKEN_CLOSES = {CloseCode.TOKEN_EXPIRED: "token expired", CloseCode.TOKEN_REVOKED: "token revoked"}


class SseSession(ClientSession):
    """A :class:`ClientSession` on an SSE stream: bytes built from ``items`` (not the WebSocket
    frames the hub joined), the cursor of each project kept for the events' ``id``."""

    __slots__ = (
        "cursor",
        "cursors",
        "failed",
        "multi",
        "order",
        "parts",
        "replays",
        "single",
        "width",
    )

    transport_name = "sse"

    def __init__(
        self,
        transport: asyncio.Transport,
        policy: SlowConsumerPolicy,
        schedule_flush: Callable[[ClientSession], None],
        *,
        multi: bool,
        cursors: dict[int, Cursor],
        project_id: int = 0,
        width: int = 1,
    ) -> None:
        super().__init__(transport, policy, schedule_flush)
        self.multi = multi
        #: How many of its projects' subscriptions may fail (refused or ended:
        #: :meth:`subscription_failed`) before the stream ends: every project it follows with
        #: ``?partial=1``, else 1. And those that failed.
        self.width = width
        self.failed: set[int] = set()
        #: Per project, the cursor of the last event or control message written: the ``id``.
        self.cursors = dict(cursors)
        #: A single-project stream's project (0 for several), and its cursor (the same object
        #: as in ``cursors``; identical across streams that took the same bytes from the cache).
        self.single = 0 if multi else project_id
        self.cursor: Cursor | None = self.cursors.get(self.single) if self.single else None
        #: A stream of several projects: each project's part of the ``id``
        #: (``<project>=<cursor>``), made when its cursor moves, and the projects in order. The
        #: ``id`` of every event names every project (~4 KB for 100): formatted and sorted whole
        #: for each event, an event cost a stream of 100 projects ~39 us to encode, ~9 us with
        #: the id joined from the parts (timeit, a shared 2-core machine).
        self.parts = {p: f"{p}={_cursor_text(c)}" for p, c in self.cursors.items()} if multi else {}
        self.order = sorted(self.parts)
        #: Where the replays queued since the last flush are in ``outbox`` (start, stop).
        self.replays: list[tuple[int, int]] = []

    def is_open(self) -> bool:
        return not self.closing and not self.transport.is_closing()

    def send_replay(self, items: list[Outgoing], wire: bytes) -> None:
        """:meth:`ClientSession.send_replay`, with the allowance granted in this stream's bytes,
        once they are built (:meth:`flush`): an event takes more of them than its WebSocket
        frame (its ``data:`` and ``id:`` lines; on a stream of several projects, every
        project's cursor in each ``id``), and a resume read slowly was cut as a slow consumer
        when only ``wire`` was tolerated."""
        if not items:
            return
        start = len(self.outbox)
        ClientSession.send_replay(self, items, b"")
        if not self.closing:
            self.replays.append((start, start + len(items)))

    def flush(self) -> bool:
        outbox = self.outbox
        replays, self.replays = self.replays, []
        if not outbox:
            return True
        self.outbox = []
        if not replays:
            return self.write(b"", outbox)
        # The replays' bytes (encoded on their own, in order with the rest) are their allowance.
        parts = []
        done = 0
        for start, stop in replays:
            if stop > len(outbox):
                break  # (not expected: the outbox was cleared meanwhile, by an abort)
            if start > done:
                parts.append(self._encode(outbox[done:start]))
            data = self._encode(outbox[start:stop])
            self.allowance_granted += len(data)
            parts.append(data)
            done = stop
        if done < len(outbox):
            parts.append(self._encode(outbox[done:]))
        if self.single:
            self.cursor = self.cursors.get(self.single)
        return ClientSession.write(self, b"".join(parts), outbox)

    def write(self, wire: bytes, items: list[Outgoing]) -> bool:
        """Write ``items`` as SSE events (``wire``, their WebSocket frames, is not used)."""
        cache = _cache
        cursor = self.cursor
        if items is cache.items and cursor is cache.before and cursor is not None:
            # The hub's next live subscriber of the same feed: the bytes the previous one got.
            after = self.cursor = cache.after
            self.cursors[self.single] = after
            return ClientSession.write(self, cache.data, items)
        return ClientSession.write(self, self.encode(items), items)

    def encode(self, items: list[Outgoing]) -> bytes:
        """The SSE bytes of ``items``, advancing this stream's cursors."""
        single = self.single
        if not single:
            return self._encode(items)
        cache = _cache
        before = self.cursors.get(single)
        if before is not None and cache.items is items and cache.before == before:
            data = cache.data
            self.cursors[single] = cache.after
        else:
            data = self._encode(items)
            if before is not None:
                cache.items, cache.before, cache.data = items, before, data
                cache.after = self.cursors[single]
        self.cursor = self.cursors.get(single)
        return data

    def _moved(self, project_id: int, cursor: Cursor) -> str:
        """Set the cursor of ``project_id``; the stream's ``id`` after it (as
        :func:`format_cursor` makes it)."""
        self.cursors[project_id] = cursor
        text = _cursor_text(cursor)
        if not self.multi:
            return text
        parts = self.parts
        if project_id not in parts:
            bisect.insort(self.order, project_id)
        parts[project_id] = f"{project_id}={text}"
        return ",".join([parts[p] for p in self.order])

    def _encode(self, items: list[Outgoing]) -> bytes:
        cursors, multi = self.cursors, self.multi
        out: list[bytes] = []
        for item in items:
            kind = item.kind
            if not kind:
                project_id = item.project_id
                if not project_id:
                    project_id = _project_of(item, cursors) if multi else next(iter(cursors), 0)
                cursor = cursors.get(project_id)
                if cursor is not None:
                    # The hub delivers every event of a project once, in order, after the
                    # cursor the stream resumed from (or ``subscribed``, or a resync): the
                    # next one is the cursor's successor (the item says so, when it knows).
                    seq = item.seq or cursor.seq + 1
                    event_id = self._moved(project_id, Cursor(cursor.epoch, seq, item.tag))
                    out.append(format_event(item.payload, event_id=event_id))
                else:  # not expected: an event of a project without a cursor yet
                    out.append(format_event(item.payload))
            elif item.epoch is not None:  # subscribed, resync_required: a new cursor
                event_id = self._moved(item.project_id, Cursor(item.epoch, item.seq, item.tag))
                out.append(format_event(item.payload, event=kind, event_id=event_id))
            else:
                if kind == "error" and item.project_id and item.project_id not in self.projects:
                    # A subscription of this stream is gone (refused: Redis did not answer or
                    # the project is unreadable; or ended by the hub, ``ended``). Not now: a
                    # close from inside a write would cut what is being written.
                    asyncio.get_running_loop().call_soon(self.subscription_failed, item.project_id)
                out.append(format_event(item.payload, event=kind))
        return b"".join(out)

    def subscription_failed(self, project_id: int) -> None:
        """The subscription of ``project_id`` (a project of this stream) was refused or ended;
        its ``error`` is on its way. A stream cannot subscribe again, but with ``?partial=1`` it
        goes on for its other projects: one project's failure (garbage in its keys) must not
        take the live events of the others away (the client polls that one). Once none of its
        projects is left subscribed (a stream of one project, or every project failed), or at
        the first failure without ``?partial=1`` (a client that does not know the parameter
        would not poll the failed project: it would be left silent), the stream ends with
        1011: its client reopens it from its ``Last-Event-ID``. The failed project's cursor
        stays in the ``id`` of every later event, unchanged (no event of it comes after its
        ``error``): a stream reopened from any later id resumes it exactly where it stopped."""
        failed = self.failed
        if project_id in failed or self.closing:
            return
        failed.add(project_id)
        if len(failed) >= self.width:
            self.close_later(CloseCode.INTERNAL_ERROR, "subscription failed")

    def _goodbye(self, code: CloseCode, reason: str) -> bytes:
        data = b""
        why = _TOKEN_CLOSES.get(code)
        if why is not None:  # the token ended the stream: say so as a refresh's error would
            data += format_event(
                msgspec.json.encode({"type": "error", "code": "invalid_token", "message": why}),
                event="error",
            )
        payload = msgspec.json.encode({"type": "close", "code": int(code), "reason": reason})
        return data + format_event(payload, event="close")

    def _send_close(self, code: CloseCode, reason: str) -> None:
        if not self.transport.is_closing():
            self.transport.write(self._goodbye(code, reason))

    def _close_gracefully(self, code: CloseCode, reason: str) -> None:
        transport = self.transport
        if not transport.is_closing():
            transport.write(self._goodbye(code, reason))
            # Closes once the buffer is sent. The stall check no longer looks at a closing
            # stream: one whose client reads nothing would hold its socket (and its place in
            # --max-connections) for as long as that. The kernel may end it (nothing sent for
            # --ping-timeout: TCP_USER_TIMEOUT, set when the stream opened, which covers a
            # closed receive window on Linux 5.11 and later); whatever it does, the stream is
            # aborted CLOSE_TIMEOUT s after this, as a WebSocket close is. A client still
            # reading the rest then resumes from the id of the last event it got.
            transport.close()
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)

    def ping(self, now: float) -> bytes | None:
        # None behind bytes still waiting in the buffer: they are what a proxy sees go, or the
        # stall check sees stuck. Written, the comment could be the write that finds the buffer
        # over --outbound-limit and cuts the stream, which only the hub's writes and the stall
        # check count (slow_consumer_disconnects_total): the check judges it within a second.
        if not self.transport.get_write_buffer_size():
            ClientSession.write(self, KEEPALIVE, [])
        return None


class _Detached:
    """What a WebSocket connection is left holding once its transport is taken over, so that
    nothing it still does (a deadline, a late write) can reach the SSE stream's transport."""

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return True

    def get_extra_info(self, name: str, default=None):
        return default


class SseConnection(asyncio.Protocol):
    """The asyncio protocol of a TCP connection serving one SSE stream."""

    def __init__(self, gateway: Gateway, admission: Admission | None, counted: bool) -> None:
        self.gateway = gateway
        self.admission = admission
        self.counted = counted
        self.session: SseSession | None = None
        self.task: asyncio.Task | None = None
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pass  # a stream's client has nothing more to say; whatever it sends is dropped

    def eof_received(self) -> bool:
        return False  # the client went away: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        release_transport(self.transport)
        self.transport = None
        if self.counted and self.admission is not None:
            self.counted = False
            self.admission.release()
        session = self.session
        if session is not None:
            session.writable = False
            session.closing = True
            self.gateway.remove_session(session)
        if self.task is not None:
            self.task.cancel()


class SseStreams:
    """Opens SSE streams for a gateway: checks the request, takes the transport over, and
    subscribes the stream's projects."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.keepalive = None  # a gateway.keepalive.Keepalive, set by the gateway at start

    def takeover(self, connection, request: Request) -> bool:
        """Called with every request first: False to leave it to the WebSocket transport (not a
        stream request), True when this took the connection over (to answer an error, or to
        stream)."""
        if (
            request.method == "OPTIONS"  # a CORS preflight: gateway.http answers it
            or not is_stream_target(request.path)
            or _websocket_upgrade(request.headers)
        ):
            return False
        peer = peer_of(connection)  # (the connection has no transport once detached)
        transport, counted = connection.detach(_Detached())
        protocol = SseConnection(self.gateway, connection.admission, counted)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        try:
            response, session_args = self._check(request, peer)
        except Exception:
            log.exception("stream request failed", path=request.path[:200])
            response = json_response(500, {"error": "internal", "message": "internal error"})
        if response is not None:
            transport.write(answer_to(request, response).serialize())  # (a HEAD's: 405)
            transport.close()
            return True
        try:
            self._open(transport, protocol, *session_args)
        except Exception:
            log.exception("stream failed to open", path=request.path[:200])
            transport.abort()
        return True

    def _check(self, request: Request, peer: str | None = None):
        gateway = self.gateway
        clients = gateway.clients
        repeated = repeated_header(request.headers, ("Origin", "Authorization", "Last-Event-ID"))
        if repeated is not None:
            return gateway.bad_request(f"the {repeated} header is given more than once"), ()
        origin_headers = self._cors(request.headers.get("Origin"))
        if request.method != "GET":
            return json_response(
                405,
                {"error": "method_not_allowed", "message": f"{request.method} is not supported"},
                [("Allow", "GET, OPTIONS"), *origin_headers],
            ), ()
        refusal = clients.refusal(request.headers.get("Origin"))
        if refusal is not None:
            return _with(refusal, origin_headers), ()
        try:
            stream = parse_stream_target(request.path, gateway.config.max_subscriptions)
            cursors = parse_last_event_id(request.headers.get("Last-Event-ID"), stream.projects)
        except ValueError as exc:
            return _with(gateway.bad_request(str(exc)), origin_headers), ()
        claims = None
        if clients.verify is not None:
            header = request.headers.get("Authorization")
            if not header:
                clients.metrics.auth_failures_total += 1
                message = "send 'Authorization: Bearer <token>'"
                _log_refusal(gateway, 401, "missing_token", message, peer)
                return json_response(
                    401,
                    {"error": "missing_token", "message": message},
                    [("WWW-Authenticate", "Bearer"), *origin_headers],
                ), ()
            try:
                claims = clients.verify_bearer(header)
            except InvalidToken as exc:
                _log_refusal(gateway, 401, "invalid_token", str(exc), peer)
                return json_response(
                    401,
                    {"error": "invalid_token", "message": str(exc)},
                    [("WWW-Authenticate", "Bearer"), *origin_headers],
                ), ()
            except RevocationsUnknown as exc:
                return tokens_unchecked_response(exc, origin_headers), ()
            refused = [p for p in stream.projects if not claims.allows(p)]
            if refused:
                gateway.metrics.client_errors_total += 1
                message = f"the token does not allow {refused}"
                _log_refusal(gateway, 403, "forbidden", message, peer)
                return json_response(
                    403, {"error": "forbidden", "message": message}, origin_headers
                ), ()
        return None, (stream, cursors, claims, origin_headers)

    def _cors(self, origin: str | None) -> list[tuple[str, str]]:
        """CORS headers for an allowed ``Origin`` (none for a foreign one: it is refused)."""
        allowed = self.gateway.config.allowed_origins
        if origin is None or (allowed and origin not in allowed):
            return []
        return cors_headers(origin)

    def _open(
        self,
        transport,
        protocol: SseConnection,
        stream,
        cursors,
        claims,
        origin_headers,
    ) -> None:
        gateway = self.gateway
        session = SseSession(
            transport,
            gateway.policy,
            gateway.hub.schedule_flush,
            multi=stream.multi,
            cursors=cursors,
            project_id=stream.projects[0],
            width=len(stream.projects) if stream.partial else 1,
        )
        protocol.session = session
        headers = Headers(
            [
                ("Content-Type", "text/event-stream; charset=utf-8"),
                # no-transform: a proxy that compresses holds bytes until a block is full.
                ("Cache-Control", "no-store, no-transform"),
                ("Connection", "close"),
                ("X-Accel-Buffering", "no"),  # nginx: do not buffer the stream
                *origin_headers,
            ]
        )
        # A stream's keepalive awaits no answer: without this, a peer that vanished without a
        # FIN or RST would hold the stream until the kernel gives up (~15 min). What it has not
        # acknowledged for --ping-timeout ends it, as an unanswered ping ends a WebSocket.
        bound_unacknowledged(transport, gateway.config.ping_timeout)
        head = Response(200, "OK", headers).serialize()
        transport.write(head + f"retry: {RETRY_MS}\n\n".encode())
        gateway.add_session(session)
        if self.keepalive is not None:
            self.keepalive.add(session)
        clog = ConnectionLog(log, session.id, transport="sse")
        protocol.task = spawn(
            self._guarded(
                session,
                self._subscribe(session, stream.projects, cursors, claims, clog, stream.presence),
            )
        )

    @staticmethod
    async def _guarded(session: SseSession, task: Coroutine[Any, Any, None]) -> None:
        """Run a stream's task (:meth:`_subscribe`): an exception anywhere in it (a bug) ends the
        stream with 1011, logged; the client's disconnect cancels it (CancelledError goes
        through, nothing logged)."""
        try:
            await task
        except Exception:
            # A bug: this stream ends (1011) and its client reconnects; never a stream left
            # open without some of its projects. No other stream is affected.
            log.exception("stream failed")
            session.close_later(CloseCode.INTERNAL_ERROR, "internal error")

    async def _subscribe(
        self,
        session: SseSession,
        projects: Sequence[int],
        cursors,
        claims,
        clog,
        presence: bool,
    ) -> None:
        """Give the session its token's claims, then subscribe its projects (any exception is
        a bug: :meth:`_guarded` ends the stream)."""
        gateway = self.gateway
        clients = gateway.clients
        if claims is not None:
            clients.authenticate(session, claims)
            if gateway.token_revoked(claims):
                # Revoked since the request was checked (a new list read meanwhile, before this
                # stream was in the subject index it closes connections through).
                gateway.metrics.revocation_disconnects_total += 1
                session.close_later(CloseCode.TOKEN_REVOKED, "token revoked")
                return
        # Up to CONCURRENCY projects at once, as a WebSocket's subscribes: one waiting for a
        # hung Redis Cluster master does not hold back the stream's projects on the others.
        # Their ``subscribed`` come in the order they are answered (each names its project).
        queue = iter(projects)

        async def subscribe_next() -> None:
            for project_id in queue:
                if session.closing:
                    return
                cursor = cursors.get(project_id)
                epoch, after, tag = cursor if cursor is not None else (None, None, None)
                if not await clients.subscribe(
                    session, project_id, epoch, after, clog, presence=presence, tag=tag
                ):
                    # The ``error`` event says why; a stream cannot ask again: it goes on
                    # for its other projects, or ends once none is left (the client reopens it
                    # with its Last-Event-ID).
                    session.subscription_failed(project_id)

        if len(projects) == 1:
            await subscribe_next()  # (the common stream: no task more)
        else:
            # A TaskGroup, not gather: when one raises, the others stop with it.
            async with asyncio.TaskGroup() as group:
                for _ in range(min(CONCURRENCY, len(projects))):
                    group.create_task(subscribe_next())


def _websocket_upgrade(headers: Headers) -> bool:
    """Whether the WebSocket transport judges the request (``WebSocketEndpoint.check_request``):
    an ``Upgrade: websocket``, or a repeated ``Upgrade`` (refused 400 there). Another upgrade
    (``curl --http2`` offers ``h2c`` on every http:// request) is ignored, as HTTP lets a
    server do: the request is still a stream's."""
    upgrades = headers.get_all("Upgrade")  # (never .get: it raises on a repeated header)
    return len(upgrades) > 1 or (len(upgrades) == 1 and upgrades[0].lower() == "websocket")


def _with(response: Response, headers: list[tuple[str, str]]) -> Response:
    for name, value in headers:
        response.headers[name] = value
    return response
