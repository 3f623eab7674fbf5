"""The per-connection token bucket on client frames (gateway.ratelimit), without sockets: a fake
clock is passed in as ``now``."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ratelimit import (
    ALLOWED,
    CLOSE,
    NEVER,
    REFUSED,
    Bucket,
    FrameRateLimit,
    frame_rate_limit,
)


def takes(limit: FrameRateLimit, bucket: Bucket, now: float, count: int) -> list[int]:
    return [limit.take(bucket, now) for _ in range(count)]


def test_a_new_bucket_is_full_whatever_the_clock_reads():
    limit = FrameRateLimit(rate=20, burst=60)
    for now in (0.0, 1e-9, 5.0, 1e9):  # a fresh machine's monotonic clock may be small
        bucket = Bucket()
        assert takes(limit, bucket, now, 60) == [ALLOWED] * 60
        assert limit.take(bucket, now) == REFUSED


def test_burst_then_the_rate():
    limit = FrameRateLimit(rate=4, burst=5)  # (times in quarters of a second: exact in binary)
    bucket = Bucket()
    assert takes(limit, bucket, 100.0, 5) == [ALLOWED] * 5
    assert limit.take(bucket, 100.0) == REFUSED
    assert limit.take(bucket, 100.125) == REFUSED  # half a token
    assert limit.take(bucket, 100.25) == ALLOWED  # a whole one
    assert limit.take(bucket, 100.25) == REFUSED
    # Ten seconds idle refill the bucket to its size, never beyond.
    assert takes(limit, bucket, 110.0, 6) == [ALLOWED] * 5 + [REFUSED]


def test_a_steady_client_under_the_rate_is_never_refused():
    limit = FrameRateLimit(rate=20, burst=60)
    bucket = Bucket()
    now = 50.0
    for _ in range(10_000):  # 19 frames a second for ~9 minutes
        assert limit.take(bucket, now) == ALLOWED
        now += 1 / 19
    assert bucket.rate_strikes == 0.0


def test_a_reconnect_with_a_burst_of_frames_is_not_refused():
    limit = FrameRateLimit(rate=20, burst=200)
    bucket = Bucket()
    assert takes(limit, bucket, 7.0, 200) == [ALLOWED] * 200


def test_a_clock_going_backwards_refills_nothing_and_breaks_nothing():
    limit = FrameRateLimit(rate=4, burst=3)
    bucket = Bucket()
    assert takes(limit, bucket, 100.0, 3) == [ALLOWED] * 3
    assert limit.take(bucket, 40.0) == REFUSED  # back a minute: no refill, no crash
    assert bucket.rate_stamp == 100.0, "the stamp never moves back"
    assert limit.take(bucket, 100.125) == REFUSED  # nothing refilled for the minute "gained"
    assert limit.take(bucket, 100.25) == ALLOWED
    assert bucket.rate_tokens >= 0.0


def test_refusals_are_strikes_and_too_many_close():
    limit = FrameRateLimit(rate=10, burst=5)
    bucket = Bucket()
    assert takes(limit, bucket, 0.0, 5) == [ALLOWED] * 5
    # A flood at one instant: `burst` refusals, then the close.
    assert takes(limit, bucket, 0.0, 6) == [REFUSED] * 5 + [CLOSE]


def test_strikes_drain_at_the_rate_so_a_client_that_slows_down_is_never_closed():
    limit = FrameRateLimit(rate=10, burst=5)
    bucket = Bucket()
    now = 0.0
    takes(limit, bucket, now, 5)
    assert takes(limit, bucket, now, 5) == [REFUSED] * 5  # one short of the close
    now += 1.0  # a second of silence: the strikes are forgiven, the bucket is full again
    assert takes(limit, bucket, now, 5) == [ALLOWED] * 5
    assert takes(limit, bucket, now, 5) == [REFUSED] * 5
    assert bucket.rate_strikes == 5.0


def test_a_steady_sender_over_twice_the_rate_is_closed_under_it_is_not():
    def run(per_second: float, seconds: float) -> list[int]:
        limit = FrameRateLimit(rate=10, burst=20)
        bucket = Bucket()
        verdicts, now = [], 0.0
        while now < seconds:
            verdicts.append(limit.take(bucket, now))
            if verdicts[-1] == CLOSE:
                break
            now += 1 / per_second
        return verdicts

    slow = run(15, 120)  # over the rate, under twice it: refused a third of the time, kept
    assert CLOSE not in slow and REFUSED in slow
    assert slow[-300:].count(ALLOWED) == pytest.approx(200, abs=2)
    fast = run(30, 120)  # three times the rate: refused, and closed within seconds
    assert fast[-1] == CLOSE
    assert len(fast) < 30 * 5


def test_retry_after_and_description():
    limit = FrameRateLimit(rate=20, burst=200)
    bucket = Bucket()
    assert limit.retry_after(bucket) == 0.05  # (a new bucket: refilled by its first take)
    takes(limit, bucket, 1.0, 200)
    assert limit.retry_after(bucket) == pytest.approx(0.05)
    assert limit.describe() == "at most 20 frames per second, bursts of 200"
    assert FrameRateLimit(0.5, 3).describe() == "at most 0.5 frames per second, bursts of 3"


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.1, 1000.0),
    burst=st.integers(1, 300),
    gaps=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=60),
)
def test_a_refused_frame_sent_again_after_retry_after_ms_is_allowed(rate, burst, gaps):
    """The ``rate_limited`` error's ``retry_after_ms``, after any history of frames: a frame
    sent that many milliseconds after a refusal (nothing in between) finds a token, and one
    sent a millisecond sooner would not have (the figure is not padded), as the clients rely
    on it to resend neither too soon (a strike) nor much too late."""
    limit = FrameRateLimit(rate=rate, burst=burst)
    bucket = Bucket()
    now = 1000.0
    for gap in gaps:
        now += gap
        if limit.take(bucket, now) == ALLOWED:
            continue
        wait_ms = limit.retry_after_ms(bucket)
        assert wait_ms >= 1
        sooner = Bucket()
        sooner.rate_tokens, sooner.rate_strikes, sooner.rate_stamp = (
            bucket.rate_tokens,
            bucket.rate_strikes,
            bucket.rate_stamp,
        )
        if wait_ms > 1:
            assert limit.take(sooner, now + (wait_ms - 1) / 1000) != ALLOWED
        now += wait_ms / 1000 + 1e-6  # (a microsecond: float sums of the clock may fall short)
        assert limit.take(bucket, now) == ALLOWED


def test_retry_after_ms_of_an_empty_bucket_is_one_token_s_time():
    limit = FrameRateLimit(rate=20, burst=10)
    bucket = Bucket()
    takes(limit, bucket, 5.0, 10)
    assert limit.take(bucket, 5.0) == REFUSED
    assert limit.retry_after_ms(bucket) == 50
    assert limit.take(bucket, 5.02) == REFUSED  # 0.4 of a token
    assert limit.retry_after_ms(bucket) == 30
    assert FrameRateLimit(rate=3, burst=1).retry_after_ms(Bucket()) == 334  # rounded up


def test_zero_disables_the_limit():
    assert frame_rate_limit(0, 200) is None
    assert isinstance(frame_rate_limit(20, 200), FrameRateLimit)
    with pytest.raises(ValueError):
        FrameRateLimit(0, 10)
    with pytest.raises(ValueError):
        FrameRateLimit(1, 0)


def test_a_bucket_is_three_slots_of_shared_constants_until_used():
    """What a connection pays for the limit before its first frame: three slots pointing at
    shared floats (the session keeps the same three)."""
    from gateway.session import ClientSession

    assert {"rate_tokens", "rate_strikes", "rate_stamp"} <= set(ClientSession.__slots__)
    a, b = Bucket(), Bucket()
    assert a.rate_stamp is b.rate_stamp is NEVER
    assert a.rate_tokens is b.rate_tokens and a.rate_strikes is b.rate_strikes


# --- configuration ----------------------------------------------------------------------------


def test_flags_and_environment_set_the_limit():
    from gateway.config import load_config

    config = load_config(["--no-auth"], {})
    assert (config.client_rate, config.client_burst) == (20.0, 200)
    assert config.client_burst >= 2 * config.max_subscriptions  # a reconnect is never refused
    config = load_config(["--no-auth", "--client-rate", "2.5"], {"EVENTBUS_CLIENT_BURST": "250"})
    assert (config.client_rate, config.client_burst) == (2.5, 250)
    assert load_config(["--no-auth", "--client-rate", "0"], {}).client_rate == 0


def test_a_burst_below_twice_max_subscriptions_is_refused_unless_the_limit_is_off():
    from gateway.config import ConfigError, GatewayConfig, load_config

    match = "--client-burst must be at least twice --max-subscriptions"
    with pytest.raises(ConfigError, match=match):
        load_config(["--no-auth", "--client-burst", "199"], {})
    with pytest.raises(ConfigError, match="--client-burst"):
        GatewayConfig(no_auth=True, max_subscriptions=10, client_burst=19)
    GatewayConfig(no_auth=True, max_subscriptions=10, client_burst=20)
    GatewayConfig(no_auth=True, max_subscriptions=10, client_burst=1, client_rate=0)
    for bad in (["--client-rate", "-1"], ["--client-burst", "0"]):
        with pytest.raises(ConfigError):
            load_config(["--no-auth", *bad], {})


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.1, 1000.0),
    burst=st.integers(1, 60),
    steps=st.lists(
        st.tuples(
            st.one_of(st.just(0.0), st.floats(0.0, 0.01), st.floats(0.0, 2.0)),
            st.integers(1, 80),
        ),
        min_size=1,
        max_size=60,
    ),
)
def test_never_more_than_burst_plus_rate_times_t_in_any_window(rate, burst, steps):
    """Whatever a client sends and when (``steps``: a pause, then that many frames at once), the
    frames allowed within any window of ``t`` seconds (both ends included) number at most
    ``burst + rate * t``: the gateway's promise to itself (a connection costs it at most that
    much work), checked over every window of the history."""
    limit = FrameRateLimit(rate=rate, burst=burst)
    bucket = Bucket()
    now = 1000.0
    allowed: list[tuple[float, int]] = []  # (instant, frames allowed then)
    for gap, frames in steps:
        now += gap
        count = sum(limit.take(bucket, now) == ALLOWED for _ in range(frames))
        if count:
            allowed.append((now, count))
    for first in range(len(allowed)):
        total = 0
        for last in range(first, len(allowed)):
            total += allowed[last][1]
            window = allowed[last][0] - allowed[first][0]
            # (a millionth of a frame: the refill is computed in floats)
            assert total <= burst + rate * window + 1e-6, (allowed[first], allowed[last], total)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.1, 1000.0),
    burst=st.integers(1, 100),
    slack=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=200),
)
def test_a_client_at_most_at_the_rate_is_never_refused(rate, burst, slack):
    """A client that leaves at least ``1 / rate`` seconds between frames (plus any pause) is
    never refused, from its first frame on, whatever its burst."""
    limit = FrameRateLimit(rate=rate, burst=burst)
    bucket = Bucket()
    now = 1000.0
    for extra in slack:
        assert limit.take(bucket, now) == ALLOWED
        # (a billionth more: 1 / rate in floats, times rate, may fall short of one token)
        now += (1.0 / rate) * (1.0 + extra) * (1 + 1e-9)
    assert bucket.rate_strikes == 0.0
