"""The Python consumer of the event bus: an asyncio client of the gateway with the guarantees of
the browser client (every event of a project in order, exactly once, or an explicit resync), and
``tail``. See ``docs/consumer.md``.

    from consumer import Consumer, Delivery, Resync, FileCursorStore

    async with Consumer("ws://localhost:8765/", token=mint, store=FileCursorStore("c.json")) as bus:
        async for item in bus.events(1):
            ...
"""

from consumer.client import (
    Consumer,
    ConsumerStats,
    PresenceSubscription,
    Start,
    Subscription,
    TokenSource,
)
from consumer.policy import ReconnectPolicy
from consumer.presence import PresenceChange, PresenceView
from consumer.stores import (
    CursorStore,
    FileCursorStore,
    MemoryCursorStore,
    RedisCursorStore,
    SqlCursorStore,
)
from consumer.types import (
    AuthenticationFailed,
    ConsumerClosed,
    ConsumerError,
    Cursor,
    Delivery,
    Forbidden,
    GatewayError,
    Item,
    Resync,
    UndecodableEvent,
)

__all__ = [
    "AuthenticationFailed",
    "Consumer",
    "ConsumerClosed",
    "ConsumerError",
    "ConsumerStats",
    "Cursor",
    "CursorStore",
    "Delivery",
    "FileCursorStore",
    "Forbidden",
    "GatewayError",
    "Item",
    "MemoryCursorStore",
    "PresenceChange",
    "PresenceSubscription",
    "PresenceView",
    "ReconnectPolicy",
    "RedisCursorStore",
    "Resync",
    "SqlCursorStore",
    "Start",
    "Subscription",
    "TokenSource",
    "UndecodableEvent",
]
