"""The core promise under interleaved faults: a seeded random walk over real processes.

Each fault test (test_faults, test_sse_faults, test_resume_window_gateway, test_redis_garbage)
exercises one fault at a time; this one draws a sequence of steps at random from a seed and runs it
against a private ``redis-server``, two gateway processes (one with the default resume window and
replay limit, one with a window of 4 events and ``--max-replay 20``, so resumes take the memory
path, the window fill, the read and too_far_behind) and WebSocket and SSE :class:`ResumingClient`
ones, and the Python consumer (:class:`consumer.Consumer` with a cursor file,
tests/support/consumer_client.py, judged on what ``consumer.events()`` hands its caller): publishes
(awaited, concurrent to every project, or in the background through the next steps), clients
dropping, aborting (alone or all at once), leaving and coming back from their cursors,
unsubscribing and resubscribing (the consumer: closing the subscription that holds a project and
following it again from its cursor store), gateways drained or killed and started again, the
pub/sub links killed, streams trimmed below the clients' cursors, projects deleted, Redis stopped
(SIGSTOP, in the background through the next steps) or restarted empty, **failovers** (Redis loses
a project's last 1 to 3 events, as a replica promoted after its master died would: the stream
rebuilt without them, the seq stepped back; then 0 to 5 new events reuse their numbers; sometimes
while the gateways' pub/sub links are down, and any client away at the time resumes later from a
lost event), waits for everyone to catch up, and pauses of random length between them. Every client
resumes with the tag of the event at its cursor (docs/protocol.md, "Cursor tags"): a resume without
one is taken at its number, and a failover would pass unnoticed (documented), so an untagged client
would fail this verdict.

The verdict is :func:`check_delivery`'s, on every client's whole record of every project (across
its leaving and coming back), against a :class:`Lineage` of everything published (what Redis
acknowledged, every stream as read before a fault destroyed or rewrote it, and what each
failover took): every event exactly once, in order, each one published at its position and
right after the event before it in the history it belongs to, or an explicit
``resync_required``. So after an event a failover lost, the next thing in the client's record
of that project is the next event lost with it or a ``resync_required``, never an event of the
new history, and no record ends on a lost event (except an event retention had already trimmed
from the stream when the failover came, after a trim step to 0 to 3 entries, or whose position
a trim took later, before a client or a gateway's feed that held it resumed there: nothing is
left to compare its tag with, as docs/protocol.md says, so that one may pass unwarned, seeds
179 and 1230); a ``subscribed`` that acknowledges a cursor names (by its tag) the event the client
has there. And :func:`resync_problems`': each resync
follows a fault that justifies its reason (a trim: ``history_trimmed``; a deleted project or an
emptied Redis: ``epoch_changed``; ``too_far_behind``: more than ``--max-replay`` behind;
``history_lost``: a failover of the project) and moves the client forward (``history_lost``
excepted: the history was rewritten); the resync after a lost event is ``history_lost`` or
``epoch_changed`` (or, once a trim may have taken the event at the cursor, leaving nothing to
compare, ``history_trimmed`` / ``too_far_behind``).

What is *not* required: that ``history_lost`` reaches only clients that received a lost event.
A client can hold a lost event without receiving it (a ``subscribed`` or resync whose top a
failover then took), and a client that only read the new history can be told conservatively: a
pod whose joining connection read past its live feed compares the events the feed delivers
later with what the connection read, and a stale feed still delivering the lost event makes
them differ, although the client's own events are the new ones (reloading is safe, staying
silent would not be). So ``history_lost`` is justified for every client of the project from
its first failover on. What the records prove is the other direction: no event skipped or
swapped, and no lost event kept, without a ``resync_required`` saying so.

After the walk every gateway is started, every client brought back, one more event published to
each project, and every client must reach each project's top (an awaited condition with a
deadline: silence fails the test).

The plan is a pure function of the seed and the step count (:func:`plan_walk`), printed with the
seed on a failure: ``EVENTBUS_INTERLEAVING_SEEDS=<seed> EVENTBUS_INTERLEAVING_STEPS=<n>`` replays
it (the timing differs, the steps do not). Longer runs: ``EVENTBUS_INTERLEAVING_SEEDS=1-200``
(a range, or a list ``3,17``) and ``EVENTBUS_INTERLEAVING_STEPS=60``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import tempfile
from dataclasses import dataclass, field

import pytest

from publisher import PublisherUnavailable
from publisher.connection import async_client
from schemas.keys import Keys
from schemas.tags import event_tag
from tests.support.consumer_client import ConsumerClient
from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import RedisServer
from tests.support.sse_client import ResumingSseClient
from tests.support.ws_client import (
    Cursor,
    Lineage,
    PublishLoop,
    Received,
    ResumingClient,
    check_delivery,
    wait_until,
)

KEYS = Keys()
PROJECTS = (1, 2, 3)


def _seeds() -> list[int]:
    spec = os.environ.get("EVENTBUS_INTERLEAVING_SEEDS", "1-5,17")
    seeds: list[int] = []
    for part in spec.split(","):
        low, _, high = part.strip().partition("-")
        seeds += range(int(low), int(high or low) + 1)
    return seeds


STEPS = int(os.environ.get("EVENTBUS_INTERLEAVING_STEPS", "30"))


# --- the plan: pure, from the seed --------------------------------------------------------


@dataclass(frozen=True)
class ClientSpec:
    name: str
    kind: str  # "ws" (ResumingClient), "sse" (ResumingSseClient), "consumer" (ConsumerClient)
    projects: tuple[int, ...]

    @property
    def pausable(self) -> bool:
        """Whether the walk pauses it (unsubscribe, then resubscribe): WebSocket test clients,
        and the consumer (``Subscription.aclose()``, then ``events(project)`` from its store);
        not an SSE stream, which has no unsubscribe."""
        return self.kind in ("ws", "consumer")


#: The clients of every walk: WebSocket ones of one and several projects, an SSE stream of one
#: project and one of two (compound cursors), and the Python consumer (``consumer.Consumer``,
#: tests/support/consumer_client.py) following two projects, with a cursor file.
CLIENTS = (
    ClientSpec("ws-a", "ws", (1, 2)),
    ClientSpec("ws-b", "ws", (3,)),
    ClientSpec("ws-c", "ws", (1, 2, 3)),
    ClientSpec("sse-a", "sse", (2,)),
    ClientSpec("sse-b", "sse", (1, 3)),
    ClientSpec("ws-d", "ws", (2, 3)),
    ClientSpec("py-a", "consumer", (1, 3)),
)

#: The two gateways' extra flags: the second keeps a resume window of 4 events only, and replays
#: at most 20 events (further behind: too_far_behind).
_ARGS = ["--drain-timeout", "5", "--probe-interval", "1", "--reconcile-interval", "1"]
MAX_REPLAY = 20
GATEWAY_ARGS = (
    _ARGS,
    [*_ARGS, "--resume-window-events", "4", "--max-replay", str(MAX_REPLAY)],
)
REASONS = {"epoch_changed", "history_trimmed", "too_far_behind", "history_lost"}

Step = tuple  # ("publish", project, count), ("kill", gateway), ...


@dataclass
class _Model:
    """What the plan needs to know of the system's state: which gateways run, which clients
    are connected, which projects each has left."""

    gateways_up: list[bool] = field(default_factory=lambda: [True, True])
    clients_up: list[bool] = field(default_factory=lambda: [True] * len(CLIENTS))
    paused: list[set[int]] = field(default_factory=lambda: [set() for _ in CLIENTS])


def plan_walk(seed: int, steps: int) -> list[Step]:
    """The walk for ``seed``: ``steps`` steps drawn at random, each possible in the state the
    steps before it leave (a gateway that runs is killed, one that does not is started, ...)."""
    rng = random.Random(seed)
    model = _Model()
    plan: list[Step] = []
    while len(plan) < steps:
        options: list[tuple[float, Step]] = []
        up = [c for c, running in enumerate(model.clients_up) if running]
        pausable_up = [c for c in up if CLIENTS[c].pausable]
        options.append((6, ("publish", rng.choice(PROJECTS), rng.randint(1, 8))))
        options.append((2, ("burst", rng.choice(PROJECTS), rng.randint(5, 30))))
        options.append((1, ("flood", rng.randint(10, 40))))
        options.append((3, ("wait", rng.choice((0, 10, 50, 200, 600)))))
        if any(model.gateways_up):
            options.append((1.5, ("settle",)))
        if up:
            options.append((1.5, ("abort", rng.choice(up))))
            options.append((1, ("drop", rng.choice(up))))
            options.append((0.7, ("abort_all",)))
            options.append((1.5, ("leave", rng.choice(up))))
        down = [c for c, running in enumerate(model.clients_up) if not running]
        if down:
            options.append((2, ("return", rng.choice(down))))
        if pausable_up:
            client = rng.choice(pausable_up)
            project = rng.choice(CLIENTS[client].projects)
            action = "unpause" if project in model.paused[client] else "pause"
            options.append((1.5, (action, client, project)))
        for gateway, running in enumerate(model.gateways_up):
            if running:
                options.append((1, ("term", gateway)))
                options.append((1, ("kill", gateway)))
            else:
                options.append((2.5, ("start", gateway)))
        options.append((1, ("kill_pubsub",)))
        options.append((1.5, ("trim", rng.choice(PROJECTS), rng.randint(0, 3))))
        options.append((0.7, ("delete", rng.choice(PROJECTS))))
        options.append((0.7, ("freeze", rng.choice((200, 700, 1500)))))
        options.append((0.5, ("restart_redis",)))
        options.append(
            (
                1.2,
                (
                    "failover",
                    rng.choice(PROJECTS),
                    rng.randint(1, 3),
                    rng.randint(0, 5),
                    rng.random() < 0.3,
                ),
            )
        )
        weights = [weight for weight, _ in options]
        step = rng.choices([s for _, s in options], weights)[0]
        kind = step[0]
        if kind in ("term", "kill"):
            model.gateways_up[step[1]] = False
        elif kind == "start":
            model.gateways_up[step[1]] = True
        elif kind == "leave":
            model.clients_up[step[1]] = False
        elif kind == "return":  # a new connection, following all its projects
            model.clients_up[step[1]] = True
            model.paused[step[1]] = set()
        elif kind == "pause":
            model.paused[step[1]].add(step[2])
        elif kind == "unpause":
            model.paused[step[1]].discard(step[2])
        plan.append(step)
    return plan


def test_the_plan_is_a_function_of_the_seed():
    assert plan_walk(7, 40) == plan_walk(7, 40)
    assert plan_walk(7, 40) != plan_walk(8, 40)
    kinds = {step[0] for seed in range(20) for step in plan_walk(seed, 40)}
    assert kinds >= {
        "publish",
        "burst",
        "kill",
        "term",
        "start",
        "trim",
        "delete",
        "freeze",
        "failover",
    }
    # The clients without pause (SSE streams) are never paused, and every client, the consumer
    # too, is aborted, dropped, leaves and comes back, and (but SSE) is paused and unpaused in
    # some walk.
    steps = [step for seed in range(30) for step in plan_walk(seed, 40)]
    assert all(CLIENTS[s[1]].pausable for s in steps if s[0] in ("pause", "unpause"))
    consumer = next(i for i, spec in enumerate(CLIENTS) if spec.kind == "consumer")
    assert {s[0] for s in steps if s[1:2] == (consumer,)} >= {
        "abort",
        "drop",
        "leave",
        "return",
        "pause",
        "unpause",
    }


def test_the_verdict_after_a_failover_requires_a_resync_before_the_new_history():
    """Events 1..5 (ids 101..105); a failover keeps 3, losing 104 and 105; the new history's 4
    and 5 are 204 and 205. Pure: the records are made up."""
    lineage = Lineage()
    for seq in (1, 2, 3, 4, 5):
        lineage.add(("e", seq), 100 + seq, f"t{100 + seq}")
    stream = [(seq, 100 + seq, f"t{100 + seq}") for seq in (1, 2, 3, 4, 5)]
    assert lineage.add_failover("e", 5, 3, stream) == 1
    for seq in (4, 5):
        lineage.add(("e", seq), 200 + seq, f"t{200 + seq}")
    head = [Received("subscribed", "e", 0, resumed=False)]
    head += [Received("event", "e", s, ident=100 + s, tag=f"t{100 + s}") for s in (1, 2, 3)]

    def problems(*rest: Received, justified=None) -> list[str]:
        record = head + list(rest)
        found = check_delivery(record, lineage=lineage, allowed_resyncs=REASONS)
        return found + resync_problems(record, justified or {}, lineage)

    lost4 = Received("event", "e", 4, ident=104, tag="t104")
    new4, new5 = (Received("event", "e", s, ident=200 + s, tag=f"t{200 + s}") for s in (4, 5))
    told = Received("resync", "e", 5, reason="history_lost", tag="t205")
    # The client had none of the lost events, or had them and was told: the promise held.
    assert problems(new4, new5) == []
    assert problems(lost4, told, justified={"history_lost": 4}) == []
    # A lost event followed by the new history's next one, or by nothing, is a silent swap.
    (swap,) = problems(lost4, new5)
    assert "event 205 after event 104 (lost by failover #1)" in swap
    (kept,) = problems(lost4)
    assert "ends at event 104 (lost by failover #1)" in kept
    # A subscribed that acknowledges the client's cursor naming another event there.
    acked = Received("subscribed", "e", 4, resumed=True, tag="t204")
    assert "the client has 104 (lost by failover #1) there" in problems(lost4, acked, new5)[0]
    # history_lost needs a failover; after a lost event, a trim's reason needs a trim.
    assert "no fault justified it" in problems(lost4, told)[0]
    trimmed = Received("resync", "e", 5, reason="history_trimmed", tag="t205")
    assert problems(lost4, trimmed, justified={"history_trimmed": 5}) == []
    corrupt = Received("resync", "e", 5, reason="history_corrupt", tag="t205")
    why = problems(lost4, corrupt, justified={"history_lost": 0, "history_corrupt": 0})
    assert any("the client had event 104, lost by a failover" in p for p in why), why
    # Too far behind anyway (more than MAX_REPLAY): a resync to the top either way, which a
    # window that no longer knows the event at the cursor answers without a read.
    far = Received("resync", "e", 4 + MAX_REPLAY + 1, reason="too_far_behind")
    assert problems(lost4, far, justified={"history_lost": 0}) == []
    near = Received("resync", "e", 4 + MAX_REPLAY, reason="too_far_behind")
    assert any("the client had event 104" in p for p in problems(lost4, near))
    assert problems(lost4, far, justified={"history_lost": 0, "history_trimmed": 2}) == []


def test_a_lineage_knows_the_order_of_lost_events_a_trim_took_from_the_stream():
    """Seed 112 (60 steps): a trim left only 28 and 29 in the stream, a failover then lost 27 to
    29; 27 (known from before the trim) and 28 were one after the other."""
    lineage = Lineage()
    for seq in range(1, 30):
        lineage.add(("e", seq), 100 + seq)
    lineage.add_failover("e", 29, 26, [(28, 128, "t128"), (29, 129, "t129")])
    assert lineage.follows(126, 127) and lineage.follows(127, 128) and lineage.follows(128, 129)
    lineage.add(("e", 27), 227)
    assert lineage.follows(126, 227) and not lineage.follows(128, 227)
    assert not lineage.follows(227, 128)
    # 127 was trimmed before the failover: nothing could tell a client that had it.
    assert lineage.untraced == {127} and lineage.follows(127, 228)


def test_a_lost_event_whose_position_a_later_trim_took_can_pass_unwarned():
    """Seed 1230: a failover lost 104 and 105 (the new history: 204, 205), retention then took
    everything up to 5 from the stream, and 206 was published. A gateway whose feed had 105 at
    5 (its pub/sub link down through the failover) reads on from 5: the stream has no entry 5
    left to compare 105 with (docs/protocol.md, "Cursor tags"), so its clients get 206 after 105
    unwarned. Before the trim, that was a silent swap; after it, the documented limit."""
    lineage = Lineage()
    for seq in (1, 2, 3, 4, 5):
        lineage.add(("e", seq), 100 + seq, f"t{100 + seq}")
    stream = [(seq, 100 + seq, f"t{100 + seq}") for seq in (1, 2, 3, 4, 5)]
    lineage.add_failover("e", 5, 3, stream)
    for seq in (4, 5, 6):
        lineage.add(("e", seq), 200 + seq, f"t{200 + seq}")
    assert not lineage.follows(105, 206) and not lineage.follows(104, 205)
    lineage.add_trim("e", 5)  # entries 1 to 4 gone: 4's position, not 5's
    assert lineage.untraced == {104}
    assert lineage.follows(104, 205) and not lineage.follows(105, 206)
    lineage.add_trim("other", 7)  # another epoch's trim takes nothing of this one
    lineage.add_trim("e", 6)
    assert lineage.untraced == {104, 105} and lineage.follows(105, 206)
    assert lineage.follows(204, 205) and not lineage.follows(205, 104)


# --- running it ----------------------------------------------------------------------------


class Walk:
    """The processes and clients of one walk, what was published, and which resyncs the faults
    so far justify."""

    def __init__(self, server: RedisServer, gateways: list[GatewayProcess]) -> None:
        self.server = server
        self.gateways = gateways
        self.publisher = PublishLoop(server.url, PROJECTS, rate=1)
        self.clients: list[ResumingClient] = []
        self.instances: list[ResumingClient] = []  # every client object made, for their stats
        self.bursts: list[asyncio.Task] = []
        self.thaws: list[asyncio.Task] = []
        #: Everything ever published, by position: the acknowledged publishes, and every stream
        #: read before a fault destroyed or rewrote it (a publish that failed may still have been
        #: written); and what each failover lost.
        self.lineage = Lineage()
        #: ``(client, project) -> {reason: index}``: from which record of the client's log on
        #: a resync for that reason is justified (the log's length when the fault began).
        self.justified: dict[tuple[str, int], dict[str, int]] = {}
        self.done: list[str] = []
        self.files = tempfile.TemporaryDirectory(prefix="walk-")  # the consumers' cursor files

    def make_client(
        self,
        index: int,
        cursors: dict[int, Cursor] | None = None,
        tags: dict[int, str | None] | None = None,
    ):
        spec = CLIENTS[index]
        if spec.kind == "consumer":  # one cursor file per client, kept across leave and return
            path = os.path.join(self.files.name, f"{spec.name}.json")
            urls = [g.ws_url for g in self.gateways]
            client = ConsumerClient(
                urls,
                spec.projects,
                start=index,
                name=spec.name,
                cursors=cursors,
                tags=tags,
                store_path=path,
            )
        else:
            kind = ResumingSseClient if spec.kind == "sse" else ResumingClient
            urls = [g.http_url if spec.kind == "sse" else g.ws_url for g in self.gateways]
            client = kind(
                urls, spec.projects, start=index, name=spec.name, cursors=cursors, tags=tags
            )
        client.left = False  # stopped by a "leave" step
        self.instances.append(client)
        return client

    async def start(self) -> None:
        self.clients = [self.make_client(i).start() for i in range(len(CLIENTS))]
        await wait_until(
            lambda: all(c.live == set(c.projects) for c in self.clients), 30, "clients subscribed"
        )

    async def close(self) -> None:
        await asyncio.gather(*self.thaws, return_exceptions=True)
        for task in self.bursts:
            task.cancel()
        await asyncio.gather(*self.bursts, return_exceptions=True)
        await asyncio.gather(*(c.stop() for c in self.instances))
        await self.publisher.stop()
        self.files.cleanup()

    def justify(self, reason: str, projects) -> None:
        """A fault that justifies ``reason`` for ``projects`` begins now."""
        for client in self.clients:
            for project_id in set(projects) & set(client.projects):
                at = self.justified.setdefault((client.name, project_id), {})
                at.setdefault(reason, len(client.log[project_id]))

    async def redis(self, command):
        client = async_client(self.server.url)
        try:
            return await command(client)
        finally:
            await client.aclose()

    async def remember(self) -> None:
        """Read every stream before a fault destroys it (see :attr:`history`)."""

        async def read(client):
            for project_id in PROJECTS:
                epoch = await client.hget(KEYS.meta(project_id), "epoch")
                if epoch is not None:
                    entries = await client.xrange(KEYS.stream(project_id))
                    for seq, ident, tag in _entries(entries):
                        self.lineage.add((epoch.decode(), seq), ident, tag)

        await self.redis(read)

    async def failover(self, project_id: int, lose: int) -> None:
        """Redis loses the project's last ``lose`` events, as a replica promoted after its
        master died would (replication is asynchronous): the stream rebuilt without them (a
        stream remembers its last id: XDEL would not do), and the seq stepped back. Atomic
        (a script), so that the walk knows which events it took even during a burst."""
        found = await self.redis(
            lambda r: r.eval(_FAILOVER, 2, KEYS.stream(project_id), KEYS.meta(project_id), lose)
        )
        if found:
            epoch, top, keep, entries = found
            self.lineage.add_failover(epoch.decode(), int(top), int(keep), _entries(entries))

    async def publish(self, project_id: int, count: int, gap: float = 0.0) -> None:
        for _ in range(count):
            try:
                cursor = await self.publisher.publish_one(project_id)
                at = (cursor.epoch, cursor.seq)
                self.lineage.add(at, self.publisher.acked[project_id][at])
            except PublisherUnavailable:
                pass  # written or not: the stream read later settles it
            if gap:
                await asyncio.sleep(gap)

    async def freeze(self, seconds: float) -> None:
        """Redis stopped (SIGSTOP: connections open, nothing answered) for ``seconds``."""
        process = self.server.process
        assert process is not None
        process.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)  # the fault itself lasts this long
        finally:
            if process.poll() is None:  # not restarted meanwhile
                process.send_signal(signal.SIGCONT)

    async def top(self, client, project_id: int) -> Cursor | None:
        epoch, seq = await client.hmget(KEYS.meta(project_id), "epoch", "seq")
        return None if epoch is None else (epoch.decode(), int(seq))

    async def settle(self, within: float) -> None:
        """Every running client at the top of every project it follows (and has not left)."""
        client = async_client(self.server.url)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        try:
            while True:
                tops = {p: await self.top(client, p) for p in PROJECTS}
                behind = {
                    (c.name, p): (c.cursors.get(p), tops[p])
                    for c in self.clients
                    if not c.left
                    for p in c.projects
                    if p not in c.paused and c.cursors.get(p) != tops[p]
                }
                if not behind:
                    return
                if loop.time() > deadline:
                    raise AssertionError(f"never caught up within {within}s (got, top): {behind}")
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def run(self, step: Step) -> None:
        kind, *args = step
        if kind == "publish":
            await self.publish(*args)
        elif kind == "burst":  # in the background, through the next steps
            self.bursts.append(asyncio.create_task(self.publish(*args, gap=0.005)))
        elif kind == "flood":  # every project at once, as fast as Redis takes them
            await asyncio.gather(*(self.publish(p, args[0]) for p in PROJECTS))
        elif kind == "wait":
            await asyncio.sleep(args[0] / 1000)
        elif kind == "settle":
            await self.settle(30)
        elif kind == "abort":
            self.clients[args[0]].abort()
        elif kind == "abort_all":  # a storm of resumes
            for client in self.clients:
                client.abort()
        elif kind == "drop":
            await self.clients[args[0]].drop()
        elif kind == "leave":
            self.clients[args[0]].left = True
            await self.clients[args[0]].stop()
        elif kind == "return":
            (index,) = args
            old = self.clients[index]
            new = self.make_client(index, dict(old.cursors), old.cursor_tags())
            new.log = old.log  # one record across the two: the resume is checked too
            new.paused = set()
            self.clients[index] = new.start()
        elif kind == "pause":
            await self.clients[args[0]].pause(args[1])
        elif kind == "unpause":
            await self.clients[args[0]].unpause(args[1])
        elif kind == "term":
            await asyncio.to_thread(self.gateways[args[0]].terminate)
        elif kind == "kill":
            await asyncio.to_thread(self.gateways[args[0]].kill)
        elif kind == "start":
            await asyncio.to_thread(self.gateways[args[0]].start)
        elif kind == "kill_pubsub":
            await self.redis(lambda r: r.client_kill_filter(_type="pubsub"))
        elif kind == "trim":
            project_id, keep = args
            await self.remember()
            self.justify("history_trimmed", [project_id])
            found = await self.redis(
                lambda r: r.eval(_TRIM, 2, KEYS.stream(project_id), KEYS.meta(project_id), keep)
            )
            if found:
                epoch, below = found
                self.lineage.add_trim(epoch.decode(), int(below))
        elif kind == "delete":
            (project_id,) = args
            await self.remember()
            self.justify("epoch_changed", [project_id])
            await self.redis(lambda r: r.delete(KEYS.meta(project_id), KEYS.stream(project_id)))
        elif kind == "freeze":  # in the background, through the next steps
            self.thaws.append(asyncio.create_task(self.freeze(args[0] / 1000)))
        elif kind == "failover":  # then the new master's publishes reuse the lost numbers
            project_id, lose, publish, dark = args
            self.justify("history_lost", [project_id])
            if dark:  # while the gateways' pub/sub links are down (they catch up on return)
                await self.redis(lambda r: r.client_kill_filter(_type="pubsub"))
            await self.failover(project_id, lose)
            await self.publish(project_id, publish)
        elif kind == "restart_redis":
            await self.remember()
            self.justify("epoch_changed", PROJECTS)
            await asyncio.to_thread(self.server.restart)
        else:
            raise AssertionError(f"unknown step {step}")

    async def finish(self) -> None:
        """The faults stop: every gateway runs, every client is back on every project, one more
        event per project, and everyone must catch up."""
        await asyncio.gather(*self.thaws)
        for index, gateway in enumerate(self.gateways):
            if not gateway.running:
                await self.run(("start", index))
        for index, client in enumerate(self.clients):
            if client.left:
                await self.run(("return", index))
            for project_id in sorted(client.paused):
                await client.unpause(project_id)
        await asyncio.gather(*self.bursts, *self.thaws)
        for project_id in PROJECTS:
            await self.publish(project_id, 1)
        await self.settle(45)
        await self.remember()

    def verdict(self) -> list[str]:
        for client in self.instances:  # the tags of events no read found (e.g. trimmed first)
            for record in client.log.values():
                for item in record:
                    if item.kind == "event" and item.tag and item.ident is not None:
                        self.lineage.tags.setdefault(item.tag, item.ident)
                        self.lineage.tag_of.setdefault(item.ident, item.tag)
        problems = [f"{c.name}: unexpected {m}" for c in self.instances for m in c.stats.unexpected]
        for client in self.clients:
            for project_id in client.projects:
                found = check_delivery(
                    client.log[project_id], lineage=self.lineage, allowed_resyncs=REASONS
                )
                found += resync_problems(
                    client.log[project_id],
                    self.justified.get((client.name, project_id), {}),
                    self.lineage,
                )
                problems += [f"{client.name} project {project_id}: {p}" for p in found]
        return problems

    def summary(self) -> str:
        """What the walk exercised (``-s`` shows it): resyncs by reason, resumes, events."""
        import collections

        records = [r for c in self.clients for log in c.log.values() for r in log]
        kinds = collections.Counter(r.reason or r.kind for r in records)
        resumed = collections.Counter(r.resumed for r in records if r.kind == "subscribed")
        connects = sum(c.stats.connects for c in self.instances)
        pauses = sum(getattr(c, "pauses", 0) for c in self.instances)  # ConsumerClient's
        return (
            f"{dict(kinds)} subscribed resumed={dict(resumed)} connects={connects} "
            f"consumer pauses={pauses}"
        )


#: The failover step (:meth:`Walk.failover`): KEYS stream, meta; ARGV events to lose. Returns
#: the epoch, the top, the seq kept and every entry the stream held before (nil: no history).
_FAILOVER = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local top = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
if not epoch or top == 0 then return false end
local keep = math.max(0, top - tonumber(ARGV[1]))
local entries = redis.call('XRANGE', KEYS[1], '-', '+')
redis.call('DEL', KEYS[1])
for _, entry in ipairs(entries) do
  if tonumber(string.match(entry[1], '^%d+')) <= keep then
    redis.call('XADD', KEYS[1], entry[1], unpack(entry[2]))
  end
end
redis.call('HSET', KEYS[2], 'seq', keep)
return {epoch, top, keep, entries}
"""


#: The trim step: KEYS stream, meta; ARGV entries to keep. Returns the epoch and the first seq
#: the stream still holds (its top + 1 when it holds none), or nil for a project without one.
_TRIM = """
redis.call('XTRIM', KEYS[1], 'MAXLEN', ARGV[1])
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then return false end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
if first then return {epoch, tonumber(string.match(first[1], '^%d+'))} end
return {epoch, tonumber(redis.call('HGET', KEYS[2], 'seq') or '0') + 1}
"""


def _entries(entries) -> list[tuple[int, int, str]]:
    """``(seq, blocker_id, tag)`` of stream entries (XRANGE's answer)."""
    out = []
    for entry_id, fields in entries:
        fields = (
            dict(zip(fields[::2], fields[1::2], strict=True))
            if isinstance(fields, list)
            else fields
        )
        frame = fields[b"f"]
        out.append(
            (int(entry_id.split(b"-")[0]), json.loads(frame)["blocker_id"], event_tag(frame))
        )
    return out


def resync_problems(
    records: list[Received], justified: dict[str, int], lineage: Lineage | None = None
) -> list[str]:
    """What :func:`check_delivery` does not judge in a record's resyncs: each must follow a fault
    that justifies it (:meth:`Walk.justify`; too_far_behind: a cursor more than the gateways'
    smallest ``--max-replay`` behind), and move the client: to another epoch, or forward in its
    own (a resync to where the client stands, or behind it, makes it reload its state for
    nothing and receive again what it had; history_lost excepted: that history was rewritten).
    Only epoch_changed may change the epoch. With ``lineage``: the resync that follows a lost
    event (:func:`check_delivery` requires one) says why: history_lost, or epoch_changed, or
    too_far_behind for a cursor too far behind anyway, or, once a trim may have taken the event
    the cursor names (nothing left to compare), the trim's history_trimmed or too_far_behind."""
    problems = []
    cursor: Cursor | None = None
    at: int | None = None  # the event at the cursor, when known
    for index, item in enumerate(records):
        where = f"#{index} resync {item.reason} {_epoch(item.epoch)}:{item.seq}"
        if (
            lineage is not None
            and item.kind == "resync"
            and at in lineage.lost
            and at not in lineage.untraced
        ):
            trimmed = justified.get("history_trimmed", len(records)) <= index
            # Too far behind anyway: a window that no longer knows the event at the cursor
            # answers so without a read (a resync to the top either way; docs/protocol.md).
            far = (
                item.reason == "too_far_behind"
                and cursor is not None
                and item.seq - cursor[1] > MAX_REPLAY
            )
            if (
                item.reason not in ("history_lost", "epoch_changed")
                and not far
                and not (trimmed and item.reason in ("history_trimmed", "too_far_behind"))
            ):
                problems.append(f"{where}: the client had event {at}, lost by a failover")
        if item.kind == "event":
            at = item.ident
        elif lineage is not None and (item.kind == "resync" or cursor is None):
            at = lineage.tags.get(item.tag) if item.tag else None
        if item.kind == "resync":
            if item.reason == "too_far_behind":
                if cursor is not None and item.seq - cursor[1] <= MAX_REPLAY:
                    problems.append(f"{where}: only {item.seq - cursor[1]} behind")
            elif justified.get(item.reason, len(records)) > index:
                problems.append(f"{where}: no fault justified it")
            if cursor is not None:
                at = f"{_epoch(cursor[0])}:{cursor[1]}"
                if item.epoch != cursor[0]:
                    if item.reason != "epoch_changed":
                        problems.append(f"{where}: another epoch than the client's ({at})")
                elif item.reason != "history_lost" and item.seq <= cursor[1]:
                    problems.append(f"{where}: the client stood at {at} already")
        if item.kind != "subscribed" or cursor is None:
            cursor = (item.epoch, item.seq)
    return problems


def _epoch(epoch: str) -> str:
    """An epoch, short: new_epoch() is a 12-character prefix per process, then a counter."""
    return f"{epoch[:3]}~{epoch[12:]}"


def _describe(record: list[Received], around: int) -> str:
    return ", ".join(
        f"{r.kind[0]}{_epoch(r.epoch)}:{r.seq}" + (f"({r.reason})" if r.reason else "")
        for r in record[-around:]
    )


@pytest.mark.slow
@pytest.mark.timeout(90 + 12 * STEPS)
@pytest.mark.parametrize("seed", _seeds())
async def test_a_random_walk_of_interleaved_faults_keeps_the_promise(seed: int):
    plan = plan_walk(seed, STEPS)
    server = RedisServer().start()
    gateways = [GatewayProcess(server.url, args=args) for args in GATEWAY_ARGS]
    walk = Walk(server, gateways)
    done = 0
    failure: BaseException | None = None
    try:
        for gateway in gateways:
            gateway.start(wait=False)
        for gateway in gateways:
            await asyncio.to_thread(gateway.wait_ready)
        await walk.start()
        for step in plan:
            await walk.run(step)
            done += 1
        await walk.finish()
        problems = walk.verdict()
        print(f"seed {seed}: {walk.summary()}")
        if problems:
            failure = AssertionError("\n".join(problems[:30]))
    except Exception as exc:  # a step, or the final catch-up, failed: report it with the plan
        failure = exc
    finally:
        if failure is not None:
            records = "\n".join(
                # whole records of the failing ones, the last few of the others
                f"  {c.name} p{p}: ... {_describe(c.log[p], 400 if bad else 6)}"
                for c in walk.clients
                for p in c.projects
                for bad in [f"{c.name} project {p}:" in str(failure)]
            )
            tails = "\n".join(f"--- gateway {i}:\n{g.tail(8)}" for i, g in enumerate(gateways))
            steps = "\n".join(
                f"  {'>' if i == done else ' '}{i:3} {step}" for i, step in enumerate(plan)
            )
            message = (
                f"seed {seed} failed after {done} of {len(plan)} steps "
                f"(replay: EVENTBUS_INTERLEAVING_SEEDS={seed} "
                f"EVENTBUS_INTERLEAVING_STEPS={STEPS}): {failure!r}\n"
                f"steps:\n{steps}\nlast records:\n{records}\n{tails}"
            )
        with contextlib.suppress(Exception):
            await walk.close()
        for gateway in gateways:
            gateway.close()
        server.close()
    if failure is not None:
        raise AssertionError(message) from failure


# --- what the walk found, minimised ----------------------------------------------------------


async def live_keeper_then_redis_emptied(gateway, publisher, redis_client, project: int):
    """A client live on ``project`` at 3 (its feed in that epoch), then Redis flushed, as a
    restarted, empty Redis: returns the client and the old epoch."""
    from tests.support.gateway_client import client_for, publish

    keeper = await client_for(gateway, [project])
    await keeper.subscribe(project)
    await publish(publisher, project, 3)
    await keeper.wait_for(lambda: keeper.seqs(project) == [1, 2, 3])
    old_epoch = keeper.cursor(project)[0]
    redis_client.flushall()  # what a restarted, empty Redis holds
    return keeper, old_epoch


async def late_client_resynced_into_the_new_epoch(gateway, project: int, old_epoch: str):
    """A client resuming ``project`` from a cursor of an epoch the feed does not know: its own
    read creates the new history, so it is told ``resync_required(epoch_changed)`` while the
    feed is still in ``old_epoch``. Returns the client and that resync."""
    from tests.support.gateway_client import client_for

    late = await client_for(gateway, [project])
    await late.subscribe(project, epoch="an-older-epoch", after=7)
    (told,) = late.of("resync_required")
    assert told["reason"] == "epoch_changed" and told["epoch"] != old_epoch
    return late, told


async def test_a_resume_that_read_the_new_epoch_is_not_told_to_resync_again(
    gateways, publisher, redis_client
):
    """Seed 17: Redis restarted empty; a client resumes on a pod whose feed has not noticed yet.
    Its own read finds the new history: ``resync_required(epoch_changed)`` at its top, then
    ``subscribed``. When the feed notices (its reconcile), its resync to that same cursor goes
    to its live subscribers, but not again to this client, which stands there already (it would
    reload its state a second time for nothing)."""
    from tests.support.gateway_client import publish

    project = 5
    gateway = await gateways(reconcile_interval=3600)  # the test runs the check itself
    keeper, old_epoch = await live_keeper_then_redis_emptied(
        gateway, publisher, redis_client, project
    )
    # The client resyncs to the new history and is acknowledged there, while the feed is
    # still in the old epoch.
    late, told = await late_client_resynced_into_the_new_epoch(gateway, project, old_epoch)
    await gateway.hub.reconcile()  # the feed finds the new epoch and moves its subscribers
    await keeper.wait_for(lambda: keeper.count("resync_required", project) == 1)
    assert keeper.last("resync_required")["epoch"] == told["epoch"]
    await publish(publisher, project, 2)
    for client in (keeper, late):
        await client.wait_for(lambda c=client: c.seqs(project)[-2:] == [1, 2])
    assert late.count("resync_required", project) == 1, late.of("resync_required")
    assert late.seqs(project) == [1, 2]
    await keeper.close()
    await late.close()


async def test_a_client_resynced_into_the_new_epoch_ahead_of_the_feed_gets_its_events_not_a_resync(
    gateways, publisher, redis_client
):
    """Redis restarted empty; a client resumes on a pod whose feed has not noticed yet. Its own
    read creates the new history and tells it ``resync_required(epoch_changed)`` at 0. Then 37
    events are published: the feed, still in the old epoch, learns of the new one from them and
    resyncs its subscribers to where it found the top. That resync is about the feed's old
    cursor, not this client's: the client stands in the new history at 0 and the stream holds
    1..37, so it gets exactly them, in order, once, and no second ``resync_required`` (which
    would also name as "changed" the epoch it has)."""
    from tests.support.gateway_client import publish

    project = 6
    gateway = await gateways(reconcile_interval=3600)  # the feed learns only from the channel
    keeper, old_epoch = await live_keeper_then_redis_emptied(
        gateway, publisher, redis_client, project
    )
    late, told = await late_client_resynced_into_the_new_epoch(gateway, project, old_epoch)
    assert told["seq"] == 0
    await publish(publisher, project, 37)
    # The keeper, live on the feed, is moved to the new epoch by the feed's own resync.
    await keeper.wait_for(lambda: keeper.cursor(project) == (told["epoch"], 37))
    await late.wait_for(lambda: late.cursor(project) == (told["epoch"], 37))
    assert late.count("resync_required", project) == 1, late.of("resync_required")
    assert late.seqs(project) == list(range(1, 38))
    await keeper.close()
    await late.close()


async def test_a_feed_resync_during_the_clients_own_read_into_the_new_epoch_is_read_for_too(
    gateways, publisher, redis_client
):
    """As above, but the feed's resync to 37 reaches the pod while the client's own read (which
    created the new history at 0) is still on its way back: the client still gets 1..37 after
    ``subscribed``, in order, once, and one ``resync_required`` (its read's)."""
    from tests.support.gateway_client import client_for, publish

    project = 7
    gateway = await gateways(reconcile_interval=3600)  # the feed learns only from the channel
    keeper, _ = await live_keeper_then_redis_emptied(gateway, publisher, redis_client, project)
    store = gateway.hub.store
    read, answered, release = store.snapshot, asyncio.Event(), asyncio.Event()

    async def held_after_redis_answered(project_id, epoch=None, after=None, limit=0):
        snapshot = await read(project_id, epoch, after, limit)
        if epoch == "an-older-epoch":  # the late client's read: answered by Redis, held here
            answered.set()
            await release.wait()
        return snapshot

    store.snapshot = held_after_redis_answered
    late = await client_for(gateway, [project])
    joining = asyncio.create_task(late.subscribe(project, epoch="an-older-epoch", after=7))
    await answered.wait()
    await publish(publisher, project, 37)
    await keeper.wait_for(lambda: keeper.cursor(project)[1] == 37)  # the feed's resync
    release.set()
    await joining
    (told,) = late.of("resync_required")
    assert (told["reason"], told["seq"]) == ("epoch_changed", 0)
    await late.wait_for(lambda: late.cursor(project) == (told["epoch"], 37))
    assert late.count("resync_required", project) == 1, late.of("resync_required")
    assert late.count("subscribed", project) == 1
    assert late.seqs(project) == list(range(1, 38))
    await keeper.close()
    await late.close()
