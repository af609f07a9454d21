"""The guard at the source: the rollback decision, and recovery for every DC.

Replicas detect; the source decides. On the first ``corrupted`` report (or an operator's
rollback) it (1) tells every replica to serve from the baseline, (2) quarantines the trainer's
input (no trainer in the node: the model's tables at every source's write port), (3) writes
the last healthy values back as new versions (``SourceRestore``; on a partitioned cluster
every partition source does, on this coordinator's command: ``PartitionPlan``), which the
ordinary sync carries to every DC, (4) resumes once every replica (holder) holds the restored
state, checking their digests against the sources'. No I/O here: messages go through
``broadcast(path, body)`` and the plan's ``send``, supplied by the node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from ekko.guard.coordinator import (
    HolderReportError,
    PartitionPlan,
    holder_mismatches,
    summary,
)
from ekko.guard.coordinator_resume import resumed
from ekko.guard.errors import PreimageError
from ekko.guard.incident_end import IncidentEnd
from ekko.guard.log import TransitionLog
from ekko.guard.quarantine_file import QuarantineFile
from ekko.guard.reports import check_digests, check_state
from ekko.guard.restore import SourceRestore
from ekko.guard.state import Event, ModelHealth, State
from ekko.schedule.write_port import WritePort
from ekko.store.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

Broadcast = Callable[[str, dict[str, Any]], None]


class SourceGuard(IncidentEnd):
    """Rollback coordinator of one model at the source.

    Args:
        model: the model's name.
        port: the source's write port: it records the pre-images of every write to
            ``tables`` here and writes the restore.
        tables: the model's tables (what a rollback restores).
        trainer: the model's ``TrainingService`` (quarantine, load_rows, resume).
        replicas: names of the replicas that serve the model (each must report restored).
        broadcast: ``broadcast(path, body)`` posts to every replica's admin API.
        log_: the node's durable transition log.
        margin_s: roll back this far before the last moment every replica was healthy
            (the detector needs a few intervals to notice a bad update).
        window_s: how long pre-images are kept.
        probation: normal rounds (every replica healthy) before recovered.
        quarantine_s: training input is discarded this long after a rollback decision (the
            window that poisoned the model may not have ended yet).
        report_max_age_s: a replica's report older than this (by the source's clock, from
            its arrival) is stale; a stale or missing report counts as not healthy.
        clock: wall and monotonic time (a fake clock in tests; the node passes its own).
        flush_writes: lands the trainer's writes still queued for the store (the node's
            loop sink), called before a rollback restores.
        node: this node's name (the restore answers name it).
        plan: on a partitioned cluster, the other partition sources this coordinator
            commands and the holders it checks (``PartitionPlan``); None: one partition,
            whose replicas report ``restored`` themselves.
        quarantine_file: where its own write quarantine survives a restart (``SourceRestore``).
    """

    def __init__(
        self,
        model: str,
        port: WritePort,
        tables: Iterable[str],
        trainer: Any,
        replicas: list[str],
        broadcast: Broadcast,
        log_: TransitionLog | None,
        *,
        margin_s: float = 10.0,
        window_s: float = 600.0,
        probation: int = 3,
        quarantine_s: float = 30.0,
        report_max_age_s: float = 5.0,
        clock: Clock = SYSTEM_CLOCK,
        flush_writes: Callable[[], None] | None = None,
        node: str = "source",
        plan: PartitionPlan | None = None,
        quarantine_file: QuarantineFile | None = None,
    ) -> None:
        self.model = model
        self.port = port
        self.store = port.store
        self.trainer = trainer
        self.replicas = list(replicas)
        self.broadcast = broadcast
        self.log = log_
        self.margin_s = margin_s
        self.quarantine_s = quarantine_s
        self.resume_at: float | None = None
        self._storm_noted: int | None = None  # the incident whose quarantine a report hit
        self.rollbacks_declined = 0  # corrupted reports within a rollback's quarantine
        self.node = node
        self.plan = plan
        self.local = SourceRestore(
            model, node, port, tables, window_s=window_s, clock=clock,
            partitions=plan.partitions if plan else (0,), placement=plan and plan.placement,
            quarantine_file=quarantine_file,
        )  # fmt: skip
        self.preimages = self.local.preimages
        self._unfreeze_epoch: int | None = None  # holders to unfreeze once healthy again
        self.next_epoch = 0  # the next incident's (``resume`` goes on from the log's)
        self._redirect_again: dict[str, Any] | None = None  # a cut incident's, at next tick
        self.health = ModelHealth(model, probation, wall_clock=clock.wall)
        self.reports: dict[str, dict[str, Any]] = {}
        self.last_all_healthy: float | None = None
        self.incident: dict[str, Any] | None = None
        self.incidents: list[dict[str, Any]] = []
        self.rows_restored = 0
        self.report_max_age_s = report_max_age_s
        self._clock = clock
        self.flush_writes = flush_writes  # lands the trainer's queued writes now
        self.rollback_error: str | None = None  # why the last automatic rollback failed
        self._stepped_back_at: float | None = None  # wall time seen before the last checkpoint

    # -- periodic ---------------------------------------------------------------------------

    def tick(self, now_wall: float) -> None:
        """Mark a healthy checkpoint while every replica says healthy; move probation on."""
        if self._redirect_again is not None:  # resumed inside a rollback: to the baseline
            body, self._redirect_again = self._redirect_again, None
            self._tell_all("guard/redirect", body)
        if self.resume_at is not None and self.incident is None and now_wall >= self.resume_at:
            self.resume_at = None
            if self.trainer is not None:
                self.trainer.resume()
            log.warning("guard %s: quarantine over; training resumes", self.model)
        states = list(self.replica_states(now_wall).values())
        all_healthy = all(s == "healthy" for s in states)
        marks = self.preimages.checkpoints
        if self.health.state is State.HEALTHY and all_healthy and marks and now_wall < marks[-1]:
            # The wall clock stepped back (NTP, an operator): a checkpoint dated before the
            # last one would cut the pre-images out of order, so the last one stays the
            # restore point until the clock passes it again (it raised in the guard task).
            if self._stepped_back_at is None:
                self._stepped_back_at = now_wall
                log.warning(
                    "guard %s: wall clock %.3f is before the last healthy checkpoint %.3f; "
                    "no new checkpoint until it passes it",
                    self.model,
                    now_wall,
                    marks[-1],
                )
        elif self.health.state is State.HEALTHY and all_healthy:
            self._stepped_back_at = None
            self.local.checkpoint(now_wall)
            self.last_all_healthy = now_wall
            if self.plan is not None:  # every other source marks the same restore point
                self._post(self.plan.sources, "guard/checkpoint", {"at": now_wall})
            self._release_holders()  # a restart's: its incident was over, unreleased
        elif self.health.state is State.RECOVERING and all_healthy and self.incident is None:
            self._transition(Event.SCORE_NORMAL, "every replica healthy after the rollback")
            if self.health.state is State.HEALTHY:  # the holders' baselines follow again
                self._release_holders()
        elif self.health.state is State.UNCERTAIN and all_healthy:
            self._transition(Event.SCORE_NORMAL, "every replica healthy")
        elif self.health.state is State.HEALTHY and "uncertain" in states:
            self._transition(Event.SCORE_HIGH, "a replica is uncertain")

    def replica_states(self, now_wall: float) -> dict[str, str]:
        """Each replica's state as the source may rely on it: its reported state if the
        report is fresh, otherwise ``missing`` or ``stale`` (neither is healthy). A replica
        without samples still counts with its state (it could not see a poison either way;
        the source's ``reports`` show its ``judgement``): otherwise a model nobody queries
        yet would never get a healthy point to roll back to."""
        out: dict[str, str] = {}
        for r in self.replicas:
            rep = self.reports.get(r)
            if rep is None:
                out[r] = "missing"
            elif now_wall - rep["received_at"] > self.report_max_age_s:
                out[r] = "stale"
            else:
                out[r] = str(rep.get("state"))
        return out

    def _transition(self, event: Event, why: str, metrics: dict[str, float] | None = None):
        tr = self.health.handle(event, self._clock.mono(), why, metrics)
        if tr is not None:
            doc = {**tr.to_dict(), "node": "source"}
            log.warning(
                "guard %s at source: %s -> %s (%s)", self.model, doc["from"], doc["to"], why
            )
            if self.log is not None:
                self.log.append(doc)
        return tr

    # -- reports from replicas --------------------------------------------------------------

    def report(self, body: dict[str, Any]) -> None:
        node = body.get("node")
        if node not in self.replicas:
            raise ValueError(f"node: {node!r} does not serve model {self.model}")
        check_state(body)  # before anything is kept: ``ReportError`` naming the states
        self.reports[node] = {**body, "received_at": self._clock.wall()}
        current = int(body.get("epoch", 0)) >= self.next_epoch  # not about a past incident
        if (
            body.get("state") == "corrupted"
            and current
            and self.incident is None
            and (self.health.state is not State.CORRUPTED)
        ):
            why = f"automatic rollback: {node} reports corrupted: {body.get('reason')}"
            if self._nothing_new_to_undo(why):
                return
            try:
                self.rollback(
                    None,
                    why,
                    detected_by=node,
                    detected_at=_at(body, self._clock.wall()),
                )
            except PreimageError as exc:
                # No healthy point to return to: say so at the source (corrupted, with the
                # reason) instead of staying "healthy" while every replica is redirected.
                self.rollback_error = str(exc)
                log.error("guard %s: %s; cannot roll back: %s", self.model, why, exc)
                self._transition(Event.AUTOMATIC_ROLLBACK, f"{why}; cannot roll back: {exc}")

    def _nothing_new_to_undo(self, why: str) -> bool:
        """Whether the last rollback's quarantine still holds: no training write has landed
        since it (the trainer's input, or every source's write port, refuses them), so
        another rollback would find nothing new to undo and only restore to the same point
        again. Found as a storm: a rollback to a point older than the replicas' frozen
        baseline made a fresh detector judge the restored model below the floor, and every
        report started a new incident restoring 0 rows (17 in 30 s). The model stays
        recovering (traffic stays on the baseline where a replica judged it corrupted);
        going further back is an operator's rollback."""
        last = self.incidents[-1] if self.incidents else None
        if last is None or last.get("failed_sources") or "completed_at" not in last:
            return False
        until = last["decided_at"] + self.quarantine_s
        if self._clock.wall() >= until:
            return False
        self.rollbacks_declined += 1
        if self._storm_noted != last["epoch"]:  # once per incident in the log
            self._storm_noted = last["epoch"]
            log.warning(
                "guard %s: %s, within rollback %d's quarantine (until %.3f): nothing written "
                "since, so no new rollback", self.model, why, last["epoch"], until,
            )  # fmt: skip
        return True

    def restored(self, body: dict[str, Any]) -> None:
        """A replica (one partition) or a holder (a partitioned cluster: its digests per
        table and partition, checked against each partition's source) holds the restore.
        ``HolderReportError`` for a holder's report that cannot be compared, ``ReportError``
        for a digest that is not one (before anything is kept)."""
        node = body.get("node")
        inc = self.incident
        check_digests(body.get("digests", {}), partitioned=self.plan is not None)
        if self.plan is not None:
            if inc is None or inc.get("sources_pending"):
                raise HolderReportError(f"node {node}: no rollback awaits holders' reports")
            bad = holder_mismatches(self.plan, str(node), body.get("epoch"), inc["epoch"],
                                    body.get("digests", {}), inc["source_digests"])  # fmt: skip
            inc["restored"][node] = {"at": _at(body, self._clock.wall()), "mismatches": bad}
            if set(inc["restored"]) >= set(self.plan.holders):
                self._complete(inc)
            return
        if inc is None or node not in self.replicas:
            return
        inc["restored"][node] = {
            "at": _at(body, self._clock.wall()),
            "digests": body.get("digests", {}),
        }
        if set(inc["restored"]) >= set(self.replicas):
            self._complete(inc)

    # -- rollback ---------------------------------------------------------------------------

    def rollback(
        self,
        to_wall: float | None,
        why: str,
        *,
        detected_by: str = "operator",
        detected_at: float | None = None,
    ) -> dict[str, Any]:
        """Redirect every replica, quarantine training, write the healthy values back."""
        decided = self._clock.wall()
        automatic = detected_by != "operator"
        if self.incident is not None:
            raise PreimageError(f"model {self.model}: a rollback is already in progress")
        earliest = self.preimages.earliest_restorable
        if to_wall is None:
            base = self.last_all_healthy if self.last_all_healthy is not None else decided
            # The margin must not reach past the oldest healthy checkpoint (a poison in the
            # first minute): that checkpoint is then the best healthy point there is.
            to_wall = base - self.margin_s
            if earliest is not None and self.last_all_healthy is not None:
                to_wall = max(to_wall, earliest)
        if earliest is None or to_wall < earliest:
            raise PreimageError(
                f"model {self.model}: cannot roll back to {to_wall:.3f}; the earliest "
                f"restorable point is {earliest}"
            )
        epoch = self.next_epoch
        self.next_epoch += 1
        redirect = {"why": why, "at": decided, "epoch": epoch, "automatic": automatic}
        if self.log is not None:  # before anyone hears of it: a restart knows it began
            started = {"decided_at": decided, "to_wall": to_wall, "automatic": automatic}
            self.log.append(
                {"event": "rollback_started", "model": self.model, "epoch": epoch, "why": why}
                | started
            )
        self._tell_all("guard/redirect", redirect)
        dropped = self.trainer.quarantine(f"rollback: {why}") if self.trainer else 0
        if self.flush_writes is not None:
            # Steps published before the quarantine may still wait to reach the store; they
            # land now, recorded as pre-images, so the restore below undoes them too (landing
            # after it, they overwrote restored rows with poisoned values for good).
            self.flush_writes()
        self._transition(Event.AUTOMATIC_ROLLBACK if automatic else Event.OPERATOR_ROLLBACK, why)
        # With a trainer in the node, the trainer is quarantined; without (a partitioned
        # cluster's ranks), every source's write port is.
        until = decided + self.quarantine_s if self.trainer is None else None
        res = self.local.restore(to_wall, epoch, why, until)
        if self.trainer is not None and res.rows:
            self.trainer.load_rows(res.rows, res.gone)
        self.rows_restored += res.answer["rows_restored"]
        inc = self.incident = {
            "model": self.model,
            "why": why,
            "epoch": epoch,
            "detected_by": detected_by,
            "automatic": automatic,
            "detected_at": detected_at,
            "decided_at": decided,
            "to_wall": to_wall,
            "quarantine_until": until,
            "checkpoint_at": res.checkpoint_at,
            "rows_restored": res.answer["rows_restored"],
            "bytes_restored": res.nbytes,
            "write_s": res.write_s,
            "restore_mb_per_s": res.nbytes / 1e6 / max(res.write_s, 1e-9),
            "events_dropped": dropped,
            "source_mismatches": res.mismatches,
            "digests": {t: f"{self.store.table(t).digest():016x}" for t in res.rows},
            "sources": {self.node: summary(res.answer)},
            "restored": {},
        }
        if self.plan is None or not self.plan.sources:
            self._sources_answered(inc, res, {})
            return inc
        inc["sources_pending"] = sorted(self.plan.sources)
        body = {"to_wall": to_wall, "epoch": epoch, "why": why, "quarantine_until": until}
        self.plan.restore_remote(body, lambda results: self._sources_answered(inc, res, results))
        return inc

    def resume(self, records: Iterable[dict[str, Any]]) -> None:
        """After a restart: number on from the incidents of the log (``TransitionLog.read``),
        release the holders of an incident that was over, and say corrupted, naming it, when
        the last rollback failed or was cut by the restart (``coordinator_resume``)."""
        r = resumed(records, self.model, self.node)
        self.next_epoch = max(self.next_epoch, r.next_epoch)
        self._unfreeze_epoch = r.unreleased
        if r.broken is not None:
            self.incidents.append(r.broken)
            self.rollback_error = r.why
            at = self._clock.wall()
            self._redirect_again = {"why": r.why, "at": at, "epoch": r.broken["epoch"]}
            self.local.checkpoint(at)  # the operator's way out: a restore point, not healthy
            self._transition(Event.AUTOMATIC_ROLLBACK, f"resumed: {r.why}")
            log.error("guard %s: %s", self.model, r.why)

    def _release_holders(self) -> None:
        """Message 8: the incident is over at the coordinator; holders unfreeze."""
        if self.plan is None or self._unfreeze_epoch is None:
            return
        epoch, self._unfreeze_epoch = self._unfreeze_epoch, None
        self._post(self.plan.holders, "guard/healthy", {"epoch": epoch})
        if self.log is not None:
            self.log.append({"event": "holders_released", "model": self.model, "epoch": epoch})

    def _tell_all(self, path: str, body: dict[str, Any]) -> None:
        """Every serving replica (``broadcast``) and, partitioned, every other holder."""
        self.broadcast(path, body)
        if self.plan is not None:
            self._post([h for h in self.plan.holders if h not in self.replicas], path, body)

    def _post(self, nodes: Iterable[str], path: str, body: dict[str, Any]) -> None:
        assert self.plan is not None
        for n in nodes:
            self.plan.send(n, f"/v1/models/{self.model}/{path}", body)

    def status(self) -> dict[str, Any]:
        now = self._clock.wall()
        return {
            "model": self.model,
            "state": str(self.health.state),
            "replicas": self.replica_states(now),
            "reports": {
                n: {
                    "state": r.get("state"),
                    "judgement": r.get("judgement"),
                    "age_s": now - r["received_at"],
                }
                for n, r in self.reports.items()
            },
            "training_paused": getattr(self.trainer, "paused", None),
            "last_all_healthy": self.last_all_healthy,
            "preimages": {
                "rows": self.preimages.rows,
                "earliest_restorable": self.preimages.earliest_restorable,
            },
            "rows_restored": self.rows_restored,
            "rollbacks_declined": self.rollbacks_declined,
            "rollback_error": self.rollback_error,
            "next_epoch": self.next_epoch,
            "partitioned": self.plan and self.plan.describe(self.node),
            "incident": _public(self.incident),
            "incidents": [_public(i) for i in self.incidents[-10:]],
            "transitions": [t.to_dict() for t in self.health.history[-20:]],
        }


def _at(body: dict[str, Any], default: float) -> float:
    """A message's ``at`` (unix seconds), or ``default`` when it has none (absent or null)."""
    at = body.get("at")
    return default if at is None else float(at)


def _public(inc: dict[str, Any] | None) -> dict[str, Any] | None:
    if inc is None:
        return None
    return {**inc, "restored": {n: r["at"] for n, r in inc["restored"].items()}}
