"""Server-Sent Events: the pure formatting and parsing (hypothesis), then streams end to end
against in-process gateways on a private Redis, every delivery compared as a full sequence."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time

import pytest
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import (
    Cursor,
    SseParser,
    comment,
    data_lines,
    format_cursor,
    format_event,
    parse_last_event_id,
    parse_stream_target,
)
from publisher import AsyncPublisher, issue_token
from schemas.events import BlockerResolved, utc_now
from schemas.keys import Keys
from schemas.tags import event_tag
from tests.support.gateway_client import (
    CONTROL_TYPES,
    SECRET,
    client_for,
    publish,
    served_transport,
    start_gateway,
)
from tests.support.redis_server import RedisServer, hung
from tests.support.sse_client import open_stream, untagged
from tests.support.ws_client import wait_until

# --- pure: formatting and parsing ------------------------------------------------------------


def _normalised(payload: bytes) -> str:
    """What SSE carries of ``payload``: its first line break (CR, LF or CRLF) as LF, every
    later CR or LF as a tab (the same JSON whitespace, the same error inside a string)."""
    text = payload.decode()
    first = re.search(r"\r\n|\r|\n", text)
    if first is None:
        return text
    rest = text[first.end() :].replace("\r", "\t").replace("\n", "\t")
    return text[: first.start()] + "\n" + rest


#: Frames full of line breaks and SSE field names, as someone writing to Redis by hand may make.
_broken_frames = st.lists(
    st.sampled_from(["\r", "\n", "\r\n", "\n\n", " ", "{", "a", "id: x", "event: y", "data: z"]),
    max_size=30,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(
    payload=st.one_of(st.text(), _broken_frames).map(str.encode),
    event=st.sampled_from([None, "subscribed", "resync_required", "error"]),
    event_id=st.one_of(st.none(), st.from_regex(r"\A[A-Za-z0-9_-]{1,20}:[0-9]{1,6}\Z")),
    cut=st.lists(st.integers(min_value=0, max_value=400), max_size=5),
)
def test_any_frame_parses_back_to_its_data_and_injects_no_field(payload, event, event_id, cut):
    """Whatever bytes a frame holds (a foreign one in Redis included: line breaks, ``id:``,
    ``event:``, ``retry:``, empty lines), it is exactly one event with its own data, name and id,
    however the stream is cut into reads."""
    preceding = format_event(b'{"a":1}', event_id="e:1")
    stream = preceding + format_event(payload, event=event, event_id=event_id) + comment("k")
    parser = SseParser()
    events = []
    bounds = sorted({min(c, len(stream)) for c in cut})
    start = 0
    for bound in [*bounds, len(stream)]:
        events += parser.feed(stream[start:bound])
        start = bound
    assert len(events) == 2
    assert events[0].data == '{"a":1}' and events[0].id == "e:1"
    got = events[1]
    assert got.data == _normalised(payload)
    assert got.event == (event or "message")
    assert got.id == (event_id if event_id is not None else "e:1")
    assert parser.retry is None
    assert parser.comments == 1
    # At most two data lines, whatever the frame holds: its size, not a line per line break.
    assert len(data_lines(payload)) <= len(payload) + len(b"data: \ndata: \n")


def test_data_lines_cut_at_the_first_line_break_and_tab_the_rest():
    assert data_lines(b'{"a":1}') == b'data: {"a":1}\n'
    assert data_lines(b"{\n\r\n\r}") == b"data: {\ndata: \t\t\t}\n"
    assert data_lines(b"{\r\n1\r}") == b"data: {\ndata: 1\t}\n"  # a CRLF is one line break
    assert data_lines(b" x") == b"data:  x\n"  # the one space after the colon is dropped


def _json(text: str) -> object:
    """``text`` as a strict JSON decoder reads it (``JSON.parse``: a raw control character in a
    string, CR, LF and TAB included, is an error), or the exception type."""
    try:
        return json.loads(text)
    except ValueError as exc:
        return type(exc)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.tuples(
            st.sampled_from(['"a"', '"b c"', "1", "[", "]", ",", ":", "{", "}", "null", " "]),
            st.sampled_from(["", "", "\n", "\r", "\r\n"]),
        ),
        max_size=20,
    ),
    inside=st.lists(st.sampled_from(["", "\n", "\r", "\r\n"]), min_size=1, max_size=3),
)
def test_an_sse_data_is_json_exactly_when_its_frame_is(pieces, inside):
    """A frame holding line breaks (a foreign one) reaches an SSE client as the same JSON when
    it is JSON, and as no JSON when it is not, as its WebSocket frame does: a client drops it
    (``invalid_frame``) on either transport, or applies the same value. A line break inside a
    string (a raw control character: not JSON) must not become a space there (a valid string,
    another value): the SSE client applied an event the WebSocket client refused, so a client
    handed between them got other events than one subscribed throughout."""
    head = '{"type":"x","project_id":1,"k":'
    body = "".join(token + br for token, br in pieces)
    text = '"v' + "w".join(inside) + 'v"'  # a string, maybe with raw line breaks in it
    frame = f'{head}\n[{text},{body or "0"}],"seq":1}}'.encode()
    (got,) = SseParser().feed(format_event(frame, event_id="e:1"))
    assert _json(got.data) == _json(frame.decode())


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.integers(min_value=1, max_value=2**53 - 1),
        st.tuples(st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z"), st.integers(0, 10**15)),
        min_size=1,
        max_size=8,
    )
)
def test_compound_cursors_round_trip(raw):
    cursors = {p: Cursor(e, s) for p, (e, s) in raw.items()}
    projects = sorted(cursors)
    assert parse_last_event_id(format_cursor(cursors, True), projects) == cursors
    if len(cursors) == 1:
        assert parse_last_event_id(format_cursor(cursors, False), projects) == cursors


def test_last_event_id_forms():
    assert parse_last_event_id(None, [1]) == {}
    assert parse_last_event_id("", [1, 2]) == {}
    assert parse_last_event_id("abc:5", [7]) == {7: Cursor("abc", 5)}
    # Projects the stream does not follow are ignored; missing ones start from now.
    assert parse_last_event_id("1=a:1,3=b:2", [1, 2]) == {1: Cursor("a", 1)}
    # The protocol's bounds (schemas.protocol: a seq and a project id are at most 2**53 - 1),
    # the same as a WebSocket subscribe's and a poll's.
    assert parse_last_event_id("a:9007199254740991", [1]) == {1: Cursor("a", 2**53 - 1)}
    beyond = ("a:9007199254740992", "1=a:9007199254740992", "9007199254740992=a:1,1=a:1")
    for bad in ("abc", "abc:x", "a b:1", "1=a:1,1=a:2", "x=a:1", "abc:-1", "é:1", *beyond):
        with pytest.raises(ValueError):
            parse_last_event_id(bad, [1])
    with pytest.raises(ValueError, match="several"):
        parse_last_event_id("abc:5", [1, 2])


def test_stream_targets():
    assert parse_stream_target("/v1/projects/12/stream", 100) == ([12], False, False, False)
    assert parse_stream_target("/v1/stream?project=2&project=1&project=2", 100) == (
        [2, 1],
        True,
        False,
        False,
    )
    assert parse_stream_target("/v1/projects/12/stream?presence=1", 100).presence is True
    assert parse_stream_target("/v1/stream?presence=true&project=3", 100)[:3] == ([3], True, True)
    assert parse_stream_target("/v1/projects/12/stream?presence=0", 100).presence is False
    both = parse_stream_target("/v1/stream?project=1&project=2&presence=1&partial=1", 2)
    assert both == ([1, 2], True, True, True)
    assert parse_stream_target("/v1/projects/12/stream?partial=true", 100).partial is True
    for bad in (
        "/v1/projects/1/stream?presence=yes",
        "/v1/projects/1/stream?presence=1&presence=1",
        "/v1/projects/1/stream?project=2",
        "/v1/projects/0/stream",
        "/v1/projects/x/stream",
        "/v1/projects/1/stream?token=abc",  # never a token in the URL
        "/v1/stream",
        "/v1/stream?project=1&token=abc",
        "/v1/stream?project=1&project=2&project=3",
        "/v1/stream?project=1&partial=2",
        "/v1/stream?project=1&partial=1&partial=1",
    ):
        with pytest.raises(ValueError):
            parse_stream_target(bad, 2)
    # Thousands of ids (or of anything) get the documented limit, not the query parser's own
    # "Max number of fields exceeded"; it is read no further than that.
    for query in ("&".join(["project=1"] * 6), "&".join(f"project={p}" for p in range(1, 5001))):
        with pytest.raises(ValueError, match=r"^at most 2 projects per stream"):
            parse_stream_target("/v1/stream?" + query, 2)


# --- streams end to end ----------------------------------------------------------------------


def _auth(projects, ttl: int = 300, **extra) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(SECRET, projects, ttl=ttl)}", **extra}


def _url(gateway) -> str:
    return f"http://127.0.0.1:{gateway.port}"


def _events(items):
    return [item for item in items if item.event == "message"]


async def test_a_stream_carries_the_websocket_frames_with_cursor_ids(gateways, publisher):
    gateway = await gateways()
    ws = await client_for(gateway, [1])
    await ws.subscribe(1)
    status, headers, stream = await open_stream(_url(gateway), "/v1/projects/1/stream", _auth([1]))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    # Nothing between the gateway and the browser may store, transform (compress: buffered
    # until a block is full) or buffer the stream (nginx honours X-Accel-Buffering).
    cache_control = {d.strip() for d in headers["cache-control"].split(",")}
    assert {"no-store", "no-transform"} <= cache_control
    assert headers["x-accel-buffering"] == "no"
    head = await stream.until("subscribed")
    assert [e.event for e in head] == ["authenticated", "subscribed"]
    subscribed = json.loads(head[-1].data)
    epoch = subscribed["epoch"]
    assert head[-1].id == f"{epoch}:0" and subscribed["resumed"] is False
    await publish(publisher, 1, 30)
    got = [await stream.next() for _ in range(30)]
    assert [e.event for e in got] == ["message"] * 30
    # The id is the cursor after the event: its epoch, its seq and its tag, the tag of its text.
    assert [e.id for e in got] == [
        f"{epoch}:{n}:{event_tag(e.data.encode())}" for n, e in enumerate(got, 1)
    ]
    await ws.wait_for(lambda: len(ws.seqs(1)) == 30)
    frames = [m for m in ws.messages if m.get("type") == "blocker_resolved"]
    assert [json.loads(e.data) for e in got] == frames  # the same JSON as the WebSocket's
    stream.close()
    await ws.close()


async def test_last_event_id_resumes_exactly(gateways, publisher):
    gateway = await gateways()
    _, _, stream = await open_stream(_url(gateway), "/v1/projects/2/stream", _auth([2]))
    await stream.until("subscribed")
    await publish(publisher, 2, 5)
    got = [await stream.next() for _ in range(5)]
    last_id = got[-1].id
    stream.close()
    await publish(publisher, 2, 7)  # missed while away
    _, _, stream = await open_stream(
        _url(gateway), "/v1/projects/2/stream", _auth([2], **{"Last-Event-ID": last_id})
    )
    head = await stream.until("subscribed")
    replayed = _events(head)
    assert [json.loads(e.data)["seq"] for e in replayed] == list(range(6, 13))
    subscribed = json.loads(head[-1].data)
    assert subscribed["resumed"] is True and subscribed["replayed"] == 7
    await publish(publisher, 2, 1)
    live = await stream.next()
    assert json.loads(live.data)["seq"] == 13
    assert live.id.endswith(f":13:{event_tag(live.data.encode())}")
    stream.close()


async def test_an_unknown_epoch_gets_resync_required_then_continues(gateways, publisher):
    gateway = await gateways()
    await publish(publisher, 3, 4)
    _, _, stream = await open_stream(
        _url(gateway), "/v1/projects/3/stream", _auth([3], **{"Last-Event-ID": "gone:2"})
    )
    head = await stream.until("subscribed")
    assert [e.event for e in head] == ["authenticated", "resync_required", "subscribed"]
    resync = json.loads(head[1].data)
    assert resync["reason"] == "epoch_changed"
    assert head[1].id == f"{resync['epoch']}:4:{resync['tag']}"
    await publish(publisher, 3, 1)
    assert untagged((await stream.next()).id) == f"{resync['epoch']}:5"
    stream.close()


async def test_several_projects_share_one_stream_with_a_compound_cursor(gateways, publisher):
    gateway = await gateways()
    path = "/v1/stream?project=4&project=5"
    _, _, stream = await open_stream(_url(gateway), path, _auth([4, 5]))
    head = await stream.until("subscribed")
    head += await stream.until("subscribed")
    epochs = {
        json.loads(e.data)["project_id"]: json.loads(e.data)["epoch"]
        for e in head
        if e.event == "subscribed"
    }
    assert head[-1].id == f"4={epochs[4]}:0,5={epochs[5]}:0"
    await publish(publisher, 4, 2)
    await publish(publisher, 5, 1)
    got = [await stream.next() for _ in range(3)]
    assert [untagged(e.id) for e in got] == [
        f"4={epochs[4]}:1,5={epochs[5]}:0",
        f"4={epochs[4]}:2,5={epochs[5]}:0",
        f"4={epochs[4]}:2,5={epochs[5]}:1",
    ]
    stream.close()
    await publish(publisher, 5, 2)
    _, _, stream = await open_stream(
        _url(gateway), path, _auth([4, 5], **{"Last-Event-ID": got[-1].id})
    )
    head = await stream.until("subscribed")
    head += await stream.until("subscribed")
    assert [json.loads(e.data)["seq"] for e in _events(head)] == [2, 3]
    assert all(json.loads(e.data)["resumed"] for e in head if e.event == "subscribed")
    assert untagged(head[-1].id) == f"4={epochs[4]}:2,5={epochs[5]}:3"
    stream.close()


async def test_a_subscribe_that_raises_ends_the_stream_and_stops_the_others(gateways):
    """A bug while subscribing one of a stream's projects (here a planted exception) ends that
    stream with a ``close`` event (1011), so its client reconnects, and stops the stream's other
    subscribes then and there: never a stream left open with some projects silently missing,
    nor a subscribe left waiting for a stream that has ended."""
    gateway = await gateways()
    clients = gateway.clients
    real_subscribe = clients.subscribe
    hanging = asyncio.Event()
    stopped = asyncio.Event()

    async def subscribe(session, project_id, *args, **kwargs):
        if project_id == 7:  # waits (as for a hung Redis) until stopped
            hanging.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                stopped.set()
                raise
        if project_id == 8:
            await hanging.wait()
            raise RuntimeError("planted bug")
        return await real_subscribe(session, project_id, *args, **kwargs)

    clients.subscribe = subscribe
    path = "/v1/stream?project=7&project=8"
    status, _, stream = await open_stream(_url(gateway), path, _auth([7, 8]))
    assert status == 200
    events = await stream.rest()
    assert [e.event for e in events] == ["authenticated", "close"]
    close = json.loads(events[-1].data)
    assert close == {"type": "close", "code": 1011, "reason": "internal error"}
    await asyncio.wait_for(stopped.wait(), 5)
    await wait_until(lambda: not gateway.sessions, 5, "the stream to be gone")
    stream.close()


@pytest.mark.parametrize("projects", [[7], [7, 8]], ids=["one_project", "several"])
async def test_a_bug_before_the_subscribes_ends_the_stream_too(gateways, projects):
    """A bug in what a stream does before subscribing (here a planted exception in giving the
    session its token's claims) ends the stream with a ``close`` event (1011) as a bug in a
    subscribe does, so its client reconnects. Before, the exception escaped the stream's task
    unretrieved and the stream stayed open without any of its projects, sending keepalives only:
    its client waited for events that never came."""
    gateway = await gateways()

    def authenticate(session, claims):
        raise RuntimeError("planted bug")

    gateway.clients.authenticate = authenticate
    path = "/v1/stream?" + "&".join(f"project={p}" for p in projects)
    status, _, stream = await open_stream(_url(gateway), path, _auth(projects))
    assert status == 200
    events = await stream.rest()
    assert [e.event for e in events] == ["close"]
    close = json.loads(events[-1].data)
    assert close == {"type": "close", "code": 1011, "reason": "internal error"}
    await wait_until(lambda: not gateway.sessions, 5, "the stream to be gone")
    stream.close()


async def test_streams_are_authorised_by_the_header_only(gateways):
    gateway = await gateways()
    url = _url(gateway)
    token = issue_token(SECRET, [6], ttl=300)
    cases = [
        ("/v1/projects/6/stream", {}, 401),
        ("/v1/projects/6/stream", {"Authorization": "Bearer nope"}, 401),
        ("/v1/projects/6/stream", {"Authorization": f"Basic {token}"}, 401),
        (f"/v1/projects/6/stream?token={token}", {}, 400),  # never from the URL
        ("/v1/projects/7/stream", {"Authorization": f"Bearer {token}"}, 403),
        ("/v1/stream?project=6&project=7", {"Authorization": f"Bearer {token}"}, 403),
        ("/v1/projects/6/stream", {"Authorization": f"Bearer {token}", "Last-Event-ID": "x"}, 400),
        (  # a seq beyond 2**53 - 1, which a WebSocket subscribe and a poll refuse too
            "/v1/projects/6/stream",
            {"Authorization": f"Bearer {token}", "Last-Event-ID": "e:9007199254740992"},
            400,
        ),
    ]
    for path, headers, expected in cases:
        status, response_headers, stream = await open_stream(url, path, headers)
        body = await stream.reader.read()
        stream.close()
        assert status == expected, (path, headers, body)
        assert json.loads(body)["error"]
        assert response_headers["content-type"] == "application/json"
    before = gateway.metrics.auth_failures_total
    await open_stream(url, "/v1/projects/6/stream", {"Authorization": "Bearer x"})
    assert gateway.metrics.auth_failures_total == before + 1


async def test_a_stream_refused_for_its_token_is_logged_at_info_with_the_reason(gateways):
    """A stream refused 401 or 403 is one info line, "stream refused", with the code, the
    reason, the status and the client's address, as a refused poll or handshake is (before, it
    was counted only; its 400s were logged already, as "bad request")."""
    from structlog.testing import capture_logs

    gateway = await gateways()
    url = _url(gateway)
    token = issue_token(SECRET, [6], ttl=300)
    cases = [
        ({}, 401, "missing_token"),
        ({"Authorization": "Bearer nope"}, 401, "invalid_token"),
        ({"Authorization": f"Bearer {token}"}, 403, "forbidden"),
    ]
    for headers, status, error in cases:
        with capture_logs() as logs:
            got, _, stream = await open_stream(url, "/v1/projects/7/stream", headers)
            await stream.reader.read()
            stream.close()
        assert got == status
        (line,) = [entry for entry in logs if entry["event"] == "stream refused"]
        assert line["log_level"] == "info"
        assert (line["error"], line["status"]) == (error, status)
        assert line["reason"]
        assert re.fullmatch(r"127\.0\.0\.1:\d+", line["peer"])


async def test_an_expired_token_ends_the_stream_with_a_named_error(gateways):
    gateway = await gateways()
    token = issue_token(SECRET, [8], ttl=2)
    _, _, stream = await open_stream(
        _url(gateway), "/v1/projects/8/stream", {"Authorization": f"Bearer {token}"}
    )
    await stream.until("subscribed")
    rest = await stream.rest(within=10)
    assert [e.event for e in rest] == ["error", "close"]
    assert json.loads(rest[0].data)["code"] == "invalid_token"
    assert json.loads(rest[1].data)["code"] == 4002


async def _sse_leg(url, project_id, cursor, rng, publishing) -> tuple[list[str], tuple]:
    """Events of one stream resumed from ``cursor`` (epoch, seq, tag), read for a while."""
    epoch, seq, tag = cursor
    last_id = f"{epoch}:{seq}" + (f":{tag}" if tag else "")
    headers = _auth([project_id], **{"Last-Event-ID": last_id})
    _, _, stream = await open_stream(url, f"/v1/projects/{project_id}/stream", headers)
    texts = []
    try:
        wanted = rng.randint(0, 15)
        while True:
            try:
                item = await stream.next(within=0.3 if not publishing() else 2)
            except TimeoutError:
                break
            assert item is not None and item.event in ("message", "authenticated", "subscribed")
            if item.event != "authenticated":
                epoch, seq, *rest = item.id.split(":")
                cursor = (epoch, int(seq), rest[0] if rest else None)
            if item.event == "message":
                texts.append(item.data)
            if item.event != "authenticated" and len(texts) >= wanted and rng.random() < 0.5:
                break
    finally:
        stream.close()
    return texts, cursor


async def _poll_leg(port, project_id, cursor) -> tuple[list[str], tuple]:
    """Pages polled from ``cursor`` until one says ``more`` no longer (events re-encoded as
    the WebSocket sends them: compact JSON of the same object)."""
    from tests.test_gateway_http import request

    texts = []
    epoch, seq, tag = cursor
    while True:
        query = f"epoch={epoch}&after={seq}&limit=7" + (f"&tag={tag}" if tag else "")
        status, _, body = await request(
            port, f"/v1/projects/{project_id}/events?{query}", headers=_auth([project_id])
        )
        assert status == 200, body
        page = json.loads(body)
        assert page["resync_required"] is None, page
        texts += [json.dumps(e, separators=(",", ":")) for e in page["events"]]
        if page["events"]:
            seq = page["events"][-1]["seq"]
        tag = page["tag"]
        if not page["more"]:
            return texts, (epoch, seq, tag)


async def _websocket_leg(gateway, project_id, cursor, rng, publishing) -> tuple[list[str], tuple]:
    epoch, seq, tag = cursor
    client = await client_for(gateway, [project_id])
    try:
        await client.subscribe(project_id, epoch=epoch, after=seq, **({"tag": tag} if tag else {}))
        subscribed = client.last("subscribed")
        assert subscribed["resumed"] is True, subscribed
        wanted = rng.randint(0, 15)
        with contextlib.suppress(TimeoutError):
            await client.wait_for(
                lambda: len(client.seqs(project_id)) >= wanted, 0.3 if not publishing() else 2
            )
        assert client.count("resync_required") == 0
        texts = [
            text
            for text, message in zip(client.texts, client.messages, strict=True)
            if message.get("type") not in CONTROL_TYPES
        ]
    finally:
        await client.close()
    if texts:
        cursor = (epoch, json.loads(texts[-1])["seq"], event_tag(texts[-1].encode()))
    return texts, cursor


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_client_handed_between_sse_polls_and_websocket_gets_every_event_once(
    gateways, publisher, seed
):
    """A client carries one cursor (epoch, seq, tag) from transport to transport while events
    are published: a stream resumed with the ``id`` of its last event as ``Last-Event-ID``,
    polls from the cursor that gives (``tag`` included), a WebSocket subscribe from the
    cursor the last page gave, a stream again from the WebSocket's last event, and so on.
    What it gets, joined, is exactly what a WebSocket client subscribed throughout gets: every
    event once, in order, the same JSON, and no resync (every cursor it carried was exact)."""
    import random

    rng = random.Random(seed)
    gateway = await gateways()
    url = _url(gateway)
    project_id = 40 + seed
    reference = await client_for(gateway, [project_id])
    subscribed = await reference.subscribe(project_id)
    total = 300
    done = asyncio.Event()

    async def publish_slowly() -> None:
        for n in range(1, total + 1):
            await publisher.publish(
                BlockerResolved(
                    project_id=project_id, blocker_id=n, answer="ok", resolved_at=utc_now()
                )
            )
            if n % 5 == 0:
                await asyncio.sleep(0.01)
        done.set()

    def publishing() -> bool:
        return not done.is_set()

    task = asyncio.create_task(publish_slowly())
    cursor = (subscribed["epoch"], 0, None)
    got: list[str] = []
    legs = []
    try:
        while publishing() or cursor[1] < total:
            leg = rng.choice(["sse", "poll", "websocket"])
            legs.append(leg)
            if leg == "sse":
                texts, cursor = await _sse_leg(url, project_id, cursor, rng, publishing)
            elif leg == "poll":
                texts, cursor = await _poll_leg(gateway.port, project_id, cursor)
            else:
                texts, cursor = await _websocket_leg(gateway, project_id, cursor, rng, publishing)
            got += texts
    finally:
        await task
    await reference.wait_for(lambda: len(reference.seqs(project_id)) == total)
    expected = [
        json.loads(text)
        for text, message in zip(reference.texts, reference.messages, strict=True)
        if message.get("type") not in CONTROL_TYPES
    ]
    assert [json.loads(text) for text in got] == expected, legs
    assert set(legs) == {"sse", "poll", "websocket"}
    await reference.close()


@pytest.mark.parametrize("resume", [False, True], ids=["new", "resumed"])
async def test_a_stream_opened_while_redis_hangs_ends_in_time_and_resumes_exactly(resume):
    """Redis stops answering (SIGSTOP: its sockets open, nothing answers). A stream opened
    meanwhile, new or resumed with its ``Last-Event-ID``, of one project or several, gets
    ``error`` ``unavailable`` (one per project) and, none of its projects left, ``close`` 1011
    within --subscribe-timeout, never a stream
    left open without its projects; a stream already open goes on (its keepalives). Once Redis
    answers again, the ended stream's client resumes from the id it had and gets every event
    once, in order."""
    with RedisServer() as server:
        gateway = await start_gateway(
            server.url, subscribe_timeout=1.0, drain_timeout=1, sse_keepalive_interval=0.2
        )
        publisher = AsyncPublisher.from_url(server.url)
        try:
            url = _url(gateway)
            _, _, open_before = await open_stream(url, "/v1/projects/50/stream", _auth([50]))
            await open_before.until("subscribed")
            paths = {
                "one": "/v1/projects/51/stream",
                "several": "/v1/stream?project=51&project=52&partial=1",
                # (without ?partial=1: ended at the first failure, the other's error maybe sent)
                "several, not partial": "/v1/stream?project=51&project=52",
            }
            ids = {}
            for name, path in paths.items():
                _, _, stream = await open_stream(url, path, _auth([51, 52]))
                head = await stream.until("subscribed")
                if name != "one":
                    head += await stream.until("subscribed")
                ids[name] = head[-1].id
                stream.close()
            with hung(server):
                for name, path in paths.items():
                    extra = {"Last-Event-ID": ids[name]} if resume else {}
                    started = time.monotonic()
                    status, _, stream = await open_stream(url, path, _auth([51, 52], **extra))
                    events = await stream.rest(within=5)
                    elapsed = time.monotonic() - started
                    assert status == 200
                    # Each project's failure is named; the stream ends once none is left.
                    failed = [json.loads(e.data) for e in events if e.event == "error"]
                    errors = ["error"] * (2 if name == "several" else len(failed) or 1)
                    assert [e.event for e in events] == ["authenticated", *errors, "close"], name
                    assert {e["code"] for e in failed} == {"unavailable"}
                    if name != "several, not partial":
                        assert sorted(e["project_id"] for e in failed) == [51, 52][: len(errors)]
                    assert json.loads(events[-1].data)["code"] == 1011
                    assert elapsed < 3, (name, elapsed)
                comments = open_before.parser.comments

                async def keepalive() -> None:
                    while open_before.parser.comments == comments:
                        chunk = await open_before.reader.read(65536)
                        assert chunk, "the stream open before ended"
                        open_before.pending += open_before.parser.feed(chunk)

                await asyncio.wait_for(keepalive(), 3)
            await publish(publisher, 51, 3)
            await publish(publisher, 52, 2)
            for name, path in paths.items():
                headers = _auth([51, 52], **{"Last-Event-ID": ids[name]})
                _, _, stream = await open_stream(url, path, headers)
                head = await stream.until("subscribed")
                if name != "one":
                    head += await stream.until("subscribed")
                seqs = sorted(
                    (json.loads(e.data)["project_id"], json.loads(e.data)["seq"])
                    for e in head
                    if e.event == "message"
                )
                wanted = [(51, 1), (51, 2), (51, 3)] + ([(52, 1), (52, 2)] if name != "one" else [])
                assert seqs == wanted, name
                stream.close()
            open_before.close()
        finally:
            await publisher.aclose()
            await gateway.drain()


async def test_cors_for_the_dashboard_origin(gateways):
    origin = "https://dash.example"
    gateway = await gateways(allowed_origins=[origin])
    url = _url(gateway)
    status, headers, stream = await open_stream(
        url,
        "/v1/projects/9/stream",
        {"Origin": origin, "Access-Control-Request-Headers": "authorization,last-event-id"},
        method="OPTIONS",
    )
    stream.close()
    assert status == 204 and headers["access-control-allow-origin"] == origin
    allowed = {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "last-event-id"} <= allowed
    status, headers, stream = await open_stream(
        url, "/v1/projects/9/stream", _auth([9], Origin=origin)
    )
    assert status == 200 and headers["access-control-allow-origin"] == origin
    # A page may read Retry-After (a 503's): not a header CORS shows it unless exposed.
    assert headers["access-control-expose-headers"] == "Retry-After"
    await stream.until("subscribed")
    stream.close()
    status, headers, stream = await open_stream(
        url, "/v1/projects/9/stream", _auth([9], Origin="https://evil.example")
    )
    stream.close()
    assert status == 403 and "access-control-allow-origin" not in headers
    # Without Origin (not a browser): the token decides, no CORS headers.
    status, headers, stream = await open_stream(url, "/v1/projects/9/stream", _auth([9]))
    assert status == 200 and "access-control-allow-origin" not in headers
    await stream.until("subscribed")
    stream.close()


async def test_streams_count_against_max_connections(gateways):
    gateway = await gateways(max_connections=2)
    url = _url(gateway)
    streams = []
    for _ in range(2):
        status, _, stream = await open_stream(url, "/v1/projects/10/stream", _auth([10]))
        assert status == 200
        await stream.until("subscribed")
        streams.append(stream)
    status, headers, stream = await open_stream(url, "/v1/projects/10/stream", _auth([10]))
    stream.close()
    assert status == 503 and headers["retry-after"]
    assert gateway.admission.open == 2
    streams.pop().close()
    await _wait(lambda: gateway.admission.open == 1)
    status, _, stream = await open_stream(url, "/v1/projects/10/stream", _auth([10]))
    assert status == 200
    for s in [*streams, stream]:
        s.close()
    await _wait(lambda: gateway.admission.open == 0 and not gateway.sessions)
    assert gateway.hub.subscriptions == 0


async def test_idle_streams_get_keepalive_comments(gateways):
    gateway = await gateways(sse_keepalive_interval=0.2)
    _, _, stream = await open_stream(_url(gateway), "/v1/projects/11/stream", _auth([11]))
    await stream.until("subscribed")
    with pytest.raises(TimeoutError):
        await stream.next(within=0.7)  # nothing but comments
    assert stream.parser.comments >= 2
    stream.close()


async def test_draining_ends_streams_with_close_1012(gateways):
    gateway = await gateways()
    _, _, stream = await open_stream(_url(gateway), "/v1/projects/12/stream", _auth([12]))
    await stream.until("subscribed")
    drain = asyncio.create_task(gateway.drain())
    rest = await stream.rest()
    await drain
    assert [e.event for e in rest] == ["close"] and json.loads(rest[0].data)["code"] == 1012
    assert not gateway.sessions


async def _write_by_hand(redis_url: str, project_id: int, epoch: str, seq: int, frame: bytes):
    """``frame`` as the project's event ``seq``, written into Redis by someone else than the
    bus: in the stream, the meta's seq, and on the channel."""
    keys = Keys()
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.xadd(keys.stream(project_id), {"f": frame, "t": 0}, id=f"{seq}-0")
        await client.hset(keys.meta(project_id), "seq", seq)
        ms = int(time.time() * 1000)
        await client.publish(keys.channel(project_id), f"{epoch}|{seq}|{ms}|".encode() + frame)
    finally:
        await client.aclose()


async def test_a_foreign_frame_with_line_breaks_cannot_inject_sse_fields(
    gateways, publisher, redis_url
):
    """Someone else writes the next event into Redis by hand, JSON with raw line breaks between
    its tokens and SSE field names at the starts of lines: the stream carries it as one event
    with its own id. The same lines where JSON cannot hold them (no JSON: an SSE field on a line
    of its own) are never relayed: a resync past them."""
    gateway = await gateways()
    await publish(publisher, 13, 1)
    _, _, stream = await open_stream(_url(gateway), "/v1/projects/13/stream", _auth([13]))
    subscribed = json.loads((await stream.until("subscribed"))[-1].data)
    epoch = subscribed["epoch"]
    frame = b'{"type":"x","project_id":13,\r\n"a":1,\n\n"id":\n"evil",\n"event"\r:"evil","seq":2}'
    await _write_by_hand(redis_url, 13, epoch, 2, frame)
    got = await stream.next()
    assert got.event == "message" and untagged(got.id) == f"{epoch}:2"
    assert got.data == _normalised(frame)
    assert json.loads(got.data) == json.loads(frame)
    injection = b'{"type":"x","project_id":13,\r\n"a":1,\n\nid: evil\nevent: evil\r,"seq":3}'
    await _write_by_hand(redis_url, 13, epoch, 3, injection)
    await publish(publisher, 13, 1)
    resync = await stream.next()
    assert resync.event == "resync_required" and untagged(resync.id) == f"{epoch}:4"
    assert json.loads(resync.data)["reason"] == "history_corrupt"
    await publish(publisher, 13, 1)
    after = await stream.next()
    assert after.event == "message" and untagged(after.id) == f"{epoch}:5"
    stream.close()


async def test_a_foreign_frame_of_line_breaks_costs_streams_its_size_and_freezes_nothing(
    gateways, publisher, redis_url
):
    """Someone writes into Redis a frame that passes the gateway's check but is a megabyte of
    raw line breaks (JSON whitespace), followed on streams of several projects, each of which
    builds its own bytes (every ``id`` differs). Each stream gets it as one event of about the
    frame's size, within --outbound-limit, and the gateway goes on answering. Before, every
    line break became a ``data:`` line of its own: 7 MB per stream (each cut as a slow
    consumer, and cut again by the replay of its resume), built a line at a time, about 0.3 s
    of the event loop per stream: 9 s for these ten, every client of the pod frozen."""
    gateway = await gateways()
    await publish(publisher, 17, 1)
    path = "/v1/stream?project=17&project=18"
    streams = []
    for _ in range(10):
        _, _, stream = await open_stream(_url(gateway), path, _auth([17, 18]))
        head = await stream.until("subscribed")
        head += await stream.until("subscribed")
        streams.append(stream)
    (epoch,) = [
        json.loads(e.data)["epoch"]
        for e in head
        if e.event == "subscribed" and json.loads(e.data)["project_id"] == 17
    ]
    frame = b'{"type":"x","project_id":17,"a":1' + b"\n" * 1_000_000 + b',"seq":2}'
    keys = Keys()
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.xadd(keys.stream(17), {"f": frame, "t": 0}, id="2-0")
        await client.hset(keys.meta(17), "seq", 2)
        ms = int(time.time() * 1000)
        await client.publish(keys.channel(17), f"{epoch}|2|{ms}|".encode() + frame)
    finally:
        await client.aclose()
    for stream in streams:
        got = await stream.next(within=10)
        assert got.event == "message" and untagged(got.id) == f"17={epoch}:2,18={epoch_18(head)}:0"
        assert json.loads(got.data) == json.loads(frame)  # the same JSON
        assert len(got.data) == len(frame)  # a line break for a line break, or a tab
    assert gateway.metrics.slow_consumer_disconnects_total == 0
    await publish(publisher, 18, 1)
    for stream in streams:
        got = await stream.next()
        assert untagged(got.id) == f"17={epoch}:2,18={epoch_18(head)}:1"
        stream.close()


def epoch_18(head) -> str:
    (epoch,) = [
        json.loads(e.data)["epoch"]
        for e in head
        if e.event == "subscribed" and json.loads(e.data)["project_id"] == 18
    ]
    return epoch


@pytest.mark.parametrize(
    "frame",
    [b'{"type":"x","seq":2}', b'{"type":"x","project_id":16,"seq":2}'],
    ids=["no_project_id", "another_project_id"],
)
async def test_a_foreign_frame_cannot_move_another_projects_cursor(
    gateways, publisher, redis_url, frame
):
    """On a stream of several projects, a frame written into project 15's history by hand that
    names no project, or project 16, is foreign (schemas.stored): project 15 gets
    history_corrupt instead, and both cursors stay exact (a wrong one would make a resume
    repeat or skip events). An event's ``id`` comes from the feed it was delivered by anyway,
    never from the frame's JSON."""
    gateway = await gateways(reconcile_interval=0.2)
    await publish(publisher, 15, 1)
    await publish(publisher, 16, 1)
    path = "/v1/stream?project=15&project=16"
    _, _, stream = await open_stream(_url(gateway), path, _auth([15, 16]))
    head = await stream.until("subscribed")
    head += await stream.until("subscribed")
    epochs = {
        json.loads(e.data)["project_id"]: json.loads(e.data)["epoch"]
        for e in head
        if e.event == "subscribed"
    }
    keys = Keys()
    client = redis.asyncio.Redis.from_url(redis_url)
    try:  # in the stream only: the periodic check finds it
        await client.xadd(keys.stream(15), {"f": frame, "t": 0}, id="2-0")
        await client.hset(keys.meta(15), "seq", 2)
    finally:
        await client.aclose()
    got = await stream.next()  # never relayed: the gateway says so, for project 15 alone
    assert got.event == "resync_required"
    resync = json.loads(got.data)
    assert (resync["project_id"], resync["reason"], resync["seq"]) == (15, "history_corrupt", 2)
    assert untagged(got.id) == f"15={epochs[15]}:2,16={epochs[16]}:1"
    await publish(publisher, 15, 1)
    await publish(publisher, 16, 1)
    got = [await stream.next() for _ in range(2)]
    assert [untagged(e.id) for e in got] == [
        f"15={epochs[15]}:3,16={epochs[16]}:1",
        f"15={epochs[15]}:3,16={epochs[16]}:2",
    ]
    stream.close()


async def test_a_closed_stream_is_freed_without_waiting_for_the_cycle_collector(gateways):
    # As a WebSocket connection (tests/test_gateway.py), a stream leaves no reference cycle once
    # it ends, however it ends: the stream, its session, and the WebSocket connection it took
    # its socket over from, with websockets' parser (a suspended generator holding its protocol
    # and the request, Authorization header included). Checked by what is still alive with the
    # collector off: a cycle through a generator is broken by the generator's finalizer during
    # a collection, and never shows in gc.garbage. Nor is the socket's transport left (on
    # Python 3.11 it points at itself until collected).
    import gc

    from websockets.http11 import Request
    from websockets.server import ServerProtocol

    from gateway.sse import SseConnection, SseSession
    from gateway.websocket import WebSocketConnection

    gateway = await gateways()
    url = _url(gateway)
    ours = (SseConnection, SseSession, WebSocketConnection, ServerProtocol, Request)
    gc.collect()
    gc.disable()  # what reference counting does not free stays alive until gc.enable()
    try:
        for how in ("closed", "aborted", "refused", "several projects"):
            path = "/v1/stream?project=1&project=2" if how == "several projects" else None
            headers = {} if how == "refused" else _auth([1, 2])
            status, _, stream = await open_stream(url, path or "/v1/projects/1/stream", headers)
            if how == "refused":
                assert status == 401
                await stream.rest()
            else:
                await stream.until("subscribed")
            if how == "aborted":
                stream.writer.transport.abort()
            else:
                stream.close()
        await _wait(lambda: not gateway.sessions and gateway.admission.open == 0)
        left = [
            type(o).__name__
            for o in gc.get_objects()
            # (a Request of another path is a client's, from another test)
            if (isinstance(o, ours) and (not isinstance(o, Request) or "stream" in o.path))
            or served_transport(o, gateway.port)
        ]
    finally:
        gc.enable()
    assert left == []


async def _wait(predicate, within: float = 5.0) -> None:
    await wait_until(predicate, within, "the gateway to notice", interval=0.01)


async def _raw(port: int, request: bytes) -> tuple[int, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_malformed_stream_requests_get_4xx_not_500(gateways):
    """A repeated header, another method, a cursor that is not one: a JSON 4xx each, counted,
    and the gateway keeps serving."""
    gateway = await gateways()
    token = issue_token(SECRET, [14], ttl=300)
    auth = f"Authorization: Bearer {token}\r\n"
    head = "GET /v1/projects/14/stream HTTP/1.1\r\nHost: x\r\n" + auth
    cases = [
        (f"{head}{auth}\r\n", 400),
        (f"{head}Origin: a\r\nOrigin: b\r\n\r\n", 400),
        (f"{head}Last-Event-ID: a:1\r\nLast-Event-ID: b:2\r\n\r\n", 400),
        (
            f"POST /v1/projects/14/stream HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\n\r\n",
            405,
        ),
        (f"GET /v1/projects/99999999999999999/stream HTTP/1.1\r\nHost: x\r\n{auth}\r\n", 400),
        (f"GET /v1/stream?project=14&project=x HTTP/1.1\r\nHost: x\r\n{auth}\r\n", 400),
        (f"{head}Last-Event-ID: {'9' * 5000}\r\n\r\n", 400),
    ]
    for request, expected in cases:
        status, body = await _raw(gateway.port, request.encode())
        assert status == expected, (request[:80], body)
        assert body["error"]
    assert gateway.metrics.bad_requests_total >= 5
    _, _, stream = await open_stream(_url(gateway), "/v1/projects/14/stream", _auth([14]))
    await stream.until("subscribed")
    stream.close()


async def test_a_stream_request_offering_another_upgrade_is_still_a_stream(gateways):
    """An ``Upgrade`` the gateway does not speak (``curl --http2`` offers ``h2c`` on every
    http:// request) is ignored, as HTTP lets a server do: the stream is served, not a 404 "no
    route" for the stream's own path. A WebSocket upgrade of the path, and a repeated
    ``Upgrade``, are still the WebSocket transport's (answered 400 here: no key; repeated)."""
    gateway = await gateways()
    h2c = {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": "AAMAAABk"}
    for path in ("/v1/projects/17/stream", "/v1/stream?project=17"):
        status, headers, stream = await open_stream(_url(gateway), path, _auth([17], **h2c))
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        await stream.until("subscribed")
        stream.close()
    token = issue_token(SECRET, [17], ttl=300)
    head = f"GET /v1/projects/17/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(f"{head}Connection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Sec-WebSocket-Key" in answer
    status, body = await _raw(gateway.port, f"{head}Upgrade: h2c\r\nUpgrade: h2c\r\n\r\n".encode())
    assert status == 400 and "Upgrade" in body["message"]


class _Transport:
    """A transport double that keeps what is written (no socket: every write is buffered)."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default=None):
        return default


def test_streams_sharing_cached_bytes_keep_exact_cursors():
    """The hub writes one items list to each live subscriber in turn; single-project streams
    reuse the bytes the previous one built. Whatever the order, a stream leaving, and replies of
    its own in between (an error, a resync), every stream's ids stay its own exact cursors."""
    from gateway.session import Outgoing, SlowConsumerPolicy
    from gateway.sse import SseSession
    from schemas.protocol import Error, ErrorCode, ResyncReason, ResyncRequired

    policy = SlowConsumerPolicy(1 << 20, 30)
    streams = [
        SseSession(
            _Transport(),
            policy,
            lambda s: None,
            multi=False,
            cursors={7: Cursor("e", 0)},
            project_id=7,
        )
        for _ in range(4)
    ]
    expected: list[list[str]] = [[] for _ in streams]
    epoch, seq = "e", 0

    def frame(n: int) -> Outgoing:
        return Outgoing(b'{"type":"x","project_id":7,"seq":%d}' % n)

    stream_epoch = "e"  # the epoch the streams are in before a burst
    for burst in range(12):
        live = [i for i in range(len(streams)) if not (burst >= 6 and i == 0)]  # 0 leaves
        live = live[burst % len(live) :] + live[: burst % len(live)]  # the order changes
        items = []
        for _ in range(1 + burst % 3):
            seq += 1
            items.append(frame(seq))
        if burst == 8:  # the feed's history was recreated: a resync in the shared list
            epoch, seq = "f", 40
            items.append(
                Outgoing.message(
                    ResyncRequired(
                        project_id=7, reason=ResyncReason.EPOCH_CHANGED, epoch=epoch, seq=seq
                    )
                )
            )
            seq += 1
            items.append(frame(seq))
        wire = b"".join(item.wire for item in items)
        ids, after = _ids_of(items, stream_epoch)
        for i in live:
            streams[i].write(wire, items)
            expected[i] += ids
        stream_epoch = after
        # A reply of its own to one stream (through its outbox), between two bursts.
        lone = streams[live[-1]]
        lone.outbox = [
            Outgoing.message(Error(code=ErrorCode.UNAVAILABLE, message="x", project_id=None))
        ]
        lone.flush()
    for stream, want in zip(streams, expected, strict=True):
        parser = SseParser()
        got = [e.id for e in parser.feed(stream.transport.data) if e.event != "error"]
        assert got == want


def _ids_of(items, epoch: str) -> tuple[list[str], str]:
    """The ids a stream's events carry for ``items`` (events, and a resync's new cursor), from
    ``epoch``; and the epoch after them."""
    ids = []
    for item in items:
        if item.kind == "resync_required":
            epoch = item.epoch
            ids.append(f"{epoch}:{item.seq}")
        elif not item.kind:
            ids.append(f"{epoch}:{int(item.payload.rsplit(b':', 1)[1][:-1])}")
    return ids, epoch


@settings(max_examples=200, deadline=None)
@given(
    resumed=st.dictionaries(st.integers(1, 30), st.integers(0, 50), max_size=6),
    steps=st.lists(
        st.tuples(st.integers(1, 30), st.sampled_from(["event", "subscribed", "resync"])),
        max_size=40,
    ),
    cuts=st.lists(st.integers(0, 40), max_size=4),
)
def test_a_stream_of_several_projects_ids_each_item_with_every_projects_cursor(
    resumed, steps, cuts
):
    """Whatever its projects' items (events, ``subscribed`` and ``resync_required`` of projects
    new to the stream or not) and however they are cut into writes, the ``id`` of each is the
    cursor of every project the stream has one for, sorted (:func:`format_cursor`)."""
    from gateway.session import Outgoing, SlowConsumerPolicy
    from gateway.sse import SseSession
    from schemas.protocol import ResyncReason, ResyncRequired, Subscribed

    cursors = {p: Cursor(f"e{p}", seq) for p, seq in resumed.items()}
    stream = SseSession(
        _Transport(),
        SlowConsumerPolicy(1 << 30, 30),
        lambda s: None,
        multi=True,
        cursors=cursors,
    )
    model = dict(cursors)
    items, expected = [], []
    for project_id, kind in steps:
        if kind == "event" and project_id not in model:
            continue  # (the hub sends no event of a project before its cursor)
        if kind == "event":
            seq = model[project_id].seq + 1
            item = Outgoing(b'{"type":"x","project_id":%d,"seq":%d}' % (project_id, seq))
            item.project_id, item.seq = project_id, seq
            model[project_id] = Cursor(model[project_id].epoch, seq, item.tag)
        elif kind == "subscribed":
            seq = model[project_id].seq if project_id in model else 0
            epoch = model[project_id].epoch if project_id in model else f"e{project_id}"
            item = Outgoing.message(
                Subscribed(project_id=project_id, epoch=epoch, seq=seq, resumed=True, replayed=0)
            )
            model[project_id] = Cursor(epoch, seq, None)
        else:
            epoch = f"r{project_id}"
            item = Outgoing.message(
                ResyncRequired(
                    project_id=project_id, reason=ResyncReason.EPOCH_CHANGED, epoch=epoch, seq=7
                )
            )
            model[project_id] = Cursor(epoch, 7, None)
        items.append(item)
        expected.append(format_cursor(model, True))
    bounds = sorted({min(c, len(items)) for c in cuts})
    start = 0
    for bound in [*bounds, len(items)]:
        if bound > start:
            stream.write(b"", items[start:bound])
        start = bound
    got = [e.id for e in SseParser().feed(stream.transport.data)]
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(
    single=st.booleans(),
    resumed=st.dictionaries(st.integers(1, 12), st.integers(0, 50), max_size=4),
    steps=st.lists(
        st.tuples(
            st.integers(1, 12),
            st.sampled_from(
                ["event", "unsaid", "replay", "subscribed", "resync", "presence", "authenticated"]
            ),
            st.integers(1, 3),
            st.booleans(),
        ),
        max_size=30,
    ),
)
def test_every_id_is_the_streams_cursors_whatever_moved_them(single, resumed, steps):
    """The ``id`` after each event of a stream, one project or several, is exactly the cursor
    of every project the stream has one for (:func:`format_cursor`), whatever moved it: a live
    event (its project and seq said by the hub or not), a resume's replay queued with its
    ``subscribed`` (flushed with what was queued before and after it: the replay's allowance
    path), a ``subscribed`` of a project new to the stream, a resync; messages without a
    cursor (presence, ``authenticated``) leave it as it was (a client keeps the last ``id``)."""
    from gateway.session import Outgoing, SlowConsumerPolicy
    from gateway.sse import SseSession
    from schemas.protocol import Authenticated, Presence, ResyncReason, ResyncRequired, Subscribed

    only = min([*resumed, *(step[0] for step in steps), 1])
    if single:
        resumed = {p: seq for p, seq in resumed.items() if p == only}
        steps = [(only, *rest) for _, *rest in steps]
    cursors = {p: Cursor(f"e{p}", seq) for p, seq in resumed.items()}
    stream = SseSession(
        _Transport(),
        SlowConsumerPolicy(1 << 30, 30),
        lambda s: None,
        multi=not single,
        cursors=cursors,
        project_id=only if single else 0,
    )
    model = dict(cursors)
    expected: list[str | None] = []

    def moved() -> None:
        expected.append(format_cursor(model, not single))

    def event(project_id: int, said: bool) -> Outgoing:
        seq = model[project_id].seq + 1
        payload = b'{"type":"x","project_id":%d,"seq":%d}' % (project_id, seq)
        item = Outgoing(payload, project_id, seq) if said else Outgoing(payload)
        tag = event_tag(payload) if said else None
        model[project_id] = Cursor(model[project_id].epoch, seq, tag)
        return item

    for project_id, kind, n, flush in steps:
        if kind in ("event", "unsaid", "replay") and project_id not in model:
            continue  # (the hub sends no event of a project before its cursor)
        if kind in ("event", "unsaid"):
            assert stream.flush()  # (the hub flushes a stream's own items before live ones)
            stream.write(b"", [event(project_id, kind == "event")])
            moved()
            continue
        if kind == "replay":
            items = []
            for _ in range(n):
                items.append(event(project_id, True))
                moved()
            stream.send_replay(items, b"")
            cursor = model[project_id]
            stream.send_message(
                Subscribed(
                    project_id=project_id,
                    epoch=cursor.epoch,
                    seq=cursor.seq,
                    resumed=True,
                    replayed=n,
                )
            )
            model[project_id] = Cursor(cursor.epoch, cursor.seq, None)
            moved()
        elif kind == "subscribed":
            cursor = model.get(project_id, Cursor(f"e{project_id}", 0))
            stream.send_message(
                Subscribed(
                    project_id=project_id,
                    epoch=cursor.epoch,
                    seq=cursor.seq,
                    resumed=False,
                    replayed=0,
                )
            )
            model[project_id] = Cursor(cursor.epoch, cursor.seq, None)
            moved()
        elif kind == "resync":
            stream.send_message(
                ResyncRequired(
                    project_id=project_id, reason=ResyncReason.EPOCH_CHANGED, epoch="r", seq=n
                )
            )
            model[project_id] = Cursor("r", n, None)
            moved()
        else:
            if kind == "presence":
                stream.send_message(Presence(project_id=project_id, members=[]))
            else:
                stream.send_message(Authenticated(subject="s", projects=None, expires_at=None))
            expected.append(expected[-1] if expected else None)
        if flush:
            assert stream.flush()
    assert stream.flush()
    got = [e.id for e in SseParser().feed(stream.transport.data)]
    assert got == expected


class _ClosableTransport(_Transport):
    """:class:`_Transport` that a stream can close (its close is recorded)."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


@pytest.mark.parametrize("how", ["refused", "ended"])
async def test_a_failed_project_leaves_a_stream_of_several_open_until_none_is_left(how):
    """A stream of three projects: the subscription of one is refused (its subscribe failed,
    the project no longer followed) or ended by the hub (``ended``). Its ``error`` is written
    and the stream goes on for the other two, their events' ids still naming the failed
    project's last cursor (a stream reopened from any of them resumes it where it stopped).
    Only when the last of them fails too does the stream end, 1011. A stream of one project
    ends at its first failure, as before."""
    from gateway.session import Outgoing, SlowConsumerPolicy
    from gateway.sse import SseSession
    from schemas.protocol import Error, ErrorCode

    def fail(stream, project_id: int) -> None:
        stream.projects.discard(project_id)
        stream.send_message(
            Error(
                code=ErrorCode.UNAVAILABLE,
                message="unreadable",
                project_id=project_id,
                ended=True if how == "ended" else None,
            )
        )
        if how == "refused":  # what _subscribe does once its error is queued, not yet written
            stream.subscription_failed(project_id)
        stream.flush()

    def event(project_id: int, seq: int) -> Outgoing:
        payload = b'{"type":"x","project_id":%d,"seq":%d}' % (project_id, seq)
        return Outgoing(payload, project_id, seq)

    stream = SseSession(
        _ClosableTransport(),
        SlowConsumerPolicy(1 << 30, 30),
        lambda s: None,
        multi=True,
        cursors={p: Cursor(f"e{p}", 5) for p in (1, 2, 3)},
        width=3,
    )
    stream.projects.update((1, 2, 3))
    stream.write(b"", [event(2, 6)])
    fail(stream, 2)
    await asyncio.sleep(0)  # (the close, if any, is scheduled: not from inside a write)
    assert not stream.closing
    stream.write(b"", [event(1, 6)])
    stream.write(b"", [event(3, 6)])
    got = SseParser().feed(stream.transport.data)
    assert [e.event for e in got] == ["message", "error", "message", "message"]
    assert json.loads(got[1].data)["project_id"] == 2
    assert [untagged(e.id) for e in got if e.event == "message"] == [
        "1=e1:5,2=e2:6,3=e3:5",
        "1=e1:6,2=e2:6,3=e3:5",
        "1=e1:6,2=e2:6,3=e3:6",
    ]
    fail(stream, 3)
    await asyncio.sleep(0)
    assert not stream.closing
    fail(stream, 1)
    await asyncio.sleep(0)
    assert stream.closing
    rest = SseParser().feed(stream.transport.data)[len(got) :]
    assert [e.event for e in rest][-1] == "close"
    assert json.loads(rest[-1].data)["code"] == 1011
    assert [e.event for e in rest].count("error") == 2

    single = SseSession(
        _ClosableTransport(),
        SlowConsumerPolicy(1 << 30, 30),
        lambda s: None,
        multi=False,
        cursors={4: Cursor("e4", 1)},
        project_id=4,
    )
    single.projects.add(4)
    fail(single, 4)
    await asyncio.sleep(0)
    assert single.closing
    ended = SseParser().feed(single.transport.data)
    assert [e.event for e in ended] == ["error", "close"]
    assert json.loads(ended[-1].data)["code"] == 1011
