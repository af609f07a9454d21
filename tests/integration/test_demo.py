"""``ekko demo --duration 10 --json``: the whole loop across processes, end to end."""

from __future__ import annotations

from pathlib import Path

from demo_cli import run_demo


def test_demo_serves_fresh_models_in_every_dc(tmp_path: Path) -> None:
    doc = run_demo(tmp_path, "--duration", "10", timeout=300)
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
