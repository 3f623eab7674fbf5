"""A private Redis Cluster for tests, built from ``redis-server`` binaries on free ports.

    with RedisCluster(masters=3, replicas=1) as cluster:
        publisher = Publisher.from_url(cluster.url)          # redis+cluster://127.0.0.1:<port>
        node = cluster.node_for_project(42)                  # master owning {42}
        new_master = cluster.failover(node)                  # CLUSTER FAILOVER on its replica
        cluster.kill(new_master); cluster.wait_promotion(...)
        cluster.migrate_slot(cluster.project_slot(42), cluster.masters()[0])

Every node gets its own temporary directory (``nodes.conf``, log) and runs without persistence.
The cluster node timeout is short (1 s by default) so that failure detection and failovers take
seconds, not the production default of 15 s. All waits are bounded and fail with the state they
saw; every process started here is killed on ``close()``, on a failed start, and at interpreter
exit as a last resort.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import redis
from redis.crc import key_slot

from schemas.keys import DEFAULT_PREFIX, Keys
from tests.support.redis_server import free_port

__all__ = ["ClusterError", "ClusterNode", "RedisCluster", "SlotMigration"]

HASH_SLOTS = 16384
T = TypeVar("T")


class ClusterError(RuntimeError):
    """The cluster could not be started, or did not reach the expected state in time."""


# Every server process still running, killed at interpreter exit if a test forgot close() or
# crashed before it. Strong references on purpose: a cluster object that is garbage-collected
# without close() must not take the only handle on its processes with it.
_running: set[subprocess.Popen[bytes]] = set()
_directories: set[Path] = set()


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_running):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait(5)
    for directory in list(_directories):
        shutil.rmtree(directory, ignore_errors=True)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the test process is SIGKILLed (e.g. by a
    # pytest-timeout in thread mode or an impatient CI), the servers go with it instead of
    # holding ports. PR_SET_PDEATHSIG = 1.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _wait_for(
    what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.05
) -> T:
    """Call ``probe`` until it returns something truthy; raise ClusterError with the last
    observation (a string returned through ``_Pending``) or exception after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = probe()
        except (redis.exceptions.RedisError, OSError) as exc:
            result, last = None, exc
        else:
            if isinstance(result, _Pending):
                last, result = result.reason, None
        if result:
            return result
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last}")
        time.sleep(interval)


class _Pending:
    """A probe's 'not yet', with the reason reported if the wait times out."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __bool__(self) -> bool:
        return False


class ClusterNode:
    """One ``redis-server`` of the cluster. Survives kill/start: same port, same directory, so
    a restarted node rejoins with its ``nodes.conf`` (and, without persistence, no data)."""

    def __init__(self, cluster: RedisCluster, port: int) -> None:
        self.cluster = cluster
        self.port = port
        self.dir = cluster.dir / str(port)
        self.dir.mkdir()
        self.process: subprocess.Popen[bytes] | None = None
        self.node_id: str = ""
        self._client: redis.Redis | None = None

    def __repr__(self) -> str:
        state = "up" if self.alive else "down"
        return f"<ClusterNode 127.0.0.1:{self.port} {self.node_id[:8] or '?'} {state}>"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def client(self) -> redis.Redis:
        """A plain (non-cluster) client of this node alone, cached; for admin commands."""
        if self._client is None:
            self._client = redis.Redis(
                host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=2
            )
        return self._client

    def execute(self, *args: object) -> object:
        return self.client().execute_command(*args)

    def role(self) -> str:
        """'master' or 'slave', as the node itself says."""
        role = self.execute("ROLE")[0]
        return role.decode() if isinstance(role, bytes) else role

    def cluster_info(self) -> dict[str, str]:
        """``CLUSTER INFO`` as a dict of strings."""
        raw = self.execute("CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else raw
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def start(self, timeout: float = 10.0) -> None:
        if self.alive:
            return
        binary = self.cluster.binary
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "no",
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.log),
            "--save",
            "",
            "--appendonly",
            "no",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(self.cluster.node_timeout_ms),
            # A replica may take over however long it was disconnected: tests kill masters at
            # arbitrary moments and must get a deterministic failover, not a refused one.
            "--cluster-replica-validity-factor",
            "0",
            # Keep the topology the test built: no replica wanders off to an orphaned master.
            "--cluster-allow-replica-migration",
            "no",
            # DEBUG commands (e.g. DEBUG SLEEP) for fault tests.
            "--enable-debug-command",
            "local",
            *self.cluster.extra_args,
        ]
        in_main_thread = threading.current_thread() is threading.main_thread()
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # PDEATHSIG fires when the parent *thread* ends, so only tie the server to the main
            # thread; nodes started from worker threads rely on close() and atexit.
            preexec_fn=_die_with_parent if in_main_thread else None,
        )
        _running.add(self.process)

        def pong() -> bool | _Pending:
            if self.process is not None and self.process.poll() is not None:
                raise ClusterError(
                    f"redis-server on {self.port} exited with {self.process.returncode}; "
                    f"log: {self.tail_log()}"
                )
            try:
                return bool(self.client().ping())
            except redis.exceptions.ConnectionError as exc:
                return _Pending(str(exc))

        _wait_for(f"redis-server on port {self.port} to answer PING", pong, timeout, 0.02)
        self.node_id = self.execute("CLUSTER", "MYID").decode()

    def kill(self) -> None:
        """SIGKILL: the node vanishes at once (and, without persistence, its data with it)."""
        self._end(lambda process: process.kill())

    def freeze(self) -> None:
        """SIGSTOP: the node hangs with its sockets open (a paused VM, a stuck host) until
        :meth:`thaw`, however long the test takes meanwhile. Returns once it is stopped."""
        assert self.process is not None, f"{self} is not running"
        self.process.send_signal(signal.SIGSTOP)
        path = f"/proc/{self.process.pid}/stat"
        _wait_for(
            f"{self} to stop",
            lambda: Path(path).read_text().rpartition(")")[2].split()[0] in ("T", "t"),
            5.0,
        )

    def thaw(self) -> None:
        """SIGCONT: a frozen node runs again (harmless on one that is not frozen)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM: a clean shutdown."""
        self._end(lambda process: process.terminate())

    def _end(self, how: Callable[[subprocess.Popen[bytes]], None]) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        process, self.process = self.process, None
        if process is None:
            return
        _running.discard(process)
        if process.poll() is not None:
            return
        how(process)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def tail_log(self, lines: int = 15) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class SlotMigration:
    """Moving one hash slot between masters, step by step, the way ``redis-cli --cluster
    reshard`` does it. Tests can act between the steps (e.g. publish while keys are in flight,
    which Redis answers with ASK/TRYAGAIN redirects)."""

    def __init__(self, cluster: RedisCluster, slot: int, target: ClusterNode) -> None:
        self.cluster = cluster
        self.slot = slot
        self.source = cluster.master_of_slot(slot)
        self.target = target
        if target.role() != "master":
            raise ClusterError(f"{target} is not a master; slots can only move to masters")

    def begin(self) -> SlotMigration:
        """Mark the slot IMPORTING on the target, then MIGRATING on the source (in that order,
        so the source never ASK-redirects to a node that would refuse)."""
        self.target.execute("CLUSTER", "SETSLOT", self.slot, "IMPORTING", self.source.node_id)
        self.source.execute("CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.target.node_id)
        return self

    def move_keys(self, batch: int = 1000) -> int:
        """MIGRATE every key of the slot, ``batch`` keys per atomic MIGRATE; return how many."""
        moved = 0
        while True:
            keys = self.source.execute("CLUSTER", "GETKEYSINSLOT", self.slot, batch)
            if not keys:
                return moved
            self.source.execute(
                "MIGRATE", "127.0.0.1", self.target.port, "", 0, 5000, "KEYS", *keys
            )
            moved += len(keys)

    def finish(self, timeout: float = 15.0) -> None:
        """Assign the slot to the target everywhere (target first, which bumps its config
        epoch, then the source, then the other masters) and wait for every node to agree."""
        others = [m for m in self.cluster.masters() if m not in (self.source, self.target)]
        for node in (self.target, self.source, *others):
            node.execute("CLUSTER", "SETSLOT", self.slot, "NODE", self.target.node_id)
        self.cluster.wait_until(
            f"slot {self.slot} owned by {self.target} on every node",
            lambda: self.cluster._owner_everywhere(self.slot, self.target),
            timeout,
        )

    def run(self) -> None:
        self.begin()
        self.move_keys()
        self.finish()


class RedisCluster:
    """A local Redis Cluster: ``masters`` masters with ``replicas`` replicas each.

    Args:
        masters: at least 3 (Redis Cluster's own minimum for a majority to fail a master over).
        replicas: replicas per master; 1 or more for failover tests.
        node_timeout_ms: ``cluster-node-timeout``; failure detection takes about this long.
        extra_args: more ``redis-server`` arguments for every node.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 0,
        *,
        node_timeout_ms: int = 1000,
        extra_args: Iterable[str] = (),
    ) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if binary is None or cli is None:
            raise ClusterError("redis-server/redis-cli not found; run `make install`")
        self.binary, self.cli = binary, cli
        self.n_masters, self.n_replicas = masters, replicas
        self.node_timeout_ms = node_timeout_ms
        self.extra_args = list(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix="eventbus-cluster-"))
        _directories.add(self.dir)
        self.nodes: list[ClusterNode] = []

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> RedisCluster:
        """Start the servers, join them with ``redis-cli --cluster create``, and wait until every
        node reports ``cluster_state:ok`` with all slots covered (and replicas in sync)."""
        try:
            for _ in range(self.n_masters * (1 + self.n_replicas)):
                self.nodes.append(self._start_node())
            create = subprocess.run(
                [
                    self.cli,
                    "--cluster",
                    "create",
                    *(node.address for node in self.nodes),
                    "--cluster-replicas",
                    str(self.n_replicas),
                    "--cluster-yes",
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if create.returncode != 0:
                raise ClusterError(
                    f"redis-cli --cluster create failed ({create.returncode}): "
                    f"{create.stdout[-2000:]} {create.stderr[-2000:]}"
                )
            self.wait_healthy(timeout)
        except BaseException:
            # Including KeyboardInterrupt and timeouts: never leave half a cluster running.
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill every node and remove every temporary directory. Idempotent."""
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        _directories.discard(self.dir)

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start_node(self, attempts: int = 3) -> ClusterNode:
        """A new node on a free port pair. A port found free can still be taken by another
        process before redis-server binds it; then the server exits and another pair is tried."""
        for attempt in range(attempts):
            node = ClusterNode(self, self._free_port_pair())
            try:
                node.start()
                return node
            except ClusterError:
                node.kill()
                shutil.rmtree(node.dir, ignore_errors=True)
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _free_port_pair(self) -> int:
        # Cluster nodes also listen on port + 10000 (the cluster bus): both must be free, and
        # neither may be one of this cluster's ports.
        taken = {p for node in self.nodes for p in (node.port, node.port + 10000)}
        for _ in range(200):
            port = free_port()
            if port + 10000 > 65535 or {port, port + 10000} & taken:
                continue
            if _port_free(port + 10000):
                return port
        raise ClusterError("could not find a free port pair (port, port + 10000)")

    # --- addresses and topology -----------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis+cluster://`` URL seeded from a live master (the client discovers the rest)."""
        seeds = [n for n in self.nodes if n.alive]
        masters = [n for n in seeds if _safe_role(n) == "master"]
        seed = (masters or seeds or [None])[0]
        if seed is None:
            raise ClusterError("no node of the cluster is running")
        return f"redis+cluster://{seed.address}"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def node(self, port_or_id: int | str) -> ClusterNode:
        for node in self.nodes:
            if port_or_id in (node.port, node.node_id):
                return node
        raise KeyError(port_or_id)

    def alive_nodes(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.alive]

    def masters(self) -> list[ClusterNode]:
        """Running nodes that are masters right now (by their own ROLE), in port order."""
        return [node for node in self.alive_nodes() if _safe_role(node) == "master"]

    def replicas(self) -> list[ClusterNode]:
        return [node for node in self.alive_nodes() if _safe_role(node) == "slave"]

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        """Nodes configured as replicas of ``master`` (alive or not), from a live node's view."""
        view = self._nodes_view()
        return [
            self.node(node_id)
            for node_id, entry in view.items()
            if entry["master_id"] == master.node_id
        ]

    def slot_map(self) -> dict[int, ClusterNode]:
        """Slot -> master, as a live master sees it (``CLUSTER SLOTS``)."""
        return _slot_map(self._any_master())

    def master_of_slot(self, slot: int) -> ClusterNode:
        return self.slot_map()[slot]

    @staticmethod
    def key_slot(key: str | bytes) -> int:
        return key_slot(key.encode() if isinstance(key, str) else key)

    @staticmethod
    def project_slot(project_id: int, prefix: str = DEFAULT_PREFIX) -> int:
        """The slot of every key and the channel of a project (they share the ``{id}`` tag)."""
        return key_slot(Keys(prefix).meta(project_id).encode())

    def node_for_project(self, project_id: int, prefix: str = DEFAULT_PREFIX) -> ClusterNode:
        return self.master_of_slot(self.project_slot(project_id, prefix))

    def projects_by_master(
        self, project_ids: Iterable[int], prefix: str = DEFAULT_PREFIX
    ) -> dict[ClusterNode, list[int]]:
        slots = self.slot_map()
        spread: dict[ClusterNode, list[int]] = {}
        for project_id in project_ids:
            spread.setdefault(slots[self.project_slot(project_id, prefix)], []).append(project_id)
        return spread

    # --- data -----------------------------------------------------------------------------

    def flushall(self) -> None:
        """Empty every master (replicas follow). Scripts stay cached."""
        for master in self.masters():
            master.execute("FLUSHALL")

    def client(self, **kwargs: object) -> redis.cluster.RedisCluster:
        """A redis-py cluster client (the caller closes it)."""
        seed = self._any_master()
        return redis.cluster.RedisCluster(host="127.0.0.1", port=seed.port, **kwargs)

    # --- faults ---------------------------------------------------------------------------

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL one node. The cluster notices after about ``node_timeout_ms``."""
        node.kill()

    def restart(self, node: ClusterNode, timeout: float = 30.0) -> None:
        """Start a stopped node again; it rejoins from its ``nodes.conf`` with an empty dataset
        (a former master that was failed over comes back as a replica of its successor)."""
        node.start()
        self.wait_healthy(timeout)

    def failover(
        self, master: ClusterNode, *, force: bool = False, timeout: float = 30.0
    ) -> ClusterNode:
        """Manual failover: ``CLUSTER FAILOVER`` on a replica of ``master`` (which must be
        running unless ``force``). Return the replica, now master, once all nodes agree."""
        candidates = [r for r in self.replicas_of(master) if r.alive]
        if not candidates:
            raise ClusterError(f"{master} has no running replica to fail over to")
        replica = candidates[0]
        if not force:
            self._wait_in_sync(replica, timeout)
        replica.execute("CLUSTER", "FAILOVER", *(["FORCE"] if force else []))
        self.wait_promotion(replica, timeout)
        return replica

    def kill_master(self, master: ClusterNode, timeout: float = 30.0) -> ClusterNode:
        """SIGKILL a master and wait until one of its replicas was elected in its place (about
        node timeout + 1 s); return the new master."""
        replicas = [r for r in self.replicas_of(master) if r.alive]
        if not replicas:
            raise ClusterError(f"{master} has no running replica; its slots would stay down")
        for replica in replicas:
            self._wait_in_sync(replica, timeout)
        master.kill()

        def promoted() -> ClusterNode | _Pending:
            for replica in replicas:
                if replica.alive and _safe_role(replica) == "master":
                    return replica
            return _Pending(f"no replica of {master} is master yet")

        new_master = _wait_for(f"a replica of {master} to take over", promoted, timeout)
        self.wait_promotion(new_master, timeout)
        return new_master

    def wait_promotion(self, node: ClusterNode, timeout: float = 30.0) -> None:
        """Wait until ``node`` is a master that owns slots in every live node's view, and the
        cluster is healthy."""

        def promoted() -> bool | _Pending:
            if _safe_role(node) != "master":
                return _Pending(f"{node} is still {_safe_role(node)}")
            for other in self.alive_nodes():
                if node not in _slot_map(other).values():
                    return _Pending(f"{other} does not yet route any slot to {node}")
            return True

        _wait_for(f"{node} to become master everywhere", promoted, timeout)
        self.wait_healthy(timeout)

    def start_slot_migration(self, slot: int, target: ClusterNode) -> SlotMigration:
        """IMPORTING/MIGRATING set; call ``.move_keys()`` then ``.finish()`` on the result."""
        return SlotMigration(self, slot, target).begin()

    def migrate_slot(self, slot: int, target: ClusterNode) -> ClusterNode:
        """Move ``slot`` with its keys to master ``target``; return the former owner."""
        migration = SlotMigration(self, slot, target)
        if migration.source is target:
            return target
        migration.run()
        return migration.source

    # --- waiting --------------------------------------------------------------------------

    def wait_until(self, what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
        return _wait_for(what, probe, timeout)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node: ``cluster_state:ok``, all 16384 slots assigned, the same slot map
        with only live masters in it, and every live replica's link to its master up."""
        _wait_for("the cluster to be healthy", self._health, timeout, 0.1)

    def _health(self) -> bool | _Pending:
        alive = self.alive_nodes()
        if not alive:
            return _Pending("no node is running")
        maps = []
        for node in alive:
            info = node.cluster_info()
            if info.get("cluster_state") != "ok":
                return _Pending(f"{node}: cluster_state={info.get('cluster_state')}")
            if info.get("cluster_slots_assigned") != str(HASH_SLOTS):
                return _Pending(f"{node}: {info.get('cluster_slots_assigned')} slots assigned")
            if int(info.get("cluster_slots_fail", 0)) or int(info.get("cluster_slots_pfail", 0)):
                return _Pending(f"{node}: slots in fail/pfail state")
            if _safe_role(node) == "slave":
                link = node.client().info("replication").get("master_link_status")
                if link != "up":
                    return _Pending(f"replica {node}: master_link_status={link}")
            maps.append(_slot_map(node))
        views = [self._roles_seen_by(node, alive) for node in alive]
        if any(view != views[0] for view in views[1:]):
            return _Pending("nodes disagree about who replicates whom")
        for node in alive:
            if views[0].get(node.node_id, ("?",))[0] != _safe_role(node):
                return _Pending(f"{node} says it is {_safe_role(node)}, the others disagree")
        reference = maps[0]
        if len(reference) != HASH_SLOTS:
            return _Pending(f"{len(reference)} slots in CLUSTER SLOTS")
        if any(m != reference for m in maps[1:]):
            return _Pending("nodes disagree about the slot map")
        owners = set(reference.values())
        if any(not owner.alive for owner in owners):
            return _Pending("a dead node still owns slots")
        return True

    def _wait_in_sync(self, replica: ClusterNode, timeout: float) -> None:
        """A replica whose link is up and whose offset matches its master's."""

        def in_sync() -> bool | _Pending:
            replication = replica.client().info("replication")
            if replication.get("master_link_status") != "up":
                return _Pending(f"{replica}: link {replication.get('master_link_status')}")
            master = self.node(int(replication["master_port"]))
            master_offset = master.client().info("replication")["master_repl_offset"]
            if replication.get("slave_repl_offset") != master_offset:
                return _Pending(f"{replica}: offset behind master")
            return True

        _wait_for(f"{replica} to be in sync with its master", in_sync, timeout)

    def _owner_everywhere(self, slot: int, owner: ClusterNode) -> bool | _Pending:
        for node in self.alive_nodes():
            seen = _slot_map(node).get(slot)
            if seen is not owner:
                return _Pending(f"{node} routes slot {slot} to {seen}")
        return True

    def _any_master(self) -> ClusterNode:
        masters = self.masters()
        if not masters:
            raise ClusterError("no master is running")
        return masters[0]

    def _nodes_view(self) -> dict[str, dict[str, str]]:
        """``CLUSTER NODES`` of a live node: node id -> {address, flags, master_id}."""
        for node in self.alive_nodes():
            with contextlib.suppress(redis.exceptions.RedisError):
                return _cluster_nodes(node)
        raise ClusterError("no node answered CLUSTER NODES")

    @staticmethod
    def _roles_seen_by(node: ClusterNode, alive: list[ClusterNode]) -> dict[str, tuple[str, str]]:
        """What ``node`` believes about every live node: id -> (role, id of its master)."""
        view = _cluster_nodes(node)
        ids = {n.node_id for n in alive}
        return {
            node_id: ("master" if "master" in entry["flags"] else "slave", entry["master_id"])
            for node_id, entry in view.items()
            if node_id in ids
        }


def _safe_role(node: ClusterNode) -> str:
    try:
        return node.role()
    except (redis.exceptions.RedisError, OSError):
        return "unreachable"


def _cluster_nodes(node: ClusterNode) -> dict[str, dict[str, str]]:
    text = node.execute("CLUSTER", "NODES")
    text = text.decode() if isinstance(text, bytes) else text
    view = {}
    for line in text.splitlines():
        fields = line.split()
        view[fields[0]] = {
            "address": fields[1].split("@")[0],
            "flags": fields[2],
            "master_id": "" if fields[3] == "-" else fields[3],
        }
    return view


def _slot_map(node: ClusterNode) -> dict[int, ClusterNode]:
    cluster = node.cluster
    by_port = {n.port: n for n in cluster.nodes}
    slots: dict[int, ClusterNode] = {}
    for entry in node.execute("CLUSTER", "SLOTS"):
        start, end, master = entry[0], entry[1], entry[2]
        owner = by_port.get(int(master[1]))
        if owner is None:
            raise ClusterError(f"{node} routes slots to unknown node {master[:2]}")
        for slot in range(start, end + 1):
            slots[slot] = owner
    return slots


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
