"""The query strings of the polling fallback and of SSE streams, fuzzed against an in-process
gateway on real Redis: parameters repeated, blank, unknown, percent-escaped (their names too),
non-ASCII (UTF-8 and not), huge numbers, cursors and tags of every shape, ``partial`` and
``presence`` flags, many projects, and the path's project id in many spellings.

Whatever the query, with a token allowing projects 4 and 6 (and events in 4, 5 and 6):

* the answer is a documented status (200, 400, 403, 414 for a request line over 8,192 bytes;
  never a 500), within a bound (never a hang);
* a 200 carries only projects the token allows: a poll's page is of the path's project, spelled
  as the protocol spells ids, and every event of it is that project's; a stream's events,
  ``subscribed``, ``resync_required`` and ``error`` name only the stream's allowed projects.

The gateway runs on the test's event loop; hypothesis draws and sends the requests from a
thread (blocking sockets with a timeout: a hang is a failure, not a stuck test).
"""

from __future__ import annotations

import asyncio
import json
import socket
import string
from collections import Counter
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.sse import SseParser, parse_stream_target
from publisher import issue_token
from tests.support.gateway_client import SECRET, publish

ALLOWED = (4, 6)
PROJECTS = (4, 5, 6)
#: Seconds an answer (a poll's, a stream's head and first subscribes) may take: far above a
#: poll's --subscribe-timeout (5 s) bound on Redis.
WITHIN = 15.0
FUZZ = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

names = st.one_of(
    st.sampled_from(
        [
            "epoch", "after", "tag", "limit", "partial", "presence", "project", "token",
            "%65poch", "ep%6Fch", "af%74er", "pro%6Aect", "EPOCH", "after[]", "project[]",
            "", "%20project", "project%20", "project+", "%00", "a" * 300,
        ]
    ),
    st.text(string.ascii_letters + "%_-[].", min_size=1, max_size=12),
)  # fmt: skip

#: Each value as it goes in the query: written raw (the characters a URL may hold as they are)
#: or percent-encoded from any text.
values = st.one_of(
    st.sampled_from(
        [
            "", "0", "1", "4", "5", "6", "04", "-1", "+1", "%2B1", "1%20", "%201", "1.0", "1e3",
            "9007199254740991", "9007199254740992", "9" * 17, "9" * 5000,
            "0123456789abcdef", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0",
            "true", "false", "yes", "TRUE", "%00", "%ZZ", "%", "%%", "%C3%A9", "%FF%FE",
            "%D9%A3", "%EF%BC%94", "%C2%B2", "4,5", "4%265", "4%26project%3D5", "*", "+",
            "1000", "1001", "E", "{epoch}",
        ]
    ),
    st.text(string.ascii_letters + string.digits + "%+-_.~:", max_size=30),
    st.text(max_size=12).map(lambda text: quote(text, safe="")),
)  # fmt: skip

separators = st.sampled_from(["&", "&", "&", "&&", ";", "&;"])


def _escaped(name: str, index: int) -> str:
    """``name`` with its character at ``index`` percent-escaped (the same name, once decoded)."""
    index %= max(1, len(name))
    return (
        name[:index]
        + "".join(f"%{byte:02X}" for byte in name[index : index + 1].encode())
        + name[index + 1 :]
    )


@st.composite
def queries(draw, epoch: str, bases: st.SearchStrategy[list[tuple[str, str]]]) -> str:
    """A query: a valid one (``bases``) with a few changes, or anything."""
    if draw(st.integers(0, 2)):
        pairs = list(draw(bases))
        for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
            change = draw(st.integers(0, 3))
            if change == 0:
                pairs.insert(draw(st.integers(0, len(pairs))), draw(st.tuples(names, values)))
            elif change == 1 and pairs:
                pairs.append(draw(st.sampled_from(pairs)))  # a repeat
            elif change == 2 and pairs:
                at = draw(st.integers(0, len(pairs) - 1))
                name, value = pairs[at]
                pairs[at] = (_escaped(name, draw(st.integers(0, 20))), value)
            elif change == 3 and pairs:
                at = draw(st.integers(0, len(pairs) - 1))
                pairs[at] = (pairs[at][0], draw(values))
    else:
        pairs = draw(st.lists(st.tuples(names, values), max_size=12))
    if pairs and draw(st.integers(0, 4)) == 0:
        pairs.append(draw(st.sampled_from(pairs)))  # a repeat
    parts = [
        name if draw(st.integers(0, 9)) == 0 else f"{name}={value.replace('{epoch}', epoch)}"
        for name, value in pairs
    ]
    query = ""
    for part in parts:
        query += (draw(separators) if query else "") + part
    if draw(st.integers(0, 9)) == 0:
        query += draw(st.sampled_from(["#", "#x", "#&project=5", "&", "?"]))
    return query


#: The path's project id, as a client or an attacker may spell it.
path_ids = st.one_of(
    st.sampled_from(["4", "6"]),
    st.sampled_from(["4", "6"]),
    st.sampled_from(["4", "6"]),
    st.sampled_from(
        ["4", "5", "6", "04", "%34", "4%00", "4%2F5", "4,5", "0", "-4", "+4", "%D9%A4", "1" * 17]
    ),
    st.integers(1, 10).map(str),
    st.text(string.ascii_letters + string.digits + "%", max_size=6).filter(bool),
)


def exchange(port: int, target: str, headers: dict[str, str]) -> tuple[int, socket.socket, bytes]:
    """Send a GET of ``target``; its status, the socket (open, for a stream) and what followed the
    head in the reads so far."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WITHIN)
    lines = [f"GET {target} HTTP/1.1", "Host: localhost", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without an answer: {target[:200]!r} {data[:200]!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), sock, rest


def read_to_end(sock: socket.socket, data: bytes) -> bytes:
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    return data


async def _fed(gateways, publisher):
    gateway = await gateways()
    for project_id in PROJECTS:
        await publish(publisher, project_id, 3)
    return gateway


def _cursors(port: int, authorization: str) -> dict[int, tuple[str, str]]:
    """Each allowed project's epoch, and the tag of its first event."""
    cursors = {}
    for project_id in ALLOWED:
        status, sock, rest = exchange(
            port, f"/v1/projects/{project_id}/events", {"Authorization": authorization}
        )
        assert status == 200
        epoch = json.loads(read_to_end(sock, rest))["epoch"]
        target = f"/v1/projects/{project_id}/events?epoch={epoch}&after=0&limit=1"
        status, sock, rest = exchange(port, target, {"Authorization": authorization})
        assert status == 200
        cursors[project_id] = epoch, json.loads(read_to_end(sock, rest))["tag"]
    return cursors


async def test_no_poll_query_gets_a_500_a_hang_or_a_page_the_token_does_not_allow(
    gateways, publisher
):
    gateway = await _fed(gateways, publisher)
    authorization = f"Bearer {issue_token(SECRET, list(ALLOWED), ttl=3600)}"
    epoch, tag = (await asyncio.to_thread(_cursors, gateway.port, authorization))[4]
    bases = st.sampled_from(
        [
            [],
            [("epoch", epoch), ("after", "0")],
            [("epoch", epoch), ("after", "1"), ("tag", tag)],
            [("after", "2"), ("epoch", epoch), ("limit", "1")],
            [("limit", "1000")],
            [("epoch", "other"), ("after", "1")],
        ]
    )
    statuses: Counter[int] = Counter()

    @FUZZ
    @given(project=path_ids, query=queries(epoch, bases))
    def check(project: str, query: str) -> None:
        target = f"/v1/projects/{project}/events" + (f"?{query}" if query else "")
        status, sock, rest = exchange(gateway.port, target, {"Authorization": authorization})
        body = read_to_end(sock, rest)
        statuses[status] += 1
        assert status in (200, 400, 403, 414), (status, target[:300], body[:300])
        if status != 200:
            error = json.loads(body)["error"]
            assert error in ("invalid_project", "invalid_query", "forbidden", "request_too_large")
            return
        assert project in ("4", "6"), target[:300]
        page = json.loads(body)
        assert page["project_id"] == int(project)
        assert all(event["project_id"] == int(project) for event in page["events"])

    await asyncio.to_thread(check)
    # The property was checked on pages, not only on refusals (about a fifth are pages).
    assert statuses[200] >= 20, statuses


async def test_no_stream_query_gets_a_500_a_hang_or_events_the_token_does_not_allow(
    gateways, publisher
):
    gateway = await _fed(gateways, publisher)
    authorization = f"Bearer {issue_token(SECRET, list(ALLOWED), ttl=3600)}"
    cursors = await asyncio.to_thread(_cursors, gateway.port, authorization)
    epochs = {project_id: epoch for project_id, (epoch, _) in cursors.items()}
    flags = st.lists(st.sampled_from([("partial", "1"), ("presence", "true")]), unique=True)
    several = st.tuples(
        st.lists(st.sampled_from([("project", "4"), ("project", "6")]), min_size=1, max_size=3),
        flags,
    ).map(lambda parts: parts[0] + parts[1])
    statuses: Counter[int] = Counter()
    delivered: Counter[str] = Counter()
    # Cursors naming allowed and other projects, from the start of their history (a replay),
    # or not cursors at all.
    last_event_ids = st.one_of(
        st.none(),
        st.sampled_from(
            [
                f"{epochs[4]}:0",
                f"{epochs[4]}:1:0123456789abcdef",
                f"{epochs[4]}:1:{cursors[4][1]}",
                f"4={epochs[4]}:0,6={epochs[6]}:1",
                f"5={epochs[4]}:0,4={epochs[4]}:0",
                f"5={epochs[4]}:0",
                f"4={epochs[4]}:0,4={epochs[4]}:1",
                "x:1",
                "",
                "=",
                ",",
            ]
        ),
        st.text(string.ascii_letters + string.digits + "=:,-_", max_size=40),
    )

    @FUZZ
    @given(
        target=st.one_of(
            queries(epochs[4], several).map(lambda query: f"/v1/stream?{query}"),
            st.builds(
                lambda project, query: f"/v1/projects/{project}/stream?{query}",
                path_ids,
                queries(epochs[4], flags),
            ),
        ),
        last_event_id=last_event_ids,
    )
    def check(target: str, last_event_id: str | None) -> None:
        headers = {"Authorization": authorization}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        status, sock, rest = exchange(gateway.port, target, headers)
        statuses[status] += 1
        if status != 200:
            body = read_to_end(sock, rest)
            assert status in (400, 403, 414), (status, target[:300], body[:300])
            error = json.loads(body)["error"]
            assert error in ("bad_request", "forbidden", "request_too_large"), body[:300]
            return
        # The stop condition only (what must be true is checked on what the stream sends): the
        # stream's projects, each answered (subscribed, resync_required or error) or the close.
        projects = parse_stream_target(target, gateway.config.max_subscriptions).projects
        assert set(projects) <= set(ALLOWED), target[:300]
        pending = set(projects)
        parser = SseParser()
        with sock:
            events = parser.feed(rest)
            while True:
                for sse in events:
                    message = json.loads(sse.data)
                    if sse.event == "close":
                        return
                    project_id = message.get("project_id")
                    if project_id is None:  # authenticated
                        continue
                    assert project_id in projects, (target[:300], sse)
                    delivered[sse.event] += 1
                    if sse.event in ("subscribed", "resync_required", "error"):
                        pending.discard(project_id)
                if not pending:
                    return
                chunk = sock.recv(65536)
                if not chunk:
                    return
                events = parser.feed(chunk)

    await asyncio.to_thread(check)
    # Checked on streams that sent events, replays and resyncs, not only on refusals.
    assert statuses[200] >= 20, statuses
    assert delivered["message"] and delivered["resync_required"], delivered
