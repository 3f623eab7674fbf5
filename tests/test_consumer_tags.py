"""Cursor tags in the consumer (docs/consumer.md, "Cursor tags"): the cursor carries the tag of
the event at its seq (the SHA-1 of the frame as received, hashed only when needed), sends it in
subscribes and catch-up pages, keeps it in every cursor store (and still loads cursors saved
before tags), and a gateway from before tags (a page's unknown ``tag`` answered 400) is asked
again without it. Units with a fake connection and fake page servers; the end-to-end tests
against a real gateway are in tests/test_consumer_tags_gateway.py."""

from __future__ import annotations

import asyncio
import json
import pickle
import sqlite3
from urllib.parse import parse_qs, urlsplit

import fakeredis
import msgspec
import pytest

import consumer.types as consumer_types
from consumer import (
    Cursor,
    Delivery,
    FileCursorStore,
    MemoryCursorStore,
    RedisCursorStore,
    Resync,
    SqlCursorStore,
)
from consumer.ordering import ProjectState, Verdict
from consumer.tail import format_item
from schemas.protocol import PollResponse, ResyncReason, ResyncRequired
from schemas.tags import event_tag
from tests.test_consumer_units import (
    EPOCH,
    LocalHttpServer,
    drain,
    fed_consumer,
    frame,
    subscribed,
    too_far_behind,
)

TAG_A = "0123456789abcdef"
TAG_B = "fedcba9876543210"


def tagged(message: bytes, tag: object) -> bytes:
    """A control frame with ``"tag"`` added."""
    return msgspec.json.encode({**json.loads(message), "tag": tag})


def resync_required(reason: str, seq: int, tag: object = None, epoch: str = EPOCH) -> bytes:
    message = {"type": "resync_required", "project_id": 1, "reason": reason}
    message |= {"epoch": epoch, "seq": seq}
    if tag is not None:
        message["tag"] = tag
    return msgspec.json.encode(message)


# --- the cursor type -----------------------------------------------------------------------------


def test_a_cursor_is_its_position_as_a_tuple_with_the_tag_beside_it():
    cursor = Cursor("e", 5, TAG_A)
    epoch, seq = cursor  # unpacks as before tags
    assert (epoch, seq, cursor.tag) == ("e", 5, TAG_A)
    assert cursor == ("e", 5) == Cursor("e", 5) and len(cursor) == 2
    assert Cursor("e", 5).tag is None
    assert repr(cursor) == "Cursor(epoch='e', seq=5, tag='0123456789abcdef')"
    assert pickle.loads(pickle.dumps(cursor)).tag == TAG_A
    assert cursor._replace(seq=6).tag is None  # another position: not its tag
    raw = frame(1, 5)
    assert Cursor("e", 5, frame=raw).tag == event_tag(raw)


def test_checked_cursor_takes_a_pair_a_triple_or_a_tagged_cursor_and_refuses_a_bad_tag():
    check = consumer_types.checked_cursor
    assert check(("e", 5)).tag is None
    assert check(["e", 5, TAG_A]).tag == TAG_A
    assert check(("e", 5, None)).tag is None
    assert check(Cursor("e", 5, TAG_B)).tag == TAG_B
    for tag in ("0123456789ABCDEF", "0123", "0123456789abcdef\n", 5, True):
        with pytest.raises(ValueError, match="not a valid cursor"):
            check(("e", 5, tag))


def test_an_events_cursor_is_hashed_only_when_its_tag_is_read(monkeypatch):
    """The tag is the SHA-1 of the frame as received, computed lazily: not per event, only for
    a subscribe, a store's save, or when the caller reads it."""
    hashed: list[bytes] = []

    def counting(raw: bytes) -> str:
        hashed.append(raw)
        return event_tag(raw)

    monkeypatch.setattr(consumer_types, "event_tag", counting)
    state = ProjectState(1)
    state.subscribe_message()
    state.on_subscribed(EPOCH, 5, resumed=False, tag=TAG_A)
    for seq in range(6, 106):
        assert state.on_event(seq, frame=frame(1, seq)) is Verdict.DELIVER
    assert hashed == []
    message = state.subscribe_message()
    assert message == {
        "type": "subscribe",
        "project_id": 1,
        "epoch": EPOCH,
        "after": 105,
        "tag": event_tag(frame(1, 105)),
    }
    assert hashed == [frame(1, 105)]
    state.subscribe_message()
    assert len(hashed) == 1  # hashed once


# --- ordering ------------------------------------------------------------------------------------


def test_subscribed_and_resync_required_give_the_cursor_their_tags():
    state = ProjectState(1)
    state.subscribe_message()
    state.on_subscribed(EPOCH, 5, resumed=False, tag=TAG_A)
    assert state.cursor.tag == TAG_A
    assert state.subscribe_message()["tag"] == TAG_A
    resync = state.on_resync(ResyncReason.HISTORY_LOST, EPOCH, 9, TAG_B)
    assert resync == Resync(1, ResyncReason.HISTORY_LOST, EPOCH, 9, TAG_B)
    assert resync.cursor.tag == TAG_B and state.cursor.tag == TAG_B
    state.on_resync(ResyncReason.EPOCH_CHANGED, "e2", 0)
    assert "tag" not in state.subscribe_message()  # seq 0: no event, no tag


def test_a_resumed_subscribed_at_the_cursor_with_another_tag_is_history_lost():
    """The gateway checks a subscribe's tag and says resync_required(history_lost) first; one
    that says resumed at the cursor, with the tag of another event there, lost the event the
    consumer has (a failover) and numbered a new one so: never trust silence."""
    state = ProjectState(1, Cursor(EPOCH, 5, frame=frame(1, 5)))
    state.subscribe_message()
    outcome = state.on_subscribed(EPOCH, 5, resumed=True, tag=TAG_A)
    assert outcome.resync == Resync(1, ResyncReason.HISTORY_LOST, EPOCH, 5, TAG_A)
    assert state.cursor.tag == TAG_A and state.on_event(6) is Verdict.DELIVER
    # The same event: nothing to say. A cursor without a tag takes the gateway's.
    state = ProjectState(1, Cursor(EPOCH, 5, frame=frame(1, 5)))
    state.subscribe_message()
    assert state.on_subscribed(EPOCH, 5, True, event_tag(frame(1, 5))).resync is None
    state = ProjectState(1, Cursor(EPOCH, 5))
    state.subscribe_message()
    assert state.on_subscribed(EPOCH, 5, resumed=True, tag=TAG_A).resync is None
    assert state.cursor.tag == TAG_A
    # A gateway before tags says none: unchecked, as before.
    state = ProjectState(1, Cursor(EPOCH, 5, TAG_B))
    state.subscribe_message()
    assert state.on_subscribed(EPOCH, 5, resumed=True).resync is None
    assert state.cursor.tag == TAG_B


def test_a_too_far_behind_at_the_cursor_with_another_tag_is_not_taken_as_nothing_missing():
    """A ``too_far_behind`` naming the cursor itself is the subscribe's answer (live events
    brought the cursor to the gateway's top while it handled the resubscribe): nothing is
    missing. Unless its tag names another event there than the one the consumer has: a
    failover replaced it, and the replacement would never come (its ``subscribed``, after a
    resync, is not checked again). Then it is a resync like any other; a cursor without a tag
    takes the one it names."""
    state = ProjectState(1, Cursor(EPOCH, 5, frame=frame(1, 5)))
    state.subscribe_message()
    assert not state.at_top(ResyncReason.TOO_FAR_BEHIND, EPOCH, 5, TAG_A)
    assert state.at_top(ResyncReason.TOO_FAR_BEHIND, EPOCH, 5, event_tag(frame(1, 5)))
    state = ProjectState(1, Cursor(EPOCH, 5))
    state.subscribe_message()
    assert state.at_top(ResyncReason.TOO_FAR_BEHIND, EPOCH, 5, TAG_A)
    assert state.cursor.tag == TAG_A
    # A gateway before tags says none: as before.
    state = ProjectState(1, Cursor(EPOCH, 5, TAG_B))
    state.subscribe_message()
    assert state.at_top(ResyncReason.TOO_FAR_BEHIND, EPOCH, 5)
    assert state.cursor.tag == TAG_B


async def test_a_too_far_behind_at_the_cursor_naming_another_event_reaches_the_caller():
    """End to end through the client: the replaced event is surfaced, never silence."""
    consumer, ws, subscription = await fed_consumer(1)
    consumer.catch_up = False
    await consumer._on_frame(ws, subscribed(1, 5))  # type: ignore[arg-type]
    consumer._states[1].subscribe_message()
    for seq in range(6, 21):
        await consumer._on_frame(ws, frame(1, seq))  # type: ignore[arg-type]
    too_far = json.loads(too_far_behind(1, 20)) | {"tag": TAG_A}
    await consumer._on_frame(ws, json.dumps(too_far).encode())  # type: ignore[arg-type]
    await consumer._on_frame(ws, subscribed(1, 20))  # type: ignore[arg-type]
    items = drain(subscription)
    assert [type(i).__name__ for i in items][-1] == "Resync", items
    assert consumer.cursor(1) == Cursor(EPOCH, 20) and consumer.cursor(1).tag == TAG_A


def test_a_subscribed_behind_the_cursor_a_live_resync_set_is_history_lost_again():
    """The live feed says history_lost (a failover) before the answer to a resubscribe the
    consumer had sent (a gap's repair); the answer names a top behind where that resync took
    the cursor: a second failover lost that event too. It was taken as the answer to the resync
    and ignored, and the next events under those numbers were dropped as duplicates, in
    silence. Found by tests/test_consumer_failover_property.py."""
    state = ProjectState(1, Cursor(EPOCH, 3, frame=frame(1, 3)))
    state.subscribe_message()
    resync = state.on_resync(ResyncReason.HISTORY_LOST, EPOCH, 5, TAG_A)
    assert resync.seq == 5
    outcome = state.on_subscribed(EPOCH, 4, resumed=True, tag=TAG_B)
    assert outcome.resync == Resync(1, ResyncReason.HISTORY_LOST, EPOCH, 4, TAG_B)
    assert state.cursor == (EPOCH, 4) and state.cursor.tag == TAG_B
    assert state.on_event(5) is Verdict.DELIVER  # the new history's 5, not a "duplicate"
    # The resync's own answer names the same top: nothing more to say.
    state = ProjectState(1, Cursor(EPOCH, 3, frame=frame(1, 3)))
    state.subscribe_message()
    state.on_resync(ResyncReason.HISTORY_LOST, EPOCH, 5, TAG_A)
    assert state.on_subscribed(EPOCH, 5, resumed=False, tag=TAG_A).resync is None
    # A catch-up's pages take the cursor past the top its subscribe's answer names: not lost.
    state = ProjectState(1, Cursor(EPOCH, 3, frame=frame(1, 3)))
    state.subscribe_message()
    assert state.can_catch_up(ResyncReason.TOO_FAR_BEHIND, EPOCH)
    state.begin_catch_up()
    state.cursor = Cursor(EPOCH, 5000, TAG_A)  # what the pages delivered
    assert state.on_subscribed(EPOCH, 4000, resumed=False).resync is None


# --- the client, with a fake connection ----------------------------------------------------------


async def test_the_resubscribe_after_events_carries_the_tag_of_the_last_frame_received():
    consumer, ws, subscription = await fed_consumer(1)
    await consumer._on_frame(ws, tagged(subscribed(1, 10), TAG_A))  # type: ignore[arg-type]
    assert consumer.cursor(1) == (EPOCH, 10) and consumer.cursor(1).tag == TAG_A
    await consumer._on_frame(ws, frame(1, 11))  # type: ignore[arg-type]
    await consumer._on_frame(ws, frame(1, 13))  # type: ignore[arg-type]  # a gap: resubscribe
    assert ws.sent == [
        {
            "type": "subscribe",
            "project_id": 1,
            "epoch": EPOCH,
            "after": 11,
            "tag": event_tag(frame(1, 11)),
        }
    ]
    (delivery,) = drain(subscription)
    assert delivery.cursor.tag == event_tag(frame(1, 11)) == consumer.cursor(1).tag


async def test_history_lost_answering_a_tagged_resume_is_surfaced_with_its_tag():
    consumer, ws, subscription = await fed_consumer(1)
    await consumer._on_frame(ws, subscribed(1, 10))  # type: ignore[arg-type]
    await consumer._on_frame(ws, frame(1, 11))  # type: ignore[arg-type]
    consumer._states[1].subscribe_message()  # a resume from (e1, 11, tag of 11)
    await consumer._on_frame(ws, resync_required("history_lost", 12, TAG_B))  # type: ignore[arg-type]
    await consumer._on_frame(ws, tagged(subscribed(1, 12), TAG_B))  # type: ignore[arg-type]
    items = drain(subscription)
    assert items[1:] == [Resync(1, ResyncReason.HISTORY_LOST, EPOCH, 12, TAG_B)]
    assert items[1].cursor.tag == TAG_B and consumer.stats.resyncs == 1
    # A resumed `subscribed` at the cursor with another tag, without resync_required first.
    consumer._states[1].subscribe_message()
    await consumer._on_frame(ws, tagged(subscribed(1, 12, resumed=True), TAG_A))  # type: ignore[arg-type]
    assert drain(subscription) == [Resync(1, ResyncReason.HISTORY_LOST, EPOCH, 12, TAG_A)]


@pytest.mark.parametrize("tag", ["0123456789ABCDEF", "short", "0123456789abcdef0"])
async def test_a_malformed_tag_from_the_gateway_is_not_taken(tag: object):
    """Sent back in a subscribe, a tag the protocol does not allow is refused as invalid_cursor
    with an error naming no project: the project would go silent."""
    consumer, ws, subscription = await fed_consumer(1)
    await consumer._on_frame(ws, tagged(subscribed(1, 10), tag))  # type: ignore[arg-type]
    await consumer._on_frame(ws, resync_required("history_lost", 12, tag))  # type: ignore[arg-type]
    assert drain(subscription) == [Resync(1, ResyncReason.HISTORY_LOST, EPOCH, 12)]
    assert consumer._states[1].subscribe_message() == {
        "type": "subscribe",
        "project_id": 1,
        "epoch": EPOCH,
        "after": 12,
    }


async def test_events_after_takes_a_cursor_with_a_tag_or_without():
    consumer, ws, _ = await fed_consumer(9)
    consumer.events(1, after=Cursor(EPOCH, 5, TAG_A))
    consumer.events(2, after=(EPOCH, 6, TAG_B))
    consumer.events(3, after={3: Cursor(EPOCH, 7)})
    await asyncio.sleep(0)
    assert ws.sent == [
        {"type": "subscribe", "project_id": 1, "epoch": EPOCH, "after": 5, "tag": TAG_A},
        {"type": "subscribe", "project_id": 2, "epoch": EPOCH, "after": 6, "tag": TAG_B},
        {"type": "subscribe", "project_id": 3, "epoch": EPOCH, "after": 7},
    ]
    with pytest.raises(ValueError, match="not a valid cursor"):
        consumer.events(4, after=(EPOCH, 5, "NOTATAG"))


async def test_a_commit_saves_the_tag_of_the_event_processed():
    consumer, ws, subscription = await fed_consumer(1)
    consumer.store = store = MemoryCursorStore()
    await consumer._on_frame(ws, subscribed(1, 10))  # type: ignore[arg-type]
    await consumer._on_frame(ws, frame(1, 11))  # type: ignore[arg-type]
    await consumer._on_frame(ws, resync_required("history_lost", 3, TAG_B))  # type: ignore[arg-type]
    item = await anext(subscription)
    await subscription.commit()
    assert isinstance(item, Delivery)
    assert store.cursors[1] == (EPOCH, 11) and store.cursors[1].tag == event_tag(frame(1, 11))
    await anext(subscription)
    await subscription.commit()
    assert store.cursors[1] == (EPOCH, 3) and store.cursors[1].tag == TAG_B


def test_tail_prints_a_resync_as_the_gateway_said_it():
    plain = Resync(1, ResyncReason.HISTORY_LOST, "e2", 57)
    assert "tag" not in json.loads(format_item(plain, as_json=True))
    with_tag = json.loads(
        format_item(Resync(1, ResyncReason.HISTORY_LOST, "e2", 57, TAG_A), as_json=True)
    )
    assert with_tag["tag"] == TAG_A


# --- catch-up pages ------------------------------------------------------------------------------


class PageServer(LocalHttpServer):
    """Answers each page request from ``answer(query)`` -> (status, body), recording queries."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.queries: list[dict[str, str]] = []

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        target = head.split(b" ")[1].decode()
        query = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "authorization":
                query["(token)"] = value.strip().removeprefix("Bearer ")
        self.queries.append(query)
        status, body = self.answer(query)
        writer.write(
            b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, len(body), body)
        )
        await writer.drain()
        writer.close()


def page_of(after: int, top: int, *, tag: str | None = None, more: bool = False) -> bytes:
    frames = [msgspec.Raw(frame(1, seq)) for seq in range(after + 1, top + 1)]
    return msgspec.json.encode(PollResponse(1, EPOCH, top, frames, None, more, tag))


async def caught_up(server: PageServer, start: Cursor, tag: str | None = None):
    """A consumer of project 1 at ``start``, told too_far_behind (of seq 5000, whose tag is
    ``tag``) after a resume: it reads pages from ``server``; returns its items once the catch-up
    ended."""
    consumer, ws, subscription = await fed_consumer(1)
    async with server as url:
        consumer.http_url = url
        consumer._poll_timeout = 5
        consumer._states[1].on_subscribed(EPOCH, 0, resumed=False)
        consumer._states[1].cursor = start
        consumer._states[1].subscribe_message()
        too_far = too_far_behind(1, 5000) if tag is None else tagged(too_far_behind(1, 5000), tag)
        await consumer._on_frame(ws, too_far)  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            await asyncio.gather(*consumer._helpers)
    return consumer, ws, drain(subscription)


async def test_catch_up_pages_are_asked_for_with_the_cursors_tag():
    def answer(query: dict[str, str]) -> tuple[bytes, bytes]:
        after = int(query["after"])
        return b"200 OK", page_of(after, min(after + 3, 9), more=after + 3 < 9)

    server = PageServer(answer)
    consumer, ws, items = await caught_up(server, Cursor(EPOCH, 3, TAG_A))
    assert [i.seq for i in items] == [4, 5, 6, 7, 8, 9]
    assert [(q["after"], q.get("tag")) for q in server.queries] == [
        ("3", TAG_A),
        ("6", event_tag(frame(1, 6))),
    ]
    await consumer._on_frame(ws, subscribed(1, 5000))  # type: ignore[arg-type]
    assert ws.sent[-1]["tag"] == event_tag(frame(1, 9))


async def test_a_pages_resync_required_and_an_empty_pages_tag_are_the_cursors():
    lost = ResyncRequired(1, ResyncReason.HISTORY_LOST, EPOCH, 40, TAG_B)
    body = msgspec.json.encode(PollResponse(1, EPOCH, 40, [], lost, False, TAG_B))
    server = PageServer(lambda query: (b"200 OK", body))
    _, _, items = await caught_up(server, Cursor(EPOCH, 3, TAG_A))
    assert items == [Resync(1, ResyncReason.HISTORY_LOST, EPOCH, 40, TAG_B)]
    # A page ending at a cursor that has no tag gives it the page's.
    consumer, _ws, _ = await fed_consumer(1)
    state = consumer._states[1]
    state.on_subscribed(EPOCH, 7, resumed=False)
    consumer._take_page_tag(state, PollResponse(1, EPOCH, 7, [], None, False, TAG_A))
    assert state.cursor.tag == TAG_A
    consumer._take_page_tag(state, PollResponse(1, EPOCH, 7, [], None, False, TAG_B))
    assert state.cursor.tag == TAG_A  # (its own stays)


async def test_a_gateway_before_tags_refusing_the_pages_tag_is_asked_again_without_it():
    """A gateway from before cursor tags refuses an unknown query parameter (400
    invalid_query): the catch-up surfaced Resync(too_far_behind) although every event was there.
    Now the page is asked again without the tag, and the next pages without one."""

    def answer(query: dict[str, str]) -> tuple[bytes, bytes]:
        if "tag" in query:
            return b"400 Bad Request", b'{"error":"invalid_query","message":"unknown: tag"}'
        after = int(query["after"])
        return b"200 OK", page_of(after, min(after + 3, 9), more=after + 3 < 9)

    server = PageServer(answer)
    consumer, _, items = await caught_up(server, Cursor(EPOCH, 3, TAG_A))
    assert [(type(i).__name__, i.seq) for i in items] == [("Delivery", s) for s in range(4, 10)]
    assert [(q["after"], q.get("tag")) for q in server.queries] == [
        ("3", TAG_A),
        ("3", None),
        ("6", None),
    ]
    assert consumer.stats.resyncs == 0


async def test_a_page_refused_401_is_asked_again_once_with_a_fresh_token():
    """The pages were asked with the token taken for the connection: one that expired since
    (a gateway answers 401 once ``exp`` passes, also while it reads the page) ended the
    catch-up and surfaced a resync, a reload, where a fresh token reads on. Asked once more
    with the token function's next token (as eventbus.js does); a second 401 is an answer."""

    def answer(query: dict[str, str]) -> tuple[bytes, bytes]:
        if query.get("(token)") == "stale":
            return b"401 Unauthorized", b'{"error":"invalid_token","message":"token expired"}'
        after = int(query["after"])
        return b"200 OK", page_of(after, min(after + 3, 9), more=after + 3 < 9)

    tokens = iter(["fresh", "later"])
    server = PageServer(answer)
    consumer, ws, subscription = await fed_consumer(1)
    consumer._token_source = lambda: next(tokens)
    consumer._token = ("stale", 0.0)
    async with server as url:
        consumer.http_url = url
        consumer._poll_timeout = 5
        consumer._states[1].on_subscribed(EPOCH, 0, resumed=False)
        consumer._states[1].cursor = Cursor(EPOCH, 3)
        consumer._states[1].subscribe_message()
        await consumer._on_frame(ws, too_far_behind(1, 5000))  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            await asyncio.gather(*consumer._helpers)
    items = drain(subscription)
    assert [(type(i).__name__, i.seq) for i in items] == [("Delivery", s) for s in range(4, 10)]
    assert [(q["after"], q["(token)"]) for q in server.queries] == [
        ("3", "stale"),
        ("3", "fresh"),
        ("6", "fresh"),
    ]
    # Refused again with a fresh token: not asked a third time; the resync is surfaced.
    server = PageServer(
        lambda query: (b"401 Unauthorized", b'{"error":"invalid_token","message":"revoked"}')
    )
    consumer._token = ("stale", 0.0)
    async with server as url:
        consumer.http_url = url
        consumer._states[1].cursor = Cursor(EPOCH, 9)
        consumer._states[1].subscribe_message()
        await consumer._on_frame(ws, too_far_behind(1, 5000))  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            await asyncio.gather(*consumer._helpers)
    assert [q["(token)"] for q in server.queries] == ["stale", "later"]
    assert [type(i).__name__ for i in drain(subscription)] == ["Resync"]


async def test_pages_carry_tags_again_once_a_gateway_names_a_tag():
    """An old pod's 400 turned the pages' tags off "until the next connection", which a stable
    WebSocket may not see for days: every later page went unchecked, after the fleet was
    upgraded too. A failover that replaced the event at a page's cursor was then skipped in
    silence (the page went on after it, and the resubscribe carried the tag of the page's last
    event, of the new history). As eventbus.js: tags again as soon as a gateway names one."""
    history = {seq: frame(1, seq) for seq in range(1, 13)}
    upgraded = False

    def answer(query: dict[str, str]) -> tuple[bytes, bytes]:
        after, tag = int(query["after"]), query.get("tag")
        if tag is not None and not upgraded:
            return b"400 Bad Request", b'{"error":"invalid_query","message":"unknown: tag"}'
        top = 9 if not upgraded else 12
        top_tag = event_tag(history[top]) if upgraded else None
        lost, events = None, [msgspec.Raw(history[s]) for s in range(after + 1, top + 1)]
        if tag is not None and tag != event_tag(history[after]):
            lost, events = ResyncRequired(1, ResyncReason.HISTORY_LOST, EPOCH, top, top_tag), []
        return b"200 OK", msgspec.json.encode(
            PollResponse(1, EPOCH, top, events, lost, False, top_tag)
        )

    server = PageServer(answer)
    consumer, ws, subscription = await fed_consumer(1)
    state = consumer._states[1]
    async with server as url:
        consumer.http_url = url
        consumer._poll_timeout = 5
        state.on_subscribed(EPOCH, 0, resumed=False)
        state.cursor = Cursor(EPOCH, 3, TAG_A)
        state.subscribe_message()
        await consumer._on_frame(ws, too_far_behind(1, 9))  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            await asyncio.gather(*consumer._helpers)
        await consumer._on_frame(ws, subscribed(1, 9))  # type: ignore[arg-type]  # resubscribes
        assert [i.seq for i in drain(subscription)] == [4, 5, 6, 7, 8, 9]
        # The fleet is upgraded; the resubscribe is too far behind, and meanwhile a failover
        # gives seq 9 to another event.
        upgraded = True
        history[9] = frame(1, 9, blocker_id=99)
        too_far = tagged(too_far_behind(1, 12), event_tag(history[12]))
        await consumer._on_frame(ws, too_far)  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            await asyncio.gather(*consumer._helpers)
    assert server.queries[-1].get("tag") == event_tag(frame(1, 9))
    assert drain(subscription) == [
        Resync(1, ResyncReason.HISTORY_LOST, EPOCH, 12, event_tag(history[12]))
    ]


async def test_a_400_to_a_page_without_a_tag_is_not_asked_again():
    server = PageServer(lambda query: (b"400 Bad Request", b'{"error":"invalid_query"}'))
    _, _, items = await caught_up(server, Cursor(EPOCH, 3))
    assert items == [Resync(1, ResyncReason.TOO_FAR_BEHIND, EPOCH, 5000)]
    assert len(server.queries) == 1


async def test_a_catch_up_that_fails_surfaces_the_resync_with_the_tag_the_gateway_gave():
    """Pages that cannot be read surface the gateway's too_far_behind after all: with its tag,
    as every Resync (the cursor the caller commits, and the resubscribe after the pages, stay
    checked: a failover replacing that event later is history_lost, not skipped in silence)."""
    server = PageServer(lambda query: (b"500 Internal Server Error", b"{}"))
    consumer, ws, items = await caught_up(server, Cursor(EPOCH, 3, TAG_A), tag=TAG_B)
    assert items == [Resync(1, ResyncReason.TOO_FAR_BEHIND, EPOCH, 5000, TAG_B)]
    assert items[0].cursor.tag == TAG_B == consumer.cursor(1).tag
    await consumer._on_frame(ws, subscribed(1, 5000))  # type: ignore[arg-type]
    assert ws.sent[-1] == {
        "type": "subscribe",
        "project_id": 1,
        "epoch": EPOCH,
        "after": 5000,
        "tag": TAG_B,
    }


async def test_a_catch_up_that_fails_past_the_resyncs_top_resubscribes_instead():
    """Pages that went past the top the gateway's too_far_behind named (events kept coming),
    then failed: nothing is missing up to the cursor, and the resubscribe from it continues
    exactly. Surfacing that resync moved the cursor back to its top, and the events after it,
    already delivered, came again."""

    def answer(query: dict[str, str]) -> tuple[bytes, bytes]:
        if query["after"] == "4990":
            return b"200 OK", page_of(4990, 5005, more=True)
        return b"500 Internal Server Error", b"{}"

    server = PageServer(answer)
    consumer, ws, items = await caught_up(server, Cursor(EPOCH, 4990, TAG_A), tag=TAG_B)
    assert [(type(i).__name__, i.seq) for i in items] == [
        ("Delivery", s) for s in range(4991, 5006)
    ]
    assert consumer.cursor(1) == (EPOCH, 5005)
    await consumer._on_frame(ws, subscribed(1, 5000))  # type: ignore[arg-type]
    assert ws.sent[-1] == {
        "type": "subscribe",
        "project_id": 1,
        "epoch": EPOCH,
        "after": 5005,
        "tag": event_tag(frame(1, 5005)),
    }


async def test_a_catch_up_from_a_cursor_whose_event_was_replaced_that_fails_surfaces_the_resync():
    """A ``too_far_behind`` naming the cursor itself with another event's tag is caught up
    (at_top refuses it: a failover replaced the event the consumer has). When its pages cannot
    be read, the resync the gateway gave is surfaced, with its tag: the cursor is at its top,
    not past it, and resubscribing from it with the old tag instead said nothing to the caller
    (and trusted a gateway to tell again what this one had just told)."""
    server = PageServer(lambda query: (b"500 Internal Server Error", b"{}"))
    consumer, ws, items = await caught_up(server, Cursor(EPOCH, 5000, TAG_A), tag=TAG_B)
    assert items == [Resync(1, ResyncReason.TOO_FAR_BEHIND, EPOCH, 5000, TAG_B)]
    await consumer._on_frame(ws, tagged(subscribed(1, 5000), TAG_B))  # type: ignore[arg-type]
    assert ws.sent[-1]["tag"] == TAG_B


# --- cursor stores -------------------------------------------------------------------------------


async def test_every_store_keeps_the_tag_and_loads_a_cursor_saved_without_one(tmp_path):
    raw = frame(1, 5)
    event_cursor = Cursor("e", 5, frame=raw)  # an event's: hashed when saved
    db = sqlite3.connect(tmp_path / "app.db")
    sql = SqlCursorStore(db, "c")
    sql.create_table()
    redis = fakeredis.FakeAsyncRedis()
    stores = [
        MemoryCursorStore(),
        FileCursorStore(tmp_path / "c.json"),
        RedisCursorStore(redis, "c"),
        sql,
    ]
    for store in stores:
        await store.save(1, event_cursor)
        await store.save(2, Cursor("f", 7))
        await store.save(3, ("g", 8, TAG_A))  # type: ignore[arg-type]
        loaded = [await store.load(p) for p in (1, 2, 3)]
        assert loaded == [("e", 5), ("f", 7), ("g", 8)], store
        assert [c.tag for c in loaded] == [event_tag(raw), None, TAG_A], store
    assert json.loads((tmp_path / "c.json").read_text())["2"] == ["f", 7]
    # Saved before tags: each store's old format loads, without a tag.
    old_file = tmp_path / "old.json"
    old_file.write_text('{"1": ["e", 42]}')
    assert (await FileCursorStore(old_file).load(1)).tag is None
    await redis.hset("eventbus:consumer:old:cursors", "1", "e|42")
    loaded = await RedisCursorStore(redis, "old").load(1)
    assert loaded == ("e", 42) and loaded.tag is None
    await redis.aclose()
    db.close()


async def test_a_redis_tag_of_another_position_is_not_taken():
    """A consumer from before tags writes the position only: the tag a newer one wrote before
    belongs to another event, and resuming with it would be a false history_lost."""
    redis = fakeredis.FakeAsyncRedis()
    store = RedisCursorStore(redis, "c")
    await store.save(1, Cursor("e", 5, TAG_A))
    await redis.hset(store.key, "1", "e|9")  # an old consumer's save
    loaded = await store.load(1)
    assert loaded == ("e", 9) and loaded.tag is None
    async with redis.pipeline(transaction=True) as pipe:
        store.save_in(pipe, 1, Cursor("e", 10, TAG_B))
        await pipe.execute()
    assert (await store.load(1)).tag == TAG_B
    await store.save(1, Cursor("e", 11))
    assert (await store.load(1)).tag is None
    await redis.hset(store.key, "1:tag", "e|11|NOT-A-TAG")
    with pytest.raises(ValueError):
        await store.load(1)
    await redis.aclose()


async def test_a_sql_table_from_before_tags_keeps_working_until_the_column_is_added(tmp_path):
    db = sqlite3.connect(tmp_path / "app.db")
    db.execute(
        "CREATE TABLE eventbus_cursors (consumer TEXT NOT NULL, project_id BIGINT NOT NULL, "
        "epoch TEXT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (consumer, project_id))"
    )
    db.execute("INSERT INTO eventbus_cursors VALUES ('c', 1, 'e', 4)")
    db.commit()
    store = SqlCursorStore(db, "c")
    assert await store.load(1) == ("e", 4)
    await store.save(1, Cursor("e", 5, TAG_A))
    loaded = await store.load(1)
    assert loaded == ("e", 5) and loaded.tag is None
    store.add_tag_column()
    await store.save(1, Cursor("e", 6, TAG_A))
    assert (await SqlCursorStore(db, "c").load(1)).tag == TAG_A
    db.close()
