"""The log's failures are loud and recoverable. A full disk stops the source's log; once the
disk has room, the next snapshot covers every row the store holds (those whose records failed
too) and the log starts afresh after it, so the source takes writes again (found by the
chaos harness's full-disk fault: the
log stayed failed, and the source refused writes, until the process was restarted)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from ekko.store import WalError
from ekko.store import wal as wal_mod
from ekko.store.journal import open_durable
from ekko.store.spec import TableSpec


def _open(tmp_path: Path):
    return open_durable(
        tmp_path / "store.snapshot", tmp_path / "wal", origin=0, cache_capacity=64, window_s=0.0
    )


def _write(store, keys: list[int], value: float) -> None:
    k = np.array(keys, dtype=np.int64)
    store.table("t").write(k, np.full((len(keys), 4), value, np.float32), now_ns=1)


def test_after_a_full_disk_a_snapshot_restarts_the_log_and_loses_nothing(
    tmp_path: Path, monkeypatch
) -> None:
    store, journal, _ = _open(tmp_path)
    store.create_table(TableSpec("t", 4, 8))
    _write(store, [1, 2, 3], 1.0)
    journal.wal.sync(timeout=10)
    real_fsync = wal_mod.os.fsync

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wal_mod.os, "fsync", full)
    _write(store, [4], 2.0)  # in the store; its record is never durable

    async def refused() -> None:
        with pytest.raises(WalError, match="No space left"):
            await asyncio.wait_for(journal.wait_durable(), 10)

    asyncio.run(refused())
    assert journal.wal.failed is not None
    _write(store, [5], 3.0)  # in the store, not durable (the next test says why it lands)

    monkeypatch.setattr(wal_mod.os, "fsync", real_fsync)  # the disk has room again
    journal.checkpoint(tmp_path / "store.snapshot")
    assert journal.wal.failed is None
    _write(store, [6], 4.0)

    async def durable() -> None:
        await asyncio.wait_for(journal.wait_durable(), 10)

    asyncio.run(durable())
    want = store.table("t").digest()
    journal.close()
    again, journal2, _ = _open(tmp_path)
    assert again.table("t").digest() == want
    _, _, found = again.table("t").lookup(np.array([1, 4, 5, 6], dtype=np.int64))
    assert found.all()
    journal2.close()


def test_a_log_thread_that_dies_of_anything_fails_its_waiters(tmp_path: Path, monkeypatch) -> None:
    """Only a failed write used to poison the log: an exception elsewhere in its thread (the
    window's sleep raised EINVAL under libfaketime in a chaos run) ended the thread silently,
    and every acknowledged write then waited forever for an fsync that never came."""
    log = wal_mod.WriteAheadLog(tmp_path, window_s=0.001)

    def broken(seconds: float) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(wal_mod.time, "sleep", broken)

    async def main() -> None:
        seq = log.append(b"row")
        with pytest.raises(WalError, match="Invalid argument"):
            await asyncio.wait_for(log.wait_durable(seq), 10)

    asyncio.run(main())
    with pytest.raises(WalError, match="failed"):
        log.append(b"next")


def test_while_the_log_is_failed_writes_land_in_the_store_and_none_is_durable(
    tmp_path: Path, monkeypatch
) -> None:
    """The trainer's publishes queued on the loop are drained in one go; the write hook
    raised after each write had landed, which dropped the rest of the drain (in a chaos
    run: 447 tracebacks in one full disk, rows the trainer's model held and the store
    never got). Now every write lands; a write that waits is still told it is not
    durable, and the snapshot that restarts the log makes them all durable."""
    store, journal, _ = _open(tmp_path)
    store.create_table(TableSpec("t", 4, 8))
    real_fsync = wal_mod.os.fsync

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wal_mod.os, "fsync", full)
    _write(store, [1], 1.0)

    async def not_durable() -> None:
        with pytest.raises(WalError, match="No space left"):
            await asyncio.wait_for(journal.wait_durable(), 10)

    asyncio.run(not_durable())
    _write(store, [2], 2.0)  # the log has failed: no exception, the rows land
    _write(store, [3], 3.0)
    asyncio.run(not_durable())  # and a writer that waits still hears it
    _, _, found = store.table("t").lookup(np.array([1, 2, 3], dtype=np.int64))
    assert found.all()
    monkeypatch.setattr(wal_mod.os, "fsync", real_fsync)
    journal.checkpoint(tmp_path / "store.snapshot")
    want = store.table("t").digest()
    journal.close()
    again, journal2, _ = _open(tmp_path)
    assert again.table("t").digest() == want
    journal2.close()
