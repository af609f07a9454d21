"""The guard at a partition holder of a partitioned cluster: its lagged baseline, frozen,
cleaned and released on the coordinator's word, and its report once it holds a rollback.

A holder (a syncing replica that is no partition's source) serves its partitions' rows to
the serving nodes' scatters: online rows from its store, baseline rows from a ``LaggedStore``
fed by its own apply port. During an incident the coordinator tells it, in order:
``redirect`` (freeze the baseline: poisoned rows still queued must never reach it),
``rolled_back`` (drop queued rows written after the healthy point; once the store covers
the sources' watermark on the shards of the partitions held here, re-anchor the baseline on
the restored state and report) and ``healthy`` (release the baseline). Every message
carries the incident's epoch; one about an incident older than the one in hand is stale and
ignored (said in the log), never acted on.

No I/O here: ``send(path, body)`` posts to the coordinator, the node supplies it; time is
the injected clock's.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ekko.guard.baseline import LaggedStore
from ekko.guard.log import TransitionLog
from ekko.store import Store
from ekko.store.clock import SYSTEM_CLOCK, Clock
from ekko.store.placement import Placement

log = logging.getLogger(__name__)

Send = Callable[[str, dict[str, Any]], None]


class WatermarkError(ValueError):
    """A ``rolled_back`` watermark that cannot be a table's knowledge (not shards x lanes of
    integers, or not this table's shape): refused (HTTP 400), never waited on forever."""


def watermark_arrays(store: Store, watermark: dict[str, Any]) -> dict[str, np.ndarray]:
    """``watermark`` (table -> knowledge as nested lists) as int64 [shards, lanes] arrays,
    each checked against the table's knowledge here when this store has the table already;
    ``WatermarkError`` naming the table otherwise."""
    out: dict[str, np.ndarray] = {}
    for table, marks in watermark.items():
        try:
            m = np.asarray(marks, dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as exc:
            raise WatermarkError(
                f"watermark[{table!r}]: not a shards x lanes array of integers ({exc})"
            ) from None
        if m.ndim != 2:
            raise WatermarkError(
                f"watermark[{table!r}]: expected shards x lanes integers, got shape {m.shape}"
            )
        t = store.tables.get(table)
        if t is not None and m.shape != t.knowledge.shape:
            raise WatermarkError(
                f"watermark[{table!r}]: shape {m.shape}, but table {table!r} has "
                f"{t.knowledge.shape[0]} shards x {t.knowledge.shape[1]} lanes here"
            )
        out[table] = m
    return out


def covers_held(
    store: Store, marks: dict[str, np.ndarray], placement: Placement, held: Sequence[int]
) -> bool:
    """Whether ``store`` holds every version of ``marks`` on the shards of the partitions
    ``held`` (the other shards' knowledge stays 0 at a holder: they are not checked). A table
    missing here is not covered; one whose shape disagrees raises ``WatermarkError``."""
    for table, m in marks.items():
        t = store.tables.get(table)
        if t is None:
            return False
        if m.shape != t.knowledge.shape:
            raise WatermarkError(
                f"watermark[{table!r}]: shape {m.shape}, but table {table!r} has "
                f"{t.knowledge.shape[0]} shards x {t.knowledge.shape[1]} lanes here"
            )
        mine = np.isin(placement.partitions_of(table, t.num_shards), np.asarray(held))
        if not (t.knowledge[mine] >= m[mine]).all():
            return False
    return True


class HolderGuard:
    """One model's guard at one partition holder.

    Why apart from ``ReplicaGuard``: a holder judges nothing (it may serve no traffic); it
    only keeps the baseline the serving nodes read safe through an incident and proves, with
    a digest per (table, partition) it holds, that it has the rollback. A node that both
    serves and holds runs one of each.

    Why epochs: the coordinator's messages travel as separate retried POSTs and may overtake
    each other. ``epoch`` here is the number of rollbacks taken (incident k's messages carry
    k); a ``healthy`` that arrives before its ``rolled_back`` is kept and acted on once the
    restore is here (releasing the baseline before the drop would let queued poison in).

    Args:
        node: this holder's name (in reports).
        model: the guarded model.
        lagged: the baseline's lagged store (shared by the node's models).
        store: the node's online store (what the restore reaches by sync).
        placement: which partition holds each (table, shard).
        held: the partitions this node holds.
        log_: the node's durable transition log.
        send: ``send(path, body)`` posts to the coordinator's admin API.
        clock: wall time for reports and the log.
    """

    def __init__(
        self,
        node: str,
        model: str,
        lagged: LaggedStore,
        store: Store,
        placement: Placement,
        held: Sequence[int],
        log_: TransitionLog | None,
        send: Send,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not held:
            raise ValueError(f"HolderGuard({node}, {model}): a holder holds at least one partition")
        self.node = node
        self.model = model
        self.lagged = lagged
        self.store = store
        self.placement = placement
        self.held = tuple(sorted(held))
        self.log = log_
        self.send = send
        self.clock = clock
        self.epoch = 0  # rollbacks taken; incident k's messages carry epoch k
        self.frozen_for: int | None = None  # the incident whose redirect froze the baseline
        self.pending: dict[str, Any] | None = None  # a rollback not covered here yet
        self.healthy_early: int | None = None  # a "healthy" that overtook its restore
        self.restores: deque[dict[str, Any]] = deque(maxlen=20)
        self.stale = 0  # messages ignored as about an older incident
        self.reported = 0  # rollbacks reported with digests
        # after a restart the node asks the coordinator's health page (``coordinator_says``):
        # its "healthy" or its redirect may have been sent while this node was down
        self.ask_coordinator = False
        self.last_event = ""

    # -- the coordinator's messages ---------------------------------------------------------

    def redirect(self, why: str, epoch: int | None) -> bool:
        """Incident ``epoch`` began: freeze the baseline. False: stale (ignored)."""
        k = self.epoch if epoch is None else epoch
        if k < self.epoch:
            return self._stale("redirect", k)
        if self.frozen_for is None or k > self.frozen_for:
            self.frozen_for = k
        self.lagged.freeze()
        self._record("redirect", f"baseline frozen for incident {k}: {why}", epoch=k)
        return True

    def rolled_back(self, epoch: int, healthy_wall: float, watermark: dict[str, Any]) -> bool:
        """The sources restored the state of ``healthy_wall`` (their knowledge after it:
        ``watermark``). Drop the queued baseline rows written since, wait for the restore
        on the held partitions' shards, then report. False: stale (ignored);
        ``WatermarkError``: a watermark of the wrong shape, refused before anything moves."""
        if epoch < self.epoch:
            return self._stale("rolled_back", epoch)
        marks = watermark_arrays(self.store, watermark)
        if self.frozen_for is None or self.frozen_for < epoch:
            # its redirect is late or lost: the rollback alone is reason enough to freeze
            self.redirect(f"rolled_back of incident {epoch} came first", epoch)
        dropped = self.lagged.drop_written_after(int(healthy_wall * 1e9))
        self.pending = {
            "epoch": epoch,
            "healthy_wall": healthy_wall,
            "marks": marks,
            "since": self.clock.wall(),
            "dropped": dropped,
            "error": None,
        }
        self.epoch = epoch + 1
        self._record(
            "rolled_back",
            f"incident {epoch}: restored to {healthy_wall:.3f}; dropped {dropped} queued "
            f"baseline rows written since; waiting for the restore on partitions "
            f"{list(self.held)}",
            epoch=epoch,
            healthy_wall=healthy_wall,
            watermark={t: m.tolist() for t, m in marks.items()},
        )
        self.poll()
        return True

    def healthy(self, epoch: int) -> bool:
        """Incident ``epoch`` is over at the coordinator: release the baseline (at once, or
        once this holder has that incident's restore). False: stale (ignored)."""
        if self.frozen_for is not None and epoch < self.frozen_for:
            return self._stale("healthy", epoch)
        if epoch >= self.epoch or (self.pending is not None and self.pending["epoch"] == epoch):
            self.healthy_early = max(epoch, self.healthy_early or 0)
            self._record(
                "healthy",
                f"incident {epoch} healthy at the coordinator before its restore was here: "
                f"the baseline stays frozen until it is",
            )
            return True
        self._unfreeze(epoch)
        return True

    def coordinator_says(self, health: dict[str, Any]) -> None:
        """The coordinator's health page, asked after a restart. Resumed frozen: healthy
        with no incident in progress means the incident this holder froze for is over (its
        ``healthy`` message came while this node was down, or it never rolled back); the
        baseline is released at once, or once a rollback still pending here is covered.
        Started live (no data dir, or released before): an incident in progress (corrupted,
        recovering, an incident) freezes the baseline as its redirect would have."""
        k = self.frozen_for
        if k is None:
            self.ask_coordinator = False
            inc = health.get("incident") or {}
            if health.get("state") in ("corrupted", "recovering") or inc:
                # started live (no data, or released before) inside an incident: freeze
                done = health.get("incidents") or [{}]
                epoch = inc.get("epoch", done[-1].get("epoch", 0))
                why = f"started live while the coordinator is {health.get('state')}"
                self.redirect(why, epoch if isinstance(epoch, int) else 0)
                self.ask_coordinator = True
            return
        if health.get("state") != "healthy" or health.get("incident") is not None:
            return
        self.ask_coordinator = False
        if self.pending is not None:
            self.healthy_early = max(k, self.healthy_early or 0)
            self._record("healthy", f"the coordinator has no incident in progress: the "
                         f"baseline is released once incident {k}'s restore is here")  # fmt: skip
            return
        self._unfreeze(k)

    def poll(self) -> None:
        """Cheap and frequent (after every applied response): is the rollback here?"""
        p = self.pending
        if p is None or p["error"] is not None:
            return
        try:
            done = covers_held(self.store, p["marks"], self.placement, self.held)
        except WatermarkError as exc:  # the table arrived with another shape than announced
            p["error"] = str(exc)
            self._record("restore_failed", f"incident {p['epoch']}: {exc}")
            return
        if done:
            self._restored(p)

    # -- internals --------------------------------------------------------------------------

    def _restored(self, p: dict[str, Any]) -> None:
        self.pending = None
        # The baseline becomes the restored state before the report: once every holder has
        # reported, the serving nodes judge the restored model against it, never against a
        # baseline newer than the restore point (``LaggedStore.reanchor`` says why).
        rows = self.lagged.reanchor(self.store, p["marks"])
        now = self.clock.wall()
        digests = {}
        for table in p["marks"]:
            parts = self.store.table(table).digest_partitions(self.placement)
            digests[table] = {str(q): f"{parts[q]:016x}" for q in self.held}
        report = {"node": self.node, "at": now, "epoch": p["epoch"], "digests": digests}
        self.restores.append({**report, "waited_s": now - p["since"], "dropped": p["dropped"]})
        self.reported += 1
        self._record(
            "restored",
            f"incident {p['epoch']}: holds the rollback; baseline re-anchored on it ({rows} "
            f"rows); reported",
            epoch=p["epoch"],
        )
        self.send("guard/restored", report)
        if self.healthy_early is not None and self.healthy_early >= p["epoch"]:
            self._unfreeze(p["epoch"])

    def _unfreeze(self, epoch: int) -> None:
        if self.frozen_for is None:
            self._record("healthy", f"incident {epoch} healthy; the baseline was not frozen")
            return
        self.frozen_for = None
        self.healthy_early = None
        self.lagged.unfreeze()
        self._record("released", f"incident {epoch} over: baseline released", epoch=epoch)

    def _stale(self, what: str, epoch: int) -> bool:
        self.stale += 1
        log.info(
            "guard %s on holder %s: ignored a stale %s of incident %d (taken: %d rollbacks, "
            "frozen for %s)",
            self.model, self.node, what, epoch, self.epoch, self.frozen_for,
        )  # fmt: skip
        self.last_event = f"ignored a stale {what} of incident {epoch}"
        return False

    def _record(self, event: str, why: str, **state: Any) -> None:
        """Log ``event``; ``state`` (the incident's epoch, a rollback's watermark) is what
        ``resume`` reads back after a restart."""
        self.last_event = why
        log.warning("guard %s on holder %s: %s: %s", self.model, self.node, event, why)
        if self.log is not None:
            self.log.append(
                {"event": f"holder_{event}", "at": self.clock.wall(), "model": self.model,
                 "node": self.node, "why": why, **state}
            )  # fmt: skip

    def resume(self, records: Sequence[dict[str, Any]]) -> None:
        """Take up where this holder's log (``TransitionLog.read``, oldest first) left off
        before a restart: the rollbacks taken, a baseline frozen by an incident not over yet
        (frozen again now: the catch-up pull is bringing the current, maybe poisoned, rows)
        and a rollback not reported yet (reported once the store covers it again).

        Why: the coordinator sent its redirect once; a holder killed while redirected would
        otherwise come back with a live baseline and apply the poison it pulls."""
        for r in records:
            if r.get("model") != self.model or r.get("node") != self.node:
                continue
            event, k = r.get("event"), r.get("epoch")
            if not isinstance(k, int):
                continue
            if event == "holder_redirect":
                self.frozen_for = max(k, self.frozen_for if self.frozen_for is not None else k)
            elif event == "holder_rolled_back":
                self.epoch = max(self.epoch, k + 1)
                self.frozen_for = max(k, self.frozen_for if self.frozen_for is not None else k)
                marks = {t: np.asarray(m, np.int64) for t, m in r.get("watermark", {}).items()}
                self.pending = {"epoch": k, "healthy_wall": r.get("healthy_wall"),
                                "marks": marks, "since": self.clock.wall(), "dropped": 0,
                                "error": None}  # fmt: skip
            elif event == "holder_restored" and self.pending and self.pending["epoch"] == k:
                self.pending = None
            elif event == "holder_released" and k >= (self.frozen_for or 0):
                self.frozen_for = None
        self.ask_coordinator = True  # live: is an incident in progress? frozen: is it over?
        if self.frozen_for is not None:
            self.lagged.freeze()
            self._record(
                "resumed",
                f"restarted during incident {self.frozen_for}: baseline frozen (empty until "
                f"released: baseline lookups here answer 404 and the scatter asks another "
                f"holder); rollback "
                + ("reported" if self.pending is None else "to report once covered again"),
                epoch=self.frozen_for,
            )

    # -- reading ----------------------------------------------------------------------------

    def summary(self) -> str:
        """One word for ``ekko status``: ``restoring`` (a rollback not covered here yet),
        ``frozen`` (an incident holds the baseline) or ``live``."""
        if self.pending is not None:
            return "restoring"
        return "frozen" if self.frozen_for is not None else "live"

    def status(self) -> dict[str, Any]:
        p = self.pending
        return {
            "node": self.node,
            "role": "holder",
            "partitions": list(self.held),
            "epoch": self.epoch,
            "frozen_for": self.frozen_for,
            "restore_pending": None
            if p is None
            else {k: p[k] for k in ("epoch", "healthy_wall", "since", "dropped", "error")},
            "healthy_early": self.healthy_early,
            "stale_messages": self.stale,
            "last_event": self.last_event,
            "baseline": {
                "lag_s": self.lagged.lag_s,
                "frozen": self.lagged.frozen,
                "queued_rows": self.lagged.rows_queued,
                "applied_rows": self.lagged.rows_applied,
                "dropped_rows": self.lagged.rows_dropped,
            },
            "restores": list(self.restores)[-5:],
        }
