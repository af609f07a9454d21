"""``ekko bench freshness`` on tiny setups: the same code path as the bench, seconds to run.

Checks outcomes, never timings: a zero-delay replica serves exactly what the trainer
predicted, a long-delay replica holds older rows than the source, the Ekko replica converges
to the source through the real protocol with about one WAN delay of simulated latency, and
each event is scored by the replica state at its own time.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from ekko.bench import freshness
from ekko.bench.freshness import (
    EKKO,
    IN_PROCESS,
    EventTimeScorer,
    FreshnessRun,
    FreshnessSetup,
    run_stream,
    summarize,
)
from ekko.bench.freshness_replicas import DelayedReplica
from ekko.store import Store
from ekko.store.spec import TableSpec
from ekko.train.dlrm import DLRMConfig
from ekko.train.streams import Events, StreamConfig

torch.set_num_threads(1)

TINY_STREAM = StreamConfig(seed=5, max_vocab=2_000, initial_items=500, events_per_s=256.0)
TINY_MODEL = DLRMConfig(
    rows_per_table=1_000, embedding_dim=4, bottom_mlp=(8, 4), top_mlp=(8, 1), seed=1
)
DELAYS = (("zero", 0.0), ("late", 5.0), ("never", 1_000.0))


def tiny_setup(**overrides) -> FreshnessSetup:
    kw = dict(
        stream="synthetic",
        batch_size=64,  # 0.25 simulated seconds per batch
        max_batches=80,  # 20 simulated seconds
        warmup_s=4.0,
        series_s=5.0,
        model=TINY_MODEL,
        fixed_delays_s=DELAYS,
        synthetic=TINY_STREAM,
        embedding_shards=4,
    )
    kw.update(overrides)
    return FreshnessSetup(**kw)


@pytest.fixture(scope="module")
def tiny_run() -> FreshnessRun:
    return run_stream(tiny_setup(), show_progress=False)


def _versions(store: Store, table: str) -> np.ndarray:
    keys = np.arange(TINY_MODEL.rows_per_table, dtype=np.int64)
    _values, versions, found = store.table(table).lookup(keys)
    assert found.all()
    return versions


def test_zero_delay_replica_serves_the_trainers_predictions(tiny_run: FreshnessRun) -> None:
    np.testing.assert_allclose(
        tiny_run.predictions["zero"], tiny_run.predictions[IN_PROCESS], rtol=0, atol=1e-5
    )
    assert tiny_run.variants["zero"].auc == pytest.approx(
        tiny_run.variants[IN_PROCESS].auc, abs=1e-4
    )


def test_delayed_replicas_lag_the_source(tiny_run: FreshnessRun) -> None:
    # The last publish reaches even the zero-delay replica only when stream time moves on.
    assert tiny_run.delayed["zero"].pending_writes > 0
    tiny_run.delayed["zero"].advance(tiny_run.stream_seconds + 0.01, lambda _at: None)
    assert tiny_run.replicas["zero"].digests() == tiny_run.source.digests()
    src = _versions(tiny_run.source, "emb_0")
    late = _versions(tiny_run.replicas["late"], "emb_0")
    never = _versions(tiny_run.replicas["never"], "emb_0")
    assert (late <= src).all() and (late < src).any()
    assert (never <= late).all() and (never < late).any()
    # Nothing reached "never": it still holds the initial snapshot, and every write waits.
    assert tiny_run.delayed["never"].rows_applied == 0
    assert tiny_run.delayed["never"].pending_writes > tiny_run.delayed["late"].pending_writes > 0
    assert tiny_run.delayed["zero"].pending_writes == 0
    assert tiny_run.delayed["late"].rows_applied > 0
    # Staler replicas predict differently from the trainer.
    gap = {
        name: float(np.abs(tiny_run.predictions[name] - tiny_run.predictions[IN_PROCESS]).mean())
        for name in ("zero", "late", "never")
    }
    assert gap["zero"] < 1e-6 < gap["late"] < gap["never"]


def test_ekko_replica_syncs_through_the_protocol(tiny_run: FreshnessRun) -> None:
    link = tiny_run.synced
    assert link.messages > 0
    lat = tiny_run.ekko_latency
    assert lat["count"] > 0
    one_way_ms = tiny_run.setup.wan.one_way_s * 1000
    assert one_way_ms <= lat["p50_ms"] <= one_way_ms + 30
    # The last publish is still on the wire; once it lands the replica equals the source.
    assert tiny_run.replicas[EKKO].digests() != tiny_run.source.digests()
    link.advance(link.now + 1.0, lambda _at: None)
    assert tiny_run.replicas[EKKO].digests() == tiny_run.source.digests()
    # Ekko is close to in-process, and much closer than a replica five seconds behind.
    ip = tiny_run.predictions[IN_PROCESS]
    d_ekko = float(np.abs(tiny_run.predictions[EKKO] - ip).mean())
    d_late = float(np.abs(tiny_run.predictions["late"] - ip).mean())
    assert d_ekko < d_late


def test_metrics_and_series_cover_the_run(tiny_run: FreshnessRun) -> None:
    setup = tiny_run.setup
    assert tiny_run.batches == 80
    assert tiny_run.events == 80 * 64
    assert len(tiny_run.labels) == int((tiny_run.times >= setup.warmup_s).sum())
    assert tiny_run.times.min() >= setup.warmup_s
    for name in setup.variants:
        v = tiny_run.variants[name]
        assert 0.0 < v.auc < 1.0 and v.log_loss > 0
        assert len(tiny_run.predictions[name]) == len(tiny_run.labels)
        assert [p["t_s"] for p in v.series] == [5.0, 10.0, 15.0]
        assert sum(p["events"] for p in v.series) == 60 * 64  # batches ending before 20 s


def test_summary_has_the_keys(tiny_run: FreshnessRun) -> None:
    summary = summarize({"synthetic": tiny_run, "movielens": tiny_run})
    for key in (
        "auc_by_delay",
        "logloss_by_delay",
        "ekko_minus_1min_auc",
        "ekko_minus_in_process_auc",
        "bar_ekko_within_0.002_of_in_process",
        "bar_ekko_above_1min_and_10min_synthetic",
    ):
        assert key in summary
    assert set(summary["auc_by_delay"]["synthetic"]) == {IN_PROCESS, EKKO, "zero", "late", "never"}
    # The tiny setup has no "1min" variant: the difference is undefined, the bar not met.
    assert summary["ekko_minus_1min_auc"] is None
    assert summary["bar_ekko_above_1min_and_10min_synthetic"] is False
    diff = summary["ekko_minus_in_process_auc"]["synthetic"]
    assert diff == pytest.approx(tiny_run.variants[EKKO].auc - tiny_run.variants[IN_PROCESS].auc)
    json.dumps(summary)  # JSON-safe


def test_movielens_zero_delay_matches_in_process() -> None:
    setup = FreshnessSetup(
        stream="movielens",
        batch_size=64,
        max_batches=25,
        warmup_s=0.0,
        series_s=86_400.0,
        model=DLRMConfig(
            num_dense=3,
            num_sparse=8,
            embedding_dim=4,
            rows_per_table=2048,
            bottom_mlp=(8, 4),
            top_mlp=(8, 1),
        ),
        fixed_delays_s=(("zero", 0.0), ("1h", 3600.0)),
        embedding_shards=4,
    )
    r = run_stream(setup, show_progress=False)
    assert r.events == 25 * 64
    np.testing.assert_allclose(r.predictions["zero"], r.predictions[IN_PROCESS], atol=1e-5)
    assert r.stream_seconds > 0  # on MovieLens' own timeline


class _StateModel:
    """Predicts, for every event, how many writes its replica had applied."""

    def __init__(self, replica: DelayedReplica) -> None:
        self.replica = replica

    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        return np.full(len(dense), float(self.replica.rows_applied), np.float32)


def test_each_event_is_scored_with_the_state_at_its_time() -> None:
    store = Store()
    store.create_table(TableSpec("t", 1, 1))
    rep = DelayedReplica(store, delay_s=0.5)
    one = np.ones((1, 1), np.float32)
    for i, at in enumerate((0.0, 0.2, 0.3)):  # due at 0.5, 0.7, 0.8
        rep.offer(at, "t", np.array([i]), one, np.array([i + 1]), np.array([0]))
    scorer = EventTimeScorer(_StateModel(rep), rep.advance)
    t = np.array([0.1, 0.5, 0.6, 0.75, 0.8, 0.9])
    n = len(t)
    events = Events(np.zeros((n, 1), np.float32), np.zeros((n, 1), np.int64), np.zeros(n), t)
    preds = scorer.score(events, t)
    # An event at the due time sees the write; one just before it does not.
    assert preds.tolist() == [0, 1, 1, 2, 3, 3]
    assert scorer.predicts == 4  # once per distinct state


def test_setup_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="max_batches"):
        tiny_setup(max_batches=None)
    with pytest.raises(ValueError, match="duplicate"):
        tiny_setup(fixed_delays_s=(("ekko", 1.0),))
    with pytest.raises(ValueError, match="fixed_delays_s"):
        tiny_setup(fixed_delays_s=(("x", -1.0),))


def test_run_takes_quick_and_out_only() -> None:
    params = inspect.signature(freshness.run).parameters
    assert list(params) == ["quick", "out"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert params["out"].default is None and params["quick"].default is False
