"""The demo backend in tests (browser and backend tests alike): starting it, calling its API."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from examples.dashboard.server import Config, DemoApp


@contextlib.contextmanager
def demo_apps(tmp_path: Path, **defaults: Any) -> Iterator[Callable[..., DemoApp]]:
    """``make(**overrides)`` starts a demo backend on a free port with its agents off and, unless
    ``db`` is given, a SQLite file of its own; every one started is stopped on exit."""
    apps: list[DemoApp] = []

    def make(**overrides: Any) -> DemoApp:
        values = {
            "host": "127.0.0.1",
            "port": 0,
            "db": str(tmp_path / f"dashboard-{len(apps)}.sqlite3"),
            "agents": False,
            **defaults,
            **overrides,
        }
        app = DemoApp(Config(**values)).start()
        apps.append(app)
        return app

    try:
        yield make
    finally:
        for app in apps:
            with contextlib.suppress(Exception):  # a test may have stopped it already
                app.stop()


def api(app, method: str, path: str, body: Any = None, raw: bytes | None = None
        ) -> tuple[int, Any]:
    """Call ``app`` (a running DemoApp); returns (status, decoded JSON). ``raw`` sends bytes
    as they are (for malformed bodies)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(app.url.rstrip("/") + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
