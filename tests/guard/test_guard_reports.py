"""The source refuses a replica's report whose state is not one of the guard's, and a
``restored`` report whose digest is not one, before it keeps anything from them: every state
of the enum is taken, a hostile one is a 400 naming the field and the allowed values, and a
bad digest is a 400 naming it instead of counting as a mismatch (good rows lost)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette

from ekko.guard.reports import STATES, ReportError
from ekko.guard.routes import source_guard_routes
from ekko.guard.source_guard import SourceGuard
from ekko.guard.state import State
from ekko.schedule import WritePort
from ekko.store import Store
from ekko.store.clock import FakeClock
from ekko.store.spec import TableSpec

M = "/v1/models/ctr"
ALLOWED = "(one of healthy, uncertain, corrupted, recovering)"


def _source() -> tuple[SourceGuard, WritePort, FakeClock]:
    clock = FakeClock(wall=1_000.0)
    port = WritePort(Store(origin=0), clock=clock)
    guard = SourceGuard("ctr", port, ["emb"], None, ["r1"], lambda p, b: None, None,
                        margin_s=0.0, quarantine_s=0.0, clock=clock)  # fmt: skip
    port.create_table(TableSpec("emb", 2, 4))
    return guard, port, clock


def _in_incident() -> tuple[SourceGuard, str]:
    """A source whose rollback waits for r1's ``restored``; and the digest r1 should send."""
    guard, port, clock = _source()
    keys = np.arange(20, dtype=np.int64)
    port.write("emb", keys, np.ones((20, 2), np.float32))
    clock.advance(1.0)
    guard.report({"node": "r1", "state": "healthy", "epoch": 0})
    guard.tick(clock.wall())
    clock.advance(1.0)
    port.write("emb", keys, np.full((20, 2), 9.0, np.float32))
    guard.report({"node": "r1", "state": "corrupted", "reason": "auc", "epoch": 0})
    assert guard.incident is not None and guard.incident["restored"] == {}
    return guard, f"{port.store.table('emb').digest():016x}"


def test_the_states_are_the_guards_enum():
    assert tuple(s.value for s in State) == STATES and len(STATES) == 4


@settings(max_examples=len(State), deadline=None)
@given(state=st.sampled_from(list(State)))
def test_every_state_of_the_enum_is_taken(state: State):
    guard, _, _ = _source()
    guard.report({"node": "r1", "state": state.value, "epoch": 0})
    assert guard.reports["r1"]["state"] == state.value


HOSTILE = st.one_of(
    st.text(max_size=40).filter(lambda s: s not in STATES),
    st.sampled_from(["Corrupted", "CORRUPTED", " corrupted", "corrupted\x00", "healthy\n", ""]),
    st.integers(), st.lists(st.sampled_from(STATES), max_size=2), st.booleans(),
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(state=HOSTILE)
def test_a_state_outside_the_enum_is_refused_naming_it_and_nothing_moves(state):
    guard, _, _ = _source()
    guard.report({"node": "r1", "state": "healthy", "epoch": 0, "score": 1.5})
    before = dict(guard.reports["r1"])
    with pytest.raises(ReportError, match=r"^state: .* is not a guard state") as err:
        guard.report({"node": "r1", "state": state, "epoch": 0, "score": 99.0})
    assert str(err.value).endswith(ALLOWED)
    assert guard.reports["r1"] == before and guard.incident is None
    assert guard.health.state is State.HEALTHY and not guard.incidents


async def _post(guard: SourceGuard, path: str, body: dict) -> httpx.Response:
    app = Starlette(routes=source_guard_routes({"ctr": guard}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        return await c.post(M + path, json=body)


async def test_the_report_route_takes_each_state_and_refuses_others_with_a_400():
    guard, _, _ = _source()
    for state in STATES:  # corrupted last but one: it starts an incident (nothing to undo)
        r = await _post(guard, "/guard/report", {"node": "r1", "state": state, "epoch": 0})
        assert r.status_code == 200, r.text
        assert guard.reports["r1"]["state"] == state
    before = dict(guard.reports["r1"])
    for state in ("corupted", "HEALTHY", "", "degraded"):
        r = await _post(guard, "/guard/report", {"node": "r1", "state": state, "epoch": 9})
        assert r.status_code == 400
        assert r.json()["error"] == f"state: {state!r} is not a guard state {ALLOWED}"
    assert guard.reports["r1"] == before


BAD_DIGESTS = [
    ("xyz", "'xyz' is not a digest"),
    ("0" * 15, f"{'0' * 15!r} is not a digest (16 lowercase hex digits, as the store's"),
    ("0" * 17, f"{'0' * 17!r} is not a digest"),
    ("ABCDEF0123456789", "'ABCDEF0123456789' is not a digest"),
    ("0123456789abcdeg", "'0123456789abcdeg' is not a digest"),
    (12345, "12345 is not a digest"),
    (None, "None is not a digest"),
    ({"0": "0" * 16}, "{'0': '0000000000000000'} is not a digest"),
]


@pytest.mark.parametrize(("digest", "needle"), BAD_DIGESTS)
async def test_a_restored_report_with_a_bad_digest_is_a_400_and_counts_nothing(digest, needle):
    guard, good = _in_incident()
    body = {"node": "r1", "at": 1_003.0, "digests": {"emb": digest}}
    r = await _post(guard, "/guard/restored", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(f"digests.emb: {needle}"), r.text
    inc = guard.incident
    assert inc is not None and inc["restored"] == {} and not guard.incidents
    ok = await _post(guard, "/guard/restored", {**body, "digests": {"emb": good}})
    assert ok.status_code == 200 and guard.incident is None
    done = guard.incidents[-1]
    assert done["good_rows_lost"] == 0 and done["replica_table_mismatches"] == {}


def test_digests_that_are_not_an_object_are_refused():
    guard, _ = _in_incident()
    with pytest.raises(ReportError, match=r"^digests: expected an object, got \['x'\]"):
        guard.restored({"node": "r1", "digests": ["x"]})
    assert guard.incident is not None and guard.incident["restored"] == {}
