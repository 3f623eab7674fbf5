"""Both clients against the gateway's per-connection rate limit (docs/protocol.md, "Rate
limit"): frames the gateway refuses are sent again on one connection-wide pacing
(``FramePacer`` in eventbus.js, :class:`consumer.policy.FramePacer`), so a well-behaved client is
never closed with 4029, and a refused frame never changes what it receives.

The pure pacing is tested against the gateway's own bucket (:mod:`gateway.ratelimit`) on a
simulated clock; the end-to-end tests run eventbus.js (in node) and the Python consumer against
an in-process gateway with a tiny limit.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.policy import FramePacer
from gateway.ratelimit import ALLOWED, CLOSE, Bucket, FrameRateLimit
from publisher import issue_token
from schemas.protocol import CloseCode
from tests.support.gateway_client import SECRET, publish, ws_url

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the pure pacing, against the gateway's bucket ----------------------------------------------


def run_against_bucket(
    limit: FrameRateLimit, pacer: FramePacer, frames: int, produce: list[tuple[float, str]]
) -> tuple[set[str], float]:
    """``frames`` frames sent at once at t=0 (a reconnect), then ``produce``'s (time, key) frames
    from the application, all through ``pacer`` as the clients do, against ``limit``'s bucket,
    each refused frame held again under its key. Returns the keys executed and when the last
    held frame went out; fails on a CLOSE."""
    bucket = Bucket()
    executed: set[str] = set()
    now = 0.0

    def send(key: str) -> None:
        verdict = limit.take(bucket, now)
        assert verdict != CLOSE, f"closed (4029) at {now:.3f} s, strikes {bucket.rate_strikes}"
        if verdict == ALLOWED:
            executed.add(key)
        else:
            pacer.refused(now, limit.retry_after_ms(bucket))
            pacer.hold(key, key)

    def offer(key: str) -> None:
        if pacer.may_send_now(now):
            send(key)
        else:
            pacer.hold(key, key)

    for n in range(frames):
        offer(f"f{n}")
    pending = sorted(produce)
    while (pacer.held or pending) and now < 3600:
        due = pacer.due_at()
        if pending and (due is None or pending[0][0] <= due):
            now = max(now, pending[0][0])
            offer(pending.pop(0)[1])
            continue
        now = max(now, due)  # type: ignore[arg-type]
        key = pacer.next(now)
        if key is not None:
            pacer.resent(now)
            send(key)
    return executed, now


@settings(max_examples=150, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 2.0, 5.0, 20.0, 100.0]),
    subscriptions=st.integers(1, 100),
    app=st.lists(st.tuples(st.floats(0.0, 30.0), st.integers(0, 99)), max_size=200),
)
def test_a_reconnect_at_the_limit_and_an_app_sending_on_are_never_closed(rate, subscriptions, app):
    """The most a gateway lets a client send at once (a subscribe and an activity for each of
    --max-subscriptions projects, twice the burst's worth at the smallest burst it starts with)
    and then frames of the application at any times (activity, coalesced by key): refusals
    paced on the gateway's retry_after_ms never reach the close, and every frame is executed in
    the end."""
    burst = 2 * subscriptions
    limit = FrameRateLimit(rate=rate, burst=burst)
    pacer = FramePacer()
    produce = [(t, f"activity:{p % subscriptions}") for t, p in app]
    executed, _ = run_against_bucket(limit, pacer, 2 * burst, produce)
    assert executed >= {f"f{n}" for n in range(2 * burst)} | {key for _, key in produce}


def test_without_retry_after_ms_the_pacer_s_own_delays_never_reach_the_close():
    """An old gateway (no retry_after_ms): the pacer waits its own delay (max(fallback,
    spacing)), and the doubling spacing finds the rate (of at least a frame a second: the
    fallback delay; gateways limit to 20 by default)."""
    for rate in (1.0, 2.0, 20.0):
        limit = FrameRateLimit(rate=rate, burst=20)
        bucket = Bucket()
        pacer = FramePacer(spacing=0.1, max_spacing=30.0, fallback_delay=1.0)
        now, executed = 0.0, 0
        for n in range(40):
            if limit.take(bucket, now) == ALLOWED:
                executed += 1
            else:
                pacer.refused(now, None)
                pacer.hold(n, n)
        while pacer.held:
            now = max(now, pacer.due_at())
            if pacer.next(now) is not None:
                pacer.resent(now)
                verdict = limit.take(bucket, now)
                assert verdict != CLOSE
                if verdict == ALLOWED:
                    executed += 1
                else:
                    pacer.refused(now, None)
                    pacer.hold(now, now)
        assert executed == 40


def test_the_pacer_s_rules():
    pacer = FramePacer(spacing=0.1, max_spacing=1.0, fallback_delay=0.7)
    assert pacer.may_send_now(0.0)
    for _ in range(5):
        pacer.refused(0.0, 50)  # a burst refused together: the spacing stays
    assert pacer.spacing == 0.1 and not pacer.may_send_now(0.049)
    for key in "abc":
        pacer.hold(key, key)
    pacer.hold("a", "a2")  # keeps its place, takes the new item
    assert not pacer.may_send_now(100.0), "held frames go first"
    assert pacer.next(0.049) is None
    assert pacer.next(0.05) == "a2"
    pacer.resent(0.05)
    assert pacer.next(0.149) is None and pacer.next(0.151) == "b"
    pacer.resent(0.151)
    pacer.refused(0.16, 30)  # a resend refused: slower
    assert pacer.spacing == 0.2
    assert pacer.due_at() == pytest.approx(0.251)
    assert pacer.next(0.251) == "c"
    pacer.resent(0.251)
    assert pacer.held == 0 and pacer.spacing == 0.1, "all sent: the spacing starts over"
    pacer.refused(1.0, None)  # an old gateway: a delay of its own
    assert pacer.not_before == pytest.approx(1.7)
    pacer.refused(1.0, 10**12)  # a hostile one: bounded
    assert pacer.not_before == pytest.approx(2.0)
    for bad in (-5, float("nan"), "9", True):
        fresh = FramePacer(spacing=0.1, fallback_delay=0.7)
        fresh.refused(0.0, bad)  # type: ignore[arg-type]
        assert fresh.not_before == pytest.approx(0.7), bad
    pacer.drop("nothing")
    pacer.reset()
    assert pacer.may_send_now(0.0) and pacer.held == 0 and pacer.due_at() is None
    with pytest.raises(ValueError):
        FramePacer(spacing=0)


# --- end to end: eventbus.js in node -------------------------------------------------------------

NODE_CLIENT = r"""
import { connect } from "CLIENT_URL";
const cfg = JSON.parse(process.env.EB_CONFIG);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const until = async (condition, ms) => {
  const end = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > end) return false;
    await sleep(20);
  }
  return true;
};
const say = (message) => console.log(JSON.stringify(message));
const seqs = {};
const errors = [];
const bus = connect({
  url: cfg.url,
  token: cfg.token,
  WebSocket,
  onError: (error) =>
    errors.push(error.code === "closed" ? `closed ${error.closeCode}` : error.code),
});
for (const p of cfg.projects) {
  seqs[p] = [];
  bus.subscribe(p, (event) => seqs[p].push(event.seq));
  bus.presence(p, () => {});
}
await until(() => bus.state === "live" && cfg.projects.every((p) => bus.cursor(p) !== null), 15000);
say({ step: "subscribed" });
// An application calling activity() on every mouse move (60/s) in every project.
let n = 0;
const end = Date.now() + cfg.hammerMs;
while (Date.now() < end) {
  n += 1;
  for (const p of cfg.projects) bus.activity(p, { viewing: n });
  await sleep(16);
}
const mine = (p) => (bus.members(p) || []).find((member) => member.id === cfg.subject);
const done = () =>
  cfg.projects.every((p) => seqs[p].length >= cfg.events && mine(p) && mine(p).viewing === n);
await until(() => done() || errors.some((e) => e.startsWith("closed")), cfg.waitMs);
const viewing = cfg.projects.map((p) => (mine(p) || {}).viewing ?? null);
say({ step: "done", seqs, errors, last: n, viewing });
bus.close();
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_eventbus_js_with_many_projects_and_hammered_activity_is_never_closed(
    gateways, publisher, tmp_path
):
    """eventbus.js (in node, on its WebSocket) against a gateway limited to 2 frames/s, bursts of
    20 (--max-subscriptions 10): ten projects with presence, and activity() called 60 times a
    second in each for 3 s while events are published. Before: every call was a frame, refused
    ones were answered with a resubscribe of the project, and the connection was closed with 4029
    within a second or two. Now: activity goes out at most once a second per project, refused
    frames are held and resent paced from the gateway's retry_after_ms: never closed, every
    project's events exactly once and in order, and the gateway ends with the latest activity of
    every project."""
    gateway = await gateways(client_rate=2, client_burst=20, max_subscriptions=10)
    projects = list(range(1, 11))
    config = {
        "url": ws_url(gateway),
        "token": issue_token(SECRET, "*", ttl=300, subject="u-1"),
        "subject": "u-1",
        "projects": projects,
        "hammerMs": 3000,
        "events": 5,
        "waitMs": 30000,
    }
    script = tmp_path / "client.mjs"
    client_url = "file://" + os.path.join(ROOT, "gateway", "static", "eventbus.js")
    script.write_text(NODE_CLIENT.replace("CLIENT_URL", client_url))
    node = await asyncio.create_subprocess_exec(
        "node",
        "--experimental-websocket",
        "--no-warnings",
        str(script),
        env={**os.environ, "EB_CONFIG": json.dumps(config)},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(node.stdout.readline(), 20)
        assert json.loads(line) == {"step": "subscribed"}
        for project_id in projects:
            await publish(publisher, project_id, config["events"])
        line = await asyncio.wait_for(node.stdout.readline(), 60)
        result = json.loads(line)
        await asyncio.wait_for(node.wait(), 10)
    finally:
        if node.returncode is None:
            node.kill()
            await node.wait()
    assert not [e for e in result["errors"] if e.startswith("closed")], result["errors"]
    assert gateway.metrics.rate_limit_disconnects_total == 0
    assert result["seqs"] == {str(p): [1, 2, 3, 4, 5] for p in projects}
    assert result["viewing"] == [result["last"]] * len(projects), "the latest activity everywhere"
    assert gateway.metrics.client_frames_rate_limited_total > 0, "the limit was reached"


# --- end to end: the Python consumer -------------------------------------------------------------


async def test_the_consumer_with_projects_refused_together_is_never_closed(gateways, publisher):
    """The consumer against a gateway limited to 2 frames/s, bursts of 20 (--max-subscriptions
    10): its bucket is empty (as after a burst) when it follows 9 more projects at once, all
    refused. Before: each project retried on its own backoff, the same for all of them (they
    were refused together), so the retries came together and were refused again, and the
    connection was closed with 4029 within a few seconds. Now: held and sent again paced from
    the gateway's retry_after_ms, every project follows on the same connection, each event
    exactly once and in order."""
    from consumer import Consumer, Delivery, ReconnectPolicy

    gateway = await gateways(client_rate=2, client_burst=20, max_subscriptions=10)
    token = issue_token(SECRET, "*", ttl=300)
    policy = ReconnectPolicy(initial=0.25, max=5.0, prompt_max=0.1)
    consumer = Consumer(ws_url(gateway), token=token, reconnect=policy, random=lambda: 0.5)
    async with consumer:
        first = consumer.events(1)
        await asyncio.wait_for(first.wait_subscribed(), 10)
        (session,) = gateway.sessions
        session.rate_tokens, session.rate_stamp = 0.0, gateway.clients.clock()
        others = consumer.events(*range(2, 11))
        await asyncio.wait_for(others.wait_subscribed(), 30)
        assert consumer.close_codes == [], "the connection never ended"
        assert consumer.stats.rate_limited >= 9
        for project_id in range(2, 11):
            await publish(publisher, project_id, 2)
        items = [await asyncio.wait_for(anext(others), 10) for _ in range(18)]
        assert consumer.connects == 1
    assert all(isinstance(item, Delivery) for item in items)
    received: dict[int, list[int]] = {}
    for item in items:
        received.setdefault(item.project_id, []).append(item.seq)
    assert received == {project_id: [1, 2] for project_id in range(2, 11)}
    assert CloseCode.TOO_MANY_REQUESTS not in consumer.close_codes
    assert gateway.metrics.rate_limit_disconnects_total == 0
