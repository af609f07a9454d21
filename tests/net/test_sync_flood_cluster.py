"""Issue 13 §4 against real node processes: idle connections without the secret, reopened as
soon as dropped, cannot keep a restarted replica off its source's sync port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster

from .helpers import flood_idle_connections

pytestmark = pytest.mark.integration

READY_WITHIN_S = 20.0  # process start (imports, numba) plus the catch-up; main: never


@pytest.fixture
def cluster(tmp_path) -> Iterator[LocalCluster]:
    doc = cluster_doc(dcs=1, replicas=1, tables=[("emb", 4, 4)])
    with LocalCluster(write_cluster(doc, tmp_path / "cluster.toml")) as c:
        c.start(timeout=120)
        yield c


def test_a_replica_restarts_and_syncs_through_a_flood_of_idle_connections(
    cluster: LocalCluster,
) -> None:
    src = cluster.config.node("source")
    stop, opened = threading.Event(), [0]
    flood = threading.Thread(target=flood_idle_connections, args=(src.sync_port, 80, stop, opened))
    cluster.stop("dc1-r0")
    flood.start()
    try:
        deadline = time.monotonic() + 30.0
        while opened[0] < 200:  # 64 slots full and the flood reopening what is dropped
            assert time.monotonic() < deadline and flood.is_alive(), opened
            time.sleep(0.01)
        started = time.monotonic()
        cluster.restart("dc1-r0", timeout=READY_WITHIN_S)
        r = cluster.post("source", "/v1/tables/emb/rows", {"keys": [5], "values": [[1.0] * 4]})
        assert r.status_code == 200, r.text
        url = cluster.url("dc1-r0", "/v1/tables/emb/rows?keys=5")
        while True:  # 404 until the replica has the catalog, then found once the row arrives
            r = httpx.get(url, auth=cluster.auth, timeout=10)
            if r.status_code == 200 and r.json()["rows"][0]["found"]:
                break
            assert r.status_code in (200, 404), r.text
            assert time.monotonic() - started < READY_WITHIN_S, "the write never arrived"
            time.sleep(0.05)
        metrics = httpx.get(cluster.url("source", "/metrics"), timeout=10).text
        evicted = next(
            line for line in metrics.splitlines()
            if line.startswith("ekko_sync_handshakes_total") and 'outcome="evicted"' in line
        )  # fmt: skip
        assert float(evicted.rsplit(" ", 1)[1]) > 0, evicted
    finally:
        stop.set()
        flood.join()
    assert "evicting the oldest pending handshake" in (cluster.procs["source"].log_path.read_text())
