"""A synthetic writer at the source: Zipf-hot keys at a fixed row rate, for demos and benches.

An operator tool, not part of a node: ``ekko node --writer-rate`` composes it into the source
as an extra driver (``synthetic_writer``), supervised like the node's own loops. Writes go
through the same ``NodeCore.write`` as the HTTP API (the write port wakes parked pulls);
batches are generated with numpy so a 100 k rows/s stream costs the source little beyond
the store write itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ekko.node.core import NodeCore
from ekko.node.driver import Driver, DriverFactory
from ekko.store import shard_of
from ekko.store.clock import SYSTEM_CLOCK, LoopClock

log = logging.getLogger(__name__)

_POOL_ROWS = 1 << 15


@dataclass(frozen=True)
class SyntheticWriterConfig:
    rate_rows_per_s: float = 10_000.0
    batch_interval_ms: float = 10.0
    key_space: int = 1_000_000
    zipf_a: float = 1.2
    seed: int = 0
    prefill: int = 0  # rows 0..prefill-1 written once before the stream starts
    tables: tuple[str, ...] = ()

    def validate(self) -> SyntheticWriterConfig:
        if self.rate_rows_per_s < 0:
            raise ValueError(f"rate_rows_per_s must be >= 0, got {self.rate_rows_per_s}")
        if self.batch_interval_ms <= 0:
            raise ValueError(f"batch_interval_ms must be > 0, got {self.batch_interval_ms}")
        if self.key_space <= 0:
            raise ValueError(f"key_space must be > 0, got {self.key_space}")
        return self


class SyntheticWriter(Driver):
    """Paces batches on the event loop; catches up on missed ticks instead of drifting.

    Why a driver: the node supervises it like its own loops (a failing write is logged and
    the writer restarted); ``rows_written`` shows in ``/v1/status`` as ``writer_rows``.
    """

    name = "synthetic_writer"

    def __init__(
        self,
        config: SyntheticWriterConfig,
        write: Callable[[str, np.ndarray, np.ndarray], object],
        dims: dict[str, int],
        clock: LoopClock = SYSTEM_CLOCK,
        keep: Callable[[str, np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """``keep(table, keys)``: which keys this node may write (bool [n]; a partitioned
        source's own partitions), None: all."""
        self.config = config.validate()
        self._write = write
        self._dims = dims
        self._keep = keep
        self.clock = clock
        self._rng = np.random.default_rng(config.seed)
        self._pools: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.rows_written = 0
        self._prefilled = False

    def status(self) -> dict[str, int]:
        return {"writer_rows": self.rows_written}

    def _batch(self, table: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        ranks = self._rng.zipf(self.config.zipf_a, n)
        mixed = ranks.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2**64
        keys = (mixed % np.uint64(self.config.key_space)).astype(np.int64)
        return keys, self._values(table, n)

    def _values(self, table: str, n: int) -> np.ndarray:
        """n rows of N(0, 1) values, cheaply: ``a * cos t + b * sin t`` with ``a`` and ``b``
        random windows of two pools of normal rows drawn once per table and ``t`` a fresh
        random angle, so every row is N(0, 1) and no two batches repeat bytes. Drawing every
        value anew cost the source about 0.3 ms per 1 000 rows of dim 32: as much CPU as the
        store write and answering three replicas together."""
        pools = self._pools.get(table)
        if pools is None or len(pools[0]) < n:
            rows = max(_POOL_ROWS, n)
            dim = self._dims[table]
            pools = (
                self._rng.standard_normal((rows, dim), dtype=np.float32),
                self._rng.standard_normal((rows, dim), dtype=np.float32),
            )
            self._pools[table] = pools
        a, b = pools
        i, j = (int(x) for x in self._rng.integers(0, len(a) - n + 1, 2))
        t = self._rng.uniform(0.0, 2 * np.pi)
        out = a[i : i + n] * np.float32(np.cos(t))
        out += b[j : j + n] * np.float32(np.sin(t))
        return out

    def _prefill(self, tables: list[str]) -> None:
        step = 100_000
        for table in tables:
            for lo in range(0, self.config.prefill, step):
                keys = np.arange(lo, min(lo + step, self.config.prefill), dtype=np.int64)
                values = self._rng.standard_normal((len(keys), self._dims[table]), np.float32)
                self._write(table, keys, values)

    async def run(self) -> None:
        cfg = self.config
        tables = list(cfg.tables or self._dims)
        if not tables:  # a partitioned --serve cluster: its sharded trainer makes them
            log.warning("synthetic writer: no table to write (the store has none and "
                        "--writer-tables names none); writing nothing")  # fmt: skip
            await asyncio.Event().wait()
        if not self._prefilled:  # once, not again when the supervisor restarts the writer
            self._prefill(tables)
            self._prefilled = True
        interval = cfg.batch_interval_ms / 1000
        start = self.clock.mono()
        owed = 0.0
        tick = 0
        while True:
            tick += 1
            await self.clock.sleep(max(0.0, start + tick * interval - self.clock.mono()))
            owed += cfg.rate_rows_per_s * interval
            n = int(owed)
            if n <= 0:
                continue
            owed -= n
            table = tables[tick % len(tables)]
            keys, values = self._batch(table, n)
            if self._keep is not None:
                mine = self._keep(table, keys)
                keys, values = keys[mine], values[mine]
                if not keys.shape[0]:
                    continue
            self._write(table, keys, values)
            self.rows_written += keys.shape[0]


def synthetic_writer(config: SyntheticWriterConfig) -> DriverFactory:
    """The factory ``run_node(..., drivers=[...])`` takes: a writer at the source, nothing on
    any other node."""
    config.validate()

    def build(core: NodeCore) -> Driver | None:
        if not core.is_source:
            return None
        dims = {n: t.dim for n, t in core.store.tables.items()}
        return SyntheticWriter(config, core.write, dims, keep=_held_keys(core))

    return build


def _held_keys(core: NodeCore) -> Callable[[str, np.ndarray], np.ndarray] | None:
    """A partitioned source's filter: the keys of its own partitions (it refuses the
    others' with a 421); None when unpartitioned."""
    cfg = core.config
    if not cfg.partitioned:
        return None
    placement = cfg.placement()
    mine = np.array(cfg.held(core.name), dtype=np.int64)

    def keep(table: str, keys: np.ndarray) -> np.ndarray:
        shards = core.store.table(table).spec.num_shards
        return np.isin(placement.partitions_of(table, shards)[shard_of(keys, shards)], mine)

    return keep
