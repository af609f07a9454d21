"""The nemesis's schedule: the same seed gives the same faults, every kind of the enum is
drawn as often as every other, and the rules that keep the checker's contract sound hold
(one fault per node or link at a time, the source's disk loss alone after a quiet spell)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.ops.chaos.schedule import (
    LINK_KINDS,
    MAX_FAULTS,
    RESTARTING_KINDS,
    FaultKind,
    ScheduleError,
    Timing,
    Topology,
    counts,
    generate,
)

TOPO = Topology(
    "source",
    ("dc1-r0", "dc1-r1", "dc2-r0"),
    (("dc1-r0", "source"), ("dc1-r0", "dc1-r1"), ("dc1-r1", "source"), ("dc2-r0", "source")),
)


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    a = [f.as_json() for f in generate(7, TOPO, rounds=5)]
    b = [f.as_json() for f in generate(7, TOPO, rounds=5)]
    c = [f.as_json() for f in generate(8, TOPO, rounds=5)]
    assert a == b
    assert a != c


@given(seed=st.integers(0, 2**32), rounds=st.integers(1, 12))
@settings(max_examples=40, deadline=None)
def test_every_kind_of_the_enum_is_drawn_once_per_round(seed: int, rounds: int) -> None:
    faults = generate(seed, TOPO, rounds=rounds)
    assert counts(faults) == {k.value: rounds for k in FaultKind}
    assert [f.id for f in faults] == list(range(len(faults)))
    assert all(a.at <= b.at for a, b in itertools.pairwise(faults))


@given(seed=st.integers(0, 2**32))
@settings(max_examples=40, deadline=None)
def test_targets_fit_their_kind_and_one_fault_holds_a_target_at_a_time(seed: int) -> None:
    timing = Timing()
    faults = generate(seed, TOPO, rounds=8, timing=timing)
    links = {"|".join(sorted(p)) for p in TOPO.links}
    free_at: dict[str, float] = {}
    for f in faults:
        if f.kind in LINK_KINDS:
            assert f.target in links
        elif f.kind is FaultKind.DISK_FULL:
            assert f.target == "source"
        elif f.kind is FaultKind.OLD_SNAPSHOT:
            assert f.target in TOPO.replicas
        else:
            assert f.target in TOPO.nodes
        assert f.at >= free_at.get(f.target, 0.0) - 1e-6, f
        extra = timing.restart_allowance_s if f.kind in RESTARTING_KINDS else 0.0
        free_at[f.target] = f.end + extra


@given(seed=st.integers(0, 2**32))
@settings(max_examples=40, deadline=None)
def test_the_source_loses_its_disk_alone_after_a_quiet_spell(seed: int) -> None:
    timing = Timing()
    faults = generate(seed, TOPO, rounds=9, timing=timing)
    wipes = [f for f in faults if f.exclusive]
    assert wipes and all(f.kind is FaultKind.KILL_WIPE and f.target == "source" for f in wipes)
    for w in wipes:
        alone_until = w.end + timing.restart_allowance_s
        for f in faults:
            if f is w:
                continue
            extra = timing.restart_allowance_s if f.kind in RESTARTING_KINDS else 0.0
            if f.at < w.at:
                assert f.end + extra + timing.settle_s <= w.at + 1e-6, (f, w)
            else:
                assert f.at >= alone_until - 1e-6, (f, w)


def test_kills_hit_the_source_first_and_every_third_time() -> None:
    faults = generate(3, TOPO, rounds=9)
    for kind in (FaultKind.KILL, FaultKind.KILL_WIPE):
        targets = [f.target for f in faults if f.kind is kind]
        assert [t for i, t in enumerate(targets) if i % 3 == 0] == ["source"] * 3
        assert all(t in TOPO.replicas for i, t in enumerate(targets) if i % 3)


def test_a_duration_ends_the_schedule_and_params_are_in_their_ranges() -> None:
    timing = Timing()
    faults = generate(11, TOPO, duration_s=120.0, timing=timing)
    assert faults and all(f.at <= 120.0 for f in faults)
    for f in faults:
        p = f.params
        if f.kind is FaultKind.DELAY:
            assert timing.delay_ms[0] <= p["delay_ms"] <= timing.delay_ms[1]
        elif f.kind is FaultKind.BANDWIDTH:
            assert (
                timing.rate_kbyte_s[0] * 1000 <= p["rate_bytes_s"] <= timing.rate_kbyte_s[1] * 1000
            )
        elif f.kind is FaultKind.CLOCK_JUMP:
            assert timing.clock_jump_s[0] <= abs(p["jump_s"]) <= timing.clock_jump_s[1]
        elif f.kind is FaultKind.PARTITION_ONE_WAY:
            assert p["drop"] in ("forward", "backward")


def test_a_schedule_needs_a_limit_and_a_topology_with_links() -> None:
    import pytest

    with pytest.raises(ValueError, match="duration_s or rounds"):
        generate(0, TOPO)
    with pytest.raises(ValueError, match="replicas and links"):
        generate(0, Topology("source", (), ()), rounds=1)


def test_quiet_spells_come_as_often_as_asked() -> None:
    timing = Timing(quiet_every_s=20.0, quiet_s=8.0)
    faults = generate(4, TOPO, rounds=10, timing=timing)
    busy_until, quiet, last_quiet = 0.0, 0, 0.0
    for f in faults:
        if f.at - busy_until >= timing.quiet_s - 1e-6:
            quiet += 1
            last_quiet = f.at
        assert f.at - last_quiet <= timing.quiet_every_s + timing.quiet_s + 30.0
        extra = timing.restart_allowance_s if f.kind in RESTARTING_KINDS else 0.0
        busy_until = max(busy_until, f.end + extra)
    assert quiet >= faults[-1].at // (timing.quiet_every_s + 30.0)


def test_every_named_pace_draws_every_kind() -> None:
    from ekko.ops.chaos.schedule import TIMINGS

    assert set(TIMINGS) == {"default", "bench", "short"}
    for timing in TIMINGS.values():
        assert counts(generate(2, TOPO, rounds=1, timing=timing)) == {k.value: 1 for k in FaultKind}


@pytest.mark.parametrize(
    ("limits", "named"),
    [
        ({"duration_s": math.nan}, "duration: a finite number of seconds > 0, got nan"),
        ({"duration_s": math.inf}, "duration: a finite number of seconds > 0, got inf"),
        ({"duration_s": 0.0}, "duration: a finite number of seconds > 0, got 0"),
        ({"duration_s": -5.0}, "duration: a finite number of seconds > 0, got -5"),
        ({"rounds": 0}, "rounds: at least 1, got 0"),
        ({"rounds": -1}, "rounds: at least 1, got -1"),
        ({"duration_s": 1e12}, f"more than {MAX_FAULTS} faults"),
        ({"rounds": 10**9}, f"more than {MAX_FAULTS} faults"),
    ],
)
def test_a_limit_that_never_ends_or_plans_nothing_is_named(limits: dict, named: str) -> None:
    """nan and inf never ended the drawing loop (memory grew until killed), 0 and negative
    durations ran a cluster with no fault and passed, a huge one drew faults forever."""
    with pytest.raises(ScheduleError) as err:
        generate(0, TOPO, **limits)
    assert named in str(err.value)


def test_the_cli_names_a_bad_limit_before_starting_anything(tmp_path) -> None:
    from typer.testing import CliRunner

    from ekko.cli import app

    bad = {
        ("--duration", "nan"): "--duration: a finite",
        ("--duration", "-5"): "--duration: a finite",
        ("--rounds", "0"): "--rounds: at least 1",
        ("--seed", "-1"): "--seed: 0 or more, got -1",  # started the cluster, then raised
    }
    for args, named in bad.items():
        out = CliRunner().invoke(app, ["chaos", *args, "--workdir", str(tmp_path / "w")])
        assert out.exit_code == 2, out.output
        assert named in " ".join(out.output.split()), out.output
        assert not (tmp_path / "w").exists()  # no config written, no node started
