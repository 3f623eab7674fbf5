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
