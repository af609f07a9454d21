"""``ekko sim`` (issue 15, "Deterministic simulation"): CI's seeds keep the invariant and
exercise every codec, lane, restart kind and the full-scan path; a planted defect is caught
and replays from its seed; a seed is a deterministic run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from msgspec.structs import replace
from typer.testing import CliRunner

from ekko.cli import app
from ekko.protocol import chunk_collector as collector_module
from ekko.protocol import puller_apply as apply_module
from ekko.protocol.messages import Chunk
from ekko.sim import RESTART_KINDS, Summary, draw_scenario, run_seed, run_seeds
from ekko.sim.scenario import LINK_CODECS
from ekko.store.spec import LANES

CI_SEEDS = range(int(os.environ.get("EKKO_SIM_SEEDS", "200")))


@pytest.fixture(scope="module")
def ci_run() -> Summary:
    return run_seeds(CI_SEEDS)


def test_ci_seeds_converge(ci_run: Summary) -> None:
    """After writes stop and links heal, every replica equals the source, and no replica's
    knowledge ever claims a row it lacks, in every seed."""
    assert ci_run.seeds == len(CI_SEEDS)
    assert not ci_run.failures, "\n".join(f.report() for f in ci_run.failures)


def test_ci_seeds_cover_every_feature(ci_run: Summary) -> None:
    """Every codec (and plain links), every lane, each restart kind, the full-scan path,
    answers racing and losing to their timeouts, held rows, a lineage change all occur."""
    seen = ci_run.coverage
    wanted = (
        [f"codec:{c or 'plain'}" for c in LINK_CODECS]
        + [f"lane:{lane}" for lane in LANES]
        + [f"restart:{kind}" for kind in RESTART_KINDS]
        + ["full_scan", "late_answer", "racing_answer", "duplicate_answer", "held"]
        + ["cut", "one_way", "failover", "dropped", "gap", "lineage_change", "rebuild"]
        + ["paced", "restore", "table_created_late", "delete"]
    )
    assert not [w for w in wanted if seen[w] == 0], seen


def test_a_seed_is_a_deterministic_run() -> None:
    """Same seed, same events at the same simulated times, same stores."""
    seed = next(s for s in range(100) if draw_scenario(s).rates.restart_source > 0)
    first, second = run_seed(seed), run_seed(seed)
    assert first.ok and second.ok
    assert first.trace_hash == second.trace_hash
    assert first.features == second.features
    other = run_seed(seed + 1)
    assert other.trace_hash != first.trace_hash


def test_a_seed_replays_the_same_in_another_process() -> None:
    """No per-process state (string hashing, global generators) leaks into a run."""
    result = run_seed(3)
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-m", "ekko", "sim", "--replay", "3"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert f"trace {result.trace_hash}," in out.stdout


def _puller_drops_last_row(monkeypatch) -> None:
    """Planted: the puller stores every row of a chunk but its last."""
    decode = apply_module.decode_chunk

    def decode_chunk(chunk: Chunk, dim: int) -> Chunk:
        c = decode(chunk, dim)
        if c.rows < 2:
            return c
        return Chunk(
            c.table, c.lane, c.shards, c.bases, c.knowledge, c.counts, c.keys[:-1],
            c.values[:-1], c.versions[:-1], c.wtimes[:-1], c.origin,
        )  # fmt: skip

    monkeypatch.setattr(apply_module, "decode_chunk", decode_chunk)


def _responder_skips_a_row(monkeypatch) -> None:
    """Planted: the responder leaves the first row of a chunk out (its knowledge still
    covers it)."""
    collect = collector_module.collect_chunk

    def collect_chunk(*args, **kwargs):
        chunk, truncated = collect(*args, **kwargs)
        if chunk is None or chunk.rows < 2:
            return chunk, truncated
        counts = chunk.counts.copy()
        counts[np.flatnonzero(counts)[0]] -= 1
        return replace(
            chunk, counts=counts, keys=chunk.keys[1:], values=chunk.values[1:],
            versions=chunk.versions[1:], wtimes=chunk.wtimes[1:],
        ), truncated  # fmt: skip

    monkeypatch.setattr(collector_module, "collect_chunk", collect_chunk)


@pytest.mark.parametrize("plant", [_puller_drops_last_row, _responder_skips_a_row])
def test_a_planted_defect_is_caught_and_its_seed_replays_it(plant, monkeypatch) -> None:
    plant(monkeypatch)
    summary = run_seeds(range(1, 6))
    assert summary.failures, "the sim missed a lost row"
    failed = summary.failures[0]
    report = failed.report()
    assert f"seed {failed.seed} FAILED" in report
    assert f"ekko sim --replay {failed.seed} -v" in report
    assert any(" key " in d for d in failed.details), report  # the first differing rows
    again = run_seed(failed.seed)
    assert (again.reason, again.details, again.trace_hash) == (
        failed.reason,
        failed.details,
        failed.trace_hash,
    )


def test_cli_writes_the_summary_and_exits_1_on_a_failure(tmp_path, monkeypatch) -> None:
    out = tmp_path / "sim.json"
    runner = CliRunner()
    ok = runner.invoke(app, ["sim", "--seeds", "3", "--start", "5", "--json", str(out)])
    assert ok.exit_code == 0, ok.output
    doc = json.loads(out.read_text())
    assert doc["seeds"] == 3 and doc["start"] == 5 and doc["failures"] == []
    assert doc["elapsed_s"] > 0 and doc["coverage"]["lane:0"] >= 1
    _puller_drops_last_row(monkeypatch)
    bad = runner.invoke(app, ["sim", "--seeds", "4", "--json", str(out)])
    assert bad.exit_code == 1
    failures = json.loads(out.read_text())["failures"]
    assert failures and all(f["replay"] == f"ekko sim --replay {f['seed']} -v" for f in failures)
    replay = runner.invoke(app, ["sim", "--replay", str(failures[0]["seed"])])
    assert replay.exit_code == 1 and "FAILED" in replay.output
    refused = runner.invoke(app, ["sim", "--start", "-1"])
    assert refused.exit_code == 2 and "seeds are >= 0" in refused.output


def test_scenarios_draw_every_choice_from_the_seed() -> None:
    """The same seed draws the same scenario; seeds differ; the link codecs, lanes and
    restart kinds drawn over a few hundred seeds span their definitions."""
    assert draw_scenario(42) == draw_scenario(42)
    assert draw_scenario(42) != draw_scenario(43)
    codecs = Counter(link.codec for s in range(200) for link in draw_scenario(s).links)
    assert set(codecs) == set(LINK_CODECS)
    lanes = {
        draw_scenario(s).scheduler.release_lane for s in range(200) if draw_scenario(s).scheduler
    }
    assert lanes == set(LANES)
    assert np.isfinite(draw_scenario(0).duration_s)
