"""The frame check's cost (``python -m bench.frame_check``): what ``schemas.stored`` spends on each
frame the gateway reads from Redis, once per event and pod, and the share of it that the JSON
scan takes (a frame must be JSON to be relayed; docs/benchmarks.md, "The frame check").

Pure CPU in this process, no server: the check of a typical 324-byte ``blocker_resolved`` frame
and of one of ~30 KB (about the largest event), each timed in interleaved rounds with the scan
alone; medians of the rounds.
"""

from __future__ import annotations

import argparse
import timeit
from pathlib import Path
from typing import Any

import msgspec

from bench.common import machine, median, write_json
from schemas.stored import ForeignKind, check_frame

PROJECT = 1
SEQ = 5
#: The scan the check makes (as schemas.stored makes it): a validating decode that builds nothing.
JSON_SCAN = msgspec.json.Decoder(msgspec.Raw)


def _frame(answer_bytes: int) -> bytes:
    answer = b"Use JWT " + b"x" * answer_bytes
    return (
        b'{"type":"blocker_resolved","project_id":1,"blocker_id":123,"answer":"%s",'
        b'"resolved_at":"2026-12-07T10:00:00Z","seq":5}' % answer
    )


FRAMES = {"typical": _frame(200), "largest": _frame(30_000)}


def run(rounds: int, calls: int) -> dict[str, Any]:
    """Median µs per call of the whole check and of the scan alone, for each frame."""
    results: dict[str, Any] = {}
    for name, frame in FRAMES.items():
        check_frame(frame, ForeignKind.CHANNEL_MESSAGE, PROJECT, SEQ)  # it passes
        number = max(1, calls * len(FRAMES["typical"]) // len(frame))
        whole, scan = [], []
        for _ in range(rounds):
            whole.append(
                timeit.timeit(
                    lambda f=frame: check_frame(f, ForeignKind.CHANNEL_MESSAGE, PROJECT, SEQ),
                    number=number,
                )
            )
            scan.append(timeit.timeit(lambda f=frame: JSON_SCAN.decode(f), number=number))
        results[name] = {
            "bytes": len(frame),
            "check_us": median(whole) / number * 1e6,
            "json_scan_us": median(scan) / number * 1e6,
        }
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["| frame | the whole check | of which the JSON scan |", "| --- | ---: | ---: |"]
    for name, row in results.items():
        share = row["json_scan_us"] / row["check_us"] * 100
        lines.append(
            f"| {name}, {row['bytes']:,} bytes | {row['check_us']:.2f} µs "
            f"| {row['json_scan_us']:.2f} µs ({share:.0f} %) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frame_check", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run (a second)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    rounds, calls = (3, 2_000) if args.quick else (7, 20_000)
    results = run(rounds, calls)
    print(table(results))
    if args.json:
        write_json(args.json, {"machine": machine(), "rounds": rounds, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
