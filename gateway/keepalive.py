"""Keepalive pings for every connection from one timer, instead of one task per connection.

websockets' own keepalive runs a task per connection (the task, its coroutine frame, a sleep
future and a timer handle: about 1.5 KiB per connection, 15 MiB for 10,000 idle browsers). The
gateway turns it off (``ping_interval=None``) and pings from a single periodic callback instead.
Connections wait in a queue ordered by when their next ping is due: every connection has the same
interval, so appending keeps the queue sorted and each tick only looks at what is due. A ping not
answered within ``timeout`` closes the connection with 1011, as websockets' keepalive does.

What a ping is belongs to the session's transport (:meth:`ClientSession.ping`): a WebSocket
ping goes through websockets' protocol object, and the pong carrying its payload answers it
(:class:`gateway.websocket.WebSocketSession`); an SSE stream gets a
comment line, which keeps proxies from closing an idle stream and awaits no answer (a peer that
stops reading shows up as a stalled write; one that vanished, as bytes never acknowledged, which
the stream's ``TCP_USER_TIMEOUT`` bounds: :func:`gateway.session.bound_unacknowledged`).
"""

from __future__ import annotations

import asyncio
import collections
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
        self._checks: collections.deque[tuple[float, _Ref, bytes]] = collections.deque()
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
                checks.append((now + self.timeout, ref, data))
            pings.append((now + self.interval, ref))
        while checks and checks[0][0] <= now:
            _, ref, data = checks.popleft()
            session = ref()
            if session is not None and _open(session) and session.ping_unanswered(data):
                self.on_timeout(session)


def _open(session: Session) -> bool:
    return session.is_open()
