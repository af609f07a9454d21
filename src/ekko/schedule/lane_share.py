"""How much of the stream the high lane may take while a WAN link is behind (DESIGN.md §4).

The k-th percentile fixes the high lane's share of rows (``1 - q``), but not its bytes per
second against a link's bandwidth: when a link drops to a tenth of its bandwidth, a tenth of
the rows may already be all it can carry, and then the high lane queues at the source and a
new key waits behind hot rows written before it. Halving the share while a paced link is
behind on its high lane, and growing it back once the link keeps up, keeps the high lane
inside what the link carries; what leaves the high lane waits in the low lane and coalesces.
"""

from __future__ import annotations

import math


class LaneShareController:
    """Multiplicative decrease / increase of the high lane's share, at most one step per
    ``interval_s``, because the signal (a paced answer truncated inside the high lane) is
    only as fresh as the last answer, and a step per write batch would overshoot.

    ``update(behind, now)`` returns the share to split the next batch by: ``share *
    decrease`` (not below ``min_share``) when some paced link is behind on its high lane,
    ``share * increase`` (not above ``base``) when none is. Time is passed in.
    """

    def __init__(
        self,
        base: float,
        *,
        min_share: float = 0.005,
        decrease: float = 0.7,
        increase: float = 1.1,
        interval_s: float = 0.1,
    ) -> None:
        if not 0 < base <= 1:
            raise ValueError(f"base share must be in (0, 1], got {base}")
        if not 0 < min_share <= base:
            raise ValueError(f"min_share must be in (0, base={base}], got {min_share}")
        if not 0 < decrease < 1 or not increase > 1:
            raise ValueError(f"need 0 < decrease < 1 < increase, got {decrease}, {increase}")
        if not (interval_s >= 0 and math.isfinite(interval_s)):
            raise ValueError(f"interval_s must be finite and >= 0, got {interval_s}")
        self.base = float(base)
        self.min_share = float(min_share)
        self.decrease = float(decrease)
        self.increase = float(increase)
        self.interval_s = float(interval_s)
        self.share = self.base
        self._stepped_at = -math.inf

    def update(self, behind: bool, now: float) -> float:
        if now - self._stepped_at < self.interval_s:
            return self.share
        if behind:
            share = max(self.min_share, self.share * self.decrease)
        else:
            share = min(self.base, self.share * self.increase)
        if share != self.share:
            self._stepped_at = now
            self.share = share
        return self.share
