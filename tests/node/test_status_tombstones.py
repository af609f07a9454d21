"""A node's status names, per table, the tombstones it holds and those it purged."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ekko.node.config import load_config
from ekko.node.core import NodeCore
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.store.clock import FakeClock


def test_status_counts_tombstones_held_and_purged(tmp_path: Path) -> None:
    doc = cluster_doc(dcs=1, replicas=1, tables=[("emb", 4, 2)], sync={"snapshot_interval_s": 0})
    cfg = load_config(write_cluster(doc, tmp_path / "cluster.toml"))
    core = NodeCore(cfg, "source", tmp_path, clock=FakeClock(wall=1_800_000_000.0))
    core.not_ready = None  # recovered (nothing to recover from in this test)
    core.write("emb", np.arange(5, dtype=np.int64), np.ones((5, 4), np.float32))
    core.delete("emb", np.array([1, 2, 3], dtype=np.int64))
    emb = core.status()["tables"]["emb"]
    assert (emb["rows"], emb["tombstones"], emb["tombstones_purged"]) == (2, 3, 0)
    table = core.store.table("emb")
    table.purge(np.full(table.num_shards, np.iinfo(np.int64).max, dtype=np.int64))
    emb = core.status()["tables"]["emb"]
    assert (emb["rows"], emb["tombstones"], emb["tombstones_purged"]) == (2, 0, 3)
