"""The admin HTTP API every node serves: status, row reads, writes at the source, metrics.

Handlers are thin: parse and validate the request (a bad one is a 4xx naming the field),
call the node, render JSON. Validation never touches the store before the whole request is
known to be good.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ekko.net.httpkit import (
    MAX_BODY_BYTES,
    BodyRoute,
    Int64,
    RequestError,
    bounded_app,
    guarded_by,
    offload,
    parse_json,
    read_body,
)
from ekko.node.access import AccessPolicy, RequireRole
from ekko.node.core import NodeCore, NotReadyError, NotSourceError
from ekko.node.signed_requests import NonceCache
from ekko.store import StoreError, UnknownTableError, WalError

BadRequest = RequestError  # the name this module's callers and tests know

guarded = guarded_by({
    UnknownTableError: 404,
    NotSourceError: 409,
    NotReadyError: 503,
    WalError: (503, "write not durable: "),  # in the store but not durable: not acknowledged
    StoreError: 400,
})  # fmt: skip
"""Request and store errors as 4xx/503 JSON with the reason; the server keeps serving."""


class RowsBody(msgspec.Struct, forbid_unknown_fields=True):
    """A row write: one row of the table's ``dim`` finite numbers per key (``parse_rows``
    checks it, naming the field; the store checks finiteness and ``max_abs``)."""

    keys: list[Int64]
    values: list[list[float]]


def parse_keys(raw: Any, field: str = "keys") -> np.ndarray:
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f"{field}: expected a non-empty list of integers")
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in raw):
        bad = next(k for k in raw if not isinstance(k, int) or isinstance(k, bool))
        raise BadRequest(f"{field}: every key must be an integer (int64), got {reprlib.repr(bad)}")
    try:
        return np.array(raw, dtype=np.int64)
    except OverflowError as exc:
        raise BadRequest(f"{field}: a key does not fit in int64") from exc


def parse_rows(body: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(body, dict):
        raise BadRequest('body: expected an object {"keys": [...], "values": [[...], ...]}')
    unknown = sorted(set(body) - {"keys", "values"})
    if unknown:
        raise BadRequest(f"body: unknown fields {unknown}")
    keys = parse_keys(body.get("keys"))
    raw = body.get("values")
    if not isinstance(raw, list) or len(raw) != len(keys):
        got = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise BadRequest(f"values: expected a list of {len(keys)} rows (one per key), got {got}")
    for i, row in enumerate(raw):
        if not isinstance(row, list) or len(row) != dim:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise BadRequest(f"values[{i}]: expected {dim} numbers, got {got}")
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in row):
            raise BadRequest(f"values[{i}]: every element must be a number")
    values = np.array(raw, dtype=np.float32)
    return keys, values  # finiteness and max_abs: the store's write check, named per value


def parse_write(body: bytes, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A row write's body, parsed and validated (run off the loop when large)."""
    return parse_rows(parse_json(body), dim)


def admin_routes(
    core: NodeCore,
    registry: CollectorRegistry,
    extra_status: Callable[[], dict] | None = None,
    max_body: int = MAX_BODY_BYTES,
) -> list[Route]:
    """Routes of the admin API (a row write wakes parked pulls through the source's port); a
    row write's body is at most ``max_body`` bytes."""

    @guarded
    async def status(request: Request) -> Response:
        doc = core.status()
        if extra_status is not None:
            doc.update(extra_status())
        return JSONResponse(doc)

    @guarded
    async def get_rows(request: Request) -> Response:
        table = core.store.table(request.path_params["table"])
        raw = request.query_params.get("keys", "")
        try:
            keys = [int(k) for k in raw.split(",") if k.strip()]
        except ValueError as exc:
            raise BadRequest(
                f"keys: expected comma-separated integers, got {reprlib.repr(raw)}"
            ) from exc
        return JSONResponse(core.read_rows(table.name, parse_keys(keys)))

    @guarded
    async def post_rows(request: Request) -> Response:
        core.require_source("write to")
        table = core.store.table(request.path_params["table"])
        keys, values = await offload(parse_write, await read_body(request), table.dim)
        versions = core.write(table.name, keys, values)
        await core.wait_durable()  # acknowledged = on disk (one fsync per group commit)
        return JSONResponse({"table": table.name, "versions": versions.tolist()})

    async def latency(request: Request) -> Response:
        return JSONResponse(core.latency.to_dict() | core.latency.summary())

    async def reset_latency(request: Request) -> Response:
        core.latency.reset()
        return JSONResponse({"reset": True})

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "node": core.name})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @guarded
    async def snapshot(request: Request) -> Response:
        core.require_source("full copies come from")
        return Response(core.export_snapshot(), media_type="application/octet-stream")

    return [
        Route("/v1/status", status),
        # {table:path}: a model's dense tables are named dense/{tensor}
        Route("/v1/tables/{table:path}/rows", get_rows, methods=["GET"]),
        BodyRoute("/v1/tables/{table:path}/rows", post_rows, max_body=max_body, body=RowsBody),
        Route("/v1/latency", latency),
        Route("/v1/latency/reset", reset_latency, methods=["POST"]),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/snapshot", snapshot, methods=["GET"]),
    ]


def admin_app(
    routes: list[Route],
    secret: bytes,
    policy: AccessPolicy | None = None,
    names: frozenset[str] = frozenset(),
) -> Starlette:
    """The node's HTTP app: every body bounded by its route's declared limit
    (``ekko.net.httpkit.BodyLimit``), then ``RequireRole``: each route needs the credential
    ``policy`` names (``ekko.node.access``), signed with a key derived from the cluster
    ``secret`` for this node (the address a connection reached, or one of ``names``: its
    advertised host:port)."""
    policy = policy or AccessPolicy()
    # Created now, not at the first request (Starlette builds middleware lazily): signatures
    # are accepted from the node's start on.
    nonces = NonceCache()
    middleware = [Middleware(RequireRole, secret=secret, policy=policy, nonces=nonces, names=names)]
    return bounded_app(routes, middleware)
