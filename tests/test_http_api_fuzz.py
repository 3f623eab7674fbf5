"""The HTTP API fuzzed against its own OpenAPI document (schemathesis): requests generated from
``GET /openapi.json`` of the API served on real Redis (a private ``redis-server``), valid and
invalid ones, every answer checked by every schemathesis check: no 5xx, every status, header,
content type and body as the document describes it, a request the document forbids refused, one
it admits accepted, a method it omits answered 405 with ``Allow``, auth not ignored.

The budget is fixed (``MAX_EXAMPLES`` per operation, plus the coverage phase's cases); the
examples are derandomized when the loaded Hypothesis profile is (CI's, tests/conftest.py), so CI
draws the same requests on every run, and local runs explore new ones.

What JSON Schema cannot say, the API refuses for reasons the document gives in words; those
refusals of an otherwise valid request are expected below (``EXPECTED_REFUSALS``), per operation,
and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import urllib.request
from collections.abc import Iterator

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
#: The refusals of a request the document admits that are the API's documented answer to it,
#: because the rule is one JSON Schema cannot state (docs/http-publish.md gives each one):
#: ``epoch`` and ``after`` together or neither, ``tag`` only with them (400 ``invalid_query``);
#: an event's ``project_id`` other than the path's (422 ``invalid_event``); an ``issued_before``
#: more than a minute ahead, a revocation that would already have ended, a subject over 1,024
#: UTF-8 bytes in fewer characters (422 ``invalid_revocation``).
EXPECTED_REFUSALS = {
    "/v1/projects/{project_id}/events": {"GET": [400], "HEAD": [400], "POST": [422]},
    "/v1/revocations": {"POST": [422]},
}
#: What negative_data_rejection expects by default (its own list; 413 is added below).
_REJECTED = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429", "5xx"]
#: What positive_data_acceptance expects by default (its own list; the refusals above are added).
_ACCEPTED = ["2xx", "401", "403", "404", "409", "429", "5xx"]


def fuzz_config() -> schemathesis.Config:
    """Every check; the documented refusals above; the fixed, derandomized-in-CI budget."""
    operations = [
        {
            "include-name": f"{method} {path}",  # (include-path and -method would be either)
            "checks": {"positive_data_acceptance": {"expected-statuses": [*_ACCEPTED, *codes]}},
        }
        for path, methods in EXPECTED_REFUSALS.items()
        for method, codes in methods.items()
    ]
    return schemathesis.Config.from_dict(
        {
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
            "checks": {
                "enabled": True,
                # (413 refuses an array past maxItems: too_many_events; not in the default list)
                "negative_data_rejection": {"expected-statuses": [*_REJECTED, "413"]},
            },
            "operations": operations,
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
