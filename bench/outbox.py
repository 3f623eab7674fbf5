"""Outbox benchmark: events/s end to end through PostgreSQL, and relay lag at 500 events/s.

Against a private ``redis-server`` (free port) and a private database ``eventbus_bench_<pid>`` on
the machine's PostgreSQL (127.0.0.1:5432, trust auth; ``EVENTBUS_BENCH_POSTGRES`` overrides the
admin URL), dropped at the end. The relay runs as it does in production: its own process,
``python -m publisher.outbox relay`` (one relay, leader election on, ``--max-rate 0``).

* **Throughput**: 4 writer threads commit transactions of 10 events each (``Outbox.write_many``
  through psycopg, 8 projects round-robin) as fast as they can while the relay publishes; the
  figure is events / (time from the first write to the last event in the Redis streams).
  Target >= 5,000 events/s.
* **Lag**: one writer commits one event per transaction at 500 events/s; a Redis subscriber
  timestamps each event's arrival on the project's channel. Lag = arrival - the moment
  ``commit()`` returned to the writer (same clock). Target p99 <= 50 ms.

Each figure is the median over rounds. ``python -m bench.outbox [--quick] [--json PATH]``
(about 60 s; ``--quick`` about 15 s).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import redis

from bench.common import RESULTS_DIR, BenchRedis, machine, median, percentile, write_json
from publisher.outbox import Outbox
from schemas.events import BlockerResolved, utc_now
from schemas.keys import Keys, parse_envelope

__all__ = ["main", "run"]

TARGET_THROUGHPUT = 5_000
TARGET_LAG_P99_MS = 50.0
ROOT = Path(__file__).resolve().parent.parent
KEYS = Keys()
PROJECTS = 8


@contextlib.contextmanager
def bench_database() -> Iterator[str]:
    import psycopg

    admin_url = os.environ.get(
        "EVENTBUS_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        raise SystemExit(f"bench.outbox needs PostgreSQL ({admin_url}): {exc}") from None
    name = f"eventbus_bench_{os.getpid()}"
    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield admin_url.rpartition("/")[0] + "/" + name
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@contextlib.contextmanager
def relay_process(dsn: str, table: str, redis_url: str) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "publisher.outbox", "relay", "--dsn", dsn, "--table", table,
            "--redis-url", redis_url, "--max-rate", "0", "--stats-interval", "3600",
        ],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _event(project_id: int, n: int) -> BlockerResolved:
    return BlockerResolved(
        project_id=project_id, blocker_id=n, answer=f"answer {n}", resolved_at=utc_now()
    )


def _fresh_table(dsn: str, round_no: int) -> tuple[Outbox, str]:
    import psycopg

    outbox = Outbox(f"bench_outbox_{round_no}")
    with psycopg.connect(dsn) as conn:
        outbox.create_table(conn)
    return outbox, outbox.table


def throughput_round(dsn: str, redis_url: str, round_no: int, total: int) -> float:
    import psycopg

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    outbox, table = _fresh_table(dsn, round_no)
    writers, per_txn = 4, 10
    per_writer = total // writers
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            with psycopg.connect(dsn) as conn:
                for t in range(per_writer // per_txn):
                    project = 1 + (index + t) % PROJECTS
                    base = index * per_writer + t * per_txn
                    outbox.write_many(conn, [_event(project, base + k + 1) for k in range(per_txn)])
                    conn.commit()
        except BaseException as exc:
            errors.append(exc)

    expected = writers * (per_writer // per_txn) * per_txn
    with relay_process(dsn, table, redis_url):
        time.sleep(0.5)  # the relay connects and takes the leader lock
        started = time.perf_counter()
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 300
        while True:
            with client.pipeline(transaction=False) as pipe:
                for project in range(1, PROJECTS + 1):
                    pipe.xlen(KEYS.stream(project))
                if sum(pipe.execute()) >= expected:
                    break
            if errors or time.monotonic() > deadline:
                raise SystemExit(f"throughput round failed: {errors or 'timeout'}")
            time.sleep(0.002)
        elapsed = time.perf_counter() - started
        for thread in threads:
            thread.join()
    client.close()
    return expected / elapsed


def lag_round(dsn: str, redis_url: str, round_no: int, seconds: float, rate: float) -> list[float]:
    import psycopg

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    outbox, table = _fresh_table(dsn, 100 + round_no)
    count = int(seconds * rate)
    committed = [0.0] * (count + 1)
    arrived = [0.0] * (count + 1)
    decoder = msgspec.json.Decoder()
    pubsub = client.pubsub()
    pubsub.subscribe(KEYS.channel(1))
    stop = threading.Event()

    def subscriber() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.1)
            if message and message["type"] == "message":
                now = time.time()
                envelope = parse_envelope(message["data"])
                arrived[decoder.decode(envelope.frame)["blocker_id"]] = now

    thread = threading.Thread(target=subscriber, daemon=True)
    thread.start()
    with relay_process(dsn, table, redis_url), psycopg.connect(dsn) as conn:
        time.sleep(0.5)
        started = time.perf_counter()
        for n in range(1, count + 1):
            pause = started + (n - 1) / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            outbox.write(conn, _event(1, n))
            conn.commit()
            committed[n] = time.time()
        deadline = time.monotonic() + 30
        while not all(arrived[1:]) and time.monotonic() < deadline:
            time.sleep(0.01)
    stop.set()
    thread.join(5)
    pubsub.close()
    client.close()
    missing = sum(1 for a in arrived[1:] if not a)
    if missing:
        raise SystemExit(f"lag round: {missing} events never arrived")
    return sorted(max(a - c, 0.0) * 1000 for a, c in zip(arrived[1:], committed[1:], strict=True))


def run(*, quick: bool = False) -> dict[str, Any]:
    rounds = 3
    total = 20_000 if quick else 60_000
    lag_seconds = 4 if quick else 15
    results: dict[str, Any] = {"machine": machine(), "quick": quick, "rounds": rounds}
    with BenchRedis(None) as server, bench_database() as dsn:
        rates = [throughput_round(dsn, server.url, r, total) for r in range(rounds)]
        lags = [lag_round(dsn, server.url, r, lag_seconds, 500) for r in range(rounds)]
    results["throughput"] = {
        "events_per_round": total,
        "events_per_s": rates,
        "median": median(rates),
        "target": TARGET_THROUGHPUT,
    }
    results["lag_ms"] = {
        "rate": 500,
        "events_per_round": lag_seconds * 500,
        "p50": [percentile(r, 50) for r in lags],
        "p99": [percentile(r, 99) for r in lags],
        "max": [r[-1] for r in lags],
        "median_p50": median([percentile(r, 50) for r in lags]),
        "median_p99": median([percentile(r, 99) for r in lags]),
        "target_p99": TARGET_LAG_P99_MS,
    }
    return results


def _report(results: dict[str, Any]) -> str:
    t, lag = results["throughput"], results["lag_ms"]
    ok_t = "met" if t["median"] >= t["target"] else "MISSED"
    ok_l = "met" if lag["median_p99"] <= lag["target_p99"] else "MISSED"
    return "\n".join(
        [
            f"outbox benchmark ({results['machine']['date']}, {results['rounds']} rounds, "
            f"load average {results['machine']['load_average']})",
            f"| end to end through PostgreSQL | {t['median']:,.0f} events/s "
            f"(rounds: {', '.join(f'{r:,.0f}' for r in t['events_per_s'])}) | target >= "
            f"{t['target']:,} | {ok_t} |",
            f"| relay lag at 500 events/s, p50 | {lag['median_p50']:.1f} ms | | |",
            f"| relay lag at 500 events/s, p99 | {lag['median_p99']:.1f} ms "
            f"(rounds: {', '.join(f'{r:.1f}' for r in lag['p99'])}) | target <= "
            f"{lag['target_p99']:.0f} ms | {ok_l} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outbox", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "outbox.json")
    args = parser.parse_args(argv)
    results = run(quick=args.quick)
    print(_report(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
