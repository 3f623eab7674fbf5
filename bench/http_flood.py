"""Floods of hostile or wasteful HTTP requests against one gateway process, and what each does to
a WebSocket subscriber's deliveries (the windows of :mod:`bench.scrape_flood`, one per shape).

Shapes, each ``--clients`` concurrent clients sending the same request in a loop for
``--seconds``: ``/metrics``; a route that does not exist (404); a poll with a garbage token, with
an expired token (signed, so the HMAC is checked), with a valid token of the subscribed project
(each poll a Redis read: Redis's ``EVAL`` calls are counted), with a ``*`` token for a new
project id on every request (the keys Redis holds afterwards are counted); a request with 100
headers of 8,000 bytes; an SSE stream opened and dropped as soon as its head arrives, of the
subscribed project or (``*`` token) of a new one each time, with what the gateway still follows a
second later (its ``projects``, ``subscriptions``, ``connections``, ``sockets`` gauges). Then 300
sockets each parking such a head, never ended (the gateway's memory); and slowloris:
``--clients`` sockets that send a request's first line and one header byte a second, timed until
the gateway drops them, and whether a poll is still answered meanwhile.

    python -m bench.http_flood                    # 200 clients, 10 s per shape
    python -m bench.http_flood --quick            # 50 clients, 3 s
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from pathlib import Path

import jwt

from bench.common import RESULTS_DIR, machine, write_json
from bench.scrape_flood import SECRET, window
from publisher import Publisher, issue_token
from schemas.tokens import AUDIENCE
from tests.support.gateway_process import GatewayProcess, parse_metrics
from tests.support.redis_server import RedisServer


def _get(path: str, *headers: str) -> str:
    return "".join([f"GET {path} HTTP/1.1\r\nHost: x\r\n", *(h + "\r\n" for h in headers), "\r\n"])


def shapes() -> dict[str, tuple[str, dict]]:
    """Name -> (request, what else to look at)."""
    valid = issue_token(SECRET, [1], ttl=3600)
    # Signed and well-formed, expired two minutes ago (issue_token mints no expired token).
    expired = jwt.encode(
        {
            "projects": [1],
            "aud": AUDIENCE,
            "iat": int(time.time()) - 200,
            "exp": int(time.time()) - 120,
        },
        SECRET,
        algorithm="HS256",
    )
    anything = issue_token(SECRET, "*", ttl=3600)
    filler = "a" * 8000
    return {
        "metrics": (_get("/metrics"), {}),
        "not_found": (_get("/nope"), {}),
        "poll_garbage_token": (
            _get("/v1/projects/1/events", "Authorization: Bearer garbage.garbage.garbage"),
            {},
        ),
        "poll_expired_token": (
            _get("/v1/projects/1/events", f"Authorization: Bearer {expired}"),
            {},
        ),
        "poll_valid": (_get("/v1/projects/1/events", f"Authorization: Bearer {valid}"), {}),
        "poll_new_project_each": (
            _get("/v1/projects/{n}/events", f"Authorization: Bearer {anything}"),
            {},
        ),
        "huge_headers": (_get("/healthz", *(f"X-F{i}: {filler}" for i in range(100))), {}),
        "sse_churn": (_get("/v1/projects/1/stream", f"Authorization: Bearer {valid}"), {}),
        "sse_new_project_each": (
            _get("/v1/projects/{n}/stream", f"Authorization: Bearer {anything}"),
            {},
        ),
    }


def redis_counts(client) -> dict[str, int]:
    stats = client.info("commandstats")
    return {
        "eval_calls": int(stats.get("cmdstat_eval", {}).get("calls", 0)),
        "keys": int(client.dbsize()),
    }


def gateway_metrics(gateway: GatewayProcess) -> dict[str, float]:
    """The gateway's label-less series, and its relay-lag buckets as ``relay_le_<bound>``."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    values = parse_metrics(text)
    for match in re.finditer(r'eventbus_relay_lag_seconds_bucket\{le="([^"]+)"\} (\d+)', text):
        values[f"relay_le_{match.group(1)}"] = float(match.group(2))
    return values


def relay_lag(before: dict[str, float], after: dict[str, float]) -> dict[str, str]:
    """The gateway's own lag from publish to relay (its loop's delay, without the measuring
    client's) over a window: the bucket bound under which 50 % and 99 % of relays fell."""
    bounds = sorted(
        (key for key in after if key.startswith("relay_le_") and key != "relay_le_+Inf"),
        key=lambda key: float(key.removeprefix("relay_le_")),
    )
    total = after["relay_le_+Inf"] - before.get("relay_le_+Inf", 0)
    found = {}
    for q in (50, 99):
        for key in bounds:
            if after[key] - before.get(key, 0) >= total * q / 100:
                found[f"p{q}"] = f"<= {float(key.removeprefix('relay_le_')) * 1000:g} ms"
                break
        else:
            found[f"p{q}"] = "> 5000 ms"
    return found


SLOW = r"""
import asyncio, sys, time
port, n, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
held = []

async def slow():
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    started = time.monotonic()
    try:
        while time.monotonic() - started < seconds:
            writer.write(b"a")
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1024), 1.0) == b"":
                    break
            except TimeoutError:
                continue
    except ConnectionError:
        pass
    held.append(time.monotonic() - started)
    writer.close()

async def main():
    await asyncio.gather(*(slow() for _ in range(n)), return_exceptions=True)

asyncio.run(main())
held.sort()
print(len(held), held[0], held[len(held) // 2], held[-1])
"""


async def slowloris(gateway: GatewayProcess, clients: int, seconds: float) -> dict:
    """``clients`` sockets trickling one header byte a second: how long the gateway holds them,
    and how long a poll takes meanwhile."""
    command = [sys.executable, "-c", SLOW, str(gateway.port), str(clients), str(seconds)]
    slow = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    await asyncio.sleep(2)
    valid = issue_token(SECRET, [1], ttl=3600)
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(_get("/v1/projects/1/events", f"Authorization: Bearer {valid}").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    poll_ms = round((time.monotonic() - started) * 1000, 1)
    writer.close()
    out = (await slow.communicate())[0].split()
    return {
        "clients": int(out[0]),
        "held_s": {"min": float(out[1]), "p50": float(out[2]), "max": float(out[3])},
        "poll_meanwhile": head.split(b"\r\n")[0].decode(),
        "poll_meanwhile_ms": poll_ms,
    }


async def parked_heads(gateway: GatewayProcess, clients: int) -> dict:
    """``clients`` sockets that each send a head of 100 headers of 8,000 bytes and never end it:
    the gateway's memory with all of them open (3 s later), and what the first one was told."""
    filler = b"a" * 8000
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    head += b"".join(b"X-F%d: %s\r\n" % (i, filler) for i in range(100))
    before = _rss(gateway.pid)
    sockets = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(clients)]
    for _, writer in sockets:
        writer.write(head)  # no blank line: the head never ends
    await asyncio.sleep(3)
    held = _rss(gateway.pid)
    try:
        first = await asyncio.wait_for(sockets[0][0].read(100), 1)
    except (TimeoutError, ConnectionError):
        first = b""
    for _, writer in sockets:
        writer.transport.abort()
    return {
        "clients": clients,
        "head_kib": len(head) // 1024,
        "rss_before_mb": round(before / 2**20),
        "rss_held_mb": round(held / 2**20),
        "answer": first.split(b"\r\n")[0].decode() or "none yet",
    }


def run(args: argparse.Namespace) -> dict:
    results: dict[str, dict] = {}
    with RedisServer() as server, GatewayProcess(server.url, auth_secret=SECRET) as gateway:
        publisher = Publisher.from_url(server.url)
        client = server.client()
        try:
            results["quiet"] = asyncio.run(window(gateway, publisher, args, False))
            for name, (request, _) in shapes().items():
                if args.only and name not in args.only:
                    continue
                before, metrics_before = redis_counts(client), gateway_metrics(gateway)
                result = asyncio.run(window(gateway, publisher, args, True, request))
                after, metrics_after = redis_counts(client), gateway_metrics(gateway)
                result["redis"] = {key: after[key] - before[key] for key in after}
                result["gateway"] = {
                    key: metrics_after[key] - metrics_before.get(key, 0)
                    for key in metrics_after
                    if key.endswith("_total") and metrics_after[key] != metrics_before.get(key, 0)
                }
                result["relay_lag"] = relay_lag(metrics_before, metrics_after)
                # What the flood left behind once its clients are gone (the subscriber's project
                # and connection stay): feeds, subscriptions, connections, sockets.
                time.sleep(1)
                left = gateway_metrics(gateway)
                result["left"] = {
                    name: left[f"eventbus_{name}"]
                    for name in ("projects", "subscriptions", "connections", "sockets")
                }
                result["rss_mb"] = round(_rss(gateway.pid) / 2**20, 1)
                results[name] = result
                print(name, result, file=sys.stderr, flush=True)
            if not args.only or "parked_heads" in args.only:
                results["parked_heads"] = asyncio.run(parked_heads(gateway, 300))
                print("parked_heads", results["parked_heads"], file=sys.stderr, flush=True)
            if not args.only or "slowloris" in args.only:
                results["slowloris"] = asyncio.run(slowloris(gateway, args.clients, 30.0))
                print("slowloris", results["slowloris"], file=sys.stderr, flush=True)
        finally:
            publisher.close()
            client.close()
    return results


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 clients, 3 s per shape")
    parser.add_argument("--clients", type=int, help="concurrent clients (default 200)")
    parser.add_argument("--seconds", type=float, help="seconds per shape (default 10)")
    parser.add_argument("--only", nargs="*", help="only these shapes (and slowloris)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "http_flood.json")
    args = parser.parse_args(argv)
    args.clients = args.clients or (50 if args.quick else 200)
    args.scrapers = args.clients  # (the name bench.scrape_flood.window reads)
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    results = run(args)
    print(f"HTTP floods ({args.clients} clients, {args.seconds:g} s per shape)")
    print(
        "| shape | requests/s | gateway cores | ms of loop per request | delivery p50 | p99 | max "
        "| relay lag p99 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        if name in ("slowloris", "parked_heads"):
            continue
        rate = r.get("scrapes_per_s", 0)
        per = f"{r['gateway_cores'] * 1000 / rate:.3f}" if rate else "-"
        print(
            f"| {name} | {rate:,} | {r['gateway_cores']} | {per} | {r['latency_ms']['p50']} ms "
            f"| {r['latency_ms']['p99']} ms | {r['latency_max_ms']} ms "
            f"| {r.get('relay_lag', {}).get('p99', '-')} |"
        )
    write_json(args.json, {"machine": machine(), "clients": args.clients, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
