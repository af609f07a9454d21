"""The node's one exporter: a scrape of /metrics shows the scheduler, the pacing of a WAN
session and the puller beside the families that existed before (same names, same labels)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from ekko.node.config import load_config
from ekko.node.runner import NodeRunner
from ekko.ops.cluster_init import cluster_doc, write_cluster

ROWS = 300
KEYS = ("lane", "link", "session", "task")  # the labels told apart here (node, dc, role are one)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            kept = {k: v for k, v in s.labels.items() if k in KEYS}
            labels = tuple(sorted(kept.items()))
            out[(s.name, labels)] = s.value
    return out


async def _scrape_until(url: str, done, deadline_s: float = 30.0) -> dict:
    """Scrape ``url`` until ``done(samples)`` holds (polled; no fixed wait)."""
    deadline = time.monotonic() + deadline_s
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            samples = _samples((await client.get(url)).text)
            if done(samples) or time.monotonic() > deadline:
                return samples
            await asyncio.sleep(0.05)


async def test_a_scrape_shows_the_scheduler_the_pacing_and_the_puller(tmp_path: Path) -> None:
    doc = cluster_doc(dcs=1, replicas=1, wan_mbit=100, tables=[("emb", 4, 2)],
                      sync={"snapshot_interval_s": 0, "pace_wan": True})  # fmt: skip
    doc["scheduler"] = {"enabled": True}
    cfg = load_config(write_cluster(doc, tmp_path / "cluster.toml"))
    source, replica = NodeRunner(cfg, "source", tmp_path), NodeRunner(cfg, "dc1-r0", tmp_path)
    tasks = [asyncio.create_task(r.run()) for r in (source, replica)]
    try:
        await asyncio.wait_for(source.ready.wait(), 30)
        await asyncio.wait_for(replica.ready.wait(), 30)
        keys = np.arange(ROWS, dtype=np.int64)
        source.core.write("emb", keys, np.ones((ROWS, 4), np.float32))
        source.notify_written()

        def url(node: str) -> str:
            n = cfg.node(node)
            return f"http://{n.host}:{n.admin_port}/metrics"

        link = (("link", "source"),)
        rep = await _scrape_until(
            url("dc1-r0"), lambda s: s.get(("ekko_pulled_rows_total", link), 0) >= ROWS
        )
        assert rep[("ekko_pulled_rows_total", link)] == ROWS  # a family that existed before
        assert rep[("ekko_puller_pending_chunks", link)] == 0  # nothing held: all arrived
        assert rep[("ekko_puller_resyncs_total", link)] >= 0
        assert rep[("ekko_puller_gaps_total", link)] >= 0
        assert any(name == "ekko_task_up" for name, _ in rep)

        def paced(s: dict) -> bool:
            return any(n == "ekko_pacer_sent_bytes_total" and v > 0 for (n, _), v in s.items())

        src = await _scrape_until(url("source"), paced)
        lanes = {
            dict(lb)["lane"]: v for (n, lb), v in src.items() if n == "ekko_scheduler_rows_total"
        }
        assert set(lanes) == {"high", "low", "new"}
        assert sum(lanes.values()) == ROWS and lanes["new"] == ROWS  # every key was new
        assert ("ekko_scheduler_threshold", ()) in src
        assert src[("ekko_scheduler_deferred_rows", ())] == 0
        assert src[("ekko_scheduler_deferrals_total", ())] == 0
        (session,) = {
            dict(lb)["session"] for (n, lb), _ in src.items() if n == "ekko_pacer_rate_bytes"
        }
        at = (("session", session),)
        # 90 % of the link's 100 Mbit/s (sync_host.PACE_SHARE), in bytes/s
        assert src[("ekko_pacer_rate_bytes", at)] == 0.9 * 100e6 / 8
        assert src[("ekko_pacer_sent_bytes_total", at)] > 0
        assert ("ekko_pacer_tokens_bytes", at) in src and ("ekko_pacer_queued_bytes", at) in src
        assert src[("ekko_served_rows_total", ())] == ROWS  # a family that existed before
    finally:
        for r in (replica, source):
            r.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


def test_the_scatter_collector_exports_merged_and_expired_queued_lookups() -> None:
    from ekko.node.metrics import scatter_metrics

    collect = scatter_metrics("n1", list, lambda: (7, 5, 2))
    got = {m.name: m.samples[0].value for m in collect() if m.samples}
    assert got == {
        "ekko_scatter_scatters": 7,
        "ekko_scatter_lookups_merged": 5,
        "ekko_scatter_lookups_expired_queued": 2,
    }
