"""``--workers``: deliveries/s with 1 and with 2 gateway workers on one port, side by side.

The same load in both runs: ``--clients`` WebSocket subscribers over ``--projects`` projects
(raw-socket load generator, :mod:`bench.loadgen`, two processes), and the real publisher keeping
16 events per subscriber in flight (:class:`bench.gateway.Pump`), so the gateway delivers as fast
as it can. Each figure is the median of 3 windows of 3 s after a 2 s warm-up.

On the 2-core machine of this project the comparison is honest only with that said: one worker
is pinned to core 0 while the load generator, Redis and the publisher share core 1; two workers
have both cores and share them with the load generator, Redis and the publisher. The report
gives each side's CPU, so the ceiling the load generator sets is visible.

    python -m bench.workers            # 1 vs 2 workers, 2,000 clients over 20 projects
    python -m bench.workers --quick    # 500 clients, shorter windows
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.common import BenchRedis, child_pids, free_port, machine, write_json
from bench.gateway import Pump, proc_cpu
from bench.loadgen import LoadGen, raise_nofile
from publisher import Publisher

ROOT = Path(__file__).resolve().parent.parent


def _sockets(pid: int) -> int:
    count = 0
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    count += 1
            except OSError:
                continue
    except OSError:
        pass
    return count


class Group:
    """``python -m gateway --workers N`` (N = 1: a plain gateway pinned to core 0)."""

    def __init__(self, workers: int, redis_url: str) -> None:
        self.workers = workers
        self.port = free_port()
        cmd = [
            sys.executable, "-m", "gateway", "--no-auth", "--log-level", "warning",
            "--host", "127.0.0.1", "--port", str(self.port), "--redis-url", redis_url,
            "--workers", str(workers),
        ]  # fmt: skip
        if workers == 1 and len(os.sched_getaffinity(0)) >= 2:
            cmd = ["taskset", "-c", "0", *cmd]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit("the gateway group did not become ready") from None
                time.sleep(0.1)

    def pids(self) -> list[int]:
        """The processes that serve clients: the workers, or the gateway itself."""
        if self.workers == 1:
            return [self.proc.pid]
        return child_pids(self.proc.pid)

    def cpu(self) -> float:
        return sum(proc_cpu(pid) for pid in self.pids())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(workers: int, redis: BenchRedis, clients: int, projects: int, quick: bool) -> dict:
    redis.client().flushall()
    publisher = Publisher.from_url(redis.url)
    group = Group(workers, redis.url)
    loadgen = LoadGen(
        "127.0.0.1", group.port, workers=2, sources=[f"127.0.0.{i}" for i in range(1, 9)]
    )
    try:
        specs = [(1 + i % projects, None, None) for i in range(clients)]
        connected = loadgen.connect(specs, inflight=200)
        spread = [_sockets(pid) for pid in group.pids()]
        pump = Pump(publisher, loadgen)
        window, warmup = (1.5, 1.0) if quick else (3.0, 2.0)
        pump.run_until(time.monotonic() + warmup, 16)
        rates, cpu_server, cpu_loadgen = [], [], []
        for _ in range(3):
            t0, f0 = time.monotonic(), loadgen.frames
            s0 = group.cpu()
            l0 = sum(proc_cpu(p.pid) for p in loadgen.procs)
            pump.run_until(t0 + window, 16)
            elapsed = time.monotonic() - t0
            rates.append((loadgen.frames - f0) / elapsed)
            cpu_server.append((group.cpu() - s0) / elapsed)
            cpu_loadgen.append((sum(proc_cpu(p.pid) for p in loadgen.procs) - l0) / elapsed)
        settled = pump.settle()
        return {
            "workers": workers,
            "clients": connected["clients"],
            "failed": connected["failed"],
            "sockets_per_worker": spread,
            "deliveries_per_s": statistics.median(rates),
            "windows": [round(r) for r in rates],
            "server_cores_busy": round(statistics.median(cpu_server), 2),
            "loadgen_cores_busy": round(statistics.median(cpu_loadgen), 2),
            "settled": settled,
        }
    finally:
        loadgen.quit()
        group.stop()
        publisher.close()


def table(results: dict) -> str:
    rows = [
        "| workers | deliveries/s (median) | gateway cores busy | load generator cores busy "
        "| sockets per worker |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results["runs"]:
        rows.append(
            f"| {r['workers']} | {r['deliveries_per_s']:,.0f} | {r['server_cores_busy']} | "
            f"{r['loadgen_cores_busy']} | {r['sockets_per_worker']} |"
        )
    one, two = results["runs"][0]["deliveries_per_s"], results["runs"][1]["deliveries_per_s"]
    rows.append("")
    rows.append(f"2 workers / 1 worker: {two / one:.2f}x")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.workers", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--projects", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    clients = args.clients or (500 if args.quick else 2000)
    raise_nofile()
    results: dict = {"machine": machine(), "clients": clients, "projects": args.projects}
    with BenchRedis(cpu=None) as redis:
        results["runs"] = [
            measure(workers, redis, clients, args.projects, args.quick) for workers in (1, 2)
        ]
    print()
    print("Gateway workers")
    print(table(results))
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
