"""Keepalive pings for every connection from one timer, instead of one task per connection.

websockets' own keepalive runs a task per connection (the task, its coroutine frame, a sleep
future and a timer handle: about 1.5 KiB per connection, 15 MiB for 10,000 idle browsers). The
gateway turns it off (``ping_interval=None``) and pings from a single periodic callback instead.
Connections wait in a queue ordered by when their next ping is due: every connection has the same
interval, so appending keeps the queue sorted and each tick only looks at what is due. A ping not
answered within ``timeout`` closes the connection with 1011, as websockets' keepalive does.

Only time during which the gateway was reading the connection counts against a ping. While it
holds reading paused (a WebSocket's messages waiting behind a subscribe that waits for Redis,
:data:`gateway.websocket.MAX_BACKLOG`), the client's pong may be waiting unread: the ping's
deadline moves back by that time (:meth:`ClientSession.read_paused_for`), and such a ping is
checked again from a small heap. Every wait stays bounded: a pause lasts while messages wait
for Redis, each bounded by ``--subscribe-timeout``, and a client that truly never answers is
closed once the gateway has been reading for ``timeout`` since the ping.

What a ping is belongs to the session's transport (:meth:`ClientSession.ping`): a WebSocket
ping is a control frame with a random 4-byte payload, written by the session itself (the same
bytes websockets would write, for less), and the pong carrying that payload, parsed by
websockets, answers it (:class:`gateway.websocket.WebSocketSession`); an SSE stream gets a
comment line, which keeps proxies from closing an idle stream and awaits no answer (a peer that
stops reading shows up as a stalled write; one that vanished, as bytes never acknowledged, which
the stream's ``TCP_USER_TIMEOUT`` bounds: :func:`gateway.session.bound_unacknowledged`).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import weakref
from collections.abc import Callable

from gateway.session import ClientSession as Session

__all__ = ["Keepalive"]

#: Seconds between ticks: pings due are spread over ticks, so no tick does much work at once.
TICK = 0.1

_Ref = weakref.ReferenceType[Session]


class Keepalive:
    """Pings every registered session each ``interval`` s; ``on_timeout`` for silent ones."""

    def __init__(
        self, interval: float, timeout: float, on_timeout: Callable[[Session], None]
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        self.on_timeout = on_timeout
        self._loop = asyncio.get_running_loop()
        # Weak references: a closed connection must not wait here until its next ping is due.
        self._pings: collections.deque[tuple[float, _Ref]] = collections.deque()
        #: (deadline, session, ping, seconds its reading had been paused when it was sent).
        self._checks: collections.deque[tuple[float, _Ref, bytes, float]] = collections.deque()
        #: Checks put off by a pause: (new deadline, tie-breaker, then as in ``_checks``).
        self._deferred: list[tuple[float, int, _Ref, bytes, float, float]] = []
        self._order = itertools.count()
        self._handle: asyncio.TimerHandle | None = None

    def add(self, session: Session) -> None:
        self._pings.append((self._loop.time() + self.interval, weakref.ref(session)))

    def start(self) -> None:
        if self._handle is None:
            self._handle = self._loop.call_later(min(TICK, self.interval), self._tick)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        try:
            self._run(self._loop.time())
        finally:
            self._handle = self._loop.call_later(min(TICK, self.interval), self._tick)

    def _run(self, now: float) -> None:
        pings, checks = self._pings, self._checks
        while pings and pings[0][0] <= now:
            ref = pings.popleft()[1]
            session = ref()
            if session is None or not _open(session):
                continue
            data = session.ping(now)
            if data is not None:
                checks.append((now + self.timeout, ref, data, session.read_paused_for(now)))
            pings.append((now + self.interval, ref))
        while checks and checks[0][0] <= now:
            deadline, ref, data, paused = checks.popleft()
            self._check(now, ref, data, deadline, paused)
        deferred = self._deferred
        while deferred and deferred[0][0] <= now:
            _, _, ref, data, deadline, paused = heapq.heappop(deferred)
            self._check(now, ref, data, deadline, paused)

    def _check(self, now: float, ref: _Ref, data: bytes, deadline: float, paused: float) -> None:
        """A ping's ``deadline`` (sent + timeout) has passed: ``on_timeout`` if it is still
        unanswered, unless reading was paused for some of that time (``paused``: the session's
        total when the ping was sent), which moves the deadline back by as much."""
        session = ref()
        if session is None or not _open(session) or not session.ping_unanswered(data):
            return
        extra = session.read_paused_for(now) - paused  # exactly 0.0 when never paused since
        if extra > 0 and deadline + extra > now:
            entry = (deadline + extra, next(self._order), ref, data, deadline, paused)
            heapq.heappush(self._deferred, entry)
            return
        self.on_timeout(session)


def _open(session: Session) -> bool:
    return session.is_open()
