"""Presence, the pure core (gateway/presence.py, schemas/presence.py): no sockets, no Redis.

The central property: several pods, each with tabs joining, reporting activity and leaving, their
writes announced to each other (through an in-memory stand-in for Redis), and a subscriber on any
pod who applies its ``presence`` and then every ``presence_diff``: it always ends up with exactly
the members the tabs imply, merged across tabs and pods.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.presence import (
    PodTable,
    PresenceCore,
    ProjectView,
    Write,
    apply_diff,
    compute_diff,
)
from schemas.presence import (
    DEFAULT_MAX_ANNOUNCEMENT,
    LISTED_PODS,
    MAX_MEMBER_ID_LENGTH,
    Announcement,
    MalformedAnnouncement,
    OversizedAnnouncement,
    PodRecord,
    PodState,
    announced_bytes,
    decode_record,
    encode_record,
    fits_announcement,
    merge_member,
    merge_pods,
    parse_announcement,
    parse_read_reply,
    parse_versions,
    records_digest,
)
from schemas.protocol import (
    Activity,
    Member,
    Presence,
    PresenceDiff,
    PresenceGet,
    Subscribe,
    decode_client_message,
    encode,
)
from schemas.tokens import MAX_NAME_LENGTH

# --- the wire ---------------------------------------------------------------------------------


def test_client_messages_decode() -> None:
    assert decode_client_message(
        b'{"type":"activity","project_id":1,"viewing":123,"answering":null}'
    ) == Activity(project_id=1, viewing=123, answering=None)
    assert decode_client_message(b'{"type":"activity","project_id":1}') == Activity(1, None, None)
    assert decode_client_message(b'{"type":"presence_get","project_id":7}') == PresenceGet(7)
    assert decode_client_message(b'{"type":"subscribe","project_id":1,"presence":true}').presence
    assert not decode_client_message(b'{"type":"subscribe","project_id":1}').presence
    assert Subscribe(project_id=1).presence is False


@pytest.mark.parametrize(
    "frame",
    [
        b'{"type":"activity","project_id":1,"viewing":0}',
        b'{"type":"activity","project_id":1,"answering":"x"}',
        b'{"type":"activity","viewing":1}',
        b'{"type":"presence_get","project_id":0}',
    ],
)
def test_bad_presence_messages_are_invalid(frame: bytes) -> None:
    from schemas.protocol import ErrorCode, ProtocolError

    with pytest.raises(ProtocolError) as info:
        decode_client_message(frame)
    assert info.value.code == ErrorCode.INVALID_MESSAGE


def test_server_messages_encode() -> None:
    alice = Member(id="u1", name="Alice", viewing=123, answering=None, since=1700000000000)
    assert msgspec.json.decode(encode(Presence(project_id=1, members=[alice]))) == {
        "type": "presence",
        "project_id": 1,
        "members": [
            {"id": "u1", "name": "Alice", "viewing": 123, "answering": None, "since": 1700000000000}
        ],
    }
    diff = PresenceDiff(project_id=1, joined=[], left=["u2"], changed=[alice])
    assert msgspec.json.decode(encode(diff))["left"] == ["u2"]


def test_record_and_announcement_formats() -> None:
    record = PodRecord(name="A", viewing=1, answering=None, since=5, at=9)
    assert encode_record(record) == b'["A",1,null,5,9]'
    assert decode_record(encode_record(record)) == record
    parsed = parse_announcement(b'pod1|7|6|{"u1":["A",1,null,5,9],"u2":null}')
    assert parsed == Announcement("pod1", 7, 6, {"u1": record, "u2": None})
    for bad in (
        b"pod|x|0|{}",
        b"|1|0|{}",
        b"pod|1|0|[]",
        b"pod|1|0",
        b'pod|1|0|{"u":[1]}',
        b"\xff\xfe|1|0|{}",  # another writer's bytes: refused, not a UnicodeDecodeError
        b"p:d|1|0|{}",
        b"pod|" + b"9" * 30 + b"|0|{}",
    ):
        with pytest.raises(MalformedAnnouncement):
            parse_announcement(bad)


def test_read_reply_skips_records_another_writer_damaged() -> None:
    reply = [[b"p1", b"3", [b"u1", b'["A",null,null,1,2]', b"u2", b"garbage"]]]
    assert parse_read_reply([reply, 0]) == {
        "p1": PodState(3, {"u1": PodRecord("A", None, None, 1, 2)})
    }


# --- merging ----------------------------------------------------------------------------------


def test_latest_activity_wins_and_since_is_the_earliest() -> None:
    member = merge_member(
        "u",
        [
            ("p1", PodRecord("Old", 1, None, since=10, at=50)),
            ("p2", PodRecord("New", 2, 2, since=20, at=60)),
        ],
    )
    assert member == Member(id="u", name="New", viewing=2, answering=2, since=10)


def test_merge_ties_are_the_same_on_every_pod() -> None:
    a = ("p1", PodRecord(None, 1, None, 1, 5))
    b = ("p2", PodRecord(None, 2, None, 1, 5))
    assert merge_member("u", [a, b]) == merge_member("u", [b, a])


def test_tabs_of_one_person_are_one_member() -> None:
    table = PodTable()
    table.join("tab1", 1, "alice", "Alice", now_ms=100)
    table.join("tab2", 1, "alice", "Alice", now_ms=200)
    table.activity("tab2", 1, viewing=7, answering=7, now_ms=300)
    assert table.records(1) == {"alice": PodRecord("Alice", 7, 7, since=100, at=300)}
    table.leave("tab2", 1)  # the answering tab closes: the other tab's activity shows
    assert table.records(1) == {"alice": PodRecord("Alice", None, None, since=100, at=100)}
    table.leave("tab1", 1)
    assert table.records(1) == {} and table.projects() == []


def test_a_token_for_someone_else_moves_the_tab() -> None:
    table = PodTable()
    table.join("tab", 1, "alice", None, now_ms=1)
    assert table.join("tab", 1, "bob", None, now_ms=2) == ["alice", "bob"]
    assert set(table.records(1)) == {"bob"}


def test_a_tab_moved_to_another_person_keeps_its_activity() -> None:
    """Activity is the tab's and lives as long as the connection (docs/presence.md): a token
    refresh naming another ``sub`` lists the tab under the new person with what it was doing.
    (Before, the moved tab showed no activity, and eventbus.js, which sends an activity only
    when it changes, never said it again: the new person looked idle while answering.)"""
    table = PodTable()
    table.join("tab", 1, "alice", "Alice", now_ms=1)
    table.activity("tab", 1, viewing=7, answering=8, now_ms=2)
    table.join("tab", 1, "bob", "Bob", now_ms=3)
    # (its report of 2: the move is not one)
    assert table.records(1) == {"bob": PodRecord("Bob", 7, 8, since=3, at=2)}


def test_a_tab_moved_to_a_person_does_not_hide_what_they_reported_since() -> None:
    """A moved tab brings the activity it reported, when it reported it: it is not a new
    report. Bob answers 5 in one tab; his token then reaches a tab that was Alice's (viewing
    7 since before): Bob is still shown answering 5, here and merged with another pod (before,
    the move counted as Bob's latest report, and he was shown viewing 7, answering nothing,
    until his answering tab reported a change: eventbus.js sends one only on a change)."""
    table = PodTable()
    table.join("old", 1, "alice", "Alice", now_ms=1)
    table.activity("old", 1, viewing=7, answering=None, now_ms=2)
    table.join("bobs", 1, "bob", "Bob", now_ms=3)
    table.activity("bobs", 1, viewing=5, answering=5, now_ms=4)
    table.join("old", 1, "bob", "Bob", now_ms=10)  # the token refresh
    assert table.records(1) == {"bob": PodRecord("Bob", 5, 5, since=3, at=4)}
    table.leave("bobs", 1)  # then the moved tab's activity is the latest left
    assert table.records(1) == {"bob": PodRecord("Bob", 7, None, since=10, at=2)}
    table.activity("old", 1, viewing=9, answering=None, now_ms=11)
    assert table.records(1) == {"bob": PodRecord("Bob", 9, None, since=10, at=11)}

    here, there = PodTable(), PodTable()  # the same across pods
    here.join("old", 1, "alice", None, now_ms=1)
    here.activity("old", 1, viewing=7, answering=None, now_ms=2)
    there.join("bobs", 1, "bob", None, now_ms=3)
    there.activity("bobs", 1, viewing=5, answering=5, now_ms=4)
    here.join("old", 1, "bob", None, now_ms=10)
    merged = merge_pods({"here": here.records(1), "there": there.records(1)})
    assert (merged["bob"].viewing, merged["bob"].answering) == (5, 5)


def test_a_new_display_name_does_not_count_as_an_activity_report() -> None:
    """A refreshed token with a new ``name`` renames the person on this pod at once, and is no
    report of the tab's activity: Alice answering in one tab stays shown answering when her
    other tab's token is refreshed with her new name (before, the rename counted as that tab's
    latest report, and she was shown with its old activity until the answering tab reported
    a change)."""
    table = PodTable()
    table.join("fg", 1, "alice", "Alice", now_ms=1)
    table.join("bg", 1, "alice", "Alice", now_ms=2)
    table.activity("bg", 1, viewing=7, answering=None, now_ms=3)
    table.activity("fg", 1, viewing=5, answering=5, now_ms=4)
    assert table.join("bg", 1, "alice", "Alice B.", now_ms=5) == ["alice"]
    assert table.records(1) == {"alice": PodRecord("Alice B.", 5, 5, since=1, at=4)}
    table.join("fg", 1, "alice", "Alice B.", now_ms=6)  # (its own refresh: nothing changes)
    assert table.records(1) == {"alice": PodRecord("Alice B.", 5, 5, since=1, at=4)}


def test_a_tab_moving_from_a_person_it_alone_lists_takes_their_place_under_the_cap() -> None:
    """``is_full`` with the session: the tab moving to another person frees the place of the
    person it leaves only when it is that person's last tab, here and on the other pods."""
    record = PodRecord(None, None, None, 1, 1)
    core = PresenceCore("me", clock_ms=lambda: 1)
    core.join("tab", 1, "erin", None)
    core.join("w", 1, "watcher", None)
    assert core.is_full(1, "frank", 2) and not core.is_full(1, "frank", 2, "tab")
    core.join("tab2", 1, "erin", None)  # erin stays listed through another tab
    assert core.is_full(1, "frank", 2, "tab")
    core.leave("tab2", 1)
    core.load(1, {"other": PodState(1, {"erin": record})})  # and through another pod
    assert core.is_full(1, "frank", 2, "tab")
    core.load(1, {"other": PodState(2, {})})
    assert not core.is_full(1, "frank", 2, "tab")


def test_a_person_past_the_cap_is_listed_once_room_frees() -> None:
    """A tab refused a place at the cap waits for one: when someone leaves (here, or on
    another pod the view shows), it is listed at the next tick, with the activity it reported
    meanwhile (before, it stayed unlisted for as long as the connection lived, while the list
    had room: present, and shown to nobody)."""
    core = PresenceCore("me", clock_ms=lambda: 1)
    core.view(1)
    core.load(1, {"other": PodState(1, {"bob": PodRecord(None, None, None, 1, 1)})})
    core.join("a", 1, "alice", None)
    assert core.is_full(1, "carol", 2)
    core.wait("c", 1, "carol", "Carol", 2)
    core.wait("c2", 1, "carol", "Carol", 2)  # carol's second tab
    assert core.activity("c", 1, 5, None) is False  # not listed yet: kept for later
    core.wait("d", 1, "dave", None, 2)
    for tab in ("c", "c2"):  # re-subscribes keep her place, and her activity
        core.wait(tab, 1, "carol", "Carol", 2)
    assert core.promote() == 0 and set(core.table.records(1)) == {"alice"}
    core.on_announcement(1, Announcement("other", 2, 1, {"bob": None}))  # bob leaves there
    assert core.promote() == 2  # carol, who came first, with both her tabs
    assert core.table.tab_count(1, "carol") == 2
    carol = core.table.records(1)["carol"]
    assert (carol.name, carol.viewing, carol.answering) == ("Carol", 5, None)
    assert set(core.view(1).current()) == {"alice", "carol"}
    core.leave("d", 1)  # dave left while waiting: forgotten
    core.leave("a", 1)
    assert core.promote() == 0 and set(core.table.records(1)) == {"carol"}
    with pytest.raises(ValueError):  # refused now, as a join is, not when listed
        core.wait("x", 1, "", None, 2)
    core.wait("e", 1, "erin", None, 2)
    core.close_session("e")  # so is a closed connection
    assert core.promote() == 0 and set(core.table.records(1)) == {"carol"}


def test_activity_without_join_is_refused() -> None:
    core = PresenceCore("pod", clock_ms=lambda: 1)
    assert core.activity("tab", 1, 5, None) is False
    assert core.take_writes() == []


# --- diffs ------------------------------------------------------------------------------------

member_ids = st.sampled_from([f"u{i}" for i in range(8)])
members_st = st.builds(
    Member,
    id=st.just(""),
    name=st.none() | st.sampled_from(["A", "B"]),
    viewing=st.none() | st.integers(1, 3),
    answering=st.none() | st.integers(1, 3),
    since=st.integers(1, 3),
)
tables = st.dictionaries(member_ids, members_st).map(
    lambda d: {k: msgspec.structs.replace(m, id=k) for k, m in d.items()}
)


@settings(max_examples=300, deadline=None)
@given(tables, tables)
def test_a_diff_applied_to_the_old_table_gives_the_new_one(old, new) -> None:
    diff = compute_diff(1, old, new)
    assert (diff is None) == (old == new)
    assert (apply_diff(old, diff) if diff else old) == new


def test_diff_lists_are_sorted_and_exclusive() -> None:
    def m(member_id: str) -> Member:
        return Member(member_id, None, None, None, 1)

    diff = compute_diff(1, {"c": m("c")}, {"b": m("b"), "a": m("a")})
    assert diff is not None
    assert [x.id for x in diff.joined] == ["a", "b"] and diff.left == ["c"] and diff.changed == []


# --- the core, several pods, and a stand-in for Redis ------------------------------------------


@dataclass
class FakeRedis:
    """The WRITE script's semantics in memory: versions, base checks, announcements."""

    pods: dict[int, dict[str, PodState]] = field(default_factory=dict)
    outbox: list[tuple[int, Announcement]] = field(default_factory=list)

    def write(self, pod: str, w: Write) -> bool:
        project = self.pods.setdefault(w.project_id, {})
        stored = project.get(pod)
        if w.base != 0 and (stored is None or stored.version != w.base):
            return False
        records = {} if w.base == 0 or stored is None else dict(stored.records)
        for member_id, record in w.changes.items():
            if record is None:
                records.pop(member_id, None)
            else:
                records[member_id] = record
        if records:
            project[pod] = PodState(w.version, records)
        else:
            project.pop(pod, None)
        changes = w.changes if w.announce else None  # too large: the pods read Redis
        self.outbox.append((w.project_id, Announcement(pod, w.version, w.base, changes)))
        return True

    def read(self, project_id: int) -> dict[str, PodState]:
        return dict(self.pods.get(project_id, {}))


class Cluster:
    def __init__(self, n_pods: int, max_announcement: int = DEFAULT_MAX_ANNOUNCEMENT) -> None:
        self.now = 0
        self.redis = FakeRedis()
        self.cores = [
            PresenceCore(f"pod{i}", clock_ms=self.clock, max_announcement=max_announcement)
            for i in range(n_pods)
        ]
        self.clients: dict[tuple[int, str], dict[str, Member]] = {}  # (pod, session) -> view

    def clock(self) -> int:
        self.now += 1
        return self.now

    def flush(self) -> None:
        for core in self.cores:
            for w in core.take_writes():
                core.written(w, self.redis.write(core.pod_id, w))
        for project_id, announcement in self.redis.outbox:
            for core in self.cores:
                if not core.on_announcement(project_id, announcement):
                    core.load(project_id, self.redis.read(project_id))
        self.redis.outbox.clear()

    def subscribe(self, pod: int, session: str, project_id: int = 1) -> None:
        core = self.cores[pod]
        self.flush()
        if project_id not in core.views or not core.views[project_id].loaded:
            core.load(project_id, self.redis.read(project_id))
        presence = core.subscribe(session, project_id)
        self.clients[(pod, session)] = {m.id: m for m in presence.members}

    def tick(self) -> None:
        self.flush()
        for pod, core in enumerate(self.cores):
            for sessions, diff in core.tick():
                for session in sessions:
                    key = (pod, session)
                    self.clients[key] = apply_diff(self.clients[key], diff)


def expected_members(
    tabs: dict[tuple[int, str], dict], names: dict[tuple[int, str], str | None]
) -> dict[str, Member]:
    """The members the open tabs imply, computed without the code under test's tables:
    the activity of the tab that reported last, and the name last given on its pod
    (``names``: (pod, member) -> name)."""
    out: dict[str, Member] = {}
    for member_id in {tab["member"] for tab in tabs.values()}:
        mine = [(key, tab) for key, tab in tabs.items() if tab["member"] == member_id]
        (pod, _), latest = max(mine, key=lambda entry: entry[1]["at"])
        out[member_id] = Member(
            member_id,
            names[(pod, member_id)],
            latest["viewing"],
            latest["answering"],
            min(tab["since"] for _, tab in mine),
        )
    return out


operations = st.lists(
    st.one_of(
        st.tuples(st.just("join"), st.integers(0, 2), st.integers(0, 5), member_ids),
        # a refreshed token with another display name
        st.tuples(st.just("rename"), st.integers(0, 2), st.integers(0, 5), st.sampled_from("AB")),
        st.tuples(
            st.just("activity"),
            st.integers(0, 2),
            st.integers(0, 5),
            st.none() | st.integers(1, 3),
            st.none() | st.integers(1, 3),
        ),
        st.tuples(st.just("leave"), st.integers(0, 2), st.integers(0, 5)),
        st.tuples(st.just("tick")),
        st.tuples(st.just("lose"), st.integers(0, 2)),  # Redis loses a pod's records
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(operations, st.sampled_from([DEFAULT_MAX_ANNOUNCEMENT, 0, 60]))
# A pod's last member leaves in a write too large to announce: the read finds the pod gone
# from Redis, which a view takes for a flush and keeps (not found by the draws above).
@example([("join", 1, 0, "u1"), ("tick",), ("leave", 1, 0)], 0)
# A tab whose token names another person moves with its activity.
@example([("join", 1, 0, "u1"), ("activity", 1, 0, 2, 3), ("join", 1, 0, "u2")], 60)
# ... and does not hide what the person's other tab (here on another pod) reported since.
@example(
    [
        ("join", 1, 0, "u1"),
        ("activity", 1, 0, 2, 3),
        ("join", 2, 1, "u2"),
        ("activity", 2, 1, 1, 1),
        ("join", 1, 0, "u2"),
    ],
    DEFAULT_MAX_ANNOUNCEMENT,
)
def test_diffs_reproduce_the_members_across_pods_and_tabs(ops, max_announcement) -> None:
    """Also with writes announced without their records (``max_announcement`` 0: all of
    them; 60 bytes: those of more than one member), which the other pods read instead."""
    cluster = Cluster(3, max_announcement)
    cluster.subscribe(0, "watcher0")
    cluster.subscribe(2, "watcher2")
    tabs: dict[tuple[int, str], dict] = {}
    names: dict[tuple[int, str], str | None] = {}  # (pod, member) -> the name last given
    for op in ops:
        if op[0] == "join":
            _, pod, tab, member = op
            key = (pod, f"tab{tab}")
            if key in tabs and tabs[key]["member"] == member:
                continue
            cluster.cores[pod].join(key[1], 1, member, member.upper())
            names[(pod, member)] = member.upper()
            # A tab moved to another person keeps its activity, and when it reported it.
            moved = tabs.get(key, {})
            tabs[key] = {
                "member": member,
                "name": member.upper(),
                "viewing": moved.get("viewing"),
                "answering": moved.get("answering"),
                "since": cluster.now,
                "at": moved.get("at", cluster.now),
            }
        elif op[0] == "rename":
            _, pod, tab, name = op
            key = (pod, f"tab{tab}")
            if key in tabs:
                cluster.cores[pod].join(key[1], 1, tabs[key]["member"], name)
                if name != tabs[key]["name"]:  # (renames the person there; no report)
                    tabs[key]["name"] = name
                    names[(pod, tabs[key]["member"])] = name
        elif op[0] == "activity":
            _, pod, tab, viewing, answering = op
            key = (pod, f"tab{tab}")
            joined = cluster.cores[pod].activity(key[1], 1, viewing, answering)
            assert joined == (key in tabs)
            if joined:
                tabs[key].update(viewing=viewing, answering=answering, at=cluster.now)
        elif op[0] == "leave":
            _, pod, tab = op
            cluster.cores[pod].leave(f"tab{tab}", 1)
            tabs.pop((pod, f"tab{tab}"), None)
        elif op[0] == "lose":
            # Redis forgets the pod (flush); its next refresh says so and it rewrites.
            pod_id = cluster.cores[op[1]].pod_id
            cluster.redis.pods.get(1, {}).pop(pod_id, None)
            live = {p: s.version for p, s in cluster.redis.read(1).items()}
            cluster.cores[op[1]].refreshed(1, ok=False, live=live)
        else:
            cluster.tick()
    cluster.tick()
    want = expected_members(tabs, names)
    assert cluster.clients[(0, "watcher0")] == want
    assert cluster.clients[(2, "watcher2")] == want
    # A late subscriber starts from the same state, and Redis holds it too.
    cluster.subscribe(1, "late")
    assert cluster.clients[(1, "late")] == want
    assert cluster.cores[1].snapshot_of_read(1, cluster.redis.read(1)).members == [
        want[k] for k in sorted(want)
    ]


_capped_ops = st.lists(
    st.one_of(
        st.tuples(st.just("join"), st.integers(0, 2), st.integers(0, 5), member_ids),
        st.tuples(
            st.just("activity"), st.integers(0, 2), st.integers(0, 5), st.none() | st.integers(1, 3)
        ),
        st.tuples(st.just("leave"), st.integers(0, 2), st.integers(0, 5)),
        st.tuples(st.just("tick")),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(_capped_ops, st.integers(1, 3), st.integers(1, 3))
@example([("join", 0, 0, "u1"), ("join", 0, 1, "u2"), ("leave", 0, 0)], 1, 1)
@example(  # a person listed (by a move) while their tab waits behind another person's
    [("join", 0, 0, "u0"), ("join", 0, 2, "u2"), ("join", 0, 1, "u1"), ("join", 0, 0, "u1")],
    1,
    1,
)
@example(  # a waiting tab re-subscribes once a place freed: listed with what it reported
    [
        ("join", 0, 0, "u1"),
        ("join", 0, 1, "u0"),
        ("leave", 0, 0),
        ("activity", 0, 1, 1),
        ("join", 0, 1, "u0"),
    ],
    1,
    1,
)
def test_at_the_cap_waiting_tabs_take_freed_places_and_every_view_agrees(ops, cap, n_pods) -> None:
    """Tabs joining as the gateway lists them (at the cap they wait), reporting activity and
    leaving, on 1 to 3 pods that all watch the project: once the pods have settled, no pod
    holds a waiting tab while its view has room, a listed tab shows the last activity it
    reported (waiting or not), on one pod the list never passes the cap, and every
    subscriber's diffs, a late subscriber and a Redis read give the same members as the pods'
    own tables merged."""
    cluster = Cluster(n_pods)
    for pod in range(n_pods):
        cluster.subscribe(pod, f"watcher{pod}")
    reported: dict[tuple[int, str], tuple[int | None, int | None]] = {}
    # (pod, tab) -> (member, the order of its last report): arriving, listed or waiting, is
    # one; activity is one; a move or a re-subscribe is none
    last: dict[tuple[int, str], tuple[str, int]] = {}
    order = itertools.count()

    def settle() -> None:
        for _ in range(3):
            cluster.flush()
            for core in cluster.cores:
                core.promote()
            cluster.tick()

    for op in ops:
        if op[0] == "join":
            _, pod, tab, member = op
            pod %= n_pods
            core, session = cluster.cores[pod], f"tab{tab}"
            if core.is_full(1, member, cap, session):  # as gateway.clients does
                core.wait(session, 1, member, None, cap)
            else:
                core.join(session, 1, member, None)
            reported.setdefault((pod, session), (None, None))
            before = last.get((pod, session))
            last[(pod, session)] = (member, next(order) if before is None else before[1])
        elif op[0] == "activity":
            _, pod, tab, viewing = op
            pod %= n_pods
            if (pod, f"tab{tab}") in reported:
                cluster.cores[pod].activity(f"tab{tab}", 1, viewing, None)
                reported[(pod, f"tab{tab}")] = (viewing, None)
                last[(pod, f"tab{tab}")] = (last[(pod, f"tab{tab}")][0], next(order))
        elif op[0] == "leave":
            _, pod, tab = op
            cluster.cores[pod % n_pods].leave(f"tab{tab}", 1)
            reported.pop((pod % n_pods, f"tab{tab}"), None)
            last.pop((pod % n_pods, f"tab{tab}"), None)
        else:
            cluster.flush()
            for core in cluster.cores:
                core.promote()
            cluster.tick()
        if n_pods == 1:
            assert cluster.cores[0].table.member_count(1) <= cap
    settle()
    for pod, core in enumerate(cluster.cores):
        assert not core._waiting or core._no_place(1, cap)
        for waiting in core._waiting.get(1, {}).values():  # (listed: no place needed)
            assert not core._listed(1, waiting.member_id)
        # the refresh finds Redis holding what the pod wrote: no rewrite (its digest, kept
        # up to date change by change, is that of the records stored)
        stored = cluster.redis.pods.get(1, {}).get(core.pod_id)
        counts = core.refresh_counts(core.refresh_plan())
        if stored is not None:
            assert counts[1] == (len(stored.records), records_digest(stored.records))
        for (p, session), activity in reported.items():
            tab = core.table.tab(session, 1) if p == pod else None
            if tab is not None:
                assert (tab.viewing, tab.answering) == activity
    want = merge_pods({core.pod_id: core.table.records(1) for core in cluster.cores})
    # a person listed shows what their listed tab that reported last reported (a promotion
    # is no report: it must not hide a later one)
    latest: dict[str, tuple[int, tuple[int | None, int | None]]] = {}
    for (pod, session), (member, when) in last.items():
        if cluster.cores[pod].table.tab(session, 1) is not None:
            latest[member] = max(latest.get(member, (-1, None)), (when, reported[(pod, session)]))
    assert {m: (w.viewing, w.answering) for m, w in want.items()} == {
        m: activity for m, (_, activity) in latest.items()
    }
    for pod in range(n_pods):
        assert cluster.clients[(pod, f"watcher{pod}")] == want
    cluster.subscribe(0, "late")
    assert cluster.clients[(0, "late")] == want
    assert cluster.cores[0].snapshot_of_read(1, cluster.redis.read(1)).members == [
        want[k] for k in sorted(want)
    ]


# A watching pod that learns late: announcements delivered whenever, a read answered after
# announcements made since it ran, pods that die (their records expire) or leave, new pod ids.
_late_ops = st.lists(
    st.one_of(
        st.tuples(st.just("join"), st.integers(0, 3), st.integers(0, 2), member_ids),
        st.tuples(st.just("activity"), st.integers(0, 3), st.integers(0, 2), st.integers(1, 3)),
        st.tuples(st.just("leave"), st.integers(0, 3), st.integers(0, 2)),
        st.tuples(st.just("write"), st.integers(0, 3)),
        st.tuples(st.just("deliver"), st.integers(1, 4)),
        st.tuples(st.just("read")),  # a read runs in Redis now...
        st.tuples(st.just("answer")),  # ...and its reply arrives now
        st.tuples(st.just("refresh")),
        st.tuples(st.just("die"), st.integers(0, 3)),  # its records expire; a new pod starts
        st.tuples(st.just("flush")),  # Redis loses everything
        st.tuples(st.just("pod_refresh"), st.integers(0, 3)),  # (finds its records lost)
        st.tuples(st.just("reconnect")),  # the announcements not delivered yet are lost
    ),
    max_size=50,
)


@settings(max_examples=300, deadline=None)
@given(_late_ops)
def test_a_watching_pod_converges_with_late_announcements_stale_reads_and_dying_pods(ops) -> None:
    """Whatever the order in which a watching pod gets announcements, read replies (made
    before announcements it already applied) and refresh reports, and however pods die and
    new ones start: once everything is delivered and refreshes have missed the dead pods, its
    subscriber's view is exactly what Redis lists, and the view keeps no pod Redis does not."""
    redis_ = FakeRedis()
    clock = itertools.count(1)
    names = itertools.count()
    writers = [PresenceCore(f"w{next(names)}", clock_ms=lambda: next(clock)) for _ in range(4)]
    watcher = PresenceCore("watcher", clock_ms=lambda: next(clock))
    watcher.load(1, {})
    client = {m.id: m for m in watcher.subscribe("screen", 1).members}
    delivered = 0
    pending_read: dict[str, PodState] | None = None
    wanted_read = False

    def live() -> dict[str, int]:
        return {pod: state.version for pod, state in redis_.pods.get(1, {}).items()}

    def write(core: PresenceCore) -> None:
        for w in core.take_writes():
            core.written(w, redis_.write(core.pod_id, w))

    for op in ops:
        kind = op[0]
        if kind == "join":
            writers[op[1]].join(f"tab{op[2]}", 1, op[3], None)
        elif kind == "activity":
            writers[op[1]].activity(f"tab{op[2]}", 1, op[3], None)
        elif kind == "leave":
            writers[op[1]].leave(f"tab{op[2]}", 1)
        elif kind == "write":
            write(writers[op[1]])
        elif kind == "deliver":
            for project_id, announcement in redis_.outbox[delivered : delivered + op[1]]:
                wanted_read |= not watcher.on_announcement(project_id, announcement)
            delivered = min(delivered + op[1], len(redis_.outbox))
        elif kind == "read":
            if pending_read is None:
                pending_read, wanted_read = redis_.read(1), False
        elif kind == "answer":
            if pending_read is not None:
                wanted_read |= not watcher.load(1, pending_read)
                pending_read = None
        elif kind == "refresh":
            wanted_read |= watcher.refreshed(1, True, live())
        elif kind == "flush":
            redis_.pods.pop(1, None)
        elif kind == "pod_refresh":
            core = writers[op[1]]
            if 1 in core.refresh_plan():
                stored = core.stored_versions().get(1, 0)
                ok = stored != 0 and live().get(core.pod_id) == stored
                core.refreshed(1, ok, live())
        elif kind == "reconnect":
            delivered, wanted_read = len(redis_.outbox), True
        else:  # die: its records expire (no announcement), and a pod with a new id starts
            redis_.pods.get(1, {}).pop(writers[op[1]].pod_id, None)
            writers[op[1]] = PresenceCore(f"w{next(names)}", clock_ms=lambda: next(clock))
        for sessions, diff in watcher.tick():
            assert sessions == ["screen"]
            client = apply_diff(client, diff)

    # Everything arrives, the reads asked for are made, and refreshes miss the dead.
    for core in writers:
        if 1 in core.refresh_plan():  # (what Redis lost is written again)
            stored = core.stored_versions().get(1, 0)
            core.refreshed(1, stored != 0 and live().get(core.pod_id) == stored, live())
        write(core)
    if pending_read is not None:
        wanted_read |= not watcher.load(1, pending_read)
    for project_id, announcement in redis_.outbox[delivered:]:
        wanted_read |= not watcher.on_announcement(project_id, announcement)
    for _ in range(ProjectView.MISSES_BEFORE_DROP + 2):
        wanted_read |= watcher.refreshed(1, True, live())
        while wanted_read:
            wanted_read = not watcher.load(1, redis_.read(1))
    for _, diff in watcher.tick():
        client = apply_diff(client, diff)
    stored = redis_.read(1)
    assert client == merge_pods({pod: state.records for pod, state in stored.items()})
    assert set(watcher.views[1].versions) <= set(stored) | {"watcher"}


def test_at_most_one_diff_per_tick_whatever_the_changes() -> None:
    cluster = Cluster(2)
    cluster.subscribe(1, "watcher")
    for i in range(50):
        cluster.cores[0].join(f"tab{i}", 1, f"u{i}", None)
        cluster.cores[0].activity(f"tab{i}", 1, 1, None)
        cluster.cores[0].activity(f"tab{i}", 1, 2, None)
    cluster.flush()
    diffs = cluster.cores[1].tick()
    assert len(diffs) == 1 and len(diffs[0][1].joined) == 50
    assert cluster.cores[1].tick() == []  # nothing new: nothing sent


def test_only_changed_members_are_merged_again() -> None:
    core = PresenceCore("p", clock_ms=iter(range(1, 10**6)).__next__)
    core.load(1, {})
    core.subscribe("watcher", 1)
    for i in range(100):
        core.join(f"t{i}", 1, f"u{i}", None)
    core.tick()
    core.activity("t5", 1, 9, None)
    [(_, diff)] = core.tick()
    assert [m.id for m in diff.changed] == ["u5"] and not diff.joined and not diff.left


def test_a_writes_carry_changes_only_and_a_lost_pod_rewrites_everything() -> None:
    clock = iter(range(1, 10**6)).__next__
    core = PresenceCore("p", clock_ms=clock)
    for i in range(3):
        core.join(f"t{i}", 1, f"u{i}", None)
    [first] = core.take_writes()
    assert first.base == 0 and set(first.changes) == {"u0", "u1", "u2"}
    core.written(first, ok=True)
    core.activity("t1", 1, 4, None)
    [second] = core.take_writes()
    assert second.base == first.version and set(second.changes) == {"u1"}
    core.written(second, ok=False)  # Redis no longer had version `first.version`
    [third] = core.take_writes()
    assert third.base == 0 and set(third.changes) == {"u0", "u1", "u2"}


def test_the_refresh_plan_is_one_entry_per_project_not_per_connection() -> None:
    core = PresenceCore("p", clock_ms=lambda: 1)
    for i in range(500):
        core.join(f"t{i}", 1 + i % 2, f"u{i}", None)
    core.load(3, {})
    assert core.refresh_plan() == {1: 0, 2: 0, 3: None}


def test_a_missed_announcement_asks_for_a_read() -> None:
    view = ProjectView(1, "me")
    view.load({"other": PodState(3, {})}, {})
    record = PodRecord(None, None, None, 1, 1)
    assert view.apply(Announcement("other", 4, 3, {"u": record}))
    assert not view.apply(Announcement("other", 6, 5, {"v": record}))  # 5 never arrived
    assert view.apply(Announcement("other", 4, 3, {"u": record}))  # an old one: ignored


def test_a_write_too_large_to_announce_is_announced_without_its_records() -> None:
    """100 members with ids and names as long as presence lists them, in a script of 3 bytes
    a character: ~140 KB of records in one write, announced whole before (Redis closed every
    pod's pub/sub connection it queued that on, past its output buffer limit). Over the bound
    the write carries no records in its announcement; under it, it does."""
    core = PresenceCore("p", clock_ms=lambda: 1, max_announcement=64 * 1024)
    for i in range(100):
        core.join(f"t{i}", 1, f"{i:03d}" + "用" * 252, "名" * MAX_NAME_LENGTH)
    [large] = core.take_writes()
    assert len(large.changes) == 100 and not large.announce
    assert announced_bytes(large.changes) > 64 * 1024
    core.written(large, ok=True)
    core.activity("t5", 1, 9, None)
    [small] = core.take_writes()
    assert small.announce and small.base == large.version


def test_a_pod_emptied_by_a_write_too_large_to_announce_leaves_every_view_at_once() -> None:
    """100 people with long ids close their tabs on one pod within a write interval: ~77 KB
    of departures, over the bound. Announced without records, the other pods' read found the
    pod gone from Redis (a write that empties a pod removes it), which a view keeps, as after a
    flush, until three refresh reports miss it: every person stayed listed there ~9 s (3 s
    refreshes). The write replaces the pod's list with nothing instead, announced as such (2
    bytes, whatever the bound, even 0): every view drops the pod at once, without a read."""
    for bound in (64 * 1024, 0):
        cluster = Cluster(2, bound)
        cluster.subscribe(1, "watcher")
        for i in range(100):
            cluster.cores[0].join(f"t{i}", 1, f"{i:03d}" + "用" * 252, None)
        cluster.tick()
        assert len(cluster.clients[(1, "watcher")]) == 100
        for i in range(100):
            cluster.cores[0].leave(f"t{i}", 1)
        [left] = cluster.cores[0].take_writes()
        assert cluster.redis.write("pod0", left)
        cluster.cores[0].written(left, ok=True)
        [(_, announcement)] = cluster.redis.outbox
        assert announcement.changes == {} and announcement.base == 0  # the whole list: none
        assert cluster.cores[1].on_announcement(1, announcement)  # applied: no read
        cluster.redis.outbox.clear()
        cluster.tick()
        assert cluster.clients[(1, "watcher")] == {}
        assert cluster.cores[0].stored_versions() == {}


def test_announced_bytes_bounds_what_write_publishes() -> None:
    """The size the bound is checked against is never below the announcement's: ids as the
    WRITE script's cjson escapes them (``"``, ``\\``, ``/`` in 2 bytes, control characters in
    up to 6), records as encoded, ``null`` for a member who left (checked against Redis's own
    cjson in tests/test_presence_store.py)."""
    record = PodRecord('Ann "A"', 3, None, 5, 9)
    changes: dict[str, PodRecord | None] = {"a/b": record, 'q"\\': None, "\x01\x7f": record}
    cjson = {"a/b": '"a\\/b"', 'q"\\': '"q\\"\\\\"', "\x01\x7f": '"\\u0001\\u007f"'}
    body = (
        "{"
        + ",".join(
            cjson[m] + ":" + ("null" if r is None else encode_record(r).decode())
            for m, r in changes.items()
        )
        + "}"
    )
    assert announced_bytes(changes) == len(body.encode())
    assert announced_bytes({}) == 2
    assert fits_announcement(changes, len(body)) and not fits_announcement(changes, len(body) - 1)
    assert fits_announcement({}, 2) and not fits_announcement({}, 0)


def test_an_announcement_without_records_asks_for_a_read_unless_already_read() -> None:
    record = PodRecord(None, None, None, 1, 1)
    assert parse_announcement(b"pod-1|7|6|") == Announcement("pod-1", 7, 6, None)
    view = ProjectView(1, "me")
    view.load({"other": PodState(3, {"u": record})}, {})
    assert not view.apply(Announcement("other", 4, 3, None))  # its records are in Redis only
    assert view.current().keys() == {"u"}  # nothing applied meanwhile
    assert view.load({"other": PodState(4, {"u": record, "v": record})}, {})
    assert view.apply(Announcement("other", 4, 3, None))  # the read had it
    assert view.current().keys() == {"u", "v"}
    early = ProjectView(1, "me")
    early.apply(Announcement("other", 5, 0, None))  # before the first read: kept for after it
    assert early.load({"other": PodState(5, {"w": record})}, {})
    late = ProjectView(1, "me")
    late.apply(Announcement("other", 6, 5, None))
    assert not late.load({"other": PodState(5, {})}, {})  # the read predates it: read again


def test_announcements_before_the_first_read_are_applied_after_it() -> None:
    view = ProjectView(1, "me")
    record = PodRecord(None, None, None, 1, 1)
    view.apply(Announcement("other", 2, 1, {"late": record}))
    assert view.load({"other": PodState(1, {"early": record})}, {})
    assert set(view.current()) == {"early", "late"}


def test_announcements_while_the_first_read_waits_are_kept_up_to_a_bound() -> None:
    """Announcements that arrive while a view's first read waits (Redis slow: up to the read's
    bound) are kept to apply after it, but no more than ``most`` of them: another writer
    publishing on the channel as fast as Redis takes it grew the list without bound. Past it
    they are not kept, and the read is made again (False), which lists what they announced."""
    record = PodRecord(None, None, None, 1, 1)
    view = ProjectView(1, "me", most=10)
    for version in range(2, 10_002):
        assert view.apply(Announcement("other", version, version - 1, {"late": record}))
    assert len(view._early) <= 10
    assert not view.load({"other": PodState(1, {"early": record})}, {})  # read again
    assert view.load({"other": PodState(10_001, {"late": record})}, {})
    assert set(view.current()) == {"late"} and view._early == []


def test_announcements_kept_while_the_first_read_waits_hold_at_most_a_views_worth_of_records():
    """The announcements kept while a view's first read waits hold no more records in all than
    a loaded view lists (``listed_limit``, LISTED_PODS x ``most``); past that the read is made
    again, as past ``most`` announcements. Before, ``most`` announcements of ``most`` records
    each were kept: with the default cap, 2,064 x 2,064 (4.3 million records, about 850 MB) per
    project whose first read Redis was slow to answer, from another writer flooding the
    channel."""
    most = 100
    records = {f"m{i}": PodRecord(None, None, None, 1, 1) for i in range(most)}
    view = ProjectView(1, "me", most=most)
    for version in range(1, most + 1):
        assert view.apply(Announcement(f"p{version % 8}", version, 0, records))
    kept = sum(len(a.changes or ()) for a in view._early)
    assert kept <= LISTED_PODS * most
    assert not view.load({}, {})  # read again: the read lists what they announced


def test_a_read_without_a_pod_keeps_it_until_refreshes_miss_it() -> None:
    # After a Redis flush or restart, a read may come before the pod has rewritten its records:
    # dropping it then would show all its members leaving and joining again.
    view = ProjectView(1, "me")
    record = PodRecord(None, None, None, 1, 1)
    view.load({"other": PodState(1, {"u": record})}, {})
    view.snapshot()
    view.load({}, {})
    assert view.take_diff() is None
    view.apply(Announcement("other", 5, 0, {"u": record}))  # the pod rewrote everything
    assert view.take_diff() is None and view.versions["other"] == 5


def test_a_pod_missing_from_consecutive_refresh_reports_is_dropped() -> None:
    view = ProjectView(1, "me")
    view.load({"dead": PodState(1, {"u": PodRecord(None, None, None, 1, 1)})}, {})
    view.snapshot()
    for _ in range(ProjectView.MISSES_BEFORE_DROP - 1):
        # Perhaps Redis was flushed and the pod is rewriting its records.
        assert not view.check_live({})
        assert "u" in view.current()
    view.check_live({})
    assert view.take_diff() == PresenceDiff(1, joined=[], left=["u"], changed=[])


def test_a_pod_ahead_of_the_view_twice_running_means_a_lost_announcement() -> None:
    view = ProjectView(1, "me")
    view.load({"other": PodState(1, {})}, {})
    assert not view.check_live({"other": 2})  # the announcement may be in flight
    assert view.check_live({"other": 2})


def test_a_view_ahead_of_redis_twice_running_is_forged_and_replaced_by_a_read() -> None:
    """A write stores its version before announcing it, so a view ahead of Redis is at most a
    refresh reply overtaken by an announcement (once), unless an announcement was forged: the
    view is re-read then, and the read replaces the forged pod whatever its version."""
    record = PodRecord(None, None, None, 1, 1)
    view = ProjectView(1, "me")
    view.load({"other": PodState(3, {"u": record})}, {})
    view.apply(Announcement("other", 10**9, 0, {"forged": record}))
    assert not view.check_live({"other": 3})  # once: may be a reply overtaken
    assert view.check_live({"other": 3})
    assert view.load({"other": PodState(3, {"u": record})}, {})
    assert set(view.current()) == {"u"} and view.versions["other"] == 3
    # A pod that writes on while replies are overtaken is ahead by another version each time.
    view.apply(Announcement("other", 4, 3, {}))
    assert not view.check_live({"other": 3})
    view.apply(Announcement("other", 5, 4, {}))
    assert not view.check_live({"other": 4})


@pytest.mark.parametrize("forged_first", [True, False])
def test_two_announcements_of_one_version_mean_a_forged_one_and_a_read(forged_first) -> None:
    """Another writer publishing a pod's next version (seen on the channel: versions count up)
    with its own records, before or after the pod's real announcement of it: the view takes
    the second for one it already has, and, Redis reporting that very version, nothing ever
    told it apart. Two different announcements of one version ask for a read, which replaces
    the pod whatever its version (before, the forged member stayed listed, the real change
    missing, until the pod wrote its whole list again)."""
    record = PodRecord(None, None, None, 1, 1)
    view = ProjectView(1, "me")
    view.load({"a": PodState(5, {"alice": record})}, {})
    forged = Announcement("a", 6, 5, {"mallory": record})
    real = Announcement("a", 6, 5, {"bob": record})
    first, second = (forged, real) if forged_first else (real, forged)
    assert view.apply(first)
    assert view.apply(first)  # (the same again is no conflict)
    assert not view.apply(second)  # read the project
    assert view.load({"a": PodState(6, {"alice": record, "bob": record})}, {})
    assert set(view.current()) == {"alice", "bob"}
    assert not view.check_live({"a": 6}) and not view.check_live({"a": 6})


def test_closing_a_session_leaves_and_unsubscribes_everywhere() -> None:
    core = PresenceCore("p", clock_ms=lambda: 1)
    core.load(1, {})
    core.join("tab", 1, "alice", None)
    core.join("tab", 2, "alice", None)
    core.subscribe("tab", 1)
    assert core.close_session("tab") == [1]
    assert core.table.projects() == [] and core.views == {}
    assert {w.project_id for w in core.take_writes()} == {1, 2}


def test_an_empty_member_id_is_refused() -> None:
    with pytest.raises(ValueError, match="1 to 255"):
        PresenceCore("p", clock_ms=lambda: 1).join("tab", 1, "", None)


@pytest.mark.parametrize(
    ("member_id", "name"), [("u\udc00", None), ("u", "Alice \ud83d"), ("u" * 256, None)]
)
def test_an_id_or_name_that_is_not_text_is_refused(member_id: str, name: str | None) -> None:
    """Half a surrogate pair cannot be encoded: taken in, its record would fail the pod's write
    pipeline (every project) and its diff the diff loop (every subscriber)."""
    core = PresenceCore("p", clock_ms=lambda: 1)
    with pytest.raises(ValueError, match="text"):
        core.join("tab", 1, member_id, name)
    assert core.take_writes() == []


def test_member_ids_are_bounded_everywhere_presence_reads_them() -> None:
    """A member id is a token's ``sub``, at most 255 characters (OpenID Connect's bound): each
    presence message carries every member's id, so a longer one (user info put in ``sub``)
    is not listed by a pod, and not taken from Redis or the channel either."""
    longest, longer = "u" * 255, "u" * 256
    core = PresenceCore("p", clock_ms=lambda: 1)
    core.join("tab", 1, longest, None)
    assert core.can_list(longest) and not core.can_list(longer) and not core.can_list("")
    good = encode_record(PodRecord(name=None, viewing=None, answering=None, since=1, at=1))
    reply = [[b"pod-1", b"1", [longest.encode(), good, longer.encode(), good, b"\xe9" * 300, good]]]
    assert set(parse_read_reply([reply, 0])["pod-1"].records) == {longest}
    with pytest.raises(MalformedAnnouncement):
        parse_announcement(b'pod-1|2|1|{"' + longer.encode() + b'":null}')
    assert parse_announcement(b'pod-1|2|1|{"' + longest.encode() + b'":null}').changes == {
        longest: None
    }


def test_one_refresh_report_without_a_pod_is_not_its_death() -> None:
    # Between a Redis flush and the pod's next refresh, the reports of the other pods lack it;
    # taking that for death would show its members leaving and joining again.
    view = ProjectView(1, "me")
    view.load({"other": PodState(1, {"u": PodRecord(None, None, None, 1, 1)})}, {})
    view.snapshot()
    assert not view.check_live({})
    assert not view.check_live({})
    assert view.take_diff() is None
    assert not view.check_live({"other": 1})  # it is back: the count starts again
    assert not view.check_live({}) and view.take_diff() is None


# --- garbage in Redis ------------------------------------------------------------------------

_redis_values = st.one_of(
    st.binary(max_size=40),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.sampled_from([b"pod-1", b"7", b"0", b"-1", b"1e3", b"pod 1", b"\xff\xfe", b"9" * 30]),
)
_replies = st.recursive(_redis_values, lambda inner: st.lists(inner, max_size=5), max_leaves=30)


@given(st.lists(st.lists(_replies, min_size=3, max_size=3), max_size=4))
def test_any_read_reply_parses_to_what_the_scripts_could_have_written(reply) -> None:
    """Another writer to the presence keys (garbage pods, versions, records) never raises: what
    the scripts cannot have written is skipped, the rest is kept."""
    for pod, state in parse_read_reply([reply, 0]).items():
        assert 1 <= len(pod) <= 64 and state.version >= 0
        assert all(isinstance(record, PodRecord) for record in state.records.values())


@given(st.lists(_redis_values, max_size=10))
def test_any_versions_hash_parses_to_valid_pods(flat) -> None:
    for pod, version in parse_versions(flat).items():
        assert 1 <= len(pod) <= 64 and 0 <= version < 10**18


def test_a_garbage_pod_is_skipped_and_the_others_kept() -> None:
    good = encode_record(PodRecord(name="A", viewing=None, answering=None, since=1, at=1))
    reply = [
        [b"pod-1", b"3", [b"alice", good, b"bob", b"{not json"]],
        [b"pod 2", b"3", [b"carol", good]],
        [b"pod-3", b"three", [b"dave", good]],
        [b"pod-4", b"1", b"not a list"],
    ]
    assert {pod: set(s.records) for pod, s in parse_read_reply([reply, 0]).items()} == {
        "pod-1": {"alice"}
    }
    assert parse_versions([b"pod-1", b"2", b"pod\n", b"3", b"pod-2", b"x"]) == {"pod-1": 2}


def test_a_nested_reply_in_place_of_a_record_is_skipped() -> None:
    # Found by the property test above: a list where a record's JSON belongs raised TypeError.
    good = encode_record(PodRecord(name="A", viewing=None, answering=None, since=1, at=1))
    reply = [[b"pod-1", b"3", [b"alice", good, b"bob", [b"x"], [b"carol"], good]]]
    assert {pod: set(s.records) for pod, s in parse_read_reply([reply, 0]).items()} == {
        "pod-1": {"alice"}
    }


def test_one_person_with_many_tabs_costs_each_tab_its_own_work() -> None:
    """One ``sub`` in thousands of tabs (a shared kiosk token, or one hostile user opening
    sockets) on a watched project: each join, activity and leave must cost about the same as
    with one tab. Merging all of a member's tabs on every change made N tabs cost N^2 (10,000
    tabs: about a minute of the event loop, every other client frozen meanwhile)."""
    import time

    tabs = 10_000
    core = PresenceCore("p", clock_ms=iter(range(1, 10**6)).__next__)
    core.load(1, {})
    core.subscribe("watcher", 1)
    started = time.perf_counter()
    budget = 3.0  # ~0.2 s on one core when each change costs its own tab's work
    for step, op in enumerate(("join", "activity", "leave")):
        for i in range(tabs):
            if op == "join":
                core.join(f"t{i}", 1, "kiosk", None)
            elif op == "activity":
                core.activity(f"t{i}", 1, i + 1, None)
            elif i < tabs - 1:  # the first tab stays: it is the earliest to have joined
                core.leave(f"t{tabs - 1 - i}", 1)
            if i % 500 == 0:
                assert time.perf_counter() - started < budget, f"{op} of tab {i} over budget"
        if step == 1:
            assert core.table.record(1, "kiosk") == PodRecord(None, tabs, None, 1, 2 * tabs)
    assert core.table.record(1, "kiosk") == PodRecord(None, 1, None, 1, tabs + 1)


_any_int = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64), st.sampled_from([0, 1, 2**53 - 1, 2**53, -1])
)
_record_values = st.tuples(
    st.none() | st.text(max_size=3) | st.just("x" * 201) | _any_int,
    st.none() | _any_int | st.booleans(),
    st.none() | _any_int | st.text(max_size=2),
    _any_int | st.none(),
    _any_int,
)


@given(_record_values, st.sampled_from([b"u", b""]))
def test_a_record_is_only_what_a_pod_can_have_written(values, member_id) -> None:
    """A pod writes what a token and ``activity`` allow: a name of 1 to 200 characters or
    none, item ids of the protocol (1 to 2**53 - 1) or none, times in unix ms, a non-empty member
    id. Anything else in Redis or on the channel is another writer's and must not reach
    browsers (a negative or unsafe id in a presence frame), from a read or an announcement."""
    raw = msgspec.json.encode(list(values))
    reply = [[b"pod-1", b"3", [member_id, raw]]]
    records = parse_read_reply([reply, 0])["pod-1"].records
    try:
        announced = parse_announcement(b'pod-1|3|0|{"' + member_id + b'":' + raw + b"}").changes
    except MalformedAnnouncement:
        announced = {}
    for parsed in (records, announced):
        for key, record in parsed.items():
            assert key and record is not None
            name, viewing, answering, since, at = values
            assert name is None or 1 <= len(name) <= 200
            assert all(
                v is None or (type(v) is int and 0 < v < 2**53) for v in (viewing, answering)
            )
            assert all(type(t) is int and 0 <= t < 2**53 for t in (since, at))


def test_a_write_of_one_change_costs_that_member_not_every_member(monkeypatch) -> None:
    """One member's activity in a project of 1,000 members on this pod: the write and its
    outcome merge that member's record, not every member's (written() checked whether the pod
    still had members by building all their records, 10 times a second under a flood)."""
    import gateway.presence

    core = PresenceCore("p", clock_ms=iter(range(1, 10**6)).__next__)
    for i in range(1000):
        core.join(f"tab{i}", 1, f"u{i}", None)
    for w in core.take_writes():
        core.written(w, True)
    merged = []
    record = gateway.presence._Member.record
    monkeypatch.setattr(
        gateway.presence._Member, "record", lambda self: merged.append(1) or record(self)
    )
    core.activity("tab7", 1, 5, None)
    (write,) = core.take_writes()
    core.written(write, True)
    assert write.changes.keys() == {"u7"} and len(merged) <= 2


def test_a_view_outlives_its_last_subscriber_by_the_linger() -> None:
    """With ``view_linger_ms`` the view stays, kept current (its state moves on at each tick as
    a subscribed one's does), until :meth:`sweep` finds it idle that long; a subscriber who
    comes back in time keeps it."""
    now = [1_000]
    core = PresenceCore("p", clock_ms=lambda: now[0], view_linger_ms=1_000)
    core.load(1, {})
    core.subscribe("tab", 1)
    assert core.unsubscribe("tab", 1) is False and 1 in core.views
    now[0] += 999
    assert core.sweep() == [] and 1 in core.views
    first = core.subscribe("tab", 1)  # back in time: same view, no read
    core.join("other", 1, "bob", None)
    assert [d.joined[0].id for _, d in core.tick()] == ["bob"] and first.members == []
    core.unsubscribe("tab", 1)
    core.join("third", 1, "carol", None)
    assert core.tick() == []  # idle: nobody to send to, and its state moves on all the same
    assert [m.id for m in core.subscribe("tab", 1).members] == ["bob", "carol"]
    core.close_session("tab")
    now[0] += 1_000
    assert core.sweep() == [1] and core.views == {}
    assert core.sweep() == []


def test_a_view_loaded_for_nobody_is_dropped_after_the_linger() -> None:
    """A first read answered after the subscriber that asked for it stopped waiting leaves a
    loaded view nobody subscribed to: it is idle, dropped by :meth:`PresenceCore.sweep` as any
    view whose last subscriber left, unless someone subscribes meanwhile."""
    now = [1_000]
    core = PresenceCore("p", clock_ms=lambda: now[0], view_linger_ms=1_000)
    core.load(1, {})
    core.load(2, {})
    core.load(3, {})  # (a re-read: its first read, a subscriber waits for, still under way)
    core.first_read_done(1)
    core.first_read_done(2)
    core.subscribe("tab", 2)  # came in time
    now[0] += 1_000
    assert core.sweep() == [1] and set(core.views) == {2, 3}


def test_a_view_takes_no_more_members_than_pods_can_have_written() -> None:
    """Announcements no pod can have published (more members at once than the bound, one pod
    over it, all pods together over twice it) are refused or dropped: the view stays bounded
    and the project is re-read (False)."""
    record = PodRecord(name=None, viewing=None, answering=None, since=1, at=1)
    body = b",".join(b'"m%d":[null,null,null,1,1]' % i for i in range(11))
    with pytest.raises(OversizedAnnouncement):
        parse_announcement(b"p|1|0|{" + body + b"}", most=10)
    assert len(parse_announcement(b"p|1|0|{" + body + b"}", most=11).changes) == 11
    longest = "\x1f" * MAX_MEMBER_ID_LENGTH  # 6 bytes each in JSON, as WRITE's cjson puts it
    record_json = b'["' + b"\\u001f" * 200 + b'",' + b"9" * 15 + b",null,1,1]"
    entry = json.dumps(longest).encode() + b":" + record_json
    assert len(parse_announcement(b"p|1|0|{" + entry + b"}", most=1).changes) == 1
    with pytest.raises(OversizedAnnouncement):  # refused by its length, before decoding
        parse_announcement(b"p|1|0|{" + b" " * 10**7 + b"}", most=1)

    view = ProjectView(1, "me", most=10)
    view.load({}, {"me-0": record})
    for i in range(9):  # nine pods of 9 (pods without a view each admit up to the cap): 82
        assert view.apply(Announcement(f"p{i}", 1, 0, {f"p{i}-{j}": record for j in range(9)}))
    assert len(view.current()) == 82 and view.left_out == 0  # every one listed
    assert not view.apply(Announcement("p9", 1, 0, {"p9-0": record}))  # 11 pods: past 10
    assert "p9" not in view.pods and view.left_out == 1
    assert view.apply(Announcement("p0", 2, 1, {"p0-9": record}))  # 10 on one pod: the bound
    assert not view.apply(Announcement("p0", 3, 2, {"p0-10": record}))  # 11: one pod over it
    assert "p0" not in view.pods and len(view.current()) == 73 and view.left_out == 2
    # All together past LISTED_PODS x 10 (160): our own pod's 100 and the others' 72. Pods
    # without a view each admit up to the cap, so that may be real: the members an
    # announcement adds are left out (as a read leaves them out), its changes to members listed
    # are applied, and nothing is re-read (a read would list no more).
    view.replace_pod("me", {f"me-{j}": record for j in range(100)}, 0)
    moved = PodRecord(name=None, viewing=5, answering=None, since=1, at=2)
    assert view.apply(Announcement("p1", 2, 1, {"p1-9": record, "p1-0": moved}))
    assert "p1-9" not in view.current() and view.current()["p1-0"].viewing == 5
    assert len(view.current()) == 172 and view.left_out == 3 and view.versions["p1"] == 2
    assert view.apply(Announcement("p1", 3, 2, {"p1-1": None}))  # and go on: no gap
    assert len(view.current()) == 171


def test_a_view_that_left_members_out_reads_them_once_room_frees() -> None:
    """Past the most members in all (``LISTED_PODS * most``) a view leaves out the members an
    announcement adds; once others leave and there is room, the next refresh report asks for a
    read, which lists them (before, they stayed left out for as long as the view lived, while a
    presence read of the same project listed them: two answers to "who is here")."""
    most = 20
    view = ProjectView(1, "me", most=most)
    view.load({}, {})
    record = PodRecord(None, None, None, 1, 1)
    pods = {f"p{n:02}": {f"p{n:02}-{i}": record for i in range(most)} for n in range(17)}
    for pod, records in pods.items():
        assert view.apply(Announcement(pod, 1, 0, dict(records)))
    assert len(view.current()) == LISTED_PODS * most and view.left_out == most
    live = dict.fromkeys(pods, 1)
    assert view.check_live(live) is False  # still no room: no read (it would list no more)
    assert view.apply(Announcement("p00", 2, 0, {}))  # p00's people leave
    live["p00"] = 2
    del pods["p00"]
    assert view.check_live(live) is True  # room: read the project
    view.load({pod: PodState(1, records) for pod, records in pods.items()}, {})
    assert set(view.current()) == {m for records in pods.values() for m in records}
    assert view.check_live(live) is False


def test_empty_announcements_of_ever_new_pods_keep_a_view_bounded() -> None:
    """Another writer publishing ``<new pod>|1|0|{}`` on a project's presence channel, each
    with a pod id never seen (a pod that has nothing to list): a view keeps no more pods than
    it takes (``most``), counts the rest as left out and re-reads (False), and the real members
    stay listed. (Before, every such pod's version was kept for as long as the view lived:
    memory grew with every message, 100,000 of them 100,000 entries.)"""
    record = PodRecord(name=None, viewing=None, answering=None, since=1, at=1)
    view = ProjectView(1, "me", most=10)
    view.load({}, {"alice": record})
    assert view.apply(Announcement("real", 1, 0, {"bob": record}))
    outcomes = [view.apply(Announcement(f"forged{i}", 1, 0, {})) for i in range(1_000)]
    assert len(view.versions) <= 10 and len(view._misses) <= 10
    assert outcomes.count(False) == view.left_out >= 990
    assert set(view.current()) == {"alice", "bob"}
    assert view.apply(Announcement("real", 2, 1, {"carol": record}))  # no gap: still known
    assert set(view.current()) == {"alice", "bob", "carol"}


def test_a_pod_that_left_is_forgotten_once_refreshes_miss_it_not_before() -> None:
    """A pod whose last member left keeps its version in the view while a read made before
    the leave may still come back (it would list the member again), and is forgotten once
    :data:`ProjectView.MISSES_BEFORE_DROP` refresh reports missed it, as a dead pod is: over
    months of deploys (every pod id is new) a view would otherwise keep every pod that ever
    wrote the project."""
    record = PodRecord(name=None, viewing=None, answering=None, since=1, at=1)
    view = ProjectView(1, "me")
    view.load({}, {})
    assert view.apply(Announcement("old", 1, 0, {"alice": record}))
    assert view.apply(Announcement("old", 2, 1, {"alice": None}))
    assert view.current() == {}
    view.load({"old": PodState(1, {"alice": record})}, {})  # a read from before the leave
    assert view.current() == {}
    for _ in range(ProjectView.MISSES_BEFORE_DROP - 1):
        view.check_live({})
        assert "old" in view.versions
    view.check_live({})
    assert "old" not in view.versions and view._misses == {}


def test_take_writes_of_some_projects_leaves_the_others_pending():
    """A pod on Redis Cluster takes the writes of the masters free to be sent one now; the
    others stay pending, with every member changed since, for when their master is free."""
    core = PresenceCore("pod", lambda: 1_000)
    core.join("s1", 1, "alice", None)
    core.join("s2", 2, "bob", None)
    [first] = core.take_writes(lambda project_id: project_id == 1)
    assert first.project_id == 1 and core.has_pending_writes()
    core.join("s3", 2, "carol", None)
    [later] = core.take_writes()
    assert later.project_id == 2 and later.changes.keys() == {"bob", "carol"}
    assert not core.has_pending_writes()


def test_a_promoted_tab_keeps_when_it_reported_and_hides_no_later_report() -> None:
    """A tab waiting at the cap is listed with the activity it reported while waiting, and
    when it reported it (or, with none, when it came): its promotion is no new report. Carol
    waits here from t=10, viewing 5; her tab on another pod (listed there, its pod without a
    view of the project) reports answering 7 at t=20; a place frees and she is listed here at
    t=30: she is still shown answering 7 (before, the promotion stamped her waiting tab's old
    activity t=30, and she was shown viewing 5, answering nothing, on every pod)."""
    now = [10]
    core = PresenceCore("me", clock_ms=lambda: now[0])
    core.view(1)
    bob = PodRecord(None, None, None, 1, 1)
    core.load(1, {"other": PodState(1, {"bob": bob})})
    core.join("a", 1, "alice", None)
    assert core.is_full(1, "carol", 2)
    core.wait("c", 1, "carol", None, 2)
    core.activity("c", 1, 5, None)
    now[0] = 20
    carol = PodRecord(None, 7, 7, since=20, at=20)
    core.on_announcement(1, Announcement("other", 2, 1, {"carol": carol}))
    now[0] = 30
    core.on_announcement(1, Announcement("other", 3, 2, {"bob": None}))  # a place frees
    assert core.promote() == 1
    assert core.table.records(1)["carol"].at == 10
    shown = core.view(1).current()["carol"]
    assert (shown.viewing, shown.answering) == (7, 7)
    # a tab waiting with no report counts as having reported when it came
    core.wait("d", 1, "dave", None, 2)
    now[0] = 40
    core.leave("a", 1)
    assert core.promote() == 1 and core.table.records(1)["dave"].at == 30


def test_a_tab_arriving_as_a_place_frees_waits_behind_those_waiting() -> None:
    """Waiting tabs take freed places in the order they came: one that comes after a leave
    and before the next tick waits behind them (before, it took the freed place at once, and
    the tabs waiting for it kept waiting: under steady arrivals, for ever)."""
    core = PresenceCore("me", clock_ms=lambda: 1)
    core.view(1)
    core.load(1, {})
    core.join("a", 1, "alice", None)
    core.wait("b", 1, "bob", None, 1)
    core.leave("a", 1)
    assert core.is_full(1, "dave", 1)  # bob came first
    core.wait("d", 1, "dave", None, 1)
    core.wait("b", 1, "bob", None, 1)  # (a re-subscribe keeps his place)
    assert core.promote() == 1 and set(core.table.records(1)) == {"bob"}
    assert core.is_full(1, "dave", 1)
    core.wait("e", 1, "erin", None, 1)
    core.wait("d", 1, "dave", None, 1)  # a refreshed token for dave: his place kept
    assert list(core._waiting[1]) == ["d", "e"]
    core.wait("d", 1, "frank", None, 1)  # one naming someone else: at the back, as them
    assert list(core._waiting[1]) == ["e", "d"]


def test_the_refresh_checks_content_at_every_nth_refresh_of_a_project_and_numbers_always():
    """Redis hashes every record of a pod's hash to compare its digest: checked at every
    refresh (3 s), a million records took Redis ~60 % of its time. The digest goes with one
    refresh of a project in ``digest_every`` (the projects on different rounds); the count with
    every one."""
    core = PresenceCore("p", clock_ms=iter(range(1, 10**6)).__next__)
    for project_id in range(1, 11):
        core.join(f"tab{project_id}", project_id, "alice", None)
    for w in core.take_writes():
        core.written(w, True)
    rounds = [core.refresh_counts(core.refresh_plan(), digest_every=10) for _ in range(20)]
    for project_id in range(1, 11):
        counts = [r[project_id] for r in rounds]
        assert all(count == 1 for count, _ in counts)
        checked = [i for i, (_, digest) in enumerate(counts) if digest != ""]
        assert len(checked) == 2 and checked[1] - checked[0] == 10
        assert counts[checked[0]][1] == records_digest(core.table.records(project_id))
    firsts = {next(i for i, r in enumerate(rounds) if r[p][1] != "") for p in range(1, 11)}
    assert firsts == set(range(10))  # one project's check per round, not all at once
    assert all(d != "" for _, d in core.refresh_counts(core.refresh_plan()).values())


def test_the_refresh_digest_after_one_change_costs_that_member_not_every_member(
    monkeypatch,
) -> None:
    """One member's activity in a project of 1,000 members on this pod: the refresh's digest
    of the pod's records there is updated by that member's record alone (before, every
    change meant a digest of all 1,000 records at the next refresh: O(members) a refresh
    interval, of every project with an activity in it), and it stays the digest of them
    all, through joins, leaves, moves and the last member leaving."""
    import gateway.presence

    core = PresenceCore("p", clock_ms=iter(range(1, 10**6)).__next__)
    for i in range(1000):
        core.join(f"tab{i}", 1, f"u{i}", None)

    def counts() -> tuple[int, int]:
        for w in core.take_writes():
            core.written(w, True)
        plan = core.refresh_plan()
        return core.refresh_counts(plan).get(1, (0, records_digest({})))

    assert counts() == (1000, records_digest(core.table.records(1)))
    merged = []
    record = gateway.presence._Member.record
    monkeypatch.setattr(
        gateway.presence._Member, "record", lambda self: merged.append(1) or record(self)
    )
    core.activity("tab7", 1, 5, None)
    assert counts()[1] == records_digest(core.table.records(1))
    core.activity("tab8", 1, 5, None)
    for w in core.take_writes():
        core.written(w, True)
    merged.clear()
    core.refresh_counts(core.refresh_plan())
    assert len(merged) <= 2
    core.join("tab9", 1, "u7", "Moved")  # a move: two members change
    core.leave("tab10", 1)
    core.join("new", 1, "u-new", None)
    assert counts() == (999, records_digest(core.table.records(1)))
    for i in range(1000):
        core.leave(f"tab{i}", 1)
    core.leave("new", 1)
    assert counts() == (0, records_digest({}))
    assert not core._digests


def test_a_waiting_tab_of_a_person_listed_meanwhile_is_listed_whatever_its_place() -> None:
    """A tab waits at the cap behind another person; meanwhile its person is listed, by
    another pod or here (a tab of theirs moved by a refreshed token into a place it freed):
    it is listed at once or at the next tick, whatever its place in the queue, with what it
    reported (before, it waited behind the other person, for a place it did not need, its
    activity shown nowhere)."""
    core = PresenceCore("me", clock_ms=iter(range(1, 10**6)).__next__)
    core.view(1)
    core.load(1, {})
    core.join("a", 1, "alice", None)
    core.wait("b", 1, "bob", None, 1)
    core.wait("c", 1, "carol", None, 1)
    core.activity("c", 1, 5, None)
    core.join("a", 1, "carol", None)  # alice's tab moves to carol (its place)
    assert core.table.tab_count(1, "carol") == 2 and core.table.records(1)["carol"].viewing == 5
    core.wait("d", 1, "dave", None, 1)
    core.activity("d", 1, 6, None)
    record = PodRecord(None, None, None, since=1, at=1)
    core.on_announcement(1, Announcement("other", 1, 0, {"dave": record}))  # listed there
    assert core.promote() == 1 and core.table.records(1)["dave"].viewing == 6
    assert list(core._waiting[1]) == ["b"]
