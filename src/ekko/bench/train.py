"""``ekko bench train``: events/s trained and the publisher's share of step time.

Two identical online trainers on the synthetic stream, one publishing every step into a
sink that only counts, one not, in alternated blocks (``ekko.bench.train_throughput.measure``);
the default DLRM (26 tables x 100 k rows, dim 16) and the demo's (dim 8) side by side.
Bar (issue #3): publisher overhead <= 15 % of the step time.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ekko.bench.report import write_result
from ekko.bench.train_throughput import measure
from ekko.train.dlrm import DLRMConfig

console = Console(stderr=True)
BAR_SHARE = 0.15
MODELS = {
    "dlrm_dim16": DLRMConfig(),
    "demo_dim8": DLRMConfig(embedding_dim=8, bottom_mlp=(64, 8)),
}


def run(*, quick: bool = False, out: Path | None = None) -> dict:
    steps = 60 if quick else 300
    results = {}
    for name, cfg in MODELS.items():
        for batch in (256, 1024):
            console.print(f"[train] {name} batch {batch}: {steps} steps x 2 trainers")
            results[f"{name}/b{batch}"] = measure(steps, batch, model_config=cfg)
    summary = {
        "events_per_s": {k: r["events_per_s_publish"] for k, r in results.items()},
        "publisher_share": {k: r["publisher_share"] for k, r in results.items()},
        "ab_step_ratio": {k: r["ab_step_ratio"] for k, r in results.items()},
        "bar_publisher_share_le_0.15": all(
            r["publisher_share"] <= BAR_SHARE for r in results.values()
        ),
    }
    write_result(
        "train",
        {"steps": steps, "quick": quick},
        summary,
        results,
        out,
        lambda fig: _plot(fig, results),
    )
    return {"summary": summary}


def _plot(fig, results: dict) -> None:
    names = list(results)
    ax = fig.add_subplot(1, 2, 1)
    ax.bar(names, [results[n]["events_per_s_publish"] for n in names])
    ax.set_ylabel("events/s trained (1 torch thread, publishing)")
    ax.tick_params(axis="x", rotation=30)
    ax = fig.add_subplot(1, 2, 2)
    ax.bar(names, [100 * results[n]["publisher_share"] for n in names])
    ax.axhline(100 * BAR_SHARE, color="r", label="bar 15 %")
    ax.set_ylabel("publisher share of step time, %")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
