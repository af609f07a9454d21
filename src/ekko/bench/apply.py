"""Bench ``apply``: rows/s a replica stores with ``Table.apply`` and reads with
``Table.lookup`` on one core (dim 32, 1 M-row batches into a pre-filled table).

Phases alternate inside each block (forward order in even blocks, reversed in odd ones) and
the summary takes medians over blocks; ``lookup_control`` repeats the lookup phase unchanged,
so its ratio to ``lookup`` shows the noise of the machine (DESIGN.md §8). Rates use wall time;
thread CPU time rates are reported beside them (the machine is shared, CPU time discounts
time the process was not scheduled).

The source's side, alternated in the same blocks: ``write`` is ``Table.write`` (new versions)
without a write-ahead log, ``write_wal`` with the store journalled (the write path's cost:
the batch is encoded and buffered, the fsync runs on the log's thread), and
``write_wal_durable`` until the batch is fsynced (what acknowledging it costs). ``--wal off``
drops the logged phases, ``--wal on`` the unlogged one.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ekko.bench.report import median, write_result
from ekko.store import Store, Table, warm
from ekko.store.journal import StoreJournal
from ekko.store.spec import TableSpec
from ekko.store.wal import WriteAheadLog

BAR = 10_000_000
PHASES = ("apply_existing", "apply_mixed", "apply_new", "lookup", "lookup_control")
WRITE_PHASES = {
    "both": ("write", "write_wal", "write_wal_durable"),
    "on": ("write_wal", "write_wal_durable"),
    "off": ("write",),
}


def _timed(fn: Any) -> tuple[float, float, Any]:
    c0, w0 = time.thread_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - w0, time.thread_time() - c0, out


def run(*, quick: bool = False, out: Path | None = None, wal: str = "both") -> dict:
    """Run the bench, write JSON + PNG (``out`` or bench/results/apply.json), return the doc
    summary and details."""
    if wal not in WRITE_PHASES:
        raise ValueError(f"wal must be one of {sorted(WRITE_PHASES)}, got {wal!r}")
    phases = PHASES + WRITE_PHASES[wal]
    dim, batch = 32, 1_000_000
    prefill = 2_000_000 if quick else 10_000_000
    blocks = 4 if quick else 7
    num_shards = 8
    seed = 20240601
    rng = np.random.default_rng(seed)
    warm()

    # Existing keys: scattered int64 ids; new keys: a disjoint (negative) range.
    existing = rng.permutation(np.arange(prefill, dtype=np.int64)) * 2_654_435_761 + 1
    new_needed = (blocks + 1) * (batch + batch // 2)
    fresh = -1 - rng.permutation(np.arange(new_needed, dtype=np.int64)) * 40_503
    table = Table(
        TableSpec("bench", dim, num_shards),
        cache_capacity=16_384,
        initial_rows=prefill + new_needed,
    )
    table.reserve(prefill + new_needed)
    values = rng.standard_normal((batch, dim), dtype=np.float32)
    wtimes = np.zeros(batch, dtype=np.int64)
    lanes = (rng.random(batch) < 0.2).astype(np.uint8)
    version = [1]

    def next_versions() -> np.ndarray:
        v = np.arange(version[0], version[0] + batch, dtype=np.int64)
        version[0] += batch
        return v

    t0 = time.perf_counter()
    for i in range(0, prefill, batch):
        k = existing[i : i + batch]
        table.apply(k, values[: k.size], next_versions()[: k.size], wtimes[: k.size], 0)
    prefill_s = time.perf_counter() - t0

    # The source's table: its own store, journalled into a temporary log for write_wal.
    source = Store(cache_capacity=16_384)
    src = source.create_table(TableSpec("bench_src", dim, num_shards), initial_rows=2 * batch)
    src.reserve(2 * batch)
    src_keys = existing[: 2 * batch].copy()
    for i in range(0, src_keys.size, batch):
        src.write(src_keys[i : i + batch], values, now_ns=1)
    wal_dir = tempfile.TemporaryDirectory(prefix="ekko-bench-wal-")
    log = WriteAheadLog(Path(wal_dir.name), window_s=0.003)
    source.set_write_hook(None)
    fsyncs: list[int] = []

    def source_write(logged: bool, durable: bool) -> int:
        keys = src_keys[rng.integers(0, src_keys.size, batch)]
        if logged:
            StoreJournal(source, log)  # attaches itself as the store's write hook
        else:
            source.set_write_hook(None)
        before = log.statistics().fsyncs
        src.write(keys, values, now_ns=2, lanes=lanes)
        if durable:
            log.sync(timeout=120)
            fsyncs.append(log.statistics().fsyncs - before)
        return batch

    fresh_pos = [0]

    def take_fresh(n: int) -> np.ndarray:
        k = fresh[fresh_pos[0] : fresh_pos[0] + n]
        fresh_pos[0] += n
        return k

    def batch_keys(phase: str) -> np.ndarray:
        if phase == "apply_new":
            return take_fresh(batch)
        old = existing[rng.integers(0, prefill, batch)]
        if phase == "apply_mixed":
            old[: batch // 2] = take_fresh(batch // 2)
            rng.shuffle(old)
        return old

    def one(phase: str) -> tuple[float, float, int]:
        if phase.startswith("write"):
            log.sync(timeout=120)  # the previous logged batch is not this one's cost
            log.rotate(log.last_seq)  # the bench keeps no snapshot: bound the disk it uses
            log.sync(timeout=120)
            wall, cpu, n = _timed(
                lambda: source_write(phase != "write", phase == "write_wal_durable")
            )
            return wall, cpu, n
        keys = batch_keys(phase)
        if phase.startswith("apply"):
            ver = next_versions()
            wall, cpu, n = _timed(lambda: table.apply(keys, values, ver, wtimes, lanes))
            assert n == batch, (phase, n)
        else:
            wall, cpu, (_, _, found) = _timed(lambda: table.lookup(keys))
            assert found.all()
        return wall, cpu, batch

    one("apply_existing")  # warm-up: page in scratch and output memory
    one("lookup")
    for p in WRITE_PHASES[wal]:
        one(p)
    per_phase: dict[str, list[dict[str, float]]] = {p: [] for p in phases}
    for b in range(blocks):
        order = phases if b % 2 == 0 else phases[::-1]
        for phase in order:
            wall, cpu, n = one(phase)
            per_phase[phase].append(
                {"block": b, "wall_s": wall, "cpu_s": cpu, "rows_per_s": n / wall,
                 "rows_per_s_cpu": n / cpu if cpu > 0 else float("nan")}
            )  # fmt: skip

    log.close()
    wal_dir.cleanup()
    med = {p: median([r["rows_per_s"] for r in rs]) for p, rs in per_phase.items()}
    med_cpu = {p: median([r["rows_per_s_cpu"] for r in rs]) for p, rs in per_phase.items()}
    writes: dict[str, Any] = {}
    if "write" in med and "write_wal" in med:
        writes["write_wal_cost_ratio"] = med["write"] / med["write_wal"]
        writes["write_wal_durable_cost_ratio"] = med["write"] / med["write_wal_durable"]
    if fsyncs:
        writes["fsyncs_per_durable_batch_median"] = median([float(f) for f in fsyncs])
    apply_phases = [p for p in PHASES if p.startswith("apply")]
    summary = {
        # Worst of the three key mixes: the bar must hold for each.
        "apply_rows_per_s_per_core": min(med[p] for p in apply_phases),
        "lookup_rows_per_s_per_core": med["lookup"],
        **{f"{p}_rows_per_s": med[p] for p in phases},
        **{f"{p}_rows_per_s_cpu": med_cpu[p] for p in phases},
        **writes,
        "lookup_control_ratio": med["lookup_control"] / med["lookup"],
        "bar_rows_per_s": BAR,
        "meets_bar": min(med[p] for p in (*apply_phases, "lookup")) >= BAR,
    }
    inputs = {
        "quick": quick, "dim": dim, "batch_rows": batch, "prefill_rows": prefill,
        "blocks": blocks, "num_shards": num_shards, "cache_capacity": 16_384,
        "seed": seed, "phases": list(phases), "new_key_share_mixed": 0.5, "wal": wal,
        "wal_window_ms": 3.0, "source_rows": int(src.rows),
    }  # fmt: skip
    details = {
        "per_phase": per_phase,
        "prefill_s": prefill_s,
        "table_rows_after": table.rows,
        "statistics": table.statistics().__dict__,
    }

    def plot(fig: Figure) -> None:
        ax = fig.add_subplot(1, 1, 1)
        for p in phases:
            ax.plot(
                [r["block"] for r in per_phase[p]],
                [r["rows_per_s"] / 1e6 for r in per_phase[p]],
                marker="o",
                label=f"{p} (median {med[p] / 1e6:.1f} M/s)",
            )
        ax.axhline(BAR / 1e6, color="red", linestyle="--", label="bar 10 M rows/s")
        ax.set_xlabel("block")
        ax.set_ylabel("M rows/s (one core, wall time)")
        ax.set_title(
            f"Table.apply / lookup, dim {dim}, 1 M-row batches, {prefill / 1e6:.0f} M keys"
        )
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)

    path = write_result("apply", inputs, summary, details, out, plot)
    return {"summary": summary, "details": details, "inputs": inputs, "path": str(path)}
