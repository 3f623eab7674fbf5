"""Smoke test of the frame check benchmark (``python -m bench.frame_check``, part of ``make
bench``), so that it cannot rot unnoticed: the frames it times pass the check, and it writes
what docs/benchmarks.md quotes ("The frame check")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.frame_check import main


def test_frame_check_bench_times_the_check_and_its_json_scan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "frame_check.json"
    assert main(["--quick", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    results = written["results"]
    assert set(results) == {"typical", "largest"}
    assert results["typical"]["bytes"] < 400 < 30_000 < results["largest"]["bytes"]
    for row in results.values():
        assert 0 < row["json_scan_us"] and 0 < row["check_us"]
    read = written["resume_read"]
    assert read["entries"] == 100 and 0 < read["window_frames_us"] and 0 < read["all_checked_us"]
    printed = capsys.readouterr().out
    assert "| typical, 324 bytes |" in printed
    assert "| every frame the window's (not checked again) |" in printed
