"""Deletes over real processes (issue 18): rows written and then deleted through
``Client.delete`` are not found at the replica, whose digests equal the source's; after an
acknowledged delete the source is SIGKILLed and restarted on its data dir, and the keys stay
deleted everywhere (the write-ahead log's delete records replay as tombstones)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from cluster_checks import wait_converged

from ekko.client import Client

pytestmark = pytest.mark.integration


def _not_found_at(client: Client, keys: np.ndarray, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while client.lookup("emb", keys).found.any():
        assert time.monotonic() < end, f"{client.target.reads.name} still serves deleted keys"
        time.sleep(0.1)  # a replica in another process pulls; bounded by the deadline


def test_a_delete_reaches_the_replica_and_survives_a_source_kill(make_cluster) -> None:
    cluster = make_cluster(
        dcs=1, replicas=1, tables=[("emb", 4, 4)], sync={"snapshot_interval_s": 0}
    )
    cluster.start(timeout=120)
    keys = np.arange(1000, dtype=np.int64)
    values = np.random.default_rng(3).standard_normal((1000, 4)).astype(np.float32)
    gone = keys[::4]
    with Client.from_config(cluster.config_path) as client:
        written = client.write("emb", keys, values)
        got = wait_converged(cluster, 30)  # the replica holds the table and every row
        assert got["dc1-r0"] == got["source"], got
        assert client.lookup("emb", gone).found.all()
        deleted = client.delete("emb", gone)
        assert (deleted > 0).all() and deleted.max() > written.max()
        _not_found_at(client, gone)
        got = wait_converged(cluster, 30)
        assert got["dc1-r0"] == got["source"], got
        live = np.setdiff1d(keys, gone)
        rows = client.lookup("emb", live)
        assert rows.found.all()
        np.testing.assert_array_equal(rows.values, values[live])
        status = client.status()["tables"]["emb"]
        assert status["rows"] == 750, status

        # SIGKILL right after an acknowledged delete: its only record is in the log.
        more = np.arange(2000, 2010, dtype=np.int64)
        client.write("emb", more, np.ones((10, 4), np.float32))
        client.delete("emb", more[:5])
        cluster.kill("source")
        cluster.restart("source")
        # The client reads from the replica; the source is asked itself.
        at_source = cluster.get("source", "/v1/tables/emb/rows?keys=2000,2001,2005,0,1")
        assert [r["found"] for r in at_source["rows"]] == [False, False, True, False, True]
        _not_found_at(client, np.concatenate([gone, more[:5]]))
        got = wait_converged(cluster, 30)
        assert got["dc1-r0"] == got["source"], got
        assert client.lookup("emb", more[5:]).found.all()
