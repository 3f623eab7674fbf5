"""Regenerate ``docs/dashboard.png``: ``python -m examples.dashboard.screenshot [PATH]
[--width PX]`` (a narrower width, e.g. 360, photographs the whole page as a phone shows it).

Starts a private Redis, a gateway and the demo backend (agents off), plays a fixed scene through
the API so the picture is the same every time, and photographs the page with Playwright driving
the system's chromium (``EVENTBUS_CHROMIUM`` or ``chromium`` on PATH). Needs the test extra.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

from examples.dashboard.redis_server import PrivateRedis, free_port
from examples.dashboard.run import Gateway
from examples.dashboard.server import Config, DemoApp
from publisher import Publisher

SECRET = "screenshot-secret-0123456789abcdef0123"


def _call(app: DemoApp, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        app.url.rstrip("/") + path,
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _raise(app: DemoApp, agent: str, kind: str, question: str, task: str) -> dict:
    return _call(
        app,
        "/api/projects/1/blockers",
        {"agent_id": agent, "blocker_type": kind, "question": question, "task_title": task},
    )


def _person_page(browser, person_id: str, name: str, **context):
    """A page in a browser context of its own, as the person the demo page keeps in localStorage."""
    page = browser.new_context(**context).new_page()
    person = json.dumps(json.dumps({"id": person_id, "name": name}))
    page.add_init_script(f"localStorage.setItem('eventbus-demo-person', {person})")
    return page


def main(argv: list[str] | None = None) -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(prog="python -m examples.dashboard.screenshot")
    parser.add_argument("path", nargs="?", default="docs/dashboard.png")
    parser.add_argument("--width", type=int, default=1280, help="viewport width, px")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    target = Path(args.path)
    mobile = args.width < 900
    chromium = os.environ.get("EVENTBUS_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        raise SystemExit("chromium not found (set EVENTBUS_CHROMIUM)")
    workdir = Path(tempfile.mkdtemp(prefix="dashboard-screenshot-"))
    redis = PrivateRedis().start()
    port = free_port()
    gateway = Gateway(
        ["--redis-url", redis.url, "--port", str(port), "--log-level", "warning"],
        f"http://127.0.0.1:{port}",
        SECRET,
    )
    app = None
    try:
        gateway.start()
        app = DemoApp(
            Config(
                port=0,
                db=str(workdir / "db.sqlite3"),
                redis_url=redis.url,
                auth_secret=SECRET,
                gateway_port=port,
                agents=False,
                resume_delay=0.2,
            )
        ).start()
        first = _raise(
            app,
            "test-worker-001",
            "ASYNC",
            "Which time zone should reports use by default?",
            "Add CSV export to reports",
        )
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium, args=["--headless=new", "--no-sandbox", "--disable-gpu"]
            )
            page = _person_page(
                browser,
                "p-alice",
                "Alice",
                viewport={"width": args.width, "height": 800 if mobile else 1060},
                device_scale_factor=2 if mobile else 1,
            )
            page.goto(app.url)
            page.wait_for_selector('[data-testid="connection-state"][data-state="live"]')
            page.wait_for_function("Number(document.body.dataset.resyncs || 0) >= 1")
            _raise(
                app,
                "frontend-worker-001",
                "ASYNC",
                "Is it fine to drop support for IE11 in the date picker?",
                "Design the notification settings screen",
            )
            sync = _raise(
                app,
                "backend-worker-001",
                "SYNC",
                "Should we use JWT or sessions?",
                "Implement authentication",
            )
            # A second person, Bob, answering the SYNC blocker in his own browser (presence).
            bob = _person_page(browser, "p-bob", "Bob", viewport={"width": 1280, "height": 900})
            bob.goto(app.url)
            bob.wait_for_selector('[data-testid="connection-state"][data-state="live"]')
            bob.click(
                f'[data-testid="blocker-item"][data-blocker-id="{sync["id"]}"] '
                '[data-testid="answer-button"]'
            )
            bob.fill('[data-testid="answer-input"]', "Sessions, I think")
            _call(app, f"/api/blockers/{first['id']}/resolve", {"answer": "UTC, shown local"})
            page.wait_for_selector(
                f'[data-testid="activity-item"][data-key="agent_resumed:{first["id"]}"]'
            )
            _raise(
                app,
                "test-worker-001",
                "ASYNC",
                "Should the export include archived projects?",
                "Add CSV export to reports",
            )
            page.wait_for_function(
                "document.querySelectorAll('[data-testid=blocker-item]').length === 3"
            )
            # What a newcomer publishes from outside lands in the Sandbox panel (project 2).
            with Publisher.from_url(redis.url) as bus:
                bus.blocker_resolved(2, blocker_id=123, answer="Use JWT for stateless API")
            page.wait_for_selector('[data-testid="sandbox-item"]')
            page.wait_for_function(
                "Array.from(document.querySelectorAll('[data-testid=blocker-presence]'))"
                ".some((n) => n.textContent === 'Bob is answering…')"
            )
            page.wait_for_timeout(300)  # let the slide-in animation finish before the photo
            target.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(target), full_page=mobile)
            browser.close()
        print(f"wrote {target}")
    finally:
        if app is not None:
            app.stop()
        gateway.stop()
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
