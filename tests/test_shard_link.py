"""A ShardLink that drops a channel and wants it again at once (what ClusterPubSub does when a
feed or presence view is released and acquired again): the answer to its own SUNSUBSCRIBE is not
the node taking the channel away (no interruption, no catch-up or presence re-read of every
project)."""

from __future__ import annotations

import asyncio

from gateway.cluster_pubsub import ShardLink
from gateway.metrics import Metrics
from tests.support.ws_client import wait_until


class Owner:
    def __init__(self):
        self.interrupted_calls = []
        self.confirmed_calls = []

    def on_message(self, channel, data):
        pass

    def confirmed(self, channel):
        self.confirmed_calls.append(channel)

    def interrupted(self, channel):
        self.interrupted_calls.append(channel)

    def link_down(self, link):
        pass


async def test_drop_then_want_again_is_not_an_interruption(redis_url):
    owner = Owner()
    link = ShardLink(("127.0.0.1", 0), redis_url, owner=owner, metrics=Metrics())
    link.start()
    try:
        await wait_until(lambda: link.connected, 5, "the link to connect")
        first = asyncio.Event()
        await link.want(b"ch", first)
        await asyncio.wait_for(first.wait(), 5)
        await link.drop(b"ch")  # what ClusterPubSub.unsubscribe does
        second = asyncio.Event()
        await link.want(b"ch", second)  # a subscribe right after: ClusterPubSub._place
        await asyncio.wait_for(second.wait(), 5)
        await asyncio.sleep(0.2)
        assert owner.interrupted_calls == [], (
            "the answer to our own SUNSUBSCRIBE taken for the node's"
        )
    finally:
        await link.close()


async def test_a_cluster_channel_left_and_followed_again_is_not_recovered(redis_cluster_url):
    """The same through ClusterPubSub on a real cluster: unsubscribe, then subscribe at once."""
    from gateway.cluster_pubsub import ClusterPubSub

    recovered: list[list[bytes]] = []
    cluster = ClusterPubSub(
        redis_cluster_url,
        on_message=lambda channel, data: None,
        on_recovered=recovered.append,
        metrics=Metrics(),
    )
    cluster.start()
    try:
        channel = b"eventbus:{7}:events"
        async with asyncio.timeout(10):
            assert await cluster.subscribe(channel)
            await cluster.unsubscribe(channel)
            assert await cluster.subscribe(channel)
        await asyncio.sleep(0.3)
        assert recovered == []
    finally:
        await cluster.close()
