"""The page the eventbus.js end-to-end tests drive: this checkout's eventbus.js and the driver
(eventbus_churn.js), served by a real HTTP server on a port of its own (with Playwright's router
serving the page, chromium's WebSocket never opens: 1006), opened in a fresh browser context
whose page errors are collected in ``page.problems``."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler

from playwright.sync_api import Browser, Page

from tests.browser.conftest import ROOT

CLIENT_JS = ROOT / "gateway" / "static" / "eventbus.js"
DRIVER_JS = ROOT / "tests" / "browser" / "eventbus_churn.js"


class DriverServer:
    """Serves ``/<name>/`` (a page importing the driver as ``window.driver``), the driver and
    ``/eventbus.js`` from a threaded HTTP/1.1 server on a port of its own (``url``). Every GET is
    first offered to ``api(handler)``, which answers it itself and returns True (a test's fake
    gateway endpoints on the page's origin), or returns False to leave it to the files (404 for
    any other path)."""

    def __init__(self, name: str, api: Callable[[BaseHTTPRequestHandler], bool] | None = None):
        index = f"""<!doctype html><meta charset="utf-8"><title>eventbus.js {name}</title>
<script type="module">
  import * as driver from "/{name}/driver.js";
  window.driver = driver;
  window.driverReady = true;
</script>"""
        files = {
            f"/{name}/": (index.encode(), "text/html"),
            "/eventbus.js": (CLIENT_JS.read_bytes(), "text/javascript"),
            f"/{name}/driver.js": (DRIVER_JS.read_bytes(), "text/javascript"),
        }

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if api is not None and api(self):
                    return
                body, kind = files.get(self.path, (b"not found", "text/plain"))
                self.send_response(200 if self.path in files else 404)
                self.send_header("Content-Type", f"{kind}; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def served_driver(name: str) -> Iterator[str]:
    """A :class:`DriverServer` of ``name`` and nothing else; yields its base URL."""
    server = DriverServer(name)
    try:
        yield server.url
    finally:
        server.close()


@contextlib.contextmanager
def driver_page(browser: Browser, base_url: str, name: str) -> Iterator[Page]:
    """The page of :func:`served_driver`, loaded and its driver ready."""
    context = browser.new_context()
    page = context.new_page()
    page.problems = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda error: page.problems.append(str(error)))  # type: ignore[attr-defined]
    page.goto(f"{base_url}/{name}/")
    page.wait_for_function("window.driverReady === true")
    try:
        yield page
    finally:
        context.close()
