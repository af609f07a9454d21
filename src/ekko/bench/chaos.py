"""``ekko bench chaos``: the nemesis harness at scale, summarised for the README.

The full run draws 100 rounds of every fault kind (so at least 100 of each) on the default
chaos cluster; ``--quick`` draws 3. The harness does the work (``ekko.ops.chaos``); this
module runs it, writes the result JSON and a timeline PNG of the faults and of each
replica's catching up after every heal.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.console import Console

from ekko.bench.report import write_result
from ekko.ops.chaos import ChaosSettings, FaultKind, History, run_chaos
from ekko.ops.chaos.schedule import TIMINGS

console = Console(stderr=True)
FULL_ROUNDS = 100
QUICK_ROUNDS = 3
TIMING = "bench"  # ekko.ops.chaos.schedule.TIMINGS


def run(*, quick: bool = False, out: Path | None = None, seed: int = 1) -> dict:
    rounds = QUICK_ROUNDS if quick else FULL_ROUNDS
    settings = ChaosSettings(seed=seed, duration_s=None, rounds=rounds, timing=TIMINGS[TIMING])
    workdir = Path(tempfile.mkdtemp(prefix="ekko-chaos-"))  # kept: history, logs, configs
    history, verdict = run_chaos(settings, workdir, say=console.print)
    summary = {
        "faults_injected": history.settings.get("injected", {}),
        "writes_acked": verdict.summary["writes_acked"],
        "acked_lost": verdict.summary["acked_lost"],
        "converge_s_max": verdict.summary["converge_s_max"],
        "unplanned_crashes": verdict.summary["unplanned_crashes"],
        "checker_passed": verdict.ok,
        "failures": verdict.failures,
        **{k: v for k, v in verdict.summary.items() if k not in ("writes_acked", "acked_lost")},
        "wall_s": _wall(history),
    }
    inputs = {
        "settings": settings.as_json(),
        "timing": TIMING,
        "replay": f"ekko chaos --seed {seed} --rounds {rounds} --timing {TIMING}",
        "quick": quick,
        "cluster": "default_cluster_doc()",
        "workdir": str(workdir),
    }
    details = {  # compact: the full history stays in the workdir
        "clients": history.settings.get("clients", {}),
        "convergence": [
            [c["heal_t"], c["replica"], c["seconds"], c["outcome"], c["kind"]]
            for c in history.convergence
        ],
        "disk": history.disk,
        "wipes": [
            {"t": w["t"], "fault": w["fault"], "at_risk": len(w["at_risk"])} for w in history.wipes
        ],
        "crashes": history.crashes,
        "alarms": history.alarms,
        "faults": [list(w) for w in history.fault_windows()],
    }
    write_result("chaos", inputs, summary, details, out, lambda fig: _plot(fig, history))
    return {"summary": summary}


def _wall(history: History) -> float | None:
    ends = [e["t"] for e in history.events if e["event"] == "writes_stopped"]
    return ends[-1] if ends else None


def _plot(fig, history: History) -> None:
    """Top: each fault as a bar on its kind's row. Bottom: seconds each replica took to
    hold the first write acknowledged after each heal, at the heal's time."""
    kinds = list(FaultKind)
    ax = fig.add_subplot(2, 1, 1)
    for kind, _target, start, end in history.fault_windows():
        row = kinds.index(FaultKind(kind))
        ax.broken_barh([(start, max(end - start, 0.05))], (row - 0.4, 0.8), color=f"C{row}")
    ax.set_yticks(range(len(kinds)), [k.value for k in kinds], fontsize=7)
    ax.set_title("faults injected (bars: start to heal)", fontsize=9)
    bx = fig.add_subplot(2, 1, 2, sharex=ax)
    for i, replica in enumerate(history.settings.get("replicas", [])):
        pts = [
            (c["heal_t"], c["seconds"])
            for c in history.convergence
            if c["replica"] == replica and c["seconds"] is not None
        ]
        if pts:
            xs, ys = zip(*pts, strict=True)
            bx.scatter(xs, ys, s=6, color=f"C{i}", label=replica)
    bx.set_xlabel("seconds since the clients started")
    bx.set_ylabel("caught up after heal (s)")
    bx.legend(fontsize=7)
