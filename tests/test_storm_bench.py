"""Smoke test of the reconnect-storm benchmark (``make bench``), so that it cannot rot unnoticed:
every server and scenario is measured (the authenticated one against a gateway that verifies a
token per client), every resumed client is checked seq by seq, and the gateway's windows answer
the warm storms without history reads. Figures only mean something
from a full run on a quiet machine (docs/benchmarks.md)."""

from __future__ import annotations

import pytest

from bench.common import BenchRedis
from bench.loadgen import raise_nofile
from bench.storm import SCENARIOS, SERVERS, Params, run_server, table

TINY = Params(clients=60, projects=3, missed=7, repeats=1, inflight=32, workers=1)


@pytest.fixture(scope="module")
def bench_redis():
    raise_nofile()
    redis = BenchRedis(None)
    yield redis
    redis.close()


def test_every_storm_is_measured_checked_and_reported(bench_redis) -> None:
    logged: list[str] = []
    results = {name: run_server(name, bench_redis, TINY, logged.append) for name in SERVERS}
    assert any(scenario.auth for scenario in SCENARIOS)
    for name in SERVERS:
        for scenario in SCENARIOS:
            storm = results[name][scenario.name]["storms"][0]
            assert storm["exact"] == storm["clients"] == TINY.clients, (name, scenario, storm)
            assert results[name][scenario.name]["median"]["all_exact"]
    for scenario, warm, _, _ in SCENARIOS:
        reads = results["gateway"][scenario]["median"]["history_reads"]
        # Warm: the windows answer every resume. Cold: one baseline and one fill per project.
        assert reads == 0 if warm else reads <= 2 * TINY.projects, (scenario, reads)
        assert results["no window"][scenario]["median"]["history_reads"] >= TINY.clients
    text = table(results, TINY)
    assert "warm, jitter 0.5 s" in text and "warm, authenticated" in text
    assert "NOT EXACT" not in text
