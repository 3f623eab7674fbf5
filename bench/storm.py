"""Reconnect storm benchmark: 10,000 clients of 100 projects, each 100 events behind, reconnect at
once; time until every client is exact, and the gateway's CPU per resume.

A rolling restart sends every client of the pod being replaced to the others at once. Here the
clients subscribe, are reset, 100 events per project are published while they are away, and they
all reconnect with their cursors (at most ``inflight`` handshakes in progress at once, or each at
a random moment within 0.5 s, the jitter eventbus.js adds to such "prompt" reconnects). The time
runs from the first reconnect to the last ``subscribed``; then every client's seqs are checked
(exactly its 100 missed events, in order, then ``subscribed``).

Scenarios, each for two servers side by side:

* ``cold``: the pod follows none of the projects when the storm arrives (the clients were its
  only subscribers): each project's feed starts during the storm;
* ``warm``: the pod already follows every project (one client of its own per project stays
  connected), as the surviving pods of a rolling restart do;
* ``warm, jitter``: the same, the reconnects spread over 0.5 s;
* ``warm, authenticated``: ``warm`` against a gateway run with an auth secret instead of
  ``--no-auth``, as in production: every client has a token of its own (minted with
  :func:`publisher.issue_token`: its project, a ``sub`` and a display name, as the dashboard's
  token endpoint mints them), sends it in its first frame with its ``subscribe`` right behind
  it, as ``eventbus.js`` and the consumer do. The difference from ``warm`` is what verifying
  tokens (and listing each client in its project's presence, which a token's ``sub`` asks for)
  costs.

Servers: ``gateway`` (this project) and ``no window`` (the same gateway with resume windows of 0
events, :mod:`bench.gateway_without_window`: every resume behind the feed reads from Redis, as
before the windows). The gateway runs on core 0; the load generator, the publisher and Redis
share core 1. Each figure is the median of ``repeats`` storms. History reads are Redis's count
of ``EVAL`` calls during the storm (the snapshot script; nothing else runs it then).

    python -m bench.storm            # about 3.5 minutes
    python -m bench.storm --quick    # 1,000 clients of 10 projects, one storm each (smoke run)
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from bench.common import BenchRedis, machine, write_json
from bench.gateway import (
    CLIENT_CPU,
    QUIET,
    Server,
    Usage,
    event,
    pinned_to_client_core,
    pinning,
)
from bench.loadgen import LoadGen, raise_nofile, verify_resume
from publisher import Publisher, issue_token
from schemas.keys import Keys
from schemas.tags import event_tag

SERVERS = {"gateway": "gateway", "no window": "bench.gateway_without_window"}
#: Not run by default: the gateway under cProfile (:mod:`bench.profiled_gateway`), on uvloop
#: instead of asyncio's event loop (:mod:`bench.gateway_uvloop`), and with windows of 50 events
#: (:mod:`bench.gateway_small_window`: every resume reads from Redis, half of it the window's).
EXTRA_SERVERS = {
    "profiled": "bench.profiled_gateway",
    "uvloop": "bench.gateway_uvloop",
    "small window": "bench.gateway_small_window",
}


class Scenario(NamedTuple):
    name: str
    warm: bool  # the pod follows every project when the storm arrives
    spread: float  # seconds over which the reconnects are spread (0: at once)
    auth: bool = False  # the gateway verifies a token per client (else --no-auth)


SCENARIOS = (
    Scenario("cold", False, 0.0),
    Scenario("warm", True, 0.0),
    Scenario("warm, jitter 0.5 s", True, 0.5),
    Scenario("warm, authenticated", True, 0.0, auth=True),
)
#: Lifetime of the benchmark's tokens: longer than a run, so that none expires during one.
TOKEN_TTL_S = 3600
TARGET_S = 2.0
SOURCES = [f"127.0.0.{i}" for i in range(1, 9)]


@dataclass
class Params:
    clients: int = 10_000
    projects: int = 100
    missed: int = 100
    repeats: int = 3
    inflight: int = 2048  # handshakes + subscribes in progress at once ("at once")
    workers: int = 2


QUICK = Params(clients=1_000, projects=10, missed=100, repeats=1, inflight=512, workers=1)


def cpu_split(pid: int) -> tuple[float, float]:
    """CPU seconds (user, system) used so far by a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def client_tokens(secret: str, projects: list[int]) -> list[str]:
    """One token per client, each its own (``projects[i]`` is client i's project), minted as a
    backend mints them for its users: the project, a ``sub`` and a display name."""
    return [
        issue_token(secret, [project], ttl=TOKEN_TTL_S, subject=f"user-{i}", name=f"User {i}")
        for i, project in enumerate(projects)
    ]


def eval_calls(rconn) -> int:
    stats = rconn.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_eval",))


class StormRun:
    """One server, its load generator, and (warm scenarios) one client per project of its own.
    With ``auth``, the server verifies tokens and every client (keepers too) has its own."""

    def __init__(self, name: str, redis: BenchRedis, p: Params, *, auth: bool = False) -> None:
        self.p = p
        self.redis = redis
        self.rconn = redis.client()
        self.rconn.flushall()
        self.publisher = Publisher.from_url(redis.url)
        module = SERVERS.get(name) or EXTRA_SERVERS[name]
        self.projects = list(range(1, p.projects + 1))
        self.specs = [(self.projects[i % p.projects], None, None) for i in range(p.clients)]
        self.tokens: list[str] | None = None
        self.keeper_tokens: list[str] | None = None
        secret = None
        if auth:
            secret = secrets.token_urlsafe(32)
            self.tokens = client_tokens(secret, [project for project, _, _ in self.specs])
            self.keeper_tokens = client_tokens(secret, self.projects)
        self.server = Server("gateway", redis.url, module=module, auth_secret=secret)
        cpus = {CLIENT_CPU} if pinning() else None
        self.loadgen = LoadGen("127.0.0.1", self.server.port, workers=p.workers,
                               sources=SOURCES, cpus=cpus)  # fmt: skip
        self.keepers: LoadGen | None = None

    def close(self) -> None:
        self.loadgen.quit()
        if self.keepers is not None:
            self.keepers.quit()
        self.server.stop()
        self.publisher.close()
        self.rconn.close()

    def keep_feeds(self) -> None:
        """One subscriber per project of the pod's own, so that it follows every project."""
        cpus = {CLIENT_CPU} if pinning() else None
        self.keepers = LoadGen("127.0.0.1", self.server.port, workers=1, sources=SOURCES,
                               cpus=cpus)  # fmt: skip
        self.keepers.connect([(project, None, None) for project in self.projects],
                             tokens=self.keeper_tokens)  # fmt: skip

    def wait_connections(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.metric("connections") == count:
                return
            time.sleep(0.05)
        raise SystemExit(f"the gateway still has connections other than the {count} expected")

    def storm(self, spread: float) -> dict:
        """Subscribe every client, reset them, publish ``missed`` events per project, reconnect."""
        p, loadgen, keys, specs = self.p, self.loadgen, Keys(), self.specs
        loadgen.connect(specs, inflight=p.inflight, tokens=self.tokens)
        cursors = {}
        for project in self.projects:
            epoch, top = self.rconn.hmget(keys.meta(project), "epoch", "seq")
            # With the tag of the event there, as eventbus.js and the consumer resume.
            at = self.rconn.xrange(keys.stream(project), f"{int(top)}-0", f"{int(top)}-0")
            tag = event_tag(at[0][1][b"f"]) if at else None
            cursors[project] = (epoch.decode(), int(top), tag)
        loadgen.close()
        keeping = len(self.projects) if self.keepers is not None else 0
        self.wait_connections(keeping)
        kept = self.keepers.frames if self.keepers is not None else 0
        missed = [event(project, n + 1) for n in range(p.missed) for project in self.projects]
        for start in range(0, len(missed), 2000):
            self.publisher.publish_many(missed[start : start + 2000])
        if self.keepers is not None:  # the pod has relayed them all (its windows hold them)
            deadline = time.monotonic() + 30
            while self.keepers.frames < kept + len(missed) and time.monotonic() < deadline:
                time.sleep(0.02)
        resumes = [(project, *cursors[project]) for project, _, _ in specs]
        usage = Usage(self.server, loadgen, self.redis.process.pid)
        reads0, (user0, sys0) = eval_calls(self.rconn), cpu_split(self.server.proc.pid)
        result = loadgen.connect(resumes, record=True, inflight=p.inflight, spread=spread,
                                 tokens=self.tokens)  # fmt: skip
        user1, sys1 = cpu_split(self.server.proc.pid)
        cpu_s = user1 - user0 + sys1 - sys0
        reads = eval_calls(self.rconn) - reads0
        cpu = usage.done()
        check = verify_resume(loadgen.records(), p.missed)
        loadgen.mode("count")
        loadgen.close()
        self.wait_connections(keeping)
        return {
            "seconds": round(result["seconds"], 3),
            "clients": result["clients"],
            "failed": result["failed"],
            "exact": check["exact"],
            "problems": check["problems"],
            "server_cpu_s": round(cpu_s, 3),
            "server_user_s": round(user1 - user0, 3),
            "server_system_s": round(sys1 - sys0, 3),
            "cpu_ms_per_resume": round(cpu_s / max(1, result["clients"]) * 1000, 4),
            "history_reads": reads,
            "cpu": cpu,
            "noisy": cpu["others"] > QUIET,
        }


def run_server(
    name: str, redis: BenchRedis, p: Params, log, scenarios: tuple[Scenario, ...] = SCENARIOS
) -> dict:
    """Every scenario's storms against one server: one gateway process for the scenarios
    without auth (in order: a cold one first), another for those with."""
    out: dict = {}
    for auth in (False, True):
        mine = [scenario for scenario in scenarios if scenario.auth == auth]
        if not mine:
            continue
        run = StormRun(name, redis, p, auth=auth)
        try:
            for scenario in mine:
                if scenario.warm and run.keepers is None:
                    run.keep_feeds()
                storms = []
                for _ in range(p.repeats):
                    s = run.storm(scenario.spread)
                    storms.append(s)
                    log(f"  {name} / {scenario.name}: {s['clients']:,} resumes in "
                        f"{s['seconds']} s, {s['exact']:,} exact, {s['cpu_ms_per_resume']} ms "
                        f"CPU each, ({s['server_system_s']} s in the kernel), "
                        f"{s['history_reads']:,} reads, others {s['cpu']['others']}")  # fmt: skip
                out[scenario.name] = {"storms": storms, "median": summarize(storms)}
        finally:
            run.close()
    return out


def summarize(storms: list[dict]) -> dict:
    return {
        "seconds": statistics.median(s["seconds"] for s in storms),
        "cpu_ms_per_resume": statistics.median(s["cpu_ms_per_resume"] for s in storms),
        "history_reads": statistics.median(s["history_reads"] for s in storms),
        "all_exact": all(s["exact"] == s["clients"] and not s["failed"] for s in storms),
        "noisy": any(s["noisy"] for s in storms),
    }


def table(results: dict[str, dict], p: Params) -> str:
    names = list(results)
    head = "| storm | " + " | ".join(names) + " |"
    lines = [head, "|" + " --- |" * (len(names) + 1)]
    for scenario in [s.name for s in SCENARIOS if s.name in results[names[0]]]:
        rows = {
            "s": f"{p.clients:,} x {p.missed} missed, {scenario}: time until all exact (s)",
            "cpu": f"{scenario}: gateway CPU per resume (ms)",
            "reads": f"{scenario}: history reads",
        }
        for key, label in rows.items():
            cells = []
            for name in names:
                m = results[name][scenario]["median"]
                value = {"s": m["seconds"], "cpu": m["cpu_ms_per_resume"],
                         "reads": f"{m['history_reads']:,.0f}"}[key]  # fmt: skip
                mark = "" if m["all_exact"] else " (NOT EXACT)"
                cells.append(f"{value}{mark}{' *' if m['noisy'] else ''}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storm",
                                     description=(__doc__ or "").split("\n")[0])  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"subset of {[*SERVERS, *EXTRA_SERVERS]}")  # fmt: skip
    parser.add_argument("--scenario", action="append", choices=[s.name for s in SCENARIOS],
                        help="only this scenario (repeat for several; default: all)")  # fmt: skip
    parser.add_argument("--repeats", type=int, help="storms per scenario (default 3, quick 1)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    p = Params(**vars(QUICK)) if args.quick else Params()
    if args.repeats:
        p.repeats = args.repeats
    scenarios = tuple(s for s in SCENARIOS if not args.scenario or s.name in args.scenario)
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    for name in names:
        if name not in SERVERS and name not in EXTRA_SERVERS:
            parser.error(f"unknown server {name!r}")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    raise_nofile(4 * p.clients)
    started = time.monotonic()
    results: dict[str, dict] = {}
    with pinned_to_client_core():
        redis = BenchRedis(CLIENT_CPU, "--maxclients", "15000")
        try:
            for name in names:
                log(f"bench.storm: {name}")
                results[name] = run_server(name, redis, p, log, scenarios)
        finally:
            redis.close()
    elapsed = time.monotonic() - started
    print()
    print(f"Storm: {os.cpu_count()} cores, gateway on core 0, load generator + Redis on core "
          f"{CLIENT_CPU}; {'quick' if args.quick else 'full'} run, medians of {p.repeats}, "
          f"{elapsed:.0f} s, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")  # fmt: skip
    print(table(results, p))
    print(f"* other processes used more than {QUIET:.0%} of a core during a storm")
    if not args.quick and "gateway" in results:
        for scenario in [s.name for s in SCENARIOS if s.name in results["gateway"]]:
            m = results["gateway"][scenario]["median"]
            ok = m["all_exact"] and m["seconds"] <= TARGET_S
            print(f"[{'met' if ok else 'MISSED'}] {scenario}: {m['seconds']} s "
                  f"(target {TARGET_S} s, every client exact)")  # fmt: skip
    if args.json:
        write_json(args.json, {"machine": machine(), "params": vars(p), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
