"""``python -m bench.resume_instructions``: the gateway's instructions per resume in a scripted
reconnect storm, counted by valgrind's callgrind: a figure that, unlike CPU time, does not move
with other work on the machine, for A/B comparisons of the resume path.

The storm is :mod:`bench.storm`'s, smaller (the gateway runs ~50x slower under valgrind):
``--clients`` clients of ``--projects`` projects subscribe, are reset, ``--missed`` events per
project are published while they are away, and all reconnect with their cursors. ``warm`` (the
default): one client per project stays connected, so the pod follows every project and answers
each resume from its window; ``--cold``: none stays, each feed starts during the storm.
``--auth``: the gateway verifies tokens (an auth secret instead of ``--no-auth``) and every client
has its own (:func:`bench.storm.client_tokens`), sent in its first frame before it subscribes,
as in :mod:`bench.storm`'s ``warm, authenticated``.
Clients resume with the tag of the event at their cursor (schemas.tags), as :mod:`bench.storm`,
eventbus.js and the consumer do; ``--untagged``: without (as every client did before tags).
``--no-window``: the gateway keeps no resume window (``--resume-window-events 0``), so every
resume is read from Redis.
callgrind counts nothing until the reconnects start and nothing after the last ``subscribed``
(``callgrind_control -i on/off``), so the figure is the storm's alone: handshakes, subscribes,
replays, and the event loop between them. Every client's record is checked as in the storm.

    python -m bench.resume_instructions                      # this checkout
    python -m bench.resume_instructions --auth               # every client with its own token
    python -m bench.resume_instructions --root /tmp/other    # the gateway of another checkout

Repeated runs of the same code agree to within ~1 % (the event loop's batching still depends on
timing); compare medians of a few runs.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from bench.callgrind import CallgrindGateway
from bench.common import BenchRedis, free_port
from bench.gateway import CLIENT_CPU, event, pinned_to_client_core, pinning
from bench.loadgen import LoadGen, raise_nofile, verify_resume
from bench.storm import client_tokens
from publisher import Publisher
from schemas.keys import Keys
from schemas.tags import event_tag

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [f"127.0.0.{i}" for i in range(1, 9)]


def run_once(root: Path, args: argparse.Namespace, out_dir: str) -> dict:
    """One storm under callgrind; the instructions counted while the clients resumed."""
    redis = BenchRedis(CLIENT_CPU)
    secret = secrets.token_urlsafe(32) if args.auth else None
    extra = ["--resume-window-events", "0"] if args.no_window else []
    loadgen = keepers = gateway = None
    publisher = Publisher.from_url(redis.url)
    rconn = redis.client()
    try:
        gateway = CallgrindGateway(root, redis.url, free_port(), out_dir, secret=secret,
                                   extra=extra, keep=args.keep)  # fmt: skip
        port = gateway.port
        cpus = {CLIENT_CPU} if pinning() else None
        projects = list(range(1, args.projects + 1))
        specs = [(projects[i % len(projects)], None, None) for i in range(args.clients)]
        tokens = keeper_tokens = None
        if secret:
            tokens = client_tokens(secret, [project for project, _, _ in specs])
            keeper_tokens = client_tokens(secret, projects)
        keeping = 0
        if not args.cold:
            keepers = LoadGen("127.0.0.1", port, workers=1, sources=SOURCES, cpus=cpus)
            keepers.connect([(project, None, None) for project in projects], timeout=600,
                            tokens=keeper_tokens)  # fmt: skip
            keeping = len(projects)
        loadgen = LoadGen("127.0.0.1", port, workers=1, sources=SOURCES, cpus=cpus)
        loadgen.connect(specs, inflight=args.inflight, timeout=600, tokens=tokens)
        keys = Keys()
        cursors = {}
        for project in projects:
            epoch, top = rconn.hmget(keys.meta(project), "epoch", "seq")
            tag = None
            if not args.untagged:  # the tag of the event there, as bench.storm resumes
                at = rconn.xrange(keys.stream(project), f"{int(top)}-0", f"{int(top)}-0")
                tag = event_tag(at[0][1][b"f"]) if at else None
            cursors[project] = (epoch.decode(), int(top), tag)
        loadgen.close()
        gateway.wait_connections(keeping)
        kept = keepers.frames if keepers is not None else 0
        missed = [event(project, n + 1) for n in range(args.missed) for project in projects]
        for start in range(0, len(missed), 2000):
            publisher.publish_many(missed[start : start + 2000])
        if keepers is not None:  # the pod has relayed them all (its windows hold them)
            deadline = time.monotonic() + 300
            while keepers.frames < kept + len(missed) and time.monotonic() < deadline:
                time.sleep(0.1)
        resumes = [(project, *cursors[project]) for project, _, _ in specs]
        with gateway.counting():
            result = loadgen.connect(resumes, record=True, inflight=args.inflight, timeout=600,
                                     tokens=tokens)  # fmt: skip
        check = verify_resume(loadgen.records(), args.missed)
        loadgen.mode("count")
        loadgen.close()
    finally:
        for gen in (loadgen, keepers):
            if gen is not None:
                gen.quit()
        total = gateway.stop() if gateway is not None else 0
        publisher.close()
        rconn.close()
        redis.close()
    return {
        "clients": result["clients"],
        "failed": result["failed"],
        "exact": check["exact"],
        "instructions": total,
        "per_resume": round(total / max(1, result["clients"])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resume_instructions",
                                     description=(__doc__ or "").split("\n")[0])  # fmt: skip
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose gateway runs")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--projects", type=int, default=10)
    parser.add_argument("--missed", type=int, default=100)
    parser.add_argument("--inflight", type=int, default=256)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--cold", action="store_true", help="no feed followed before the storm")
    parser.add_argument("--auth", action="store_true", help="every client with a token of its own")
    parser.add_argument("--untagged", action="store_true", help="resume without cursor tags")
    parser.add_argument("--no-window", action="store_true",
                        help="no resume window: every resume read from Redis")  # fmt: skip
    parser.add_argument("--keep", type=Path, help="keep callgrind's output (the last run's) here")
    args = parser.parse_args(argv)
    raise_nofile(4 * args.clients)
    counts = []
    with pinned_to_client_core(), tempfile.TemporaryDirectory() as out_dir:
        for _ in range(args.runs):
            run = run_once(args.root.resolve(), args, out_dir)
            counts.append(run["per_resume"])
            print(f"{args.root}: {run['clients']:,} resumes ({run['failed']} failed, "
                  f"{run['exact']:,} exact): {run['instructions']:,} instructions, "
                  f"{run['per_resume']:,} per resume", flush=True)  # fmt: skip
    if len(counts) > 1:
        print(f"median: {statistics.median(counts):,.0f} instructions per resume")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
