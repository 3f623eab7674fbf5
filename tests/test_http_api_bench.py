"""Smoke test of ``python -m bench.http_api``: both workloads run, publish without errors and
report their figures (the figures themselves are for docs/benchmarks.md, not asserted)."""

from __future__ import annotations

import pytest

from bench import http_api


@pytest.mark.slow
def test_http_api_benchmark_measures_both_workloads(tmp_path) -> None:
    results = http_api.run(runs=1, seconds=1)
    assert results["single"]["requests_per_s"] > 0 and results["single"]["errors"] == 0
    assert results["batch_500"]["events_per_s"] > 0 and results["batch_500"]["errors"] == 0
    report = http_api.table(results)
    assert "requests/s" in report and "events/s" in report
