"""The consumer against a broken or hostile gateway: a fake gateway (a websockets server this
test controls) sends what no gateway of this project sends, and the application must see every
event once, in order, or an explicit Resync, never an item it cannot use."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from websockets.asyncio.server import serve

import consumer.client as consumer_client
from consumer import Consumer, Cursor, Delivery, ReconnectPolicy, Resync
from schemas.protocol import ResyncReason
from tests.support.ws_client import wait_until
from tests.test_consumer_units import (
    EPOCH,
    drain,
    fed_consumer,
    frame,
    subscribed,
    too_far_behind,
)


async def _two_items_from_a_fake_gateway(messages: list) -> tuple[list, Consumer]:
    """The first two items of project 1, followed from ``(EPOCH, 0)``, from a fake gateway that
    answers its subscribe with ``subscribed`` then ``messages`` as given (``str``: text,
    ``bytes``: binary, a list: the fragments of one message); and the consumer, closed."""

    async def gateway(connection) -> None:
        async for raw in connection:
            if json.loads(raw)["type"] == "subscribe":
                await connection.send(subscribed(1, 0, resumed=True).decode())
                for message in messages:
                    await connection.send(message)

    async with serve(gateway, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        policy = ReconnectPolicy(initial=0.1, max=0.1)
        async with Consumer(f"ws://127.0.0.1:{port}/", reconnect=policy) as bus:
            events = bus.events(1, after=Cursor(EPOCH, 0))
            async with asyncio.timeout(10):
                items = [await anext(events), await anext(events)]
    return items, bus


async def test_a_binary_frame_is_ignored_never_delivered_with_a_raw_that_is_not_utf8():
    """The protocol's frames are text, which websockets checks for UTF-8 (1007 otherwise); a
    binary frame (one message, or fragments) was read as text, unchecked: an event in it,
    with bytes that are not UTF-8 in a field the consumer skips, became a Delivery whose ``raw``
    did not decode (consumer.md's exactly-once sample stores ``item.raw.decode()``: it raised,
    for the same event after every restart). Now binary messages are ignored and counted, and
    the events sent as text are delivered, once, in order."""
    bad = frame(1, 1)[:1] + b'"x":"\xff",' + frame(1, 1)[1:]

    items, bus = await _two_items_from_a_fake_gateway(
        [
            bad,  # binary
            [bad[:10], bad[10:]],  # binary, in two fragments
            frame(1, 1).decode(),
            frame(1, 2).decode(),
        ]
    )
    assert all(type(item) is Delivery for item in items)
    assert [item.raw for item in items] == [frame(1, 1), frame(1, 2)]
    assert [item.raw.decode() for item in items]  # (what an application stores)
    assert bus.stats.ignored == 2 and bus.stats.gaps == 0 and bus.connects == 1


async def test_a_catch_up_page_that_is_not_utf8_is_a_failed_catch_up_never_a_delivery(
    monkeypatch,
):
    """A page's events are embedded without re-encoding (``msgspec.Raw``), and the fields an
    event decoder skips are not checked for UTF-8: a page from a broken gateway (or a proxy)
    with such bytes in an event delivered it with a ``raw`` that did not decode. JSON is UTF-8:
    such a page cannot be read, and the catch-up surfaces the gateway's resync, as for any page
    that cannot be read."""
    bad = frame(1, 6)[:1] + b'"x":"\xff",' + frame(1, 6)[1:]
    page = b'{"project_id":1,"epoch":"%s","seq":7,"events":[%s,%s]}' % (
        EPOCH.encode(),
        bad,
        frame(1, 7),
    )

    async def read_page(url: str, token: str | None, within: float) -> bytes:
        return page

    monkeypatch.setattr(consumer_client, "read_page", read_page)
    consumer, ws, subscription = await fed_consumer(1)
    await consumer._on_frame(ws, subscribed(1, 5))  # type: ignore[arg-type]
    consumer._states[1].subscribe_message()  # a resume from (e1, 5)
    await consumer._on_frame(ws, too_far_behind(1, 5000))  # type: ignore[arg-type]
    await asyncio.gather(*consumer._helpers)
    assert drain(subscription) == [Resync(1, ResyncReason.TOO_FAR_BEHIND, EPOCH, 5000)]
    assert consumer.stats.delivered == 0


async def test_a_sql_store_save_that_failed_does_not_fail_every_save_after_it():
    """``save`` (auto-commit) on PostgreSQL: a statement that fails (a ``lock_timeout`` or
    ``statement_timeout``, which consumer.md advises for a slow database, a deadlock, a
    serialization failure) aborts the transaction, and psycopg then refuses every statement
    until a rollback, which the store never made: every later save failed
    (``InFailedSqlTransaction``), for as long as the process ran, although the database had
    recovered ("the next save covers it" was false; a restart delivered everything since
    again). Now a failed save rolls its own transaction back."""
    import psycopg

    from consumer import SqlCursorStore
    from tests.test_consumer_units import _postgres_admin

    admin_url, admin = _postgres_admin()
    name = f"eventbus_consumer_hostile_{os.getpid()}"
    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {name}")
    url = admin_url.rpartition("/")[0] + "/" + name
    try:
        with psycopg.connect(url) as db, psycopg.connect(url) as other:
            store = SqlCursorStore(db, "notifier")
            store.create_table()
            await store.save(7, Cursor("e", 1))
            db.execute("SET lock_timeout = '100ms'")
            db.commit()
            other.execute("SELECT * FROM eventbus_cursors FOR UPDATE")  # a slow writer's lock
            with pytest.raises(psycopg.errors.LockNotAvailable):
                await store.save(7, Cursor("e", 2))
            other.rollback()  # the database answers again
            await store.save(7, Cursor("e", 3))
            assert await store.load(7) == Cursor("e", 3)
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


async def test_an_error_answering_no_subscribe_does_not_end_a_followed_project():
    """An ``error`` naming a followed project while no subscribe of it is in flight answers
    nothing of the consumer's (the gateway sends ``invalid_cursor`` or
    ``too_many_subscriptions`` only to refuse a subscribe, ``not_subscribed`` only for an
    unsubscribe or an activity). From a broken or hostile gateway it ended the project for
    good: raised as a GatewayError, no longer followed, its events after it never delivered.
    Now it is ignored, as an error naming no project followed is (``gateway error``, counted
    in ``stats.ignored``); only ``forbidden`` ends a project unasked (a refreshed token that no
    longer allows it)."""

    errors = [
        json.dumps({"type": "error", "code": code, "message": "?", "project_id": 1})
        for code in ("invalid_cursor", "not_subscribed", "too_many_subscriptions")
    ]
    items, bus = await _two_items_from_a_fake_gateway(
        [frame(1, 1).decode(), *errors, frame(1, 2).decode()]
    )
    assert [(type(item).__name__, item.seq) for item in items] == [("Delivery", 1), ("Delivery", 2)]
    assert bus.stats.ignored == 3 and bus.connects == 1


async def test_a_sql_store_load_leaves_no_transaction_open_on_the_stores_own_connection():
    """``load`` on a connection of the store's own (auto-commit mode) began a transaction (the
    driver's, for its SELECT) and left it open until the first save, which may come hours
    later for a quiet project: PostgreSQL's ``idle_in_transaction_session_timeout`` (common on
    managed databases) then ended the connection, and every save failed for the life of the
    process. Now a load that found no transaction open ends the one it began; one that found
    the caller's open leaves it alone."""
    import psycopg

    from consumer import SqlCursorStore
    from tests.test_consumer_units import _postgres_admin

    admin_url, admin = _postgres_admin()
    name = f"eventbus_consumer_idle_{os.getpid()}"
    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {name}")
    url = admin_url.rpartition("/")[0] + "/" + name
    idle = psycopg.pq.TransactionStatus.IDLE
    try:
        with psycopg.connect(url) as db:
            store = SqlCursorStore(db, "notifier")
            store.create_table()
            db.execute("SET idle_in_transaction_session_timeout = '100ms'")
            db.commit()
            assert await store.load(7) is None
            assert db.info.transaction_status == idle
            await asyncio.sleep(0.3)  # (past the timeout: a connection idle in a transaction ends)
            await store.save(7, Cursor("e", 1))
            assert await store.load(7) == Cursor("e", 1)
            # The caller's transaction open (exactly-once: the effect, then save_in): kept.
            db.execute("CREATE TABLE effects (seq BIGINT)")
            assert await store.load(7) == Cursor("e", 1)
            assert db.info.transaction_status != idle
            db.rollback()
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


async def test_with_keepalive_off_a_gateway_that_stops_reading_holds_no_aclose_for_ever(
    monkeypatch,
):
    """Keepalive off (``ping_interval=None, ping_timeout=None``): a gateway that answers the
    subscribe, then reads nothing more and sends pings, which websockets answers by itself,
    fills the consumer's write buffer, and every send waits for it to drain. The unsubscribe of
    ``aclose()`` waited for ever (no ping_timeout to give the connection up). Now writing held
    up for ``open_timeout`` gives it up (1006), and ``aclose()`` returns."""
    monkeypatch.setattr(consumer_client, "MAX_UNSENT", 2**40)  # only the time bound
    stopped_reading = asyncio.Event()

    async def gateway(connection) -> None:
        async for raw in connection:
            if json.loads(raw)["type"] == "subscribe":
                await connection.send(subscribed(1, 0, resumed=True).decode())
                await connection.send(frame(1, 1).decode())
                connection.transport.pause_reading()
                stopped_reading.set()
                while not connection.transport.is_closing():  # empty pings, unmasked
                    connection.transport.write(b"\x89\x00" * 50_000)
                    await asyncio.sleep(0.01)
                return

    async with serve(gateway, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        bus = Consumer(
            f"ws://127.0.0.1:{port}/",
            open_timeout=1,
            ping_interval=None,
            ping_timeout=None,
            reconnect=ReconnectPolicy(initial=0.1, max=0.1),
        )
        async with bus:
            events = bus.events(1, after=Cursor(EPOCH, 0))
            async with asyncio.timeout(10):
                assert (await anext(events)).seq == 1
                await stopped_reading.wait()
                ws = bus._ws
                await wait_until(lambda: ws.transport.get_write_buffer_size() > 0, 10, "pongs")
                await events.aclose()
