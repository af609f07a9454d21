"""The guard on a serving replica: compare online with baseline, redirect, report, recover.

Every ``interval_s`` the replica takes one evaluation interval of feedback per variant, feeds
the detector and the health state machine, and reports to the source. It acts locally at
once on ``corrupted`` (all traffic to the baseline, the baseline frozen); the source decides
the rollback for every DC and tells each replica when and to what point it rolled back. No
I/O here: messages for the source go through ``send(path, body)``, which the node supplies.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ekko.guard.baseline import LaggedStore
from ekko.guard.detector import Detector, DetectorConfig, Verdict
from ekko.guard.log import TransitionLog
from ekko.guard.router import TrafficRouter
from ekko.guard.state import Event, ModelHealth, State, Transition, event_for_level
from ekko.serve.service import BASELINE, ONLINE, InferenceService
from ekko.store import Store
from ekko.store.clock import SYSTEM_CLOCK, Clock

if TYPE_CHECKING:
    from typing import Self

    from ekko.serve.scatter import PartitionedLookup

log = logging.getLogger(__name__)

Send = Callable[[str, dict[str, Any]], None]

NO_SAMPLES = "no_samples"
WARMING_UP = "warming_up"
JUDGING = "judging"
_BLIND_AFTER = 3  # skipped intervals in a row after which the guard says it has no samples


def covers(store: Store, watermark: dict[str, list[list[int]]]) -> bool:
    """Whether ``store`` holds everything the source held at ``watermark`` (table -> the
    source's knowledge, per shard and lane): a lane the source never wrote is at 0 there."""
    for table, marks in watermark.items():
        t = store.tables.get(table)
        m = np.asarray(marks, np.int64)
        if t is None or m.shape != t.knowledge.shape or not (t.knowledge >= m).all():
            return False
    return True


class ReplicaGuard:
    """Guards one model served by one replica.

    The baseline stays frozen from the redirect until the model is healthy again: while
    recovering it is the known-good reference that a relapse is measured against. Traffic
    returns to the online model as soon as the restore is here (the restored state is the
    healthy checkpoint, usually fresher than the frozen baseline: measured in the demo, the
    baseline served 0.69-0.70 AUC while the restored model scored 0.73-0.79); a relapse
    redirects again.

    Why the baseline is re-anchored on the restored state when the restore is here
    (``LaggedStore.reanchor``, and a fresh detector): the frozen baseline is the online
    state ``lag_s`` before the redirect, so a rollback that goes back further (the margin, a
    slow detection) leaves a baseline NEWER than the restored model. Judged against it, the
    restored model looked worse (below the floor) and every report after the quarantine
    started another rollback restoring nothing (17 in 30 s with c230f60). No guard judges a
    restored model against a baseline newer than the restore point: a serving replica
    re-anchors its own lagged store here, a partition holder its own when it reports
    ``restored`` (``HolderGuard``), so a serving node's scattered baseline is re-anchored
    on every partition by the time ``holders_restored`` arrives (``ScatterReplicaGuard``).

    Why the replica acts before the source answers: redirecting to the baseline is the one
    step that protects users, and it needs nothing but the local verdict; the rollback needs
    the source (it owns versions and pre-images) and reaches every DC by the same sync.

    Args:
        node: this replica's name (in reports).
        service: the model's inference service (online + baseline variants).
        lagged: the baseline's lagged store (shared by the node's models).
        router: the traffic split (baseline share; all-to-baseline when redirected).
        detector: the sequential test on online-minus-baseline quality.
        health: the model's state machine on this replica.
        log_: the node's durable transition log.
        send: ``send(path, body)`` posts to the source's admin API.
        shadow_share: share of online-served events also scored by the baseline.
        recovery_tolerance: after a rollback, the online AUC must come back to within this
            of its level before the incident (or of the frozen baseline's, when there was no
            judged interval before it) before probation can end.
        clock: wall time (stamps in reports and the log) and monotonic time (transitions).
    """

    def __init__(
        self,
        node: str,
        service: InferenceService,
        lagged: LaggedStore,
        router: TrafficRouter,
        detector: Detector,
        health: ModelHealth,
        log_: TransitionLog | None,
        send: Send,
        shadow_share: float,
        recovery_tolerance: float = 0.02,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.clock = clock
        self.node = node
        self.service = service
        self.model = service.name
        self.lagged = lagged
        self.router = router
        self.detector = detector
        self.health = health
        self.log = log_
        self.send = send
        self.shadow_share = shadow_share
        self.last_verdict: Verdict | None = None
        self.restore_pending: dict[str, Any] | None = None
        self.redirected_at: float | None = None
        self.epoch = 0  # rollbacks announced to this replica; reports carry it
        self.redirects: list[float] = []  # wall times traffic was moved to the baseline
        self._worse_streak = 0  # consecutive intervals with online worse than the baseline
        self.recovery_tolerance = recovery_tolerance
        self._skipped = 0  # consecutive intervals without enough samples to judge
        self._judged = 0  # intervals judged so far
        # (wall, AUC) of intervals judged normal while healthy with online ahead of the
        # baseline: the level a rollback must bring the model back to
        self._healthy_auc: deque[tuple[float, float]] = deque(maxlen=600)
        self.recovery: dict[str, Any] | None = None  # the post-rollback check
        self.last_why = ""  # what the last judged interval made of the verdict

    @classmethod
    def build(
        cls,
        node: str,
        service: InferenceService,
        lagged: LaggedStore,
        detector_config: DetectorConfig,
        probation: int,
        log_: TransitionLog | None,
        send: Send,
        shadow_share: float,
        recovery_tolerance: float = 0.02,
        clock: Clock = SYSTEM_CLOCK,
        *,
        baseline_rows: PartitionedLookup | None = None,
    ) -> Self:
        """The guard of ``service`` with its baseline variant over ``lagged``: read from its
        store, or by ``baseline_rows`` (a partitioned cluster: the holders' lagged stores)."""
        service.add_variant(BASELINE, lagged.store, rows=baseline_rows)
        guard = cls(
            node, service, lagged, TrafficRouter(service.model.baseline_share),
            Detector(detector_config), ModelHealth(service.name, probation, clock.wall), log_, send,
            shadow_share, recovery_tolerance, clock,
        )  # fmt: skip
        service.set_split(guard.router.baseline_mask, shadow_share)
        return guard

    # -- the interval loop ------------------------------------------------------------------

    def tick(self, now: float) -> Verdict:
        """One evaluation interval: detect, move the state machine, act, report."""
        online = self.service.quality(ONLINE).take_interval(now)
        baseline = self.service.quality(BASELINE).take_interval(now)
        verdict = self.detector.observe(online, baseline, now)
        self.last_verdict = verdict
        self._skipped = self._skipped + 1 if verdict.skipped else 0
        if not verdict.skipped:
            self._judged += 1
            metrics = {
                **online.as_metrics(self.model, ONLINE, "interval"),
                **baseline.as_metrics(self.model, BASELINE, "interval"),
                f"{self.model}.detector.score": verdict.score,
            }
            event, why = self._gate(verdict, online, baseline)
            if self.health.state is State.RECOVERING:
                event, why = self._check_recovery(event, why, online, baseline)
            self.last_why = why
            if (
                event is Event.SCORE_NORMAL
                and self.health.state is State.HEALTHY
                and self._worse_streak == 0  # online beat the baseline: not a poison's ramp
                and math.isfinite(online.auc)
            ):
                self._healthy_auc.append((self.clock.wall(), online.auc))
            self._handle(event, now, why, metrics)
        self.poll()
        self.send("guard/report", self.report_body())
        return verdict

    def _gate(self, verdict: Verdict, online, baseline) -> tuple[Event, str]:
        """Act only on a model that is *worse than the baseline*, two intervals running.

        The CUSUM watches the online-minus-baseline difference against its healthy history,
        and that difference also moves when the online model's lead over the lagged baseline
        merely narrows (the stream drifting more slowly, say); measured on the rollback
        bench, that alone raised false alarms. An update hurts when the online model does
        worse than the older one, so a high score while the online model still beats the
        baseline is recorded but not acted on, and corruption needs it worse twice in a row.
        """
        worse = online.log_loss > baseline.log_loss or baseline.auc > online.auc
        self._worse_streak = self._worse_streak + 1 if worse else 0
        event = event_for_level(verdict.level)
        if event is Event.SCORE_NORMAL:
            return event, verdict.reason
        if not worse:
            return Event.SCORE_NORMAL, f"{verdict.reason}; online still beats the baseline"
        if event is Event.SCORE_CRITICAL and self._worse_streak < 2:
            return Event.SCORE_HIGH, f"{verdict.reason}; worse than the baseline once so far"
        return event, verdict.reason

    def _check_recovery(self, event: Event, why: str, online, baseline) -> tuple[Event, str]:
        """After a rollback, probation ends only once quality is back: the online AUC (mean
        of the last ``probation`` judged intervals since the restore arrived) within
        ``recovery_tolerance`` of its level before the incident. Until then a normal verdict
        counts as high (the model stays recovering, traffic on the baseline) and says why."""
        rec = self.recovery
        if rec is None or self.restore_pending is not None or event is not Event.SCORE_NORMAL:
            return event, why
        n = self.health.probation
        if math.isfinite(online.auc):
            rec["online"].append(online.auc)
            rec["baseline"].append(baseline.auc if math.isfinite(baseline.auc) else math.nan)
        recent = rec["online"][-n:]
        if not recent:
            return Event.SCORE_HIGH, "post-rollback check: no online AUC yet"
        have = sum(recent) / len(recent)
        if rec["pre_incident_auc"] is not None:
            want, what = rec["pre_incident_auc"], "its level before the incident"
        else:
            base = [b for b in rec["baseline"][-n:] if math.isfinite(b)]
            if not base:
                return Event.SCORE_HIGH, "post-rollback check: no baseline AUC yet"
            want, what = sum(base) / len(base), "the frozen baseline's"
        rec["online_auc"] = have
        rec["ok"] = have >= want - self.recovery_tolerance
        rec["why"] = (
            f"post-rollback check: online AUC {have:.4f} (mean of {len(recent)} intervals) vs "
            f"{want:.4f}, {what} (tolerance {self.recovery_tolerance:g})"
        )
        if not rec["ok"]:
            return Event.SCORE_HIGH, f"{rec['why']}: quality has not returned"
        return event, f"{why}; {rec['why']}: ok"

    def poll(self) -> None:
        """Cheap and frequent (after every applied response): has the rollback arrived?"""
        if self.restore_pending is not None and covers(
            self.service.replica_store(ONLINE), self.restore_pending["watermark"]
        ):
            self._restored()

    def _handle(self, event: Event, now: float, why: str, metrics: dict[str, float]) -> None:
        before = self.health.state
        tr = self.health.handle(event, now, why, metrics)
        if tr is None:
            return
        self._record(tr)
        if tr.to_state is State.HEALTHY and self.recovery is not None:
            self.recovery["ok"] = True
        if tr.to_state is State.CORRUPTED:
            self.redirect(f"detected here: {why}")
        elif tr.to_state is State.HEALTHY and before is State.RECOVERING:
            self.router.restore()
            self.lagged.unfreeze()  # the healthy reference may move on again
            self.redirected_at = None
            log.info("model %s healthy again on %s: traffic back to online", self.model, self.node)

    def _record(self, tr: Transition | dict[str, Any]) -> None:
        doc = tr.to_dict() if isinstance(tr, Transition) else tr
        doc = {**doc, "node": self.node}
        log.warning(
            "guard %s on %s: %s",
            self.model,
            self.node,
            {k: doc.get(k) for k in ("from", "to", "event", "why")},
        )
        if self.log is not None:
            self.log.append(doc)

    # -- actions ----------------------------------------------------------------------------

    def redirect(self, why: str, epoch: int | None = None, *, automatic: bool = True) -> None:
        """All traffic to the baseline now; freeze the baseline so queued poison never
        reaches it. ``epoch``: the source's incident number; a redirect that arrives after
        that incident's rollback (messages may overtake each other) is stale and ignored.
        ``automatic``: a detector's decision (False: an operator's rollback)."""
        if epoch is not None and epoch < self.epoch:
            return
        if not self.router.redirected:
            self.router.redirect_all_to_baseline()
            self.redirected_at = self.clock.wall()
            self.redirects.append(self.redirected_at)
            self._record(
                {"event": "redirect", "at": self.redirected_at, "why": why, "model": self.model}
            )
        self.lagged.freeze()
        if self.health.state is not State.CORRUPTED:
            event = Event.AUTOMATIC_ROLLBACK if automatic else Event.OPERATOR_ROLLBACK
            tr = self.health.handle(event, self.clock.mono(), why)
            if tr is not None:
                self._record(tr)

    def rolled_back(
        self,
        healthy_wall: float,
        watermark: dict[str, list[list[int]]],
        *,
        automatic: bool = True,
    ) -> None:
        """The source wrote the healthy values back; drop queued rows written since the
        healthy point and wait until the restore rows are all here."""
        dropped = self.lagged.drop_written_after(int(healthy_wall * 1e9))
        self.restore_pending = {
            "watermark": watermark,
            "since": self.clock.wall(),
            "healthy_wall": healthy_wall,
            "dropped": dropped,
        }
        if self.health.state is not State.CORRUPTED:
            self.redirect("rollback announced by the source", automatic=automatic)
        tr = self.health.handle(
            Event.ROLLBACK_DONE,
            self.clock.mono(),
            f"source restored the state of {healthy_wall:.3f}",
        )
        if tr is not None:
            self._record(tr)
        self.epoch += 1
        # A fresh detector: the online model is now about as old as the baseline, so the
        # reference learned while online ran ahead of it no longer describes "healthy".
        self.detector = Detector(self.detector.config)
        # The level before the incident: the last intervals judged normal, online ahead of
        # the baseline, before traffic left the online model (not only before the restored
        # checkpoint: a poison in the first minute comes before the replica judged anything).
        # Without the "ahead" condition the poison's first intervals, not yet below the
        # floor, pulled the median from 0.80 to 0.73-0.76 in the 90 s demo.
        until = self.redirected_at if self.redirected_at is not None else self.clock.wall()
        before = [a for at, a in self._healthy_auc if at <= until][-30:]
        self.recovery = {
            "pre_incident_auc": float(np.median(before)) if before else None,
            "online": [],
            "baseline": [],
            "online_auc": None,
            "ok": None,
            "why": "post-rollback check: waiting for the restore",
        }

    def _restored(self) -> None:
        pending, self.restore_pending = self.restore_pending, None
        assert pending is not None
        self.router.restore()
        store = self.service.replica_store(ONLINE)
        rows = self.lagged.reanchor(store, pending["watermark"])
        self._judge_afresh()
        digests = {t: f"{store.table(t).digest():016x}" for t in pending["watermark"]}
        self._record(
            {
                "event": "restored",
                "at": self.clock.wall(),
                "model": self.model,
                "why": f"holds the rollback (dropped {pending['dropped']} queued rows "
                f"from the baseline; re-anchored it on the restored state: {rows} rows)",
            }
        )
        self.send(
            "guard/restored", {"node": self.node, "at": self.clock.wall(), "digests": digests}
        )

    def _judge_afresh(self) -> None:
        """The baseline is the restored state now: a fresh detector (its reference, and any
        floor breach counted while the restore was on its way, compared online with the
        baseline before it)."""
        self.detector = Detector(self.detector.config)
        self._worse_streak = 0

    # -- reading ----------------------------------------------------------------------------

    @property
    def judging(self) -> str:
        """Whether this guard can judge the model: ``no_samples`` (no interval with enough
        feedback in either variant lately), ``warming_up`` (only the absolute floor judges
        until the CUSUM has its reference) or ``judging``."""
        if self._judged == 0 or self._skipped >= _BLIND_AFTER:
            return NO_SAMPLES
        return JUDGING if self.detector.warmed_up else WARMING_UP

    def judgement(self) -> str:
        """``judging`` for humans: "no samples", "warming up 5/20" or "judging"."""
        j = self.judging
        if j == NO_SAMPLES:
            return "no samples"
        if j == WARMING_UP:
            done, need = self.detector.warmup_progress
            return f"warming up {done}/{need}"
        return "judging"

    def report_body(self) -> dict[str, Any]:
        v = self.last_verdict
        return {
            "node": self.node,
            "state": str(self.health.state),
            "judging": self.judging,
            "judgement": self.judgement(),
            "score": self.detector.score,
            "level": self.detector.level,
            "warmed_up": self.detector.warmed_up,
            "reason": v.reason if v else None,
            "why": self.last_why,
            "epoch": self.epoch,
            "at": self.clock.wall(),
        }

    def status(self) -> dict[str, Any]:
        return {
            **self.report_body(),
            "redirected": self.router.redirected,
            "redirected_at": self.redirected_at,
            "redirects": self.redirects[-20:],
            "baseline": {
                "lag_s": self.lagged.lag_s,
                "frozen": self.lagged.frozen,
                "queued_rows": self.lagged.rows_queued,
                "applied_rows": self.lagged.rows_applied,
            },
            "restore_pending": self.restore_pending is not None,
            "recovery": None
            if self.recovery is None
            else {k: v for k, v in self.recovery.items() if k not in ("online", "baseline")},
            "transitions": [t.to_dict() for t in self.health.history[-20:]],
        }
