"""The bound on the gateway's answer to a subscribe, without sockets or timers.

A gateway whose message handling is stuck after authenticating (websockets answers pings by
itself, and live events, which do not go through the handler, may still flow) would leave a
subscribe unanswered for ever: the project silent, nothing said. So an unanswered subscribe is
given ``timeout`` from when it was sent, pushed back by every frame answering it or a subscribe
sent before it on the same connection:

* the replay comes before ``subscribed``, and a ``resync_required`` before its ``subscribed``
  (an event the consumer has already is no progress: a gateway sending old events again and
  again would hold the subscribe for ever);
* the gateway handles up to 8 projects' subscribes of a connection at a time (each may wait for
  Redis up to its ``--subscribe-timeout``; one before that handled them one after the other), so
  of subscribes sent together the later ones may wait for the earlier ones, and a long replay of
  one holds others back;
* a live event of a project whose subscribe is unanswered does not count: it comes whether or
  not the gateway handles the subscribe.

Time is read on a :class:`ReadingClock`, which stands still while the consumer waits for its
caller to make room (backpressure): the gateway's answers wait unread meanwhile, and taking that
for a gateway that does not answer would reconnect a slow reader for nothing (as the gateway
moves a ping's deadline back by the time its own reading paused).

:class:`consumer.client.Consumer` owns the I/O: it reports what it sends and reads, runs one
lazy timer, and gives the connection up when :meth:`PendingAnswers.overdue` names a project.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["PendingAnswers", "ReadingClock"]


class ReadingClock:
    """``now()``: a monotonic clock less the time spent in :meth:`pause` ... :meth:`resume`."""

    __slots__ = ("_clock", "_paused", "_paused_since")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._paused = 0.0  # seconds paused, in all (the current pause not included)
        self._paused_since: float | None = None

    @property
    def paused(self) -> bool:
        return self._paused_since is not None

    def now(self) -> float:
        now = self._clock()
        paused = self._paused
        if self._paused_since is not None:
            paused += now - self._paused_since
        return now - paused

    def pause(self) -> None:
        if self._paused_since is None:
            self._paused_since = self._clock()

    def resume(self) -> None:
        if self._paused_since is not None:
            self._paused += self._clock() - self._paused_since
            self._paused_since = None


class PendingAnswers:
    """One connection's unanswered subscribes and when the gateway last answered any of them,
    in :class:`ReadingClock` time. Each project's answer is due ``timeout`` after the later of
    its subscribe and the last answer."""

    __slots__ = ("_asked", "_progress_at", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._asked: dict[int, float] = {}  # project -> when its unanswered subscribe was sent
        self._progress_at = 0.0  # the gateway's last answer, in part or whole, to a subscribe

    def __contains__(self, project_id: int) -> bool:
        return project_id in self._asked

    def start(self, now: float) -> None:
        """A new connection (or one now authenticated): nothing asked yet, the clock from now."""
        self._asked.clear()
        self._progress_at = now

    def progressed(self, now: float) -> None:
        """The gateway answered what the subscribes wait behind (the token's ``authenticated``:
        it reads the subscribes sent with the token after it)."""
        self._progress_at = now

    def asking(self, project_id: int, now: float) -> None:
        """A subscribe of the project goes out now."""
        self._asked[project_id] = now

    def heard(self, project_id: int, now: float) -> None:
        """A frame answering the project's subscribe in part (its replay, a resync_required)."""
        if project_id in self._asked:
            self._progress_at = now

    def answered(self, project_id: int, now: float) -> None:
        """The project's subscribe is answered (``subscribed``, an error)."""
        if self._asked.pop(project_id, None) is not None:
            self._progress_at = now

    def overdue(self, now: float, waiting: Callable[[int], bool]) -> tuple[int | None, float]:
        """``(project, 0.0)`` for a project whose answer is overdue, else ``(None, deadline)``
        with the earliest deadline left (``inf``: none). ``waiting(project)`` says whether the
        project still waits for its answer; those that do not (unfollowed, answered another
        way) are forgotten."""
        earliest = float("inf")
        for project_id, asked in list(self._asked.items()):
            if not waiting(project_id):
                del self._asked[project_id]
                continue
            deadline = max(asked, self._progress_at) + self.timeout
            if deadline <= now:
                return project_id, 0.0
            earliest = min(earliest, deadline)
        return None, earliest
