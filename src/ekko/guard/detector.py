"""Sequential test for "the online model got worse than it normally is, relative to baseline".

Per evaluation interval the detector receives one :class:`QualitySnapshot` per variant (from
``WindowedQuality.take_interval``; intervals must not overlap). It forms two degradation
differences, each positive when online is worse:

- log loss: ``online.log_loss - baseline.log_loss``
- AUC:      ``baseline.auc - online.auc`` (skipped when either AUC is undefined)

Each difference is standardised against a robust reference of recent *healthy* intervals:
``z = (d - median) / max(1.4826 * MAD, floor)``. Centring on the median is what makes the test
relative: a stale baseline that is normally worse (or better) than online sets the median, and
only a *change* in the gap raises the score. ``z`` is clipped to ``[-z_clip, z_clip]`` (one wild
interval cannot decide alone) and fed into a one-sided CUSUM per metric,
``S = max(0, S + z - k)``; the score is the larger of the two sums.

``z`` only enters the reference while the score is below ``learn_below x uncertain_threshold``,
so a slow degradation cannot teach the detector that worse is normal.

False alarms: for exactly Gaussian ``z`` the Siegmund approximation gives an average run length
far beyond 1e6 intervals at the defaults (k = 1, uncertain h = 8), but the estimated scale is
noisy, so rely on the measurement instead: in the seeded simulation of the tests (online ~5000,
baseline ~400 labelled samples per interval) 80,000 clean intervals gave no alarm and a highest
score of 6.2. Detection: a large sustained drop moves the score by ``z_clip - k`` = 4 per
interval, so uncertain after 2 intervals and corrupted after 3. A modest drop (predictions
biased by +1 logit) took a median of 18 intervals and was missed within 300 in 5 of 20 runs:
with < 1 % of traffic on the baseline, the baseline's sampling noise bounds the sensitivity.

The floor: the CUSUM needs ``warmup_intervals`` of healthy history before it can judge, and
a model poisoned in that first minute would teach the reference that "much worse than the
baseline" is normal. So, from the first interval, every interval is also compared with the
baseline in absolute terms: the online AUC below the baseline's by more than
``floor_auc_drop`` *and* by more than ``floor_z`` standard errors (Hanley-McNeil, from each
variant's positives and negatives), with the online log loss worse too, is a breach;
``floor_intervals`` breaches in a row are ``corrupted`` whatever the CUSUM says, and a breached
interval never enters the reference. A flipped-label poison drops AUC from ~0.8 to ~0.3: tens
of standard errors at the demo's traffic; a clean interval breaching 4 standard errors twice
in a row is a ~1e-9 event.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ekko.guard.errors import GuardConfigError
from ekko.quality.windowed import QualitySnapshot

Level = Literal["healthy", "uncertain", "corrupted"]
HEALTHY: Level = "healthy"
UNCERTAIN: Level = "uncertain"
CORRUPTED: Level = "corrupted"
_MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class DetectorConfig:
    """Detector settings, validated in one place (``validate``) so errors name the field.

    Why a frozen config rather than constructor arguments: the same settings go to every
    model's detector and into the bench JSON; a typo must fail at start-up, not as silence.
    """

    uncertain_threshold: float = 8.0
    corrupted_threshold: float = 12.0
    k: float = 1.0  # drift allowance, in robust standard deviations per interval
    z_clip: float = 5.0  # per-interval |z| cap: robustness against single wild intervals
    min_samples: int = 200  # labelled samples needed in *each* variant per interval
    warmup_intervals: int = 30  # intervals that only build the reference, score stays 0
    reference_intervals: int = 200  # healthy intervals kept for median / MAD
    min_scale_log_loss: float = 1e-4  # floor of the log-loss difference scale
    min_scale_auc: float = 1e-4  # floor of the AUC difference scale
    learn_below: float = 0.5  # reference learns only while score < this x uncertain_threshold
    floor_auc_drop: float = 0.05  # online AUC this far below the baseline's is a breach ...
    floor_z: float = 4.0  # ... if also this many standard errors of the difference
    floor_intervals: int = 2  # breaches in a row that make the level corrupted

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(field: str, rule: str) -> GuardConfigError:
            return GuardConfigError(
                f"DetectorConfig.{field} must be {rule}, got {getattr(self, field)!r}"
            )

        for field in (
            "uncertain_threshold", "z_clip", "min_scale_log_loss", "min_scale_auc",
            "floor_auc_drop", "floor_z",
        ):  # fmt: skip
            value = getattr(self, field)
            if not (math.isfinite(value) and value > 0):
                raise bad(field, "a finite number > 0")
        if not (0 < self.learn_below <= 1):
            raise bad("learn_below", "in (0, 1]")
        if not (math.isfinite(self.k) and self.k >= 0):
            raise bad("k", "a finite number >= 0")
        if not (
            math.isfinite(self.corrupted_threshold)
            and self.corrupted_threshold > self.uncertain_threshold
        ):
            raise bad("corrupted_threshold", "finite and > uncertain_threshold")
        if self.z_clip <= self.k:
            raise bad("z_clip", "> k (otherwise the score can never rise)")
        if self.min_samples < 1:
            raise bad("min_samples", ">= 1")
        if self.floor_intervals < 1:
            raise bad("floor_intervals", ">= 1")
        if self.warmup_intervals < 3:
            raise bad("warmup_intervals", ">= 3 (a MAD needs a few points)")
        if self.reference_intervals < self.warmup_intervals:
            raise bad("reference_intervals", ">= warmup_intervals")


@dataclass(frozen=True)
class Verdict:
    """The detector's answer for one interval.

    Why a value rather than a side effect: the health state machine, the transition log and
    the bench all consume it; ``reason`` carries the numbers a human needs to audit a rollback.
    """

    score: float
    level: Level
    reason: str
    z_log_loss: float
    z_auc: float
    skipped: bool
    at: float


class _Reference:
    """Median / MAD of the last N healthy differences for one metric."""

    def __init__(self, size: int, floor: float) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.floor = floor
        self.center = 0.0
        self.scale = floor

    def add(self, d: float) -> None:
        self.values.append(d)
        arr = np.fromiter(self.values, np.float64, len(self.values))
        self.center = float(np.median(arr))
        self.scale = max(_MAD_TO_SIGMA * float(np.median(np.abs(arr - self.center))), self.floor)

    def z(self, d: float) -> float:
        return (d - self.center) / self.scale


class Detector:
    """Robust one-sided CUSUM on online-minus-baseline quality differences.

    Why relative and robust: the baseline lags by minutes and may be better or worse than the
    online model on any given day; what signals a bad update is the online model losing ground
    against it faster than usual. Median/MAD scaling keeps a few odd intervals (traffic bursts,
    single-class windows) from setting the scale, and the reference only learns from intervals
    judged healthy, so a slow poisoning cannot teach the detector that bad is normal.
    """

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config if config is not None else DetectorConfig()
        c = self.config
        self._ref_ll = _Reference(c.reference_intervals, c.min_scale_log_loss)
        self._ref_auc = _Reference(c.reference_intervals, c.min_scale_auc)
        self._s_ll = 0.0
        self._s_auc = 0.0
        self._seen = 0  # intervals with enough samples
        self._level: Level = HEALTHY
        self._breaches = 0  # consecutive intervals below the floor

    @property
    def level(self) -> Level:
        return self._level

    @property
    def score(self) -> float:
        return max(self._s_ll, self._s_auc)

    @property
    def warmed_up(self) -> bool:
        return self._seen >= self.config.warmup_intervals

    @property
    def warmup_progress(self) -> tuple[int, int]:
        """(intervals judged so far, intervals the CUSUM needs before it scores)."""
        return min(self._seen, self.config.warmup_intervals), self.config.warmup_intervals

    def reset(self) -> None:
        """Clear the CUSUM sums (after a rollback); the healthy reference is kept."""
        self._s_ll = 0.0
        self._s_auc = 0.0
        self._level = HEALTHY
        self._breaches = 0

    def observe(self, online: QualitySnapshot, baseline: QualitySnapshot, now: float) -> Verdict:
        """Score one evaluation interval; returns the level after it."""
        c = self.config
        too_few = [
            (name, s.count)
            for name, s in (("online", online), ("baseline", baseline))
            if s.count < c.min_samples or not math.isfinite(s.log_loss)
        ]
        if too_few:
            what = ", ".join(
                f"{name} count {n} < min_samples {c.min_samples}" for name, n in too_few
            )
            return Verdict(
                self.score, self._level, f"skipped: {what}", math.nan, math.nan, True, now
            )

        d_ll = online.log_loss - baseline.log_loss
        d_auc = baseline.auc - online.auc  # NaN if either window is single-class
        has_auc = math.isfinite(d_auc)
        self._seen += 1
        floor = self._floor(online, baseline, d_ll, d_auc)
        self._breaches = self._breaches + 1 if floor else 0
        below_floor = self._breaches >= c.floor_intervals
        if not self.warmed_up:
            if not floor:
                self._learn(d_ll, d_auc if has_auc else None)
            level: Level = CORRUPTED if below_floor else HEALTHY
            self._level = level
            head = f"warmup {self._seen}/{c.warmup_intervals}"
            if floor:
                head = f"{level}: {floor} ({self._breaches} in a row; {head})"
            return Verdict(
                0.0,
                level,
                f"{head}: " + self._numbers(online, baseline, d_ll, d_auc),
                math.nan,
                math.nan,
                False,
                now,
            )

        z_ll = float(np.clip(self._ref_ll.z(d_ll), -c.z_clip, c.z_clip))
        z_auc = (
            float(np.clip(self._ref_auc.z(d_auc), -c.z_clip, c.z_clip))
            if has_auc and len(self._ref_auc.values) >= 3
            else math.nan
        )
        self._s_ll = max(0.0, self._s_ll + z_ll - c.k)
        if math.isfinite(z_auc):
            self._s_auc = max(0.0, self._s_auc + z_auc - c.k)
        score = self.score
        if score >= c.corrupted_threshold or below_floor:
            level = CORRUPTED
        elif score >= c.uncertain_threshold:
            level = UNCERTAIN
        else:
            level = HEALTHY
        self._level = level
        if score < c.learn_below * c.uncertain_threshold and not floor:
            self._learn(d_ll, d_auc if has_auc else None)
        reason = (
            f"{level}: score {score:.2f} (cusum log_loss {self._s_ll:.2f}, "
            f"auc {self._s_auc:.2f}; z log_loss {z_ll:+.2f}, auc {z_auc:+.2f}); "
            + (f"{floor} ({self._breaches} in a row); " if floor else "")
            + self._numbers(online, baseline, d_ll, d_auc)
        )
        return Verdict(score, level, reason, z_ll, z_auc, False, now)

    def _floor(
        self, online: QualitySnapshot, baseline: QualitySnapshot, d_ll: float, d_auc: float
    ) -> str:
        """Why this interval is below the absolute floor, or "" if it is not."""
        c = self.config
        if not (math.isfinite(d_auc) and d_ll > 0):
            return ""
        se = math.hypot(auc_standard_error(online), auc_standard_error(baseline))
        if d_auc > c.floor_auc_drop and d_auc > c.floor_z * se:
            return (
                f"below the floor: online AUC {d_auc:.4f} under the baseline's "
                f"(> {c.floor_auc_drop:g} and {d_auc / max(se, 1e-12):.1f} standard errors)"
            )
        return ""

    def _learn(self, d_ll: float, d_auc: float | None) -> None:
        self._ref_ll.add(d_ll)
        if d_auc is not None:
            self._ref_auc.add(d_auc)

    @staticmethod
    def _numbers(
        online: QualitySnapshot, baseline: QualitySnapshot, d_ll: float, d_auc: float
    ) -> str:
        return (
            f"log_loss online {online.log_loss:.5f} baseline {baseline.log_loss:.5f} "
            f"(online - baseline {d_ll:+.5f}); auc online {online.auc:.4f} baseline "
            f"{baseline.auc:.4f} (online - baseline {-d_auc:+.4f}); "
            f"n online {online.count} baseline {baseline.count}"
        )


def auc_standard_error(s: QualitySnapshot) -> float:
    """Hanley-McNeil standard error of ``s.auc`` from its positives and negatives (inf when
    the AUC is undefined)."""
    a, n_pos = s.auc, s.positives
    n_neg = s.count - n_pos
    if not math.isfinite(a) or n_pos < 1 or n_neg < 1:
        return math.inf
    q1 = a / (2 - a)
    q2 = 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))
