"""serverkit: what the gateway and the HTTP publish API share about running as a server (the
descriptor limit at start, log throttling), without importing each other."""

from __future__ import annotations

import asyncio
import gc
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_a_throttled_log_line_goes_to_the_method_given_with_the_number_dropped_before_it():
    """``LogThrottle.log``: the line's own fields, and ``suppressed`` only when lines of its kind
    were dropped since the last one logged (the gateway's and the HTTP API's log lines)."""
    now = [0.0]
    throttle = LogThrottle(interval=60, burst=1, clock=lambda: now[0])
    lines = []

    def emit(event, **fields):
        lines.append((event, fields))

    for n in range(3):
        throttle.log("down", emit, "redis unavailable", attempt=n)
    throttle.log("bad", emit, "bad request", key="k")  # another kind: its own burst
    now[0] = 60.0
    throttle.log("down", emit, "redis unavailable", attempt=3)
    assert lines == [
        ("redis unavailable", {"attempt": 0}),
        ("bad request", {"key": "k"}),
        ("redis unavailable", {"attempt": 3, "suppressed": 2}),
    ]


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


async def test_a_run_that_fails_after_every_caller_left_is_not_reported_as_never_retrieved():
    """A readiness probe whose own timeout passed before the shared ping failed (Redis down:
    the ping fails only at its socket timeout): nobody waits for the run when it fails. Its
    exception must not reach asyncio's "Task exception was never retrieved" (an error-level
    line with a traceback per probe during an outage). A cancelled ``asyncio.shield`` does not
    retrieve it once the caller's cancellation has been handled (Python 3.11.7+ removes its
    callback from the run); the test above has the run fail before that."""
    gate = asyncio.Event()

    async def ping() -> None:
        await gate.wait()
        raise ConnectionError("down")

    ping_once = SingleFlight(ping)
    unretrieved: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: unretrieved.append(context))
    caller = asyncio.ensure_future(ping_once())
    await asyncio.sleep(0)
    caller.cancel()  # the probe's timeout
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.sleep(0.01)  # long after: the caller is gone
    gate.set()
    await asyncio.sleep(0.01)
    assert not ping_once.in_flight
    del caller
    ping_once._task = None
    gc.collect()
    assert [c.get("message") for c in unretrieved] == []


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


class _Unavailable(Exception):
    """A failed run (as StoreUnavailable), carrying the run's number."""


class _Unreadable(_Unavailable):
    """A failed run of the subclass (as ProjectUnreadable): callers must get this one."""


class _Run:
    def __init__(self, number: int, key: str) -> None:
        self.number = number
        self.key = key
        self.gate: asyncio.Future = asyncio.get_running_loop().create_future()
        self.began = False  # its body ran (a task cancelled before its first step never does)
        self.cancelled = False  # its body saw the flight's cancellation
        self.outcome: str | None = None  # how the test ended it: "ok", "fail", "unreadable"


_OPS = st.one_of(
    st.tuples(st.just("join"), st.sampled_from("ab")),
    st.tuples(st.just("leave"), st.integers(0, 40)),
    st.tuples(st.just("end"), st.sampled_from("ab"), st.sampled_from(["ok", "fail", "unreadable"])),
    st.tuples(st.just("yield"), st.integers(1, 3)),
)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(_OPS, max_size=40))
def test_keyed_single_flight_keeps_its_contract_under_any_interleaving(ops) -> None:
    """KeyedSingleFlight's contract, under random interleavings of joins, callers leaving
    (cancelled), and runs ending with a result or either of two exceptions; ops between two
    ``yield`` happen in one step of the loop (a caller cancelled exactly as another joins, a run
    ended exactly as a caller leaves):

    * a caller that is not cancelled never gets CancelledError (another caller leaving, or
      joining, never ends its run), and gets the outcome of a run of its own key: that run's
      result, or its exception, of its own type;
    * a run goes on while, and only while, a caller that did not leave waits for it (one run per
      key): a run nobody waits for any more is cancelled;
    * nothing is kept: no entry once every caller is done, no exception left unretrieved."""
    asyncio.run(_interleave(ops))


async def _interleave(ops) -> None:
    loop = asyncio.get_running_loop()
    unretrieved: list[dict] = []
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    flights: KeyedSingleFlight[str, int] = KeyedSingleFlight()
    runs: list[_Run] = []
    callers: list[tuple[str, asyncio.Task]] = []
    left: set[int] = set()

    def start(key: str):
        run = _Run(len(runs), key)
        runs.append(run)

        async def body() -> int:
            run.began = True
            try:
                return await run.gate
            except asyncio.CancelledError:
                run.cancelled = True
                raise

        return body()

    for op in ops:
        if op[0] == "join":
            key = op[1]
            callers.append((key, asyncio.ensure_future(flights(key, lambda key=key: start(key)))))
        elif op[0] == "leave" and callers:
            index = op[1] % len(callers)
            if callers[index][1].cancel():
                left.add(index)
        elif op[0] == "end":
            live = [r for r in runs if r.key == op[1] and not r.gate.done()]
            if live:
                run = live[-1]
                run.outcome = op[2]
                if op[2] == "ok":
                    run.gate.set_result(run.number)
                else:
                    kind = _Unavailable if op[2] == "fail" else _Unreadable
                    run.gate.set_exception(kind(run.number))
        elif op[0] == "yield":
            for _ in range(op[1]):
                await asyncio.sleep(0)
    for _ in range(10):  # settle: cancellations and outcomes take a few steps to arrive
        await asyncio.sleep(0)
    # Now a run goes on (its gate unset and not cancelled) while, and only while, a caller of
    # its key that did not leave waits; one such run per key at most.
    for key in "ab":
        live = [r for r in runs if r.key == key and r.began and not r.gate.done()]
        waiting = [i for i, (k, task) in enumerate(callers) if k == key and not task.done()]
        assert len(live) <= 1, "two runs of one key"
        assert bool(live) == bool(waiting), (
            "a run nobody waits for goes on, or a caller waits for none"
        )
        assert not set(waiting) & left, "a caller that left still waits"
        for run in live:
            run.outcome = "ok"
            run.gate.set_result(run.number)
    if callers:
        await asyncio.wait([task for _, task in callers])
    for _ in range(5):  # the runs' own tasks end (a step each)
        await asyncio.sleep(0)

    for index, (key, task) in enumerate(callers):
        if task.cancelled():
            assert index in left, "a caller that did not leave got CancelledError"
            continue
        exc = task.exception()
        number = task.result() if exc is None else exc.args[0]
        run = runs[number]
        assert run.key == key and not run.cancelled
        expected = {"ok": None, "fail": _Unavailable, "unreadable": _Unreadable}[run.outcome]
        assert type(exc) is expected if exc is not None else expected is None
    for run in runs:
        assert run.outcome is not None or run.cancelled or not run.began
    assert len(flights) == 0
    callers.clear()  # (and what refers to the tasks and their exceptions: the loop's names)
    task = exc = run = None
    gc.collect()
    assert unretrieved == []


def test_a_library_loggers_exception_is_written_with_its_traceback_as_json() -> None:
    """uvicorn logs an exception in the ASGI app (or in the lifespan's start) through the
    stdlib, with ``exc_info``; since the HTTP API's uvicorn lines go through
    :func:`serverkit.logs.configure_logging`, its JSON line carried that as three reprs (the
    traceback a ``<traceback object at 0x...>``): where the app failed was lost, which uvicorn's
    plain text had shown. Its ``exception`` is the traceback, as in structlog's own lines."""
    program = (
        "import logging\n"
        "from serverkit.logs import configure_logging\n"
        "configure_logging('json', 'info')\n"
        "def handler():\n"
        "    raise ZeroDivisionError('in the app')\n"
        "try:\n"
        "    handler()\n"
        "except ZeroDivisionError as exc:\n"
        "    log = logging.getLogger('uvicorn.error')\n"
        "    log.error('Exception in ASGI application', exc_info=exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout == "", done.stderr
    [line] = [json.loads(text) for text in done.stderr.splitlines()]
    assert (line["level"], line["event"]) == ("error", "Exception in ASGI application")
    assert "exc_info" not in line, line
    assert line["exception"].startswith("Traceback (most recent call last):"), line
    assert (
        "in handler" in line["exception"] and "ZeroDivisionError: in the app" in line["exception"]
    )
