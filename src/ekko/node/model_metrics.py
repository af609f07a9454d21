"""Prometheus export of the models a node hosts, read at scrape time from their records.

Inference services (``ServeStats`` and the windowed quality per variant), trainers
(``TrainingStats``) and guards (``ekko.guard.stats``): nothing on the predict, train or
guard path touches a Prometheus object. ``ModelHost.collectors`` hands these to the node's
registry beside ``ekko.node.metrics``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ekko.guard.replica_guard import JUDGING, NO_SAMPLES, WARMING_UP, ReplicaGuard
from ekko.guard.source_guard import SourceGuard
from ekko.guard.state import State
from ekko.guard.stats import replica_statistics, source_statistics
from ekko.serve.service import InferenceService
from ekko.train.service import TrainingService

STATE_CODES = {State.HEALTHY: 0, State.UNCERTAIN: 1, State.CORRUPTED: 2, State.RECOVERING: 3}


_SERVE_COUNTERS = (
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
        yield from model_counters(_SERVE_COUNTERS, stats)
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
        yield from _dynamic_table_metrics(stats)

    return collect


_DYNAMIC_COUNTERS = (
    ("admitted", "ekko_train_embedding_admitted", "Ids given a row of a dynamic table"),
    ("rejected", "ekko_train_embedding_rejected", "Ids a step read from the default row"),
    ("evicted", "ekko_train_embedding_evicted", "Rows evicted (LRU / LFU / TTL), deleted"),
)


def _dynamic_table_metrics(stats: Sequence) -> Iterator[Metric]:
    """Admission and eviction of the trainers' dynamic tables, by model and table (evictions
    also by reason), and each model's memory budget at the node."""
    labels = ["model", "table"]
    rows = GaugeMetricFamily("ekko_train_embedding_rows", "Rows holding an id", labels=labels)
    budget = GaugeMetricFamily(
        "ekko_train_embedding_row_budget", "Rows a dynamic table may hold", labels=labels
    )
    counters = {
        attr: CounterMetricFamily(name, doc, labels=labels) for attr, name, doc in _DYNAMIC_COUNTERS
    }
    by_reason = CounterMetricFamily(
        "ekko_train_embedding_evicted_by_reason",
        "Rows evicted, deleted: row_budget (the table's), node_memory (the model's memory "
        "budget at the node), ttl",
        labels=[*labels, "reason"],
    )
    memory = GaugeMetricFamily(
        "ekko_train_embedding_memory_bytes",
        "Bytes the rows of a model's dynamic tables take as the store counts them, and the "
        "model's memory budget",
        labels=["model", "kind"],
    )
    for st in stats:
        for table, t in st.dynamic_tables.items():
            rows.add_metric([st.model, table], float(t.rows))
            budget.add_metric([st.model, table], float(t.row_budget))
            for attr, fam in counters.items():
                fam.add_metric([st.model, table], float(getattr(t, attr)))
            for reason, n in t.evicted_by.items():
                by_reason.add_metric([st.model, table, reason], float(n))
        if st.memory_budget is not None:
            memory.add_metric([st.model, "used"], float(st.memory_budget.used_bytes))
            memory.add_metric([st.model, "budget"], float(st.memory_budget.max_bytes))
    yield rows
    yield budget
    yield from counters.values()
    yield by_reason
    yield memory


def guard_metrics(
    replica_guards: Mapping[str, ReplicaGuard], source_guards: Mapping[str, SourceGuard]
) -> Callable[[], Iterator[Metric]]:
    """``ekko_guard_*`` families for the guards of one node (replica or source)."""

    def collect() -> Iterator[Metric]:
        replicas = [replica_statistics(n, g) for n, g in replica_guards.items()]
        sources = [source_statistics(n, g) for n, g in source_guards.items()]
        state = GaugeMetricFamily(
            "ekko_guard_state",
            "Model health: 0 healthy, 1 uncertain, 2 corrupted, 3 recovering",
            labels=["model"],
        )
        transitions = CounterMetricFamily(
            "ekko_guard_transitions", "Health transitions", labels=["model"]
        )
        for st in [*replicas, *sources]:
            state.add_metric([st.model], STATE_CODES[st.state])
            transitions.add_metric([st.model], st.transitions)
        yield state
        yield transitions
        if replicas:
            score = GaugeMetricFamily("ekko_guard_score", "Detector CUSUM score", labels=["model"])
            redirected = GaugeMetricFamily(
                "ekko_guard_redirected", "1 while all traffic is on the baseline", labels=["model"]
            )
            lag = GaugeMetricFamily(
                "ekko_baseline_queued_rows", "Rows waiting to reach the baseline", labels=["model"]
            )
            applied = CounterMetricFamily(
                "ekko_baseline_applied_rows", "Rows applied to the baseline", labels=["model"]
            )
            judging = GaugeMetricFamily(
                "ekko_guard_judging",
                "1 for what the guard can do now: no_samples (cannot judge), warming_up (only "
                "the absolute floor judges) or judging",
                labels=["model", "judging"],
            )
            for st in replicas:
                score.add_metric([st.model], st.score)
                redirected.add_metric([st.model], float(st.redirected))
                lag.add_metric([st.model], st.baseline_queued_rows)
                applied.add_metric([st.model], st.baseline_applied_rows)
                for j in (NO_SAMPLES, WARMING_UP, JUDGING):
                    judging.add_metric([st.model, j], float(st.judging == j))
            yield score
            yield redirected
            yield lag
            yield applied
            yield judging
        if sources:
            rollbacks = CounterMetricFamily(
                "ekko_guard_rollbacks", "Rollbacks completed", labels=["model"]
            )
            rows = CounterMetricFamily(
                "ekko_guard_rows_restored", "Rows written back", labels=["model"]
            )
            pre = GaugeMetricFamily("ekko_guard_preimage_rows", "Pre-images held", labels=["model"])
            for st in sources:
                rollbacks.add_metric([st.model], st.rollbacks)
                rows.add_metric([st.model], st.rows_restored)
                pre.add_metric([st.model], st.preimage_rows)
            yield rollbacks
            yield rows
            yield pre

    return collect
