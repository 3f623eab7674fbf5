"""Token revocation, seen by the person whose tokens are revoked: the demo dashboard in a real
browser, the real gateway, ``Publisher.revoke_tokens`` (docs/publisher.md, "Revoking tokens";
docs/protocol.md, "Token revocation"; docs/browser.md, "Reconnection and close codes").

What the page does is recorded by an init script (:func:`recorder`): every WebSocket it opens,
the tokens it sends in ``auth`` frames and the code it was closed with, and every request to the
gateway's HTTP API (SSE streams, polls) with its token, status and, for a stream, the code of its
``close`` event. The token endpoint goes through a Playwright route that counts the tokens it
serves (and, in the last test, plays an application that keeps serving the revoked token).
Every wait is on a condition, never a fixed sleep.
"""

from __future__ import annotations

import re
import time

import jwt
import pytest
from playwright.sync_api import Page, expect

from publisher import Publisher
from tests.browser.dashboard_helpers import (
    agent_status,
    blocker_item,
    delivered_seqs,
    raise_blocker,
    resolve,
)

pytestmark = pytest.mark.browser


def recorder(websocket: bool = True) -> str:
    """The init script recording the page's connections in ``window.__bus``; without
    ``websocket`` the page has no WebSocket (eventbus.js then streams over SSE)."""
    return RECORDER_SCRIPT.replace("WEBSOCKET", "true" if websocket else "false")


RECORDER_SCRIPT = r"""
window.__bus = { sockets: [], requests: [] };
if (!WEBSOCKET) {
  window.WebSocket = undefined;
} else {
  const RealWebSocket = window.WebSocket;
  window.WebSocket = class extends RealWebSocket {
    constructor(...args) {
      super(...args);
      const record = { at: Date.now(), auth: [], code: null, closedAt: null };
      window.__bus.sockets.push(record);
      this.__record = record;
      this.addEventListener("close", (event) => {
        record.code = event.code;
        record.closedAt = Date.now();
      });
    }
    send(data) {
      try {
        const frame = JSON.parse(data);
        if (frame && frame.type === "auth") this.__record.auth.push(frame.token);
      } catch {
        /* not JSON: not ours to record */
      }
      return super.send(data);
    }
  };
}
const realFetch = window.fetch;
window.fetch = async (input, init) => {
  const url = String(input instanceof Request ? input.url : input);
  if (!url.includes("/v1/")) return realFetch(input, init);
  const headers = new Headers((init && init.headers) || undefined);
  const token = (headers.get("Authorization") || "").replace(/^Bearer /, "");
  const record = { at: Date.now(), url, token, status: null, closeCode: null, closedAt: null };
  window.__bus.requests.push(record);
  const response = await realFetch(input, init);
  record.status = response.status;
  if (!url.includes("/v1/stream") || !response.ok || !response.body) return response;
  // An SSE stream: read a copy of it for its `close` event (the code it was closed with).
  const [mine, theirs] = response.body.tee();
  (async () => {
    const reader = mine.getReader();
    const decoder = new TextDecoder();
    let text = "";
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) return;
        text += decoder.decode(value, { stream: true });
        const match = /event: close\n(?:id: [^\n]*\n)?data: ([^\n]*)\n/.exec(text);
        if (match) {
          record.closeCode = JSON.parse(match[1]).code;
          record.closedAt = Date.now();
          return;
        }
        text = text.slice(Math.max(0, text.lastIndexOf("\n\n")));
      }
    } catch {
      /* aborted: no close event */
    }
  })();
  const { status, statusText } = response;
  return new Response(theirs, { status, statusText, headers: response.headers });
};
"""

TOKEN_ENDPOINT = re.compile(r"/api/gateway-token$")


def sockets(page: Page) -> list[dict]:
    return page.evaluate("window.__bus.sockets")


def gateway_requests(page: Page) -> list[dict]:
    return page.evaluate("window.__bus.requests")


def revoke(redis_url: str, subject: str) -> None:
    with Publisher.from_url(redis_url) as bus:
        bus.revoke_tokens(subject)


WAIT_CLOSED = {
    # The connection open at the revocation: the first WebSocket; the SSE stream that got a
    # `close` event (the page may have opened and dropped others before, to add projects).
    "websocket": "() => window.__bus.sockets.length > 0 && window.__bus.sockets[0].code !== null",
    "sse": "() => window.__bus.requests.some((r) => r.closeCode !== null)",
}
WAIT_RECONNECTED = {
    "websocket": """closedAt => window.__bus.sockets.some(
        (s) => s.at > closedAt && s.code === null && s.auth.length > 0)""",
    "sse": """closedAt => window.__bus.requests.some(
        (r) => r.url.includes("/v1/stream") && r.at > closedAt && r.status === 200)""",
}


def closed_connection(page: Page, transport: str) -> dict:
    """{code, closedAt, token, later} of the connection the gateway closed: ``later``, the
    tokens the page presented to the gateway on every connection or request it opened since."""
    requests = gateway_requests(page)
    if transport == "websocket":
        record = sockets(page)[0]
        later = [token for s in sockets(page)[1:] for token in s["auth"]]
        later += [r["token"] for r in requests]  # (none before: the WebSocket was live)
        return {
            "code": record["code"],
            "closedAt": record["closedAt"],
            "token": record["auth"],
            "later": later,
        }
    index = next(i for i, r in enumerate(requests) if r["closeCode"] is not None)
    record = requests[index]
    return {
        "code": record["closeCode"],
        "closedAt": record["closedAt"],
        "token": [record["token"]],
        "later": [r["token"] for r in requests[index + 1 :]],
    }


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_revoked_dashboard_renews_its_token_and_misses_no_event(
    demo, new_page, redis_url, transport
):
    tokens: list[str] = []  # every token the endpoint served, in order
    outage: dict = {}

    def token_route(route) -> None:
        if outage.get("revoked") and "during" not in outage:
            # The page asks for a new token after its connection was closed: it holds none now,
            # so what is published here reaches it only by resuming from its cursors.
            outage["during"] = raise_blocker(
                demo, "ASYNC", "while disconnected", agent_id="test-worker-001"
            )
            resolve(demo, outage["first"]["id"])
            demo.wait_published()
        response = route.fetch()
        tokens.append(response.json()["token"])
        route.fulfill(response=response)

    def setup(page: Page) -> None:
        page.add_init_script(recorder(websocket=transport == "websocket"))
        page.route(TOKEN_ENDPOINT, token_route)

    page = new_page(demo.url, setup=setup)
    page.evaluate("window.__sameDocument = true")  # gone if the page reloaded
    state = page.get_by_test_id("connection-state")
    expect(state).to_have_attribute("data-transport", transport)
    assert len(tokens) == 1
    subject = page.evaluate("window.dashboard.me.id")  # the person the demo's tokens name
    # Revoked in a later second than the token was minted: a token minted in the second of the
    # revocation is refused too, and minted in the same second as the first, it would be the
    # same string (the claims are the same), which the checks below could not tell apart.
    issued_at = jwt.decode(tokens[0], options={"verify_signature": False})["iat"]
    time.sleep(max(0.0, issued_at + 1.05 - time.time()))  # a clock condition, not a race

    # 1. Live with a token of the subject.
    first = raise_blocker(demo, "ASYNC", "before the revocation", agent_id="backend-worker-001")
    outage["first"] = first
    expect(blocker_item(page, first["id"])).to_be_visible()

    # 2. The backend revokes the subject's tokens and goes on publishing.
    revoke(redis_url, subject)
    outage["revoked"] = True
    right_after = raise_blocker(
        demo, "SYNC", "right after the revocation", agent_id="frontend-worker-001"
    )

    # 3. The gateway closes the page's connection with 4003 (within its poll interval, 1 s)...
    page.wait_for_function(WAIT_CLOSED[transport])
    closed = closed_connection(page, transport)
    assert closed["code"] == 4003, closed
    assert closed["token"] == [tokens[0]]
    # ...the page asks the token endpoint for a new token, reconnects and is live again.
    page.wait_for_function(WAIT_RECONNECTED[transport], arg=closed["closedAt"])
    expect(state).to_have_attribute("data-state", "live")
    expect(state).to_have_attribute("data-transport", transport)
    assert "during" in outage, "no token was asked for after the revocation"
    # (More than one new token when one minted in the revocation's second was refused.)
    assert 2 <= len(tokens) <= 5, tokens
    # The revoked token was never presented again, on any transport: the page asked for a
    # new one before its next attempt.
    presented = closed_connection(page, transport)["later"]
    assert presented and tokens[0] not in presented, presented

    # Every event, once, in order, without a reload: the ones published while disconnected
    # came from the resume, and the connection is live for the next.
    expect(blocker_item(page, first["id"])).to_have_count(0)
    expect(blocker_item(page, right_after["id"])).to_have_count(1)
    expect(blocker_item(page, outage["during"]["id"])).to_have_count(1)
    expect(agent_status(page, "backend-worker-001")).to_have_text("working")  # agent_resumed
    after = raise_blocker(demo, "ASYNC", "after the renewal", agent_id="backend-worker-001")
    expect(blocker_item(page, after["id"])).to_have_count(1)
    types = page.evaluate("window.dashboard.events.map((e) => e.type)")
    assert types == [
        "blocker_created",  # first
        "blocker_created",  # right after the revocation
        "blocker_created",  # while disconnected
        "blocker_resolved",  # first, while disconnected
        "agent_resumed",
        "blocker_created",  # after the renewal
    ], types
    assert delivered_seqs(page) == [1, 2, 3, 4, 5, 6]
    ids = page.get_by_test_id("blocker-item").evaluate_all(
        "items => items.map((item) => Number(item.dataset.blockerId))"
    )
    assert sorted(ids) == sorted([right_after["id"], outage["during"]["id"], after["id"]]), ids
    assert page.evaluate("window.__sameDocument") is True
    assert page.evaluate("window.dashboard.resyncs") == 1  # resumed from its cursor: no reload


def test_a_token_endpoint_serving_the_revoked_token_is_backed_off_and_not_live(
    demo, new_page, redis_url
):
    tokens: list[str] = []
    stale = {"on": False}

    def token_route(route) -> None:
        if stale["on"]:
            # A broken application: it keeps handing out the token it handed out before.
            tokens.append(tokens[0])
            route.fulfill(json={"token": tokens[0], "expires_in": 900})
            return
        response = route.fetch()
        tokens.append(response.json()["token"])
        route.fulfill(response=response)

    def setup(page: Page) -> None:
        page.add_init_script(recorder())
        page.route(TOKEN_ENDPOINT, token_route)

    page = new_page(demo.url, setup=setup)
    page.evaluate("window.__sameDocument = true")
    state = page.get_by_test_id("connection-state")
    subject = page.evaluate("window.dashboard.me.id")
    first = raise_blocker(demo, "ASYNC", "before the revocation", agent_id="backend-worker-001")
    expect(blocker_item(page, first["id"])).to_be_visible()

    stale["on"] = True
    revoke(redis_url, subject)
    # (An event published before the gateway closed the connection, up to a second after the
    # revocation, still reaches it live.)
    page.wait_for_function("window.__bus.sockets[0].code !== null")
    unseen = raise_blocker(demo, "SYNC", "after the close", agent_id="frontend-worker-001")
    demo.wait_published()

    # The open connection is closed with 4003, and each new one presenting the revoked token is
    # refused with 4003 again: three refusals take at least the first two backoff delays
    # (1 s and 2 s, +/- 20 %), where a client reconnecting at once would be refused three times
    # within a few hundred milliseconds.
    page.wait_for_function(
        "window.__bus.sockets.filter((s) => s.code === 4003).length >= 3", timeout=20_000
    )
    recorded = sockets(page)
    refused = [s for s in recorded if s["code"] == 4003]
    assert [s["code"] for s in recorded if s["code"] is not None] == [4003] * len(refused)
    assert all(s["auth"] in ([], [tokens[0]]) for s in recorded), recorded
    span = refused[2]["closedAt"] - refused[0]["closedAt"]
    assert span >= 2_500, f"refused three times in {span} ms: not backing off"
    # Meanwhile the fallbacks (an SSE stream, polls) were tried, refused as well, and paced too:
    # every connection attempt of the page in that span, WebSocket or HTTP, is counted.
    requests = [
        r
        for r in gateway_requests(page)
        if refused[0]["closedAt"] <= r["at"] <= refused[2]["closedAt"]
    ]
    assert {r["status"] for r in requests} <= {401, None}, requests
    assert all(r["token"] == tokens[0] for r in requests), requests
    attempts = len([s for s in recorded if refused[0]["closedAt"] < s["at"]]) + len(requests)
    assert attempts <= 10, (span, attempts, requests)
    assert len(tokens) <= 12, len(tokens)

    # The dashboard says it is not live, and shows nothing published since the close.
    expect(state).to_have_attribute("data-state", "reconnecting")
    expect(page.get_by_test_id("connection-text")).to_contain_text("Reconnecting")
    expect(page.get_by_test_id("retry-now")).to_be_visible()
    expect(blocker_item(page, unseen["id"])).to_have_count(0)
    assert delivered_seqs(page) == [1]

    # The application is fixed (it mints new tokens again): "Retry now" brings the page back
    # live, with what it missed, without a reload.
    stale["on"] = False
    page.get_by_test_id("retry-now").click()
    expect(state).to_have_attribute("data-state", "live")
    expect(blocker_item(page, unseen["id"])).to_have_count(1)
    assert delivered_seqs(page) == [1, 2]
    assert page.evaluate("window.__sameDocument") is True
    assert page.evaluate("window.dashboard.resyncs") == 1
