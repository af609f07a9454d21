"""Replica lag, in versions and seconds per table: the tracker's definitions on stores a test
writes, and a running replica cut from its source (its pull link cancelled) whose lag grows
in ``/v1/status`` and ``/metrics`` and returns to 0 once the link is back."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import numpy as np
from test_drivers import until

from ekko.node.config import load_config
from ekko.node.replica_lag import LagTracker, versions_behind
from ekko.node.runner import NodeRunner
from ekko.node.upstream import Upstream
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.store import Store
from ekko.store.spec import LANES, TableSpec


def _stores() -> tuple[Store, Store]:
    src, rep = Store(origin=0), Store(origin=1)
    for s in (src, rep):
        s.create_table(TableSpec("emb", 4, 4))
    rep.lineage = src.lineage = 7
    return src, rep


def _write(src: Store, n: int, start: int = 0) -> None:
    keys = np.arange(start, start + n, dtype=np.int64)
    src.table("emb").write(keys, np.ones((n, 4), np.float32), now_ns=1)


def _copy_knowledge(src: Store, rep: Store) -> None:
    """The replica now holds everything the source holds (as a finished pull leaves it)."""
    k = src.table("emb").knowledge
    for lane in LANES:
        rep.table("emb").merge_knowledge_many(np.arange(k.shape[0]), lane, k[:, lane])


def _observe(t: LagTracker, now: float, src: Store, rep: Store) -> None:
    t.observe(now, src.lineage, {"emb": src.table("emb").knowledge.copy()}, rep)


def test_versions_behind_counts_writes_a_replica_lacks_in_any_lane() -> None:
    source = np.array([[5, 3, 0], [2, 2, 0]])  # shard 0: counter 5; shard 1: counter 2
    assert versions_behind(source, source) == 0
    assert versions_behind(source, np.zeros_like(source)) == 7
    # caught up in the high lane of shard 0, behind in its low lane (holds <= 1 there)
    assert versions_behind(source, np.array([[5, 1, 0], [2, 2, 0]])) == 4
    # a lane the source never wrote (0) holds nothing back
    assert versions_behind(source, np.array([[5, 3, 0], [2, 0, 0]])) == 2


def test_lag_grows_while_cut_and_is_zero_once_caught_up() -> None:
    src, rep = _stores()
    tracker = LagTracker()
    _observe(tracker, 100.0, src, rep)
    assert {n: vars(x) for n, x in tracker.lag(rep, 100.5).items()} == {
        "emb": {"versions": 0, "seconds": 0.0}
    }
    _write(src, 30)
    _observe(tracker, 101.0, src, rep)
    _write(src, 10, start=30)
    _observe(tracker, 102.0, src, rep)
    assert vars(tracker.lag(rep, 103.0)["emb"]) == {"versions": 40, "seconds": 2.0}
    assert tracker.lag(rep, 110.0)["emb"].seconds == 9.0  # the oldest unheld sample ages
    _copy_knowledge(src, rep)
    assert vars(tracker.lag(rep, 111.0)["emb"]) == {"versions": 0, "seconds": 0.0}


def test_seconds_date_the_oldest_sample_not_held_and_survive_thinning() -> None:
    src, rep = _stores()
    tracker = LagTracker(max_samples=4)
    _write(src, 5)
    _observe(tracker, 10.0, src, rep)
    _copy_knowledge(src, rep)  # holds the state of t=10
    for i in range(20):  # cut from here on: one sample a second, thinned to 4
        _write(src, 1, start=100 + i)
        _observe(tracker, 11.0 + i, src, rep)
    assert vars(tracker.lag(rep, 40.0)["emb"]) == {"versions": 20, "seconds": 29.0}


def test_a_replica_of_another_lineage_holds_nothing_of_the_source() -> None:
    src, rep = _stores()
    _write(src, 12)
    _copy_knowledge(src, rep)
    rep.lineage = 8  # a source that lost its data drew a new lineage
    tracker = LagTracker()
    _observe(tracker, 1.0, src, rep)
    assert tracker.lag(rep, 2.0)["emb"].versions == 12


def _rows(runner: NodeRunner) -> int:
    t = runner.core.store.tables.get("emb")
    return 0 if t is None else t.rows


def _lag(runner: NodeRunner) -> dict:
    return runner._status_extra()["replica_lag"]["tables"].get("emb", {})


async def test_a_replica_cut_from_its_source_shows_growing_lag_then_zero_healed(
    tmp_path: Path,
) -> None:
    rows = 25
    sync = {"snapshot_interval_s": 0, "failover_probe_s": 0.2}  # redial soon
    doc = cluster_doc(dcs=1, replicas=1, tables=[("emb", 4, 2)], sync=sync)
    cfg = load_config(write_cluster(doc, tmp_path / "cluster.toml"))
    source = NodeRunner(cfg, "source", tmp_path)
    replica = NodeRunner(cfg, "dc1-r0", tmp_path)
    assert replica.lag_probe is not None and source.lag_probe is None
    replica.lag_probe.interval_s = 0.05
    tasks = [asyncio.create_task(r.run()) for r in (replica, source)]
    try:
        for r in (source, replica):
            await asyncio.wait_for(r.ready.wait(), 30)
        keys = np.arange(rows, dtype=np.int64)
        source.core.write("emb", keys, np.ones((rows, 4), np.float32))
        await until(lambda: _lag(replica).get("versions") == 0
                    and _rows(replica) == rows, "caught up")  # fmt: skip

        up = next(d for d in replica.drivers if isinstance(d, Upstream))
        await replica.supervisor.cancel(up.name)  # cut: nothing is pulled any more
        source.core.write("emb", keys + rows, np.ones((rows, 4), np.float32))
        await until(lambda: _lag(replica).get("versions") == rows, "lag seen")
        first = _lag(replica)["seconds"]
        await until(lambda: _lag(replica)["seconds"] > first + 0.2, "lag growing")
        node = cfg.node("dc1-r0")
        async with httpx.AsyncClient(base_url=f"http://{node.host}:{node.admin_port}") as c:
            text = (await c.get("/metrics")).text
        assert f'ekko_replica_lag_versions{{node="dc1-r0",table="emb"}} {rows}.0' in text
        seconds = re.search(r'ekko_replica_lag_seconds\{node="dc1-r0",table="emb"\} (\S+)', text)
        assert seconds is not None and float(seconds.group(1)) > first

        replica.supervisor.start(up.name, up.run)  # healed
        await until(lambda: _lag(replica) == {"versions": 0, "seconds": 0.0}, "lag back to 0")
        assert _rows(replica) == 2 * rows
    finally:
        for r in (source, replica):
            r.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
