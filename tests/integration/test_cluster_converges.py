"""Multi-process sync (DESIGN.md §3): 3 DCs x 2 replicas over real sockets and emulated WAN.

Tens of thousands of writes go through the source's HTTP API while a follower is SIGKILLed
and restarted and a DC leader is SIGKILLed and restarted; afterwards every node's table
digests equal the source's.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest
from cluster_checks import digests, wait_converged

pytestmark = pytest.mark.integration

DIM = 8


def _write(cluster, rng, n_batches: int, batch: int) -> int:
    written = 0
    for _ in range(n_batches):
        keys = rng.integers(0, 20_000, batch).tolist()
        values = rng.standard_normal((batch, DIM)).round(4).tolist()
        r = cluster.post("source", "/v1/tables/emb/rows", {"keys": keys, "values": values})
        assert r.status_code == 200, r.text
        assert len(r.json()["versions"]) == batch
        written += batch
    return written


def test_writes_survive_follower_and_leader_kills(make_cluster):
    cluster = make_cluster(
        dcs=3,
        replicas=2,
        wan_delay_ms=[10, 20, 40],
        tables=[("emb", DIM, 8)],
        sync={"failover_probe_s": 0.5, "snapshot_interval_s": 0},
    )
    cluster.start()
    rng = np.random.default_rng(7)
    written = _write(cluster, rng, 20, 500)

    cluster.kill("dc1-r1")  # a follower
    written += _write(cluster, rng, 20, 500)
    cluster.restart("dc1-r1")

    cluster.kill("dc2-r0")  # a DC leader: its follower fails over to the WAN
    written += _write(cluster, rng, 20, 500)
    status = cluster.get("dc2-r1", "/v1/status")
    assert status["role"] == "follower"
    cluster.restart("dc2-r0")
    written += _write(cluster, rng, 20, 500)
    assert written >= 40_000

    got = wait_converged(cluster)
    want = digests(cluster, "source")
    for name, held in got.items():
        assert held == want, f"{name} diverged from the source"
    src = cluster.get("source", "/v1/status")["tables"]["emb"]
    assert src["rows"] > 10_000
    # Follower back behind its leader (failover returns), leaders on the WAN.
    assert cluster.get("dc2-r1", "/v1/status")["upstream"] == "dc2-r0"
    # SIGTERM to every node at once stops each (0, or the launcher's repeated SIGTERM landing
    # after its loop closed): a follower whose link closed as its node's shutdown cancelled
    # it swallowed the cancellation and kept dialing, killed (-9) after 15 s.
    codes = cluster.stop_all()
    assert all(c in (0, -signal.SIGTERM) for c in codes.values()), codes


def test_rows_api_reads_values_and_rejects_bad_input(make_cluster):
    cluster = make_cluster(dcs=1, replicas=1, wan_delay_ms=[5], tables=[("emb", 4, 4)])
    cluster.start()
    r = cluster.post(
        "source", "/v1/tables/emb/rows", {"keys": [1, 2], "values": [[1, 2, 3, 4], [5, 6, 7, 8]]}
    )
    assert r.status_code == 200 and len(r.json()["versions"]) == 2
    before = digests(cluster, "source")
    bad = [
        ("/v1/tables/emb/rows", {"keys": [1], "values": [[1, 2, 3]]}, 400, "values[0]"),
        ("/v1/tables/emb/rows", {"keys": [1.5], "values": [[1, 2, 3, 4]]}, 400, "integer"),
        ("/v1/tables/emb/rows", {"keys": [1, 2], "values": [[1, 2, 3, 4]]}, 400, "2 rows"),
        ("/v1/tables/nope/rows", {"keys": [1], "values": [[1, 2, 3, 4]]}, 404, "nope"),
        ("/v1/tables/emb/rows", [1, 2], 400, "object"),
        ("/v1/tables/emb/rows", {"keys": [1], "values": [[1, float("nan"), 3, 4]]}, 400,
         "values[0][1] is NaN or inf"),
    ]  # fmt: skip
    for path, body, code, needle in bad:
        resp = cluster.post("source", path, body)
        assert resp.status_code == code, (body, resp.text)
        assert needle in resp.json()["error"], (needle, resp.text)
    import httpx

    resp = httpx.post(
        cluster.url("source", "/v1/tables/emb/rows"), content=b"{not json", auth=cluster.auth
    )
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]
    resp = cluster.post("dc1-r0", "/v1/tables/emb/rows", {"keys": [3], "values": [[0] * 4]})
    assert resp.status_code == 409 and "source" in resp.json()["error"]
    assert digests(cluster, "source") == before

    got = wait_converged(cluster, 20)
    assert got["dc1-r0"] == before
    rows = cluster.get("dc1-r0", "/v1/tables/emb/rows?keys=1,2,99")["rows"]
    assert rows[0]["value"] == [1, 2, 3, 4] and rows[0]["version"] >= 1
    assert rows[2] == {"key": 99, "found": False}
    metrics = __import__("httpx").get(cluster.url("dc1-r0", "/metrics")).text
    assert "ekko_update_latency_seconds_bucket" in metrics
    assert "ekko_pulled_rows_total" in metrics
    source_metrics = __import__("httpx").get(cluster.url("source", "/metrics")).text
    assert _knowledge(metrics) == _knowledge(source_metrics) > 0  # converged: zero lag


def _knowledge(metrics_text: str) -> float:
    import re

    found = re.search(
        r'^ekko_knowledge_versions\{[^}]*table="emb"[^}]*\} (\S+)$', metrics_text, re.MULTILINE
    )
    assert found, "ekko_knowledge_versions missing from /metrics"
    return float(found.group(1))
