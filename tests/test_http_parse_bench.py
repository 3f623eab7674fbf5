"""Smoke test of the HTTP API's body-parse benchmark (``python -m bench.http_parse``, part of
``make bench``): every body it times is a valid request, and it writes what docs/benchmarks.md
quotes ("The HTTP API's body check")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.http_parse import main


def test_http_parse_bench_times_ordinary_and_hostile_bodies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "http_parse.json"
    assert main(["--quick", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {
        "one ordinary event",
        "500 ordinary events",
        "tiny unknown arrays",
        "nested unknown arrays",
        "unknown keys",
    }
    assert all(row["ms"] > 0 and row["bytes"] > 0 for row in results.values())
    assert "| 500 ordinary events |" in capsys.readouterr().out
