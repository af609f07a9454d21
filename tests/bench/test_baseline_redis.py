"""Redis Streams baseline through a real redis-server and WAN relays: every replica ends equal
to the source, and the relays counted about one fp32 copy of every update per replica."""

from __future__ import annotations

import math
import shutil

import pytest
import redis.asyncio as aioredis
import torch

from ekko.bench.baselines import default_topology, redis_server, run_push, run_redis
from ekko.bench.trace import Trace, load_trace, record_trace
from ekko.train.dlrm import DLRMConfig

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (apt-get install -y redis-server)",
)

TINY = DLRMConfig(
    num_sparse=4, embedding_dim=8, rows_per_table=1000, bottom_mlp=(16, 8), top_mlp=(16, 1)
)


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Trace:
    path = tmp_path_factory.mktemp("redis") / "tiny"
    return load_trace(record_trace(30, 256, seed=13, path=path, model_config=TINY))


async def test_redis_server_starts_and_stops() -> None:
    async with redis_server() as server:
        client = aioredis.Redis(host=server.host, port=server.port)
        assert await client.ping()
        await client.aclose()
        process = server.process
    assert process.returncode is not None  # terminated, not left behind


@pytest.mark.parametrize("speed", [math.inf, 8.0])
async def test_redis_log_converges_and_counts_relay_bytes(trace: Trace, speed: float) -> None:
    topology = default_topology((5.0, 10.0, 20.0), mbit=100.0, replicas=3)
    result = await run_redis(trace, topology, speed=speed, timeout_s=60)
    assert result.system == "redis-streams"
    assert result.digests_equal_source
    assert result.strict_digests_equal  # entries applied in stream order
    assert result.rows_applied_per_replica == [trace.rows] * 9
    assert result.details["stream_entries"] == trace.num_batches + 1  # + the end marker
    expected = 9 * trace.fp32_bytes
    assert expected < result.wan_bytes < 1.25 * expected
    assert result.details["relay_bytes_to_broker"] > 0  # XREAD commands cross the WAN too


async def test_redis_and_push_cost_about_the_same(trace: Trace) -> None:
    topology = default_topology((5.0,), mbit=None, replicas=2)
    async with redis_server() as server:
        redis = await run_redis(
            trace, topology, speed=math.inf, redis_port=server.port, timeout_s=60
        )
    push = await run_push(trace, topology, speed=math.inf, timeout_s=60)
    assert redis.digests_equal_source and push.digests_equal_source
    assert 0.8 < redis.wan_bytes / push.wan_bytes < 1.25
