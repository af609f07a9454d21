"""Where a restarted coordinator takes up: its incidents' records in its guard log.

Why: the coordinator's decision, incidents and epoch counter lived in memory. Killed with -9
and restarted with its data, it numbered its next incident 0 again — every holder (already
past 0) ignored that incident's messages as stale, and a source that had restored 0 answered
the new command from cache, restoring nothing — it forgot the holders it had not released
(frozen for good), and said "healthy" after a kill inside a rollback whose end nobody knows.
The coordinator logs each rollback's start, outcome and the holders' release with its epoch;
``resumed`` reads them back. Its pre-images are gone with the process (in memory): a rollback
interrupted by the kill cannot be finished, and the coordinator says so (corrupted).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ekko.guard.coordinator import failure_text

STARTED, SOURCES_RESTORED, FAILED = "rollback_started", "rollback", "rollback_failed"
COMPLETE, RELEASED = "restored_everywhere", "holders_released"
EVENTS = (STARTED, SOURCES_RESTORED, FAILED, COMPLETE, RELEASED)


@dataclass
class Resumed:
    """What the log says: the next incident's epoch; the last incident's epoch whose holders
    were not released (``unreleased``); the last incident when it did not end well
    (``broken``, for the coordinator's incidents) and why (``why``: its ``rollback_error``)."""

    next_epoch: int = 0
    unreleased: int | None = None
    broken: dict[str, Any] | None = None
    why: str | None = None


def resumed(records: Iterable[dict[str, Any]], model: str, node: str) -> Resumed:
    """Read ``model``'s incident records (``TransitionLog.read``, oldest first)."""
    by_epoch: dict[int, dict[str, dict[str, Any]]] = {}
    for r in records:
        epoch = r.get("epoch")
        if r.get("model") != model or r.get("event") not in EVENTS:
            continue
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            continue
        by_epoch.setdefault(epoch, {})[r["event"]] = r
    if not by_epoch:
        return Resumed()
    e = max(by_epoch)
    ev = by_epoch[e]
    out = Resumed(next_epoch=e + 1)
    if COMPLETE in ev:
        out.unreleased = None if RELEASED in ev else e
        return out
    if RELEASED in ev:
        return out
    first = ev.get(STARTED) or ev.get(SOURCES_RESTORED) or ev[FAILED]
    inc = {k: first.get(k) for k in ("model", "epoch", "why", "automatic", "decided_at")}
    inc |= {"to_wall": first.get("to_wall"), "restored": {}, "completed_at": None}
    if FAILED in ev:
        failed = ev[FAILED].get("failed_sources") or {}
        inc |= {"failed_sources": failed, "completed_at": ev[FAILED].get("completed_at")}
        out.why = f"before this coordinator restarted: {failure_text(e, failed)}"
    else:
        step = "holders" if SOURCES_RESTORED in ev else "sources"
        inc |= {"interrupted": True, "failed_sources": {node: {"partitions": None,
                "error": f"the coordinator restarted while its {step} restored"}}}  # fmt: skip
        out.why = (
            f"the coordinator restarted during the rollback of incident {e} (its {step} "
            "were restoring): whether every partition holds the healthy rows is unknown, "
            "and its pre-images are gone; traffic stays on the baseline and the holders "
            "frozen until an operator's rollback (to this restart or later: the state of "
            "every partition then, as its source holds it) ends the incident"
        )
    out.broken = inc
    return out
