"""What a request body costs the HTTP API's event loop to check (``python -m bench.http_parse``):
``publisher.http_api.core.parse_events`` on ordinary bodies and on the bodies a key holder
could send to spend the API's time (docs/http-publish.md, "What a request may hold").

Pure CPU in this process, no server: each body parsed in interleaved rounds, the best round per
body (the event loop is held for exactly one parse; the best is what the parse costs, the rest
is this VM's noise). A hostile body is one event whose field the contract does not know holds
millions of tiny values, or hundreds of thousands of keys; an array of 500 ordinary events is
the largest request a publisher normally sends.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.common import machine, write_json
from publisher.http_api.core import parse_events

EVENT = {
    "type": "agent_resumed",
    "agent_id": "agent-7",
    "task_id": 42,
    "blocker_id": 9,
    "resumed_at": "2026-12-07T10:00:00Z",
}


def bodies(scale: float) -> dict[str, bytes]:
    """The bodies timed, the hostile ones ``scale`` times their full size (1: ~2-5 MB)."""

    def count(n: int) -> int:
        return max(1, int(n * scale))

    return {
        "one ordinary event": json.dumps(EVENT).encode(),
        "500 ordinary events": json.dumps([EVENT] * 500).encode(),
        "tiny unknown arrays": json.dumps(
            {**EVENT, "x": [["a"] for _ in range(count(700_000))]}
        ).encode(),
        "nested unknown arrays": json.dumps(
            {**EVENT, "x": [[[[[[[1]]]]]]] * count(150_000)}
        ).encode(),
        "unknown keys": json.dumps(
            {**EVENT, **{f"k{i}": i for i in range(count(300_000))}}
        ).encode(),
    }


def run(rounds: int, scale: float) -> dict[str, Any]:
    """Best ms per parse of each body, and its size; every body parses (or is refused) alike."""
    timed = bodies(scale)
    best = {name: float("inf") for name in timed}
    for _ in range(rounds):
        for name, body in timed.items():
            calls = 200 if len(body) < 100_000 else 1
            started = time.perf_counter()
            for _ in range(calls):
                parse_events(body, 1, 500)  # (every body here is a valid request)
            best[name] = min(best[name], (time.perf_counter() - started) / calls)
    return {name: {"bytes": len(timed[name]), "ms": best[name] * 1e3} for name in timed}


def table(results: dict[str, Any]) -> str:
    lines = ["| body | bytes | parse_events (best) |", "| --- | ---: | ---: |"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['bytes']:,} | {row['ms']:.3f} ms |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_parse", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run (small bodies)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    rounds, scale = (1, 0.01) if args.quick else (3, 1.0)
    results = run(rounds, scale)
    print(table(results))
    if args.json:
        write_json(args.json, {"machine": machine(), "rounds": rounds, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
