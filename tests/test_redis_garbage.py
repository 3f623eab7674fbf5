"""Garbage in every key the gateway reads, injected while clients are live (issue 11, items 1-3).

A real gateway (in-process) on the private Redis; clients follow healthy projects and one
poisoned project. Each test writes into the poisoned project's keys what the event bus cannot
have written, then checks:

* the clients of the OTHER projects still get every event, in order, exactly once, with no
  resync (and a lost message of theirs is still repaired by the periodic check);
* the poisoned project's subscribers get every valid event in order, or an explicit outcome
  (``resync_required`` followed by the later events, or ``error`` ``unavailable``), never
  silence, and never a byte that is not a valid JSON object (the client parses every frame).

The parser itself is fuzzed in tests/test_stored.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.keys import Keys
from tests.support.gateway_client import RecordingClient, client_for, publish

KEYS = Keys()
HEALTHY = (1, 2)
POISONED = 10
BEFORE = 3  # events of every project published before the garbage


def check_record(record: list[int]) -> None:
    """A client's record of one project (seqs; ``-s-1`` for a resync to ``s``) is gapless: each
    event follows the previous one, or the cursor of the resync before it."""
    expected = 1
    for item in record:
        if item < 0:
            expected = -item - 1 + 1
            continue
        assert item == expected, f"got {item}, expected {expected}: {record}"
        expected += 1


@pytest.fixture
async def live(gateways, publisher):
    async for state in _live(gateways, publisher):
        yield state


@pytest.fixture
async def live_without_windows(gateways, publisher):
    """As ``live``, with resume windows off: every resume reads its history from Redis."""
    async for state in _live(gateways, publisher, resume_window_events=0):
        yield state


async def _live(gateways, publisher, **overrides):
    gateway = await gateways(reconcile_interval=0.2, **overrides)
    healthy = await client_for(gateway, list(HEALTHY))
    for project_id in HEALTHY:
        await healthy.subscribe(project_id)
    poisoned = await client_for(gateway, [POISONED])
    await poisoned.subscribe(POISONED)
    for project_id in (*HEALTHY, POISONED):
        await publish(publisher, project_id, BEFORE)
    await healthy.wait_for(lambda: all(len(healthy.seqs(p)) == BEFORE for p in HEALTHY))
    await poisoned.wait_for(lambda: len(poisoned.seqs(POISONED)) == BEFORE)
    yield gateway, healthy, poisoned
    await healthy.close()
    await poisoned.close()


async def others_get_everything(healthy: RecordingClient, publisher, redis_client) -> None:
    """More events for the healthy projects, one of them written to the stream only (its live
    message "lost"): all arrive in order, the lost one through the periodic check."""
    await publish(publisher, HEALTHY[0], 2)
    top = int(redis_client.hget(KEYS.meta(HEALTHY[0]), "seq"))
    frame = b'{"type":"x","project_id":%d,"seq":%d}' % (HEALTHY[0], top + 1)  # as ours are
    redis_client.xadd(KEYS.stream(HEALTHY[0]), {"f": frame, "t": "0"}, id=f"{top + 1}-0")
    redis_client.hset(KEYS.meta(HEALTHY[0]), "seq", top + 1)
    await publish(publisher, HEALTHY[1], 4)
    await healthy.wait_for(
        lambda: (
            len(healthy.seqs(HEALTHY[0])) == BEFORE + 3
            and len(healthy.seqs(HEALTHY[1])) == BEFORE + 4
        )
    )
    assert healthy.events[HEALTHY[0]] == list(range(1, BEFORE + 4))
    assert healthy.events[HEALTHY[1]] == list(range(1, BEFORE + 5))
    assert healthy.count("resync_required") == 0 and healthy.count("error") == 0


def epoch_of(redis_client, project_id: int) -> str:
    return redis_client.hget(KEYS.meta(project_id), "epoch").decode()


# --- stream entries --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"x": "y"},  # no field f (issue 11 #1)
        {"f": b'{"type":"x","text":"\xff\xfe"}'},  # not UTF-8 (issue 11 #2)
        {"f": b"[1,2,3]"},  # not a JSON object
        # Its header, project and seq right, but no JSON: it was relayed to every subscriber
        # as stored (eventbus.js: invalid_frame, two repairs of the gap, then a resync).
        {
            "f": b'{"type":"blocker_expired","project_id":%d,"blocker_id":,"seq":%d}'
            % (
                POISONED,
                BEFORE + 1,
            )
        },
    ],
    ids=["no_f", "not_utf8", "not_object", "not_json"],
)
async def test_a_foreign_stream_entry_gives_a_resync_and_the_project_carries_on(
    live, publisher, redis_client, fields
):
    gateway, healthy, poisoned = live
    stream, meta = KEYS.stream(POISONED), KEYS.meta(POISONED)
    garbage = BEFORE + 1
    redis_client.xadd(stream, fields, id=f"{garbage}-0")
    redis_client.hincrby(meta, "seq", 1)
    if "f" in fields:  # a complete forgery: also on the channel, with a valid envelope
        envelope = b"%s|%d|0|%s" % (epoch_of(redis_client, POISONED).encode(), garbage, fields["f"])
        redis_client.publish(KEYS.channel(POISONED), envelope)
    await publish(publisher, POISONED, 3)  # garbage + 1 .. garbage + 3
    await poisoned.wait_for(lambda: poisoned.count("resync_required", POISONED) == 1)
    resync = poisoned.last("resync_required")
    assert resync["reason"] == "history_corrupt" and resync["seq"] > garbage
    await publish(publisher, POISONED, 2)
    last = garbage + 5
    await poisoned.wait_for(lambda: poisoned.seqs(POISONED)[-1:] == [last])
    check_record(poisoned.events[POISONED])
    assert garbage not in poisoned.seqs(POISONED)
    # A client resuming from before the garbage is told the same, then gets what follows.
    late = await client_for(gateway, [POISONED])
    await late.subscribe(POISONED, epoch=epoch_of(redis_client, POISONED), after=BEFORE)
    assert late.last("resync_required")["reason"] == "history_corrupt"
    await publish(publisher, POISONED, 1)
    await late.wait_for(lambda: late.seqs(POISONED) == [last + 1])
    await poisoned.wait_for(lambda: poisoned.seqs(POISONED)[-1:] == [last + 1])
    check_record(poisoned.events[POISONED])
    assert gateway.metrics.foreign_values["stream_entry"] >= 1
    await others_get_everything(healthy, publisher, redis_client)
    await late.close()


@pytest.mark.parametrize(
    "frame",
    [
        # Right header, project 10 and seq 4, but no JSON: it was relayed as stored, and the
        # consumer, which cannot place it, resynced past it on its own.
        b'{"type":"blocker_expired","project_id":10,"blocker_id":,"seq":4}',
        b'{"x":1}',  # no type, no project, no seq
        b'{"type":"blocker_expired","project_id":10,"blocker_id":1,"task_id":2,'
        b'"expired_at":"2026-12-03T08:00:00Z","seq":99}',  # a valid event, the wrong seq
    ],
    ids=["not_json", "no_header", "wrong_seq"],
)
async def test_the_python_consumer_gets_history_corrupt_for_an_entry_it_cannot_place(
    gateways, publisher, redis_client, frame
):
    """An entry no client can place is never relayed: the gateway says history_corrupt to the
    top, and the consumer carries on live. (Relayed, it stopped every replay there, and the
    consumer resubscribed in a busy loop, about 5,000 times a second, silent, never past it.)"""
    from consumer import Consumer, Delivery, Resync
    from publisher import issue_token
    from schemas.protocol import ResyncReason
    from schemas.tags import event_tag
    from tests.support.gateway_client import SECRET, ws_url

    gateway = await gateways()
    await publish(publisher, POISONED, BEFORE)
    redis_client.xadd(KEYS.stream(POISONED), {"f": frame, "t": "0"}, id=f"{BEFORE + 1}-0")
    redis_client.hincrby(KEYS.meta(POISONED), "seq", 1)
    await publish(publisher, POISONED, 2)
    token = issue_token(SECRET, [POISONED], ttl=60)
    top = BEFORE + 3
    items: list = []
    async with Consumer(ws_url(gateway), token=token, start="beginning") as consumer:
        subscription = consumer.events(POISONED)
        async with asyncio.timeout(10):
            async for item in subscription:
                items.append(item)
                if isinstance(item, Resync):
                    await publish(publisher, POISONED, 1)
                elif item.seq == top + 1:
                    break
    *delivered, resync, last = items
    assert all(isinstance(i, Delivery) for i in delivered)
    assert [i.seq for i in delivered] == list(range(1, len(delivered) + 1))
    assert resync == Resync(POISONED, ResyncReason.HISTORY_CORRUPT, resync.epoch, top, resync.tag)
    assert resync.epoch == epoch_of(redis_client, POISONED)
    # The cursor to go on from names the top event by its tag (the gateway's subscribed says it).
    ((_, fields),) = redis_client.xrange(KEYS.stream(POISONED), f"{top}-0", f"{top}-0")
    assert resync.tag == event_tag(fields[b"f"])
    assert isinstance(last, Delivery) and last.seq == top + 1
    assert gateway.metrics.foreign_values["stream_entry"] > 0


async def test_an_oversized_entry_is_corrupt_and_stops_no_consumer(
    gateways, publisher, redis_client
):
    """A 5 MiB frame written by hand passed the gateway's check and was relayed: over the Python
    consumer's 4 MiB message limit, it closed the connection on every replay that reached it, so
    the consumer, reconnecting for ever, delivered nothing of any project on that connection."""
    from consumer import Consumer, Delivery, Resync
    from publisher import issue_token
    from schemas.protocol import ResyncReason
    from tests.support.gateway_client import SECRET, ws_url

    gateway = await gateways()
    for project_id in (HEALTHY[0], POISONED):
        await publish(publisher, project_id, BEFORE)
    big = b'{"type":"blocker_expired","project_id":10,"x":"' + b"a" * (5 << 20) + b'"}'
    redis_client.xadd(KEYS.stream(POISONED), {"f": big, "t": "0"}, id=f"{BEFORE + 1}-0")
    redis_client.hincrby(KEYS.meta(POISONED), "seq", 1)
    await publish(publisher, POISONED, 1)
    token = issue_token(SECRET, [HEALTHY[0], POISONED], ttl=60)
    items: dict[int, list] = {HEALTHY[0]: [], POISONED: []}
    async with Consumer(ws_url(gateway), token=token, start="beginning") as consumer:
        async with asyncio.timeout(10):
            async for item in consumer.events(HEALTHY[0], POISONED):
                items[item.project_id].append(item)
                poisoned = items[POISONED]
                if poisoned and isinstance(poisoned[-1], Resync):
                    if len(items[HEALTHY[0]]) == BEFORE:
                        break
        assert consumer.connects == 1
    assert [i.seq for i in items[HEALTHY[0]]] == list(range(1, BEFORE + 1))
    *delivered, resync = items[POISONED]  # the events before the entry, if replayed first
    assert all(isinstance(i, Delivery) for i in delivered)
    assert [i.seq for i in delivered] == list(range(1, len(delivered) + 1))
    assert (resync.reason, resync.seq) == (ResyncReason.HISTORY_CORRUPT, BEFORE + 2)
    assert gateway.metrics.foreign_values["stream_entry"] >= 1


@pytest.mark.parametrize(
    "fields",
    [
        {"x": "y"},  # no field f
        # Passes the gateway's bytes check (it names project 10 and seq 4), but is no JSON:
        # embedded in the page as stored, it made every answer from seq 3 on invalid JSON, and
        # a poller failed on that page for ever.
        {"f": b'{"type":"blocker_expired","project_id":10,"blocker_id":,"seq":4}'},
    ],
    ids=["no_f", "not_json"],
)
async def test_polling_pages_up_to_a_corrupt_entry_then_resyncs(
    gateways, publisher, redis_client, fields
):
    import urllib.request

    gateway = await gateways()
    await publish(publisher, POISONED, BEFORE)
    stream, meta = KEYS.stream(POISONED), KEYS.meta(POISONED)
    redis_client.xadd(stream, fields, id=f"{BEFORE + 1}-0")
    redis_client.hincrby(meta, "seq", 1)
    await publish(publisher, POISONED, 1)
    epoch = epoch_of(redis_client, POISONED)
    from publisher import issue_token
    from tests.support.gateway_client import SECRET

    token = issue_token(SECRET, [POISONED], ttl=60)

    def poll(after: int) -> dict:
        request = urllib.request.Request(
            f"http://127.0.0.1:{gateway.port}/v1/projects/{POISONED}/events"
            f"?epoch={epoch}&after={after}",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    import asyncio

    page = await asyncio.to_thread(poll, 1)
    assert [e["seq"] for e in page["events"]] == [2, 3] and page["more"]
    page = await asyncio.to_thread(poll, 3)
    assert page["events"] == [] and page["resync_required"]["reason"] == "history_corrupt"
    assert page["resync_required"]["seq"] == BEFORE + 2


async def test_polling_never_skips_an_entry_deleted_from_the_middle(live, redis_client):
    """A hole in the stream (an entry deleted by hand) ends the page before it and then gives
    ``history_trimmed``, as a subscribe does: the events after it are never paged over it."""
    import asyncio
    import urllib.request

    from publisher import issue_token
    from tests.support.gateway_client import SECRET

    gateway, _, _ = live
    redis_client.xdel(KEYS.stream(POISONED), "2-0")
    epoch = epoch_of(redis_client, POISONED)
    token = issue_token(SECRET, [POISONED], ttl=60)

    def poll(after: int) -> dict:
        request = urllib.request.Request(
            f"http://127.0.0.1:{gateway.port}/v1/projects/{POISONED}/events"
            f"?epoch={epoch}&after={after}",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    page = await asyncio.to_thread(poll, 0)
    assert [e["seq"] for e in page["events"]] == [1] and page["more"]
    page = await asyncio.to_thread(poll, 1)
    assert page["events"] == [] and page["resync_required"]["reason"] == "history_trimmed"
    assert page["resync_required"]["seq"] == BEFORE


# --- channel messages ------------------------------------------------------------------------


async def test_foreign_channel_messages_are_never_relayed(live, publisher, redis_client):
    gateway, healthy, poisoned = live
    channel = KEYS.channel(POISONED)
    epoch = epoch_of(redis_client, POISONED).encode()
    for garbage in (
        b"garbage",
        b"%s|%d|0|{\xff\xfe}" % (epoch, BEFORE + 1),  # not UTF-8
        b"%s|%d|0|[1]" % (epoch, BEFORE + 1),  # not a JSON object
        b"%s|x|0|{}" % epoch,  # bad envelope
    ):
        redis_client.publish(channel, garbage)
    await publish(publisher, POISONED, 3)
    await poisoned.wait_for(lambda: len(poisoned.seqs(POISONED)) == BEFORE + 3)
    assert poisoned.events[POISONED] == list(range(1, BEFORE + 4))
    assert gateway.metrics.foreign_values["channel_message"] == 4
    await others_get_everything(healthy, publisher, redis_client)


async def test_a_forged_future_seq_is_dropped_and_costs_one_read(live, publisher, redis_client):
    gateway, healthy, poisoned = live
    epoch = epoch_of(redis_client, POISONED).encode()
    frame = b'{"type":"x","project_id":%d,"seq":999999}' % POISONED  # passes the frame check
    redis_client.publish(KEYS.channel(POISONED), b"%s|999999|0|%s" % (epoch, frame))
    await publish(publisher, POISONED, 3)
    await poisoned.wait_for(lambda: len(poisoned.seqs(POISONED)) == BEFORE + 3)
    assert poisoned.events[POISONED] == list(range(1, BEFORE + 4))
    assert gateway.metrics.foreign_values["channel_seq"] == 1
    assert gateway.hub.feeds[POISONED].sequencer.held == {}
    await others_get_everything(healthy, publisher, redis_client)


#: The answer of the forged event: no real event carries it.
FORGED = "forged: no event of the project it names"


@pytest.mark.parametrize("names", ["other_project", "other_seq", "both_projects"])
@pytest.mark.parametrize("written_to", ["stream_and_channel", "channel"])
async def test_a_frame_naming_another_project_or_seq_never_reaches_a_client(
    gateways, publisher, redis_client, names, written_to
):
    """A real event's frame written into project 1's keys (a stream entry and its channel
    message, or a channel message alone) that names project 2 and project 2's next seq, or
    project 1 and another seq than the one it is stored under, or project 1 first and then
    project 2 in a second top-level "project_id" (a decoder keeps the last: project 2), at a seq
    that is project 1's next and project 2's next. It was relayed to project 1's subscribers,
    and a client following projects 1 and 2 on one connection took it as project 2's event, then
    dropped project 2's real event of that seq as a duplicate: garbage in one project's keys
    corrupted another. Now the gateway refuses it: project 2's events all arrive exactly once,
    in order; project 1's subscribers get history_corrupt (the entry is in the history) or
    nothing in its place (a channel message alone), then every later event; no client ever gets
    the forged frame. Both a raw WebSocket client and the Python consumer."""
    from consumer import Consumer, Delivery, Resync
    from publisher import issue_token
    from schemas.events import BlockerResolved, encode_event, utc_now
    from schemas.protocol import ResyncReason
    from tests.support.gateway_client import SECRET, ws_url

    poisoned, victim = 1, 2
    gateway = await gateways()
    watcher = await client_for(gateway, [poisoned, victim])
    for project_id in (poisoned, victim):
        await watcher.subscribe(project_id)
    items: dict[int, list] = {poisoned: [], victim: []}
    token = issue_token(SECRET, [poisoned, victim], ttl=60)
    consumer = Consumer(ws_url(gateway), token=token, start="beginning")
    consumed = asyncio.Event()

    async def consume() -> None:
        async for item in consumer.events(poisoned, victim):
            items[item.project_id].append(item)
            consumed.set()

    def at(project_id: int) -> int | None:
        return items[project_id][-1].seq if items[project_id] else None

    async def consumer_at(victim_seq: int, poisoned_seq: int) -> None:
        async with asyncio.timeout(10):
            while (at(victim), at(poisoned)) != (victim_seq, poisoned_seq):
                consumed.clear()
                await consumed.wait()

    for project_id in (poisoned, victim):
        await publish(publisher, project_id, BEFORE)
    async with consumer:
        consuming = asyncio.create_task(consume())
        await watcher.wait_for(lambda: len(watcher.seqs(victim)) == BEFORE)
        await watcher.wait_for(lambda: len(watcher.seqs(poisoned)) == BEFORE)
        top = int(redis_client.hget(KEYS.meta(poisoned), "seq"))
        named, named_seq = {
            "other_project": (victim, BEFORE + 1),
            "other_seq": (poisoned, top + 2),
            "both_projects": (poisoned, top + 1),  # then project 2, in a second "project_id"
        }[names]
        forgery = BlockerResolved(
            project_id=named, blocker_id=999, answer=FORGED, resolved_at=utc_now()
        )
        frame = encode_event(forgery)[:-1] + b',"seq":%d}' % named_seq  # as the script does
        if names == "both_projects":
            assert top + 1 == BEFORE + 1  # project 1's next seq is project 2's next too
            frame = frame.replace(b',"seq":', b',"project_id":%d,"seq":' % victim)
            assert json.loads(frame)["project_id"] == victim
        if written_to == "stream_and_channel":
            redis_client.xadd(KEYS.stream(poisoned), {"f": frame, "t": "0"}, id=f"{top + 1}-0")
            redis_client.hset(KEYS.meta(poisoned), "seq", top + 1)
        epoch = epoch_of(redis_client, poisoned).encode()
        redis_client.publish(KEYS.channel(poisoned), b"%s|%d|0|%s" % (epoch, top + 1, frame))
        await publish(publisher, victim, 3)
        await publish(publisher, poisoned, 2)
        last = int(redis_client.hget(KEYS.meta(poisoned), "seq"))
        # Both clients at both tops (after a resync, if any)...
        await watcher.wait_for(
            lambda: watcher.cursor(victim)[1] == BEFORE + 3 and watcher.cursor(poisoned)[1] == last
        )
        await consumer_at(BEFORE + 3, last)
        await publish(publisher, poisoned, 1)  # ...and what follows is delivered
        last += 1
        await watcher.wait_for(lambda: watcher.seqs(poisoned)[-1:] == [last])
        await consumer_at(BEFORE + 3, last)
        consuming.cancel()

    # Project 2: every event exactly once, in order, never the forged one, never a resync.
    assert watcher.events[victim] == list(range(1, BEFORE + 4))
    assert all(isinstance(i, Delivery) for i in items[victim])
    assert [i.seq for i in items[victim]] == list(range(1, BEFORE + 4))
    assert all(i.event.answer != FORGED for i in items[victim])
    # Project 1: the explicit outcome, then every later event; the forged frame never arrives.
    assert not any(FORGED in str(m) for m in watcher.messages)
    assert not any(isinstance(i, Delivery) and FORGED in i.raw.decode() for i in items[poisoned])
    check_record(watcher.events[poisoned])
    resyncs = [i for i in items[poisoned] if isinstance(i, Resync)]
    if written_to == "stream_and_channel":
        assert watcher.last("resync_required")["reason"] == "history_corrupt"
        assert [r.reason for r in resyncs] == [ResyncReason.HISTORY_CORRUPT]
        assert gateway.metrics.foreign_values["stream_entry"] >= 1
    else:  # a channel message alone is skipped: the next event is the real top + 1
        assert watcher.events[poisoned] == list(range(1, last + 1))
        assert resyncs == []
    check_record([i.seq if isinstance(i, Delivery) else -i.seq - 1 for i in items[poisoned]])
    assert items[poisoned][-1].seq == last
    assert gateway.metrics.foreign_values["channel_message"] == 1
    await watcher.close()


# --- meta hashes and key types ---------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        lambda r, meta: r.hset(meta, "seq", "abc"),  # issue 11 #3
        lambda r, meta: r.hset(meta, "epoch", b"\xff\xfe"),
        lambda r, meta: (r.delete(meta), r.set(meta, "not a hash")),
    ],
    ids=["bad_seq", "non_utf8_epoch", "wrong_type"],
)
async def test_unreadable_metadata_ends_that_project_only(live, publisher, redis_client, damage):
    gateway, healthy, poisoned = live
    damage(redis_client, KEYS.meta(POISONED))
    # The periodic check finds it: the subscription ends explicitly.
    await poisoned.wait_for(lambda: poisoned.count("error") == 1)
    error = poisoned.last("error")
    assert (error["code"], error["project_id"]) == ("unavailable", POISONED)
    assert POISONED not in gateway.hub.feeds
    # Subscribing again is refused the same way, in time, not with a hang or 1011.
    await poisoned.send({"type": "subscribe", "project_id": POISONED})
    await poisoned.wait_for(lambda: poisoned.count("error") == 2)
    assert poisoned.last("error")["code"] == "unavailable"
    assert poisoned.close_code is None
    # Every other project carries on, and the catch-up check still works for them.
    await others_get_everything(healthy, publisher, redis_client)
    assert gateway.metrics.foreign_values["meta"] >= 1


async def test_a_stream_key_of_another_type_refuses_the_resume_of_that_project_only(
    live_without_windows, publisher, redis_client
):
    gateway, healthy, _ = live_without_windows
    epoch = epoch_of(redis_client, POISONED)
    redis_client.delete(KEYS.stream(POISONED))
    redis_client.set(KEYS.stream(POISONED), "not a stream")
    late = await client_for(gateway, [POISONED])
    await late.send({"type": "subscribe", "project_id": POISONED, "epoch": epoch, "after": 1})
    await late.wait_for(lambda: late.count("error") == 1)
    assert late.last("error")["code"] == "unavailable" and late.close_code is None
    assert gateway.metrics.foreign_values["stream_key"] >= 1
    await others_get_everything(healthy, publisher, redis_client)
    await late.close()


async def test_reading_never_published_projects_leaves_no_permanent_keys(live, redis_client):
    gateway, _, _ = live
    client = await client_for(gateway, "*")
    for project_id in range(1000, 1020):
        subscribed = await client.subscribe(project_id)
        assert subscribed["seq"] == 0
    for project_id in range(1000, 1020):
        assert redis_client.pttl(KEYS.meta(project_id)) > 0
    await client.close()


# --- the history read against anything at all in a project's keys ----------------------------

#: Stands for a frame of ours at the entry's seq, in the project read (1).
OURS = b"<a frame of ours>"


def _stored(n: int, fields: dict) -> dict:
    ours = b'{"type":"x","project_id":1,"\xc3\xa9":"\\"","seq":%d}' % n
    return {name: value.replace(OURS, ours) for name, value in fields.items()}


stored_entries = st.lists(
    st.tuples(
        st.integers(1, 12),
        st.dictionaries(
            st.sampled_from([b"f", b"t", b"x"]),
            st.one_of(
                st.binary(max_size=12),
                st.sampled_from([b"{}", b'{"a":"\xc3\xa9"}', OURS, OURS + b"x", b"x" + OURS]),
            ),
            min_size=1,
            max_size=3,
        ),
    ),
    max_size=6,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    meta_type=st.sampled_from(["hash", "string", "none"]),
    epoch=st.one_of(st.none(), st.binary(max_size=8), st.just(b"Ep0ch")),
    seq=st.one_of(st.none(), st.binary(max_size=4), st.integers(0, 14).map(lambda n: b"%d" % n)),
    entries=stored_entries,
    stream_is_string=st.booleans(),
    after=st.integers(-1, 14),
)
def test_the_history_read_copes_with_any_stored_values(
    redis_url, meta_type, epoch, seq, entries, stream_is_string, after
):
    """Whatever the keys hold, a history read returns only valid frames in order, up to the top
    and before the first corrupt entry, or says that this project is unreadable."""
    import asyncio

    import redis

    from gateway.store import ProjectUnreadable
    from schemas.stored import ForeignKind, check_frame

    raw = redis.Redis.from_url(redis_url)
    raw.flushall()
    meta, stream = KEYS.meta(1), KEYS.stream(1)
    if meta_type == "string":
        raw.set(meta, b"x")
    elif meta_type == "hash":
        raw.hset(meta, "other", "1")
        if epoch is not None:
            raw.hset(meta, "epoch", epoch)
        if seq is not None:
            raw.hset(meta, "seq", seq)
    if stream_is_string:
        raw.set(stream, b"x")
    else:
        for n in sorted({n for n, _ in entries}):
            raw.xadd(stream, _stored(n, next(f for m, f in entries if m == n)), id=f"{n}-0")
    raw.close()

    async def read():
        from gateway.metrics import Metrics
        from gateway.store import ForeignValues, HistoryStore
        from publisher.connection import async_client

        store = HistoryStore(async_client(redis_url), KEYS, ForeignValues(Metrics()))
        try:
            client_epoch = epoch.decode() if epoch and epoch.isalnum() else "other"
            return await store.snapshot(1, client_epoch, after, 10)
        except ProjectUnreadable as exc:
            return exc
        finally:
            await store.client.aclose()

    result = asyncio.run(read())
    if isinstance(result, ProjectUnreadable):
        assert meta_type == "string" or stream_is_string or epoch is not None
        return
    seqs = [s for s, _ in result.entries]
    assert seqs == sorted(set(seqs)) and all(after < s <= result.top for s in seqs)
    if result.corrupt_at is not None:
        assert all(s < result.corrupt_at for s in seqs)
    for seq, frame in result.entries:
        check_frame(frame, ForeignKind.STREAM_ENTRY, 1, seq)


async def test_a_resume_inside_the_window_is_exact_even_with_the_stream_key_damaged(
    live, publisher, redis_client
):
    """The window holds what the feed delivered: a resume inside it needs no read of the damaged
    key and gets exactly the valid events; the damage is met at the next read instead."""
    gateway, healthy, _ = live
    epoch = epoch_of(redis_client, POISONED)
    redis_client.delete(KEYS.stream(POISONED))
    redis_client.set(KEYS.stream(POISONED), "not a stream")
    late = await client_for(gateway, [POISONED])
    subscribed = await late.subscribe(POISONED, epoch=epoch, after=1)
    assert subscribed["resumed"] is True
    assert late.seqs(POISONED) == list(range(2, BEFORE + 1))
    await others_get_everything(healthy, publisher, redis_client)
    await late.close()


async def test_garbage_replacing_an_entry_the_window_holds_is_found_by_a_resume_read(
    gateways, publisher, redis_client, monkeypatch
):
    """A resume read from Redis takes the entries of the same bytes as the frames the feed's
    window holds at their seqs without checking them again. A writer then replaces the stream
    (the window took its frames before): the garbage left at a seq the window holds is other
    bytes, checked in full, and a client resuming from before it is told ``history_corrupt``
    (then gets what follows), as without a window; the valid entries the window holds are
    the only ones not checked twice."""
    import schemas.stored

    gateway = await gateways(resume_window_events=5)  # 16..20 held, a resume at 3 reads
    keeper = await client_for(gateway, [POISONED])
    await keeper.subscribe(POISONED)
    await publish(publisher, POISONED, 20)
    await keeper.wait_for(lambda: len(keeper.seqs(POISONED)) == 20)
    stream, garbage = KEYS.stream(POISONED), 18
    frames = {
        int(entry_id.split(b"-")[0]): fields[b"f"]
        for entry_id, fields in redis_client.xrange(stream)
    }
    frames[garbage] = b'{"type":"blocker_expired","project_id":10,"blocker_id":,"seq":18}'
    redis_client.delete(stream)
    for seq, frame in frames.items():
        redis_client.xadd(stream, {"f": frame, "t": "0"}, id=f"{seq}-0")

    checked: list[int] = []
    check = schemas.stored._check_frame

    def counting(frame, kind, project, tail):
        if kind is schemas.stored.ForeignKind.STREAM_ENTRY:
            checked.append(int(tail[len(b',"seq":') : -1]))
        return check(frame, kind, project, tail)

    monkeypatch.setattr(schemas.stored, "_check_frame", counting)
    reads = gateway.hub.subscribe_reads
    late = await client_for(gateway, [POISONED])
    subscribed = await late.subscribe(POISONED, epoch=epoch_of(redis_client, POISONED), after=3)
    assert gateway.hub.subscribe_reads == reads + 1  # from Redis, not the window
    resync = late.last("resync_required")
    assert (resync["reason"], resync["seq"], subscribed["seq"]) == ("history_corrupt", 20, 20)
    assert late.seqs(POISONED) == []  # nothing replayed past a corrupt entry
    assert sorted(checked) == [*range(4, 16), garbage]  # 16, 17, 19, 20: the window's bytes
    assert gateway.metrics.foreign_values["stream_entry"] >= 1
    await publish(publisher, POISONED, 1)
    await late.wait_for(lambda: late.seqs(POISONED) == [21])
    await keeper.wait_for(lambda: keeper.seqs(POISONED)[-1:] == [21])
    assert keeper.seqs(POISONED) == list(range(1, 22))
    await late.close()
    await keeper.close()
