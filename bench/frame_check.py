"""The frame check's cost (``python -m bench.frame_check``): what ``schemas.stored`` spends on each
frame the gateway reads from Redis, once per event and pod, and the share of it that the JSON
scan takes (a frame must be JSON to be relayed; docs/benchmarks.md, "The frame check").

Pure CPU in this process, no server: the check of a typical 324-byte ``blocker_resolved`` frame
and of one of ~30 KB (about the largest event), each timed in interleaved rounds with the scan
alone; medians of the rounds.

Then what a resume read from Redis costs to parse (``schemas.history.parse_snapshot_reply``, a
reply of 100 typical entries, as a client 100 events behind reads): every entry checked, against
every entry the same bytes as the frame the pod's resume window holds at its seq, which is not
checked again (docs/architecture.md, "The frame check on resumes"); interleaved rounds, medians.
"""

from __future__ import annotations

import argparse
import timeit
from pathlib import Path
from typing import Any

import msgspec

from bench.common import machine, median, write_json
from schemas.history import parse_snapshot_reply
from schemas.stored import CheckedFrames, ForeignKind, check_frame

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


#: Entries of the resume read timed by :func:`run_read` (a client 100 events behind).
READ_ENTRIES = 100


def _typical(seq: int) -> bytes:
    return FRAMES["typical"].replace(b',"seq":5}', b',"seq":%d}' % seq)


def run_read(rounds: int, calls: int) -> dict[str, Any]:
    """Median µs to parse one resume read's reply of :data:`READ_ENTRIES` typical entries: every
    frame checked, and every frame the window's (the same bytes at the same seq, so skipped)."""
    frames = {seq: _typical(seq) for seq in range(1, READ_ENTRIES + 1)}
    entries = [[b"%d-0" % seq, [b"f", frame, b"t", b"0"]] for seq, frame in frames.items()]
    reply = [b"e1", READ_ENTRIES, 0, entries, b"", b"", b""]
    # The window's frames are other objects of the same bytes, as a read's always are.
    held = {seq: bytes(bytearray(f)) for seq, f in frames.items()}
    window = CheckedFrames("e1", 1, READ_ENTRIES, held.__getitem__)
    full, _ = parse_snapshot_reply(PROJECT, reply)
    assert full == parse_snapshot_reply(PROJECT, reply, window)[0]
    assert len(full.entries) == READ_ENTRIES and full.corrupt_at is None
    number = max(1, calls // READ_ENTRIES)
    checked, known = [], []
    for _ in range(rounds):
        checked.append(timeit.timeit(lambda: parse_snapshot_reply(PROJECT, reply), number=number))
        known.append(
            timeit.timeit(lambda: parse_snapshot_reply(PROJECT, reply, window), number=number)
        )
    return {
        "entries": READ_ENTRIES,
        "all_checked_us": median(checked) / number * 1e6,
        "window_frames_us": median(known) / number * 1e6,
    }


def table(results: dict[str, Any]) -> str:
    lines = ["| frame | the whole check | of which the JSON scan |", "| --- | ---: | ---: |"]
    for name, row in results.items():
        share = row["json_scan_us"] / row["check_us"] * 100
        lines.append(
            f"| {name}, {row['bytes']:,} bytes | {row['check_us']:.2f} µs "
            f"| {row['json_scan_us']:.2f} µs ({share:.0f} %) |"
        )
    return "\n".join(lines)


def read_table(read: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"| a resume read of {read['entries']} typical entries, parsed | µs |",
            "| --- | ---: |",
            f"| every frame checked | {read['all_checked_us']:.1f} |",
            f"| every frame the window's (not checked again) | {read['window_frames_us']:.1f} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frame_check", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run (a second)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    rounds, calls = (3, 2_000) if args.quick else (7, 20_000)
    results = run(rounds, calls)
    read = run_read(rounds, calls)
    print(table(results))
    print()
    print(read_table(read))
    if args.json:
        write_json(
            args.json,
            {"machine": machine(), "rounds": rounds, "results": results, "resume_read": read},
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
