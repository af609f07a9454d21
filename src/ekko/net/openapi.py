"""An OpenAPI 3.1 document of an HTTP app, generated from its route table.

Why from the route table: the routes an app mounts are the ones it documents, no more and no
fewer, so a route added later is documented (and fuzzed: the tests and ``schemathesis`` walk
the document) without anyone writing it down twice. What the table says becomes the document:
each route's path and methods, its path parameters, the body type a ``BodyRoute`` declares
(the msgspec type its handler decodes, as JSON Schema from ``msgspec.json.schema_components``)
and its body limit (``x-max-body-bytes``); every 4xx/503 is an ``ErrorBody``. Who may call a
route is the caller's to say (``Security``): this module knows no roles.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ekko.net.httpkit import CONTROL_BODY_BYTES, BodyRoute, ErrorBody

OPENAPI_VERSION = "3.1.0"
OPENAPI_PATH = "/openapi.json"
_REF = "#/components/schemas/{name}"
_PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")


@dataclass(frozen=True)
class Security:
    """How requests prove who they are: one OpenAPI security scheme, and the roles each route
    accepts (``roles(method, path)``; None: open). OpenAPI 3.1 lets a non-OAuth requirement
    list role names, so each operation names the roles it accepts."""

    name: str
    scheme: dict[str, Any]
    roles: Callable[[str, str], Collection[str] | None]


@dataclass
class _Schemas:
    """The component schemas of the body types met so far (one ``$ref`` per type)."""

    types: list[Any] = field(default_factory=list)

    def ref(self, typ: Any) -> dict[str, Any]:
        if typ not in self.types:
            self.types.append(typ)
        (schema,), _ = msgspec.json.schema_components([typ], ref_template=_REF)
        return schema

    def components(self) -> dict[str, Any]:
        _, components = msgspec.json.schema_components(self.types, ref_template=_REF)
        return components


def _operation(
    route: Route, method: str, schemas: _Schemas, security: Security | None
) -> dict[str, Any]:
    path = route.path
    doc = (getattr(route.endpoint, "__doc__", None) or "").strip()
    op: dict[str, Any] = {
        "operationId": f"{method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', path)}".rstrip("_"),
        "summary": doc.splitlines()[0] if doc else f"{method} {path}",
        "responses": {
            "2XX": {"description": "done"},
            "4XX": _error("the request cannot be served as sent; the message says why"),
            "503": _error("not now (recovering, not synced, busy): retry later"),
        },
    }
    params = _PARAM.findall(path)
    if params:
        op["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in params
        ]
    if method not in ("GET", "DELETE"):
        limit = route.max_body if isinstance(route, BodyRoute) else CONTROL_BODY_BYTES
        op["x-max-body-bytes"] = limit
        body = route.body if isinstance(route, BodyRoute) else None
        if body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schemas.ref(body)}},
            }
    if security is not None:
        roles = security.roles(method, _PARAM.sub(r"{\1}", path))
        if roles is not None:
            op["security"] = [{security.name: sorted(roles)}]
            op["responses"]["401"] = _error("no credential, or not a valid one")
            op["responses"]["403"] = _error("a role this route does not accept")
    return op


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _REF.format(name="ErrorBody")}}},
    }


def openapi_document(
    routes: Sequence[BaseRoute],
    *,
    title: str,
    version: str,
    security: Security | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (plain and body routes; others, such as mounts,
    are not supported and raise ``TypeError`` rather than going undocumented)."""
    schemas = _Schemas([ErrorBody])
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            raise TypeError(f"cannot document {type(route).__name__} {route!r}")
        item = paths.setdefault(_PARAM.sub(r"{\1}", route.path), {})
        for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
            if method.lower() in item:
                raise ValueError(f"{method} {route.path} is mounted twice")
            item[method.lower()] = _operation(route, method, schemas, security)
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": schemas.components()},
    }
    if security is not None:
        doc["components"]["securitySchemes"] = {security.name: security.scheme}
    return doc


def openapi_route(
    routes: Sequence[BaseRoute],
    *,
    title: str,
    version: str,
    security: Security | None = None,
) -> Route:
    """``GET /openapi.json``: the document of ``routes`` as they are when it is first asked
    for (the caller mounts this route among them, so it documents itself too)."""
    cached: list[bytes] = []

    async def openapi(request: Request) -> Response:
        """This document: every route this node mounts."""
        if not cached:
            doc = openapi_document(routes, title=title, version=version, security=security)
            cached.append(msgspec.json.encode(doc))
        return Response(cached[0], media_type="application/json")

    return Route(OPENAPI_PATH, openapi, methods=["GET"])


__all__ = [
    "OPENAPI_PATH",
    "OPENAPI_VERSION",
    "Security",
    "openapi_document",
    "openapi_route",
]
