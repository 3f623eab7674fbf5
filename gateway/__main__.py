"""``python -m gateway`` / ``eventbus-gateway``: run one gateway process, or ``--workers N`` of
them on one port under a supervisor (:mod:`gateway.workers`)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import os
import socket
import sys
from collections.abc import Callable
from typing import BinaryIO

import msgspec

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.descriptors import fitted_connections
from gateway.group import SlotTaken, claim_slot
from gateway.logs import configure_logging, describe, get_logger, throttle_loop_errors
from gateway.workers import (
    GROUP_SIZE_ENV,
    WORKER_ID_ENV,
    Supervisor,
    resolve_workers,
    start_heartbeat,
    worker_command,
)
from serverkit import raise_descriptor_limit, warn_lowered


def main(argv: list[str] | None = None) -> None:
    open_standard_descriptors()
    try:
        config = load_config(argv)
    except ConfigError as exc:
        sys.stderr.write(f"python -m gateway: {exc}\n")
        raise SystemExit(2) from None
    configure_logging(config.log_format, config.log_level)
    workers = resolve_workers(config.workers)
    # An event loop that cannot be loaded ends the process here (SystemExit, named), the
    # supervisor's too: its workers would each fail on it at start and be restarted for good.
    make_loop = loop_factory(config.loop)
    if workers > 1:
        raise SystemExit(
            asyncio.run(supervise(config, workers, sys.argv[1:] if argv is None else argv))
        )
    # A worker of a group claims its slot before anything else (Redis, its metrics files, the
    # port), and holds it until the process ends.
    slot = claim_worker_slot()
    from gateway.server import ACCEPT_SLACK, run

    configured = config.max_connections  # (what the warnings name, once it is lowered)
    config = fit_descriptors(config, ACCEPT_SLACK)
    tune_gc()
    serve = functools.partial(run, configured_connections=configured)
    with slot or contextlib.nullcontext():
        with asyncio.Runner(loop_factory=make_loop) as runner:
            runner.run(_serve(config, serve))


def claim_worker_slot(environ: dict[str, str] | None = None) -> BinaryIO | None:
    """In a worker of a ``--workers`` group: claim its slot (:func:`gateway.group.claim_slot`)
    and return the lock file to hold; None for a single gateway. A slot another live process
    holds (this one was started with a copy of a worker's environment, say) ends this process
    with status 1, logged, before it listens or touches the slot's files."""
    environ = os.environ if environ is None else environ
    slot = environ.get(WORKER_ID_ENV)
    directory = environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not environ.get(GROUP_SIZE_ENV) or slot is None or not directory:
        return None
    log = get_logger("gateway")
    try:
        return claim_slot(directory, slot)
    except SlotTaken as exc:
        log.error(
            "worker slot already taken by a live process; exiting without listening",
            worker=slot,
            holder_pid=exc.holder,
            lock=exc.path,
            hint="one process per worker of a group: a copy of a worker's command and "
            "environment cannot run beside it",
        )
    except (OSError, ValueError) as exc:
        log.error(
            "worker slot could not be claimed; exiting without listening",
            worker=slot[:20],
            directory=directory,
            error=describe(exc),
        )
    raise SystemExit(1)


async def _serve(config: GatewayConfig, run) -> None:
    throttle_loop_errors(asyncio.get_running_loop())
    # In a --workers group: heartbeats to the supervisor for as long as this loop runs (start-up
    # and drain included); nothing for a single gateway.
    heartbeat = start_heartbeat()
    try:
        await run(config)
    finally:
        if heartbeat is not None:
            heartbeat.cancel()


def open_standard_descriptors() -> None:
    """Open ``/dev/null`` on each of descriptors 0, 1 and 2 that is closed, before anything else
    gets a descriptor, as daemon tools do.

    A parent may start the gateway with them closed (a daemonizing script, ``<&- >&- 2>&-``).
    The kernel hands out the lowest free number, so the first thing opened then lands on 0, 1 or
    2: the event loop's epoll, its wake-up socket, a worker's heartbeat pipe, a listening socket.
    Python also sets ``sys.stdout``/``sys.stderr`` to None then, and the first log line crashed
    the process: a supervisor exited 1 in silence with its workers just started. Workers inherit
    0-2 as their stdin and outputs, so those must be what they seem: ``/dev/null`` here is
    inheritable, and the ``sys`` streams are rebuilt on it (what is logged is discarded, as the
    closed outputs asked)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        try:
            null = os.open(os.devnull, os.O_RDWR)
        except OSError:  # no /dev/null (a bare chroot): nothing better to put there
            return
        if null != fd:  # (the lowest free number: it is ``fd``, unless a lower one was closed)
            os.dup2(null, fd)
            os.close(null)
        os.set_inheritable(fd, True)
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))  # lives as long as sys


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop for ``--loop``: None (asyncio's own) for ``asyncio``, uvloop's for
    ``uvloop`` (an error when it is not installed).

    Both run the same protocols and timers. Measured side by side (docs/benchmarks.md): uvloop
    takes less CPU per resume in a reconnect storm and less memory per idle connection, and
    delivers about a tenth fewer events per second to 1,000 subscribers. asyncio stays the default
    so that no established figure regresses; uvloop is one flag away for pods that live through
    storms."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise SystemExit(
            "python -m gateway: --loop uvloop: uvloop is not installed "
            "(pip install uvloop, or --loop asyncio)"
        ) from None
    return uvloop.new_event_loop


def fit_descriptors(config: GatewayConfig, slack: int) -> GatewayConfig:
    """Raise the soft descriptor limit to the hard one, and lower ``max_connections`` to what
    it can hold (with a warning) rather than run out of descriptors under load: past the limit
    every accept fails, and the admission bound (``max_connections`` + ``slack`` sockets) is
    what must refuse connections first. On Redis Cluster the gateway lowers it further once it
    knows the masters (``Gateway.fit_to_masters``)."""
    limit = raise_descriptor_limit()
    fitted = fitted_connections(config.max_connections, slack, limit)
    if fitted < config.max_connections:
        warn_lowered(
            get_logger("gateway"), "max_connections", config.max_connections, fitted, limit
        )
        config = msgspec.structs.replace(config, max_connections=fitted)
    return config


async def supervise(config: GatewayConfig, workers: int, argv: list[str]) -> int:
    """Run ``workers`` gateways on one port (see gateway.workers) until SIGTERM/SIGINT."""
    command = worker_command(argv)
    # The workers bind with SO_REUSEPORT, which would let them join any other process of this
    # user listening there (another group started by mistake): refuse a port in use, as a single
    # gateway does. With port 0, choose the port once here: every worker must bind the same one.
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((config.host, config.port))
        except OSError as exc:
            sys.stderr.write(f"python -m gateway: port {config.port}: {exc.strerror}\n")
            return 1
        port = probe.getsockname()[1]
        if config.port == 0:
            command += ["--port", str(port)]
    reservation = reserve_port(family, config.host, port)
    try:
        supervisor = Supervisor(
            command,
            workers,
            drain_timeout=config.drain_delay + config.drain_timeout,
            worker_timeout=config.worker_timeout,
            hold_late_signals=True,  # the supervisor's run is this process' last act
        )
        return await supervisor.run()
    finally:
        if reservation is not None:
            reservation.close()


def reserve_port(family: socket.AddressFamily, host: str, port: int) -> socket.socket | None:
    """A socket bound to the group's port for the supervisor's whole life, never listening (it
    gets no connection): the port check above then fails for another group started meanwhile.

    Without it the port was the group's only while a worker listened: a second group started
    while the first one's workers were still starting, or all being restarted, passed the check
    and its workers joined the first one's on the port (SO_REUSEPORT), each group getting a
    share of the other's connections. Bound with SO_REUSEPORT alone: the workers (same user,
    SO_REUSEPORT) bind beside it, a check or a single gateway (SO_REUSEADDR) does not.

    A port whose closed connections of a process that listened without SO_REUSEPORT (a single
    gateway stopped less than a minute ago) are still in TIME_WAIT refuses that bind: the
    socket is then bound with SO_REUSEADDR too, which the kernel checks at the bind only, and
    SO_REUSEADDR is cleared at once, so that the check and a single gateway are refused as
    before (verified here: a kernel that lets the check bind beside it gets no reservation).
    None, logged, when no way works; the group then runs as before, its port its own only while
    a worker listens."""
    error: OSError | None = None
    for reuse_address in (False, True):
        holder = socket.socket(family)
        try:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if reuse_address:
                holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind((host, port))
            if reuse_address:
                holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
                _check_refused(family, host, port)
            return holder
        except OSError as exc:
            holder.close()
            error = exc
    get_logger("gateway").info(
        "port not reserved for the group while no worker listens",
        port=port,
        error=describe(error) if error is not None else None,
    )
    return None


def _check_refused(family: socket.AddressFamily, host: str, port: int) -> None:
    """Raise OSError unless the port check (a bind with SO_REUSEADDR) is refused."""
    with socket.socket(family) as check:
        check.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            check.bind((host, port))
        except OSError:
            return
    raise OSError(errno.EADDRINUSE, "the reservation does not keep the port from others")


def tune_gc() -> None:
    """Fewer, cheaper cyclic garbage collections for a process holding thousands of connections.

    Each connection is a few dozen objects tracked by the collector while it sets up (about 20
    once idle). With CPython's defaults (a young collection every 700 new objects, the old
    generation walked whenever it grew by a quarter) a reconnect storm of 10,000 clients spent
    more time in the collector than in everything else. Here a young collection waits for
    500,000 new objects (CPython's count, which also grows with objects that go back to its
    free lists): a storm of 10,000 resumes sees two or three young collections of a few
    milliseconds, where at 50,000 it saw about eight of ~24 ms and a gen1 collection of
    ~170 ms (every young object alive at a collection is walked, connections in the middle of
    their handshake included: about a tenth of a storm's CPU). The old
    generation is considered after every 10 gen1 collections and then walked only once it has
    grown by a quarter (CPython's rule). What this defers is only what reference counting cannot
    free, and the gateway makes none of it per connection: a closed connection leaves no
    reference cycle (gateway.websocket and gateway.sse break them). Modules and startup objects
    are frozen out of every collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(500_000, 10, 10)


if __name__ == "__main__":
    main()
