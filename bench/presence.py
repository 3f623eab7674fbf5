"""Presence benchmark (issue 12's targets): 1,000 members of one project over 2 pods, 10% of them
changing activity every second.

By default the pods are two ``python -m gateway`` processes against a private ``redis-server``,
and every member is one WebSocket connection of this process (half on each gateway) with a token
of its own (``sub`` = the member), subscribed with ``"presence": true``: each connection keeps its
own view from the ``presence`` and ``presence_diff`` frames it receives, and the members that
change send ``activity`` frames. ``--in-process`` measures the presence machinery alone: both pods
are :class:`gateway.presence_store.PresenceService` instances in this process (one view per pod
stands for its connections). Measured:

* convergence: from an activity change to the moment the views on *both* pods show it (p50, p99,
  max; target: every view within 1.5 s);
* presence deliveries per second (frames to connections; bound: members x 1 diff/s) against what
  per-change fan-out would send (members x changes/s);
* Redis commands per second (``INFO commandstats``, all commands of the run);
* without ``--quick``: the gateway with 500 members is SIGKILLed (in-process: its service stops
  silently) and the time until none of its members is left in any view on the other gateway
  (target <= 30 s).

``python -m bench.presence [--quick] [--in-process] [--json PATH]`` (``--quick``: 5 s of changes,
no kill: about 20 s; full: 20 s of changes and the kill: about 60 s).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import redis
import redis.asyncio
from websockets.asyncio.client import ClientConnection, connect

from bench.common import (
    RESULTS_DIR,
    BenchGateway,
    BenchRedis,
    machine,
    percentile,
    write_json,
)
from gateway.presence_store import PresenceService
from schemas.protocol import Member, Presence, PresenceDiff
from schemas.tokens import issue_token

MEMBERS = 1_000
CHANGE_FRACTION = 0.10  # of the members, per second
TARGET_CONVERGENCE_S = 1.5
TARGET_KILL_S = 30.0
PROJECT = 1

_decode = msgspec.json.Decoder(Presence | PresenceDiff)


class PodViews:
    """What the connections of one pod see. All of them get the same frames (one encode per
    diff), so one table per pod stands for all of its connections; deliveries count each."""

    def __init__(self, name: str, pending: dict[str, tuple[int, float]]) -> None:
        self.name = name
        self.members: dict[str, Member] = {}
        self.deliveries = 0
        self.frames = 0
        self._pending = pending  # member -> (viewing it must show, when it changed)
        self.converged: dict[tuple[str, int], float] = {}
        self.diff_times: list[float] = []  # every connection of the pod gets these diffs
        self.changed = asyncio.Event()

    def deliver(self, sessions, frame: bytes) -> None:
        self.deliveries += len(sessions)
        self.frames += 1
        message = _decode.decode(frame)
        if isinstance(message, Presence):
            self.members = {m.id: m for m in message.members}
            return
        now = time.monotonic()
        self.diff_times.append(now)
        for member_id in message.left:
            self.members.pop(member_id, None)
        for member in (*message.joined, *message.changed):
            self.members[member.id] = member
            want = self._pending.get(member.id)
            if want is not None and member.viewing == want[0]:
                self.converged[(member.id, want[0])] = now
        self.changed.set()


async def _run(url: str, *, seconds: float, kill: bool) -> dict[str, Any]:
    pending: dict[str, tuple[int, float]] = {}
    changes: list[tuple[str, int, float]] = []
    views = {name: PodViews(name, pending) for name in ("a", "b")}
    pods: dict[str, PresenceService] = {}
    for name, view in views.items():
        client = redis.asyncio.Redis.from_url(url)
        pods[name] = PresenceService(client, view.deliver, pod_id=name)
        await pods[name].start()
    members = [f"user-{i}" for i in range(MEMBERS)]
    home = {m: ("a", "b")[i % 2] for i, m in enumerate(members)}
    for m in members:
        pods[home[m]].join(m, PROJECT, m, m.title())
    for m in members:
        views[home[m]].deliver([m], await pods[home[m]].subscribe(m, PROJECT))

    async def everyone_seen() -> None:
        while not all(len(v.members) == MEMBERS for v in views.values()):
            for v in views.values():
                v.changed.clear()
            await asyncio.wait(
                [asyncio.create_task(v.changed.wait()) for v in views.values()],
                return_when=asyncio.FIRST_COMPLETED,
            )

    await asyncio.wait_for(everyone_seen(), 30)
    sync = redis.Redis.from_url(url)
    sync.config_resetstat()
    for v in views.values():
        v.deliveries = v.frames = 0
    started = time.monotonic()
    rng = random.Random(12)
    per_tick = max(1, round(MEMBERS * CHANGE_FRACTION / 10))  # every 100 ms
    value = 0
    while time.monotonic() - started < seconds:
        for m in rng.sample(members, per_tick):
            value += 1
            pending[m] = (value, time.monotonic())
            changes.append((m, value, pending[m][1]))
            pods[home[m]].activity(m, PROJECT, value, None)
        await asyncio.sleep(0.1)
    elapsed = time.monotonic() - started
    deliveries = sum(v.deliveries for v in views.values())  # during the changes only
    calls = _redis_calls(sync)
    await asyncio.sleep(2.5)  # let the last changes arrive (a change not seen counts as missed)

    def arrivals(member: str, value: int) -> list[float] | None:
        seen = [view.converged.get((member, value)) for view in views.values()]
        return None if any(t is None for t in seen) else seen  # type: ignore[return-value]

    results = _figures(
        changes, arrivals, [v.diff_times for v in views.values()], deliveries, elapsed, calls
    )
    if kill:
        victim, survivor = pods["b"], views["a"]
        gone = {m for m in members if home[m] == "b"}
        await victim.stop()
        killed = time.monotonic()

        async def ghosts_gone() -> None:
            while gone & set(survivor.members):
                survivor.changed.clear()
                await survivor.changed.wait()

        await asyncio.wait_for(ghosts_gone(), 60)
        results["kill"] = {
            "members": len(gone),
            "gone_after_s": time.monotonic() - killed,
            "target": TARGET_KILL_S,
        }
    for pod in pods.values():
        await pod.stop()
        await pod.client.aclose()
    sync.close()
    return results


# --- through gateway processes ------------------------------------------------------------------

SECRET = "bench-presence-secret-0123456789abcdef"


class Tally:
    """What all connections saw: when each awaited (member, viewing) reached each view."""

    def __init__(self) -> None:
        self.pending: dict[str, int] = {}  # member -> the viewing value its views must show
        self.seen: dict[tuple[str, int], list[float]] = {}  # (member, value) -> arrival times
        self.deliveries = 0
        self.counting = False
        self.changed = asyncio.Event()


class MemberConnection:
    """One member's connection: its own view of the project's presence."""

    def __init__(self, member: str, home: str, tally: Tally) -> None:
        self.member = member
        self.home = home
        self.tally = tally
        self.members: dict[str, int | None] = {}  # member -> viewing
        self.diff_times: list[float] = []
        self.ws: ClientConnection | None = None
        self.subscribed = asyncio.Event()

    async def run(self, url: str) -> None:
        token = issue_token(SECRET, [PROJECT], ttl=3600, subject=self.member, name=self.member)
        self.ws = ws = await connect(url, max_size=2**24, ping_interval=None, open_timeout=60)
        await ws.send(msgspec.json.encode({"type": "auth", "token": token}).decode())
        subscribe = {"type": "subscribe", "project_id": PROJECT, "presence": True}
        await ws.send(msgspec.json.encode(subscribe).decode())
        tally = self.tally
        async for raw in ws:
            if isinstance(raw, str):
                raw = raw.encode()
            if b'"presence' not in raw[:32]:
                if b'"subscribed"' in raw[:32]:
                    self.subscribed.set()
                continue
            message = _decode.decode(raw)
            now = time.monotonic()
            if tally.counting:
                tally.deliveries += 1
            if isinstance(message, Presence):
                self.members = {m.id: m.viewing for m in message.members}
            else:
                self.diff_times.append(now)
                for member_id in message.left:
                    self.members.pop(member_id, None)
                for member in (*message.joined, *message.changed):
                    self.members[member.id] = member.viewing
                    want = tally.pending.get(member.id)
                    if want is not None and member.viewing == want:
                        tally.seen.setdefault((member.id, want), []).append(now)
            tally.changed.set()

    async def activity(self, viewing: int) -> None:
        assert self.ws is not None
        frame = {"type": "activity", "project_id": PROJECT, "viewing": viewing, "answering": None}
        await self.ws.send(msgspec.json.encode(frame).decode())


async def _wait_until(condition, tally: Tally, limit: float) -> None:
    async def loop() -> None:
        while not condition():
            tally.changed.clear()
            await tally.changed.wait()

    await asyncio.wait_for(loop(), limit)


async def _run_gateways(url: str, *, seconds: float, kill: bool) -> dict[str, Any]:
    gateways = {name: BenchGateway(url, "--auth-secret", SECRET) for name in ("a", "b")}
    tally = Tally()
    members = [f"user-{i}" for i in range(MEMBERS)]
    connections = [MemberConnection(m, ("a", "b")[i % 2], tally) for i, m in enumerate(members)]
    tasks = []
    try:
        for start in range(0, MEMBERS, 100):  # in waves: a thousand handshakes at once time out
            wave = connections[start : start + 100]
            tasks += [asyncio.create_task(c.run(gateways[c.home].url)) for c in wave]
            await asyncio.wait_for(asyncio.gather(*(c.subscribed.wait() for c in wave)), 60)
        await _wait_until(lambda: all(len(c.members) == MEMBERS for c in connections), tally, 60)
        sync = redis.Redis.from_url(url)
        sync.config_resetstat()
        tally.counting = True
        started = time.monotonic()
        rng = random.Random(12)
        per_tick = max(1, round(MEMBERS * CHANGE_FRACTION / 10))  # every 100 ms
        by_member = {c.member: c for c in connections}
        changes: list[tuple[str, int, float]] = []
        value = 0
        while time.monotonic() - started < seconds:
            for m in rng.sample(members, per_tick):
                value += 1
                tally.pending[m] = value
                changes.append((m, value, time.monotonic()))
                await by_member[m].activity(value)
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
        tally.counting = False
        deliveries = tally.deliveries
        calls = _redis_calls(sync)
        await asyncio.sleep(3)  # let the last changes arrive (a change not seen counts as missed)

        def arrivals(member: str, value: int) -> list[float] | None:
            seen = tally.seen.get((member, value), [])
            return seen if len(seen) >= MEMBERS else None

        results = _figures(
            changes, arrivals, [c.diff_times for c in connections], deliveries, elapsed, calls
        )
        results["mode"] = "gateway processes"
        if kill:
            gone = {c.member for c in connections if c.home == "b"}
            survivors = [c for c in connections if c.home == "a"]
            gateways["b"].kill()
            killed = time.monotonic()
            await _wait_until(
                lambda: not any(gone & c.members.keys() for c in survivors), tally, 90
            )
            results["kill"] = {
                "members": len(gone),
                "gone_after_s": time.monotonic() - killed,
                "target": TARGET_KILL_S,
            }
        sync.close()
        return results
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for gateway in gateways.values():
            gateway.stop()


def _redis_calls(client: redis.Redis) -> dict[str, int]:
    """Redis's command counts since the last ``CONFIG RESETSTAT`` (commandstats counts the
    commands run inside scripts too: both are reported)."""
    stats = client.info("commandstats")
    return {
        "commands": sum(v.get("calls", 0) for v in stats.values() if isinstance(v, dict)),
        "scripts": sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval")),
        # redis-py used to check the scripts were loaded before each pipeline
        "script_exists": stats.get("cmdstat_script|exists", {}).get("calls", 0),
    }


def _figures(
    changes: list[tuple[str, int, float]],
    arrivals: Callable[[str, int], list[float] | None],
    diff_times: list[list[float]],
    deliveries: int,
    elapsed: float,
    calls: dict[str, int],
) -> dict[str, Any]:
    """The run's figures. A change converged once every view shows it (``arrivals``: when each
    view did, or None when one never did); a change superseded by a later one of the same member
    within the run is coalesced away by design and not counted."""
    latencies = []
    missed = 0
    last_value = {m: v for m, v, _ in changes}
    for m, v, at in changes:
        if v != last_value[m]:
            continue
        seen = arrivals(m, v)
        if seen is None:
            missed += 1
        else:
            latencies.append(max(seen) - at)
    latencies.sort()
    gaps = [later - earlier for times in diff_times for earlier, later in itertools.pairwise(times)]
    return {
        "members": MEMBERS,
        "pods": 2,
        "changes_per_s": len(changes) / elapsed,
        "seconds": round(elapsed, 2),
        "convergence_s": {
            "p50": percentile(latencies, 50) if latencies else None,
            "p99": percentile(latencies, 99) if latencies else None,
            "max": latencies[-1] if latencies else None,
            "measured": len(latencies),
            "not_converged": missed,
            "target": TARGET_CONVERGENCE_S,
        },
        "deliveries_per_s": deliveries / elapsed,
        "deliveries_bound_per_s": MEMBERS * 1.0,
        # one connection's diffs: at most one per second means no two closer than ~1 s
        "min_gap_between_diffs_s": min(gaps) if gaps else None,
        "per_change_fanout_per_s": MEMBERS * len(changes) / elapsed,
        "redis_commands_per_s": calls["commands"] / elapsed,
        "redis_script_calls_per_s": calls["scripts"] / elapsed,
        "redis_script_exists_per_s": calls["script_exists"] / elapsed,
    }


def run(
    *, quick: bool = False, in_process: bool = False, seconds: float | None = None
) -> dict[str, Any]:
    seconds = seconds or (5 if quick else 20)
    with BenchRedis() as server:
        main = _run if in_process else _run_gateways
        results = asyncio.run(main(server.url, seconds=seconds, kill=not quick))
    if in_process:
        results["mode"] = "in-process"
    return {"machine": machine(), "quick": quick, **results}


def _report(r: dict[str, Any]) -> str:
    c = r["convergence_s"]
    converged = c["max"] is not None and c["max"] <= c["target"] and not c["not_converged"]
    bounded = r["deliveries_per_s"] <= r["deliveries_bound_per_s"] * 1.05
    lines = [
        f"presence benchmark ({r['machine']['date']}, {r['mode']}: {r['members']} members on "
        f"{r['pods']} pods, "
        f"{r['changes_per_s']:.0f} changes/s for {r['seconds']} s, "
        f"load average {r['machine']['load_average']})",
        f"| convergence, every view | p50 {c['p50']:.2f} s, p99 {c['p99']:.2f} s, max "
        f"{c['max']:.2f} s ({c['not_converged']} not converged) | target <= {c['target']} s "
        f"| {'met' if converged else 'MISSED'} |",
        f"| presence deliveries | {r['deliveries_per_s']:,.0f}/s "
        f"| bound {r['deliveries_bound_per_s']:,.0f}/s (per-change fan-out would be "
        f"{r['per_change_fanout_per_s']:,.0f}/s) | {'met' if bounded else 'MISSED'} |",
        f"| diffs per connection | closest two {r['min_gap_between_diffs_s']:.2f} s apart "
        f"| at most 1 per second | |",
        f"| Redis calls | {r['redis_script_calls_per_s']:,.1f} script calls/s + "
        f"{r['redis_script_exists_per_s']:,.1f} SCRIPT EXISTS/s "
        f"({r['redis_commands_per_s']:,.0f} commands/s counting those inside the scripts) | | |",
    ]
    if "kill" in r:
        k = r["kill"]
        lines.append(
            f"| pod with {k['members']} members stopped: gone from the other view | "
            f"{k['gone_after_s']:.1f} s | target <= {k['target']:.0f} s | "
            f"{'met' if k['gone_after_s'] <= k['target'] else 'MISSED'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.presence", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="5 s of changes, no kill")
    parser.add_argument(
        "--in-process", action="store_true", help="two PresenceService pods in this process"
    )
    parser.add_argument("--seconds", type=float, help="seconds of changes (default 20, quick 5)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = run(quick=args.quick, in_process=args.in_process, seconds=args.seconds)
    print(_report(results))
    name = "presence-in-process.json" if args.in_process else "presence.json"
    write_json(args.json or RESULTS_DIR / name, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
