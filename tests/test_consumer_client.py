"""tests/support/consumer_client.py, the random walk's adapter of the Python consumer, against a
real gateway process: what it records is what ``check_delivery`` can judge (a starting point,
then every event once), across an abort, a clean drop, and a leave and return from its cursor
file; and a leave right after a return (the consumer not running yet) stops at once. Its pause
closes the subscription that holds a project and follows the others again at once; its unpause
follows the project again from the cursor file."""

from __future__ import annotations

import pytest

from tests.support.consumer_client import ConsumerClient
from tests.support.gateway_process import GatewayProcess
from tests.support.ws_client import PublishLoop, check_delivery

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


async def _publish(publisher: PublishLoop, client: ConsumerClient, count: int, wait: bool = True):
    """``count`` events to each of projects 1 and 2; with ``wait``, until the client has them
    (the projects it follows: a paused one is not waited for)."""
    for _ in range(count):
        for project_id in (1, 2):
            await publisher.publish_one(project_id)
    if wait:
        tops = {p: max(publisher.acked[p]) for p in (1, 2) if p not in client.paused}
        await client.wait_for(lambda: client.reached(tops), 20, f"{tops}")


async def test_the_consumer_client_records_every_event_once_across_leaving(redis_url, tmp_path):
    path = tmp_path / "py.json"
    publisher = PublishLoop(redis_url, [1, 2], rate=1)
    with GatewayProcess(redis_url) as gateway:
        client = ConsumerClient([gateway.ws_url], [1, 2], name="py", store_path=path).start()
        try:
            await client.wait_for(lambda: client.live == {1, 2}, 20, "subscribed")
            # The starting point, from the consumer's first acknowledged cursor.
            assert [r.kind for r in client.log[1]] == ["subscribed"]

            async def publish(count: int, wait: bool = True):
                await _publish(publisher, client, count, wait)

            await publish(3)
            client.abort()
            await publish(2)
            await client.drop()
            await publish(2)
            await client.stop()
            await publish(4, wait=False)  # while it is away
            returned = ConsumerClient(
                [gateway.ws_url],
                [1, 2],
                name="py",
                store_path=path,
                cursors=dict(client.cursors),
                tags=client.cursor_tags(),
            )
            returned.log = client.log  # one record across the two, as the walk keeps it
            client = returned.start()
            await publish(2)
            await client.stop()
            leaving = ConsumerClient([gateway.ws_url], [1, 2], store_path=path).start()
            await leaving.stop()  # before its task ran: nothing recorded, nothing waited for
            assert leaving.stats.unexpected == [] and leaving.log == {1: [], 2: []}
        finally:
            await client.stop()
            await publisher.stop()
    assert client.stats.unexpected == []
    for project_id in (1, 2):
        record = client.log[project_id]
        history = {cursor: ident for cursor, ident in publisher.acked[project_id].items()}
        assert check_delivery(record, history=history, final=max(history)) == []
        assert [r.kind for r in record] == ["subscribed"] + ["event"] * 13
        assert [r.ident for r in record[1:]] == [history[c] for c in sorted(history)]


async def test_the_consumer_client_pauses_a_project_and_follows_it_again_from_its_cursor_file(
    redis_url, tmp_path
):
    publisher = PublishLoop(redis_url, [1, 2], rate=1)
    with GatewayProcess(redis_url) as gateway:
        client = ConsumerClient([gateway.ws_url], [1, 2], store_path=tmp_path / "py.json").start()
        try:
            await client.wait_for(lambda: client.live == {1, 2}, 20, "subscribed")
            await _publish(publisher, client, 3)
            await client.pause(1)  # one subscription of 1 and 2: closed, 2 followed again alone
            assert client.pauses == 1 and client.live == {2}
            paused_at = client.cursors[1]
            await _publish(publisher, client, 4)  # project 2's reach the client
            assert client.cursors[1] == paused_at, "nothing of the paused project"
            await client.unpause(1)
            await _publish(publisher, client, 2)
            await client.pause(2)
            await client.pause(1)  # each alone in its subscription now
            await _publish(publisher, client, 2)
            assert client.pauses == 3 and client.live == set()
            await client.unpause(2)
            await client.unpause(1)
            await _publish(publisher, client, 1)
        finally:
            await client.stop()
            await publisher.stop()
    assert client.stats.unexpected == []
    for project_id in (1, 2):
        record = client.log[project_id]
        history = dict(publisher.acked[project_id])
        assert check_delivery(record, history=history, final=max(history)) == []
        assert [r.ident for r in record[1:]] == [history[c] for c in sorted(history)]
