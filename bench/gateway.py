"""Gateway benchmark: our gateway against three baselines and a floor, side by side, in one run.

Servers (each in its own process, pinned to core 0, one after the other):

* ``gateway``: ``python -m gateway --no-auth`` (this project);
* ``naive``: the contract's ``ConnectionManager`` looping ``await ws.send(json.dumps(event))``
  (see :mod:`bench.baselines`);
* ``broadcast``: websockets' own ``broadcast()``, the frame decoded once;
* ``socketio``: a Node.js socket.io 4 server, one room per project, ``io.to(room).emit()`` of each
  event (``bench/socketio/server.js``; installed by ``make bench-socketio``, ``npm ci`` of its
  committed lock file; the load generator speaks socket.io to it);
* ``floor`` (latency only): one bare ``send()`` per subscriber, the least any server does, so
  its latency is this machine's floor (see :mod:`bench.baselines`).

The load generator (:mod:`bench.loadgen`, raw sockets counting frames in bulk), the publisher (the
real :class:`publisher.Publisher`) and a private ``redis-server`` share core 1.

Figures (see ``docs/benchmarks.md``):

1. deliveries/s with 1,000 and 10,000 subscribers of one project and 10,000 subscribers over 100
   projects. The publisher keeps 16 events per subscriber in flight (published, not yet counted
   by the client) and publishes more as the clients count deliveries, so it goes as fast as the
   server delivers. Median of 3 windows of 3 s after a warm-up of 2 s.
2. publish-to-receive latency p50/p99, 1,000 subscribers, 100 events/s (100,000 deliveries/s):
   each event carries its publish time; clients subtract it from their receive time.
3. memory per idle connection: RSS delta of the server / connections, 10,000 idle subscribers.
4. 10,000 clients resuming with 100 missed events each (gateway only): the clients are reset,
   100 events per project are published, they reconnect with their cursors; time until every one
   has its 100 replayed events and ``subscribed``, then every client's seqs are checked.

Every measurement also records the CPU used by the server, the load generator, Redis, the
publisher, and by other processes on the machine; throughput windows disturbed by other work are
measured again, and disturbed figures are marked in the report.

``python -m bench.gateway`` (about 3.5 minutes), ``--quick`` for a smoke run (about 40 s),
``--runs 3`` for medians of three full runs, ``--servers gateway`` for one server.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.common import BenchRedis, machine, write_json
from bench.loadgen import LoadGen, raise_nofile, verify_resume
from publisher import Publisher
from schemas.events import BlockerResolved, utc_now
from schemas.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("gateway", "naive", "broadcast", "socketio", "floor")
LABELS = {
    "gateway": "gateway",
    "naive": "naive (contract)",
    "broadcast": "ws broadcast()",
    "socketio": "socket.io (Node)",
    "floor": "send() floor",
}
#: Servers the gateway must beat; the floor is a reference, measured for latency only.
BASELINES = ("naive", "broadcast", "socketio")
#: The socket.io baseline: its server, and what ``make bench-socketio`` (``npm ci``) installs.
SOCKETIO_DIR = ROOT / "bench" / "socketio"
SOCKETIO_SERVER = SOCKETIO_DIR / "server.js"
#: The transport the load generator speaks to each server (default: the gateway's WebSocket).
TRANSPORTS = {"socketio": "socketio"}
SERVER_CPU = 0
CLIENT_CPU = 1

#: CPU (in cores) other processes may use during a measurement before it counts as disturbed.
QUIET = 0.05

TARGETS = {
    "throughput": 200_000,  # deliveries/s
    "p99_ms": 10.0,
    "kib_per_conn": 12.0,
    "resume_s": 10.0,
}


@dataclass
class Params:
    clients: int = 10_000
    few: int = 1_000
    projects: int = 100
    warmup: float = 2.0
    window: float = 3.0
    windows: int = 3
    inflight_events: int = 16  # events in flight per subscriber while measuring throughput
    lowat: int = 1024  # clients read once this many bytes are waiting (about 7 events)
    latency_rate: int = 100  # events/s
    latency_warmup: float = 1.0  # seconds at that rate before measuring
    latency_seconds: float = 10.0
    missed: int = 100
    workers: int = 2
    inflight_connects: int = 512  # handshakes + subscribes in progress at once


QUICK = Params(
    clients=1_000,
    few=200,
    projects=10,
    warmup=0.3,
    window=0.75,
    windows=2,
    latency_warmup=0.3,
    latency_seconds=1.0,
    workers=1,
)


# --- processes, CPUs, measurements -------------------------------------------------------------


def socketio_missing() -> str | None:
    """Why the socket.io baseline cannot run here (no ``node``, or ``make bench-socketio`` not
    run), or None when it can."""
    if shutil.which("node") is None:
        return "node (Node.js 20 or later) is not on PATH"
    if not (SOCKETIO_DIR / "node_modules" / "socket.io" / "package.json").is_file():
        return f"{SOCKETIO_DIR / 'node_modules'} is missing: run `make bench-socketio` (npm ci)"
    return None


def free_port() -> int:
    """A free port below the ephemeral range, so that no client socket can take it (nor
    connect to itself on it while the server starts)."""
    ports = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    low = int(ports[0])
    for _ in range(100):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


#: Both cores usable (read once: this process later pins itself to CLIENT_CPU).
PINNING = hasattr(os, "sched_setaffinity") and {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)


def pinning() -> bool:
    return PINNING


def _pin_server() -> None:
    os.sched_setaffinity(0, {SERVER_CPU})


class Server:
    """One server under test in its own process on core 0.

    ``module`` runs the gateway through another entry point (same flags, e.g. a variant with
    other constants), ``extra`` adds flags (the gateway's, or ``bench/socketio/server.js``'s:
    ``--ping-interval MS``), ``nofile`` raises the process's descriptor limit
    (when this process may: root). The gateway runs with ``--no-auth`` unless given an
    ``auth_secret`` (passed as ``EVENTBUS_AUTH_SECRET``): its clients then need tokens."""

    def __init__(
        self,
        kind: str,
        redis_url: str,
        *,
        module: str = "gateway",
        extra: Sequence[str] = (),
        nofile: int = 0,
        auth_secret: str | None = None,
    ) -> None:
        self.kind = kind
        self.port = free_port()
        common = ["--host", "127.0.0.1", "--port", str(self.port), "--redis-url", redis_url]
        if kind == "gateway":
            auth = [] if auth_secret else ["--no-auth"]
            cmd = [sys.executable, "-m", module, *auth, "--log-level", "warning", *common]
            cmd += list(extra)
        elif kind == "socketio":
            node = shutil.which("node") or "node"
            cmd = [node, str(SOCKETIO_SERVER), *common, *extra]
        else:
            cmd = [sys.executable, "-m", "bench.baselines", kind, *common]
        # For profiling, e.g. BENCH_SERVER_PREFIX="taskset -c 1 py-spy record -o gw.txt -f raw --
        # taskset -c 0"; the server's own command follows.
        cmd = os.environ.get("BENCH_SERVER_PREFIX", "").split() + cmd
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if auth_secret:
            env["EVENTBUS_AUTH_SECRET"] = auth_secret

        def prepare() -> None:  # in the child, before exec
            if pinning():
                _pin_server()
            if nofile:
                raise_nofile(nofile)

        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            preexec_fn=prepare if (pinning() or nofile) else None,
            stdout=subprocess.DEVNULL,
            stderr=None,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit(f"{kind} server did not start") from None
                time.sleep(0.05)

    @property
    def rss(self) -> int:
        """Resident set size in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    @property
    def cpu(self) -> float:
        """CPU seconds used so far (user + system)."""
        return proc_cpu(self.proc.pid)

    def metric(self, name: str, timeout: float = 5) -> float | None:
        """A gauge or counter from the gateway's /metrics (None for the baselines); the gateway
        answers between callbacks, so a long one (a fan-out) delays the answer."""
        if self.kind != "gateway":
            return None
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(f"eventbus_{name} "):
                    return float(line.split()[1])
        return None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Usage:
    """CPU used over an interval by the server, each client-side process, and core 1 as a whole:
    the evidence that the server, not the load generator, is the bottleneck."""

    def __init__(self, server: Server, loadgen: LoadGen, redis_pid: int) -> None:
        self.pids = {
            "server": server.proc.pid,
            "loadgen": [proc.pid for proc in loadgen.procs],
            "redis": redis_pid,
            "publisher": os.getpid(),
        }
        self.ours = {server.proc.pid, redis_pid, os.getpid(), *self.pids["loadgen"]}
        self.start = time.monotonic()
        self.before = self._sample()
        self.others_before = self._others()
        self.core = core_busy(CLIENT_CPU)

    def _sample(self) -> dict[str, float]:
        out = {}
        for name, pids in self.pids.items():
            pids = pids if isinstance(pids, list) else [pids]
            out[name] = sum(proc_cpu(pid) for pid in pids)
        return out

    def _others(self) -> dict[int, float]:
        """CPU seconds so far of every other user-space process on the machine (other work on a
        shared machine makes the figures worse; the report flags measurements it disturbed)."""
        out = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) in self.ours:
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == "2" or entry.name == "2":  # kernel threads (children of kthreadd)
                continue
            out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return out

    def done(self) -> dict[str, float]:
        elapsed = time.monotonic() - self.start
        after = self._sample()
        out = {name: round((after[name] - self.before[name]) / elapsed, 3) for name in after}
        others = self._others()
        # Processes that started during the interval count in full; those that ended are lost.
        used = sum(cpu - self.others_before.get(pid, 0.0) for pid, cpu in others.items())
        out["others"] = round(max(0.0, used) / elapsed, 3)
        out["core1"] = round(self.core(), 3)
        return out


def core_busy(cpu: int) -> Callable[[], float]:
    """Start measuring how busy one core is; the returned function gives the busy fraction."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith(f"cpu{cpu} "):
                    values = [int(v) for v in line.split()[1:]]
                    idle = values[3] + values[4]
                    return sum(values), idle
        return 0, 0

    total0, idle0 = sample()

    def done() -> float:
        total1, idle1 = sample()
        elapsed = total1 - total0
        return 1.0 - (idle1 - idle0) / elapsed if elapsed else 0.0

    return done


# --- publishing ----------------------------------------------------------------------------------


def event(project_id: int, n: int, *, timed: bool = True) -> BlockerResolved:
    """A contract event carrying its publish time (ns) in ``answer`` (``t<ns>``, which the load
    generator measures; ``w<ns>`` for a warm-up event it only counts)."""
    return BlockerResolved(
        project_id=project_id,
        blocker_id=n,
        answer=f"{'t' if timed else 'w'}{time.time_ns()} from bench.gateway",
        resolved_at=utc_now(),
    )


class Pump:
    """Publishes to the clients' projects round-robin, keeping ``inflight`` events per subscriber
    in flight (published but not yet counted by the clients): as fast as the server delivers.

    Deliveries expected = sum over projects of events published x that project's subscribers.
    """

    def __init__(self, publisher: Publisher, loadgen: LoadGen) -> None:
        self.publisher = publisher
        self.loadgen = loadgen
        stats = loadgen.stats()
        self.subscribers: dict[int, int] = stats["projects"]
        self.projects = sorted(self.subscribers)
        self.clients = stats["clients"]
        self.base = loadgen.frames
        self.expected = 0  # deliveries
        self.published = 0  # events
        self.n = 0

    def outstanding(self) -> int:
        return self.expected - (self.loadgen.frames - self.base)

    def run_until(self, deadline: float, inflight: int) -> None:
        projects = self.projects
        subscribers = self.subscribers
        per_project = max(1, self.clients // len(projects))
        limit = inflight * self.clients
        threshold = max(per_project, limit // 2)
        while time.monotonic() < deadline:
            room = limit - self.outstanding()
            if room < threshold:
                time.sleep(0.0003)
                continue
            batch = []
            while room > 0 and len(batch) < 2000:
                project = projects[self.n % len(projects)]
                self.n += 1
                batch.append(event(project, self.n))
                room -= subscribers[project]
                self.expected += subscribers[project]
            self.publisher.publish_many(batch)
            self.published += len(batch)

    def settle(self, timeout: float = 30.0) -> bool:
        """Wait until every published event has been counted by every client."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.outstanding() <= 0:
                return True
            time.sleep(0.01)
        return False


# --- scenarios ------------------------------------------------------------------------------------


class Run:
    """One server under test with its load generator, publisher and Redis connection."""

    def __init__(self, kind: str, redis: BenchRedis, p: Params) -> None:
        self.kind = kind
        self.p = p
        self.redis_pid = redis.process.pid
        self.rconn = redis.client()
        self.rconn.flushall()
        self.publisher = Publisher.from_url(redis.url)
        self.server = Server(kind, redis.url)
        self.loadgen = LoadGen(
            "127.0.0.1",
            self.server.port,
            workers=p.workers,
            sources=[f"127.0.0.{i}" for i in range(1, 9)],
            cpus={CLIENT_CPU} if pinning() else None,
            transport=TRANSPORTS.get(kind, "websocket"),
        )

    def close(self) -> None:
        self.loadgen.quit()
        self.server.stop()
        self.publisher.close()
        self.rconn.close()

    def usage(self) -> Usage:
        return Usage(self.server, self.loadgen, self.redis_pid)

    def memory(self, projects: list[int]) -> dict:
        """Connect ``clients`` idle subscribers; RSS delta per connection."""
        loadgen, server, p = self.loadgen, self.server, self.p
        # Warm the server up (imports, first feed), then take the idle baseline.
        loadgen.connect([(projects[0], None, None)])
        loadgen.close()
        time.sleep(0.5)
        rss0 = server.rss
        specs = [(projects[i % len(projects)], None, None) for i in range(p.clients)]
        connected = loadgen.connect(specs, inflight=p.inflight_connects)
        time.sleep(1.0)
        rss1 = server.rss
        return {
            "clients": connected["clients"],
            "failed": connected["failed"],
            "connect_seconds": round(connected["seconds"], 3),
            "rss_before_mib": round(rss0 / 2**20, 1),
            "rss_after_mib": round(rss1 / 2**20, 1),
            "kib_per_conn": round((rss1 - rss0) / max(1, connected["clients"]) / 1024, 2),
        }

    def throughput(self) -> dict:
        """Deliveries/s to the current subscribers: median of fixed windows after a warm-up."""
        p, loadgen = self.p, self.loadgen
        pump = Pump(self.publisher, loadgen)
        loadgen.lowat(p.lowat)
        pump.run_until(time.monotonic() + p.warmup, p.inflight_events)
        # Windows during which other processes on the machine took CPU are measured again (up
        # to twice as many windows in all); if too few were clean, the result says so.
        clean: list[tuple[float, dict]] = []
        noisy: list[tuple[float, dict]] = []
        while len(clean) < p.windows and len(clean) + len(noisy) < 2 * p.windows:
            t0, f0 = time.monotonic(), loadgen.frames
            usage = self.usage()
            pump.run_until(t0 + p.window, p.inflight_events)
            t1, f1 = time.monotonic(), loadgen.frames
            cpu = usage.done()
            (clean if cpu["others"] <= QUIET else noisy).append(((f1 - f0) / (t1 - t0), cpu))
        windows = clean if len(clean) >= p.windows else clean + noisy
        rates = [rate for rate, _ in windows]
        usages = [cpu for _, cpu in windows]
        loadgen.lowat(1)
        settled = pump.settle()
        stats = loadgen.stats()
        return {
            "deliveries_per_s": statistics.median(rates),
            "windows": [round(r) for r in rates],
            "noisy": len(clean) < p.windows,
            "cpu": {k: statistics.median(u[k] for u in usages) for k in usages[0]},
            "events_published": pump.published,
            "settled": settled,
            "clients": stats["clients"],
            "disconnected": stats["dead"],
        }

    def latency(self, project: int) -> dict:
        """Publish ``latency_rate`` events/s for ``latency_warmup`` + ``latency_seconds``;
        percentiles of receive time - publish time over every expected delivery after the
        warm-up.

        The warm-up (same rate, not measured, no pause after it) is there because the first
        events after an idle period are not representative on loopback: each client socket
        acknowledges its first segments after idle at once (TCP quick-ack), and on loopback
        that ACK is built and processed inside the server's own ``send``.
        """
        p, loadgen = self.p, self.loadgen
        subscribers = loadgen.stats()["clients"]
        loadgen.mode("latency")
        base = loadgen.frames
        interval = 1.0 / p.latency_rate
        warmup = int(p.latency_warmup * p.latency_rate)
        count = int(p.latency_seconds * p.latency_rate)
        start = time.monotonic()
        for i in range(warmup + count):
            if i == warmup:
                measured_from = time.monotonic()
                usage = self.usage()
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.publisher.publish(event(project, i + 1, timed=i >= warmup))
        elapsed = time.monotonic() - measured_from
        cpu = usage.done()
        expected = count * subscribers
        deadline = time.monotonic() + 15
        while loadgen.frames - base < expected + warmup * subscribers:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        arrival, handled = (sorted(samples) for samples in loadgen.latencies())
        shared = loadgen.stats()["shared"]
        loadgen.mode("count")

        def pct(samples: list[int], q: float) -> float | None:
            index = int(q * expected)
            if index >= len(samples):
                return None  # not delivered within the timeout
            return samples[index] / 1e6

        return {
            "p50_ms": pct(arrival, 0.50),
            "p99_ms": pct(arrival, 0.99),
            "max_ms": arrival[-1] / 1e6 if arrival else None,
            "handled_p50_ms": pct(handled, 0.50),
            "handled_p99_ms": pct(handled, 0.99),
            "subscribers": subscribers,
            "deliveries_per_s": round(expected / elapsed),
            "missing": expected - len(arrival),
            # Frames read together with a later one: dated by its arrival (an upper bound).
            "shared_read_share": round(shared / max(1, loadgen.frames - base), 4),
            "cpu": cpu,
        }

    def wait_connections(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.metric("connections") == count:
                return
            time.sleep(0.05)

    def resume(self, projects: list[int]) -> dict:
        """Reset every client, publish ``missed`` events per project, reconnect every client
        with its cursor; time until all are ``subscribed``, then check every seq."""
        p, loadgen = self.p, self.loadgen
        keys = Keys()
        cursors = {}
        for project in projects:
            epoch, top = self.rconn.hmget(keys.meta(project), "epoch", "seq")
            cursors[project] = (epoch.decode(), int(top))
        clients = loadgen.stats()["projects"]
        specs = [
            (project, *cursors[project]) for project, count in clients.items() for _ in range(count)
        ]
        loadgen.close()
        self.wait_connections(0)
        missed = [event(project, n + 1) for n in range(p.missed) for project in projects]
        for start in range(0, len(missed), 2000):
            self.publisher.publish_many(missed[start : start + 2000])
        usage = self.usage()
        result = loadgen.connect(specs, record=True, inflight=p.inflight_connects)
        cpu = usage.done()
        check = verify_resume(loadgen.records(), p.missed)
        loadgen.mode("count")
        return {
            "seconds": round(result["seconds"], 3),
            "clients": result["clients"],
            "failed": result["failed"],
            "exact": check["exact"],
            "problems": check["problems"],
            "cpu": cpu,
        }


def run_server(kind: str, redis: BenchRedis, p: Params, log: Callable[[str], None]) -> dict:
    if kind == "floor":
        return run_floor(redis, p, log)
    run = Run(kind, redis, p)
    out: dict = {"server": kind}
    try:
        projects = list(range(1, p.projects + 1))
        out["memory"] = m = run.memory(projects)
        log(f"  {kind}: {m['clients']} clients connected in {m['connect_seconds']:.1f} s, "
            f"{m['kib_per_conn']} KiB/connection")  # fmt: skip

        out["many_projects"] = t = run.throughput()
        t["expected"] = p.clients
        log(f"  {kind}: {t['clients']} subscribers / {p.projects} projects: "
            f"{t['deliveries_per_s']:,.0f} deliveries/s, cpu {t['cpu']}")  # fmt: skip

        if kind == "gateway":
            out["resume"] = r = run.resume(projects)
            log(f"  {kind}: {r['clients']} resumes in {r['seconds']} s, "
                f"{r['exact']}/{r['clients']} exact, cpu {r['cpu']}")  # fmt: skip

        run.loadgen.resubscribe([projects[0]] * p.clients)
        out["one_project"] = t = run.throughput()
        t["expected"] = p.clients
        log(f"  {kind}: {t['clients']} subscribers / 1 project: "
            f"{t['deliveries_per_s']:,.0f} deliveries/s, cpu {t['cpu']}")  # fmt: skip

        run.loadgen.close(run.loadgen.stats()["clients"] - p.few)
        out["few"] = t = run.throughput()
        t["expected"] = p.few
        log(f"  {kind}: {t['clients']} subscribers / 1 project: "
            f"{t['deliveries_per_s']:,.0f} deliveries/s, cpu {t['cpu']}")  # fmt: skip

        out["latency"] = lat = run.latency(projects[0])
        lat["expected"] = p.few
        log(f"  {kind}: latency at {lat['deliveries_per_s']:,} deliveries/s: "
            f"p50 {_ms(lat['p50_ms'])}, p99 {_ms(lat['p99_ms'])}, "
            f"shared reads {lat['shared_read_share']:.2%}, cpu {lat['cpu']}")  # fmt: skip
    finally:
        run.close()
    return out


def run_floor(redis: BenchRedis, p: Params, log: Callable[[str], None]) -> dict:
    """The latency figure alone, for the bare ``send()`` loop of :mod:`bench.baselines`, after
    the same phase as the other servers' latency test follows (deliveries/s to those clients):
    connections that have carried traffic answer faster than fresh ones (TCP quick-ack)."""
    run = Run("floor", redis, p)
    try:
        connected = run.loadgen.connect([(1, None, None)] * p.few, inflight=p.inflight_connects)
        run.throughput()
        lat = run.latency(1)
        lat["expected"] = p.few
        log(f"  floor: {connected['clients']} subscribers, latency at "
            f"{lat['deliveries_per_s']:,} deliveries/s: p50 {_ms(lat['p50_ms'])}, "
            f"p99 {_ms(lat['p99_ms'])}, shared reads {lat['shared_read_share']:.2%}, "
            f"cpu {lat['cpu']}")  # fmt: skip
    finally:
        run.close()
    return {"server": "floor", "latency": lat}


# --- report ---------------------------------------------------------------------------------------

#: Figure name -> (row label template, unit, True when higher is better).
FIGURES = {
    "few": ("deliveries/s, {few:,} subscribers, 1 project", "/s", True),
    "one_project": ("deliveries/s, {clients:,} subscribers, 1 project", "/s", True),
    "many_projects": ("deliveries/s, {clients:,} subscribers, {projects} projects", "/s", True),
    "p50_ms": ("latency p50, {few:,} subscribers x {latency_rate} events/s", "ms", False),
    "p99_ms": ("latency p99, {few:,} subscribers x {latency_rate} events/s", "ms", False),
    "kib_per_conn": ("memory per idle connection ({clients:,} connections)", "KiB", False),
    "resume_s": ("{clients:,} resumes x {missed} missed events", "s", False),
}
INF = float("inf")


def figures(result: dict) -> dict[str, tuple[float | None, bool]]:
    """One run's figures for one server: name -> (value, flagged). A figure is flagged when
    other processes disturbed it, or when fewer clients than planned took part (failures)."""
    out: dict[str, tuple[float | None, bool]] = {}
    for key in ("few", "one_project", "many_projects"):
        if key in result:
            r = result[key]
            short = r["clients"] < r.get("expected", 0)
            out[key] = (r["deliveries_per_s"], r["noisy"] or short)
    if "latency" in result:
        lat = result["latency"]
        noisy = lat["cpu"]["others"] > QUIET or lat["subscribers"] < lat.get("expected", 0)
        out["p50_ms"] = (INF if lat["p50_ms"] is None else lat["p50_ms"], noisy)
        out["p99_ms"] = (INF if lat["p99_ms"] is None else lat["p99_ms"], noisy)
    if "memory" in result:
        out["kib_per_conn"] = (result["memory"]["kib_per_conn"], result["memory"]["failed"] > 0)
    if "resume" in result:
        r = result["resume"]
        ok = r["exact"] == r["clients"] and not r["failed"]
        out["resume_s"] = (r["seconds"] if ok else INF, r["cpu"]["others"] > QUIET)
    return out


def medians(runs: list[dict[str, dict]]) -> dict[str, dict[str, tuple[float | None, bool]]]:
    """Per server and figure: the median over runs, and whether any run was disturbed."""
    out: dict[str, dict[str, tuple[float | None, bool]]] = {}
    for kind in SERVERS:
        per_run = [figures(run[kind]) for run in runs if kind in run]
        if not per_run:
            continue
        out[kind] = {}
        for name in FIGURES:
            values = [f[name] for f in per_run if name in f]
            if values:
                out[kind][name] = (
                    statistics.median(v for v, _ in values),
                    any(noisy for _, noisy in values),
                )
    return out


def _ms(value: float | None) -> str:
    return "not delivered" if value is None else f"{value:.1f} ms"


def _cell(name: str, value: float | None, noisy: bool) -> str:
    unit = FIGURES[name][1]
    if value is None:
        text = "-"
    elif value == INF:
        text = "not delivered" if name.startswith("p") else "incomplete"
    elif unit == "/s":
        text = f"{value:,.0f}"
    elif unit == "ms":
        text = f"{value:.1f} ms"
    elif unit == "KiB":
        text = f"{value:.1f} KiB"
    else:
        text = f"{value:.2f} s"
    return text + (" *" if noisy else "")


def table(summary: dict[str, dict[str, tuple[float | None, bool]]], p: Params) -> str:
    kinds = [k for k in SERVERS if k in summary]
    rows = [("", [LABELS[k] for k in kinds])]
    for name, (label, _unit, _higher) in FIGURES.items():
        cells = []
        for kind in kinds:
            if name == "resume_s" and kind != "gateway":
                cells.append("n/a (no replay)")
            elif name not in summary[kind]:
                cells.append("n/a")  # not measured for this server (the floor: latency only)
            else:
                cells.append(_cell(name, *summary[kind][name]))
        rows.append((label.format(**vars(p)), cells))
    width0 = max(len(r[0]) for r in rows)
    widths = [max(len(r[1][i]) for r in rows) for i in range(len(kinds))]
    lines = []
    for label, cells in rows:
        padded = [c.rjust(w) for c, w in zip(cells, widths, strict=True)]
        lines.append((label.ljust(width0) + "  " + "  ".join(padded)).rstrip())
    return "\n".join(lines)


def _ratio(name: str, ours: float, theirs: float) -> str:
    higher = FIGURES[name][2]
    if theirs in (0, INF) or ours in (0, INF):
        return "-"
    return f"x{ours / theirs:.2f}" if higher else f"x{theirs / ours:.2f}"


def check_targets(summary: dict[str, dict[str, tuple[float | None, bool]]], p: Params) -> list[str]:
    """One line per target of the gateway: met or missed, with the ratios to both baselines
    (x2.0 = twice as good: twice the rate, or half the latency, memory or time)."""
    g = summary.get("gateway")
    if not g:
        return []
    others = {k: summary[k] for k in BASELINES if k in summary}
    limits = {
        "few": TARGETS["throughput"],
        "one_project": TARGETS["throughput"],
        "many_projects": TARGETS["throughput"],
        "p99_ms": TARGETS["p99_ms"],
        "kib_per_conn": TARGETS["kib_per_conn"],
        "resume_s": TARGETS["resume_s"],
    }
    out = []
    for name in FIGURES:
        if name not in g:
            continue
        value = g[name][0]
        assert value is not None
        higher = FIGURES[name][2]
        ok = True
        if name in limits:
            ok = value >= limits[name] if higher else value <= limits[name]
        ratios = []
        for kind, theirs in others.items():
            if name not in theirs:
                continue
            other = theirs[name][0]
            assert other is not None
            ok = ok and (value > other if higher else value < other)
            ratios.append(f"{_ratio(name, value, other)} vs {LABELS[kind]}")
        label = FIGURES[name][0].format(**vars(p))
        limit = f" (target {limits[name]:,})" if name in limits else ""
        out.append(
            f"[{'met' if ok else 'MISSED'}] {label}: {_cell(name, *g[name])}{limit}; "
            + (", ".join(ratios) or "no baseline")
        )
    floor = summary.get("floor", {}).get("p99_ms")
    if floor and "p99_ms" in g and floor[0] not in (None, INF):
        ours = g["p99_ms"][0]
        out.append(
            f"[info] latency p99 against the bare send() loop on this machine: gateway "
            f"{_cell('p99_ms', *g['p99_ms'])}, floor {_cell('p99_ms', *floor)} "
            f"(gateway/floor {ours / floor[0]:.2f})"
        )
    return out


@contextlib.contextmanager
def pinned_to_client_core() -> Iterator[None]:
    if pinning():
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {CLIENT_CPU})
        try:
            yield
        finally:
            os.sched_setaffinity(0, before)
    else:
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gateway", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (under a minute)")
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help=f"comma-separated subset of {SERVERS}"
    )
    parser.add_argument("--clients", type=int, help="subscribers for the 10,000 figures")
    parser.add_argument(
        "--runs", type=int, default=1, help="repeat everything; the report shows medians"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    p = Params(**vars(QUICK)) if args.quick else Params()
    if args.clients:
        p.clients = args.clients
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    for kind in kinds:
        if kind not in SERVERS:
            parser.error(f"unknown server {kind!r}")
    if "socketio" in kinds and (why := socketio_missing()):
        parser.error(f"the socketio baseline cannot run: {why} (or leave it out of --servers)")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    nofile = raise_nofile()
    if nofile < p.clients + 100:
        log(f"warning: RLIMIT_NOFILE is {nofile}; {p.clients} connections may not fit")
    if not pinning():
        log("warning: fewer than 2 CPUs available; server and load generator are not pinned")
    started = time.monotonic()
    runs: list[dict[str, dict]] = []
    with pinned_to_client_core():
        redis_process = BenchRedis(CLIENT_CPU, "--maxclients", "15000")
        try:
            for run in range(args.runs):
                results: dict[str, dict] = {}
                for kind in kinds:
                    log(f"bench.gateway: {LABELS[kind]} (run {run + 1} of {args.runs})")
                    results[kind] = run_server(kind, redis_process, p, log)
                runs.append(results)
        finally:
            redis_process.close()
    elapsed = time.monotonic() - started
    summary = medians(runs)
    print()
    print(
        f"Gateway: {os.cpu_count()} cores, server on core {SERVER_CPU}, load generator + "
        f"publisher + Redis on core {CLIENT_CPU}; {'quick' if args.quick else 'full'} run"
        f"{f', median of {args.runs} runs' if args.runs > 1 else ''}, {elapsed:.0f} s, "
        f"{datetime.now(UTC):%Y-%m-%d}"
    )
    print(table(summary, p))
    if any(noisy for figs in summary.values() for _, noisy in figs.values()):
        print(
            f"* other processes used more than {QUIET:.0%} of a core during that measurement, "
            "or fewer clients than planned took part (see the JSON)"
        )
    if not args.quick:
        for line in check_targets(summary, p):
            print(line)
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine(),
                "params": vars(p),
                "summary": {k: {n: v for n, (v, _) in f.items()} for k, f in summary.items()},
                "runs": runs,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
