"""A flood of ``/metrics`` scrapes against a gateway, and what it does to event delivery.

One WebSocket subscriber of project 1 and a publisher sending an event every 10 ms; each event's
delivery latency (publish call to receipt, one clock) is taken in three windows: quiet, with
``--scrapers`` concurrent scrapers each requesting ``/metrics`` in a loop (a separate process,
keep-alive connections, reopened when closed), quiet again. Reports the gateway's CPU (the
supervisor's workers summed with ``--workers``), scrapes/s and latency percentiles, for one
process and for a group of two workers side by side in one run (``make bench`` runs it).

    python -m bench.scrape_flood                  # 1 process, then 2 workers; 200 scrapers, 10 s
    python -m bench.scrape_flood --workers 2      # only a group of two
    python -m bench.scrape_flood --quick          # 50 scrapers, 3 s windows
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import websockets

from bench.common import RESULTS_DIR, child_pids, machine, percentile, write_json
from bench.gateway import proc_cpu
from publisher import Publisher, issue_token
from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import RedisServer

SECRET = "scrape-flood-secret-0123456789abcdef"

FLOOD = r"""
import asyncio, sys, time
port, n, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
# The request (on stdin), "{n}" in it replaced by a number counting requests (project ids).
template = sys.stdin.buffer.read() or b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
latencies = []
sent = 0

async def scraper():
    global sent
    end = time.monotonic() + seconds
    reader = writer = None
    while time.monotonic() < end:
        started = time.monotonic()
        if reader is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent += 1
        writer.write(template.replace(b"{n}", str(sent).encode()))
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                None,
            )
            if length is None:  # a stream (SSE): dropped once its head has come
                writer.close()
                reader = writer = None
                latencies.append(time.monotonic() - started)
                continue
            await reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            reader = writer = None
            continue
        if b"connection: close" in head.lower():
            writer.close()
            reader = writer = None
        latencies.append(time.monotonic() - started)

async def main():
    await asyncio.gather(*(scraper() for _ in range(n)), return_exceptions=True)

asyncio.run(main())
latencies.sort()
print(len(latencies), latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)])
"""


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its live children (a --workers supervisor's workers)."""
    return sum(proc_cpu(p) for p in [pid, *child_pids(pid)])


async def window(
    gateway: GatewayProcess,
    publisher: Publisher,
    args,
    flood: bool,
    request: str | None = None,
    token: str | None = None,
) -> dict:
    """One window: a subscriber's delivery latency, the gateway's CPU and, with ``flood``,
    ``args.scrapers`` clients sending ``request`` (default: ``GET /metrics``) in a loop."""
    sent: dict[int, float] = {}
    latencies: list[float] = []
    token = token or issue_token(SECRET, [1], ttl=3600)
    async with websockets.connect(gateway.ws_url, max_size=2**22) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token}))
        await ws.recv()
        await ws.send(json.dumps({"type": "subscribe", "project_id": 1}))
        await ws.recv()
        stop = threading.Event()

        def publish() -> None:
            n = 0
            while not stop.wait(0.01):
                n += 1
                started = time.monotonic()
                sent[publisher.blocker_resolved(1, blocker_id=n, answer="ok").seq] = started

        thread = threading.Thread(target=publish)
        thread.start()
        scrapers = None
        if flood:
            command = [sys.executable, "-c", FLOOD, str(gateway.port), str(args.scrapers)]
            scrapers = await asyncio.create_subprocess_exec(
                *command, str(args.seconds), stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            scrapers.stdin.write((request or "").encode())  # (a huge request is no argument)
            await scrapers.stdin.drain()
            scrapers.stdin.close()
        cpu0, t0 = cpu_seconds(gateway.pid), time.monotonic()
        end = t0 + args.seconds
        while time.monotonic() < end:
            try:
                message = json.loads(await asyncio.wait_for(ws.recv(), 1))
            except TimeoutError:
                continue
            if message.get("seq") in sent:
                latencies.append(time.monotonic() - sent[message["seq"]])
        stop.set()
        thread.join()
        cpu1, t1 = cpu_seconds(gateway.pid), time.monotonic()
        out = (await scrapers.communicate())[0].split() if scrapers else []
    latencies.sort()
    result = {
        "flood": flood,
        "gateway_cores": round((cpu1 - cpu0) / (t1 - t0), 2),
        "events": len(latencies),
        "latency_ms": {f"p{q}": round(percentile(latencies, q) * 1000, 1) for q in (50, 99)},
        "latency_max_ms": round(latencies[-1] * 1000, 1),
    }
    if out:
        result["scrapes_per_s"] = round(int(out[0]) / args.seconds)
        result["scrape_ms"] = {
            "p50": round(float(out[1]) * 1000),
            "p99": round(float(out[2]) * 1000),
        }
    return result


def run(workers: int, args: argparse.Namespace) -> dict:
    """Three windows (quiet, flood, quiet) against a fresh gateway of ``workers`` processes."""
    extra = ["--workers", str(workers)] if workers > 1 else []
    with RedisServer() as server, GatewayProcess(server.url, auth_secret=SECRET, args=extra) as gw:
        publisher = Publisher.from_url(server.url)
        try:
            windows = [asyncio.run(window(gw, publisher, args, f)) for f in (False, True, False)]
        finally:
            publisher.close()
    for result in windows:
        print(json.dumps({"workers": workers, **result}), file=sys.stderr, flush=True)
    return {"workers": workers, "windows": windows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 scrapers, 3 s windows")
    parser.add_argument("--scrapers", type=int, help="concurrent scrapers (default 200)")
    parser.add_argument("--seconds", type=float, help="seconds per window (default 10)")
    parser.add_argument("--workers", type=int, help="only this many workers (default: 1, then 2)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "scrape_flood.json")
    args = parser.parse_args(argv)
    args.scrapers = args.scrapers or (50 if args.quick else 200)
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    runs = [run(n, args) for n in ([args.workers] if args.workers else [1, 2])]
    print(f"scrape flood ({args.scrapers} scrapers, {args.seconds:g} s windows)")
    print("| gateway | scrapes/s | gateway cores | delivery p50 | delivery p99 | quiet p99 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for result in runs:
        quiet, flood, _ = result["windows"]
        name = "1 process" if result["workers"] == 1 else f"{result['workers']} workers"
        print(
            f"| {name} | {flood.get('scrapes_per_s', 0):,} | {flood['gateway_cores']} "
            f"| {flood['latency_ms']['p50']} ms | {flood['latency_ms']['p99']} ms "
            f"| {quiet['latency_ms']['p99']} ms |"
        )
    write_json(args.json, {"machine": machine(), "scrapers": args.scrapers, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
