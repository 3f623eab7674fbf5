"""The OpenAPI 3.1 description of the HTTP API (``publisher.http_api.openapi``): a structurally
sound document (every schema a 2020-12 schema, every ``$ref`` resolving), exactly the routes the
app serves, and, above all, the real answers of the API served on real Redis validate against the
document's schema for their route and status: an answer the document does not describe fails."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import jsonschema
import msgspec
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from publisher import AsyncPublisher
from publisher.__main__ import main as publisher_main
from publisher.http_api import ApiKey, Credentials, HttpApiSettings, PublishApi, hash_key
from publisher.http_api.__main__ import main as http_api_main
from publisher.http_api.openapi import openapi_document, openapi_json
from publisher.http_api.server import _OVERLOADED, UNBOUNDED_PATHS
from schemas.keys import Keys
from tests.support.redis_server import RedisServer
from tests.test_http_api import EXPIRED, KEY_ALL, KEY_ONE, KEY_REVOKE, Api, resolved, serving_app

ROOT = Path(__file__).resolve().parents[1]
OPENAPI_FILE = ROOT / "docs" / "openapi.json"
DOC_URI = "urn:eventbus:http-api:openapi"
KEY_SLOW = "ebk_openapi-slow-key"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def keys() -> Credentials:
    return Credentials(
        [
            ApiKey(id="all", sha256=hash_key(KEY_ALL), projects="*"),
            ApiKey(id="one", sha256=hash_key(KEY_ONE), projects=[1]),
            ApiKey(id="admin", sha256=hash_key(KEY_REVOKE), projects=[], revoke=True),
            ApiKey(id="slow", sha256=hash_key(KEY_SLOW), projects="*", rate=0.01, burst=2),
        ]
    )


# --- the document, structurally ---------------------------------------------------------------

_REF = {
    "type": "object",
    "required": ["$ref"],
    "properties": {"$ref": {"type": "string"}, "summary": {}, "description": {}},
    "additionalProperties": False,
}

#: The part of OpenAPI 3.1 this document uses, as a JSON Schema (the locked dependencies hold no
#: OpenAPI validator): unknown fields are errors, so a misspelt ``requestBody`` or ``in`` fails.
OAS_SUBSET = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["openapi", "info", "paths", "components"],
    "properties": {
        "openapi": {"type": "string", "pattern": r"^3\.1\.[0-9]+$"},
        "jsonSchemaDialect": {"type": "string"},
        "info": {
            "type": "object",
            "required": ["title", "version"],
            "properties": {
                "title": {"type": "string"},
                "version": {"type": "string"},
                "summary": {"type": "string"},
                "description": {"type": "string"},
            },
            "additionalProperties": False,
        },
        "servers": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["url"],
                "properties": {"url": {"type": "string"}, "description": {"type": "string"}},
                "additionalProperties": False,
            },
        },
        "security": {"$ref": "#/$defs/security"},
        "tags": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "description": {"type": "string"}},
                "additionalProperties": False,
            },
        },
        "paths": {
            "type": "object",
            "propertyNames": {"pattern": "^/"},
            "additionalProperties": {"$ref": "#/$defs/path_item"},
        },
        "components": {
            "type": "object",
            "properties": {
                "schemas": {"type": "object", "additionalProperties": {"type": "object"}},
                "responses": {
                    "type": "object",
                    "additionalProperties": {"$ref": "#/$defs/response"},
                },
                "parameters": {
                    "type": "object",
                    "additionalProperties": {"$ref": "#/$defs/parameter"},
                },
                "headers": {"type": "object", "additionalProperties": {"$ref": "#/$defs/header"}},
                "securitySchemes": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["type", "scheme"],
                        "properties": {
                            "type": {"const": "http"},
                            "scheme": {"const": "bearer"},
                            "description": {"type": "string"},
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "propertyNames": {
                "enum": ["schemas", "responses", "parameters", "headers", "securitySchemes"]
            },
            "additionalProperties": {"propertyNames": {"pattern": "^[a-zA-Z0-9._-]+$"}},
        },
    },
    "patternProperties": {"^x-": {"$ref": "#/$defs/response_or_ref"}},
    "additionalProperties": False,
    "$defs": {
        "ref": _REF,
        "security": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": {"type": "array", "items": {"type": "string"}},
            },
        },
        "path_item": {
            "type": "object",
            "properties": {
                "summary": {"type": "string"},
                "description": {"type": "string"},
                "parameters": {"type": "array", "items": {"$ref": "#/$defs/parameter_or_ref"}},
                **{method: {"$ref": "#/$defs/operation"} for method in METHODS},
            },
            "patternProperties": {"^x-": {"$ref": "#/$defs/response_or_ref"}},
            "additionalProperties": False,
        },
        "operation": {
            "type": "object",
            "required": ["operationId", "responses"],
            "properties": {
                "operationId": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9]*$"},
                "summary": {"type": "string"},
                "description": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "parameters": {"type": "array", "items": {"$ref": "#/$defs/parameter_or_ref"}},
                "requestBody": {
                    "type": "object",
                    "required": ["content"],
                    "properties": {
                        "description": {"type": "string"},
                        "required": {"type": "boolean"},
                        "content": {"$ref": "#/$defs/content"},
                    },
                    "additionalProperties": False,
                },
                "responses": {
                    "type": "object",
                    "minProperties": 1,
                    "propertyNames": {"pattern": "^[1-5][0-9][0-9]$"},
                    "additionalProperties": {"$ref": "#/$defs/response_or_ref"},
                },
                "security": {"$ref": "#/$defs/security"},
            },
            "additionalProperties": False,
        },
        "parameter_or_ref": {
            "if": {"required": ["$ref"]},
            "then": {"$ref": "#/$defs/ref"},
            "else": {"$ref": "#/$defs/parameter"},
        },
        "parameter": {
            "type": "object",
            "required": ["name", "in", "schema"],
            "properties": {
                "name": {"type": "string"},
                "in": {"enum": ["query", "header", "path", "cookie"]},
                "description": {"type": "string"},
                "required": {"type": "boolean"},
                "allowEmptyValue": {"type": "boolean"},
                "schema": {"type": "object"},
                "example": {},
            },
            "additionalProperties": False,
            "if": {"properties": {"in": {"const": "path"}}},
            "then": {"required": ["required"], "properties": {"required": {"const": True}}},
        },
        "header": {
            "type": "object",
            "required": ["schema"],
            "properties": {
                "description": {"type": "string"},
                "required": {"type": "boolean"},
                "schema": {"type": "object"},
            },
            "additionalProperties": False,
        },
        "content": {
            "type": "object",
            "propertyNames": {"pattern": "^[a-z]+/[a-z0-9.+-]+$"},
            "additionalProperties": {
                "type": "object",
                "required": ["schema"],
                "properties": {"schema": {"type": "object"}, "example": {}},
                "additionalProperties": False,
            },
        },
        "response_or_ref": {
            "if": {"required": ["$ref"]},
            "then": {"$ref": "#/$defs/ref"},
            "else": {"$ref": "#/$defs/response"},
        },
        "response": {
            "type": "object",
            "required": ["description"],
            "properties": {
                "description": {"type": "string"},
                "headers": {
                    "type": "object",
                    "additionalProperties": {
                        "if": {"required": ["$ref"]},
                        "then": {"$ref": "#/$defs/ref"},
                        "else": {"$ref": "#/$defs/header"},
                    },
                },
                "content": {"$ref": "#/$defs/content"},
            },
            "additionalProperties": False,
        },
    },
}


def _registry(doc: dict) -> Registry:
    return Registry().with_resource(DOC_URI, DRAFT202012.create_resource(doc))


def _walk(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, (*path, index))


def _pointer(path) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def _deref(doc: dict, node: dict) -> dict:
    while "$ref" in node:
        node = _registry(doc).resolver(DOC_URI).lookup(node["$ref"]).contents
    return node


def test_the_document_is_openapi_3_1_with_2020_12_schemas_and_every_ref_resolves() -> None:
    doc = openapi_document()
    Draft202012Validator.check_schema(OAS_SUBSET)
    errors = sorted(Draft202012Validator(OAS_SUBSET).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{_pointer(e.absolute_path)}: {e.message}" for e in errors)
    # Every schema (components, parameters, headers, bodies) is a JSON Schema 2020-12 schema.
    schemas = [("components", "schemas", name) for name in doc["components"]["schemas"]]
    for part in ("paths", "components"):
        schemas += [(part, *path) for path, _ in _walk(doc[part]) if path and path[-1] == "schema"]
    assert len(schemas) > 20
    for path in schemas:
        node = doc
        for part in path:
            node = node[part]
        Draft202012Validator.check_schema(node)
    # Every $ref (and discriminator mapping) resolves inside the document.
    resolver = _registry(doc).resolver(DOC_URI)
    refs = [
        (path, node)
        for path, node in _walk(doc)
        if path and (path[-1] == "$ref" or (len(path) > 1 and path[-2] == "mapping"))
    ]
    assert len(refs) > 20
    for path, ref in refs:
        assert isinstance(ref, str) and ref.startswith("#/"), (path, ref)
        resolver.lookup(ref)  # raises on a dangling one
    # Operation ids are unique; each path's template parameters are its path parameters.
    ids = [
        op["operationId"]
        for item in doc["paths"].values()
        for m, op in item.items()
        if m in METHODS
    ]
    assert len(ids) == len(set(ids))
    for template, item in doc["paths"].items():
        named = set(re.findall(r"\{([^}]+)\}", template))
        for method, op in item.items():
            if method not in METHODS:
                continue
            params = [_deref(doc, p) for p in item.get("parameters", []) + op.get("parameters", [])]
            assert {p["name"] for p in params if p["in"] == "path"} == named, (template, method)
    # Bearer auth everywhere a key is needed; none for the probes, metrics and the document.
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["apiKey"]["description"],
    }
    for template in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert all(op["security"] == [] for m, op in doc["paths"][template].items() if m in METHODS)


def test_the_limits_are_the_settings_defaults_and_follow_the_settings() -> None:
    body = openapi_document()["paths"]["/v1/projects/{project_id}/events"]["post"]["requestBody"]
    batch = body["content"]["application/json"]["schema"]["oneOf"][1]
    assert batch["maxItems"] == HttpApiSettings().max_events == 500 and batch["minItems"] == 1
    assert "4194304" in body["description"] and "--max-body" in body["description"]
    assert "--max-events" in body["description"]
    small = openapi_document(HttpApiSettings(max_events=7, max_body=9999))
    body = small["paths"]["/v1/projects/{project_id}/events"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["oneOf"][1]["maxItems"] == 7
    assert "9999" in body["description"]


def test_the_committed_document_is_up_to_date() -> None:
    """docs/openapi.json is the CLI's output; regenerate it with
    ``eventbus-publish http-api openapi > docs/openapi.json``."""
    assert OPENAPI_FILE.read_bytes() == openapi_json(), (
        "docs/openapi.json is stale: run .venv/bin/eventbus-publish http-api openapi "
        "> docs/openapi.json"
    )


def test_the_cli_prints_the_document(capsys) -> None:
    assert http_api_main(["openapi"]) == 0
    printed = capsys.readouterr().out.encode()
    assert printed == openapi_json()
    assert json.loads(printed) == openapi_document()
    assert http_api_main(["openapi", "--max-events", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == openapi_document(HttpApiSettings(max_events=3))
    assert publisher_main(["http-api", "openapi"]) == 0  # eventbus-publish http-api openapi
    assert capsys.readouterr().out.encode() == openapi_json()
    assert http_api_main(["openapi", "--max-events", "0"]) == 2  # as serve refuses it
    assert "--max-events must be from 1 to 500" in capsys.readouterr().err


def _codes(doc: dict, template: str, method: str) -> dict[int, set[str]]:
    """The error codes the document gives each status of an operation (404 and 405 of the
    extensions included)."""
    item = doc["paths"][template]
    responses = {**item[method]["responses"], "405": item["x-method-not-allowed"]}
    codes: dict[int, set[str]] = {}
    for status, response in responses.items():
        response = _deref(doc, response)
        schemas = [response.get("content", {}).get("application/json", {}).get("schema", {})]
        while schemas:
            schema = _deref(doc, schemas.pop())
            schemas += schema.get("anyOf", [])
            enum = schema.get("properties", {}).get("error", {}).get("properties", {})
            codes.setdefault(int(status), set()).update(enum.get("code", {}).get("enum", []))
    return codes


def test_every_status_and_code_of_the_docs_tables_is_in_the_document() -> None:
    """docs/http-publish.md's answer tables, row by row: each status is the operation's, with
    each code the row names."""
    doc = openapi_document()
    known = {
        code
        for template in doc["paths"]
        for method in ("get", "post")
        if method in doc["paths"][template]
        for codes in _codes(doc, template, method).values()
        for code in codes
    }
    text = (ROOT / "docs" / "http-publish.md").read_text()
    sections = {
        "## `POST /v1/projects/{id}/events`": [("/v1/projects/{project_id}/events", "post")],
        "## `GET /v1/projects/{id}/events` (history)": [
            ("/v1/projects/{project_id}/events", "get"),
            ("/v1/projects/{project_id}/presence", "get"),
        ],
        "## `POST /v1/revocations`": [("/v1/revocations", "post")],
    }
    rows = 0
    for heading, operations in sections.items():
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        for line in section.splitlines():
            cells = line.split("|")
            if len(cells) < 4 or not re.fullmatch(r"[0-9 /]+", cells[1].strip()):
                continue
            statuses = {int(s) for s in re.findall("[0-9]{3}", cells[1])}
            named = set(re.findall(r"`([a-z_]+)`", cells[2])) & known | (
                {"invalid_http"} if "invalid_http" in cells[2] else set()
            )
            for template, method in operations:
                codes = _codes(doc, template, method)
                assert statuses <= set(codes), (heading, line)
                for code in named:
                    assert any(code in codes[s] for s in statuses), (heading, template, code)
                rows += 1
    assert rows > 30


# --- the routes: the document's are the app's ------------------------------------------------


class _Quiet:
    """A publisher the route probe never needs (no key is sent: every route stops at 401)."""

    client = None
    foreign_entries_skipped = 0

    async def aclose(self) -> None:
        pass


async def _asgi(app: PublishApi, method: str, target: str) -> tuple[int, dict, bytes]:
    answer: dict = {"headers": [], "body": b""}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = message["headers"]
        else:
            answer["body"] += message.get("body", b"")

    split = urlsplit(target)
    scope = {
        "type": "http",
        "method": method,
        "path": split.path,
        "query_string": split.query.encode(),
        "headers": [],
    }
    await app(scope, receive, send)
    headers = {name.decode(): value.decode() for name, value in answer["headers"]}
    return answer["status"], headers, answer["body"]


def _template(doc: dict, path: str) -> str | None:
    for template in doc["paths"]:
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            return template
    return None


def _concrete(template: str) -> str:
    return template.replace("{project_id}", "1")


async def test_every_route_the_app_serves_is_described_and_nothing_more() -> None:
    """A (path, method) the app serves answers anything but the unknown path's 404 and a 405;
    the document describes exactly those. The candidates: the document's paths, and paths near
    them and the app's (a route added to the app without its description fails here)."""
    app = PublishApi(_Quiet(), keys())
    doc = openapi_document()
    candidates = {_concrete(t) for t in doc["paths"]} | {
        "/",
        "/v1",
        "/v1/projects/1",
        "/v1/projects/1/events",
        "/v1/projects/1/presence",
        "/v1/projects/1/members",
        "/v1/projects/1/history",
        "/v1/projects/1/revocations",
        "/v1/revocations",
        "/v1/revocations/",
        "/v1/openapi.json",
        "/openapi",
        "/openapi.yaml",
        "/docs",
        "/healthz",
        "/readyz",
        "/metrics",
        "/metrics/",
        "/openapi.json",
        "/v1/keys",
        "/v1/tokens",
    }
    served: set[tuple[str, str]] = set()
    for path in sorted(candidates):
        for method in METHODS:
            status, _, body = await _asgi(app, method.upper(), path)
            if status == 405:
                continue
            if status == 404 and json.loads(body)["error"]["code"] == "not_found":
                continue  # (no project id here is out of range: this is an unknown path)
            served.add((path, method))
    described = {
        (_concrete(template), method)
        for template, item in doc["paths"].items()
        for method in item
        if method in METHODS
    }
    assert served == described


# --- real answers validate against the document -----------------------------------------------


def _response(doc: dict, method: str, path: str, status: int) -> tuple[list, dict]:
    """The pointer (into the document) of the description of ``status`` answered to ``method``
    on ``path``, and the description; fails when the document has none."""
    template = _template(doc, path)
    if template is None:
        assert status == 404, f"{method} {path}: {status} for a path the document omits"
        pointer: list = ["x-not-found"]
    else:
        item = doc["paths"][template]
        if method.lower() not in item:
            assert status == 405, f"{method} {template}: {status} for a method the document omits"
            pointer = ["paths", template, "x-method-not-allowed"]
        else:
            responses = item[method.lower()]["responses"]
            assert str(status) in responses, (
                f"{method} {template} answered {status}, which the document does not describe"
            )
            pointer = ["paths", template, method.lower(), "responses", str(status)]
    node = doc
    for part in pointer:
        node = node[part]
    while "$ref" in node:
        pointer = node["$ref"][2:].split("/")
        node = _deref(doc, node)
    return pointer, node


def _validate(doc: dict, pointer: list, instance) -> None:
    schema = {"$ref": DOC_URI + "#" + _pointer(pointer)}
    Draft202012Validator(schema, registry=_registry(doc)).validate(instance)


def check(doc: dict, method: str, path: str, status: int, headers: dict, body: bytes) -> None:
    """Fails unless the answer is one the document describes: its status for the route, its
    headers (those the document requires present, each of its schema) and its body."""
    pointer, spec = _response(doc, method, path.split("?")[0], status)
    for name, header in spec.get("headers", {}).items():
        header_pointer = [*pointer, "headers", name]
        if "$ref" in header:
            header_pointer = header["$ref"][2:].split("/")
            header = _deref(doc, header)
        value = headers.get(name.lower())
        if header.get("required"):
            assert value is not None, f"{method} {path} {status}: no {name} header"
        if value is not None:
            typed = int(value) if header["schema"].get("type") == "integer" else value
            _validate(doc, [*header_pointer, "schema"], typed)
    if status == 405:
        template = _template(doc, path.split("?")[0])
        allowed = [m.upper() for m in METHODS if m in doc["paths"][template]]
        assert sorted(headers["allow"].split(", ")) == sorted(allowed), (path, headers["allow"])
    if method == "HEAD":
        assert body == b""
        return
    content = spec.get("content", {})
    media = headers["content-type"].split(";")[0]
    assert media in content, f"{method} {path} {status}: {media} is not described"
    instance = json.loads(body) if media == "application/json" else body.decode()
    _validate(doc, [*pointer, "content", media, "schema"], instance)


class _Client(Api):
    async def raw(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        if not request.startswith(b"HEAD "):
            return await super().raw(request)
        # A HEAD answer has the Content-Length of its GET and no body.
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            rest = await asyncio.wait_for(reader.read(), 10)  # (Connection: close)
        finally:
            writer.close()
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers, rest

    async def request(
        self,
        method: str,
        target: str,
        body: bytes | object | None = None,
        *,
        key: str | None = KEY_ALL,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        head = [f"{method} {target} HTTP/1.1", "Host: t", "Connection: close"]
        data = b""
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        if key is not None:
            head.append(f"Authorization: Bearer {key}")
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        return await self.raw(("\r\n".join(head) + "\r\n\r\n").encode() + data)


class _Checked:
    """Requests whose answers are checked against the document; records what was seen."""

    def __init__(self, client: _Client, doc: dict) -> None:
        self.client = client
        self.doc = doc
        self.seen: set[tuple[str, str, int]] = set()

    async def __call__(self, method: str, target: str, expected: int, *args, **kwargs) -> dict:
        status, headers, body = await self.client.request(method, target, *args, **kwargs)
        assert status == expected, (method, target, status, body)
        check(self.doc, method, target, status, headers, body)
        template = _template(self.doc, target.split("?")[0]) or "(unknown)"
        self.seen.add((method, template, status))
        return json.loads(body) if body and headers["content-type"] == "application/json" else {}

    async def raw(self, method: str, target: str, request: bytes, expected: int) -> dict:
        status, headers, body = await self.client.raw(request)
        assert status == expected, (status, body)
        check(self.doc, method, target, status, headers, body)
        return json.loads(body)


@contextlib.asynccontextmanager
async def _checked(redis_url: str, publisher=None, **settings):
    publisher = publisher or AsyncPublisher.from_url(redis_url)
    async with serving_app(publisher, keys(), **settings) as (app, _, port):
        yield _Checked(_Client(port), openapi_document(app.settings)), app


EVENTS = "/v1/projects/1/events"
PRESENCE = "/v1/projects/1/presence"
REVOKE = "/v1/revocations"


async def test_real_answers_of_every_route_validate_against_the_document(redis_url) -> None:
    async with _checked(redis_url, max_events=3, max_body=2048) as (req, _):
        # 200: one event, an array, a history page (with events, and a resync), presence.
        one = await req("POST", EVENTS, 200, EXPIRED)
        assert one["cursor"]["seq"] == 1
        many = await req("POST", EVENTS, 200, [resolved(1), resolved(2)])
        assert [c["seq"] for c in many["cursors"]] == [2, 3]
        page = await req("GET", EVENTS + f"?epoch={one['cursor']['epoch']}&after=0&limit=2", 200)
        assert len(page["events"]) == 2 and page["more"] is True
        resync = await req("GET", EVENTS + "?epoch=other&after=1", 200)
        assert resync["resync_required"]["reason"] == "epoch_changed"
        assert (await req("GET", EVENTS, 200))["events"] == []
        assert (await req("GET", PRESENCE, 200))["members"] == []
        await req("HEAD", EVENTS, 200)
        await req("HEAD", PRESENCE, 200)
        # 200: a revocation.
        revoked = await req("POST", REVOKE, 200, {"subject": "user-7"}, key=KEY_REVOKE)
        assert revoked["revocation"]["subject"] == "user-7"
        # The probes, the metrics, the document itself (no key needed).
        for probe in ("/healthz", "/readyz", "/openapi.json"):
            await req("GET", probe, 200, key=None)
            await req("HEAD", probe, 200, key=None)
        await req("GET", "/metrics", 200, key=None)
        await req("HEAD", "/metrics", 200, key=None)
        # 400s
        await req("POST", EVENTS, 400, b"not json")
        await req("POST", EVENTS, 400, b"[]")
        await req("POST", EVENTS, 400, EXPIRED, headers={"Idempotency-Key": "a b"})
        await req("POST", EVENTS, 400, b'{"type": "blocker_expired", "type": "x"}')
        await req("GET", EVENTS + "?limit=0", 400)
        await req("GET", PRESENCE + "?x=1", 400)
        await req("POST", REVOKE, 400, b"{", key=KEY_REVOKE)
        await req("GET", EVENTS, 400, headers={"Authorization": "Bearer x"})  # repeated
        await req.raw(
            "POST",
            EVENTS,
            b"POST /v1/projects/1/events HTTP/1.1\r\nHost: t\r\n"
            b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        )
        # 401, 403
        for method, target in (
            ("POST", EVENTS),
            ("GET", EVENTS),
            ("GET", PRESENCE),
            ("POST", REVOKE),
        ):
            body = EXPIRED if method == "POST" else None
            await req(method, target, 401, body, key=None)
            await req(method, target, 401, body, key="ebk_unknown")
        await req("POST", "/v1/projects/2/events", 403, EXPIRED, key=KEY_ONE)
        await req("GET", "/v1/projects/2/events", 403, key=KEY_ONE)
        await req("GET", "/v1/projects/2/presence", 403, key=KEY_ONE)
        await req("POST", REVOKE, 403, {"subject": "x"}, key=KEY_ALL)
        # 404: an unknown path, a project id out of range.
        await req("GET", "/v1/projects/1/members", 404)
        await req("GET", "/nowhere", 404, key=None)
        await req("POST", "/v1/projects/0/events", 404, EXPIRED)
        await req("GET", "/v1/projects/0/events", 404)
        await req("GET", "/v1/projects/0/presence", 404)
        # 405 (with Allow: the path's methods in the document)
        for method, target in (
            ("PUT", EVENTS),
            ("DELETE", PRESENCE),
            ("GET", REVOKE),
            ("POST", "/metrics"),
            ("POST", "/openapi.json"),
            ("PATCH", "/openapi.json"),
        ):
            await req(method, target, 405)
        # 409: a single event and an array (with the cursors of the written events).
        await req("POST", EVENTS, 200, resolved(9), headers={"Idempotency-Key": "k9"})
        await req("POST", EVENTS, 409, resolved(8), headers={"Idempotency-Key": "k9"})
        await req("POST", EVENTS, 200, [resolved(5), resolved(6)], headers={"Idempotency-Key": "a"})
        conflict = await req(
            "POST", EVENTS, 409, [resolved(5), resolved(7)], headers={"Idempotency-Key": "a"}
        )
        assert conflict["cursors"][1] is None and conflict["cursors"][0]["seq"] >= 1
        # 413: too many events, too large a body (events and revocations).
        await req("POST", EVENTS, 413, [EXPIRED] * 4)
        await req("POST", EVENTS, 413, [{**EXPIRED, "x": "y" * 3000}])
        await req("POST", REVOKE, 413, {"subject": "s" * 3000}, key=KEY_REVOKE)
        # 415
        for target, key in ((EVENTS, KEY_ALL), (REVOKE, KEY_REVOKE)):
            await req("POST", target, 415, key=key, headers={"Content-Type": "text/plain"})
        # 422
        await req("POST", EVENTS, 422, {**EXPIRED, "task_id": "x"})
        await req("POST", EVENTS, 422, [EXPIRED, {**EXPIRED, "project_id": 2}])
        await req("POST", REVOKE, 422, {"subject": ""}, key=KEY_REVOKE)
        await req("POST", REVOKE, 422, {"subject": "x", "keep_for": 10**9}, key=KEY_REVOKE)
        # 429 (with Retry-After), for a publish, a read and a revocation.
        await req("GET", EVENTS, 200, key=KEY_SLOW)
        await req("GET", PRESENCE, 200, key=KEY_SLOW)
        for method, target, body in (
            ("GET", EVENTS, None),
            ("GET", PRESENCE, None),
            ("POST", EVENTS, EXPIRED),
        ):
            await req(method, target, 429, body, key=KEY_SLOW)
        # 431
        await req("GET", "/healthz", 431, key=None, headers={"X-Big": "x" * 40_000})
    seen = {(m, t, s) for m, t, s in req.seen}
    assert ("POST", "/v1/projects/{project_id}/events", 409) in seen


def _query_admitted(doc: dict, template: str, method: str, query: str) -> None:
    """Fails unless the document admits each parameter of ``query`` as given: a blank value
    (``tag=``) only where the parameter says ``allowEmptyValue`` (OpenAPI's way of saying that a
    client may send one), any other one where it validates against the parameter's schema."""
    item = doc["paths"][template]
    params = {p["name"]: p for p in [*item.get("parameters", []), *item[method]["parameters"]]}
    for name, value in parse_qsl(query, keep_blank_values=True):
        param = params[name]
        assert param["in"] == "query", name
        if value == "":
            assert param.get("allowEmptyValue") is True, f"{name}= is not admitted"
            continue
        typed = int(value) if param["schema"].get("type") == "integer" else value
        jsonschema.validate(typed, param["schema"], cls=Draft202012Validator)


async def test_a_blank_query_value_the_api_takes_as_absent_is_one_the_document_admits(
    redis_url,
) -> None:
    """docs/http-publish.md: a blank history parameter is the parameter's absence (its loop
    sends ``tag=`` on the first page). The document admitted no blank value (``tag`` a pattern
    of 16 hex digits, ``epoch`` at least one character), so a client generated from it, or a
    fuzzer (schemathesis' negative_data_rejection, which found it), took the 200 for a
    malformed request accepted."""
    async with _checked(redis_url) as (req, _):
        doc = req.doc
        for query in ("tag=", "epoch=&after=&tag=&limit=", "limit=&tag=", "epoch=&after="):
            await req("GET", f"{EVENTS}?{query}", 200)
            await req("HEAD", f"{EVENTS}?{query}", 200)
            for method in ("get", "head"):
                _query_admitted(doc, "/v1/projects/{project_id}/events", method, query)


async def test_revocations_the_api_refuses_for_their_range_the_document_refuses(redis_url) -> None:
    """The ranges docs/http-publish.md gives a revocation that do not depend on the time: a
    ``keep_for`` of at most 366 days and a subject of at most 1,024 bytes (so characters). The
    document's RevocationRequest admitted any ``keep_for`` up to 2**53 - 1 and any subject, so a
    client generated from it sent them and got a 422 it could not foresee (schemathesis'
    positive_data_acceptance found the keep_for)."""
    year = 366 * 86400
    async with _checked(redis_url) as (req, _):
        doc = req.doc
        schema = {"$ref": DOC_URI + "#/components/schemas/RevocationRequest"}
        validator = Draft202012Validator(schema, registry=_registry(doc))
        for body, status in (
            ({"subject": "u", "keep_for": year}, 200),
            ({"subject": "u", "keep_for": year + 1}, 422),
            ({"subject": "u", "keep_for": 2**53 - 1}, 422),
            ({"subject": "s" * 1024}, 200),
            ({"subject": "s" * 1025}, 422),
        ):
            await req("POST", REVOKE, status, body, key=KEY_REVOKE)
            assert validator.is_valid(body) == (status == 200), body


async def test_an_integer_written_with_a_fraction_is_refused_as_the_docs_say(redis_url) -> None:
    """docs/http-publish.md: JSON Schema's ``integer`` admits ``3600.0`` and ``1e3`` (the same
    numbers as 3600 and 1000), but the API refuses them 422 naming the field, in an event as in
    a revocation (what Python's ``json.dumps(delta.total_seconds())`` sends). The fuzz test
    expects this refusal and no other of a valid request, so it is pinned here."""
    async with _checked(redis_url) as (req, _):
        for target, body, key, field in (
            (EVENTS, {**EXPIRED, "task_id": 2.0}, KEY_ALL, "$.task_id"),
            (EVENTS, [{**EXPIRED, "blocker_id": 1e3}], KEY_ALL, "$.blocker_id"),
            (REVOKE, {"subject": "u", "keep_for": 3600.0}, KEY_REVOKE, "$.keep_for"),
        ):
            answer = await req("POST", target, 422, body, key=key)
            assert "got `float`" in answer["error"]["message"], answer
            assert field in answer["error"]["message"], answer
        await req("POST", REVOKE, 200, {"subject": "u", "keep_for": 3600}, key=KEY_REVOKE)


async def test_slow_bodies_damaged_keys_and_a_full_revocation_list_validate(
    redis_url, redis_client
) -> None:
    redis_client.set(Keys().meta(4), "not a hash")
    publisher = AsyncPublisher.from_url(redis_url, max_revocations=1)
    async with _checked(redis_url, publisher, body_timeout=0.2) as (req, _):
        # 408: the body does not arrive (the answer is awaited, no sleep).
        request = (
            "POST /v1/projects/1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY_ALL}\r\nContent-Length: 100\r\nConnection: close\r\n\r\n"
        ).encode() + b"{"
        await req.raw("POST", EVENTS, request, 408)
        # 502: the project's keys hold what the bus did not write.
        await req("POST", "/v1/projects/4/events", 502, EXPIRED)
        await req("GET", "/v1/projects/4/events", 502)
        # 507: a new subject beyond the cap.
        await req("POST", REVOKE, 200, {"subject": "a"}, key=KEY_REVOKE)
        await req("POST", REVOKE, 507, {"subject": "b"}, key=KEY_REVOKE)
        redis_client.set(Keys().revocations(), "not a hash")
        await req("POST", REVOKE, 502, {"subject": "a"}, key=KEY_REVOKE)


async def test_answers_while_redis_is_down_validate() -> None:
    with RedisServer() as server:
        async with _checked(server.url, AsyncPublisher.from_url(server.url, timeout=1.0)) as (
            req,
            _,
        ):
            await req("GET", "/readyz", 200, key=None)
            server.stop()
            await req("POST", EVENTS, 503, EXPIRED)
            await req("GET", EVENTS, 503)
            await req("GET", PRESENCE, 503)
            await req("POST", REVOKE, 503, {"subject": "x"}, key=KEY_REVOKE)
            await req("GET", "/readyz", 503, key=None)
            await req("HEAD", "/readyz", 503, key=None)
            await req("GET", "/healthz", 200, key=None)


async def test_the_overloaded_answer_validates_on_every_operation(redis_url) -> None:
    """503 ``overloaded`` (past --limit-concurrency) may answer any request but the probes' and
    /metrics' (answered past the limit): with the one place held by an open connection, each
    operation of the document gets it, as described, and those get their answer."""
    async with _checked(redis_url, limit_concurrency=1) as (req, _):
        # (Connections are accepted and seen in the order they connected.)
        _, held = await asyncio.open_connection("127.0.0.1", req.client.port)
        try:
            for template, item in req.doc["paths"].items():
                for method in item:
                    if method in METHODS:
                        body = {"subject": "x"} if method == "post" else None
                        expected = 200 if template.encode() in UNBOUNDED_PATHS else 503
                        await req(method.upper(), _concrete(template), expected, body)
        finally:
            held.close()
    assert len(req.seen) == sum(m in METHODS for item in req.doc["paths"].values() for m in item)


def test_an_undescribed_answer_fails_the_check() -> None:
    """The check itself: an answer with a status, a code or a body the document does not give
    the route fails (so the tests above prove something)."""
    doc = openapi_document()
    json_headers = {"content-type": "application/json"}
    error = b'{"error":{"code":"invalid_query","message":"m"}}'
    with pytest.raises(AssertionError, match="does not describe"):
        check(doc, "GET", "/healthz", 418, json_headers, b"{}")
    with pytest.raises(jsonschema.ValidationError):  # a code of another route
        check(doc, "POST", EVENTS, 400, json_headers, error)
    check(doc, "GET", EVENTS, 400, json_headers, error)
    with pytest.raises(jsonschema.ValidationError):
        check(doc, "POST", EVENTS, 200, json_headers, b'{"cursor": {"epoch": "e"}}')
    with pytest.raises(AssertionError, match="Retry-After"):
        check(
            doc,
            "GET",
            PRESENCE,
            503,
            json_headers,
            b'{"error":{"code":"unavailable","message":"m"}}',
        )


# --- served by the API ------------------------------------------------------------------------


async def test_the_api_serves_its_document_without_a_key_built_once(monkeypatch) -> None:
    from publisher.http_api import openapi

    built = []
    real = openapi.openapi_json

    def counting(settings=None):
        built.append(settings)
        return real(settings)

    monkeypatch.setattr(openapi, "openapi_json", counting)
    settings = HttpApiSettings(max_events=9)
    app = PublishApi(_Quiet(), keys(), settings)
    status, headers, body = await _asgi(app, "GET", "/openapi.json")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == openapi_document(settings)  # this app's limits
    status, headers, _ = await _asgi(app, "HEAD", "/openapi.json")
    assert status == 200 and int(headers["content-length"]) == len(body)
    assert (await _asgi(app, "GET", "/openapi.json"))[2] == body
    assert len(built) == 1


def test_the_bodies_the_document_models_as_structs_are_the_bytes_the_api_sends() -> None:
    from publisher.core import Cursor
    from publisher.http_api.core import ApiError, cursor_body, error_body

    assert error_body(ApiError(400, "invalid_json", "m")) == (
        b'{"error":{"code":"invalid_json","message":"m"}}'
    )
    cursors = [Cursor("e", 1), None]
    assert error_body(ApiError(409, "idempotency_conflict", "m", cursors=cursors)) == (
        b'{"error":{"code":"idempotency_conflict","message":"m"},'
        b'"cursors":[{"epoch":"e","seq":1},null]}'
    )
    assert cursor_body([Cursor("e", 1)], False) == b'{"cursor":{"epoch":"e","seq":1}}'
    assert cursor_body([Cursor("e", 1)], True) == b'{"cursors":[{"epoch":"e","seq":1}]}'
    assert msgspec.json.decode(_OVERLOADED)["error"]["code"] == "overloaded"


def test_only_requests_with_a_body_are_said_to_be_refused_for_body_memory() -> None:
    """A 503 ``overloaded`` past --max-body-memory comes only to a request whose body the API
    reads (a publish, a revocation): a GET of /healthz or of a history was documented as
    refused for it too."""
    document = openapi_document(HttpApiSettings())
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            refused = operation["responses"].get("503", {}).get("description", "")
            if path.encode() in UNBOUNDED_PATHS:  # (answered past --limit-concurrency)
                assert "--max-body-memory" not in refused, (path, method)
                continue
            assert "limit-concurrency" in refused, (path, method)
            assert ("--max-body-memory" in refused) == (method == "post"), (path, method)
