"""How a rollback's incident ends at the coordinating source: every source's restore answered
(or not), then every replica or holder holding the restore.

Why apart from ``SourceGuard``: the decision (reports, checkpoints, the rollback) and the
incident's end (merging the sources' answers, the digests compared, the failures named)
change for different reasons; ``SourceGuard`` inherits these steps and owns the state.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ekko.guard.coordinator import (
    SourceResults,
    collect_answers,
    failure_text,
    merge_watermarks,
    rows_lost,
    split_lossy,
)
from ekko.guard.restore import Restored
from ekko.guard.state import Event

if TYPE_CHECKING:
    from ekko.guard.source_guard import SourceGuard

log = logging.getLogger("ekko.guard.source_guard")


class IncidentEnd:
    """The end of an incident, as steps of ``SourceGuard`` (which inherits them)."""

    def _sources_answered(
        self: SourceGuard, inc: dict[str, Any], res: Restored, results: SourceResults
    ) -> None:
        """Every source restored (or failed to): tell every replica and holder, or, when a
        source did not restore, say so and keep traffic on the baseline."""
        if self.incident is not inc:
            return  # answers after the incident ended: nothing to do
        answers = [res.answer]
        if self.plan is not None:
            answers, failed = collect_answers(self.plan, inc, res.answer, results)
            self.rows_restored += sum(a["rows_restored"] for a in answers[1:])
            if failed:
                self._restore_failed(inc, failed)
                return
        n_rows = inc["rows_restored"]
        self._transition(
            Event.ROLLBACK_DONE, f"{n_rows} rows restored to {inc['checkpoint_at']:.3f}"
        )
        rolled = {
            "healthy_wall": inc["checkpoint_at"],
            "watermark": merge_watermarks(answers),
            "automatic": inc["automatic"],
            "epoch": inc["epoch"],
        }
        if self.plan is not None:
            rolled["partitions"] = self.plan.source_map(self.node)
        self._tell_all("guard/rolled_back", rolled)
        if self.log is not None:
            self.log.append(
                {k: v for k, v in inc.items() if k != "restored"} | {"event": "rollback"}
            )
        waits_for = self.replicas if self.plan is None else list(self.plan.holders)
        if not waits_for:
            self._complete(inc)

    def _restore_failed(
        self: SourceGuard, inc: dict[str, Any], failed: dict[str, dict[str, Any]]
    ) -> None:
        """A source did not restore: its partitions may still hold the poisoned rows. The
        model stays corrupted (traffic on the baseline, holders frozen) and the incident
        ends naming the sources; an operator's rollback retries every source."""
        self.rollback_error = failure_text(inc["epoch"], failed)
        inc["failed_sources"] = failed
        inc["completed_at"] = self._clock.wall()
        self.incidents.append(inc)
        self.incident = None
        log.error("guard %s: %s", self.model, self.rollback_error)
        if self.log is not None:
            doc = {k: v for k, v in inc.items() if k != "restored"}
            self.log.append(doc | {"event": "rollback_failed"})

    def _complete(self: SourceGuard, inc: dict[str, Any]) -> None:
        """Every replica (holder) holds the restored state: compare digests, resume."""
        if self.plan is None:
            mismatched = {
                n: [t for t, d in r["digests"].items() if inc["digests"].get(t) != d]
                for n, r in inc["restored"].items()
            }
            lost = sum(self.store.table(t).rows for m in mismatched.values() for t in m)
        else:
            mismatched = {n: r["mismatches"] for n, r in inc["restored"].items()}
            mismatched, lossy = split_lossy(self.plan, mismatched)
            if lossy:
                inc["mismatches_through_lossy_codecs"] = lossy
            lost = rows_lost(mismatched, inc["source_rows"])
        inc["replica_table_mismatches"] = {n: m for n, m in mismatched.items() if m}
        inc["good_rows_lost"] = inc["source_mismatches"] + lost
        times = [r["at"] for r in inc["restored"].values()]
        inc["restore_all_replicas_s"] = (max(times) - inc["decided_at"]) if times else 0.0
        inc["completed_at"] = self._clock.wall()
        self.resume_at = inc["decided_at"] + self.quarantine_s
        self.incidents.append(inc)
        self.incident = None
        if self.plan is not None:  # serving nodes return traffic to online
            body = {"epoch": inc["epoch"], "at": inc["completed_at"]}
            self._post(self.replicas, "guard/holders_restored", body)
            self._unfreeze_epoch = inc["epoch"]
        if self.log is not None:
            self.log.append(
                {k: v for k, v in inc.items() if k != "restored"} | {"event": "restored_everywhere"}
            )
        log.warning(
            "guard %s: rollback complete at every replica in %.2f s; good rows lost %d",
            self.model,
            inc["restore_all_replicas_s"],
            inc["good_rows_lost"],
        )
