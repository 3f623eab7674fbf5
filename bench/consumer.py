"""Consumer benchmark: events/s a :class:`consumer.Consumer` receives and decodes on one core.

A private ``redis-server`` and a ``python -m gateway --no-auth`` share core 1; the consumer (this
process) runs on core 0. Three measurements, each over ``N`` events of one project:

* ``resume``: a backlog of ``N`` events is published with ``publish_many``; the consumer starts
  at the beginning of the history and the gateway replays it (``--max-replay`` raised to ``N``).
* ``paged``: the same backlog from a gateway with the default ``--max-replay`` (1,000): the
  consumer catches it up page by page from the HTTP polling endpoint, then goes live.
* ``live``: the consumer follows the project live while a publisher process (on core 1) publishes
  ``N`` events in bursts of 1,000 with ``publish_many``, as fast as it can.
* ``floor``: a bare ``websockets`` client receiving the same replay without decoding anything:
  what the transport alone costs this process, for reference.
* ``resume_presence`` (with ``--presence``): ``resume`` while the consumer also reads the
  presence of another project (read for presence only): each frame's beginning is compared with
  how that project's events begin (those have their header read, never their body), and the
  rest are decoded as ever. Run right after ``resume`` in the same round, so the two compare.

Each figure is ``N`` divided by the time from the first item to the ``N``-th (wall clock), and by
the CPU time this process used meanwhile (``events per CPU-second``: the figure that does not
depend on what else the machine runs). Every run checks that the items were exactly seq 1..N.

    python -m bench.consumer            # N = 200,000, median of 3 rounds
    python -m bench.consumer --quick    # N = 50,000, one round
    python -m bench.consumer --quick --presence   # and resume with a presence reader open
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from bench.common import (
    BENCH_CPU,
    REDIS_CPU,
    BenchGateway,
    BenchRedis,
    machine,
    pin_self,
    write_json,
)
from consumer import Consumer, Delivery
from publisher import Publisher, Retention
from schemas.events import BlockerResolved, utc_now

ROOT = Path(__file__).resolve().parent.parent
TARGET = 50_000
PROJECT = 1


def _event(n: int) -> BlockerResolved:
    return BlockerResolved(
        project_id=PROJECT,
        blocker_id=n,
        answer="Use JWT for stateless API",
        resolved_at=utc_now(),
    )


def _gateway(redis_url: str, max_replay: int) -> BenchGateway:
    """A ``--no-auth`` gateway built for replays (no outbound limit in the way)."""
    return BenchGateway(
        redis_url, "--no-auth", "--max-replay", str(max_replay), "--outbound-limit", str(1 << 30)
    )


def _publish_backlog(redis_url: str, count: int) -> None:
    # The whole backlog must stay in the stream (the default retention keeps 10,000 events).
    with Publisher.from_url(redis_url, retention=Retention(max_len=count + 1000)) as publisher:
        for first in range(1, count + 1, 10_000):
            publisher.publish_many(_event(n) for n in range(first, min(first + 10_000, count + 1)))


def _rates(count: int, wall: float, cpu: float) -> dict[str, float]:
    return {
        "events": count,
        "seconds": round(wall, 4),
        "cpu_seconds": round(cpu, 4),
        "events_per_s": round(count / wall),
        "events_per_cpu_s": round(count / cpu) if cpu > 0 else float("nan"),
    }


async def _consume(
    url: str,
    count: int,
    start: str,
    ready: asyncio.Event | None = None,
    *,
    presence: bool = False,
):
    """Consume ``count`` deliveries; returns (wall, cpu) from the first item to the last.
    ``presence``: with a presence reader of another project open throughout (checked to be
    still open at the end: a refusal would have ended it, and the measurement with it)."""
    async with Consumer(url, start=start, buffer=10_000) as consumer:  # type: ignore[arg-type]
        reader = consumer.presence(PROJECT + 1) if presence else None
        events = consumer.events(PROJECT)
        if ready is not None:
            async with asyncio.timeout(20):
                await events.wait_subscribed()
            ready.set()
        expected = 1
        started = cpu_started = 0.0
        async with asyncio.timeout(300):
            async for item in events:
                if expected == 1:
                    started, cpu_started = time.perf_counter(), time.process_time()
                if not isinstance(item, Delivery) or item.seq != expected:
                    raise SystemExit(f"expected seq {expected}, got {item!r}")
                if expected == count:
                    break
                expected += 1
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        if reader is not None and PROJECT + 1 not in consumer._presence:
            raise SystemExit("the presence reader ended before the measurement did")
        return wall, cpu


async def _floor(url: str, count: int) -> tuple[float, float]:
    """A bare websockets client receiving the replay of 1..count, decoding nothing."""
    from websockets.asyncio.client import connect

    async with connect(url, compression=None, max_size=2**22) as ws:
        await ws.send(json.dumps({"type": "subscribe", "project_id": PROJECT}))
        subscribed = json.loads(await ws.recv())
        await ws.send(
            json.dumps(
                {
                    "type": "subscribe",
                    "project_id": PROJECT,
                    "epoch": subscribed["epoch"],
                    "after": 0,
                }
            )
        )
        received = 0
        started = cpu_started = 0.0
        while received < count:
            await ws.recv(decode=False)
            if received == 0:
                started, cpu_started = time.perf_counter(), time.process_time()
            received += 1
        return time.perf_counter() - started, time.process_time() - cpu_started


async def _live(url: str, redis_url: str, count: int) -> tuple[float, float]:
    ready = asyncio.Event()
    consume = asyncio.create_task(_consume(url, count, "now", ready))
    await ready.wait()
    script = (
        "import sys; from bench.consumer import _publish_backlog; "
        "_publish_backlog(sys.argv[1], int(sys.argv[2]))"
    )

    def pin() -> None:
        if hasattr(os, "sched_setaffinity") and REDIS_CPU in os.sched_getaffinity(0):
            os.sched_setaffinity(0, {REDIS_CPU})

    publisher = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, redis_url, str(count), cwd=ROOT, preexec_fn=pin
    )
    result = await consume
    if await publisher.wait() != 0:
        raise SystemExit("the publisher failed")
    return result


def run(count: int, rounds: int, log, presence: bool = False) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {
        "resume": [],
        "paged": [],
        "live": [],
        "floor": [],
    }
    if presence:
        results["resume_presence"] = []
    with BenchRedis() as redis, pin_self(BENCH_CPU) as pinned:
        for round_ in range(rounds):
            redis.client().flushall()
            gateway = _gateway(redis.url, max_replay=count)
            # The default --max-replay: the backlog is caught up by pages over HTTP.
            paging = _gateway(redis.url, max_replay=1000)
            try:
                _publish_backlog(redis.url, count)
                wall, cpu = asyncio.run(_consume(gateway.url, count, "beginning"))
                results["resume"].append(_rates(count, wall, cpu))
                if presence:
                    consume = _consume(gateway.url, count, "beginning", presence=True)
                    wall, cpu = asyncio.run(consume)
                    results["resume_presence"].append(_rates(count, wall, cpu))
                wall, cpu = asyncio.run(_consume(paging.url, count, "beginning"))
                results["paged"].append(_rates(count, wall, cpu))
                wall, cpu = asyncio.run(_floor(gateway.url, count))
                results["floor"].append(_rates(count, wall, cpu))
                redis.client().flushall()
                wall, cpu = asyncio.run(_live(gateway.url, redis.url, count))
                results["live"].append(_rates(count, wall, cpu))
            finally:
                gateway.stop()
                paging.stop()
            log(f"round {round_ + 1}/{rounds}: " + ", ".join(
                f"{name} {runs[-1]['events_per_s']:,}/s ({runs[-1]['events_per_cpu_s']:,}/cpu-s)"
                for name, runs in results.items()
            ))  # fmt: skip
    summary = {
        name: {
            "events_per_s": statistics.median(r["events_per_s"] for r in runs),
            "events_per_cpu_s": statistics.median(r["events_per_cpu_s"] for r in runs),
        }
        for name, runs in results.items()
    }
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "pinned": pinned,
        "events": count,
        "rounds": rounds,
        "target_events_per_s": TARGET,
        "summary": summary,
        "runs": results,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"Consumer, {result['events']:,} events of one project, median of {result['rounds']} "
        f"round(s), {result['date']}",
        "",
        "| measurement | events/s (wall) | events per CPU-second | target |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, figures in result["summary"].items():
        target = (
            "reference (no decoding)"
            if name == "floor"
            else (
                f">= {TARGET:,}: " + ("met" if figures["events_per_cpu_s"] >= TARGET else "MISSED")
            )
        )
        lines.append(
            f"| {name} | {figures['events_per_s']:,.0f} | {figures['events_per_cpu_s']:,.0f} | "
            f"{target} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.consumer", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="50,000 events, one round")
    parser.add_argument("--events", type=int, help="events per measurement")
    parser.add_argument("--rounds", type=int, help="rounds (the median is reported)")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument(
        "--presence",
        action="store_true",
        help="also measure resume with a presence reader of another project open",
    )
    args = parser.parse_args(argv)
    count = args.events or (50_000 if args.quick else 200_000)
    rounds = args.rounds or (1 if args.quick else 3)

    def log(text: str) -> None:
        print(f"bench.consumer: {text}", file=sys.stderr, flush=True)

    # The consumer's own logs (connected, disconnected) would interleave with the report.
    previous = structlog.get_config()
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    try:
        result = run(count, rounds, log, presence=args.presence)
    finally:
        structlog.configure(**previous)
    if args.json:
        write_json(args.json, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
