"""The chaos checker judges a history: a clean one passes; a planted lost write, a
diverged replica, a stale read on a path free of faults, a crash, a guard alarm or an
unreported full disk each fail it, named; what the contract excuses does not."""

from __future__ import annotations

from pathlib import Path

from ekko.ops.chaos.checker import check
from ekko.ops.chaos.history import AckedWrite, History

PATH = ["dc1-r0", "dc1-r0|source", "source"]


def _clean() -> History:
    h = History(seed=5)
    h.settings = {"source": "source", "replicas": ["dc1-r0"]}
    h.writes = [
        AckedWrite(1.0, 0, 1, [10, 11], [3, 4]),
        AckedWrite(2.0, 0, 2, [10, 12], [7, 8]),
        AckedWrite(2.5, 1, 1, [5000], [2]),
    ]
    # key -> [version, write n, writer]: each key's last acknowledged write
    h.final = {
        "source_rows": {"10": [7, 2, 0], "11": [4, 1, 0], "12": [8, 2, 0], "5000": [2, 1, 1]},
        "digests": {"source": {"kv": "ab"}, "dc1-r0": {"kv": "ab"}},
        "converge_s": {"dc1-r0": 0.4},
    }
    h.convergence = [
        {"fault": 0, "kind": "kill", "target": "source", "replica": "dc1-r0", "heal_t": 3.0,
         "seconds": 1.5, "outcome": "converged", "path": PATH},
    ]  # fmt: skip
    h.reads = [_read(t=9.0, acked_at=2.0, behind=0)]
    h.disk = [{"fault": 1, "reported": True, "said": "wal", "recovered_s": 2.0}]
    return h


def _read(t: float, acked_at: float, behind: int) -> dict:
    return {"replica": "dc1-r0", "t": t, "t_end": t + 0.01, "acked_at": acked_at,
            "write": "0/2", "behind": behind, "bound_s": 1.0, "path": PATH}  # fmt: skip


def test_a_clean_history_passes_with_its_figures() -> None:
    v = check(_clean())
    assert v.ok, v.failures
    s = v.summary
    assert (s["writes_acked"], s["rows_acked"], s["acked_lost"]) == (3, 5, 0)
    assert s["converge_s_max"] == 1.5 and s["unplanned_crashes"] == 0
    assert (s["stale_reads"], s["stale_reads_checked"]) == (0, 1)
    assert s["heal_converge_clean_s"] == {"n": 1, "p50": 1.5, "p99": 1.5, "max": 1.5}


def test_a_heal_whose_catching_up_met_another_fault_is_not_counted_clean() -> None:
    h = _clean()
    fault = {"fault": 7, "kind": "pause", "target": "source"}
    h.events = [
        {"t": 3.5, "event": "fault_start", **fault},
        {"t": 4.0, "event": "fault_heal", **fault},
    ]
    assert check(h).summary["heal_converge_clean_s"]["n"] == 0


def test_a_planted_lost_write_fails_naming_the_key() -> None:
    h = _clean()
    del h.final["source_rows"]["11"]  # acknowledged, gone
    h.final["source_rows"]["12"] = [8, 1, 0]  # same version, another write's value
    h.final["source_rows"]["10"] = [6, 1, 0]  # older than the acknowledged version
    v = check(h)
    assert not v.ok and v.summary["acked_lost"] == 3
    assert "3 acknowledged writes lost" in v.failures[0]
    assert "key 11 (missing, acked version 4 write 0/1)" in v.failures[0]


def test_a_newer_version_than_acknowledged_is_not_a_loss() -> None:
    h = _clean()
    h.final["source_rows"]["10"] = [9, 3, 0]  # a write whose answer was lost, applied
    assert check(h).ok


def test_a_write_on_no_replica_when_the_source_lost_its_disk_is_excused() -> None:
    h = _clean()
    del h.final["source_rows"]["5000"]
    h.wipes = [{"t": 3.0, "fault": 4, "at_risk": [[5000, 1, 1]]}]
    v = check(h)
    assert v.ok, v.failures
    assert v.summary["acked_excused_disk_lost"] == 1
    # the excuse is for that write only: an older write of it at risk excuses nothing
    h.wipes = [{"t": 3.0, "fault": 4, "at_risk": [[5000, 1, 0]]}]
    assert check(h).summary["acked_lost"] == 1


def test_a_diverged_or_missing_replica_fails() -> None:
    h = _clean()
    h.final["digests"]["dc1-r0"] = {"kv": "cd"}
    h.final["converge_s"]["dc1-r0"] = None
    v = check(h, converge_bound_s=30.0)
    assert v.failures == [
        "dc1-r0 diverged from the source 30.0 s after the last heal: tables ['kv']"
    ]
    del h.final["digests"]["dc1-r0"]
    assert "dc1-r0: no final digests" in check(h).failures[0]


def test_a_stale_read_fails_only_on_a_path_free_of_faults() -> None:
    h = _clean()
    h.reads.append(_read(t=9.5, acked_at=3.0, behind=2))
    v = check(h, settle_s=5.0)
    assert v.summary["stale_reads"] == 1
    assert "dc1-r0 served 2 rows older than write 0/2" in v.failures[0]
    # a partition of its link within settle_s before the write: not judged
    fault = {"fault": 9, "kind": "partition", "target": "dc1-r0|source"}
    h.events = [
        {"t": 0.5, "event": "fault_start", **fault},
        {"t": 1.0, "event": "fault_heal", **fault},
    ]
    v = check(h, settle_s=5.0)
    assert v.ok, v.failures
    assert v.summary["stale_reads_checked"] == 0
    # a fault elsewhere does not excuse it
    for e in h.events:
        e["target"] = "dc2-r0"
    assert check(h, settle_s=5.0).summary["stale_reads"] == 1


def test_crashes_alarms_timeouts_and_an_unreported_full_disk_fail() -> None:
    h = _clean()
    h.crashes = [{"node": "dc1-r0", "t": 4.0, "code": 1, "traceback": "Traceback ... ValueError"}]
    h.alarms = [{"t": 5.0, "node": "source", "what": "incident: automatic_rollback"}]
    h.convergence[0].update(outcome="timeout", seconds=None)
    h.disk = [{"fault": 1, "reported": False, "said": None, "acked_during": 0, "recovered_s": None}]
    v = check(h)
    text = "\n".join(v.failures)
    assert "node dc1-r0 exited unplanned at t=4.0 (code 1):\nTraceback ... ValueError" in text
    assert "guard false alarm at t=5.0 on source: incident: automatic_rollback" in text
    assert "dc1-r0 did not catch up within 60.0 s after fault 0 (kill on source)" in text
    assert "full disk (fault 1): the source took no write and reported nothing" in text
    assert "source took no writes after the full disk (fault 1)" in text
    assert v.summary["unplanned_crashes"] == 1 and v.summary["false_alarms"] == 1
    # a full disk the source wrote through (its log's last page had room) needs no report
    h.disk[0]["acked_during"] = 3
    assert "full disk (fault 1): the source took no write" not in "\n".join(check(h).failures)


def test_a_history_judged_again_from_its_file_gives_the_same_verdict(tmp_path: Path) -> None:
    h = _clean()
    del h.final["source_rows"]["11"]
    path = h.write(tmp_path / "history.json")
    again = History.load(path)
    assert check(again).failures == check(h).failures
    assert again.writes == h.writes


def test_reads_before_the_nemesis_started_are_not_judged() -> None:
    h = _clean()
    h.reads.append(_read(t=9.5, acked_at=3.0, behind=2))
    h.events = [{"t": 6.0, "event": "nemesis_start"}]
    v = check(h, settle_s=5.0)
    assert v.ok, v.failures
    assert v.summary["stale_reads_checked"] == 0
