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
from collections.abc import Callable, Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ekko.net.httpkit import (
    MAX_BODY_BYTES,
    BodyRoute,
    by_model,
    guarded_by,
    json_response,
    offload,
    read_body,
)
from ekko.serve.errors import ModelNotReady, UnknownVariant
from ekko.serve.schema import MAX_BATCH, EventsBody, FeedbackBody, decode_feedback, decode_predict
from ekko.serve.service import BadInput, InferenceService

guarded = guarded_by({UnknownVariant: 404, ModelNotReady: 503, BadInput: 400})
"""Serving errors as statuses: unknown variant 404, not synced yet 503, bad input 400 (an
unknown model is the toolkit's ``UnknownModel``, 404)."""


def serve_routes(
    services: Mapping[str, InferenceService],
    *,
    max_batch: int = MAX_BATCH,
    max_body: int = MAX_BODY_BYTES,
    clock: Callable[[], float] = time.monotonic,
) -> list[Route]:
    """Routes for every service by model name; predict and feedback take bodies up to
    ``max_body`` bytes; ``clock`` is the monotonic ``now`` passed to the services (the
    windowed metrics' time)."""

    def service(request: Request) -> InferenceService:
        return by_model(services, request)

    @guarded
    async def models(request: Request) -> Response:
        return json_response(
            {
                "models": [
                    {"name": name, "variants": svc.variants, **svc.model.listing}
                    for name, svc in services.items()
                ]
            }
        )

    @guarded
    async def predict(request: Request) -> Response:
        svc = service(request)
        cfg = svc.config
        dense, sparse = await offload(
            decode_predict,
            await read_body(request),
            cfg.num_dense,
            cfg.num_sparse,
            max_batch,
            dense_limit=cfg.dense_limit,
        )
        result = await svc.apredict(dense, sparse, clock())
        preds = [
            {"id": i, "ctr": c}
            for i, c in zip(result.ids.tolist(), result.ctr.tolist(), strict=True)
        ]
        return json_response({"model": svc.name, "variant": result.variant, "predictions": preds})

    @guarded
    async def feedback(request: Request) -> Response:
        svc = service(request)
        ids, labels = await offload(decode_feedback, await read_body(request), max_batch)
        result = svc.feedback(ids, labels, clock())
        return json_response(
            {"model": svc.name, "matched": result.matched, "unknown": result.unknown}
        )

    @guarded
    async def metrics(request: Request) -> Response:
        return json_response(service(request).metrics(clock()))

    return [
        Route("/v1/models", models, methods=["GET"]),
        BodyRoute("/v1/models/{model}/predict", predict, max_body=max_body, body=EventsBody),
        BodyRoute("/v1/models/{model}/feedback", feedback, max_body=max_body, body=FeedbackBody),
        Route("/v1/models/{model}/metrics", metrics, methods=["GET"]),
    ]
