"""Watching a running cluster: per-DC update latency and row rates from the admin APIs."""

from __future__ import annotations

import threading
import time

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table as RichTable

from ekko.ops.launcher import LocalCluster
from ekko.quality.latency import LatencyHistogram


def node_latency(cluster: LocalCluster, name: str) -> LatencyHistogram:
    return LatencyHistogram.from_dict(cluster.get(name, "/v1/latency"))


def reset_latency(cluster: LocalCluster) -> None:
    with cluster.http.client(timeout=10, auth=cluster.auth) as client:
        for n in cluster.config.nodes:
            if n.name != cluster.config.source.name:
                client.post(cluster.url(n.name, "/v1/latency/reset"))


def per_dc(cluster: LocalCluster) -> list[dict]:
    """Latency per inference DC: all replicas merged, and the followers alone."""
    cfg = cluster.config
    out = []
    for dc in cfg.dcs:
        if dc.training or not cfg.dc_nodes(dc.name):
            continue
        merged, followers = LatencyHistogram(), LatencyHistogram()
        for n in cfg.dc_nodes(dc.name):
            h = node_latency(cluster, n.name)
            merged.merge(h)
            if cfg.role(n.name) == "follower":
                followers.merge(h)
        wan = cfg.wan(cfg.dc_nodes(dc.name)[0].name, cfg.source.name)
        out.append(
            {
                "dc": dc.name,
                "one_way_delay_ms": wan.delay_ms if wan else 0.0,
                "p50_ms": merged.quantile(0.5),
                "p99_ms": merged.quantile(0.99),
                "followers_p99_ms": followers.quantile(0.99),
                "rows": merged.count,
            }
        )
    return out


def _rows_total(cluster: LocalCluster) -> dict[str, int]:
    out = {}
    for dc in cluster.config.dcs:
        if dc.training or not cluster.config.dc_nodes(dc.name):
            continue
        leader = cluster.config.dc_nodes(dc.name)[0].name
        try:
            status = cluster.get(leader, "/v1/status", timeout=2)
            out[dc.name] = sum(link["rows"] for link in status["links"].values())
        except httpx.HTTPError:
            out[dc.name] = 0
    return out


def watch(
    cluster: LocalCluster,
    stop: threading.Event,
    *,
    duration: float | None,
    every: float,
    console: Console,
) -> dict:
    """Refresh a live table until ``stop`` or ``duration``; return the last per-DC figures."""
    started = time.monotonic()
    last_rows, last_t = _rows_total(cluster), time.monotonic()
    rates: dict[str, float] = {}
    rows: list[dict] = []
    with Live(console=console, refresh_per_second=4) as live:
        while not stop.is_set():
            if duration is not None and time.monotonic() - started >= duration:
                break
            stop.wait(every)
            try:
                rows = per_dc(cluster)
            except httpx.HTTPError:
                continue
            now_rows, now_t = _rows_total(cluster), time.monotonic()
            for dc, total in now_rows.items():
                rates[dc] = (total - last_rows.get(dc, 0)) / max(1e-9, now_t - last_t)
            last_rows, last_t = now_rows, now_t
            t = RichTable(title=f"ekko cluster · {time.monotonic() - started:.0f}s")
            for col in ("dc", "one-way ms", "p50 ms", "p99 ms", "followers p99", "WAN rows/s"):
                t.add_column(col)
            for r in rows:
                t.add_row(
                    r["dc"],
                    f"{r['one_way_delay_ms']:.0f}",
                    f"{r['p50_ms']:.1f}",
                    f"{r['p99_ms']:.1f}",
                    f"{r['followers_p99_ms']:.1f}",
                    f"{rates.get(r['dc'], 0):.0f}",
                )
            live.update(t)
    for r in rows:
        r["rows_per_s"] = rates.get(r["dc"], 0.0)
    return {"per_dc": rows}
