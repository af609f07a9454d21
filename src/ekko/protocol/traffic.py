"""Inference traffic per model, reported up the sync tree on pull requests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

MAX_COUNT = 2**63 - 1
"""A report's count saturates here: a ``PullRequest`` carries int64 counts (a larger sum,
from a hostile or broken follower, made the pull unencodable and stopped the link)."""


class TrafficTally:
    """What a node owes its upstream in inference-traffic reports: predictions per model it
    served since its last report, plus what its own pullers reported to it.

    Why: the source ranks each update by its model's share of inference traffic (p_m,
    DESIGN.md §4), and only the inference nodes see that traffic. Reports ride on the pull
    requests a node sends anyway, up the same tree rows come down: a DC leader adds its
    followers' reports to its own, and the source hears each DC once per pull. A report in
    a request lost with its link is lost too; shares are decayed relative counts, so one
    missing report only delays them.

    ``served`` reads this node's cumulative prediction counters per model; a counter that
    went back (a service rebuilt) counts from zero again.
    """

    def __init__(self, served: Callable[[], Mapping[str, int]] | None = None) -> None:
        self.served = served
        self._owed: Counter[str] = Counter()
        self._seen: dict[str, int] = {}

    def add(self, counts: Mapping[str, int]) -> None:
        """Predictions downstream nodes reported (each count >= 0)."""
        for model, n in counts.items():
            if n < 0:
                raise ValueError(f"traffic count of model {model!r} must be >= 0, got {n}")
            self._owed[model] = min(self._owed[model] + int(n), MAX_COUNT)

    def take(self) -> dict[str, int] | None:
        """Everything owed since the last call, or None if nothing is."""
        if self.served is not None:
            for model, total in self.served().items():
                seen = self._seen.get(model, 0)
                self._owed[model] += total - seen if total >= seen else total
                self._seen[model] = total
        owed = {m: min(n, MAX_COUNT) for m, n in self._owed.items() if n > 0}
        self._owed.clear()
        return owed or None
