"""Online SLO metrics (AUC, log loss, CTR calibration) from (prediction, label) feedback.

TorchRec-metrics style: ``update()`` folds a batch of feedback in, ``compute()`` reads a
snapshot; every quality is kept over a sliding window, over the lifetime, and per evaluation
interval (``take_interval()``, non-overlapping, what the detector consumes). Metric names come
from one composer, :func:`metric_name`.

Window: a ring of ``buckets`` time buckets, each ``window_s / buckets`` wide. A snapshot at
``now`` covers the bucket holding ``now`` and the ``buckets - 1`` before it, so it spans between
``window_s - window_s / buckets`` and ``window_s`` seconds of feedback; older buckets are
reset when the ring wraps onto them, which is how old data expires.

AUC precision: each bucket keeps, per label, a histogram of scores over ``bins`` equal-width
bins in *logit* space on [-10, 10] (about 2 % relative resolution in probability for the
small CTRs typical of recommendation). Pairs of a positive and a negative in different bins
are ranked exactly; pairs in the same bin count as ties (1/2). So the windowed AUC differs from
the exact rank AUC by at most ``auc_tie_bound`` = 1/2 x (fraction of positive/negative pairs
sharing a bin), which each snapshot reports. For a CTR-like score distribution and 1000 bins
the bound is about 1.6e-3 and the actual error about 1e-5 (same-bin pairs fall either way about
equally often). Log loss, CTR and calibration are exact sums.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ekko.quality.errors import QualityConfigError

WINDOW = "window"
LIFETIME = "lifetime"
INTERVAL = "interval"
_LOGIT_RANGE = 10.0
_EPS = 1e-7  # predictions are clipped to [eps, 1 - eps] for log loss


def metric_name(model: str, variant: str, metric: str, window: str) -> str:
    """The one place metric names are composed: ``"ctr.online.auc.window"``."""
    for field, value in (
        ("model", model),
        ("variant", variant),
        ("metric", metric),
        ("window", window),
    ):
        if not value or "." in value:
            raise QualityConfigError(
                f"metric_name: {field} must be non-empty without '.', got {value!r}"
            )
    return f"{model}.{variant}.{metric}.{window}"


@dataclass(frozen=True)
class QualitySnapshot:
    """Quality of one model variant over one span of feedback, at monotonic time ``at``.

    Why frozen: a snapshot is handed to the detector, the log and the Prometheus exporter; none
    of them may change what another sees. Undefined values are NaN, never an exception: an empty
    window has no AUC, a single-class window has no AUC, a window without positives has no
    calibration.
    """

    count: int
    positives: int
    auc: float
    log_loss: float
    calibration: float  # mean prediction / observed positive rate; 1.0 is perfectly calibrated
    ctr: float  # observed positive rate
    window_s: float  # span covered: the window, inf for lifetime, elapsed for an interval
    auc_tie_bound: float  # |auc - exact rank AUC| <= this (same-bin pairs counted as ties)
    at: float

    def as_metrics(self, model: str, variant: str, window: str) -> dict[str, float]:
        """Flat ``{metric_name: value}`` for exporters and transition records."""
        values = {
            "count": float(self.count),
            "auc": self.auc,
            "log_loss": self.log_loss,
            "calibration": self.calibration,
            "ctr": self.ctr,
        }
        return {metric_name(model, variant, k, window): v for k, v in values.items()}

    def as_json(self) -> dict[str, float | int | None]:
        """Every field, JSON-safe: NaN and inf (undefined, unbounded) become None."""
        out: dict[str, float | int | None] = {}
        for key, value in asdict(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            out[key] = value
        return out


class _Sums:
    """Additive sufficient statistics for one span: histograms per label plus scalar sums."""

    __slots__ = ("count", "ll_sum", "neg", "pos", "positives", "pred_sum")

    def __init__(self, bins: int, rows: int = 1) -> None:
        shape = (rows, bins) if rows > 1 else (bins,)
        self.pos = np.zeros(shape, np.int64)
        self.neg = np.zeros(shape, np.int64)
        scalar_shape = (rows,) if rows > 1 else ()
        self.count = np.zeros(scalar_shape, np.int64)
        self.positives = np.zeros(scalar_shape, np.int64)
        self.pred_sum = np.zeros(scalar_shape, np.float64)
        self.ll_sum = np.zeros(scalar_shape, np.float64)


def _auc_from_hist(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(AUC, tie bound) from per-label score histograms, O(bins)."""
    n_pos = int(pos.sum())
    n_neg = int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan, math.nan
    pairs = float(n_pos) * float(n_neg)
    neg_below = np.cumsum(neg) - neg
    ties = float(np.dot(pos.astype(np.float64), neg.astype(np.float64)))
    wins = float(np.dot(pos.astype(np.float64), neg_below.astype(np.float64)))
    return (wins + 0.5 * ties) / pairs, 0.5 * ties / pairs


def _snapshot(
    pos: np.ndarray,
    neg: np.ndarray,
    count: int,
    positives: int,
    pred_sum: float,
    ll_sum: float,
    window_s: float,
    now: float,
) -> QualitySnapshot:
    auc, bound = _auc_from_hist(pos, neg)
    if count == 0:
        return QualitySnapshot(
            0, 0, math.nan, math.nan, math.nan, math.nan, window_s, math.nan, now
        )
    ctr = positives / count
    mean_pred = pred_sum / count
    calibration = mean_pred / ctr if positives > 0 else math.nan
    return QualitySnapshot(
        count, positives, auc, ll_sum / count, calibration, ctr, window_s, bound, now
    )


class WindowedQuality:
    """AUC, log loss, CTR and calibration of one variant over a sliding window and lifetime.

    Why a time-bucketed ring of histograms: feedback arrives in large batches, and the guard
    needs the window's quality cheaply and repeatedly. Histograms make every statistic
    additive, so a batch is one ``bincount``, expiry is resetting a bucket, and a window's AUC
    is O(bins) however many samples it holds. All time comes in as ``now`` (monotonic
    seconds) so tests drive it; feedback with a ``now`` earlier than one already seen is
    counted in the newest bucket (late feedback is not re-dated).
    """

    def __init__(self, window_s: float, buckets: int = 60, bins: int = 1000) -> None:
        if not window_s > 0 or not math.isfinite(window_s):
            raise QualityConfigError(f"WindowedQuality.window_s must be > 0, got {window_s!r}")
        if buckets < 1:
            raise QualityConfigError(f"WindowedQuality.buckets must be >= 1, got {buckets!r}")
        if bins < 2:
            raise QualityConfigError(f"WindowedQuality.bins must be >= 2, got {bins!r}")
        self.window_s = float(window_s)
        self.buckets = int(buckets)
        self.bins = int(bins)
        self._width = self.window_s / self.buckets
        self._ring = _Sums(bins, rows=max(self.buckets, 2))
        # Bucket index held per slot; the sentinel is never inside any window.
        self._epoch = np.full(max(self.buckets, 2), np.iinfo(np.int64).min // 2, np.int64)
        self._life = _Sums(bins)
        self._interval = _Sums(bins)
        self._interval_start: float | None = None
        self._last_now = -math.inf

    # -- update -------------------------------------------------------------------------------

    def update(self, preds: np.ndarray, labels: np.ndarray, now: float) -> None:
        """Fold in a batch of feedback: predicted probabilities and 0/1 labels."""
        p = np.asarray(preds, np.float64).reshape(-1)
        y = np.asarray(labels).reshape(-1)
        if p.shape != y.shape:
            raise ValueError(f"WindowedQuality.update: preds has {p.size} values, labels {y.size}")
        if p.size and (not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0):
            raise ValueError("WindowedQuality.update: preds must be finite probabilities in [0, 1]")
        if y.size and not np.all((y == 0) | (y == 1)):
            raise ValueError("WindowedQuality.update: labels must be 0 or 1")
        now = max(float(now), self._last_now)
        self._last_now = now
        if self._interval_start is None:
            self._interval_start = now
        if p.size == 0:
            self._advance(now)
            return
        is_pos = y.astype(bool)
        pc = np.clip(p, _EPS, 1.0 - _EPS)
        logit = np.log(pc) - np.log1p(-pc)
        scaled = (logit + _LOGIT_RANGE) * (self.bins / (2.0 * _LOGIT_RANGE))
        idx = np.clip(scaled.astype(np.int64), 0, self.bins - 1)
        pos_h = np.bincount(idx[is_pos], minlength=self.bins)
        neg_h = np.bincount(idx[~is_pos], minlength=self.bins)
        n = int(p.size)
        n_pos = int(is_pos.sum())
        pred_sum = float(p.sum())
        ll_sum = float(-(np.log(pc[is_pos]).sum() + np.log1p(-pc[~is_pos]).sum()))

        slot = self._advance(now)
        for sums, row in ((self._ring, slot), (self._life, None), (self._interval, None)):
            if row is None:
                sums.pos += pos_h
                sums.neg += neg_h
                sums.count += n
                sums.positives += n_pos
                sums.pred_sum += pred_sum
                sums.ll_sum += ll_sum
            else:
                sums.pos[row] += pos_h
                sums.neg[row] += neg_h
                sums.count[row] += n
                sums.positives[row] += n_pos
                sums.pred_sum[row] += pred_sum
                sums.ll_sum[row] += ll_sum

    def _advance(self, now: float) -> int:
        """Slot of the bucket holding ``now``, resetting it if it still holds older data."""
        bucket = math.floor(now / self._width)
        slot = bucket % len(self._epoch)
        if self._epoch[slot] != bucket:
            r = self._ring
            r.pos[slot] = 0
            r.neg[slot] = 0
            r.count[slot] = 0
            r.positives[slot] = 0
            r.pred_sum[slot] = 0.0
            r.ll_sum[slot] = 0.0
            self._epoch[slot] = bucket
        return slot

    # -- compute ------------------------------------------------------------------------------

    def compute(self, now: float) -> QualitySnapshot:
        """Quality over the sliding window ending at ``now``."""
        bucket = math.floor(max(float(now), self._last_now) / self._width)
        live = (self._epoch > bucket - self.buckets) & (self._epoch <= bucket)
        r = self._ring
        return _snapshot(
            r.pos[live].sum(axis=0),
            r.neg[live].sum(axis=0),
            int(r.count[live].sum()),
            int(r.positives[live].sum()),
            float(r.pred_sum[live].sum()),
            float(r.ll_sum[live].sum()),
            self.window_s,
            float(now),
        )

    def lifetime(self, now: float) -> QualitySnapshot:
        """Quality over everything ever seen (``window_s`` is inf)."""
        s = self._life
        return _snapshot(
            s.pos,
            s.neg,
            int(s.count),
            int(s.positives),
            float(s.pred_sum),
            float(s.ll_sum),
            math.inf,
            float(now),
        )

    def take_interval(self, now: float) -> QualitySnapshot:
        """Quality since the previous ``take_interval`` (or the first update), then reset.

        Consecutive intervals share no sample, which is what a sequential test assumes.
        """
        s = self._interval
        start = self._interval_start if self._interval_start is not None else float(now)
        snap = _snapshot(
            s.pos.copy(),
            s.neg.copy(),
            int(s.count),
            int(s.positives),
            float(s.pred_sum),
            float(s.ll_sum),
            max(float(now) - start, 0.0),
            float(now),
        )
        self._interval = _Sums(self.bins)
        self._interval_start = float(now)
        return snap

    def metrics(self, model: str, variant: str, now: float) -> dict[str, float]:
        """Window and lifetime metrics under composed names, for exporters."""
        out = self.compute(now).as_metrics(model, variant, WINDOW)
        out.update(self.lifetime(now).as_metrics(model, variant, LIFETIME))
        return out
