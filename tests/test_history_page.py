"""A page of a project's history (schemas.history), pure, and read by a backend through
``Publisher.history`` / ``AsyncPublisher.history`` against real Redis: the same query, read and
answer as the gateway's polling fallback."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from publisher import AsyncPublisher, Publisher
from publisher.core import PublishError, PublisherUnavailable
from schemas.history import (
    DEFAULT_POLL_LIMIT,
    MAX_POLL_LIMIT,
    PollQuery,
    SnapshotUnreadable,
    check_page,
    parse_poll_query,
    parse_snapshot_reply,
)
from schemas.keys import Keys
from schemas.protocol import MAX_SEQ, ResyncReason
from schemas.stored import CheckedFrames
from schemas.tags import event_tag
from tests.support.redis_server import RedisServer, hung

# --- the query -------------------------------------------------------------------------------


def test_a_query_gives_the_cursor_and_page_size_or_a_message_naming_the_parameter() -> None:
    assert parse_poll_query("") == PollQuery(None, None, None, DEFAULT_POLL_LIMIT)
    tag = "0123456789abcdef"
    assert parse_poll_query(f"epoch=e1&after=7&tag={tag}&limit=5") == PollQuery("e1", 7, tag, 5)
    assert parse_poll_query("epoch=&after=&limit=") == PollQuery(None, None, None, 100)
    # Leading zeros (a cursor padded to a width) are the number's, however many.
    padded = f"epoch=e1&after={'0' * 5000}7&limit=0005"
    assert parse_poll_query(padded) == PollQuery("e1", 7, None, 5)
    assert parse_poll_query("epoch=e1&after=0000") == PollQuery("e1", 0, None, DEFAULT_POLL_LIMIT)
    for query, message in [
        ("epoch=e1", "give both epoch and after"),
        ("after=1", "give both epoch and after"),
        ("epoch=e1&after=-1", "after must be an integer from 0 to"),
        ("epoch=e1&after=1.0", "after must be"),
        (f"epoch=e1&after={MAX_SEQ + 1}", "after must be"),
        ("epoch=e1&after=%D9%A1", "after must be"),  # an Arabic-Indic 1, which int() takes
        ("limit=0", f"limit must be an integer from 1 to {MAX_POLL_LIMIT}"),
        (f"limit={MAX_POLL_LIMIT + 1}", "limit must be"),
        ("limit=" + "9" * 5000, "limit must be"),
        ("epoch=e%201&after=1", "epoch is malformed"),
        ("epoch=e1&after=1&tag=XYZ", "tag: 16 hex digits"),
        (f"tag={tag}", "tag: 16 hex digits"),
        ("limit=5&limit=5", "limit given more than once"),
        ("cursor=1", "unknown query parameters: cursor"),
        ("=1", 'unknown query parameters: ""$'),
        ("limit=0000", "limit must be"),
        ("&".join(f"x{i}=1" for i in range(11)), "Max number of fields"),  # more than any query has
    ]:
        with pytest.raises(ValueError, match=message):
            parse_poll_query(query)


@pytest.mark.parametrize("query", ["limit=&limit=5", "epoch=e1&after=&after=3", "tag=&tag=x"])
def test_a_parameter_given_twice_is_refused_even_when_the_first_is_blank(query: str) -> None:
    """``limit=&limit=5`` was read as no limit (the first value, blank, was taken for the
    parameter's absence and the second ignored): which one counts is a guess, refused."""
    with pytest.raises(ValueError, match="given more than once"):
        parse_poll_query(query)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["epoch", "after", "tag", "limit", "x", "", "after[]", "LIMIT"]),
            st.one_of(
                st.text(max_size=20),
                st.integers(-(2**60), 2**60).map(str),
                st.just("0123456789abcdef"),
            ),
        ),
        max_size=6,
    ).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))
    | st.text(max_size=60)
)
def test_any_query_is_a_valid_page_or_a_value_error(query: str) -> None:
    try:
        page = parse_poll_query(query)
    except ValueError as exc:
        assert str(exc)
    else:
        check_page(*page)  # what is parsed is valid by the same rules as the Python API's


def test_check_page_refuses_what_is_not_a_cursor() -> None:
    check_page("e1", 0, None, 1)
    for args in [
        ("e1", True, None, 1),
        ("e1", 1, None, 1.5),
        (None, None, None, 0),
        (1, 1, None, 1),
    ]:
        with pytest.raises(ValueError):
            check_page(*args)


# --- the read's reply ------------------------------------------------------------------------


def test_a_snapshot_reply_of_damaged_keys_or_another_shape_is_unreadable() -> None:
    for problem, which in [(b"meta_wrong_type", "meta"), (b"stream_wrong_type", "stream")]:
        with pytest.raises(SnapshotUnreadable) as error:
            parse_snapshot_reply(1, [b"", 0, 0, [], problem])
        assert error.value.which == which
    for reply in [None, [b"e", 1], [b"e", 1, 0, "x", b""], [None, 1, 0, [], b""]]:
        with pytest.raises(SnapshotUnreadable) as error:
            parse_snapshot_reply(1, reply)
        assert error.value.which is None


def test_a_snapshot_reply_skips_foreign_entries_and_says_where_the_first_was() -> None:
    frame = b'{"type":"blocker_expired","project_id":1,"blocker_id":1,"task_id":2,"seq":2}'
    reply = [b"e1", 9, 0, [[b"1-0", [b"f", b"junk"]], [b"2-0", [b"f", frame]]], b"", b"", b""]
    snapshot, foreign = parse_snapshot_reply(1, reply)
    assert snapshot.corrupt_at == 1 and snapshot.entries == []
    assert [seq for seq, _ in foreign] == [1]


def _ours(seq: int, project_id: int = 1) -> bytes:
    return b'{"type":"blocker_expired","project_id":%d,"blocker_id":1,"task_id":2,"seq":%d}' % (
        project_id,
        seq,
    )


def _reply(epoch: bytes, top: int, frames: dict[int, bytes]) -> list:
    entries = [[b"%d-0" % seq, [b"f", frame, b"t", b"0"]] for seq, frame in frames.items()]
    return [epoch, top, 0, entries, b"", b"", b""]


def test_entries_the_reader_already_checked_at_their_seq_are_not_checked_again(
    frame_checks,
) -> None:
    """A resume read from Redis reads back what the pod's window holds (seqs 6-10 here): those
    entries, the same bytes at the same seq of the same history, skip the frame check; the ones
    below the window are checked, and the snapshot is the same either way."""
    window = {seq: _ours(seq) for seq in range(6, 11)}
    reply = _reply(b"e1", 10, {seq: _ours(seq) for seq in range(3, 11)})
    snapshot, foreign = parse_snapshot_reply(
        1, reply, CheckedFrames("e1", min(window), max(window), window.__getitem__)
    )
    assert frame_checks == [3, 4, 5]
    assert foreign == [] and snapshot.corrupt_at is None
    assert snapshot.entries == [(seq, _ours(seq)) for seq in range(3, 11)]
    frame_checks.clear()
    assert parse_snapshot_reply(1, reply) == (snapshot, [])  # without: all checked, same result
    assert frame_checks == list(range(3, 11))


def test_an_entry_whose_bytes_differ_from_the_checked_frame_at_its_seq_is_checked_in_full(
    frame_checks,
) -> None:
    """A writer replaced the stream after the window took its frames: garbage at a seq the
    window holds (a frame without JSON, with its header, project and seq right) is found as
    it would be without a window, and so is another valid event under that number."""
    window = {seq: _ours(seq) for seq in range(1, 6)}
    garbage = b'{"type":"blocker_expired","project_id":1,"blocker_id":,"seq":3}'
    other = b'{"type":"blocker_expired","project_id":1,"blocker_id":9,"task_id":2,"seq":4}'
    frames = {1: _ours(1), 2: _ours(2), 3: garbage, 4: other, 5: _ours(5)}
    snapshot, foreign = parse_snapshot_reply(
        1,
        _reply(b"e1", 5, frames),
        CheckedFrames("e1", min(window), max(window), window.__getitem__),
    )
    assert frame_checks == [3, 4]
    assert [(seq, exc.problem) for seq, exc in foreign] == [(3, "frame is not valid JSON")]
    assert snapshot.corrupt_at == 3 and snapshot.entries == [(1, _ours(1)), (2, _ours(2))]


def test_frames_checked_in_another_epoch_are_not_used(frame_checks) -> None:
    """The history was made again (another epoch) since the window took its frames: every
    entry is checked, even one of the same bytes at the same seq."""
    window = {seq: _ours(seq) for seq in range(1, 4)}
    reply = _reply(b"e2", 3, {seq: _ours(seq) for seq in range(1, 4)})
    snapshot, _ = parse_snapshot_reply(
        1, reply, CheckedFrames("e1", min(window), max(window), window.__getitem__)
    )
    assert frame_checks == [1, 2, 3] and len(snapshot.entries) == 3


def test_the_checked_frames_never_excuse_a_foreign_id_or_a_missing_field(frame_checks) -> None:
    """Only the frame's check is skipped: an entry numbered otherwise, or without ``f``, is
    foreign whatever the window holds."""
    window = {seq: _ours(seq) for seq in range(1, 4)}
    reply = [
        b"e1",
        3,
        0,
        [[b"1-0", [b"f", _ours(1)]], [b"2-1", [b"f", _ours(2)]], [b"3-0", [b"g", _ours(3)]]],
        b"",
        b"",
        b"",
    ]
    snapshot, foreign = parse_snapshot_reply(
        1, reply, CheckedFrames("e1", min(window), max(window), window.__getitem__)
    )
    assert frame_checks == [] and snapshot.entries == [(1, _ours(1))]
    assert [(seq, exc.problem) for seq, exc in foreign] == [
        (None, "entry id is not '<seq>-0'"),
        (3, "entry has no field 'f'"),
    ]


_GARBAGE = [
    b'{"type":"blocker_expired","project_id":1,"blocker_id":,"seq":%d}',  # no JSON
    b'{"type":"blocker_expired","project_id":2,"blocker_id":1,"task_id":2,"seq":%d}',
    b'{"type":"blocker_expired","project_id":1,"blocker_id":1,"task_id":2,"seq":%d} ',
    b'{"type":"subscribed","project_id":1,"seq":%d}',
]


@settings(max_examples=300, deadline=None)
@given(
    kinds=st.lists(st.integers(-1, len(_GARBAGE) - 1), min_size=0, max_size=12),
    window=st.tuples(st.integers(1, 14), st.integers(0, 14)),
    same_epoch=st.booleans(),
)
def test_a_read_parses_the_same_with_the_frames_the_reader_checked_as_without(
    kinds: list[int], window: tuple[int, int], same_epoch: bool
) -> None:
    """Whatever the stream holds (our frames, garbage at any seq) and wherever the window
    stands, a reply parses to the same snapshot and the same foreign entries with the frames
    the window checked (ours, at its seqs) as with every frame checked."""
    frames = {
        seq: _ours(seq) if kind < 0 else _GARBAGE[kind] % seq for seq, kind in enumerate(kinds, 1)
    }
    reply = _reply(b"e1", len(kinds), frames)
    lo, last = window
    held = {seq: _ours(seq) for seq in range(lo, last + 1)}
    checked = CheckedFrames("e1" if same_epoch else "e0", lo, last, held.__getitem__)
    plain, plain_foreign = parse_snapshot_reply(1, reply)
    known, known_foreign = parse_snapshot_reply(1, reply, checked)
    assert known == plain
    assert [(seq, exc.problem) for seq, exc in known_foreign] == [
        (seq, exc.problem) for seq, exc in plain_foreign
    ]


# --- Publisher.history against real Redis ----------------------------------------------------


def test_history_pages_through_a_project_in_order_with_its_cursor(redis_url) -> None:
    with Publisher.from_url(redis_url) as pub:
        start = pub.history(3)
        assert (start.seq, start.events, start.resync_required) == (0, [], None)
        for blocker in range(1, 6):
            pub.blocker_expired(3, blocker_id=blocker, task_id=2)
        first = pub.history(3, epoch=start.epoch, after=0, limit=2)
        assert [e["seq"] for e in _events(first)] == [1, 2] and first.more
        assert first.epoch == start.epoch and first.seq == 5
        rest = pub.history(3, epoch=first.epoch, after=2, tag=first.tag, limit=10)
        assert [e["blocker_id"] for e in _events(rest)] == [3, 4, 5] and not rest.more
        assert rest.tag == event_tag(bytes(rest.events[-1]))
        at_top = pub.history(3, epoch=rest.epoch, after=5, tag=rest.tag)
        assert at_top.events == [] and at_top.resync_required is None


def test_history_says_resync_for_another_epoch_a_trimmed_cursor_or_another_event(
    redis_url, redis_client
) -> None:
    with Publisher.from_url(redis_url) as pub:
        cursors = [pub.blocker_expired(4, blocker_id=b, task_id=2) for b in range(1, 6)]
        epoch = cursors[0].epoch
        other = pub.history(4, epoch="another", after=3).resync_required
        assert other.reason is ResyncReason.EPOCH_CHANGED and (other.epoch, other.seq) == (
            epoch,
            5,
        )
        redis_client.xtrim(Keys().stream(4), maxlen=2, approximate=False)  # retention
        trimmed = pub.history(4, epoch=epoch, after=1)
        assert trimmed.resync_required.reason is ResyncReason.HISTORY_TRIMMED
        assert trimmed.events == []
        lost = pub.history(4, epoch=epoch, after=9)
        assert lost.resync_required.reason is ResyncReason.HISTORY_LOST
        renumbered = pub.history(4, epoch=epoch, after=4, tag="0123456789abcdef")
        assert renumbered.resync_required.reason is ResyncReason.HISTORY_LOST


def test_history_of_damaged_keys_is_a_publish_error_and_bad_arguments_a_value_error(
    redis_url, redis_client
) -> None:
    redis_client.set(Keys().meta(6), "not a hash")
    with Publisher.from_url(redis_url) as pub:
        with pytest.raises(PublishError, match="history read failed"):
            pub.history(6)
        for kwargs in [{"epoch": "e"}, {"epoch": "e", "after": -1}, {"limit": 0}, {"max_bytes": 0}]:
            with pytest.raises(ValueError):
                pub.history(1, **kwargs)
        with pytest.raises(ValueError):
            pub.history(0)


def test_async_history_is_the_same_page_and_a_hung_redis_ends_in_time() -> None:
    async def run(url: str, server: RedisServer) -> None:
        pub = AsyncPublisher.from_url(url, timeout=1.0)
        try:
            cursor = await pub.blocker_expired(8, blocker_id=1, task_id=2)
            page = await pub.history(8, epoch=cursor.epoch, after=0)
            assert [e["seq"] for e in _events(page)] == [1]
            with hung(server):
                started = time.monotonic()
                with pytest.raises(PublisherUnavailable):
                    await pub.history(8, epoch=cursor.epoch, after=0)
                assert time.monotonic() - started < 3
        finally:
            await pub.aclose()

    with RedisServer() as server:
        asyncio.run(run(server.url, server))


def _events(page) -> list[dict]:
    return [json.loads(bytes(raw)) for raw in page.events]
