"""An HTTP write acknowledged by a deferring source survives kill -9 (README: acknowledged =
durable). The scheduler used to hold its insignificant rows out of the table and out of the
write-ahead log while the route answered 200 (with no versions): SIGKILL lost all of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cluster_checks import until

from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster

pytestmark = pytest.mark.integration

KEYS = list(range(1, 201))


def _rows(cluster: LocalCluster, name: str) -> tuple[np.ndarray, list[int]]:
    doc = cluster.get(name, f"/v1/tables/emb/rows?keys={','.join(map(str, KEYS))}")
    return (
        np.array([row["value"] for row in doc["rows"]], np.float32),
        [row["version"] for row in doc["rows"]],
    )


def _values(cluster: LocalCluster, name: str) -> np.ndarray:
    return _rows(cluster, name)[0]


def test_an_acknowledged_insignificant_write_survives_sigkill(tmp_path: Path) -> None:
    doc = cluster_doc(dcs=1, replicas=1, wan_delay_ms=[5.0], tables=[("emb", 8, 4)],
                      sync={"wan_codec": "int8", "snapshot_interval_s": 0})  # fmt: skip
    doc["scheduler"] = {"enabled": True, "defer": True, "max_staleness_s": 60.0}
    with LocalCluster(write_cluster(doc, tmp_path / "cluster.toml")) as cluster:
        cluster.start(timeout=120)
        rng = np.random.default_rng(0)
        first = rng.standard_normal((200, 8)).astype(np.float32)
        values = first + rng.standard_normal((200, 8)).astype(np.float32)
        for v in (first, values, values + 1e-4):  # new keys, large steps, then a tiny one
            r = cluster.post("source", "/v1/tables/emb/rows", {"keys": KEYS, "values": v.tolist()})
            assert r.status_code == 200, r.text
            assert len(r.json()["versions"]) == len(KEYS)  # every row written, none held
        acked = values + np.float32(1e-4)
        np.testing.assert_array_equal(_values(cluster, "source"), acked)
        cluster.kill("source")
        cluster.restart("source", timeout=60)
        np.testing.assert_array_equal(_values(cluster, "source"), acked)
        want, versions = _rows(cluster, "source")
        # the replica gets them too, as int8 holds them (one quantisation step away)
        until("the replica holds the acknowledged versions",
              lambda: _rows(cluster, "dc1-r0")[1] == versions)  # fmt: skip
        step = np.abs(want).max(axis=1, keepdims=True) / 127
        assert (np.abs(_values(cluster, "dc1-r0") - want) <= step).all()
