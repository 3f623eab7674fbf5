"""Shared pieces of the benchmarks: a private pinned ``redis-server``, CPU pinning, statistics and
result files.

Every benchmark runs against its own ``redis-server`` on a free port (never the machine's Redis
on 6379), without persistence. With two or more CPUs the benchmark process is pinned to one core
and redis-server to another, so that "one core" figures mean one core for the measured code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from examples.dashboard.redis_server import PrivateRedis, free_port

__all__ = [
    "BENCH_CPU",
    "REDIS_CPU",
    "RESULTS_DIR",
    "BenchGateway",
    "BenchRedis",
    "child_pids",
    "free_port",
    "machine",
    "median",
    "percentile",
    "pin_self",
    "pinning_available",
    "write_json",
]

#: Core of the benchmark process, and of redis-server, when at least two are available.
BENCH_CPU = 0
REDIS_CPU = 1
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# The CPUs this process may use, before any pinning below narrows them down.
_USABLE_CPUS: frozenset[int] = (
    frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
)


def pinning_available() -> bool:
    """True when this process may be pinned to BENCH_CPU and redis-server to REDIS_CPU."""
    return hasattr(os, "sched_setaffinity") and {BENCH_CPU, REDIS_CPU} <= _USABLE_CPUS


@contextlib.contextmanager
def pin_self(cpu: int = BENCH_CPU) -> Iterator[bool]:
    """Pin the calling process to ``cpu`` for the block (no-op without affinity support)."""
    if not pinning_available():
        yield False
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield True
    finally:
        os.sched_setaffinity(0, before)


class BenchRedis(PrivateRedis):
    """A private ``redis-server`` (started at once), pinned to ``cpu`` if possible."""

    def __init__(self, cpu: int | None = REDIS_CPU, *extra_args: str) -> None:
        # A pub/sub channel nobody reads must not hold messages; nobody subscribes here.
        super().__init__(None, "--client-output-buffer-limit", "pubsub 0 0 0", *extra_args)
        self.pinned = cpu is not None and pinning_available()

        def pin() -> None:  # in the child before exec, so every redis thread inherits it
            if self.pinned:
                os.sched_setaffinity(0, {cpu})

        try:
            self.start(preexec_fn=pin)
        except (RuntimeError, TimeoutError) as exc:
            self.close()
            raise SystemExit(f"redis-server did not start: {exc}") from None


class BenchGateway:
    """``python -m gateway`` with ``args`` (auth flags included), on ``REDIS_CPU`` beside Redis when
    there are two cores, started and ready (``GET /readyz``) when constructed."""

    def __init__(self, redis_url: str, *args: str) -> None:
        self.port = free_port()
        cmd = [
            sys.executable, "-m", "gateway", "--log-level", "warning", "--host", "127.0.0.1",
            "--port", str(self.port), "--redis-url", redis_url, *args,
        ]  # fmt: skip

        def pin() -> None:
            if hasattr(os, "sched_setaffinity") and REDIS_CPU in os.sched_getaffinity(0):
                os.sched_setaffinity(0, {REDIS_CPU})

        root = Path(__file__).resolve().parents[1]
        self.proc = subprocess.Popen(cmd, cwd=root, preexec_fn=pin, stdout=subprocess.DEVNULL)
        self.url = f"ws://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise SystemExit("the gateway did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, and wait for the process to be gone."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        """SIGTERM (the gateway drains), SIGKILL after 20 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def child_pids(pid: int) -> list[int]:
    """The live child processes of ``pid`` (a ``--workers`` supervisor's workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        # Other work on the machine while measuring (1-minute load average at the end).
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (``*.tmp`` then rename: readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
