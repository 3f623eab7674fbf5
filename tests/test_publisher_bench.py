"""Smoke test of the publisher benchmark (``make bench``), so that it cannot rot unnoticed. The
figures themselves are only meaningful from a full run on a quiet machine (docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import MODULES
from bench.__main__ import main as bench_main
from bench.common import median, percentile
from bench.publisher import Params, run, table

TINY = Params(rounds=2, latency_samples=50, warmup=20, batch=600, batches=1)


def test_publisher_bench_measures_every_figure() -> None:
    results = run(TINY)
    summary = results["summary"]
    for key in (
        "evalsha_p50_us",
        "evalsha_p99_us",
        "publish_p50_us",
        "publish_p99_us",
        "publish_many_events_per_s",
        "pipelined_floor_events_per_s",
    ):
        assert summary[key] > 0, key
    assert summary["evalsha_p50_us"] <= summary["evalsha_p99_us"]
    assert len(results["rounds"]) == 2
    assert set(results["targets"]) >= {"latency_met", "throughput_met"}
    text = table(results)
    assert "`publish_many`" in text and "bare `EVALSHA`" in text


def test_python_m_bench_runs_the_listed_modules_and_writes_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert MODULES[0] == "bench.publisher"
    monkeypatch.setattr("bench.publisher.QUICK", TINY)
    assert bench_main(["--quick", "--only", "publisher", "--results-dir", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "publisher.json").read_text())
    assert written["params"]["batch"] == TINY.batch
    assert not list(tmp_path.glob("*.tmp"))


def test_statistics_helpers() -> None:
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 2, 3]) == 2.5
