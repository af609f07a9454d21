"""One measured run of a real local cluster: start, warm up, measure, stop.

Shared by the latency and ablation benches so both measure the same way: per-DC latency
histograms from every replica's admin API, merged; CPU seconds of the source process.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster
from ekko.ops.live import per_dc, reset_latency


@dataclass(frozen=True)
class RunSpec:
    dcs: int = 3
    replicas: int = 2
    wan_delay_ms: tuple[float, ...] = (25.0, 50.0, 100.0)
    dim: int = 32
    shards: int = 16
    rate: float = 100_000.0
    batch_ms: float = 10.0
    key_space: int = 1_000_000
    prefill: int = 0
    warm_s: float = 5.0
    measure_s: float = 10.0
    sync: tuple[tuple[str, Any], ...] = ()
    durability: tuple[tuple[str, Any], ...] = ()  # the source's [durability] (wal on/off)
    tls: bool = False  # every port over TLS (ekko cluster init --tls)


def run_cluster(spec: RunSpec, progress=None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ekko-bench-") as tmp:
        doc = cluster_doc(
            dcs=spec.dcs,
            replicas=spec.replicas,
            wan_delay_ms=list(spec.wan_delay_ms),
            tables=[("emb", spec.dim, spec.shards)],
            sync={"snapshot_interval_s": 0, **dict(spec.sync)},
            tls=spec.tls,
        )
        if spec.durability:
            doc["durability"] = dict(spec.durability)
        path = write_cluster(doc, Path(tmp) / "cluster.toml")
        writer = [
            "--writer-rate",
            str(spec.rate),
            "--writer-batch-ms",
            str(spec.batch_ms),
            "--writer-key-space",
            str(spec.key_space),
        ]
        if spec.prefill:
            writer += ["--writer-prefill", str(spec.prefill)]
        cluster = LocalCluster(path, writer_args=writer)
        try:
            cluster.start(timeout=120)
            _wait(spec.warm_s, progress, "warm-up")
            catch_up_s = _wait_caught_up(cluster, spec.prefill, progress)
            reset_latency(cluster)
            src = psutil.Process(cluster.procs["source"].proc.pid)
            cpu0, rows0 = _cpu(src), _writer_rows(cluster)
            t0 = time.monotonic()
            _wait(spec.measure_s, progress, "measure")
            elapsed = time.monotonic() - t0
            cpu1, rows1 = _cpu(src), _writer_rows(cluster)
            dcs = per_dc(cluster)
            machine_cpu = psutil.cpu_percent(interval=None)
        finally:
            cluster.stop_all()
    return {
        "per_dc": dcs,
        "source_cpu_s": cpu1 - cpu0,
        "measure_s": elapsed,
        "rate_rows_per_s": (rows1 - rows0) / elapsed,
        "machine_cpu_percent": machine_cpu,
        "catch_up_s": catch_up_s,
    }


def _wait_caught_up(cluster: LocalCluster, prefill: int, progress, limit_s: float = 300) -> float:
    """Seconds until every replica holds every row the source held when the wait began (the
    prefill and what the writer added since): latency is measured in steady state, not while
    replicas still copy the initial table."""
    t0 = time.monotonic()
    names = [n for n in cluster.procs if n != "source"]
    target = max(prefill, _rows(cluster, "source")) if prefill else 0
    while prefill and time.monotonic() - t0 < limit_s:
        behind = [n for n in names if _rows(cluster, n) < target]
        if not behind:
            break
        if progress is not None:
            progress(f"catch-up ({len(behind)} behind)", limit_s - (time.monotonic() - t0))
        time.sleep(0.5)
    return time.monotonic() - t0


def _rows(cluster: LocalCluster, name: str) -> int:
    tables = cluster.get(name, "/v1/status", timeout=60)["tables"]
    return int(tables.get("emb", {}).get("rows", 0))  # absent until the first catalog


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _writer_rows(cluster: LocalCluster) -> int:
    # Generous timeout: a source busy serving a prefilled catch-up answers status late.
    return int(cluster.get("source", "/v1/status", timeout=60).get("writer_rows", 0))


def _wait(seconds: float, progress, label: str) -> None:
    # Benches pace wall-clock phases on purpose: the cluster runs while we wait.
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if progress is not None:
            progress(label, left)
        time.sleep(min(1.0, left))
