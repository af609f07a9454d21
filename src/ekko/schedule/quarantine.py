"""A source's write quarantine: after a rollback, writes to a model's tables are refused until
a wall time, with an error every writer can read (HTTP 409 with headers, a stream's refusal
frame with the same fields in its reason).

Why at the write port: on a partitioned cluster the model's trainers are ranks outside the
nodes, writing over the network to every partition's source; only the sources can stop a
poisoned step's rows from landing over the restored ones, and every write entry (write
streams, HTTP row writes and deletes, the in-node sink) passes through the port.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime

UNTIL_HEADER = "x-ekko-quarantine-until"
EPOCH_HEADER = "x-ekko-rollback-epoch"
_FIELDS = re.compile(rf"\[{UNTIL_HEADER}: (?P<until>[-+0-9.eE]+); {EPOCH_HEADER}: (?P<epoch>\d+)\]")


@dataclass(frozen=True)
class Quarantine:
    """One model's quarantine: its tables refuse writes until ``until`` (unix seconds)."""

    model: str
    epoch: int
    until: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.until):
            raise ValueError(f"quarantine until: expected a finite unix time, got {self.until}")
        if self.epoch < 0:
            raise ValueError(f"quarantine epoch: expected >= 0, got {self.epoch}")


class QuarantinedError(Exception):
    """A write or delete refused because its table's model was rolled back and its writes are
    quarantined (HTTP 409). ``epoch`` and ``until`` say which rollback and until when; the
    message starts ``quarantined: model {m} rolled back (epoch {e}); writes refused until
    {iso}`` and ends with both as ``[x-ekko-quarantine-until: u; x-ekko-rollback-epoch: e]``,
    which a write stream's refusal carries (``parse_quarantine`` reads it back)."""

    status = 409

    def __init__(self, table: str, q: Quarantine) -> None:
        self.table = table
        self.model = q.model
        self.epoch = q.epoch
        self.until = q.until
        iso = datetime.fromtimestamp(q.until, UTC).isoformat(timespec="milliseconds")
        super().__init__(
            f"quarantined: model {q.model} rolled back (epoch {q.epoch}); writes refused until "
            f"{iso} (table {table!r}) [{UNTIL_HEADER}: {q.until!r}; {EPOCH_HEADER}: {q.epoch}]"
        )

    @property
    def http_headers(self) -> dict[str, str]:
        """The headers an HTTP refusal carries (``ekko.net.httpkit.guarded_by`` adds them)."""
        return {UNTIL_HEADER: repr(self.until), EPOCH_HEADER: str(self.epoch)}


def parse_quarantine(reason: str) -> tuple[int, float] | None:
    """``(epoch, until)`` from a refusal's reason (or a client error's message quoting it)
    when it is a quarantine's, else None."""
    if "quarantined: model " not in reason:
        return None
    m = _FIELDS.search(reason)
    if m is None:
        return None
    return int(m["epoch"]), float(m["until"])


class Quarantines:
    """The quarantined tables of one write port, each until its wall time (lifted lazily: a
    check at or after ``until`` drops it)."""

    def __init__(self) -> None:
        self._by_table: dict[str, Quarantine] = {}

    def set(self, tables: list[str], q: Quarantine) -> None:
        for t in tables:
            self._by_table[t] = q

    def check(self, table: str, now_wall: float) -> None:
        """Raise ``QuarantinedError`` if ``table`` is quarantined at ``now_wall``."""
        q = self._by_table.get(table)
        if q is None:
            return
        if now_wall >= q.until:
            del self._by_table[table]
            return
        raise QuarantinedError(table, q)

    def active(self, now_wall: float) -> dict[str, Quarantine]:
        """The quarantines in force at ``now_wall``, by table."""
        return {t: q for t, q in self._by_table.items() if now_wall < q.until}
