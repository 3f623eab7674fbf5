"""A gateway whose descriptor limit is below ``--max-connections`` admits only what fits, so a
flood of sockets is refused by the admission bound instead of failing every accept (asyncio logs
each failed accept at error level), and the pod keeps serving."""

from __future__ import annotations

import contextlib
import resource
import socket
import subprocess
import sys
import time
import urllib.request

from gateway.__main__ import DESCRIPTOR_RESERVE, fitted_connections
from gateway.server import ACCEPT_SLACK
from tests.support.redis_server import free_port


def test_fitted_connections() -> None:
    assert fitted_connections(20_000, 64, 1_048_576) == 20_000
    assert fitted_connections(20_000, 64, 20_000) == 20_000 - 64 - DESCRIPTOR_RESERVE
    assert fitted_connections(20_000, 64, 100) == 1


def _low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (600, 600))


def test_a_socket_flood_past_the_descriptor_limit_is_refused_quietly(redis_url, tmp_path) -> None:
    port = free_port()
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--no-auth", "--port", str(port), "--redis-url",
             redis_url, "--log-format", "json", "--auth-timeout", "30"],
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=_low_limit,
        )  # fmt: skip
    sockets: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, log.read_text()
                time.sleep(0.05)
        effective = 600 - ACCEPT_SLACK - DESCRIPTOR_RESERVE
        assert f'"effective": {effective}' in log.read_text()
        for _ in range(700):  # more than the process has descriptors
            with contextlib.suppress(OSError):
                sockets.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        time.sleep(1.5)  # let the accept loop meet the flood (nothing to await: it is silent)
        for s in sockets:
            s.close()
        sockets.clear()
        deadline = time.monotonic() + 20
        while True:  # the pod serves again as soon as the flood is gone
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.1)
        text = log.read_text()
        assert text.count("out of system resource") <= 5, text[-2000:]
    finally:
        for s in sockets:
            s.close()
        process.terminate()
        process.wait(30)
