"""Presence on Redis Cluster: every key and the channel of a project share its slot, so the
scripts run there as on a standalone Redis; announcements go out with SPUBLISH."""

from __future__ import annotations

import time

from gateway.presence import PresenceCore
from gateway.presence_store import PresenceService, PresenceStore
from publisher.presence import aread_presence, read_presence
from redisconn import async_client, sync_client
from redisconn.node_limits import node_name
from tests.test_presence_store import cluster_round


async def test_write_refresh_and_read_on_a_cluster(redis_cluster_url) -> None:
    client = async_client(redis_cluster_url)
    sync = sync_client(redis_cluster_url)
    try:
        core = PresenceCore("pod1", clock_ms=iter(range(1, 10**6)).__next__)
        store = PresenceStore(client, "pod1", ttl=30, publish_command="SPUBLISH")
        projects = range(1, 9)  # spread over the masters' slots
        for project_id in projects:
            core.join("tab", project_id, f"user-{project_id}", "Name")
        writes = core.take_writes()
        for write, ok in zip(writes, await store.write(writes), strict=True):
            assert ok
            core.written(write, ok)
        # Once the slot map is loaded (by the first call), one pipeline per master the
        # projects live on (each master answers on its own).
        masters = {node_name(client, store.keys.presence_pods(p)) for p in projects}
        assert len(masters) > 1 and None not in masters
        before = (store.commands, store.round_trips)
        replies = await store.refresh(core.refresh_plan())
        after = (store.commands, store.round_trips)
        assert (after[0] - before[0], after[1] - before[1]) == (len(projects), len(masters))
        assert {p: r for p, r in replies.items()} == {
            p: (True, {"pod1": core.stored_versions()[p]}) for p in projects
        }
        for project_id in projects:
            assert [m.id for m in read_presence(sync, project_id)] == [f"user-{project_id}"]
            assert [m.name for m in await aread_presence(client, project_id)] == ["Name"]
            assert set((await store.read(project_id))["pod1"].records) == {f"user-{project_id}"}
    finally:
        await client.aclose()
        sync.close()


async def test_a_drain_on_a_cluster_writes_a_leave_and_keeps_the_others_for_the_grace(
    redis_cluster_url,
) -> None:
    """A pod drains on a Redis Cluster right after a member left: each master is sent its
    projects' writes and the drain's refresh (with ``at`` that master, as a lane's): the
    member who left is gone at once, and the pod's deadline everywhere else is the grace."""
    client = async_client(redis_cluster_url)
    sync = sync_client(redis_cluster_url)
    service = PresenceService(
        client,
        lambda sessions, frame: None,
        pod_id="pod-drain",
        listen=False,
        publish_command="SPUBLISH",
        ttl=2.0,
        refresh_interval=0.5,
        flush_interval=0.02,
        diff_interval=0.2,
        drain_grace=30.0,
    )
    projects = range(101, 109)  # spread over the masters' slots
    try:
        for project_id in projects:
            service.join("tab", project_id, f"user-{project_id}", "Name")
        await cluster_round(service)  # (what the loop's rounds would have written by now)
        assert all(read_presence(sync, p) for p in projects)
        service.leave("tab", 101)
        await service.drain()
        assert read_presence(sync, 101) == []
        now_ms = time.time() * 1000
        for project_id in projects[1:]:
            deadline = sync.zscore(service.keys.presence_pods(project_id), "pod-drain")
            assert deadline is not None and deadline > now_ms + 20_000, project_id
            assert [m.id for m in read_presence(sync, project_id)] == [f"user-{project_id}"]
    finally:
        await service.stop()
        await client.aclose()
        sync.close()
