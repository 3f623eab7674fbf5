"""Fixtures of the browser tests: Debian's chromium through Playwright, a real gateway process,
the demo backend in-process, all against the session's private Redis (never 127.0.0.1:6379).

Chromium is required: these tests run in CI, so a missing browser is a failure with a clear
message, not a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from examples.dashboard.server import DemoApp
from tests.support.dashboard_api import demo_apps
from tests.support.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = "browser-tests-secret-0123456789abcdef"  # >= 32 bytes for HS256
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Conditions are awaited (never slept for); most settle in well under a second.
expect.set_options(timeout=10_000)


def chromium_path() -> str:
    path = os.environ.get("EVENTBUS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail(
            "chromium not found: the browser tests drive Debian's chromium through Playwright. "
            "Install it (`make install` does, or `apt-get install chromium`) or point "
            "EVENTBUS_CHROMIUM at a chromium binary.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Module scope: one chromium per test file, closed before other (asyncio) test modules run.
    path = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class GatewayProcess:
    """``python -m gateway`` on a fixed port, so it can be killed and started again there."""

    def __init__(self, redis_url: str, log_path: Path, *extra: str) -> None:
        self.redis_url = redis_url
        self.port = free_port()
        self.log_path = log_path
        self.extra = list(extra)
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> GatewayProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "gateway",
                "--redis-url", self.redis_url,
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--auth-secret", SECRET,
                "--log-level", "info",
                *self.extra,
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.http_url}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not ready:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the abrupt death of the process (its TCP connections are reset)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def terminate(self, timeout: float = 30.0) -> None:
        """SIGTERM: the gateway drains, closing clients with 1012."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture
def gateway(redis_url: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    process = GatewayProcess(redis_url, tmp_path / "gateway.log").start()
    yield process
    process.kill()


@pytest.fixture
def make_demo(tmp_path: Path, redis_url: str, gateway: GatewayProcess) -> Iterator[Callable]:
    """Start a demo backend (agents off, quick resume) wired to the test gateway."""
    with demo_apps(
        tmp_path,
        redis_url=redis_url,
        auth_secret=SECRET,
        gateway_port=gateway.port,
        resume_delay=0.3,
    ) as make:
        yield make


@pytest.fixture
def demo(make_demo) -> DemoApp:
    return make_demo()


@pytest.fixture
def new_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """Pages in fresh contexts; console errors are collected to explain failures."""
    contexts = []

    def make(
        url: str | None = None, *, wait_live: bool = True, setup=None, viewport: dict | None = None
    ) -> Page:
        context = browser.new_context(viewport=viewport or {"width": 1280, "height": 860})
        contexts.append(context)
        page = context.new_page()
        page.console_messages_seen = []  # type: ignore[attr-defined]
        page.on(
            "console",
            lambda message: page.console_messages_seen.append(f"{message.type}: {message.text}"),
        )
        page.on("pageerror", lambda error: page.console_messages_seen.append(f"error: {error}"))
        if setup is not None:
            setup(page)
        if url is not None:
            page.goto(url)
            if wait_live:
                wait_live_and_loaded(page)
        return page

    yield make
    for context in contexts:
        context.close()


def wait_live_and_loaded(page: Page) -> None:
    """Connected, and the first resync (the full state load) done."""
    expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state", "live")
    page.wait_for_function("Number(document.body.dataset.resyncs || 0) >= 1")
    # The sandbox project is subscribed on the same connection, from "now": an event published
    # before its `subscribed` is (rightly) not shown, so wait for it too.
    page.wait_for_function(
        """() => {
          const d = window.dashboard;
          const sandbox = d.model.config && d.model.config.sandbox_project_id;
          return !sandbox || (d.bus !== null && d.bus.cursor(sandbox) !== null);
        }"""
    )
