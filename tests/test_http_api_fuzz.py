"""The HTTP API fuzzed against its own OpenAPI document (schemathesis): requests generated from
``GET /openapi.json`` of the API served on real Redis (a private ``redis-server``), valid and
invalid ones, every answer checked by every schemathesis check: no 5xx, every status, header,
content type and body as the document describes it, a request the document forbids refused, one
it admits accepted, a method it omits answered 405 with ``Allow``, auth not ignored.

The budget is fixed (``MAX_EXAMPLES`` per operation, plus the coverage phase's cases); the
examples are derandomized when the loaded Hypothesis profile is (CI's, tests/conftest.py), so CI
draws the same requests on every run, and local runs explore new ones.

What JSON Schema cannot say, the API refuses for reasons the document gives in words; those
refusals of an otherwise valid request are expected (``CHECKS``), per operation, and nothing
else."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import schemathesis
import uvicorn

from publisher import AsyncPublisher
from publisher.http_api import ApiKey, Credentials, HttpApiSettings, PublishApi, hash_key
from publisher.http_api.openapi import openapi_document, openapi_json
from publisher.http_api.server import server_config
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


@schema.parametrize()
def test_the_api_answers_as_its_openapi_document_says(case, served_api: str) -> None:
    # The key given with the call, not in the config: schemathesis then takes it for the
    # caller's own (valid) key and checks that the API refuses the request without it or with
    # another; as a config header it passed for one it generated, whose 200 is ignored auth.
    case.call_and_validate(base_url=served_api, headers={"Authorization": f"Bearer {KEY}"})
