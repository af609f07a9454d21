"""Sharded ranks through a rollback (issue 17): two real rank processes (gloo) publish to fake
partition sources that roll back and refuse writes as quarantined (409, ``Quarantined``);
every rank pauses, reloads what its sources hold, and trains on.

A fake source (``RollingSource``) keeps a log of its writes stamped by the rank's fake clock;
a ``Rollback`` at ``at`` drops the writes since ``healthy`` (the restore) and, when
``refuse``, refuses writes until ``until``. The labels are flipped between ``healthy`` and
``at`` (the poison the rollback undoes). Every scenario runs in one pair of processes, one
after another, against the same stream: a run without a rollback is the AUC reference."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch

from ekko.client.errors import ClientError, Quarantined
from ekko.client.wire import TableRows
from ekko.quality.offline import auc
from ekko.store.placement import Placement
from ekko.store.spec import TableSpec
from ekko.train.dlrm import DLRMConfig
from ekko.train.publisher import PublisherConfig
from ekko.train.sharded import ShardedTrainer
from ekko.train.sharded_launch import RankContext, ShardedRun
from ekko.train.sharded_publish import PartitionRouter
from ekko.train.sharded_quarantine import QuarantineConfig
from ekko.train.sharded_reload import _initial, dense_tables
from ekko.train.streams import StreamConfig, SyntheticStream
from ekko.train.trainer import TrainerConfig

STREAM = StreamConfig(seed=3, max_vocab=5_000, initial_items=2_000)
MODEL = DLRMConfig(rows_per_table=4_000, embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(16, 1))
ADAGRAD = TrainerConfig(optimizer="adagrad")
PARTS = Placement(3)
STEPS, BATCH = 36, 512
PUBLISH = PublisherConfig(dense_interval_s=0.0)  # dense every step: the store's are recent
T0 = 1_000.0  # the fake clock's start; it moves 1 s a call (about a step)


class StepClock:
    """A fake wall clock: every call moves it one second on; ``peek`` reads it."""

    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t

    def peek(self) -> float:
        return self.t


@dataclass(frozen=True)
class Rollback:
    at: float  # when the source restores and starts refusing (fake clock)
    until: float  # the quarantine's end, as its refusals say
    epoch: int
    healthy: float  # the restore drops the writes since this time
    refuse: bool = True  # False: this source's writes succeed (another rank's was refused)
    stale: bool = False  # refuse one write at ``at`` even if ``until`` passed (a late answer)


@dataclass(frozen=True)
class Scenario:
    name: str
    rollbacks: dict[int, tuple[Rollback, ...]] = field(default_factory=dict)  # rank -> script
    down: tuple[float, float] | None = None  # rank 1's sources refuse lookups then
    poison: tuple[float, float] | None = None  # labels flipped in [a, b)
    skip: tuple[int, int] | None = None  # steps [a, b) not trained (nor dropped): never seen


class RollingSource:
    """One partition's source as a rank sees it: writes, holds (as ``RemoteSink``), and
    multi-table lookups of what it holds."""

    def __init__(self, clock: StepClock, rollbacks: tuple[Rollback, ...], down) -> None:
        self.clock = clock
        self.rollbacks = list(rollbacks)
        self.stale = {r for r in rollbacks if r.stale}
        self.done: list[Rollback] = []
        self.down = down
        self.specs: dict[str, TableSpec] = {}
        self.log: list[tuple[float, str, np.ndarray, np.ndarray]] = []
        self.quarantine: Quarantined | None = None
        self.refused: list[int] = []  # the epoch of each write refused

    def _roll(self) -> Rollback | None:
        now = self.clock.peek()
        for rb in [r for r in self.rollbacks if now >= r.at]:
            self.log = [e for e in self.log if not rb.healthy <= e[0] < rb.at]
            self.rollbacks.remove(rb)
            self.done.append(rb)
        live = [r for r in self.done if r.refuse and (now < r.until or r in self.stale)]
        for r in live:
            self.stale.discard(r)
        return live[-1] if live else None

    def create_table(self, spec: TableSpec) -> None:
        self.specs[spec.name] = spec

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        rb = self._roll()
        if self.quarantine is not None:
            raise self.quarantine
        if rb is not None:
            self.refused.append(rb.epoch)
            self.quarantine = Quarantined(rb.epoch, rb.until, f"quarantined (epoch {rb.epoch})")
            raise self.quarantine
        self.log.append((self.clock.peek(), table, keys.copy(), np.array(values, np.float32)))

    def hold(self, q: Quarantined) -> None:
        if self.quarantine is None or q.epoch >= self.quarantine.epoch:
            self.quarantine = q

    def resume(self, epoch: int) -> None:
        if self.quarantine is not None and self.quarantine.epoch <= epoch:
            self.quarantine = None

    def rows(self, table: str) -> dict[int, np.ndarray]:
        self._roll()
        out: dict[int, np.ndarray] = {}
        for _, t, keys, values in self.log:
            if t == table:
                out.update(zip(keys.tolist(), values, strict=True))
        return out

    def lookup_many(self, tables) -> dict[str, TableRows]:
        if self.down is not None and self.down[0] <= self.clock.peek() < self.down[1]:
            raise ClientError("POST /v1/lookup at fake: connection refused")
        out = {}
        for table, keys in tables.items():
            rows, dim = self.rows(table), self.specs[table].dim
            found = np.array([k in rows for k in keys.tolist()], np.uint8)
            values = np.zeros((len(keys), dim), np.float32)
            for i, k in enumerate(keys.tolist()):
                if k in rows:
                    values[i] = rows[k]
            out[table] = TableRows(table, found.astype(np.int64), found, values)
        return out


def _held_by_store(trainer: ShardedTrainer, sources: dict[int, RollingSource]) -> float:
    """The largest difference between the rank's owned rows (rank 0: and dense tensors) and
    what its sources hold (a row they lack: its initial value)."""
    model, router = trainer.model, trainer.sink
    initial_rows, initial_dense = _initial(trainer)
    worst = 0.0
    for i, name in enumerate(trainer.table_names):
        keys = model.owned_keys[i]
        want = initial_rows[model.table_slice(i)].numpy().copy()
        for p, where in router.split(name, keys):
            rows = sources[p].rows(name)
            for j in where.tolist():
                if int(keys[j]) in rows:
                    want[j] = rows[int(keys[j])]
        have = model.rows.weight.detach()[model.table_slice(i)].numpy()
        worst = max(worst, float(np.abs(have - want).max()))
    tensors = model.state_dict()
    for name, key in dense_tables(trainer).items() if trainer.ctx.rank == 0 else []:
        ((p, _),) = router.split(name, np.zeros(1, np.int64))
        row = sources[p].rows(name).get(0, initial_dense[key].reshape(-1).numpy())
        worst = max(worst, float(np.abs(tensors[key].reshape(-1).numpy() - row).max()))
    return worst


def _scenario(ctx: RankContext, sc: Scenario) -> dict:
    clock = StepClock()
    config = QuarantineConfig(retry_s=2.0, max_retry_s=4.0, clock=clock)
    trainer = ShardedTrainer(ctx, MODEL, ADAGRAD, None, PUBLISH, PARTS, config)
    down = sc.down if ctx.rank == 1 else None
    script = sc.rollbacks.get(ctx.rank, ())
    sources = {p: RollingSource(clock, script, down) for p in trainer.publish_partitions()}
    trainer.publish_to(PartitionRouter(PARTS, sources))
    trained, times, dropped_at, reload_diff, preds, labels = [], [], [], [], [], []
    reset: list[tuple[int, float]] = []  # per reload: rows it changed, their largest Adagrad sum
    for i, events in enumerate(itertools.islice(SyntheticStream(STREAM).batches(BATCH), STEPS)):
        if sc.skip and sc.skip[0] <= i < sc.skip[1]:
            continue
        now = clock.peek() + 1  # the time the step's agreement reads
        if sc.poison and sc.poison[0] <= now < sc.poison[1]:
            events = replace(events, labels=1 - events.labels)
        reloads = trainer.gate.reloads
        weight = trainer.model.rows.weight
        before = weight.detach().clone()
        result = trainer.step(events)
        if trainer.gate.reloads > reloads:  # this step reloaded: compare with the store
            reload_diff.append(_held_by_store(trainer, sources))
            changed = (weight.detach() != before).any(dim=1)
            sums = trainer.sparse_optimizer.state[weight]["sum"][changed]
            reset.append((int(changed.sum()), float(sums.abs().max()) if len(sums) else 0.0))
        if result.rejected == "quarantined":
            dropped_at.append(i)
            continue
        assert result.rejected is None
        # never a trained step while this rank has not reloaded for the rollback it knows of
        assert trainer.gate.reloaded, f"rank {ctx.rank} trained step {i} before reloading"
        trained.append(i)
        times.append(now)
        preds.append(result.predictions)
        labels.append(events.labels[trainer.slice_of(len(events))])
    trainer.flush()
    return {
        "stats": trainer.quarantine_statistics(),
        "trained": trained,
        "times": times,
        "dropped_at": dropped_at,
        "reload_diff": reload_diff,
        "reset": reset,
        "predictions": preds,
        "labels": labels,
        "dense": {
            k: v.numpy().copy() for k, v in trainer.model.state_dict().items() if k != "rows.weight"
        },
        "refused": {e for s in sources.values() for e in s.refused},
    }


def _all(ctx: RankContext, scenarios: list[Scenario]) -> dict[str, dict]:
    torch.manual_seed(0)
    return {sc.name: _scenario(ctx, sc) for sc in scenarios}


HEALTHY, AT, UNTIL = T0 + 12, T0 + 18, T0 + 22  # steps ~12, ~18, ~22
BOTH = (Rollback(AT, UNTIL, 4, HEALTHY),)
SCENARIOS = [
    Scenario("reference"),
    Scenario("unguarded", poison=(HEALTHY, AT)),  # the poison, never rolled back
    Scenario("gap", skip=(12, 22)),  # what a perfect rollback can do: as if never poisoned
    Scenario("both", {0: BOTH, 1: BOTH}, poison=(HEALTHY, AT)),
    # rank 1's writes succeed (its sources restore but do not refuse): it pauses all the same
    Scenario("one", {0: BOTH, 1: (replace(BOTH[0], refuse=False),)}, poison=(HEALTHY, AT)),
    # the quarantine already over when refused: reload at once, then train
    Scenario("past", {0: (Rollback(AT, AT - 5, 2, HEALTHY, stale=True),)}),
    # epoch 4, then a late refusal of epoch 3 ending before it (ignored: the sink released,
    # training goes on), then a restarted coordinator's epoch 1 ending later (paused again)
    Scenario(
        "backwards",
        {
            0: (
                *BOTH,
                Rollback(UNTIL + 3, UNTIL - 2, 3, UNTIL + 3, stale=True),
                Rollback(UNTIL + 8, UNTIL + 10, 1, UNTIL + 7),
            )
        },
    ),
    # rank 1's sources refuse lookups when the reload is due: it retries, every rank waits
    Scenario("down", {0: BOTH, 1: BOTH}, down=(UNTIL - 1, UNTIL + 6)),
]


@pytest.fixture(scope="module")
def runs() -> list[dict[str, dict]]:
    with ShardedRun(_all, 2, (SCENARIOS,), timeout_s=20) as run:
        return run.join(timeout_s=120)


def _auc(run: list[dict], steps: list[int]) -> float:
    p, y = [], []
    for r in run:
        at = {s: i for i, s in enumerate(r["trained"])}
        p += [r["predictions"][at[s]] for s in steps]
        y += [r["labels"][at[s]] for s in steps]
    return auc(np.concatenate(y), np.concatenate(p))


def _check_reloaded(run: list[dict], reloads: int = 1) -> None:
    stats = [r["stats"] for r in run]
    assert [s.reloads for s in stats] == [reloads, reloads]
    assert stats[0].batches_dropped == stats[1].batches_dropped > 0  # both paused, alike
    assert run[0]["dropped_at"] == run[1]["dropped_at"]
    for r in run:  # after the reload each rank's owned rows (and rank 0's dense) are the store's
        assert len(r["reload_diff"]) == reloads and max(r["reload_diff"]) == 0.0
        # the rows the reload changed start afresh: Adagrad sums reset, and counted
        assert [s for _, s in r["reset"]] == [0.0] * reloads
        assert sum(n for n, _ in r["reset"]) == r["stats"].rows_reloaded
        assert r["trained"][-1] == STEPS - 1  # training went on to the end
    for key, value in run[0]["dense"].items():  # the replicas stayed equal
        np.testing.assert_array_equal(value, run[1]["dense"][key])


def test_both_ranks_refused_pause_reload_and_train_on(runs):
    run = [r["both"] for r in runs]
    _check_reloaded(run)
    assert all(r["refused"] == {4} for r in run)
    stats = run[0]["stats"]
    assert (stats.epoch, stats.until) == (4, UNTIL) and not stats.paused
    assert stats.rows_reloaded > 0 and stats.events_dropped == stats.batches_dropped * BATCH
    # no batch trained after the step whose writes were refused, until the quarantine's end
    for r in run:
        assert not [t for t in r["times"] if AT + 1 < t < UNTIL], r["times"]
    after = [s for s in run[0]["trained"] if s > max(run[0]["dropped_at"])]
    ref = [r["reference"] for r in runs]
    unguarded, gap = [r["unguarded"] for r in runs], [r["gap"] for r in runs]
    got, want, poisoned = _auc(run, after), _auc(ref, after), _auc(unguarded, after)
    print(
        f"AUC after the reload {got:.4f}; no poison {want:.4f}; poison kept {poisoned:.4f}; "
        f"steps 12-21 never seen {_auc(gap, after):.4f}; after {after[0]}"
    )
    # the reload returns to the healthy weights: as good as never having seen the steps since
    # (what a rollback costs, against no poison, is those steps' learning)
    assert abs(got - _auc(gap, after)) <= 0.005, (got, _auc(gap, after), want, poisoned)


def test_one_rank_refused_makes_both_pause(runs):
    run = [r["one"] for r in runs]
    assert run[0]["refused"] == {4} and not run[1]["refused"]
    _check_reloaded(run)


def test_a_quarantine_already_over_reloads_at_once(runs):
    run = [r["past"] for r in runs]
    _check_reloaded(run)
    assert 0 < run[0]["stats"].batches_dropped <= 3


def test_an_older_epoch_is_ignored_unless_its_quarantine_ends_later(runs):
    run = [r["backwards"] for r in runs]
    _check_reloaded(run, reloads=2)  # epoch 4, then epoch 1 ending later; never epoch 3
    assert run[0]["stats"].epoch == 4 and run[0]["stats"].until == UNTIL + 10
    assert run[0]["refused"] == {4, 3, 1}
    # the stale refusal cost its own step's rows only: the steps after it trained
    stale = [t for t in run[0]["times"] if UNTIL + 3 <= t < UNTIL + 8]
    assert len(stale) >= 4, run[0]["times"]


def test_a_source_down_during_the_reload_is_retried_and_every_rank_waits(runs):
    run = [r["down"] for r in runs]
    _check_reloaded(run)
    assert run[1]["stats"].reload_failures >= 2 and run[0]["stats"].reload_failures == 0
    # rank 0 reloaded at once but waited for rank 1: more batches dropped than with no outage
    assert run[0]["stats"].batches_dropped > runs[0]["both"]["stats"].batches_dropped


def test_without_a_rollback_nothing_is_dropped(runs):
    assert all(r["reference"]["stats"].batches_dropped == 0 for r in runs)
    assert all(r["reference"]["trained"] == list(range(STEPS)) for r in runs)


def test_a_spoofed_quarantine_pauses_a_rank_at_most_max_quarantine_s_and_never_crashes_it(
    monkeypatch,
):
    """A 409's headers are not signed (a proxy, a man in the middle, a source's config gone
    wrong): an end of 1e300 or an epoch of 2**70 overflowed the all-reduced int64 tensor
    (the rank died) and an end years ahead paused every rank for good. The end is capped
    at ``max_quarantine_s`` from now and the epoch to what int64 holds."""
    from ekko.train import sharded_quarantine as sq

    monkeypatch.setattr(sq.dist, "all_reduce", lambda t, op=None: None)  # one rank
    gate = sq.QuarantineGate(0, QuarantineConfig(clock=lambda: 1_000.0, max_quarantine_s=600.0))
    gate.saw(Quarantined(2**70, 1e300, "spoofed"))
    decision = gate.agree()
    assert gate.handled == (2**62, 1_600_000) and decision.entered is not None
    with pytest.raises(ValueError, match="max_quarantine_s"):
        QuarantineConfig(max_quarantine_s=float("inf"))
