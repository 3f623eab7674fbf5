"""A gateway under valgrind's callgrind, counting instructions only while told to: the shared part
of :mod:`bench.resume_instructions` and :mod:`bench.delivery_instructions`.

Instruction counts, unlike CPU time, do not move with other work on the machine, so they compare
two checkouts (``root``) on a shared machine. The gateway runs ~50x slower under valgrind, so its
keepalive and handshake timeouts are set out of the way; callgrind starts with counting off
(``--instr-atstart=no``) and :meth:`CallgrindGateway.counting` turns it on for a block.
"""

from __future__ import annotations

import contextlib
import glob
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["CallgrindGateway", "metric"]


def metric(port: int, name: str) -> float | None:
    """The gateway's ``eventbus_<name>`` gauge or counter (unlabelled), None when absent."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"eventbus_{name} "):
                return float(line.split()[1])
    return None


class CallgrindGateway:
    """``python -m gateway`` of checkout ``root`` under callgrind, on ``port``, against
    ``redis_url``; started (and serving /metrics) when the constructor returns, or SystemExit.
    ``secret``: the auth secret (None: ``--no-auth``); ``extra``: more gateway flags.
    Callgrind's output goes to ``out_dir``; :meth:`stop` returns the instructions counted."""

    def __init__(
        self,
        root: Path,
        redis_url: str,
        port: int,
        out_dir: str,
        *,
        secret: str | None = None,
        extra: Sequence[str] = (),
        keep: Path | None = None,
    ) -> None:
        self.port, self.out_dir, self.keep = port, out_dir, keep
        cmd = [
            "valgrind", "-q", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={os.path.join(out_dir, 'callgrind.out.%p')}",
            sys.executable, "-m", "gateway", *([] if secret else ["--no-auth"]),
            "--log-level", "warning",
            "--host", "127.0.0.1", "--port", str(port), "--redis-url", redis_url,
            # Keepalive and timeouts out of the way: valgrind slows everything ~50x.
            "--ping-interval", "600", "--subscribe-timeout", "60", "--auth-timeout", "60",
            *extra,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(root))
        if secret:
            env["EVENTBUS_AUTH_SECRET"] = secret
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while True:
            try:
                metric(port, "connections")
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise SystemExit("the gateway did not start under valgrind") from None
                time.sleep(0.5)

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.proc.pid)], check=True,
                       capture_output=True, timeout=120)  # fmt: skip

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count the gateway's instructions during the block (and only then)."""
        self._control("-i", "on")
        try:
            yield
        finally:
            self._control("-i", "off")

    def wait_connections(self, count: int, timeout: float = 300) -> None:
        """Wait until the gateway has exactly ``count`` connections (SystemExit after timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if metric(self.port, "connections") == count:
                return
            time.sleep(0.2)
        raise SystemExit(f"the gateway still has connections other than the {count} expected")

    def stop(self) -> int:
        """Stop the gateway; the instructions counted (callgrind's total), its output removed
        (or moved to ``keep``)."""
        self.proc.terminate()
        try:
            self.proc.wait(300)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        total = 0
        for path in glob.glob(os.path.join(self.out_dir, "callgrind.out.*")):
            with open(path) as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        total = max(total, int(line.split()[1]))
            if self.keep is not None:
                os.replace(path, self.keep)
            else:
                os.unlink(path)
        return total
