"""Smoke test of the scrape-flood benchmark (``python -m bench.scrape_flood``, part of
``make bench``) with 5 scrapers and 1 s windows, so that it cannot rot unnoticed. The figures
are only meaningful from a real run (docs/benchmarks.md, "Scrape floods")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.scrape_flood import main

pytestmark = pytest.mark.slow


def test_scrape_flood_bench_measures_one_process_and_a_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scrape_flood.json"
    assert main(["--scrapers", "5", "--seconds", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [run["workers"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        quiet, flood, after = run["windows"]
        assert not quiet["flood"] and flood["flood"] and not after["flood"]
        assert flood["scrapes_per_s"] > 0 and "scrapes_per_s" not in quiet
        assert all(w["events"] > 0 and w["latency_ms"]["p50"] > 0 for w in run["windows"])
    table = capsys.readouterr().out
    assert "| 1 process |" in table and "| 2 workers |" in table
