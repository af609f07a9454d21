"""The replica's guard reads time only from the clock it is given: its reports, redirects,
rollback bookkeeping and state transitions carry the injected clock's wall and monotonic
times (a test moves them by hand; nothing reads ``time.time()`` inline)."""

from __future__ import annotations

from ekko.guard.baseline import LaggedStore
from ekko.guard.detector import DetectorConfig
from ekko.guard.replica_guard import ReplicaGuard
from ekko.guard.state import State
from ekko.node.config import ModelConfig
from ekko.serve import InferenceService
from ekko.store import Store
from ekko.store.clock import FakeClock


def test_the_replica_guard_stamps_everything_with_its_injected_clock():
    clock = FakeClock(wall=1_700_000_000.0, mono=50.0)
    sent: list[tuple[str, dict]] = []
    svc = InferenceService(
        Store(), ModelConfig(name="ctr", embedding_dim=8, rows_per_table=100).served()
    )
    guard = ReplicaGuard.build(
        "r1", svc, LaggedStore(1.0), DetectorConfig(), 3, None,
        lambda p, b: sent.append((p, b)), 0.3, 0.02, clock,
    )  # fmt: skip
    assert guard.report_body()["at"] == 1_700_000_000.0
    clock.advance(7.0)
    guard.redirect("operator test", epoch=0, automatic=False)
    assert guard.redirected_at == 1_700_000_007.0 and guard.redirects == [1_700_000_007.0]
    assert guard.health.state is State.CORRUPTED
    last = guard.health.history[-1]
    assert (last.mono, last.at) == (57.0, 1_700_000_007.0)  # transitions: both clocks
    clock.advance(3.0)
    guard.rolled_back(1_699_999_990.0, {})
    assert guard.restore_pending is not None
    assert guard.restore_pending["since"] == 1_700_000_010.0
    assert guard.health.history[-1].mono == 60.0
    guard.poll()  # an empty watermark is covered at once: restored, stamped by the clock
    path, body = sent[-1]
    assert path == "guard/restored" and body["at"] == 1_700_000_010.0
