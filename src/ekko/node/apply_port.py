"""A replica's one apply port: the rows its puller applied, fanned out to their followers.

The puller reports what it applied in ``Ready.applied`` (decoded, whatever the link codec);
the pull link hands each report here. This is the only way pulled rows reach anything but
the store: the update-latency histogram, the guard's lagged baseline (``ModelHost.follow``)
and the parked pulls of this node's own followers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from ekko.protocol.ready import Applied
from ekko.quality.latency import LatencyHistogram

log = logging.getLogger(__name__)

CAUGHT_UP_S = 1.0  # a link has caught up once it applied no catch-up row for this long

Follower = Callable[[Applied], None]


class ApplyFanout:
    """Hands each ``Applied`` report to the latency histogram, every follower, then wakes
    parked pulls.

    Why one object: a row a pulled response applied must reach the baseline and the
    counters by the same path, so the baseline can never see other rows than the store
    (issue 14: it once got the raw wire chunks, which a codec link fills with a block).

    A row written before the current link came up is catch-up, not an update: its delay is
    the time the link was down or the replica absent (a source restarted on its data dir
    re-serves rows written hours ago), not the path's latency. Such rows are counted, never
    put in the histogram (a restart once reported p50 69 s).

    Args:
        latency: write-at-the-source to applied-here latency, per row written while the
            link was up.
        followers: called with every report, in order (the guard's baseline).
        wake: the store moved (rows or knowledge): wake parked pulls downstream.
    """

    def __init__(
        self, latency: LatencyHistogram, followers: Sequence[Follower], wake: Callable[[], None]
    ) -> None:
        self.latency = latency
        self.followers = list(followers)
        self.wake = wake
        self.catch_up_rows = 0  # rows applied that were written before their link came up
        self._link: tuple[str, float] | None = None  # upstream, wall time it came up
        self._catching_up = 0  # catch-up rows of the current link, until it has caught up
        self._last_old_at = 0.0  # when the current link last applied a catch-up row

    def link_up(self, upstream: str, at: float) -> None:
        """A pull link to ``upstream`` came up at ``at`` (unix s): rows written before then
        are catch-up."""
        self._link = (upstream, at)
        self._catching_up = 0
        self._last_old_at = at

    def __call__(self, applied: Applied) -> None:
        at_ns = int(applied.at * 1e9)
        since_ns = int(self._link[1] * 1e9) if self._link is not None else None
        old = 0
        for c in applied.chunks:
            if not c.rows:
                continue
            if since_ns is None:
                self.latency.record_ns(at_ns - c.wtimes)
                continue
            fresh = c.wtimes >= since_ns
            self.latency.record_ns(at_ns - c.wtimes[fresh])
            old += int(c.rows - fresh.sum())
        self.catch_up_rows += old
        if self._link is not None:
            self._caught_up(old, applied)
        for follow in self.followers:
            follow(applied)
        if applied.chunks:
            self.wake()

    def _caught_up(self, old: int, applied: Applied) -> None:
        """Log when the current link's catch-up ended: rows applied for ``CAUGHT_UP_S``
        with none written before the link came up (old rows of another table or lane may
        still follow the first fresh ones)."""
        assert self._link is not None
        if old:
            self._catching_up += old
            self._last_old_at = applied.at
        elif self._catching_up and applied.at - self._last_old_at >= CAUGHT_UP_S:
            upstream, since = self._link
            log.info(
                "caught up from %s: %d rows written before the link came up, the last "
                "applied %.1f s after it",
                upstream,
                self._catching_up,
                self._last_old_at - since,
            )
            self._catching_up = 0

    def status(self) -> dict[str, Any]:
        """``/v1/status`` ``catch_up``: rows not counted as update latency, and whether the
        current link is still catching up."""
        return {
            "rows": self.catch_up_rows,
            "upstream": self._link[0] if self._link else None,
            "link_up_at": self._link[1] if self._link else None,
            "catching_up_rows": self._catching_up,
        }
