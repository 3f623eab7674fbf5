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


#: Pieces of text values that look like the top-level keys a client places an event by (quoted,
#: escaped, as a key of a nested object would be): such a value must not fool the duplicate-key
#: check of schemas.stored, and a frame holding one is still ours.
_KEY_LIKE_TEXT = (
    *('"type":', '"project_id":', '"seq":', "type", "project_id", "seq"),
    *('"', "\\", "\\u0070", "\x01", ",", ":", "{", "}", " ", "\n"),
)


def _values(info: object) -> st.SearchStrategy:
    """Values of a field type of the contract (msgspec.inspect), within its constraints: any
    text (quotes, backslashes, control characters, any plane; also text made of the keys a
    client places an event by, quoted and escaped), any integer in range."""
    import datetime as dt

    import msgspec.inspect as mi

    if isinstance(info, mi.Metadata):
        return _values(info.type)
    if isinstance(info, mi.IntType):
        low = info.gt + 1 if info.gt is not None else (info.ge if info.ge is not None else -(2**53))
        high = info.lt - 1 if info.lt is not None else (info.le if info.le is not None else 2**53)
        return st.integers(low, high)
    if isinstance(info, mi.StrType):
        low, high = info.min_length or 0, min(info.max_length or 40, 40)
        return st.one_of(
            st.text(min_size=low, max_size=high),
            st.lists(st.sampled_from(_KEY_LIKE_TEXT), max_size=8)
            .map("".join)
            .filter(lambda text: low <= len(text) <= high),
        )
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
        # ... and no other field named like a key a client places it by: the publish script
        # appends "seq", and a frame holding one of them twice at its top level is foreign.
        names = [f.encode_name for f in info.fields[1:]]
        assert not {"type", "project_id", "seq"} & set(names), event_type


@pytest.mark.parametrize("tag", ["authenticated", "subscribed", "resync_required", "error", "pong"])
def test_a_frame_typed_as_a_protocol_message_is_foreign(tag) -> None:
    # A client reads the type first: a stored "event" typed `authenticated` would act on the
    # connection (the browser client's token refresh), not be delivered as an event.
    frame = b'{"type":"%s","project_id":7,"expires_at":1,"seq":5}' % tag.encode()
    with pytest.raises(ForeignValue) as info:
        check_frame(frame, ForeignKind.STREAM_ENTRY, PROJECT, 5)
    assert "protocol message" in info.value.problem


def assert_foreign_everywhere(frame: bytes, problem: str) -> None:
    """``frame`` (of seq 5 of ``PROJECT``) is refused with ``problem`` as a stream entry's and as a
    channel message's."""
    with pytest.raises(ForeignValue) as info:
        parse_stream_entry(b"5-0", [b"f", frame], PROJECT)
    assert (info.value.kind, info.value.problem) == (ForeignKind.STREAM_ENTRY, problem)
    with pytest.raises(ForeignValue) as info:
        parse_channel_message(b"e1|5|0|" + frame, PROJECT)
    assert (info.value.kind, info.value.problem) == (ForeignKind.CHANNEL_MESSAGE, problem)


@pytest.mark.parametrize("tag", [b"\\u0061uthenticated", b"p\\u006fng", b"\\u0065rror"])
def test_a_frame_typed_as_a_protocol_message_with_escapes_is_foreign(tag) -> None:
    # As bytes no protocol message's header, yet every client decodes the type to one.
    frame = b'{"type":"%s","project_id":7,"expires_at":1,"seq":5}' % tag
    problem = "frame's type is a protocol message's, not an event's"
    assert_foreign_everywhere(frame, problem)


def test_no_event_type_is_named_like_a_protocol_message() -> None:
    from typing import get_args

    from schemas.events import event_types
    from schemas.protocol import ClientMessage, ServerMessage

    protocol = {
        m.__struct_config__.tag for m in (*get_args(ClientMessage), *get_args(ServerMessage))
    }
    assert not protocol & {t.__struct_config__.tag for t in event_types()}


# --- a frame holds each of the keys a client places an event by once, at its top level -------

#: The problem of a frame whose top level holds ``key`` twice.
DUPLICATE = "frame has a duplicate top-level key {!r}"


@pytest.mark.parametrize(
    ("frame", "key"),
    [
        # JSON.parse (and msgspec, and most decoders) keep the last: project 2's event to a
        # client following both projects, though the frame starts by naming project 7.
        (b'{"type":"x","project_id":7,"project_id":2,"seq":5}', "project_id"),
        (b'{"type":"x","project_id":7,"a":{"b":1},"project_id":2,"seq":5}', "project_id"),
        (b'{"type":"x","project_id":7,"project_id":7,"seq":5}', "project_id"),  # even the same
        # A protocol message to the client, or an event of another type.
        (b'{"type":"x","project_id":7,"type":"authenticated","expires_at":1,"seq":5}', "type"),
        (b'{"type":"x","project_id":7,"type":"blocker_expired","seq":5}', "type"),
        # Harmless (the last is the one checked), but not a frame the publish script writes.
        (b'{"type":"x","project_id":7,"seq":4,"seq":5}', "seq"),
        # However the key is spelled: whitespace around it, escapes that decode to it.
        (b'{"type":"x","project_id":7,"a":1, "project_id" :\n2,"seq":5}', "project_id"),
        (b'{"type":"x","project_id":7,"proj\\u0065ct_id":2,"seq":5}', "project_id"),
        (b'{"type":"x","project_id":7,"\\u0074\\u0079\\u0070\\u0065":"pong","seq":5}', "type"),
        (b'{"type":"x","project_id":7,"s\\u0065q":9,"seq":5}', "seq"),
        # A decoy in a string value first does not hide the real key after it.
        (b'{"type":"x","project_id":7,"t":",\\"seq\\":","project_id":2,"seq":5}', "project_id"),
    ],
)
def test_a_frame_holding_a_placing_key_twice_at_its_top_level_is_foreign(frame, key) -> None:
    problem = DUPLICATE.format(key)
    assert_foreign_everywhere(frame, problem)


@pytest.mark.parametrize(
    "frame",
    [
        # The same keys inside an object value: not the top level.
        b'{"type":"x","project_id":7,"x":{"project_id":2,"type":"authenticated","seq":9},"seq":5}',
        b'{"type":"x","project_id":7,"x":{"y":{"project_id":2}},"l":[{"seq":1},{"seq":2}],"seq":5}',
        b'{"type":"x","project_id":7,"x":{"proj\\u0065ct_id":2},"seq":5}',
        # ... inside string values (escaped quotes), or as string values.
        b'{"type":"x","project_id":7,"t":"\\"project_id\\":2,\\"type\\":\\"pong\\"","seq":5}',
        b'{"type":"x","project_id":7,"t":"type","u":"seq","v":"project_id","seq":5}',
        b'{"type":"x","project_id":7,"t":"say \\"type","u":"\\\\u0070roject_id\\u0001","seq":5}',
        # ... or as a part of another key.
        b'{"type":"x","project_id":7,"seq_no":1,"types":2,"my_project_id":3,"seq":5}',
    ],
)
def test_the_placing_keys_elsewhere_than_at_the_top_level_are_ours(frame) -> None:
    assert check_frame(frame, ForeignKind.STREAM_ENTRY, PROJECT, 5) == frame
    assert parse_stream_entry(b"5-0", [b"f", frame], PROJECT) == (5, frame)
    assert parse_channel_message(b"e1|5|0|" + frame, PROJECT).frame == frame


def test_a_frame_the_exact_check_reads_must_be_json() -> None:
    """Where a placing key's name appears as a key outside the header and tail, the frame is
    decoded to find its top-level keys; one that is no JSON there is foreign (no client can read
    it)."""
    frame = b'{"type":"x","project_id":7,"x":{"a":1,"type":2},,"seq":5}'
    with pytest.raises(ForeignValue) as info:
        check_frame(frame, ForeignKind.STREAM_ENTRY, PROJECT, 5)
    assert info.value.problem == "frame is not valid JSON"


@pytest.mark.parametrize(
    "middle",
    [
        b'"blocker_id":,',  # a value left out
        b'"a":1,,',
        b'"a":[1,',  # an array never closed
        b'"a":tru,',
        b'"a":"\x01",',  # a raw control character inside a string
        b'"a":NaN,',
        b'"a":1 "b":2,',  # a comma left out
        b"'a':1,",
    ],
)
def test_a_frame_whose_middle_is_not_json_is_foreign(middle: bytes) -> None:
    """A frame whose header, project, seq and encoding are right but whose middle is no JSON
    (another writer's) is foreign: relayed, every client's parser refused it (eventbus.js
    repaired the gap twice, then resynced past it), while a poll took it for corrupt."""
    frame = b'{"type":"x","project_id":7,' + middle + b'"seq":5}'
    with pytest.raises(ForeignValue) as info:
        check_frame(frame, ForeignKind.STREAM_ENTRY, PROJECT, 5)
    assert info.value.problem == "frame is not valid JSON"
    with pytest.raises(ForeignValue):
        parse_channel_message(b"e1|5|0|" + frame, PROJECT)


_JSONISH = st.lists(
    st.sampled_from(
        [
            *(b'"a"', b'"seq"', b":", b",", b"1", b"-", b"[", b"]", b"{", b"}", b'"', b" "),
            *(b"\\", b"true", b"tru", b"null", b"NaN", b"\x01", b"\xc3\xa9", b"\\u0041"),
        ]
    ),
    max_size=12,
).map(b"".join)


@FUZZ
@given(st.one_of(_JSONISH, _JSONISH.map(lambda middle: middle + b","), st.binary(max_size=40)))
def test_a_frame_that_passes_is_json_a_client_can_read(middle: bytes) -> None:
    """Whatever is between the header and the tail, a frame that passes the check is a JSON
    object that the standard library's strict decoder reads, with the project and the seq the
    check was given (what every client's parser relies on)."""
    import json

    frame = b'{"type":"x","project_id":7,' + middle + b'"seq":5}'
    try:
        checked = check_frame(frame, ForeignKind.STREAM_ENTRY, PROJECT, 5)
    except ForeignValue:
        return
    value = json.loads(checked, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert (value["project_id"], value["seq"]) == (7, 5)


def _top_level_ends(frame: str) -> list[int]:
    """Where each top-level member of the JSON object ``frame`` ends (the index of the ``,`` or
    ``}`` after its value), by the standard library's decoder."""
    import json

    decoder, ends, at = json.JSONDecoder(), [], 1
    while frame[at] != "}":
        _, at = decoder.raw_decode(frame, at)  # the key
        assert frame[at] == ":"
        _, at = decoder.raw_decode(frame, at + 1)  # its value
        ends.append(at)
        at += frame[at] == ","
    return ends


@st.composite
def _spellings(draw, key: str) -> str:
    """``key`` as a JSON key: some characters as ``\\u`` escapes, whitespace around the colon."""
    escaped = draw(st.lists(st.booleans(), min_size=len(key), max_size=len(key)))
    name = "".join(f"\\u{ord(c):04x}" if e else c for c, e in zip(key, escaped, strict=True))
    space = st.sampled_from(["", " ", "\n", "\t", "\r\n "])
    return f'{draw(space)}"{name}"{draw(space)}:{draw(space)}'


@FUZZ
@given(_events(), seqs, st.data())
def test_a_placing_key_inserted_anywhere_at_the_top_level_is_refused(event, seq, data) -> None:
    """Any event's frame with ``type``, ``project_id`` or ``seq`` inserted once more at its top
    level (any value, the frame's own included; the key spelled any way JSON allows) is foreign:
    between its members with the problem of a duplicate, first or last with that of the header
    or tail it breaks."""
    import json

    from schemas.events import encode_event

    frame = (encode_event(event)[:-1] + b',"seq":%d}' % seq).decode()
    ends = _top_level_ends(frame)  # type, project_id, the event's fields, seq
    key = data.draw(st.sampled_from(["type", "project_id", "seq"]))
    value = data.draw(
        st.one_of(
            st.just(json.dumps({"type": event.__struct_config__.tag, "seq": seq}[key]))
            if key != "project_id"
            else st.just(str(event.project_id)),
            st.integers(1, 2**53).map(str),
            st.text(max_size=10).map(json.dumps),
            st.just('{"project_id":1}'),
        )
    )
    member = data.draw(_spellings(key)) + value
    at = data.draw(st.sampled_from([0, *ends]))  # after the "{", or after a member
    if at == 0:
        forged = "{" + member + "," + frame[1:]
    else:
        forged = frame[:at] + "," + member + frame[at:]
    json.loads(forged)  # still JSON, which a client reads with the inserted key last
    for parse in (
        lambda: parse_stream_entry(b"%d-0" % seq, {b"f": forged.encode()}, event.project_id),
        lambda: parse_channel_message(b"e1|%d|0|%s" % (seq, forged.encode()), event.project_id),
    ):
        with pytest.raises(ForeignValue) as info:
            parse()
        if ends[0] < at < ends[-1]:  # between project_id and seq: the header and tail hold
            assert info.value.problem == DUPLICATE.format(key)
