"""Presence on Redis Cluster: every key and the channel of a project share its slot, so the
scripts run there as on a standalone Redis; announcements go out with SPUBLISH."""

from __future__ import annotations

from gateway.node_limits import node_name
from gateway.presence import PresenceCore
from gateway.presence_store import PresenceStore
from publisher.presence import aread_presence, read_presence
from redisconn import async_client, sync_client


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
