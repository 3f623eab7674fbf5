"""Density benchmark: 100,000 idle subscribed WebSocket connections on one gateway process.

Figures: RSS per connection (the server's RSS after the connections, minus before, divided by
their number), the connect rate (handshake + ``subscribe`` + ``subscribed``, at most
``inflight`` in progress), the gateway's CPU while they idle (keepalive pings and the stall
check: ``--idle-seconds``), then one event published to the project all of them follow: the time
from the publish until the last delivery reaches a client's socket (the kernel's receive
timestamp, ``SO_TIMESTAMPNS``; see :mod:`bench.loadgen`), and until the gateway has written it
to every connection (its ``deliveries_total`` counter, polled).

The gateway runs on core 0; the load generator (its workers hold half the sockets each), the
publisher and Redis share core 1. Clients connect from 127.0.0.1-8 (a source address has about
28,000 ports: ``/proc/sys/net/ipv4/ip_local_port_range``), and every process raises its
RLIMIT_NOFILE (root may raise the hard limit up to ``fs.nr_open``).

    python -m bench.density            # 100,000 connections (about 1 minute)
    python -m bench.density --quick    # 5,000 (seconds)
    python -m bench.density --clients 50000
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench.common import BenchRedis, machine, write_json
from bench.gateway import (
    CLIENT_CPU,
    Server,
    Usage,
    event,
    pinned_to_client_core,
    pinning,
)
from bench.loadgen import LoadGen, raise_nofile
from bench.storm import client_tokens
from publisher import Publisher

SOURCES = [f"127.0.0.{i}" for i in range(1, 9)]
TARGETS = {"kib_per_conn": 8.0, "connects_per_s": 5_000, "fanout_s": 1.0}


def port_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def measure(
    redis: BenchRedis,
    clients: int,
    *,
    workers: int,
    inflight: int,
    log,
    idle_seconds: float = 0.0,
    gateway_args: Sequence[str] = (),
    auth: bool = False,
) -> dict:
    """Connect ``clients`` idle subscribers of one project; RSS, connect rate, the gateway's
    CPU while they idle (over ``idle_seconds``, 0 to skip), one event. With ``auth``, the
    gateway verifies tokens and every client sends its own (a ``sub`` and a name, as a backend
    mints them for its users: each connection also holds its claims, its expiry timer and its
    presence membership, listed up to ``--presence-max-members``)."""
    extra = ["--max-connections", str(clients + 100), *gateway_args]
    secret = secrets.token_urlsafe(32) if auth else None
    server = Server("gateway", redis.url, extra=extra, nofile=clients + 1000, auth_secret=secret)
    cpus = {CLIENT_CPU} if pinning() else None
    loadgen = LoadGen("127.0.0.1", server.port, workers=workers, sources=SOURCES, cpus=cpus)
    publisher = Publisher.from_url(redis.url)
    try:
        warm_up = client_tokens(secret, [1]) if secret else None
        loadgen.connect([(1, None, None)], tokens=warm_up)  # imports, the project's feed
        time.sleep(0.5)
        rss0 = server.rss
        # (A slow machine, or an emulated one, may need minutes for 100,000: 10 ms each at most.)
        tokens = client_tokens(secret, [1] * clients) if secret else None  # (before the clock)
        usage = Usage(server, loadgen, redis.process.pid)
        connected = loadgen.connect(
            [(1, None, None)] * clients,
            inflight=inflight,
            timeout=max(300, clients / 100),
            tokens=tokens,
        )
        connect_cpu = usage.done()
        time.sleep(1.0)
        rss1 = server.rss
        total = connected["clients"]  # every live client, the warm-up one included
        opened = total - 1
        log(f"  {total:,} connected ({connected['failed']} failed) in "
            f"{connected['seconds']:.2f} s; RSS {rss0 / 2**20:.0f} -> "
            f"{rss1 / 2**20:.0f} MiB")  # fmt: skip
        idle_core = idle_cpu = None
        if idle_seconds > 0:
            # Keepalive pings (one per connection per --ping-interval) and the stall check (every
            # connection each second) are what an idle connection costs.
            usage = Usage(server, loadgen, redis.process.pid)
            time.sleep(idle_seconds)
            idle_cpu = usage.done()
            idle_core = idle_cpu["server"]
            log(f"  idle: the gateway used {idle_core:.1%} of a core over {idle_seconds:.0f} s "
                f"(other processes {idle_cpu['others']:.1%})")  # fmt: skip

        loadgen.mode("latency")
        loadgen.stats()  # answered once every worker has switched
        deliveries0 = server.metric("deliveries_total") or 0.0
        usage = Usage(server, loadgen, redis.process.pid)
        published = time.monotonic()
        publisher.publish(event(1, 1))
        written_s = None
        deadline = published + 60
        while time.monotonic() < deadline:
            # (Answered once the fan-out's writes are done: up to seconds on an emulated CPU.)
            written = server.metric("deliveries_total", timeout=deadline - time.monotonic())
            if (written or 0.0) - deliveries0 >= total:
                written_s = time.monotonic() - published
                break
            time.sleep(0.01)
        while loadgen.frames < total and time.monotonic() < deadline:
            time.sleep(0.01)
        fanout_cpu = usage.done()
        arrival, _handled = loadgen.latencies()
        received = len(arrival)
        last_s = max(arrival) / 1e9 if received else None
        log(f"  one event to {total:,}: {received:,} received, last after "
            f"{last_s if last_s is None else round(last_s, 3)} s")  # fmt: skip
        return {
            "clients": opened,
            "failed": connected["failed"],
            "connect_seconds": round(connected["seconds"], 3),
            "connects_per_s": round(opened / connected["seconds"])
            if connected["seconds"]
            else None,
            "connect_cpu": connect_cpu,
            "idle_core": idle_core,
            "idle_cpu": idle_cpu,
            "idle_seconds": idle_seconds,
            "gateway_args": list(gateway_args),
            "auth": auth,
            "rss_before_mib": round(rss0 / 2**20, 1),
            "rss_after_mib": round(rss1 / 2**20, 1),
            "kib_per_conn": round((rss1 - rss0) / max(1, opened) / 1024, 2),
            "subscribers": total,
            "fanout_received": received,
            "fanout_last_s": None if last_s is None else round(last_s, 3),
            "fanout_written_s": None if written_s is None else round(written_s, 3),
            "fanout_cpu": fanout_cpu,
        }
    finally:
        loadgen.quit()
        publisher.close()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.density",
                                     description=(__doc__ or "").split("\n")[0])  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="5,000 connections (seconds)")
    parser.add_argument("--clients", type=int, help="connections (default 100,000)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=None,
        help="measure the gateway's CPU while the connections idle for this long "
        "(default 45: two keepalive intervals and more; 0 with --quick)",
    )
    parser.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra gateway flag, e.g. --gateway-arg=--ping-interval=60",
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="the gateway verifies tokens; every client sends its own (with a sub and a name)",
    )
    args = parser.parse_args(argv)
    clients = args.clients or (5_000 if args.quick else 100_000)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    low, high = port_range()
    requested = clients
    nofile = raise_nofile(clients + 10_000)
    limited_by = None
    if nofile < clients + 1000:
        # One process holds every server-side socket: past its descriptor limit accept() fails
        # (EMFILE). Without the right to raise the hard limit, measure the most that fits.
        clients = max(1, nofile - 1000)
        limited_by = f"RLIMIT_NOFILE {nofile:,} (hard limit; raising it needs CAP_SYS_RESOURCE)"
        log(f"bench.density: {limited_by}: measuring {clients:,} instead of {requested:,}")
    log(f"bench.density: {clients:,} connections; RLIMIT_NOFILE {nofile:,}; ports {low}-{high} "
        f"x {len(SOURCES)} source addresses")  # fmt: skip
    if (high - low) * len(SOURCES) < clients:
        log("warning: not enough source ports for that many connections")
    started = time.monotonic()
    with pinned_to_client_core():
        redis = BenchRedis(CLIENT_CPU)
        try:
            idle = args.idle_seconds if args.idle_seconds is not None else 0 if args.quick else 45
            result = measure(redis, clients, workers=2, inflight=2048, log=log,
                             idle_seconds=idle, gateway_args=args.gateway_arg,
                             auth=args.auth)  # fmt: skip
        finally:
            redis.close()
    elapsed = time.monotonic() - started
    fanout = result["fanout_last_s"]
    print()
    print(f"Density: {os.cpu_count()} cores, gateway on core 0, load generator + Redis on core "
          f"{CLIENT_CPU}; {clients:,} connections, {elapsed:.0f} s, "
          f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC")  # fmt: skip
    print("| | gateway |")
    print("| --- | ---: |")
    print(f"| idle subscribed connections | {result['clients']:,} ({result['failed']} failed)"
          f"{', each with its own token' if args.auth else ''} |")  # fmt: skip
    if limited_by:
        print(f"| (limited by) | {limited_by}; {requested:,} asked |")
    print(f"| memory per idle connection | {result['kib_per_conn']} KiB |")
    print(f"| connect rate (handshake + subscribe) | {result['connects_per_s']:,}/s |")
    if result["idle_core"] is not None:
        print(f"| gateway CPU while they idle | {result['idle_core']:.1%} of a core |")
    print(f"| one event to all: last arrival | {fanout} s ({result['fanout_received']:,} got it) |")
    print(f"| one event to all: written by the gateway | {result['fanout_written_s']} s |")
    if not args.quick:
        checks = {
            "kib_per_conn": result["kib_per_conn"] <= TARGETS["kib_per_conn"],
            "connects_per_s": (result["connects_per_s"] or 0) >= TARGETS["connects_per_s"],
            "fanout_s": fanout is not None
            and fanout <= TARGETS["fanout_s"]
            and result["fanout_received"] == result["subscribers"],
        }
        for name, ok in checks.items():
            print(f"[{'met' if ok else 'MISSED'}] {name}: target {TARGETS[name]:,}")
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine(),
                "requested": requested,
                "clients": clients,
                "limited_by": limited_by,
                "result": result,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
