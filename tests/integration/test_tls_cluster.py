"""A cluster over TLS (``ekko cluster init --tls``), as real processes: it converges, its
admin, serving and guard routes answer over https (node to node too, and to ``ekko
rollback``), and a node holding a certificate from another CA — and the cluster secret — is
refused on the sync port both as a server (its would-be followers fail over, the source's
recovery skips it) and as a client, with a log line saying why; the cluster carries on."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cluster_checks import digests, until

from ekko.client import Client
from ekko.net.connection import Connection
from ekko.net.errors import AuthError
from ekko.net.tls import TlsFiles
from ekko.net.transport import Listener, connect, serve
from ekko.node.sync_host import SYNC_SCHEMA
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.cluster_tls import Authority, write_private
from ekko.ops.launcher import LocalCluster

pytestmark = pytest.mark.integration

DIM = 8
MODEL = {"name": "ctr", "rows_per_table": 1000, "embedding_dim": 8, "dense_interval_s": 1.0}


class Rogue:
    """A would-be node ``dc1-r0`` in this process: the cluster secret and the name, but a
    certificate from another CA (it trusts the cluster's, which is public)."""

    def __init__(self, base: Path, secret: bytes) -> None:
        cert, key = Authority.create("rogue").issue("dc1-r0")
        (base / "rogue.crt").write_bytes(cert)
        write_private(base / "rogue.key", key)
        self.files = TlsFiles(base / "tls" / "ca.crt", base / "rogue.crt", base / "rogue.key")
        self.secret = secret
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def listen(self, port: int) -> Listener:
        async def never(conn: Connection) -> None:
            raise AssertionError("a cluster node completed a handshake with the rogue")

        return await serve(
            "127.0.0.1", port, node="dc1-r0", secret=self.secret, schema=SYNC_SCHEMA,
            on_connection=never, tls=self.files.server_context(client_certs=True),
        )  # fmt: skip

    async def dial(self, port: int) -> str:
        try:
            conn = await connect(
                "127.0.0.1", port, node="dc1-r0", secret=self.secret, schema=SYNC_SCHEMA,
                tls=self.files.client_context(), server_name="source",
            )  # fmt: skip
        except AuthError as exc:
            return str(exc)
        await conn.close()
        raise AssertionError("the source accepted a certificate from another CA")

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def _write(cluster: LocalCluster, rng: np.random.Generator, batches: int) -> None:
    for _ in range(batches):
        keys = rng.integers(0, 5_000, 200).tolist()
        values = rng.standard_normal((200, DIM)).round(4).tolist()
        r = cluster.post("source", "/v1/tables/emb/rows", {"keys": keys, "values": values})
        assert r.status_code == 200, r.text


def _write_stream(config: Path, rng: np.random.Generator, batches: int) -> None:
    with Client.from_config(config) as client, client.write_stream(window=4) as stream:
        for _ in range(batches):
            keys = rng.choice(5_000, 200, replace=False).astype(np.int64)
            stream.send("emb", keys, rng.standard_normal((200, DIM)).astype(np.float32))
        assert stream.drain() > 0 and stream.acked_rows == 200 * batches


def _converged(cluster: LocalCluster, names: list[str]) -> bool:
    want = digests(cluster, "source")
    return all(digests(cluster, n) == want for n in names)


def _log(cluster: LocalCluster, name: str) -> str:
    return cluster.procs[name].log_path.read_text(errors="replace")


def test_a_tls_cluster_converges_serves_https_and_refuses_another_ca(tmp_path: Path) -> None:
    doc = cluster_doc(
        dcs=1, replicas=2, tls=True, serve=True, models=[MODEL], tables=[("emb", DIM, 4)],
        sync={"snapshot_interval_s": 0, "failover_probe_s": 0.5},
    )  # fmt: skip
    doc["guard"] = {"enabled": True}
    doc["durability"] = {"recovery_timeout_s": 2.0}  # the source's recovery meets the rogue
    config = write_cluster(doc, tmp_path / "cluster.toml")
    cluster = LocalCluster(config)
    rogue = Rogue(tmp_path, cluster.secret)
    leader = cluster.config.node("dc1-r0")
    source = cluster.config.node("source")
    try:
        listener = rogue.run(rogue.listen(leader.sync_port))
        cluster.start(["source", "dc1-r1"], timeout=120)
        # As a client: the source refuses the rogue's certificate, whatever secret it holds.
        said = rogue.run(rogue.dial(source.sync_port))
        assert "refused our TLS certificate" in said, said
        until(
            "the source's log line refusing the rogue",
            lambda: "TLS handshake failed: certificate verify failed" in _log(cluster, "source"),
        )
        # As a server: the follower (and the recovering source) refuse it, and the follower
        # pulls from the source instead.
        rng = np.random.default_rng(3)
        _write(cluster, rng, 10)
        until("dc1-r1 converged past the rogue", lambda: _converged(cluster, ["dc1-r1"]))
        refused = "upstream dc1-r0 refused: TLS handshake with"
        for name in ("dc1-r1", "source"):
            assert refused in _log(cluster, name) and "not signed by the cluster CA" in _log(
                cluster, name
            ), name
        assert rogue.run(_authenticated(listener)) == 0

        # The real dc1-r0 takes its port; the whole cluster converges over TLS.
        rogue.run(listener.aclose())
        cluster.start(["dc1-r0"], timeout=120)
        _write(cluster, rng, 10)
        _write_stream(config, rng, 10)  # a write stream upgrades over the source's https
        until("every node converged", lambda: _converged(cluster, ["dc1-r0", "dc1-r1"]), 60)
        until(
            "dc1-r1 back on its leader",
            lambda: cluster.get("dc1-r1", "/v1/status").get("upstream") == "dc1-r0",
        )
        _https_routes(cluster)
        _rollback_through_the_cli(cluster, config)
    finally:
        rogue.close()
        cluster.stop_all()


async def _authenticated(listener: Listener) -> int:
    return listener.stats.authenticated


def _https_routes(cluster: LocalCluster) -> None:
    assert cluster.url("dc1-r0", "/v1/status").startswith("https://")
    status = cluster.get("dc1-r0", "/v1/status")  # admin, signed, over https
    assert status["tables"]["emb"]["rows"] > 0
    probe = {"dense": [[0.0] * 13], "sparse": [[0] * 26]}
    r = until(
        "a replica serving predict over https",
        lambda: (
            (p := cluster.post("dc1-r1", "/v1/models/ctr/predict", probe)).status_code == 200 and p
        ),
    )
    (prediction,) = r.json()["predictions"]
    assert 0.0 <= prediction["ctr"] <= 1.0
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP gets no answer from a TLS port
        httpx.get(cluster.url("dc1-r0", "/health").replace("https://", "http://"), timeout=5)


def _rollback_through_the_cli(cluster: LocalCluster, config: Path) -> None:
    """``ekko rollback`` reaches the source over https, and the source's guard messages
    reach the replicas and their answers the source (node to node, https)."""
    health = lambda: cluster.get("source", "/v1/models/ctr/health")  # noqa: E731
    earliest = until(
        "the source guard recording",
        lambda: health()["preimages"]["earliest_restorable"],
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ekko", "rollback", "ctr", "--config", str(config),
         "--to", str(earliest + 0.1), "--why", "tls test"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["why"] == "tls test"
    until(
        "both replicas restored (guard messages over https)",
        lambda: (inc := health()["incidents"]) and {"dc1-r0", "dc1-r1"} <= set(inc[-1]["restored"]),
        deadline_s=30,
    )
    for name in ("source", "dc1-r0", "dc1-r1"):
        assert "dropped after" not in _log(cluster, name), name
