"""``python -m examples.dashboard.run`` (``make run``): the whole demo in one command.

Starts, in order: a private ``redis-server`` on a free port (unless ``EVENTBUS_REDIS_URL`` or
``--redis-url`` names one), the gateway (``python -m gateway``), the demo backend with its
simulated agents and expiry sweeper; prints the URL to open. Ctrl-C (SIGINT) or SIGTERM stops
everything it started, in reverse order. The gateway is restarted if it dies, so killing it by
hand shows the dashboard reconnecting and catching up.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import structlog

from examples.dashboard.redis_server import PrivateRedis, free_port
from examples.dashboard.server import Config, DemoApp, add_arguments, config_from_args

log = logging.getLogger("examples.dashboard.run")

#: Blockers expire after this many seconds in the demo (24 h in the backend's default), so that
#: expiry can be watched; override with --blocker-ttl or EVENTBUS_DASHBOARD_BLOCKER_TTL.
DEMO_BLOCKER_TTL = 180.0
#: Written next to the database while the demo runs (removed on exit): the environment to use
#: against it. ``make shell`` sources it.
ENV_FILE = "demo.env"


def demo_environment(redis_url: str) -> dict[str, str]:
    """What a shell needs to publish into the running demo (the README's snippet, the CLI)."""
    return {"EVENTBUS_REDIS_URL": redis_url}


def shell_environment(redis_url: str, gateway_url: str, secret: str | None) -> dict[str, str]:
    """What ``make shell`` gets (the file, not the banner): to publish, and to follow a project
    with ``eventbus-publish tail``, which mints its tokens with the demo's secret (random per
    run, never printed) and finds the demo's gateway."""
    env = {**demo_environment(redis_url), "EVENTBUS_GATEWAY_URL": gateway_url}
    if secret is not None:
        env["EVENTBUS_AUTH_SECRET"] = secret
    return env


def banner(
    app_url: str,
    host: str,
    gateway_port: int,
    redis_url: str,
    private_redis: bool,
    config,
    env_file: Path,
) -> str:
    """The text printed once everything runs: where to look, and how to publish into it."""
    exports = "".join(f"      export {k}={v}\n" for k, v in demo_environment(redis_url).items())
    sandbox = config.sandbox_project_id
    lines = [
        "",
        f"  Dashboard   {app_url}   <- open this",
        f"  Gateway     ws://{host}:{gateway_port}/  (http://{host}:{gateway_port}/metrics)",
        f"  Redis       {redis_url}{'  (private, stopped on exit)' if private_redis else ''}",
        f"  Database    {config.db}",
        f"  Agents      {'simulated' if config.agents else 'off'}; blockers expire after "
        f"{config.blocker_ttl:g} s"
        + (
            f"; a simulated reviewer answers ASYNC ones after {config.reviewer_delay:g} s"
            if config.agents and config.reviewer_delay
            else ""
        ),
        "",
    ]
    if sandbox:
        lines += [
            f"  Try publishing: project {sandbox} is the dashboard's Sandbox panel (project "
            f"{config.project_id}",
            "  is the demo backend's own: change it through its API). In another shell:",
            "",
            exports.rstrip("\n"),
            f'      .venv/bin/eventbus-publish publish \'{{"type":"blocker_resolved",'
            f'"project_id":{sandbox},"blocker_id":123,"answer":"Use JWT",'
            f'"resolved_at":"2025-11-08T12:45:30Z"}}\'',
            "",
            (
                f"  or `make shell`: this environment (saved in {env_file}), .venv/bin on PATH."
                if env_file == Path(Config.db).parent / ENV_FILE
                else f"  or `make shell DEMO_ENV={env_file}`: this environment, .venv/bin on PATH."
            ),
            f"  There, `eventbus-publish tail {sandbox}` prints the Sandbox's events as they come.",
            "",
        ]
    lines += ["  Press Ctrl-C to stop.", ""]
    return "\n".join(lines)


def _connect_host(host: str) -> str:
    """Where a process on this machine reaches a server listening on ``host``."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _pick_port(host: str, wanted: int, what: str) -> int:
    if wanted and _port_free(host, wanted):
        return wanted
    port = free_port(host)
    if wanted:
        print(f"port {wanted} is busy; the {what} uses {port} instead", flush=True)
    return port


def _die_with_parent() -> None:
    # Linux: children get SIGTERM if this process dies without cleaning up (e.g. SIGKILL), so a
    # crashed demo never leaves a gateway or redis-server behind.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child_kwargs() -> dict:
    # A session of their own: Ctrl-C in the terminal reaches only us, and we stop the children
    # in order (backend before gateway before Redis) instead of all at once.
    kwargs: dict = {"start_new_session": True}
    if sys.platform.startswith("linux"):
        kwargs["preexec_fn"] = _die_with_parent
    return kwargs


class Gateway:
    """The gateway as a child process, restarted if it dies."""

    def __init__(self, args: list[str], url: str, secret: str | None = None) -> None:
        self.args = args
        self.url = url
        # The secret travels in the environment: not visible in `ps`, and a value starting with
        # "-" cannot be mistaken for an option.
        self.env = {**os.environ}
        self.env.pop("EVENTBUS_AUTH_SECRET", None)
        if secret is not None:
            self.env["EVENTBUS_AUTH_SECRET"] = secret
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", *self.args], env=self.env, **_child_kwargs()
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway did not become healthy")
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)  # drains: clients get 1012
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class EnvFile:
    """``export NAME=value`` lines in a file that exists while the demo runs (readable by its
    owner only: it holds the demo's token secret)."""

    def __init__(self, path: Path, values: dict[str, str]) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # (a file left by an older demo kept its mode)
        with os.fdopen(fd, "w") as file:
            file.write(text)

    def stop(self) -> None:
        self.path.unlink(missing_ok=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """The runner's flags: the backend's (examples.dashboard.server) and its own."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.dashboard.run",
        description="Run the demo: private Redis, gateway, demo backend and simulated agents.",
    )
    add_arguments(parser)
    parser.set_defaults(
        blocker_ttl=float(os.environ.get("EVENTBUS_DASHBOARD_BLOCKER_TTL", DEMO_BLOCKER_TTL))
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("EVENTBUS_REDIS_URL"),
        help="use this Redis instead of starting a private one [env EVENTBUS_REDIS_URL]",
    )
    parser.add_argument(
        "--gateway-port",
        type=int,
        default=int(os.environ.get("EVENTBUS_PORT", 8765)),
        help="port of the gateway (0 = any free port) [env EVENTBUS_PORT]",
    )
    parser.add_argument(
        "--auth-secret",
        default=os.environ.get("EVENTBUS_AUTH_SECRET"),
        help="token secret shared by backend and gateway (default: random per run) "
        "[env EVENTBUS_AUTH_SECRET]",
    )
    parser.add_argument(
        "--no-auth", action="store_true", help="run the gateway without auth (development mode)"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="info logs from the gateway, the outbox relay and the agents' consumer",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # The libraries in this process (the outbox relay, the agents' consumer) log with structlog:
    # warnings and errors only, like the gateway, unless --verbose.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.INFO if args.verbose else logging.WARNING
        )
    )
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    started: list = []  # what to stop, in reverse order
    try:
        redis_url = args.redis_url
        if not redis_url:
            private = PrivateRedis().start(**_child_kwargs())
            started.append(private)
            redis_url = private.url
        host = args.host
        gateway_port = _pick_port(host, args.gateway_port, "gateway")
        backend_port = _pick_port(host, args.port, "dashboard")
        secret = None if args.no_auth else (args.auth_secret or secrets.token_urlsafe(32))
        origins = [f"http://{name}:{backend_port}" for name in ("127.0.0.1", "localhost", host)]
        gateway_args = [
            "--redis-url", redis_url,
            "--host", host,
            "--port", str(gateway_port),
            "--allowed-origins", ",".join(dict.fromkeys(origins)),
            "--log-level", "info" if args.verbose else "warning",
        ]  # fmt: skip
        if secret is None:
            gateway_args.append("--no-auth")
        gateway = Gateway(gateway_args, f"http://{host}:{gateway_port}", secret)
        gateway.start()
        started.append(gateway)

        # Where processes of this machine reach it (the backend's consumer, `make shell`'s tail).
        gateway_url = f"ws://{_connect_host(host)}:{gateway_port}/"
        config = config_from_args(
            args,
            port=backend_port,
            redis_url=redis_url,
            auth_secret=secret,
            gateway_port=gateway_port,
            # The backend's own consumer (the agents wait for answers through it).
            consumer_url=gateway_url,
        )
        app = DemoApp(config).start()
        started.append(app)
        env_file = EnvFile(
            Path(config.db).parent / ENV_FILE, shell_environment(redis_url, gateway_url, secret)
        )
        started.append(env_file)

        print(
            banner(
                app.url, host, gateway_port, redis_url, not args.redis_url, config, env_file.path
            ),
            flush=True,
        )

        while not stop.wait(0.5):
            if not gateway.alive():
                code = gateway.process.returncode if gateway.process else None
                log.warning("the gateway exited (%s); restarting it", code)
                try:
                    gateway.start()
                except (RuntimeError, TimeoutError) as exc:
                    log.error("restarting the gateway failed: %s", exc)
                    stop.wait(2)
    except KeyboardInterrupt:
        pass
    finally:
        print("\nstopping…", flush=True)
        for thing in reversed(started):
            try:
                thing.stop()
            except Exception as exc:  # keep stopping the rest
                log.warning("stopping %s failed: %s", type(thing).__name__, exc)
        print("stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
