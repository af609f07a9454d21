"""A poison in the first minute, across processes (issue 13 §3): ``ekko demo --duration 45
--poison-at 15``. Before the fix the detector was still warming up at 15 s, learned the
poisoned gap as normal, and no incident followed (interval AUC 0.26-0.38, guard column
"healthy 0.0"). Now the floor against the baseline catches it within seconds, the rollback is
automatic and says why, and every replica's guard says what it can judge."""

from __future__ import annotations

from pathlib import Path

from demo_cli import run_demo


def test_a_poison_at_15_s_is_detected_and_rolled_back_automatically(tmp_path: Path) -> None:
    doc = run_demo(tmp_path, "--duration", "45", "--poison-at", "15", timeout=400)
    summary = doc["summary"]
    guard = summary["guard"]
    start = summary["poison_started_at"]
    assert summary["poisoned_events"] > 0 and start is not None
    incidents = [i for i in [*guard["incidents"], guard["incident"]] if i]
    assert incidents, f"no rollback after the poison: {guard['transitions']}"
    first = incidents[0]
    assert first["decided_at"] >= start
    assert first["decided_at"] - start < 10.0, first["decided_at"] - start
    assert first["automatic"] is True and first["why"].startswith("automatic rollback")
    assert "online - baseline -" in first["why"]  # AUC fell: the difference is negative
    assert first["checkpoint_at"] < start and first["rows_restored"] > 0
    assert guard["transitions"][0]["event"] == "automatic_rollback"
    # the summary says it in a line, the plot marks it (seconds of the run)
    line = summary["incident_line"]
    assert line.startswith("poisoned training 1") and "; incident: detected at " in line, line
    marks = summary["marks"]
    assert marks["poison"][0] >= 15.0 and len(marks["rolled_back"]) >= 1
    assert marks["rolled_back"][0] >= marks["poison"][0]
    assert len(marks["checkpoint_loads"]) >= 2  # a copy every 11 s: the sawtooth shows
    for name, h in summary["replica_guards"].items():
        assert h["judging"] in ("warming_up", "judging"), (name, h["judgement"])
        assert any(t >= first["decided_at"] - 1 for t in h["redirects"]), name
        events = {t["event"] for t in h["transitions"]}
        assert "operator_rollback" not in events, (name, events)
        if h["state"] == "recovering":  # quality not back yet: the guard says so
            assert h["recovery"]["ok"] is not True, h["recovery"]
            assert "quality has not returned" in h["why"] or not h["recovery"]["online_auc"]
        else:
            assert h["state"] == "healthy" and h["recovery"]["ok"] is True, h["recovery"]
    # while the poisoned model was being replaced, users were served by the baseline: no
    # interval after the decision falls to the poisoned level
    decided_t = first["decided_at"] - start + 15.0
    after = [p for p in doc["timeline"] if p["t"] > decided_t + 5.0]
    assert after and all(
        auc > 0.6 for p in after for n, auc in p["auc"].items() if n != "ckpt-r0" and auc
    ), after
