"""The nemesis harness's short form (issue 15, "Fault injection"): the default chaos cluster
(real ``ekko node`` processes, a source and two DCs of a leader and a follower) under
acknowledged writes and online training with the guard on, while two rounds of every fault
kind are injected: kills of the source and replicas with and without their data, pauses,
partitions both ways and one way, delay and bandwidth spikes, clock jumps, a full disk at the
source, a replica restored from an early copy. The checker must pass: no acknowledged write
lost, every replica converged, no unplanned exit, no stale read on a connected path, no
guard alarm, the full disk reported and recovered from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ekko.ops.chaos import ChaosSettings, FaultKind, harness, run_chaos
from ekko.ops.chaos.schedule import TIMINGS

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the full-disk fault mounts a tmpfs (root)"),
]

SHORT = TIMINGS["short"]  # replay: ekko chaos --seed 15 --rounds 2 --timing short


def test_two_rounds_of_every_fault_kind_pass_the_checker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = ChaosSettings(seed=15, duration_s=None, rounds=2, timing=SHORT, warmup_s=2.0)
    monkeypatch.setattr(harness, "PROGRESS_S", 2.0)
    said: list[str] = []
    history, verdict = run_chaos(settings, tmp_path, say=said.append)
    assert verdict.ok, "\n".join(verdict.failures) + f"\nseed 15, history {tmp_path}"
    assert history.settings["injected"] == {k.value: 2 for k in FaultKind}
    s = verdict.summary
    assert s["writes_acked"] > 50 and s["acked_lost"] == 0
    assert s["unplanned_crashes"] == 0 and s["false_alarms"] == 0
    assert s["converge_s_max"] is not None
    # the source lost its disk once: recovered from its replicas, writes excused only if
    # on no replica when it died
    assert len(history.wipes) == 1
    assert all(d["reported"] and d["recovered_s"] is not None for d in history.disk)
    assert history.settings["clients"]["train_batches"] > 0
    # a run says how far it is as it goes (a log file shows it moving), not only at the end
    progress = [line for line in said if "faults injected" in line]
    assert len(progress) >= 3 and progress[0] != progress[-1], said
