"""Token revocation's shared contract, without sockets: the stored format
(schemas/revocations.py), the reader's snapshot (RevocationList), the key names, the close code,
the ``iat`` claim, and the REVOKE script (schemas.lua) run on fakeredis. The same script on a
real Redis and on Redis Cluster is in tests/test_revocations.py."""

from __future__ import annotations

import time
from typing import Any

import fakeredis
import jwt
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import lua
from schemas.keys import Keys
from schemas.protocol import CloseCode
from schemas.revocations import (
    DEFAULT_MAX_REVOCATIONS,
    FULL_MARK,
    MAX_SUBJECT_BYTES,
    MAX_TIMESTAMP,
    MalformedRevocation,
    Revocation,
    RevocationList,
    decode_entry,
    encode_entry,
    parse_full_error,
    parse_revoke_reply,
)
from schemas.tokens import AUDIENCE, issue_token, verify_token

KEYS = Keys("revtest")
SECRET = "a-test-secret-long-enough-for-hs256-0123456789"
NOW = 1_800_000_000


def entry(issued_before: int, expires_at: int) -> bytes:
    return b'{"issued_before":%d,"expires_at":%d}' % (issued_before, expires_at)


# --- keys, close code, claims -----------------------------------------------------------------


def test_both_keys_share_one_cluster_slot_and_the_prefix() -> None:
    from redis.crc import key_slot

    assert KEYS.revocations() == "revtest:{revocations}:subjects"
    assert KEYS.revocations_version() == "revtest:{revocations}:version"
    assert key_slot(KEYS.revocations().encode()) == key_slot(KEYS.revocations_version().encode())
    # Never taken for a project's channel (the gateway routes channels by that pattern).
    assert KEYS.project_of_channel(KEYS.revocations()) is None


def test_the_revoked_close_code_is_4003() -> None:
    assert CloseCode.TOKEN_REVOKED == 4003
    assert len({int(code) for code in CloseCode}) == len(CloseCode)  # no alias of another code


def test_verified_claims_carry_the_tokens_iat() -> None:
    before = int(time.time())
    claims = verify_token(issue_token(SECRET, [1], subject="user-7"), SECRET)
    assert before <= claims.iat <= int(time.time())  # type: ignore[operator]


def forge(claims: dict[str, Any]) -> str:
    base: dict[str, Any] = {"aud": AUDIENCE, "exp": int(time.time()) + 60, "projects": [1]}
    return jwt.encode({**base, **claims}, SECRET, algorithm="HS256")


@pytest.mark.parametrize("claims", [{}, {"iat": True}, {"iat": "1700000000"}])
def test_an_iat_that_is_missing_or_not_a_number_is_none(claims: dict[str, Any]) -> None:
    """None: a revocation then counts the token as issued at 0 (the safe side)."""
    assert verify_token(forge(claims), SECRET).iat is None


def test_a_fractional_iat_counts_as_its_whole_second() -> None:
    """RFC 7519's NumericDate may have a fraction (``"iat": time.time()``). As None, such a
    token counted as issued at 0: a person whose tokens say so could not get back in after a
    revocation, every new token refused until the entry ended (a day by default). Its whole
    second is exact: issued_before is a whole second, so iat < issued_before exactly when
    floor(iat) < issued_before."""
    now = int(time.time())
    revocations = RevocationList([Revocation("user-7", now - 10, now + 100)])
    before = verify_token(forge({"sub": "user-7", "iat": now - 10.5}), SECRET)
    after = verify_token(forge({"sub": "user-7", "iat": now - 9.5}), SECRET)
    assert (before.iat, after.iat) == (now - 11, now - 10)
    assert revocations.is_revoked(before.sub, before.iat, now)
    assert not revocations.is_revoked(after.sub, after.iat, now)


@pytest.mark.parametrize(("iat", "second"), [(1.5, 1), (1_700_000_000.999, 1_700_000_000)])
def test_a_fractional_iat_is_its_whole_second(iat: float, second: int) -> None:
    """As a revocation's time is rounded up to a whole second, a token issued in the same
    second before it is refused, and one issued after it taken."""
    assert verify_token(forge({"iat": iat}), SECRET).iat == second


# --- the stored format ------------------------------------------------------------------------

times = st.integers(min_value=0, max_value=MAX_TIMESTAMP)
#: Subjects a token can carry (text: no lone surrogate), of up to MAX_SUBJECT_BYTES bytes.
subjects = st.text(st.characters(exclude_categories=["Cs"]), min_size=1).filter(
    lambda s: len(s.encode()) <= MAX_SUBJECT_BYTES
)


@given(subjects, times, times)
def test_encode_then_decode_gives_the_same_revocation(subject: str, a: int, b: int) -> None:
    if a == b:
        return
    revocation = Revocation(subject, min(a, b), max(a, b))
    value = encode_entry(revocation)
    assert value == entry(min(a, b), max(a, b))  # the one form the script parses too
    assert decode_entry(subject.encode(), value) == revocation


@pytest.mark.parametrize(
    ("issued_before", "expires_at"), [(5, 5), (6, 5), (-1, 5), (0, MAX_TIMESTAMP + 1), (1.0, 2)]
)
def test_encode_refuses_what_decode_would(issued_before: Any, expires_at: Any) -> None:
    with pytest.raises(ValueError):
        encode_entry(Revocation("s", issued_before, expires_at))


@pytest.mark.parametrize(
    ("subject", "value"),
    [
        (b"", entry(1, 2)),
        (b"x" * (MAX_SUBJECT_BYTES + 1), entry(1, 2)),
        (b"\xff", entry(1, 2)),
        (b"\xed\xa0\x80", entry(1, 2)),  # a surrogate, which strict UTF-8 refuses
        (b"s", b'{"issued_before": 1, "expires_at": 2}'),  # another writer's spacing
        (b"s", b'{"expires_at":2,"issued_before":1}'),  # another order
        (b"s", b'{"issued_before":01,"expires_at":2}'),
        (b"s", b'{"issued_before":1,"expires_at":2.0}'),
        (b"s", b'{"issued_before":-1,"expires_at":2}'),
        (b"s", entry(2, 2)),
        (b"s", entry(3, 2)),
        (b"s", entry(1, MAX_TIMESTAMP + 1)),
        (b"s", entry(1, 2) + b"\n"),
        (b"s", b""),
        ("s", 7),
        (None, entry(1, 2)),
    ],
)
def test_decode_refuses_anything_but_the_one_form(subject: Any, value: Any) -> None:
    with pytest.raises(MalformedRevocation):
        decode_entry(subject, value)


def test_decode_takes_the_largest_subject_and_text_from_a_decoding_client() -> None:
    assert decode_entry(b"x" * MAX_SUBJECT_BYTES, entry(1, 2)).subject == "x" * MAX_SUBJECT_BYTES
    assert decode_entry("é", entry(1, 2).decode()) == Revocation("é", 1, 2)


@given(st.binary(max_size=80), st.binary(max_size=80))
def test_decode_entry_raises_only_malformed_on_arbitrary_bytes(subject: bytes, value: bytes):
    try:
        revocation = decode_entry(subject, value)
    except MalformedRevocation:
        return
    assert encode_entry(revocation) == value  # whatever it takes, it is the one form


@given(
    st.binary(max_size=20),
    st.from_regex(rb'\A\{"issued_before":\d{1,17},"expires_at":\d{1,17}\}\Z'),
)
def test_decode_entry_near_the_form_raises_only_malformed(subject: bytes, value: bytes):
    try:
        revocation = decode_entry(subject, value)
    except MalformedRevocation:
        return
    assert encode_entry(revocation) == value


# --- the reader's snapshot --------------------------------------------------------------------

anything = st.one_of(
    st.binary(max_size=60),
    st.text(max_size=20),
    st.integers(),
    st.none(),
    st.builds(lambda a, b: entry(a, b), times, times),
)


@given(st.dictionaries(anything, anything, max_size=10), st.floats(allow_nan=False))
def test_from_hash_never_raises_on_arbitrary_dicts(items: dict, now: float) -> None:
    revocations, malformed = RevocationList.from_hash(items, now)
    assert 0 <= malformed <= len(items)
    assert len(revocations) + malformed <= len(items)
    for revocation in revocations:
        assert now < revocation.expires_at


def test_from_hash_leaves_out_expired_and_malformed_entries_and_counts_the_malformed() -> None:
    revocations, malformed = RevocationList.from_hash(
        {
            b"live": entry(NOW - 10, NOW + 10),
            b"expired": entry(NOW - 10, NOW),  # now >= expires_at
            b"bad": b"{}",
            b"\xff": entry(1, NOW + 10),
        },
        NOW,
    )
    assert malformed == 2
    assert list(revocations) == [Revocation("live", NOW - 10, NOW + 10)]
    assert revocations.get("expired") is None
    empty, malformed = RevocationList.from_hash({}, NOW)
    assert len(empty) == 0 and malformed == 0
    assert len(RevocationList.EMPTY) == 0


def test_is_revoked_semantics() -> None:
    revocations = RevocationList([Revocation("user-7", NOW, NOW + 100)])
    assert revocations.is_revoked("user-7", NOW - 1, NOW)  # issued before: refused
    assert not revocations.is_revoked("user-7", NOW, NOW)  # issued at issued_before: valid
    assert not revocations.is_revoked("user-7", NOW + 5, NOW)  # a new token: valid
    assert revocations.is_revoked("user-7", None, NOW)  # no iat: counts as issued at 0
    assert not revocations.is_revoked("user-8", 0, NOW)  # another subject
    assert not revocations.is_revoked(None, 0, NOW)  # no subject: cannot be revoked
    assert revocations.is_revoked("user-7", 0, NOW + 99.5)  # still before expires_at
    assert not revocations.is_revoked("user-7", 0, NOW + 100)  # expired: forgotten
    assert not RevocationList.EMPTY.is_revoked("user-7", None, NOW)


def test_the_revoke_reply_is_checked_at_the_boundary() -> None:
    reply = parse_revoke_reply("s", [1, 2, 3])
    assert reply.revocation == Revocation("s", 1, 2) and reply.version == 3
    for bad in [None, [1, 2], [b"1", 2, 3], [2, 2, 3], [1, 2, 0], [1, 2, True], "OK"]:
        with pytest.raises(ValueError):
            parse_revoke_reply("s", bad)


def test_parse_full_error_reads_the_scripts_refusal_and_nothing_else() -> None:
    assert parse_full_error(f"{FULL_MARK}100000 100000") == (100000, 100000)
    # Redis 7 appends where the error came from.
    text = f"{FULL_MARK}7 5 script: 0123abcd, on @user_script:1."
    assert parse_full_error(text) == (7, 5)
    for other in [
        "EVENTBUS_CORRUPT eventbus:{revocations}:subjects is not a hash",
        "ERR keep_for must be a positive whole number of seconds",
        f"{FULL_MARK}x 5",
        f"{FULL_MARK}75",
        f"{FULL_MARK}7 5x",
        f"x{FULL_MARK}7 5",
        "",
    ]:
        assert parse_full_error(other) is None, other


def test_the_scripts_default_cap_is_the_documented_one() -> None:
    assert f"local DEFAULT_MAX_ENTRIES = {DEFAULT_MAX_REVOCATIONS}\n" in lua.REVOKE
    assert FULL_MARK == "EVENTBUS_REVOCATIONS_FULL "
    assert f"'{FULL_MARK}'" in lua.REVOKE


# --- the REVOKE script (fakeredis) ------------------------------------------------------------


@pytest.fixture
def client() -> Any:
    client = fakeredis.FakeRedis()
    yield client
    client.close()


def revoke(
    client: Any,
    subject: str | bytes,
    issued_before: int | str = "",
    keep_for: int | str = 60,
    *max_entries: int | str,
):
    """The script's reply; ``max_entries`` (the fourth argument, optional) when given."""
    return client.eval(
        lua.REVOKE, 2, KEYS.revocations(), KEYS.revocations_version(), subject, issued_before,
        keep_for, *max_entries,
    )  # fmt: skip


def stored(client: Any) -> RevocationList:
    revocations, malformed = RevocationList.from_hash(client.hgetall(KEYS.revocations()), 0)
    assert malformed == 0, "the script left a malformed entry"
    return revocations


def test_revoke_now_stores_the_entry_and_changes_the_version(client: Any) -> None:
    before = time.time()
    issued_before, expires_at, version = revoke(client, "user-7", keep_for=3600)
    # Now, by Redis' clock, rounded up: tokens issued earlier in this second are refused too.
    assert before <= issued_before <= time.time() + 1
    assert expires_at == issued_before + 3600
    assert list(stored(client)) == [Revocation("user-7", issued_before, expires_at)]
    assert int(client.get(KEYS.revocations_version())) == version
    # The hash goes with its last entry.
    assert abs(client.ttl(KEYS.revocations()) - (expires_at - time.time())) <= 2
    _, _, again = revoke(client, "user-7", keep_for=3600)
    assert again > version


def test_a_revocation_never_lowers_or_shortens_another(client: Any) -> None:
    now = int(time.time())
    assert revoke(client, "s", now - 10, 1000)[:2] == [now - 10, now + 990]
    # An earlier issued_before with a longer keep: each field takes the larger.
    assert revoke(client, "s", now - 100, 5000)[:2] == [now - 10, now + 4900]
    assert revoke(client, "s", now - 5, 10)[:2] == [now - 5, now + 4900]
    assert list(stored(client)) == [Revocation("s", now - 5, now + 4900)]


def test_an_expired_entry_of_the_subject_is_not_merged(client: Any) -> None:
    now = int(time.time())
    client.hset(KEYS.revocations(), "s", entry(now - 50, now - 1))
    assert revoke(client, "s", now - 100, 1000)[:2] == [now - 100, now + 900]


def test_the_script_sweeps_expired_and_malformed_entries(client: Any) -> None:
    now = int(time.time())
    live = entry(now - 5, now + 100)
    client.hset(
        KEYS.revocations(),
        mapping={
            "expired": entry(now - 100, now - 1),
            "malformed": b"garbage",
            b"\xff\xfe": live,
            "x" * (MAX_SUBJECT_BYTES + 1): live,
            "kept": live,
            "ünïcode": live,
        },
    )
    revoke(client, "s")
    fields = set(client.hgetall(KEYS.revocations()))
    assert fields == {b"kept", "ünïcode".encode(), b"s"}


def test_a_revocation_already_expired_is_not_stored(client: Any) -> None:
    issued_before, expires_at, _ = revoke(client, "s", 1000, 10)
    assert (issued_before, expires_at) == (1000, 1010)
    assert client.hgetall(KEYS.revocations()) == {}


@pytest.mark.parametrize(
    ("subject", "issued_before", "keep_for", "message"),
    [
        ("", "", 60, "subject"),
        ("x" * (MAX_SUBJECT_BYTES + 1), "", 60, "subject"),
        (b"\xff", "", 60, "subject"),
        ("s", "", 0, "keep_for"),
        ("s", "", "-1", "keep_for"),
        ("s", "", "1.5", "keep_for"),
        ("s", "-5", 60, "issued_before"),
        ("s", "1e9", 60, "issued_before"),
        ("s", str(MAX_TIMESTAMP), 60, "too far"),
    ],
)
def test_the_script_refuses_bad_arguments_and_writes_nothing(
    client: Any, subject: Any, issued_before: Any, keep_for: Any, message: str
) -> None:
    with pytest.raises(redis.exceptions.ResponseError, match=message):
        revoke(client, subject, issued_before, keep_for)
    assert client.keys("*") == []


@pytest.mark.parametrize("max_entries", ["0", "-1", "1.5", "x", "1e3", str(MAX_TIMESTAMP + 1)])
def test_the_script_refuses_a_bad_cap_and_writes_nothing(client: Any, max_entries: str) -> None:
    with pytest.raises(redis.exceptions.ResponseError, match="max_entries"):
        revoke(client, "s", "", 60, max_entries)
    assert client.keys("*") == []


def test_at_the_cap_a_new_subject_is_refused_an_old_one_updated(client: Any) -> None:
    revoke(client, "a", "", 600, 2)
    revoke(client, "b", "", 600, 2)  # at cap - 1: taken
    assert client.hlen(KEYS.revocations()) == 2
    before = client.hgetall(KEYS.revocations()), client.get(KEYS.revocations_version())
    with pytest.raises(redis.exceptions.ResponseError, match=f"^{FULL_MARK}2 2"):
        revoke(client, "c", "", 600, 2)
    assert (client.hgetall(KEYS.revocations()), client.get(KEYS.revocations_version())) == before
    # One already in the list: updated at the cap (the hash does not grow).
    _, expires_at, _ = revoke(client, "a", "", 6000, 2)
    assert decode_entry(b"a", client.hget(KEYS.revocations(), "a")).expires_at == expires_at
    # Without the argument, the default cap: far away.
    revoke(client, "c", "", 600)
    assert client.hlen(KEYS.revocations()) == 3


def test_a_new_subject_at_the_cap_takes_the_room_its_sweep_makes(client: Any) -> None:
    now = int(time.time())
    client.hset(
        KEYS.revocations(),
        mapping={"a": entry(1, now + 600), "gone": entry(1, now - 1), "bad": b"garbage"},
    )
    revoke(client, "b", "", 600, 3)  # 3 fields, 2 swept: room for 1
    assert set(client.hkeys(KEYS.revocations())) == {b"a", b"b"}


def test_a_revocation_that_would_be_expired_at_once_is_never_refused(client: Any) -> None:
    now = int(time.time())
    client.hset(KEYS.revocations(), "a", entry(1, now + 600))
    assert revoke(client, "late", 1000, 10, 1)[:2] == [1000, 1010]  # stores nothing
    assert set(client.hkeys(KEYS.revocations())) == {b"a"}


@pytest.mark.parametrize("which", ["hash", "version"])
def test_a_key_of_another_type_is_refused_and_nothing_written(client: Any, which: str) -> None:
    now = int(time.time())
    client.hset(KEYS.revocations(), "other", entry(now - 100, now - 1))  # expired: would go
    key = KEYS.revocations() if which == "hash" else KEYS.revocations_version()
    client.delete(key)
    client.rpush(key, "x")
    entries = client.hgetall(KEYS.revocations()) if which == "version" else None
    with pytest.raises(redis.exceptions.ResponseError, match=f"EVENTBUS_CORRUPT {key}"):
        revoke(client, "s")
    assert client.lrange(key, 0, -1) == [b"x"]
    if which == "version":  # the expired entry was not swept: nothing was written
        assert client.hgetall(KEYS.revocations()) == entries
    else:
        assert not client.exists(KEYS.revocations_version())


def test_a_version_that_is_not_an_integer_is_refused(client: Any) -> None:
    client.set(KEYS.revocations_version(), "seven")
    with pytest.raises(redis.exceptions.ResponseError, match="is not a version"):
        revoke(client, "s")
    assert client.get(KEYS.revocations_version()) == b"seven"


def test_the_version_never_goes_back_to_one_a_reader_saw(client: Any) -> None:
    """After a flush (or a failover that lost writes) the version starts at Redis' time in
    microseconds, not at 1: a reader that saw version 1 before still sees a change."""
    _, _, first = revoke(client, "a")
    client.flushall()
    _, _, second = revoke(client, "b")
    assert second != first and second > 10**15
    client.set(KEYS.revocations_version(), 8 * 10**15)  # ahead of the clock: up by one
    assert revoke(client, "c")[2] == 8 * 10**15 + 1


field_values = st.one_of(
    st.binary(max_size=12),
    st.builds(lambda a, b: entry(a, b), st.integers(0, 2 * NOW), st.integers(0, 2 * NOW)),
)


def admitted(items: dict, subject: str, cap: int, now: float) -> bool | None:
    """Whether the script takes ``subject`` into a hash of ``items`` with cap ``cap`` (the rule
    of schemas.lua.REVOKE, from the outside): True, False, or None when it depends on an entry
    expiring within this second (judged either way)."""
    if subject.encode() in items:
        return True  # an update: the hash does not grow
    kept, _ = RevocationList.from_hash(items, now)
    surely = {r.subject for r in kept if r.expires_at > now + 2}
    maybe = {r.subject for r in kept}
    if len(surely) >= cap:
        return False
    if len(maybe) < cap:
        return True
    return None


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(
        st.one_of(
            st.binary(min_size=0, max_size=6),
            st.text(max_size=4).map(str.encode),
            st.sampled_from(["s", "é", "t"]).map(str.encode),  # the subject's own field
        ),
        field_values,
        max_size=8,
    ),
    st.sampled_from(["s", "é", "t"]),
    st.one_of(st.none(), st.integers(1, 9)),
)
def test_the_script_keeps_exactly_what_a_reader_takes(
    client: Any, items: dict, subject: str, cap: int | None
):
    """Lua and Python judge entries by the same rule: after a revocation, the hash holds the
    entries the reader's from_hash keeps (live, well formed) and the new one, nothing else.
    With a cap (None: the script's default), a new subject finding the hash full after the
    sweep is refused: nothing is added or changed and the version does not move, but what it
    swept is gone (what a reader leaves out); one already in the hash is always taken."""
    client.flushall()
    items = {field: value for field, value in items.items() if field}  # Redis: no empty field
    if items:
        client.hset(KEYS.revocations(), mapping=items)
    now = time.time()
    expected, _ = RevocationList.from_hash(items, now)
    caps = () if cap is None else (cap,)
    admit = admitted(items, subject, DEFAULT_MAX_REVOCATIONS if cap is None else cap, now)
    try:
        issued_before, expires_at, _ = revoke(client, subject, "", 3600, *caps)
    except redis.exceptions.ResponseError as exc:
        assert admit is not True, exc
        assert parse_full_error(str(exc)) == (len(items), cap)
        assert not client.exists(KEYS.revocations_version())
        # Swept all the same, nothing else: every field left is one of the items, unchanged,
        # and one a reader keeps (an entry expiring within this second may be judged either
        # way); every entry a reader keeps for longer is still there.
        left = client.hgetall(KEYS.revocations())
        assert all(items.get(field) == value for field, value in left.items())
        assert {r.subject for r in stored(client)} <= {r.subject for r in expected}
        assert {r.subject for r in expected if r.expires_at > now + 2} <= {
            field.decode() for field in left
        }
        return
    assert admit is not False
    after = {r.subject: r for r in stored(client)}
    assert after.pop(subject) == Revocation(subject, issued_before, expires_at)
    # (An entry expiring within this second may be judged either way.)
    assert {s for s in after} <= {r.subject for r in expected if r.subject != subject}
    assert {r.subject for r in expected if r.subject != subject and r.expires_at > now + 2} <= set(
        after
    )
