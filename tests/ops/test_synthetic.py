"""The synthetic writer's batches: Zipf-hot keys in the key space, N(0, 1) values that differ
between batches, the same stream for the same seed."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import numpy as np
import pytest

from ekko.node.config import load_config
from ekko.node.core import NodeCore
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster
from ekko.ops.synthetic import SyntheticWriter, SyntheticWriterConfig, synthetic_writer
from ekko.store import shard_of
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


async def test_on_a_partitioned_cluster_each_source_writes_its_own_partitions_keys(
    tmp_path: Path,
) -> None:
    """``ekko up --writer-rate`` on a partitioned cluster: the writer ran at the first
    source only and wrote keys of every partition, so each batch was refused (421: shard in
    partition 1) and the writer restarted for ever, writing nothing; with no tables (a
    ``--serve`` cluster, whose sources run no trainer) it raised ZeroDivisionError. Now every
    source runs one that keeps its own partitions' keys, and one with no table waits."""
    doc = cluster_doc(dcs=1, replicas=1, partitions=2, tables=[("emb", 4, 8)],
                      sync={"snapshot_interval_s": 0})  # fmt: skip
    cfg = load_config(write_cluster(doc, tmp_path / "cluster.toml"))
    launched = LocalCluster(tmp_path / "cluster.toml", writer_args=["--writer-rate", "5"])
    assert launched.writes_at() == {"source-p0", "source-p1"}
    clock = FakeClock()
    wrote = {}
    for name in ("source-p0", "source-p1"):
        core = NodeCore(cfg, name, tmp_path / name, clock=clock)
        core.not_ready = None  # recovered (nothing to recover from in this test)
        cfg_w = SyntheticWriterConfig(rate_rows_per_s=1000, batch_interval_ms=10, key_space=500)
        writer = synthetic_writer(cfg_w)(core)
        assert writer is not None
        writer.clock = clock
        task = asyncio.create_task(writer.run())
        start = clock.mono()
        while clock.mono() < start + 1.0 and not task.done():
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # a refused write would raise here
        table = core.store.table("emb")
        keys = table.all_rows()[0]
        assert table.rows > 0 and writer.rows_written > 0
        parts = cfg.placement().partitions_of("emb", 8)[shard_of(keys, 8)]
        assert set(parts.tolist()) == set(cfg.held(name))
        wrote[name] = writer.rows_written
    assert sum(wrote.values()) == pytest.approx(1000, rel=0.05)  # the rate, over both


async def test_a_writer_with_no_table_waits_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    writer = SyntheticWriter(SyntheticWriterConfig(rate_rows_per_s=1000), lambda *a: None, {},
                             clock)  # fmt: skip
    task = asyncio.create_task(writer.run())
    for _ in range(100):
        await asyncio.sleep(0)
    assert not task.done()  # waiting, not failed
    task.cancel()
    assert writer.rows_written == 0
    assert "no table to write" in caplog.text
