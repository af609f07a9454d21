"""``ekko bench ablation``: full scan → +shard version → +update cache → +DC leader →
+long-poll, each step on the same cluster shape and stream, blocks alternated.

The table is prefilled so a full scan has real work to do; figures are medians over blocks.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console

from ekko.bench.cluster_run import RunSpec, run_cluster
from ekko.bench.report import median, write_result

console = Console(stderr=True)

POLL = (("wait_ms", 0), ("poll_interval_ms", 100))
STEPS: list[tuple[str, tuple]] = [
    (
        "full scan",
        (("use_shard_version", False), ("use_cache", False), ("use_dc_leader", False), *POLL),
    ),
    (
        "+shard version",
        (("use_shard_version", True), ("use_cache", False), ("use_dc_leader", False), *POLL),
    ),
    ("+update cache", (("use_cache", True), ("use_dc_leader", False), *POLL)),
    ("+DC leader", (("use_dc_leader", True), *POLL)),
    ("+long-poll", (("use_dc_leader", True), ("wait_ms", 1000), ("window", 32))),
]


def run(*, quick: bool = False, out: Path | None = None, rate: float = 20_000.0) -> dict:
    blocks = 1 if quick else 2
    base = RunSpec(
        rate=rate,
        prefill=200_000 if quick else 1_000_000,
        key_space=2_000_000,
        warm_s=3 if quick else 5,
        measure_s=4 if quick else 8,
    )
    results: dict[str, list[dict]] = {name: [] for name, _ in STEPS}
    for b in range(blocks):
        order = STEPS if b % 2 == 0 else list(reversed(STEPS))
        for name, sync in order:
            console.print(f"[ablation] block {b + 1}/{blocks}: {name}")
            results[name].append(run_cluster(replace(base, sync=sync)))
    steps = []
    for name, _ in STEPS:
        runs = results[name]
        steps.append(
            {
                "name": name,
                "p50_ms": median([_worst(r, "p50_ms") for r in runs]),
                "p99_ms": median([_worst(r, "p99_ms") for r in runs]),
                "source_cpu_s": median([r["source_cpu_s"] for r in runs]),
                "source_cpu_share": median([r["source_cpu_s"] / r["measure_s"] for r in runs]),
            }
        )
    summary = {"steps": steps, "rate_rows_per_s": rate}
    inputs = {
        "spec": vars(base) | {"sync": {}},
        "steps": [dict(s) for _, s in STEPS],
        "blocks": blocks,
        "quick": quick,
    }
    write_result("ablation", inputs, summary, {"runs": results}, out, lambda fig: _plot(fig, steps))
    return {"summary": summary}


def _worst(run: dict, key: str) -> float:
    """The slowest DC: a change is fresh everywhere only when the farthest DC has it."""
    return max(d[key] for d in run["per_dc"])


def _plot(fig, steps: list[dict]) -> None:
    ax1 = fig.add_subplot(1, 2, 1)
    x = np.arange(len(steps))
    ax1.bar(x - 0.2, [s["p50_ms"] for s in steps], 0.4, label="p50 (slowest DC)")
    ax1.bar(x + 0.2, [s["p99_ms"] for s in steps], 0.4, label="p99 (slowest DC)")
    ax1.set_xticks(x, [s["name"] for s in steps], rotation=25, ha="right")
    ax1.set_ylabel("update latency, ms")
    ax1.set_yscale("log")
    ax1.legend()
    ax2 = fig.add_subplot(1, 2, 2)
    ax2.bar(x, [s["source_cpu_share"] * 100 for s in steps], color="tab:gray")
    ax2.set_xticks(x, [s["name"] for s in steps], rotation=25, ha="right")
    ax2.set_ylabel("source CPU, % of one core")
    fig.suptitle("Ablation: what each sync mechanism buys")
