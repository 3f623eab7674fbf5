"""serverkit: what the gateway and the HTTP publish API share about running as a server (the
descriptor limit at start, log throttling), without importing each other."""

from __future__ import annotations

import asyncio
import gc
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from serverkit import LIMIT_HINT, KeyedSingleFlight, LogThrottle, SingleFlight, warn_lowered
from tests.support.ws_client import wait_until

ROOT = Path(__file__).resolve().parents[1]


def test_log_throttle_allows_a_burst_per_kind_per_interval_and_counts_the_rest():
    now = [0.0]
    throttle = LogThrottle(interval=60, burst=2, clock=lambda: now[0])
    assert [throttle.allow("a") for _ in range(5)] == [0, 0, None, None, None]
    assert throttle.allow("b") == 0, "kinds are limited separately"
    now[0] = 60.0
    assert throttle.allow("a") == 3, "the first line of a new interval says how many were dropped"
    assert throttle.allow("a") == 0


def test_a_throttle_of_one_line_logs_one_an_interval_after_the_last_from_the_first_on():
    """The HTTP API's "Redis unavailable" warning, at most one a second, is this throttle with a
    burst of 1: a line is logged once a second has passed since the last one logged, the first
    one too. (The gateway's throttle started its first interval when it was made: a line half a
    second after that and another 0.7 s later would both have been logged.)"""
    now = [0.0]
    throttle = LogThrottle(interval=1.0, burst=1, clock=lambda: now[0])
    logged = []
    for at in (0.5, 1.2, 1.4, 1.5, 2.49, 2.6):
        now[0] = at
        suppressed = throttle.allow("unavailable")
        if suppressed is not None:
            logged.append((at, suppressed))
    assert logged == [(0.5, 0), (1.5, 2), (2.6, 1)]


def _run(code: str, soft: int) -> str:
    """``code`` in a fresh interpreter whose soft descriptor limit is ``soft``."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        preexec_fn=lower,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip("needs a finite hard limit above 256")
    out = _run(
        "import resource; from serverkit import raise_descriptor_limit as r; "
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], r(), "
        "resource.getrlimit(resource.RLIMIT_NOFILE)[0])",
        soft=256,
    )
    assert out.split() == ["256", str(hard), str(hard)]


def test_a_lowered_bound_is_a_warning_with_the_hint():
    with structlog.testing.capture_logs() as logs:
        warn_lowered(structlog.get_logger("x"), "max_connections", 20_000, 19_680, 20_000)
    assert logs == [
        {
            "event": "max_connections lowered to fit the descriptor limit",
            "configured": 20_000,
            "effective": 19_680,
            "descriptor_limit": 20_000,
            "hint": LIMIT_HINT,
            "log_level": "warning",
        }
    ]
    assert "ulimit -n" in LIMIT_HINT


# --- SingleFlight -----------------------------------------------------------------------------


async def test_concurrent_calls_share_one_run_and_the_next_call_starts_another() -> None:
    runs = 0
    gate = asyncio.Event()

    async def ping() -> int:
        nonlocal runs
        runs += 1
        await gate.wait()
        return runs

    ping_once = SingleFlight(ping)
    waiting = [asyncio.ensure_future(ping_once()) for _ in range(300)]
    await asyncio.sleep(0)
    assert ping_once.in_flight
    gate.set()
    assert await asyncio.gather(*waiting) == [1] * 300
    assert not ping_once.in_flight
    assert await ping_once() == 2  # an ended run is never reused


async def test_a_caller_that_leaves_does_not_cancel_the_run_for_the_others() -> None:
    gate = asyncio.Event()

    async def ping() -> str:
        await gate.wait()
        return "pong"

    ping_once = SingleFlight(ping)
    leaving, staying = asyncio.ensure_future(ping_once()), asyncio.ensure_future(ping_once())
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    gate.set()
    assert await staying == "pong"
    assert leaving.cancelled()


async def test_a_failed_run_reaches_its_callers_and_is_retrieved_without_them() -> None:
    gate = asyncio.Event()

    async def ping() -> None:
        await gate.wait()
        raise ConnectionError("down")

    ping_once = SingleFlight(ping)
    unretrieved: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: unretrieved.append(context))
    callers = [asyncio.ensure_future(ping_once()) for _ in range(3)]
    await asyncio.sleep(0)
    callers[0].cancel()  # this one leaves before the run fails
    gate.set()
    results = await asyncio.gather(*callers[1:], return_exceptions=True)
    assert [repr(r) for r in results] == [repr(ConnectionError("down"))] * 2
    # The next call starts a new run, and a failure nobody waits for is not reported either.
    gate.clear()
    alone = asyncio.ensure_future(ping_once())
    await asyncio.sleep(0)
    alone.cancel()
    gate.set()
    await asyncio.sleep(0.01)
    del callers, alone, results
    ping_once._task = None
    gc.collect()
    assert unretrieved == []


async def test_cancel_ends_the_run_in_flight_for_its_waiters() -> None:
    ping_once = SingleFlight(asyncio.Event().wait)
    waiter = asyncio.ensure_future(ping_once())
    await asyncio.sleep(0)
    ping_once.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    SingleFlight(asyncio.Event().wait).cancel()  # nothing in flight: nothing to do


# --- KeyedSingleFlight ------------------------------------------------------------------------


async def test_calls_with_one_key_share_a_run_and_other_keys_run_their_own() -> None:
    runs: list[str] = []
    gate = asyncio.Event()

    def reader(key: str):
        async def read() -> str:
            runs.append(key)
            await gate.wait()
            return f"page {key}"

        return read

    flights: KeyedSingleFlight[str, str] = KeyedSingleFlight()
    calls = [asyncio.ensure_future(flights(key, reader(key))) for key in ["a"] * 30 + ["b"]]
    await wait_until(lambda: len(runs) == 2, 2, "the runs to start")
    await asyncio.sleep(0.01)
    assert runs == ["a", "b"] and len(flights) == 2
    gate.set()
    assert await asyncio.gather(*calls) == ["page a"] * 30 + ["page b"]
    assert len(flights) == 0, "an ended run is forgotten"
    assert await flights("a", reader("a")) == "page a" and runs == ["a", "b", "a"]


async def test_a_keyed_run_ends_when_its_last_caller_leaves_not_before() -> None:
    """A poll's client that goes away stops its read: with nobody left waiting, the run is
    cancelled (it holds a queued Redis read), and its key is free at once."""
    ended: list[str] = []

    async def read() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.append("run")

    flights: KeyedSingleFlight[str, None] = KeyedSingleFlight()
    first, second = (asyncio.ensure_future(flights("k", read)) for _ in range(2))
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0.01)
    assert ended == [] and len(flights) == 1, "another caller still waits for it"
    second.cancel()
    assert len(flights) == 1  # (second has not run its cancellation yet)
    await wait_until(lambda: ended == ["run"], 2, "the run to be cancelled")
    assert len(flights) == 0


async def test_a_keyed_run_that_fails_fails_for_every_caller() -> None:
    gate = asyncio.Event()

    async def read() -> None:
        await gate.wait()
        raise ConnectionError("down")

    unretrieved: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: unretrieved.append(context))
    flights: KeyedSingleFlight[str, None] = KeyedSingleFlight()
    calls = [asyncio.ensure_future(flights("k", read)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert [repr(r) for r in results] == [repr(ConnectionError("down"))] * 3
    del calls, results
    gc.collect()
    assert unretrieved == [] and len(flights) == 0
