"""Token revocation end to end against real Redis: a revoked subject's open connections (WebSocket,
SSE) close with 4003 within the poll interval, its old tokens are refused everywhere a token is
taken (first auth 4003, refresh ``error``, stream and poll 401), others are untouched, tokens
issued after the revocation work; foreign keys and a hung Redis never stop the gateway.

Revocations are written here as the publisher writes them (an entry of the hash, then INCR of
the version: docs/operations.md, "Token revocation"), so these tests judge the gateway alone.
"""

from __future__ import annotations

import asyncio
import json
import time

import jwt
import pytest
import redis

import gateway.revocations as revocations_module
from consumer import AuthenticationFailed, Consumer, Delivery, ReconnectPolicy
from schemas.keys import Keys
from schemas.lua import REVOKE
from schemas.revocations import Revocation, encode_entry
from schemas.tokens import AUDIENCE
from tests.support.gateway_client import (
    SECRET,
    RecordingClient,
    hold_reads,
    publish,
    start_gateway,
    ws_url,
)
from tests.support.redis_server import RedisServer, hung
from tests.support.sse_client import open_stream
from tests.support.ws_client import wait_until

KEYS = Keys()

#: The poll interval of these tests' gateways, and the slack a loaded machine may add to it
#: (a round trip to Redis, the close handshake, the test's own scheduling).
INTERVAL = 0.2
SLACK = 1.5


def token(subject: str | None, projects, *, iat: int | None = None, ttl: int = 300) -> str:
    """A token as the publisher's issue_token mints it, with the ``iat`` chosen."""
    now = int(time.time())
    claims = {"projects": projects, "aud": AUDIENCE, "iat": now if iat is None else iat}
    claims["exp"] = now + ttl
    if subject is not None:
        claims["sub"] = subject
    return jwt.encode(claims, SECRET, algorithm="HS256")


def revoke(client: redis.Redis, subject: str, issued_before: int, keep_for: int = 3600) -> None:
    entry = Revocation(subject, issued_before, issued_before + keep_for)
    client.hset(KEYS.revocations(), subject, encode_entry(entry))
    client.incr(KEYS.revocations_version())


async def connected(gateway, bearer: str, *projects: int) -> RecordingClient:
    client = await RecordingClient(ws_url(gateway), token=bearer).connect()
    for project_id in projects:
        await client.subscribe(project_id)
    return client


async def refused_at_auth(gateway, bearer: str) -> RecordingClient:
    client = await RecordingClient(ws_url(gateway), token=bearer).connect(auth=False)
    await client.send({"type": "auth", "token": bearer})
    await asyncio.wait_for(client.closed.wait(), 5)
    return client


def http_url(gateway) -> str:
    return f"http://127.0.0.1:{gateway.port}"


async def poll(gateway, bearer: str, project_id: int) -> tuple[int, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        f"GET /v1/projects/{project_id}/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Bearer {bearer}\r\n\r\n".encode()
    )
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# --- WebSocket -------------------------------------------------------------------------------


async def test_a_revoked_subjects_connection_closes_with_4003_and_the_others_go_on(
    gateways, publisher, redis_client
):
    gateway = await gateways(revocation_poll_interval=INTERVAL)
    now = int(time.time())
    old_alice = token("alice", [7], iat=now - 100)
    alice = await connected(gateway, old_alice, 7)
    bob = await connected(gateway, token("bob", [7], iat=now - 100), 7)
    await publish(publisher, 7, 1)
    await alice.wait_for(lambda: alice.seqs(7) == [1])
    await bob.wait_for(lambda: bob.seqs(7) == [1])

    started = time.monotonic()
    revoke(redis_client, "alice", now - 50)
    await asyncio.wait_for(alice.closed.wait(), INTERVAL + SLACK)
    assert alice.close_code == 4003 and alice.ws.close_reason == "token revoked"
    assert time.monotonic() - started < INTERVAL + SLACK
    assert gateway.metrics.revocation_disconnects_total == 1

    # Another subject on the same project is untouched and keeps receiving.
    await publish(publisher, 7, 1)
    await bob.wait_for(lambda: bob.seqs(7) == [1, 2])
    assert not bob.closed.is_set()

    # A token of alice issued after the revocation works; the old one is refused at auth (4003).
    fresh = await connected(gateway, token("alice", [7]), 7)
    await publish(publisher, 7, 1)
    await fresh.wait_for(lambda: fresh.seqs(7) == [3])
    refused = await refused_at_auth(gateway, old_alice)
    assert refused.close_code == 4003 and refused.ws.close_reason == "token revoked"
    assert gateway.metrics.revoked_tokens_refused_total == 1
    assert gateway.metrics.revocation_disconnects_total == 1
    for client in (bob, fresh):
        await client.close()


async def test_a_refresh_with_a_revoked_token_is_refused_and_the_connection_keeps_its_token(
    gateways, redis_client
):
    gateway = await gateways(revocation_poll_interval=INTERVAL)
    now = int(time.time())
    revoke(redis_client, "alice", now - 50)
    await wait_until(lambda: len(gateway.revocations.current) == 1, 5, "the list read")
    carol = await connected(gateway, token("carol", [3]), 3)
    await carol.send({"type": "auth", "token": token("alice", [3], iat=now - 100)})
    await carol.wait_for(lambda: carol.last("error") is not None)
    error = carol.last("error")
    assert (error["code"], error["message"]) == ("invalid_token", "token revoked")
    await carol.send({"type": "ping"})
    await carol.wait_for(lambda: carol.last("pong") is not None)
    assert not carol.closed.is_set() and gateway.metrics.revoked_tokens_refused_total == 1
    # A refresh of a token (not of another's), the connection's own among the revoked: closed.
    # (The watcher closes such a connection as it reads the list; this takes the moment between.)
    dave = await connected(gateway, token("dave", [3], iat=now - 100), 3)
    revocations = gateway.revocations
    (session,) = revocations.index.sessions_of("dave")
    revocations.index.remove("dave", session)
    revoke(redis_client, "dave", now - 50)
    await wait_until(lambda: len(revocations.current) == 2, 5, "dave's revocation read")
    assert not dave.closed.is_set()  # out of the index: not found by the watcher
    await dave.send({"type": "auth", "token": token("dave", [3], iat=now - 99)})
    await asyncio.wait_for(dave.closed.wait(), 5)
    assert dave.close_code == 4003
    assert [m["message"] for m in dave.of("error")] == ["token revoked"]
    await carol.close()


async def test_a_revocation_written_by_the_revoke_script_acts_as_its_reply_says(
    gateways, redis_client
):
    # The publisher's script (schemas.lua.REVOKE), "now" by Redis' clock: the gateway takes its
    # entry and its version (microseconds: 16 digits) as they are written.
    gateway = await gateways(revocation_poll_interval=INTERVAL)
    now = int(time.time())
    alice = await connected(gateway, token("alice", [1], iat=now - 100))
    before, until, version = redis_client.eval(
        REVOKE, 2, KEYS.revocations(), KEYS.revocations_version(), "alice", "", 600
    )
    assert until == before + 600 and version > 10**15
    await asyncio.wait_for(alice.closed.wait(), INTERVAL + SLACK)
    assert alice.close_code == 4003
    refused = await refused_at_auth(gateway, token("alice", [1], iat=before - 1))
    assert refused.close_code == 4003
    fresh = await connected(gateway, token("alice", [1], iat=before))  # issued at T: accepted
    assert fresh.last("authenticated")["subject"] == "alice"
    await fresh.close()


# --- SSE, polls, handshakes ------------------------------------------------------------------


async def test_a_revoked_subjects_stream_ends_with_the_close_event_and_cannot_reopen(
    gateways, publisher, redis_client
):
    gateway = await gateways(revocation_poll_interval=INTERVAL)
    now = int(time.time())
    old = token("alice", [8], iat=now - 100)
    headers = {"Authorization": f"Bearer {old}"}
    status, _, stream = await open_stream(http_url(gateway), "/v1/projects/8/stream", headers)
    assert status == 200
    await stream.until("subscribed")
    bob = await connected(gateway, token("bob", [8], iat=now - 100), 8)
    started = time.monotonic()
    revoke(redis_client, "alice", now - 50)
    rest = await stream.rest(within=INTERVAL + SLACK)
    assert time.monotonic() - started < INTERVAL + SLACK
    assert [e.event for e in rest] == ["error", "close"]
    assert json.loads(rest[0].data) == {
        "type": "error",
        "code": "invalid_token",
        "message": "token revoked",
    }
    assert json.loads(rest[1].data) == {"type": "close", "code": 4003, "reason": "token revoked"}
    assert gateway.metrics.revocation_disconnects_total == 1
    # Reopened with the same token: refused as a bad token is.
    status, _, stream = await open_stream(http_url(gateway), "/v1/projects/8/stream", headers)
    body = await stream.reader.read()
    stream.close()
    assert status == 401
    assert json.loads(body) == {"error": "invalid_token", "message": "token revoked"}
    # bob's WebSocket on the same project is untouched.
    await publish(publisher, 8, 1)
    await bob.wait_for(lambda: bob.seqs(8) == [1])
    await bob.close()


async def test_polls_and_handshakes_with_a_revoked_token_get_401(gateways, publisher, redis_client):
    gateway = await gateways(revocation_poll_interval=INTERVAL)
    now = int(time.time())
    old = token("alice", [9], iat=now - 100)
    await publish(publisher, 9, 1)
    assert (await poll(gateway, old, 9))[0] == 200
    revoke(redis_client, "alice", now - 50)
    await wait_until(lambda: len(gateway.revocations.current) == 1, 5, "the list read")
    failures = gateway.metrics.auth_failures_total
    assert await poll(gateway, old, 9) == (
        401,
        {"error": "invalid_token", "message": "token revoked"},
    )
    status, body = await poll(gateway, token("alice", [9]), 9)  # issued after: works
    assert status == 200 and body["seq"] == 1
    # A WebSocket handshake carrying the token in its Authorization header: 401 too.
    with pytest.raises(Exception) as info:
        await RecordingClient(ws_url(gateway), headers={"Authorization": f"Bearer {old}"}).connect(
            auth=False
        )
    assert "401" in str(info.value)
    assert gateway.metrics.revoked_tokens_refused_total == 2
    assert gateway.metrics.auth_failures_total == failures + 2


async def test_a_poll_whose_token_is_revoked_while_its_page_is_read_gets_401(
    gateways, publisher, redis_client, monkeypatch
):
    """A poll's token is checked when it arrives; its page is read from Redis after (up to
    --subscribe-timeout on a slow Redis). A revocation this pod reads meanwhile must refuse
    the answer, as it closes an open stream or WebSocket: before, the page was answered to
    the revoked token (200, the events)."""
    gateway = await gateways(revocation_poll_interval=INTERVAL)
    now = int(time.time())
    old = token("alice", [9], iat=now - 100)
    await publish(publisher, 9, 1)
    reading, release = hold_reads(gateway, monkeypatch)
    answer = asyncio.create_task(poll(gateway, old, 9))
    await asyncio.wait_for(reading.wait(), 5)
    revoke(redis_client, "alice", now - 50)
    await wait_until(lambda: len(gateway.revocations.current) == 1, 5, "the list read")
    release.set()
    assert await answer == (401, {"error": "invalid_token", "message": "token revoked"})
    assert gateway.metrics.revoked_tokens_refused_total == 1


# --- configuration and readiness ---------------------------------------------------------------


async def test_an_interval_of_0_turns_the_checks_off(gateways, redis_client):
    now = int(time.time())
    revoke(redis_client, "alice", now - 50)
    gateway = await gateways(revocation_poll_interval=0)
    assert gateway.revocations is None
    alice = await connected(gateway, token("alice", [1], iat=now - 100), 1)
    assert "revocations" not in await gateway.readiness()
    assert gateway.metrics.revoked_tokens_refused_total == 0
    await alice.close()


async def test_a_gateway_reads_the_list_before_it_opens_its_port_and_is_ready_with_it(
    gateways, redis_client
):
    now = int(time.time())
    revoke(redis_client, "alice", now - 50)
    gateway = await gateways()  # the default interval (1 s): the first read is at start
    assert gateway.revocations.loaded.is_set() and len(gateway.revocations.current) == 1
    assert (await gateway.readiness())["revocations"] is True
    refused = await refused_at_auth(gateway, token("alice", [1], iat=now - 100))
    assert refused.close_code == 4003


async def test_a_gateway_started_while_redis_hangs_refuses_every_token_until_it_reads_the_list(
    monkeypatch,
):
    # Fail closed: until the list is read, a valid token cannot be told from a revoked one, so
    # every place that takes a token answers "try again" (WebSocket 1013, HTTP 503), not "yes".
    monkeypatch.setattr(revocations_module, "READ_TIMEOUT", 0.3)
    with RedisServer() as server:
        now = int(time.time())
        revoke(server.client(), "alice", now - 50)
        with hung(server):
            started = time.monotonic()
            gateway = await start_gateway(
                server.url, revocation_poll_interval=INTERVAL, drain_timeout=1
            )
            assert time.monotonic() - started < 3  # the start waits 1 s for the list, no more
            assert not gateway.revocations.loaded.is_set()
            old, fresh = token("alice", [1], iat=now - 100), token("bob", [1])
            for bearer in (old, fresh):
                refused = await refused_at_auth(gateway, bearer)
                assert refused.close_code == 1013
                status, body = await poll(gateway, bearer, 1)
                assert (status, body["error"]) == (503, "unavailable")
                headers = {"Authorization": f"Bearer {bearer}"}
                status, answer, stream = await open_stream(
                    http_url(gateway), "/v1/projects/1/stream", headers
                )
                stream.close()
                assert (status, answer["retry-after"]) == (503, "1")
                with pytest.raises(Exception) as info:
                    await RecordingClient(ws_url(gateway), headers=headers).connect(auth=False)
                assert "503" in str(info.value)
            # Not the client's fault: no auth failure is counted; the refusals are.
            assert gateway.metrics.auth_failures_total == 0
            assert gateway.metrics.revocations_unknown_refusals_total == 8
            # A bad token is still told it is bad.
            refused = await refused_at_auth(gateway, "not-a-token")
            assert refused.close_code == 4001
        try:
            await wait_until(gateway.revocations.loaded.is_set, 10, "the list read")
            assert (await gateway.readiness())["revocations"] is True
            refused = await refused_at_auth(gateway, old)
            assert refused.close_code == 4003
            bob = await connected(gateway, fresh, 1)
            assert bob.last("authenticated")["subject"] == "bob"
            await bob.close()
        finally:
            await gateway.drain()


# --- foreign values and a hung Redis -------------------------------------------------------


async def test_garbage_in_the_hash_is_counted_and_the_valid_entries_act(
    gateways, publisher, redis_client
):
    gateway = await gateways(revocation_poll_interval=INTERVAL)
    now = int(time.time())
    alice = await connected(gateway, token("alice", [4], iat=now - 100), 4)
    bob = await connected(gateway, token("bob", [4], iat=now - 100), 4)
    redis_client.hset(KEYS.revocations(), mapping={"bob": b"\xff garbage", "eve": b"[1,2]"})
    revoke(redis_client, "alice", now - 50)
    await asyncio.wait_for(alice.closed.wait(), INTERVAL + SLACK)
    assert alice.close_code == 4003
    assert gateway.metrics.foreign_values["revocation_entry"] >= 2
    await publish(publisher, 4, 1)
    await bob.wait_for(lambda: bob.seqs(4) == [1])  # bob's garbage entry revokes nothing
    body = (await gateway.http.metrics(None)).body.decode()
    assert 'eventbus_foreign_values_total{kind="revocation_entry"}' in body
    await bob.close()


@pytest.mark.parametrize("key", ["hash", "version"])
async def test_a_revocation_key_of_another_type_is_counted_and_the_gateway_serves_on(
    gateways, publisher, redis_client, key
):
    gateway = await gateways(revocation_poll_interval=INTERVAL)
    now = int(time.time())
    revoke(redis_client, "alice", now - 50)
    await wait_until(lambda: len(gateway.revocations.current) == 1, 5, "the list read")
    name = KEYS.revocations() if key == "hash" else KEYS.revocations_version()
    redis_client.delete(name)
    redis_client.rpush(name, b"not", b"mine")
    if key == "hash":
        redis_client.incr(KEYS.revocations_version())
    foreign = gateway.metrics.foreign_values
    await wait_until(lambda: foreign["revocation_key"] >= 2, 5, "the foreign key counted")
    # The gateway serves on: the last list stays in force, other tokens work.
    refused = await refused_at_auth(gateway, token("alice", [5], iat=now - 100))
    assert refused.close_code == 4003
    bob = await connected(gateway, token("bob", [5], iat=now - 100), 5)
    await publish(publisher, 5, 1)
    await bob.wait_for(lambda: bob.seqs(5) == [1])
    assert gateway.metrics.revocation_poll_failures_total == 0
    # Repaired by the next revocation written: read at once.
    redis_client.delete(name)
    revoke(redis_client, "bob", now - 50)
    await asyncio.wait_for(bob.closed.wait(), INTERVAL + SLACK)
    assert bob.close_code == 4003


async def test_a_version_that_is_not_a_number_is_counted_and_the_hash_read_each_poll(
    gateways, redis_client
):
    gateway = await gateways(revocation_poll_interval=INTERVAL)
    now = int(time.time())
    bob = await connected(gateway, token("bob", [5], iat=now - 100), 5)
    redis_client.set(KEYS.revocations_version(), b"not a version")
    await wait_until(
        lambda: gateway.metrics.foreign_values["revocation_key"] >= 1, 5, "the version counted"
    )
    entry = Revocation("bob", now - 50, now + 3600)
    redis_client.hset(KEYS.revocations(), "bob", encode_entry(entry))  # no INCR possible
    await asyncio.wait_for(bob.closed.wait(), INTERVAL + SLACK)
    assert bob.close_code == 4003


async def test_a_hung_redis_does_not_hold_the_poll_beyond_its_timeout(monkeypatch):
    monkeypatch.setattr(revocations_module, "READ_TIMEOUT", 0.5)
    with RedisServer() as server:
        client = server.client()
        gateway = await start_gateway(
            server.url, revocation_poll_interval=0.1, drain_timeout=1, subscribe_timeout=1
        )
        try:
            now = int(time.time())
            revoke(client, "mallory", now - 50)
            watcher = gateway.revocations
            await wait_until(lambda: len(watcher.current) == 1, 5, "the list read")
            alice = await connected(gateway, token("alice", [6], iat=now - 100))
            metrics = gateway.metrics
            with hung(server):  # sockets open, nothing answers
                failed = metrics.revocation_poll_failures_total
                started = time.monotonic()
                # Each poll gives up after 0.5 s and the next follows 0.1 s later: three in
                # about 1.8 s, not one stuck for redis-py's own timeouts (5 s and retries).
                await wait_until(
                    lambda: metrics.revocation_poll_failures_total >= failed + 3, 10, "3 polls"
                )
                assert time.monotonic() - started < 3 * (0.5 + 0.1) + SLACK
                # Meanwhile the last list stays in force, and tokens are checked without Redis.
                refused = await refused_at_auth(gateway, token("mallory", [6], iat=now - 100))
                assert refused.close_code == 4003
                other = await connected(gateway, token("bob", [6]))
                assert not alice.closed.is_set()
            # Redis answers again: the next revocation acts within the interval.
            revoke(client, "alice", now - 50)
            await asyncio.wait_for(alice.closed.wait(), 0.5 + 0.1 + SLACK)
            assert alice.close_code == 4003 and not other.closed.is_set()
            await other.close()
        finally:
            client.close()
            await gateway.drain()


# --- Redis Cluster ---------------------------------------------------------------------------


async def test_the_cluster_client_reads_the_revocations_of_one_slot(redis_cluster_url):
    import redis.cluster

    cluster = redis.cluster.RedisCluster.from_url(
        redis_cluster_url.replace("redis+cluster://", "redis://")
    )
    try:
        assert cluster.keyslot(KEYS.revocations()) == cluster.keyslot(KEYS.revocations_version())
        now = int(time.time())
        revoke(cluster, "alice", now - 50)
        gateway = await start_gateway(redis_cluster_url, revocation_poll_interval=INTERVAL)
        try:
            assert len(gateway.revocations.current) == 1
            refused = await refused_at_auth(gateway, token("alice", [1], iat=now - 100))
            assert refused.close_code == 4003
            bob = await connected(gateway, token("bob", [1], iat=now - 100))
            revoke(cluster, "bob", now - 50)
            await asyncio.wait_for(bob.closed.wait(), INTERVAL + SLACK)
            assert bob.close_code == 4003
        finally:
            await gateway.drain()
    finally:
        cluster.close()


# --- the Python consumer -----------------------------------------------------------------------


async def test_the_consumer_renews_a_revoked_token_and_goes_on(gateways, publisher, redis_client):
    gateway = await gateways(revocation_poll_interval=INTERVAL)
    now = int(time.time())
    minted: list[int] = []

    def mint() -> str:
        # The first token predates the revocation; every later one is issued after it.
        minted.append(1)
        return token("erin", [2], iat=now - 100 if len(minted) == 1 else None)

    policy = ReconnectPolicy(initial=0.05, max=0.2)
    async with Consumer(ws_url(gateway), token=mint, reconnect=policy) as consumer:
        subscription = consumer.events(2)
        async with asyncio.timeout(10):
            await subscription.wait_subscribed()
        revoke(redis_client, "erin", now - 50)
        await wait_until(lambda: 4003 in consumer.close_codes, 10, "the close")
        await publish(publisher, 2, 1)
        async with asyncio.timeout(10):
            item = await anext(aiter(subscription))
    assert isinstance(item, Delivery) and item.seq == 1
    assert len(minted) == 2 and consumer.connects == 2


async def test_a_consumer_revoked_early_in_a_second_is_back_with_its_next_token(
    gateways, publisher
):
    """The revocation's default ``issued_before`` is the next whole second, and a token's ``iat``
    is whole seconds: a token minted before that second is refused too. A consumer cut early in
    a second must not spend its ``max_auth_failures`` on tokens minted within it (6 of 60
    consumers revoked at once with the default policy stopped with AuthenticationFailed, their
    person still having access): after a 4003 it waits at least a second, so its next token is
    issued after the revocation and taken."""
    gateway = await gateways(revocation_poll_interval=INTERVAL)
    # Fast retries (as a consumer's jitter may draw them): the floor alone must cover the second.
    policy = ReconnectPolicy(initial=0.05, max=0.2, max_auth_failures=3)
    minted: list[int] = []

    def mint() -> str:  # the person keeps access: every token is minted now
        minted.append(1)
        return token("gina", [2])

    async with Consumer(ws_url(gateway), token=mint, reconnect=policy) as consumer:
        subscription = consumer.events(2)
        async with asyncio.timeout(10):
            await subscription.wait_subscribed()
        # Early in a second: nearly a whole second in which new tokens are refused.
        await asyncio.sleep(1.005 - time.time() % 1)
        revocation = await publisher.revoke_tokens("gina")
        assert revocation.issued_before > time.time()
        await wait_until(lambda: 4003 in consumer.close_codes, 10, "the close")
        await publish(publisher, 2, 1)
        async with asyncio.timeout(10):
            item = await anext(aiter(subscription))
    assert isinstance(item, Delivery) and item.seq == 1
    assert consumer.close_codes[:1] == [4003] and consumer.close_codes.count(4003) == 1
    assert len(minted) == 2


async def test_the_consumer_counts_revoked_tokens_towards_max_auth_failures(gateways, redis_client):
    gateway = await gateways(revocation_poll_interval=INTERVAL)
    now = int(time.time())
    revoke(redis_client, "frank", now - 50)
    await wait_until(lambda: len(gateway.revocations.current) == 1, 5, "the list read")
    calls: list[int] = []

    def stale() -> str:  # a token endpoint that keeps handing out revoked tokens
        calls.append(1)
        return token("frank", [2], iat=now - 100)

    policy = ReconnectPolicy(initial=0.05, max=0.2, max_auth_failures=3)
    async with Consumer(ws_url(gateway), token=stale, reconnect=policy) as consumer:
        with pytest.raises(AuthenticationFailed) as info:
            async with asyncio.timeout(20):
                await consumer.events(2).wait_subscribed()
    assert info.value.close_code == 4003 and len(calls) == 3


# --- the subject index ---------------------------------------------------------------------


async def test_the_subject_index_shrinks_back_to_empty_whatever_ends_the_connections(
    gateways, redis_client
):
    # The index holds an entry per subject with a connection: every way a connection ends must
    # take it out (a leak would grow with every connection the process ever had).
    from gateway.session import CloseCode

    gateway = await gateways(revocation_poll_interval=INTERVAL, drain_timeout=1)
    index = gateway.revocations.index
    now = int(time.time())

    # Closed by the client; closed with 4003; refreshed to another subject, then closed.
    plain = await connected(gateway, token("plain", [1]), 1)
    revoked = await connected(gateway, token("revoked", [1], iat=now - 100), 1)
    moved = await connected(gateway, token("before", [1]), 1)
    await moved.send({"type": "auth", "token": token("after", [1])})
    await moved.wait_for(lambda: moved.last("authenticated")["subject"] == "after")
    assert "before" not in index and "after" in index
    # A token that expires; a connection the gateway aborts (as a slow consumer or a missed
    # pong is); a first auth refused; a stream the client closes; a stream revoked.
    expiring = await connected(gateway, token("expiring", [1], ttl=1), 1)
    aborted = await connected(gateway, token("aborted", [1]), 1)
    refused = await refused_at_auth(gateway, "not a token")
    headers = {"Authorization": f"Bearer {token('streamer', [1])}"}
    _, _, stream = await open_stream(http_url(gateway), "/v1/projects/1/stream", headers)
    await stream.until("subscribed")
    headers = {"Authorization": f"Bearer {token('revoked_stream', [1], iat=now - 100)}"}
    _, _, revoked_stream = await open_stream(http_url(gateway), "/v1/projects/1/stream", headers)
    await revoked_stream.until("subscribed")
    assert len(index) == 7

    await plain.close()
    for session in index.sessions_of("aborted"):
        session.abort(CloseCode.SLOW_CONSUMER, "slow consumer")
    revoke(redis_client, "revoked", now - 50)
    revoke(redis_client, "revoked_stream", now - 50)
    await asyncio.wait_for(revoked.closed.wait(), INTERVAL + SLACK)
    await revoked_stream.rest(within=INTERVAL + SLACK)
    await asyncio.wait_for(expiring.closed.wait(), 5)
    await asyncio.wait_for(aborted.closed.wait(), 5)
    await moved.close()
    stream.close()
    assert refused.close_code == 4001
    await wait_until(lambda: len(gateway.sessions) == 0, 5, "every connection gone")
    assert len(index) == 0, dict(index._by_subject)

    # And the drain's closes.
    others = [await connected(gateway, token(f"s{n % 2}", [1]), 1) for n in range(3)]
    assert len(index) == 2
    await gateway.drain()
    for client in others:
        await asyncio.wait_for(client.closed.wait(), 5)
    assert len(index) == 0 and len(gateway.sessions) == 0


async def test_revocations_go_on_across_a_failover_of_their_slot(redis_cluster_factory):
    # The master of the {revocations} slot dies (SIGKILL) and its replica takes over: polls fail
    # meanwhile (the last list stays), then the next revocation, written to the new master, acts.
    import redis.cluster

    cluster = await asyncio.to_thread(redis_cluster_factory, 3, 1)
    client = redis.cluster.RedisCluster.from_url(
        cluster.url.replace("redis+cluster://", "redis://")
    )
    gateway = await start_gateway(cluster.url, revocation_poll_interval=INTERVAL, drain_timeout=1)
    try:
        now = int(time.time())
        revoke(client, "alice", now - 50)
        watcher = gateway.revocations
        await wait_until(lambda: len(watcher.current) == 1, 10, "the list read")
        bob = await connected(gateway, token("bob", [1], iat=now - 100))
        home = cluster.master_of_slot(cluster.key_slot(KEYS.revocations()))
        await asyncio.to_thread(cluster.kill_master, home)
        # Written to the new master (the client follows the MOVED), acted on by the gateway.
        await asyncio.to_thread(revoke, client, "bob", now - 50)
        await asyncio.wait_for(bob.closed.wait(), 30)
        assert bob.close_code == 4003
        assert watcher.is_revoked(jwt_claims(token("alice", [1], iat=now - 100)))
        assert watcher._task is not None and not watcher._task.done()
    finally:
        client.close()
        await gateway.drain()


def jwt_claims(bearer: str):
    from schemas.tokens import TokenClaims

    claims = jwt.decode(bearer, options={"verify_signature": False})
    return TokenClaims(
        projects=claims["projects"], exp=claims["exp"], sub=claims.get("sub"), iat=claims["iat"]
    )


async def test_a_token_with_a_fractional_iat_minted_after_the_revocation_is_taken(
    gateways, redis_client
):
    # RFC 7519 NumericDates may have a fraction, and libraries write one (PyJWT with
    # "iat": time.time()). Taken as "no iat" (issued at 0), every new token of a revoked person
    # was refused until the revocation expired (a day by default): the app could not let them
    # back in. The token's whole second is what the revocation compares.
    gateway = await gateways(revocation_poll_interval=INTERVAL)
    now = int(time.time())
    revoke(redis_client, "alice", now - 50)
    await wait_until(lambda: len(gateway.revocations.current) == 1, 5, "the list read")

    def fractional(iat: float) -> str:
        claims = {"projects": [1], "aud": AUDIENCE, "sub": "alice", "iat": iat, "exp": now + 300}
        return jwt.encode(claims, SECRET, algorithm="HS256")

    fresh = await connected(gateway, fractional(now - 49.5))
    assert fresh.last("authenticated")["subject"] == "alice"
    refused = await refused_at_auth(gateway, fractional(now - 50.5))
    assert refused.close_code == 4003
    await fresh.close()


async def test_a_connection_refreshed_to_a_newer_token_before_the_list_is_read_stays_open(
    gateways, publisher, redis_client
):
    # The app revoked alice's old tokens and gave her tab a new one, which it sent as a refresh
    # before the gateway read the list: the connection's token is the new one, not revoked.
    gateway = await gateways(revocation_poll_interval=INTERVAL)
    now = int(time.time())
    alice = await connected(gateway, token("alice", [2], iat=now - 100), 2)
    await alice.send({"type": "auth", "token": token("alice", [2], iat=now - 10)})
    await alice.wait_for(lambda: len(alice.of("authenticated")) == 2)
    revoke(redis_client, "alice", now - 50)
    await wait_until(lambda: len(gateway.revocations.current) == 1, 5, "the list read")
    await publish(publisher, 2, 1)
    await alice.wait_for(lambda: alice.seqs(2) == [1])
    assert not alice.closed.is_set() and gateway.metrics.revocation_disconnects_total == 0
    await alice.close()
