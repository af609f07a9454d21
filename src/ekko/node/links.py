"""What a node pulled, per upstream peer, over its whole life.

A ``Puller`` lives for one connection and counts what it received (``Puller.statistics``);
a node reconnects, fails over and (a checkpoint replica) loads full copies, so its status
and metrics need the totals per peer: the statistics of pullers that ended plus the live
one's, read when asked. Nothing is counted twice.
"""

from __future__ import annotations

from dataclasses import fields, replace

from ekko.protocol.puller import Puller, PullerStats

_ZERO = PullerStats(0, 0, 0, 0, 0, 0, 0, 0, 0)


def _plus(a: PullerStats, b: PullerStats) -> PullerStats:
    return PullerStats(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in fields(a)})


class PullLinks:
    """Totals per upstream peer of the pullers (and full copies) of one node.

    Why not counters kept beside the puller: they would repeat ``PullerStats`` and drift
    from it; here the puller's own statistics are the only count.
    """

    def __init__(self) -> None:
        self._ended: dict[str, PullerStats] = {}
        self._live: dict[str, list[Puller]] = {}  # several: links of partitions (issue 17)

    def declare(self, peer: str) -> None:
        """``peer`` is pulled from (zeros until something arrives): status shows the link."""
        self._ended.setdefault(peer, _ZERO)

    def attach(self, peer: str, puller: Puller) -> None:
        """``puller`` pulls from ``peer`` from now on (beside the node's other links to it:
        a partitioned node may pull two groups of partitions from one peer)."""
        self._live.setdefault(peer, []).append(puller)

    def detach(self, peer: str, puller: Puller | None = None) -> None:
        """The live ``puller`` of ``peer`` ended (None: every one): keep its counts."""
        live = self._live.get(peer, [])
        for p in [x for x in live if puller is None or x is puller]:
            live.remove(p)
            ended = replace(p.statistics(), in_flight=0, pending_chunks=0)
            self._ended[peer] = _plus(self._ended.get(peer, _ZERO), ended)
        if not live:
            self._live.pop(peer, None)

    def count_copy(self, peer: str, rows: int, nbytes: int) -> None:
        """A full copy of ``peer``'s store was loaded (a checkpoint replica's refresh)."""
        copy = replace(_ZERO, responses=1, rows_received=rows, rows_applied=rows,
                       bytes_received=nbytes)  # fmt: skip
        self._ended[peer] = _plus(self._ended.get(peer, _ZERO), copy)

    def statistics(self) -> dict[str, PullerStats]:
        out = dict(self._ended)
        for peer, pullers in self._live.items():
            for puller in pullers:
                out[peer] = _plus(out.get(peer, _ZERO), puller.statistics())
        return out

    def as_json(self) -> dict[str, dict[str, int]]:
        """Per peer: ``rows`` and ``bytes`` received, ``responses``, and the rest of
        ``PullerStats`` (status clients read the first three)."""
        out = {}
        for peer, s in self.statistics().items():
            doc = {"rows": s.rows_received, "bytes": s.bytes_received}
            doc.update((f.name, getattr(s, f.name)) for f in fields(s))
            del doc["rows_received"], doc["bytes_received"]
            out[peer] = doc
        return out
