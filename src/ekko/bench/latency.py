"""``ekko bench latency``: write at the source → visible at every replica, per DC.

3 inference DCs with one-way WAN delays 25/50/100 ms, 2 replicas each (leader + follower),
a synthetic stream of 100 k row-updates/s (dim 32). Several measurement blocks; the figures
are medians over blocks. The WAN delay is the floor; the bar is p99 <= delay + 25 ms.

``wal``: the source's write-ahead log on, off, or ``both`` — blocks alternate on/off (order
flipped every other pair), each mode summarised on its own; the bar is judged with it on.
``tls``: every port over TLS (``ekko cluster init --tls``) on, off, or ``both``, alternated the
same way (one of the two may be ``both`` at a time).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from ekko.bench.cluster_run import RunSpec, run_cluster
from ekko.bench.report import median, write_result

console = Console(stderr=True)


def run(
    *,
    quick: bool = False,
    out: Path | None = None,
    rate: float = 100_000.0,
    wal: str = "on",
    tls: str = "off",
) -> dict:
    for name, value in (("wal", wal), ("tls", tls)):
        if value not in ("on", "off", "both"):
            raise ValueError(f"{name} must be on, off or both, got {value!r}")
    if wal == "both" and tls == "both":
        raise ValueError("compare one thing at a time: wal or tls may be both, not both")
    axis = "tls" if tls == "both" else "wal"  # what alternates between blocks
    fixed = {"wal": wal, "tls": tls}
    modes = ["on", "off"] if fixed[axis] == "both" else [fixed[axis]]
    per_mode = 2 if quick else (3 if len(modes) == 2 else 4)
    order: list[str] = []
    for i in range(per_mode):
        order += modes if i % 2 == 0 else modes[::-1]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    load_before = os.getloadavg()  # others' work on the machine, reported with the figures
    for b, mode in enumerate(order):
        block = fixed | {axis: mode}
        spec = RunSpec(
            rate=rate,
            warm_s=4 if quick else 6,
            measure_s=6 if quick else 12,
            durability=(("wal", block["wal"] == "on"),),
            tls=block["tls"] == "on",
        )
        console.print(
            f"[latency] block {b + 1}/{len(order)}: {rate:.0f} rows/s, "
            f"wal {block['wal']}, tls {block['tls']}"
        )
        runs[mode].append(run_cluster(spec, progress=_progress(b, len(order))))
    summaries = {m: _summary(rs) for m, rs in runs.items()}
    summary: dict[str, Any] = dict(summaries[modes[0]])
    summary["wal"] = modes[0] if axis == "wal" else wal
    summary["tls"] = modes[0] if axis == "tls" else tls
    if len(modes) == 2:
        on, off = summaries["on"]["per_dc"], summaries["off"]["per_dc"]
        summary[f"{axis}_off"] = summaries["off"]
        summary[f"p99_ms_{axis}_on_minus_off_max"] = max(
            a["p99_ms"] - b["p99_ms"] for a, b in zip(on, off, strict=True)
        )
        if axis == "tls":
            summary["p50_ms_tls_on_minus_off_max"] = max(
                a["p50_ms"] - b["p50_ms"] for a, b in zip(on, off, strict=True)
            )
            summary["source_cpu_s_tls_on_over_off"] = (
                summaries["on"]["source_cpu_s"] / summaries["off"]["source_cpu_s"]
            )
    inputs = {
        "spec": vars(spec)
        | {"sync": dict(spec.sync), "durability": "per block", "tls": "per block"},
        "blocks": len(order),
        "block_modes": order,
        "quick": quick,
        "wal": wal,
        "tls": tls,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    write_result(
        "latency", inputs, summary, {"runs": runs}, out,
        lambda fig: _plot(fig, summary["per_dc"]),
    )  # fmt: skip
    return {"summary": summary}


def _summary(runs: list[dict]) -> dict[str, Any]:
    per_dc = []
    for i, first in enumerate(runs[0]["per_dc"]):
        per_dc.append(
            {
                "dc": first["dc"],
                "one_way_delay_ms": first["one_way_delay_ms"],
                "p50_ms": median([r["per_dc"][i]["p50_ms"] for r in runs]),
                "p99_ms": median([r["per_dc"][i]["p99_ms"] for r in runs]),
                "followers_p99_ms": median([r["per_dc"][i]["followers_p99_ms"] for r in runs]),
                "p99_ms_blocks": [r["per_dc"][i]["p99_ms"] for r in runs],
            }
        )
    return {
        "rate_rows_per_s": median([r["rate_rows_per_s"] for r in runs]),
        "source_cpu_s": median([r["source_cpu_s"] for r in runs]),
        "machine_cpu_percent": median([r["machine_cpu_percent"] for r in runs]),
        "per_dc": per_dc,
        "p99_over_delay_ms_max": max(d["p99_ms"] - d["one_way_delay_ms"] for d in per_dc),
        "bar_p99_le_delay_plus_25ms": all(
            d["p99_ms"] <= d["one_way_delay_ms"] + 25 for d in per_dc
        ),
        "bar_followers_le_leader_plus_10ms": all(
            d["followers_p99_ms"] <= d["p99_ms"] + 10 for d in per_dc
        ),
    }


def _progress(block: int, blocks: int):
    def show(label: str, left: float) -> None:
        console.print(f"  block {block + 1}/{blocks} {label}: {left:.0f}s left", end="\r")

    return show


def _plot(fig, per_dc: list[dict]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(per_dc))
    delay = [d["one_way_delay_ms"] for d in per_dc]
    ax.bar(x - 0.2, [d["p50_ms"] for d in per_dc], 0.4, label="p50")
    ax.bar(x + 0.2, [d["p99_ms"] for d in per_dc], 0.4, label="p99")
    ax.scatter(x, delay, color="k", marker="_", s=900, label="one-way WAN delay", zorder=3)
    ax.scatter(
        x,
        [v + 25 for v in delay],
        color="r",
        marker="_",
        s=900,
        label="bar: delay + 25 ms",
        zorder=3,
    )
    ax.set_xticks(x, [f"{d['dc']} ({d['one_way_delay_ms']:.0f} ms)" for d in per_dc])
    ax.set_ylabel("update latency, ms (write at source → applied at replica)")
    ax.set_title("Ekko update latency per data centre")
    ax.legend()
