"""Prometheus export of the source's trainers, read at scrape time from their statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ekko.serve.metrics import model_counters
from ekko.train.service import TrainingService

_TRAIN_COUNTERS = (
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
        yield from model_counters(_TRAIN_COUNTERS, stats)
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
