"""eventbus.js against a hostile server: the browser client in chromium, its real WebSocket, fetch
and timers, talking to a scripted stand-in for the gateway that each test drives frame by frame
(out of order, duplicated, with a gap, malformed, binary, closed with odd codes, silent, never
upgraded, an SSE stream that stalls mid-event or sends garbage, the browser going offline).

What the page's callbacks see is checked: every event once and in order, or an explicit resync;
no silent gap; a stalled connection replaced within the documented bounds; no uncaught error in
the page; no timer piling up across reconnects.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import websockets
from playwright.sync_api import Browser, Page

from tests.browser.driver_page import DriverServer
from tests.support.redis_server import free_port

pytestmark = pytest.mark.browser

PROJECT = 1
EPOCH = "e1"
#: Fast schedules: a reconnect after 20-40 ms, not 1-30 s.
FAST_BACKOFF = {"initial": 20, "max": 40, "factor": 2, "jitter": 0}


def event(seq: int, project: int = PROJECT) -> dict:
    return {"type": "blocker_resolved", "project_id": project, "blocker_id": seq, "seq": seq}


class Conn:
    """One WebSocket connection to :class:`ScriptedGateway`, driven from the test's thread."""

    def __init__(self, server: ScriptedGateway, ws) -> None:
        self.server = server
        self.ws = ws
        self.frames: queue.Queue = queue.Queue()
        self.done = asyncio.Event()

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.server.loop).result(10)

    def recv(self, timeout: float = 10.0) -> dict:
        """The next frame the client sent (its JSON); ``queue.Empty`` after ``timeout``."""
        return json.loads(self.frames.get(timeout=timeout))

    def expect(self, kind: str, timeout: float = 10.0) -> dict:
        """The next frame of type ``kind`` (pings and others before it are skipped)."""
        while True:
            frame = self.recv(timeout)
            if frame.get("type") == kind:
                return frame

    def send(self, *frames: dict | str | bytes) -> None:
        for frame in frames:
            self._run(self.ws.send(json.dumps(frame) if isinstance(frame, dict) else frame))

    def handshake(
        self, seq: int = 0, *, resumed: bool = False, replay=(), token: str = "t", expires_at=None
    ) -> dict:
        """Answer the auth and the project's subscribe: `authenticated`, the replay, `subscribed`
        naming ``seq``. Returns the subscribe frame."""
        assert self.expect("auth")["token"] == token
        self.send(
            {"type": "authenticated", "subject": None, "projects": None, "expires_at": expires_at}
        )
        subscribe = self.expect("subscribe")
        self.send(*(event(s) for s in replay))
        self.send(
            {
                "type": "subscribed",
                "project_id": PROJECT,
                "epoch": EPOCH,
                "seq": seq,
                "resumed": resumed,
                "replayed": len(replay),
            }
        )
        return subscribe

    def close(self, code: int = 1000, reason: str = "") -> None:
        self._run(self.ws.close(code, reason))

    def abort(self) -> None:
        """Drop the TCP connection without a close frame: the browser sees 1006."""
        self.server.loop.call_soon_threadsafe(self.ws.transport.abort)


class ScriptedGateway:
    """A websockets server in a thread of its own; each connection becomes a :class:`Conn`
    (``next_conn()``), which the test answers frame by frame. No automatic pings."""

    def __init__(self) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.conns: queue.Queue[Conn] = queue.Queue()
        self.count = 0
        self.auto_pong = False  # answer the client's pings (else: never)
        started = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(started,), daemon=True)
        self.thread.start()
        started.wait(10)

    def _main(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def serve() -> None:
            self.server = await websockets.serve(
                self._handler, "127.0.0.1", self.port, ping_interval=None, max_size=None
            )
            started.set()

        self.loop.run_until_complete(serve())
        self.loop.run_forever()

    async def _handler(self, ws) -> None:
        conn = Conn(self, ws)
        self.count += 1
        self.conns.put(conn)
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in ws:
                conn.frames.put(message)
                if self.auto_pong and json.loads(message).get("type") == "ping":
                    await ws.send(json.dumps({"type": "pong"}))

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def next_conn(self, timeout: float = 10.0) -> Conn:
        return self.conns.get(timeout=timeout)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class PageServer(DriverServer):
    """Serves the driver page (same origin as the SSE endpoint) and, when a test sets
    ``self.stream``, answers ``GET /v1/projects/<id>/stream`` by calling it with the request
    handler (which writes whatever it likes); ``self.poll`` likewise answers ``.../events``.
    Other /v1 paths: 404. Every /v1 request is put on ``requests`` (path, headers)."""

    def __init__(self) -> None:
        self.stream: Callable | None = None
        self.poll: Callable | None = None
        self.requests: queue.Queue = queue.Queue()
        super().__init__("hostile", api=self._api)

    def _api(self, handler: http.server.BaseHTTPRequestHandler) -> bool:
        if not handler.path.startswith("/v1/"):
            return False
        self.requests.put((handler.path, dict(handler.headers)))
        if "/stream" in handler.path and self.stream is not None:
            self.stream(handler)
        elif "/events" in handler.path and self.poll is not None:
            self.poll(handler)
        else:
            body = b'{"error":"not_found","message":"no"}'
            handler.send_response(404)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        return True


@pytest.fixture
def gw() -> Iterator[ScriptedGateway]:
    server = ScriptedGateway()
    yield server
    server.close()


@pytest.fixture
def site() -> Iterator[PageServer]:
    server = PageServer()
    yield server
    server.close()


@pytest.fixture
def page(browser: Browser, site: PageServer) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    page.problems = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda error: page.problems.append(str(error)))  # type: ignore[attr-defined]
    page.goto(f"{site.url}/hostile/")
    page.wait_for_function("window.driverReady === true")
    yield page
    context.close()


def start(page: Page, gw: ScriptedGateway, site: PageServer, **options) -> None:
    args = {
        "url": options.pop("url", gw.url),
        "httpUrl": site.url,
        "token": options.pop("token", "t"),
        "projectIds": [PROJECT],
        "backoff": FAST_BACKOFF,
        "options": {},
    }
    for key in ("websocket", "sse", "pingInterval", "pongTimeout", "sseIdleTimeout"):
        if key in options:
            args[key] = options.pop(key)
    args["options"] = options
    page.evaluate("(args) => window.driver.start(args)", args)


def delivered(page: Page) -> list:
    """What the application saw: event seqs, and ('resync', seq) for each onResync."""
    return [
        ("resync", entry["resync"]["seq"] if entry["resync"] else None)
        if "resync" in entry
        else entry["seq"]
        for entry in page.evaluate("window.churn.log")
    ]


def wait_delivered(page: Page, count: int) -> list:
    page.wait_for_function(f"window.churn.log.length >= {count}")
    return delivered(page)


def errors(page: Page) -> list[str]:
    return page.evaluate("window.churn.errors")


def live(page: Page, gw: ScriptedGateway, site: PageServer, **options) -> Conn:
    """Started, connected, the first subscribe answered (top 0) and its reload done."""
    start(page, gw, site, **options)
    conn = gw.next_conn()
    conn.handshake(0)
    wait_delivered(page, 1)
    return conn


# --- ordering -------------------------------------------------------------------------------


def test_duplicates_out_of_order_and_a_gap_are_each_event_once_in_order(
    page: Page, gw: ScriptedGateway, site: PageServer
) -> None:
    conn = live(page, gw, site)
    conn.send(event(1), event(2), event(2), event(1), event(4), event(3))
    # 4 came past a gap: the client asks again from its cursor rather than skip 3.
    repair = conn.expect("subscribe")
    assert (repair["epoch"], repair["after"]) == (EPOCH, 2)
    conn.send(event(3), event(4))
    conn.send(
        {
            "type": "subscribed",
            "project_id": PROJECT,
            "epoch": EPOCH,
            "seq": 4,
            "resumed": True,
            "replayed": 2,
        }
    )
    conn.send(event(5))
    assert wait_delivered(page, 6) == [("resync", 0), 1, 2, 3, 4, 5]
    assert page.problems == []  # type: ignore[attr-defined]


def subscribed(seq: int, *, resumed: bool = True, replayed: int = 0) -> dict:
    return {
        "type": "subscribed",
        "project_id": PROJECT,
        "epoch": EPOCH,
        "seq": seq,
        "resumed": resumed,
        "replayed": replayed,
    }


def test_garbage_frames_are_reported_and_a_lost_event_is_asked_for_again(
    page: Page, gw: ScriptedGateway, site: PageServer
) -> None:
    """Not JSON, JSON that is no object, a binary frame (here holding event 2: a browser hands it
    over as a Blob), a frame of an unknown type, a huge one: reported or ignored, never thrown;
    the event the binary frame held is not skipped: event 3 shows the gap, which is repaired."""
    conn = live(page, gw, site)
    huge = {**event(1), "answer": "x" * (3 * 1024 * 1024)}
    conn.send(huge, "{not json", "[1, 2]", "null", json.dumps(event(2)).encode())
    conn.send({"type": "mystery", "project_id": PROJECT}, {"type": "mystery"}, event(3))
    repair = conn.expect("subscribe")
    assert repair["after"] == 1
    conn.send(event(2), event(3), subscribed(3, replayed=2), event(4))
    assert wait_delivered(page, 5) == [("resync", 0), 1, 2, 3, 4]
    assert [e for e in errors(page) if e.startswith("invalid_frame")] == [
        "invalid_frame: gateway sent a frame that is not JSON",
        "invalid_frame: gateway sent a frame that is not JSON",
    ]
    assert page.problems == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "close",
    [
        pytest.param(lambda conn: conn.close(1000), id="1000-no-reason"),
        pytest.param(lambda conn: conn.close(1011, "internal"), id="1011"),
        pytest.param(lambda conn: conn.close(4567, "made up"), id="4567-unlisted"),
        pytest.param(lambda conn: conn.close(1001), id="1001"),
        pytest.param(lambda conn: conn.abort(), id="1006-tcp-dropped"),
    ],
)
def test_any_close_reconnects_and_resumes_from_the_cursor_with_its_tag(
    page: Page, gw: ScriptedGateway, site: PageServer, close
) -> None:
    conn = live(page, gw, site)
    conn.send(event(1), event(2))
    wait_delivered(page, 3)
    close(conn)
    again = gw.next_conn()
    resume = again.handshake(3, resumed=True, replay=[2, 3])  # 2 again: the replay overlaps
    assert (resume["epoch"], resume["after"]) == (EPOCH, 2)
    assert len(resume["tag"]) == 16
    again.send(event(4))
    assert wait_delivered(page, 5) == [("resync", 0), 1, 2, 3, 4]
    assert not [e for e in errors(page) if e.startswith("closed")]
    assert page.problems == []  # type: ignore[attr-defined]


def test_a_gateway_that_never_answers_pings_is_replaced(
    page: Page, gw: ScriptedGateway, site: PageServer
) -> None:
    conn = live(page, gw, site, pingInterval=200, pongTimeout=200)
    conn.send(event(1))
    assert conn.expect("ping")  # then silence
    again = gw.next_conn()
    assert again.handshake(1, resumed=True)["after"] == 1
    again.send(event(2))
    assert wait_delivered(page, 3) == [("resync", 0), 1, 2]
    assert page.problems == []  # type: ignore[attr-defined]


def test_a_connection_that_never_completes_the_upgrade_is_given_up(
    page: Page, gw: ScriptedGateway, site: PageServer
) -> None:
    """TCP accepted, the HTTP upgrade never answered: connectTimeout ends it, the client tries
    again (and meanwhile the fallbacks, refused here)."""
    hold = socket.create_server(("127.0.0.1", 0))
    try:
        port = hold.getsockname()[1]
        start(page, gw, site, connectTimeout=1000, url=f"ws://127.0.0.1:{port}/")
        first, _ = hold.accept()  # the first attempt: never answered
        hold.settimeout(10)
        held2, _ = hold.accept()  # given up on, and tried again
        page.wait_for_function("window.churn.errors.some((e) => e.startsWith('sse_http_404'))")
        page.evaluate(f"window.churn.bus.url = '{gw.url}'")
        held2.close()
        first.close()
        conn = gw.next_conn()
        conn.handshake(0)
        conn.send(event(1))
        assert wait_delivered(page, 2) == [("resync", 0), 1]
        assert page.evaluate("window.churn.bus.state") == "live"
    finally:
        hold.close()
    assert page.problems == []  # type: ignore[attr-defined]


# --- timers --------------------------------------------------------------------------------

#: Installed before connect(): the page's pending timers (set, neither fired nor cleared), and
#: every delay asked for. eventbus.js takes the page's setTimeout when it is constructed.
TIMER_PROBE = """() => {
  const set = window.setTimeout.bind(window);
  const clear = window.clearTimeout.bind(window);
  window.pendingTimers = new Set();
  window.timerDelays = [];
  window.setTimeout = (fn, ms, ...args) => {
    window.timerDelays.push(ms);
    const id = set(() => { window.pendingTimers.delete(id); fn(...args); }, ms);
    window.pendingTimers.add(id);
    return id;
  };
  window.clearTimeout = (id) => { window.pendingTimers.delete(id); clear(id); };
}"""


def test_many_reconnects_leave_no_timer_behind(
    page: Page, gw: ScriptedGateway, site: PageServer
) -> None:
    page.evaluate(TIMER_PROBE)
    conn = live(page, gw, site)
    baseline = page.evaluate("window.pendingTimers.size")
    closes = [
        lambda c: c.close(1000),
        lambda c: c.close(1011),
        lambda c: c.close(1012),
        lambda c: c.close(4008),
        lambda c: c.abort(),
        lambda c: c.send({"type": "error", "code": "unavailable", "project_id": PROJECT}),
    ]
    for cycle in range(60):
        conn.send(event(cycle + 1))
        closes[cycle % len(closes)](conn)
        if cycle % len(closes) == len(closes) - 1:
            conn.expect("subscribe")  # the retry of the unavailable subscribe, then a drop
            conn.abort()
        conn = gw.next_conn()
        conn.handshake(cycle + 1, resumed=True)
    conn.send(event(61))
    assert wait_delivered(page, 62) == [("resync", 0), *range(1, 62)]
    page.wait_for_function("window.churn.bus.state === 'live'")
    assert page.evaluate("window.pendingTimers.size") <= baseline
    assert page.problems == []  # type: ignore[attr-defined]


def jwt(lifetime: int) -> str:
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {"iat": now, "exp": now + lifetime, "projects": [1]}
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.sig"


def test_a_token_living_longer_than_a_timer_can_wait_is_not_refreshed_at_once(
    page: Page, gw: ScriptedGateway, site: PageServer
) -> None:
    """A token of 30 days: a minute before its expiry is further away than setTimeout can wait
    (2^31 - 1 ms, 24.8 days); a longer delay is taken as 0 by browsers."""
    page.evaluate(TIMER_PROBE)
    token = jwt(30 * 86400)
    start(page, gw, site, token=token)
    conn = gw.next_conn()
    conn.handshake(0, token=token, expires_at=None)
    conn.send(event(1))
    assert wait_delivered(page, 2) == [("resync", 0), 1]
    assert max(page.evaluate("window.timerDelays")) <= 2**31 - 1
    with pytest.raises(queue.Empty):
        conn.expect("auth", timeout=1.0)  # no refresh storm


# --- Server-Sent Events ------------------------------------------------------------------------


class Streams:
    """The SSE streams the page opens (``site.stream``): each request is handed to the next
    script of ``scripts`` (called with a writer, the request's headers); a script that returns
    ends its response, one that waits on ``self.release`` holds it open."""

    def __init__(self, site: PageServer, *scripts: Callable) -> None:
        self.scripts = list(scripts)
        self.release = threading.Event()
        self.opened: queue.Queue = queue.Queue()
        self.paths: list[str] = []  # each request's path, in order
        site.stream = self._serve

    def _serve(self, handler) -> None:
        headers = dict(handler.headers)
        self.paths.append(handler.path)
        self.opened.put(headers)
        script = self.scripts.pop(0) if self.scripts else (lambda write, headers: self.hold())
        if script is HANG:  # the request is taken, no answer ever comes
            self.hold()
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-store")
        handler.send_header("Connection", "close")
        handler.end_headers()

        def write(text: str) -> None:
            handler.wfile.write(text.encode())
            handler.wfile.flush()

        with contextlib.suppress(OSError):
            script(write, headers)
        handler.close_connection = True

    def hold(self) -> None:
        self.release.wait(30)


#: A script of :class:`Streams`: no response at all (not even its headers).
HANG = object()


def sse(data: dict, name: str | None = None) -> str:
    return (f"event: {name}\n" if name else "") + f"data: {json.dumps(data)}\n\n"


@pytest.fixture
def streams(site: PageServer) -> Iterator[Callable[..., Streams]]:
    made: list[Streams] = []

    def make(*scripts: Callable) -> Streams:
        made.append(Streams(site, *scripts))
        return made[-1]

    yield make
    for each in made:
        each.release.set()


def test_sse_a_token_living_longer_than_a_timer_can_wait_does_not_reopen_the_stream_at_once(
    page: Page, gw: ScriptedGateway, site: PageServer, streams
) -> None:
    page.evaluate(TIMER_PROBE)
    token = jwt(30 * 86400)
    exp = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["exp"]
    stream = streams()

    def first(write, headers) -> None:
        write(
            sse(
                {"type": "authenticated", "subject": None, "projects": None, "expires_at": exp},
                "authenticated",
            )
        )
        write(sse(subscribed(0, resumed=False), "subscribed"))
        write(sse(event(1)))
        stream.hold()

    stream.scripts.append(first)
    start(page, gw, site, token=token, websocket=False)
    assert stream.opened.get(timeout=10)["Authorization"] == f"Bearer {token}"
    assert wait_delivered(page, 2) == [("resync", 0), 1]
    assert max(page.evaluate("window.timerDelays")) <= 2**31 - 1
    with pytest.raises(queue.Empty):
        stream.opened.get(timeout=1.0)  # not reopened (with a new token) at once


@pytest.mark.parametrize("ending", ["stalls", "ends"])
def test_sse_a_stream_that_stops_mid_event_is_replaced_and_resumed_from_the_cursor(
    page: Page, gw: ScriptedGateway, site: PageServer, streams, ending: str
) -> None:
    """Half of event 2's data line, then nothing (a stall: no line for sseIdleTimeout), or the
    response ending there: the half event is not delivered, the next stream resumes after 1."""
    stream = streams()

    def first(write, headers) -> None:
        write("retry: 1000\n\n")
        write(sse(subscribed(0, resumed=False), "subscribed"))
        write(sse(event(1)))
        write(sse(event(2))[:30])
        if ending == "stalls":
            stream.hold()

    def second(write, headers) -> None:
        write(sse(event(2)) + sse(subscribed(2), "subscribed") + sse(event(3)))
        stream.hold()

    stream.scripts += [first, second]
    start(page, gw, site, websocket=False, sseIdleTimeout=500)
    assert "Last-Event-ID" not in stream.opened.get(timeout=10)
    assert stream.opened.get(timeout=10)["Last-Event-ID"].startswith(f"{EPOCH}:1:")
    assert wait_delivered(page, 4) == [("resync", 0), 1, 2, 3]
    assert page.evaluate("[window.churn.bus.state, window.churn.bus.transport]") == ["live", "sse"]
    assert page.problems == []  # type: ignore[attr-defined]


def test_sse_a_failed_presence_read_reopens_the_stream_after_the_backoff_and_presence_comes(
    page: Page, gw: ScriptedGateway, site: PageServer, streams
) -> None:
    """With ?presence=1 the project's presence read fails (`unavailable` after its `subscribed`,
    no `ended`): the stream goes on, and after presence's backoff the client reopens it from the
    cursor; that stream's presence comes. Every event once, one reopen."""
    stream = streams()

    def first(write, headers) -> None:
        write(sse(subscribed(0, resumed=False), "subscribed") + sse(event(1)))
        stream.hold()

    def failing(write, headers) -> None:
        write(sse(subscribed(1), "subscribed"))
        write(
            sse(
                {
                    "type": "error",
                    "code": "unavailable",
                    "message": "presence is unavailable",
                    "project_id": PROJECT,
                },
                "error",
            )
        )
        write(sse(event(2)))
        stream.hold()

    def answering(write, headers) -> None:
        write(sse(subscribed(2), "subscribed"))
        write(
            sse(
                {
                    "type": "presence",
                    "project_id": PROJECT,
                    "members": [
                        {"id": "u1", "name": "U", "viewing": None, "answering": None, "since": 1}
                    ],
                },
                "presence",
            )
        )
        write(sse(event(3)))
        stream.hold()

    stream.scripts += [first, failing, answering]
    start(page, gw, site, websocket=False)
    stream.opened.get(timeout=10)
    assert wait_delivered(page, 2) == [("resync", 0), 1]
    page.evaluate(
        """() => {
          window.seen = [];
          const ids = (members) => members && members.map((m) => m.id);
          window.churn.bus.presence(1, (members) => window.seen.push(ids(members)));
        }"""
    )
    assert stream.opened.get(timeout=10)["Last-Event-ID"].startswith(f"{EPOCH}:1:")
    assert stream.opened.get(timeout=10)["Last-Event-ID"].startswith(f"{EPOCH}:2:")
    assert wait_delivered(page, 4) == [("resync", 0), 1, 2, 3]
    page.wait_for_function("window.seen.length > 0")
    assert page.evaluate("window.seen") == [["u1"]]
    assert [path.endswith("?presence=1") for path in stream.paths] == [False, True, True]
    with pytest.raises(queue.Empty):
        stream.opened.get(timeout=0.5)  # presence came: no more reopens
    assert page.problems == []  # type: ignore[attr-defined]


def test_sse_garbage_lines_are_ignored_or_reported_and_nothing_is_skipped(
    page: Page, gw: ScriptedGateway, site: PageServer, streams
) -> None:
    stream = streams()

    def first(write, headers) -> None:
        write("retry: soon\ngarbage without a colon\n: a comment\nid\n\n")
        write(sse(subscribed(0, resumed=False), "subscribed"))
        write("data: {not json\n\n")
        write("data: [1, 2]\n\ndata: null\n\n")
        write(sse({"type": "x"}, "made-up-event"))
        write(sse(event(1)))
        # No cursor: reported, ignored.
        write(sse({"type": "subscribed", "project_id": PROJECT}, "subscribed"))
        write(sse({**event(2), "seq": "2"}))  # not an event (seq not an integer): lost here
        write("\r\n\r\n\n" + sse(event(3)).replace("\n", "\r\n"))  # shows the gap
        stream.hold()

    def second(write, headers) -> None:
        write(sse(event(2)) + sse(event(3)) + sse(subscribed(3), "subscribed") + sse(event(4)))
        stream.hold()

    stream.scripts += [first, second]
    start(page, gw, site, websocket=False)
    stream.opened.get(timeout=10)
    assert stream.opened.get(timeout=10)["Last-Event-ID"].startswith(f"{EPOCH}:1:")
    assert wait_delivered(page, 5) == [("resync", 0), 1, 2, 3, 4]
    reported = errors(page)
    assert "invalid_frame: gateway sent an SSE event that is not JSON" in reported
    assert any("subscribed without a valid" in e for e in reported)
    assert page.problems == []  # type: ignore[attr-defined]


def test_offline_then_online_resumes_from_the_cursor(
    page: Page, gw: ScriptedGateway, site: PageServer
) -> None:
    conn = live(page, gw, site)
    conn.send(event(1))
    wait_delivered(page, 2)
    page.context.set_offline(True)
    page.wait_for_function("window.churn.bus.state === 'offline'")
    page.context.set_offline(False)
    again = gw.next_conn()
    assert again.handshake(3, resumed=True, replay=[2, 3])["after"] == 1
    again.send(event(4))
    assert wait_delivered(page, 5) == [("resync", 0), 1, 2, 3, 4]
    assert page.evaluate("window.churn.bus.state") == "live"
    assert page.problems == []  # type: ignore[attr-defined]


def test_a_resume_answered_in_another_epoch_without_resync_required_reloads(
    page: Page, gw: ScriptedGateway, site: PageServer
) -> None:
    """The history was recreated (epoch e2, seq 1 again) and the gateway says `resumed` anyway:
    e2's events 1 and 2 are not dropped as duplicates of e1's."""
    conn = live(page, gw, site)
    conn.send(event(1), event(2))
    wait_delivered(page, 3)
    conn.close(1012)
    again = gw.next_conn()
    again.expect("auth")
    again.send({"type": "authenticated", "subject": None, "projects": None, "expires_at": None})
    assert again.expect("subscribe")["after"] == 2
    again.send({**subscribed(0), "epoch": "e2"}, event(1), event(2))
    assert wait_delivered(page, 6) == [("resync", 0), 1, 2, ("resync", 0), 1, 2]
    assert page.evaluate(f"window.churn.bus.cursor({PROJECT}).epoch") == "e2"


def test_a_gateway_that_upgrades_but_never_authenticates_is_given_up(
    page: Page, gw: ScriptedGateway, site: PageServer
) -> None:
    start(page, gw, site, connectTimeout=1000)
    silent = gw.next_conn()
    silent.expect("auth")
    silent.expect("subscribe")  # sent right behind the token; then nothing comes back
    conn = gw.next_conn()
    conn.handshake(0)
    conn.send(event(1))
    assert wait_delivered(page, 2) == [("resync", 0), 1]
    assert page.problems == []  # type: ignore[attr-defined]


def test_a_frozen_page_resumes_in_order(page: Page, gw: ScriptedGateway, site: PageServer) -> None:
    """A page frozen (a hidden tab the browser suspends: no task runs) while events arrive, past
    its ping and pong timeouts: thawed, it delivers them once each, in order, on the same
    connection (the overdue ping is answered)."""
    gw.auto_pong = True
    conn = live(page, gw, site, pingInterval=300, pongTimeout=300)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Page.setWebLifecycleState", {"state": "frozen"})
    conn.send(*(event(seq) for seq in range(1, 6)))
    time.sleep(1.0)  # frozen past pingInterval + pongTimeout: the ping timer is overdue
    cdp.send("Page.setWebLifecycleState", {"state": "active"})
    assert wait_delivered(page, 6) == [("resync", 0), 1, 2, 3, 4, 5]
    conn.expect("ping")
    conn.send(event(6))
    assert wait_delivered(page, 7) == [("resync", 0), 1, 2, 3, 4, 5, 6]
    assert gw.count == 1
    assert page.problems == []  # type: ignore[attr-defined]


def test_sse_a_stream_whose_response_never_comes_is_given_up(
    page: Page, gw: ScriptedGateway, site: PageServer, streams
) -> None:
    stream = streams()

    def second(write, headers) -> None:
        write(sse(subscribed(0, resumed=False), "subscribed") + sse(event(1)))
        stream.hold()

    stream.scripts += [HANG, second]
    start(page, gw, site, websocket=False, connectTimeout=500)
    stream.opened.get(timeout=10)
    stream.opened.get(timeout=10)  # given up after connectTimeout, asked again
    assert wait_delivered(page, 2) == [("resync", 0), 1]
    assert page.evaluate("window.churn.bus.transport") == "sse"
    assert page.problems == []  # type: ignore[attr-defined]


def test_sse_offline_then_online_reopens_the_stream_from_the_cursor(
    page: Page, gw: ScriptedGateway, site: PageServer, streams
) -> None:
    stream = streams()

    def first(write, headers) -> None:
        write(sse(subscribed(0, resumed=False), "subscribed") + sse(event(1)))
        stream.hold()

    def second(write, headers) -> None:
        write(sse(event(2)) + sse(subscribed(2), "subscribed") + sse(event(3)))
        stream.hold()

    stream.scripts += [first, second]
    start(page, gw, site, websocket=False)
    stream.opened.get(timeout=10)
    wait_delivered(page, 2)
    page.context.set_offline(True)
    page.wait_for_function("window.churn.bus.state === 'offline'")
    page.context.set_offline(False)
    assert stream.opened.get(timeout=10)["Last-Event-ID"].startswith(f"{EPOCH}:1:")
    assert wait_delivered(page, 4) == [("resync", 0), 1, 2, 3]
    assert page.evaluate("[window.churn.bus.state, window.churn.bus.transport]") == ["live", "sse"]
    assert page.problems == []  # type: ignore[attr-defined]


def test_a_gap_the_gateway_never_fills_becomes_an_explicit_resync(
    page: Page, gw: ScriptedGateway, site: PageServer
) -> None:
    """Event 2 never comes, whatever the client asks: two repairs from the cursor, then
    history_corrupt and a reload that continues after the top; never a wait for ever."""
    conn = live(page, gw, site)
    conn.send(event(1), event(3))
    for _ in range(2):
        assert conn.expect("subscribe")["after"] == 1
        conn.send(event(3), subscribed(3, replayed=1))
    conn.send(event(4))
    assert wait_delivered(page, 4) == [("resync", 0), 1, ("resync", 3), 4]
    assert any(e.startswith("history_corrupt") for e in errors(page))
    assert page.problems == []  # type: ignore[attr-defined]


def test_a_big_event_slower_than_the_pong_timeout_is_not_a_livelock(
    page: Page, gw: ScriptedGateway, site: PageServer
) -> None:
    """An event taking longer to arrive than pingInterval + pongTimeout (1 MiB over a slow link:
    here 160 KiB in 16 fragments, 0.1 s apart, against 0.3 s + 0.3 s): the pong is queued behind
    it, the browser gives no sign of the bytes arriving. Dropping the connection for it, then
    resuming, replays the same event at the same speed: nothing is ever delivered again."""
    gw.auto_pong = True
    conn = live(page, gw, site, pingInterval=300, pongTimeout=300)
    text = json.dumps({**event(1), "answer": "x" * (160 * 1024)})
    pieces = [text[i : i + 10 * 1024] for i in range(0, len(text), 10 * 1024)]

    async def slowly():
        for piece in pieces:
            yield piece
            await asyncio.sleep(0.1)

    for _ in range(7):
        states = page.evaluate("window.churn.states.length")
        with contextlib.suppress(websockets.ConnectionClosed):
            conn._run(conn.ws.send(slowly()))
        # Delivered, or the connection dropped (and then the next one replays it).
        page.wait_for_function(f"churn.log.length >= 2 || churn.states.length > {states}")
        if page.evaluate("window.churn.log.length") >= 2:
            break
        conn = gw.next_conn()
        conn.handshake(0, resumed=True)
    assert wait_delivered(page, 2) == [("resync", 0), 1]


def test_sse_a_big_event_slower_than_the_idle_timeout_is_not_a_livelock(
    page: Page, gw: ScriptedGateway, site: PageServer, streams
) -> None:
    """An SSE event whose one data line takes longer than sseIdleTimeout to arrive (1 MiB over a
    slow link; here 160 KiB over 1.6 s against 0.5 s): its bytes keep coming, at a rate no
    trickling server reaches, so the stream is not cut and the event replayed as slowly."""
    stream = streams()
    line = sse({**event(1), "answer": "x" * (160 * 1024)})

    def slowly(write, headers) -> None:
        write(sse(subscribed(0, resumed=headers.get("Last-Event-ID") is not None), "subscribed"))
        for i in range(0, len(line), 10 * 1024):
            write(line[i : i + 10 * 1024])
            time.sleep(0.1)
        stream.hold()

    stream.scripts += [slowly] * 7
    start(page, gw, site, websocket=False, sseIdleTimeout=500)
    assert wait_delivered(page, 2) == [("resync", 0), 1]
    assert page.problems == []  # type: ignore[attr-defined]


def test_polling_a_page_slower_than_the_poll_timeout_is_asked_for_in_smaller_pages(
    page: Page, gw: ScriptedGateway, site: PageServer
) -> None:
    """A poll answer that takes longer than pollTimeout to arrive (big events over a slow link;
    here 100 KB/s, 8 KB events, pollTimeout 1 s): abandoned, then asked for again in full at
    the same speed, for ever; smaller pages get through."""
    from urllib.parse import parse_qs, urlparse

    history = [{**event(seq), "answer": "x" * 8000} for seq in range(1, 31)]
    limits: list[str] = []

    def poll(handler) -> None:
        query = {k: v[0] for k, v in parse_qs(urlparse(handler.path).query).items()}
        limits.append(query.get("limit", "-"))
        after = int(query.get("after", len(history)))
        page_ = history[after : after + int(query.get("limit", 100))]
        seq = page_[-1]["seq"] if page_ else after
        body = json.dumps(
            {
                "project_id": PROJECT,
                "epoch": EPOCH,
                "seq": seq,
                "events": page_,
                "resync_required": None,
                "more": seq < len(history),
            }
        ).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        with contextlib.suppress(OSError):
            for i in range(0, len(body), 10_000):  # 100 KB/s
                handler.wfile.write(body[i : i + 10_000])
                handler.wfile.flush()
                time.sleep(0.1)

    history_start = history[:]
    history.clear()  # the first poll: from now (seq 0), then the 30 events are published
    site.poll = poll
    start(page, gw, site, websocket=False, sse=False, pollInterval=200, pollTimeout=1000)
    page.wait_for_function("window.churn.log.length >= 1")
    history.extend(history_start)
    page.wait_for_function("window.churn.log.length >= 31", timeout=30_000)
    assert delivered(page) == [("resync", 0), *range(1, 31)]
    assert "25" in limits and "6" in limits, limits  # a quarter, then a quarter again
    assert page.problems == []  # type: ignore[attr-defined]


def test_a_replayed_big_event_slower_than_the_subscribe_bound_is_not_a_livelock(
    page: Page, gw: ScriptedGateway, site: PageServer
) -> None:
    """The same slow event in the replay of a resume: the bound on the subscribe's answer
    (connectTimeout, pushed back by each replayed event as it completes) passes while it
    arrives. Giving the connection up for it, and resuming, replays it as slowly."""
    conn = live(page, gw, site, connectTimeout=1000)
    conn.close(1012)
    text = json.dumps({**event(1), "answer": "x" * (160 * 1024)})
    pieces = [text[i : i + 10 * 1024] for i in range(0, len(text), 10 * 1024)]

    async def slowly():
        for piece in pieces:
            yield piece
            await asyncio.sleep(0.1)

    for _ in range(7):
        conn = gw.next_conn()
        conn.expect("auth")
        conn.send({"type": "authenticated", "subject": None, "projects": None, "expires_at": None})
        assert conn.expect("subscribe")["after"] == 0
        page.wait_for_function("churn.bus.state === 'live'")
        states = page.evaluate("window.churn.states.length")
        with contextlib.suppress(websockets.ConnectionClosed):
            conn._run(conn.ws.send(slowly()))
            conn.send(subscribed(1, replayed=1))
        # Delivered, or the connection given up (and then the next one replays it).
        page.wait_for_function(f"churn.log.length >= 2 || churn.states.length > {states}")
        if page.evaluate("window.churn.log.length") >= 2:
            break
    assert wait_delivered(page, 2) == [("resync", 0), 1]
    assert page.problems == []  # type: ignore[attr-defined]


def test_a_token_without_iat_under_a_clock_ahead_of_the_gateways_is_not_refreshed_in_a_loop(
    page: Page, gw: ScriptedGateway, site: PageServer
) -> None:
    """A token with `exp` and no `iat`: its lifetime is unknown, its expiry is on the gateway's
    clock. The browser's clock an hour ahead, the token looks expired when it arrives, though the
    gateway takes it: a refresh due at once, and again after each refresh, twice a second."""
    page.evaluate(TIMER_PROBE)
    now = int(time.time())
    claims = {"exp": now - 1800, "projects": [1]}  # valid for 30 min on the gateway's clock
    header = {"alg": "HS256", "typ": "JWT"}

    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    token = f"{part(header)}.{part(claims)}.sig"
    start(page, gw, site, token=token)
    conn = gw.next_conn()
    conn.handshake(0, token=token, expires_at=claims["exp"])
    conn.send(event(1))
    assert wait_delivered(page, 2) == [("resync", 0), 1]
    with pytest.raises(queue.Empty):
        conn.expect("auth", timeout=1.5)  # no refresh loop


def test_sse_a_subscribe_unanswered_stays_bounded_through_a_websocket_that_opens_and_fails(
    page: Page, gw: ScriptedGateway, site: PageServer, streams
) -> None:
    """An SSE stream open (WebSocket refused), its `subscribed` withheld (so it is not live:
    polling goes on meanwhile, refused here). A WebSocket attempt opens (its auth and subscribe
    go out), then fails before `authenticated`: the stream's subscribe is still given up on
    within its bound and the stream replaced, not left waiting for ever."""
    stream = streams()

    def withheld(write, headers) -> None:
        write(": keepalive\n\n")  # open, the subscribe never answered
        stream.hold()

    def second(write, headers) -> None:
        write(sse(subscribed(0, resumed=False), "subscribed") + sse(event(1)))
        stream.hold()

    stream.scripts += [withheld, second]
    refused = f"ws://127.0.0.1:{free_port()}/"
    start(page, gw, site, url=refused, connectTimeout=2000, sseIdleTimeout=30000, pollInterval=100)
    stream.opened.get(timeout=10)
    # The stream's response opened: polling started behind it (one pollInterval later).
    page.wait_for_function("window.churn.errors.some((e) => e.startsWith('poll_http_404'))")
    assert page.evaluate("window.churn.bus.transport") is None
    page.evaluate(f"window.churn.bus.url = '{gw.url}'")
    conn = gw.next_conn()  # a WebSocket attempt that opens
    conn.expect("subscribe")
    page.evaluate(f"window.churn.bus.url = '{refused}'")  # the next ones never open
    conn.abort()  # and this one fails before `authenticated`
    assert "Last-Event-ID" not in stream.opened.get(timeout=10)  # the stream replaced
    assert wait_delivered(page, 2) == [("resync", 0), 1]
    assert any(e.startswith("subscribe_timeout") for e in errors(page))
    assert page.problems == []  # type: ignore[attr-defined]


def test_a_browser_wrongly_saying_offline_still_connects_and_reconnects(
    page: Page, gw: ScriptedGateway, site: PageServer
) -> None:
    """navigator.onLine false though the gateway is reachable (a machine with only loopback):
    the client connects anyway, and after a drop reconnects (while it says offline, at most once
    per backoff.max), rather than wait for an `online` event that never comes."""
    page.add_init_script(
        "Object.defineProperty(Navigator.prototype, 'onLine', { get: () => false })"
    )
    page.reload()
    page.wait_for_function("window.driverReady === true && navigator.onLine === false")
    conn = live(page, gw, site)
    conn.send(event(1))
    assert wait_delivered(page, 2) == [("resync", 0), 1]
    assert page.evaluate("window.churn.bus.state") == "live"
    conn.close(1011)
    again = gw.next_conn()
    assert again.handshake(1, resumed=True)["after"] == 1
    again.send(event(2))
    assert wait_delivered(page, 3) == [("resync", 0), 1, 2]
    assert page.evaluate("window.churn.bus.state") == "live"
    assert page.problems == []  # type: ignore[attr-defined]


# --- SSE behind a buffering proxy ---------------------------------------------------------------


class BufferingProxy:
    """A gateway behind a proxy that buffers response bodies: the stream's headers arrive, its
    body (``retry:``, the replay, ``subscribed``, live events: what the gateway wrote) is held
    until ``flush`` is set, then passed on, and live events as they are published. Polling
    (``/events``) is not held. ``history`` is the project's history (seqs 1..top, epoch e1)."""

    def __init__(self, site: PageServer, streams) -> None:
        self.history: list[int] = []
        self.changed = threading.Condition()
        self.flush = threading.Event()
        self.polls = 0
        self.stream = streams()
        self.stream.scripts += [self._stream] * 20
        site.poll = self._poll

    def publish(self, count: int) -> None:
        with self.changed:
            for _ in range(count):
                self.history.append(len(self.history) + 1)
            self.changed.notify_all()

    def _poll(self, handler) -> None:
        from urllib.parse import parse_qs, urlparse

        query = {k: v[0] for k, v in parse_qs(urlparse(handler.path).query).items()}
        with self.changed:
            self.polls += 1
            top = len(self.history)
            after = int(query.get("after", top))  # no cursor: from now
            page_ = [event(seq) for seq in self.history[after:]]
        body = json.dumps(
            {
                "project_id": PROJECT,
                "epoch": EPOCH,
                "seq": top,
                "events": page_,
                "resync_required": None,
                "more": False,
            }
        ).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _stream(self, write, headers) -> None:
        resume = headers.get("Last-Event-ID")
        with self.changed:
            top = len(self.history)  # the gateway subscribes when the request comes
        after = int(resume.split(":")[1]) if resume else top
        self.flush.wait(30)
        write(
            "retry: 1000\n\n"
            + "".join(sse(event(seq)) for seq in range(after + 1, top + 1))
            + sse(subscribed(top, resumed=resume is not None, replayed=top - after), "subscribed")
        )
        sent = top
        while not self.stream.release.is_set():
            with self.changed:
                self.changed.wait_for(lambda sent=sent: len(self.history) > sent, timeout=0.1)
                now = len(self.history)
            if now > sent:
                write("".join(sse(event(seq)) for seq in range(sent + 1, now + 1)))
                sent = now


def test_sse_a_stream_held_by_a_buffering_proxy_does_not_stop_polling(
    page: Page, gw: ScriptedGateway, site: PageServer, streams
) -> None:
    """The stream's headers come, its body is held: it is not `live`, polling goes on and
    delivers what is published meanwhile within the poll interval. Once the body comes through,
    the client climbs to SSE (`live`/`sse`), polling stops, and every event is delivered once, in
    order, across the switch."""
    proxy = BufferingProxy(site, streams)
    start(page, gw, site, websocket=False, pollInterval=200, connectTimeout=60_000)
    assert "Last-Event-ID" not in proxy.stream.opened.get(timeout=10)
    # First contact by polling (the stream says nothing), then events published meanwhile.
    page.wait_for_function("window.churn.log.length >= 1", timeout=5_000)
    proxy.publish(3)
    assert wait_delivered(page, 4) == [("resync", 0), 1, 2, 3]
    assert page.evaluate("[window.churn.bus.state, window.churn.bus.transport]") == [
        "polling",
        "polling",
    ]
    assert not [s for s in page.evaluate("window.churn.states") if s.startswith("live")]
    # The proxy lets the body through: the stream answers (for the cursor it asked from, which
    # polling has moved past since), the client climbs to SSE, from where polling left off.
    proxy.flush.set()
    page.wait_for_function("window.churn.bus.transport === 'sse'", timeout=5_000)
    assert page.evaluate("window.churn.bus.state") == "live"
    proxy.publish(2)
    assert wait_delivered(page, 6) == [("resync", 0), 1, 2, 3, 4, 5]
    polls = proxy.polls
    page.wait_for_timeout(600)  # three poll intervals: none comes (polling stopped)
    assert proxy.polls == polls
    proxy.publish(1)
    assert wait_delivered(page, 7) == [("resync", 0), 1, 2, 3, 4, 5, 6]
    assert page.problems == []  # type: ignore[attr-defined]


def test_sse_a_resumed_stream_whose_replay_overlaps_what_polling_delivered_is_exact(
    page: Page, gw: ScriptedGateway, site: PageServer, streams
) -> None:
    """A held stream is given up (its subscribe unanswered within connectTimeout) and the next one
    resumes from the cursor polling had reached; polling goes on delivering while that one is
    held too. When the body comes through, its replay repeats what polling delivered meanwhile:
    nothing is delivered twice, nothing is missing, and SSE takes over."""
    proxy = BufferingProxy(site, streams)
    start(page, gw, site, websocket=False, pollInterval=200, connectTimeout=1500)
    proxy.stream.opened.get(timeout=10)
    page.wait_for_function("window.churn.log.length >= 1", timeout=5_000)
    proxy.publish(2)
    assert wait_delivered(page, 3) == [("resync", 0), 1, 2]
    resumed = proxy.stream.opened.get(timeout=10)  # the first one given up, the next from 2
    assert resumed["Last-Event-ID"].split(":")[:2] == [EPOCH, "2"]
    assert any(e.startswith("subscribe_timeout") for e in errors(page))
    proxy.publish(3)  # delivered by polling while the resumed stream is held
    assert wait_delivered(page, 6) == [("resync", 0), 1, 2, 3, 4, 5]
    assert page.evaluate("window.churn.bus.transport") == "polling"
    proxy.flush.set()  # its replay (3, 4, 5) overlaps what polling delivered
    page.wait_for_function("window.churn.bus.transport === 'sse'", timeout=5_000)
    proxy.publish(2)
    assert wait_delivered(page, 8) == [("resync", 0), 1, 2, 3, 4, 5, 6, 7]
    page.wait_for_timeout(300)  # nothing more (no duplicate) arrives
    assert delivered(page) == [("resync", 0), 1, 2, 3, 4, 5, 6, 7]
    assert page.problems == []  # type: ignore[attr-defined]
