"""Calling the demo backend's HTTP API from tests (browser and backend tests alike)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


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
