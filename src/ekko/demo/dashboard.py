"""What ``ekko demo`` shows a person: the live table (or a line per interval when its output
is not a terminal), the incident line, and the closing summary.

Why apart from the run: the run polls the cluster and keeps the figures; this module only
words them, so each column says which span it covers (a 10 s latency window, the replicas'
60 s quality window, the whole run) and nothing on screen is unexplained.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.table import Table as RichTable
from rich.text import Text

LATENCY_WINDOW_S = 10.0  # the live update-latency quantiles cover the last this many seconds
QUALITY_WINDOW_S = 60.0  # the serving replicas' online quality window (ServeService default)


def guard_cell(health: dict[str, Any]) -> str:
    """The demo's guard column for one replica: its state, and its score only when it can
    judge ("healthy 0.0" from a guard that has no samples or is warming up misled)."""
    cell = f"{health['state']}{' → baseline' if health['redirected'] else ''}"
    if health.get("judging") == "judging":
        return f"{cell} {health['score']:.1f}"
    return f"{cell} · {health.get('judgement', 'cannot judge')}"


def incident_line(
    guard: dict[str, Any] | None,
    poison: tuple[float, float] | None,
    started_wall: float,
) -> str | None:
    """One line on the guard's incidents at the source, times in seconds of the run; None
    while there is nothing to say (no guard, no poison, no incident)."""
    parts = []
    if poison is not None:
        parts.append(f"poisoned training {poison[0]:.0f}–{poison[1]:.0f} s")
    if guard is None:
        return "; ".join(parts) or None
    incs = [*guard.get("incidents", [])]
    if guard.get("incident"):
        incs.append(guard["incident"])
    for inc in incs:

        def at(key: str, inc: dict[str, Any] = inc) -> str:
            return "-" if inc.get(key) is None else f"{inc[key] - started_wall:.1f} s"

        done = inc.get("completed_at")
        parts.append(
            f"incident: detected at {at('detected_at')} by {inc.get('detected_by') or 'operator'}"
            f", rolled back at {at('decided_at')} ({inc['rows_restored']} rows restored), "
            + (f"every replica restored at {at('completed_at')}" if done else "replicas restoring")
        )
    if poison is not None and not incs:
        parts.append(f"guard {guard['state']}: no incident yet")
    return "; ".join(parts) or None


def live_table(demo: Any, snap: dict[str, Any], events: int, poisoned: int) -> RichTable:
    """The dashboard: a row per serving replica and one for the trainer."""
    cfg = demo.cluster.config
    t = RichTable(
        title=f"ekko demo · {snap['t']:.0f}/{demo.spec.duration_s:.0f} s · "
        f"{events} events predicted → labelled → trained",
        caption=f"p50/p99: update latency over the last {LATENCY_WINDOW_S:.0f} s · "
        f"AUC: the last {QUALITY_WINDOW_S:.0f} s",
    )
    t.add_column("replica", justify="left", no_wrap=True)
    for col in ("WAN ms", "p50 ms", "p99 ms", "rows/s", "WAN KB/s", "AUC"):
        t.add_column(col, justify="right")
    t.add_column("guard", justify="left", min_width=7)
    for name, r in snap["replicas"].items():
        wan = cfg.wan(name, demo.source)
        if name in demo.checkpoint:
            age = time.time() - r["copied_at"] if r["copied_at"] else float("nan")
            p50 = f"copy {age:.0f}s old"
            p99 = f"every {cfg.node(name).checkpoint_interval_s:.0f}s"
        else:
            p50, p99 = _ms(r["window_p50_ms"]), _ms(r["window_p99_ms"])
        t.add_row(
            name,  # the generated names carry their DC (dc1-r0, ckpt-r0)
            f"{wan.delay_ms:.0f}" if wan else "-",
            p50,
            p99,
            f"{r['rows_per_s']:.0f}",
            f"{r['wan_bytes_per_s'] / 1e3:.0f}",
            _auc(r["auc_window"]),
            r.get("guard", "-"),
        )
    tr, g = snap["trainer"], snap.get("guard")
    guard = "-"
    if g:
        paused = g["training_paused"] if tr.get("paused") is None else tr["paused"]
        guard = f"{g['state']}{' paused' if paused else ''}"
        guard += f" · {poisoned} poisoned" if poisoned else ""
    t.add_row(
        f"trainer ({tr['ranks']} ranks)" if tr.get("ranks") else "trainer",
        "-",
        "-",
        "-",
        f"{tr['events'] / max(1e-9, snap['t']):.0f} ev/s",
        "-",
        _auc(tr["window"]["auc"]),
        guard,
    )
    return t


def live_view(table: RichTable, incident: str | None) -> Group:
    """The live table with the incident line under it when there is one."""
    return Group(table, Text(incident, style="bold yellow")) if incident else Group(table)


PROGRESS_LEGEND = (
    f"a line every interval: update p99 over the last {LATENCY_WINDOW_S:.0f} s, online AUC "
    f"over the last {QUALITY_WINDOW_S:.0f} s"
)


def progress_line(
    snap: dict[str, Any], duration_s: float, events: int, incident: str | None
) -> str:
    """One line per interval for a log file (a terminal gets the live table instead)."""
    cells = []
    for name, r in snap["replicas"].items():
        p99 = r.get("window_p99_ms")
        if "window_p99_ms" not in r:
            lat = "(full copies)"
        else:
            lat = "no updates" if p99 is None else f"p99 {p99:.1f} ms"
        cells.append(f"{name} {lat} AUC {_auc(r['auc_window'])}")
    line = (
        f"t {snap['t']:.0f}/{duration_s:.0f} s · {events} events · "
        + " | ".join(cells)
        + f" | trainer AUC {_auc(snap['trainer']['window']['auc'])}"
    )
    if snap.get("guard"):
        line += f" | guard {snap['guard']['state']}"
    return line + (f" | {incident}" if incident else "")


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """The closing table: whole-run figures, and the incident line."""
    t = RichTable(title=f"ekko demo summary · whole run of {summary['duration_s']:.0f} s")
    t.add_column("replica", justify="left", no_wrap=True)
    for col in ("one-way ms", "update p50 ms", "update p99 ms", "WAN KB/s", "AUC (whole run)"):
        t.add_column(col, justify="right")
    for d in summary["per_dc"]:
        t.add_row(
            f"{d['dc']}/{d['replica']}",
            f"{d['one_way_delay_ms']:.0f}",
            _ms(d["update_p50_ms"]),
            _ms(d["update_p99_ms"]),
            f"{d['wan_bytes_per_s'] / 1e3:.0f}",
            _auc(d["auc"]),
        )
    every = summary.get("checkpoint_every_s")
    if (summary.get("partitions") or 1) == 1:  # the partitioned form has no checkpoint replica
        t.add_row(
            "checkpoint replica",
            "-",
            f"full copy every {every:.0f} s" if every else "full copy",
            f"{summary.get('checkpoint_loads', 0)} loads",
            f"{(summary['checkpoint_wan_bytes_per_s'] or 0) / 1e3:.0f}",
            _auc(summary["checkpoint_auc"]),
        )
    ranks = summary.get("trainer_ranks")
    who = f"sharded trainer, {ranks} ranks (pre-update)" if ranks else "trainer (pre-update)"
    t.add_row(who, "-", "-", "-", "-", _auc(summary["trainer_auc"]))
    console.print(t)
    console.print(
        f"{summary['events']} events at {summary['events_per_s']:.0f}/s predicted → labelled → "
        "trained; AUC is each replica's predictions scored against the labels fed back",
        highlight=False,
        soft_wrap=True,
    )
    incident = summary.get("incident_line") or "incidents: none"
    console.print(incident, highlight=False, soft_wrap=True)
    phases = summary.get("auc_phases")
    if phases:
        console.print(
            "replicas' online AUC before the poison / until every replica is restored / "
            f"after: {_auc(phases['before'])} / {_auc(phases['during'])} / "
            f"{_auc(phases['after'])}",
            highlight=False,
            soft_wrap=True,
        )
    for rank, q in sorted((summary.get("trainer_quarantine") or {}).items()):
        console.print(
            f"rank {rank}: {q['batches_dropped']} batches dropped through the rollback, "
            f"{q['reloads']} reloads ({q['rows_reloaded']} rows changed), "
            f"{q['reload_failures']} failed",
            highlight=False,
            soft_wrap=True,
        )


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _auc(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
