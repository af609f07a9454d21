"""What an inference service answers and reports: results, statistics, its model's shape.

Why apart from ``ekko.serve.service``: the node's config (``ModelConfig.served``), the routes
and the exporter read these records without the service's machinery.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from ekko.serve.errors import ServeError
from ekko.train.dlrm import DLRMConfig


class BadInput(ServeError, ValueError):
    """Arrays of the wrong shape or values for this model; nothing was predicted or recorded."""


@dataclass(frozen=True)
class ServedModel:
    """What serving needs of a configured model: its name, its network's shape, the share
    of traffic the guard's baseline gets, and what ``GET /v1/models`` lists about it.

    Why not the node's ``ModelConfig``: serve sits below the node; the node validates the
    config and hands this over (``ModelConfig.served()``)."""

    name: str
    dlrm: DLRMConfig
    baseline_share: float = 0.005
    listing: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PredictResult:
    """Predictions of one request: ``ids`` int64 [B] (unique, < 2**53, quote them back with
    the label), ``ctr`` float32 [B], and the variant that served them."""

    ids: np.ndarray
    ctr: np.ndarray
    variant: str


@dataclass(frozen=True)
class FeedbackResult:
    """Labels joined to a prediction (``matched``) and labels whose id is not pending here
    (``unknown``: never issued, evicted, already labelled, or repeated in the batch)."""

    matched: int
    unknown: int


@dataclass(frozen=True)
class ServeStats:
    """Counters of one served model at monotonic time ``at``.

    Why a frozen dataclass: the Prometheus exporter (``ekko.node``) and the status
    page read a consistent set, never the service's internals.
    """

    model: str
    requests: int
    rows_predicted: int
    predict_seconds_total: float
    not_ready: int
    nonfinite: int
    dense_loads: int
    feedback_requests: int
    feedback_matched: int
    feedback_unknown: int
    pending: int
    evicted: int
    predictions_by_variant: MappingProxyType[str, int]
    at: float
