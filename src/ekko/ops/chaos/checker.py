"""The checker: judges a chaos run from its history alone, as Jepsen's checkers do.

What it holds the cluster to (README, "Durability" and the opening paragraph):
- every acknowledged write is at the source afterwards: the key's last acknowledged write,
  or a newer version. Excused only: a write the source had acknowledged but that no replica
  held when the source lost its disk (the contract is "on the disk, or on a replica");
- every replica's digests equal the source's within ``converge_bound_s`` of the writes
  stopping (a few seconds after the last heal); after each heal, each replica catches up
  again within it;
- no node exited except by the nemesis's hand;
- a replica whose whole preferred path to the source (its nodes and links) has been free of
  faults since ``settle_s`` before a write was acknowledged serves that write (or newer)
  once its bound has passed: "hold it within about one WAN delay of the source", with two
  seconds for the pull round on a loaded 2-core machine (judged from the nemesis's start:
  the cluster's first sync of every table is not steady state);
- the guard raised no alarm on clean data (no incident, no rollback, no corrupted replica);
- a full disk at the source is reported (``/ready`` 503 or ``/metrics``) unless the source
  went on acknowledging writes (its log's last page still had room: those are durable),
  and the source takes writes again after the disk has room.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ekko.ops.chaos.history import History


@dataclass
class Verdict:
    """The checker's answer: ``failures`` name each broken promise (empty: the run passed)."""

    failures: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures


def check(history: History, *, settle_s: float = 5.0, converge_bound_s: float = 60.0) -> Verdict:
    v = Verdict()
    lost, excused = _lost_writes(history)
    if lost:
        sample = ", ".join(f"key {k} ({why})" for k, why in lost[:5])
        v.failures.append(f"{len(lost)} acknowledged writes lost at the source, e.g. {sample}")
    _diverged(history, converge_bound_s, v)
    heal_times = [c["seconds"] for c in history.convergence if c["outcome"] == "converged"]
    for c in history.convergence:
        if c["outcome"] == "timeout":
            v.failures.append(
                f"{c['replica']} did not catch up within {converge_bound_s} s after fault "
                f"{c['fault']} ({c['kind']} on {c['target']}) healed at t={c['heal_t']}"
            )
    for c in history.crashes:
        v.failures.append(
            f"node {c['node']} exited unplanned at t={c['t']} (code {c['code']}):\n"
            f"{c.get('traceback') or c.get('log_tail', '')}"
        )
    stale, checked = _stale_reads(history, settle_s)
    for r in stale[:5]:
        v.failures.append(
            f"{r['replica']} served {r['behind']} rows older than write {r['write']} "
            f"(acknowledged at t={r['acked_at']}) at t={r['t']}, past its bound of "
            f"{r['bound_s']} s with its path to the source free of faults"
        )
    if len(stale) > 5:
        v.failures.append(f"... and {len(stale) - 5} more stale reads")
    for a in history.alarms:
        v.failures.append(f"guard false alarm at t={a['t']} on {a['node']}: {a['what']}")
    for d in history.disk:
        if not d["reported"] and not d.get("acked_during"):
            v.failures.append(
                f"full disk (fault {d['fault']}): the source took no write and reported "
                "nothing (/ready, /metrics)"
            )
        if d["recovered_s"] is None:
            v.failures.append(f"source took no writes after the full disk (fault {d['fault']})")
    final = history.final.get("converge_s", {})
    converge = [s for s in [*heal_times, *final.values()] if s is not None]
    v.summary = {
        "writes_acked": len(history.writes),
        "rows_acked": sum(len(w.keys) for w in history.writes),
        "acked_lost": len(lost),
        "acked_excused_disk_lost": excused,
        "converge_s_max": round(max(converge), 3) if converge else None,
        "final_converge_s": final,
        "heal_probes": _outcomes(history.convergence),
        "heal_converge_clean_s": _clean_heals(history),
        "unplanned_crashes": len(history.crashes),
        "stale_reads": len(stale),
        "stale_reads_checked": checked,
        "false_alarms": len(history.alarms),
        "tracebacks": history.final.get("tracebacks", {}),
        "disk_full_recovered_s_max": max(
            (d["recovered_s"] for d in history.disk if d["recovered_s"] is not None),
            default=None,
        ),
    }
    return v


def _lost_writes(history: History) -> tuple[list[tuple[int, str]], int]:
    """Keys whose last acknowledged write the source no longer holds, and how many such
    keys the contract excuses (on no replica when the source lost its disk)."""
    last: dict[int, tuple[float, int, int, int]] = {}  # key -> (at, writer, n, version)
    for w in history.writes:
        for k, ver in zip(w.keys, w.versions, strict=True):
            last[k] = (w.at, w.writer, w.n, ver)
    at_risk = {(k, w, n) for wipe in history.wipes for k, w, n in wipe["at_risk"]}
    rows = history.final.get("source_rows", {})
    lost, excused = [], 0
    for k, (_at, writer, n, ver) in sorted(last.items()):
        got = rows.get(str(k))
        if got is not None:
            version, got_n, got_writer = got
            if version > ver or (version == ver and (got_n, got_writer) == (n, writer)):
                continue
            why = f"holds version {version} write {got_writer}/{got_n}, acked {ver} {writer}/{n}"
        else:
            why = f"missing, acked version {ver} write {writer}/{n}"
        if (k, writer, n) in at_risk:
            excused += 1
            continue
        lost.append((k, why))
    return lost, excused


def _diverged(history: History, bound_s: float, v: Verdict) -> None:
    digests = history.final.get("digests", {})
    want = digests.get(history.settings.get("source", "source"))
    if want is None:
        v.failures.append("no final digests from the source (not reachable after the heal)")
        return
    for node in history.settings.get("replicas", []):
        got = digests.get(node)
        if got is None:
            v.failures.append(f"{node}: no final digests (not reachable after the last heal)")
        elif got != want:
            diff = sorted(t for t in set(got) | set(want) if got.get(t) != want.get(t))
            v.failures.append(
                f"{node} diverged from the source {bound_s} s after the last heal: tables {diff}"
            )


def _stale_reads(history: History, settle_s: float) -> tuple[list[dict[str, Any]], int]:
    """Reads that break the staleness bound on a path free of faults, and how many reads
    qualified to be judged."""
    windows = history.fault_windows()
    start = next((e["t"] for e in history.events if e["event"] == "nemesis_start"), -math.inf)
    stale, checked = [], 0
    for r in history.reads:
        if r["acked_at"] - settle_s < start:
            continue  # the cluster's first sync (every table from nothing) is no steady state
        lo, hi = r["acked_at"] - settle_s, r["t"]
        path = set(r["path"])
        if any(target in path and start <= hi and end >= lo for _k, target, start, end in windows):
            continue
        checked += 1
        if r["behind"] > 0:
            stale.append(r)
    return stale, checked


def _outcomes(probes: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in probes:
        out[c["outcome"]] = out.get(c["outcome"], 0) + 1
    return out


def _clean_heals(history: History) -> dict[str, float | int | None]:
    """Catching up after a heal while no other fault touched the replica's path (the worst
    of all probes also counts the faults that kept coming): n, p50, p99, max seconds."""
    windows = history.fault_windows()
    out = []
    for c in history.convergence:
        if c["seconds"] is None:
            continue
        lo = c["heal_t"]
        hi = max(lo, c.get("write_at", lo)) + c["seconds"]
        path = set(c["path"])
        if not any(
            t in path and start <= hi and end > lo and end != lo for _k, t, start, end in windows
        ):
            out.append(c["seconds"])
    out.sort()
    if not out:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    pick = lambda q: out[min(len(out) - 1, int(len(out) * q))]  # noqa: E731
    return {"n": len(out), "p50": pick(0.5), "p99": pick(0.99), "max": out[-1]}
