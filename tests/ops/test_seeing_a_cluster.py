"""Seeing a running cluster (a source and a replica, the guard on a model, the scheduler on):
``/ui`` loaded in headless Chromium renders the figures ``/v1/status`` gives (rows, lag,
guard states) and draws per-DC latency and bytes per link; every metric the generated Grafana
dashboard queries is exported by a live node; the Prometheus config parses and names every
node. The browser test is skipped (saying so) only where Chromium is not installed; CI
installs it (``.ci/run``)."""

from __future__ import annotations

import asyncio
import html
import json
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ekko.node.config import ClusterConfig, load_config
from ekko.node.runner import NodeRunner
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.deploy import grafana_dashboard, write_deploy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MODEL = {"name": "ctr", "rows_per_table": 200, "embedding_dim": 4, "num_sparse": 2}


async def _until(cond, what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _config(tmp: Path) -> ClusterConfig:
    doc = cluster_doc(dcs=1, replicas=1, serve=True, models=[MODEL], tables=[("emb", 4, 4)],
                      sync={"snapshot_interval_s": 0, "failover_probe_s": 0.2})  # fmt: skip
    doc["guard"] = {"enabled": True}
    doc["scheduler"] = {"enabled": True}
    return load_config(write_cluster(doc, tmp / "cluster.toml"))


class Cluster:
    """A source and a replica in this process, sampled every 0.1 s, with a writer."""

    def __init__(self, cfg: ClusterConfig, base: Path) -> None:
        self.cfg = cfg
        self.source = NodeRunner(cfg, "source", base)
        self.replica = NodeRunner(cfg, "dc1-r0", base)
        for r in (self.source, self.replica):
            r.series.interval_s = 0.1
        assert self.replica.lag_probe is not None
        self.replica.lag_probe.interval_s = 0.05
        self.tasks: list[asyncio.Task] = []
        self.written = 0

    async def __aenter__(self) -> Cluster:
        self.tasks = [asyncio.create_task(r.run()) for r in (self.replica, self.source)]
        for r in (self.source, self.replica):
            await asyncio.wait_for(r.ready.wait(), 60)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for r in (self.source, self.replica):
            r.stop()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 60)

    async def write(self, batches: int, rows: int = 200) -> None:
        """Batches of rows at the source, one per sample, each awaited to the replica."""
        for _ in range(batches):
            keys = np.arange(self.written, self.written + rows, dtype=np.int64) % 5000
            self.source.core.write("emb", keys, np.ones((rows, 4), np.float32))
            self.written += rows
            await asyncio.sleep(0.1)  # the writer's pace: rows spread over samples

    def url(self, node: str, path: str) -> str:
        n = self.cfg.node(node)
        return f"http://{n.host}:{n.admin_port}{path}"


async def _chromium(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--hide-scrollbars", "--user-data-dir=" + args[0], *args[1:],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def _cell(dom: str, table: str, cls: str) -> str:
    row = re.search(rf'<tr data-table="{table}">(.*?)</tr>', dom, re.S)
    assert row is not None, f"no row of table {table} in the page"
    cell = re.search(rf'<td class="{cls}">([^<]*)</td>', row.group(1))
    assert cell is not None, f"no {cls} cell for {table}"
    return html.unescape(cell.group(1))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it)")
async def test_ui_in_a_browser_shows_the_figures_of_the_status(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    async with Cluster(cfg, tmp_path) as c:
        await c.write(8)
        await _until(lambda: c.replica.core.store.table("emb").rows == 1600, "replicated")
        lag = lambda: c.replica.lag_probe.lag()["emb"]  # noqa: E731
        await _until(lambda: lag().versions == 0 and lag().seconds == 0.0, "lag probed at 0")
        await _until(lambda: len(c.replica.series.samples) > 3, "samples")
        async with httpx.AsyncClient(timeout=10) as client:
            extra = c.replica._status_extra()
            status = c.replica.core.status() | extra
            dom_replica = await _chromium(
                str(tmp_path / "chrome-a"), "--virtual-time-budget=4000", "--dump-dom",
                c.url("dc1-r0", "/ui"),
            )  # fmt: skip
            dom_source = await _chromium(
                str(tmp_path / "chrome-b"), "--virtual-time-budget=4000", "--dump-dom",
                c.url("source", "/ui"),
            )  # fmt: skip
            assert (
                (await client.get(c.url("dc1-r0", "/ui")))
                .headers["content-type"]
                .startswith("text/html")
            )
    assert int(re.search(r'<body data-samples="(\d+)"', dom_replica).group(1)) > 0
    assert re.search(r'<b id="node">dc1-r0</b>', dom_replica)
    assert re.search(r'<span id="upstream">source</span>', dom_replica)
    rows = status["tables"]["emb"]["rows"]
    assert rows == 1600 and _cell(dom_replica, "emb", "rows") == str(rows)
    want_lag = status["replica_lag"]["tables"]["emb"]
    assert _cell(dom_replica, "emb", "lag-versions") == str(want_lag["versions"]) == "0"
    assert re.search(r'<li data-model="ctr" data-state="healthy">', dom_replica), "guard state"
    # per-DC latency and bytes per link are drawn (SVG lines with points)
    for dom, series in ((dom_replica, "dc1 p99"), (dom_source, "dc1 p99"),
                        (dom_replica, "source→dc1-r0")):  # fmt: skip
        line = re.search(rf'<polyline points="([^"]+)"[^>]*data-series="{series}"', dom)
        assert line is not None and len(line.group(1).split()) >= 2, f"no {series} line"
    assert _cell(dom_source, "emb", "rows") == str(rows)


async def test_the_dashboard_queries_metrics_a_live_node_exports(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    names: set[str] = set()
    async with Cluster(cfg, tmp_path) as c:
        await c.write(3)
        await _until(lambda: c.replica.core.latency.count > 0, "latency recorded")
        async with httpx.AsyncClient(timeout=10) as client:
            for node in ("source", "dc1-r0"):
                text = (await client.get(c.url(node, "/metrics"))).text
                for family in text_string_to_metric_families(text):
                    names.update(s.name for s in family.samples)
            series = c.url("source", "/v1/ui/series")
            bad = await client.get(series, params={"since": "soon"})
            assert bad.status_code == 400 and "since" in bad.json()["error"]
            doc = (await client.get(series)).json()
            assert doc["now"]["node"] == "source" and len(doc["samples"]) >= 2
            t = doc["samples"][-2]["t"]
            newer = (await client.get(series, params={"since": t})).json()["samples"]
            assert newer and all(x["t"] > t for x in newer)
    exprs = [t["expr"] for p in grafana_dashboard(cfg)["panels"] for t in p["targets"]]
    no_labels = [re.sub(r"\bby \([^)]*\)", "", e) for e in exprs]  # `by (ekko_node)`: labels
    used = {m for e in no_labels for m in re.findall(r"\bekko_[a-z_]+", e)}
    assert len(used) >= 10
    assert sorted(used - names) == []


def test_the_prometheus_config_parses_and_names_every_node(tmp_path: Path) -> None:
    for tls in (False, True):
        doc = cluster_doc(dcs=2, replicas=2, tls=tls)
        base = tmp_path / f"tls-{tls}"
        cfg = load_config(write_cluster(doc, base / "cluster.toml"))
        prom, dash = write_deploy(cfg, base)
        parsed = yaml.safe_load(prom.read_text())
        targets = {
            t: (sc["labels"]["ekko_node"], job)
            for job in parsed["scrape_configs"]
            for sc in job["static_configs"]
            for t in sc["targets"]
        }
        want = {f"{n.host}:{n.admin_port}": n.name for n in cfg.nodes}
        assert {t: name for t, (name, _) in targets.items()} == want
        for job in parsed["scrape_configs"]:
            assert job["metrics_path"] == "/metrics"
            assert job["scheme"] == ("https" if tls else "http")
            if tls:  # each node's certificate is checked by its name, with the cluster CA
                node = job["static_configs"][0]["labels"]["ekko_node"]
                assert job["tls_config"]["server_name"] == node
                assert (prom.parent / job["tls_config"]["ca_file"]).resolve() == (
                    base / "tls" / "ca.crt"
                ).resolve()
        assert json.loads(dash.read_text())["panels"]
