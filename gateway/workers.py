"""``--workers N``: one command runs N gateway processes on one port, supervised.

Each worker is a complete gateway (its own hub, its own pub/sub connection, its own clients) in a
process of its own, started as ``python -m gateway`` with the same settings. They share the port
through ``SO_REUSEPORT``: the kernel spreads new connections over the workers' listening sockets,
so no process hands connections to another. Workers know nothing of each other; every guarantee
holds per connection, exactly as it does across pods.

The supervisor (this module, the parent process) only starts, watches and stops them:

* a worker that dies is started again at once; one that keeps dying young is restarted after a
  growing delay (:class:`RestartPolicy`), so a crash loop cannot spin a core;
* a worker that cannot be started (``os.pipe`` or the fork failing: no descriptors, no memory,
  the process limit) is tried again after the same growing delay, logged and counted
  (``eventbus_worker_start_failures_total``); meanwhile the group is not ready (its ``/readyz``
  counts live workers), where the failed start used to leave the slot empty for good;
* a worker whose event loop stops running (a deadlock, a blocking call, a CPU-bound bug,
  SIGSTOP) keeps its listening socket open, so the kernel would go on handing it its share of
  the new connections, to hang unanswered: each worker's loop writes a heartbeat into a pipe
  once a second (:func:`start_heartbeat`), and one silent for ``worker_timeout`` seconds
  (:class:`Liveness`) is killed with SIGKILL and started again like a worker that died;
* a worker is started in a slot's place only once the previous one has been reaped, so its
  slot's lock (:func:`gateway.group.claim_slot`, taken by every worker before it listens) is
  free; a process that finds it held exits 1 and, if it is the supervisor's, is restarted with
  the growing delay like any worker dying young;
* SIGTERM (or SIGINT, or SIGHUP) is passed to every worker as SIGTERM, which drains as a
  single gateway does; a worker still running ``drain_timeout`` + 5 s later is killed (SIGKILL);
* ``/metrics`` and ``/readyz`` answer for the whole group from any worker (see
  :mod:`gateway.group`): the supervisor gives every worker the same
  ``PROMETHEUS_MULTIPROC_DIR`` and tells it the group's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import shutil
import signal
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway import groupdir
from gateway.group import SupervisorCounters, metrics_identity
from gateway.logs import describe, get_logger

__all__ = [
    "GROUP_SIZE_ENV",
    "HEARTBEAT_FD_ENV",
    "HEARTBEAT_INTERVAL",
    "WORKER_ID_ENV",
    "Liveness",
    "RestartPolicy",
    "Supervisor",
    "resolve_workers",
    "start_heartbeat",
    "worker_command",
]

log = get_logger("eventbus.workers")

#: Set by the supervisor in each worker's environment (internal: not settings for operators).
#: A gateway that finds GROUP_SIZE_ENV listens with SO_REUSEPORT and serves the group's view.
GROUP_SIZE_ENV = "EVENTBUS_GROUP_SIZE"
WORKER_ID_ENV = "EVENTBUS_WORKER_ID"
#: The descriptor of the pipe a worker's event loop writes its heartbeats to (only with a
#: ``worker_timeout``). A worker started without it sends none.
HEARTBEAT_FD_ENV = "EVENTBUS_HEARTBEAT_FD"
_INTERNAL_ENV = frozenset({GROUP_SIZE_ENV, WORKER_ID_ENV, HEARTBEAT_FD_ENV})

#: Seconds between two heartbeats of a worker's event loop.
HEARTBEAT_INTERVAL = 1.0
#: Seconds a worker has, on top of the timeout, to send its first heartbeat: from its start to
#: its event loop running, the interpreter starts and imports the gateway (under a second on an
#: idle machine, several on a loaded one).
STARTUP_GRACE = 30.0
#: Lateness of the supervisor's own check (beyond its interval) that is taken as the supervisor
#: not running (stopped with its workers: SIGSTOP of the group, Ctrl-Z, a frozen container).
PAUSE_SLACK = 1.0

#: Seconds a worker has after ``drain_timeout`` to exit by itself before it is killed.
EXIT_GRACE = 5.0

#: Signals that make the supervisor drain its workers and exit. SIGHUP too: its default action
#: ended the supervisor at once, leaving its metrics directory behind and its workers to drain
#: unsupervised (``kill -HUP``, a reload for gunicorn; the terminal of a foreground group
#: closing). The gateway has no configuration to reload: restart it to change settings.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


_NO_QUOTA = object()


def resolve_workers(value: str | int, *, quota: float | object | None = _NO_QUOTA) -> int:
    """``auto`` is one worker per usable core: the cores the process may run on, at most its
    cgroup's CPU quota rounded up (:func:`cpu_quota`; ``quota`` given replaces reading it);
    otherwise a positive integer.

    The quota, because a container given 2 CPUs on a 64-core host (``docker run --cpus 2``,
    a Kubernetes CPU limit) may run on all 64 cores, 2 CPUs' worth of time between them:
    ``auto`` started 64 workers there, each with its own Redis connections and memory."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        try:
            cores = max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            cores = max(1, os.cpu_count() or 1)
        limit = cpu_quota() if quota is _NO_QUOTA else quota
        if isinstance(limit, int | float) and not isinstance(limit, bool):  # (2 as well as 2.0)
            cores = max(1, min(cores, math.ceil(limit)))
        return cores
    count = int(value)
    if count < 1:
        raise ValueError("workers must be >= 1 or 'auto'")
    return count


def cpu_quota(root: str = "/sys/fs/cgroup", own: str = "/proc/self/cgroup") -> float | None:
    """The CPUs' worth of time this process' cgroup may use (its CPU quota over its period),
    the lowest of its cgroup's and its ancestors'; None when there is none or it cannot be read.

    cgroup v2 (``cpu.max``: ``<quota> <period>`` or ``max <period>``) when the cpu controller
    is in the unified hierarchy, v1 (``cpu.cfs_quota_us``, -1 for none, and
    ``cpu.cfs_period_us``) when it has a hierarchy of its own (``<root>/<controllers>``; a
    container may mount its own cgroup there, in which case the path ``own`` names is not in
    that mount, and the mount itself is read)."""
    try:
        # (a cgroup's name is any bytes but "/": kept as they are, for the paths built on it)
        with open(own, encoding="utf-8", errors="surrogateescape") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if "cpu" in controllers.split(","):
            return _lowest_quota(os.path.join(root, controllers), path, _v1_quota)
    for line in lines:
        if line.startswith("0::"):
            return _lowest_quota(root, line[3:], _v2_quota)
    return None


def _lowest_quota(mount: str, path: str, read: Callable[[str], float | None]) -> float | None:
    """The lowest quota ``read`` finds in ``mount``/``path`` and its ancestors up to ``mount``."""
    quotas = []
    directory = os.path.normpath(os.path.join(mount, path.strip().lstrip("/")))
    while True:
        quota = read(directory)
        if quota is not None:
            quotas.append(quota)
        if os.path.normpath(directory) == os.path.normpath(mount) or len(directory) <= len(mount):
            break
        directory = os.path.dirname(directory)
    return min(quotas) if quotas else None


def _v2_quota(directory: str) -> float | None:
    try:
        with open(os.path.join(directory, "cpu.max")) as file:
            quota, period = file.read().split()[:2]
        return None if quota == "max" else _ratio(int(quota), int(period))
    except (OSError, ValueError):
        return None


def _v1_quota(directory: str) -> float | None:
    try:
        with open(os.path.join(directory, "cpu.cfs_quota_us")) as file:
            quota = int(file.read().strip())
        with open(os.path.join(directory, "cpu.cfs_period_us")) as file:
            period = int(file.read().strip())
    except (OSError, ValueError):
        return None
    return _ratio(quota, period)


def _ratio(quota: int, period: int) -> float | None:
    return quota / period if quota > 0 and period > 0 else None


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
        # (The exponent stops growing far past any cap: 2**1024 is too large for a float.)
        return min(self.cap, self.base * 2 ** min(deaths - 1, 60))


@dataclass
class Liveness:
    """Which workers' event loops went silent. Pure: the caller passes the times.

    A worker is overdue once ``timeout`` seconds passed since its last heartbeat or, before its
    first one, ``timeout + startup_grace`` seconds since it was started. Each overdue worker is
    reported once (it is forgotten until :meth:`started` again). Two things are never held
    against a worker:

    * time the supervisor itself did not run: a check coming more than ``PAUSE_SLACK`` seconds
      later than ``check_interval`` after the previous one means the supervisor was stopped or
      starved, most likely with its workers (SIGSTOP or Ctrl-Z of the group, a frozen container,
      a suspended VM): that gap is added to every worker's allowance, else every worker would
      be killed the moment the group resumes, before its first heartbeat after the pause;
    * the stop of the group: after :meth:`stop` nobody is overdue, a draining worker may well
      beat late, and the drain has its own deadline (``drain_timeout`` + ``EXIT_GRACE``).
    """

    timeout: float
    startup_grace: float = STARTUP_GRACE
    #: worker -> when its silence started: its last heartbeat, or its start
    _since: dict[int, float] = field(default_factory=dict)
    _beat: set[int] = field(default_factory=set)  # the workers that beat since they started
    _checked: float | None = None
    _stopping: bool = False

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError("the timeout must be positive (0 means: no Liveness at all)")

    @property
    def check_interval(self) -> float:
        """How often :meth:`overdue` should be asked: a kill comes at most this much late."""
        return min(1.0, self.timeout / 4)

    def started(self, worker: int, now: float) -> None:
        self._since[worker] = now
        self._beat.discard(worker)

    def beat(self, worker: int, now: float) -> None:
        if worker in self._since:  # not one already reported (and being killed)
            self._since[worker] = now
            self._beat.add(worker)

    def beating(self, worker: int) -> bool:
        """Whether the worker beat since it was started (its start-up is over)."""
        return worker in self._beat

    def forget(self, worker: int) -> None:
        """The worker exited."""
        self._since.pop(worker, None)
        self._beat.discard(worker)

    def stop(self) -> None:
        """The group is stopping: no worker is overdue from now on."""
        self._stopping = True

    def overdue(self, now: float) -> list[tuple[int, float]]:
        """The workers silent for too long, with how long (seconds), each reported once."""
        if self._checked is not None:
            unwatched_from = self._checked + self.check_interval + PAUSE_SLACK
            if now > unwatched_from:
                for worker, since in self._since.items():
                    self._since[worker] = since + now - max(since, unwatched_from)
        self._checked = now
        if self._stopping:
            return []
        found = []
        for worker, since in self._since.items():
            allowed = self.timeout if worker in self._beat else self.timeout + self.startup_grace
            if now - since > allowed:
                found.append((worker, now - since))
        for worker, _ in found:
            self.forget(worker)
        return found


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
        worker_timeout: float = 0.0,
        hold_late_signals: bool = False,
    ) -> None:
        self.command = list(command)
        #: When :meth:`run` returns, leave the stop signals blocked (held pending, dropped when
        #: the process exits) rather than back to their default action: for the process whose
        #: last act the run is (``python -m gateway``), never for a caller that goes on.
        self.hold_late_signals = hold_late_signals
        self.workers = workers
        self.drain_timeout = drain_timeout
        self.env = dict(os.environ if env is None else env)
        self.policy = policy or RestartPolicy()
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        #: None without a ``worker_timeout`` (0): the workers send no heartbeats then.
        self.liveness = Liveness(worker_timeout) if worker_timeout > 0 else None
        #: Workers killed because their event loop stopped beating.
        self.killed_unresponsive = 0
        #: Attempts to start a worker that failed (each retried after a delay).
        self.start_failures = 0
        #: Workers that exited during the stop otherwise than by draining (killed, crashed).
        self.undrained = 0
        self._killing = False  # the stop's deadline passed: the supervisor kills the rest
        self._counters: SupervisorCounters | None = None
        self._prctl = _load_prctl()
        self._unresponsive: set[int] = set()  # killed for that, not started again yet
        self._heartbeats: dict[int, int] = {}  # worker -> the read end of its heartbeat pipe
        self._stopping = asyncio.Event()
        self._metrics_dir: str | None = None

    async def run(self) -> int:
        """Start the workers, restart the ones that die, and return after a stop signal once
        every worker has exited (0) or had to be killed (1)."""
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        # The directories of groups whose supervisor was killed (SIGKILL) go first; this group's
        # is made with its lock held (gateway.groupdir), released when the directory is removed.
        groupdir.sweep_abandoned()
        self._metrics_dir, group_lock = groupdir.create()
        self._counters = SupervisorCounters(self._metrics_dir)
        watcher = asyncio.create_task(self._watch()) if self.liveness is not None else None
        try:
            keepers = [asyncio.create_task(self._keep(index)) for index in range(self.workers)]
            log.info(
                "workers starting",
                workers=self.workers,
                supervisor_pid=os.getpid(),
                worker_timeout=self.liveness.timeout if self.liveness is not None else 0,
            )
            await self._stopping.wait()
            return await self._stop(keepers)
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            for index in list(self._heartbeats):
                self._unwatch(index)
            try:
                self._counters.close()
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
                group_lock.close()
            finally:
                # Removing the loop's handlers gives the signals back their default action: a
                # second SIGTERM sent as the group stopped (in milliseconds, with no client to
                # drain) killed the supervisor then, status 143, and before the directory was
                # removed (it is removed first now) left it behind. Blocked, it is dropped at
                # the exit, whose status is the group's.
                if self.hold_late_signals:
                    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                for signum in STOP_SIGNALS:
                    loop.remove_signal_handler(signum)

    def stop(self) -> None:
        """Ask :meth:`run` to drain the workers and return (what SIGTERM does)."""
        self._stopping.set()

    def _on_stop_signal(self, signum: int) -> None:
        """SIGTERM, SIGINT or SIGHUP: drain the group. Once it drains, another one changes
        nothing: the drain is already bounded (``drain_timeout`` + ``EXIT_GRACE``)."""
        name = signal.Signals(signum).name
        if self._stopping.is_set():
            log.info("stop signal while stopping; the drain goes on", signal=name)
            return
        log.info("stop signal", signal=name)
        self._stopping.set()

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        env = {
            # Never the internal variables of another group (an environment copied from a
            # worker's): only what this supervisor sets below.
            **{key: value for key, value in self.env.items() if key not in _INTERNAL_ENV},
            # A worker is a single gateway: EVENTBUS_WORKERS=1 also overrides a group size the
            # operator set in the environment, so a worker never becomes a supervisor itself.
            "EVENTBUS_WORKERS": "1",
            GROUP_SIZE_ENV: str(self.workers),
            WORKER_ID_ENV: str(index),
            "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir or "",
        }
        read_end = write_end = -1
        if self.liveness is not None:
            # The worker inherits the write end (pass_fds keeps its number); the supervisor
            # keeps only the read end, so it reads EOF once the worker is gone.
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            env[HEARTBEAT_FD_ENV] = str(write_end)
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                env=env,
                preexec_fn=functools.partial(_die_with_supervisor, os.getpid(), self._prctl),
                pass_fds=(write_end,) if write_end >= 0 else (),
            )
        except BaseException:
            if read_end >= 0:
                os.close(read_end)
            raise
        finally:
            if write_end >= 0:
                os.close(write_end)
        self._unresponsive.discard(index)
        self.processes[index] = process
        if self.liveness is not None:
            self.liveness.started(index, time.monotonic())
            self._heartbeats[index] = read_end
            asyncio.get_running_loop().add_reader(read_end, self._on_heartbeat, index, read_end)
        log.info("worker started", worker=index, pid=process.pid)
        return process

    def _on_heartbeat(self, index: int, fd: int) -> None:
        """The worker's pipe is readable: heartbeats (each one byte; whatever piled up is read
        at once), or EOF when the worker exited."""
        assert self.liveness is not None
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.liveness.beat(index, time.monotonic())
        elif self._heartbeats.get(index) == fd:
            self._unwatch(index)
        else:  # not expected (a pipe is unwatched before the next one of its worker is watched)
            asyncio.get_running_loop().remove_reader(fd)  # EOF stays readable: never spin on it

    def _unwatch(self, index: int) -> None:
        fd = self._heartbeats.pop(index, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    async def _watch(self) -> None:
        """Kill (SIGKILL) every worker whose event loop stopped beating; its keeper sees it die
        and starts it again, as for any death (:class:`RestartPolicy`).

        SIGKILL, not SIGTERM: a worker whose loop does not run cannot drain (its SIGTERM handler
        runs on that loop), and a stopped process does not even act on SIGTERM until continued;
        SIGKILL ends both at once, and their clients reconnect to the other workers."""
        liveness = self.liveness
        assert liveness is not None
        while True:
            await asyncio.sleep(liveness.check_interval)
            for index, silent in liveness.overdue(time.monotonic()):
                process = self.processes.get(index)
                if process is None or process.returncode is not None:
                    continue
                self.killed_unresponsive += 1
                if self._counters is not None:
                    self._counters.inc("workers_killed_unresponsive_total")
                self._unresponsive.add(index)
                log.error(
                    "worker unresponsive; killing it",
                    worker=index,
                    pid=process.pid,
                    silent_for=round(silent, 1),
                    worker_timeout=liveness.timeout,
                )
                _signal(process, signal.SIGKILL)

    async def _keep(self, index: int) -> None:
        """Keep worker ``index`` running until the group stops."""
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                process = await self._spawn(index)
            except Exception as exc:  # OSError (EMFILE, ENOMEM, EAGAIN), SubprocessError
                # Retried like a worker that died at once: the delay grows up to the cap, so a
                # lasting lack of resources costs one attempt per cap, and the first success
                # fills the slot again. Not an error log: the supervisor recovers by itself.
                self.start_failures += 1
                if self._counters is not None:
                    self._counters.inc("worker_start_failures_total")
                delay = self.policy.delay(index, 0.0)
                log.warning(
                    "worker start failed; retrying",
                    worker=index,
                    error=describe(exc),
                    error_type=type(exc).__name__,
                    delay=delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                continue
            if self._stopping.is_set():
                # The stop signal came while this worker was starting: _stop signalled only the
                # workers it knew of then. It waits for this keeper, so the worker drains too.
                _signal(process, signal.SIGTERM)
            code = await process.wait()
            try:
                _forget_process(self._metrics_dir, metrics_identity(str(index)))
            except OSError as exc:  # its files are only left in the view: go on with the worker
                log.warning(
                    "dead worker's live metrics not removed", worker=index, error=describe(exc)
                )
            if self.liveness is not None:
                self.liveness.forget(index)
                self._unwatch(index)
            if self._stopping.is_set():
                if code not in (0, -signal.SIGTERM) and not self._killing:
                    # Killed by another (the OOM killer, a kill -9) or crashed while it drained:
                    # its clients were cut. -SIGTERM is a worker signalled before it could
                    # handle the signal (being started): it had no clients yet.
                    self.undrained += 1
                    log.error(
                        "worker exited during the stop", worker=index, pid=process.pid, code=code
                    )
                return
            delay = self.policy.delay(index, time.monotonic() - started)
            self.restarts += 1
            log.warning(
                "worker exited; restarting",
                worker=index,
                pid=process.pid,
                code=code,
                delay=delay,
                **({"killed": "unresponsive"} if index in self._unresponsive else {}),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _stop(self, keepers: list[asyncio.Task]) -> int:
        """SIGTERM every worker, wait for each keeper to see its worker exit (within the drain
        timeout; a worker still running then is killed), and return 0, or 1 if one was killed
        or exited otherwise than by draining (its keeper logs it).

        The keepers are what is waited for, not the workers known now: a worker being started
        when the signal came is registered only once it has started (its keeper then signals
        it). Waiting for the workers alone let the supervisor return with that one running,
        unsupervised, still accepting connections on the shared port."""
        if self.liveness is not None:
            self.liveness.stop()  # a draining worker is bounded by the drain's deadline only
        log.info("stopping workers", workers=len(self.processes), drain_timeout=self.drain_timeout)
        for process in self.processes.values():
            if process.returncode is None:
                _signal(process, signal.SIGTERM)
        _, pending = await asyncio.wait(keepers, timeout=self.drain_timeout + EXIT_GRACE)
        killed = 0
        if pending:
            self._killing = True  # (those are counted here, not as dying by themselves)
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
        return 1 if killed or self.undrained else 0


def start_heartbeat(environ: dict[str, str] | None = None) -> asyncio.Task | None:
    """In a worker of a group with a ``worker_timeout``: start the task that tells the supervisor
    that this event loop runs. None (nothing started) anywhere else, a single gateway included.

    A task on the loop, not a thread: it beats only while the loop runs, which is what the
    supervisor must know (a thread would go on beating for a deadlocked loop)."""
    raw = (os.environ if environ is None else environ).get(HEARTBEAT_FD_ENV)
    if not raw:
        return None
    # Only into a pipe: a variable left in an environment (copied from a worker's) names some
    # descriptor of this process, e.g. a Redis connection, which a byte a second would corrupt.
    try:
        fd = int(raw)
        is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (ValueError, OSError):
        is_pipe = False
    if not is_pipe:
        log.warning("no heartbeats: not a pipe", variable=HEARTBEAT_FD_ENV, value=raw[:20])
        return None
    return asyncio.create_task(_beat(fd, HEARTBEAT_INTERVAL), name="heartbeat")


async def _beat(fd: int, interval: float) -> None:
    """One byte into the supervisor's pipe every ``interval`` seconds; never blocks: a full pipe
    (a supervisor not reading) drops the beat, a closed one (the supervisor is gone, and
    PR_SET_PDEATHSIG drains this worker) ends the beating."""
    try:
        os.set_blocking(fd, False)
    except OSError as exc:
        log.warning("no heartbeat pipe", fd=fd, error=str(exc))
        return
    while True:
        try:
            os.write(fd, b".")
        except BlockingIOError:
            pass
        except OSError:
            return
        await asyncio.sleep(interval)


def _signal(process: asyncio.subprocess.Process, signum: int) -> None:
    """Send ``signum`` to ``process``; one that has exited already (not yet reaped) is fine.

    ``os.kill``, not ``process.send_signal``: Popen's ``send_signal`` first polls the process
    (``waitpid``), and so reaped a worker that had just exited before asyncio's child watcher
    could: the watcher logged "Unknown child process pid ..." and reported 255 as its status,
    which the supervisor logged as the worker's exit code (``worker exited during the stop``,
    ``code: 255``, for a worker crashing as the group stopped). Unreaped, an exited worker is a
    zombie whose pid nobody else can get; once asyncio has its status, it is not signalled. (In
    between, from the watcher's ``waitpid`` to its callback on this loop, the pid is free: it
    would take every pid of the machine being handed out meanwhile to reach another process.)"""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signum)


def _load_prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` (Linux), loaded in the supervisor: None elsewhere."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError, ImportError):
        return None


#: ``prctl`` option: the signal the calling process gets when its parent dies.
PR_SET_PDEATHSIG = 1


def _die_with_supervisor(supervisor: int, prctl: Callable[..., int] | None) -> None:
    """In a worker, between the fork and the exec: get SIGTERM (and drain) when the supervisor
    dies, even by SIGKILL, so that no worker is left running without it, holding the port.

    The death signal is armed after the fork: a supervisor that died before that (the child
    sees another parent then) sends none, and that worker exits here. Only a C call and a
    system call: ``prctl`` was loaded in the supervisor, because importing or loading a library
    in a child forked from a process with threads (asyncio's child watchers) can deadlock on a
    lock another thread held at the fork."""
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:
        os._exit(1)
    # A hangup (the terminal of a foreground group closing) reaches every process of the group:
    # the supervisor drains the workers on it, which would otherwise die at once, undrained.
    # Ignored stays ignored across the exec. Ctrl-C too: a worker still starting (no handler of
    # its own yet) died of it, a KeyboardInterrupt traceback, and "worker exited during the
    # stop" when it died before the supervisor's SIGTERM. A running gateway installs its own
    # SIGINT handler (a drain), so a SIGINT sent to a worker alone still drains it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _forget_process(metrics_dir: str | None, identity: str) -> None:
    """Drop a dead worker's live gauges from the group view (prometheus-client's
    ``mark_process_dead``, by the identity its files carry); its counters stay, and the worker
    started in its place continues them, so group totals never go backwards."""
    if not metrics_dir:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(identity, metrics_dir)


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
