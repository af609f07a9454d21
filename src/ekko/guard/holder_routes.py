"""HTTP routes of the guard at a non-source node of a partitioned cluster (a holder, a
serving node, or both), messages from the coordinator::

    GET  /v1/models/{model}/health                  the holder's and the serving guard's state
    POST /v1/models/{model}/guard/redirect          (3) freeze the baseline; serving: redirect
    POST /v1/models/{model}/guard/rolled_back       (5) {"healthy_wall", "watermark", "epoch",
                                                    "automatic", "partitions"}
    POST /v1/models/{model}/guard/holders_restored  (7) {"epoch", "at"}: traffic back online
    POST /v1/models/{model}/guard/healthy           (8) {"epoch"}: release the baseline

A message about an older incident is answered 200 with ``"stale": true`` (it was delivered;
retrying it would change nothing) and left in the node's log.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ekko.guard.holder_guard import HolderGuard, WatermarkError
from ekko.guard.routes import RedirectBody, _body, _post
from ekko.guard.scatter_guard import ScatterReplicaGuard
from ekko.net.httpkit import Count, Finite, RequestError, UnknownModel, by_model, json_response
from ekko.serve.routes import guarded


class PartitionedRolledBackBody(msgspec.Struct):
    """The coordinator's rollback over every partition: the healthy point, the elementwise
    max of every source's knowledge after its restore, the incident's epoch, and which
    source restored each partition."""

    healthy_wall: Finite
    watermark: dict[str, list[list[Count]]]
    epoch: Count | None = None
    automatic: bool = False
    partitions: dict[str, str] = msgspec.field(default_factory=dict)


class HoldersRestoredBody(msgspec.Struct):
    """Every holder reported incident ``epoch``'s rollback (the coordinator's message 7)."""

    epoch: Count
    at: Finite | None = None


class HealthyBody(msgspec.Struct):
    """The coordinator is healthy again after incident ``epoch`` (message 8)."""

    epoch: Count


def holder_guard_routes(
    replicas: Mapping[str, ScatterReplicaGuard], holders: Mapping[str, HolderGuard]
) -> list[Route]:
    """The routes of a non-source node of a partitioned cluster with the guard on: its
    models' ``HolderGuard`` (when it holds partitions) and ``ScatterReplicaGuard`` (when it
    serves), each message handed to whichever of the two it concerns."""
    known = sorted(set(replicas) | set(holders))

    def model_of(request: Request) -> str:
        name = request.path_params["model"]
        if name not in known:
            raise UnknownModel(name, known)
        return name

    @guarded
    async def health(request: Request) -> Response:
        m = model_of(request)
        h, r = holders.get(m), replicas.get(m)
        doc: dict[str, Any] = r.status() if r is not None else {"model": m}
        if h is not None:
            doc["holder"] = h.status()
        return json_response(doc)

    @guarded
    async def redirect(request: Request) -> Response:
        m = model_of(request)
        body, _ = await _body(request, RedirectBody)
        h, r = holders.get(m), replicas.get(m)
        fresh = h.redirect(body.why, body.epoch) if h is not None else True
        if r is not None:
            r.redirect(body.why, body.epoch, automatic=body.automatic)
        return json_response({"model": m, "redirected": True, "stale": not fresh})

    @guarded
    async def rolled_back(request: Request) -> Response:
        m = model_of(request)
        body, _ = await _body(request, PartitionedRolledBackBody)
        h, r = holders.get(m), replicas.get(m)
        fresh = True
        if h is not None:  # first: a watermark of the wrong shape moves nothing anywhere
            epoch = body.epoch if body.epoch is not None else h.epoch
            try:
                fresh = h.rolled_back(epoch, body.healthy_wall, body.watermark)
            except WatermarkError as exc:
                raise RequestError(str(exc)) from exc
        if r is not None:
            wm = body.watermark
            fresh = r.rolled_back(body.healthy_wall, wm, automatic=body.automatic,
                                  epoch=body.epoch) and fresh  # fmt: skip
        return json_response({"model": m, "restore_pending": True, "stale": not fresh})

    @guarded
    async def holders_restored(request: Request) -> Response:
        r = by_model(replicas, request)
        body, _ = await _body(request, HoldersRestoredBody)
        fresh = r.holders_restored(body.epoch, body.at)
        return json_response({"model": r.model, "redirected": r.router.redirected,
                              "stale": not fresh})  # fmt: skip

    @guarded
    async def healthy(request: Request) -> Response:
        h = by_model(holders, request)
        body, _ = await _body(request, HealthyBody)
        fresh = h.healthy(body.epoch)
        return json_response({"model": h.model, "frozen": h.lagged.frozen, "stale": not fresh})

    prefix = "/v1/models/{model}/guard"
    return [
        Route("/v1/models/{model}/health", health, methods=["GET"]),
        _post(f"{prefix}/redirect", redirect, RedirectBody),
        _post(f"{prefix}/rolled_back", rolled_back, PartitionedRolledBackBody),
        _post(f"{prefix}/holders_restored", holders_restored, HoldersRestoredBody),
        _post(f"{prefix}/healthy", healthy, HealthyBody),
    ]
