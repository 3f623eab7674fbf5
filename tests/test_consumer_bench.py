"""Smoke test of the consumer benchmark (``python -m bench.consumer``), so that it cannot rot
unnoticed. The figures are only meaningful from a real run (docs/consumer.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.consumer import main

pytestmark = pytest.mark.slow


def test_consumer_bench_measures_every_figure_and_checks_the_sequence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "consumer.json"
    assert main(["--events", "3000", "--rounds", "1", "--presence", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"resume", "paged", "live", "floor", "resume_presence"}
    for figures in result["summary"].values():
        assert figures["events_per_s"] > 0 and figures["events_per_cpu_s"] > 0
    assert result["events"] == 3000 and result["target_events_per_s"] == 50_000
    assert "| resume |" in capsys.readouterr().out
