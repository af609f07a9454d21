"""``/openapi.json``: every route a node mounts is documented, and nothing else.

Each node kind mounts another route table (the source trains and guards, a serving replica
predicts and takes the source's guard messages, a checkpoint replica can be told to refresh);
the document is generated from that table, so it lists exactly its routes with their roles,
body types and limits, and ``schemathesis`` (which the integration fuzz drives with it) reads
it as a valid OpenAPI 3.1 document.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from node_apps import NODES, cluster_config, node_app
from starlette.routing import Route

from ekko.net.httpkit import CONTROL_BODY_BYTES, MAX_BODY_BYTES, BodyRoute, bounded_app
from ekko.net.openapi import openapi_document
from ekko.node.access import AccessPolicy, signature_security
from ekko.node.table_routes import RowsBody


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cluster_config(tmp_path_factory.mktemp("openapi"))


async def _document(app) -> dict:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        r = await client.get("/openapi.json")  # no credential: the document is open
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    return r.json()


def _plain(path: str) -> str:
    """A route's path as documented: ``{table:path}`` is ``{table}``."""
    return re.sub(r"{([^}:]+):[^}]+}", r"{\1}", path)


def _mounted(app) -> set[tuple[str, str]]:
    return {
        (method, _plain(route.path))
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods - {"HEAD"}
    }


def _documented(doc: dict) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in doc["paths"].items() for m in item}


@pytest.mark.parametrize("name", NODES)
async def test_every_mounted_route_is_documented_and_nothing_else(config: Path, name: str) -> None:
    app = node_app(config, name)
    doc = await _document(app)
    assert doc["openapi"] == "3.1.0"
    assert _documented(doc) == _mounted(app)
    assert ("GET", "/openapi.json") in _documented(doc)
    body_routes = {_plain(r.path): r for r in app.routes if isinstance(r, BodyRoute)}
    policy = AccessPolicy()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            need = policy.required(method.upper(), path)
            if need is None:
                assert "security" not in op, (method, path)
            else:
                assert op["security"] == [{"ekkoSignature": sorted(need)}], (method, path)
                assert {"401", "403", "4XX"} <= set(op["responses"])
            if method == "post":
                route = body_routes.get(path)
                limit = route.max_body if route is not None else CONTROL_BODY_BYTES
                assert op["x-max-body-bytes"] == limit, path
                if route is not None and route.body is not None:
                    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                    assert ref == f"#/components/schemas/{route.body.__name__}"
    schemes = doc["components"]["securitySchemes"]
    assert schemes["ekkoSignature"]["name"] == "x-ekko-signature"
    assert doc["components"]["schemas"]["ErrorBody"]["required"] == ["error"]


async def test_the_documents_name_each_kinds_own_routes(config: Path) -> None:
    docs = {name: await _document(node_app(config, name)) for name in NODES}
    src, replica, ckpt = (set(docs[n]["paths"]) for n in NODES)
    assert "/v1/models/{model}/train" in src - replica
    assert "/v1/models/{model}/guard/report" in src - replica
    assert "/v1/models/{model}/guard/redirect" in replica - src
    assert "/v1/checkpoint/refresh" in ckpt - src - replica
    rows = docs["source"]["paths"]["/v1/tables/{table}/rows"]["post"]
    assert rows["x-max-body-bytes"] == MAX_BODY_BYTES
    assert rows["security"] == [{"ekkoSignature": ["operator", "writer"]}]
    assert docs["source"]["components"]["schemas"]["RowsBody"]["required"] == ["keys", "values"]
    predict = docs["dc1-r0"]["paths"]["/v1/models/{model}/predict"]["post"]
    assert "security" not in predict  # [http] serve_open, the default


@pytest.mark.parametrize("name", NODES)
async def test_schemathesis_reads_every_operation_of_the_document(config: Path, name: str) -> None:
    doc = await _document(node_app(config, name))
    schema = schemathesis.openapi.from_dict(doc)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} == _documented(doc)
    for op in operations:
        _one_case(op)


def _one_case(op) -> None:
    @settings(max_examples=1, database=None, suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy())
    def draws(case) -> None:
        assert case.method.upper() == op.method.upper()

    draws()


def test_a_route_added_later_is_documented_with_its_body_and_limit() -> None:
    async def endpoint(request):  # pragma: no cover - never called
        """Write some rows."""

    routes = [BodyRoute("/v1/x/{thing}", endpoint, max_body=123, body=RowsBody)]
    doc = openapi_document(
        routes, title="t", version="1", security=signature_security(AccessPolicy())
    )
    op = doc["paths"]["/v1/x/{thing}"]["post"]
    assert op["summary"] == "Write some rows."
    assert op["x-max-body-bytes"] == 123
    assert op["parameters"] == [
        {"name": "thing", "in": "path", "required": True, "schema": {"type": "string"}}
    ]
    assert op["security"] == [{"ekkoSignature": ["operator"]}]  # not in the table: closed
    props = doc["components"]["schemas"]["RowsBody"]["properties"]
    assert set(props) == {"keys", "values"}


async def test_no_route_and_wrong_method_are_json_naming_the_request() -> None:
    async def ok(request):  # pragma: no cover - never called
        raise AssertionError

    app = bounded_app([Route("/a", ok, methods=["GET"]), Route("/a", ok, methods=["POST"])])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        r = await client.get("/nope")
        assert r.status_code == 404 and r.json() == {"error": "Not Found: GET '/nope'"}
        r = await client.delete("/a")
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST"
        assert r.json() == {"error": "Method Not Allowed: DELETE '/a' (allowed: GET, HEAD, POST)"}
