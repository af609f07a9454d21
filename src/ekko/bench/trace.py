"""Update traces recorded from the real online trainer, replayed identically to every system.

The bandwidth bench compares Ekko with its baselines on *the same* sequence of row updates,
so the updates are recorded once from :class:`~ekko.train.OnlineTrainer` (a real DLRM trained
on the synthetic stream, published by :class:`~ekko.train.EmbeddingPublisher`) and saved with
the events that produced them (so AUC can be evaluated later). One ``.npz`` file, plain arrays
only: it loads with ``allow_pickle=False``.

A trace holds:

- ``initial``: every row of every table before the first step (``publisher.snapshot()``), the
  state all stores start from (loaded offline, not sent over any WAN);
- the update batches: one per publisher write, with the step index and the simulated time at
  which the step's events had all arrived (``(step + 1) * time_per_batch``);
- the events of every step (dense, sparse, labels, ts).

Dense tensors are tables too (DESIGN.md §2); the publisher writes them at most once per
simulated second (its clock is the stream's simulated time, so recording is deterministic).
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ekko.store.spec import TableSpec
from ekko.train.dlrm import DENSE_PREFIX, DLRM, DLRMConfig
from ekko.train.publisher import EmbeddingPublisher, PublisherConfig
from ekko.train.streams import Events, StreamConfig, SyntheticStream
from ekko.train.trainer import OnlineTrainer, TrainerConfig

TRACE_FORMAT = 1

SMALL_MODEL = DLRMConfig(
    num_sparse=8, embedding_dim=8, rows_per_table=10_000, bottom_mlp=(16, 8), top_mlp=(16, 1)
)
"""Default model of :func:`record_trace`: small enough for tests and quick runs."""


class TraceBatch(NamedTuple):
    """One publisher write: at simulated time ``t_sim``, rows ``keys`` of ``table`` took
    ``values`` (float32 [n, dim])."""

    t_sim: float
    table: str
    keys: np.ndarray
    values: np.ndarray


def row_bytes_fp32(dim: int) -> int:
    """Bytes of one row sent plainly: an int64 key and ``dim`` float32 values."""
    return 8 + 4 * dim


class RecordingSink:
    """A publisher sink that keeps every write, in order, with its step and simulated time.

    Why: a trace must hold exactly what the trainer published (not a model of it), so the
    baselines and Ekko replay the real sparsity, sizes and dense-tensor cadence.
    ``step`` and ``t_sim`` are set by the recording loop before each publish; ``step == -1``
    marks the initial snapshot.
    """

    def __init__(self) -> None:
        self.specs: list[TableSpec] = []
        self._index: dict[str, int] = {}
        self.step = -1
        self.t_sim = 0.0
        self.tables: list[int] = []
        self.steps: list[int] = []
        self.times: list[float] = []
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []

    def create_table(self, spec: TableSpec) -> None:
        if spec.name in self._index:
            if self.specs[self._index[spec.name]] != spec:
                raise ValueError(f"table {spec.name!r} recorded twice with different specs")
            return
        self._index[spec.name] = len(self.specs)
        self.specs.append(spec)

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        idx = self._index[table]
        dim = self.specs[idx].dim
        k = np.ascontiguousarray(keys, dtype=np.int64).copy()
        v = np.ascontiguousarray(values, dtype=np.float32).reshape(len(k), dim).copy()
        self.tables.append(idx)
        self.steps.append(self.step)
        self.times.append(self.t_sim)
        self.keys.append(k)
        self.values.append(v)


class _TablesOnly:
    """The warm-up's sink: tables reach the recording, rows do not (the warmed state is
    snapshotted after); it notes which rows training touched."""

    def __init__(self, sink: RecordingSink) -> None:
        self._sink = sink
        self.touched: dict[str, set[int]] = {}

    def create_table(self, spec: TableSpec) -> None:
        self._sink.create_table(spec)

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        self.touched.setdefault(table, set()).update(keys.tolist())


class _TouchedOnly:
    """The snapshot after a warm-up: embedding rows training touched, and dense tensors.

    Why not every row: an id the warm-up never saw (a new user or item) has no row in a
    production store until training first writes it; replicas serve zeros for it until then,
    and its first write is a new key, which the scheduler sends first."""

    def __init__(self, sink: RecordingSink, touched: dict[str, set[int]]) -> None:
        self._sink = sink
        self._touched = {t: np.fromiter(k, np.int64) for t, k in touched.items()}

    def create_table(self, spec: TableSpec) -> None:
        self._sink.create_table(spec)

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        if table.startswith(DENSE_PREFIX):
            self._sink.write(table, keys, values)
            return
        keep = np.isin(keys, self._touched.get(table, np.zeros(0, np.int64)))
        if keep.any():
            self._sink.write(table, keys[keep], values[keep])


def _default_stream(seed: int, model: DLRMConfig) -> StreamConfig:
    return StreamConfig(
        seed=seed,
        num_dense=model.num_dense,
        num_sparse=model.num_sparse,
        num_item_features=min(4, model.num_sparse - 1),
        max_vocab=max(model.rows_per_table * 2, 1_000),
        initial_items=max(model.rows_per_table // 2, 100),
    )


def record_trace(
    steps: int,
    batch_size: int,
    *,
    seed: int,
    path: Path,
    model_config: DLRMConfig = SMALL_MODEL,
    stream_config: StreamConfig | None = None,
    trainer_config: TrainerConfig | None = None,
    embedding_shards: int = 16,
    dense_interval_s: float = 1.0,
    warmup_steps: int = 0,
) -> Path:
    """Train ``model_config`` online for ``steps`` batches and save what it published.

    The stream defaults to a seeded synthetic stream shaped like the model (ids beyond
    ``rows_per_table`` are hashed into the table by the model). ``dense_interval_s`` is in
    simulated seconds. ``warmup_steps`` batches train the model first, unrecorded, so the
    trace shows a model in steady online training rather than one learning from scratch;
    the warmed model is the trace's initial state. Returns ``path`` (``.npz`` appended by
    numpy if missing).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    stream_cfg = stream_config or _default_stream(seed, model_config)
    if (stream_cfg.num_sparse, stream_cfg.num_dense) != (
        model_config.num_sparse,
        model_config.num_dense,
    ):
        raise ValueError("stream_config and model_config disagree on num_sparse / num_dense")
    stream = SyntheticStream(stream_cfg)
    dt = stream.time_per_batch(batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DLRM(model_config)
        sink = RecordingSink()
        publisher = EmbeddingPublisher(
            model,
            sink,
            PublisherConfig(
                table_names=model.table_names(),
                embedding_shards=embedding_shards,
                dense_interval_s=dense_interval_s,
            ),
            clock=lambda: sink.t_sim,
        )
        trainer = OnlineTrainer(model, trainer_config, publisher)
        batches = stream.batches(batch_size)
        if warmup_steps > 0:
            warm = _TablesOnly(sink)
            publisher.sink = warm
            for _, ev in zip(range(warmup_steps), batches, strict=False):
                trainer.step(ev)
            publisher.sink = _TouchedOnly(sink, warm.touched)
            publisher.snapshot()
            publisher.sink = sink
        else:
            publisher.snapshot()
        events: list[Events] = []
        for step, ev in enumerate(batches):
            if step >= steps:
                break
            sink.step = step
            sink.t_sim = (step + 1) * dt
            trainer.step(ev)
            events.append(ev)
        publisher.flush()  # dense tensors changed since their last publish, at the last step
        publisher.close()
    return save_trace(sink, events, path, time_per_batch=dt, batch_size=batch_size, seed=seed)


def _pack(
    tables: list[int], keys: list[np.ndarray], values: list[np.ndarray]
) -> dict[str, np.ndarray]:
    return {
        "table": np.asarray(tables, dtype=np.int32),
        "rows": np.asarray([len(k) for k in keys], dtype=np.int64),
        "keys": np.concatenate(keys) if keys else np.empty(0, np.int64),
        "values": (
            np.concatenate([v.reshape(-1) for v in values]) if values else np.empty(0, np.float32)
        ),
    }


def save_trace(
    sink: RecordingSink,
    events: list[Events],
    path: Path,
    *,
    time_per_batch: float,
    batch_size: int,
    seed: int,
) -> Path:
    """Write a recorded sink and its events as one ``.npz`` (no pickled objects)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = np.asarray(sink.steps, dtype=np.int32)
    init = steps < 0
    sel = np.flatnonzero(init).tolist()
    upd = np.flatnonzero(~init).tolist()
    arrays: dict[str, np.ndarray] = {
        "format": np.asarray(TRACE_FORMAT),
        "spec_name": np.asarray([s.name for s in sink.specs], dtype=np.str_),
        "spec_dim": np.asarray([s.dim for s in sink.specs], dtype=np.int64),
        "spec_shards": np.asarray([s.num_shards for s in sink.specs], dtype=np.int64),
        "time_per_batch": np.asarray(time_per_batch, dtype=np.float64),
        "batch_size": np.asarray(batch_size, dtype=np.int64),
        "seed": np.asarray(seed, dtype=np.int64),
        "upd_step": steps[upd],
        "upd_t": np.asarray(sink.times, dtype=np.float64)[upd],
    }
    for prefix, idx in (("init_", sel), ("upd_", upd)):
        packed = _pack(
            [sink.tables[i] for i in idx],
            [sink.keys[i] for i in idx],
            [sink.values[i] for i in idx],
        )
        arrays.update({prefix + k: v for k, v in packed.items()})
    if events:
        arrays["ev_dense"] = np.stack([e.dense for e in events]).astype(np.float32)
        arrays["ev_sparse"] = np.stack([e.sparse for e in events]).astype(np.int64)
        arrays["ev_labels"] = np.stack([e.labels for e in events]).astype(np.float32)
        arrays["ev_ts"] = np.stack([e.ts for e in events]).astype(np.float64)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class _Packed:
    table: np.ndarray
    rows: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    key_off: np.ndarray
    val_off: np.ndarray


def _unpack(z: np.lib.npyio.NpzFile, prefix: str, dims: np.ndarray) -> _Packed:
    table = z[prefix + "table"]
    rows = z[prefix + "rows"]
    key_off = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    val_off = np.concatenate([[0], np.cumsum(rows * dims[table])]).astype(np.int64)
    return _Packed(table, rows, z[prefix + "keys"], z[prefix + "values"], key_off, val_off)


class Trace:
    """A loaded update trace: table specs, the initial state, the update batches, the events.

    Why a class: every system under test replays the same batches at the same recorded times
    (``replay``) and is judged against the same totals (``rows``, ``fp32_bytes``: what sending
    every update once, as int64 key + float32 row, costs).
    """

    def __init__(self, path: Path) -> None:
        with np.load(Path(path), allow_pickle=False) as z:
            if int(z["format"]) != TRACE_FORMAT:
                raise ValueError(f"{path}: trace format {int(z['format'])}, want {TRACE_FORMAT}")
            names = [str(n) for n in z["spec_name"]]
            dims = z["spec_dim"]
            shards = z["spec_shards"]
            self.specs: list[TableSpec] = [
                TableSpec(n, int(d), int(s)) for n, d, s in zip(names, dims, shards, strict=True)
            ]
            self.time_per_batch = float(z["time_per_batch"])
            self.batch_size = int(z["batch_size"])
            self.seed = int(z["seed"])
            self._init = _unpack(z, "init_", dims)
            self._upd = _unpack(z, "upd_", dims)
            self.batch_steps: np.ndarray = z["upd_step"]
            self.batch_times: np.ndarray = z["upd_t"]
            self._events = (
                (z["ev_dense"], z["ev_sparse"], z["ev_labels"], z["ev_ts"])
                if "ev_dense" in z.files
                else None
            )
        self._dims = dims

    # -- contents ------------------------------------------------------------------------------

    def _batch(self, p: _Packed, i: int, t: float) -> TraceBatch:
        ti = int(p.table[i])
        spec = self.specs[ti]
        keys = p.keys[p.key_off[i] : p.key_off[i + 1]]
        values = p.values[p.val_off[i] : p.val_off[i + 1]].reshape(-1, spec.dim)
        return TraceBatch(t, spec.name, keys, values)

    @property
    def batches(self) -> Iterator[TraceBatch]:
        """The update batches in publish order (views into the loaded arrays)."""
        times = self.batch_times
        return (self._batch(self._upd, i, float(times[i])) for i in range(len(times)))

    @property
    def initial(self) -> Iterator[TraceBatch]:
        """The state before the first step, as batches at ``t_sim = 0``."""
        return (self._batch(self._init, i, 0.0) for i in range(len(self._init.table)))

    @property
    def events(self) -> list[Events]:
        """The event batches of every step, in order (empty if the trace has none)."""
        if self._events is None:
            return []
        dense, sparse, labels, ts = self._events
        return [Events(dense[s], sparse[s], labels[s], ts[s]) for s in range(len(labels))]

    @property
    def steps(self) -> int:
        return 0 if self._events is None else len(self._events[2])

    @property
    def num_batches(self) -> int:
        return len(self.batch_times)

    @property
    def duration_s(self) -> float:
        """Simulated time of the last batch."""
        return float(self.batch_times[-1]) if len(self.batch_times) else 0.0

    @property
    def rows(self) -> int:
        """Row updates in the trace (a row written in k steps counts k times)."""
        return int(self._upd.rows.sum())

    @property
    def fp32_bytes(self) -> int:
        """Bytes of every update once, plainly: rows * (8 + 4 * dim), summed per batch."""
        return int((self._upd.rows * (8 + 4 * self._dims[self._upd.table])).sum())

    @functools.cached_property
    def table_rows(self) -> dict[str, int]:
        """Rows per table in the final state (initial keys plus any new keys)."""
        per_table: dict[int, list[np.ndarray]] = {i: [] for i in range(len(self.specs))}
        for p in (self._init, self._upd):
            for i in range(len(p.table)):
                per_table[int(p.table[i])].append(p.keys[p.key_off[i] : p.key_off[i + 1]])
        return {
            self.specs[i].name: len(np.unique(np.concatenate(ks))) if ks else 0
            for i, ks in per_table.items()
        }

    @property
    def table_fp32_bytes(self) -> int:
        """Bytes of every row of every table once (the size of one full fp32 checkpoint)."""
        dims = {s.name: s.dim for s in self.specs}
        return sum(n * row_bytes_fp32(dims[name]) for name, n in self.table_rows.items())

    # -- replay --------------------------------------------------------------------------------

    async def replay(
        self, speed: float = 1.0, on_step: Callable[[int], None] | None = None
    ) -> AsyncIterator[TraceBatch]:
        """Yield the batches at their recorded times divided by ``speed`` (``math.inf``: as fast
        as possible), measured from the first iteration. A consumer that falls behind gets the
        overdue batches at once, never skipped; the loop is yielded to between steps.
        ``on_step(step)`` runs when a step is due, before its first batch is yielded."""
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        loop = asyncio.get_running_loop()
        start = loop.time()
        last_step = None
        for i, batch in enumerate(self.batches):
            step = int(self.batch_steps[i])
            if step != last_step:
                last_step = step
                due = start + (0.0 if math.isinf(speed) else batch.t_sim / speed)
                wait = due - loop.time()
                await asyncio.sleep(max(wait, 0.0))
                if on_step is not None:
                    on_step(step)
            yield batch


def load_trace(path: Path) -> Trace:
    """Load a trace written by :func:`record_trace`."""
    return Trace(path)
