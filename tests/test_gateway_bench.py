"""Smoke tests of the gateway benchmark (``make bench``), so that it cannot rot unnoticed, and of
what its load generator claims about its measurements. The figures themselves are only
meaningful from a full run on a quiet machine (docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.common import BenchRedis
from bench.gateway import (
    SERVERS,
    Params,
    Server,
    check_targets,
    event,
    figures,
    medians,
    run_server,
    socketio_missing,
    table,
)
from bench.loadgen import LoadGen, raise_nofile
from publisher import Publisher

ROOT = Path(__file__).resolve().parents[1]

TINY = Params(
    clients=120,
    few=40,
    projects=4,
    warmup=0.2,
    window=0.3,
    windows=1,
    latency_warmup=0.2,
    latency_seconds=0.5,
    missed=5,
    workers=1,
    inflight_connects=64,
)


@pytest.fixture(scope="module")
def bench_redis():
    raise_nofile()
    redis = BenchRedis(None)
    yield redis
    redis.close()


@pytest.fixture(scope="module")
def socketio_installed() -> None:
    """``make bench-socketio`` (``npm ci`` of the committed lock file), the target ``make bench``
    depends on: the socket.io baseline is installed and measured here, never skipped."""
    try:
        done = subprocess.run(
            ["make", "bench-socketio"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("make bench-socketio took over 600 s")
    if done.returncode:
        pytest.fail(f"make bench-socketio failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    assert socketio_missing() is None


def wait_for(condition, timeout: float = 10.0) -> None:
    """Poll ``condition`` (the load generator's shared counters or stats) until true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.01)


def test_socketio_baseline_delivers_each_event_once_to_its_room_and_pings_are_not_deliveries(
    bench_redis, socketio_installed
) -> None:
    """Through the load generator's socket.io client: every client joins its project's room
    (``subscribed``), gets exactly that project's events, and answers Engine.IO pings (every
    50 ms here; the server cuts a client off 300 ms after a ping without its pong) without
    counting them: none is cut off, no ping is a delivery."""
    publisher = Publisher.from_url(bench_redis.url)
    server = Server(
        "socketio", bench_redis.url, extra=("--ping-interval", "50", "--ping-timeout", "300")
    )
    loadgen = LoadGen("127.0.0.1", server.port, workers=1, transport="socketio")
    try:
        connected = loadgen.connect([(1, None, None)] * 5 + [(2, None, None)] * 5)
        assert (connected["clients"], connected["failed"]) == (10, 0)
        for n in range(1, 21):
            publisher.publish(event(1, n))
            if n <= 7:
                publisher.publish(event(2, n))
            time.sleep(0.01)  # spread over pings: chunks with and without them
        expected = 5 * 20 + 5 * 7
        wait_for(lambda: loadgen.frames >= expected)
        pings = loadgen.stats()["pings"]
        assert pings > 0
        wait_for(lambda: loadgen.stats()["pings"] >= pings + 2 * 10)  # two more rounds each
        stats = loadgen.stats()
        assert stats["frames"] == expected  # not one ping counted, no event twice
        assert (stats["clients"], stats["dead"]) == (10, 0)  # every ping answered in time
    finally:
        loadgen.quit()
        server.stop()
        publisher.close()


def test_every_server_is_measured_and_reported(bench_redis, socketio_installed) -> None:
    logged: list[str] = []
    results = {kind: run_server(kind, bench_redis, TINY, logged.append) for kind in SERVERS}

    gateway = results["gateway"]
    assert gateway["memory"]["clients"] == TINY.clients
    for scenario in ("many_projects", "one_project", "few"):
        assert gateway[scenario]["deliveries_per_s"] > 0, scenario
        assert gateway[scenario]["settled"], scenario  # every published event was delivered
    assert gateway["resume"]["exact"] == TINY.clients  # each client exactly its missed events
    for kind in SERVERS:
        latency = results[kind]["latency"]
        assert latency["missing"] == 0, kind
        assert 0 < latency["p50_ms"] <= latency["p99_ms"], kind
    assert set(figures(results["floor"])) == {"p50_ms", "p99_ms"}

    summary = medians([results])
    text = table(summary, TINY)
    assert "send() floor" in text and "n/a (no replay)" in text
    lines = check_targets(summary, TINY)
    assert any(line.startswith("[info] latency p99 against the bare send() loop") for line in lines)
    assert not any("floor" in line for line in lines if not line.startswith("[info]"))


async def test_frames_read_together_are_counted_as_dated_late(gateways, publisher) -> None:
    """Two events reach a client's socket ``GAP`` apart while its worker is stopped: one read
    then returns both, dated by the second's arrival. The load generator must say so."""
    gap = 0.3
    gateway = await gateways(no_auth=True, auth_secret=None)
    loadgen = LoadGen("127.0.0.1", gateway.port, workers=1)

    async def delivered(count: int) -> None:
        async with asyncio.timeout(10):
            while gateway.metrics.deliveries_total < count:  # noqa: ASYNC110 - a counter
                await asyncio.sleep(0.005)

    try:
        assert (await asyncio.to_thread(loadgen.connect, [(1, None, None)]))["clients"] == 1
        loadgen.mode("latency")
        await asyncio.to_thread(loadgen.stats)  # answered after the mode switch
        await publisher.publish(event(1, 1))  # read at once: its own arrival
        await delivered(1)
        async with asyncio.timeout(10):
            while loadgen.frames < 1:  # noqa: ASYNC110 - a shared-memory counter
                await asyncio.sleep(0.005)
        worker = loadgen.procs[0].pid
        os.kill(worker, signal.SIGSTOP)
        try:
            await publisher.publish(event(1, 2))
            await delivered(2)
            await asyncio.sleep(gap)  # the gap itself, not a wait for something
            await publisher.publish(event(1, 3))
            await delivered(3)
        finally:
            os.kill(worker, signal.SIGCONT)
        async with asyncio.timeout(10):
            while loadgen.frames < 3:  # noqa: ASYNC110 - a shared-memory counter
                await asyncio.sleep(0.005)
        stats = await asyncio.to_thread(loadgen.stats)
        arrival, _handled = await asyncio.to_thread(loadgen.latencies)
        assert stats["shared"] == 1  # event 2, read with event 3
        late = sorted(arrival)
        assert late[0] < gap / 2 * 1e9  # event 1 or 3: its own arrival
        assert late[-1] >= gap * 1e9  # event 2: dated by event 3's arrival, an upper bound
    finally:
        await asyncio.to_thread(loadgen.quit)
