"""Property: the Python consumer through failovers that hand numbers out again (cursor tags).

A simulated gateway (tests/test_consumer_units.py's, with tags) answers subscribes and pages like
the real one does since cursor tags (docs/protocol.md, "Cursor tags"): ``subscribed`` and
``resync_required`` name the tag of the event at their seq, a subscribe or a page whose tag names
another event at its cursor is answered ``history_lost``, and a live subscriber is told
``history_lost`` when the first event of a rewritten history reaches it (what the feed does when
a renumbered live message arrives). Meanwhile the network drops, duplicates and swaps live
frames, cuts the connection, and Redis flushes or fails over (loses a project's last events;
their numbers go to new events).

Whatever the interleaving, each project's items are a chain: every event follows the one
before it in some history (the event it was appended after), or the event a ``Resync`` named
by its tag; ``history_lost`` only after a failover; and the consumer ends at the top of the
current history, on its event (by tag). A consumer that kept a lost event and went on with the
new history's next one (a silent swap) fails it.
"""

from __future__ import annotations

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st

from consumer import Resync
from consumer.types import Cursor
from schemas.protocol import PollResponse, ResyncReason, ResyncRequired
from schemas.tags import event_tag
from tests.test_consumer_units import (
    OPERATIONS,
    SimulatedGateway,
    damage,
    deliver,
    drain,
    fed_consumer,
    frame,
    reconnect,
)


class TaggedGateway(SimulatedGateway):
    """:class:`SimulatedGateway` with cursor tags and failovers."""

    def __init__(self, projects: list[int]) -> None:
        super().__init__(projects)
        #: event -> the event it was appended after (0: the first of its history).
        self.pred: dict[int, int] = {}
        self.tags: dict[str, int] = {}  # an event's tag -> the event
        #: Projects whose live subscriber has not yet been told of a failover.
        self.rewritten: set[int] = set()
        self.failovers: dict[int, int] = {}

    def tag_at(self, project: int, seq: int) -> str | None:
        events = self.events(project)
        if not 1 <= seq <= len(events):
            return None
        return event_tag(frame(project, seq, events[seq - 1]))

    def publish(self, project: int) -> None:
        events = self.events(project)
        ident = next(self.idents)
        self.pred[ident] = events[-1] if events else 0
        events.append(ident)
        self.tags[event_tag(frame(project, len(events), ident))] = ident
        if project not in self.live:
            return
        if project in self.rewritten:
            # The feed receives a number it delivered already, with other bytes: it reads and
            # tells its subscribers history_lost at the top (this event included).
            self.rewritten.discard(project)
            self.in_flight.append(self._resync(project, "history_lost"))
        else:
            self.in_flight.append(frame(project, len(events), ident))

    def failover(self, project: int, lose: int) -> None:
        events = self.events(project)
        if not events:
            return
        del events[max(0, len(events) - lose) :]
        self.failovers[project] = self.failovers.get(project, 0) + 1
        if project in self.live:
            self.rewritten.add(project)

    def flush(self, project: int) -> None:
        super().flush(project)
        self.rewritten.discard(project)

    def _resync(self, project: int, reason: str) -> bytes:
        top = len(self.events(project))
        message = {"type": "resync_required", "project_id": project, "reason": reason}
        message |= {"epoch": self.epochs[project], "seq": top, "tag": self.tag_at(project, top)}
        return json.dumps(message).encode()

    def subscribe(self, message: dict) -> None:
        project = message["project_id"]
        epoch, events = self.epochs[project], self.events(project)
        top, after, tag = len(events), message.get("after"), message.get("tag")
        self.rewritten.discard(project)  # a subscribe's read sees the history as it is
        # Too far behind is answered without looking at the tag, as a resume window that no
        # longer holds the event does: the catch-up's pages must check it.
        near = after is not None and top - after <= self.MAX_REPLAY
        if message.get("epoch") == epoch and after is not None and 1 <= after <= top and near:
            if tag is not None and tag != self.tag_at(project, after):
                self.in_flight.append(self._resync(project, "history_lost"))
                self.in_flight.append(self._subscribed(project, False))
                self.live.add(project)
                return
        count = len(self.in_flight)
        super().subscribe(message)
        # Name the tags: the base class's resync_required and subscribed carry none.
        for index in range(count, len(self.in_flight)):
            data = json.loads(self.in_flight[index])
            if data.get("type") in ("resync_required", "subscribed"):
                data["tag"] = self.tag_at(project, data["seq"])
                self.in_flight[index] = json.dumps(data).encode()

    def _subscribed(self, project: int, resumed: bool) -> bytes:
        top = len(self.events(project))
        message = {"type": "subscribed", "project_id": project, "epoch": self.epochs[project]}
        message |= {"seq": top, "resumed": resumed, "replayed": 0}
        return json.dumps(message | {"tag": self.tag_at(project, top)}).encode()

    async def poll(self, project: int, cursor: Cursor) -> PollResponse:
        epoch, top = self.epochs[project], len(self.events(project))
        tag = cursor.tag if isinstance(cursor, Cursor) else None
        if cursor[0] == epoch and 1 <= cursor[1] <= top and tag is not None:
            if tag != self.tag_at(project, cursor[1]):
                resync = ResyncRequired(
                    project,
                    ResyncReason.HISTORY_LOST,
                    epoch,
                    top,
                    self.tag_at(project, top),
                )
                return PollResponse(project, epoch, top, [], resync, False, resync.tag)
        page = await super().poll(project, cursor)
        if page.resync_required is not None:
            resync = page.resync_required
            named = self.tag_at(project, resync.seq)
            resync = ResyncRequired(project, resync.reason, resync.epoch, resync.seq, named)
            return PollResponse(project, epoch, top, [], resync, False, named)
        last = cursor[1] + len(page.events)
        return PollResponse(
            project, epoch, top, page.events, None, page.more, self.tag_at(project, last)
        )


operations = st.lists(
    st.one_of(
        *OPERATIONS,
        # The connection is cut; the consumer's subscribes reach the gateway only at the next
        # "deliver" (or the end): what happens meanwhile is found by their reads.
        st.tuples(st.just("disconnect"), st.just(0), st.just(0)),
        st.tuples(st.just("failover"), st.integers(1, 2), st.integers(1, 3)),
        st.tuples(st.just("failover"), st.integers(1, 2), st.integers(1, 3)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(operations)
@example(  # the consumer has events 1..3; 2 and 3 are lost, and 2', 3', 4' published
    [
        ("publish", 1, 3),
        ("deliver", 8, 0),
        ("failover", 1, 2),
        ("publish", 1, 3),
        ("deliver", 8, 0),
    ]
)
@example(  # lost while disconnected: the resume's tag tells
    [
        ("publish", 1, 3),
        ("deliver", 8, 0),
        ("disconnect", 0, 0),
        ("failover", 1, 1),
        ("publish", 1, 2),
    ]
)
@example(  # lost while far behind: the catch-up's pages carry the tag
    [
        ("publish", 1, 2),
        ("deliver", 8, 0),
        ("disconnect", 0, 0),
        ("publish", 1, 6),
        ("failover", 1, 7),
        ("publish", 1, 9),
    ]
)
@example(  # the live feed's history_lost (2), then a gap repair answered at 1: a second failover
    [
        ("publish", 2, 1),
        ("publish", 2, 1),
        ("failover", 2, 1),
        ("publish", 2, 1),
        ("drop", 2, 0),
        ("failover", 2, 1),
    ]
)
@example(  # a flush's resync and live events, then the subscribe's answer behind them
    [
        ("deliver", 1, 0),
        ("disconnect", 0, 0),
        ("publish", 1, 5),
        ("deliver", 0, 0),
        ("flush", 1, 0),
        ("publish", 1, 1),
        ("failover", 1, 1),
    ]
)
async def test_through_failovers_every_record_is_a_chain_of_some_history(
    steps: list[tuple[str, int, int]],
):
    projects = [1, 2]
    consumer, ws, subscription = await fed_consumer(*projects)
    gateway = TaggedGateway(projects)
    consumer._poll = gateway.poll  # type: ignore[method-assign]
    for project in projects:
        gateway.subscribe(consumer._states[project].subscribe_message())
    disconnected = False
    for op, a, b in steps:
        if disconnected and op in ("deliver", "reconnect"):
            reconnect(gateway, consumer)
            disconnected = False
        if op == "publish":
            for _ in range(b):
                gateway.publish(a)
        elif op == "deliver":
            await deliver(gateway, consumer, ws, a)
        elif op in ("drop", "duplicate", "swap"):
            damage(gateway.in_flight, op, a)
        elif op == "reconnect":
            reconnect(gateway, consumer)
        elif op == "disconnect":
            gateway.in_flight.clear()
            gateway.live.clear()
            disconnected = True
        elif op == "flush":
            gateway.flush(a)
        elif op == "failover":
            gateway.failover(a, b)
    # A healthy network from here: one more event per project reveals any trailing gap (and
    # tells a live subscriber of a failover not yet told).
    if disconnected:
        reconnect(gateway, consumer)
    await deliver(gateway, consumer, ws, 10**6)
    for project in projects:
        gateway.publish(project)
    await deliver(gateway, consumer, ws, 10**6)

    items = drain(subscription)
    for project in projects:
        check_chain(project, [i for i in items if i.project_id == project], gateway)
        final = (gateway.epochs[project], len(gateway.events(project)))
        assert consumer.cursor(project) == final
        assert consumer.cursor(project).tag == gateway.tag_at(project, final[1]), (
            "ended on a lost event"
        )


def check_chain(project: int, items: list, gateway: TaggedGateway) -> None:
    at: int | None = None  # the event at the cursor, when known (None: unknown, or none yet)
    cursor: tuple[str, int] | None = None
    for item in items:
        if isinstance(item, Resync):
            if item.reason is ResyncReason.HISTORY_LOST:
                assert gateway.failovers.get(project), f"history_lost without a failover: {item}"
            else:
                # too_far_behind only surfaces when its catch-up's pages could not be read (a
                # failover or a flush took what they were to read).
                assert item.reason in (ResyncReason.EPOCH_CHANGED, ResyncReason.TOO_FAR_BEHIND)
            cursor = (item.epoch, item.seq)
            at = gateway.tags.get(item.tag) if item.tag else None
            continue
        ident = item.event.blocker_id
        if cursor is not None:
            assert (item.epoch, item.seq) == (cursor[0], cursor[1] + 1), (item, cursor)
        if at is not None:
            assert gateway.pred[ident] == at, (
                f"project {project}: event {ident} at {item.seq} after event {at}: "
                "never one after the other in a history (a Resync had to come first)"
            )
        cursor, at = (item.epoch, item.seq), ident
