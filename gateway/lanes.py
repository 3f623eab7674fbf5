"""The order of a connection's frames while some wait for Redis, without sockets or tasks.

Most frames are handled the moment they are read. A few wait for Redis: a subscribe that the
project's feed cannot answer from memory (a cold feed, a cursor outside the window, a
subscribe with presence) and a ``presence_get``, each up to ``--subscribe-timeout``. What such
a frame holds back is only what must come after it:

* a frame naming the **same project** (a subscribe, unsubscribe, activity or presence_get of
  it): the answers about one project come in the order of its frames, so an ``unsubscribed``
  never overtakes its ``subscribed``, and an ``unavailable`` can always be told apart;
* a frame of the **whole connection** (:data:`BARRIER`: an ``auth``, whose token decides what
  every later frame may do, or a subscribe that may find the connection at
  ``--max-subscriptions``, whose answer depends on the frames before it): it waits for every
  frame before it, and every frame after it waits for it, as if the connection's frames were
  handled one after the other;
* a frame that names no project and changes nothing (:data:`FREE`: a ping, a malformed frame) is
  handled at once.

Frames of other projects go on meanwhile: on Redis Cluster with one master hung, a page
following projects on several masters gets the others' ``subscribed`` (and its pong) at once,
instead of one ``--subscribe-timeout`` later per project of the hung master before them.

At most ``concurrency`` projects' frames wait for Redis at once (each is a task and a Redis
call: a client cannot open more by naming more projects); a frame of another project then
waits its turn, in the order it came. At most ``backlog`` frames are held back in all:
:attr:`FrameLanes.full` tells the transport to stop reading until :attr:`FrameLanes.roomy`
(TCP's flow control holds the rest, as before).

:class:`FrameLanes` decides; the transport (gateway.websocket) runs the frames and the tasks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Final, Generic, TypeVar

__all__ = ["BARRIER", "CONCURRENCY", "FREE", "FrameLanes", "Lane"]

T = TypeVar("T")

#: Projects whose frames may wait for Redis at once on one connection (and subscribes at once
#: on one SSE stream): a page's projects on a healthy shard are not held back by those of a hung
#: one, and a client naming many projects opens no more than this many Redis calls.
CONCURRENCY = 8


class _Barrier:
    __slots__ = ()

    def __repr__(self) -> str:
        return "BARRIER"


#: The lane of a frame that waits for every frame before it and holds every frame after it.
BARRIER: Final = _Barrier()
#: The lane of a frame that neither waits nor holds anything (a ping, a malformed frame).
FREE: Final = None

#: A project id, :data:`BARRIER` or :data:`FREE`.
Lane = Hashable


class FrameLanes(Generic[T]):
    """One connection's frames held back behind frames that wait for Redis.

    The transport asks :meth:`admit` for every frame while the connection has a frame waiting
    (:attr:`busy`; with none, every frame is handled at once and no instance is needed). When
    the frame it handled at once turns out to wait for Redis, it says :meth:`started` and runs
    it in a task; that task, once the frame is done, asks :meth:`next` for what to handle next,
    and ends when :meth:`next` says nothing."""

    __slots__ = ("_held", "_ready", "_running", "_serial", "backlog", "concurrency")

    def __init__(self, concurrency: int, backlog: int) -> None:
        if concurrency < 1 or backlog < 1:
            raise ValueError("concurrency and backlog must be at least 1")
        self.concurrency = concurrency
        self.backlog = backlog
        #: Projects whose frame is being handled (waiting for Redis, or run by its task).
        self._running: set[Lane] = set()
        #: Each busy project's frames held back, oldest first (a project waiting for a place
        #: among ``concurrency`` has its frames here too, and is in ``_ready``).
        self._held: dict[Lane, deque[T]] = {}
        #: Projects with frames held and none running, waiting for a place, oldest first.
        self._ready: deque[Lane] = deque()
        #: From a barrier frame held back on: every frame, in order, handled one after the other
        #: once nothing else runs or is held (None: no barrier held).
        self._serial: deque[T] | None = None

    # --- what the transport reads --------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether any frame is being handled or held back."""
        return bool(self._running or self._held or self._serial)

    @property
    def waiting(self) -> int:
        """Frames held back (not being handled)."""
        held = sum(len(frames) for frames in self._held.values())
        return held + (len(self._serial) if self._serial else 0)

    @property
    def full(self) -> bool:
        """Whether the transport should stop reading: ``backlog`` frames are held back."""
        return self.waiting >= self.backlog

    @property
    def roomy(self) -> bool:
        """Whether a transport that stopped reading may read again: below half the backlog."""
        return self.waiting < max(1, self.backlog // 2)

    def projects(self) -> set[Lane]:
        """The projects with a frame being handled or held: any of them may yet be subscribed
        (a subscribe among them may add it), so a subscribe counting the connection's
        subscriptions counts these too."""
        busy = self._running | self._held.keys()
        busy.discard(BARRIER)
        return busy

    # --- frames --------------------------------------------------------------------------------

    def admit(self, lane: Lane, frame: T) -> bool:
        """A frame of ``lane`` is read: True when the transport handles it now (then
        :meth:`started` if it waits for Redis), False when it is held back (:meth:`next` hands it
        out in its turn)."""
        if lane is FREE:
            return True
        serial = self._serial
        if serial is not None:
            serial.append(frame)
            return False
        if lane is BARRIER:
            if not self.busy:
                return True
            self._serial = deque((frame,))
            return False
        held = self._held.get(lane)
        if held is not None:
            held.append(frame)
            return False
        if lane in self._running:
            self._held[lane] = deque((frame,))
            return False
        if len(self._running) >= self.concurrency:
            self._held[lane] = deque((frame,))
            self._ready.append(lane)
            return False
        return True

    def started(self, lane: Lane) -> None:
        """The frame of ``lane`` that :meth:`admit` let through (or that came while nothing was
        busy) waits for Redis: a project's is busy until its task is done with it; a barrier
        holds every frame after it (but free ones) until then."""
        if lane is FREE:
            raise ValueError("a free frame does not wait for Redis")
        if lane in self._running:
            raise ValueError(f"lane {lane!r} is already running")
        if lane is BARRIER:
            if self.busy:
                raise ValueError("a barrier runs only when nothing else does")
            self._serial = deque()
        self._running.add(lane)

    def next(self, lane: Lane) -> tuple[Lane, T] | None:
        """The task running ``lane`` is done with its frame: what it handles next (a lane and
        one of its frames), or None when the task ends. The same project's next frame first;
        else a project waiting for a place; else, once nothing else runs or is held, the frames
        from a barrier on, one after the other (lane :data:`BARRIER`)."""
        held = self._held.get(lane)
        if held:
            frame = held.popleft()
            if not held:
                del self._held[lane]
            return lane, frame
        self._running.discard(lane)
        if lane is BARRIER and self._serial is not None and not self._serial:
            self._serial = None  # every frame from the barrier on is handled: lanes again
        while self._ready:
            project = self._ready.popleft()
            frames = self._held.get(project)
            if not frames:  # (not expected: a ready project always has frames held)
                continue
            self._running.add(project)
            frame = frames.popleft()
            if not frames:
                del self._held[project]
            return project, frame
        serial = self._serial
        if serial and not self._running and not self._held:
            self._running.add(BARRIER)
            return BARRIER, serial.popleft()
        return None

    def clear(self) -> list[T]:
        """The connection is gone: every frame held back, dropped (returned)."""
        dropped = [frame for frames in self._held.values() for frame in frames]
        if self._serial:
            dropped.extend(self._serial)
        self._held.clear()
        self._ready.clear()
        self._running.clear()
        self._serial = None
        return dropped
