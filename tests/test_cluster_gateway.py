"""Gateway processes on a real Redis Cluster: sharded pub/sub routed per master, slot migrations
and master failovers followed, full sequences compared end to end.

Every test runs real ``python -m gateway`` processes against a local cluster (see
``tests/support/redis_cluster.py``), publishes identifiable events with several publishers, and
checks each client's complete record with :func:`check_delivery` against what Redis finally holds.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from publisher.connection import async_client
from schemas.keys import Keys
from tests.support.gateway_process import GatewayGroup, GatewayProcess
from tests.support.redis_cluster import RedisCluster
from tests.support.ws_client import (
    PublishLoop,
    ResumingClient,
    check_delivery,
    read_history,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KEYS = Keys()


@pytest.fixture
def gateways():
    with GatewayGroup() as group:
        yield group


def projects_on_every_master(cluster: RedisCluster, per_master: int) -> list[int]:
    """Project ids spread evenly over the masters (by the slot of their ``{id}`` tag)."""
    spread = cluster.projects_by_master(range(1, 500))
    assert len(spread) == len(cluster.masters())
    return sorted(p for projects in spread.values() for p in projects[:per_master])


def make_clients(
    gateways: list[GatewayProcess], projects: list[int], count: int, per_client: int, seed: int
) -> list[ResumingClient]:
    rng = random.Random(seed)
    urls = [g.ws_url for g in gateways]
    return [
        ResumingClient(urls, rng.sample(projects, per_client), start=i, name=str(i)).start()
        for i in range(count)
    ]


async def all_live(clients: list[ResumingClient], within: float = 20.0) -> None:
    await wait_until(
        lambda: all(c.live == set(c.projects) for c in clients), within, "clients subscribed"
    )


async def publish(
    url: str, projects: list[int], *, publishers: int, rate: float, until
) -> list[PublishLoop]:
    """Run ``publishers`` loops until ``await until(loops)`` returns, then stop them."""
    loops = [
        PublishLoop(url, projects, rate=rate, seed=i).start() for i in range(publishers)
    ]
    try:
        await until(loops)
    finally:
        for loop in loops:
            await loop.stop()
    return loops


async def final_state(url: str, projects: list[int]):
    client = async_client(url)
    try:
        return {p: await read_history(client, KEYS, p) for p in projects}
    finally:
        await client.aclose()


async def verify(
    clients: list[ResumingClient],
    url: str,
    projects: list[int],
    *,
    allowed_resyncs: set[str] = frozenset(),  # type: ignore[assignment]
    within: float = 30.0,
) -> dict:
    """Wait until every client reached each project's final cursor, then check every record."""
    state = await final_state(url, projects)
    finals = {p: cursor for p, (cursor, _) in state.items()}
    for client in clients:
        await client.wait_for(lambda c=client: c.reached(finals), within, "final cursors")
    problems = []
    for client in clients:
        for project_id in client.projects:
            cursor, history = state[project_id]
            for problem in check_delivery(
                client.log[project_id],
                history=history,
                final=cursor,
                allowed_resyncs=allowed_resyncs,
            ):
                problems.append(f"client {client.name} project {project_id}: {problem}")
    assert not problems, "\n".join(problems[:30])
    return state


async def stop_all(clients: list[ResumingClient]) -> None:
    await asyncio.gather(*(c.stop() for c in clients))


async def test_every_client_gets_every_event_of_projects_on_all_shards(
    redis_cluster: RedisCluster, redis_cluster_url: str, gateways: GatewayGroup
):
    projects = projects_on_every_master(redis_cluster, 3)  # 9 projects, 3 per master
    pods = await asyncio.to_thread(gateways.start, redis_cluster_url, 2)
    clients = make_clients(pods, projects, count=16, per_client=3, seed=1)
    try:
        await all_live(clients)

        async def enough(loops):
            await wait_until(lambda: sum(x.published for x in loops) >= 900, 60, "publishes")

        await publish(redis_cluster_url, projects, publishers=3, rate=150, until=enough)
        state = await verify(clients, redis_cluster_url, projects)
        assert sum(cursor[1] for cursor, _ in state.values()) >= 900
    finally:
        await stop_all(clients)
    for pod in pods:
        status, body = pod.readyz()
        assert status == 200, body
