"""The consumer's presence core (consumer/presence.py), without sockets: the member table of a
project from the gateway's ``presence`` and ``presence_diff`` frames, what it refuses, and the
coalesced views a reader gets. Frames go through the consumer's own decoder (consumer/frames.py),
as they do in the client."""

from __future__ import annotations

import asyncio
from unittest import mock

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.protocol import State

import consumer.presence as presence_module
from consumer.frames import FrameError, decode_frame
from consumer.presence import (
    PresenceChange,
    PresenceTable,
    PresenceView,
    PresenceWatch,
    changes,
    is_member,
)
from gateway.presence import apply_diff
from schemas.protocol import Member, Presence, PresenceDiff


def member(mid: str, *, name: str | None = None, viewing=None, answering=None, since=1) -> dict:
    return {"id": mid, "name": name, "viewing": viewing, "answering": answering, "since": since}


def frame(message: dict) -> bytes:
    return msgspec.json.encode(message)


def feed(table: PresenceTable, message: dict) -> bool:
    """A frame as the client hands it to the table: decoded, or rejected when it cannot be."""
    try:
        decoded = decode_frame(frame(message))
    except FrameError as exc:
        assert exc.presence == message.get("project_id")
        table.reject()
        return False
    return table.receive(decoded)


def presence(*members: dict, project_id: int = 1) -> dict:
    return {"type": "presence", "project_id": project_id, "members": list(members)}


def diff(joined=(), left=(), changed=(), project_id: int = 1) -> dict:
    return {
        "type": "presence_diff",
        "project_id": project_id,
        "joined": list(joined),
        "left": list(left),
        "changed": list(changed),
    }


def ids(table: PresenceTable) -> list[str] | None:
    return None if table.members is None else [m.id for m in table.members]


def test_presence_replaces_and_diffs_change_the_table_sorted_by_id():
    table = PresenceTable(1)
    assert table.members is None and not table.known
    assert feed(table, presence(member("bob"), member("alice", name="Alice")))
    assert ids(table) == ["alice", "bob"]
    assert table.members[0] == Member("alice", "Alice", None, None, 1)
    assert feed(table, diff(joined=[member("carol")], left=["bob"]))
    assert ids(table) == ["alice", "carol"]
    assert feed(table, diff(changed=[member("alice", name="Alice", answering=7)]))
    assert table.members[0].answering == 7
    # A new presence (a reconnect) replaces everything.
    assert feed(table, presence(member("dave")))
    assert ids(table) == ["dave"]
    assert not feed(table, presence(member("dave")))  # the same list: no change
    assert table.malformed == 0


def test_a_diff_before_any_presence_is_dropped_and_forget_makes_presence_unknown():
    table = PresenceTable(1)
    assert not feed(table, diff(joined=[member("a")]))
    assert table.members is None and table.ignored == 1 and table.malformed == 0
    feed(table, presence(member("a")))
    version = table.version
    assert table.forget()
    assert table.members is None and table.version > version
    assert not table.forget()
    assert not feed(table, diff(left=["a"]))  # diffs of the old connection: nothing to apply to
    assert table.members is None


bad_members = [
    member(""),  # no id
    member("x" * 256),  # longer than any sub the gateway lists
    member("a", name=""),
    member("a", name="n" * 201),
    member("a", viewing=0),
    member("a", answering=-3),
    member("a", viewing=2**53),
    member("a", since=-1),
    member("a", viewing=True),
    {"id": "a", "name": None, "viewing": None, "answering": None},  # no since
    {"id": 7, "name": None, "viewing": None, "answering": None, "since": 1},
    {"name": None, "viewing": None, "answering": None, "since": 1},
    "a",
    None,
]


def test_malformed_messages_are_counted_and_leave_the_table_as_it_was():
    table = PresenceTable(1)
    feed(table, presence(member("a"), member("b")))
    before, version = table.members, table.version
    messages = [presence(bad) for bad in bad_members]
    messages += [diff(joined=[bad]) for bad in bad_members]
    messages += [diff(changed=[bad]) for bad in bad_members]
    messages += [
        presence(member("c"), member("c", name="C")),  # one id twice
        diff(left=[""]),
        diff(left=[7]),
        {**diff(), "left": "a"},
        {"type": "presence_diff", "project_id": 1, "joined": []},  # fields missing
        {"type": "presence", "project_id": 1, "members": {"a": member("a")}},
        {"type": "presence", "project_id": 1},
    ]
    for message in messages:
        assert not feed(table, message), message
    assert table.malformed == len(messages)
    assert table.members == before and table.version == version
    # Another project's message is not this table's.
    assert not table.receive(Presence(2, [Member("z", None, None, None, 1)]))
    assert table.malformed == len(messages) + 1


def test_changes_between_two_lists():
    a, b, b2, c = (
        Member("a", None, None, None, 1),
        Member("b", None, None, None, 1),
        Member("b", None, 5, None, 1),
        Member("c", None, None, None, 1),
    )
    assert changes(None, (a, b)) == PresenceChange(joined=(a, b))
    assert changes((a, b), (b2, c)) == PresenceChange(joined=(c,), left=("a",), changed=(b2,))
    assert changes((a,), None) == PresenceChange(left=("a",))
    assert not changes((a, b), (a, b))


def test_a_watch_coalesces_to_the_latest_list_with_the_changes_since_the_last_it_gave():
    table = PresenceTable(1)
    watch = PresenceWatch()
    assert watch.next_view(table) is None  # unknown at first: nothing to say yet
    feed(table, presence(member("a")))
    first = watch.next_view(table)
    assert first == PresenceView(1, table.members, PresenceChange(joined=table.members))
    assert watch.next_view(table) is None
    # Three diffs while the reader is busy: one view, the changes summed up.
    feed(table, diff(joined=[member("b")]))
    feed(table, diff(changed=[member("b", viewing=3)]))
    feed(table, diff(left=["a"], joined=[member("c")]))
    view = watch.next_view(table)
    assert [m.id for m in view.members] == ["b", "c"]
    assert [m.id for m in view.change.joined] == ["b", "c"] and view.change.left == ("a",)
    assert view.member("b").viewing == 3 and view.member("a") is None
    # A diff that changes nothing makes no view.
    feed(table, diff(left=["zed"]))
    assert watch.next_view(table) is None
    # Disconnected: one unknown view; then the reconnect's presence, changes since the last list.
    table.forget()
    unknown = watch.next_view(table)
    assert unknown == PresenceView(1, None) and not unknown.known and not unknown.change
    feed(table, presence(member("c"), member("d")))
    back = watch.next_view(table)
    assert [m.id for m in back.change.joined] == ["d"] and back.change.left == ("b",)
    # Unknown and back with the same list before the reader looked: nothing new for it.
    table.forget()
    feed(table, presence(member("c"), member("d")))
    assert watch.next_view(table) is None


A, B = member("a", viewing=1), member("b", viewing=2)


@pytest.mark.parametrize(
    ("case", "changes_members"),
    [
        (diff(), False),
        (diff(left=["z"]), False),  # left an id that is not listed
        (diff(left=["z", "z"]), False),
        (diff(left=["a"]), True),
        (diff(left=["a", "a"]), True),
        (diff(joined=[member("c")]), True),
        (diff(joined=[A]), False),  # joined a member listed already, equal
        (diff(joined=[member("a", viewing=3)]), True),
        (diff(changed=[B]), False),  # changed to the member it is
        (diff(changed=[member("b", name="B")]), True),
        (diff(changed=[member("c")]), True),  # changed an id not listed: it is put
        (diff(left=["a"], joined=[A]), False),  # went and came back as it was
        (diff(left=["a"], changed=[A]), False),
        (diff(left=["a"], joined=[member("a", since=2)]), True),
        (diff(left=["z"], joined=[member("z")]), True),
        (diff(joined=[member("a", viewing=3)], changed=[A]), False),  # the last put wins
        (diff(joined=[A], changed=[member("a", viewing=3)]), True),
        (diff(left=["a", "z"], joined=[A], changed=[B]), False),
        (diff(left=["b"], joined=[A, member("c")]), True),
    ],
)
def test_a_diff_changes_the_version_exactly_when_it_changes_the_members(case, changes_members):
    """A reader is woken (the version grows) for a diff that changes the list, and only then,
    whatever the diff repeats, undoes or names that is not listed; the list is the gateway's
    ``apply_diff`` of it."""
    table = PresenceTable(1)
    feed(table, presence(A, B))
    before, version = table.members, table.version
    decoded = decode_frame(frame(case))
    expected = apply_diff({m.id: m for m in before}, decoded)
    assert feed(table, case) is changes_members
    assert table.members == tuple(expected[k] for k in sorted(expected))
    assert (table.members != before) is changes_members
    assert table.version == version + changes_members
    assert table.malformed == 0


class WholeTableSpy(dict):
    """A member table counting the operations that visit every member (a copy, a compare)."""

    visits = 0

    def _visit(self) -> None:
        WholeTableSpy.visits += 1

    def __iter__(self):
        self._visit()
        return super().__iter__()

    def keys(self):
        self._visit()
        return super().keys()

    def values(self):
        self._visit()
        return super().values()

    def items(self):
        self._visit()
        return super().items()

    def copy(self):
        self._visit()
        return super().copy()

    def __eq__(self, other):
        self._visit()
        return super().__eq__(other)

    def __ne__(self, other):
        self._visit()
        return super().__ne__(other)

    __hash__ = None  # type: ignore[assignment]


def test_a_diff_costs_its_own_size_not_the_tables():
    """A hostile gateway flooding tiny diffs against a large table: each diff looks at the ids
    it names, never at every member (before, each diff copied and compared the whole table)."""
    table = PresenceTable(1)
    feed(table, presence(*(member(f"m{n:05}") for n in range(10_000))))
    table._members = WholeTableSpy(table._members)  # type: ignore[arg-type]
    WholeTableSpy.visits = 0
    for n in range(50):
        feed(table, diff(changed=[member("m00001", viewing=n % 2 + 1)]))
        feed(table, diff(left=["absent"], joined=[member("m00002")]))
    assert WholeTableSpy.visits == 0
    assert table.members[1] == Member("m00001", None, 2, None, 1)
    assert len(table.members) == 10_000


# --- hypothesis -------------------------------------------------------------------------------

ids_ = st.sampled_from(["a", "b", "c", "d", "e"])
items = st.none() | st.integers(1, 5)
members_ = st.builds(
    member,
    ids_,
    name=st.none() | st.sampled_from(["A", "B"]),
    viewing=items,
    answering=items,
    since=st.integers(0, 3),
)


@st.composite
def valid_messages(draw):
    if draw(st.booleans()):
        listed = {m["id"]: m for m in draw(st.lists(members_, max_size=5))}
        return presence(*listed.values())
    return diff(
        joined=draw(st.lists(members_, max_size=3)),
        left=draw(st.lists(ids_, max_size=3)),
        changed=draw(st.lists(members_, max_size=3)),
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(valid_messages() | st.just("forget"), max_size=30))
def test_the_table_is_the_gateways_reference_applied_in_order(messages):
    """Valid messages: the table is what ``gateway.presence.apply_diff`` makes of them, and a
    watch read after every step reports exactly the difference between lists it gave."""
    table, watch = PresenceTable(1), PresenceWatch()
    model: dict[str, Member] | None = None
    last_known: tuple[Member, ...] | None = None
    for message in messages:
        if message == "forget":
            table.forget()
            model = None
        else:
            feed(table, message)
            decoded = decode_frame(frame(message))
            if type(decoded) is Presence:
                model = {m.id: m for m in decoded.members}
            elif model is not None:
                assert type(decoded) is PresenceDiff
                model = apply_diff(model, decoded)
        expected = None if model is None else tuple(model[k] for k in sorted(model))
        assert table.members == expected
        view = watch.next_view(table)
        if view is not None and view.known:
            assert view.members == expected
            assert view.change == changes(last_known, expected)
            last_known = expected
    assert table.malformed == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
member_like = st.fixed_dictionaries(
    {},
    optional={
        "id": ids_ | json_values,
        "name": st.none() | json_values,
        "viewing": items | json_values,
        "answering": items | json_values,
        "since": st.integers(-2, 2**54) | json_values,
    },
)
garbage = st.fixed_dictionaries(
    {"type": st.sampled_from(["presence", "presence_diff"]), "project_id": st.just(1)},
    optional={
        "members": st.lists(member_like | json_values, max_size=4) | json_values,
        "joined": st.lists(member_like | json_values, max_size=4) | json_values,
        "left": st.lists(ids_ | json_values, max_size=4) | json_values,
        "changed": st.lists(member_like | json_values, max_size=4) | json_values,
    },
)


@settings(max_examples=500, deadline=None)
@given(st.lists(valid_messages() | garbage, max_size=20))
def test_garbage_never_crashes_and_never_reaches_the_table(messages):
    """Anything a broken gateway may send: the table only ever holds valid members, sorted and
    unique, and each refused message is counted once."""
    table, watch = PresenceTable(1), PresenceWatch()
    refused = table.malformed
    for message in messages:
        version = table.version
        feed(table, message)
        if table.malformed > refused:
            assert table.malformed == refused + 1 and table.version == version
            refused = table.malformed
        members = table.members
        if members is not None:
            assert all(is_member(m) for m in members)
            assert [m.id for m in members] == sorted({m.id for m in members})
        watch.next_view(table)


class CopyingTable(PresenceTable):
    """The table as it was before 6cdd7c6: ``_apply`` copied the whole table and compared it
    after the diff (kept here, verbatim but for the name, as the reference of the new one)."""

    __slots__ = ()

    def _apply(self, diff: PresenceDiff) -> bool:
        if (
            diff.project_id != self.project_id
            or type(diff.left) is not list
            or type(diff.joined) is not list
            or type(diff.changed) is not list
            or not all(presence_module._is_id(i) for i in diff.left)
            or not all(is_member(m) for m in diff.joined)
            or not all(is_member(m) for m in diff.changed)
        ):
            self.malformed += 1
            return False
        table = self._members
        if table is None:
            self.ignored += 1
            return False
        before = dict(table)
        for member_id in diff.left:
            table.pop(member_id, None)
        for member in (*diff.joined, *diff.changed):
            table[member.id] = member
        if len(table) > presence_module.MAX_MEMBERS:
            return self._too_many()
        if table == before:
            return False
        self._changed()
        return True


@settings(max_examples=500, deadline=None)
@given(
    st.lists(valid_messages() | garbage | st.just("forget"), max_size=25),
    st.sampled_from([3, 5, presence_module.MAX_MEMBERS]),
)
def test_a_diff_is_applied_as_the_copying_table_applied_it(messages, max_members):
    """Whatever comes (valid, repeated, undone, hostile, past MAX_MEMBERS): the table that looks
    at the ids a diff names says what the one that copied the whole table said, step by step:
    the same answer (changed or not), members, version, malformed and ignored counts."""
    new, old = PresenceTable(1), CopyingTable(1)
    with mock.patch.object(presence_module, "MAX_MEMBERS", max_members):
        for message in messages:
            if message == "forget":
                assert new.forget() == old.forget()
            else:
                assert feed(new, message) == feed(old, message)
            assert new.members == old.members
            assert (new.version, new.malformed, new.ignored) == (
                old.version,
                old.malformed,
                old.ignored,
            )


# --- the client's presence handling, with a fake connection ------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


class FakeConnection:
    """Records what the client sends."""

    state = State.OPEN

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.transport = FakeTransport()

    async def send(self, data: bytes, text: bool = True) -> None:
        self.sent.append(msgspec.json.decode(data))


async def fake_consumer(ws: FakeConnection | None = None):
    from consumer import Consumer

    consumer = Consumer("ws://unused/")
    consumer._task = asyncio.get_running_loop().create_future()  # no real connection task
    ws = ws or FakeConnection()
    consumer._ws = consumer._subscribed_on = ws  # type: ignore[assignment]
    return consumer, ws


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def subscribed(project_id: int, seq: int, epoch: str = "e1", resumed: bool = False) -> bytes:
    return frame(
        {
            "type": "subscribed",
            "project_id": project_id,
            "epoch": epoch,
            "seq": seq,
            "resumed": resumed,
        }
    )


def event_frame(project_id: int, seq: int) -> bytes:
    from schemas.events import BlockerResolved, utc_now

    body = msgspec.json.encode(
        BlockerResolved(project_id=project_id, blocker_id=seq, answer="a", resolved_at=utc_now())
    )
    return body[:-1] + b',"seq":%d}' % seq


async def test_presence_makes_the_subscribe_carry_the_flag_and_follows_nothing_else():
    consumer, ws = await fake_consumer()
    events = consumer.events(1)
    await settle()
    consumer._states[1].subscribe_message()
    await consumer._on_frame(ws, subscribed(1, 3))
    # A followed project: subscribed again from its cursor with the flag.
    watch = consumer.presence(1)
    await settle()
    assert ws.sent[-1] == {
        "type": "subscribe",
        "project_id": 1,
        "epoch": "e1",
        "after": 3,
        "presence": True,
    }
    await consumer._on_frame(ws, subscribed(1, 3, resumed=True))
    await consumer._on_frame(ws, frame(presence(member("b"))))  # (its answer, after subscribed)
    # A project not followed: subscribed live, for presence only.
    only = consumer.presence(2)
    await settle()
    assert ws.sent[-1] == {"type": "subscribe", "project_id": 2, "presence": True}
    await consumer._on_frame(ws, subscribed(2, 7))
    await consumer._on_frame(ws, frame(presence(member("a"), project_id=2)))
    assert [m.id for m in (await anext(only)).members] == ["a"]
    for seq in (8, 9):  # its events go to no one
        await consumer._on_frame(ws, event_frame(2, seq))
    assert consumer.stats.delivered == 0 and consumer.cursor(2).seq == 9
    # The last reader leaves: the followed project is subscribed again without the flag, the
    # other one left.
    await watch.aclose()
    assert ws.sent[-1] == {"type": "subscribe", "project_id": 1, "epoch": "e1", "after": 3}
    await only.aclose()
    assert ws.sent[-1] == {"type": "unsubscribe", "project_id": 2}
    assert 2 not in consumer._states and consumer.members(2) is None
    await events.aclose()
    await consumer.aclose()


async def test_malformed_presence_frames_are_counted_and_change_nothing():
    consumer, ws = await fake_consumer()
    watch = consumer.presence(1)
    await settle()
    await consumer._on_frame(ws, subscribed(1, 0))
    await consumer._on_frame(ws, frame(presence(member("a"), member("b"))))
    before = await anext(watch)
    for bad in (
        presence(member("")),  # decodes, refused by the table
        {"type": "presence", "project_id": 1, "members": "everyone"},  # does not decode
        {**diff(), "left": [3]},
        {"type": "presence_diff", "project_id": 1},
        diff(joined=[member("c", viewing=-1)]),
    ):
        await consumer._on_frame(ws, frame(bad))
    assert consumer.stats.presence_malformed == 5 and consumer.stats.ignored == 5
    assert consumer._presence[1].table.malformed == 5
    assert consumer.members(1) == before.members
    await consumer._on_frame(ws, frame(diff(left=["a"])))
    assert ids_of(await anext(watch)) == ["b"]
    await consumer.aclose()


def ids_of(view: PresenceView) -> list[str] | None:
    return None if view.members is None else [m.id for m in view.members]


async def test_a_reader_that_does_not_read_holds_one_list_not_a_backlog():
    consumer, ws = await fake_consumer()
    watch = consumer.presence(1)
    await settle()
    await consumer._on_frame(ws, subscribed(1, 0))
    await consumer._on_frame(ws, frame(presence()))
    for n in range(2000):
        await consumer._on_frame(
            ws, frame(diff(joined=[member(f"m{n:04}")], left=[f"m{n - 1:04}"]))
        )
    view = await anext(watch)
    assert ids_of(view) == ["m1999"] and [m.id for m in view.change.joined] == ["m1999"]
    assert not view.change.left  # (the reader never had the others)
    # The reader's state is one watch; the route keeps no queue at all.
    assert not hasattr(consumer._presence[1], "queue")
    await consumer.aclose()


async def test_a_presence_reader_dropped_without_closing_is_unfollowed():
    import gc

    consumer, ws = await fake_consumer()
    dropped = consumer.presence(5)
    await settle()
    assert ws.sent[-1] == {"type": "subscribe", "project_id": 5, "presence": True}
    del dropped
    gc.collect()
    await settle()
    assert ws.sent[-1] == {"type": "unsubscribe", "project_id": 5}
    assert 5 not in consumer._presence and 5 not in consumer._states
    await consumer.aclose()


async def test_events_followed_after_presence_leave_the_live_subscription_first():
    """A project read for presence (subscribed live, events dropped) then followed with a
    cursor: the live subscription is left first, and nothing the gateway sent for it before the
    ``unsubscribed`` is taken for the new subscription's (an event of another epoch would be
    delivered under the cursor's)."""
    from consumer import Cursor

    consumer, ws = await fake_consumer()
    watch = consumer.presence(1)
    await settle()
    await consumer._on_frame(ws, subscribed(1, 50, epoch="other"))
    events = consumer.events(1, after=Cursor("e1", 3))
    await settle()
    assert ws.sent[-2:] == [
        {"type": "unsubscribe", "project_id": 1},
        {"type": "subscribe", "project_id": 1, "epoch": "e1", "after": 3, "presence": True},
    ]
    await consumer._on_frame(ws, event_frame(1, 4))  # the old subscription's (epoch "other")
    await consumer._on_frame(ws, frame({"type": "unsubscribed", "project_id": 1}))
    await consumer._on_frame(ws, event_frame(1, 4))  # the replay after e1:3
    await consumer._on_frame(ws, subscribed(1, 4, epoch="e1", resumed=True))
    await consumer._on_frame(ws, frame(presence(member("a"))))
    item = await anext(events)
    assert (item.epoch, item.seq) == ("e1", 4)
    assert events._route.queue.empty()
    assert ids_of(await anext(watch)) == ["a"]
    await consumer.aclose()


class BrokenUnsubscribe(FakeConnection):
    """A connection whose send of an unsubscribe raises what websockets' send never should."""

    async def send(self, data: bytes, text: bool = True) -> None:
        if msgspec.json.decode(data)["type"] == "unsubscribe":
            raise RuntimeError("the send broke")
        await super().send(data, text)


async def test_leaving_a_presence_only_project_when_the_send_breaks_fails_that_caller_only():
    """The last presence reader of a project read for presence only leaves (its unsubscribe's
    send raising an unexpected error): ``aclose()`` raises it, the connection is dropped to be
    made again, and the consumer goes on; dropped without closing, or left by ``events()``
    following the project (its live subscription left first), nothing is raised to anyone.
    Each stopped the whole consumer, every iterator raising ConsumerClosed."""
    import gc

    from consumer import Cursor

    # Closed: the caller gets the error.
    ws = BrokenUnsubscribe()
    consumer, _ = await fake_consumer(ws)
    kept = consumer.events(1)
    only = consumer.presence(2)
    await settle()
    await consumer._on_frame(ws, subscribed(1, 0))
    await consumer._on_frame(ws, subscribed(2, 0))
    with pytest.raises(RuntimeError, match="the send broke"):
        await only.aclose()
    assert ws.transport.aborted and consumer._failure is None
    await consumer._on_frame(ws, event_frame(1, 1))
    assert (await anext(kept)).seq == 1

    # Dropped without closing: nobody to tell (it was logged).
    ws = BrokenUnsubscribe()
    consumer, _ = await fake_consumer(ws)
    kept = consumer.events(1)
    dropped = consumer.presence(2)
    await settle()
    await consumer._on_frame(ws, subscribed(1, 0))
    await consumer._on_frame(ws, subscribed(2, 0))
    del dropped
    gc.collect()
    await settle()
    assert ws.transport.aborted and consumer._failure is None and 2 not in consumer._states
    await consumer._on_frame(ws, event_frame(1, 1))
    assert (await anext(kept)).seq == 1

    # Followed with events(): the live subscription's unsubscribe breaks; the connection is
    # dropped and the next one subscribes the project from the cursor given.
    ws = BrokenUnsubscribe()
    consumer, _ = await fake_consumer(ws)
    kept = consumer.events(1)
    watch = consumer.presence(2)
    await settle()
    await consumer._on_frame(ws, subscribed(1, 0))
    await consumer._on_frame(ws, subscribed(2, 50))
    events = consumer.events(2, after=Cursor("e1", 3))
    await settle()
    assert ws.transport.aborted and consumer._failure is None
    assert consumer._states[2].cursor == Cursor("e1", 3) and not consumer._states[2].pending
    assert {"type": "subscribe", "project_id": 2, "epoch": "e1", "after": 3} not in [
        {k: v for k, v in sent.items() if k != "presence"} for sent in ws.sent
    ]
    await consumer._on_frame(ws, event_frame(1, 1))
    assert (await anext(kept)).seq == 1
    for closing in (kept, events, watch):
        await closing.aclose()
    await consumer.aclose()


class BrokenSubscribe(FakeConnection):
    """A connection whose send of a subscribe raises what websockets' send never should,
    once ``broken``."""

    broken = False

    async def send(self, data: bytes, text: bool = True) -> None:
        if self.broken and msgspec.json.decode(data)["type"] == "subscribe":
            raise RuntimeError("the send broke")
        await super().send(data, text)


async def test_closing_the_last_presence_reader_when_the_resubscribe_breaks_stops_nothing():
    """The last presence reader of a followed project closes; its subscribe without the flag
    breaks (not ConnectionClosed): ``aclose()`` returns (nothing it asked is lost: the next
    connection subscribes the project without the flag, from its cursor), the failure is
    logged at error, the connection dropped to be made again, and the consumer goes on. It
    raised to that ``aclose()`` while the connection, in a state nobody knew, was kept."""
    from structlog.testing import capture_logs

    ws = BrokenSubscribe()
    consumer, _ = await fake_consumer(ws)
    events = consumer.events(1)
    await settle()
    consumer._states[1].subscribe_message()
    await consumer._on_frame(ws, subscribed(1, 3))
    watch = consumer.presence(1)
    await settle()
    await consumer._on_frame(ws, subscribed(1, 3, resumed=True))
    await consumer._on_frame(ws, frame(presence(member("b"))))
    ws.broken = True
    with capture_logs() as logs:
        await watch.aclose()
    assert [(e["event"], e["project_id"]) for e in logs if e["log_level"] == "error"] == [
        ("cannot send a subscribe; reconnecting", 1)
    ]
    assert ws.transport.aborted and consumer._given_up is ws and consumer._failure is None
    await consumer._on_frame(ws, event_frame(1, 4))
    assert (await anext(events)).seq == 4
    await events.aclose()
    await consumer.aclose()


def test_tail_formats_a_presence_view_as_a_line_or_json():
    from consumer.tail import format_presence

    alice = Member("alice", "Alice", 3, None, 10)
    bob = Member("bob", None, None, 7, 11)
    view = PresenceView(1, (alice, bob), PresenceChange(joined=(bob,), left=("carol",)))
    line = format_presence(view)
    assert line.endswith(
        'p1  presence  members=2  joined="bob" viewing=- answering=7  left="carol"'
    )
    assert format_presence(PresenceView(1, None)).split("  ")[2:4] == [
        "presence",
        "unknown (disconnected: the list comes back after the reconnect)",
    ]
    assert msgspec.json.decode(format_presence(view, as_json=True)) == {
        "type": "presence_view",
        "project_id": 1,
        "members": [msgspec.structs.asdict(alice), msgspec.structs.asdict(bob)],
        "joined": [msgspec.structs.asdict(bob)],
        "left": ["carol"],
        "changed": [],
    }
    assert (
        msgspec.json.decode(format_presence(PresenceView(1, None), as_json=True))["members"] is None
    )


async def test_presence_asked_while_a_subscribe_is_in_flight_waits_for_its_answer():
    """Two subscribes of a project in flight cannot be told apart by their answers: a live one's
    ``subscribed`` taken for the answer to a resume from the cursor said ``history_lost``. The
    flag goes out in a subscribe sent once the one in flight is answered."""
    consumer, ws = await fake_consumer()
    events = consumer.events(1, start="beginning")
    await settle()
    assert ws.sent == [{"type": "subscribe", "project_id": 1}]
    watch = consumer.presence(1)
    await settle()
    assert len(ws.sent) == 1  # nothing more while it is in flight
    await consumer._on_frame(ws, subscribed(1, 5))
    # The answer places the start (seq 0 of e1): the flag goes with the subscribe from there.
    assert ws.sent[1:] == [
        {"type": "subscribe", "project_id": 1, "epoch": "e1", "after": 0, "presence": True}
    ]
    await watch.aclose()  # in flight again: dropped once it is answered
    assert len(ws.sent) == 2
    for seq in range(1, 6):
        await consumer._on_frame(ws, event_frame(1, seq))
    await consumer._on_frame(ws, subscribed(1, 5, resumed=True))
    assert len(ws.sent) == 2  # (its presence answer is owed: the next goes after it)
    await consumer._on_frame(ws, frame(presence()))
    (last,) = ws.sent[2:]
    assert "presence" not in last and (last["epoch"], last["after"]) == ("e1", 5)
    assert [item.seq for item in [await anext(events) for _ in range(5)]] == [1, 2, 3, 4, 5]
    assert consumer.stats.resyncs == 0
    await consumer.aclose()


async def test_a_subscribe_answered_unavailable_makes_presence_unknown_until_the_retry():
    consumer, ws = await fake_consumer()
    consumer._random = lambda: 0.0  # the retry at once
    watch = consumer.presence(1)
    await settle()
    await consumer._on_frame(ws, subscribed(1, 0))
    await consumer._on_frame(ws, frame(presence(member("a"))))
    assert ids_of(await anext(watch)) == ["a"]
    error = {"type": "error", "code": "unavailable", "message": "Redis", "project_id": 1}
    await consumer._on_frame(ws, frame(error))
    assert (await anext(watch)).members is None and consumer.members(1) is None
    await settle()
    assert ws.sent[-1]["presence"] is True  # subscribed again, with the flag
    await consumer._on_frame(ws, subscribed(1, 0))
    await consumer._on_frame(ws, frame(presence(member("a"), member("b"))))
    view = await anext(watch)
    assert ids_of(view) == ["a", "b"] and [m.id for m in view.change.joined] == ["b"]
    await consumer.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(watch)


async def consumer_with_recorded_retries(*, hold: set[int] | None = None):
    """A fake consumer whose full-jitter delays are their caps (a policy of 1 s doubling to
    30 s), each recorded in ``delays``: a retry then subscribes at once, unless its delay is in
    ``hold`` (it sleeps until cancelled, as a long backoff would)."""
    from consumer import ReconnectPolicy

    consumer, ws = await fake_consumer()
    consumer.policy = ReconnectPolicy(initial=1.0, max=30.0, factor=2.0)
    consumer._backoff.policy = consumer.policy
    consumer._random = consumer._backoff.random = lambda: 1.0
    delays: list[float] = []
    retry = consumer._resubscribe_later

    async def recorded(ws, state, delay):
        delays.append(delay)
        if hold is not None and delay in hold:
            await asyncio.Event().wait()
        await retry(ws, state, 0)

    consumer._resubscribe_later = recorded  # type: ignore[method-assign]
    return consumer, ws, delays


UNAVAILABLE = {"type": "error", "code": "unavailable", "message": "x", "project_id": 1}
ENDED = {**UNAVAILABLE, "message": "the project's data in Redis is unreadable", "ended": True}


async def fail_presence_reads(consumer, ws, delays: list[float], times: int, top: int) -> None:
    """The project's presence read fails ``times`` times in a row (the events flow): each
    subscribe is answered ``subscribed`` at ``top``, then ``unavailable``, and retried."""
    for _ in range(times):
        sent = len(ws.sent)
        await consumer._on_frame(ws, subscribed(1, top, resumed=True))
        await consumer._on_frame(ws, frame(UNAVAILABLE))
        await settle()
        assert len(ws.sent) == sent + 1 and ws.sent[-1]["presence"] is True
    assert delays[-times:] == [2.0**n for n in range(times)]  # presence's backoff, grown


async def test_a_subscription_ended_while_its_presence_read_waits_is_retried_on_its_own_backoff():
    """After a ``subscribed`` with presence, the gateway owes the presence answer; an
    ``unavailable`` then was presence's failure, whose retry waits presence's backoff (grown
    by every failed read, up to 30 s). The gateway ending the subscription in that moment (its
    project's metadata unreadable) sends the same error with ``"ended": true``: the events of
    the project stop, so it is subscribed again on the subscribe's backoff (1 s, then 2 s while
    the gateway refuses it), from its cursor, and every event comes once, in order."""
    from consumer import Cursor

    consumer, ws, delays = await consumer_with_recorded_retries()
    events = consumer.events(1, after=Cursor("e1", 0))
    reader = consumer.presence(1)
    await settle()
    await consumer._on_frame(ws, subscribed(1, 0, resumed=True))
    await settle()
    assert ws.sent[-1] == {
        "type": "subscribe",
        "project_id": 1,
        "epoch": "e1",
        "after": 0,
        "presence": True,
    }
    await consumer._on_frame(ws, event_frame(1, 1))
    await fail_presence_reads(consumer, ws, delays, 5, top=1)
    sent = len(ws.sent)
    await consumer._on_frame(ws, subscribed(1, 1, resumed=True))
    assert consumer._states[1].presence_due
    await consumer._on_frame(ws, frame(ENDED))  # the subscription ends: not presence's failure
    await settle()
    assert delays[-1] == 1.0  # the subscribe's backoff, not presence's (32 s, capped at 30 s)
    assert not consumer._states[1].presence_due and consumer.members(1) is None
    (again,) = ws.sent[sent:]
    assert (again["epoch"], again["after"], again["presence"]) == ("e1", 1, True)
    await consumer._on_frame(ws, frame(ENDED))  # refused: the metadata is still unreadable
    await settle()
    assert delays[-1] == 2.0 and len(ws.sent) == sent + 2
    # Repaired: the replay after the cursor, `subscribed`, the presence list.
    for seq in (2, 3):
        await consumer._on_frame(ws, event_frame(1, seq))
    await consumer._on_frame(ws, subscribed(1, 3, resumed=True))
    await consumer._on_frame(ws, frame(presence(member("a"))))
    await consumer._on_frame(ws, event_frame(1, 4))
    assert [(await anext(events)).seq for _ in range(4)] == [1, 2, 3, 4]
    assert consumer.stats.resyncs == 0 and consumer.members(1) is not None
    view = await anext(reader)
    while view.members is None:
        view = await anext(reader)
    assert ids_of(view) == ["a"]
    await consumer.aclose()


async def test_a_subscription_ended_while_presence_waits_to_be_asked_again_is_retried_at_once():
    """Presence's read failed (its retry sleeps presence's backoff, the subscription stands),
    then the gateway ends the subscription (``"ended": true``): one retry per project at a time
    left the project unsubscribed, its events silent, until presence's retry woke (up to 30 s).
    The subscribe's retry replaces it, on the subscribe's backoff."""
    from consumer import Cursor

    consumer, ws, delays = await consumer_with_recorded_retries(hold={16.0})
    events = consumer.events(1, after=Cursor("e1", 0))
    reader = consumer.presence(1)  # noqa: F841 (kept: a dropped one is unfollowed)
    await settle()
    await consumer._on_frame(ws, subscribed(1, 0, resumed=True))
    await settle()
    await fail_presence_reads(consumer, ws, delays, 4, top=0)
    await consumer._on_frame(ws, subscribed(1, 0, resumed=True))
    await consumer._on_frame(ws, frame(UNAVAILABLE))  # presence fails a fifth time
    await settle()
    assert delays[-1] == 16.0 and 1 in consumer._retries  # presence's retry sleeps
    await consumer._on_frame(ws, event_frame(1, 1))  # the events flow meanwhile
    sent = len(ws.sent)
    await consumer._on_frame(ws, frame(ENDED))
    await settle()
    assert delays[-1] == 1.0
    (again,) = ws.sent[sent:]
    assert (again["epoch"], again["after"], again["presence"]) == ("e1", 1, True)
    await consumer._on_frame(ws, frame(UNAVAILABLE))  # (a stray one, while it is in flight)
    for seq in (2, 3):
        await consumer._on_frame(ws, event_frame(1, seq))
    await consumer._on_frame(ws, subscribed(1, 3, resumed=True))
    await consumer._on_frame(ws, frame(presence(member("a"))))
    assert [(await anext(events)).seq for _ in range(3)] == [1, 2, 3]
    assert consumer.stats.resyncs == 0
    await consumer.aclose()


async def test_without_ended_an_unavailable_while_presence_is_owed_is_presences_failure():
    """A gateway from before ``ended``: the ``unavailable`` after a ``subscribed`` with presence
    is taken for the presence read's failure, as it always was: retried on presence's backoff,
    grown by the reads that failed before it."""
    from consumer import Cursor

    consumer, ws, delays = await consumer_with_recorded_retries(hold={4.0})
    events = consumer.events(1, after=Cursor("e1", 0))  # noqa: F841
    reader = consumer.presence(1)  # noqa: F841
    await settle()
    await consumer._on_frame(ws, subscribed(1, 0, resumed=True))
    await settle()
    await fail_presence_reads(consumer, ws, delays, 2, top=0)
    await consumer._on_frame(ws, subscribed(1, 0, resumed=True))
    await consumer._on_frame(ws, frame(UNAVAILABLE))
    await settle()
    assert delays[-1] == 4.0  # still presence's backoff
    await consumer.aclose()


async def test_presence_read_again_later_starts_its_backoff_over():
    """Presence's failures in a row grow its backoff, which a ``presence`` list starts over.
    A reader that closes while presence fails ends that run: presence is no longer asked, and
    asked again later (a new reader, maybe hours on) its first failure waits the first delay
    (1 s), not the delay the old run had grown to (up to 30 s, members unknown meanwhile). So
    for a project unfollowed and followed again."""
    from consumer import Cursor

    consumer, ws, delays = await consumer_with_recorded_retries(hold={16.0})
    events = consumer.events(1, after=Cursor("e1", 0))
    reader = consumer.presence(1)
    await settle()
    await consumer._on_frame(ws, subscribed(1, 0, resumed=True))
    await settle()
    await fail_presence_reads(consumer, ws, delays, 4, top=0)
    await consumer._on_frame(ws, subscribed(1, 0, resumed=True))
    await consumer._on_frame(ws, frame(UNAVAILABLE))  # a fifth time: its retry sleeps 16 s
    await settle()
    assert delays[-1] == 16.0 and 1 in consumer._retries
    await reader.aclose()  # presence no longer read: subscribed again without the flag
    await settle()
    assert "presence" not in ws.sent[-1]
    await consumer._on_frame(ws, subscribed(1, 0, resumed=True))
    await settle()
    assert 1 not in consumer._retries
    reader = consumer.presence(1)  # read again, later
    await settle()
    assert ws.sent[-1]["presence"] is True
    await consumer._on_frame(ws, subscribed(1, 0, resumed=True))
    await consumer._on_frame(ws, frame(UNAVAILABLE))  # one failed read
    await settle()
    assert delays[-1] == 1.0
    await reader.aclose()
    await settle()
    await consumer._on_frame(ws, subscribed(1, 0, resumed=True))
    await consumer.aclose()

    # Unfollowed whole, then followed again: the same, and so for refused subscribes.
    consumer, ws, delays = await consumer_with_recorded_retries(hold={16.0})
    reader = consumer.presence(1)
    await settle()
    await consumer._on_frame(ws, subscribed(1, 0))
    await settle()
    await fail_presence_reads(consumer, ws, delays, 4, top=0)
    await consumer._on_frame(ws, subscribed(1, 0))
    await consumer._on_frame(ws, frame(UNAVAILABLE))
    await settle()
    assert delays[-1] == 16.0
    await reader.aclose()
    await settle()
    assert 1 not in consumer._states and ws.sent[-1]["type"] == "unsubscribe"
    await consumer._on_frame(ws, frame({"type": "unsubscribed", "project_id": 1}))
    reader = consumer.presence(1)
    await settle()
    await consumer._on_frame(ws, subscribed(1, 0))
    await consumer._on_frame(ws, frame(UNAVAILABLE))
    await settle()
    assert delays[-1] == 1.0
    await reader.aclose()
    await settle()
    await consumer._on_frame(ws, frame({"type": "unsubscribed", "project_id": 1}))
    events = consumer.events(2, after=Cursor("e1", 0))
    await settle()
    for n in range(5):  # refused five times: the subscribe's backoff grows
        await consumer._on_frame(ws, frame({**UNAVAILABLE, "project_id": 2}))
        await settle()
        assert delays[-1] == 2.0**n
    await events.aclose()
    await settle()
    events = consumer.events(2, after=Cursor("e1", 0))
    await settle()
    assert ws.sent[-1]["project_id"] == 2
    await consumer._on_frame(ws, frame({**UNAVAILABLE, "project_id": 2}))
    await settle()
    assert delays[-1] == 1.0
    await consumer.aclose()


# --- the client against a model gateway, with hypothesis ----------------------------------------


class ModelWorld:
    """Project 1 as the gateways know it: its history (seqs 1..top of epoch "e1") and who is
    present; and the consumer's connection of the moment (:class:`ModelGateway`)."""

    def __init__(self) -> None:
        self.top = 0
        self.members: dict[str, dict] = {}
        self.connection: ModelGateway | None = None

    def publish(self) -> None:
        self.top += 1
        if self.connection is not None and self.connection.subscribed is not None:
            self.connection.frames.append(event_frame(1, self.top))

    def change(self, member_id: str, present: bool, viewing: int) -> None:
        if present:
            joined = member_id not in self.members
            self.members[member_id] = member(member_id, viewing=viewing)
            put = [self.members[member_id]]
            message = diff(joined=put) if joined else diff(changed=put)
        elif self.members.pop(member_id, None) is not None:
            message = diff(left=[member_id])
        else:
            return
        if self.connection is not None and self.connection.subscribed:
            self.connection.frames.append(frame(message))


class ModelGateway:
    """One connection of a gateway, as the protocol says it behaves for project 1: frames are
    handled in order; a subscribe replaces the subscription (a replay after a cursor, then
    ``subscribed``, then ``presence`` with the flag); an unsubscribe answers ``unsubscribed`` or
    ``not_subscribed``; events and ``presence_diff`` go to the subscription as they happen. A
    connection that ended takes nothing more."""

    def __init__(self, world: ModelWorld) -> None:
        self.world = world
        self.subscribed: bool | None = None  # None: not subscribed; else the presence flag
        self.frames: list[bytes] = []  # to the consumer, in order
        self.alive = True
        world.connection = self

    async def send(self, data: bytes, text: bool = True) -> None:
        if not self.alive:
            return
        message = msgspec.json.decode(data)
        assert message["project_id"] == 1
        if message["type"] == "unsubscribe":
            if self.subscribed is None:
                error = {"type": "error", "code": "not_subscribed", "message": "no"}
                self.frames.append(frame({**error, "project_id": 1}))
            else:
                self.subscribed = None
                self.frames.append(frame({"type": "unsubscribed", "project_id": 1}))
            return
        assert message["type"] == "subscribe"
        top, after = self.world.top, message.get("after")
        if after is not None:
            assert message["epoch"] == "e1" and after <= top
            self.frames += [event_frame(1, seq) for seq in range(after + 1, top + 1)]
        self.frames.append(subscribed(1, top, resumed=after is not None))
        self.subscribed = bool(message.get("presence"))
        if self.subscribed:
            self.frames.append(frame(presence(*self.world.members.values())))

    def end(self) -> None:
        self.alive = False
        self.frames.clear()
        self.subscribed = None
        self.world.connection = None


steps = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["events", "presence", "close-events", "close-presence"])),
        st.tuples(st.just("publish"), st.integers(1, 3)),
        st.tuples(st.just("deliver"), st.integers(0, 6)),
        st.tuples(st.just("turns"), st.integers(0, 3)),
        st.tuples(st.just("member"), ids_, st.booleans(), st.integers(1, 3)),
        st.tuples(st.sampled_from(["disconnect", "connect"])),
    ),
    max_size=40,
)


@settings(max_examples=500, deadline=None)
@given(steps)
async def test_events_and_presence_opened_and_closed_in_any_order_stay_exact(steps):
    """Any interleaving of following the project's events and reading its presence, opening and
    closing either while frames are in flight: every events subscription gets the project's
    events from the first, once each, in order, never a Resync; and, once everything is
    delivered, a presence reader sees exactly who is there."""
    from consumer import Consumer, Delivery

    consumer = Consumer("ws://unused/", start="beginning")
    consumer._task = asyncio.get_running_loop().create_future()  # no real connection task
    world = ModelWorld()
    gateway = ModelGateway(world)
    consumer._ws = consumer._subscribed_on = gateway  # type: ignore[assignment]
    events = None
    readers: list = []
    got: list[int] = []

    def take() -> None:
        while events is not None and not events._route.queue.empty():
            item = events._route.queue.get_nowait()
            assert type(item) is Delivery, item
            got.append(item.seq)
        assert got == list(range(1, len(got) + 1))

    async def deliver(count: int | None) -> None:
        while gateway.frames and (count is None or count > 0):
            await consumer._on_frame(gateway, gateway.frames.pop(0))  # type: ignore[arg-type]
            count = None if count is None else count - 1
            take()

    try:
        for step in steps:
            kind = step[0]
            if kind == "events" and events is None:
                events, got = consumer.events(1), []
            elif kind == "close-events" and events is not None:
                take()
                await events.aclose()
                events = None
            elif kind == "presence":
                readers.append(consumer.presence(1))
            elif kind == "close-presence" and readers:
                await readers.pop(0).aclose()
            elif kind == "publish":
                for _ in range(step[1]):
                    world.publish()
            elif kind == "member":
                world.change(*step[1:])
            elif kind == "disconnect" and gateway.alive:
                gateway.end()
                consumer._connection_ended()
                assert consumer.members(1) is None
            elif kind == "connect" and not gateway.alive:
                gateway = ModelGateway(world)
                consumer._ws = gateway  # type: ignore[assignment]
                await consumer._subscribe_all(gateway)  # type: ignore[arg-type]
            elif kind == "deliver":
                await deliver(step[1])
            elif kind == "turns":
                for _ in range(step[1]):
                    await asyncio.sleep(0)
        if not gateway.alive:
            gateway = ModelGateway(world)
            consumer._ws = gateway  # type: ignore[assignment]
            await consumer._subscribe_all(gateway)  # type: ignore[arg-type]
        for _ in range(10):  # everything in flight, and what it makes the consumer send
            await settle()
            await deliver(None)
        await settle()
        assert not gateway.frames
        if events is not None:
            assert got == list(range(1, world.top + 1))
        if readers:
            expected = sorted(world.members)
            assert ids_of(PresenceView(1, consumer.members(1))) == expected
            for reader in readers:
                async with asyncio.timeout(5):  # (a view is due: a hang is a failure)
                    view = await anext(reader)
                assert ids_of(view) == expected
        else:
            assert consumer.members(1) is None
        # The gateway holds a subscription exactly when something is followed, with the flag
        # exactly when presence is read.
        if events is None and not readers:
            assert gateway.subscribed is None
        else:
            assert gateway.subscribed is bool(readers)
        assert consumer.stats.resyncs == 0 and consumer.stats.presence_malformed == 0
    finally:
        await consumer.aclose()


async def test_events_of_a_project_read_for_presence_only_are_never_decoded(monkeypatch):
    """The protocol has no presence without events: a project read for its presence only gets
    them all the same. They go to no one: each is ordered by its header alone, its body never
    decoded (an unknown type or a body no schema fits is no more
    than its header), and nothing is queued."""
    import consumer.client as client_module

    consumer, ws = await fake_consumer()
    only = consumer.presence(2)
    await settle()
    await consumer._on_frame(ws, subscribed(2, 7))
    await consumer._on_frame(ws, frame(presence(member("a"), project_id=2)))
    decoded: list[bytes] = []
    plain = client_module.decode_frame

    def counted(raw: bytes) -> object:
        decoded.append(raw)
        return plain(raw)

    monkeypatch.setattr(client_module, "decode_frame", counted)
    unknown = frame({"type": "from_the_future", "project_id": 2, "x": [1, 2], "seq": 10})
    broken = frame({"type": "blocker_resolved", "project_id": 2, "blocker_id": "?", "seq": 11})
    for raw in (event_frame(2, 8), event_frame(2, 9), unknown, broken):
        await consumer._on_frame(ws, raw)
    # (a type this consumer does not know is handed to the decoder, which stops at its tag;
    # telling it by its header first would cost every other frame a header read)
    assert decoded == [unknown]
    assert consumer.cursor(2).seq == 11
    assert consumer.stats.delivered == 0 and consumer.stats.ignored == 0
    # Its presence messages are decoded as ever.
    await consumer._on_frame(ws, frame(diff(joined=[member("b")], project_id=2)))
    assert [m.id for m in consumer.members(2)] == ["a", "b"]
    assert len(decoded) == 2
    await only.aclose()
    await consumer.aclose()


async def test_a_gap_in_a_presence_only_projects_events_costs_no_subscribe():
    """Events of a project read for presence only go to no one: a gap in their seq (or a
    replay stopping short of its top) has nothing to repair. Each was repaired by a subscribe
    from the cursor, a replay of events nobody reads for the gateway, twice per gap before
    a ``history_corrupt`` surfaced to no one."""
    consumer, ws = await fake_consumer()
    only = consumer.presence(2)
    await settle()
    await consumer._on_frame(ws, subscribed(2, 7))
    await consumer._on_frame(ws, frame(presence(member("a"), project_id=2)))

    def subscribes() -> int:
        return sum(1 for sent in ws.sent if sent["type"] == "subscribe")

    assert subscribes() == 1
    for seq in (8, 11, 12, 20, 30, 31, 40, 25):
        await consumer._on_frame(ws, event_frame(2, seq))
    assert subscribes() == 1
    assert consumer.cursor(2).seq == 40
    assert (consumer.stats.gaps, consumer.stats.resyncs, consumer.stats.delivered) == (0, 0, 0)
    # A subscribe from the cursor (the retry after an 'unavailable', say) whose replay stops
    # short of the top its answer names: not asked again either; the cursor takes the top.
    await consumer._send_subscribe(consumer._states[2])
    assert subscribes() == 2 and ws.sent[-1]["after"] == 40
    await consumer._on_frame(ws, event_frame(2, 41))
    await consumer._on_frame(ws, subscribed(2, 45, resumed=True))
    await consumer._on_frame(ws, frame(presence(member("a"), project_id=2)))
    assert subscribes() == 2 and consumer.cursor(2).seq == 45
    await consumer._on_frame(ws, event_frame(2, 46))
    assert subscribes() == 2 and consumer.cursor(2).seq == 46
    await only.aclose()
    await consumer.aclose()


async def test_only_frames_naming_a_presence_only_project_have_their_header_read(monkeypatch):
    """The header read that keeps a presence-only project's events from being decoded costs
    the other frames nothing: a frame that does not begin as such an event does, as the
    gateway relays it (``{"type":"<a known event type>","project_id":N,``), goes straight to
    the full decode. A header read of every frame cost a replay about 6% of its CPU per event
    (bench.consumer --presence). A frame of the presence-only project written otherwise
    (spaces: a foreign stream entry) is decoded in full and placed all the same, to no one."""
    import consumer.client as client_module

    consumer, ws = await fake_consumer()
    events = consumer.events(1)
    watch = consumer.presence(1)  # a followed project's presence: its events are decoded anyway
    only = consumer.presence(12)  # presence only
    await settle()
    consumer._states[1].subscribe_message()
    await consumer._on_frame(ws, subscribed(1, 0))
    await consumer._on_frame(ws, subscribed(12, 7))
    headers: list[bytes] = []
    plain = client_module.event_header

    def counted(raw: bytes) -> object:
        headers.append(raw)
        return plain(raw)

    monkeypatch.setattr(client_module, "event_header", counted)
    for seq in range(1, 4):
        await consumer._on_frame(ws, event_frame(1, seq))  # (project 1: no "project_id":12,)
    assert headers == [] and [(await anext(events)).seq for _ in range(3)] == [1, 2, 3]
    await consumer._on_frame(ws, event_frame(12, 8))
    assert len(headers) == 1 and consumer.cursor(12).seq == 8
    spaced = event_frame(12, 9).replace(b'"project_id":12', b'"project_id": 12')
    await consumer._on_frame(ws, spaced)
    assert consumer.cursor(12).seq == 9 and consumer.stats.delivered == 3
    assert events._route.queue.empty()
    # Many projects read for presence only: every frame's header is read, not compared with
    # each of theirs.
    many = [consumer.presence(p) for p in range(100, 100 + client_module.UNREAD_SEARCHES)]
    await settle()
    headers.clear()
    await consumer._on_frame(ws, event_frame(1, 4))
    assert len(headers) == 1 and (await anext(events)).seq == 4
    for closing in (events, watch, only, *many):
        await closing.aclose()
    await consumer.aclose()


_TAGS = ["blocker_created", "blocker_resolved", "subscribed", "presence", "error", "from_future"]
_scalars = st.one_of(
    st.integers(-3, 3),
    st.integers(2**53 - 2, 2**53 + 1),
    st.integers(2**63, 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)


@st.composite
def event_like_frames(draw) -> bytes:
    """A frame shaped like an event, or like anything else, keys repeated or not, values of any
    type: written by hand, as a hostile gateway could (duplicate keys, odd spacing)."""
    if draw(st.booleans()):  # a real event's fields (it decodes), its seq anything
        pairs = list(msgspec.json.decode(event_frame(draw(st.sampled_from([1, 2])), 5)).items())
        pairs[-1] = ("seq", draw(st.integers(0, 12) | _scalars))
    else:
        pairs = [
            ("type", draw(st.sampled_from(_TAGS) | _scalars)),
            ("project_id", draw(st.sampled_from([1, 2]) | _scalars)),
            ("seq", draw(st.integers(0, 12) | _scalars)),
        ]
    pairs += draw(
        st.lists(
            st.tuples(
                st.sampled_from(["type", "project_id", "seq", "blocker_id", "x"]),
                st.integers(0, 12) | st.sampled_from(_TAGS) | _scalars,
            ),
            max_size=3,
        )
    )
    order = draw(st.permutations(range(len(pairs))) | st.just(range(len(pairs))))
    space = draw(st.sampled_from(["", " "]))
    body = ",".join(
        f"{msgspec.json.encode(pairs[i][0]).decode()}:{space}"
        f"{msgspec.json.encode(pairs[i][1]).decode()}"
        for i in order
    )
    return ("{" + body + space + "}").encode()


def _place_when_decoded(raw: bytes) -> tuple[int, int] | None:
    """Where the full decode (what the client did with every frame before c450adc) puts a frame
    in its project's order: (project, seq), or None when it has no place (ignored, dropped, or
    no event at all)."""
    from consumer.frames import EVENT_TYPES, event_seq

    try:
        message = decode_frame(raw)
    except FrameError as exc:
        return None if exc.header is None else (exc.header[1], exc.header[2])
    if type(message) not in EVENT_TYPES:
        return None
    try:
        return message.project_id, event_seq(raw)  # type: ignore[attr-defined]
    except msgspec.DecodeError:
        return None


@settings(max_examples=2000, deadline=None)
@given(event_like_frames())
def test_an_events_header_places_it_where_its_full_decode_did(raw):
    """Events of a project read for its presence only are ordered by their header alone: a frame
    whose header says one thing and body another (repeated keys, a seq as a float or a bool or
    past 2**53, a type that is no event's) is placed exactly where the full decode placed it,
    and one that had no place has none. (A header that cannot be read, a seq repeated whose
    first is out of range say, is no place: the client decodes that frame as any other.)"""
    from consumer.frames import event_header

    place = event_header(raw)
    assert place is None or place == _place_when_decoded(raw)


def _spelled(project_id: int, seq: int, spelling: int) -> bytes:
    """An event frame of ``project_id``, written as the gateway relays it (0), or otherwise: a
    space, the project before the type, an escaped type, the seq before the body, a type this
    consumer does not know, the project given twice (the last one counts)."""
    from datetime import UTC, datetime

    from schemas.events import BlockerResolved

    event = BlockerResolved(
        project_id=project_id,
        blocker_id=seq,
        answer="a",
        resolved_at=datetime(2025, 11, 8, 12, 45, 30, tzinfo=UTC),
    )
    plain = msgspec.json.encode(event)[:-1] + b',"seq":%d}' % seq
    fields = msgspec.json.decode(plain)
    other = 12 if project_id != 12 else 1
    return [
        plain,
        plain.replace(b'"project_id":', b'"project_id": '),
        msgspec.json.encode({"project_id": project_id, **fields}),
        plain.replace(b'"blocker_resolved"', b'"blocker\\u005fresolved"'),
        msgspec.json.encode({"type": fields["type"], "seq": seq, **fields}),
        b'{"type":"from_a_newer_gateway","project_id":%d,"x":{"seq":1},"seq":%d}'
        % (project_id, seq),
        plain.replace(b'"project_id":%d,' % project_id, b'"project_id":%d,"project_id":%d,')
        % (other, project_id),
    ][spelling]


async def _placed(steps: list[tuple], read_every_header: bool) -> tuple:
    """What a consumer following 1 and 2, reading presence of 1, 2 and 12 (12: presence only),
    made of ``steps`` (frames, and subscriptions closed and opened meanwhile): the items each
    iterator got, the cursors, the frames sent."""
    from consumer import Cursor

    consumer, ws = await fake_consumer()
    if read_every_header:  # as before frames were told apart by their beginning
        consumer._unread_prefixes = lambda: (b"{",)  # type: ignore[method-assign]
    followed: dict[int, object] = {1: consumer.events(1), 2: consumer.events(2)}
    readers = {p: consumer.presence(p) for p in (1, 2, 12)}
    await settle()
    for p in (1, 2):
        consumer._states[p].subscribe_message()
    for p in (1, 2, 12):
        await consumer._on_frame(ws, subscribed(p, 5))
        await consumer._on_frame(ws, frame({"type": "presence", "project_id": p, "members": []}))
    got: dict[int, list] = {1: [], 2: [], 12: []}

    def take(project_id: int) -> None:
        subscription = followed.get(project_id)
        while subscription is not None and not subscription._route.queue.empty():
            got[project_id].append(repr(subscription._route.queue.get_nowait()))

    for step in steps:
        kind, project_id = step[0], step[1]
        if kind == "event":
            await consumer._on_frame(ws, _spelled(project_id, step[2], step[3]))
        elif kind == "subscribed":
            await consumer._on_frame(ws, subscribed(project_id, step[2], resumed=True))
        elif kind == "unsubscribed":
            await consumer._on_frame(ws, frame({"type": "unsubscribed", "project_id": project_id}))
        elif kind == "leave" and project_id in followed:
            take(project_id)
            await followed.pop(project_id).aclose()  # type: ignore[attr-defined]
        elif kind == "follow" and project_id not in followed:
            followed[project_id] = consumer.events(project_id, after=Cursor("e1", step[2]))
        elif kind == "unwatch" and project_id in readers:
            await readers.pop(project_id).aclose()
        await settle()
    for project_id in followed:
        take(project_id)
    return got, {p: consumer.cursor(p) for p in (1, 2, 12)}, ws.sent


_steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("event"), st.sampled_from([1, 2, 12]), st.integers(3, 12), st.integers(0, 6)
        ),
        st.tuples(st.just("subscribed"), st.sampled_from([1, 2, 12]), st.integers(3, 14)),
        st.tuples(st.just("unsubscribed"), st.sampled_from([1, 2, 12])),
        st.tuples(st.sampled_from(["leave", "unwatch"]), st.sampled_from([1, 2, 12])),
        st.tuples(st.just("follow"), st.sampled_from([1, 2, 12]), st.integers(3, 9)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(_steps)
def test_telling_presence_only_frames_by_their_beginning_places_every_frame_as_reading_each_header(
    steps: list[tuple],
):
    """Only a frame beginning as a presence-only project's event does as the gateway relays it
    has its header read; the others go to the full decode (Consumer._unread_prefixes). That is
    a shortcut, never a placement: whatever the frames' spelling (spaces, key order, escapes, a
    newer gateway's type, the project twice) and whichever projects become followed or
    presence-only between them, every iterator gets the same items, every cursor ends the same
    and the same frames are sent as when every frame's header is read."""
    assert asyncio.run(_placed(steps, False)) == asyncio.run(_placed(steps, True))


@pytest.mark.parametrize("resume", ["store", "beginning"])
async def test_following_a_project_whose_presence_only_cursor_skipped_a_gap_replays_the_gap(
    resume: str,
):
    """A presence-only project's cursor moves past a gap (nothing reads those events); events()
    opened later, its frames still in flight, must not inherit that cursor: it follows from its
    own (the store's, or the start of the history), so the gap's events reach it once, in order,
    and none of the live subscription's frames in flight before the gateway's ``unsubscribed``."""
    from consumer import Cursor, MemoryCursorStore

    consumer, ws = await fake_consumer()
    if resume == "store":
        consumer.store = MemoryCursorStore()
        await consumer.store.save(12, Cursor("e1", 5))
    only = consumer.presence(12)
    await settle()
    await consumer._on_frame(ws, subscribed(12, 5))
    await consumer._on_frame(ws, frame(presence(member("a"), project_id=12)))
    await consumer._on_frame(ws, event_frame(12, 6))
    await consumer._on_frame(ws, event_frame(12, 9))  # 7 and 8 missing: skipped
    assert consumer.cursor(12).seq == 9
    events = consumer.events(12, start="beginning") if resume == "beginning" else None
    events = events or consumer.events(12)
    await consumer._on_frame(ws, event_frame(12, 10))  # in flight (the store being read)
    await settle()
    await consumer._on_frame(ws, event_frame(12, 11))  # in flight (the unsubscribe sent)
    assert ws.sent[-2] == {"type": "unsubscribe", "project_id": 12}
    await consumer._on_frame(ws, frame({"type": "unsubscribed", "project_id": 12}))
    if resume == "beginning":  # live first: the answer names the top, then a replay from 0
        assert ws.sent[-1] == {"type": "subscribe", "project_id": 12, "presence": True}
        await consumer._on_frame(ws, subscribed(12, 11))
        await consumer._on_frame(ws, frame(presence(member("a"), project_id=12)))
        assert ws.sent[-1] == {
            "type": "subscribe",
            "project_id": 12,
            "epoch": "e1",
            "after": 0,
            "presence": True,
        }
        first = 1
    else:
        assert ws.sent[-1] == {
            "type": "subscribe",
            "project_id": 12,
            "epoch": "e1",
            "after": 5,
            "presence": True,
        }
        first = 6
    for seq in range(first, 12):
        await consumer._on_frame(ws, event_frame(12, seq))
    await consumer._on_frame(ws, subscribed(12, 11, resumed=True))
    got = []
    while not events._route.queue.empty():
        got.append(events._route.queue.get_nowait().seq)
    assert got == list(range(first, 12))
    await only.aclose()
    await events.aclose()
    await consumer.aclose()
