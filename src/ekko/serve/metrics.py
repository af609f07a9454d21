"""Prometheus export of the inference services, read at scrape time.

``serve_metrics(services)`` returns a function yielding metric families; the node appends it
to ``NodeRunner.extra_metrics`` so ``/metrics`` shows serving beside sync. Nothing on the
predict path touches a Prometheus object: the collector reads ``statistics()`` and the
windowed quality when scraped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ekko.serve.service import InferenceService

_COUNTERS = (
    ("requests", "ekko_predict_requests", "Predict requests served"),
    ("rows_predicted", "ekko_predict_rows", "Events predicted"),
    ("predict_seconds_total", "ekko_predict_seconds", "Seconds spent in predict"),
    ("not_ready", "ekko_predict_not_ready", "Predict requests refused: model not synced yet"),
    (
        "nonfinite",
        "ekko_predict_nonfinite",
        "Predict requests refused (503): the replica holds a NaN or infinite row",
    ),
    ("dense_loads", "ekko_dense_loads", "Dense weight (re)loads from the store"),
    ("feedback_matched", "ekko_feedback_matched", "Labels joined to a prediction"),
    ("feedback_unknown", "ekko_feedback_unknown", "Labels for unknown or evicted ids"),
    ("evicted", "ekko_predictions_evicted", "Predictions evicted before their label"),
)
_QUALITY = ("auc", "log_loss", "calibration", "ctr", "count")


def model_counters(spec: Sequence[tuple[str, str, str]], stats: Sequence) -> Iterator[Metric]:
    """One counter family per ``(attribute, metric name, help)`` of ``spec``, a sample per
    model's statistics record (anything with ``.model`` and those attributes)."""
    for attr, name, doc in spec:
        m = CounterMetricFamily(name, doc, labels=["model"])
        for st in stats:
            m.add_metric([st.model], float(getattr(st, attr)))
        yield m


def serve_metrics(
    services: Mapping[str, InferenceService], clock: Callable[[], float] = time.monotonic
) -> Callable[[], Iterator[Metric]]:
    """A scrape-time collector function over ``services``."""

    def collect() -> Iterator[Metric]:
        stats = [svc.statistics() for svc in services.values()]
        yield from model_counters(_COUNTERS, stats)
        pending = GaugeMetricFamily(
            "ekko_predictions_pending", "Awaiting a label", labels=["model"]
        )
        for st in stats:
            pending.add_metric([st.model], float(st.pending))
        yield pending
        now = clock()
        families = {
            q: GaugeMetricFamily(
                f"ekko_quality_{q}",
                f"Online {q} from feedback",
                labels=["model", "variant", "window"],
            )
            for q in _QUALITY
        }
        for svc in services.values():
            for variant in svc.variants:
                quality = svc.quality(variant)
                for window, snap in (
                    ("window", quality.compute(now)),
                    ("lifetime", quality.lifetime(now)),
                ):
                    for q, fam in families.items():
                        value = float(getattr(snap, q))
                        if math.isfinite(value):
                            fam.add_metric([svc.name, variant, window], value)
        yield from families.values()

    return collect
