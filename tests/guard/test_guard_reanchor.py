"""After a rollback no guard judges the restored model against a baseline newer than the
restore point: the baseline becomes the restored state when the restore is here.

Found as a storm (reverted c230f60, the storm rule of 1b46899): a restore point older than
the replicas' frozen baseline left the restored model judged below the floor against the
newer baseline, and every report after the quarantine started another rollback restoring 0
rows. Here on a fake clock, a model whose ranking quality is one stored value: it improves
with every write, is poisoned, rolled back to a point 10 s older than the frozen baseline,
and judged through the quarantine by a single-partition ``ReplicaGuard`` and by a serving
node's ``ScatterReplicaGuard`` over a ``HolderGuard``'s lagged store (one mechanism for
both). Without the re-anchor the restored model is judged corrupted again in both.
"""

from __future__ import annotations

import numpy as np
import pytest

from ekko.guard.baseline import LaggedStore
from ekko.guard.detector import DetectorConfig
from ekko.guard.holder_guard import HolderGuard
from ekko.guard.replica_guard import ReplicaGuard
from ekko.guard.scatter_guard import ScatterReplicaGuard
from ekko.guard.state import State
from ekko.node.config import ModelConfig
from ekko.protocol.messages import Chunk
from ekko.protocol.ready import Applied
from ekko.serve import InferenceService
from ekko.serve.service import BASELINE, ONLINE
from ekko.store import Store
from ekko.store.clock import FakeClock
from ekko.store.placement import Placement
from ekko.store.spec import HIGH_LANE, LOW_LANE, TableSpec

SPEC = TableSpec("emb", 1, 4)
KEY = np.array([0], np.int64)
LAG_S = 5.0


class Sim:
    """A source, one replica store (online) and its lagged baseline, synced at each write;
    the model's quality in a variant is the ranking gap (in logits) stored at ``KEY``."""

    def __init__(self, scattered: bool) -> None:
        self.clock = FakeClock(wall=1_000.0)
        self.source, self.replica = Store(origin=0), Store(origin=1)
        self.source.create_table(SPEC)
        self.replica.create_table(SPEC)
        self.lagged = LaggedStore(LAG_S)
        self.reports: list[dict] = []
        self.rng = np.random.default_rng(7)
        svc = InferenceService(
            self.replica, ModelConfig(name="ctr", embedding_dim=8, rows_per_table=100).served()
        )
        kind = ScatterReplicaGuard if scattered else ReplicaGuard
        self.guard = kind.build(
            "n1", svc, self.lagged, DetectorConfig(warmup_intervals=5, min_samples=100), 3,
            None, self._send, 0.3, 0.02, self.clock,
        )  # fmt: skip
        self.holder = None
        if scattered:  # the serving node holds both partitions: its lagged store is theirs
            self.holder = HolderGuard("n1", "ctr", self.lagged, self.replica, Placement(2),
                                      (0, 1), None, self._send, self.clock)  # fmt: skip

    def _send(self, path: str, body: dict) -> None:
        if path == "guard/report":
            self.reports.append(body)

    def write(self, gap: float, lane: int) -> None:
        """A source write of ``KEY`` pulled by the replica at once (its apply port feeds the
        lagged store, as ``ModelHost.follow`` does)."""
        now_ns = self.clock.ns()
        values = np.array([[gap]], np.float32)
        versions = self.source.table("emb").write(KEY, values, now_ns=now_ns, lanes=lane)
        wtimes = np.array([now_ns], np.int64)
        t = self.replica.table("emb")
        t.apply(KEY, values, versions, wtimes, lane)
        for s, ln in zip(*np.nonzero(self.source.table("emb").knowledge), strict=True):
            t.merge_knowledge(int(s), int(ln), int(self.source.table("emb").knowledge[s, ln]))
        e = np.empty(0, np.int64)
        chunk = Chunk("emb", lane, e, e, e, e, KEY, values, versions, wtimes)
        self.lagged.offer(Applied((SPEC,), (chunk,), self.clock.wall()), self.clock.wall())

    def gap(self, store: Store) -> float:
        values, _, found = store.table("emb").lookup(KEY) if "emb" in store.tables else (0, 0, [0])
        return float(values[0, 0]) if found[0] else 0.0

    def interval(self) -> None:
        """One second: the baseline catches up, both variants score 2000 labelled events."""
        self.clock.advance(1.0)
        now = self.clock.wall()
        self.lagged.advance(now)
        for variant, store in ((ONLINE, self.replica), (BASELINE, self.lagged.store)):
            y = (self.rng.random(2000) < 0.3).astype(np.int8)
            logit = self.rng.normal(-1.0, 1.0, 2000) + self.gap(store) * y
            self.guard.service.quality(variant).update(1 / (1 + np.exp(-logit)), y, now - 0.5)
        self.guard.tick(now)

    def rollback(self, healthy_wall: float, gap: float) -> None:
        """What the source does (the restore point's value back as a new version, in the
        high lane) and what it tells the serving node (and the holder) afterwards."""
        self.write(gap, HIGH_LANE)
        mark = {"emb": self.source.table("emb").knowledge.tolist()}
        if self.holder is None:
            self.guard.rolled_back(healthy_wall, mark)
            self.guard.poll()  # the restore rows are here: the guard reports restored
            assert self.guard.restore_pending is None
            return
        assert self.holder.redirect("n1 reports corrupted", 0)
        assert self.holder.rolled_back(0, healthy_wall, mark)  # covered here: reported
        assert self.holder.pending is None
        assert isinstance(self.guard, ScatterReplicaGuard)
        self.guard.rolled_back(healthy_wall, mark, epoch=0)
        assert self.guard.holders_restored(0, self.clock.wall())


@pytest.mark.parametrize("scattered", [False, True], ids=["replica", "scatter"])
def test_a_restored_model_older_than_the_frozen_baseline_is_not_judged_against_it(scattered):
    sim = Sim(scattered)
    walls: dict[float, float] = {}
    for i in range(20):  # training: the model gets better with every write
        sim.write(0.3 + 0.1 * i, LOW_LANE)
        walls[0.3 + 0.1 * i] = sim.clock.wall()
        sim.interval()
    assert sim.guard.health.state is State.HEALTHY, sim.guard.health.history
    for _ in range(6):  # the poison: ranking inverted, caught by the floor
        sim.write(-1.0, LOW_LANE)
        sim.interval()
        if sim.guard.health.state is State.CORRUPTED:
            break
    assert sim.guard.health.state is State.CORRUPTED and sim.lagged.frozen
    frozen = sim.gap(sim.lagged.store)
    restore_gap = 1.0  # written 10 s before the baseline's frozen state
    assert frozen >= restore_gap + 0.9
    sim.rollback(walls[restore_gap], restore_gap)
    assert sim.gap(sim.replica) == pytest.approx(restore_gap)
    # the principle: once the restore is here, the baseline is the restored state, not newer
    assert sim.gap(sim.lagged.store) == pytest.approx(restore_gap)
    assert sim.lagged.frozen and not sim.guard.router.redirected
    sim.reports.clear()
    for _ in range(30):  # the quarantine: nothing is written, the restored model is judged
        sim.interval()
    states = [r["state"] for r in sim.reports]
    assert "corrupted" not in states, sim.guard.health.history[-1].why
    assert sim.guard.health.state is State.RECOVERING and not sim.guard.router.redirected
    for i in range(30):  # training on: quality returns, the model is healthy again
        sim.write(restore_gap + 0.1 * (i + 1), LOW_LANE)
        sim.interval()
        if sim.guard.health.state is State.HEALTHY:
            break
    assert sim.guard.health.state is State.HEALTHY, sim.guard.health.history[-1].why
    assert "corrupted" not in [r["state"] for r in sim.reports]


def test_reanchor_takes_the_restored_rows_only_and_keeps_other_tables_lagging():
    """A replica whose restore came late (the quarantine over, a newer write pulled with it)
    re-anchors on the versions the watermark covers, not the newer ones; a table of another
    model sharing the lagged store is left to lag; queued rows older than the restore do not
    overwrite it when the baseline is released."""
    online, lagged = Store(), LaggedStore(10.0)
    other = TableSpec("other", 1, 4)
    for spec in (SPEC, other):
        online.create_table(spec)
    e = np.empty(0, np.int64)

    def pulled(table: str, key: int, value: float, version: int, lane: int, at: float) -> None:
        k = np.array([key], np.int64)
        args = (np.array([[value]], np.float32), np.array([version], np.int64),
                np.array([int(at * 1e9)], np.int64))  # fmt: skip
        online.table(table).apply(k, *args, lane)
        lagged.offer(Applied((SPEC, other), (Chunk(table, lane, e, e, e, e, k, *args),), at), at)

    def held(table: str, key: int) -> float:
        values, _, found = lagged.store.table(table).lookup(np.array([key], np.int64))
        return float(values[0, 0]) if found[0] else np.nan

    pulled("emb", 1, 1.0, 1, LOW_LANE, 1.0)
    lagged.advance(11.0)  # the baseline holds key 1's first row
    pulled("emb", 0, 1.0, 1, LOW_LANE, 2.0)
    pulled("other", 0, 5.0, 1, LOW_LANE, 2.0)
    pulled("emb", 0, 2.0, 2, HIGH_LANE, 3.0)  # the restore's row
    pulled("emb", 1, 3.0, 5, LOW_LANE, 4.0)  # written after the quarantine
    lagged.freeze()
    mark = np.zeros((4, 3), np.int64)
    mark[:, HIGH_LANE], mark[:, LOW_LANE] = 2, 1  # the sources' knowledge after the restore
    assert lagged.reanchor(online, {"emb": mark}) == 1
    assert (held("emb", 0), held("emb", 1)) == (2.0, 1.0)  # key 1's newer row is not taken
    assert lagged.store.table("other").rows == 0  # another model's table: lagging still
    assert lagged.rows_reanchored == 1
    lagged.unfreeze()
    lagged.advance(100.0)  # the queue: version 1 loses to 2, the rest lands, lagging
    assert (held("emb", 0), held("emb", 1), held("other", 0)) == (2.0, 3.0, 5.0)
