"""Prometheus export of the guard, read at scrape time from the guards' own state."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ekko.guard.replica_guard import JUDGING, NO_SAMPLES, WARMING_UP
from ekko.guard.state import State

STATE_CODES = {State.HEALTHY: 0, State.UNCERTAIN: 1, State.CORRUPTED: 2, State.RECOVERING: 3}


def guard_metrics(
    replica_guards: Mapping[str, object], source_guards: Mapping[str, object]
) -> Callable[[], Iterator[Metric]]:
    """``ekko_guard_*`` families for the guards of one node (replica or source)."""

    def collect() -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "ekko_guard_state",
            "Model health: 0 healthy, 1 uncertain, 2 corrupted, 3 recovering",
            labels=["model"],
        )
        transitions = CounterMetricFamily(
            "ekko_guard_transitions", "Health transitions", labels=["model"]
        )
        for name, g in [*replica_guards.items(), *source_guards.items()]:
            state.add_metric([name], STATE_CODES[g.health.state])
            transitions.add_metric([name], len(g.health.history))
        yield state
        yield transitions
        if replica_guards:
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
            for name, g in replica_guards.items():
                score.add_metric([name], g.detector.score)
                redirected.add_metric([name], float(g.router.redirected))
                lag.add_metric([name], g.lagged.rows_queued)
                applied.add_metric([name], g.lagged.rows_applied)
                for j in (NO_SAMPLES, WARMING_UP, JUDGING):
                    judging.add_metric([name, j], float(g.judging == j))
            yield score
            yield redirected
            yield lag
            yield applied
            yield judging
        if source_guards:
            rollbacks = CounterMetricFamily(
                "ekko_guard_rollbacks", "Rollbacks completed", labels=["model"]
            )
            rows = CounterMetricFamily(
                "ekko_guard_rows_restored", "Rows written back", labels=["model"]
            )
            pre = GaugeMetricFamily("ekko_guard_preimage_rows", "Pre-images held", labels=["model"])
            for name, g in source_guards.items():
                rollbacks.add_metric([name], len(g.incidents))
                rows.add_metric([name], g.rows_restored)
                pre.add_metric([name], g.preimages.rows)
            yield rollbacks
            yield rows
            yield pre

    return collect
