"""HTTP publish API throughput: single-event requests and 500-event arrays, with ``wrk``.

The API (``python -m publisher.http_api serve``) runs pinned to one core, against a private
``redis-server`` pinned to the other; ``wrk`` shares the second core with Redis (on a 2-core
machine there is no third). Each figure is the median of ``--runs`` runs of ``--seconds`` each.

Targets (issue 13): >= 5,000 single-event requests/s on one core with keep-alive, and >= 50,000
events/s in arrays of 500.

    python -m bench.http_api            # 3 runs x 5 s of each workload
    python -m bench.http_api --quick    # 1 run x 2 s
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import BENCH_CPU, REDIS_CPU, BenchRedis, free_port, machine, median, write_json
from publisher.http_api.core import hash_key

EVENT = {
    "type": "blocker_expired",
    "blocker_id": 1,
    "task_id": 2,
    "expired_at": "2026-12-03T08:00:00Z",
}
KEY = "ebk_benchmark-key"


def _wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("bench.http_api: installing wrk with apt-get", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "wrk"],
            check=False,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        if not shutil.which("wrk"):
            subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", "wrk"],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
            )
        return shutil.which("wrk") or "wrk"
    raise SystemExit("bench.http_api needs wrk (apt-get install wrk)")


def _script(directory: Path, name: str, body: str) -> Path:
    path = directory / f"{name}.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {KEY}"\n'
    )
    return path


def _run_wrk(wrk: str, script: Path, url: str, connections: int, seconds: float) -> dict:
    pin = ["taskset", "-c", str(REDIS_CPU)] if shutil.which("taskset") else []
    out = subprocess.run(
        [
            *pin,
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {
        "requests_per_s": rate,
        "p50_ms": float(p50.group(1)) * scale[p50.group(2)] if p50 else None,
        "errors": int(non_2xx.group(1)) if non_2xx else 0,
    }


@contextlib.contextmanager
def _api(redis_url: str, keys_file: Path):
    port = free_port()
    pin = ["taskset", "-c", str(BENCH_CPU)] if shutil.which("taskset") else []
    process = subprocess.Popen(
        [
            *pin,
            sys.executable,
            "-m",
            "publisher.http_api",
            "serve",
            "--keys-file",
            str(keys_file),
            "--port",
            str(port),
            "--redis-url",
            redis_url,
            "--rate",
            "1e9",
            "--burst",
            "1000000000",
        ],
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("the HTTP publish API did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def run(runs: int, seconds: float) -> dict:
    wrk = _wrk()
    results: dict = {"machine": machine(), "runs": runs, "seconds": seconds}
    with tempfile.TemporaryDirectory() as tmp, BenchRedis() as redis_server:
        directory = Path(tmp)
        keys_file = directory / "keys.json"
        keys_file.write_text(
            json.dumps({"keys": [{"id": "bench", "sha256": hash_key(KEY), "projects": "*"}]})
        )
        single = _script(directory, "single", json.dumps(EVENT))
        batch = _script(directory, "batch", json.dumps([EVENT] * 500))
        with _api(redis_server.url, keys_file) as base:
            singles = [
                _run_wrk(wrk, single, f"{base}/v1/projects/1/events", 32, seconds)
                for _ in range(runs)
            ]
            batches = [
                _run_wrk(wrk, batch, f"{base}/v1/projects/2/events", 4, seconds)
                for _ in range(runs)
            ]
    results["single"] = {
        "requests_per_s": median([r["requests_per_s"] for r in singles]),
        "p50_ms": median([r["p50_ms"] for r in singles if r["p50_ms"] is not None] or [0]),
        "errors": sum(r["errors"] for r in singles),
        "runs": singles,
    }
    results["batch_500"] = {
        "events_per_s": 500 * median([r["requests_per_s"] for r in batches]),
        "errors": sum(r["errors"] for r in batches),
        "runs": batches,
    }
    return results


def table(results: dict) -> str:
    single, batch = results["single"], results["batch_500"]
    return "\n".join(
        [
            "| workload | median | target | errors |",
            "| --- | --- | --- | --- |",
            f"| single-event POST, 32 keep-alive connections | "
            f"{single['requests_per_s']:,.0f} requests/s (p50 {single['p50_ms']:.1f} ms) | "
            f">= 5,000/s: {'met' if single['requests_per_s'] >= 5000 else 'missed'} | "
            f"{single['errors']} |",
            f"| 500-event arrays, 4 connections | {batch['events_per_s']:,.0f} events/s | "
            f">= 50,000/s: {'met' if batch['events_per_s'] >= 50000 else 'missed'} | "
            f"{batch['errors']} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http_api", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="1 run x 2 s")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    runs, seconds = (1, 2.0) if args.quick else (args.runs, args.seconds)
    results = run(runs, seconds)
    print()
    print("HTTP publish API")
    print(table(results))
    if args.json:
        write_json(args.json, results)
    return 0 if not (results["single"]["errors"] or results["batch_500"]["errors"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
