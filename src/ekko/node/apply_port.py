"""A replica's one apply port: the rows its puller applied, fanned out to their followers.

The puller reports what it applied in ``Ready.applied`` (decoded, whatever the link codec);
the pull link hands each report here. This is the only way pulled rows reach anything but
the store: the update-latency histogram, the guard's lagged baseline (``ModelHost.follow``)
and the parked pulls of this node's own followers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ekko.protocol.ready import Applied
from ekko.quality.latency import LatencyHistogram

Follower = Callable[[Applied], None]


class ApplyFanout:
    """Hands each ``Applied`` report to the latency histogram, every follower, then wakes
    parked pulls.

    Why one object: a row a pulled response applied must reach the baseline and the
    counters by the same path, so the baseline can never see other rows than the store
    (issue 14: it once got the raw wire chunks, which a codec link fills with a block).

    Args:
        latency: write-at-the-source to applied-here latency, per row.
        followers: called with every report, in order (the guard's baseline).
        wake: the store moved (rows or knowledge): wake parked pulls downstream.
    """

    def __init__(
        self, latency: LatencyHistogram, followers: Sequence[Follower], wake: Callable[[], None]
    ) -> None:
        self.latency = latency
        self.followers = list(followers)
        self.wake = wake

    def __call__(self, applied: Applied) -> None:
        at_ns = int(applied.at * 1e9)
        for c in applied.chunks:
            if c.rows:
                self.latency.record_ns(at_ns - c.wtimes)
        for follow in self.followers:
            follow(applied)
        if applied.chunks:
            self.wake()
