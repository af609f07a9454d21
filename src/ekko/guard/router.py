"""Traffic split between the online model and the lagging baseline.

A request goes to the baseline when a seeded 64-bit hash of its id, read as a number in
[0, 1), is below ``baseline_share``. The decision is a pure function of (id, seed, share): a
retried request, or the feedback for a prediction, lands on the same variant on every replica,
with no shared state. ``redirect_all_to_baseline()`` sends everything to the baseline (the
guard does this the moment a model is declared corrupted) until ``restore()``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from ekko.guard.errors import GuardConfigError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_TO_UNIT = 1.0 / float(1 << 53)


class Variant(StrEnum):
    """Which model serves a request; feedback is scored per variant by this name."""

    ONLINE = "online"
    BASELINE = "baseline"


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _id_to_int(request_id: int | str | bytes) -> int:
    if isinstance(request_id, int):
        return request_id & 0xFFFF_FFFF_FFFF_FFFF
    data = request_id.encode() if isinstance(request_id, str) else bytes(request_id)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@dataclass(frozen=True)
class RouterStats:
    """Routing counts at monotonic time ``at``.

    Why a frozen dataclass: one module exports all stats to Prometheus; it reads values, not
    the router's internals.
    """

    online: int
    baseline: int
    baseline_share: float
    redirected: bool
    at: float


class TrafficRouter:
    """Deterministic, stateless per-request choice of online vs baseline model.

    Why hash-based rather than random: feedback arrives later and elsewhere; the guard must be
    able to attribute a label to the variant that produced the prediction from the id alone,
    and every replica must make the same choice without coordinating.
    """

    def __init__(self, baseline_share: float = 0.005, seed: int = 0) -> None:
        if not (
            isinstance(baseline_share, int | float)
            and math.isfinite(baseline_share)
            and 0.0 <= baseline_share < 1.0
        ):
            raise GuardConfigError(
                f"TrafficRouter.baseline_share must be in [0, 1), got {baseline_share!r}"
            )
        self.baseline_share = float(baseline_share)
        self.seed = int(seed)
        self._seed_mix = np.uint64(_id_to_int(self.seed))
        self._redirected = False
        self._online = 0
        self._baseline = 0

    @property
    def redirected(self) -> bool:
        return self._redirected

    def redirect_all_to_baseline(self) -> None:
        """Every request to the baseline from now on (the online model is known bad)."""
        self._redirected = True

    def restore(self) -> None:
        """Back to the configured split."""
        self._redirected = False

    def baseline_mask(self, ids: np.ndarray) -> np.ndarray:
        """Vectorised: ``True`` where the request with that integer id goes to the baseline."""
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise GuardConfigError(
                f"TrafficRouter.baseline_mask: ids must be integers, got dtype {arr.dtype}"
            )
        if self._redirected:
            mask = np.ones(arr.shape, bool)
        else:
            mask = self.hash_unit(arr) < self.baseline_share
        n_base = int(mask.sum())
        self._baseline += n_base
        self._online += int(mask.size) - n_base
        return mask

    def hash_unit(self, ids: np.ndarray) -> np.ndarray:
        """The id's position in [0, 1) that the split compares with the share."""
        x = np.asarray(ids).astype(np.uint64, copy=False) ^ self._seed_mix
        return (_splitmix64(x) >> np.uint64(11)).astype(np.float64) * _TO_UNIT

    def route(self, request_id: int | str | bytes) -> Variant:
        """The variant that serves one request (strings and bytes are hashed first)."""
        mask = self.baseline_mask(np.array([_id_to_int(request_id)], np.uint64))
        return Variant.BASELINE if mask[0] else Variant.ONLINE

    def stats(self, now: float) -> RouterStats:
        return RouterStats(
            self._online, self._baseline, self.baseline_share, self._redirected, float(now)
        )
