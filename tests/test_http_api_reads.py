"""The HTTP API's reads: ``GET /v1/projects/{id}/presence`` and ``GET /v1/projects/{id}/events``
(a page of history, the gateway's poll), for a backend in any language. Their pure parsing
without sockets, the ASGI app without sockets for the fuzzing, then served against real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from unittest.mock import ANY

import msgspec
import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from publisher import AsyncPublisher
from publisher.http_api import ApiError, ApiKey, Credentials, HttpApiSettings, PublishApi, hash_key
from publisher.http_api.app import redis_places
from publisher.http_api.core import (
    parse_history_query,
    parse_presence_query,
    parse_route,
    presence_body,
)
from schemas.history import MAX_POLL_LIMIT, PollQuery
from schemas.keys import Keys
from schemas.presence import WRITE, PodRecord, encode_record
from schemas.protocol import MAX_SEQ, Member, PollResponse, Presence
from tests.support.redis_server import RedisServer, hung
from tests.test_http_api import (
    EXPIRED,
    KEY_ALL,
    KEY_ONE,
    Api,
    _doc_snippet,
    resolved,
    serving_app,
)

KEY_REVOKE_ONLY = "ebk_revoke-only-key"
KEY_SLOW = "ebk_slow-key"


def read_credentials() -> Credentials:
    return Credentials(
        [
            ApiKey(id="all", sha256=hash_key(KEY_ALL), projects="*"),
            ApiKey(id="one", sha256=hash_key(KEY_ONE), projects=[1]),
            ApiKey(id="accounts", sha256=hash_key(KEY_REVOKE_ONLY), projects=[], revoke=True),
            ApiKey(id="slow", sha256=hash_key(KEY_SLOW), projects="*", rate=0.01, burst=2),
        ]
    )


# --- pure core -------------------------------------------------------------------------------


def test_routes_name_a_project_and_its_events_or_presence() -> None:
    assert parse_route("/v1/projects/42/events") == (42, "events")
    assert parse_route("/v1/projects/42/presence") == (42, "presence")
    for bad in ("/v1/projects/0/presence", "/v1/projects/1/presence/", "/v1/projects/1/members"):
        with pytest.raises(ApiError) as error:
            parse_route(bad)
        assert error.value.status == 404
    with pytest.raises(ApiError) as error:
        parse_route("/v1/projects/1/members")
    assert "GET /v1/projects/{id}/presence" in error.value.message  # the 404 names the endpoints


def test_the_history_query_is_the_gateways_poll_query_or_a_400_naming_the_parameter() -> None:
    assert parse_history_query(b"") == PollQuery(None, None, None, 100)
    assert parse_history_query(b"epoch=e1&after=3&limit=7") == PollQuery("e1", 3, None, 7)
    for query, message in [
        (b"epoch=e1&after=-1", "after must be an integer from 0 to"),
        (b"epoch=e1&after=abc", "after must be"),
        (b"epoch=e1&after=" + str(MAX_SEQ + 1).encode(), "after must be"),
        (b"limit=0", f"limit must be an integer from 1 to {MAX_POLL_LIMIT}"),
        (b"limit=" + b"9" * 5000, "limit must be"),
        (b"limit=5&limit=6", "limit given more than once"),
        (b"limit=&limit=6", "limit given more than once"),
        (b"after=5", "give both epoch and after"),
        (b"since=5", "unknown query parameters: since"),
        (b"epoch=\xc3\xa9&after=1", "not ASCII"),
    ]:
        with pytest.raises(ApiError) as error:
            parse_history_query(query)
        assert (error.value.status, error.value.code) == (400, "invalid_query")
        assert message in error.value.message, (query, error.value.message)


def test_presence_takes_no_query_and_answers_the_gateways_presence_message() -> None:
    parse_presence_query(b"")
    with pytest.raises(ApiError) as error:
        parse_presence_query(b"limit=5")
    assert (error.value.status, error.value.code) == (400, "invalid_query")
    members = [Member(id="alice", name="Alice", viewing=3, answering=None, since=1)]
    body = presence_body(7, members)
    assert msgspec.json.decode(body, type=Presence) == Presence(project_id=7, members=members)
    assert json.loads(body)["type"] == "presence"


def test_settings_of_the_reads_that_cannot_work_are_refused_by_name() -> None:
    for flag, value in [
        ("presence_max_members", 0),
        ("history_page_bytes", 100),
        ("history_page_bytes", 8 * 1024 * 1024),
    ]:
        with pytest.raises(ValueError, match=flag.replace("_", "-")):
            HttpApiSettings(**{flag: value})


def test_the_api_runs_as_many_redis_calls_at_once_as_its_pool_holds_with_room_for_readyz() -> None:
    """redis-py's pool refuses a call past its size at once ("Too many connections"), so the
    API runs at most that many, less the idle connections the publisher keeps and one for
    ``/readyz``'s PING; per node on Redis Cluster."""
    from publisher.connection import idle_limit

    for url, size in [
        ("redis://127.0.0.1:1/0", 100),
        ("redis://127.0.0.1:1/0?max_connections=10", 10),
    ]:
        client = AsyncPublisher.from_url(url).client
        places = redis_places(client)
        assert places >= 1 and places + idle_limit(client.connection_pool) + 1 == size, url

    class Cluster:  # (what a redis-py cluster client shows of its nodes' pools)
        connection_kwargs = {"max_connections": 40}

    assert redis_places(Cluster()) == 39
    assert redis_places(None) == 99  # a stand-in publisher without a client: redis-py's 100


class _Unused:
    """A publisher the fuzzed requests below must never reach with a bad query."""

    async def history(self, project_id, **page):
        return PollResponse(project_id=project_id, epoch="e", seq=0, events=[])

    async def presence(self, project_id, **options):
        return []

    async def aclose(self) -> None:
        pass


async def _asgi_get(app: PublishApi, path: str, query: bytes, key: str = KEY_ALL):
    answer: dict = {}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        answer.update(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "query_string": query,
        "headers": [(b"authorization", f"Bearer {key}".encode())],
    }
    await app(scope, receive, send)
    return answer["status"], answer["body"]


_PARAM = st.sampled_from(["epoch", "after", "tag", "limit", "x", "", "after%00", "Limit"])
_VALUE = st.one_of(
    st.text(max_size=12).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(-(2**70), 2**70).map(lambda n: str(n).encode()),
    st.sampled_from([b"e1", b"0123456789abcdef", b"%31", b"1e3", b" 5", b"\xff", b"+5"]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(st.tuples(_PARAM, _VALUE), max_size=6).map(
        lambda pairs: b"&".join(k.encode() + b"=" + v for k, v in pairs)
    )
    | st.binary(max_size=40)
)
def test_any_history_query_is_a_page_or_a_400_invalid_query(query: bytes) -> None:
    """Negative, huge, non-numeric, repeated, unknown, percent-encoded, not ASCII: every query
    is a valid page (answered 200) or a 400 ``invalid_query`` in the API's error body."""
    app = PublishApi(_Unused(), read_credentials(), HttpApiSettings())  # type: ignore[arg-type]
    try:
        expected = parse_history_query(query)
    except ApiError as error:
        assert (error.status, error.code) == (400, "invalid_query") and error.message
        expected = None
    status, body = asyncio.run(_asgi_get(app, "/v1/projects/1/events", query))
    if expected is None:
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_query"
    else:
        assert status == 200, body
        assert 0 <= (expected.after or 0) <= MAX_SEQ and 1 <= expected.limit <= MAX_POLL_LIMIT


# --- served, against real Redis --------------------------------------------------------------


class ReadApi(Api):
    async def get(self, target: str, key: str | None = KEY_ALL) -> tuple[int, dict[str, str], dict]:
        head = [f"GET {target} HTTP/1.1", "Host: t", "Connection: close"]
        if key is not None:
            head.append(f"Authorization: Bearer {key}")
        status, headers, body = await self.raw(("\r\n".join(head) + "\r\n\r\n").encode())
        return status, headers, json.loads(body) if body else {}


def _serve(redis_url: str, redis_timeout: float | None = None, **settings_):
    """The API with :func:`read_credentials`, as ``serving_app`` serves it."""
    publisher = AsyncPublisher.from_url(redis_url, timeout=redis_timeout)
    return serving_app(publisher, read_credentials(), **settings_)


def _write_presence(redis_url: str, project: int, pod: str, members: dict[str, PodRecord]) -> None:
    keys = Keys()
    args: list = [keys.presence_pod_prefix(project), pod, 60_000, 0, 1, "PUBLISH"]
    args += [keys.presence_channel(project), "1"]
    for member_id, record in members.items():
        args += [member_id, encode_record(record)]
    client = redis.Redis.from_url(redis_url)
    try:
        client.eval(WRITE, 2, keys.presence_pods(project), keys.presence_versions(project), *args)
    finally:
        client.close()


async def test_presence_lists_the_members_as_the_gateways_presence_message(redis_url) -> None:
    now = int(time.time() * 1000)
    _write_presence(
        redis_url,
        1,
        "pod-a",
        {
            "bob": PodRecord(None, 4, None, now - 5, now),
            "alice": PodRecord("Alice", 3, 9, now - 10, now),
        },
    )
    _write_presence(redis_url, 1, "pod-b", {"alice": PodRecord("Alice", 3, 11, now - 20, now + 1)})
    async with _serve(redis_url) as (_, _, port):
        api = ReadApi(port)
        status, _, body = await api.get("/v1/projects/1/presence", key=KEY_ONE)
        assert status == 200
        assert body == {
            "type": "presence",
            "project_id": 1,
            "members": [
                {"id": "alice", "name": "Alice", "viewing": 3, "answering": 11, "since": now - 20},
                {"id": "bob", "name": None, "viewing": 4, "answering": None, "since": now - 5},
            ],
        }
        assert (await api.get("/v1/projects/2/presence"))[2]["members"] == []


async def test_presence_reads_as_many_members_as_the_gateways_are_set_to_list(redis_url) -> None:
    """``--presence-max-members``: a pod listing more than a read of the default takes (2,064)
    is taken for another writer's and left out whole, unless the API has the gateways' setting."""
    now = int(time.time() * 1000)
    many = {f"m{i:04}": PodRecord(None, None, None, now, now) for i in range(2_100)}
    _write_presence(redis_url, 3, "pod-a", many)
    async with _serve(redis_url) as (_, _, port):
        assert (await ReadApi(port).get("/v1/projects/3/presence"))[2]["members"] == []
    async with _serve(redis_url, presence_max_members=2_500) as (_, _, port):
        assert len((await ReadApi(port).get("/v1/projects/3/presence"))[2]["members"]) == 2_100


async def test_history_pages_through_what_was_published_with_the_epoch(redis_url) -> None:
    async with _serve(redis_url) as (_, _, port):
        api = ReadApi(port)
        start = (await api.get("/v1/projects/1/events", key=KEY_ONE))[2]
        assert (start["seq"], start["events"], start["resync_required"]) == (0, [], None)
        for blocker in range(1, 6):
            assert (await api.post(1, {**EXPIRED, "blocker_id": blocker}, key=KEY_ONE))[0] == 200
        status, _, page = await api.get(
            f"/v1/projects/1/events?epoch={start['epoch']}&after=0&limit=2", key=KEY_ONE
        )
        assert status == 200 and page["more"] and page["seq"] == 5
        assert [(e["seq"], e["blocker_id"]) for e in page["events"]] == [(1, 1), (2, 2)]
        rest = (
            await api.get(
                f"/v1/projects/1/events?epoch={page['epoch']}&after=2&tag={page['tag']}",
                key=KEY_ONE,
            )
        )[2]
        assert [e["seq"] for e in rest["events"]] == [3, 4, 5] and not rest["more"]
        # The answer is the gateway's poll answer, field for field.
        assert msgspec.json.decode(json.dumps(rest), type=PollResponse).seq == 5


async def test_history_signals_resync_for_another_epoch_or_a_trimmed_cursor(
    redis_url, redis_client
) -> None:
    async with _serve(redis_url) as (_, _, port):
        api = ReadApi(port)
        cursors = [(await api.post(2, EXPIRED))[2]["cursor"] for _ in range(5)]
        epoch = cursors[0]["epoch"]
        page = (await api.get("/v1/projects/2/events?epoch=gone&after=4"))[2]
        assert page["events"] == [] and page["resync_required"]["reason"] == "epoch_changed"
        assert (page["resync_required"]["epoch"], page["resync_required"]["seq"]) == (epoch, 5)
        redis_client.xtrim(Keys().stream(2), maxlen=2, approximate=False)  # retention
        page = (await api.get(f"/v1/projects/2/events?epoch={epoch}&after=1"))[2]
        assert page["resync_required"]["reason"] == "history_trimmed"
        page = (await api.get(f"/v1/projects/2/events?epoch={epoch}&after=3"))[2]
        assert [e["seq"] for e in page["events"]] == [4, 5]


async def test_reads_are_for_keys_that_may_publish_to_the_project(redis_url) -> None:
    async with _serve(redis_url) as (_, _, port):
        api = ReadApi(port)
        for path in ("/v1/projects/2/presence", "/v1/projects/2/events"):
            status, _, body = await api.get(path, key=KEY_ONE)
            assert status == 403 and body["error"]["code"] == "forbidden"
            status, _, body = await api.get(path, key=KEY_REVOKE_ONLY)
            assert status == 403 and "may publish to" in body["error"]["message"]
            for key in (None, "ebk_unknown"):
                status, _, body = await api.get(path, key=key)
                assert status == 401 and body["error"]["code"] == "unauthorized"
        status, headers, body = await api.raw(
            b"DELETE /v1/projects/1/presence HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        assert (status, headers["allow"]) == (405, "GET, HEAD")
        status, headers, _ = await api.raw(
            b"PUT /v1/projects/1/events HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        assert (status, headers["allow"]) == (405, "GET, HEAD, POST")
        status, _, body = await api.get("/v1/projects/1/events?limit=-1")
        assert status == 400 and body["error"]["code"] == "invalid_query"


async def test_head_of_a_read_answers_its_gets_headers_without_a_body(redis_url) -> None:
    """HEAD is GET without the body (RFC 9110): monitoring and link checkers probe reads so.
    The reads answered 405 to HEAD."""
    async with _serve(redis_url) as (_, _, port):
        api = ReadApi(port)
        for path in ("/v1/projects/2/events", "/v1/projects/2/presence", "/metrics"):
            head = f"HEAD {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            get = f"{head.replace('HEAD', 'GET', 1)}Authorization: Bearer {KEY_ALL}\r\n\r\n"
            status, headers, body = await api.raw(get.encode())
            assert status == 200 and body, path
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(f"{head}Authorization: Bearer {KEY_ALL}\r\n\r\n".encode())
                answer = await asyncio.wait_for(reader.read(), 10)  # to the close
            finally:
                writer.close()
            lines = answer.decode("latin-1").split("\r\n")
            assert lines[0].split()[1] == "200", (path, answer)
            assert answer.endswith(b"\r\n\r\n"), (path, answer)  # no body
            if path != "/metrics":  # (its counters moved with the GET)
                assert f"content-length: {headers['content-length']}" in answer.decode().lower()
        for path, allow in (("/v1/projects/1/presence", "GET, HEAD"), ("/metrics", "GET, HEAD")):
            request = f"DELETE {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            status, headers, _ = await api.raw(request.encode())
            assert (status, headers.get("allow")) == (405, allow), path


async def test_every_read_answers_another_method_405_with_allow(redis_url) -> None:
    """docs/http-publish.md: every read (presence, history, the probes, ``/metrics``,
    ``/openapi.json``) answers another method 405 with ``Allow``. The probes answered 404
    ``not_found`` (found by schemathesis' unsupported_method check: TRACE /healthz)."""
    reads = {
        "/v1/projects/1/presence": "GET, HEAD",
        "/v1/projects/1/events": "GET, HEAD, POST",
        "/healthz": "GET, HEAD",
        "/readyz": "GET, HEAD",
        "/metrics": "GET, HEAD",
        "/openapi.json": "GET, HEAD",
    }
    async with _serve(redis_url) as (_, _, port):
        api = ReadApi(port)
        for path, allow in reads.items():
            for method in ("DELETE", "PUT", "PATCH", "OPTIONS", "TRACE"):
                request = f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                status, headers, body = await api.raw(request.encode())
                assert (status, headers.get("allow")) == (405, allow), (method, path)
                assert json.loads(body)["error"]["code"] == "method_not_allowed", (method, path)


async def test_reads_are_rate_limited_like_publishes(redis_url) -> None:
    async with _serve(redis_url) as (_, _, port):
        api = ReadApi(port)
        assert (await api.get("/v1/projects/1/presence", key=KEY_SLOW))[0] == 200
        assert (await api.get("/v1/projects/1/events", key=KEY_SLOW))[0] == 200
        status, headers, body = await api.get("/v1/projects/1/events", key=KEY_SLOW)
        assert status == 429 and body["error"]["code"] == "rate_limited"
        assert int(headers["retry-after"]) >= 1
        assert (await api.get("/v1/projects/1/presence", key=KEY_ALL))[0] == 200  # per key


async def test_reads_from_a_hung_redis_are_a_bounded_503() -> None:
    with RedisServer() as server:
        async with _serve(server.url, redis_timeout=1.0) as (_, _, port):
            api = ReadApi(port)
            assert (await api.get("/v1/projects/1/events"))[0] == 200
            with hung(server):
                for path in ("/v1/projects/1/presence", "/v1/projects/1/events"):
                    started = time.monotonic()
                    status, headers, body = await api.get(path)
                    assert status == 503 and body["error"]["code"] == "unavailable"
                    assert headers["retry-after"] == "1"
                    assert time.monotonic() - started < 3


async def test_damaged_keys_are_a_502(redis_url, redis_client) -> None:
    redis_client.set(Keys().meta(4), "not a hash")
    redis_client.set(Keys().presence_pods(4), "not a zset")  # (reads as nobody: advisory)
    async with _serve(redis_url) as (_, _, port):
        status, _, body = await ReadApi(port).get("/v1/projects/4/events")
        assert status == 502 and body["error"]["code"] == "read_failed"
        assert (await ReadApi(port).get("/v1/projects/4/presence"))[2]["members"] == []


async def test_foreign_stream_entries_a_history_read_skips_are_counted(
    redis_url, redis_client
) -> None:
    """Another writer's entries in a project's stream are skipped by a history read (as by a
    gateway, where they count in ``eventbus_foreign_values_total``): the API's ``/metrics``
    counts them too, so an operator sees them (they were skipped without a trace)."""
    keys = Keys()
    async with _serve(redis_url) as (_, _, port):
        api = ReadApi(port)
        for blocker in (1, 2):
            assert (await api.post(5, {**EXPIRED, "blocker_id": blocker}))[0] == 200
        redis_client.xadd(keys.stream(5), {"x": "y"}, id="3-0")  # another writer's entry...
        redis_client.hincrby(keys.meta(5), "seq", 1)  # ...counted as an event
        metric = b'eventbus_foreign_values_total{kind="stream_entry"} '
        before = (await api.raw(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n"))[2]
        assert metric + b"0\n" in before
        start = (await api.get("/v1/projects/5/events"))[2]  # no cursor: no entries read
        assert start["seq"] == 3
        status, _, page = await api.get(f"/v1/projects/5/events?epoch={start['epoch']}&after=0")
        # The entry at 3 is no event: a page of 1 and 2, as a gateway's poll answers it.
        assert status == 200 and [e["seq"] for e in page["events"]] == [1, 2], page
        after = (await api.raw(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n"))[2]
        assert metric + b"1\n" in after, after


async def test_the_documented_curl_reads_answer(redis_url) -> None:
    async with _serve(redis_url) as (_, _, port):
        api = ReadApi(port)
        await api.post(1, EXPIRED, key=KEY_ONE)
        url = f"http://127.0.0.1:{port}/"
        env = {"EVENTBUS_API_KEY": KEY_ONE, "PATH": "/usr/bin:/bin:/usr/local/bin"}
        outputs = []
        for marker in ("/v1/projects/1/presence \\", "read_pages()"):
            script = _doc_snippet("sh", marker).replace("http://127.0.0.1:8766/", url)
            done = await asyncio.create_subprocess_exec(
                "bash", "-c", script, env=env, stdout=subprocess.PIPE
            )
            out, _ = await done.communicate()
            assert done.returncode == 0, script
            outputs.append(out)
    assert json.loads(outputs[0].splitlines()[0])["type"] == "presence"
    assert [json.loads(line)["seq"] for line in outputs[1].splitlines()] == [1]


async def test_the_documented_paging_loop_stops_loudly_on_an_error_answer(redis_url) -> None:
    """The documented paging loop, its key's rate spent mid-way (a 429): it must not end as if
    the history had been read to its end (exit 0, no word), but fail, saying what answered."""
    async with _serve(redis_url) as (_, _, port):
        api = ReadApi(port)
        for _ in range(3):
            await api.post(1, EXPIRED)
        url = f"http://127.0.0.1:{port}/"
        script = _doc_snippet("sh", "read_pages()").replace("http://127.0.0.1:8766/", url)
        script = script.replace("limit=100", "limit=1")  # three pages: the third read is a 429
        env = {"EVENTBUS_API_KEY": KEY_SLOW, "PATH": "/usr/bin:/bin:/usr/local/bin"}
        done = await asyncio.create_subprocess_exec(
            "bash", "-c", script, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await done.communicate()
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [1]
    assert done.returncode != 0 and b"rate_limited" in err


async def test_a_path_is_routed_as_sent_not_as_decoded(redis_url) -> None:
    """Each resource has one spelling. uvicorn percent-decodes the path it hands over, so
    ``/v1/projects/1%2Fpresence`` was served as ``/v1/projects/1/presence`` and ``/v1/projects/01/``
    as project 1: a proxy in front that allows or refuses by path (say, refusing
    ``/v1/projects/1/...`` to some callers) was passed by another spelling of the same resource.
    Now the API routes the path as it was sent (ASGI ``raw_path``), and a project id has no
    leading zero, as in the gateway: anything else is 404 ``not_found``."""
    async with _serve(redis_url) as (_, _, port):
        api = ReadApi(port)
        assert (await api.get("/v1/projects/1/presence", key=KEY_ALL))[0] == 200
        for path in (
            "/v1/projects/1%2Fpresence",
            "/v1/projects/1%2fevents",
            "/v1/projects/%31/presence",
            "/v1/projects/01/presence",
            "/v1/projects/1/%70resence",
            "/%68ealthz",
        ):
            status, _, body = await api.get(path, key=KEY_ALL)
            assert (status, body["error"]["code"]) == (404, "not_found"), path


async def test_a_burst_of_reads_past_the_redis_pool_waits_its_turn() -> None:
    """Every request in progress (``--limit-concurrency``, 1,000) made its Redis call at once,
    each taking a connection of redis-py's pool (100), which refuses the next one at once with
    "Too many connections": 300 history reads arriving while Redis was busy for a moment
    answered about 200 of them 503 ``unavailable`` (and ``/readyz`` not ready) against a
    healthy Redis. They wait their turn now, and a connection is left to ``/readyz``."""
    with RedisServer() as server:
        async with _serve(server.url, limit_concurrency=1000) as (_, uvicorn_server, port):
            api = ReadApi(port)
            start = (await api.get("/v1/projects/1/events"))[2]
            page = f"/v1/projects/1/events?epoch={start['epoch']}&after=0"
            with hung(server):  # busy: the calls made meanwhile hold their connections
                reads = [asyncio.create_task(api.get(page)) for _ in range(300)]
                # (every request started: uvicorn's tasks, no event to wait for)
                while len(uvicorn_server.server_state.tasks) < 300:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                # Longer than the publisher's retries of a refused connection (0.7 s), far
                # shorter than its timeout (10 s): a pause of Redis, not an outage.
                await asyncio.sleep(1.5)
                ready = asyncio.create_task(api.get("/readyz", key=None))
                await asyncio.sleep(0.2)  # the probe's PING sent (or refused) meanwhile
            answers = await asyncio.gather(*reads)
            assert sorted({status for status, _, _ in answers}) == [200], {
                (status, body.get("error", {}).get("message")) for status, _, body in answers
            }
            status, _, body = await ready
            assert (status, body) == (200, {"ready": True})


async def test_reads_waiting_for_a_hung_redis_answer_503_within_the_bound() -> None:
    """The wait for a place among the Redis calls counts against the publisher's timeout:
    300 reads of a hung Redis (most of them waiting behind the 49 calls in flight) are each
    answered 503 within it, not one timeout per turn; the probes and /metrics answer meanwhile."""
    with RedisServer() as server:
        async with _serve(server.url, redis_timeout=1.0, limit_concurrency=1000) as (_, _, port):
            api = ReadApi(port)
            with hung(server):
                started = time.monotonic()
                reads = [api.get(f"/v1/projects/{1 + i % 3}/presence") for i in range(300)]
                probes = [
                    api.raw(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
                    for path in ("/healthz", "/metrics")
                ]
                answers = await asyncio.gather(*reads, *probes)
                elapsed = time.monotonic() - started
            assert {(status, body["error"]["code"]) for status, _, body in answers[:300]} == {
                (503, "unavailable")
            }
            assert [status for status, _, _ in answers[300:]] == [200, 200]
            assert elapsed < 3, elapsed


@contextlib.contextmanager
def busy(server: RedisServer) -> Iterator[None]:
    """Redis running another client's endless script for the block: past its
    ``busy-reply-threshold`` (set to 0.1 s here) it answers every other command ``BUSY``, until
    the script is killed (after the block)."""
    client = server.client()
    client.config_set("busy-reply-threshold", 100)
    blocker = redis.Redis.from_url(server.url)

    def endless() -> None:
        with contextlib.suppress(redis.exceptions.ResponseError):  # "Script killed by user"
            blocker.eval("while true do end", 0)

    thread = threading.Thread(target=endless, daemon=True)
    thread.start()
    try:
        while True:  # until Redis answers BUSY (the script is running, past the threshold)
            try:
                client.ping()
            except redis.exceptions.ResponseError as exc:
                assert str(exc).startswith("BUSY"), exc
                break
        yield
    finally:
        while thread.is_alive():
            with contextlib.suppress(redis.exceptions.ResponseError):  # (not running yet)
                client.script_kill()
            thread.join(0.1)
        client.close()
        blocker.close()


async def test_a_redis_busy_running_a_script_is_503_unavailable_not_a_damaged_key() -> None:
    """Redis answers ``BUSY`` to every command while another client's script runs past
    ``busy-reply-threshold`` (5 s): it runs nothing else until the script ends or is killed, a
    Redis that does not answer. Reads were answered 502 ``read_failed`` ("the project's keys hold
    values the bus did not write") and publishes 502 ``publish_failed`` ("a damaged key"), while
    ``/readyz`` said not ready: now 503 ``unavailable`` with ``Retry-After``, as for a hung
    Redis, and nothing is written."""
    with RedisServer() as server:
        async with _serve(server.url) as (_, _, port):
            api = ReadApi(port)
            start = (await api.get("/v1/projects/1/events"))[2]
            with busy(server):
                for path in (
                    f"/v1/projects/1/events?epoch={start['epoch']}&after=0",
                    "/v1/projects/1/presence",
                ):
                    status, headers, body = await api.get(path)
                    assert (status, body["error"]["code"]) == (503, "unavailable"), (path, body)
                    assert headers["retry-after"] == "1"
                status, _, body = await api.post(1, EXPIRED)
                assert (status, body["error"]["code"]) == (503, "unavailable"), body
                status, _, body = await api.post(1, [EXPIRED, EXPIRED])
                assert (status, body["error"]["code"]) == (503, "unavailable"), body
            assert (await api.get("/v1/projects/1/events"))[2]["seq"] == 0  # nothing written


async def test_reads_of_a_hung_cluster_master_take_the_places_of_that_master_only(
    redis_cluster_factory,
) -> None:
    """The places of the Redis calls in flight are per master on Redis Cluster (each node has a
    pool of its own): 250 reads of projects of a hung master take all of its places, and a read
    of a project another master serves is answered at once, not after them."""
    cluster = redis_cluster_factory(masters=3, replicas=0)
    hung_node = cluster.masters()[0]
    projects = range(1, 300)
    on_hung = [p for p in projects if cluster.node_for_project(p) == hung_node][:5]
    elsewhere = next(p for p in projects if cluster.node_for_project(p) != hung_node)
    async with _serve(cluster.url, redis_timeout=3.0, limit_concurrency=1000) as (
        _,
        uvicorn_server,
        port,
    ):
        api = ReadApi(port)
        for project in (*on_hung, elsewhere):  # (the client's slot map loaded)
            assert (await api.get(f"/v1/projects/{project}/presence"))[0] == 200
        hung_node.freeze()
        try:
            stuck = [
                asyncio.create_task(api.get(f"/v1/projects/{on_hung[i % 5]}/presence"))
                for i in range(250)
            ]
            # (every request started: uvicorn's tasks, no event to wait for)
            while len(uvicorn_server.server_state.tasks) < 250:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            started = time.monotonic()
            status, _, body = await api.get(f"/v1/projects/{elsewhere}/presence")
            assert status == 200, body
            assert time.monotonic() - started < 1
        finally:
            hung_node.thaw()
        assert {status for status, _, _ in await asyncio.gather(*stuck)} <= {200, 503}


def _frame(project: int, seq: int) -> bytes:
    return b'{"type":"x","project_id":%d,"seq":%d}' % (project, seq)


_GARBAGE_VALUES = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([b"{}", b"7", b"Ep0ch", b"\xff"]),
    st.tuples(st.sampled_from([7, 17, 70, 1]), st.integers(0, 14)).map(lambda ps: _frame(*ps)),
)


_OURS_META = st.integers(0, 14).map(lambda top: {"epoch": b"Ep0ch", "seq": top})


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    meta=st.one_of(
        _OURS_META,  # (weighted: the bus's meta, with garbage in the stream, is the case to read)
        _OURS_META,
        _OURS_META,
        st.none(),
        st.just("a string"),
        st.dictionaries(st.sampled_from(["epoch", "seq", "x"]), _GARBAGE_VALUES, max_size=3),
    ),
    entries=st.lists(  # seq 1, 2, ...: the bus's frame, nothing (a hole) or another value
        st.one_of(
            st.just("ours"),
            st.just("ours"),
            st.just(None),
            st.dictionaries(st.sampled_from([b"f", b"t", b"x"]), _GARBAGE_VALUES, min_size=1),
        ),
        max_size=14,
    ).map(lambda kinds: {seq: kind for seq, kind in enumerate(kinds, 1) if kind is not None}),
    stream_is_a_hash=st.integers(0, 9).map(lambda n: n == 9),
    query=st.sampled_from(
        [
            b"epoch=Ep0ch&after=0",
            b"",
            b"epoch=Ep0ch&after=0&limit=3",
            b"epoch=Ep0ch&after=2",
            b"epoch=Ep0ch&after=14",
        ]
    ),
)
def test_any_stored_values_read_as_a_page_of_the_projects_events_or_a_502(
    redis_url, meta, entries, stream_is_a_hash, query
) -> None:
    """Whatever another writer left in project 7's meta and stream keys (values of any type,
    frames of other projects, of other seqs, not JSON), a history read answers 200 with events of
    project 7 only, in order, up to its top, or 502 ``read_failed``: never a 500, never another
    project's event."""
    keys = Keys()
    raw = redis.Redis.from_url(redis_url)
    try:
        raw.flushall()
        if isinstance(meta, str):
            raw.set(keys.meta(7), meta)
        elif meta:
            raw.hset(keys.meta(7), mapping=meta)
        if stream_is_a_hash:
            raw.hset(keys.stream(7), "f", _frame(7, 1))
        else:
            for seq in sorted(entries):
                fields = entries[seq]
                if fields == "ours":
                    fields = {b"f": _frame(7, seq), b"t": b"1"}
                raw.xadd(keys.stream(7), fields, id=f"{seq}-0")
    finally:
        raw.close()

    async def read() -> tuple[int, bytes]:
        publisher = AsyncPublisher.from_url(redis_url)
        try:
            app = PublishApi(publisher, read_credentials(), HttpApiSettings())
            return await _asgi_get(app, "/v1/projects/7/events", query)
        finally:
            await publisher.aclose()

    status, body = asyncio.run(read())
    answer = json.loads(body)
    event(f"{status}{' with events' if answer.get('events') else ''}")
    if status == 502:
        assert answer["error"]["code"] == "read_failed", answer
        return
    assert status == 200, answer
    page = msgspec.json.decode(body, type=PollResponse)
    seqs = [event["seq"] for event in answer["events"]]
    assert all(event["project_id"] == 7 for event in answer["events"]), answer
    assert seqs == sorted(set(seqs)) and all(0 < seq <= page.seq for seq in seqs), answer
    if page.resync_required is not None:
        assert seqs == []


async def test_readyz_on_a_cluster_asks_every_master_and_wants_a_majority(
    redis_cluster_factory,
) -> None:
    """``/readyz`` sent one ``PING``, which redis-py sends to one master (its default node, the
    master of slot 0): that master hung, every API process said not ready at once, and a load
    balancer had none to send the publishes of the other masters' projects to; another master
    hung, they said ready. It asks every master now, as the gateway does, and is ready while a
    majority of them answer."""
    cluster = redis_cluster_factory(masters=3, replicas=0)
    async with _serve(cluster.url, redis_timeout=3.0, ready_timeout=0.5) as (app, _, port):
        api = ReadApi(port)
        assert await api.get("/readyz", key=None) == (200, ANY, {"ready": True})
        default = app.publisher.client.get_default_node()
        masters = sorted(cluster.masters(), key=lambda node: node.port != default.port)
        masters[0].freeze()  # the node a plain PING goes to
        try:
            assert (await api.get("/readyz", key=None))[2] == {"ready": True}
            masters[1].freeze()
            try:
                status, _, body = await api.get("/readyz", key=None)
                assert (status, body["ready"]) == (503, False)
                assert "2 of 3 Redis Cluster masters" in body["redis"], body
            finally:
                masters[1].thaw()
        finally:
            masters[0].thaw()


async def _all_events(api: ReadApi, project: int, epoch: str) -> dict[int, int]:
    """A project's whole history read page by page: blocker_id by seq."""
    events: dict[int, int] = {}
    after = 0
    while True:
        status, _, page = await api.get(
            f"/v1/projects/{project}/events?epoch={epoch}&after={after}"
        )
        assert status == 200 and page.get("resync_required") is None, page
        for entry in page["events"]:
            events[entry["seq"]] = entry["blocker_id"]
            after = entry["seq"]
        if not page["more"]:
            return events


async def test_calls_cut_off_by_the_wait_and_call_bound_leave_no_reply_behind() -> None:
    """The bound on a Redis call counts its wait for a place, so calls of a hung Redis are
    cut off by it mid-call, their scripts sent (and run once Redis resumes). A connection given
    back to the pool with such a reply still to come would hand it to a later call (another
    event's cursor). Each later publish gets its own event's cursor, no event is written twice,
    and the cut-off publishes retried with their Idempotency-Keys are each written exactly once."""
    with RedisServer() as server:
        async with _serve(server.url, redis_timeout=1.0, limit_concurrency=1000) as (_, _, port):
            api = ReadApi(port)
            epoch = (await api.get("/v1/projects/1/events"))[2]["epoch"]

            def keyed(i: int):
                return api.post(1, resolved(i), headers={"Idempotency-Key": f"k{i}"})

            # Connections opened and kept (idle) first: a hung Redis does not finish a new one's
            # handshake, so only those kept are cut off with a script sent.
            warm = await asyncio.gather(*(api.post(1, resolved(i)) for i in range(2001, 2101)))
            assert {status for status, _, _ in warm} == {200}
            with hung(server):
                reads = [
                    api.get(f"/v1/projects/1/events?epoch={epoch}&after=0") for _ in range(100)
                ]
                answers = await asyncio.gather(*(keyed(i) for i in range(1, 301)), *reads)
            assert {status for status, _, _ in answers} == {503}
            later = await asyncio.gather(*(api.post(1, resolved(i)) for i in range(1001, 1201)))
            events = await _all_events(api, 1, epoch)
            assert len(set(events.values())) == len(events), "an event written twice"
            for i, (status, _, body) in zip(range(1001, 1201), later, strict=True):
                assert status == 200 and events[body["cursor"]["seq"]] == i, (i, body)
            assert {
                status for status, _, _ in await asyncio.gather(*map(keyed, range(1, 301)))
            } == {200}
            events = await _all_events(api, 1, epoch)
            assert sorted(events.values()) == [
                *range(1, 301),
                *range(1001, 1201),
                *range(2001, 2101),
            ]
