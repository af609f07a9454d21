"""Health state machine, its durable transition log and generated diagram (DESIGN §6)."""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path

import pytest

from ekko.guard.diagram import DEFAULT_PNG, edges, render_png, to_dot
from ekko.guard.errors import GuardStateError, TransitionLogError
from ekko.guard.log import TransitionLog
from ekko.guard.state import (
    TRANSITIONS,
    Event,
    ModelHealth,
    State,
    Transition,
    event_for_level,
)

# How to reach each state from a fresh machine.
PATH_TO = {
    State.HEALTHY: [],
    State.UNCERTAIN: [Event.SCORE_HIGH],
    State.CORRUPTED: [Event.SCORE_CRITICAL],
    State.RECOVERING: [Event.SCORE_CRITICAL, Event.ROLLBACK_DONE],
}


class FakeWall:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def machine_in(state: State, probation: int = 3) -> ModelHealth:
    m = ModelHealth("ctr", probation=probation, wall_clock=FakeWall())
    for i, ev in enumerate(PATH_TO[state]):
        m.handle(ev, now=float(i), why="setup")
    assert m.state is state
    return m


@pytest.mark.parametrize(("src", "event"), list(TRANSITIONS))
def test_every_legal_move_follows_the_table(src: State, event: Event) -> None:
    m = machine_in(src, probation=99)
    before = len(m.history)
    t = m.handle(event, now=100.0, why="test", metrics={"x": 1.0})
    dst = TRANSITIONS[(src, event)]
    assert m.state is dst
    if dst is src:
        assert t is None and len(m.history) == before
    else:
        assert t is not None and m.history[-1] is t
        assert (t.model, t.from_state, t.to_state, t.event) == ("ctr", src, dst, event)
        assert (t.mono, t.why, t.metrics) == (100.0, "test", {"x": 1.0})


ILLEGAL = [(s, e) for s, e in itertools.product(State, Event) if (s, e) not in TRANSITIONS]


@pytest.mark.parametrize(("src", "event"), ILLEGAL)
def test_illegal_events_raise_naming_state_and_event(src: State, event: Event) -> None:
    m = machine_in(src)
    with pytest.raises(GuardStateError) as info:
        m.handle(event, now=1.0)
    assert f"{event.value!r}" in str(info.value) and f"{src.value!r}" in str(info.value)
    assert (info.value.state, info.value.event) == (src.value, event.value)
    assert m.state is src


def test_illegal_events_exist_for_each_safety_rule() -> None:
    assert (State.HEALTHY, Event.ROLLBACK_DONE) in ILLEGAL
    assert (State.CORRUPTED, Event.RECOVERED) in ILLEGAL  # no healthy without a rollback
    assert (State.UNCERTAIN, Event.RECOVERED) in ILLEGAL


def test_unknown_event_name_raises() -> None:
    with pytest.raises(GuardStateError, match="'explode'"):
        ModelHealth("ctr").handle("explode", now=0.0)


def test_full_incident_cycle_is_recorded() -> None:
    wall = FakeWall()
    m = ModelHealth("ctr", probation=2, wall_clock=wall)
    steps = [
        ("score_high", State.UNCERTAIN),
        ("score_normal", State.HEALTHY),
        ("score_high", State.UNCERTAIN),
        ("score_critical", State.CORRUPTED),
        ("score_normal", State.CORRUPTED),
        ("rollback_done", State.RECOVERING),
        ("score_normal", State.RECOVERING),
        ("score_high", State.RECOVERING),
        ("score_normal", State.RECOVERING),
        ("score_normal", State.HEALTHY),
    ]
    for i, (ev, expect) in enumerate(steps):
        m.handle(ev, now=10.0 * i, why=f"step {i}", metrics={"score": float(i)})
        assert m.state is expect, (i, ev)
    events = [t.event for t in m.history]
    assert events == [
        Event.SCORE_HIGH,
        Event.SCORE_NORMAL,
        Event.SCORE_HIGH,
        Event.SCORE_CRITICAL,
        Event.ROLLBACK_DONE,
        Event.RECOVERED,
    ]
    last = m.history[-1]
    assert last.why.startswith("2 normal intervals after rollback")  # streak reset by high
    assert [t.at for t in m.history] == sorted(t.at for t in m.history)


def test_recovering_model_that_goes_bad_again_is_corrupted() -> None:
    m = machine_in(State.RECOVERING)
    t = m.handle(Event.SCORE_CRITICAL, now=5.0, why="still bad")
    assert t is not None and t.to_state is State.CORRUPTED
    assert m.serve_from_baseline and m.updates_paused


def test_operator_rollback_from_healthy() -> None:
    m = machine_in(State.HEALTHY)
    t = m.handle("operator_rollback", now=1.0, why="operator alice: bad label join")
    assert t is not None and t.to_state is State.CORRUPTED


def test_detector_levels_map_to_events() -> None:
    assert [event_for_level(x) for x in ("healthy", "uncertain", "corrupted")] == [
        Event.SCORE_NORMAL,
        Event.SCORE_HIGH,
        Event.SCORE_CRITICAL,
    ]


def test_transition_is_frozen_and_serialises_nan_as_null() -> None:
    t = Transition(
        "ctr",
        State.HEALTHY,
        State.CORRUPTED,
        Event.SCORE_CRITICAL,
        1.0,
        2.0,
        "why",
        {"auc": math.nan, "ll": 0.3},
    )
    with pytest.raises(AttributeError):
        t.why = "other"  # type: ignore[misc]
    d = t.to_dict()
    assert d["metrics"] == {"auc": None, "ll": 0.3}
    assert (d["from"], d["to"], d["event"]) == ("healthy", "corrupted", "score_critical")
    json.dumps(d, allow_nan=False)


# -- durable log ----------------------------------------------------------------------------


def incident(tmp_path: Path) -> tuple[Path, list[Transition]]:
    path = tmp_path / "guard" / "transitions.jsonl"
    path.parent.mkdir()
    m = ModelHealth("ctr", probation=1, wall_clock=FakeWall())
    with TransitionLog(path) as log:
        for i, ev in enumerate(["score_high", "score_critical", "rollback_done", "score_normal"]):
            t = m.handle(ev, now=float(i), why=f"step {i}", metrics={"auc": 0.7, "x": math.inf})
            assert t is not None
            log.append(t)
    return path, m.history


def test_log_round_trips_every_transition(tmp_path: Path) -> None:
    path, history = incident(tmp_path)
    assert TransitionLog.read(path) == [t.to_dict() for t in history]
    assert path.read_bytes().count(b"\n") == len(history)


def test_log_survives_a_torn_last_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, history = incident(tmp_path)
    whole = path.read_bytes()
    last_start = whole.rstrip(b"\n").rfind(b"\n") + 1
    for cut in (last_start + 1, last_start + 20, len(whole) - 1):  # crash mid-write
        path.write_bytes(whole[:cut])
        with caplog.at_level(logging.WARNING, logger="ekko.guard.log"):
            records = TransitionLog.read(path)
        assert records == [t.to_dict() for t in history[:-1]]
        assert "torn last line" in caplog.text
        caplog.clear()


def test_reopening_after_a_crash_repairs_the_tail_before_appending(tmp_path: Path) -> None:
    path, history = incident(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])
    with TransitionLog(path) as log:
        log.append(history[-1])
    assert TransitionLog.read(path) == [t.to_dict() for t in history]


def test_damage_before_the_last_line_is_an_error(tmp_path: Path) -> None:
    path, _ = incident(tmp_path)
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:10]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(TransitionLogError, match="line 2"):
        TransitionLog.read(path)


def test_reading_a_missing_log_gives_nothing(tmp_path: Path) -> None:
    assert TransitionLog.read(tmp_path / "none.jsonl") == []


def test_closed_log_refuses_appends(tmp_path: Path) -> None:
    log = TransitionLog(tmp_path / "t.jsonl")
    log.close()
    with pytest.raises(TransitionLogError, match="closed"):
        log.append({"x": 1})


# -- generated diagram ----------------------------------------------------------------------


def test_dot_has_every_table_edge() -> None:
    dot = to_dot()
    for (src, dst), evs in edges().items():
        line = next(ln for ln in dot.splitlines() if f'"{src}" -> "{dst}"' in ln)
        assert all(str(e) in line for e in evs)
    assert sum(len(v) for v in edges().values()) == len(TRANSITIONS)


def test_png_renders_from_the_table(tmp_path: Path) -> None:
    out = render_png(tmp_path / "states.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert DEFAULT_PNG.parent.name == "docs" and DEFAULT_PNG.name == "guard_states.png"
