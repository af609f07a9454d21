"""A captured signed request, replayed after the node restarts or sent to another node, is
refused (issue 13 §4), against real node processes.

A writer sets key 42 to 1.0 (request A) then 2.0 (request B). Replaying A's exact bytes and
header must never set it back to 1.0: not before a restart (the nonce cache), not after the
source is SIGKILLed and restarted with its data (the cache is gone: the node refuses anything
signed before it started), and a header signed for the source does nothing at a replica.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster

pytestmark = pytest.mark.integration

PATH = "/v1/tables/emb/rows"


@pytest.fixture
def cluster(tmp_path) -> Iterator[LocalCluster]:
    doc = cluster_doc(dcs=1, replicas=1, tables=[("emb", 4, 4)])
    with LocalCluster(write_cluster(doc, tmp_path / "cluster.toml")) as c:
        c.start(timeout=120)
        yield c


def _signed(cluster: LocalCluster, node: str, role: str, method: str, path: str, body: bytes):
    from ekko.net import signed_requests as sr

    url = cluster.url(node, path)
    try:
        return sr.auth_headers(cluster.secret, role, method, path, body, host=sr.host_of(url))
    except (TypeError, AttributeError):  # before signatures named their node
        return sr.auth_headers(cluster.secret, role, method, path, body)


def _value(cluster: LocalCluster, node: str) -> list[float] | None:
    r = httpx.get(cluster.url(node, f"{PATH}?keys=42"), auth=cluster.auth, timeout=10)
    if r.status_code == 404:  # a replica before it has the catalog
        return None
    r.raise_for_status()
    row = r.json()["rows"][0]
    return row["value"] if row["found"] else None


def _write(cluster: LocalCluster, value: float) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"keys": [42], "values": [[value] * 4]}).encode()
    headers = _signed(cluster, "source", "writer", "POST", PATH, body)
    r = httpx.post(cluster.url("source", PATH), content=body, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return body, headers


def _wait_value(cluster: LocalCluster, node: str, want: list[float], timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while (got := _value(cluster, node)) != want:
        assert time.monotonic() < deadline, f"{node} holds {got}, want {want}"
        time.sleep(0.1)


def test_a_captured_request_is_refused_after_a_restart_and_at_other_nodes(
    cluster: LocalCluster,
) -> None:
    body_a, headers_a = _write(cluster, 1.0)
    _write(cluster, 2.0)
    src = cluster.url("source", PATH)
    r = httpx.post(src, content=body_a, headers=headers_a, timeout=10)
    assert r.status_code == 401 and "replayed" in r.json()["error"], r.text
    _wait_value(cluster, "dc1-r0", [2.0] * 4)

    # A reader's header signed for the source reads nothing at the replica.
    q = f"{PATH}?keys=42"
    headers = _signed(cluster, "source", "reader", "GET", q, b"")
    r = httpx.get(cluster.url("dc1-r0", q), headers=headers, timeout=10)
    assert r.status_code == 401, r.text  # sent as is, the MAC names another Host
    source_host = cluster.url("source", "").removeprefix("http://")
    r = httpx.get(cluster.url("dc1-r0", q), headers={**headers, "host": source_host}, timeout=10)
    assert r.status_code == 401 and "not this node" in r.json()["error"], r.text
    r = httpx.get(cluster.url("source", q), headers=headers, timeout=10)
    assert r.status_code == 200, r.text  # the same header is good where it was meant to go

    cluster.kill("source")
    cluster.restart("source", timeout=120)
    r = httpx.post(src, content=body_a, headers=headers_a, timeout=10)
    assert r.status_code == 401, r.text
    assert "before this node started" in r.json()["error"]
    assert r.headers.get("x-ekko-resign") == "1"
    assert _value(cluster, "source") == [2.0] * 4
    # A client holding the secret signs anew and is served (ClusterAuth).
    r = cluster.post("source", PATH, {"keys": [42], "values": [[3.0] * 4]})
    assert r.status_code == 200, r.text
    _wait_value(cluster, "dc1-r0", [3.0] * 4)
