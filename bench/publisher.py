"""Publisher benchmark: ``publish`` latency and ``publish_many`` throughput next to their floors.

Measured side by side in one run, against a private ``redis-server`` on loopback (pinned to core
1; this process to core 0 when two cores are available):

* ``publish`` latency p50/p99 (sync :class:`publisher.Publisher`, default retention: the real
  script with its count and age trimming), against the floor: redis-py ``EVALSHA`` of a no-op
  script (one bare round trip through redis-py's command layer). The publisher itself sends its
  script calls past that layer (:class:`publisher.connection.DirectCommands`), so a second floor
  is shown beside it: the same no-op ``EVALSHA``, pre-packed, sent the same way (the wire and
  Redis alone, no client code).
* ``publish_many`` throughput (events/s, bursts of ``--batch`` events of one project), against
  the floor: a redis-py pipeline of ``XADD`` (``MAXLEN ~``) + ``PUBLISH`` per event, without the
  script, with pre-encoded payloads.

Each round runs every measurement once (after a warm-up); the figures are medians over rounds,
and the ratios are taken per round before the median, so slow drifts of the machine cancel out.
Targets: ``publish`` p50 <= 1.5x the bare round trip; ``publish_many`` >= 50,000 events/s.

``python -m bench.publisher [--quick] [--json PATH]`` (about 30 s; ``--quick`` about 5 s).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    BENCH_CPU,
    REDIS_CPU,
    BenchRedis,
    machine,
    median,
    percentile,
    pin_self,
    write_json,
)
from publisher import Publisher
from publisher.connection import DirectCommands
from publisher.core import pack_command
from schemas.events import BlockerResolved, encode_event
from schemas.keys import Keys

__all__ = ["main", "run"]

TARGET_LATENCY_RATIO = 1.5
TARGET_THROUGHPUT = 50_000
KEYS = Keys()


@dataclass
class Params:
    rounds: int = 7
    latency_samples: int = 5_000  # per round and measurement
    warmup: int = 2_000
    batch: int = 10_000  # events per publish_many call (and per floor pipeline)
    batches: int = 3  # calls per round; the round's figure is their total rate


QUICK = Params(rounds=3, latency_samples=1_000, warmup=300, batch=5_000, batches=1)


def event(project_id: int, n: int) -> BlockerResolved:
    """A typical event (~150 bytes of JSON)."""
    return BlockerResolved(
        project_id=project_id,
        blocker_id=n,
        answer="Use JWT for stateless API",
        resolved_at=datetime(2025, 11, 8, 12, 45, 30, tzinfo=UTC),
    )


def _latencies(call: Callable[[], object], samples: int) -> list[float]:
    """Seconds per call, sorted."""
    clock = time.perf_counter
    out = [0.0] * samples
    for i in range(samples):
        started = clock()
        call()
        out[i] = clock() - started
    out.sort()
    return out


def _rate(run_once: Callable[[], object], events: int, repeats: int) -> float:
    """Events per second over ``repeats`` calls that each handle ``events`` events."""
    elapsed = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        run_once()
        elapsed += time.perf_counter() - started
    return events * repeats / elapsed


class Bench:
    """One set of clients against one redis-server; each method measures one figure."""

    def __init__(self, url: str, params: Params) -> None:
        self.p = params
        self.client = redis.Redis.from_url(url)
        self.publisher = Publisher(self.client)
        self.noop_sha = self.client.script_load("return 0")
        self.direct = DirectCommands(self.client)
        self.single_event = event(1, 1)
        self.burst = [event(2, n + 1) for n in range(params.batch)]
        # The floor writes what the script writes: frame = event JSON + seq, envelope on the
        # channel, stream capped like the default retention. Encoded once, outside the timing.
        frame = encode_event(event(3, 1))[:-1] + b',"seq":1}'
        self.floor_fields = {"f": frame, "t": b"1762605930000"}
        self.floor_message = b"epoch|1|1762605930000|" + frame

    # -- latency -------------------------------------------------------------------------------

    def evalsha_noop(self, samples: int) -> list[float]:
        evalsha, sha = self.client.evalsha, self.noop_sha
        return _latencies(lambda: evalsha(sha, 0), samples)

    def evalsha_noop_raw(self, samples: int) -> list[float]:
        execute, packed = self.direct.execute, pack_command("EVALSHA", self.noop_sha, 0)
        return _latencies(lambda: execute(packed), samples)

    def publish(self, samples: int) -> list[float]:
        publish, single = self.publisher.publish, self.single_event
        return _latencies(lambda: publish(single), samples)

    # -- throughput ----------------------------------------------------------------------------

    def publish_many(self, repeats: int) -> float:
        publish_many, burst = self.publisher.publish_many, self.burst
        return _rate(lambda: publish_many(burst), len(burst), repeats)

    def pipelined_floor(self, repeats: int) -> float:
        stream, channel = KEYS.stream(3), KEYS.channel(3)
        fields, message, count = self.floor_fields, self.floor_message, self.p.batch

        def once() -> None:
            with self.client.pipeline(transaction=False) as pipe:
                for _ in range(count):
                    pipe.xadd(stream, fields, maxlen=10_000, approximate=True)
                    pipe.publish(channel, message)
                pipe.execute()

        return _rate(once, count, repeats)

    def warm_up(self) -> None:
        self.evalsha_noop(self.p.warmup)
        self.evalsha_noop_raw(self.p.warmup)
        self.publish(self.p.warmup)
        self.publish_many(1)
        self.pipelined_floor(1)

    def round(self) -> dict[str, float]:
        samples = self.p.latency_samples
        gc.collect()
        noop = self.evalsha_noop(samples)
        gc.collect()
        raw = self.evalsha_noop_raw(samples)
        gc.collect()
        pub = self.publish(samples)
        gc.collect()
        many = self.publish_many(self.p.batches)
        gc.collect()
        floor = self.pipelined_floor(self.p.batches)
        return {
            "evalsha_p50_us": percentile(noop, 50) * 1e6,
            "evalsha_p99_us": percentile(noop, 99) * 1e6,
            "raw_p50_us": percentile(raw, 50) * 1e6,
            "raw_p99_us": percentile(raw, 99) * 1e6,
            "publish_p50_us": percentile(pub, 50) * 1e6,
            "publish_p99_us": percentile(pub, 99) * 1e6,
            "publish_many_events_per_s": many,
            "pipelined_floor_events_per_s": floor,
            "latency_ratio_p50": percentile(pub, 50) / percentile(noop, 50),
            "raw_ratio_p50": percentile(pub, 50) / percentile(raw, 50),
            "throughput_ratio": many / floor,
        }

    def close(self) -> None:
        self.direct.close()
        self.client.close()


def run(
    params: Params, log: Callable[[str], None] = lambda _text: None, *, pin: bool = True
) -> dict[str, Any]:
    """Start a private redis-server, measure, and return the results (medians over rounds).

    With ``pin`` (and two usable cores) this process runs on BENCH_CPU and redis-server on
    REDIS_CPU; without, the scheduler places both (often on one core, taking turns).
    """
    with (
        BenchRedis(REDIS_CPU if pin else None) as server,
        pin_self(BENCH_CPU) if pin else contextlib.nullcontext(False) as pinned,
    ):
        bench = Bench(server.url, params)
        try:
            log("bench.publisher: warm-up")
            bench.warm_up()
            rounds = []
            for i in range(params.rounds):
                rounds.append(bench.round())
                r = rounds[-1]
                log(
                    f"bench.publisher: round {i + 1}/{params.rounds}: publish p50 "
                    f"{r['publish_p50_us']:.1f} us ({r['latency_ratio_p50']:.2f}x EVALSHA), "
                    f"publish_many {r['publish_many_events_per_s']:,.0f}/s"
                )
            redis_version = server.version()
        finally:
            bench.close()
    summary = {key: median([r[key] for r in rounds]) for key in rounds[0]}
    return {
        "machine": {
            **machine(),
            "redis": redis_version,
            "redis_py": redis.__version__,
            "pinned": pinned and server.pinned,
        },
        "params": asdict(params),
        "summary": summary,
        "rounds": rounds,
        "targets": {
            "latency_ratio_max": TARGET_LATENCY_RATIO,
            "latency_met": summary["latency_ratio_p50"] <= TARGET_LATENCY_RATIO,
            "throughput_min": TARGET_THROUGHPUT,
            "throughput_met": summary["publish_many_events_per_s"] >= TARGET_THROUGHPUT,
        },
    }


def table(results: dict[str, Any]) -> str:
    """The results as the Markdown table of docs/benchmarks.md."""
    s = results["summary"]
    t = results["targets"]
    m = results["machine"]

    def verdict(met: bool) -> str:
        return "met" if met else "MISSED"

    pinning = (
        f"bench on core {BENCH_CPU}, redis-server on core {REDIS_CPU}"
        if m["pinned"]
        else "not pinned"
    )
    return "\n".join(
        [
            f"{m['date']}, {m['cpus']} x {m['cpu_model']}, Python {m['python']}, "
            f"Redis {m['redis']}, redis-py {m['redis_py']} (hiredis), {pinning}; "
            f"median of {results['params']['rounds']} rounds; load average "
            f"{m['load_average']} at the end.",
            "",
            "| measurement | p50 | p99 | events/s | vs floor |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| floor: bare `EVALSHA` (no-op script) through redis-py "
            f"| {s['evalsha_p50_us']:.1f} us | {s['evalsha_p99_us']:.1f} us | | |",
            f"| wire floor: the same, pre-packed on a held connection "
            f"| {s['raw_p50_us']:.1f} us | {s['raw_p99_us']:.1f} us | | |",
            f"| `publish` (one event) | {s['publish_p50_us']:.1f} us "
            f"| {s['publish_p99_us']:.1f} us | | {s['latency_ratio_p50']:.2f}x p50 "
            f"(target <= {t['latency_ratio_max']}x: {verdict(t['latency_met'])}); "
            f"{s['raw_ratio_p50']:.2f}x the wire floor |",
            f"| floor: pipelined `XADD`+`PUBLISH`, no script | | "
            f"| {s['pipelined_floor_events_per_s']:,.0f} | |",
            f"| `publish_many` ({results['params']['batch']:,} events per call) | | "
            f"| {s['publish_many_events_per_s']:,.0f} | {s['throughput_ratio']:.2f}x "
            f"(target >= {t['throughput_min']:,}/s: {verdict(t['throughput_met'])}) |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.publisher", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (a few seconds)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--no-pin", action="store_true", help="let the scheduler place bench and redis-server"
    )
    args = parser.parse_args(argv)
    params = Params(**asdict(QUICK)) if args.quick else Params()
    if args.rounds:
        params.rounds = args.rounds

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    results = run(params, log, pin=not args.no_pin)
    if not results["machine"]["pinned"] and not args.no_pin:
        log("warning: fewer than 2 usable CPUs: bench and redis-server share cores")
    print()
    print("Publisher")
    print(table(results))
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
