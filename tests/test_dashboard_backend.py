"""The demo backend of examples/dashboard without a browser: its API, persistence, outbox,
expiry sweeper, simulated agents, and ``python -m examples.dashboard.run`` start/stop.

Runs against the session's private Redis (``redis_url``), never the machine's 6379.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from examples.dashboard.server import Config, DemoApp
from examples.dashboard.store import REVIEWER_PREFIX, Store
from examples.dashboard.workers import AgentSimulation
from schemas.events import decode_event
from schemas.keys import Keys
from schemas.tags import event_tag
from schemas.tokens import verify_token
from tests.support.dashboard_api import api as call
from tests.support.dashboard_api import demo_apps, http_request, raw_exchange, raw_request
from tests.support.gateway_process import GatewayProcess

ROOT = Path(__file__).resolve().parents[1]
SECRET = "backend-tests-secret-0123456789abcdef"


def wait_for(condition, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def published(redis_url: str, project_id: int = 1) -> list[dict]:
    """The events in the project's stream, decoded."""
    client = redis.Redis.from_url(redis_url)
    try:
        entries = client.xrange(Keys().stream(project_id))
    finally:
        client.close()
    return [json.loads(fields[b"f"]) for _, fields in entries]


@pytest.fixture(scope="module")
def gateway(redis_server):
    """The gateway through which the backend's agents wait for answers (the Python consumer)."""
    with GatewayProcess(redis_server.url, auth_secret=SECRET) as process:
        yield process


@pytest.fixture
def make_app(tmp_path, redis_url, gateway):
    # One database file for all: a test restarts the backend on the same data.
    with demo_apps(
        tmp_path,
        db=str(tmp_path / "dashboard.sqlite3"),
        redis_url=redis_url,
        auth_secret=SECRET,
        resume_delay=0.1,
        gateway_port=gateway.port,
    ) as make:
        yield make


@pytest.fixture
def app(make_app) -> DemoApp:
    return make_app()


def raise_blocker(app, kind="SYNC", agent="backend-worker-001", question="JWT or sessions?"):
    status, body = call(
        app,
        "POST",
        "/api/projects/1/blockers",
        {"agent_id": agent, "blocker_type": kind, "question": question, "task_title": "Auth"},
    )
    assert status == 201, body
    return body


# --- API -----------------------------------------------------------------------------------


def test_blocker_lifecycle_publishes_the_contract_events(app, redis_url):
    blocker = raise_blocker(app)
    assert blocker["status"] == "PENDING"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", blocker["created_at"])
    status, resolved = call(
        app, "POST", f"/api/blockers/{blocker['id']}/resolve", {"answer": "Use JWT"}
    )
    assert status == 200 and resolved["status"] == "RESOLVED" and resolved["answer"] == "Use JWT"
    events = wait_for(lambda: len(published(redis_url)) == 3 and published(redis_url))
    assert [e["type"] for e in events] == ["blocker_created", "blocker_resolved", "agent_resumed"]
    assert [e["seq"] for e in events] == [1, 2, 3]
    for event in events:  # every one valid against the contract
        decode_event(json.dumps({k: v for k, v in event.items() if k != "seq"}))
    created, resolved_event, resumed = events
    assert created["blocker"]["id"] == blocker["id"]
    assert created["blocker"]["agent_id"] == "backend-worker-001"
    assert created["blocker"]["agent_name"] == "Backend Worker #1"
    assert resolved_event["answer"] == "Use JWT"
    assert (resumed["agent_id"], resumed["blocker_id"], resumed["task_id"]) == (
        "backend-worker-001",
        blocker["id"],
        blocker["task_id"],
    )
    _, agents = call(app, "GET", "/api/projects/1/agents")
    assert {a["id"]: a["status"] for a in agents}["backend-worker-001"] == "working"


def test_resolve_errors(app):
    blocker = raise_blocker(app)
    path = f"/api/blockers/{blocker['id']}/resolve"
    assert call(app, "POST", path, {"answer": ""})[0] == 422
    assert call(app, "POST", path, {"answer": "   \n"})[0] == 422
    assert call(app, "POST", path, {"answer": 42})[0] == 422
    assert call(app, "POST", path, {})[0] == 422
    status, body = call(app, "POST", path, {"answer": "x" * 5001})
    assert status == 422 and "5000" in body["message"]
    assert call(app, "POST", path, raw=b"{not json")[0] == 400
    assert call(app, "POST", "/api/blockers/999999/resolve", {"answer": "a"})[0] == 404
    assert call(app, "POST", path, {"answer": "x" * 5000})[0] == 200  # the limit itself is fine
    status, body = call(app, "POST", path, {"answer": "again"})
    assert (status, body["status"]) == (409, "RESOLVED")


def test_resolve_an_expired_blocker_is_a_conflict(make_app):
    app = make_app(blocker_ttl=0.3, sweep_interval=0.05)
    blocker = raise_blocker(app)
    wait_for(lambda: call(app, "GET", f"/api/blockers/{blocker['id']}")[1]["status"] == "EXPIRED")
    status, body = call(app, "POST", f"/api/blockers/{blocker['id']}/resolve", {"answer": "a"})
    assert (status, body["status"]) == (409, "EXPIRED")


def test_blocker_list_filters_and_order(app):
    first = raise_blocker(app, "ASYNC", "backend-worker-001")
    second = raise_blocker(app, "SYNC", "frontend-worker-001")
    third = raise_blocker(app, "ASYNC", "test-worker-001")
    call(app, "POST", f"/api/blockers/{first['id']}/resolve", {"answer": "done"})
    status, body = call(app, "GET", "/api/projects/1/blockers")
    assert status == 200
    assert [b["id"] for b in body["blockers"]] == [second["id"], third["id"]]  # SYNC, newest
    _, body = call(app, "GET", "/api/projects/1/blockers?status=resolved")
    assert [b["id"] for b in body["blockers"]] == [first["id"]]
    _, body = call(app, "GET", "/api/projects/1/blockers?status=ALL")
    assert len(body["blockers"]) == 3
    assert call(app, "GET", "/api/projects/1/blockers?status=bogus")[0] == 400
    assert call(app, "GET", "/api/projects/2/blockers")[0] == 404
    assert call(app, "GET", f"/api/blockers/{second['id']}")[1]["question"] == "JWT or sessions?"
    assert call(app, "GET", "/api/blockers/424242")[0] == 404
    assert call(app, "DELETE", f"/api/blockers/{second['id']}")[0] in (404, 405, 501)


def test_raising_a_blocker_validates_and_blocks_the_agent(app):
    assert (
        call(app, "POST", "/api/projects/1/blockers", {"agent_id": "nobody", "question": "q"})[0]
        == 404
    )
    status, _ = call(
        app, "POST", "/api/projects/1/blockers", {"agent_id": "test-worker-001", "question": ""}
    )
    assert status == 422
    status, _ = call(
        app,
        "POST",
        "/api/projects/1/blockers",
        {"agent_id": "test-worker-001", "question": "q", "blocker_type": "MAYBE"},
    )
    assert status == 422
    raise_blocker(app, agent="test-worker-001")
    status, body = call(
        app, "POST", "/api/projects/1/blockers", {"agent_id": "test-worker-001", "question": "q"}
    )
    assert (status, body["status"]) == (409, "blocked")


def test_state_endpoint_has_what_a_resync_needs(app):
    blocker = raise_blocker(app)
    status, state = call(app, "GET", "/api/projects/1/state")
    assert status == 200
    assert [b["id"] for b in state["blockers"]] == [blocker["id"]]
    assert {a["id"] for a in state["agents"]} == {
        "backend-worker-001",
        "frontend-worker-001",
        "test-worker-001",
    }
    assert state["tasks"][0]["status"] == "BLOCKED"
    assert state["activity"][0]["key"] == f"blocker_created:{blocker['id']}"


def test_token_endpoint_mints_a_gateway_token_for_the_project(app):
    status, body = call(app, "POST", "/api/gateway-token")
    assert status == 200
    claims = verify_token(body["token"], SECRET)
    assert claims.projects == frozenset({1, 2})  # the demo project and the sandbox
    assert claims.exp - time.time() == pytest.approx(900, abs=5)
    assert call(app, "GET", "/api/gateway-token")[0] == 405


def test_token_endpoint_names_the_pages_person_for_presence(app):
    status, body = call(app, "POST", "/api/gateway-token", {"user": "u-42_x", "name": "  Alice "})
    assert status == 200, body
    claims = verify_token(body["token"], SECRET)
    assert (claims.sub, claims.name) == ("u-42_x", "Alice")
    anonymous = verify_token(call(app, "POST", "/api/gateway-token", {})[1]["token"], SECRET)
    assert (anonymous.sub, anonymous.name) == ("demo-user", None)
    for bad in (
        {"user": "has space"},
        {"user": "x" * 65},
        {"user": 7},
        {"user": "u1", "name": ""},
        {"user": "u1", "name": "x" * 41},
        {"user": "u1", "name": "bell\a"},
        {"user": "u1", "name": ["Alice"]},
        {"name": "Alice"},
    ):
        status, body = call(app, "POST", "/api/gateway-token", bad)
        assert status == 422 and body["error"] == "invalid", (bad, body)


def test_first_seen_is_recorded_once_with_the_agents_time_to_first_view(app):
    blocker = raise_blocker(app)
    assert (blocker["first_seen_at"], blocker["first_seen_by"]) == (None, None)
    status, seen = call(app, "POST", f"/api/blockers/{blocker['id']}/seen", {"by": "Alice"})
    assert status == 200, seen
    assert seen["first_seen_by"] == "Alice" and seen["first_seen_at"].endswith("Z")
    again = call(app, "POST", f"/api/blockers/{blocker['id']}/seen", {"by": "Bob"})[1]
    assert (again["first_seen_at"], again["first_seen_by"]) == (seen["first_seen_at"], "Alice")
    _, activity = call(app, "GET", "/api/projects/1/activity")
    entry = next(a for a in activity if a["key"] == f"blocker_seen:{blocker['id']}")
    assert re.fullmatch(
        r"Blocker #\d+ of Backend Worker #1 first seen by Alice \d+ s after it was asked",
        entry["text"],
    ), entry
    _, state = call(app, "GET", "/api/projects/1/state")
    assert state["blockers"][0]["first_seen_by"] == "Alice"
    assert call(app, "POST", "/api/blockers/999999/seen", {})[0] == 404
    assert call(app, "POST", f"/api/blockers/{blocker['id']}/seen", {"by": 5})[0] == 422
    assert call(app, "GET", f"/api/blockers/{blocker['id']}/seen")[0] == 405


def test_config_and_static_files(app):
    status, config = call(app, "GET", "/api/config")
    assert status == 200
    assert config["project_id"] == 1 and config["auth"] is True
    assert config["gateway_url"].startswith("ws://127.0.0.1:")
    with urllib.request.urlopen(app.url) as response:
        assert b"Agent dashboard" in response.read()
    for path, kind in [
        ("eventbus.js", "text/javascript"),
        ("eventbus.d.ts", "text/plain"),
        ("static/app.js", "text/javascript"),
        ("static/style.css", "text/css"),
    ]:
        with urllib.request.urlopen(app.url + path) as response:
            assert response.headers["Content-Type"].startswith(kind)
    for path in ("static/../server.py", "static/%2e%2e/server.py", "nope"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(app.url + path)
        assert info.value.code == 404


def test_healthz_answers(app):
    # It was routed to the static files (404) before.
    assert call(app, "GET", "/healthz") == (200, {"ok": True})


def test_page_uses_no_external_resources():
    static = ROOT / "examples" / "dashboard" / "static"
    for file in static.iterdir():
        text = file.read_text()
        assert not re.search(r"(src|href)=[\"']https?://", text), file
        assert "@import url(http" not in text, file
        assert not re.search(r"from ['\"]https?://", text), file


# --- malformed requests (issue 11 item 7): a JSON 4xx each, bounded, never a 500 -----------


@pytest.fixture
def no_tracebacks(caplog):
    """Fails the test if the backend logged an error (a traceback) while it ran."""
    caplog.set_level(logging.ERROR, logger="examples.dashboard")
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def assert_json_error(response, status: int, code: str | None = None) -> dict:
    assert response.status == status, (response.status, response.body)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body.get("message"), str) and body["message"]
    if code is not None:
        assert body["error"] == code, body
    return body


RESOLVE_1 = "/api/blockers/1/resolve"


def test_negative_content_length_is_refused_at_once(app, no_tracebacks):
    # Before: read "everything" (64 MiB) and blocked while the client kept the connection open.
    request = http_request("POST", RESOLVE_1, headers={"Content-Length": "-1"})
    response = raw_request(app, request + b'{"answer": "x"}', timeout=5)
    assert_json_error(response, 400, "invalid_content_length")
    assert response.headers.get("connection") == "close"


@pytest.mark.parametrize("value", ["abc", "1e3", "+5", "0x10", "5, 5", "99999999999999999999"])
def test_content_length_that_is_not_a_number_is_a_400(app, value, no_tracebacks):
    request = http_request("POST", RESOLVE_1, headers={"Content-Length": value})
    response = raw_request(app, request, timeout=5)
    assert response.status in (400, 413)
    assert_json_error(response, response.status)


def test_two_content_length_headers_are_a_400(app, no_tracebacks):
    request = (
        b"POST /api/blockers/1/resolve HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Content-Length: 15\r\nContent-Type: application/json\r\n\r\n{}"
    )
    assert_json_error(raw_request(app, request, timeout=5), 400, "invalid_content_length")


def test_body_over_the_limit_is_a_413_without_reading_it(app, no_tracebacks):
    request = http_request("POST", RESOLVE_1, headers={"Content-Length": str(64 * 1024 + 1)})
    response = raw_request(app, request, timeout=5)  # nothing of the body sent: not awaited
    assert_json_error(response, 413, "too_large")
    assert response.headers.get("connection") == "close"


def test_chunked_body_is_a_411(app, no_tracebacks):
    request = (
        http_request("POST", RESOLVE_1, headers={"Transfer-Encoding": "chunked"})
        + b"5\r\nhello\r\n0\r\n\r\n"
    )
    assert_json_error(raw_request(app, request, timeout=5), 411, "length_required")


def test_body_that_is_not_json_typed_is_a_415(app, no_tracebacks):
    request = http_request("POST", RESOLVE_1, b'{"answer":"x"}', {"Content-Type": "text/plain"})
    assert_json_error(raw_request(app, request, timeout=5), 415, "unsupported_media_type")


def test_body_that_never_completes_is_a_408_within_the_deadline(app, monkeypatch, no_tracebacks):
    monkeypatch.setattr("examples.dashboard.server.BODY_READ_TIMEOUT", 0.5)
    request = http_request("POST", RESOLVE_1, headers={"Content-Length": "100"})
    response = raw_request(app, request + b'{"ans', timeout=5)  # 95 bytes never come
    assert_json_error(response, 408, "timeout")


def test_deeply_nested_json_is_a_400(app, no_tracebacks):
    body = b'{"answer": ' + b"[" * 100_00 + b"]" * 100_00 + b"}"
    request = http_request("POST", RESOLVE_1, body, {"Content-Type": "application/json"})
    assert_json_error(raw_request(app, request, timeout=5), 400, "invalid_json")


def test_lone_surrogate_in_a_string_is_a_400(app, no_tracebacks):
    blocker = raise_blocker(app)
    body = b'{"answer": "\\ud800"}'
    path = f"/api/blockers/{blocker['id']}/resolve"
    request = http_request("POST", path, body, {"Content-Type": "application/json"})
    assert_json_error(raw_request(app, request, timeout=5), 400, "invalid_json")
    assert call(app, "GET", f"/api/blockers/{blocker['id']}")[1]["status"] == "PENDING"


@pytest.mark.parametrize(
    "field, value",
    [
        ("task_title", 123),
        ("task_title", ["a"]),
        ("task_title", {"a": 1}),
        ("task_title", "t" * 501),  # the contract's limit: the event could not be encoded
        ("task_title", ""),
        ("agent_id", {"id": "backend-worker-001"}),
        ("agent_id", 7),
        ("blocker_type", 1),
        ("question", ["q"]),
    ],
)
def test_raise_blocker_with_a_bad_field_type_is_a_422(app, field, value, no_tracebacks):
    body = {"agent_id": "backend-worker-001", "blocker_type": "SYNC", "question": "Q?"}
    body[field] = value
    status, answer = call(app, "POST", "/api/projects/1/blockers", body)
    assert status == 422, answer
    assert field in answer["message"]
    assert call(app, "GET", "/api/projects/1/agents")[1][0]["status"] == "idle"  # nothing done


@pytest.mark.parametrize("body", [b"[]", b'"answer"', b"42", b"null"])
def test_body_that_is_not_an_object_is_a_400(app, body, no_tracebacks):
    request = http_request("POST", RESOLVE_1, body, {"Content-Type": "application/json"})
    assert_json_error(raw_request(app, request, timeout=5), 400, "invalid_body")


def test_http_servers_own_errors_are_json(app, no_tracebacks):
    unknown_method = raw_request(app, http_request("BREW", "/api/config"), timeout=5)
    assert_json_error(unknown_method, 405)
    garbage = raw_request(app, b"GARBAGE\r\n\r\n", timeout=5)
    assert_json_error(garbage, 400)
    long_header = http_request("GET", "/api/config", headers={"X-Long": "a" * 70_000})
    assert_json_error(raw_request(app, long_header, timeout=5), 431)


@pytest.mark.parametrize("path", ["/api/config", "/", "/static/style.css"])
def test_unread_body_of_a_get_closes_the_connection(app, path, no_tracebacks):
    # The body of a GET is not read: answering and keeping the connection would parse it as the
    # next request (the page and static files did, found by the fuzz test).
    request = http_request("GET", path, b"{}")
    responses = raw_exchange(app, request + http_request("GET", "/healthz"), count=2, timeout=5)
    assert [r.status for r in responses] == [200]
    assert responses[0].headers.get("connection") == "close"


# --- persistence and the outbox ------------------------------------------------------------


def test_restart_loses_no_blockers(make_app, tmp_path):
    app = make_app()
    kept = raise_blocker(app, "SYNC", "backend-worker-001")
    done = raise_blocker(app, "ASYNC", "frontend-worker-001")
    call(app, "POST", f"/api/blockers/{done['id']}/resolve", {"answer": "ok"})
    app.stop()
    again = make_app()  # same database file
    _, body = call(again, "GET", "/api/projects/1/blockers?status=ALL")
    assert {(b["id"], b["status"]) for b in body["blockers"]} == {
        (kept["id"], "PENDING"),
        (done["id"], "RESOLVED"),
    }
    status, _ = call(again, "POST", f"/api/blockers/{kept['id']}/resolve", {"answer": "later"})
    assert status == 200


def test_events_written_while_redis_is_down_are_published_later(tmp_path, redis_url):
    # The change and its event are committed together; the relay publishes when it can, in order.
    store = Store(tmp_path / "outbox.sqlite3")
    store.seed(1)
    blocker = store.create_blocker(1, "backend-worker-001", "SYNC", "Q?", task_title="T")
    store.resolve_blocker(blocker["id"], "A")
    assert store.unpublished_count() == 2
    store.close()
    app = DemoApp(
        Config(port=0, db=str(tmp_path / "outbox.sqlite3"), redis_url=redis_url, agents=False)
    ).start()
    try:
        app.wait_published()
        types = [e["type"] for e in published(redis_url)]
        assert types[:2] == ["blocker_created", "blocker_resolved"]
    finally:
        app.stop()


def test_outbox_retries_publish_each_event_once(tmp_path, redis_url):
    # The demo writes through publisher.outbox and publishes with its relay.
    from publisher import Publisher
    from publisher.outbox import OutboxRelay

    store = Store(tmp_path / "once.sqlite3")
    store.seed(1)
    store.create_blocker(1, "backend-worker-001", "ASYNC", "Q?", task_title="T")
    publisher = Publisher.from_url(redis_url)
    relay = OutboxRelay.sqlite(store.path, publisher)
    assert relay.run_once() == 1
    # A crash after Redis accepted the event but before the row was marked: the retry is a no-op.
    store._db.execute("UPDATE eventbus_outbox SET published_at = NULL, epoch = NULL, seq = NULL")
    relay.run_once()
    assert len(published(redis_url)) == 1
    assert store.unpublished_count() == 0
    relay.stop()
    publisher.close()
    store.close()


def test_a_database_of_the_old_demo_keeps_its_unpublished_events(tmp_path, redis_url):
    # Before publisher.outbox, the demo had an "outbox" table of its own: what it had not
    # published yet moves to the library's table, in order, and goes out.
    import sqlite3

    path = tmp_path / "old.sqlite3"
    Store(path).close()
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, event BLOB NOT NULL, "
                "published_at TEXT)")  # fmt: skip
    events = [
        b'{"type":"blocker_expired","project_id":1,"blocker_id":%d,"task_id":9,'
        b'"expired_at":"2026-12-01T00:00:00Z"}' % number
        for number in (1, 2, 3)
    ]
    old.execute("INSERT INTO outbox (event, published_at) VALUES (?, 'x')", (events[0],))
    old.execute("INSERT INTO outbox (event) VALUES (?)", (events[1],))
    old.execute("INSERT INTO outbox (event) VALUES (?)", (b"not an event",))  # dropped, logged
    # Not text at all (a BLOB column takes anything): dropped, without bytes(10**12) first.
    old.execute("INSERT INTO outbox (event) VALUES (?)", (10**12,))
    old.execute("INSERT INTO outbox (event) VALUES (?)", (events[2].decode(),))  # stored as TEXT
    old.close()
    app = DemoApp(Config(port=0, db=str(path), redis_url=redis_url, agents=False)).start()
    try:
        app.wait_published()
        assert [e["blocker_id"] for e in published(redis_url)] == [2, 3]
        tables = app.store._db.execute("SELECT name FROM sqlite_master WHERE name = 'outbox'")
        assert tables.fetchall() == []
    finally:
        app.stop()


# --- snapshots with a cursor ---------------------------------------------------------------


def test_state_comes_with_the_cursor_of_exactly_the_events_it_includes(app, redis_url):
    _, empty = call(app, "GET", "/api/projects/1/state")
    assert empty["cursor"] is None  # no event yet: the page subscribes as without a snapshot
    first = raise_blocker(app, "SYNC", "backend-worker-001")
    second = raise_blocker(app, "ASYNC", "frontend-worker-001")
    _, state = call(app, "GET", "/api/projects/1/state")
    events = published(redis_url)
    assert [b["id"] for b in state["blockers"]] == [first["id"], second["id"]]
    assert state["cursor"]["seq"] == len(events) == 2
    client = redis.Redis.from_url(redis_url)
    assert state["cursor"]["epoch"] == client.hget(Keys().meta(1), "epoch").decode()
    # With the tag of the event at that seq, which the page sends when it resumes from there.
    ((_, fields),) = client.xrange(Keys().stream(1), "2-0", "2-0")
    assert state["cursor"]["tag"] == event_tag(fields[b"f"])
    client.close()
    _, listed = call(app, "GET", "/api/projects/1/blockers")
    assert listed["cursor"] == state["cursor"]


def test_snapshots_are_exact_while_events_are_being_written(app, redis_url):
    # Every snapshot's blockers are exactly what the events up to its cursor say: replaying the
    # published events 1..cursor.seq gives the pending set the snapshot holds.
    import threading

    stop = threading.Event()
    agents = ["backend-worker-001", "frontend-worker-001", "test-worker-001"]

    def churn() -> None:
        while not stop.is_set():
            for agent in agents:  # (409 while the agent has not resumed yet: the next one)
                body = {"agent_id": agent, "blocker_type": "ASYNC", "question": "Q?"}
                status, blocker = call(app, "POST", "/api/projects/1/blockers", body)
                if status == 201:
                    call(app, "POST", f"/api/blockers/{blocker['id']}/resolve", {"answer": "go"})

    writer = threading.Thread(target=churn, daemon=True)
    writer.start()
    try:
        checked = 0
        deadline = time.monotonic() + 30
        while checked < 25 or len(published(redis_url)) < 60:
            assert time.monotonic() < deadline, "the writer did not get going"
            _, state = call(app, "GET", "/api/projects/1/state")
            if state["cursor"] is None:
                continue
            events = published(redis_url)[: state["cursor"]["seq"]]
            pending: set[int] = set()
            for event in events:
                if event["type"] == "blocker_created":
                    pending.add(event["blocker"]["id"])
                elif event["type"] in ("blocker_resolved", "blocker_expired"):
                    pending.discard(event["blocker_id"])
            assert {b["id"] for b in state["blockers"]} == pending, state["cursor"]
            checked += 1
    finally:
        stop.set()
        writer.join(10)


def test_state_without_redis_answers_without_a_cursor(make_app):
    # The relay cannot publish: the read waits (bounded) and answers with the data, no cursor.
    app = make_app(redis_url="redis://127.0.0.1:1/0")
    raise_blocker(app, "SYNC", "backend-worker-001")
    started = time.monotonic()
    status, state = call(app, "GET", "/api/projects/1/state")
    assert status == 200 and state["cursor"] is None and len(state["blockers"]) == 1
    assert time.monotonic() - started < 10


def test_stopping_the_backend_while_redis_hangs_is_bounded(make_app):
    # Ctrl-C while Redis answers nothing: the relay's publish gives up within the demo's 2 s
    # bound (not the library's 10 s), so stop() returns promptly with the event still queued.
    from tests.support.redis_server import RedisServer, hung

    with RedisServer() as server:
        app = make_app(redis_url=server.url)
        with hung(server):
            raise_blocker(app, "SYNC", "backend-worker-001")  # committed; the relay is stuck
            started = time.monotonic()
            app.stop()
            assert time.monotonic() - started < 5
            assert Store(app.config.db).unpublished_count() == 1  # kept for the next start


# --- the agents wait for their answers through the bus --------------------------------------


def test_agents_learn_of_answers_from_the_bus_not_the_database(app, redis_url, gateway):
    assert app.answers.ready.wait(10), "the answer listener never subscribed"
    blocker = raise_blocker(app, "SYNC", "backend-worker-001")
    # Resolved in the database without publishing its event: the agent must not resume...
    with app.store._tx() as db:
        db.execute(
            "UPDATE blockers SET status = 'RESOLVED', answer = 'x', resolved_ts = 0 WHERE id = ?",
            (blocker["id"],),
        )
    app.agents.step()  # (the agents polled the database: this step would have resumed it)
    assert {a["id"]: a["status"] for a in app.store.agents(1)}["backend-worker-001"] == "blocked"
    # ...until the bus says so.
    from publisher import Publisher
    from schemas.events import BlockerResolved, utc_now

    with Publisher.from_url(redis_url) as bus:
        bus.publish(
            BlockerResolved(
                project_id=1, blocker_id=blocker["id"], answer="x", resolved_at=utc_now()
            )
        )
    wait_for(
        lambda: any(
            e["type"] == "agent_resumed" and e["blocker_id"] == blocker["id"]
            for e in published(redis_url)
        ),
        what="agent_resumed",
    )
    assert app.answers.consumer is not None and app.answers.consumer.stats.delivered >= 2


def test_answers_missed_while_the_backend_was_down_are_reloaded(make_app, redis_url):
    from publisher import Publisher
    from publisher.outbox import OutboxRelay

    app = make_app()
    blocker = raise_blocker(app, "SYNC", "backend-worker-001")
    app.stop()
    # Answered, and its event published, while no backend listened: the next backend's listener
    # subscribes from "now", so only its reload from the database can tell the agent.
    store = Store(app.config.db)
    store.resolve_blocker(blocker["id"], "done while you were away")
    with Publisher.from_url(redis_url) as publisher:
        relay = OutboxRelay.sqlite(store.path, publisher)
        assert relay.run_once() == 1
        relay.stop()
    store.close()
    again = make_app()
    wait_for(
        lambda: any(
            e["type"] == "agent_resumed" and e["blocker_id"] == blocker["id"]
            for e in published(redis_url)
        ),
        what="agent_resumed after the reload",
    )
    assert again.answers.ready.is_set()


def test_sweeper_expires_old_blockers_and_fails_their_task(make_app, redis_url):
    app = make_app(blocker_ttl=0.5, sweep_interval=0.05)
    blocker = raise_blocker(app, "ASYNC", "test-worker-001")
    wait_for(
        lambda: any(e["type"] == "blocker_expired" for e in published(redis_url)),
        what="blocker_expired",
    )
    expired = next(e for e in published(redis_url) if e["type"] == "blocker_expired")
    assert (expired["blocker_id"], expired["task_id"]) == (blocker["id"], blocker["task_id"])
    _, tasks = call(app, "GET", "/api/projects/1/tasks")
    assert {t["id"]: t["status"] for t in tasks}[blocker["task_id"]] == "FAILED"
    _, pending = call(app, "GET", "/api/projects/1/blockers")
    assert pending["blockers"] == []
    _, activity = call(app, "GET", "/api/projects/1/activity")
    assert activity[0]["text"] == f"Blocker #{blocker['id']} expired - task failed"


def test_default_expiry_is_24_hours():
    assert Config().blocker_ttl == 24 * 3600


def test_simulated_agents_raise_sync_and_async_blockers(make_app, redis_url):
    app = make_app(agents=True, work_time=(0.05, 0.1))
    kinds: set[str] = set()
    resolved: set[int] = set()
    deadline = time.monotonic() + 20
    # Agents block on their blocker: answer each one so they carry on raising new ones.
    while kinds != {"SYNC", "ASYNC"}:
        assert time.monotonic() < deadline, f"only saw {kinds}"
        for event in published(redis_url):
            if event["type"] == "blocker_created":
                kinds.add(event["blocker"]["blocker_type"])
                blocker_id = event["blocker"]["id"]
                if blocker_id not in resolved:
                    resolved.add(blocker_id)
                    call(app, "POST", f"/api/blockers/{blocker_id}/resolve", {"answer": "go"})
        time.sleep(0.05)
    first = min(resolved)
    wait_for(
        lambda: any(
            e["type"] == "agent_resumed" and e["blocker_id"] == first for e in published(redis_url)
        ),
        what="agent_resumed",
    )


def test_simulated_reviewer_answers_async_blockers_and_leaves_sync_ones(tmp_path):
    # The demo must not go quiet when nobody answers: ASYNC blockers get a labelled answer.
    store = Store(tmp_path / "review.sqlite3")
    store.seed(1)
    asynchronous = store.create_blocker(1, "backend-worker-001", "ASYNC", "Q?", task_title="T")
    sync = store.create_blocker(1, "frontend-worker-001", "SYNC", "Q?", task_title="T")
    simulation = AgentSimulation(
        store, 1, reviewer_delay=0.001, work_time=(60, 60), rng=random.Random(7)
    )
    time.sleep(0.01)
    simulation.step()
    answered = store.blocker(asynchronous["id"])
    assert answered["status"] == "RESOLVED"
    assert answered["answer"].startswith(REVIEWER_PREFIX)
    assert store.blocker(sync["id"])["status"] == "PENDING"  # SYNC waits for a person
    texts = [entry["text"] for entry in store.activity(1)]
    assert f"Blocker #{asynchronous['id']} resolved by the simulated reviewer" in texts
    simulation.step()  # the agent resumes after resume_delay; nothing is answered twice
    assert store.blocker(asynchronous["id"])["answer"] == answered["answer"]
    store.close()


def test_simulated_agents_never_all_wait_on_sync_blockers(tmp_path, monkeypatch):
    # All three agents blocked on SYNC blockers made the demo go quiet until they expired.
    store = Store(tmp_path / "alive.sqlite3")
    store.seed(1)
    simulation = AgentSimulation(
        store, 1, sync_ratio=1.0, work_time=(0, 0), reviewer_delay=None, rng=random.Random(3)
    )
    raised: list[str] = []
    for _ in range(200):
        simulation.step()
        pending = store.blockers(1)
        assert sum(b["blocker_type"] == "SYNC" for b in pending) <= 2, pending
        raised = [b["blocker_type"] for b in store.blockers(1, None)]
        if len(raised) == 3:
            break
    assert sorted(raised) == ["ASYNC", "SYNC", "SYNC"]
    store.close()


def test_demo_keeps_going_while_nobody_answers(make_app):
    # Issue 10: the demo went quiet ~40 s after start, once all three agents were blocked. Run
    # the whole backend at a fast pace with nobody at the dashboard: blockers keep being raised
    # and answered by the reviewer, far beyond one per agent (each agent resuming on the
    # blocker_resolved it receives through the gateway).
    app = make_app(agents=True, work_time=(0.02, 0.05), resume_delay=0.02, reviewer_delay=0.2)
    app.agents.idle_time = (0.01, 0.02)
    app.agents.interval = 0.02  # steps 10x as often as the demo's
    store = app.store
    wait_for(lambda: len(store.blockers(1, None)) >= 12, timeout=30, what="12 blockers")
    everything = store.blockers(1, None)
    assert any(b["status"] == "RESOLVED" for b in everything)
    assert all(b["answer"].startswith(REVIEWER_PREFIX) for b in everything if b["answer"])


def test_sandbox_project_is_in_the_config_and_the_token(app):
    _, config = call(app, "GET", "/api/config")
    assert (config["project_id"], config["sandbox_project_id"]) == (1, 2)
    _, body = call(app, "POST", "/api/gateway-token")
    assert verify_token(body["token"], SECRET).projects == frozenset({1, 2})


def test_no_sandbox_when_turned_off_or_equal_to_the_project(make_app):
    for sandbox in (None, 1):
        app = make_app(sandbox_project_id=sandbox)
        _, config = call(app, "GET", "/api/config")
        assert config["sandbox_project_id"] is None
        _, body = call(app, "POST", "/api/gateway-token")
        assert verify_token(body["token"], SECRET).projects == frozenset({1})
        app.stop()


# --- make run ------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_run_starts_everything_and_stops_it_on_a_signal(tmp_path, stop_signal):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    process = subprocess.Popen(
        [
            sys.executable, "-m", "examples.dashboard.run",
            "--port", "0", "--gateway-port", "0", "--no-agents",
            "--db", str(tmp_path / "run.sqlite3"),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    output: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 30
        while url is None:
            line = process.stdout.readline()
            if not line:
                raise AssertionError("run exited early:\n" + "".join(output))
            output.append(line)
            match = re.search(r"Dashboard\s+(http://\S+)", line)
            if match:
                url = match.group(1)
            assert time.monotonic() < deadline, "".join(output)
        gateway = re.search(r"Gateway\s+ws://([\d.]+:\d+)/", "".join(output))
        while gateway is None:
            output.append(process.stdout.readline())
            gateway = re.search(r"Gateway\s+ws://([\d.]+:\d+)/", "".join(output))
        while "Press Ctrl-C" not in output[-1]:
            output.append(process.stdout.readline())
        # The environment to publish into this demo, printed and saved for `make shell`.
        export = re.search(r"export EVENTBUS_REDIS_URL=(redis://[\d.]+:\d+/0)\n", "".join(output))
        assert export, "".join(output)
        env_file = tmp_path / "demo.env"
        lines = env_file.read_text().splitlines()
        assert lines[:2] == [
            f"export EVENTBUS_REDIS_URL={export.group(1)}",
            f"export EVENTBUS_GATEWAY_URL=ws://{gateway.group(1)}/",
        ]
        # The demo's token secret, for `eventbus-publish tail` in `make shell`: never printed,
        # in a file only its owner reads.
        assert lines[2].startswith("export EVENTBUS_AUTH_SECRET=") and len(lines) == 3
        assert lines[2].split("=", 1)[1] not in "".join(output)
        assert env_file.stat().st_mode & 0o777 == 0o600
        redis.Redis.from_url(export.group(1)).ping()
        with urllib.request.urlopen(url + "api/config", timeout=5) as response:
            assert json.loads(response.read())["auth"] is True
        with urllib.request.urlopen(f"http://{gateway.group(1)}/readyz", timeout=5) as response:
            assert response.status == 200
        # The agents wait for answers through the backend's own consumer on this gateway (which
        # runs with an Origin allowlist for the page: the consumer sends no Origin).
        demo = SimpleNamespace(url=url)
        blocker = raise_blocker(demo, "SYNC", "backend-worker-001")
        assert (
            call(demo, "POST", f"/api/blockers/{blocker['id']}/resolve", {"answer": "go"})[0] == 200
        )
        wait_for(
            lambda: (
                {a["id"]: a["status"] for a in call(demo, "GET", "/api/projects/1/agents")[1]}[
                    "backend-worker-001"
                ]
                == "working"
            ),
            timeout=20,
            what="the agent resumed through the consumer",
        )
        children = subprocess.run(
            ["pgrep", "-P", str(process.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) == 2, (children, "".join(output))  # redis-server and the gateway

        process.send_signal(stop_signal)
        rest, _ = process.communicate(timeout=30)
        assert process.returncode == 0, "".join(output) + rest
        assert "stopped." in rest
        assert not env_file.exists()
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"child {pid} still runs"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{gateway.group(1)}/healthz", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _zombie(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


# --- the answer listener and the agents, without sockets -------------------------------------


def test_the_listener_skips_an_event_it_cannot_decode_and_goes_on():
    # A newer publisher's event type (or garbage in Redis) must not stop the agents' waiting:
    # the consumer raises UndecodableEvent in its place, and the iterator goes on after it.
    import asyncio

    from consumer import Delivery, Resync, UndecodableEvent
    from examples.dashboard.answers import AnswerListener
    from schemas.events import BlockerResolved, utc_now
    from schemas.protocol import ResyncReason

    def resolved(seq: int, blocker_id: int) -> Delivery:
        event = BlockerResolved(
            project_id=1, blocker_id=blocker_id, answer="a", resolved_at=utc_now()
        )
        return Delivery(1, "e", seq, event, b"")

    script = [
        resolved(1, 10),
        UndecodableEvent(1, "e", 2, b'{"type":"task_status_changed"}', "unknown type"),
        resolved(3, 11),
        Resync(1, ResyncReason.EPOCH_CHANGED, "f", 0),
        resolved(1, 12),
    ]

    class Items:
        def __aiter__(self):
            return self

        async def __anext__(self):
            if not script:
                raise StopAsyncIteration
            item = script.pop(0)
            if isinstance(item, Exception):
                raise item
            return item

    calls: list = []
    listener = AnswerListener(
        "ws://unused/", 1, token=None,
        on_answered=lambda b: calls.append(("answered", b)),
        on_reload=lambda: calls.append(("reload",)),
    )  # fmt: skip
    asyncio.run(listener.route(Items()))
    assert calls == [("answered", 10), ("answered", 11), ("reload",), ("answered", 12)]


def test_an_agent_whose_resume_failed_resumes_at_the_next_step(tmp_path, monkeypatch):
    store = Store(tmp_path / "retry.sqlite3")
    store.seed(1)
    blocker = store.create_blocker(1, "backend-worker-001", "SYNC", "Q?", task_title="T")
    store.resolve_blocker(blocker["id"], "go")
    simulation = AgentSimulation(store, 1, active=False, resume_delay=0)
    simulation.answered(blocker["id"])
    real = store.resume_agent

    def busy(blocker_id: int) -> bool:
        monkeypatch.setattr(store, "resume_agent", real)
        raise sqlite3.OperationalError("database is locked")

    import sqlite3

    monkeypatch.setattr(store, "resume_agent", busy)
    with pytest.raises(sqlite3.OperationalError):
        simulation.step()
    assert {a["id"]: a["status"] for a in store.agents(1)}["backend-worker-001"] == "blocked"
    simulation.step()
    assert {a["id"]: a["status"] for a in store.agents(1)}["backend-worker-001"] == "working"
    store.close()
