"""docs/browser.md's quick-start page, run as written in chromium against a real gateway.

The page is the document's HTML block verbatim, with only what the page says is the reader's
replaced: the gateway's address (``localhost:8765``). The page and its own backend
(``/api/gateway-token``, ``/api/projects/1/blockers``) are served from another port of the
loopback address, as a reader's local site would be (Chromium refuses a page of an unknown
address space the loopback gateway's script: Local Network Access).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
import pytest
from playwright.sync_api import Page, expect

from publisher import Publisher, issue_token
from tests.browser.conftest import SECRET, GatewayProcess
from tests.support.doc_samples import code_block, contract_blocker
from tests.support.gateway_process import parse_metrics

pytestmark = pytest.mark.browser


def quick_start_html() -> str:
    return code_block("browser.md", "html", "<title>Blockers</title>")


def wait_subscribed(gateway: GatewayProcess, timeout: float = 10.0) -> None:
    """Until the gateway holds the page's subscription (the page subscribes from "now": an
    event published before its ``subscribed`` is rightly not shown)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"{gateway.http_url}/metrics", timeout=2) as response:
            metrics = parse_metrics(response.read().decode())
        if metrics.get("eventbus_subscriptions") == 1:
            return
        assert time.monotonic() < deadline, f"no subscription: {metrics}"
        time.sleep(0.05)


def test_the_quick_start_page_shows_the_state_then_live_events(
    new_page, gateway: GatewayProcess, bus: Publisher
) -> None:
    html = quick_start_html()
    for old in ("http://localhost:8765/eventbus.js", "ws://localhost:8765/"):
        assert html.count(old) == 1, f"the page no longer has exactly one {old!r}"
    html = html.replace("http://localhost:8765/", f"{gateway.http_url}/")
    html = html.replace("ws://localhost:8765/", f"ws://127.0.0.1:{gateway.port}/")
    existing = contract_blocker(100, "ASYNC", "Which logging library?")
    token_requests: list[str] = []

    class App(BaseHTTPRequestHandler):
        """The reader's site and API, on the loopback address as a local one would be."""

        def do_GET(self) -> None:
            if self.path == "/":
                self.answer(html.encode(), "text/html")
            elif self.path == "/favicon.ico":  # asked by the browser itself
                self.answer(b"", "image/x-icon")
            elif self.path == "/api/projects/1/blockers":
                self.answer(json.dumps({"blockers": [msgspec.to_builtins(existing)]}).encode())
            else:
                self.send_error(404)

        def do_POST(self) -> None:
            if self.path != "/api/gateway-token":
                return self.send_error(404)
            token_requests.append(self.path)
            self.answer(json.dumps({"token": issue_token(SECRET, projects=[1], ttl=600)}).encode())

        def answer(self, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), App)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = new_page(f"http://127.0.0.1:{server.server_port}/", wait_live=False)
        check_the_page(page, gateway, bus, token_requests)
    finally:
        server.shutdown()
        server.server_close()


def check_the_page(
    page: Page, gateway: GatewayProcess, bus: Publisher, token_requests: list[str]
) -> None:
    # The first subscribe's resync loaded the state from the page's API.
    expect(page.locator("#state")).to_have_text("live")
    expect(page.locator("#blockers li")).to_have_text(["#100 [ASYNC] Which logging library?"])
    expect(page.locator("#count")).to_have_text("1")
    assert token_requests == ["/api/gateway-token"]
    wait_subscribed(gateway)
    bus.blocker_created(1, contract_blocker(123, "SYNC", "JWT or sessions?"))
    expect(page.locator("#blockers li")).to_have_text(
        ["#100 [ASYNC] Which logging library?", "#123 [SYNC] JWT or sessions?"]
    )
    bus.blocker_resolved(1, 100, "structlog")
    expect(page.locator("#blockers li")).to_have_text(["#123 [SYNC] JWT or sessions?"])
    expect(page.locator("#count")).to_have_text("1")
    errors = [m for m in page.console_messages_seen if m.startswith("error")]  # type: ignore[attr-defined]
    assert errors == []
