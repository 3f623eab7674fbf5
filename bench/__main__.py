"""``python -m bench`` (``make bench``): run every benchmark that exists, in a fixed order.

Each module of :data:`MODULES` that is present runs in turn (see :mod:`bench` for the interface);
a missing one is skipped with a note. Results are written as JSON to ``bench/results/<name>.json``
and each module prints its own summary table for ``docs/benchmarks.md``.

    python -m bench                    # everything, full runs
    python -m bench --quick            # smoke runs
    python -m bench --only publisher   # one benchmark
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from pathlib import Path

from bench.common import RESULTS_DIR

#: Benchmarks in the order they run. ``bench.gateway`` may not exist yet: it is skipped then.
MODULES = [
    "bench.publisher",
    "bench.gateway",
    "bench.http_api",
    "bench.outbox",
    "bench.consumer",
    "bench.workers",
    "bench.storm",
    "bench.density",
    "bench.sse",
    "bench.presence",
    "bench.scrape_flood",
    "bench.http_flood",
    "bench.frame_check",
    "bench.http_parse",
]


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def main(argv: list[str] | None = None) -> int:
    names = [m.rpartition(".")[2] for m in MODULES]
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke runs")
    parser.add_argument(
        "--only", action="append", choices=names, metavar="NAME", help=f"one of {names}"
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where to write <name>.json (default: bench/results)",
    )
    args = parser.parse_args(argv)
    status = 0
    for module, name in zip(MODULES, names, strict=True):
        if args.only and name not in args.only:
            continue
        if not _exists(module):
            print(f"bench: {module} not found, skipped", file=sys.stderr)
            continue
        bench_argv = ["--json", str(args.results_dir / f"{name}.json")]
        if args.quick:
            bench_argv.insert(0, "--quick")
        print(f"bench: running {module} {' '.join(bench_argv)}", file=sys.stderr, flush=True)
        started = time.monotonic()
        code = importlib.import_module(module).main(bench_argv)
        elapsed = time.monotonic() - started
        print(f"bench: {module} finished in {elapsed:.0f} s (exit {code})", file=sys.stderr)
        status = status or int(code or 0)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
