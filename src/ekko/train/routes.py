"""HTTP routes of the source's online trainers (exported to Prometheus by ``ekko.node``).

Routes::

    POST /v1/models/{model}/train   {"dense": [[..]], "sparse": [[..]], "labels": [0|1, ..]}
                                    -> 202 {"queued": n}; 503 + Retry-After when the queue is full
    GET  /v1/models/{model}/train   counters, publisher share, the trainer's own online quality,
                                    ``failed`` (why the trainer died) and ``rejected_steps``
    POST /v1/models/{model}/train/quality/reset   start the trainer's quality afresh
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ekko.net.httpkit import (
    MAX_BODY_BYTES,
    BodyRoute,
    RequestError,
    by_model,
    guarded_by,
    json_response,
    offload,
    read_body,
)
from ekko.train.schema import MAX_BATCH, EventsBody, decode_train
from ekko.train.service import TrainerBusy, TrainingService
from ekko.train.streams import Events

guarded = guarded_by({})
"""Request errors (their own status: unknown model 404, not started 503, bad body 4xx)."""


def train_routes(
    trainers: Mapping[str, TrainingService],
    pending: Callable[[str], tuple[str, int] | None] = lambda model: None,
    max_body: int = MAX_BODY_BYTES,
) -> list[Route]:
    """Routes for every trainer by model name; a batch is at most ``max_body`` bytes.
    ``pending(model)`` says why a model's trainer is not running and with which status
    (503 while the source recovers, 409 where it never will), rather than 404."""

    def trainer(request: Request) -> TrainingService:
        model = request.path_params["model"]
        refusal = pending(model)
        if refusal is not None:
            why, status = refusal
            raise RequestError(f"model {model}: trainer not started: {why}", status)
        return by_model(trainers, request)

    @guarded
    async def submit(request: Request) -> Response:
        svc = trainer(request)
        cfg = svc.config
        dense, sparse, labels = await offload(
            decode_train,
            await read_body(request),
            cfg.num_dense,
            cfg.num_sparse,
            MAX_BATCH,
            dense_limit=cfg.dense_limit,
        )
        events = Events(dense, sparse, labels, np.zeros(len(labels), dtype=np.float64))
        try:
            queued = svc.submit(events)
        except TrainerBusy as exc:
            return json_response({"error": str(exc)}, 503, {"retry-after": "1"})
        except RuntimeError as exc:  # the trainer died (GET .../train says why) or stopped
            return json_response({"error": str(exc)}, 503)
        return json_response(
            {"model": svc.name, "queued": queued, "quarantined": svc.paused is not None}, 202
        )

    @guarded
    async def report(request: Request) -> Response:
        return json_response(trainer(request).report())

    @guarded
    async def reset_quality(request: Request) -> Response:
        svc = trainer(request)
        svc.reset_quality()
        return json_response({"model": svc.name, "quality": "reset"})

    return [
        Route("/v1/models/{model}/train/quality/reset", reset_quality, methods=["POST"]),
        BodyRoute("/v1/models/{model}/train", submit, max_body=max_body, body=EventsBody),
        Route("/v1/models/{model}/train", report, methods=["GET"]),
    ]
