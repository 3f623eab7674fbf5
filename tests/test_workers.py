"""``--workers``: the restart policy and the group view without a gateway, then real groups."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from gateway.workers import RestartPolicy, resolve_workers, worker_command


def test_a_worker_that_ran_long_is_restarted_at_once_a_crash_loop_backs_off() -> None:
    policy = RestartPolicy(healthy_after=10, base=0.5, cap=4)
    assert policy.delay(0, uptime=60) == 0
    assert [policy.delay(0, uptime=1) for _ in range(5)] == [0.5, 1, 2, 4, 4]
    assert policy.delay(1, uptime=1) == 0.5  # per worker
    assert policy.delay(0, uptime=10) == 0  # healthy again: the record is forgotten
    assert policy.delay(0, uptime=1) == 0.5


def test_workers_setting_and_worker_command() -> None:
    assert resolve_workers("auto") == len(os.sched_getaffinity(0))
    assert resolve_workers("3") == 3 and resolve_workers(2) == 2
    with pytest.raises(ValueError):
        resolve_workers("0")
    with pytest.raises(ValueError):
        resolve_workers("many")
    command = worker_command(["--port", "9", "--workers", "4", "--workers=auto", "--no-auth"])
    assert command == [sys.executable, "-m", "gateway", "--port", "9", "--no-auth"]


_WORKER = textwrap.dedent(
    """
    import sys
    from gateway.group import GroupView
    from gateway.metrics import Metrics

    metrics = Metrics()
    metrics.gauge("connections", "Open WebSocket connections.", lambda: int(sys.argv[1]))
    view = GroupView(metrics, workers=2, directory=sys.argv[3])
    metrics.deliveries_total = int(sys.argv[1]) * 10
    metrics.relay_lag.observe(0.002)
    view.sync(ready=sys.argv[2] == "ready")
    metrics.deliveries_total += 1
    view.sync(ready=sys.argv[2] == "ready")
    print(view.ready_workers(sys.argv[2] == "ready"))
    """
)


def _run_worker(directory: str, connections: int, ready: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
    return subprocess.run(
        [sys.executable, "-c", _WORKER, str(connections), ready, directory],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )


def _group_samples(directory: str) -> dict[str, float]:
    script = textwrap.dedent(
        """
        import sys
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=sys.argv[1])
        for family in registry.collect():
            for sample in family.samples:
                if not sample.labels or sample.labels.get("le") == "0.0025":
                    print(sample.name, sample.value)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, directory],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory},
    ).stdout
    return {name: float(value) for name, value in (line.split() for line in out.splitlines())}


def test_the_group_view_adds_up_every_worker_and_readiness_needs_all(tmp_path) -> None:
    from prometheus_client import multiprocess

    directory = str(tmp_path)
    first = _run_worker(directory, connections=3, ready="ready")
    assert first.stdout.strip() == "1"  # one of two workers ready: the group is not
    second = _run_worker(directory, connections=4, ready="ready")
    assert second.stdout.strip() == "2"
    samples = _group_samples(directory)
    assert samples["eventbus_deliveries_total"] == 30 + 1 + 40 + 1
    assert samples["eventbus_connections"] == 7
    assert samples["eventbus_worker_ready"] == 2
    assert samples["eventbus_relay_lag_seconds_bucket"] == 2
    # A dead worker's gauges leave the view; its counters stay (totals never go backwards).
    for name in os.listdir(directory):
        pid = int(name.rsplit("_", 1)[1].removesuffix(".db"))
        multiprocess.mark_process_dead(pid, directory)
    samples = _group_samples(directory)
    assert samples["eventbus_deliveries_total"] == 72
    assert samples.get("eventbus_connections", 0) == 0
    assert samples.get("eventbus_worker_ready", 0) == 0


# --- real groups ------------------------------------------------------------------------------

import json  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

from schemas.keys import Keys  # noqa: E402
from tests.support.gateway_process import GatewayProcess, parse_metrics  # noqa: E402
from tests.support.ws_client import (  # noqa: E402
    Publishers,
    ResumingClient,
    stop_clients,
    verify_clients,
    wait_live,
    wait_until,
)


def _healthz(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
        return json.loads(response.read())


def _worker_pids(port: int, workers: int, within: float = 20.0) -> dict[str, int]:
    """Ask /healthz until every worker answered once (the kernel picks one per connection)."""
    seen: dict[str, int] = {}
    deadline = time.monotonic() + within
    while len(seen) < workers:
        assert time.monotonic() < deadline, f"workers seen: {seen}"
        answer = _healthz(port)
        seen[answer["worker"]] = answer["pid"]
    return seen


async def test_a_worker_group_shares_the_port_and_answers_for_all(redis_url) -> None:
    group = GatewayProcess(redis_url, args=["--workers", "2", "--drain-timeout", "5"])
    with group:
        pids = _worker_pids(group.port, 2)
        assert len(set(pids.values())) == 2
        status, body = group.readyz()
        assert status == 200 and body["checks"]["all_workers"] is True
        clients = [ResumingClient([group.ws_url], [1], name=str(i)).start() for i in range(20)]
        try:
            await wait_live(clients)
            # One /metrics from any worker sums the group: all 20 connections, wherever they are.
            await wait_until(
                lambda: (
                    parse_metrics(group.get("/metrics")[1].decode()).get("eventbus_connections")
                    == 20
                ),
                5,
                "the group's connection gauge",
            )
        finally:
            await stop_clients(clients)
        assert group.terminate(timeout=20) == 0


async def test_exactly_once_across_a_worker_kill_and_the_worker_comes_back(redis_url) -> None:
    group = GatewayProcess(redis_url, args=["--workers", "2"])
    with group:
        pids = _worker_pids(group.port, 2)
        clients = [ResumingClient([group.ws_url], [1, 2], name=str(i)).start() for i in range(24)]
        publishers = Publishers(redis_url, [1, 2], count=2, rate=100).start()
        try:
            await wait_live(clients)
            await publishers.wait_published(100)
            victim = pids["1"]
            os.kill(victim, signal.SIGKILL)
            await publishers.wait_published(200)
            # The supervisor starts worker 1 again (a new process) and the group is ready again.
            await wait_until(
                lambda: _healthz_pids(group.port).get("1") not in (None, victim),
                20,
                "worker 1 restarted",
            )
            await wait_until(lambda: group.readyz()[0] == 200, 20, "group ready again")
            await publishers.wait_published(100)
        finally:
            await publishers.stop()
        try:
            await verify_clients(clients, redis_url, keys=Keys())
        finally:
            await stop_clients(clients)
        reconnected = sum(c.stats.connects > 1 for c in clients)
        assert reconnected >= 1, "no client was on the killed worker"
        assert group.terminate(timeout=30) == 0


def _healthz_pids(port: int) -> dict[str, int]:
    seen: dict[str, int] = {}
    for _ in range(20):
        answer = _healthz(port)
        seen[answer["worker"]] = answer["pid"]
    return seen


async def test_sigterm_drains_every_worker_and_the_supervisor_exits(redis_url) -> None:
    group = GatewayProcess(redis_url, args=["--workers", "2", "--drain-timeout", "3"])
    with group:
        pids = _worker_pids(group.port, 2)
        clients = [ResumingClient([group.ws_url], [1], name=str(i)).start() for i in range(10)]
        await wait_live(clients)
        started = time.monotonic()
        assert group.terminate(timeout=20) == 0
        assert time.monotonic() - started < 3 + 5 + 2
        for pid in pids.values():
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        await stop_clients(clients)
        # (counted in the text, not by line: two workers writing at the same moment to the
        # output they share can interleave their lines)
        drained = sum(line.count('"event": "drained"') for line in group.log_lines("drained"))
        assert drained == 2, group.tail()


async def test_workers_die_with_a_killed_supervisor(redis_url) -> None:
    group = GatewayProcess(redis_url, args=["--workers", "2"])
    with group:
        pids = _worker_pids(group.port, 2)
        group.kill()

        def gone() -> bool:
            for pid in pids.values():
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    continue
                return False
            return True

        await wait_until(gone, 15, "workers exited after their supervisor")


async def test_the_group_exports_every_metric_a_single_gateway_exports(redis_url) -> None:
    def names(text: str) -> set[str]:
        return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}

    with GatewayProcess(redis_url) as single:
        alone = names(single.get("/metrics")[1].decode())
    with GatewayProcess(redis_url, args=["--workers", "2"]) as group:
        grouped = names(group.get("/metrics")[1].decode())
    assert grouped == alone | {"eventbus_worker_ready", "eventbus_workers"}


async def test_a_worker_starting_when_the_stop_signal_comes_is_drained_too(monkeypatch, tmp_path):
    # SIGTERM landing while a dead worker is being started again: that worker was not yet among
    # the ones the supervisor signalled, and the supervisor returned with it still running,
    # unsupervised (it shares the port: it accepts clients). It is signalled and waited for.
    import asyncio
    import signal

    from gateway.workers import Supervisor

    marker = tmp_path / "drained"
    script = textwrap.dedent(
        f"""
        import signal, sys, time
        def drain(*_):
            with open({str(marker)!r}, "a") as f:
                f.write("drained\\n")
            sys.exit(0)
        signal.signal(signal.SIGTERM, drain)
        print("up", flush=True)
        while True:
            time.sleep(1)
        """
    )
    supervisor = Supervisor(
        [sys.executable, "-c", script], 1, drain_timeout=5, policy=RestartPolicy(base=0.0)
    )
    started: list[asyncio.subprocess.Process] = []
    first_started = asyncio.Event()
    real = asyncio.create_subprocess_exec

    def catches_sigterm(pid: int) -> bool:
        """Whether the worker's SIGTERM handler (its drain, here a marker file) is in place."""
        with open(f"/proc/{pid}/status") as status:
            caught = next(line for line in status if line.startswith("SigCgt:"))
        return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))

    async def starting_slowly(*args, **kwargs):
        process = await real(*args, **kwargs)
        if started:  # the second start: the signal comes while it is under way
            async with asyncio.timeout(10):
                while not catches_sigterm(process.pid):  # noqa: ASYNC110 - /proc has no event
                    await asyncio.sleep(0.01)
            supervisor.stop()
            await asyncio.sleep(0.5)  # the supervisor's _stop runs meanwhile
        started.append(process)
        first_started.set()
        return process

    monkeypatch.setattr(asyncio, "create_subprocess_exec", starting_slowly)
    run = asyncio.create_task(supervisor.run())
    await first_started.wait()
    started[0].send_signal(signal.SIGKILL)  # dies; its keeper starts it again
    async with asyncio.timeout(15):
        assert await run == 0
    assert len(started) == 2
    assert started[1].returncode == 0, "the worker started last was left running"
    assert marker.read_text() == "drained\n"  # the second worker's, on SIGTERM
