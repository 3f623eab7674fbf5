"""A private ``redis-server`` on 127.0.0.1 and a free port, with no persistence.

The demo starts one when no Redis is configured; the tests (``tests/support/redis_server.py``)
and the benchmarks (``bench/common.py``) use this same class for every Redis they kill, restart,
flush or pin, so that none of them ever touches the machine's shared Redis.
"""

from __future__ import annotations

import collections
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

__all__ = ["PrivateRedis", "free_port"]


#: The ports :func:`free_port` handed out last in this process (see there).
_handed_out: collections.deque[int] = collections.deque(maxlen=1024)
_handing_out = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, below the kernel's ephemeral range, and not one of the last
    1,024 this process was given.

    A caller binds the port only later (a gateway process after its start-up, ~1 s). A port
    the kernel picks (``bind(0)``) is in its ephemeral range, where any outgoing connection made
    meanwhile (a test's client, another test's Redis connection) could take it, and two calls
    in a row return the same one about once in 14,000. Below that range only a server binding
    that exact port can take it first, and nothing this process was handed out recently is
    handed out again. (The range's bottom from ``/proc``; elsewhere, or if it leaves no room,
    the kernel's pick.)"""
    low = _ephemeral_low()
    with _handing_out:
        for _ in range(1000 if low - 1024 >= 2048 else 0):
            port = _random.randrange(max(1024, low - 12_000), low)
            if port in _handed_out:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            _handed_out.append(port)
            return port
        while True:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
            if port not in _handed_out:
                _handed_out.append(port)
                return port


_random = random.Random()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


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
        #: Whether the port is ours to change: a server outside this process took it first.
        self._port_chosen = port is None
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
        """Start it and wait until it answers ``PING``; ``popen_kwargs`` go to ``Popen``.

        The answer must come from this process: on a port another server took since
        :func:`free_port` chose it, that server answered, and a test went on to flush, stop
        or kill what it took for its own Redis. A port chosen here is then chosen again (the
        first start only: a restart keeps its port, which its clients know)."""
        for attempt in range(3):
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
            if self._answering(timeout):
                self._port_chosen = False
                return self
            self.process.wait(10)  # another server answered: ours could not bind the port
            self.process = None
            if not self._port_chosen or attempt == 2:
                raise RuntimeError(f"port {self.port} is taken by another server")
            self.port = free_port()
        raise AssertionError("unreachable")

    def _answering(self, timeout: float) -> bool:
        """Wait until the port answers ``PING``: True when this process answers, False when
        another server does."""
        assert self.process is not None
        client = self.client()
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return int(client.info("server")["process_id"]) == self.process.pid
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
