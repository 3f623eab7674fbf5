"""eventbus.js end to end under churn: the browser client against a real gateway process whose
connections are cut and which is restarted (drained with SIGTERM, started again on the same port)
while a publisher publishes, with the client's own reconnect, fallback and resume logic.

What the application's subscribe callback receives is compared, entry by entry, with what was
published: every event exactly once and in order, or an explicit resync (onResync) that says
where delivery continues; never silence, a duplicate, or an event out of order.

The client runs in chromium (the browser tests' Debian chromium through Playwright, as the unit
tests of ``eventbus_unit.js`` do: the test environment installs it, not Node), so the WebSocket,
fetch and timers are a real browser's. Its connections go through ``CuttingProxy``, which resets
them (an RST, the abrupt loss a browser sees as 1006) and forwards to the gateway's port across
its restarts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from playwright.sync_api import Browser, Page

from publisher import Publisher, issue_token
from tests.browser.conftest import SECRET, GatewayProcess
from tests.browser.driver_page import driver_page, served_driver
from tests.support.tcp_proxy import CuttingProxy

pytestmark = pytest.mark.browser

#: One connection follows three projects; the events are published to each in turn.
PROJECTS = (7, 8, 9)
EVENTS = 1200
#: Between two publishes: the events keep coming while connections drop and the gateway restarts.
PUBLISH_INTERVAL = 0.004


@pytest.fixture
def proxy(gateway: GatewayProcess) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy("127.0.0.1", gateway.port)
    yield proxy
    proxy.close()


@pytest.fixture
def page_server() -> Iterator[str]:
    with served_driver("churn") as url:
        yield url


@pytest.fixture
def churn_page(browser: Browser, page_server: str) -> Iterator[Page]:
    with driver_page(browser, page_server, "churn") as page:
        yield page


class PacedPublisher(threading.Thread):
    """Publishes ``count`` events through the Python publisher, one every ``interval`` seconds,
    to each project in turn, each a blocker_resolved whose blocker_id is its publish number."""

    def __init__(self, redis_url: str, count: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.publisher = Publisher.from_url(redis_url)
        self.count = count
        self.interval = interval
        self.published: list[tuple[int, str, int, int]] = []  # (project, epoch, seq, blocker_id)
        self.error: BaseException | None = None
        self._changed = threading.Condition()

    def run(self) -> None:
        try:
            for number in range(1, self.count + 1):
                project = PROJECTS[(number - 1) % len(PROJECTS)]
                cursor = self.publisher.blocker_resolved(
                    project, blocker_id=number, answer=f"answer {number}"
                )
                with self._changed:
                    self.published.append((project, cursor.epoch, cursor.seq, number))
                    self._changed.notify_all()
                time.sleep(self.interval)
        except BaseException as error:  # reported by wait_published and the test
            self.error = error
        finally:
            with self._changed:
                self._changed.notify_all()

    def wait_published(self, count: int, timeout: float = 60.0) -> None:
        with self._changed:
            done = self._changed.wait_for(
                lambda: (
                    len(self.published) >= count or self.error is not None or not self.is_alive()
                ),
                timeout,
            )
        if self.error is not None:
            raise self.error
        assert done and len(self.published) >= count, f"published {len(self.published)} of {count}"


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.005)


def check_delivery(log: list[dict], published: list[tuple[int, str, int, int]]) -> dict:
    """Every entry of the application's log in place, project by project: events one after
    another from the cursor of the last resync (exactly the event published at that epoch and
    seq), up to the last one published. Returns the resyncs of each project."""
    return {
        project: check_project(
            [entry for entry in log if entry["project"] == project],
            [(e, seq, number) for p, e, seq, number in published if p == project],
        )
        for project in PROJECTS
    }


def check_project(log: list[dict], published: list[tuple[str, int, int]]) -> list[dict]:
    by_cursor = {(epoch, seq): number for epoch, seq, number in published}
    epochs = list(dict.fromkeys(epoch for epoch, _, _ in published))
    for name in epochs:  # (the publisher's side: each history from seq 1, without a gap)
        seqs = [seq for epoch, seq, _ in published if epoch == name]
        assert seqs == list(range(1, len(seqs) + 1)), f"epoch {name}: {seqs[:5]}..."
    resyncs = []
    epoch = expected = None
    for index, entry in enumerate(log):
        if "resync" in entry:
            cursor = entry["resync"]
            assert cursor is not None and cursor["epoch"] in epochs, f"entry {index}: {entry}"
            resyncs.append(cursor)
            epoch, expected = cursor["epoch"], cursor["seq"] + 1
            continue
        assert expected is not None, f"entry {index}: an event before the first onResync: {entry}"
        assert entry["seq"] == expected, (
            f"entry {index}: seq {entry['seq']} where {expected} was due "
            f"({'a duplicate' if entry['seq'] < expected else 'a gap'}); "
            f"around it: {log[max(0, index - 3) : index + 3]}"
        )
        assert entry["id"] == by_cursor.get((epoch, entry["seq"])), (
            f"entry {index}: not the event published at {epoch}:{entry['seq']}"
        )
        expected += 1
    last_epoch, last_seq, _ = published[-1]
    assert (epoch, expected - 1) == (last_epoch, last_seq), "delivery stopped short"
    return resyncs


class Churn:
    """The client in the page, the blows a test deals it, and the wait for its end."""

    def __init__(
        self, page: Page, gateway: GatewayProcess, proxy: CuttingProxy, transport: str
    ) -> None:
        self.page = page
        #: The state of a client that receives events: "live", or "polling" for polling.
        self.up = "polling" if transport == "polling" else "live"
        self.gateway = gateway
        self.proxy = proxy
        self.cuts = 0
        #: How many states the client had recorded at the last blow (see wait_live); None
        #: before the first blow.
        self._blow: int | None = None
        token = issue_token(SECRET, projects=list(PROJECTS), subject="churn")
        page.evaluate(
            "(options) => window.driver.start(options)",
            {
                "url": f"ws://127.0.0.1:{proxy.port}/",
                "httpUrl": f"http://127.0.0.1:{proxy.port}",
                "token": token,
                "projectIds": list(PROJECTS),
                # Shorter than the default (1 s .. 30 s), so that the churn fits in seconds.
                "backoff": {"initial": 200, "max": 2000},
                # sse: WebSocket configured off, events over Server-Sent Events (resumed with
                # Last-Event-ID), polling while SSE cannot connect.
                "websocket": transport == "websocket",
                # A connection that stops answering is given up after about 2 s (defaults: 35 s
                # for a WebSocket, 45 s for an SSE stream; the gateway's SSE comments come
                # every 15 s, so a quiet stream is reopened every 1.5 s once the events stop:
                # harmless).
                "pingInterval": 1000,
                "pongTimeout": 1000,
                "sseIdleTimeout": 1500,
                # polling: neither WebSocket nor SSE, a poll every 200 ms (default: 10 s),
                # abandoned after 1.5 s unanswered (default: 30 s).
                "sse": transport != "polling",
                "pollInterval": 200,
                "pollTimeout": 1500,
            },
        )
        # Subscribed (its first onResync, at seq 0) before the first publish: every event is due.
        page.wait_for_function(
            "(ids) => ids.every((id) => window.churn.bus.cursor(id) !== null)", arg=list(PROJECTS)
        )

    def wait_live(self) -> None:
        """Each blow lands on a live connection (WebSocket or SSE), not on one already down: one
        that went live since the last blow. ``bus.state`` alone is not enough: on a loaded
        machine the browser may not have read the last blow's reset yet, and its state is still
        the live of the connection that blow ended (the next blow then strikes nothing: one live
        fewer than blows). A live since the blow is a state recorded after it: "live" again
        after "reconnecting", or over another transport (an SSE stream's client, live again on
        a WebSocket opened meanwhile, need not pass through "reconnecting")."""
        self.page.wait_for_function(
            """([up, blow]) => {
              if (window.churn.bus.state !== up) return false;
              // (polling: no connection to be live on; a cut between two polls goes unnoticed)
              if (blow === null || up === "polling") return true;
              return window.churn.states.slice(blow).some((state) => state.startsWith(up + "/"));
            }""",
            arg=[self.up, self._blow],
            timeout=20_000,
        )

    def _state(self) -> tuple[int, bool]:
        return tuple(
            self.page.evaluate(
                "(up) => [window.churn.states.length, window.churn.bus.state === up]", self.up
            )
        )

    def strike(self, blow: Callable[[], int | None]):
        """Deal ``blow`` (it ends or freezes the connection the client is on, or the gateway),
        noting how many states the client had recorded: the next blow waits for a live one
        after them. A connection that went live between that look and the blow (not live
        before, live after) is the one struck: its live, recorded meanwhile, does not count."""
        at, live = self._state()
        result = blow()
        after, live_after = self._state()
        self._blow = after if live_after and not live else at
        return result

    def cut(self) -> None:
        deadline = time.monotonic() + 20
        self.wait_live()
        # Nothing to cut: the state is still the live of a connection cut a moment ago (its
        # reset not read yet); wait for the next one.
        while self.strike(self.proxy.cut) == 0:
            assert time.monotonic() < deadline, "live for 20 s without a connection"
            time.sleep(0.01)
            self.wait_live()
        self.cuts += 1

    def cut_after(self, forwarded: int) -> None:
        """Cut the client's first connection forwarded after ``forwarded`` as soon as it reaches
        the gateway (in its handshake, its subscribe or the replay of its resume)."""
        wait_until(lambda: self.proxy.forwarded > forwarded, "the client's next connection")
        self.strike(self.proxy.cut)

    def cut_next_connection(self) -> None:
        forwarded = self.proxy.forwarded
        self.cut()
        self.cut_after(forwarded)

    def freeze(self) -> None:
        """Make the live connection half-open (nothing forwarded either way, nothing closed):
        the client must notice on its own (its ping unanswered) and resume on a new one."""
        self.wait_live()
        forwarded = self.proxy.forwarded
        while self.strike(self.proxy.freeze) == 0:  # (as in cut())
            time.sleep(0.01)
            self.wait_live()
        wait_until(lambda: self.proxy.forwarded > forwarded, "a connection after the half-open one")

    def restart(self) -> int:
        """Returns the connections forwarded before the new gateway was started."""
        self.wait_live()
        self.strike(self.gateway.terminate)  # drained: its clients are closed with 1012
        forwarded = self.proxy.forwarded  # later ones reach the new gateway
        self.gateway.start()
        return forwarded

    def kill_and_start(self) -> None:
        """SIGKILL (no drain: the connections reset by the kernel), then start again."""
        self.wait_live()
        self.strike(self.gateway.kill)
        self.gateway.start()

    def restart_and_cut(self) -> None:
        self.cut_after(self.restart())

    def run(self, publisher: PacedPublisher, schedule: list[tuple[int, Callable[[], None]]]):
        """Publish, dealing each blow once ``threshold`` events are published; then wait for
        the application to be at the last event published. Returns the log and the states."""
        publisher.start()
        try:
            for threshold, action in schedule:
                publisher.wait_published(threshold)
                action()
            publisher.wait_published(publisher.count)
        finally:
            publisher.join(60)
        assert publisher.error is None, publisher.error
        ends = {str(p): [epoch, seq] for p, epoch, seq, _ in publisher.published}
        try:
            self.page.wait_for_function("(ends) => window.churn.at(ends)", arg=ends, timeout=30_000)
        except Exception:
            state = self.page.evaluate(
                """(ids) => ({
                  cursors: ids.map((id) => window.churn.bus.cursor(id)),
                  states: window.churn.states.slice(-20),
                  errors: window.churn.errors.slice(-20),
                  tail: window.churn.log.slice(-5),
                })""",
                list(PROJECTS),
            )
            pytest.fail(
                f"the application stopped short of {ends}: {state}\n"
                f"gateway log:\n{self.gateway.log_tail()}",
                pytrace=False,
            )
        assert self.page.problems == []  # type: ignore[attr-defined]
        return self.page.evaluate("window.churn.log"), self.page.evaluate("window.churn.states")


@pytest.mark.parametrize("transport", ["websocket", "sse", "polling"])
def test_every_event_exactly_once_in_order_through_cuts_and_gateway_restarts(
    churn_page: Page, gateway: GatewayProcess, proxy: CuttingProxy, redis_url: str, transport: str
) -> None:
    churn = Churn(churn_page, gateway, proxy, transport)
    publisher = PacedPublisher(redis_url, EVENTS, PUBLISH_INTERVAL)
    schedule = [
        (100, churn.cut),
        (200, churn.cut_next_connection),
        (350, churn.restart),
        (450, churn.cut_next_connection),
        (520, churn.kill_and_start),
        (600, churn.restart_and_cut),
        (700, churn.freeze),
        (800, churn.cut),
        (950, churn.cut_next_connection),
        (1100, churn.cut),
    ]
    log, states = churn.run(publisher, schedule)
    resyncs = check_delivery(log, publisher.published)
    # The churn happened: every blow of the schedule landed on a live connection (each waited
    # for one), so the client went live again before each (the second cut of a pair lands on
    # the next connection before it is live, and the end of the run need not be live). A
    # polling client's connection may be cut between two polls, which it need not notice.
    assert churn.cuts == 6, churn.cuts
    if transport != "polling":
        lives = sum(state.startswith("live/") for state in states)
        assert lives >= len(schedule), f"{lives} lives for {len(schedule)} blows: {states}"
    # The whole history stays in Redis: every resume is honoured, so the only reload of each
    # project is its first subscribe's, and every event reaches the callback.
    first = {p: epoch for p, epoch, _, _ in reversed(publisher.published)}
    assert resyncs == {p: [{"epoch": first[p], "seq": 0}] for p in PROJECTS}, resyncs


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_a_history_lost_mid_stream_is_one_explicit_resync_then_exactly_once_again(
    churn_page: Page, gateway: GatewayProcess, proxy: CuttingProxy, redis_url: str, transport: str
) -> None:
    """Redis emptied (FLUSHALL) while events are published and connections cut: the events
    not yet delivered are gone, and the client says so with one onResync at the new history's
    cursor, then delivers the new history's events exactly once, in order, through more cuts
    and a gateway restart."""
    churn = Churn(churn_page, gateway, proxy, transport)
    publisher = PacedPublisher(redis_url, 900, PUBLISH_INTERVAL)

    def flush() -> None:
        client = redis.Redis.from_url(redis_url)
        try:
            client.flushall()
        finally:
            client.close()

    schedule = [
        (100, churn.cut),
        (250, flush),
        (400, churn.cut_next_connection),
        (550, churn.restart),
        (700, churn.cut),
    ]
    log, _ = churn.run(publisher, schedule)
    resyncs = check_delivery(log, publisher.published)
    for project in PROJECTS:
        epochs = list(dict.fromkeys(e for p, e, _, _ in publisher.published if p == project))
        assert len(epochs) == 2, epochs
        assert len(resyncs[project]) == 2, resyncs
        assert resyncs[project][0] == {"epoch": epochs[0], "seq": 0}
        assert resyncs[project][1]["epoch"] == epochs[1], resyncs
