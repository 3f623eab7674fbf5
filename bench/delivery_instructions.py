"""``python -m bench.delivery_instructions``: the gateway's instructions per delivered event (one
event to many WebSocket or SSE subscribers) and per poll page, counted by valgrind's callgrind
(:mod:`bench.callgrind`): figures that, unlike CPU time, do not move with other work on the
machine, for A/B comparisons of the live path of two checkouts (``--root``).

* ``ws`` (the default): ``--subscribers`` WebSocket clients of one project
  (:mod:`bench.loadgen`, counting frames); ``--events`` events are published ``--burst`` at a
  time, each burst awaited until every client has counted it. The figure is instructions /
  (events x subscribers): the fan-out hot path, Redis read and framing included.
* ``sse``: the same with SSE streams (``GET /v1/projects/{id}/stream``).
* ``poll``: ``--polls`` polls (``GET /v1/projects/{id}/events``), each a page of ``--page``
  events from the same cursor, one request at a time on a fresh connection; ``--tag`` sends the
  tag of the event at the cursor (a gateway before tags refuses it). Figure: instructions per
  poll.

callgrind counts only while the events are delivered or the polls answered, after a warm-up of
a few events (or polls) that starts the feed.

    python -m bench.delivery_instructions                       # this checkout, WebSocket
    python -m bench.delivery_instructions --mode sse --root /tmp/other

Repeated runs of the same code agree within ~1 % (the event loop's batching still depends on
timing: how many clients a write reaches before the next read); compare medians of a few runs.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import tempfile
import time
from pathlib import Path

from bench.callgrind import CallgrindGateway
from bench.common import BenchRedis, free_port
from bench.gateway import CLIENT_CPU, event, pinned_to_client_core, pinning
from bench.loadgen import LoadGen, raise_nofile
from publisher import Publisher
from schemas.keys import Keys
from schemas.tags import event_tag

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [f"127.0.0.{i}" for i in range(1, 9)]
PROJECT = 1
WARMUP = 3


def _deliver(loadgen: LoadGen, publisher: Publisher, subscribers: int, first: int, count: int,
             burst: int) -> None:  # fmt: skip
    """Publish events ``first .. first+count-1``, ``burst`` at a time, each burst awaited until
    every subscriber has counted it."""
    expected = loadgen.frames
    for start in range(first, first + count, burst):
        n = min(burst, first + count - start)
        publisher.publish_many([event(PROJECT, start + i, timed=False) for i in range(n)])
        expected += n * subscribers
        deadline = time.monotonic() + 300
        while loadgen.frames < expected:
            if time.monotonic() > deadline:
                raise SystemExit(f"{expected - loadgen.frames} deliveries missing after 300 s")
            time.sleep(0.01)


def _poll(port: int, query: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", f"/v1/projects/{PROJECT}/events?{query}")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise SystemExit(f"poll answered {response.status}: {body[:200]!r}")
    finally:
        conn.close()


def run_once(root: Path, args: argparse.Namespace, out_dir: str) -> dict:
    """One measurement under callgrind: instructions, and the deliveries (or polls) they made."""
    redis = BenchRedis(CLIENT_CPU)
    publisher = Publisher.from_url(redis.url)
    rconn = redis.client()
    gateway = loadgen = None
    try:
        gateway = CallgrindGateway(root, redis.url, free_port(), out_dir, keep=args.keep)
        cpus = {CLIENT_CPU} if pinning() else None
        if args.mode == "poll":
            publisher.publish_many(
                [event(PROJECT, n, timed=False) for n in range(1, args.page + 2)]
            )
            keys = Keys()
            epoch = rconn.hget(keys.meta(PROJECT), "epoch").decode()
            query = f"epoch={epoch}&after=1&limit={args.page}"
            if args.tag:
                at = rconn.xrange(keys.stream(PROJECT), "1-0", "1-0")
                query += f"&tag={event_tag(at[0][1][b'f'])}"
            for _ in range(WARMUP):
                _poll(gateway.port, query)
            with gateway.counting():
                for _ in range(args.polls):
                    _poll(gateway.port, query)
            units = args.polls
        else:
            loadgen = LoadGen("127.0.0.1", gateway.port, workers=1, sources=SOURCES, cpus=cpus,
                              transport=args.mode.replace("ws", "websocket"))  # fmt: skip
            result = loadgen.connect([(PROJECT, None, None)] * args.subscribers, timeout=600)
            if result["failed"]:
                raise SystemExit(f"{result['failed']} subscribers failed")
            _deliver(loadgen, publisher, args.subscribers, 1, WARMUP, 1)
            with gateway.counting():
                _deliver(loadgen, publisher, args.subscribers, WARMUP + 1, args.events,
                         args.burst)  # fmt: skip
            units = args.events * args.subscribers
    finally:
        if loadgen is not None:
            loadgen.quit()
        total = gateway.stop() if gateway is not None else 0
        publisher.close()
        rconn.close()
        redis.close()
    return {"instructions": total, "units": units, "per_unit": round(total / max(1, units))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.delivery_instructions",
                                     description=(__doc__ or "").split("\n")[0])  # fmt: skip
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose gateway runs")
    parser.add_argument("--mode", choices=("ws", "sse", "poll"), default="ws")
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--burst", type=int, default=10, help="events published at once")
    parser.add_argument("--polls", type=int, default=200)
    parser.add_argument("--page", type=int, default=100, help="events per poll page")
    parser.add_argument("--tag", action="store_true", help="polls send the cursor's tag")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="keep callgrind's output (the last run's) here")
    args = parser.parse_args(argv)
    raise_nofile(4 * args.subscribers)
    unit = "poll" if args.mode == "poll" else "delivered event"
    counts = []
    with pinned_to_client_core(), tempfile.TemporaryDirectory() as out_dir:
        for _ in range(args.runs):
            run = run_once(args.root.resolve(), args, out_dir)
            counts.append(run["per_unit"])
            print(f"{args.root} {args.mode}: {run['units']:,} {unit}s: "
                  f"{run['instructions']:,} instructions, {run['per_unit']:,} per {unit}",
                  flush=True)  # fmt: skip
    if len(counts) > 1:
        print(f"median: {statistics.median(counts):,.0f} instructions per {unit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
