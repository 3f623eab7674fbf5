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
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest
import redis
from playwright.sync_api import Browser, Page

from publisher import Publisher, issue_token
from schemas.keys import Keys
from schemas.tags import event_tag
from tests.browser.conftest import ROOT, SECRET, GatewayProcess

pytestmark = pytest.mark.browser

CLIENT_JS = ROOT / "gateway" / "static" / "eventbus.js"
DRIVER_JS = ROOT / "tests" / "browser" / "eventbus_churn.js"
INDEX = """<!doctype html><meta charset="utf-8"><title>eventbus.js tags</title>
<script type="module">
  import * as driver from "/tags/driver.js";
  window.driver = driver;
  window.driverReady = true;
</script>"""
PROJECT = 31


@pytest.fixture
def page_server() -> Iterator[str]:
    """This checkout's eventbus.js and the churn test's driver, from a real HTTP server (with
    Playwright's router serving the page, chromium's WebSocket never opens)."""
    files = {
        "/tags/": (INDEX.encode(), "text/html"),
        "/eventbus.js": (CLIENT_JS.read_bytes(), "text/javascript"),
        "/tags/driver.js": (DRIVER_JS.read_bytes(), "text/javascript"),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, kind = files.get(self.path, (b"not found", "text/plain"))
            self.send_response(200 if self.path in files else 404)
            self.send_header("Content-Type", f"{kind}; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def tags_page(browser: Browser, page_server: str) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    page.problems = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda error: page.problems.append(str(error)))  # type: ignore[attr-defined]
    page.goto(f"{page_server}/tags/")
    page.wait_for_function("window.driverReady === true")
    yield page
    context.close()


def replace_history_from(redis_url: str, seq: int) -> None:
    """What a failover that lost the events from ``seq`` on leaves: the same epoch, the history up
    to ``seq - 1``, and the next publish numbered ``seq`` again."""
    keys = Keys()
    client = redis.Redis.from_url(redis_url)
    try:
        kept = client.xrange(keys.stream(PROJECT), "-", f"{seq - 1}-0")
        with client.pipeline(transaction=True) as pipe:
            pipe.delete(keys.stream(PROJECT))
            for entry_id, fields in kept:
                pipe.xadd(keys.stream(PROJECT), fields, id=entry_id)
            pipe.hset(keys.meta(PROJECT), "seq", seq - 1)
            pipe.execute()
    finally:
        client.close()


def stored_frame(redis_url: str, seq: int) -> bytes:
    client = redis.Redis.from_url(redis_url)
    try:
        [(_, fields)] = client.xrange(Keys().stream(PROJECT), f"{seq}-0", f"{seq}-0")
        return fields[b"f"]
    finally:
        client.close()


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
    token = issue_token(SECRET, projects=[PROJECT], subject="tags")
    page.evaluate(
        "(options) => window.driver.start(options)",
        {
            "url": f"ws://127.0.0.1:{gateway.port}/",
            "httpUrl": gateway.http_url,
            "token": token,
            "projectIds": [PROJECT],
            "backoff": {"initial": 200, "max": 1000},
            "websocket": transport == "websocket",
            "sse": transport == "sse",
            # Polling: every 200 ms. Otherwise once a minute, so that it does not resume first
            # while the transport under test waits for its backoff.
            "pollInterval": 200 if transport == "polling" else 60_000,
            "pollTimeout": 1500,
        },
    )
    page.wait_for_function("(id) => window.churn.bus.cursor(id) !== null", arg=PROJECT)
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
        replace_history_from(redis_url, 5)
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
