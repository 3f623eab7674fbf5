"""Smoke test of the hostile-HTTP flood benchmark (``python -m bench.http_flood``, part of
``make bench``) with 5 clients and 1 s per shape, so that it cannot rot unnoticed. The figures
are only meaningful from a real run (docs/benchmarks.md, "Floods of hostile HTTP requests")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.http_flood import main, shapes

pytestmark = pytest.mark.slow


def test_http_flood_bench_measures_every_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "http_flood.json"
    assert main(["--clients", "5", "--seconds", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"quiet", *shapes(), "parked_heads", "slowloris"}
    for name in shapes():
        assert results[name]["scrapes_per_s"] > 0 and results[name]["events"] > 0, name
    assert results["poll_valid"]["gateway"]["eventbus_polls_total"] > 0
    assert results["huge_headers"]["gateway"]["eventbus_bad_requests_total"] > 0  # 431s
    assert results["parked_heads"]["answer"].startswith("HTTP/1.1 431")
    assert results["slowloris"]["held_s"]["max"] < 15  # dropped at --auth-timeout (10 s)
    assert "| poll_valid |" in capsys.readouterr().out
