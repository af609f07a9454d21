"""DynamicEmbedding: raw ids to rows, admission, LRU / LFU / TTL eviction under a fake clock,
optimizer state reset, the budget, and what the publisher writes and deletes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ekko.torch import DynamicEmbedding, DynamicEmbeddingConfig, EmbeddingPublisher, MemorySink
from ekko.train.admission import AdmissionConfig
from ekko.train.eviction import (
    EVICTION_KINDS,
    RANKED_KINDS,
    EvictionConfig,
    RowStats,
    scores,
    victims,
)
from ekko.train.publisher import PublisherConfig

HUGE = 2**63 - 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def table(budget: int, clock=None, **policies) -> DynamicEmbedding:
    cfg = DynamicEmbeddingConfig(row_budget=budget, **policies)
    return DynamicEmbedding(4, cfg, clock=clock or FakeClock())


def look(emb: DynamicEmbedding, *ids: int) -> torch.Tensor:
    """A training lookup (admits, evicts), without the backward pass that ends its step."""
    emb.train()
    return emb(torch.tensor(ids, dtype=torch.int64))


def train(emb: DynamicEmbedding, *ids: int) -> torch.Tensor:
    """One training step's lookup and its backward pass."""
    out = look(emb, *ids)
    out.sum().backward()
    return out.detach()


def held(emb: DynamicEmbedding) -> set[int]:
    return set(emb.live()[0].tolist())


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(
        st.lists(st.integers(-(2**63), HUGE) | st.integers(-5, 5), min_size=1, max_size=12),
        min_size=1,
        max_size=15,
    ),
    budget=st.integers(1, 8),
    kind=st.sampled_from(EVICTION_KINDS),
    admission=st.sampled_from(
        [AdmissionConfig(), AdmissionConfig(kind="count", threshold=2, idle_rows=True)]
    ),
)
def test_rows_stay_within_budget_and_each_id_reads_its_own_row(
    batches, budget, kind, admission
) -> None:
    clock = FakeClock()
    ttl = 3.0 if kind == "ttl" else None
    emb = table(budget, clock, admission=admission, eviction=EvictionConfig(kind=kind, ttl_s=ttl))
    for batch in batches:
        clock.now += 1.0
        out = train(emb, *batch)
        ids, slots = emb.live()
        st_ = emb.statistics()
        assert len(ids) == st_.rows <= budget
        assert len(set(slots.tolist())) == len(slots)  # no two ids share a row
        weight = emb.embedding.weight.detach()
        row_of = dict(zip(ids.tolist(), slots.tolist(), strict=True))
        for i, key in enumerate(batch):
            want = weight[row_of[key]] if key in row_of else torch.zeros(4)
            assert torch.equal(out[i].detach(), want)
    stats = emb.statistics()
    assert stats.admitted - stats.evicted == stats.rows


def test_unknown_ids_read_the_default_row_outside_training() -> None:
    emb = table(4)
    train(emb, -7, HUGE)
    emb.eval()
    out = emb(torch.tensor([[HUGE, 12345]]))
    assert out.shape == (1, 2, 4)
    assert out[0, 1].abs().sum() == 0 and out[0, 0].abs().sum() > 0
    assert held(emb) == {-7, HUGE}  # the eval lookup admitted nothing
    with torch.no_grad():
        emb.train()
        emb(torch.tensor([99]))
    assert 99 not in held(emb)


def test_count_admission_gives_a_row_on_the_third_sighting_only() -> None:
    emb = table(8, admission=AdmissionConfig(kind="count", threshold=3))
    assert train(emb, 5, 6).abs().sum() == 0
    assert train(emb, 5).abs().sum() == 0
    assert held(emb) == set()
    assert train(emb, 5).abs().sum() > 0
    assert held(emb) == {5}
    st_ = emb.statistics()
    assert (st_.admitted, st_.rejected) == (1, 3)


@pytest.mark.parametrize("kind", RANKED_KINDS)
def test_idle_rows_take_the_turned_away_into_free_and_idle_rows_only(kind) -> None:
    strict = table(2, admission=AdmissionConfig(kind="count", threshold=2))
    emb = table(2, admission=AdmissionConfig(kind="count", threshold=2, idle_rows=True),
                eviction=EvictionConfig(kind=kind))  # fmt: skip
    emb.track_evictions()
    train(strict, 1, 2)
    assert held(strict) == set()  # a strict filter: first sightings read the default row
    assert train(emb, 1, 2).abs().sum() > 0  # free rows: the first sighting takes one
    assert held(emb) == {1, 2}
    assert train(emb, 3).abs().sum() == 0  # full, nothing idle: 3 is turned away
    assert held(emb) == {1, 2} and emb.statistics().rejected == 1
    for _ in range(17):  # the 20th sighting (10 x budget) halves the frequencies: 2's is 0
        train(emb, 1)
    assert train(emb, 4).abs().sum() > 0  # a first sighting takes the idle row of 2
    assert held(emb) == {1, 4} and emb.take_evicted().tolist() == [2]
    train(emb, 5)  # 4 (frequency 1) is in use, 1 too: 5 reads the default row
    assert held(emb) == {1, 4} and emb.statistics().evicted == 1


def test_lru_evicts_the_least_recently_trained_row() -> None:
    emb = table(3, eviction=EvictionConfig(kind="lru"))
    emb.track_evictions()
    train(emb, 1, 2, 3)
    train(emb, 1)
    train(emb, 3)
    train(emb, 4)  # full: 2 is the least recently used
    assert held(emb) == {1, 3, 4}
    train(emb, 5, 6)
    assert held(emb) == {4, 5, 6}
    gone = emb.take_evicted().tolist()
    assert gone[0] == 2 and sorted(gone[1:]) == [1, 3]
    assert emb.take_evicted().size == 0


def test_lfu_evicts_the_least_frequent_row_ties_by_recency() -> None:
    emb = table(3, eviction=EvictionConfig(kind="lfu"))
    train(emb, 1, 1, 1, 2, 3)
    train(emb, 3)
    train(emb, 4)  # counts 1:3, 2:1, 3:2 -> 2 leaves
    assert held(emb) == {1, 3, 4}
    train(emb, 5)  # 3:2, 4:1 -> 4 leaves
    assert held(emb) == {1, 3, 5}
    assert emb.statistics().evicted == 2


def test_lfu_aging_sets_how_many_sightings_pass_between_halvings() -> None:
    """lfu_aging = 2: counts halve after every 2 x budget sightings (not 10 x), so a row
    frequent once (1, 9 sightings) loses to a newer one sighted since (2, 8 sightings)."""
    for aging, kept in ((2.0, 2), (10.0, 1)):
        emb = table(2, eviction=EvictionConfig(kind="lfu", lfu_aging=aging))
        train(emb, *[1] * 9)
        for _ in range(8):
            train(emb, 2)  # aging 2: halvings at its 4th and 8th sighting: 1 -> 2, 2 -> 3
        train(emb, 3)  # full: the least frequent leaves (aging 10: 1 at 9 vs 2 at 8)
        assert held(emb) == {kept, 3}, aging
    with pytest.raises(ValueError, match="lfu_aging"):
        EvictionConfig(kind="lfu", lfu_aging=0)


def test_ttl_evicts_rows_not_updated_for_ttl_and_a_full_table_rejects_until_then() -> None:
    clock = FakeClock()
    emb = table(2, clock, eviction=EvictionConfig(kind="ttl", ttl_s=10.0))
    train(emb, 1, 2)
    clock.now = 6.0
    train(emb, 2, 3)  # full, nothing expired: 3 reads the default row
    assert held(emb) == {1, 2}
    clock.now = 10.0
    train(emb, 3)  # 1 is exactly 10 old: not yet expired
    assert held(emb) == {1, 2}
    clock.now = 10.5
    train(emb, 3)
    assert held(emb) == {2, 3}
    clock.now = 30.0
    train(emb, 3)
    assert held(emb) == {3}
    st_ = emb.statistics()
    assert (st_.evicted, st_.rejected) == (2, 2)


@pytest.mark.parametrize("optimizer", ["adagrad", "adam"])
def test_a_reused_row_starts_with_fresh_value_and_optimizer_state(optimizer) -> None:
    emb = table(1, eviction=EvictionConfig(kind="lru"))
    weight = emb.embedding.weight
    if optimizer == "adagrad":
        opt = torch.optim.Adagrad([weight], lr=0.5, initial_accumulator_value=0.1)
    else:
        opt = torch.optim.SparseAdam([weight], lr=0.5)
    emb.bind_optimizers([opt])
    for _ in range(3):
        opt.zero_grad()
        train(emb, 77)
        opt.step()
    slot = emb.keys_of(np.arange(1))[1][0]
    rows = {k: v for k, v in opt.state[weight].items() if getattr(v, "shape", 0) == weight.shape}
    assert len(rows) == (1 if optimizer == "adagrad" else 2)
    assert all(v[slot].abs().sum() > 0 for v in rows.values())
    trained = weight[slot].detach().clone()
    train(emb, 78)  # evicts 77, takes its row
    assert emb.keys_of(np.array([slot]))[0].tolist() == [78]
    for key, v in rows.items():
        want = 0.1 if key == "sum" else 0.0
        assert torch.allclose(v[slot], torch.full_like(v[slot], want)), key
    assert not torch.equal(weight[slot].detach(), trained)
    assert weight[slot].detach().abs().max() <= emb.init_bound


class TwoTables(nn.Module):
    def __init__(self, budget: int, **policies) -> None:
        super().__init__()
        self.users = DynamicEmbedding(4, DynamicEmbeddingConfig(row_budget=budget, **policies))
        self.items = nn.Embedding(10, 4, sparse=True)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return (self.users(users) * self.items(items)).sum(-1)


def step(model: TwoTables, opt, pub: EmbeddingPublisher, users, items) -> None:
    model.train()
    opt.zero_grad()
    model(torch.tensor(users), torch.tensor(items)).sum().backward()
    opt.step()
    pub.publish()


def test_publisher_writes_raw_ids_deletes_evictions_and_never_the_rejected() -> None:
    model = TwoTables(2, admission=AdmissionConfig(kind="count", threshold=2))
    opt = torch.optim.Adagrad(list(model.parameters()), lr=0.1)
    model.users.bind_optimizers([opt])
    sink = MemorySink()
    pub = EmbeddingPublisher(model, sink, PublisherConfig(table_names={"users": "u"}))
    assert pub.table_names == ["u", "items"]
    default_before = model.users.embedding.weight[2].detach().clone()
    step(model, opt, pub, [-(2**60), 5], [1, 2])
    assert sink.written_keys("u") == set()  # seen once: not admitted, nothing stored
    step(model, opt, pub, [-(2**60), 5, 9], [1, 2, 3])
    assert sink.written_keys("u") == {-(2**60), 5}
    ids, slots = model.users.live()
    rows = model.users.embedding.weight.detach()[torch.from_numpy(slots)].numpy()
    np.testing.assert_array_equal(sink.lookup("u", ids), rows)
    step(model, opt, pub, [9, 5], [4, 4])  # 9 admitted: the full table evicts the LRU row
    assert [(t, k.tolist()) for t, k in sink.deletes] == [("u", [-(2**60)])]
    assert set(sink.tables["u"]) == {5, 9}
    assert 9 in sink.written_keys("u")
    assert torch.equal(model.users.embedding.weight[2].detach(), default_before)  # zeros row
    assert pub.statistics().rows_deleted == 1


def test_publisher_refuses_a_sink_without_delete_when_a_table_evicts() -> None:
    class WriteOnly:
        def create_table(self, spec) -> None: ...

        def write(self, table, keys, values) -> None: ...

    with pytest.raises(TypeError, match=r"WriteOnly has no delete\(table, keys\)"):
        EmbeddingPublisher(TwoTables(2), WriteOnly())
    EmbeddingPublisher(TwoTables(2, eviction=EvictionConfig(kind="none")), WriteOnly())


def test_load_places_rows_up_to_the_budget_and_reports_the_rest() -> None:
    emb = table(3)
    values = np.arange(16, dtype=np.float32).reshape(4, 4)
    skipped = emb.load(np.array([HUGE, -1, 3, 4]), values)
    assert skipped == 1 and held(emb) == {HUGE, -1, 3}
    emb.eval()
    np.testing.assert_array_equal(emb(torch.tensor([-1])).detach().numpy(), values[1:2])
    with pytest.raises(ValueError, match="width 4"):
        emb.load(np.array([1]), np.zeros((1, 5), np.float32))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DynamicEmbeddingConfig(row_budget=0), "row_budget"),
        (lambda: DynamicEmbeddingConfig(row_budget=4, default_row="ones"), "default_row"),
        (lambda: EvictionConfig(kind="ttl"), "eviction.ttl_s is required"),
        (lambda: EvictionConfig(kind="fifo"), "eviction.kind"),
        (lambda: EvictionConfig(kind="lru", ttl_s=-1.0), "eviction.ttl_s"),
        (lambda: EvictionConfig(kind="rate", rate_prior_steps=0.0), "eviction.rate_prior_steps"),
        (lambda: EvictionConfig(rate_prior_steps=float("nan")), "eviction.rate_prior_steps"),
        (lambda: EvictionConfig(kind="rate", rate_patience=-1.0), "eviction.rate_patience"),
        (lambda: EvictionConfig(rate_patience=float("inf")), "eviction.rate_patience"),
    ],
)
def test_bad_config_names_the_field(build, message) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_lookups_before_a_backward_are_one_step_and_evict_nothing_the_other_read() -> None:
    emb = table(2, eviction=EvictionConfig(kind="lru"))
    train(emb, 1)
    train(emb, 2)
    first = look(emb, 1)  # the step's first lookup reads 1 ...
    second = look(emb, 3)  # ... so 3 takes 2's row, not 1's
    assert held(emb) == {1, 3}
    third = look(emb, 4)  # full and every row read in this step: 4 reads the default row
    assert held(emb) == {1, 3} and third.abs().sum() == 0
    (first.sum() + second.sum() + third.sum()).backward()
    train(emb, 4)  # a new step: 4 evicts one of the rows (both read in the last step)
    assert held(emb) in ({3, 4}, {1, 4})
    assert emb.statistics().evicted == 2


def test_a_resume_beyond_the_budget_deletes_the_rows_it_cannot_hold() -> None:
    model = TwoTables(2)
    sink = MemorySink()
    pub = EmbeddingPublisher(model, sink, PublisherConfig(table_names={"users": "u"}))
    keys = np.array([10, 11, 12], dtype=np.int64)
    assert pub.load_rows("u", keys, np.ones((3, 4), np.float32)) == 1
    pub.flush()
    assert [(t, k.tolist()) for t, k in sink.deletes] == [("u", [12])]
    assert held(model.users) == {10, 11}


def test_a_trained_default_row_learns_from_ids_without_rows_and_is_never_published() -> None:
    model = TwoTables(1, default_row="trained", eviction=EvictionConfig(kind="none"))
    opt = torch.optim.Adagrad(list(model.parameters()), lr=0.5)
    sink = MemorySink()
    pub = EmbeddingPublisher(model, sink, PublisherConfig(table_names={"users": "u"}))
    default = model.users.embedding.weight[1].detach().clone()
    step(model, opt, pub, [3, 4, 5], [1, 2, 3])  # 3 takes the one row; 4 and 5 the default
    assert not torch.equal(model.users.embedding.weight[1].detach(), default)
    assert set(sink.tables["u"]) == {3}


@settings(max_examples=80, deadline=None)
@given(
    ids=st.lists(st.integers(-3, 8), min_size=1, max_size=120),
    budget=st.integers(1, 5),
    kind=st.sampled_from(RANKED_KINDS),
    prior=st.sampled_from([0.5, 4.0, 40.0]),
    patience=st.sampled_from([0.5, 3.0]),
)
def test_one_id_a_step_evicts_exactly_as_a_reference_cache(
    ids, budget, kind, prior, patience
) -> None:
    eviction = EvictionConfig(kind=kind, rate_prior_steps=prior, rate_patience=patience)
    emb = table(budget, eviction=eviction)
    freq: dict[int, int] = {}
    seen: dict[int, int] = {}
    born: dict[int, int] = {}
    last: dict[int, int] = {}

    def rate(k: int, now: int) -> float:  # expected lookups a step, at step ``now``
        r = seen[k] / (now - born[k] + prior)
        return r * math.exp(-r * (now - last[k]) / patience)

    score = {
        "lru": lambda k, now: (last[k],),
        "lfu": lambda k, now: (freq[k], last[k]),
        "rate": lambda k, now: (rate(k, now), last[k]),
    }[kind]
    for now, key in enumerate(ids, start=1):
        if key in freq:
            freq[key] += 1
            seen[key] += 1
        if now % (10 * budget) == 0:  # LFU's aging: every 10 x budget sightings
            freq = {k: f // 2 for k, f in freq.items()}
        if key not in freq:
            if len(freq) == budget:
                victim = min(freq, key=lambda k: score(k, now))
                del freq[victim], seen[victim], born[victim], last[victim]
            freq[key] = seen[key] = 1
            born[key] = now
        last[key] = now
        train(emb, key)
        assert held(emb) == set(freq), (now, key)


def test_rate_ranks_a_faded_burst_below_a_new_id_and_a_steady_one_above_both() -> None:
    """At step 100: a steady id seen 10 times since step 0 (last at 95), a burst of 20
    sightings in steps 50..60 and silent since, a new id seen once at 99. Rate: the burst
    has stopped (40 silent steps are 9 of its gaps), the new id's rate is its one sighting
    over the prior's 40 steps, the steady id's silence is shorter than its gaps. Aged LFU
    keeps the burst over both (its count is the highest until halved away)."""
    rows = RowStats(
        touched_step=np.array([95, 60, 99]),
        freq=np.array([10, 20, 1]),
        born_step=np.array([0, 50, 99]),
        sightings=np.array([10, 20, 1]),
    )
    config = EvictionConfig(kind="rate")  # prior 40 steps, patience 3
    rate = scores("rate", rows, 100, config)
    assert rate.argsort().tolist() == [1, 2, 0]  # burst, new, steady
    r = 10 / (100 + 40)
    assert rate[0] == pytest.approx(r * math.exp(-r * 5 / 3))
    assert scores("lfu", rows, 100, config).argsort().tolist() == [2, 0, 1]
    assert victims("rate", np.array([7, 8, 9]), rows, 1, 100, config).tolist() == [8]


def test_a_deep_copy_ends_its_own_steps() -> None:
    import copy

    emb = table(1, eviction=EvictionConfig(kind="lru"))
    twin = copy.deepcopy(emb)
    train(twin, 1)
    train(twin, 2)  # the copy's step ended at its backward: 2 evicts 1
    assert held(twin) == {2} and held(emb) == set()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ttl_s", "10"),
        ("lfu_aging", True),
        ("lfu_aging", "3"),
        ("rate_prior_steps", float("inf")),
        ("rate_prior_steps", 1e-300),
        ("rate_patience", 1e-300),  # passed before and overflowed numpy in the score
        ("rate_patience", float("nan")),
        ("rate_patience", None),
    ],
)
def test_eviction_config_from_python_names_the_bad_field(field, value) -> None:
    """Built from Python (not the checked TOML), a hostile value is a ValueError naming its
    field, not a bare TypeError from a comparison, and a bool is not a number."""
    with pytest.raises(ValueError, match=f"eviction.{field}"):
        EvictionConfig(kind="rate", **{field: value})
