"""Sources of a partitioned cluster restarted (kill -9) around a rollback.

A partition source restarted inside a rollback's quarantine keeps it: it is in its data dir
(fsynced when the restore starts), reapplied at start until its end, dropped once expired
(without it the restarted source took the poisoned ranks' in-flight writes at once). The
coordinator restarted from its guard log numbers its incidents on, releases holders it had
not, and says so when it was killed inside a rollback; a source refuses a reused epoch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_guard_partitioned import PLACEMENT, Cluster

from ekko.guard.coordinator import PartitionPlan
from ekko.guard.errors import PreimageError
from ekko.guard.log import TransitionLog
from ekko.guard.quarantine_file import QuarantineFile, QuarantineFileError
from ekko.guard.restore import SourceRestore
from ekko.guard.source_guard import SourceGuard
from ekko.guard.state import State
from ekko.schedule import WritePort
from ekko.schedule.quarantine import QuarantinedError
from ekko.store import Store
from ekko.store.clock import FakeClock
from ekko.store.spec import TableSpec

DIM = 3
KEYS = np.arange(20, dtype=np.int64)


def source(path: Path, clock: FakeClock) -> tuple[WritePort, SourceRestore]:
    """A partition source's port and restore executor over a fresh store (a restart)."""
    port = WritePort(Store(origin=1), clock=clock)
    port.create_table(TableSpec("emb", DIM, 4))
    r = SourceRestore(
        "ctr", "s1", port, ["emb"], partitions=(1,), clock=clock,
        quarantine_file=QuarantineFile(path),
    )  # fmt: skip
    return port, r


def rolled_back(path: Path, clock: FakeClock) -> None:
    """A source that restored epoch 3 with writes refused until wall 1_030."""
    port, r = source(path, clock)
    port.write("emb", KEYS, np.ones((KEYS.size, DIM), np.float32))
    r.checkpoint(clock.wall())
    clock.advance(1.0)
    port.write("emb", KEYS, np.full((KEYS.size, DIM), 50.0, np.float32))
    r.restore(1_000.0, 3, "poison", quarantine_until=1_030.0)


def test_a_restarted_source_keeps_refusing_writes_until_the_quarantine_ends(tmp_path: Path):
    clock = FakeClock(wall=1_000.0)
    path = tmp_path / "quarantine.json"
    rolled_back(path, clock)
    clock.advance(5.0)
    port, r = source(path, clock)  # kill -9, restart with its data dir
    assert r.resume() == {"emb": 1_030.0}
    with pytest.raises(QuarantinedError, match=r"epoch 3\)") as err:
        port.write("emb", KEYS[:1], np.ones((1, DIM), np.float32))
    assert err.value.until == 1_030.0
    with pytest.raises(QuarantinedError):
        port.delete("emb", KEYS[:1])
    assert r.status()["quarantined"] == {"emb": {"epoch": 3, "until": 1_030.0}}
    with pytest.raises(PreimageError, match="epoch 2 after epoch 3"):
        r.restore(1_000.0, 2, "an older coordinator's command")
    clock.advance(30.0)  # past its end: the next start drops it from the file
    port, r = source(path, clock)
    assert r.resume() == {}
    port.write("emb", KEYS[:1], np.ones((1, DIM), np.float32))
    assert json.loads(path.read_text()) == {}


def test_a_damaged_quarantine_file_is_an_error_naming_it(tmp_path: Path):
    path = tmp_path / "quarantine.json"
    path.write_text('{"ctr": {"epoch": "x"}}')
    with pytest.raises(QuarantineFileError, match=r"quarantine\.json.*ctr"):
        QuarantineFile(path).load(0.0)
    path.write_text("{not json")
    with pytest.raises(QuarantineFileError, match=r"quarantine\.json: not JSON"):
        QuarantineFile(path).load(0.0)


# -- the coordinator restarted (kill -9) with its data dir, or without ------------------------


def restarted(c, path: Path):
    """The coordinator ``s0`` of ``c`` after a kill -9: a new ``SourceGuard`` over the same
    store (its pre-images are gone), resumed from its guard log."""
    c.ports["s0"] = WritePort(c.ports["s0"].store, clock=c.clock)  # a new process's port
    plan = PartitionPlan(PLACEMENT, (0,), {"s1": (1,)}, {"h": (0, 1)}, c.send, c.restore_remote)
    g = SourceGuard(
        "ctr", c.ports["s0"], ["emb"], None, ["serve"],
        lambda path, body: c.send("serve", f"/v1/models/ctr/{path}", body), TransitionLog(path),
        margin_s=0.0, quarantine_s=30.0, probation=1, clock=c.clock, node="s0", plan=plan,
    )  # fmt: skip
    g.resume(TransitionLog.read(path))
    return g


def logged_cluster(path: Path, answer: str = "now"):

    c = Cluster(answer)
    c.guard.log = TransitionLog(path)
    c.healthy_stretch()
    c.write(50.0)
    c.guard.report({"node": "serve", "state": "corrupted", "reason": "auc", "epoch": 0})
    return c


def test_a_restarted_coordinator_numbers_on_and_releases_the_holders_it_had_not(tmp_path: Path):
    """Incident 0 complete, the holders' release (message 8) not sent yet: the restarted
    coordinator's next incident is 1 (a second 0 was ignored by every holder as stale and
    answered from cache by every source that had restored 0), and it releases the holders
    once every serving node is healthy again."""
    path = tmp_path / "guard.log"
    c = logged_cluster(path)
    c.guard.restored({"node": "h", "at": 1_004.0, "epoch": 0, "digests": c.holder_digests()})
    assert c.guard.health.state is State.RECOVERING and "healthy" not in c.kinds("h")
    g = restarted(c, path)  # kill -9 before every serving node was healthy again
    assert g.next_epoch == 1 and g.status()["rollback_error"] is None
    g.report({"node": "serve", "state": "healthy", "epoch": 1})
    g.tick(c.clock.wall())
    assert c.sent[-1] == ("h", "healthy", {"epoch": 0})
    g.tick(c.clock.wall())
    assert c.kinds("h").count("healthy") == 1
    c.clock.advance(30.0)  # past the quarantine
    g.report({"node": "serve", "state": "healthy", "epoch": 1})
    g.tick(c.clock.wall())  # a restore point of the restarted coordinator
    c.write(60.0)
    g.report({"node": "serve", "state": "corrupted", "reason": "auc", "epoch": 1})
    assert g.incident is not None and g.incident["epoch"] == 1, g.rollback_error
    assert c.restore_bodies[-1]["epoch"] == 1


def test_a_coordinator_restarted_inside_a_rollback_says_so_and_stays_corrupted(tmp_path: Path):
    """Killed while the other sources restore: the restarted coordinator does not know if
    they did, and its pre-images are gone. It says so (corrupted, the incident named as
    interrupted), never a silent 'healthy' while serving nodes are on the baseline."""
    path = tmp_path / "guard.log"
    c = logged_cluster(path, answer="later")
    assert c.guard.incident is not None and c.pending
    g = restarted(c, path)
    st = g.status()
    assert st["state"] == "corrupted" and g.next_epoch == 1
    assert "restarted during the rollback of incident 0" in st["rollback_error"]
    assert st["incidents"][-1]["epoch"] == 0 and st["incidents"][-1]["interrupted"]
    sent = len(c.sent)
    g.report({"node": "serve", "state": "healthy", "epoch": 1})
    g.tick(c.clock.wall())  # every serving node and holder back to (or kept on) the baseline
    assert {(n, k, b["epoch"]) for n, k, b in c.sent[sent:]} == {
        ("serve", "redirect", 0),
        ("h", "redirect", 0),
    }
    g.tick(c.clock.wall())
    assert len(c.sent) == sent + 2
    assert g.status()["state"] == "corrupted" and "healthy" not in c.kinds("h")
    with pytest.raises(PreimageError):  # before the restart: its pre-images are gone
        g.rollback(1_002.0, "operator")
    restart_at = c.clock.wall()
    c.s1.checkpoint(restart_at)  # the other source (alive) has restore points of its own
    inc = g.rollback(restart_at, "operator: the state at the restart")
    assert inc["epoch"] == 1 and c.restore_bodies[-1]["epoch"] == 1
    body, done = c.pending.pop()
    done({"s1": c.s1.restore(**body).answer})
    g.restored({"node": "h", "at": c.clock.wall(), "epoch": 1, "digests": c.holder_digests()})
    assert g.incidents[-1]["good_rows_lost"] == 0 and c.kinds("serve")[-1] == "holders_restored"
    assert g.health.state is State.RECOVERING


def test_a_restarted_coordinator_without_its_data_reusing_an_epoch_is_refused(tmp_path: Path):
    """``--fresh``: the coordinator numbers from 0 again. A source that restored epoch 0 to
    another point refuses the new command naming both (it answered the old restore from
    cache, restoring nothing, and the coordinator counted the partition as restored)."""

    c = Cluster()
    c.healthy_stretch()
    c.write(50.0)
    c.s1.restore(1_002.0, 0, "first coordinator")
    c.clock.advance(1.0)
    c.s1.checkpoint(c.clock.wall())
    with pytest.raises(PreimageError, match=r"epoch 0 was restored here to 1002\.000"):
        c.s1.restore(c.clock.wall(), 0, "restarted coordinator")
    assert c.s1.restore(1_002.0, 0, "retried post").answer["epoch"] == 0  # a retry: as before


async def test_a_checkpoint_far_ahead_of_the_sources_clock_is_refused_and_keeps_its_points():
    """A checkpoint at 1e308 (a coordinator's clock gone wrong, a hostile signed post) was
    marked: it expired every pre-image (the window counts back from it) and every later
    checkpoint was 'before the last one', so the source could never restore again."""
    import httpx
    from starlette.applications import Starlette

    from ekko.guard.routes import partition_source_routes

    c = Cluster()
    c.healthy_stretch()
    c.write(50.0)
    app = Starlette(routes=partition_source_routes({"ctr": c.s1}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        for at in (1e308, c.clock.wall() + 3_600.0):
            r = await http.post("/v1/models/ctr/guard/checkpoint", json={"at": at})
            assert r.status_code == 400 and "ahead of this source's clock" in r.json()["error"]
        assert c.s1.preimages.checkpoints == [1_002.0]
        ok = await http.post("/v1/models/ctr/guard/checkpoint", json={"at": c.clock.wall() + 5})
        assert ok.status_code == 200 and ok.json()["marked"]  # a few seconds of skew pass
    assert c.s1.restore(1_002.0, 0, "poison").answer["rows_restored"] == 40


def test_a_holder_behind_a_lossy_codec_is_not_counted_as_losing_good_rows():
    """wan_codec int4 / lan_codec int8 (a real cluster: every holder's digest differed and
    the incident said all 800 good rows lost): a holder whose rows come through a lossy
    codec cannot match the source's digest bit for bit; its mismatches are listed apart,
    naming the codec, and not counted as rows lost. An exact holder's still are."""
    c = Cluster()
    c.guard.plan.holders = {"h": (0, 1), "exact": (0, 1)}
    c.guard.plan.inexact = {"h": "int8"}
    c.healthy_stretch()
    c.write(50.0)
    c.guard.report({"node": "serve", "state": "corrupted", "reason": "auc", "epoch": 0})
    wrong = {"emb": {"0": "0" * 16, "1": "1" * 16}}
    c.guard.restored({"node": "h", "at": 1_004.0, "epoch": 0, "digests": wrong})
    c.guard.restored({"node": "exact", "at": 1_004.0, "epoch": 0, "digests": c.holder_digests()})
    inc = c.guard.incidents[-1]
    assert inc["replica_table_mismatches"] == {} and inc["good_rows_lost"] == 0
    assert inc["mismatches_through_lossy_codecs"] == {
        "h": {"codec": "int8", "pairs": ["emb/0", "emb/1"]}
    }
