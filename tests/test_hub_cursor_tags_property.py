"""Property: every cursor the hub names to a client, on a WebSocket (``subscribed``,
``resync_required``) or an SSE stream (the ``id`` of each event and of those messages), carries
the tag of the event at that cursor, or none; never another event's. Driven through the hub with
a model of Redis whose history also moves under the feed: retention trims it, a failover loses
its last events and hands their numbers to others, a flush starts a new epoch. Reads answer what
Redis held when they were sent (events arrive while they are in flight, the feed's first read
included); windows small enough for the byte budget to evict them and for resumes to fill them.

The tag named at ``(epoch, seq)`` is checked against every event Redis ever held there (after a
failover the feed may still speak of the event it delivered, which Redis has lost), and, where
no failover ever happened, against the one event there. Per connection: ``subscribed`` after a
replay names the tag of the replay's last event; a resume answered without a replay names the
tag the client sent; and without a failover nobody is told ``history_lost`` (a wrong tag named
earlier and sent back by a resuming client would be, see 379e966). Clients resume from cursors
other clients were named (with their tags), as reconnecting ones do. And no connection gets an
event that does not follow on from the cursor it was named last (or resumed from): the history
moving back under a feed must not leave a gap for a connection whose read saw it."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway import hub as hub_module
from gateway.hub import Hub
from gateway.metrics import Metrics
from gateway.sequencing import Snapshot
from gateway.session import SlowConsumerPolicy
from gateway.sse import Cursor, SseParser, SseSession
from schemas.keys import Keys
from schemas.stored import Meta
from schemas.tags import event_tag
from tests.test_hub import FakeLink, session_of
from tests.test_sse import _Transport as StreamTransport

KEYS = Keys()
PROJECT = 3
CHANNEL = KEYS.channel(PROJECT).encode()


def frame(epoch: str, seq: int, version: int) -> bytes:
    """The event a publish stores at ``(epoch, seq)``; ``version`` counts the failovers, so an
    event published under a number a failover handed out again is another event."""
    return b'{"type":"x","project_id":%d,"e":"%s","v":%d,"seq":%d}' % (
        PROJECT,
        epoch.encode(),
        version,
        seq,
    )


#: What another writer left in a stream entry's ``f`` field: never an event.
FOREIGN = b'{"not":"an event"}'


class ModelRedis:
    """One project's history: its epoch, its top, the events the stream still holds (from
    ``first``), and every event it ever held at each ``(epoch, seq)``."""

    def __init__(self) -> None:
        self.epochs = (f"ep{n}" for n in itertools.count())
        self.epoch = next(self.epochs)
        self.top = 0
        self.first = 1
        self.version = 0
        self.events: dict[int, bytes] = {}
        self.ever: dict[tuple[str, int], set[str]] = {}
        #: Failovers and foreign values written over events: what rewrites the history.
        self.rewrites = 0

    def publish(self) -> bytes:
        self.top += 1
        data = self.events[self.top] = frame(self.epoch, self.top, self.version)
        self.ever.setdefault((self.epoch, self.top), set()).add(event_tag(data))
        return b"%s|%d|0|%s" % (self.epoch.encode(), self.top, data)

    def flush(self) -> None:
        self.epoch, self.top, self.first, self.events = next(self.epochs), 0, 1, {}

    def trim(self, count: int) -> None:
        """Retention drops the oldest ``count`` entries (the meta's seq stays)."""
        self.first = min(self.top + 1, self.first + count)
        self.events = {s: f for s, f in self.events.items() if s >= self.first}

    def failover(self, count: int) -> None:
        """A replica that had not received the last ``count`` events takes over."""
        if not count or not self.top:
            return
        self.rewrites += 1
        self.version += 1
        self.top = max(0, self.top - count)
        self.events = {s: f for s, f in self.events.items() if s <= self.top}
        self.first = min(self.first, self.top + 1)

    def corrupt(self, seq: int) -> None:
        """Another writer puts a value that is no event in the place of the entry at ``seq``."""
        if seq not in self.events:
            return
        self.rewrites += 1
        data = self.events[seq] = FOREIGN
        self.ever.setdefault((self.epoch, seq), set()).add(event_tag(data))

    def tag_at(self, seq: int) -> str | None:
        data = self.events.get(seq) if seq >= 1 else None
        return event_tag(data) if data is not None else None

    async def snapshot(self, project_id, epoch=None, after=None, limit=0, max_bytes=0):
        entries: list[tuple[int, bytes]] = []
        scanned = 0
        corrupt_at = None
        if epoch == self.epoch and after is not None and 0 <= after < self.top:
            held = [(s, self.events[s]) for s in range(after + 1, self.top + 1) if s in self.events]
            held = held[:limit] if limit else held
            scanned = len(held)
            # As gateway.store parses a read: nothing from the first foreign entry on.
            for seq, data in held:
                if data == FOREIGN:
                    corrupt_at = seq
                    break
                entries.append((seq, data))
        after_tag = None
        if epoch == self.epoch and after is not None and 1 <= after <= self.top:
            after_tag = self.tag_at(after)
        # Taken now, answered after a round trip: what is published meanwhile is not in it.
        snapshot = Snapshot(
            self.epoch,
            self.top,
            entries,
            corrupt_at=corrupt_at,
            scanned=scanned,
            top_tag=self.tag_at(self.top),
            after_tag=after_tag,
        )
        await asyncio.sleep(0)
        return snapshot

    async def cursors(self, project_ids, keep_alive=(), make_permanent=()):
        return [Meta(self.epoch, self.top) for _ in project_ids]


def _cursor_of(text: str) -> tuple[str, int, str | None]:
    parts = text.split(":")
    return parts[0], int(parts[1]), parts[2] if len(parts) > 2 else None


class Client:
    """One connection: what it subscribed with, and what it was sent, as
    ``(kind, epoch, seq, tag, message)`` (events: ``("x", ...)``, their own tag)."""

    def __init__(self, hub: Hub, sse: bool, cursor: tuple[str, int, str | None] | None) -> None:
        self.sse = sse
        self.cursor = cursor
        if sse:
            cursors = {PROJECT: Cursor(*cursor)} if cursor is not None else {}
            self.session = SseSession(
                StreamTransport(),
                SlowConsumerPolicy(1 << 20, 30),
                hub.schedule_flush,
                multi=False,
                cursors=cursors,
                project_id=PROJECT,
            )
        else:
            self.session = session_of(hub)

    def record(self) -> list[tuple[str, str, int, str | None, dict]]:
        out = []
        if not self.sse:
            for message in self.session.transport.messages():
                kind = message["type"]
                if kind == "x":
                    out.append((kind, message["e"], message["seq"], None, message))
                else:
                    out.append((kind, message["epoch"], message["seq"], message["tag"], message))
            # An event's own tag is the hash of its text as sent: take it from the frames.
            frames = iter(self._event_texts())
            out = [
                (k, e, s, event_tag(next(frames)) if k == "x" else t, m) for k, e, s, t, m in out
            ]
            return out
        for event in SseParser().feed(self.session.transport.data):
            message = json.loads(event.data)
            epoch, seq, tag = _cursor_of(event.id) if event.id is not None else (None, 0, None)
            kind = "x" if event.event == "message" else event.event
            if kind == "x":
                # The id names the event's cursor: its seq, and the tag of its own text.
                assert (epoch, seq) == (message["e"], message["seq"]), event
                assert tag == event_tag(event.data.encode()), event
            else:
                assert kind == message["type"], event
                assert (epoch, seq, tag) == (message["epoch"], message["seq"], message["tag"])
            out.append((kind, epoch, seq, tag, message))
        return out

    def _event_texts(self) -> list[bytes]:
        data, out, i = bytes(self.session.transport.data), [], 0
        while i < len(data):
            length, start = data[i + 1], i + 2
            if length == 126:
                length, start = int.from_bytes(data[i + 2 : i + 4], "big"), i + 4
            text = data[start : start + length]
            if json.loads(text)["type"] == "x":
                out.append(text)
            i = start + length
        return out


#: Operations, weighted by repetition; each takes an integer it reads as it needs.
KINDS = [
    *["publish"] * 8,
    *["run"] * 3,
    *["subscribe"] * 3,  # fresh, or resuming from a cursor some client was named
    "storm",  # three clients at one such cursor
    "deliver_late",
    "trim",
    "failover",
    *["corrupt"] * 2,  # one of the last two events
    "flush",
    "reconcile",
]
operation = st.tuples(st.sampled_from(KINDS), st.integers(0, 1 << 16))


@settings(max_examples=600, deadline=None)
# 379e966: events published during the feed's first read, then resumes with the tag the window
# named for its top.
@example(
    ops=[("publish", 0), ("publish", 0), ("subscribe", 3), ("subscribe", 7)],
    window_events=4,
    max_replay=10,
    window_bytes=1 << 20,
    failovers=False,
)
# Events published before the feed's first read: the window starts at their top, naming its
# tag; two more arrive and the byte budget evicts the first. A client resuming at it, with its
# tag, must be answered from Redis or replayed to, never told history_lost by a window that
# still named the first read's tag for it.
@example(
    ops=[("publish", 0)] * 3
    + [("run", 3), ("run", 3), ("publish", 0), ("publish", 0)]
    + [("run", 3), ("subscribe", 12)],
    window_events=3,
    max_replay=10,
    window_bytes=300,
    failovers=False,
)
# Seed 199 of the interleavings walk, as the search for gaps found it: a failover takes 1 and 2
# from under a feed that delivered them; a client's read (top 0) goes live behind the feed,
# which then delivers the new master's 3: the client got it after ``subscribed`` at 0.
@example(
    ops=[
        ("run", 7350),
        ("storm", 25979),
        ("publish", 16584),
        ("publish", 46032),
        ("run", 36480),
        ("failover", 54079),
        ("subscribe", 57596),
        ("publish", 20351),
        ("publish", 50378),
        ("publish", 63592),
    ],
    window_events=1,
    max_replay=21,
    window_bytes=300,
    failovers=True,
)
@given(
    ops=st.lists(operation, max_size=50),
    window_events=st.integers(0, 6),
    max_replay=st.integers(2, 10),
    window_bytes=st.sampled_from([1 << 20, 0, 300, 700, 1200]),
    failovers=st.booleans(),  # and foreign values written over events
)
@pytest.mark.parametrize("repair_batch", [hub_module.REPAIR_BATCH, 2])
def test_every_cursor_named_carries_the_tag_of_its_event(
    repair_batch, ops, window_events, max_replay, window_bytes, failovers
):
    """``repair_batch``: the feed's reads are also cut short by their count (they page on)."""
    saved = hub_module.REPAIR_BATCH
    hub_module.REPAIR_BATCH = repair_batch
    try:
        asyncio.run(scenario(ops, window_events, max_replay, window_bytes, failovers))
    finally:
        hub_module.REPAIR_BATCH = saved


async def scenario(ops, window_events, max_replay, window_bytes, failovers) -> None:
    redis = ModelRedis()
    hub = Hub(
        keys=KEYS,
        store=redis,
        metrics=Metrics(),
        max_replay=max_replay,
        subscribe_timeout=5,
        window_events=window_events,
        window_bytes=window_bytes,
    )
    hub.link = FakeLink()
    late: list[bytes] = []
    clients: list[Client] = []
    tasks = []

    def live(message: bytes) -> None:
        hub.on_pubsub_message(CHANNEL, message)

    def connect(arg: int, cursor=None) -> Client:
        client = Client(hub, sse=bool(arg & 1), cursor=cursor)
        clients.append(client)
        epoch, after, tag = cursor if cursor is not None else (None, None, None)
        tasks.append(asyncio.create_task(hub.subscribe(client.session, PROJECT, epoch, after, tag)))
        return client

    def named_cursor(arg: int):
        """A cursor some client was named so far (an event's, a subscribed's, a resync's), with
        its tag or (one time in four) without; None (a fresh subscribe) when none yet."""
        named = [(e, s, t) for c in clients for (_, e, s, t, _) in c.record() if e is not None]
        if not named or arg % 5 == 0:
            return None
        if arg & 4:  # one of the latest the first client was named: a resume just behind
            recent = [(e, s, t) for (_, e, s, t, _) in clients[0].record() if e is not None]
            named = recent[-6:] or named
        epoch, seq, tag = named[(arg >> 3) % len(named)]
        return (epoch, seq, None if (arg >> 1) % 4 == 0 else tag)

    # The pod starts following the project as the interleaving starts: what is published while
    # its first read is in flight is held and delivered after it.
    connect(0)
    await asyncio.sleep(0)
    for op, arg in ops:
        if op == "publish":
            message = redis.publish()
            how = arg % 5  # mostly live; else lost on the channel, or late
            if how < 3:
                live(message)
            elif how == 4:
                late.append(message)
        elif op == "deliver_late" and late:
            live(late.pop(arg % len(late)))
        elif op == "subscribe":
            connect(arg, named_cursor(arg))
            await asyncio.sleep(0)
        elif op == "storm":
            cursor = named_cursor(arg)
            for n in range(3):
                connect(arg >> n, cursor)
            await asyncio.sleep(0)
        elif op == "trim":
            redis.trim(1 + arg % 4)
        elif op == "failover" and failovers:
            redis.failover(1 + arg % 3)
        elif op == "corrupt" and failovers and redis.top:
            redis.corrupt(redis.top - arg % 2)
        elif op == "flush":
            redis.flush()
        elif op == "reconcile":
            await hub.reconcile()
        elif op == "run":
            for _ in range(1 + arg % 4):
                await asyncio.sleep(0)
    for message in late:
        live(message)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    for _ in range(4):
        for _ in range(10):
            await asyncio.sleep(0)
        await hub.reconcile()
    for _ in range(20):
        await asyncio.sleep(0)
    for client in clients:
        check_client(client, redis)


def check_client(client: Client, redis: ModelRedis) -> None:
    record = client.record()
    # No gap: each event follows the cursor the client was named last (by an event, a resync
    # or ``subscribed``), or its own for the first (seed 199 of the interleavings walk: a
    # client told history_lost at 20 by its read, behind a feed still at a lost 22, got 23).
    cursor = client.cursor[:2] if client.cursor is not None else None
    for kind, epoch, seq, _, message in record:
        if kind == "x" and cursor is not None:
            assert (epoch, seq) == (cursor[0], cursor[1] + 1), (message, cursor, record)
        cursor = (epoch, seq)
    for kind, epoch, seq, tag, message in record:
        if tag is None:
            continue
        held = redis.ever.get((epoch, seq), set())
        assert tag in held, ("a tag of no event ever at its cursor", message, client.cursor)
        if not redis.rewrites:
            assert held == {tag}
        if kind == "resync_required" and not redis.rewrites:
            assert message["reason"] != "history_lost", (message, client.cursor)
    # On its connection: the replay, then ``subscribed`` (named at the replay's last event, or
    # at the client's own cursor when resumed without a replay).
    replayed = list(itertools.takewhile(lambda entry: entry[0] == "x", record))
    rest = record[len(replayed) :]
    while rest and rest[0][0] == "resync_required":
        rest = rest[1:]
    assert rest and rest[0][0] == "subscribed", record
    _, epoch, seq, tag, subscribed = rest[0]
    if replayed:
        assert subscribed["resumed"] and (epoch, seq) == replayed[-1][1:3], record
        assert tag in (None, replayed[-1][3]), (subscribed, replayed[-1])
    elif subscribed["resumed"] and client.cursor is not None:
        assert (epoch, seq) == client.cursor[:2], (subscribed, client.cursor)
        sent = client.cursor[2]
        assert sent is None or tag is None or tag == sent, (subscribed, client.cursor)
