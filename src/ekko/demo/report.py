"""The demo's PNG: online AUC over time (Ekko replicas vs the checkpoint replica) and the
update-latency CDF per data centre."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ekko.node.config import ClusterConfig
from ekko.quality.latency import LatencyHistogram

_EKKO_STYLES = (("o", "-"), ("s", "--"), ("^", ":"))


def write_png(
    path: Path,
    timeline: list[dict[str, Any]],
    hists: dict[str, LatencyHistogram],
    config: ClusterConfig,
    marks: dict[str, Any] | None = None,
) -> Path:
    """``marks`` (seconds of the run): ``checkpoint_loads``, ``poison`` ([from, to]),
    ``detected``, ``rolled_back``, ``restored`` (every replica or holder holds the restore)
    and ``training_resumes`` (a quarantine's end), drawn on the AUC plot."""
    marks = marks or {}
    fig = Figure(figsize=(13, 5))
    ax = fig.add_subplot(1, 2, 1)
    names = list(timeline[0]["auc"]) if timeline else []
    t = [p["t"] for p in timeline]
    ekko = 0
    for name in names:
        auc = [np.nan if p["auc"].get(name) is None else p["auc"][name] for p in timeline]
        node = config.node(name)
        label = f"{node.dc}/{name}"
        if node.refresh == "checkpoint":
            label += f" (full copy every {node.checkpoint_interval_s:.0f} s)"
            ax.plot(t, auc, "k-", lw=2, label=label)
        else:
            marker, style = _EKKO_STYLES[ekko % len(_EKKO_STYLES)]
            ekko += 1
            ax.plot(t, auc, linestyle=style, marker=marker, ms=4, mfc="none", label=label)
    if timeline:
        trainer = [np.nan if p.get("trainer_auc_window") is None else p["trainer_auc_window"]
                   for p in timeline]  # fmt: skip
        ax.plot(t, trainer, color="grey", lw=1, label="trainer (pre-update, 60 s window)")
    for i, at in enumerate(marks.get("checkpoint_loads", [])):
        ax.axvline(
            at, color="k", lw=0.6, ls=":", label="checkpoint copy loaded" if i == 0 else None
        )
    if marks.get("poison"):
        a, b = marks["poison"]
        ax.axvspan(a, b, color="red", alpha=0.08, label="poisoned training")
    for key, color, what in (
        ("detected", "orange", "guard detects"),
        ("rolled_back", "red", "rollback"),
        ("restored", "green", "every replica restored"),
        ("training_resumes", "purple", "quarantine ends: training resumes"),
    ):
        for i, at in enumerate(marks.get(key, [])):
            ax.axvline(at, color=color, lw=1.2, label=what if i == 0 else None)
    ax.set_xlabel("seconds")
    ax.set_ylabel("online AUC per interval (predicted before training)")
    parts = config.cluster.partitions
    ax.set_title(
        "Online AUC: Ekko replicas vs a checkpoint replica"
        if parts == 1
        else f"Online AUC: Ekko replicas ({parts} partitions, scatter-gather) and the "
        "sharded trainer"
    )
    if ekko > 1:
        ax.plot([], [], " ", label="Ekko replicas overlap: they serve the same model")
    ax.legend(fontsize=7)
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


def auc_phases(
    timeline: list[dict[str, Any]], marks: dict[str, Any], replicas: list[str]
) -> dict[str, float | None] | None:
    """The serving replicas' online AUC before the poison, while the incident lasts (from
    the poison's start until every replica holds the first rollback after it) and after: the
    mean over the intervals of each phase (each the mean of ``replicas``' interval AUCs). An
    interval that overlaps the incident at all counts as during it. None without a poison."""
    if not marks.get("poison"):
        return None
    start = marks["poison"][0]
    restored = [t for t in marks.get("restored", []) if t >= start]
    end = restored[0] if restored else float("inf")
    phases: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    ends = [p["t"] for p in timeline]
    for point, began, t in zip(timeline, [0.0, *ends], ends, strict=False):
        aucs = [point["auc"][n] for n in replicas if point["auc"].get(n) is not None]
        if aucs:
            key = "before" if t <= start else "after" if began >= end else "during"
            phases[key].append(float(np.mean(aucs)))
    return {k: float(np.mean(v)) if v else None for k, v in phases.items()}
