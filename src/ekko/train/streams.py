"""Event streams for online training: a seeded drifting synthetic stream and MovieLens-100k.

Both yield ``Events`` batches in time order. A stream states its own shape
(``num_dense``, ``num_sparse``); build the model with ``DLRMConfig(num_dense=stream.num_dense,
num_sparse=stream.num_sparse, ...)`` rather than padding features.
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Events:
    """One batch of labelled events, in time order.

    dense: float32 [B, num_dense]; sparse: int64 [B, num_sparse] raw ids (one per feature);
    labels: float32 [B] in {0, 1}; ts: float64 [B] event time in (simulated) seconds.
    """

    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray
    ts: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


# Criteo-like cardinalities of the 26 categorical features, capped by StreamConfig.max_vocab.
# fmt: off
_CRITEO_VOCAB = (
    1460, 583, 10_000_000, 2_000_000, 305, 24, 12_517, 633, 3, 93_145, 5_683, 8_000_000, 3_194,
    27, 14_992, 5_000_000, 10, 5_652, 2_173, 4, 7_000_000, 18, 15, 286_181, 105, 142_572,
)
# fmt: on


@dataclass(frozen=True)
class StreamConfig:
    """Shape and dynamics of the synthetic stream; rates are per simulated second.

    Features ``0 .. num_item_features-1`` are item-like: new ids arrive at
    ``new_items_per_s`` each, with fresh click biases, and a ``hot_fraction`` of their draws
    come from the hot set, the items born in the last ``hot_lifetime_s`` seconds (so the hot
    set rotates as items arrive and age). Other draws are Zipf(``zipf_a``) over the catalog.
    The remaining features are user/context-like: Zipf over a vocabulary. A vocabulary of at
    least ``open_vocab_min`` ids is open (users, queries, pages): ``context_new_ids_per_s``
    fresh ids arrive in it, each taking a uniformly drawn rank with a fresh bias, and the id
    that held the rank is never drawn again (a rank's ids live exponential lifetimes of
    vocabulary / rate seconds). Smaller ones (device, country, hour) are closed; rate 0 (the
    default) closes them all.

    The label is Bernoulli(sigmoid(score)); score = bias + per-id biases of every feature +
    a user·item latent dot + dense weights. Item biases oscillate with per-item periods
    (``drift_period_s`` range) and the dense weights rotate, so a stale model loses AUC.
    """

    seed: int = 0
    num_dense: int = 13
    num_sparse: int = 26
    num_item_features: int = 4
    max_vocab: int = 100_000
    initial_items: int = 50_000
    events_per_s: float = 2048.0
    new_items_per_s: float = 10.0
    hot_fraction: float = 0.5
    hot_lifetime_s: float = 120.0
    zipf_a: float = 1.2
    item_bias_std: float = 1.0
    context_bias_std: float = 0.35
    latent_dim: int = 4
    latent_scale: float = 0.6
    drift_amplitude: float = 1.0
    drift_period_s: tuple[float, float] = (60.0, 600.0)
    dense_weight_std: float = 0.25
    dense_period_s: float = 900.0
    base_logit: float = -1.2
    context_new_ids_per_s: float = 0.0
    open_vocab_min: int = 1_000

    def __post_init__(self) -> None:
        if not 0 < self.num_item_features < self.num_sparse:
            raise ValueError(
                f"StreamConfig.num_item_features must be in (0, num_sparse): "
                f"{self.num_item_features}"
            )
        if self.events_per_s <= 0:
            raise ValueError(f"StreamConfig.events_per_s must be > 0: {self.events_per_s}")
        if self.zipf_a <= 1:
            raise ValueError(f"StreamConfig.zipf_a must be > 1: {self.zipf_a}")
        if not 0 <= self.hot_fraction <= 1:
            raise ValueError(f"StreamConfig.hot_fraction must be in [0, 1]: {self.hot_fraction}")
        if not 0 <= self.context_new_ids_per_s < math.inf:
            raise ValueError(
                f"StreamConfig.context_new_ids_per_s must be finite and >= 0: "
                f"{self.context_new_ids_per_s}"
            )
        if self.open_vocab_min < 1:
            raise ValueError(f"StreamConfig.open_vocab_min must be >= 1: {self.open_vocab_min}")


class _Catalog:
    """Per-id latent parameters of one item-like feature; grows (by doubling) as items arrive."""

    _FIELDS = ("birth", "bias", "period", "phase", "vec")

    def __init__(self, rng: np.random.Generator, cfg: StreamConfig) -> None:
        self.cfg = cfg
        self.size = 0
        cap = cfg.initial_items * 2
        self.birth = np.empty(cap)
        self.bias = np.empty(cap)
        self.period = np.empty(cap)
        self.phase = np.empty(cap)
        self.vec = np.empty((cap, cfg.latent_dim))
        self.add(rng, cfg.initial_items, birth=-np.inf)

    def add(self, rng: np.random.Generator, n: int, birth: float) -> None:
        cfg = self.cfg
        lo, hi = self.size, self.size + n
        if hi > len(self.birth):
            for name in self._FIELDS:
                old = getattr(self, name)
                new = np.empty((2 * hi, *old.shape[1:]))
                new[:lo] = old[:lo]
                setattr(self, name, new)
        log_lo, log_hi = np.log(cfg.drift_period_s[0]), np.log(cfg.drift_period_s[1])
        self.birth[lo:hi] = birth
        self.bias[lo:hi] = rng.normal(0, cfg.item_bias_std, n)
        self.period[lo:hi] = np.exp(rng.uniform(log_lo, log_hi, n))
        self.phase[lo:hi] = rng.uniform(0, 2 * np.pi, n)
        self.vec[lo:hi] = rng.normal(0, 1, (n, cfg.latent_dim))
        self.size = hi

    def score(self, ids: np.ndarray, t: np.ndarray) -> np.ndarray:
        drift = np.sin(2 * np.pi * t / self.period[ids] + self.phase[ids])
        return self.bias[ids] + self.cfg.drift_amplitude * drift


class _Vocab:
    """One context feature's ids by Zipf rank, with their biases; an open one renews them.

    Each rank holds one id; renewing a rank gives it the next unused id and a fresh bias
    (and a fresh latent vector for the user feature), so the id it held is never drawn again.
    """

    def __init__(
        self, rng: np.random.Generator, size: int, cfg: StreamConfig, is_open: bool
    ) -> None:
        self.cfg = cfg
        self.ids = np.arange(size, dtype=np.int64)
        self.bias = rng.normal(0, cfg.context_bias_std, size)
        self.renew_per_s = cfg.context_new_ids_per_s if is_open else 0.0
        self.next_id = size
        self.owed = 0.0

    def renew(self, rng: np.random.Generator, dt: float, vec: np.ndarray | None) -> None:
        """Renew the ranks due over ``dt`` seconds (each rank lives exponential lifetimes)."""
        if not self.renew_per_s:
            return
        self.owed += self.renew_per_s * dt
        n = int(self.owed)
        self.owed -= n
        if n == 0:
            return
        ranks = rng.integers(0, len(self.ids), n)
        self.ids[ranks] = np.arange(self.next_id, self.next_id + n)
        self.next_id += n
        self.bias[ranks] = rng.normal(0, self.cfg.context_bias_std, n)
        if vec is not None:
            vec[ranks] = rng.normal(0, 1, (n, vec.shape[1]))


class SyntheticStream:
    """Seeded, drifting, Criteo-shaped click stream (DESIGN.md §7).

    Why: it reproduces update sparsity (Zipf ids), temporal locality (a rotating hot set of
    new items) and drift (oscillating item biases, rotating dense weights), so that a model
    updated every second beats one updated every minute in online AUC. Deterministic given
    ``config.seed`` and the batch size.
    """

    def __init__(self, config: StreamConfig | None = None) -> None:
        self.config = config or StreamConfig()
        self.num_dense = self.config.num_dense
        self.num_sparse = self.config.num_sparse
        self._zipf_cum = np.empty(0)

    def time_per_batch(self, batch_size: int) -> float:
        """Simulated seconds covered by one batch of ``batch_size`` events."""
        return batch_size / self.config.events_per_s

    def batches(self, batch_size: int) -> Iterator[Events]:
        """Infinite iterator of batches; simulated time advances ``time_per_batch`` each."""
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        items = [_Catalog(rng, cfg) for _ in range(cfg.num_item_features)]
        vocab = [
            min(_CRITEO_VOCAB[f % len(_CRITEO_VOCAB)], cfg.max_vocab)
            for f in range(cfg.num_item_features, cfg.num_sparse)
        ]
        ctx = [_Vocab(rng, v, cfg, v >= cfg.open_vocab_min) for v in vocab]
        # Feature num_item_features is "the user": its latent vector (by rank) meets item 0's.
        user_vec = rng.normal(0, 1, (vocab[0], cfg.latent_dim))
        dense_w0 = rng.normal(0, cfg.dense_weight_std, cfg.num_dense)
        dense_w1 = rng.normal(0, cfg.dense_weight_std, cfg.num_dense)
        dense_mu = rng.normal(1.0, 1.0, cfg.num_dense)
        dt = self.time_per_batch(batch_size)
        born = 0.0  # fractional items owed by the arrival rate
        t0 = 0.0
        while True:
            ts = t0 + dt * np.arange(batch_size) / batch_size
            born += cfg.new_items_per_s * dt
            n_new = int(born)
            born -= n_new
            for cat in items:
                cat.add(rng, n_new, birth=t0)
            for j, voc in enumerate(ctx):
                voc.renew(rng, dt, user_vec if j == 0 else None)
            sparse = np.empty((batch_size, cfg.num_sparse), dtype=np.int64)
            score = np.full(batch_size, cfg.base_logit)
            for f, cat in enumerate(items):
                ids = self._zipf(rng, batch_size, cat.size)
                hot_lo = int(np.searchsorted(cat.birth[: cat.size], t0 - cfg.hot_lifetime_s))
                hot = rng.random(batch_size) < cfg.hot_fraction
                if hot_lo < cat.size:
                    ids[hot] = rng.integers(hot_lo, cat.size, int(hot.sum()))
                sparse[:, f] = ids
                score += cat.score(ids, ts)
            for j, voc in enumerate(ctx):
                ranks = self._zipf(rng, batch_size, len(voc.ids))
                if j == 0:
                    user = ranks
                sparse[:, cfg.num_item_features + j] = voc.ids[ranks]
                score += voc.bias[ranks]
            item = sparse[:, 0]
            dot = np.einsum("bk,bk->b", user_vec[user], items[0].vec[item])
            score += cfg.latent_scale * dot / np.sqrt(cfg.latent_dim)
            dense_raw = np.floor(np.exp(rng.normal(dense_mu, 1.0, (batch_size, cfg.num_dense))))
            dense = np.log1p(dense_raw)
            angle = 2 * np.pi * ts / cfg.dense_period_s
            w = np.cos(angle)[:, None] * dense_w0 + np.sin(angle)[:, None] * dense_w1
            score += np.einsum("bn,bn->b", dense - dense_mu, w)
            labels = rng.random(batch_size) < 1 / (1 + np.exp(-score))
            yield Events(
                dense=dense.astype(np.float32),
                sparse=sparse,
                labels=labels.astype(np.float32),
                ts=ts,
            )
            t0 += dt

    def _zipf(self, rng: np.random.Generator, n: int, size: int) -> np.ndarray:
        """Truncated Zipf(``zipf_a``) over [0, size): id 0 is the most popular."""
        if size > len(self._zipf_cum):
            ranks = np.arange(1, 2 * size + 1, dtype=np.float64)
            self._zipf_cum = np.cumsum(ranks**-self.config.zipf_a)
        u = rng.random(n) * self._zipf_cum[size - 1]
        return np.searchsorted(self._zipf_cum[:size], u, side="right").astype(np.int64)


def _read_table(name: str) -> list[list[str]]:
    """Rows of a tab-separated file shipped in the recbole wheel, header dropped."""
    try:
        root = importlib.resources.files("recbole")
    except ModuleNotFoundError as err:
        raise RuntimeError(
            "MovieLens-100k needs the recbole wheel: pip install --no-deps recbole==1.2.1"
        ) from err
    text = (root / "dataset_example" / "ml-100k" / name).read_text(encoding="utf-8")
    lines = text.splitlines()
    return [line.split("\t") for line in lines[1:] if line]


class MovieLensStream:
    """MovieLens-100k replayed in timestamp order as a CTR task (label: rating >= 4).

    Why: real user behaviour with real temporal order, small enough to replay in tests.

    Sparse features (8): user id, item id, hour of day, day of week (UTC), user age bucket,
    gender, occupation, release decade. Dense features (3), computed online from the past
    only: log1p(prior ratings by the user), log1p(prior ratings of the item), the item's
    smoothed prior positive rate. The rating itself never enters a feature. Categorical
    tokens are mapped to small ints; ids of different features may overlap (one table each).
    """

    num_sparse = 8
    num_dense = 3

    def __init__(self) -> None:
        inter = _read_table("ml-100k.inter")
        users = {r[0]: r for r in _read_table("ml-100k.user")}
        items = {r[0]: r for r in _read_table("ml-100k.item")}
        arr = np.array([(int(u), int(i), float(r), float(t)) for u, i, r, t in inter])
        order = np.argsort(arr[:, 3], kind="stable")
        arr = arr[order]
        user = arr[:, 0].astype(np.int64)
        item = arr[:, 1].astype(np.int64)
        ts = arr[:, 3]
        self.labels = (arr[:, 2] >= 4).astype(np.float32)
        self.ts = ts
        secs = ts.astype(np.int64)
        hour = (secs // 3600) % 24
        dow = (secs // 86400 + 3) % 7  # 1970-01-01 was a Thursday; 0 = Monday
        occupations: dict[str, int] = {}
        ugender = {u: int(r[2] == "F") for u, r in users.items()}
        uage = {u: min(int(r[1]) // 10, 7) for u, r in users.items()}
        uocc = {u: occupations.setdefault(r[3], len(occupations)) for u, r in users.items()}
        idecade = {i: (int(r[2]) // 10 - 190) if r[2].isdigit() else 0 for i, r in items.items()}
        ukeys = [str(u) for u in user.tolist()]
        ikeys = [str(i) for i in item.tolist()]
        self.sparse = np.stack(
            [
                user,
                item,
                hour,
                dow,
                np.array([uage[k] for k in ukeys]),
                np.array([ugender[k] for k in ukeys]),
                np.array([uocc[k] for k in ukeys]),
                np.clip(np.array([idecade.get(k, 0) for k in ikeys]), 0, None),
            ],
            axis=1,
        ).astype(np.int64)
        self.dense = self._history_features(user, item, self.labels)

    @staticmethod
    def _history_features(user: np.ndarray, item: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """float32 [n, 3] from earlier events only (rows are in time order)."""
        user_n, _ = _prior(user, labels)
        item_n, item_pos = _prior(item, labels)
        return np.stack(
            [np.log1p(user_n), np.log1p(item_n), (item_pos + 1.0) / (item_n + 2.0)], axis=1
        ).astype(np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int) -> Iterator[Events]:
        """One pass over the data in timestamp order; the last batch may be short."""
        for lo in range(0, len(self), batch_size):
            hi = lo + batch_size
            yield Events(
                dense=self.dense[lo:hi],
                sparse=self.sparse[lo:hi],
                labels=self.labels[lo:hi],
                ts=self.ts[lo:hi],
            )


def _prior(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row: how many earlier rows share its key, and the sum of their values."""
    n = len(keys)
    order = np.argsort(keys, kind="stable")  # stable: time order kept within a key
    k, v = keys[order], values[order].astype(np.float64)
    idx = np.arange(n)
    starts = np.r_[True, k[1:] != k[:-1]]
    first = np.maximum.accumulate(np.where(starts, idx, 0))
    before = np.cumsum(v) - v
    count = np.empty(n)
    total = np.empty(n)
    count[order] = idx - first
    total[order] = before - before[first]
    return count, total
