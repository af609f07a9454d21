"""Tombstone purge over real processes (issue 18): deleted keys' tombstones are forgotten at
the source and its replica once both hold them; a replica frozen (SIGSTOP) past the holder
horizon no longer holds the purge back, and once it runs again it converges to the source
and serves none of the keys deleted while it was frozen. (The reconcile of a holder that
missed purged deletes is what ``ekko sim`` draws in every third seed.)"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
from cluster_checks import wait_converged

from ekko.client import Client

pytestmark = pytest.mark.integration

SYNC = {
    "snapshot_interval_s": 0.5,
    "tombstone_purge_s": 0.3,
    "tombstone_report_s": 0.2,
    "tombstone_horizon_s": 2.0,
}


def _table(cluster, node: str) -> dict:
    return cluster.get(node, "/v1/status")["tables"]["emb"]


def _until(what: str, check, deadline_s: float = 30.0):
    end = time.monotonic() + deadline_s
    while not (got := check()):
        assert time.monotonic() < end, f"not within {deadline_s} s: {what}"
        time.sleep(0.1)  # other processes move; bounded by the deadline
    return got


def test_tombstones_are_purged_and_a_replica_back_from_a_kill_reconciles(make_cluster) -> None:
    cluster = make_cluster(dcs=1, replicas=1, tables=[("emb", 4, 8)], sync=SYNC)
    cluster.start(timeout=120)
    keys = np.arange(2000, dtype=np.int64)
    values = np.random.default_rng(5).standard_normal((2000, 4)).astype(np.float32)
    with Client.from_config(cluster.config_path) as client:
        client.write("emb", keys, values)
        wait_converged(cluster, 30)
        client.delete("emb", keys[:500])
        for node in ("source", "dc1-r0"):
            _until(
                f"{node} purges its 500 tombstones",
                lambda n=node: (
                    (t := _table(cluster, n))["tombstones"] == 0 and t["tombstones_purged"] >= 500
                ),
            )
        got = wait_converged(cluster, 30)
        assert got["dc1-r0"] == got["source"], got

        replica = cluster.procs["dc1-r0"].proc
        replica.send_signal(signal.SIGSTOP)
        try:
            client.delete("emb", keys[500:1000])
            # Frozen past the horizon, the replica no longer holds the purge back.
            _until(
                "the source purges deletes the frozen replica has not applied",
                lambda: _table(cluster, "source")["tombstones"] == 0,
            )
        finally:
            replica.send_signal(signal.SIGCONT)
        got = wait_converged(cluster, 60)
        assert got["dc1-r0"] == got["source"], got
        status = _table(cluster, "dc1-r0")
        assert (status["rows"], status["tombstones"]) == (1000, 0), status
        assert not client.lookup("emb", keys[:1000]).found.any()
        rows = client.lookup("emb", keys[1000:])
        np.testing.assert_array_equal(rows.values, values[1000:])
