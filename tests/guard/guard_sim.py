"""Seeded simulation of an online and a lagging baseline model scored on live feedback.

Both variants see the same latent click model; each predicts the true logit plus Gaussian
noise (the baseline is stale, so a little noisier by default). A "bad update" from interval
``bad_from`` on changes the online predictions. One interval = one ``take_interval`` per
variant, fed to the detector; time is injected (10 s per interval), nothing sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ekko.guard.detector import Detector, DetectorConfig, Verdict
from ekko.quality.windowed import WindowedQuality


@dataclass
class SimResult:
    verdicts: list[Verdict] = field(default_factory=list)
    false_alarms: int = 0  # non-healthy verdicts before the bad update
    delay: dict[str, int] = field(default_factory=dict)  # level -> intervals after bad_from


def _scores(rng: np.random.Generator, z: np.ndarray, noise: float, bad: str | None):
    s = z + rng.normal(0.0, noise, z.size)
    if bad == "inverted":
        return -s - 6.0
    if bad == "noisy":
        return z + rng.normal(0.0, 3.0, z.size)
    if bad == "biased":
        return s + 1.0
    return s


def simulate(
    seed: int,
    intervals: int,
    *,
    bad_from: int | None = None,
    bad: str = "inverted",
    n_online: int = 5000,
    n_baseline: int = 400,
    noise_online: float = 0.6,
    noise_baseline: float = 0.7,
    config: DetectorConfig | None = None,
    stop_at_corrupted: bool = True,
) -> SimResult:
    rng = np.random.default_rng(seed)
    det = Detector(config)
    online, baseline = WindowedQuality(300.0), WindowedQuality(300.0)
    out = SimResult()
    for i in range(intervals):
        now = 10.0 * (i + 1)
        is_bad = bad_from is not None and i >= bad_from
        for wq, n, noise, which in (
            (online, n_online, noise_online, "online"),
            (baseline, n_baseline, noise_baseline, "baseline"),
        ):
            k = int(rng.poisson(n))
            z = rng.normal(-3.0, 1.2, k)
            y = (rng.random(k) < 1.0 / (1.0 + np.exp(-z))).astype(np.int8)
            s = _scores(rng, z, noise, bad if (is_bad and which == "online") else None)
            wq.update(1.0 / (1.0 + np.exp(-s)), y, now)
        v = det.observe(online.take_interval(now), baseline.take_interval(now), now)
        out.verdicts.append(v)
        if v.level != "healthy":
            if not is_bad:
                out.false_alarms += 1
            else:
                out.delay.setdefault(v.level, i - bad_from + 1)  # type: ignore[operator]
                if v.level == "corrupted" and stop_at_corrupted:
                    break
    return out
