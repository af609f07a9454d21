"""A write-ahead log of opaque records: group-committed, checksummed, truncated by snapshots.

The format and its verified reading (torn tail vs corruption) are in ``ekko.store.wal_format``.
Sequence numbers are consecutive across segments. ``append`` only buffers; one thread writes
what was appended during a short window and fsyncs once for all of it (group commit), so a
caller that must not answer before its record is durable waits for ``durable_seq`` to reach
its seq (``wait_durable`` on an event loop, ``sync`` from a thread) and the fsync never runs
on the loop. The window is ``window_s`` once someone waits; records nobody waits for (the
trainer's writes) are committed at the latest ``lazy_s`` after the first of them, so a
stream of unacknowledged writes costs a few fsyncs a second, not one per write. A snapshot
covering seq S calls ``rotate(S)``: later records go to a new segment and the older ones
are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ekko.store.errors import WalError
from ekko.store.wal_format import (  # noqa: F401 - re-exported: the log's public names
    _HEADER,
    _RECORD,
    FORMAT,
    MAGIC,
    MAX_RECORD,
    SUFFIX,
    TORN_SUFFIX,
    WalRecord,
    _fsync_dir,
    _record_header,
    _segment_name,
    _segments,
    encode_record,
    read_log,
)

log = logging.getLogger(__name__)

WRITE_BYTES = 1 << 20
"""A record is written to the file in pieces of at most this: one write of 2 MB or more
cost the kernel 8x the CPU per byte of 1 MB ones on our machines (a huge page-cache folio
per write, measured with os.write + fsync on ext4, Linux 6.18)."""


@dataclass(frozen=True)
class WalStats:
    """What the log did; metrics and the group-commit tests read it."""

    appended: int
    durable_seq: int
    fsyncs: int
    bytes_written: int


class WriteAheadLog:
    """Append-only, group-committed log (see the module docstring for why and how).

    ``append`` is cheap and may be called from one thread at a time (the event loop); the
    writer thread owns the file. A failed write or fsync poisons the log: waiters and later
    appends raise ``WalError`` rather than report a write durable that is not.
    """

    def __init__(
        self,
        directory: Path,
        *,
        last_seq: int = 0,
        window_s: float = 0.003,
        lazy_s: float = 0.05,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.window_s = float(window_s)
        self.lazy_s = max(float(lazy_s), self.window_s)
        self._buffered_at = 0.0  # when the oldest buffered record was appended
        self._syncing = 0  # threads blocked in ``sync``
        self._cond = threading.Condition()
        # (seq, payload) records to write; an int asks to rotate after the records before it
        self._buf: list[tuple[int, bytes | bytearray | np.ndarray] | int] = []
        self._next_seq = last_seq + 1
        self._durable = last_seq
        self._appended = self._fsyncs = self._bytes = 0
        self._failed: BaseException | None = None
        self._closing = False
        self._rotations = 0  # asked for, not yet done
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._file = self._open_segment(self._next_seq)
        self._thread = threading.Thread(target=self._run, name="ekko-wal", daemon=True)
        self._thread.start()

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        after_seq: int = 0,
        window_s: float = 0.003,
        lazy_s: float = 0.05,
    ) -> tuple[WriteAheadLog, list[WalRecord]]:
        """The log in ``directory`` continued after its last record, and the records newer
        than ``after_seq`` (what the latest snapshot covers) to replay."""
        records, last = read_log(directory, after_seq)
        if last < after_seq:  # every segment is older than the snapshot: all covered
            for p in _segments(Path(directory)):
                p.unlink()
            last = after_seq
        return cls(directory, last_seq=last, window_s=window_s, lazy_s=lazy_s), records

    # -- appending ----------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The seq of the latest appended record (durable or not)."""
        return self._next_seq - 1

    @property
    def durable_seq(self) -> int:
        return self._durable

    @property
    def failed(self) -> BaseException | None:
        """Why the log stopped writing (None while it works)."""
        return self._failed

    def append(self, payload: bytes | bytearray | np.ndarray) -> int:
        """Buffer a record (the log owns ``payload`` from now on: do not change it); returns
        its seq. Durable once ``durable_seq`` reaches it. The checksum and the write happen
        on the log's thread."""
        with self._cond:
            self._check()
            seq = self._next_seq
            self._next_seq += 1
            if not self._buf:
                self._buffered_at = time.monotonic()
            self._buf.append((seq, payload))
            self._appended += 1
            self._cond.notify()
        return seq

    def rotate(self, covered_seq: int) -> None:
        """A durable snapshot covers every record up to ``covered_seq``: later records go to a
        new segment and the covered segments are deleted."""
        with self._cond:
            self._check()
            if covered_seq != self._next_seq - 1:
                raise WalError(
                    f"write-ahead log {self.directory}: rotate({covered_seq}) but the last "
                    f"record is {self._next_seq - 1}; the snapshot must cover them all"
                )
            self._buf.append(covered_seq)
            self._rotations += 1
            self._cond.notify()

    async def wait_durable(self, seq: int) -> None:
        """Return once record ``seq`` is on disk (raises ``WalError`` if it never will be)."""
        loop = asyncio.get_running_loop()
        with self._cond:
            self._check()
            if self._durable >= seq:
                return
            fut = loop.create_future()
            self._waiters.append((seq, loop, fut))
            self._cond.notify_all()  # someone waits now: commit at the end of the window
        await fut

    def sync(self, seq: int | None = None, timeout: float | None = None) -> None:
        """Block until record ``seq`` (default: the latest) is on disk and rotations asked
        for so far are done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._next_seq - 1 if seq is None else seq
            self._syncing += 1
            self._cond.notify_all()
            try:
                while self._durable < target or self._rotations:
                    self._check()
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"record {target} not durable within {timeout} s")
                    self._cond.wait(left)
            finally:
                self._syncing -= 1

    def statistics(self) -> WalStats:
        with self._cond:
            return WalStats(self._appended, self._durable, self._fsyncs, self._bytes)

    def close(self) -> None:
        """Write and fsync what is buffered, then stop the writer thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        self._file.close()

    # -- the writer thread ----------------------------------------------------------------

    def _check(self) -> None:
        if self._failed is not None:
            raise WalError(f"write-ahead log {self.directory} failed: {self._failed}")
        if self._closing:
            raise WalError(f"write-ahead log {self.directory} is closed")

    def _open_segment(self, first_seq: int):
        path = self.directory / _segment_name(first_seq)
        f = open(path, "ab")  # noqa: SIM115 - owned by the writer thread until close
        if f.tell() == 0:
            head = _HEADER.pack(MAGIC, FORMAT, first_seq, 0)[:-4]
            f.write(head + struct.pack("<I", zlib.crc32(head)))
            f.flush()
            os.fsync(f.fileno())
            _fsync_dir(self.directory)
        return f

    def _run(self) -> None:
        try:
            self._commit_loop()
        except BaseException as exc:  # a log that cannot write must say so, loudly
            # Whatever stopped the thread (a failed write or fsync, or anything else: a sleep
            # that raised under libfaketime once) poisons the log: waiters and later appends
            # raise instead of waiting forever for a thread that is gone.
            log.exception("write-ahead log %s: write failed", self.directory)
            with self._cond:
                self._failed = exc
                self._cond.notify_all()
                waiters, self._waiters = self._waiters, []
            for _seq, loop, fut in waiters:
                with contextlib.suppress(RuntimeError):
                    err = WalError(f"write-ahead log {self.directory} failed: {exc}")
                    loop.call_soon_threadsafe(_fail, fut, err)

    def _commit_loop(self) -> None:
        while True:
            with self._cond:
                while not self._buf and not self._closing:
                    self._cond.wait()
                if not self._buf and self._closing:
                    return
                # Nobody waits for these records yet: hold them up to ``lazy_s``.
                due = self._buffered_at + self.lazy_s
                while not (self._waiters or self._syncing or self._closing):
                    left = due - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                urgent = bool(self._waiters or self._syncing) and not self._closing
            if urgent and self.window_s > 0:
                time.sleep(self.window_s)  # let the records of this window join the fsync
            with self._cond:
                batch, self._buf = self._buf, []
                top = self._next_seq - 1  # every record appended so far is in ``batch``
            self._write(batch)
            self._settle(top)

    def _write(self, batch: list[tuple[int, bytes | bytearray | np.ndarray] | int]) -> None:
        chunk: list[tuple[int, bytes | bytearray | np.ndarray]] = []
        for item in batch:
            if isinstance(item, tuple):
                chunk.append(item)
                continue
            self._flush(chunk)
            chunk = []
            self._switch(item)
        self._flush(chunk)

    def _flush(self, chunk: list[tuple[int, bytes | bytearray | np.ndarray]]) -> None:
        if not chunk:
            return
        n = 0
        for seq, payload in chunk:
            # zlib releases the GIL on large buffers: the event loop runs meanwhile.
            self._file.write(_record_header(seq, payload))
            view = memoryview(payload).cast("B")
            for start in range(0, len(view), WRITE_BYTES):
                self._file.write(view[start : start + WRITE_BYTES])
            n += _RECORD.size + len(payload)
        self._file.flush()
        os.fsync(self._file.fileno())
        with self._cond:
            self._fsyncs += 1
            self._bytes += n

    def _switch(self, covered_seq: int) -> None:
        old = self._file
        self._file = self._open_segment(covered_seq + 1)
        old.close()
        keep = self._file.name
        for p in _segments(self.directory):
            if str(p) != keep:
                p.unlink()
        _fsync_dir(self.directory)
        with self._cond:
            self._rotations -= 1
            self._cond.notify_all()

    def _settle(self, top: int) -> None:
        with self._cond:
            self._durable = max(self._durable, top)
            self._cond.notify_all()
            ready = [w for w in self._waiters if w[0] <= self._durable]
            self._waiters = [w for w in self._waiters if w[0] > self._durable]
        for _seq, loop, fut in ready:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_done, fut)


def _done(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _fail(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
