"""Pacing a link at its configured bandwidth (DESIGN.md §4).

A responder that answers every pull with as many bytes as the puller asked for overfills a
slow link: the bytes queue in the kernel and the WAN emulator, and a high-lane row written
now waits behind low-lane rows sent a second ago. Pacing keeps the queue short, so what is
sent next is always chosen *now*, from the high lane first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_EPS = 1e-9
BURST_S = 0.05
"""A pacer's default burst, in seconds of its rate: long enough to fill an answer, short
enough that one answer does not hold the link for long."""


def _check_rate(rate: float) -> float:
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate_bytes_per_s must be finite and > 0, got {rate}")
    return float(rate)


class TokenBucket:
    """Byte tokens refilled at ``rate_bytes_per_s`` up to ``burst_bytes``, because a token
    bucket is the simplest pacer that allows short bursts but holds the long-run rate.

    Time is passed in (``now``, seconds, any monotone clock); nothing here reads a clock. A
    ``now`` earlier than the last one seen is treated as the last one (no refill, no error).
    ``take`` is all-or-nothing; ``consume`` may drive the balance negative (debt), which later
    refills repay before anything else may be taken — used when a sender had to exceed its
    grant (e.g. to send at least one row).
    """

    def __init__(self, rate_bytes_per_s: float, burst_bytes: float, *, now: float = 0.0) -> None:
        self._rate = _check_rate(rate_bytes_per_s)
        if not (burst_bytes > 0 and math.isfinite(burst_bytes)):
            raise ValueError(f"burst_bytes must be finite and > 0, got {burst_bytes}")
        self._burst = float(burst_bytes)
        self._tokens = self._burst
        self._last = float(now)

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = float(now)

    def available(self, now: float) -> float:
        """Tokens (bytes) available at ``now``; negative while in debt."""
        self._refill(now)
        return self._tokens

    def take(self, n: float, now: float) -> bool:
        """Take ``n`` tokens if all are available; return whether they were taken."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self._refill(now)
        if self._tokens + _EPS >= n:
            self._tokens -= n
            return True
        return False

    def consume(self, n: float, now: float) -> None:
        """Take ``n`` tokens unconditionally (the balance may go negative)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self._refill(now)
        self._tokens -= n

    def refund(self, n: float, now: float) -> None:
        """Give back ``n`` tokens taken for bytes that were not sent (capped at the burst)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self._refill(now)
        self._tokens = min(self._burst, self._tokens + n)

    def time_until(self, n: float, now: float) -> float:
        """Seconds from ``now`` until ``n`` tokens are available; inf if ``n`` > burst."""
        self._refill(now)
        if self._tokens + _EPS >= n:
            return 0.0
        if n > self._burst + _EPS:
            return math.inf
        return (n - self._tokens) / self._rate

    def set_rate(
        self, rate_bytes_per_s: float, now: float, *, burst_bytes: float | None = None
    ) -> None:
        """Change the rate (and optionally the burst) from ``now`` on; tokens earned before
        ``now`` are kept at the old rate (capped at the new burst)."""
        rate = _check_rate(rate_bytes_per_s)
        if burst_bytes is not None and not (burst_bytes > 0 and math.isfinite(burst_bytes)):
            raise ValueError(f"burst_bytes must be finite and > 0, got {burst_bytes}")
        self._refill(now)
        self._rate = rate
        if burst_bytes is not None:
            self._burst = float(burst_bytes)
            self._tokens = min(self._tokens, self._burst)


@dataclass(frozen=True)
class PacerStats:
    """A paced link at one moment, for the exporter."""

    rate_bytes_per_s: float
    tokens: float  # bytes the link may carry now (negative: sent ahead of its rate)
    queued_bytes: float  # bytes sent ahead of the rate: still queued on the link, about
    bytes_sent: int  # counter


class LinkPacer:
    """Sizes pull answers on one link so the link carries ``rate_bytes_per_s`` and no more,
    because the responder should delay an answer (and keep choosing high-lane rows first)
    rather than overfill the link.

    Use: ``b = budget(now, request.max_bytes)``; if ``b == 0`` wait ``wait_hint(now)`` seconds
    (or until then, with a timer) and ask again; else answer within ``b`` bytes and report the
    bytes actually sent with ``spent(n, now)`` — they may exceed ``b`` (a responder sends at
    least one row); the excess is debt that delays the next budget, so the long-run rate
    holds. ``budget`` reserves nothing: report ``spent`` before sizing the next answer (one
    pacer per link, driven from one thread). A nonzero budget is never below ``min_bytes``
    (or the request, if smaller): tiny answers would spend a round trip on a few bytes.
    """

    def __init__(
        self,
        rate_bytes_per_s: float,
        *,
        burst_bytes: float | None = None,
        min_bytes: int = 4096,
        now: float = 0.0,
    ) -> None:
        rate = _check_rate(rate_bytes_per_s)
        if min_bytes < 1:
            raise ValueError(f"min_bytes must be >= 1, got {min_bytes}")
        self._fixed_burst = burst_bytes is not None
        burst = (
            float(burst_bytes) if burst_bytes is not None else self._default_burst(rate, min_bytes)
        )
        if burst < min_bytes:
            raise ValueError(f"burst_bytes ({burst}) must be >= min_bytes ({min_bytes})")
        self.min_bytes = int(min_bytes)
        self.bucket = TokenBucket(rate, burst, now=now)
        self._spent = 0

    @staticmethod
    def _default_burst(rate: float, min_bytes: int) -> float:
        return max(rate * BURST_S, 2.0 * min_bytes)

    @property
    def rate(self) -> float:
        return self.bucket.rate

    def budget(self, now: float, requested_max_bytes: int) -> int:
        """Bytes an answer may carry now: 0 until ``min(min_bytes, requested)`` tokens exist,
        then all available tokens, capped at the request."""
        if requested_max_bytes <= 0:
            return 0
        floor = min(self.min_bytes, int(requested_max_bytes))
        avail = self.bucket.available(now)
        if avail + _EPS < floor:
            return 0
        b = min(int(requested_max_bytes), max(floor, int(avail)))
        return b

    def spent(self, n: int, now: float) -> None:
        """``n`` bytes went onto the link at ``now`` (may exceed the last budget)."""
        self.bucket.consume(float(n), now)
        self._spent += int(n)

    def correct(self, n: int, now: float) -> None:
        """The link carried ``n`` bytes more (or, negative, fewer) than ``spent`` was told: an
        answer's framing and compression, known only once it is framed."""
        if n > 0:
            self.bucket.consume(float(n), now)
        elif n < 0:
            self.bucket.refund(float(-n), now)
        self._spent += int(n)

    def wait_hint(self, now: float, requested_max_bytes: int | None = None) -> float:
        """Seconds from ``now`` until ``budget`` would be nonzero (0.0 if it is now)."""
        floor = self.min_bytes
        if requested_max_bytes is not None:
            floor = min(floor, max(int(requested_max_bytes), 1))
        return self.bucket.time_until(floor, now)

    def set_rate(self, rate_bytes_per_s: float, now: float) -> None:
        """The link's bandwidth changed (e.g. a congestion experiment): pace at the new rate.
        The default burst follows the rate: a burst sized for the old, faster link would put
        one answer on the slow link that takes that much longer to leave it."""
        rate = _check_rate(rate_bytes_per_s)
        burst = None if self._fixed_burst else self._default_burst(rate, self.min_bytes)
        self.bucket.set_rate(rate, now, burst_bytes=burst)

    @property
    def bytes_spent(self) -> int:
        return self._spent

    def statistics(self, now: float) -> PacerStats:
        tokens = self.bucket.available(now)
        return PacerStats(self.rate, tokens, max(0.0, -tokens), self._spent)
