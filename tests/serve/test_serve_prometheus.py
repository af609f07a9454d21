"""serve_metrics: the scrape-time collector exports service stats and quality per variant."""

from __future__ import annotations

import numpy as np
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry
from serve_fixtures import random_events, service, train

from ekko.node.model_metrics import serve_metrics


class _Adapter:
    """What ``NodeCollector`` does with ``extra``: yield from each function."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def collect(self):
        yield from self.fn()


def test_scrape_shows_counters_and_quality() -> None:
    svc = service(train(steps=1).store)
    r = svc.predict(*random_events(4), now=0.0)
    svc.feedback(r.ids, np.array([0, 1, 0, 1]), now=1.0)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Adapter(serve_metrics({"ctr": svc}, clock=lambda: 1.0)))
    text = generate_latest(registry).decode()
    assert 'ekko_predict_requests_total{model="ctr"} 1.0' in text
    assert 'ekko_predict_rows_total{model="ctr"} 4.0' in text
    assert 'ekko_feedback_matched_total{model="ctr"} 4.0' in text
    assert 'ekko_quality_count{model="ctr",variant="online",window="window"} 4.0' in text
    assert 'ekko_quality_auc{model="ctr",variant="online",window="lifetime"}' in text
