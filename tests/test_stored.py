"""The pure parser of values read from Redis (schemas.stored): no crash on arbitrary input, a
round trip of every value the publish script writes (every event type, any project and seq), and
the foreign values it must refuse (among them a frame of another project or seq)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.stored import (
    MAX_FRAME_BYTES,
    ForeignKind,
    ForeignValue,
    Meta,
    check_frame,
    parse_channel_message,
    parse_meta,
    parse_stream_entries,
    parse_stream_entry,
)

FUZZ = settings(max_examples=300, deadline=None)

epochs = st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=64
)
seqs = st.integers(min_value=1, max_value=10**15 - 1)
project_ids = st.integers(min_value=1, max_value=2**53 - 1)
PROJECT = 7
# What the publisher encodes: a JSON object with the tag, then the project, then any fields
# (here: one string field of any text); the publish script splices the sequence number in.
payloads = st.text(max_size=50).map(
    lambda text: f'{{"type":"x","project_id":{PROJECT},"text":{_json_string(text)}}}'
)


def _json_string(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False)


def our_frame(payload: str, seq: int) -> bytes:
    """What the publish script stores for ``payload`` at ``seq`` (schemas.lua.PUBLISH)."""
    return f'{payload[:-1]},"seq":{seq}}}'.encode()


#: A frame of project 7 and one of project 2, at the seq given with ``%``.
OURS = b'{"type":"blocker_expired","project_id":7,"blocker_id":1,"seq":%d}'
OTHER_PROJECT = b'{"type":"blocker_expired","project_id":2,"blocker_id":1,"seq":%d}'


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_parsers(data: bytes) -> None:
    for parse in (
        lambda: parse_channel_message(data, 1),
        lambda: parse_stream_entry(data, [b"f", data], 1),
        lambda: parse_stream_entry(b"1-0", [data, data], 1),
        lambda: parse_meta(data, data),
        lambda: check_frame(data, ForeignKind.STREAM_ENTRY, 1, 1),
    ):
        try:
            parse()
        except ForeignValue:
            pass


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=20),
            st.none(),
            st.integers(),
            st.lists(st.binary(max_size=5), max_size=5),
        ),
        max_size=6,
    )
)
def test_arbitrary_entry_shapes_never_crash(raw: list) -> None:
    good, bad = parse_stream_entries([raw, raw[:2], (raw,)], 1)
    assert len(good) + len(bad) == 3


@FUZZ
@given(epochs, seqs, st.integers(min_value=0, max_value=10**15), payloads)
def test_channel_messages_of_the_publish_script_round_trip(epoch, seq, ms, payload) -> None:
    frame = our_frame(payload, seq)
    envelope = parse_channel_message(b"%s|%d|%d|%s" % (epoch.encode(), seq, ms, frame), PROJECT)
    assert (envelope.epoch, envelope.seq, envelope.published_ms, envelope.frame) == (
        epoch,
        seq,
        ms,
        frame,
    )


@FUZZ
@given(seqs, payloads, st.booleans())
def test_stream_entries_of_the_publish_script_round_trip(seq, payload, as_dict) -> None:
    frame = our_frame(payload, seq)
    fields = {b"f": frame, b"t": b"1"} if as_dict else [b"f", frame, b"t", b"1"]
    assert parse_stream_entry(b"%d-0" % seq, fields, PROJECT) == (seq, frame)


@FUZZ
@given(epochs, st.integers(min_value=0, max_value=10**15 - 1))
def test_meta_of_the_publish_script_round_trips(epoch, seq) -> None:
    assert parse_meta(epoch.encode(), str(seq).encode()) == Meta(epoch, seq)


def test_a_missing_meta_is_no_history() -> None:
    assert parse_meta(None, None) is None
    assert parse_meta(None, b"7") is None  # no epoch: the publish script starts a new history


@pytest.mark.parametrize(
    ("epoch", "seq"),
    [
        (b"e1", b"abc"),
        (b"e1", None),
        (b"e1", b"-1"),
        (b"e1", b"01"),
        (b"e1", b"1" * 16),
        (b"\xff\xfe", b"1"),
        (b"bad epoch", b"1"),
        (b"", b"1"),
        (b"e" * 65, b"1"),
    ],
)
def test_foreign_meta_values(epoch, seq) -> None:
    with pytest.raises(ForeignValue) as info:
        parse_meta(epoch, seq)
    assert info.value.kind is ForeignKind.META


@pytest.mark.parametrize(
    ("entry_id", "fields", "problem"),
    [
        (b"5-0", [b"x", b"y"], "no field 'f'"),
        (b"5-0", [b"f", OTHER_PROJECT % 5], "name project 7"),
        (b"5-0", [b"f", OURS % 6], 'end with ,"seq":5}'),
        (b"5-0", [b"f", b'{"type":"x","seq":5}'], "does not start with"),
        (b"5-0", [b"t", b"f"], "no field 'f'"),  # a value that reads "f" is not the field
        (b"5-0", [b"f", b"\xff{}"], "JSON object"),
        (b"5-0", [b"f", b"{\xff}"], "UTF-8"),
        (b"5-0", [b"f", b"[1]"], "JSON object"),
        (b"5-0", [b"f", b"{\xed\xa0\x80}"], "UTF-8"),  # a lone surrogate is not UTF-8
        (b"5-1", [b"f", b"{}"], "<seq>-0"),
        (b"1764000000000-0" + b"0", [b"f", b"{}"], "<seq>-0"),
        (b"0-0", [b"f", b"{}"], "<seq>-0"),
        # What the history script gives back for an entry too heavy to send (lua.SNAPSHOT).
        (b"5-0", [b"oversize", b"20971525"], "weighs 20971525 bytes, over 1048640"),
    ],
)
def test_foreign_stream_entries(entry_id, fields, problem) -> None:
    with pytest.raises(ForeignValue, match=problem) as info:
        parse_stream_entry(entry_id, fields, PROJECT)
    assert info.value.kind is ForeignKind.STREAM_ENTRY


@pytest.mark.parametrize(
    "data",
    [
        b"e1|5|0|{\xff}",
        b"e1|5|0|{\x80\x80}",
        b"e1|5|0|[1]",
        b"e1|x|0|{}",
        b"e\xff|5|0|{}",
        b"e1\n|5|0|{}",  # '$' would match before a trailing line feed
        b"no pipes at all",
        b"e1|5|0|" + OTHER_PROJECT % 5,  # the frame names another project than the channel's
        b"e1|5|0|" + OURS % 6,  # the frame's seq is not the envelope's
        b"e1|5|0|" + b'{"type":"x","seq":5}',  # no project at all
    ],
)
def test_foreign_channel_messages(data) -> None:
    assert parse_channel_message(b"e1|5|0|" + OURS % 5, PROJECT).frame == OURS % 5
    with pytest.raises(ForeignValue) as info:
        parse_channel_message(data, PROJECT)
    assert info.value.kind is ForeignKind.CHANNEL_MESSAGE


def test_entries_are_parsed_in_order_with_the_foreign_ones_apart() -> None:
    good, bad = parse_stream_entries(
        [
            [b"1-0", [b"f", OURS % 1]],
            [b"2-0", [b"x", b"y"]],
            [b"2-1", [b"f", b"{}"]],
            [b"3-0", [b"f", OURS % 3]],
            [b"4-0", [b"f", OTHER_PROJECT % 4]],
            [b"5-0", [b"f", OURS % 4]],
            [b"6-0", [b"f", OURS % 6]],
        ],
        PROJECT,
    )
    assert good == [(1, OURS % 1), (3, OURS % 3), (6, OURS % 6)]
    assert [(seq, exc.problem) for seq, exc in bad] == [
        (2, "entry has no field 'f'"),
        (None, "entry id is not '<seq>-0'"),
        (4, "frame does not name project 7"),
        (5, 'frame does not end with ,"seq":5}'),
    ]


def test_a_frame_longer_than_any_event_is_foreign_and_every_event_fits() -> None:
    """A frame over MAX_FRAME_BYTES (a hand-written one: 5 MiB went through, over the Python
    consumer's 4 MiB limit) is foreign; the longest frame any event of the contract can make,
    every string at its longest and each character escaped to six bytes, stays far below it."""
    import msgspec.inspect as mi

    from schemas.events import event_types

    start, end = b'{"type":"x","project_id":7,"pad":"', b'","seq":1}'
    edge = start + b" " * (MAX_FRAME_BYTES - len(start) - len(end)) + end
    assert len(edge) == MAX_FRAME_BYTES
    assert check_frame(edge, ForeignKind.STREAM_ENTRY, PROJECT, 1) == edge
    with pytest.raises(ForeignValue, match="longer than"):
        check_frame(start + b" " + edge[len(start) :], ForeignKind.STREAM_ENTRY, PROJECT, 1)

    def longest(info: object) -> int:
        if isinstance(info, mi.Metadata):
            return longest(info.type)
        if isinstance(info, mi.StrType):
            assert info.max_length is not None, "an unbounded string in an event"
            return 6 * info.max_length + 2
        if isinstance(info, mi.StructType):
            return 2 + sum(len(f.encode_name) + 4 + longest(f.type) for f in info.fields)
        if isinstance(info, mi.UnionType):
            return max(longest(t) for t in info.types)
        assert not isinstance(info, mi.ListType | mi.DictType | mi.SetType), "unbounded"
        return 40  # a number, a boolean, null, a timestamp

    for event_type in event_types():
        assert longest(mi.type_info(event_type)) + 40 < MAX_FRAME_BYTES // 16, event_type


# --- a frame names its place: the project whose key it is read from, and its seq -------------


def _values(info: object) -> st.SearchStrategy:
    """Values of a field type of the contract (msgspec.inspect), within its constraints: any
    text (quotes, backslashes, control characters, any plane), any integer in range."""
    import datetime as dt

    import msgspec.inspect as mi

    if isinstance(info, mi.Metadata):
        return _values(info.type)
    if isinstance(info, mi.IntType):
        low = info.gt + 1 if info.gt is not None else (info.ge if info.ge is not None else -(2**53))
        high = info.lt - 1 if info.lt is not None else (info.le if info.le is not None else 2**53)
        return st.integers(low, high)
    if isinstance(info, mi.StrType):
        return st.text(min_size=info.min_length or 0, max_size=min(info.max_length or 40, 40))
    if isinstance(info, mi.LiteralType):
        return st.sampled_from(info.values)
    if isinstance(info, mi.DateTimeType):
        return st.datetimes(timezones=st.just(dt.UTC))
    if isinstance(info, mi.StructType):
        fields = {f.name: _values(f.type) for f in info.fields}
        return st.fixed_dictionaries(fields).map(lambda kw: info.cls(**kw))
    if isinstance(info, mi.UnionType):
        return st.one_of([_values(t) for t in info.types])
    if isinstance(info, mi.NoneType):
        return st.none()
    if isinstance(info, mi.BoolType):
        return st.booleans()
    raise AssertionError(f"no strategy for {info!r}: extend _values")


def _events() -> st.SearchStrategy:
    import msgspec.inspect as mi

    from schemas.events import event_types

    return st.one_of([_values(mi.type_info(t)) for t in event_types()])


@FUZZ
@given(_events(), seqs, epochs)
def test_every_frame_our_publisher_builds_passes_for_its_project_and_seq(event, seq, epoch) -> None:
    """Any event of any type, for any project, encoded as the publisher does (publisher.core:
    the HTTP API, the outbox relay and the CLI all publish through it) and completed by the
    publish script, is a frame of its project and seq, in a stream entry and on the channel."""
    from publisher.core import Retention, plan_batches, prepare_single
    from schemas.keys import Keys

    how = {"keys": Keys(), "retention": Retention(), "publish_command": "PUBLISH"}
    call = prepare_single(event, **how)
    (batch,) = plan_batches([event], **how)
    assert batch.args[8:] == call.args[8:]
    payload = call.args[8]
    assert isinstance(payload, bytes)
    frame = payload[:-1] + b',"seq":%d}' % seq  # schemas.lua.PUBLISH
    project_id = event.project_id
    assert check_frame(frame, ForeignKind.STREAM_ENTRY, project_id, seq) == frame
    assert parse_stream_entry(b"%d-0" % seq, [b"f", frame, b"t", b"1"], project_id) == (seq, frame)
    message = b"%s|%d|0|%s" % (epoch.encode(), seq, frame)
    assert parse_channel_message(message, project_id).frame == frame


@FUZZ
@given(_events(), seqs, project_ids, seqs)
def test_a_frame_naming_another_project_or_seq_is_foreign(event, seq, other, other_seq) -> None:
    """The same frame read from another project's key, or stored under another seq, is foreign:
    relayed, clients would take it as the event of the project and seq it names."""
    from schemas.events import encode_event

    frame = encode_event(event)[:-1] + b',"seq":%d}' % seq
    project_id = event.project_id
    if other != project_id:
        with pytest.raises(ForeignValue, match=f"does not name project {other}") as info:
            parse_stream_entry(b"%d-0" % seq, {b"f": frame}, other)
        assert info.value.kind is ForeignKind.STREAM_ENTRY
        with pytest.raises(ForeignValue, match=f"does not name project {other}") as info:
            parse_channel_message(b"e1|%d|0|%s" % (seq, frame), other)
        assert info.value.kind is ForeignKind.CHANNEL_MESSAGE
    if other_seq != seq:
        with pytest.raises(ForeignValue, match=f',"seq":{other_seq}}}'):
            parse_stream_entry(b"%d-0" % other_seq, {b"f": frame}, project_id)
        with pytest.raises(ForeignValue, match=f',"seq":{other_seq}}}'):
            parse_channel_message(b"e1|%d|0|%s" % (other_seq, frame), project_id)


@pytest.mark.parametrize(
    "frame",
    [
        b'{"type":"x","project_id":70,"seq":5}',  # 70 is not 7
        b'{"type":"x","project_id":07,"seq":5}',
        b'{"type":"x","project_id":7.0,"seq":5}',
        b'{"type":"x","project_id":"7","seq":5}',
        b'{"type":"x","project_id":-7,"seq":5}',
        b'{"type":"x","project_id":7}',  # no seq
        b'{"type":"x","project_id":7,"seq":50}',
        b'{"type":"x","project_id":7,"seq":05}',
        b'{"type":"x","project_id":7,"seq":5 }',
        b'{"type":"x","project_id":7,"seq":"5"}',
        b'{"project_id":7,"type":"x","seq":5}',  # the tag first, as msgspec writes it
        b'{"type":"x","a":1,"project_id":7,"seq":5}',  # then the project
        b'{ "type":"x","project_id":7,"seq":5}',
        b'{"type": "x", "project_id": 7, "seq": 5}',  # json.dumps's separators: not ours
        b'{"type":x,"project_id":7,"seq":5}',
        b'{"type":"a\\"b","project_id":7,"seq":5}',  # no tag of ours has a quote
        b'{"type":"x"}',
    ],
)
def test_frames_that_do_not_name_project_7_at_seq_5(frame) -> None:
    with pytest.raises(ForeignValue) as info:
        check_frame(frame, ForeignKind.STREAM_ENTRY, PROJECT, 5)
    assert info.value.kind is ForeignKind.STREAM_ENTRY


@pytest.mark.parametrize(
    "frame",
    [
        b'{"type":"x","project_id":7,"seq":5}',
        b'{"type":"","project_id":7,"seq":5}',
        b'{"type":"a\\u0022b\\\\","project_id":7,"seq":5}',  # escapes inside the tag
        '{"type":"\u00e9\U0001f600","project_id":7,"x":{"project_id":2},"seq":5}'.encode(),
    ],
)
def test_frames_that_name_project_7_at_seq_5(frame) -> None:
    assert check_frame(frame, ForeignKind.STREAM_ENTRY, PROJECT, 5) == frame


def test_every_event_type_encodes_its_tag_then_its_project_first() -> None:
    """What the check relies on, for every event type (a new one in schemas.events included):
    the tag on "type", a string, then ``project_id``; no rename, no array encoding."""
    import msgspec.inspect as mi

    from schemas.events import event_types

    for event_type in event_types():
        info = mi.type_info(event_type)
        assert isinstance(info, mi.StructType) and not info.array_like, event_type
        assert info.tag_field == "type" and isinstance(info.tag, str), event_type
        assert '"' not in info.tag and "\\" not in info.tag, event_type  # encoded as it is
        assert info.fields[0].encode_name == "project_id", event_type


@pytest.mark.parametrize("tag", ["authenticated", "subscribed", "resync_required", "error", "pong"])
def test_a_frame_typed_as_a_protocol_message_is_foreign(tag) -> None:
    # A client reads the type first: a stored "event" typed `authenticated` would act on the
    # connection (the browser client's token refresh), not be delivered as an event.
    frame = b'{"type":"%s","project_id":7,"expires_at":1,"seq":5}' % tag.encode()
    with pytest.raises(ForeignValue) as info:
        check_frame(frame, ForeignKind.STREAM_ENTRY, PROJECT, 5)
    assert "protocol message" in info.value.problem


def test_no_event_type_is_named_like_a_protocol_message() -> None:
    from typing import get_args

    from schemas.events import event_types
    from schemas.protocol import ClientMessage, ServerMessage

    protocol = {
        m.__struct_config__.tag for m in (*get_args(ClientMessage), *get_args(ServerMessage))
    }
    assert not protocol & {t.__struct_config__.tag for t in event_types()}
