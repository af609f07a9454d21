"""Priority of a row update, ``p = (p_g + p_u) * p_m`` (DESIGN.md §4, after the Ekko paper).

- ``p_g`` significance: the row's |Δ| divided by the running mean |Δ| of its scope
  (``SignificanceTracker``);
- ``p_u`` freshness: ``freshness_boost`` for a key that replicas have never seen, else 0;
- ``p_m`` importance: the model's share of inference traffic (``TrafficShares``).

|Δ| is the **L2 norm** of ``new_row - old_row`` (``delta_norms``). L2 rather than L1 because a
dot-product model's output moves with the Euclidean length of an embedding's change; any
norm works as long as one table always uses the same one, since p_g only compares a row with
its own table's running mean.

Everything here works on whole write batches (numpy arrays); nothing loops over rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from ekko.schedule.key_slots import KeySlots

DEFAULT_MODEL = "default"

# p_g of a row when the running mean |Δ| is zero (every change so far was a no-op): keeps the
# division finite while any real change still ranks far above the no-ops.
_MEAN_FLOOR = 1e-30


def delta_norms(old_values: np.ndarray, new_values: np.ndarray) -> np.ndarray:
    """|Δrow| = L2 norm of ``new - old`` per row, float64[n]; rows are float[n, dim]."""
    old = np.asarray(old_values, dtype=np.float32)
    new = np.asarray(new_values, dtype=np.float32)
    if old.shape != new.shape or old.ndim != 2:
        raise ValueError(f"old and new values must both be [n, dim]; got {old.shape}, {new.shape}")
    d = new - old
    return np.sqrt(np.einsum("ij,ij->i", d, d, dtype=np.float64))


@dataclass(frozen=True)
class PriorityInputs:
    """One write batch of one table as the priority function sees it, so every priority
    function gets the same per-row facts and none has to know about stores or values.

    ``delta_norm``: float64[n], |Δrow| (``delta_norms``: L2 of new minus old). ``is_new``:
    bool[n], True where the key did not exist in the source table before this write — the
    signal for "replicas have never seen this key".
    """

    table: str
    keys: np.ndarray
    delta_norm: np.ndarray
    is_new: np.ndarray

    def __post_init__(self) -> None:
        if np.ndim(self.keys) != 1:
            raise ValueError(f"keys must be 1-D, got shape {np.shape(self.keys)}")
        n = np.shape(self.keys)[0]
        if np.shape(self.delta_norm) != (n,) or np.shape(self.is_new) != (n,):
            raise ValueError(
                f"delta_norm and is_new must have shape ({n},); got "
                f"{np.shape(self.delta_norm)} and {np.shape(self.is_new)}"
            )

    def __len__(self) -> int:
        return int(np.shape(self.keys)[0])

    def subset(self, mask: np.ndarray) -> PriorityInputs:
        """The rows where ``mask`` is True (a bool[n] array)."""
        return PriorityInputs(self.table, self.keys[mask], self.delta_norm[mask], self.is_new[mask])


class SignificanceTracker:
    """Running mean |Δ| per scope (a table, or a model), because a change is only large or
    small relative to how much rows of that kind usually move: a dense tensor's flattened row
    moves by far more than a 32-float embedding row, and both shrink as training converges.

    The mean is an exponentially weighted mean with a half-life counted in **rows** (not
    batches), so one huge batch and many small ones weigh the same per row. Each batch costs
    O(sample): at most ``sample`` rows are drawn (with replacement, seeded) and their mean is
    taken as the batch's, an unbiased estimate. The default half-life (2 M rows, ~20 s at
    100 k rows/s) is long on purpose, 10x the lane percentile's: the percentile already makes
    the lane split scale-free, so this mean only needs to say what "usual" is. A short burst
    of huge changes then barely moves it (the burst itself ranks high, the normal stream is
    not pushed into the low lane afterwards), and the scale of p_g drifts slowly enough for
    the percentile to follow. (A winsorised mean was tried first: it is biased low for
    heavy-tailed |Δ|, converges to its fixed point slowly, and that drift in p_g's scale
    kept the high-lane share ~2x above 1 - q.) New keys are left out: their "Δ" is an
    initial value, not an update.
    """

    def __init__(
        self,
        *,
        half_life_rows: float = 2_000_000.0,
        sample: int = 4096,
        seed: int = 0,
    ) -> None:
        if not half_life_rows > 0:
            raise ValueError(f"half_life_rows must be > 0, got {half_life_rows}")
        if sample < 1:
            raise ValueError(f"sample must be >= 1, got {sample}")
        self.half_life_rows = float(half_life_rows)
        self.sample = int(sample)
        self._rng = np.random.default_rng(seed)
        self._sum: dict[str, float] = {}
        self._weight: dict[str, float] = {}

    def mean(self, scope: str) -> float | None:
        """Running mean |Δ| of ``scope``; None before its first (non-new) row."""
        w = self._weight.get(scope, 0.0)
        return self._sum[scope] / w if w > 0 else None

    def means(self) -> dict[str, float]:
        """Running mean |Δ| of every scope seen so far."""
        return {s: self._sum[s] / w for s, w in self._weight.items() if w > 0}

    def significance(
        self, scope: str, delta_norm: np.ndarray, is_new: np.ndarray | None = None
    ) -> np.ndarray:
        """p_g = |Δ| / running mean (float64[n]). Pure: reads the state, changes nothing.

        Before the scope has a mean, this batch's own mean of non-new rows stands in (all
        rows if every one is new), so a first batch is ranked against itself, not against 0.
        """
        d = np.asarray(delta_norm, dtype=np.float64)
        m = self.mean(scope)
        if m is None:
            basis = d if is_new is None or bool(np.all(is_new)) else d[~is_new]
            m = float(basis.mean()) if basis.size else 0.0
        return d / max(m, _MEAN_FLOOR)

    def update(self, scope: str, delta_norm: np.ndarray, is_new: np.ndarray | None = None) -> None:
        """Fold one batch's (non-new) rows into the running mean of ``scope``."""
        d = np.asarray(delta_norm, dtype=np.float64)
        if is_new is not None and bool(np.any(is_new)):
            d = d[~np.asarray(is_new, dtype=bool)]
        n = d.shape[0]
        if n == 0:
            return
        if n > self.sample:
            d = d[self._rng.integers(0, n, size=self.sample)]
        batch_mean = float(d.mean())
        decay = 0.5 ** (n / self.half_life_rows)
        self._sum[scope] = self._sum.get(scope, 0.0) * decay + batch_mean * n
        self._weight[scope] = self._weight.get(scope, 0.0) * decay + n


class TrafficShares:
    """Each model's share of inference traffic (p_m), because an update to a model that
    serves 90 % of requests matters more to users than one to a model that serves 1 %.

    Inference nodes report request counts; counts decay exponentially with time constant
    ``window_s``, so the shares follow the recent traffic mix. Decay multiplies every model's
    count by the same factor, so shares only change when a report arrives: reading them needs
    no clock. Before any traffic is reported every known model gets an equal share. A table
    maps to a model through ``register``; an unregistered table belongs to model "default".
    ``floor`` (a share, default 0) keeps a model without recent traffic from dropping to
    priority 0 entirely.
    """

    def __init__(self, *, window_s: float = 60.0, floor: float = 0.0) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if not 0 <= floor <= 1:
            raise ValueError(f"floor must be in [0, 1], got {floor}")
        self.window_s = float(window_s)
        self.floor = float(floor)
        self._model_of: dict[str, str] = {}
        self._models: set[str] = set()
        self._counts: dict[str, float] = {}
        self._last: float | None = None

    def register(self, table: str, model: str) -> None:
        """Declare that ``table`` belongs to ``model``."""
        self._model_of[table] = model
        self._models.add(model)

    def model_of(self, table: str) -> str:
        return self._model_of.get(table, DEFAULT_MODEL)

    def report(self, model: str, requests: float, now: float) -> None:
        """An inference node served ``requests`` requests of ``model`` since its last report."""
        if requests < 0 or not math.isfinite(requests):
            raise ValueError(f"requests must be finite and >= 0, got {requests}")
        self._models.add(model)
        if self._last is not None and now > self._last:
            f = math.exp(-(now - self._last) / self.window_s)
            for m in self._counts:
                self._counts[m] *= f
        if self._last is None or now > self._last:
            self._last = now
        self._counts[model] = self._counts.get(model, 0.0) + float(requests)

    def shares(self) -> Mapping[str, float]:
        """Share of every known model (sums to 1 before the floor is applied)."""
        models = self._models or {DEFAULT_MODEL}
        total = sum(self._counts.values())
        if total <= 0:
            return dict.fromkeys(models, 1.0 / len(models))
        return {m: max(self._counts.get(m, 0.0) / total, self.floor) for m in models}

    def share(self, model: str) -> float:
        """p_m of ``model``; an unknown model counts as one more model with no traffic."""
        s = self.shares()
        if model in s:
            return s[model]
        total = sum(self._counts.values())
        return self.floor if total > 0 else 1.0 / (len(s) + 1)

    def importance(self, table: str) -> float:
        """p_m of the model ``table`` belongs to."""
        return self.share(self.model_of(table))


@runtime_checkable
class PriorityFunction(Protocol):
    """A pluggable priority: higher means send sooner. ``observe`` is called once per batch
    after the lanes were decided, so a stateful function ranks each batch with the state from
    before it (the same rule as the threshold) and the decision never depends on itself."""

    def __call__(self, inputs: PriorityInputs) -> np.ndarray: ...

    def observe(self, inputs: PriorityInputs) -> None: ...


class DefaultPriority:
    """The paper's ``p = (p_g + p_u) * p_m``, because it ranks a change by how far it moves
    the row (relative to usual), whether replicas lack the key, and how much traffic depends
    on the model. ``scope`` picks what p_g normalises by: each table's own mean |Δ|
    ("table", the default, since rows of different tables differ in dim and scale) or the
    model's ("model", the paper's wording; tables of one model then share one scale).
    """

    def __init__(
        self,
        significance: SignificanceTracker,
        traffic: TrafficShares,
        freshness_boost: float = 10.0,
        *,
        scope: Literal["table", "model"] = "table",
    ) -> None:
        if not freshness_boost >= 0:
            raise ValueError(f"freshness_boost must be >= 0, got {freshness_boost}")
        if scope not in ("table", "model"):
            raise ValueError(f"scope must be 'table' or 'model', got {scope!r}")
        self.significance = significance
        self.traffic = traffic
        self.freshness_boost = float(freshness_boost)
        self.scope = scope

    def scope_of(self, table: str) -> str:
        """The key under which ``table``'s running mean |Δ| is kept."""
        return table if self.scope == "table" else self.traffic.model_of(table)

    def significance_of(self, inputs: PriorityInputs) -> np.ndarray:
        """p_g of every row (pure)."""
        return self.significance.significance(
            self.scope_of(inputs.table), inputs.delta_norm, inputs.is_new
        )

    def __call__(self, inputs: PriorityInputs) -> np.ndarray:
        p_g = self.significance_of(inputs)
        p_u = np.where(inputs.is_new, self.freshness_boost, 0.0)
        return (p_g + p_u) * self.traffic.importance(inputs.table)

    def observe(self, inputs: PriorityInputs) -> None:
        self.significance.update(self.scope_of(inputs.table), inputs.delta_norm, inputs.is_new)


class HotKeyPriority:
    """Another priority function's value, weighted by how often each key was written lately:
    ``p * (1 + heat)``, ``heat`` an exponentially decayed count of the key's writes.

    Why: the paper's p_g ranks a change by its size against the table's mean, and an
    adaptive optimizer makes the changes of hot rows small (their accumulated gradients are
    large) — so the rows most predictions read rank lowest. At the source the trainer writes a
    row when a batch used it, so the write rate of a key is its traffic: weighting by it keeps
    the hot rows' (coalesced) updates ahead of rare ones on a busy link. A new key has no
    heat yet but must still go first (no replica can serve it): it is weighted as the hottest
    key seen lately. So are the rows of tables named with a prefix in ``read_by_all``, after
    any model namespace (the model's dense tensors): every prediction reads them, however
    seldom they are written. Heat lives in a fixed array per table indexed by key hash
    (collisions only add heat), decayed lazily.
    """

    def __init__(
        self,
        base: PriorityFunction,
        *,
        half_life_rows: float = 200_000.0,
        slots: int = 1 << 20,
        read_by_all: tuple[str, ...] = (),
    ) -> None:
        if not half_life_rows > 0:
            raise ValueError(f"half_life_rows must be > 0, got {half_life_rows}")
        self.base = base
        self.read_by_all = tuple(read_by_all)
        self.half_life_rows = float(half_life_rows)
        self._heat = KeySlots(slots, 2)  # per table: heat, and the clock it was last set at
        self._clock = 0.0  # rows observed
        self._peak = 0.0  # the highest heat lately, decayed like the rest
        self._peak_at = 0.0

    def heat(self, table: str, keys: np.ndarray) -> np.ndarray:
        """Decayed write count of each key (0 for a key never written)."""
        heat, at = self._heat.table(table)
        s = self._heat.of(keys)
        return heat[s] * np.exp2(-(self._clock - at[s]) / self.half_life_rows)

    def reads_all(self, table: str) -> bool:
        """Whether every prediction reads ``table``: its name, or the part after a model's
        table namespace (``ctr/dense/...``), starts with a prefix in ``read_by_all``."""
        return any(table.startswith(p) or f"/{p}" in table for p in self.read_by_all)

    def peak(self) -> float:
        """The highest heat lately (what a new key is weighted as)."""
        return self._peak * 2.0 ** (-(self._clock - self._peak_at) / self.half_life_rows)

    def __call__(self, inputs: PriorityInputs) -> np.ndarray:
        if self.reads_all(inputs.table):
            heat = np.full(len(inputs.keys), self.peak())
        else:
            heat = self.heat(inputs.table, inputs.keys)
            heat = np.where(inputs.is_new, self.peak(), heat)
        return self.base(inputs) * (1.0 + heat)

    def observe(self, inputs: PriorityInputs) -> None:
        """Heat the batch's keys. The base is not observed here: ``UpdateScheduler`` keeps
        its default priority (the usual base) up to date itself."""
        heat, at = self._heat.table(inputs.table)
        s = self._heat.of(inputs.keys)
        current = self.heat(inputs.table, inputs.keys)
        heat[s] = current + 1.0
        at[s] = self._clock
        if s.size and current.max() + 1.0 > self.peak():
            self._peak, self._peak_at = float(current.max()) + 1.0, self._clock
        self._clock += len(s)
