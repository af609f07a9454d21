"""Checkpoint-broadcast baseline: every replica ends equal to the source, and the WAN carried
one full fp32 copy of every table per checkpoint per replica (plus framing)."""

from __future__ import annotations

import math

import pytest
import torch

from ekko.bench.baselines import default_topology, run_checkpoint
from ekko.bench.trace import Trace, load_trace, record_trace
from ekko.train.dlrm import DLRMConfig

torch.set_num_threads(1)

TINY = DLRMConfig(
    num_sparse=4, embedding_dim=8, rows_per_table=1000, bottom_mlp=(16, 8), top_mlp=(16, 1)
)


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Trace:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return load_trace(record_trace(30, 256, seed=12, path=path, model_config=TINY))


async def test_single_final_checkpoint_costs_one_table_copy_per_replica(trace: Trace) -> None:
    # Replayed at once with a long interval: only the final checkpoint is taken.
    topology = default_topology((5.0, 10.0, 20.0), mbit=100.0, replicas=3)
    result = await run_checkpoint(trace, topology, interval_s=3600.0, speed=math.inf, timeout_s=60)
    assert result.system == "checkpoint"
    assert result.digests_equal_source
    assert result.strict_digests_equal is None  # a checkpoint carries no versions
    assert result.details["checkpoints_taken"] == 1
    assert result.details["checkpoints_sent_per_replica"] == [1] * 9
    table_rows = sum(trace.table_rows.values())
    assert result.rows_applied_per_replica == [table_rows] * 9
    expected = 9 * trace.table_fp32_bytes
    assert expected < result.wan_bytes < 1.1 * expected
    # Every row the trace changed was applied once per replica, with a latency.
    changed = {(b.table, int(k)) for b in trace.batches for k in b.keys}
    assert sum(d["rows"] for d in result.latency_per_dc.values()) == 9 * len(changed)


async def test_periodic_checkpoints_cost_a_table_copy_each(trace: Trace) -> None:
    topology = default_topology((5.0, 10.0), mbit=None, replicas=2)
    # 30 steps of 0.125 s simulated = 3.75 s; at speed 5 the replay lasts 0.75 s.
    result = await run_checkpoint(trace, topology, interval_s=0.2, speed=5.0, timeout_s=60)
    assert result.digests_equal_source
    sent = result.details["checkpoints_sent_per_replica"]
    assert result.details["checkpoints_taken"] >= 2
    assert all(n >= 1 for n in sent)
    expected = sum(sent) * trace.table_fp32_bytes
    assert expected < result.wan_bytes < 1.1 * expected
    assert result.wan_bytes_per_dc.keys() == {"dc0", "dc1"}
