"""HTTP routes of the inference API, mounted by a ``serve = true`` node beside its admin API.

Handlers are thin: decode and validate the body (``ekko.serve.schema``; a bad request is a
4xx naming the field), call the ``InferenceService``, render JSON. A replica that has not
synced a model's dense tables answers 503 with the reason until it has.

The forward pass runs on the event loop, not in a worker thread. The store's ``Table`` allows
no lookup concurrent with an apply, and the node applies pulled rows on the loop, so a thread
would need a lock around every lookup and apply; and a batch of 64 events costs about a
millisecond (``ekko bench serve`` measures it), shorter than the handoff would save.

Routes::

    GET  /v1/models                      served models and their variants
    POST /v1/models/{model}/predict      {"events": [{"dense": [..], "sparse": [..]}, ..]}
    POST /v1/models/{model}/feedback     {"labels": [{"id": .., "label": 0|1}, ..]}
    GET  /v1/models/{model}/metrics      windowed + lifetime quality per variant
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ekko.serve.errors import ModelNotReady, UnknownModel, UnknownVariant
from ekko.serve.schema import (
    MAX_BATCH,
    MAX_BODY_BYTES,
    RequestError,
    decode_feedback,
    decode_predict,
)
from ekko.serve.service import BadInput, InferenceService

Handler = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")
_ENCODER = msgspec.json.Encoder()


def json_response(
    doc: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        _ENCODER.encode(doc), status_code=status, headers=headers, media_type="application/json"
    )


def _error(message: str, status: int, headers: Mapping[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def guarded(fn: Handler) -> Handler:
    """Map request and serving errors to a status with the reason; the server keeps serving."""

    async def wrapper(request: Request) -> Response:
        try:
            return await fn(request)
        except RequestError as exc:
            return _error(str(exc), exc.status)
        except (UnknownModel, UnknownVariant) as exc:
            return _error(str(exc), 404)
        except ModelNotReady as exc:
            return _error(str(exc), 503, {"retry-after": "1"})
        except BadInput as exc:
            return _error(str(exc), 400)

    return wrapper


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused with 413 (before reading, if the length is declared) when
    over ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"body: {declared} bytes; the limit is {limit}", status=413)
    body = await request.body()
    if len(body) > limit:
        raise RequestError(f"body: {len(body)} bytes; the limit is {limit}", status=413)
    return body


def by_model(objects: Mapping[str, T], request: Request) -> T:
    """The object for the request's ``{model}`` path parameter; 404 (``UnknownModel``) if none."""
    name = request.path_params["model"]
    obj = objects.get(name)
    if obj is None:
        raise UnknownModel(name, sorted(objects))
    return obj


def serve_routes(
    services: Mapping[str, InferenceService],
    *,
    max_batch: int = MAX_BATCH,
    clock: Callable[[], float] = time.monotonic,
) -> list[Route]:
    """Routes for every service by model name; ``clock`` is the monotonic ``now`` passed to
    the services (the windowed metrics' time)."""

    def service(request: Request) -> InferenceService:
        return by_model(services, request)

    @guarded
    async def models(request: Request) -> Response:
        return json_response(
            {
                "models": [
                    {"name": name, "variants": svc.variants, **svc.model.model_dump()}
                    for name, svc in services.items()
                ]
            }
        )

    @guarded
    async def predict(request: Request) -> Response:
        svc = service(request)
        cfg = svc.config
        dense, sparse = decode_predict(
            await read_body(request),
            cfg.num_dense,
            cfg.num_sparse,
            max_batch,
            dense_limit=cfg.dense_limit,
        )
        result = svc.predict(dense, sparse, clock())
        preds = [
            {"id": i, "ctr": c}
            for i, c in zip(result.ids.tolist(), result.ctr.tolist(), strict=True)
        ]
        return json_response({"model": svc.name, "variant": result.variant, "predictions": preds})

    @guarded
    async def feedback(request: Request) -> Response:
        svc = service(request)
        ids, labels = decode_feedback(await read_body(request), max_batch)
        result = svc.feedback(ids, labels, clock())
        return json_response(
            {"model": svc.name, "matched": result.matched, "unknown": result.unknown}
        )

    @guarded
    async def metrics(request: Request) -> Response:
        return json_response(service(request).metrics(clock()))

    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model}/predict", predict, methods=["POST"]),
        Route("/v1/models/{model}/feedback", feedback, methods=["POST"]),
        Route("/v1/models/{model}/metrics", metrics, methods=["GET"]),
    ]
