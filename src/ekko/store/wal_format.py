"""The write-ahead log's on-disk format and its verified reading (``ekko.store.wal`` writes it).

Layout: a directory of segments ``<first seq, 20 digits>.wal``, each::

    b"EKKOWAL1" | u32 format | u64 first seq | u32 crc32 of the three fields
    then records: u32 payload length | u64 seq | u32 crc32(payload) | u32 crc32(the 16 bytes
    before it) | payload

The record header has its own checksum so that a damaged length is detected before it is
trusted: a length that points past the end of the file is corruption, not a torn tail,
unless nothing valid follows it (issue 13: one flipped length bit once threw away a log).

On open, a bad record in the last segment is a torn tail (a crash mid-append) only if no valid
record header with a later seq appears anywhere after it (``_valid_header_after``); the cut
bytes are then kept beside the segment as ``<segment>.<offset>.torn`` before it is truncated,
with a warning naming the file and offset. Any other fault — a bad record with records after
it, a bad segment header, a gap in the sequence — raises ``WalError`` naming the file and
offset, and nothing is changed.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ekko.store.errors import WalError

log = logging.getLogger("ekko.store.wal")  # one logger for the log, written or read

MAGIC = b"EKKOWAL1"
FORMAT = 2  # 1: record header not checksummed (a flipped length bit could pass as a torn tail)
SUFFIX = ".wal"
TORN_SUFFIX = ".torn"
_HEADER = struct.Struct("<8sIQI")
_RECORD = struct.Struct("<IQII")  # length, seq, payload crc, header crc (of the first three)
_RECORD_CHECKED = struct.Struct("<IQI")
MAX_RECORD = 1 << 30


@dataclass(frozen=True)
class WalRecord:
    seq: int
    payload: bytes


def _record_header(seq: int, payload: bytes | bytearray | np.ndarray) -> bytes:
    head = _RECORD_CHECKED.pack(len(payload), seq, zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head))


def encode_record(seq: int, payload: bytes | bytearray | np.ndarray) -> bytes:
    return _record_header(seq, payload) + bytes(payload)


def _header_at(data: bytes, off: int) -> tuple[int, int, int] | None:
    """(length, seq, payload crc) of a record header at ``off`` whose checksum holds."""
    if off + _RECORD.size > len(data):
        return None
    length, seq, pcrc, hcrc = _RECORD.unpack_from(data, off)
    if zlib.crc32(data[off : off + _RECORD_CHECKED.size]) != hcrc:
        return None
    return length, seq, pcrc


def _valid_header_after(data: bytes, start: int, min_seq: int) -> int | None:
    """The first offset >= ``start`` holding a checksummed record header with seq >=
    ``min_seq``, or None. If one exists, the bad record before it is not a torn tail: records
    were written after it. Candidates are found by their seq field (vectorised), then their
    header checksum is verified."""
    seq_at = 4  # the seq field's offset inside a record header
    hits: list[int] = []
    for align in range(8):
        first = start + seq_at + align
        count = (len(data) - first) // 8
        if count <= 0:
            continue
        seqs = np.frombuffer(data, dtype="<u8", count=count, offset=first)
        # Any seq a later record could carry: above the last good one, at most one per header.
        top = min_seq + (len(data) - start) // _RECORD.size + 1
        idx = np.flatnonzero((seqs >= min_seq) & (seqs <= top))
        hits.extend((first + 8 * idx - seq_at).tolist())
    for off in sorted(hits):
        if off + _RECORD.size <= len(data) and _header_at(data, off) is not None:
            return off
    return None


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SUFFIX}"


def _segments(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob(f"*{SUFFIX}") if p.stem.isdigit())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_segment(path: Path, *, last: bool, expect: int | None) -> tuple[list[WalRecord], int]:
    """Records of one segment and the byte length of its valid part. A torn tail of the last
    segment (a bad record nothing valid follows) ends the valid part; any other fault raises
    ``WalError`` naming the file and offset."""
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        if last:
            return [], -1  # created but its header never reached the disk
        raise WalError(f"write-ahead log {path}: header truncated ({len(data)} bytes)")
    magic, fmt, first, crc = _HEADER.unpack_from(data)
    if magic != MAGIC or zlib.crc32(data[: _HEADER.size - 4]) != crc:
        raise WalError(f"write-ahead log {path}: bad header at offset 0 (magic {magic!r})")
    if fmt != FORMAT:
        raise WalError(
            f"write-ahead log {path}: format {fmt} at offset 8, this version reads {FORMAT}"
        )
    if first != int(path.stem):
        raise WalError(f"write-ahead log {path}: header says first seq {first}")
    if expect is not None and first != expect:
        raise WalError(f"write-ahead log {path}: starts at seq {first}, expected {expect}")
    records: list[WalRecord] = []
    off, seq_next = _HEADER.size, first
    while off < len(data):
        end = off + _RECORD.size
        head = _header_at(data, off)
        fault = None
        if end > len(data):
            fault = "header cut short"
        elif head is None:
            fault = "header fails its checksum"
        elif head[0] > MAX_RECORD or end + head[0] > len(data):
            fault = f"length {head[0]} runs past the end of the file"
        elif zlib.crc32(data[end : end + head[0]]) != head[2]:
            fault = "payload fails its checksum"
        elif head[1] != seq_next:
            raise WalError(
                f"write-ahead log {path}: record at offset {off} has seq {head[1]}, "
                f"expected {seq_next}"
            )
        if fault is not None:
            if not last:
                raise WalError(f"write-ahead log {path}: record at offset {off}: {fault}")
            later = _valid_header_after(data, off + 1, seq_next)
            if later is not None:
                raise WalError(
                    f"write-ahead log {path}: record at offset {off}: {fault}, and a valid "
                    f"record follows at offset {later} (corrupt, not a torn tail)"
                )
            return records, off
        assert head is not None
        records.append(WalRecord(seq_next, data[end : end + head[0]]))
        seq_next += 1
        off = end + head[0]
    return records, off


def _set_aside_tail(path: Path, valid: int) -> None:
    """Keep the bytes of a torn tail beside the segment (evidence), then cut them off."""
    size = path.stat().st_size
    keep = path.with_name(f"{path.name}.{max(valid, 0)}{TORN_SUFFIX}")
    with open(path, "rb") as f:
        f.seek(max(valid, 0))
        tail = f.read()
    with open(keep, "wb") as f:
        f.write(tail)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)
    if valid < 0:
        log.warning(
            "write-ahead log %s: no complete header (%d bytes, kept as %s); removing it",
            path,
            size,
            keep.name,
        )
        path.unlink()
    else:
        log.warning(
            "write-ahead log %s: torn tail at offset %d (%d bytes, kept as %s) truncated",
            path,
            valid,
            size - valid,
            keep.name,
        )
        os.truncate(path, valid)
    _fsync_dir(path.parent)


def read_log(directory: Path, after_seq: int) -> tuple[list[WalRecord], int]:
    """Verified records with seq > ``after_seq`` and the last seq in the log (``after_seq``
    when empty). Raises ``WalError`` on any fault but a torn tail; only once the whole log
    is verified is a torn tail set aside and truncated (logged)."""
    directory = Path(directory)
    segs = _segments(directory) if directory.exists() else []
    out: list[WalRecord] = []
    last_seq = after_seq
    expect: int | None = None
    torn: tuple[Path, int] | None = None
    for i, path in enumerate(segs):
        is_last = i == len(segs) - 1
        records, valid = _read_segment(path, last=is_last, expect=expect)
        if is_last and valid < path.stat().st_size:
            torn = (path, valid)
        first = int(path.stem)
        expect = first + len(records)
        for r in records:
            if r.seq > after_seq:
                out.append(r)
        if records:
            last_seq = max(last_seq, records[-1].seq)
    if out and out[0].seq != after_seq + 1:
        raise WalError(
            f"write-ahead log {directory}: the snapshot covers seq {after_seq} but the log "
            f"resumes at seq {out[0].seq} (records missing)"
        )
    if torn is not None:
        _set_aside_tail(*torn)
    return out, last_seq
