"""Guard messages and rollbacks across processes are signed with the cluster secret: a forged
one is refused, ``ekko rollback`` reaches the guard."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster

MODEL = {"name": "ctr", "rows_per_table": 1000, "embedding_dim": 8, "dense_interval_s": 1.0}


def test_unsigned_rollback_is_refused_and_the_cli_signs(tmp_path: Path) -> None:
    doc = cluster_doc(dcs=1, replicas=1, serve=True, models=[MODEL],
                      sync={"snapshot_interval_s": 0})  # fmt: skip
    doc["guard"] = {"enabled": True}
    config = write_cluster(doc, tmp_path / "cluster.toml")
    with LocalCluster(config) as cluster:
        cluster.start(timeout=120)
        for node, path in (("source", "/v1/models/ctr/rollback"),
                           ("dc1-r0", "/v1/models/ctr/guard/redirect")):  # fmt: skip
            r = httpx.post(cluster.url(node, path), json={"why": "forged"}, timeout=10)
            assert r.status_code == 401, r.text
            assert "x-ekko-signature" in r.json()["error"]
        # Signed by the CLI, the rollback reaches the guard, which redirects the replica and
        # rolls it back through signed node-to-node messages; the replica's signed answer
        # (it restored) comes back to the source.
        end = time.monotonic() + 30
        while (earliest := _health(cluster)["preimages"]["earliest_restorable"]) is None:
            assert time.monotonic() < end, "the source guard never started recording"
            time.sleep(0.2)  # the guard's first tick; bounded by the deadline
        to = earliest + 0.1
        proc = subprocess.run(
            [sys.executable, "-m", "ekko", "rollback", "ctr", "--config", str(config),
             "--to", str(to), "--why", "signed test"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(proc.stdout)["why"] == "signed test"
        end = time.monotonic() + 30
        while True:
            incidents = _health(cluster)["incidents"]
            if (incidents and "dc1-r0" in incidents[-1]["restored"]) or time.monotonic() > end:
                break
            time.sleep(0.2)  # the replica answers over HTTP; bounded by the deadline
        assert incidents and "dc1-r0" in incidents[-1]["restored"], incidents


def _health(cluster: LocalCluster) -> dict:
    return cluster.get("source", "/v1/models/ctr/health")
