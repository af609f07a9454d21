"""One body limit per route, declared with it and checked in front of everything.

Every route family a node mounts (admin, serving, training, guard) is served here through the
node's own app (``admin_app``: ``BodyLimit``, then the signature check): a body over its
route's limit is refused 413 from ``content-length`` before a byte of it is read, and one sent
without a length is cut as the count passes the limit. The audit at the end walks the same
routes: each that changes state or exposes a model needs a credential (or is one of the
serving routes ``[http] serve_open`` leaves open) and each that takes a body declares a limit.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.registry import CollectorRegistry
from starlette.routing import BaseRoute, Route

from ekko.guard.routes import replica_guard_routes, source_guard_routes
from ekko.net.httpkit import CONTROL_BODY_BYTES, BodyRoute
from ekko.net.signed_requests import auth_headers
from ekko.node.access import AccessPolicy
from ekko.node.admin import admin_app, admin_routes
from ekko.serve.oip_routes import oip_routes
from ekko.serve.routes import serve_routes
from ekko.train.routes import train_routes

SECRET = b"cluster-secret"
LIMIT = 1000  # what the data routes are given here ([http] max_body_bytes on a node)


# Stand-ins for the node, a model's service, trainer and guard: enough for a handler to
# reach the point where it reads the body (a refused body never gets further).
CORE = SimpleNamespace(
    require_source=lambda what: None,
    store=SimpleNamespace(table=lambda name: SimpleNamespace(name=name, dim=1)),
)
MODEL = SimpleNamespace(
    name="ctr",
    config=SimpleNamespace(num_dense=1, num_sparse=1, dense_limit=1.0),
    reset_quality=lambda: None,
    report=lambda doc: None,
    restored=lambda doc: None,
)
FAMILIES: dict[str, Callable[[], list[BaseRoute]]] = {
    "admin": lambda: admin_routes(CORE, CollectorRegistry(), lambda: None, max_body=LIMIT),  # type: ignore[arg-type]
    "serve": lambda: serve_routes({"ctr": MODEL}, max_body=LIMIT),  # type: ignore[dict-item]
    "oip": lambda: oip_routes({"ctr": MODEL}, version="t", max_body=LIMIT),  # type: ignore[dict-item]
    "train": lambda: train_routes({"ctr": MODEL}, max_body=LIMIT),  # type: ignore[dict-item]
    "replica guard": lambda: replica_guard_routes({"ctr": MODEL}),  # type: ignore[dict-item]
    "source guard": lambda: source_guard_routes({"ctr": MODEL}),  # type: ignore[dict-item]
}
# (family, path, role that signs it or None for an open route, the route's limit)
CASES = [
    ("admin", "/v1/tables/emb/rows", "writer", LIMIT),
    ("serve", "/v1/models/ctr/predict", None, LIMIT),
    ("serve", "/v1/models/ctr/feedback", None, LIMIT),
    ("oip", "/v2/models/ctr/infer", None, LIMIT),
    ("train", "/v1/models/ctr/train", "writer", LIMIT),
    ("train", "/v1/models/ctr/train/quality/reset", "operator", CONTROL_BODY_BYTES),
    ("replica guard", "/v1/models/ctr/guard/redirect", "node", CONTROL_BODY_BYTES),
    ("replica guard", "/v1/models/ctr/guard/rolled_back", "node", CONTROL_BODY_BYTES),
    ("source guard", "/v1/models/ctr/rollback", "operator", CONTROL_BODY_BYTES),
    ("source guard", "/v1/models/ctr/guard/report", "node", CONTROL_BODY_BYTES),
    ("source guard", "/v1/models/ctr/guard/restored", "node", CONTROL_BODY_BYTES),
]


class Counted:
    """The node's app with every body byte it reads counted."""

    def __init__(self, routes: list[BaseRoute]) -> None:
        self.app = admin_app(routes, SECRET)
        self.read = 0

    async def __call__(self, scope, receive, send) -> None:
        async def counted():
            message = await receive()
            self.read += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


def _headers(role: str | None, path: str, body: bytes) -> dict[str, str]:
    return {} if role is None else auth_headers(SECRET, role, "POST", path, body, host="test")


@pytest.mark.parametrize(("family", "path", "role", "limit"), CASES)
async def test_a_body_over_its_routes_limit_is_refused_before_it_is_read(
    family: str, path: str, role: str | None, limit: int
) -> None:
    app = Counted(FAMILIES[family]())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        body = b"x" * (limit + 1)
        r = await c.post(path, content=body, headers=_headers(role, path, body))
        assert r.status_code == 413, r.text
        assert r.json()["error"] == f"body: {limit + 1} bytes; the limit is {limit}"
        assert app.read == 0  # refused from content-length: nothing read

        chunk = max(1, limit // 4)
        parts = [b"x" * chunk] * (3 * limit // chunk)
        streamed = b"".join(parts)

        async def chunks() -> AsyncIterator[bytes]:
            for part in parts:
                yield part

        r = await c.post(path, content=chunks(), headers=_headers(role, path, streamed))
        assert r.status_code == 413, r.text
        assert r.json()["error"] == f"body: over {limit} bytes; the limit is {limit}"
        assert app.read <= limit + chunk  # cut as the count passed the limit

        app.read = 0  # under the limit, the body reaches the route, which judges it
        body = b"[" + b" " * (limit - 2) + b"]"
        r = await c.post(path, content=body, headers=_headers(role, path, body))
        if path.endswith("/reset"):  # takes no body: reset
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 400 and r.json()["error"].startswith("body: "), r.text
        assert app.read == limit


def _concrete(path: str) -> str:
    path = re.sub(r"\{version\}", "1", path)
    return re.sub(r"\{model\}", "ctr", re.sub(r"\{table(:path)?\}", "emb", path))


SERVING = {("GET", "/v1/models"), ("POST", "/v1/models/ctr/predict"),
           ("POST", "/v1/models/ctr/feedback"), ("GET", "/v2/models/ctr"),
           ("GET", "/v2/models/ctr/ready"), ("POST", "/v2/models/ctr/infer"),
           ("GET", "/v2/models/ctr/versions/1"), ("GET", "/v2/models/ctr/versions/1/ready"),
           ("POST", "/v2/models/ctr/versions/1/infer")}  # fmt: skip
PROBES = {"/health", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready"}
"""Open on every node: liveness, readiness and server facts, no model or rows."""


def test_every_route_that_changes_state_or_shows_a_model_needs_a_credential() -> None:
    routes = [r for make in FAMILIES.values() for r in make()]
    closed = AccessPolicy(serve_open=False)
    open_ = AccessPolicy(serve_open=True)
    seen = set()
    for route in routes:
        assert isinstance(route, Route)
        for method in sorted(route.methods - {"HEAD"}):
            path = _concrete(route.path)
            seen.add((method, path))
            need = closed.required(method, path)
            if path in PROBES:
                assert need is None
                continue
            assert need, (method, path)  # a credential, once serving is closed
            if method == "POST":
                # a reader predicts and looks rows up (a body of keys); neither changes anything
                if not path.endswith(("/predict", "/infer", "/lookup")):
                    assert "reader" not in need, (method, path)
                # The body it takes is bounded by a limit declared with the route.
                assert isinstance(route, BodyRoute) or path.endswith(
                    ("/latency/reset", "/quality/reset")
                ), path
            if (method, path) not in SERVING:
                assert open_.required(method, path) == need, (method, path)
    assert seen >= SERVING  # the serving routes the audit allows open all exist
    assert {p for _, p, _, _ in CASES} <= {p for _, p in seen}
