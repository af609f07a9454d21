"""A node's core reads time only from its clock: row write times, uptime in its status."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ekko.node.config import load_config
from ekko.node.core import NodeCore
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.store.clock import FakeClock


def test_the_core_stamps_writes_and_uptime_with_its_clock(tmp_path: Path) -> None:
    doc = cluster_doc(dcs=1, replicas=1, tables=[("emb", 4, 2)], sync={"snapshot_interval_s": 0})
    cfg = load_config(write_cluster(doc, tmp_path / "cluster.toml"))
    clock = FakeClock(wall=1_800_000_000.0)
    core = NodeCore(cfg, "source", tmp_path, clock=clock)
    core.not_ready = None  # recovered (nothing to recover from in this test)
    clock.advance(42.5)
    assert core.status()["uptime_s"] == 42.5
    core.write("emb", np.arange(3, dtype=np.int64), np.ones((3, 4), np.float32))
    _keys, _values, _versions, wtimes, _lanes = core.store.table("emb").all_rows()
    assert (wtimes == clock.ns()).all()
    core.close()
