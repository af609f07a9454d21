"""``ekko bench scale``'s summary has exactly the issue's keys, and its capacity arithmetic
sets a budget a 1-partition node cannot meet and each of 4 partitions can (issue 17)."""

from __future__ import annotations

import dataclasses

import pytest

from ekko.bench.scale import _summary
from ekko.bench.scale_load import QUICK, model_bytes
from ekko.store.holding import row_bytes

KEYS = {"partitions", "refused_on_one", "per_dc", "predict_p99_ms", "train_events_per_s",
        "auc_by_ranks", "failover_converged"}  # fmt: skip


def _dc(name: str, delay: float, p99: float) -> dict:
    return {"dc": name, "one_way_delay_ms": delay, "p99_ms": p99}


def test_summary_has_exactly_the_issue_keys_and_medians_over_blocks() -> None:
    cap = {"one_partition": {"refused": True}, "four_partitions": {"runs": True},
           "model_mb": 76.3, "budget_mb": 21.0}  # fmt: skip
    runs = ((99e3, 40.0, 70.0), (98e3, 60.0, 90.0), (97e3, 45.0, 72.0))
    blocks = [{"rate_rows_per_s": r, "per_dc": [_dc("dc1", 25.0, a), _dc("dc2", 50.0, b)]}
              for r, a, b in runs]  # fmt: skip
    part = {"latency_blocks": blocks, "failover": {"converged": True}}
    serve = {"predict_p99_ms": {"1": 8.0, "4": 12.0}, "bar_p99_ratio_le_1_3": False,
             "predict_p99_ms_local": 5.0, "p99_ratio_4_to_1": 1.5}  # fmt: skip
    train = {"events_per_s": {"1": 1000.4, "2": 1500.6}, "auc": {"1": 0.70004, "2": 0.70012}}
    summary, context = _summary(QUICK, cap, part, serve, train)
    assert set(summary) == KEYS
    assert summary["per_dc"] == [_dc("dc1", 25.0, 45.0), _dc("dc2", 50.0, 72.0)]
    assert summary["train_events_per_s"] == {"1": 1000, "2": 1501}
    assert summary["auc_by_ranks"] == {"1": 0.7, "2": 0.7001}
    assert context["update_rate_rows_per_s"] == 98e3
    assert context["bar_p99_le_delay_plus_25ms"] is True  # 45 <= 50, 72 <= 75


@pytest.mark.parametrize("partitions", [2, 4])
def test_each_partition_takes_its_share_of_the_model(partitions: int) -> None:
    spec = dataclasses.replace(QUICK, partitions=partitions, key_space=100_000, shards=16)
    total, shares = model_bytes(spec)
    assert total == 100_000 * row_bytes(spec.dim)
    assert len(shares) == partitions and max(shares) == min(shares)
    budget = max(shares) * spec.margin
    assert budget < total  # one node holding all of it is refused
    assert sum(shares) >= total  # the shares cover the model (shards rounded up)
