"""InferenceService: parity with the trainer, default rows, dense reload, readiness, feedback."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from serve_fixtures import SMALL_MODEL, random_events, service, train

from ekko.quality.offline import auc, log_loss
from ekko.schedule import WritePort
from ekko.serve import BadInput, InferenceService, ModelNotReady, UnknownVariant
from ekko.store import Store
from ekko.torch import EmbeddingPublisher, PublisherConfig
from ekko.train.dlrm import DLRM, DLRMServingModel, dense_table_name, embedding_table_name


def test_predictions_match_the_trained_model() -> None:
    t = train(steps=4)
    svc = service(t.store)
    events = t.held_out()
    got = svc.predict(events.dense, events.sparse, now=0.0)
    np.testing.assert_allclose(got.ctr, t.trainer.predict(events), rtol=0, atol=1e-5)
    assert got.variant == "online"
    assert len(np.unique(got.ids)) == len(events)
    assert (got.ids > 0).all() and (got.ids < 2**53).all()


def test_unseen_key_reads_the_zero_row() -> None:
    """Without a snapshot only trained rows exist; an id nobody trained reads zeros."""
    t = train(steps=2, snapshot=False)
    svc = service(t.store)
    dense, sparse = random_events(4, seed=1)
    table = t.store.table(embedding_table_name(0))
    _, _, found = table.lookup(np.arange(SMALL_MODEL.rows_per_table, dtype=np.int64))
    unseen = int(np.flatnonzero(~found)[0])
    sparse[:, 0] = unseen
    weights = {
        name: bag.weight.detach().numpy().copy()
        for name, bag in t.model.sparse.embedding_bags.items()
    }
    weights[embedding_table_name(0)][unseen] = 0.0
    rows = SMALL_MODEL.rows_per_table

    def zeroed(table_name: str, ids: np.ndarray) -> np.ndarray:
        return weights[table_name][ids % rows]

    # Every other feature's ids must be rows the store has, or both sides differ anyway.
    for i in range(1, SMALL_MODEL.num_sparse):
        _, _, f = t.store.table(embedding_table_name(i)).lookup(sparse[:, i] % rows)
        weights[embedding_table_name(i)][(sparse[:, i] % rows)[~f]] = 0.0
    expected = DLRMServingModel(SMALL_MODEL.dlrm(), zeroed, t.model.dense_state())
    got = svc.predict(dense, sparse, now=0.0)
    np.testing.assert_allclose(got.ctr, expected.predict(dense, sparse), atol=1e-5)


def test_missing_embedding_table_reads_zero_rows() -> None:
    t = train(steps=1)
    partial = Store()
    for spec in t.store.specs():
        if spec.name == embedding_table_name(3):
            continue
        partial.create_table(spec)
        keys, values, *_ = t.store.table(spec.name).all_rows()
        partial.table(spec.name).write(keys.copy(), values.copy(), now_ns=1)
    dense, sparse = random_events(3)
    full = service(t.store).predict(dense, sparse, 0.0).ctr
    got = service(partial).predict(dense, sparse, 0.0).ctr
    assert got.shape == (3,) and np.isfinite(got).all()
    assert not np.allclose(got, full)  # feature 3 really was read as zeros
    bag = t.model.sparse.embedding_bags[embedding_table_name(3)]
    with torch.no_grad():
        bag.weight.zero_()
    np.testing.assert_allclose(got, t.trainer.predict(_events(dense, sparse)), atol=1e-5)


def _events(dense: np.ndarray, sparse: np.ndarray):
    from ekko.train.streams import Events

    n = len(dense)
    return Events(dense, sparse, np.zeros(n, np.float32), np.zeros(n))


def test_dense_reload_when_dense_tables_change() -> None:
    t = train(steps=2)
    svc = service(t.store)
    events = t.held_out()
    before = svc.predict(events.dense, events.sparse, 0.0).ctr
    again = svc.predict(events.dense, events.sparse, 0.0).ctr
    np.testing.assert_array_equal(before, again)
    assert svc.statistics().dense_loads == 1  # cached while nothing moved
    key = "top.0.bias"
    row = t.model.dense_state()[key].numpy().reshape(1, -1) + 0.5
    t.sink.write(dense_table_name(key), np.zeros(1, np.int64), row.astype(np.float32))
    after = svc.predict(events.dense, events.sparse, 0.0).ctr
    assert svc.statistics().dense_loads == 2
    assert not np.allclose(after, before)
    with torch.no_grad():
        t.model.top[0].bias.add_(0.5)
    np.testing.assert_allclose(after, t.trainer.predict(events), atol=1e-5)


def test_missing_dense_tables_raise_model_not_ready_until_they_arrive() -> None:
    t = train(steps=1)
    replica = Store()
    svc = service(replica)
    dense, sparse = random_events(2)
    with pytest.raises(ModelNotReady, match=r"dense table 'dense/bottom\.0\.weight'"):
        svc.predict(dense, sparse, 0.0)
    for spec in t.store.specs():  # tables arrive (catalog) before their rows
        replica.create_table(spec)
    with pytest.raises(ModelNotReady, match="has no row yet"):
        svc.predict(dense, sparse, 0.0)
    for spec in t.store.specs():
        keys, values, *_ = t.store.table(spec.name).all_rows()
        replica.table(spec.name).write(keys.copy(), values.copy(), now_ns=1)
    got = svc.predict(dense, sparse, 0.0).ctr
    np.testing.assert_allclose(got, service(t.store).predict(dense, sparse, 0.0).ctr)
    assert svc.statistics().not_ready == 2


def test_bad_shapes_are_refused_naming_the_array() -> None:
    svc = service(train(steps=1).store)
    dense, sparse = random_events(2)
    with pytest.raises(BadInput, match="dense: expected shape"):
        svc.predict(dense[:, :5], sparse, 0.0)
    with pytest.raises(BadInput, match="sparse: expected integer"):
        svc.predict(dense, sparse.astype(np.float64), 0.0)
    with pytest.raises(BadInput, match="empty batch"):
        svc.predict(dense[:0], sparse[:0], 0.0)
    dense[1, 2] = np.inf
    with pytest.raises(BadInput, match=r"dense\[1\]\[2\]: inf is NaN, infinite or outside"):
        svc.predict(dense, sparse, 0.0)
    dense[1, 2] = 3e38  # finite in float32, far outside the model's dense range
    with pytest.raises(BadInput, match=r"dense\[1\]\[2\]: 3.* outside \[-64, 64\]"):
        svc.predict(dense, sparse, 0.0)
    with pytest.raises(UnknownVariant):
        svc.predict(dense, sparse, 0.0, variant="baseline")
    assert svc.statistics().requests == 0


def test_feedback_joins_labels_and_windowed_auc_matches_exact_auc() -> None:
    t = train(steps=3)
    svc = service(t.store, window_s=60.0)
    rng = np.random.default_rng(7)
    ids, ctrs = [], []
    for _ in range(5):
        ev = t.held_out()
        r = svc.predict(ev.dense, ev.sparse, now=10.0)
        ids.append(r.ids)
        ctrs.append(r.ctr)
    all_ids, all_ctr = np.concatenate(ids), np.concatenate(ctrs)
    labels = (rng.random(len(all_ids)) < all_ctr * 1.5).astype(np.int8)  # informative labels
    half = len(all_ids) // 2
    bogus = np.array([12345, all_ids.max() + 1], dtype=np.int64)
    res = svc.feedback(
        np.concatenate([all_ids[:half], bogus]), np.concatenate([labels[:half], [0, 1]]), now=11.0
    )
    assert (res.matched, res.unknown) == (half, 2)
    res = svc.feedback(all_ids[half:], labels[half:], now=12.0)
    assert (res.matched, res.unknown) == (len(all_ids) - half, 0)
    again = svc.feedback(all_ids[:3], labels[:3], now=12.0)  # already labelled
    assert (again.matched, again.unknown) == (0, 3)

    m = svc.metrics(now=12.0)
    win = m["variants"]["online"]["window"]
    assert win["count"] == len(all_ids)
    assert win["positives"] == int(labels.sum())
    assert abs(win["auc"] - auc(labels, all_ctr)) <= win["auc_tie_bound"] + 1e-12
    assert win["log_loss"] == pytest.approx(log_loss(labels, all_ctr), rel=1e-6)
    assert m["feedback"] == {"matched": len(all_ids), "unknown": 5, "pending": 0, "evicted": 0}
    assert m["predictions_served"] == len(all_ids)
    # The window expires; the lifetime does not.
    later = svc.metrics(now=12.0 + 120.0)["variants"]["online"]
    assert later["window"]["count"] == 0 and later["window"]["auc"] is None
    assert later["lifetime"]["count"] == len(all_ids)


def test_duplicate_ids_in_one_feedback_batch_join_once() -> None:
    svc = service(train(steps=1).store)
    r = svc.predict(*random_events(3), now=0.0)
    res = svc.feedback(np.array([r.ids[0], r.ids[0], r.ids[1]]), np.array([1, 0, 0]), now=1.0)
    assert (res.matched, res.unknown) == (2, 1)
    snap = svc.quality().compute(1.0)
    assert (snap.count, snap.positives) == (2, 1)


def test_oldest_predictions_are_evicted_and_counted() -> None:
    svc = service(train(steps=1).store, max_pending=10)
    first = svc.predict(*random_events(6, seed=1), now=0.0)
    second = svc.predict(*random_events(9, seed=2), now=0.0)
    st = svc.statistics()
    assert (st.evicted, st.pending) == (5, 10)
    res = svc.feedback(np.concatenate([first.ids, second.ids]), np.zeros(15, np.int8), now=1.0)
    assert (res.matched, res.unknown) == (10, 5)
    assert svc.statistics().pending == 0


def test_bad_labels_are_refused_and_nothing_is_joined() -> None:
    svc = service(train(steps=1).store)
    r = svc.predict(*random_events(2), now=0.0)
    with pytest.raises(BadInput, match="0 or 1"):
        svc.feedback(r.ids, np.array([1, 2]), now=1.0)
    assert svc.feedback(r.ids, np.array([1, 0]), now=1.0).matched == 2


def test_variants_are_scored_separately() -> None:
    t = train(steps=2)
    lagged = train(steps=0).store  # an older model: the baseline's store
    svc = service(t.store)
    svc.add_variant("baseline", lagged)
    dense, sparse = random_events(8)
    on = svc.predict(dense, sparse, 0.0)
    base = svc.predict(dense, sparse, 0.0, variant="baseline")
    assert base.variant == "baseline"
    assert not np.allclose(on.ctr, base.ctr)
    svc.feedback(base.ids, np.tile([0, 1], 4), now=1.0)
    m = svc.metrics(1.0)["variants"]
    assert m["baseline"]["window"]["count"] == 8
    assert m["online"]["window"]["count"] == 0
    assert m["baseline"]["predictions"] == m["online"]["predictions"] == 8
    assert math.isnan(svc.quality("online").compute(1.0).auc)


def test_a_namespaced_model_serves_from_its_own_tables() -> None:
    cfg = SMALL_MODEL.model_copy(update={"table_namespace": "ctr/"})
    model = DLRM(cfg.dlrm())
    store = Store()
    pub = EmbeddingPublisher(
        model,
        WritePort(store),
        PublisherConfig(table_names=model.table_names(), dense_prefix="ctr/dense/"),
    )
    pub.snapshot()
    assert store.tables and all(name.startswith("ctr/") for name in store.tables)
    assert "ctr/emb_0" in store.tables and "ctr/dense/top.0.weight" in store.tables
    svc = InferenceService(store, cfg.served())
    dense, sparse = random_events(16)
    model.eval()
    with torch.no_grad():
        want = torch.sigmoid(model(torch.from_numpy(dense), torch.from_numpy(sparse))).numpy()
    np.testing.assert_allclose(svc.predict(dense, sparse, now=0.0).ctr, want.ravel(), atol=1e-5)
