"""HTTP routes and Prometheus export of the source's online trainers.

Routes::

    POST /v1/models/{model}/train   {"dense": [[..]], "sparse": [[..]], "labels": [0|1, ..]}
                                    -> 202 {"queued": n}; 503 + Retry-After when the queue is full
    GET  /v1/models/{model}/train   counters, publisher share, the trainer's own online quality,
                                    ``failed`` (why the trainer died) and ``rejected_steps``
    POST /v1/models/{model}/train/quality/reset   start the trainer's quality afresh
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ekko.net.httpkit import offload
from ekko.serve.errors import ModelNotReady
from ekko.serve.metrics import model_counters
from ekko.serve.routes import by_model, guarded, json_response, read_body
from ekko.serve.schema import MAX_BATCH, decode_train
from ekko.train.service import TrainerBusy, TrainingService
from ekko.train.streams import Events


def train_routes(
    trainers: Mapping[str, TrainingService],
    pending: Callable[[str], str | None] = lambda model: None,
) -> list[Route]:
    """Routes for every trainer by model name. ``pending(model)`` says why a model's trainer
    is not running yet (the source recovers), answered 503 rather than 404."""

    def trainer(request: Request) -> TrainingService:
        why = pending(request.path_params["model"])
        if why is not None:
            raise ModelNotReady(f"model {request.path_params['model']}: trainer not started: {why}")
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
        Route("/v1/models/{model}/train", submit, methods=["POST"]),
        Route("/v1/models/{model}/train", report, methods=["GET"]),
    ]


_COUNTERS = (
    ("batches", "ekko_train_batches", "Batches trained"),
    ("events", "ekko_train_events", "Events trained"),
    ("refused", "ekko_train_refused", "Batches refused: training queue full"),
    ("train_seconds", "ekko_train_seconds", "Seconds in training steps (publish included)"),
    ("publish_seconds", "ekko_train_publish_seconds", "Seconds publishing rows"),
    ("rows_published", "ekko_train_rows_published", "Embedding rows written to the store"),
)


def train_metrics(
    trainers: Mapping[str, TrainingService],
) -> Callable[[], Iterator[Metric]]:
    """A scrape-time collector over the trainers."""

    def collect() -> Iterator[Metric]:
        stats = [t.statistics() for t in trainers.values()]
        yield from model_counters(_COUNTERS, stats)
        queued = GaugeMetricFamily("ekko_train_queued", "Batches waiting", labels=["model"])
        auc = GaugeMetricFamily(
            "ekko_train_auc", "Trainer's AUC on pre-update predictions", labels=["model"]
        )
        for st, svc in zip(stats, trainers.values(), strict=True):
            queued.add_metric([st.model], float(st.queued))
            value = svc.report()["window"]["auc"]
            if value is not None:
                auc.add_metric([st.model], float(value))
        rejected = CounterMetricFamily(
            "ekko_train_steps_rejected",
            "Training steps undone because they would make the model non-finite",
            labels=["model", "reason"],
        )
        failed = GaugeMetricFamily(
            "ekko_train_failed", "1 when the trainer's worker thread has died", labels=["model"]
        )
        for st in stats:
            for reason, n in st.rejected_steps.items():
                rejected.add_metric([st.model, reason], float(n))
            failed.add_metric([st.model], float(st.failed is not None))
        yield queued
        yield auc
        yield rejected
        yield failed

    return collect
