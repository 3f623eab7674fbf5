"""Smoke test of the density benchmark (``make bench``): connections are counted, memory is
measured, and one event reaches every subscriber, dated by its arrival. The figures only mean
something from a full run (docs/benchmarks.md)."""

from __future__ import annotations

from bench.common import BenchRedis
from bench.density import measure
from bench.loadgen import raise_nofile


def test_idle_connections_memory_and_one_event_to_all() -> None:
    raise_nofile()
    redis = BenchRedis(None)
    try:
        result = measure(
            redis,
            200,
            workers=1,
            inflight=64,
            log=lambda _: None,
            idle_seconds=0.5,
            gateway_args=["--ping-interval=0.1"],  # passed on: several ping rounds while idle
        )
    finally:
        redis.close()
    assert result["clients"] == 200 and result["failed"] == 0
    assert result["subscribers"] == 201  # and the warm-up client
    assert result["fanout_received"] == 201  # every subscriber got the event, dated
    assert 0 < result["fanout_last_s"] < 30
    assert result["fanout_written_s"] is not None
    assert result["connects_per_s"] > 0 and result["rss_after_mib"] > 0
    # CPU time is read in clock ticks (10 ms): a half-second idle with 200 connections can
    # round to zero, so only "measured and below two cores" holds on every run.
    assert result["idle_core"] is not None and 0 <= result["idle_core"] < 2
