"""``python -m bench.snapshot_instructions``: redis-server's instructions per SNAPSHOT (the script
behind every resume and poll read from Redis, schemas.lua), counted by valgrind's callgrind, for
the scripts of one or more checkouts side by side: Redis's share of a read, which
:mod:`bench.resume_instructions` and :mod:`bench.delivery_instructions` (the gateway's) leave
out.

One redis-server runs under callgrind, counting only while a script is called. ``--events``
events are published to one project; each checkout's SNAPSHOT is then called ``--calls`` times
as the gateway calls it (``EVAL``, a cursor ``--page`` events behind the top, a page of
``--page``), after a few calls of warm-up, for ``--rounds`` rounds in turn.

    python -m bench.snapshot_instructions --root /tmp/before --root .
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from bench.common import free_port
from bench.gateway import event
from publisher import Publisher
from schemas.keys import Keys

ROOT = Path(__file__).resolve().parents[1]
PROJECT = 1
WARMUP = 5
#: The gateway's other SNAPSHOT arguments (gateway.store): a new project's epoch, the TTL of a
#: project without history, the page's byte budget and the largest entry.
NEW_EPOCH, NO_HISTORY_TTL_MS, PAGE_BYTES, MAX_ENTRY_BYTES = "x", 60_000, 1_048_576, 4 << 20


def snapshot_script(root: Path) -> str:
    """The SNAPSHOT script of checkout ``root`` (its schemas/lua.py, loaded by path)."""
    spec = importlib.util.spec_from_file_location(f"lua_of_{abs(hash(root))}",
                                                  root / "schemas" / "lua.py")  # fmt: skip
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SNAPSHOT


def _total(paths: list[str]) -> int:
    total = 0
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.snapshot_instructions",
                                     description=(__doc__ or "").split("\n")[0])  # fmt: skip
    parser.add_argument("--root", type=Path, action="append",
                        help="checkout whose script runs (repeat; default: this one)")  # fmt: skip
    parser.add_argument("--events", type=int, default=201)
    parser.add_argument("--page", type=int, default=100)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    roots = [root.resolve() for root in args.root or [ROOT]]
    scripts = {root: snapshot_script(root) for root in roots}
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        proc = subprocess.Popen(
            ["valgrind", "-q", "--tool=callgrind", "--instr-atstart=no",
             f"--callgrind-out-file={os.path.join(out_dir, 'callgrind.out.%p')}",
             binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", out_dir],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        conn = redis.Redis(host="127.0.0.1", port=port, socket_timeout=120)
        publisher = None

        def control(*flags: str) -> None:
            subprocess.run(["callgrind_control", *flags, str(proc.pid)], check=True,
                           capture_output=True, timeout=120)  # fmt: skip

        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    conn.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("redis-server did not start under valgrind") from None
                    time.sleep(0.2)
            publisher = Publisher.from_url(f"redis://127.0.0.1:{port}/0")
            events = [event(PROJECT, n, timed=False) for n in range(1, args.events + 1)]
            publisher.publish_many(events)
            keys = Keys()
            meta, stream = keys.meta(PROJECT), keys.stream(PROJECT)
            epoch = conn.hget(meta, "epoch").decode()
            after = max(0, args.events - args.page)
            call = [2, meta, stream, NEW_EPOCH, epoch, after, args.page, NO_HISTORY_TTL_MS,
                    PAGE_BYTES, MAX_ENTRY_BYTES]  # fmt: skip
            for _ in range(args.rounds):
                for root, script in scripts.items():
                    for _ in range(WARMUP):
                        conn.eval(script, *call)
                    before = set(glob.glob(os.path.join(out_dir, "callgrind.out.*")))
                    control("--zero")
                    control("-i", "on")
                    for _ in range(args.calls):
                        conn.eval(script, *call)
                    control("-i", "off")
                    control("--dump")
                    dumped = sorted(set(glob.glob(os.path.join(out_dir, "callgrind.out.*")))
                                    - before)  # fmt: skip
                    per_call = _total(dumped) / args.calls
                    print(f"{root}: {per_call:,.0f} instructions per SNAPSHOT "
                          f"({args.page} events)", flush=True)  # fmt: skip
        finally:
            if publisher is not None:
                publisher.close()
            conn.close()
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
