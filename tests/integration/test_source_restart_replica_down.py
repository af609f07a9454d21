"""Issue 13 §2 (walfix) over real processes: a replica that is down when the source restarts
and comes back within ``recovery_timeout_s`` is waited for. The source once tried it once
(a 1 s connect), gave up, started a new lineage, and every other replica rebuilt its whole
store from it (a full model copy over the WAN)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from cluster_checks import wait_converged

pytestmark = pytest.mark.integration

DIM = 4


def _status(cluster, name: str) -> dict:
    return cluster.get(name, "/v1/status")


def _wait_log(cluster, name: str, start: int, text: str, deadline_s: float) -> str:
    path = cluster.log_dir / f"{name}.log"
    end = time.monotonic() + deadline_s
    while True:
        tail = path.read_bytes()[start:].decode(errors="replace")
        if text in tail or time.monotonic() > end:
            return tail
        time.sleep(0.05)  # polling another process's log, bounded by the deadline


def _write(cluster, rng: np.random.Generator, n: int) -> None:
    keys = rng.integers(0, 5000, n).tolist()
    values = rng.standard_normal((n, DIM)).round(3).tolist()
    r = cluster.post("source", "/v1/tables/emb/rows", {"keys": keys, "values": values})
    assert r.status_code == 200, r.text


def test_a_replica_back_within_the_timeout_keeps_the_lineage(make_cluster):
    cluster = make_cluster(
        dcs=2,
        replicas=2,
        wan_delay_ms=[5, 10],
        tables=[("emb", DIM, 8)],
        sync={"snapshot_interval_s": 1.0, "failover_probe_s": 0.5},
    )
    cluster.start()
    rng = np.random.default_rng(7)
    for _ in range(20):
        _write(cluster, rng, 50)
    got = wait_converged(cluster, 30)
    assert len({str(d) for d in got.values()}) == 1, got
    lineage = _status(cluster, "source")["lineage"]
    replicas = [n.name for n in cluster.config.nodes if n.name != cluster.config.source.name]
    victim = replicas[-1]

    cluster.kill(victim)
    cluster.kill("source")
    log_start = (cluster.log_dir / "source.log").stat().st_size
    cluster._spawn("source")
    # The source is recovering and has found the victim down; it comes back now.
    tail = _wait_log(cluster, "source", log_start, f"upstream {victim} unreachable", 30)
    assert f"upstream {victim} unreachable" in tail, tail
    cluster.restart(victim)
    cluster.wait_ready("source", 60)
    tail = _wait_log(cluster, "source", log_start, "recovered in", 5)
    assert "kept" in tail and "unreachable" not in tail.split("recovered in")[1], tail

    for _ in range(5):
        _write(cluster, rng, 50)
    got = wait_converged(cluster, 30)
    assert len({str(d) for d in got.values()}) == 1, got
    for name in [n.name for n in cluster.config.nodes]:
        st = _status(cluster, name)
        assert st["lineage"] == lineage, f"{name}: lineage {st['lineage']}, was {lineage}"
        assert st["rebuilds"] == 0, f"{name} rebuilt its store {st['rebuilds']} times"
