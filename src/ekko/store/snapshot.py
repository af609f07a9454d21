"""Snapshot file format: a checksummed header and raw array buffers, never pickle.

Layout::

    b"EKKOSNAP" | u32 format | u64 header length | u32 header crc32 | header (JSON, utf-8)
    | array buffers, in header order, each C-order | b"EKKOEND!"

The header lists, per array, its dtype, shape and crc32, so a truncated or corrupted file is
detected before anything is handed to a store (DESIGN.md §3, "Catch-up": a restarted source
recovers rows and counters from its own snapshot).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ekko.store.errors import SnapshotError

MAGIC = b"EKKOSNAP"
TRAILER = b"EKKOEND!"
FORMAT = 1
_PREFIX = struct.Struct("<8sIQI")
_DTYPES = {"<i8", "<i4", "<f4", "|u1"}
_MAX_HEADER = 64 * 2**20


@dataclass
class SnapshotTable:
    """One table's part of a snapshot: its spec fields and named arrays."""

    name: str
    dim: int
    num_shards: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class SnapshotData:
    """Everything a snapshot holds, as read back or about to be written."""

    origin: int
    catalog_version: int
    tables: list[SnapshotTable]
    lineage: int = 0  # the source history the rows belong to (``Store.lineage``)
    wal_seq: int = 0  # the last write-ahead log record the rows include
    # A store of several sources' partitions (``ekko.store.sources``): per partition, the
    # lineage of its rows ({}: one source, ``lineage``; snapshots from before hold none).
    lineages: dict[int, int] = field(default_factory=dict)


def _crc(arr: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B")) if arr.size else 0


def write_snapshot(path: Path, data: SnapshotData) -> None:
    """Write atomically: temp file in the same directory, fsync, rename, fsync the directory."""
    path = Path(path)
    tables_meta: list[dict[str, Any]] = []
    blobs: list[np.ndarray] = []
    for t in data.tables:
        metas = []
        for name, arr in t.arrays.items():
            a = np.ascontiguousarray(arr)
            if a.dtype.str not in _DTYPES:
                raise SnapshotError(
                    f"{path}: array {t.name}.{name} has unsupported dtype {a.dtype}"
                )
            metas.append(
                {"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "crc32": _crc(a)}
            )
            blobs.append(a)
        tables_meta.append(
            {"name": t.name, "dim": t.dim, "num_shards": t.num_shards, "arrays": metas}
        )
    header = json.dumps(
        {
            "origin": data.origin,
            "catalog_version": data.catalog_version,
            "lineage": data.lineage,
            "wal_seq": data.wal_seq,
            "lineages": {str(p): int(v) for p, v in data.lineages.items()},
            "tables": tables_meta,
        }
    ).encode()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, FORMAT, len(header), zlib.crc32(header)))
            f.write(header)
            for a in blobs:
                if a.size:
                    f.write(memoryview(a).cast("B"))
            f.write(TRAILER)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise ValueError(f"truncated in {what}: wanted {n} bytes, got {len(b)}")
    return b


def _read_array(f: BinaryIO, meta: dict[str, Any], what: str) -> np.ndarray:
    dtype = meta["dtype"]
    if dtype not in _DTYPES:
        raise ValueError(f"{what}: unsupported dtype {dtype!r}")
    shape = tuple(int(x) for x in meta["shape"])
    if any(x < 0 for x in shape):
        raise ValueError(f"{what}: negative shape {shape}")
    arr = np.empty(shape, dtype=np.dtype(dtype))
    if arr.size:
        got = f.readinto(memoryview(arr.reshape(-1).view(np.uint8)))
        if got != arr.nbytes:
            raise ValueError(f"truncated in {what}: wanted {arr.nbytes} bytes, got {got}")
    if _crc(arr) != int(meta["crc32"]):
        raise ValueError(f"checksum mismatch in {what}")
    return arr


def _lineages(raw: Any) -> dict[int, int]:
    """The header's per-partition lineages, checked: partition ids and lineages >= 0."""
    if not isinstance(raw, dict):
        raise ValueError(f"lineages must be an object, got {type(raw).__name__}")
    out = {int(p): int(v) for p, v in raw.items()}
    bad = [(p, v) for p, v in out.items() if p < 0 or v < 0]
    if bad:
        raise ValueError(f"lineages: partition {bad[0][0]} has lineage {bad[0][1]}")
    return out


def read_snapshot(path: Path) -> SnapshotData:
    """Read and verify a whole snapshot; any fault raises ``SnapshotError`` naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic, fmt, hlen, hcrc = _PREFIX.unpack(_read_exact(f, _PREFIX.size, "prefix"))
            if magic != MAGIC:
                raise ValueError(f"not an Ekko snapshot (magic {magic!r})")
            if fmt != FORMAT:
                raise ValueError(f"unsupported snapshot format {fmt}")
            if hlen > _MAX_HEADER:
                raise ValueError(f"header length {hlen} is implausible")
            raw = _read_exact(f, hlen, "header")
            if zlib.crc32(raw) != hcrc:
                raise ValueError("header checksum mismatch")
            header = json.loads(raw)
            tables = []
            for tm in header["tables"]:
                t = SnapshotTable(str(tm["name"]), int(tm["dim"]), int(tm["num_shards"]))
                for am in tm["arrays"]:
                    t.arrays[str(am["name"])] = _read_array(f, am, f"{t.name}.{am['name']}")
                tables.append(t)
            if f.read(len(TRAILER) + 1) != TRAILER:
                raise ValueError("missing trailer or trailing garbage")
            return SnapshotData(
                int(header["origin"]),
                int(header["catalog_version"]),
                tables,
                int(header.get("lineage", 0)),
                int(header.get("wal_seq", 0)),
                _lineages(header.get("lineages", {})),
            )
    except SnapshotError:
        raise
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise SnapshotError(f"cannot load snapshot {path}: {exc}") from exc
