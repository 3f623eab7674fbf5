"""The pure parser of values read from Redis (schemas.stored): no crash on arbitrary input, a
round trip of every value the publish script writes, and the foreign values it must refuse."""

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
# What the publisher encodes: any JSON object (here: one string field of any text), then the
# publish script splices the sequence number in.
payloads = st.text(max_size=50).map(lambda text: '{"type":"x","text":' + _json_string(text))


def _json_string(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False)


def our_frame(payload: str, seq: int) -> bytes:
    return f'{payload},"seq":{seq}}}'.encode()


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_parsers(data: bytes) -> None:
    for parse in (
        lambda: parse_channel_message(data),
        lambda: parse_stream_entry(data, [b"f", data]),
        lambda: parse_stream_entry(b"1-0", [data, data]),
        lambda: parse_meta(data, data),
        lambda: check_frame(data, ForeignKind.STREAM_ENTRY),
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
    good, bad = parse_stream_entries([raw, raw[:2], (raw,)])
    assert len(good) + len(bad) == 3


@FUZZ
@given(epochs, seqs, st.integers(min_value=0, max_value=10**15), payloads)
def test_channel_messages_of_the_publish_script_round_trip(epoch, seq, ms, payload) -> None:
    frame = our_frame(payload, seq)
    envelope = parse_channel_message(b"%s|%d|%d|%s" % (epoch.encode(), seq, ms, frame))
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
    assert parse_stream_entry(b"%d-0" % seq, fields) == (seq, frame)


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
        (b"5-0", [b"t", b"f"], "no field 'f'"),  # a value that reads "f" is not the field
        (b"5-0", [b"f", b"\xff{}"], "JSON object"),
        (b"5-0", [b"f", b"{\xff}"], "UTF-8"),
        (b"5-0", [b"f", b"[1]"], "JSON object"),
        (b"5-0", [b"f", b"{\xed\xa0\x80}"], "UTF-8"),  # a lone surrogate is not UTF-8
        (b"5-1", [b"f", b"{}"], "<seq>-0"),
        (b"1764000000000-0" + b"0", [b"f", b"{}"], "<seq>-0"),
        (b"0-0", [b"f", b"{}"], "<seq>-0"),
    ],
)
def test_foreign_stream_entries(entry_id, fields, problem) -> None:
    with pytest.raises(ForeignValue, match=problem) as info:
        parse_stream_entry(entry_id, fields)
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
    ],
)
def test_foreign_channel_messages(data) -> None:
    with pytest.raises(ForeignValue) as info:
        parse_channel_message(data)
    assert info.value.kind is ForeignKind.CHANNEL_MESSAGE


def test_entries_are_parsed_in_order_with_the_foreign_ones_apart() -> None:
    good, bad = parse_stream_entries(
        [
            [b"1-0", [b"f", b'{"seq":1}']],
            [b"2-0", [b"x", b"y"]],
            [b"2-1", [b"f", b"{}"]],
            [b"3-0", [b"f", b'{"seq":3}']],
        ]
    )
    assert good == [(1, b'{"seq":1}'), (3, b'{"seq":3}')]
    assert [(seq, exc.problem) for seq, exc in bad] == [
        (2, "entry has no field 'f'"),
        (None, "entry id is not '<seq>-0'"),
    ]


def test_a_frame_longer_than_any_event_is_foreign_and_every_event_fits() -> None:
    """A frame over MAX_FRAME_BYTES (a hand-written one: 5 MiB went through, over the Python
    consumer's 4 MiB limit) is foreign; the longest frame any event of the contract can make,
    every string at its longest and each character escaped to six bytes, stays far below it."""
    import msgspec.inspect as mi

    from schemas.events import event_types

    edge = b"{" + b" " * (MAX_FRAME_BYTES - 2) + b"}"
    assert check_frame(edge, ForeignKind.STREAM_ENTRY) == edge
    with pytest.raises(ForeignValue, match="longer than"):
        check_frame(b"{ " + edge[1:], ForeignKind.STREAM_ENTRY)

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
