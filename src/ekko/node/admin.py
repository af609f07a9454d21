"""The admin HTTP API every node serves: status, row reads, writes at the source, metrics.

Handlers are thin: parse and validate the request (a bad one is a 4xx naming the field),
call the node, render JSON. Validation never touches the store before the whole request is
known to be good.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ekko.net.httpkit import (
    MAX_BODY_BYTES,
    RequestError,
    bounded_app,
    guarded_by,
)
from ekko.net.signed_requests import NonceCache
from ekko.node.access import AccessPolicy, RequireRole
from ekko.node.core import NodeCore, NotReadyError, NotSourceError
from ekko.node.lookup_variant import Baseline
from ekko.node.table_routes import table_routes
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


def admin_routes(
    core: NodeCore,
    registry: CollectorRegistry,
    extra_status: Callable[[], dict] | None = None,
    max_body: int = MAX_BODY_BYTES,
    baseline: Baseline | None = None,
) -> list[Route]:
    """Routes of the admin API (the table routes: ``ekko.node.table_routes``; a row write
    wakes parked pulls through the source's port); a row write's body is at most
    ``max_body`` bytes."""

    @guarded
    async def status(request: Request) -> Response:
        doc = core.status()
        if extra_status is not None:
            doc.update(extra_status())
        return JSONResponse(doc)

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
        if core.not_ready is not None:  # still pulling its rows back: a copy would be partial
            raise NotReadyError(f"source {core.name!r} gives no full copy yet: {core.not_ready}")
        return Response(core.export_snapshot(), media_type="application/octet-stream")

    return [
        Route("/v1/status", status),
        *table_routes(core, max_body, baseline),
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
