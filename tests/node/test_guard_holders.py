"""The partitioned guard's wiring at a non-source node (``ekko.node.guard_holders``): a
serving holder gets a lagged store, a ``HolderGuard`` and a ``ScatterReplicaGuard`` whose
baseline scatter reads its own lagged store for its partition and the DC's other holder's
for the other; the coordinator's messages 3/5/7/8 reach them by route, out of order, stale
or malformed, and only the right ones move anything. Sources get none of it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from ekko.guard.scatter_guard import ScatterReplicaGuard
from ekko.net.httpkit import bounded_app
from ekko.node.config import load_config
from ekko.node.core import NodeCore
from ekko.node.http_client import ClusterHttp
from ekko.node.models import ModelHost
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.serve.scatter_http import LOCAL
from ekko.store.clock import FakeClock
from ekko.store.spec import TableSpec

MODEL = {"name": "ctr", "rows_per_table": 1000, "embedding_dim": 4, "baseline_lag_s": 5.0}


def _config(tmp_path: Path):
    doc = cluster_doc(dcs=1, replicas=1, partitions=2, serve=True, models=[MODEL], tables=[])
    doc["guard"] = {"enabled": True}
    return load_config(write_cluster(doc, tmp_path / "cluster.toml"))


def _host(cfg, name: str, tmp_path: Path, sent: list) -> ModelHost:
    core = NodeCore(cfg, name, tmp_path / name)
    http = ClusterHttp(cfg, tmp_path)
    send = lambda target, path, body: sent.append((target, path, body))  # noqa: E731
    return ModelHost(core, send, FakeClock(), http=http, secret=b"s" * 32)


def test_sources_get_no_holder_parts_and_a_serving_holder_gets_both(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert _host(cfg, "source-p1", tmp_path, []).holders is None
    host = _host(cfg, "dc1-p0-r0", tmp_path, [])
    assert host.holders is not None and host.lagged is not None
    assert host.baseline_store() is host.lagged.store
    guard = host.replica_guards["ctr"]
    assert isinstance(guard, ScatterReplicaGuard)
    assert host.holders.holders["ctr"].held == (0,)
    rows = host.holders.rows
    assert rows is not None and rows.holders[0] == [LOCAL]
    assert rows.holders[1] == [ClusterHttp(cfg, tmp_path).url("dc1-p1-r0")]  # not source-p1
    assert host.services["ctr"].variants == ["online", "baseline"]


async def test_the_coordinators_messages_reach_the_holder_and_the_serving_guard(
    tmp_path: Path,
) -> None:
    cfg = _config(tmp_path)
    sent: list = []
    host = _host(cfg, "dc1-p0-r0", tmp_path, sent)
    host.core.store.create_table(TableSpec("ctr/emb", 4, 8))
    holder, serving = host.holders.holders["ctr"], host.replica_guards["ctr"]
    lagged = host.lagged
    zeros = np.zeros_like(host.core.store.table("ctr/emb").knowledge).tolist()
    app = bounded_app(host.routes(1 << 20))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://n") as c:
        url = "/v1/models/ctr/guard"
        # 7 before 5: kept, traffic stays on the baseline
        r = await c.post(f"{url}/redirect", json={"why": "poison", "epoch": 0, "automatic": True})
        assert r.status_code == 200 and lagged.frozen and serving.router.redirected
        r = await c.post(f"{url}/holders_restored", json={"epoch": 0})
        assert r.status_code == 200 and serving.router.redirected
        # a watermark of the wrong shape: 400 naming the table, nothing moves
        bad = {"healthy_wall": 1.0, "epoch": 0, "watermark": {"ctr/emb": [[0, 0]]}}
        r = await c.post(f"{url}/rolled_back", json=bad)
        assert r.status_code == 400 and "ctr/emb" in r.text and "8 shards" in r.text, r.text
        assert holder.epoch == 0 and serving.restore_pending is None
        r = await c.post(f"{url}/rolled_back", json={**bad, "watermark": {"ctr/emb": [1, 2]}})
        assert r.status_code == 400 and "watermark" in r.text, r.text
        # 8 before the restore is here: the baseline stays frozen
        r = await c.post(f"{url}/healthy", json={"epoch": 0})
        assert r.status_code == 200 and r.json()["frozen"] is True
        good = {**bad, "watermark": {"ctr/emb": zeros}, "partitions": {"0": "source-p0"}}
        r = await c.post(f"{url}/rolled_back", json=good)
        assert r.status_code == 200 and r.json()["stale"] is False
        # covered at once (zeros): reported to the coordinator, released, traffic online
        [(target, path, body)] = [s for s in sent if s[1].endswith("/restored")]
        assert (target, path) == ("source-p0", "/v1/models/ctr/guard/restored")
        assert body["epoch"] == 0 and list(body["digests"]["ctr/emb"]) == ["0"]
        assert not lagged.frozen and not serving.router.redirected
        # incident 0's messages again: stale, said so, nothing moves
        r = await c.post(f"{url}/redirect", json={"why": "late", "epoch": 0})
        assert r.json()["stale"] is True and not lagged.frozen
        r = await c.post(f"{url}/rolled_back", json=good)
        assert r.json()["stale"] is True and len([s for s in sent if "restored" in s[1]]) == 1
        health = (await c.get("/v1/models/ctr/health")).json()
        assert health["holder"]["stale_messages"] == 2 and health["holder"]["epoch"] == 1
        assert health["scattered"] is True and health["restore_pending"] is False
        r = await c.post("/v1/models/nope/guard/healthy", json={"epoch": 0})
        assert r.status_code == 404
    families = {m.name: m for m in host.holders.collector()()}
    assert families["ekko_holder_restores_reported"].samples[0].value == 1
    assert families["ekko_holder_stale_messages"].samples[0].value == 2
    await host.close()


def test_a_holder_that_does_not_serve_shows_its_baseline_in_the_guard_view(
    tmp_path: Path,
) -> None:
    doc = cluster_doc(dcs=1, replicas=1, partitions=2, serve=True, models=[MODEL], tables=[])
    doc["guard"] = {"enabled": True}
    for node in doc["nodes"]:
        node["serve"] = node["name"] == "dc1-p1-r0"  # a source may not serve guarded
    cfg = load_config(write_cluster(doc, tmp_path / "cluster.toml"))
    host = _host(cfg, "dc1-p0-r0", tmp_path, [])
    assert not host.replica_guards and host.holders is not None and host.holders.rows is None
    assert host.guard_view() == {"ctr": {"state": "holder live", "incidents": []}}
    host.holders.holders["ctr"].redirect("poison", 0)
    assert host.guard_view()["ctr"]["state"] == "holder frozen"


async def test_a_failed_question_to_the_coordinator_is_logged_and_counted_not_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A restarted holder asks the coordinator's health page under the node's supervisor: an
    answer it cannot read (here a KeyError from the holder) is a logged, counted failure of
    ``guard_holder_ask`` (it was a bare task whose exception nobody retrieved), and the next
    interval asks again."""
    from ekko.guard.baseline import LaggedStore
    from ekko.node.guard_holders import GuardHolders
    from ekko.node.supervisor import Supervisor

    class Restarted:
        ask_coordinator = True

        def coordinator_says(self, health: dict) -> None:
            raise KeyError("incident")

    asked: list[str] = []

    async def ask(model: str) -> dict:
        asked.append(model)
        return {"state": "healthy"}

    sup = Supervisor()
    parts = GuardHolders(LaggedStore(1.0), {"ctr": Restarted()}, None, ask, sup.spawn)
    with caplog.at_level("ERROR"):
        parts.tick()
        assert parts._asking is not None
        await asyncio.gather(parts._asking, return_exceptions=True)
    assert sup.tasks["guard_holder_ask"].failures == 1
    assert "KeyError" in str(sup.tasks["guard_holder_ask"].last_error)
    assert "task guard_holder_ask failed" in caplog.text
    parts.tick()  # asked again
    await asyncio.gather(parts._asking, return_exceptions=True)
    assert asked == ["ctr", "ctr"] and sup.tasks["guard_holder_ask"].failures == 2
