"""A gateway whose descriptor limit is below ``--max-connections`` admits only what fits, and a
burst past that (silent sockets, or real WebSocket handshakes) is refused quietly: no accept fails
for want of a descriptor (asyncio would log an error for it and stop accepting for a second), the
clients already connected go on receiving events, and the pod takes new connections as soon as
the burst is gone. Both event loops (``--loop``) are held to it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import signal
import socket
import time

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from gateway.descriptors import (
    DESCRIPTOR_RESERVE,
    NODE_CONNECTIONS,
    REDIS_SOCKETS_PER_MASTER,
    fitted_connections,
)
from gateway.presence_store import PRESENCE_READS
from gateway.server import ACCEPT_SLACK
from gateway.store import CLUSTER_CONCURRENCY
from tests.support.gateway_client import RecordingClient, publish
from tests.support.gateway_process import GatewayProcess

#: The gateways' descriptor limit here, and the ``--max-connections`` it leaves (280).
LIMIT = 600
EFFECTIVE = LIMIT - ACCEPT_SLACK - DESCRIPTOR_RESERVE
#: Sockets in a burst: more than the process has descriptors.
BURST = 700


def test_fitted_connections() -> None:
    assert fitted_connections(20_000, 64, 1_048_576) == 20_000
    assert fitted_connections(20_000, 64, 20_000) == 20_000 - 64 - DESCRIPTOR_RESERVE
    assert fitted_connections(20_000, 64, 100) == 1


def test_fitted_connections_on_a_cluster_leave_room_for_every_masters_sockets() -> None:
    """On Redis Cluster each master costs its client pool and its pub/sub link on top of the
    reserve; a standalone Redis (no master counted) keeps the figures above."""
    assert REDIS_SOCKETS_PER_MASTER == NODE_CONNECTIONS + 1 == 101
    assert fitted_connections(20_000, 64, 20_000, 0) == 19_680
    assert fitted_connections(20_000, 64, 20_000, 3) == 19_680 - 3 * 101
    assert fitted_connections(20_000, 64, 20_000, 6) == 19_680 - 6 * 101
    assert fitted_connections(20_000, 64, 1_048_576, 6) == 20_000
    assert fitted_connections(400, 64, 600, 3) == 1


def test_the_reads_limited_per_master_fit_the_pool_counted_per_master() -> None:
    """What the gateway limits per master (history and presence reads) stays below the pool it
    counts per master, leaving room for its other calls, and its Cluster client is built with
    that pool: the count is the real bound, not a guess."""
    from gateway.server import redis_client

    assert CLUSTER_CONCURRENCY + PRESENCE_READS + 16 <= NODE_CONNECTIONS
    client = redis_client("redis+cluster://127.0.0.1:7000")
    (seed,) = client.nodes_manager.startup_nodes.values()
    assert seed.max_connections == NODE_CONNECTIONS


@pytest.fixture
def limited_gateway(redis_url):
    """``start(loop)``: a ``--no-auth`` gateway process on ``loop`` with :data:`LIMIT`
    descriptors, started and ready, which lowered ``--max-connections`` to :data:`EFFECTIVE`.
    Unauthenticated sockets are kept 30 s, so that a burst stays until the test ends it."""
    started: list[GatewayProcess] = []

    def start(loop: str) -> GatewayProcess:
        gateway = GatewayProcess(
            redis_url, descriptor_limit=LIMIT, args=["--auth-timeout", "30", "--loop", loop]
        )
        started.append(gateway)
        gateway.start()
        lowered = json.loads(gateway.log_lines("max_connections lowered")[0])
        assert lowered["effective"] == EFFECTIVE
        return gateway

    yield start
    for gateway in started:
        gateway.close()


async def subscribed_client(gateway: GatewayProcess, project_id: int) -> RecordingClient:
    client = await RecordingClient(gateway.ws_url).connect(auth=False)
    await client.subscribe(project_id)
    return client


@contextlib.contextmanager
def paused(gateway: GatewayProcess):
    """The gateway process stopped (SIGSTOP) for the block: connections made meanwhile wait in
    the kernel's accept queue, and the gateway meets them all at once when it goes on, as a
    burst that arrives while its event loop is busy."""
    assert gateway.pid is not None
    os.kill(gateway.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(gateway.pid, signal.SIGCONT)


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the IPv4 socket listening on ``port``."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                return int(fields[4].partition(":")[2], 16)  # rx_queue of a LISTEN socket
    raise AssertionError(f"nothing listens on {port}")


def open_silent_sockets(port: int, count: int) -> list[socket.socket]:
    """``count`` TCP connections that send nothing (each connects once the kernel has queued it
    for accept, whatever the gateway does with it then)."""
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def wait_until_dropped(sockets: list[socket.socket], count: int, within: float = 30) -> int:
    """Wait until at least ``count`` of the (silent) ``sockets`` were closed by the gateway (a
    socket it keeps has nothing to read); the number closed."""
    deadline = time.monotonic() + within
    dropped = 0
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            selector.register(sock, selectors.EVENT_READ)
        while dropped < count:
            assert time.monotonic() < deadline, f"{dropped} of {count} sockets dropped"
            for key, _ in selector.select(timeout=1):
                selector.unregister(key.fileobj)
                dropped += 1
    return dropped


async def connect_when_room(gateway: GatewayProcess, project_id: int) -> RecordingClient:
    """A new subscribed client, as soon as the gateway has room again (the sockets of a burst
    that just ended are being closed: a try may be refused until they are)."""
    async with asyncio.timeout(20):
        while True:
            try:
                return await subscribed_client(gateway, project_id)
            except (OSError, InvalidHandshake, TimeoutError):
                await asyncio.sleep(0.05)


def assert_quiet(gateway: GatewayProcess) -> None:
    """Nothing the burst did is an error in the log: asyncio's "socket.accept() out of system
    resource" (its accept failed for want of a descriptor, and it stopped accepting for 1 s)
    least of all."""
    text = gateway.log_path.read_text()
    assert "out of system resource" not in text, gateway.tail(40)
    errors = gateway.log_lines('"level": "error"')
    assert not errors, errors[:5]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_a_socket_flood_past_the_descriptor_limit_is_refused_quietly(
    limited_gateway, publisher, loop
) -> None:
    gateway = await asyncio.to_thread(limited_gateway, loop)
    client = await subscribed_client(gateway, 1)
    with paused(gateway):
        flood = await asyncio.to_thread(open_silent_sockets, gateway.port, BURST)
    try:
        # The gateway keeps `EFFECTIVE + ACCEPT_SLACK` sockets (the client's among them) and
        # closes the others as it accepts them: wait until it has met the whole flood. Its
        # accept never failed meanwhile (assert_quiet), so it did not stop accepting.
        await asyncio.to_thread(wait_until_dropped, flood, BURST - EFFECTIVE - ACCEPT_SLACK)
        await publish(publisher, 1, 1)
        await client.wait_for(lambda: client.seqs(1) == [1])
    finally:
        for sock in flood:
            sock.close()
    late = await connect_when_room(gateway, 1)
    await publish(publisher, 1, 1)
    await client.wait_for(lambda: client.seqs(1) == [1, 2])
    await late.wait_for(lambda: late.seqs(1) == [2])
    assert gateway.get("/healthz")[0] == 200
    await client.close()
    await late.close()
    assert_quiet(gateway)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_a_burst_of_handshakes_past_the_descriptor_limit_is_refused_politely(
    limited_gateway, publisher, loop
) -> None:
    """700 clients open a WebSocket at once on a gateway with room for 280 connections: each
    one gets its connection, a 503 (``Retry-After``), or (past the admission bound) a closed
    socket, and none waits out its timeout."""
    gateway = await asyncio.to_thread(limited_gateway, loop)
    client = await subscribed_client(gateway, 1)

    async def handshake() -> ClientConnection | str:
        try:
            return await connect(gateway.ws_url, open_timeout=20, compression=None)
        except InvalidStatus as exc:
            assert exc.response.status_code == 503, exc
            assert exc.response.headers["Retry-After"] == "5"
            return "503"
        except TimeoutError:
            return "timed out"
        except (OSError, InvalidHandshake):  # closed before it answered: dropped at accept
            return "dropped"

    with paused(gateway):
        burst = [asyncio.create_task(handshake()) for _ in range(BURST)]
        async with asyncio.timeout(20):
            while accept_queue(gateway.port) < BURST:  # noqa: ASYNC110 - the kernel's count
                await asyncio.sleep(0.02)
        await publish(publisher, 1, 1)  # reaches the gateway with the burst
    outcomes = await asyncio.gather(*burst)
    opened = [outcome for outcome in outcomes if isinstance(outcome, ClientConnection)]
    counts = {kind: outcomes.count(kind) for kind in ("503", "dropped", "timed out")}
    try:
        await publish(publisher, 1, 1)  # while the burst holds the gateway full
        await client.wait_for(lambda: client.seqs(1) == [1, 2])
        assert counts["timed out"] == 0, counts
        # The gateway was filled (the client holds one place) and refused the rest, politely
        # while its admission bound left room for the answer.
        assert 0 < len(opened) <= EFFECTIVE - 1, (len(opened), counts)
        assert counts["503"] > 0, counts
    finally:
        await asyncio.gather(*(ws.close() for ws in opened))
    late = await connect_when_room(gateway, 1)
    await publish(publisher, 1, 1)
    await client.wait_for(lambda: client.seqs(1) == [1, 2, 3])
    await late.wait_for(lambda: late.seqs(1) == [3])
    await client.close()
    await late.close()
    assert_quiet(gateway)


#: A cluster pod: 6 masters, each owning some of the projects a storm reads at once.
CLUSTER_MASTERS = 6
CLUSTER_LIMIT = 1600


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_full_pod_on_a_cluster_keeps_descriptors_for_every_masters_redis_sockets(
    redis_cluster_factory,
) -> None:
    """On Redis Cluster the gateway holds Redis sockets per master (history and presence reads
    are limited per master), far more than the reserve a standalone Redis needs. A pod held full
    by a flood, whose clients then subscribe to projects on every master while the masters
    hang (each read holds its socket until the subscribe times out), must still find a
    descriptor for every one of those sockets: before, the reads' connects failed with EMFILE
    ("Too many open files"), and the pod's accept() with them."""
    cluster = redis_cluster_factory(
        CLUSTER_MASTERS, 0, extra_args=["--cluster-require-full-coverage", "no"]
    )
    spread = cluster.projects_by_master(range(1, 20_000))
    projects = [p for own in spread.values() for p in own[: CLUSTER_CONCURRENCY + 6]]
    gateway = GatewayProcess(
        cluster.url, descriptor_limit=CLUSTER_LIMIT, args=["--auth-timeout", "30"]
    )
    holders: list[RecordingClient] = []
    clients: list[RecordingClient] = []
    try:
        await asyncio.to_thread(gateway.start)
        # Lowered for the descriptor limit at start, then for the cluster's masters once its
        # slot map is known (before the port opens).
        bound = fitted_connections(20_000, ACCEPT_SLACK, CLUSTER_LIMIT, CLUSTER_MASTERS)
        assert bound == CLUSTER_LIMIT - ACCEPT_SLACK - DESCRIPTOR_RESERVE - 6 * 101 == 674
        lowered = [json.loads(line) for line in gateway.log_lines("max_connections lowered")]
        assert [(line["effective"], line.get("masters")) for line in lowered] == [
            (CLUSTER_LIMIT - ACCEPT_SLACK - DESCRIPTOR_RESERVE, None),
            (bound, CLUSTER_MASTERS),
        ]
        # Every project followed (its channel subscribed) by a holder, 70 projects each: the
        # resumes below then wait for their reads alone.
        for start in range(0, len(projects), 70):
            holder = await RecordingClient(gateway.ws_url).connect(auth=False)
            holders.append(holder)
            for project_id in projects[start : start + 70]:
                await holder.subscribe(project_id)
        clients = await asyncio.gather(
            *(RecordingClient(gateway.ws_url).connect(auth=False) for _ in projects)
        )
        flood = await asyncio.to_thread(open_silent_sockets, gateway.port, CLUSTER_LIMIT)
        try:
            kept = bound + ACCEPT_SLACK - len(clients) - len(holders)
            await asyncio.to_thread(wait_until_dropped, flood, CLUSTER_LIMIT - kept)
            for node in cluster.masters():
                node.freeze()
            try:
                # One history read per client (a resume from an epoch the window does not
                # know), each held by its hung master until the subscribe's timeout: then
                # 'unavailable', every one.
                for client, project_id in zip(clients, projects, strict=True):
                    await client.send(
                        {"type": "subscribe", "project_id": project_id, "epoch": "old", "after": 1}
                    )
                for client in clients:
                    await client.wait_for(lambda c=client: c.count("error") == 1, within=30)
            finally:
                for node in cluster.nodes:
                    node.thaw()
        finally:
            for sock in flood:
                sock.close()
        text = gateway.log_path.read_text()
        assert "Too many open files" not in text, gateway.tail(40)
        assert "out of system resource" not in text, gateway.tail(40)
    finally:
        await asyncio.gather(*(client.close() for client in [*holders, *clients]))
        gateway.close()


def test_the_admission_bound_follows_the_masters_of_a_re_shard(monkeypatch) -> None:
    """Masters added later (a re-shard) lower the bound again; masters removed give the room
    back, never past what the descriptor limit left for a standalone Redis. The arithmetic
    only: the masters are counted by :meth:`Gateway.cluster_masters`."""
    import gateway.server
    from gateway.config import GatewayConfig

    monkeypatch.setattr(gateway.server.resource, "getrlimit", lambda _: (2_000, 2_000))
    standalone = fitted_connections(20_000, ACCEPT_SLACK, 2_000)  # what __main__ left: 1,680
    config = GatewayConfig(
        no_auth=True, redis_url="redis+cluster://127.0.0.1:7000", max_connections=standalone
    )
    pod = gateway.server.Gateway(config)
    known = [0]
    monkeypatch.setattr(pod, "cluster_masters", lambda: known[0])
    bounds = []
    for masters in (0, 3, 3, 6, 4, 3):
        known[0] = masters
        pod.fit_to_masters()
        bounds.append(pod.admission.max_connections)
    assert bounds == [
        1_680,
        1_680 - 3 * 101,
        1_680 - 3 * 101,
        1_680 - 6 * 101,
        1_680 - 4 * 101,
        1_680 - 3 * 101,
    ]


@pytest.mark.slow
async def test_an_in_process_gateway_counts_the_clusters_masters(gateways, redis_cluster_url):
    """The masters are counted from the slot map before the port opens."""
    import resource

    pod = await gateways(redis_url=redis_cluster_url, auth_secret=None, no_auth=True)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert pod.fitted_masters == 3
    assert pod.admission.max_connections == fitted_connections(
        pod.config.max_connections, ACCEPT_SLACK, limit, 3
    )


async def test_a_gateway_starts_while_no_cluster_node_answers(gateways) -> None:
    """The masters are looked up before the port opens, but a cluster that does not answer
    yet (its seed down) does not stop the start: the bound is fitted once the map is read."""
    from tests.support.redis_server import free_port

    pod = await gateways(redis_url=f"redis+cluster://127.0.0.1:{free_port()}", no_auth=True)
    assert pod.fitted_masters == 0
    assert pod.admission.max_connections == pod.config.max_connections


def test_the_cluster_warning_names_the_bound_the_operator_configured(monkeypatch) -> None:
    """The warning that the masters' sockets lowered the bound says what the operator asked for
    (``--max-connections``) as ``configured``, not the figure ``gateway.__main__`` had already
    lowered it to for a standalone Redis (the operator could not find 1,680 anywhere in their
    configuration)."""
    import structlog

    import gateway.server
    from gateway.config import GatewayConfig

    monkeypatch.setattr(gateway.server.resource, "getrlimit", lambda _: (2_000, 2_000))
    standalone = fitted_connections(20_000, ACCEPT_SLACK, 2_000)
    config = GatewayConfig(
        no_auth=True, redis_url="redis+cluster://127.0.0.1:7000", max_connections=standalone
    )
    pod = gateway.server.Gateway(config, configured_connections=20_000)
    monkeypatch.setattr(pod, "cluster_masters", lambda: 3)
    with structlog.testing.capture_logs() as logs:
        pod.fit_to_masters()
    [warning] = [line for line in logs if line["log_level"] == "warning"]
    assert warning["configured"] == 20_000
    assert warning["effective"] == standalone - 3 * REDIS_SOCKETS_PER_MASTER
