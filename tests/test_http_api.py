"""The HTTP publish API: its pure core without sockets, then the served API against real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
import redis
import structlog
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from publisher import AsyncPublisher
from publisher.core import Cursor, PublisherUnavailable
from publisher.http_api import ApiError, ApiKey, Credentials, HttpApiSettings, PublishApi, hash_key
from publisher.http_api.bodies import BodyMemory
from publisher.http_api.core import (
    RateLimiter,
    TokenBucket,
    header,
    parse_events,
    parse_project_path,
    parse_revocation,
)
from publisher.http_api.server import server_config
from schemas.keys import Keys
from schemas.revocations import RevocationList
from tests.support.redis_server import RedisServer, free_port

KEY_ALL = "ebk_all-projects-key"
KEY_ONE = "ebk_project-one-key"
KEY_REVOKE = "ebk_may-revoke-key"
EXPIRED = {
    "type": "blocker_expired",
    "blocker_id": 1,
    "task_id": 2,
    "expired_at": "2026-12-03T08:00:00Z",
}


def resolved(blocker_id: int, **extra) -> dict:
    return {
        "type": "blocker_resolved",
        "blocker_id": blocker_id,
        "answer": f"answer {blocker_id}",
        "resolved_at": "2026-12-03T08:00:00Z",
        **extra,
    }


def credentials(**rate) -> Credentials:
    return Credentials(
        [
            ApiKey(id="all", sha256=hash_key(KEY_ALL), projects="*", **rate),
            ApiKey(id="one", sha256=hash_key(KEY_ONE), projects=[1]),
        ]
    )


# --- pure core -------------------------------------------------------------------------------


def test_a_key_is_found_by_its_hash_and_scoped_to_its_projects() -> None:
    creds = credentials()
    assert creds.authenticate(f"Bearer {KEY_ONE}").id == "one"
    assert creds.authenticate(f"bearer {KEY_ALL}").allows(12345)
    assert not creds.authenticate(f"Bearer {KEY_ONE}").allows(2)
    for bad in (None, "", "Bearer", "Basic abc", f"Token {KEY_ONE}", "Bearer ebk_nope"):
        with pytest.raises(ApiError) as error:
            creds.authenticate(bad)
        assert error.value.status == 401


def test_keys_file_errors_name_the_field_and_duplicates_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\$.keys\[0\].sha256"):
        Credentials.from_json(b'{"keys":[{"id":"a","sha256":"xyz","projects":"*"}]}')
    # A hash with a final newline can never match a key (a regex's $ matched before it).
    with pytest.raises(ValueError, match=r"\$.keys\[0\].sha256"):
        Credentials.from_json(json.dumps({"keys": [{"id": "a", "sha256": hash_key("k") + "\n"}]}))
    entry = {"id": "a", "sha256": hash_key("k"), "projects": [1]}
    with pytest.raises(ValueError, match="equal"):
        Credentials.from_json(json.dumps({"keys": [entry, {**entry, "id": "b"}]}))
    with pytest.raises(ValueError, match="unique"):
        Credentials.from_json(json.dumps({"keys": [entry, {**entry, "sha256": hash_key("j")}]}))
    # A misspelt field was ignored ("rates" left the key at the default rate), and a key of no
    # project was accepted that could never publish.
    with pytest.raises(ValueError, match=r"unknown field `rates` - at `\$.keys\[0\]`"):
        Credentials.from_json(json.dumps({"keys": [{**entry, "rates": 20000}]}))
    with pytest.raises(ValueError, match="unknown field `comment`"):
        Credentials.from_json(json.dumps({"keys": [entry], "comment": "x"}))
    with pytest.raises(ValueError, match=r"no projects.*\$.keys\[0\]"):
        Credentials.from_json(json.dumps({"keys": [{**entry, "projects": []}]}))


def test_token_bucket_refills_at_its_rate_and_never_exceeds_its_burst() -> None:
    bucket = TokenBucket(rate=10, burst=20, now=0.0)
    assert bucket.take(20, 0.0) == 0
    assert bucket.take(1, 0.0) == pytest.approx(0.1)
    assert bucket.take(5, 0.5) == 0  # 5 tokens came back in 0.5 s
    assert bucket.take(1, 100.0) == 0 and bucket.tokens == 19  # capped at the burst
    assert bucket.take(21, 200.0) == float("inf")


def test_rate_limiter_answers_429_with_the_wait_per_key() -> None:
    limiter = RateLimiter(default_rate=100, default_burst=100)
    key = ApiKey(id="k", sha256=hash_key("k"), projects="*")
    other = ApiKey(id="o", sha256=hash_key("o"), projects="*")
    limiter.take(key, 100, now=0.0)
    with pytest.raises(ApiError) as error:
        limiter.take(key, 10, now=0.0)
    assert error.value.status == 429 and error.value.retry_after == pytest.approx(0.1)
    limiter.take(other, 100, now=0.0)  # buckets are per credential
    with pytest.raises(ApiError, match="burst"):
        limiter.take(key, 1000, now=10.0)


def run_serve(
    keys: list[dict] | None, tmp_path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m publisher.http_api serve`` with a keys file holding ``keys`` (one key for
    every project when None) and ``args``, as a refused start: its exit status and stderr."""
    keys_file = tmp_path / "keys.json"
    if keys is None:
        keys = [{"id": "a", "sha256": hash_key("k"), "projects": "*"}]
    keys_file.write_text(json.dumps({"keys": keys}))
    return subprocess.run(
        [sys.executable, "-m", "publisher.http_api", "serve", "--keys-file", str(keys_file), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("rate", 0.0),  # divided by zero once the burst was spent: a bare 500
        ("rate", float("nan")),
        ("max_events", 501),  # an array without a key would be two script calls
        ("max_events", 0),
        ("burst", 0),
        ("header_timeout", -1.0),
        ("body_timeout", float("inf")),
        ("max_header_bytes", 100),  # under a request's own headers: every request refused
        ("send_timeout", 0.0),
    ],
)
def test_settings_that_cannot_work_are_refused_by_name(flag: str, value: float, tmp_path) -> None:
    with pytest.raises(ValueError, match=flag.replace("_", "-")):
        HttpApiSettings(**{flag: value})
    out = run_serve([], tmp_path, f"--{flag.replace('_', '-')}", str(value))
    assert out.returncode == 2 and flag.replace("_", "-") in out.stderr, out.stderr


def test_serve_refuses_a_keys_file_without_keys(tmp_path) -> None:
    # Such a server started without a word and answered 401 "unknown API key" to every request
    # (found by pasting the wrong line of new-key's output into the keys file).
    out = run_serve([], tmp_path)
    assert out.returncode == 2, out.stderr
    assert f"{tmp_path / 'keys.json'}: no keys" in out.stderr and "new-key" in out.stderr


def test_project_path() -> None:
    assert parse_project_path("/v1/projects/42/events") == 42
    for bad in (
        "/v1/projects/0/events",
        "/v1/projects/-1/events",
        "/v1/projects/x/events",
        "/v1/projects/9007199254740992/events",
        "/v1/projects/1/events/",
        "/",
    ):
        with pytest.raises(ApiError) as error:
            parse_project_path(bad)
        assert error.value.status == 404


def test_a_body_is_scanned_for_repeated_keys_once(monkeypatch) -> None:
    """The scan for repeated keys (Python's json, ~0.6 us an object) is most of the cost of a
    body, and an event may carry unknown fields of any size (they are dropped): each event was
    scanned a second time, as msgspec's encoding of the decoded object, which cannot repeat a
    key. A key's 4 MiB event padded with small objects held the event loop, every other key's
    requests with it, 0.54 s; it is scanned once now (0.24 s)."""
    import schemas.events
    from publisher.http_api import core

    scanned: list[int] = []
    scan = schemas.events.repeated_key

    def counting(data, **options):
        scanned.append(len(data))
        return scan(data, **options)

    monkeypatch.setattr(core, "repeated_key", counting)
    monkeypatch.setattr(schemas.events, "repeated_key", counting)
    padded = {**EXPIRED, "padding": [{"a": 1}] * 1000}
    for body in (padded, [padded, resolved(2)]):
        data = json.dumps(body).encode()
        scanned.clear()
        events, _ = parse_events(data, 1, 500)
        assert type(events[0]).__name__ == "BlockerExpired"
        assert sum(scanned) == len(data), scanned
    # (A key given twice anywhere is still refused.)
    with pytest.raises(ApiError) as error:
        parse_events(b'[{"type": "blocker_expired", "type": "x"}]', 1, 500)
    assert error.value.code == "repeated_key"


def test_parse_events_takes_one_object_or_an_array_and_names_the_field() -> None:
    events, is_batch = parse_events(json.dumps(EXPIRED).encode(), 7, 500)
    assert not is_batch and events[0].project_id == 7
    events, is_batch = parse_events(json.dumps([resolved(1), resolved(2)]).encode(), 7, 500)
    assert is_batch and [e.blocker_id for e in events] == [1, 2]
    cases = {
        b"{": (400, "invalid_json"),
        b"[]": (400, "invalid_body"),
        b"[1]": (422, "expected a JSON object"),
        json.dumps([resolved(1), resolved(0)]).encode(): (422, "event 1: .*blocker_id"),
        json.dumps({**EXPIRED, "project_id": 8}).encode(): (422, "differs from the path"),
        json.dumps({**EXPIRED, "type": "nope"}).encode(): (422, "type"),
        json.dumps([EXPIRED] * 3).encode(): (413, "at most 2"),
        json.dumps(EXPIRED)[:-1].encode() + b', "task_id": 3}': (400, "repeated_key"),
        json.dumps([resolved(1), resolved(2)])[:-2].encode() + b', "answer": "no"}]': (
            400,
            "repeated_key",
        ),
        b"[" * 5000 + b"]" * 5000: (400, "invalid_json"),
    }
    # A repeated key behind a value nested where Python's json gives up a few levels before
    # msgspec (where exactly depends on the stack below): it passed as "no repeated key", one
    # answer picked. Every depth is refused: the key named, or the nesting.
    for depth in [500, *range(940, 1010), 100_000]:
        nested = b"[" * depth + b"]" * depth
        body = json.dumps(resolved(1))[:-1].encode() + b', "answer": "no", "x": ' + nested + b"}"
        cases[body] = (400, "repeated_key" if depth == 500 else "invalid_json|repeated_key")
    for body, (status, message) in cases.items():
        with pytest.raises(
            ApiError, match=message if status == 422 or status == 413 else None
        ) as error:
            parse_events(body, 7, 2)
        assert error.value.status == status, body[:40]
        if status == 400:
            assert re.fullmatch(message, error.value.code), (len(body), error.value)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([EXPIRED, resolved(1), resolved(2, note={"a": [1]})]), max_size=3),
    st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]),
    st.sampled_from(["", " ", "\n\t "]),
    st.booleans(),
)
def test_an_event_without_project_id_is_the_same_event_with_the_paths(
    events: list[dict], separators: tuple[str, str], space: str, as_array: bool
) -> None:
    """The path's project is spliced into an event that leaves it out, whatever its layout
    (white space anywhere, an empty object): the same answer as the event naming it."""
    documents = [*events, {}] if as_array else (events[:1] or [{}])
    without = json.dumps(documents if as_array else documents[0], separators=separators)
    named = [{**event, "project_id": 7} for event in documents]
    with_project = json.dumps(named if as_array else named[0], separators=separators)

    def answer(body: str) -> object:
        try:
            return parse_events((space + body + space).encode(), 7, 10)
        except ApiError as error:
            return (error.status, error.code, str(error))

    assert answer(without) == answer(with_project)


@pytest.mark.parametrize(
    "number", ["1e400", "-1e309", "1.7976931348623159e308", "9" * 4301, "-" + "9" * 4300]
)
@pytest.mark.parametrize(
    "document",
    [
        '{"project_id": %s, "type": "blocker_expired"}',  # (was a 500: msgspec's error escaped)
        '{**, "unknown": [%s]}',  # (was accepted: a skipped value's number is never read)
        '{"type": "blocker_expired", "blocker_id": %s}',  # (was a 422 naming the field)
        '[{"x": 1, "x": 2}, {**, "unknown": %s}]',  # (was 400 repeated_key)
        "[%s, {**}, {**}, {**}]",  # (was 413 too_many_events)
    ],
)
def test_a_number_msgspec_cannot_read_is_invalid_json_wherever_it_is(
    document: str, number: str
) -> None:
    """msgspec decodes neither a float past 1.8e308 nor an integer written in over 4,300
    characters: the whole body was refused 400 ``invalid_json``, wherever the number was. Skipped
    (an unknown field) it is never read, so the body's numbers are checked on their own."""
    body = document.replace("{**", json.dumps(EXPIRED)[:-1]).replace("%s", number).encode()
    with pytest.raises(ApiError) as error:
        parse_events(body, 1, 3)
    assert (error.value.status, error.value.code) == (400, "invalid_json")
    assert str(error.value) == "the body is not valid JSON"


def test_a_large_body_is_parsed_without_the_garbage_collector() -> None:
    """A body of a million tiny values in fields the contract does not know: the decoders'
    millions of objects made the cyclic collector run over and over (most of a second of the
    event loop for 5 MB); the parse pauses it, and never builds the unknown values at all."""
    collections: list[str] = []
    parsing = threading.get_ident()

    def seen(phase: str, info: dict) -> None:
        # (This thread's only: another thread's, a test's leftover calling gc.collect(), runs
        # its collection in its own thread.)
        if threading.get_ident() == parsing:
            collections.append(phase)

    body = json.dumps({**EXPIRED, "x": [["a"]] * 200_000, "y": [[1]] * 200_000}).encode()
    gc_callbacks = gc.callbacks
    gc.collect()  # (counts from nothing: the few objects made before the pause collect nothing)
    gc_callbacks.append(seen)
    try:
        events, _ = parse_events(body, 1, 500)
    finally:
        gc_callbacks.remove(seen)
    assert type(events[0]).__name__ == "BlockerExpired"
    assert collections == []
    assert gc.isenabled()


def test_an_interrupt_anywhere_in_a_parse_leaves_the_garbage_collector_as_it_was() -> None:
    """A KeyboardInterrupt (or any exception) raised at any point of a parse, as a signal is:
    after whichever C call returns. One raised as ``gc.disable()`` returned, before the pause's
    ``try``, left the collector off for the rest of the process's life (memory of every cycle
    never freed)."""
    body = json.dumps([EXPIRED, resolved(1)]).encode()
    calls = 0

    def count(frame, event: str, arg) -> None:
        nonlocal calls
        calls += event == "c_return"

    sys.setprofile(count)
    try:
        parse_events(body, 1, 500)
    finally:
        sys.setprofile(None)
    assert calls > 10
    for at in range(calls):
        seen = 0

        def interrupt(frame, event: str, arg, at: int = at) -> None:
            nonlocal seen
            if event == "c_return":
                seen += 1
                if seen > at:
                    sys.setprofile(None)
                    raise KeyboardInterrupt

        sys.setprofile(interrupt)
        try:
            parse_events(body, 1, 500)
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
        enabled = gc.isenabled()
        gc.enable()
        assert enabled, f"interrupted after C call {at + 1} of {calls}"


def test_body_memory_is_bounded_in_all_and_per_key() -> None:
    memory = BodyMemory(16_000)  # a key's share: 4,000
    first, second = memory.hold("a"), memory.hold("a")
    assert first.cover(3_000) and first.cover(1_000)  # (already covered: nothing more taken)
    assert not second.cover(1_500)  # the key's share would pass: refused, nothing held
    assert second.size == 0 and memory.held_by("a") == 3_000
    assert second.cover(1_000) and memory.held_by("a") == 4_000
    others = [memory.hold(key) for key in "bcd"]
    assert all(hold.cover(4_000) for hold in others[:2]) and memory.held == 12_000
    assert others[2].cover(4_000) and memory.held == 16_000
    assert not memory.hold("e").cover(1)  # the whole budget is held
    first.release()
    first.release()  # (a second release gives nothing back twice)
    assert memory.held == 13_000 and memory.held_by("a") == 1_000
    assert memory.hold("e").cover(3_000)
    for hold in (second, *others):
        hold.release()
    assert memory.held == 3_000 and memory.held_by("a") == 0


class _GatePublisher:
    """A publisher whose writes wait for ``gate`` (Redis slow or hung) and then succeed, or
    fail unavailable when ``down``."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.down = False

    async def _write(self, count: int) -> list[Cursor]:
        await self.gate.wait()
        if self.down:
            raise PublisherUnavailable("down")
        return [Cursor("e", 1)] * count

    async def publish(self, event, idempotency_key=None) -> Cursor:
        return (await self._write(1))[0]

    async def publish_many(self, events, idempotency_keys=None) -> list[Cursor]:
        return await self._write(len(events))


_REQUEST_KINDS = [
    "declared",  # Content-Length, the body in pieces
    "chunked",  # no Content-Length: held as it arrives
    "invalid_json",
    "unknown_key",  # 401 before any hold
    "other_project",  # 403 before any hold
    "declared_too_large",  # 413 from the headers
    "chunked_too_large",  # 413 after a partial hold
    "disconnect",  # the client goes away mid-body
    "stalls",  # the body stops arriving: its task is cancelled (server shutdown)
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(_REQUEST_KINDS), st.sampled_from(["all", "one"]), st.booleans()),
        min_size=1,
        max_size=12,
    ),
    st.booleans(),
)
def test_bodies_held_return_to_nothing_whatever_requests_came(
    requests: list[tuple[str, str, bool]], redis_down: bool
) -> None:
    """Whatever requests come, all at once (bodies whole or cut, refused before, while or after
    their bodies are read, cancelled, their writes waiting for Redis, which then answers or is
    down), the bytes held never pass the bound or a key's share, and are all given back once
    the requests end: a hold never released would refuse everything 503 for ever."""
    publisher = _GatePublisher()
    publisher.down = redis_down
    app = PublishApi(
        publisher,  # type: ignore[arg-type]
        credentials(),
        HttpApiSettings(max_body=2048, max_body_memory=8192, body_timeout=60),
    )
    memory = app.bodies
    event = json.dumps(EXPIRED).encode() + b" " * 1000
    answers: list[int] = []
    unanswered: list[int] = []
    blocked: set[asyncio.Task] = set()

    def check() -> None:
        assert 0 <= memory.held <= memory.limit
        assert all(0 < held <= memory.key_limit for held in memory._by_key.values())
        assert memory.held == sum(memory._by_key.values())

    async def request(kind: str, key_name: str, large: bool) -> None:
        key = {"all": KEY_ALL, "one": KEY_ONE}[key_name]
        body = event * 2 if large and kind != "invalid_json" else event
        if kind == "invalid_json":
            body = b"{" + b" " * 1500
        headers = [(b"content-type", b"application/json")]
        headers.append(
            (b"authorization", f"Bearer {'ebk_unknown' if kind == 'unknown_key' else key}".encode())
        )
        project = 2 if kind == "other_project" else 1
        if kind == "declared_too_large":
            headers.append((b"content-length", b"4096"))
        elif not kind.startswith("chunked"):
            headers.append((b"content-length", b"%d" % len(body)))
        if kind == "chunked_too_large":
            body = event * 3
        pieces = [body[: len(body) // 2], body[len(body) // 2 :]]
        messages = [{"type": "http.request", "body": piece, "more_body": True} for piece in pieces]
        messages[-1]["more_body"] = False
        if kind in ("disconnect", "stalls"):
            messages = messages[:1]
        if kind == "disconnect":
            messages.append({"type": "http.disconnect"})
        stalled = asyncio.Event()

        async def receive() -> dict:
            check()
            if messages:
                await asyncio.sleep(0)  # (the next piece arrives later)
                return messages.pop(0)
            blocked.add(asyncio.current_task())
            await stalled.wait()  # (never set: a body that stops arriving)
            raise AssertionError

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                answers.append(message["status"])

        scope = {
            "type": "http",
            "method": "POST",
            "path": f"/v1/projects/{project}/events",
            "raw_path": f"/v1/projects/{project}/events".encode(),
            "query_string": b"",
            "headers": headers,
        }
        await app(scope, receive, send)
        check()

    async def run() -> None:
        tasks = [asyncio.create_task(request(*spec)) for spec in requests]
        for _ in range(20):  # every piece of every body arrives, the bounds checked on the way
            await asyncio.sleep(0)
            check()
        publisher.gate.set()  # Redis answers (or is found down)
        for _ in range(1000):  # (no clock: every step is the event loop's)
            if all(task.done() or task in blocked for task in tasks):
                break
            await asyncio.sleep(0)
        pending = [task for task in tasks if not task.done()]
        assert set(pending) == blocked  # (stalled bodies only; the others were answered)
        unanswered.append(len(pending))
        for task in pending:
            task.cancel()  # (the server shutting down)
        await asyncio.gather(*pending, return_exceptions=True)
        for task in tasks:
            if task not in blocked:
                task.result()

    asyncio.run(run())
    check()
    assert (memory.held, memory._by_key) == (0, {}), (requests, answers)
    assert len(answers) == len(requests) - unanswered[0]


def test_body_memory_must_fit_a_body_of_every_key() -> None:
    with pytest.raises(ValueError, match="--max-body-memory must be at least 4 x --max-body"):
        HttpApiSettings(max_body=1024, max_body_memory=4095)
    assert HttpApiSettings(max_body=1024, max_body_memory=4096).max_body_memory == 4096


def test_a_repeated_header_is_refused_rather_than_guessed() -> None:
    assert header({b"a": [b"1"]}, b"a") == "1"
    assert header({}, b"a") is None
    with pytest.raises(ApiError) as error:
        header({b"authorization": [b"Bearer x", b"Bearer y"]}, b"authorization")
    assert error.value.status == 400 and error.value.code == "repeated_header"


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "type",
                            "project_id",
                            "blocker_id",
                            "task_id",
                            "answer",
                            "expired_at",
                            "resolved_at",
                            "blocker",
                            "x",
                        ]
                    ),
                    inner,
                    max_size=6,
                )
            ),
            max_leaves=20,
        ).map(lambda doc: json.dumps(doc).encode()),
    )
)
def test_any_body_is_an_api_error_or_valid_events_of_the_path_project(body: bytes) -> None:
    try:
        events, _ = parse_events(body, 3, 10)
    except ApiError as error:
        assert error.status in (400, 413, 422)
    else:
        assert events and all(event.project_id == 3 for event in events)


# --- served, against real Redis --------------------------------------------------------------


class Api:
    """The API served by uvicorn in this event loop, and a raw HTTP/1.1 client for it."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def raw(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", 0))
            body = await asyncio.wait_for(reader.readexactly(length), 10) if length else b""
            return status, headers, body
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def post(
        self,
        project: int | str,
        body: bytes | object,
        *,
        key: str | None = KEY_ALL,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        head = [
            f"POST /v1/projects/{project}/events HTTP/1.1",
            "Host: test",
            "Content-Type: application/json",
            f"Content-Length: {len(data)}",
            "Connection: close",
        ]
        if key is not None:
            head.append(f"Authorization: Bearer {key}")
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        status, answer_headers, answer = await self.raw(
            ("\r\n".join(head) + "\r\n\r\n").encode() + data
        )
        return status, answer_headers, json.loads(answer) if answer else {}


@contextlib.asynccontextmanager
async def serving_app(
    publisher,
    keys: Credentials | None = None,
    limit_concurrency: int | None = None,
    **setting_overrides,
):
    """The API over ``publisher`` on a free port, served by uvicorn as ``serve`` configures it,
    until the block ends: yields ``(app, server, port)``."""
    app = PublishApi(publisher, keys or credentials(), HttpApiSettings(**setting_overrides))
    port = free_port()
    server = uvicorn.Server(server_config(app, port=port, limit_concurrency=limit_concurrency))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield app, server, port
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def served(redis_url: str, keys: Credentials | None = None, **overrides):
    async with serving_app(AsyncPublisher.from_url(redis_url), keys, **overrides) as (_, _, port):
        yield Api(port)


def stream(redis_url: str, project: int) -> list[dict]:
    client = redis.Redis.from_url(redis_url)
    try:
        entries = client.xrange(Keys().stream(project))
        return [json.loads(fields[b"f"]) for _, fields in entries]
    finally:
        client.close()


async def test_publish_one_event_and_a_batch_answers_their_cursors(redis_url) -> None:
    async with served(redis_url) as api:
        status, _, body = await api.post(5, EXPIRED)
        assert status == 200 and body["cursor"]["seq"] == 1
        epoch = body["cursor"]["epoch"]
        status, _, body = await api.post(5, [resolved(i) for i in range(1, 4)])
        assert status == 200
        assert body["cursors"] == [{"epoch": epoch, "seq": s} for s in (2, 3, 4)]
    frames = stream(redis_url, 5)
    assert [f["seq"] for f in frames] == [1, 2, 3, 4]
    assert [f["type"] for f in frames] == ["blocker_expired"] + ["blocker_resolved"] * 3
    assert all(f["project_id"] == 5 for f in frames)


async def test_bad_requests_get_their_documented_status_and_publish_nothing(redis_url) -> None:
    async with served(redis_url, max_body=4096, max_events=3) as api:
        cases = [
            (dict(project=1, body=EXPIRED, key=None), 401, "unauthorized"),
            (dict(project=1, body=EXPIRED, key="ebk_wrong"), 401, "unauthorized"),
            (dict(project=2, body=EXPIRED, key=KEY_ONE), 403, "forbidden"),
            (dict(project=1, body={**EXPIRED, "task_id": "x"}), 422, "invalid_event"),
            (dict(project=1, body=b"not json"), 400, "invalid_json"),
            (
                dict(project=1, body=json.dumps(EXPIRED)[:-1].encode() + b', "task_id": 3}'),
                400,
                "repeated_key",
            ),
            (dict(project=1, body=[EXPIRED] * 4), 413, "too_many_events"),
            (dict(project=1, body=[EXPIRED] * 100), 413, "body_too_large"),
            (
                dict(project=1, body=EXPIRED, headers={"Idempotency-Key": "has space"}),
                400,
                "invalid_idempotency_key",
            ),
            (dict(project="x", body=EXPIRED), 404, "not_found"),
        ]
        for kwargs, status, code in cases:
            got, _, body = await api.post(**kwargs)
            assert (got, body["error"]["code"]) == (status, code), kwargs
        status, _, body = await api.post(1, [resolved(1), {**resolved(2), "answer": ""}])
        assert status == 422 and "event 1" in body["error"]["message"]
        assert "$.answer" in body["error"]["message"]
        # Repeated Authorization and a form body.
        request = (
            "POST /v1/projects/1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY_ALL}\r\nAuthorization: Bearer {KEY_ONE}\r\n"
            "Content-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        status, _, body = await api.raw(request.encode())
        assert status == 400 and b"repeated_header" in body
        status, _, body = await api.raw(
            request.replace(f"Authorization: Bearer {KEY_ONE}\r\n", "")
            .replace("application/json", "application/x-www-form-urlencoded")
            .encode()
        )
        assert status == 415
        status, headers, _ = await api.raw(
            b"PUT /v1/projects/1/events HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        # (GET reads a page of the history: tests/test_http_api_reads.py)
        assert status == 405 and headers["allow"] == "GET, HEAD, POST"
    assert stream(redis_url, 1) == [] and stream(redis_url, 2) == []


async def test_a_content_length_with_thousands_of_leading_zeros_is_its_number(redis_url):
    """httptools accepts any number of leading zeros (the value still fits 64 bits); the API's
    int() of the header refused over 4,300 digits with ValueError: a bare 500 from uvicorn."""
    body = json.dumps(EXPIRED).encode()
    head = (
        "POST /v1/projects/1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY_ALL}\r\nConnection: close\r\n"
    )
    async with served(redis_url, max_body=4096) as api:
        length = "0" * 5000 + str(len(body))
        status, _, answer = await api.raw(f"{head}Content-Length: {length}\r\n\r\n".encode() + body)
        assert status == 200 and b'"seq":1' in answer
        status, _, answer = await api.raw(
            f"{head}Content-Length: {'0' * 5000}4097\r\n\r\n".encode()
        )
        assert status == 413 and b"body_too_large" in answer
    assert len(stream(redis_url, 1)) == 1


async def _closed_by_peer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, trickle: bool
) -> bool:
    """Send one more byte of a header name that never ends (if `trickle`), then wait up to 0.1 s:
    True once the server has closed the connection, whether by FIN (EOF) or by RST (it closed with
    our bytes unread, so reads and drains raise). A reset stream raises from `drain()` without
    yielding, so a loop that only suppressed it spun without letting any timeout fire."""
    if trickle:
        writer.write(b"x")
    try:
        await writer.drain()
        data = await asyncio.wait_for(reader.read(1000), 0.1)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    assert data == b"", data
    return True


async def test_headers_that_do_not_arrive_in_time_close_the_connection(redis_url) -> None:
    """uvicorn bounds neither the wait for a request's headers nor a keep-alive connection that
    keeps sending bytes: connections that sent nothing, or their headers a byte at a time
    (slowloris), were held for ever, and all of them count against --limit-concurrency, so a few
    made the API answer 503 to everyone. Past --header-timeout they are closed; a request whose
    headers arrived is not (its body has --body-timeout)."""
    body = json.dumps(EXPIRED).encode()
    head = (
        "POST /v1/projects/1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY_ALL}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    async with served(redis_url, limit_concurrency=4, header_timeout=0.5) as api:
        held = [await asyncio.open_connection("127.0.0.1", api.port) for _ in range(3)]
        # One sends nothing; one its request line, then a header a byte at a time; one is
        # answered once (keep-alive), then trickles its next request the same way.
        held[2][1].write(head + body)
        await held[2][0].readuntil(b'"seq":1}}')
        trickles = [
            b"",
            b"POST /v1/projects/1/events HTTP/1.1\r\nHost: t\r\n",
            b"POST / HTTP/1.1\r\n",
        ]
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(5):
            for (reader, writer), start in zip(held, trickles, strict=True):
                writer.write(start)
                while not await _closed_by_peer(reader, writer, trickle=bool(start)):
                    pass
        assert loop.time() - started < 2
        for _, writer in held:
            writer.close()
        # A request whose body comes after the header deadline is answered.
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        writer.write(head)
        await asyncio.sleep(1)
        writer.write(body)
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 200")
        writer.close()
        assert (await api.post(1, EXPIRED))[0] == 200
    assert len(stream(redis_url, 1)) == 3


async def test_a_retry_with_the_same_idempotency_key_publishes_once(redis_url) -> None:
    async with served(redis_url) as api:
        first = await api.post(3, EXPIRED, headers={"Idempotency-Key": "job-17"})
        again = await api.post(3, EXPIRED, headers={"Idempotency-Key": "job-17"})
        other = await api.post(3, EXPIRED, headers={"Idempotency-Key": "job-18"})
        # Keys are per credential: another service's "job-17" is its own.
        theirs = await api.post(1, EXPIRED, key=KEY_ONE, headers={"Idempotency-Key": "job-17"})
    assert first[0] == again[0] == other[0] == theirs[0] == 200
    assert first[2] == again[2]
    assert other[2]["cursor"]["seq"] == 2
    assert [f["seq"] for f in stream(redis_url, 3)] == [1, 2]
    assert [f["seq"] for f in stream(redis_url, 1)] == [1]


async def test_the_longest_key_id_and_idempotency_key_publish_exactly_once(redis_url) -> None:
    """A key id and an Idempotency-Key of 100 characters each (both allowed) made publisher
    keys longer than its 200: a bare 500 (uvicorn's), for one event and for an array."""
    long_key = ApiKey(id="k" * 100, sha256=hash_key(KEY_ALL), projects="*")
    headers = {"Idempotency-Key": "i" * 100}
    async with served(redis_url, Credentials([long_key])) as api:
        answers = [await api.post(6, EXPIRED, headers=headers) for _ in range(2)]
        batch = [resolved(n) for n in range(1, 12)]
        answers += [await api.post(7, batch, headers=headers) for _ in range(2)]
    assert [status for status, _, _ in answers] == [200] * 4, answers
    assert answers[0][2] == answers[1][2] and answers[2][2] == answers[3][2]
    assert [f["seq"] for f in stream(redis_url, 6)] == [1]
    assert [f["blocker_id"] for f in stream(redis_url, 7)] == list(range(1, 12))


async def test_a_longer_retry_under_a_long_key_finds_the_first_events_keys(redis_url) -> None:
    """Near the key length limit, whether an array's keys are digested depended on its length:
    a retry with more events (5 then 11 under one Idempotency-Key) used the other form and
    published the first five again. The form now depends on the longest index allowed."""
    long_key = ApiKey(id="k" * 100, sha256=hash_key(KEY_ALL), projects="*")
    headers = {"Idempotency-Key": "i" * 92}  # "http:" + 100 + ":" + 92 + ":4" is 200
    batch = [resolved(n) for n in range(1, 12)]
    async with served(redis_url, Credentials([long_key])) as api:
        first = await api.post(8, batch[:5], headers=headers)
        second = await api.post(8, batch, headers=headers)
    assert first[0] == second[0] == 200, (first, second)
    assert [f["blocker_id"] for f in stream(redis_url, 8)] == list(range(1, 12))


async def test_idempotency_keys_with_colons_never_meet_another_requests_keys(redis_url):
    """Publisher keys were ``http:<key id>:<Idempotency-Key>[:<index>]``, and both may contain
    ':': an array under "x" and one event under "x:1" shared a key (409 for a key never used,
    or the event answered with another's cursor and never published), and so did credential
    "svc" with key "eu:1" and credential "svc:eu" with key "1": one service's event silently
    not published because another's was."""
    keys = Credentials(
        [
            ApiKey(id="svc", sha256=hash_key(KEY_ALL), projects="*"),
            ApiKey(id="svc:eu", sha256=hash_key(KEY_ONE), projects="*"),
        ]
    )
    async with served(redis_url, keys) as api:
        batch = await api.post(9, [resolved(1), resolved(2)], headers={"Idempotency-Key": "x"})
        same = await api.post(9, resolved(2), headers={"Idempotency-Key": "x:1"})
        other = await api.post(9, resolved(3), headers={"Idempotency-Key": "x:1:0"})
        first = await api.post(10, EXPIRED, headers={"Idempotency-Key": "eu:1"})
        second = await api.post(10, EXPIRED, key=KEY_ONE, headers={"Idempotency-Key": "1"})
        retried = await api.post(10, EXPIRED, key=KEY_ONE, headers={"Idempotency-Key": "1"})
    assert [a[0] for a in (batch, same, other, first, second, retried)] == [200] * 6
    assert [f["blocker_id"] for f in stream(redis_url, 9)] == [1, 2, 2, 3]
    assert second[2] == retried[2] != first[2]
    assert [f["seq"] for f in stream(redis_url, 10)] == [1, 2]


async def test_a_keyed_array_partly_written_says_which_events_were(redis_url) -> None:
    """Each event of an array with an Idempotency-Key is its own script call, so a conflict on
    one does not stop the others: the API answered 409, documented as "nothing is written", and
    the events after the conflicting one were published without the client learning it (a
    corrected request under a new key then published them twice). The error now carries the
    array's cursors, null for the events not written."""
    headers = {"Idempotency-Key": "k"}
    async with served(redis_url) as api:
        first = await api.post(11, [resolved(1), resolved(2)], headers=headers)
        status, _, body = await api.post(
            11, [resolved(1), resolved(3), resolved(4)], headers=headers
        )
    assert first[0] == 200 and status == 409
    assert body["error"]["code"] == "idempotency_conflict"
    cursors = body["cursors"]
    assert cursors[0] == first[2]["cursors"][0] and cursors[1] is None
    assert cursors[2]["seq"] == 3
    assert [f["blocker_id"] for f in stream(redis_url, 11)] == [1, 2, 4]
    async with served(redis_url) as api:  # a 409 that wrote nothing has no cursors
        status, _, body = await api.post(11, resolved(5), headers={"Idempotency-Key": "k:0"})
        status, _, body = await api.post(11, resolved(6), headers={"Idempotency-Key": "k:0"})
    assert status == 409 and "cursors" not in body


async def test_rate_limit_per_key_answers_429_with_retry_after(redis_url) -> None:
    async with served(redis_url, rate=1.0, burst=3) as api:
        assert (await api.post(4, [EXPIRED] * 3))[0] == 200
        status, headers, body = await api.post(4, EXPIRED)
        assert status == 429 and body["error"]["code"] == "rate_limited"
        assert int(headers["retry-after"]) >= 1
        status, _, body = await api.post(4, [EXPIRED] * 4)
        assert status == 429 and "burst" in body["error"]["message"]
    assert len(stream(redis_url, 4)) == 3


async def test_redis_down_is_503_with_retry_after_and_ready_says_so() -> None:
    with RedisServer() as server:
        async with served(server.url) as api:
            assert (await api.post(1, EXPIRED))[0] == 200
            assert (await api.raw(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n"))[0] == 200
            server.stop()
            status, headers, body = await api.post(1, EXPIRED)
            assert status == 503 and body["error"]["code"] == "unavailable"
            assert headers["retry-after"] == "1"
            status, _, body = await api.raw(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert status == 503 and b'"ready":false' in body
            metrics = await api.raw(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            assert b'status="503",code="unavailable"} 1' in metrics[2]


_TOKEN = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    method=st.sampled_from(["POST", "GET", "PUT", "DELETE", "OPTIONS", "PATCH"]),
    path=st.sampled_from(
        [
            "/v1/projects/1/events",
            "/v1/projects/0/events",
            "/",
            "/x/../y",
            "/v1/projects/1/events?x=1",
            "/v1/projects/%31/events",
            "/v1/revocations",
            "/v1/revocations/",
            "/v1/projects/1/presence",
            "/v1/projects/2/presence?x=1",
            "/v1/projects/1/events?limit=-1",
            "/v1/projects/1/events?epoch=e&after=1&after=2",
            "/v1/projects/1/events?epoch=e&after=1&tag=0123456789abcdef&limit=1000",
        ]
    ),
    headers=st.lists(
        st.tuples(
            st.sampled_from(["Authorization", "Content-Type", "Idempotency-Key", "X-Other"]),
            st.one_of(
                _TOKEN,
                st.just(f"Bearer {KEY_ALL}"),
                st.just(f"Bearer {KEY_REVOKE}"),
                st.just("application/json"),
            ),
        ),
        max_size=5,
    ),
    body=st.one_of(
        st.binary(max_size=200),
        st.just(json.dumps(EXPIRED).encode()),
        st.builds(
            lambda subject, extra: json.dumps({"subject": subject, **extra}).encode(),
            st.text(max_size=8),
            st.dictionaries(
                st.sampled_from(["issued_before", "keep_for", "other"]),
                st.one_of(st.integers(), st.floats(), st.text(max_size=3), st.none()),
            ),
        ),
    ),
)
def test_fuzzed_requests_never_get_a_500(redis_url, method, path, headers, body) -> None:
    async def run() -> None:
        async with served(redis_url, revoking_credentials()) as api:
            head = [
                f"{method} {path} HTTP/1.1",
                "Host: t",
                f"Content-Length: {len(body)}",
                "Connection: close",
            ]
            head += [f"{name}: {value}" for name, value in headers]
            status, _, answer = await api.raw(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            assert status < 500, (status, answer)
            if status >= 400:
                assert msgspec.json.decode(answer)["error"]["code"]

    asyncio.run(run())


def test_new_key_prints_a_key_whose_entry_authenticates_it() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "publisher.http_api",
            "new-key",
            "--id",
            "billing",
            "--projects",
            "1,2",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    key = out[0].split()[-1]
    creds = Credentials.from_json(json.dumps({"keys": [json.loads(out[-1])]}))
    assert creds.authenticate(f"Bearer {key}").projects == [1, 2]


def test_new_key_sets_the_keys_own_rate_and_burst(capsys) -> None:
    # The keys file takes both (docs/http-publish.md: "rate": 20000, "burst": 40000); new-key
    # took only --rate, so a burst had to be typed into the entry by hand.
    from publisher.http_api.__main__ import main

    assert main(["new-key", "--id", "ingest", "--projects", "*", "--rate", "20000",
                 "--burst", "40000"]) == 0  # fmt: skip
    entry = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert entry["rate"] == 20000 and entry["burst"] == 40000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--projects", "1,x"], "invalid literal"),
        (["--projects", "0"], "$.projects[0]"),
        (["--projects", "1", "--rate", "0"], "$.rate"),
        (["--projects", "1", "--burst", "0"], "$.burst"),
        # (JSON has no infinity: the entry was printed with "rate": null, serve's rate.)
        (["--projects", "1", "--rate", "inf"], "a key's rate must be a finite number"),
    ],
)
def test_new_key_with_a_wrong_argument_is_an_error_not_a_traceback(args, message, capsys) -> None:
    from publisher.http_api.__main__ import main

    assert main(["new-key", "--id", "billing", *args]) == 2
    out = capsys.readouterr()
    assert message in out.err and "Traceback" not in out.err and out.out == ""


def _doc_snippet(language: str, marker: str) -> str:
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "http-publish.md").read_text()
    blocks = text.split("```" + language + "\n")[1:]
    return next(block.split("```")[0] for block in blocks if marker in block)


async def test_the_documented_curl_and_node_examples_publish(redis_url) -> None:
    async with served(redis_url) as api:
        env = {"EVENTBUS_API_KEY": KEY_ONE, "PATH": "/usr/bin:/bin:/usr/local/bin"}
        url = f"http://127.0.0.1:{api.port}/"
        curl = _doc_snippet("sh", "curl -sS -X POST").replace("http://127.0.0.1:8766/", url)
        done = await asyncio.create_subprocess_exec(
            "bash", "-c", curl, env=env, stdout=subprocess.PIPE
        )
        out, _ = await done.communicate()
        assert json.loads(out)["cursor"]["seq"] == 1
        node = _doc_snippet("js", "fetch(url").replace("http://127.0.0.1:8766/", url)
        done = await asyncio.create_subprocess_exec(
            "node", "--input-type=module", "-e", node, env=env, stdout=subprocess.PIPE
        )
        out, _ = await done.communicate()
        assert done.returncode == 0 and b"seq: 2" in out
    assert [f["type"] for f in stream(redis_url, 1)] == ["blocker_expired", "blocker_resolved"]


async def test_an_array_retried_with_its_idempotency_key_publishes_each_event_once(redis_url):
    batch = [resolved(i) for i in range(1, 6)]
    async with served(redis_url) as api:
        first = await api.post(6, batch, headers={"Idempotency-Key": "burst-1"})
        again = await api.post(6, batch, headers={"Idempotency-Key": "burst-1"})
        # The same key for a different event is the caller's mistake: 409, nothing written.
        conflict = await api.post(
            6, {**resolved(1), "answer": "another"}, headers={"Idempotency-Key": "single-1"}
        )
        assert conflict[0] == 200
        conflict = await api.post(
            6, {**resolved(1), "answer": "changed"}, headers={"Idempotency-Key": "single-1"}
        )
    assert first[0] == again[0] == 200 and first[2] == again[2]
    assert [c["seq"] for c in first[2]["cursors"]] == [1, 2, 3, 4, 5]
    assert conflict[0] == 409 and conflict[2]["error"]["code"] == "idempotency_conflict"
    assert [f["seq"] for f in stream(redis_url, 6)] == [1, 2, 3, 4, 5, 6]


async def test_one_event_and_an_array_of_it_under_one_key_publish_it_once(redis_url) -> None:
    """One event is the first of an array of one: a client that retries a single event as an
    array (a retry loop that sends what is pending as a batch), or an array's first event alone,
    under the same Idempotency-Key, publishes it once. The single event had a publisher key of
    its own, beside the array's ``<key>:0``: both were written, each answered 200."""
    long_key = "k" * 96  # (its plain form fits 200 characters alone, not with an index)
    async with served(redis_url) as api:
        for key, project in (("pending-1", 3), (long_key, 4)):
            headers = {"Idempotency-Key": key}
            single = await api.post(project, resolved(1), headers=headers)
            as_array = await api.post(project, [resolved(1)], headers=headers)
            longer = await api.post(project, [resolved(1), resolved(2)], headers=headers)
            again = await api.post(project, resolved(1), headers=headers)
            other = await api.post(project, resolved(3), headers=headers)
            assert single[0] == as_array[0] == longer[0] == again[0] == 200
            cursor = single[2]["cursor"]
            assert as_array[2]["cursors"] == [cursor] and again[2]["cursor"] == cursor
            assert [c["seq"] for c in longer[2]["cursors"]] == [1, 2]
            assert other[0] == 409 and other[2]["error"]["code"] == "idempotency_conflict"
            assert [f["blocker_id"] for f in stream(redis_url, project)] == [1, 2]
        # And the other way round: an array first, then its first event alone.
        headers = {"Idempotency-Key": "pending-2"}
        first = await api.post(5, [resolved(1), resolved(2)], headers=headers)
        alone = await api.post(5, resolved(1), headers=headers)
        assert alone[0] == 200 and alone[2]["cursor"] == first[2]["cursors"][0]
    assert [f["blocker_id"] for f in stream(redis_url, 5)] == [1, 2]


# Short ones, with and without ':'; long ones (whose plain form would pass 200 characters).
_KEY_ID = st.text("ab:._-0", min_size=1, max_size=4) | st.text("k", min_size=90, max_size=100)
_IDEMPOTENCY = st.text("ab:~!0", min_size=1, max_size=4) | st.text("i:", min_size=90, max_size=100)
_INDEX = st.integers(0, 499)


@settings(max_examples=500, deadline=None)
@given(st.tuples(_KEY_ID, _IDEMPOTENCY, _INDEX), st.tuples(_KEY_ID, _IDEMPOTENCY, _INDEX))
def test_publisher_keys_are_valid_and_never_shared_by_two_requests(first, second) -> None:
    """Each (credential, Idempotency-Key, index in the array) has its own publisher key, one
    the publisher takes: any pair of them meeting would publish one service's event in place
    of another's. A single event is index 0 (the first of an array of one), whatever the
    length of the array it is compared with."""
    from publisher.core import valid_idempotency_key
    from publisher.http_api.app import _publisher_keys

    def key(key_id: str, idempotency_key: str, index: int) -> str:
        return _publisher_keys(key_id, idempotency_key, index + 1, 500)[index]

    for key_id, idempotency_key, index in (first, second):
        keys = _publisher_keys(key_id, idempotency_key, 500, 500)
        assert keys[index] == key(key_id, idempotency_key, index)  # whatever the array's length
    assert valid_idempotency_key(key(*first)) and valid_idempotency_key(key(*second))
    assert (key(*first) == key(*second)) == (first == second)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | st.builds(lambda s: f"Bearer {s}", st.text(max_size=60)))
def test_any_authorization_is_a_key_or_a_401(authorization: str) -> None:
    creds = credentials()
    try:
        key = creds.authenticate(authorization)
    except ApiError as error:
        assert error.status == 401 and error.code == "unauthorized"
    else:
        assert hash_key(authorization.partition(" ")[2].strip()) == key.sha256


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | st.from_regex(r"\A/v1/projects/[0-9]{1,20}/events\Z"))
def test_any_path_is_a_project_or_a_404(path: str) -> None:
    try:
        project = parse_project_path(path)
    except ApiError as error:
        assert error.status == 404
    else:
        assert 0 < project <= 2**53 - 1 and project == int(path.split("/")[3])


async def test_redis_unavailable_is_logged_once_a_second_not_per_request() -> None:
    """Every request during a Redis outage logged a warning: at thousands of requests a second,
    thousands of lines. The first is logged, then at most one a second with the number of the
    others; the 503s are all counted."""

    from publisher.core import PublisherUnavailable

    class Down:
        async def publish(self, event, **kwargs):
            raise PublisherUnavailable("Redis unavailable: no reply within 10 s")

    now = [0.0]
    app = PublishApi(Down(), credentials(), clock=lambda: now[0])
    body = json.dumps(EXPIRED).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/projects/1/events",
        "headers": [
            (b"authorization", f"Bearer {KEY_ALL}".encode()),
            (b"content-type", b"application/json"),
        ],
    }

    async def request() -> int:
        sent = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)
        return sent[0]["status"]

    with structlog.testing.capture_logs() as logs:
        assert {await request() for _ in range(100)} == {503}
        now[0] = 0.5
        await request()
        now[0] = 1.0
        await request()
    lines = [line for line in logs if line["event"] == "http_publish_unavailable"]
    assert [line.get("suppressed", 0) for line in lines] == [0, 100]
    assert app.counters.responses[503, "unavailable"] == 102


def test_docs_list_every_serve_option_with_its_default(monkeypatch) -> None:
    """docs/http-publish.md's table of `serve` options is the parser's (it once had none, and
    `serve --help` names the flags without their defaults)."""
    import argparse

    from publisher.http_api.__main__ import _parser

    for name in list(os.environ):
        if name.startswith("EVENTBUS_"):
            monkeypatch.delenv(name)
    docs = (Path(__file__).parents[1] / "docs" / "http-publish.md").read_text()
    rows = {
        row.split("|")[1].strip(" `"): row for row in docs.splitlines() if row.startswith("| `--")
    }
    commands = next(a for a in _parser("x")._actions if isinstance(a, argparse._SubParsersAction))
    options = [
        a for a in commands.choices["serve"]._actions if a.option_strings != ["-h", "--help"]
    ]
    assert sorted(rows) == sorted(a.option_strings[0] for a in options)
    for action in options:
        default = "(required)" if action.default is None else f"`{action.default}`"
        assert default in rows[action.option_strings[0]].split("|")[3], action.option_strings


# --- POST /v1/revocations ----------------------------------------------------------------------


def revoking_credentials() -> Credentials:
    """The usual keys, and one that may revoke (and publish to project 1)."""
    return Credentials(
        [
            ApiKey(id="all", sha256=hash_key(KEY_ALL), projects="*"),
            ApiKey(id="one", sha256=hash_key(KEY_ONE), projects=[1]),
            ApiKey(id="admin", sha256=hash_key(KEY_REVOKE), projects=[1], revoke=True),
        ]
    )


async def post_revocation(
    api: Api, body: bytes | object, *, key: str | None = KEY_REVOKE, content_type="application/json"
) -> tuple[int, dict[str, str], dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = [
        "POST /v1/revocations HTTP/1.1",
        "Host: test",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(data)}",
        "Connection: close",
    ]
    if key is not None:
        head.append(f"Authorization: Bearer {key}")
    status, headers, answer = await api.raw(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    return status, headers, json.loads(answer) if answer else {}


def test_only_keys_given_revoke_may_revoke_and_the_keys_file_says_so() -> None:
    assert not ApiKey(id="a", sha256=hash_key("a"), projects="*").revoke  # the default
    entry = {"id": "a", "sha256": hash_key("k"), "projects": [1]}
    creds = Credentials.from_json(json.dumps({"keys": [{**entry, "revoke": True}]}))
    assert creds.authenticate("Bearer k").revoke
    with pytest.raises(ValueError, match=r"\$.keys\[0\].revoke"):
        Credentials.from_json(json.dumps({"keys": [{**entry, "revoke": "yes"}]}))


def test_parse_revocation_takes_the_three_fields_and_names_a_wrong_one() -> None:
    request = parse_revocation(b'{"subject":"user-7","issued_before":5,"keep_for":60}')
    assert (request.subject, request.issued_before, request.keep_for) == ("user-7", 5, 60)
    assert parse_revocation(b'{"subject":"u"}').keep_for is None
    cases = {
        b"{": (400, "invalid_json"),
        b'{"subject":"a","subject":"b"}': (400, "repeated_key"),
        b"[]": (422, "invalid_revocation"),
        b"{}": (422, "invalid_revocation"),
        b'{"subject":""}': (422, "invalid_revocation"),
        b'{"subject":7}': (422, "invalid_revocation"),
        b'{"subject":"u","keep_for":0}': (422, "invalid_revocation"),
        b'{"subject":"u","keep_for":1.5}': (422, "invalid_revocation"),
        b'{"subject":"u","issued_before":-1}': (422, "invalid_revocation"),
        b'{"subject":"u","issued_before":"now"}': (422, "invalid_revocation"),
        b'{"subject":"u","sub":"v"}': (422, "invalid_revocation"),  # a misspelt field
    }
    for body, (status, code) in cases.items():
        with pytest.raises(ApiError) as error:
            parse_revocation(body)
        assert (error.value.status, error.value.code) == (status, code), body


async def test_a_revoking_key_revokes_and_gets_the_merged_entry(redis_url, redis_client) -> None:
    now = int(time.time())
    async with served(redis_url, revoking_credentials()) as api:
        status, _, body = await post_revocation(api, {"subject": "user-7"})
        assert status == 200, body
        first = body["revocation"]
        assert first["subject"] == "user-7"
        assert first["expires_at"] == first["issued_before"] + 24 * 3600
        status, _, body = await post_revocation(
            api, {"subject": "user-7", "issued_before": now - 60, "keep_for": 48 * 3600}
        )
        assert status == 200, body
        # Merged: the later issued_before, the later expiry.
        assert body["revocation"] == {
            "subject": "user-7",
            "issued_before": first["issued_before"],
            "expires_at": now - 60 + 48 * 3600,
        }
    revocations, malformed = RevocationList.from_hash(
        redis_client.hgetall(Keys().revocations()), time.time()
    )
    assert malformed == 0
    assert [r.expires_at for r in revocations] == [now - 60 + 48 * 3600]


async def test_revocation_requests_get_their_documented_errors_and_revoke_nothing(
    redis_url, redis_client
) -> None:
    async with served(redis_url, revoking_credentials()) as api:
        future = int(time.time()) + 3600
        cases = [
            (dict(body={"subject": "u"}, key=None), 401, "unauthorized"),
            (dict(body={"subject": "u"}, key="ebk_wrong"), 401, "unauthorized"),
            (dict(body={"subject": "u"}, key=KEY_ALL), 403, "forbidden"),  # publishes, only
            (dict(body={"subject": "u"}, content_type="text/plain"), 415, "unsupported_media_type"),
            (dict(body=b"nope"), 400, "invalid_json"),
            (dict(body={"subject": "u", "keep_for": "1h"}), 422, "invalid_revocation"),
            (dict(body={"subject": "x" * 1025}), 422, "invalid_revocation"),
            (dict(body={"subject": "u", "keep_for": 10**9}), 422, "invalid_revocation"),
            (dict(body={"subject": "u", "issued_before": future}), 422, "invalid_revocation"),
            # Half a surrogate pair: not text (msgspec refuses the escape).
            (dict(body={"subject": "u\ud83d"}), 400, "invalid_json"),
            (dict(body={"subject": "u", "pad": "x" * 20000}), 413, "body_too_large"),
        ]
        for kwargs, status, code in cases:
            got, _, body = await post_revocation(api, **kwargs)
            assert (got, body["error"]["code"]) == (status, code), (kwargs, body)
        got, headers, _ = await api.raw(
            b"GET /v1/revocations HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        assert got == 405 and headers["allow"] == "POST"
        # The key that may revoke publishes only where its projects say.
        status, _, body = await api.post(2, EXPIRED, key=KEY_REVOKE)
        assert status == 403
    assert redis_client.keys("*") == []


async def test_a_revocation_with_redis_down_is_503() -> None:
    with RedisServer() as server:
        async with served(server.url, revoking_credentials()) as api:
            server.stop()
            status, headers, body = await post_revocation(api, {"subject": "u"})
            assert status == 503 and body["error"]["code"] == "unavailable"
            assert headers["retry-after"] == "1"


async def test_a_damaged_revocations_key_is_502(redis_url, redis_client) -> None:
    redis_client.set(Keys().revocations(), "another writer's")
    async with served(redis_url, revoking_credentials()) as api:
        status, _, body = await post_revocation(api, {"subject": "u"})
    assert status == 502 and body["error"]["code"] == "revocation_failed"
    assert Keys().revocations() in body["error"]["message"]


async def test_a_full_revocation_list_is_507_and_changes_nothing(redis_url, redis_client) -> None:
    """A new subject on a full list: 507 revocation_list_full (counted, logged once a second at
    most), the list and its version as they were; a subject in the list is still updated."""
    now = int(time.time())
    value = b'{"issued_before":%d,"expires_at":%d}' % (now - 10, now + 3600)
    redis_client.hset(Keys().revocations(), mapping={"user-1": value, "user-2": value})
    before = (
        redis_client.hgetall(Keys().revocations()),
        redis_client.get(Keys().revocations_version()),
    )
    publisher = AsyncPublisher.from_url(redis_url, max_revocations=2)
    with structlog.testing.capture_logs() as logs:
        async with serving_app(publisher, revoking_credentials()) as (_, _, port):
            api = Api(port)
            for _ in range(3):
                status, headers, body = await post_revocation(api, {"subject": "user-3"})
                assert status == 507, body
                assert body["error"]["code"] == "revocation_list_full"
                assert "full (2 entries, at most 2)" in body["error"]["message"]
                assert "retry-after" not in headers  # it takes an operator, not time
            after = (
                redis_client.hgetall(Keys().revocations()),
                redis_client.get(Keys().revocations_version()),
            )
            assert after == before
            status, _, body = await post_revocation(api, {"subject": "user-2", "keep_for": 7200})
            assert status == 200 and body["revocation"]["subject"] == "user-2", body
            metrics = await api.raw(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            assert b'status="507",code="revocation_list_full"} 3' in metrics[2]
    warnings = [line for line in logs if line["event"] == "revocation_list_full"]
    assert warnings == [
        {
            "event": "revocation_list_full",
            "log_level": "warning",
            "key_id": "admin",
            "entries": 2,
            "limit": 2,
        }
    ]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EVENTBUS_LOG_LEVEL", "verbose"),
        ("EVENTBUS_LOG_LEVEL", "notset"),
        ("EVENTBUS_LOG_FORMAT", "text"),
    ],
)
def test_serve_refuses_a_log_setting_from_the_environment_it_does_not_know(
    tmp_path, variable, value
) -> None:
    """argparse checks ``--log-level``/``--log-format`` against their choices, not the defaults
    that the environment gives them: such a value crashed serve with a ValueError's traceback.
    It is refused as the flags' are (exit 2, the variable named)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    out = run_serve(
        None, tmp_path, "--redis-url", "redis://127.0.0.1:1/0", env={**env, variable: value}
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and variable in out.stderr and value in out.stderr


def test_serve_takes_a_log_level_in_any_case(monkeypatch) -> None:
    """As the relay's does: ``--log-level WARNING`` (or from the environment)."""
    from publisher.http_api.__main__ import _parser

    monkeypatch.delenv("EVENTBUS_LOG_LEVEL", raising=False)
    assert _parser("x").parse_args(["serve", "--log-level", "WARNING"]).log_level == "warning"
    monkeypatch.setenv("EVENTBUS_LOG_LEVEL", "Critical")
    assert _parser("x").parse_args(["serve"]).log_level == "critical"


def test_serve_refuses_a_cap_that_cannot_work(tmp_path) -> None:
    out = run_serve(None, tmp_path, "--max-revocations", "0")
    assert out.returncode == 2 and "max_revocations" in out.stderr, out.stderr


def test_new_key_may_revoke_only_when_asked(capsys) -> None:
    from publisher.http_api.__main__ import main

    assert main(["new-key", "--id", "app", "--projects", "1"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["revoke"] is False
    assert main(["new-key", "--id", "admin", "--projects", "1", "--may-revoke"]) == 0
    lines = capsys.readouterr().out.splitlines()
    key = lines[0].split()[-1]
    creds = Credentials.from_json(json.dumps({"keys": [json.loads(lines[-1])]}))
    assert creds.authenticate(f"Bearer {key}").revoke


async def test_each_revocation_is_logged_with_who_whose_and_until_when_and_no_key(
    redis_url,
) -> None:
    """docs/http-publish.md: each revocation is logged (an operator's action), with the key's id,
    never the key; a refused attempt revokes nothing and logs no revocation."""
    with structlog.testing.capture_logs() as logs:
        async with served(redis_url, revoking_credentials()) as api:
            status, _, body = await post_revocation(api, {"subject": "user-7"})
            assert status == 200, body
            assert (await post_revocation(api, {"subject": "user-8"}, key=KEY_ALL))[0] == 403
    revocation = body["revocation"]
    assert [line for line in logs if line["event"] == "tokens_revoked"] == [
        {
            "event": "tokens_revoked",
            "log_level": "info",
            "key_id": "admin",
            "subject": "user-7",
            "issued_before": revocation["issued_before"],
            "expires_at": revocation["expires_at"],
        }
    ]
    assert KEY_REVOKE not in repr(logs) and KEY_ALL not in repr(logs)


_NEAR_NOW = st.builds(lambda d: int(time.time()) + d, st.integers(-400 * 86400, 400 * 86400))
_REVOCATION_VALUE = st.one_of(
    st.integers(),
    _NEAR_NOW,
    st.integers(-5, 400 * 86400),
    st.floats(),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    subject=st.one_of(
        st.text(min_size=0, max_size=40),
        st.text(st.characters(min_codepoint=0x80), min_size=340, max_size=400),
        st.integers(),
        st.none(),
        st.lists(st.text(max_size=3), max_size=2),
    ),
    options=st.dictionaries(st.sampled_from(["issued_before", "keep_for"]), _REVOCATION_VALUE),
)
def test_fuzzed_revocations_by_a_revoking_key_get_a_documented_answer(
    redis_url, subject, options
) -> None:
    """Every request a revoking key can make to POST /v1/revocations: 200 with the entry now
    stored, or a documented 400/422 that wrote nothing (the version did not change)."""
    client = redis.Redis.from_url(redis_url)
    version_before = client.get(Keys().revocations_version())
    body = json.dumps({"subject": subject, **options}).encode()  # (NaN: not JSON, a 400)

    async def run() -> tuple[int, dict]:
        async with served(redis_url, revoking_credentials()) as api:
            status, _, answer = await post_revocation(api, body)
            return status, answer

    try:
        status, answer = asyncio.run(run())
        version_after = client.get(Keys().revocations_version())
        if status == 200:
            revocation = answer["revocation"]
            assert revocation["subject"] == subject
            assert version_after != version_before
            stored, malformed = RevocationList.from_hash(
                client.hgetall(Keys().revocations()), time.time()
            )
            assert malformed == 0
            entry = stored.get(subject)
            if revocation["expires_at"] > time.time() + 1:
                assert entry is not None
                assert [entry.issued_before, entry.expires_at] == [
                    revocation["issued_before"],
                    revocation["expires_at"],
                ]
        else:
            code = answer["error"]["code"]
            assert (status, code) in {
                (400, "invalid_json"),
                (400, "repeated_key"),
                (422, "invalid_revocation"),
            }, (status, answer)
            assert version_after == version_before
    finally:
        client.close()


async def test_a_key_may_revoke_without_publishing_anywhere(redis_url, capsys) -> None:
    """Least privilege: the service that revokes people's access (an accounts service) needs
    no project to publish to; a key had to name one."""
    from publisher.http_api.__main__ import main

    assert main(["new-key", "--id", "accounts", "--may-revoke"]) == 0
    lines = capsys.readouterr().out.splitlines()
    entry = json.loads(lines[-1])
    assert (entry["projects"], entry["revoke"]) == ([], True)
    key = lines[0].split()[-1]
    assert main(["new-key", "--id", "nothing"]) == 2  # neither publishes nor revokes
    assert "--projects" in capsys.readouterr().err
    async with served(redis_url, Credentials.from_json(json.dumps({"keys": [entry]}))) as api:
        status, _, body = await api.post(1, EXPIRED, key=key)
        assert (status, body["error"]["code"]) == (403, "forbidden")
        status, _, body = await post_revocation(api, {"subject": "user-7"}, key=key)
        assert status == 200, body


# --- logs --------------------------------------------------------------------------------------


def _serve_process(keys: Path, port: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "publisher.http_api", "serve", "--keys-file", str(keys),
         "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")},
    )  # fmt: skip


def _json_lines(text: str) -> list[dict]:
    """Every line of ``text`` as JSON (json.loads raises on a line that is not)."""
    return [json.loads(line) for line in text.splitlines()]


def test_serve_logs_json_lines_to_stderr_its_own_and_uvicorns(tmp_path) -> None:
    """``serve`` wrote structlog's development columns to stdout (the library's defaults: it
    configured nothing) and uvicorn's lines as plain text: no log collector could parse either.
    Now both are JSON lines on stderr (``--log-format auto`` off a terminal), as the gateway's."""
    key = "a-key-of-the-logging-test"
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"id": "a", "sha256": hash_key(key), "projects": "*"}]}))
    port = free_port()
    # Redis refuses connections at port 1: a publish is 503 and logged.
    server = _serve_process(keys, port, "--redis-url", "redis://127.0.0.1:1/0")
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, body = _post_event(port, key)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "never listened"
                time.sleep(0.05)
        assert status == 503 and json.loads(body)["error"]["code"] == "unavailable"
        # The same port again: uvicorn's own error line, and its exit code for a start that failed.
        second = _serve_process(keys, port)
        out, err = second.communicate(timeout=30)
        assert second.returncode == 3 and out == ""  # uvicorn's STARTUP_FAILURE
        assert any(
            line["level"] == "error" and "address already in use" in line["event"]
            for line in _json_lines(err)
        ), err
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
    assert out == ""
    lines = _json_lines(err)
    assert [line["level"] for line in lines if line["event"] == "http_publish_unavailable"] == [
        "warning"
    ], err
    assert all("timestamp" in line for line in lines)


def _post_event(port: int, key: str) -> tuple[int, bytes]:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(
            "POST",
            "/v1/projects/1/events",
            body=json.dumps(EXPIRED),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()
