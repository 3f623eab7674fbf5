"""The HTTP API fuzzed against its own OpenAPI document (schemathesis): requests generated from
``GET /openapi.json`` of the API served on real Redis (a private ``redis-server``), valid and
invalid ones, every answer checked by every schemathesis check: no 5xx, every status, header,
content type and body as the document describes it, a request the document forbids refused, one
it admits accepted, a method it omits answered 405 with ``Allow``, auth not ignored.

The budget is fixed (``MAX_EXAMPLES`` per operation, plus the coverage phase's cases); the
examples are derandomized when the loaded Hypothesis profile is (CI's, tests/conftest.py), so CI
draws the same requests on every run, and local runs explore new ones.

What JSON Schema cannot say, the API refuses for reasons the document gives in words; those
refusals of an otherwise valid request are expected (``CHECKS``), per operation, and each only
for a request that breaks its rule (``_why_refused``): nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import hypothesis
import pytest
import schemathesis
import uvicorn

from publisher import AsyncPublisher
from publisher.client import DEFAULT_KEEP_FOR
from publisher.core import ISSUED_BEFORE_SKEW
from publisher.http_api import ApiKey, Credentials, HttpApiSettings, PublishApi, hash_key
from publisher.http_api.openapi import openapi_document, openapi_json
from publisher.http_api.server import server_config
from schemas.revocations import MAX_SUBJECT_BYTES
from tests.support.redis_server import RedisServer, free_port

SETTINGS = HttpApiSettings()
KEY = "ebk_fuzz-every-project-and-revoke"
#: Generated cases per operation in the fuzzing phase (the coverage phase adds its own).
MAX_EXAMPLES = 25
#: The checks' settings, shared with a run by hand (docs/http-publish.md): every check with its
#: defaults, except the refusals the API documents in words because JSON Schema cannot state their
#: rule (epoch and after together; an event of the path's project; a revocation's time window),
#: expected on their operation only, and 413 as a refusal.
CHECKS = Path(__file__).parent / "support" / "http_api_schemathesis.toml"


def fuzz_config() -> schemathesis.Config:
    """Every check, as ``CHECKS`` sets them; the fixed budget, derandomized under CI's profile."""
    config = tomllib.loads(CHECKS.read_text())
    config["checks"]["enabled"] = True
    return schemathesis.Config.from_dict(
        {
            **config,
            "request-timeout": 10,
            "generation": {
                "mode": "all",
                "max-examples": MAX_EXAMPLES,
                "deterministic": bool(hypothesis.settings.default.derandomize),
                "database": "none",
            },
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
            },
        }
    )


@contextlib.contextmanager
def _serving_in_a_thread(app: PublishApi, port: int) -> Iterator[None]:
    """The API served by uvicorn, as ``serve`` configures it, on a loop of its own thread (the
    schemathesis calls block), until the block ends."""
    server = uvicorn.Server(server_config(app, port=port))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),))
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the API did not start"
            thread.join(0.01)
        yield
    finally:
        server.should_exit = True
        thread.join()
        loop.close()


@pytest.fixture(scope="module")
def served_api() -> Iterator[str]:
    """The base URL of the API on a private Redis, for the whole module."""
    keys = Credentials(
        [ApiKey(id="fuzz", sha256=hash_key(KEY), projects="*", revoke=True, rate=1e9, burst=10**9)]
    )
    with RedisServer() as redis_server:
        port = free_port()
        app = PublishApi(AsyncPublisher.from_url(redis_server.url), keys, SETTINGS)
        with _serving_in_a_thread(app, port):
            base_url = f"http://127.0.0.1:{port}"
            with urllib.request.urlopen(base_url + "/openapi.json", timeout=10) as answer:
                assert answer.read() == openapi_json(SETTINGS)
            yield base_url


#: The document of the served settings (the fixture checks the API serves this very one): loaded
#: at import, as schemathesis' pytest integration needs (its fixture-loaded schemas do not run
#: under pytest 9); the base URL is the served API's, given to each call.
schema = schemathesis.openapi.from_dict(openapi_document(SETTINGS), config=fuzz_config())


#: Slack around the clock for a revocation's time window (the API's clock is read between
#: ``sent`` and ``answered``; an issued_before this close to a bound may go either way).
_CLOCK_SLACK = 5.0


def _query(case) -> dict[str, str]:
    """The case's query as sent, a blank value as the parameter's absence (as the API takes it)."""
    sent = dict(parse_qsl(urlencode(case.query or {}, doseq=True), keep_blank_values=True))
    return {name: value for name, value in sent.items() if value != ""}


def _integral_floats(value: object) -> bool:
    """Whether a decoded JSON body holds a number like ``3600.0`` or ``1e3`` anywhere."""
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, dict):
        return any(_integral_floats(item) for item in value.values())
    if isinstance(value, list):
        return any(_integral_floats(item) for item in value)
    return False


def _why_refused(case, status: int, message: str, sent: float, answered: float) -> str | None:
    """The documented rule that JSON Schema cannot state and that explains the refusal
    ``status`` of a request the document admits, or None when none does.

    The checks' settings accept these statuses for the whole operation (a setting cannot look
    at the request), so an API refusing every publish 422, every revocation 422 or every page
    400 passed them; this holds each refusal to its rule. With this test's key (every project,
    revocations, no rate limit to speak of), a 401, 403, 404 or 429 has no rule."""
    operation = case.operation.label
    if status == 422 and _integral_floats(case.body) and "got `float`" in message:
        # JSON Schema's integer admits 3600.0 (the same number as 3600); the API does not.
        return "an integer written with a fraction or an exponent"
    reads = ("GET /v1/projects/{project_id}/events", "HEAD /v1/projects/{project_id}/events")
    if operation in reads and status == 400:
        query = _query(case)
        if ("epoch" in query) != ("after" in query):
            return "epoch and after together or neither"
        if "tag" in query and "epoch" not in query:
            return "tag only with epoch and after"
    elif operation == "POST /v1/projects/{project_id}/events":
        events = case.body if isinstance(case.body, list) else [case.body]
        project_id = int(case.path_parameters["project_id"])
        if status == 422 and any(
            isinstance(event, dict) and event.get("project_id", project_id) != project_id
            for event in events
        ):
            return "an event of another project than the path's"
        headers = {name.lower(): value for name, value in (case.headers or {}).items()}
        if status == 409 and "idempotency-key" in headers:
            return "an Idempotency-Key used before for another event"
    elif operation == "POST /v1/revocations" and status == 422:
        body = case.body
        subject = body["subject"]
        if len(subject.encode("utf-8", "surrogatepass")) > MAX_SUBJECT_BYTES:
            return "a subject over 1,024 UTF-8 bytes"
        before = body.get("issued_before")
        if before is not None:
            keep_for = body.get("keep_for") or DEFAULT_KEEP_FOR.total_seconds()
            if before > sent + ISSUED_BEFORE_SKEW.total_seconds() - _CLOCK_SLACK:
                return "an issued_before more than a minute ahead"
            if before + keep_for <= answered + _CLOCK_SLACK:
                return "a revocation that would already have ended"
    return None


@schema.parametrize()
def test_the_api_answers_as_its_openapi_document_says(case, served_api: str) -> None:
    # The key given with the call, not in the config: schemathesis then takes it for the
    # caller's own (valid) key and checks that the API refuses the request without it or with
    # another; as a config header it passed for one it generated, whose 200 is ignored auth.
    sent = time.time()
    response = case.call_and_validate(
        base_url=served_api, headers={"Authorization": f"Bearer {KEY}"}
    )
    answered = time.time()
    status = response.status_code
    if case.meta.generation.mode.is_positive and case.method.lower() == case.operation.method:
        if 400 <= status < 500:
            message = response.json()["error"]["message"] if response.content else ""
            assert _why_refused(case, status, message, sent, answered), (
                f"{case.method} {case.formatted_path} {case.query} {case.body!r}: a request the "
                f"document admits refused {status} for no documented rule: "
                f"{response.text[:300]}"
            )
