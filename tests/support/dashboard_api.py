"""The demo backend in tests (browser and backend tests alike): starting it, calling its API."""

from __future__ import annotations

import contextlib
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


def api(app, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
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


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    app, data: bytes, *, timeout: float = 15.0, shut_write: bool = False
) -> RawResponse:
    """Send ``data`` as it is over a new connection to ``app`` and read one response.

    The connection stays open for writing unless ``shut_write`` (a client that keeps it open
    is how a server blocked on a read shows: no answer before ``timeout``, TimeoutError)."""
    responses = raw_exchange(app, data, count=1, timeout=timeout, shut_write=shut_write)
    if not responses:
        raise ConnectionError("closed without an answer")
    return responses[0]


def raw_exchange(
    app,
    data: bytes,
    *,
    count: int,
    timeout: float = 15.0,
    shut_write: bool = True,
    heads: tuple[bool, ...] = (),
) -> list[RawResponse]:
    """Send ``data`` (one or more pipelined requests) over a new connection and read up to
    ``count`` responses, fewer if the server closes first. ``heads[i]`` says the i-th request
    was a HEAD (its answer has a Content-Length but no body)."""
    responses: list[RawResponse] = []
    with socket.create_connection(("127.0.0.1", app.port), timeout=timeout) as sock:
        # The server may answer and close before it has read everything (a 4xx for a bad
        # header stops reading): the answer is still to be read, so a failed send or shutdown
        # of our side is not the test's outcome.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        if shut_write:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        reader = sock.makefile("rb")
        while len(responses) < count:
            head = heads[len(responses)] if len(responses) < len(heads) else False
            response = _read_response(reader, head=head)
            if response is None:
                break
            responses.append(response)
    return responses


def _read_response(reader, *, head: bool) -> RawResponse | None:
    status = 100
    headers: dict[str, str] = {}
    while 100 <= status < 200:  # "100 Continue" before the answer
        status_line = reader.readline(65537)
        if not status_line:
            return None
        status = int(status_line.split()[1])
        headers = {}
        while (line := reader.readline(65537)) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b"" if head else reader.read(int(headers.get("content-length", "0")))
    return RawResponse(status, headers, body)


def http_request(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """A request's bytes (HTTP/1.1, Host and Content-Length filled in unless given)."""
    fields = {"Host": "127.0.0.1", **({"Content-Length": str(len(body))} if body else {})}
    fields.update(headers or {})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode("latin-1") + b"\r\n" + body
