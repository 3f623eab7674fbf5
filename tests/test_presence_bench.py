"""Smoke test of the presence benchmark (``python -m bench.presence``) through real gateway
processes, with 40 members instead of 1,000, so that it cannot rot unnoticed. The figures are
only meaningful from a real run (docs/presence.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.presence
from bench.presence import main

pytestmark = pytest.mark.slow


def test_presence_bench_through_gateways_converges_and_sees_the_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench.presence, "MEMBERS", 40)
    out = tmp_path / "presence.json"
    assert main(["--seconds", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "gateway processes" and result["members"] == 40
    convergence = result["convergence_s"]
    assert convergence["measured"] > 0 and convergence["not_converged"] == 0
    assert 0 < result["deliveries_per_s"] <= result["deliveries_bound_per_s"] * 1.2
    assert result["kill"]["members"] == 20 and result["kill"]["gone_after_s"] < 30
    assert "| convergence, every view |" in capsys.readouterr().out
