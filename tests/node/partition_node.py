"""A partitioned cluster's source of partition 0 run alone in the test's process, for the
tests of what a partition holder reads and writes (shared: three files started it alike)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ekko.node.config import ClusterConfig, load_config
from ekko.node.runner import NodeRunner
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.store import shard_of


@asynccontextmanager
async def lone_source(
    tmp_path: Path, **doc: Any
) -> AsyncIterator[tuple[ClusterConfig, NodeRunner]]:
    """``source-p0`` of a 2-partition cluster with table ``emb`` (dim 4, 8 shards), ready;
    ``doc``: more ``cluster_doc`` arguments. Stopped on the way out."""
    kw: dict[str, Any] = {"tables": [("emb", 4, 8)], "sync": {"snapshot_interval_s": 0}} | doc
    d = cluster_doc(dcs=1, replicas=1, partitions=2, **kw)
    d["durability"] = {"recovery_timeout_s": 0.2}  # run alone: no replica to recover from
    cfg = load_config(write_cluster(d, tmp_path / "cluster.toml"))
    runner = NodeRunner(cfg, "source-p0", tmp_path)
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(runner.ready.wait(), 30)
        yield cfg, runner
    finally:
        runner.stop()
        await asyncio.wait_for(task, 30)


def keys_of(cfg: ClusterConfig, partition: int, n: int) -> np.ndarray:
    """The first ``n`` keys of ``emb`` (8 shards) that ``partition`` holds."""
    keys = np.arange(20_000, dtype=np.int64)
    return keys[cfg.placement().partitions_of("emb", 8)[shard_of(keys, 8)] == partition][:n]
