"""``ekko bench latency``'s alternated blocks: ``--tls both`` (like ``--wal both``) runs on and
off blocks in alternating order, summarises each mode apart and states the difference."""

from __future__ import annotations

import pytest

from ekko.bench import latency
from ekko.bench.cluster_run import RunSpec


def _fake_run(specs: list[RunSpec]):
    def run_cluster(spec: RunSpec, progress=None) -> dict:
        specs.append(spec)
        extra = 5.0 if spec.tls else 0.0  # TLS on: 5 ms more at every DC
        return {
            "per_dc": [
                {"dc": f"dc{i}", "one_way_delay_ms": d, "p50_ms": d + 1 + extra,
                 "p99_ms": d + 3 + extra, "followers_p99_ms": d + 4 + extra}
                for i, d in enumerate((25.0, 50.0))
            ],
            "source_cpu_s": 1.2 if spec.tls else 1.0,
            "measure_s": 6.0, "rate_rows_per_s": 1000.0, "machine_cpu_percent": 50.0,
            "catch_up_s": 0.0,
        }  # fmt: skip

    return run_cluster


def test_tls_both_alternates_blocks_and_summarises_each_mode(monkeypatch) -> None:
    specs: list[RunSpec] = []
    monkeypatch.setattr(latency, "run_cluster", _fake_run(specs))
    monkeypatch.setattr(latency, "write_result", lambda *a, **k: None)
    summary = latency.run(quick=True, tls="both", rate=1000.0)["summary"]
    assert [s.tls for s in specs] == [True, False, False, True]
    assert all(dict(s.durability) == {"wal": True} for s in specs)  # the wal stays on
    assert summary["tls"] == "on" and summary["wal"] == "on"
    assert (
        summary["per_dc"][0]["p99_ms"] == 33.0 and summary["tls_off"]["per_dc"][0]["p99_ms"] == 28.0
    )
    assert summary["p99_ms_tls_on_minus_off_max"] == 5.0
    assert summary["p50_ms_tls_on_minus_off_max"] == 5.0
    assert summary["source_cpu_s_tls_on_over_off"] == pytest.approx(1.2)


def test_one_comparison_at_a_time(monkeypatch) -> None:
    with pytest.raises(ValueError, match="wal or tls may be both"):
        latency.run(quick=True, tls="both", wal="both")
    with pytest.raises(ValueError, match="tls must be on, off or both"):
        latency.run(quick=True, tls="yes")


def test_wal_both_keeps_its_summary_with_tls_off(monkeypatch) -> None:
    specs: list[RunSpec] = []
    monkeypatch.setattr(latency, "run_cluster", _fake_run(specs))
    monkeypatch.setattr(latency, "write_result", lambda *a, **k: None)
    summary = latency.run(quick=True, wal="both", rate=1000.0)["summary"]
    assert [dict(s.durability)["wal"] for s in specs] == [True, False, False, True]
    assert not any(s.tls for s in specs)
    assert summary["wal"] == "on" and summary["tls"] == "off" and "wal_off" in summary
    assert summary["p99_ms_wal_on_minus_off_max"] == 0.0
