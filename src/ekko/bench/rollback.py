"""``ekko bench rollback``: detect a bad update, redirect, restore every replica, lose nothing.

Two runs of the demo cluster (3 inference DCs + checkpoint replica, guard on), the same
length and seed: a clean one (false alarms) and one whose training input has flipped labels
(a label bug) for ``poison_for_s`` from ``poison_at_s``; feedback always carries the true
labels. Figures come from the nodes' own records: the source's incident (decision time,
restore writes, every replica's "restored" report with table digests) and each replica's
redirect times.

- ``detect_s``: poison start → the source's rollback decision (seconds of traffic).
- ``redirect_s``: decision → the last replica serving from the baseline.
- ``restore_all_replicas_s``: decision → the last replica holding every restored row.
- ``false_alarms_clean`` / ``false_alarms_before_poison``: rollbacks decided in the clean
  run, and in the poisoned run before the poison started.
- ``good_rows_lost``: restored rows whose value at the source differs from its pre-image,
  plus the rows of any table whose digest at a replica differs from the source's right after
  the restore (training is quarantined meanwhile, so the digests must be equal).
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from ekko.bench.report import write_result
from ekko.demo.run import DemoSpec, run_demo

console = Console(stderr=True)
BAR_DETECT_S = 10.0
BAR_RESTORE_EXTRA_S = 2.0


def run(*, quick: bool = False, out: Path | None = None) -> dict:
    spec = DemoSpec(
        duration_s=80.0 if quick else 120.0,
        poison_at_s=45.0 if quick else 60.0,
        poison_for_s=20.0,
        checkpoint_every_s=60.0,
    )
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ekko-rollback-") as tmp:
        for name, s in (("clean", replace(spec, poison_at_s=None)), ("poisoned", spec)):
            console.print(f"[rollback] {name} run: {s.duration_s:.0f} s")
            runs[name] = run_demo(
                s, Path(tmp) / name, json_path=Path(tmp) / f"{name}.json", console=console
            )
    summary = _summary(runs, spec)
    inputs = {"spec": vars(spec) | {"wan_delay_ms": list(spec.wan_delay_ms)}, "quick": quick}
    details = {
        name: {"summary": r["summary"], "timeline": r["timeline"]} for name, r in runs.items()
    }
    write_result("rollback", inputs, summary, details, out, lambda fig: _plot(fig, runs))
    return {"summary": summary}


def _incidents(doc: dict[str, Any]) -> list[dict[str, Any]]:
    g = doc["summary"].get("guard") or {}
    return list(g.get("incidents") or [])


def _summary(runs: dict[str, dict[str, Any]], spec: DemoSpec) -> dict[str, Any]:
    clean, bad = runs["clean"]["summary"], runs["poisoned"]["summary"]
    incidents = _incidents(runs["poisoned"])
    start = bad["poison_started_at"]
    first = next((i for i in incidents if start and i["decided_at"] >= start), None)
    max_delay = max(spec.wan_delay_ms) / 1000
    early = [i for i in incidents if start is None or i["decided_at"] < start]
    out: dict[str, Any] = {
        "false_alarms_clean": len(_incidents(runs["clean"])),
        "false_alarms_before_poison": len(early),
        "incidents_poisoned": len(incidents),
        "poisoned_events": bad["poisoned_events"],
    }
    if first is None:
        out.update(
            detect_s=None,
            redirect_s=None,
            restore_all_replicas_s=None,
            good_rows_lost=None,
            bar_met=False,
        )
        return out
    redirects = []
    for doc in (bad.get("replica_guards") or {}).values():
        times = [t for t in (doc or {}).get("redirects", []) if t >= first["decided_at"] - 5]
        redirects.append(min(times) if times else None)
    redirect_s = (
        max(redirects) - first["decided_at"] if redirects and None not in redirects else None
    )
    out.update(
        detect_s=first["decided_at"] - start,
        detected_by=first["detected_by"],
        redirect_s=max(0.0, redirect_s) if redirect_s is not None else None,
        restore_all_replicas_s=first["restore_all_replicas_s"],
        rollback_to_s_before_poison=start - first["checkpoint_at"],
        rows_restored=first["rows_restored"],
        restore_mb_per_s_at_source=first["restore_mb_per_s"],
        restore_mb_per_s_end_to_end=first["bytes_restored"]
        / 1e6
        / max(first["restore_all_replicas_s"], 1e-9),
        good_rows_lost=sum(i.get("good_rows_lost", 0) for i in incidents),
        auc_clean=[d["auc"] for d in clean["per_dc"]],
        auc_poisoned=[d["auc"] for d in bad["per_dc"]],
        final_state=(bad.get("guard") or {}).get("state"),
    )
    out["bar_met"] = bool(
        out["detect_s"] <= BAR_DETECT_S
        and out["restore_all_replicas_s"] <= BAR_RESTORE_EXTRA_S + max_delay
        and out["false_alarms_clean"] == 0
        and out["false_alarms_before_poison"] == 0
        and out["good_rows_lost"] == 0
    )
    return out


def _plot(fig, runs: dict[str, dict[str, Any]]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    for name, style in (("clean", ":"), ("poisoned", "-")):
        tl = runs[name]["timeline"]
        replica = next((k for k in (tl[0]["auc"] if tl else {}) if k.startswith("dc1")), None)
        if replica is None:
            continue
        ax.plot(
            [p["t"] for p in tl],
            [p["auc"][replica] for p in tl],
            style,
            label=f"{name}: {replica} (served traffic)",
        )
        ck = next((k for k in tl[0]["auc"] if k.startswith("ckpt")), None)
        if name == "poisoned" and ck:
            ax.plot(
                [p["t"] for p in tl],
                [p["auc"][ck] for p in tl],
                "k--",
                alpha=0.5,
                label="poisoned: checkpoint replica (no guard)",
            )
    bad = runs["poisoned"]["summary"]
    spec = runs["poisoned"]["spec"]
    if spec["poison_at_s"] is not None:
        ax.axvspan(
            spec["poison_at_s"],
            spec["poison_at_s"] + spec["poison_for_s"],
            color="r",
            alpha=0.1,
            label="flipped training labels",
        )
    start = bad.get("poison_started_at")
    for inc in _incidents(runs["poisoned"]):
        if start:
            ax.axvline(spec["poison_at_s"] + inc["decided_at"] - start, color="g", lw=1)
    ax.set_xlabel("seconds of the run (green: rollback decisions)")
    ax.set_ylabel("online AUC per 5 s interval")
    ax.set_title("Guard: a label bug detected, traffic redirected, model rolled back")
    ax.legend(fontsize=8)
