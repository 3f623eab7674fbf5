"""Cursor tags end to end (docs/protocol.md, "Cursor tags"): a failover that lost events the
clients had, and handed their numbers to new events, is told (``history_lost``) instead of
passing in silence, on the WebSocket, over SSE and by polling.

A failover is simulated the way it looks from the outside: the stream loses its last entries
and the project's seq steps back (the promoted replica never got them), then the publisher
carries on, numbering new events from there.
"""

from __future__ import annotations

import json

import redis.asyncio

from schemas.keys import Keys
from schemas.tags import event_tag
from tests.support.failover import failover
from tests.support.gateway_client import SECRET, client_for, publish
from tests.support.sse_client import open_stream
from tests.test_gateway_http import request

KEYS = Keys()


async def stored_frame(redis_url: str, project_id: int, seq: int) -> bytes:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        ((_, fields),) = await client.xrange(KEYS.stream(project_id), f"{seq}-0", f"{seq}-0")
        return fields[b"f"]
    finally:
        await client.aclose()


def bearer(projects: list[int]) -> dict[str, str]:
    from publisher import issue_token

    return {"Authorization": f"Bearer {issue_token(SECRET, projects, ttl=300)}"}


async def test_a_websocket_resume_at_an_event_a_failover_replaced_gets_history_lost(
    gateways, publisher, redis_url
):
    gateway = await gateways()
    first = await client_for(gateway, [1])
    subscribed = await first.subscribe(1)
    epoch = subscribed["epoch"]
    await publish(publisher, 1, 5)
    await first.wait_for(lambda: first.seqs(1) == [1, 2, 3, 4, 5])
    tag = event_tag(first.texts[-1].encode())  # the client's: the text it received as 5
    await first.close()
    # The same cursor and tag, nothing changed: an exact resume.
    again = await client_for(gateway, [1])
    await again.send({"type": "subscribe", "project_id": 1, "epoch": epoch, "after": 5, "tag": tag})
    await again.wait_for(lambda: again.count("subscribed") == 1)
    assert again.last("subscribed")["resumed"] is True
    await again.close()
    failover(redis_url, 1, keep=3)
    await publish(publisher, 1, 3)  # the new master's 4, 5 and 6
    resumed = await client_for(gateway, [1])
    await resumed.send(
        {"type": "subscribe", "project_id": 1, "epoch": epoch, "after": 5, "tag": tag}
    )
    await resumed.wait_for(lambda: resumed.count("subscribed") == 1)
    resync = resumed.last("resync_required")
    assert resync is not None and resync["reason"] == "history_lost"
    assert (resync["seq"], resync["tag"]) == (6, event_tag(await stored_frame(redis_url, 1, 6)))
    assert resumed.seqs(1) == []  # not 6 alone, as if 4 and 5 were the events it has
    await publish(publisher, 1, 1)
    await resumed.wait_for(lambda: resumed.seqs(1) == [7])
    # Without a tag, the cursor is taken at its number, as before tags: 6 alone.
    untagged = await client_for(gateway, [1])
    await untagged.send({"type": "subscribe", "project_id": 1, "epoch": epoch, "after": 5})
    await untagged.wait_for(lambda: untagged.count("subscribed") == 1)
    assert untagged.seqs(1) == [6, 7] and untagged.last("resync_required") is None
    for client in (resumed, untagged):
        await client.close()


async def test_a_live_subscriber_whose_starting_event_a_failover_replaced_is_told(
    gateways, publisher, redis_url
):
    """A fresh subscribe starts at the top (5), named by its tag in ``subscribed``. The event
    is lost by a failover and the new master publishes another 5: the gateway's feed used to
    take it for the one it started from and drop it; now its subscribers get history_lost."""
    await publish(publisher, 2, 5)
    gateway = await gateways()
    client = await client_for(gateway, [2])
    subscribed = await client.subscribe(2)
    assert (subscribed["seq"], subscribed["tag"]) == (
        5,
        event_tag(await stored_frame(redis_url, 2, 5)),
    )
    failover(redis_url, 2, keep=4)
    await publish(publisher, 2, 1)
    await client.wait_for(lambda: client.last("resync_required") is not None)
    resync = client.last("resync_required")
    assert (resync["reason"], resync["seq"]) == ("history_lost", 5)
    assert resync["tag"] == event_tag(await stored_frame(redis_url, 2, 5))
    await publish(publisher, 2, 1)
    await client.wait_for(lambda: client.seqs(2) == [6])
    await client.close()


async def test_an_sse_stream_resuming_from_its_last_event_id_is_checked(
    gateways, publisher, redis_url
):
    gateway = await gateways()
    url = f"http://127.0.0.1:{gateway.port}"
    _, _, stream = await open_stream(url, "/v1/projects/3/stream", bearer([3]))
    await stream.until("subscribed")
    await publish(publisher, 3, 4)
    got = [await stream.next() for _ in range(4)]
    last_id = got[-1].id
    assert last_id.endswith(f":4:{event_tag(got[-1].data.encode())}")
    stream.close()
    failover(redis_url, 3, keep=2)
    await publish(publisher, 3, 3)
    headers = {**bearer([3]), "Last-Event-ID": last_id}
    _, _, stream = await open_stream(url, "/v1/projects/3/stream", headers)
    head = await stream.until("subscribed")
    assert [e.event for e in head] == ["authenticated", "resync_required", "subscribed"]
    resync = json.loads(head[1].data)
    assert (resync["reason"], resync["seq"]) == ("history_lost", 5)
    assert head[1].id == f"{resync['epoch']}:5:{resync['tag']}"
    stream.close()


async def test_a_poll_with_a_tag_is_checked_and_each_page_names_the_next_tag(
    gateways, publisher, redis_url
):
    gateway = await gateways()
    await publish(publisher, 4, 4)
    status, _, body = await request(gateway.port, "/v1/projects/4/events", headers=bearer([4]))
    page = json.loads(body)
    assert status == 200 and page["tag"] == event_tag(await stored_frame(redis_url, 4, 4))
    epoch = page["epoch"]
    status, _, body = await request(
        gateway.port, f"/v1/projects/4/events?epoch={epoch}&after=1&limit=2", headers=bearer([4])
    )
    page = json.loads(body)
    assert [e["seq"] for e in page["events"]] == [2, 3] and page["more"] is True
    assert page["tag"] == event_tag(await stored_frame(redis_url, 4, 3))
    tag_at_3 = page["tag"]
    failover(redis_url, 4, keep=2)
    await publish(publisher, 4, 2)
    status, _, body = await request(
        gateway.port,
        f"/v1/projects/4/events?epoch={epoch}&after=3&tag={tag_at_3}",
        headers=bearer([4]),
    )
    page = json.loads(body)
    assert page["events"] == [] and page["resync_required"]["reason"] == "history_lost"
    assert page["resync_required"]["tag"] == event_tag(await stored_frame(redis_url, 4, 4))


async def test_a_malformed_tag_or_one_without_a_cursor_is_refused_on_every_transport(gateways):
    gateway = await gateways()
    client = await client_for(gateway, [5])
    good = "0123456789abcdef"
    for frame in (
        {"type": "subscribe", "project_id": 5, "epoch": "e", "after": 1, "tag": "0123"},
        {"type": "subscribe", "project_id": 5, "epoch": "e", "after": 1, "tag": good.upper()},
        {"type": "subscribe", "project_id": 5, "tag": good},
    ):
        count = client.count("error")
        await client.send(frame)
        await client.wait_for(lambda count=count: client.count("error") > count)
        assert client.last("error")["code"] == "invalid_cursor"
    await client.close()
    for query in (f"?tag={good}", "?epoch=e&after=1&tag=xyz", f"?epoch=e&after=1&tag={good}0"):
        status, _, body = await request(
            gateway.port, f"/v1/projects/5/events{query}", headers=bearer([5])
        )
        assert (status, json.loads(body)["error"]) == (400, "invalid_query")
    url = f"http://127.0.0.1:{gateway.port}"
    for last_event_id in ("e:1:xyz", f"e:1:{good}:1", f"e:1:{good.upper()}"):
        headers = {**bearer([5]), "Last-Event-ID": last_event_id}
        status, _, stream = await open_stream(url, "/v1/projects/5/stream", headers)
        stream.close()
        assert status == 400


async def test_an_empty_window_names_the_tag_of_its_own_top_not_the_baselines(
    gateways, publisher, redis_url
):
    """A window that holds no entry (turned off, or evicted by the byte budget) still answers
    resumes at the feed's top from memory. The tag it gives for that top must be the event the
    feed delivered there, not the one its baseline read found: else ``subscribed`` names a wrong
    tag, and every client resuming at the top with the right one is told history_lost."""
    await publish(publisher, 6, 2)
    gateway = await gateways(resume_window_events=0)
    first = await client_for(gateway, [6])
    subscribed = await first.subscribe(6)  # the baseline: the top is 2
    epoch = subscribed["epoch"]
    await publish(publisher, 6, 1)  # delivered by the feed as 3
    await first.wait_for(lambda: first.seqs(6) == [3])
    tag = event_tag(first.texts[-1].encode())
    assert tag == event_tag(await stored_frame(redis_url, 6, 3))
    fresh = await client_for(gateway, [6])
    assert (await fresh.subscribe(6))["tag"] == tag
    await fresh.close()
    resumed = await client_for(gateway, [6])
    await resumed.send(
        {"type": "subscribe", "project_id": 6, "epoch": epoch, "after": 3, "tag": tag}
    )
    await resumed.wait_for(lambda: resumed.count("subscribed") == 1)
    assert resumed.last("resync_required") is None
    assert resumed.last("subscribed")["resumed"] is True
    for client in (first, resumed):  # ``first`` kept the feed (and its window) alive
        await client.close()


async def test_the_resuming_test_clients_send_the_tag_of_their_cursor(
    gateways, publisher, redis_url
):
    """tests.support's ResumingClient (WebSocket) and ResumingSseClient resume with the tag of
    the event at their cursor, also when a new client takes over another's cursors (as the
    random walk's clients do when they come back): a failover while they are away is told."""
    from publisher import issue_token
    from tests.support.sse_client import ResumingSseClient
    from tests.support.ws_client import ResumingClient, wait_until

    gateway = await gateways()
    token = issue_token(SECRET, [6], ttl=300)
    urls = {
        ResumingClient: f"ws://127.0.0.1:{gateway.port}/",
        ResumingSseClient: f"http://127.0.0.1:{gateway.port}",
    }
    first = {kind: kind([url], [6], token=token).start() for kind, url in urls.items()}
    await wait_until(lambda: all(c.live == {6} for c in first.values()), 10, "subscribed")
    await publish(publisher, 6, 5)
    await wait_until(lambda: all(c.cursors[6][1] == 5 for c in first.values()), 10, "5 events")
    for client in first.values():
        await client.stop()
        assert client.cursor_tag(6) == event_tag(await stored_frame(redis_url, 6, 5))
    failover(redis_url, 6, keep=3)
    await publish(publisher, 6, 3)  # the new master's 4, 5 and 6
    back = {
        kind: kind(
            [urls[kind]],
            [6],
            token=token,
            cursors=dict(old.cursors),
            tags=old.cursor_tags(),
        ).start()
        for kind, old in first.items()
    }
    await wait_until(lambda: all(c.resyncs(6) for c in back.values()), 10, "resyncs")
    for client in back.values():
        ((resync,),) = [client.resyncs(6)]
        assert (resync.reason, resync.seq) == ("history_lost", 6)
        assert client.events(6) == [] and client.cursor_tag(6) == resync.tag
        await client.stop()
