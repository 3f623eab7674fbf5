"""The reference dashboard in a real browser, against the real gateway and a private Redis.

One test per "Client Action" and per "Connection Management" line of
docs/contract.md. Every wait is on a condition (Playwright ``expect`` or
``wait_for_function``), never a fixed sleep.
"""

from __future__ import annotations

import re
import time

import pytest
import redis
from playwright.sync_api import Page, expect

from publisher import Publisher
from schemas import Blocker, utc_now
from tests.browser.conftest import wait_live_and_loaded
from tests.browser.dashboard_helpers import (
    agent_card,
    agent_status,
    api,
    blocker_item,
    delivered_seqs,
    overflowing,
    raise_blocker,
    resolve,
    task_status,
)

pytestmark = pytest.mark.browser


def assert_no_duplicates(page: Page) -> None:
    seqs = delivered_seqs(page)
    assert seqs == sorted(set(seqs)), f"events delivered out of order or twice: {seqs}"
    keys = page.locator('[data-testid="activity-item"]').evaluate_all(
        "items => items.map((item) => item.dataset.key)"
    )
    assert len(keys) == len(set(keys)), keys
    ids = page.get_by_test_id("blocker-item").evaluate_all(
        "items => items.map((item) => item.dataset.blockerId)"
    )
    assert len(ids) == len(set(ids)), ids


# --- blocker_created ---------------------------------------------------------------------------


def test_blocker_created_adds_it_to_the_blocker_panel(demo, new_page):
    page = new_page(demo.url)
    expect(page.get_by_test_id("blocker-empty")).to_be_visible()
    blocker = raise_blocker(demo, "ASYNC", "Which time zone should reports use?")
    item = blocker_item(page, blocker["id"])
    expect(item).to_be_visible()
    expect(item).to_contain_text("Which time zone should reports use?")
    expect(item).to_contain_text("Backend Worker #1")
    expect(item).to_contain_text("ASYNC")
    expect(page.get_by_test_id("blocker-empty")).to_be_hidden()


def test_sync_blocker_shows_a_prominent_notification(demo, new_page):
    page = new_page(demo.url)
    alert = page.get_by_test_id("sync-alert")
    asynchronous = raise_blocker(demo, "ASYNC", "An ASYNC question", agent_id="test-worker-001")
    expect(blocker_item(page, asynchronous["id"])).to_be_visible()
    expect(alert).to_be_hidden()  # ASYNC blockers do not interrupt

    sync = raise_blocker(demo, "SYNC", "Should we use JWT or sessions?")
    expect(alert).to_be_visible()
    expect(alert).to_have_attribute("data-blocker-id", str(sync["id"]))
    expect(alert).to_contain_text(f"SYNC blocker #{sync['id']}")
    expect(alert).to_contain_text("Should we use JWT or sessions?")
    # The notification leads straight to the answer modal.
    page.get_by_test_id("sync-alert-answer").click()
    modal = page.get_by_test_id("answer-modal")
    expect(modal).to_be_visible()
    expect(modal).to_have_attribute("data-blocker-id", str(sync["id"]))


def test_blocker_count_badge_follows_created_and_resolved(demo, new_page):
    page = new_page(demo.url)
    badge = page.get_by_test_id("blocker-count")
    expect(badge).to_have_text("0")
    first = raise_blocker(demo, "ASYNC", agent_id="backend-worker-001")
    expect(badge).to_have_text("1")
    raise_blocker(demo, "SYNC", agent_id="frontend-worker-001")
    expect(badge).to_have_text("2")
    resolve(demo, first["id"])
    expect(badge).to_have_text("1")


def test_blocker_panel_lists_sync_first_then_newest(demo, new_page):
    old_async = raise_blocker(demo, "ASYNC", "old async", agent_id="backend-worker-001")
    old_sync = raise_blocker(demo, "SYNC", "old sync", agent_id="frontend-worker-001")
    page = new_page(demo.url)  # these two come from the API load
    new_async = raise_blocker(demo, "ASYNC", "new async", agent_id="test-worker-001")
    items = page.get_by_test_id("blocker-item")
    expect(items).to_have_count(3)  # this one from the live event
    resolve(demo, old_sync["id"])
    expect(agent_status(page, "frontend-worker-001")).to_have_text("working")  # free again
    new_sync = raise_blocker(demo, "SYNC", "new sync", agent_id="frontend-worker-001")
    expected = [new_sync["id"], new_async["id"], old_async["id"]]
    expect(items).to_have_count(3)
    page.wait_for_function(
        """expected => JSON.stringify(Array.from(
             document.querySelectorAll('[data-testid="blocker-item"]'),
             (item) => Number(item.dataset.blockerId))) === JSON.stringify(expected)""",
        arg=expected,
    )


# --- blocker_resolved ----------------------------------------------------------------------------


def test_blocker_resolved_removes_it_and_shows_a_toast(demo, new_page):
    page = new_page(demo.url)
    blocker = raise_blocker(demo, "ASYNC")
    expect(blocker_item(page, blocker["id"])).to_be_visible()
    resolve(demo, blocker["id"])  # resolved elsewhere (another user, the API)
    expect(blocker_item(page, blocker["id"])).to_have_count(0)
    toast = page.get_by_test_id("toast").filter(has_text=f"Blocker #{blocker['id']} resolved")
    expect(toast).to_be_visible()
    expect(toast).to_have_attribute("data-kind", "success")


def test_two_pages_resolving_in_one_closes_the_modal_in_the_other(demo, new_page):
    blocker = raise_blocker(demo, "SYNC", "Should we use JWT or sessions?")
    first = new_page(demo.url)
    second = new_page(demo.url)

    # The first user opens the answer modal for the blocker...
    blocker_item(first, blocker["id"]).get_by_test_id("answer-button").click()
    modal = first.get_by_test_id("answer-modal")
    expect(modal).to_be_visible()
    expect(modal.get_by_test_id("modal-question")).to_have_text("Should we use JWT or sessions?")
    first.get_by_test_id("answer-input").fill("Sessions, I think")

    # ...while the second answers it in their own page: told that the first is answering, and
    # sending anyway (tests/browser/test_dashboard_presence.py covers the warning itself).
    blocker_item(second, blocker["id"]).get_by_test_id("answer-button").click()
    expect(second.get_by_test_id("modal-presence")).to_contain_text("is answering", timeout=6_000)
    second.get_by_test_id("answer-input").fill("Use JWT for stateless API")
    second.get_by_test_id("answer-submit").click()
    expect(second.get_by_test_id("answer-warning")).to_be_visible()
    second.get_by_test_id("answer-submit").click()
    expect(second.get_by_test_id("answer-modal")).to_be_hidden()
    expect(blocker_item(second, blocker["id"])).to_have_count(0)

    # The first page follows live: blocker gone, modal closed, toast shown.
    expect(blocker_item(first, blocker["id"])).to_have_count(0)
    expect(modal).to_be_hidden()
    expect(first.get_by_test_id("toast")).to_contain_text([f"Blocker #{blocker['id']} resolved"])
    expect(first.get_by_test_id("blocker-count")).to_have_text("0")
    status, stored = api(demo, "GET", f"/api/blockers/{blocker['id']}")
    assert (status, stored["status"], stored["answer"]) == (
        200,
        "RESOLVED",
        "Use JWT for stateless API",
    )


def test_answer_modal_shows_backend_validation_and_conflicts(demo, new_page):
    blocker = raise_blocker(demo, "ASYNC")
    page = new_page(demo.url)
    blocker_item(page, blocker["id"]).get_by_test_id("answer-button").click()
    page.get_by_test_id("answer-input").fill("   ")
    page.get_by_test_id("answer-submit").click()
    expect(page.get_by_test_id("answer-error")).to_contain_text("non-empty")
    expect(page.get_by_test_id("answer-modal")).to_be_visible()
    # The textarea cannot hold more than the contract allows.
    assert page.get_by_test_id("answer-input").get_attribute("maxlength") == "5000"


# --- agent_resumed -------------------------------------------------------------------------------


def test_agent_resumed_turns_the_agent_card_from_blocked_to_working(demo, new_page):
    page = new_page(demo.url)
    blocker = raise_blocker(demo, "SYNC", agent_id="backend-worker-001")
    status = agent_status(page, "backend-worker-001")
    expect(status).to_have_text("blocked")
    resolve(demo, blocker["id"])  # the simulated agent resumes shortly after
    expect(status).to_have_text("working")
    expect(task_status(page, blocker["task_id"])).to_have_text("IN_PROGRESS")


def test_agent_resumed_adds_an_activity_feed_entry(demo, new_page):
    page = new_page(demo.url)
    blocker = raise_blocker(demo, "ASYNC", agent_id="frontend-worker-001")
    resolve(demo, blocker["id"])
    entry = page.locator(f'[data-testid="activity-item"][data-key="agent_resumed:{blocker["id"]}"]')
    expect(entry).to_contain_text("Agent resumed after blocker resolution")
    expect(entry).to_contain_text("Frontend Worker #1")
    assert_no_duplicates(page)


# --- blocker_expired -----------------------------------------------------------------------------


def test_blocker_expired_fails_the_task_and_warns(make_demo, new_page):
    # 8 s: the page must show the blocker and open its answer dialog before it expires, which a
    # chromium slow to start on a loaded machine did not always do within 3 s.
    app = make_demo(blocker_ttl=8.0, sweep_interval=0.2)
    page = new_page(app.url)
    blocker = raise_blocker(app, "SYNC", agent_id="test-worker-001")
    expect(blocker_item(page, blocker["id"])).to_be_visible()
    expect(task_status(page, blocker["task_id"])).to_have_text("BLOCKED")
    blocker_item(page, blocker["id"]).get_by_test_id("answer-button").click()
    expect(page.get_by_test_id("answer-modal")).to_be_visible()

    # The sweeper expires it after 8 s: removed, task FAILED, warning toast, modal closed.
    expect(blocker_item(page, blocker["id"])).to_have_count(0, timeout=15_000)
    expect(task_status(page, blocker["task_id"])).to_have_text("FAILED")
    toast = page.get_by_test_id("toast").filter(
        has_text=f"Blocker #{blocker['id']} expired - task failed"
    )
    expect(toast).to_be_visible()
    expect(toast).to_have_attribute("data-kind", "warning")
    expect(page.get_by_test_id("answer-modal")).to_be_hidden()
    status, stored = api(app, "GET", f"/api/blockers/{blocker['id']}")
    assert (status, stored["status"]) == (200, "EXPIRED")
    # Its agent is idle with no task, from the event alone (no reload): not idle with the
    # failed task's title still on the card.
    card = agent_card(page, "test-worker-001")
    expect(card.get_by_test_id("agent-status")).to_have_text("idle")
    expect(card.get_by_test_id("agent-task")).to_have_text("No task")
    assert page.evaluate("Number(document.body.dataset.resyncs)") == 1


# --- Connection Management ------------------------------------------------------------------------


def test_state_resync_on_connect_fetches_the_full_blocker_list(demo, new_page):
    created = [
        raise_blocker(demo, "ASYNC", "first", agent_id="backend-worker-001"),
        raise_blocker(demo, "SYNC", "second", agent_id="frontend-worker-001"),
    ]
    page = new_page()
    with page.expect_request(re.compile(r"/api/projects/1/state$")):
        page.goto(demo.url)
    wait_live_and_loaded(page)
    for blocker in created:
        expect(blocker_item(page, blocker["id"])).to_be_visible()
    expect(page.get_by_test_id("blocker-count")).to_have_text("2")


def test_events_around_the_state_load_are_applied_exactly_once(demo, new_page, redis_url):
    # The contract's "fetch the full blocker list on (re)connect" races the live stream: an
    # event published after the page subscribed but before the state was read is in both; one
    # published after the read but before the answer arrives is in neither. The state carries
    # the cursor of exactly what it includes (publisher.outbox's snapshot) and the bus continues
    # from there: each event applied once, none lost.
    # (The project has events already, so that the page subscribes in the epoch they are in.)
    around = {"earlier": raise_blocker(demo, "ASYNC", "earlier", agent_id="frontend-worker-001")}
    page = new_page()

    loads = []

    def slow_state(route) -> None:
        # The page loads the state twice: at once when it opens (to show something even before
        # the gateway answers), then from the bus's onResync once subscribed: that one counts.
        loads.append(route.request.url)
        if len(loads) != 2:
            route.continue_()
            return
        around["before"] = raise_blocker(
            demo, "ASYNC", "before the read", agent_id="test-worker-001"
        )
        response = route.fetch()  # the read: includes "before"
        around["after"] = raise_blocker(
            demo, "SYNC", "after the read", agent_id="backend-worker-001"
        )
        demo.wait_published()
        route.fulfill(response=response)

    page.route(re.compile(r"/api/projects/1/state$"), slow_state)
    page.goto(demo.url)
    wait_live_and_loaded(page)
    assert len(loads) == 2 and page.evaluate("window.dashboard.resyncs") == 1
    for blocker in around.values():
        expect(blocker_item(page, blocker["id"])).to_have_count(1)
    expect(page.get_by_test_id("blocker-count")).to_have_text("3")
    # Only what the state did not include came through the bus: the later blocker's event.
    events = page.evaluate("window.dashboard.events")
    assert [(e["type"], e["seq"]) for e in events] == [("blocker_created", 3)]
    assert_no_duplicates(page)


def test_state_resync_required_refetches_the_blocker_list(demo, new_page, redis_url):
    page = new_page(demo.url)
    before = raise_blocker(demo, "ASYNC", "before the flush", agent_id="backend-worker-001")
    expect(blocker_item(page, before["id"])).to_be_visible()
    resyncs = int(page.evaluate("window.dashboard.resyncs"))

    # Redis loses the project's history: the next event starts a new epoch, and the gateway
    # tells the page to resync instead of leaving a silent gap.
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()
    with page.expect_request(re.compile(r"/api/projects/1/state$")):
        after = raise_blocker(demo, "SYNC", "after the flush", agent_id="frontend-worker-001")
    page.wait_for_function("n => window.dashboard.resyncs > n", arg=resyncs)
    expect(blocker_item(page, after["id"])).to_be_visible()
    expect(blocker_item(page, before["id"])).to_be_visible()
    expect(page.get_by_test_id("blocker-count")).to_have_text("2")
    # It carries on live from the new cursor.
    resolve(demo, before["id"])
    expect(blocker_item(page, before["id"])).to_have_count(0)
    expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "live")


@pytest.mark.parametrize("how", ["killed", "drained"])
def test_reconnection_after_gateway_restart_catches_up(demo, new_page, gateway, how):
    page = new_page(demo.url)
    page.evaluate("window.__sameDocument = true")  # gone if the page reloaded
    first = raise_blocker(demo, "ASYNC", "before the outage", agent_id="backend-worker-001")
    expect(blocker_item(page, first["id"])).to_be_visible()
    state = page.get_by_test_id("connection-state")

    if how == "killed":
        gateway.kill()  # connections reset
    else:
        gateway.terminate()  # drains: close code 1012
    expect(state).to_have_attribute("data-state", "reconnecting")
    expect(page.get_by_test_id("connection-text")).to_contain_text("Reconnecting")

    # Events published while no gateway runs.
    resolve(demo, first["id"])
    second = raise_blocker(demo, "SYNC", "during the outage", agent_id="frontend-worker-001")
    demo.wait_published()
    gateway.start()

    expect(state).to_have_attribute("data-state", "live", timeout=20_000)
    expect(blocker_item(page, first["id"])).to_have_count(0)
    expect(blocker_item(page, second["id"])).to_be_visible()
    expect(page.get_by_test_id("toast")).to_contain_text([f"Blocker #{first['id']} resolved"])
    expect(
        page.locator(f'[data-testid="activity-item"][data-key="agent_resumed:{first["id"]}"]')
    ).to_be_visible()
    assert page.evaluate("window.__sameDocument") is True
    assert page.evaluate("window.dashboard.resyncs") == 1  # resumed from its cursor: no reload
    assert_no_duplicates(page)
    assert delivered_seqs(page) == list(range(1, len(delivered_seqs(page)) + 1))


def test_fallback_ladder_sse_then_polling_then_back_to_websocket(demo, new_page, gateway):
    """WebSocket blocked by a "proxy": live over SSE (updates within seconds, not a polling
    period); SSE blocked too: polling every 10 s; both allowed again: back to WebSocket. The
    dashboard shows the live transport all along, and nothing is delivered twice."""
    blocked = {"websocket": True, "sse": False}

    def route_ws(ws):
        # A proxy that refuses WebSocket: the connection dies before the gateway sees it.
        if blocked["websocket"]:
            ws.close(code=1011, reason="blocked by proxy")
        else:
            ws.connect_to_server()

    def route_sse(route):
        if blocked["sse"]:
            route.abort("connectionrefused")
        else:
            route.continue_()

    def setup(page):
        page.route_web_socket(re.compile(r"^ws://"), route_ws)
        page.route(re.compile(r"/v1/(projects/[0-9]+/)?stream"), route_sse)

    page = new_page(setup=setup)
    page.goto(demo.url)
    state = page.get_by_test_id("connection-state")
    text = page.get_by_test_id("connection-text")
    expect(state).to_have_attribute("data-state", "live")
    expect(state).to_have_attribute("data-transport", "sse")
    expect(text).to_contain_text("Server-Sent Events")
    page.wait_for_function("Number(document.body.dataset.resyncs || 0) >= 1")
    over_sse = raise_blocker(demo, "SYNC", "arrives over SSE")
    expect(blocker_item(page, over_sse["id"])).to_be_visible(timeout=3_000)  # live, not polled

    # SSE blocked too, and the open stream cut (the gateway restarts): polling.
    blocked["sse"] = True
    gateway.kill()
    gateway.start()
    expect(state).to_have_attribute("data-state", "polling", timeout=20_000)
    expect(state).to_have_attribute("data-transport", "polling")
    expect(text).to_contain_text("polling")
    by_polling = raise_blocker(demo, "SYNC", "arrives by polling", agent_id="frontend-worker-001")
    published = time.monotonic()
    expect(blocker_item(page, by_polling["id"])).to_be_visible(timeout=13_000)
    assert time.monotonic() - published < 12.5  # one 10 s polling period, plus slack

    # Both work again: the client, still retrying in the background, climbs back to WebSocket.
    blocked["sse"] = blocked["websocket"] = False
    expect(state).to_have_attribute("data-transport", "websocket", timeout=45_000)
    expect(state).to_have_attribute("data-state", "live")
    expect(text).to_contain_text("WebSocket")
    resolve(demo, by_polling["id"])
    expect(blocker_item(page, by_polling["id"])).to_have_count(0, timeout=3_000)  # live
    assert_no_duplicates(page)


def test_offline_browser_shows_offline_then_recovers(demo, new_page):
    page = new_page(demo.url)
    state = page.get_by_test_id("connection-state")
    page.context.set_offline(True)
    expect(state).to_have_attribute("data-state", "offline")
    expect(page.get_by_test_id("connection-text")).to_have_text("Offline")
    blocker = raise_blocker(demo, "ASYNC", "while offline")
    page.context.set_offline(False)
    expect(state).to_have_attribute("data-state", "live", timeout=15_000)
    expect(blocker_item(page, blocker["id"])).to_be_visible()
    assert_no_duplicates(page)


def test_token_is_refreshed_in_band_before_it_expires(make_demo, new_page):
    # Tokens live 10 s: a page's first token must still be valid when its WebSocket sends it,
    # and each refresh must reach the gateway before the token it replaces expires; with 4 s
    # a chromium slow to start on a loaded machine sent an expired one and reconnected.
    app = make_demo(token_ttl=10)
    count_script = """
        window.__tokenFetches = 0;
        window.__sockets = 0;
        const realFetch = window.fetch;
        window.fetch = (input, init) => {
          if (String(input).endsWith("/api/gateway-token")) window.__tokenFetches += 1;
          return realFetch(input, init);
        };
        const RealWebSocket = window.WebSocket;
        window.WebSocket = class extends RealWebSocket {
          constructor(...args) { super(...args); window.__sockets += 1; }
        };
    """
    page = new_page(app.url, setup=lambda page: page.add_init_script(count_script))
    # Tokens are refreshed at 3/4 of their lifetime (about 6.75 s here), over the same
    # connection: after the first two lifetimes the page still has its first WebSocket and
    # receives events.
    page.wait_for_function("window.__tokenFetches >= 4", timeout=40_000)
    blocker = raise_blocker(app, "ASYNC", "after two token lifetimes")
    expect(blocker_item(page, blocker["id"])).to_be_visible()
    expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "live")
    assert page.evaluate("window.__sockets") == 1, "reconnected instead of refreshing in-band"


# --- the sandbox project ---------------------------------------------------------------------


def test_events_published_to_the_sandbox_show_in_its_panel_only(demo, new_page, redis_url):
    # What a newcomer publishes from outside (the README's snippet) shows up, and does not
    # contradict the demo backend's own project.
    page = new_page(demo.url)
    panel = page.get_by_test_id("sandbox-panel")
    expect(panel).to_be_visible()
    expect(panel).to_contain_text("project 2")
    expect(page.get_by_test_id("sandbox-empty")).to_be_visible()
    with Publisher.from_url(redis_url) as bus:
        bus.blocker_created(
            2,
            Blocker(
                id=123, agent_id="backend-worker-001", agent_name="Backend Worker #1",
                task_id=456, task_title="Implement authentication", blocker_type="SYNC",
                question="Should we use JWT or sessions?", status="PENDING", created_at=utc_now(),
            ),
        )  # fmt: skip
        bus.blocker_resolved(2, blocker_id=123, answer="Use JWT for stateless API")
        bus.agent_resumed(2, "backend-worker-001", task_id=456, blocker_id=123)
        bus.blocker_expired(2, blocker_id=124, task_id=457)
    items = page.get_by_test_id("sandbox-item")
    expect(items).to_have_count(4)
    assert items.evaluate_all("items => items.map((item) => item.dataset.type)") == [
        "blocker_expired",
        "agent_resumed",
        "blocker_resolved",
        "blocker_created",
    ]
    expect(items.first).to_contain_text("Blocker #124 expired - task #457 failed")
    expect(items.last).to_contain_text("Should we use JWT or sessions?")
    expect(page.get_by_test_id("sandbox-empty")).to_be_hidden()
    # The demo's own project is untouched: no phantom blocker, task or agent state.
    expect(page.get_by_test_id("blocker-count")).to_have_text("0")
    expect(page.get_by_test_id("blocker-item")).to_have_count(0)
    expect(page.get_by_test_id("task-row")).to_have_count(0)
    expect(agent_status(page, "backend-worker-001")).to_have_text("idle")
    assert delivered_seqs(page) == []
    assert page.evaluate("window.dashboard.sandboxEvents.map((e) => e.seq)") == [1, 2, 3, 4]


# --- layout: phones and toasts ---------------------------------------------------------------

PHONE = {"width": 360, "height": 740}
LONG_WORD = "Should-we-use-" + "x" * 80 + "-or-sessions?"


def _busy_scene(app) -> None:
    """Long words, a SYNC banner, all three agents blocked, tasks and activity."""
    raise_blocker(app, "SYNC", LONG_WORD, agent_id="backend-worker-001")
    raise_blocker(
        app, "ASYNC", "A question", agent_id="frontend-worker-001",
        task_title="Design-the-notification-settings-screen-" + "y" * 60,
    )  # fmt: skip
    raise_blocker(app, "ASYNC", "Another question", agent_id="test-worker-001")


@pytest.mark.parametrize("width", [360, 390])
def test_no_horizontal_overflow_on_a_phone(demo, new_page, redis_url, width):
    _busy_scene(demo)
    page = new_page(demo.url, viewport={"width": width, "height": 740})
    with Publisher.from_url(redis_url) as bus:  # the sandbox shows what arrives after loading
        bus.blocker_resolved(2, blocker_id=123, answer="z" * 150)
    expect(page.get_by_test_id("blocker-item")).to_have_count(3)
    expect(page.get_by_test_id("sandbox-item")).to_have_count(1)
    expect(page.get_by_test_id("sync-alert")).to_be_visible()
    state = overflowing(page)
    assert state["scrollWidth"] <= state["innerWidth"] and not state["clipped"], state
    # The answer dialog fits too.
    page.get_by_test_id("sync-alert-answer").click()
    expect(page.get_by_test_id("answer-modal")).to_be_visible()
    state = overflowing(page)
    assert state["scrollWidth"] <= state["innerWidth"] and not state["clipped"], state


def _boxes_overlap(page, toast_selector: str, target_selector: str) -> list:
    return page.evaluate(
        """([toasts, target]) => {
          const t = document.querySelector(target).getBoundingClientRect();
          return Array.from(document.querySelectorAll(toasts))
            .filter((node) => node.offsetParent !== null)
            .map((node) => node.getBoundingClientRect())
            .filter((r) => r.left < t.right && r.right > t.left)
            .filter((r) => r.top < t.bottom && r.bottom > t.top)
            .map((r) => [r.left, r.top, r.right, r.bottom]);
        }""",
        [toast_selector, target_selector],
    )


@pytest.mark.parametrize(
    "viewport", [{"width": 1280, "height": 860}, PHONE], ids=["desktop", "phone"]
)
def test_toasts_never_cover_the_activity_feed_and_are_bounded(demo, new_page, viewport):
    page = new_page(demo.url, viewport=viewport)
    agents = ["backend-worker-001", "frontend-worker-001", "test-worker-001"]
    # Two rounds of three resolutions: six toasts within their 7 s lifetime, and a long feed.
    for _ in range(2):
        blockers = [raise_blocker(demo, "ASYNC", agent_id=agent) for agent in agents]
        for blocker in blockers:
            resolve(demo, blocker["id"])
        for agent in agents:
            expect(agent_status(page, agent)).to_have_text("working")
    expect(page.get_by_test_id("toast").first).to_be_visible()
    most = 3 if viewport["width"] > 900 else 2
    assert page.get_by_test_id("toast").count() <= 3
    visible = page.locator('[data-testid="toast"]:visible')
    assert 1 <= visible.count() <= most
    expect(page.get_by_test_id("toast").first).to_contain_text("resolved")  # newest first
    feed = page.locator("section", has=page.get_by_test_id("activity-feed"))
    feed.scroll_into_view_if_needed()
    assert (
        _boxes_overlap(page, '[data-testid="toast"]', '[aria-labelledby="activity-heading"]') == []
    )
    page.evaluate("window.scrollTo(0, document.scrollingElement.scrollHeight)")
    assert (
        _boxes_overlap(page, '[data-testid="toast"]', '[aria-labelledby="activity-heading"]') == []
    )
