"""The demo's PNG: online AUC over time (Ekko replicas vs the checkpoint replica) and the
update-latency CDF per data centre."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ekko.node.config import ClusterConfig
from ekko.quality.latency import LatencyHistogram


def write_png(
    path: Path,
    timeline: list[dict[str, Any]],
    hists: dict[str, LatencyHistogram],
    config: ClusterConfig,
) -> Path:
    fig = Figure(figsize=(12, 4.5))
    ax = fig.add_subplot(1, 2, 1)
    names = list(timeline[0]["auc"]) if timeline else []
    for name in names:
        t = [p["t"] for p in timeline]
        auc = [np.nan if p["auc"].get(name) is None else p["auc"][name] for p in timeline]
        node = config.node(name)
        label = f"{node.dc}/{name}"
        if node.refresh == "checkpoint":
            label += f" (full copy every {node.checkpoint_interval_s:.0f} s)"
            ax.plot(t, auc, "k--", label=label)
        else:
            ax.plot(t, auc, label=label)
    ax.set_xlabel("seconds")
    ax.set_ylabel("online AUC per interval (predicted before training)")
    ax.set_title("Online AUC: Ekko replicas vs a checkpoint replica")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    edges = LatencyHistogram.edges_ms
    for name, h in hists.items():
        if h.count == 0:
            continue
        cdf = np.cumsum(h.counts[:-1]) / h.count
        ax.plot(edges[1:], cdf, label=f"{config.node(name).dc}/{name}")
    ax.set_xscale("log")
    ax.set_xlim(5, 2000)
    ax.set_xlabel("update latency, ms (written at source → applied at replica)")
    ax.set_ylabel("fraction of row updates")
    ax.set_title("Update latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
