"""eventbus.js cursor tags end to end: the browser client against a real gateway process and a
private Redis whose history is rewritten to look like a failover that replaced events.

Redis replicates asynchronously: a failover can lose the last events the old master published
(the client already applied them), and the new master hands their numbers to new events. The
client's cursor names the lost event by its number; with its tag (SHA-1 of the event's text as
the client received it, computed in the page) the gateway sees that it holds another event there
and answers ``resync_required`` (``history_lost``): one more onResync, at the new top. Without
tags the resume is honoured: the client keeps the lost event and silently misses its replacement.

Before that, a resume through a plain gateway restart (nothing replaced) is honoured: the tag the
page computed of events with non-ASCII text is the one the gateway computes of the same frames.
Run over each transport: WebSocket, Server-Sent Events (Last-Event-ID ``<epoch>:<seq>:<tag>``)
and polling (the page's ``tag``, sent as ``&tag=``).

And two failovers around a slow reload (WebSocket and SSE): the events the page held while it
reloaded, which the second failover lost, are not kept over the new history's replay.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
from playwright.sync_api import Browser, Page

from publisher import Publisher, issue_token
from schemas.keys import Keys
from schemas.tags import event_tag
from tests.browser.conftest import SECRET, GatewayProcess
from tests.browser.driver_page import driver_page, served_driver
from tests.support.failover import failover as lose_events

pytestmark = pytest.mark.browser

PROJECT = 31


@pytest.fixture
def page_server() -> Iterator[str]:
    with served_driver("tags") as url:
        yield url


@pytest.fixture
def tags_page(browser: Browser, page_server: str) -> Iterator[Page]:
    with driver_page(browser, page_server, "tags") as page:
        yield page


def stored_frame(redis_url: str, seq: int) -> bytes:
    client = redis.Redis.from_url(redis_url)
    try:
        [(_, fields)] = client.xrange(Keys().stream(PROJECT), f"{seq}-0", f"{seq}-0")
        return fields[b"f"]
    finally:
        client.close()


def start_bus(page: Page, gateway: GatewayProcess, **options: object) -> None:
    """Start the driver page's bus on the gateway for PROJECT (``options``: its transports and
    poll settings) and wait until it has a cursor."""
    token = issue_token(SECRET, projects=[PROJECT], subject="tags")
    page.evaluate(
        "(options) => window.driver.start(options)",
        {
            "url": f"ws://127.0.0.1:{gateway.port}/",
            "httpUrl": gateway.http_url,
            "token": token,
            "projectIds": [PROJECT],
            "backoff": {"initial": 200, "max": 1000},
            **options,
        },
    )
    page.wait_for_function("(id) => window.churn.bus.cursor(id) !== null", arg=PROJECT)


@pytest.mark.parametrize("transport", ["websocket", "sse", "polling"])
def test_a_failover_that_replaced_the_event_at_the_cursor_is_a_resync_not_a_silent_loss(
    tags_page: Page, gateway: GatewayProcess, redis_url: str, transport: str
) -> None:
    page = tags_page
    frames: list[str] = []
    page.on(
        "websocket",
        lambda ws: ws.on("framereceived", lambda payload: frames.append(str(payload))),
    )
    publisher = Publisher.from_url(redis_url)
    start_bus(
        page,
        gateway,
        websocket=transport == "websocket",
        sse=transport == "sse",
        # Polling: every 200 ms. Otherwise once a minute, so that it does not resume first
        # while the transport under test waits for its backoff.
        pollInterval=200 if transport == "polling" else 60_000,
        pollTimeout=1500,
    )
    up = "polling" if transport == "polling" else "live"

    def log() -> list[dict]:
        return page.evaluate("() => window.churn.log")

    def wait_for(count: int) -> None:
        page.wait_for_function("(count) => window.churn.log.length >= count", arg=count)

    def restart(between=None) -> None:
        gateway.kill()
        page.wait_for_function("(up) => window.churn.bus.state !== up", arg=up)
        if between is not None:
            between()
        gateway.start()

    # Text that is not ASCII: the page hashes the UTF-8 bytes of the text it received.
    answers = [
        "d\u00e9j\u00e0 vu \U0001f389",
        "na\u00efve \u65e5\u672c",
        "\U0001f680 \u00c5",
        "four",
    ]
    for number, answer in enumerate(answers, start=1):
        publisher.blocker_resolved(PROJECT, blocker_id=number, answer=answer)
    wait_for(1 + len(answers))
    cursor = page.evaluate("(id) => window.churn.bus.cursor(id)", PROJECT)
    assert cursor["seq"] == 4
    assert cursor.get("tag") == event_tag(stored_frame(redis_url, 4)), cursor

    # A restart, nothing replaced: the resume with the tag is honoured (no reload).
    restart()
    publisher.blocker_resolved(PROJECT, blocker_id=5, answer="caf\u00e9 5")
    wait_for(1 + 5)

    # A failover lost event 5 (applied by the page) and gave its number to another event.
    def failover() -> None:
        lose_events(redis_url, PROJECT, keep=4)  # event 5 lost, and its number handed out again
        publisher.blocker_resolved(PROJECT, blocker_id=105, answer="replaces 5")
        publisher.blocker_resolved(PROJECT, blocker_id=106, answer="after it")

    restart(failover)
    wait_for(1 + 5 + 1)
    publisher.blocker_resolved(PROJECT, blocker_id=107, answer="live again")
    wait_for(1 + 5 + 1 + 1)
    entries = log()
    epoch = cursor["epoch"]
    assert entries[0] == {"project": PROJECT, "resync": {"epoch": epoch, "seq": 0}}
    assert [entry.get("id") for entry in entries[1:6]] == [1, 2, 3, 4, 5]
    # One explicit reload at the new top (its tag, the gateway's, is that of the event there);
    # never event 6 (106) applied on top of a lost 5 with its replacement (105) missed.
    assert entries[6] == {
        "project": PROJECT,
        "resync": {"epoch": epoch, "seq": 6, "tag": event_tag(stored_frame(redis_url, 6))},
    }, entries
    assert entries[7] == {"project": PROJECT, "seq": 7, "id": 107}, entries
    assert len(entries) == 8, entries
    if transport == "websocket":
        resyncs = [json.loads(frame) for frame in frames if '"resync_required"' in frame]
        assert [(m["reason"], m["seq"]) for m in resyncs] == [("history_lost", 6)], resyncs
    assert not page.problems  # type: ignore[attr-defined]


def test_an_sse_event_whose_frame_holds_a_crlf_resumes_with_the_gateways_tag(
    tags_page: Page, gateway: GatewayProcess, redis_url: str
) -> None:
    """A frame holding a CR (JSON whitespace; an operator's, not one the publisher writes) goes
    out over SSE as several ``data`` lines, which the page gets back joined with LF: the hash of
    that text is not the frame's tag. The page takes the event's ``id`` tag instead, so no
    reload follows (without: one for nothing, when the ``subscribed`` of the resume that
    replayed it names the frame's tag at the cursor, or at the next resume's ``history_lost``)."""
    page = tags_page
    publisher = Publisher.from_url(redis_url)
    start_bus(page, gateway, websocket=False, pollInterval=60_000)
    publisher.blocker_resolved(PROJECT, blocker_id=1, answer="one")
    page.wait_for_function("() => window.churn.log.length >= 2")

    def restart(between=None) -> None:
        gateway.kill()
        page.wait_for_function("() => window.churn.bus.state !== 'live'")
        if between is not None:
            between()
        gateway.start()

    frame = (
        f'{{"type":"blocker_resolved","project_id":{PROJECT},\r\n'
        '"blocker_id":2,"answer":"caf\u00e9",\r\n "resolved_at":\r"2025-11-08T12:45:30Z"'
        ',"seq":2}'
    ).encode()

    def write_frame() -> None:
        client = redis.Redis.from_url(redis_url)
        try:
            client.xadd(Keys().stream(PROJECT), {"f": frame}, id="2-0")
            client.hset(Keys().meta(PROJECT), "seq", 2)
        finally:
            client.close()

    restart(write_frame)  # the resume replays event 2, as several data lines
    page.wait_for_function("() => window.churn.log.some((entry) => entry.id === 2)")
    cursor = page.evaluate("(id) => window.churn.bus.cursor(id)", PROJECT)
    assert cursor["seq"] == 2
    assert cursor.get("tag") == event_tag(frame), cursor
    restart()
    publisher.blocker_resolved(PROJECT, blocker_id=3, answer="three")
    page.wait_for_function("() => window.churn.log.some((entry) => entry.id === 3)")
    entries = page.evaluate("() => window.churn.log")
    # No reload after the first (one more was a history_lost for nothing).
    assert [entry.get("id") for entry in entries[1:]] == [1, 2, 3], entries
    assert not page.problems  # type: ignore[attr-defined]


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_events_held_during_a_reload_are_not_kept_over_a_replay_a_second_failover_rewrote(
    tags_page: Page, gateway: GatewayProcess, redis_url: str, transport: str
) -> None:
    """A failover lost event 2 (the page reloads, at 2, and the reload is slow); the page gets
    events 3 and 4 live meanwhile and holds them. A second failover loses 3 and 4 too, and the
    new master numbers three other events 3 to 5. The page resumes from its cursor, 2, which is
    still the same event: the gateway replays the new 3 to 5. Delivered after the reload: those
    three, never the lost 3 and 4 kept and the new ones taken for their duplicates."""
    page = tags_page
    publisher = Publisher.from_url(redis_url)
    start_bus(page, gateway, websocket=transport == "websocket", pollInterval=60_000)
    up = "live"

    def restart(between) -> None:
        gateway.kill()
        page.wait_for_function("(up) => window.churn.bus.state !== up", arg=up)
        between()
        gateway.start()

    for number in (1, 2):
        publisher.blocker_resolved(PROJECT, blocker_id=number, answer=f"{number}")
    page.wait_for_function("() => window.churn.log.length >= 3")
    page.evaluate(
        "() => { window.churn.gate = new Promise((open) => { window.churn.open = open; }); }"
    )

    def first_failover() -> None:
        lose_events(redis_url, PROJECT, keep=1)
        publisher.blocker_resolved(PROJECT, blocker_id=102, answer="replaces 2")

    restart(first_failover)  # the resume from 2 is history_lost: a reload at 2, held open
    page.wait_for_function("() => window.churn.log.length >= 4")
    publisher.blocker_resolved(PROJECT, blocker_id=103, answer="3, to be lost")
    publisher.blocker_resolved(PROJECT, blocker_id=104, answer="4, to be lost")
    page.wait_for_function(
        "(id) => window.churn.bus._subs.get(id).cursor.buffer.length === 2", arg=PROJECT
    )

    def second_failover() -> None:
        lose_events(redis_url, PROJECT, keep=2)
        for number in (203, 204, 205):
            publisher.blocker_resolved(PROJECT, blocker_id=number, answer=f"{number}")

    restart(second_failover)
    page.wait_for_function("(up) => window.churn.bus.state === up", arg=up)
    page.wait_for_function(
        "(id) => window.churn.bus._subs.get(id).cursor.buffer.some((event) => event.seq === 5)",
        arg=PROJECT,
    )
    page.evaluate("() => window.churn.open()")
    page.wait_for_function("() => window.churn.log.some((entry) => entry.seq === 5)")
    entries = page.evaluate("() => window.churn.log")
    epoch = entries[0]["resync"]["epoch"]
    assert [entry.get("id") for entry in entries[1:3]] == [1, 2], entries
    assert entries[3] == {
        "project": PROJECT,
        "resync": {"epoch": epoch, "seq": 2, "tag": event_tag(stored_frame(redis_url, 2))},
    }, entries
    assert [entry.get("id") for entry in entries[4:]] == [203, 204, 205], entries
    assert not page.problems  # type: ignore[attr-defined]
