"""``--workers N``: one command runs N gateway processes on one port, supervised.

Each worker is a complete gateway (its own hub, its own pub/sub connection, its own clients) in a
process of its own, started as ``python -m gateway`` with the same settings. They share the port
through ``SO_REUSEPORT``: the kernel spreads new connections over the workers' listening sockets,
so no process hands connections to another. Workers know nothing of each other; every guarantee
holds per connection, exactly as it does across pods.

The supervisor (this module, the parent process) only starts, watches and stops them:

* a worker that dies is started again at once; one that keeps dying young is restarted after a
  growing delay (:class:`RestartPolicy`), so a crash loop cannot spin a core;
* SIGTERM (or SIGINT) is passed to every worker, which drains as a single gateway does; a worker
  still running ``drain_timeout`` + 5 s later is killed;
* ``/metrics`` and ``/readyz`` answer for the whole group from any worker (see
  :mod:`gateway.group`): the supervisor gives every worker the same
  ``PROMETHEUS_MULTIPROC_DIR`` and tells it the group's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.logs import get_logger

__all__ = [
    "GROUP_SIZE_ENV",
    "WORKER_ID_ENV",
    "RestartPolicy",
    "Supervisor",
    "resolve_workers",
    "worker_command",
]

log = get_logger("eventbus.workers")

#: Set by the supervisor in each worker's environment (internal: not settings for operators).
#: A gateway that finds GROUP_SIZE_ENV listens with SO_REUSEPORT and serves the group's view.
GROUP_SIZE_ENV = "EVENTBUS_GROUP_SIZE"
WORKER_ID_ENV = "EVENTBUS_WORKER_ID"

#: Seconds a worker has after ``drain_timeout`` to exit by itself before it is killed.
EXIT_GRACE = 5.0


def resolve_workers(value: str | int) -> int:
    """``auto`` is one worker per usable core; otherwise a positive integer."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    count = int(value)
    if count < 1:
        raise ValueError("workers must be >= 1 or 'auto'")
    return count


@dataclass
class RestartPolicy:
    """When to start a dead worker again. Pure: the caller passes the times.

    A worker that ran for at least ``healthy_after`` seconds is restarted at once and its record
    is forgotten. One that died younger is restarted after ``base * 2**(n-1)`` seconds (n = its
    consecutive young deaths), at most ``cap``.
    """

    healthy_after: float = 10.0
    base: float = 0.5
    cap: float = 30.0
    _young_deaths: dict[int, int] = field(default_factory=dict)

    def delay(self, worker: int, uptime: float) -> float:
        if uptime >= self.healthy_after:
            self._young_deaths.pop(worker, None)
            return 0.0
        deaths = self._young_deaths.get(worker, 0) + 1
        self._young_deaths[worker] = deaths
        return min(self.cap, self.base * 2 ** (deaths - 1))


class Supervisor:
    """Run ``workers`` copies of ``command`` and keep them running until told to stop."""

    def __init__(
        self,
        command: Sequence[str],
        workers: int,
        *,
        drain_timeout: float,
        env: dict[str, str] | None = None,
        policy: RestartPolicy | None = None,
    ) -> None:
        self.command = list(command)
        self.workers = workers
        self.drain_timeout = drain_timeout
        self.env = dict(os.environ if env is None else env)
        self.policy = policy or RestartPolicy()
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self._stopping = asyncio.Event()
        self._metrics_dir: str | None = None

    async def run(self) -> int:
        """Start the workers, restart the ones that die, and return after a stop signal once
        every worker has exited (0) or had to be killed (1)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        self._metrics_dir = tempfile.mkdtemp(prefix="eventbus-metrics-")
        try:
            keepers = [asyncio.create_task(self._keep(index)) for index in range(self.workers)]
            log.info("workers starting", workers=self.workers, supervisor_pid=os.getpid())
            await self._stopping.wait()
            return await self._stop(keepers)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def stop(self) -> None:
        """Ask :meth:`run` to drain the workers and return (what SIGTERM does)."""
        self._stopping.set()

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        env = {
            **self.env,
            # A worker is a single gateway: EVENTBUS_WORKERS=1 also overrides a group size the
            # operator set in the environment, so a worker never becomes a supervisor itself.
            "EVENTBUS_WORKERS": "1",
            GROUP_SIZE_ENV: str(self.workers),
            WORKER_ID_ENV: str(index),
            "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir or "",
        }
        process = await asyncio.create_subprocess_exec(
            *self.command, env=env, preexec_fn=_die_with_supervisor
        )
        self.processes[index] = process
        log.info("worker started", worker=index, pid=process.pid)
        return process

    async def _keep(self, index: int) -> None:
        """Keep worker ``index`` running until the group stops."""
        while not self._stopping.is_set():
            started = time.monotonic()
            process = await self._spawn(index)
            if self._stopping.is_set():
                # The stop signal came while this worker was starting: _stop signalled only the
                # workers it knew of then. It waits for this keeper, so the worker drains too.
                _signal(process, signal.SIGTERM)
            code = await process.wait()
            _forget_process(self._metrics_dir, process.pid)
            if self._stopping.is_set():
                return
            delay = self.policy.delay(index, time.monotonic() - started)
            self.restarts += 1
            log.warning(
                "worker exited; restarting", worker=index, pid=process.pid, code=code, delay=delay
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _stop(self, keepers: list[asyncio.Task]) -> int:
        """SIGTERM every worker, wait for each keeper to see its worker exit (within the drain
        timeout; a worker still running then is killed), and return 0, or 1 if one was killed.

        The keepers are what is waited for, not the workers known now: a worker being started
        when the signal came is registered only once it has started (its keeper then signals
        it). Waiting for the workers alone let the supervisor return with that one running,
        unsupervised, still accepting connections on the shared port."""
        log.info("stopping workers", workers=len(self.processes), drain_timeout=self.drain_timeout)
        for process in self.processes.values():
            if process.returncode is None:
                _signal(process, signal.SIGTERM)
        _, pending = await asyncio.wait(keepers, timeout=self.drain_timeout + EXIT_GRACE)
        killed = 0
        if pending:
            for process in self.processes.values():
                if process.returncode is None:
                    killed += 1
                    _signal(process, signal.SIGKILL)
            await asyncio.wait(pending, timeout=EXIT_GRACE)  # they return once it is reaped
        for keeper in keepers:
            keeper.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        if killed:
            log.error("workers killed after the drain timeout", killed=killed)
        log.info("workers stopped")
        return 1 if killed else 0


def _signal(process: asyncio.subprocess.Process, signum: int) -> None:
    """Send ``signum`` to ``process``; one that has exited already (not yet reaped) is fine."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signum)


def _die_with_supervisor() -> None:
    """In a worker, before exec: get SIGTERM (and drain) if the supervisor dies, even by
    SIGKILL, so that workers are never left running without it (Linux; elsewhere a no-op)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _forget_process(metrics_dir: str | None, pid: int | None) -> None:
    """Drop a dead worker's live gauges from the group view (prometheus-client's
    ``mark_process_dead``); its counters stay, so group totals never go backwards."""
    if not metrics_dir or pid is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)


def worker_command(argv: Sequence[str]) -> list[str]:
    """The command line of one worker: this interpreter, ``-m gateway``, the same arguments
    without ``--workers``."""
    args: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        args.append(arg)
    return [sys.executable, "-m", "gateway", *args]
