"""A private ``redis-server`` on 127.0.0.1 and a free port, with no persistence.

The demo starts one when no Redis is configured; the tests (``tests/support/redis_server.py``)
and the benchmarks (``bench/common.py``) use this same class for every Redis they kill, restart,
flush or pin, so that none of them ever touches the machine's shared Redis.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

__all__ = ["PrivateRedis", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """One ``redis-server``: ``start()`` (or ``with``); ``kill()`` and ``start()`` again on the
    same port (empty: nothing is persisted); ``stop()`` (SIGTERM) or ``close()`` (SIGKILL) to
    remove it for good."""

    def __init__(self, port: int | None = None, *extra_args: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server not found: install it (make install does) or set EVENTBUS_REDIS_URL"
            )
        self.binary = binary
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix=f"eventbus-redis-{self.port}-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self, timeout: float = 10.0, **popen_kwargs) -> PrivateRedis:
        """Start it and wait until it answers ``PING``; ``popen_kwargs`` go to ``Popen``."""
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.dir),
                "--protected-mode", "no",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **popen_kwargs,
        )  # fmt: skip
        client = self.client()
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.exceptions.ConnectionError:
                    if self.process.poll() is not None:
                        code = self.process.returncode
                        raise RuntimeError(f"redis-server exited with {code}") from None
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"redis-server on {self.port} did not start") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def version(self) -> str:
        client = self.client()
        try:
            return str(client.info("server")["redis_version"])
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM, wait (SIGKILL after 10 s), and remove its directory."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL: the abrupt death of the server, its data gone (no persistence)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self) -> PrivateRedis:
        self.kill()
        return self.start()

    def close(self) -> None:
        """Stop it for good and remove its directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
