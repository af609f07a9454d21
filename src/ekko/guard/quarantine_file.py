"""A partition source's write quarantines on disk, so a restart keeps refusing writes.

Why: the quarantine lives at the write port, in memory. A source killed with -9 inside it and
restarted with its data accepted the poisoned ranks' in-flight writes at once, over the rows
the rollback had just written back. ``SourceRestore`` saves each quarantine here before it
applies it (written to a temporary file, fsynced, renamed, the directory fsynced) and reapplies
the unexpired ones at start; expired ones are dropped from the file then.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ekko.guard.errors import QuarantineFileError
from ekko.schedule.quarantine import Quarantine

Entry = tuple[Quarantine, list[str]]


class QuarantineFile:
    """``{model: {"epoch", "until", "tables"}}`` as JSON in ``path`` (a node's data dir)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self, now_wall: float) -> dict[str, Entry]:
        """Every quarantine in force at ``now_wall`` by model; the file is rewritten without
        the expired ones. ``QuarantineFileError`` naming the file (and entry) if damaged."""
        if not self.path.exists():
            return {}
        try:
            doc = json.loads(self.path.read_bytes())
        except ValueError as exc:
            raise QuarantineFileError(f"{self.path}: not JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise QuarantineFileError(f"{self.path}: expected an object by model")
        out = {m: _entry(self.path, m, e) for m, e in doc.items()}
        live = {m: e for m, e in out.items() if now_wall < e[0].until}
        if len(live) != len(out):
            self._write({m: _doc(*e) for m, e in live.items()})
        return live

    def save(self, q: Quarantine, tables: list[str], now_wall: float) -> None:
        """Record ``q`` over ``tables`` (replacing the model's previous one), durably."""
        doc = {m: _doc(*e) for m, e in self.load(now_wall).items()}
        doc[q.model] = _doc(q, tables)
        self._write(doc)

    def _write(self, doc: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, json.dumps(doc, sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _doc(q: Quarantine, tables: list[str]) -> dict[str, Any]:
    return {"epoch": q.epoch, "until": q.until, "tables": list(tables)}


def _entry(path: Path, model: str, e: Any) -> Entry:
    try:
        epoch, until, tables = e["epoch"], e["until"], e["tables"]
        ok = (
            isinstance(epoch, int)
            and not isinstance(epoch, bool)
            and isinstance(until, int | float)
            and math.isfinite(until)
            and isinstance(tables, list)
            and all(isinstance(t, str) for t in tables)
        )
        if not ok:
            raise TypeError("epoch: int, until: finite number, tables: [str]")
        return Quarantine(model, epoch, float(until)), tables
    except (KeyError, TypeError, ValueError) as exc:
        raise QuarantineFileError(f"{path}: model {model}'s entry {e!r}: {exc}") from exc
