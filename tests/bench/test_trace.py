"""A recorded trace holds exactly what the trainer published, loads without pickle, replays
in order at its recorded times."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ekko.bench.trace import Trace, load_trace, record_trace, row_bytes_fp32
from ekko.train.dlrm import DLRMConfig

torch.set_num_threads(1)

TINY = DLRMConfig(
    num_sparse=4, embedding_dim=8, rows_per_table=1000, bottom_mlp=(16, 8), top_mlp=(16, 1)
)
STEPS = 6
BATCH = 128


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_trace(
        STEPS, BATCH, seed=7, path=tmp_path_factory.mktemp("trace") / "t", model_config=TINY
    )


def test_loads_without_pickle_and_totals_add_up(trace_path: Path) -> None:
    assert trace_path.suffix == ".npz"
    with np.load(trace_path, allow_pickle=False) as z:
        assert all(z[name].dtype != object for name in z.files)
    trace = load_trace(trace_path)
    dims = {s.name: s.dim for s in trace.specs}
    batches = list(trace.batches)
    assert len(batches) == trace.num_batches > 0
    assert trace.rows == sum(len(b.keys) for b in batches)
    assert trace.fp32_bytes == sum(len(b.keys) * row_bytes_fp32(dims[b.table]) for b in batches)
    for b in batches:
        assert b.keys.dtype == np.int64 and b.values.dtype == np.float32
        assert b.values.shape == (len(b.keys), dims[b.table])
        assert len(np.unique(b.keys)) == len(b.keys)
    assert np.all(np.diff(trace.batch_times) >= 0)
    assert np.all(np.diff(trace.batch_steps) >= 0)
    assert trace.duration_s == pytest.approx(STEPS * BATCH / 2048.0)
    emb = [s.name for s in trace.specs if s.name.startswith("emb_")]
    assert len(emb) == TINY.num_sparse
    assert all(trace.table_rows[name] == TINY.rows_per_table for name in emb)
    assert trace.table_fp32_bytes == sum(
        n * row_bytes_fp32(dims[name]) for name, n in trace.table_rows.items()
    )
    # Every embedding table is touched in every step (one id per feature per event).
    steps_of = {name: set() for name in emb}
    for step, b in zip(trace.batch_steps.tolist(), batches, strict=True):
        if b.table in steps_of:
            steps_of[b.table].add(step)
    assert all(s == set(range(STEPS)) for s in steps_of.values())


def test_events_are_kept(trace_path: Path) -> None:
    trace = load_trace(trace_path)
    events = trace.events
    assert trace.steps == len(events) == STEPS
    assert events[0].sparse.shape == (BATCH, TINY.num_sparse)
    assert events[0].dense.shape == (BATCH, TINY.num_dense)
    assert set(np.unique(np.concatenate([e.labels for e in events])).tolist()) <= {0.0, 1.0}


def test_recording_is_deterministic(trace_path: Path, tmp_path: Path) -> None:
    again = load_trace(
        record_trace(STEPS, BATCH, seed=7, path=tmp_path / "again", model_config=TINY)
    )
    first = load_trace(trace_path)
    for a, b in zip(first.batches, again.batches, strict=True):
        assert a.table == b.table and a.t_sim == b.t_sim
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_array_equal(a.values, b.values)


def test_updates_move_the_published_rows(trace_path: Path) -> None:
    """Applying the updates over the initial state moves (nearly) every written row: the
    trace holds the trainer's real changes, not rewrites of unchanged rows."""
    trace = load_trace(trace_path)
    state = {
        (b.table, int(k)): v for b in trace.initial for k, v in zip(b.keys, b.values, strict=True)
    }
    start = dict(state)
    written = set()
    for b in trace.batches:
        for k, v in zip(b.keys.tolist(), b.values, strict=True):
            state[(b.table, k)] = v
            written.add((b.table, k))
    assert written <= set(start)
    moved = [key for key in written if not np.array_equal(state[key], start[key])]
    assert len(moved) >= 0.9 * len(written)


async def test_replay_yields_in_order_not_before_due(trace_path: Path) -> None:
    trace = load_trace(trace_path)
    speed = 20.0
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    seen = []
    async for b in trace.replay(speed):
        assert loop.time() - t0 >= b.t_sim / speed - 1e-3
        seen.append(b)
    assert [b.t_sim for b in seen] == trace.batch_times.tolist()
    fast = [b async for b in trace.replay(math.inf)]
    assert len(fast) == trace.num_batches


def test_loader_refuses_a_bad_format(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, format=np.asarray(99))
    with pytest.raises(ValueError, match="format"):
        Trace(bad)
