"""A partition source's side of a rollback: its pre-images, its quarantine, its restore.

Why one class for every source: a single-partition source and each partition source of a
partitioned cluster undo a poisoned stretch the same way — write the pre-images recorded at
their own write port since the restore point back as new versions (deleting rows created
since), which the ordinary sync then carries to every holder. The coordinator's
``SourceGuard`` runs it in-process for its own partitions and asks every other source to run
it (``POST /v1/models/{m}/guard/restore``); both answer the same document. No I/O here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ekko.guard.errors import PreimageError
from ekko.guard.preimages import PreimageLog
from ekko.guard.quarantine_file import QuarantineFile
from ekko.schedule.quarantine import Quarantine
from ekko.schedule.write_port import WritePort
from ekko.store.clock import SYSTEM_CLOCK, Clock
from ekko.store.index import shard_of
from ekko.store.placement import Placement

log = logging.getLogger(__name__)

CHECKPOINT_SKEW_S = 60.0
"""How far ahead of a source's clock the coordinator's checkpoint may be (clock skew)."""

MAX_QUARANTINE_S = 86_400.0
"""The longest write quarantine a restore command may set (``[guard] quarantine_s``'s bound)."""


@dataclass
class Restored:
    """What one source's restore did: the rows written back (``rows``: per table the keys and
    the values they hold again, zeros for ``gone``), the rows deleted again (``gone``: created
    since the restore point), and the answer the coordinator reads (``answer``)."""

    rows: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    gone: dict[str, np.ndarray] = field(default_factory=dict)
    checkpoint_at: float = 0.0
    nbytes: int = 0
    write_s: float = 0.0
    mismatches: int = 0  # rows that do not hold the restored value after the write (a bug)
    answer: dict[str, Any] = field(default_factory=dict)


class SourceRestore:
    """One model's restore executor at one source: records the pre-images of every write to
    the model's ``tables`` at ``port`` and, on command, quarantines the tables and writes the
    healthy values back.

    Args:
        model: the model's name.
        node: this source's node name (the answer names it).
        port: the source's write port (pre-images recorded here, the restore written here).
        tables: the model's tables.
        partitions: the partitions this source is the source of (``(0,)`` unpartitioned).
        placement: the cluster's placement (None: one partition; digests are whole tables).
        window_s: how long pre-images are kept.
        clock: wall and monotonic time, and the restore's version stamps.
        quarantine_file: where the quarantine is kept across a restart (the node's data dir;
            None: in memory only). ``resume`` reapplies it at start.
    """

    def __init__(
        self,
        model: str,
        node: str,
        port: WritePort,
        tables: Iterable[str],
        *,
        partitions: tuple[int, ...] = (0,),
        placement: Placement | None = None,
        window_s: float = 600.0,
        clock: Clock = SYSTEM_CLOCK,
        quarantine_file: QuarantineFile | None = None,
    ) -> None:
        self.model = model
        self.node = node
        self.port = port
        self.store = port.store
        self.tables = list(tables)
        self.partitions = tuple(partitions)
        self.placement = placement
        self.preimages = PreimageLog(window_s=window_s)
        port.record_preimages(self.tables, self.preimages.record)
        self._clock = clock
        self.answers: dict[int, dict[str, Any]] = {}  # by epoch: a repeated command's answer
        self.last_epoch: int | None = None
        self.rows_restored = 0
        self.quarantine_file = quarantine_file

    def resume(self) -> dict[str, float]:
        """At start: reapply this model's quarantine from ``quarantine_file`` if it has not
        ended (its epoch becomes the last one: an older command is refused); ``{table: until}``
        of what was reapplied. The pre-images of the restore are gone with the process, so a
        coordinator's repeated command for that epoch finds nothing to restore here."""
        if self.quarantine_file is None:
            return {}
        entry = self.quarantine_file.load(self._clock.wall()).get(self.model)
        if entry is None:
            return {}
        q, tables = entry
        tables = [t for t in tables if t in self.tables]
        self.port.quarantine(tables, q)
        self.last_epoch = q.epoch if self.last_epoch is None else max(self.last_epoch, q.epoch)
        log.warning(
            "guard %s at %s: restarted inside the quarantine of epoch %d: writes to %s refused "
            "until %.3f",
            self.model,
            self.node,
            q.epoch,
            tables,
            q.until,
        )
        return {t: q.until for t in tables}

    def checkpoint(self, at: float) -> bool:
        """The coordinator saw every replica healthy at ``at``: a restore point here too.
        False (nothing marked) when ``at`` is before the last one (a clock stepped back);
        ``ValueError`` naming it when ``at`` is more than ``CHECKPOINT_SKEW_S`` ahead of
        this source's clock (marked, it expired every pre-image and kept every later
        checkpoint out: the source could never restore again)."""
        ahead = at - self._clock.wall()
        if ahead > CHECKPOINT_SKEW_S:
            raise ValueError(
                f"at: checkpoint {at!r} is {ahead:.0f} s ahead of this source's clock "
                f"(at most {CHECKPOINT_SKEW_S:.0f} s of skew); not marked"
            )
        marks = self.preimages.checkpoints
        if marks and at < marks[-1]:
            log.warning(
                "guard %s: checkpoint %.3f is before the last one %.3f; kept the last",
                self.model,
                at,
                marks[-1],
            )
            return False
        self.preimages.mark_healthy(at)
        return True

    def restore(
        self, to_wall: float, epoch: int, why: str, quarantine_until: float | None = None
    ) -> Restored:
        """Quarantine the model's tables until ``quarantine_until`` (None: not at the port)
        and write back the pre-images since the checkpoint at or before ``to_wall``.

        A repeated command for an epoch already restored here answers as the first did and
        restores nothing (a retried post); the same epoch to another point, an older epoch
        than the last and a ``to_wall`` before the earliest restorable point are refused
        (``PreimageError``), a quarantine longer than ``MAX_QUARANTINE_S`` too (``ValueError``
        naming it), before anything moves."""
        if epoch in self.answers:
            first = self.answers[epoch]["to_wall"]
            if first != to_wall:  # not a retry: a coordinator numbering from 0 again
                raise PreimageError(
                    f"model {self.model} at {self.node}: epoch {epoch} was restored here to "
                    f"{first:.3f}; this command restores it to {to_wall:.3f} (a coordinator "
                    "restarted without its guard log?)"
                )
            return Restored(answer=self.answers[epoch])
        if self.last_epoch is not None and epoch < self.last_epoch:
            raise PreimageError(
                f"model {self.model}: restore of epoch {epoch} after epoch {self.last_epoch}"
            )
        earliest = self.preimages.earliest_restorable
        if earliest is None or to_wall < earliest:
            raise PreimageError(
                f"model {self.model} at {self.node}: cannot roll back to {to_wall:.3f}; the "
                f"earliest restorable point is {earliest}"
            )
        if quarantine_until is not None:
            ahead = quarantine_until - self._clock.wall()
            if ahead > MAX_QUARANTINE_S + CHECKPOINT_SKEW_S:
                raise ValueError(
                    f"quarantine_until: {quarantine_until!r} is {ahead:.0f} s ahead of this "
                    f"source's clock; a quarantine lasts at most {MAX_QUARANTINE_S:.0f} s"
                )
            q = Quarantine(self.model, epoch, quarantine_until)
            if self.quarantine_file is not None:  # on disk first: a kill -9 cannot lift it
                self.quarantine_file.save(q, self.tables, self._clock.wall())
            self.port.quarantine(self.tables, q)
        out = self._write_back(to_wall)
        self.preimages.rolled_back(to_wall)
        self.last_epoch = epoch
        self.rows_restored += sum(len(k) for k, _ in out.rows.values())
        out.answer = self._answer(out, epoch, to_wall)
        self.answers = {epoch: out.answer}  # only the last one can be asked again
        log.warning(
            "guard %s at %s: epoch %d restored %d rows to %.3f (%s)",
            self.model,
            self.node,
            epoch,
            out.answer["rows_restored"],
            out.checkpoint_at,
            why,
        )
        return out

    def _write_back(self, to_wall: float) -> Restored:
        out = Restored(checkpoint_at=to_wall)
        start = self._clock.mono()
        with self.port.batch():  # holders' parked pulls wake once, for every table
            for table in self.preimages.tables():
                if table not in self.store.tables:
                    continue
                rs = self.preimages.restore_set(table, to_wall)
                if rs.keys.size == 0:
                    continue
                values = np.where(rs.existed[:, None], rs.values, 0.0).astype(np.float32)
                back = rs.existed.astype(bool)
                if back.any():
                    self.port.restore(table, rs.keys[back], values[back], now_ns=self._clock.ns())
                if not back.all():  # created since the checkpoint: gone again, everywhere
                    out.gone[table] = rs.keys[~back]
                    self.port.delete(table, out.gone[table], self._clock.ns(), restoring=True)
                out.rows[table] = (rs.keys, values)
                out.nbytes += rs.keys.nbytes + values.nbytes
        if out.rows:
            first = self.preimages.tables()[0]
            out.checkpoint_at = self.preimages.restore_plan(first, to_wall).checkpoint_at
        out.write_s = self._clock.mono() - start
        out.mismatches = sum(
            int((self.store.table(t).lookup(k)[0] != v).any(axis=1).sum())
            for t, (k, v) in out.rows.items()
        )
        return out

    def _answer(self, out: Restored, epoch: int, to_wall: float) -> dict[str, Any]:
        """The document the coordinator reads (the design's message 4c)."""
        tables = [t for t in self.tables if t in self.store.tables]
        return {
            "node": self.node,
            "model": self.model,
            "epoch": epoch,
            "to_wall": to_wall,
            "partitions": list(self.partitions),
            "checkpoint_at": out.checkpoint_at,
            "rows_restored": sum(len(k) for k, _ in out.rows.values()),
            "bytes_restored": out.nbytes,
            "write_s": out.write_s,
            "source_mismatches": out.mismatches,
            "watermark": {t: self.store.table(t).knowledge.tolist() for t in out.rows},
            "digests": {t: self.digests(t) for t in tables},
            "rows": {t: self.partition_rows(t) for t in tables},
        }

    def status(self) -> dict[str, Any]:
        """This source's part of the model's guard (its health page; the decision and the
        incidents are at the coordinator)."""
        now = self._clock.wall()
        return {
            "model": self.model,
            "role": "partition source",
            "partitions": list(self.partitions),
            "preimages": {
                "rows": self.preimages.rows,
                "earliest_restorable": self.preimages.earliest_restorable,
            },
            "rows_restored": self.rows_restored,
            "last_epoch": self.last_epoch,
            "quarantined": {
                t: {"epoch": q.epoch, "until": q.until}
                for t, q in self.port.quarantines.active(now).items()
                if t in self.tables
            },
        }

    def digests(self, table: str) -> dict[str, str]:
        """``{str(p): hex16}``: the table's digest over each of this source's partitions."""
        t = self.store.table(table)
        if self.placement is None:
            return {str(p): f"{t.digest():016x}" for p in self.partitions}
        by_part = t.digest_partitions(self.placement)
        return {str(p): f"{by_part[p]:016x}" for p in self.partitions}

    def partition_rows(self, table: str) -> dict[str, int]:
        """``{str(p): live rows}`` of the table in each of this source's partitions."""
        t = self.store.table(table)
        if self.placement is None:
            return {str(p): int(t.rows) for p in self.partitions}
        keys = t.all_rows()[0]
        parts = self.placement.partitions_of(table, t.num_shards)[shard_of(keys, t.num_shards)]
        counts = np.bincount(parts, minlength=self.placement.partitions)
        return {str(p): int(counts[p]) for p in self.partitions}
