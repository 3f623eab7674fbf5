"""The write side of token revocation: ``Publisher.revoke_tokens`` / ``AsyncPublisher
.revoke_tokens`` against a real Redis (the session's private server), fakeredis and Redis
Cluster, and ``eventbus-publish revoke-tokens``. The stored format and the script's rules
without a server are in tests/test_revocations_schema.py; the HTTP endpoint is in
tests/test_http_api.py."""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from publisher import (
    AsyncPublisher,
    Publisher,
    PublishError,
    PublisherUnavailable,
    RevocationListFull,
)
from publisher.__main__ import main as cli_main
from schemas import lua
from schemas.keys import Keys
from schemas.revocations import (
    DEFAULT_MAX_REVOCATIONS,
    MAX_REVOCATIONS,
    MAX_SUBJECT_BYTES,
    REVOKE_SWEEP,
    Revocation,
    RevocationList,
)
from schemas.tokens import issue_token, verify_token
from tests.support.redis_server import RedisServer, free_port, hung
from tests.test_revocations_schema import admitted

KEYS = Keys()
SECRET = "revocation-test-secret-long-enough-for-hs256"


def stored(client: Any, keys: Keys = KEYS) -> RevocationList:
    """What a gateway would read now (and the hash holds nothing malformed)."""
    revocations, malformed = RevocationList.from_hash(client.hgetall(keys.revocations()), 0)
    assert malformed == 0
    return revocations


@pytest.fixture
def pub(redis_url: str) -> Iterator[Publisher]:
    with Publisher.from_url(redis_url) as publisher:
        yield publisher


# --- the publisher on a real Redis ------------------------------------------------------------


def test_revoke_refuses_the_tokens_issued_until_now_and_not_those_issued_after(
    pub: Publisher, redis_client: redis.Redis
) -> None:
    """What a gateway decides with what the call stored: the token issued before the call is
    revoked, one issued once the returned issued_before has passed is not."""
    before = verify_token(issue_token(SECRET, [1], subject="user-7"), SECRET)
    revocation = pub.revoke_tokens("user-7")
    assert revocation.subject == "user-7"
    assert revocation.expires_at == revocation.issued_before + 24 * 3600
    assert list(stored(redis_client)) == [revocation]
    assert int(redis_client.get(KEYS.revocations_version())) > 0
    now = time.time()
    revocations = stored(redis_client)
    assert revocations.is_revoked("user-7", before.iat, now)
    assert not revocations.is_revoked("user-8", before.iat, now)
    # A token is issued in whole seconds: the revocation covers the second it was made in.
    assert revocation.issued_before >= int(now)
    after = revocation.issued_before  # the first iat a new token may carry to be valid
    assert not revocations.is_revoked("user-7", after, now)


def test_each_revocation_changes_the_version(pub: Publisher, redis_client: redis.Redis) -> None:
    versions = []
    for subject in ["a", "b", "a"]:
        pub.revoke_tokens(subject)
        versions.append(int(redis_client.get(KEYS.revocations_version())))
    assert versions == sorted(set(versions))


def test_a_revocation_merges_with_the_subjects_earlier_one(pub: Publisher) -> None:
    now = int(time.time())
    first = pub.revoke_tokens("s", issued_before=now - 10, keep_for=3600)
    assert (first.issued_before, first.expires_at) == (now - 10, now + 3590)
    # Earlier and longer: each time takes the later one (never lowered, never shortened).
    merged = pub.revoke_tokens("s", issued_before=now - 100, keep_for=timedelta(hours=2))
    assert (merged.issued_before, merged.expires_at) == (now - 10, now - 100 + 7200)


def test_issued_before_is_rounded_up_to_a_whole_second(pub: Publisher) -> None:
    """A token issued at t.5 carries iat t: a revocation of the tokens issued before t.5 must
    refuse it."""
    now = time.time()
    at = datetime.fromtimestamp(int(now) - 0.5 + 0.0, tz=timezone(timedelta(hours=2)))
    assert pub.revoke_tokens("d", issued_before=at).issued_before == int(now)
    assert pub.revoke_tokens("f", issued_before=int(now) - 1.25).issued_before == int(now) - 1
    assert pub.revoke_tokens("k", keep_for=0.2).expires_at >= int(now) + 1


@pytest.mark.parametrize(
    ("subject", "options", "message"),
    [
        ("", {}, "subject"),
        ("x" * (MAX_SUBJECT_BYTES + 1), {}, "subject"),
        ("é" * (MAX_SUBJECT_BYTES // 2 + 1), {}, "subject"),  # bytes count, not characters
        ("user \ud83d", {}, "subject"),  # half a surrogate pair: no token carries it
        (b"user-7", {}, "subject"),
        (7, {}, "subject"),
        (None, {}, "subject"),
        ("s", {"keep_for": 0}, "keep_for"),
        ("s", {"keep_for": -5}, "keep_for"),
        ("s", {"keep_for": timedelta(days=367)}, "keep_for"),
        ("s", {"keep_for": 10**12}, "keep_for"),  # milliseconds given as seconds
        ("s", {"keep_for": float("nan")}, "keep_for"),
        ("s", {"keep_for": True}, "keep_for"),
        ("s", {"keep_for": "60"}, "keep_for"),
        ("s", {"issued_before": time.time() + 3600}, "issued_before"),
        ("s", {"issued_before": time.time() * 1000}, "issued_before"),  # milliseconds
        ("s", {"issued_before": -1}, "issued_before"),
        ("s", {"issued_before": float("inf")}, "issued_before"),
        ("s", {"issued_before": 10**400}, "issued_before"),
        ("s", {"issued_before": datetime(2020, 1, 1)}, "timezone"),  # naive: which zone?
        ("s", {"issued_before": "2020-01-01"}, "issued_before"),
        ("s", {"issued_before": 1_000_000_000}, "has passed"),  # ended long ago
    ],
)
def test_bad_arguments_are_a_value_error_naming_them_and_nothing_is_written(
    pub: Publisher, redis_client: redis.Redis, subject: Any, options: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        pub.revoke_tokens(subject, **options)
    assert redis_client.keys("*") == []


def test_the_longest_subject_and_a_little_clock_skew_are_taken(pub: Publisher) -> None:
    longest = "é" * (MAX_SUBJECT_BYTES // 2)
    assert pub.revoke_tokens(longest).subject == longest
    ahead = int(time.time()) + 30  # another issuer's clock a little ahead of ours
    assert pub.revoke_tokens("s", issued_before=ahead).issued_before == ahead


@pytest.mark.parametrize("key", [KEYS.revocations(), KEYS.revocations_version()])
def test_a_damaged_key_is_a_publish_error_naming_it_and_nothing_is_written(
    pub: Publisher, redis_client: redis.Redis, key: str
) -> None:
    redis_client.delete(key)
    redis_client.rpush(key, "another writer's")
    with pytest.raises(PublishError, match=re.escape(f"the Redis key {key} is not a")):
        pub.revoke_tokens("s")
    assert redis_client.lrange(key, 0, -1) == [b"another writer's"]
    assert redis_client.keys("*") == [key.encode()]


def test_a_flushed_script_cache_is_reloaded(pub: Publisher, redis_client: redis.Redis) -> None:
    pub.revoke_tokens("a")
    redis_client.script_flush()
    assert pub.revoke_tokens("b").subject == "b"
    assert {r.subject for r in stored(redis_client)} == {"a", "b"}


def test_the_script_sweeps_what_a_reader_leaves_out(
    pub: Publisher, redis_client: redis.Redis
) -> None:
    """On Redis' own Lua (5.1): expired entries and any field or value decode_entry refuses,
    including the UTF-8 that Python's strict decoder refuses and Lua has no notion of."""
    now = int(time.time())
    live = b'{"issued_before":%d,"expires_at":%d}' % (now - 5, now + 100)
    malformed_fields = [
        b"\xff",
        b"\xc0\xaf",  # an overlong '/'
        b"\xed\xa0\x80",  # a surrogate
        b"\xf4\x90\x80\x80",  # past U+10FFFF
        b"\xe2\x82",  # cut short
        b"x" * (MAX_SUBJECT_BYTES + 1),
    ]
    good_fields = ["ascii", "é", "€", "𝄞", "x" * MAX_SUBJECT_BYTES]
    mapping: dict[Any, bytes] = {field: live for field in [*malformed_fields, *good_fields]}
    mapping["expired"] = b'{"issued_before":%d,"expires_at":%d}' % (now - 100, now)
    mapping["no"] = b'{"issued_before":5,"expires_at":5}'
    mapping["spaced"] = b'{"issued_before": 5, "expires_at": %d}' % (now + 100)
    redis_client.hset(KEYS.revocations(), mapping=mapping)
    pub.revoke_tokens("new")
    fields = set(redis_client.hgetall(KEYS.revocations()))
    assert fields == {field.encode() for field in [*good_fields, "new"]}


#: Fields at the edges of UTF-8 (valid and not), besides arbitrary bytes.
EDGE_FIELDS = [
    *(b"\xff", b"\xc0\xaf", b"\xc1\xbf", b"\xc2\x80", b"\xe2\x82", b"\xe2\x82\xac"),
    *(b"\xed\x9f\xbf", b"\xed\xa0\x80", b"\xf4\x8f\xbf\xbf", b"\xf4\x90\x80\x80"),
]


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.dictionaries(
        st.one_of(st.binary(min_size=1, max_size=5), st.sampled_from(EDGE_FIELDS)),
        st.one_of(
            st.binary(max_size=10),
            st.builds(
                lambda a, b: b'{"issued_before":%d,"expires_at":%d}' % (a, b),
                st.integers(0, 4 * 10**9),
                st.integers(0, 4 * 10**9),
            ),
        ),
        max_size=6,
    ),
    st.integers(1, 7),
)
def test_redis_lua_and_python_judge_every_entry_alike(
    redis_url: str, items: dict, cap: int
) -> None:
    """Also the cap, on Redis' own Lua: a new subject is taken exactly when the hash, less
    what the reader leaves out, has room; refused, nothing is added or changed and the version
    does not move, what the reader leaves out is removed all the same (see
    tests/test_revocations_schema.py for the same on fakeredis, with the subject's own field)."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(KEYS.revocations(), KEYS.revocations_version())
        if items:
            client.hset(KEYS.revocations(), mapping=items)
        now = time.time()
        expected, _ = RevocationList.from_hash(items, now)
        admit = admitted(items, "subject-of-the-test", cap, now)
        with Publisher(client, max_revocations=cap) as publisher:
            try:
                publisher.revoke_tokens("subject-of-the-test")
            except RevocationListFull as exc:
                assert admit is not True and (exc.entries, exc.limit) == (len(items), cap)
                assert not client.exists(KEYS.revocations_version())
                left = client.hgetall(KEYS.revocations())
                assert all(items.get(field) == value for field, value in left.items())
                kept = {r.subject for r in expected}
                soon = {r.subject for r in expected if r.expires_at <= now + 2}  # either way
                assert kept - soon <= {r.subject for r in stored(client)} <= kept
                return
        assert admit is not False
        after = {r.subject for r in stored(client)} - {"subject-of-the-test"}
        kept = {r.subject for r in expected}
        soon = {r.subject for r in expected if r.expires_at <= now + 2}  # either way
        assert kept - soon <= after <= kept
    finally:
        client.close()


#: Bytes at the edges of UTF-8's ranges: ASCII, continuation bytes, every kind of lead byte
#: (overlong C0/C1/E0/F0, surrogate ED, F4's limit, F5-FF never valid).
UTF8_EDGE_BYTES = [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF]
UTF8_EDGE_BYTES += [0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]


def utf8(field: bytes) -> bool:
    try:
        field.decode()
    except UnicodeDecodeError:
        return False
    return True


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.sets(
        st.lists(st.sampled_from(UTF8_EDGE_BYTES), min_size=1, max_size=8).map(bytes)
        | st.text(min_size=1, max_size=4).map(str.encode),
        max_size=30,
    )
)
def test_the_script_keeps_exactly_the_fields_python_decodes(redis_url: str, fields) -> None:
    """Lua (5.1) has no UTF-8: the script's own check must be Python's strict decoder, byte for
    byte (every field here has a live value: only its name decides)."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(KEYS.revocations())
        value = b'{"issued_before":1,"expires_at":%d}' % (int(time.time()) + 3600)
        if fields:
            client.hset(KEYS.revocations(), mapping=dict.fromkeys(fields, value))
        with Publisher(client) as publisher:
            publisher.revoke_tokens("subject-of-the-test")
        kept = set(client.hkeys(KEYS.revocations())) - {b"subject-of-the-test"}
        assert kept == {field for field in fields if utf8(field)}
    finally:
        client.close()


def test_checking_non_ascii_subjects_costs_little_more_than_ascii_ones(redis_url: str) -> None:
    """The script checks that each field it reads is UTF-8 (the reader's rule). Checked a byte
    at a time in Lua, a full hash (REVOKE_SWEEP entries) of 1 KiB non-ASCII subjects took ~9
    times the Redis time of one of 1 KiB ASCII subjects (56 ms against 6 ms a revocation, every
    publish waiting behind it); with patterns, run in C, ~4 times. Measured call by call,
    alternating, so that the machine's load weighs on both alike."""
    now = int(time.time())
    value = b'{"issued_before":1,"expires_at":%d}' % (now + 3600)
    kinds = {"ascii": "a" * (MAX_SUBJECT_BYTES - 4), "utf8": "é" * ((MAX_SUBJECT_BYTES - 4) // 2)}
    client = redis.Redis.from_url(redis_url)
    publishers = {kind: Publisher(client, prefix=kind) for kind in kinds}
    calls = 9
    for kind, stem in kinds.items():
        subjects = {f"{stem}{i:04d}" for i in range(calls + 1, REVOKE_SWEEP)}
        client.hset(Keys(kind).revocations(), mapping=dict.fromkeys(subjects, value))
        publishers[kind].revoke_tokens(f"{stem}0000")  # (loads the script)
    costs: dict[str, list[float]] = {kind: [] for kind in kinds}
    try:
        for i in range(1, calls + 1):
            for kind, stem in kinds.items():
                client.config_resetstat()
                publishers[kind].revoke_tokens(f"{stem}{i:04d}")
                costs[kind].append(client.info("commandstats")["cmdstat_evalsha"]["usec"])
        for kind in kinds:
            assert client.hlen(Keys(kind).revocations()) == REVOKE_SWEEP  # read whole each time
        ascii_cost, utf8_cost = (sorted(costs[kind])[calls // 2] for kind in kinds)
        assert utf8_cost < 6.5 * ascii_cost, costs
    finally:
        client.close()


def test_a_large_hash_is_read_a_slice_at_a_time_and_no_live_entry_is_lost(
    pub: Publisher, redis_client: redis.Redis
) -> None:
    """A bulk revocation must not make each call read thousands of entries: past REVOKE_SWEEP,
    each call reads a slice; expired entries still go, live ones never, and the hash's expiry
    never moves before its latest entry's."""
    assert f"local SWEEP = {REVOKE_SWEEP}\n" in lua.REVOKE
    now = int(time.time())
    expired = {f"old-{i}": b'{"issued_before":1,"expires_at":%d}' % (now - 1) for i in range(3000)}
    live = {
        f"live-{i}": b'{"issued_before":1,"expires_at":%d}' % (now + 1000 + i) for i in range(20)
    }
    redis_client.hset(KEYS.revocations(), mapping={**expired, **live})
    redis_client.expireat(KEYS.revocations(), now + 1019)  # as the script leaves it
    sizes = [redis_client.hlen(KEYS.revocations())]
    while sizes[-1] > REVOKE_SWEEP:
        assert len(sizes) < 200, f"the expired entries are not swept: {sizes}"
        pub.revoke_tokens(f"new-{len(sizes)}", keep_for=60)
        sizes.append(redis_client.hlen(KEYS.revocations()))
        # A slice each (HSCAN's COUNT is a hint: a little more may come), plus the new entry.
        assert sizes[-2] + 1 - sizes[-1] <= 2 * REVOKE_SWEEP
        assert redis_client.ttl(KEYS.revocations()) >= now + 1019 - time.time() - 1
    pub.revoke_tokens("last", keep_for=60)  # small enough now: read whole
    fields = {field.decode() for field in redis_client.hkeys(KEYS.revocations())}
    assert set(live) <= fields and not any(field.startswith("old-") for field in fields)
    assert redis_client.ttl(KEYS.revocations()) >= now + 1019 - time.time() - 1


# --- the cap of the list ----------------------------------------------------------------------


def snapshot(client: Any) -> tuple:
    """Everything a revocation may change: the hash, its expiry, the version."""
    return (
        client.hgetall(KEYS.revocations()),
        client.pttl(KEYS.revocations()) // 10_000,  # (ms run down meanwhile: 10 s granules)
        client.get(KEYS.revocations_version()),
    )


def live(count: int, keep: int = 3600, stem: str = "user") -> dict[str, bytes]:
    now = int(time.time())
    value = b'{"issued_before":%d,"expires_at":%d}' % (now - 10, now + keep)
    return dict.fromkeys((f"{stem}-{i}" for i in range(count)), value)


def test_the_cap_takes_a_new_subject_below_it_refuses_one_at_it_and_updates_an_old_one(
    redis_url: str, redis_client: redis.Redis
) -> None:
    with Publisher.from_url(redis_url, max_revocations=3) as publisher:
        assert publisher.max_revocations == 3
        publisher.revoke_tokens("a")
        publisher.revoke_tokens("b")
        publisher.revoke_tokens("c")  # at cap - 1: taken
        assert redis_client.hlen(KEYS.revocations()) == 3
        before = snapshot(redis_client)
        with pytest.raises(RevocationListFull, match="full") as full:
            publisher.revoke_tokens("d")
        assert (full.value.entries, full.value.limit) == (3, 3)
        assert isinstance(full.value, PublishError)
        assert snapshot(redis_client) == before  # nothing changed, the version not bumped
        # One already in the list is updated at the cap, and the readers see it.
        updated = publisher.revoke_tokens("a", keep_for=timedelta(days=2))
        assert updated.expires_at == updated.issued_before + 2 * 86400
        assert stored(redis_client).get("a") == updated
        assert redis_client.get(KEYS.revocations_version()) != before[2]
        assert {r.subject for r in stored(redis_client)} == {"a", "b", "c"}


def test_at_the_cap_the_sweep_of_expired_entries_makes_room(
    redis_url: str, redis_client: redis.Redis
) -> None:
    now = int(time.time())
    redis_client.hset(
        KEYS.revocations(),
        mapping={
            **live(2),
            "gone": b'{"issued_before":1,"expires_at":%d}' % (now - 1),
            "garbage": b"not written by the publisher",
        },
    )
    with Publisher.from_url(redis_url, max_revocations=4) as publisher:
        assert publisher.revoke_tokens("new").subject == "new"
        assert set(redis_client.hkeys(KEYS.revocations())) == {b"user-0", b"user-1", b"new"}
        publisher.revoke_tokens("newer")  # 3 of 4
        with pytest.raises(RevocationListFull):
            publisher.revoke_tokens("newest")


def test_refused_calls_sweep_what_they_read_so_a_list_over_the_cap_makes_room(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """A list larger than a publisher's cap (the cap lowered, or grown by a publisher with a
    larger one) of mostly expired entries: each call reads a slice of it, too little to make
    room at once. The refused calls must still remove the expired entries they read (which no
    gateway uses), else every call finds the same pile and new subjects are refused until the
    live entries expire (days) although the list holds far fewer than the cap. Before, a
    refused call removed nothing: the 20 calls below were all refused."""
    now = int(time.time())
    gone = b'{"issued_before":1,"expires_at":%d}' % (now - 1)
    kept = live(100, keep=86400)
    redis_client.hset(
        KEYS.revocations(),
        mapping={**kept, **dict.fromkeys((f"old-{i}" for i in range(1900)), gone)},
    )
    redis_client.set(KEYS.revocations_version(), 7)
    sizes = [redis_client.hlen(KEYS.revocations())]
    with Publisher.from_url(redis_url, max_revocations=1000) as publisher:
        for _ in range(20):
            try:
                publisher.revoke_tokens("new")
                break
            except RevocationListFull as full:
                # Refused: nothing a gateway reads changed, the version did not move; the error
                # tells how many entries the list holds now, after the sweep.
                assert redis_client.get(KEYS.revocations_version()) == b"7"
                assert full.entries == redis_client.hlen(KEYS.revocations())
                in_force, _ = RevocationList.from_hash(
                    redis_client.hgetall(KEYS.revocations()), time.time()
                )
                assert {r.subject for r in in_force} == set(kept)
                sizes.append(redis_client.hlen(KEYS.revocations()))
        else:
            pytest.fail(f"refused 20 times with 100 live entries, cap 1000: sizes {sizes}")
    fields = {field.decode() for field in redis_client.hkeys(KEYS.revocations())}
    assert set(kept) | {"new"} <= fields
    assert len(sizes) > 1  # (the first call was refused: the case under test)


async def test_the_async_publisher_refuses_alike(redis_url: str, redis_client) -> None:
    redis_client.hset(KEYS.revocations(), mapping=live(2))
    publisher = AsyncPublisher.from_url(redis_url, max_revocations=2)
    try:
        before = snapshot(redis_client)
        with pytest.raises(RevocationListFull) as full:
            await publisher.revoke_tokens("new")
        assert (full.value.entries, full.value.limit) == (2, 2)
        assert snapshot(redis_client) == before
        assert (await publisher.revoke_tokens("user-1")).subject == "user-1"
    finally:
        await publisher.aclose()


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "100", MAX_REVOCATIONS + 1, 2**53])
def test_a_bad_cap_is_a_value_error(redis_url: str, value: Any) -> None:
    # (Above MAX_REVOCATIONS the gateways would not read the list: every revocation ignored.)
    with pytest.raises(ValueError, match="max_revocations"):
        Publisher.from_url(redis_url, max_revocations=value)
    with pytest.raises(ValueError, match="max_revocations"):
        AsyncPublisher.from_url(redis_url, max_revocations=value)


def test_the_default_cap_at_full_size_and_the_cost_of_a_refusal(
    pub: Publisher, redis_client: redis.Redis
) -> None:
    """At the default cap, 100,000 entries (the script reads a slice): the last one is taken, a
    new one refused without a change, an old one updated; and a call on the full hash costs
    Redis no more than one on a hash of a thousand (both read one slice: HLEN and HEXISTS are
    O(1)). Then, most entries expired, a new subject is taken after the sweep."""
    assert pub.max_revocations == DEFAULT_MAX_REVOCATIONS == 100_000
    small = Publisher(redis_client, prefix="small")
    redis_client.hset(Keys("small").revocations(), mapping=live(1000))
    full = live(DEFAULT_MAX_REVOCATIONS - 1)
    for chunk in range(0, len(full), 10_000):
        redis_client.hset(
            KEYS.revocations(), mapping=dict(list(full.items())[chunk : chunk + 10_000])
        )
    pub.revoke_tokens("last")  # at cap - 1: taken
    assert redis_client.hlen(KEYS.revocations()) == DEFAULT_MAX_REVOCATIONS
    before = snapshot(redis_client)
    costs: dict[str, list[int]] = {"full": [], "small": []}
    for i in range(7):
        redis_client.config_resetstat()
        with pytest.raises(RevocationListFull, match="100000 entries, at most 100000"):
            pub.revoke_tokens(f"refused-{i}")
        costs["full"].append(redis_client.info("commandstats")["cmdstat_evalsha"]["usec"])
        redis_client.config_resetstat()
        small.revoke_tokens(f"user-{i}")
        costs["small"].append(redis_client.info("commandstats")["cmdstat_evalsha"]["usec"])
    assert snapshot(redis_client) == before
    full_cost, small_cost = (sorted(costs[kind])[3] for kind in costs)
    assert full_cost < 3 * small_cost + 500, costs
    updated = pub.revoke_tokens("user-7", keep_for=7200)  # one in the list: updated
    assert redis_client.hlen(KEYS.revocations()) == 100_000
    assert redis_client.hget(KEYS.revocations(), "user-7") == (
        b'{"issued_before":%d,"expires_at":%d}' % (updated.issued_before, updated.expires_at)
    )
    # Most entries expired (not yet swept): the slice the call reads makes room.
    now = int(time.time())
    gone = b'{"issued_before":1,"expires_at":%d}' % (now - 1)
    redis_client.hset(KEYS.revocations(), mapping=dict.fromkeys(list(full)[:90_000], gone))
    assert pub.revoke_tokens("new").subject == "new"
    assert redis_client.hlen(KEYS.revocations()) < DEFAULT_MAX_REVOCATIONS


def test_the_hash_expires_with_its_last_entry(pub: Publisher, redis_client: redis.Redis) -> None:
    short = pub.revoke_tokens("short", keep_for=60)
    assert abs(redis_client.ttl(KEYS.revocations()) - (short.expires_at - time.time())) <= 2
    long = pub.revoke_tokens("long", keep_for=3600)
    assert abs(redis_client.ttl(KEYS.revocations()) - (long.expires_at - time.time())) <= 2


def test_the_prefix_is_the_publishers(redis_url: str, redis_client: redis.Redis) -> None:
    with Publisher.from_url(redis_url, prefix="other") as publisher:
        publisher.revoke_tokens("s")
    assert [r.subject for r in stored(redis_client, Keys("other"))] == ["s"]
    assert not redis_client.exists(KEYS.revocations())


async def test_the_async_publisher_revokes_alike(redis_url: str, redis_client) -> None:
    publisher = AsyncPublisher.from_url(redis_url)
    try:
        revocation = await publisher.revoke_tokens("user-7", keep_for=timedelta(minutes=30))
        assert revocation.expires_at == revocation.issued_before + 1800
        assert list(stored(redis_client)) == [revocation]
        with pytest.raises(ValueError, match="keep_for"):
            await publisher.revoke_tokens("user-7", keep_for=0)
        redis_client.script_flush()
        again = await publisher.revoke_tokens("user-7", issued_before=revocation.issued_before - 9)
        # Merged: the later issued_before stays, the longer keep (24 h by default) wins.
        assert again.issued_before == revocation.issued_before
        assert again.expires_at == revocation.issued_before - 9 + 24 * 3600
    finally:
        await publisher.aclose()


def test_fakeredis_runs_the_same_script(fake_redis: fakeredis.FakeRedis) -> None:
    publisher = Publisher(fake_redis)
    revocation = publisher.revoke_tokens("user-7", keep_for=60)
    assert list(stored(fake_redis)) == [revocation]


# --- bounded like a publish -------------------------------------------------------------------


def ends_within(call: Callable[[], object], bound: float) -> None:
    started = time.monotonic()
    with pytest.raises(PublisherUnavailable, match="Redis unavailable"):
        call()
    assert time.monotonic() - started < bound + 1.5


async def test_a_revocation_on_a_hung_or_absent_redis_ends_within_the_timeout() -> None:
    with RedisServer() as server:
        with Publisher.from_url(server.url, timeout=1.0) as publisher, hung(server):
            ends_within(lambda: publisher.revoke_tokens("s"), 1.0)
        apublisher = AsyncPublisher.from_url(server.url, timeout=1.0)
        try:
            with hung(server):
                started = time.monotonic()
                with pytest.raises(PublisherUnavailable):
                    await apublisher.revoke_tokens("s")
                assert time.monotonic() - started < 2.5
        finally:
            await apublisher.aclose()
    with Publisher.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0) as publisher:
        ends_within(lambda: publisher.revoke_tokens("s"), 1.0)


# --- Redis Cluster ----------------------------------------------------------------------------


def test_revoke_on_redis_cluster(redis_cluster_url: str) -> None:
    """Both keys are in the slot of {revocations}: one script call on the master that owns it."""
    with Publisher.from_url(redis_cluster_url) as publisher:
        first = publisher.revoke_tokens("user-7")
        second = publisher.revoke_tokens("user-8", keep_for=60)
        client = publisher.client
        assert {r.subject for r in stored(client)} == {"user-7", "user-8"}
        assert first in list(stored(client)) and second in list(stored(client))
        assert client.get(KEYS.revocations_version()) is not None
        client.script_flush()  # every master forgets the script (a restart, a new node)
        assert publisher.revoke_tokens("user-10").subject == "user-10"


async def test_async_revoke_on_redis_cluster(redis_cluster_url: str) -> None:
    publisher = AsyncPublisher.from_url(redis_cluster_url)
    try:
        revocation = await publisher.revoke_tokens("user-9")
        assert revocation.subject == "user-9"
        stored_now = await publisher.client.hgetall(KEYS.revocations())
        revocations, malformed = RevocationList.from_hash(stored_now, time.time())
        assert malformed == 0 and list(revocations) == [revocation]
    finally:
        await publisher.aclose()


# --- eventbus-publish revoke-tokens -----------------------------------------------------------


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli_main(list(argv), stdout=out, stderr=err)
    assert "Traceback" not in err.getvalue()
    return code, out.getvalue(), err.getvalue()


def test_cli_revokes_and_prints_the_entry(redis_url: str, redis_client: redis.Redis) -> None:
    code, out, err = cli("--redis-url", redis_url, "revoke-tokens", "user-7")
    assert code == 0, err
    printed = json.loads(out)
    assert printed["subject"] == "user-7"
    assert printed["expires_at"] == printed["issued_before"] + 24 * 3600
    assert list(stored(redis_client)) == [Revocation(**printed)]
    now = int(time.time())
    code, out, err = cli(
        "revoke-tokens",
        "user-8",
        "--issued-before",
        str(now - 5),
        "--keep-for",
        "900",
        "--redis-url",
        redis_url,
    )
    assert code == 0, err
    assert json.loads(out) == {
        "subject": "user-8",
        "issued_before": now - 5,
        "expires_at": now + 895,
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["revoke-tokens"], "SUBJECT"),
        (["revoke-tokens", ""], "subject"),
        (["revoke-tokens", "x" * (MAX_SUBJECT_BYTES + 1)], "subject"),
        (["revoke-tokens", "s", "--keep-for", "0"], "--keep-for"),
        (["revoke-tokens", "s", "--keep-for", "soon"], "--keep-for"),
        (["revoke-tokens", "s", "--keep-for", str(400 * 86400)], "keep_for"),
        (["revoke-tokens", "s", "--issued-before", "-1"], "--issued-before"),
        (["revoke-tokens", "s", "--issued-before", "tomorrow"], "--issued-before"),
        (["revoke-tokens", "s", "--issued-before", str(int(time.time()) + 3600)], "passed"),
        (["revoke-tokens", "s", "--issued-before", "1000"], "has passed"),
    ],
)
def test_cli_bad_arguments_exit_2_with_a_message_and_write_nothing(
    redis_url: str, redis_client: redis.Redis, argv: list[str], message: str, capsys
) -> None:
    try:
        code, _, err = cli("--redis-url", redis_url, *argv)
    except SystemExit as exit:  # argparse's own errors
        code, err = int(exit.code or 0), capsys.readouterr().err
    assert code == 2 and message in err, err
    assert redis_client.keys("*") == []


def test_cli_redis_unavailable_exits_3() -> None:
    code, out, err = cli("--redis-url", f"redis://127.0.0.1:{free_port()}/0", "revoke-tokens", "s")
    assert code == 3 and "Redis unavailable" in err and out == ""


def test_cli_damaged_key_exits_1(redis_url: str, redis_client: redis.Redis) -> None:
    redis_client.set(KEYS.revocations(), "not a hash")
    code, out, err = cli("--redis-url", redis_url, "revoke-tokens", "s")
    assert code == 1 and KEYS.revocations() in err and out == ""


def test_cli_a_full_list_exits_4_and_writes_nothing(
    redis_url: str, redis_client: redis.Redis, monkeypatch
) -> None:
    redis_client.hset(KEYS.revocations(), mapping=live(2))
    before = snapshot(redis_client)
    code, out, err = cli("--redis-url", redis_url, "revoke-tokens", "new", "--max-revocations", "2")
    assert code == 4 and out == ""
    assert "revocation list is full (2 entries, at most 2)" in err, err
    assert "raise max_revocations" in err
    assert snapshot(redis_client) == before
    # One in the list is updated at the cap.
    code, out, err = cli(
        "--redis-url", redis_url, "revoke-tokens", "user-0", "--max-revocations", "2"
    )
    assert code == 0 and json.loads(out)["subject"] == "user-0", err
    # The cap from the environment (the HTTP API's variable too), else the default.
    monkeypatch.setenv("EVENTBUS_MAX_REVOCATIONS", "2")
    assert cli("--redis-url", redis_url, "revoke-tokens", "new")[0] == 4
    monkeypatch.setenv("EVENTBUS_MAX_REVOCATIONS", "3")
    assert cli("--redis-url", redis_url, "revoke-tokens", "new")[0] == 0


@pytest.mark.parametrize("value", ["0", "-3", "many", str(MAX_REVOCATIONS + 1), str(2**53)])
def test_cli_a_bad_cap_exits_2(redis_url: str, redis_client: redis.Redis, value: str, capsys):
    try:
        code, _, err = cli(
            "--redis-url", redis_url, "revoke-tokens", "s", "--max-revocations", value
        )
    except SystemExit as exit:  # argparse's own errors
        code, err = int(exit.code or 0), capsys.readouterr().err
    assert code == 2 and "max-revocations" in err.replace("_", "-"), err
    assert redis_client.keys("*") == []


def test_the_docs_revocation_sample_runs_as_written(redis_url: str, tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "publisher.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    sample = next(block for block in blocks if "revoke_tokens(" in block)
    assert sample.count('"redis://localhost:6379/0"') == 1
    script = tmp_path / "sample.py"
    script.write_text(sample.replace("redis://localhost:6379/0", redis_url))
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    client = redis.Redis.from_url(redis_url)
    try:
        assert {r.subject for r in stored(client)} == {"user-7", "user-8", "user-9"}
    finally:
        client.close()
