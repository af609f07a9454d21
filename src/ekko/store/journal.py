"""A store's source writes in a write-ahead log, and the store rebuilt from snapshot + log.

Why at the table's write hook: HTTP writes, the trainer's publisher, rollbacks and released
deferred rows all end in ``Table.write``, so logging there misses none of them. A record is
the applied batch — table spec, keys, values, the versions the write issued, write time and
lanes — so a replay redoes it exactly (``Table.replay``), including the counters, and a
restarted source never reissues a version it acknowledged. A delete (``Table.delete``) is
its own record kind: table spec, keys and the versions it issued; replayed, the keys become
tombstones again.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ekko.store.errors import StoreError, WalError
from ekko.store.spec import HIGH_LANE, TableSpec
from ekko.store.store import Store
from ekko.store.table import Table
from ekko.store.wal import WalRecord, WriteAheadLog, _segments

log = logging.getLogger(__name__)

_BATCH = struct.Struct("<BHIIIq")  # kind, name length, dim, num_shards, rows, write time ns
_KIND_WRITE = 1
_KIND_DELETE = 2  # keys and versions only: the tombstones a delete left


@dataclass(frozen=True)
class Batch:
    """One logged source write."""

    spec: TableSpec
    keys: np.ndarray
    values: np.ndarray
    versions: np.ndarray
    now_ns: int
    lanes: np.ndarray
    deleted: bool = False  # a delete: every key a tombstone (values zero, high lane)


def encode_batch(
    spec: TableSpec,
    keys: np.ndarray,
    values: np.ndarray,
    versions: np.ndarray,
    now_ns: int,
    lanes: np.ndarray,
) -> np.ndarray:
    """The record of one write (uint8 buffer): header, name, then keys, versions, lanes,
    values — copied once (the caller may reuse its arrays), into memory not zeroed first."""
    name = spec.name.encode()
    n = int(keys.shape[0])
    head = _BATCH.pack(_KIND_WRITE, len(name), spec.dim, spec.num_shards, n, now_ns)
    out = np.empty(len(head) + len(name) + n * (8 + 8 + 1 + 4 * spec.dim), dtype=np.uint8)
    out[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    off = len(head)
    out[off : off + len(name)] = np.frombuffer(name, dtype=np.uint8)
    off += len(name)
    for arr, dtype in ((keys, "<i8"), (versions, "<i8"), (lanes, "u1"), (values, "<f4")):
        dst = np.frombuffer(out, dtype=dtype, count=arr.size, offset=off)
        np.copyto(dst, np.asarray(arr).reshape(-1), casting="same_kind")
        off += dst.nbytes
    return out


def encode_delete(
    spec: TableSpec, keys: np.ndarray, versions: np.ndarray, now_ns: int
) -> np.ndarray:
    """The record of one delete (uint8 buffer): header, name, then keys and versions."""
    name = spec.name.encode()
    n = int(keys.shape[0])
    head = _BATCH.pack(_KIND_DELETE, len(name), spec.dim, spec.num_shards, n, now_ns)
    out = np.empty(len(head) + len(name) + n * 16, dtype=np.uint8)
    out[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    out[len(head) : len(head) + len(name)] = np.frombuffer(name, dtype=np.uint8)
    off = len(head) + len(name)
    for arr in (keys, versions):
        np.copyto(np.frombuffer(out, "<i8", count=n, offset=off), arr, casting="same_kind")
        off += 8 * n
    return out


def decode_batch(payload: bytes | bytearray | np.ndarray) -> Batch:
    """The batch in a record; ``ValueError`` if its layout is inconsistent."""
    payload = memoryview(payload).cast("B")
    if len(payload) < _BATCH.size:
        raise ValueError(f"record of {len(payload)} bytes is shorter than a batch header")
    kind, nlen, dim, shards, n, now_ns = _BATCH.unpack_from(payload)
    if kind not in (_KIND_WRITE, _KIND_DELETE):
        raise ValueError(f"unknown record kind {kind}")
    deleted = kind == _KIND_DELETE
    want = _BATCH.size + nlen + n * (16 if deleted else 8 + 8 + 1 + 4 * dim)
    if len(payload) != want:
        raise ValueError(f"record is {len(payload)} bytes, its header says {want}")
    off = _BATCH.size
    name = bytes(payload[off : off + nlen]).decode()
    off += nlen

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal off
        a = np.frombuffer(payload, dtype=dtype, count=count, offset=off)
        off += a.nbytes
        return a

    keys = take("<i8", n)
    versions = take("<i8", n)
    spec = TableSpec(name, dim, shards)
    if deleted:
        lanes = np.full(n, HIGH_LANE, np.uint8)
        values = np.zeros((n, dim), np.float32)
        return Batch(spec, keys, values, versions, now_ns, lanes, deleted=True)
    lanes = take("u1", n)
    values = take("<f4", n * dim).reshape(n, dim)
    return Batch(spec, keys, values, versions, now_ns, lanes)


class StoreJournal:
    """Logs every source write of ``store`` to ``wal`` (group-committed by the log).

    ``last_seq`` is the record of the latest write (or delete): a caller that must not acknowledge a
    write before it is durable awaits ``wal.wait_durable(journal.last_seq)`` after writing.
    """

    def __init__(self, store: Store, wal: WriteAheadLog) -> None:
        self.store = store
        self.wal = wal
        store.set_write_hook(self._on_write)
        store.set_delete_hook(self._on_delete)

    @property
    def last_seq(self) -> int:
        return self.wal.last_seq

    def _on_write(
        self,
        table: Table,
        keys: np.ndarray,
        values: np.ndarray,
        versions: np.ndarray,
        now_ns: int,
        lanes: np.ndarray,
    ) -> None:
        self._append(encode_batch(table.spec, keys, values, versions, now_ns, lanes))

    def _on_delete(self, table: Table, keys: np.ndarray, versions: np.ndarray, now_ns: int) -> None:
        self._append(encode_delete(table.spec, keys, versions, now_ns))

    def _append(self, record: np.ndarray) -> None:
        try:
            self.wal.append(record)
        except WalError:
            if self.wal.failed is None:
                raise  # a closed log: nothing may write after close
            # The log failed (a full disk): the rows are in the store already, not durable.
            # A writer that waits learns it from ``wait_durable`` (an HTTP write is answered
            # 503, never acknowledged) and the snapshot that restarts the log covers them;
            # raising here only dropped the trainer's other queued writes of the same drain.

    def log_created(self, spec: TableSpec, now_ns: int) -> None:
        """Log a new table as a write of no rows: replaying it creates the table, so one
        created through the API survives a crash before the next snapshot."""
        none = np.zeros(0, dtype=np.int64)
        empty = np.zeros((0, spec.dim), dtype=np.float32)
        self.wal.append(encode_batch(spec, none, empty, none, now_ns, none.astype(np.uint8)))

    async def wait_durable(self) -> None:
        """Return once every write made so far is on disk."""
        await self.wal.wait_durable(self.wal.last_seq)

    def checkpoint(self, snapshot_path: Path) -> None:
        """Snapshot the store and drop the log records it covers.

        After the log failed (a full disk), a snapshot that succeeds covers every row the
        store holds, those whose records were never written included, so the log starts
        afresh after it and the source can take writes again."""
        seq = self.wal.last_seq
        self.store.save(snapshot_path, wal_seq=seq)
        if self.wal.failed is not None:
            self._restart_log(seq)
        else:
            self.wal.rotate(seq)

    def _restart_log(self, covered_seq: int) -> None:
        old = self.wal
        with contextlib.suppress(OSError, WalError):  # its thread has stopped already
            old.close()
        for p in _segments(old.directory):
            p.unlink()
        self.wal = WriteAheadLog(
            old.directory, last_seq=covered_seq, window_s=old.window_s, lazy_s=old.lazy_s
        )
        log.warning(
            "write-ahead log %s starts again after seq %d, covered by a snapshot (it had "
            "failed: %s)",
            old.directory,
            covered_seq,
            old.failed,
        )

    def close(self) -> None:
        self.store.set_write_hook(None)
        self.store.set_delete_hook(None)
        self.wal.close()


def replay(store: Store, records: list[WalRecord], source: Path) -> int:
    """Redo logged writes into ``store``; returns rows replayed. A record that does not
    decode or fit its table raises ``WalError`` naming ``source`` and the seq."""
    rows = 0
    for r in records:
        try:
            b = decode_batch(r.payload)
            table = store.create_table(b.spec, initial_rows=max(1024, b.keys.shape[0]))
            wtimes = np.full(b.keys.shape[0], b.now_ns, dtype=np.int64)
            dead = np.ones(b.keys.shape[0], np.uint8) if b.deleted else None
            table.replay(b.keys, b.values, b.versions, wtimes, b.lanes, dead)
        except (ValueError, StoreError) as exc:
            raise WalError(f"write-ahead log {source}: record seq {r.seq}: {exc}") from exc
        rows += int(b.keys.shape[0])
    return rows


def open_durable(
    snapshot_path: Path,
    wal_dir: Path,
    *,
    origin: int,
    cache_capacity: int,
    window_s: float,
    lazy_s: float = 0.05,
) -> tuple[Store, StoreJournal, int]:
    """The store as the snapshot and the log left it, journalled from now on, and the number
    of rows replayed. Raises ``SnapshotError`` / ``WalError`` naming the file at fault: a
    corrupt file is never taken for an empty one."""
    if snapshot_path.exists():
        store = Store.load(snapshot_path, cache_capacity=cache_capacity)
    else:
        store = Store(origin=origin, cache_capacity=cache_capacity)
    wal, records = WriteAheadLog.open(
        wal_dir, after_seq=store.snapshot_wal_seq, window_s=window_s, lazy_s=lazy_s
    )
    try:
        rows = replay(store, records, wal_dir)
    except BaseException:
        wal.close()
        raise
    if records:
        log.info(
            "replayed %d records (%d rows, seq %d..%d) from %s",
            len(records),
            rows,
            records[0].seq,
            records[-1].seq,
            wal_dir,
        )
    return store, StoreJournal(store, wal), rows
