"""The synthetic writer's batches: Zipf-hot keys in the key space, N(0, 1) values that differ
between batches, the same stream for the same seed."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ekko.ops.synthetic import SyntheticWriter, SyntheticWriterConfig, synthetic_writer
from ekko.store.clock import FakeClock


def _writer(seed: int = 0, key_space: int = 1000) -> SyntheticWriter:
    cfg = SyntheticWriterConfig(key_space=key_space, seed=seed)
    return SyntheticWriter(cfg, lambda *a: None, {"emb": 8, "wide": 3})


def test_batches_have_the_table_shape_and_keys_in_the_key_space() -> None:
    w = _writer()
    for table, dim in (("emb", 8), ("wide", 3)):
        keys, values = w._batch(table, 500)
        assert keys.dtype == np.int64 and keys.shape == (500,)
        assert ((keys >= 0) & (keys < 1000)).all()
        assert values.dtype == np.float32 and values.shape == (500, dim)
        assert values.flags.c_contiguous and np.isfinite(values).all()


def test_values_are_standard_normal_and_differ_between_batches() -> None:
    w = _writer()
    batches = [w._batch("emb", 1000)[1] for _ in range(200)]
    every = np.concatenate(batches)
    assert abs(float(every.mean())) < 0.02 and abs(float(every.std()) - 1.0) < 0.02
    # Per column too (each row is a fresh N(0, 1) vector, not a shifted copy).
    assert np.allclose(every.std(axis=0), 1.0, atol=0.05)
    raw = {b.tobytes() for b in batches}
    assert len(raw) == len(batches)


def test_a_batch_larger_than_the_pool_still_works() -> None:
    _keys, values = _writer()._batch("emb", 70_000)
    assert values.shape == (70_000, 8) and abs(float(values.std()) - 1.0) < 0.02


def test_same_seed_same_stream() -> None:
    a, b, c = _writer(seed=3), _writer(seed=3), _writer(seed=4)
    for _ in range(3):
        (ka, va), (kb, vb), (kc, _) = a._batch("emb", 50), b._batch("emb", 50), c._batch("emb", 50)
        np.testing.assert_array_equal(ka, kb)
        np.testing.assert_array_equal(va, vb)
    assert not np.array_equal(ka, kc)


async def test_the_writer_paces_its_rate_on_the_clock_and_counts_in_status() -> None:
    clock = FakeClock()
    writes: list[tuple[str, int]] = []
    cfg = SyntheticWriterConfig(rate_rows_per_s=1000, batch_interval_ms=10, key_space=50)
    writer = SyntheticWriter(
        cfg, lambda t, k, v: writes.append((t, len(k))), {"emb": 8, "wide": 3}, clock,
    )  # fmt: skip
    start = clock.mono()
    task = asyncio.create_task(writer.run())
    while clock.mono() < start + 1.0:
        await asyncio.sleep(0)
    task.cancel()
    # 10 rows per 10 ms batch, tables in turn: 1 s of the clock is 1000 rows
    assert writer.rows_written == sum(n for _, n in writes) == pytest.approx(1000, abs=10)
    assert {t for t, _ in writes} == {"emb", "wide"}
    assert writer.status() == {"writer_rows": writer.rows_written}


def test_the_factory_builds_a_writer_only_at_the_source() -> None:
    class Core:
        is_source = False

    assert synthetic_writer(SyntheticWriterConfig())(Core()) is None  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_interval_ms must be > 0"):
        synthetic_writer(SyntheticWriterConfig(batch_interval_ms=0))
