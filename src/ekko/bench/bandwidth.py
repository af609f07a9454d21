"""``ekko bench bandwidth``: WAN bytes, update latency and online AUC of Ekko and of the
baselines, all replaying one trace recorded from the real trainer, on one emulated WAN.

Topology: 3 inference DCs (one-way 25/50/100 ms, 100 Mbit/s) × 3 replicas. Systems: a
periodic full checkpoint broadcast, push of every update in fp32 to every replica, a Redis
Streams log, and Ekko with its WAN features added one at a time (leader relay, fp16, int8,
int4, coalescing, deferral). The bar is judged on the Ekko step with the largest reduction
whose online AUC is within 0.001 of push-fp32's. Blocks alternate the systems (DESIGN.md
§8); bytes do not drift between blocks, latencies and AUC are taken as medians over blocks.

The trace starts from a model already trained for ``WARMUP_STEPS`` batches: a model in steady
online training, as in production, not one learning from its random init (whose first
seconds make every 100 ms of staleness look decisive).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from rich.console import Console

from ekko.bench.baselines import (
    BaselineResult,
    DataCentre,
    default_topology,
    redis_server,
    run_checkpoint,
    run_push,
    run_redis,
)
from ekko.bench.ekko_system import EkkoVariant, run_ekko
from ekko.bench.online_auc import OnlineAuc
from ekko.bench.report import median, write_result
from ekko.bench.trace import Trace, load_trace, record_trace
from ekko.schedule import SchedulerConfig
from ekko.train.dlrm import DLRMConfig

console = Console(stderr=True)

BENCH_MODEL = DLRMConfig(
    num_sparse=8, embedding_dim=32, rows_per_table=20_000, bottom_mlp=(64, 32), top_mlp=(64, 1)
)
WARMUP_STEPS = 2000
COALESCE_MS = 250
DEFER = SchedulerConfig(defer=True, defer_min_significance=0.3, max_staleness_s=1.0)

# Codecs before coalescing: a codec costs no latency, coalescing trades latency (and so online
# AUC) for bytes; measured in session 4 with coalescing second, 250 ms of it saved 12 % of the
# rows for 0.44e-3 AUC, more than int8 cost on top of it.
EKKO_STEPS: tuple[EkkoVariant, ...] = (
    EkkoVariant("ekko relay", relay=True),
    EkkoVariant("+fp16", codec="fp16"),
    EkkoVariant("+int8", codec="int8"),
    EkkoVariant("+int4", codec="int4"),
    EkkoVariant("+coalescing", coalesce_ms=COALESCE_MS, codec="int4"),
    EkkoVariant("+deferral", coalesce_ms=COALESCE_MS, codec="int4", scheduler=DEFER),
)
BASELINES = ("checkpoint", "push-fp32", "redis-streams")
REFERENCE = "push-fp32"
AUC_TOLERANCE = 0.001


def bench_trace(path: Path, steps: int, *, seed: int = 5) -> Trace:
    """Record (or reuse) the bench trace: ``steps`` batches of 256 after the warm-up."""
    if not path.exists():
        console.print(f"[trace] warming the model for {WARMUP_STEPS} steps, recording {steps}")
        record_trace(
            steps, 256, seed=seed, path=path, model_config=BENCH_MODEL, warmup_steps=WARMUP_STEPS
        )
    return load_trace(path)


async def _run_system(
    name: str, trace: Trace, topology: list[DataCentre], probe: OnlineAuc, redis_port: int
) -> BaselineResult:
    if name == "checkpoint":
        return await run_checkpoint(trace, topology, interval_s=5.0, probe=probe)
    if name == "push-fp32":
        return await run_push(trace, topology, probe=probe)
    if name == "redis-streams":
        return await run_redis(trace, topology, redis_port=redis_port, probe=probe)
    variant = next(v for v in EKKO_STEPS if v.name == name)
    return await run_ekko(trace, topology, variant, probe=probe)


async def compare(
    trace: Trace,
    systems: list[str],
    blocks: int,
    topology: list[DataCentre] | None = None,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, list[BaselineResult]]:
    """Every system once per block, in order; returns each system's results."""
    topology = topology or default_topology()
    probe = OnlineAuc(trace, BENCH_MODEL)
    runs: dict[str, list[BaselineResult]] = {s: [] for s in systems}
    async with redis_server() as server:
        for b in range(blocks):
            for s in systems:
                progress(f"block {b + 1}/{blocks}: {s}")
                r = await _run_system(s, trace, topology, probe, server.port)
                runs[s].append(r)
                progress(
                    f"  {s}: {r.wan_bytes / 1e6:.1f} MB WAN, p50 {r.latency_p50_ms:.0f} ms, "
                    f"p99 {r.latency_p99_ms:.0f} ms, AUC {r.auc:.5f}"
                )
    return runs


def summarize(runs: dict[str, list[BaselineResult]]) -> dict[str, Any]:
    wan = {s: int(median([r.wan_bytes for r in rs])) for s, rs in runs.items()}
    auc = {s: median([r.auc for r in rs if r.auc is not None]) for s, rs in runs.items()}
    ref = wan[REFERENCE]
    reduction = {s: ref / b if b else float("inf") for s, b in wan.items()}
    gap = {s: a - auc[REFERENCE] for s, a in auc.items()}
    ekko = [v.name for v in EKKO_STEPS if v.name in runs]
    keeps = [s for s in ekko if gap[s] >= -AUC_TOLERANCE]
    best = max(keeps, key=lambda s: reduction[s]) if keeps else None
    return {
        "wan_bytes": wan,
        "reduction_vs_push_fp32": reduction,
        "auc": auc,
        "auc_minus_push_fp32": gap,
        "latency_p50_ms": {s: median([r.latency_p50_ms for r in rs]) for s, rs in runs.items()},
        "latency_p99_ms": {s: median([r.latency_p99_ms for r in rs]) for s, rs in runs.items()},
        "final_state_equal_source": {s: all(map(_converged, rs)) for s, rs in runs.items()},
        "best_within_auc": best,
        "best_reduction_within_auc": reduction[best] if best else None,
        "max_reduction": max(reduction[s] for s in ekko),
        "bar_reduction_ge_15x_within_auc_0_001": best is not None and reduction[best] >= 15.0,
    }


def _converged(r: BaselineResult) -> bool:
    """Replicas hold the source's final state (within the codec's error, for lossy ones)."""
    return r.digests_equal_source or bool(r.details.get("within_codec_error", False))


def run(*, quick: bool = False, out: Path | None = None) -> dict:
    steps, blocks = (60, 1) if quick else (200, 2)
    systems = [*BASELINES, *(v.name for v in EKKO_STEPS)]
    with tempfile.TemporaryDirectory(prefix="ekko-bandwidth-") as tmp:
        trace = bench_trace(Path(tmp) / "trace.npz", steps)
        console.print(
            f"[bandwidth] trace: {trace.rows} row updates, {trace.fp32_bytes / 1e6:.1f} MB fp32, "
            f"{trace.duration_s:.0f} s; {len(systems)} systems × {blocks} blocks"
        )
        runs = asyncio.run(compare(trace, systems, blocks, progress=console.print))
        trace_doc = {"rows": trace.rows, "fp32_bytes": trace.fp32_bytes,
                     "duration_s": trace.duration_s, "steps": trace.steps}  # fmt: skip
    summary = summarize(runs)
    inputs = {
        "quick": quick, "steps": steps, "blocks": blocks, "batch_size": 256,
        "warmup_steps": WARMUP_STEPS, "model": vars(BENCH_MODEL), "trace": trace_doc,
        "topology": [{"name": d.name, "wan": vars(d.wan) if d.wan else None,
                      "replicas": d.replicas} for d in default_topology()],
        "ekko_steps": [r.name for r in EKKO_STEPS], "coalesce_ms": COALESCE_MS,
        "deferral": vars(DEFER),
    }  # fmt: skip
    details = {s: [r.to_dict() for r in rs] for s, rs in runs.items()}
    write_result("bandwidth", inputs, summary, details, out, lambda fig: _plot(fig, summary))
    return {"summary": summary}


def _plot(fig: Figure, summary: dict[str, Any]) -> None:
    names = list(summary["wan_bytes"])
    mb = [summary["wan_bytes"][n] / 1e6 for n in names]
    colors = ["#999999" if n in BASELINES else "#1f77b4" for n in names]
    ax = fig.add_subplot(1, 2, 1)
    ax.barh(names, mb, color=colors)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.invert_yaxis()
    ax.set_xlabel("WAN bytes (MB, log)")
    ax.set_title("WAN bytes on the same trace")
    for i, n in enumerate(names):
        ax.text(mb[i], i, f" {summary['reduction_vs_push_fp32'][n]:.1f}x", va="center")
    ax2 = fig.add_subplot(1, 2, 2)
    gaps = [1e3 * summary["auc_minus_push_fp32"][n] for n in names]
    ax2.barh(names, gaps, color=colors)
    ax2.axvline(-1.0, color="red", linestyle="--", label="bar: -0.001")
    ax2.invert_yaxis()
    ax2.set_yticklabels([])
    ax2.set_xlabel("online AUC - push-fp32 (x 1e-3)")
    ax2.set_title("model quality")
    ax2.legend(loc="lower left")
