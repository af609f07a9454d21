"""Input checks shared by ``Table`` and ``ReferenceTable``: every batch is validated in full
before anything is changed, and each error names the array, what was expected and what came."""

from __future__ import annotations

import numpy as np

from ekko.store.errors import BadRowsError
from ekko.store.spec import LANES


def check_keys(keys: np.ndarray) -> np.ndarray:
    """1-D C-contiguous int64 keys; any other dtype is refused (never silently cast)."""
    arr = np.asarray(keys)
    if arr.dtype != np.int64:
        raise BadRowsError(f"keys must be int64, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise BadRowsError(f"keys must be 1-D, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def check_values(values: np.ndarray, n: int, dim: int) -> np.ndarray:
    """float32 [n, dim], C-contiguous (converted from any float32-convertible input)."""
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise BadRowsError(f"values are not convertible to float32: {exc}") from exc
    if arr.shape != (n, dim):
        raise BadRowsError(f"values must have shape ({n}, {dim}), got {arr.shape}")
    return np.ascontiguousarray(arr)


DEFAULT_MAX_ABS = 1e4
"""Largest |value| a source write may hold unless its table says otherwise (``max_abs``).
Trained rows stay in single digits (the default DLRM after 3000 steps of 512 synthetic events:
max |embedding| 3.2 with adam, 0.73 with adagrad; dense weights 0.55), so 1e4 leaves a
3000x margin while refusing the 3e38 that saturates every prediction reading it."""


def check_write_values(values: np.ndarray, table: str, max_abs: float = DEFAULT_MAX_ABS) -> None:
    """Refuse a source write holding NaN, inf or a value beyond ``±max_abs``: once versioned it
    would reach every replica and every prediction reading it. Names the first bad value's row
    and column."""
    v = np.asarray(values)
    if not v.size:
        return
    lo, hi = v.min(), v.max()  # NaN propagates: both comparisons below are then false
    if lo >= -max_abs and hi <= max_abs:
        return
    flat = v.reshape(v.shape[0], -1)
    row, col = (int(i[0]) for i in np.nonzero(~(np.abs(flat) <= max_abs)))
    x = float(flat[row, col])
    what = "NaN or inf" if not np.isfinite(x) else f"{x:.9g}, beyond ±{max_abs:g} (max_abs)"
    raise BadRowsError(
        f"table {table!r}: values[{row}][{col}] is {what}; a source write must be finite "
        f"and within ±{max_abs:g}"
    )


def check_int64(arr: np.ndarray, n: int, name: str) -> np.ndarray:
    """1-D int64 of length n (any integer dtype is accepted and widened)."""
    a = np.asarray(arr)
    if a.dtype.kind not in "iu":
        raise BadRowsError(f"{name} must be an integer array, got dtype {a.dtype}")
    if a.shape != (n,):
        raise BadRowsError(f"{name} must have shape ({n},), got {a.shape}")
    if a.dtype == np.uint64 and n and int(a.max()) > np.iinfo(np.int64).max:
        raise BadRowsError(f"{name} has values above the int64 range")
    return np.ascontiguousarray(a, dtype=np.int64)


def check_lanes(lanes: np.ndarray | int, n: int) -> np.ndarray:
    """uint8 [n] lanes, each one of ``LANES``; an int is broadcast to every row."""
    if isinstance(lanes, (int, np.integer)):
        if int(lanes) not in LANES:
            raise BadRowsError(f"lane must be one of {LANES}, got {lanes}")
        return np.full(n, int(lanes), dtype=np.uint8)
    a = np.asarray(lanes)
    if a.dtype != np.uint8:
        a = check_int64(a, n, "lanes")
    if a.shape != (n,):
        raise BadRowsError(f"lanes must have shape ({n},), got {a.shape}")
    if n and (int(a.min()) < min(LANES) or int(a.max()) > max(LANES)):
        raise BadRowsError(f"lanes must be in {LANES}, got values in [{a.min()}, {a.max()}]")
    return np.ascontiguousarray(a, dtype=np.uint8)


def check_versions(versions: np.ndarray, n: int) -> np.ndarray:
    """int64 [n], every version >= 1 (0 means "no row")."""
    v = check_int64(versions, n, "versions")
    if n and int(v.min()) < 1:
        raise BadRowsError(f"versions must be >= 1, got minimum {int(v.min())}")
    return v


def check_cursors(
    shards: np.ndarray, lanes: np.ndarray, after: np.ndarray, num_shards: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cursor arrays of equal length m: shards in [0, num_shards), lanes in LANES."""
    s = np.asarray(shards)
    if s.ndim != 1:
        raise BadRowsError(f"shards must be 1-D, got shape {s.shape}")
    m = s.shape[0]
    s = check_int64(s, m, "shards")
    a = check_int64(after, m, "after")
    ln = check_int64(lanes, m, "lanes")
    if m and (int(s.min()) < 0 or int(s.max()) >= num_shards):
        raise BadRowsError(f"shards must be in [0, {num_shards}), got [{s.min()}, {s.max()}]")
    if m and (int(ln.min()) < min(LANES) or int(ln.max()) > max(LANES)):
        raise BadRowsError(f"lanes must be in {LANES}, got [{ln.min()}, {ln.max()}]")
    return s, ln, a


def check_scalar_index(value: int, bound: int, name: str) -> int:
    """An int in [0, bound)."""
    if not isinstance(value, (int, np.integer)) or not 0 <= int(value) < bound:
        raise BadRowsError(f"{name} must be an int in [0, {bound}), got {value!r}")
    return int(value)


def check_rows(
    keys: np.ndarray,
    values: np.ndarray,
    versions: np.ndarray,
    wtimes: np.ndarray,
    lanes: np.ndarray | int,
    dim: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows as they are applied, replayed or restored: (keys, values, versions, wtimes,
    lanes), each checked against the keys' count."""
    k = check_keys(keys)
    n = k.shape[0]
    return (
        k,
        check_values(values, n, dim),
        check_versions(versions, n),
        check_int64(wtimes, n, "wtimes"),
        check_lanes(lanes, n),
    )


def check_dead(dead: np.ndarray | None, n: int) -> np.ndarray:
    """uint8 [n] tombstone flags (1: the row is a delete); None: every row is live."""
    if dead is None:
        return np.zeros(n, dtype=np.uint8)
    a = np.asarray(dead)
    if a.dtype.kind not in "biu":
        raise BadRowsError(f"dead must be a bool or integer array, got dtype {a.dtype}")
    if a.shape != (n,):
        raise BadRowsError(f"dead must have shape ({n},), got {a.shape}")
    if n and (int(a.min()) < 0 or int(a.max()) > 1):
        raise BadRowsError(f"dead must hold 0 or 1, got values in [{a.min()}, {a.max()}]")
    return np.ascontiguousarray(a, dtype=np.uint8)
