"""Issue 15, fuzzing: hostile HTTP requests into every route and hostile frames into the sync
port of live node processes; each node stays up and ready, refuses with a 4xx naming the
problem (or a named ``Error`` / a closed connection on the sync port), keeps its memory
bounded, and its store's digests do not move.

One cluster (a source training ``ctr`` with the guard on, a serving replica, a checkpoint
replica) is shared by the module. The routes are those each node documents in
``/openapi.json``, which lists every route it mounts (``tests/node/test_openapi.py``), so a
route added later is fuzzed too. CI runs a bounded, derandomized number of examples
(``EKKO_FUZZ_EXAMPLES``, default 120: a tenth of it per route of each node, half of it in
message exchanges and a quarter in mutated frames per sync port, a fortieth per
``schemathesis`` operation); set it higher for a longer run, e.g.
``EKKO_FUZZ_EXAMPLES=5000 pytest tests/integration/test_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from fuzz_http import (
    STRICT,
    FuzzRequest,
    Operation,
    check_answer,
    operations,
    requests,
    valid_bodies,
)
from fuzz_sync import (
    PING,
    authenticated_exchange,
    hostile_messages,
    mutated_frames,
    pre_handshake_bytes,
    raw_exchange,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ekko.net.signed_requests import host_of
from ekko.node.access import AccessPolicy, ClusterAuth
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster
from ekko.protocol.messages import Catalog, Error

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("EKKO_FUZZ_EXAMPLES", "120"))
LONG = "EKKO_FUZZ_EXAMPLES" in os.environ
MODEL = {"name": "ctr", "rows_per_table": 200, "embedding_dim": 4, "num_sparse": 2}
NUM_DENSE = 13  # the model's default
NODES = ("source", "dc1-r0", "ckpt-r0")
RSS_GROWTH_MIB = 160
"""Allowed growth of a node's resident memory over one fuzz test, after a warm-up: above the
48 MiB a zstd frame may inflate to and a 16 MiB body, far below what a leak per request would
reach over the run."""
FAULTS = ("Traceback (most recent call last)", "Exception in ASGI application")


def _settings(n: int) -> settings:
    return settings(
        max_examples=max(1, n),
        derandomize=not LONG,  # CI: the same examples every run
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    doc = cluster_doc(dcs=1, replicas=1, serve=True, models=[MODEL], checkpoint_every_s=300.0,
                      tables=[("emb", 4, 4)], sync={"snapshot_interval_s": 0})  # fmt: skip
    doc["guard"] = {"enabled": True}
    config = write_cluster(doc, tmp_path_factory.mktemp("fuzz") / "cluster.toml")
    with LocalCluster(config) as c:
        c.start(timeout=180)
        _write(c, [1, 2, 3])
        # Predict answers once the replica holds the model's dense tables (503 until then).
        event = {"events": [{"dense": [0.5] * NUM_DENSE, "sparse": [1, 2]}]}
        end = time.monotonic() + 60
        while c.post("dc1-r0", "/v1/models/ctr/predict", event).status_code != 200:
            assert time.monotonic() < end, "the replica never synced the model"
            time.sleep(0.2)
        _converged(c)
        yield c


def _write(c: LocalCluster, keys: list[int]) -> None:
    r = c.post("source", "/v1/tables/emb/rows", {"keys": keys, "values": [[0.5] * 4] * len(keys)})
    assert r.status_code == 200, r.text


def _digests(c: LocalCluster, node: str) -> dict[str, str]:
    return {t: v["digest"] for t, v in c.get(node, "/v1/status")["tables"].items()}


def _converged(c: LocalCluster, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while (want := _digests(c, "source")) != _digests(c, "dc1-r0"):
        assert time.monotonic() < end, f"dc1-r0 did not converge to {want}"
        time.sleep(0.1)


def _rss_mib(c: LocalCluster, node: str) -> float:
    status = Path(f"/proc/{c.procs[node].proc.pid}/status").read_text()
    kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(kb) / 1024


def _healthy(c: LocalCluster, rss_before: dict[str, float]) -> None:
    """Every node alive, ready, no traceback in its log, its memory within the bound."""
    for node in NODES:
        assert c.procs[node].alive, f"{node} exited"
        r = httpx.get(c.url(node, "/ready"), timeout=10)
        assert r.status_code == 200, (node, r.text)
        log = c.procs[node].log_path.read_text(errors="replace")
        for fault in FAULTS:
            assert fault not in log, f"{node}: {log[log.index(fault) - 2000 :][:4000]}"
        metrics = httpx.get(c.url(node, "/metrics"), timeout=10).text
        assert f'ekko_sync_session_errors_total{{node="{node}"}} 0.0' in metrics, node
        grew = _rss_mib(c, node) - rss_before[node]
        assert grew < RSS_GROWTH_MIB, f"{node}: resident memory grew {grew:.0f} MiB"


def _warm_rss(c: LocalCluster) -> dict[str, float]:
    return {node: _rss_mib(c, node) for node in NODES}


@pytest.mark.parametrize("target", ["source", "dc1-r0"])
def test_hostile_frames_into_the_sync_port(cluster: LocalCluster, target: str) -> None:
    """The source's sync port, and a replica's (which serves its followers, and passes their
    traffic reports up with its own pulls). First in the module: no guard message sent by
    the HTTP fuzz can have started a rollback that writes while the digests are watched."""
    c = cluster
    node = c.config.node(target)
    host, port = node.host, node.sync_port
    tables = sorted(_digests(c, target))
    rss = _warm_rss(c)
    before = _digests(c, "source")
    outcomes = {"answered": 0, "closed": 0, "silent": 0}

    @_settings(max(2, EXAMPLES // 80))
    @given(batch=st.lists(pre_handshake_bytes(tables), min_size=16, max_size=16))
    def unauthenticated(batch: list[bytes]) -> None:
        async def run() -> list[tuple[bytes, bool]]:
            return await asyncio.gather(*(raw_exchange(host, port, data) for data in batch))

        for data, (got, closed) in zip(batch, asyncio.run(run()), strict=True):
            assert got == b"", ("the node sent more than its challenge", data[:64], got[:64])
            assert closed, ("the node kept an unauthenticated connection open", data[:64])

    @_settings(EXAMPLES // 2)
    @given(sends=st.lists(hostile_messages(tables), min_size=1, max_size=3))
    def messages(sends: list) -> None:
        out = asyncio.run(authenticated_exchange(host, port, c.secret, sends))
        assert not out.silent, ("the node neither answered nor closed", sends)
        outcomes["closed" if out.closed else "answered"] += 1
        for msg in out.answers:
            if isinstance(msg, Error):
                assert msg.code and msg.reason, msg
        if not out.closed:
            assert isinstance(out.answers[-1], Catalog) and out.answers[-1].req_id == PING
        assert _digests(c, "source") == before

    @_settings(EXAMPLES // 4)
    @given(raw=mutated_frames(tables))
    def frames(raw: bytes) -> None:
        out = asyncio.run(authenticated_exchange(host, port, c.secret, [], raw=raw))
        outcomes["silent" if out.silent else "closed" if out.closed else "answered"] += 1
        assert _digests(c, "source") == before

    unauthenticated()
    messages()
    frames()
    # A well-behaved replica, on its own connection all along, still converges.
    _write(c, [5 if target == "source" else 6])
    _converged(c)
    _healthy(c, rss)
    assert outcomes["answered"] and outcomes["closed"], outcomes


def _fuzz_route(
    c: LocalCluster,
    node: str,
    client: httpx.Client,
    op: Operation,
    names: dict[str, list[str]],
    seeds: dict[str, list],
    n: int,
) -> int:
    """``n`` hostile requests to one route of ``node``; how many were sent."""
    host = host_of(c.url(node, ""))
    sent = 0

    @_settings(n)
    @given(req=requests([op], names, seeds))
    def fuzz(req: FuzzRequest) -> None:
        nonlocal sent
        watch = node == "source" and req.op.method == "POST"
        before = _digests(c, node) if watch else None
        r = req.send(client, c.secret, host)
        sent += 1
        check_answer(req, r)
        if watch and r.status_code < 400:
            assert op.path not in STRICT, ("a broken body was accepted", r.status_code, r.text)
        if watch and r.status_code >= 400:
            assert _digests(c, node) == before, "a refused request moved the store"

    fuzz()
    return sent


def test_hostile_requests_into_every_documented_route(cluster: LocalCluster) -> None:
    c = cluster
    rss = _warm_rss(c)
    tables = sorted(_digests(c, "source"))
    names = {"model": ["ctr"], "table": tables}
    seeds = valid_bodies({"emb": 4}, NUM_DENSE, MODEL["num_sparse"])
    counts: dict[tuple[str, str, str], int] = {}
    for node in NODES:
        doc = httpx.get(c.url(node, "/openapi.json"), timeout=10).json()
        ops = operations(doc)
        with httpx.Client(base_url=c.url(node, ""), timeout=30) as client:
            for op in ops:
                n = _fuzz_route(c, node, client, op, names, seeds, max(3, EXAMPLES // 10))
                counts[(node, op.method, op.path)] = n
    assert all(counts.values()) and len(counts) > 30, counts  # every route of every node
    _healthy(c, rss)
    _write(c, [4])
    _converged(c)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]  # fmt: skip
KNOWN = {"model": "ctr", "table": "emb", "version": "1"}


def _drive(c: LocalCluster, node: str, client: httpx.Client, op, n: int) -> None:
    """``n`` schemathesis cases of ``op``, signed, each response checked against the document."""

    @_settings(n)
    @given(case=op.as_strategy(), known=st.booleans())
    def drive(case, known: bool) -> None:
        if known and case.path_parameters:
            case.path_parameters = {k: KNOWN[k] for k in case.path_parameters}
        kw = case.as_transport_kwargs(base_url=c.url(node, ""))
        body = json.dumps(kw["json"]).encode() if "json" in kw else kw.get("data")
        headers = {"content-type": "application/json"} if body is not None else {}
        r = client.request(case.method, kw["url"], params=kw.get("params"), content=body,
                           headers=headers)  # fmt: skip
        case.validate_response(r, checks=CHECKS)

    drive()


def test_schemathesis_drives_every_operation_of_the_openapi_document(
    cluster: LocalCluster,
) -> None:
    c = cluster
    rss = _warm_rss(c)
    auth = ClusterAuth(c.secret, AccessPolicy(serve_open=False))
    for node in NODES:
        schema = schemathesis.openapi.from_url(c.url(node, "/openapi.json"))
        with httpx.Client(base_url=c.url(node, ""), timeout=30, auth=auth) as client:
            for result in schema.get_all_operations():
                _drive(c, node, client, result.ok(), max(2, EXAMPLES // 40))
    _healthy(c, rss)
