"""Load and checking helpers for end-to-end tests with real gateway processes.

* :class:`ResumingClient`: a WebSocket client that behaves like ``eventbus.js`` should: it keeps
  a cursor per project, reconnects (round robin over a list of gateway URLs) whenever its
  connection ends, resubscribes every project with its cursor, and records everything it gets.
* :class:`PublishLoop`: a publisher that publishes identifiable events (``blocker_id`` is unique)
  and records the cursor Redis acknowledged for each.
* :func:`check_delivery`: the delivery guarantee as a function: one client's record of one
  project against the history Redis ended up with. An empty list of problems means every event
  arrived exactly once, in order, with no gap, or after an allowed ``resync_required``.

Nothing here sleeps for a fixed time to "let things settle": tests wait for conditions
(:meth:`ResumingClient.wait_for`, :func:`wait_until`) with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from publisher import AsyncPublisher, PublisherUnavailable
from schemas.tags import event_tag

__all__ = [
    "Lineage",
    "PublishLoop",
    "Publishers",
    "Received",
    "ResumingClient",
    "check_delivery",
    "final_state",
    "read_history",
    "stop_clients",
    "verify_clients",
    "wait_live",
    "wait_until",
]

Cursor = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Received:
    """One thing a client received for a project."""

    kind: str  # "event", "resync" or "subscribed"
    epoch: str
    seq: int
    ident: int | None = None  # the event's blocker_id: which event it is, not only where
    reason: str | None = None  # resync reason
    resumed: bool | None = None  # subscribed: the cursor was honoured
    #: An event's: the tag of its text as received; a subscribed's or a resync's: its ``tag``.
    tag: str | None = None


@dataclass(slots=True)
class Stats:
    connects: int = 0
    close_codes: list[int | None] = field(default_factory=list)
    handshake_failures: int = 0
    unavailable: int = 0  # 'unavailable' subscribe errors (Redis down), retried
    events: int = 0
    resyncs: int = 0
    unexpected: list[dict] = field(default_factory=list)  # any other error message


def reached(client, targets: Mapping[int, Cursor]) -> bool:
    """Every project's cursor is at its target (or past it in a later epoch). A method of every
    test client (``.cursors``, ``.log``)."""
    return all(client.cursors.get(p) == target for p, target in targets.items() if p in client.log)


async def wait_for(client, predicate: Callable[[], bool], within: float, what: str = "") -> None:
    """Wait until ``predicate()`` holds, checked whenever the client records something (its
    ``._changed`` event) and every 0.5 s; TimeoutError after ``within`` seconds. A method of
    every test client."""
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        client._changed.clear()
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError(f"client {client.name}: timed out waiting for {what or predicate}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(remaining, 0.5)):
                await client._changed.wait()


class ResumingClient:
    """A client that never gives up and never forgets its cursors.

    Args:
        urls: gateway WebSocket URLs; the client starts at ``urls[start]`` and moves to the next
            one each time a connection ends (a plain load balancer does much the same).
        projects: project ids to follow.
        token: JWT sent as the first frame (``None`` for ``--no-auth`` gateways).
        cursors: cursors to start from (``{project: (epoch, seq)}``); without one, a project
            is subscribed "from now".
        tags: the tags of the events at ``cursors`` (``{project: tag}``, see
            :meth:`cursor_tags`), sent with them.

    A subscribe sends the tag of the event at its cursor (docs/protocol.md, "Cursor tags"): the
    client keeps the raw text of the last event of each project and hashes it only when it
    subscribes; after a ``subscribed`` or ``resync_required`` that set the cursor, its ``tag``.
    """

    def __init__(
        self,
        urls: Sequence[str],
        projects: Iterable[int],
        *,
        token: str | None = None,
        start: int = 0,
        name: str = "",
        cursors: Mapping[int, Cursor] | None = None,
        tags: Mapping[int, str | None] | None = None,
        retry_delay: tuple[float, float] = (0.02, 0.25),
    ) -> None:
        self.urls = list(urls)
        self.projects = list(projects)
        self.token = token
        self.name = name
        self.cursors: dict[int, Cursor] = dict(cursors or {})
        #: The tag of the event at the cursor, when it came from a subscribed or resync.
        self._tags: dict[int, str | None] = dict(tags or {})
        #: The raw text of the last event received, when the cursor is that event's.
        self._texts: dict[int, str] = {}
        self.log: dict[int, list[Received]] = {p: [] for p in self.projects}
        self.stats = Stats()
        self.live: set[int] = set()  # projects subscribed on the current connection
        #: Projects left with ``unsubscribe`` (:meth:`pause`): not subscribed on a reconnect.
        self.paused: set[int] = set()
        self._leaving: set[int] = set()  # unsubscribe sent, ``unsubscribed`` not yet received
        self._unsent: set[int] = set()  # projects the connection has not sent a subscribe for
        self._subscribes: dict[int, int] = {}  # subscribe frames sent, per project
        self.url: str | None = None  # the gateway of the current connection
        self.retry_delay = retry_delay
        self._next = start
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ws = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> ResumingClient:
        self._task = asyncio.create_task(self._run(), name=f"client-{self.name}")
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def drop(self) -> None:
        """Close the current connection from the client side (it reconnects and resumes)."""
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()

    def abort(self) -> None:
        """Drop the current connection abruptly (no close frame, as a crashed browser tab or a
        lost network): it reconnects and resumes."""
        if self._ws is not None:
            self._ws.transport.abort()

    async def pause(self, project_id: int) -> None:
        """Leave a project (``unsubscribe``) and stay connected; :meth:`unpause` resumes it from
        its cursor. Events received until ``unsubscribed`` still count."""
        self.paused.add(project_id)
        self.live.discard(project_id)
        ws = self._ws
        if ws is not None:
            self._leaving.add(project_id)
            try:
                await ws.send(json.dumps({"type": "unsubscribe", "project_id": project_id}))
            except ConnectionClosed:
                self._leaving.discard(project_id)

    async def unpause(self, project_id: int, within: float = 10.0) -> None:
        """Subscribe a paused project again, from its cursor. Waits for the ``unsubscribed`` of
        the pause first (or the connection's end): an event the old subscription still sent
        after the cursor was taken would otherwise be replayed again."""
        await self.wait_for(lambda: project_id not in self._leaving, within, "unsubscribed")
        self.paused.discard(project_id)
        ws = self._ws
        if ws is not None and project_id not in self._unsent:  # else the connection sends it
            with contextlib.suppress(ConnectionClosed):
                await self._subscribe(ws, project_id)

    async def _run(self) -> None:
        while not self._stop.is_set():
            url = self.urls[self._next % len(self.urls)]
            self._next += 1
            try:
                await self._session(url)
            except (OSError, InvalidHandshake, InvalidStatus, TimeoutError):
                self.stats.handshake_failures += 1
            except ConnectionClosed:
                pass
            finally:
                self.live.clear()
                self._leaving.clear()
                self.url = None
                self._ws = None
                self._changed.set()
            if not self._stop.is_set():
                await asyncio.sleep(random.uniform(*self.retry_delay))

    async def _session(self, url: str) -> None:
        async with connect(url, open_timeout=5, close_timeout=2, max_size=2**22) as ws:
            self._ws, self.url = ws, url
            self._unsent = set(self.projects)  # a project unpaused meanwhile is sent below
            self.stats.connects += 1
            retries: list[asyncio.Task] = []
            try:
                if self.token is not None:
                    await ws.send(json.dumps({"type": "auth", "token": self.token}))
                for project_id in self.projects:
                    self._unsent.discard(project_id)
                    if project_id not in self.paused:
                        await self._subscribe(ws, project_id)
                async for raw in ws:
                    message = json.loads(raw)
                    if self._on_message(message, raw):
                        retries.append(asyncio.create_task(self._retry(ws, message)))
            finally:
                self.stats.close_codes.append(ws.close_code)
                for task in retries:
                    task.cancel()

    async def _subscribe(self, ws, project_id: int) -> None:
        self._subscribes[project_id] = self._subscribes.get(project_id, 0) + 1
        await ws.send(self._subscribe_frame(project_id))

    def _subscribe_frame(self, project_id: int) -> str:
        message: dict[str, Any] = {"type": "subscribe", "project_id": project_id}
        cursor = self.cursors.get(project_id)
        if cursor is not None:
            message["epoch"], message["after"] = cursor
            tag = self.cursor_tag(project_id)
            if tag is not None:
                message["tag"] = tag
        return json.dumps(message)

    def cursor_tag(self, project_id: int) -> str | None:
        """The tag of the event at the project's cursor (None: unknown, or no cursor)."""
        text = self._texts.get(project_id)
        if text is not None:
            return event_tag(text.encode())
        return self._tags.get(project_id)

    def cursor_tags(self) -> dict[int, str | None]:
        """:meth:`cursor_tag` of every project with a cursor (for a client taking over)."""
        return {p: self.cursor_tag(p) for p in self.cursors}

    async def _retry(self, ws, error: dict) -> None:
        project_id = error["project_id"]
        sent = self._subscribes.get(project_id)
        await asyncio.sleep(random.uniform(0.1, 0.3))
        if project_id in self.paused or self._subscribes.get(project_id) != sent:
            return  # left, or subscribed again meanwhile (unpaused)
        with contextlib.suppress(ConnectionClosed):
            await self._subscribe(ws, project_id)

    def _on_message(self, message: dict, raw: str | bytes | None = None) -> bool:
        """Record one frame (``raw``: its text as received); True when the subscribe must be
        retried."""
        kind = message.get("type")
        project_id = message.get("project_id")
        log = self.log.get(project_id)  # type: ignore[arg-type]
        retry = False
        if kind == "subscribed":
            epoch, seq, tag = message["epoch"], message["seq"], message.get("tag")
            if project_id not in self.cursors:
                self.cursors[project_id] = (epoch, seq)  # type: ignore[index]
                self._tags[project_id] = tag  # type: ignore[index]
                self._texts.pop(project_id, None)  # type: ignore[arg-type]
            log.append(  # type: ignore[union-attr]
                Received("subscribed", epoch, seq, resumed=message["resumed"], tag=tag)
            )
            self.live.add(project_id)  # type: ignore[arg-type]
        elif kind == "resync_required":
            self.cursors[project_id] = (message["epoch"], message["seq"])  # type: ignore[index]
            self._tags[project_id] = message.get("tag")  # type: ignore[index]
            self._texts.pop(project_id, None)  # type: ignore[arg-type]
            self.stats.resyncs += 1
            log.append(  # type: ignore[union-attr]
                Received(
                    "resync",
                    message["epoch"],
                    message["seq"],
                    reason=message["reason"],
                    tag=message.get("tag"),
                )
            )
        elif kind == "error":
            if message.get("code") == "unavailable" and project_id in self.log:
                self.stats.unavailable += 1
                retry = project_id not in self.paused
            elif message.get("code") == "not_subscribed" and project_id in self._leaving:
                self._leaving.discard(project_id)  # paused before its subscribe succeeded
            else:
                self.stats.unexpected.append(message)
        elif kind == "unsubscribed":
            self._leaving.discard(project_id)  # type: ignore[arg-type]
        elif kind in ("authenticated", "pong"):
            pass
        elif log is not None:
            epoch = self.cursors[project_id][0]  # type: ignore[index]
            seq = message["seq"]
            text = raw.decode() if isinstance(raw, bytes) else raw
            tag = None
            if text is not None:
                self._texts[project_id] = text  # type: ignore[index]
                tag = event_tag(text.encode())  # the record's: check_delivery names events by it
            log.append(Received("event", epoch, seq, ident=message.get("blocker_id"), tag=tag))
            self.stats.events += 1
            self.cursors[project_id] = (epoch, seq)  # type: ignore[index]
        self._changed.set()
        return retry

    # --- waiting -------------------------------------------------------------------------------

    reached = reached
    wait_for = wait_for

    def compact(self, allowed_resyncs: Iterable[str] = ()) -> list[str]:
        """Check what was recorded so far with :func:`check_delivery` and forget it, keeping only
        the cursors (for runs too long to keep every record). Returns the problems found."""
        problems = [f"client {self.name}: unexpected {m}" for m in self.stats.unexpected]
        self.stats.unexpected.clear()
        for project_id, log in self.log.items():
            found = check_delivery(log, allowed_resyncs=allowed_resyncs)
            problems += [f"client {self.name} project {project_id}: {p}" for p in found]
            cursor = self.cursors.get(project_id)
            self.log[project_id] = [Received("subscribed", *cursor)] if cursor else []
        return problems

    def resyncs(self, project_id: int | None = None) -> list[Received]:
        logs = [self.log[project_id]] if project_id is not None else self.log.values()
        return [r for log in logs for r in log if r.kind == "resync"]

    def events(self, project_id: int) -> list[Received]:
        return [r for r in self.log[project_id] if r.kind == "event"]


async def wait_until(
    predicate: Callable[[], bool], within: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until it holds; TimeoutError naming ``what`` after ``within`` s."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


class PublishLoop:
    """Publishes ``blocker_resolved`` events with unique ``blocker_id`` s to random projects.

    ``acked[project][(epoch, seq)] = blocker_id`` for every publish Redis acknowledged;
    ``unavailable`` counts :class:`PublisherUnavailable` (each is retried with a new id: the
    failed one may or may not have been written, which the stream read at the end settles).
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        redis_url: str,
        projects: Sequence[int],
        *,
        rate: float,
        seed: int = 0,
    ) -> None:
        self.publisher = AsyncPublisher.from_url(redis_url)
        self.projects = list(projects)
        self.rate = rate
        self.random = random.Random(seed)
        self.acked: dict[int, dict[Cursor, int]] = {p: {} for p in self.projects}
        self.published = 0
        self.unavailable = 0
        self.last_error: Exception | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> PublishLoop:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        await self.publisher.aclose()

    async def publish_one(self, project_id: int) -> Cursor:
        ident = next(self._ids)
        cursor = await self.publisher.blocker_resolved(project_id, blocker_id=ident, answer="ok")
        self.acked[project_id][(cursor.epoch, cursor.seq)] = ident
        self.published += 1
        return cursor

    async def _run(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                await self.publish_one(self.random.choice(self.projects))
            except PublisherUnavailable as exc:
                self.unavailable += 1
                self.last_error = exc
                await asyncio.sleep(0.05)
            next_at = max(next_at + interval, time.monotonic() - 1.0)
            delay = next_at - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()


async def read_history(client, keys, project_id: int) -> tuple[Cursor, dict[Cursor, int]]:
    """The project's final cursor and ``(epoch, seq) -> blocker_id`` of its whole stream, from
    any redis-py asyncio client (standalone or cluster)."""
    epoch, top = await client.hmget(keys.meta(project_id), "epoch", "seq")
    epoch = epoch.decode()
    history: dict[Cursor, int] = {}
    for entry_id, fields in await client.xrange(keys.stream(project_id)):
        seq = int(entry_id.split(b"-")[0])
        history[(epoch, seq)] = json.loads(fields[b"f"])["blocker_id"]
    return (epoch, int(top)), history


class Lineage:
    """Every event published, where, and which event each one followed, across failovers.

    A failover (Redis losing its last events, then handing their numbers to new events) leaves
    several events at one position ``(epoch, seq)``: the lost one(s) and the new one. Events
    (``blocker_id`` s, unique) are recorded with :meth:`add` (an acknowledged publish, a stream
    read) and failovers with :meth:`add_failover`, which takes the stream as it was just before
    (read atomically with the loss). :meth:`follows` then says whether event ``a`` was ever the
    one just before event ``b``, from which history was a chain at every moment:

    * an event never lost followed the one never lost at the position before (a failover that
      took that one would have taken it too, and never-lost events are one per position);
    * an event lost by a failover while retention had already trimmed it from the stream, or
      whose position retention trimmed later (:meth:`add_trim`), is :attr:`untraced`:
      anything may follow it (nothing can tell the client);
    * an event lost by failover #n followed the event the stream held before it when #n
      happened (where trimmed, the one last known there); when even that is unknown, any event
      not lost by a failover before #n is accepted (the one check that is not exact).
    """

    def __init__(self) -> None:
        self.held: dict[Cursor, set[int]] = {}
        self.tags: dict[str, int] = {}  # an event's tag -> the event
        self.tag_of: dict[int, str] = {}
        self.lost: dict[int, int] = {}  # event -> the number (1, 2, ...) of the failover it lost
        self.pred: dict[int, int] = {}  # lost event -> the event before it, as the stream held it
        #: Lost events the stream no longer held when the failover happened (retention trimmed
        #: them first): nothing to compare a client's tag with (docs/protocol.md, "Cursor
        #: tags"), so a client may carry on from one into the new history unwarned.
        self.untraced: set[int] = set()
        self.failovers = 0

    def add(self, cursor: Cursor, ident: int, tag: str | None = None) -> None:
        self.held.setdefault(cursor, set()).add(ident)
        if tag is not None:
            self.tags[tag] = ident
            self.tag_of[ident] = tag

    def current(self, cursor: Cursor) -> int | None:
        """The event at ``cursor`` no failover has lost (yet), if known."""
        alive = [i for i in self.held.get(cursor, ()) if i not in self.lost]
        return alive[0] if len(alive) == 1 else None

    def add_failover(
        self, epoch: str, top: int, keep: int, entries: Sequence[tuple[int, int, str]]
    ) -> int:
        """Failover: the stream held ``entries`` (``(seq, event, tag)``) up to ``top``, and kept
        those up to ``keep``. Returns its number."""
        self.failovers += 1
        number = self.failovers
        by_seq = {}
        for seq, ident, tag in entries:
            self.add((epoch, seq), ident, tag)
            by_seq[seq] = ident
        # The chain from the kept top on; where trimmed, the event known there before.
        chain = {
            seq: by_seq[seq] if seq in by_seq else self.current((epoch, seq))
            for seq in range(max(keep, 1), top + 1)
        }
        for seq in range(keep + 1, top + 1):
            ident = chain[seq]
            if ident is None:
                continue
            self.lost[ident] = number
            if seq not in by_seq:
                self.untraced.add(ident)
            if chain.get(seq - 1) is not None:
                self.pred[ident] = chain[seq - 1]  # type: ignore[assignment]
        return number

    def add_trim(self, epoch: str, below: int) -> None:
        """Retention trimmed the stream of ``epoch`` below ``below`` (its first entry left, or
        its top + 1 when none is). An event a failover lost at such a position is now
        :attr:`untraced`: the position's entry is gone, so a client (or a gateway's feed)
        holding the lost event and resuming there has nothing to compare its tag with
        (docs/protocol.md, "Cursor tags"), however well the failover itself could be seen."""
        for (at_epoch, seq), idents in self.held.items():
            if at_epoch == epoch and seq < below:
                self.untraced.update(ident for ident in idents if ident in self.lost)

    def follows(self, before: int, after: int) -> bool:
        """Whether ``after`` was published right after ``before``, in some history (or
        ``before`` is :attr:`untraced`)."""
        if before in self.untraced:
            return True
        if after not in self.lost:
            return before not in self.lost
        if after in self.pred:
            return self.pred[after] == before
        return before not in self.lost or self.lost[before] >= self.lost[after]


def check_delivery(
    records: Sequence[Received],
    *,
    history: Mapping[Cursor, int] | None = None,
    final: Cursor | None = None,
    allowed_resyncs: Iterable[str] = (),
    lineage: Lineage | None = None,
    tags: Mapping[Cursor, str] | None = None,
) -> list[str]:
    """Problems in one client's record of one project; ``[]`` when the guarantee held.

    * every event is exactly the one after the client's cursor (no gap, no duplicate, in order);
    * a ``subscribed`` acknowledges exactly the client's cursor (nothing skipped by a resume);
    * ``resync_required`` only with an allowed reason;
    * with ``history`` (what Redis holds at the end): each event is the one Redis holds at that
      position; an event Redis no longer holds (lost in a failover) must be followed by a
      ``resync_required``, never by silence;
    * with ``final``: the client reached the project's final cursor;
    * with ``tags`` (the tag of the event at each cursor, e.g. :func:`tags_received`): a
      ``subscribed`` or ``resync_required`` naming a tag names that of the event at its cursor
      (a client resuming with a wrong one is told ``history_lost`` for nothing);
    * with ``lineage`` (histories rewritten by failovers, instead of ``history``): each event is
      one published at its position, and follows the one before it in the record (or at the
      cursor a ``subscribed`` or ``resync_required`` named by its tag) in some history
      (:meth:`Lineage.follows`): after an event a failover lost, the next thing is the next
      event lost with it or a ``resync_required``, never an event of the history after the
      loss, and the record does not end on a lost event; a ``subscribed`` acknowledging the
      client's cursor names (by its tag) the event the client has there, and every tag a
      ``subscribed`` or ``resync_required`` names is that of an event published at its cursor.
    """
    if lineage is not None:
        return _check_lineage(records, lineage, final, set(allowed_resyncs))
    allowed = set(allowed_resyncs)
    problems: list[str] = []
    cursor: Cursor | None = None
    diverged: Received | None = None  # an event Redis lost, not yet followed by a resync
    epochs = {epoch for epoch, _ in history} if history else set()
    for index, item in enumerate(records):
        where = f"#{index} {item.kind} {item.epoch[:6]}:{item.seq}"
        if tags is not None and item.kind != "event" and item.tag:
            known = tags.get((item.epoch, item.seq))
            if known is not None and known != item.tag:
                problems.append(f"{where}: names tag {item.tag}, the event there has {known}")
        if item.kind == "subscribed":
            if cursor is None:
                cursor = (item.epoch, item.seq)
            elif (item.epoch, item.seq) != cursor:
                problems.append(f"{where}: acknowledged while the client was at {cursor}")
                cursor = (item.epoch, item.seq)
        elif item.kind == "resync":
            if item.reason not in allowed:
                problems.append(f"{where}: unexpected resync ({item.reason})")
            cursor, diverged = (item.epoch, item.seq), None
        else:
            if cursor is None:
                problems.append(f"{where}: event before subscribed")
            elif item.seq != cursor[1] + 1:
                kind = "duplicate/out of order" if item.seq <= cursor[1] else "gap"
                problems.append(f"{where}: {kind}, client was at {cursor[1]}")
            cursor = (item.epoch, item.seq)
            if history is not None and item.epoch in epochs:
                held = history.get(cursor)
                if held is None or held != item.ident:
                    diverged = diverged or item
    if diverged is not None:
        problems.append(
            f"event {diverged.epoch[:6]}:{diverged.seq} (id {diverged.ident}) is not what Redis "
            "holds there, and no resync_required followed"
        )
    if final is not None and cursor != final:
        problems.append(f"ended at {cursor}, expected {final}")
    return problems


def _check_lineage(
    records: Sequence[Received], lineage: Lineage, final: Cursor | None, allowed: set[str]
) -> list[str]:
    problems: list[str] = []
    cursor: Cursor | None = None
    at: int | None = None  # the event at the cursor, when known
    epochs = {epoch for epoch, _ in lineage.held}

    def name(ident: int | None) -> str:
        lost = lineage.lost.get(ident)  # type: ignore[arg-type]
        return f"{ident}" + (f" (lost by failover #{lost})" if lost else "")

    for index, item in enumerate(records):
        where = f"#{index} {item.kind} {item.epoch[:6]}:{item.seq}"
        named = lineage.tags.get(item.tag) if item.tag else None
        if item.kind != "event" and named is not None:
            if named not in lineage.held.get((item.epoch, item.seq), ()):
                problems.append(f"{where}: names by its tag event {name(named)}, never there")
        if item.kind == "subscribed":
            if cursor is None:
                cursor, at = (item.epoch, item.seq), named
            elif (item.epoch, item.seq) != cursor:
                problems.append(f"{where}: acknowledged while the client was at {cursor}")
                cursor, at = (item.epoch, item.seq), named
            elif item.tag and at is not None and lineage.tag_of.get(at, item.tag) != item.tag:
                problems.append(
                    f"{where}: acknowledged the cursor naming event {name(named)}, "
                    f"the client has {name(at)} there"
                )
        elif item.kind == "resync":
            if item.reason not in allowed:
                problems.append(f"{where}: unexpected resync ({item.reason})")
            cursor, at = (item.epoch, item.seq), named
        else:
            ident = item.ident
            if cursor is None:
                problems.append(f"{where}: event before subscribed")
            elif item.seq != cursor[1] + 1:
                kind = "duplicate/out of order" if item.seq <= cursor[1] else "gap"
                problems.append(f"{where}: {kind}, client was at {cursor[1]}")
            elif at is not None and ident is not None and not lineage.follows(at, ident):
                problems.append(
                    f"{where}: event {name(ident)} after event {name(at)}: never one after "
                    "the other in a history (a resync_required had to come first)"
                )
            cursor = (item.epoch, item.seq)
            if item.epoch in epochs and ident not in lineage.held.get(cursor, ()):
                problems.append(f"{where}: event {ident} was never published there")
            at = ident
    if at is not None and at in lineage.lost and at not in lineage.untraced:
        problems.append(f"the record ends at event {name(at)}, and no resync_required followed")
    if final is not None and cursor != final:
        problems.append(f"ended at {cursor}, expected {final}")
    return problems


# --- whole-test helpers ----------------------------------------------------------------------


def tags_received(
    records: Iterable[Sequence[Received]], history: Mapping[Cursor, int]
) -> dict[Cursor, str]:
    """The tag of the event ``history`` holds at each cursor, from what clients received: only
    events still held (not one a failover lost, whose number it handed out again)."""
    seen: dict[Cursor, str | None] = {}
    for record in records:
        for item in record:
            cursor = (item.epoch, item.seq)
            if item.kind == "event" and item.tag and history.get(cursor) == item.ident:
                if seen.setdefault(cursor, item.tag) != item.tag:
                    seen[cursor] = None
    return {cursor: tag for cursor, tag in seen.items() if tag is not None}


class Publishers:
    """Several :class:`PublishLoop` s publishing at once to the same projects."""

    def __init__(self, redis_url: str, projects: Sequence[int], *, count: int, rate: float):
        self.loops = [PublishLoop(redis_url, projects, rate=rate, seed=i) for i in range(count)]

    def start(self) -> Publishers:
        for loop in self.loops:
            loop.start()
        return self

    async def stop(self) -> None:
        for loop in self.loops:
            await loop.stop()

    @property
    def published(self) -> int:
        return sum(loop.published for loop in self.loops)

    @property
    def unavailable(self) -> int:
        return sum(loop.unavailable for loop in self.loops)

    async def wait_published(self, count: int, within: float = 60.0) -> None:
        """Wait until ``count`` more events than now were acknowledged."""
        target = self.published + count
        await wait_until(lambda: self.published >= target, within, f"{count} more publishes")


async def wait_live(clients: Sequence[ResumingClient], within: float = 20.0) -> None:
    """Every client connected and subscribed to all its projects."""
    await wait_until(
        lambda: all(c.live == set(c.projects) for c in clients), within, "clients subscribed"
    )


async def final_state(
    redis_url: str, projects: Iterable[int], keys
) -> dict[int, tuple[Cursor, dict[Cursor, int]]]:
    from publisher.connection import async_client

    client = async_client(redis_url)
    try:
        return {p: await read_history(client, keys, p) for p in projects}
    finally:
        await client.aclose()


async def verify_clients(
    clients: Sequence[ResumingClient],
    redis_url: str,
    *,
    keys,
    allowed_resyncs: Iterable[str] = (),
    within: float = 30.0,
) -> dict[int, tuple[Cursor, dict[Cursor, int]]]:
    """After the publishers stopped: wait until every client reached each of its projects'
    final cursor, then assert :func:`check_delivery` finds nothing wrong with any record.
    Returns each project's final cursor and history."""
    projects = sorted({p for c in clients for p in c.projects})
    state = await final_state(redis_url, projects, keys)
    finals = {p: cursor for p, (cursor, _) in state.items()}
    for client in clients:
        try:
            await client.wait_for(lambda c=client: c.reached(finals), within, "final cursors")
        except TimeoutError:
            behind = {
                p: (client.cursors.get(p), finals[p])
                for p in client.projects
                if client.cursors.get(p) != finals[p]
            }
            raise AssertionError(
                f"client {client.name} never reached the final cursors (got, expected): "
                f"{behind}; stats {client.stats}; last records "
                f"{ {p: client.log[p][-3:] for p in behind} }"
            ) from None
    problems = [f"client {c.name}: unexpected {m}" for c in clients for m in c.stats.unexpected]
    tags = {
        project_id: tags_received(
            (c.log[project_id] for c in clients if project_id in c.projects), state[project_id][1]
        )
        for project_id in projects
    }
    for client in clients:
        for project_id in client.projects:
            cursor, history = state[project_id]
            found = check_delivery(
                client.log[project_id],
                history=history,
                final=cursor,
                allowed_resyncs=allowed_resyncs,
                tags=tags[project_id],
            )
            problems += [f"client {client.name} project {project_id}: {p}" for p in found]
    assert not problems, "\n".join(problems[:30])
    return state


async def stop_clients(clients: Sequence[ResumingClient]) -> None:
    await asyncio.gather(*(c.stop() for c in clients))
