"""Inference HTTP API over a local replica, and feedback for online metrics (DESIGN.md §1, §6).

Public names: ``InferenceService`` (predict / feedback / metrics of one model over a store),
``build_services`` (one per configured model), ``serve_routes`` (the starlette routes a
``serve = true`` node mounts) and ``oip_routes`` (the same service over the Open Inference
Protocol, KServe v2), results, stats and errors. (The publisher's rows enter a
source through ``ekko.schedule.WritePort``.)
"""

from ekko.serve.errors import ModelNotReady, NonFiniteRows, ServeError, UnknownModel, UnknownVariant
from ekko.serve.oip_routes import oip_routes
from ekko.serve.replica import ReplicaModel, dense_shapes
from ekko.serve.routes import serve_routes
from ekko.serve.schema import MAX_BATCH, RequestError, decode_feedback, decode_predict
from ekko.serve.service import (
    BASELINE,
    ONLINE,
    BadInput,
    FeedbackResult,
    InferenceService,
    PredictResult,
    ServedModel,
    ServeStats,
    build_services,
)
from ekko.train.schema import decode_train

__all__ = [
    "BASELINE",
    "MAX_BATCH",
    "ONLINE",
    "BadInput",
    "FeedbackResult",
    "InferenceService",
    "ModelNotReady",
    "NonFiniteRows",
    "PredictResult",
    "ReplicaModel",
    "RequestError",
    "ServeError",
    "ServeStats",
    "ServedModel",
    "UnknownModel",
    "UnknownVariant",
    "build_services",
    "decode_feedback",
    "decode_predict",
    "decode_train",
    "dense_shapes",
    "oip_routes",
    "serve_routes",
]
