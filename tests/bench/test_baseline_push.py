"""Push-to-all baseline: every replica ends equal to the source, and the WAN carried one fp32
copy of every update per replica (plus framing)."""

from __future__ import annotations

import math

import pytest
import torch

from ekko.bench.baselines import DataCentre, default_topology, run_push
from ekko.bench.trace import Trace, load_trace, record_trace
from ekko.train.dlrm import DLRMConfig

torch.set_num_threads(1)

TINY = DLRMConfig(
    num_sparse=4, embedding_dim=8, rows_per_table=1000, bottom_mlp=(16, 8), top_mlp=(16, 1)
)


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Trace:
    path = tmp_path_factory.mktemp("push") / "tiny"
    return load_trace(record_trace(30, 256, seed=11, path=path, model_config=TINY))


@pytest.mark.parametrize("speed", [math.inf, 8.0])
async def test_push_converges_and_counts_one_fp32_copy_per_replica(
    trace: Trace, speed: float
) -> None:
    topology = default_topology((5.0, 10.0, 20.0), mbit=100.0, replicas=3)
    result = await run_push(trace, topology, speed=speed, timeout_s=60)
    assert result.system == "push-fp32"
    assert result.replicas == 9
    assert result.digests_equal_source
    assert result.strict_digests_equal  # same order, same versions
    assert result.rows_applied_per_replica == [trace.rows] * 9
    assert sum(d["rows"] for d in result.latency_per_dc.values()) == 9 * trace.rows
    expected = 9 * trace.fp32_bytes
    # Framing (length/flags, msgpack, array headers, table name, stamp) is a few % here.
    assert expected < result.wan_bytes < 1.25 * expected
    assert 1.0 < result.fp32_ratio < 1.25
    per_dc = set(result.wan_bytes_per_dc.values())
    assert len(per_dc) == 1  # every DC received the same frames
    assert not math.isnan(result.latency_p50_ms) and result.latency_p99_ms >= result.latency_p50_ms


async def test_push_without_wan_counts_no_wan_bytes(trace: Trace) -> None:
    """A DC without a WanProfile is on the LAN: its links cross no emulated WAN."""
    result = await run_push(trace, [DataCentre("local", None, 2)], speed=math.inf, timeout_s=60)
    assert result.digests_equal_source and result.strict_digests_equal
    assert result.wan_bytes == 0
