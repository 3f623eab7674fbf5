"""The order of a WebSocket connection's answers while some of its frames wait for Redis: a
differential property test of the frame lanes (gateway/lanes.py) end to end, on real Redis and an
in-process gateway.

Every Redis wait a client frame can cause is made controllable per project: the history read
(``HistoryStore.snapshot``, which both a subscribe the feed's memory cannot answer and the feed's
own baseline read go through) and the presence reads (``PresenceService.subscribe``, ``get``)
first wait at their project's gate. A gate holds its callers until a *release* of that project
lets one through, in the order they came (a release with nobody waiting is banked for the next
caller). Hypothesis picks the frames a client sends (subscribe with or without presence, with
no cursor, a current one, one of another epoch, or half a cursor; unsubscribe; presence_get;
activity; ping; a malformed frame; an ``auth`` refreshing the token to another set of projects
or with an invalid token; some several in one write, so that reading pauses part way through a
read), drawn from 10 projects with ``--max-subscriptions 3``, and where
among them each release comes. After each step the test waits until the gateway has read what
was sent (or paused reading: its backlog of held frames is full) and every project being handled
waits at its gate, so the interleaving is the one hypothesis chose; at the end every gate opens.

The reference is the same frames, on projects of their own with the same histories, sent to the
same gateway one at a time, each handled completely (no frame running, a ping answered) before
the next, with no gate: the connection's frames handled one after the other, the order they had
before the lanes. What is compared, and why:

* **per project, the sequence of answers**: type; for ``subscribed`` its ``seq``, ``resumed``
  and ``replayed``; for ``resync_required`` its reason and ``seq``; replayed events by ``seq``;
  for ``error`` its code. None of these depends on timing once no event is published during
  the example. ``presence`` counts by type only, and ``presence_diff`` is left out: member lists
  and diffs depend on the diff loop's timing, not on the order of frames. Equal sequences are
  "the frames naming one project are answered in their order" plus "with the answers the
  frames get when handled one after the other" (a ``too_many_subscriptions`` or ``forbidden``
  is the one the sequential order gives: the barrier of a subscribe at the limit and of an
  ``auth`` did their job);
* **the answers that belong to the connection**: ``authenticated`` (with its projects) and an
  invalid token's ``error``, in order; the count of malformed frames' errors (these are handled
  at once, so their place among the others is free);
* **the barrier rule for ``auth``**: the reference tells which frame each answer belongs to (the
  answers between a frame and the next one's); in the lanes' run every answer of a frame sent
  before an ``auth`` comes before its ``authenticated`` (or ``error``), every answer of a frame
  sent after it comes after;
* **pongs wait for no gate**: after each ping the gateway has read (it reads while fewer than
  4 frames are held back), its ``pong`` comes while every gate is still shut;
* **at most 8 projects wait for Redis at once**: the projects with a caller at their gate.

The places of answers about different projects relative to one another are not compared: the
lanes let them come in another order, as docs/protocol.md says.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import defaultdict, deque
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from gateway.lanes import BARRIER, CONCURRENCY
from gateway.presence_store import PresenceService
from gateway.store import HistoryStore
from gateway.websocket import WebSocketConnection
from publisher import issue_token
from tests.support.gateway_client import SECRET, RecordingClient, event, ws_url

#: Projects a client's frames name (indexes; each run maps them to project ids of its own).
PROJECTS = 10
#: ``--max-subscriptions``: small, so that the limit (and its barrier) is met often.
MAX_SUBSCRIPTIONS = 3
#: Events published to every project before an example: cursors have something to resume.
HISTORY = 3
#: Malformed frames per example at most (ten in a row close the connection).
MAX_MALFORMED = 3
#: Seconds any wait of the test may take before it fails (nothing here takes more than a few ms).
WITHIN = 10.0


class Gates:
    """Per project: its callers of a Redis read wait here until a release lets one through."""

    def __init__(self) -> None:
        self.gated: set[int] = set()
        self.opened = False
        self.credits: dict[int, int] = defaultdict(int)
        self.waiters: dict[int, deque[asyncio.Future]] = defaultdict(deque)
        #: The most projects with a caller waiting at once.
        self.most = 0

    def arm(self, project_ids) -> None:
        self.gated = set(project_ids)
        self.opened = False
        self.credits.clear()
        self.waiters.clear()
        self.most = 0

    def waiting(self, project_id: int) -> bool:
        return any(not f.done() for f in self.waiters.get(project_id, ()))

    def waiting_projects(self) -> int:
        return sum(1 for p in list(self.waiters) if self.waiting(p))

    async def wait(self, project_id: int) -> None:
        if self.opened or project_id not in self.gated:
            return
        if self.credits[project_id]:
            self.credits[project_id] -= 1
            return
        future = asyncio.get_running_loop().create_future()
        queue = self.waiters[project_id]
        queue.append(future)
        self.most = max(self.most, self.waiting_projects())
        OBSERVER.changed()
        try:
            await future
        finally:
            if future in queue:
                queue.remove(future)

    def release(self, project_id: int) -> None:
        queue = self.waiters[project_id]
        while queue:
            future = queue.popleft()
            if not future.done():
                future.set_result(None)
                return
        self.credits[project_id] += 1

    def open(self) -> None:
        self.opened = True
        for queue in self.waiters.values():
            for future in queue:
                if not future.done():
                    future.set_result(None)
            queue.clear()


class Observer:
    """Counts the frames each connection read; wakes the test when the gateway moved."""

    def __init__(self) -> None:
        self.reads: dict[Any, int] = defaultdict(int)
        self._event: asyncio.Event | None = None

    def changed(self) -> None:
        if self._event is not None:
            self._event.set()

    async def until(self, condition, what: str) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        try:
            async with asyncio.timeout(WITHIN):
                while not condition():
                    self._event.clear()
                    if condition():
                        return
                    await self._event.wait()
        except TimeoutError:
            raise AssertionError(f"the gateway never got there: {what}") from None


GATES = Gates()
OBSERVER = Observer()


@pytest.fixture
def gated(monkeypatch):
    """The gateway's Redis reads of a client's frames wait at :data:`GATES`, and
    :data:`OBSERVER` sees every frame read and every frame task end."""
    snapshot = HistoryStore.snapshot
    presence_subscribe = PresenceService.subscribe
    presence_get = PresenceService.get
    message = WebSocketConnection._message
    work = WebSocketConnection._work

    async def gated_snapshot(self, project_id, *args, **kwargs):
        await GATES.wait(project_id)
        return await snapshot(self, project_id, *args, **kwargs)

    async def gated_presence_subscribe(self, session, project_id):
        await GATES.wait(project_id)
        return await presence_subscribe(self, session, project_id)

    async def gated_presence_get(self, project_id):
        await GATES.wait(project_id)
        return await presence_get(self, project_id)

    def observed_message(self, data):
        OBSERVER.reads[self] += 1
        try:
            message(self, data)
        finally:
            OBSERVER.changed()

    async def observed_work(self, *args):
        try:
            await work(self, *args)
        finally:
            OBSERVER.changed()

    monkeypatch.setattr(HistoryStore, "snapshot", gated_snapshot)
    monkeypatch.setattr(PresenceService, "subscribe", gated_presence_subscribe)
    monkeypatch.setattr(PresenceService, "get", gated_presence_get)
    monkeypatch.setattr(WebSocketConnection, "_message", observed_message)
    monkeypatch.setattr(WebSocketConnection, "_work", observed_work)
    GATES.arm(())
    OBSERVER._event = None
    yield
    GATES.arm(())
    # (Keyed by connection: kept, they would outlive the test, and the later tests that check
    # what a closed connection leaves behind would find them.)
    OBSERVER.reads.clear()


# --- what a client sends -----------------------------------------------------------------------

# Mostly a few projects (so that their frames meet in one lane), sometimes any of them.
project = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(0, PROJECTS - 1))
cursor = st.one_of(
    st.none(),
    st.tuples(st.just("at"), st.integers(0, HISTORY + 1)),  # the project's epoch; 4 is ahead
    st.tuples(st.just("other_epoch"), st.integers(0, HISTORY)),
    st.tuples(st.just("half"), st.just(0)),  # epoch without after: invalid_cursor
)
allowed = st.frozensets(project, max_size=PROJECTS).map(lambda s: tuple(sorted(s)))
frame = st.one_of(
    st.tuples(st.just("subscribe"), project, st.booleans(), cursor),
    st.tuples(st.just("subscribe"), project, st.booleans(), cursor),
    st.tuples(st.just("unsubscribe"), project),
    st.tuples(st.just("presence_get"), project),
    st.tuples(st.just("activity"), project),
    st.tuples(st.just("ping")),
    st.tuples(st.just("malformed"), st.sampled_from(["{", '{"type":"subscribe"}'])),
    st.tuples(st.just("auth"), st.one_of(allowed, st.just("*"))),
    st.tuples(st.just("auth_invalid")),
)
release = st.tuples(st.just("release"), project)
#: Several frames in one write (one read, often): reading may pause part way through it.
burst = st.tuples(st.just("burst"), st.lists(frame, min_size=2, max_size=8).map(tuple))
steps_strategy = st.lists(st.one_of(frame, release, burst), max_size=30)


def sent_frames(steps) -> list:
    """The frames the steps send, in order (a burst's one by one)."""
    frames = []
    for step in steps:
        if step[0] == "burst":
            frames.extend(step[1])
        elif step[0] != "release":
            frames.append(step)
    return frames


class Run:
    """One run's projects: ids, epochs, tokens."""

    def __init__(self, ids: list[int], epochs: list[str]) -> None:
        self.ids = ids
        self.epochs = epochs
        self.index = {project_id: k for k, project_id in enumerate(ids)}

    def token(self, allowed_projects) -> str:
        projects = "*" if allowed_projects == "*" else [self.ids[k] for k in allowed_projects]
        return issue_token(SECRET, projects, ttl=300, subject="someone")

    def render(self, step) -> str:
        kind = step[0]
        if kind == "subscribe":
            _, k, presence, at = step
            message: dict[str, Any] = {"type": "subscribe", "project_id": self.ids[k]}
            if presence:
                message["presence"] = True
            if at is not None:
                how, after = at
                message["epoch"] = self.epochs[k] if how != "other_epoch" else "not-its-epoch"
                if how != "half":
                    message["after"] = after
            return json.dumps(message)
        if kind in ("unsubscribe", "presence_get"):
            return json.dumps({"type": kind, "project_id": self.ids[step[1]]})
        if kind == "activity":
            return json.dumps({"type": "activity", "project_id": self.ids[step[1]], "viewing": 7})
        if kind == "ping":
            return '{"type":"ping"}'
        if kind == "malformed":
            return step[1]
        if kind == "auth":
            return json.dumps({"type": "auth", "token": self.token(step[1])})
        assert kind == "auth_invalid"
        return json.dumps({"type": "auth", "token": "not.a.token"})


# --- what the client gets ----------------------------------------------------------------------

PROJECT, CONNECTION, FREE, IGNORED = "project", "connection", "free", "ignored"


def classify(message: dict, run: Run) -> tuple[str, int | None, tuple]:
    """(kind of answer, project index, what is compared of it)."""
    kind = message["type"]
    if kind == "pong":
        return FREE, None, ("pong",)
    if kind == "presence_diff":
        return IGNORED, None, ()
    if kind == "authenticated":
        projects = message["projects"]
        named = None if projects is None else tuple(sorted(run.index[p] for p in projects))
        return CONNECTION, None, ("authenticated", named)
    project_id = message.get("project_id")
    if project_id is None:
        assert kind == "error", message
        if message["code"] == "invalid_token":
            return CONNECTION, None, ("error", "invalid_token")
        return FREE, None, ("error", message["code"])
    k = run.index[project_id]
    if kind == "subscribed":
        return PROJECT, k, (kind, message["seq"], message["resumed"], message["replayed"])
    if kind == "resync_required":
        return PROJECT, k, (kind, message["reason"], message["seq"])
    if kind == "error":
        return PROJECT, k, (kind, message["code"])
    if kind in ("unsubscribed", "presence"):
        return PROJECT, k, (kind,)
    return PROJECT, k, ("event", message["seq"])


class Answers:
    """A run's answers, sorted as the comparison needs them."""

    def __init__(self) -> None:
        self.projects: dict[int, list[tuple]] = defaultdict(list)
        self.connection: list[tuple] = []
        self.malformed = 0
        #: (which list, index in it) of every answer that is not free, in the order received.
        self.order: list[tuple[Any, int]] = []

    def add(self, message: dict, run: Run) -> None:
        kind, k, summary = classify(message, run)
        if kind == PROJECT:
            self.order.append((k, len(self.projects[k])))
            self.projects[k].append(summary)
        elif kind == CONNECTION:
            self.order.append((CONNECTION, len(self.connection)))
            self.connection.append(summary)
        elif kind == FREE and summary[0] == "error":
            self.malformed += 1


# --- the two runs ------------------------------------------------------------------------------


class Connection:
    def __init__(self, gateway, client: RecordingClient, conn: WebSocketConnection) -> None:
        self.gateway = gateway
        self.client = client
        self.conn = conn
        self.sent = OBSERVER.reads[conn]  # the first auth, read

    @classmethod
    async def open(cls, gateway, token: str) -> Connection:
        before = set(gateway.sessions)
        client = await RecordingClient(ws_url(gateway), token=token, compression=None).connect()
        (session,) = set(gateway.sessions) - before
        return cls(gateway, client, session.connection)

    def read_all(self) -> bool:
        return OBSERVER.reads[self.conn] >= self.sent

    async def send(self, text: str) -> None:
        await self.client.send(text)
        self.sent += 1

    def send_at_once(self, texts) -> None:
        """The frames in one write."""
        ws = self.client.ws
        for text in texts:
            ws.protocol.send_text(text.encode())
        ws.transport.write(b"".join(ws.protocol.data_to_send()))
        self.sent += len(texts)

    def pongs(self) -> int:
        return self.client.count("pong")

    async def idle(self) -> None:
        """Every frame sent is read and handled (none waits or is held), and answered: the pong
        of a ping sent now comes after every answer."""
        await OBSERVER.until(
            lambda: self.read_all() and self.conn.lanes is None, "every frame handled"
        )
        pongs = self.pongs()
        await self.send('{"type":"ping"}')
        await self.client.wait_for(lambda: self.pongs() > pongs, within=WITHIN)


async def reference(gateway, run: Run, initial, frames) -> tuple[Answers, dict[Any, list[int]]]:
    """The frames one at a time, each handled in full before the next: the answers, and for
    each the index of the frame it answers (per project; for the connection's answers)."""
    connection = await Connection.open(gateway, run.token(initial))
    client = connection.client
    answers = Answers()
    owners: dict[Any, list[int]] = defaultdict(list)
    seen = len(client.messages)
    try:
        for i, step in enumerate(frames):
            await connection.send(run.render(step))
            await connection.idle()
            for message in client.messages[seen:]:
                before = len(answers.order)
                answers.add(message, run)
                if len(answers.order) > before:
                    owners[answers.order[-1][0]].append(i)
            seen = len(client.messages)
    finally:
        await client.close()
    return answers, owners


async def with_lanes(gateway, run: Run, initial, steps) -> Answers:
    """The frames sent as a client sends them, the gated projects released where the steps
    say: the answers."""
    connection = await Connection.open(gateway, run.token(initial))
    client, conn = connection.client, connection.conn
    GATES.arm(run.ids)

    def settled() -> bool:
        # Read all that was sent (or paused: the backlog is full), and each frame being
        # handled waits at its project's gate.
        if not connection.read_all() and not conn.paused:
            return False
        lanes = conn.lanes
        if lanes is None:
            return True
        for lane in lanes._running:  # (white box: the lanes being handled)
            if lane is BARRIER:
                if not any(GATES.waiting(p) for p in run.ids):
                    return False
            elif not GATES.waiting(lane):
                return False
        return True

    pings = 0
    try:
        for step in steps:
            if step[0] == "release":
                GATES.release(run.ids[step[1]])
            elif step[0] == "burst":
                connection.send_at_once([run.render(f) for f in step[1]])
            else:
                await connection.send(run.render(step))
                pings += step[0] == "ping"
            await OBSERVER.until(settled, f"settled after {step}")
            if step[0] == "ping" and connection.read_all():
                # Read (the backlog was not full): answered at once, whatever waits at a gate
                # (nothing is released until the next step).
                try:
                    await client.wait_for(lambda n=pings: connection.pongs() >= n, within=2.0)
                except TimeoutError:
                    raise AssertionError(f"a pong waited for Redis: {steps}") from None
        GATES.open()
        await connection.idle()
    finally:
        GATES.open()
        await client.close()
    answers = Answers()
    for message in client.messages[1:]:  # (the first: the first auth's)
        answers.add(message, run)
    return answers


_ids = itertools.count(1000, 2 * PROJECTS)


async def histories(publisher, count: int) -> Run:
    ids = [next(_ids) + k for k in range(count)]
    epochs = []
    for project_id in ids:
        cursors = await publisher.publish_many(event(project_id, n + 1) for n in range(HISTORY))
        epochs.append(cursors[-1].epoch)
    return Run(ids, epochs)


def owner_check(steps, frames, answers: Answers, owners) -> None:
    """Every answer of a frame sent before an ``auth`` comes before its answer, every answer of a
    frame sent after it comes after it."""
    owned = [owners[which][n] for which, n in answers.order]
    for position, (which, _) in enumerate(answers.order):
        if which != CONNECTION:
            continue
        auth = owned[position]
        assert frames[auth][0] in ("auth", "auth_invalid"), (frames[auth], steps)
        early = [frames[i] for i in owned[position + 1 :] if i < auth]
        late = [frames[i] for i in owned[:position] if i > auth]
        assert not early, f"sent before {frames[auth]}, answered after it: {early} ({steps})"
        assert not late, f"sent after {frames[auth]}, answered before it: {late} ({steps})"


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(initial=st.one_of(st.just(tuple(range(PROJECTS))), allowed), steps=steps_strategy)
@example(  # more projects wait for Redis than may at once: the ninth and tenth wait their turn
    initial=tuple(range(PROJECTS)),
    steps=[("presence_get", k) for k in range(PROJECTS)]
    + [("ping",)]
    + [("release", k) for k in reversed(range(PROJECTS))],
)
@example(  # an unsubscribe held behind its project frees the place a later subscribe needs
    initial=(0, 1, 2, 3),
    steps=[
        ("subscribe", 0, False, None),
        ("subscribe", 1, False, None),
        ("subscribe", 2, True, None),
        ("release", 0),
        ("release", 1),
        ("unsubscribe", 2),
        ("subscribe", 3, False, None),
        ("ping",),
        ("release", 2),
        ("release", 2),
        ("release", 3),
    ],
)
@example(  # at the limit: a subscribe waits for the unsubscribe held behind a presence read
    initial=(0, 1, 2, 3),
    steps=[
        ("subscribe", 0, False, None),
        ("subscribe", 1, False, None),
        ("subscribe", 2, False, None),
        ("release", 0),
        ("release", 1),
        ("release", 2),
        ("presence_get", 0),
        ("unsubscribe", 0),
        ("subscribe", 3, False, None),
        ("ping",),
        ("release", 0),
        ("release", 3),
    ],
)
@example(  # a token refresh dropping a project whose subscribe waits, pings meanwhile
    initial=(0, 1),
    steps=[
        ("subscribe", 0, True, ("at", 1)),
        ("subscribe", 1, False, None),
        ("auth", (1, 2)),
        ("ping",),
        ("subscribe", 2, False, ("other_epoch", 1)),
        ("activity", 0),
        ("release", 1),
        ("release", 0),
        ("release", 0),
    ],
)
async def test_answers_per_project_are_those_of_the_frames_handled_one_after_the_other(
    gateways, publisher, gated, initial, steps
):
    frames = sent_frames(steps)
    assume(sum(1 for step in frames if step[0] == "malformed") <= MAX_MALFORMED)
    # One gateway for every example of the test (each example has projects of its own).
    gateway = getattr(gateways, "frame_order_gateway", None)
    if gateway is None:
        gateway = await gateways(max_subscriptions=MAX_SUBSCRIPTIONS, subscribe_timeout=60)
        gateways.frame_order_gateway = gateway
    reference_run = await histories(publisher, PROJECTS)
    lanes_run = await histories(publisher, PROJECTS)
    expected, owners = await reference(gateway, reference_run, initial, frames)
    got = await with_lanes(gateway, lanes_run, initial, steps)
    for k in range(PROJECTS):
        assert got.projects[k] == expected.projects[k], (k, steps)
    assert got.connection == expected.connection, steps
    assert got.malformed == expected.malformed, steps
    owner_check(steps, frames, got, owners)
    assert GATES.most <= CONCURRENCY, steps


# --- regressions the property's idea found -----------------------------------------------------
# (The property sends at most MAX_MALFORMED malformed frames, and its reference syncs with pings,
# which end a run of malformed frames: runs of ten are tested here, each against the rule that
# handling the frames one after the other gives.)


async def _waiting_subscribe(gateways, publisher) -> tuple[Connection, int]:
    """A connection whose subscribe to a project waits at the project's (shut) gate."""
    gateway = await gateways(subscribe_timeout=60)
    run = await histories(publisher, 1)
    connection = await Connection.open(gateway, run.token((0,)))
    GATES.arm(run.ids)
    project_id = run.ids[0]
    await connection.send(json.dumps({"type": "subscribe", "project_id": project_id}))
    await OBSERVER.until(lambda: GATES.waiting(project_id), "the subscribe waits for Redis")
    return connection, project_id


async def test_a_frame_held_behind_redis_ends_a_run_of_malformed_frames_where_it_was_sent(
    gateways, publisher, gated
):
    """Nine malformed frames, an ``activity`` (held behind its project's subscribe, which waits
    for Redis), a tenth malformed frame: not ten in a row, the connection stays open (4009 only
    for ten malformed frames in a row, docs/protocol.md), as when every frame is handled in turn."""
    connection, project_id = await _waiting_subscribe(gateways, publisher)
    client = connection.client
    for _ in range(9):
        await connection.send("{")
    await connection.send(json.dumps({"type": "activity", "project_id": project_id, "viewing": 1}))
    await connection.send("{")
    await connection.send('{"type":"ping"}')
    await client.wait_for(lambda: client.count("pong") or client.closed.is_set(), within=WITHIN)
    assert not client.closed.is_set(), f"closed with {client.close_code}"
    GATES.open()
    await client.wait_for(lambda: client.count("subscribed", project_id) == 1, within=WITHIN)
    assert client.count("error") == 10  # the malformed frames', none about the activity
    await client.close()


async def test_ten_malformed_frames_in_a_row_close_the_connection_when_a_frame_before_waits(
    gateways, publisher, gated
):
    """An ``activity`` held behind its project's subscribe, then ten malformed frames, the
    subscribe answered among them: ten in a row after the activity, closed with 4009, as when
    every frame is handled in turn (the held activity, handled late, does not end the run)."""
    connection, project_id = await _waiting_subscribe(gateways, publisher)
    client = connection.client
    await connection.send(json.dumps({"type": "activity", "project_id": project_id, "viewing": 1}))
    for _ in range(5):
        await connection.send("{")
    await client.wait_for(lambda: client.count("error") == 5, within=WITHIN)
    GATES.open()
    await client.wait_for(lambda: client.count("subscribed", project_id) == 1, within=WITHIN)
    await OBSERVER.until(lambda: connection.conn.lanes is None, "the activity handled")
    for _ in range(5):
        await connection.send("{")
    await asyncio.wait_for(client.closed.wait(), WITHIN)
    assert client.close_code == 4009
    assert client.count("error") == 10


async def test_a_ping_sent_after_held_frames_does_not_take_their_rate_limit_tokens(
    gateways, publisher, gated
):
    """A subscribe waiting for Redis, three activities of its project (held behind it), a ping:
    five frames on a burst of four. Handled one after the other, the ping is the frame over the
    limit, and a ping over the limit is executed all the same (docs/protocol.md): nothing is
    refused. The ping, handled at once, must not take a token the held activities, sent before
    it, get when handled (the bucket is per connection, in the order frames are sent)."""
    gateway = await gateways(
        subscribe_timeout=60, max_subscriptions=1, client_burst=4, client_rate=0.01
    )
    run = await histories(publisher, 1)
    connection = await Connection.open(gateway, run.token((0,)))
    client = connection.client
    GATES.arm(run.ids)
    project_id = run.ids[0]
    await connection.send(json.dumps({"type": "subscribe", "project_id": project_id}))
    await OBSERVER.until(lambda: GATES.waiting(project_id), "the subscribe waits for Redis")
    for viewing in (1, 2, 3):
        activity = {"type": "activity", "project_id": project_id, "viewing": viewing}
        await connection.send(json.dumps(activity))
    await connection.send('{"type":"ping"}')
    await client.wait_for(lambda: client.count("pong") == 1, within=WITHIN)
    GATES.open()
    await connection.idle()  # (its ping: over the limit too, executed)
    assert client.count("subscribed", project_id) == 1
    assert client.of("error") == []
    await client.close()
