"""HTTP routes of the guard.

On a serving replica::

    GET  /v1/models/{model}/health              state, detector score, redirect, baseline lag
    POST /v1/models/{model}/guard/redirect      (from the source) all traffic to the baseline
    POST /v1/models/{model}/guard/rolled_back   (from the source) {"healthy_wall", "watermark"}

At the source::

    GET  /v1/models/{model}/health              state, every replica's state, incidents
    POST /v1/models/{model}/rollback            operator: {"to": unix seconds?, "why": str?}
    POST /v1/models/{model}/guard/report        (from replicas) periodic state
    POST /v1/models/{model}/guard/restored      (from replicas, holders) the rollback is applied

At every other partition source of a partitioned cluster (the coordinator commands them)::

    POST /v1/models/{model}/guard/checkpoint    {"at"}: a healthy restore point
    POST /v1/models/{model}/guard/restore       {"to_wall", "epoch", "why", "quarantine_until"}:
                                                quarantine, restore, answer digests per partition
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ekko.guard.errors import PreimageError
from ekko.guard.replica_guard import ReplicaGuard
from ekko.guard.reports import ReportError
from ekko.guard.restore import SourceRestore
from ekko.guard.source_guard import SourceGuard
from ekko.net.httpkit import (
    CONTROL_BODY_BYTES,
    BodyRoute,
    Count,
    Finite,
    RequestError,
    by_model,
    convert,
    json_response,
    parse_json,
    read_body,
)
from ekko.serve.routes import guarded

B = TypeVar("B", bound=msgspec.Struct)
Wall = Annotated[float, msgspec.Meta(ge=0.0, le=sys.float_info.max)]
"""A unix time: finite and not negative."""


class RedirectBody(msgspec.Struct):
    """The source's redirect (``SourceGuard.rollback`` sends it)."""

    why: str = "requested by the source"
    at: Finite | None = None
    epoch: Count | None = None
    automatic: bool = False


class RolledBackBody(msgspec.Struct):
    """The source wrote the healthy values back: from when, and up to which versions."""

    healthy_wall: Finite
    watermark: dict[str, list[list[Count]]]
    automatic: bool = False


class RollbackBody(msgspec.Struct, forbid_unknown_fields=True):
    """An operator's rollback: to a unix time (default: the last all-healthy point minus the
    margin), and why."""

    to: Finite | None = None
    why: str = "operator rollback"


class ReportBody(msgspec.Struct):
    """A replica's periodic report (``ReplicaGuard.report_body``): the fields the source
    reads are checked (``state``: one of the guard's states, ``guard.reports.check_state``);
    the rest is kept as sent, for its health page."""

    node: str
    state: str | None = None
    reason: str | None = None
    epoch: Count = 0
    at: Finite | None = None


class RestoredBody(msgspec.Struct):
    """A replica has the restored rows (``ReplicaGuard`` sends it with its digests: per table
    a hex16, or on a partitioned cluster a holder's ``{partition: hex16}`` and the epoch;
    anything else is a 400 naming it: ``guard.reports.check_digests``)."""

    node: str
    at: Finite | None = None
    epoch: Count | None = None
    digests: dict[str, Any] = msgspec.field(default_factory=dict)


class CheckpointBody(msgspec.Struct, forbid_unknown_fields=True):
    """The coordinator marked a healthy checkpoint at ``at``: every source marks it too."""

    at: Wall


class RestoreBody(msgspec.Struct, forbid_unknown_fields=True):
    """The coordinator's restore command to a partition source (message 4 of the design)."""

    to_wall: Wall
    epoch: Count
    why: str = "rollback"
    quarantine_until: Wall | None = None


def _post(path: str, endpoint: Callable[[Request], Awaitable[Response]], body: type) -> Route:
    return BodyRoute(path, endpoint, max_body=CONTROL_BODY_BYTES, body=body)


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await read_body(request)
    if not raw:
        return {}
    doc = parse_json(raw)
    if not isinstance(doc, dict):
        raise RequestError("body: expected a JSON object")
    return doc


async def _body(request: Request, typ: type[B]) -> tuple[B, dict[str, Any]]:
    """The JSON object body (an empty body is ``{}``) checked as ``typ``, and as sent."""
    doc = await _json_object(request)
    fields = msgspec.structs.fields(typ)
    shape = ", ".join(f'"{f.encode_name}"' + ("" if f.required else "?") for f in fields)
    return convert(doc, typ, f"{{{shape}}}"), doc


def _health(guards: Mapping[str, ReplicaGuard | SourceGuard]) -> Route:
    @guarded
    async def health(request: Request) -> Response:
        return json_response(by_model(guards, request).status())

    return Route("/v1/models/{model}/health", health, methods=["GET"])


def replica_guard_routes(guards: Mapping[str, ReplicaGuard]) -> list[Route]:
    @guarded
    async def redirect(request: Request) -> Response:
        g = by_model(guards, request)
        body, _ = await _body(request, RedirectBody)
        g.redirect(body.why, body.epoch, automatic=body.automatic)
        return json_response({"model": g.model, "redirected": True})

    @guarded
    async def rolled_back(request: Request) -> Response:
        g = by_model(guards, request)
        body, _ = await _body(request, RolledBackBody)
        g.rolled_back(body.healthy_wall, body.watermark, automatic=body.automatic)
        return json_response({"model": g.model, "restore_pending": True})

    return [
        _health(guards),
        _post("/v1/models/{model}/guard/redirect", redirect, RedirectBody),
        _post("/v1/models/{model}/guard/rolled_back", rolled_back, RolledBackBody),
    ]


def source_guard_routes(guards: Mapping[str, SourceGuard]) -> list[Route]:
    @guarded
    async def rollback(request: Request) -> Response:
        g = by_model(guards, request)
        body, _ = await _body(request, RollbackBody)
        try:
            incident = g.rollback(body.to, body.why)
        except PreimageError as exc:
            return json_response({"error": str(exc)}, 409)
        return json_response({k: v for k, v in incident.items() if k != "restored"})

    @guarded
    async def report(request: Request) -> Response:
        g = by_model(guards, request)
        body, doc = await _body(request, ReportBody)
        try:
            g.report({**doc, **msgspec.structs.asdict(body)})
        except (ValueError, PreimageError) as exc:
            return json_response({"error": str(exc)}, 400)
        return json_response({"ok": True})

    @guarded
    async def restored(request: Request) -> Response:
        g = by_model(guards, request)
        body, _ = await _body(request, RestoredBody)
        try:
            g.restored(msgspec.structs.asdict(body))
        except ReportError as exc:  # a holder's report that cannot be compared, a bad digest
            return json_response({"error": str(exc)}, 400)
        return json_response({"ok": True})

    return [
        _health(guards),
        _post("/v1/models/{model}/rollback", rollback, RollbackBody),
        _post("/v1/models/{model}/guard/report", report, ReportBody),
        _post("/v1/models/{model}/guard/restored", restored, RestoredBody),
    ]


def partition_source_routes(restorers: Mapping[str, SourceRestore]) -> list[Route]:
    """A partition source's guard routes (not the coordinator's: it runs ``SourceGuard``)."""

    @guarded
    async def checkpoint(request: Request) -> Response:
        r = by_model(restorers, request)
        body, _ = await _body(request, CheckpointBody)
        try:
            marked = r.checkpoint(body.at)
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400)
        return json_response({"model": r.model, "marked": marked})

    @guarded
    async def restore(request: Request) -> Response:
        r = by_model(restorers, request)
        body, _ = await _body(request, RestoreBody)
        try:
            done = r.restore(body.to_wall, body.epoch, body.why, body.quarantine_until)
        except PreimageError as exc:
            return json_response({"error": str(exc)}, 409)
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400)
        return json_response(done.answer)

    @guarded
    async def health(request: Request) -> Response:
        r = by_model(restorers, request)
        return json_response(r.status())

    return [
        Route("/v1/models/{model}/health", health, methods=["GET"]),
        _post("/v1/models/{model}/guard/checkpoint", checkpoint, CheckpointBody),
        _post("/v1/models/{model}/guard/restore", restore, RestoreBody),
    ]
