"""A flood of ``/metrics`` scrapes against a gateway, and what it does to event delivery.

One WebSocket subscriber of project 1 and a publisher sending an event every 10 ms; each event's
delivery latency (publish call to receipt, one clock) is taken in three windows: quiet, with
``--scrapers`` concurrent scrapers each requesting ``/metrics`` in a loop (a separate process,
keep-alive connections, reopened when closed), quiet again. Reports the gateway's CPU (the
supervisor's workers summed with ``--workers``), scrapes/s and latency percentiles.

    python -m bench.scrape_flood                  # one process, 200 scrapers, 10 s windows
    python -m bench.scrape_flood --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import websockets

from publisher import Publisher, issue_token
from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import RedisServer

SECRET = "scrape-flood-secret-0123456789abcdef"

FLOOD = r"""
import asyncio, sys, time
port, n, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
latencies = []

async def scraper():
    end = time.monotonic() + seconds
    reader = writer = None
    while time.monotonic() < end:
        started = time.monotonic()
        if reader is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
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
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                pids.append(int(entry))
    total = 0.0
    for p in pids:
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))] * 1000


async def window(gateway: GatewayProcess, publisher: Publisher, args, flood: bool) -> dict:
    sent: dict[int, float] = {}
    latencies: list[float] = []
    token = issue_token(SECRET, [1], ttl=3600)
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
                *command, str(args.seconds), stdout=subprocess.PIPE
            )
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
        "latency_ms": {q: round(pct(latencies, p), 1) for q, p in (("p50", 0.5), ("p99", 0.99))},
        "latency_max_ms": round(latencies[-1] * 1000, 1),
    }
    if out:
        result["scrapes_per_s"] = round(int(out[0]) / args.seconds)
        result["scrape_ms"] = {
            "p50": round(float(out[1]) * 1000),
            "p99": round(float(out[2]) * 1000),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    extra = ["--workers", str(args.workers)] if args.workers > 1 else []
    with RedisServer() as server, GatewayProcess(server.url, auth_secret=SECRET, args=extra) as gw:
        publisher = Publisher.from_url(server.url)
        try:
            for flood in (False, True, False):
                print(json.dumps(asyncio.run(window(gw, publisher, args, flood))), flush=True)
        finally:
            publisher.close()


if __name__ == "__main__":
    main()
