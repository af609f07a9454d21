"""Which of a holder's knowledge its source's disk backs, and taking back the rest.

Why: knowledge ``K`` in a lane says "every row of that lane up to version ``K``, as the
source held them when the answer was cut". A row the source had superseded then (written
again, maybe in another lane) is skipped, rightly. But if the source crashes before the
superseding write reached its disk, it restarts holding the older row again, at a version
the holder's knowledge already passed: the holder would never pull it (``ekko sim`` found
it). So every answer carries a :class:`Mark` — the source process (``epoch``), how far its
log was written when the rows behind the answer were read (``cut``) and how far it is on
disk (``durable``) — and a holder keeps, next to its knowledge, the part of it the disk
backed: knowledge claimed under a cut the source has since made durable. When the upstream
answers under another epoch (the source restarted), the holder takes its knowledge back to
that settled part and pulls the rest again: a window of the last fsync interval's writes,
not the table. Relays pass on the marks they received, so a chain of replicas settles on
the source's disk too.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import numpy as np


class Mark(msgspec.Struct, frozen=True, array_like=True):
    """A source process's log position when an answer was cut, and its durable position."""

    epoch: int
    cut: int
    durable: int


class SettledKnowledge:
    """A holder's settled knowledge per table, and the copy of its knowledge waiting for the
    source's disk to reach the cut it was claimed under (one candidate at a time: settling
    lags the disk by at most two fsync intervals, and costs one copy of the knowledge
    arrays per settle, into buffers it reuses)."""

    def __init__(self) -> None:
        self.epoch = 0  # the source process the marks came from (0: none seen yet)
        self.cut = 0  # the highest cut of that epoch any answer carried
        self.durable = 0
        self.settled: dict[str, np.ndarray] = {}
        self._candidate: dict[str, np.ndarray] = {}
        self._candidate_cut: int | None = None  # None: no candidate waits

    def copy(self) -> SettledKnowledge:
        out = SettledKnowledge()
        out.epoch, out.cut, out.durable = self.epoch, self.cut, self.durable
        out.settled = {n: a.copy() for n, a in self.settled.items()}
        out._candidate = {n: a.copy() for n, a in self._candidate.items()}
        out._candidate_cut = self._candidate_cut
        return out

    def last(self) -> Mark | None:
        """What a relay passes on: the newest of its upstream's marks (None: none seen)."""
        return Mark(self.epoch, self.cut, self.durable) if self.epoch else None

    def new_epoch(self, mark: Mark | None) -> bool:
        """Whether ``mark`` comes from another source process than the marks before it: the
        caller then takes its knowledge back (``settle_back``) before it applies the answer."""
        return mark is not None and mark.epoch != self.epoch

    def settle_back(self, mark: Mark, knowledge: Mapping[str, np.ndarray]) -> None:
        """Take ``knowledge`` (per table, changed in place) back to what is settled, and
        follow ``mark``'s epoch from now on."""
        for name, k in knowledge.items():
            settled = self.settled.get(name)
            if settled is None or settled.shape != k.shape:
                k[:] = 0
            else:
                np.minimum(k, settled, out=k)
        self.epoch, self.cut, self.durable = mark.epoch, mark.cut, mark.durable
        self._candidate_cut = None

    def observe(self, mark: Mark | None, knowledge: Mapping[str, np.ndarray]) -> None:
        """After an answer under ``mark`` (same epoch) was applied: settle the candidate the
        source's disk now covers, and take a new one if none waits."""
        if mark is None or mark.epoch != self.epoch:
            return
        self.cut = max(self.cut, mark.cut)
        self.durable = max(self.durable, mark.durable)
        if self._candidate_cut is not None and self._candidate_cut <= self.durable:
            self._settle()
        if self._candidate_cut is None:
            # Claims so far were cut at or below ``self.cut``, whichever upstream made them.
            for name, k in knowledge.items():
                buf = self._candidate.get(name)
                if buf is None or buf.shape != k.shape:
                    self._candidate[name] = k.copy()
                else:
                    np.copyto(buf, k)
            for name in self._candidate.keys() - knowledge.keys():
                del self._candidate[name]
            self._candidate_cut = self.cut
            if self.cut <= self.durable:
                self._settle()

    def _settle(self) -> None:
        """The candidate becomes the settled knowledge; the old buffers hold the next one."""
        old = self.settled
        self.settled = self._candidate
        self._candidate = {n: a for n, a in old.items() if n in self.settled}
        self._candidate_cut = None
