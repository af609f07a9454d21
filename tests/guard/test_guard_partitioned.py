"""The guard's coordinator over two partition sources (the design's messages 2, 4-8), with the
other source in-process behind a fake ``restore_remote`` and a fake clock: every partition is
restored and quarantined, holders' digests are compared per (table, partition), a source that
does not answer is named and keeps the model corrupted, hostile reports are refused by name."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ekko.guard.coordinator import HolderReportError, PartitionPlan, merge_watermarks
from ekko.guard.errors import PreimageError
from ekko.guard.restore import SourceRestore
from ekko.guard.source_guard import SourceGuard
from ekko.guard.state import State
from ekko.schedule import WritePort
from ekko.schedule.quarantine import QuarantinedError
from ekko.store import Store, shard_of
from ekko.store.clock import FakeClock
from ekko.store.placement import Placement
from ekko.store.spec import TableSpec

PLACEMENT = Placement(2)
SHARDS = 4
DIM = 3
M = "/v1/models/ctr"


def keys_of(partition: int, n: int = 40) -> np.ndarray:
    """``n`` keys whose shard the placement puts on ``partition``."""
    every = np.arange(10 * n, dtype=np.int64)
    parts = PLACEMENT.partitions_of("emb", SHARDS)[shard_of(every, SHARDS)]
    return every[parts == partition][:n]


class Cluster:
    """Coordinator ``s0`` (partition 0), source ``s1`` (partition 1), serving node ``serve``,
    holder ``h`` (both partitions); ``answer`` decides what ``restore_remote`` reports."""

    def __init__(self, answer: str = "now") -> None:
        self.clock = FakeClock(wall=1_000.0)
        self.ports = {}
        for name in ("s0", "s1"):
            store = Store(origin=0 if name == "s0" else 1)
            port = WritePort(store, clock=self.clock)
            port.create_table(TableSpec("emb", DIM, SHARDS))
            self.ports[name] = port
        self.s1 = SourceRestore(
            "ctr", "s1", self.ports["s1"], ["emb"], partitions=(1,), placement=PLACEMENT,
            clock=self.clock,
        )  # fmt: skip
        self.sent: list[tuple[str, str, dict]] = []
        self.answer = answer
        self.pending: list = []
        plan = PartitionPlan(
            PLACEMENT, (0,), {"s1": (1,)}, {"h": (0, 1)}, self.send, self.restore_remote
        )
        self.guard = SourceGuard(
            "ctr", self.ports["s0"], ["emb"], None, ["serve"],
            lambda path, body: self.send("serve", f"/v1/models/ctr/{path}", body), None,
            margin_s=0.0, quarantine_s=30.0, probation=1, clock=self.clock, node="s0",
            plan=plan,
        )  # fmt: skip

    def send(self, node: str, path: str, body: dict) -> None:
        self.sent.append((node, path.rsplit("/", 1)[-1], body))
        if node == "s1" and path.endswith("guard/checkpoint"):
            self.s1.checkpoint(body["at"])

    def restore_remote(self, body: dict, done) -> None:
        self.restore_bodies = [*getattr(self, "restore_bodies", []), body]
        if self.answer == "now":
            done({"s1": self.s1.restore(**body).answer})
        elif self.answer == "dead":
            done({"s1": "no answer within 2.0 s (ConnectError)"})
        else:
            self.pending.append((body, done))

    def write(self, value: float) -> None:
        self.clock.advance(1.0)
        for p, name in enumerate(("s0", "s1")):
            k = keys_of(p)
            self.ports[name].write("emb", k, np.full((k.size, DIM), value, np.float32))

    def healthy_stretch(self) -> None:
        self.write(1.0)
        self.clock.advance(1.0)
        self.guard.report({"node": "serve", "state": "healthy", "epoch": 0})
        self.guard.tick(self.clock.wall())

    def holder_digests(self) -> dict[str, dict[str, str]]:
        """A holder that holds exactly what each source holds of its partition."""
        d0 = self.ports["s0"].store.table("emb").digest_partitions(PLACEMENT)[0]
        d1 = self.ports["s1"].store.table("emb").digest_partitions(PLACEMENT)[1]
        return {"emb": {"0": f"{d0:016x}", "1": f"{d1:016x}"}}

    def kinds(self, node: str) -> list[str]:
        return [kind for n, kind, _ in self.sent if n == node]


def test_a_rollback_restores_and_quarantines_every_partition_and_checks_holders_per_partition():
    c = Cluster()
    c.healthy_stretch()
    assert c.s1.preimages.checkpoints == c.guard.preimages.checkpoints == [1_002.0]  # message 2
    values = {n: p.store.table("emb").lookup(keys_of(i))[0].copy()
              for i, (n, p) in enumerate(c.ports.items())}  # fmt: skip
    c.write(50.0)  # poison on both partitions
    c.guard.report({"node": "serve", "state": "corrupted", "reason": "auc", "epoch": 0})
    inc = c.guard.incident
    assert inc is not None and inc["sources_pending"] == []
    assert c.restore_bodies == [
        {"to_wall": 1_002.0, "epoch": 0, "why": inc["why"], "quarantine_until": 1_033.0}
    ]
    for i, (name, port) in enumerate(c.ports.items()):
        np.testing.assert_array_equal(port.store.table("emb").lookup(keys_of(i))[0], values[name])
        with pytest.raises(QuarantinedError, match=r"epoch 0\)"):
            port.write("emb", keys_of(i)[:1], np.ones((1, DIM), np.float32))
    assert inc["rows_restored"] == 80 and set(inc["sources"]) == {"s0", "s1"}
    assert c.kinds("h") == ["redirect", "rolled_back"]  # message 3, 5
    assert c.kinds("serve") == ["redirect", "rolled_back"]
    rolled = c.sent[-1][2]
    assert rolled["partitions"] == {"0": "s0", "1": "s1"} and rolled["epoch"] == 0
    marks = [np.asarray(p.store.table("emb").knowledge) for p in c.ports.values()]
    assert rolled["watermark"] == {"emb": np.maximum(*marks).tolist()}
    c.guard.restored({"node": "h", "at": 1_004.0, "epoch": 0, "digests": c.holder_digests()})
    done = c.guard.incidents[-1]
    assert done["replica_table_mismatches"] == {} and done["good_rows_lost"] == 0
    assert c.kinds("serve")[-1] == "holders_restored"  # message 7
    c.guard.report({"node": "serve", "state": "healthy", "epoch": 1})
    c.guard.tick(c.clock.wall())
    assert c.guard.health.state is State.HEALTHY and c.kinds("h")[-1] == "healthy"  # message 8
    c.clock.advance(30.0)  # quarantine over at both sources, by their own clocks
    c.write(2.0)


def test_a_holder_disagreeing_on_one_partition_is_counted_and_bad_reports_are_refused():
    c = Cluster()
    c.healthy_stretch()
    c.write(50.0)
    c.guard.rollback(None, "operator")
    digests = c.holder_digests()
    with pytest.raises(HolderReportError, match="partition 2, which it does not hold"):
        c.guard.restored({"node": "h", "epoch": 0, "digests": {"emb": {"2": "0" * 16}}})
    with pytest.raises(HolderReportError, match="'x' holds no partition"):
        c.guard.restored({"node": "x", "epoch": 0, "digests": digests})
    with pytest.raises(HolderReportError, match="epoch: h reports restoring epoch 3"):
        c.guard.restored({"node": "h", "epoch": 3, "digests": digests})
    assert c.guard.incident is not None  # none of those counted
    digests["emb"]["1"] = "0" * 16
    c.guard.restored({"node": "h", "epoch": 0, "digests": digests})
    done = c.guard.incidents[-1]
    assert done["replica_table_mismatches"] == {"h": ["emb/1"]}
    assert done["good_rows_lost"] == 40  # partition 1's rows, by its source's count


def test_a_source_that_does_not_restore_is_named_and_the_model_stays_corrupted():
    c = Cluster(answer="dead")
    c.healthy_stretch()
    c.write(50.0)
    c.guard.report({"node": "serve", "state": "corrupted", "reason": "auc", "epoch": 0})
    assert c.guard.incident is None and c.guard.health.state is State.CORRUPTED
    failed = c.guard.incidents[-1]["failed_sources"]
    assert failed == {"s1": {"partitions": [1], "error": "no answer within 2.0 s (ConnectError)"}}
    status = c.guard.status()
    assert (
        status["state"] == "corrupted"
        and "not restored at s1 (partitions [1])" in (status["rollback_error"])
    )
    assert "rolled_back" not in c.kinds("h") + c.kinds("serve")  # traffic stays on baseline
    c.guard.report({"node": "serve", "state": "healthy", "epoch": 1})
    c.guard.tick(c.clock.wall())
    assert c.guard.health.state is State.CORRUPTED  # never healthy silently
    c.answer = "now"  # the source is back: an operator's rollback retries every source
    inc = c.guard.rollback(None, "retry")
    assert inc["epoch"] == 1 and c.kinds("h")[-1] == "rolled_back"
    assert inc["sources"]["s1"]["rows_restored"] == 40


def test_a_second_rollback_while_sources_restore_is_refused_and_a_restore_is_answered_once():
    c = Cluster(answer="later")
    c.healthy_stretch()
    c.write(50.0)
    inc = c.guard.rollback(None, "first")
    assert inc["sources_pending"] == ["s1"]
    with pytest.raises(PreimageError, match="already in progress"):
        c.guard.rollback(None, "second")
    with pytest.raises(HolderReportError, match="no rollback awaits"):
        c.guard.restored({"node": "h", "epoch": 0, "digests": {}})
    body, done = c.pending.pop()
    first = c.s1.restore(**body).answer
    again = c.s1.restore(**body)  # a retried post: the same answer, nothing written twice
    assert again.answer is first and again.rows == {} and first["rows_restored"] == 40
    done({"s1": first})
    assert c.guard.health.state is State.RECOVERING and c.kinds("h")[-1] == "rolled_back"
    assert c.s1.restore(**{**body, "epoch": 2}).answer["rows_restored"] == 0
    with pytest.raises(PreimageError, match="restore of epoch 1 after epoch 2"):
        c.s1.restore(**{**body, "epoch": 1})


def test_watermarks_of_different_shapes_are_refused_by_name():
    a: dict[str, Any] = {"node": "s0", "watermark": {"emb": [[1, 2]]}}
    b: dict[str, Any] = {"node": "s1", "watermark": {"emb": [[3, 0]], "d": [[4]]}}
    assert merge_watermarks([a, b]) == {"emb": [[3, 2]], "d": [[4]]}
    with pytest.raises(ValueError, match="table 'emb': shapes"):
        merge_watermarks([a, {"node": "s1", "watermark": {"emb": [[1]]}}])


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('{"to_wall": NaN, "epoch": 0}', "to_wall: expected `float` >= 0.0"),
        ('{"to_wall": "1002", "epoch": 0}', "to_wall: expected `float`, got `str`"),
        ('{"to_wall": -1.0, "epoch": 0}', "to_wall: expected `float` >= 0.0"),
        ('{"to_wall": 1e999, "epoch": 0}', "to_wall: expected a finite number"),
        ('{"to_wall": 1002, "epoch": -1}', "epoch: expected `int` >= 0"),
        ('{"to_wall": 1002, "epoch": 0, "quarantine_until": NaN}', "quarantine_until"),
        ('{"to_wall": 1002, "epoch": 0, "quarantine_until": 1e12}', "quarantine lasts at most"),
        ('{"epoch": 0}', "missing required field `to_wall`"),
    ],
)
async def test_a_hostile_restore_command_is_400_naming_the_field_and_nothing_is_restored(
    body: str, needle: str
) -> None:
    import httpx
    from starlette.applications import Starlette

    from ekko.guard.routes import partition_source_routes

    c = Cluster()
    c.healthy_stretch()
    c.write(50.0)
    before = c.ports["s1"].store.table("emb").digest()
    app = Starlette(routes=partition_source_routes({"ctr": c.s1}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        r = await http.post("/v1/models/ctr/guard/restore", content=body.encode())
        assert r.status_code == 400, r.text
        assert needle in r.json()["error"], r.text
        assert c.ports["s1"].store.table("emb").digest() == before and c.s1.last_epoch is None
        ok = await http.post("/v1/models/ctr/guard/restore", json={"to_wall": 1_002.0, "epoch": 0})
        assert ok.status_code == 200 and ok.json()["digests"]["emb"].keys() == {"1"}
        old = await http.post("/v1/models/ctr/guard/restore", json={"to_wall": 1_002.0, "epoch": 0})
        assert old.json() == ok.json()  # a retried command: the same answer
        early = await http.post("/v1/models/ctr/guard/restore", json={"to_wall": 5.0, "epoch": 1})
        assert early.status_code == 409 and "earliest restorable" in early.json()["error"]


async def test_the_coordinators_routes_refuse_a_bad_holder_report_and_a_second_rollback() -> None:
    import httpx
    from starlette.applications import Starlette

    from ekko.guard.routes import source_guard_routes

    c = Cluster(answer="later")
    c.healthy_stretch()
    c.write(50.0)
    app = Starlette(routes=source_guard_routes({"ctr": c.guard}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        first = await http.post(f"{M}/rollback", json={"why": "first"})
        assert first.status_code == 200 and first.json()["sources_pending"] == ["s1"]
        again = await http.post(f"{M}/rollback", json={"why": "again"})
        assert again.status_code == 409 and "already in progress" in again.json()["error"]
        body, done = c.pending.pop()
        done({"s1": c.s1.restore(**body).answer})
        bad = {"node": "h", "epoch": 0, "digests": {"emb": {"7": "0" * 16}}}
        r = await http.post(f"{M}/guard/restored", json=bad)
        assert r.status_code == 400 and "partition 7, which it does not hold" in r.json()["error"]
        assert c.guard.incident is not None and c.guard.incident["restored"] == {}
        for digest in ("zz", "0" * 15, "A" * 16, 7):  # not a digest: refused, not a mismatch
            bad = {"node": "h", "epoch": 0, "digests": c.holder_digests()}
            bad["digests"]["emb"]["1"] = digest
            r = await http.post(f"{M}/guard/restored", json=bad)
            assert r.status_code == 400, r.text
            assert r.json()["error"].startswith(f"digests.emb.1: {digest!r} is not a digest")
            assert c.guard.incident is not None and c.guard.incident["restored"] == {}
        good = {"node": "h", "epoch": 0, "digests": c.holder_digests()}
        assert (await http.post(f"{M}/guard/restored", json=good)).status_code == 200
        assert c.guard.incidents[-1]["good_rows_lost"] == 0
