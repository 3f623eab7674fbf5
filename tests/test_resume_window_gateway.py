"""Resumes answered from memory, end to end: a real gateway, real Redis, real WebSocket clients.

The window only ever answers as an atomic read at the feed's cursor would; these tests compare
whole sequences while events stream in, and check (through the hub's counters) that the window,
not Redis, answered."""

from __future__ import annotations

import asyncio

from tests.support.gateway_client import client_for, publish

PROJECT = 7


async def test_resumes_from_memory_racing_with_publishes_are_exact(gateways, publisher):
    """Clients keep dropping and resuming from their own cursors while a publisher streams;
    every one of them ends with every event exactly once, in order, and (almost) every resume
    was answered from the feed's window."""
    gateway = await gateways()
    keeper = await client_for(gateway, [PROJECT])  # the pod follows the project throughout
    await keeper.subscribe(PROJECT)
    total = 400
    done = asyncio.Event()

    async def produce() -> None:
        for n in range(total // 10):
            await publish(publisher, PROJECT, 10)
            await asyncio.sleep(0.001 * (n % 4))
        done.set()

    clients = []
    for _ in range(6):
        client = await client_for(gateway, [PROJECT])
        await client.subscribe(PROJECT)
        clients.append(client)
    reads_before = gateway.hub.subscribe_reads + gateway.hub.window_fills
    memory_before = gateway.hub.resumes_from_memory
    producer = asyncio.create_task(produce())
    resumes = 0
    while not done.is_set():
        for client in clients:
            await client.close()
            await client.closed.wait()
            await client.connect()
            await client.subscribe(PROJECT, resume=True)
            resumes += 1
        await asyncio.sleep(0.005)
    await producer
    for client in [keeper, *clients]:
        await client.wait_for(lambda c=client: c.cursor(PROJECT)[1] == total)
        assert client.seqs(PROJECT) == list(range(1, total + 1))
        assert client.count("resync_required") == 0
        await client.close()
    from_memory = gateway.hub.resumes_from_memory - memory_before
    reads = gateway.hub.subscribe_reads + gateway.hub.window_fills - reads_before
    assert from_memory + reads >= resumes
    assert from_memory >= resumes * 0.8, (from_memory, reads, resumes)  # reads: feed repairing


async def test_after_a_flush_an_old_cursor_is_never_replayed_from_the_window(
    gateways, publisher, redis_client
):
    """Redis loses everything while the pod holds 20 events of the project in its window. Once
    the feed has seen the new history, a client resuming with a cursor inside the old window gets
    ``resync_required(epoch_changed)``, never those events."""
    gateway = await gateways(reconcile_interval=0.1)
    keeper = await client_for(gateway, [PROJECT])
    first = await keeper.subscribe(PROJECT)
    await publish(publisher, PROJECT, 20)
    await keeper.wait_for(lambda: len(keeper.seqs(PROJECT)) == 20)
    late = await client_for(gateway, [PROJECT])
    resumed = await late.subscribe(PROJECT, epoch=first["epoch"], after=15)  # from the window
    assert resumed["replayed"] == 5 and late.seqs(PROJECT) == [16, 17, 18, 19, 20]
    await late.close()

    redis_client.flushall()
    await keeper.wait_for(lambda: keeper.count("resync_required", PROJECT) == 1)
    again = await client_for(gateway, [PROJECT])
    await again.send(
        {"type": "subscribe", "project_id": PROJECT, "epoch": first["epoch"], "after": 15}
    )
    await again.wait_for(lambda: again.count("subscribed", PROJECT) == 1)
    assert again.seqs(PROJECT) == []
    resync = again.last("resync_required")
    assert resync["reason"] == "epoch_changed" and resync["epoch"] != first["epoch"]
    await publish(publisher, PROJECT, 2)
    await again.wait_for(lambda: len(again.seqs(PROJECT)) == 2)
    assert again.seqs(PROJECT) == [resync["seq"] + 1, resync["seq"] + 2]
    await keeper.close()
    await again.close()


async def test_a_storm_shares_one_replay_across_transports_and_never_past_a_new_event(
    gateways, publisher
):
    """Clients of every transport resume at one cursor: raw WebSocket, permessage-deflate
    WebSocket and SSE share the replay the first of them built (the window's memo). An event
    arrives; the next storm at the same cursor gets it in its replay, the first one live: every
    client ends with every event after the cursor once, in order."""
    import json

    from publisher import issue_token
    from tests.support.gateway_client import SECRET
    from tests.support.sse_client import open_stream

    gateway = await gateways(compression=True)
    keeper = await client_for(gateway, [PROJECT])
    await keeper.subscribe(PROJECT)
    await publish(publisher, PROJECT, 5)
    await keeper.wait_for(lambda: keeper.seqs(PROJECT) == [1, 2, 3, 4, 5])
    epoch, _ = keeper.cursor(PROJECT)
    window = gateway.hub.feeds[PROJECT].window
    token = issue_token(SECRET, [PROJECT], ttl=300)
    headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": f"{epoch}:2"}

    async def storm() -> tuple[list, list]:
        sockets = []
        for compression in (None, "deflate", None, "deflate"):
            client = await client_for(gateway, [PROJECT], compression=compression)
            await client.subscribe(PROJECT, epoch=epoch, after=2)
            sockets.append(client)
        _, _, stream = await open_stream(
            f"http://127.0.0.1:{gateway.port}", f"/v1/projects/{PROJECT}/stream", headers
        )
        head = await stream.until("subscribed")
        return sockets, [stream, [json.loads(e.data)["seq"] for e in head if e.event == "message"]]

    first, (first_stream, first_replay) = await storm()
    assert [client.seqs(PROJECT) for client in first] == [[3, 4, 5]] * 4
    assert first_replay == [3, 4, 5]
    assert {c.ws.protocol.extensions != [] for c in first} == {True, False}  # both transports
    assert window.recall((epoch, 2)) is not None  # the replay was kept, and shared
    await publish(publisher, PROJECT, 1)  # seq 6: the kept replay is of no use any more
    await keeper.wait_for(lambda: keeper.seqs(PROJECT)[-1] == 6)
    assert window.recall((epoch, 2)) is None
    second, (second_stream, second_replay) = await storm()
    assert [client.seqs(PROJECT) for client in second] == [[3, 4, 5, 6]] * 4
    assert second_replay == [3, 4, 5, 6]
    await publish(publisher, PROJECT, 1)  # seq 7, live for all
    for client in [*first, *second]:
        await client.wait_for(lambda c=client: c.seqs(PROJECT)[-1:] == [7])
        assert client.seqs(PROJECT) == [3, 4, 5, 6, 7]
        assert client.count("subscribed", PROJECT) == 1
        await client.close()
    first_live = [json.loads((await first_stream.next()).data)["seq"] for _ in range(2)]
    second_live = [json.loads((await second_stream.next()).data)["seq"] for _ in range(1)]
    assert first_live == [6, 7] and second_live == [7]
    first_stream.close()
    second_stream.close()
    await keeper.close()
