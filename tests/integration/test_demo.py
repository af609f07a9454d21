"""``ekko demo --duration 10 --json``: the whole loop across processes, end to end."""

from __future__ import annotations

from pathlib import Path

from demo_cli import run_demo_process


def test_demo_serves_fresh_models_in_every_dc(tmp_path: Path) -> None:
    doc, proc = run_demo_process(tmp_path, "--duration", "10", timeout=300)
    summary = doc["summary"]
    assert [d["dc"] for d in summary["per_dc"]] == ["dc1", "dc2", "dc3"]
    trainer = summary["trainer_auc"]
    assert trainer > 0.6  # the model learns the synthetic stream
    for d in summary["per_dc"]:
        assert d["update_p50_ms"] is not None and d["update_p99_ms"] is not None
        assert d["update_p50_ms"] >= d["one_way_delay_ms"]  # the WAN delay is the floor
        assert d["rows_applied"] > 0
        assert abs(d["auc"] - trainer) < 0.02, (d, trainer)
    assert summary["checkpoint_auc"] is not None
    assert summary["events"] > 0 and summary["train_refused_batches"] == 0
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert all(code in (0, -15) for code in doc["node_exit_codes"].values())
    # the terminal gets progress (a line per interval, stderr not being one) and the
    # summary with whole names; the JSON goes to its file only
    assert proc.stdout.lstrip().startswith("ekko demo summary"), proc.stdout[:300]
    assert "{" not in proc.stdout and "dc3/dc3-r0" in proc.stdout
    assert "incidents: none" in proc.stdout and summary["incident_line"] is None
    progress = [line for line in proc.stderr.splitlines() if line.startswith("t ")]
    assert len(progress) >= 2 and "dc3-r0 p99" in progress[-1], proc.stderr[-2000:]
    assert summary["checkpoint_every_s"] == 10.0 and summary["checkpoint_loads"] >= 1
