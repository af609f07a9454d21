"""Durable, append-only log of health transitions: one JSON object per line.

Each record is written with a single ``os.write`` on an ``O_APPEND`` descriptor, then
``os.fsync``; when ``append`` returns, the record survives a crash or power loss. A crash in
the middle of a write can only tear the *last* line: :meth:`TransitionLog.read` drops such a
tail with a warning, and opening the log for appending cuts it off first so the next record
starts on a clean line. Damage anywhere else is not crash debris and raises
:class:`TransitionLogError`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ekko.guard.errors import TransitionLogError
from ekko.guard.state import Transition

log = logging.getLogger(__name__)


def _lines(data: bytes) -> list[bytes]:
    """Split on ``\n`` only, keeping the terminator (a torn tail has none)."""
    parts = data.split(b"\n")
    out = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def _parse(lines: list[bytes], path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records and the byte length of the intact prefix; a torn last line is dropped."""
    records: list[dict[str, Any]] = []
    good = 0
    for i, raw in enumerate(lines):
        last = i == len(lines) - 1
        complete = raw.endswith(b"\n")
        try:
            rec = json.loads(raw) if complete else None
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            if last:
                log.warning(
                    "transition log %s: dropping torn last line %d (%d bytes): %r",
                    path,
                    i + 1,
                    len(raw),
                    raw[:80],
                )
                break
            raise TransitionLogError(
                f"transition log {path}: line {i + 1} is corrupted "
                f"(not a crash-torn tail): {raw[:80]!r}"
            )
        records.append(rec)
        good += len(raw)
    return records, good


class TransitionLog:
    """Appends transitions durably to a JSON-lines file.

    Why fsync per record: transitions are rare (a few per incident) and each one justifies an
    action on production traffic; losing the record of why a rollback happened costs far more
    than a few milliseconds of fsync.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if created:
            _fsync_dir(self.path.parent)
        else:
            self._repair_tail()

    def _repair_tail(self) -> None:
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        _, good = _parse(_lines(data), self.path)
        os.ftruncate(self._fd, good)
        os.fsync(self._fd)

    def append(self, transition: Transition | dict[str, Any]) -> None:
        """Write one record and fsync before returning."""
        if self._fd < 0:
            raise TransitionLogError(f"transition log {self.path} is closed")
        rec = transition.to_dict() if isinstance(transition, Transition) else transition
        line = json.dumps(rec, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> TransitionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def read(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """All intact records, oldest first; a torn last line is logged and skipped."""
        p = Path(path)
        if not p.exists():
            return []
        records, _ = _parse(_lines(p.read_bytes()), p)
        return records


def _fsync_dir(directory: Path) -> None:
    """Make a newly created file's directory entry durable too."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
