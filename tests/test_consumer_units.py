"""The consumer's pure parts, without sockets: per-project ordering (dedupe, gap repair, resync),
the frame decoder, reconnect and token policies, the cursor stores, the frame handling of the
client with a fake connection, and tail's output format."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
import urllib.error
import zlib
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import fakeredis
import msgspec
import pytest
import structlog
from hypothesis import example, given, settings
from hypothesis import strategies as st
from websockets.protocol import State

import consumer.client as consumer_client
from consumer import (
    Consumer,
    ConsumerClosed,
    ConsumerError,
    Cursor,
    Delivery,
    FileCursorStore,
    Forbidden,
    MemoryCursorStore,
    RedisCursorStore,
    Resync,
    SqlCursorStore,
    UndecodableEvent,
)
from consumer.frames import FrameError, decode_frame, event_seq
from consumer.ordering import ProjectState, SubscribedOutcome, Verdict
from consumer.policy import (
    REVOKED_RETRY_FLOOR,
    Backoff,
    FramePacer,
    ReconnectPolicy,
    Retry,
    close_action,
    decode_token_claims,
    refresh_delay,
)
from consumer.tail import format_item
from schemas.events import Blocker, BlockerCreated, BlockerResolved, encode_event
from schemas.protocol import (
    Error,
    PollResponse,
    ResyncReason,
    ResyncRequired,
    decode_client_message,
)
from schemas.tags import event_tag, is_tag
from schemas.tokens import issue_token

EPOCH = "e1"


def frame(project_id: int, seq: int, blocker_id: int | None = None) -> bytes:
    """An event frame as the gateway sends it: the event's JSON with ``,"seq":N`` spliced in."""
    event = BlockerResolved(
        project_id=project_id,
        blocker_id=blocker_id or seq,
        answer="ok",
        resolved_at=datetime(2025, 11, 8, 12, 45, 30, tzinfo=UTC),
    )
    return encode_event(event)[:-1] + b',"seq":%d}' % seq


# --- ordering ------------------------------------------------------------------------------------


def live_state(seq: int = 0) -> ProjectState:
    state = ProjectState(1)
    state.subscribe_message()
    state.on_subscribed(EPOCH, seq, resumed=False)
    return state


def test_next_event_is_delivered_duplicates_dropped_gap_resubscribes_from_the_cursor():
    state = live_state(5)
    assert state.on_event(6) is Verdict.DELIVER
    assert state.on_event(6) is Verdict.DUPLICATE
    assert state.on_event(3) is Verdict.DUPLICATE
    assert state.on_event(8) is Verdict.GAP
    assert state.cursor == Cursor(EPOCH, 6)
    assert state.subscribe_message() == {
        "type": "subscribe",
        "project_id": 1,
        "epoch": EPOCH,
        "after": 6,
    }
    # While that subscribe is in flight, later events are left to its replay.
    assert state.on_event(9) is Verdict.DROP
    assert state.on_event(7) is Verdict.DELIVER
    assert state.on_event(8) is Verdict.DELIVER
    assert state.on_subscribed(EPOCH, 8, resumed=True).resubscribe is False


def test_a_subscribed_above_the_cursor_after_a_replay_is_a_gap():
    state = live_state(5)
    state.subscribe_message()
    outcome = state.on_subscribed(EPOCH, 9, resumed=True)  # replay 6..9 never arrived
    assert outcome.resubscribe and outcome.resync is None


def test_a_replay_that_stops_short_twice_at_the_same_cursor_is_surfaced_not_retried():
    """A stream entry someone else wrote (no type, no seq, or a wrong seq) is relayed by the gateway
    as it is and no client can place it: every replay from the cursor before it stops there. The
    consumer resubscribed after each one, about 5,000 times a second, delivering nothing and never
    saying so; now the second short replay from one cursor is Resync(history_corrupt) to the top."""
    state = live_state(3)
    state.subscribe_message()
    assert state.on_event(99) is Verdict.DROP  # the foreign entry at 4, numbered 99
    assert state.on_event(5) is Verdict.DROP
    assert state.on_subscribed(EPOCH, 5, resumed=True) == SubscribedOutcome(resubscribe=True)
    state.subscribe_message()
    assert state.on_event(99) is Verdict.DROP and state.on_event(5) is Verdict.DROP
    outcome = state.on_subscribed(EPOCH, 5, resumed=True)
    assert outcome == SubscribedOutcome(resync=Resync(1, ResyncReason.HISTORY_CORRUPT, EPOCH, 5))
    assert state.cursor == Cursor(EPOCH, 5) and state.on_event(6) is Verdict.DELIVER
    # A short replay that made progress is asked again, as before (no stale memory).
    state.subscribe_message()
    assert state.on_subscribed(EPOCH, 9, resumed=True).resubscribe
    state.subscribe_message()
    assert state.on_event(7) is Verdict.DELIVER
    assert state.on_subscribed(EPOCH, 9, resumed=True) == SubscribedOutcome(resubscribe=True)


def test_a_resumed_subscribed_behind_the_cursor_is_surfaced_as_history_lost():
    # A gateway that says resumed but whose top is behind our cursor, in the same epoch (its
    # history lost events we got), without the resync_required it always sends first: the
    # consumer kept its cursor and dropped the new events up to it as duplicates, silently.
    state = live_state(10)
    state.subscribe_message()
    outcome = state.on_subscribed(EPOCH, 7, resumed=True)
    assert outcome.resync == Resync(1, ResyncReason.HISTORY_LOST, EPOCH, 7)
    assert state.cursor == Cursor(EPOCH, 7) and state.on_event(8) is Verdict.DELIVER


def test_resync_moves_the_cursor_and_the_following_subscribed_is_not_a_second_resync():
    state = live_state(5)
    state.subscribe_message()
    resync = state.on_resync(ResyncReason.EPOCH_CHANGED, "e2", 3)
    assert resync == Resync(1, ResyncReason.EPOCH_CHANGED, "e2", 3)
    assert state.on_subscribed("e2", 3, resumed=False).resync is None
    assert state.on_event(4) is Verdict.DELIVER
    assert state.cursor == Cursor("e2", 4)


def test_an_unannounced_epoch_change_on_subscribed_is_surfaced_never_silent():
    state = live_state(5)
    state.subscribe_message()
    outcome = state.on_subscribed("e2", 2, resumed=False)
    assert outcome.resync == Resync(1, ResyncReason.EPOCH_CHANGED, "e2", 2)


def test_start_after_replays_from_that_seq_of_the_current_epoch():
    state = ProjectState(1, start_after=0)
    assert "epoch" not in state.subscribe_message()
    assert state.on_subscribed(EPOCH, 4, resumed=False).resubscribe
    assert state.subscribe_message()["after"] == 0
    for seq in (1, 2, 3, 4):
        assert state.on_event(seq) is Verdict.DELIVER
    assert state.on_subscribed(EPOCH, 4, resumed=True).resubscribe is False
    # Starting after a seq above the top starts live from the top.
    late = ProjectState(2, start_after=10)
    late.subscribe_message()
    assert late.on_subscribed(EPOCH, 4, resumed=False).resubscribe is False
    assert late.cursor == Cursor(EPOCH, 4)


def test_too_far_behind_in_the_same_epoch_is_caught_up_by_pages_not_resynced():
    state = live_state(5)
    state.subscribe_message()
    assert state.can_catch_up(ResyncReason.TOO_FAR_BEHIND, EPOCH)
    assert not state.can_catch_up(ResyncReason.HISTORY_TRIMMED, EPOCH)
    assert not state.can_catch_up(ResyncReason.TOO_FAR_BEHIND, "another-epoch")
    state.begin_catch_up()
    assert not state.can_catch_up(ResyncReason.TOO_FAR_BEHIND, EPOCH)  # one at a time
    # The subscribed after the resync, and the WebSocket's live events, are left aside...
    assert state.on_subscribed(EPOCH, 5000, resumed=False) == SubscribedOutcome()
    assert state.on_event(5001) is Verdict.DROP
    # ...while the pages deliver in order from the cursor.
    assert state.on_event(6, paged=True) is Verdict.DELIVER
    assert state.on_event(6, paged=True) is Verdict.DUPLICATE
    assert state.on_event(7, paged=True) is Verdict.DELIVER
    assert state.end_catch_up() == {
        "type": "subscribe",
        "project_id": 1,
        "epoch": EPOCH,
        "after": 7,
    }
    assert state.on_event(8) is Verdict.DELIVER
    # A real resync during a catch-up makes it obsolete.
    state.begin_catch_up()
    generation = state.generation
    state.on_resync(ResyncReason.EPOCH_CHANGED, "e2", 0)
    assert not state.catching_up and state.generation != generation


def test_only_a_resync_naming_the_cursors_own_event_is_taken_as_already_surfaced():
    """ProjectState.stands_at: the same (epoch, seq) and tag, any reason but history_lost;
    otherwise (another seq or epoch, a tag unknown on either side, another tag) it is surfaced."""
    tag, other = "0123456789abcdef", "fedcba9876543210"

    def state_at(cursor_tag: str | None) -> ProjectState:
        state = live_state(0)
        state.subscribe_message()
        state.begin_catch_up()
        state.on_resync(ResyncReason.EPOCH_CHANGED, "e2", 1, cursor_tag, paged=True)
        state.end_catch_up()
        return state

    state = state_at(None)  # the new epoch's start: no event there, no tag to compare
    state.on_resync(ResyncReason.EPOCH_CHANGED, "e2", 0, paged=True)
    assert state.stands_at(ResyncReason.EPOCH_CHANGED, "e2", 0, None)
    state = state_at(tag)
    assert state.stands_at(ResyncReason.EPOCH_CHANGED, "e2", 1, tag)
    assert state.cursor == ("e2", 1) and state.pending and state.stream_epoch == "e2"
    assert state.on_event(2) is Verdict.DELIVER  # the WebSocket's events are e2's now
    for reason, epoch, seq, named, cursor_tag in [
        (ResyncReason.HISTORY_LOST, "e2", 1, tag, tag),
        (ResyncReason.EPOCH_CHANGED, "e2", 2, tag, tag),
        (ResyncReason.EPOCH_CHANGED, "e3", 1, tag, tag),
        (ResyncReason.EPOCH_CHANGED, "e2", 1, other, tag),
        (ResyncReason.EPOCH_CHANGED, "e2", 1, None, tag),
        (ResyncReason.EPOCH_CHANGED, "e2", 1, tag, None),
    ]:
        state = state_at(cursor_tag)
        assert not state.stands_at(reason, epoch, seq, named), (reason, epoch, seq, named)
        assert state.stream_epoch == EPOCH  # untouched


def test_a_catch_up_that_ends_before_its_subscribed_waits_for_it_to_resubscribe():
    """The ``subscribed`` answering the resume that was too far behind says ``resumed: false``;
    taken for the answer to the subscribe after the pages, it would look like a failed resume."""
    state = live_state(5)
    state.subscribe_message()
    state.begin_catch_up()
    assert state.on_event(6, paged=True) is Verdict.DELIVER
    assert state.end_catch_up() is None  # the gateway has not answered the last subscribe yet
    outcome = state.on_subscribed(EPOCH, 900, resumed=False)
    assert outcome == SubscribedOutcome(resubscribe=True)
    assert state.subscribe_message()["after"] == 6
    assert state.on_subscribed(EPOCH, 6, resumed=True) == SubscribedOutcome()


def test_events_of_the_old_epoch_are_dropped_after_a_page_moved_the_cursor_to_a_new_one():
    """A catch-up whose page says the epoch changed (the history was flushed while the pages were
    read) moves the cursor to the new epoch; the WebSocket's events, which carry no epoch, are
    still the old one's until the WebSocket names the new epoch: delivering one would put the old
    epoch's event under the new epoch's number (found by hypothesis, the test further below)."""
    state = live_state(0)
    state.subscribe_message()
    state.begin_catch_up()
    state.on_resync(ResyncReason.EPOCH_CHANGED, "e9", 5, paged=True)
    assert state.end_catch_up() is None  # the resume's subscribed is still to come
    assert state.on_subscribed(EPOCH, 5, resumed=False) == SubscribedOutcome(resubscribe=True)
    state.subscribe_message()
    assert state.on_event(6) is Verdict.DROP  # the old epoch's 6th event, live
    # The WebSocket's own resync names the new epoch: its events count from there.
    state.on_resync(ResyncReason.EPOCH_CHANGED, "e9", 0)
    assert state.on_event(1) is Verdict.DELIVER
    assert state.cursor == ("e9", 1)


def test_a_new_connection_forgets_the_subscribe_the_old_one_left_unanswered():
    """A connection lost between a resume's resync_required (a catch-up starts) and its
    subscribed: the catch-up's end must subscribe on the new connection, not wait for an answer
    the old one will never give (the project would stay silent)."""
    state = live_state(5)
    state.subscribe_message()
    state.begin_catch_up()
    state.on_connection()  # the catch-up goes on; its project is not subscribed meanwhile
    assert state.on_event(6, paged=True) is Verdict.DELIVER
    assert state.end_catch_up() == {
        "type": "subscribe",
        "project_id": 1,
        "epoch": EPOCH,
        "after": 6,
    }


@settings(max_examples=300, deadline=None)
@given(
    start=st.integers(0, 20),
    noise=st.lists(st.integers(1, 60), max_size=80),
    top=st.integers(0, 60),
)
def test_whatever_arrives_deliveries_are_consecutive_and_a_replay_completes_them(
    start: int, noise: list[int], top: int
):
    """Any mix of duplicates, reordering and gaps delivers a consecutive run after the cursor,
    never a skip or a repeat; and the gateway's answer to the resubscribe (replay after the
    cursor up to the top, then subscribed) always brings the cursor to the top."""
    top = max(top, start)
    state = live_state(start)
    delivered: list[int] = []
    needs_subscribe = False
    for seq in [*noise, *range(start + 1, top + 1)]:
        verdict = state.on_event(seq)
        if verdict is Verdict.DELIVER:
            delivered.append(seq)
        elif verdict is Verdict.GAP:
            needs_subscribe = True
            state.subscribe_message()
    assert delivered == list(range(start + 1, start + 1 + len(delivered)))
    if needs_subscribe or state.cursor.seq < top:
        state.subscribe_message()
        cursor = state.cursor.seq
        for seq in range(cursor + 1, top + 1):
            assert state.on_event(seq) is Verdict.DELIVER
            delivered.append(seq)
        assert not state.on_subscribed(EPOCH, top, resumed=True).resubscribe
    assert delivered == list(range(start + 1, start + 1 + len(delivered)))
    assert state.cursor.seq >= top


# --- frames --------------------------------------------------------------------------------------


def test_frames_decode_into_schema_structs_and_the_seq_is_read_from_the_tail():
    raw = frame(3, 42, blocker_id=7)
    event = decode_frame(raw)
    assert isinstance(event, BlockerResolved) and event.blocker_id == 7
    assert event_seq(raw) == 42
    # Another layout (seq first, spaces) still works through the header decode.
    other = b'{"seq": 9, "type":"blocker_resolved","project_id":1,"blocker_id":2,"answer":"a",'
    other += b'"resolved_at":"2025-11-08T12:45:30Z"}'
    assert event_seq(other) == 9


def test_an_unknown_event_type_keeps_its_place_and_garbage_has_none():
    with pytest.raises(FrameError) as info:
        decode_frame(b'{"type":"task_status_changed","project_id":1,"task_id":2,"seq":5}')
    assert info.value.header == ("task_status_changed", 1, 5)
    with pytest.raises(FrameError) as info:
        decode_frame(b"not json")
    assert info.value.header is None
    # A malformed control message with the fields of an event is still not an event.
    with pytest.raises(FrameError) as info:
        decode_frame(b'{"type":"subscribed","project_id":1,"seq":5}')
    assert info.value.header is None


@pytest.mark.parametrize("start", [b'{"type":"nope","x":', frame(3, 42)[:-1] + b',"x":'])
def test_a_frame_nested_too_deeply_is_a_frame_error_not_a_recursion_error(start: bytes):
    """A frame nested past msgspec's recursion limit (a hostile or broken gateway or proxy:
    ours skips such stored frames) raised RecursionError out of the consumer's receive loop."""
    with pytest.raises(FrameError, match="nests too deeply") as info:
        decode_frame(start + b"[" * 5000 + b"]" * 5000 + b"}")
    assert info.value.header is None


# --- policies ------------------------------------------------------------------------------------


def test_full_jitter_backoff_stays_within_a_growing_cap_and_resets():
    policy = ReconnectPolicy(initial=1.0, max=30.0, factor=2.0)
    draws = iter([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5])
    backoff = Backoff(policy, random=lambda: next(draws))
    assert [backoff.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert backoff.next() == 0.0  # full jitter: anywhere down to zero
    backoff.reset()
    assert backoff.next() == 0.5
    assert Backoff(policy).cap(10_000) == 30.0  # no overflow after weeks of retrying


@settings(max_examples=100, deadline=None)
@given(attempts=st.integers(0, 200), draw=st.floats(0, 1))
def test_every_backoff_delay_is_between_zero_and_max(attempts: int, draw: float):
    backoff = Backoff(ReconnectPolicy(initial=0.5, max=7.0, factor=3.0), random=lambda: draw)
    delays = [backoff.next() for _ in range(attempts)]
    assert all(0 <= d <= 7.0 for d in delays)


def test_close_codes_map_to_the_documented_reaction():
    assert close_action(1012).retry is Retry.PROMPT and not close_action(1012).renew_token
    assert close_action(4008).retry is Retry.PROMPT
    assert close_action(4002) == close_action(4002)
    assert close_action(4002).retry is Retry.PROMPT and close_action(4002).renew_token
    assert close_action(4001).retry is Retry.BACKOFF and close_action(4001).auth_failure
    # A revoked token: like a refused one (a new token, backoff, counted towards the limit),
    # but not before a second has passed (tokens minted within the revocation's second are
    # refused too).
    assert close_action(4003) == replace(close_action(4001), min_delay=REVOKED_RETRY_FLOOR)
    assert close_action(4003).renew_token and close_action(4003).auth_failure
    assert REVOKED_RETRY_FLOOR == 1.0 and close_action(4001).min_delay == 0
    assert close_action(4009).client_bug and close_action(1008).client_bug
    assert close_action(4029).client_bug and close_action(4029).retry is Retry.BACKOFF
    assert close_action(1007).client_bug and close_action(1009).client_bug
    assert close_action(1002).client_bug  # a broken frame, sent by this client (or a proxy)
    for code in (None, 1000, 1006, 1011, 1013, 4999):
        action = close_action(code)
        assert action.retry is Retry.BACKOFF and not action.auth_failure


def test_after_a_revocation_the_next_attempt_waits_at_least_a_second_whatever_the_jitter():
    # The jitter may draw 0 and a policy may be fast: the floor holds for every attempt.
    policy = ReconnectPolicy(initial=0.05, max=0.2, max_auth_failures=10)
    consumer = Consumer(
        "ws://127.0.0.1:1/", token=lambda: "t", reconnect=policy, random=lambda: 0.0
    )
    delays = [consumer._after_close(4003, was_live) for was_live in (True, False, False)]
    assert delays == [REVOKED_RETRY_FLOOR] * 3
    assert consumer._after_close(4001, False) == 0.0  # a refused token has no floor
    consumer._backoff.random = lambda: 1.0
    consumer._backoff.attempt = 10
    assert consumer._after_close(4003, False) == REVOKED_RETRY_FLOOR  # the cap, 0.2, is less
    slow = Consumer("ws://127.0.0.1:1/", token=lambda: "t", random=lambda: 1.0)
    slow._backoff.attempt = 3
    assert slow._after_close(4003, False) == 8.0  # a longer backoff is kept


def test_refresh_is_scheduled_from_the_tokens_own_lifetime():
    token = issue_token("s" * 32, [1], ttl=900)
    claims = decode_token_claims(token)
    assert claims is not None and claims["exp"] - claims["iat"] == 900
    # Local clock 1000 s off: only the lifetime counts. A minute before expiry (899 s left).
    delay = refresh_delay(iat=claims["iat"], exp=claims["exp"], obtained_at=1000.0, now=1000.0)
    assert delay == pytest.approx(899 - 60)
    # Short-lived: at 3/4 of the lifetime.
    assert refresh_delay(iat=0, exp=9, obtained_at=0.0, now=0.0) == pytest.approx(6.0)
    assert refresh_delay(iat=None, exp=None, obtained_at=0.0, now=0.0) is None
    assert refresh_delay(iat=None, exp=None, obtained_at=0.0, now=0.0, expires_at=100.0) == 75.0
    assert decode_token_claims("not-a-jwt") is None
    deep = base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).decode()
    assert decode_token_claims(f"x.{deep}.y") is None  # (was a RecursionError)


_CLAIM_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
)


@given(iat=_CLAIM_VALUES, exp=_CLAIM_VALUES)
def test_refresh_delay_of_any_claims_is_none_or_a_finite_delay(iat, exp) -> None:
    """A token's ``iat``/``exp`` are whatever its issuer wrote, read unverified (the gateway
    checks ``exp`` only): ``{"iat": -1e400}`` as an int made ``exp - iat`` an int no float can
    hold, and the OverflowError, raised in the connection task as ``authenticated`` came, stopped
    the consumer; ``Infinity`` (which Python's JSON reads) scheduled a refresh never to come.
    Claims no token can carry (not 0..2**53-1, not finite) count as an unknown lifetime."""
    delay = refresh_delay(iat=iat, exp=exp, obtained_at=5.0, now=6.0)
    assert delay is None or (math.isfinite(delay) and delay >= 0.5)
    fallback = refresh_delay(iat=iat, exp=exp, obtained_at=5.0, now=6.0, expires_at=100.0)
    assert fallback is not None and math.isfinite(fallback)
    assert refresh_delay(iat=iat, exp=exp, obtained_at=5.0, now=6.0, expires_at=10**400) in (
        None,
        delay,
    )


def test_a_refusal_body_nested_too_deeply_has_no_error_code():
    """The error code of a page request's refusal is read from its body (4 KiB at most): one
    nested 2,000 lists deep raised RecursionError out of the page read."""
    from consumer.pages import _error_code

    def refusal(body: bytes) -> urllib.error.HTTPError:
        return urllib.error.HTTPError("http://gw/", 503, "x", {}, io.BytesIO(body))  # type: ignore[arg-type]

    assert _error_code(refusal(b'{"error": "draining"}')) == "draining"
    assert _error_code(refusal(b"[" * 2000 + b"]" * 2000)) == ""


# --- stores --------------------------------------------------------------------------------------


async def test_file_store_survives_a_new_instance_and_never_leaves_a_torn_file(tmp_path):
    path = tmp_path / "cursors.json"
    store = FileCursorStore(path, durable=True)
    assert await store.load(1) is None
    await store.save(1, Cursor("e", 5))
    await store.save(2, Cursor("f", 7))
    await store.save(1, Cursor("e", 6))
    assert json.loads(path.read_text()) == {"1": ["e", 6], "2": ["f", 7]}
    again = FileCursorStore(path)
    assert await again.load(1) == ("e", 6) and await again.load(2) == Cursor("f", 7)
    assert os.listdir(tmp_path) == ["cursors.json"]  # no temporary file left behind


async def test_redis_store_and_its_pipeline_form():
    client = fakeredis.FakeAsyncRedis()
    store = RedisCursorStore(client, "audit")
    assert await store.load(1) is None
    await store.save(1, Cursor("ab-c_9", 9))
    assert await store.load(1) == Cursor("ab-c_9", 9)
    async with client.pipeline(transaction=True) as pipe:
        pipe.set("effect", "done")
        store.save_in(pipe, 2, Cursor("e", 3))
        await pipe.execute()
    assert await store.load(2) == Cursor("e", 3)
    await client.aclose()


async def test_sql_store_saves_inside_the_callers_transaction_or_not_at_all(tmp_path):
    db = sqlite3.connect(tmp_path / "app.db")
    store = SqlCursorStore(db, "notifier")
    store.create_table()
    db.execute("CREATE TABLE effects (seq INTEGER PRIMARY KEY)")
    db.commit()
    # The effect and the cursor in one transaction...
    cur = db.cursor()
    cur.execute("INSERT INTO effects VALUES (1)")
    store.save_in(cur, 1, Cursor("e", 1))
    db.commit()
    # ...and a transaction rolled back leaves neither.
    cur.execute("INSERT INTO effects VALUES (2)")
    store.save_in(cur, 1, Cursor("e", 2))
    db.rollback()
    assert await store.load(1) == Cursor("e", 1)
    assert [r[0] for r in db.execute("SELECT seq FROM effects")] == [1]
    await store.save(1, Cursor("e", 3))
    assert await SqlCursorStore(db, "notifier").load(1) == Cursor("e", 3)
    assert await SqlCursorStore(db, "someone-else").load(1) is None
    with pytest.raises(ValueError):
        SqlCursorStore(db, "x", table="cursors; DROP TABLE effects")
    with pytest.raises(ValueError):
        SqlCursorStore(db, "x", table="cursors\n")  # a regex's $ matches before a final newline
    # Loading a cursor (another project subscribed) in the middle of the caller's transaction
    # must not commit the caller's half-done work.
    cur.execute("INSERT INTO effects VALUES (4)")
    assert await store.load(2) is None
    db.rollback()
    assert [r[0] for r in db.execute("SELECT seq FROM effects")] == [1]
    db.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)


def write_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def acceptable(cursor: object) -> bool:
    """Whether a gateway accepts ``cursor`` in a subscribe (schemas.protocol's Epoch, Sequence,
    Tag)."""
    return (
        isinstance(cursor, Cursor)
        and isinstance(cursor.epoch, str)
        and 1 <= len(cursor.epoch) <= 64
        and all(c.isascii() and (c.isalnum() or c in "_-") for c in cursor.epoch)
        and type(cursor.seq) is int
        and 0 <= cursor.seq <= 2**53 - 1
        and (cursor.tag is None or is_tag(cursor.tag))
    )


@settings(max_examples=300, deadline=None)
@given(entry=json_values)
@example(entry=["not an epoch", -1])
@example(entry=["e", 5.7])
@example(entry=["e", True])
@example(entry=[None, 3])
@example(entry=["e", 2**60])
async def test_a_cursor_store_holding_garbage_loads_a_valid_cursor_or_raises(entry: object):
    """Whatever a cursor file or hash holds, ``load`` returns a cursor the gateway accepts, or
    None, or raises ValueError: a cursor the gateway refuses (``["not an epoch", -1]``) is
    answered with an error naming no project, and the project then delivered nothing, silently,
    for ever; a float or bool seq was truncated into another position (``5.7`` -> 5)."""
    directory = tempfile.mkdtemp()
    try:
        path = write_file(Path(directory, "cursors.json"), json.dumps({"1": entry}))
        try:
            cursor = await FileCursorStore(path).load(1)
        except ValueError:
            pass
        else:
            assert acceptable(cursor), cursor
    finally:
        shutil.rmtree(directory)
    client = fakeredis.FakeAsyncRedis()
    store = RedisCursorStore(client, "fuzz")
    await client.hset(store.key, "1", entry if isinstance(entry, str) else json.dumps(entry))
    try:
        cursor = await store.load(1)
    except ValueError:
        pass
    else:
        assert acceptable(cursor), cursor
    await client.aclose()


@pytest.mark.parametrize(
    "content", ["", "{", "[]", '{"x": ["e", 1]}', '{"1": ["e", "5"]}', '{"1": ["e", 5, 6]}']
)
async def test_a_truncated_or_ill_typed_cursor_file_raises_value_error(tmp_path, content: str):
    path = tmp_path / "cursors.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        await FileCursorStore(path).load(1)


@pytest.mark.parametrize("value", ["e|-1", "e| 5", "e|\u0663", "e|5_0", "|5", "a b|5", "e|5.0"])
async def test_a_redis_cursor_of_garbage_raises_value_error(value: str):
    client = fakeredis.FakeAsyncRedis()
    store = RedisCursorStore(client, "garbage")
    await client.hset(store.key, "1", value)
    with pytest.raises(ValueError):
        await store.load(1)
    await client.aclose()


@pytest.mark.parametrize(
    "row",
    [
        ("e", 5.5, None),
        ("e", "five", None),
        ("e", -1, None),
        ("a b", 1, None),
        ("e", 1, "not a tag"),
        ("e", 1, "0123456789ABCDEF"),
        ("e", 1, 12),
    ],
)
async def test_a_sql_cursor_row_of_the_wrong_type_raises_value_error(row: tuple):
    # SQLite keeps whatever type was written, whatever the column says.
    db = sqlite3.connect(":memory:")
    store = SqlCursorStore(db, "garbage")
    store.create_table()
    db.execute("INSERT INTO eventbus_cursors VALUES ('garbage', 1, ?, ?, ?)", row)
    with pytest.raises(ValueError):
        await store.load(1)
    db.close()


@pytest.mark.parametrize("start", [-5, 2**53, True, 1.5, "later", None])
async def test_a_start_the_gateway_would_refuse_is_refused_before_it_is_sent(start: object):
    """``events(start=...)`` was not checked at all: a string stopped the consumer (its
    ``int()`` raised in a helper: ConsumerClosed), a negative seq was sent as the subscribe's
    ``after``, which the gateway refuses with an error naming no project (the project silent,
    and again after every reconnect); and ``Consumer(start=2**60)`` or ``True`` passed too.
    Both raise ValueError now, as for ``after=``."""
    with pytest.raises(ValueError, match="start must be"):
        Consumer("ws://unused/", start=start)  # type: ignore[arg-type]
    consumer = Consumer("ws://unused/")
    consumer._task = asyncio.get_running_loop().create_future()  # no real connection task
    if start is not None:
        with pytest.raises(ValueError, match="start must be"):
            consumer.events(1, start=start)  # type: ignore[arg-type]
    assert not consumer._routes  # nothing was followed
    consumer.events(1, start=2**53 - 1)
    Consumer("ws://unused/", start=0)


async def test_a_cursor_the_gateway_would_refuse_is_refused_before_it_is_sent():
    """An explicit ``after`` is checked when it is given; a custom store's cursor when it is
    loaded (a fatal error, as any failed load): sent, the gateway answers an error naming no
    project, and the project stays silent."""
    consumer = Consumer("ws://unused/")
    for bad in (Cursor("e", -1), Cursor("not an epoch", 1), ("e",), Cursor("e", 2**53)):
        with pytest.raises(ValueError, match="cursor"):
            consumer.events(1, after=bad)  # type: ignore[arg-type]
    assert consumer._routes == {}

    class Garbage(MemoryCursorStore):
        async def load(self, project_id: int) -> Cursor | None:
            return Cursor("e", "5")  # type: ignore[arg-type]

    async with Consumer("ws://127.0.0.1:9/", store=Garbage()) as consumer:
        with pytest.raises(ConsumerError, match="cannot load the cursor of project 1"):
            async with asyncio.timeout(10):
                await anext(consumer.events(1))


# --- the client's frame handling, with a fake connection ------------------------------------------


class FakeTransport:
    """What the client reads of a connection's transport: whether it is closing, and abort."""

    def __init__(self) -> None:
        self.aborted = False

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


class FakeConnection:
    """Records what the client sends."""

    state = State.OPEN

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.transport = FakeTransport()

    async def send(self, data: bytes, text: bool = True) -> None:
        self.sent.append(json.loads(data))


async def fed_consumer(
    *project_ids: int, ws: FakeConnection | None = None
) -> tuple[Consumer, FakeConnection, list]:
    consumer = Consumer("ws://unused/")
    consumer._task = asyncio.get_running_loop().create_future()  # no real connection task
    subscription = consumer.events(*project_ids)
    await asyncio.sleep(0)  # the cursors are prepared
    ws = ws or FakeConnection()
    consumer._ws = consumer._subscribed_on = ws  # type: ignore[assignment]
    for state in consumer._states.values():
        state.subscribe_message()
    return consumer, ws, subscription


def too_far_behind(project_id: int, seq: int, epoch: str = EPOCH) -> bytes:
    """The gateway's ``resync_required(too_far_behind)`` to ``(epoch, seq)``."""
    return msgspec.json.encode(
        {
            "type": "resync_required",
            "project_id": project_id,
            "reason": "too_far_behind",
            "epoch": epoch,
            "seq": seq,
        }
    )


def subscribed(project_id: int, seq: int, epoch: str = EPOCH, resumed: bool = False) -> bytes:
    return msgspec.json.encode(
        {
            "type": "subscribed",
            "project_id": project_id,
            "epoch": epoch,
            "seq": seq,
            "resumed": resumed,
            "replayed": 0,
        }
    )


def drain(subscription) -> list:
    items = []
    while not subscription._route.queue.empty():
        items.append(subscription._route.queue.get_nowait())
    return items


async def test_the_client_delivers_in_order_per_project_and_repairs_a_gap_by_resubscribing():
    consumer, ws, subscription = await fed_consumer(1, 2)
    for raw in (subscribed(1, 10), subscribed(2, 0)):
        await consumer._on_frame(ws, raw)  # type: ignore[arg-type]
    for raw in (frame(1, 11), frame(2, 1), frame(1, 11), frame(1, 13), frame(2, 2)):
        await consumer._on_frame(ws, raw)  # type: ignore[arg-type]
    items = drain(subscription)
    assert [(d.project_id, d.seq) for d in items] == [(1, 11), (2, 1), (2, 2)]
    assert all(isinstance(d, Delivery) and isinstance(d.event, BlockerResolved) for d in items)
    assert items[0].raw == frame(1, 11) and items[0].cursor == Cursor(EPOCH, 11)
    tag = event_tag(frame(1, 11))  # the tag of the event at the cursor: its frame's
    assert ws.sent == [
        {"type": "subscribe", "project_id": 1, "epoch": EPOCH, "after": 11, "tag": tag}
    ]
    await consumer._on_frame(ws, frame(1, 12))  # type: ignore[arg-type]
    await consumer._on_frame(ws, frame(1, 13))  # type: ignore[arg-type]
    await consumer._on_frame(ws, subscribed(1, 13, resumed=True))  # type: ignore[arg-type]
    assert [d.seq for d in drain(subscription)] == [12, 13]
    assert consumer.cursor(1) == Cursor(EPOCH, 13)
    stats = consumer.stats
    assert (stats.delivered, stats.duplicates, stats.gaps, stats.resyncs) == (5, 1, 1, 0)


async def test_a_project_followed_again_takes_nothing_of_the_subscription_it_left():
    """A subscription closed and the project followed again on the same connection: what the
    gateway sent for the old subscription before it read the unsubscribe (an event, an error)
    arrives after the new subscription exists. Event frames carry no epoch: an event of the
    epoch the old one followed was delivered under the new cursor's epoch, and the
    ``not_subscribed`` answering the unsubscribe of a subscription the gateway had already
    ended (``unavailable``) ended the new one. Everything of the project up to the gateway's
    answer to the unsubscribe belongs to the old subscription."""
    consumer, ws, old = await fed_consumer(1)
    await consumer._on_frame(ws, subscribed(1, 5, epoch="e1"))  # type: ignore[arg-type]
    await consumer._on_frame(ws, frame(1, 6))  # type: ignore[arg-type]
    assert [d.cursor for d in drain(old)] == [Cursor("e1", 6)]
    await old.aclose()
    new = consumer.events(1, after=Cursor("e0", 6))  # a cursor of an older history
    await asyncio.sleep(0)
    assert ws.sent[-2:] == [
        {"type": "unsubscribe", "project_id": 1},
        {"type": "subscribe", "project_id": 1, "epoch": "e0", "after": 6},
    ]
    # Sent by the gateway before it read the unsubscribe: e1's 7th event, then the answer.
    await consumer._on_frame(ws, frame(1, 7, 777))  # type: ignore[arg-type]
    await consumer._on_frame(ws, b'{"type":"unsubscribed","project_id":1}')  # type: ignore[arg-type]
    assert drain(new) == []
    # The answers to the new subscribe are its own.
    resync = {"type": "resync_required", "project_id": 1, "reason": "epoch_changed"}
    await consumer._on_frame(ws, json.dumps({**resync, "epoch": "e1", "seq": 7}).encode())  # type: ignore[arg-type]
    await consumer._on_frame(ws, subscribed(1, 7, epoch="e1"))  # type: ignore[arg-type]
    await consumer._on_frame(ws, frame(1, 8))  # type: ignore[arg-type]
    items = drain(new)
    assert items[0] == Resync(1, ResyncReason.EPOCH_CHANGED, "e1", 7)
    assert [d.cursor for d in items[1:]] == [Cursor("e1", 8)]

    # The gateway had ended the old subscription itself: it answers the unsubscribe with
    # not_subscribed, which is the old subscription's too.
    unavailable = {"type": "error", "code": "unavailable", "message": "later", "project_id": 1}
    await consumer._on_frame(ws, json.dumps(unavailable).encode())  # type: ignore[arg-type]
    await new.aclose()
    again = consumer.events(1)
    await asyncio.sleep(0)
    refused = {"type": "error", "code": "not_subscribed", "message": "no", "project_id": 1}
    await consumer._on_frame(ws, json.dumps(refused).encode())  # type: ignore[arg-type]
    assert 1 in consumer._states and drain(again) == []
    await consumer._on_frame(ws, subscribed(1, 8, epoch="e1"))  # type: ignore[arg-type]
    await consumer._on_frame(ws, frame(1, 9))  # type: ignore[arg-type]
    assert [d.cursor for d in drain(again)] == [Cursor("e1", 9)]


async def test_the_client_surfaces_resync_forbidden_and_undecodable_in_order():
    consumer, ws, subscription = await fed_consumer(1, 2)
    await consumer._on_frame(ws, subscribed(1, 3))  # type: ignore[arg-type]
    resync = {"type": "resync_required", "project_id": 1, "reason": "epoch_changed"}
    await consumer._on_frame(ws, json.dumps({**resync, "epoch": "e2", "seq": 0}).encode())  # type: ignore[arg-type]
    unknown = b'{"type":"task_status_changed","project_id":1,"task_id":2,"seq":1}'
    await consumer._on_frame(ws, unknown)  # type: ignore[arg-type]
    await consumer._on_frame(ws, frame(1, 2))  # type: ignore[arg-type]
    error = {"type": "error", "code": "forbidden", "message": "no", "project_id": 2}
    await consumer._on_frame(ws, json.dumps(error).encode())  # type: ignore[arg-type]
    first = await anext(subscription)
    assert first == Resync(1, ResyncReason.EPOCH_CHANGED, "e2", 0)
    with pytest.raises(UndecodableEvent) as info:
        await anext(subscription)
    assert (info.value.seq, info.value.raw) == (1, unknown)
    after = await anext(subscription)  # the iterator goes on after it
    assert isinstance(after, Delivery) and after.cursor == Cursor("e2", 2)
    with pytest.raises(Forbidden) as refused:
        await anext(subscription)
    assert refused.value.project_id == 2
    assert consumer.cursor(2) is None and 2 not in consumer._routes


# --- tail ----------------------------------------------------------------------------------------


def test_tail_prints_one_readable_line_per_item_or_the_raw_frame():
    raw = frame(1, 42, blocker_id=123)
    delivery = Delivery(1, EPOCH, 42, decode_frame(raw), raw)  # type: ignore[arg-type]
    line = format_item(delivery)
    assert line == '2025-11-08T12:45:30.000Z  p1 #42  blocker_resolved  blocker_id=123 answer="ok"'
    assert format_item(delivery, as_json=True) == raw.decode()
    created = BlockerCreated(
        project_id=1,
        blocker=Blocker(
            id=5,
            agent_id="a-1",
            agent_name="Agent 1",
            task_id=7,
            task_title="Auth",
            blocker_type="SYNC",
            question="JWT or sessions? " * 10,
            status="PENDING",
            created_at=datetime(2025, 11, 8, 12, 0, tzinfo=UTC),
        ),
    )
    line = format_item(Delivery(1, EPOCH, 3, created, b""))
    assert line.startswith(
        '2025-11-08T12:00:00.000Z  p1 #3  blocker_created  blocker.id=5 blocker.agent_id="a-1" '
        'blocker.blocker_type="SYNC" blocker.task_id=7 blocker.question="JWT or sessions? JWT'
    )
    assert line.endswith('JWT or sess…"')  # cut at 80 characters
    resync = Resync(1, ResyncReason.HISTORY_TRIMMED, "e2", 57)
    assert "p1 #57  resync_required  reason=history_trimmed epoch=e2" in format_item(resync)
    assert json.loads(format_item(resync, as_json=True)) == {
        "type": "resync_required",
        "project_id": 1,
        "reason": "history_trimmed",
        "epoch": "e2",
        "seq": 57,
    }


async def test_a_cursor_store_that_cannot_load_stops_the_consumer_loudly(tmp_path):
    path = tmp_path / "cursors.json"
    path.write_text("{not json")
    async with Consumer("ws://127.0.0.1:9/", store=FileCursorStore(path)) as consumer:
        with pytest.raises(ConsumerError, match="cannot load the cursor of project 1"):
            async with asyncio.timeout(10):
                await anext(consumer.events(1))


async def test_a_cursor_store_that_hangs_is_an_error_after_open_timeout():
    """A store on a hung Redis or database: its ``load`` never returned, so the project never
    subscribed and its iterator waited for ever, nothing said; a hung ``save`` held the caller's
    ``anext`` for ever. Now each is given ``open_timeout``: a load that takes longer is the
    fatal ConsumerError of any failed load, a save raises TimeoutError from ``anext`` (the item
    is not saved, as for any failing save)."""

    class Hung(MemoryCursorStore):
        def __init__(self, hang_load: bool) -> None:
            super().__init__()
            self.hang_load = hang_load

        async def load(self, project_id: int) -> Cursor | None:
            if self.hang_load:
                await asyncio.Event().wait()
            return await super().load(project_id)

        async def save(self, project_id: int, cursor: Cursor) -> None:
            await asyncio.Event().wait()

    async with Consumer("ws://127.0.0.1:9/", store=Hung(True), open_timeout=0.3) as consumer:
        with pytest.raises(ConsumerError, match="cannot load the cursor of project 1"):
            async with asyncio.timeout(5):
                await anext(consumer.events(1))

    consumer = Consumer("ws://unused/", store=Hung(False), open_timeout=0.3)
    consumer._task = asyncio.get_running_loop().create_future()  # no real connection task
    subscription = consumer.events(1)
    await asyncio.sleep(0)  # the cursor is loaded
    ws = FakeConnection()
    consumer._ws = consumer._subscribed_on = ws  # type: ignore[assignment]
    consumer._states[1].subscribe_message()
    for raw in (subscribed(1, 0), frame(1, 1), frame(1, 2)):
        await consumer._on_frame(ws, raw)  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        assert (await anext(subscription)).seq == 1
        with pytest.raises(TimeoutError):
            await anext(subscription)  # saving 1's cursor
        assert (await anext(subscription)).seq == 2


# --- the client against a simulated gateway and a hostile network -------------------------------


class SimulatedGateway:
    """A gateway in memory: per project an epoch and its events (``blocker_id`` s), and the
    frames in flight to one client. It answers the client's subscribes like the real one
    (replay after the cursor, or ``resync_required``, then ``subscribed``); the test then lets the
    network drop, duplicate and swap live frames, cut the connection, and flush a project."""

    MAX_REPLAY = 4  # small, so that resumes often need a catch-up by pages

    def __init__(self, projects: list[int]) -> None:
        self.epochs = {p: "e0" for p in projects}
        self.history: dict[tuple[int, str], list[int]] = {(p, "e0"): [] for p in projects}
        self.live: set[int] = set()  # projects subscribed on the current connection
        self.in_flight: list[bytes] = []
        self.flushes = 0
        self.idents = iter(range(1, 10**9))

    def events(self, project: int) -> list[int]:
        return self.history[(project, self.epochs[project])]

    def publish(self, project: int) -> None:
        events = self.events(project)
        events.append(next(self.idents))
        if project in self.live:
            self.in_flight.append(frame(project, len(events), events[-1]))

    def flush(self, project: int) -> None:
        self.flushes += 1
        epoch = f"e{self.flushes}"
        self.epochs[project] = epoch
        self.history[(project, epoch)] = []
        if project in self.live:
            message = {"type": "resync_required", "project_id": project}
            message |= {"reason": "epoch_changed", "epoch": epoch, "seq": 0}
            self.in_flight.append(json.dumps(message).encode())

    def subscribe(self, message: dict) -> None:
        project, epoch, events = message["project_id"], None, None
        epoch = self.epochs[project]
        events = self.events(project)
        top, after, resumed = len(events), message.get("after"), False
        if message.get("epoch") is not None:
            reason = None
            if message["epoch"] != epoch:
                reason = "epoch_changed"
            elif after > top:
                reason = "history_lost"
            elif top - after > self.MAX_REPLAY:
                reason = "too_far_behind"
            if reason:
                resync = {"type": "resync_required", "project_id": project, "reason": reason}
                self.in_flight.append(json.dumps(resync | {"epoch": epoch, "seq": top}).encode())
            else:
                resumed = True
                for seq in range(after + 1, top + 1):
                    self.in_flight.append(frame(project, seq, events[seq - 1]))
        self.in_flight.append(subscribed(project, top, epoch, resumed))
        self.live.add(project)

    async def poll(self, project: int, cursor: Cursor) -> PollResponse:
        """The polling endpoint: a page of 3 events after the cursor, or a resync."""
        epoch, events = self.epochs[project], self.events(project)
        top = len(events)
        if cursor[0] != epoch or cursor[1] > top:
            reason = "epoch_changed" if cursor[0] != epoch else "history_lost"
            resync = ResyncRequired(project, ResyncReason(reason), epoch, top)
            return PollResponse(project, epoch, top, [], resync)
        page = list(range(cursor[1] + 1, top + 1))[:3]
        frames = [msgspec.Raw(frame(project, seq, events[seq - 1])) for seq in page]
        return PollResponse(project, epoch, top, frames, None, bool(page) and page[-1] < top)


async def deliver(gateway: SimulatedGateway, consumer: Consumer, ws: FakeConnection, n: int):
    """Hand the first ``n`` frames in flight to the client; its subscribes reach the gateway."""
    delivered = 0
    while gateway.in_flight and delivered < n:
        await consumer._on_frame(ws, gateway.in_flight.pop(0))  # type: ignore[arg-type]
        delivered += 1
        while consumer._helpers:  # a catch-up by pages runs to its end
            await asyncio.gather(*list(consumer._helpers))
        while ws.sent:
            gateway.subscribe(ws.sent.pop(0))


def damage(flight: list[bytes], op: str, a: int) -> None:
    """The network's fault ``op`` ("drop", "duplicate" or "swap") to the frame at ``a`` (modulo).

    Only event frames are damaged, and never moved past a control message: events carry no
    epoch, so an event of an old history arriving after the resync_required that ended it could
    not be recognised by any client (nor does a gateway send one; nor does TCP lose or reorder
    anything: these faults stand for gateway bugs)."""
    if not flight:
        return
    i = a % len(flight)
    run = i
    while run < len(flight) and b'"type":"blocker_resolved"' in flight[run]:
        run += 1  # flight[i:run] are event frames
    if run == i:
        return
    if op == "drop":
        del flight[i]
    elif op == "duplicate":
        flight.insert(min(run, i + 1 + a % 3), flight[i])
    elif i + 1 < run:
        flight[i], flight[i + 1] = flight[i + 1], flight[i]


def reconnect(gateway: SimulatedGateway, consumer: Consumer) -> None:
    """A new connection: nothing of the old one in flight, every project subscribed again."""
    gateway.in_flight.clear()
    gateway.live.clear()
    for state in consumer._states.values():
        state.on_connection()
        gateway.subscribe(state.subscribe_message())


#: The steps of the simulated network and history (``(op, a, b)``).
OPERATIONS = (
    st.tuples(st.just("publish"), st.integers(1, 2), st.integers(1, 5)),
    st.tuples(st.just("deliver"), st.integers(0, 8), st.just(0)),
    st.tuples(st.sampled_from(["drop", "duplicate", "swap"]), st.integers(0, 20), st.just(0)),
    st.tuples(st.just("reconnect"), st.just(0), st.just(0)),
    st.tuples(st.just("flush"), st.integers(1, 2), st.just(0)),
)
operations = st.lists(st.one_of(*OPERATIONS), max_size=40)


@settings(max_examples=300, deadline=None)
@given(operations)
@example(  # a flush while a catch-up's pages were read (ProjectState.stream_epoch)
    [
        ("deliver", 1, 0),
        ("publish", 1, 5),
        ("reconnect", 0, 0),
        ("publish", 1, 1),
        ("flush", 1, 0),
        ("publish", 1, 5),
    ]
)
async def test_through_drops_duplicates_swaps_reconnects_and_flushes_every_event_once_in_order(
    steps: list[tuple[str, int, int]],
):
    """Whatever the network does to live frames, each project's items are the events of its
    history, each once and in order, with a ``Resync`` exactly where its history was lost; and the
    client ends at the top of every project. Resumes further behind than the gateway replays are
    caught up by pages, so they never give a Resync."""
    projects = [1, 2]
    consumer, ws, subscription = await fed_consumer(*projects)
    gateway = SimulatedGateway(projects)
    consumer._poll = gateway.poll  # type: ignore[method-assign]
    for project in projects:
        gateway.subscribe(consumer._states[project].subscribe_message())
    for op, a, b in steps:
        if op == "publish":
            for _ in range(b):
                gateway.publish(a)
        elif op == "deliver":
            await deliver(gateway, consumer, ws, a)
        elif op in ("drop", "duplicate", "swap"):
            damage(gateway.in_flight, op, a)
        elif op == "reconnect":
            reconnect(gateway, consumer)
        elif op == "flush":
            gateway.flush(a)
    # A healthy network from here: one more event per project reveals any trailing gap.
    await deliver(gateway, consumer, ws, 10**6)
    for project in projects:
        gateway.publish(project)
    await deliver(gateway, consumer, ws, 10**6)

    items = drain(subscription)
    # Only flushes lose history here; a resume too far behind is caught up, never resynced.
    assert all(i.reason is ResyncReason.EPOCH_CHANGED for i in items if isinstance(i, Resync))
    for project in projects:
        cursor: tuple[str, int] | None = None
        for item in (i for i in items if i.project_id == project):
            if isinstance(item, Resync):
                cursor = (item.epoch, item.seq)
                continue
            if cursor is None:  # "from now": wherever the first acknowledged subscribe was
                cursor = (item.epoch, item.seq - 1)
            assert (item.epoch, item.seq) == (cursor[0], cursor[1] + 1), (item, cursor)
            assert item.event.blocker_id == gateway.history[(project, item.epoch)][item.seq - 1]
            cursor = (item.epoch, item.seq)
        final = (gateway.epochs[project], len(gateway.events(project)))
        assert consumer.cursor(project) == final
        assert cursor == final or (cursor is None and final == ("e0", 0))


async def test_a_gateway_that_never_answers_the_token_is_left_after_open_timeout():
    """A gateway (or something in front of it) that completes the handshake and answers pings,
    then sends nothing: the consumer sat on that connection for ever, never authenticated,
    nothing delivered, nothing logged (eventbus.js drops it after its connectTimeout). Now a
    connection without ``authenticated`` within ``open_timeout`` is closed and another made."""
    from websockets.asyncio.server import serve

    opened: list[float] = []
    reconnected = asyncio.Event()

    async def mute(connection) -> None:
        opened.append(asyncio.get_running_loop().time())
        if len(opened) == 2:
            reconnected.set()
        await connection.wait_closed()

    async with serve(mute, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        policy = ReconnectPolicy(initial=0.05, max=0.1)
        consumer = Consumer(
            f"ws://127.0.0.1:{port}/", token="t", open_timeout=0.5, reconnect=policy
        )
        async with consumer:
            consumer.events(1)
            async with asyncio.timeout(5):
                await reconnected.wait()
    assert opened[1] - opened[0] >= 0.5
    assert consumer.close_codes[0] is not None and not consumer.live


async def test_a_token_function_that_never_answers_is_abandoned_after_open_timeout():
    """An async token function stuck on a hung token endpoint held the connection task for ever:
    no connection, no retry, no log, nothing raised (eventbus.js abandons it after its
    connectTimeout). Now it is given up after ``open_timeout`` and asked again with backoff."""
    calls: list[float] = []
    asked_again = asyncio.Event()

    async def hung() -> str:
        calls.append(asyncio.get_running_loop().time())
        if len(calls) == 3:
            asked_again.set()
        await asyncio.Event().wait()
        return "never"

    policy = ReconnectPolicy(initial=0.05, max=0.1)
    consumer = Consumer("ws://127.0.0.1:9/", token=hung, open_timeout=0.3, reconnect=policy)
    async with consumer:
        consumer.events(1)
        async with asyncio.timeout(5):
            await asked_again.wait()
    assert calls[1] - calls[0] >= 0.3


async def test_a_bug_in_the_connection_task_is_raised_to_the_iterators_not_a_silent_hang():
    consumer = Consumer("ws://127.0.0.1:9/")

    async def broken() -> float:
        raise RuntimeError("boom")

    consumer._connect_once = broken  # type: ignore[method-assign]
    async with consumer:
        subscription = consumer.events(1)
        with pytest.raises(ConsumerClosed, match="boom"):
            async with asyncio.timeout(10):
                await anext(subscription)


def _postgres_admin():
    """A connection to the machine's PostgreSQL server (127.0.0.1:5432), or skip."""
    psycopg = pytest.importorskip("psycopg")
    errors = []
    urls = (
        [os.environ.get("EVENTBUS_TEST_POSTGRES", "")]
        if "EVENTBUS_TEST_POSTGRES" in os.environ
        else []
    )
    urls += [
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "postgresql://root@127.0.0.1:5432/postgres",
    ]
    for url in urls:
        try:
            return url, psycopg.connect(url, autocommit=True, connect_timeout=3)
        except psycopg.OperationalError as exc:
            errors.append(str(exc).strip())
    pytest.skip(f"no PostgreSQL server: {errors}")


async def test_sql_store_on_postgresql_through_psycopg():
    import psycopg

    admin_url, admin = _postgres_admin()
    name = f"eventbus_consumer_test_{os.getpid()}"
    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {name}")
    try:
        with psycopg.connect(admin_url.rpartition("/")[0] + "/" + name) as db:
            store = SqlCursorStore(db, "pager")  # paramstyle "format", from the connection
            store.create_table()
            db.execute("CREATE TABLE pages (seq BIGINT PRIMARY KEY)")
            db.commit()
            with db.cursor() as cur:
                cur.execute("INSERT INTO pages VALUES (1)")
                store.save_in(cur, 7, Cursor("e", 1))
            db.commit()
            with db.cursor() as cur:
                cur.execute("INSERT INTO pages VALUES (2)")
                store.save_in(cur, 7, Cursor("e", 2))
            db.rollback()
            assert await store.load(7) == Cursor("e", 1)
            await store.save(7, Cursor("f", 9))
            assert await store.load(7) == Cursor("f", 9)
            assert [r[0] for r in db.execute("SELECT seq FROM pages")] == [1]
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def test_tail_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]):
    from consumer.__main__ import main as consumer_main
    from consumer.tail import main as tail_main

    for argv in (["0"], ["1", "--from-start", "--after", "3"], ["1", "--after", "-1"], []):
        with pytest.raises(SystemExit) as info:
            tail_main(argv)
        assert info.value.code == 2, argv
    assert consumer_main(["nope"]) == 2
    assert "usage: python -m consumer tail" in capsys.readouterr().err
    # A URL no connection can be made to, a cursor past what the gateway takes: usage errors
    # too, not a traceback, found before any connection is tried (and before run() points
    # structlog at stderr).
    before = structlog.get_config()
    assert tail_main(["1", "--url", "http://127.0.0.1:8765/"]) == 2
    assert "error: not a gateway URL" in capsys.readouterr().err
    assert tail_main(["1", "--after", str(2**53)]) == 2
    assert "error: start must be" in capsys.readouterr().err
    assert structlog.get_config() == before


async def test_a_subscription_dropped_without_closing_unfollows_its_projects():
    """``break`` out of ``async for item in bus.events(1)``: nothing holds the subscription any
    more; its projects must not go on filling a queue nobody reads (which would stall the
    connection for every other project), and may be followed again."""
    consumer, ws, subscription = await fed_consumer(1, 2)
    await consumer._on_frame(ws, subscribed(1, 0))  # type: ignore[arg-type]
    del subscription
    gc.collect()
    for _ in range(3):  # the loop's next turn forgets the projects, the one after sends
        await asyncio.sleep(0)
    assert consumer._routes == {} and consumer._states == {}
    assert ws.sent == [
        {"type": "unsubscribe", "project_id": 1},
        {"type": "unsubscribe", "project_id": 2},
    ]
    await consumer._on_frame(ws, frame(1, 1))  # type: ignore[arg-type]  # ignored, not queued
    again = consumer.events(1)
    assert again.project_ids == (1,)


class BrokenUnsubscribe(FakeConnection):
    """A connection whose send of an unsubscribe raises what websockets' send never should
    (a bug in it, or in a transport): not ConnectionClosed."""

    #: Called as the send breaks (the connection task ending the connection meanwhile, say).
    meanwhile: Callable[[], None] = staticmethod(lambda: None)

    async def send(self, data: bytes, text: bool = True) -> None:
        if json.loads(data)["type"] == "unsubscribe":
            self.meanwhile()
            raise RuntimeError("the send broke")
        await super().send(data, text)


async def _two_followed(ws: FakeConnection):
    """A consumer following project 1 (kept) and project 2 (to leave), both answered."""
    consumer, ws, kept = await fed_consumer(1, ws=ws)
    leaving = consumer.events(2)
    for _ in range(3):
        await asyncio.sleep(0)
    assert ws.sent[-1] == {"type": "subscribe", "project_id": 2}
    await consumer._on_frame(ws, subscribed(1, 0))  # type: ignore[arg-type]
    await consumer._on_frame(ws, subscribed(2, 0))  # type: ignore[arg-type]
    return consumer, kept, leaving


async def _still_delivers(consumer: Consumer, ws: FakeConnection, kept) -> None:
    assert consumer._failure is None and not consumer._closed
    await consumer._on_frame(ws, frame(1, 1))  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        item = await anext(kept)
    assert isinstance(item, Delivery) and item.seq == 1


async def test_an_unsubscribe_whose_send_fails_unexpectedly_reaches_the_one_leaving_only():
    """Leaving a project must never break the others: an unexpected error sending its
    unsubscribe (not ConnectionClosed) is raised to the caller of ``aclose()`` and logged,
    and the connection, in a state nobody knows (did the frame go?), is dropped to be made
    again (every other project resumes from its cursor). It stopped the whole consumer: every
    other iterator raised ConsumerClosed, and ``aclose()`` returned as if all went well."""
    from structlog.testing import capture_logs

    ws = BrokenUnsubscribe()
    consumer, kept, leaving = await _two_followed(ws)
    with capture_logs() as logs:
        with pytest.raises(RuntimeError, match="the send broke"):
            await leaving.aclose()
        await asyncio.sleep(0)
    assert [
        (entry["log_level"], entry["project_id"], entry["error"])
        for entry in logs
        if entry["event"] == "cannot send an unsubscribe; reconnecting"
    ] == [("error", 2, "RuntimeError('the send broke')")]
    assert ws.transport.aborted and consumer._given_up is ws  # made again, with backoff
    assert 2 not in consumer._states and 2 not in consumer._routes
    await _still_delivers(consumer, ws, kept)

    # A subscription Python collected: nobody to raise it to; logged, the connection dropped.
    ws = BrokenUnsubscribe()
    consumer, kept, leaving = await _two_followed(ws)
    with capture_logs() as logs:
        del leaving
        gc.collect()
        for _ in range(4):
            await asyncio.sleep(0)
    assert [entry["project_id"] for entry in logs if entry["log_level"] == "error"] == [2]
    assert ws.transport.aborted and 2 not in consumer._states
    await _still_delivers(consumer, ws, kept)


@pytest.mark.parametrize("going", ["closing", "aborted", "given up", "replaced"])
async def test_an_unsubscribe_failing_on_a_connection_going_away_is_nothing_to_report(going):
    """On a connection that is ending anyway (closing, dropped, given up, or no longer the
    consumer's), the gateway drops every subscription of it: a failed unsubscribe there is no
    error, and no reason to drop a connection again."""
    from structlog.testing import capture_logs

    ws = BrokenUnsubscribe()
    consumer, kept, leaving = await _two_followed(ws)
    if going == "closing":
        ws.state = State.CLOSING
    elif going == "aborted":
        ws.transport.abort()
    elif going == "given up":
        consumer._given_up = ws  # type: ignore[assignment]
    elif going == "replaced":  # the connection ended while the unsubscribe was being sent

        def replaced() -> None:
            consumer._ws = consumer._subscribed_on = None

        ws.meanwhile = replaced  # type: ignore[method-assign]
    with capture_logs() as logs:
        await leaving.aclose()
    assert [entry for entry in logs if entry["log_level"] in ("error", "warning")] == []
    assert consumer._given_up is (ws if going == "given up" else None)
    assert ws.transport.aborted is (going == "aborted")
    await _still_delivers(consumer, ws, kept)


@pytest.mark.parametrize("breaks", [False, True])
async def test_the_frames_left_behind_by_a_failed_leave_are_never_taken_for_a_new_follows(breaks):
    """Leaving projects 2 and 3 together, the send of 2's unsubscribe breaking: the connection
    is dropped, but until it ends, the frames it still holds of 3's old subscription are that
    subscription's, as any left one's (see Consumer._unsubscribe). Project 3 followed again
    meanwhile, from a cursor in another epoch, took the old subscription's next event for the
    one after its cursor: delivered under the wrong epoch. (With the send working, it is
    dropped: 3's unsubscribe was sent, and its frames are the left subscription's until the
    gateway answers it.)"""
    ws = BrokenUnsubscribe() if breaks else FakeConnection()
    consumer, ws, kept = await fed_consumer(1, ws=ws)
    leaving = consumer.events(2, 3)
    for _ in range(3):
        await asyncio.sleep(0)
    for project_id in (1, 2, 3):
        await consumer._on_frame(ws, subscribed(project_id, 5))  # type: ignore[arg-type]
    if breaks:
        with pytest.raises(RuntimeError, match="the send broke"):
            await leaving.aclose()
    else:
        await leaving.aclose()
    again = consumer.events(3, after=Cursor("another-epoch", 5))
    for _ in range(3):
        await asyncio.sleep(0)
    # Still queued from the old subscription of 3 (its epoch EPOCH), read before the
    # connection ends:
    await consumer._on_frame(ws, frame(3, 6))  # type: ignore[arg-type]
    assert drain(again) == []
    await _still_delivers_at(consumer, ws, kept, 6)


async def _still_delivers_at(consumer: Consumer, ws: FakeConnection, kept, seq: int) -> None:
    assert consumer._failure is None and not consumer._closed
    await consumer._on_frame(ws, frame(1, seq))  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        item = await anext(kept)
    assert isinstance(item, Delivery) and item.seq == seq


async def test_a_broken_unsubscribe_on_a_real_connection_reconnects_once_and_the_others_resume(
    monkeypatch,
):
    """End to end, on a local WebSocket server: the unsubscribe's send breaking (not
    ConnectionClosed) fails that aclose() only; the connection is dropped once and made again,
    the project kept resumes from its cursor (each event once), and the one left is not
    subscribed again."""
    from structlog.testing import capture_logs
    from websockets.asyncio.server import serve

    plain_send = consumer_client._Connection.send

    async def send(self, message, text=None):
        if b'"unsubscribe"' in message:
            raise RuntimeError("the send broke")
        return await plain_send(self, message, text=text)

    monkeypatch.setattr(consumer_client._Connection, "send", send)
    seen: list[list[dict]] = []
    second = asyncio.Event()

    async def gateway(connection) -> None:
        frames: list[dict] = []
        seen.append(frames)
        if len(seen) == 1:
            for _ in range(2):
                frames.append(json.loads(await connection.recv()))
            for raw in (subscribed(1, 0), subscribed(2, 0), frame(1, 1), frame(1, 2)):
                await connection.send(raw.decode())
        else:
            frames.append(json.loads(await connection.recv()))
            for raw in (frame(1, 2), frame(1, 3), subscribed(1, 3, resumed=True), frame(1, 4)):
                await connection.send(raw.decode())
            second.set()
        with contextlib.suppress(Exception):
            async for message in connection:
                frames.append(json.loads(message))

    policy = ReconnectPolicy(initial=0.05, max=0.1)
    async with serve(gateway, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with Consumer(f"ws://127.0.0.1:{port}/", reconnect=policy) as consumer:
            kept = consumer.events(1)
            leaving = consumer.events(2)
            async with asyncio.timeout(10):
                assert [(await anext(kept)).seq for _ in range(2)] == [1, 2]
                with capture_logs() as logs:
                    with pytest.raises(RuntimeError, match="the send broke"):
                        await leaving.aclose()
                    assert [(await anext(kept)).seq for _ in range(2)] == [3, 4]
                await second.wait()
            assert consumer.connects == 2 and consumer._failure is None
            assert consumer.close_codes == [1006]  # dropped once, by the consumer
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "cannot send an unsubscribe; reconnecting"
    ]
    assert seen[1][0] == {
        "type": "subscribe",
        "project_id": 1,
        "epoch": EPOCH,
        "after": 2,
        "tag": event_tag(frame(1, 2)),
    }
    assert all(f.get("project_id") != 2 for f in seen[1])


class BrokenSend(FakeConnection):
    """A connection whose send of the frame types in ``breaks`` raises what websockets' send
    never should (a bug in it, or in a transport): not ConnectionClosed."""

    breaks: tuple[str, ...] = ()

    async def send(self, data: bytes, text: bool = True) -> None:
        if json.loads(data)["type"] in self.breaks:
            raise RuntimeError("the send broke")
        await super().send(data, text)


@pytest.mark.parametrize("path", ["follow", "gap repair", "presence", "token refresh"])
async def test_any_frame_whose_send_fails_unexpectedly_drops_the_connection_not_the_consumer(
    path,
):
    """Every frame the consumer sends, not only an unsubscribe: a send raising anything but
    ConnectionClosed leaves the connection in a state nobody knows (did the frame go?). It is
    logged once at error with the project and dropped (1006, with backoff), to be made again,
    every project resuming from its cursor. It stopped the whole consumer: every iterator
    raised ConsumerClosed('internal error') (a subscribe of a project followed once connected,
    of a presence reader), or the error escaped the connection task (a gap's repair), or
    went unheard in a task of its own while the token expired (a refresh)."""
    from structlog.testing import capture_logs

    ws = BrokenSend()
    consumer, ws, kept = await fed_consumer(1, ws=ws)
    await consumer._on_frame(ws, subscribed(1, 0))  # type: ignore[arg-type]
    if path in ("gap repair", "presence"):
        other = consumer.events(2)
        for _ in range(3):
            await asyncio.sleep(0)
        await consumer._on_frame(ws, subscribed(2, 0))  # type: ignore[arg-type]
    ws.breaks = ("auth",) if path == "token refresh" else ("subscribe",)
    with capture_logs() as logs:
        if path == "follow":
            other = consumer.events(2)  # noqa: F841  (kept open)
        elif path == "gap repair":
            await consumer._on_frame(ws, frame(2, 1))  # type: ignore[arg-type]
            await consumer._on_frame(ws, frame(2, 3))  # type: ignore[arg-type]
        elif path == "presence":
            reader = consumer.presence(2)  # noqa: F841  (kept open)
        else:
            consumer._token_source = lambda: "t2"
            await consumer._refresh_later(ws, 0)  # type: ignore[arg-type]
        for _ in range(4):
            await asyncio.sleep(0)
    errors = [
        (entry["event"], entry.get("project_id"), entry["error"])
        for entry in logs
        if entry["log_level"] == "error"
    ]
    if path == "token refresh":
        assert errors == [
            ("cannot send the token; reconnecting", None, "RuntimeError('the send broke')")
        ]
    else:
        assert errors == [
            ("cannot send a subscribe; reconnecting", 2, "RuntimeError('the send broke')")
        ]
    assert ws.transport.aborted and consumer._given_up is ws  # made again, with backoff
    await _still_delivers(consumer, ws, kept)


@pytest.mark.parametrize("breaking", ["auth", "subscribe"])
async def test_a_broken_send_on_a_real_connection_reconnects_once_and_every_project_resumes(
    monkeypatch, breaking
):
    """End to end, on a local WebSocket server: the first send of the token, or of project 2's
    first subscribe, breaking (not ConnectionClosed), written by the connection task itself or
    by a helper: the connection is dropped once and made again, and both projects deliver
    each event once, in order. It stopped the consumer: every iterator raised
    ConsumerClosed('internal error')."""
    from structlog.testing import capture_logs
    from websockets.asyncio.server import serve

    plain_send = consumer_client._Connection.send
    broke: list[bytes] = []

    async def send(self, message, text=None):
        sent = json.loads(message)
        if not broke and sent["type"] == breaking and sent.get("project_id", 2) == 2:
            broke.append(message)
            raise RuntimeError("the send broke")
        return await plain_send(self, message, text=text)

    monkeypatch.setattr(consumer_client._Connection, "send", send)
    seen: list[list[dict]] = []

    async def gateway(connection) -> None:
        frames: list[dict] = []
        seen.append(frames)
        with contextlib.suppress(Exception):
            async for message in connection:
                sent = json.loads(message)
                frames.append(sent)
                if sent["type"] == "auth":
                    await connection.send(
                        '{"type":"authenticated","subject":null,"projects":null,"expires_at":null}'
                    )
                elif sent["type"] == "subscribe":
                    project_id, after = sent["project_id"], sent.get("after")
                    if after is None:
                        answer = [subscribed(project_id, 0)]
                        answer += [frame(project_id, seq) for seq in (1, 2, 3)]
                    else:  # the replay from the cursor, then the answer
                        answer = [frame(project_id, seq) for seq in range(after + 1, 4)]
                        answer.append(subscribed(project_id, 3, resumed=True))
                    for raw in answer:
                        await connection.send(raw.decode())

    policy = ReconnectPolicy(initial=0.05, max=0.1)
    token = "t" if breaking == "auth" else None
    with capture_logs() as logs:
        async with serve(gateway, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}/"
            async with Consumer(url, token=token, reconnect=policy) as consumer:
                first, second = consumer.events(1), consumer.events(2)
                async with asyncio.timeout(10):
                    assert [(await anext(first)).seq for _ in range(3)] == [1, 2, 3]
                    assert [(await anext(second)).seq for _ in range(3)] == [1, 2, 3]
                assert consumer._failure is None
                assert consumer.connects == 2
                assert consumer.close_codes == [1006]  # dropped once, by the consumer
    what = "the token" if breaking == "auth" else "a subscribe"
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        f"cannot send {what}; reconnecting"
    ]
    assert broke


#: A token as os.environ or a file read with errors="surrogateescape" gives it for bytes that
#: are not UTF-8: it can never be sent (not UTF-8), and its text must never reach a log.
UNSENDABLE_TOKEN = "eyJhbGciOiJIUzI1NiJ9.secret-part\udcff"


def test_a_fixed_token_that_cannot_be_sent_is_refused_when_the_consumer_is_made():
    """A fixed token that is not UTF-8 can never be sent: ValueError at once, without the
    token's text. It was taken, and every connection's auth frame then failed to encode: logged
    at error with the token in the error and the traceback, and the connection made again for
    ever."""
    with pytest.raises(ValueError, match="UTF-8") as raised:
        Consumer("ws://gateway:8765/", token=UNSENDABLE_TOKEN)
    assert "secret" not in str(raised.value)


async def test_a_token_function_returning_a_token_that_cannot_be_sent_is_a_failing_function():
    """End to end, on a local WebSocket server: a token function whose token is not UTF-8 once
    fails as one raising would (``token function failed`` at warning, then again after a
    backoff delay), no connection is made for it, and the token's text is in no log line. It
    was sent: the auth frame failed to encode, logged at error with the token in ``error`` and
    in the traceback, and the connection dropped."""
    from structlog.testing import capture_logs
    from websockets.asyncio.server import serve

    async def gateway(connection) -> None:
        with contextlib.suppress(Exception):
            async for message in connection:
                sent = json.loads(message)
                if sent["type"] == "auth":
                    await connection.send(
                        '{"type":"authenticated","subject":null,"projects":null,"expires_at":null}'
                    )
                elif sent["type"] == "subscribe":
                    for raw in [subscribed(sent["project_id"], 0), frame(sent["project_id"], 1)]:
                        await connection.send(raw.decode())

    tokens = iter([UNSENDABLE_TOKEN, "t"])
    policy = ReconnectPolicy(initial=0.05, max=0.1)
    with capture_logs() as logs:
        async with serve(gateway, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}/"
            async with Consumer(url, token=lambda: next(tokens), reconnect=policy) as consumer:
                events = consumer.events(1)
                async with asyncio.timeout(10):
                    assert (await anext(events)).seq == 1
                assert consumer._failure is None
                assert consumer.connects == 1
    assert [e["event"] for e in logs if e["log_level"] in ("warning", "error")] == [
        "token function failed"
    ]
    assert not any("secret" in repr(entry) for entry in logs)


@pytest.mark.parametrize("renderer", ["console", "json"])
async def test_a_broken_send_of_the_token_never_writes_the_token_to_the_log(renderer):
    """``cannot send the token; reconnecting`` with the renderers structlog's documentation
    configures (and eventbus-tail uses: structlog's defaults): the console's traceback drawn by
    rich, and ``dict_tracebacks``, both show each frame's locals, the frame sent and websockets'
    encoded message among them. The token was written in full (cut at 80 characters) into the
    service's log."""
    ws = BrokenSend()
    consumer, ws, kept = await fed_consumer(1, ws=ws)
    await consumer._on_frame(ws, subscribed(1, 0))  # type: ignore[arg-type]
    ws.breaks = ("auth",)
    token = "eyJhbGciOiJIUzI1NiJ9.secret-part"
    consumer._token_source = lambda: token
    out = io.StringIO()
    processors: list = [structlog.processors.add_log_level]
    if renderer == "console":
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    else:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    before = structlog.get_config()
    structlog.configure(processors=processors, logger_factory=structlog.WriteLoggerFactory(out))
    try:
        await consumer._refresh_later(ws, 0)  # type: ignore[arg-type]
    finally:
        structlog.configure(**before)
    written = out.getvalue()
    assert "cannot send the token; reconnecting" in written
    assert "RuntimeError" in written and "the send broke" in written  # what broke, and where
    assert "_send" in written
    assert "secret" not in written
    assert ws.transport.aborted and consumer._given_up is ws
    await _still_delivers(consumer, ws, kept)


def _expiring_soon() -> str:
    """An ``authenticated`` whose token expires in about two seconds: with a token that is no
    JWT (no ``iat``), its refresh falls due in about one."""
    expires_at = int(time.time()) + 2
    authenticated = {"type": "authenticated", "subject": None, "projects": None}
    return json.dumps(authenticated | {"expires_at": expires_at})


async def test_a_bug_in_the_scheduled_token_refresh_stops_the_consumer_as_any_helpers_does(
    monkeypatch,
):
    """A failure of the refresh task that is not the token function's (those are retried with
    backoff): a bug of the consumer's, as in any of its helper tasks, which stops it. Every
    iterator raises ConsumerClosed, and it is logged once, at error. The refresh scheduled by
    ``authenticated`` ran in a task nobody watched: the exception went unheard (``Task
    exception was never retrieved``, at best, when the task was collected), the connection
    kept its old token until the gateway closed it (4002), and the next refresh broke again."""
    from structlog.testing import capture_logs
    from websockets.asyncio.server import serve

    async def gateway(connection) -> None:
        with contextlib.suppress(Exception):
            async for raw in connection:
                message = json.loads(raw)
                if message["type"] == "auth":
                    await connection.send(_expiring_soon())
                elif message["type"] == "subscribe":
                    await connection.send(subscribed(1, 0).decode())
                    await connection.send(frame(1, 1).decode())

    async with serve(gateway, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        consumer = Consumer(f"ws://127.0.0.1:{port}/", token=lambda: "t")
        plain_send_paced = consumer._send_paced

        async def send_paced(key, message) -> None:
            if key == "auth":
                raise RuntimeError("a bug in the refresh")
            await plain_send_paced(key, message)

        monkeypatch.setattr(consumer, "_send_paced", send_paced)
        with capture_logs() as logs:
            async with consumer:
                events = consumer.events(1)
                async with asyncio.timeout(10):
                    assert (await anext(events)).seq == 1
                    with pytest.raises(ConsumerClosed, match="a bug in the refresh"):
                        await anext(events)
    assert [(e["event"], e["error"]) for e in logs if e["log_level"] == "error"] == [
        ("consumer helper failed", "RuntimeError('a bug in the refresh')"),
        ("consumer stopped", "internal error: RuntimeError('a bug in the refresh')"),
    ]
    (failed,) = [e for e in logs if e["event"] == "consumer helper failed"]
    assert "_refresh_later" in failed["traceback"]  # where it broke
    assert consumer.connects == 1


async def test_the_token_refresh_is_watched_and_cancelled_with_its_connection():
    """The refresh scheduled by ``authenticated`` is one of the consumer's helper tasks
    (watched: see the test above), tied to its connection: when the connection ends (here the
    gateway restarting, 1012) it is cancelled, the next connection schedules its own, and
    ``aclose()`` cancels that one; none is left pending."""
    from websockets.asyncio.server import serve

    async def gateway(connection) -> None:
        with contextlib.suppress(Exception):
            async for raw in connection:
                message = json.loads(raw)
                if message["type"] == "auth":
                    authenticated = {"type": "authenticated", "subject": None, "projects": None}
                    expires_at = int(time.time()) + 600
                    await connection.send(json.dumps(authenticated | {"expires_at": expires_at}))

    policy = ReconnectPolicy(initial=0.05, max=0.1, prompt_max=0.05)
    async with serve(gateway, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        consumer = Consumer(f"ws://127.0.0.1:{port}/", token=lambda: "t", reconnect=policy)
        async with consumer:
            async with asyncio.timeout(10):
                await consumer._authenticated.wait()
            first = consumer._refresh
            assert first is not None and first in consumer._helpers and not first.done()
            for connection in server.connections:
                await connection.close(1012)  # service restart: a prompt reconnect
            async with asyncio.timeout(10):
                await asyncio.wait([first])
                # (cleared as the first connection ended, before its refresh was cancelled)
                await consumer._authenticated.wait()
            assert consumer.connects == 2
            second = consumer._refresh
            assert first.cancelled() and first not in consumer._helpers
            assert second is not None and second in consumer._helpers and not second.done()
        assert second.cancelled() and not consumer._helpers
        assert consumer._failure is None


async def test_a_send_that_fails_on_every_connection_logs_at_error_the_first_and_every_50th():
    """A send failing unexpectedly on every connection (a bug in websockets or a transport that
    no reconnect heals): each connection is dropped and made again with backoff (up to every
    ``max``, 30 s, for as long as it lasts), and an error with its traceback was logged for
    each, for ever. The first is logged at error, then every 50th (with ``failures``, the
    count); the ones between at debug."""
    from structlog.testing import capture_logs

    consumer, ws, _kept = await fed_consumer(1)
    with capture_logs() as logs:
        for _ in range(100):
            ws = BrokenSend()
            ws.breaks = ("subscribe",)
            consumer._ws = consumer._subscribed_on = ws  # type: ignore[assignment]
            assert await consumer._send(ws, {"type": "subscribe", "project_id": 1}) is not None
            assert ws.transport.aborted and consumer._given_up is ws
    sends = [e for e in logs if e["event"] == "cannot send a subscribe; reconnecting"]
    assert [e["failures"] for e in sends] == list(range(1, 101))
    assert [(e["failures"], "exc_info" in e) for e in sends if e["log_level"] == "error"] == [
        (1, True),
        (50, True),
        (100, True),
    ]
    assert {e["log_level"] for e in sends if e["failures"] not in (1, 50, 100)} == {"debug"}


async def test_unexpected_send_failures_are_counted_until_a_connection_is_stable_again(
    monkeypatch,
):
    """End to end, on a local WebSocket server: the subscribe's send breaks on the first two
    connections (an error, then a debug line: the same failure again), works on the third,
    which stays up past ``stable_after``, and breaks again on the fourth: a new failure, after a
    connection that worked, logged at error again. A connection where a send broke is never
    stable: another frame sent on it (the token before a subscribe that breaks) does not end
    the count. The project delivers each event once."""
    from structlog.testing import capture_logs
    from websockets.asyncio.server import serve

    plain_send = consumer_client._Connection.send
    consumer: Consumer | None = None

    async def send(self, message, text=None):
        assert consumer is not None
        if json.loads(message)["type"] == "subscribe" and consumer.connects in (1, 2, 4):
            raise RuntimeError("the send broke")
        return await plain_send(self, message, text=text)

    monkeypatch.setattr(consumer_client._Connection, "send", send)
    subscribes = 0

    async def gateway(connection) -> None:
        nonlocal subscribes
        with contextlib.suppress(Exception):
            async for raw in connection:
                message = json.loads(raw)
                if message["type"] == "auth":
                    await connection.send(AUTHENTICATED)
                elif message["type"] == "subscribe":
                    subscribes += 1
                    if subscribes == 1:
                        await connection.send(subscribed(1, 0).decode())
                        await connection.send(frame(1, 1).decode())
                        await asyncio.sleep(0.3)  # past stable_after
                        await connection.close(1001)
                    else:
                        await connection.send(frame(1, 2).decode())
                        await connection.send(subscribed(1, 2, resumed=True).decode())

    policy = ReconnectPolicy(initial=0.05, max=0.1, stable_after=0.2)
    with capture_logs() as logs:
        async with serve(gateway, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}/"
            async with Consumer(url, token=lambda: "t", reconnect=policy) as consumer:
                events = consumer.events(1)
                async with asyncio.timeout(10):
                    assert [(await anext(events)).seq for _ in range(2)] == [1, 2]
                assert consumer.connects == 5 and consumer._failure is None
    assert [
        (e["log_level"], e["failures"])
        for e in logs
        if e["event"] == "cannot send a subscribe; reconnecting"
    ] == [("error", 1), ("debug", 2), ("error", 1)]


async def test_a_send_that_fails_once_on_a_long_working_connection_is_logged_at_error(
    monkeypatch,
):
    """A send breaks on the first connection (logged at error), and the next one works, up
    past ``stable_after``, until a send breaks on it too (a subscribe of a project followed
    later, days later in production): a new failure after a connection that worked, logged
    at error again with ``failures`` 1, not at debug as the same failure repeated on every
    connection. Before, the count was reset only when a connection ended stable, and one
    that ended by its send breaking never did: after the first failure ever, each sporadic
    one (one per long-lived connection) went to debug, up to the 50th."""
    from structlog.testing import capture_logs
    from websockets.asyncio.server import serve

    plain_send = consumer_client._Connection.send
    consumer: Consumer | None = None

    async def send(self, message, text=None):
        assert consumer is not None
        sent = json.loads(message)
        if sent["type"] == "subscribe" and (
            consumer.connects == 1 or (consumer.connects == 2 and sent["project_id"] == 2)
        ):
            raise RuntimeError("the send broke")
        return await plain_send(self, message, text=text)

    monkeypatch.setattr(consumer_client._Connection, "send", send)

    async def gateway(connection) -> None:
        with contextlib.suppress(Exception):
            async for raw in connection:
                message = json.loads(raw)
                if message["type"] == "auth":
                    await connection.send(AUTHENTICATED)
                elif message["type"] == "subscribe":
                    project_id = message["project_id"]
                    await connection.send(subscribed(project_id, 0).decode())
                    await connection.send(frame(project_id, 1).decode())

    policy = ReconnectPolicy(initial=0.05, max=0.1, stable_after=0.2)
    with capture_logs() as logs:
        async with serve(gateway, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}/"
            async with Consumer(url, token=lambda: "t", reconnect=policy) as consumer:
                first = consumer.events(1)
                async with asyncio.timeout(10):
                    assert (await anext(first)).seq == 1
                assert consumer.connects == 2
                await asyncio.sleep(0.3)  # the connection is up past stable_after
                second = consumer.events(2)
                async with asyncio.timeout(10):
                    assert (await anext(second)).seq == 1
                assert consumer.connects == 3 and consumer._failure is None
    assert [
        (e["log_level"], e["failures"], e["project_id"])
        for e in logs
        if e["event"] == "cannot send a subscribe; reconnecting"
    ] == [("error", 1, 1), ("error", 1, 2)]


async def test_a_bug_in_the_connection_task_never_writes_the_token_to_the_log(monkeypatch):
    """``consumer connection task failed`` (a bug: every iterator raises ConsumerClosed) with
    structlog's default console renderer, whose traceback (rich's) shows each frame's locals:
    the connection task's frames hold the token (``_connect_once``, ``_session``). It was
    written into the log."""
    from websockets.asyncio.server import serve

    async def broken(self, ws) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Consumer, "_subscribe_all", broken)

    async def gateway(connection) -> None:
        with contextlib.suppress(Exception):
            async for _message in connection:
                pass

    out = io.StringIO()
    before = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        logger_factory=structlog.WriteLoggerFactory(out),
    )
    try:
        async with serve(gateway, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            token = "eyJhbGciOiJIUzI1NiJ9.secret-part"
            async with Consumer(f"ws://127.0.0.1:{port}/", token=lambda: token) as consumer:
                with pytest.raises(ConsumerClosed, match="internal error"):
                    async with asyncio.timeout(10):
                        await anext(consumer.events(1))
    finally:
        structlog.configure(**before)
    written = out.getvalue()
    assert "consumer connection task failed" in written
    assert "RuntimeError: a bug" in written and "in broken" in written  # what, and where
    assert "secret" not in written


async def test_unavailable_subscribes_are_retried_with_backoff_per_project():
    consumer, ws, _subscription = await fed_consumer(1)  # kept: a dropped one unsubscribes
    consumer._random = lambda: 1.0  # the whole cap: the delays are the caps
    delays: list[float] = []

    async def record(ws, state, delay: float) -> None:
        delays.append(delay)

    consumer._resubscribe_later = record  # type: ignore[method-assign]
    error = {"type": "error", "code": "unavailable", "message": "redis", "project_id": 1}
    for _ in range(7):
        await consumer._on_frame(ws, json.dumps(error).encode())  # type: ignore[arg-type]
        await asyncio.sleep(0)
        consumer._states[1].subscribe_message()  # (the retry's subscribe)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    await consumer._on_frame(ws, subscribed(1, 0))  # type: ignore[arg-type]
    await consumer._on_frame(ws, json.dumps(error).encode())  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert delays[-1] == 1.0  # a subscribed answering the retry starts the backoff over


async def test_a_gateway_alternating_unsolicited_subscribed_and_unavailable_is_not_a_warning_each():
    """A gateway (buggy or hostile) sending ``subscribed`` and ``unavailable`` by turns, answering
    no subscribe of ours: each ``subscribed`` started the backoff over, so every ``unavailable``
    was the first failure again, a warning each (about once a second per project, for ever).
    Only a ``subscribed`` answering a subscribe in flight starts it over now: the warnings come
    every tenth failure, as for a gateway that keeps refusing."""
    from structlog.testing import capture_logs

    consumer, ws, _subscription = await fed_consumer(1)
    await consumer._on_frame(ws, subscribed(1, 0))  # type: ignore[arg-type]

    async def record(ws, state, delay: float) -> None:
        pass

    consumer._resubscribe_later = record  # type: ignore[method-assign]
    error = {"type": "error", "code": "unavailable", "message": "redis", "project_id": 1}
    with capture_logs() as logs:
        for _ in range(20):
            await consumer._on_frame(ws, json.dumps(error).encode())  # type: ignore[arg-type]
            await asyncio.sleep(0)
            await consumer._on_frame(ws, subscribed(1, 0, resumed=True))  # type: ignore[arg-type]
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e.get("attempts") for e in warnings] == [1, 11], warnings


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_any_bytes_decode_to_a_message_or_a_frame_error(data: bytes):
    try:
        decode_frame(data)
    except FrameError:
        pass


async def test_a_foreign_frame_in_every_replay_ends_in_a_resync_not_a_busy_loop():
    consumer, ws, subscription = await fed_consumer(1)
    await consumer._on_frame(ws, subscribed(1, 3))  # type: ignore[arg-type]
    consumer._states[1].subscribe_message()  # a resume from (e1, 3); entry 4 is b'{"x":1}'
    for _ in range(2):
        for raw in (b'{"x":1}', frame(1, 5), subscribed(1, 5, resumed=True)):
            await consumer._on_frame(ws, raw)  # type: ignore[arg-type]
    assert ws.sent == [{"type": "subscribe", "project_id": 1, "epoch": EPOCH, "after": 3}]
    assert drain(subscription) == [Resync(1, ResyncReason.HISTORY_CORRUPT, EPOCH, 5)]
    await consumer._on_frame(ws, frame(1, 6))  # type: ignore[arg-type]
    assert [d.seq for d in drain(subscription)] == [6]


def control(
    kind: str, project_id: int, epoch: object, seq: object, resumed: bool, tag: object = None
) -> bytes:
    message = {"type": kind, "project_id": project_id, "epoch": epoch, "seq": seq}
    if tag is not None:
        message["tag"] = tag
    if kind == "subscribed":
        message["resumed"] = resumed
    else:
        message["reason"] = "epoch_changed"
    return json.dumps(message).encode()


hostile_frames = st.lists(
    st.one_of(
        st.tuples(
            st.just("event"),
            st.integers(1, 2),
            st.one_of(st.integers(-2, 12), st.sampled_from([2**53, 2**63, 10**20])),
            st.just(False),
        ),
        st.tuples(
            st.sampled_from(["subscribed", "resync_required"]),
            st.integers(1, 2),
            st.tuples(
                st.sampled_from(["e1", "e2", "", "a b", "x" * 65, "e\n"]),
                st.sampled_from([-5, -1, 0, 3, 9, 2**53 - 1, 2**53, 2**63]),
                st.sampled_from([None, "0123456789abcdef", "0123456789ABCDEF", "0" * 17, ""]),
            ),
            st.booleans(),
        ),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(hostile_frames)
@example([("subscribed", 1, ("e1", -5, None), False), ("event", 1, -4, False)])
@example(
    [("subscribed", 1, ("e1", 3, None), False), ("resync_required", 1, ("a b", 2**63, None), False)]
)
@example([("subscribed", 1, ("e1", 2**53 - 1, None), False), ("event", 1, 2**53, False)])
@example([("subscribed", 1, ("e1", 3, "0" * 17), False), ("event", 1, 5, False)])
async def test_whatever_a_gateway_sends_items_are_in_order_once_with_cursors_it_accepts(
    frames: list,
):
    """A hostile or broken gateway's frames: per project, each delivery is the one after the
    item before it (after a Resync: its seq + 1), never a repeat or a skip; and every cursor the
    caller is handed (and would save) is one a gateway accepts. A ``subscribed`` or
    ``resync_required`` with an epoch or seq outside the protocol (``"a b"``, -5, 2**63) was
    taken as the cursor: deliveries of seq -4, and a cursor that, saved, refused every restart.
    Every subscribe the consumer sends is one the gateway accepts (a malformed tag it was given
    is not sent back)."""
    consumer, ws, subscription = await fed_consumer(1, 2)
    for kind, project_id, what, resumed in frames:
        if kind == "event":
            blocker_id = abs(what) % 1000 + 1
            await consumer._on_frame(ws, frame(project_id, what, blocker_id))  # type: ignore[arg-type]
        else:
            await consumer._on_frame(ws, control(kind, project_id, *what, resumed))  # type: ignore[arg-type]
    items = drain(subscription)
    last: dict[int, Cursor] = {}
    for item in items:
        assert acceptable(item.cursor), item
        previous = last.get(item.project_id)
        if isinstance(item, Delivery) and previous is not None:
            assert item.cursor == (previous.epoch, previous.seq + 1), (previous, item)
        last[item.project_id] = item.cursor
    for project_id in (1, 2):
        assert consumer.cursor(project_id) is None or acceptable(consumer.cursor(project_id))
    for message in ws.sent:
        decode_client_message(json.dumps(message))  # (ProtocolError: refused)


@pytest.mark.parametrize("top", [3, 2**53 - 1])
@pytest.mark.parametrize("seq", [2**53, 2**63, 10**20])
async def test_an_event_numbered_beyond_what_a_cursor_holds_is_ignored_never_the_cursor(
    top: int, seq: int
):
    """An event frame whose seq no cursor can hold (above 2**53-1: a broken gateway's, a
    foreign stream entry relayed as it is) was taken as the next event after a cursor at
    2**53-1, or, after the gap repairs, as a Resync(history_corrupt) to just before it: the
    caller was handed that cursor and saved it, the next subscribe from it was refused (an
    error naming no project: the project silent for good) and every restart stopped on the
    stored cursor. It is ignored, as one without a seq (eventbus.js: Number.isSafeInteger)."""
    consumer, ws, subscription = await fed_consumer(1)
    await consumer._on_frame(ws, subscribed(1, top))  # type: ignore[arg-type]
    for _ in range(3):  # a gap, repaired twice, would be surfaced the third time
        for raw in (frame(1, seq, 5), b'{"type":"x","project_id":1,"seq":%d}' % seq):
            await consumer._on_frame(ws, raw)  # type: ignore[arg-type]
        if ws.sent:
            ws.sent.clear()
            await consumer._on_frame(ws, subscribed(1, top, resumed=True))  # type: ignore[arg-type]
    assert drain(subscription) == []
    assert consumer.cursor(1) == Cursor(EPOCH, top)
    if top < 2**53 - 1:
        await consumer._on_frame(ws, frame(1, top + 1))  # type: ignore[arg-type]
        assert [d.cursor for d in drain(subscription)] == [Cursor(EPOCH, top + 1)]


async def test_a_flood_of_frames_the_gateway_never_sends_is_counted_not_logged_each():
    """Each frame the gateway never sends (not a protocol message, an event without a valid
    seq, an invalid cursor, an error answering nothing of ours) was logged, a line each, at
    warning or error: a broken or hostile gateway sending them as fast as it can wrote tens of
    thousands of lines a second into the service's logs. They are counted
    (``stats.ignored``) and logged once, then every 1,000th, with the count."""
    from structlog.testing import capture_logs

    consumer, ws, _subscription = await fed_consumer(1)
    await consumer._on_frame(ws, subscribed(1, 3))  # type: ignore[arg-type]
    garbage = [
        b"not json",
        frame(1, 4)[: -len(b',"seq":4}')] + b"}",
        control("subscribed", 1, "a b", 5, True),
        error_frame("invalid_message").encode(),
    ]
    with capture_logs() as logs:
        for _ in range(1000):
            for raw in garbage:
                await consumer._on_frame(ws, raw)  # type: ignore[arg-type]
    assert consumer.stats.ignored == 4000
    assert 4 <= len(logs) <= 8, [entry["event"] for entry in logs]
    await consumer._on_frame(ws, frame(1, 4))  # type: ignore[arg-type]
    assert [d.seq for d in drain(_subscription)] == [4]


async def test_an_event_frame_without_seq_is_ignored_not_fatal():
    consumer, ws, subscription = await fed_consumer(1)
    await consumer._on_frame(ws, subscribed(1, 0))  # type: ignore[arg-type]
    no_seq = frame(1, 1)[: -len(b',"seq":1}')] + b"}"
    await consumer._on_frame(ws, no_seq)  # type: ignore[arg-type]
    await consumer._on_frame(ws, frame(1, 1))  # type: ignore[arg-type]
    assert [d.seq for d in drain(subscription)] == [1]


async def test_a_gap_that_repairs_never_fill_ends_in_a_resync_not_an_endless_loop():
    """A gateway whose live events skip a seq that its history does not have (its answer to the
    repair says the top is the cursor): every event after the gap was a gap again, answered by
    another subscribe, for ever: nothing delivered, nothing surfaced. As in eventbus.js, after
    two repairs from the same cursor the gap is a Resync(history_corrupt) to just before the
    event, which is then delivered."""
    consumer, ws, subscription = await fed_consumer(1)
    await consumer._on_frame(ws, subscribed(1, 3))  # type: ignore[arg-type]
    for seq in (5, 6, 7, 8):
        await consumer._on_frame(ws, frame(1, seq))  # type: ignore[arg-type]
        if ws.sent:  # a repair: the gateway replays nothing and says the top is 3
            ws.sent.clear()
            await consumer._on_frame(ws, subscribed(1, 3, resumed=True))  # type: ignore[arg-type]
    items = drain(subscription)
    assert items[0] == Resync(1, ResyncReason.HISTORY_CORRUPT, EPOCH, 6)
    assert [d.seq for d in items[1:]] == [7, 8]
    assert consumer.stats.gaps == 2 and consumer.stats.resyncs == 1


async def test_a_catch_up_page_with_a_gap_that_never_fills_ends_in_a_resync():
    """The same gap in every catch-up page (an entry numbered wrongly, past more than one
    replay): the page stopped there, the resubscribe was too far behind again, and the next
    catch-up read the same page, for ever. After two repairs from one cursor it is surfaced."""
    consumer, ws, subscription = await fed_consumer(1)
    await consumer._on_frame(ws, subscribed(1, 5))  # type: ignore[arg-type]
    consumer._states[1].subscribe_message()  # a resume from (e1, 5)

    async def page(project_id: int, cursor: Cursor) -> PollResponse:
        # The entry after 6 says it is 99.
        frames = [msgspec.Raw(frame(1, seq)) for seq in (6, 99) if seq > cursor.seq]
        return PollResponse(1, EPOCH, 5000, frames, None, bool(frames))

    consumer._poll = page  # type: ignore[method-assign]
    too_far = {"type": "resync_required", "project_id": 1, "reason": "too_far_behind"}
    too_far_raw = json.dumps(too_far | {"epoch": EPOCH, "seq": 5000}).encode()
    for _ in range(3):  # the resume, and two resubscribes after pages that stopped at the gap
        await consumer._on_frame(ws, too_far_raw)  # type: ignore[arg-type]
        await asyncio.gather(*consumer._helpers)
        await consumer._on_frame(ws, subscribed(1, 5000))  # type: ignore[arg-type]
        assert [m["type"] for m in ws.sent] == ["subscribe"]
        ws.sent.clear()
    items = drain(subscription)
    assert [type(i).__name__ for i in items] == ["Delivery", "Resync", "Delivery"]
    assert items[1] == Resync(1, ResyncReason.HISTORY_CORRUPT, EPOCH, 98)
    assert items[2].seq == 99


@pytest.mark.parametrize("answer", ["duplicates", "empty"])
async def test_a_catch_up_whose_pages_bring_nothing_new_surfaces_the_resync(answer: str):
    """A gateway whose pages hold nothing after the cursor (it ignores ``after`` and sends the
    first events again, with ``more``; or no events), while its WebSocket says the cursor is
    too far behind: the same page was asked for again 100,000 times in a row, as fast as the
    gateway answered, and then again for every resubscribe's too_far_behind, for ever; the
    project silent (its WebSocket events are dropped during a catch-up). A page that moves
    nothing ends the pages (as eventbus.js), and a catch-up that moved nothing is one that
    cannot be read: the gateway's Resync(too_far_behind) is surfaced."""
    consumer, ws, subscription = await fed_consumer(1)
    await consumer._on_frame(ws, subscribed(1, 5))  # type: ignore[arg-type]
    consumer._states[1].subscribe_message()  # a resume from (e1, 5)
    asked: list[Cursor] = []

    async def page(project_id: int, cursor: Cursor) -> PollResponse:
        asked.append(cursor)
        if len(asked) > 1000:
            raise OSError("asked for the same page 1000 times")  # (ends the old loop)
        frames = [msgspec.Raw(frame(1, seq)) for seq in (1, 2, 3)] if answer == "duplicates" else []
        return PollResponse(1, EPOCH, 5000, frames, None, answer == "duplicates")

    consumer._poll = page  # type: ignore[method-assign]
    too_far = {"type": "resync_required", "project_id": 1, "reason": "too_far_behind"}
    await consumer._on_frame(ws, json.dumps(too_far | {"epoch": EPOCH, "seq": 5000}).encode())  # type: ignore[arg-type]
    await asyncio.gather(*consumer._helpers)
    assert asked == [Cursor(EPOCH, 5)]
    assert drain(subscription) == [Resync(1, ResyncReason.TOO_FAR_BEHIND, EPOCH, 5000)]
    assert consumer.cursor(1) == Cursor(EPOCH, 5000)


@pytest.mark.parametrize("catch_up", [True, False])
async def test_too_far_behind_naming_the_cursor_is_no_resync(catch_up: bool):
    """The gateway handles a resubscribe after the messages before it (each may wait for Redis):
    meanwhile the project's live events keep coming, and the next ones are delivered. When more
    than ``--max-replay`` came so, the gateway, which unsubscribes and then reads its top, says
    ``too_far_behind`` with a top the live events already brought the cursor to: nothing is
    missing. The catch-up's pages then held nothing after the cursor, and the consumer told its
    caller that events were lost (Resync); without catch-up, likewise."""
    consumer, ws, subscription = await fed_consumer(1)
    consumer.catch_up = catch_up
    await consumer._on_frame(ws, subscribed(1, 5))  # type: ignore[arg-type]
    consumer._states[1].subscribe_message()  # a resume from (e1, 5), not yet handled

    async def page(project_id: int, cursor: Cursor) -> PollResponse:
        frames = [msgspec.Raw(frame(1, seq)) for seq in range(cursor.seq + 1, 21)]
        return PollResponse(1, EPOCH, 20, frames, None, False)

    consumer._poll = page  # type: ignore[method-assign]
    for seq in range(6, 21):  # live, before the gateway handles the subscribe (--max-replay 10)
        await consumer._on_frame(ws, frame(1, seq))  # type: ignore[arg-type]
    too_far = {"type": "resync_required", "project_id": 1, "reason": "too_far_behind"}
    await consumer._on_frame(ws, json.dumps(too_far | {"epoch": EPOCH, "seq": 20}).encode())  # type: ignore[arg-type]
    await asyncio.gather(*consumer._helpers)
    await consumer._on_frame(ws, subscribed(1, 20))  # type: ignore[arg-type]
    await asyncio.gather(*consumer._helpers)
    await consumer._on_frame(ws, frame(1, 21))  # type: ignore[arg-type]
    items = drain(subscription)
    assert [(type(i).__name__, i.seq) for i in items] == [("Delivery", s) for s in range(6, 22)]
    assert consumer.cursor(1) == Cursor(EPOCH, 21)


@pytest.mark.parametrize("top", [1, 0])
async def test_the_feeds_resync_to_where_a_catch_ups_page_took_the_cursor_is_no_second_resync(
    top: int,
):
    """Seed 12 of the walk (py-a project 3). A resume too far behind is caught up by pages, and
    a page says the epoch changed (the project's keys were deleted): Resync(epoch_changed e2:1)
    is surfaced there, and the consumer resubscribes from e2:1. The gateway's own feed learns of
    the new epoch later (its pub/sub link was down) and tells its live connections so; this one
    still stood at the old epoch there, until the gateway reads its subscribe. Its
    resync_required names where the cursor already stands, the same event (tag): nothing
    happened since for the caller to reload, and it was surfaced a second time. Likewise at
    e2:0, the new epoch still empty: no event there, no tag on either side."""
    consumer, ws, subscription = await fed_consumer(1)
    await consumer._on_frame(ws, subscribed(1, 5))  # type: ignore[arg-type]
    consumer._states[1].subscribe_message()  # a resume from (e1, 5)
    tag = event_tag(frame(1, 1)) if top else None
    changed = {"type": "resync_required", "project_id": 1, "reason": "epoch_changed"}
    changed |= {"epoch": "e2", "seq": top} | ({"tag": tag} if tag else {})

    async def page(project_id: int, cursor: Cursor) -> PollResponse:
        return PollResponse(1, "e2", top, [], msgspec.convert(changed, ResyncRequired))

    consumer._poll = page  # type: ignore[method-assign]
    await consumer._on_frame(ws, too_far_behind(1, 5000))  # type: ignore[arg-type]
    await consumer._on_frame(ws, subscribed(1, 5000))  # type: ignore[arg-type]
    await asyncio.gather(*consumer._helpers)
    resubscribe = {"type": "subscribe", "project_id": 1, "epoch": "e2", "after": top}
    assert ws.sent[-1] == resubscribe | ({"tag": tag} if tag else {})
    # The feed's resync, sent before the gateway read that subscribe; then its answer.
    await consumer._on_frame(ws, json.dumps(changed).encode())  # type: ignore[arg-type]
    await consumer._on_frame(ws, subscribed(1, top, "e2", resumed=True))  # type: ignore[arg-type]
    await consumer._on_frame(ws, frame(1, top + 1))  # type: ignore[arg-type]
    items = drain(subscription)
    assert [(type(i).__name__, i.epoch, i.seq) for i in items] == [
        ("Resync", "e2", top),
        ("Delivery", "e2", top + 1),
    ]
    assert items[0] == Resync(1, ResyncReason.EPOCH_CHANGED, "e2", top, tag)
    assert consumer.cursor(1) == Cursor("e2", top + 1)


async def test_a_catch_up_page_takes_only_events_of_its_own_project():
    """A page is the answer for one project: an event in it naming another one (a broken
    gateway's page, a foreign entry it relayed) was delivered as this project's event of that
    seq, and this project's real event of the seq then dropped as a duplicate, silently (and
    an unknown type of another project kept this one's place likewise). As in eventbus.js, it
    is skipped: this project's events are delivered, the place it took is asked for again."""
    consumer, ws, subscription = await fed_consumer(1)
    await consumer._on_frame(ws, subscribed(1, 5))  # type: ignore[arg-type]
    consumer._states[1].subscribe_message()  # a resume from (e1, 5)

    async def page(project_id: int, cursor: Cursor) -> PollResponse:
        if cursor.seq == 5:  # project 2's 6th event, then this project's 6th and 7th
            others = [frame(2, 6, 999), b'{"type":"x","project_id":2,"seq":7}']
            frames = [*others, frame(1, 6), frame(1, 7)]
        else:
            frames = [frame(1, seq) for seq in range(cursor.seq + 1, 9)]
        return PollResponse(1, EPOCH, 8, [msgspec.Raw(f) for f in frames], None, False)

    consumer._poll = page  # type: ignore[method-assign]
    too_far = {"type": "resync_required", "project_id": 1, "reason": "too_far_behind"}
    await consumer._on_frame(ws, json.dumps(too_far | {"epoch": EPOCH, "seq": 5000}).encode())  # type: ignore[arg-type]
    await asyncio.gather(*consumer._helpers)
    items = drain(subscription)
    assert [(type(i).__name__, i.seq) for i in items] == [("Delivery", 6), ("Delivery", 7)]
    assert all(i.event.project_id == 1 and i.event.blocker_id != 999 for i in items)
    assert consumer.cursor(1) == Cursor(EPOCH, 7)


async def test_a_catch_up_whose_pages_cannot_be_read_surfaces_the_resync():
    consumer, ws, subscription = await fed_consumer(1)
    await consumer._on_frame(ws, subscribed(1, 5))  # type: ignore[arg-type]
    consumer._states[1].subscribe_message()  # a resume from (e1, 5)...

    async def unreachable(project_id: int, cursor: Cursor) -> PollResponse:
        raise OSError("connection refused")

    consumer._poll = unreachable  # type: ignore[method-assign]
    await consumer._on_frame(ws, too_far_behind(1, 5000))  # type: ignore[arg-type]
    await asyncio.gather(*consumer._helpers)
    assert drain(subscription) == [Resync(1, ResyncReason.TOO_FAR_BEHIND, EPOCH, 5000)]
    assert consumer.stats.catch_ups == 1 and consumer.stats.resyncs == 1
    assert consumer.cursor(1) == Cursor(EPOCH, 5000)


class LocalHttpServer:
    """A server on a free local port for the duration of ``async with`` (which gives its URL);
    subclasses answer each connection in ``_answer``."""

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc_info: object) -> None:
        self.server.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


async def trickle_until_closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, byte: bytes
) -> None:
    """Send ``byte`` every 0.1 s or so until the client closes the connection."""
    while True:
        writer.write(byte)
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                return


class TricklingServer(LocalHttpServer):
    """An HTTP server that answers ``header`` and then a byte every 0.1 s, until its client goes
    away (``ended`` is set then)."""

    def __init__(self, header: bytes) -> None:
        self.header = header
        self.started: list[float] = []
        self.answering = asyncio.Event()
        self.ended = asyncio.Event()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.ended.clear()
        self.started.append(asyncio.get_running_loop().time())
        await reader.readuntil(b"\r\n\r\n")
        self.answering.set()
        writer.write(self.header)
        with contextlib.suppress(ConnectionError):
            await trickle_until_closed(reader, writer, b" ")
        self.ended.set()
        writer.close()


async def catching_up_from(url: str, token: str | None = None):
    """A consumer of project 1 at ``(EPOCH, 5)``, told ``too_far_behind`` to 5000 by its gateway
    after a resume: it catches up by pages from ``url`` (each page within 0.5 s)."""
    consumer, ws, subscription = await fed_consumer(1)
    consumer._token_source = token
    consumer.http_url = url
    consumer._poll_timeout = 0.5
    await consumer._on_frame(ws, subscribed(1, 5))  # type: ignore[arg-type]
    consumer._states[1].subscribe_message()
    await consumer._on_frame(ws, too_far_behind(1, 5000))  # type: ignore[arg-type]
    return consumer, subscription


@contextlib.contextmanager
def a_resolver_that_does_not_answer(monkeypatch: pytest.MonkeyPatch):
    """Host name lookups (``socket.getaddrinfo``) block until the ``with`` ends, as with a DNS
    server that never answers; yields an Event set once a lookup is waiting."""
    waiting, released = threading.Event(), threading.Event()

    def getaddrinfo(*args: object, **kwargs: object) -> list:
        waiting.set()
        released.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "the resolver did not answer")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        yield waiting
    finally:
        released.set()


async def test_a_catch_up_page_whose_host_name_lookup_hangs_ends_at_open_timeout(monkeypatch):
    """The page's deadline shut its sockets down, but a lookup has none: a resolver that did not
    answer held the catch-up (and the project silent) for as long as the resolver's own
    timeouts, which the consumer does not set. Now the page ends at ``open_timeout`` (0.5 s
    here) all the same, and the resync is surfaced."""
    with a_resolver_that_does_not_answer(monkeypatch) as waiting:
        consumer, subscription = await catching_up_from("http://gateway.example:8765")
        async with asyncio.timeout(5) as bound:
            await asyncio.gather(*consumer._helpers)
        assert not bound.expired() and waiting.is_set()
        assert drain(subscription) == [Resync(1, ResyncReason.TOO_FAR_BEHIND, EPOCH, 5000)]


def test_asyncio_run_does_not_wait_for_a_page_whose_host_name_lookup_hangs(monkeypatch):
    """A program's ``asyncio.run`` waits for the default executor's threads on exit, and the
    page's lookup ran in one: a consumer's program did not end while the resolver hung."""
    from consumer.pages import read_page

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await read_page("http://gateway.example:8765/v1/projects/1/events", None, 0.2)

    with a_resolver_that_does_not_answer(monkeypatch):
        program = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        program.start()
        program.join(10)
        assert not program.is_alive()


@pytest.mark.parametrize("outcome", ["a page", "an HTTP error"])
async def test_a_page_caller_cancelled_as_the_answer_arrives_is_cancelled(monkeypatch, outcome):
    """The consumer closing (its catch-up cancelled) just as a page's answer reaches the loop:
    the caller is cancelled all the same. Python 3.11's ``asyncio.wait_for`` returned the page
    (or raised its HTTP error) instead, the cancellation swallowed: the catch-up went on after
    ``aclose``, asking for more pages, or surfacing a resync for a page that merely failed."""
    import consumer.lookups as lookups
    import consumer.pages as pages

    def get(self, url: str, token: str | None, timeout: float) -> bytes:
        if outcome == "an HTTP error":
            raise urllib.error.HTTPError(url, 500, "Internal Server Error", {}, None)  # type: ignore[arg-type]
        return b"{}"

    settle = lookups.settle_threadsafe
    caller: list[asyncio.Task[bytes]] = []

    class CancelledWithTheAnswer:
        """The loop, where the callback that settles the answer cancels the caller right
        after (in the same callback: nothing of the loop runs between them)."""

        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self.loop = loop

        def call_soon_threadsafe(self, settle_answer) -> None:
            def settle_then_cancel() -> None:
                settle_answer()
                caller[0].cancel()  # aclose

            self.loop.call_soon_threadsafe(settle_then_cancel)

    def settle_then_cancel(loop, answer, body, error) -> None:
        settle(CancelledWithTheAnswer(loop), answer, body, error)

    monkeypatch.setattr(pages.PageRequest, "get", get)
    monkeypatch.setattr(lookups, "settle_threadsafe", settle_then_cancel)
    caller.append(asyncio.create_task(pages.read_page("http://gateway.example:8765/p", None, 5)))
    with pytest.raises(asyncio.CancelledError):
        await caller[0]


@pytest.mark.parametrize(
    "header",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 99999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Slow: ",  # the headers never end
    ],
    ids=["body", "headers"],
)
async def test_a_catch_up_page_trickled_by_the_server_ends_at_open_timeout(header: bytes):
    """``open_timeout`` bounded each read of a catch-up page, not the page: a server sending a
    byte now and then held the catch-up, and the project (its WebSocket events are dropped
    meanwhile) silent, for ever. Now the page ends at the timeout, and the resync is surfaced."""
    server = TricklingServer(header)
    async with server as url:
        consumer, subscription = await catching_up_from(url)
        async with asyncio.timeout(5):
            await asyncio.gather(*consumer._helpers)
            await server.ended.wait()
        assert asyncio.get_running_loop().time() - server.started[0] < 2
        assert drain(subscription) == [Resync(1, ResyncReason.TOO_FAR_BEHIND, EPOCH, 5000)]
        # Closing the consumer while a page is read ends the request at once too (its thread
        # no longer reads on: asyncio.run waits for it before it returns).
        consumer._poll_timeout = 60
        consumer._states[1].begin_catch_up()
        server.answering.clear()
        consumer._spawn(consumer._poll(1, Cursor(EPOCH, 5000)))
        async with asyncio.timeout(5):
            await server.answering.wait()
            await consumer.aclose()
            await server.ended.wait()
        assert asyncio.get_running_loop().time() - server.started[1] < 2


class RefusingServer(LocalHttpServer):
    """An HTTP server that answers the first ``refusals`` requests 503 (``Retry-After`` and a
    JSON ``error`` of a draining gateway), and every later one ``page``."""

    def __init__(self, refusals: int, retry_after: bytes, page: bytes) -> None:
        self.refusals = refusals
        self.retry_after = retry_after
        self.page = page
        self.requests: list[tuple[float, bytes]] = []

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append((asyncio.get_running_loop().time(), head.split(b"\r\n")[0]))
        if len(self.requests) <= self.refusals:
            body = b'{"error":"draining","message":"reconnect elsewhere"}'
            status = b"503 Service Unavailable\r\nRetry-After: " + self.retry_after
        else:
            body, status = self.page, b"200 OK"
        writer.write(
            b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, len(body), body)
        )
        await writer.drain()
        writer.close()


@pytest.mark.parametrize("retry_after", [b"1", b"\xb2", b"99999999999"])
async def test_a_catch_up_page_answered_503_is_asked_again_from_the_same_cursor(
    retry_after: bytes,
):
    """A catch-up page refused with 503 (the pod drains or is full, or Redis is away: the
    next request goes to another pod) surfaced the gateway's Resync(too_far_behind) as if the
    history could not be read: the application reloaded its state although every event was
    still there. Now the same page is asked again, from the same cursor, after Retry-After (when
    it is a number of seconds) or the next backoff delay, whichever is longer, and never longer
    than the policy's max: the events arrive in order, nothing is surfaced."""
    page = PollResponse(1, EPOCH, 8, [msgspec.Raw(frame(1, seq)) for seq in (6, 7, 8)], None, False)
    server = RefusingServer(2, retry_after, msgspec.json.encode(page))
    async with server as url:
        consumer, ws, subscription = await fed_consumer(1)
        consumer.http_url = url
        consumer.policy = ReconnectPolicy(initial=0.2, max=1.5)
        consumer._random = lambda: 0.5  # backoff delays 0.1, then 0.2
        await consumer._on_frame(ws, subscribed(1, 5))  # type: ignore[arg-type]
        consumer._states[1].subscribe_message()  # a resume from (e1, 5)...
        await consumer._on_frame(ws, too_far_behind(1, 5000))  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            await asyncio.gather(*consumer._helpers)
    items = drain(subscription)
    assert [(type(i).__name__, i.seq) for i in items] == [("Delivery", s) for s in (6, 7, 8)]
    assert consumer.cursor(1) == Cursor(EPOCH, 8)
    assert consumer.stats.page_retries == 2 and consumer.stats.resyncs == 0
    times = [at for at, _ in server.requests]
    targets = {line for _, line in server.requests}
    assert len(times) == 3 and len(targets) == 1, server.requests  # the same page each time
    waits = [later - earlier for earlier, later in itertools.pairwise(times)]
    if retry_after == b"1":
        assert all(0.95 < wait < 1.4 for wait in waits), waits  # Retry-After: 1 s
    elif retry_after == b"\xb2":
        assert all(wait < 0.5 for wait in waits), waits  # not a number: the backoff's
    else:
        assert all(1.45 < wait < 1.9 for wait in waits), waits  # the policy's max
    # The catch-up ended: once the gateway answers the resume that led to it, the project
    # resubscribes from where the page left it.
    await consumer._on_frame(ws, subscribed(1, 5000))  # type: ignore[arg-type]
    assert ws.sent[-1] == {
        "type": "subscribe",
        "project_id": 1,
        "epoch": EPOCH,
        "after": 8,
        "tag": event_tag(frame(1, 8)),
    }


class RecordingServer(LocalHttpServer):
    """An HTTP server that records each request's head and answers ``answer`` (``{url}`` in it
    is ``target``, set later), or, without one, writes a byte every 0.1 s until its client goes
    away (an FTP server's greeting that never ends)."""

    def __init__(self, answer: bytes | None = None) -> None:
        self.answer = answer
        self.target = ""
        self.heads: list[bytes] = []

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            if self.answer is None:
                await trickle_until_closed(reader, writer, b"2")
            else:
                self.heads.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(self.answer.replace(b"{url}", self.target.encode()))
                await writer.drain()
        writer.close()


@pytest.mark.parametrize("scheme", ["http", "ftp"])
async def test_a_catch_up_page_answered_with_a_redirect_is_not_followed(scheme: str):
    """urllib followed a page's redirect anywhere, with the token: to another host or port, to
    plain http (the ``Authorization`` header went along, a bearer token handed to whoever the
    Location names), and to ``ftp://``, whose connection the page's deadline does not reach (a
    server trickling its greeting held the catch-up, and the project, silent for ever). The
    gateway's polling endpoint never redirects: a redirect is an answer that cannot be read,
    and the gateway's resync is surfaced."""
    elsewhere = RecordingServer(None if scheme == "ftp" else b"HTTP/1.1 200 OK\r\n\r\n{}")
    redirecting = RecordingServer(
        b"HTTP/1.1 302 Found\r\nLocation: {url}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    async with elsewhere as target, redirecting as url:
        redirecting.target = target.replace("http", scheme, 1) + "/v1/projects/1/events"
        consumer, subscription = await catching_up_from(url, token="a-secret-token")
        async with asyncio.timeout(5):
            await asyncio.gather(*consumer._helpers)
        assert drain(subscription) == [Resync(1, ResyncReason.TOO_FAR_BEHIND, EPOCH, 5000)]
        assert b"a-secret-token" in redirecting.heads[0]
        assert elsewhere.heads == []  # the token went nowhere else
        await consumer.aclose()


@pytest.mark.parametrize("retry_after", ["\u00b2", "99999999999", "3"])
async def test_a_refused_handshakes_retry_after_neither_kills_nor_freezes_the_consumer(
    retry_after: str,
):
    """Retry-After is read as ISO-8859-1: "\u00b2" passed str.isdigit and float() raised
    ValueError out of the connection task, which stopped the consumer for good (ConsumerClosed);
    and any number was waited, 99999999999 s included. Now only ASCII digits count, and the wait
    is at most the reconnect policy's max."""

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: %s\r\nContent-Length: 0\r\n\r\n"
            % retry_after.encode("latin-1")
        )
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    consumer = Consumer(f"ws://127.0.0.1:{port}/", reconnect=ReconnectPolicy(max=4.0))
    try:
        delay = await consumer._connect_once()
    finally:
        server.close()
    assert 0 <= delay <= 4.0
    assert delay == 3.0 or retry_after != "3"


async def test_a_handshake_answered_with_a_redirect_is_not_followed():
    """websockets follows a handshake's redirect to any host, and the consumer then sent its
    token, in the first frame, to whatever the Location named. The gateway never redirects
    (nor do browsers follow one for eventbus.js): a redirect is a refused handshake, retried
    with backoff, and the token goes nowhere else."""
    from websockets.asyncio.server import serve

    received: list[object] = []

    async def elsewhere(connection) -> None:
        received.append(await connection.recv())

    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % target)
        writer.close()

    async with serve(elsewhere, "127.0.0.1", 0) as other:
        target = b"ws://127.0.0.1:%d/" % other.sockets[0].getsockname()[1]
        server = await asyncio.start_server(redirect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        consumer = Consumer(f"ws://127.0.0.1:{port}/", token="a-secret-token", random=lambda: 0.5)
        try:
            delay = await consumer._connect_once()
        finally:
            server.close()
            await consumer.aclose()
    assert received == [] and consumer.connects == 0
    assert delay == 0.5  # the backoff's


@pytest.mark.parametrize("code", [1001, 1012, 4008])
async def test_a_gateway_closing_each_new_connection_for_a_prompt_reconnect_gets_backoff(code: int):
    """A drain (1012), going away (1001) or slow consumer (4008) reconnects at once (0-0.5 s):
    the connection lost is one the gateway had accepted. A gateway that closes every connection
    so before it ever authenticates it (a broken pod behind the load balancer, a proxy) was
    connected to two to ten times a second for ever, a token minted each time; eventbus.js
    reconnects promptly only from a live connection. Now such a close is a failed attempt, with
    backoff; after ``authenticated`` it is still prompt."""
    from websockets.asyncio.server import serve

    authenticate = False

    async def closing(connection) -> None:
        await connection.recv()  # the token
        if authenticate:
            await connection.send(
                '{"type":"authenticated","subject":null,"projects":null,"expires_at":null}'
            )
        await connection.close(code)

    async with serve(closing, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        policy = ReconnectPolicy(initial=1.0, max=30.0, prompt_max=0.5)
        consumer = Consumer(
            f"ws://127.0.0.1:{port}/", token="t", reconnect=policy, random=lambda: 0.5
        )
        delays = [await consumer._connect_once() for _ in range(3)]
        assert consumer.close_codes == [code] * 3
        assert delays == [0.5, 1.0, 2.0]  # the backoff's, growing
        authenticate = True
        assert await consumer._connect_once() == 0.25  # prompt
        await consumer.aclose()


@pytest.mark.parametrize(
    ("code", "why"),
    [(1009, "exceeds limit"), (1002, "invalid opcode")],
    ids=["oversized", "broken_frame"],
)
async def test_a_frame_the_consumer_refuses_is_the_gateways_fault_not_its_own(code, why):
    """A gateway sends a frame over the consumer's ``max_size`` (4 MiB), or one that breaks the
    WebSocket protocol: the consumer closes the connection with 1009 (1002) and reconnects with
    backoff, logging a warning that names the refused frame. Before, nothing said why:
    websockets discards what follows a failure, the gateway's echo of 1009 included, so the
    connection ended as a plain 1006 ('disconnected'); and a broken frame's 1002 was not counted
    as a protocol violation at all."""
    from structlog.testing import capture_logs
    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosed

    async def oversized(connection) -> None:
        await connection.recv()  # the token
        await connection.send(
            '{"type":"authenticated","subject":null,"projects":null,"expires_at":null}'
        )
        if code == 1009:
            await connection.send("x" * (2**22 + 1))
        else:
            connection.transport.write(b"\x83\x00")  # opcode 3: reserved
        with contextlib.suppress(ConnectionClosed):
            await connection.recv()

    async with serve(oversized, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        consumer = Consumer(f"ws://127.0.0.1:{port}/", token="t", random=lambda: 0.5)
        with capture_logs() as logs:
            delay = await consumer._connect_once()
        await consumer.aclose()
    assert consumer.close_codes == [1006]  # (no close frame is read after a failure)
    assert delay == 0.5  # the backoff's first (random 0.5), not a prompt reconnect
    refused = [e for e in logs if e["event"] == "refused a frame from the gateway"]
    assert [(e["log_level"], e["code"]) for e in refused] == [("warning", code)]
    assert why in refused[0]["reason"]
    assert not [e for e in logs if e["log_level"] == "error"]


async def test_close_codes_keep_the_last_connections_only(monkeypatch):
    """``close_codes`` says how the last connections ended, oldest first; a list of every one
    grew by an entry per reconnect for as long as the process lived (a consumer reconnecting
    to a gateway that keeps closing it, for months)."""
    from websockets.asyncio.server import serve

    import consumer.client as client_module

    codes = iter([1011, 1013, 1014, 1011, 1013, 1014])  # each backs off

    async def closing(connection) -> None:
        await connection.recv()  # the token
        await connection.close(next(codes))

    monkeypatch.setattr(client_module, "CLOSE_CODES_KEPT", 3)
    async with serve(closing, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        consumer = Consumer(f"ws://127.0.0.1:{port}/", token="t", random=lambda: 0.5)
        for _ in range(5):
            await consumer._connect_once()
        assert consumer.connects == 5
        assert consumer.close_codes == [1014, 1011, 1013]  # the last three
        await consumer.aclose()


@pytest.mark.parametrize("code", [1001, 1012, 4008, 4002])
async def test_prompt_reconnects_in_a_row_from_short_connections_back_off(code: int):
    """A gateway that authenticates every connection and closes it at once with a code asking
    for a prompt reconnect (draining, going away, slow consumer, token expired) was connected
    to every 0-0.5 s for ever, replaying and minting a token each time. A drained pod refuses
    new handshakes (503), so a second such close before ``stable_after`` is not a drain moving
    the consumer elsewhere: it reconnects with backoff, which a stable connection resets."""
    from websockets.asyncio.server import serve

    async def closing(connection) -> None:
        await connection.recv()  # the token
        await connection.send(
            '{"type":"authenticated","subject":null,"projects":null,"expires_at":null}'
        )
        await connection.close(code)

    async with serve(closing, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        consumer = Consumer(
            f"ws://127.0.0.1:{port}/",
            token=lambda: "t",
            reconnect=ReconnectPolicy(initial=1.0, max=30.0, prompt_max=0.5),
            random=lambda: 0.5,
        )
        delays = [await consumer._connect_once() for _ in range(4)]
        assert delays == [0.25, 0.5, 1.0, 2.0]  # prompt once, then the backoff's, growing
        consumer.policy = ReconnectPolicy(stable_after=0.0)  # every connection is stable now
        assert [await consumer._connect_once() for _ in range(2)] == [0.25, 0.25]
        await consumer.aclose()


@pytest.mark.parametrize("expires_at", [10**400, -(10**400)])
async def test_an_authenticated_with_an_expiry_no_clock_holds_does_not_stop_the_consumer(
    expires_at: int,
):
    """``authenticated.expires_at`` is an int of any size to the decoder: one of 400 digits
    raised OverflowError (an int too large for a float) out of the refresh's scheduling, and
    the consumer stopped for good (ConsumerClosed, as for a bug) at every gateway that sent it,
    with a token function. An expiry outside what a token can say (schemas.tokens.MAX_EXP) is
    not used: the token's own lifetime still is."""
    from websockets.asyncio.server import serve

    async def gateway(connection) -> None:
        await connection.recv()  # the token
        authenticated = {"type": "authenticated", "subject": None, "projects": None}
        await connection.send(json.dumps(authenticated | {"expires_at": expires_at}))
        await connection.recv()  # the subscribe
        await connection.send(subscribed(1, 0).decode())
        await connection.send(frame(1, 1).decode())
        await connection.wait_closed()

    async with serve(gateway, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with Consumer(f"ws://127.0.0.1:{port}/", token=lambda: "t") as consumer:
            async with asyncio.timeout(10):
                item = await anext(consumer.events(1))
    assert isinstance(item, Delivery) and item.seq == 1


class PingFlood:
    """A WebSocket server on a local port that completes the handshake, then sends pings
    (``flood`` bytes of them; None: without end) and never reads: a broken or hostile gateway.
    ``connected`` is set at its second connection."""

    PING = b"\x89\x7d" + b"p" * 125  # a server's ping frame, 125 bytes of payload

    def __init__(self, flood: int | None) -> None:
        self.flood = flood
        self.connections = 0
        self.connected = asyncio.Event()

    async def __aenter__(self) -> str:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (inherited: reads little)
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self._answer, sock=sock)
        return f"ws://127.0.0.1:{sock.getsockname()[1]}/"

    async def __aexit__(self, *exc_info: object) -> None:
        self.server.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.connections > 1:
            self.connected.set()
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(
                hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
            )
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % accept
            )
            # From here on nothing is read (asyncio stops reading once its buffer is full).
            sent, burst = 0, self.PING * 1000
            while self.connections == 1 and (self.flood is None or sent < self.flood):
                writer.write(burst)
                await writer.drain()
                sent += len(burst)
            await asyncio.sleep(3600)
        writer.close()


@pytest.mark.parametrize("flood", [None, 16 * 2**20], ids=["endless", "then-quiet"])
async def test_a_gateway_that_sends_pings_and_reads_nothing_is_dropped(
    flood: int | None, monkeypatch: pytest.MonkeyPatch
):
    """websockets answers every ping by itself: a gateway sending pings and reading nothing
    piled the answers up in the consumer's write buffer without bound (800 MB after 36 s on
    loopback), and every send waits for that buffer to drain, the keepalive's ping and the
    close frame included, so no timeout ever ended the connection: memory growing, the
    projects silent, for ever. Now a connection with more than ``MAX_UNSENT`` bytes of the
    consumer's frames waiting (``endless``), or whose writing stayed paused for
    ``ping_timeout`` (``then-quiet``: 16 MiB of pings, then nothing), is dropped (1006) and
    made again with backoff."""
    if flood is not None:
        monkeypatch.setattr(consumer_client, "MAX_UNSENT", 2**40)  # only the time bound
    # ``endless``: only the size bound (without a ping_timeout, no time bound; with one, the
    # writing paused for it would give the connection up first, whatever MAX_UNSENT is).
    ping = 0.5 if flood is not None else None
    server = PingFlood(flood)
    async with server as url:
        consumer = Consumer(
            url,
            open_timeout=3600,  # not the bound on a subscribe's answer
            ping_interval=ping,
            ping_timeout=ping,
            reconnect=ReconnectPolicy(initial=0.05, max=0.1),
        )
        consumer.events(1)
        try:
            async with asyncio.timeout(20):
                await server.connected.wait()  # the consumer connected again
        finally:
            await asyncio.wait_for(consumer.aclose(), 5)  # (its close waited on the buffer too)
        assert consumer.close_codes[0] == 1006


async def test_aclose_returns_while_the_gateway_does_not_read_and_keepalive_is_off(
    monkeypatch: pytest.MonkeyPatch,
):
    """Without keepalive (``ping_timeout=None``) nothing bounds a pause in writing (see above),
    and websockets' close waits for the write buffer to drain before its ``close_timeout``
    starts: after a gateway sent pings (whose answers wait unsent, over websockets'
    ``write_limit``; under ``MAX_UNSENT``, here out of the way) and then read nothing,
    ``aclose()`` never returned, nor did a caller's timeout around it end the connection task.
    Now ``aclose()`` gives the close ``close_timeout`` and then drops the connection."""
    monkeypatch.setattr(consumer_client, "MAX_UNSENT", 2**40)
    server = PingFlood(16 * 2**20)
    async with server as url:
        consumer = Consumer(url, open_timeout=3600, ping_interval=None, ping_timeout=None)
        consumer.events(1)
        async with asyncio.timeout(20):
            while consumer._ws is None or not consumer._ws.paused:  # noqa: ASYNC110 - no event
                await asyncio.sleep(0.01)
        ws = consumer._ws
        try:
            async with asyncio.timeout(10):
                await consumer.aclose()
        finally:
            ws.transport.abort()  # (the connection the old code left open)
        assert consumer._task.done()
        assert ws.state is State.CLOSED


def _server_frame(payload: bytes, *, compressed: bool = False) -> bytes:
    """A server's text frame (unmasked); ``compressed``: permessage-deflate's RSV1 set."""
    first = 0xC1 if compressed else 0x81
    size = len(payload)
    if size < 126:
        return bytes([first, size]) + payload
    if size < 65536:
        return bytes([first, 126]) + size.to_bytes(2, "big") + payload
    return bytes([first, 127]) + size.to_bytes(8, "big") + payload


async def test_frames_read_ahead_of_a_full_subscription_stay_near_websockets_queue():
    """With compression, one read of the socket (256 KiB) holds dozens of frames that inflate
    to 4 MiB each, and websockets parsed and queued all of them before its queue's high-water
    mark (16 frames) paused reading: a gateway sending such frames while the subscription was
    full made the consumer hold 60-odd frames, a quarter of a GB, where docs/consumer.md
    promises a few frames (up to 16) besides ``buffer_bytes``. Now the consumer hands
    websockets what it read a slice at a time and keeps the rest, unparsed, while the queue is
    paused."""
    deflate = zlib.compressobj(wbits=-15)
    inflated = b"x" * (2**22 - 64)
    packed = (deflate.compress(inflated) + deflate.flush(zlib.Z_SYNC_FLUSH))[:-4]
    flood = _server_frame(packed, compressed=True) * 64  # ~260 KB: one or two reads
    done = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(
                hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
            )
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n"
                b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover"
                b"\r\n\r\n" % accept
            )
            await reader.readexactly(2)  # (the subscribe's first bytes)
            # Two events for a subscription of one item: the second holds the connection
            # task, and what follows waits in websockets' queue.
            for raw in (subscribed(1, 0), frame(1, 1), frame(1, 2)):
                writer.write(_server_frame(raw))
            writer.write(flood)
            await done.wait()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    consumer = Consumer(f"ws://127.0.0.1:{port}/", compression=True, buffer=1, open_timeout=3600)
    try:
        subscription = consumer.events(1)  # (kept, never read: full after one item)
        async with asyncio.timeout(20):
            while consumer._ws is None or not consumer._ws.recv_messages.paused:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        held = len(consumer._ws.recv_messages.frames)
        assert held <= 16 + 2, f"{held} frames of 4 MiB held"
        assert consumer.stats.ignored == 0
        # Reading on takes the held bytes in turn: every frame is read, none lost or stuck.
        async with asyncio.timeout(20):
            first, second = await anext(subscription), await anext(subscription)
            assert (first.seq, second.seq) == (1, 2)
            while consumer.stats.ignored < 64:  # noqa: ASYNC110 - a counter
                await asyncio.sleep(0.01)
    finally:
        done.set()
        await consumer.aclose()
        server.close()


async def test_writing_paused_then_resumed_is_a_gateway_reading_and_keeps_the_connection():
    """Writing pauses whenever the consumer's frames pass websockets' ``write_limit`` and the
    gateway reads them slowly (a slow link; a gateway holding its reading while a subscribe
    waits for Redis): only a pause lasting ``ping_timeout`` gives the connection up, each pause
    with a time of its own. Were a resume to leave the timer running, any pause then resumed
    would drop a healthy connection ``ping_timeout`` later."""
    from websockets.client import ClientProtocol
    from websockets.uri import parse_uri

    class Transport:
        def __init__(self) -> None:
            self.aborted = asyncio.Event()

        def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
            pass

        def get_write_buffer_size(self) -> int:
            return 2**16

        def abort(self) -> None:
            self.aborted.set()

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    def connection() -> tuple[consumer_client._Connection, Transport]:
        transport = Transport()
        connection = consumer_client._Connection(
            ClientProtocol(parse_uri("ws://gateway/")), ping_interval=None, ping_timeout=0.05
        )
        connection.connection_made(transport)  # type: ignore[arg-type]
        return connection, transport

    (resumed, resumed_transport), (ended, ended_transport) = connection(), connection()
    for _ in range(3):
        resumed.pause_writing()
        resumed.resume_writing()
    ended.pause_writing()
    ended.connection_lost(None)  # (ended while paused: nothing left to give up)
    loop = asyncio.get_running_loop()
    later = loop.create_future()
    loop.call_later(0.2, later.set_result, None)  # (after any give-up timer left running)
    await later
    assert not resumed_transport.aborted.is_set() and not ended_transport.aborted.is_set()
    resumed.pause_writing()  # and never resumed: given up
    await asyncio.wait_for(resumed_transport.aborted.wait(), 5)


async def test_two_subscriptions_on_one_connection_each_get_their_projects():
    consumer, ws, first = await fed_consumer(1)
    second = consumer.events(2)
    await asyncio.sleep(0)  # its cursor is prepared and its subscribe sent on the live connection
    assert ws.sent == [{"type": "subscribe", "project_id": 2}]
    with pytest.raises(ValueError, match="already followed"):
        consumer.events(2)
    for raw in (subscribed(1, 0), subscribed(2, 0), frame(2, 1), frame(1, 1), frame(2, 2)):
        await consumer._on_frame(ws, raw)  # type: ignore[arg-type]
    assert [(d.project_id, d.seq) for d in drain(first)] == [(1, 1)]
    assert [(d.project_id, d.seq) for d in drain(second)] == [(2, 1), (2, 2)]
    await second.aclose()
    assert ws.sent[-1] == {"type": "unsubscribe", "project_id": 2}
    await consumer._on_frame(ws, frame(2, 3))  # type: ignore[arg-type]  # late: ignored
    assert drain(first) == [] and consumer.cursor(2) is None


def test_tail_plugs_into_another_cli_as_a_subcommand():
    """How ``eventbus-publish tail`` is wired: the same options on a subparser."""
    import argparse

    from consumer.tail import add_arguments

    parser = argparse.ArgumentParser(prog="eventbus-publish")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("history").add_argument("--after", type=int)
    add_arguments(commands.add_parser("tail"))
    args = parser.parse_args(["tail", "1", "2", "--after", "40", "--json", "--url", "ws://g/"])
    assert (args.command, args.project_ids, args.after, args.json) == ("tail", [1, 2], 40, True)
    assert (args.url, args.from_start, args.count) == ("ws://g/", False, None)


async def test_a_project_followed_again_before_its_cursor_loaded_gets_the_newer_cursor():
    """aclose() then events() again while the first cursor is still loading: the stale load must
    not install its state for the new subscription."""

    class SlowStore(MemoryCursorStore):
        def __init__(self) -> None:
            super().__init__()
            self.release = asyncio.Event()

        async def load(self, project_id: int) -> Cursor | None:
            await self.release.wait()
            return Cursor("old", 1)

    store = SlowStore()
    consumer = Consumer("ws://unused/", store=store)
    consumer._task = asyncio.get_running_loop().create_future()  # no real connection task
    first = consumer.events(1)
    await first.aclose()
    second = consumer.events(1, after=Cursor("new", 7))
    await asyncio.sleep(0)
    store.release.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert consumer.cursor(1) == Cursor("new", 7)
    assert second.project_ids == (1,)


def test_tail_mints_tokens_without_a_subject_so_it_is_not_in_presence():
    # A token with `sub` lists its connection in the project's presence (docs/presence.md).
    from consumer.tail import service_token
    from schemas.tokens import verify_token

    claims = verify_token(service_token("s3cret-0123456789abcdef0123456789", [1, 2]),
                          "s3cret-0123456789abcdef0123456789")  # fmt: skip
    assert claims.sub is None and claims.projects == frozenset({1, 2})


@pytest.mark.parametrize("given", [None, "--token", "--secret"])
def test_tail_says_how_to_give_a_token_when_none_was_given(given, monkeypatch):
    # `python -m consumer tail 1`, as docs/consumer.md first shows it, against a gateway with
    # auth: the refusal named close code 4001 and nothing about the --token / --secret flags.
    import argparse
    import io

    from consumer import tail as tail_module
    from consumer.types import AuthenticationFailed

    async def refused(*args, **kwargs):
        raise AuthenticationFailed("the gateway refused the token (close code 4001)")

    monkeypatch.setattr(tail_module, "tail", refused)
    monkeypatch.delenv("EVENTBUS_AUTH_SECRET", raising=False)
    monkeypatch.delenv("EVENTBUS_TOKEN", raising=False)
    parser = argparse.ArgumentParser()
    tail_module.add_arguments(parser)
    argv = ["1"] + ({"--token": ["--token", "t"], "--secret": ["--secret", "s"]}.get(given) or [])
    stderr = io.StringIO()
    code = tail_module.run(parser.parse_args(argv), stdout=io.StringIO(), stderr=stderr)
    assert code == tail_module.EXIT_USAGE
    hint = "pass --token (or $EVENTBUS_TOKEN), or --secret"
    assert (hint in stderr.getvalue()) == (given is None), stderr.getvalue()


def test_tail_refuses_a_token_that_is_not_utf8_as_a_usage_error(monkeypatch):
    # `--token` (or $EVENTBUS_TOKEN) with bytes that are not UTF-8: Python decodes argv and the
    # environment with surrogateescape, so the token holds lone surrogates and can never be
    # sent. A usage error, without the token's text; Consumer's ValueError escaped as a
    # traceback.
    import argparse
    import io

    from consumer import tail as tail_module

    monkeypatch.delenv("EVENTBUS_AUTH_SECRET", raising=False)
    parser = argparse.ArgumentParser()
    tail_module.add_arguments(parser)
    stderr = io.StringIO()
    args = parser.parse_args(["1", "--token", "secret-part\udcff"])
    code = tail_module.run(args, stdout=io.StringIO(), stderr=stderr)
    assert code == tail_module.EXIT_USAGE
    assert "error: the token is not UTF-8" in stderr.getvalue()
    assert "secret" not in stderr.getvalue()


def test_the_reconnect_jitter_leaves_the_global_random_state_alone():
    # An application seeding ``random`` (a simulation, a property-based test) draws the same
    # numbers whether or not a consumer reconnected meanwhile.
    import random

    from consumer.policy import Backoff

    random.seed(7)
    expected = [random.random() for _ in range(3)]
    random.seed(7)
    backoff = Backoff()
    delays = [backoff.next() for _ in range(5)]
    assert [random.random() for _ in range(3)] == expected
    assert all(delay >= 0 for delay in delays)


# --- the client against a fake gateway that misbehaves after authenticating ---------------------


def error_frame(code: str, project_id: int | None = None) -> str:
    message: dict[str, object] = {"type": "error", "code": code, "message": "flood"}
    if project_id is not None:
        message["project_id"] = project_id
    return json.dumps(message)


AUTHENTICATED = json.dumps(
    {"type": "authenticated", "subject": None, "projects": None, "expires_at": None}
)
FLOOD = 1000


async def test_a_flood_of_unavailable_errors_is_one_retry_and_the_project_resumes_once():
    """A gateway (buggy or hostile) answering one subscribe with a thousand ``unavailable``
    errors: the consumer started a retry task per error, each sleeping up to ``max`` and then
    subscribing again, a thousand tasks and a burst of a thousand subscribes. Now a project has
    at most one retry pending; when the gateway recovers, the project resumes once, in order."""
    from websockets.asyncio.server import serve

    subscribes: list[int] = []

    async def gateway(connection) -> None:
        flooded = other_subscribed = sentinel_sent = False
        async for raw in connection:
            message = json.loads(raw)
            if message["type"] != "subscribe":
                continue
            project, after = message["project_id"], message.get("after")
            subscribes.append(project)
            if project == 2:
                await connection.send(subscribed(2, 0, resumed=True).decode())
                other_subscribed = True
            elif not flooded:
                for _ in range(FLOOD):
                    await connection.send(error_frame("unavailable", 1))
                flooded = True
            else:  # recovered: the replay after the cursor, then `subscribed`
                for seq in range(after + 1, 4):
                    await connection.send(frame(1, seq).decode())
                await connection.send(subscribed(1, 3, resumed=True).decode())
            if flooded and other_subscribed and not sentinel_sent:
                # Read after every error: once it is delivered, the flood was handled.
                await connection.send(frame(2, 1).decode())
                sentinel_sent = True

    async with serve(gateway, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        policy = ReconnectPolicy(initial=1.0, max=1.0)
        consumer = Consumer(f"ws://127.0.0.1:{port}/", reconnect=policy, random=lambda: 1.0)
        async with consumer:
            first = consumer.events(1, after=Cursor(EPOCH, 0))
            other = consumer.events(2, after=Cursor(EPOCH, 0))
            async with asyncio.timeout(10):
                assert (await anext(other)).seq == 1
            assert len(consumer._helpers) <= 1  # one retry sleeping, not a thousand
            items = []
            async with asyncio.timeout(10):
                while len(items) < 3:
                    items.append(await anext(first))
    assert [(d.project_id, d.seq) for d in items] == [(1, 1), (1, 2), (1, 3)]
    assert subscribes.count(1) == 2  # the first and one retry
    assert consumer.connects == 1 and consumer.stats.duplicates == 0


async def test_a_flood_of_invalid_token_errors_is_one_pending_refresh():
    """A gateway sending a thousand ``invalid_token`` errors (answers to no refresh of ours, or
    a thousand to one): the consumer started a refresh task per error, each calling the token
    function after a while, a thousand calls. Now one refresh is pending at a time."""
    from websockets.asyncio.server import serve

    auths = 0
    refreshed = asyncio.Event()

    def token() -> str:
        token.calls += 1  # type: ignore[attr-defined]
        return f"t{token.calls}"  # type: ignore[attr-defined]

    token.calls = 0  # type: ignore[attr-defined]

    async def gateway(connection) -> None:
        nonlocal auths
        async for raw in connection:
            message = json.loads(raw)
            if message["type"] == "auth":
                auths += 1
                await connection.send(AUTHENTICATED)
                if auths == 2:
                    refreshed.set()
            elif message["type"] == "subscribe":
                await connection.send(subscribed(1, 0).decode())
                for _ in range(FLOOD):
                    await connection.send(error_frame("invalid_token"))
                await connection.send(frame(1, 1).decode())  # read after every error

    async with serve(gateway, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        policy = ReconnectPolicy(initial=1.0, max=1.0)
        consumer = Consumer(
            f"ws://127.0.0.1:{port}/", token=token, reconnect=policy, random=lambda: 1.0
        )
        async with consumer:
            subscription = consumer.events(1)
            async with asyncio.timeout(10):
                assert (await anext(subscription)).seq == 1
            assert len(consumer._helpers) <= 1 and token.calls == 1  # type: ignore[attr-defined]
            async with asyncio.timeout(10):
                await refreshed.wait()
            assert token.calls == 2  # type: ignore[attr-defined]
            assert consumer.connects == 1


async def test_a_rate_limited_subscribe_is_retried_and_the_project_followed():
    """The gateway's rate limit refuses a subscribe (``rate_limited``, naming the project): the
    project is not dropped (as a refused subscribe otherwise is, with a GatewayError) but
    subscribed again after a delay, like an ``unavailable`` one, on the same connection."""
    from websockets.asyncio.server import serve

    subscribes: list[int] = []

    async def gateway(connection) -> None:
        async for raw in connection:
            message = json.loads(raw)
            if message["type"] != "subscribe":
                continue
            subscribes.append(message["project_id"])
            if len(subscribes) == 1:
                await connection.send(error_frame("rate_limited", 1))
            else:
                await connection.send(subscribed(1, 0, resumed=True).decode())
                await connection.send(frame(1, 1).decode())

    async with serve(gateway, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        policy = ReconnectPolicy(initial=0.2, max=1.0)
        consumer = Consumer(f"ws://127.0.0.1:{port}/", reconnect=policy, random=lambda: 1.0)
        async with consumer:
            subscription = consumer.events(1, after=Cursor(EPOCH, 0))
            async with asyncio.timeout(10):
                item = await anext(subscription)
    assert isinstance(item, Delivery) and (item.project_id, item.seq) == (1, 1)
    assert subscribes == [1, 1]
    assert consumer.stats.rate_limited == 1 and consumer.stats.unavailable == 0
    assert consumer.connects == 1


def rate_limited_frame(project_id: int | None = None, retry_after_ms: int | None = None) -> bytes:
    message = json.loads(error_frame("rate_limited", project_id))
    if retry_after_ms is not None:
        message["retry_after_ms"] = retry_after_ms
    return json.dumps(message).encode()


class StampedPacer(FramePacer):
    """A FramePacer that records when each held frame was let go (``resent``): the instant the
    next one's wait counts from. The frame reaches ``ws.send`` a moment after, a moment that a
    loaded machine can stretch (the thread preempted in between): spacing measured between
    sends is the pacing less that moment, 0.03 s for 0.05 here with a 20 ms preemption."""

    __slots__ = ("stamps",)

    def __init__(self, *args: float) -> None:
        super().__init__(*args)
        self.stamps: list[float] = []

    def resent(self, now: float) -> None:
        self.stamps.append(now)
        super().resent(now)


async def test_subscribes_refused_together_are_sent_again_paced_connection_wide():
    """Many subscribes refused at once (a burst's worth of projects): each was retried on its
    own project's backoff, so the retries arrived together and were refused again (4029 with a
    tiny limit, tests/test_client_pacing.py). Now they are held and sent again in order, the
    first at the gateway's retry_after_ms, then resend_interval apart; a subscribe sent after
    them (a gap, a new project) waits its turn; one refused again slows the pace."""
    policy = ReconnectPolicy(initial=1.0, max=30.0, resend_interval=0.05)
    consumer, ws, _subscription = await fed_consumer(*range(1, 9))
    consumer.policy = policy
    pacer = consumer._pacer = StampedPacer(policy.resend_interval, policy.max, policy.initial)
    sent_at: list[tuple[float, int]] = []
    loop = asyncio.get_running_loop()
    arrived = asyncio.Event()

    def let_go_then_sent(stamps: list[float], sends: list[float]) -> bool:
        """Each frame was sent after it was let go and before the next one was."""
        return len(stamps) == len(sends) and all(
            stamp <= sent < later
            for stamp, sent, later in zip(stamps, sends, [*stamps[1:], math.inf], strict=True)
        )

    async def send(data, text=True):
        message = json.loads(data)
        if message["type"] == "subscribe":
            sent_at.append((loop.time(), message["project_id"]))
            arrived.set()

    async def sent(count: int) -> None:
        async with asyncio.timeout(10):
            while len(sent_at) < count:
                arrived.clear()
                await arrived.wait()

    ws.send = send  # type: ignore[method-assign]
    started = loop.time()
    for project_id in range(3, 9):
        await consumer._on_frame(ws, rate_limited_frame(project_id, 200))  # type: ignore[arg-type]
    assert consumer.stats.rate_limited == 6 and sent_at == [], "never at once"
    await consumer._on_frame(ws, rate_limited_frame(99, 200))  # type: ignore[arg-type]
    assert consumer.stats.rate_limited == 6, "a project not followed: nothing to send"
    await consumer._send_subscribe(consumer._states[1])  # (a gap of project 1, after them)
    await sent(7)
    assert [p for _, p in sent_at] == [3, 4, 5, 6, 7, 8, 1], "in order, each once"
    times = [t - started for t, _ in sent_at]
    assert times[0] >= 0.2, "not before retry_after_ms"
    assert let_go_then_sent(pacer.stamps, [t for t, _ in sent_at])
    assert all(b - a >= 0.05 for a, b in itertools.pairwise(pacer.stamps)), "spaced"
    assert times[-1] < 0.2 + 6 * 0.05 + 1.0
    # One of them refused again: held, and the next ones go twice as far apart.
    await consumer._on_frame(ws, rate_limited_frame(4, 10))  # type: ignore[arg-type]
    await consumer._on_frame(ws, rate_limited_frame(5, 10))  # type: ignore[arg-type]
    await sent(9)
    assert [p for _, p in sent_at[7:]] == [4, 5]
    assert let_go_then_sent(pacer.stamps, [t for t, _ in sent_at])
    assert pacer.stamps[8] - pacer.stamps[7] >= 0.1
    assert consumer._pacer.held == 0 and 3 in consumer._states  # still followed
    # A refused subscribe of a project unfollowed before it goes out: nothing is sent.
    await consumer._on_frame(ws, rate_limited_frame(2, 100))  # type: ignore[arg-type]
    assert consumer._pacer.held == 1
    await _subscription.aclose()
    async with asyncio.timeout(10):
        await consumer._pacing
    assert consumer._pacer.held == 0 and len(sent_at) == 9


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)  # (not JSON)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(retry_after_ms=_JSON_VALUES, refused=_JSON_VALUES)
@example(retry_after_ms="50", refused=7)
@example(retry_after_ms=50.0, refused=None)
@example(retry_after_ms=-1, refused="subscribe")
@example(retry_after_ms=2**70, refused=["subscribe"])
def test_a_rate_limited_error_with_foreign_retry_after_ms_or_refused_is_still_an_error(
    retry_after_ms, refused
):
    """A rate_limited error whose ``retry_after_ms`` or ``refused`` is not what the protocol says
    (a string, a float, a negative or huge number, a list: another gateway's, a proxy's) was not
    decoded at all: ignored as "not a protocol message", so the refused subscribe was never sent
    again and the project stayed silent until the answer bound gave the connection up. Now it is
    the error it is, with what cannot be used left out (the client then waits a delay of its
    own)."""
    message = {"type": "error", "code": "rate_limited", "message": "m", "project_id": 3}
    message |= {"retry_after_ms": retry_after_ms, "refused": refused}
    decoded = decode_frame(json.dumps(message).encode())
    assert type(decoded) is Error
    assert decoded.code == "rate_limited" and decoded.project_id == 3
    # (An int is the protocol's type: a negative one is FramePacer's to ignore.)
    expected = retry_after_ms if type(retry_after_ms) is int else None
    assert decoded.retry_after_ms == expected
    assert decoded.refused == (refused if type(refused) is str else None)


@pytest.mark.parametrize(
    "extra, ended",
    [
        ({"ended": True}, True),
        ({}, False),  # a gateway from before it, or any other error
        ({"ended": True, "retry_after_ms": "soon"}, True),  # a foreign hint: the loose decoder
        ({"ended": True, "refused": 7}, True),
        ({"ended": "yes"}, False),  # not the protocol's: taken as absent, as before it
        ({"ended": 1, "retry_after_ms": "soon"}, False),
    ],
)
def test_an_error_that_ends_a_subscription_says_so_through_either_decoder(extra, ended):
    """``ended`` tells an ``unavailable`` that ended the subscription (the project's metadata
    unreadable) from a failed presence read's, which leaves it standing. The decoder taking an
    error with a foreign hint (:func:`consumer.frames._loose_error`) dropped every field it did
    not list: ``ended`` with it, and the ended subscription was taken for presence's failure."""
    message = {"type": "error", "code": "unavailable", "message": "m", "project_id": 2} | extra
    decoded = decode_frame(json.dumps(message).encode())
    assert type(decoded) is Error
    assert (decoded.code, decoded.project_id, decoded.ended) == ("unavailable", 2, ended)
    assert decoded.retry_after_ms is None and decoded.refused is None


async def test_a_subscribe_refused_with_a_foreign_retry_after_ms_is_sent_again():
    policy = ReconnectPolicy(initial=0.05, max=1.0)
    consumer, ws, _subscription = await fed_consumer(1)
    consumer.policy = policy
    consumer._pacer = FramePacer(policy.resend_interval, policy.max, policy.initial)
    frame_ = {"type": "error", "code": "rate_limited", "message": "m", "project_id": 1}
    frame_ |= {"retry_after_ms": "soon", "refused": 1}
    await consumer._on_frame(ws, json.dumps(frame_).encode())  # type: ignore[arg-type]
    assert consumer.stats.rate_limited == 1 and consumer._pacer.held == 1
    async with asyncio.timeout(10):
        await consumer._pacing
    assert [m["type"] for m in ws.sent] == ["subscribe"]


@pytest.mark.parametrize("retry_after_ms", [10**400, 10**20, 2.5, float("inf")])
async def test_a_retry_after_ms_of_any_size_waits_at_most_the_policys_max(retry_after_ms):
    """``retry_after_ms`` is an int of any size to the decoder: one of 400 digits raised
    OverflowError (math.isfinite converts it to a float) out of the frame's handling, and the
    consumer stopped for good (ConsumerClosed, as for a bug). Any non-negative number now waits
    what it says, at most the policy's ``max``; the refused subscribe is sent again."""
    policy = ReconnectPolicy(initial=0.05, max=0.2)
    consumer, ws, _subscription = await fed_consumer(1)
    consumer.policy = policy
    consumer._pacer = FramePacer(policy.resend_interval, policy.max, policy.initial)
    raw = rate_limited_frame(1).replace(
        b"}", b',"retry_after_ms":%s}' % str(retry_after_ms).encode()
    )
    if retry_after_ms == float("inf"):
        raw = raw.replace(b"inf", b"1e999")  # (JSON has no infinity: a number too big for a float)
    await consumer._on_frame(ws, raw)  # type: ignore[arg-type]
    assert consumer.stats.rate_limited == 1 and consumer._pacer.held == 1
    assert consumer._pacer.not_before <= consumer._now() + policy.max
    async with asyncio.timeout(10):
        await consumer._pacing
    assert [m["type"] for m in ws.sent] == ["subscribe"]


async def test_held_subscribes_of_projects_unfollowed_do_not_pile_up():
    """While the pacing holds subscribes (the gateway refused one, with a long retry_after_ms), a
    caller following and leaving project after project left each one's held subscribe in the
    queue until its turn: a queue growing with every project ever followed meanwhile. Now
    leaving a project drops its held subscribe, as eventbus.js does, and sends no unsubscribe
    for it: its subscribe never reached the gateway, and an unsubscribe of nothing takes a
    token of the rate limit (200 of them, strikes towards 4029)."""
    consumer, ws, subscription = await fed_consumer(1)
    await consumer._on_frame(ws, rate_limited_frame(1, 20_000))  # type: ignore[arg-type]
    assert consumer._pacer.held == 1
    for project_id in range(2, 202):
        other = consumer.events(project_id)
        await asyncio.sleep(0)  # followed: its subscribe is held behind project 1's
        await other.aclose()
    assert consumer._pacer.held == 1, "only project 1's, still followed"
    await subscription.aclose()
    assert consumer._pacer.held == 0
    assert ws.sent == [{"type": "unsubscribe", "project_id": 1}]  # subscribed: left


async def test_a_rate_limited_token_refresh_is_sent_again_once():
    consumer, ws, _subscription = await fed_consumer(1)
    consumer._token = ("t2", 0.0)  # the refreshed token
    # No refresh sent: a rate_limited without a project answers nothing of ours.
    await consumer._on_frame(ws, rate_limited_frame())  # type: ignore[arg-type]
    assert consumer.stats.rate_limited == 0 and consumer._pacer.held == 0
    sent = asyncio.get_running_loop().create_future()
    sent.set_result(None)
    consumer._refresh = sent  # the refresh went out, no `authenticated` yet
    for _ in range(FLOOD):
        await consumer._on_frame(ws, rate_limited_frame(None, 20))  # type: ignore[arg-type]
    assert consumer._pacer.held == 1, "held once"
    async with asyncio.timeout(10):
        await consumer._pacing
    assert ws.sent == [{"type": "auth", "token": "t2"}]
    assert consumer._pacer.held == 0


async def test_a_token_refresh_due_while_subscribes_are_held_waits_its_turn():
    """A refresh due while the pacing holds refused subscribes went out at once, into the
    gateway's empty bucket: refused too, one more strike towards 4029, and a warning. Now it
    waits its turn behind them, as eventbus.js's does."""
    policy = ReconnectPolicy(initial=1.0, max=30.0, resend_interval=0.05)
    consumer, ws, _subscription = await fed_consumer(1, 2)
    consumer.policy = policy
    consumer._pacer = FramePacer(policy.resend_interval, policy.max, policy.initial)
    consumer._token_source = lambda: "t2"
    await consumer._on_frame(ws, rate_limited_frame(2, 200))  # type: ignore[arg-type]
    await consumer._refresh_later(ws, 0)  # type: ignore[arg-type]
    assert ws.sent == [], "nothing before retry_after_ms"
    async with asyncio.timeout(10):
        await consumer._pacing
    assert [m["type"] for m in ws.sent] == ["subscribe", "auth"]
    assert ws.sent[1] == {"type": "auth", "token": "t2"}


async def test_a_subscribe_the_gateway_never_answers_is_given_up_and_the_connection_made_again():
    """A gateway whose handler is stuck after ``authenticated`` (websockets still answers pings,
    the project's live events may even flow): the subscribe of project 1 was never answered and
    the consumer waited for ever, the project silent, nothing said. Now a subscribe answered by
    nothing of its project within ``open_timeout`` ends the connection (warning), and the next
    one, with backoff, resumes the project from its cursor. Another project's live events on the
    same connection do not count as an answer, and a connection given up on is not a stable one
    (the backoff keeps growing while the gateway stays stuck)."""
    from structlog.testing import capture_logs
    from websockets.asyncio.server import serve

    opened: list[float] = []

    async def gateway(connection) -> None:
        opened.append(asyncio.get_running_loop().time())
        first = len(opened) <= 2  # stuck twice
        live: asyncio.Task | None = None

        async def project_2_live() -> None:
            for seq in itertools.count(1):
                await connection.send(frame(2, seq).decode())
                await asyncio.sleep(0.05)

        try:
            async for raw in connection:
                message = json.loads(raw)
                if message["type"] != "subscribe":
                    continue
                project, after = message["project_id"], message.get("after")
                if project == 2:
                    await connection.send(subscribed(2, 0, resumed=True).decode())
                    if first:
                        live = asyncio.create_task(project_2_live())
                elif not first:  # project 1: stuck on the first connection, answered after
                    for seq in range(after + 1, 3):
                        await connection.send(frame(1, seq).decode())
                    await connection.send(subscribed(1, 2, resumed=True).decode())
        finally:
            if live is not None:
                live.cancel()

    async with serve(gateway, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        policy = ReconnectPolicy(initial=0.05, max=0.1, stable_after=0.1)
        consumer = Consumer(f"ws://127.0.0.1:{port}/", open_timeout=0.5, reconnect=policy)
        with capture_logs() as logs:
            async with consumer:
                stuck = consumer.events(1, after=Cursor(EPOCH, 0))
                consumer.events(2, after=Cursor(EPOCH, 0))
                items = []
                async with asyncio.timeout(10):
                    while len(items) < 2:
                        items.append(await anext(stuck))
                attempts = consumer._backoff.attempt
    assert [(d.project_id, d.seq) for d in items] == [(1, 1), (1, 2)]
    assert consumer.connects == 3 and opened[1] - opened[0] >= 0.5
    assert consumer.close_codes[:2] == [1000, 1000]  # closed by the consumer, not the gateway
    assert attempts == 2  # not reset by the connections up longer than stable_after
    warnings = [e for e in logs if e["event"] == "no answer to a subscribe; reconnecting"]
    assert len(warnings) == 2 and all(e["log_level"] == "warning" for e in warnings)
    assert all(e["project_id"] == 1 for e in warnings)


async def test_a_slow_replay_and_subscribes_answered_one_after_another_are_waited_for():
    """The bound on a subscribe's answer is not a bound on the subscribe: each frame of the
    project (its replay comes before ``subscribed``) pushes it back, and the gateway answers a
    connection's subscribes one after the other (each may wait for Redis up to its
    ``--subscribe-timeout``), so a subscribe is waited for ``open_timeout`` after the answer
    before it, not after it was sent. Nothing here is given up."""
    from websockets.asyncio.server import serve

    async def gateway(connection) -> None:
        async for raw in connection:  # one message after the other, as the gateway does
            message = json.loads(raw)
            if message["type"] != "subscribe":
                continue
            project, after = message["project_id"], message.get("after")
            if project == 1:
                for seq in range(after + 1, 5):  # 4 events, 0.6 s apart: 2.4 s in all
                    await asyncio.sleep(0.6)
                    await connection.send(frame(1, seq).decode())
                await connection.send(subscribed(1, 4, resumed=True).decode())
            else:
                await asyncio.sleep(0.7)
                await connection.send(subscribed(project, 0, resumed=True).decode())

    async with serve(gateway, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        consumer = Consumer(f"ws://127.0.0.1:{port}/", open_timeout=1.0)
        async with consumer:
            slow = consumer.events(1, after=Cursor(EPOCH, 0))
            later = consumer.events(2, 3)  # live from now: acknowledged by their `subscribed`
            async with asyncio.timeout(10):
                assert [(await anext(slow)).seq for _ in range(4)] == [1, 2, 3, 4]
                await later.wait_subscribed()
    assert consumer.connects == 1 and consumer.close_codes == [1000]


@pytest.mark.parametrize("old", ["event", "unknown-type"])
async def test_a_subscribe_answered_with_old_events_only_is_still_given_up(old: str):
    """Every frame of a project's replay pushed the bound on its subscribe's answer back, old
    events too: a gateway answering the subscribe with events the consumer already has (the
    same one again and again) and never ``subscribed`` held the project silent for ever (nothing
    delivered, nothing given up). Only an event the consumer takes (the next one) is progress:
    the connection is given up after ``open_timeout`` and made again. An event of a type this
    consumer does not know keeps its place in the order: an old one is no progress either."""
    old_frame = frame(1, 5) if old == "event" else b'{"type":"x","project_id":1,"seq":5}'
    from websockets.asyncio.server import serve

    connections = 0
    again = asyncio.Event()

    async def gateway(connection) -> None:
        nonlocal connections
        connections += 1
        if connections > 1:
            again.set()
        async for raw in connection:
            if json.loads(raw)["type"] == "subscribe":
                while True:  # an old event, again and again
                    await connection.send(old_frame.decode())
                    await asyncio.sleep(0.05)

    async with serve(gateway, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        policy = ReconnectPolicy(initial=0.05, max=0.1)
        consumer = Consumer(f"ws://127.0.0.1:{port}/", open_timeout=0.5, reconnect=policy)
        async with consumer:
            subscription = consumer.events(1, after=Cursor(EPOCH, 5))
            async with asyncio.timeout(10):
                await again.wait()
    assert consumer.stats.delivered == 0
    assert subscription.project_ids == (1,)


async def test_time_the_consumer_waits_for_its_caller_does_not_count_against_the_gateway():
    """A caller that reads slowly stops the connection task (backpressure) with the gateway's
    answers unread behind: that wait is the consumer's own, and must not be taken for a gateway
    that does not answer (a reconnect, and a replay, for nothing)."""
    from structlog.testing import capture_logs
    from websockets.asyncio.server import serve

    answered = asyncio.Event()

    async def gateway(connection) -> None:
        async for raw in connection:
            message = json.loads(raw)
            if message["type"] != "subscribe":
                continue
            project = message["project_id"]
            if project == 1:
                for seq in (1, 2, 3):
                    await connection.send(frame(1, seq).decode())
                await connection.send(subscribed(1, 3, resumed=True).decode())
            else:
                await connection.send(subscribed(2, 0, resumed=True).decode())
            if message["project_id"] == 2:
                answered.set()

    async with serve(gateway, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        consumer = Consumer(f"ws://127.0.0.1:{port}/", open_timeout=0.5, buffer=1)
        with capture_logs() as logs:
            async with consumer:
                busy = consumer.events(1, after=Cursor(EPOCH, 0))
                other = consumer.events(2, after=Cursor(EPOCH, 0))
                async with asyncio.timeout(10):
                    await answered.wait()
                # The caller is busy elsewhere for 3 open_timeouts; the connection task waits
                # for room for event 2 (buffer=1), with `subscribed` of 1 and 2 unread behind.
                await asyncio.sleep(1.5)
                assert busy._route.queue.full() and consumer._states[2].pending
                async with asyncio.timeout(10):
                    assert [(await anext(busy)).seq for _ in range(3)] == [1, 2, 3]
                    await other.wait_subscribed()
    assert not [e for e in logs if e["event"] == "no answer to a subscribe; reconnecting"]
    assert consumer.close_codes == [1000]  # the one closed at the end


@pytest.mark.parametrize("name", ["buffer", "buffer_bytes"])
@pytest.mark.parametrize("value", [0, -1, True, 1.5, "64", None])
def test_a_buffer_bound_that_is_no_positive_int_is_refused(name: str, value: object):
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
        Consumer("ws://unused/", **{name: value})  # type: ignore[arg-type]


def big_frame(project_id: int, seq: int, size: int) -> bytes:
    """An event frame of about ``size`` bytes: a field no event type has, skipped by the decoder."""
    head = frame(project_id, seq)
    return head[: head.rindex(b',"seq":')] + b',"pad":"%s","seq":%d}' % (b"x" * size, seq)


@pytest.mark.parametrize(
    ("buffer_bytes", "held"), [(4 * 2**20, 3), (1, 1)], ids=["4MiB", "one-byte"]
)
async def test_a_subscription_not_read_holds_buffer_bytes_of_events_not_buffer_items(
    buffer_bytes: int, held: int
):
    """Events of 1 MiB (the publisher's largest) to a subscription the caller does not read:
    the consumer held ``buffer`` of them (10,000 by default: 10 GB; 40 GB of the 4 MiB frames
    it accepts) before it stopped reading. Now it stops once the next event would take the
    subscription past ``buffer_bytes`` (an event larger than that is held alone), the gateway
    is left with the rest unsent, and reading the subscription delivers every event in order."""
    from websockets.asyncio.server import serve

    count, size = 64, 2**20
    sent, all_sent = [0], asyncio.Event()

    async def gateway(connection) -> None:
        async for raw in connection:
            if json.loads(raw)["type"] != "subscribe":
                continue
            await connection.send(subscribed(1, 0, resumed=True).decode())
            for seq in range(1, count + 1):
                await connection.send(big_frame(1, seq, size).decode())
                sent[0] = seq
            all_sent.set()

    blocked = asyncio.Event()

    class Watched(Consumer):
        async def _wait_for_room(self, queue, item) -> None:
            if asyncio.current_task() is self._task and type(item) is Delivery:
                blocked.set()  # the connection task stops reading until the caller makes room
            await super()._wait_for_room(queue, item)

    async with serve(gateway, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        consumer = Watched(f"ws://127.0.0.1:{port}/", buffer_bytes=buffer_bytes)
        assert consumer.buffer == 10_000
        async with consumer:
            subscription = consumer.events(1, after=Cursor(EPOCH, 0))
            waits = [asyncio.ensure_future(e.wait()) for e in (blocked, all_sent)]
            async with asyncio.timeout(20):
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
            assert blocked.is_set(), f"all {count} events taken in, none waiting for room"
            queue = subscription._route.queue
            assert queue.qsize() == held and consumer.stats.delivered == held + 1
            assert queue.nbytes <= buffer_bytes or held == 1
            assert consumer._clock.paused  # (the wait is the caller's, not the gateway's)
            assert not all_sent.is_set() and sent[0] < count  # the gateway holds the rest
            seqs = []
            async with asyncio.timeout(30):
                for _ in range(count):
                    seqs.append((await anext(subscription)).seq)
                    assert queue.qsize() <= held
                    assert queue.nbytes <= buffer_bytes or queue.qsize() <= 1
            assert seqs == list(range(1, count + 1))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8765/",  # not a WebSocket URL
        "127.0.0.1:8765",
        "ws://a..b/",  # an empty label: getaddrinfo raised UnicodeError
        "ws://" + "x" * 64 + ".example/",  # a label over 63 characters, the same
        "ws:///",  # no host
    ],
)
def test_a_gateway_url_that_cannot_be_connected_to_is_refused_when_the_consumer_is_made(url):
    """Such a URL was taken, and its first connection attempt stopped the consumer for good as
    an "internal error" (the name lookup's UnicodeError, websockets' InvalidURI), even with
    other, good URLs in the list. ValueError naming the URL, as for the other arguments."""
    with pytest.raises(ValueError, match="gateway URL"):
        Consumer(url)
    with pytest.raises(ValueError, match="gateway URL"):
        Consumer(["ws://127.0.0.1:8765/", url])
    for good in (
        "ws://localhost/",
        "wss://gateway.example:443/path",
        "ws://[::1]:8765/",
        "ws://bücher.example/",
    ):
        Consumer(good)
