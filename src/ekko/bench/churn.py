"""Bench ``churn``: cost of one pull round (``Table.collect`` for every shard and lane, then
``Table.rows_at``) at a fixed churn of 10 k changed rows, on tables of 1 M and 10 M rows,
answered from the update cache vs by a full scan (DESIGN.md §3, §8: "flat in table size with
the cache").

Each block changes 10 k rows at the source, then times the cache path and the full-scan path
on the same cursors (order alternating per block), plus a control that repeats the cache path
unchanged. Medians over blocks. Rows are spread over every lane in ``LANES`` and each round
checks that both paths return the same rows, with rows in every lane.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ekko.bench.report import median, write_result
from ekko.store import Table, warm
from ekko.store.spec import LANES, TableSpec

PATHS = ("cache", "full_scan", "cache_control")


def _lanes_of(keys: np.ndarray) -> np.ndarray:
    """Each row's lane, a function of its key: every lane in ``LANES`` holds a third."""
    return np.asarray(LANES, np.uint8)[keys % len(LANES)]


def _pull_round(table: Table, cursors: tuple[np.ndarray, ...], use_cache: bool) -> tuple:
    got = table.collect(*cursors, use_cache=use_cache)
    rows = table.rows_at(got.slots)
    return got, rows


def run(*, quick: bool = False, out: Path | None = None) -> dict:
    """Run the bench, write JSON + PNG (``out`` or bench/results/churn.json), return the doc
    summary and details."""
    sizes = [1_000_000, 4_000_000] if quick else [1_000_000, 10_000_000]
    blocks = 5 if quick else 9
    dim, num_shards, churn, cache_capacity = 32, 4, 10_000, 16_384
    seed = 7
    rng = np.random.default_rng(seed)
    warm()

    tables: dict[int, Table] = {}
    keys_of: dict[int, np.ndarray] = {}
    for size in sizes:
        t = Table(
            TableSpec(f"churn{size}", dim, num_shards),
            cache_capacity=cache_capacity,
            initial_rows=size,
        )
        keys = rng.permutation(np.arange(size, dtype=np.int64)) * 11 + 5
        vals = rng.standard_normal((min(size, 1_000_000), dim), dtype=np.float32)
        for i in range(0, size, vals.shape[0]):
            k = keys[i : i + vals.shape[0]]
            t.write(k, vals[: k.size], now_ns=0, lanes=_lanes_of(k))
        tables[size], keys_of[size] = t, keys

    shards = np.repeat(np.arange(num_shards), len(LANES))
    lanes = np.tile(np.array(LANES), num_shards)
    per: dict[int, dict[str, list[float]]] = {s: {p: [] for p in PATHS} for s in sizes}
    found: dict[int, list[int]] = {s: [] for s in sizes}
    per_lane: dict[int, list[list[int]]] = {s: [] for s in sizes}
    change_vals = rng.standard_normal((churn, dim), dtype=np.float32)
    for b in range(blocks + 1):  # block 0 is a warm-up, not recorded
        for size in sizes:
            t = tables[size]
            cursors = (shards, lanes, t.counter[shards].copy())
            changed = keys_of[size][rng.choice(size, churn, replace=False)]
            t.write(changed, change_vals, now_ns=b, lanes=_lanes_of(changed))
            order = PATHS if b % 2 == 0 else PATHS[::-1]
            results = {}
            for path in order:
                t0 = time.perf_counter()
                got, rows = _pull_round(t, cursors, use_cache=path != "full_scan")
                dt = time.perf_counter() - t0
                results[path] = (got, rows)
                if b:
                    per[size][path].append(dt)
            cache, scan = results["cache"][0], results["full_scan"][0]
            assert not cache.full_scan.any() and scan.full_scan.all()
            assert np.array_equal(cache.offsets, scan.offsets)
            assert np.array_equal(cache.slots, scan.slots)
            assert int(cache.offsets[-1]) == churn
            counts = np.diff(cache.offsets)
            lane_rows = [int(counts[lanes == ln].sum()) for ln in LANES]
            assert min(lane_rows) > 0, f"a lane returned no rows: {lane_rows}"
            if b:
                found[size].append(int(cache.offsets[-1]))
                per_lane[size].append(lane_rows)

    med = {s: {p: median(per[s][p]) for p in PATHS} for s in sizes}
    small, large = sizes[0], sizes[-1]
    summary = {
        "cache_speedup_10m": med[large]["full_scan"] / med[large]["cache"],
        "cache_cost_growth_1m_to_10m": med[large]["cache"] / med[small]["cache"],
        "largest_rows": large,
        **{f"cache_ms_{s}": med[s]["cache"] * 1e3 for s in sizes},
        **{f"full_scan_ms_{s}": med[s]["full_scan"] * 1e3 for s in sizes},
        **{f"cache_control_ratio_{s}": med[s]["cache_control"] / med[s]["cache"] for s in sizes},
        "bar_speedup": 20,
        "bar_growth": 2,
    }
    inputs = {
        "quick": quick, "sizes": sizes, "blocks": blocks, "dim": dim,
        "num_shards": num_shards, "cursors_per_round": int(shards.size),
        "changed_rows_per_round": churn, "cache_capacity": cache_capacity, "seed": seed,
        "lanes": list(LANES),
    }  # fmt: skip
    details = {
        "seconds": {str(s): per[s] for s in sizes},
        "rows_returned": {str(s): found[s] for s in sizes},
        "rows_returned_per_lane": {str(s): per_lane[s] for s in sizes},
        "statistics": {str(s): tables[s].statistics().__dict__ for s in sizes},
    }

    def plot(fig: Figure) -> None:
        ax = fig.add_subplot(1, 1, 1)
        x = np.arange(len(sizes))
        width = 0.35
        for j, path in enumerate(("cache", "full_scan")):
            ys = [med[s][path] * 1e3 for s in sizes]
            ax.bar(x + (j - 0.5) * width, ys, width, label=path)
            for xi, y in zip(x, ys, strict=True):
                ax.text(xi + (j - 0.5) * width, y, f"{y:.2f}", ha="center", va="bottom")
        ax.set_xticks(x, [f"{s / 1e6:.0f} M rows" for s in sizes])
        ax.set_yscale("log")
        ax.set_ylabel("pull round, ms (median)")
        ax.set_title(f"collect + rows_at, {churn} changed rows, {shards.size} cursors")
        ax.legend()

    path = write_result("churn", inputs, summary, details, out, plot)
    return {"summary": summary, "details": details, "inputs": inputs, "path": str(path)}
