"""The demo application backend: owns the blockers, serves the dashboard page, mints gateway
tokens, and publishes every change through the publisher package.

Standard library only (``http.server`` with a thread per request) plus this project's packages.

API (JSON)::

    GET  /api/config                              what the page needs to connect
    POST /api/gateway-token                       {"token", "expires_in"} for the page's project
    GET  /api/projects/{id}/state                 agents, tasks, pending blockers, activity,
                                                  and the "cursor" they include (or null)
    GET  /api/projects/{id}/blockers[?status=]    {"blockers", "cursor"}: PENDING by default;
                                                  RESOLVED, EXPIRED or ALL
    POST /api/projects/{id}/blockers              raise a blocker as an agent would (demo, tests)
    GET  /api/projects/{id}/agents | /tasks | /activity
    GET  /api/blockers/{id}
    POST /api/blockers/{id}/resolve               {"answer": "..."}: 200, 404, 409, 422
    POST /api/blockers/{id}/seen                  the page first showed it to a person
    GET  /healthz                                 200 while the backend runs

Run alone with ``python -m examples.dashboard.server --help``; ``python -m examples.dashboard.run``
starts it together with Redis and the gateway.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import mimetypes
import os
import re
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from examples.dashboard.answers import AnswerListener
from examples.dashboard.http_input import (
    BODY_READ_TIMEOUT,
    MAX_BODY,
    BadRequest,
    answer_request,
    blocker_request,
    body_length,
    check_content_type,
    decode_object,
    identity_request,
    seen_request,
)
from examples.dashboard.store import (
    MAX_ANSWER_LENGTH,
    Conflict,
    NotFound,
    Store,
    ValidationFailed,
)
from examples.dashboard.workers import AgentSimulation, ExpirySweeper
from publisher import Publisher, issue_token
from publisher.outbox import OutboxRelay

__all__ = ["Config", "DemoApp", "main"]

log = logging.getLogger("examples.dashboard")

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Seconds a connection may stay silent (between requests, or within one) before it is closed.
IDLE_TIMEOUT = 30.0


def _client_dir() -> Path:
    """gateway/static, where eventbus.js lives (found without importing the gateway)."""
    spec = importlib.util.find_spec("gateway")
    if spec and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))) / "static"
    return Path(__file__).resolve().parents[2] / "gateway" / "static"


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 8000
    project_id: int = 1
    #: A second project the page shows purely from its events (the "Sandbox" panel): where a
    #: newcomer's own publishing goes, since this backend owns project_id's state. None: no panel.
    sandbox_project_id: int | None = 2
    db: str = "examples/dashboard/data/dashboard.sqlite3"
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Shared with the gateway (``--auth-secret``); None when the gateway runs with ``--no-auth``.
    auth_secret: str | None = None
    token_ttl: float = 900.0
    #: WebSocket URL the page connects to; by default the page's own host name on gateway_port,
    #: so that opening the page as localhost or 127.0.0.1 both work.
    gateway_url: str | None = None
    #: The gateway's own default port (gateway.config), where `make gateway` listens.
    gateway_port: int = 8765
    #: HTTP base URL of the gateway for the polling fallback; by default derived like gateway_url.
    gateway_http_url: str | None = None
    #: WebSocket URL of the gateway for the backend's own consumer (the simulated agents wait for
    #: their answers through it); by default ws://127.0.0.1:<gateway_port>/.
    consumer_url: str | None = None
    blocker_ttl: float = 24 * 3600.0
    sweep_interval: float | None = None
    agents: bool = True
    resume_delay: float = 2.0
    #: Seconds after which the simulated reviewer answers an ASYNC blocker (with ``agents`` on).
    reviewer_delay: float | None = 45.0
    work_time: tuple[float, float] = (8.0, 25.0)


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": code, "message": message, **extra}


def _route(pattern: str) -> re.Pattern[str]:
    # ASCII: "\d" alone would also match other scripts' digits, which int() accepts.
    return re.compile(pattern.replace("ID", "([0-9]{1,15})"), re.ASCII)


_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", _route(r"^/api/config$"), "config"),
    ("POST", _route(r"^/api/gateway-token$"), "token"),
    ("GET", _route(r"^/api/projects/ID/state$"), "state"),
    ("GET", _route(r"^/api/projects/ID/blockers$"), "list_blockers"),
    ("POST", _route(r"^/api/projects/ID/blockers$"), "create_blocker"),
    ("GET", _route(r"^/api/projects/ID/agents$"), "agents"),
    ("GET", _route(r"^/api/projects/ID/tasks$"), "tasks"),
    ("GET", _route(r"^/api/projects/ID/activity$"), "activity"),
    ("GET", _route(r"^/api/blockers/ID$"), "get_blocker"),
    ("POST", _route(r"^/api/blockers/ID/resolve$"), "resolve"),
    ("POST", _route(r"^/api/blockers/ID/seen$"), "seen"),
    ("GET", _route(r"^/healthz$"), "healthz"),
]


class Handler(BaseHTTPRequestHandler):
    server_version = "eventbus-dashboard/1.0"
    protocol_version = "HTTP/1.1"
    # socketserver applies it to the connection: a client that sends nothing for this long (in
    # the request line, the headers, a body, or between keep-alive requests) is disconnected.
    timeout = IDLE_TIMEOUT
    app: DemoApp  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:
        # Per request and per client mistake: debug only (a client cannot flood the log).
        log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, header too long, unknown method...) as
        JSON like every other answer, and always closing the connection."""
        if code == HTTPStatus.NOT_IMPLEMENTED:  # a method without a do_ handler
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} not allowed"
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self.log_error("code %d, message %s", code, message)
        # http.server takes a one-word request line for HTTP/0.9 and would answer without a
        # status line or headers; nobody speaks 0.9 any more.
        self.request_version = "HTTP/1.1"
        body = json.dumps(
            {"error": phrase.lower().replace(" ", "_"), "message": message or phrase}
        ).encode()
        self.close_connection = True
        self.send_response(code, message)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)

    # --- plumbing ------------------------------------------------------------------------------

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if getattr(self, "_body_pending", False):
            self.close_connection = True  # its unread body would be taken for the next request
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        body = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        self._send(status, body, "application/json; charset=utf-8")

    def _body(self) -> dict[str, Any]:
        """The request's JSON object body: at most MAX_BODY bytes, read within
        BODY_READ_TIMEOUT seconds in all, else a 4xx (see examples.dashboard.http_input)."""
        length = body_length(
            self.headers.get_all("Content-Length") or [],
            self.headers.get_all("Transfer-Encoding") or [],
        )
        if length:
            # Refused before it is read (415): the body stays pending, so the answer closes.
            check_content_type(self.headers.get("Content-Type"))
        self._body_pending = False  # from here on, _read_body consumes it or we close
        return decode_object(self._read_body(length))

    def _read_body(self, length: int) -> bytes:
        deadline = time.monotonic() + BODY_READ_TIMEOUT
        chunks: list[bytes] = []
        left = length
        try:
            while left:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self.connection.settimeout(remaining)
                chunk = self.rfile.read1(min(left, MAX_BODY))
                if not chunk:
                    raise BadRequest(400, "incomplete_body", "the body ended early", close=True)
                chunks.append(chunk)
                left -= len(chunk)
        except TimeoutError:
            raise BadRequest(
                408, "timeout", f"the body did not arrive within {BODY_READ_TIMEOUT:g} s",
                close=True,
            ) from None  # fmt: skip
        finally:
            self.connection.settimeout(self.timeout)
        return b"".join(chunks)

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        self.query = urllib.parse.parse_qs(url.query)
        # A body nobody reads would be parsed as the next request: such connections are closed.
        self._body_pending = bool(
            self.headers.get("Content-Length", "0").strip() not in ("", "0")
            or self.headers.get("Transfer-Encoding")
        )
        try:
            if method in ("GET", "HEAD") and not url.path.startswith(("/api/", "/healthz")):
                return self._static(url.path)
            allowed = False
            for route_method, pattern, name in _ROUTES:
                match = pattern.match(url.path)
                if not match:
                    continue
                allowed = True
                if route_method == method or (route_method == "GET" and method == "HEAD"):
                    return getattr(self, f"do_{name}")(*match.groups())
            if allowed:
                raise HttpError(405, "method_not_allowed", f"{method} not allowed here")
            raise HttpError(404, "not_found", f"no such endpoint: {url.path}")
        except HttpError as exc:
            self._json(exc.status, exc.body)
        except BadRequest as exc:
            self.close_connection = self.close_connection or exc.close
            self._json(exc.status, {"error": exc.code, "message": str(exc)})
        except NotFound as exc:
            self._json(404, {"error": "not_found", "message": str(exc)})
        except Conflict as exc:
            self._json(409, {"error": "conflict", "message": str(exc), "status": exc.status})
        except ValidationFailed as exc:
            self._json(422, {"error": "invalid", "message": str(exc)})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:
            log.exception("request failed: %s %s", method, self.path)
            self._json(500, {"error": "internal", "message": "internal error"})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # Other methods get a JSON 405/404 rather than http.server's HTML 501.
    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _project(self, project_id: str) -> int:
        value = int(project_id)
        if value != self.app.config.project_id:
            raise HttpError(404, "not_found", f"project {value} not found")
        return value

    # --- static files --------------------------------------------------------------------------

    def _static(self, path: str) -> None:
        if path in ("/", "/index.html"):
            file = STATIC_DIR / "index.html"
        elif path in ("/eventbus.js", "/eventbus.d.ts"):
            # The very file the gateway serves; served here too so the page loads it from its
            # own origin (a cross-origin module script would need CORS headers on the gateway).
            file = _client_dir() / path.lstrip("/")
        elif path.startswith("/static/"):
            file = (STATIC_DIR / path.removeprefix("/static/")).resolve()
            if STATIC_DIR not in file.parents:
                raise HttpError(404, "not_found", "not found")
        else:
            raise HttpError(404, "not_found", f"no such page: {path}")
        if not file.is_file():
            raise HttpError(404, "not_found", f"no such file: {path}")
        kind = (
            {
                ".js": "text/javascript; charset=utf-8",
                ".ts": "text/plain; charset=utf-8",
                ".css": "text/css; charset=utf-8",
                ".html": "text/html; charset=utf-8",
                ".svg": "image/svg+xml",
            }.get(file.suffix)
            or mimetypes.guess_type(file.name)[0]
            or "application/octet-stream"
        )
        self._send(200, file.read_bytes(), kind)

    # --- API -----------------------------------------------------------------------------------

    def do_healthz(self) -> None:
        self._json(200, {"ok": True})

    def do_config(self) -> None:
        config = self.app.config
        # The page's own host name: opening it as localhost or as 127.0.0.1 both work.
        host = (self.headers.get("Host") or config.host).rsplit(":", 1)[0] or "127.0.0.1"
        self._json(
            200,
            {
                "project_id": config.project_id,
                "sandbox_project_id": self.app.sandbox_project_id,
                "gateway_url": config.gateway_url or f"ws://{host}:{config.gateway_port}/",
                "poll_url": config.gateway_http_url or f"http://{host}:{config.gateway_port}",
                "auth": config.auth_secret is not None,
                "blocker_ttl_seconds": config.blocker_ttl,
                "max_answer_length": MAX_ANSWER_LENGTH,
            },
        )

    def do_token(self) -> None:
        # A real application checks the user's session here and names only the projects that
        # user may read, with the user's id and name for presence. The demo has no login: the
        # page says who it is ({"user": "<id>", "name": "Alice"}, kept in its localStorage).
        identity = identity_request(self._body())
        config = self.app.config
        if config.auth_secret is None:
            return self._json(200, {"token": None, "expires_in": None})
        token = issue_token(
            config.auth_secret,
            projects=self.app.projects,
            ttl=config.token_ttl,
            subject=identity.user or "demo-user",
            name=identity.name,
        )
        self._json(200, {"token": token, "expires_in": config.token_ttl})

    def do_state(self, project_id: str) -> None:
        pid = self._project(project_id)
        # One snapshot, with the cursor of exactly the events it includes: the page's bus
        # continues from there (docs/browser.md, "Snapshot cursors").
        state, cursor = self.app.store.state(pid)
        self._json(200, {"project_id": pid, **state, "cursor": cursor})

    def do_list_blockers(self, project_id: str) -> None:
        pid = self._project(project_id)
        status = (self.query.get("status") or ["PENDING"])[0].upper()
        if status not in ("PENDING", "RESOLVED", "EXPIRED", "ALL"):
            raise HttpError(
                400, "invalid_status", "status must be PENDING, RESOLVED, EXPIRED or ALL"
            )
        blockers, cursor = self.app.store.blocker_list(pid, None if status == "ALL" else status)
        self._json(
            200, {"project_id": pid, "status": status, "blockers": blockers, "cursor": cursor}
        )

    def do_create_blocker(self, project_id: str) -> None:
        pid = self._project(project_id)
        request = blocker_request(self._body())
        blocker = self.app.store.create_blocker(
            pid,
            request.agent_id,
            request.blocker_type,
            request.question,
            task_title=request.task_title,
        )
        self._json(201, blocker)

    def do_agents(self, project_id: str) -> None:
        self._json(200, self.app.store.agents(self._project(project_id)))

    def do_tasks(self, project_id: str) -> None:
        self._json(200, self.app.store.tasks(self._project(project_id)))

    def do_activity(self, project_id: str) -> None:
        self._json(200, self.app.store.activity(self._project(project_id)))

    def do_get_blocker(self, blocker_id: str) -> None:
        self._json(200, self.app.store.blocker(int(blocker_id)))

    def do_seen(self, blocker_id: str) -> None:
        by = seen_request(self._body())
        self._json(200, self.app.store.mark_seen(int(blocker_id), by))

    def do_resolve(self, blocker_id: str) -> None:
        answer = answer_request(self._body())
        self._json(200, self.app.store.resolve_blocker(int(blocker_id), answer))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class DemoApp:
    """The backend with its threads; ``start()`` / ``stop()``, usable in-process by tests."""

    def __init__(self, config: Config, publisher: Publisher | None = None) -> None:
        self.config = config
        self.store = Store(config.db)
        self.store.seed(config.project_id)
        # A 2 s bound per publish (not the library's 10 s): the relay retries anyway, and a
        # hung Redis must not hold up stop() (Ctrl-C) for longer than that.
        self.publisher = publisher or Publisher.from_url(config.redis_url, timeout=2.0)
        # The library's relay, in-process; woken by every commit that wrote events, so the
        # demo's events go out at once (it polls every second besides).
        self.relay = OutboxRelay.sqlite(
            self.store.path, self.publisher, table=self.store.outbox.table
        )
        self.store.on_outbox.append(self.relay.wake)
        self.agents = AgentSimulation(
            self.store,
            config.project_id,
            active=config.agents,
            resume_delay=config.resume_delay,
            work_time=config.work_time,
            reviewer_delay=config.reviewer_delay,
        )
        self.answers = AnswerListener(
            config.consumer_url or f"ws://127.0.0.1:{config.gateway_port}/",
            config.project_id,
            token=self._consumer_token if config.auth_secret is not None else None,
            on_answered=self.agents.answered,
            on_reload=self.agents.reload,
        )
        self.sweeper = ExpirySweeper(self.store, config.blocker_ttl, config.sweep_interval)
        handler = type("BoundHandler", (Handler,), {"app": self})
        self.httpd = _Server((config.host, config.port), handler)
        self._thread: threading.Thread | None = None

    def _consumer_token(self) -> str:
        # No subject: the backend's consumer is not a person, so it is not in presence.
        assert self.config.auth_secret is not None
        return issue_token(
            self.config.auth_secret, projects=[self.config.project_id], ttl=self.config.token_ttl
        )

    @property
    def sandbox_project_id(self) -> int | None:
        sandbox = self.config.sandbox_project_id
        return sandbox if sandbox and sandbox != self.config.project_id else None

    @property
    def projects(self) -> list[int]:
        """The projects the page may read (its gateway token names them)."""
        return [self.config.project_id, *filter(None, [self.sandbox_project_id])]

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}/"

    def start(self) -> DemoApp:
        self.relay.start()
        self.agents.start()
        self.answers.start()
        self.sweeper.start()
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for worker in (self.answers, self.agents, self.sweeper, self.relay):
            worker.stop()
        self.publisher.close()
        self.store.close()

    def wait_published(self, timeout: float = 10.0) -> None:
        """Block until the outbox is empty (tests)."""
        deadline = time.monotonic() + timeout
        while self.store.unpublished_count():
            if time.monotonic() > deadline:
                raise TimeoutError("outbox not drained")
            self.relay.wake()
            time.sleep(0.02)

    def __enter__(self) -> DemoApp:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(f"EVENTBUS_{name}", default)


def _flag(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str,
    help: str,
    *,
    show_default: bool = True,
    **kwargs: Any,
) -> None:
    """A flag whose default comes from ``EVENTBUS_<env>``; ``--help`` names the variable and
    shows the default in effect (unless ``show_default`` is false: secrets)."""
    kind = kwargs.get("type", str)
    raw = os.environ.get(f"EVENTBUS_{env}")
    if raw is not None and kwargs.get("action") != "store_true":
        kwargs["default"] = kind(raw)
    elif raw is not None:
        kwargs["default"] = raw not in ("", "0")
    shown = (
        " (default %(default)s)" if show_default and kwargs.get("action") != "store_true" else ""
    )
    parser.add_argument(flag, help=f"{help}{shown} [env EVENTBUS_{env}]", **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The backend's flags (shared with ``examples.dashboard.run``); each has an environment
    variable, named in ``--help``."""
    _flag(parser, "--host", "DASHBOARD_HOST", "address to listen on", default="127.0.0.1")
    _flag(
        parser, "--port", "DASHBOARD_PORT", "HTTP port of the dashboard (0 = any free port)",
        type=int, default=8000,
    )  # fmt: skip
    _flag(parser, "--project-id", "DASHBOARD_PROJECT", "the demo's project", type=int, default=1)
    _flag(
        parser, "--sandbox-project", "DASHBOARD_SANDBOX_PROJECT",
        "a second project the page shows as it arrives, for your own publishing (0 = none)",
        type=int, default=2,
    )  # fmt: skip
    _flag(parser, "--db", "DASHBOARD_DB", "SQLite file (created if missing)", default=Config.db)
    _flag(
        parser, "--token-ttl", "DASHBOARD_TOKEN_TTL",
        "lifetime of the gateway tokens minted for the page, seconds", type=float, default=900.0,
    )  # fmt: skip
    _flag(
        parser, "--blocker-ttl", "DASHBOARD_BLOCKER_TTL",
        "seconds a blocker may stay pending before it expires", type=float, default=24 * 3600.0,
    )  # fmt: skip
    _flag(
        parser, "--sweep-interval", "DASHBOARD_SWEEP_INTERVAL",
        "seconds between expiry sweeps (None: blocker TTL / 10, at most 60)", type=float,
        default=None,
    )  # fmt: skip
    _flag(
        parser, "--no-agents", "DASHBOARD_NO_AGENTS",
        "no simulated activity and no simulated reviewer (agents still resume after a "
        "resolution)", action="store_true",
    )  # fmt: skip
    _flag(
        parser, "--resume-delay", "DASHBOARD_RESUME_DELAY",
        "seconds between a resolution and the agent's agent_resumed", type=float, default=2.0,
    )  # fmt: skip
    _flag(
        parser, "--reviewer-delay", "DASHBOARD_REVIEWER_DELAY",
        "seconds after which the simulated reviewer answers an ASYNC blocker (0 = never)",
        type=float, default=45.0,
    )  # fmt: skip
    parser.add_argument(
        "--work-time",
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=(8.0, 25.0),
        help="seconds an agent works between actions (default 8 25)",
    )


def config_from_args(args: argparse.Namespace, **overrides: Any) -> Config:
    values = dict(
        host=args.host,
        port=args.port,
        project_id=args.project_id,
        sandbox_project_id=args.sandbox_project or None,
        db=args.db,
        token_ttl=args.token_ttl,
        blocker_ttl=args.blocker_ttl,
        sweep_interval=args.sweep_interval or None,
        agents=not args.no_agents,
        resume_delay=args.resume_delay,
        reviewer_delay=args.reviewer_delay or None,
        work_time=tuple(args.work_time),
    )
    values.update(overrides)
    return Config(**values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.dashboard.server",
        description="The demo backend alone (Redis and the gateway must already run).",
    )
    add_arguments(parser)
    _flag(parser, "--redis-url", "REDIS_URL", "Redis to publish to", default=Config.redis_url)
    _flag(
        parser, "--auth-secret", "AUTH_SECRET",
        "the gateway's --auth-secret (omit for a --no-auth gateway)", show_default=False,
    )  # fmt: skip
    _flag(
        parser, "--gateway-url", "DASHBOARD_GATEWAY_URL",
        "WebSocket URL of the gateway for the page (None: ws://<page's host>:<gateway port>/)",
    )  # fmt: skip
    _flag(
        parser,
        "--gateway-port",
        "PORT",
        "port of the gateway",
        type=int,
        default=Config.gateway_port,
    )
    _flag(
        parser, "--gateway-http-url", "DASHBOARD_GATEWAY_HTTP_URL",
        "HTTP base URL of the gateway for polling (None: derived like --gateway-url)",
    )  # fmt: skip
    _flag(
        parser, "--consumer-url", "DASHBOARD_CONSUMER_URL",
        "WebSocket URL of the gateway for the backend's own consumer, through which the simulated "
        "agents wait for answers (None: ws://127.0.0.1:<gateway port>/)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = config_from_args(
        args,
        redis_url=args.redis_url,
        auth_secret=args.auth_secret,
        gateway_url=args.gateway_url,
        gateway_port=args.gateway_port,
        gateway_http_url=args.gateway_http_url,
        consumer_url=args.consumer_url,
    )
    app = DemoApp(config).start()
    print(f"dashboard backend on {app.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        app.stop()


if __name__ == "__main__":
    sys.exit(main())
