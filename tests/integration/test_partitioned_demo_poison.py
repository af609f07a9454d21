"""``ekko demo --partitions 2 --poison-at T``, short: the demo's own run (its loop, sharded
feed, summary, JSON and PNG) over real processes, with the guard's intervals shortened so the
whole incident fits: a serving node detects the ranks' flipped labels, the coordinator rolls
both partitions back, every holder reports digests equal to its source's, traffic returns to
online, the ranks wait out the quarantine, reload and train on, and nothing died."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w
from rich.console import Console

import ekko.demo.run as demo_run
from ekko.demo.setup import DemoSpec

pytestmark = pytest.mark.integration

# The demo's [guard] is the defaults (1 s intervals, 5 of probation, a 30 s quarantine): a run
# showing the whole incident then takes minutes. Only the timings are shortened here.
FAST_GUARD = {"interval_s": 0.5, "min_samples": 60, "probation": 2, "rollback_margin_s": 8.0,
              "quarantine_s": 5.0, "restore_timeout_s": 5.0}  # fmt: skip
HOLDERS = {"dc1-p0-r0", "dc1-p1-r0", "dc2-p0-r0", "dc2-p1-r0"}


def _fast_guard(spec: DemoSpec, workdir: Path) -> Path:
    path = demo_run_config(spec, workdir)
    doc = tomllib.loads(path.read_text())
    assert doc["guard"] == {"enabled": True}  # the demo turns the guard on
    doc["guard"] |= FAST_GUARD
    path.write_text(tomli_w.dumps(doc))
    return path


demo_run_config = demo_run.cluster_config


def test_a_short_partitioned_poison_demo_is_caught_rolled_back_and_trains_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo_run, "cluster_config", _fast_guard)
    spec = DemoSpec(duration_s=22.0, wan_delay_ms=(5.0, 10.0), rows_per_table=2_000,
                    interval_s=2.0, warmup_events=3_000, baseline_lag_s=5.0,
                    poison_at_s=5.0, poison_for_s=6.0, partitions=2)  # fmt: skip
    out = tmp_path / "demo.json"
    doc = demo_run.run_demo(
        spec, tmp_path / "w", json_path=out, console=Console(file=(tmp_path / "log").open("w"))
    )
    summary = doc["summary"]
    assert summary["poisoned_events"] > 0
    start = summary["poison_started_at"]
    incidents = [i for i in summary["guard"]["incidents"] if i["decided_at"] >= start]
    assert incidents, summary["guard"]["transitions"]
    first = incidents[0]
    assert first["automatic"] and first["detected_by"] in HOLDERS, first
    trained = summary["poison_trained_at"]  # the ranks' queues lag the loop's flip
    assert trained is not None and trained >= start
    assert first["checkpoint_at"] < trained  # rolled back to before the poison
    assert first["detected_at"] > trained
    assert "failed_sources" not in first and first["rows_restored"] > 0
    assert set(first["sources"]) == {"source-p0", "source-p1"}
    assert all(s["rows_restored"] > 0 for s in first["sources"].values()), first["sources"]
    assert set(first["restored"]) == HOLDERS  # every holder reported its digests ...
    assert first["replica_table_mismatches"] == {} and first["good_rows_lost"] == 0  # ... equal
    for name, guard in summary["replica_guards"].items():
        assert guard["redirects"] and not guard["redirected"], (name, guard)  # back on online
    ranks = summary["trainer_quarantine"]
    assert set(ranks) == {"0", "1"}, ranks
    for q in ranks.values():  # both paused through the rollback, reloaded, and train on
        assert q["epoch"] == first["epoch"] and q["batches_dropped"] > 0 and q["reloads"] >= 1
        assert q["reload_failures"] == 0 and not q["paused"], q
    marks = summary["marks"]
    assert marks["detected"] and marks["restored"] and marks["training_resumes"], marks
    phases = summary["auc_phases"]
    assert phases is not None and phases["before"] is not None, phases
    assert "; incident: detected at" in summary["incident_line"], summary["incident_line"]
    assert summary["train_refused_batches"] == 0
    assert all(code in (0, -15) for code in doc["node_exit_codes"].values()), doc
    assert summary["trainer_failed"] is None  # no rank died
    assert out.with_suffix(".png").stat().st_size > 10_000
