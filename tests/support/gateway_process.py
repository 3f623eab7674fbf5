"""Gateway processes for end-to-end tests: ``python -m gateway`` as a subprocess on a free port.

    with GatewayProcess(redis_url) as gateway:      # started and ready (GET /readyz == 200)
        client = ResumingClient([gateway.ws_url], ...)
        gateway.terminate()                         # SIGTERM: drain, exit 0
        gateway.start()                             # same port again

Output goes to a log file whose tail is attached to every failure, so a test that fails because
a gateway crashed says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.redis_server import free_port

__all__ = ["GatewayProcess", "parse_metrics"]

ROOT = Path(__file__).resolve().parents[2]


def _die_with_parent() -> None:
    # A gateway must not outlive a test run that was killed (PR_SET_PDEATHSIG = 1).
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _start_with_closed(closed: tuple[int, ...], descriptor_limit: int | None = None):
    """The child set-up for a process started without some of descriptors 0-2, and with a
    descriptor limit (soft and hard) when one is given (run after the standard streams are set
    up, before the exec)."""

    def setup() -> None:
        _die_with_parent()
        for fd in closed:
            os.close(fd)
        if descriptor_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (descriptor_limit, descriptor_limit))

    return setup


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> ``{name: value}`` (label-less series only)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values


class GatewayProcess:
    """One ``python -m gateway`` process.

    Args:
        redis_url: ``redis://`` or ``redis+cluster://`` URL.
        auth_secret: JWT secret; ``None`` runs the development mode (``--no-auth``).
        args: more command-line flags, e.g. ``["--drain-timeout", "5"]``.
        closed_stdio: descriptors among 0, 1, 2 the process starts without.
        descriptor_limit: the process' RLIMIT_NOFILE, soft and hard (it cannot raise it).
    """

    def __init__(
        self,
        redis_url: str,
        *,
        port: int | None = None,
        auth_secret: str | None = None,
        args: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        closed_stdio: tuple[int, ...] = (),
        descriptor_limit: int | None = None,
    ) -> None:
        self.redis_url = redis_url
        #: Standard descriptors (0, 1, 2) the process is started without, as a daemonizing
        #: parent may leave them; its output is lost with 1 and 2 closed.
        self.closed_stdio = closed_stdio
        self.descriptor_limit = descriptor_limit
        self.port = port or free_port()
        self.auth_secret = auth_secret
        self.args = list(args)
        self.env = env or {}
        self.dir = Path(tempfile.mkdtemp(prefix=f"eventbus-gateway-{self.port}-"))
        self.log_path = self.dir / "gateway.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def __repr__(self) -> str:
        return f"<GatewayProcess :{self.port} pid={self.pid}>"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, *, wait: bool = True, timeout: float = 20.0) -> GatewayProcess:
        auth = ["--auth-secret", self.auth_secret] if self.auth_secret else ["--no-auth"]
        command = [
            sys.executable, "-m", "gateway", *auth,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--redis-url", self.redis_url,
            "--log-format", "json",
            *self.args,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        log = self.log_path.open("ab")
        log.write(f"--- start {self.starts + 1}: {' '.join(command)}\n".encode())
        log.flush()
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_start_with_closed(self.closed_stdio, self.descriptor_limit),
        )
        log.close()
        self.starts += 1
        if wait:
            self.wait_ready(timeout)
        return self

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (drain) and wait for the exit status."""
        return self._end(signal.SIGTERM, timeout)

    def end_with(self, sig: signal.Signals, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit status."""
        return self._end(sig, timeout)

    def kill(self) -> int:
        """SIGKILL: the process vanishes, its clients see their TCP connections reset."""
        return self._end(signal.SIGKILL, 10)

    def _end(self, sig: signal.Signals, timeout: float) -> int:
        process = self.process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(sig)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            raise AssertionError(f"{self} did not exit within {timeout}s of {sig.name}") from None
        self.process = None
        return code

    def close(self) -> None:
        """Kill the process and remove its log (kept with ``EVENTBUS_KEEP_LOGS=1``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None
        if not os.environ.get("EVENTBUS_KEEP_LOGS"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- HTTP --------------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def readyz(self) -> tuple[int, dict]:
        status, body = self.get("/readyz")
        return status, json.loads(body)

    def metrics(self) -> dict[str, float]:
        status, body = self.get("/metrics")
        assert status == 200, status
        return parse_metrics(body.decode())

    def wait_ready(self, timeout: float = 20.0, *, status: int = 200) -> None:
        """Wait until ``GET /readyz`` answers ``status`` (fails at once if the process died)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            if self.process is None or self.process.poll() is not None:
                raise AssertionError(f"{self} exited; log: {self.tail()}")
            try:
                code, body = self.readyz()
                if code == status:
                    return
                last = body
            except (OSError, ValueError) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self}: /readyz not {status} after {timeout}s (last: {last}); "
                    f"log: {self.tail()}"
                )
            time.sleep(0.05)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_lines(self, contains: str = "") -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if contains in line]

    # --- /proc (soak) ------------------------------------------------------------------------

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


class GatewayGroup:
    """Several gateway processes on one Redis, started in parallel, all killed on exit."""

    def __init__(self) -> None:
        self.gateways: list[GatewayProcess] = []

    def start(self, redis_url: str, count: int, **kwargs) -> list[GatewayProcess]:
        started = [GatewayProcess(redis_url, **kwargs) for _ in range(count)]
        self.gateways += started
        for gateway in started:
            gateway.start(wait=False)
        for gateway in started:
            gateway.wait_ready()
        return started

    def close(self) -> None:
        for gateway in self.gateways:
            gateway.close()

    def __enter__(self) -> GatewayGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
