from __future__ import annotations

import itertools

import numpy as np
import pytest

from ekko.train.streams import Events, MovieLensStream, StreamConfig, SyntheticStream


def _take(stream: SyntheticStream, n: int, batch_size: int = 256) -> list[Events]:
    return list(itertools.islice(stream.batches(batch_size), n))


def test_synthetic_is_deterministic_for_a_seed(small_stream_config: StreamConfig) -> None:
    a = _take(SyntheticStream(small_stream_config), 3)
    b = _take(SyntheticStream(small_stream_config), 3)
    for x, y in zip(a, b, strict=True):
        for field in ("dense", "sparse", "labels", "ts"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
    other = _take(SyntheticStream(StreamConfig(seed=4, max_vocab=5_000, initial_items=2_000)), 1)
    assert not np.array_equal(a[0].sparse, other[0].sparse)


def test_synthetic_shapes_and_time(small_stream_config: StreamConfig) -> None:
    stream = SyntheticStream(small_stream_config)
    batches = _take(stream, 4)
    ev = batches[0]
    assert ev.dense.shape == (256, 13) and ev.dense.dtype == np.float32
    assert ev.sparse.shape == (256, 26) and ev.sparse.dtype == np.int64
    assert ev.labels.dtype == np.float32 and set(np.unique(ev.labels)) <= {0.0, 1.0}
    assert ev.ts.dtype == np.float64
    ts = np.concatenate([b.ts for b in batches])
    assert np.all(np.diff(ts) >= 0)
    dt = stream.time_per_batch(256)
    assert batches[1].ts[0] == pytest.approx(dt)
    assert (ev.sparse >= 0).all()


def test_synthetic_new_items_arrive_and_hot_set_rotates() -> None:
    """Item-like ids beyond the initial catalog appear, and the hot ids move on."""
    cfg = StreamConfig(
        seed=5, max_vocab=5_000, initial_items=2_000, new_items_per_s=40.0, hot_lifetime_s=5.0
    )
    batches = _take(SyntheticStream(cfg), 120, 512)  # 0.25 simulated s per batch: 30 s
    early = np.concatenate([b.sparse[:, 0] for b in batches[40:60]])  # 10 s .. 15 s
    late = np.concatenate([b.sparse[:, 0] for b in batches[100:120]])  # 25 s .. 30 s
    assert late.max() > early.max() > cfg.initial_items
    hot_early = set(np.unique(early[early >= cfg.initial_items]).tolist())
    hot_late = set(np.unique(late[late >= cfg.initial_items]).tolist())
    assert len(hot_early & hot_late) < 0.2 * len(hot_late)
    # Most item draws of a late batch hit items born in the last hot_lifetime_s.
    assert (late >= cfg.initial_items).mean() > cfg.hot_fraction * 0.9


def test_movielens_replays_in_time_order() -> None:
    pytest.importorskip("recbole")
    stream = MovieLensStream()
    assert len(stream) == 100_000
    batches = list(stream.batches(4096))
    assert sum(len(b) for b in batches) == 100_000
    ts = np.concatenate([b.ts for b in batches])
    assert np.all(np.diff(ts) >= 0)
    labels = np.concatenate([b.labels for b in batches])
    assert set(np.unique(labels).tolist()) == {0.0, 1.0}
    assert 0.4 < labels.mean() < 0.7  # share of 4- and 5-star ratings
    ev = batches[0]
    assert ev.sparse.shape == (4096, stream.num_sparse) and ev.sparse.dtype == np.int64
    assert ev.dense.shape == (4096, stream.num_dense) and ev.dense.dtype == np.float32
    assert (stream.sparse >= 0).all()


def test_movielens_history_features_use_only_the_past() -> None:
    pytest.importorskip("recbole")
    stream = MovieLensStream()
    user = stream.sparse[:, 0]
    _, first = np.unique(user, return_index=True)
    assert (stream.dense[first, 0] == 0).all()  # no prior ratings at a user's first event
    # The item's prior positive rate must not move with the current label.
    item = stream.sparse[:, 1]
    _, first_item = np.unique(item, return_index=True)
    np.testing.assert_allclose(stream.dense[first_item, 2], 0.5)


def test_open_context_vocabularies_take_new_ids_and_closed_ones_stay() -> None:
    """context_new_ids_per_s renews ranks of vocabularies >= open_vocab_min only; the ids a
    renewed rank held are not drawn again, so early and late ids of the open feature part."""
    cfg = StreamConfig(
        seed=5, max_vocab=3_000, initial_items=2_000, context_new_ids_per_s=400.0,
        open_vocab_min=1_000,
    )  # fmt: skip
    batches = _take(SyntheticStream(cfg), 120, 512)  # 30 simulated s: 12 000 new ids each
    sparse = np.concatenate([b.sparse for b in batches])
    # feature 6: Criteo vocabulary 12 517, capped at 3 000, open; feature 8: 3 ids, closed
    open_ids, closed_ids = sparse[:, 6], sparse[:, 8]
    assert open_ids.max() >= 3_000 and np.unique(open_ids).size > 4_000  # closed: <= 3 000
    assert closed_ids.max() < 3
    early = set(np.unique(open_ids[: 10 * 512]).tolist())  # the first 2.5 s
    late = set(np.unique(open_ids[-10 * 512 :]).tolist())  # the last 2.5 s
    assert len(early & late) < 0.2 * len(late)
    default = np.concatenate([b.sparse for b in _take(SyntheticStream(StreamConfig(
        seed=5, max_vocab=3_000, initial_items=2_000)), 20, 512)])  # fmt: skip
    assert default[:, 6].max() < 3_000
    with pytest.raises(ValueError, match="context_new_ids_per_s"):
        StreamConfig(context_new_ids_per_s=-1.0)
