"""eventbus.js over Server-Sent Events when one project of its stream holds garbage in Redis.

The page follows three projects on one stream (WebSocket off) against a real gateway process on
a private Redis. Project 42's metadata is overwritten with a value the event bus cannot have
written: the gateway's periodic check ends its subscription (``error`` ``unavailable``,
``ended``), and every subscribe of it is refused while the garbage stays. The stream goes on for
41 and 43, which stay live over SSE (never polled), while 42 alone is polled and tried live
again by planned reopens. Once 42 is repaired it comes back live on the stream, polling stops,
and every project's events reached the application once, in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from playwright.sync_api import Browser, Page

from publisher import Publisher, issue_token
from schemas.keys import Keys
from tests.browser.conftest import SECRET, GatewayProcess
from tests.browser.driver_page import driver_page, served_driver

pytestmark = pytest.mark.browser

HEALTHY = (41, 43)
BAD = 42
PROJECTS = (41, 42, 43)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    with served_driver("failed") as url, driver_page(browser, url, "failed") as page:
        yield page


@pytest.fixture
def checking_gateway(redis_url: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    """A gateway whose periodic check (which finds unreadable metadata) runs every 0.2 s."""
    process = GatewayProcess(
        redis_url, tmp_path / "gateway.log", "--reconcile-interval", "0.2"
    ).start()
    yield process
    process.kill()


def test_a_garbage_project_is_polled_alone_and_comes_back_live_the_others_stay_live(
    page: Page, checking_gateway: GatewayProcess, redis_url: str
) -> None:
    gateway = checking_gateway
    publisher = Publisher.from_url(redis_url)
    client = redis.Redis.from_url(redis_url)
    published = dict.fromkeys(PROJECTS, 0)

    def publish(project_id: int, count: int) -> None:
        for _ in range(count):
            published[project_id] += 1
            publisher.blocker_resolved(project_id, blocker_id=published[project_id], answer="a")

    requests: list[str] = []  # the URL of every request the page made
    page.on("request", lambda request: requests.append(request.url))

    def polls_of(project_id: int) -> int:
        return sum(1 for url in requests if f"/v1/projects/{project_id}/events" in url)

    def streams() -> int:
        return sum(1 for url in requests if "/v1/stream?" in url)

    def delivered(project_id: int) -> list[int]:
        log = page.evaluate("() => window.churn.log")
        return [e["id"] for e in log if e.get("project") == project_id and "id" in e]

    def wait_delivered(project_id: int) -> None:
        """Until the application has the last event published to the project."""
        page.wait_for_function(
            "([id, n]) => window.churn.log.some((e) => e.project === id && e.id === n)",
            arg=[project_id, published[project_id]],
            timeout=15_000,
        )

    for project_id in PROJECTS:
        publish(project_id, 1)  # (in each first load, not delivered as an event)
    page.evaluate(
        "(options) => window.driver.start(options)",
        {
            "url": f"ws://127.0.0.1:{gateway.port}/",
            "httpUrl": gateway.http_url,
            "token": issue_token(SECRET, projects=list(PROJECTS), subject="failed"),
            "projectIds": list(PROJECTS),
            "backoff": {"initial": 200, "max": 1000},
            "websocket": False,
            "pollInterval": 300,
            "pollTimeout": 1500,
        },
    )
    page.wait_for_function(
        "(ids) => ids.every((id) => window.churn.bus.cursor(id) !== null)"
        " && window.churn.bus.transport === 'sse'",
        arg=list(PROJECTS),
    )

    # Garbage in project 42's metadata: its subscription ends; the stream goes on.
    meta = Keys().meta(BAD)
    saved = client.hgetall(meta)
    client.hset(meta, "seq", "garbage")
    page.wait_for_function(
        "() => window.churn.errors.some((e) => e.startsWith('unavailable:'))", timeout=10_000
    )
    publish(41, 3)
    publish(43, 2)
    wait_delivered(41)
    wait_delivered(43)
    # 42 is polled and tried live again by planned reopens (refused each time while the
    # garbage stays), the stream live all along for the others.
    page.wait_for_function(
        "() => window.churn.errors.filter((e) => e.startsWith('unavailable:')).length >= 3",
        timeout=15_000,
    )
    page.wait_for_function(
        "() => window.churn.errors.filter((e) => e.startsWith('poll_http_503:')).length >= 2",
        timeout=15_000,
    )
    assert polls_of(BAD) >= 2
    assert streams() >= 3, "tried live again by planned reopens"
    assert page.evaluate("() => window.churn.bus.transport") == "sse"
    assert [polls_of(p) for p in HEALTHY] == [0, 0], "the healthy projects stay live, never polled"
    assert page.evaluate("() => window.churn.states") == ["live/sse"], "never another state"

    # Repaired: 42 comes back live on the next reopen, polling stops.
    client.delete(meta)
    client.hset(meta, mapping=saved)
    publish(BAD, 2)
    publish(41, 1)
    wait_delivered(42)
    page.wait_for_function(
        "() => window.churn.bus.transport === 'sse' && !window.churn.bus._polling"
        " && window.churn.bus._sse && window.churn.bus._sse.proven"
        " && window.churn.bus._sse.failed.size === 0",
        timeout=15_000,
    )
    publish(BAD, 1)
    wait_delivered(42)
    wait_delivered(41)
    for project_id in PROJECTS:
        assert delivered(project_id) == list(range(2, published[project_id] + 1)), project_id
    resyncs = [e for e in page.evaluate("() => window.churn.log") if "resync" in e]
    assert sorted(e["project"] for e in resyncs) == list(PROJECTS), "only the first load each"
    assert not page.problems  # type: ignore[attr-defined]
    publisher.close()
    client.close()
