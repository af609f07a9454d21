"""Rollback through the real store and sync: exactly the pre-images of rows changed since the
healthy point come back, at the source and at a replica; other rows are left alone."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.guard.baseline import LaggedStore
from ekko.guard.replica_guard import covers
from ekko.guard.source_guard import SourceGuard
from ekko.protocol.messages import Chunk
from ekko.protocol.ready import Applied
from ekko.protocol.testing import SimNetwork
from ekko.schedule import WritePort
from ekko.store import Store
from ekko.store.clock import FakeClock
from ekko.store.spec import TableSpec

DIM = 4


def converge(net: SimNetwork) -> None:
    """Let the simulated sync run until the replica holds what the source holds."""
    net.run_for(3.0)


class FakeTrainer:
    """Records what the guard asks of the trainer."""

    def __init__(self) -> None:
        self.paused: str | None = None
        self.loaded: dict = {}

    def quarantine(self, why: str) -> int:
        self.paused = why
        return 7

    def load_rows(self, rows: dict, gone: dict | None = None) -> None:
        self.loaded = rows

    def resume(self) -> None:
        self.paused = None


def setup(replicas: list[str], clock: FakeClock):
    store = Store(origin=0)
    sent: list[tuple[str, dict]] = []
    trainer = FakeTrainer()
    sink = WritePort(store, clock=clock)
    guard = SourceGuard(
        "ctr",
        sink,
        ["emb"],
        trainer,
        replicas,
        lambda p, b: sent.append((p, b)),
        None,
        margin_s=0.0,
        quarantine_s=0.0,
        clock=clock,
    )
    sink.create_table(TableSpec("emb", DIM, 4))
    return store, guard, sink, trainer, sent


keys_st = st.lists(st.integers(0, 40), min_size=1, max_size=15)
ops_st = st.tuples(st.sampled_from(["write", "delete"]), keys_st)


@settings(max_examples=25, deadline=None)
@given(before=st.lists(ops_st, max_size=5), after=st.lists(ops_st, min_size=1, max_size=5))
def test_rollback_restores_exactly_the_rows_changed_since_the_healthy_point(before, after):
    """Writes and deletes (an evicted row) after the healthy point are undone: a row that
    held a value then holds it again, one that did not exist then is deleted again."""
    clock = FakeClock(wall=0.0)
    store, guard, sink, trainer, _sent = setup([], clock)
    rng = np.random.default_rng(0)

    def apply(op: str, keys: list[int]) -> None:
        clock.advance(1.0)
        k = np.array(keys, np.int64)
        if op == "delete":
            sink.delete("emb", k, now_ns=clock.ns())
        else:
            sink.write("emb", k, rng.normal(size=(len(keys), DIM)))

    def held() -> dict[int, np.ndarray]:
        every = np.arange(41, dtype=np.int64)
        values, _, found = store.table("emb").lookup(every)
        return {int(k): v.copy() for k, v, f in zip(every, values, found, strict=True) if f}

    for op, keys in before:
        apply(op, keys)
    clock.advance(1.0)
    guard.preimages.mark_healthy(clock.wall())
    healthy_at = clock.wall()
    snapshot = held()
    for op, keys in after:
        apply(op, keys)
    changed = {k for _, keys in after for k in keys}
    incident = guard.rollback(healthy_at, "test")
    now = held()
    assert now.keys() == snapshot.keys()
    for k, v in now.items():
        np.testing.assert_array_equal(v, snapshot[k])
    assert incident["rows_restored"] == len(changed)
    assert incident["source_mismatches"] == 0 and incident["good_rows_lost"] == 0
    assert trainer.paused is not None and set(trainer.loaded["emb"][0]) == changed


def test_rollback_reaches_a_replica_by_sync_and_it_reports_matching_digests():
    clock = FakeClock(wall=0.0)
    store, guard, sink, _trainer, sent = setup(["r1"], clock)
    replica = Store(origin=1)
    net = SimNetwork(seed=1)
    net.add_node("src", store)
    net.add_node("r1", replica, upstream="src")
    rng = np.random.default_rng(1)
    sink.write("emb", np.arange(100), rng.normal(size=(100, DIM)))
    clock.advance(10.0)
    guard.preimages.mark_healthy(10.0)
    guard.report({"node": "r1", "state": "healthy", "epoch": 0})
    clock.advance(10.0)
    sink.write("emb", np.arange(50, 150), rng.normal(size=(100, DIM)))
    converge(net)
    poisoned = replica.table("emb").digest()
    guard.report({"node": "r1", "state": "corrupted", "reason": "test", "epoch": 0})
    inc = guard.incident
    assert inc is not None and [p for p, _ in sent] == ["guard/redirect", "guard/rolled_back"]
    mark = sent[-1][1]["watermark"]
    assert np.asarray(mark["emb"]).shape == store.table("emb").knowledge.shape  # shard x lane
    converge(net)
    assert replica.table("emb").digest() == store.table("emb").digest() != poisoned
    assert covers(replica, mark) and not covers(Store(), mark)
    guard.restored(
        {
            "node": "r1",
            "at": inc["decided_at"] + 1,
            "digests": {"emb": f"{replica.table('emb').digest():016x}"},
        }
    )
    done = guard.incidents[-1]
    assert done["good_rows_lost"] == 0 and done["replica_table_mismatches"] == {}
    assert guard.incident is None
    # a stale "corrupted" report from before the rollback starts nothing new
    guard.report({"node": "r1", "state": "corrupted", "reason": "late", "epoch": 0})
    assert guard.incident is None and len(guard.incidents) == 1


def _chunk(keys, value: float, versions, wtime_ns: int) -> Chunk:
    n = len(keys)
    e = np.empty(0, np.int64)
    return Chunk(
        "emb",
        0,
        e,
        e,
        e,
        e,
        np.array(keys, np.int64),
        np.full((n, 2), value, np.float32),
        np.array(versions, np.int64),
        np.full(n, wtime_ns, np.int64),
    )


def test_lagged_store_follows_late_freezes_and_drops_rows_written_after_a_point():
    lagged = LaggedStore(lag_s=5.0)
    spec = (TableSpec("emb", 2, 2),)
    lagged.offer(Applied(spec, (_chunk([1, 2], 1.0, [1, 1], 1_000),), 0.0), now=0.0)
    lagged.offer(Applied((), (_chunk([2, 3], 2.0, [2, 1], 2_000),), 1.0), now=1.0)
    assert lagged.advance(4.9) == 0 and "emb" not in lagged.store.tables
    assert lagged.advance(5.0) == 2
    lagged.freeze()
    assert lagged.advance(100.0) == 0
    assert lagged.drop_written_after(1_500) == 2
    lagged.unfreeze()
    lagged.advance(100.0)
    values, _, found = lagged.store.table("emb").lookup(np.array([1, 2, 3]))
    assert found.tolist() == [True, True, False]
    np.testing.assert_array_equal(values[1], [1.0, 1.0])


def test_a_redirect_overtaken_by_its_rollback_is_ignored():
    from ekko.guard.detector import DetectorConfig
    from ekko.guard.replica_guard import ReplicaGuard
    from ekko.guard.state import State
    from ekko.node.config import ModelConfig
    from ekko.serve import InferenceService

    svc = InferenceService(
        Store(), ModelConfig(name="ctr", embedding_dim=8, rows_per_table=100).served()
    )
    sent: list = []
    guard = ReplicaGuard.build(
        "r1",
        svc,
        LaggedStore(1.0),
        DetectorConfig(),
        3,
        None,
        lambda p, b: sent.append((p, b)),
        0.3,
    )
    guard.rolled_back(0.0, {})  # the rollback of incident 0 arrives first ...
    assert guard.health.state is State.RECOVERING and guard.router.redirected
    guard.redirect("late", epoch=0)  # ... then its redirect: stale, no new corruption
    assert guard.health.state is State.RECOVERING
    guard.redirect("next incident", epoch=1)
    assert guard.health.state is State.CORRUPTED


def test_gate_acts_only_on_an_online_model_worse_than_the_baseline_twice():
    from ekko.guard.detector import CORRUPTED, DetectorConfig, Verdict
    from ekko.guard.replica_guard import ReplicaGuard
    from ekko.guard.state import Event
    from ekko.node.config import ModelConfig
    from ekko.quality.windowed import QualitySnapshot
    from ekko.serve import InferenceService

    svc = InferenceService(
        Store(), ModelConfig(name="ctr", embedding_dim=8, rows_per_table=100).served()
    )
    guard = ReplicaGuard.build(
        "r1", svc, LaggedStore(1.0), DetectorConfig(), 3, None, lambda p, b: None, 0.3
    )
    critical = Verdict(13.0, CORRUPTED, "corrupted", 5.0, 5.0, False, 0.0)

    def snap(ll: float, auc: float) -> QualitySnapshot:
        return QualitySnapshot(500, 100, auc, ll, 1.0, 0.2, 1.0, 0.0, 0.0)

    better, worse_ = snap(0.50, 0.80), snap(0.70, 0.60)
    base = snap(0.55, 0.75)
    assert guard._gate(critical, better, base)[0] is Event.SCORE_NORMAL  # lead narrowed only
    assert guard._gate(critical, worse_, base)[0] is Event.SCORE_HIGH  # worse once
    assert guard._gate(critical, worse_, base)[0] is Event.SCORE_CRITICAL  # worse twice


def test_a_deferring_source_rolled_back_never_releases_pre_rollback_rows_over_restored_ones():
    """Issue 14: the rollback wrote the table directly, so rows the scheduler held from the
    poisoned interval were released over the restored values once their bound was due, and
    drift from that interval stayed with the restored keys. (On the old path this test fails
    on both: 50 rows back at the poisoned value after ``release``, drift 52 left.)"""
    from ekko.schedule import SchedulerConfig, UpdateScheduler

    clock = FakeClock(wall=0.0)
    store = Store(origin=0)
    cfg = SchedulerConfig(
        defer=True, defer_min_significance=0.5, max_staleness_s=2.0, accumulate_drift=True
    )
    scheduler = UpdateScheduler(cfg)
    port = WritePort(store, scheduler, clock=clock)
    guard = SourceGuard(
        "ctr", port, ["emb"], FakeTrainer(), [], lambda p, b: None, None,
        margin_s=0.0, quarantine_s=0.0, clock=clock,
    )  # fmt: skip
    port.create_table(TableSpec("emb", DIM, 4))
    keys = np.arange(100, dtype=np.int64)
    drifted, held = keys[:50], keys[50:]
    for step in range(1, 20):  # the running mean |Δ|; every key in the low lane
        clock.advance(0.01)
        port.write("emb", keys, np.full((100, DIM), step, np.float32))
    clock.advance(0.3)
    port.write("emb", held, np.full((50, DIM), 1e3, np.float32))  # high lane: no drift
    healthy = store.table("emb").lookup(keys)[0].copy()
    clock.advance(0.5)
    guard.preimages.mark_healthy(clock.wall())
    healthy_at = clock.wall()
    clock.advance(0.5)  # the poisoned interval: a low-lane write (drift) and a held one
    port.write("emb", drifted, np.full((50, DIM), 39.0, np.float32))
    port.write("emb", held, np.full((50, DIM), 1e3 + 1e-4, np.float32))
    assert scheduler.statistics().rows_held == 50
    assert scheduler.drift is not None
    assert (scheduler.drift.drift("emb", drifted, np.zeros(50)) > 0).all()
    incident = guard.rollback(healthy_at, "test")
    assert incident["rows_restored"] == 100
    np.testing.assert_array_equal(store.table("emb").lookup(keys)[0], healthy)
    np.testing.assert_array_equal(scheduler.drift.drift("emb", keys, np.zeros(100)), 0.0)
    clock.advance(10.0)  # far past the staleness bound of every row held before the rollback
    assert port.release(clock.wall(), clock.ns()) == 0
    np.testing.assert_array_equal(store.table("emb").lookup(keys)[0], healthy)
    assert scheduler.statistics().rows_held == 0


def test_no_second_rollback_within_the_quarantine_of_the_first():
    """Nothing is written while a rollback's quarantine holds, so a corrupted report then
    would only restore to the same point again: it is declined (counted, logged once), and
    after the quarantine a corrupted report rolls back again. Without the rule a replica
    judging the restored model below its newer frozen baseline started an incident a second
    (the partitioned acceptance run, with the restore point 1.5 s earlier)."""
    clock = FakeClock(wall=100.0)
    _store, guard, sink, _trainer, _sent = setup(["r1"], clock)
    guard.quarantine_s = 10.0
    keys = np.arange(4, dtype=np.int64)
    sink.write("emb", keys, np.full((4, DIM), 1.0, np.float32))
    for _ in range(5):
        clock.advance(1.0)
        guard.report({"node": "r1", "state": "healthy", "epoch": 0})
        guard.tick(clock.wall())
    sink.write("emb", keys, np.full((4, DIM), 9.0, np.float32))  # the poison
    clock.advance(1.0)
    guard.report({"node": "r1", "state": "corrupted", "reason": "auc", "epoch": 0})
    guard.restored({"node": "r1", "at": clock.wall(), "digests": {}})
    assert len(guard.incidents) == 1 and guard.incident is None
    for _ in range(3):  # the restored model judged corrupted again, inside the quarantine
        clock.advance(1.0)
        guard.report({"node": "r1", "state": "corrupted", "reason": "auc", "epoch": 1})
    assert len(guard.incidents) == 1 and guard.incident is None
    assert guard.rollbacks_declined == 3 and guard.status()["rollbacks_declined"] == 3
    clock.advance(10.0)  # the quarantine is over: new writes may have landed
    guard.report({"node": "r1", "state": "corrupted", "reason": "auc", "epoch": 1})
    assert guard.incident is not None or len(guard.incidents) == 2
