"""HTTP routes of the guard.

On a serving replica::

    GET  /v1/models/{model}/health              state, detector score, redirect, baseline lag
    POST /v1/models/{model}/guard/redirect      (from the source) all traffic to the baseline
    POST /v1/models/{model}/guard/rolled_back   (from the source) {"healthy_wall", "watermark"}

At the source::

    GET  /v1/models/{model}/health              state, every replica's state, incidents
    POST /v1/models/{model}/rollback            operator: {"to": unix seconds?, "why": str?}
    POST /v1/models/{model}/guard/report        (from replicas) periodic state
    POST /v1/models/{model}/guard/restored      (from replicas) the rollback is applied here
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ekko.guard.errors import PreimageError
from ekko.guard.replica_guard import ReplicaGuard
from ekko.guard.source_guard import SourceGuard
from ekko.net.httpkit import (
    CONTROL_BODY_BYTES,
    BodyRoute,
    RequestError,
    by_model,
    json_response,
    parse_json,
    read_body,
)
from ekko.serve.routes import guarded


def _post(path: str, endpoint: Callable[[Request], Awaitable[Response]]) -> Route:
    return BodyRoute(path, endpoint, max_body=CONTROL_BODY_BYTES)


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await read_body(request)
    if not raw:
        return {}
    doc = parse_json(raw)
    if not isinstance(doc, dict):
        raise RequestError("body: expected a JSON object")
    return doc


def _number(doc: dict[str, Any], field: str, required: bool = False) -> float | None:
    value = doc.get(field)
    if value is None:
        if required:
            raise RequestError(f"{field}: missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{field}: expected a number (unix seconds), got {value!r}")
    return float(value)


def _flag(doc: dict[str, Any], field: str, default: bool) -> bool:
    value = doc.get(field, default)
    if not isinstance(value, bool):
        raise RequestError(f"{field}: expected true or false, got {value!r}")
    return value


def _health(guards: Mapping[str, ReplicaGuard | SourceGuard]) -> Route:
    @guarded
    async def health(request: Request) -> Response:
        return json_response(by_model(guards, request).status())

    return Route("/v1/models/{model}/health", health, methods=["GET"])


def replica_guard_routes(guards: Mapping[str, ReplicaGuard]) -> list[Route]:
    @guarded
    async def redirect(request: Request) -> Response:
        g = by_model(guards, request)
        doc = await _json_object(request)
        epoch = _number(doc, "epoch")
        g.redirect(
            str(doc.get("why", "requested by the source")),
            None if epoch is None else int(epoch),
            automatic=_flag(doc, "automatic", False),
        )
        return json_response({"model": g.model, "redirected": True})

    @guarded
    async def rolled_back(request: Request) -> Response:
        g = by_model(guards, request)
        doc = await _json_object(request)
        wall = _number(doc, "healthy_wall", required=True)
        mark = doc.get("watermark")
        if not isinstance(mark, dict) or not all(
            isinstance(v, list)
            and all(isinstance(s, list) and all(isinstance(x, int) for x in s) for s in v)
            for v in mark.values()
        ):
            raise RequestError("watermark: expected {table: [[version per lane], ...per shard]}")
        g.rolled_back(wall, mark, automatic=_flag(doc, "automatic", False))
        return json_response({"model": g.model, "restore_pending": True})

    return [
        _health(guards),
        _post("/v1/models/{model}/guard/redirect", redirect),
        _post("/v1/models/{model}/guard/rolled_back", rolled_back),
    ]


def source_guard_routes(guards: Mapping[str, SourceGuard]) -> list[Route]:
    @guarded
    async def rollback(request: Request) -> Response:
        g = by_model(guards, request)
        doc = await _json_object(request)
        to = _number(doc, "to")
        why = str(doc.get("why", "operator rollback"))
        try:
            incident = g.rollback(to, why)
        except PreimageError as exc:
            return json_response({"error": str(exc)}, 409)
        return json_response({k: v for k, v in incident.items() if k != "restored"})

    @guarded
    async def report(request: Request) -> Response:
        g = by_model(guards, request)
        try:
            g.report(await _json_object(request))
        except (ValueError, PreimageError) as exc:
            return json_response({"error": str(exc)}, 400)
        return json_response({"ok": True})

    @guarded
    async def restored(request: Request) -> Response:
        g = by_model(guards, request)
        g.restored(await _json_object(request))
        return json_response({"ok": True})

    return [
        _health(guards),
        _post("/v1/models/{model}/rollback", rollback),
        _post("/v1/models/{model}/guard/report", report),
        _post("/v1/models/{model}/guard/restored", restored),
    ]
