"""Watching a running cluster: per-DC update latency and row rates from the admin APIs."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table as RichTable
from rich.text import Text

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


def guard_lines(cluster: LocalCluster) -> list[str]:
    """One line per model the guard watches: its state at the source and its incidents
    (the operator sees a detection and a rollback as they happen, not in a log)."""
    cfg = cluster.config
    if not cfg.guard.enabled:
        return []
    out = []
    for m in cfg.models:
        try:
            h = cluster.get(cfg.source.name, f"/v1/models/{m.name}/health", timeout=2)
        except httpx.HTTPError as exc:
            out.append(f"guard {m.name}: health unavailable ({exc})")
            continue
        line = f"guard {m.name}: {h['state']}"
        if h.get("training_paused"):
            line += ", training paused"
        if h.get("incident"):
            line += f"; rolling back now: {h['incident']['why']}"
        done = h.get("incidents") or []
        if done:
            last = done[-1]
            line += (
                f"; {len(done)} incident(s), last: {last['why']} "
                f"({last['rows_restored']} rows restored)"
            )
        out.append(line)
    return out


def watch(
    cluster: LocalCluster,
    stop: threading.Event,
    *,
    duration: float | None,
    every: float,
    console: Console,
) -> dict:
    """Show the cluster every ``every`` seconds until ``stop`` or ``duration``: a live table
    on a terminal, else a line per interval (a log file gets each, not only the last frame).
    Returns the last per-DC figures."""
    started = time.monotonic()
    last_rows, last_t = _rows_total(cluster), time.monotonic()
    rates: dict[str, float] = {}
    rows: list[dict] = []
    live = Live(console=console, refresh_per_second=4)
    gone: set[str] = set()
    with live if console.is_terminal else contextlib.nullcontext():
        while not stop.is_set():
            if duration is not None and time.monotonic() - started >= duration:
                break
            stop.wait(every)
            for p in cluster.procs.values():
                if p.name not in gone and not p.alive:  # said once, above the live view
                    gone.add(p.name)
                    console.print(p.exit_line(), markup=False, highlight=False, soft_wrap=True)
            try:
                rows = per_dc(cluster)
            except httpx.HTTPError:
                continue
            now_rows, now_t = _rows_total(cluster), time.monotonic()
            for dc, total in now_rows.items():
                rates[dc] = (total - last_rows.get(dc, 0)) / max(1e-9, now_t - last_t)
            last_rows, last_t = now_rows, now_t
            guard = guard_lines(cluster)
            elapsed = time.monotonic() - started
            if console.is_terminal:
                live.update(Group(_table(rows, rates, elapsed), *(Text(g) for g in guard)))
            else:
                line = _line(rows, rates, elapsed, guard)
                console.print(line, markup=False, highlight=False, soft_wrap=True)
    for r in rows:
        r["rows_per_s"] = rates.get(r["dc"], 0.0)
    return {"per_dc": rows}


def _table(rows: list[dict], rates: dict[str, float], elapsed: float) -> RichTable:
    t = RichTable(title=f"ekko cluster · {elapsed:.0f}s · update latency since start")
    for col in ("dc", "one-way ms", "p50 ms", "p99 ms", "followers p99", "WAN rows/s"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["dc"],
            f"{r['one_way_delay_ms']:.0f}",
            _ms(r["p50_ms"]),
            _ms(r["p99_ms"]),
            _ms(r["followers_p99_ms"]),
            f"{rates.get(r['dc'], 0):.0f}",
        )
    return t


def _line(rows: list[dict], rates: dict[str, float], elapsed: float, guard: list[str]) -> str:
    cells = [
        f"{r['dc']} p50 {_ms(r['p50_ms'])} p99 {_ms(r['p99_ms'])} ms "
        f"{rates.get(r['dc'], 0):.0f} rows/s"
        for r in rows
    ]
    return " | ".join([f"{elapsed:.0f}s update latency since start", *cells, *guard])


def _ms(x: float) -> str:
    """A latency quantile, or "-" while no row arrived (NaN)."""
    return "-" if x != x else f"{x:.1f}"


def print_summary(summary: dict) -> None:
    """``ekko up``'s closing table: update latency per DC over the whole run."""
    t = RichTable(title="update latency per DC (write at source → applied)")
    for col in ("dc", "one-way ms", "p50 ms", "p99 ms", "WAN rows/s"):
        t.add_column(col)
    for row in summary.get("per_dc", []):
        t.add_row(
            row["dc"],
            f"{row['one_way_delay_ms']:.0f}",
            _ms(row["p50_ms"]),
            _ms(row["p99_ms"]),
            f"{row['rows_per_s']:.0f}",
        )
    Console().print(t)
