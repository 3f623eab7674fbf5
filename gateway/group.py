"""The view of a ``--workers`` group that any one worker serves: ``/metrics`` and ``/readyz``.

With ``SO_REUSEPORT`` a scrape or a probe reaches whichever worker the kernel picks, so each
worker must answer for all of them. prometheus-client's multiprocess mode is the ecosystem's way
to do that: every process writes its values into memory-mapped files in one directory
(``PROMETHEUS_MULTIPROC_DIR``, made by the supervisor) and any process can read and merge them.

The gateway's hot paths keep their plain integer counters (:class:`gateway.metrics.Metrics`): a
worker copies what changed into its files once a second (:meth:`GroupView.sync`) and right
before it renders, so the group's totals lag at most a second behind the other workers. Counters
add up over the group; gauges are summed over the live workers (a dead worker's gauges vanish,
its counters stay so totals never go backwards); the relay-lag histogram is observed into the
files as it happens.

Readiness: each worker publishes 1 in ``eventbus_worker_ready`` while it is ready; the group is
ready when the live workers' sum equals the group's size, i.e. every worker is up and ready. A
worker that is not running (dead, being restarted, or that could not be started) has no live
value: the group is not ready until it runs and is ready again. A worker whose event loop stopped
(SIGSTOP, a deadlock) still has one, written before it stopped: each value carries when it was
written, and one older than :data:`READY_STALE` is not counted (:func:`count_ready`); that
worker's other live gauges leave the view's sums with it (:func:`read_group`).

Files are named after the worker's slot (``counter_worker1.db``), not its process id, so the
process started in a dead worker's place takes over its files: its counters continue from the
dead one's values (group totals never go backwards) and the directory holds one set of files per
slot however often workers are restarted. Named by pid, a crash loop left one more counter file
per death (up to 2,880 a day per slot at the 30 s backoff cap), every one read by every scrape
and readiness probe, on the worker's event loop. The supervisor removes a dead worker's live
gauges before it starts the next (:func:`metrics_identity`), and never runs two processes in one
slot at once: two writers of one memory-mapped file would corrupt it.

One process per slot is also each worker's own rule (:func:`claim_slot`): before it touches its
slot's files or binds the port, a worker takes an exclusive ``flock`` on ``worker<N>.lock`` in
the directory and holds it for its life; the kernel lets go of it when the process ends, however
it ends (SIGKILL included). A second process started with a copy of a worker's environment (an
operator re-running a command line seen in ``ps``) finds the lock held and exits 1 without
listening: with ``SO_REUSEPORT`` it would have joined the port as a second worker N, writing the
same files, and the supervisor, which does not know it, would never stop it. The supervisor
starts a slot's next worker only once it has reaped the previous one, whose lock is free by then.

The supervisor writes its own counters into the same directory (:class:`SupervisorCounters`).

A rendered ``/metrics`` body is served again for :data:`RENDER_REUSE` (0.5 s): rendering reads
and merges every file of the group on the worker's event loop (~0.6 ms with two workers, 40
times a single process' render), and a flood of scrapes (``/metrics`` is on the public port)
took the workers' loops from the connections: 200 scrapers in a loop against two workers held
event delivery p99 at 0.2 to 1.2 s (2 to 3 ms without; ``python -m bench.scrape_flood
--workers 2``). The other workers' values lag up to a second anyway. A count of every worker
ready, which ``/readyz`` reports, is reused likewise.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import stat
import time
from collections.abc import Callable, Collection
from typing import BinaryIO

from gateway import groupdir
from gateway.logs import get_logger
from gateway.metrics import Metrics

__all__ = [
    "RENDER_REUSE",
    "SUPERVISOR_COUNTERS",
    "GroupView",
    "SlotTaken",
    "SupervisorCounters",
    "claim_slot",
    "count_ready",
    "metrics_identity",
    "read_group",
    "render_families",
]

#: Seconds a worker serves its last rendered ``/metrics`` body again (see the module docstring).
RENDER_REUSE = 0.5
#: Seconds after which a worker's readiness in the group's files no longer counts: each worker
#: writes it once a second from its event loop, so an older value is a worker whose loop stopped
#: (SIGSTOP, a deadlock, a CPU-bound bug; the longest stall measured in a reconnect storm was
#: 0.5 s). Such a worker gets no connection answered, and its last value said ready for good.
READY_STALE = 5.0

log = get_logger("eventbus.group")

#: The counters the supervisor itself keeps in the group's view: name -> help text.
SUPERVISOR_COUNTERS = {
    "worker_start_failures_total": (
        "Times the supervisor failed to start a worker process (no descriptors, no memory, "
        "process limit) and retried after a delay."
    ),
    # Counted by the supervisor, not by the worker started in the killed one's place: a kill
    # whose replacement never starts is counted too.
    "workers_killed_unresponsive_total": (
        "Workers killed (SIGKILL) by the supervisor because their event loop sent no "
        "heartbeat for --worker-timeout seconds, and started again."
    ),
}


def metrics_identity(worker_id: str) -> str:
    """The name a worker's files carry in the group's metrics directory (prometheus-client's
    "process identifier"): its slot, so that the worker started in its place continues them."""
    return f"worker{worker_id}"


class SlotTaken(RuntimeError):
    """Another live process holds the worker slot (:func:`claim_slot`)."""

    def __init__(self, slot: str, path: str, holder: int | None) -> None:
        self.slot = slot
        self.path = path
        #: The process id the holder wrote into the lock file (None if unreadable).
        self.holder = holder
        super().__init__(f"worker slot {slot} is held by process {holder or '?'} ({path})")


def claim_slot(directory: str, slot: str) -> BinaryIO:
    """Claim worker slot ``slot`` of the group whose directory is ``directory``: an exclusive,
    non-blocking ``flock`` on ``<directory>/worker<slot>.lock`` (made if missing). Returns the
    open lock file: keep it open for the process's whole life (closing it gives the slot up; the
    kernel does at the process's end, however it ends). Raises :class:`SlotTaken` when another
    open of that file holds the lock (a live process of the slot), ValueError for a slot that
    is not a number, OSError when the file cannot be opened (the group's directory is gone).

    The claimer writes its process id into the file once it holds the lock, so that a refused
    one can name the holder. Not blocking on purpose: the supervisor starts a slot's next worker
    only after reaping the previous one (its lock is free then), so a held lock always means a
    process the supervisor does not know of, and waiting for it would only hide that."""
    if not (slot.isascii() and slot.isdigit()):
        raise ValueError(f"not a worker slot: {slot[:20]!r}")
    path = os.path.join(directory, f"{metrics_identity(slot)}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    file = os.fdopen(fd, "r+b", buffering=0)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder: int | None = int(file.read(32).strip() or b"x")
        except (ValueError, OSError):  # being written this instant, or garbage: unnamed
            holder = None
        file.close()
        raise SlotTaken(slot, path, holder) from None
    except BaseException:
        file.close()
        raise
    try:
        file.truncate(0)
        file.write(f"{os.getpid()}\n".encode())
    except OSError:  # (only the holder's name for a refused claimer: the lock is what counts)
        pass
    return file


class GroupView:
    """One worker's share of the group's metrics, and the group's merged view.

    ``directory`` must be the ``PROMETHEUS_MULTIPROC_DIR`` the process was started with
    (prometheus-client picks its storage when first imported). ``worker_id``: the worker's slot
    in the group; its files are named after it (:func:`metrics_identity`) rather than the process
    id, and this must be the only live process of the slot: a worker claims it first
    (:func:`claim_slot`). Set before any metric of the process is made (this makes the first).
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        workers: int,
        directory: str,
        worker_id: str | None = None,
    ) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

        self._reported: set[tuple[str, str]] = set()  # warnings already logged
        self._rendered: tuple[float, bytes] | None = None  # (when, body) of the last render
        self._ready_counted: tuple[float, int] | None = None  # (when, count) of the last count
        # A member's shared lock: no supervisor's sweep removes the directory while it is held.
        self._lock: groupdir.Hold | None = groupdir.hold(directory)
        if worker_id is not None:
            identity = metrics_identity(worker_id)
            for name in _set_aside_unreadable(directory, identity):
                self._warn_once("unreadable metrics file of this worker's slot set aside", name)
            values.ValueClass = values.MultiProcessValue(lambda: identity)

        self.metrics = metrics
        self.workers = workers
        self.directory = directory
        # Our own registry: the families below are written to the files, never served from it.
        registry = CollectorRegistry()
        self._counters = {
            name: Counter(f"eventbus_{name.removesuffix('_total')}", help_text, registry=registry)
            for name, help_text in metrics.COUNTERS.items()
        }
        self._synced = dict.fromkeys(metrics.COUNTERS, 0)
        self._foreign = Counter(
            "eventbus_foreign_values",
            "Values read from Redis that the event bus cannot have written, skipped.",
            ["kind"],
            registry=registry,
        )
        self._foreign_synced = dict.fromkeys(metrics.foreign_values, 0)
        for kind in metrics.foreign_values:  # every kind exported from the start, as 0
            self._foreign.labels(kind=kind)
        self._gauges: dict[str, tuple[object, Callable[[], float]]] = {
            name: (
                Gauge(
                    f"eventbus_{name}", help_text, registry=registry, multiprocess_mode="livesum"
                ),
                read,
            )
            for name, (help_text, read) in metrics.gauges.items()
        }
        self._ready = Gauge(
            "eventbus_worker_ready",
            "1 per live worker that is ready (the group is ready when this is the group size).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._workers = Gauge(
            "eventbus_workers",
            "Workers the supervisor runs in this group.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self._workers.set(workers)
        lag = metrics.relay_lag
        shared = Histogram(
            "eventbus_relay_lag_seconds",
            "Time from the publish (Redis clock) to the write to subscribers.",
            buckets=lag.bounds,
            registry=registry,
        )
        metrics.relay_lag = _Tee(lag, shared.observe)  # type: ignore[assignment]

    def close(self) -> None:
        """Let go of the group's directory (the last step of a worker's shutdown)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def sync(self, ready: bool) -> None:
        """Copy this worker's counter increments and current gauges into the shared files."""
        metrics = self.metrics
        for name, counter in self._counters.items():
            value = getattr(metrics, name)
            delta = value - self._synced[name]
            if delta > 0:
                counter.inc(delta)
                self._synced[name] = value
        for kind, value in metrics.foreign_values.items():
            delta = value - self._foreign_synced.get(kind, 0)
            if delta > 0:
                self._foreign.labels(kind=kind).inc(delta)
                self._foreign_synced[kind] = value
        for gauge, read in self._gauges.values():
            gauge.set(read())  # type: ignore[attr-defined]
        # With when it was written (the value's timestamp, unused by a livesum gauge otherwise):
        # the readers count it only while it is fresh (count_ready). The monotonic clock is one
        # clock for every process of the machine (Linux), and steps with no wall clock change.
        value = self._ready._value  # type: ignore[attr-defined]
        value.set(1.0 if ready else 0.0, timestamp=time.monotonic())

    def _collect(self, stopped: set[str]) -> list:
        families, unreadable = read_group(self.directory, stopped=stopped)
        for name in unreadable:
            self._warn_once("unreadable file in the group's metrics directory, skipped", name)
        return families

    def _warn_once(self, message: str, name: str) -> None:
        """Log once per name (in a bounded record): it is skipped at every scrape and probe."""
        if (message, name) not in self._reported and len(self._reported) < 100:
            self._reported.add((message, name))
            log.warning(message, name=name)

    def render(self, ready: bool) -> bytes:
        """The whole group's metrics in the Prometheus text format: the last body again while it
        is younger than :data:`RENDER_REUSE`."""
        now = time.monotonic()
        if self._rendered is not None and now - self._rendered[0] < RENDER_REUSE:
            return self._rendered[1]
        self.sync(ready)
        ready_count, stopped = _readiness(self.directory, now, READY_STALE)
        families = self._collect(stopped)
        for family in families:
            if family.name == "eventbus_worker_ready":  # the fresh values only, as /readyz
                family.samples = [sample._replace(value=ready_count) for sample in family.samples]
        text, broken = render_families(families)
        for name in broken:
            self._warn_once("a group metric could not be rendered, skipped", name)
        self._rendered = (now, text)
        return text

    def ready_workers(self, ready: bool) -> int:
        """How many live workers of the group are ready right now (this one included).

        A count of every worker is given again while it is younger than :data:`RENDER_REUSE`
        and this worker is still ready: a ``/readyz`` flood read the group's files at every
        probe, as a scrape flood did. A group short of a worker is counted at every probe: a
        worker that just started must not answer an older, lower count than its neighbour
        (a load balancer's probe may reach either)."""
        now = time.monotonic()
        counted = self._ready_counted
        if (
            ready
            and counted is not None
            and counted[1] >= self.workers
            and now - counted[0] < RENDER_REUSE
        ):
            return counted[1]
        self.sync(ready)
        count = count_ready(self.directory, now)
        self._ready_counted = (now, count)
        return count


def count_ready(directory: str, now: float, stale_after: float = READY_STALE) -> int:
    """How many workers' files in ``directory`` say ready, written less than ``stale_after``
    seconds before ``now`` (``time.monotonic()``). A file that cannot be read counts nothing
    (:func:`read_group` names it); a dead worker's is gone (its live gauges are removed)."""
    return _readiness(directory, now, stale_after)[0]


def _readiness(directory: str, now: float, stale_after: float) -> tuple[int, set[str]]:
    """How many workers are ready (as :func:`count_ready`), and the identities of the workers
    whose readiness was written ``stale_after`` seconds or more before ``now``: workers whose
    event loop stopped, whose live gauges do not count either (:func:`read_group`)."""
    from prometheus_client.mmap_dict import MmapedDict

    count = 0
    stopped = set()
    prefix = "gauge_livesum_"
    for path in glob.glob(os.path.join(glob.escape(directory), f"{prefix}*.db")):
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):  # a FIFO would block the event loop
                continue
            for key, value, written, _ in MmapedDict.read_all_values_from_file(path):
                if json.loads(key)[0] != "eventbus_worker_ready":
                    continue
                if now - written < stale_after:
                    count += value == 1
                else:
                    stopped.add(os.path.basename(path).removeprefix(prefix).removesuffix(".db"))
        except Exception:  # any way a file can be broken: struct, UTF-8, JSON, types
            continue
    return count, stopped


def _set_aside_unreadable(directory: str, identity: str) -> list[str]:
    """Rename the files of ``identity`` that prometheus-client could not continue (not a regular
    file, or not readable as its format) to ``<name>.unreadable``, out of the view, and return
    their names. A worker opens its slot's files when it makes its metrics, and one it cannot
    parse would make it fail at every start, for good; set aside, the slot's counters start
    again from 0 (a counter reset, which Prometheus' ``rate`` handles)."""
    from prometheus_client.multiprocess import MultiProcessCollector

    aside = []
    for path in glob.glob(os.path.join(glob.escape(directory), f"*_{identity}.db")):
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                pass
            elif info.st_size == 0:  # a worker killed before it sized the file: it is sized
                continue
            elif 8 <= _used_bytes(path) <= info.st_size:  # where the next value is appended
                MultiProcessCollector.merge([path], accumulate=True)  # every value parses
                continue
        except FileNotFoundError:
            continue
        except Exception:  # any way a file can be broken: struct, UTF-8, JSON, types
            pass
        with contextlib.suppress(OSError):
            os.replace(path, path + ".unreadable")
            aside.append(os.path.basename(path))
    return aside


def _used_bytes(path: str) -> int:
    """The "bytes used" header of a prometheus-client metrics file: where its writer appends
    next (a reader accepts values it cannot append after, such as -1)."""
    with open(path, "rb") as file:
        header = file.read(4)
    return int.from_bytes(header, "little", signed=True) if len(header) == 4 else -1


def read_group(directory: str, *, stopped: Collection[str] = ()) -> tuple[list, list[str]]:
    """The merged metric families of every readable file in ``directory``, and the names of the
    files skipped as unreadable. The live gauges (``gauge_live*``) of the workers ``stopped``
    (identities, :func:`metrics_identity`: workers whose event loop stopped, :func:`_readiness`)
    are left out, as a dead worker's are: their last values stayed in the group's gauges (a
    stopped worker's connections in ``eventbus_connections``) until ``--worker-timeout`` killed
    it, for good with 0. Their counters stay (totals never go backwards).

    prometheus-client's own reader stops at the first bad file, and then every ``/metrics`` and
    ``/readyz`` of the group failed, for as long as the file stayed: an empty file (a worker
    killed between creating its file and sizing it), a truncated or overwritten one, anything
    else dropped there. When the files do not merge together, each is read alone, and only the
    ones that pass are merged. Only regular files are opened: a FIFO would block the event
    loop."""
    from prometheus_client.multiprocess import MultiProcessCollector

    def merged(paths: list[str]) -> list:
        for _ in range(3):
            try:
                return list(MultiProcessCollector.merge(paths, accumulate=True))
            except FileNotFoundError:  # a dead worker's live gauges, removed since: without them
                paths = [path for path in paths if os.path.exists(path)]
        return []  # files vanishing at every read: nothing consistent to answer

    paths, unreadable = [], []
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*.db"))):
        name = os.path.basename(path)
        if name.startswith("gauge_live") and stopped:
            # gauge_<mode>_<identity>.db (an identity holds no "_": a slot, a process id)
            if name.removesuffix(".db").split("_", 2)[-1] in stopped:
                continue
        try:
            regular = stat.S_ISREG(os.lstat(path).st_mode)
        except FileNotFoundError:  # a dead worker's live gauges, removed meanwhile
            continue
        except OSError:
            regular = False
        if regular:
            paths.append(path)
        else:
            unreadable.append(os.path.basename(path))
    try:
        return merged(paths), unreadable  # every file sound: the common case, one read
    except Exception:  # any way a file can be broken: struct, UTF-8, JSON, types
        pass
    readable = []
    for path in paths:
        try:
            MultiProcessCollector.merge([path], accumulate=True)
            readable.append(path)
        except FileNotFoundError:
            continue
        except Exception:
            unreadable.append(os.path.basename(path))
    return merged(readable), unreadable


def render_families(families: list) -> tuple[bytes, list[str]]:
    """The Prometheus text of ``families`` and the names of those that could not be rendered
    (files readable one by one, not together: one name with two types), which are left out."""
    from prometheus_client import CollectorRegistry, generate_latest

    parts, broken = [], []
    for family in families:
        registry = CollectorRegistry()
        registry.register(_Families([family]))
        try:
            parts.append(generate_latest(registry))
        except Exception:
            broken.append(family.name)
    return b"".join(parts), broken


class _Families:
    """A collector answering families already read (for ``generate_latest``)."""

    def __init__(self, families: list) -> None:
        self._families = families

    def collect(self) -> list:
        return self._families


class _Tee:
    """The worker's own histogram and the group's, fed by the one ``observe`` call."""

    __slots__ = ("_local", "_shared_observe")

    def __init__(self, local, shared_observe: Callable[[float], None]) -> None:
        self._local = local
        self._shared_observe = shared_observe

    def observe(self, value: float) -> None:
        self._local.observe(value)
        self._shared_observe(value)

    def __getattr__(self, name: str):
        return getattr(self._local, name)


class SupervisorCounters:
    """The supervisor's counters (:data:`SUPERVISOR_COUNTERS`), written into the group's
    directory where every worker's ``/metrics`` reads them, exported from the group's start.

    The supervisor runs no registry of its own (prometheus-client picks its storage from the
    environment when first imported, and the supervisor's is not the workers'), so this writes
    prometheus-client's file format through its ``MmapedDict``, as its counters do. The file is
    opened at once and kept: what it counts is mostly a lack of descriptors or memory, when
    opening a file would fail too.
    """

    def __init__(self, directory: str) -> None:
        from prometheus_client.mmap_dict import MmapedDict

        self._file = MmapedDict(os.path.join(directory, f"counter_{os.getpid()}.db"))
        self._values = dict.fromkeys(SUPERVISOR_COUNTERS, 0.0)
        for name in SUPERVISOR_COUNTERS:
            self._write(name)

    def inc(self, name: str) -> None:
        self._values[name] += 1
        self._write(name)

    def _write(self, name: str) -> None:
        from prometheus_client.mmap_dict import mmap_key

        metric = f"eventbus_{name.removesuffix('_total')}"
        key = mmap_key(metric, f"eventbus_{name}", [], [], SUPERVISOR_COUNTERS[name])
        self._file.write_value(key, self._values[name], 0.0)

    def close(self) -> None:
        self._file.close()
